//! PCI configuration space: the standard header, the capability lists, and the few
//! capabilities the bus layer decodes (SR-IOV, the PCIe link).
//!
//! Everything here works on a byte buffer holding the start of a function's configuration
//! space, as read from sysfs `config` or through VFIO. The buffer may be of any length:
//!
//! * 64 bytes is what sysfs gives a process without `CAP_SYS_ADMIN`: the header only.
//! * 256 bytes is conventional PCI configuration space, with the standard capability list.
//! * 4096 bytes is PCIe extended configuration space, with the extended capability list.
//!
//! Nothing here panics or loops on any buffer. Walks read only bytes that are present: a
//! capability beyond the end of a short buffer ends the walk quietly (so a 64-byte read
//! gives an empty list, not an error), while structure that is present and wrong (a
//! pointer into the header, a loop) is a [`ParseErrorKind::Malformed`] error.
//!
//! Facts from the PCI Local Bus and PCI Express Base specifications.

use crate::error::{ParseError, ParseErrorKind};
use crate::model::{ClassCode, DeviceId, Link, LinkSpeed, VendorId};

const ATTR: &str = "config";

/// Size of the standard header that [`parse_header`] needs.
pub const HEADER_SIZE: usize = 64;
/// Size of conventional configuration space (header and standard capabilities).
pub const CONFIG_SPACE_SIZE: usize = 256;
/// Size of PCIe extended configuration space.
pub const EXT_CONFIG_SPACE_SIZE: usize = 4096;
/// The most standard capabilities a walk visits: the dword slots from 0x40 to 0xfc.
pub const MAX_CAPABILITIES: usize = 48;
/// The most extended capabilities a walk visits: (4096 - 256) / 8, each being at least 8
/// bytes in practice.
pub const MAX_EXT_CAPABILITIES: usize = 480;

/// The `what` of the error [`parse_header`] returns when the header reads all ones.
pub const DEVICE_GONE: &str = "all ones: device not responding";

/// Whether an error is the "device not responding" one (a header of all ones: the device was
/// removed, is in reset, or its link is down), which callers usually treat apart from
/// corrupt data.
pub fn is_device_gone(error: &ParseError) -> bool {
    error.kind == (ParseErrorKind::Malformed { what: DEVICE_GONE })
}

/// Status register bit: the function has a capability list.
pub const STATUS_CAP_LIST: u16 = 1 << 4;

/// Standard capability ids (offset 0 of each capability).
pub mod cap_id {
    /// Power Management.
    pub const PM: u8 = 0x01;
    /// AGP.
    pub const AGP: u8 = 0x02;
    /// Vital Product Data.
    pub const VPD: u8 = 0x03;
    /// Slot Identification.
    pub const SLOT_ID: u8 = 0x04;
    /// Message Signalled Interrupts.
    pub const MSI: u8 = 0x05;
    /// CompactPCI Hot Swap.
    pub const CHSWP: u8 = 0x06;
    /// PCI-X.
    pub const PCIX: u8 = 0x07;
    /// HyperTransport.
    pub const HT: u8 = 0x08;
    /// Vendor specific.
    pub const VENDOR: u8 = 0x09;
    /// Debug port.
    pub const DEBUG_PORT: u8 = 0x0a;
    /// CompactPCI central resource control.
    pub const CCRC: u8 = 0x0b;
    /// PCI Standard Hot-Plug Controller.
    pub const SHPC: u8 = 0x0c;
    /// Bridge subsystem vendor/device id.
    pub const SSVID: u8 = 0x0d;
    /// AGP 8x.
    pub const AGP3: u8 = 0x0e;
    /// Secure device.
    pub const SECURE: u8 = 0x0f;
    /// PCI Express.
    pub const EXP: u8 = 0x10;
    /// MSI-X.
    pub const MSIX: u8 = 0x11;
    /// SATA configuration.
    pub const SATA: u8 = 0x12;
    /// Advanced Features.
    pub const AF: u8 = 0x13;
    /// Enhanced Allocation.
    pub const EA: u8 = 0x14;
    /// Flattening Portal Bridge.
    pub const FPB: u8 = 0x15;
}

/// Extended capability ids (bits 15:0 of each extended capability header).
pub mod ext_cap_id {
    /// Advanced Error Reporting.
    pub const AER: u16 = 0x01;
    /// Virtual Channel.
    pub const VC: u16 = 0x02;
    /// Device Serial Number.
    pub const DSN: u16 = 0x03;
    /// Power Budgeting.
    pub const PWR: u16 = 0x04;
    /// Root Complex Link Declaration.
    pub const RCLD: u16 = 0x05;
    /// Root Complex Internal Link Control.
    pub const RCILC: u16 = 0x06;
    /// Root Complex Event Collector Endpoint Association.
    pub const RCEC: u16 = 0x07;
    /// Multi-Function Virtual Channel.
    pub const MFVC: u16 = 0x08;
    /// Virtual Channel (when MFVC is present too).
    pub const VC9: u16 = 0x09;
    /// Root Complex Register Block header.
    pub const RCRB: u16 = 0x0a;
    /// Vendor-specific extended capability.
    pub const VNDR: u16 = 0x0b;
    /// Configuration Access Correlation.
    pub const CAC: u16 = 0x0c;
    /// Access Control Services.
    pub const ACS: u16 = 0x0d;
    /// Alternative Routing-ID Interpretation.
    pub const ARI: u16 = 0x0e;
    /// Address Translation Services.
    pub const ATS: u16 = 0x0f;
    /// Single Root I/O Virtualization.
    pub const SRIOV: u16 = 0x10;
    /// Multi-Root I/O Virtualization.
    pub const MRIOV: u16 = 0x11;
    /// Multicast.
    pub const MCAST: u16 = 0x12;
    /// Page Request Interface.
    pub const PRI: u16 = 0x13;
    /// Resizable BAR.
    pub const REBAR: u16 = 0x15;
    /// Dynamic Power Allocation.
    pub const DPA: u16 = 0x16;
    /// TLP Processing Hints requester.
    pub const TPH: u16 = 0x17;
    /// Latency Tolerance Reporting.
    pub const LTR: u16 = 0x18;
    /// Secondary PCI Express.
    pub const SECPCI: u16 = 0x19;
    /// Protocol Multiplexing.
    pub const PMUX: u16 = 0x1a;
    /// Process Address Space ID.
    pub const PASID: u16 = 0x1b;
    /// LN Requester.
    pub const LNR: u16 = 0x1c;
    /// Downstream Port Containment.
    pub const DPC: u16 = 0x1d;
    /// L1 PM Substates.
    pub const L1SS: u16 = 0x1e;
    /// Precision Time Measurement.
    pub const PTM: u16 = 0x1f;
    /// Designated Vendor-Specific Extended Capability.
    pub const DVSEC: u16 = 0x23;
    /// VF Resizable BAR.
    pub const VF_REBAR: u16 = 0x24;
    /// Data Link Feature.
    pub const DLF: u16 = 0x25;
    /// Physical Layer 16.0 GT/s.
    pub const PL_16GT: u16 = 0x26;
    /// Lane Margining at the Receiver.
    pub const LMR: u16 = 0x27;
    /// Physical Layer 32.0 GT/s.
    pub const PL_32GT: u16 = 0x2a;
    /// Data Object Exchange.
    pub const DOE: u16 = 0x2e;
    /// Physical Layer 64.0 GT/s.
    pub const PL_64GT: u16 = 0x31;
}

fn u16_at(bytes: &[u8], offset: usize) -> Option<u16> {
    let b = bytes.get(offset..offset.checked_add(2)?)?;
    Some(u16::from_le_bytes([*b.first()?, *b.get(1)?]))
}

fn u32_at(bytes: &[u8], offset: usize) -> Option<u32> {
    let b = bytes.get(offset..offset.checked_add(4)?)?;
    Some(u32::from_le_bytes([
        *b.first()?,
        *b.get(1)?,
        *b.get(2)?,
        *b.get(3)?,
    ]))
}

fn u8_at(bytes: &[u8], offset: usize) -> Option<u8> {
    bytes.get(offset).copied()
}

/// The standard 64-byte configuration header, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConfigHeader {
    /// Vendor id (0x00).
    pub vendor: VendorId,
    /// Device id (0x02).
    pub device: DeviceId,
    /// Command register (0x04).
    pub command: u16,
    /// Status register (0x06).
    pub status: u16,
    /// Revision id (0x08).
    pub revision: u8,
    /// Class code (0x09–0x0b: programming interface, subclass, base class).
    pub class: ClassCode,
    /// Cache line size, in dwords (0x0c).
    pub cache_line_size: u8,
    /// Latency timer (0x0d).
    pub latency_timer: u8,
    /// Header layout (0x0e, low 7 bits): 0 endpoint, 1 PCI-to-PCI bridge, 2 CardBus bridge.
    pub header_type: u8,
    /// Whether the device has more than one function (0x0e, bit 7).
    pub multifunction: bool,
    /// Built-in self test register (0x0f).
    pub bist: u8,
    /// Subsystem vendor id: at 0x2c in a type 0 header, at 0x40 in a type 2 (CardBus)
    /// header when the buffer holds it (68 bytes or more); `None` for type 1 bridges (whose
    /// subsystem ids live in a capability) and unknown layouts. A value of 0 is kept as
    /// it is: the device has no subsystem ids.
    pub subsystem_vendor: Option<VendorId>,
    /// Subsystem device id: at 0x2e (type 0) or 0x42 (type 2); see `subsystem_vendor`.
    pub subsystem_device: Option<DeviceId>,
    /// Offset of the first standard capability (low two bits cleared), only when the
    /// status register says there is a capability list (bit 4) and the layout is known:
    /// read at 0x34 in type 0 and 1 headers and at 0x14 in a type 2 (CardBus) header, as
    /// the kernel and lspci do; `None` for other header types. It may be 0 or point
    /// anywhere; [`capabilities`] checks it.
    pub capabilities_pointer: Option<u8>,
    /// Interrupt line (0x3c): the IRQ routing the firmware wrote, not the Linux IRQ.
    pub interrupt_line: u8,
    /// Interrupt pin (0x3d): 0 none, 1–4 INTA#–INTD#.
    pub interrupt_pin: u8,
}

fn truncated(bytes: &[u8], needed: usize) -> ParseError {
    ParseError::new(
        ATTR,
        ParseErrorKind::Truncated {
            needed,
            got: bytes.len(),
        },
        &[],
    )
}

fn malformed(what: &'static str) -> ParseError {
    ParseError::new(ATTR, ParseErrorKind::Malformed { what }, &[])
}

/// Checks a buffer holds a header of a responding device.
///
/// A device that does not answer reads all ones, its command and status words included.
/// An SR-IOV VF reads 0xffff as vendor and device id too (the spec says so; the ids live in
/// the PF), but its command, status and capability list are real: it is not "gone".
fn check_header(bytes: &[u8]) -> Result<(), ParseError> {
    if bytes.len() < HEADER_SIZE {
        return Err(truncated(bytes, HEADER_SIZE));
    }
    match (u32_at(bytes, 0), u32_at(bytes, 4)) {
        (Some(0xffff_ffff), Some(0xffff_ffff)) => Err(malformed(DEVICE_GONE)),
        _ => Ok(()),
    }
}

/// Decodes the standard header (little endian) from the first 64 bytes of `bytes`.
///
/// Fewer than 64 bytes is [`ParseErrorKind::Truncated`]; a header of all ones (what a
/// removed, resetting or unreachable device reads as) is `Malformed` with [`DEVICE_GONE`],
/// see [`is_device_gone`]. A VF's header decodes, with vendor and device ids 0xffff: take
/// those from sysfs. Errors quote no text (the data is binary).
pub fn parse_header(bytes: &[u8]) -> Result<ConfigHeader, ParseError> {
    check_header(bytes)?;
    // Present: checked above. `unwrap_or(0)` only keeps this free of panics.
    let b = |o| u8_at(bytes, o).unwrap_or(0);
    let w = |o| u16_at(bytes, o).unwrap_or(0);
    let header_byte = b(0x0e);
    let header_type = header_byte & 0x7f;
    let status = w(0x06);
    let (subsystem_vendor, subsystem_device) = match header_type {
        0 => (Some(w(0x2c)), Some(w(0x2e))),
        2 => (u16_at(bytes, 0x40), u16_at(bytes, 0x42)),
        _ => (None, None),
    };
    let capabilities_pointer = match header_type {
        0 | 1 => Some(b(0x34)),
        // In a CardBus header 0x34 is I/O base 1; the pointer sits at 0x14.
        2 => Some(b(0x14)),
        _ => None,
    }
    .filter(|_| status & STATUS_CAP_LIST != 0)
    .map(|p| p & !3);
    Ok(ConfigHeader {
        vendor: VendorId(w(0x00)),
        device: DeviceId(w(0x02)),
        command: w(0x04),
        status,
        revision: b(0x08),
        class: ClassCode::from_parts(b(0x0b), b(0x0a), b(0x09)),
        cache_line_size: b(0x0c),
        latency_timer: b(0x0d),
        header_type,
        multifunction: header_byte & 0x80 != 0,
        bist: b(0x0f),
        subsystem_vendor: subsystem_vendor.map(VendorId),
        subsystem_device: subsystem_device.map(DeviceId),
        capabilities_pointer,
        interrupt_line: b(0x3c),
        interrupt_pin: b(0x3d),
    })
}

/// A standard capability: its id and where it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Capability {
    /// Capability id; see [`cap_id`] and [`capability_name`].
    pub id: u8,
    /// Offset in configuration space, 0x40 to 0xfc.
    pub offset: u8,
}

/// An extended (PCIe) capability: its id, version and where it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ExtCapability {
    /// Capability id; see [`ext_cap_id`] and [`extended_capability_name`].
    pub id: u16,
    /// Capability version (header bits 19:16).
    pub version: u8,
    /// Offset in configuration space, 0x100 to 0xffc.
    pub offset: u16,
}

/// Walks the standard list, calling `found` on each capability, up to the end of the list,
/// the end of the buffer, or a fault, which it returns.
fn walk_capabilities(bytes: &[u8], mut found: impl FnMut(Capability) -> bool) -> Result<(), ParseError> {
    let header = parse_header(bytes)?;
    let Some(mut pointer) = header.capabilities_pointer else {
        return Ok(());
    };
    // One bit per dword of configuration space below 0x100.
    let mut seen: u64 = 0;
    while pointer != 0 {
        if pointer < 0x40 {
            return Err(malformed("capability pointer into the header (below 0x40)"));
        }
        let slot = pointer / 4;
        if seen & (1 << slot) != 0 {
            return Err(malformed("capability list loops"));
        }
        seen |= 1 << slot;
        let (Some(id), Some(next)) = (
            u8_at(bytes, pointer.into()),
            u8_at(bytes, usize::from(pointer) + 1),
        ) else {
            // Beyond a short read (64 bytes without privileges): the list goes on where we
            // cannot see. Not an error.
            return Ok(());
        };
        if !found(Capability { id, offset: pointer }) {
            return Ok(());
        }
        pointer = next & !3;
    }
    Ok(())
}

/// The standard capability list, in list order, from the header's pointer (0x34, or 0x14
/// in a CardBus header: see [`ConfigHeader::capabilities_pointer`]).
///
/// Rules:
///
/// * No capability list (status bit 4 clear), a header type other than 0, 1 and 2, or a
///   zero pointer: empty.
/// * Pointers have their low two bits cleared.
/// * A pointer below 0x40 (into the header) is a `Malformed` error; so is a list that
///   comes back to a capability already visited (a loop). Since there are 48 dword slots
///   from 0x40 to 0xfc, a walk sees at most [`MAX_CAPABILITIES`] entries.
/// * A capability beyond the end of the buffer ends the list quietly, with the entries
///   before it: a 64-byte buffer (an unprivileged read) gives an empty list.
/// * The header errors of [`parse_header`] (truncated below 64 bytes, device gone).
pub fn capabilities(bytes: &[u8]) -> Result<Vec<Capability>, ParseError> {
    let mut out = Vec::new();
    walk_capabilities(bytes, |c| {
        out.push(c);
        true
    })?;
    Ok(out)
}

/// The offset of the first standard capability with this id, if the walk finds one before
/// the list ends or breaks.
pub fn find_capability(bytes: &[u8], id: u8) -> Option<u8> {
    let mut hit = None;
    let _ = walk_capabilities(bytes, |c| {
        if c.id == id {
            hit = Some(c.offset);
        }
        hit.is_none()
    });
    hit
}

fn walk_extended(bytes: &[u8], mut found: impl FnMut(ExtCapability) -> bool) -> Result<(), ParseError> {
    check_header(bytes)?;
    if bytes.len() < EXT_CONFIG_SPACE_SIZE {
        return Ok(());
    }
    // One bit per dword of extended configuration space.
    let mut seen = [0u64; EXT_CONFIG_SPACE_SIZE / 4 / 64];
    let mut offset: u16 = 0x100;
    let mut count = 0;
    loop {
        let Some(header) = u32_at(bytes, offset.into()) else {
            return Ok(());
        };
        if header == 0 || header == 0xffff_ffff {
            // No (more) extended capabilities: an empty list reads 0, a conventional PCI
            // device behind a PCIe bridge reads all ones.
            return Ok(());
        }
        let slot = usize::from(offset / 4);
        let (word, bit) = (slot / 64, slot % 64);
        let Some(w) = seen.get_mut(word) else {
            return Ok(());
        };
        if *w & (1 << bit) != 0 {
            return Err(malformed("extended capability list loops"));
        }
        *w |= 1 << bit;
        count += 1;
        if count > MAX_EXT_CAPABILITIES {
            return Err(malformed("more than 480 extended capabilities"));
        }
        let cap = ExtCapability {
            id: header as u16,
            version: ((header >> 16) & 0xf) as u8,
            offset,
        };
        if !found(cap) {
            return Ok(());
        }
        // Bits 31:20, at most 0xffc once masked.
        let next = ((header >> 20) & 0xffc) as u16;
        if next == 0 {
            return Ok(());
        }
        if next < 0x100 {
            return Err(malformed("extended capability pointer below 0x100"));
        }
        offset = next;
    }
}

/// The extended capability list, in list order, from 0x100.
///
/// Rules:
///
/// * Fewer than 4096 bytes: empty (no extended space was read).
/// * A header of 0 or `0xffffffff` ends the list (at 0x100: there is none).
/// * The next pointer is header bits 31:20 with the low two bits cleared; 0 ends the list,
///   a pointer below 0x100 is a `Malformed` error, and so are a loop and a list longer than
///   [`MAX_EXT_CAPABILITIES`].
/// * The header errors of [`parse_header`] (truncated below 64 bytes, device gone).
pub fn extended_capabilities(bytes: &[u8]) -> Result<Vec<ExtCapability>, ParseError> {
    let mut out = Vec::new();
    walk_extended(bytes, |c| {
        out.push(c);
        true
    })?;
    Ok(out)
}

/// The offset of the first extended capability with this id, if the walk finds one before
/// the list ends or breaks.
pub fn find_extended_capability(bytes: &[u8], id: u16) -> Option<u16> {
    let mut hit = None;
    let _ = walk_extended(bytes, |c| {
        if c.id == id {
            hit = Some(c.offset);
        }
        hit.is_none()
    });
    hit
}

/// A short name of a standard capability id, `"unknown"` for others.
pub fn capability_name(id: u8) -> &'static str {
    match id {
        cap_id::PM => "Power Management",
        cap_id::AGP => "AGP",
        cap_id::VPD => "Vital Product Data",
        cap_id::SLOT_ID => "Slot Identification",
        cap_id::MSI => "MSI",
        cap_id::CHSWP => "CompactPCI Hot Swap",
        cap_id::PCIX => "PCI-X",
        cap_id::HT => "HyperTransport",
        cap_id::VENDOR => "Vendor Specific",
        cap_id::DEBUG_PORT => "Debug Port",
        cap_id::CCRC => "CompactPCI Central Resource Control",
        cap_id::SHPC => "PCI Hot-Plug Controller",
        cap_id::SSVID => "Bridge Subsystem Vendor ID",
        cap_id::AGP3 => "AGP 8x",
        cap_id::SECURE => "Secure Device",
        cap_id::EXP => "PCI Express",
        cap_id::MSIX => "MSI-X",
        cap_id::SATA => "SATA Configuration",
        cap_id::AF => "Advanced Features",
        cap_id::EA => "Enhanced Allocation",
        cap_id::FPB => "Flattening Portal Bridge",
        _ => "unknown",
    }
}

/// A short name of an extended capability id, `"unknown"` for others.
pub fn extended_capability_name(id: u16) -> &'static str {
    use ext_cap_id as e;
    match id {
        e::AER => "Advanced Error Reporting",
        e::VC | e::VC9 => "Virtual Channel",
        e::DSN => "Device Serial Number",
        e::PWR => "Power Budgeting",
        e::RCLD => "Root Complex Link Declaration",
        e::RCILC => "Root Complex Internal Link Control",
        e::RCEC => "Root Complex Event Collector",
        e::MFVC => "Multi-Function Virtual Channel",
        e::RCRB => "Root Complex Register Block",
        e::VNDR => "Vendor Specific",
        e::CAC => "Configuration Access Correlation",
        e::ACS => "Access Control Services",
        e::ARI => "Alternative Routing-ID Interpretation",
        e::ATS => "Address Translation Services",
        e::SRIOV => "SR-IOV",
        e::MRIOV => "MR-IOV",
        e::MCAST => "Multicast",
        e::PRI => "Page Request Interface",
        e::REBAR => "Resizable BAR",
        e::DPA => "Dynamic Power Allocation",
        e::TPH => "TLP Processing Hints",
        e::LTR => "Latency Tolerance Reporting",
        e::SECPCI => "Secondary PCI Express",
        e::PMUX => "Protocol Multiplexing",
        e::PASID => "Process Address Space ID",
        e::LNR => "LN Requester",
        e::DPC => "Downstream Port Containment",
        e::L1SS => "L1 PM Substates",
        e::PTM => "Precision Time Measurement",
        e::DVSEC => "Designated Vendor-Specific",
        e::VF_REBAR => "VF Resizable BAR",
        e::DLF => "Data Link Feature",
        e::PL_16GT => "Physical Layer 16.0 GT/s",
        e::LMR => "Lane Margining at the Receiver",
        e::PL_32GT => "Physical Layer 32.0 GT/s",
        e::DOE => "Data Object Exchange",
        e::PL_64GT => "Physical Layer 64.0 GT/s",
        _ => "unknown",
    }
}

/// The SR-IOV extended capability's counts and routing, as the PF's registers hold them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct SriovCapability {
    /// InitialVFs (+0x0c).
    pub initial_vfs: u16,
    /// TotalVFs (+0x0e): how many VFs the PF can have.
    pub total_vfs: u16,
    /// NumVFs (+0x10): how many are set up now.
    pub num_vfs: u16,
    /// First VF Offset (+0x14): routing-id offset of the first VF from the PF.
    pub vf_offset: u16,
    /// VF Stride (+0x16): routing-id distance between VFs.
    pub vf_stride: u16,
    /// VF Device ID (+0x1a).
    pub vf_device: u16,
}

/// Size of the SR-IOV capability's registers read by [`sriov_capability`] (up to the VF
/// Device ID).
const SRIOV_LEN: usize = 0x1c;

/// Decodes the SR-IOV capability: `None` when the extended list has none (or the buffer
/// has no extended space), an error when the capability runs past the end of the buffer.
pub fn sriov_capability(bytes: &[u8]) -> Option<Result<SriovCapability, ParseError>> {
    let base = usize::from(find_extended_capability(bytes, ext_cap_id::SRIOV)?);
    let r = |o: usize| u16_at(bytes, base + o);
    let decoded = (|| {
        Some(SriovCapability {
            initial_vfs: r(0x0c)?,
            total_vfs: r(0x0e)?,
            num_vfs: r(0x10)?,
            vf_offset: r(0x14)?,
            vf_stride: r(0x16)?,
            vf_device: r(0x1a)?,
        })
    })();
    Some(decoded.ok_or_else(|| truncated(bytes, base + SRIOV_LEN)))
}

/// A link speed from its PCIe encoding (Link Capabilities / Link Status bits 3:0).
pub fn link_speed_from_code(code: u8) -> Option<LinkSpeed> {
    let mts = match code {
        1 => 2500,
        2 => 5000,
        3 => 8000,
        4 => 16000,
        5 => 32000,
        6 => 64000,
        _ => return None,
    };
    Some(LinkSpeed(mts))
}

fn link_from(speed_code: u32, width: u32) -> Link {
    Link {
        speed: link_speed_from_code((speed_code & 0xf) as u8),
        width: match width & 0x3f {
            0 => None,
            w if w <= 32 => Some(w as u8),
            _ => None,
        },
    }
}

/// The PCIe link from the PCI Express capability: `(current, max)`.
///
/// Current is from Link Status (+0x12: speed bits 3:0, negotiated width bits 9:4); max
/// from Link Capabilities (+0x0c: max speed bits 3:0, max width bits 9:4). Reserved speed
/// codes give a `None` speed; width 0 or above 32 gives a `None` width. `None` altogether
/// when there is no PCIe capability or the buffer does not hold its link registers.
pub fn pcie_link(bytes: &[u8]) -> Option<(Link, Link)> {
    let base = usize::from(find_capability(bytes, cap_id::EXP)?);
    let caps = u32_at(bytes, base + 0x0c)?;
    let status = u16_at(bytes, base + 0x12)?;
    let status = u32::from(status);
    Some((link_from(status, status >> 4), link_from(caps, caps >> 4)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn put16(b: &mut [u8], o: usize, v: u16) {
        b[o..o + 2].copy_from_slice(&v.to_le_bytes());
    }
    fn put32(b: &mut [u8], o: usize, v: u32) {
        b[o..o + 4].copy_from_slice(&v.to_le_bytes());
    }
    fn ext_header(id: u16, version: u8, next: u16) -> u32 {
        u32::from(id) | (u32::from(version) << 16) | (u32::from(next) << 20)
    }

    /// A Samsung-like NVMe SSD with PM at 0x40, MSI-X at 0x50, PCIe at 0x70, and in extended
    /// space AER at 0x100, SR-IOV at 0x148 and DSN at 0x188.
    fn nvme(len: usize) -> Vec<u8> {
        let mut b = vec![0u8; 4096];
        put16(&mut b, 0x00, 0x144d);
        put16(&mut b, 0x02, 0xa808);
        put16(&mut b, 0x04, 0x0406);
        put16(&mut b, 0x06, 0x0010);
        b[0x08] = 0x00;
        b[0x09] = 0x02;
        b[0x0a] = 0x08;
        b[0x0b] = 0x01;
        b[0x0c] = 0x10;
        b[0x0e] = 0x00;
        put32(&mut b, 0x10, 0xfb00_0004);
        put16(&mut b, 0x2c, 0x144d);
        put16(&mut b, 0x2e, 0xa801);
        b[0x34] = 0x40;
        b[0x3c] = 0x0b;
        b[0x3d] = 0x01;
        // PM -> MSI-X -> PCIe.
        b[0x40] = cap_id::PM;
        b[0x41] = 0x50;
        b[0x50] = cap_id::MSIX;
        b[0x51] = 0x70;
        b[0x70] = cap_id::EXP;
        b[0x71] = 0x00;
        // Link Capabilities: 8 GT/s x4. Link Status: 8 GT/s x4.
        put32(&mut b, 0x70 + 0x0c, 0x0047_0843);
        put16(&mut b, 0x70 + 0x12, 0x1043);
        put32(&mut b, 0x100, ext_header(ext_cap_id::AER, 2, 0x148));
        put32(&mut b, 0x148, ext_header(ext_cap_id::SRIOV, 1, 0x188));
        put16(&mut b, 0x148 + 0x0c, 32);
        put16(&mut b, 0x148 + 0x0e, 64);
        put16(&mut b, 0x148 + 0x10, 4);
        put16(&mut b, 0x148 + 0x14, 0x80);
        put16(&mut b, 0x148 + 0x16, 1);
        put16(&mut b, 0x148 + 0x1a, 0xa824);
        put32(&mut b, 0x188, ext_header(ext_cap_id::DSN, 1, 0));
        b.truncate(len);
        b
    }

    #[test]
    fn header_of_an_nvme_drive() {
        let h = parse_header(&nvme(64)).unwrap();
        assert_eq!(h.vendor, VendorId(0x144d));
        assert_eq!(h.device, DeviceId(0xa808));
        assert_eq!(h.command, 0x0406);
        assert_eq!(h.class, ClassCode::new(0x010802).unwrap());
        assert_eq!((h.header_type, h.multifunction), (0, false));
        assert_eq!(h.subsystem_vendor, Some(VendorId(0x144d)));
        assert_eq!(h.subsystem_device, Some(DeviceId(0xa801)));
        assert_eq!(h.capabilities_pointer, Some(0x40));
        assert_eq!((h.interrupt_line, h.interrupt_pin), (0x0b, 1));
        assert_eq!(h.cache_line_size, 0x10);
        assert_eq!(parse_header(&nvme(4096)).unwrap(), h);
    }

    #[test]
    fn header_layouts() {
        let mut b = nvme(64);
        b[0x0e] = 0x81; // multi-function bridge
        let h = parse_header(&b).unwrap();
        assert_eq!((h.header_type, h.multifunction), (1, true));
        assert_eq!((h.subsystem_vendor, h.subsystem_device), (None, None));
        let mut b = nvme(256);
        b[0x0e] = 0x02; // CardBus
        put16(&mut b, 0x40, 0x1234);
        put16(&mut b, 0x42, 0x5678);
        let h = parse_header(&b).unwrap();
        assert_eq!(h.subsystem_vendor, Some(VendorId(0x1234)));
        assert_eq!(h.subsystem_device, Some(DeviceId(0x5678)));
        let h = parse_header(&b[..64]).unwrap();
        assert_eq!((h.subsystem_vendor, h.subsystem_device), (None, None));
        let mut b = nvme(64);
        put16(&mut b, 0x06, 0); // no capability list
        assert_eq!(parse_header(&b).unwrap().capabilities_pointer, None);
        assert_eq!(capabilities(&b).unwrap(), []);
    }

    #[test]
    fn header_errors() {
        for len in [0, 1, 2, 63] {
            assert_eq!(
                parse_header(&nvme(len)).unwrap_err().kind,
                ParseErrorKind::Truncated { needed: 64, got: len }
            );
        }
        let gone = vec![0xffu8; 4096];
        for e in [
            parse_header(&gone).unwrap_err(),
            capabilities(&gone).unwrap_err(),
            extended_capabilities(&gone).unwrap_err(),
        ] {
            assert!(is_device_gone(&e), "{e}");
            assert_eq!(e.attribute, "config");
        }
        assert_eq!(find_capability(&gone, cap_id::EXP), None);
        assert_eq!(sriov_capability(&gone), None);
        assert_eq!(pcie_link(&gone), None);
        assert!(!is_device_gone(&parse_header(&[]).unwrap_err()));
    }

    #[test]
    fn capability_walks() {
        let caps = capabilities(&nvme(256)).unwrap();
        assert_eq!(
            caps,
            [
                Capability {
                    id: cap_id::PM,
                    offset: 0x40
                },
                Capability {
                    id: cap_id::MSIX,
                    offset: 0x50
                },
                Capability {
                    id: cap_id::EXP,
                    offset: 0x70
                },
            ]
        );
        assert_eq!(
            caps.iter().map(|c| capability_name(c.id)).collect::<Vec<_>>(),
            ["Power Management", "MSI-X", "PCI Express"]
        );
        assert_eq!(find_capability(&nvme(256), cap_id::MSIX), Some(0x50));
        assert_eq!(find_capability(&nvme(256), cap_id::MSI), None);
        // An unprivileged 64-byte read: the list is beyond it.
        assert_eq!(capabilities(&nvme(64)).unwrap(), []);
        // A read cut in the middle of the list gives what it holds.
        assert_eq!(capabilities(&nvme(0x60)).unwrap().len(), 2);
        // Low pointer bits are ignored.
        let mut b = nvme(256);
        b[0x34] = 0x43;
        b[0x41] = 0x52;
        assert_eq!(capabilities(&b).unwrap().len(), 3);
    }

    #[test]
    fn broken_capability_lists() {
        let mut looped = nvme(256);
        looped[0x71] = 0x50;
        let e = capabilities(&looped).unwrap_err();
        assert_eq!(
            e.kind,
            ParseErrorKind::Malformed {
                what: "capability list loops"
            }
        );
        assert_eq!(find_capability(&looped, cap_id::EXP), Some(0x70));
        assert_eq!(find_capability(&looped, cap_id::MSI), None);
        let mut self_loop = nvme(256);
        self_loop[0x41] = 0x40;
        assert!(capabilities(&self_loop).is_err());
        let mut into_header = nvme(256);
        into_header[0x51] = 0x10;
        assert!(matches!(
            capabilities(&into_header).unwrap_err().kind,
            ParseErrorKind::Malformed { .. }
        ));
        assert_eq!(find_capability(&into_header, cap_id::MSIX), Some(0x50));
        let mut first_into_header = nvme(64);
        first_into_header[0x34] = 0x3c;
        assert!(capabilities(&first_into_header).is_err());
    }

    #[test]
    fn extended_walks() {
        let ext = extended_capabilities(&nvme(4096)).unwrap();
        assert_eq!(
            ext,
            [
                ExtCapability {
                    id: ext_cap_id::AER,
                    version: 2,
                    offset: 0x100
                },
                ExtCapability {
                    id: ext_cap_id::SRIOV,
                    version: 1,
                    offset: 0x148
                },
                ExtCapability {
                    id: ext_cap_id::DSN,
                    version: 1,
                    offset: 0x188
                },
            ]
        );
        assert_eq!(extended_capability_name(ext[1].id), "SR-IOV");
        assert_eq!(extended_capability_name(0x7777), "unknown");
        assert_eq!(
            find_extended_capability(&nvme(4096), ext_cap_id::DSN),
            Some(0x188)
        );
        assert_eq!(find_extended_capability(&nvme(4096), ext_cap_id::ARI), None);
        for len in [64, 256, 4095] {
            assert_eq!(extended_capabilities(&nvme(len)).unwrap(), []);
        }
        // No extended capabilities: 0, or all ones (conventional device behind a bridge).
        let mut b = nvme(4096);
        put32(&mut b, 0x100, 0);
        assert_eq!(extended_capabilities(&b).unwrap(), []);
        put32(&mut b, 0x100, u32::MAX);
        assert_eq!(extended_capabilities(&b).unwrap(), []);
        // Loops and low pointers.
        let mut b = nvme(4096);
        put32(&mut b, 0x188, ext_header(ext_cap_id::DSN, 1, 0x148));
        assert_eq!(
            extended_capabilities(&b).unwrap_err().kind,
            ParseErrorKind::Malformed {
                what: "extended capability list loops"
            }
        );
        assert_eq!(find_extended_capability(&b, ext_cap_id::DSN), Some(0x188));
        put32(&mut b, 0x188, ext_header(ext_cap_id::DSN, 1, 0x0fc));
        assert!(extended_capabilities(&b).is_err());
        // The longest chain that is not a loop: every 8 bytes.
        let mut b = nvme(4096);
        for (i, o) in (0x100..0x1000).step_by(8).enumerate() {
            let next = if o + 8 < 0x1000 { o + 8 } else { 0 };
            put32(&mut b, o, ext_header(i as u16 + 1, 1, next as u16));
        }
        assert_eq!(extended_capabilities(&b).unwrap().len(), MAX_EXT_CAPABILITIES);
        // Every 4 bytes is too many.
        let mut b = nvme(4096);
        for o in (0x100..0x1000).step_by(4) {
            let next = if o + 4 < 0x1000 { o + 4 } else { 0 };
            put32(&mut b, o, ext_header(1, 1, next as u16));
        }
        assert_eq!(
            extended_capabilities(&b).unwrap_err().kind,
            ParseErrorKind::Malformed {
                what: "more than 480 extended capabilities"
            }
        );
    }

    #[test]
    fn sriov_decode() {
        let s = sriov_capability(&nvme(4096)).unwrap().unwrap();
        assert_eq!(
            s,
            SriovCapability {
                initial_vfs: 32,
                total_vfs: 64,
                num_vfs: 4,
                vf_offset: 0x80,
                vf_stride: 1,
                vf_device: 0xa824,
            }
        );
        assert_eq!(sriov_capability(&nvme(256)), None);
        let mut b = nvme(4096);
        put32(&mut b, 0x148, ext_header(ext_cap_id::ATS, 1, 0x188));
        assert_eq!(sriov_capability(&b), None);
        // An SR-IOV capability in the last dword cannot hold its registers.
        let mut b = nvme(4096);
        put32(&mut b, 0x188, ext_header(ext_cap_id::DSN, 1, 0xffc));
        put32(&mut b, 0x148, ext_header(ext_cap_id::ATS, 1, 0x188));
        put32(&mut b, 0xffc, ext_header(ext_cap_id::SRIOV, 1, 0));
        assert_eq!(
            sriov_capability(&b).unwrap().unwrap_err().kind,
            ParseErrorKind::Truncated {
                needed: 0xffc + 0x1c,
                got: 4096
            }
        );
    }

    #[test]
    fn pcie_links() {
        let (cur, max) = pcie_link(&nvme(256)).unwrap();
        let gen3x4 = Link {
            speed: Some(LinkSpeed(8000)),
            width: Some(4),
        };
        assert_eq!((cur, max), (gen3x4, gen3x4));
        let mut b = nvme(256);
        put16(&mut b, 0x70 + 0x12, 0x0011); // 2.5 GT/s x1, trained down
        put32(&mut b, 0x70 + 0x0c, 0x0000_0206); // 64 GT/s x32
        let (cur, max) = pcie_link(&b).unwrap();
        assert_eq!(cur.speed, Some(LinkSpeed(2500)));
        assert_eq!(cur.width, Some(1));
        assert_eq!(max.speed, Some(LinkSpeed(64000)));
        assert_eq!(max.width, Some(32));
        put16(&mut b, 0x70 + 0x12, 0x03f7); // reserved speed, width 63
        let (cur, _) = pcie_link(&b).unwrap();
        assert_eq!(cur, Link::default());
        assert_eq!(pcie_link(&nvme(64)), None);
        assert_eq!(pcie_link(&nvme(0x80)), None, "link status not in the buffer");
        assert_eq!(link_speed_from_code(0), None);
        assert_eq!(link_speed_from_code(5), Some(LinkSpeed(32000)));
    }

    /// Buffers that often have a capability list: a valid header of type 0, 1 or 2 (the
    /// high bit random) with random content and the pointer where that type keeps it.
    fn header_like() -> impl Strategy<Value = Vec<u8>> {
        (prop::collection::vec(any::<u8>(), 0..=4200), any::<u8>(), 0u8..3).prop_map(|(mut b, p, t)| {
            if b.len() >= 64 {
                b[0] = 0x86;
                b[1] = 0x80;
                b[6] |= 0x10;
                b[0x0e] = (b[0x0e] & 0x80) | t;
                b[if t == 2 { 0x14 } else { 0x34 }] = p;
            }
            b
        })
    }

    fn exercise(b: &[u8]) {
        let _ = parse_header(b);
        let caps = capabilities(b);
        let ext = extended_capabilities(b);
        let _ = (sriov_capability(b), pcie_link(b));
        let _ = (
            find_capability(b, cap_id::EXP),
            find_extended_capability(b, ext_cap_id::SRIOV),
        );
        if let Ok(caps) = caps {
            assert!(caps.len() <= MAX_CAPABILITIES);
            for c in caps {
                assert!(c.offset >= 0x40 && usize::from(c.offset) + 1 < b.len());
                assert_eq!(c.offset % 4, 0);
            }
        }
        if let Ok(ext) = ext {
            assert!(ext.len() <= MAX_EXT_CAPABILITIES);
            for c in ext {
                assert!(c.offset >= 0x100 && usize::from(c.offset) + 3 < b.len());
                assert_eq!(c.offset % 4, 0);
            }
        }
    }

    proptest! {
        #[test]
        fn never_panics_on_any_bytes(b in prop::collection::vec(any::<u8>(), 0..=4200)) {
            exercise(&b);
        }

        #[test]
        fn walks_terminate_within_bounds(b in header_like()) {
            exercise(&b);
        }

        #[test]
        fn walks_of_chained_lists(
            links in prop::collection::vec((any::<u8>(), any::<u8>()), 48),
            ext_links in prop::collection::vec((any::<u16>(), 0u16..0x1000), 64),
        ) {
            // Lists whose pointers mostly land on other entries: long chains, loops.
            let mut b = vec![0u8; 4096];
            b[0] = 0x86;
            b[6] = 0x10;
            b[0x34] = 0x40;
            for (i, (id, next)) in links.iter().enumerate() {
                let o = 0x40 + 4 * i;
                b[o] = *id;
                b[o + 1] = 0x40 | (next & 0xbf);
            }
            for (i, (id, next)) in ext_links.iter().enumerate() {
                let o = 0x100 + 8 * i;
                put32(&mut b, o, ext_header(*id | 1, 1, 0x100 + (next % 0x200) / 8 * 8));
            }
            exercise(&b);
        }
    }
}

#[cfg(test)]
mod vf_tests {
    use super::*;

    // The first 0x50 bytes of a QEMU NVMe VF's config space, as read from sysfs: ids read
    // 0xffff, the rest is real.
    const VF: [u8; 0x50] = [
        0xff, 0xff, 0xff, 0xff, 0x00, 0x00, 0x10, 0x00, 0x02, 0x02, 0x08, 0x01, 0, 0, 0, 0, //
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, //
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xf4, 0x1a, 0x00, 0x11, //
        0, 0, 0, 0, 0x40, 0, 0, 0, 0, 0, 0, 0, 0, 0x01, 0, 0, //
        0x11, 0x00, 0x00, 0x00, 0x00, 0x20, 0x00, 0x00, 0x00, 0x30, 0, 0, 0, 0, 0, 0,
    ];

    #[test]
    fn a_vf_header_decodes_and_its_capabilities_walk() {
        let h = parse_header(&VF).unwrap();
        assert_eq!((h.vendor.0, h.device.0), (0xffff, 0xffff));
        assert_eq!(h.class.value(), 0x010802);
        assert_eq!(
            capabilities(&VF).unwrap(),
            vec![Capability {
                id: cap_id::MSIX,
                offset: 0x40
            }]
        );
    }

    #[test]
    fn only_all_ones_is_gone() {
        assert!(is_device_gone(&parse_header(&[0xff; 64]).unwrap_err()));
    }
}

#[cfg(test)]
mod cardbus_tests {
    use super::*;

    /// The configuration space of a TI PCI1510 CardBus bridge (header type 2), as a laptop
    /// reports it: capabilities pointer at 0x14 (0xa0, Power Management), and at 0x34 the
    /// low byte of I/O base 1 (0x00), where a type 0 or 1 header keeps its pointer.
    pub(crate) fn ti_pci1510() -> Vec<u8> {
        let mut b = vec![0u8; 256];
        let head: [u8; 0x48] = [
            0x4c, 0x10, 0x56, 0xac, 0x07, 0x00, 0x10, 0x02, 0x00, 0x00, 0x07, 0x06, 0x08, 0xa8, 0x02,
            0x00, //
            0x00, 0x00, 0x00, 0xc0, 0xa0, 0x00, 0x00, 0x02, 0x02, 0x03, 0x06, 0xb0, 0x00, 0x00, 0x00,
            0x88, //
            0x00, 0xf0, 0xff, 0x8b, 0x00, 0x00, 0x00, 0x8c, 0x00, 0xf0, 0xff, 0x8f, 0x00, 0x40, 0x00,
            0x00, //
            0xfc, 0x40, 0x00, 0x00, 0x00, 0x44, 0x00, 0x00, 0xfc, 0x44, 0x00, 0x00, 0x0b, 0x01, 0x80,
            0x05, //
            0x3c, 0x10, 0x2d, 0x30, 0x01, 0x00, 0x00, 0x00,
        ];
        b[..head.len()].copy_from_slice(&head);
        // PM capability, version 2, last in the list; D1 and D2 supported, PME from D0-D3hot.
        b[0xa0..0xa8].copy_from_slice(&[0x01, 0x00, 0x02, 0x7e, 0x00, 0x00, 0x00, 0x00]);
        b
    }

    #[test]
    fn a_cardbus_bridge_keeps_its_capability_pointer_at_0x14() {
        let b = ti_pci1510();
        let h = parse_header(&b).unwrap();
        assert_eq!((h.vendor.0, h.device.0, h.header_type), (0x104c, 0xac56, 2));
        assert_eq!(h.capabilities_pointer, Some(0xa0));
        assert_eq!(
            capabilities(&b).unwrap(),
            [Capability {
                id: cap_id::PM,
                offset: 0xa0
            }]
        );
        assert_eq!(find_capability(&b, cap_id::PM), Some(0xa0));
        // A value at 0x34 (I/O base 1 here) is not a pointer in this layout.
        let mut b = ti_pci1510();
        b[0x34] = 0x80;
        assert_eq!(capabilities(&b).unwrap().len(), 1);
    }

    #[test]
    fn unknown_header_layouts_have_no_capability_list() {
        // The kernel (pci_bus_find_cap_start) and lspci walk no list for header types
        // other than 0, 1 and 2: where the pointer would be is unknown.
        let mut b = ti_pci1510();
        b[0x0e] = 0x03;
        b[0x34] = 0xa0;
        assert_eq!(parse_header(&b).unwrap().capabilities_pointer, None);
        assert_eq!(capabilities(&b).unwrap(), []);
    }
}
