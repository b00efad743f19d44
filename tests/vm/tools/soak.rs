//! `pcibus-soak`: the chaos soak of the VM suite (issue 14 §7, tests/vm/guest/soak.sh).
//!
//! ```text
//! pcibus-soak ADDR EVENTS [--seed N] [--kinds remove,unbind,unplug]
//! ```
//!
//! A storage service as a user of the library would write it: a [`Bus`] with the in-tree
//! NVMe driver on ADDR, a writer thread stamping blocks of a region of namespace 1 (each
//! block carries its LBA, a generation and a checksum), a reader thread keeping 32 random
//! reads in flight, and, in a third thread, EVENTS random removals drawn from `--kinds`:
//! sysfs `remove` (then a rescan), an unbind from vfio-pci (then a bind back), a QMP
//! unplug (then a plug; through lib.sh's `qmp`, hotplug VMs only). After each event the
//! device comes back, the bus attaches it again, and the writer re-issues the writes that
//! were in flight when it left. At the end every block of the region is read back.
//!
//! A block is **corrupt** if its LBA or checksum is wrong, **lost** if its generation is
//! older than the last write the device acknowledged (a write in flight at a removal may or
//! may not have landed: either generation is right). A **hang** is a removal that is not
//! released, or a device not attached again, within 30 s. After each event it samples the
//! process (fds, VmRSS, memory maps, VmLck, VmPin) and the guest (tasks in D state for
//! more than 2 s). The last line is `soak: summary key=value...`; the exit status is 0
//! only with no corrupt or lost block, no hang, no stuck task, and fds and maps flat.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use pcibus::bus::devargs::Selection;
use pcibus::bus::map::DeviceMap;
use pcibus::bus::{BindPolicy, Bus, BusEvent, VfioAttach, VfioBacking};
use pcibus::hotplug::monitor::UeventMonitor;
use pcibus::nvme::driver::NvmeDriver;
use pcibus::nvme::perf::{PerfConfig, Progress};
use pcibus::nvme::{Controller, Op, Options};
use pcibus::vfio::VfioBackend;
use pcibus::{PciAddress, Scanner, SysfsRoot};

#[path = "process.rs"]
mod process;
use process::{Usage as Sample, usage as sample};

const SYS: &str = "/sys";
/// The region stamped: LBAs [REGION_START, REGION_START + REGION_BLOCKS).
const REGION_START: u64 = 16_384;
const REGION_BLOCKS: u64 = 2_048;
/// How long a removal may take to be released, and a device to be attached again.
const HANG: Duration = Duration::from_secs(30);
const MAGIC: &[u8; 8] = b"PCIBSOAK";

/// The library's warnings and errors, printed, and what the soak counts: DMA regions
/// that could not be unmapped (leaked, from the log), and removals after which the driver
/// still held the device (from the bus's `RemovedReport::leaked`).
struct Logger {
    unmap_failures: AtomicU64,
    kept_handles: AtomicU64,
}

static LOGGER: Logger = Logger {
    unmap_failures: AtomicU64::new(0),
    kept_handles: AtomicU64::new(0),
};

impl log::Log for Logger {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        m.level() <= log::Level::Warn
    }
    fn log(&self, r: &log::Record<'_>) {
        if !self.enabled(r.metadata()) {
            return;
        }
        let text = r.args().to_string();
        if text.contains("could not be unmapped") {
            self.unmap_failures.fetch_add(1, Ordering::Relaxed);
        }
        println!("soak: log {}: {text}", r.level());
    }
    fn flush(&self) {}
}

/// xorshift64*: reproducible from `--seed`, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// The block written at `lba` in generation `gen`.
fn block(lba: u64, generation: u64, size: usize) -> Vec<u8> {
    let mut b = vec![0u8; size];
    b[..8].copy_from_slice(MAGIC);
    b[8..16].copy_from_slice(&lba.to_le_bytes());
    b[16..24].copy_from_slice(&generation.to_le_bytes());
    let mut x = lba.wrapping_mul(31).wrapping_add(generation) | 1;
    for byte in &mut b[24..size - 8] {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *byte = x as u8;
    }
    let sum = fnv1a(&b[..size - 8]);
    b[size - 8..].copy_from_slice(&sum.to_le_bytes());
    b
}

/// What a block read back says: `Ok((lba, generation))`, or why it is corrupt.
fn check(bytes: &[u8]) -> Result<(u64, u64), String> {
    let size = bytes.len();
    if &bytes[..8] != MAGIC {
        return Err("no stamp".into());
    }
    let sum = u64::from_le_bytes(bytes[size - 8..].try_into().unwrap_or_default());
    if fnv1a(&bytes[..size - 8]) != sum {
        return Err("bad checksum".into());
    }
    let lba = u64::from_le_bytes(bytes[8..16].try_into().unwrap_or_default());
    let generation = u64::from_le_bytes(bytes[16..24].try_into().unwrap_or_default());
    Ok((lba, generation))
}

/// Per LBA: the last generation the device acknowledged, and one in flight (written, not
/// acknowledged: it may or may not have landed).
#[derive(Default)]
struct Ledger {
    acked: BTreeMap<u64, u64>,
    in_flight: BTreeMap<u64, u64>,
    writes: u64,
    reissued: u64,
}

// The writer: stamps random blocks of the region, one at a time, until told to stop or
// the controller fails; first re-issues what was in flight when the device last left.
fn writer(
    c: Controller<VfioBacking>,
    ledger: Arc<Mutex<Ledger>>,
    stop: Arc<AtomicBool>,
    mut rng: Rng,
) -> String {
    let Some(ns) = c.namespace(1) else {
        return "no namespace 1".into();
    };
    let bs = ns.block_size as usize;
    let buf = match c.alloc_buffer(bs) {
        Ok(b) => b,
        Err(e) => return format!("buffer: {e}"),
    };
    let mut q = match c.io_queue(4) {
        Ok(q) => q,
        Err(e) => return format!("queue: {e}"),
    };
    let reissue: Vec<(u64, u64)> = ledger.lock().in_flight.iter().map(|(l, g)| (*l, *g)).collect();
    let mut todo = reissue.clone();
    loop {
        if stop.load(Ordering::Relaxed) {
            return "stopped".into();
        }
        let (lba, generation, again) = match todo.pop() {
            Some((l, g)) => (l, g, true),
            None => {
                let lba = REGION_START + rng.below(REGION_BLOCKS);
                let g = ledger.lock().acked.get(&lba).copied().unwrap_or(0) + 1;
                (lba, g, false)
            }
        };
        ledger.lock().in_flight.insert(lba, generation);
        if buf.write_at(0, &block(lba, generation, bs)).is_none() {
            return "buffer write out of range".into();
        }
        match q.write(1, lba, 1, &buf, 0) {
            Ok(()) => {
                let mut l = ledger.lock();
                l.in_flight.remove(&lba);
                l.acked.insert(lba, generation);
                l.writes += 1;
                if again {
                    l.reissued += 1;
                }
            }
            // The device left: the write stays in flight, to be re-issued.
            Err(e) => return format!("write failed: {e}"),
        }
    }
}

// Tasks of the guest in D state now and still 2 s later.
fn stuck_tasks() -> Vec<String> {
    fn d_state() -> Vec<String> {
        let mut out = Vec::new();
        for p in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(tasks) = std::fs::read_dir(p.path().join("task")) else {
                continue;
            };
            for t in tasks.flatten() {
                let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
                if stat
                    .rsplit_once(") ")
                    .is_some_and(|(_, rest)| rest.starts_with('D'))
                {
                    out.push(t.path().display().to_string());
                }
            }
        }
        out
    }
    let first = d_state();
    if first.is_empty() {
        return first;
    }
    thread::sleep(Duration::from_secs(2));
    let now = d_state();
    first.into_iter().filter(|t| now.contains(t)).collect()
}

fn spawn<T: Send + 'static>(name: &str, f: impl FnOnce() -> T + Send + 'static) -> thread::JoinHandle<T> {
    thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .unwrap_or_else(|e| panic!("spawning {name}: {e}"))
}

// Joins `h` if it ends within `limit`.
fn join_within<T>(h: thread::JoinHandle<T>, limit: Duration) -> Option<T> {
    if wait_until(limit, || h.is_finished()) {
        h.join().ok()
    } else {
        None
    }
}

// Every thread of this process: its state, where it waits, its kernel stack.
fn dump_threads() {
    for t in std::fs::read_dir("/proc/self/task")
        .into_iter()
        .flatten()
        .flatten()
    {
        let read = |f: &str| std::fs::read_to_string(t.path().join(f)).unwrap_or_default();
        let stat = read("stat");
        let state = stat.rsplit_once(") ").map_or("?", |(_, r)| &r[..1]);
        println!(
            "soak: thread {} ({}) state {state} wchan {}",
            t.file_name().to_string_lossy(),
            read("comm").trim(),
            read("wchan")
        );
        for line in read("stack").lines() {
            println!("soak:     {line}");
        }
    }
}

fn write_sys(path: &str, value: &str) -> Result<(), String> {
    std::fs::write(path, value).map_err(|e| format!("{path} <- {value}: {e}"))
}

fn qmp(json: &str) -> Result<(), String> {
    let lib = std::env::var("PCIBUS_LIB").map_err(|_| "no PCIBUS_LIB (not in the VM suite)")?;
    let status = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(". {lib}; qmp '{json}' 30"))
        .status()
        .map_err(|e| e.to_string())?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("qmp {json} failed"))
    }
}

fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let t = Instant::now();
    while t.elapsed() < limit {
        if f() {
            return true;
        }
        thread::sleep(Duration::from_millis(20));
    }
    false
}

// Makes the device leave as `kind` says, and come back.
fn event(kind: &str, address: PciAddress) -> Result<(), String> {
    let dir = format!("{SYS}/bus/pci/devices/{address}");
    let gone = || !std::path::Path::new(&dir).exists();
    match kind {
        "remove" => {
            write_sys(&format!("{dir}/remove"), "1")?;
            if !wait_until(HANG, gone) {
                return Err("still there after remove".into());
            }
            write_sys(&format!("{SYS}/bus/pci/rescan"), "1")
        }
        "unbind" => {
            write_sys(
                &format!("{SYS}/bus/pci/drivers/vfio-pci/unbind"),
                &address.to_string(),
            )?;
            // driver_override still says vfio-pci: a probe binds it back there.
            write_sys(&format!("{SYS}/bus/pci/drivers_probe"), &address.to_string())
        }
        "unplug" => {
            qmp(r#"{"execute":"device_del","arguments":{"id":"nvme0"}}"#)?;
            qmp(
                r#"{"execute":"device_add","arguments":{"driver":"nvme","id":"nvme0","bus":"rp0","serial":"feed","subsys":"subsys0"}}"#,
            )
        }
        _ => Err(format!("unknown event kind {kind}")),
    }
}

// A running load: the writer (and its stop flag), the reader (and its progress).
type Load = (
    thread::JoinHandle<String>,
    Arc<AtomicBool>,
    thread::JoinHandle<()>,
    Arc<Progress>,
);

// Starts the writer and a reader keeping 32 random reads in flight.
fn start_load(c: Controller<VfioBacking>, ledger: &Arc<Mutex<Ledger>>, rng: Rng) -> Load {
    let stop = Arc::new(AtomicBool::new(false));
    let w = {
        let (c, ledger, stop) = (c.clone(), Arc::clone(ledger), Arc::clone(&stop));
        spawn("soak-writer", move || writer(c, ledger, stop, rng))
    };
    let progress = Arc::new(Progress::default());
    let p = Arc::clone(&progress);
    let cfg = PerfConfig {
        op: Op::Read,
        random: true,
        io_size: 4096,
        queue_depth: 32,
        queues: 1,
        duration: Duration::from_secs(24 * 3600),
        nsid: 1,
        spin: None,
        rwmix_read: None,
    };
    let r = spawn("soak-reader", move || {
        let _ = pcibus::nvme::perf::run(&c, &cfg, &p);
    });
    (w, stop, r, progress)
}

struct Outcome {
    events: u64,
    by_kind: BTreeMap<String, u64>,
    hangs: Vec<String>,
    stuck: Vec<String>,
    // Per event: its kind and the quiet sample after it.
    samples: Vec<(String, Sample)>,
}

fn soak(address: PciAddress, events: u64, seed: u64, kinds: Vec<String>) -> Result<(), Vec<String>> {
    let root = SysfsRoot::new(SYS);
    let mut monitor = UeventMonitor::open()
        .map_err(|e| vec![e.to_string()])?
        .pci_only(true);
    let map = DeviceMap::new(Scanner::new(root.clone())).map_err(|e| vec![e.to_string()])?;
    let backend = VfioBackend::from_env().unwrap_or_default();
    let attach = VfioAttach::new(
        root,
        BindPolicy {
            bind: true,
            force: false,
            restore: true,
        },
    )
    .backend(backend);
    let selection = Selection::from_args([("-a", address.to_string())]).map_err(|e| vec![e.to_string()])?;
    let mut bus = Bus::new(map, attach)
        .selection(selection)
        .settle(Duration::from_millis(300));
    bus.register(Box::new(NvmeDriver::<VfioBacking>::new(Options::default())));

    let ledger = Arc::new(Mutex::new(Ledger::default()));
    // Samples of the process right after each removal was handled.
    let quiet: Arc<Mutex<Vec<Sample>>> = Arc::default();
    // The memory maps at the first and the last of those points, for a growth to be traced.
    let mut quiet_maps: (Option<String>, Option<String>) = (None, None);
    let attaches = Arc::new(AtomicU64::new(0));
    let removals = Arc::new(AtomicU64::new(0));
    let mut rng = Rng(seed | 1);
    let mut load: Option<Load> = None;
    let mut notes = Vec::new();

    let events_thread = {
        let (attaches, removals) = (Arc::clone(&attaches), Arc::clone(&removals));
        let (ledger, quiet) = (Arc::clone(&ledger), Arc::clone(&quiet));
        let mut rng = Rng(rng.next() | 1);
        spawn("soak-events", move || {
            let mut out = Outcome {
                events: 0,
                by_kind: BTreeMap::new(),
                hangs: Vec::new(),
                stuck: Vec::new(),
                samples: Vec::new(),
            };
            for i in 0..events {
                // Attached, and some writes done since.
                let seen = attaches.load(Ordering::Acquire);
                let writes = ledger.lock().writes;
                let ok = wait_until(HANG, || {
                    attaches.load(Ordering::Acquire) > removals.load(Ordering::Acquire)
                        && ledger.lock().writes >= writes + 20
                });
                if !ok {
                    let why = format!(
                        "event {i}: not attached with writes going within 30 s (attaches {seen}, removals {}, writes {} -> {})",
                        removals.load(Ordering::Acquire),
                        writes,
                        ledger.lock().writes
                    );
                    println!("soak: FAIL hang: {why}");
                    dump_threads();
                    out.hangs.push(why);
                    break;
                }
                let kind = kinds[rng.below(kinds.len() as u64) as usize].clone();
                let before = removals.load(Ordering::Acquire);
                let t = Instant::now();
                // The event's own writes wait for the holder (this process) to let go: one
                // that never returns is a hang; say where every thread is, then exit, which
                // closes the device and lets the kernel finish.
                let ev = {
                    let kind = kind.clone();
                    spawn("soak-event", move || event(&kind, address))
                };
                match join_within(ev, HANG) {
                    Some(Ok(())) => {}
                    Some(Err(e)) => {
                        out.hangs.push(format!("event {i} ({kind}): {e}"));
                        break;
                    }
                    None => {
                        println!("soak: FAIL hang: event {i} ({kind}) did not return within 30 s");
                        dump_threads();
                        std::process::exit(1);
                    }
                }
                if !wait_until(HANG, || removals.load(Ordering::Acquire) > before) {
                    out.hangs
                        .push(format!("event {i} ({kind}): the bus never reported the removal"));
                    break;
                }
                // Attached again: one attach more than removals so far.
                if !wait_until(HANG, || {
                    attaches.load(Ordering::Acquire) > removals.load(Ordering::Acquire)
                }) {
                    out.hangs
                        .push(format!("event {i} ({kind}): not attached again within 30 s"));
                    break;
                }
                out.events += 1;
                *out.by_kind.entry(kind.clone()).or_default() += 1;
                // The process as it was when the device had just left: load stopped and
                // joined, controller gone (the bus thread samples it then).
                let s = quiet.lock().last().copied().unwrap_or_default();
                let stuck = stuck_tasks();
                if !stuck.is_empty() {
                    out.stuck.push(format!("after event {i} ({kind}): {stuck:?}"));
                }
                println!(
                    "soak: event {i} {kind} back in {} ms; when it left: fds {} rss {} KiB maps {} lck {} pin {}",
                    t.elapsed().as_millis(),
                    s.fds,
                    s.rss_kb,
                    s.maps,
                    s.lck_kb,
                    s.pin_kb
                );
                out.samples.push((kind.clone(), s));
            }
            out
        })
    };

    // The bus loop: attach, start the load; on removal, stop it.
    let t0 = Instant::now();
    for r in bus.probe_all() {
        match r.result {
            Ok(_) if r.address == address => {
                let c = bus.device_state::<NvmeDriver<VfioBacking>>(address).cloned();
                if let Some(c) = c {
                    load = Some(start_load(c, &ledger, Rng(rng.next() | 1)));
                    attaches.fetch_add(1, Ordering::AcqRel);
                }
            }
            Ok(_) => {}
            Err(e) => notes.push(format!("first probe of {}: {e}", r.address)),
        }
    }
    // Until the event thread is done (it ends with the device attached again).
    while !events_thread.is_finished() {
        for e in bus
            .wait(Some(&mut monitor), Duration::from_millis(100))
            .unwrap_or_default()
        {
            match &e {
                BusEvent::Probed(p) if p.address == address => match &p.result {
                    Ok(_) => {
                        let c = bus.device_state::<NvmeDriver<VfioBacking>>(address).cloned();
                        if let Some(c) = c {
                            load = Some(start_load(c, &ledger, Rng(rng.next() | 1)));
                            attaches.fetch_add(1, Ordering::AcqRel);
                        }
                    }
                    Err(err) => notes.push(format!("+{} ms: attach failed: {err}", t0.elapsed().as_millis())),
                },
                BusEvent::Removed(r) if r.address == address => {
                    if r.leaked > 0 {
                        LOGGER.kept_handles.fetch_add(1, Ordering::Relaxed);
                    }
                    if let Some((w, stop, r, p)) = load.take() {
                        stop.store(true, Ordering::Relaxed);
                        p.stop.store(true, Ordering::Relaxed);
                        // The driver revoked the controller: I/O in flight fails at once, so
                        // both threads end; one that does not is a hang of the driver's.
                        let (Some(why), Some(())) = (join_within(w, HANG), join_within(r, HANG)) else {
                            println!("soak: FAIL hang: the load did not stop within 30 s of the removal");
                            dump_threads();
                            std::process::exit(1);
                        };
                        println!("soak: removed ({}); writer: {why}", r_cause(&e));
                    }
                    // Quiet only if the device is neither held again (the bus may report a
                    // removal after a probe that followed it) nor parked: else no sample.
                    let busy = bus
                        .held()
                        .iter()
                        .chain(bus.releasing().iter())
                        .any(|(a, _)| *a == address);
                    if !busy {
                        quiet.lock().push(sample());
                        let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
                        quiet_maps.0.get_or_insert_with(|| maps.clone());
                        quiet_maps.1 = Some(maps);
                    }
                    removals.fetch_add(1, Ordering::AcqRel);
                }
                _ => {}
            }
        }
    }
    let outcome = events_thread
        .join()
        .map_err(|_| vec!["the event thread panicked".to_string()])?;

    // Stop the load, then read the region back through the controller.
    let mut corrupt = 0u64;
    let mut lost = 0u64;
    let mut examples = Vec::new();
    if let Some((w, stop, r, p)) = load.take() {
        stop.store(true, Ordering::Relaxed);
        p.stop.store(true, Ordering::Relaxed);
        if join_within(w, HANG).is_none() || join_within(r, HANG).is_none() {
            println!("soak: FAIL hang: the load did not stop within 30 s at the end");
            dump_threads();
            std::process::exit(1);
        }
    }
    let c = bus.device_state::<NvmeDriver<VfioBacking>>(address).cloned();
    let mut fails = Vec::new();
    match c {
        None => fails.push("no controller at the end to read the region back".to_string()),
        Some(c) => {
            let bs = c.namespace(1).map_or(512, |n| n.block_size as usize);
            let chunk = 64u64;
            let res = (|| -> Result<(), String> {
                let buf = c.alloc_buffer(bs * chunk as usize).map_err(|e| e.to_string())?;
                let mut q = c.io_queue(4).map_err(|e| e.to_string())?;
                let l = ledger.lock();
                let mut data = vec![0u8; bs * chunk as usize];
                for start in (REGION_START..REGION_START + REGION_BLOCKS).step_by(chunk as usize) {
                    q.read(1, start, chunk, &buf, 0).map_err(|e| e.to_string())?;
                    buf.read_at(0, &mut data).ok_or("buffer read out of range")?;
                    for i in 0..chunk {
                        let lba = start + i;
                        let bytes = &data[i as usize * bs..(i as usize + 1) * bs];
                        let acked = l.acked.get(&lba).copied();
                        let flying = l.in_flight.get(&lba).copied();
                        match (check(bytes), acked) {
                            (Err(_), None) => {} // never written by this run
                            (Err(e), Some(g)) => {
                                corrupt += 1;
                                if examples.len() < 5 {
                                    examples.push(format!("lba {lba}: {e} (acked generation {g})"));
                                }
                            }
                            (Ok((got_lba, _)), _) if got_lba != lba => {
                                corrupt += 1;
                                if examples.len() < 5 {
                                    examples.push(format!("lba {lba}: holds the block of lba {got_lba}"));
                                }
                            }
                            (Ok((_, g)), Some(a)) if g != a && Some(g) != flying => {
                                if g < a {
                                    lost += 1;
                                } else {
                                    corrupt += 1;
                                }
                                if examples.len() < 5 {
                                    examples.push(format!(
                                        "lba {lba}: generation {g}, acked {a}, in flight {flying:?}"
                                    ));
                                }
                            }
                            _ => {}
                        }
                    }
                }
                Ok(())
            })();
            if let Err(e) = res {
                fails.push(format!("reading the region back: {e}"));
            }
        }
    }
    drop(bus);
    let l = ledger.lock();
    let (first, last) = match (outcome.samples.first(), outcome.samples.last()) {
        (Some(f), Some(l)) => (f.1, l.1),
        _ => (Sample::default(), Sample::default()),
    };
    let per100 = |a: u64, b: u64| {
        if outcome.events > 1 {
            (b as f64 - a as f64) * 100.0 / (outcome.events - 1) as f64
        } else {
            0.0
        }
    };
    for n in &notes {
        println!("soak: {n}");
    }
    for e in &examples {
        println!("soak: bad block: {e}");
    }
    println!(
        "soak: summary events={} kinds={:?} writes={} reissued={} blocks_written={} corrupt={corrupt} lost={lost} hangs={} stuck={} \
         unmap_failures={} kept_handles={} munmap_failures={} \
         fds={}->{} rss_kb={}->{} maps={}->{} lck_kb={}->{} pin_kb={}->{} per100: fds={:+.1} rss_kb={:+.0} maps={:+.1}",
        outcome.events,
        outcome.by_kind,
        l.writes,
        l.reissued,
        l.acked.len(),
        outcome.hangs.len(),
        outcome.stuck.len(),
        LOGGER.unmap_failures.load(Ordering::Relaxed),
        LOGGER.kept_handles.load(Ordering::Relaxed),
        pcibus::vfio::munmap_failures(),
        first.fds,
        last.fds,
        first.rss_kb,
        last.rss_kb,
        first.maps,
        last.maps,
        first.lck_kb,
        last.lck_kb,
        first.pin_kb,
        last.pin_kb,
        per100(first.fds, last.fds),
        per100(first.rss_kb, last.rss_kb),
        per100(first.maps, last.maps),
    );
    fails.extend(outcome.hangs.iter().map(|h| format!("hang: {h}")));
    fails.extend(outcome.stuck.iter().map(|s| format!("stuck: {s}")));
    if outcome.events < events {
        fails.push(format!("{} of {events} events done", outcome.events));
    }
    let (unmaps, kept) = (
        LOGGER.unmap_failures.load(Ordering::Relaxed),
        LOGGER.kept_handles.load(Ordering::Relaxed),
    );
    if unmaps > 0 || pcibus::vfio::munmap_failures() > 0 {
        fails.push(format!(
            "{unmaps} DMA region(s) not unmapped, {} munmap failure(s)",
            pcibus::vfio::munmap_failures()
        ));
    }
    // A handle the driver still holds after `remove` keeps the device open under the
    // kernel's removal (the bus parks it until let go). The NVMe driver's revoke waits for
    // threads allocating, creating or dropping queues, so there must be none; the log has
    // where each kept handle was taken (PCIBUS_TRACE_HANDLES=1, set by zz-soak.sh).
    if kept > 0 {
        fails.push(format!(
            "{kept} removal(s) where the driver still held the device after remove"
        ));
    }
    if corrupt > 0 || lost > 0 {
        fails.push(format!("{corrupt} corrupt and {lost} lost blocks"));
    }
    // Sampled at the same quiet point each time: fds and locked memory must be flat. What
    // the process holds there depends on the kind of the event (an unbound device's group
    // stays attached to the container, a removed one's does not), so samples are compared
    // within a kind: the highest of the first quarter against the highest of the last. A
    // leak grows with the events; the allocator's own growth (its heap, its mmap threshold)
    // is bounded, so maps may grow by a few (MAPS_SLACK), not with the events, and fds by
    // one or two (FDS_SLACK): a leak of one per event is far more over any run.
    const MAPS_SLACK: u64 = 8;
    const FDS_SLACK: u64 = 2;
    type Measure = fn(&Sample) -> u64;
    let measures: [(&str, Measure, u64); 4] = [
        // One or two fds come and go with the moment (an eventfd, the monitor's).
        ("fds", |s| s.fds, FDS_SLACK),
        ("maps", |s| s.maps, MAPS_SLACK),
        ("VmLck KiB", |s| s.lck_kb, 0),
        ("VmPin KiB", |s| s.pin_kb, 0),
    ];
    let mut kinds_seen: Vec<&str> = outcome.samples.iter().map(|(k, _)| k.as_str()).collect();
    kinds_seen.sort_unstable();
    kinds_seen.dedup();
    for kind in kinds_seen {
        let of: Vec<Sample> = outcome
            .samples
            .iter()
            .filter(|(k, _)| k == kind)
            .map(|(_, s)| *s)
            .collect();
        let n = of.len();
        let q = (n / 4).max(1);
        for (what, f, slack) in measures {
            let peak = |range: &[Sample]| range.iter().map(f).max().unwrap_or(0);
            let (a, b) = (peak(&of[..q]), peak(&of[n - q..]));
            println!("soak: after {kind}: {what} highest {a} in its first {q} samples, {b} in its last {q}");
            if b > a + slack {
                fails.push(format!(
                    "{what} grew after {kind}: highest {a} in its first {q} samples, {b} in its last {q}"
                ));
            }
        }
    }
    // What was mapped at the last quiet point and not at the first: a growth's trace.
    if let (Some(first), Some(last)) = &quiet_maps {
        let strip = |l: &str| {
            l.split_once(' ').map_or(l.to_owned(), |(range, rest)| {
                let (a, b) = range.split_once('-').unwrap_or((range, range));
                let len = u64::from_str_radix(b, 16)
                    .unwrap_or(0)
                    .saturating_sub(u64::from_str_radix(a, 16).unwrap_or(0));
                format!("{len:>10} {rest}")
            })
        };
        let before: Vec<String> = first.lines().map(strip).collect();
        let mut before = before.clone();
        for line in last.lines().map(strip) {
            match before.iter().position(|b| *b == line) {
                Some(i) => {
                    before.swap_remove(i);
                }
                None => println!("soak: new map (bytes, perms, ...): {line}"),
            }
        }
    }
    if fails.is_empty() { Ok(()) } else { Err(fails) }
}

fn r_cause(e: &BusEvent) -> String {
    match e {
        BusEvent::Removed(r) => r.cause.to_string(),
        other => other.to_string(),
    }
}

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: pcibus-soak ADDR EVENTS [--seed N] [--kinds remove,unbind,unplug]";
    let (Some(address), Some(events)) = (
        args.first().and_then(|a| a.parse::<PciAddress>().ok()),
        args.get(1).and_then(|n| n.parse::<u64>().ok()),
    ) else {
        eprintln!("{usage}");
        return std::process::ExitCode::from(2);
    };
    let mut seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64);
    let mut kinds = vec!["remove".to_string(), "unbind".to_string()];
    let mut rest = args[2..].iter();
    while let Some(a) = rest.next() {
        match (a.as_str(), rest.next()) {
            ("--seed", Some(v)) if v.parse::<u64>().is_ok() => seed = v.parse().unwrap_or(1),
            ("--kinds", Some(v)) => kinds = v.split(',').map(str::to_owned).collect(),
            _ => {
                eprintln!("{usage}");
                return std::process::ExitCode::from(2);
            }
        }
    }
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(log::LevelFilter::Warn);
    }
    println!("soak: {address}, {events} events of {kinds:?}, seed {seed}");
    match soak(address, events, seed, kinds) {
        Ok(()) => {
            println!("soak: PASS");
            std::process::ExitCode::SUCCESS
        }
        Err(fails) => {
            for f in fails {
                println!("soak: FAIL {f}");
            }
            std::process::ExitCode::FAILURE
        }
    }
}
