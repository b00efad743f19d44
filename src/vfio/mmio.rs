//! Mapped device memory (BARs): volatile accesses only, never references.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::ptr::NonNull;

use nix::sys::mman::{MapFlags, ProtFlags, mmap, munmap};

/// One mmapped area of a region. Accesses are bounds- and alignment-checked and volatile.
#[derive(Debug)]
pub(crate) struct MmioArea {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the area is plain device memory owned by this value; the accessors take `&self`
// and do single volatile loads and stores, which the device tolerates from any thread.
unsafe impl Send for MmioArea {}
// SAFETY: as above: no interior state besides the mapping, all access is volatile.
unsafe impl Sync for MmioArea {}

impl MmioArea {
    /// Maps `len` bytes of `fd` at `offset`, shared, read-write.
    pub(crate) fn map(fd: BorrowedFd<'_>, offset: u64, len: usize) -> io::Result<MmioArea> {
        let size =
            std::num::NonZeroUsize::new(len).ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        let offset = i64::try_from(offset).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: a fresh shared mapping chosen by the kernel (no fixed address), so no
        // existing memory is replaced; it is unmapped only in Drop.
        let ptr = unsafe {
            mmap(
                None,
                size,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
                fd.as_fd(),
                offset,
            )?
        };
        Ok(MmioArea { ptr: ptr.cast(), len })
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    fn at<T>(&self, offset: usize) -> Option<*mut T> {
        let end = offset.checked_add(size_of::<T>())?;
        if end > self.len || !offset.is_multiple_of(align_of::<T>()) {
            return None;
        }
        // SAFETY: offset + size_of::<T>() <= len, so the pointer stays inside the mapping.
        Some(unsafe { self.ptr.as_ptr().add(offset) }.cast())
    }

    pub(crate) fn read32(&self, offset: usize) -> Option<u32> {
        // SAFETY: `at` checked bounds and alignment; MMIO needs a volatile load.
        self.at::<u32>(offset).map(|p| unsafe { p.read_volatile() })
    }

    pub(crate) fn write32(&self, offset: usize, value: u32) -> Option<()> {
        // SAFETY: `at` checked bounds and alignment; MMIO needs a volatile store.
        self.at::<u32>(offset).map(|p| unsafe { p.write_volatile(value) })
    }

    pub(crate) fn read64(&self, offset: usize) -> Option<u64> {
        // SAFETY: `at` checked bounds and alignment; MMIO needs a volatile load.
        self.at::<u64>(offset).map(|p| unsafe { p.read_volatile() })
    }

    pub(crate) fn write64(&self, offset: usize, value: u64) -> Option<()> {
        // SAFETY: `at` checked bounds and alignment; MMIO needs a volatile store.
        self.at::<u64>(offset).map(|p| unsafe { p.write_volatile(value) })
    }
}

impl Drop for MmioArea {
    fn drop(&mut self) {
        // SAFETY: ptr/len are exactly the mapping made in `map`, and no reference into it
        // exists (accessors hand out values only).
        let _ = unsafe { munmap(self.ptr.cast(), self.len) };
    }
}
