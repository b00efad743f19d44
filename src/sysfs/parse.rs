//! Pure parsers of sysfs PCI attribute contents, and formatters writing them as the kernel
//! does.
//!
//! Every parser takes the bytes of a whole attribute file and returns a typed value or a
//! [`ParseError`] naming the attribute and quoting the text. None does I/O, none panics on any
//! input, and none allocates more than a small bound, whatever numbers the input holds.
//!
//! Common rules:
//!
//! * Surrounding ASCII whitespace, including the trailing `"\n"` every sysfs file ends with,
//!   is ignored.
//! * Hex numbers may have a `0x` or `0X` prefix or none: the kernel always writes the prefix
//!   for `vendor`, `class` and the like, but the same numbers appear without it in `uevent`
//!   and in what people type, and nothing is ambiguous about a hex-only attribute. Digits may
//!   be of either case. Signs (`+`, `-`) are never accepted.
//! * Decimal numbers are plain ASCII digits, no sign.
//! * A value too large for its field is [`ParseErrorKind::OutOfRange`], never truncated or
//!   masked.
//!
//! The `format_*` functions return exactly what the kernel writes into the file, trailing
//! newline included, so that fixture generators can write them out as they are; each parser
//! reads back what its formatter writes.

use std::fmt::Write as _;

use crate::PciAddress;
use crate::error::{ParseError, ParseErrorKind};
use crate::model::{ClassCode, DeviceId, LinkSpeed, Resource, ResourceSlot, VendorId};

// ---------------------------------------------------------------------------------------------
// Number helpers

/// Why a run of digits is not a number.
enum NumError {
    /// Empty, or a character that is not a digit of the base.
    Invalid,
    /// Does not fit in a `u64`.
    Overflow,
}

fn strip_hex_prefix(text: &[u8]) -> &[u8] {
    match text {
        [b'0', b'x' | b'X', rest @ ..] => rest,
        _ => text,
    }
}

/// Parses hex digits only (no prefix, no sign), of either case. One pass: the scanner
/// parses a few hundred of these per device (`resource`), so no separate validation pass.
fn hex_digits(digits: &[u8]) -> Result<u64, NumError> {
    if digits.is_empty() {
        return Err(NumError::Invalid);
    }
    let mut value: u64 = 0;
    let mut overflow = false;
    for &d in digits {
        let nibble = match d {
            b'0'..=b'9' => d - b'0',
            b'a'..=b'f' => d - b'a' + 10,
            b'A'..=b'F' => d - b'A' + 10,
            _ => return Err(NumError::Invalid),
        };
        // Invalid text wins over overflow, so keep scanning after an overflow.
        overflow |= value >> 60 != 0;
        value = (value << 4) | u64::from(nibble);
    }
    if overflow {
        Err(NumError::Overflow)
    } else {
        Ok(value)
    }
}

/// Parses decimal digits only (no sign).
fn dec_digits(digits: &[u8]) -> Result<u64, NumError> {
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return Err(NumError::Invalid);
    }
    let mut value: u64 = 0;
    for &d in digits {
        value = value
            .checked_mul(10)
            .and_then(|v| v.checked_add(u64::from(d - b'0')))
            .ok_or(NumError::Overflow)?;
    }
    Ok(value)
}

const EXPECTED_HEX: &str = "a hex number such as 0x1f";
const EXPECTED_DEC: &str = "a decimal number";

/// A whole attribute holding one hex number no larger than `max`.
fn hex_attribute(attribute: &'static str, bytes: &[u8], max: u64) -> Result<u64, ParseError> {
    let text = bytes.trim_ascii();
    if text.is_empty() {
        return Err(ParseError::new(attribute, ParseErrorKind::Empty, bytes));
    }
    match hex_digits(strip_hex_prefix(text)) {
        Ok(v) if v <= max => Ok(v),
        Ok(_) | Err(NumError::Overflow) => Err(ParseError::new(
            attribute,
            ParseErrorKind::OutOfRange { max },
            bytes,
        )),
        Err(NumError::Invalid) => Err(ParseError::new(
            attribute,
            ParseErrorKind::Invalid {
                expected: EXPECTED_HEX,
            },
            bytes,
        )),
    }
}

/// A whole attribute holding one decimal number no larger than `max`.
fn dec_attribute(attribute: &'static str, bytes: &[u8], max: u64) -> Result<u64, ParseError> {
    let text = bytes.trim_ascii();
    if text.is_empty() {
        return Err(ParseError::new(attribute, ParseErrorKind::Empty, bytes));
    }
    match dec_digits(text) {
        Ok(v) if v <= max => Ok(v),
        Ok(_) | Err(NumError::Overflow) => Err(ParseError::new(
            attribute,
            ParseErrorKind::OutOfRange { max },
            bytes,
        )),
        Err(NumError::Invalid) => Err(ParseError::new(
            attribute,
            ParseErrorKind::Invalid {
                expected: EXPECTED_DEC,
            },
            bytes,
        )),
    }
}

// ---------------------------------------------------------------------------------------------
// ids, class, revision

/// Parses a 16-bit id attribute: `vendor`, `device`, `subsystem_vendor`, `subsystem_device`
/// (the kernel writes `0x%04x`, e.g. `"0x8086\n"`).
///
/// The `0x` prefix is optional (see the [module docs](self)); a value above `0xffff` is
/// [`ParseErrorKind::OutOfRange`].
///
/// ```
/// use pcibus::sysfs::parse::hex_u16;
/// assert_eq!(hex_u16("vendor", b"0x8086\n").unwrap(), 0x8086);
/// assert_eq!(hex_u16("vendor", b"15b3").unwrap(), 0x15b3);
/// assert!(hex_u16("vendor", b"0x18086\n").is_err());
/// ```
pub fn hex_u16(attribute: &'static str, bytes: &[u8]) -> Result<u16, ParseError> {
    // The value is at most 0xffff, so the conversion cannot fail.
    hex_attribute(attribute, bytes, 0xffff).map(|v| v as u16)
}

/// Writes a 16-bit id as the kernel does: `0x%04x\n`.
pub fn format_hex_u16(value: u16) -> String {
    format!("0x{value:04x}\n")
}

/// Parses `class` (the kernel writes `0x%06x`, e.g. `"0x010802\n"`).
///
/// A value above `0xffffff` is rejected with [`ParseErrorKind::OutOfRange`]. DPDK masks the
/// value with `0xffffff` instead; we reject it, since such a file is not one the kernel
/// wrote and masking would silently turn garbage into a plausible class.
pub fn class(bytes: &[u8]) -> Result<ClassCode, ParseError> {
    let v = hex_attribute("class", bytes, 0xff_ffff)?;
    ClassCode::new(v as u32).ok_or_else(|| {
        // Unreachable: the value was checked against the same bound.
        ParseError::new("class", ParseErrorKind::OutOfRange { max: 0xff_ffff }, bytes)
    })
}

/// Writes a class code as the kernel does: `0x%06x\n`.
pub fn format_class(class: ClassCode) -> String {
    format!("0x{:06x}\n", class.value())
}

/// Parses `revision` (the kernel writes `0x%02x`, e.g. `"0x02\n"`).
pub fn revision(bytes: &[u8]) -> Result<u8, ParseError> {
    hex_attribute("revision", bytes, 0xff).map(|v| v as u8)
}

/// Writes a revision as the kernel does: `0x%02x\n`.
pub fn format_revision(revision: u8) -> String {
    format!("0x{revision:02x}\n")
}

// ---------------------------------------------------------------------------------------------
// decimal numbers, numa_node

/// Parses a decimal `u32` attribute: `sriov_*` counts, `irq`, IOMMU group numbers...
pub fn decimal_u32(attribute: &'static str, bytes: &[u8]) -> Result<u32, ParseError> {
    dec_attribute(attribute, bytes, u64::from(u32::MAX)).map(|v| v as u32)
}

/// Parses a decimal `u16` attribute: `sriov_totalvfs`, `sriov_numvfs`, `sriov_offset`,
/// `sriov_stride`...
pub fn decimal_u16(attribute: &'static str, bytes: &[u8]) -> Result<u16, ParseError> {
    dec_attribute(attribute, bytes, u64::from(u16::MAX)).map(|v| v as u16)
}

/// Writes a decimal number as the kernel does: `%u\n`.
pub fn format_decimal(value: u32) -> String {
    format!("{value}\n")
}

/// Parses `numa_node`: `"-1\n"` (no NUMA affinity) is `None`, a node number is `Some`; any
/// other negative number is an error.
pub fn numa_node(bytes: &[u8]) -> Result<Option<u32>, ParseError> {
    let text = bytes.trim_ascii();
    match text {
        b"-1" => Ok(None),
        [b'-', ..] => Err(ParseError::new(
            "numa_node",
            ParseErrorKind::Invalid {
                expected: "a node number or -1",
            },
            bytes,
        )),
        _ => dec_attribute("numa_node", bytes, u64::from(u32::MAX)).map(|v| Some(v as u32)),
    }
}

/// Writes `numa_node` as the kernel does: `-1\n` for `None`.
pub fn format_numa_node(node: Option<u32>) -> String {
    match node {
        Some(n) => format!("{n}\n"),
        None => "-1\n".to_owned(),
    }
}

// ---------------------------------------------------------------------------------------------
// resource

/// The most lines [`resource`] accepts. The kernel writes at most 17.
pub const RESOURCE_MAX_LINES: usize = 64;

/// The slot the kernel's layout gives line `index` (0-based) of a `resource` file of `count`
/// lines; see [`resource`].
pub fn resource_slot(index: usize, count: usize) -> ResourceSlot {
    // Indexes are below RESOURCE_MAX_LINES in practice; saturate so any input is safe.
    let small = |i: usize| u8::try_from(i).unwrap_or(u8::MAX);
    match index {
        0..=5 => ResourceSlot::Bar(small(index)),
        6 => ResourceSlot::Rom,
        _ if count == 7 || count == 11 => ResourceSlot::BridgeWindow(small(index - 7)),
        7..=12 => ResourceSlot::IovBar(small(index - 7)),
        _ => ResourceSlot::BridgeWindow(small(index - 13)),
    }
}

/// Parses `resource`: one line `0x%016llx 0x%016llx 0x%016llx` (start, end, flags) per
/// resource, and returns every line, all-zero ones included (see
/// [`Resource::is_present`]).
///
/// Slots follow the kernel's layout, which depends on the line count:
///
/// * lines 1–6 are `Bar(0..=5)`, line 7 is `Rom`;
/// * 7 or 11 lines (kernel without SR-IOV support; 11 for bridges): lines 8–11 are
///   `BridgeWindow(0..=3)`;
/// * 13 or 17 lines (kernel with SR-IOV support; 17 for bridges): lines 8–13 are
///   `IovBar(0..=5)` and lines 14–17 `BridgeWindow(0..=3)`;
/// * other counts are not written by any kernel known here. Fewer than 7 lines give just
///   BARs. 8–10, 12 and 14–16 lines follow the SR-IOV layout (every current distribution
///   kernel has it), as far as they go. Lines after the 17th go on numbering bridge windows,
///   `BridgeWindow(4)` and up, so that nothing is dropped and they are recognisable as
///   unknown (real windows are 0–3).
///
/// More than [`RESOURCE_MAX_LINES`] lines, an empty file, a blank line, or a line that is
/// not three hex numbers (prefix optional) is an error; a bad line gives
/// [`ParseErrorKind::Line`].
pub fn resource(bytes: &[u8]) -> Result<Vec<Resource>, ParseError> {
    const ATTR: &str = "resource";
    let text = bytes.trim_ascii();
    if text.is_empty() {
        return Err(ParseError::new(ATTR, ParseErrorKind::Empty, bytes));
    }
    // The kernel's form has 57-byte lines: check that first, without counting newlines.
    if (text.len() + 1).is_multiple_of(57)
        && let Some(out) = resource_kernel_format(text, (text.len() + 1) / 57)
    {
        return Ok(out);
    }
    let count = text.iter().filter(|&&b| b == b'\n').count() + 1;
    if count > RESOURCE_MAX_LINES {
        return Err(ParseError::new(
            ATTR,
            ParseErrorKind::Line {
                line: RESOURCE_MAX_LINES + 1,
                expected: "at most 64 lines",
            },
            bytes,
        ));
    }
    resource_any_format(text, count)
}

// `resource` lines with any whitespace and optional prefixes, each checked.
fn resource_any_format(text: &[u8], count: usize) -> Result<Vec<Resource>, ParseError> {
    const ATTR: &str = "resource";
    let mut out = Vec::with_capacity(count);
    for (index, line) in text.split(|&b| b == b'\n').enumerate() {
        let bad = || {
            ParseError::new(
                ATTR,
                ParseErrorKind::Line {
                    line: index + 1,
                    expected: "three hex numbers: start end flags",
                },
                line,
            )
        };
        let mut rest = line;
        let mut field = || -> Result<u64, ParseError> {
            let word = next_word(&mut rest).ok_or_else(bad)?;
            hex_digits(strip_hex_prefix(word)).map_err(|_| bad())
        };
        let start = field()?;
        let end = field()?;
        let flags = field()?;
        if next_word(&mut rest).is_some() {
            return Err(bad());
        }
        out.push(Resource {
            slot: resource_slot(index, count),
            start,
            end,
            flags,
        });
    }
    Ok(out)
}

// The kernel writes every line as `0x%016llx 0x%016llx 0x%016llx`: 56 bytes and a newline.
// Text in exactly that form is parsed at fixed offsets (the scanner parses one `resource`
// per device, so this is most of its parsing); anything else goes the general way.
fn resource_kernel_format(text: &[u8], count: usize) -> Option<Vec<Resource>> {
    const LINE: usize = 57;
    if text.len() + 1 != count * LINE || count > RESOURCE_MAX_LINES {
        return None;
    }
    let mut out = Vec::with_capacity(count);
    for (index, line) in text.chunks(LINE).enumerate() {
        let number = |at: usize| -> Option<u64> {
            let field = line.get(at..at + 18)?;
            hex_digits(field.strip_prefix(b"0x")?).ok()
        };
        let separators = line[18] == b' ' && line[37] == b' ' && line.get(56).is_none_or(|&b| b == b'\n');
        if !separators {
            return None;
        }
        out.push(Resource {
            slot: resource_slot(index, count),
            start: number(0)?,
            end: number(19)?,
            flags: number(38)?,
        });
    }
    Some(out)
}

// The next run of non-whitespace bytes of `text`, advancing past it.
fn next_word<'a>(text: &mut &'a [u8]) -> Option<&'a [u8]> {
    let start = text.iter().position(|b| !b.is_ascii_whitespace())?;
    let rest = &text[start..];
    let len = rest
        .iter()
        .position(u8::is_ascii_whitespace)
        .unwrap_or(rest.len());
    *text = &rest[len..];
    Some(&rest[..len])
}

/// Writes a `resource` file as the kernel does, one `0x%016llx 0x%016llx 0x%016llx\n` line
/// per resource, in the order given (slots are not written: the kernel's layout implies
/// them from the line count, see [`resource`]).
pub fn format_resource(resources: &[Resource]) -> String {
    let mut out = String::with_capacity(resources.len() * 57);
    for r in resources {
        // Writing to a String cannot fail.
        let _ = writeln!(out, "0x{:016x} 0x{:016x} 0x{:016x}", r.start, r.end, r.flags);
    }
    out
}

// ---------------------------------------------------------------------------------------------
// uevent

/// The largest `uevent` [`uevent`] accepts, in bytes. The kernel's limit is 2048 bytes.
pub const UEVENT_MAX_BYTES: usize = 65536;
/// The most lines [`uevent`] accepts. The kernel's limit is 64 variables.
pub const UEVENT_MAX_LINES: usize = 256;

/// A device's `uevent` file: `KEY=VALUE` lines, in file order.
///
/// ```
/// use pcibus::sysfs::parse::uevent;
/// let u = uevent(b"DRIVER=nvme\nPCI_CLASS=10802\nPCI_ID=144D:A808\n").unwrap();
/// assert_eq!(u.driver(), Some("nvme"));
/// assert_eq!(u.pci_id(), Some((0x144d, 0xa808)));
/// assert_eq!(u.pci_class().unwrap().value(), 0x010802);
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Uevent {
    /// The `(KEY, VALUE)` pairs, in file order.
    pub entries: Vec<(String, String)>,
}

impl Uevent {
    /// The value of the first `key=` line, if any.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.entries
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
    /// `DRIVER`: the bound driver's name.
    pub fn driver(&self) -> Option<&str> {
        self.get("DRIVER")
    }
    /// `PCI_CLASS` (hex without prefix, e.g. `10802`); `None` when absent or malformed.
    pub fn pci_class(&self) -> Option<ClassCode> {
        let v = hex_digits(strip_hex_prefix(self.get("PCI_CLASS")?.as_bytes())).ok()?;
        ClassCode::new(u32::try_from(v).ok()?)
    }
    /// `PCI_ID` (`VVVV:DDDD` in hex): vendor and device; `None` when absent or malformed.
    pub fn pci_id(&self) -> Option<(u16, u16)> {
        id_pair(self.get("PCI_ID")?)
    }
    /// `PCI_SUBSYS_ID` (`VVVV:DDDD` in hex): subsystem vendor and device; `None` when absent
    /// or malformed.
    pub fn pci_subsys_id(&self) -> Option<(u16, u16)> {
        id_pair(self.get("PCI_SUBSYS_ID")?)
    }
    /// `PCI_SLOT_NAME`: the device's address; `None` when absent or malformed.
    pub fn slot_name(&self) -> Option<PciAddress> {
        PciAddress::parse_lenient(self.get("PCI_SLOT_NAME")?).ok()
    }
    /// `MODALIAS`, parsed; `None` when absent or malformed (the raw text is
    /// `get("MODALIAS")`).
    pub fn modalias(&self) -> Option<Modalias> {
        modalias(self.get("MODALIAS")?.as_bytes()).ok()
    }
}

fn id_pair(text: &str) -> Option<(u16, u16)> {
    let (a, b) = text.split_once(':')?;
    let a = hex_digits(a.as_bytes()).ok()?;
    let b = hex_digits(b.as_bytes()).ok()?;
    Some((u16::try_from(a).ok()?, u16::try_from(b).ok()?))
}

/// Parses `uevent`: `KEY=VALUE` lines, split at the first `=`.
///
/// Each line is trimmed of surrounding whitespace; blank lines are skipped; an empty file
/// gives an empty [`Uevent`]. A line without `=`, with an empty key or a key holding
/// whitespace, or that is not UTF-8 is a [`ParseErrorKind::Line`] error. Files larger than
/// [`UEVENT_MAX_BYTES`] or with more than [`UEVENT_MAX_LINES`] lines are rejected.
pub fn uevent(bytes: &[u8]) -> Result<Uevent, ParseError> {
    const ATTR: &str = "uevent";
    if bytes.len() > UEVENT_MAX_BYTES {
        return Err(ParseError::new(
            ATTR,
            ParseErrorKind::Malformed {
                what: "larger than 65536 bytes",
            },
            bytes,
        ));
    }
    let text = bytes.trim_ascii();
    let mut entries = Vec::new();
    if text.is_empty() {
        return Ok(Uevent { entries });
    }
    for (index, line) in text.split(|&b| b == b'\n').enumerate() {
        let line_no = index + 1;
        if line_no > UEVENT_MAX_LINES {
            return Err(ParseError::new(
                ATTR,
                ParseErrorKind::Line {
                    line: line_no,
                    expected: "at most 256 lines",
                },
                bytes,
            ));
        }
        let line = line.trim_ascii();
        if line.is_empty() {
            continue;
        }
        let err = |expected| {
            ParseError::new(
                ATTR,
                ParseErrorKind::Line {
                    line: line_no,
                    expected,
                },
                line,
            )
        };
        let line = std::str::from_utf8(line).map_err(|_| err("UTF-8 text"))?;
        let (key, value) = line.split_once('=').ok_or_else(|| err("KEY=VALUE"))?;
        if key.is_empty() || key.bytes().any(|b| b.is_ascii_whitespace()) {
            return Err(err("a key without whitespace before '='"));
        }
        entries.push((key.to_owned(), value.to_owned()));
    }
    Ok(Uevent { entries })
}

/// Writes a `uevent` file: one `KEY=VALUE\n` line per entry.
pub fn format_uevent(uevent: &Uevent) -> String {
    let mut out = String::new();
    for (k, v) in &uevent.entries {
        let _ = writeln!(out, "{k}={v}");
    }
    out
}

// ---------------------------------------------------------------------------------------------
// modalias

/// A PCI device's `modalias`: the ids and class that module aliases are matched against.
///
/// In sysfs every field is concrete (module aliases use `*` wildcards, sysfs never does).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Modalias {
    /// `v`: vendor id.
    pub vendor: VendorId,
    /// `d`: device id.
    pub device: DeviceId,
    /// `sv`: subsystem vendor id.
    pub subsystem_vendor: VendorId,
    /// `sd`: subsystem device id.
    pub subsystem_device: DeviceId,
    /// `bc`, `sc`, `i`: base class, subclass, programming interface.
    pub class: ClassCode,
}

const MODALIAS_FORM: &str = "pci:vXXXXXXXXdXXXXXXXXsvXXXXXXXXsdXXXXXXXXbcXXscXXiXX";

/// Parses `modalias`: `pci:v00008086d00001533sv000015D9sd00001533bc02sc00i00\n`.
///
/// Ids have exactly 8 hex digits and must fit 16 bits, class parts exactly 2; hex digits of
/// either case are accepted (the kernel writes upper case).
pub fn modalias(bytes: &[u8]) -> Result<Modalias, ParseError> {
    const ATTR: &str = "modalias";
    let text = bytes.trim_ascii();
    if text.is_empty() {
        return Err(ParseError::new(ATTR, ParseErrorKind::Empty, bytes));
    }
    let invalid = || {
        ParseError::new(
            ATTR,
            ParseErrorKind::Invalid {
                expected: MODALIAS_FORM,
            },
            bytes,
        )
    };
    let mut rest = text.strip_prefix(b"pci:").ok_or_else(invalid)?;
    // Takes `tag` followed by exactly `digits` hex digits.
    let mut field = |tag: &[u8], digits: usize| -> Result<u64, ParseError> {
        let after = rest.strip_prefix(tag).ok_or_else(invalid)?;
        let (number, tail) = after.split_at_checked(digits).ok_or_else(invalid)?;
        rest = tail;
        hex_digits(number).map_err(|_| invalid())
    };
    let id = |v: u64| {
        u16::try_from(v).map_err(|_| ParseError::new(ATTR, ParseErrorKind::OutOfRange { max: 0xffff }, bytes))
    };
    let vendor = id(field(b"v", 8)?)?;
    let device = id(field(b"d", 8)?)?;
    let subsystem_vendor = id(field(b"sv", 8)?)?;
    let subsystem_device = id(field(b"sd", 8)?)?;
    // Two hex digits always fit a byte.
    let base = field(b"bc", 2)? as u8;
    let sub = field(b"sc", 2)? as u8;
    let prog_if = field(b"i", 2)? as u8;
    if !rest.is_empty() {
        return Err(invalid());
    }
    Ok(Modalias {
        vendor: VendorId(vendor),
        device: DeviceId(device),
        subsystem_vendor: VendorId(subsystem_vendor),
        subsystem_device: DeviceId(subsystem_device),
        class: ClassCode::from_parts(base, sub, prog_if),
    })
}

/// Writes `modalias` as the kernel does (upper-case hex), with the trailing newline.
pub fn format_modalias(m: &Modalias) -> String {
    format!(
        "pci:v{:08X}d{:08X}sv{:08X}sd{:08X}bc{:02X}sc{:02X}i{:02X}\n",
        m.vendor.0,
        m.device.0,
        m.subsystem_vendor.0,
        m.subsystem_device.0,
        m.class.base(),
        m.class.sub(),
        m.class.prog_if()
    )
}

// ---------------------------------------------------------------------------------------------
// link speed and width

/// The fastest link speed [`link_speed`] accepts, in MT/s (PCIe 7.0 is 128 GT/s).
pub const LINK_SPEED_MAX: u32 = 1_000_000;

/// Parses `current_link_speed` or `max_link_speed`.
///
/// Accepts what kernels write: `"8.0 GT/s PCIe\n"`, `"2.5 GT/s PCIe"`, `"64.0 GT/s PCIe"`,
/// and from older kernels `"5 GT/s"`, `"2.5 GT/s"`; `"Unknown"` and `"Unknown speed"` give
/// `None`. The number may have up to three decimals; zero and speeds above
/// [`LINK_SPEED_MAX`] MT/s are errors. Errors name the attribute `link_speed`; set
/// [`ParseError::attribute`] to say which file it was.
pub fn link_speed(bytes: &[u8]) -> Result<Option<LinkSpeed>, ParseError> {
    const ATTR: &str = "link_speed";
    let text = bytes.trim_ascii();
    if text.is_empty() {
        return Err(ParseError::new(ATTR, ParseErrorKind::Empty, bytes));
    }
    if text == b"Unknown" || text == b"Unknown speed" {
        return Ok(None);
    }
    let invalid = || {
        ParseError::new(
            ATTR,
            ParseErrorKind::Invalid {
                expected: "a speed such as \"8.0 GT/s PCIe\" or \"Unknown\"",
            },
            bytes,
        )
    };
    let number = text
        .strip_suffix(b" PCIe")
        .unwrap_or(text)
        .strip_suffix(b"GT/s")
        .ok_or_else(invalid)?
        .trim_ascii_end();
    let (whole, frac) = match number.iter().position(|&b| b == b'.') {
        Some(dot) => (&number[..dot], number.get(dot + 1..).unwrap_or_default()),
        None => (number, &b""[..]),
    };
    if frac.len() > 3 || (number.contains(&b'.') && frac.is_empty()) {
        return Err(invalid());
    }
    let whole = match dec_digits(whole) {
        Ok(v) => Some(v),
        Err(NumError::Overflow) => None,
        Err(NumError::Invalid) => return Err(invalid()),
    };
    let mut frac_value = 0;
    if !frac.is_empty() {
        // At most three digits: below 1000, no overflow.
        frac_value = dec_digits(frac).map_err(|_| invalid())?;
        for _ in frac.len()..3 {
            frac_value *= 10;
        }
    }
    let mts = whole
        .and_then(|w| w.checked_mul(1000))
        .and_then(|w| w.checked_add(frac_value));
    match mts {
        Some(0) => Err(invalid()),
        Some(v) if v <= u64::from(LINK_SPEED_MAX) => Ok(Some(LinkSpeed(v as u32))),
        _ => Err(ParseError::new(
            ATTR,
            ParseErrorKind::OutOfRange {
                max: u64::from(LINK_SPEED_MAX / 1000),
            },
            bytes,
        )),
    }
}

/// Writes a link speed as current kernels do: `"8.0 GT/s PCIe\n"`, or `"Unknown\n"`.
pub fn format_link_speed(speed: Option<LinkSpeed>) -> String {
    match speed {
        Some(s) => format!("{s} PCIe\n"),
        None => "Unknown\n".to_owned(),
    }
}

/// The widest link [`link_width`] accepts: PCIe defines x1 to x32.
pub const LINK_WIDTH_MAX: u8 = 32;

/// Parses `current_link_width` or `max_link_width`: `"4\n"` (also `"x4"`); `0` (no link
/// trained, or a function without a link) is `None`.
///
/// The kernel prints the raw 6-bit register field, which could reach 63; PCIe defines no
/// width above 32, and a dead device reads all ones, so widths above [`LINK_WIDTH_MAX`] are
/// [`ParseErrorKind::OutOfRange`]. Widths that are not powers of two (x12) are accepted.
pub fn link_width(bytes: &[u8]) -> Result<Option<u8>, ParseError> {
    const ATTR: &str = "link_width";
    let text = bytes.trim_ascii();
    let digits = match text {
        [b'x' | b'X', rest @ ..] => rest,
        _ => text,
    };
    if text.is_empty() {
        return Err(ParseError::new(ATTR, ParseErrorKind::Empty, bytes));
    }
    match dec_digits(digits) {
        Ok(0) => Ok(None),
        Ok(w) if w <= u64::from(LINK_WIDTH_MAX) => Ok(Some(w as u8)),
        Ok(_) | Err(NumError::Overflow) => Err(ParseError::new(
            ATTR,
            ParseErrorKind::OutOfRange {
                max: u64::from(LINK_WIDTH_MAX),
            },
            bytes,
        )),
        Err(NumError::Invalid) => Err(ParseError::new(
            ATTR,
            ParseErrorKind::Invalid {
                expected: "a lane count such as 4 or x4",
            },
            bytes,
        )),
    }
}

/// Writes a link width as the kernel does: `"4\n"`, `"0\n"` for `None`.
pub fn format_link_width(width: Option<u8>) -> String {
    format!("{}\n", width.unwrap_or(0))
}

// ---------------------------------------------------------------------------------------------
// cpu lists

/// CPUs [`cpu_list`] accepts are below this (the kernel's `NR_CPUS` is at most 8192).
pub const CPU_LIMIT: u32 = 65536;

/// Parses a CPU list such as `local_cpulist`: `"0-3,8,10-11\n"`; an empty file is an empty
/// list.
///
/// The result is sorted and without duplicates. Reversed ranges (`3-0`), empty items, and
/// CPUs at or above [`CPU_LIMIT`] are errors, so the result never has more than
/// `CPU_LIMIT` entries. Spaces around items are tolerated.
pub fn cpu_list(bytes: &[u8]) -> Result<Vec<u32>, ParseError> {
    const ATTR: &str = "local_cpulist";
    let text = bytes.trim_ascii();
    if text.is_empty() {
        return Ok(Vec::new());
    }
    let err = |kind| ParseError::new(ATTR, kind, bytes);
    let invalid = || {
        err(ParseErrorKind::Invalid {
            expected: "a CPU list such as 0-3,8,10-11",
        })
    };
    let cpu = |digits: &[u8]| match dec_digits(digits.trim_ascii()) {
        Ok(v) if v < u64::from(CPU_LIMIT) => Ok(v as u32),
        Ok(_) | Err(NumError::Overflow) => Err(err(ParseErrorKind::OutOfRange {
            max: u64::from(CPU_LIMIT - 1),
        })),
        Err(NumError::Invalid) => Err(invalid()),
    };
    // Ranges are collected and merged before being expanded, so that many overlapping
    // ranges cost no more than one.
    let mut ranges = Vec::new();
    for item in text.split(|&b| b == b',') {
        let range = match item.iter().position(|&b| b == b'-') {
            Some(dash) => {
                let lo = cpu(&item[..dash])?;
                let hi = cpu(item.get(dash + 1..).unwrap_or_default())?;
                if hi < lo {
                    return Err(err(ParseErrorKind::Malformed {
                        what: "reversed CPU range",
                    }));
                }
                (lo, hi)
            }
            None => {
                let c = cpu(item)?;
                (c, c)
            }
        };
        ranges.push(range);
    }
    ranges.sort_unstable();
    let mut out = Vec::new();
    for (lo, hi) in ranges {
        let from = match out.last() {
            Some(&last) if last >= hi => continue,
            Some(&last) if last >= lo => last + 1,
            _ => lo,
        };
        out.extend(from..=hi);
    }
    Ok(out)
}

/// Writes a CPU list as the kernel does (`"0-3,8,10-11\n"`; `"\n"` for none). The input need
/// not be sorted; duplicates are dropped.
pub fn format_cpu_list(cpus: &[u32]) -> String {
    let mut sorted = cpus.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut out = String::new();
    let mut i = 0;
    while let Some(&lo) = sorted.get(i) {
        let mut hi = lo;
        while hi
            .checked_add(1)
            .is_some_and(|next| sorted.get(i + 1) == Some(&next))
        {
            hi += 1;
            i += 1;
        }
        i += 1;
        if !out.is_empty() {
            out.push(',');
        }
        if hi == lo {
            let _ = write!(out, "{lo}");
        } else {
            let _ = write!(out, "{lo}-{hi}");
        }
    }
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::flags;
    use proptest::prelude::*;

    fn kind<T: std::fmt::Debug>(r: Result<T, ParseError>) -> ParseErrorKind {
        r.unwrap_err().kind
    }

    // --- ids, class, revision -----------------------------------------------------------

    #[test]
    fn hex_ids_from_the_kernel() {
        assert_eq!(hex_u16("vendor", b"0x8086\n").unwrap(), 0x8086);
        assert_eq!(hex_u16("device", b"0x1533\n").unwrap(), 0x1533);
        assert_eq!(hex_u16("subsystem_vendor", b"0x15d9\n").unwrap(), 0x15d9);
        assert_eq!(hex_u16("vendor", b"0XFFFF").unwrap(), 0xffff);
        assert_eq!(hex_u16("vendor", b"  0x0000  \n").unwrap(), 0);
        // Without prefix: accepted.
        assert_eq!(hex_u16("vendor", b"10de\n").unwrap(), 0x10de);
        assert_eq!(hex_u16("vendor", b"0x00008086").unwrap(), 0x8086);
    }

    #[test]
    fn hex_id_errors() {
        assert_eq!(kind(hex_u16("vendor", b"\n")), ParseErrorKind::Empty);
        assert_eq!(
            kind(hex_u16("vendor", b"0x18086\n")),
            ParseErrorKind::OutOfRange { max: 0xffff }
        );
        assert_eq!(
            kind(hex_u16("vendor", b"0xffffffffffffffffffff")),
            ParseErrorKind::OutOfRange { max: 0xffff }
        );
        for bad in [
            &b"0x"[..],
            b"0x-1",
            b"+0x1",
            b"-1",
            b"0x80 86",
            b"0xg",
            b"x1",
            b"0x\xff",
        ] {
            assert!(
                matches!(kind(hex_u16("vendor", bad)), ParseErrorKind::Invalid { .. }),
                "{bad:?}"
            );
        }
        let e = hex_u16("subsystem_device", b"zz\n").unwrap_err();
        assert_eq!(e.attribute, "subsystem_device");
        assert_eq!(
            e.to_string(),
            "subsystem_device: expected a hex number such as 0x1f in \"zz\\n\""
        );
    }

    #[test]
    fn class_and_revision() {
        let c = class(b"0x010802\n").unwrap();
        assert_eq!((c.base(), c.sub(), c.prog_if()), (1, 8, 2));
        assert_eq!(class(b"0x020000\n").unwrap().value(), 0x020000);
        assert_eq!(class(b"0x060400").unwrap().value(), 0x060400);
        assert_eq!(
            kind(class(b"0x1010802\n")),
            ParseErrorKind::OutOfRange { max: 0xffffff }
        );
        assert_eq!(kind(class(b"")), ParseErrorKind::Empty);
        assert_eq!(revision(b"0x02\n").unwrap(), 2);
        assert_eq!(revision(b"0xff\n").unwrap(), 0xff);
        assert_eq!(
            kind(revision(b"0x100\n")),
            ParseErrorKind::OutOfRange { max: 0xff }
        );
        assert_eq!(format_class(c), "0x010802\n");
        assert_eq!(format_revision(2), "0x02\n");
        assert_eq!(format_hex_u16(0x8086), "0x8086\n");
    }

    // --- decimal --------------------------------------------------------------------------

    #[test]
    fn decimals() {
        assert_eq!(decimal_u16("sriov_totalvfs", b"64\n").unwrap(), 64);
        assert_eq!(decimal_u16("sriov_numvfs", b"0\n").unwrap(), 0);
        assert_eq!(decimal_u16("sriov_offset", b"128\n").unwrap(), 128);
        assert_eq!(decimal_u32("irq", b"16\n").unwrap(), 16);
        assert_eq!(decimal_u32("iommu_group", b"4294967295").unwrap(), u32::MAX);
        assert_eq!(
            kind(decimal_u32("irq", b"4294967296")),
            ParseErrorKind::OutOfRange { max: 0xffff_ffff }
        );
        assert_eq!(
            kind(decimal_u16("sriov_stride", b"65536\n")),
            ParseErrorKind::OutOfRange { max: 0xffff }
        );
        assert_eq!(kind(decimal_u16("x", b" \n")), ParseErrorKind::Empty);
        for bad in [&b"-1"[..], b"+1", b"0x10", b"1 2", b"1.0"] {
            assert!(matches!(
                kind(decimal_u32("irq", bad)),
                ParseErrorKind::Invalid { .. }
            ));
        }
    }

    #[test]
    fn numa_nodes() {
        assert_eq!(numa_node(b"-1\n").unwrap(), None);
        assert_eq!(numa_node(b"0\n").unwrap(), Some(0));
        assert_eq!(numa_node(b"3\n").unwrap(), Some(3));
        assert!(numa_node(b"-2\n").is_err());
        assert!(numa_node(b"-0\n").is_err());
        assert!(numa_node(b"-\n").is_err());
        assert_eq!(kind(numa_node(b"")), ParseErrorKind::Empty);
        assert_eq!(format_numa_node(None), "-1\n");
        assert_eq!(format_numa_node(Some(1)), "1\n");
    }

    // --- resource -------------------------------------------------------------------------

    /// An Intel NIC on a kernel with SR-IOV support: 13 lines.
    const RESOURCE_I350: &str = "\
0x00000000c7a00000 0x00000000c7afffff 0x0000000000040200
0x0000000000000000 0x0000000000000000 0x0000000000000000
0x000000000000e020 0x000000000000e03f 0x0000000000040101
0x00000000c7b04000 0x00000000c7b07fff 0x0000000000040200
0x0000000000000000 0x0000000000000000 0x0000000000000000
0x0000000000000000 0x0000000000000000 0x0000000000000000
0x00000000c7b80000 0x00000000c7bfffff 0x0000000000046200
0x00000000c7800000 0x00000000c781ffff 0x000000000014220c
0x0000000000000000 0x0000000000000000 0x0000000000000000
0x0000000000000000 0x0000000000000000 0x0000000000000000
0x00000000c7820000 0x00000000c783ffff 0x000000000014220c
0x0000000000000000 0x0000000000000000 0x0000000000000000
0x0000000000000000 0x0000000000000000 0x0000000000000000
";

    #[test]
    fn resource_of_an_sriov_nic() {
        let r = resource(RESOURCE_I350.as_bytes()).unwrap();
        assert_eq!(r.len(), 13);
        assert_eq!(r[0].slot, ResourceSlot::Bar(0));
        assert_eq!(
            (r[0].start, r[0].end, r[0].size()),
            (0xc7a00000, 0xc7afffff, 0x100000)
        );
        assert_eq!(r[0].kind(), Some(crate::BarKind::Mem32));
        assert!(!r[1].is_present());
        assert_eq!(r[2].kind(), Some(crate::BarKind::Io));
        assert_eq!(r[6].slot, ResourceSlot::Rom);
        assert_ne!(r[6].flags & flags::READONLY, 0);
        assert_eq!(r[7].slot, ResourceSlot::IovBar(0));
        assert_eq!(r[7].kind(), Some(crate::BarKind::Mem64));
        assert_eq!(r[12].slot, ResourceSlot::IovBar(5));
        assert_eq!(format_resource(&r), RESOURCE_I350);
    }

    #[test]
    fn resource_layouts_by_line_count() {
        let line = "0x0000000000001000 0x0000000000001fff 0x0000000000000200\n";
        let slots = |n: usize| -> Vec<ResourceSlot> {
            resource(line.repeat(n).as_bytes())
                .unwrap()
                .iter()
                .map(|r| r.slot)
                .collect()
        };
        use ResourceSlot::*;
        let bars = [Bar(0), Bar(1), Bar(2), Bar(3), Bar(4), Bar(5)];
        let iov = [IovBar(0), IovBar(1), IovBar(2), IovBar(3), IovBar(4), IovBar(5)];
        let win = [BridgeWindow(0), BridgeWindow(1), BridgeWindow(2), BridgeWindow(3)];
        assert_eq!(slots(3), bars[..3]);
        assert_eq!(slots(7), [&bars[..], &[Rom]].concat());
        assert_eq!(slots(11), [&bars[..], &[Rom], &win[..]].concat());
        assert_eq!(slots(13), [&bars[..], &[Rom], &iov[..]].concat());
        assert_eq!(slots(17), [&bars[..], &[Rom], &iov[..], &win[..]].concat());
        assert_eq!(slots(9), [&bars[..], &[Rom], &iov[..2]].concat());
        assert_eq!(slots(15), [&bars[..], &[Rom], &iov[..], &win[..2]].concat());
        let s = slots(19);
        assert_eq!(&s[17..], [BridgeWindow(4), BridgeWindow(5)]);
        assert_eq!(slots(64).len(), 64);
    }

    #[test]
    fn resource_errors() {
        assert_eq!(kind(resource(b"\n")), ParseErrorKind::Empty);
        let line = "0x0 0x0 0x0\n";
        assert_eq!(
            kind(resource(line.repeat(10_000).as_bytes())),
            ParseErrorKind::Line {
                line: 65,
                expected: "at most 64 lines"
            }
        );
        let e = resource(b"0x0 0x0 0x0\n0x1 0x2\n").unwrap_err();
        assert!(matches!(e.kind, ParseErrorKind::Line { line: 2, .. }));
        assert_eq!(e.text, "0x1 0x2");
        for bad in [
            &b"0x0 0x0 0x0 0x0"[..],
            b"0x0 0x0 zz",
            b"0x0 0x0 0x10000000000000000",
            b"0x0 0x0 0x0\n\n0x0 0x0 0x0",
            b"0x0,0x0,0x0",
        ] {
            assert!(
                matches!(kind(resource(bad)), ParseErrorKind::Line { .. }),
                "{bad:?}"
            );
        }
        // Tabs and no prefix are fine.
        assert_eq!(resource(b"1000\t1fff  200\n").unwrap()[0].end, 0x1fff);
    }

    // --- uevent ---------------------------------------------------------------------------

    const UEVENT_NVME: &[u8] = b"DRIVER=nvme
PCI_CLASS=10802
PCI_ID=144D:A808
PCI_SUBSYS_ID=144D:A801
PCI_SLOT_NAME=0000:01:00.0
MODALIAS=pci:v0000144Dd0000A808sv0000144Dsd0000A801bc01sc08i02
";

    #[test]
    fn uevent_of_an_nvme_drive() {
        let u = uevent(UEVENT_NVME).unwrap();
        assert_eq!(u.entries.len(), 6);
        assert_eq!(u.driver(), Some("nvme"));
        assert_eq!(u.pci_class(), ClassCode::new(0x010802));
        assert_eq!(u.pci_id(), Some((0x144d, 0xa808)));
        assert_eq!(u.pci_subsys_id(), Some((0x144d, 0xa801)));
        assert_eq!(u.slot_name(), PciAddress::new(0, 1, 0, 0));
        let m = u.modalias().unwrap();
        assert_eq!(m.device, DeviceId(0xa808));
        assert_eq!(m.class, u.pci_class().unwrap());
        assert_eq!(u.get("NOPE"), None);
        assert_eq!(format_uevent(&u).as_bytes(), UEVENT_NVME);
    }

    #[test]
    fn uevent_edge_cases() {
        assert_eq!(uevent(b"").unwrap(), Uevent::default());
        assert_eq!(uevent(b"\n\n").unwrap(), Uevent::default());
        // No driver bound: no DRIVER line.
        let u = uevent(b"PCI_CLASS=60400\nPCI_ID=8086:A110\nX=a=b\nEMPTY=\n").unwrap();
        assert_eq!(u.driver(), None);
        assert_eq!(u.get("X"), Some("a=b"));
        assert_eq!(u.get("EMPTY"), Some(""));
        // Malformed typed values are None, not errors.
        let u = uevent(b"PCI_ID=8086\nPCI_CLASS=1000000\nPCI_SLOT_NAME=zz\n").unwrap();
        assert_eq!((u.pci_id(), u.pci_class(), u.slot_name()), (None, None, None));
        let e = uevent(b"DRIVER=nvme\nnonsense\n").unwrap_err();
        assert_eq!(
            e.kind,
            ParseErrorKind::Line {
                line: 2,
                expected: "KEY=VALUE"
            }
        );
        assert!(matches!(
            kind(uevent(b"=x")),
            ParseErrorKind::Line { line: 1, .. }
        ));
        assert!(matches!(
            kind(uevent(b"A B=x")),
            ParseErrorKind::Line { line: 1, .. }
        ));
        assert!(matches!(
            kind(uevent(b"A=\xff")),
            ParseErrorKind::Line { line: 1, .. }
        ));
        assert!(matches!(
            kind(uevent("A=1\n".repeat(300).as_bytes())),
            ParseErrorKind::Line { line: 257, .. }
        ));
        assert!(matches!(
            kind(uevent(&vec![b'a'; 70_000])),
            ParseErrorKind::Malformed { .. }
        ));
    }

    // --- modalias -------------------------------------------------------------------------

    #[test]
    fn modalias_of_an_intel_nic() {
        let text = "pci:v00008086d00001533sv000015D9sd00001533bc02sc00i00\n";
        let m = modalias(text.as_bytes()).unwrap();
        assert_eq!(
            m,
            Modalias {
                vendor: VendorId(0x8086),
                device: DeviceId(0x1533),
                subsystem_vendor: VendorId(0x15d9),
                subsystem_device: DeviceId(0x1533),
                class: ClassCode::new(0x020000).unwrap(),
            }
        );
        assert_eq!(format_modalias(&m), text);
        assert_eq!(
            modalias(text.to_lowercase().as_bytes()).unwrap(),
            m,
            "lower case is accepted"
        );
    }

    #[test]
    fn modalias_errors() {
        assert_eq!(kind(modalias(b"\n")), ParseErrorKind::Empty);
        assert_eq!(
            kind(modalias(b"pci:v00018086d00001533sv000015D9sd00001533bc02sc00i00")),
            ParseErrorKind::OutOfRange { max: 0xffff }
        );
        for bad in [
            &b"pci:v*d*sv*sd*bc*sc*i*"[..],
            b"usb:v00008086d00001533sv000015D9sd00001533bc02sc00i00",
            b"pci:v00008086d00001533sv000015D9sd00001533bc02sc00i00x",
            b"pci:v00008086d00001533sv000015D9sd00001533bc02sc00i0",
            b"pci:v00008086d00001533sv000015D9sd00001533bc02sc00",
            b"pci:v0000+086d00001533sv000015D9sd00001533bc02sc00i00",
            b"pci:",
        ] {
            assert!(
                matches!(kind(modalias(bad)), ParseErrorKind::Invalid { .. }),
                "{bad:?}"
            );
        }
        // Short ids swallow the next tag's letter ('d' is a hex digit) and fail somewhere.
        assert!(modalias(b"pci:v8086d1533sv15D9sd1533bc02sc00i00").is_err());
    }

    // --- link -----------------------------------------------------------------------------

    #[test]
    fn link_speeds_of_all_kernels() {
        for (text, mts) in [
            ("2.5 GT/s PCIe\n", 2500),
            ("5.0 GT/s PCIe\n", 5000),
            ("8.0 GT/s PCIe\n", 8000),
            ("16.0 GT/s PCIe\n", 16000),
            ("32.0 GT/s PCIe\n", 32000),
            ("64.0 GT/s PCIe\n", 64000),
            ("2.5 GT/s\n", 2500),
            ("5 GT/s\n", 5000),
            ("8 GT/s\n", 8000),
            ("16 GT/s", 16000),
            ("8GT/s", 8000),
            ("2.25 GT/s", 2250),
        ] {
            assert_eq!(
                link_speed(text.as_bytes()).unwrap(),
                Some(LinkSpeed(mts)),
                "{text}"
            );
        }
        assert_eq!(link_speed(b"Unknown\n").unwrap(), None);
        assert_eq!(link_speed(b"Unknown speed\n").unwrap(), None);
        assert_eq!(kind(link_speed(b"\n")), ParseErrorKind::Empty);
        for bad in [
            &b"0 GT/s"[..],
            b"8.0",
            b"8.0 Gb/s",
            b"8. GT/s",
            b".5 GT/s",
            b"2.5000 GT/s",
            b"-8 GT/s",
            b"unknown",
            b"8.0 GT/s PCIe PCIe",
        ] {
            assert!(
                matches!(kind(link_speed(bad)), ParseErrorKind::Invalid { .. }),
                "{bad:?}"
            );
        }
        assert!(matches!(
            kind(link_speed(b"99999999999999999999 GT/s")),
            ParseErrorKind::OutOfRange { .. }
        ));
        assert!(matches!(
            kind(link_speed(b"1001 GT/s")),
            ParseErrorKind::OutOfRange { .. }
        ));
        assert_eq!(format_link_speed(Some(LinkSpeed(16000))), "16.0 GT/s PCIe\n");
        assert_eq!(format_link_speed(None), "Unknown\n");
    }

    #[test]
    fn link_widths() {
        assert_eq!(link_width(b"4\n").unwrap(), Some(4));
        assert_eq!(link_width(b"x16\n").unwrap(), Some(16));
        assert_eq!(link_width(b"X8").unwrap(), Some(8));
        assert_eq!(link_width(b"12").unwrap(), Some(12));
        assert_eq!(link_width(b"32").unwrap(), Some(32));
        assert_eq!(link_width(b"0\n").unwrap(), None);
        assert_eq!(kind(link_width(b"63\n")), ParseErrorKind::OutOfRange { max: 32 });
        assert_eq!(kind(link_width(b"")), ParseErrorKind::Empty);
        assert!(matches!(kind(link_width(b"x")), ParseErrorKind::Invalid { .. }));
        assert!(matches!(
            kind(link_width(b"four")),
            ParseErrorKind::Invalid { .. }
        ));
        assert_eq!(format_link_width(Some(4)), "4\n");
        assert_eq!(format_link_width(None), "0\n");
    }

    // --- cpu lists ------------------------------------------------------------------------

    #[test]
    fn cpu_lists() {
        assert_eq!(cpu_list(b"0-3,8,10-11\n").unwrap(), [0, 1, 2, 3, 8, 10, 11]);
        assert_eq!(cpu_list(b"\n").unwrap(), Vec::<u32>::new());
        assert_eq!(cpu_list(b"5").unwrap(), [5]);
        assert_eq!(cpu_list(b"8,0-3,2-5,3").unwrap(), [0, 1, 2, 3, 4, 5, 8]);
        assert_eq!(cpu_list(b"0-1, 4").unwrap(), [0, 1, 4]);
        assert_eq!(cpu_list(b"65535").unwrap(), [65535]);
        assert_eq!(cpu_list(b"0-65535").unwrap().len(), 65536);
        assert_eq!(
            kind(cpu_list(b"3-0")),
            ParseErrorKind::Malformed {
                what: "reversed CPU range"
            }
        );
        assert_eq!(
            kind(cpu_list(b"0-4294967295")),
            ParseErrorKind::OutOfRange { max: 65535 }
        );
        assert_eq!(
            kind(cpu_list(b"65536")),
            ParseErrorKind::OutOfRange { max: 65535 }
        );
        for bad in [&b"1,,2"[..], b"1,", b"-1", b"1-", b"1-2-3", b"0-7:2", b"a"] {
            assert!(
                matches!(kind(cpu_list(bad)), ParseErrorKind::Invalid { .. }),
                "{bad:?}"
            );
        }
        assert_eq!(format_cpu_list(&[11, 0, 1, 2, 3, 8, 10, 3]), "0-3,8,10-11\n");
        assert_eq!(format_cpu_list(&[]), "\n");
        assert_eq!(
            format_cpu_list(&[u32::MAX - 1, u32::MAX]),
            "4294967294-4294967295\n"
        );
    }

    // --- properties -----------------------------------------------------------------------

    fn any_resources() -> impl Strategy<Value = Vec<Resource>> {
        prop::collection::vec((any::<u64>(), any::<u64>(), any::<u64>()), 1..=RESOURCE_MAX_LINES).prop_map(
            |v| {
                let n = v.len();
                v.into_iter()
                    .enumerate()
                    .map(|(i, (start, end, flags))| Resource {
                        slot: resource_slot(i, n),
                        start,
                        end,
                        flags,
                    })
                    .collect()
            },
        )
    }

    proptest! {
        #[test]
        fn never_panics(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
            let _ = hex_u16("vendor", &bytes);
            let _ = class(&bytes);
            let _ = revision(&bytes);
            let _ = resource(&bytes);
            let _ = decimal_u32("irq", &bytes);
            let _ = decimal_u16("sriov_numvfs", &bytes);
            let _ = numa_node(&bytes);
            if let Ok(u) = uevent(&bytes) {
                let _ = (u.driver(), u.pci_class(), u.pci_id(), u.pci_subsys_id(), u.slot_name(), u.modalias());
            }
            let _ = modalias(&bytes);
            let _ = link_speed(&bytes);
            let _ = link_width(&bytes);
            let _ = cpu_list(&bytes);
        }

        #[test]
        fn never_panics_on_near_miss_text(s in "[ 0-9a-fA-FxXgtGT/sPCIe.:,=\\-\n]{0,80}") {
            let b = s.as_bytes();
            let _ = (hex_u16("vendor", b), class(b), revision(b), resource(b), numa_node(b));
            let _ = (uevent(b), modalias(b), link_speed(b), link_width(b), cpu_list(b));
        }

        #[test]
        fn hex_round_trips(v in any::<u16>(), c in 0u32..=0xff_ffff, r in any::<u8>()) {
            prop_assert_eq!(hex_u16("vendor", format_hex_u16(v).as_bytes()).unwrap(), v);
            let cc = ClassCode::new(c).unwrap();
            prop_assert_eq!(class(format_class(cc).as_bytes()).unwrap(), cc);
            prop_assert_eq!(revision(format_revision(r).as_bytes()).unwrap(), r);
            prop_assert_eq!(hex_u16("vendor", format!("{v:x}").as_bytes()).unwrap(), v);
        }

        #[test]
        fn decimal_round_trips(v in any::<u32>(), node in proptest::option::of(any::<u32>())) {
            prop_assert_eq!(decimal_u32("irq", format_decimal(v).as_bytes()).unwrap(), v);
            let small = (v & 0xffff) as u16;
            prop_assert_eq!(decimal_u16("x", format_decimal(small.into()).as_bytes()).unwrap(), small);
            prop_assert_eq!(numa_node(format_numa_node(node).as_bytes()).unwrap(), node);
        }

        #[test]
        fn resource_fast_path_agrees_with_the_general_parser(
            r in any_resources(),
            flip in any::<prop::sample::Index>(),
            byte in any::<u8>(),
        ) {
            // The kernel's form, and the same with one byte changed anywhere.
            let text = format_resource(&r).into_bytes();
            let mut changed = text.clone();
            if !changed.is_empty() {
                let i = flip.index(changed.len());
                changed[i] = byte;
            }
            for t in [text, changed] {
                let t = t.trim_ascii();
                if t.is_empty() {
                    continue;
                }
                let count = t.iter().filter(|&&b| b == b'\n').count() + 1;
                if let Some(fast) = resource_kernel_format(t, count) {
                    prop_assert_eq!(Ok(fast), resource_any_format(t, count));
                }
            }
        }

        #[test]
        fn resource_round_trips(r in any_resources()) {
            prop_assert_eq!(resource(format_resource(&r).as_bytes()).unwrap(), r);
        }

        #[test]
        fn uevent_round_trips(entries in prop::collection::vec(("[A-Z_][A-Z0-9_]{0,15}", "([!-~]([ -~]{0,20}[!-~])?)?"), 0..20)) {
            let u = Uevent { entries };
            prop_assert_eq!(uevent(format_uevent(&u).as_bytes()).unwrap(), u);
        }

        #[test]
        fn modalias_round_trips(ids in any::<[u16; 4]>(), c in 0u32..=0xff_ffff) {
            let m = Modalias {
                vendor: VendorId(ids[0]),
                device: DeviceId(ids[1]),
                subsystem_vendor: VendorId(ids[2]),
                subsystem_device: DeviceId(ids[3]),
                class: ClassCode::new(c).unwrap(),
            };
            prop_assert_eq!(modalias(format_modalias(&m).as_bytes()).unwrap(), m);
        }

        #[test]
        fn link_round_trips(tenths in 1u32..=10_000, width in 0u8..=LINK_WIDTH_MAX) {
            let speed = LinkSpeed(tenths * 100);
            prop_assert_eq!(link_speed(format_link_speed(Some(speed)).as_bytes()).unwrap(), Some(speed));
            prop_assert_eq!(link_speed(speed.to_string().as_bytes()).unwrap(), Some(speed));
            let w = if width == 0 { None } else { Some(width) };
            prop_assert_eq!(link_width(format_link_width(w).as_bytes()).unwrap(), w);
        }

        #[test]
        fn cpu_list_round_trips(cpus in prop::collection::vec(0u32..CPU_LIMIT, 0..200)) {
            let mut expected = cpus.clone();
            expected.sort_unstable();
            expected.dedup();
            prop_assert_eq!(cpu_list(format_cpu_list(&cpus).as_bytes()).unwrap(), expected);
        }

        #[test]
        fn cpu_list_is_sorted_unique_bounded(s in "[0-9]{1,6}(-[0-9]{1,6})?(,[0-9]{1,6}(-[0-9]{1,6})?){0,20}") {
            if let Ok(v) = cpu_list(s.as_bytes()) {
                prop_assert!(v.windows(2).all(|w| w[0] < w[1]));
                prop_assert!(v.iter().all(|&c| c < CPU_LIMIT));
                prop_assert_eq!(cpu_list(format_cpu_list(&v).as_bytes()).unwrap(), v);
            }
        }
    }
}
