//! The driver side of the bus: [`Driver`], what probe receives ([`ProbeDevice`]) and
//! answers ([`ProbeOutcome`]), and why a device is taken back ([`Removal`]).
//!
//! A driver is generic over the [`DeviceBacking`] it drives, so the same driver runs on a
//! VFIO device and on an emulation.
//!
//! # Per-device state
//!
//! What a driver keeps of one device (clones of the backing, mapped BARs, DMA memory,
//! queues) is its [`Driver::Device`]: the probe returns it in [`ProbeOutcome::Bound`], the
//! bus keeps it with the device, and hands it back by value to [`Driver::remove`], so
//! the handles in it are dropped when `remove` returns (or unwinds) unless the driver
//! moves them elsewhere. The application reaches it, typed, through
//! [`Bus::device_state`](super::Bus::device_state) and
//! [`Bus::device_state_mut`](super::Bus::device_state_mut); the driver itself (shared
//! settings, counters) through [`Bus::driver_mut`](super::Bus::driver_mut).
//!
//! The state belongs to one incarnation of the device
//! ([`DeviceRecord::identity`](crate::record::DeviceRecord::identity)): the bus keeps it
//! as long as it holds the device it was probed for. A device removed and added again at
//! the same address, or replaced unseen ([`Change::Replaced`](super::map::Change::Replaced)),
//! is taken back first (its state goes to `remove`) and probed again as a new device,
//! whose probe makes a new state: the two never mix.
//!
//! A driver with nothing to keep per device says `type Device = ();` and binds with
//! `ProbeOutcome::Bound(())`.
//!
//! # Threads
//!
//! [`Driver::probe`] runs on a thread the bus starts for that one probe (named
//! `pcibus-probe`, joined before the bus call that started it returns: `probe_all`,
//! `probe`, or `poll` and `wait` for a device that settled), so that the thread that
//! called into the bus can answer removal requests meanwhile (see
//! [`Bus`](super::Bus#probes-and-removal-requests)). [`Driver::remove`] runs on the thread
//! that calls into the bus (`poll`, `handle`, `wait`, `detach`, dropping it, and the calls
//! that probe). Never two callbacks of one driver at once: a driver needs `Send`, not
//! `Sync`. Never in a signal handler.
//!
//! While a driver probes one device, a removal request for another device it holds is
//! answered without it when the device's backing can be revoked
//! ([`DeviceBacking::revoke`]): the bus closes the device under the driver's handles
//! (they read all-ones and fail from then on) and calls [`Driver::remove`] for it once
//! the probe returns. A probe can ask whether its own device was taken back meanwhile
//! ([`ProbeDevice::removal_requested`]); if it binds it anyway, `remove` follows at once.
//!
//! # Panics in drivers
//!
//! The bus runs [`Driver::probe`] and [`Driver::remove`] under
//! [`catch_unwind`](std::panic::catch_unwind): a panic in `probe` is a failed probe
//! ([`ProbeOutcome::Failed`] with a [`DriverPanicked`]), rolled back like any other; a
//! panic in `remove` ends the removal as if `remove` had returned (what the unwinding did
//! not drop counts as kept handles), and the report says so. Either way every step the
//! bus takes after the callback (closing the device, restoring its binding, dropping the
//! claim and the registry mark) still runs, and a panic in `remove` while the bus is
//! dropped by an unwinding thread does not abort the process. The driver stays
//! registered with whatever state the panic left it in. None of this applies to a
//! program built with `panic = "abort"`.

use std::any::Any;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};

use super::backing::DeviceBacking;
use super::devargs::DevArg;
use super::errors::{ErrorAction, ErrorEvent};
use super::fault::BarFault;
use super::id::IdEntry;
use crate::addr::PciAddress;
use crate::hotplug::event::Action;
use crate::record::DeviceRecord;

/// A driver's error, as the bus reports it.
pub type DriverError = Box<dyn std::error::Error + Send + Sync>;

/// A driver callback panicked; the bus caught it (see the [module docs](self#panics-in-drivers)).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{callback} panicked: {message}")]
#[non_exhaustive]
pub struct DriverPanicked {
    /// The driver.
    pub driver: String,
    /// The callback: `"probe"`, `"remove"`, `"fault"`, `"error_detected"` or
    /// `"sriov_configure"`.
    pub callback: &'static str,
    /// The panic's message (a payload that is not a string reads as
    /// `"(no message)"`).
    pub message: String,
}

/// A userspace PCI driver. See the [module docs](self).
///
/// ```
/// use pcibus::bus::{DeviceBacking, Driver, ProbeDevice, ProbeOutcome, Removal};
/// use pcibus::bus::id::{CLASS_EXACT, IdEntry};
///
/// struct Mine([IdEntry; 1]);
///
/// impl<B: DeviceBacking> Driver<B> for Mine {
///     // Kept per device by the bus; dropped when `remove` returns.
///     type Device = B;
///     fn name(&self) -> &str {
///         "mine"
///     }
///     fn id_table(&self) -> &[IdEntry] {
///         &self.0
///     }
///     fn probe(&mut self, device: ProbeDevice<'_, B>) -> ProbeOutcome<B> {
///         ProbeOutcome::Bound(device.backing.clone())
///     }
///     fn remove(&mut self, _device: B, _removal: &Removal) {}
/// }
/// ```
pub trait Driver<B: DeviceBacking>: Any + Send {
    /// What the driver keeps of one device it drives (its handles of the device, its
    /// queues, its bookkeeping): made by [`probe`](Self::probe), kept by the bus with the
    /// device, reached by the application through
    /// [`Bus::device_state`](super::Bus::device_state), and given back to
    /// [`remove`](Self::remove). See the [module docs](self#per-device-state).
    type Device: Send + 'static;

    /// The driver's name: in claims, reports and logs.
    fn name(&self) -> &str;

    /// The devices it may drive; the bus offers a device only if an entry matches it (the
    /// first matching entry is passed to [`probe`](Self::probe)).
    fn id_table(&self) -> &[IdEntry];

    /// Takes the device, or declines it.
    ///
    /// On [`ProbeOutcome::Bound`] the driver returns what it keeps of the device (clones
    /// of `device.backing`, mapped BARs, DMA memory) as its state, which comes back to
    /// [`remove`](Self::remove). On
    /// [`ProbeOutcome::NotMine`] and [`ProbeOutcome::Failed`] it must have dropped every
    /// handle of the device before returning: the bus then releases the device (closes
    /// it, puts the binding back, drops the claim). A kept handle is reported as a leak,
    /// and, if no driver binds the device, keeps it claimed and its release waiting until
    /// it is dropped ([`Bus::releasing`](super::Bus::releasing)).
    ///
    /// It runs on a probe thread while the bus answers removal requests (see the
    /// [module docs](self#threads)): a probe that waits for the device should look at
    /// [`ProbeDevice::removal_requested`] while it waits, and handles of this driver's
    /// other devices may be revoked under it meanwhile ([`DeviceBacking::revoke`]).
    ///
    /// A probe again ([`probe_again`](Self::probe_again), `device.again`) that binds
    /// replaces the device's state with the new one; the bus drops the old one (the
    /// device stays bound: no `remove`). One that declines or fails leaves the old state
    /// as it was. If the device is taken back during a probe again, its old state goes
    /// to `remove`, and a new one the probe returns is dropped.
    fn probe(&mut self, device: ProbeDevice<'_, B>) -> ProbeOutcome<Self::Device>;

    /// Gives the device back: stop using it and drop every handle of it before returning.
    /// Called once per bound device, whatever the [`RemovalCause`], with the state its
    /// probe returned (`device`): what it holds is dropped when `remove` returns, or
    /// unwinds. For [`RemovalCause::Request`] and the others that mean the device is
    /// going away, do not wait for the device (it may be gone): the kernel's removal
    /// waits for this process to close it.
    ///
    /// A handle kept after it returns (moved out of the state, or kept elsewhere: an I/O
    /// thread's clone) is reported ([`RemovedReport::leaked`](super::RemovedReport::leaked)).
    /// For a removal ([`RemovalCause::is_removal`]) the bus then revokes the device if its
    /// backing can be ([`DeviceBacking::revoke`]): the kept handles read all-ones, drop
    /// writes and fail with [`Gone`](super::BackingError::Gone) from then on, and the
    /// device is closed and released at once
    /// ([`RemovedReport::revoked`](super::RemovedReport::revoked)), so a leaked handle
    /// cannot hold up the kernel's removal. Otherwise (an orderly
    /// [`RemovalCause::Detach`], whose previous driver can be restored only once every
    /// handle is gone, or a backing that cannot be revoked) the device stays open: the
    /// bus keeps it claimed and does not release it before the handles are dropped
    /// ([`Bus::releasing`](super::Bus::releasing)), or, after a detach, before the
    /// kernel asks for it (a removal request: then it is revoked as above).
    ///
    /// For a device taken back while this driver was probing another one, `remove`
    /// comes when that probe returns, and the device may be closed already (revoked,
    /// [`RemovedReport::revoked`](super::RemovedReport::revoked)): its handles then read
    /// all-ones and fail; drop them all the same.
    fn remove(&mut self, device: Self::Device, removal: &Removal);

    /// A BAR of a device the driver holds faulted while the device is still there and not
    /// being removed: it is in D3hot, or its memory decoding is off (see
    /// [`FaultReason`](super::fault::FaultReason)), as after the driver powered it down
    /// and touched a register. The device stays the driver's. The mapped area that
    /// faulted reads all ones from now on and no longer reaches the device: drop that
    /// mapping, and map the BAR again once the device decodes again (back in D0, Memory
    /// Space Enable set). Default: nothing (the driver sees all-ones reads, and
    /// [`MappedBar::faulted`](crate::vfio::MappedBar::faulted)).
    ///
    /// A fault of a device that is gone (or whose state says nothing else) is a removal
    /// instead: [`remove`](Self::remove) with [`RemovalCause::Fault`].
    ///
    /// Not called for a fault answered while this driver is probing (it is away on the
    /// probe thread: see the [module docs](self#threads)), not even later: the bus reports
    /// it ([`BusEvent::Fault`](super::BusEvent::Fault)), and the driver finds the area
    /// [faulted](crate::vfio::MappedBar::faulted).
    ///
    /// `device` is the device's state.
    fn fault(&mut self, device: &mut Self::Device, fault: &BarFault) {
        let _ = (device, fault);
    }

    /// Whether [`Bus::probe_all`](super::Bus::probe_all) offers a device this driver
    /// already has to it again (DPDK's `RTE_PCI_DRV_PROBE_AGAIN`): for drivers that take
    /// new arguments on a second probe. Default: no, a bound device is not probed again.
    fn probe_again(&self) -> bool {
        false
    }

    /// The device reported an error (PCI Express AER, through VFIO's ERR eventfd, which
    /// the bus watches for every device it holds that has one: see
    /// [`super::errors`]). Answer whether to keep the device ([`ErrorAction::Keep`], the
    /// default: recover it as the driver sees fit, for example by a
    /// [`DeviceBacking::reset`]) or to give it up ([`ErrorAction::Remove`]: then
    /// [`remove`](Self::remove) follows with [`RemovalCause::Error`]). The bus reports it
    /// either way ([`BusEvent::Error`](super::BusEvent::Error)).
    fn error_detected(&mut self, device: &mut Self::Device, event: &ErrorEvent) -> ErrorAction {
        let _ = (device, event);
        ErrorAction::Keep
    }

    /// The application asks to change the number of VFs of `pf_state`'s device, a PF
    /// this driver holds, to `n` (0: remove them all), through
    /// [`Bus::set_vfs`](super::Bus::set_vfs): asked before any VF is created or removed.
    /// `Err` refuses, and nothing is changed; `Ok` agrees (prepare the PF for them: give
    /// the VFs their resources, for a device that shares them out). Not asked when the
    /// count is `n` already, nor when the bus refuses first (see `set_vfs`), nor again
    /// when a failed change is rolled back. Default: agrees.
    fn sriov_configure(&mut self, pf_state: &mut Self::Device, n: u16) -> Result<(), DriverError> {
        let _ = (pf_state, n);
        Ok(())
    }
}

/// What [`Driver::probe`] receives: the device's scan record, its devargs, the id entry
/// that matched, and the device itself, opened and claimed.
#[derive(Debug)]
#[non_exhaustive]
pub struct ProbeDevice<'a, B> {
    /// The device as the scan read it.
    pub record: &'a DeviceRecord,
    /// The device's arguments (`-a ADDR,key=value`), if the selection names it. Unknown
    /// keys are the driver's to reject ([`DevArg::reject_unknown`]).
    pub devarg: Option<&'a DevArg>,
    /// The id entry that matched.
    pub id: &'a IdEntry,
    /// The opened device. Clone it to keep it.
    pub backing: &'a B,
    /// Whether the driver already has this device (only for [`Driver::probe_again`]).
    pub again: bool,
    // Set by the bus when the device is taken back during the probe.
    pub(crate) removal: &'a AtomicBool,
}

impl<B> ProbeDevice<'_, B> {
    /// Whether the device was taken back while this probe runs (a removal request, a BAR
    /// fault): the kernel wants it, and the bus has closed it already if its backing can
    /// be revoked ([`DeviceBacking::revoke`]), or closes it when the probe returns. A
    /// probe that waits for the device (a controller getting ready) should look at it
    /// while it waits and give up: whatever it answers, the device is not bound, and a
    /// [`ProbeOutcome::Bound`] is followed by [`Driver::remove`] at once.
    pub fn removal_requested(&self) -> bool {
        self.removal.load(Ordering::Acquire)
    }
}

/// What a probe decided: for [`Bound`](Self::Bound), with the driver's state of the
/// device ([`Driver::Device`]; `()` for a driver that keeps none).
#[derive(Debug)]
pub enum ProbeOutcome<D = ()> {
    /// The driver drives the device now, and keeps this of it (given back to
    /// [`Driver::remove`]).
    Bound(D),
    /// Not a device for this driver (a model it does not support, a mode it does not
    /// handle): the bus offers it to the next driver whose table matches.
    NotMine,
    /// The driver tried and failed. Everything done for the probe is undone (the bus
    /// closes the device, restores its binding and drops its claim); no other driver is
    /// tried.
    Failed(DriverError),
}

/// Why a device is taken from its driver.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RemovalCause {
    /// VFIO's request interrupt: the kernel wants the device back (an unbind or a
    /// removal is waiting for this process to close it).
    Request,
    /// A uevent said the device is gone or lost its driver (`remove`, `unbind`).
    Uevent(Action),
    /// An access to a mapped BAR faulted (SIGBUS, surprise removal). Not when the device
    /// is still there in D3hot or with its memory decoding off: see [`Driver::fault`].
    Fault,
    /// The application detached it ([`Bus::detach`](super::Bus::detach), or the bus was
    /// dropped).
    Detach,
    /// The device reported an error and its driver gave it up
    /// ([`ErrorAction::Remove`]). Released as by a detach: its binding is restored.
    Error,
}

impl RemovalCause {
    /// Whether the device is going away (anything but an orderly detach): its binding is
    /// left alone then, and the claim says "releasing" while the driver lets go.
    pub fn is_removal(&self) -> bool {
        !matches!(self, RemovalCause::Detach | RemovalCause::Error)
    }
}

impl fmt::Display for RemovalCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RemovalCause::Request => f.write_str("vfio removal request"),
            RemovalCause::Uevent(action) => write!(f, "{action} uevent"),
            RemovalCause::Fault => f.write_str("BAR access fault"),
            RemovalCause::Detach => f.write_str("detached"),
            RemovalCause::Error => f.write_str("device error: its driver gave it up"),
        }
    }
}

/// A device being taken from its driver, as [`Driver::remove`] receives it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Removal {
    /// The device.
    pub address: PciAddress,
    /// Why.
    pub cause: RemovalCause,
}
