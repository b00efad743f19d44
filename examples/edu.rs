//! `edu`: the in-tree driver for QEMU's edu device ([`pcibus::drivers::edu`]) run by a
//! [`Bus`], as an application would run it (the VM suite's `d4-edu-driver.sh` does).
//!
//! ```text
//! edu [ADDRESS...] [--kind best|msi|intx] [--seconds N] [--settle-ms N] [--timeout-ms N]
//! ```
//!
//! With addresses, the bus takes only those (an allow list); without, every device the
//! driver's id table matches (1234:11e8). Each device is bound to vfio-pci, probed and
//! self-tested (liveness, an interrupt, `12!`, a DMA round trip). Then an event loop waits
//! on the bus's one event fd ([`Bus::event_fd`]), the uevent monitor and a signalfd, with a
//! timeout ([`Bus::next_deadline`], at most a second): a removal request (an operator's
//! sysfs `remove` or unbind) takes the device from the driver at once, so the kernel's
//! removal completes; a device that comes back (a rescan) is probed again after the settle
//! delay and self-tested again. SIGTERM or SIGINT (or `--seconds`) detaches every device
//! (each goes back to the driver it had) and ends the program: status 0 if every
//! self-test passed (and one ran at least), 1 if not, 2 on a usage or setup error.
//!
//! Output, one event a line: `edu: ADDRESS bound`, `edu: ADDRESS self-test passed: ...`,
//! `edu: ADDRESS removed (CAUSE), N handle(s) kept`, `edu: +MS ms: EVENT` for what the bus
//! reports, `edu: ready (N device(s))` once the first probes are done, and a last line
//! `edu: done: P self-test(s) passed, F failed`.

use std::os::fd::{AsFd, OwnedFd};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use pcibus::bus::devargs::Selection;
use pcibus::bus::map::DeviceMap;
use pcibus::bus::{BindPolicy, Bus, BusEvent, InterruptKind, VfioAttach, VfioBacking};
use pcibus::drivers::edu::{EduDriver, EduOptions};
use pcibus::hotplug::monitor::UeventMonitor;
use pcibus::vfio::VfioBackend;
use pcibus::{PciAddress, Scanner, SysfsRoot};

type Error = Box<dyn std::error::Error>;

struct Args {
    addresses: Vec<PciAddress>,
    kind: Option<InterruptKind>,
    seconds: Option<u64>,
    settle: Duration,
    timeout: Duration,
}

fn parse_args() -> Result<Args, Error> {
    let mut args = Args {
        addresses: Vec::new(),
        kind: None,
        seconds: None,
        settle: Duration::from_millis(200),
        timeout: Duration::from_secs(5),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().ok_or_else(|| format!("{name} needs a value"));
        match arg.as_str() {
            "--kind" => {
                args.kind = match value("--kind")?.as_str() {
                    "best" => None,
                    kind => Some(kind.parse()?),
                }
            }
            "--seconds" => args.seconds = Some(value("--seconds")?.parse()?),
            "--settle-ms" => args.settle = Duration::from_millis(value("--settle-ms")?.parse()?),
            "--timeout-ms" => args.timeout = Duration::from_millis(value("--timeout-ms")?.parse()?),
            "-h" | "--help" => {
                return Err(
                    "usage: edu [ADDRESS...] [--kind best|msi|intx] [--seconds N] [--settle-ms N] [--timeout-ms N]"
                        .into(),
                );
            }
            address => args.addresses.push(address.parse()?),
        }
    }
    Ok(args)
}

fn main() -> ExitCode {
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("edu: {e}");
            ExitCode::from(2)
        }
    }
}

/// The self-tests' tally.
#[derive(Default)]
struct Tally {
    passed: usize,
    failed: usize,
}

/// Self-tests the device at `address`, if the driver holds it.
fn self_test(bus: &mut Bus<VfioAttach>, address: PciAddress, tally: &mut Tally) {
    let Some(edu) = bus.device_state_mut::<EduDriver<VfioBacking>>(address) else {
        return;
    };
    match edu.self_test() {
        Ok(report) => {
            tally.passed += 1;
            println!("edu: {address} self-test passed: {report}");
        }
        Err(e) => {
            tally.failed += 1;
            println!("edu: {address} self-test FAILED: {e}");
        }
    }
}

/// Prints what the bus did, and self-tests devices it bound.
fn report(bus: &mut Bus<VfioAttach>, events: Vec<BusEvent>, start: Instant, tally: &mut Tally) {
    for event in events {
        println!("edu: +{} ms: {event}", start.elapsed().as_millis());
        match event {
            BusEvent::Probed(p) => match p.result {
                Ok(_) => {
                    println!("edu: {} bound", p.address);
                    self_test(bus, p.address, tally);
                }
                Err(e) => println!("edu: {} not bound: {e}", p.address),
            },
            BusEvent::Removed(r) => {
                println!(
                    "edu: {} removed ({}), {} handle(s) kept",
                    r.address, r.cause, r.leaked
                )
            }
            _ => {}
        }
    }
}

fn run() -> Result<bool, Error> {
    let args = parse_args()?;
    // SIGTERM and SIGINT arrive through a signalfd, in the loop: blocked first, so that the
    // bus's probe threads inherit the mask.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGTERM);
    signals.add(Signal::SIGINT);
    signals.thread_block()?;
    let signal_fd = SignalFd::with_flags(&signals, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)?;
    // A surprise-removed device's BAR then reads all-ones instead of killing the process.
    if let Err(e) = pcibus::vfio::fault::install() {
        eprintln!("edu: no SIGBUS handler ({e}): a surprise removal would end the process");
    }

    let root = SysfsRoot::new("/sys");
    let policy = BindPolicy {
        bind: true,
        force: false,
        restore: true,
    };
    let attach = VfioAttach::new(root.clone(), policy).backend(VfioBackend::from_env()?.resolve());
    let selection = Selection::from_args(args.addresses.iter().map(|a| ("-a", a.to_string())))?;
    let mut bus = Bus::new(DeviceMap::new(Scanner::new(root))?, attach)
        .selection(selection)
        .settle(args.settle);
    let mut options = EduOptions::new().timeout(args.timeout);
    options.interrupts = args.kind;
    bus.register(Box::new(EduDriver::<VfioBacking>::with_options(options)));
    let mut monitor = UeventMonitor::open()?.pci_only(true);

    let start = Instant::now();
    let mut tally = Tally::default();
    let probed = bus.probe_all();
    let events = probed.into_iter().map(BusEvent::Probed).collect();
    report(&mut bus, events, start, &mut tally);
    println!("edu: ready ({} device(s))", bus.held().len());

    // The bus's one fd: a dup of its epoll fd, which stays the same for the bus's life,
    // so the loop needs no borrow of the bus while it waits.
    let bus_fd: OwnedFd = bus.event_fd()?.try_clone_to_owned()?;
    let end = args.seconds.map(|s| start + Duration::from_secs(s));
    loop {
        let now = Instant::now();
        if end.is_some_and(|end| now >= end) {
            println!("edu: {} s passed", args.seconds.unwrap_or(0));
            break;
        }
        let until = [bus.next_deadline(), end, Some(now + Duration::from_secs(1))]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(now);
        let ms = until.saturating_duration_since(now).as_micros().div_ceil(1000);
        let timeout =
            PollTimeout::try_from(i32::try_from(ms).unwrap_or(i32::MAX)).unwrap_or(PollTimeout::MAX);
        let mut fds = [
            PollFd::new(bus_fd.as_fd(), PollFlags::POLLIN),
            PollFd::new(monitor.as_fd(), PollFlags::POLLIN),
            PollFd::new(signal_fd.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, timeout) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
        if let Some(signal) = signal_fd.read_signal()? {
            let name = Signal::try_from(signal.ssi_signo as i32).map_or("a signal", |s| s.as_str());
            println!("edu: {name}: detaching");
            break;
        }
        // Removal requests first (as `Bus::wait` does): a removal in progress has already
        // dropped the device's driver link, so its uevent, handled first, would read as
        // an unbind.
        let mut events = bus.poll();
        while let Some(event) = monitor.try_next()? {
            events.extend(bus.poll());
            events.extend(bus.handle(&event)?);
        }
        events.extend(bus.poll());
        report(&mut bus, events, start, &mut tally);
    }

    let held: Vec<PciAddress> = bus.held().into_iter().map(|(address, _)| address).collect();
    for address in held {
        match bus.detach(address) {
            Ok(r) if r.leaked == 0 && r.error.is_none() => println!("edu: {address} detached"),
            Ok(r) => println!(
                "edu: {address} detached, {} handle(s) kept, {}",
                r.leaked,
                r.error.map_or("no error".to_owned(), |e| e.to_string())
            ),
            Err(e) => println!("edu: {address} not detached: {e}"),
        }
    }
    drop(bus);
    println!(
        "edu: done: {} self-test(s) passed, {} failed",
        tally.passed, tally.failed
    );
    Ok(tally.failed == 0 && tally.passed > 0)
}
