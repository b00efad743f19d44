//! A device in memory behind [`DeviceBacking`], and an [`Attach`] that hands such devices to
//! a [`Bus`](crate::bus::Bus): for tests of drivers and of the bus without hardware.
//!
//! [`FakeBacking`] has RAM BARs (reads return what was written, at any width) laid out as
//! a [`FakeLayout`] says (sizes, kinds, an I/O-port BAR, device-specific regions), a
//! config space whose BAR registers say the kinds, DMA memory at made-up IOVAs, and a
//! "gone" switch after which every register reads all-ones, as a surprise-removed device
//! does. [`FakeAttach`] opens a
//! [`FakeBacking`] per device, gives each a request eventfd the test can fire
//! ([`FakeAttach::request_removal`]), and logs every attach and detach.
//!
//! A [`FakeBacking`] can be revoked ([`DeviceBacking::revoke`]: every handle then reads
//! all-ones and fails the rest), unless its [`FakeAttach`] was told not to allow it
//! ([`FakeAttach::irrevocable`]), as a backing without `revoke` does.

use std::collections::BTreeMap;
use std::ops::Deref;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use nix::sys::eventfd::{EfdFlags, EventFd};
use parking_lot::Mutex;

use crate::addr::PciAddress;
use crate::bus::attach::{Attach, AttachError, Attached, Release};
use crate::bus::backing::{BackingError, DeviceBacking, DmaMemory, RegisterIo};
use crate::bus::bar::{BAR0, BarInfo, BarKind, DeviceRegion};
use crate::record::DeviceRecord;
use crate::vfio::bar::Window;
use crate::vfio::{DmaBuffer, PAGE};

/// Size of each BAR of the default [`FakeLayout`].
pub const FAKE_BAR_SIZE: u64 = 0x4000;

/// The BARs and device-specific regions of a [`FakeBacking`]: by default
/// ([`FakeLayout::new`]) six 32-bit memory BARs of [`FAKE_BAR_SIZE`] bytes, mapped whole,
/// and no regions. A builder by value:
///
/// ```
/// use pcibus::bus::{BarInfo, DeviceRegion};
/// use pcibus::testing::backing::FakeLayout;
/// // e1000e's layout: 128 KiB of registers, an I/O BAR of 32 bytes, the MSI-X BAR.
/// let layout = FakeLayout::empty()
///     .bar(BarInfo::memory32(0, 0x2_0000))
///     .bar(BarInfo::io(2, 0x20))
///     .bar(BarInfo::memory32(3, 0x4000))
///     .region(DeviceRegion::new(9, 0x100, 1 << 31 | 0x8086, 1).read_only());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeLayout {
    bars: [BarInfo; 6],
    regions: Vec<DeviceRegion>,
}

impl Default for FakeLayout {
    fn default() -> Self {
        FakeLayout {
            bars: std::array::from_fn(|i| BarInfo::memory32(i as u32, FAKE_BAR_SIZE)),
            regions: Vec::new(),
        }
    }
}

impl FakeLayout {
    /// Six 32-bit memory BARs of [`FAKE_BAR_SIZE`] bytes, no regions.
    pub fn new() -> Self {
        Self::default()
    }

    /// No BAR and no region.
    pub fn empty() -> Self {
        FakeLayout {
            bars: std::array::from_fn(|i| BarInfo::absent(i as u32)),
            regions: Vec::new(),
        }
    }

    /// The same with `bar` in its slot (`bar.index`, 0–5; others are ignored). A 64-bit
    /// BAR takes the next slot too, as its upper half. Its contents are RAM of its size
    /// rounded up to 4 bytes.
    pub fn bar(mut self, bar: BarInfo) -> Self {
        let i = bar.index as usize;
        if i < 6 {
            if bar.is_64bit() && i + 1 < 6 {
                self.bars[i + 1] = BarInfo::absent(bar.index + 1);
            }
            self.bars[i] = bar;
        }
        self
    }

    /// The same with a device-specific `region` (index 9 and up; a region of the same
    /// index is replaced), zero-filled.
    pub fn region(mut self, region: DeviceRegion) -> Self {
        self.regions.retain(|r| r.index != region.index);
        self.regions.push(region);
        self.regions.sort_by_key(|r| r.index);
        self
    }
}

#[derive(Debug)]
struct FakeBar {
    info: BarInfo,
    cells: Arc<[AtomicU32]>,
}

#[derive(Debug)]
struct Inner {
    address: PciAddress,
    bars: [FakeBar; 6],
    regions: Vec<(DeviceRegion, Mutex<Vec<u8>>)>,
    config: Mutex<Vec<u8>>,
    gone: AtomicBool,
    revocable: bool,
    revoked: AtomicBool,
    next_iova: AtomicU64,
    interrupts: AtomicU32,
}

/// An in-memory device. Clones are handles of the same device.
#[derive(Debug, Clone)]
pub struct FakeBacking {
    inner: Arc<Inner>,
}

impl FakeBacking {
    /// A device at `address` whose config space starts with `record`'s ids and has
    /// memory decoding on (Command register `0x0002`), with six
    /// zeroed BARs of [`FAKE_BAR_SIZE`] bytes and 16 MSI-X vectors.
    pub fn new(record: &DeviceRecord) -> Self {
        Self::with_layout(record, FakeLayout::new())
    }

    /// [`new`](Self::new) with the BARs and regions of `layout`; the config space's BAR
    /// registers hold the kinds' flag bits ([`BarInfo::register_bits`]).
    pub fn with_layout(record: &DeviceRecord, layout: FakeLayout) -> Self {
        let mut config = vec![0u8; 4096];
        // Memory Space Enable, as vfio-pci's open of a device with memory BARs sets it.
        config[4] = 0x02;
        let vendor = record.vendor.map_or(0xffff, |v| v.0);
        let device = record.device.map_or(0xffff, |d| d.0);
        config[0..2].copy_from_slice(&vendor.to_le_bytes());
        config[2..4].copy_from_slice(&device.to_le_bytes());
        if let Some(class) = record.class {
            config[9..12].copy_from_slice(&class.value().to_le_bytes()[..3]);
        }
        for bar in &layout.bars {
            let at = (BAR0 + 4 * u64::from(bar.index)) as usize;
            config[at..at + 4].copy_from_slice(&bar.register_bits().to_le_bytes());
        }
        let FakeLayout { bars, regions } = layout;
        let bars = bars.map(|info| FakeBar {
            cells: (0..info.size.div_ceil(4)).map(|_| AtomicU32::new(0)).collect(),
            info,
        });
        let regions = regions
            .into_iter()
            .map(|r| {
                let bytes = vec![0u8; usize::try_from(r.size).unwrap_or(usize::MAX)];
                (r, Mutex::new(bytes))
            })
            .collect();
        FakeBacking {
            inner: Arc::new(Inner {
                address: record.address,
                bars,
                regions,
                config: Mutex::new(config),
                gone: AtomicBool::new(false),
                revocable: true,
                revoked: AtomicBool::new(false),
                next_iova: AtomicU64::new(0x1000_0000),
                interrupts: AtomicU32::new(0),
            }),
        }
    }

    /// Makes the device disappear: registers read all-ones and writes are dropped.
    pub fn set_gone(&self) {
        self.inner.gone.store(true, Ordering::Release);
    }

    /// How many MSI-X vectors are routed now.
    pub fn routed_interrupts(&self) -> u32 {
        self.inner.interrupts.load(Ordering::Acquire)
    }

    /// Whether the device was revoked ([`DeviceBacking::revoke`]).
    pub fn is_revoked(&self) -> bool {
        self.inner.revoked.load(Ordering::Acquire)
    }

    fn live(&self) -> Result<(), BackingError> {
        if self.is_revoked() {
            return Err(BackingError::Gone(self.inner.address));
        }
        Ok(())
    }
}

/// A mapped fake BAR, or a window of one ([`DeviceBacking::map_bar_range`]). Accesses of
/// every width are atomic on the BAR's RAM; an I/O-port BAR refuses 8-byte accesses with
/// [`BackingError::Unsupported`], as VFIO's does.
#[derive(Debug, Clone)]
pub struct FakeRegisters {
    device: FakeBacking,
    index: u32,
    window: Window,
}

impl FakeRegisters {
    fn bar(&self) -> &FakeBar {
        &self.device.inner.bars[self.index as usize]
    }

    // The cell and the bit shift of an access of `width` bytes at window offset `offset`.
    fn place(&self, offset: u64, width: usize) -> Result<(&AtomicU32, u32), BackingError> {
        let address = self.device.inner.address;
        if width == 8 && self.bar().info.kind == BarKind::Io {
            return Err(BackingError::Unsupported {
                address,
                operation: "an 8-byte access to an I/O-port BAR",
            });
        }
        let at = self
            .window
            .at(offset, width)
            .ok_or_else(|| BackingError::OutOfRange {
                address,
                what: format!("BAR {}", self.index),
                offset,
                len: width,
            })?;
        let cell = &self.bar().cells[(at / 4) as usize];
        Ok((cell, (at % 4) as u32 * 8))
    }

    fn gone(&self) -> bool {
        self.device.inner.gone.load(Ordering::Acquire)
    }

    fn read_lanes(&self, offset: u64, width: usize) -> Result<u32, BackingError> {
        let (cell, shift) = self.place(offset, width)?;
        let mask = u32::MAX >> (32 - 8 * width as u32);
        Ok(if self.gone() {
            mask
        } else {
            (cell.load(Ordering::Acquire) >> shift) & mask
        })
    }

    fn write_lanes(&self, offset: u64, width: usize, value: u32) -> Result<(), BackingError> {
        let (cell, shift) = self.place(offset, width)?;
        if !self.gone() {
            let mask = (u32::MAX >> (32 - 8 * width as u32)) << shift;
            // The other bytes of the cell stay as they are, even under concurrent writes.
            let _ = cell.fetch_update(Ordering::AcqRel, Ordering::Acquire, |old| {
                Some(old & !mask | (value << shift) & mask)
            });
        }
        Ok(())
    }
}

impl RegisterIo for FakeRegisters {
    fn len(&self) -> u64 {
        self.window.len
    }
    fn read32(&self, offset: u64) -> Result<u32, BackingError> {
        self.read_lanes(offset, 4)
    }
    fn write32(&self, offset: u64, value: u32) -> Result<(), BackingError> {
        self.write_lanes(offset, 4, value)
    }
    fn read64(&self, offset: u64) -> Result<u64, BackingError> {
        let (low, _) = self.place(offset, 8)?;
        let (high, _) = self.place(offset + 4, 4)?;
        if self.gone() {
            return Ok(u64::MAX);
        }
        Ok(u64::from(low.load(Ordering::Acquire)) | u64::from(high.load(Ordering::Acquire)) << 32)
    }
    fn write64(&self, offset: u64, value: u64) -> Result<(), BackingError> {
        let (low, _) = self.place(offset, 8)?;
        let (high, _) = self.place(offset + 4, 4)?;
        if !self.gone() {
            low.store(value as u32, Ordering::Release);
            high.store((value >> 32) as u32, Ordering::Release);
        }
        Ok(())
    }
    fn read8(&self, offset: u64) -> Result<u8, BackingError> {
        Ok(self.read_lanes(offset, 1)? as u8)
    }
    fn write8(&self, offset: u64, value: u8) -> Result<(), BackingError> {
        self.write_lanes(offset, 1, value.into())
    }
    fn read16(&self, offset: u64) -> Result<u16, BackingError> {
        Ok(self.read_lanes(offset, 2)? as u16)
    }
    fn write16(&self, offset: u64, value: u16) -> Result<(), BackingError> {
        self.write_lanes(offset, 2, value.into())
    }
}

/// Fake DMA memory: a [`DmaBuffer`] at a made-up IOVA.
#[derive(Debug)]
pub struct FakeDma {
    buffer: DmaBuffer,
    iova: u64,
}

impl Deref for FakeDma {
    type Target = DmaBuffer;
    fn deref(&self) -> &DmaBuffer {
        &self.buffer
    }
}

impl DmaMemory for FakeDma {
    fn iova(&self) -> u64 {
        self.iova
    }
}

impl DeviceBacking for FakeBacking {
    type Registers = FakeRegisters;
    type Dma = FakeDma;

    fn address(&self) -> PciAddress {
        self.inner.address
    }
    fn map_bar(&self, index: u32) -> Result<FakeRegisters, BackingError> {
        let size = self.existing_bar(index)?.size;
        self.map_bar_range(index, 0, size)
    }
    fn alloc_dma(&self, len: usize) -> Result<FakeDma, BackingError> {
        self.live()?;
        let size = len.max(1).div_ceil(PAGE) * PAGE;
        let buffer = DmaBuffer::new(size).map_err(|e| BackingError::Other {
            address: self.inner.address,
            message: format!("allocating {size} bytes of DMA memory: {e}"),
        })?;
        let iova = self.inner.next_iova.fetch_add(size as u64, Ordering::Relaxed);
        Ok(FakeDma { buffer, iova })
    }
    fn read_config(&self, offset: u64, buf: &mut [u8]) -> Result<(), BackingError> {
        self.live()?;
        let config = self.inner.config.lock();
        let range = config_range(self.inner.address, offset, buf.len())?;
        buf.copy_from_slice(&config[range]);
        Ok(())
    }
    fn write_config(&self, offset: u64, buf: &[u8]) -> Result<(), BackingError> {
        self.live()?;
        let mut config = self.inner.config.lock();
        let range = config_range(self.inner.address, offset, buf.len())?;
        config[range].copy_from_slice(buf);
        Ok(())
    }
    fn max_interrupts(&self) -> u32 {
        16
    }
    fn route_interrupts(&self, fds: &[BorrowedFd<'_>]) -> Result<(), BackingError> {
        self.live()?;
        if fds.len() > 16 {
            return Err(BackingError::Other {
                address: self.inner.address,
                message: format!("{} vectors asked, 16 exist", fds.len()),
            });
        }
        self.inner.interrupts.store(fds.len() as u32, Ordering::Release);
        Ok(())
    }
    fn reset(&self) -> Result<(), BackingError> {
        self.live()
    }
    fn extra_handles(&self) -> usize {
        Arc::strong_count(&self.inner).saturating_sub(1)
    }
    fn revoke(&self) -> Result<(), BackingError> {
        if !self.inner.revocable {
            return Err(BackingError::Unsupported {
                address: self.inner.address,
                operation: "revoke",
            });
        }
        self.inner.revoked.store(true, Ordering::Release);
        self.inner.interrupts.store(0, Ordering::Release);
        self.set_gone();
        Ok(())
    }
    fn bar_info(&self, index: u32) -> Result<BarInfo, BackingError> {
        self.live()?;
        match self.inner.bars.get(index as usize) {
            Some(bar) => Ok(bar.info.clone()),
            None => Err(self.no_bar(index)),
        }
    }
    fn map_bar_range(&self, index: u32, offset: u64, len: u64) -> Result<FakeRegisters, BackingError> {
        let size = self.existing_bar(index)?.size;
        let window = Window::new(size, offset, len).ok_or_else(|| BackingError::OutOfRange {
            address: self.inner.address,
            what: format!("BAR {index}"),
            offset,
            len: usize::try_from(len).unwrap_or(usize::MAX),
        })?;
        Ok(FakeRegisters {
            device: self.clone(),
            index,
            window,
        })
    }
    fn regions(&self) -> Vec<DeviceRegion> {
        self.inner.regions.iter().map(|(r, _)| r.clone()).collect()
    }
    fn read_region(&self, index: u32, offset: u64, buf: &mut [u8]) -> Result<(), BackingError> {
        self.live()?;
        let (region, bytes) = self.region(index, offset, buf.len())?;
        if !region.readable {
            return Err(BackingError::Unsupported {
                address: self.inner.address,
                operation: "reading a write-only region",
            });
        }
        let start = offset as usize;
        buf.copy_from_slice(&bytes.lock()[start..start + buf.len()]);
        Ok(())
    }
    fn write_region(&self, index: u32, offset: u64, buf: &[u8]) -> Result<(), BackingError> {
        self.live()?;
        let (region, bytes) = self.region(index, offset, buf.len())?;
        if !region.writable {
            return Err(BackingError::Unsupported {
                address: self.inner.address,
                operation: "writing a read-only region",
            });
        }
        let start = offset as usize;
        bytes.lock()[start..start + buf.len()].copy_from_slice(buf);
        Ok(())
    }
}

impl FakeBacking {
    fn no_bar(&self, index: u32) -> BackingError {
        BackingError::OutOfRange {
            address: self.inner.address,
            what: format!("BAR {index}"),
            offset: 0,
            len: 0,
        }
    }

    // A BAR that exists, of a live device.
    fn existing_bar(&self, index: u32) -> Result<&BarInfo, BackingError> {
        self.live()?;
        match self.inner.bars.get(index as usize) {
            Some(bar) if bar.info.exists() => Ok(&bar.info),
            _ => Err(self.no_bar(index)),
        }
    }

    // Region `index` if `len` bytes at `offset` are inside it.
    fn region(
        &self,
        index: u32,
        offset: u64,
        len: usize,
    ) -> Result<(&DeviceRegion, &Mutex<Vec<u8>>), BackingError> {
        self.inner
            .regions
            .iter()
            .find(|(r, _)| r.index == index)
            .filter(|(r, _)| offset.checked_add(len as u64).is_some_and(|end| end <= r.size))
            .map(|(r, bytes)| (r, bytes))
            .ok_or_else(|| BackingError::OutOfRange {
                address: self.inner.address,
                what: format!("region {index}"),
                offset,
                len,
            })
    }
}

fn config_range(
    address: PciAddress,
    offset: u64,
    len: usize,
) -> Result<std::ops::Range<usize>, BackingError> {
    let start = usize::try_from(offset).unwrap_or(usize::MAX);
    match start.checked_add(len) {
        Some(end) if end <= 4096 => Ok(start..end),
        _ => Err(BackingError::OutOfRange {
            address,
            what: "config".into(),
            offset,
            len,
        }),
    }
}

/// One call [`FakeAttach`] received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttachCall {
    /// `attach` of this device.
    Attach(PciAddress),
    /// `detach` of this device, with this release, and how many other handles of the
    /// device were alive at that moment.
    Detach(PciAddress, Release, usize),
}

#[derive(Debug, Default)]
struct AttachState {
    calls: Vec<AttachCall>,
    requests: BTreeMap<PciAddress, OwnedFd>,
    // Weak: the attach's own record must not count as a handle the driver kept.
    devices: BTreeMap<PciAddress, Weak<Inner>>,
    refuse: BTreeMap<PciAddress, String>,
    irrevocable: bool,
}

/// An [`Attach`] of [`FakeBacking`]s. Clones share their state, so a test keeps one to
/// fire requests and read the log while the bus owns another.
#[derive(Debug, Clone, Default)]
pub struct FakeAttach {
    state: Arc<Mutex<AttachState>>,
}

impl FakeAttach {
    /// No device attached yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// The calls received so far.
    pub fn calls(&self) -> Vec<AttachCall> {
        self.state.lock().calls.clone()
    }

    /// Makes `attach` of `address` fail with `message`.
    pub fn refuse(&self, address: PciAddress, message: &str) {
        self.state.lock().refuse.insert(address, message.to_owned());
    }

    /// Makes the devices attached from now on irrevocable: their
    /// [`revoke`](DeviceBacking::revoke) fails with [`BackingError::Unsupported`], as the
    /// default of a backing that cannot close its device under live handles.
    pub fn irrevocable(&self) {
        self.state.lock().irrevocable = true;
    }

    /// Fires the request eventfd of an attached device, as VFIO's REQ does. False if
    /// the device is not attached.
    pub fn request_removal(&self, address: PciAddress) -> bool {
        let state = self.state.lock();
        let Some(fd) = state.requests.get(&address) else {
            return false;
        };
        nix::unistd::write(fd, &1u64.to_ne_bytes()).is_ok()
    }

    /// A handle of an attached device (drop it before the bus takes the device back, or
    /// it counts as kept).
    pub fn device(&self, address: PciAddress) -> Option<FakeBacking> {
        let inner = self.state.lock().devices.get(&address)?.upgrade()?;
        Some(FakeBacking { inner })
    }
}

impl Attach for FakeAttach {
    type Backing = FakeBacking;

    fn attach(&mut self, record: &DeviceRecord) -> Result<Attached<FakeBacking>, AttachError> {
        let mut state = self.state.lock();
        let address = record.address;
        state.calls.push(AttachCall::Attach(address));
        if let Some(message) = state.refuse.get(&address) {
            return Err(AttachError::Other {
                address,
                message: message.clone(),
            });
        }
        let efd = EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK).map_err(
            |e| AttachError::Other {
                address,
                message: format!("eventfd: {e}"),
            },
        )?;
        let efd = OwnedFd::from(efd);
        let ours = efd.as_fd().try_clone_to_owned().map_err(|e| AttachError::Other {
            address,
            message: format!("dup: {e}"),
        })?;
        state.requests.insert(address, ours);
        let mut backing = FakeBacking::new(record);
        if state.irrevocable
            && let Some(inner) = Arc::get_mut(&mut backing.inner)
        {
            inner.revocable = false;
        }
        state.devices.insert(address, Arc::downgrade(&backing.inner));
        Ok(Attached {
            backing,
            request: Some(efd),
            binding: None,
        })
    }

    fn detach(&mut self, attached: Attached<FakeBacking>, release: Release) -> Result<(), AttachError> {
        let mut state = self.state.lock();
        let address = attached.backing.address();
        state.devices.remove(&address);
        state.requests.remove(&address);
        let others = attached.backing.extra_handles();
        state.calls.push(AttachCall::Detach(address, release, others));
        Ok(())
    }
}
