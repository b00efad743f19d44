//! A device in memory behind [`DeviceBacking`], and an [`Attach`] that hands such devices to
//! a [`Bus`](crate::bus::Bus): for tests of drivers and of the bus without hardware.
//!
//! [`FakeBacking`] has RAM BARs (reads return what was written, at any width) laid out as
//! a [`FakeLayout`] says (sizes, kinds, an I/O-port BAR, device-specific regions), a
//! config space whose BAR registers say the kinds, DMA memory at made-up IOVAs (honouring
//! [`DmaConstraints`] as VFIO does: under the address limit, aligned, or
//! [`BackingError::NoDmaAddress`]), caller memory mapped and unmapped
//! ([`DeviceBacking::map_dma`]), and a "gone" switch after which every register reads
//! all-ones, as a surprise-removed device does. [`FakeAttach`] opens a
//! [`FakeBacking`] per device, gives each a request eventfd the test can fire
//! ([`FakeAttach::request_removal`]), and logs every attach and detach.
//!
//! Its interrupts model VFIO's ([`crate::bus::interrupt`]): INTx, MSI and MSI-X with
//! vector counts of the test's choosing ([`FakeBacking::set_interrupt_count`]), one kind
//! enabled at a time, the device's interrupts raised by the test
//! ([`FakeBacking::raise`]), INTx automasked after each interrupt until unmasked, a
//! masked vector remembering what was raised and delivering it on unmask, MSI-X that can
//! grow ([`FakeBacking::set_dynamic_msix`]), and the error notification
//! ([`FakeBacking::raise_error`]). Unlike vfio-pci it masks MSI and MSI-X vectors too.
//!
//! A [`FakeBacking`] can be revoked ([`DeviceBacking::revoke`]: every handle then reads
//! all-ones and fails the rest), unless its [`FakeAttach`] was told not to allow it
//! ([`FakeAttach::irrevocable`]), as a backing without `revoke` does.

use std::collections::BTreeMap;
use std::ops::Deref;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};

use nix::sys::eventfd::{EfdFlags, EventFd};
use parking_lot::Mutex;

use crate::addr::PciAddress;
use crate::bus::attach::{Attach, AttachError, Attached, Release};
use crate::bus::backing::{BackingError, DeviceBacking, DmaMemory, MapDmaError, RegisterIo};
use crate::bus::bar::{BAR0, BarInfo, BarKind, DeviceRegion};
use crate::bus::interrupt::{
    Interrupt, InterruptError, InterruptKind, NO_ERR_REASON, NORESIZE_REASON, check_count, new_interrupts,
};
use crate::record::DeviceRecord;
use crate::testing::model::{self, DeviceModel, DmaMap, ModelContext, ModelCounters, ModelHost, ModelThread};
use crate::vfio::bar::Window;
use crate::vfio::reset::{
    HotResetBlocker, HotResetDevice, HotResetInfo, HotResetOwner, ResetInfo, ResetMethod,
};
use crate::vfio::{DmaBuffer, DmaConstraints, IovaAllocator, cpu_page_size};

/// Where [`FakeBacking::with_model`] puts its device: QEMU's first free slot on q35
/// (`0000:00:04.0`).
pub const MODEL_ADDRESS: PciAddress = match PciAddress::new(0, 0, 4, 0) {
    Some(address) => address,
    None => panic!("0000:00:04.0 is a valid address"),
};

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
pub(crate) struct Inner {
    address: PciAddress,
    bars: [FakeBar; 6],
    regions: Vec<(DeviceRegion, Mutex<Vec<u8>>)>,
    // Shared (as are `gone`, `irqs` and `dma_map`) with a device model's context, which
    // must not hold the device itself (it would count as a handle).
    config: Arc<Mutex<Vec<u8>>>,
    gone: Arc<AtomicBool>,
    revocable: bool,
    revoked: AtomicBool,
    // DMA addresses: taken, never given back (an emulation never reuses a freed address
    // under its device), lowest first, under the allocation's limit; an allocation with
    // no limit below 4 GiB from `FAKE_HIGH_IOVA` up (see `FakeDma`).
    iovas: Mutex<IovaAllocator>,
    live_dma: Arc<AtomicUsize>,
    irqs: Arc<Mutex<IrqModel>>,
    resets: AtomicU32,
    // The live DMA allocations by IOVA, for a model's DMA.
    dma_map: Arc<Mutex<DmaMap>>,
    // The device model answering the BARs, if any.
    model: Option<Arc<ModelHost>>,
    reset: Mutex<FakeReset>,
    hot_resets: AtomicU32,
    // Who has the other devices a hot reset would reset (`None`: each is on vfio-pci and
    // not open here).
    hot_reset_blockers: Mutex<Option<Vec<HotResetBlocker>>>,
}

/// How a [`FakeBacking`] can be reset (issue 16 §4): its [`DeviceBacking::reset_info`],
/// whether [`DeviceBacking::reset`] works, and what a hot reset would also reset.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum FakeReset {
    /// No function reset (QEMU's `edu`): `reset` fails with
    /// [`BackingError::Unsupported`]; a hot reset would also reset `also`.
    None {
        /// The other devices on its bus.
        also: Vec<PciAddress>,
    },
    /// Function Level Reset (QEMU's NVMe), the default; no bus reset.
    #[default]
    Flr,
    /// The kernel's `bus` method: the function is alone on its bus, so a secondary bus
    /// reset is its function reset.
    Bus,
}

/// One routed vector of the interrupt model.
#[derive(Debug)]
struct Vector {
    fd: OwnedFd,
    masked: bool,
    pending: bool,
}

impl Vector {
    fn new(fd: OwnedFd) -> Vector {
        Vector {
            fd,
            masked: false,
            pending: false,
        }
    }

    fn signal(&self) {
        // A full counter (2^64 - 2 unread interrupts) is the reader's problem, as with VFIO.
        let _ = nix::unistd::write(&self.fd, &1u64.to_ne_bytes());
    }
}

/// The device's interrupts, as VFIO presents them: one of INTx, MSI, MSI-X enabled at a
/// time, INTx automasked, the error notification beside them.
#[derive(Debug)]
pub(crate) struct IrqModel {
    // By VFIO index: INTx, MSI, MSI-X, ERR.
    counts: [u32; 4],
    dynamic_msix: bool,
    enabled: Option<InterruptKind>,
    vectors: Vec<Vector>,
    error: Option<Vector>,
    // The INTx line as a device model drives it (`ModelContext::set_intx`): while it is
    // asserted, an unmask fires INTx again, as a level-triggered line does under VFIO.
    intx_level: bool,
}

impl Default for IrqModel {
    fn default() -> Self {
        IrqModel {
            counts: [1, 1, 16, 1],
            dynamic_msix: true,
            enabled: None,
            vectors: Vec::new(),
            error: None,
            intx_level: false,
        }
    }
}

impl IrqModel {
    fn count(&self, kind: InterruptKind) -> u32 {
        self.counts[kind.vfio_index() as usize]
    }

    fn vector(
        &mut self,
        address: PciAddress,
        kind: InterruptKind,
        vector: u32,
    ) -> Result<&mut Vector, InterruptError> {
        let not_enabled = InterruptError::NotEnabled {
            address,
            kind,
            vector,
        };
        if self.enabled != Some(kind) {
            return Err(not_enabled);
        }
        self.vectors.get_mut(vector as usize).ok_or(not_enabled)
    }

    fn disable(&mut self) {
        self.enabled = None;
        self.vectors.clear();
    }

    pub(crate) fn enabled(&self) -> Option<(InterruptKind, u32)> {
        self.enabled.map(|kind| (kind, self.vectors.len() as u32))
    }

    /// Raises `vector` of `kind`: see [`FakeBacking::raise`].
    pub(crate) fn raise(&mut self, address: PciAddress, kind: InterruptKind, vector: u32) -> bool {
        let Ok(v) = self.vector(address, kind, vector) else {
            return false;
        };
        if v.masked {
            v.pending = true;
            return false;
        }
        v.signal();
        v.masked = kind.is_automasked();
        true
    }

    /// Sets the INTx line's level: asserting it raises INTx (if enabled), deasserting it
    /// cancels an INTx waiting behind the mask.
    pub(crate) fn set_intx(&mut self, asserted: bool) {
        let was = std::mem::replace(&mut self.intx_level, asserted);
        if self.enabled != Some(InterruptKind::Intx) {
            return;
        }
        if asserted && !was {
            let Some(v) = self.vectors.first_mut() else {
                return;
            };
            if v.masked {
                v.pending = true;
            } else {
                v.signal();
                v.masked = true;
            }
        } else if !asserted && let Some(v) = self.vectors.first_mut() {
            v.pending = false;
        }
    }

    pub(crate) fn intx_level(&self) -> bool {
        self.intx_level
    }
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
        let vendor = record.vendor.map_or(0xffff, |v| v.0);
        let device = record.device.map_or(0xffff, |d| d.0);
        config[0..2].copy_from_slice(&vendor.to_le_bytes());
        config[2..4].copy_from_slice(&device.to_le_bytes());
        if let Some(class) = record.class {
            config[9..12].copy_from_slice(&class.value().to_le_bytes()[..3]);
        }
        Self::assemble(record.address, layout, config, None)
    }

    /// A device answered by `model` ([`DeviceModel`]; see [`crate::testing::model`]) at
    /// [`MODEL_ADDRESS`]: its BARs, config space and interrupt counts are the model's,
    /// every register access reaches it, and its DMA reaches this backing's allocations.
    /// Nothing steps the model yet: call [`step_model`](Self::step_model) or start
    /// [`spawn_model_thread`](Self::spawn_model_thread).
    ///
    /// Bus Master Enable is off, as after vfio-pci's open: the bus turns it on when it
    /// opens a device; a test that drives the backing without a bus calls
    /// [`set_bus_master`](DeviceBacking::set_bus_master) as the bus would.
    pub fn with_model(model: impl DeviceModel) -> Self {
        Self::with_boxed_model(MODEL_ADDRESS, Box::new(model))
    }

    /// [`with_model`](Self::with_model) at `address`.
    pub fn with_model_at(address: PciAddress, model: impl DeviceModel) -> Self {
        Self::with_boxed_model(address, Box::new(model))
    }

    /// [`with_model`](Self::with_model) at `address`, of a boxed model (as a factory of
    /// [`FakeAttach::with_models`] makes them).
    pub fn with_boxed_model(address: PciAddress, model: Box<dyn DeviceModel>) -> Self {
        let layout = model.layout();
        let config = model.config().into_bytes();
        Self::assemble(address, layout, config, Some(model))
    }

    // The device of `layout` with `config` (the BAR registers filled in from the layout,
    // Memory Space Enable set), answered by `model` if there is one.
    fn assemble(
        address: PciAddress,
        layout: FakeLayout,
        mut config: Vec<u8>,
        model: Option<Box<dyn DeviceModel>>,
    ) -> Self {
        config.resize(4096, 0);
        // Memory Space Enable, as vfio-pci's open of a device with memory BARs sets it.
        config[4] |= 0x02;
        for bar in &layout.bars {
            let at = (BAR0 + 4 * u64::from(bar.index)) as usize;
            config[at..at + 4].copy_from_slice(&bar.register_bits().to_le_bytes());
        }
        let mut irqs = IrqModel::default();
        if model.is_some() {
            irqs.counts = model::interrupt_counts(&config);
        }
        let FakeLayout { bars, regions } = layout;
        // A model's BARs are the model's: no RAM behind them.
        let ram = model.is_none();
        let bars = bars.map(|info| FakeBar {
            cells: if ram {
                (0..info.size.div_ceil(4)).map(|_| AtomicU32::new(0)).collect()
            } else {
                Arc::new([])
            },
            info,
        });
        let regions = regions
            .into_iter()
            .map(|r| {
                let bytes = vec![0u8; usize::try_from(r.size).unwrap_or(usize::MAX)];
                (r, Mutex::new(bytes))
            })
            .collect();
        let config = Arc::new(Mutex::new(config));
        let gone = Arc::new(AtomicBool::new(false));
        let irqs = Arc::new(Mutex::new(irqs));
        let dma_map = Arc::new(Mutex::new(DmaMap::default()));
        let model = model.map(|model| {
            let ctx = ModelContext {
                address,
                config: Arc::clone(&config),
                irqs: Arc::clone(&irqs),
                dma: Arc::clone(&dma_map),
                gone: Arc::clone(&gone),
                counters: Arc::new(ModelCounters::default()),
            };
            Arc::new(ModelHost::new(model, ctx))
        });
        FakeBacking {
            inner: Arc::new(Inner {
                address,
                bars,
                regions,
                config,
                gone,
                revocable: true,
                revoked: AtomicBool::new(false),
                iovas: Mutex::new(IovaAllocator::new(&[0..=FAKE_MAX_IOVA])),
                live_dma: Arc::new(AtomicUsize::new(0)),
                irqs,
                resets: AtomicU32::new(0),
                reset: Mutex::new(FakeReset::default()),
                hot_resets: AtomicU32::new(0),
                hot_reset_blockers: Mutex::new(None),
                dma_map,
                model,
            }),
        }
    }

    /// The model's host, if the device has a model.
    pub(crate) fn model_host(&self) -> Option<&Arc<ModelHost>> {
        self.inner.model.as_ref()
    }

    /// Makes the device disappear: registers read all-ones and writes are dropped.
    pub fn set_gone(&self) {
        self.inner.gone.store(true, Ordering::Release);
        // An access in flight in the model finishes before this returns; none starts after.
        if let Some(host) = &self.inner.model {
            host.quiesce();
        }
    }

    /// How many MSI-X vectors are routed now.
    pub fn routed_interrupts(&self) -> u32 {
        match self.enabled_interrupts() {
            Some((InterruptKind::MsiX, n)) => n,
            _ => 0,
        }
    }

    /// How many times the device was reset ([`DeviceBacking::reset`]).
    pub fn resets(&self) -> u32 {
        self.inner.resets.load(Ordering::Relaxed)
    }

    /// Sets how the device can be reset (default [`FakeReset::Flr`]).
    pub fn set_reset(&self, reset: FakeReset) {
        *self.inner.reset.lock() = reset;
    }

    /// Who has the other devices a hot reset of this one would reset
    /// ([`FakeReset::None`]'s `also`), as [`HotResetInfo::not_held`] says it: `None` (the
    /// default) for each of them on vfio-pci and not open in this process; `Some` for
    /// exactly those blockers (empty: this process holds them all, and a hot reset is
    /// done).
    pub fn set_hot_reset_blockers(&self, blockers: Option<Vec<HotResetBlocker>>) {
        *self.inner.hot_reset_blockers.lock() = blockers;
    }

    /// How many hot resets ([`DeviceBacking::hot_reset`]) the device saw.
    pub fn hot_resets(&self) -> u32 {
        self.inner.hot_resets.load(Ordering::Relaxed)
    }

    /// How many DMA allocations and mappings of the device are alive (not yet dropped or
    /// unmapped), for leak checks.
    pub fn live_dma(&self) -> usize {
        self.inner.live_dma.load(Ordering::Acquire)
    }

    /// Whether the device was revoked ([`DeviceBacking::revoke`]).
    pub fn is_revoked(&self) -> bool {
        self.inner.revoked.load(Ordering::Acquire)
    }

    /// Sets how many vectors of `kind` the device has (defaults: INTx 1, MSI 1, MSI-X 16,
    /// ERR 1; 0: the device has none of that kind).
    pub fn set_interrupt_count(&self, kind: InterruptKind, count: u32) {
        self.inner.irqs.lock().counts[kind.vfio_index() as usize] = count;
    }

    /// Whether enabled MSI-X can grow ([`DeviceBacking::add_interrupts`]), as on Linux
    /// 6.5 and later (the default); false models older kernels.
    pub fn set_dynamic_msix(&self, dynamic: bool) {
        self.inner.irqs.lock().dynamic_msix = dynamic;
    }

    /// The kind enabled now (INTx, MSI or MSI-X) and how many vectors of it.
    pub fn enabled_interrupts(&self) -> Option<(InterruptKind, u32)> {
        self.inner.irqs.lock().enabled()
    }

    /// The device raises `vector` of `kind`. Signals the vector's eventfd and returns
    /// true if the kind is enabled and the vector unmasked; a masked vector remembers it
    /// and fires when unmasked (false); so does an INTx still automasked from its last
    /// interrupt. After signalling an INTx, masks it, as VFIO does. False too when
    /// the vector is not enabled.
    pub fn raise(&self, kind: InterruptKind, vector: u32) -> bool {
        self.inner.irqs.lock().raise(self.inner.address, kind, vector)
    }

    /// Sets the level of the device's INTx line, as a device model does
    /// ([`ModelContext::set_intx`]): asserted, it fires INTx if it is enabled and unmasked
    /// (VFIO then masks it), and fires again on each unmask while still asserted.
    pub fn set_intx(&self, asserted: bool) {
        self.inner.irqs.lock().set_intx(asserted);
    }

    /// The device reports an error: signals the eventfd of
    /// [`error_interrupt`](DeviceBacking::error_interrupt), if one is routed (true).
    pub fn raise_error(&self) -> bool {
        match &self.inner.irqs.lock().error {
            Some(v) => {
                v.signal();
                true
            }
            None => false,
        }
    }

    /// Routes `kind` (INTx, MSI or MSI-X) to these eventfds, as VFIO's SET_IRQS does.
    fn route(&self, kind: InterruptKind, fds: Vec<OwnedFd>) -> Result<(), BackingError> {
        self.live()?;
        let address = self.inner.address;
        let mut irqs = self.inner.irqs.lock();
        check_count(address, kind, fds.len() as u32, irqs.count(kind))?;
        if let Some(enabled) = irqs.enabled
            && enabled != kind
        {
            return Err(InterruptError::OtherKindEnabled {
                address,
                enabled,
                wanted: kind,
            }
            .into());
        }
        irqs.enabled = Some(kind);
        irqs.vectors = fds.into_iter().map(Vector::new).collect();
        if kind == InterruptKind::Intx
            && irqs.intx_level
            && let Some(v) = irqs.vectors.first_mut()
        {
            // A line asserted before INTx was enabled fires at once.
            v.signal();
            v.masked = true;
        }
        drop(irqs);
        model::set_msi_enable(&mut self.inner.config.lock(), kind, true);
        Ok(())
    }

    /// New interrupts `start..start + count` of `kind`, with the model's copies of their
    /// eventfds; an INTx unmasks through a weak reference (it is no handle of the device).
    fn new_interrupts(
        &self,
        kind: InterruptKind,
        start: u32,
        count: u32,
    ) -> Result<(Vec<Interrupt>, Vec<OwnedFd>), BackingError> {
        let address = self.inner.address;
        let mut interrupts = new_interrupts(address, kind, start, count)?;
        let fds = interrupts
            .iter()
            .map(|i| i.as_fd().try_clone_to_owned())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| InterruptError::Eventfd {
                address,
                kind,
                source,
            })?;
        if kind.is_automasked() {
            interrupts = interrupts
                .into_iter()
                .map(|i| {
                    let vector = i.vector();
                    let device = Arc::downgrade(&self.inner);
                    i.with_unmask(move || match device.upgrade() {
                        Some(inner) => FakeBacking { inner }.unmask_interrupt(kind, vector),
                        None => Err(BackingError::Gone(address)),
                    })
                })
                .collect();
        }
        Ok((interrupts, fds))
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

    // The BAR offset of an access of `width` bytes at window offset `offset`.
    fn at(&self, offset: u64, width: usize) -> Result<u64, BackingError> {
        let address = self.device.inner.address;
        if width == 8 && self.bar().info.kind == BarKind::Io {
            return Err(BackingError::Unsupported {
                address,
                operation: "an 8-byte access to an I/O-port BAR",
            });
        }
        self.window
            .at(offset, width)
            .ok_or_else(|| BackingError::OutOfRange {
                address,
                what: format!("BAR {}", self.index),
                offset,
                len: width,
            })
    }

    // The RAM cell and the bit shift of BAR offset `at`.
    fn cell(&self, at: u64) -> (&AtomicU32, u32) {
        (&self.bar().cells[(at / 4) as usize], (at % 4) as u32 * 8)
    }

    fn gone(&self) -> bool {
        self.device.inner.gone.load(Ordering::Acquire)
    }

    // A read of `width` bytes (1, 2, 4, 8): all-ones when gone, else the model's answer,
    // else the RAM's.
    fn read_width(&self, offset: u64, width: usize) -> Result<u64, BackingError> {
        let at = self.at(offset, width)?;
        let mask = u64::MAX >> (64 - 8 * width as u32);
        if self.gone() {
            return Ok(mask);
        }
        if let Some(host) = &self.device.inner.model {
            return Ok(host.read(self.index, at, width) & mask);
        }
        if width == 8 {
            let (low, _) = self.cell(at);
            let (high, _) = self.cell(at + 4);
            return Ok(u64::from(low.load(Ordering::Acquire)) | u64::from(high.load(Ordering::Acquire)) << 32);
        }
        let (cell, shift) = self.cell(at);
        Ok(u64::from(cell.load(Ordering::Acquire) >> shift) & mask)
    }

    fn write_width(&self, offset: u64, width: usize, value: u64) -> Result<(), BackingError> {
        let at = self.at(offset, width)?;
        let mask = u64::MAX >> (64 - 8 * width as u32);
        if self.gone() {
            return Ok(());
        }
        if let Some(host) = &self.device.inner.model {
            host.write(self.index, at, width, value & mask);
            return Ok(());
        }
        if width == 8 {
            let (low, _) = self.cell(at);
            let (high, _) = self.cell(at + 4);
            low.store(value as u32, Ordering::Release);
            high.store((value >> 32) as u32, Ordering::Release);
            return Ok(());
        }
        let (cell, shift) = self.cell(at);
        let lanes = (mask as u32) << shift;
        let value = value as u32;
        // The other bytes of the cell stay as they are, even under concurrent writes.
        let _ = cell.fetch_update(Ordering::AcqRel, Ordering::Acquire, |old| {
            Some(old & !lanes | (value << shift) & lanes)
        });
        Ok(())
    }
}

impl RegisterIo for FakeRegisters {
    fn len(&self) -> u64 {
        self.window.len
    }
    fn read32(&self, offset: u64) -> Result<u32, BackingError> {
        Ok(self.read_width(offset, 4)? as u32)
    }
    fn write32(&self, offset: u64, value: u32) -> Result<(), BackingError> {
        self.write_width(offset, 4, value.into())
    }
    fn read64(&self, offset: u64) -> Result<u64, BackingError> {
        self.read_width(offset, 8)
    }
    fn write64(&self, offset: u64, value: u64) -> Result<(), BackingError> {
        self.write_width(offset, 8, value)
    }
    fn read8(&self, offset: u64) -> Result<u8, BackingError> {
        Ok(self.read_width(offset, 1)? as u8)
    }
    fn write8(&self, offset: u64, value: u8) -> Result<(), BackingError> {
        self.write_width(offset, 1, value.into())
    }
    fn read16(&self, offset: u64) -> Result<u16, BackingError> {
        Ok(self.read_width(offset, 2)? as u16)
    }
    fn write16(&self, offset: u64, value: u16) -> Result<(), BackingError> {
        self.write_width(offset, 2, value.into())
    }
}

/// The highest IOVA a [`FakeBacking`] hands out: 39 bits, as QEMU's intel-iommu.
pub const FAKE_MAX_IOVA: u64 = (1 << 39) - 1;

/// Where a [`FakeBacking`] places DMA memory whose constraints set no address limit below
/// 4 GiB: above 32 bits, so that a driver that forgot its device's limit (28 bits for
/// edu, 32 for many devices) sees its device miss the memory in tests, where VFIO's
/// lowest-first placement would hide it until the IOVA space filled up.
pub const FAKE_HIGH_IOVA: u64 = 1 << 32;

/// Fake DMA memory: a [`DmaBuffer`] at a made-up IOVA: the lowest free one that meets the
/// allocation's [`DmaConstraints`] (as VFIO chooses), except that memory with no address
/// limit below 4 GiB goes above [`FAKE_HIGH_IOVA`] (stricter than VFIO, on purpose).
#[derive(Debug)]
pub struct FakeDma {
    // Shared with the backing's map of live allocations (weakly), for a model's DMA.
    buffer: Arc<DmaBuffer>,
    iova: u64,
    device_read_only: bool,
    _live: LiveDma,
}

impl FakeDma {
    /// Whether it was allocated or mapped for the device to read only
    /// ([`DmaConstraints::device_read_only`]): a device model should not write it.
    pub fn is_device_read_only(&self) -> bool {
        self.device_read_only
    }
}

// One live DMA allocation of a device, counted for [`FakeBacking::live_dma`] and in the
// device's map of live allocations (which a model's DMA reaches) until dropped.
#[derive(Debug)]
struct LiveDma {
    count: Arc<AtomicUsize>,
    map: Arc<Mutex<DmaMap>>,
    iova: u64,
}

impl LiveDma {
    fn new(inner: &Inner, iova: u64, buffer: &Arc<DmaBuffer>, read_only: bool) -> LiveDma {
        inner.live_dma.fetch_add(1, Ordering::AcqRel);
        inner.dma_map.lock().insert(iova, buffer, read_only);
        LiveDma {
            count: Arc::clone(&inner.live_dma),
            map: Arc::clone(&inner.dma_map),
            iova,
        }
    }
}

impl Drop for LiveDma {
    fn drop(&mut self) {
        self.map.lock().remove(self.iova);
        self.count.fetch_sub(1, Ordering::AcqRel);
    }
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
        self.alloc_dma_with(len, &DmaConstraints::new())
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
        self.interrupt_count(InterruptKind::MsiX)
    }
    fn route_interrupts(&self, fds: &[BorrowedFd<'_>]) -> Result<(), BackingError> {
        if fds.is_empty() {
            return self.disable_interrupts(InterruptKind::MsiX);
        }
        let address = self.inner.address;
        let owned = fds
            .iter()
            .map(|fd| fd.try_clone_to_owned())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| BackingError::Other {
                address,
                message: format!("dup of an eventfd: {e}"),
            })?;
        self.route(InterruptKind::MsiX, owned)
    }
    fn interrupt_count(&self, kind: InterruptKind) -> u32 {
        self.inner.irqs.lock().count(kind)
    }
    fn interrupt_maskable(&self, kind: InterruptKind) -> bool {
        kind.is_delivery()
    }
    fn enable_interrupts(&self, kind: InterruptKind, count: u32) -> Result<Vec<Interrupt>, BackingError> {
        self.live()?;
        if kind == InterruptKind::Error {
            check_count(self.inner.address, kind, count, self.interrupt_count(kind))?;
            return Ok(vec![self.error_interrupt()?]);
        }
        // Checked before anything is created; `route` checks again under the lock.
        check_count(self.inner.address, kind, count, self.interrupt_count(kind))?;
        let (interrupts, fds) = self.new_interrupts(kind, 0, count)?;
        self.route(kind, fds)?;
        Ok(interrupts)
    }
    fn add_interrupts(&self, kind: InterruptKind, count: u32) -> Result<Vec<Interrupt>, BackingError> {
        self.live()?;
        let address = self.inner.address;
        let unsupported = |reason| InterruptError::Unsupported {
            address,
            kind,
            operation: "growth",
            reason,
        };
        let start = {
            let irqs = self.inner.irqs.lock();
            if irqs.enabled != Some(kind) {
                return Err(InterruptError::NotEnabled {
                    address,
                    kind,
                    vector: 0,
                }
                .into());
            }
            match kind {
                InterruptKind::MsiX if !irqs.dynamic_msix => {
                    return Err(unsupported(NORESIZE_REASON).into());
                }
                InterruptKind::MsiX => {}
                _ => return Err(unsupported("only MSI-X can grow while enabled").into()),
            }
            let start = irqs.vectors.len() as u32;
            if count == 0 {
                return Err(InterruptError::NoneAsked { address, kind }.into());
            }
            check_count(address, kind, start.saturating_add(count), irqs.count(kind))?;
            start
        };
        let (interrupts, fds) = self.new_interrupts(kind, start, count)?;
        let mut irqs = self.inner.irqs.lock();
        if irqs.enabled != Some(kind) || irqs.vectors.len() as u32 != start {
            return Err(BackingError::Other {
                address,
                message: format!("{kind} changed while vectors were being added"),
            });
        }
        irqs.vectors.extend(fds.into_iter().map(Vector::new));
        Ok(interrupts)
    }
    fn disable_interrupts(&self, kind: InterruptKind) -> Result<(), BackingError> {
        self.live()?;
        let mut irqs = self.inner.irqs.lock();
        if kind == InterruptKind::Error {
            irqs.error = None;
        } else if irqs.enabled == Some(kind) {
            irqs.disable();
            drop(irqs);
            model::set_msi_enable(&mut self.inner.config.lock(), kind, false);
        }
        Ok(())
    }
    fn mask_interrupt(&self, kind: InterruptKind, vector: u32) -> Result<(), BackingError> {
        self.live()?;
        let mut irqs = self.inner.irqs.lock();
        irqs.vector(self.inner.address, kind, vector)?.masked = true;
        Ok(())
    }
    fn unmask_interrupt(&self, kind: InterruptKind, vector: u32) -> Result<(), BackingError> {
        self.live()?;
        let mut irqs = self.inner.irqs.lock();
        let level = kind == InterruptKind::Intx && irqs.intx_level;
        let v = irqs.vector(self.inner.address, kind, vector)?;
        if v.pending || level {
            // Delivered now; an INTx masks again as it fires.
            v.pending = false;
            v.signal();
            v.masked = kind.is_automasked();
        } else {
            v.masked = false;
        }
        Ok(())
    }
    fn error_interrupt(&self) -> Result<Interrupt, BackingError> {
        self.live()?;
        let address = self.inner.address;
        let kind = InterruptKind::Error;
        if self.interrupt_count(kind) == 0 {
            return Err(InterruptError::Unsupported {
                address,
                kind,
                operation: "error_interrupt",
                reason: NO_ERR_REASON,
            }
            .into());
        }
        let (mut interrupts, mut fds) = self.new_interrupts(kind, 0, 1)?;
        self.inner.irqs.lock().error = fds.pop().map(Vector::new);
        Ok(interrupts.remove(0))
    }
    fn reset(&self) -> Result<(), BackingError> {
        self.live()?;
        if matches!(*self.inner.reset.lock(), FakeReset::None { .. }) {
            return Err(BackingError::Unsupported {
                address: self.inner.address,
                operation: "reset (the device has no function reset)",
            });
        }
        self.inner.resets.fetch_add(1, Ordering::Relaxed);
        if let Some(host) = &self.inner.model {
            host.reset();
        }
        Ok(())
    }
    fn reset_info(&self) -> Result<ResetInfo, BackingError> {
        self.live()?;
        Ok(match &*self.inner.reset.lock() {
            FakeReset::None { .. } => ResetInfo::new(false, Some(Vec::new())),
            FakeReset::Flr => ResetInfo::new(true, Some(vec![ResetMethod::Flr])),
            FakeReset::Bus => ResetInfo::new(true, Some(vec![ResetMethod::Bus])),
        })
    }
    fn hot_reset_info(&self) -> Result<HotResetInfo, BackingError> {
        self.live()?;
        let address = self.inner.address;
        let also = match &*self.inner.reset.lock() {
            FakeReset::None { also } => also.clone(),
            FakeReset::Bus => Vec::new(),
            FakeReset::Flr => {
                return Err(crate::vfio::VfioError::NoHotReset { address }.into());
            }
        };
        let not_held = match &*self.inner.hot_reset_blockers.lock() {
            Some(blockers) => blockers.clone(),
            None => also
                .iter()
                .map(|&a| HotResetBlocker::new(a, Some("vfio-pci".into()), true))
                .collect(),
        };
        let devices = std::iter::once(address)
            .chain(also)
            .map(|address| HotResetDevice {
                address,
                owner: HotResetOwner::Group(0),
            })
            .collect();
        Ok(HotResetInfo::new(devices, None).with_not_held(not_held))
    }
    fn hot_reset(&self) -> Result<HotResetInfo, BackingError> {
        let info = self.hot_reset_info()?;
        if !info.not_held.is_empty() {
            // The check VFIO's backing makes, said the same way.
            return Err(crate::vfio::VfioError::HotResetNotHeld {
                address: self.inner.address,
                devices: info.not_held.clone(),
                need: crate::vfio::reset::hot_reset_need(false),
            }
            .into());
        }
        self.inner.hot_resets.fetch_add(1, Ordering::Relaxed);
        Ok(info)
    }
    fn extra_handles(&self) -> usize {
        Arc::strong_count(&self.inner).saturating_sub(1)
    }
    fn alloc_dma_with(&self, len: usize, constraints: &DmaConstraints) -> Result<FakeDma, BackingError> {
        self.live()?;
        let size = len.max(1).div_ceil(cpu_page_size()) * cpu_page_size();
        let buffer = match constraints.preferred_node() {
            Some(node) => DmaBuffer::on_node(size, node),
            None => DmaBuffer::new(size),
        }
        .map_err(|e| BackingError::Other {
            address: self.inner.address,
            message: format!("allocating {size} bytes of DMA memory: {e}"),
        })?;
        self.map_dma(buffer, constraints).map_err(|e| e.error)
    }
    fn map_dma(&self, buffer: DmaBuffer, constraints: &DmaConstraints) -> Result<FakeDma, Box<MapDmaError>> {
        if let Err(error) = self.live() {
            return Err(Box::new(MapDmaError { error, buffer }));
        }
        let size = buffer.len() as u64;
        // As VFIO: aligned to the buffer's pages and to what was asked.
        let align = constraints.alignment().max(buffer.page_size() as u64);
        let max_iova = constraints.max_iova().unwrap_or(u64::MAX);
        let iova = {
            let mut iovas = self.inner.iovas.lock();
            // High first when the device can reach it (see FAKE_HIGH_IOVA), else the lowest.
            let high = (max_iova >= FAKE_HIGH_IOVA)
                .then(|| iovas.alloc_within(size, align, FAKE_HIGH_IOVA, max_iova))
                .flatten();
            high.or_else(|| iovas.alloc_below(size, align, max_iova))
        };
        let Some(iova) = iova else {
            let error = if max_iova >= FAKE_MAX_IOVA {
                BackingError::Other {
                    address: self.inner.address,
                    message: format!("no IOVA range of {size} bytes left"),
                }
            } else {
                BackingError::NoDmaAddress {
                    address: self.inner.address,
                    size,
                    align,
                    max_iova,
                }
            };
            return Err(Box::new(MapDmaError { error, buffer }));
        };
        let buffer = Arc::new(buffer);
        let read_only = constraints.is_device_read_only();
        Ok(FakeDma {
            _live: LiveDma::new(&self.inner, iova, &buffer, read_only),
            buffer,
            iova,
            device_read_only: read_only,
        })
    }
    fn unmap_dma(&self, dma: FakeDma) -> Result<DmaBuffer, BackingError> {
        // Out of the map first: a model's DMA no longer finds it, and one in flight
        // finishes with its own reference, which the loop waits out.
        let FakeDma { buffer, _live, .. } = dma;
        drop(_live);
        let mut buffer = buffer;
        loop {
            match Arc::try_unwrap(buffer) {
                Ok(buffer) => return Ok(buffer),
                Err(shared) => {
                    buffer = shared;
                    std::thread::yield_now();
                }
            }
        }
    }
    fn revoke(&self) -> Result<(), BackingError> {
        if !self.inner.revocable {
            return Err(BackingError::Unsupported {
                address: self.inner.address,
                operation: "revoke",
            });
        }
        self.inner.revoked.store(true, Ordering::Release);
        {
            let mut irqs = self.inner.irqs.lock();
            irqs.disable();
            irqs.error = None;
        }
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
    resets: BTreeMap<PciAddress, FakeReset>,
    models: Option<ModelFactory>,
    // The model threads of attached modelled devices, stopped at detach.
    threads: BTreeMap<PciAddress, ModelThread>,
}

/// What [`FakeAttach::with_models`] makes device models with.
type MakeModel = dyn Fn(&DeviceRecord) -> Option<Box<dyn DeviceModel>> + Send + Sync;

#[derive(Clone)]
struct ModelFactory(Arc<MakeModel>);

impl std::fmt::Debug for ModelFactory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ModelFactory")
    }
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

    /// An attach whose devices are answered by models: `factory` is asked at each
    /// attach, with the device's scan record, for a model of it
    /// ([`FakeBacking::with_boxed_model`] at the record's address; the model's config
    /// space, not the record, says its ids); `None` attaches a plain [`FakeBacking`], as
    /// [`new`](Self::new) does. Each modelled device gets a model thread
    /// ([`FakeBacking::spawn_model_thread`]) from attach to detach, so its background work
    /// goes on while a driver waits for it. The same device attached again (a replug, a
    /// re-probe) gets a new model from the factory: a device fresh from its power-on.
    ///
    /// ```
    /// use pcibus::testing::backing::FakeAttach;
    /// use pcibus::testing::model::DeviceModel;
    /// use pcibus::testing::models::EduModel;
    /// let attach = FakeAttach::with_models(|record| {
    ///     (record.vendor.map(|v| v.0) == Some(0x1234))
    ///         .then(|| Box::new(EduModel::new()) as Box<dyn DeviceModel>)
    /// });
    /// ```
    pub fn with_models(
        factory: impl Fn(&DeviceRecord) -> Option<Box<dyn DeviceModel>> + Send + Sync + 'static,
    ) -> Self {
        let attach = Self::default();
        attach.state.lock().models = Some(ModelFactory(Arc::new(factory)));
        attach
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

    /// Makes the device at `address`, when attached from now on, resettable as `reset`
    /// says ([`FakeBacking::set_reset`]).
    pub fn set_reset(&self, address: PciAddress, reset: FakeReset) {
        self.state.lock().resets.insert(address, reset);
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
        let model = state.models.as_ref().and_then(|make| (make.0)(record));
        let modelled = model.is_some();
        let mut backing = match model {
            Some(model) => FakeBacking::with_boxed_model(address, model),
            None => FakeBacking::new(record),
        };
        if state.irrevocable
            && let Some(inner) = Arc::get_mut(&mut backing.inner)
        {
            inner.revocable = false;
        }
        if let Some(reset) = state.resets.get(&address) {
            backing.set_reset(reset.clone());
        }
        state.devices.insert(address, Arc::downgrade(&backing.inner));
        if modelled {
            match backing.spawn_model_thread() {
                Some(Ok(thread)) => {
                    state.threads.insert(address, thread);
                }
                Some(Err(e)) => {
                    return Err(AttachError::Other {
                        address,
                        message: format!("starting the device model's thread: {e}"),
                    });
                }
                None => {}
            }
        }
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
        // Joined here: the thread holds no handle of the device, so it never delays this.
        state.threads.remove(&address);
        let others = attached.backing.extra_handles();
        state.calls.push(AttachCall::Detach(address, release, others));
        Ok(())
    }
}
