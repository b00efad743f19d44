//! lspci's device selectors: `-s [[[[DDDD]:]BB]:][SS][.[F]]` (a slot, parts of it, or
//! wildcards) and `-d [VVVV]:[DDDD][:CCCC[:PP]]` (vendor, device, class, prog-if).
//!
//! Pure parsers over strings with pciutils' semantics: every number is hexadecimal, a part
//! that is missing or `*` matches anything, and the class may have `x` digits that match
//! any digit. `-s 01:` selects bus 1 in every domain, `-s 1` device 1 on every bus,
//! `-s .1` function 1 of every device, `-d 8086:` every Intel device, `-d ::0108` every
//! NVMe controller.

use std::fmt;
use std::str::FromStr;

use crate::record::DeviceRecord;
use crate::{ClassCode, PciAddress};

/// Why a selector did not parse; names the part (as lspci's messages do) and the text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} in {text:?}")]
pub struct SelectorError {
    /// Which part is bad: "invalid bus number", "':' expected", ...
    pub what: &'static str,
    /// The selector as given (shortened to 64 characters).
    pub text: String,
}

impl SelectorError {
    fn new(what: &'static str, text: &str) -> Self {
        let text = match text.char_indices().nth(64) {
            Some((i, _)) => format!("{}...", &text[..i]),
            None => text.to_owned(),
        };
        SelectorError { what, text }
    }
}

/// A field that is given: not empty and not `*`.
fn defined(s: &str) -> bool {
    !s.is_empty() && s != "*"
}

/// pciutils' hex field: hex digits (and, with `mask`, `x` for any digit) whose value, with
/// each `x` counted as 1, is at most `max`. Returns `(value, mask)`; `None` when invalid.
fn hex_field(s: &str, max: u32, allow_x: bool) -> Option<(u32, u32)> {
    let (mut value, mut mask, mut bound) = (0u32, u32::MAX, 0u32);
    for c in s.chars() {
        if allow_x && (c == 'x' || c == 'X') {
            value <<= 4;
            bound = (bound << 4) | 1;
            mask <<= 4;
        } else {
            let d = c.to_digit(16)?;
            value = (value << 4) | d;
            bound = (bound << 4) | d;
            mask = (mask << 4) | 0xf;
        }
        // Checked each digit, so the shifts above never lose a digit that matters.
        if bound > max {
            return None;
        }
    }
    Some((value, mask))
}

/// An optional field: `Ok(None)` when missing or `*`.
fn field(s: &str, max: u32, what: &'static str, text: &str) -> Result<Option<u32>, SelectorError> {
    if !defined(s) {
        return Ok(None);
    }
    hex_field(s, max, false)
        .map(|(v, _)| Some(v))
        .ok_or_else(|| SelectorError::new(what, text))
}

/// `-s [[[[DDDD]:]BB]:][SS][.[F]]`: which slots to show. `None` parts match anything.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct SlotFilter {
    /// Domain (0 to 7fffffff).
    pub domain: Option<u32>,
    /// Bus (0 to ff).
    pub bus: Option<u8>,
    /// Device (slot, 0 to 1f).
    pub device: Option<u8>,
    /// Function (0 to 7).
    pub function: Option<u8>,
}

impl SlotFilter {
    /// Whether `address` is selected.
    pub fn matches_address(&self, address: PciAddress) -> bool {
        self.domain.is_none_or(|d| d == address.domain())
            && self.bus.is_none_or(|b| b == address.bus())
            && self.device.is_none_or(|s| s == address.device())
            && self.function.is_none_or(|f| f == address.function())
    }

    /// Whether `record` is selected (by its address).
    pub fn matches(&self, record: &DeviceRecord) -> bool {
        self.matches_address(record.address)
    }
}

impl FromStr for SlotFilter {
    type Err = SelectorError;

    /// Parses as pciutils does: the last `:` ends the bus, a `:` before it ends the
    /// domain, a `.` after the last `:` starts the function.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let mut f = SlotFilter::default();
        let (head, mid) = match text.rfind(':') {
            Some(i) => (Some(&text[..i]), &text[i + 1..]),
            None => (None, text),
        };
        if let Some(head) = head {
            let bus = match head.split_once(':') {
                Some((domain, bus)) => {
                    f.domain = field(domain, 0x7fff_ffff, "invalid domain number", text)?;
                    bus
                }
                None => head,
            };
            f.bus = field(bus, 0xff, "invalid bus number", text)?.map(|b| b as u8);
        }
        let (slot, func) = match mid.split_once('.') {
            Some((s, f)) => (s, Some(f)),
            None => (mid, None),
        };
        f.device = field(slot, 0x1f, "invalid slot number", text)?.map(|s| s as u8);
        if let Some(func) = func {
            f.function = field(func, 7, "invalid function number", text)?.map(|n| n as u8);
        }
        Ok(f)
    }
}

impl fmt::Display for SlotFilter {
    /// The canonical selector: `DDDD:BB:SS.F` with `*` for the parts that match anything.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fn part(f: &mut fmt::Formatter<'_>, v: Option<u32>, width: usize) -> fmt::Result {
            match v {
                Some(v) => write!(f, "{v:0width$x}"),
                None => f.write_str("*"),
            }
        }
        part(f, self.domain, 4)?;
        f.write_str(":")?;
        part(f, self.bus.map(u32::from), 2)?;
        f.write_str(":")?;
        part(f, self.device.map(u32::from), 2)?;
        f.write_str(".")?;
        part(f, self.function.map(u32::from), 1)
    }
}

/// `-d [VVVV]:[DDDD][:CCCC[:PP]]`: which ids to show. `None` parts match anything.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct IdFilter {
    /// Vendor id.
    pub vendor: Option<u16>,
    /// Device id.
    pub device: Option<u16>,
    /// Class: base and subclass (16 bits, `0108` for NVMe) and the mask of the bits that
    /// must match (`x` digits clear theirs).
    pub class: Option<(u16, u16)>,
    /// Programming interface.
    pub prog_if: Option<u8>,
}

impl IdFilter {
    /// Whether a device with these ids is selected. A filter that names a part the device
    /// does not have (`None`: unreadable) does not select it.
    pub fn matches_ids(&self, vendor: Option<u16>, device: Option<u16>, class: Option<ClassCode>) -> bool {
        let want = |f: Option<u16>, v: Option<u16>| f.is_none() || f == v;
        want(self.vendor, vendor)
            && want(self.device, device)
            && self.class.is_none_or(|(value, mask)| {
                class.is_some_and(|c| ((c.value() >> 8) as u16 ^ value) & mask == 0)
            })
            && self
                .prog_if
                .is_none_or(|p| class.is_some_and(|c| c.prog_if() == p))
    }

    /// Whether `record` is selected.
    pub fn matches(&self, record: &DeviceRecord) -> bool {
        self.matches_ids(
            record.vendor.map(|v| v.0),
            record.device.map(|d| d.0),
            record.class,
        )
    }
}

impl fmt::Display for IdFilter {
    /// The canonical selector: `VVVV:DDDD:CCCC:PP`, `*` for parts that match anything and
    /// `x` for class digits that do.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let part =
            |v: Option<u16>, width: usize| v.map_or_else(|| "*".to_owned(), |v| format!("{v:0width$x}"));
        write!(f, "{}:{}:", part(self.vendor, 4), part(self.device, 4))?;
        match self.class {
            Some((value, mask)) => {
                for shift in [12, 8, 4, 0] {
                    if (mask >> shift) & 0xf == 0 {
                        f.write_str("x")?;
                    } else {
                        write!(f, "{:x}", (value >> shift) & 0xf)?;
                    }
                }
            }
            None => f.write_str("*")?,
        }
        write!(f, ":{}", part(self.prog_if.map(u16::from), 2))
    }
}

impl FromStr for IdFilter {
    type Err = SelectorError;

    /// Parses as pciutils does: an empty text selects everything, else a `:` must follow
    /// the vendor.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let mut f = IdFilter::default();
        if text.is_empty() {
            return Ok(f);
        }
        let (vendor, rest) = text
            .split_once(':')
            .ok_or_else(|| SelectorError::new("':' expected", text))?;
        f.vendor = field(vendor, 0xffff, "invalid vendor ID", text)?.map(|v| v as u16);
        let (device, class) = match rest.split_once(':') {
            Some((d, c)) => (d, Some(c)),
            None => (rest, None),
        };
        f.device = field(device, 0xffff, "invalid device ID", text)?.map(|v| v as u16);
        if let Some(class) = class {
            let (class, prog_if) = match class.split_once(':') {
                Some((c, p)) => (c, Some(p)),
                None => (class, None),
            };
            if defined(class) {
                let (value, mask) = hex_field(class, 0xffff, true)
                    .ok_or_else(|| SelectorError::new("invalid class code", text))?;
                f.class = Some((value as u16, mask as u16));
            }
            if let Some(p) = prog_if {
                f.prog_if = field(p, 0xff, "invalid programming interface code", text)?.map(|p| p as u8);
            }
        }
        Ok(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{DeviceId, VendorId};
    use proptest::prelude::*;

    fn slot(s: &str) -> SlotFilter {
        s.parse().unwrap()
    }
    fn addr(s: &str) -> PciAddress {
        s.parse().unwrap()
    }

    #[test]
    fn slot_parts_as_lspci_reads_them() {
        let any = SlotFilter::default();
        assert_eq!(slot(""), any);
        assert_eq!(slot("*"), any);
        assert_eq!(slot("*:*:*.*"), any);
        assert_eq!(slot("01:"), SlotFilter { bus: Some(1), ..any });
        assert_eq!(
            slot("1"),
            SlotFilter {
                device: Some(1),
                ..any
            }
        );
        assert_eq!(
            slot(".1"),
            SlotFilter {
                function: Some(1),
                ..any
            }
        );
        assert_eq!(
            slot("0.3"),
            SlotFilter {
                device: Some(0),
                function: Some(3),
                ..any
            }
        );
        assert_eq!(
            slot(":00.0"),
            SlotFilter {
                device: Some(0),
                function: Some(0),
                ..any
            }
        );
        assert_eq!(
            slot("0000:*:*.0"),
            SlotFilter {
                domain: Some(0),
                function: Some(0),
                ..any
            }
        );
        assert_eq!(
            slot("10000:ff:1f.7"),
            SlotFilter {
                domain: Some(0x10000),
                bus: Some(0xff),
                device: Some(0x1f),
                function: Some(7)
            }
        );
        // Leading zeros do not count against the limit.
        assert_eq!(slot("0001:"), SlotFilter { bus: Some(1), ..any });
        assert_eq!(slot("3:"), SlotFilter { bus: Some(3), ..any });
    }

    #[test]
    fn bad_slots_name_the_part() {
        for (text, what) in [
            ("100:", "invalid bus number"),
            ("g:", "invalid bus number"),
            ("20", "invalid slot number"),
            ("0.8", "invalid function number"),
            (".x", "invalid function number"),
            ("80000000::", "invalid domain number"),
            ("1:2:3:4", "invalid bus number"),
            ("0x1", "invalid slot number"),
            ("-1", "invalid slot number"),
            (" 1", "invalid slot number"),
        ] {
            let e = text.parse::<SlotFilter>().unwrap_err();
            assert_eq!(e.what, what, "{text}");
            assert_eq!(e.text, text);
        }
        let long = "z".repeat(1000);
        assert!(long.parse::<SlotFilter>().unwrap_err().to_string().len() < 100);
    }

    #[test]
    fn slots_match_addresses() {
        assert!(slot("01:").matches_address(addr("0000:01:00.0")));
        assert!(slot("01:").matches_address(addr("0001:01:1f.7")));
        assert!(!slot("01:").matches_address(addr("0000:02:01.0")));
        assert!(slot(".1").matches_address(addr("0000:01:00.1")));
        assert!(!slot(".1").matches_address(addr("0000:01:00.2")));
        assert!(slot("0000:*:*.0").matches_address(addr("0000:03:00.0")));
        assert!(!slot("0000:*:*.0").matches_address(addr("0001:03:00.0")));
        assert!(slot("1f").matches_address(addr("0000:00:1f.3")));
    }

    fn id(s: &str) -> IdFilter {
        s.parse().unwrap()
    }

    #[test]
    fn ids_as_lspci_reads_them() {
        let any = IdFilter::default();
        assert_eq!(id(""), any);
        assert_eq!(id(":"), any);
        assert_eq!(id("*:*:*"), any);
        assert_eq!(
            id("8086:"),
            IdFilter {
                vendor: Some(0x8086),
                ..any
            }
        );
        assert_eq!(
            id(":10d3"),
            IdFilter {
                device: Some(0x10d3),
                ..any
            }
        );
        assert_eq!(
            id("::0108"),
            IdFilter {
                class: Some((0x0108, 0xffff)),
                ..any
            }
        );
        assert_eq!(
            id("::01xx"),
            IdFilter {
                class: Some((0x0100, 0xff00)),
                ..any
            }
        );
        assert_eq!(
            id("1b36:0010:0108:02"),
            IdFilter {
                vendor: Some(0x1b36),
                device: Some(0x10),
                class: Some((0x0108, 0xffff)),
                prog_if: Some(2)
            }
        );
        for (text, what) in [
            ("8086", "':' expected"),
            ("10000:", "invalid vendor ID"),
            (":g", "invalid device ID"),
            ("::10000", "invalid class code"),
            ("::xxxxx", "invalid class code"),
            ("::0108:100", "invalid programming interface code"),
            ("x:", "invalid vendor ID"),
        ] {
            assert_eq!(text.parse::<IdFilter>().unwrap_err().what, what, "{text}");
        }
    }

    #[test]
    fn ids_match_records() {
        let mut d = DeviceRecord::new(addr("0000:01:00.0"));
        d.vendor = Some(VendorId(0x1b36));
        d.device = Some(DeviceId(0x0010));
        d.class = Some(ClassCode::from_parts(0x01, 0x08, 0x02));
        for yes in [
            "",
            "1b36:",
            ":0010",
            "1b36:0010:0108",
            "::01xx",
            "::x108",
            "::0108:02",
            "::*:02",
        ] {
            assert!(id(yes).matches(&d), "{yes}");
        }
        for no in ["8086:", ":0011", "::0106", "::02xx", "::0108:01", "::1x"] {
            assert!(!id(no).matches(&d), "{no}");
        }
        // Unknown ids match only filters that do not ask for them.
        let unknown = DeviceRecord::new(addr("0000:01:00.0"));
        assert!(id(":").matches(&unknown));
        assert!(!id("1b36:").matches(&unknown));
        assert!(!id("::01xx").matches(&unknown));
    }

    /// The simple reference: a filter matches an address iff each given part equals it.
    fn reference(parts: [Option<u32>; 4], a: PciAddress) -> bool {
        let have = [a.domain(), a.bus().into(), a.device().into(), a.function().into()];
        parts.iter().zip(have).all(|(p, h)| p.is_none_or(|p| p == h))
    }

    proptest! {
        #[test]
        fn selectors_never_panic(text in "[0-9a-fA-FxX*:.g -]{0,20}") {
            let _ = text.parse::<SlotFilter>();
            let _ = text.parse::<IdFilter>();
        }

        #[test]
        fn any_text_never_panics(text in any::<String>()) {
            let _ = text.parse::<SlotFilter>();
            let _ = text.parse::<IdFilter>();
        }

        /// Display then parse gives the filter back, and it selects exactly what the
        /// reference selects.
        #[test]
        fn slot_round_trip_and_reference(
            domain in proptest::option::of(0u32..0x1_0002),
            bus in proptest::option::of(any::<u8>()),
            device in proptest::option::of(0u8..0x20),
            function in proptest::option::of(0u8..8),
            a in (0u32..0x1_0002, any::<u8>(), 0u8..0x20, 0u8..8),
        ) {
            let f = SlotFilter { domain, bus, device, function };
            prop_assert_eq!(f.to_string().parse::<SlotFilter>().unwrap(), f);
            let a = PciAddress::new(a.0, a.1, a.2, a.3).unwrap();
            let parts = [domain, bus.map(u32::from), device.map(u32::from), function.map(u32::from)];
            prop_assert_eq!(f.matches_address(a), reference(parts, a));
            // The exact address always selects itself.
            prop_assert!(a.to_string().parse::<SlotFilter>().unwrap().matches_address(a));
        }

        /// Display then parse gives an id filter back (class masks whole digits: from `x`).
        #[test]
        fn id_round_trip(
            vendor in proptest::option::of(any::<u16>()),
            device in proptest::option::of(any::<u16>()),
            class in proptest::option::of((any::<u16>(), any::<[bool; 4]>())),
            prog_if in proptest::option::of(any::<u8>()),
        ) {
            let class = class.map(|(v, keep)| {
                let mask = (0..4).filter(|&i| keep[i]).fold(0u16, |m, i| m | 0xf << (4 * i));
                (v & mask, mask)
            });
            let f = IdFilter { vendor, device, class, prog_if };
            let back = f.to_string().parse::<IdFilter>().unwrap();
            prop_assert_eq!(back.vendor, f.vendor);
            prop_assert_eq!(back.device, f.device);
            prop_assert_eq!(back.prog_if, f.prog_if);
            prop_assert_eq!(back.class, f.class);
        }
    }
}
