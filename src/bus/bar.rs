//! What a driver can learn about a device's BARs and other regions without mapping them:
//! [`BarInfo`] ([`DeviceBacking::bar_info`]) and [`DeviceRegion`]
//! ([`DeviceBacking::regions`]).
//!
//! A BAR's facts come from two places, as the kernel's own PCI core has them: its size
//! and whether it may be mmapped from VFIO's region info (vfio-pci sized it at boot), its
//! kind and prefetchability from the flag bits of its config-space register (bits 3:0),
//! read, never written: sizing a BAR by writing all-ones would move it under a live
//! mapping.
//!
//! [`DeviceBacking::bar_info`]: super::backing::DeviceBacking::bar_info
//! [`DeviceBacking::regions`]: super::backing::DeviceBacking::regions

use std::ops::Range;

use crate::vfio::{RegionFlags, RegionInfo};

/// Offset of BAR 0's register in config space; BAR `n` is at `BAR0 + 4 * n`.
pub const BAR0: u64 = 0x10;

/// VFIO's first device-specific region index (`VFIO_PCI_NUM_REGIONS`): 0–5 are the BARs,
/// 6 the ROM, 7 config space, 8 VGA.
pub const FIRST_DEVICE_REGION: u32 = 9;

/// What kind of BAR a BAR slot holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BarKind {
    /// Nothing: the device implements no BAR here, or the slot is the upper half of the
    /// 64-bit BAR before it.
    Absent,
    /// Memory, decoded below 4 GiB (type 00; also the legacy "below 1 MiB" type 01).
    Memory32,
    /// Memory anywhere in the 64-bit space (type 10); the next slot holds its upper half.
    Memory64,
    /// I/O ports. Reached through VFIO's region read/write, never mmapped: 1-, 2- and
    /// 4-byte accesses only.
    Io,
}

impl BarKind {
    /// A short name for printing (`absent`, `mem32`, `mem64`, `io`).
    pub fn name(self) -> &'static str {
        match self {
            BarKind::Absent => "absent",
            BarKind::Memory32 => "mem32",
            BarKind::Memory64 => "mem64",
            BarKind::Io => "io",
        }
    }
}

/// The kind and prefetchability that a BAR register's flag bits say (bits 3:0; the
/// address bits are ignored). Never [`BarKind::Absent`]: whether a BAR exists is its
/// size's business. The reserved memory type 11 reads as [`BarKind::Memory32`]; an I/O
/// BAR is never prefetchable.
pub fn decode_bar_register(value: u32) -> (BarKind, bool) {
    if value & 1 != 0 {
        return (BarKind::Io, false);
    }
    let kind = match (value >> 1) & 0b11 {
        0b10 => BarKind::Memory64,
        _ => BarKind::Memory32,
    };
    (kind, value & 0b1000 != 0)
}

/// A BAR's facts, without mapping it. Build one with [`absent`](Self::absent),
/// [`memory32`](Self::memory32), [`memory64`](Self::memory64) or [`io`](Self::io) (a
/// test model describes its BARs so), then [`with_prefetchable`](Self::with_prefetchable)
/// and [`with_mmap_areas`](Self::with_mmap_areas).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct BarInfo {
    /// The BAR slot, 0–5.
    pub index: u32,
    /// What it is.
    pub kind: BarKind,
    /// Its size in bytes (0 when [`BarKind::Absent`]).
    pub size: u64,
    /// Whether it is prefetchable memory (reads have no side effects; may be mapped
    /// write-combining).
    pub prefetchable: bool,
    /// The parts of it that [`map_bar`](super::backing::DeviceBacking::map_bar) maps
    /// (offset ranges within the BAR), in order: accesses there are plain loads and
    /// stores; elsewhere in the BAR they are system calls (VFIO's region read/write), as
    /// for the MSI-X table the kernel keeps out of the mapping. Empty for an I/O BAR and
    /// for one the kernel will not let be mmapped; the whole BAR when nothing is cut out.
    pub mmap_areas: Vec<Range<u64>>,
}

impl BarInfo {
    /// No BAR in slot `index`.
    pub fn absent(index: u32) -> Self {
        BarInfo {
            index,
            kind: BarKind::Absent,
            size: 0,
            prefetchable: false,
            mmap_areas: Vec::new(),
        }
    }

    /// A 32-bit memory BAR of `size` bytes, not prefetchable, mapped whole.
    pub fn memory32(index: u32, size: u64) -> Self {
        Self::memory(index, size, BarKind::Memory32)
    }

    /// A 64-bit memory BAR of `size` bytes, not prefetchable, mapped whole.
    pub fn memory64(index: u32, size: u64) -> Self {
        Self::memory(index, size, BarKind::Memory64)
    }

    fn memory(index: u32, size: u64, kind: BarKind) -> Self {
        BarInfo {
            index,
            kind,
            size,
            prefetchable: false,
            mmap_areas: std::iter::once(0..size).filter(|r| !r.is_empty()).collect(),
        }
    }

    /// An I/O-port BAR of `size` bytes (never mmapped).
    pub fn io(index: u32, size: u64) -> Self {
        BarInfo {
            index,
            kind: BarKind::Io,
            size,
            prefetchable: false,
            mmap_areas: Vec::new(),
        }
    }

    /// The same, prefetchable or not (ignored for I/O and absent BARs).
    pub fn with_prefetchable(mut self, prefetchable: bool) -> Self {
        self.prefetchable = prefetchable && matches!(self.kind, BarKind::Memory32 | BarKind::Memory64);
        self
    }

    /// The same with these mmapped areas (empty: accesses go through system calls only).
    /// Areas reaching past the BAR are cut at its end, empty ones dropped; an I/O BAR
    /// keeps none.
    pub fn with_mmap_areas(mut self, areas: impl IntoIterator<Item = Range<u64>>) -> Self {
        self.mmap_areas = if self.kind == BarKind::Io {
            Vec::new()
        } else {
            let size = self.size;
            let mut areas: Vec<Range<u64>> = areas
                .into_iter()
                .map(|r| r.start.min(size)..r.end.min(size))
                .filter(|r| r.start < r.end)
                .collect();
            areas.sort_by_key(|r| r.start);
            areas
        };
        self
    }

    /// Whether the slot holds a BAR.
    pub fn exists(&self) -> bool {
        self.kind != BarKind::Absent && self.size > 0
    }

    /// Whether it is a 64-bit memory BAR (the next slot is its upper half).
    pub fn is_64bit(&self) -> bool {
        self.kind == BarKind::Memory64
    }

    /// Whether any of it is mmapped by `map_bar`.
    pub fn is_mappable(&self) -> bool {
        !self.mmap_areas.is_empty()
    }

    /// The flag bits (3:0) of the BAR's config-space register that describe it: what a
    /// model of the device puts in its config space.
    pub fn register_bits(&self) -> u32 {
        match self.kind {
            BarKind::Absent => 0,
            BarKind::Io => 1,
            BarKind::Memory32 => u32::from(self.prefetchable) << 3,
            BarKind::Memory64 => 0b100 | u32::from(self.prefetchable) << 3,
        }
    }

    /// The facts of a VFIO BAR region, given the value of its config-space register:
    /// size and mmapped areas from VFIO (its sparse-mmap capability included), kind and
    /// prefetchability from the register's flag bits. A region of size 0 is
    /// [`BarKind::Absent`] whatever the register says (the upper half of a 64-bit BAR
    /// holds address bits, not flags).
    pub fn from_vfio(region: &RegionInfo, register: u32) -> Self {
        if region.size == 0 {
            return Self::absent(region.index);
        }
        let (kind, prefetchable) = decode_bar_register(register);
        let info = BarInfo {
            index: region.index,
            kind,
            size: region.size,
            prefetchable,
            mmap_areas: Vec::new(),
        };
        info.with_mmap_areas(
            region
                .mmap_areas()
                .into_iter()
                .map(|(o, s)| o..o.saturating_add(s)),
        )
    }
}

/// A device-specific region (VFIO region index 9 and up): what a vendor's vfio-pci
/// variant or quirk exposes besides the BARs (Intel graphics' OpRegion, NVIDIA's NVLink
/// areas...), named by a type and subtype (`VFIO_REGION_INFO_CAP_TYPE`). Read and written
/// with [`read_region`](super::backing::DeviceBacking::read_region) and
/// [`write_region`](super::backing::DeviceBacking::write_region).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct DeviceRegion {
    /// The region index (9 and up for VFIO).
    pub index: u32,
    /// Its size in bytes.
    pub size: u64,
    /// `VFIO_REGION_TYPE_*` (bit 31 set: a PCI vendor's type, the vendor id in the low
    /// 16 bits; see [`vendor`](Self::vendor)); 0 when the kernel gave none.
    pub region_type: u32,
    /// The subtype, meaningful within the type.
    pub subtype: u32,
    /// Whether it may be read.
    pub readable: bool,
    /// Whether it may be written.
    pub writable: bool,
    /// Whether the kernel lets it be mmapped (not done by this crate).
    pub mappable: bool,
}

/// `VFIO_REGION_TYPE_PCI_VENDOR_TYPE`: the bit that makes a region type a PCI vendor's.
const VENDOR_TYPE: u32 = 1 << 31;

impl DeviceRegion {
    /// A readable and writable region of `size` bytes of this type and subtype.
    pub fn new(index: u32, size: u64, region_type: u32, subtype: u32) -> Self {
        DeviceRegion {
            index,
            size,
            region_type,
            subtype,
            readable: true,
            writable: true,
            mappable: false,
        }
    }

    /// The same, read-only.
    pub fn read_only(mut self) -> Self {
        self.writable = false;
        self
    }

    /// The PCI vendor whose type this is, when it is a vendor type.
    pub fn vendor(&self) -> Option<u16> {
        (self.region_type & VENDOR_TYPE != 0).then_some(self.region_type as u16)
    }

    /// The device-specific region that VFIO's info describes; `None` for the standard
    /// regions (index below [`FIRST_DEVICE_REGION`]) and for empty ones.
    pub fn from_vfio(region: &RegionInfo) -> Option<Self> {
        if region.index < FIRST_DEVICE_REGION || region.size == 0 {
            return None;
        }
        let (region_type, subtype) = region.region_type.unwrap_or((0, 0));
        Some(DeviceRegion {
            index: region.index,
            size: region.size,
            region_type,
            subtype,
            readable: region.flags.contains(RegionFlags::READ),
            writable: region.flags.contains(RegionFlags::WRITE),
            mappable: region.flags.contains(RegionFlags::MMAP),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn region(index: u32, size: u64, flags: RegionFlags, sparse: Option<Vec<(u64, u64)>>) -> RegionInfo {
        RegionInfo {
            index,
            flags,
            size,
            offset: u64::from(index) << 40,
            sparse_mmap: sparse,
            msix_mappable: false,
            region_type: None,
        }
    }

    const RWM: RegionFlags = RegionFlags::READ
        .union(RegionFlags::WRITE)
        .union(RegionFlags::MMAP);

    #[test]
    fn register_bits_say_the_kind() {
        assert_eq!(decode_bar_register(0xfebf_0000), (BarKind::Memory32, false));
        assert_eq!(decode_bar_register(0xfe00_000c), (BarKind::Memory64, true));
        assert_eq!(decode_bar_register(0x0000_0004), (BarKind::Memory64, false));
        assert_eq!(decode_bar_register(0x0000_c001), (BarKind::Io, false));
        // An I/O BAR's bit 3 is an address bit, not "prefetchable".
        assert_eq!(decode_bar_register(0x0000_c009), (BarKind::Io, false));
        // Legacy "below 1 MiB" and the reserved type read as 32-bit memory.
        assert_eq!(decode_bar_register(0x2), (BarKind::Memory32, false));
        assert_eq!(decode_bar_register(0x6), (BarKind::Memory32, false));
    }

    #[test]
    fn an_nvme_bar0_with_its_msix_table_cut_out() {
        let r = region(
            0,
            0x4000,
            RWM | RegionFlags::CAPS,
            Some(vec![(0, 0x2000), (0x3000, 0x1000)]),
        );
        let info = BarInfo::from_vfio(&r, 0xfebf_0004);
        assert_eq!(info.kind, BarKind::Memory64);
        assert!(info.is_64bit() && !info.prefetchable && info.is_mappable());
        assert_eq!(info.mmap_areas, vec![0..0x2000, 0x3000..0x4000]);
        assert_eq!(info.register_bits(), 0b100);
    }

    #[test]
    fn an_e1000e_io_bar_is_never_mapped() {
        // vfio-pci never sets MMAP on an I/O BAR; even if it did, it would not be mapped.
        let info = BarInfo::from_vfio(&region(2, 0x20, RWM, None), 0xc041);
        assert_eq!(info, BarInfo::io(2, 0x20));
        assert!(!info.is_mappable() && info.exists());
        assert_eq!(info.register_bits(), 1);
    }

    #[test]
    fn an_empty_region_is_absent_whatever_its_register_holds() {
        // The upper half of a 64-bit BAR: address bits, which decode as I/O here.
        let info = BarInfo::from_vfio(&region(1, 0, RegionFlags::READ, None), 0x0000_0001);
        assert_eq!(info, BarInfo::absent(1));
        assert!(!info.exists());
    }

    #[test]
    fn a_region_without_mmap_has_no_areas() {
        let info = BarInfo::from_vfio(&region(0, 0x100, RegionFlags::READ | RegionFlags::WRITE, None), 0);
        assert_eq!(info.kind, BarKind::Memory32);
        assert!(!info.is_mappable());
    }

    #[test]
    fn device_regions_are_index_nine_and_up() {
        let mut r = region(9, 0x2000, RegionFlags::READ, None);
        r.region_type = Some((VENDOR_TYPE | 0x8086, 1));
        let d = DeviceRegion::from_vfio(&r).unwrap();
        assert_eq!(
            d,
            DeviceRegion::new(9, 0x2000, VENDOR_TYPE | 0x8086, 1).read_only()
        );
        assert_eq!(d.vendor(), Some(0x8086));
        assert_eq!(DeviceRegion::new(10, 8, 1, 1).vendor(), None);
        assert!(DeviceRegion::from_vfio(&region(7, 256, RWM, None)).is_none());
        assert!(DeviceRegion::from_vfio(&region(9, 0, RWM, None)).is_none());
    }

    proptest! {
        // Whatever VFIO and the register say, the result is self-consistent.
        #[test]
        fn vfio_bar_facts_are_consistent(
            size in any::<u64>(),
            flags in any::<u32>(),
            register in any::<u32>(),
            sparse in proptest::option::of(proptest::collection::vec((any::<u64>(), any::<u64>()), 0..8)),
        ) {
            let info = BarInfo::from_vfio(&region(3, size, RegionFlags::from_bits_retain(flags), sparse), register);
            prop_assert_eq!(info.exists(), size > 0);
            prop_assert!(info.mmap_areas.iter().all(|r| r.start < r.end && r.end <= info.size));
            prop_assert!(info.kind != BarKind::Io || (info.mmap_areas.is_empty() && !info.prefetchable));
            if info.exists() {
                prop_assert_eq!(decode_bar_register(info.register_bits()), (info.kind, info.prefetchable));
            }
        }

    }
}
