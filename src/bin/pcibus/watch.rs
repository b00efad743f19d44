//! `pcibus watch`: the kernel's PCI hotplug events as they happen, until interrupted.
//!
//! The monitor socket and a signalfd for SIGINT and SIGTERM are waited on together, so an
//! interrupt ends the command between two events with its output flushed and status 0.

use std::io::Write;

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use serde_json::{Value, json};

use pcibus::bus::devargs::Selection;
use pcibus::hotplug::event::Uevent;
use pcibus::hotplug::monitor::{Event, UeventMonitor};

type Error = Box<dyn std::error::Error>;

const MONITOR: u64 = 0;
const SIGNAL: u64 = 1;

/// Prints events (one JSON object per line with `json`) of devices `selection` admits
/// (every kernel uevent with `all`), until SIGINT or SIGTERM.
pub(super) fn watch(out: &mut impl Write, json: bool, all: bool, selection: &Selection) -> Result<(), Error> {
    // Blocked before the monitor opens, so that an interrupt is never lost between events.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGTERM);
    signals.thread_block()?;
    let signal_fd = SignalFd::with_flags(&signals, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)?;
    let mut monitor = UeventMonitor::open()?.pci_only(!all);
    let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
    epoll.add(&monitor, EpollEvent::new(EpollFlags::EPOLLIN, MONITOR))?;
    epoll.add(&signal_fd, EpollEvent::new(EpollFlags::EPOLLIN, SIGNAL))?;
    if !json {
        writeln!(
            out,
            "watching {} uevents; interrupt to stop",
            if all { "all" } else { "PCI" }
        )?;
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
                    if json {
                        writeln!(out, "{}", event_json(&u))?;
                    } else {
                        writeln!(out, "{}", event_line(&u))?;
                    }
                }
                Event::Overflow => {
                    if json {
                        writeln!(out, "{}", json!({ "overflow": true }))?;
                    } else {
                        writeln!(out, "overflow: the kernel dropped events; rescan (`pcibus list`)")?;
                    }
                }
            }
        }
        out.flush()?;
    }
}

fn event_json(u: &Uevent) -> Value {
    json!({
        "action": u.action.to_string(),
        "address": u.pci_address().map(|a| a.to_string()),
        "subsystem": u.subsystem,
        "devpath": u.devpath,
        "driver": u.driver,
        "seqnum": u.seqnum,
    })
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
