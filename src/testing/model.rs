//! Device models: a device of the test's making behind a [`FakeBacking`], so that a driver
//! is tested against a model of its device without writing a backing (issue 16 §5).
//!
//! A [`DeviceModel`] declares its BARs (a [`FakeLayout`]) and its config space (a
//! [`ModelConfig`]: ids, class, interrupt pin, a capability list), and answers register
//! reads and writes of every width with whatever side effects it has (read-to-clear,
//! inverted registers, doorbells). Background work (a DMA engine, a computation, a timer)
//! runs in [`DeviceModel::step`], called by [`FakeBacking::step_model`] or by a model
//! thread ([`FakeBacking::spawn_model_thread`]), never inside a register access.
//!
//! The model acts on the world through a [`ModelContext`], passed into every callback
//! (and cloneable into a thread of the model's own): DMA into the backing's memory by
//! IOVA, raising interrupts through the backing's interrupt model (INTx, MSI, MSI-X, as
//! VFIO presents them), reading config space.
//!
//! ```
//! use pcibus::bus::{BarInfo, DeviceBacking, RegisterIo};
//! use pcibus::testing::backing::{FakeBacking, FakeLayout};
//! use pcibus::testing::model::{DeviceModel, ModelConfig, ModelContext};
//!
//! // A device with one register: reads give back the last value written, plus one.
//! #[derive(Default)]
//! struct Plus1(u32);
//! impl DeviceModel for Plus1 {
//!     fn layout(&self) -> FakeLayout {
//!         FakeLayout::empty().bar(BarInfo::memory32(0, 0x1000))
//!     }
//!     fn config(&self) -> ModelConfig {
//!         ModelConfig::new(0x1234, 0x5678).class(0xff0000)
//!     }
//!     fn read(&mut self, _: &ModelContext, _bar: u32, offset: u64, _size: usize) -> u64 {
//!         if offset == 0 { u64::from(self.0.wrapping_add(1)) } else { u64::MAX }
//!     }
//!     fn write(&mut self, _: &ModelContext, _bar: u32, offset: u64, _size: usize, value: u64) {
//!         if offset == 0 { self.0 = value as u32 }
//!     }
//! }
//!
//! let device = FakeBacking::with_model(Plus1::default());
//! let bar = device.map_bar(0)?;
//! bar.write32(0, 41)?;
//! assert_eq!(bar.read32(0)?, 42);
//! # Ok::<(), pcibus::bus::BackingError>(())
//! ```
//!
//! # What the backing enforces
//!
//! - **DMA** ([`ModelContext::dma_read`], [`ModelContext::dma_write`]) reaches only the live
//!   allocations and mappings of the backing ([`DeviceBacking::alloc_dma`] and the rest),
//!   one access inside one allocation. An access outside every live allocation, to a freed
//!   one, or a write to one the device may only read ([`DmaConstraints::device_read_only`])
//!   is refused ([`DmaFault`]) and counted ([`ModelStats::bad_dma`]), as the NVMe
//!   emulator's `bad_dma`.
//! - **Bus mastering**: while Bus Master Enable (Command register bit 2) is off, DMA is
//!   refused, and MSI and MSI-X messages (memory writes too) are dropped: each is counted
//!   ([`ModelStats::dma_without_bus_master`], [`ModelStats::msi_without_bus_master`]) and
//!   logged with `log::error!`. These are the driver's faults, which a driver test should
//!   fail on: [`FakeBacking::model_stats`] and [`FakeBacking::model_faults`] say what
//!   happened, [`FakeBacking::assert_no_model_faults`] panics with the first of them (a
//!   fault itself cannot panic: it may happen on a model thread nobody joins).
//! - **Interrupts** go through the backing's interrupt model: a vector that is not enabled
//!   or is masked does not fire (a masked one remembers it), INTx is a level
//!   ([`ModelContext::set_intx`]) that VFIO automasks after each interrupt and that fires
//!   again on unmask while it is still asserted.
//! - **Revoke** ([`DeviceBacking::revoke`]) or [`FakeBacking::set_gone`]: registers read
//!   all-ones and no access reaches the model any more (an access in flight finishes
//!   before `revoke` returns); the model is no longer stepped, and its DMA is refused
//!   ([`DmaFault::Closed`], not counted: a device being torn down is not at fault).
//!
//! [`DeviceBacking::alloc_dma`]: crate::bus::DeviceBacking::alloc_dma
//! [`DeviceBacking::revoke`]: crate::bus::DeviceBacking::revoke
//! [`DmaConstraints::device_read_only`]: crate::bus::dma::DmaConstraints::device_read_only

use std::any::Any;
use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::Duration;

use parking_lot::{Condvar, Mutex};

use super::backing::{FakeBacking, FakeLayout, IrqModel};
use crate::addr::PciAddress;
use crate::bus::backing::{BackingError, DeviceBacking};
use crate::bus::interrupt::InterruptKind;
use crate::vfio::DmaBuffer;

/// A device model: what a [`FakeBacking`] built with [`FakeBacking::with_model`] asks
/// about its registers and its background work. See the [module docs](self).
///
/// Every callback runs with the model locked (one at a time), on the thread that made
/// the access or on the model thread; a callback may use its [`ModelContext`] freely (the
/// backing holds none of its own locks meanwhile).
pub trait DeviceModel: Any + Send {
    /// The BARs (sizes, kinds) and device-specific regions. Asked once, when the backing
    /// is built. Every access to a BAR of it reaches [`read`](Self::read) or
    /// [`write`](Self::write); regions are plain memory.
    fn layout(&self) -> FakeLayout;

    /// The config space: ids, class, interrupt pin, capabilities. Asked once, when the
    /// backing is built; the backing fills in the BAR registers from the
    /// [`layout`](Self::layout), and sets Memory Space Enable in the Command register as
    /// vfio-pci's open does. The interrupt counts follow from it as VFIO derives them:
    /// INTx 1 if the interrupt pin is set, MSI from the MSI capability's Multiple Message
    /// Capable field, MSI-X from its table size, the error notification 1 for a PCI
    /// Express device.
    fn config(&self) -> ModelConfig;

    /// A read of `size` bytes (1, 2, 4 or 8; naturally aligned, inside the BAR) at
    /// `offset` of BAR `bar`. The backing keeps the low `size` bytes of the answer.
    fn read(&mut self, ctx: &ModelContext, bar: u32, offset: u64, size: usize) -> u64;

    /// A write of the low `size` bytes of `value` at `offset` of BAR `bar`.
    fn write(&mut self, ctx: &ModelContext, bar: u32, offset: u64, size: usize, value: u64);

    /// Background work: does what is due (a DMA transfer, a computation, an interrupt) and
    /// says whether it did anything. Called by [`FakeBacking::step_model`] or repeatedly
    /// by a model thread, which sleeps until the next register write (or 2 ms) after a
    /// call that did nothing, so return false when idle. Default: nothing to do.
    fn step(&mut self, ctx: &ModelContext) -> bool {
        let _ = ctx;
        false
    }

    /// A function-level reset ([`DeviceBacking::reset`]):
    /// put the device's state back as the real device's reset does. Before it is called
    /// the backing has deasserted INTx, as the PCI core does on reset. Default: nothing
    /// (a device whose registers survive a reset, as QEMU's `edu`).
    fn reset(&mut self, ctx: &ModelContext) {
        let _ = ctx;
    }
}

// --- config space ---

/// Capability ids of [`ModelConfig`]'s builders.
pub mod cap {
    /// Power Management.
    pub const PM: u8 = 0x01;
    /// MSI.
    pub const MSI: u8 = 0x05;
    /// Vendor-specific.
    pub const VENDOR: u8 = 0x09;
    /// PCI Express.
    pub const EXP: u8 = 0x10;
    /// MSI-X.
    pub const MSIX: u8 = 0x11;
}

// Config space offsets.
const STATUS: usize = 0x06;
const STATUS_CAP_LIST: u8 = 0x10;
const CAP_PTR: usize = 0x34;
const INTERRUPT_PIN: usize = 0x3d;
const FIRST_CAP: usize = 0x40;
const CONFIG_END: usize = 0x100;

/// The config space of a [`DeviceModel`] (a type-0 header), built by value: ids, class,
/// revision, subsystem, interrupt pin, and a capability list (MSI, MSI-X, Power
/// Management, PCI Express, vendor-specific, or any other), laid out from 0x40 up, each
/// dword-aligned and linked from the Capabilities Pointer (0x34) with the Status
/// register's Capabilities List bit set.
///
/// ```
/// use pcibus::testing::model::{ModelConfig, cap};
/// let config = ModelConfig::new(0x1af4, 0x1044)
///     .class(0x00ff00)
///     .interrupt_pin(1)
///     .power_management()
///     .msix(4, 1, 0, 1, 0x800)
///     .vendor_specific(&[1, 2, 3]);
/// assert_eq!(config.find_capability(cap::PM), Some(0x40));
/// assert_eq!(config.find_capability(cap::MSIX), Some(0x48));
/// assert_eq!(config.bytes()[0x48 + 2], 3); // table size - 1
/// ```
///
/// A capability that does not fit below 0x100 is a bug of the test: the builder panics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelConfig {
    bytes: Vec<u8>,
    // Where the next capability goes, and the byte that must point at it.
    next: usize,
    link: usize,
}

impl ModelConfig {
    /// A config space of `vendor`:`device`, class 0, revision 0, no interrupt pin, no
    /// capability (4096 bytes, the rest zero).
    pub fn new(vendor: u16, device: u16) -> Self {
        let mut bytes = vec![0u8; 4096];
        bytes[0..2].copy_from_slice(&vendor.to_le_bytes());
        bytes[2..4].copy_from_slice(&device.to_le_bytes());
        ModelConfig {
            bytes,
            next: FIRST_CAP,
            link: CAP_PTR,
        }
    }

    /// The class code (24 bits: base class, subclass, programming interface).
    pub fn class(mut self, class: u32) -> Self {
        self.bytes[9..12].copy_from_slice(&class.to_le_bytes()[..3]);
        self
    }

    /// The revision id.
    pub fn revision(mut self, revision: u8) -> Self {
        self.bytes[8] = revision;
        self
    }

    /// The subsystem vendor and id.
    pub fn subsystem(mut self, vendor: u16, id: u16) -> Self {
        self.bytes[0x2c..0x2e].copy_from_slice(&vendor.to_le_bytes());
        self.bytes[0x2e..0x30].copy_from_slice(&id.to_le_bytes());
        self
    }

    /// The Interrupt Pin register (1–4: INTA–INTD; 0: no INTx).
    pub fn interrupt_pin(mut self, pin: u8) -> Self {
        self.bytes[INTERRUPT_PIN] = pin;
        self
    }

    /// Appends capability `id` whose bytes after the id and next-pointer bytes are `body`.
    pub fn capability(mut self, id: u8, body: &[u8]) -> Self {
        let at = self.next;
        let end = at + 2 + body.len();
        assert!(
            end <= CONFIG_END,
            "capability {id:#04x} of {} bytes does not fit in config space below 0x100",
            body.len() + 2
        );
        self.bytes[at] = id;
        self.bytes[at + 1] = 0;
        self.bytes[at + 2..end].copy_from_slice(body);
        self.bytes[self.link] = at as u8;
        self.bytes[STATUS] |= STATUS_CAP_LIST;
        self.link = at + 1;
        self.next = end.next_multiple_of(4);
        self
    }

    /// An MSI capability of `vectors` vectors (rounded up to a power of two, at most 32),
    /// with 64-bit addresses and per-vector masking as asked. Disabled, as after reset.
    pub fn msi(self, vectors: u32, is_64bit: bool, per_vector_mask: bool) -> Self {
        let mmc = vectors.clamp(1, 32).next_power_of_two().trailing_zeros() as u16;
        let control = mmc << 1 | u16::from(is_64bit) << 7 | u16::from(per_vector_mask) << 8;
        // Address (4), upper address (4 if 64-bit), data (2), then for masking reserved (2),
        // mask bits (4), pending bits (4).
        let len = 2 + 4 + if is_64bit { 4 } else { 0 } + 2 + if per_vector_mask { 10 } else { 0 };
        let mut body = vec![0u8; len];
        body[0..2].copy_from_slice(&control.to_le_bytes());
        self.capability(cap::MSI, &body)
    }

    /// An MSI-X capability of `table_size` vectors (1–2048) whose table is at
    /// `table_offset` of BAR `table_bar` and pending bits at `pba_offset` of BAR `pba_bar`
    /// (offsets 8-byte aligned). Disabled, as after reset.
    pub fn msix(
        self,
        table_size: u16,
        table_bar: u8,
        table_offset: u32,
        pba_bar: u8,
        pba_offset: u32,
    ) -> Self {
        let control = table_size.clamp(1, 2048) - 1;
        let mut body = [0u8; 10];
        body[0..2].copy_from_slice(&control.to_le_bytes());
        body[2..6].copy_from_slice(&(table_offset & !7 | u32::from(table_bar & 7)).to_le_bytes());
        body[6..10].copy_from_slice(&(pba_offset & !7 | u32::from(pba_bar & 7)).to_le_bytes());
        self.capability(cap::MSIX, &body)
    }

    /// A Power Management capability, version 3, in D0.
    pub fn power_management(self) -> Self {
        // PMC: version 3; PMCSR: D0, No_Soft_Reset.
        self.capability(cap::PM, &[0x03, 0x00, 0x08, 0x00, 0x00, 0x00])
    }

    /// A PCI Express capability (version 2) of an endpoint: makes the device PCI Express,
    /// so it has the error notification ([`InterruptKind::Error`]), as VFIO offers it.
    pub fn pci_express(self) -> Self {
        let mut body = [0u8; 0x3a];
        // Capabilities register: version 2, device/port type 0 (endpoint).
        body[0] = 0x02;
        self.capability(cap::EXP, &body)
    }

    /// A vendor-specific capability carrying `data` (its length byte, the third, counts
    /// the whole capability).
    pub fn vendor_specific(self, data: &[u8]) -> Self {
        let mut body = Vec::with_capacity(data.len() + 1);
        body.push(u8::try_from(data.len() + 3).unwrap_or(u8::MAX));
        body.extend_from_slice(data);
        self.capability(cap::VENDOR, &body)
    }

    /// The config space's bytes (4096).
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Where capability `id` is (the first of that id), walking the list.
    pub fn find_capability(&self, id: u8) -> Option<usize> {
        find_capability(&self.bytes, id)
    }

    /// The bytes, for the backing.
    pub(crate) fn into_bytes(self) -> Vec<u8> {
        self.bytes
    }
}

/// Where capability `id` is in `config` (a config space's bytes), walking the list from
/// the Capabilities Pointer; `None` without a list, or when the list is broken (a loop, a
/// pointer out of range).
pub fn find_capability(config: &[u8], id: u8) -> Option<usize> {
    if config.get(STATUS)? & STATUS_CAP_LIST == 0 {
        return None;
    }
    let mut at = usize::from(*config.get(CAP_PTR)? & !3);
    // At most 48 capabilities fit in 192 bytes: more steps is a loop.
    for _ in 0..48 {
        if at < FIRST_CAP {
            return None;
        }
        if *config.get(at)? == id {
            return Some(at);
        }
        at = usize::from(*config.get(at + 1)? & !3);
    }
    None
}

/// The interrupt counts VFIO would report for `config`, by VFIO index (INTx, MSI, MSI-X,
/// ERR).
pub(crate) fn interrupt_counts(config: &[u8]) -> [u32; 4] {
    let intx = u32::from(config.get(INTERRUPT_PIN).is_some_and(|&p| p != 0));
    let msi = find_capability(config, cap::MSI).map_or(0, |at| {
        let control = u16::from_le_bytes([config[at + 2], config[at + 3]]);
        1 << ((control >> 1) & 7).min(5)
    });
    let msix = find_capability(config, cap::MSIX).map_or(0, |at| {
        let control = u16::from_le_bytes([config[at + 2], config[at + 3]]);
        u32::from(control & 0x7ff) + 1
    });
    let err = u32::from(find_capability(config, cap::EXP).is_some());
    [intx, msi, msix, err]
}

/// Sets or clears the enable bit of the MSI (or MSI-X) capability in `config`, if it has
/// one: what vfio-pci's enabling does to the device.
pub(crate) fn set_msi_enable(config: &mut [u8], kind: InterruptKind, on: bool) {
    let (id, bit) = match kind {
        InterruptKind::Msi => (cap::MSI, 0x0001u16),
        InterruptKind::MsiX => (cap::MSIX, 0x8000u16),
        _ => return,
    };
    let Some(at) = find_capability(config, id) else {
        return;
    };
    let control = u16::from_le_bytes([config[at + 2], config[at + 3]]);
    let control = if on { control | bit } else { control & !bit };
    config[at + 2..at + 4].copy_from_slice(&control.to_le_bytes());
}

// --- DMA bookkeeping ---

/// How many freed ranges are remembered, to tell "freed" from "never mapped".
const FREED_REMEMBERED: usize = 4096;

/// The live DMA allocations of a backing by IOVA, and the recently freed ones.
#[derive(Debug, Default)]
pub(crate) struct DmaMap {
    live: BTreeMap<u64, DmaEntry>,
    freed: VecDeque<(u64, u64)>,
}

#[derive(Debug)]
struct DmaEntry {
    len: u64,
    read_only: bool,
    buffer: Weak<DmaBuffer>,
}

enum Found {
    Live(Arc<DmaBuffer>, usize, bool),
    Freed,
    Unmapped,
}

impl DmaMap {
    pub(crate) fn insert(&mut self, iova: u64, buffer: &Arc<DmaBuffer>, read_only: bool) {
        let entry = DmaEntry {
            len: buffer.len() as u64,
            read_only,
            buffer: Arc::downgrade(buffer),
        };
        self.live.insert(iova, entry);
    }

    pub(crate) fn remove(&mut self, iova: u64) {
        if let Some(entry) = self.live.remove(&iova) {
            if self.freed.len() == FREED_REMEMBERED {
                self.freed.pop_front();
            }
            self.freed.push_back((iova, iova.saturating_add(entry.len)));
        }
    }

    fn find(&self, iova: u64, len: usize) -> Found {
        let end = iova.saturating_add(len as u64);
        if let Some((&start, entry)) = self.live.range(..=iova).next_back()
            && end <= start.saturating_add(entry.len)
            && let Some(buffer) = entry.buffer.upgrade()
        {
            return Found::Live(buffer, (iova - start) as usize, entry.read_only);
        }
        if self
            .freed
            .iter()
            .any(|&(s, e)| iova < e && s < end.max(iova.saturating_add(1)))
        {
            Found::Freed
        } else {
            Found::Unmapped
        }
    }
}

/// Why a model's DMA was refused ([`ModelContext::dma_read`], [`ModelContext::dma_write`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DmaFault {
    /// Bus Master Enable is off in the Command register: the device may not reach memory.
    #[error("{address}: DMA {} {len} bytes at {iova:#x} with bus mastering off", if *.write { "write of" } else { "read of" })]
    BusMasterOff {
        /// The device.
        address: PciAddress,
        /// Where.
        iova: u64,
        /// How many bytes.
        len: usize,
        /// A write to memory (else a read).
        write: bool,
    },
    /// No live allocation holds the whole range (it may straddle two).
    #[error("{address}: DMA {} {len} bytes at {iova:#x}: no live DMA allocation holds it", if *.write { "write of" } else { "read of" })]
    Unmapped {
        /// The device.
        address: PciAddress,
        /// Where.
        iova: u64,
        /// How many bytes.
        len: usize,
        /// A write to memory (else a read).
        write: bool,
    },
    /// The range is in an allocation that was freed (unmapped) already.
    #[error("{address}: DMA {} {len} bytes at {iova:#x}: that memory was freed", if *.write { "write of" } else { "read of" })]
    Freed {
        /// The device.
        address: PciAddress,
        /// Where.
        iova: u64,
        /// How many bytes.
        len: usize,
        /// A write to memory (else a read).
        write: bool,
    },
    /// A write to memory the device may only read.
    #[error("{address}: DMA write of {len} bytes at {iova:#x}: the allocation is read-only for the device")]
    ReadOnly {
        /// The device.
        address: PciAddress,
        /// Where.
        iova: u64,
        /// How many bytes.
        len: usize,
    },
    /// The device was revoked or is gone.
    #[error("{address}: DMA after the device was closed")]
    Closed {
        /// The device.
        address: PciAddress,
    },
}

// --- counters ---

#[derive(Debug, Default)]
pub(crate) struct ModelCounters {
    bad_dma: AtomicU64,
    dma_without_bus_master: AtomicU64,
    msi_without_bus_master: AtomicU64,
    guest_errors: AtomicU64,
    dma_reads: AtomicU64,
    dma_writes: AtomicU64,
    faults: Mutex<Vec<String>>,
}

/// How many faults to keep the messages of.
const FAULTS_REMEMBERED: usize = 64;

impl ModelCounters {
    fn fault(&self, counter: &AtomicU64, message: String) {
        counter.fetch_add(1, Ordering::Relaxed);
        log::error!("{message}");
        let mut faults = self.faults.lock();
        if faults.len() < FAULTS_REMEMBERED {
            faults.push(message);
        }
    }

    pub(crate) fn stats(&self) -> ModelStats {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ModelStats {
            bad_dma: load(&self.bad_dma),
            dma_without_bus_master: load(&self.dma_without_bus_master),
            msi_without_bus_master: load(&self.msi_without_bus_master),
            guest_errors: load(&self.guest_errors),
            dma_reads: load(&self.dma_reads),
            dma_writes: load(&self.dma_writes),
        }
    }

    pub(crate) fn faults(&self) -> Vec<String> {
        self.faults.lock().clone()
    }
}

/// What a model's device did wrong or was refused, counted by its backing
/// ([`FakeBacking::model_stats`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ModelStats {
    /// DMA refused because no live allocation held it, it was freed, or it wrote memory
    /// the device may only read.
    pub bad_dma: u64,
    /// DMA refused because Bus Master Enable was off.
    pub dma_without_bus_master: u64,
    /// MSI or MSI-X messages dropped because Bus Master Enable was off.
    pub msi_without_bus_master: u64,
    /// Errors the model reported of the driver's use of the device
    /// ([`ModelContext::guest_error`], QEMU's `LOG_GUEST_ERROR`).
    pub guest_errors: u64,
    /// DMA reads of memory done.
    pub dma_reads: u64,
    /// DMA writes to memory done.
    pub dma_writes: u64,
}

impl ModelStats {
    /// Whether anything was refused or dropped, or the model reported a guest error.
    pub fn faulted(&self) -> bool {
        self.bad_dma + self.dma_without_bus_master + self.msi_without_bus_master + self.guest_errors > 0
    }
}

// --- the context ---

/// What a [`DeviceModel`] acts through: DMA, interrupts and config space of its backing.
/// Passed into every callback; clones can go to a thread of the model's own. It holds no
/// handle of the device ([`DeviceBacking::extra_handles`]
/// does not count it).
#[derive(Clone)]
pub struct ModelContext {
    pub(crate) address: PciAddress,
    pub(crate) config: Arc<Mutex<Vec<u8>>>,
    pub(crate) irqs: Arc<Mutex<IrqModel>>,
    pub(crate) dma: Arc<Mutex<DmaMap>>,
    pub(crate) gone: Arc<AtomicBool>,
    pub(crate) counters: Arc<ModelCounters>,
}

impl fmt::Debug for ModelContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ModelContext")
            .field("address", &self.address)
            .finish_non_exhaustive()
    }
}

impl ModelContext {
    /// The device's address.
    pub fn address(&self) -> PciAddress {
        self.address
    }

    /// Whether the device was revoked or is gone: its model should stop.
    pub fn is_closed(&self) -> bool {
        self.gone.load(Ordering::Acquire)
    }

    /// Reads config space at `offset` (as the device sees it: what the driver wrote).
    pub fn read_config(&self, offset: u64, buf: &mut [u8]) -> Result<(), BackingError> {
        let config = self.config.lock();
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        match start
            .checked_add(buf.len())
            .and_then(|end| config.get(start..end))
        {
            Some(bytes) => {
                buf.copy_from_slice(bytes);
                Ok(())
            }
            None => Err(BackingError::OutOfRange {
                address: self.address,
                what: "config".into(),
                offset,
                len: buf.len(),
            }),
        }
    }

    /// The 16-bit config register at `offset` (all-ones outside config space).
    pub fn config16(&self, offset: u64) -> u16 {
        let mut b = [0xff; 2];
        let _ = self.read_config(offset, &mut b);
        u16::from_le_bytes(b)
    }

    /// The 32-bit config register at `offset` (all-ones outside config space).
    pub fn config32(&self, offset: u64) -> u32 {
        let mut b = [0xff; 4];
        let _ = self.read_config(offset, &mut b);
        u32::from_le_bytes(b)
    }

    /// Where capability `id` is in config space.
    pub fn find_capability(&self, id: u8) -> Option<usize> {
        find_capability(&self.config.lock(), id)
    }

    /// Whether Bus Master Enable is on in the Command register.
    pub fn bus_master(&self) -> bool {
        super::bus_master_bit(&self.config.lock())
    }

    /// The kind of interrupts enabled now (INTx, MSI or MSI-X) and how many vectors.
    pub fn enabled_interrupts(&self) -> Option<(InterruptKind, u32)> {
        self.irqs.lock().enabled()
    }

    /// Whether MSI is the enabled kind (QEMU's `msi_enabled`).
    pub fn msi_enabled(&self) -> bool {
        self.enabled_interrupts()
            .is_some_and(|(k, _)| k == InterruptKind::Msi)
    }

    /// Whether MSI-X is the enabled kind.
    pub fn msix_enabled(&self) -> bool {
        self.enabled_interrupts()
            .is_some_and(|(k, _)| k == InterruptKind::MsiX)
    }

    /// Sends MSI or MSI-X message `vector` (for INTx use [`set_intx`](Self::set_intx)):
    /// true if it was delivered, false if the kind or vector is not enabled, the vector
    /// is masked (it then fires on unmask), or Bus Master Enable is off (the message is a
    /// memory write: dropped, counted, logged). `raise(InterruptKind::Intx, 0)` is an INTx
    /// pulse, as [`FakeBacking::raise`].
    pub fn raise(&self, kind: InterruptKind, vector: u32) -> bool {
        if self.is_closed() {
            return false;
        }
        if matches!(kind, InterruptKind::Msi | InterruptKind::MsiX) && !self.bus_master() {
            self.counters.fault(
                &self.counters.msi_without_bus_master,
                format!(
                    "{}: {kind} vector {vector} dropped: bus mastering is off (the driver never turned it on, or \
                     turned it off)",
                    self.address
                ),
            );
            return false;
        }
        self.irqs.lock().raise(self.address, kind, vector)
    }

    /// Sets the level of the INTx line: asserted, it fires the INTx vector if INTx is
    /// enabled and unmasked (VFIO then masks it until the driver unmasks it, and fires it
    /// again on unmask while the line is still asserted); deasserted, it cancels an
    /// interrupt waiting behind the mask.
    pub fn set_intx(&self, asserted: bool) {
        if self.is_closed() {
            return;
        }
        self.irqs.lock().set_intx(asserted);
    }

    /// Whether the INTx line is asserted.
    pub fn intx(&self) -> bool {
        self.irqs.lock().intx_level()
    }

    /// Reports a mistake of the driver's that the device tolerates (QEMU's
    /// `LOG_GUEST_ERROR`): logged as a warning and counted ([`ModelStats::guest_errors`]).
    pub fn guest_error(&self, message: impl fmt::Display) {
        self.counters.guest_errors.fetch_add(1, Ordering::Relaxed);
        let message = format!("{}: guest error: {message}", self.address);
        log::warn!("{message}");
        let mut faults = self.counters.faults.lock();
        if faults.len() < FAULTS_REMEMBERED {
            faults.push(message);
        }
    }

    // The buffer and offset of a DMA access, or why not (counted). The NVMe model
    // (`testing::nvme::NvmeModel`) resolves its transfers with it, then moves the data
    // itself.
    pub(crate) fn reach(
        &self,
        iova: u64,
        len: usize,
        write: bool,
    ) -> Result<(Arc<DmaBuffer>, usize), DmaFault> {
        let address = self.address;
        if self.is_closed() {
            return Err(DmaFault::Closed { address });
        }
        if !self.bus_master() {
            let fault = DmaFault::BusMasterOff {
                address,
                iova,
                len,
                write,
            };
            self.counters
                .fault(&self.counters.dma_without_bus_master, fault.to_string());
            return Err(fault);
        }
        self.resolve(iova, len, write)
    }

    // Where a DMA access would go, whatever Bus Master Enable says (refusals counted): for
    // a model that resolves memory ahead of its accesses (the NVMe model's queues, set up
    // while bus mastering may still be off) and checks bus mastering at each access.
    pub(crate) fn resolve(
        &self,
        iova: u64,
        len: usize,
        write: bool,
    ) -> Result<(Arc<DmaBuffer>, usize), DmaFault> {
        let address = self.address;
        if self.is_closed() {
            return Err(DmaFault::Closed { address });
        }
        let found = self.dma.lock().find(iova, len);
        let fault = match found {
            Found::Live(_, _, true) if write => DmaFault::ReadOnly { address, iova, len },
            Found::Live(buffer, offset, _) => return Ok((buffer, offset)),
            Found::Freed => DmaFault::Freed {
                address,
                iova,
                len,
                write,
            },
            Found::Unmapped => DmaFault::Unmapped {
                address,
                iova,
                len,
                write,
            },
        };
        self.counters.fault(&self.counters.bad_dma, fault.to_string());
        Err(fault)
    }

    /// Counts and logs a DMA the device would do while bus mastering is off (a model
    /// that checks Bus Master Enable itself, before any access).
    pub(crate) fn refuse_without_bus_master(&self, iova: u64, len: usize, write: bool) {
        let fault = DmaFault::BusMasterOff {
            address: self.address,
            iova,
            len,
            write,
        };
        self.counters
            .fault(&self.counters.dma_without_bus_master, fault.to_string());
    }

    /// Counts and logs a DMA into memory that was resolved earlier and freed since (a
    /// model holding on to a queue's memory).
    pub(crate) fn refuse_freed(&self, what: fmt::Arguments<'_>) {
        let message = format!("{}: DMA to {what}: that memory was freed", self.address);
        self.counters.fault(&self.counters.bad_dma, message);
    }

    /// The device reads `buf.len()` bytes of memory at `iova`: they must lie in one live
    /// DMA allocation of the backing, with bus mastering on. See [`DmaFault`].
    pub fn dma_read(&self, iova: u64, buf: &mut [u8]) -> Result<(), DmaFault> {
        if buf.is_empty() {
            return Ok(());
        }
        let (buffer, offset) = self.reach(iova, buf.len(), false)?;
        // In bounds: `reach` checked the range against the allocation's length.
        buffer.read_at(offset, buf).ok_or(DmaFault::Unmapped {
            address: self.address,
            iova,
            len: buf.len(),
            write: false,
        })?;
        self.counters.dma_reads.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// The device writes `data` to memory at `iova`: it must lie in one live DMA
    /// allocation of the backing that the device may write, with bus mastering on. See
    /// [`DmaFault`].
    pub fn dma_write(&self, iova: u64, data: &[u8]) -> Result<(), DmaFault> {
        if data.is_empty() {
            return Ok(());
        }
        let (buffer, offset) = self.reach(iova, data.len(), true)?;
        buffer.write_at(offset, data).ok_or(DmaFault::Unmapped {
            address: self.address,
            iova,
            len: data.len(),
            write: true,
        })?;
        self.counters.dma_writes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// A little-endian 32-bit DMA read.
    pub fn dma_read_u32(&self, iova: u64) -> Result<u32, DmaFault> {
        let mut b = [0u8; 4];
        self.dma_read(iova, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    /// A little-endian 64-bit DMA read.
    pub fn dma_read_u64(&self, iova: u64) -> Result<u64, DmaFault> {
        let mut b = [0u8; 8];
        self.dma_read(iova, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    /// A little-endian 32-bit DMA write.
    pub fn dma_write_u32(&self, iova: u64, value: u32) -> Result<(), DmaFault> {
        self.dma_write(iova, &value.to_le_bytes())
    }

    /// A little-endian 64-bit DMA write.
    pub fn dma_write_u64(&self, iova: u64, value: u64) -> Result<(), DmaFault> {
        self.dma_write(iova, &value.to_le_bytes())
    }
}

// --- the host: the model, locked, with its context ---

/// A model inside its backing.
pub(crate) struct ModelHost {
    model: Mutex<Box<dyn DeviceModel>>,
    pub(crate) ctx: ModelContext,
    kicked: Mutex<bool>,
    kick: Condvar,
}

impl fmt::Debug for ModelHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ModelHost")
            .field("ctx", &self.ctx)
            .finish_non_exhaustive()
    }
}

impl ModelHost {
    pub(crate) fn new(model: Box<dyn DeviceModel>, ctx: ModelContext) -> ModelHost {
        ModelHost {
            model: Mutex::new(model),
            ctx,
            kicked: Mutex::new(false),
            kick: Condvar::new(),
        }
    }

    /// A register read; all-ones once the device is closed (checked under the model's
    /// lock, which `revoke` takes after closing: no access reaches the model after it).
    pub(crate) fn read(&self, bar: u32, offset: u64, size: usize) -> u64 {
        let mut model = self.model.lock();
        if self.ctx.is_closed() {
            return u64::MAX;
        }
        model.read(&self.ctx, bar, offset, size)
    }

    /// A register write, then a kick of the model thread.
    pub(crate) fn write(&self, bar: u32, offset: u64, size: usize, value: u64) {
        {
            let mut model = self.model.lock();
            if self.ctx.is_closed() {
                return;
            }
            model.write(&self.ctx, bar, offset, size, value);
        }
        self.wake();
    }

    pub(crate) fn step(&self) -> bool {
        let mut model = self.model.lock();
        if self.ctx.is_closed() {
            return false;
        }
        model.step(&self.ctx)
    }

    pub(crate) fn reset(&self) {
        let mut model = self.model.lock();
        self.ctx.irqs.lock().set_intx(false);
        model.reset(&self.ctx);
        drop(model);
        self.wake();
    }

    /// Waits for every access in flight to finish.
    pub(crate) fn quiesce(&self) {
        drop(self.model.lock());
        self.wake();
    }

    pub(crate) fn with<R>(&self, f: impl FnOnce(&mut dyn DeviceModel) -> R) -> R {
        f(&mut **self.model.lock())
    }

    fn wake(&self) {
        *self.kicked.lock() = true;
        self.kick.notify_all();
    }

    fn wait(&self, timeout: Duration) {
        let mut kicked = self.kicked.lock();
        if !*kicked {
            let _ = self.kick.wait_for(&mut kicked, timeout);
        }
        *kicked = false;
    }
}

/// How long an idle model thread sleeps before stepping again without a register write.
const IDLE_STEP: Duration = Duration::from_millis(2);

/// A thread stepping a model ([`FakeBacking::spawn_model_thread`]): stops and is joined
/// when dropped, and stops by itself once the device is closed or its last handle is
/// dropped. It holds no handle of the device.
pub struct ModelThread {
    stop: Arc<AtomicBool>,
    host: Weak<ModelHost>,
    handle: Option<JoinHandle<()>>,
}

impl fmt::Debug for ModelThread {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ModelThread")
            .field("running", &self.handle.as_ref().is_some_and(|h| !h.is_finished()))
            .finish()
    }
}

impl ModelThread {
    pub(crate) fn spawn(host: &Arc<ModelHost>) -> std::io::Result<ModelThread> {
        let stop = Arc::new(AtomicBool::new(false));
        let weak = Arc::downgrade(host);
        let (s, w) = (Arc::clone(&stop), weak.clone());
        let handle = std::thread::Builder::new()
            .name(format!("model {}", host.ctx.address))
            .spawn(move || {
                while !s.load(Ordering::Acquire) {
                    let Some(host) = w.upgrade() else { break };
                    if host.ctx.is_closed() {
                        break;
                    }
                    if !host.step() {
                        host.wait(IDLE_STEP);
                    }
                }
            })?;
        Ok(ModelThread {
            stop,
            host: weak,
            handle: Some(handle),
        })
    }

    /// Whether the thread still runs.
    pub fn is_running(&self) -> bool {
        self.handle.as_ref().is_some_and(|h| !h.is_finished())
    }
}

impl Drop for ModelThread {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(host) = self.host.upgrade() {
            host.wake();
        }
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}

impl FakeBacking {
    /// Steps the model once ([`DeviceModel::step`]); whether it did anything. False for a
    /// backing without a model, or a closed device.
    pub fn step_model(&self) -> bool {
        self.model_host().is_some_and(|h| h.step())
    }

    /// Steps the model until it has nothing to do, at most `max` times; how many steps
    /// did something.
    pub fn run_model(&self, max: usize) -> usize {
        (0..max).take_while(|_| self.step_model()).count()
    }

    /// Starts a thread that steps the model whenever it has work (after each register
    /// write, and every 2 ms), as a real device works in the background. `None` for a
    /// backing without a model; an error if the thread cannot be created.
    pub fn spawn_model_thread(&self) -> Option<std::io::Result<ModelThread>> {
        self.model_host().map(ModelThread::spawn)
    }

    /// Calls `f` with the model, if it is an `M`: for tests that look into its state.
    pub fn with_model_state<M: DeviceModel, R>(&self, f: impl FnOnce(&mut M) -> R) -> Option<R> {
        let host = self.model_host()?;
        host.with(|model| {
            let any: &mut dyn Any = model;
            any.downcast_mut::<M>().map(f)
        })
    }

    /// What the model's device was refused or reported ([`ModelStats`]); all zero
    /// without a model.
    pub fn model_stats(&self) -> ModelStats {
        self.model_host()
            .map_or_else(ModelStats::default, |h| h.ctx.counters.stats())
    }

    /// The messages of the first faults and guest errors (up to 64), oldest first.
    pub fn model_faults(&self) -> Vec<String> {
        self.model_host()
            .map_or_else(Vec::new, |h| h.ctx.counters.faults())
    }

    /// Panics, naming them, if the model's device was refused anything or reported a
    /// guest error: the end of a driver test that expects a clean run.
    #[track_caller]
    pub fn assert_no_model_faults(&self) {
        let stats = self.model_stats();
        assert!(
            !stats.faulted(),
            "{}: the device model saw faults: {stats:?}: {:#?}",
            self.address(),
            self.model_faults()
        );
    }
}
