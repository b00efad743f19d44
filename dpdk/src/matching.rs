//! Which driver takes which device, and in which IOVA mode: the safe half of the bus's
//! `probe` and `get_iommu_class` (DPDK 22.11's `rte_pci_match`, `pci_device_iova_mode`
//! and `rte_pci_get_iommu_class`).

use core::ffi::c_int;

use crate::ffi::types::RtePciId;
use crate::ffi::types::measured::{
    RTE_CLASS_ANY_ID, RTE_IOVA_DC, RTE_IOVA_PA, RTE_IOVA_VA, RTE_PCI_ANY_ID, RTE_PCI_DRV_NEED_IOVA_AS_VA,
    RTE_PCI_KDRV_IGB_UIO, RTE_PCI_KDRV_UIO_GENERIC, RTE_PCI_KDRV_VFIO,
};

/// Whether one entry of a driver's id table matches the device's ids: each field equal or
/// the wildcard (`RTE_PCI_ANY_ID`, `RTE_CLASS_ANY_ID` for the class).
pub fn entry_matches(entry: &RtePciId, dev: &RtePciId) -> bool {
    let field = |want: u16, have: u16| want == have || want == RTE_PCI_ANY_ID;
    field(entry.vendor_id, dev.vendor_id)
        && field(entry.device_id, dev.device_id)
        && field(entry.subsystem_vendor_id, dev.subsystem_vendor_id)
        && field(entry.subsystem_device_id, dev.subsystem_device_id)
        && (entry.class_id == dev.class_id || entry.class_id == RTE_CLASS_ANY_ID)
}

/// Whether any entry of `table` (the entries before the one with `vendor_id == 0`)
/// matches.
pub fn table_matches(table: &[RtePciId], dev: &RtePciId) -> bool {
    table.iter().any(|e| entry_matches(e, dev))
}

/// The IOVA mode a driver needs for a device (`pci_device_iova_mode`): PA under VFIO's
/// no-IOMMU mode and for UIO, VA when the driver says `NEED_IOVA_AS_VA` (on VFIO or any
/// other binding), else don't-care.
pub fn device_iova_mode(drv_flags: u32, kdrv: c_int, vfio_noiommu: bool) -> c_int {
    let wants_va = drv_flags & RTE_PCI_DRV_NEED_IOVA_AS_VA != 0;
    match kdrv {
        k if k == RTE_PCI_KDRV_VFIO => {
            if vfio_noiommu {
                RTE_IOVA_PA
            } else if wants_va {
                RTE_IOVA_VA
            } else {
                RTE_IOVA_DC
            }
        }
        k if k == RTE_PCI_KDRV_IGB_UIO || k == RTE_PCI_KDRV_UIO_GENERIC => RTE_IOVA_PA,
        _ if wants_va => RTE_IOVA_VA,
        _ => RTE_IOVA_DC,
    }
}

/// What the bus tells EAL (`rte_pci_get_iommu_class`): given whether the IOMMU can do VA
/// (`None`: no device to ask) and the modes the matching drivers want.
pub fn iommu_class(iommu_va: Option<bool>, wanted: &[c_int]) -> (c_int, Option<&'static str>) {
    let want_va = wanted.contains(&RTE_IOVA_VA);
    let want_pa = wanted.contains(&RTE_IOVA_PA);
    if iommu_va == Some(false) {
        let warn = want_va.then_some(
            "some devices want 'VA' but the IOMMU does not support 'VA': they will not initialize",
        );
        (RTE_IOVA_PA, warn)
    } else if want_va && !want_pa {
        (RTE_IOVA_VA, None)
    } else if want_pa && !want_va {
        (RTE_IOVA_PA, None)
    } else {
        let warn = want_va.then_some(
            "some devices want 'VA' but forcing 'DC' because others want 'PA': not all devices may initialize",
        );
        (RTE_IOVA_DC, warn)
    }
}

/// Intel VT-d's MGAW (bits 21:16 of the capability register, plus one): the DMA mask the
/// stock bus hands `rte_mem_set_dma_mask`. `None` when the text is not a hex number.
pub fn vtd_mgaw(cap_text: &str) -> Option<u8> {
    let t = cap_text.trim();
    let t = t.strip_prefix("0x").unwrap_or(t);
    let cap = u64::from_str_radix(t, 16).ok()?;
    Some(((cap >> 16) & 0x3f) as u8 + 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ffi::types::measured::{RTE_PCI_DRV_NEED_MAPPING, RTE_PCI_KDRV_UNKNOWN};

    const DEV: RtePciId = RtePciId {
        class_id: 0x010802,
        vendor_id: 0x1b36,
        device_id: 0x0010,
        subsystem_vendor_id: 0x1af4,
        subsystem_device_id: 0x1100,
    };

    fn id(vendor: u16, device: u16, sv: u16, sd: u16, class: u32) -> RtePciId {
        RtePciId {
            class_id: class,
            vendor_id: vendor,
            device_id: device,
            subsystem_vendor_id: sv,
            subsystem_device_id: sd,
        }
    }

    #[test]
    fn id_table_wildcards_and_class() {
        let any = RTE_PCI_ANY_ID;
        assert!(entry_matches(
            &id(0x1b36, 0x0010, any, any, RTE_CLASS_ANY_ID),
            &DEV
        ));
        assert!(
            entry_matches(&id(any, any, any, any, 0x010802), &DEV),
            "class match"
        );
        assert!(!entry_matches(&id(any, any, any, any, 0x010801), &DEV));
        assert!(!entry_matches(
            &id(0x1b36, 0x0011, any, any, RTE_CLASS_ANY_ID),
            &DEV
        ));
        assert!(!entry_matches(
            &id(0x1b36, 0x0010, 0x8086, any, RTE_CLASS_ANY_ID),
            &DEV
        ));
        assert!(entry_matches(&id(0x1b36, 0x0010, 0x1af4, 0x1100, 0x010802), &DEV));
        assert!(table_matches(
            &[
                id(0x8086, 1, any, any, RTE_CLASS_ANY_ID),
                id(0x1b36, 0x10, any, any, RTE_CLASS_ANY_ID)
            ],
            &DEV
        ));
        assert!(!table_matches(&[], &DEV));
    }

    #[test]
    fn iova_mode_per_binding_and_flags() {
        let va = RTE_PCI_DRV_NEED_IOVA_AS_VA;
        assert_eq!(device_iova_mode(va, RTE_PCI_KDRV_VFIO, false), RTE_IOVA_VA);
        assert_eq!(device_iova_mode(va, RTE_PCI_KDRV_VFIO, true), RTE_IOVA_PA);
        assert_eq!(
            device_iova_mode(RTE_PCI_DRV_NEED_MAPPING, RTE_PCI_KDRV_VFIO, false),
            RTE_IOVA_DC
        );
        assert_eq!(device_iova_mode(va, RTE_PCI_KDRV_IGB_UIO, false), RTE_IOVA_PA);
        assert_eq!(device_iova_mode(0, RTE_PCI_KDRV_UIO_GENERIC, false), RTE_IOVA_PA);
        assert_eq!(device_iova_mode(va, RTE_PCI_KDRV_UNKNOWN, false), RTE_IOVA_VA);
        assert_eq!(device_iova_mode(0, RTE_PCI_KDRV_UNKNOWN, false), RTE_IOVA_DC);
    }

    #[test]
    fn iommu_class_combines_as_the_stock_bus() {
        assert_eq!(iommu_class(None, &[]).0, RTE_IOVA_DC);
        assert_eq!(
            iommu_class(Some(true), &[RTE_IOVA_VA, RTE_IOVA_DC]).0,
            RTE_IOVA_VA
        );
        assert_eq!(iommu_class(Some(true), &[RTE_IOVA_PA]).0, RTE_IOVA_PA);
        let (mode, warn) = iommu_class(Some(true), &[RTE_IOVA_PA, RTE_IOVA_VA]);
        assert_eq!(mode, RTE_IOVA_DC);
        assert!(warn.is_some());
        let (mode, warn) = iommu_class(Some(false), &[RTE_IOVA_VA]);
        assert_eq!(mode, RTE_IOVA_PA);
        assert!(warn.is_some());
        assert_eq!(iommu_class(Some(false), &[]), (RTE_IOVA_PA, None));
    }

    #[test]
    fn mgaw_from_the_vtd_capability() {
        // MGAW field 0x2f (48 bits - 1) at bits 21:16.
        assert_eq!(
            vtd_mgaw("d2008c40660462\n"),
            Some(((0xd2008c40660462u64 >> 16) & 0x3f) as u8 + 1)
        );
        assert_eq!(vtd_mgaw("2f0000"), Some(48));
        assert_eq!(vtd_mgaw("zz"), None);
    }
}
