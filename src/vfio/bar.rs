//! BARs of a [`VfioDevice`]: mapping a BAR or a window of one ([`MappedBar`]), its
//! config-space register, and the device-specific regions (index 9 and up).
//!
//! A BAR is reached in one of two ways, chosen per byte range by what VFIO allows: the
//! areas its region info lets be mmapped are mapped and reached with volatile loads and
//! stores ([`mmio`]); the rest — the MSI-X table a memory BAR keeps out of its mapping,
//! the whole of a BAR the kernel will not let be mmapped, every I/O-port BAR — through
//! `pread`/`pwrite` on the device fd at the region's offset, which vfio-pci turns into one
//! access of the same width (`ioread8/16/32`, `inb/w/l` for ports). A driver sees one
//! [`MappedBar`] either way.

use std::ops::Range;
use std::os::fd::AsFd;
use std::sync::Arc;

use super::{ROM_REGION, RegionInfo, VfioDevice, VfioError, fault, holders, mmio};
use crate::vfio::dma::cpu_page_size;

/// Offset of BAR 0's register in config space.
const BAR0_REGISTER: u64 = 0x10;
/// The first device-specific region index (`VFIO_PCI_NUM_REGIONS`).
const FIRST_DEVICE_REGION: u32 = 9;

/// A window of a BAR (what a [`MappedBar`] or another backing's registers reach): where an
/// access at a window offset lands in the BAR, with the bounds and alignment checks every
/// backing makes the same way. Accesses are naturally aligned in the BAR (so also in the
/// window when it starts at a multiple of 8).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Window {
    /// Where the window starts in the BAR.
    pub(crate) base: u64,
    /// Its length.
    pub(crate) len: u64,
}

impl Window {
    /// The window `offset..offset + len` of a BAR of `bar_size` bytes; `None` when it is
    /// empty or does not fit.
    pub(crate) fn new(bar_size: u64, offset: u64, len: u64) -> Option<Window> {
        let end = offset.checked_add(len)?;
        (len > 0 && end <= bar_size).then_some(Window { base: offset, len })
    }

    /// The BAR offset of an access of `width` bytes at window offset `offset`; `None`
    /// when it leaves the window or is not naturally aligned in the BAR.
    pub(crate) fn at(&self, offset: u64, width: usize) -> Option<u64> {
        let end = offset.checked_add(width as u64)?;
        let bar = self.base.checked_add(offset)?;
        (end <= self.len && bar.is_multiple_of(width as u64)).then_some(bar)
    }

    /// The CPU pages (`page` bytes: mmap's unit) of `area` (BAR offsets, page-aligned
    /// start) that hold part of the window: what to mmap of it. `None` when the window
    /// does not touch it.
    fn pages_of(&self, area: Range<u64>, page: u64) -> Option<Range<u64>> {
        let start = self.base.max(area.start);
        let end = (self.base + self.len).min(area.end);
        if start >= end {
            return None;
        }
        let start = (start / page * page).max(area.start);
        let end = end.div_ceil(page).saturating_mul(page).min(area.end);
        Some(start..end)
    }
}

impl VfioDevice {
    /// Maps BAR `index`: the areas VFIO allows (sparse mmap), leaving the MSI-X table out
    /// unless the region says it is mappable. Accesses outside the mapped areas, and every
    /// access to an I/O-port BAR, go through pread/pwrite on the device fd. The mapping
    /// holds an `Arc` of the device.
    pub fn map_bar(self: &Arc<Self>, index: u32) -> Result<MappedBar, VfioError> {
        let size = self.bar_region(index)?.size;
        self.map_bar_range(index, 0, size)
    }

    /// Maps `len` bytes of BAR `index` from `offset`, as [`map_bar`](Self::map_bar) maps
    /// the whole: the [`MappedBar`]'s offsets are relative to `offset`, accesses past `len`
    /// fail with [`VfioError::OutOfRange`], and only the pages of the BAR's mappable
    /// areas that hold part of the window are mapped. An empty window, or one leaving the
    /// BAR, is [`VfioError::OutOfRange`].
    pub fn map_bar_range(
        self: &Arc<Self>,
        index: u32,
        offset: u64,
        len: u64,
    ) -> Result<MappedBar, VfioError> {
        let region = self.bar_region(index)?.clone();
        let window = Window::new(region.size, offset, len).ok_or(VfioError::OutOfRange {
            address: self.address,
            region: index,
            offset,
            len: usize::try_from(len).unwrap_or(usize::MAX),
        })?;
        let io = self.bar_register(index)? & 1 != 0;
        // Counted before the mmap, under the lock: a concurrent write clearing Memory
        // Space Enable either lands before (then this mapping's accesses see a disabled
        // BAR: the caller turned it off) or is refused.
        let mut mapped = self.mapped.lock();
        // Under the lock: a `revoke` either sees this mapping or makes this fail.
        self.live()?;
        let mut areas = Vec::new();
        // Never an I/O BAR (vfio-pci does not offer to mmap one; ports are no memory).
        let mappable = if io { Vec::new() } else { region.mmap_areas() };
        for (area_offset, area_size) in mappable {
            let Some(pages) = window.pages_of(
                area_offset..area_offset.saturating_add(area_size),
                cpu_page_size() as u64,
            ) else {
                continue;
            };
            let owner = fault::FaultOwner {
                address: self.address,
                region: index,
            };
            let len = pages.end - pages.start;
            let area = mmio::MmioArea::map(
                self.file.as_fd(),
                region.offset + pages.start,
                len as usize,
                owner,
            )
            .map_err(|source| VfioError::Mmap {
                address: self.address,
                region: index,
                offset: pages.start,
                len,
                source,
            })?;
            areas.push((pages.start, area));
        }
        mapped.bars += 1;
        mapped.areas.extend(areas.iter().map(|(_, area)| area.key()));
        drop(mapped);
        Ok(MappedBar {
            device: Arc::clone(self),
            region,
            window,
            io,
            areas,
            _hold: holders::Hold::new(self.address, "BAR mapping"),
        })
    }

    /// The value of BAR `index`'s config-space register (read, never written: its flag
    /// bits say the BAR's kind, as [`crate::bus::bar::decode_bar_register`] decodes).
    pub fn bar_register(&self, index: u32) -> Result<u32, VfioError> {
        if index >= ROM_REGION {
            return Err(VfioError::NoRegion {
                address: self.address,
                region: index,
                source: None,
            });
        }
        let mut b = [0u8; 4];
        self.read_config(BAR0_REGISTER + 4 * u64::from(index), &mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    /// Reads device-specific region `index` (9 and up: see [`region`](Self::region) for
    /// what it is) at `offset`. The standard regions have their own calls
    /// ([`read_config`](Self::read_config), [`map_bar`](Self::map_bar)).
    pub fn read_region(&self, index: u32, offset: u64, buf: &mut [u8]) -> Result<(), VfioError> {
        let region = self.device_region(index)?;
        self.region_read(region, offset, buf)
    }

    /// Writes `buf` to device-specific region `index` (9 and up) at `offset`.
    pub fn write_region(&self, index: u32, offset: u64, buf: &[u8]) -> Result<(), VfioError> {
        let region = self.device_region(index)?;
        self.region_write(region, offset, buf)
    }

    fn device_region(&self, index: u32) -> Result<&RegionInfo, VfioError> {
        let region = self.region(index)?;
        if index < FIRST_DEVICE_REGION || region.size == 0 {
            return Err(VfioError::NoRegion {
                address: self.address,
                region: index,
                source: None,
            });
        }
        Ok(region)
    }

    fn bar_region(&self, index: u32) -> Result<&RegionInfo, VfioError> {
        let region = self.region(index)?;
        if index >= ROM_REGION || region.size == 0 {
            return Err(VfioError::NoRegion {
                address: self.address,
                region: index,
                source: None,
            });
        }
        Ok(region)
    }
}

/// A mapped BAR of a [`VfioDevice`], or a window of one, owned: it holds an `Arc` of the
/// device, so a driver can keep the device and its mappings in one struct. Made by
/// [`VfioDevice::map_bar`] and [`VfioDevice::map_bar_range`]; offsets are relative to the
/// window (the BAR's start for `map_bar`).
///
/// Mapped areas are reached with volatile loads and stores of the access's width; the
/// rest of the BAR (the MSI-X table, unless mappable; all of an I/O-port BAR or of one
/// VFIO does not let be mmapped) through pread/pwrite on the device fd, which vfio-pci
/// performs as one access of the same width. An I/O-port BAR has no 8-byte accesses
/// ([`VfioError::IoPortWidth`]).
///
/// After [`VfioDevice::revoke`] every access behaves as on a removed device, whichever
/// way it goes: reads return all-ones, writes are dropped.
///
/// # Dropping
///
/// Dropping unmaps the areas and releases the `Arc`: the device fd closes only when the
/// device and all its mappings are dropped, so drop the mappings too when REQ fires.
/// While a mapping lives, clearing Memory Space Enable is refused
/// ([`VfioDevice::write_config`]).
///
/// # Process exit
///
/// The mappings go with the process. If the device is surprise-removed while mapped, an
/// access may raise SIGBUS, which kills the process; a REQ comes first for an orderly
/// removal only. After [`fault::install`] (opt-in, process-wide) such an access does not
/// kill: the handler replaces the faulting area with memory reading all ones, the access
/// completes (reads return `0xffff_ffff`, as from a removed device), [`faulted`]
/// turns true, and the bus learns of it through its [`fault::Subscriber`].
/// Drop the mapping and the device then, as after a REQ. An area mapped while the
/// handler's table is full ([`fault::CAPACITY`] areas) is not covered.
///
/// [`faulted`]: Self::faulted
#[derive(Debug)]
pub struct MappedBar {
    device: Arc<VfioDevice>,
    region: RegionInfo,
    window: Window,
    io: bool,
    // Mapped areas by their offset in the BAR.
    areas: Vec<(u64, mmio::MmioArea)>,
    _hold: holders::Hold,
}

impl Drop for MappedBar {
    fn drop(&mut self) {
        // Unmap before the count drops, so a Memory Space Enable clear allowed by the new
        // count never meets a live mapping. (A `revoke` meanwhile finds the areas gone or
        // replaces them first: unmapping waits for it.)
        let keys: Vec<_> = self.areas.iter().map(|(_, area)| area.key()).collect();
        self.areas.clear();
        let mut mapped = self.device.mapped.lock();
        mapped.bars = mapped.bars.saturating_sub(1);
        for key in keys {
            if let Some(i) = mapped.areas.iter().position(|k| *k == key) {
                mapped.areas.swap_remove(i);
            }
        }
    }
}

// One access width: the mapped area's volatile accessor of that width, and the bytes.
trait Width: Copy {
    const BYTES: usize;
    fn load(area: &mmio::MmioArea, at: usize) -> Option<Self>;
    fn store(self, area: &mmio::MmioArea, at: usize) -> Option<()>;
    fn from_le(b: &[u8]) -> Self;
    fn all_ones() -> Self;
    fn to_le(self, out: &mut [u8]);
}

macro_rules! width {
    ($t:ty, $load:ident, $store:ident) => {
        impl Width for $t {
            const BYTES: usize = size_of::<$t>();
            fn load(area: &mmio::MmioArea, at: usize) -> Option<Self> {
                area.$load(at)
            }
            fn store(self, area: &mmio::MmioArea, at: usize) -> Option<()> {
                area.$store(at, self)
            }
            fn from_le(b: &[u8]) -> Self {
                let mut a = [0u8; size_of::<$t>()];
                a.copy_from_slice(&b[..size_of::<$t>()]);
                <$t>::from_le_bytes(a)
            }
            fn all_ones() -> Self {
                <$t>::MAX
            }
            fn to_le(self, out: &mut [u8]) {
                out[..size_of::<$t>()].copy_from_slice(&self.to_le_bytes());
            }
        }
    };
}
width!(u8, read8, write8);
width!(u16, read16, write16);
width!(u32, read32, write32);
width!(u64, read64, write64);

impl MappedBar {
    /// The region facts (of the whole BAR, also for a window of it).
    pub fn info(&self) -> &RegionInfo {
        &self.region
    }

    /// The BAR index.
    pub fn index(&self) -> u32 {
        self.region.index
    }

    /// The device.
    pub fn device(&self) -> &Arc<VfioDevice> {
        &self.device
    }

    /// The part of the BAR this reaches, as BAR offsets (the whole BAR from
    /// [`VfioDevice::map_bar`]).
    pub fn window(&self) -> Range<u64> {
        self.window.base..self.window.base + self.window.len
    }

    /// Whether it is an I/O-port BAR (every access a pread/pwrite; no 8-byte accesses).
    pub fn is_io(&self) -> bool {
        self.io
    }

    /// Whether the SIGBUS handler replaced a mapped area of this BAR with all-ones memory:
    /// the device was surprise-removed (see [`fault`]). Its mapped reads then return all
    /// ones, and its writes no longer reach the device. Always false without
    /// [`fault::install`].
    pub fn faulted(&self) -> bool {
        self.areas.iter().any(|(_, area)| area.faulted())
    }

    /// The mapped areas as (offset in the BAR, size): page-rounded, so for a window
    /// they may reach a little outside it (accesses still may not).
    pub fn mapped(&self) -> Vec<(u64, u64)> {
        self.areas.iter().map(|(o, a)| (*o, a.len() as u64)).collect()
    }

    fn area(&self, bar_offset: u64) -> Option<(&mmio::MmioArea, usize)> {
        self.areas
            .iter()
            .find(|(o, a)| bar_offset >= *o && bar_offset - *o < a.len() as u64)
            .map(|(o, a)| (a, (bar_offset - o) as usize))
    }

    fn oob(&self, offset: u64, len: usize) -> VfioError {
        VfioError::OutOfRange {
            address: self.device.address,
            region: self.region.index,
            offset,
            len,
        }
    }

    // Where an access of `W` at window offset `offset` lands in the BAR, checked.
    fn place<W: Width>(&self, offset: u64) -> Result<u64, VfioError> {
        if self.io && W::BYTES == 8 {
            return Err(VfioError::IoPortWidth {
                address: self.device.address,
                region: self.region.index,
                offset,
            });
        }
        self.window
            .at(offset, W::BYTES)
            .ok_or_else(|| self.oob(offset, W::BYTES))
    }

    fn read<W: Width>(&self, offset: u64) -> Result<W, VfioError> {
        let at = self.place::<W>(offset)?;
        if let Some((area, in_area)) = self.area(at) {
            return W::load(area, in_area).ok_or_else(|| self.oob(offset, W::BYTES));
        }
        let mut b = [0u8; 8];
        let b = &mut b[..W::BYTES];
        match self.device.region_read(&self.region, at, b) {
            Ok(()) => Ok(W::from_le(b)),
            // Revoked before or during the read (the fd then refers to an eventfd): as a
            // mapped area after revoke, all-ones.
            Err(_) if self.device.is_revoked() => Ok(W::all_ones()),
            Err(e) => Err(e),
        }
    }

    fn write<W: Width>(&self, offset: u64, value: W) -> Result<(), VfioError> {
        let at = self.place::<W>(offset)?;
        if let Some((area, in_area)) = self.area(at) {
            return value
                .store(area, in_area)
                .ok_or_else(|| self.oob(offset, W::BYTES));
        }
        let mut b = [0u8; 8];
        value.to_le(&mut b);
        match self.device.region_write(&self.region, at, &b[..W::BYTES]) {
            Ok(()) => Ok(()),
            // Revoked: dropped, as a write to a revoked mapped area.
            Err(_) if self.device.is_revoked() => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// An 8-bit read (volatile when mapped, pread otherwise).
    pub fn read8(&self, offset: u64) -> Result<u8, VfioError> {
        self.read(offset)
    }

    /// An 8-bit write.
    pub fn write8(&self, offset: u64, value: u8) -> Result<(), VfioError> {
        self.write(offset, value)
    }

    /// A 16-bit read (2-byte aligned).
    pub fn read16(&self, offset: u64) -> Result<u16, VfioError> {
        self.read(offset)
    }

    /// A 16-bit write (2-byte aligned).
    pub fn write16(&self, offset: u64, value: u16) -> Result<(), VfioError> {
        self.write(offset, value)
    }

    /// A 32-bit read (4-byte aligned; volatile when mapped, pread otherwise).
    pub fn read32(&self, offset: u64) -> Result<u32, VfioError> {
        self.read(offset)
    }

    /// A 32-bit write (4-byte aligned).
    pub fn write32(&self, offset: u64, value: u32) -> Result<(), VfioError> {
        self.write(offset, value)
    }

    /// A 64-bit read (8-byte aligned; refused on an I/O-port BAR).
    pub fn read64(&self, offset: u64) -> Result<u64, VfioError> {
        self.read(offset)
    }

    /// A 64-bit write (8-byte aligned; refused on an I/O-port BAR).
    pub fn write64(&self, offset: u64, value: u64) -> Result<(), VfioError> {
        self.write(offset, value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn windows_check_bounds_and_alignment_in_the_bar() {
        assert_eq!(Window::new(0x4000, 0x3000, 0x1001), None);
        assert_eq!(Window::new(0x4000, 0x1000, 0), None);
        assert_eq!(Window::new(0x4000, u64::MAX, 2), None);
        let w = Window::new(0x4000, 0x1004, 0x10).unwrap();
        assert_eq!(w.at(0, 4), Some(0x1004));
        assert_eq!(w.at(0xc, 4), Some(0x1010));
        assert_eq!(w.at(0x10, 1), None, "past the window");
        assert_eq!(w.at(0xe, 4), None, "crosses the window's end");
        assert_eq!(w.at(0, 8), None, "0x1004 is not 8-byte aligned in the BAR");
        assert_eq!(w.at(4, 8), Some(0x1008));
        assert_eq!(w.at(1, 2), None);
        assert_eq!(w.at(u64::MAX, 1), None);
    }

    #[test]
    fn a_window_maps_only_its_pages() {
        // An NVMe BAR0 with the MSI-X table (0x2000..0x3000) cut out of the mapping.
        let w = Window::new(0x4000, 0x1ff0, 0x20).unwrap();
        assert_eq!(w.pages_of(0..0x2000, 0x1000), Some(0x1000..0x2000));
        assert_eq!(w.pages_of(0x3000..0x4000, 0x1000), None);
        let w = Window::new(0x4000, 0x2ff8, 0x10).unwrap();
        assert_eq!(w.pages_of(0..0x2000, 0x1000), None);
        assert_eq!(w.pages_of(0x3000..0x4000, 0x1000), Some(0x3000..0x4000));
        assert_eq!(
            Window::new(0x4000, 0, 0x4000)
                .unwrap()
                .pages_of(0..0x2000, 0x1000),
            Some(0..0x2000)
        );
        // A BAR smaller than a page: the area is the BAR.
        assert_eq!(
            Window::new(0x100, 0x10, 4).unwrap().pages_of(0..0x100, 0x1000),
            Some(0..0x100)
        );
        // 64 KiB pages (aarch64): whole 64 KiB pages of the area, never a 4 KiB one.
        let w = Window::new(0x4_0000, 0x1_1ff0, 0x20).unwrap();
        assert_eq!(w.pages_of(0..0x4_0000, 0x1_0000), Some(0x1_0000..0x2_0000));
        assert_eq!(w.pages_of(0x2_0000..0x4_0000, 0x1_0000), None);
    }

    proptest! {
        #[test]
        fn window_accesses_stay_inside(
            bar in 1u64..1 << 20, offset in any::<u64>(), len in any::<u64>(),
            at in any::<u64>(), width in prop_oneof![Just(1usize), Just(2), Just(4), Just(8)],
        ) {
            if let Some(w) = Window::new(bar, offset % bar, len % bar)
                && let Some(b) = w.at(at, width)
            {
                prop_assert!(b >= w.base && b + width as u64 <= w.base + w.len);
                prop_assert!(b + width as u64 <= bar);
                prop_assert_eq!(b % width as u64, 0);
            }
        }

        #[test]
        fn window_pages_cover_the_window_within_the_area(
            offset in 0u64..1 << 16, len in 1u64..1 << 16,
            area_start in 0u64..16, area_pages in 1u64..16,
            page in prop_oneof![Just(0x1000u64), Just(0x4000), Just(0x1_0000)],
        ) {
            let area = area_start * page..(area_start + area_pages) * page;
            let w = Window::new(1 << 24, offset, len).unwrap();
            match w.pages_of(area.clone(), page) {
                None => prop_assert!(offset + len <= area.start || offset >= area.end),
                Some(p) => {
                    prop_assert!(p.start >= area.start && p.end <= area.end);
                    prop_assert!(p.start % page == 0 && (p.end % page == 0 || p.end == area.end));
                    prop_assert!(p.start <= offset.max(area.start));
                    prop_assert!(p.end >= (offset + len).min(area.end));
                }
            }
        }
    }
}
