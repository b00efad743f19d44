//! `pcibus watch`: the kernel's PCI hotplug events as they happen, until interrupted.
//!
//! The monitor socket and a signalfd for SIGINT and SIGTERM are waited on together, so an
//! interrupt ends the command between two events with its output flushed and status 0.
//!
//! A device map (one scan at the start, after the monitor is open so nothing is missed)
//! is updated by each event, reading only the device it names; each line says what the
//! event changed in it. On overflow the map is rebuilt by one scan and the changes listed.

use std::io::Write;

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};

use pcibus::bus::devargs::Selection;
use pcibus::bus::map::{Change, DeviceMap};
use pcibus::hotplug::event::Uevent;
use pcibus::hotplug::monitor::{Event, UeventMonitor};
use pcibus::json::{MapChange, NamedRecord, Resync, WatchEvent};
use pcibus::names::{Names, find_pci_ids};
use pcibus::{DeviceRecord, Scanner};

type Error = Box<dyn std::error::Error>;

const MONITOR: u64 = 0;
const SIGNAL: u64 = 1;

/// Prints events (one JSON object per line with `json`) of devices `selection` admits
/// (every kernel uevent with `all`), until SIGINT or SIGTERM.
pub(super) fn watch(
    out: &mut impl Write,
    json: bool,
    all: bool,
    selection: &Selection,
    scanner: Scanner,
) -> Result<(), Error> {
    // Blocked before the monitor opens, so that an interrupt is never lost between events.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGTERM);
    signals.thread_block()?;
    let signal_fd = SignalFd::with_flags(&signals, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)?;
    let mut monitor = UeventMonitor::open()?.pci_only(!all);
    let mut map = DeviceMap::new(scanner)?;
    let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
    epoll.add(&monitor, EpollEvent::new(EpollFlags::EPOLLIN, MONITOR))?;
    epoll.add(&signal_fd, EpollEvent::new(EpollFlags::EPOLLIN, SIGNAL))?;
    // On stderr: standard output carries the events alone, for whatever reads them.
    if !json {
        eprintln!(
            "pcibus: watching {} uevents; interrupt to stop",
            if all { "all" } else { "PCI" }
        );
    }
    out.flush()?;
    let mut ready = [EpollEvent::empty(); 2];
    loop {
        let n = match epoll.wait(&mut ready, EpollTimeout::NONE) {
            Ok(n) => n,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        };
        if ready[..n].iter().any(|e| e.data() == SIGNAL) {
            out.flush()?;
            return Ok(());
        }
        while let Some(event) = monitor.try_next()? {
            match event {
                Event::Uevent(u) => {
                    if u.pci_address().is_some_and(|a| !selection.admits(a)) {
                        continue;
                    }
                    let change = map.apply(&u).map_err(|e| log::warn!("{e}")).ok();
                    let record = change.and_then(Change::address).and_then(|a| map.get(a));
                    if json {
                        let line = WatchEvent {
                            event: &u,
                            map: change.map(|c| map_change(c, record)),
                        };
                        serde_json::to_writer(&mut *out, &line)?;
                        writeln!(out)?;
                    } else {
                        let mut line = event_line(&u);
                        if let Some(c) = change.filter(|c| *c != Change::NotPci) {
                            line.push_str(&format!("  -> map: {}", change_text(c, record)));
                        }
                        writeln!(out, "{line}")?;
                    }
                }
                Event::Overflow => {
                    let changes = map.resync()?;
                    if json {
                        let resync = changes
                            .iter()
                            .map(|c| map_change(*c, c.address().and_then(|a| map.get(a))))
                            .collect();
                        serde_json::to_writer(&mut *out, &Resync { resync })?;
                        writeln!(out)?;
                    } else {
                        writeln!(
                            out,
                            "overflow: the kernel dropped events; rescanned: {} change(s)",
                            changes.len()
                        )?;
                        for c in changes {
                            let address = c.address().map(|a| a.to_string()).unwrap_or_default();
                            writeln!(
                                out,
                                "        {address}  -> map: {}",
                                change_text(c, c.address().and_then(|a| map.get(a)))
                            )?;
                        }
                    }
                }
            }
        }
        out.flush()?;
    }
}

fn event_line(u: &Uevent) -> String {
    let mut line = format!("{:<8}", u.action.to_string());
    match u.pci_address() {
        Some(a) => line.push_str(&a.to_string()),
        None => line.push_str(&u.devpath),
    }
    if let Some(d) = &u.driver {
        line.push_str(&format!("  driver {d}"));
    }
    if let Some(s) = &u.subsystem
        && s != "pci"
    {
        line.push_str(&format!("  ({s})"));
    }
    if let Some(n) = u.seqnum {
        line.push_str(&format!("  seq {n}"));
    }
    line
}

// What the map holds for the device after the change (nothing once removed), with its
// names: the schema's `map_change`. One small pci.ids lookup per changed device.
fn map_change(change: Change, record: Option<&DeviceRecord>) -> MapChange<'_> {
    let device = record
        .filter(|_| {
            matches!(
                change,
                Change::Added(_) | Change::Updated(_) | Change::Replaced(_)
            )
        })
        .map(|r| {
            let names = find_pci_ids()
                .and_then(|p| Names::lookup_records(&p, std::slice::from_ref(r)).ok())
                .unwrap_or_default();
            NamedRecord::new(r, &names)
        });
    MapChange { change, device }
}

fn change_text(change: Change, record: Option<&DeviceRecord>) -> String {
    let mut s = change.kind().to_owned();
    if let Some(r) = record.filter(|_| {
        matches!(
            change,
            Change::Added(_) | Change::Updated(_) | Change::Replaced(_)
        )
    }) {
        if let (Some(v), Some(d)) = (r.vendor, r.device) {
            s.push_str(&format!(" {:04x}:{:04x}", v.0, d.0));
        }
        s.push_str(&format!(", driver {}", r.driver.as_deref().unwrap_or("none")));
    }
    s
}
