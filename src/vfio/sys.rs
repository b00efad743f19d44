//! The VFIO ioctls: one typed function per ioctl, so that no safe caller can issue an
//! arbitrary request. Together with the mmap of BARs and DMA buffers this is the only
//! `unsafe` of the vfio layer.
//!
//! Every VFIO ioctl is `_IO(';', 100 + n)` and every iommufd one `_IO(';', 0x80 + n)`: the
//! request carries no size, and the argument structures start with `argsz` (iommufd:
//! `size`), the size the caller allocated. Structures that end in
//! a capability chain are read into an 8-byte aligned byte buffer, grown when the kernel
//! asks for more, and decoded by the safe code in [`super::caps`].
#![allow(unsafe_code)]

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use nix::libc;

mod layout;

const fn vfio_io(n: u64) -> u64 {
    // _IO(type, nr): direction 0, size 0.
    ((b';' as u64) << 8) | (100 + n)
}

const GET_API_VERSION: u64 = vfio_io(0);
const CHECK_EXTENSION: u64 = vfio_io(1);
const SET_IOMMU: u64 = vfio_io(2);
const GROUP_GET_STATUS: u64 = vfio_io(3);
const GROUP_SET_CONTAINER: u64 = vfio_io(4);
const GROUP_GET_DEVICE_FD: u64 = vfio_io(6);
const DEVICE_GET_INFO: u64 = vfio_io(7);
const DEVICE_GET_REGION_INFO: u64 = vfio_io(8);
const DEVICE_GET_IRQ_INFO: u64 = vfio_io(9);
const DEVICE_SET_IRQS: u64 = vfio_io(10);
const DEVICE_RESET: u64 = vfio_io(11);
const IOMMU_GET_INFO: u64 = vfio_io(12);
// On a device fd the same numbers are the PCI hot reset ioctls (VFIO_BASE + 12, + 13).
const DEVICE_GET_PCI_HOT_RESET_INFO: u64 = vfio_io(12);
const DEVICE_PCI_HOT_RESET: u64 = vfio_io(13);
const IOMMU_MAP_DMA: u64 = vfio_io(13);
const IOMMU_UNMAP_DMA: u64 = vfio_io(14);
const DEVICE_FEATURE: u64 = vfio_io(17);
const DEVICE_BIND_IOMMUFD: u64 = vfio_io(18);
const DEVICE_ATTACH_IOMMUFD_PT: u64 = vfio_io(19);

const fn iommufd_io(n: u64) -> u64 {
    // iommufd shares VFIO's ioctl type; its commands start at 0x80.
    ((b';' as u64) << 8) | n
}

const IOMMU_IOAS_ALLOC: u64 = iommufd_io(0x81);
const IOMMU_IOAS_IOVA_RANGES: u64 = iommufd_io(0x84);
const IOMMU_IOAS_MAP: u64 = iommufd_io(0x85);
const IOMMU_IOAS_UNMAP: u64 = iommufd_io(0x86);

bitflags::bitflags! {
    /// `enum iommufd_ioas_map_flags`, the flags of an `IOMMU_IOAS_MAP`.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    struct IoasMapFlags: u32 {
        /// `IOMMU_IOAS_MAP_FIXED_IOVA`: map at the given IOVA, not one the kernel picks.
        const FIXED_IOVA = 1 << 0;
        /// `IOMMU_IOAS_MAP_WRITEABLE`: the device may write the memory.
        const WRITEABLE = 1 << 1;
        /// `IOMMU_IOAS_MAP_READABLE`: the device may read the memory.
        const READABLE = 1 << 2;
    }

    /// `VFIO_DEVICE_BIND_IOMMUFD` flags.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    struct BindFlags: u32 {
        /// `VFIO_DEVICE_BIND_FLAG_TOKEN`: `token_uuid_ptr` is valid (kernels from mid-2025
        /// on; older ones insist on flags 0 and check no VF token in the cdev path).
        const TOKEN = 1 << 0;
    }

    /// `VFIO_GROUP_GET_STATUS` flags.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub(crate) struct GroupFlags: u32 {
        /// `VFIO_GROUP_FLAGS_VIABLE`: every device of the group is bound to vfio (or to
        /// no driver), so the group may be used.
        const VIABLE = 1 << 0;
        /// `VFIO_GROUP_FLAGS_CONTAINER_SET`: the group is in a container.
        const CONTAINER_SET = 1 << 1;
    }

    /// `vfio_device_info.flags`.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub(crate) struct DeviceFlags: u32 {
        /// `VFIO_DEVICE_FLAGS_RESET`: the device supports `VFIO_DEVICE_RESET` (vfio-pci:
        /// the kernel has a function reset method for it).
        const RESET = 1 << 0;
        /// `VFIO_DEVICE_FLAGS_PCI`: a PCI device.
        const PCI = 1 << 1;
    }

    /// `vfio_irq_set.flags`: one data type and one action.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    struct IrqSetFlags: u32 {
        /// `VFIO_IRQ_SET_DATA_NONE`: no data follows.
        const DATA_NONE = 1 << 0;
        /// `VFIO_IRQ_SET_DATA_EVENTFD`: one eventfd (`s32`) per vector follows.
        const DATA_EVENTFD = 1 << 2;
        /// `VFIO_IRQ_SET_ACTION_MASK`.
        const ACTION_MASK = 1 << 3;
        /// `VFIO_IRQ_SET_ACTION_UNMASK`.
        const ACTION_UNMASK = 1 << 4;
        /// `VFIO_IRQ_SET_ACTION_TRIGGER`.
        const ACTION_TRIGGER = 1 << 5;
    }

    /// `vfio_iommu_type1_dma_map.flags`.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    struct DmaMapFlags: u32 {
        /// `VFIO_DMA_MAP_FLAG_READ`: the device may read the memory.
        const READ = 1 << 0;
        /// `VFIO_DMA_MAP_FLAG_WRITE`: the device may write the memory.
        const WRITE = 1 << 1;
    }
}

/// Size of `struct iommu_ioas_iova_ranges`, the header [`ioas_iova_ranges`] returns before
/// the ranges.
pub(crate) const IOVA_RANGES_HEADER: usize = 32;

// VFIO_DEVICE_FEATURE flags: the feature index in bits 15:0 (a number, so not a bitflag),
// then what to do with it.
const DEVICE_FEATURE_SET: u32 = 1 << 17;
const DEVICE_FEATURE_PCI_VF_TOKEN: u32 = 0;

pub(crate) const API_VERSION: i32 = 0;
pub(crate) const TYPE1V2_IOMMU: u32 = 3;

/// Most devices a hot reset info buffer is grown for (a bus holds at most 256 functions;
/// a slot with bridges below it more, but not this many).
const HOT_RESET_MAX_DEVICES: usize = 4096;

#[repr(C)]
#[derive(Default)]
struct GroupStatus {
    argsz: u32,
    flags: u32,
}

/// `struct vfio_device_info`.
#[repr(C)]
#[derive(Default)]
pub(crate) struct DeviceInfo {
    argsz: u32,
    pub flags: u32,
    pub num_regions: u32,
    pub num_irqs: u32,
    cap_offset: u32,
    pad: u32,
}

/// `struct vfio_irq_info`.
#[repr(C)]
#[derive(Default)]
pub(crate) struct IrqInfo {
    argsz: u32,
    pub flags: u32,
    pub index: u32,
    pub count: u32,
}

#[repr(C)]
#[derive(Default)]
struct DmaMap {
    argsz: u32,
    flags: u32,
    vaddr: u64,
    iova: u64,
    size: u64,
}

#[repr(C)]
#[derive(Default)]
struct DmaUnmap {
    argsz: u32,
    flags: u32,
    iova: u64,
    size: u64,
}

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Structures with a leading `argsz`, passed to the kernel by pointer.
trait Argsz {
    fn set_argsz(&mut self, argsz: u32);
}

macro_rules! argsz {
    ($($t:ty),*) => { $(impl Argsz for $t { fn set_argsz(&mut self, a: u32) { self.argsz = a; } })* };
}
/// `struct vfio_device_feature` with the 16-byte payload of `VFIO_DEVICE_FEATURE_PCI_VF_TOKEN`
/// (a UUID, as bytes in the order they are printed).
#[repr(C)]
#[derive(Default)]
struct FeatureVfToken {
    argsz: u32,
    flags: u32,
    uuid: [u8; 16],
}

argsz!(
    GroupStatus,
    DeviceInfo,
    IrqInfo,
    DmaMap,
    DmaUnmap,
    FeatureVfToken,
    BindIommufd,
    AttachPt
);

/// `struct vfio_device_bind_iommufd`, with the `token_uuid_ptr` newer kernels read when
/// `flags` has [`BindFlags::TOKEN`] (older ones read only the first 16 bytes).
#[repr(C)]
#[derive(Default)]
struct BindIommufd {
    argsz: u32,
    flags: u32,
    iommufd: i32,
    out_devid: u32,
    token_uuid_ptr: u64,
}

/// `struct vfio_device_attach_iommufd_pt` (without the PASID of later kernels).
#[repr(C)]
#[derive(Default)]
struct AttachPt {
    argsz: u32,
    flags: u32,
    pt_id: u32,
}

// iommufd's structures lead with `size`, which plays the part of argsz.
macro_rules! size_first {
    ($($t:ty),*) => { $(impl Argsz for $t { fn set_argsz(&mut self, a: u32) { self.size = a; } })* };
}

/// `struct iommu_ioas_alloc`.
#[repr(C)]
#[derive(Default)]
struct IoasAlloc {
    size: u32,
    flags: u32,
    out_ioas_id: u32,
}

/// `struct iommu_ioas_iova_ranges`; `allowed_iovas` points at an array of
/// `struct iommu_iova_range { start, last }`.
#[repr(C)]
#[derive(Default)]
struct IoasIovaRanges {
    size: u32,
    ioas_id: u32,
    num_iovas: u32,
    reserved: u32,
    allowed_iovas: u64,
    out_iova_alignment: u64,
}

/// `struct iommu_ioas_map`.
#[repr(C)]
#[derive(Default)]
struct IoasMap {
    size: u32,
    flags: u32,
    ioas_id: u32,
    reserved: u32,
    user_va: u64,
    length: u64,
    iova: u64,
}

/// `struct iommu_ioas_unmap`.
#[repr(C)]
#[derive(Default)]
struct IoasUnmap {
    size: u32,
    ioas_id: u32,
    iova: u64,
    length: u64,
}

size_first!(IoasAlloc, IoasIovaRanges, IoasMap, IoasUnmap);

/// # Safety
///
/// `request` must be a VFIO ioctl whose argument is a `T` (a `#[repr(C)]` structure
/// starting with `argsz`) that the kernel reads and writes within `argsz` bytes, and
/// that has no other effect on this process's memory.
unsafe fn ioctl_struct<T: Argsz>(fd: BorrowedFd<'_>, request: u64, arg: &mut T) -> io::Result<libc::c_int> {
    arg.set_argsz(size_of::<T>() as u32);
    // SAFETY: `arg` is a live, exclusively borrowed #[repr(C)] structure of the layout the
    // request expects (the caller's promise), and its `argsz` says its true size, so the
    // kernel reads and writes within it.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), request as _, std::ptr::from_mut(arg)) })
}

/// # Safety
///
/// `request` must be a VFIO ioctl whose argument is a variable-size structure starting
/// with `argsz`, of which `header` is the fixed part, that the kernel writes within
/// `argsz` bytes.
unsafe fn ioctl_chain(fd: BorrowedFd<'_>, request: u64, header: &[u8]) -> io::Result<Vec<u8>> {
    let mut size = header.len().max(256);
    for _ in 0..4 {
        // u64 storage keeps the buffer 8-byte aligned for the kernel's u64 fields.
        let mut storage = vec![0u64; size.div_ceil(8)];
        let bytes = storage.len() * 8;
        {
            let buf = as_bytes_mut(&mut storage);
            buf[..header.len()].copy_from_slice(header);
            buf[..4].copy_from_slice(&(bytes as u32).to_ne_bytes());
        }
        // SAFETY: `storage` is a live, exclusively owned, 8-byte aligned buffer of `bytes`
        // bytes, and its leading argsz says so: the kernel writes at most that much (the
        // request is one of that kind: the caller's promise).
        check(unsafe { libc::ioctl(fd.as_raw_fd(), request as _, storage.as_mut_ptr()) })?;
        let buf = as_bytes_mut(&mut storage);
        let wanted = u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        if wanted <= bytes {
            return Ok(buf.to_vec());
        }
        size = wanted;
    }
    Err(io::Error::other(
        "the kernel kept asking for a larger VFIO info buffer",
    ))
}

fn as_bytes_mut(words: &mut [u64]) -> &mut [u8] {
    let len = words.len() * 8;
    // SAFETY: any u64 slice is a valid, initialized byte slice of 8× its length with
    // weaker alignment; the borrow of `words` is carried over to the result.
    unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr().cast::<u8>(), len) }
}

/// `VFIO_GET_API_VERSION` on the container.
pub(crate) fn get_api_version(container: BorrowedFd<'_>) -> io::Result<i32> {
    // SAFETY: the request takes no argument and touches no memory of this process.
    check(unsafe { libc::ioctl(container.as_raw_fd(), GET_API_VERSION as _) })
}

/// `VFIO_CHECK_EXTENSION` on the container: whether `extension` (an IOMMU type) exists.
pub(crate) fn check_extension(container: BorrowedFd<'_>, extension: u32) -> io::Result<bool> {
    // SAFETY: the argument is an integer passed by value; no memory is handed over.
    let r = check(unsafe {
        libc::ioctl(
            container.as_raw_fd(),
            CHECK_EXTENSION as _,
            libc::c_ulong::from(extension),
        )
    })?;
    Ok(r > 0)
}

/// `VFIO_SET_IOMMU` on the container.
pub(crate) fn set_iommu(container: BorrowedFd<'_>, iommu_type: u32) -> io::Result<()> {
    // SAFETY: the argument is an integer passed by value; no memory is handed over.
    check(unsafe {
        libc::ioctl(
            container.as_raw_fd(),
            SET_IOMMU as _,
            libc::c_ulong::from(iommu_type),
        )
    })?;
    Ok(())
}

/// `VFIO_GROUP_GET_STATUS`: the group's flags ([`GroupFlags::VIABLE`], ...).
pub(crate) fn group_get_status(group: BorrowedFd<'_>) -> io::Result<GroupFlags> {
    let mut status = GroupStatus::default();
    // SAFETY: GROUP_GET_STATUS takes a struct vfio_group_status, which GroupStatus is.
    unsafe { ioctl_struct(group, GROUP_GET_STATUS, &mut status) }?;
    Ok(GroupFlags::from_bits_retain(status.flags))
}

/// `VFIO_GROUP_SET_CONTAINER`: the argument is a pointer to the container fd.
pub(crate) fn group_set_container(group: BorrowedFd<'_>, container: BorrowedFd<'_>) -> io::Result<()> {
    let fd: libc::c_int = container.as_raw_fd();
    // SAFETY: the kernel reads one c_int through the pointer, which points at a live local.
    check(unsafe { libc::ioctl(group.as_raw_fd(), GROUP_SET_CONTAINER as _, &raw const fd) })?;
    Ok(())
}

/// `VFIO_GROUP_GET_DEVICE_FD`: the argument is the device name as a C string.
pub(crate) fn group_get_device_fd(group: BorrowedFd<'_>, name: &str) -> io::Result<OwnedFd> {
    let name = CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: the kernel reads a NUL-terminated string through the pointer, which `name`
    // keeps alive for the call.
    let fd = check(unsafe { libc::ioctl(group.as_raw_fd(), GROUP_GET_DEVICE_FD as _, name.as_ptr()) })?;
    // SAFETY: on success the ioctl returned a new file descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `VFIO_GROUP_GET_DEVICE_FD` for a VF whose PF is bound to vfio-pci: the name carries the
/// VF token the PF's user set, `"DDDD:BB:DD.F vf_token=UUID"` (the kernel answers EACCES
/// when it is missing or wrong).
pub(crate) fn group_get_vf_device_fd(group: BorrowedFd<'_>, name: &str, token: &str) -> io::Result<OwnedFd> {
    group_get_device_fd(group, &format!("{name} vf_token={token}"))
}

/// `VFIO_DEVICE_FEATURE` with `SET | PCI_VF_TOKEN` on a PF: the UUID its VFs' users must
/// present to open them.
pub(crate) fn device_set_vf_token(device: BorrowedFd<'_>, uuid: [u8; 16]) -> io::Result<()> {
    let mut feature = FeatureVfToken {
        flags: DEVICE_FEATURE_SET | DEVICE_FEATURE_PCI_VF_TOKEN,
        uuid,
        ..Default::default()
    };
    // SAFETY: DEVICE_FEATURE takes a struct vfio_device_feature followed by the feature's
    // payload; FeatureVfToken is that layout with the 16-byte VF token payload, and its
    // argsz (set by ioctl_struct) covers both. A SET only reads it.
    unsafe { ioctl_struct(device, DEVICE_FEATURE, &mut feature) }?;
    Ok(())
}

/// `VFIO_DEVICE_GET_INFO`.
pub(crate) fn device_get_info(device: BorrowedFd<'_>) -> io::Result<DeviceInfo> {
    let mut info = DeviceInfo::default();
    // SAFETY: DEVICE_GET_INFO takes a struct vfio_device_info, which DeviceInfo is (the
    // kernel writes only `argsz` bytes, so a capability chain is not returned).
    unsafe { ioctl_struct(device, DEVICE_GET_INFO, &mut info) }?;
    Ok(info)
}

/// `VFIO_DEVICE_GET_REGION_INFO` for `index`: the raw `struct vfio_region_info` with its
/// capability chain, for [`super::caps::parse_region_info`].
pub(crate) fn device_get_region_info(device: BorrowedFd<'_>, index: u32) -> io::Result<Vec<u8>> {
    let mut header = [0u8; 32];
    header[8..12].copy_from_slice(&index.to_ne_bytes());
    // SAFETY: DEVICE_GET_REGION_INFO takes a struct vfio_region_info (32 bytes, `header`)
    // followed by room for its capability chain, written within argsz.
    unsafe { ioctl_chain(device, DEVICE_GET_REGION_INFO, &header) }
}

/// `VFIO_DEVICE_GET_IRQ_INFO` for `index`.
pub(crate) fn device_get_irq_info(device: BorrowedFd<'_>, index: u32) -> io::Result<IrqInfo> {
    let mut info = IrqInfo {
        index,
        ..Default::default()
    };
    // SAFETY: DEVICE_GET_IRQ_INFO takes a struct vfio_irq_info, which IrqInfo is.
    unsafe { ioctl_struct(device, DEVICE_GET_IRQ_INFO, &mut info) }?;
    Ok(info)
}

/// `VFIO_DEVICE_SET_IRQS` with action TRIGGER: routes vectors `start..start + fds.len()`
/// of `index` to these eventfds, or, with `fds` empty, disables the index.
///
/// Returns what the ioctl returned: 0, or, when enabling MSI or MSI-X finds fewer vectors
/// than asked for, the number it could have had (vfio-pci then enables nothing and
/// returns that count instead of an error).
pub(crate) fn device_set_irqs(
    device: BorrowedFd<'_>,
    index: u32,
    start: u32,
    fds: &[BorrowedFd<'_>],
) -> io::Result<i32> {
    // struct vfio_irq_set { argsz, flags, index, start, count, data[] }
    let mut buf: Vec<u32> = vec![0; 5 + fds.len()];
    let data = if fds.is_empty() {
        IrqSetFlags::DATA_NONE
    } else {
        IrqSetFlags::DATA_EVENTFD
    };
    buf[0] = (buf.len() * 4) as u32;
    buf[1] = (data | IrqSetFlags::ACTION_TRIGGER).bits();
    buf[2] = index;
    buf[3] = start;
    buf[4] = fds.len() as u32;
    for (slot, fd) in buf[5..].iter_mut().zip(fds) {
        *slot = fd.as_raw_fd() as u32;
    }
    // SAFETY: `buf` is a live u32 array laid out as struct vfio_irq_set followed by
    // `count` s32 eventfds (borrowed, so open for the call), and argsz gives its size.
    check(unsafe { libc::ioctl(device.as_raw_fd(), DEVICE_SET_IRQS as _, buf.as_mut_ptr()) })
}

/// What [`device_set_irqs_none`] does to the vectors it names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum IrqAction {
    /// Masks them (vfio-pci: INTx only).
    Mask,
    /// Unmasks them (vfio-pci: INTx only); one raised while masked is signalled again.
    Unmask,
    /// Signals their eventfds from the kernel, as the device would (a loopback test).
    Trigger,
}

/// `VFIO_DEVICE_SET_IRQS` with no data (`DATA_NONE`): `action` on vectors
/// `start..start + count` of `index`.
pub(crate) fn device_set_irqs_none(
    device: BorrowedFd<'_>,
    index: u32,
    start: u32,
    count: u32,
    action: IrqAction,
) -> io::Result<()> {
    let action = match action {
        IrqAction::Mask => IrqSetFlags::ACTION_MASK,
        IrqAction::Unmask => IrqSetFlags::ACTION_UNMASK,
        IrqAction::Trigger => IrqSetFlags::ACTION_TRIGGER,
    };
    let flags = IrqSetFlags::DATA_NONE | action;
    // struct vfio_irq_set { argsz, flags, index, start, count } with no data.
    let mut buf: [u32; 5] = [20, flags.bits(), index, start, count];
    // SAFETY: `buf` is a live struct vfio_irq_set of argsz bytes; with DATA_NONE the
    // kernel reads no data after it and writes nothing.
    check(unsafe { libc::ioctl(device.as_raw_fd(), DEVICE_SET_IRQS as _, buf.as_mut_ptr()) })?;
    Ok(())
}

/// Makes `fd` refer to a fresh eventfd instead of what it referred to, in one step
/// (`dup3`): the file it referred to loses this reference (a VFIO device closes when
/// nothing else holds its file), while the number stays open and its owner's, who closes
/// it as before. An eventfd answers every VFIO ioctl, `pread` and `mmap` with an error.
pub(crate) fn revoke_fd(fd: BorrowedFd<'_>) -> io::Result<()> {
    use nix::sys::eventfd::{EfdFlags, EventFd};
    let stand_in = EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)?;
    // SAFETY: dup3 only changes what the number `fd` refers to; the number stays open
    // throughout (dup3 replaces atomically: no other open can be given it in between)
    // and stays owned by whoever owns `fd`, who closes it once as before. No memory is
    // touched.
    let r = unsafe { libc::dup3(stand_in.as_fd().as_raw_fd(), fd.as_raw_fd(), libc::O_CLOEXEC) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `VFIO_DEVICE_RESET`.
pub(crate) fn device_reset(device: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: the request takes no argument and touches no memory of this process.
    check(unsafe { libc::ioctl(device.as_raw_fd(), DEVICE_RESET as _) })?;
    Ok(())
}

/// `VFIO_DEVICE_GET_PCI_HOT_RESET_INFO`: the raw `struct vfio_pci_hot_reset_info` with its
/// `vfio_pci_dependent_device` entries, for [`super::reset::parse_hot_reset_info`]. The
/// kernel answers a buffer too small with ENOSPC and the count it needs; the buffer is
/// grown to it.
pub(crate) fn device_get_pci_hot_reset_info(device: BorrowedFd<'_>) -> io::Result<Vec<u8>> {
    let mut count = 0usize;
    for _ in 0..4 {
        // struct vfio_pci_hot_reset_info { argsz, flags, count } then 8 bytes per device.
        let mut buf: Vec<u32> = vec![0; 3 + 2 * count];
        buf[0] = (buf.len() * 4) as u32;
        // SAFETY: `buf` is a live, exclusively owned u32 array of argsz bytes laid out as
        // struct vfio_pci_hot_reset_info with room for `count` 8-byte (4-aligned) entries;
        // the kernel writes the header and at most the entries argsz leaves room for.
        let r = check(unsafe {
            libc::ioctl(
                device.as_raw_fd(),
                DEVICE_GET_PCI_HOT_RESET_INFO as _,
                buf.as_mut_ptr(),
            )
        });
        match r {
            Ok(_) => return Ok(buf.iter().flat_map(|w| w.to_ne_bytes()).collect()),
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => {
                let wanted = buf[2] as usize;
                if wanted <= count || wanted > HOT_RESET_MAX_DEVICES {
                    return Err(e);
                }
                count = wanted;
            }
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::other(
        "the kernel kept asking for a larger hot reset info buffer",
    ))
}

/// `VFIO_DEVICE_PCI_HOT_RESET` with these group fds (group backend: one of every group
/// the reset affects), or none (iommufd cdev, Linux 6.7 on: every affected device must
/// be owned by the device's iommufd).
pub(crate) fn device_pci_hot_reset(device: BorrowedFd<'_>, groups: &[BorrowedFd<'_>]) -> io::Result<()> {
    // struct vfio_pci_hot_reset { argsz, flags, count, group_fds[] }
    let mut buf: Vec<u32> = vec![0; 3 + groups.len()];
    buf[0] = (buf.len() * 4) as u32;
    buf[2] = groups.len() as u32;
    for (slot, fd) in buf[3..].iter_mut().zip(groups) {
        *slot = fd.as_raw_fd() as u32;
    }
    // SAFETY: `buf` is a live u32 array laid out as struct vfio_pci_hot_reset followed by
    // `count` s32 group fds (borrowed, so open for the call); argsz gives its size and the
    // kernel only reads it.
    check(unsafe { libc::ioctl(device.as_raw_fd(), DEVICE_PCI_HOT_RESET as _, buf.as_mut_ptr()) })?;
    Ok(())
}

/// `VFIO_IOMMU_GET_INFO` (type1): the raw `struct vfio_iommu_type1_info` with its
/// capability chain, for [`super::caps::parse_iommu_info`].
pub(crate) fn iommu_get_info(container: BorrowedFd<'_>) -> io::Result<Vec<u8>> {
    let mut header = [0u8; 24];
    header[..4].copy_from_slice(&24u32.to_ne_bytes());
    // SAFETY: IOMMU_GET_INFO takes a struct vfio_iommu_type1_info (24 bytes, `header`)
    // followed by room for its capability chain, written within argsz.
    unsafe { ioctl_chain(container, IOMMU_GET_INFO, &header) }
}

/// `VFIO_IOMMU_MAP_DMA`: lets the container's devices read `size` bytes of this process's
/// memory at `vaddr` through IOVA `iova`, and write them if `device_writes`
/// (`VFIO_DMA_MAP_FLAG_READ`, and `VFIO_DMA_MAP_FLAG_WRITE` when it does).
///
/// # Safety
///
/// From the call until a successful [`iommu_unmap_dma`] of the range (or the container
/// fd's close, or the release of the container's IOMMU when its last group is detached),
/// devices may write those bytes at any time. So `vaddr..vaddr + size` must
/// be memory the caller owns and keeps mapped for all that time (never munmapped or
/// reused before a successful unmap), and that is only ever accessed through raw
/// pointers or atomics, never through references that assume nothing else writes it.
pub(crate) unsafe fn iommu_map_dma(
    container: BorrowedFd<'_>,
    vaddr: u64,
    iova: u64,
    size: u64,
    device_writes: bool,
) -> io::Result<()> {
    let mut map = DmaMap {
        flags: type1_map_flags(device_writes).bits(),
        vaddr,
        iova,
        size,
        ..Default::default()
    };
    // SAFETY: IOMMU_MAP_DMA takes a struct vfio_iommu_type1_dma_map, which DmaMap is; the
    // memory it names is the caller's promise.
    unsafe { ioctl_struct(container, IOMMU_MAP_DMA, &mut map) }?;
    Ok(())
}

/// `VFIO_IOMMU_UNMAP_DMA` of `size` bytes at `iova`: returns the bytes the kernel unmapped.
pub(crate) fn iommu_unmap_dma(container: BorrowedFd<'_>, iova: u64, size: u64) -> io::Result<u64> {
    let mut unmap = DmaUnmap {
        iova,
        size,
        ..Default::default()
    };
    // SAFETY: IOMMU_UNMAP_DMA takes a struct vfio_iommu_type1_dma_unmap, which DmaUnmap is;
    // it only removes IOMMU mappings, touching no memory of this process.
    unsafe { ioctl_struct(container, IOMMU_UNMAP_DMA, &mut unmap) }?;
    Ok(unmap.size)
}

/// `VFIO_DEVICE_BIND_IOMMUFD` on a device cdev: binds it to `iommufd` (after which its fd
/// works like one from a group) and returns the device id. With `token`, the VF token is
/// passed too (`VFIO_DEVICE_BIND_FLAG_TOKEN`); kernels without that flag answer EINVAL.
pub(crate) fn device_bind_iommufd(
    device: BorrowedFd<'_>,
    iommufd: BorrowedFd<'_>,
    token: Option<[u8; 16]>,
) -> io::Result<u32> {
    let uuid = token.unwrap_or_default();
    let mut bind = BindIommufd {
        flags: if token.is_some() {
            BindFlags::TOKEN
        } else {
            BindFlags::empty()
        }
        .bits(),
        iommufd: iommufd.as_raw_fd(),
        token_uuid_ptr: if token.is_some() { uuid.as_ptr() as u64 } else { 0 },
        ..Default::default()
    };
    // SAFETY: BIND_IOMMUFD takes a struct vfio_device_bind_iommufd, which BindIommufd is
    // (kernels that know fewer fields read only those, as argsz allows). The kernel reads
    // 16 bytes through token_uuid_ptr only when the flag is set, and then it points at
    // `uuid`, alive for the call; `iommufd` is borrowed, so open.
    unsafe { ioctl_struct(device, DEVICE_BIND_IOMMUFD, &mut bind) }?;
    Ok(bind.out_devid)
}

/// `VFIO_DEVICE_ATTACH_IOMMUFD_PT`: attaches a bound device to the IOAS (or hardware page
/// table) `pt_id`; returns the id the kernel reports back (the page table it used).
pub(crate) fn device_attach_iommufd_pt(device: BorrowedFd<'_>, pt_id: u32) -> io::Result<u32> {
    let mut attach = AttachPt {
        pt_id,
        ..Default::default()
    };
    // SAFETY: ATTACH_IOMMUFD_PT takes a struct vfio_device_attach_iommufd_pt, which AttachPt
    // is; flags 0 means no PASID field follows.
    unsafe { ioctl_struct(device, DEVICE_ATTACH_IOMMUFD_PT, &mut attach) }?;
    Ok(attach.pt_id)
}

/// `IOMMU_IOAS_ALLOC`: a new, empty I/O address space in `iommufd`; returns its id.
pub(crate) fn ioas_alloc(iommufd: BorrowedFd<'_>) -> io::Result<u32> {
    let mut alloc = IoasAlloc::default();
    // SAFETY: IOAS_ALLOC takes a struct iommu_ioas_alloc, which IoasAlloc is.
    unsafe { ioctl_struct(iommufd, IOMMU_IOAS_ALLOC, &mut alloc) }?;
    Ok(alloc.out_ioas_id)
}

/// `IOMMU_IOAS_IOVA_RANGES`: the IOVA ranges `ioas` accepts now. Returned raw for
/// [`super::caps::parse_iova_ranges`]: the `struct iommu_ioas_iova_ranges` as the kernel
/// left it ([`IOVA_RANGES_HEADER`] bytes, `num_iovas` and `out_iova_alignment` filled in,
/// the pointer zeroed) followed by the `struct iommu_iova_range` array.
pub(crate) fn ioas_iova_ranges(iommufd: BorrowedFd<'_>, ioas: u32) -> io::Result<Vec<u8>> {
    let mut capacity = 8usize;
    for _ in 0..4 {
        // Two u64 per range: start and last.
        let mut ranges = vec![0u64; capacity * 2];
        let mut query = IoasIovaRanges {
            ioas_id: ioas,
            num_iovas: capacity as u32,
            allowed_iovas: ranges.as_mut_ptr() as u64,
            ..Default::default()
        };
        // SAFETY: IOAS_IOVA_RANGES takes a struct iommu_ioas_iova_ranges, which
        // IoasIovaRanges is; the kernel writes at most num_iovas 16-byte ranges through
        // allowed_iovas, which points at `ranges`, live, exclusively owned and that large.
        match unsafe { ioctl_struct(iommufd, IOMMU_IOAS_IOVA_RANGES, &mut query) } {
            Ok(_) => {
                let mut out = Vec::with_capacity(IOVA_RANGES_HEADER + ranges.len() * 8);
                for word in [query.size, query.ioas_id, query.num_iovas, query.reserved] {
                    out.extend_from_slice(&word.to_ne_bytes());
                }
                out.extend_from_slice(&0u64.to_ne_bytes());
                out.extend_from_slice(&query.out_iova_alignment.to_ne_bytes());
                for word in &ranges {
                    out.extend_from_slice(&word.to_ne_bytes());
                }
                return Ok(out);
            }
            Err(e) if e.raw_os_error() == Some(libc::EMSGSIZE) && query.num_iovas as usize > capacity => {
                capacity = query.num_iovas as usize;
            }
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::other(
        "the kernel kept reporting more IOVA ranges than there was room for",
    ))
}

/// `IOMMU_IOAS_MAP`: lets the devices attached to `ioas` read `size` bytes of this
/// process's memory at `vaddr` (`IOMMU_IOAS_MAP_READABLE`), and write them if
/// `device_writes` (`IOMMU_IOAS_MAP_WRITEABLE`), at IOVA `iova` if given (FIXED_IOVA),
/// else where the kernel chooses. Returns the IOVA.
///
/// # Safety
///
/// As for [`iommu_map_dma`]: the memory must stay mapped, owned and accessed only through
/// raw pointers or atomics until a successful [`ioas_unmap`] of the range (or the
/// iommufd's close).
pub(crate) unsafe fn ioas_map(
    iommufd: BorrowedFd<'_>,
    ioas: u32,
    vaddr: u64,
    iova: Option<u64>,
    size: u64,
    device_writes: bool,
) -> io::Result<u64> {
    let mut map = IoasMap {
        flags: ioas_map_flags(iova.is_some(), device_writes).bits(),
        ioas_id: ioas,
        user_va: vaddr,
        length: size,
        iova: iova.unwrap_or(0),
        ..Default::default()
    };
    // SAFETY: IOAS_MAP takes a struct iommu_ioas_map, which IoasMap is; the memory it names
    // is the caller's promise.
    unsafe { ioctl_struct(iommufd, IOMMU_IOAS_MAP, &mut map) }?;
    Ok(map.iova)
}

/// The flags of an `IOMMU_IOAS_MAP`: readable always, writeable if the device writes,
/// fixed IOVA if one is given.
fn ioas_map_flags(fixed: bool, device_writes: bool) -> IoasMapFlags {
    let mut flags = IoasMapFlags::READABLE;
    flags.set(IoasMapFlags::WRITEABLE, device_writes);
    flags.set(IoasMapFlags::FIXED_IOVA, fixed);
    flags
}

/// The flags of a `VFIO_IOMMU_MAP_DMA`: read always, write if the device writes.
fn type1_map_flags(device_writes: bool) -> DmaMapFlags {
    let mut flags = DmaMapFlags::READ;
    flags.set(DmaMapFlags::WRITE, device_writes);
    flags
}

/// `IOMMU_IOAS_UNMAP` of `size` bytes at `iova`: returns the bytes the kernel unmapped.
pub(crate) fn ioas_unmap(iommufd: BorrowedFd<'_>, ioas: u32, iova: u64, size: u64) -> io::Result<u64> {
    let mut unmap = IoasUnmap {
        ioas_id: ioas,
        iova,
        length: size,
        ..Default::default()
    };
    // SAFETY: IOAS_UNMAP takes a struct iommu_ioas_unmap, which IoasUnmap is; it only
    // removes IOMMU mappings, touching no memory of this process.
    unsafe { ioctl_struct(iommufd, IOMMU_IOAS_UNMAP, &mut unmap) }?;
    Ok(unmap.length)
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use super::*;

    // Issue 16 §3: memory the device may only read is mapped without write permission, on
    // both backends (the values are those of <linux/vfio.h> and <linux/iommufd.h>).
    #[test]
    fn read_only_maps_ask_for_no_write_permission() {
        assert_eq!(type1_map_flags(true).bits(), 0b11, "READ | WRITE");
        assert_eq!(type1_map_flags(false).bits(), 0b01, "READ only");
        assert_eq!(
            ioas_map_flags(true, true).bits(),
            0b111,
            "FIXED_IOVA | WRITEABLE | READABLE"
        );
        assert_eq!(ioas_map_flags(false, true).bits(), 0b110);
        assert_eq!(
            ioas_map_flags(true, false).bits(),
            0b101,
            "READABLE, no WRITEABLE"
        );
        assert_eq!(ioas_map_flags(false, false).bits(), 0b100);
    }

    #[test]
    fn a_revoked_fd_no_longer_holds_its_file() {
        // The write end of a pipe stands for a device fd: once its file is released, the
        // reader sees the end of the stream.
        let (read, write) = nix::unistd::pipe().unwrap();
        nix::fcntl::fcntl(
            &read,
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
        )
        .unwrap();
        let mut buf = [0u8; 8];
        assert_eq!(
            nix::unistd::read(&read, &mut buf),
            Err(nix::errno::Errno::EAGAIN),
            "a writer is open"
        );
        let number = write.as_raw_fd();
        revoke_fd(write.as_fd()).unwrap();
        assert_eq!(nix::unistd::read(&read, &mut buf), Ok(0), "no writer left");
        // The number is still open, and the owner's to close.
        assert_eq!(write.as_raw_fd(), number);
        assert!(
            nix::unistd::write(&write, &1u64.to_ne_bytes()).is_ok(),
            "an eventfd now"
        );
        drop(write);
    }
}
