//! Decoded capabilities, as `lspci -vv` shows them: power management, MSI, MSI-X, PCI
//! Express (device type, link capabilities and status), and BAR sizes in lspci's units.
//!
//! Pure functions over config-space bytes and a capability's offset (from
//! [`crate::config::capabilities`]); a register past the end of the bytes gives `None`.
//! Each decoded value displays as lspci's lines (joined by `\n`, without indentation).
//! SR-IOV is [`crate::config::sriov_capability`]; [`SriovText`] displays it.

use std::fmt;

use crate::config::{Capability, SriovCapability, cap_id};

fn u16_at(bytes: &[u8], offset: usize) -> Option<u16> {
    let b = bytes.get(offset..offset.checked_add(2)?)?;
    Some(u16::from_le_bytes(b.try_into().ok()?))
}

fn u32_at(bytes: &[u8], offset: usize) -> Option<u32> {
    let b = bytes.get(offset..offset.checked_add(4)?)?;
    Some(u32::from_le_bytes(b.try_into().ok()?))
}

fn flag(yes: bool) -> char {
    if yes { '+' } else { '-' }
}

/// A size as lspci prints BAR sizes: the largest of bytes, K, M, G, T that divides it
/// (`512K`, `16M`, `1536` for 1.5 KiB).
pub fn format_size(size: u64) -> String {
    const SUFFIX: [&str; 5] = ["", "K", "M", "G", "T"];
    let (mut x, mut i) = (size, 0);
    while i < SUFFIX.len() - 1 && x != 0 && x % 1024 == 0 {
        x /= 1024;
        i += 1;
    }
    format!("{x}{}", SUFFIX[i])
}

/// The Power Management capability (id 01).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PowerManagement {
    /// PMC version (bits 2:0).
    pub version: u8,
    /// PME clock.
    pub pme_clock: bool,
    /// Device-specific initialization.
    pub dsi: bool,
    /// Auxiliary current in mA (from the 3-bit code).
    pub aux_current_ma: u16,
    /// D1 supported.
    pub d1: bool,
    /// D2 supported.
    pub d2: bool,
    /// PME from D0, D1, D2, D3hot, D3cold (bits 0..5).
    pub pme_support: u8,
    /// Power state now: 0 to 3 (D0..D3hot).
    pub power_state: u8,
    /// No soft reset on D3hot to D0.
    pub no_soft_reset: bool,
    /// PME enable.
    pub pme_enable: bool,
    /// Data select.
    pub data_select: u8,
    /// Data scale.
    pub data_scale: u8,
    /// PME status.
    pub pme_status: bool,
}

/// Decodes the Power Management capability at `offset`.
pub fn power_management(bytes: &[u8], offset: usize) -> Option<PowerManagement> {
    let pmc = u16_at(bytes, offset + 2)?;
    let csr = u16_at(bytes, offset + 4)?;
    const AUX: [u16; 8] = [0, 55, 100, 160, 220, 270, 320, 375];
    Some(PowerManagement {
        version: (pmc & 7) as u8,
        pme_clock: pmc & 1 << 3 != 0,
        dsi: pmc & 1 << 5 != 0,
        aux_current_ma: AUX[usize::from((pmc >> 6) & 7)],
        d1: pmc & 1 << 9 != 0,
        d2: pmc & 1 << 10 != 0,
        pme_support: (pmc >> 11) as u8,
        power_state: (csr & 3) as u8,
        no_soft_reset: csr & 1 << 3 != 0,
        pme_enable: csr & 1 << 8 != 0,
        data_select: ((csr >> 9) & 0xf) as u8,
        data_scale: ((csr >> 13) & 3) as u8,
        pme_status: csr & 1 << 15 != 0,
    })
}

impl fmt::Display for PowerManagement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let pme = |i: u8| flag(self.pme_support & (1 << i) != 0);
        writeln!(f, "Power Management version {}", self.version)?;
        writeln!(
            f,
            "Flags: PMEClk{} DSI{} D1{} D2{} AuxCurrent={}mA PME(D0{},D1{},D2{},D3hot{},D3cold{})",
            flag(self.pme_clock),
            flag(self.dsi),
            flag(self.d1),
            flag(self.d2),
            self.aux_current_ma,
            pme(0),
            pme(1),
            pme(2),
            pme(3),
            pme(4)
        )?;
        write!(
            f,
            "Status: D{} NoSoftRst{} PME-Enable{} DSel={} DScale={} PME{}",
            self.power_state,
            flag(self.no_soft_reset),
            flag(self.pme_enable),
            self.data_select,
            self.data_scale,
            flag(self.pme_status)
        )
    }
}

/// The MSI capability (id 05).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Msi {
    /// MSI enable.
    pub enable: bool,
    /// Vectors the function can ask for (1 to 32).
    pub vectors_capable: u8,
    /// Vectors enabled.
    pub vectors_enabled: u8,
    /// 64-bit message address.
    pub is_64bit: bool,
    /// Per-vector masking.
    pub maskable: bool,
}

/// Decodes the MSI capability at `offset`.
pub fn msi(bytes: &[u8], offset: usize) -> Option<Msi> {
    let ctl = u16_at(bytes, offset + 2)?;
    // Codes 6 and 7 are reserved; shifts of up to 7 still fit in a u8.
    Some(Msi {
        enable: ctl & 1 != 0,
        vectors_capable: 1 << ((ctl >> 1) & 7),
        vectors_enabled: 1 << ((ctl >> 4) & 7),
        is_64bit: ctl & 1 << 7 != 0,
        maskable: ctl & 1 << 8 != 0,
    })
}

impl fmt::Display for Msi {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "MSI: Enable{} Count={}/{} Maskable{} 64bit{}",
            flag(self.enable),
            self.vectors_enabled,
            self.vectors_capable,
            flag(self.maskable),
            flag(self.is_64bit)
        )
    }
}

/// The MSI-X capability (id 11).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MsiX {
    /// MSI-X enable.
    pub enable: bool,
    /// Function mask (every vector masked).
    pub masked: bool,
    /// Table size: how many vectors (1 to 2048).
    pub count: u16,
    /// The BAR holding the vector table (BIR).
    pub table_bar: u8,
    /// The table's offset in that BAR.
    pub table_offset: u32,
    /// The BAR holding the pending bit array.
    pub pba_bar: u8,
    /// The PBA's offset in that BAR.
    pub pba_offset: u32,
}

/// Decodes the MSI-X capability at `offset`.
pub fn msix(bytes: &[u8], offset: usize) -> Option<MsiX> {
    let ctl = u16_at(bytes, offset + 2)?;
    let table = u32_at(bytes, offset + 4)?;
    let pba = u32_at(bytes, offset + 8)?;
    Some(MsiX {
        enable: ctl & 1 << 15 != 0,
        masked: ctl & 1 << 14 != 0,
        count: (ctl & 0x7ff) + 1,
        table_bar: (table & 7) as u8,
        table_offset: table & !7,
        pba_bar: (pba & 7) as u8,
        pba_offset: pba & !7,
    })
}

impl fmt::Display for MsiX {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "MSI-X: Enable{} Count={} Masked{}",
            flag(self.enable),
            self.count,
            flag(self.masked)
        )?;
        writeln!(
            f,
            "Vector table: BAR={} offset={:08x}",
            self.table_bar, self.table_offset
        )?;
        write!(f, "PBA: BAR={} offset={:08x}", self.pba_bar, self.pba_offset)
    }
}

/// A PCIe link speed code (LnkCap/LnkSta bits 3:0) as lspci prints it.
pub fn link_speed_text(code: u8) -> &'static str {
    match code {
        1 => "2.5GT/s",
        2 => "5GT/s",
        3 => "8GT/s",
        4 => "16GT/s",
        5 => "32GT/s",
        6 => "64GT/s",
        _ => "unknown",
    }
}

/// The PCI Express capability (id 10): the device type and its link.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PciExpress {
    /// Capability version (bits 3:0).
    pub version: u8,
    /// Device/port type (bits 7:4): 0 endpoint, 4 root port, 5 upstream port, ...
    pub port_type: u8,
    /// Slot implemented (root and downstream ports).
    pub slot: bool,
    /// Interrupt message number (bits 13:9).
    pub interrupt_message: u8,
    /// Link Capabilities and Status, `None` for types without a link (root complex
    /// integrated endpoints and event collectors).
    pub link: Option<ExpressLink>,
}

/// LnkCap and LnkSta of the PCI Express capability.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ExpressLink {
    /// Port number (LnkCap bits 31:24).
    pub port: u8,
    /// Max link speed code (LnkCap bits 3:0): 1 = 2.5 GT/s ... 6 = 64 GT/s.
    pub max_speed: u8,
    /// Max link width (LnkCap bits 9:4).
    pub max_width: u8,
    /// ASPM support (LnkCap bits 11:10): 1 L0s, 2 L1, 3 both.
    pub aspm: u8,
    /// Current link speed code (LnkSta bits 3:0).
    pub speed: u8,
    /// Negotiated link width (LnkSta bits 9:4).
    pub width: u8,
}

impl PciExpress {
    /// The device type as lspci names it.
    pub fn type_name(&self) -> String {
        let slot = flag(self.slot);
        match self.port_type {
            0 => "Endpoint".into(),
            1 => "Legacy Endpoint".into(),
            4 => format!("Root Port (Slot{slot})"),
            5 => "Upstream Port".into(),
            6 => format!("Downstream Port (Slot{slot})"),
            7 => "PCI-Express to PCI/PCI-X Bridge".into(),
            8 => "PCI/PCI-X to PCI-Express Bridge".into(),
            9 => "Root Complex Integrated Endpoint".into(),
            10 => "Root Complex Event Collector".into(),
            t => format!("Unknown type {t}"),
        }
    }
}

/// Decodes the PCI Express capability at `offset`.
pub fn pci_express(bytes: &[u8], offset: usize) -> Option<PciExpress> {
    let caps = u16_at(bytes, offset + 2)?;
    let port_type = ((caps >> 4) & 0xf) as u8;
    let link = if matches!(port_type, 9 | 10) {
        None
    } else {
        let cap = u32_at(bytes, offset + 0x0c)?;
        let sta = u16_at(bytes, offset + 0x12)?;
        Some(ExpressLink {
            port: (cap >> 24) as u8,
            max_speed: (cap & 0xf) as u8,
            max_width: ((cap >> 4) & 0x3f) as u8,
            aspm: ((cap >> 10) & 3) as u8,
            speed: (sta & 0xf) as u8,
            width: ((sta >> 4) & 0x3f) as u8,
        })
    };
    Some(PciExpress {
        version: (caps & 0xf) as u8,
        port_type,
        slot: caps & 1 << 8 != 0,
        interrupt_message: ((caps >> 9) & 0x1f) as u8,
        link,
    })
}

impl fmt::Display for PciExpress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Express (v{}) {}, MSI {:02x}",
            self.version,
            self.type_name(),
            self.interrupt_message
        )?;
        if let Some(l) = &self.link {
            let aspm = match l.aspm {
                0 => "not supported",
                1 => "L0s",
                2 => "L1",
                _ => "L0s L1",
            };
            write!(
                f,
                "\nLnkCap: Port #{}, Speed {}, Width x{}, ASPM {aspm}",
                l.port,
                link_speed_text(l.max_speed),
                l.max_width
            )?;
            write!(
                f,
                "\nLnkSta: Speed {}, Width x{}",
                link_speed_text(l.speed),
                l.width
            )?;
        }
        Ok(())
    }
}

/// A standard capability decoded, for those this module knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Decoded {
    /// Power Management.
    PowerManagement(PowerManagement),
    /// MSI.
    Msi(Msi),
    /// MSI-X.
    MsiX(MsiX),
    /// PCI Express.
    Express(PciExpress),
}

/// Decodes `cap` when its kind is known and its registers are within `bytes`.
pub fn decode(bytes: &[u8], cap: &Capability) -> Option<Decoded> {
    let at = usize::from(cap.offset);
    match cap.id {
        cap_id::PM => power_management(bytes, at).map(Decoded::PowerManagement),
        cap_id::MSI => msi(bytes, at).map(Decoded::Msi),
        cap_id::MSIX => msix(bytes, at).map(Decoded::MsiX),
        cap_id::EXP => pci_express(bytes, at).map(Decoded::Express),
        _ => None,
    }
}

impl fmt::Display for Decoded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Decoded::PowerManagement(x) => x.fmt(f),
            Decoded::Msi(x) => x.fmt(f),
            Decoded::MsiX(x) => x.fmt(f),
            Decoded::Express(x) => x.fmt(f),
        }
    }
}

/// Displays an SR-IOV capability as lspci's lines.
pub struct SriovText<'a>(pub &'a SriovCapability);

impl fmt::Display for SriovText<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.0;
        writeln!(
            f,
            "Initial VFs: {}, Total VFs: {}, Number of VFs: {}",
            s.initial_vfs, s.total_vfs, s.num_vfs
        )?;
        write!(
            f,
            "VF offset: {}, stride: {}, Device ID: {:04x}",
            s.vf_offset, s.vf_stride, s.vf_device
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::capabilities;
    use proptest::prelude::*;

    #[test]
    fn sizes_as_lspci_prints_them() {
        assert_eq!(format_size(0), "0");
        assert_eq!(format_size(1536), "1536");
        assert_eq!(format_size(4096), "4K");
        assert_eq!(format_size(512 << 10), "512K");
        assert_eq!(format_size(16 << 20), "16M");
        assert_eq!(format_size(8 << 30), "8G");
        assert_eq!(format_size(1 << 40), "1T");
        assert_eq!(format_size(1 << 50), "1024T");
        assert_eq!(format_size(u64::MAX), u64::MAX.to_string());
    }

    /// Config space of QEMU's NVMe controller (1b36:0010) as a q35 guest's kernel shows
    /// it (fixtures/qemu-q35-sriov-nvme.pcifix, 0000:01:00.0): MSI-X at 0x40, PCIe at 0x80,
    /// PM at 0x60; the expected lines are lspci 3.9's (`lspci -vv` of that fixture).
    fn qemu_nvme() -> Vec<u8> {
        let fixture = include_str!("../fixtures/qemu-q35-sriov-nvme.pcifix");
        let f = crate::fixture::parse(fixture).unwrap();
        f.entries
            .into_iter()
            .find_map(|e| match e.kind {
                crate::fixture::EntryKind::File(contents) if e.path.ends_with("0000:01:00.0/config") => {
                    Some(contents)
                }
                _ => None,
            })
            .unwrap()
    }

    #[test]
    fn qemu_nvme_capabilities_decode_as_lspci_shows_them() {
        let cfg = qemu_nvme();
        let text: Vec<String> = capabilities(&cfg)
            .unwrap()
            .iter()
            .filter_map(|c| decode(&cfg, c))
            .map(|d| d.to_string())
            .collect();
        let all = text.join("\n");
        assert!(all.contains("MSI-X: Enable+ Count=2 Masked-"), "{all}");
        assert!(all.contains("Vector table: BAR=0 offset=00002000"), "{all}");
        assert!(all.contains("PBA: BAR=0 offset=00003000"), "{all}");
        assert!(all.contains("Express (v2) Endpoint, MSI 00"), "{all}");
        assert!(all.contains("LnkSta: Speed 2.5GT/s, Width x1"), "{all}");
        assert!(all.contains("Power Management version 3"), "{all}");
        assert!(
            all.contains("Status: D0 NoSoftRst+ PME-Enable- DSel=0 DScale=0 PME-"),
            "{all}"
        );
        let sriov = crate::config::sriov_capability(&cfg).unwrap().unwrap();
        assert_eq!(
            SriovText(&sriov).to_string(),
            "Initial VFs: 2, Total VFs: 2, Number of VFs: 2\nVF offset: 1, stride: 1, Device ID: 0010"
        );
    }

    #[test]
    fn msi_fields() {
        let mut b = vec![0u8; 0x60];
        b[0x50] = cap_id::MSI;
        // Enable, 32 capable, 4 enabled, 64-bit, maskable.
        b[0x52..0x54].copy_from_slice(&(1u16 | 5 << 1 | 2 << 4 | 1 << 7 | 1 << 8).to_le_bytes());
        let m = msi(&b, 0x50).unwrap();
        assert_eq!(m.to_string(), "MSI: Enable+ Count=4/32 Maskable+ 64bit+");
        assert_eq!(msi(&b[..0x53], 0x50), None);
    }

    #[test]
    fn express_link_and_types() {
        let mut b = vec![0u8; 0x100];
        // v2 root port with a slot; LnkCap 8 GT/s x16 L0s L1 port 3; LnkSta 2.5 GT/s x4.
        b[0x82..0x84].copy_from_slice(&(2u16 | 4 << 4 | 1 << 8).to_le_bytes());
        b[0x8c..0x90].copy_from_slice(&(3u32 | 16 << 4 | 3 << 10 | 3 << 24).to_le_bytes());
        b[0x92..0x94].copy_from_slice(&(1u16 | 4 << 4).to_le_bytes());
        let e = pci_express(&b, 0x80).unwrap();
        assert_eq!(
            e.to_string(),
            "Express (v2) Root Port (Slot+), MSI 00\nLnkCap: Port #3, Speed 8GT/s, Width x16, ASPM L0s L1\n\
             LnkSta: Speed 2.5GT/s, Width x4"
        );
        // An integrated endpoint has no link registers to read.
        b[0x82] = 2 | 9 << 4;
        assert_eq!(pci_express(&b[..0x88], 0x80).unwrap().link, None);
    }

    proptest! {
        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300), offset in any::<u8>(), id in any::<u8>()) {
            let cap = Capability { id, offset };
            if let Some(d) = decode(&bytes, &cap) {
                let _ = d.to_string();
            }
            for c in capabilities(&bytes).unwrap_or_default() {
                let _ = decode(&bytes, &c).map(|d| d.to_string());
            }
            let _ = format_size(u64::from(offset) << 40);
        }
    }
}
