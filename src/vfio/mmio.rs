//! Mapped device memory (BARs): volatile accesses only, never references.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::ptr::NonNull;

use nix::sys::mman::{MapFlags, ProtFlags, mmap, munmap};

use crate::vfio::fault::{self, FaultOwner, Registration};

/// One mmapped area of a region. Accesses are bounds- and alignment-checked and volatile.
///
/// Registered with the SIGBUS handler ([`fault`]) while mapped: after a surprise removal
/// the handler may replace the mapping with all-ones memory, which the accessors cannot
/// tell from the device (see [`faulted`](Self::faulted)).
#[derive(Debug)]
pub(crate) struct MmioArea {
    ptr: NonNull<u8>,
    len: usize,
    // `None` when the fault table was full: not covered.
    registration: Option<Registration>,
}

// SAFETY: the area is plain device memory owned by this value; the accessors take `&self`
// and do single volatile loads and stores, which the device tolerates from any thread.
unsafe impl Send for MmioArea {}
// SAFETY: as above: no interior state besides the mapping, all access is volatile.
unsafe impl Sync for MmioArea {}

impl MmioArea {
    /// Maps `len` bytes of `fd` at `offset`, shared, read-write, and registers the area
    /// with the SIGBUS handler as `owner`'s.
    pub(crate) fn map(
        fd: BorrowedFd<'_>,
        offset: u64,
        len: usize,
        owner: FaultOwner,
    ) -> io::Result<MmioArea> {
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
        let ptr = ptr.cast();
        Ok(MmioArea {
            ptr,
            len,
            registration: fault::register(ptr, len, owner),
        })
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Whether the SIGBUS handler replaced the area with all-ones memory (the device is
    /// gone).
    pub(crate) fn faulted(&self) -> bool {
        self.registration.as_ref().is_some_and(Registration::faulted)
    }

    /// The area's key in the SIGBUS table, for [`fault::revoke`]; `None` when the table
    /// was full (the area cannot be revoked).
    pub(crate) fn key(&self) -> Option<fault::AreaKey> {
        self.registration.as_ref().map(Registration::key)
    }

    #[cfg(test)]
    pub(crate) fn registration(&self) -> Option<&Registration> {
        self.registration.as_ref()
    }

    fn at<T>(&self, offset: usize) -> Option<*mut T> {
        let end = offset.checked_add(size_of::<T>())?;
        if end > self.len || !offset.is_multiple_of(align_of::<T>()) {
            return None;
        }
        // SAFETY: offset + size_of::<T>() <= len, so the pointer stays inside the mapping.
        Some(unsafe { self.ptr.as_ptr().add(offset) }.cast())
    }

    pub(crate) fn read8(&self, offset: usize) -> Option<u8> {
        // SAFETY: `at` checked bounds (and alignment, trivial for a byte); MMIO needs a
        // volatile load, of exactly this width.
        self.at::<u8>(offset).map(|p| unsafe { p.read_volatile() })
    }

    pub(crate) fn write8(&self, offset: usize, value: u8) -> Option<()> {
        // SAFETY: `at` checked bounds; MMIO needs a volatile store of exactly this width.
        self.at::<u8>(offset).map(|p| unsafe { p.write_volatile(value) })
    }

    pub(crate) fn read16(&self, offset: usize) -> Option<u16> {
        // SAFETY: `at` checked bounds and 2-byte alignment; MMIO needs a volatile load of
        // exactly this width (a virtio 16-bit field must not be read as 32 bits).
        self.at::<u16>(offset).map(|p| unsafe { p.read_volatile() })
    }

    pub(crate) fn write16(&self, offset: usize, value: u16) -> Option<()> {
        // SAFETY: `at` checked bounds and 2-byte alignment; MMIO needs a volatile store of
        // exactly this width (a wider one would also write the neighbouring field).
        self.at::<u16>(offset).map(|p| unsafe { p.write_volatile(value) })
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
        // Unregistered first: once unmapped, the range may be mapped again by anyone, and
        // the handler must not replace their memory.
        self.registration = None;
        // SAFETY: ptr/len are exactly the mapping made in `map` (or the handler's
        // replacement of it, at the same place and size), and no reference into it exists
        // (accessors hand out values only).
        if let Err(errno) = unsafe { munmap(self.ptr.cast(), self.len) } {
            super::dma::munmap_failed("a BAR area", self.ptr.as_ptr() as usize, self.len, errno);
        }
    }
}
