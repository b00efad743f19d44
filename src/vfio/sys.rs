//! The VFIO ioctls and their argument structures: the only `unsafe` of the vfio layer
//! outside the mmap of BARs and DMA buffers.
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

pub(crate) const GET_API_VERSION: u64 = vfio_io(0);
pub(crate) const CHECK_EXTENSION: u64 = vfio_io(1);
pub(crate) const SET_IOMMU: u64 = vfio_io(2);
pub(crate) const GROUP_GET_STATUS: u64 = vfio_io(3);
pub(crate) const GROUP_SET_CONTAINER: u64 = vfio_io(4);
pub(crate) const GROUP_GET_DEVICE_FD: u64 = vfio_io(6);
pub(crate) const DEVICE_GET_INFO: u64 = vfio_io(7);
pub(crate) const DEVICE_GET_REGION_INFO: u64 = vfio_io(8);
pub(crate) const DEVICE_GET_IRQ_INFO: u64 = vfio_io(9);
pub(crate) const DEVICE_SET_IRQS: u64 = vfio_io(10);
pub(crate) const DEVICE_RESET: u64 = vfio_io(11);
pub(crate) const IOMMU_GET_INFO: u64 = vfio_io(12);
pub(crate) const IOMMU_MAP_DMA: u64 = vfio_io(13);
pub(crate) const IOMMU_UNMAP_DMA: u64 = vfio_io(14);

pub(crate) const API_VERSION: i32 = 0;
pub(crate) const TYPE1V2_IOMMU: u64 = 3;

pub(crate) const GROUP_FLAGS_VIABLE: u32 = 1 << 0;

pub(crate) const IRQ_SET_DATA_NONE: u32 = 1 << 0;
pub(crate) const IRQ_SET_DATA_EVENTFD: u32 = 1 << 2;
pub(crate) const IRQ_SET_ACTION_TRIGGER: u32 = 1 << 5;

pub(crate) const DMA_MAP_FLAG_READ: u32 = 1 << 0;
pub(crate) const DMA_MAP_FLAG_WRITE: u32 = 1 << 1;

#[repr(C)]
#[derive(Default)]
pub(crate) struct GroupStatus {
    pub argsz: u32,
    pub flags: u32,
}

#[repr(C)]
#[derive(Default)]
pub(crate) struct DeviceInfo {
    pub argsz: u32,
    pub flags: u32,
    pub num_regions: u32,
    pub num_irqs: u32,
    pub cap_offset: u32,
    pub pad: u32,
}

#[repr(C)]
#[derive(Default)]
pub(crate) struct IrqInfo {
    pub argsz: u32,
    pub flags: u32,
    pub index: u32,
    pub count: u32,
}

#[repr(C)]
#[derive(Default)]
pub(crate) struct DmaMap {
    pub argsz: u32,
    pub flags: u32,
    pub vaddr: u64,
    pub iova: u64,
    pub size: u64,
}

#[repr(C)]
#[derive(Default)]
pub(crate) struct DmaUnmap {
    pub argsz: u32,
    pub flags: u32,
    pub iova: u64,
    pub size: u64,
}

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// An ioctl whose argument is a plain integer (or none).
pub(crate) fn ioctl_value(fd: BorrowedFd<'_>, request: u64, value: u64) -> io::Result<libc::c_int> {
    // SAFETY: the VFIO requests passed here take their argument by value (an extension or
    // IOMMU type number, or nothing); no memory is handed to the kernel.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), request as _, value as libc::c_ulong) })
}

/// An ioctl whose argument is a fixed-size `#[repr(C)]` structure starting with `argsz`.
pub(crate) fn ioctl_struct<T: Argsz>(
    fd: BorrowedFd<'_>,
    request: u64,
    arg: &mut T,
) -> io::Result<libc::c_int> {
    arg.set_argsz(size_of::<T>() as u32);
    // SAFETY: `arg` is a live, exclusively borrowed #[repr(C)] structure of the layout the
    // request expects, and its `argsz` says its true size, so the kernel reads and writes
    // within it.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), request as _, arg as *mut T) })
}

/// An ioctl on a variable-size structure: `buf` holds the structure (its first u32 is
/// `argsz`) followed by room for the kernel's capability chain. Retries with a larger
/// buffer when the kernel's `argsz` asks for more. Returns the bytes.
pub(crate) fn ioctl_chain(fd: BorrowedFd<'_>, request: u64, header: &[u8]) -> io::Result<Vec<u8>> {
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
        // bytes, and its leading argsz says so: the kernel writes at most that much.
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

/// `VFIO_GROUP_SET_CONTAINER`: the argument is a pointer to the container fd.
pub(crate) fn group_set_container(group: BorrowedFd<'_>, container: BorrowedFd<'_>) -> io::Result<()> {
    let fd: libc::c_int = container.as_raw_fd();
    // SAFETY: the kernel reads one c_int through the pointer, which points at a live local.
    check(unsafe {
        libc::ioctl(
            group.as_raw_fd(),
            GROUP_SET_CONTAINER as _,
            &fd as *const libc::c_int,
        )
    })?;
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

/// `VFIO_DEVICE_SET_IRQS` with a list of eventfds (or none, `fds` empty with `count` 0 to
/// disable the index).
pub(crate) fn set_irqs_eventfds(
    device: BorrowedFd<'_>,
    index: u32,
    start: u32,
    fds: &[i32],
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
        *slot = *fd as u32;
    }
    // SAFETY: `buf` is a live u32 array laid out as struct vfio_irq_set followed by
    // `count` s32 eventfds, and argsz gives its size.
    check(unsafe { libc::ioctl(device.as_raw_fd(), DEVICE_SET_IRQS as _, buf.as_mut_ptr()) })?;
    Ok(())
}

/// Structures with a leading `argsz`.
pub(crate) trait Argsz {
    fn set_argsz(&mut self, argsz: u32);
}

macro_rules! argsz {
    ($($t:ty),*) => { $(impl Argsz for $t { fn set_argsz(&mut self, a: u32) { self.argsz = a; } })* };
}
argsz!(GroupStatus, DeviceInfo, IrqInfo, DmaMap, DmaUnmap);
