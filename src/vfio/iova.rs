//! IOVA bookkeeping: which IOVAs a container may hand out. [`IovaAllocator`] is the free
//! list over the ranges the IOMMU accepts; [`IovaSpace`] adds what the IOMMU reports and
//! the ranges leaked by failed unmaps. Pure: no system call here.
//!
//! # One space per IOMMU
//!
//! A type1 container can lose its IOMMU: the kernel detaches a group from its container
//! when the group's last device is removed (even while the group fd is open), and when
//! the last group goes it releases the IOMMU with every mapping in it. The next group
//! attached sets a new IOMMU up, empty. So a container's [`IovaSpace`] belongs to one
//! IOMMU: it is dropped when that IOMMU is found gone, a new one (with a new
//! [`SpaceId`]) comes with the next IOMMU, and a region remembers the space it was mapped
//! in ([`IovaSpace::holds`]): a region of a space that is gone has nothing left to unmap,
//! and must never unmap in the new IOMMU, which may have handed its IOVA out again.
//!
//! # Quarantine
//!
//! Unmapping a region stops the device reaching its pages, but not its IOVA: a device
//! that still has a command naming that IOVA (a removed or revoked device whose DMA may
//! be in flight) would write into whatever is mapped there next. While a quarantine is
//! held ([`IovaSpace::hold`]), IOVAs whose unmap succeeded are kept out of the allocator;
//! they return when the last hold is released, which its holder does once the device can
//! no longer reach them (its fd closed, so vfio-pci disabled it, or bus mastering off).
//! The quarantine covers the whole space, not one device's regions (a region does not
//! know which device used it): sound, and short-lived.

use std::io;
use std::ops::RangeInclusive;
use std::sync::atomic::{AtomicU64, Ordering};

use super::dma::{PAGE, cpu_page_size, dma_granule};
use super::{IommuInfo, VfioError};

/// Which [`IovaSpace`] (and so which IOMMU) a mapping was made in: unique in the process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) struct SpaceId(u64);

impl SpaceId {
    fn next() -> SpaceId {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        SpaceId(NEXT.fetch_add(1, Ordering::Relaxed))
    }
}

/// A container's IOVA bookkeeping: what the IOMMU reports, the free ranges, and what was
/// leaked. An IOVA goes back to the allocator only after its unmap succeeded.
#[derive(Debug)]
pub(super) struct IovaSpace {
    id: SpaceId,
    pub(super) info: IommuInfo,
    // The CPU's page size ([`cpu_page_size`]; another in tests): no mapping is smaller.
    cpu_page: u64,
    alloc: IovaAllocator,
    pub(super) leaked: Vec<(u64, u64)>,
    // Quarantine holds, and the ranges unmapped while one was held.
    holds: usize,
    quarantined: Vec<(u64, u64)>,
}

/// How the kernel answered an unmap, once an EINVAL has been told apart.
#[derive(Debug)]
pub(super) enum UnmapAnswer {
    /// The ioctl's result: the bytes unmapped, or its error.
    Answered(io::Result<u64>),
    /// EINVAL, and the container has no IOMMU any more: the mapping went with it.
    IommuGone,
}

impl UnmapAnswer {
    /// Reads the unmap ioctl's `result`. A type1 container without an IOMMU answers every
    /// IOMMU ioctl with EINVAL; so does the IOMMU for arguments it refuses. Only for
    /// EINVAL is `iommu_gone` asked (an ioctl: `VFIO_IOMMU_GET_INFO` answering EINVAL too).
    pub(super) fn of(result: io::Result<u64>, iommu_gone: impl FnOnce() -> bool) -> UnmapAnswer {
        match result {
            Err(e) if e.raw_os_error() == Some(nix::libc::EINVAL) && iommu_gone() => UnmapAnswer::IommuGone,
            other => UnmapAnswer::Answered(other),
        }
    }
}

impl IovaSpace {
    /// The IOVA space of an iommufd IOAS: exactly the ranges it reports (none: nothing
    /// can be mapped).
    pub(super) fn exact(info: IommuInfo) -> IovaSpace {
        IovaSpace {
            id: SpaceId::next(),
            alloc: IovaAllocator::new(&info.iova_ranges),
            info,
            cpu_page: cpu_page_size() as u64,
            leaked: Vec::new(),
            holds: 0,
            quarantined: Vec::new(),
        }
    }

    /// The IOVA side of attaching a group to a type1 container, with the container's
    /// ioctls passed in: `get_info` (`VFIO_IOMMU_GET_INFO`) and `set_iommu`
    /// (`VFIO_SET_IOMMU`).
    ///
    /// Without a space the IOMMU was never set: set it and start one. With one, GET_INFO
    /// tells whether the IOMMU is still there: its answer narrows the space
    /// ([`group_attached`](Self::group_attached)); EINVAL means the container has none any
    /// more (every group it had left it, their devices removed): the old space is dropped
    /// and returned, and the IOMMU set up again, in a new space. Any other failure leaves
    /// the space as it was.
    pub(super) fn attach_type1(
        slot: &mut Option<IovaSpace>,
        mut get_info: impl FnMut() -> io::Result<Vec<u8>>,
        set_iommu: impl FnOnce() -> io::Result<()>,
    ) -> Result<Option<IovaSpace>, VfioError> {
        let info_err = |source| super::ioctl_err("VFIO_IOMMU_GET_INFO", None, None)(source);
        let mut lost = None;
        if slot.is_some() {
            match get_info() {
                Ok(buf) => {
                    IovaSpace::group_attached(slot, super::parse_iommu_info(&buf)?);
                    return Ok(None);
                }
                Err(e) if e.raw_os_error() == Some(nix::libc::EINVAL) => lost = IovaSpace::iommu_gone(slot),
                Err(e) => return Err(info_err(e)),
            }
        }
        set_iommu().map_err(|source| {
            super::ioctl_err("VFIO_SET_IOMMU", None, Some(super::sys::TYPE1V2_IOMMU.into()))(source)
        })?;
        let info = super::parse_iommu_info(&get_info().map_err(info_err)?)?;
        IovaSpace::group_attached(slot, info);
        Ok(lost)
    }

    /// Its id, for the regions mapped in it.
    pub(super) fn id(&self) -> SpaceId {
        self.id
    }

    /// Whether the container's current space `slot` is `id`'s: a region mapped in space
    /// `id` is still mapped (its IOMMU was not lost since).
    pub(super) fn holds(slot: &Option<IovaSpace>, id: SpaceId) -> bool {
        slot.as_ref().is_some_and(|s| s.id == id)
    }

    /// The container's IOMMU is gone, with every mapping in it: the space goes too (its
    /// free ranges, and the ranges leaked in it, belonged to that IOMMU). Returns it.
    pub(super) fn iommu_gone(slot: &mut Option<IovaSpace>) -> Option<IovaSpace> {
        slot.take()
    }

    /// Another device joined the IOAS and the ranges are now `info`'s: what is free
    /// shrinks to them (what is mapped stays: the kernel refuses a device whose reserved
    /// regions overlap a mapping).
    pub(super) fn narrow(&mut self, info: IommuInfo) {
        self.alloc.retain_within(&info.iova_ranges);
        self.info = info;
    }

    /// A type1 container attached a group, and `VFIO_IOMMU_GET_INFO` now says `info`: the
    /// first group sets the space up ([`new`](Self::new)); each later one narrows it to the
    /// IOVA ranges every attached group allows, and the page sizes every IOMMU has. (The
    /// kernel reports the container's ranges already narrowed; intersecting again keeps
    /// that true whatever it reports.) A report without ranges (kernels before 5.4)
    /// narrows no range. What is mapped stays: the kernel refuses a group whose reserved
    /// regions overlap a mapping.
    pub(super) fn group_attached(slot: &mut Option<IovaSpace>, info: IommuInfo) {
        let Some(space) = slot else {
            *slot = Some(IovaSpace::new(info));
            return;
        };
        let page_sizes = match space.info.page_sizes & info.page_sizes {
            0 => info.page_sizes,
            both => both,
        };
        space.info.page_sizes = page_sizes;
        if info.iova_ranges.is_empty() {
            return;
        }
        let ranges = if space.info.iova_ranges.is_empty() {
            info.iova_ranges
        } else {
            intersect_ranges(&space.info.iova_ranges, &info.iova_ranges)
        };
        space.alloc.retain_within(&ranges);
        space.info.iova_ranges = ranges;
    }

    /// Takes exactly `[iova, iova + size)` from the free ranges, if all of it is free.
    pub(super) fn reserve_at(&mut self, iova: u64, size: u64) -> bool {
        self.alloc.reserve_at(iova, size)
    }

    pub(super) fn new(info: IommuInfo) -> IovaSpace {
        Self::with_cpu_page(cpu_page_size() as u64, info)
    }

    /// [`new`](Self::new) for a CPU whose pages are `cpu_page` bytes.
    pub(super) fn with_cpu_page(cpu_page: u64, info: IommuInfo) -> IovaSpace {
        let ranges = if info.iova_ranges.is_empty() {
            // Kernels before 5.4 report no ranges: stay below 39 bits, which every
            // IOMMU we know of covers.
            vec![0..=(1u64 << 39) - 1]
        } else {
            info.iova_ranges.clone()
        };
        IovaSpace {
            id: SpaceId::next(),
            alloc: IovaAllocator::new(&ranges),
            info,
            cpu_page,
            leaked: Vec::new(),
            holds: 0,
            quarantined: Vec::new(),
        }
    }

    /// An IOVA range of `size` bytes for memory on pages of `page_size` bytes: aligned to
    /// that page size (so the IOMMU can map a huge page with one entry) or to the IOMMU's
    /// smallest page, whichever is larger.
    #[cfg(test)]
    pub(super) fn reserve(&mut self, size: u64, page_size: u64) -> Result<u64, VfioError> {
        self.reserve_below(size, page_size, page_size, u64::MAX)
    }

    /// An IOVA range of `size` bytes for memory on pages of `page_size` bytes, aligned to
    /// `align`, that page size and the IOMMU's smallest page (the largest of the three),
    /// whose last byte is at or below `max_iova`. [`VfioError::IovaExhaustedBelow`] when
    /// nothing fits under the limit ([`VfioError::IovaExhausted`] when there is none).
    pub(super) fn reserve_below(
        &mut self,
        size: u64,
        page_size: u64,
        align: u64,
        max_iova: u64,
    ) -> Result<u64, VfioError> {
        let align = align.max(page_size).max(self.granule());
        self.alloc
            .alloc_below(size, align, max_iova)
            .ok_or(if max_iova == u64::MAX {
                VfioError::IovaExhausted { size }
            } else {
                VfioError::IovaExhaustedBelow {
                    size,
                    align,
                    max_iova,
                }
            })
    }

    /// The unit of every mapping here: the CPU page or the IOMMU's smallest page,
    /// whichever is larger ([`Container::dma_granule`](super::Container::dma_granule)).
    pub(super) fn granule(&self) -> u64 {
        dma_granule(self.cpu_page as usize, self.info.min_page_size())
    }

    /// [`VfioError::NotGranuleAligned`] unless `size` bytes at `vaddr` are whole granules
    /// at an address aligned to one: the kernel would refuse to map them (`EINVAL`).
    pub(super) fn check_granule(&self, vaddr: u64, size: u64) -> Result<(), VfioError> {
        let granule = self.granule();
        if size.is_multiple_of(granule) && vaddr.is_multiple_of(granule) {
            Ok(())
        } else {
            Err(VfioError::NotGranuleAligned { vaddr, size, granule })
        }
    }

    /// The map ioctl failed: nothing was mapped, the range is free again.
    pub(super) fn map_failed(&mut self, iova: u64, size: u64) {
        self.alloc.free(iova, size);
    }

    /// The unmap ioctl returned `result` (bytes unmapped). Frees the range when all of it
    /// was unmapped, or none of it: the IOMMU held no mapping there at all (type1 refuses
    /// an unmap that would split a mapping, so 0 bytes means nothing was mapped), which is
    /// what an unmap finds after the mappings went with the IOMMU's state when its groups'
    /// devices were removed; no device can reach those pages through it. A partial unmap
    /// or an error records the range as leaked.
    pub(super) fn unmapped(
        &mut self,
        iova: u64,
        size: u64,
        result: io::Result<u64>,
    ) -> Result<(), VfioError> {
        match result {
            Ok(n) if n == size => {
                self.give_back(iova, size);
                Ok(())
            }
            Ok(0) => {
                log::debug!(
                    "DMA at IOVA {iova:#x} ({size} bytes) was no longer mapped: it went with the IOMMU's mappings"
                );
                self.give_back(iova, size);
                Ok(())
            }
            Ok(n) => {
                self.leaked.push((iova, size));
                Err(VfioError::Unmap {
                    iova,
                    size,
                    unmapped: Some(n),
                    source: None,
                })
            }
            Err(source) => {
                self.leaked.push((iova, size));
                Err(VfioError::Unmap {
                    iova,
                    size,
                    unmapped: None,
                    source: Some(source),
                })
            }
        }
    }
}

impl IovaSpace {
    /// Holds IOVAs unmapped from now on out of the allocator (see "Quarantine" in the
    /// [module docs](self)) until [`release_hold`](Self::release_hold).
    pub(super) fn hold(&mut self) {
        self.holds += 1;
    }

    /// Ends one [`hold`](Self::hold); the last one hands the quarantined IOVAs back.
    pub(super) fn release_hold(&mut self) {
        self.holds = self.holds.saturating_sub(1);
        if self.holds == 0 {
            for (iova, size) in std::mem::take(&mut self.quarantined) {
                self.alloc.free(iova, size);
            }
        }
    }

    /// IOVA ranges unmapped but held back by a quarantine.
    pub(super) fn quarantined(&self) -> &[(u64, u64)] {
        &self.quarantined
    }

    // An unmapped range: free, unless a quarantine holds it back.
    fn give_back(&mut self, iova: u64, size: u64) {
        if self.holds > 0 {
            self.quarantined.push((iova, size));
        } else {
            self.alloc.free(iova, size);
        }
    }
}

/// The IOVAs that lie both in one of `a` and in one of `b` (inclusive ranges, in any
/// order, possibly overlapping): sorted, disjoint ranges, neighbours that touch merged.
pub(super) fn intersect_ranges(
    a: &[RangeInclusive<u64>],
    b: &[RangeInclusive<u64>],
) -> Vec<RangeInclusive<u64>> {
    intersect(
        a.iter().map(|r| (*r.start(), *r.end())),
        b.iter().map(|r| (*r.start(), *r.end())),
    )
    .into_iter()
    .map(|(s, e)| s..=e)
    .collect()
}

/// [`intersect_ranges`] over (start, end inclusive) pairs.
fn intersect(
    a: impl Iterator<Item = (u64, u64)>,
    b: impl Iterator<Item = (u64, u64)> + Clone,
) -> Vec<(u64, u64)> {
    let mut pieces = Vec::new();
    for (s, e) in a {
        for (rs, re) in b.clone() {
            let (lo, hi) = (s.max(rs), e.min(re));
            if lo <= hi {
                pieces.push((lo, hi));
            }
        }
    }
    pieces.sort_unstable();
    // Overlapping inputs give overlapping pieces: merge them (and touching ones), so the
    // result is disjoint.
    let mut merged: Vec<(u64, u64)> = Vec::with_capacity(pieces.len());
    for (s, e) in pieces {
        match merged.last_mut() {
            Some(last) if s <= last.1.saturating_add(1) => last.1 = last.1.max(e),
            _ => merged.push((s, e)),
        }
    }
    merged
}

/// Hands out IOVA ranges from the ranges the IOMMU accepts (QEMU's intel-iommu: 39 bits),
/// aligned, and takes them back.
///
/// # What an allocation promises
///
/// - [`alloc`](Self::alloc) and [`alloc_below`](Self::alloc_below) return the **lowest**
///   address that is a multiple of the alignment and at which all `size` bytes are free
///   inside one free extent (an input range, less what is taken; touching input ranges
///   are not joined). With `alloc_below` the last byte is also at or below the limit.
/// - IOVA 0 is never handed out (page 0 is never free), so a zero address in a
///   descriptor always means "unset".
/// - Nothing handed out overlaps anything else handed out and not yet
///   [`free`](Self::free)d, or a range taken by [`reserve_at`](Self::reserve_at).
/// - A failed allocation takes nothing.
///
/// A device that can address only part of the space (QEMU's `edu`: 28 bits; many devices:
/// 32) asks for the limit with [`alloc_below`](Self::alloc_below): that it also gets low
/// addresses from [`alloc`](Self::alloc) while the bottom of the space is free is a
/// consequence of lowest-first, not a promise about any given state of the allocator.
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

    /// Reserves `size` bytes aligned to `align` (a power of two), at the lowest address
    /// where they fit (see [the type's docs](Self)). `None` when no free extent is large
    /// enough, `size` is 0 or `align` is not a power of two.
    pub fn alloc(&mut self, size: u64, align: u64) -> Option<u64> {
        self.alloc_below(size, align, u64::MAX)
    }

    /// Reserves `size` bytes aligned to `align` (a power of two) whose last byte is at or
    /// below `max` (`(1 << bits) - 1` for a device that drives `bits` address lines), at
    /// the lowest address where they fit. `None` when nothing fits under `max` (nothing
    /// is taken then).
    pub fn alloc_below(&mut self, size: u64, align: u64, max: u64) -> Option<u64> {
        self.alloc_within(size, align, 0, max)
    }

    /// [`alloc_below`](Self::alloc_below), with the range also starting at or above
    /// `min`: the lowest fit in `[min, max]`.
    pub fn alloc_within(&mut self, size: u64, align: u64, min: u64, max: u64) -> Option<u64> {
        if size == 0 || !align.is_power_of_two() {
            return None;
        }
        for i in 0..self.free.len() {
            let (start, end) = self.free[i];
            if start > max {
                // Sorted: every later extent starts above the limit too.
                break;
            }
            if end < min {
                continue;
            }
            let Some(at) = start.max(min).checked_next_multiple_of(align) else {
                continue;
            };
            let Some(last) = at.checked_add(size - 1) else {
                continue;
            };
            if at > end || last > end || last > max {
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

    /// Takes exactly `[iova, iova + size)`, if it lies inside one free extent; false (and
    /// nothing taken) otherwise.
    pub fn reserve_at(&mut self, iova: u64, size: u64) -> bool {
        let Some(last) = size.checked_sub(1).and_then(|s| iova.checked_add(s)) else {
            return false;
        };
        let Some(i) = self.free.iter().position(|&(s, e)| s <= iova && last <= e) else {
            return false;
        };
        let (start, end) = self.free[i];
        let mut rest = Vec::with_capacity(2);
        if start < iova {
            rest.push((start, iova - 1));
        }
        if last < end {
            rest.push((last + 1, end));
        }
        self.free.splice(i..=i, rest);
        true
    }

    /// Keeps only the free IOVAs that lie inside `ranges` (inclusive).
    pub fn retain_within(&mut self, ranges: &[RangeInclusive<u64>]) {
        self.free = intersect(
            self.free.iter().copied(),
            ranges.iter().map(|r| (*r.start(), *r.end())),
        );
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
    use crate::vfio::dma::HUGE_PAGE;
    use proptest::prelude::*;

    // 4, 16 and 64 KiB CPU pages, under IOMMUs of 4 and 64 KiB pages: every IOVA is a
    // multiple of the larger, and memory that is not whole granules is refused.
    #[test]
    fn iovas_and_mappings_follow_the_granule() {
        for cpu_page in [0x1000u64, 0x4000, 0x1_0000] {
            for iommu_page in [0x1000u64, 0x1_0000] {
                let granule = cpu_page.max(iommu_page);
                let mut space = IovaSpace::with_cpu_page(
                    cpu_page,
                    IommuInfo {
                        page_sizes: iommu_page | 0x20_0000,
                        iova_ranges: vec![0..=(1 << 39) - 1],
                    },
                );
                assert_eq!(space.granule(), granule);
                for _ in 0..4 {
                    let iova = space.reserve(granule, cpu_page).unwrap();
                    assert!(iova.is_multiple_of(granule) && iova != 0, "{iova:#x}");
                }
                assert!(space.check_granule(granule, 3 * granule).is_ok());
                assert!(space.check_granule(0x40_0000, 0x1000).is_err() == (granule > 0x1000));
                let err = space.check_granule(granule + granule / 2, granule).unwrap_err();
                assert!(
                    matches!(err, VfioError::NotGranuleAligned { granule: g, .. } if g == granule),
                    "{err}"
                );
            }
        }
    }

    #[test]
    fn huge_buffers_get_iovas_aligned_to_their_pages() {
        let info = IommuInfo {
            page_sizes: 0x1000,
            iova_ranges: vec![0..=(1 << 39) - 1],
        };
        let mut space = IovaSpace::with_cpu_page(4096, info);
        space.reserve(PAGE as u64, PAGE as u64).unwrap();
        let two = space.reserve(HUGE_PAGE as u64, HUGE_PAGE as u64).unwrap();
        assert_eq!(two % HUGE_PAGE as u64, 0);
        let gib = space.reserve(1 << 30, 1 << 30).unwrap();
        assert_eq!(gib % (1 << 30), 0);
        // Never below the IOMMU's own page size.
        let mut coarse = IovaSpace::with_cpu_page(
            4096,
            IommuInfo {
                page_sizes: 0x1_0000,
                iova_ranges: vec![0..=(1 << 39) - 1],
            },
        );
        assert_eq!(coarse.reserve(PAGE as u64, PAGE as u64).unwrap() % 0x1_0000, 0);
    }

    #[test]
    fn iova_returns_only_after_a_successful_unmap() {
        let info = IommuInfo {
            page_sizes: 0x1000,
            iova_ranges: vec![0..=(1 << 20) - 1],
        };
        let mut space = IovaSpace::with_cpu_page(4096, info);
        let before = space.alloc.available();
        let a = space.reserve(0x4000, PAGE as u64).unwrap();
        let b = space.reserve(0x4000, PAGE as u64).unwrap();
        // b's unmap fails: its range is never handed out again.
        let e = space
            .unmapped(b, 0x4000, Err(io::Error::from_raw_os_error(nix::libc::EBUSY)))
            .unwrap_err();
        assert!(matches!(e, VfioError::Unmap { iova, unmapped: None, source: Some(_), .. } if iova == b));
        // a's unmap covers only part: leaked as well.
        assert!(space.unmapped(a, 0x4000, Ok(0x1000)).is_err());
        assert_eq!(space.leaked, vec![(b, 0x4000), (a, 0x4000)]);
        assert_eq!(space.alloc.available(), before - 0x8000);
        for _ in 0..((1 << 20) / 0x4000) {
            if let Ok(x) = space.reserve(0x4000, PAGE as u64) {
                assert!(
                    x + 0x4000 <= a.min(b) || x >= a.max(b) + 0x4000,
                    "leaked IOVA {x:#x} reused"
                );
            }
        }
        // An unmap that finds nothing mapped (the mappings went with the IOMMU's state
        // when the group's devices were removed: seen in the soak on 6.12) frees too.
        let mut space = IovaSpace::with_cpu_page(4096, space.info.clone());
        let gone = space.reserve(0x4000, PAGE as u64).unwrap();
        space.unmapped(gone, 0x4000, Ok(0)).unwrap();
        assert!(space.leaked.is_empty());
        assert_eq!(space.alloc.available(), before);
        // A successful unmap frees.
        let mut space = IovaSpace::with_cpu_page(4096, space.info.clone());
        let c = space.reserve(0x4000, PAGE as u64).unwrap();
        space.unmapped(c, 0x4000, Ok(0x4000)).unwrap();
        assert_eq!(space.alloc.available(), before);
        let d = space.reserve(0x2000, PAGE as u64).unwrap();
        space.map_failed(d, 0x2000);
        assert_eq!(space.alloc.available(), before);
    }

    // Issue 15 §1: the IOVA of a region unmapped while a removed device's DMA may be in
    // flight is not handed out again until the quarantine ends.
    #[test]
    fn quarantined_iovas_return_only_when_the_last_hold_ends() {
        let info = IommuInfo {
            page_sizes: 0x1000,
            iova_ranges: vec![0..=(1 << 20) - 1],
        };
        let mut space = IovaSpace::with_cpu_page(4096, info);
        let before = space.alloc.available();
        let a = space.reserve(0x4000, PAGE as u64).unwrap();
        let b = space.reserve(0x4000, PAGE as u64).unwrap();
        space.hold();
        space.hold();
        space.unmapped(a, 0x4000, Ok(0x4000)).unwrap();
        // Found unmapped already (the IOMMU's mappings went): held back all the same.
        space.unmapped(b, 0x4000, Ok(0)).unwrap();
        assert_eq!(space.quarantined(), [(a, 0x4000), (b, 0x4000)]);
        assert_eq!(space.alloc.available(), before - 0x8000);
        for _ in 0..((1 << 20) / 0x4000) {
            if let Ok(x) = space.reserve(0x4000, PAGE as u64) {
                assert!(x != a && x != b, "quarantined IOVA {x:#x} reused");
            }
        }
        let mut space = IovaSpace::with_cpu_page(4096, space.info.clone());
        space.hold();
        let c = space.reserve(0x4000, PAGE as u64).unwrap();
        space.hold();
        space.unmapped(c, 0x4000, Ok(0x4000)).unwrap();
        space.release_hold();
        assert_eq!(space.alloc.available(), before - 0x4000, "one hold is left");
        space.release_hold();
        assert!(space.quarantined().is_empty());
        assert_eq!(space.alloc.available(), before);
        // A failed map was never reachable: not quarantined.
        space.hold();
        let d = space.reserve(0x2000, PAGE as u64).unwrap();
        space.map_failed(d, 0x2000);
        assert_eq!(space.alloc.available(), before);
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

    #[test]
    fn fixed_iovas_are_taken_exactly_once() {
        let mut a = IovaAllocator::new(&[0..=0xffff_ffff]);
        assert!(a.reserve_at(0x10_0000, 0x2000));
        assert!(!a.reserve_at(0x10_1000, 0x1000), "already taken");
        assert!(!a.reserve_at(0, 0x1000), "IOVA 0 is never handed out");
        assert!(!a.reserve_at(0xffff_f000, 0x2000), "runs past the range");
        assert!(!a.reserve_at(0x1000, 0), "empty");
        assert!(!a.reserve_at(u64::MAX, 2), "wraps");
        // The allocator goes around it.
        let x = a.alloc(0x10_0000, 0x1000).unwrap();
        assert!(x + 0x10_0000 <= 0x10_0000 || x >= 0x10_2000);
        a.free(x, 0x10_0000);
        a.free(0x10_0000, 0x2000);
        assert_eq!(a, IovaAllocator::new(&[0..=0xffff_ffff]));
    }

    #[test]
    fn a_second_device_narrows_what_is_free() {
        // A first device attached: everything below 2^39; a second one reserves the MSI
        // window, which is free, and keeps the rest.
        let top = (1u64 << 39) - 1;
        let info = |ranges: Vec<RangeInclusive<u64>>| IommuInfo {
            page_sizes: 4096,
            iova_ranges: ranges,
        };
        let mut space = IovaSpace::exact(info(vec![0..=top]));
        let a = space.reserve(PAGE as u64, PAGE as u64).unwrap();
        space.narrow(info(vec![0..=0xfedf_ffff, 0xfef0_0000..=top]));
        assert_eq!(space.info.iova_ranges.len(), 2);
        assert!(
            !space.reserve_at(0xfee0_0000, PAGE as u64),
            "the MSI window is gone"
        );
        assert!(space.reserve_at(0xfef0_0000, PAGE as u64));
        // What was mapped before stays mapped: not handed out again.
        assert!(!space.reserve_at(a, PAGE as u64));
        // An IOAS that reports no range lets nothing be mapped.
        let mut none = IovaSpace::exact(info(vec![]));
        assert!(matches!(
            none.reserve(PAGE as u64, PAGE as u64),
            Err(VfioError::IovaExhausted { .. })
        ));
    }

    #[test]
    fn ranges_intersect() {
        let top = (1u64 << 39) - 1;
        assert_eq!(
            intersect_ranges(&[0..=top], &[0..=0xfedf_ffff, 0xfef0_0000..=(1 << 48) - 1]),
            vec![0..=0xfedf_ffff, 0xfef0_0000..=top]
        );
        // Order does not matter, touching ends count, and nothing in common is nothing.
        assert_eq!(
            intersect_ranges(&[0x3000..=0x3fff, 0x1000..=0x1fff], &[0x1fff..=0x3000]),
            vec![0x1fff..=0x1fff, 0x3000..=0x3000]
        );
        assert_eq!(intersect_ranges(&[0..=0xfff], &[0x1000..=0x1fff]), vec![]);
        assert_eq!(intersect_ranges(&[], &[0..=u64::MAX]), vec![]);
        assert_eq!(
            intersect_ranges(&[0..=u64::MAX], &[5..=u64::MAX]),
            vec![5..=u64::MAX]
        );
        // Overlapping input ranges give one output range, not two.
        assert_eq!(intersect_ranges(&[0..=10, 5..=20], &[0..=u64::MAX]), vec![0..=20]);
    }

    // Type1: the first group sets the space up from VFIO_IOMMU_GET_INFO; each later group's
    // GET_INFO narrows it to what every group allows.
    #[test]
    fn each_attached_group_narrows_the_type1_space() {
        let top = (1u64 << 39) - 1;
        let info = |page_sizes: u64, ranges: Vec<RangeInclusive<u64>>| IommuInfo {
            page_sizes,
            iova_ranges: ranges,
        };
        let mut slot = None;
        IovaSpace::group_attached(&mut slot, info(0x4020_1000, vec![0..=top]));
        let space = slot.as_mut().unwrap();
        let a = space.reserve(0x1000, 0x1000).unwrap();
        // A second group behind an IOMMU with a reserved MSI window and 48 bits.
        IovaSpace::group_attached(
            &mut slot,
            info(0x20_1000, vec![0..=0xfedf_ffff, 0xfef0_0000..=(1 << 48) - 1]),
        );
        let space = slot.as_mut().unwrap();
        assert_eq!(space.info.iova_ranges, vec![0..=0xfedf_ffff, 0xfef0_0000..=top]);
        assert_eq!(space.info.page_sizes, 0x20_1000, "page sizes both IOMMUs have");
        assert!(!space.reserve_at(0xfee0_0000, 0x1000), "the MSI window is gone");
        assert!(
            !space.reserve_at(1 << 39, 0x1000),
            "above what the first group allows"
        );
        assert!(space.reserve_at(0xfef0_0000, 0x1000));
        assert!(!space.reserve_at(a, 0x1000), "what was mapped stays taken");
        // A third group whose kernel reports no ranges (before Linux 5.4) narrows nothing.
        IovaSpace::group_attached(&mut slot, info(0x1000, vec![]));
        let space = slot.as_mut().unwrap();
        assert_eq!(space.info.iova_ranges, vec![0..=0xfedf_ffff, 0xfef0_0000..=top]);
        assert_eq!(space.info.page_sizes, 0x1000);
        assert!(space.reserve_at(0x10_0000, 0x1000));
    }

    // GET_INFO's answer for a type1 IOMMU with these ranges (no page sizes), as
    // sys::iommu_get_info returns it.
    fn type1_info(ranges: &[(u64, u64)]) -> Vec<u8> {
        let mut b = vec![0u8; 24 + 16 + ranges.len() * 16];
        let len = b.len() as u32;
        b[0..4].copy_from_slice(&len.to_ne_bytes());
        b[4..8].copy_from_slice(&2u32.to_ne_bytes()); // VFIO_IOMMU_INFO_CAPS
        b[8..16].copy_from_slice(&0x1000u64.to_ne_bytes());
        b[16..20].copy_from_slice(&24u32.to_ne_bytes());
        b[24..26].copy_from_slice(&1u16.to_ne_bytes()); // IOVA range capability
        b[32..36].copy_from_slice(&(ranges.len() as u32).to_ne_bytes());
        for (i, (start, end)) in ranges.iter().enumerate() {
            b[40 + i * 16..48 + i * 16].copy_from_slice(&start.to_ne_bytes());
            b[48 + i * 16..56 + i * 16].copy_from_slice(&end.to_ne_bytes());
        }
        b
    }

    /// A type1 container's ioctls, scripted: whether it has an IOMMU, its ranges, and
    /// what was called.
    struct Type1 {
        iommu: std::cell::Cell<bool>,
        ranges: Vec<(u64, u64)>,
        calls: std::cell::RefCell<Vec<&'static str>>,
        fail: Option<i32>,
    }

    impl Type1 {
        fn new(ranges: &[(u64, u64)]) -> Type1 {
            Type1 {
                iommu: false.into(),
                ranges: ranges.to_vec(),
                calls: Vec::new().into(),
                fail: None,
            }
        }
        fn attach(&self, slot: &mut Option<IovaSpace>) -> Result<Option<IovaSpace>, VfioError> {
            self.calls.borrow_mut().clear();
            IovaSpace::attach_type1(
                slot,
                || {
                    self.calls.borrow_mut().push("GET_INFO");
                    match (self.fail, self.iommu.get()) {
                        (Some(errno), _) => Err(io::Error::from_raw_os_error(errno)),
                        (None, true) => Ok(type1_info(&self.ranges)),
                        (None, false) => Err(io::Error::from_raw_os_error(nix::libc::EINVAL)),
                    }
                },
                || {
                    self.calls.borrow_mut().push("SET_IOMMU");
                    self.iommu.set(true);
                    Ok(())
                },
            )
        }
        fn calls(&self) -> Vec<&'static str> {
            self.calls.borrow().clone()
        }
    }

    // The IOMMU of a type1 container can go (every group left it: their devices were
    // removed) and come back (a group attached again): each time a new space, and a
    // region of the old one is no longer held.
    #[test]
    fn a_lost_iommu_is_set_up_again_in_a_new_space() {
        let mut kernel = Type1::new(&[(0, (1 << 30) - 1)]);
        let mut slot = None;
        // The first group sets the IOMMU up.
        assert!(kernel.attach(&mut slot).unwrap().is_none());
        assert_eq!(kernel.calls(), ["SET_IOMMU", "GET_INFO"]);
        let first = slot.as_ref().unwrap().id();
        let a = slot.as_mut().unwrap().reserve(0x1000, 0x1000).unwrap();
        slot.as_mut()
            .unwrap()
            .unmapped(
                0x40_0000,
                0x1000,
                Err(io::Error::from_raw_os_error(nix::libc::EBUSY)),
            )
            .unwrap_err();
        assert!(IovaSpace::holds(&slot, first));
        // A second group while the IOMMU is there narrows the same space.
        kernel.ranges = vec![(0, (1 << 29) - 1)];
        assert!(kernel.attach(&mut slot).unwrap().is_none());
        assert_eq!(kernel.calls(), ["GET_INFO"]);
        assert!(IovaSpace::holds(&slot, first));
        assert_eq!(slot.as_ref().unwrap().info.iova_ranges, vec![0..=(1 << 29) - 1]);

        // Every group left (the kernel released the IOMMU); a group attached again finds
        // none: set up again, in a new space.
        kernel.iommu.set(false);
        let old = kernel.attach(&mut slot).unwrap().expect("the old space");
        assert_eq!(kernel.calls(), ["GET_INFO", "SET_IOMMU", "GET_INFO"]);
        assert_eq!((old.id(), old.leaked.len()), (first, 1));
        let second = slot.as_ref().unwrap().id();
        assert_ne!(second, first);
        assert!(
            !IovaSpace::holds(&slot, first),
            "the old region's IOMMU is not this one"
        );
        assert!(IovaSpace::holds(&slot, second));
        assert!(slot.as_ref().unwrap().leaked.is_empty());
        assert_eq!(slot.as_ref().unwrap().info.iova_ranges, vec![0..=(1 << 29) - 1]);
        assert_eq!(
            slot.as_mut().unwrap().reserve(0x1000, 0x1000).unwrap(),
            a,
            "the IOVA is free again"
        );

        // GET_INFO failing otherwise fails the attach and keeps the space.
        kernel.fail = Some(nix::libc::EFAULT);
        assert!(matches!(
            kernel.attach(&mut slot),
            Err(VfioError::Ioctl {
                ioctl: "VFIO_IOMMU_GET_INFO",
                ..
            })
        ));
        assert!(IovaSpace::holds(&slot, second));

        // Found gone elsewhere (a failed unmap): the space goes once.
        assert_eq!(IovaSpace::iommu_gone(&mut slot).map(|s| s.id()), Some(second));
        assert!(IovaSpace::iommu_gone(&mut slot).is_none());
        assert!(!IovaSpace::holds(&slot, second));
    }

    #[test]
    fn an_einval_unmap_is_done_only_when_the_iommu_is_gone() {
        let einval = || Err(io::Error::from_raw_os_error(nix::libc::EINVAL));
        assert!(matches!(
            UnmapAnswer::of(einval(), || true),
            UnmapAnswer::IommuGone
        ));
        assert!(matches!(
            UnmapAnswer::of(einval(), || false),
            UnmapAnswer::Answered(Err(e)) if e.raw_os_error() == Some(nix::libc::EINVAL)
        ));
        // Only EINVAL makes it ask.
        let asked = std::cell::Cell::new(false);
        let gone = || {
            asked.set(true);
            true
        };
        let ebusy = Err(io::Error::from_raw_os_error(nix::libc::EBUSY));
        assert!(matches!(
            UnmapAnswer::of(ebusy, gone),
            UnmapAnswer::Answered(Err(_))
        ));
        assert!(matches!(
            UnmapAnswer::of(Ok(0x1000), gone),
            UnmapAnswer::Answered(Ok(0x1000))
        ));
        assert!(!asked.get());
    }

    // Issue 16 §3: a device with a 28-bit DMA mask (QEMU's edu) gets IOVAs below 2^28
    // because the allocator is asked to keep them there, not because it happens to start
    // from the bottom; when nothing fits under the limit it says so.
    #[test]
    fn a_limit_keeps_iovas_below_it() {
        let mut a = IovaAllocator::new(&[0..=(1u64 << 39) - 1]);
        let limit = (1u64 << 28) - 1;
        let x = a.alloc_below(1 << 20, 1 << 21, limit).unwrap();
        assert!(x.is_multiple_of(1 << 21) && x + (1 << 20) - 1 <= limit);
        // Everything under the limit taken: the next one fails, though space is left above.
        let rest = a.clone();
        while a.alloc_below(1 << 20, PAGE as u64, limit).is_some() {}
        while a.alloc_below(PAGE as u64, PAGE as u64, limit).is_some() {}
        assert_eq!(a.alloc_below(PAGE as u64, PAGE as u64, limit), None);
        assert!(a.alloc(PAGE as u64, PAGE as u64).unwrap() > limit);
        // A limit below the first free IOVA, or one that cuts every extent short.
        let mut b = rest.clone();
        assert_eq!(b.alloc_below(PAGE as u64, PAGE as u64, PAGE as u64 - 1), None);
        assert_eq!(b.alloc_below(2 * PAGE as u64, PAGE as u64, 2 * PAGE as u64), None);
        assert_eq!(b, rest, "a failed allocation takes nothing");
        // The space reports the limit it could not meet.
        let mut space = IovaSpace::with_cpu_page(
            4096,
            IommuInfo {
                page_sizes: 0x1000,
                iova_ranges: vec![0..=(1 << 39) - 1],
            },
        );
        let err = space
            .reserve_below(1 << 30, PAGE as u64, PAGE as u64, limit)
            .unwrap_err();
        assert!(
            matches!(err, VfioError::IovaExhaustedBelow { size, max_iova, .. } if size == 1 << 30 && max_iova == limit),
            "{err:?}"
        );
        let text = err.to_string();
        assert!(
            text.contains("0xfffffff") && text.contains("1073741824"),
            "{text}"
        );
        // Alignment: the larger of what was asked, the buffer's pages and the IOMMU's.
        let y = space
            .reserve_below(PAGE as u64, PAGE as u64, 1 << 16, limit)
            .unwrap();
        assert!(y.is_multiple_of(1 << 16) && y <= limit);
    }

    proptest! {
        #[test]
        fn intersection_holds_what_both_hold(
            a in proptest::collection::vec((0u64..1 << 12, 0u64..1 << 10), 0..6),
            b in proptest::collection::vec((0u64..1 << 12, 0u64..1 << 10), 0..6),
        ) {
            let ranges = |v: &[(u64, u64)]| -> Vec<RangeInclusive<u64>> { v.iter().map(|&(s, l)| s..=s + l).collect() };
            let (a, b) = (ranges(&a), ranges(&b));
            let both = intersect_ranges(&a, &b);
            for w in both.windows(2) {
                prop_assert!(w[0].end().saturating_add(1) < *w[1].start(), "sorted, disjoint, not touching");
            }
            for probe in 0u64..(1 << 12) + (1 << 10) {
                let want = a.iter().any(|r| r.contains(&probe)) && b.iter().any(|r| r.contains(&probe));
                prop_assert_eq!(both.iter().any(|r| r.contains(&probe)), want, "IOVA {:#x}", probe);
            }
        }

        #[test]
        fn narrowing_keeps_only_what_both_allow(
            cuts in proptest::collection::vec((0u64..1 << 16, 1u64..1 << 12), 0..8),
        ) {
            let mut a = IovaAllocator::new(&[0..=(1u64 << 16) - 1]);
            let ranges: Vec<RangeInclusive<u64>> = cuts.iter().map(|&(s, l)| s..=s + l - 1).collect();
            a.retain_within(&ranges);
            let allowed = |iova: u64| iova >= PAGE as u64 && iova < 1 << 16 && ranges.iter().any(|r| r.contains(&iova));
            for probe in (0u64..1 << 16).step_by(97) {
                prop_assert_eq!(a.clone().reserve_at(probe, 1), allowed(probe), "IOVA {:#x}", probe);
            }
            // Disjoint extents: what is free is exactly what is allowed, counted once.
            prop_assert_eq!(a.available(), (0u64..1 << 16).filter(|&i| allowed(i)).count() as u64);
        }

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

        // Allocations under a limit (and plain ones, mixed in) respect the limit and the
        // alignment, stay in the ranges, never overlap, and are the lowest fit.
        #[test]
        fn allocations_under_a_limit_respect_it(
            steps in proptest::collection::vec((1u64..1 << 22, 12u32..23, prop_oneof![Just(None), (20u32..34).prop_map(Some)], any::<bool>()), 1..60),
        ) {
            let ranges = [0..=0xfedf_ffff, 0xfef0_0000..=(1u64 << 39) - 1];
            let mut a = IovaAllocator::new(&ranges);
            let mut got: Vec<(u64, u64)> = Vec::new();
            for (size, align_log2, bits, free_one) in steps {
                let align = 1u64 << align_log2;
                let max = bits.map_or(u64::MAX, |b| (1u64 << b) - 1);
                if free_one && !got.is_empty() {
                    let (s, l) = got.swap_remove(got.len() / 2);
                    a.free(s, l);
                }
                let before = a.clone();
                match a.alloc_below(size, align, max) {
                    Some(at) => {
                        prop_assert!(at.is_multiple_of(align));
                        prop_assert!(at + size - 1 <= max, "{:#x}+{:#x} above {:#x}", at, size, max);
                        prop_assert!(at >= PAGE as u64);
                        prop_assert!(ranges.iter().any(|r| r.contains(&at) && r.contains(&(at + size - 1))));
                        for &(s, l) in &got {
                            prop_assert!(at + size <= s || s + l <= at, "overlap");
                        }
                        prop_assert_eq!(Some(at), lowest_fit(&before, size, align, max), "the lowest fit");
                        got.push((at, size));
                    }
                    None => {
                        prop_assert_eq!(&a, &before, "a failed allocation takes nothing");
                        prop_assert_eq!(lowest_fit(&before, size, align, max), None, "something fitted");
                    }
                }
            }
        }
    }

    // The lowest aligned IOVA at which `size` bytes lie in one free extent of `a`, ending
    // at or below `max`: computed apart from the allocator's loop.
    fn lowest_fit(a: &IovaAllocator, size: u64, align: u64, max: u64) -> Option<u64> {
        a.free
            .iter()
            .filter_map(|&(s, e)| {
                let at = s.checked_next_multiple_of(align)?;
                (at.checked_add(size - 1)? <= e.min(max)).then_some(at)
            })
            .min()
    }

    #[test]
    fn alloc_within_takes_the_lowest_fit_at_or_above_its_floor() {
        let mut a = IovaAllocator::new(&[0x1000..=0xffff_ffff]);
        assert_eq!(
            a.alloc_within(0x1000, 0x1000, 0x8000_0000, u64::MAX),
            Some(0x8000_0000)
        );
        // Below the floor stays free, and is what the lowest-first allocation takes.
        assert_eq!(a.alloc_below(0x1000, 0x1000, u64::MAX), Some(0x1000));
        assert_eq!(
            a.alloc_within(0x1000, 0x1000, 0x8000_0000, u64::MAX),
            Some(0x8000_1000)
        );
        // Nothing fits between a floor and a ceiling closer than the size.
        assert_eq!(a.alloc_within(0x2000, 0x1000, 0x9000_0000, 0x9000_0fff), None);
    }
}
