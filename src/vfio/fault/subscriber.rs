//! Who learns of faults: [`Subscriber`]s, each with its own eventfd and its own view of
//! the faults.
//!
//! The handler reports a fault to every subscriber live at that moment: it writes to each
//! one's eventfd, and the area's table slot keeps a bit per such subscriber until that
//! subscriber takes the fault ([`Subscriber::take`]) or goes away. So two users of the
//! handler in one process (two [`Bus`](crate::bus::Bus)es, a bus and an application's
//! own loop) each see every fault, whichever looks first, and one that never looks holds
//! only the slots of faulted areas, not the other's reports.
//!
//! Subscriber slots are a fixed array ([`SUBSCRIBERS`]), so the handler can walk them
//! with atomics. A slot's eventfd is made by its first subscriber and kept open for the
//! rest of the process, reused by later subscribers of the slot: the handler may write to
//! it just after its subscriber went away, and a closed fd number could by then be
//! another file. (At worst a new subscriber wakes once with nothing to take.)

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicI32, AtomicU32, Ordering};

use nix::libc;
use nix::sys::eventfd::{EfdFlags, EventFd};
use parking_lot::Mutex;

use super::{Fault, TABLE, installed};

/// How many [`Subscriber`]s may exist at once in a process.
pub const SUBSCRIBERS: usize = 16;

/// Why [`subscribe`] failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SubscribeError {
    /// Every subscriber slot is taken.
    #[error("all {SUBSCRIBERS} SIGBUS fault subscriber slots are taken")]
    Full,
    /// The subscriber's eventfd could not be created.
    #[error("eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC) for a SIGBUS fault subscriber failed")]
    Eventfd(#[source] io::Error),
}

/// Bit `i`: subscriber slot `i` is taken (by a live subscriber, or one going away).
static TAKEN: AtomicU32 = AtomicU32::new(0);
/// Bit `i`: slot `i`'s subscriber is live: the handler reports faults to it.
static LIVE: AtomicU32 = AtomicU32::new(0);
/// Each slot's eventfd, made by its first subscriber and never closed.
static EVENTS: [OnceLock<EventFd>; SUBSCRIBERS] = [const { OnceLock::new() }; SUBSCRIBERS];
/// Their numbers, for the handler (-1: not made yet).
static EVENT_FDS: [AtomicI32; SUBSCRIBERS] = [const { AtomicI32::new(-1) }; SUBSCRIBERS];

/// One user's view of the faults: the faults recorded while it lives, each reported
/// once to it ([`take`](Self::take)) whatever other subscribers take, and an eventfd
/// ([`AsFd`]) readable when there may be one to take. From [`subscribe`]; see the
/// [module docs](super).
///
/// The eventfd belongs to the subscriber's slot (one of [`SUBSCRIBERS`]) and is reused by
/// the slot's later subscribers, so the handler never writes to a closed fd: a new
/// subscriber may wake once with nothing to take.
///
/// # Dropping
///
/// Dropping it ends the subscription: faults it has not taken count as taken by it (a
/// faulted area's table slot is freed once every subscriber has taken its fault and the
/// area is dropped), and its slot is free for another subscriber. Its eventfd stays open
/// in the process, for the slot's next subscriber.
#[derive(Debug)]
pub struct Subscriber {
    index: usize,
}

/// Subscribes to the faults recorded from now on. Works before [`install`](super::install)
/// too (nothing faults without the handler). Fails when all [`SUBSCRIBERS`] slots are
/// taken.
pub fn subscribe() -> Result<Subscriber, SubscribeError> {
    let mut taken = TAKEN.load(Ordering::Relaxed);
    let index = loop {
        let index = (!taken).trailing_zeros() as usize;
        if index >= SUBSCRIBERS {
            return Err(SubscribeError::Full);
        }
        match TAKEN.compare_exchange_weak(taken, taken | 1 << index, Ordering::Acquire, Ordering::Relaxed) {
            Ok(_) => break index,
            Err(now) => taken = now,
        }
    };
    let efd = match EVENTS[index].get() {
        Some(efd) => efd,
        None => {
            let made = EventFd::from_value_and_flags(0, EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC);
            let efd = match made {
                Ok(efd) => efd,
                Err(e) => {
                    TAKEN.fetch_and(!(1 << index), Ordering::Release);
                    return Err(SubscribeError::Eventfd(e.into()));
                }
            };
            // The slot is ours: nobody else sets its eventfd.
            let efd = EVENTS[index].get_or_init(|| efd);
            EVENT_FDS[index].store(efd.as_raw_fd(), Ordering::Release);
            efd
        }
    };
    // A write meant for the slot's previous subscriber.
    drain(efd.as_fd());
    LIVE.fetch_or(1 << index, Ordering::SeqCst);
    Ok(Subscriber { index })
}

impl Subscriber {
    /// The faults recorded since this subscriber was made that it has not taken yet, each
    /// faulted area once, in no particular order. Drains the eventfd first, so a fault
    /// recorded while this runs leaves it readable again (at worst a later call returns
    /// nothing). Faults of areas dropped since are reported too.
    pub fn take(&mut self) -> Vec<Fault> {
        drain(self.as_fd());
        let mut out = Vec::new();
        TABLE.take(1 << self.index, &mut out);
        out
    }
}

impl AsFd for Subscriber {
    /// The subscriber's eventfd: readable after a fault (or, rarely, with nothing to
    /// take), for poll/epoll. Read the faults with [`take`](Self::take), which drains it.
    fn as_fd(&self) -> BorrowedFd<'_> {
        event_fd(self.index)
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        let bit = 1 << self.index;
        // First out of the handler's view, then out of every recorded fault (waiting for
        // one being recorded), so no fault keeps a bit of a subscriber that is gone.
        LIVE.fetch_and(!bit, Ordering::SeqCst);
        TABLE.forget(bit);
        TAKEN.fetch_and(!bit, Ordering::Release);
    }
}

/// Slot `index`'s eventfd, which lives as long as the process.
fn event_fd(index: usize) -> BorrowedFd<'static> {
    match EVENTS[index].get() {
        Some(efd) => efd.as_fd(),
        // A subscriber exists only once its slot's eventfd does.
        None => unreachable!("subscriber slot {index} without an eventfd"),
    }
}

/// The subscribers live now, as a mask for the table. Async-signal-safe.
pub(super) fn live() -> u32 {
    LIVE.load(Ordering::SeqCst)
}

/// Wakes the subscribers in `mask`. Async-signal-safe: atomics and write(2).
pub(super) fn notify(mask: u32) {
    for (index, fd) in EVENT_FDS.iter().enumerate() {
        let fd = fd.load(Ordering::Acquire);
        if mask & 1 << index == 0 || fd < 0 {
            continue;
        }
        let one = 1u64;
        // SAFETY: writes 8 bytes from a live local to an eventfd that stays open for the
        // rest of the process; write(2) is async-signal-safe.
        let _ = unsafe { libc::write(fd, (&raw const one).cast(), size_of::<u64>()) };
    }
}

// Reads an eventfd without blocking (EAGAIN when it was not signalled).
fn drain(fd: BorrowedFd<'_>) {
    let _ = nix::unistd::read(fd, &mut [0u8; 8]);
}

/// The process's default subscriber, behind [`events`] and [`take`]; made by the first of
/// them called after [`install`](super::install).
static DEFAULT: Mutex<Option<Subscriber>> = Mutex::new(None);

fn with_default<T>(f: impl FnOnce(&mut Subscriber) -> T) -> Option<T> {
    if !installed() {
        return None;
    }
    let mut default = DEFAULT.lock();
    if default.is_none() {
        match subscribe() {
            Ok(s) => *default = Some(s),
            Err(e) => {
                log::warn!("the default SIGBUS fault subscriber: {e}");
                return None;
            }
        }
    }
    default.as_mut().map(f)
}

/// Ends the default subscriber (tests: it would hold every later fault's slot).
#[cfg(test)]
pub(super) fn end_default() {
    DEFAULT.lock().take();
}

/// The default subscriber's eventfd, for poll/epoll: readable after a fault. `None`
/// before [`install`](super::install) (or if no subscriber slot is free, logged). Read
/// the faults with [`take`], which also drains it.
///
/// The default subscriber is for a process with one user of the handler; with several
/// (two buses, say), each should have its own ([`subscribe`]): faults taken here are
/// taken for every caller of `take`. It is made by the first call of this or [`take`]
/// after [`install`](super::install) and reports the faults from then on; once made, it
/// holds each faulted area's table slot until [`take`] reports it, so a process that
/// calls this must call [`take`].
pub fn events() -> Option<BorrowedFd<'static>> {
    with_default(|s| event_fd(s.index))
}

/// The default subscriber's faults not taken yet: [`Subscriber::take`] of the subscriber
/// behind [`events`] (see there for when it starts). Empty before
/// [`install`](super::install).
pub fn take() -> Vec<Fault> {
    with_default(Subscriber::take).unwrap_or_default()
}
