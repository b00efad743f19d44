//! Compile-time checks of the hand-written ioctl structures and constants of [`super`]
//! against the kernel's uapi (`<linux/vfio.h>`, `<linux/iommufd.h>`): a wrong size, a
//! field at the wrong offset or a mistyped flag bit fails the build, not an ioctl.
//!
//! Where the numbers come from: `sizeof`, `offsetof` and the `#define`s, printed by a
//! throwaway C program that includes the headers (Debian's linux-libc-dev 6.1 for
//! `vfio.h`) and, for what 6.1's headers lack (iommufd, the cdev ioctls, the VF token of
//! `BIND_IOMMUFD`), the same program against the headers of a current kernel
//! (`include/uapi/linux/`). Structures the kernel has grown keep the size pcibus passes
//! as `argsz`; the kernel accepts any `argsz` from the oldest size on and zero-fills or
//! ignores the rest, so each check names the uapi version it matches.

use std::mem::{offset_of, size_of};

use super::*;

/// `size_of::<T>() == size`, and each `(offset_of!(T, field), offset)` pair equal.
macro_rules! layout {
    ($t:ty, $size:expr $(, $field:ident @ $off:expr)* $(,)?) => {
        const _: () = {
            assert!(size_of::<$t>() == $size, concat!("size of ", stringify!($t)));
            $(assert!(offset_of!($t, $field) == $off, concat!(stringify!($t), ".", stringify!($field)));)*
        };
    };
}

// <linux/vfio.h>
layout!(GroupStatus, 8, argsz @ 0, flags @ 4);
// 20 bytes up to cap_offset (6.1's header); later headers add `pad` for 24.
layout!(DeviceInfo, 24, argsz @ 0, flags @ 4, num_regions @ 8, num_irqs @ 12, cap_offset @ 16, pad @ 20);
layout!(IrqInfo, 16, argsz @ 0, flags @ 4, index @ 8, count @ 12);
layout!(DmaMap, 32, argsz @ 0, flags @ 4, vaddr @ 8, iova @ 16, size @ 24);
layout!(DmaUnmap, 24, argsz @ 0, flags @ 4, iova @ 8, size @ 16);
// struct vfio_device_feature is 8 bytes; its data (the VF token's UUID) starts at 8.
layout!(FeatureVfToken, 24, argsz @ 0, flags @ 4, uuid @ 8);
// 16 bytes from 6.6, 24 with token_uuid_ptr (mid-2025).
layout!(BindIommufd, 24, argsz @ 0, flags @ 4, iommufd @ 8, out_devid @ 12, token_uuid_ptr @ 16);
// 12 bytes from 6.6; 6.13 adds `pasid` (16), which pcibus does not use.
layout!(AttachPt, 12, argsz @ 0, flags @ 4, pt_id @ 8);

// <linux/iommufd.h>
layout!(IoasAlloc, 12, size @ 0, flags @ 4, out_ioas_id @ 8);
layout!(IoasIovaRanges, 32, size @ 0, ioas_id @ 4, num_iovas @ 8, reserved @ 12, allowed_iovas @ 16, out_iova_alignment @ 24);
layout!(IoasMap, 40, size @ 0, flags @ 4, ioas_id @ 8, reserved @ 12, user_va @ 16, length @ 24, iova @ 32);
layout!(IoasUnmap, 24, size @ 0, ioas_id @ 4, iova @ 8, length @ 16);
const _: () = assert!(IOVA_RANGES_HEADER == size_of::<IoasIovaRanges>());

// The ioctl numbers (all _IO(';', n): no size or direction bits).
const _: () = {
    assert!(GET_API_VERSION == 0x3b64);
    assert!(CHECK_EXTENSION == 0x3b65);
    assert!(SET_IOMMU == 0x3b66);
    assert!(GROUP_GET_STATUS == 0x3b67);
    assert!(GROUP_SET_CONTAINER == 0x3b68);
    assert!(GROUP_GET_DEVICE_FD == 0x3b6a);
    assert!(DEVICE_GET_INFO == 0x3b6b);
    assert!(DEVICE_GET_REGION_INFO == 0x3b6c);
    assert!(DEVICE_GET_IRQ_INFO == 0x3b6d);
    assert!(DEVICE_SET_IRQS == 0x3b6e);
    assert!(DEVICE_RESET == 0x3b6f);
    assert!(IOMMU_GET_INFO == 0x3b70);
    assert!(DEVICE_GET_PCI_HOT_RESET_INFO == 0x3b70);
    assert!(DEVICE_PCI_HOT_RESET == 0x3b71);
    assert!(IOMMU_MAP_DMA == 0x3b71);
    assert!(IOMMU_UNMAP_DMA == 0x3b72);
    assert!(DEVICE_FEATURE == 0x3b75);
    assert!(DEVICE_BIND_IOMMUFD == 0x3b76);
    assert!(DEVICE_ATTACH_IOMMUFD_PT == 0x3b77);
    assert!(IOMMU_IOAS_ALLOC == 0x3b81);
    assert!(IOMMU_IOAS_IOVA_RANGES == 0x3b84);
    assert!(IOMMU_IOAS_MAP == 0x3b85);
    assert!(IOMMU_IOAS_UNMAP == 0x3b86);
};

// The constants and flag bits.
const _: () = {
    assert!(API_VERSION == 0);
    assert!(TYPE1V2_IOMMU == 3);
    assert!(DEVICE_FEATURE_SET == 0x2_0000);
    assert!(DEVICE_FEATURE_PCI_VF_TOKEN == 0);
    assert!(GroupFlags::VIABLE.bits() == 0x1);
    assert!(GroupFlags::CONTAINER_SET.bits() == 0x2);
    assert!(DeviceFlags::RESET.bits() == 0x1);
    assert!(DeviceFlags::PCI.bits() == 0x2);
    assert!(IrqSetFlags::DATA_NONE.bits() == 0x1);
    assert!(IrqSetFlags::DATA_EVENTFD.bits() == 0x4);
    assert!(IrqSetFlags::ACTION_MASK.bits() == 0x8);
    assert!(IrqSetFlags::ACTION_UNMASK.bits() == 0x10);
    assert!(IrqSetFlags::ACTION_TRIGGER.bits() == 0x20);
    assert!(DmaMapFlags::READ.bits() == 0x1);
    assert!(DmaMapFlags::WRITE.bits() == 0x2);
    assert!(BindFlags::TOKEN.bits() == 0x1);
    assert!(IoasMapFlags::FIXED_IOVA.bits() == 0x1);
    assert!(IoasMapFlags::WRITEABLE.bits() == 0x2);
    assert!(IoasMapFlags::READABLE.bits() == 0x4);
    // The public ones (crate::vfio::RegionFlags, crate::vfio::irq).
    assert!(crate::vfio::RegionFlags::READ.bits() == 0x1);
    assert!(crate::vfio::RegionFlags::WRITE.bits() == 0x2);
    assert!(crate::vfio::RegionFlags::MMAP.bits() == 0x4);
    assert!(crate::vfio::RegionFlags::CAPS.bits() == 0x8);
    assert!(crate::vfio::irq::InfoFlags::EVENTFD.bits() == 0x1);
    assert!(crate::vfio::irq::InfoFlags::MASKABLE.bits() == 0x2);
    assert!(crate::vfio::irq::InfoFlags::AUTOMASKED.bits() == 0x4);
    assert!(crate::vfio::irq::InfoFlags::NORESIZE.bits() == 0x8);
    assert!(crate::vfio::irq::INTX == 0);
    assert!(crate::vfio::irq::MSI == 1);
    assert!(crate::vfio::irq::MSIX == 2);
    assert!(crate::vfio::irq::ERR == 3);
    assert!(crate::vfio::irq::REQ == 4);
};
