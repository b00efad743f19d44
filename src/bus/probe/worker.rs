//! A driver's probe on a thread of its own, and the removal requests the bus answers on
//! the calling thread meanwhile (see [`Bus`](super::Bus#probes-and-removal-requests)).
//!
//! The probe thread is scoped: it borrows the probe's arguments and the driver, and is
//! joined before [`Bus::run_probe`] returns, so a bus never has more than one thread of
//! its own, and none outlives the call that probes. The driver is taken out of its slot
//! for the probe (the bus cannot call its `remove` meanwhile) and put back after.

use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::ScopedJoinHandle;
use std::time::Duration;

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::eventfd::{EfdFlags, EventFd};
use parking_lot::Mutex;

use super::erased::State;
use super::{Bus, BusEvent, Parked, RELEASE_RECHECK, drain_eventfd, guarded, panicked};
use crate::addr::PciAddress;
use crate::bus::attach::{Attach, Attached, Release};
use crate::bus::backing::DeviceBacking;
use crate::bus::driver::{ProbeDevice, ProbeOutcome, RemovalCause};
use crate::bus::id::IdEntry;
use crate::record::DeviceRecord;
use crate::removal::claim::Claim;

/// How often the bus looks whether a probe ended, if it could not make an eventfd for
/// the probe thread to signal its end.
const PROBE_RECHECK: Duration = Duration::from_millis(10);

/// The longest the bus waits without looking whether the probe ended (its end is
/// signalled; this only bounds a missed signal).
const PROBE_WAKE: Duration = Duration::from_secs(1);

// A device offered to the drivers (`probe_one`): opened and claimed, not held yet.
pub(super) struct Offered<B> {
    // `None` once closed: revoked and closed because it was taken back during a probe.
    pub(super) attached: Option<Attached<B>>,
    pub(super) claim: Option<Claim>,
    // The bus marked it in the registry when it was taken back (and unmarks it when it
    // closes it).
    pub(super) marked: bool,
}

// The probe running while the bus answers requests.
pub(super) struct Probing<'p, B> {
    address: PciAddress,
    driver: usize,
    // What `ProbeDevice::removal_requested` reads.
    removal: &'p AtomicBool,
    // The device, if this is its first offer (a device probed again is held).
    offered: Option<&'p mut Offered<B>>,
    // Why the device was taken back during the probe, if it was.
    taken: Option<RemovalCause>,
}

impl<B> Probing<'_, B> {
    fn attached(&self) -> Option<&Attached<B>> {
        self.offered.as_ref().and_then(|o| o.attached.as_ref())
    }

    // The offered device's request eventfd, while it is open.
    fn request_fd(&self) -> Option<BorrowedFd<'_>> {
        self.attached().and_then(Attached::request_fd)
    }

    // The driver that probes.
    pub(super) fn driver(&self) -> usize {
        self.driver
    }

    // The backing of `address` if it is the device offered to this probe, while it is
    // open.
    pub(super) fn offered_backing(&self, address: PciAddress) -> Option<&B> {
        self.attached()
            .filter(|_| self.address == address)
            .map(|a| &a.backing)
    }

    // Whether the offered device's request eventfd fired (it is drained).
    pub(super) fn requested(&self) -> bool {
        self.request_fd().is_some_and(drain_eventfd)
    }
}

// Tells the bus thread that the probe thread is done, also if it unwinds.
struct Done<'a>(Option<&'a EventFd>);

impl Drop for Done<'_> {
    fn drop(&mut self) {
        if let Some(fd) = self.0 {
            // A failed write leaves the bus to find the end at its next look (PROBE_WAKE).
            let _ = fd.write(1);
        }
    }
}

impl<A: Attach> Bus<A> {
    // Runs driver `index`'s probe of `record`'s device on a thread of its own, answering
    // removal requests and faults on this one meanwhile. `backing` is the probe's handle of
    // the device (dropped before this returns); `offered` the device if it is not held
    // yet. Returns the driver's answer, and why the device was taken back during the
    // probe, if it was.
    pub(super) fn run_probe(
        &mut self,
        index: usize,
        record: &DeviceRecord,
        id: IdEntry,
        backing: A::Backing,
        again: bool,
        offered: Option<&mut Offered<A::Backing>>,
    ) -> (ProbeOutcome<State>, Option<RemovalCause>) {
        let address = record.address;
        let name = self.drivers[index].name.clone();
        let Some(driver) = self.drivers[index].driver.take() else {
            // Not reached: probes run one at a time, and each puts its driver back.
            return (
                ProbeOutcome::Failed(format!("driver {name} is already probing").into()),
                None,
            );
        };
        // Locked by the one probe, on one thread or the other: a way to lend the driver
        // to a closure that may run on either.
        let driver = Mutex::new(driver);
        let devarg = self.selection.devarg(address).cloned();
        let removal = AtomicBool::new(false);
        let done = EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
            .inspect_err(|e| {
                log::warn!(
                    "{address}: no eventfd to learn the probe's end ({e}): looking every {PROBE_RECHECK:?}"
                )
            })
            .ok();
        // Borrows only, so it can be called here if no thread can be started.
        let probe = || {
            let _done = Done(done.as_ref());
            let mut driver = driver.lock();
            let device = ProbeDevice {
                record,
                devarg: devarg.as_ref(),
                id: &id,
                backing: &backing,
                again,
                removal: &removal,
            };
            guarded(&name, "probe", address, || driver.probe(device))
                .unwrap_or_else(|p| ProbeOutcome::Failed(Box::new(p)))
        };
        let mut probing = Probing {
            address,
            driver: index,
            removal: &removal,
            offered,
            taken: None,
        };
        let outcome = std::thread::scope(|scope| {
            match std::thread::Builder::new()
                .name("pcibus-probe".into())
                .spawn_scoped(scope, probe)
            {
                Ok(worker) => {
                    self.answer_while(&worker, done.as_ref(), &mut probing);
                    worker.join().unwrap_or_else(|payload| {
                        ProbeOutcome::Failed(Box::new(panicked(&name, "probe", address, payload)))
                    })
                }
                Err(e) => {
                    log::warn!(
                        "{address}: no thread for the probe ({e}): it runs on the bus's thread, and removal requests wait for it"
                    );
                    probe()
                }
            }
        });
        let taken = probing.taken;
        self.drivers[index].driver = Some(driver.into_inner());
        // The probe's handle goes before anyone counts the handles left.
        drop(backing);
        self.run_deferred();
        (outcome, taken)
    }

    // Answers removal requests and faults (`answer`) until the probe thread ends.
    fn answer_while<T>(
        &mut self,
        worker: &ScopedJoinHandle<'_, T>,
        done: Option<&EventFd>,
        probing: &mut Probing<'_, A::Backing>,
    ) {
        while !worker.is_finished() {
            let wait = match done {
                None => PROBE_RECHECK,
                Some(_) if !self.parked.is_empty() => RELEASE_RECHECK,
                Some(_) => PROBE_WAKE,
            };
            {
                let mut fds: Vec<PollFd<'_>> = self
                    .fds()
                    .into_iter()
                    .chain(probing.request_fd())
                    .chain(done.map(AsFd::as_fd))
                    .map(|fd| PollFd::new(fd, PollFlags::POLLIN))
                    .collect();
                let ms = i32::try_from(wait.as_millis()).unwrap_or(i32::MAX);
                match poll(&mut fds, PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX)) {
                    Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                    Err(e) => {
                        log::warn!("bus: waiting for requests while a probe runs: {e}");
                        std::thread::sleep(PROBE_RECHECK);
                    }
                }
            }
            let mut events = Vec::new();
            self.answer(Some(probing), &mut events);
            self.queued.append(&mut events);
        }
    }

    // Takes `address` back for `cause`; with `probing`, knowing that a probe runs.
    pub(super) fn take_for(
        &mut self,
        address: PciAddress,
        cause: RemovalCause,
        probing: Option<&mut Probing<'_, A::Backing>>,
        events: &mut Vec<BusEvent>,
    ) {
        if let Some(p) = probing
            && p.address == address
        {
            if p.offered.is_some() {
                self.take_offered(p, cause);
                return;
            }
            // Probed again: held, and taken back as any device of a driver away probing.
            p.removal.store(true, Ordering::Release);
            p.taken.get_or_insert_with(|| cause.clone());
        }
        events.extend(self.take_back(address, cause).map(BusEvent::Removed));
    }

    // Takes back the device being offered while its probe runs: says so to the probe,
    // marks the device, and revokes, closes and releases it if its backing allows (else
    // it is closed when the probe returns: `taken_while_offered`).
    pub(super) fn take_offered(&mut self, p: &mut Probing<'_, A::Backing>, cause: RemovalCause) {
        p.removal.store(true, Ordering::Release);
        if p.taken.is_some() {
            // Answered already (the kernel repeats its request every 10 s).
            return;
        }
        let address = p.address;
        let name = self.drivers[p.driver].name.clone();
        let Some(offered) = p.offered.as_deref_mut() else {
            return;
        };
        p.taken = Some(cause.clone());
        offered.marked = cause.is_removal() && self.mark_removal(address, offered.claim.as_ref(), &cause);
        if cause == RemovalCause::Request && self.map.get(address).is_some() {
            self.held_off.insert(address);
        }
        let Some(attached) = offered.attached.as_ref() else {
            return;
        };
        if let Err(e) = attached.backing.revoke() {
            log::warn!(
                "{address}: taken back ({cause}) while driver {name} probes it, and it cannot be closed under the probe ({e}): it is closed when the probe returns"
            );
            return;
        }
        log::info!("{address}: taken back ({cause}) while driver {name} probes it: revoked and closed");
        if let Some(attached) = offered.attached.take() {
            let parked = Parked {
                driver: name,
                cause: Some(cause),
                attached,
                claim: offered.claim.take(),
                release: Release::Removal,
                marked: offered.marked,
            };
            if let Some(e) = self.finish(address, parked) {
                log::error!("{address}: closing it while its probe runs: {e}");
            }
        }
    }
}
