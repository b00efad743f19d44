//! The pure decisions of mapping a vfio-pci device the way DPDK 22.11's
//! `drivers/bus/pci/linux/pci_vfio.c` does: which BARs to mmap and how (around the MSI-X
//! table), which interrupt index to use, where a region's bytes are in the device fd, and
//! the Command register bits. No system calls here; `super::sys` does those.

#![forbid(unsafe_code)]

use pcibus::config::{cap_id, find_capability};
use pcibus::vfio::{RegionFlags, RegionInfo};

/// `VFIO_PCI_INTX_IRQ_INDEX`.
pub const INTX: u32 = 0;
/// `VFIO_PCI_MSI_IRQ_INDEX`.
pub const MSI: u32 = 1;
/// `VFIO_PCI_MSIX_IRQ_INDEX`.
pub const MSIX: u32 = 2;
/// `VFIO_PCI_REQ_IRQ_INDEX`: the kernel's request to give the device back.
pub const REQ: u32 = 4;
/// `VFIO_PCI_CONFIG_REGION_INDEX`.
pub const CONFIG_REGION: u32 = 7;
/// BARs are regions 0 to 5.
pub const BARS: usize = 6;
/// `VFIO_IRQ_INFO_EVENTFD`: the index can signal an eventfd.
pub const IRQ_INFO_EVENTFD: u32 = 1;

/// Command register (config offset 4) bits.
pub const COMMAND: u64 = 0x04;
/// Memory Space Enable.
pub const COMMAND_MEMORY: u16 = 1 << 1;
/// Bus Master Enable.
pub const COMMAND_MASTER: u16 = 1 << 2;
/// BAR0's offset in config space; BAR `i` is at `BAR0 + 4 * i`.
pub const BAR0: u64 = 0x10;

/// Where the MSI-X vector table is: its BAR, its offset in the BAR, its size in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsixTable {
    /// The BAR holding the table (BIR).
    pub bar: u8,
    /// The table's offset in that BAR.
    pub offset: u64,
    /// 16 bytes per vector.
    pub size: u64,
}

/// The MSI-X table of a device from (at least) the first 256 bytes of its config space, as
/// 22.11's `pci_vfio_get_msix_bar`; `None` without an MSI-X capability.
pub fn msix_table(config: &[u8]) -> Option<MsixTable> {
    let at = find_capability(config, cap_id::MSIX)?;
    let cap = pcibus::capability::msix(config, at.into())?;
    Some(MsixTable {
        bar: cap.table_bar,
        offset: u64::from(cap.table_offset),
        size: 16 * u64::from(cap.count),
    })
}

/// Whether a BAR register (config offset `BAR0 + 4 * i`) describes an I/O BAR.
pub fn is_io_bar(register: u32) -> bool {
    register & 1 != 0
}

/// How one BAR is mapped into the process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BarPlan {
    /// Not mapped: no region, an I/O BAR, a region VFIO does not let us mmap, or a BAR the
    /// MSI-X table pages fill completely. `mem_resource[i].addr` stays null.
    Skip(&'static str),
    /// Reserve `len` bytes of address space (inaccessible), then mmap each part (offset in
    /// the BAR, length) at the same offset in the reservation. The whole BAR when no MSI-X
    /// table is in the way; around the table's pages otherwise (they stay inaccessible).
    Map {
        /// The size of the reservation: the region's size.
        len: u64,
        /// The parts to mmap from the device fd, as (offset in the BAR, length).
        parts: Vec<(u64, u64)>,
    },
}

fn align_down(x: u64, page: u64) -> u64 {
    x - x % page
}

fn align_up(x: u64, page: u64) -> u64 {
    x.div_ceil(page).saturating_mul(page)
}

/// The plan for BAR `bar`, as 22.11's `pci_vfio_map_resource_primary` and
/// `pci_vfio_mmap_bar` decide it: I/O BARs and regions without `VFIO_REGION_INFO_FLAG_MMAP`
/// are skipped; the MSI-X table's BAR (unless the region has the MSIX_MAPPABLE capability)
/// is mapped around the page-aligned span of the table, and skipped when that span covers
/// it whole. `page` is the system page size (a power of two).
pub fn bar_plan(bar: u8, info: &RegionInfo, io: bool, msix: Option<MsixTable>, page: u64) -> BarPlan {
    if io {
        return BarPlan::Skip("I/O port BAR (reached through rte_pci_ioport_*)");
    }
    if info.size == 0 {
        return BarPlan::Skip("no such BAR");
    }
    if !info.flags.contains(RegionFlags::MMAP) {
        return BarPlan::Skip("VFIO does not allow mmap of this region");
    }
    let size = info.size;
    let table = msix.filter(|t| t.bar == bar && !info.msix_mappable);
    let Some(t) = table else {
        return BarPlan::Map {
            len: size,
            parts: vec![(0, size)],
        };
    };
    let start = align_down(t.offset, page);
    let end = align_up(t.offset.saturating_add(t.size), page);
    if start == 0 && end >= size {
        return BarPlan::Skip("the MSI-X table's pages cover the whole BAR");
    }
    let mut parts = Vec::with_capacity(2);
    if start > 0 {
        parts.push((0, start.min(size)));
    }
    if end < size {
        parts.push((end, size - end));
    }
    BarPlan::Map { len: size, parts }
}

/// The fd offset of `offset` in a region at `region_offset` of `region_size` bytes, for an
/// access of `len` bytes; `None` when the access does not fit the region (a size of 0
/// means unknown: only overflow is checked).
pub fn region_pos(region_offset: u64, region_size: u64, offset: u64, len: usize) -> Option<u64> {
    let end = offset.checked_add(u64::try_from(len).ok()?)?;
    if region_size != 0 && end > region_size {
        return None;
    }
    region_offset.checked_add(offset)
}

/// The interrupt modes of `rte_eal_vfio_intr_mode()` (`enum rte_intr_mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IntrMode {
    /// `RTE_INTR_MODE_NONE`: not chosen on the command line; the best the device offers.
    Auto,
    /// `RTE_INTR_MODE_LEGACY`.
    Legacy,
    /// `RTE_INTR_MODE_MSI`.
    Msi,
    /// `RTE_INTR_MODE_MSIX`.
    Msix,
}

/// What the interrupt setup found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IrqChoice {
    /// The VFIO IRQ index (INTX, MSI or MSIX).
    pub index: u32,
    /// The vectors the index has.
    pub count: u32,
}

/// Why no interrupt index could be chosen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IrqError {
    /// `VFIO_DEVICE_GET_IRQ_INFO` failed for this index.
    Info(u32, String),
    /// The index asked for on the command line cannot signal an eventfd.
    NoEventfd(u32),
    /// No index the device has can signal an eventfd.
    NoneSuitable,
}

impl std::fmt::Display for IrqError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            IrqError::Info(i, e) => write!(f, "cannot get VFIO IRQ info of index {i}: {e}"),
            IrqError::NoEventfd(i) => write!(f, "interrupt index {i} does not support eventfd"),
            IrqError::NoneSuitable => write!(f, "no interrupt index with eventfd support"),
        }
    }
}

/// 22.11's `pci_vfio_setup_interrupts` choice: the index the mode names, or from MSI-X
/// down to INTx the first that signals an eventfd. `info(index)` returns the index's
/// (flags, count) from `VFIO_DEVICE_GET_IRQ_INFO`.
pub fn choose_irq(
    mode: IntrMode,
    mut info: impl FnMut(u32) -> Result<(u32, u32), String>,
) -> Result<IrqChoice, IrqError> {
    let wanted = match mode {
        IntrMode::Auto => None,
        IntrMode::Legacy => Some(INTX),
        IntrMode::Msi => Some(MSI),
        IntrMode::Msix => Some(MSIX),
    };
    for index in [MSIX, MSI, INTX] {
        if wanted.is_some_and(|w| w != index) {
            continue;
        }
        let (flags, count) = info(index).map_err(|e| IrqError::Info(index, e))?;
        if flags & IRQ_INFO_EVENTFD == 0 {
            if wanted.is_some() {
                return Err(IrqError::NoEventfd(index));
            }
            continue;
        }
        return Ok(IrqChoice { index, count });
    }
    Err(IrqError::NoneSuitable)
}

/// The Command register with Memory Space and Bus Master set (`master`) or Bus Master
/// cleared (`!master`), as 22.11 writes it when mapping and unmapping.
pub fn command_with(old: u16, master: bool) -> u16 {
    if master {
        old | COMMAND_MEMORY | COMMAND_MASTER
    } else {
        old & !COMMAND_MASTER
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(size: u64, flags: RegionFlags, msix_mappable: bool) -> RegionInfo {
        RegionInfo {
            index: 0,
            flags,
            size,
            offset: 0,
            sparse_mmap: None,
            msix_mappable,
            region_type: None,
        }
    }

    const RWM: RegionFlags = RegionFlags::READ
        .union(RegionFlags::WRITE)
        .union(RegionFlags::MMAP);
    const PAGE: u64 = 4096;

    fn table(bar: u8, offset: u64, vectors: u64) -> Option<MsixTable> {
        Some(MsixTable {
            bar,
            offset,
            size: 16 * vectors,
        })
    }

    #[test]
    fn plain_bar_is_mapped_whole() {
        let r = region(0x20000, RWM, false);
        assert_eq!(
            bar_plan(0, &r, false, None, PAGE),
            BarPlan::Map {
                len: 0x20000,
                parts: vec![(0, 0x20000)]
            }
        );
        // The table in another BAR does not matter.
        assert_eq!(
            bar_plan(0, &r, false, table(3, 0, 5), PAGE),
            BarPlan::Map {
                len: 0x20000,
                parts: vec![(0, 0x20000)]
            }
        );
    }

    #[test]
    fn io_absent_and_unmappable_bars_are_skipped() {
        assert!(matches!(
            bar_plan(0, &region(0x20, RWM, false), true, None, PAGE),
            BarPlan::Skip(_)
        ));
        assert!(matches!(
            bar_plan(1, &region(0, RWM, false), false, None, PAGE),
            BarPlan::Skip(_)
        ));
        let no_mmap = region(0x4000, RegionFlags::READ | RegionFlags::WRITE, false);
        assert!(matches!(
            bar_plan(2, &no_mmap, false, None, PAGE),
            BarPlan::Skip(_)
        ));
    }

    #[test]
    fn msix_table_in_the_middle_splits_the_bar_around_its_pages() {
        // 64 vectors at 0x2100 (0x400 bytes): pages 0x2000..0x3000 stay unmapped.
        let r = region(0x8000, RWM, false);
        assert_eq!(
            bar_plan(3, &r, false, table(3, 0x2100, 64), PAGE),
            BarPlan::Map {
                len: 0x8000,
                parts: vec![(0, 0x2000), (0x3000, 0x5000)]
            }
        );
    }

    #[test]
    fn msix_table_at_the_start_maps_only_after_it() {
        // e1000e (82574L): BAR3 16 KiB, table at 0 (5 vectors).
        let r = region(0x4000, RWM, false);
        assert_eq!(
            bar_plan(3, &r, false, table(3, 0, 5), PAGE),
            BarPlan::Map {
                len: 0x4000,
                parts: vec![(0x1000, 0x3000)]
            }
        );
    }

    #[test]
    fn msix_table_at_the_end_maps_only_before_it() {
        let r = region(0x4000, RWM, false);
        assert_eq!(
            bar_plan(1, &r, false, table(1, 0x3800, 8), PAGE),
            BarPlan::Map {
                len: 0x4000,
                parts: vec![(0, 0x3000)]
            }
        );
    }

    #[test]
    fn bar_filled_by_the_msix_table_is_skipped() {
        // virtio-net-pci: BAR1 is 4 KiB holding only the table.
        let r = region(0x1000, RWM, false);
        assert!(matches!(
            bar_plan(1, &r, false, table(1, 0, 3), PAGE),
            BarPlan::Skip(_)
        ));
    }

    #[test]
    fn msix_mappable_region_is_mapped_whole() {
        let r = region(0x1000, RWM, true);
        assert_eq!(
            bar_plan(1, &r, false, table(1, 0, 3), PAGE),
            BarPlan::Map {
                len: 0x1000,
                parts: vec![(0, 0x1000)]
            }
        );
    }

    fn config_with_msix(table_reg: u32, control: u16) -> Vec<u8> {
        let mut cfg = vec![0u8; 256];
        cfg[0..4].copy_from_slice(&[0xf4, 0x1a, 0x41, 0x10]);
        cfg[6] = 0x10; // capability list
        cfg[0x34] = 0x40;
        cfg[0x40] = cap_id::PM;
        cfg[0x41] = 0x50;
        cfg[0x50] = cap_id::MSIX;
        cfg[0x51] = 0;
        cfg[0x52..0x54].copy_from_slice(&control.to_le_bytes());
        cfg[0x54..0x58].copy_from_slice(&table_reg.to_le_bytes());
        cfg
    }

    #[test]
    fn msix_table_is_read_from_config_space() {
        // Table in BAR 1 at 0x800, 3 vectors (QSIZE = 2).
        let cfg = config_with_msix(0x800 | 1, 2);
        assert_eq!(
            msix_table(&cfg),
            Some(MsixTable {
                bar: 1,
                offset: 0x800,
                size: 48
            })
        );
        let mut plain = cfg.clone();
        plain[0x41] = 0; // PM only
        assert_eq!(msix_table(&plain), None);
        assert_eq!(msix_table(&cfg[..16]), None, "short config read");
    }

    #[test]
    fn io_bar_bit() {
        assert!(is_io_bar(0xc001));
        assert!(!is_io_bar(0xfebc_0000));
        assert!(!is_io_bar(0xfebc_000c)); // 64-bit prefetchable memory
    }

    #[test]
    fn region_pos_adds_and_bounds() {
        let config = 7u64 << 40;
        assert_eq!(region_pos(config, 4096, 4, 2), Some(config + 4));
        assert_eq!(region_pos(config, 4096, 4094, 2), Some(config + 4094));
        assert_eq!(region_pos(config, 4096, 4095, 2), None);
        assert_eq!(region_pos(config, 0, 1 << 20, 4), Some(config + (1 << 20)));
        assert_eq!(region_pos(u64::MAX, 0, 1, 1), None);
        assert_eq!(region_pos(0, 0, u64::MAX, 2), None);
    }

    fn flags(eventfd: &[u32]) -> impl FnMut(u32) -> Result<(u32, u32), String> {
        let eventfd = eventfd.to_vec();
        move |i| {
            Ok((
                u32::from(eventfd.contains(&i)) * IRQ_INFO_EVENTFD,
                if i == MSIX { 5 } else { 1 },
            ))
        }
    }

    #[test]
    fn auto_mode_prefers_msix_then_msi_then_intx() {
        assert_eq!(
            choose_irq(IntrMode::Auto, flags(&[MSIX, MSI, INTX])),
            Ok(IrqChoice {
                index: MSIX,
                count: 5
            })
        );
        assert_eq!(
            choose_irq(IntrMode::Auto, flags(&[MSI, INTX])),
            Ok(IrqChoice { index: MSI, count: 1 })
        );
        assert_eq!(
            choose_irq(IntrMode::Auto, flags(&[INTX])),
            Ok(IrqChoice {
                index: INTX,
                count: 1
            })
        );
        assert_eq!(
            choose_irq(IntrMode::Auto, flags(&[])),
            Err(IrqError::NoneSuitable)
        );
    }

    #[test]
    fn explicit_mode_takes_only_its_index() {
        let mut asked = Vec::new();
        let got = choose_irq(IntrMode::Legacy, |i| {
            asked.push(i);
            Ok((IRQ_INFO_EVENTFD, 1))
        });
        assert_eq!(
            got,
            Ok(IrqChoice {
                index: INTX,
                count: 1
            })
        );
        assert_eq!(asked, vec![INTX]);
        assert_eq!(
            choose_irq(IntrMode::Msi, flags(&[MSIX, INTX])),
            Err(IrqError::NoEventfd(MSI))
        );
        assert_eq!(
            choose_irq(IntrMode::Msix, |_| Err("EIO".into())),
            Err(IrqError::Info(MSIX, "EIO".into()))
        );
    }

    #[test]
    fn command_register_bits() {
        assert_eq!(command_with(0x0000, true), 0x0006);
        assert_eq!(command_with(0x0403, true), 0x0407);
        assert_eq!(command_with(0x0407, false), 0x0403);
    }
}
