//! The kernel uevent socket: a pollable [`UeventMonitor`].
//!
//! One `NETLINK_KOBJECT_UEVENT` datagram socket bound to the kernel's multicast group 1.
//! It runs nothing on its own: the caller polls its fd (epoll, mio, tokio's `AsyncFd`) or
//! calls [`UeventMonitor::next_timeout`], and events are handled on the caller's thread.
//! No callback ever runs on a hidden thread or in a signal handler (DPDK's interrupt-thread
//! callbacks are what this avoids).
//!
//! # Overflow
//!
//! When events arrive faster than they are read (SR-IOV enabling 64 VFs emits hundreds),
//! the kernel drops what does not fit in the receive buffer and reports it once with
//! `ENOBUFS`. [`UeventMonitor::try_next`] turns that into [`Event::Overflow`]: events
//! have been lost and the caller must resynchronise with one full scan of the bus; the
//! events after it are received normally. The buffer is raised to [`RCVBUF_WANTED`] at
//! open to make this rare.
//!
//! # Dropping
//!
//! Dropping the monitor closes the socket; events queued in it are discarded. Nothing
//! else is held: no thread, no file, no kernel state outlives it. Remove its fd from any
//! epoll set or event loop before dropping it, as with any fd.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::socket::{
    AddressFamily, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, getsockopt, recvfrom, setsockopt,
    socket, sockopt,
};

use crate::hotplug::event::{Datagram, UEVENT_MSG_MAX, Uevent, parse_datagram};

/// The receive buffer asked for at open: 4 MiB, room for thousands of events.
pub const RCVBUF_WANTED: usize = 4 << 20;

/// The kernel's multicast group for uevents (`UEVENT_KERNEL` ... group 1).
const KERNEL_GROUP: u32 = 1;

/// What [`UeventMonitor::try_next`] returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A kernel uevent.
    Uevent(Uevent),
    /// The kernel dropped events (`ENOBUFS`): what is known about the bus may be stale;
    /// resynchronise with one full scan.
    Overflow,
}

/// Why the monitor could not be opened or read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MonitorError {
    /// A step of opening the socket failed (`socket`, `bind`, ...).
    #[error("uevent monitor: {step} failed")]
    Open {
        /// The system call that failed.
        step: &'static str,
        /// Its error (`EPERM`, `EAFNOSUPPORT`, ...).
        #[source]
        source: io::Error,
    },
    /// Receiving or waiting failed with something other than `EAGAIN`/`ENOBUFS`/`EINTR`.
    #[error("uevent monitor: {step} failed")]
    Receive {
        /// `recvfrom` or `poll`.
        step: &'static str,
        /// Its error.
        #[source]
        source: io::Error,
    },
}

fn open_err(step: &'static str) -> impl FnOnce(Errno) -> MonitorError {
    move |e| MonitorError::Open {
        step,
        source: io::Error::from(e),
    }
}

/// Counts of datagrams the monitor received but did not return.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Skipped {
    /// Messages relayed by udev (`libudev` magic).
    pub udev: u64,
    /// Messages whose sender is not the kernel (netlink port id not 0).
    pub foreign: u64,
    /// Messages that did not parse (each is logged with `log::warn!`).
    pub malformed: u64,
    /// Valid events left out by [`UeventMonitor::pci_only`].
    pub filtered: u64,
}

/// A socket receiving the kernel's uevents. See the [module docs](self) for overflow and
/// dropping.
///
/// ```no_run
/// use std::time::Duration;
/// use pcibus::hotplug::monitor::{Event, UeventMonitor};
///
/// let mut mon = UeventMonitor::open()?.pci_only(true);
/// while let Some(event) = mon.next_timeout(Duration::from_secs(1))? {
///     match event {
///         Event::Uevent(ev) => println!("{} {:?}", ev.action, ev.pci_address()),
///         Event::Overflow => println!("events lost: rescan"),
///     }
/// }
/// # Ok::<(), pcibus::hotplug::monitor::MonitorError>(())
/// ```
#[derive(Debug)]
pub struct UeventMonitor {
    fd: OwnedFd,
    buf: Vec<u8>,
    pci_only: bool,
    skipped: Skipped,
}

impl UeventMonitor {
    /// Opens a non-blocking, close-on-exec `NETLINK_KOBJECT_UEVENT` datagram socket bound
    /// to the kernel's group, and raises its receive buffer: `SO_RCVBUFFORCE` to
    /// [`RCVBUF_WANTED`] (needs `CAP_NET_ADMIN`), else `SO_RCVBUF` (capped by
    /// `net.core.rmem_max`); `log::debug!` says which worked and the size granted.
    ///
    /// Listening needs no privilege, but the kernel only delivers its uevents to sockets
    /// of network namespaces owned by the initial user namespace: in a rootless container
    /// the socket opens and stays silent.
    pub fn open() -> Result<UeventMonitor, MonitorError> {
        UeventMonitor::open_with_buffer(RCVBUF_WANTED)
    }

    /// [`open`](Self::open) asking for a receive buffer of `bytes` instead of
    /// [`RCVBUF_WANTED`] (the kernel doubles the value for its bookkeeping and enforces a
    /// minimum of a few KiB). A small buffer overflows sooner: tests use it to provoke
    /// [`Event::Overflow`].
    pub fn open_with_buffer(bytes: usize) -> Result<UeventMonitor, MonitorError> {
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Datagram,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkKObjectUEvent,
        )
        .map_err(open_err("socket(NETLINK_KOBJECT_UEVENT)"))?;
        // SO_RCVBUFFORCE fails without CAP_NET_ADMIN; SO_RCVBUF then gets what rmem_max
        // allows. Neither failing is fatal: the default buffer still works, just overflows
        // sooner.
        let how = if setsockopt(&fd, sockopt::RcvBufForce, &bytes).is_ok() {
            "SO_RCVBUFFORCE"
        } else if setsockopt(&fd, sockopt::RcvBuf, &bytes).is_ok() {
            "SO_RCVBUF"
        } else {
            "neither SO_RCVBUFFORCE nor SO_RCVBUF (default)"
        };
        let granted = getsockopt(&fd, sockopt::RcvBuf).unwrap_or(0);
        log::debug!("uevent monitor: receive buffer {granted} bytes via {how} (asked {bytes})");
        bind(fd.as_raw_fd(), &NetlinkAddr::new(0, KERNEL_GROUP)).map_err(open_err("bind"))?;
        Ok(UeventMonitor {
            fd,
            // One more byte than the parser accepts, so that a longer datagram (cut to
            // the buffer by recvfrom) is seen as too long instead of parsed truncated.
            buf: vec![0; UEVENT_MSG_MAX + 1],
            pci_only: false,
            skipped: Skipped::default(),
        })
    }

    /// Returns only events with `SUBSYSTEM=pci` (not those of devices below a PCI
    /// function, such as `nvme` or `block`); others are counted in
    /// [`Skipped::filtered`]. Overflow is reported either way.
    pub fn pci_only(mut self, yes: bool) -> UeventMonitor {
        self.pci_only = yes;
        self
    }

    /// What was received and not returned so far.
    pub fn skipped(&self) -> Skipped {
        self.skipped
    }

    /// Receives the next event without blocking: `Ok(None)` when none is queued (wait for
    /// the fd to become readable, then call again). Reads and skips datagrams that are
    /// not kernel events (udev's, other senders', malformed ones, filtered ones) until it
    /// finds one or the queue is empty, so with an edge-triggered poller call it until it
    /// returns `Ok(None)`.
    pub fn try_next(&mut self) -> Result<Option<Event>, MonitorError> {
        loop {
            let (len, from) = match recvfrom::<NetlinkAddr>(self.fd.as_raw_fd(), &mut self.buf) {
                Ok(r) => r,
                Err(Errno::EAGAIN) => return Ok(None),
                Err(Errno::EINTR) => continue,
                Err(Errno::ENOBUFS) => {
                    log::warn!("uevent monitor: the kernel dropped events (ENOBUFS)");
                    return Ok(Some(Event::Overflow));
                }
                Err(e) => {
                    return Err(MonitorError::Receive {
                        step: "recvfrom",
                        source: e.into(),
                    });
                }
            };
            // Only the kernel sends from port id 0; anyone else (udevd, or a process with
            // CAP_NET_ADMIN forging events) is ignored.
            if from.is_none_or(|a| a.pid() != 0) {
                self.skipped.foreign += 1;
                log::debug!(
                    "uevent monitor: skipped a message from port {:?}",
                    from.map(|a| a.pid())
                );
                continue;
            }
            match parse_datagram(&self.buf[..len]) {
                Ok(Datagram::Kernel(ev)) => {
                    if self.pci_only && !ev.is_pci() {
                        self.skipped.filtered += 1;
                        continue;
                    }
                    return Ok(Some(Event::Uevent(ev)));
                }
                Ok(Datagram::Udev) => self.skipped.udev += 1,
                Err(e) => {
                    self.skipped.malformed += 1;
                    log::warn!("uevent monitor: skipped a message: {e}");
                }
            }
        }
    }

    /// Waits up to `timeout` for the next event, blocking the calling thread (with
    /// `poll`). `Ok(None)` when the time passed without one.
    pub fn next_timeout(&mut self, timeout: Duration) -> Result<Option<Event>, MonitorError> {
        EventSource::next_timeout(self, timeout)
    }
}

/// A pollable source of hotplug [`Event`]s: [`UeventMonitor`] (the kernel's), or with
/// feature `udev` the `UdevMonitor` (udev's, after its rules). What
/// [`Bus::wait`](crate::bus::Bus::wait) takes, so a program switches sources without
/// other changes.
pub trait EventSource: AsFd {
    /// The next event if one is queued, without blocking.
    fn try_next(&mut self) -> Result<Option<Event>, MonitorError>;

    /// Waits up to `timeout` for the next event, blocking the calling thread (with
    /// `poll` on [`AsFd::as_fd`]). `Ok(None)` when the time passed without one.
    fn next_timeout(&mut self, timeout: Duration) -> Result<Option<Event>, MonitorError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(ev) = self.try_next()? {
                return Ok(Some(ev));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            // Round up so that a sub-millisecond rest does not spin.
            let ms = left.as_micros().div_ceil(1000);
            let wait = PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX);
            let mut fds = [PollFd::new(self.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, wait) {
                Ok(_) | Err(Errno::EINTR) => {}
                Err(e) => {
                    return Err(MonitorError::Receive {
                        step: "poll",
                        source: e.into(),
                    });
                }
            }
        }
    }
}

impl EventSource for UeventMonitor {
    fn try_next(&mut self) -> Result<Option<Event>, MonitorError> {
        UeventMonitor::try_next(self)
    }
}

impl AsFd for UeventMonitor {
    /// The socket: readable when an event (or an overflow) is queued.
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}
