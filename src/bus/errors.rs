//! Errors a device reports (PCI Express AER, through VFIO's ERR eventfd), and what its
//! driver answers ([`Driver::error_detected`](super::driver::Driver::error_detected)).
//!
//! Once a driver binds a device, the bus routes the device's error notification to an
//! eventfd of its own ([`DeviceBacking::error_interrupt`]) where the backing has one
//! (VFIO: PCI Express devices; a conventional PCI device has none, and is simply not
//! watched). The eventfd is among [`Bus::fds`](super::Bus::fds) (so the bus's event fd
//! wakes for it); when it fires, [`Bus::poll`](super::Bus::poll) calls the driver's
//! `error_detected` and reports [`BusEvent::Error`](super::BusEvent::Error). The driver
//! answers with an [`ErrorAction`]: keep the device (the default: the driver recovers
//! it, for example with [`DeviceBacking::reset`]), or give it up, which takes it back as
//! [`RemovalCause::Error`](super::RemovalCause::Error) through the one removal path
//! (`remove`, then the device is closed and released with its binding restored, as an
//! orderly detach). Linux's AER recovery asks drivers more (mmio enabled, slot reset,
//! resume); this is the simple part of it.
//!
//! A driver that routes the error notification itself (its own `error_interrupt`)
//! takes it from the bus: VFIO has one ERR eventfd per device, and the last routing wins.
//! While a driver is away probing, an error of a device it holds is remembered and told
//! when the probe returns.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, BorrowedFd};

use super::backing::DeviceBacking;
use super::driver::DriverPanicked;
use super::interrupt::Interrupt;
use crate::addr::PciAddress;

/// An error the device reported, as [`Driver::error_detected`](super::driver::Driver::error_detected)
/// receives it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ErrorEvent {
    /// The device.
    pub address: PciAddress,
    /// How many error notifications arrived since the last one told (an eventfd counts
    /// them; at least 1).
    pub count: u64,
}

/// What a driver wants done with a device that reported an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum ErrorAction {
    /// The driver keeps the device (and recovers it as it sees fit). The default.
    #[default]
    Keep,
    /// Take the device from the driver: [`Driver::remove`](super::driver::Driver::remove)
    /// with [`RemovalCause::Error`](super::RemovalCause::Error), then it is closed and
    /// released (its previous binding restored), as by a detach.
    Remove,
}

/// What the bus did about a device's error ([`BusEvent::Error`](super::BusEvent::Error)).
#[derive(Debug)]
#[non_exhaustive]
pub struct ErrorReport {
    /// The device and how many notifications.
    pub event: ErrorEvent,
    /// The driver that holds it.
    pub driver: String,
    /// What the driver answered ([`ErrorAction::Keep`] if it panicked).
    pub action: ErrorAction,
    /// [`Driver::error_detected`](super::driver::Driver::error_detected) panicked.
    pub panicked: Option<DriverPanicked>,
}

/// The error eventfds of the devices the bus holds.
#[derive(Debug, Default)]
pub(crate) struct ErrorWatch {
    watched: BTreeMap<PciAddress, Watched>,
}

#[derive(Debug)]
struct Watched {
    interrupt: Interrupt,
    // Notifications drained while the driver was away probing, not told yet.
    pending: u64,
}

impl ErrorWatch {
    /// Routes `backing`'s error notification to a new eventfd and watches it; a backing
    /// without one (not PCI Express, or not supported) is not watched.
    pub(crate) fn watch<B: DeviceBacking>(&mut self, address: PciAddress, backing: &B) {
        match backing.error_interrupt() {
            Ok(interrupt) => {
                self.watched.insert(
                    address,
                    Watched {
                        interrupt,
                        pending: 0,
                    },
                );
            }
            Err(e) => {
                self.watched.remove(&address);
                log::debug!("{address}: its errors are not watched: {e}");
            }
        }
    }

    /// Stops watching the devices `keep` says no to (taken back meanwhile).
    pub(crate) fn retain(&mut self, keep: impl Fn(PciAddress) -> bool) {
        self.watched.retain(|a, _| keep(*a));
    }

    /// The eventfds of the devices `held` says are still held, for
    /// [`Bus::fds`](super::Bus::fds).
    pub(crate) fn fds(&self, held: impl Fn(PciAddress) -> bool) -> impl Iterator<Item = BorrowedFd<'_>> {
        self.watched
            .iter()
            .filter(move |(a, _)| held(**a))
            .map(|(_, w)| w.interrupt.as_fd())
    }

    /// Drains every eventfd; returns the devices with errors to tell now, and remembers
    /// the errors of those `away` says cannot be told yet.
    pub(crate) fn take(&mut self, away: impl Fn(PciAddress) -> bool) -> Vec<ErrorEvent> {
        let mut events = Vec::new();
        for (address, w) in &mut self.watched {
            w.pending += w.interrupt.take().unwrap_or(0);
            if w.pending > 0 && !away(*address) {
                events.push(ErrorEvent {
                    address: *address,
                    count: std::mem::take(&mut w.pending),
                });
            }
        }
        events
    }
}
