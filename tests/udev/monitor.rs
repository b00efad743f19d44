//! `UdevMonitor` on this machine: it opens (no udevd needed for that), and it turns what
//! udevd sends into the kernel monitor's events.
//!
//! Where udevd runs, one test writes `change` to `/dev/null`'s `uevent` file and waits for
//! udev's event. Where none runs (containers, CI), that test prints SKIPPED and the
//! others play udevd instead: as root they send messages in udevd's wire format
//! (`libudev\0`, the magic, the filter hashes, then the properties) to udev's multicast
//! group, which libudev accepts from any sender with uid 0. They do so only without a
//! udevd, so that no live system's udev listeners see forged events, and only about
//! devices that do not exist (`/devices/virtual/pcibus-test/...`).

use super::skip;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, FdFlag, OFlag, fcntl};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::socket::{
    AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, sendto, socket,
};

use pcibus::hotplug::event::Action;
use pcibus::hotplug::monitor::Event;
use pcibus::hotplug::udev::UdevMonitor;

const UDEV_CONTROL: &str = "/run/udev/control";
const NULL_UEVENT: &str = "/sys/devices/virtual/mem/null/uevent";
/// udev's multicast group on the uevent netlink family as a `nl_groups` mask: group 2
/// (the kernel's is group 1, mask 1).
const UDEV_GROUP_MASK: u32 = 2;

/// The tests that send to udev's group run one at a time, so that one test's messages
/// do not fill or wake another's socket.
static SENDING: Mutex<()> = Mutex::new(());

use skip::skip;

fn udevd_runs() -> bool {
    Path::new(UDEV_CONTROL).exists()
}

fn open() -> Option<UdevMonitor> {
    match UdevMonitor::open() {
        Ok(m) => Some(m),
        Err(e) => {
            let source = std::error::Error::source(&e).map(|s| s.to_string());
            skip(format!("cannot open the udev monitor here: {e}: {source:?}"));
            None
        }
    }
}

fn readable(fd: impl AsFd) -> bool {
    let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
    poll(&mut fds, PollTimeout::ZERO).unwrap() > 0
}

#[test]
fn open_needs_no_udevd() {
    let Some(mon) = open() else { return };
    eprintln!(
        "udevd {} here ({UDEV_CONTROL} {})",
        if udevd_runs() { "runs" } else { "does not run" },
        if udevd_runs() { "exists" } else { "is missing" }
    );
    // libudev's socket, as the kernel monitor's: non-blocking and close-on-exec.
    let fd = mon.as_fd();
    let fl = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL).unwrap());
    assert!(fl.contains(OFlag::O_NONBLOCK), "{fl:?}");
    let fdfl = FdFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFD).unwrap());
    assert!(fdfl.contains(FdFlag::FD_CLOEXEC), "{fdfl:?}");
    assert_eq!(mon.skipped(), Default::default());
}

#[test]
fn try_next_on_a_quiet_socket_returns_none_at_once() {
    let _one = SENDING.lock().unwrap_or_else(|e| e.into_inner());
    let Some(mut mon) = open() else { return };
    let t = Instant::now();
    while mon.try_next().unwrap().is_some() {}
    assert!(t.elapsed() < Duration::from_secs(1));
    let t = Instant::now();
    let got = mon.next_timeout(Duration::from_millis(50)).unwrap();
    assert!(got.is_none() || udevd_runs(), "{got:?}");
    assert!(t.elapsed() >= Duration::from_millis(50) || got.is_some());
}

#[test]
fn with_udevd_a_synthetic_change_arrives_after_udevs_rules() {
    if !udevd_runs() {
        return skip(format!(
            "no udevd here ({UDEV_CONTROL} is missing): the udev monitor receives nothing"
        ));
    }
    let Some(mut mon) = open() else { return };
    let uuid = format!("{:08x}-0000-4000-8000-{:012x}", std::process::id(), 0x0dedu64);
    if let Err(e) = std::fs::write(NULL_UEVENT, format!("change {uuid}")) {
        return skip(format!("cannot write {NULL_UEVENT} (needs root): {e}"));
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match mon.next_timeout(left).unwrap() {
            Some(Event::Uevent(ev)) if ev.var("SYNTH_UUID") == Some(&uuid) => {
                assert_eq!(ev.action, Action::Change);
                assert_eq!(ev.devpath, "/devices/virtual/mem/null");
                assert_eq!(ev.subsystem.as_deref(), Some("mem"));
                assert!(ev.seqnum.is_some(), "{ev:?}");
                // udev's view: the node's path, and when udev first handled the device.
                assert_eq!(ev.var("DEVNAME"), Some("/dev/null"), "{ev:?}");
                assert!(ev.var("USEC_INITIALIZED").is_some(), "{ev:?}");
                return;
            }
            Some(_) => continue,
            None => panic!("udevd runs but sent no event for /dev/null within 5 s"),
        }
    }
}

fn effective_uid_is_root() -> bool {
    // `Uid:` lists the real, effective, saved and filesystem uids.
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let uids = status.lines().find_map(|l| l.strip_prefix("Uid:"));
    uids.and_then(|u| u.split_whitespace().nth(1)) == Some("0")
}

/// MurmurHash2 with seed 0: udev's `string_hash32`, which udevd puts in each message's
/// header for the subsystem filters.
fn murmur2(key: &[u8]) -> u32 {
    const M: u32 = 0x5bd1_e995;
    let mut h = key.len() as u32;
    let mut chunks = key.chunks_exact(4);
    for c in &mut chunks {
        let mut k = u32::from_le_bytes(c.try_into().unwrap()).wrapping_mul(M);
        k ^= k >> 24;
        h = h.wrapping_mul(M) ^ k.wrapping_mul(M);
    }
    let tail = chunks.remainder();
    if !tail.is_empty() {
        for (i, &b) in tail.iter().enumerate() {
            h ^= u32::from(b) << (8 * i);
        }
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^ (h >> 15)
}

/// Plays udevd: sends messages in its format to udev's multicast group.
struct FakeUdevd {
    sock: OwnedFd,
    marker: String,
}

impl FakeUdevd {
    /// `None` (after saying why) where this test must not or cannot play udevd.
    fn new(test: &str) -> Option<FakeUdevd> {
        if udevd_runs() {
            skip(format!(
                "udevd runs here: forged udev events would reach its listeners ({test})"
            ));
            return None;
        }
        if !effective_uid_is_root() {
            skip("libudev reads messages from uid 0 only: not root");
            return None;
        }
        let sock = socket(
            AddressFamily::Netlink,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkKObjectUEvent,
        )
        .unwrap();
        bind(sock.as_raw_fd(), &NetlinkAddr::new(0, 0)).unwrap();
        let f = FakeUdevd {
            sock,
            marker: format!("{}-{test}", std::process::id()),
        };
        // Multicast to udev's group needs CAP_NET_ADMIN.
        match f.try_send(&f.message("add", "probe", "pcibus-test", &[])) {
            Ok(_) | Err(Errno::ECONNREFUSED) => Some(f),
            Err(e) => {
                skip(format!("cannot send to udev's group (needs CAP_NET_ADMIN): {e}"));
                None
            }
        }
    }

    /// udevd's message for a device `/devices/virtual/pcibus-test/<name>`: the header
    /// (`monitor_netlink_header` of systemd's device-monitor.c), then `KEY=VALUE\0`s with
    /// this test's marker in `PCIBUS_TEST`.
    fn message(&self, action: &str, name: &str, subsystem: &str, extra: &[(&str, &str)]) -> Vec<u8> {
        let mut props = Vec::new();
        let devpath = format!("/devices/virtual/pcibus-test/{name}");
        let base = [
            ("ACTION", action),
            ("DEVPATH", &devpath),
            ("SUBSYSTEM", subsystem),
            ("SEQNUM", "4242"),
            ("PCIBUS_TEST", &self.marker),
        ];
        for (k, v) in base.iter().chain(extra) {
            props.extend_from_slice(format!("{k}={v}\0").as_bytes());
        }
        let mut msg = b"libudev\0".to_vec();
        msg.extend_from_slice(&0xfeed_cafeu32.to_be_bytes());
        let header_size = 40u32;
        msg.extend_from_slice(&header_size.to_ne_bytes());
        msg.extend_from_slice(&header_size.to_ne_bytes()); // properties_off
        msg.extend_from_slice(&(props.len() as u32).to_ne_bytes());
        msg.extend_from_slice(&murmur2(subsystem.as_bytes()).to_be_bytes());
        msg.extend_from_slice(&[0; 12]); // devtype hash, tag bloom hi and lo
        assert_eq!(msg.len(), header_size as usize);
        msg.extend_from_slice(&props);
        msg
    }

    fn try_send(&self, msg: &[u8]) -> nix::Result<usize> {
        sendto(
            self.sock.as_raw_fd(),
            msg,
            &NetlinkAddr::new(0, UDEV_GROUP_MASK),
            MsgFlags::empty(),
        )
    }

    fn send(&self, action: &str, name: &str, subsystem: &str, extra: &[(&str, &str)]) {
        let msg = self.message(action, name, subsystem, extra);
        match self.try_send(&msg) {
            // udevd's own sends get this too: the multicast went out, and the unicast
            // copy to the kernel's port (which every netlink send also makes) was refused.
            Ok(_) | Err(Errno::ECONNREFUSED) => {}
            Err(e) => panic!("send: {e}"),
        }
    }

    /// The events carrying this test's marker, until none comes for 200 ms.
    fn receive(&self, mon: &mut UdevMonitor) -> Vec<Event> {
        let mut got = Vec::new();
        while let Some(ev) = mon.next_timeout(Duration::from_millis(200)).unwrap() {
            match ev {
                Event::Uevent(ref u) if u.var("PCIBUS_TEST") != Some(&self.marker) => {}
                ev => got.push(ev),
            }
        }
        got
    }
}

#[test]
fn udevds_event_arrives_as_the_kernel_monitors_uevent() {
    let _one = SENDING.lock().unwrap_or_else(|e| e.into_inner());
    let Some(udevd) = FakeUdevd::new("event") else {
        return;
    };
    let Some(mut mon) = open() else { return };
    let extra = [
        ("DRIVER", "vfio-pci"),
        ("PCI_SLOT_NAME", "0000:ff:1f.7"),
        ("ID_VENDOR_FROM_DATABASE", "pcibus test"),
    ];
    udevd.send("bind", "0000:ff:1f.7", "pci", &extra);
    let got = udevd.receive(&mut mon);
    let [Event::Uevent(ev)] = &got[..] else {
        panic!("one event expected: {got:?} (skipped {:?})", mon.skipped());
    };
    assert_eq!(ev.action, Action::Bind);
    assert_eq!(ev.devpath, "/devices/virtual/pcibus-test/0000:ff:1f.7");
    assert!(ev.is_pci());
    assert_eq!(
        ev.pci_address().map(|a| a.to_string()).as_deref(),
        Some("0000:ff:1f.7")
    );
    assert_eq!(ev.driver.as_deref(), Some("vfio-pci"));
    assert_eq!(ev.seqnum, Some(4242));
    assert_eq!(ev.var("ID_VENDOR_FROM_DATABASE"), Some("pcibus test"));
}

#[test]
fn pci_only_filters_in_the_kernel() {
    let _one = SENDING.lock().unwrap_or_else(|e| e.into_inner());
    let Some(udevd) = FakeUdevd::new("pci_only") else {
        return;
    };
    let Some(mut all) = open() else { return };
    let mut pci = UdevMonitor::open().unwrap().pci_only(true);
    udevd.send("add", "nvme-ish", "nvme", &[]);
    // Give the kernel time to deliver (it does so in sendto already, but be safe).
    std::thread::sleep(Duration::from_millis(20));
    assert!(readable(&all), "the unfiltered socket did not get the nvme event");
    assert!(
        !readable(&pci),
        "udev's subsystem filter let a non-PCI message into the socket"
    );
    udevd.send("add", "0000:ff:1f.6", "pci", &[]);
    let got = udevd.receive(&mut pci);
    assert!(
        matches!(&got[..], [Event::Uevent(ev)] if ev.devpath.ends_with("0000:ff:1f.6")),
        "{got:?}"
    );
    assert_eq!(pci.skipped().filtered, 0, "the filter is in the kernel, not here");
    let got = udevd.receive(&mut all);
    assert_eq!(got.len(), 2, "{got:?}");
}

#[test]
fn messages_that_do_not_convert_are_skipped_and_counted() {
    let _one = SENDING.lock().unwrap_or_else(|e| e.into_inner());
    let Some(udevd) = FakeUdevd::new("malformed") else {
        return;
    };
    let Some(mut mon) = open() else { return };
    // libudev accepts it; the kernel's rules for PCI_SLOT_NAME do not.
    udevd.send("add", "0000:ff:1f.5", "pci", &[("PCI_SLOT_NAME", "ff:1f.5")]);
    // udev allows this key; the kernel's format does not: the property is left out.
    udevd.send("change", "dash", "pcibus-test", &[("ID_WITH-DASH", "1")]);
    let got = udevd.receive(&mut mon);
    let [Event::Uevent(ev)] = &got[..] else {
        panic!("one event expected: {got:?}");
    };
    assert_eq!(
        (ev.action.clone(), ev.var("ID_WITH-DASH")),
        (Action::Change, None)
    );
    assert_eq!(mon.skipped().malformed, 1, "{:?}", mon.skipped());
}

#[test]
fn a_full_receive_buffer_is_reported_as_overflow_then_events_resume() {
    let _one = SENDING.lock().unwrap_or_else(|e| e.into_inner());
    let Some(udevd) = FakeUdevd::new("overflow") else {
        return;
    };
    // The smallest buffer the kernel allows holds a handful of messages.
    let mut mon = match UdevMonitor::open_with_buffer(0) {
        Ok(m) => m,
        Err(e) => return skip(format!("cannot open the udev monitor here: {e}")),
    };
    for n in 0..200 {
        udevd.send("change", &format!("flood{n}"), "pcibus-test", &[]);
    }
    let mut overflow = 0;
    let mut events = 0;
    while let Some(ev) = mon.try_next().unwrap() {
        match ev {
            Event::Overflow => overflow += 1,
            Event::Uevent(_) => events += 1,
        }
    }
    assert_eq!(overflow, 1, "overflow reported once ({events} events)");
    assert!(0 < events && events < 200, "{events}");
    udevd.send("add", "after", "pcibus-test", &[]);
    let got = udevd.receive(&mut mon);
    assert!(
        matches!(&got[..], [Event::Uevent(ev)] if ev.devpath.ends_with("/after")),
        "{got:?}"
    );
}
