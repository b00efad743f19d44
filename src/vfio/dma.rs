//! DMA memory: buffers, their mapping into a container, and IOVA allocation.
//!
//! A [`DmaBuffer`] is anonymous memory, huge pages when the size allows and the system has
//! them (2 MiB by default, 1 GiB when asked: [`HugePageSize`]), CPU pages otherwise,
//! which the device reads and writes once mapped into the container's IOMMU. [`Container::map`](super::Container::map) turns it into a
//! [`DmaRegion`]: one owned value holding the buffer, its IOVA and the container, unmapped
//! when dropped.
//!
//! # Page sizes
//!
//! Three sizes are kept apart:
//!
//! - **The CPU page** ([`cpu_page_size`], `sysconf(_SC_PAGESIZE)`, read once): 4 KiB on
//!   x86-64; 4, 16 or 64 KiB on aarch64 (RHEL and Ampere-style servers run 64 KiB
//!   kernels). mmap works in it, and the kernel pins and maps for DMA no less than one.
//!   A buffer is a whole number of them at an address aligned to one, so
//!   `DmaBuffer::new(4096)` is 64 KiB long on a 64 KiB kernel; caller memory
//!   ([`DmaBuffer::from_memory`]) and [`PageBuffer`] follow it too, and BAR mmaps are
//!   rounded to it.
//! - **The IOMMU granule** ([`Container::dma_granule`](super::Container::dma_granule)): the
//!   larger of the CPU page and the IOMMU's smallest page (the lowest bit of
//!   `VFIO_IOMMU_GET_INFO`'s `iova_pgsizes`; iommufd's `out_iova_alignment`). VFIO's and
//!   iommufd's map calls want address, IOVA and length multiples of it (`EINVAL`
//!   otherwise). IOVAs are allocated aligned to it; `alloc_dma` rounds lengths up to it
//!   (and aligns the address, in the rare case it exceeds the CPU page); `map` of other
//!   memory fails early with [`VfioError::NotGranuleAligned`].
//! - **The NVMe memory page** (CC.MPS): the driver sets 4 KiB whatever the CPU page, and
//!   builds PRPs in 4 KiB units; a PRP may point into the middle of a 64 KiB CPU page,
//!   which is fine for the device. [`PAGE`] (4096) names that unit and stays.
//!
//! # How the bytes are reached
//!
//! The memory is device-visible, so it is never exposed as `&[u8]` or `&T`: the device may
//! write it at any moment, which a reference would forbid. Every access is an **atomic
//! access of one aligned 8-byte word** (`AtomicU64` at the word's address):
//!
//! - The accessors take `&self`, so several threads may use one buffer at once (an NVMe
//!   driver fills submission entries on one thread while another polls completions).
//!   Plain or volatile stores through `&self` would be a data race, which is undefined
//!   behaviour even when volatile; atomic accesses are not. `&mut self` for bulk writes
//!   would not help: it excludes other threads but not the device, and it would force a
//!   driver to lock a whole queue to copy one entry.
//! - One access width for all of them: the memory model allows racing atomic writes only
//!   between accesses of the same size. Values narrower than a word are read from their
//!   word and written by a compare-and-exchange on it, so a `u32` written next to one the
//!   device or another thread writes never clobbers it.
//! - Relaxed ordering unless asked ([`DmaBuffer::load_acquire`],
//!   [`DmaBuffer::store_release`]). On x86-64 and aarch64 a relaxed aligned 8-byte load or
//!   store is a plain move, so bulk copies cost a word move per 8 bytes.
//! - Each aligned word is single-copy atomic; a larger object ([`DmaBuffer::read_obj`]) or
//!   byte range is not: it is copied word by word, and a concurrent writer can be seen
//!   half-way. Protocols publish with a flag word (NVMe's phase bit): read the flag with
//!   [`DmaBuffer::load_acquire`], then the rest.
#![allow(unsafe_code)]

use std::any::Any;
use std::fmt;
use std::io;
use std::mem::MaybeUninit;
use std::ops::Deref;
use std::os::fd::AsFd;
use std::ptr::NonNull;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use nix::sys::mman::{MapFlags, ProtFlags, mmap_anonymous, munmap};

use super::constraints::DmaConstraints;
use super::iova::{IovaSpace, SpaceId, UnmapAnswer};
use super::{Container, Space, VfioError, sys};

/// 2 MiB huge pages.
pub const HUGE_PAGE: usize = 2 << 20;
/// 4 KiB: the smallest page of any kernel pcibus runs on, and the NVMe memory page its
/// driver uses (CC.MPS = 0; PRPs point into 4 KiB pages whatever the CPU's page size).
///
/// It is **not** what DMA memory is rounded to: on a kernel with larger pages (aarch64
/// with 16 or 64 KiB) buffers are whole CPU pages ([`cpu_page_size`]) and mappings whole
/// IOMMU granules ([`Container::dma_granule`](super::Container::dma_granule)). Code that
/// rounded to `PAGE` for DMA should round to those; the value stays 4096 for the
/// places that mean the 4 KiB unit itself.
pub const PAGE: usize = 4096;

/// The CPU's page size (`sysconf(_SC_PAGESIZE)`), read once: 4 KiB on x86-64, 4, 16 or
/// 64 KiB on aarch64. A [`DmaBuffer`] is a whole number of these (or of its huge pages),
/// at an address aligned to one; mmap works in these units. A value the system reports
/// that is not a power of two of at least 4 KiB (never seen) is taken as 4 KiB.
pub fn cpu_page_size() -> usize {
    static CPU_PAGE: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *CPU_PAGE.get_or_init(|| {
        // SAFETY: sysconf reads a constant of the system; it has no memory effects.
        let raw = unsafe { nix::libc::sysconf(nix::libc::_SC_PAGESIZE) };
        page_size_from(raw)
    })
}

/// `sysconf`'s answer made a page size: a power of two from 4 KiB to 1 GiB, else 4 KiB.
fn page_size_from(raw: std::ffi::c_long) -> usize {
    match usize::try_from(raw) {
        Ok(n) if n.is_power_of_two() && (PAGE..=1 << 30).contains(&n) => n,
        _ => PAGE,
    }
}

/// The unit of a DMA mapping: the larger of the CPU page and the IOMMU's smallest page
/// (`iommu_min_page`; 0 when unknown). VFIO's and iommufd's map calls refuse an address or
/// length that is not a multiple of the IOMMU's page, and the kernel never maps less than
/// a CPU page.
pub(crate) fn dma_granule(cpu_page: usize, iommu_min_page: u64) -> u64 {
    (cpu_page as u64).max(iommu_min_page)
}

const WORD: usize = 8;

/// The huge page sizes a [`DmaBuffer`] can ask for.
///
/// mmap's `MAP_HUGETLB` alone means the *default* huge page size, which is whatever the
/// host was booted with (`default_hugepagesz=1G` is common on DPDK and SPDK hosts): a
/// 2 MiB request would then take a whole 1 GiB page. So the size is always named in the
/// flags (`MAP_HUGE_2MB`, `MAP_HUGE_1GB`), and the pages come from that size's pool
/// (`/sys/kernel/mm/hugepages/hugepages-<size>kB`) or not at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum HugePageSize {
    /// 2 MiB (x86-64, and aarch64 with 4 KiB pages). The default.
    #[default]
    Mib2,
    /// 1 GiB: reserved at boot (`hugepagesz=1G hugepages=N`) or, when memory is not yet
    /// fragmented, through the pool's `nr_hugepages`.
    Gib1,
}

impl HugePageSize {
    /// log2 of the size in bytes.
    pub const fn log2(self) -> u32 {
        match self {
            HugePageSize::Mib2 => 21,
            HugePageSize::Gib1 => 30,
        }
    }

    /// The size in bytes.
    pub const fn bytes(self) -> usize {
        1 << self.log2()
    }
}

impl fmt::Display for HugePageSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            HugePageSize::Mib2 => "2 MiB",
            HugePageSize::Gib1 => "1 GiB",
        })
    }
}

/// Where mmap's flags keep log2 of the huge page size (`MAP_HUGE_SHIFT`).
const MAP_HUGE_SHIFT: u32 = 26;

/// How a buffer is to be mapped: decided from the length and the huge page size asked
/// for, before any system call ([`MapPlan::new`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct MapPlan {
    /// The huge page mapping to try first, if the length allows one.
    huge: Option<HugeMapping>,
    /// The length on CPU pages: what is mapped when there is no huge mapping to try, or
    /// it fails.
    small_len: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct HugeMapping {
    size: HugePageSize,
    /// A whole number of `size` pages: a hugetlb mapping is unmapped only in whole pages,
    /// so the length recorded for munmap must be that.
    len: usize,
    /// The mmap flags beyond `MAP_PRIVATE | MAP_POPULATE`: `MAP_HUGETLB` and the size.
    flags: i32,
}

impl MapPlan {
    /// The plan for `len` bytes with huge pages of `size`, or else pages of `page` bytes
    /// (the CPU's: [`cpu_page_size`]): when `round_up`, the length is rounded up to whole
    /// huge pages; otherwise huge pages are tried only when `len` is a whole number of them
    /// already. `None` for an empty or unrepresentable length.
    fn new(len: usize, size: HugePageSize, round_up: bool, page: usize) -> Option<MapPlan> {
        if len == 0 {
            return None;
        }
        let small_len = len.checked_next_multiple_of(page)?;
        let huge_len = if round_up {
            len.checked_next_multiple_of(size.bytes())
        } else {
            len.is_multiple_of(size.bytes()).then_some(len)
        };
        let flags = nix::libc::MAP_HUGETLB | ((size.log2() as i32) << MAP_HUGE_SHIFT);
        Some(MapPlan {
            huge: huge_len.map(|len| HugeMapping { size, len, flags }),
            small_len,
        })
    }
}

/// munmap calls of this layer (DMA buffers, BAR mappings) that failed.
static MUNMAP_FAILURES: AtomicU64 = AtomicU64::new(0);

/// How many munmap calls of the vfio layer (of [`DmaBuffer`]s and BAR mappings) have
/// failed in this process. Each failure leaves the memory mapped (a leak, never a
/// use-after-free) and is logged at error level; this count is for monitoring and tests.
pub fn munmap_failures() -> u64 {
    MUNMAP_FAILURES.load(Ordering::Relaxed)
}

/// Counts and logs a failed munmap of `len` bytes at `vaddr` (`what`: whose mapping).
pub(super) fn munmap_failed(what: &str, vaddr: usize, len: usize, errno: nix::errno::Errno) {
    MUNMAP_FAILURES.fetch_add(1, Ordering::Relaxed);
    log::error!("munmap of {what} at {vaddr:#x} ({len} bytes) failed: {errno}; its memory stays mapped");
}

/// The count for a failed munmap where nothing may be logged (a signal handler): an
/// atomic add is async-signal-safe.
pub(super) fn munmap_failed_in_signal_handler() {
    MUNMAP_FAILURES.fetch_add(1, Ordering::Relaxed);
}

/// Memory a device may read and write by DMA. Not yet mapped: see
/// [`Container::map`](super::Container::map).
///
/// # Dropping
///
/// Dropping unmaps the memory from the process. A buffer that was mapped for DMA is owned
/// by its [`DmaRegion`], which unmaps it from the IOMMU first, so the device can never
/// write into freed memory.
pub struct DmaBuffer {
    ptr: NonNull<u8>,
    len: usize,
    huge: Option<HugePageSize>,
    // `Some`: the memory is the caller's ([`DmaBuffer::from_memory`]): this value owns it
    // and frees it by being dropped; `None`: our own mmap, munmapped on drop.
    caller: Option<Box<dyn Any + Send>>,
}

impl fmt::Debug for DmaBuffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DmaBuffer")
            .field("vaddr", &format_args!("{:#x}", self.vaddr()))
            .field("len", &self.len)
            .field("huge", &self.huge)
            .field("caller_memory", &self.caller.is_some())
            .finish()
    }
}

// SAFETY: the buffer owns its mapping; all access goes through atomic operations on its
// words (see the module docs), never through references to the bytes, so moving it to
// and sharing it between threads is sound. The caller's memory owner is `Send`, and is
// touched only by value (drop, `into_memory`), never through `&self`.
unsafe impl Send for DmaBuffer {}
// SAFETY: as above: the `&self` accessors are atomic word accesses; `&self` never reaches
// the caller's owner.
unsafe impl Sync for DmaBuffer {}

mod sealed {
    pub trait Sealed {}
}

/// Plain integers that can be read from and written to device-visible memory.
pub trait Scalar: Copy + sealed::Sealed {
    #[doc(hidden)]
    fn from_ne_slice(b: &[u8]) -> Self;
    #[doc(hidden)]
    fn write_ne(self, b: &mut [u8]);
}

macro_rules! scalar {
    ($($t:ty),*) => {$(
        impl sealed::Sealed for $t {}
        impl Scalar for $t {
            #[inline]
            fn from_ne_slice(b: &[u8]) -> Self {
                let mut a = [0u8; size_of::<$t>()];
                a.copy_from_slice(b);
                <$t>::from_ne_bytes(a)
            }
            #[inline]
            fn write_ne(self, b: &mut [u8]) {
                b.copy_from_slice(&self.to_ne_bytes());
            }
        }
        // SAFETY: an integer has no padding and every bit pattern is a valid value.
        unsafe impl DmaObj for $t {}
    )*};
}
scalar!(u8, u16, u32, u64);

/// Plain-old-data types that may be copied to and from device-visible memory as bytes
/// ([`DmaBuffer::read_obj`], [`DmaBuffer::write_obj`]): NVMe submission entries
/// (`[u32; 16]`, 64 bytes) and completion entries (`[u32; 4]`, 16 bytes), or a driver's
/// own `#[repr(C)]` structures.
///
/// # Safety
///
/// An implementor must be `#[repr(C)]` (or `#[repr(transparent)]`) or a primitive or
/// array, have **no padding bytes** (every byte of a value is initialized, so it may be
/// copied out as bytes), and accept **every bit pattern** as a valid value (the device
/// may write anything, so it may be copied in from bytes): integers and arrays and
/// structures of them qualify; `bool`, `char`, enums, references and pointers do not.
pub unsafe trait DmaObj: Copy + 'static {}

// SAFETY: an array of POD elements has no padding between elements (size is a multiple
// of alignment) and is valid for every bit pattern if its elements are.
unsafe impl<T: DmaObj, const N: usize> DmaObj for [T; N] {}

impl DmaBuffer {
    /// Allocates at least `len` bytes, zeroed and populated: 2 MiB huge pages when `len` is
    /// a multiple of 2 MiB and the 2 MiB pool has pages free, else 4 KiB pages (logged: see
    /// [`with_huge_pages`](Self::with_huge_pages)).
    pub fn new(len: usize) -> io::Result<DmaBuffer> {
        Self::allocate(len, HugePageSize::Mib2, false, None, cpu_page_size())
    }

    /// Allocates `len` bytes rounded up to whole huge pages of `size`, zeroed and
    /// populated, on pages of that size (never the host's default size, unless it is
    /// this one).
    ///
    /// When the pool of that size has too few pages free (none reserved, or all taken),
    /// the buffer falls back to 4 KiB pages, `len` rounded up to 4 KiB: the same memory
    /// for the device, without the fewer IOTLB entries. The fallback is logged (a warning
    /// the first time for each size, then at debug level); [`is_huge`](Self::is_huge) and
    /// [`page_size`](Self::page_size) tell which one the buffer got.
    pub fn with_huge_pages(len: usize, size: HugePageSize) -> io::Result<DmaBuffer> {
        Self::allocate(len, size, true, None, cpu_page_size())
    }

    /// As [`new`](Self::new), with the pages preferably on NUMA node `node`: the mapping
    /// is bound with `mbind(MPOL_PREFERRED)` before its pages are first touched, then
    /// populated. When the binding fails (no such node, a kernel without NUMA) the buffer
    /// is allocated all the same, wherever the kernel puts it, with a warning in the log:
    /// the node is a preference (see
    /// [`DmaConstraints::numa_node`](super::DmaConstraints::numa_node)).
    pub fn on_node(len: usize, node: u32) -> io::Result<DmaBuffer> {
        Self::allocate(len, HugePageSize::Mib2, false, Some(node), cpu_page_size())
    }

    // `granule`: what the length and address must be multiples of (a power of two, at
    // least the CPU page): larger than the CPU page only for an IOMMU whose smallest page
    // is ([`Container::dma_granule`]).
    fn allocate(
        len: usize,
        size: HugePageSize,
        round_up: bool,
        node: Option<u32>,
        granule: usize,
    ) -> io::Result<DmaBuffer> {
        let plan = MapPlan::new(len, size, round_up, granule).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("a DMA buffer of {len} bytes cannot be mapped"),
            )
        })?;
        if let Some(huge) = plan.huge {
            match Self::map(huge.len, MapFlags::from_bits_retain(huge.flags), node) {
                Ok((ptr, len)) => {
                    let buffer = DmaBuffer {
                        ptr,
                        len,
                        huge: Some(huge.size),
                        caller: None,
                    };
                    buffer.populate(node);
                    return Ok(buffer);
                }
                Err(e) => huge_fallback(huge.size, huge.len, &e),
            }
        }
        let (ptr, len) = Self::map_aligned(plan.small_len, granule, node)?;
        let buffer = DmaBuffer {
            ptr,
            len,
            huge: None,
            caller: None,
        };
        buffer.populate(node);
        Ok(buffer)
    }

    // Returns the bare mapping: the caller makes it a DmaBuffer (and so the owner that
    // unmaps it) exactly once. Populated by mmap, unless it is to be bound to `node`
    // first: then bound here, and populated by the caller (`populate`).
    fn map(len: usize, extra: MapFlags, node: Option<u32>) -> io::Result<(NonNull<u8>, usize)> {
        let size =
            std::num::NonZeroUsize::new(len).ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        let populate = if node.is_some() {
            MapFlags::empty()
        } else {
            MapFlags::MAP_POPULATE
        };
        // SAFETY: a fresh private anonymous mapping at an address the kernel picks; nothing
        // else is replaced, and it is unmapped only in Drop.
        let ptr = unsafe {
            mmap_anonymous(
                None,
                size,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_PRIVATE | populate | extra,
            )?
        };
        if let Some(node) = node
            && let Err(e) = mbind_preferred(ptr.as_ptr() as usize, len, node)
        {
            log::warn!(
                "cannot prefer NUMA node {node} for a DMA buffer of {len} bytes ({e}); its pages go where the kernel puts them"
            );
        }
        Ok((ptr.cast(), len))
    }

    // `len` bytes (whole CPU pages) at an address aligned to `align`: mmap's own when
    // `align` is no larger than a CPU page, else cut out of a larger mapping whose
    // unaligned head and tail are unmapped again.
    fn map_aligned(len: usize, align: usize, node: Option<u32>) -> io::Result<(NonNull<u8>, usize)> {
        let page = cpu_page_size();
        if align <= page {
            return Self::map(len, MapFlags::empty(), node);
        }
        let over = len
            .checked_add(align - page)
            .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        let (ptr, mapped) = Self::map(over, MapFlags::empty(), node)?;
        let (head, tail) = trim_to_alignment(ptr.as_ptr() as usize, len, mapped, align);
        for (at, n) in [(0, head), (head + len, tail)] {
            if n == 0 {
                continue;
            }
            // SAFETY: `at..at + n` is inside the mapping just made and outside the part
            // kept (`head..head + len`); nothing refers to it.
            let gone = unsafe { munmap(ptr.add(at).cast(), n) };
            if let Err(errno) = gone {
                munmap_failed(
                    "a DMA buffer's alignment slack",
                    ptr.as_ptr() as usize + at,
                    n,
                    errno,
                );
            }
        }
        // SAFETY: `head < mapped`, so the pointer stays inside the mapping (non-null).
        Ok((unsafe { ptr.add(head) }, len))
    }

    // Faults every page in (under the policy `map` bound), as MAP_POPULATE would have: a
    // write of zero to the first word of each page, which is zero already.
    fn populate(&self, node: Option<u32>) {
        if node.is_none() {
            return;
        }
        for at in (0..self.len).step_by(cpu_page_size()) {
            self.word(at).store(0, Ordering::Relaxed);
        }
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
        self.huge.is_some()
    }

    /// The size of the pages it sits on: a [`HugePageSize`]'s bytes, or the CPU's
    /// ([`cpu_page_size`]: 4 KiB on x86-64, maybe 16 or 64 KiB on aarch64).
    pub fn page_size(&self) -> usize {
        self.huge.map_or_else(cpu_page_size, HugePageSize::bytes)
    }

    /// The virtual address, for `VFIO_IOMMU_MAP_DMA`.
    pub fn vaddr(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }

    /// Checks that `len` bytes at `offset` lie inside the buffer, with `offset` aligned to
    /// `align`.
    fn check(&self, offset: usize, len: usize, align: usize) -> Option<()> {
        let end = offset.checked_add(len)?;
        (end <= self.len && offset.is_multiple_of(align)).then_some(())
    }

    /// The word at byte `at` (a multiple of 8, below `len`).
    fn word(&self, at: usize) -> &AtomicU64 {
        debug_assert!(at.is_multiple_of(WORD) && at + WORD <= self.len);
        // SAFETY: `at` is 8-aligned and inside the mapping (callers checked; the mapping is
        // page aligned and a whole number of pages, so every word of it is in bounds and
        // aligned for AtomicU64). Every access to the buffer's bytes is an atomic access of
        // such a word, so no non-atomic access races with it; the reference is to an
        // interior-mutable type, so the device writing the word does not contradict it,
        // and it does not outlive `&self`, which keeps the mapping alive.
        unsafe { AtomicU64::from_ptr(self.ptr.as_ptr().add(at).cast()) }
    }

    /// Replaces `bytes.len()` bytes at `at % 8` of the word at `at - at % 8`, keeping the
    /// others: one compare-and-exchange, so a concurrent writer of the other bytes (a
    /// thread or the device) is never overwritten.
    fn store_partial(&self, at: usize, bytes: &[u8], order: Ordering) {
        let base = at - at % WORD;
        let k = at % WORD;
        let word = self.word(base);
        let mut old = word.load(Ordering::Relaxed);
        loop {
            let mut b = old.to_ne_bytes();
            b[k..k + bytes.len()].copy_from_slice(bytes);
            match word.compare_exchange_weak(old, u64::from_ne_bytes(b), order, Ordering::Relaxed) {
                Ok(_) => return,
                Err(now) => old = now,
            }
        }
    }

    fn load<T: Scalar>(&self, offset: usize, order: Ordering) -> Option<T> {
        self.check(offset, size_of::<T>(), align_of::<T>())?;
        let k = offset % WORD;
        let word = self.word(offset - k).load(order).to_ne_bytes();
        Some(T::from_ne_slice(&word[k..k + size_of::<T>()]))
    }

    fn store<T: Scalar>(&self, offset: usize, value: T, order: Ordering) -> Option<()> {
        self.check(offset, size_of::<T>(), align_of::<T>())?;
        let mut b = [0u8; WORD];
        value.write_ne(&mut b[..size_of::<T>()]);
        if size_of::<T>() == WORD {
            self.word(offset).store(u64::from_ne_bytes(b), order);
        } else {
            self.store_partial(offset, &b[..size_of::<T>()], order);
        }
        Some(())
    }

    /// Reads a `T` at `offset` (bounds and alignment to `T` checked), single-copy atomic.
    pub fn read<T: Scalar>(&self, offset: usize) -> Option<T> {
        self.load(offset, Ordering::Relaxed)
    }

    /// Writes a `T` at `offset` (bounds and alignment checked), single-copy atomic; the
    /// other bytes of its 8-byte word are left as they are, even if written concurrently.
    pub fn write<T: Scalar>(&self, offset: usize, value: T) -> Option<()> {
        self.store(offset, value, Ordering::Relaxed)
    }

    /// Reads a `T` at `offset` with acquire ordering: reads after it see at least what was
    /// written before the write that published this value (e.g. an NVMe completion's
    /// phase word, before the rest of the entry).
    pub fn load_acquire<T: Scalar>(&self, offset: usize) -> Option<T> {
        self.load(offset, Ordering::Acquire)
    }

    /// Writes a `T` at `offset` with release ordering: writes before it are visible to a
    /// thread that reads this value with [`load_acquire`](Self::load_acquire). (Towards
    /// the device, a doorbell write is what publishes, not this.)
    pub fn store_release<T: Scalar>(&self, offset: usize, value: T) -> Option<()> {
        self.store(offset, value, Ordering::Release)
    }

    /// Copies from the buffer at `offset` into `dst`, word by word. `None` when out of
    /// bounds.
    pub fn read_at(&self, offset: usize, dst: &mut [u8]) -> Option<()> {
        self.check(offset, dst.len(), 1)?;
        let mut done = 0;
        while done < dst.len() {
            let at = offset + done;
            let k = at % WORD;
            let n = (WORD - k).min(dst.len() - done);
            let word = self.word(at - k).load(Ordering::Relaxed).to_ne_bytes();
            dst[done..done + n].copy_from_slice(&word[k..k + n]);
            done += n;
        }
        Some(())
    }

    /// Copies `src` into the buffer at `offset`, word by word (partial words at either end
    /// by compare-and-exchange). `None` when out of bounds.
    pub fn write_at(&self, offset: usize, src: &[u8]) -> Option<()> {
        self.check(offset, src.len(), 1)?;
        let mut done = 0;
        while done < src.len() {
            let at = offset + done;
            let k = at % WORD;
            let n = (WORD - k).min(src.len() - done);
            if n == WORD {
                let mut w = [0u8; WORD];
                w.copy_from_slice(&src[done..done + WORD]);
                self.word(at).store(u64::from_ne_bytes(w), Ordering::Relaxed);
            } else {
                self.store_partial(at, &src[done..done + n], Ordering::Relaxed);
            }
            done += n;
        }
        Some(())
    }

    /// Writes `words` at `offset` (8-byte aligned), one relaxed atomic store per word:
    /// what [`write_at`](Self::write_at) does for whole words, checked once. `None` when
    /// out of bounds or misaligned.
    #[inline]
    pub fn write_words(&self, offset: usize, words: &[u64]) -> Option<()> {
        self.check(offset, words.len().checked_mul(WORD)?, WORD)?;
        // SAFETY: as in `word`, for each of the `words.len()` words at `offset`: checked
        // in bounds and aligned just above, reached only through atomic accesses, and
        // borrowed no longer than `&self`.
        let dst = unsafe {
            std::slice::from_raw_parts(self.ptr.as_ptr().add(offset).cast::<AtomicU64>(), words.len())
        };
        for (d, &w) in dst.iter().zip(words) {
            d.store(w, Ordering::Relaxed);
        }
        Some(())
    }

    /// Sets `len` bytes at `offset` to `byte`. `None` when out of bounds.
    pub fn fill(&self, offset: usize, len: usize, byte: u8) -> Option<()> {
        self.check(offset, len, 1)?;
        let chunk = [byte; 64];
        let mut done = 0;
        while done < len {
            let n = chunk.len().min(len - done);
            self.write_at(offset + done, &chunk[..n])?;
            done += n;
        }
        Some(())
    }

    /// Zeroes the whole buffer.
    pub fn zero(&self) {
        for at in (0..self.len).step_by(WORD) {
            self.word(at).store(0, Ordering::Relaxed);
        }
    }

    /// Reads a `T` at `offset` (aligned to `T`), word by word: each aligned 8-byte word is
    /// read once, atomically, but the object as a whole is not (see the module docs).
    pub fn read_obj<T: DmaObj>(&self, offset: usize) -> Option<T> {
        self.check(offset, size_of::<T>(), align_of::<T>())?;
        let mut value = MaybeUninit::<T>::uninit();
        // SAFETY: the MaybeUninit is `size_of::<T>()` bytes of writable local memory, and
        // u8 has no alignment or validity requirement, so viewing it as a byte slice to
        // fill is sound (the bytes are written before they are read).
        let bytes =
            unsafe { std::slice::from_raw_parts_mut(value.as_mut_ptr().cast::<u8>(), size_of::<T>()) };
        bytes.fill(0);
        self.read_at(offset, bytes)?;
        // SAFETY: every byte was written just above, and `T: DmaObj` promises that every
        // bit pattern is a valid `T`.
        Some(unsafe { value.assume_init() })
    }

    /// Writes `value` at `offset` (aligned to `T`), word by word (see
    /// [`read_obj`](Self::read_obj)).
    pub fn write_obj<T: DmaObj>(&self, offset: usize, value: &T) -> Option<()> {
        self.check(offset, size_of::<T>(), align_of::<T>())?;
        // SAFETY: `T: DmaObj` promises no padding, so all `size_of::<T>()` bytes of `value`
        // are initialized; the slice borrows `value` and is only read.
        let bytes =
            unsafe { std::slice::from_raw_parts(std::ptr::from_ref(value).cast::<u8>(), size_of::<T>()) };
        self.write_at(offset, bytes)
    }
}

impl Drop for DmaBuffer {
    fn drop(&mut self) {
        if let Some(owner) = self.caller.take() {
            // The caller's memory: its owner frees it (the buffer is not mapped for DMA:
            // a mapped one is inside its region, which forgets it if the unmap fails).
            drop(owner);
            return;
        }
        // SAFETY: ptr/len are exactly the mapping made in `map` (len whole pages of the
        // size it was mapped with); no reference into it outlives `&self`, and a buffer
        // still mapped for DMA is never dropped (its `DmaRegion` forgets it when the
        // unmap fails).
        if let Err(errno) = unsafe { munmap(self.ptr.cast(), self.len) } {
            munmap_failed("a DMA buffer", self.ptr.as_ptr() as usize, self.len, errno);
        }
    }
}

/// Says that a huge page mapping of `len` bytes failed and the buffer goes on 4 KiB
/// pages: a warning the first time for each size, so a host without reserved huge pages
/// learns of it once, then at debug level.
fn huge_fallback(size: HugePageSize, len: usize, error: &io::Error) {
    static WARNED: [AtomicBool; 2] = [AtomicBool::new(false), AtomicBool::new(false)];
    let first = !WARNED[size as usize].swap(true, Ordering::Relaxed);
    let level = if first {
        log::Level::Warn
    } else {
        log::Level::Debug
    };
    log::log!(
        level,
        "no {size} huge pages for a DMA buffer of {len} bytes ({error}); using 4 KiB pages (reserve them in /sys/kernel/mm/hugepages/hugepages-{}kB/nr_hugepages)",
        size.bytes() >> 10
    );
}

/// A [`DmaBuffer`] mapped into a [`Container`]'s IOMMU at an IOVA: one owned value, made
/// by [`Container::map`](super::Container::map). It derefs to the buffer for access.
///
/// The device reaches the buffer at [`iova`](Self::iova) for as long as the region lives;
/// nothing else can unmap it (there is no copyable mapping handle), so a stale handle can
/// never unmap memory that later reused the IOVA.
///
/// # Dropping
///
/// Dropping unmaps the IOVA range (`VFIO_IOMMU_UNMAP_DMA`), then returns it to the
/// container's allocator and frees the pages, in that order. Stop the device's DMA into
/// the region first (delete the queue, disable the controller): a device that still
/// writes after the unmap gets an IOMMU fault, not this process's memory.
///
/// If the unmap fails (or unmaps less than the region), the device may still reach the
/// memory, so the region **leaks deliberately**: the pages stay pinned and allocated,
/// the IOVA range is never handed out again (see [`Container::leaked`]), and the failure
/// is logged. [`unmap`](Self::unmap) does the same but returns the error (and the buffer,
/// on success).
///
/// One failure is not a leak: a group-backend container loses its IOMMU, with every
/// mapping in it, when every device opened in it has been removed (the kernel detaches a
/// group when its last device goes, and releases the IOMMU with the last group). A region
/// that outlives that has nothing left to unmap: its pages are freed, and its IOVA is
/// never unmapped in the IOMMU set up since (where it may belong to another region).
///
/// The region holds an `Arc` of its container, so the container (and the IOMMU address
/// space) outlives every region mapped in it.
///
/// # Process exit
///
/// At exit the kernel closes the container fd, which unmaps everything and unpins the
/// pages; a region that was leaked is released then too.
pub struct DmaRegion {
    // `None` only during drop or after `unmap`.
    buffer: Option<DmaBuffer>,
    iova: u64,
    size: u64,
    // The container's IOVA space (so its IOMMU) it was mapped in.
    space: SpaceId,
    container: Arc<Container>,
}

impl fmt::Debug for DmaRegion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DmaRegion")
            .field("iova", &format_args!("{:#x}", self.iova))
            .field("size", &self.size)
            .field("buffer", &self.buffer)
            .finish()
    }
}

impl DmaRegion {
    /// The address the device uses.
    pub fn iova(&self) -> u64 {
        self.iova
    }

    /// Bytes mapped (the buffer's length).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The buffer.
    pub fn buffer(&self) -> &DmaBuffer {
        self.buffer.as_ref().expect("a live DmaRegion has its buffer")
    }

    /// The container it is mapped in.
    pub fn container(&self) -> &Arc<Container> {
        &self.container
    }

    /// Unmaps the region now and gives the buffer back. On error the region is leaked as
    /// described under "Dropping".
    pub fn unmap(mut self) -> Result<DmaBuffer, VfioError> {
        self.unmap_inner()
    }

    fn unmap_inner(&mut self) -> Result<DmaBuffer, VfioError> {
        let Some(buffer) = self.buffer.take() else {
            return Err(VfioError::Unmap {
                iova: self.iova,
                size: self.size,
                unmapped: None,
                source: None,
            });
        };
        // Locked across the check and the ioctl: the IOMMU cannot be set up again in
        // between, so an unmap never reaches an IOMMU the region was not mapped in.
        let mut iommu = self.container.iommu.lock();
        if !IovaSpace::holds(&iommu, self.space) {
            // Its IOMMU is gone, and every mapping with it: nothing left to unmap, and
            // the IOVA belongs to no allocator now.
            log::debug!(
                "DMA region at IOVA {:#x} ({} bytes) outlived its container's IOMMU; freeing its pages",
                self.iova,
                self.size
            );
            return Ok(buffer);
        }
        let result = match UnmapAnswer::of(self.container.kernel_unmap(self.iova, self.size), || {
            self.container.iommu_gone()
        }) {
            UnmapAnswer::IommuGone => {
                self.container.iommu_lost(&mut iommu);
                return Ok(buffer);
            }
            UnmapAnswer::Answered(result) => result,
        };
        let released = iommu
            .as_mut()
            .map(|space| space.unmapped(self.iova, self.size, result));
        match released {
            Some(Ok(())) => Ok(buffer),
            Some(Err(e)) => {
                // The device may still reach the pages: never free them.
                std::mem::forget(buffer);
                Err(e)
            }
            None => {
                std::mem::forget(buffer);
                Err(VfioError::Unmap {
                    iova: self.iova,
                    size: self.size,
                    unmapped: None,
                    source: None,
                })
            }
        }
    }

    /// A region that claims `buffer` is mapped at an IOVA reserved from `container`,
    /// without asking the kernel: for tests of the unmap paths.
    #[cfg(test)]
    pub(crate) fn assume_mapped(container: &Arc<Container>, buffer: DmaBuffer) -> DmaRegion {
        let size = buffer.len() as u64;
        let mut iommu = container.iommu.lock();
        let space = iommu.as_mut().expect("IOVA space");
        let iova = space.reserve(size, buffer.page_size() as u64).expect("IOVA");
        DmaRegion {
            buffer: Some(buffer),
            iova,
            size,
            space: space.id(),
            container: Arc::clone(container),
        }
    }
}

impl Deref for DmaRegion {
    type Target = DmaBuffer;
    fn deref(&self) -> &DmaBuffer {
        self.buffer()
    }
}

impl Drop for DmaRegion {
    fn drop(&mut self) {
        if self.buffer.is_none() {
            return;
        }
        if let Err(e) = self.unmap_inner() {
            log::error!(
                "DMA region at IOVA {:#x} ({} bytes) could not be unmapped; leaking its pages and IOVA range: {e}",
                self.iova,
                self.size
            );
        }
    }
}

/// A quarantine of a [`Container`]'s IOVAs, from [`Container::quarantine_iovas`]: while it
/// lives, the IOVA of a region unmapped is not handed out again. Dropping it (the last
/// one) hands them back.
#[derive(Debug)]
pub struct IovaQuarantine {
    container: Arc<Container>,
    // The space (IOMMU) held; `None`: the container had none, so nothing was mapped.
    space: Option<SpaceId>,
}

impl Drop for IovaQuarantine {
    fn drop(&mut self) {
        let Some(id) = self.space else {
            return;
        };
        let mut iommu = self.container.iommu.lock();
        // An IOMMU lost since took its mappings (and this hold) with it.
        if IovaSpace::holds(&iommu, id)
            && let Some(space) = iommu.as_mut()
        {
            space.release_hold();
        }
    }
}

impl Container {
    /// Holds back the IOVAs of regions unmapped from now on — they are not handed out
    /// again — until the returned quarantine (and every other one) is dropped. For a
    /// removal while a device's DMA may still be in flight: a late write to an IOVA that
    /// was unmapped faults in the IOMMU, but one to an IOVA mapped again lands in the new
    /// region. Drop it once the device can no longer reach memory (its fd closed, or bus
    /// mastering off). [`VfioDevice::quarantine_iovas`](super::VfioDevice::quarantine_iovas)
    /// holds one until the device is closed.
    pub fn quarantine_iovas(self: &Arc<Self>) -> IovaQuarantine {
        let mut iommu = self.iommu.lock();
        let space = iommu.as_mut().map(|s| {
            s.hold();
            s.id()
        });
        IovaQuarantine {
            container: Arc::clone(self),
            space,
        }
    }

    /// IOVA ranges (start, size) unmapped while a quarantine was held: not handed out
    /// again until the last quarantine goes.
    pub fn quarantined(&self) -> Vec<(u64, u64)> {
        self.iommu
            .lock()
            .as_ref()
            .map(|s| s.quarantined().to_vec())
            .unwrap_or_default()
    }

    /// Maps `buffer` for DMA, read and write, at an IOVA allocated from the IOMMU's ranges
    /// (aligned to the buffer's page size, 2 MiB or 1 GiB for huge-page buffers, and at
    /// least to the smallest IOMMU page). The
    /// returned region owns the buffer and unmaps it when dropped.
    ///
    /// Needs a group attached (open a device first). Pinning counts against
    /// `RLIMIT_MEMLOCK` ([`VfioError::Memlock`]).
    pub fn map(self: &Arc<Self>, buffer: DmaBuffer) -> Result<DmaRegion, VfioError> {
        self.map_with(buffer, &DmaConstraints::new())
    }

    /// [`map`](Self::map) with `constraints`: the IOVA's last byte at or below their limit
    /// ([`VfioError::IovaExhaustedBelow`] when nothing fits there), aligned to their
    /// alignment too, and without write permission for the device if they say it only
    /// reads. Their NUMA node is not looked at: the buffer's pages exist already (see
    /// [`alloc_dma_with`](Self::alloc_dma_with)).
    pub fn map_with(
        self: &Arc<Self>,
        buffer: DmaBuffer,
        constraints: &DmaConstraints,
    ) -> Result<DmaRegion, VfioError> {
        self.map_returning(buffer, constraints).map_err(|e| e.0)
    }

    /// [`map_with`](Self::map_with), giving the buffer back (boxed with the error),
    /// unmapped, when it fails: for
    /// memory the caller lent ([`DmaBuffer::from_memory`]), which should not be lost with
    /// the error. (A failed map ioctl leaves nothing mapped: the kernel undoes a partial
    /// one.)
    pub fn map_returning(
        self: &Arc<Self>,
        buffer: DmaBuffer,
        constraints: &DmaConstraints,
    ) -> Result<DmaRegion, Box<(VfioError, DmaBuffer)>> {
        let size = buffer.len() as u64;
        let mut iommu = self.iommu.lock();
        let Some(space) = iommu.as_mut() else {
            return Err(Box::new((VfioError::NoGroupAttached, buffer)));
        };
        if let Err(e) = space.check_granule(buffer.vaddr(), size) {
            return Err(Box::new((e, buffer)));
        }
        let reserved = space.reserve_below(
            size,
            buffer.page_size() as u64,
            constraints.alignment(),
            constraints.max_iova().unwrap_or(u64::MAX),
        );
        match reserved {
            Ok(iova) => self.map_reserved(&mut iommu, buffer, iova, !constraints.is_device_read_only()),
            Err(e) => Err(Box::new((e, buffer))),
        }
    }

    /// Maps `buffer` at IOVA `iova`, which must lie in the IOMMU's ranges, be aligned to
    /// its page size and be free (not mapped through this container):
    /// [`VfioError::IovaUnavailable`] otherwise.
    pub fn map_at(self: &Arc<Self>, buffer: DmaBuffer, iova: u64) -> Result<DmaRegion, VfioError> {
        let size = buffer.len() as u64;
        let mut iommu = self.iommu.lock();
        let space = iommu.as_mut().ok_or(VfioError::NoGroupAttached)?;
        space.check_granule(buffer.vaddr(), size)?;
        if !iova.is_multiple_of(space.granule()) || !space.reserve_at(iova, size) {
            return Err(VfioError::IovaUnavailable { iova, size });
        }
        self.map_reserved(&mut iommu, buffer, iova, true).map_err(|e| e.0)
    }

    /// Maps `buffer` at an IOVA the kernel chooses, with the iommufd backend (which picks
    /// one in the IOAS's ranges, away from every mapping); the IOVA is then kept from this
    /// container's allocator. The group backend has no such choice: there this is
    /// [`map`](Self::map).
    pub fn map_kernel_iova(self: &Arc<Self>, buffer: DmaBuffer) -> Result<DmaRegion, VfioError> {
        let Space::Iommufd(ioas) = &self.space else {
            return self.map(buffer);
        };
        let size = buffer.len() as u64;
        let mut iommu = self.iommu.lock();
        let space = iommu.as_mut().ok_or(VfioError::NoGroupAttached)?;
        space.check_granule(buffer.vaddr(), size)?;
        // SAFETY: as in map_reserved: `buffer` moves into the returned region, which keeps
        // it mapped until the IOMMU mapping is gone, or forever if the unmap fails; its
        // bytes are only reached through atomics.
        let mapped = unsafe { sys::ioas_map(ioas.as_fd(), ioas.id(), buffer.vaddr(), None, size, true) };
        let iova = mapped.map_err(|source| map_error(None, size, source))?;
        // The allocator hands out only what no mapping uses, so the kernel's choice is free
        // there, unless something else mapped into this IOAS behind the container's back.
        if !space.reserve_at(iova, size) {
            let undone = sys::ioas_unmap(ioas.as_fd(), ioas.id(), iova, size);
            drop(iommu);
            if !matches!(undone, Ok(n) if n == size) {
                // Still reachable by the device: never free the pages.
                std::mem::forget(buffer);
            }
            return Err(VfioError::IovaUnavailable { iova, size });
        }
        let space = space.id();
        drop(iommu);
        Ok(DmaRegion {
            buffer: Some(buffer),
            iova,
            size,
            space,
            container: Arc::clone(self),
        })
    }

    // Maps `buffer` at `iova`, already reserved in the current space (`iommu`, locked by
    // the caller since the reservation): given back on failure. The lock is held across
    // the ioctl, so the IOMMU cannot be set up again in between (after being lost): the
    // mapping lands in the IOMMU whose space the IOVA came from, which the region records.
    // `device_writes`: whether the mapping lets the device write, or only read.
    fn map_reserved(
        self: &Arc<Self>,
        iommu: &mut Option<IovaSpace>,
        buffer: DmaBuffer,
        iova: u64,
        device_writes: bool,
    ) -> Result<DmaRegion, Box<(VfioError, DmaBuffer)>> {
        let size = buffer.len() as u64;
        let Some(space) = iommu.as_ref().map(IovaSpace::id) else {
            return Err(Box::new((VfioError::NoGroupAttached, buffer)));
        };
        // SAFETY: `buffer` is an owned anonymous mapping of exactly `size` bytes; it moves
        // into the returned region, which keeps it mapped in the process until the IOMMU
        // mapping is gone (unmap succeeded, or the container's IOMMU was released with
        // every mapping in it: checked with the space lock held, so no IOMMU set up since
        // is mistaken for it) or forever (unmap failed: leaked). Its bytes are only
        // reached through atomic accesses, so device writes do not invalidate any
        // reference.
        let mapped = unsafe { self.kernel_map(buffer.vaddr(), iova, size, device_writes) };
        if let Err(source) = mapped {
            if source.raw_os_error() == Some(nix::libc::EINVAL) && self.iommu_gone() {
                // Every device of the container was removed: no IOMMU to map into until
                // one is opened again.
                self.iommu_lost(iommu);
                return Err(Box::new((VfioError::IommuGone, buffer)));
            }
            if let Some(space) = iommu.as_mut() {
                space.map_failed(iova, size);
            }
            return Err(Box::new((map_error(Some(iova), size, source), buffer)));
        }
        Ok(DmaRegion {
            buffer: Some(buffer),
            iova,
            size,
            space,
            container: Arc::clone(self),
        })
    }

    /// The backend's map ioctl at a fixed IOVA.
    ///
    /// # Safety
    ///
    /// As for [`sys::iommu_map_dma`].
    unsafe fn kernel_map(&self, vaddr: u64, iova: u64, size: u64, device_writes: bool) -> io::Result<()> {
        match &self.space {
            Space::Group { fd, .. } => {
                // SAFETY: the caller's promise, passed on.
                unsafe { sys::iommu_map_dma(fd.as_fd(), vaddr, iova, size, device_writes) }
            }
            Space::Iommufd(ioas) => {
                // SAFETY: the caller's promise, passed on.
                let mapped =
                    unsafe { sys::ioas_map(ioas.as_fd(), ioas.id(), vaddr, Some(iova), size, device_writes) };
                mapped.map(drop)
            }
        }
    }

    /// The backend's unmap ioctl: the bytes unmapped.
    fn kernel_unmap(&self, iova: u64, size: u64) -> io::Result<u64> {
        match &self.space {
            Space::Group { fd, .. } => sys::iommu_unmap_dma(fd.as_fd(), iova, size),
            Space::Iommufd(ioas) => sys::ioas_unmap(ioas.as_fd(), ioas.id(), iova, size),
        }
    }

    /// Allocates a [`DmaBuffer`] of at least `len` bytes ([`DmaBuffer::new`]: on 2 MiB
    /// pages when `len` is a multiple of 2 MiB and the pool has them) and maps it.
    pub fn alloc_dma(self: &Arc<Self>, len: usize) -> Result<DmaRegion, VfioError> {
        self.alloc_dma_with(len, &DmaConstraints::new())
    }

    /// What the address and length of every DMA mapping in this container are multiples
    /// of: the CPU page ([`cpu_page_size`]) or the IOMMU's smallest page
    /// (`VFIO_IOMMU_GET_INFO`'s `iova_pgsizes`, iommufd's `out_iova_alignment`), whichever
    /// is larger; the CPU page before a group is attached. 4 KiB on x86-64; 64 KiB on an
    /// aarch64 kernel with 64 KiB pages. [`alloc_dma`](Self::alloc_dma) rounds lengths up
    /// to it; [`map`](Self::map) refuses a buffer that is not whole granules
    /// ([`VfioError::NotGranuleAligned`]).
    pub fn dma_granule(&self) -> usize {
        let iommu = self.iommu.lock().as_ref().map_or(0, |s| s.info.min_page_size());
        usize::try_from(dma_granule(cpu_page_size(), iommu)).unwrap_or(usize::MAX)
    }

    /// Allocates a [`DmaBuffer`] of at least `len` bytes for a device with `constraints`
    /// and maps it ([`map_with`](Self::map_with)): on their NUMA node if they name one
    /// ([`DmaBuffer::on_node`], a preference), else as [`alloc_dma`](Self::alloc_dma).
    pub fn alloc_dma_with(
        self: &Arc<Self>,
        len: usize,
        constraints: &DmaConstraints,
    ) -> Result<DmaRegion, VfioError> {
        let granule = self.dma_granule();
        let buffer = DmaBuffer::allocate(
            len,
            HugePageSize::Mib2,
            false,
            constraints.preferred_node(),
            granule,
        )
        .map_err(|source| VfioError::Alloc { len, source })?;
        self.map_with(buffer, constraints)
    }

    /// Allocates a [`DmaBuffer`] of `len` bytes rounded up to whole huge pages of `size`
    /// ([`DmaBuffer::with_huge_pages`], with its logged fallback to 4 KiB pages) and maps
    /// it at an IOVA aligned to that size.
    pub fn alloc_dma_huge(self: &Arc<Self>, len: usize, size: HugePageSize) -> Result<DmaRegion, VfioError> {
        let buffer = DmaBuffer::allocate(len, size, true, None, self.dma_granule())
            .map_err(|source| VfioError::Alloc { len, source })?;
        self.map(buffer)
    }

    /// IOVA ranges (start, size) of regions whose unmap failed: never handed out again by
    /// this IOMMU. (A group-backend container that lost its IOMMU starts a new list with
    /// the next; see [`Container`], "Hot removal".)
    pub fn leaked(&self) -> Vec<(u64, u64)> {
        self.iommu
            .lock()
            .as_ref()
            .map(|s| s.leaked.clone())
            .unwrap_or_default()
    }
}

/// The error of a failed map ioctl: pinning (memlock) or anything else.
fn map_error(iova: Option<u64>, size: u64, source: io::Error) -> VfioError {
    match source.raw_os_error() {
        Some(nix::libc::ENOMEM) | Some(nix::libc::EPERM) => VfioError::Memlock {
            size,
            limit: memlock_limit(),
            source,
        },
        _ => VfioError::Map { iova, size, source },
    }
}

/// The soft `RLIMIT_MEMLOCK`, in bytes, or `None` when unlimited or unknown.
fn memlock_limit() -> Option<u64> {
    use nix::sys::resource::{RLIM_INFINITY, Resource, getrlimit};
    match getrlimit(Resource::RLIMIT_MEMLOCK) {
        Ok((soft, _)) if soft != RLIM_INFINITY => Some(soft),
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------
// NUMA placement.

/// `MPOL_PREFERRED` of `<linux/mempolicy.h>` (not in the libc crate).
const MPOL_PREFERRED: nix::libc::c_int = 1;

/// Binds `len` bytes at `addr` (a fresh mapping of this process, not yet touched) to NUMA
/// node `node`, preferred: `mbind(2)`, which nix does not wrap.
fn mbind_preferred(addr: usize, len: usize, node: u32) -> io::Result<()> {
    const BITS: usize = u64::BITS as usize;
    let node = node as usize;
    let mut mask = vec![0u64; node / BITS + 1];
    mask[node / BITS] |= 1 << (node % BITS);
    // The kernel reads `maxnode - 1` bits of the mask (it drops one, as it always has).
    let maxnode = mask.len() * BITS + 1;
    // SAFETY: mbind only changes the memory policy of `addr..addr + len`, a mapping this
    // process just made and owns (it moves, frees or reads nothing); the mask is a live
    // array of `maxnode - 1` bits, which the kernel only reads.
    let r = unsafe {
        nix::libc::syscall(
            nix::libc::SYS_mbind,
            addr,
            len,
            MPOL_PREFERRED,
            mask.as_ptr(),
            maxnode,
            0u32,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

// ---------------------------------------------------------------------------------------
// Caller-owned memory.

/// Memory a caller allocated and lends to the crate for DMA, as SPDK's
/// `spdk_mem_register` does: [`DmaBuffer::from_memory`] takes the value (and with it the
/// memory), a backing maps it for the device
/// ([`DeviceBacking::map_dma`](crate::bus::DeviceBacking::map_dma),
/// [`Container::map`](super::Container::map)), and the value comes back
/// ([`DmaBuffer::into_memory`]) only from a buffer that is not mapped: after the IOMMU
/// mapping is gone.
///
/// [`PageBuffer`] implements it: a page-aligned heap allocation that is an ordinary
/// `&mut [u8]` while the caller holds it.
///
/// # Why the caller gives the value away
///
/// While the device can reach the memory it may write any byte at any moment. A `&[u8]` or
/// `&mut [u8]` into it would promise the compiler that nothing else writes those bytes
/// (it may keep them in registers, or merge and drop reads), so holding one while the
/// device writes is undefined behaviour, however carefully the program waits. So the
/// memory is never behind a reference while mapped: the value that could produce one is
/// moved into the [`DmaBuffer`] (the borrow checker ends every borrow of it first), whose
/// accessors are atomic word accesses, and it is handed back only by
/// [`DmaBuffer::into_memory`] on a buffer the caller owns outright, which a mapped buffer
/// never is (a [`DmaRegion`] owns it until the unmap succeeded, and forgets it forever if
/// the unmap fails). What the trait asks of the implementor below closes the remaining
/// gap: no other path to the bytes.
///
/// # Safety
///
/// For every value `m` of the implementing type, while it lives:
///
/// - `m.dma_ptr()` and `m.dma_len()` always return the same address and length (also
///   after `m` is moved: the memory lives behind a pointer `m` owns, not inside `m`), and
///   do not read or write the bytes;
/// - the memory is readable and writable private memory of this process (anonymous or
///   heap memory; not a file mapping that another process, or a truncation, could
///   change), stays mapped until `m` is dropped, and is freed by nothing but `m`'s drop;
/// - `m` is the only way to reach it: no reference, pointer, clone or other owner of any
///   of its bytes exists outside `m` (no `Arc` of it kept elsewhere, no raw pointer
///   stashed).
///
/// The address must be page aligned and the length a non-zero whole number of pages;
/// [`DmaBuffer::from_memory`] checks that (it is not a safety condition).
pub unsafe trait CallerMemory: Send + 'static {
    /// The first byte.
    fn dma_ptr(&self) -> NonNull<u8>;
    /// The length in bytes.
    fn dma_len(&self) -> usize;
}

/// Caller memory that is not a non-empty whole number of pages at a page-aligned address:
/// [`DmaBuffer::from_memory`] refuses it (and hands it back).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "caller memory at {vaddr:#x} ({len} bytes) is not a whole number of {page}-byte pages at a page-aligned address",
    page = cpu_page_size()
)]
pub struct NotPageAligned {
    /// Its address.
    pub vaddr: u64,
    /// Its length.
    pub len: usize,
}

/// For `len` bytes aligned to `align` inside a mapping of `mapped` bytes at `addr` (at
/// least `len + align - page`, `addr` page aligned): the bytes before the aligned part and
/// after it.
fn trim_to_alignment(addr: usize, len: usize, mapped: usize, align: usize) -> (usize, usize) {
    let head = addr.next_multiple_of(align) - addr;
    (head, mapped - head - len)
}

/// Whether `len` bytes at `addr` are a non-empty whole number of `page`-byte pages at an
/// address aligned to one.
fn whole_pages(addr: usize, len: usize, page: usize) -> bool {
    len != 0 && len.is_multiple_of(page) && addr.is_multiple_of(page)
}

impl DmaBuffer {
    /// Takes `memory` (see [`CallerMemory`]) as a buffer, to be mapped for DMA like any
    /// other; [`into_memory`](Self::into_memory) gives it back. Fails, handing `memory`
    /// back, when it is not a non-empty whole number of pages at a page-aligned address.
    pub fn from_memory<M: CallerMemory>(memory: M) -> Result<DmaBuffer, (NotPageAligned, M)> {
        let (ptr, len) = (memory.dma_ptr(), memory.dma_len());
        if !whole_pages(ptr.as_ptr() as usize, len, cpu_page_size()) {
            let vaddr = ptr.as_ptr() as u64;
            return Err((NotPageAligned { vaddr, len }, memory));
        }
        Ok(DmaBuffer {
            ptr,
            len,
            huge: None,
            caller: Some(Box::new(memory)),
        })
    }

    /// Whether the memory is a caller's ([`from_memory`](Self::from_memory)).
    pub fn is_caller_memory(&self) -> bool {
        self.caller.is_some()
    }

    /// Gives the caller's memory back: `Err(self)` when the buffer is not caller memory of
    /// type `M`. The buffer is owned, so not mapped for DMA: a mapped buffer is owned by its
    /// region until the unmap succeeded
    /// ([`DeviceBacking::unmap_dma`](crate::bus::DeviceBacking::unmap_dma),
    /// [`DmaRegion::unmap`]).
    pub fn into_memory<M: CallerMemory>(self) -> Result<M, DmaBuffer> {
        let mut this = std::mem::ManuallyDrop::new(self);
        match this.caller.take().map(|owner| owner.downcast::<M>()) {
            Some(Ok(memory)) => {
                // The rest of `this` (a pointer and two integers) needs no drop.
                Ok(*memory)
            }
            Some(Err(owner)) => {
                this.caller = Some(owner);
                Err(std::mem::ManuallyDrop::into_inner(this))
            }
            None => Err(std::mem::ManuallyDrop::into_inner(this)),
        }
    }
}

/// A zeroed, page-aligned heap allocation of whole pages: caller memory that is an ordinary
/// byte slice (`Deref<Target = [u8]>`, `DerefMut`) while the caller holds it, and that can
/// be lent to a device ([`DmaBuffer::from_memory`]) and taken back. Zero-copy I/O: fill it
/// through `&mut [u8]`, lend it, take it back, read it through `&[u8]`.
///
/// # Dropping
///
/// Dropping frees the allocation. A `PageBuffer` that is lent is owned by its
/// [`DmaBuffer`], so it is dropped only once no device can reach it (or never, if the
/// unmap failed).
pub struct PageBuffer {
    ptr: NonNull<u8>,
    len: usize,
}

impl PageBuffer {
    /// `len` bytes rounded up to whole CPU pages ([`cpu_page_size`]; at least one),
    /// zeroed, at an address aligned to one.
    pub fn new(len: usize) -> io::Result<PageBuffer> {
        let len = len
            .max(1)
            .checked_next_multiple_of(cpu_page_size())
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("{len} bytes")))?;
        let layout = Self::layout(len)?;
        // SAFETY: the layout has a non-zero size (at least one page).
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(ptr).ok_or_else(|| io::Error::from(io::ErrorKind::OutOfMemory))?;
        Ok(PageBuffer { ptr, len })
    }

    fn layout(len: usize) -> io::Result<std::alloc::Layout> {
        std::alloc::Layout::from_size_align(len, cpu_page_size())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
    }
}

impl fmt::Debug for PageBuffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PageBuffer")
            .field("vaddr", &format_args!("{:#x}", self.ptr.as_ptr() as usize))
            .field("len", &self.len)
            .finish()
    }
}

impl Deref for PageBuffer {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: `len` initialized (zeroed) bytes this value owns; no device reaches them
        // while the caller holds the value (lending moves it into a DmaBuffer), and the
        // slice borrows `self`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl std::ops::DerefMut for PageBuffer {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`, and `&mut self` makes the borrow unique.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for PageBuffer {
    fn drop(&mut self) {
        // The layout was valid when allocated, so it is now.
        if let Ok(layout) = Self::layout(self.len) {
            // SAFETY: allocated in `new` with this layout, freed once, here.
            unsafe { std::alloc::dealloc(self.ptr.as_ptr(), layout) };
        }
    }
}

// SAFETY: it owns its allocation outright, like a `Box<[u8]>`: moving it to another thread
// moves the only access to the bytes.
unsafe impl Send for PageBuffer {}
// SAFETY: `&PageBuffer` gives only `&[u8]`, which is `Sync`.
unsafe impl Sync for PageBuffer {}

// SAFETY: the pointer and length are fixed at allocation and read no bytes; the
// allocation is heap memory of this process, page aligned, whole pages, freed only by
// drop; the value is its only owner and gives out references only through `&self` /
// `&mut self`, which cannot be called while the value is inside a DmaBuffer.
unsafe impl CallerMemory for PageBuffer {
    fn dma_ptr(&self) -> NonNull<u8> {
        self.ptr
    }
    fn dma_len(&self) -> usize {
        self.len
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn write_words_writes_whole_words_in_bounds_only() {
        let page = cpu_page_size();
        let b = DmaBuffer::new(page).unwrap();
        b.write_words(8, &[0x0102_0304_0506_0708, u64::MAX]).unwrap();
        assert_eq!(b.read::<u64>(8), Some(0x0102_0304_0506_0708));
        assert_eq!(b.read::<u64>(16), Some(u64::MAX));
        assert_eq!(b.read::<u64>(0), Some(0));
        assert_eq!(b.write_words(4, &[1]), None, "misaligned");
        assert_eq!(b.write_words(page - 8, &[1, 2]), None, "past the end");
        assert_eq!(b.write_words(usize::MAX - 7, &[1]), None, "overflow");
        b.write_words(page - 8, &[3]).unwrap();
        assert_eq!(b.read::<u64>(page - 8), Some(3));
    }

    #[test]
    fn huge_mappings_name_their_page_size() {
        use nix::libc;
        let huge = |len, size, round_up| MapPlan::new(len, size, round_up, PAGE).unwrap().huge;
        let two = huge(4 << 20, HugePageSize::Mib2, false).unwrap();
        assert_eq!(two.flags, libc::MAP_HUGETLB | libc::MAP_HUGE_2MB);
        assert_eq!(
            MapFlags::from_bits_retain(two.flags),
            MapFlags::MAP_HUGETLB | MapFlags::MAP_HUGE_2MB
        );
        assert_eq!((two.size, two.len), (HugePageSize::Mib2, 4 << 20));
        let one_gib = huge(1 << 30, HugePageSize::Gib1, false).unwrap();
        assert_eq!(one_gib.flags, libc::MAP_HUGETLB | libc::MAP_HUGE_1GB);
        // Not a whole number of huge pages: 4 KiB pages, unless rounding up was asked for.
        assert_eq!(huge(3 << 20, HugePageSize::Mib2, false), None);
        assert_eq!(huge(3 << 20, HugePageSize::Mib2, true).unwrap().len, 4 << 20);
        assert_eq!(huge(4096, HugePageSize::Gib1, true).unwrap().len, 1 << 30);
        assert_eq!(huge(2 << 20, HugePageSize::Gib1, false), None);
        let small = MapPlan::new(100, HugePageSize::Mib2, false, PAGE).unwrap();
        assert_eq!((small.huge, small.small_len), (None, PAGE));
        assert_eq!(MapPlan::new(0, HugePageSize::Mib2, true, PAGE), None);
        assert_eq!(MapPlan::new(usize::MAX, HugePageSize::Mib2, false, PAGE), None);
        // Rounding past the address space: no huge mapping, 4 KiB pages still fit.
        let edge = MapPlan::new(usize::MAX - PAGE + 1, HugePageSize::Gib1, true, PAGE).unwrap();
        assert_eq!(edge.huge, None);
    }

    // 16 and 64 KiB pages (aarch64): a buffer is whole pages of the CPU's size, so one of
    // 4 KiB is a whole 64 KiB page there; a mapping is whole granules.
    #[test]
    fn buffers_and_mappings_round_to_the_page_and_granule() {
        for (page, len, small_len) in [
            (0x1000, 0x1000, 0x1000),
            (0x4000, 0x1000, 0x4000),
            (0x1_0000, 0x1000, 0x1_0000),
            (0x1_0000, 0x1_0001, 0x2_0000),
            (0x4000, 3 * 0x4000, 3 * 0x4000),
        ] {
            let plan = MapPlan::new(len, HugePageSize::Mib2, false, page).unwrap();
            assert_eq!(
                plan.small_len, small_len,
                "{len:#x} bytes on {page:#x}-byte pages"
            );
        }
        // The granule: the larger of the CPU page and the IOMMU's smallest page (0: none
        // reported).
        assert_eq!(dma_granule(0x1000, 0x1000), 0x1000);
        assert_eq!(
            dma_granule(0x1_0000, 0x1000),
            0x1_0000,
            "an SMMU of 4 KiB under a 64 KiB kernel"
        );
        assert_eq!(
            dma_granule(0x1000, 0x1_0000),
            0x1_0000,
            "an IOMMU of 64 KiB under a 4 KiB kernel"
        );
        assert_eq!(dma_granule(0x4000, 0), 0x4000);
        // What sysconf may say.
        assert_eq!(page_size_from(4096), 4096);
        assert_eq!(page_size_from(16384), 16384);
        assert_eq!(page_size_from(65536), 65536);
        for odd in [-1, 0, 512, 4095, 12288, 1 << 31] {
            assert_eq!(page_size_from(odd), PAGE, "{odd}");
        }
        // Caller memory: whole pages of the CPU's size.
        assert!(whole_pages(0x1_0000, 0x1_0000, 0x1_0000));
        assert!(!whole_pages(0x1_1000, 0x1_0000, 0x1_0000), "4 KiB aligned only");
        assert!(!whole_pages(0x1_0000, 0x1000, 0x1_0000), "4 KiB long only");
        assert!(whole_pages(0x1_1000, 0x1000, 0x1000));
        assert!(!whole_pages(0x1_0000, 0, 0x1000));
    }

    // The page the buffers of this process get is the CPU's, whatever it is (4 KiB on
    // x86-64; 64 KiB under `tests/aarch64/run --page-size 65536`).
    #[test]
    fn buffers_are_whole_cpu_pages() {
        let page = cpu_page_size();
        assert!(page.is_power_of_two() && page >= PAGE);
        for len in [1, PAGE, page, page + 1] {
            let b = DmaBuffer::new(len).unwrap();
            assert_eq!(b.len(), len.next_multiple_of(page));
            assert_eq!(b.page_size(), page);
            assert!(b.vaddr().is_multiple_of(page as u64));
        }
        let p = PageBuffer::new(1).unwrap();
        assert_eq!(p.len(), page);
        assert!((p.as_ptr() as usize).is_multiple_of(page));
    }

    // A granule larger than the CPU page (an IOMMU whose smallest page is larger): the
    // buffer is cut out of a larger mapping, aligned to it.
    #[test]
    fn buffers_can_be_aligned_beyond_the_cpu_page() {
        let page = cpu_page_size();
        for granule in [4 * page, 16 * page] {
            let b = DmaBuffer::allocate(page, HugePageSize::Mib2, false, None, granule).unwrap();
            assert_eq!(b.len(), granule);
            assert!(b.vaddr().is_multiple_of(granule as u64), "{:#x}", b.vaddr());
            b.write::<u64>(granule - 8, 7).unwrap();
            assert_eq!(b.read::<u64>(granule - 8), Some(7));
        }
        let failures = munmap_failures();
        drop(DmaBuffer::allocate(1, HugePageSize::Mib2, false, None, 8 * page).unwrap());
        assert_eq!(munmap_failures(), failures);
    }

    // A munmap the kernel refuses (here: a pointer that is not page aligned, EINVAL) is
    // counted and logged; the memory stays mapped.
    #[test]
    fn a_failed_munmap_is_counted() {
        let real = DmaBuffer::new(2 * PAGE).unwrap();
        let before = munmap_failures();
        let forged = DmaBuffer {
            ptr: NonNull::new(real.ptr.as_ptr().wrapping_add(1)).unwrap(),
            len: PAGE,
            huge: None,
            caller: None,
        };
        drop(forged);
        assert!(munmap_failures() > before);
        real.write::<u64>(0, 1).unwrap();
        assert_eq!(real.read::<u64>(0), Some(1), "still mapped");
    }

    #[test]
    fn buffer_accessors_are_checked() {
        let page = cpu_page_size();
        let b = DmaBuffer::new(100).unwrap();
        assert_eq!(b.len(), page);
        assert_eq!(b.read::<u32>(0), Some(0));
        b.write::<u32>(8, 0xdead_beef).unwrap();
        assert_eq!(b.read::<u32>(8), Some(0xdead_beef));
        assert_eq!(b.read::<u64>(4), None, "misaligned");
        assert_eq!(b.read::<u64>(page - 4), None, "out of bounds");
        assert_eq!(b.read::<u64>(usize::MAX - 3), None, "overflow");
        b.write_at(16, b"hello").unwrap();
        let mut out = [0u8; 5];
        b.read_at(16, &mut out).unwrap();
        assert_eq!(&out, b"hello");
        assert!(b.write_at(page - 2, b"abc").is_none());
        assert!(b.read_at(page - 2, &mut [0u8; 3]).is_none());
    }

    #[test]
    fn narrow_writes_keep_the_rest_of_their_word() {
        let b = DmaBuffer::new(PAGE).unwrap();
        b.write::<u64>(0, 0x1111_2222_3333_4444).unwrap();
        b.write::<u16>(2, 0xabcd).unwrap();
        b.write::<u8>(7, 0xee).unwrap();
        let want = u64::from_ne_bytes({
            let mut w = 0x1111_2222_3333_4444u64.to_ne_bytes();
            w[2..4].copy_from_slice(&0xabcdu16.to_ne_bytes());
            w[7] = 0xee;
            w
        });
        assert_eq!(b.read::<u64>(0), Some(want));
        assert_eq!(b.read::<u16>(2), Some(0xabcd));
        assert_eq!(b.load_acquire::<u8>(7), Some(0xee));
    }

    #[test]
    fn byte_copies_at_any_offset_and_length() {
        let b = DmaBuffer::new(PAGE).unwrap();
        b.fill(0, PAGE, 0x5a).unwrap();
        let src: Vec<u8> = (0..=255).collect();
        for (off, len) in [(0, 256), (3, 1), (5, 20), (7, 9), (13, 200), (PAGE - 11, 11)] {
            b.write_at(off, &src[..len]).unwrap();
            let mut got = vec![0u8; len + 2];
            let start = off.saturating_sub(1);
            b.read_at(start, &mut got[..len + (off - start)]).unwrap();
            if off > 0 {
                assert_eq!(got[0], 0x5a, "byte before {off}");
            }
            assert_eq!(&got[off - start..off - start + len], &src[..len]);
            b.fill(off, len, 0x5a).unwrap();
        }
        b.zero();
        assert!((0..PAGE).step_by(8).all(|o| b.read::<u64>(o) == Some(0)));
    }

    #[test]
    fn nvme_sized_objects_round_trip() {
        let page = cpu_page_size();
        let b = DmaBuffer::new(page).unwrap();
        let sqe: [u32; 16] = std::array::from_fn(|i| 0x0600_0000 + i as u32);
        b.write_obj(64, &sqe).unwrap();
        assert_eq!(b.read_obj::<[u32; 16]>(64), Some(sqe));
        assert_eq!(b.read::<u32>(64 + 4), Some(sqe[1]));
        let cqe = [1u32, 2, 3, 1 << 16];
        b.write_obj(4, &cqe).unwrap(); // 4-aligned, not 8: partial words at both ends
        assert_eq!(b.read_obj::<[u32; 4]>(4), Some(cqe));
        assert_eq!(b.read::<u32>(0), Some(0), "the word before is untouched");
        assert_eq!(b.read::<u32>(20), Some(0), "the word after is untouched");
        assert_eq!(b.read_obj::<[u32; 4]>(2), None, "misaligned for u32");
        assert_eq!(b.read_obj::<[u64; 2]>(page - 8), None, "out of bounds");
        assert!(b.write_obj(page - 60, &sqe).is_none());

        #[derive(Debug, Clone, Copy, PartialEq)]
        #[repr(C)]
        struct Prp {
            addr: u64,
            len: u32,
            flags: u32,
        }
        // SAFETY: repr(C), two u32 after a u64: no padding; any bits are valid.
        unsafe impl DmaObj for Prp {}
        let p = Prp {
            addr: 0x1234_5000,
            len: 4096,
            flags: 7,
        };
        b.write_obj(256, &p).unwrap();
        assert_eq!(b.read_obj::<Prp>(256), Some(p));
    }

    // Two threads write the two halves of each word, over and over: with a plain
    // read-modify-write of the word one would lose the other's writes.
    #[test]
    fn threads_writing_neighbouring_halves_never_clobber_each_other() {
        let b = Arc::new(DmaBuffer::new(PAGE).unwrap());
        let rounds = 2000u32;
        let writer = |half: usize| {
            let b = Arc::clone(&b);
            std::thread::spawn(move || {
                for r in 1..=rounds {
                    for w in 0..64 {
                        b.write::<u32>(w * 8 + half * 4, r).unwrap();
                    }
                }
            })
        };
        let (t0, t1) = (writer(0), writer(1));
        // A reader sees each word's halves independently monotonic, never torn bytes.
        let reader = {
            let b = Arc::clone(&b);
            std::thread::spawn(move || {
                let mut last = [0u32; 128];
                for _ in 0..200 {
                    let words: [u64; 64] = b.read_obj(0).unwrap();
                    for (i, w) in words.iter().enumerate() {
                        let b = w.to_ne_bytes();
                        for h in 0..2 {
                            let v = u32::from_ne_bytes(b[h * 4..h * 4 + 4].try_into().unwrap());
                            assert!(v >= last[i * 2 + h] && v <= rounds);
                            last[i * 2 + h] = v;
                        }
                    }
                }
            })
        };
        t0.join().unwrap();
        t1.join().unwrap();
        reader.join().unwrap();
        for w in 0..64 {
            assert_eq!(b.read::<u32>(w * 8), Some(rounds));
            assert_eq!(b.read::<u32>(w * 8 + 4), Some(rounds));
        }
    }

    // Publish with release, consume with acquire: the entry written before the flag is
    // complete when the flag is seen.
    #[test]
    fn acquire_after_release_sees_the_whole_entry() {
        let b = Arc::new(DmaBuffer::new(PAGE).unwrap());
        let producer = {
            let b = Arc::clone(&b);
            std::thread::spawn(move || {
                for slot in 0..64usize {
                    let entry = [slot as u32 + 1; 3];
                    b.write_obj(slot * 16, &entry).unwrap();
                    b.store_release::<u32>(slot * 16 + 12, 1).unwrap();
                }
            })
        };
        for slot in 0..64usize {
            while b.load_acquire::<u32>(slot * 16 + 12) != Some(1) {
                std::hint::spin_loop();
            }
            assert_eq!(b.read_obj::<[u32; 3]>(slot * 16), Some([slot as u32 + 1; 3]));
        }
        producer.join().unwrap();
    }

    // A region that outlives its container's IOMMU (every group left the container, their
    // devices removed, and the kernel released the type1 IOMMU with all its mappings):
    // nothing is left to unmap, so its pages are freed and nothing is recorded as leaked,
    // and the IOMMU set up since (a device opened again) is not touched, even where it
    // handed out the same IOVA.
    #[test]
    fn a_region_outliving_its_iommu_is_freed_not_leaked() {
        let page = cpu_page_size();
        let ranges = vec![0..=(1u64 << 30) - 1];
        let info = super::super::IommuInfo {
            page_sizes: 0x1000,
            iova_ranges: ranges.clone(),
        };
        let container = Container::fake_for_tests(ranges);
        let region = DmaRegion::assume_mapped(&container, DmaBuffer::new(page).unwrap());
        let iova = region.iova();
        // The IOMMU went, and a new one came with the next group.
        *container.iommu.lock() = Some(super::super::iova::IovaSpace::new(info));
        let again = container
            .iommu
            .lock()
            .as_mut()
            .unwrap()
            .reserve(page as u64, page as u64)
            .unwrap();
        assert_eq!(again, iova, "the new IOMMU hands the same IOVA out");
        // The container fd is /dev/null: had the old region asked the kernel to unmap, it
        // would have failed and leaked.
        let buffer = region.unmap().expect("nothing left to unmap");
        assert_eq!(buffer.len(), page);
        assert!(container.leaked().is_empty());

        // The IOMMU went and none came since: the same.
        let region = DmaRegion::assume_mapped(&container, DmaBuffer::new(page).unwrap());
        *container.iommu.lock() = None;
        region.unmap().expect("nothing left to unmap");
    }

    // Issue 15 §1: regions unmapped while a quarantine lives keep their IOVAs out of the
    // allocator until the last quarantine goes; a quarantine outliving its IOMMU does
    // nothing to the next one.
    #[test]
    fn a_quarantine_keeps_unmapped_iovas_until_it_goes() {
        let ranges = vec![0..=(1u64 << 30) - 1];
        let container = Container::fake_for_tests(ranges.clone());
        let reserve = |c: &Arc<Container>| c.iommu.lock().as_mut().unwrap().reserve(PAGE as u64, PAGE as u64);
        let first = reserve(&container).unwrap();
        let q1 = container.quarantine_iovas();
        let q2 = container.quarantine_iovas();
        // What an unmap that succeeded does (the fake container's ioctls fail).
        container
            .iommu
            .lock()
            .as_mut()
            .unwrap()
            .unmapped(first, PAGE as u64, Ok(PAGE as u64))
            .unwrap();
        assert_eq!(container.quarantined(), vec![(first, PAGE as u64)]);
        assert_ne!(reserve(&container).unwrap(), first, "quarantined IOVA reused");
        drop(q1);
        assert_eq!(container.quarantined(), vec![(first, PAGE as u64)]);
        drop(q2);
        assert!(container.quarantined().is_empty());
        assert_eq!(reserve(&container).unwrap(), first, "back in the allocator");

        // The IOMMU went (and a new one came) while a quarantine lived: dropping it leaves
        // the new space alone.
        let q = container.quarantine_iovas();
        *container.iommu.lock() = Some(super::super::iova::IovaSpace::new(super::super::IommuInfo {
            page_sizes: 0x1000,
            iova_ranges: ranges,
        }));
        let held = container.quarantine_iovas();
        drop(q);
        let again = reserve(&container).unwrap();
        container
            .iommu
            .lock()
            .as_mut()
            .unwrap()
            .unmapped(again, PAGE as u64, Ok(PAGE as u64))
            .unwrap();
        assert_eq!(container.quarantined(), vec![(again, PAGE as u64)], "still held");
        drop(held);
        assert!(container.quarantined().is_empty());
    }

    #[test]
    fn mapping_needs_an_attached_group() {
        let container = Container::fake_unattached_for_tests();
        let err = container.alloc_dma(PAGE).unwrap_err();
        assert!(matches!(err, VfioError::NoGroupAttached), "{err:?}");
        assert!(container.leaked().is_empty());
    }

    // A region whose unmap fails (the container fd is /dev/null: every ioctl fails) leaks
    // its pages and IOVA instead of freeing what the device might still reach.
    #[test]
    fn a_region_whose_unmap_fails_leaks() {
        let container = Container::fake_for_tests(vec![0..=(1 << 30) - 1]);
        let region = DmaRegion::assume_mapped(&container, DmaBuffer::new(PAGE).unwrap());
        let iova = region.iova();
        region.write::<u64>(0, 42).unwrap();
        assert_eq!(region.read::<u64>(0), Some(42));
        let err = region.unmap().unwrap_err();
        assert!(
            matches!(err, VfioError::Unmap { source: Some(ref s), .. } if s.raw_os_error() == Some(nix::libc::ENOTTY))
        );
        assert_eq!(container.leaked(), vec![(iova, PAGE as u64)]);
        // Dropped without an explicit unmap: the same, logged.
        let region = DmaRegion::assume_mapped(&container, DmaBuffer::new(PAGE).unwrap());
        let second = region.iova();
        assert_ne!(second, iova);
        drop(region);
        assert_eq!(
            container.leaked(),
            vec![(iova, PAGE as u64), (second, PAGE as u64)]
        );
    }

    // Issue 16 §3: a limit nothing fits under fails before any ioctl, naming limit and
    // size, and takes no IOVA.
    #[test]
    fn a_limit_the_container_cannot_meet_fails_before_mapping() {
        let page = cpu_page_size();
        let container = Container::fake_for_tests(vec![0..=(1 << 30) - 1]);
        let err = container
            .alloc_dma_with(2 * page, &DmaConstraints::new().address_bits(13))
            .unwrap_err();
        assert!(
            matches!(err, VfioError::IovaExhaustedBelow { size, max_iova: 0x1fff, .. } if size == 2 * page as u64),
            "{err:?}"
        );
        // The map ioctl itself fails on this fake (its fd is /dev/null); the IOVA it was
        // given, aligned and under the limit, is free again afterwards.
        let limited = DmaConstraints::new().address_bits(24).align(1 << 20);
        let err = container.alloc_dma_with(page, &limited).unwrap_err();
        assert!(
            matches!(err, VfioError::Map { iova: Some(i), .. } if i % (1 << 20) == 0 && i < 1 << 24),
            "{err:?}"
        );
        assert!(container.leaked().is_empty());
        let again = DmaRegion::assume_mapped(&container, DmaBuffer::new(page).unwrap());
        assert_eq!(again.iova(), page as u64, "nothing kept");
        std::mem::forget(again); // its unmap would fail on /dev/null and log
    }

    // A failed map hands caller memory back, untouched and unmapped.
    #[test]
    fn a_failed_map_returns_the_callers_memory() {
        let container = Container::fake_for_tests(vec![0..=(1 << 30) - 1]);
        let mut page = PageBuffer::new(PAGE).unwrap();
        page[7] = 7;
        let buffer = DmaBuffer::from_memory(page).unwrap();
        let (err, buffer) = *container
            .map_returning(buffer, &DmaConstraints::new().device_read_only())
            .unwrap_err();
        assert!(matches!(err, VfioError::Map { .. }), "{err:?}");
        let page: PageBuffer = buffer.into_memory().unwrap();
        assert_eq!(page[7], 7);
        let unattached = Container::fake_unattached_for_tests();
        let buffer = DmaBuffer::from_memory(page).unwrap();
        let (err, buffer) = *unattached
            .map_returning(buffer, &DmaConstraints::new())
            .unwrap_err();
        assert!(matches!(err, VfioError::NoGroupAttached));
        assert!(buffer.into_memory::<PageBuffer>().is_ok());
    }

    /// Caller memory that says when it is dropped.
    #[derive(Debug)]
    struct Watched(PageBuffer, Arc<AtomicBool>);
    impl Drop for Watched {
        fn drop(&mut self) {
            self.1.store(true, Ordering::Relaxed);
        }
    }
    // SAFETY: forwards to the PageBuffer it owns, the memory's only owner.
    unsafe impl CallerMemory for Watched {
        fn dma_ptr(&self) -> NonNull<u8> {
            self.0.dma_ptr()
        }
        fn dma_len(&self) -> usize {
            self.0.dma_len()
        }
    }

    // Issue 15 §7: caller memory comes back only once no IOMMU mapping is left: a failed
    // unmap keeps it forever (never dropped, never returned); an unmap that finds the
    // IOMMU gone gives it back.
    #[test]
    fn caller_memory_comes_back_only_after_the_mapping_is_gone() {
        let container = Container::fake_for_tests(vec![0..=(1 << 30) - 1]);
        let dropped = Arc::new(AtomicBool::new(false));
        let memory = Watched(PageBuffer::new(PAGE).unwrap(), Arc::clone(&dropped));
        let region = DmaRegion::assume_mapped(&container, DmaBuffer::from_memory(memory).unwrap());
        region.unmap().unwrap_err(); // /dev/null: the unmap ioctl fails
        assert!(!dropped.load(Ordering::Relaxed), "leaked, not freed");
        assert_eq!(container.leaked().len(), 1);

        let memory = Watched(PageBuffer::new(PAGE).unwrap(), Arc::clone(&dropped));
        let region = DmaRegion::assume_mapped(&container, DmaBuffer::from_memory(memory).unwrap());
        region.write::<u64>(8, 0x55).unwrap();
        *container.iommu.lock() = None; // the IOMMU went, with every mapping in it
        let memory: Watched = region.unmap().unwrap().into_memory().unwrap();
        assert_eq!(u64::from_ne_bytes(memory.0[8..16].try_into().unwrap()), 0x55);
        assert!(!dropped.load(Ordering::Relaxed));
        drop(memory);
        assert!(dropped.load(Ordering::Relaxed));
    }

    // Caller memory must be whole pages at a page-aligned address; what is not comes back.
    #[test]
    fn unaligned_caller_memory_is_refused() {
        let page = cpu_page_size();
        #[derive(Debug)]
        struct Offset(PageBuffer, usize, usize);
        // SAFETY: a part of the PageBuffer it owns, the memory's only owner.
        unsafe impl CallerMemory for Offset {
            fn dma_ptr(&self) -> NonNull<u8> {
                NonNull::new(self.0.dma_ptr().as_ptr().wrapping_add(self.1)).unwrap()
            }
            fn dma_len(&self) -> usize {
                self.2
            }
        }
        for (offset, len) in [(8, page), (0, 100), (0, 0)] {
            let (err, back) =
                DmaBuffer::from_memory(Offset(PageBuffer::new(2 * page).unwrap(), offset, len)).unwrap_err();
            assert_eq!(err.len, len);
            assert_eq!(err.vaddr, back.dma_ptr().as_ptr() as u64);
        }
        assert!(DmaBuffer::from_memory(Offset(PageBuffer::new(2 * page).unwrap(), page, page)).is_ok());
    }

    #[test]
    fn page_buffers_are_zeroed_whole_pages() {
        let page = cpu_page_size();
        let mut b = PageBuffer::new(1).unwrap();
        assert_eq!(b.len(), page);
        assert!((b.as_ptr() as usize).is_multiple_of(page));
        assert!(b.iter().all(|&x| x == 0));
        b[page - 1] = 1;
        assert_eq!(b[page - 1], 1);
        assert!(PageBuffer::new(usize::MAX).is_err());
    }

    // A buffer bound to a NUMA node is zeroed and usable whether or not the binding took.
    #[test]
    fn node_buffers_are_populated_and_zeroed() {
        let page = cpu_page_size();
        for node in [0, 4095, u32::MAX] {
            let b = DmaBuffer::on_node(3 * page, node).unwrap();
            assert_eq!(b.len(), 3 * page);
            assert!((0..3 * page).step_by(8).all(|o| b.read::<u64>(o) == Some(0)));
        }
        mbind_preferred(0, page, 0).unwrap_err(); // not a mapping of ours: refused
    }

    proptest! {
        #[test]
        fn trimming_keeps_an_aligned_part_inside_the_mapping(
            page_log in 12u32..17, extra in 1u32..6, addr_pages in 1usize..1 << 20, pages in 1usize..64,
        ) {
            let page = 1usize << page_log;
            let align = page << extra;
            let (addr, len) = (addr_pages * page, pages * page);
            let mapped = len + align - page;
            let (head, tail) = trim_to_alignment(addr, len, mapped, align);
            prop_assert!((addr + head).is_multiple_of(align));
            prop_assert_eq!(head + len + tail, mapped);
            prop_assert!(head.is_multiple_of(page) && tail.is_multiple_of(page));
        }

        #[test]
        fn map_plans_cover_the_length_in_whole_pages(
            len in prop_oneof![0usize..1 << 32, any::<usize>()],
            gib in any::<bool>(),
            round_up in any::<bool>(),
            page in prop_oneof![Just(0x1000usize), Just(0x4000), Just(0x1_0000)],
        ) {
            let size = if gib { HugePageSize::Gib1 } else { HugePageSize::Mib2 };
            let Some(plan) = MapPlan::new(len, size, round_up, page) else {
                prop_assert!(len == 0 || len.checked_next_multiple_of(page).is_none());
                return Ok(());
            };
            prop_assert!(plan.small_len >= len && plan.small_len - len < page);
            prop_assert!(plan.small_len.is_multiple_of(page));
            if let Some(h) = plan.huge {
                prop_assert_eq!(h.size, size);
                prop_assert!(h.len >= len && h.len - len < size.bytes());
                prop_assert!(h.len.is_multiple_of(size.bytes()));
                if !round_up {
                    prop_assert_eq!(h.len, len);
                }
                // MAP_HUGETLB with log2 of the size above MAP_HUGE_SHIFT, nothing else.
                prop_assert_eq!(h.flags & !(0x3f << MAP_HUGE_SHIFT), nix::libc::MAP_HUGETLB);
                prop_assert_eq!(1usize << ((h.flags >> MAP_HUGE_SHIFT) & 0x3f), size.bytes());
            } else {
                let expected_none = if round_up {
                    len.checked_next_multiple_of(size.bytes()).is_none()
                } else {
                    !len.is_multiple_of(size.bytes())
                };
                prop_assert!(expected_none);
            }
        }
    }
}
