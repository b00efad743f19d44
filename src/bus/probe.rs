//! [`Bus`]: registered drivers, the devices they hold, and the loop that hands devices to
//! them and takes them back.
//!
//! The bus keeps a [`DeviceMap`] (one full scan at the start, then one device per event).
//! [`Bus::probe_all`] offers every admitted device, in address order, to the drivers whose
//! id tables match it, in registration order: each device is claimed
//! ([`ClaimDir`]), opened ([`Attach`]) and passed to [`Driver::probe`] until a driver
//! binds it; if none does, or a probe fails, everything is undone in reverse.
//!
//! Devices are taken back through one path, whatever told the bus: the request eventfd
//! of a device ([`Bus::poll`]), a `remove` or `unbind` uevent ([`Bus::handle`]), a fault
//! on a mapped BAR ([`crate::vfio::fault`], also in [`Bus::poll`]), or the application
//! ([`Bus::detach`], dropping the bus). That path says "releasing" in the device's claim
//! (so scans in other processes keep away from it) and marks it in the scanner's
//! registry, calls [`Driver::remove`], checks that the driver dropped the device, closes
//! it, restores its binding on an orderly release, and drops the claim.
//!
//! The bus learns of BAR faults through its own [`fault::Subscriber`] (made once
//! [`fault::install`] was called), so other users of the fault handler in the process see
//! them too, and it acts on the faults of devices it holds only. A fault of a device that
//! is still there but in D3hot or not decoding memory is not a removal
//! ([`super::fault`]): its driver is told ([`Driver::fault`]), keeps the device, and the bus
//! reports [`BusEvent::Fault`].
//!
//! A driver that keeps a handle of the device after `remove` for a removal (the kernel
//! waits for the device's close) does not keep it open if the device's backing can be
//! revoked ([`DeviceBacking::revoke`]): the bus closes the device under the kept handles,
//! which read all-ones and fail from then on, and releases it at once
//! ([`RemovedReport::revoked`]). Otherwise, and after an orderly detach (whose previous
//! binding can be restored only once every handle is gone), a driver that keeps a
//! handle of the device after `remove` (or after declining or failing its probe, when no
//! driver took it) keeps it open (for VFIO, the kernel's removal goes on waiting,
//! holding the device lock). Such a device is not released: it
//! stays claimed, and (if it is being removed) marked releasing in the claim and pending
//! in the registry, with its request eventfd registered; it is not offered to drivers
//! again (a removal request for it revokes it, if it can be, as above). [`Bus::poll`]
//! looks at it again each time, and once its last handle is gone it finishes the release (closes it, restores the binding if the release is orderly or a
//! probe's rollback, drops the claim and the mark) and reports [`BusEvent::Released`].
//! See [`Bus::releasing`], and the bus's drop for one still open when the bus ends.
//!
//! A device added later (a `add` uevent) is read alone and offered to the drivers after a
//! settle delay ([`Bus::settle`], default 2 s as in SPDK): a device unplugged and
//! plugged back is probed again. A device whose driver let it go on a request while it
//! stays present (an operator's `unbind`) is not probed again until it is re-added, or
//! bound again to what the bus opens it through (the operator's bind to vfio-pci).
//!
//! Nothing runs behind the caller's back: the bus does its work in the calls made to
//! it. An event loop waits on [`Bus::fds`] (and a
//! [`UeventMonitor`](crate::hotplug::monitor::UeventMonitor)) and calls [`Bus::poll`] /
//! [`Bus::handle`]; simple programs call [`Bus::wait`], which does both. The one thread
//! the bus starts is a probe's, for the length of the call that probes: a driver's probe
//! runs there while the calling thread answers removal requests (see
//! [`Bus`](Bus#probes-and-removal-requests)).

use std::any::{Any, TypeId};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::os::fd::{AsFd, BorrowedFd};
use std::panic::AssertUnwindSafe;
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

use super::attach::{Attach, AttachError, Attached, Release};
use super::backing::DeviceBacking;
use super::devargs::Selection;
use super::driver::{Driver, DriverError, DriverPanicked, ProbeOutcome, Removal, RemovalCause};
use super::errors::{ErrorAction, ErrorReport, ErrorWatch};
use super::fault::{BarFault, FaultFacts, FaultReason, is_d3hot};
use super::id::first_match;
use super::map::{Change, DeviceMap};
use crate::addr::PciAddress;
use crate::hotplug::event::{Action, Uevent};
use crate::hotplug::monitor::{Event, EventSource, MonitorError};
use crate::removal::claim::{Claim, ClaimDir, ClaimError, ClaimInfo};
use crate::removal::registry::Reason;
use crate::sysfs::bind::is_kernel_sysfs;
use crate::sysfs::scan::{ScanError, SysfsRoot};
use crate::vfio::fault::{self, Subscriber};

// The Command register and its Memory Space Enable bit.
const COMMAND: u64 = 0x04;
const COMMAND_MEMORY: u16 = 1 << 1;

mod erased;
mod ready;
mod vfs;
mod worker;
use erased::{ErasedDriver, State};
use ready::ReadyFd;
use worker::{Offered, Probing};

/// SPDK's settle delay for hot-inserted devices.
pub const DEFAULT_SETTLE: Duration = Duration::from_secs(2);

/// How often [`Bus::wait`] wakes to look again at a device whose driver kept a handle
/// after its removal (nothing signals that the handle went).
pub const RELEASE_RECHECK: Duration = Duration::from_millis(100);

/// What went wrong running the bus (not a device's probe: those are in
/// [`ProbeReport`]s).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BusError {
    /// Reading sysfs failed.
    #[error(transparent)]
    Scan(#[from] ScanError),
    /// The uevent monitor failed.
    #[error(transparent)]
    Monitor(#[from] MonitorError),
    /// Waiting for events failed.
    #[error("bus: poll failed")]
    Poll(#[source] std::io::Error),
    /// The bus holds no device at this address.
    #[error("{0}: no driver of this bus holds it")]
    NotHeld(PciAddress),
}

/// Why a device offered to the drivers is not bound.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProbeError {
    /// Another owner holds the device's claim (its PID and command are in the error).
    #[error(transparent)]
    Claim(#[from] ClaimError),
    /// The device could not be opened (or bound to vfio-pci).
    #[error(transparent)]
    Attach(#[from] AttachError),
    /// Every matching driver said it is not theirs.
    #[error("{address}: no driver took it (declined by {})", .declined.join(", "))]
    Declined {
        /// The device.
        address: PciAddress,
        /// The drivers that declined, in the order asked.
        declined: Vec<String>,
    },
    /// A driver's probe failed; everything done for it was undone. The text includes the
    /// driver's message (the error is not also a `source()`, so printing the chain does
    /// not repeat it).
    #[error("{address}: driver {driver} failed to probe it: {error}")]
    Failed {
        /// The device.
        address: PciAddress,
        /// The driver.
        driver: String,
        /// The driver's error.
        error: DriverError,
    },
    /// The device was taken back while driver `driver` probed it (a removal request, a
    /// BAR fault): it is closed and released (after the probe, if its backing could not
    /// be revoked; later still if the driver kept handles: [`ProbeReport::leaked`]),
    /// whatever the probe answered. See [`Bus`](Bus#probes-and-removal-requests).
    #[error("{address}: taken back ({cause}) while driver {driver} probed it")]
    Removed {
        /// The device.
        address: PciAddress,
        /// The driver that was probing it.
        driver: String,
        /// Why it was taken back.
        cause: RemovalCause,
    },
}

/// What offering one device to the drivers did.
#[derive(Debug)]
#[non_exhaustive]
pub struct ProbeReport {
    /// The device.
    pub address: PciAddress,
    /// The driver that bound it, or why none did.
    pub result: Result<String, ProbeError>,
    /// Handles of the device that drivers kept after declining or failing (0 when every
    /// driver let go, as it must; see [`DeviceBacking::extra_handles`]). If no driver
    /// bound the device and some are kept, it stays open, and claimed
    /// ([`Bus::releasing`]); the rollback waits until they are gone
    /// ([`BusEvent::Released`]).
    pub leaked: usize,
}

/// A device taken back from its driver.
#[derive(Debug)]
#[non_exhaustive]
pub struct RemovedReport {
    /// The device.
    pub address: PciAddress,
    /// The driver that had it.
    pub driver: String,
    /// Why it was taken back.
    pub cause: RemovalCause,
    /// Handles the driver kept after [`Driver::remove`] (0 when it let go, as it must).
    /// For a removal whose backing could be revoked, they were closed under the driver
    /// ([`revoked`](Self::revoked)) and keep nothing open. Otherwise a VFIO device stays
    /// open while one lives, and the kernel's removal waits: the bus then keeps the
    /// device claimed ([`Bus::releasing`]) and finishes the release when they are gone
    /// ([`BusEvent::Released`]); [`error`](Self::error) is `None` until then.
    pub leaked: usize,
    /// Closing or restoring the binding failed (the device is released from the bus
    /// anyway).
    pub error: Option<AttachError>,
    /// [`Driver::remove`] panicked (the removal went on regardless).
    pub panicked: Option<DriverPanicked>,
    /// The bus revoked the device ([`DeviceBacking::revoke`]) and closed and released it
    /// without waiting for the driver's handles, which read all-ones and fail from then
    /// on. Either the driver was busy probing (another device, or this one again):
    /// [`Driver::remove`] is called when the probe returns (a panic in it is logged, not
    /// reported), and `leaked` is 0 (see [`Bus`](Bus#probes-and-removal-requests)); or,
    /// for a removal, the driver kept handles after `remove` (`leaked` > 0).
    pub revoked: bool,
}

/// A device whose driver had kept handles after [`Driver::remove`]
/// ([`RemovedReport::leaked`] > 0), or after declining or failing its probe
/// ([`ProbeReport::leaked`] > 0), released now that the last of them is gone: it is
/// closed, its binding restored if the release was orderly or a probe's rollback, and its
/// claim and registry mark are gone.
#[derive(Debug)]
#[non_exhaustive]
pub struct ReleasedReport {
    /// The device.
    pub address: PciAddress,
    /// The driver that kept it open (after a probe: the last one that kept a handle).
    pub driver: String,
    /// Why it was taken back; `None` after a probe (no driver took it).
    pub cause: Option<RemovalCause>,
    /// Closing or restoring the binding failed (the device is released from the bus
    /// anyway).
    pub error: Option<AttachError>,
}

/// A BAR fault of a held device (or of one being probed) that is not its removal (see
/// [`super::fault`]): the driver was told ([`Driver::fault`]; not while it was away
/// probing: see [`Bus`](Bus#probes-and-removal-requests)) and keeps the device.
#[derive(Debug)]
#[non_exhaustive]
pub struct FaultReport {
    /// The fault, as the driver received it.
    pub fault: BarFault,
    /// The driver that holds the device.
    pub driver: String,
    /// [`Driver::fault`] panicked (the device stays held regardless).
    pub panicked: Option<DriverPanicked>,
}

/// What the bus did.
#[derive(Debug)]
#[non_exhaustive]
pub enum BusEvent {
    /// A device was offered to the drivers.
    Probed(ProbeReport),
    /// A device was taken back from its driver. If the driver kept handles of it
    /// ([`RemovedReport::leaked`] > 0) and the bus did not revoke it
    /// ([`RemovedReport::revoked`]), it is still open and claimed: a
    /// [`Released`](Self::Released) follows once they are gone.
    Removed(RemovedReport),
    /// A device taken back earlier, which its driver had kept open, is closed and
    /// released at last.
    Released(ReleasedReport),
    /// A BAR of a held device (or of one being probed) faulted while the device is in
    /// D3hot or not decoding memory: not a removal; the driver was told (unless it was
    /// probing) and keeps it.
    Fault(FaultReport),
    /// A held device reported an error (AER); its driver was told
    /// ([`Driver::error_detected`]) and answered. For [`ErrorAction::Remove`] a
    /// [`Removed`](Self::Removed) follows.
    ///
    /// [`ErrorAction::Remove`]: super::errors::ErrorAction::Remove
    Error(ErrorReport),
    /// An event changed the device map.
    Map(Change),
    /// Uevents were lost; the map was rebuilt by a full scan, with these changes.
    Resynced(Vec<Change>),
}

impl fmt::Display for BusEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BusEvent::Probed(r) => match &r.result {
                Ok(driver) => write!(f, "{}: bound to {driver}", r.address),
                Err(e) => write!(f, "{}: not bound: {e}", r.address),
            },
            BusEvent::Removed(r) if r.leaked > 0 && r.revoked => write!(
                f,
                "{}: taken from {} ({}), which kept {} handle(s): revoked and closed under them",
                r.address, r.driver, r.cause, r.leaked
            ),
            BusEvent::Removed(r) if r.leaked > 0 => write!(
                f,
                "{}: taken from {} ({}), which kept {} handle(s): still open",
                r.address, r.driver, r.cause, r.leaked
            ),
            BusEvent::Removed(r) if r.revoked => write!(
                f,
                "{}: closed under {} while it probed ({})",
                r.address, r.driver, r.cause
            ),
            BusEvent::Removed(r) => write!(f, "{}: taken from {} ({})", r.address, r.driver, r.cause),
            BusEvent::Released(r) => write!(
                f,
                "{}: closed and released (kept open by {})",
                r.address, r.driver
            ),
            BusEvent::Fault(r) => write!(
                f,
                "{}: BAR{} of {} faulted ({}): not a removal",
                r.fault.address, r.fault.region, r.driver, r.fault.reason
            ),
            BusEvent::Error(r) => write!(
                f,
                "{}: reported an error ({}x); driver {} answered {:?}",
                r.event.address, r.event.count, r.driver, r.action
            ),
            BusEvent::Map(c) => write!(f, "map: {c:?}"),
            BusEvent::Resynced(c) => write!(f, "uevents lost: rescanned, {} changes", c.len()),
        }
    }
}

struct Held<B> {
    driver: usize,
    attached: Attached<B>,
    // The driver's state of this device (its `Driver::Device`), made by the probe that
    // bound it: one per attach of one incarnation, given back to `remove`.
    state: State,
    claim: Option<Claim>,
    // The kernel's uevent sequence number once the device was attached
    // (`/sys/kernel/uevent_seqnum`): uevents up to it are about the attach itself (the
    // unbind from the previous driver, the bind to vfio-pci), not news.
    attached_seqnum: Option<u64>,
}

// A device taken from its driver that stays open: the driver kept handles of it. Its
// release is finished (`Bus::finish`) once `attached.backing` has no other handle.
struct Parked<B> {
    driver: String,
    // `None`: no driver took it (it kept handles after declining or failing).
    cause: Option<RemovalCause>,
    attached: Attached<B>,
    claim: Option<Claim>,
    release: Release,
    // The bus put the device in the registry (and takes it out when done).
    marked: bool,
}

// A registered driver. Its name is kept here, for while the driver is away on a probe
// thread.
struct Slot<B> {
    name: String,
    // The driver's type, for the typed accessors of its states (also while it probes).
    driver_type: TypeId,
    // `None` while it probes (`worker`).
    driver: Option<Box<dyn ErasedDriver<B>>>,
}

// A removal answered while the device's driver was away probing: what is left to do when
// the probe returns.
enum Deferred {
    // The device was revoked and closed: the driver has only to be told, and given its
    // state back.
    Tell {
        driver: usize,
        address: PciAddress,
        cause: RemovalCause,
        state: State,
    },
    // The backing could not be revoked: the device stays held (claimed "releasing",
    // marked if `marked`) and is taken back, `remove` first, when the probe returns.
    TakeBack {
        address: PciAddress,
        cause: RemovalCause,
        marked: bool,
    },
}

impl<B> Held<B> {
    /// Whether uevent `u` was sent before the device was attached (both sequence numbers
    /// known and `u`'s not newer).
    fn predates(&self, u: &Uevent) -> bool {
        matches!((u.seqnum, self.attached_seqnum), (Some(n), Some(at)) if n <= at)
    }
}

/// The kernel's last uevent sequence number, from `ROOT/kernel/uevent_seqnum` (a plain
/// counter: reading it takes no device lock); `None` where the tree has none (a fake).
fn uevent_seqnum(root: &SysfsRoot) -> Option<u64> {
    std::fs::read_to_string(root.path().join("kernel/uevent_seqnum"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The bus. See the [module docs](self).
///
/// # Dropping
///
/// Dropping the bus takes every held device back ([`RemovalCause::Detach`], in address
/// order), as [`Bus::detach`] does, then releases those whose drivers had kept handles
/// and have dropped them since.
///
/// A device still open then (a handle outlives its driver and the bus: the application
/// kept one, or a driver leaked one into a static) is left open, and its claim is
/// deliberately leaked, logged as an error: it stays held, saying what it said
/// ("releasing" if the device is being removed), until the process exits and the kernel
/// drops the lock, which is also when the device is closed at the latest. Releasing it
/// earlier would tell other processes the device is free while this one still uses it.
/// The device's registry mark stays too (the registry may be shared and outlive the
/// bus), and its previous driver is not restored (that would wait for the close).
///
/// # Probes and removal requests
///
/// A probe can take long (an NVMe controller gets ready within CAP.TO, up to 127.5 s,
/// or never), and the kernel's removal of a device waits, holding the device lock,
/// until this process closes it. So a probe does not hold up the answer to a removal
/// request: each [`Driver::probe`] runs on a thread of its own, started for it and
/// joined before the call that started it returns ([`probe_all`](Self::probe_all),
/// [`probe`](Self::probe), or [`poll`](Self::poll) / [`wait`](Self::wait) for a device
/// that settled). Meanwhile the calling thread answers the request eventfds and BAR
/// faults of every device the bus has open, as `poll` does; the next `poll` or `wait`
/// returns what it did ([`BusEvent::Removed`], [`BusEvent::Released`],
/// [`BusEvent::Fault`]). Uevents wait
/// in the monitor until then. Probes run one at a time: [`probe_all`](Self::probe_all)
/// keeps its address order (a PF before its VFs), and the bus never has more than one
/// thread of its own.
///
/// Taking a device back needs its driver, which is away while it probes:
///
/// - A device of another driver is taken back as always, `remove` included.
/// - A device of the driver that is probing (a device it holds, or the one it probes
///   again) is revoked ([`DeviceBacking::revoke`]: every handle of it, the driver's
///   too, is dead from then on), closed, and released (claim and registry mark dropped)
///   at once ([`RemovedReport::revoked`]); [`Driver::remove`] is called for it when the
///   probe returns. The driver cannot use the device meanwhile, but it could not
///   anyway: the kernel wants it back.
/// - The device being probed is revoked, closed and released the same way, and the
///   probe is told ([`ProbeDevice::removal_requested`]). Whatever the probe answers,
///   the device is not bound ([`ProbeError::Removed`]); a driver that says
///   [`ProbeOutcome::Bound`] gets `remove` at once.
/// - A BAR fault that is not a removal (D3hot, memory decoding off) of a device of the
///   driver that is probing, the device being probed included, is reported
///   ([`BusEvent::Fault`]) but not told to the driver ([`Driver::fault`]): the driver
///   keeps the device, and finds its BAR reading all ones.
///
/// [`VfioBacking`](super::backing::VfioBacking) revokes through
/// [`VfioDevice::revoke`](crate::vfio::VfioDevice::revoke): mapped BAR areas are
/// replaced with all-ones memory and the device fd with an eventfd, so the kernel sees
/// the device closed. A backing that cannot be revoked (the default of
/// [`DeviceBacking::revoke`]; a VFIO device with a BAR area the full SIGBUS table does not
/// cover) cannot be closed while the driver holds handles of it. The bus then says "releasing" in the
/// claim and marks the device in the registry at once, so that scans keep away from it,
/// and closes it when the probe returns. That mark is not an answer for the kernel,
/// which waits for the close: such a device's removal waits for the probe, bounded only
/// by the driver (a probe of the device itself can end early on
/// [`ProbeDevice::removal_requested`]; a probe of another device has no such cue).
///
/// [`ProbeDevice::removal_requested`]: super::driver::ProbeDevice::removal_requested
pub struct Bus<A: Attach> {
    attach: A,
    drivers: Vec<Slot<A::Backing>>,
    selection: Selection,
    claims: Option<ClaimDir>,
    map: DeviceMap,
    held: BTreeMap<PciAddress, Held<A::Backing>>,
    // Added devices and when they may be probed.
    settling: BTreeMap<PciAddress, Instant>,
    settle: Duration,
    // Released on a request while still present: not probed again until re-added.
    held_off: BTreeSet<PciAddress>,
    // Taken back, but kept open by their driver: still claimed, not offered again.
    parked: BTreeMap<PciAddress, Parked<A::Backing>>,
    // This bus's view of the SIGBUS handler's faults, once the handler is installed.
    faults: Option<Subscriber>,
    // Subscribing failed (all slots taken) and was logged.
    faults_warned: bool,
    // What the bus did while a probe ran, for the next `poll`.
    queued: Vec<BusEvent>,
    // Removals answered while the driver was away probing, to finish when it is back.
    deferred: Vec<Deferred>,
    // The one fd for event loops, once asked for (`event_fd`).
    ready: Option<ReadyFd>,
    // The error (AER) eventfds of held devices (`super::errors`).
    errors: ErrorWatch,
}

impl<A: Attach> fmt::Debug for Bus<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Bus")
            .field(
                "drivers",
                &self.drivers.iter().map(|d| d.name.as_str()).collect::<Vec<_>>(),
            )
            .field("selection", &self.selection.to_string())
            .field("held", &self.held.keys().collect::<Vec<_>>())
            .field("releasing", &self.parked.keys().collect::<Vec<_>>())
            .field("settling", &self.settling)
            .finish_non_exhaustive()
    }
}

impl<A: Attach> Bus<A> {
    /// A bus over `map`'s devices, opening them with `attach`. Every device is admitted
    /// ([`Selection::everything`]); claims go to [`ClaimDir::for_claiming`] when the map
    /// reads the kernel's sysfs, and nowhere for a fake tree; settle delay
    /// [`DEFAULT_SETTLE`].
    pub fn new(map: DeviceMap, attach: A) -> Self {
        let claims = is_kernel_sysfs(map.scanner().root()).then(ClaimDir::for_claiming);
        Bus {
            attach,
            drivers: Vec::new(),
            selection: Selection::everything(),
            claims,
            map,
            held: BTreeMap::new(),
            settling: BTreeMap::new(),
            settle: DEFAULT_SETTLE,
            held_off: BTreeSet::new(),
            parked: BTreeMap::new(),
            faults: None,
            faults_warned: false,
            queued: Vec::new(),
            deferred: Vec::new(),
            ready: None,
            errors: ErrorWatch::default(),
        }
        .subscribed()
    }

    fn subscribed(mut self) -> Self {
        self.subscribe_faults();
        self
    }

    // Subscribes to the fault handler's reports once it is installed (the bus may be made
    // before `fault::install`). If every subscriber slot is taken, this is logged once and
    // tried again at each poll: meanwhile faults of held devices are not seen.
    fn subscribe_faults(&mut self) {
        if self.faults.is_some() || !fault::installed() {
            return;
        }
        match fault::subscribe() {
            Ok(s) => self.faults = Some(s),
            Err(e) if !self.faults_warned => {
                self.faults_warned = true;
                log::warn!("bus: BAR faults of held devices go unseen until a subscriber slot is free: {e}");
            }
            Err(_) => {}
        }
    }

    /// Offers only the devices `selection` admits, with its per-device arguments.
    pub fn selection(mut self, selection: Selection) -> Self {
        self.selection = selection;
        self
    }

    /// Claims devices in `dir` (`None`: takes no claims).
    pub fn claim_dir(mut self, dir: Option<ClaimDir>) -> Self {
        self.claims = dir;
        self
    }

    /// Waits this long after a device is added before offering it.
    pub fn settle(mut self, delay: Duration) -> Self {
        self.settle = delay;
        self
    }

    /// Registers a driver; drivers are asked in registration order. Drivers of any
    /// types (and per-device state types) can be registered with one bus.
    pub fn register<D: Driver<A::Backing>>(&mut self, driver: Box<D>) {
        self.drivers.push(Slot {
            name: Driver::name(driver.as_ref()).to_owned(),
            driver_type: TypeId::of::<D>(),
            driver: Some(driver),
        });
    }

    /// The first registered driver of type `D` (its settings, what it keeps across
    /// devices). Its state of each device is [`device_state`](Self::device_state)'s.
    pub fn driver_mut<D: Driver<A::Backing>>(&mut self) -> Option<&mut D> {
        self.drivers
            .iter_mut()
            .filter_map(|s| s.driver.as_mut())
            .find_map(|d| (d.as_mut() as &mut dyn Any).downcast_mut::<D>())
    }

    /// The state driver `D` keeps of the device at `address` (what its probe returned in
    /// [`ProbeOutcome::Bound`]): `None` unless a driver of type `D` holds the device. It
    /// is the state of the incarnation of the device the bus holds (see
    /// [`driver`](super::driver#per-device-state)).
    pub fn device_state<D: Driver<A::Backing>>(&self, address: PciAddress) -> Option<&D::Device> {
        let held = self.held.get(&address)?;
        (self.drivers[held.driver].driver_type == TypeId::of::<D>())
            .then(|| held.state.downcast_ref::<D::Device>())
            .flatten()
    }

    /// [`device_state`](Self::device_state), to change.
    pub fn device_state_mut<D: Driver<A::Backing>>(&mut self, address: PciAddress) -> Option<&mut D::Device> {
        let held = self.held.get_mut(&address)?;
        (self.drivers[held.driver].driver_type == TypeId::of::<D>())
            .then(|| held.state.downcast_mut::<D::Device>())
            .flatten()
    }

    /// The states of every device drivers of type `D` hold, in address order.
    pub fn device_states<D: Driver<A::Backing>>(&self) -> impl Iterator<Item = (PciAddress, &D::Device)> {
        self.held.iter().filter_map(|(a, h)| {
            (self.drivers[h.driver].driver_type == TypeId::of::<D>())
                .then(|| h.state.downcast_ref::<D::Device>())
                .flatten()
                .map(|s| (*a, s))
        })
    }

    /// The device map.
    pub fn map(&self) -> &DeviceMap {
        &self.map
    }

    /// The attach implementation.
    pub fn attacher(&self) -> &A {
        &self.attach
    }

    /// The devices drivers hold, with the driver's name, in address order.
    pub fn held(&self) -> Vec<(PciAddress, &str)> {
        self.held
            .iter()
            .map(|(a, h)| (*a, self.drivers[h.driver].name.as_str()))
            .collect()
    }

    /// The devices the bus let go of (taken back from their drivers, or taken by no
    /// driver when probed) that stay open because a driver kept handles of them
    /// ([`RemovedReport::leaked`], [`ProbeReport::leaked`]), with that driver's name, in
    /// address order. They stay claimed and are not offered to drivers until released
    /// ([`BusEvent::Released`]).
    pub fn releasing(&self) -> Vec<(PciAddress, &str)> {
        self.parked.iter().map(|(a, p)| (*a, p.driver.as_str())).collect()
    }

    /// The backing of a held device.
    pub fn backing(&self, address: PciAddress) -> Option<&A::Backing> {
        self.held.get(&address).map(|h| &h.attached.backing)
    }

    /// Offers every admitted device of the map that no driver holds (and, for drivers
    /// that ask, those they hold: [`Driver::probe_again`]) to the drivers, in address
    /// order. Devices no driver's table matches are skipped silently; the others get a
    /// report.
    ///
    /// Each probe runs on a thread of its own while this one answers removal requests
    /// and faults; what that did comes with the next [`poll`](Self::poll) (see
    /// [`Bus`](Bus#probes-and-removal-requests)).
    pub fn probe_all(&mut self) -> Vec<ProbeReport> {
        let reports = self.probe_all_unsynced();
        self.resync();
        reports
    }

    fn probe_all_unsynced(&mut self) -> Vec<ProbeReport> {
        let addresses: Vec<PciAddress> = self.map.iter().map(|r| r.address).collect();
        addresses.into_iter().filter_map(|a| self.probe_one(a)).collect()
    }

    /// Offers the device at `address` now (even if it is settling or held off). `None`
    /// if it is not in the map, not admitted, no driver's table matches it, or it is
    /// still open after its release ([`Bus::releasing`]). Removal requests are answered
    /// meanwhile, as in [`probe_all`](Self::probe_all).
    pub fn probe(&mut self, address: PciAddress) -> Option<ProbeReport> {
        let report = self.probe_unsynced(address);
        self.resync();
        report
    }

    fn probe_unsynced(&mut self, address: PciAddress) -> Option<ProbeReport> {
        self.settling.remove(&address);
        self.held_off.remove(&address);
        self.probe_one(address)
    }

    fn probe_one(&mut self, address: PciAddress) -> Option<ProbeReport> {
        if !self.selection.admits(address)
            || self.held_off.contains(&address)
            || self.settling.contains_key(&address)
            || self.parked.contains_key(&address)
        {
            return None;
        }
        let record = self.map.get(address)?.clone();
        if let Some(held) = self.held.get(&address) {
            let index = held.driver;
            let driver = self.drivers[index].driver.as_ref()?;
            if !driver.probe_again() {
                return None;
            }
            let id = *first_match(driver.id_table(), &record)?;
            let backing = held.attached.backing.clone();
            let name = self.drivers[index].name.clone();
            let (outcome, taken) = self.run_probe(index, &record, id, backing, true, None);
            return Some(ProbeReport {
                address,
                result: match (taken, outcome) {
                    // Taken back as any device of a driver that is probing (`take_back`):
                    // its old state went to `remove`; a new one is dropped here.
                    (Some(cause), _) => Err(ProbeError::Removed {
                        address,
                        driver: name,
                        cause,
                    }),
                    (None, ProbeOutcome::Bound(state)) => {
                        // The new state replaces the old, which is dropped (still bound).
                        if let Some(held) = self.held.get_mut(&address) {
                            drop(std::mem::replace(&mut held.state, state));
                        }
                        Ok(name)
                    }
                    (None, ProbeOutcome::NotMine) => Ok(name),
                    (None, ProbeOutcome::Failed(error)) => Err(ProbeError::Failed {
                        address,
                        driver: name,
                        error,
                    }),
                },
                leaked: 0,
            });
        }
        let candidates: Vec<(usize, _)> = self
            .drivers
            .iter()
            .enumerate()
            .filter_map(|(i, s)| {
                let table = s.driver.as_ref()?.id_table();
                first_match(table, &record).map(|e| (i, *e))
            })
            .collect();
        if candidates.is_empty() {
            return None;
        }
        let report = |result, leaked| {
            Some(ProbeReport {
                address,
                result,
                leaked,
            })
        };
        let claim = match &self.claims {
            // No driver named yet: the one that binds it is written in when it does. A VF's
            // PF is named now, for other processes' scans while it is being released.
            Some(dir) => match dir.claim(address, &ClaimInfo::new().physfn(record.physfn)) {
                Ok(c) => Some(c),
                Err(e) => return report(Err(e.into()), 0),
            },
            None => None,
        };
        let attached = match self.attach.attach(&record) {
            Ok(a) => a,
            Err(e) => return report(Err(e.into()), 0),
        };
        let attached_seqnum = uevent_seqnum(self.map.scanner().root());
        // DMA on, as DPDK does when it maps a device: without it the device's memory
        // accesses and its MSI/MSI-X messages never arrive (see
        // `DeviceBacking::set_bus_master`). A device that refuses is the driver's to find.
        if let Err(e) = attached.backing.set_bus_master(true) {
            log::warn!("{address}: turning bus mastering on failed: {e}");
        }
        let mut offered = Offered {
            attached: Some(attached),
            claim,
            marked: false,
        };
        let mut declined = Vec::new();
        let mut failure = None;
        let mut leaked = 0;
        // The last driver that kept handles after declining or failing.
        let mut keeper = None;
        for (n, (index, id)) in candidates.iter().enumerate() {
            let name = self.drivers[*index].name.clone();
            let Some(backing) = offered.attached.as_ref().map(|a| a.backing.clone()) else {
                break;
            };
            if n > 0 {
                // What the driver that declined did to the device (its registers, a pending
                // interrupt) is not the next one's to find.
                reset_between_probes(address, &backing);
            }
            let (outcome, taken) = self.run_probe(*index, &record, *id, backing, false, Some(&mut offered));
            if let Some(cause) = taken {
                return self.taken_while_offered(address, *index, outcome, cause, offered, leaked);
            }
            let Some(attached) = offered.attached.take() else {
                // Closed only when taken (above).
                break;
            };
            match outcome {
                ProbeOutcome::Bound(state) => {
                    if let Some(c) = &offered.claim
                        && let Err(e) = c.set_driver(&name)
                    {
                        log::warn!("{address}: could not name driver {name} in the claim: {e}");
                    }
                    self.errors.watch(address, &attached.backing);
                    self.held.insert(
                        address,
                        Held {
                            driver: *index,
                            attached,
                            state,
                            claim: offered.claim.take(),
                            attached_seqnum,
                        },
                    );
                    return report(Ok(name), leaked);
                }
                ProbeOutcome::NotMine => {
                    let n = kept(&name, address, &attached.backing, "declining");
                    offered.attached = Some(attached);
                    leaked += n;
                    if n > 0 {
                        keeper = Some(name.clone());
                    }
                    declined.push(name);
                }
                ProbeOutcome::Failed(error) => {
                    let n = kept(&name, address, &attached.backing, "failing");
                    offered.attached = Some(attached);
                    leaked += n;
                    if n > 0 {
                        keeper = Some(name.clone());
                    }
                    failure = Some(ProbeError::Failed {
                        address,
                        driver: name,
                        error,
                    });
                    break;
                }
            }
        }
        if let Some(attached) = offered.attached.take() {
            let parked = Parked {
                driver: keeper.clone().unwrap_or_default(),
                cause: None,
                attached,
                claim: offered.claim.take(),
                release: Release::Rollback,
                marked: false,
            };
            match keeper {
                // As after a removal: still open, so still claimed, and not rolled back yet.
                Some(driver) => {
                    log::warn!("{address}: stays claimed until the handles driver {driver} kept are dropped");
                    self.parked.insert(address, parked);
                }
                None => {
                    if let Some(e) = self.finish(address, parked) {
                        log::error!("{address}: undoing the attach after no driver took it failed: {e}");
                    }
                }
            }
        }
        report(
            Err(failure.unwrap_or(ProbeError::Declined { address, declined })),
            leaked,
        )
    }

    // The end of an offer whose device was taken back while driver `index` probed it:
    // the driver is told if it bound it, and the device, unless closed already (revoked),
    // is closed now, or parked if the driver keeps handles.
    fn taken_while_offered(
        &mut self,
        address: PciAddress,
        index: usize,
        outcome: ProbeOutcome<State>,
        cause: RemovalCause,
        mut offered: Offered<A::Backing>,
        mut leaked: usize,
    ) -> Option<ProbeReport> {
        let name = self.drivers[index].name.clone();
        match outcome {
            ProbeOutcome::Bound(state) => {
                if let Some(driver) = self.drivers[index].driver.as_mut() {
                    let removal = Removal {
                        address,
                        cause: cause.clone(),
                    };
                    // A panic is logged by `guarded`; the device goes regardless.
                    let _ = guarded(&name, "remove", address, || driver.remove(state, &removal));
                }
            }
            ProbeOutcome::NotMine => {}
            ProbeOutcome::Failed(e) => {
                log::info!("{address}: driver {name} failed to probe it after it was taken back: {e}")
            }
        }
        if let Some(attached) = offered.attached.take() {
            let n = kept(&name, address, &attached.backing, "its removal");
            leaked += n;
            let parked = Parked {
                driver: name.clone(),
                cause: Some(cause.clone()),
                attached,
                claim: offered.claim.take(),
                release: Release::Removal,
                marked: offered.marked,
            };
            if n > 0 {
                self.parked.insert(address, parked);
            } else if let Some(e) = self.finish(address, parked) {
                log::error!("{address}: closing it after it was taken back during its probe: {e}");
            }
        }
        Some(ProbeReport {
            address,
            result: Err(ProbeError::Removed {
                address,
                driver: name,
                cause,
            }),
            leaked,
        })
    }

    /// Takes `address` back from its driver in an orderly way ([`RemovalCause::Detach`]):
    /// the driver lets go, the device is closed, its previous driver is restored if the
    /// policy says so, and the claim is dropped. If the driver kept handles
    /// ([`RemovedReport::leaked`]), all but the first step wait until they are gone
    /// ([`Bus::releasing`]); a removal request meanwhile makes it a removal (the binding is
    /// then left alone).
    pub fn detach(&mut self, address: PciAddress) -> Result<RemovedReport, BusError> {
        let report = self.detach_unsynced(address);
        self.resync();
        report
    }

    fn detach_unsynced(&mut self, address: PciAddress) -> Result<RemovedReport, BusError> {
        self.take_back(address, RemovalCause::Detach)
            .ok_or(BusError::NotHeld(address))
    }

    // The one removal path.
    fn take_back(&mut self, address: PciAddress, cause: RemovalCause) -> Option<RemovedReport> {
        self.take_back_marked(address, cause, None)
    }

    // `take_back`, for a device already marked (`Some(whether the mark is the bus's)`)
    // or not (`None`).
    fn take_back_marked(
        &mut self,
        address: PciAddress,
        cause: RemovalCause,
        marked: Option<bool>,
    ) -> Option<RemovedReport> {
        let index = self.held.get(&address)?.driver;
        if self.drivers[index].driver.is_none() {
            return self.take_back_from_prober(address, cause);
        }
        let held = self.held.remove(&address)?;
        let marked = marked
            .unwrap_or_else(|| cause.is_removal() && self.mark_removal(address, held.claim.as_ref(), &cause));
        let slot = &mut self.drivers[index];
        let name = slot.name.clone();
        let removal = Removal {
            address,
            cause: cause.clone(),
        };
        let state = held.state;
        let panicked = slot
            .driver
            .as_mut()
            .and_then(|driver| guarded(&name, "remove", address, || driver.remove(state, &removal)).err());
        let leaked = kept(&name, address, &held.attached.backing, "its removal");
        // Handles kept for a removal would keep the kernel's removal waiting: they are
        // closed under the driver instead, if the backing can be revoked.
        let revoked = leaked > 0 && cause.is_removal() && revoke_kept(&name, address, &held.attached.backing);
        if cause == RemovalCause::Request && self.map.get(address).is_some() {
            self.held_off.insert(address);
        }
        let parked = Parked {
            driver: name.clone(),
            cause: Some(cause.clone()),
            attached: held.attached,
            claim: held.claim,
            release: if cause.is_removal() {
                Release::Removal
            } else {
                Release::Orderly
            },
            marked,
        };
        let error = if leaked > 0 && !revoked {
            // Releasing it now would tell every other process that the device is free
            // while it is open (and restoring its driver would wait for the close).
            log::warn!("{address}: stays claimed until the handles driver {name} kept are dropped");
            self.parked.insert(address, parked);
            None
        } else {
            self.finish(address, parked)
        };
        Some(RemovedReport {
            address,
            driver: name,
            cause,
            leaked,
            error,
            panicked,
            revoked,
        })
    }

    // Takes back a device whose driver is away probing (only removal requests and faults
    // are answered then): revoked, closed and released now, the driver told later; or,
    // if the backing cannot be revoked, marked now and taken back when the probe returns
    // (`None` then: nothing is done yet).
    fn take_back_from_prober(&mut self, address: PciAddress, cause: RemovalCause) -> Option<RemovedReport> {
        let pending = |d: &Deferred| matches!(d, Deferred::TakeBack { address: a, .. } if *a == address);
        if self.deferred.iter().any(pending) {
            // Asked again (the kernel repeats its request every 10 s): nothing new to do.
            return None;
        }
        let held = self.held.get(&address)?;
        let index = held.driver;
        let name = self.drivers[index].name.clone();
        let marked = cause.is_removal() && self.mark_removal(address, held.claim.as_ref(), &cause);
        if let Err(e) = held.attached.backing.revoke() {
            log::warn!(
                "{address}: driver {name} is probing, and the device cannot be closed under it ({e}): it is closed when the probe returns"
            );
            self.deferred.push(Deferred::TakeBack {
                address,
                cause,
                marked,
            });
            return None;
        }
        let held = self.held.remove(&address)?;
        if cause == RemovalCause::Request && self.map.get(address).is_some() {
            self.held_off.insert(address);
        }
        log::info!("{address}: revoked and closed ({cause}); driver {name} is told when its probe returns");
        let parked = Parked {
            driver: name.clone(),
            cause: Some(cause.clone()),
            attached: held.attached,
            claim: held.claim,
            release: if cause.is_removal() {
                Release::Removal
            } else {
                Release::Orderly
            },
            marked,
        };
        let error = self.finish(address, parked);
        self.deferred.push(Deferred::Tell {
            driver: index,
            address,
            cause: cause.clone(),
            state: held.state,
        });
        Some(RemovedReport {
            address,
            driver: name,
            cause,
            leaked: 0,
            error,
            panicked: None,
            revoked: true,
        })
    }

    // Finishes the removals answered while a probe ran, now that its driver is back.
    fn run_deferred(&mut self) {
        for deferred in std::mem::take(&mut self.deferred) {
            match deferred {
                Deferred::Tell {
                    driver,
                    address,
                    cause,
                    state,
                } => {
                    let slot = &mut self.drivers[driver];
                    let name = slot.name.as_str();
                    if let Some(d) = slot.driver.as_mut() {
                        let removal = Removal { address, cause };
                        // A panic is logged by `guarded`; handles it keeps are dead.
                        let _ = guarded(name, "remove", address, || d.remove(state, &removal));
                    }
                }
                Deferred::TakeBack {
                    address,
                    cause,
                    marked,
                } => {
                    if let Some(r) = self.take_back_marked(address, cause, Some(marked)) {
                        self.queued.push(BusEvent::Removed(r));
                    }
                }
            }
        }
    }

    // Says "releasing" in the claim and marks the device in the registry; whether the
    // mark is the bus's (to take back when the device is released).
    fn mark_removal(&self, address: PciAddress, claim: Option<&Claim>, cause: &RemovalCause) -> bool {
        if let Some(claim) = claim
            && let Err(e) = claim.mark_releasing(&cause.to_string())
        {
            log::warn!("{address}: could not say \"releasing\" in the claim: {e}");
        }
        let reason = match cause {
            RemovalCause::Request => Reason::RemovalRequested,
            RemovalCause::Uevent(_) => Reason::Uevent,
            other => Reason::Other(other.to_string()),
        };
        self.map.scanner().removal_registry().mark(address, reason)
    }

    // Ends the release of a device no driver holds a handle of: closes it, restores its
    // binding as `parked.release` says, drops the claim and the bus's registry mark.
    fn finish(&mut self, address: PciAddress, parked: Parked<A::Backing>) -> Option<AttachError> {
        let error = self.attach.detach(parked.attached, parked.release).err();
        release_claim(parked.claim);
        if parked.marked {
            self.map.scanner().removal_registry().release(address);
        }
        error
    }

    // Looks again at the devices drivers kept open: a request that fired for one taken
    // back in an orderly way makes its release a removal; one with no handle left is
    // released.
    fn poll_parked(&mut self, events: &mut Vec<BusEvent>) {
        let addresses: Vec<PciAddress> = self.parked.keys().copied().collect();
        for address in addresses {
            let Some(mut parked) = self.parked.remove(&address) else {
                continue;
            };
            let requested = parked
                .attached
                .request
                .as_ref()
                .is_some_and(|fd| drain_eventfd(fd.as_fd()));
            if requested && parked.release != Release::Removal {
                // The kernel wants it back while it is still open: a removal now.
                parked.release = Release::Removal;
                parked.marked |= self.mark_removal(address, parked.claim.as_ref(), &RemovalCause::Request);
            }
            // The kernel waits for the close: the kept handles are closed under their
            // owner if the backing can be revoked (as after `remove` for a removal).
            let revoked = requested
                && parked.attached.backing.extra_handles() > 0
                && revoke_kept(&parked.driver, address, &parked.attached.backing);
            if !revoked && parked.attached.backing.extra_handles() > 0 {
                self.parked.insert(address, parked);
                continue;
            }
            if !revoked {
                log::info!(
                    "{address}: the handles driver {} kept are gone: released",
                    parked.driver
                );
            }
            let driver = parked.driver.clone();
            let cause = parked.cause.clone();
            let error = self.finish(address, parked);
            events.push(BusEvent::Released(ReleasedReport {
                address,
                driver,
                cause,
                error,
            }));
        }
    }

    /// Handles what is ready without waiting: request eventfds that fired and BAR faults
    /// (each device is taken back, unless a fault finds it in D3hot or not decoding
    /// memory: [`BusEvent::Fault`]), devices kept open after their removal whose handles
    /// are gone (released), and settled devices (offered to the drivers). Returns too
    /// what the bus did while an earlier call probed (see
    /// [`Bus`](Bus#probes-and-removal-requests)).
    pub fn poll(&mut self) -> Vec<BusEvent> {
        let events = self.poll_unsynced();
        self.resync();
        events
    }

    fn poll_unsynced(&mut self) -> Vec<BusEvent> {
        self.subscribe_faults();
        let mut events = std::mem::take(&mut self.queued);
        self.answer(None, &mut events);
        let now = Instant::now();
        let due: Vec<PciAddress> = self
            .settling
            .iter()
            .filter(|(_, t)| **t <= now)
            .map(|(a, _)| *a)
            .collect();
        for address in due {
            self.settling.remove(&address);
            let report = self.probe_one(address);
            // What was answered during the probe happened before it ended.
            events.append(&mut self.queued);
            events.extend(report.map(BusEvent::Probed));
        }
        events
    }

    // Answers what fired: removal requests of held devices and BAR faults (each device is
    // taken back), and devices kept open whose handles are gone (released). `probing`:
    // the probe running meanwhile, whose device is not held yet (`worker`).
    fn answer(&mut self, mut probing: Option<&mut Probing<'_, A::Backing>>, events: &mut Vec<BusEvent>) {
        let requested: Vec<PciAddress> = self
            .held
            .iter()
            .filter(|(_, h)| {
                h.attached
                    .request
                    .as_ref()
                    .is_some_and(|fd| drain_eventfd(fd.as_fd()))
            })
            .map(|(a, _)| *a)
            .collect();
        for address in requested {
            self.take_for(address, RemovalCause::Request, probing.as_deref_mut(), events);
        }
        if let Some(p) = probing.as_deref_mut()
            && p.requested()
        {
            self.take_offered(p, RemovalCause::Request);
        }
        self.poll_faults(probing.as_deref_mut(), events);
        self.poll_errors(probing, events);
        self.poll_parked(events);
    }

    // Tells drivers of their devices' errors (AER) and does what they answer; a driver
    // away probing is told when it is back (`super::errors`).
    fn poll_errors(&mut self, mut probing: Option<&mut Probing<'_, A::Backing>>, events: &mut Vec<BusEvent>) {
        let held = &self.held;
        self.errors.retain(|a| held.contains_key(&a));
        let (drivers, held) = (&self.drivers, &self.held);
        let away = |a: PciAddress| held.get(&a).is_none_or(|h| drivers[h.driver].driver.is_none());
        for event in self.errors.take(away) {
            let address = event.address;
            let Some(index) = self.held.get(&address).map(|h| h.driver) else {
                continue;
            };
            let slot = &mut self.drivers[index];
            let name = slot.name.clone();
            let (Some(driver), Some(state)) = (
                slot.driver.as_mut(),
                self.held.get_mut(&address).map(|h| &mut h.state),
            ) else {
                continue;
            };
            log::warn!(
                "{address}: the device reported an error ({}x); telling driver {name}",
                event.count
            );
            let answer = guarded(&name, "error_detected", address, || {
                driver.error_detected(state, &event)
            });
            let (action, panicked) = match answer {
                Ok(action) => (action, None),
                Err(p) => (ErrorAction::Keep, Some(p)),
            };
            events.push(BusEvent::Error(ErrorReport {
                event,
                driver: name,
                action,
                panicked,
            }));
            if action == ErrorAction::Remove {
                self.take_for(address, RemovalCause::Error, probing.as_deref_mut(), events);
            }
        }
    }

    // Takes back the held devices whose BARs faulted, and the device being offered to the
    // probe running meanwhile (`probing`) if its BARs did, unless the device is only
    // powered down or not decoding (then its driver is told, unless it is away probing).
    // Faults of devices this bus has not opened are another owner's: other subscribers
    // see them whatever this bus does.
    fn poll_faults(&mut self, mut probing: Option<&mut Probing<'_, A::Backing>>, events: &mut Vec<BusEvent>) {
        let Some(subscriber) = self.faults.as_mut() else {
            return;
        };
        for fault in subscriber.take() {
            let address = fault.owner.address;
            let held = self.held.get(&address).map(|h| (h.driver, &h.attached.backing));
            let offered = probing
                .as_deref()
                .and_then(|p| p.offered_backing(address).map(|b| (p.driver(), b)));
            let Some((driver, backing)) = held.or(offered) else {
                continue;
            };
            let Some(reason) = self.not_a_removal(address, backing) else {
                self.take_for(address, RemovalCause::Fault, probing.as_deref_mut(), events);
                continue;
            };
            let fault = BarFault {
                address,
                region: fault.owner.region,
                offset_in_area: fault.offset_in_area,
                area_len: fault.area_len,
                reason,
            };
            let registered = &mut self.drivers[driver];
            let name = registered.name.clone();
            log::warn!(
                "{address}: BAR{} faulted ({reason}): not a removal; driver {name} keeps the device",
                fault.region
            );
            // A driver away on a probe is not told (the event still says it happened).
            let state = self.held.get_mut(&address).map(|h| &mut h.state);
            let panicked = match (registered.driver.as_mut(), state) {
                (Some(driver), Some(state)) => {
                    guarded(&name, "fault", address, || driver.fault(state, &fault)).err()
                }
                _ => None,
            };
            events.push(BusEvent::Fault(FaultReport {
                fault,
                driver: name,
                panicked,
            }));
        }
    }

    // Why a BAR fault of held (or offered) device `address` is not its removal, from what sysfs, the
    // registry and the device say; `None`: it is one. Takes no device lock (see
    // `super::fault`).
    fn not_a_removal(&self, address: PciAddress, backing: &A::Backing) -> Option<FaultReason> {
        let removal_pending = self.map.scanner().removal_registry().is_pending(address);
        let mut facts = FaultFacts {
            present: self.map.get(address).is_some(),
            removal_pending,
            ..FaultFacts::default()
        };
        if !facts.present || removal_pending {
            return facts.not_a_removal();
        }
        let power_state =
            std::fs::read_to_string(self.map.scanner().root().device_dir(address).join("power_state")).ok();
        facts.present = power_state.is_some();
        facts.power_state = power_state.as_deref();
        // Not in D3hot: a VFIO config access would wake a device from runtime low power.
        if !facts.power_state.is_some_and(is_d3hot) {
            let mut command = [0u8; 2];
            facts.memory_decoding = backing
                .read_config(COMMAND, &mut command)
                .ok()
                .map(|()| u16::from_le_bytes(command) & COMMAND_MEMORY != 0);
        }
        facts.not_a_removal()
    }

    /// Applies a monitor event: updates the map (one device read per uevent, a full scan
    /// on overflow), takes back held devices that are gone or lost their binding, and
    /// schedules added devices for probing after the settle delay.
    pub fn handle(&mut self, event: &Event) -> Result<Vec<BusEvent>, BusError> {
        let events = self.handle_unsynced(event);
        self.resync();
        events
    }

    fn handle_unsynced(&mut self, event: &Event) -> Result<Vec<BusEvent>, BusError> {
        let mut events = Vec::new();
        match event {
            Event::Overflow => {
                let changes = self.rescan_into(&mut events)?;
                events.push(BusEvent::Resynced(changes));
            }
            Event::Uevent(u) => self.handle_uevent(u, &mut events)?,
        }
        Ok(events)
    }

    // The map rebuilt by one scan, and what changed applied as uevents would have been.
    pub(super) fn rescan_into(&mut self, events: &mut Vec<BusEvent>) -> Result<Vec<Change>, BusError> {
        let changes = self.map.resync()?;
        for change in &changes {
            match *change {
                Change::Removed(a) => self.gone(a, RemovalCause::Uevent(Action::Remove), events),
                Change::Added(a) => self.added(a),
                // The old device left unseen: what the bus held of it goes, and the new
                // one is offered like any added device.
                Change::Replaced(a) => {
                    self.gone(a, RemovalCause::Uevent(Action::Remove), events);
                    self.added(a);
                }
                _ => {}
            }
        }
        self.take_unbound(events);
        Ok(changes)
    }

    fn handle_uevent(&mut self, u: &Uevent, events: &mut Vec<BusEvent>) -> Result<(), BusError> {
        let change = self.map.apply(u)?;
        if change != Change::NotPci && change != Change::Unchanged {
            events.push(BusEvent::Map(change));
        }
        let Some(address) = u.pci_address().filter(|_| u.is_pci()) else {
            return Ok(());
        };
        match (&u.action, change) {
            // A synthetic `remove` counts only if the device is really gone (the map said so).
            (Action::Remove, _) if !u.is_synthetic() => {
                self.gone(address, RemovalCause::Uevent(u.action.clone()), events)
            }
            (_, Change::Removed(_)) => self.gone(address, RemovalCause::Uevent(u.action.clone()), events),
            (_, Change::Replaced(_)) => {
                self.gone(address, RemovalCause::Uevent(Action::Remove), events);
                self.added(address);
            }
            (Action::Add, _) => self.added(address),
            // A device released on a request while present comes back when it is bound
            // again to what the bus opens it through (an operator's bind to vfio-pci).
            (Action::Bind, _)
                if self.held_off.contains(&address)
                    && self
                        .map
                        .get(address)
                        .is_some_and(|r| self.attach.still_attached(r)) =>
            {
                self.held_off.remove(&address);
                self.added(address);
            }
            // The unbind from the driver the device had before the bus attached it is
            // queued from the attach itself: taken as news it would release the device,
            // and, handled while a removal is starting (the kernel removes the `driver`
            // link before the request reaches this process), as an unbind instead of the
            // removal request it is.
            (Action::Unbind, _) if self.held.get(&address).is_some_and(|h| h.predates(u)) => {}
            (Action::Unbind, _) if self.held.contains_key(&address) && !self.still_attached(address) => {
                events.extend(
                    self.take_back(address, RemovalCause::Uevent(Action::Unbind))
                        .map(BusEvent::Removed),
                );
            }
            _ => {}
        }
        Ok(())
    }

    fn gone(&mut self, address: PciAddress, cause: RemovalCause, events: &mut Vec<BusEvent>) {
        self.settling.remove(&address);
        // Re-added later: probed again.
        self.held_off.remove(&address);
        events.extend(self.take_back(address, cause).map(BusEvent::Removed));
    }

    fn added(&mut self, address: PciAddress) {
        if self.selection.admits(address)
            && !self.held.contains_key(&address)
            && !self.parked.contains_key(&address)
        {
            self.held_off.remove(&address);
            self.settling.insert(address, Instant::now() + self.settle);
        }
    }

    // Whether a held device is still on the binding it was opened through, as the map
    // says.
    fn still_attached(&self, address: PciAddress) -> bool {
        self.map
            .get(address)
            .is_some_and(|r| self.attach.still_attached(r))
    }

    fn take_unbound(&mut self, events: &mut Vec<BusEvent>) {
        let lost: Vec<PciAddress> = self
            .held
            .keys()
            .copied()
            .filter(|a| !self.still_attached(*a))
            .collect();
        for address in lost {
            events.extend(
                self.take_back(address, RemovalCause::Uevent(Action::Unbind))
                    .map(BusEvent::Removed),
            );
        }
    }

    /// The pollable fds of held devices and of devices kept open after their removal
    /// (their request eventfds) and the bus's subscription to the fault handler's reports
    /// ([`fault::subscribe`], once [`fault::install`] was called): wait for any to be
    /// readable, then call [`poll`](Self::poll).
    pub fn fds(&self) -> Vec<BorrowedFd<'_>> {
        self.held
            .values()
            .filter_map(|h| h.attached.request_fd())
            .chain(self.parked.values().filter_map(|p| p.attached.request_fd()))
            .chain(self.faults.as_ref().map(|s| s.as_fd()))
            .chain(self.errors.fds(|a| self.held.contains_key(&a)))
            .collect()
    }

    /// One file descriptor that is readable whenever the bus has something to do: a
    /// removal request or a fault on any device it has (however many come and go), or
    /// its [`next_deadline`](Self::next_deadline) passed. An event loop (epoll, mio,
    /// tokio's `AsyncFd`) registers it once, with the hotplug monitor's fd beside it,
    /// and calls [`poll`](Self::poll) (or [`handle`](Self::handle) for the monitor's
    /// events) when it is readable; every call of the bus that changes what it waits for
    /// brings the set up to date before it returns. It is an epoll fd (epoll fds nest)
    /// made at the first call; it stays the same for the bus's life.
    pub fn event_fd(&mut self) -> Result<BorrowedFd<'_>, BusError> {
        self.subscribe_faults();
        let mut ready = match self.ready.take() {
            Some(r) => r,
            None => ReadyFd::new().map_err(BusError::Poll)?,
        };
        let synced = ready.sync(&self.fds(), self.next_deadline());
        let ready = self.ready.insert(ready);
        synced.map_err(BusError::Poll)?;
        Ok(ready.fd())
    }

    // Brings the event fd's set up to date, if there is one.
    fn resync(&mut self) {
        let Some(mut ready) = self.ready.take() else {
            return;
        };
        if let Err(e) = ready.sync(&self.fds(), self.next_deadline()) {
            log::error!("bringing the bus's event fd up to date failed: {e}");
        }
        self.ready = Some(ready);
    }

    /// When the bus next has something to do without an fd becoming readable (a timeout
    /// for an event loop): a settling device is due, or, while a device is kept open
    /// after its removal ([`releasing`](Self::releasing)), [`RELEASE_RECHECK`] from now
    /// (nothing signals that its handles are gone; [`poll`](Self::poll) looks), or now
    /// if a probe left events for `poll` to return.
    pub fn next_deadline(&self) -> Option<Instant> {
        let now = Instant::now();
        // Events of removals answered during a probe are due at once.
        let queued = (!self.queued.is_empty()).then_some(now);
        let recheck = (!self.parked.is_empty()).then(|| now + RELEASE_RECHECK);
        self.settling.values().copied().chain(recheck).chain(queued).min()
    }

    /// Waits up to `timeout` for something to do (an event from `monitor`, a request, a
    /// fault, a settled device), does it, and returns what happened (possibly nothing).
    /// `monitor` is a [`UeventMonitor`](crate::hotplug::monitor::UeventMonitor) (or, with
    /// feature `udev`, a `UdevMonitor`); `None` waits for requests, faults and settling
    /// devices only.
    pub fn wait(
        &mut self,
        monitor: Option<&mut dyn EventSource>,
        timeout: Duration,
    ) -> Result<Vec<BusEvent>, BusError> {
        self.subscribe_faults();
        let now = Instant::now();
        let until = self
            .next_deadline()
            .map_or(now + timeout, |d| d.min(now + timeout));
        {
            let mut fds: Vec<PollFd<'_>> = self
                .fds()
                .into_iter()
                .map(|fd| PollFd::new(fd, PollFlags::POLLIN))
                .collect();
            if let Some(m) = monitor.as_deref() {
                fds.push(PollFd::new(m.as_fd(), PollFlags::POLLIN));
            }
            let ms = until
                .saturating_duration_since(now)
                .as_millis()
                .min(i32::MAX as u128) as i32;
            match poll(&mut fds, PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX)) {
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(BusError::Poll(e.into())),
            }
        }
        // Requests and faults first: a removal in progress has already removed the
        // device's `driver` link (the kernel does that before the driver's remove, which
        // is what waits for this process), so a uevent handled first would take the device
        // back as "unbind" instead of as the request it is.
        let mut events = self.poll();
        if let Some(m) = monitor {
            while let Some(event) = m.try_next()? {
                events.extend(self.poll());
                events.extend(self.handle(&event)?);
            }
        }
        events.extend(self.poll());
        Ok(events)
    }
}

impl<A: Attach> Drop for Bus<A> {
    fn drop(&mut self) {
        let held: Vec<PciAddress> = self.held.keys().copied().collect();
        for address in held {
            if let Some(r) = self.take_back(address, RemovalCause::Detach)
                && let Some(e) = r.error
            {
                log::error!("{address}: releasing it as the bus ends: {e}");
            }
        }
        let mut events = Vec::new();
        self.poll_parked(&mut events);
        for event in events {
            if let BusEvent::Released(r) = event
                && let Some(e) = r.error
            {
                log::error!("{}: releasing it as the bus ends: {e}", r.address);
            }
        }
        for (address, parked) in std::mem::take(&mut self.parked) {
            log::error!(
                "{address}: still open as the bus ends ({} handle(s) of driver {} alive): its claim is kept until the process exits",
                parked.attached.backing.extra_handles(),
                parked.driver
            );
            // The lock goes with the process; the fd and the record are all that leak.
            std::mem::forget(parked.claim);
        }
    }
}

// Runs a driver's callback. A panic becomes an error carrying its message, so that what
// the bus does after the callback (the undo steps) still runs, and so that a panic in
// `remove` while an unwinding thread drops the bus does not abort the process.
fn guarded<T>(
    driver: &str,
    callback: &'static str,
    address: PciAddress,
    f: impl FnOnce() -> T,
) -> Result<T, DriverPanicked> {
    std::panic::catch_unwind(AssertUnwindSafe(f))
        .map_err(|payload| panicked(driver, callback, address, payload))
}

// A caught panic's payload as a `DriverPanicked`, logged.
fn panicked(
    driver: &str,
    callback: &'static str,
    address: PciAddress,
    payload: Box<dyn std::any::Any + Send>,
) -> DriverPanicked {
    let message = payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".to_owned());
    log::error!("{address}: driver {driver} panicked in {callback}: {message}");
    DriverPanicked {
        driver: driver.to_owned(),
        callback,
        message,
    }
}

// A reset between two drivers' probes of a device; then DMA on again, as before the first.
// The log says the method, or why there was none (`super::reset`).
fn reset_between_probes<B: DeviceBacking>(address: PciAddress, backing: &B) {
    match super::reset::reset_for_next_driver(address, backing) {
        Ok(done) => log::info!("{done}"),
        Err(why) => log::warn!("{why}"),
    }
}

// Revokes a device whose driver kept handles of it after `remove` for a removal (the
// kernel waits for the close): whether it is closed now.
fn revoke_kept<B: DeviceBacking>(driver: &str, address: PciAddress, backing: &B) -> bool {
    match backing.revoke() {
        Ok(()) => {
            log::warn!(
                "{address}: revoked under the handle(s) driver {driver} kept: they read all-ones and fail from now on; the device is closed"
            );
            true
        }
        Err(e) => {
            log::warn!(
                "{address}: the handle(s) driver {driver} kept cannot be revoked ({e}): it stays open"
            );
            false
        }
    }
}

// Handles of `backing` besides the bus's, logged as an error.
fn kept<B: DeviceBacking>(driver: &str, address: PciAddress, backing: &B, after: &str) -> usize {
    let n = backing.extra_handles();
    if n > 0 {
        log::error!(
            "{address}: driver {driver} kept {n} handle(s) of the device after {after}; it stays open"
        );
        for h in crate::vfio::holders::describe(address) {
            log::warn!("{address}: live handle: {h}");
        }
    }
    n
}

fn release_claim(claim: Option<Claim>) {
    if let Some(c) = claim {
        let address = c.address();
        if let Err(e) = c.release() {
            log::warn!("{address}: releasing the claim: {e}");
        }
    }
}

// Reads an eventfd without blocking: whether it had been signalled.
fn drain_eventfd(fd: BorrowedFd<'_>) -> bool {
    let mut buf = [0u8; 8];
    matches!(nix::unistd::read(fd, &mut buf), Ok(8) if u64::from_ne_bytes(buf) > 0)
}

#[cfg(all(test, feature = "testing"))]
mod tests {
    use std::io::Write;
    use std::os::fd::AsFd;

    use super::*;
    use crate::bus::driver::ProbeDevice;
    use crate::bus::id::{CLASS_EXACT, IdEntry};
    use crate::testing::FakeSysfs;
    use crate::testing::backing::{FakeAttach, FakeBacking, FakeRegisters};
    use crate::vfio::fault::{self, FaultOwner};
    use crate::vfio::mmio::MmioArea;
    use crate::{Scanner, SysfsRoot};

    // The causes of its removals, its table, the faults it was told of.
    struct Keep(Vec<RemovalCause>, [IdEntry; 1], Vec<BarFault>);

    impl Driver<FakeBacking> for Keep {
        type Device = FakeRegisters;

        fn name(&self) -> &str {
            "keep"
        }
        fn id_table(&self) -> &[IdEntry] {
            &self.1
        }
        fn probe(&mut self, device: ProbeDevice<'_, FakeBacking>) -> ProbeOutcome<FakeRegisters> {
            ProbeOutcome::Bound(device.backing.map_bar(0).unwrap())
        }
        fn remove(&mut self, _bar: FakeRegisters, removal: &Removal) {
            self.0.push(removal.cause.clone());
        }
        fn fault(&mut self, _bar: &mut FakeRegisters, fault: &BarFault) {
            self.2.push(*fault);
        }
    }

    // A bus over a fake tree holding one NVMe device at `name` with driver `Keep`.
    fn keeping_bus(name: &str) -> (FakeSysfs, Bus<FakeAttach>) {
        let fake = FakeSysfs::new().unwrap();
        fake.device(name).class(0x010802).create().unwrap();
        let map = DeviceMap::new(Scanner::new(SysfsRoot::new(fake.root())).no_claims()).unwrap();
        let mut bus = Bus::new(map, FakeAttach::new());
        bus.register(Box::new(Keep(
            Vec::new(),
            [IdEntry::class(0x010802, CLASS_EXACT)],
            Vec::new(),
        )));
        assert_eq!(bus.probe_all().len(), 1);
        (fake, bus)
    }

    // A file mapped as BAR 0 of `address`, then truncated and read: a fault, as a
    // surprise-removed device's BAR gives. The area is returned to be dropped by the
    // caller.
    fn fault_bar_of(address: PciAddress) -> MmioArea {
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&[0x5a; 4096]).unwrap();
        let bar = MmioArea::map(file.as_fd(), 0, 4096, FaultOwner { address, region: 0 }).unwrap();
        file.set_len(0).unwrap();
        assert_eq!(bar.read32(4), Some(u32::MAX));
        bar
    }

    // A driver whose probe finds its device's BAR faulting (a surprise removal during the
    // probe) and waits to see it taken back.
    struct FaultsInProbe([IdEntry; 1], Vec<RemovalCause>);

    impl Driver<FakeBacking> for FaultsInProbe {
        type Device = ();
        fn name(&self) -> &str {
            "faults-in-probe"
        }
        fn id_table(&self) -> &[IdEntry] {
            &self.0
        }
        fn probe(&mut self, device: ProbeDevice<'_, FakeBacking>) -> ProbeOutcome {
            drop(fault_bar_of(device.record.address));
            let start = Instant::now();
            while !device.removal_requested() && start.elapsed() < Duration::from_secs(10) {
                std::thread::sleep(Duration::from_millis(5));
            }
            // Bound regardless: the bus must not keep it.
            ProbeOutcome::Bound(())
        }
        fn remove(&mut self, _: (), removal: &Removal) {
            self.1.push(removal.cause.clone());
        }
    }

    // The device being probed is not held yet, but it is the bus's: a fault of its BAR
    // during the probe is answered meanwhile, as a removal request is.
    #[test]
    fn a_fault_of_the_device_being_probed_takes_it_back_during_the_probe() {
        let _serial = fault::tests::SERIAL.lock();
        fault::install().unwrap();
        let fake = FakeSysfs::new().unwrap();
        fake.device("0000:05:00.0").class(0x010802).create().unwrap();
        let map = DeviceMap::new(Scanner::new(SysfsRoot::new(fake.root())).no_claims()).unwrap();
        let mut bus = Bus::new(map, FakeAttach::new());
        bus.register(Box::new(FaultsInProbe(
            [IdEntry::class(0x010802, CLASS_EXACT)],
            Vec::new(),
        )));
        let address: PciAddress = "0000:05:00.0".parse().unwrap();
        let reports = bus.probe_all();
        let [report] = reports.as_slice() else {
            panic!("{reports:?}")
        };
        assert!(
            matches!(
                &report.result,
                Err(ProbeError::Removed { address: a, cause: RemovalCause::Fault, .. }) if *a == address
            ),
            "{report:?}"
        );
        assert!(bus.held().is_empty(), "not bound");
        let driver = bus.driver_mut::<FaultsInProbe>().unwrap();
        assert_eq!(driver.1, [RemovalCause::Fault], "told, as it said Bound");
    }

    // Two buses in one process (two parts of an application, or a bus and another
    // user of the fault handler): each learns of the faults of the devices it holds,
    // whichever polls first, and a bus that never polls keeps nobody from learning.
    #[test]
    fn a_fault_reaches_the_bus_holding_the_device_whichever_polls_first() {
        let _serial = fault::tests::SERIAL.lock();
        fault::install().unwrap();
        let (_fake_a, mut a) = keeping_bus("0000:05:00.0");
        let (_fake_b, mut b) = keeping_bus("0000:06:00.0");
        let (_fake_c, mut idle) = keeping_bus("0000:07:00.0");
        let of_a: PciAddress = "0000:05:00.0".parse().unwrap();
        let of_b: PciAddress = "0000:06:00.0".parse().unwrap();

        let bar = fault_bar_of(of_a);
        assert!(b.poll().is_empty(), "not b's device");
        let events = a.poll();
        let [BusEvent::Removed(r)] = events.as_slice() else {
            panic!("{events:?}")
        };
        assert_eq!((r.address, &r.cause), (of_a, &RemovalCause::Fault));
        drop(bar);

        // Now a is first; `idle` never polls.
        let bar = fault_bar_of(of_b);
        assert!(a.poll().is_empty(), "not a's device");
        let events = b.wait(None, Duration::from_secs(5)).unwrap();
        let [BusEvent::Removed(r)] = events.as_slice() else {
            panic!("{events:?}")
        };
        assert_eq!((r.address, &r.cause), (of_b, &RemovalCause::Fault));
        drop(bar);
        assert_eq!(idle.held().len(), 1);
        assert!(idle.poll().is_empty());
    }

    // A driver that put its device in D3hot and then touched a BAR gets a fault that is
    // not a removal: the driver is told, and keeps the device.
    #[test]
    fn a_fault_of_a_device_in_d3hot_is_not_a_removal() {
        let _serial = fault::tests::SERIAL.lock();
        fault::install().unwrap();
        let (fake, mut bus) = keeping_bus("0000:05:00.0");
        let address: PciAddress = "0000:05:00.0".parse().unwrap();
        let dir = fake.device_dir("0000:05:00.0").unwrap();
        fake.write(dir.join("power_state"), b"D3hot\n").unwrap();
        let bar = fault_bar_of(address);
        let events = bus.poll();
        let [BusEvent::Fault(r)] = events.as_slice() else {
            panic!("{events:?}")
        };
        let expected = BarFault {
            address,
            region: 0,
            offset_in_area: 4,
            area_len: 4096,
            reason: FaultReason::LowPower,
        };
        assert_eq!(
            (r.fault, r.driver.as_str(), &r.panicked),
            (expected, "keep", &None)
        );
        assert_eq!(bus.held().len(), 1, "still held");
        let driver = bus.driver_mut::<Keep>().unwrap();
        assert_eq!(driver.2, [expected]);
        assert!(driver.0.is_empty(), "not removed");
        drop(bar);

        // Back in D0, a fault is a removal again.
        fake.write(dir.join("power_state"), b"D0\n").unwrap();
        let bar = fault_bar_of(address);
        let events = bus.poll();
        assert!(
            matches!(events.as_slice(), [BusEvent::Removed(r)] if r.cause == RemovalCause::Fault),
            "{events:?}"
        );
        drop(bar);
    }

    #[test]
    fn a_fault_of_a_device_not_decoding_memory_is_not_a_removal() {
        let _serial = fault::tests::SERIAL.lock();
        fault::install().unwrap();
        let (_fake, mut bus) = keeping_bus("0000:05:00.0");
        let address: PciAddress = "0000:05:00.0".parse().unwrap();
        let device = bus.attacher().device(address).unwrap();
        device.write_config(COMMAND, &[0, 0]).unwrap();
        drop(device);
        let bar = fault_bar_of(address);
        let events = bus.poll();
        let [BusEvent::Fault(r)] = events.as_slice() else {
            panic!("{events:?}")
        };
        assert_eq!(r.fault.reason, FaultReason::DecodingOff);
        assert_eq!(bus.held().len(), 1);
        drop(bar);
    }

    // A device whose removal is pending is being removed, whatever its power state says.
    #[test]
    fn a_fault_of_a_device_whose_removal_is_pending_is_a_removal() {
        let _serial = fault::tests::SERIAL.lock();
        fault::install().unwrap();
        let (fake, mut bus) = keeping_bus("0000:05:00.0");
        let address: PciAddress = "0000:05:00.0".parse().unwrap();
        let dir = fake.device_dir("0000:05:00.0").unwrap();
        fake.write(dir.join("power_state"), b"D3hot\n").unwrap();
        bus.map()
            .scanner()
            .removal_registry()
            .mark(address, Reason::RemovalRequested);
        let bar = fault_bar_of(address);
        let events = bus.poll();
        assert!(
            matches!(events.as_slice(), [BusEvent::Removed(r)] if r.cause == RemovalCause::Fault),
            "{events:?}"
        );
        drop(bar);
    }

    // A fault on a mapped BAR reaches the driver through the same path as a request: the
    // fault handler records it, and the bus's next poll takes the device back. The BAR is
    // a mapped file truncated under it, which faults as a surprise-removed device does.
    #[test]
    fn a_bar_fault_takes_the_device_back() {
        let _serial = fault::tests::SERIAL.lock();
        fault::install().unwrap();
        let fake = FakeSysfs::new().unwrap();
        fake.device("0000:05:00.0").class(0x010802).create().unwrap();
        let address: PciAddress = "0000:05:00.0".parse().unwrap();
        let map = DeviceMap::new(Scanner::new(SysfsRoot::new(fake.root())).no_claims()).unwrap();
        let mut bus = Bus::new(map, FakeAttach::new());
        bus.register(Box::new(Keep(
            Vec::new(),
            [IdEntry::class(0x010802, CLASS_EXACT)],
            Vec::new(),
        )));
        assert_eq!(bus.probe_all().len(), 1);
        assert!(
            bus.fds().len() == 3,
            "the request eventfd, the fault eventfd and the device's error (AER) eventfd"
        );

        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&[0x5a; 8192]).unwrap();
        let bar = MmioArea::map(file.as_fd(), 0, 8192, FaultOwner { address, region: 0 }).unwrap();
        assert_eq!(bar.read32(0), Some(0x5a5a_5a5a));
        file.set_len(0).unwrap();
        assert_eq!(
            bar.read32(4),
            Some(u32::MAX),
            "the faulting read returns all-ones"
        );

        let events = bus.wait(None, Duration::from_secs(5)).unwrap();
        let [BusEvent::Removed(r)] = events.as_slice() else {
            panic!("{events:?}")
        };
        assert_eq!(
            (r.address, &r.cause, r.leaked),
            (address, &RemovalCause::Fault, 0)
        );
        let driver = bus.driver_mut::<Keep>().unwrap();
        assert_eq!(driver.0, [RemovalCause::Fault]);
        assert!(bus.held().is_empty());
        // A later fault of a device the bus does not hold is ignored.
        assert!(bus.poll().is_empty());
    }
}
