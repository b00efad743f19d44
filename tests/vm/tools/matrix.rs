//! `pcibus-matrix`: the holder of the removal matrix (issue 14 §6, tests/vm/guest/z1x-*.sh).
//!
//! ```text
//! pcibus-matrix hold ADDR MODE [--bar-only]
//! ```
//!
//! A storage service as a user of the library would write it: a [`Bus`] with a driver on
//! ADDR (bound to vfio-pci, claimed), run until the device leaves, however it leaves. The
//! test script makes it leave (sysfs `remove`, an unbind, `sriov_numvfs=0` on the PF, a
//! QMP unplug, ...) once the holder prints `matrix: ready` (or `matrix: probing`). MODE is
//! the holder's state when that happens:
//!
//! | MODE | the holder |
//! |---|---|
//! | `idle` | holds the controller, nothing in flight |
//! | `io` | runs random 4 KiB reads at QD 32 |
//! | `probe` | is inside the driver's probe (which takes 3 s) |
//! | `leak` | its driver keeps a handle of the device after `remove`, for 2 s |
//! | `panic` | its driver panics in `remove` |
//! | `scan` | a second thread scans with every blocking attribute requested, every 100 ms |
//!
//! Before `ready` it writes 8 stamped blocks at LBA 4096 (`pcibus-matrix lba=N seed=S`),
//! which the script reads back through the kernel's driver afterwards. `--bar-only`: the
//! driver only maps BAR 0 (a VF whose controller is offline has no queues), no stamps.
//!
//! At the end it prints `matrix: summary key=value...` and exits 0 only if: the bus
//! reported the removal, the device's claim went (after the leaked handle, if any), no
//! scan read a blocking attribute of the held device (or its PF) or timed out on one, and
//! the process's open fds and locked/pinned memory are back to what they were before the
//! bus existed. Exit 1 with `matrix: FAIL ...` lines otherwise.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use pcibus::bus::claim::ClaimDir;
use pcibus::bus::devargs::Selection;
use pcibus::bus::id::{CLASS_EXACT, IdEntry};
use pcibus::bus::map::DeviceMap;
use pcibus::bus::{
    BindPolicy, Bus, BusEvent, DeviceBacking, Driver, ProbeDevice, ProbeOutcome, RegisterIo, Removal,
    VfioAttach, VfioBacking,
};
use pcibus::hotplug::monitor::UeventMonitor;
use pcibus::nvme::driver::NvmeDriver;
use pcibus::nvme::perf::{PerfConfig, Progress};
use pcibus::nvme::{Controller, Op, Options};
use pcibus::vfio::{MappedBar, VfioBackend};
use pcibus::{BlockingAttr, PciAddress, ProblemKind, Scanner, SysfsRoot};

#[path = "process.rs"]
mod process;
use process::{Usage, usage};

const SYS: &str = "/sys";
const STAMP_LBA: u64 = 4096;
const STAMP_BLOCKS: u64 = 8;
/// How long the holder waits for the device to leave once it is ready.
const LIMIT: Duration = Duration::from_secs(40);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Idle,
    Io,
    Probe,
    Leak,
    Panic,
    Scan,
}

impl Mode {
    fn parse(s: &str) -> Option<Mode> {
        Some(match s {
            "idle" => Mode::Idle,
            "io" => Mode::Io,
            "probe" => Mode::Probe,
            "leak" => Mode::Leak,
            "panic" => Mode::Panic,
            "scan" => Mode::Scan,
            _ => return None,
        })
    }
}

/// The driver under test: the in-tree NVMe driver (or a BAR-only one), with the mode's
/// misbehaviour around it.
struct MatrixDriver {
    table: [IdEntry; 1],
    mode: Mode,
    nvme: Option<NvmeDriver<VfioBacking>>,
    // Handles kept past `remove` in `leak` mode.
    leaked: Vec<VfioBacking>,
    removed: Arc<AtomicBool>,
}

// What the matrix driver keeps of a device.
struct MatrixDevice {
    // A handle of the device; kept past `remove` in `leak` mode.
    handle: VfioBacking,
    // The NVMe driver's controller, or (BAR-only) BAR 0.
    nvme: Option<Controller<VfioBacking>>,
    bar: Option<(VfioBacking, MappedBar)>,
}

impl Driver<VfioBacking> for MatrixDriver {
    type Device = MatrixDevice;

    fn name(&self) -> &str {
        "matrix"
    }

    fn id_table(&self) -> &[IdEntry] {
        &self.table
    }

    fn probe(&mut self, dev: ProbeDevice<'_, VfioBacking>) -> ProbeOutcome<MatrixDevice> {
        if self.mode == Mode::Probe {
            println!("matrix: probing {}", dev.record.address);
            thread::sleep(Duration::from_secs(3));
        }
        let handle = dev.backing.clone();
        match &mut self.nvme {
            Some(nvme) => match nvme.probe(dev) {
                ProbeOutcome::Bound(c) => ProbeOutcome::Bound(MatrixDevice {
                    handle,
                    nvme: Some(c),
                    bar: None,
                }),
                ProbeOutcome::NotMine => ProbeOutcome::NotMine,
                ProbeOutcome::Failed(e) => ProbeOutcome::Failed(e),
            },
            None => {
                let bar = match dev.backing.map_bar(0) {
                    Ok(b) => b,
                    Err(e) => return ProbeOutcome::Failed(e.into()),
                };
                let vs = RegisterIo::read32(&bar, 8).unwrap_or(u32::MAX);
                println!("matrix: {} BAR 0 mapped, VS {vs:#x}", dev.record.address);
                ProbeOutcome::Bound(MatrixDevice {
                    handle,
                    nvme: None,
                    bar: Some((dev.backing.clone(), bar)),
                })
            }
        }
    }

    fn remove(&mut self, device: MatrixDevice, removal: &Removal) {
        let address = removal.address;
        println!("matrix: remove {address}: {}", removal.cause);
        if self.mode == Mode::Leak {
            self.leaked.push(device.handle);
        }
        if let (Some(nvme), Some(c)) = (&mut self.nvme, device.nvme) {
            nvme.remove(c, removal);
        }
        drop(device.bar);
        self.removed.store(true, Ordering::Release);
        if self.mode == Mode::Panic {
            panic!("matrix: the driver panics in remove, as a buggy one would");
        }
    }
}

fn stamp(lba: u64, seed: u64, block: usize) -> Vec<u8> {
    let mut b = format!("pcibus-matrix lba={lba} seed={seed}\n").into_bytes();
    b.resize(block, b'.');
    b
}

// Writes the stamped blocks through the driver's controller.
fn write_stamps(bus: &mut Bus<VfioAttach>, address: PciAddress, seed: u64) -> Result<(), String> {
    let c = bus
        .device_state::<MatrixDriver>(address)
        .and_then(|d| d.nvme.clone())
        .ok_or("no controller")?;
    let ns = c.namespace(1).ok_or("no namespace 1")?;
    let bs = ns.block_size as usize;
    let buf = c
        .alloc_buffer(bs * STAMP_BLOCKS as usize)
        .map_err(|e| e.to_string())?;
    for i in 0..STAMP_BLOCKS {
        buf.write_at(i as usize * bs, &stamp(STAMP_LBA + i, seed, bs))
            .ok_or("buffer write out of range")?;
    }
    let mut q = c.io_queue(8).map_err(|e| e.to_string())?;
    q.write(1, STAMP_LBA, STAMP_BLOCKS, &buf, 0)
        .map_err(|e| e.to_string())?;
    q.flush(1).map_err(|e| e.to_string())?;
    println!("matrix: stamped lba={STAMP_LBA} blocks={STAMP_BLOCKS} seed={seed} block_size={bs}");
    Ok(())
}

// What the scan thread saw wrong: values or timeouts of blocking attributes of `watch`.
fn scan_loop(
    watch: Vec<PciAddress>,
    stop: Arc<AtomicBool>,
    bad: Arc<parking_lot::Mutex<Vec<String>>>,
    scans: Arc<AtomicU64>,
) {
    let scanner = BlockingAttr::ALL.into_iter().fold(
        Scanner::new(SysfsRoot::new(SYS)).timeout(Duration::from_secs(2)),
        Scanner::read_blocking,
    );
    while !stop.load(Ordering::Acquire) {
        if let Ok(scan) = scanner.scan() {
            for a in &watch {
                let Some(d) = scan.get(*a) else { continue };
                for p in &d.problems {
                    if matches!(
                        p.kind,
                        ProblemKind::TimedOut { .. } | ProblemKind::NotStarted { .. }
                    ) {
                        bad.lock().push(format!("{a} {}: {}", p.attribute, p.kind));
                    }
                }
            }
        }
        scans.fetch_add(1, Ordering::Relaxed);
        thread::sleep(Duration::from_millis(100));
    }
}

fn holds(list: &[(PciAddress, &str)], address: PciAddress) -> bool {
    list.iter().any(|(a, _)| *a == address)
}

fn hold(address: PciAddress, mode: Mode, bar_only: bool) -> Result<(), Vec<String>> {
    let mut fails = Vec::new();
    let before = usage();
    let root = SysfsRoot::new(SYS);
    let physfn = pcibus::vfio::physfn(&root, address);
    // Unique per run: the blocks read back must be this run's, not a previous cell's.
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64);
    let removed = Arc::new(AtomicBool::new(false));
    let t0 = Instant::now();
    let mut released_at = None;
    let mut removal_seen = None;
    let mut leak_dropped = mode != Mode::Leak;
    {
        let mut monitor = UeventMonitor::open()
            .map_err(|e| vec![e.to_string()])?
            .pci_only(true);
        let map = DeviceMap::new(Scanner::new(root.clone())).map_err(|e| vec![e.to_string()])?;
        let attach = VfioAttach::new(
            root.clone(),
            BindPolicy {
                bind: true,
                force: false,
                restore: false,
            },
        )
        .backend(VfioBackend::from_env().unwrap_or_default());
        let selection =
            Selection::from_args([("-a", address.to_string())]).map_err(|e| vec![e.to_string()])?;
        let mut bus = Bus::new(map, attach)
            .selection(selection)
            .settle(Duration::from_millis(200));
        bus.register(Box::new(MatrixDriver {
            table: [IdEntry::class(0x01_08_02, CLASS_EXACT)],
            mode,
            nvme: (!bar_only).then(|| NvmeDriver::new(Options::default())),
            leaked: Vec::new(),
            removed: Arc::clone(&removed),
        }));

        let stop = Arc::new(AtomicBool::new(false));
        let bad = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let scans = Arc::new(AtomicU64::new(0));
        let scanner = (mode == Mode::Scan).then(|| {
            let watch: Vec<PciAddress> = std::iter::once(address).chain(physfn).collect();
            let (stop, bad, scans) = (Arc::clone(&stop), Arc::clone(&bad), Arc::clone(&scans));
            thread::spawn(move || scan_loop(watch, stop, bad, scans))
        });

        // Probe (in probe mode the script acts while it runs).
        for r in bus.probe_all() {
            if let Err(e) = &r.result {
                println!("matrix: probe {}: {e}", r.address);
                if mode == Mode::Probe {
                    // The device left while the driver probed it: the bus rolled back, and
                    // what is left to check is that everything was released.
                    removal_seen = Some(Instant::now());
                } else {
                    fails.push(format!("probe {}: {e}", r.address));
                }
            }
        }
        let mut load = None;
        if holds(&bus.held(), address) {
            if !bar_only && let Err(e) = write_stamps(&mut bus, address, seed) {
                fails.push(format!("stamps: {e}"));
            }
            if mode == Mode::Io && !bar_only {
                let c = bus
                    .device_state::<MatrixDriver>(address)
                    .and_then(|d| d.nvme.clone());
                if let Some(c) = c {
                    let progress = Arc::new(Progress::default());
                    let p = Arc::clone(&progress);
                    let cfg = PerfConfig {
                        op: Op::Read,
                        random: true,
                        io_size: 4096,
                        queue_depth: 32,
                        queues: 1,
                        duration: LIMIT,
                        nsid: 1,
                        spin: None,
                        rwmix_read: None,
                    };
                    let h = thread::spawn(move || pcibus::nvme::perf::run(&c, &cfg, &p));
                    // Running before the script acts.
                    let t = Instant::now();
                    while progress.ios.load(Ordering::Relaxed) < 100 && t.elapsed() < Duration::from_secs(5) {
                        thread::sleep(Duration::from_millis(10));
                    }
                    println!(
                        "matrix: I/O running ({} done)",
                        progress.ios.load(Ordering::Relaxed)
                    );
                    load = Some((h, progress));
                }
            }
            println!("matrix: ready {address} mode={mode:?}");
        } else if mode != Mode::Probe {
            fails.push("the bus holds nothing after probing".into());
        }

        // Run until the device has left and is released.
        let claims = ClaimDir::from_env();
        loop {
            if t0.elapsed() > LIMIT {
                fails.push(format!("not released within {} s", LIMIT.as_secs()));
                break;
            }
            match bus.wait(Some(&mut monitor), Duration::from_millis(100)) {
                Ok(events) => {
                    for e in events {
                        println!("matrix: +{} ms: {e}", t0.elapsed().as_millis());
                        if let BusEvent::Removed(r) = &e
                            && r.address == address
                        {
                            removal_seen = Some(Instant::now());
                            if let Some((h, p)) = load.take() {
                                p.stop.store(true, Ordering::Relaxed);
                                let r = h.join();
                                println!(
                                    "matrix: I/O stopped: {} done, {} failed, {}",
                                    p.ios.load(Ordering::Relaxed),
                                    p.errors.load(Ordering::Relaxed),
                                    match r {
                                        Ok(Ok(_)) => "ended".to_string(),
                                        Ok(Err(e)) => format!("ended with: {e}"),
                                        Err(_) => "the load thread panicked".to_string(),
                                    }
                                );
                            }
                        }
                    }
                }
                Err(e) => println!("matrix: bus wait: {e}"),
            }
            if removal_seen.is_none() && removed.load(Ordering::Acquire) && !holds(&bus.held(), address) {
                removal_seen = Some(Instant::now());
            }
            if let Some(seen) = removal_seen {
                if !leak_dropped && seen.elapsed() > Duration::from_secs(2) {
                    if let Some(d) = bus.driver_mut::<MatrixDriver>() {
                        println!("matrix: dropping {} leaked handle(s)", d.leaked.len());
                        d.leaked.clear();
                    }
                    leak_dropped = true;
                }
                let live = claims
                    .list()
                    .map(|l| l.iter().any(|c| c.address == address && c.live))
                    .unwrap_or(false);
                let parked = holds(&bus.releasing(), address);
                if leak_dropped && !live && !parked && !holds(&bus.held(), address) {
                    released_at = Some(t0.elapsed());
                    break;
                }
            }
        }
        if let Some((h, p)) = load.take() {
            p.stop.store(true, Ordering::Relaxed);
            let _ = h.join();
        }
        stop.store(true, Ordering::Release);
        if let Some(s) = scanner {
            let _ = s.join();
            println!("matrix: {} scans ran meanwhile", scans.load(Ordering::Relaxed));
        }
        fails.extend(bad.lock().drain(..).map(|b| format!("a scan timed out: {b}")));
        drop(bus);
    }
    let after = usage();
    println!(
        "matrix: summary mode={mode:?} removal_seen={} released_ms={} fds={}->{} vmlck_kb={}->{} vmpin_kb={}->{}",
        removal_seen.is_some(),
        released_at.map_or(-1, |d| d.as_millis() as i64),
        before.fds,
        after.fds,
        before.lck_kb,
        after.lck_kb,
        before.pin_kb,
        after.pin_kb
    );
    if removal_seen.is_none() {
        fails.push("the bus never reported the removal".into());
    }
    // What a removal must give back: fds and locked memory (RSS and maps move with the
    // allocator).
    let held = |u: &Usage| (u.fds, u.lck_kb, u.pin_kb);
    if held(&after) != held(&before) {
        fails.push(format!("process usage not back: {before:?} -> {after:?}"));
    }
    if fails.is_empty() { Ok(()) } else { Err(fails) }
}

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let parsed = match args.as_slice() {
        ["hold", addr, mode, rest @ ..] => match (addr.parse::<PciAddress>(), Mode::parse(mode)) {
            (Ok(a), Some(m)) => Some((a, m, rest.contains(&"--bar-only"))),
            _ => None,
        },
        _ => None,
    };
    let Some((address, mode, bar_only)) = parsed else {
        eprintln!("usage: pcibus-matrix hold ADDR idle|io|probe|leak|panic|scan [--bar-only]");
        return std::process::ExitCode::from(2);
    };
    match hold(address, mode, bar_only) {
        Ok(()) => {
            println!("matrix: PASS");
            std::process::ExitCode::SUCCESS
        }
        Err(fails) => {
            for f in fails {
                println!("matrix: FAIL {f}");
            }
            std::process::ExitCode::FAILURE
        }
    }
}
