//! PCI addresses: `domain:bus:device.function`.

use std::fmt;
use std::str::FromStr;

/// A PCI function address, always valid once built: device below 32, function below 8.
///
/// The domain is 32 bits wide because domains above `0xffff` exist (Intel VMD puts its
/// devices in domains such as `10000`). Addresses order by domain, bus, device, function,
/// which is the order the kernel and `lspci -D` list them in.
///
/// ```
/// use pcibus::PciAddress;
/// let a: PciAddress = "0000:3b:00.1".parse().unwrap();
/// assert_eq!((a.domain(), a.bus(), a.device(), a.function()), (0, 0x3b, 0, 1));
/// assert_eq!(a.to_string(), "0000:3b:00.1");
/// // Lenient parsing accepts what people type: no domain, upper case, fewer digits.
/// assert_eq!(PciAddress::parse_lenient("3B:0.1").unwrap(), a);
/// assert_eq!(PciAddress::parse_lenient("10000:e1:00.0").unwrap().to_string(), "10000:e1:00.0");
/// ```
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PciAddress {
    // Field order is the sort order.
    domain: u32,
    bus: u8,
    device: u8,
    function: u8,
}

/// Why a text is not a PCI address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid PCI address {text:?}: {reason}")]
pub struct AddressError {
    /// The offending text, shortened to 40 characters.
    pub text: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

impl AddressError {
    fn new(text: &str, reason: &'static str) -> Self {
        AddressError {
            text: crate::error::shorten(text.as_bytes()),
            reason,
        }
    }
}

impl PciAddress {
    /// Builds an address, or `None` when `device > 0x1f` or `function > 7`.
    pub const fn new(domain: u32, bus: u8, device: u8, function: u8) -> Option<Self> {
        if device > 0x1f || function > 7 {
            return None;
        }
        Some(PciAddress {
            domain,
            bus,
            device,
            function,
        })
    }

    /// The PCI domain (segment).
    pub const fn domain(self) -> u32 {
        self.domain
    }
    /// The bus number.
    pub const fn bus(self) -> u8 {
        self.bus
    }
    /// The device (slot) number, below 32.
    pub const fn device(self) -> u8 {
        self.device
    }
    /// The function number, below 8.
    pub const fn function(self) -> u8 {
        self.function
    }
    /// Device and function packed as the kernel's `devfn` byte.
    pub const fn devfn(self) -> u8 {
        (self.device << 3) | self.function
    }

    /// Parses exactly the form the kernel writes in sysfs names: `%04x:%02x:%02x.%x` in lower
    /// case, where the domain has 4 to 8 digits and only as many as its value needs above 4.
    pub fn parse_strict(text: &str) -> Result<Self, AddressError> {
        let err = |reason| AddressError::new(text, reason);
        let (domain, rest) = text.split_once(':').ok_or_else(|| err("expected DDDD:BB:DD.F"))?;
        let (bus, rest) = rest.split_once(':').ok_or_else(|| err("expected DDDD:BB:DD.F"))?;
        let (device, function) = rest.split_once('.').ok_or_else(|| err("expected DDDD:BB:DD.F"))?;
        let lower_hex = |s: &str| {
            s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        };
        if !(lower_hex(domain) && lower_hex(bus) && lower_hex(device) && lower_hex(function)) {
            return Err(err("expected lower-case hex digits"));
        }
        if !(4..=8).contains(&domain.len()) || (domain.len() > 4 && domain.starts_with('0')) {
            return Err(err("domain must have 4 digits, or more without leading zeros"));
        }
        if bus.len() != 2 || device.len() != 2 || function.len() != 1 {
            return Err(err("expected DDDD:BB:DD.F"));
        }
        Self::from_parts(text, domain, bus, device, function)
    }

    /// Parses what people and other tools write: optional domain (`01:00.0` is domain 0),
    /// 1 to 8 domain digits, 1 to 2 bus and device digits, either case, surrounding
    /// whitespace.
    pub fn parse_lenient(text: &str) -> Result<Self, AddressError> {
        let t = text.trim();
        let err = |reason| AddressError::new(text, reason);
        let (head, function) = t.rsplit_once('.').ok_or_else(|| err("expected [DDDD:]BB:DD.F"))?;
        let mut parts = head.rsplitn(3, ':');
        let device = parts.next().unwrap_or_default();
        let bus = parts.next().ok_or_else(|| err("expected [DDDD:]BB:DD.F"))?;
        let domain = parts.next().unwrap_or("0");
        let ok_len = |s: &str, max| (1..=max).contains(&s.len());
        if !ok_len(domain, 8) || !ok_len(bus, 2) || !ok_len(device, 2) || function.len() != 1 {
            return Err(err("expected [DDDD:]BB:DD.F"));
        }
        if ![domain, bus, device, function]
            .iter()
            .all(|s| s.bytes().all(|b| b.is_ascii_hexdigit()))
        {
            return Err(err("expected hex digits"));
        }
        Self::from_parts(text, domain, bus, device, function)
    }

    fn from_parts(
        text: &str,
        domain: &str,
        bus: &str,
        device: &str,
        function: &str,
    ) -> Result<Self, AddressError> {
        // The digit counts were checked by the callers, so these cannot overflow.
        let hex =
            |s: &str| u32::from_str_radix(s, 16).map_err(|_| AddressError::new(text, "expected hex digits"));
        let (domain, bus, device, function) = (hex(domain)?, hex(bus)?, hex(device)?, hex(function)?);
        if device > 0x1f {
            return Err(AddressError::new(text, "device number above 0x1f"));
        }
        if function > 7 {
            return Err(AddressError::new(text, "function number above 7"));
        }
        Ok(PciAddress {
            domain,
            bus: bus as u8,
            device: device as u8,
            function: function as u8,
        })
    }
}

impl FromStr for PciAddress {
    type Err = AddressError;
    /// Lenient parsing; see [`PciAddress::parse_lenient`].
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse_lenient(s)
    }
}

impl fmt::Display for PciAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:04x}:{:02x}:{:02x}.{:x}",
            self.domain, self.bus, self.device, self.function
        )
    }
}

impl fmt::Debug for PciAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PciAddress({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn strict_accepts_kernel_names_only() {
        let a = PciAddress::parse_strict("0000:01:00.0").unwrap();
        assert_eq!(a, PciAddress::new(0, 1, 0, 0).unwrap());
        assert_eq!(
            PciAddress::parse_strict("10000:e1:00.0").unwrap(),
            PciAddress::new(0x10000, 0xe1, 0, 0).unwrap()
        );
        for bad in [
            "01:00.0",
            "0000:01:00.8",
            "0000:02:ab.0",
            "0000:0A:00.0",
            "00000:01:00.0",
            "0000:1:00.0",
            "0000:01:00.0 ",
            "",
            "devices",
            "0000:01:00.",
            "123456789:00:00.0",
        ] {
            assert!(PciAddress::parse_strict(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn lenient_accepts_what_people_type() {
        let a = PciAddress::new(0, 1, 2, 3).unwrap();
        for ok in [
            "1:2.3",
            "01:02.3",
            "0000:01:02.3",
            "0:1:2.3",
            " 0000:01:02.3\n",
            "0000:01:02.3",
        ] {
            assert_eq!(PciAddress::parse_lenient(ok).unwrap(), a, "{ok}");
        }
        assert_eq!(
            PciAddress::parse_lenient("FFFFFFFF:FF:1F.7").unwrap(),
            PciAddress::new(u32::MAX, 0xff, 0x1f, 7).unwrap()
        );
        for bad in [
            "0000:02:ab.0",
            "1:2",
            "1.2",
            "x:1:2.3",
            "1:2:3:4.5",
            "0:0:0.8",
            "100000000:0:0.0",
        ] {
            assert!(PciAddress::parse_lenient(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn error_names_the_text() {
        let e = PciAddress::parse_strict("0000:02:ab.0").unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid PCI address \"0000:02:ab.0\": device number above 0x1f"
        );
    }

    #[test]
    fn order_is_domain_bus_device_function() {
        let mut v: Vec<PciAddress> = [
            "0001:00:00.0",
            "0000:00:01.0",
            "0000:00:00.7",
            "0000:01:00.0",
            "10000:00:00.0",
        ]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
        v.sort();
        let s: Vec<String> = v.iter().map(|a| a.to_string()).collect();
        assert_eq!(
            s,
            [
                "0000:00:00.7",
                "0000:00:01.0",
                "0000:01:00.0",
                "0001:00:00.0",
                "10000:00:00.0"
            ]
        );
    }

    fn any_address() -> impl Strategy<Value = PciAddress> {
        (any::<u32>(), any::<u8>(), 0u8..32, 0u8..8)
            .prop_map(|(d, b, s, f)| PciAddress::new(d, b, s, f).unwrap())
    }

    proptest! {
        #[test]
        fn display_round_trips_strict(a in any_address()) {
            prop_assert_eq!(PciAddress::parse_strict(&a.to_string()).unwrap(), a);
            prop_assert_eq!(PciAddress::parse_lenient(&a.to_string()).unwrap(), a);
        }

        #[test]
        fn parsers_never_panic(s in ".{0,40}") {
            let _ = PciAddress::parse_strict(&s);
            let _ = PciAddress::parse_lenient(&s);
        }

        #[test]
        fn strict_implies_lenient(s in "[0-9a-fA-F:. ]{0,16}") {
            if let Ok(a) = PciAddress::parse_strict(&s) {
                prop_assert_eq!(PciAddress::parse_lenient(&s).unwrap(), a);
            }
        }

        #[test]
        fn order_matches_tuple_order(a in any_address(), b in any_address()) {
            let key = |x: PciAddress| (x.domain(), x.bus(), x.device(), x.function());
            prop_assert_eq!(a.cmp(&b), key(a).cmp(&key(b)));
        }
    }
}
