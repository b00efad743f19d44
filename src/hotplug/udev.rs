//! The same event stream from libudev's monitor (feature `udev`): a pollable
//! [`UdevMonitor`] that returns the [`Event`]s and [`Uevent`]s of the kernel monitor, so
//! code using the bus can switch between the two sources.
//!
//! # Which monitor
//!
//! [`UeventMonitor`](crate::hotplug::monitor::UeventMonitor) receives the kernel's
//! uevents as the kernel sends them. It needs no library and no daemon, which is what
//! containers and initramfs images usually have: no udevd. Its events can come before
//! udev has acted on them: a device node may not exist yet, or still have the kernel's
//! default owner and mode.
//!
//! [`UdevMonitor`] receives udevd's re-broadcast of each event, sent after udev's rules
//! have run for it: device nodes exist and have their permissions, symlinks are made, and
//! the event carries udev's properties (`ID_*` from the hardware database,
//! `USEC_INITIALIZED`, `TAGS`, whatever the rules set with `ENV{}`). Its price: it links
//! libudev (`libudev-dev` to build, `libudev1` to run), and it receives nothing unless
//! udevd runs on the machine. libudev cannot tell whether one does: opening succeeds
//! either way, and the socket then stays silent (libudev even leaves it out of udev's
//! multicast group when there is neither `/run/udev/control` nor a devtmpfs `/dev`).
//!
//! # Events
//!
//! Each udev event becomes a [`Uevent`] built from the device's udev properties by
//! [`uevent_from_properties`], which writes them as a kernel message and hands it to
//! [`parse_datagram`]: `DEVPATH`, `PCI_SLOT_NAME`, `SEQNUM` and the rest are checked by
//! the same code as the kernel's events. [`Uevent::vars`] holds every udev property the
//! kernel's format can carry, udev's own (`ID_*`, ...) among them; udev's values win
//! where they differ from the kernel's (udev writes `DEVNAME` as `/dev/...`). The
//! message does not say which properties udev added: libudev merges them with the
//! kernel's. A [`UeventMonitor`](crate::hotplug::monitor::UeventMonitor) alongside, with
//! events matched by [`Uevent::seqnum`], gives the kernel's own set where that matters.
//!
//! # Overflow
//!
//! As with the kernel monitor: when udevd sends faster than the caller reads, the kernel
//! drops what does not fit in the socket's buffer and reports it once with `ENOBUFS`,
//! which [`UdevMonitor::try_next`] returns as [`Event::Overflow`] (resynchronise with a
//! full scan). The buffer is raised to [`RCVBUF_WANTED`] at open.
//!
//! # Threads
//!
//! A `UdevMonitor` is not `Send`: libudev's objects count their references without
//! atomics, and the `udev` crate marks them `!Send` unless its `send` feature is on. Open
//! it on the thread that polls it.
//!
//! # Dropping
//!
//! Dropping the monitor releases its libudev monitor and context, which closes the
//! socket; queued events are discarded. No thread and no file outlives it. Remove its fd from any epoll set before
//! dropping it.

use std::ffi::OsStr;
use std::fmt;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::time::Duration;

use crate::hotplug::monitor::EventSource;
use nix::errno::Errno;
use nix::sys::socket::{MsgFlags, getsockopt, recv, setsockopt, sockopt};

use crate::error::shorten;
use crate::hotplug::event::{Datagram, Uevent, UeventError, parse_datagram, valid_key};
use crate::hotplug::monitor::{Event, MonitorError, RCVBUF_WANTED, Skipped};

/// The properties the parser interprets. They are never left out of a [`Uevent`]: one
/// the kernel's format cannot carry makes the whole event malformed.
const INTERPRETED: [&str; 6] = [
    "ACTION",
    "DEVPATH",
    "SUBSYSTEM",
    "SEQNUM",
    "PCI_SLOT_NAME",
    "DRIVER",
];

/// The [`Uevent`] for a device's udev properties (`udev_device_get_properties_list_entry`,
/// `udevadm monitor --property`), given as name and value pairs in libudev's order.
///
/// `ACTION` and `DEVPATH` make the `ACTION@DEVPATH` header, and every property is
/// written as `KEY=VALUE` after it; the message is then parsed by [`parse_datagram`], so
/// what is accepted is exactly what is accepted from the kernel. A property the kernel's
/// format cannot carry (a key other than ASCII letters, digits and `_`, or a key or value
/// that is not UTF-8 or contains a NUL) is left out with a `log::debug!`, unless it is
/// one of the six the parser interprets (`ACTION`, `DEVPATH`, `SUBSYSTEM`, `SEQNUM`,
/// `PCI_SLOT_NAME`, `DRIVER`): then the event is an error, as a kernel message with such
/// a variable would be. The parser's bounds apply ([`UEVENT_MSG_MAX`] bytes,
/// [`UEVENT_VARS_MAX`] variables); libudev itself drops messages over 8 KiB.
///
/// [`UEVENT_MSG_MAX`]: crate::hotplug::event::UEVENT_MSG_MAX
/// [`UEVENT_VARS_MAX`]: crate::hotplug::event::UEVENT_VARS_MAX
///
/// ```
/// use pcibus::hotplug::event::Action;
/// use pcibus::hotplug::udev::uevent_from_properties;
///
/// let ev = uevent_from_properties([
///     ("ACTION", "bind"),
///     ("DEVPATH", "/devices/pci0000:00/0000:00:01.0/0000:01:00.0"),
///     ("SUBSYSTEM", "pci"),
///     ("DRIVER", "vfio-pci"),
///     ("PCI_SLOT_NAME", "0000:01:00.0"),
///     ("SEQNUM", "4242"),
///     ("ID_VENDOR_FROM_DATABASE", "Red Hat, Inc."),
/// ])?;
/// assert_eq!((&ev.action, ev.driver.as_deref()), (&Action::Bind, Some("vfio-pci")));
/// assert_eq!(ev.var("ID_VENDOR_FROM_DATABASE"), Some("Red Hat, Inc."));
/// # Ok::<(), pcibus::hotplug::event::UeventError>(())
/// ```
pub fn uevent_from_properties<K, V>(
    properties: impl IntoIterator<Item = (K, V)>,
) -> Result<Uevent, UeventError>
where
    K: AsRef<OsStr>,
    V: AsRef<OsStr>,
{
    let mut action: Option<Vec<u8>> = None;
    let mut devpath: Option<Vec<u8>> = None;
    // The variables as the kernel writes them, after the header.
    let mut body = Vec::with_capacity(1024);
    for (key, value) in properties {
        let (key, value) = (key.as_ref().as_bytes(), value.as_ref().as_bytes());
        let interpreted = INTERPRETED.into_iter().find(|k| k.as_bytes() == key);
        if let Some(key) = interpreted
            && value.contains(&0)
        {
            // Written as is, the NUL would start a variable of its own.
            return Err(UeventError::Value {
                key,
                expected: "no NUL byte",
                text: shorten(value),
            });
        }
        let carried = std::str::from_utf8(key).is_ok_and(valid_key)
            && std::str::from_utf8(value).is_ok()
            && !value.contains(&0);
        if interpreted.is_none() && !carried {
            log::debug!(
                "udev property \"{}\" left out: not a kernel uevent variable",
                shorten(key)
            );
            continue;
        }
        // The first of each, as the parser reads them; a repeat is its error to report.
        match key {
            b"ACTION" if action.is_none() => action = Some(value.to_vec()),
            b"DEVPATH" if devpath.is_none() => devpath = Some(value.to_vec()),
            _ => {}
        }
        body.extend_from_slice(key);
        body.push(b'=');
        body.extend_from_slice(value);
        body.push(0);
    }
    let (Some(action), Some(devpath)) = (&action, &devpath) else {
        let header = [
            action.as_deref().unwrap_or_default(),
            devpath.as_deref().unwrap_or_default(),
        ]
        .join(&b'@');
        return Err(UeventError::Header {
            expected: "ACTION and DEVPATH properties",
            text: shorten(&header),
        });
    };
    let mut msg = Vec::with_capacity(action.len() + devpath.len() + 2 + body.len());
    msg.extend_from_slice(action);
    msg.push(b'@');
    msg.extend_from_slice(devpath);
    msg.push(0);
    msg.extend_from_slice(&body);
    match parse_datagram(&msg)? {
        Datagram::Kernel(ev) => Ok(ev),
        // A header never starts with udev's magic: it has no NUL before its '@'.
        Datagram::Udev => Err(UeventError::Header {
            expected: "ACTION@DEVPATH",
            text: shorten(&msg),
        }),
    }
}

/// libudev's monitor of udev's events (the `"udev"` netlink source): a pollable source
/// of the same [`Event`]s as [`UeventMonitor`](crate::hotplug::monitor::UeventMonitor),
/// each sent after udev's rules ran for it. See the [module docs](self) for when to
/// choose it, overflow, threads and dropping.
///
/// ```no_run
/// use std::time::Duration;
/// use pcibus::hotplug::monitor::{Event, MonitorError};
/// use pcibus::hotplug::udev::UdevMonitor;
///
/// let mut mon = UdevMonitor::open()?.pci_only(true);
/// while let Some(event) = mon.next_timeout(Duration::from_secs(1))? {
///     match event {
///         Event::Uevent(ev) => println!("{} {:?} {:?}", ev.action, ev.pci_address(), ev.var("ID_MODEL_FROM_DATABASE")),
///         Event::Overflow => println!("events lost: rescan"),
///     }
/// }
/// # Ok::<(), MonitorError>(())
/// ```
pub struct UdevMonitor {
    socket: udev::MonitorSocket,
    rcvbuf: usize,
    pci_only: bool,
    skipped: Skipped,
}

impl fmt::Debug for UdevMonitor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UdevMonitor")
            .field("fd", &self.socket.as_fd())
            .field("pci_only", &self.pci_only)
            .field("skipped", &self.skipped)
            .finish_non_exhaustive()
    }
}

/// A libudev monitor of udev's events, filtered to `SUBSYSTEM=pci` in the kernel when
/// `pci_only`, listening, with its receive buffer raised toward `rcvbuf`.
fn listen(pci_only: bool, rcvbuf: usize) -> Result<udev::MonitorSocket, MonitorError> {
    let open_err = |step| move |source| MonitorError::Open { step, source };
    let mut builder = udev::MonitorBuilder::new().map_err(open_err("udev_monitor_new_from_netlink"))?;
    if pci_only {
        builder = builder
            .match_subsystem("pci")
            .map_err(open_err("udev_monitor_filter_add_match_subsystem_devtype"))?;
    }
    // Installs the subsystem filter, binds and turns on SO_PASSCRED (libudev keeps only
    // messages from uid 0).
    let socket = builder
        .listen()
        .map_err(open_err("udev_monitor_enable_receiving"))?;
    // libudev leaves the buffer at the system default. As in the kernel monitor: neither
    // call failing is fatal, a smaller buffer only overflows sooner.
    let how = if setsockopt(&socket, sockopt::RcvBufForce, &rcvbuf).is_ok() {
        "SO_RCVBUFFORCE"
    } else if setsockopt(&socket, sockopt::RcvBuf, &rcvbuf).is_ok() {
        "SO_RCVBUF"
    } else {
        "neither SO_RCVBUFFORCE nor SO_RCVBUF (default)"
    };
    let granted = getsockopt(&socket, sockopt::RcvBuf).unwrap_or(0);
    log::debug!("udev monitor: receive buffer {granted} bytes via {how} (asked {rcvbuf})");
    Ok(socket)
}

/// What a non-blocking peek at the socket found.
enum Queue {
    Empty,
    Message,
    Overflowed,
}

impl UdevMonitor {
    /// Opens libudev's monitor of udev's events: a non-blocking, close-on-exec
    /// `NETLINK_KOBJECT_UEVENT` socket in udev's multicast group (libudev's
    /// `udev_monitor_new_from_netlink(udev, "udev")` and `udev_monitor_enable_receiving`),
    /// with its receive buffer raised as [`UeventMonitor::open`] does.
    ///
    /// It needs no udevd and no privilege, and succeeds without udevd; it then receives
    /// nothing (see the [module docs](self)). Failures are [`MonitorError::Open`] naming
    /// the libudev call.
    ///
    /// [`UeventMonitor::open`]: crate::hotplug::monitor::UeventMonitor::open
    pub fn open() -> Result<UdevMonitor, MonitorError> {
        UdevMonitor::open_with_buffer(RCVBUF_WANTED)
    }

    /// [`open`](Self::open) asking for a receive buffer of `bytes` instead of
    /// [`RCVBUF_WANTED`]: a small one overflows sooner, which tests use.
    pub fn open_with_buffer(bytes: usize) -> Result<UdevMonitor, MonitorError> {
        Ok(UdevMonitor {
            socket: listen(false, bytes)?,
            rcvbuf: bytes,
            pci_only: false,
            skipped: Skipped::default(),
        })
    }

    /// Returns only events with `SUBSYSTEM=pci`, as
    /// [`UeventMonitor::pci_only`](crate::hotplug::monitor::UeventMonitor::pci_only)
    /// does. Others are dropped by udev's subsystem filter in the kernel (a socket filter
    /// on the hash udevd puts in each message's header), so they do not even wake the
    /// caller; what gets through is checked again here and counted in
    /// [`Skipped::filtered`].
    ///
    /// libudev installs its filter when the socket starts listening, so this opens a new
    /// socket and closes the old one (with anything queued in it): call it right after
    /// [`open`](Self::open), before taking the fd. If the new socket cannot be opened, the
    /// old one is kept, a `log::warn!` says so, and the filtering is done here only.
    pub fn pci_only(mut self, yes: bool) -> UdevMonitor {
        if yes != self.pci_only {
            match listen(yes, self.rcvbuf) {
                Ok(socket) => self.socket = socket,
                Err(e) => log::warn!(
                    "udev monitor: {e} ({}); filtering PCI events in this process instead",
                    std::error::Error::source(&e).map_or(String::new(), |s| s.to_string())
                ),
            }
            self.pci_only = yes;
        }
        self
    }

    /// What was received and not returned so far: [`Skipped::malformed`] (messages
    /// libudev could not read, and udev events that did not convert to a [`Uevent`]) and
    /// [`Skipped::filtered`]. `udev` and `foreign` stay 0: libudev drops messages from
    /// senders other than root itself, without counting them.
    pub fn skipped(&self) -> Skipped {
        self.skipped
    }

    /// Looks at the head of the socket's queue without taking anything. A pending
    /// `ENOBUFS` is returned by the peek and cleared, like by any receive.
    fn peek(&self) -> Result<Queue, MonitorError> {
        loop {
            let flags = MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT;
            return match recv(self.socket.as_fd().as_raw_fd(), &mut [], flags) {
                Ok(_) => Ok(Queue::Message),
                Err(Errno::EAGAIN) => Ok(Queue::Empty),
                Err(Errno::ENOBUFS) => Ok(Queue::Overflowed),
                Err(Errno::EINTR) => continue,
                Err(e) => Err(MonitorError::Receive {
                    step: "recv(MSG_PEEK)",
                    source: e.into(),
                }),
            };
        }
    }

    /// Receives the next event without blocking: `Ok(None)` when none is queued (wait for
    /// the fd to become readable, then call again). Skips what libudev ignores (senders
    /// other than root), what does not convert and what [`pci_only`](Self::pci_only)
    /// leaves out, until it finds an event or the queue is empty: with an edge-triggered
    /// poller call it until it returns `Ok(None)`.
    pub fn try_next(&mut self) -> Result<Option<Event>, MonitorError> {
        loop {
            // libudev answers "nothing queued" and "a message was ignored" alike (NULL,
            // EAGAIN): peeking first tells them apart, and an empty queue costs no libudev
            // call.
            match self.peek()? {
                Queue::Empty => return Ok(None),
                Queue::Overflowed => return Ok(Some(self.overflow())),
                Queue::Message => {}
            }
            Errno::clear();
            let Some(event) = self.socket.iter().next() else {
                // libudev returns NULL with errno set; nothing ran since the call.
                match Errno::last() {
                    Errno::ENOBUFS => return Ok(Some(self.overflow())),
                    // A message libudev ignored (not from root, not passing its filter):
                    // peek again.
                    Errno::EAGAIN | Errno::EINTR => continue,
                    errno @ (Errno::EBADF | Errno::ENOTSOCK | Errno::EFAULT | Errno::ENOMEM) => {
                        return Err(MonitorError::Receive {
                            step: "udev_monitor_receive_device",
                            source: errno.into(),
                        });
                    }
                    Errno::UnknownErrno => {
                        // A libudev that gives no reason may not have taken the message:
                        // do not spin on it.
                        return Err(MonitorError::Receive {
                            step: "udev_monitor_receive_device",
                            source: io::Error::other("libudev returned no device and no errno"),
                        });
                    }
                    // EINVAL and the like: a message libudev read and could not make a
                    // device of; it is gone from the queue.
                    errno => {
                        self.skipped.malformed += 1;
                        log::warn!("udev monitor: libudev skipped a message: {errno}");
                        continue;
                    }
                }
            };
            let properties = event
                .properties()
                .map(|p| (p.name().to_owned(), p.value().to_owned()));
            match uevent_from_properties(properties) {
                Ok(ev) if self.pci_only && !ev.is_pci() => self.skipped.filtered += 1,
                Ok(ev) => return Ok(Some(Event::Uevent(ev))),
                Err(e) => {
                    self.skipped.malformed += 1;
                    log::warn!("udev monitor: skipped the event of {:?}: {e}", event.devpath());
                }
            }
        }
    }

    fn overflow(&self) -> Event {
        log::warn!("udev monitor: the kernel dropped udev's events (ENOBUFS)");
        Event::Overflow
    }

    /// Waits up to `timeout` for the next event, blocking the calling thread (with
    /// `poll`). `Ok(None)` when the time passed without one.
    pub fn next_timeout(&mut self, timeout: Duration) -> Result<Option<Event>, MonitorError> {
        EventSource::next_timeout(self, timeout)
    }
}

impl crate::hotplug::monitor::EventSource for UdevMonitor {
    fn try_next(&mut self) -> Result<Option<Event>, MonitorError> {
        UdevMonitor::try_next(self)
    }
}

impl AsFd for UdevMonitor {
    /// libudev's socket: readable when a message (or an overflow) is queued. After
    /// [`pci_only`](UdevMonitor::pci_only) changed the filter it is a different fd.
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.socket.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::addr::PciAddress;
    use crate::hotplug::event::{Action, UEVENT_VARS_MAX};
    use proptest::prelude::*;
    use std::ffi::OsString;
    use std::os::unix::ffi::OsStringExt;

    /// A PF's `bind` to vfio-pci as udev re-broadcasts it: the kernel's variables, then
    /// what udev's hwdb and path_id builtins add (the shape `udevadm monitor --property`
    /// prints on Debian 12 for a QEMU NVMe function).
    const PF_BIND: &[(&str, &str)] = &[
        ("ACTION", "bind"),
        ("DEVPATH", "/devices/pci0000:00/0000:00:01.0/0000:01:00.0"),
        ("SUBSYSTEM", "pci"),
        ("DRIVER", "vfio-pci"),
        ("PCI_CLASS", "10802"),
        ("PCI_ID", "1B36:0010"),
        ("PCI_SUBSYS_ID", "1AF4:1100"),
        ("PCI_SLOT_NAME", "0000:01:00.0"),
        (
            "MODALIAS",
            "pci:v00001B36d00000010sv00001AF4sd00001100bc01sc08i02",
        ),
        ("SEQNUM", "778"),
        ("USEC_INITIALIZED", "5221043"),
        ("ID_PCI_CLASS_FROM_DATABASE", "Mass storage controller"),
        ("ID_PCI_SUBCLASS_FROM_DATABASE", "Non-Volatile memory controller"),
        ("ID_PCI_INTERFACE_FROM_DATABASE", "NVM Express"),
        ("ID_VENDOR_FROM_DATABASE", "Red Hat, Inc."),
        ("ID_MODEL_FROM_DATABASE", "QEMU NVM Express Controller"),
        ("ID_PATH", "pci-0000:01:00.0"),
        ("ID_PATH_TAG", "pci-0000_01_00_0"),
    ];

    fn props(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|&(k, v)| (k.to_owned(), v.to_owned())).collect()
    }

    fn with(pairs: &[(&str, &str)], key: &str, value: &str) -> Vec<(String, String)> {
        let mut p = props(pairs);
        match p.iter_mut().find(|(k, _)| k == key) {
            Some(kv) => kv.1 = value.to_owned(),
            None => p.push((key.to_owned(), value.to_owned())),
        }
        p
    }

    #[test]
    fn a_udev_event_becomes_the_kernel_monitors_uevent() {
        let ev = uevent_from_properties(PF_BIND.iter().copied()).unwrap();
        let a = PciAddress::parse_strict("0000:01:00.0").unwrap();
        assert_eq!(ev.action, Action::Bind);
        assert_eq!(ev.devpath, "/devices/pci0000:00/0000:00:01.0/0000:01:00.0");
        assert!(ev.is_pci());
        assert_eq!((ev.pci_slot_name, ev.pci_address()), (Some(a), Some(a)));
        assert_eq!(ev.driver.as_deref(), Some("vfio-pci"));
        assert_eq!(ev.seqnum, Some(778));
        // Every property, udev's included, in libudev's order.
        assert_eq!(ev.vars, props(PF_BIND));
        assert_eq!(
            ev.var("ID_MODEL_FROM_DATABASE"),
            Some("QEMU NVM Express Controller")
        );
        // What the kernel monitor would make of the same message.
        assert_eq!(parse_datagram(&ev.to_bytes()), Ok(Datagram::Kernel(ev)));
    }

    #[test]
    fn the_parsers_rules_apply() {
        let cases = [
            (
                with(PF_BIND, "PCI_SLOT_NAME", "01:00.0"),
                "uevent PCI_SLOT_NAME".to_owned(),
            ),
            (
                with(PF_BIND, "DEVPATH", "devices/x"),
                "uevent header: expected a DEVPATH starting with '/' in \"bind@devices/x\"".to_owned(),
            ),
            (
                with(PF_BIND, "SEQNUM", "77a"),
                "uevent SEQNUM: expected a decimal number in \"77a\"".to_owned(),
            ),
            (
                props(&[("ACTION", ""), ("DEVPATH", "/x")]),
                "uevent header: expected an action of printable ASCII before '@' in \"@/x\"".to_owned(),
            ),
        ];
        for (p, want) in cases {
            let e = uevent_from_properties(p).unwrap_err();
            assert_eq!(e.to_string(), want);
        }
        let mut twice = props(PF_BIND);
        twice.push(("DRIVER".into(), "nvme".into()));
        assert_eq!(
            uevent_from_properties(twice).unwrap_err().to_string(),
            "uevent DRIVER: expected one occurrence only in \"nvme\""
        );
        let many = (0..UEVENT_VARS_MAX).map(|n| (format!("ID_X{n}"), "1".to_owned()));
        let too_many = props(PF_BIND).into_iter().chain(many);
        assert_eq!(
            uevent_from_properties(too_many),
            Err(UeventError::TooManyVars { max: UEVENT_VARS_MAX })
        );
    }

    #[test]
    fn action_and_devpath_are_required() {
        let no_devpath: Vec<_> = props(PF_BIND)
            .into_iter()
            .filter(|(k, _)| k != "DEVPATH")
            .collect();
        assert_eq!(
            uevent_from_properties(no_devpath).unwrap_err().to_string(),
            "uevent header: expected ACTION and DEVPATH properties in \"bind@\""
        );
        let none: [(&str, &str); 0] = [];
        assert!(matches!(
            uevent_from_properties(none),
            Err(UeventError::Header { .. })
        ));
    }

    #[test]
    fn properties_the_kernel_format_cannot_carry_are_left_out() {
        let mut p: Vec<(OsString, OsString)> = PF_BIND.iter().map(|&(k, v)| (k.into(), v.into())).collect();
        let odd = [
            (OsString::from("ID_WITH-DASH"), OsString::from("1")),
            (
                OsString::from("ID_NOT_UTF8"),
                OsString::from_vec(b"\xff\xfe".to_vec()),
            ),
            (OsString::from("ID_NUL"), OsString::from_vec(b"a\0B=c".to_vec())),
            (OsString::from(""), OsString::from("empty key")),
        ];
        p.extend(odd);
        let ev = uevent_from_properties(p).unwrap();
        assert_eq!(ev.vars, props(PF_BIND));
    }

    #[test]
    fn interpreted_properties_are_never_left_out() {
        // Leaving these out would change the event (no driver, no address): an error.
        let nul = with(PF_BIND, "SUBSYSTEM", "pci\0DRIVER=evil");
        assert_eq!(
            uevent_from_properties(nul).unwrap_err().to_string(),
            "uevent SUBSYSTEM: expected no NUL byte in \"pci\\u{0}DRIVER=evil\""
        );
        let mut p: Vec<(OsString, OsString)> = PF_BIND.iter().map(|&(k, v)| (k.into(), v.into())).collect();
        p[3].1 = OsString::from_vec(b"vfio\xff".to_vec());
        assert!(matches!(
            uevent_from_properties(p),
            Err(UeventError::Var { index: 3, .. })
        ));
    }

    proptest! {
        #[test]
        fn never_panics_on_arbitrary_properties(
            p in prop::collection::vec(
                (
                    prop_oneof![
                        Just(b"ACTION".to_vec()),
                        Just(b"DEVPATH".to_vec()),
                        Just(b"SEQNUM".to_vec()),
                        Just(b"PCI_SLOT_NAME".to_vec()),
                        prop::collection::vec(any::<u8>(), 0..12),
                    ],
                    prop::collection::vec(any::<u8>(), 0..40),
                ),
                0..12,
            ),
        ) {
            let p = p.into_iter().map(|(k, v)| (OsString::from_vec(k), OsString::from_vec(v)));
            if let Ok(ev) = uevent_from_properties(p) {
                // Whatever converts is what the kernel monitor could have returned.
                prop_assert_eq!(parse_datagram(&ev.to_bytes()), Ok(Datagram::Kernel(ev)));
            }
        }

        #[test]
        fn a_kernel_events_variables_give_the_same_event(
            action in "[a-z]{1,8}",
            devpath in "/[a-zA-Z0-9:./_-]{0,60}",
            vars in prop::collection::vec(("[A-Z_]{1,12}", "[^\0]{0,30}"), 0..8),
            seqnum in any::<u64>(),
            slot in prop::option::of((any::<u16>(), any::<u8>(), 0u8..32, 0u8..8)),
        ) {
            // As udevd relays a kernel event: ACTION, DEVPATH and SEQNUM among the variables.
            let mut msg = format!("{action}@{devpath}\0ACTION={action}\0DEVPATH={devpath}\0SEQNUM={seqnum}\0");
            if let Some((d, b, dev, f)) = slot {
                msg += &format!("PCI_SLOT_NAME={d:04x}:{b:02x}:{dev:02x}.{f:x}\0");
            }
            for (k, v) in vars.iter().filter(|(k, _)| !INTERPRETED.contains(&k.as_str())) {
                msg += &format!("{k}={v}\0");
            }
            let Ok(Datagram::Kernel(kernel)) = parse_datagram(msg.as_bytes()) else {
                return Err(TestCaseError::fail(format!("not a kernel event: {msg:?}")));
            };
            prop_assert_eq!(uevent_from_properties(kernel.vars.clone()), Ok(kernel));
        }
    }

    #[test]
    fn values_may_hold_what_the_kernel_format_allows() {
        // '=' and spaces in values, as DEVLINKS and ID_* values have them.
        let p = with(PF_BIND, "DEVLINKS", "/dev/a=b /dev/disk/by-id/x y");
        let ev = uevent_from_properties(p).unwrap();
        assert_eq!(ev.var("DEVLINKS"), Some("/dev/a=b /dev/disk/by-id/x y"));
    }
}
