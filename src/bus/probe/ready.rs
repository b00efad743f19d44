//! One file descriptor for an event loop: readable whenever the bus has something to do.
//!
//! [`Bus::fds`](super::Bus::fds) changes as devices come and go (each held device has its
//! own request eventfd), and [`Bus::next_deadline`](super::Bus::next_deadline) is a time,
//! not an fd. An event loop built on epoll, mio or tokio wants to register once. The bus
//! keeps an epoll instance of its own holding its current fds and a timerfd armed at its
//! next deadline, and brings it up to date at the end of every call that changes what it
//! waits for; the loop registers the epoll fd once (epoll fds nest) and calls
//! [`Bus::poll`](super::Bus::poll) when it is readable.

use std::collections::BTreeSet;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::time::Instant;

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags};
use nix::sys::time::TimeSpec;
use nix::sys::timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags};

/// The bus's epoll set: its fds and a timer for its next deadline.
#[derive(Debug)]
pub(super) struct ReadyFd {
    epoll: Epoll,
    timer: TimerFd,
    // The fds (besides the timer's) registered at the last sync, by number.
    registered: BTreeSet<RawFd>,
}

const TIMER: u64 = u64::MAX;

impl ReadyFd {
    pub(super) fn new() -> io::Result<ReadyFd> {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
        let timer = TimerFd::new(
            ClockId::CLOCK_MONOTONIC,
            TimerFlags::TFD_CLOEXEC | TimerFlags::TFD_NONBLOCK,
        )?;
        epoll.add(&timer, EpollEvent::new(EpollFlags::EPOLLIN, TIMER))?;
        Ok(ReadyFd {
            epoll,
            timer,
            registered: BTreeSet::new(),
        })
    }

    pub(super) fn fd(&self) -> BorrowedFd<'_> {
        self.epoll.0.as_fd()
    }

    /// Makes the set hold exactly `fds` (plus the timer), armed for `deadline`.
    ///
    /// An fd is known by its number only; a number that now names another file (the old
    /// one was closed and the number reused) is modified or added again rather than
    /// trusted, since closing a file removes it from every epoll set on its own.
    pub(super) fn sync(&mut self, fds: &[BorrowedFd<'_>], deadline: Option<Instant>) -> io::Result<()> {
        let now: BTreeSet<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
        for gone in self.registered.difference(&now) {
            // Closed already (ENOENT, EBADF) is what usually happened: nothing to undo. The
            // number is only passed to the kernel (nix's typed `delete` wants an fd this
            // code no longer has).
            #[allow(deprecated)]
            let _ = nix::sys::epoll::epoll_ctl(
                self.epoll.0.as_raw_fd(),
                nix::sys::epoll::EpollOp::EpollCtlDel,
                *gone,
                None,
            );
        }
        for fd in fds {
            let event = EpollEvent::new(EpollFlags::EPOLLIN, fd.as_raw_fd() as u64);
            let mut again = event;
            match self.epoll.modify(fd, &mut again) {
                Ok(()) => {}
                Err(nix::errno::Errno::ENOENT) => self.epoll.add(fd, event)?,
                Err(e) => return Err(e.into()),
            }
        }
        self.registered = now;
        match deadline {
            None => self.timer.unset()?,
            Some(at) => {
                // Due now or in the past: the smallest interval the timer takes, so the set
                // is readable at once.
                let after = at
                    .saturating_duration_since(Instant::now())
                    .max(std::time::Duration::from_nanos(1));
                self.timer.set(
                    Expiration::OneShot(TimeSpec::from_duration(after)),
                    TimerSetTimeFlags::empty(),
                )?;
            }
        }
        Ok(())
    }
}
