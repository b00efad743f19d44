//! DMA buffers and IOVA allocation.
//!
//! A [`DmaBuffer`] is anonymous memory, huge pages when the size allows and the system has
//! them, 4 KiB pages otherwise, which the device reads and writes once mapped into the
//! container's IOMMU. It is device-visible memory, so it is never exposed as `&[u8]`: data
//! moves through volatile accessors and copies to and from caller slices.
#![allow(unsafe_code)]

use std::io;
use std::ops::RangeInclusive;
use std::ptr::NonNull;

use nix::sys::mman::{MapFlags, ProtFlags, mmap_anonymous, munmap};

/// 2 MiB huge pages.
pub const HUGE_PAGE: usize = 2 << 20;
/// 4 KiB pages.
pub const PAGE: usize = 4096;

/// Memory a device may read and write by DMA.
#[derive(Debug)]
pub struct DmaBuffer {
    ptr: NonNull<u8>,
    len: usize,
    huge: bool,
}

// SAFETY: the buffer owns its mapping; all access goes through volatile loads/stores or
// raw copies, never through references, so sharing it between threads is sound.
unsafe impl Send for DmaBuffer {}
// SAFETY: as above.
unsafe impl Sync for DmaBuffer {}

/// Plain integers that can be read from and written to device-visible memory.
pub trait Scalar: Copy + sealed::Sealed {}
impl Scalar for u8 {}
impl Scalar for u16 {}
impl Scalar for u32 {}
impl Scalar for u64 {}
mod sealed {
    pub trait Sealed {}
    impl Sealed for u8 {}
    impl Sealed for u16 {}
    impl Sealed for u32 {}
    impl Sealed for u64 {}
}

impl DmaBuffer {
    /// Allocates at least `len` bytes, zeroed and populated: 2 MiB huge pages when `len` is
    /// a multiple of 2 MiB and huge pages are available, else 4 KiB pages.
    pub fn new(len: usize) -> io::Result<DmaBuffer> {
        if len == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a DMA buffer needs at least one byte",
            ));
        }
        if len.is_multiple_of(HUGE_PAGE)
            && let Ok(buf) = Self::map(len, MapFlags::MAP_HUGETLB)
        {
            return Ok(DmaBuffer { huge: true, ..buf });
        }
        Self::map(len.next_multiple_of(PAGE), MapFlags::empty())
    }

    fn map(len: usize, extra: MapFlags) -> io::Result<DmaBuffer> {
        let size =
            std::num::NonZeroUsize::new(len).ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: a fresh private anonymous mapping at an address the kernel picks; nothing
        // else is replaced, and it is unmapped only in Drop.
        let ptr = unsafe {
            mmap_anonymous(
                None,
                size,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_PRIVATE | MapFlags::MAP_POPULATE | extra,
            )?
        };
        Ok(DmaBuffer {
            ptr: ptr.cast(),
            len,
            huge: false,
        })
    }

    /// Length in bytes (a whole number of pages).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Never empty; here for API symmetry.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether it sits on huge pages.
    pub fn is_huge(&self) -> bool {
        self.huge
    }

    /// The virtual address, for `VFIO_IOMMU_MAP_DMA`.
    pub fn vaddr(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }

    fn at<T>(&self, offset: usize, count: usize) -> Option<*mut T> {
        let bytes = size_of::<T>().checked_mul(count)?;
        if offset.checked_add(bytes)? > self.len || !offset.is_multiple_of(align_of::<T>()) {
            return None;
        }
        // SAFETY: the range [offset, offset + bytes) lies inside the mapping.
        Some(unsafe { self.ptr.as_ptr().add(offset) }.cast())
    }

    /// A volatile read at `offset` (bounds and alignment checked).
    pub fn read<T: Scalar>(&self, offset: usize) -> Option<T> {
        // SAFETY: `at` checked bounds and alignment; the device may write concurrently, so
        // the load is volatile and no reference is formed.
        self.at::<T>(offset, 1).map(|p| unsafe { p.read_volatile() })
    }

    /// A volatile write at `offset` (bounds and alignment checked).
    pub fn write<T: Scalar>(&self, offset: usize, value: T) -> Option<()> {
        // SAFETY: `at` checked bounds and alignment; volatile, no reference formed.
        self.at::<T>(offset, 1)
            .map(|p| unsafe { p.write_volatile(value) })
    }

    /// Copies `src` into the buffer at `offset`. Returns `None` when out of bounds.
    pub fn copy_from(&self, offset: usize, src: &[u8]) -> Option<()> {
        let dst = self.at::<u8>(offset, src.len())?;
        // SAFETY: `dst` has room for src.len() bytes inside the mapping, and `src` is
        // caller memory, so the two cannot overlap.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst, src.len()) };
        Some(())
    }

    /// Copies from the buffer at `offset` into `dst`. Returns `None` when out of bounds.
    pub fn copy_to(&self, offset: usize, dst: &mut [u8]) -> Option<()> {
        let src = self.at::<u8>(offset, dst.len())?;
        // SAFETY: `src` has dst.len() readable bytes inside the mapping, and `dst` is caller
        // memory, so they cannot overlap.
        unsafe { std::ptr::copy_nonoverlapping(src, dst.as_mut_ptr(), dst.len()) };
        Some(())
    }

    /// Zeroes the whole buffer.
    pub fn zero(&self) {
        // SAFETY: the whole mapping is writable and `len` bytes long.
        unsafe { std::ptr::write_bytes(self.ptr.as_ptr(), 0, self.len) };
    }
}

impl Drop for DmaBuffer {
    fn drop(&mut self) {
        // SAFETY: ptr/len are exactly the mapping made in `map`; no reference into it exists.
        let _ = unsafe { munmap(self.ptr.cast(), self.len) };
    }
}

/// Hands out IOVA ranges from the ranges the IOMMU accepts (QEMU's intel-iommu: 39 bits),
/// first fit, aligned, and takes them back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IovaAllocator {
    // Free extents as (start, end inclusive), sorted and disjoint.
    free: Vec<(u64, u64)>,
}

impl IovaAllocator {
    /// An allocator over `ranges` (inclusive). IOVA 0 is never handed out, so that a zero
    /// address in a descriptor always means "unset".
    pub fn new(ranges: &[RangeInclusive<u64>]) -> Self {
        let mut free: Vec<(u64, u64)> = ranges
            .iter()
            .map(|r| ((*r.start()).max(PAGE as u64), *r.end()))
            .filter(|(s, e)| s <= e)
            .collect();
        free.sort_unstable();
        IovaAllocator { free }
    }

    /// Reserves `size` bytes aligned to `align` (a power of two). `None` when no free
    /// extent is large enough.
    pub fn alloc(&mut self, size: u64, align: u64) -> Option<u64> {
        if size == 0 || !align.is_power_of_two() {
            return None;
        }
        for i in 0..self.free.len() {
            let (start, end) = self.free[i];
            let Some(at) = start.checked_next_multiple_of(align) else {
                continue;
            };
            let Some(last) = at.checked_add(size - 1) else {
                continue;
            };
            if at > end || last > end {
                continue;
            }
            // Split the extent around [at, last].
            let mut rest = Vec::with_capacity(2);
            if start < at {
                rest.push((start, at - 1));
            }
            if last < end {
                rest.push((last + 1, end));
            }
            self.free.splice(i..=i, rest);
            return Some(at);
        }
        None
    }

    /// Returns [iova, iova + size) to the free extents, merging neighbours.
    pub fn free(&mut self, iova: u64, size: u64) {
        if size == 0 {
            return;
        }
        let end = iova.saturating_add(size - 1);
        let i = self.free.partition_point(|&(s, _)| s < iova);
        self.free.insert(i, (iova, end));
        // Merge with the next, then the previous.
        if i + 1 < self.free.len() && self.free[i].1.checked_add(1) == Some(self.free[i + 1].0) {
            self.free[i].1 = self.free[i + 1].1;
            self.free.remove(i + 1);
        }
        if i > 0 && self.free[i - 1].1.checked_add(1) == Some(self.free[i].0) {
            self.free[i - 1].1 = self.free[i].1;
            self.free.remove(i);
        }
    }

    /// Bytes free.
    pub fn available(&self) -> u64 {
        self.free.iter().map(|(s, e)| (e - s).saturating_add(1)).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn buffer_accessors_are_checked() {
        let b = DmaBuffer::new(100).unwrap();
        assert_eq!(b.len(), PAGE);
        assert_eq!(b.read::<u32>(0), Some(0));
        b.write::<u32>(8, 0xdead_beef).unwrap();
        assert_eq!(b.read::<u32>(8), Some(0xdead_beef));
        assert_eq!(b.read::<u64>(4), None, "misaligned");
        assert_eq!(b.read::<u64>(PAGE - 4), None, "out of bounds");
        b.copy_from(16, b"hello").unwrap();
        let mut out = [0u8; 5];
        b.copy_to(16, &mut out).unwrap();
        assert_eq!(&out, b"hello");
        assert!(b.copy_from(PAGE - 2, b"abc").is_none());
    }

    #[test]
    fn iovas_stay_inside_a_39_bit_space() {
        let top = (1u64 << 39) - 1;
        let mut a = IovaAllocator::new(&[0..=0xfedf_ffff, 0xfef0_0000..=top]);
        let x = a.alloc(1 << 20, 1 << 21).unwrap();
        assert_eq!(x % (1 << 21), 0);
        assert!(x >= PAGE as u64);
        let big = a.alloc(1 << 36, 1 << 12).unwrap();
        assert!(big + (1 << 36) - 1 <= top);
        assert!(a.alloc(1 << 40, 4096).is_none());
        a.free(x, 1 << 20);
        a.free(big, 1 << 36);
        assert_eq!(a, IovaAllocator::new(&[0..=0xfedf_ffff, 0xfef0_0000..=top]));
    }

    proptest! {
        #[test]
        fn allocations_never_overlap_and_free_restores(sizes in proptest::collection::vec((1u64..1 << 24, 12u32..22), 1..40)) {
            let ranges = [0..=(1u64 << 32) - 1, (1 << 33)..=(1u64 << 39) - 1];
            let mut a = IovaAllocator::new(&ranges);
            let before = a.available();
            let mut got: Vec<(u64, u64)> = Vec::new();
            for (size, align) in sizes {
                if let Some(at) = a.alloc(size, 1 << align) {
                    prop_assert_eq!(at % (1 << align), 0);
                    prop_assert!(ranges.iter().any(|r| r.contains(&at) && r.contains(&(at + size - 1))));
                    for &(s, l) in &got {
                        prop_assert!(at + size <= s || s + l <= at, "overlap");
                    }
                    got.push((at, size));
                }
            }
            for (s, l) in got {
                a.free(s, l);
            }
            prop_assert_eq!(a.available(), before);
            prop_assert_eq!(a, IovaAllocator::new(&ranges));
        }
    }
}
