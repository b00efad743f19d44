//! The VFIO ioctls: one typed function per ioctl, so that no safe caller can issue an
//! arbitrary request. Together with the mmap of BARs and DMA buffers this is the only
//! `unsafe` of the vfio layer.
//!
//! Every VFIO ioctl is `_IO(';', 100 + n)`: the request carries no size, and the argument
//! structures start with `argsz`, the size the caller allocated. Structures that end in
//! a capability chain are read into an 8-byte aligned byte buffer, grown when the kernel
//! asks for more, and decoded by the safe code in [`super::caps`].
#![allow(unsafe_code)]

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use nix::libc;

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
const IOMMU_MAP_DMA: u64 = vfio_io(13);
const IOMMU_UNMAP_DMA: u64 = vfio_io(14);
const DEVICE_FEATURE: u64 = vfio_io(17);

// VFIO_DEVICE_FEATURE flags: the feature index in bits 15:0, then what to do with it.
const DEVICE_FEATURE_SET: u32 = 1 << 17;
const DEVICE_FEATURE_PCI_VF_TOKEN: u32 = 0;

pub(crate) const API_VERSION: i32 = 0;
pub(crate) const TYPE1V2_IOMMU: u32 = 3;

pub(crate) const GROUP_FLAGS_VIABLE: u32 = 1 << 0;

const IRQ_SET_DATA_NONE: u32 = 1 << 0;
const IRQ_SET_DATA_EVENTFD: u32 = 1 << 2;
const IRQ_SET_ACTION_TRIGGER: u32 = 1 << 5;

const DMA_MAP_FLAG_READ: u32 = 1 << 0;
const DMA_MAP_FLAG_WRITE: u32 = 1 << 1;

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

argsz!(GroupStatus, DeviceInfo, IrqInfo, DmaMap, DmaUnmap, FeatureVfToken);

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

/// `VFIO_GROUP_GET_STATUS`: the group's flags ([`GROUP_FLAGS_VIABLE`], ...).
pub(crate) fn group_get_status(group: BorrowedFd<'_>) -> io::Result<u32> {
    let mut status = GroupStatus::default();
    // SAFETY: GROUP_GET_STATUS takes a struct vfio_group_status, which GroupStatus is.
    unsafe { ioctl_struct(group, GROUP_GET_STATUS, &mut status) }?;
    Ok(status.flags)
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
pub(crate) fn device_set_irqs(
    device: BorrowedFd<'_>,
    index: u32,
    start: u32,
    fds: &[BorrowedFd<'_>],
) -> io::Result<()> {
    // struct vfio_irq_set { argsz, flags, index, start, count, data[] }
    let mut buf: Vec<u32> = vec![0; 5 + fds.len()];
    let flags = if fds.is_empty() {
        IRQ_SET_DATA_NONE | IRQ_SET_ACTION_TRIGGER
    } else {
        IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER
    };
    buf[0] = (buf.len() * 4) as u32;
    buf[1] = flags;
    buf[2] = index;
    buf[3] = start;
    buf[4] = fds.len() as u32;
    for (slot, fd) in buf[5..].iter_mut().zip(fds) {
        *slot = fd.as_raw_fd() as u32;
    }
    // SAFETY: `buf` is a live u32 array laid out as struct vfio_irq_set followed by
    // `count` s32 eventfds (borrowed, so open for the call), and argsz gives its size.
    check(unsafe { libc::ioctl(device.as_raw_fd(), DEVICE_SET_IRQS as _, buf.as_mut_ptr()) })?;
    Ok(())
}

/// `VFIO_DEVICE_RESET`.
pub(crate) fn device_reset(device: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: the request takes no argument and touches no memory of this process.
    check(unsafe { libc::ioctl(device.as_raw_fd(), DEVICE_RESET as _) })?;
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

/// `VFIO_IOMMU_MAP_DMA`: lets the container's devices read and write `size` bytes of this
/// process's memory at `vaddr` through IOVA `iova`.
///
/// # Safety
///
/// From the call until a successful [`iommu_unmap_dma`] of the range (or the container
/// fd's close), devices may write those bytes at any time. So `vaddr..vaddr + size` must
/// be memory the caller owns and keeps mapped for all that time (never munmapped or
/// reused before a successful unmap), and that is only ever accessed through raw
/// pointers or atomics, never through references that assume nothing else writes it.
pub(crate) unsafe fn iommu_map_dma(
    container: BorrowedFd<'_>,
    vaddr: u64,
    iova: u64,
    size: u64,
) -> io::Result<()> {
    let mut map = DmaMap {
        flags: DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE,
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
