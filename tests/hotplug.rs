//! The uevent monitor on this machine's kernel: it opens, and it sees a synthetic `change`
//! event of `/dev/null`'s device within a second.
//!
//! Writing `change` to `/sys/devices/virtual/mem/null/uevent` makes the kernel emit a
//! uevent and nothing else: no driver is involved, and where udev runs it re-applies
//! `/dev/null`'s usual mode (0666). It needs root; without it (or without the file, or
//! when the kernel does not deliver uevents to this network namespace, as in rootless
//! containers) the test prints why and skips.

#[path = "common/skip.rs"]
mod skip;
use std::time::{Duration, Instant};

use pcibus::hotplug::event::Action;
use pcibus::hotplug::monitor::{Event, UeventMonitor};

const NULL_UEVENT: &str = "/sys/devices/virtual/mem/null/uevent";
const NULL_DEVPATH: &str = "/devices/virtual/mem/null";

use skip::skip;

#[test]
fn monitor_opens_and_sees_a_synthetic_change_event() {
    let mut mon = match UeventMonitor::open() {
        Ok(m) => m,
        Err(e) => {
            let source = std::error::Error::source(&e).map(|s| s.to_string());
            return skip(format!("cannot open the uevent monitor here: {e}: {source:?}"));
        }
    };
    // A UUID of our own, so that an event someone else triggers is not taken for ours.
    let uuid = format!("{:08x}-0000-4000-8000-{:012x}", std::process::id(), 0x7e57u64);
    if let Err(e) = std::fs::write(NULL_UEVENT, format!("change {uuid}")) {
        return skip(format!("cannot write {NULL_UEVENT} (needs root): {e}"));
    }
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match mon.next_timeout(left).expect("receive") {
            Some(Event::Uevent(ev)) if ev.var("SYNTH_UUID") == Some(&uuid) => {
                assert_eq!(ev.action, Action::Change);
                assert_eq!(ev.devpath, NULL_DEVPATH);
                assert_eq!(ev.subsystem.as_deref(), Some("mem"));
                assert!(ev.seqnum.is_some(), "{ev:?}");
                assert!(!ev.is_pci() && ev.pci_address().is_none());
                return;
            }
            Some(_) => continue,
            None => {
                // The kernel delivers uevents only to network namespaces owned by the
                // initial user namespace; elsewhere the socket stays silent.
                let in_init_userns = std::fs::read_to_string("/proc/self/uid_map")
                    .is_ok_and(|m| m.split_whitespace().collect::<Vec<_>>() == ["0", "0", "4294967295"]);
                assert!(
                    !in_init_userns,
                    "no uevent for {NULL_DEVPATH} within 1 s (skipped: {:?})",
                    mon.skipped()
                );
                return skip("no uevent within 1 s: this user namespace gets no kernel uevents");
            }
        }
    }
}

#[test]
fn pci_only_leaves_out_other_subsystems() {
    let Ok(mon) = UeventMonitor::open() else {
        return skip("cannot open the uevent monitor here");
    };
    let mut mon = mon.pci_only(true);
    if std::fs::write(NULL_UEVENT, "change").is_err() {
        return skip(format!("cannot write {NULL_UEVENT} (needs root)"));
    }
    // Only a PCI event may come out (some other process could cause one); ours is counted.
    let deadline = Instant::now() + Duration::from_millis(300);
    while let Some(ev) = mon
        .next_timeout(deadline.saturating_duration_since(Instant::now()))
        .unwrap()
    {
        if let Event::Uevent(ev) = ev {
            assert!(ev.is_pci(), "{ev:?}");
        }
    }
    if mon.skipped().filtered == 0 {
        skip("the mem change event was not received (no uevents in this namespace?)");
    }
}

#[test]
fn try_next_on_a_quiet_socket_returns_none_at_once() {
    let Ok(mut mon) = UeventMonitor::open() else {
        return skip("cannot open the uevent monitor here");
    };
    // Anything queued is someone else's event: drain it; then the socket is empty unless
    // the machine is busy, and the call must not block either way.
    let t = Instant::now();
    while mon.try_next().unwrap().is_some() {}
    assert!(t.elapsed() < Duration::from_secs(1));
}

#[test]
fn a_full_receive_buffer_is_reported_as_overflow_then_events_resume() {
    // The smallest buffer the kernel allows holds a handful of events; 200 overflow it.
    let Ok(mut mon) = UeventMonitor::open_with_buffer(0) else {
        return skip("cannot open the uevent monitor here");
    };
    for _ in 0..200 {
        if std::fs::write(NULL_UEVENT, "change").is_err() {
            return skip(format!("cannot write {NULL_UEVENT} (needs root)"));
        }
    }
    let mut overflow = false;
    let mut events = 0;
    while let Some(ev) = mon.try_next().unwrap() {
        match ev {
            Event::Overflow => overflow = true,
            Event::Uevent(_) => events += 1,
        }
    }
    if events == 0 && !overflow {
        return skip("no uevents received (no uevents in this namespace?)");
    }
    assert!(overflow, "200 events fit in the smallest buffer? got {events}");
    assert!(events < 200, "{events}");
    // After the overflow the socket works as before. The buffer is still the smallest, and
    // the other tests of this binary send uevents meanwhile, so one event of ours may be
    // lost to another overflow: the socket works if one of a few arrives.
    let uuid = format!("{:08x}-0000-4000-8000-{:012x}", std::process::id(), 0x0f10u64);
    let arrived = (0..10).any(|_| {
        std::fs::write(NULL_UEVENT, format!("change {uuid}")).unwrap();
        let deadline = Instant::now() + Duration::from_secs(1);
        loop {
            match mon
                .next_timeout(deadline.saturating_duration_since(Instant::now()))
                .unwrap()
            {
                Some(Event::Uevent(ev)) if ev.var("SYNTH_UUID") == Some(&uuid) => return true,
                Some(_) => continue,
                None => return false,
            }
        }
    });
    assert!(arrived, "no event after the overflow (10 sent, 1 s each)");
}

#[test]
fn messages_from_other_senders_and_from_udev_are_skipped() {
    use nix::sys::socket::{
        AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, sendto, socket,
    };
    use std::os::fd::AsRawFd;

    let Ok(mut mon) = UeventMonitor::open() else {
        return skip("cannot open the uevent monitor here");
    };
    let sender = socket(
        AddressFamily::Netlink,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkKObjectUEvent,
    )
    .unwrap();
    bind(sender.as_raw_fd(), &NetlinkAddr::new(0, 0)).unwrap();
    let group = NetlinkAddr::new(0, 1);
    // Other listeners on this machine see these too: keep them about no real device.
    let forged = b"add@/devices/virtual/pcibus-test/forged\0ACTION=add\0SUBSYSTEM=pcibus-test\0";
    let relayed = b"libudev\0\xfe\xed\xca\xfe\x28\0\0\0ACTION=add\0";
    for msg in [&forged[..], &relayed[..]] {
        // Multicast to the uevent group needs CAP_NET_ADMIN.
        if let Err(e) = sendto(sender.as_raw_fd(), msg, &group, MsgFlags::empty()) {
            return skip(format!(
                "cannot send to the uevent group (needs CAP_NET_ADMIN): {e}"
            ));
        }
    }
    let deadline = Instant::now() + Duration::from_millis(300);
    while let Some(ev) = mon
        .next_timeout(deadline.saturating_duration_since(Instant::now()))
        .unwrap()
    {
        if let Event::Uevent(ev) = ev {
            assert_ne!(
                ev.devpath, "/devices/pci0000:00/0000:00:05.0",
                "forged event returned"
            );
        }
    }
    // Both come from our port id, not the kernel's 0: the sender check drops them before
    // the parser sees the udev magic.
    assert_eq!(mon.skipped().foreign, 2, "{:?}", mon.skipped());
}
