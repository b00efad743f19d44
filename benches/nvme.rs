//! The NVMe driver's CPU cost per 4 KiB read, three ways:
//!
//! - **driver-only**: submission and completion processing with no device thread. The
//!   device is a loopback controller ([`loopback`]) that completes every command inside
//!   the SQ doorbell write, in the driver's thread, moving no data: each round submits a
//!   batch (1, 16 or 256 reads), rings once and harvests the batch with one poll. Time per
//!   I/O is the driver's submit, doorbell and completion code plus the loopback's few
//!   instructions per command; shadow doorbells off and on (on: the shadow path in full,
//!   an MMIO write every batch too). The I/O count per row is fixed
//!   (`PCIBUS_BENCH_IOS`, default 4,000,000), so instruction counts (callgrind) of two
//!   counts give instructions per I/O.
//! - **whole-core**: one polling thread keeps QD 32 on one queue of the emulated
//!   controller (its thread busy-polling on the other core); the polling thread's whole CPU
//!   time over the I/Os, empty polls included, as SPDK reports a dedicated core, and the
//!   emulator thread's beside it.
//! - **productive polls** (the figure published before issue 15): the driver thread's
//!   time inside polls that completed something plus the resubmission after them, per
//!   I/O, on the emulator; batched and unbatched, shadow doorbells off and on, and with
//!   polls 8 µs apart.
//!
//! `cargo bench --bench nvme [-- FILTER...]`: rows whose label contains every FILTER
//! (e.g. `driver-only`, `"batch 16 shadow off"`). Seconds per emulator row:
//! `PCIBUS_BENCH_SECS`, default 3.

#[path = "nvme/loopback.rs"]
mod loopback;

use std::time::{Duration, Instant};

use nix::time::{ClockId, clock_gettime};
use pcibus::nvme::{Controller, IoQueue, IoRequest, Op, Options};
use pcibus::testing::nvme::{EmuConfig, EmulatedNvme};

const QD: u16 = 32;
const IO: usize = 4096;

fn thread_cpu() -> Duration {
    clock_gettime(ClockId::CLOCK_THREAD_CPUTIME_ID).map_or(Duration::ZERO, Duration::from)
}

fn process_cpu() -> Duration {
    clock_gettime(ClockId::CLOCK_PROCESS_CPUTIME_ID).map_or(Duration::ZERO, Duration::from)
}

// A fast generator of random 4 KiB-aligned LBAs below `span` I/Os. Scaled into the span by a
// multiplication (the high half of `x * span`), not `x % span`: a 64-bit division costs tens of
// cycles, which the driver-only rows would count as the driver's.
fn lbas(span: u64) -> impl FnMut() -> u64 {
    let blocks = (IO / 512) as u64;
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        ((u128::from(x) * u128::from(span)) >> 64) as u64 * blocks
    }
}

// The emulated controller busy-polling (shadow doorbells as asked), brought up, with
// one queue of QD and a buffer for QD I/Os; `span`: the I/O-sized slots of namespace 1.
struct Emulated {
    emu: EmulatedNvme,
    controller: Controller<EmulatedNvme>,
    q: IoQueue<EmulatedNvme>,
    buf: pcibus::nvme::Buffer<EmulatedNvme>,
    span: u64,
}

fn emulated(shadow: bool) -> Emulated {
    let emu = EmulatedNvme::new(EmuConfig {
        busy_poll: true,
        shadow_doorbells: shadow,
        ..EmuConfig::default()
    })
    .expect("emulator");
    let controller = Controller::init(emu.clone(), &Options::default()).expect("bring-up");
    let q = controller.io_queue(QD + 1).expect("queue");
    let buf = controller.alloc_buffer(usize::from(QD) * IO).expect("buffer");
    let span = controller.namespace(1).expect("namespace 1").blocks / (IO / 512) as u64;
    Emulated {
        emu,
        controller,
        q,
        buf,
        span,
    }
}

struct DriverOnly {
    ns_per_io: f64,
    cpu_ns_per_io: f64,
    doorbells_per_io: f64,
}

// `ios` reads in rounds of `batch`: submit the batch, ring once, one poll harvests it
// (the loopback completed it inside the doorbell write).
fn driver_only(batch: u16, shadow: bool, ios: u64) -> DriverOnly {
    let dev = loopback::Loopback::new(shadow);
    let options = Options {
        shadow_doorbells: shadow,
        ..Options::default()
    };
    let c = Controller::init(dev, &options).expect("bring-up");
    assert_eq!(c.info().shadow_doorbells, shadow);
    let mut q = c.io_queue(batch + 1).expect("queue");
    let buf = c.alloc_buffer(usize::from(batch) * IO).expect("buffer");
    let blocks = (IO / 512) as u64;
    let mut next_lba = lbas(c.namespace(1).expect("namespace 1").blocks / blocks);
    let mut round = |q: &mut IoQueue<loopback::Loopback>| {
        for tag in 0..u64::from(batch) {
            let req = IoRequest::read(1, next_lba(), blocks, &buf, tag as usize * IO);
            q.submit(&req, tag).expect("submit");
        }
        q.ring().expect("ring");
        let mut ok = 0u16;
        q.poll(|_, r| {
            r.expect("I/O");
            ok += 1;
        })
        .expect("poll");
        assert_eq!(ok, batch, "one poll harvests the batch");
    };
    for _ in 0..1000 {
        round(&mut q);
    }
    let rounds = ios.div_ceil(u64::from(batch));
    let doorbells0 = q.doorbell_writes();
    let cpu0 = thread_cpu();
    let start = Instant::now();
    for _ in 0..rounds {
        round(&mut q);
    }
    let wall = start.elapsed();
    let cpu = thread_cpu() - cpu0;
    let n = (rounds * u64::from(batch)) as f64;
    DriverOnly {
        ns_per_io: wall.as_nanos() as f64 / n,
        cpu_ns_per_io: cpu.as_nanos() as f64 / n,
        doorbells_per_io: (q.doorbell_writes() - doorbells0) as f64 / n,
    }
}

struct WholeCore {
    ios: u64,
    iops: f64,
    driver_cpu_ns_per_io: f64,
    device_cpu_ns_per_io: f64,
}

// One thread keeps QD `QD` on the emulator for `secs`: poll, resubmit what completed, ring.
fn whole_core(secs: f64) -> WholeCore {
    let Emulated {
        emu,
        controller: _controller,
        mut q,
        buf,
        span,
    } = emulated(false);
    let blocks = (IO / 512) as u64;
    let mut next_lba = lbas(span);
    for tag in 0..u64::from(QD) {
        q.submit(
            &IoRequest::read(1, next_lba(), blocks, &buf, tag as usize * IO),
            tag,
        )
        .expect("submit");
    }
    q.ring().expect("ring");
    let mut done = Vec::with_capacity(usize::from(QD));
    let mut ios = 0u64;
    let (cpu0, all0, start) = (thread_cpu(), process_cpu(), Instant::now());
    let end = start + Duration::from_secs_f64(secs);
    // The clock is read once per 1,024 polls only.
    let mut polls = 0u32;
    loop {
        ios += q
            .poll(|tag, r| {
                r.expect("I/O");
                done.push(tag);
            })
            .expect("poll") as u64;
        for &tag in &done {
            q.submit(
                &IoRequest::read(1, next_lba(), blocks, &buf, tag as usize * IO),
                tag,
            )
            .expect("submit");
        }
        done.clear();
        q.ring().expect("ring");
        polls += 1;
        if polls.is_multiple_of(1024) && Instant::now() >= end {
            break;
        }
    }
    let (cpu, all, wall) = (thread_cpu() - cpu0, process_cpu() - all0, start.elapsed());
    assert_eq!(emu.stats().bad_dma, 0);
    WholeCore {
        ios,
        iops: ios as f64 / wall.as_secs_f64(),
        driver_cpu_ns_per_io: cpu.as_nanos() as f64 / ios as f64,
        device_cpu_ns_per_io: all.saturating_sub(cpu).as_nanos() as f64 / ios as f64,
    }
}

struct Figures {
    ios: u64,
    driver_ns_per_io: f64,
    cpu_ns_per_io: f64,
    doorbells_per_io: f64,
    iops: f64,
}

// `gap`: after each productive poll, wait this long (spinning, not counted as driver
// time) before polling again, so that completions accumulate and each poll harvests a
// batch, as a driver with other work between polls does.
fn run(batched: bool, shadow: bool, gap: Duration, secs: f64) -> Figures {
    let Emulated {
        emu,
        controller: _controller,
        mut q,
        buf,
        span,
    } = emulated(shadow);
    let blocks = (IO / 512) as u64;
    let mut next_lba = lbas(span);
    let submit = |q: &mut pcibus::nvme::IoQueue<EmulatedNvme>, tag: u64, lba: u64| {
        let req = IoRequest {
            op: Op::Read,
            nsid: 1,
            lba,
            blocks,
            buffer: Some((&buf, tag as usize * IO)),
        };
        q.submit(&req, tag)
            .unwrap_or_else(|e| panic!("submit (free slots {}): {e}", q.free_slots()));
        if !batched {
            q.ring().expect("ring");
        }
    };
    for tag in 0..u64::from(QD) {
        submit(&mut q, tag, next_lba());
    }
    q.ring().expect("ring");
    let mut done = Vec::with_capacity(usize::from(QD));
    let (mut ios, mut busy) = (0u64, Duration::ZERO);
    let cpu0 = thread_cpu();
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(secs);
    let doorbells0 = q.doorbell_writes();
    loop {
        let t0 = Instant::now();
        let n = q
            .poll(|tag, r| {
                r.expect("I/O");
                done.push(tag);
            })
            .expect("poll");
        if n == 0 {
            if t0 >= end {
                break;
            }
            continue;
        }
        for &tag in &done {
            submit(&mut q, tag, next_lba());
        }
        q.ring().expect("ring");
        busy += t0.elapsed();
        ios += n as u64;
        done.clear();
        if !gap.is_zero() {
            let until = Instant::now() + gap;
            while Instant::now() < until {
                std::hint::spin_loop();
            }
        }
    }
    let wall = start.elapsed();
    let cpu = thread_cpu() - cpu0;
    let doorbells = q.doorbell_writes() - doorbells0;
    assert_eq!(emu.stats().bad_dma, 0);
    Figures {
        ios,
        driver_ns_per_io: busy.as_nanos() as f64 / ios as f64,
        cpu_ns_per_io: cpu.as_nanos() as f64 / ios as f64,
        doorbells_per_io: doorbells as f64 / ios as f64,
        iops: ios as f64 / wall.as_secs_f64(),
    }
}

fn main() {
    // `cargo test --benches` runs bench binaries with `--bench` absent: do nothing then.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let wanted = |label: &str| filters.iter().all(|f| label.contains(f.as_str()));
    let secs = std::env::var("PCIBUS_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3.0);
    let ios = std::env::var("PCIBUS_BENCH_IOS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(4_000_000u64);

    let rows: Vec<_> = [1u16, 16, 256]
        .into_iter()
        .flat_map(|b| [(b, false), (b, true)])
        .map(|(b, shadow)| {
            let label = format!(
                "driver-only batch {b} shadow {}",
                if shadow { "on" } else { "off" }
            );
            (label, b, shadow)
        })
        .filter(|(label, ..)| wanted(label))
        .collect();
    if !rows.is_empty() {
        println!("Driver only (loopback controller, no device thread): 4 KiB reads, {ios} per row");
        println!(
            "{:<40} {:>12} {:>18} {:>14}",
            "row", "ns/I/O", "thread CPU ns/I/O", "doorbells/I/O"
        );
        for (label, batch, shadow) in rows {
            let f = driver_only(batch, shadow, ios);
            println!(
                "{label:<40} {:>12.1} {:>18.1} {:>14.3}",
                f.ns_per_io, f.cpu_ns_per_io, f.doorbells_per_io
            );
        }
    }

    let label = format!("whole-core QD {QD}");
    if wanted(&label) {
        println!();
        println!("Whole core (one polling thread, emulator busy-polling on another core): {secs} s");
        println!(
            "{:<40} {:>10} {:>12} {:>22} {:>22}",
            "row", "I/Os", "IOPS", "driver thread ns/I/O", "emulator thread ns/I/O"
        );
        let f = whole_core(secs);
        println!(
            "{label:<40} {:>10} {:>12.0} {:>22.1} {:>22.1}",
            f.ios, f.iops, f.driver_cpu_ns_per_io, f.device_cpu_ns_per_io
        );
    }

    let gap = Duration::from_micros(8);
    let rows: Vec<_> = [
        (true, false, Duration::ZERO),
        (false, false, Duration::ZERO),
        (true, true, Duration::ZERO),
        (false, true, Duration::ZERO),
        (true, false, gap),
        (false, false, gap),
    ]
    .into_iter()
    .map(|(batched, shadow, gap)| {
        let label = format!(
            "productive {}, shadow {}{}",
            if batched { "batched" } else { "unbatched" },
            if shadow { "on" } else { "off" },
            if gap.is_zero() {
                String::new()
            } else {
                format!(", polls {} us apart", gap.as_micros())
            }
        );
        (label, batched, shadow, gap)
    })
    .filter(|(label, ..)| wanted(label))
    .collect();
    if rows.is_empty() {
        return;
    }
    println!();
    println!(
        "Productive polls on the emulated controller: 4 KiB random reads, QD {QD}, one queue, {secs} s per loop"
    );
    println!(
        "{:<44} {:>10} {:>12} {:>16} {:>14} {:>12}",
        "loop", "I/Os", "IOPS", "driver ns/I/O", "thread CPU ns/I/O", "doorbells/I/O"
    );
    for (label, batched, shadow, gap) in rows {
        let f = run(batched, shadow, gap, secs);
        println!(
            "{label:<44} {:>10} {:>12.0} {:>16.1} {:>14.1} {:>12.3}",
            f.ios, f.iops, f.driver_ns_per_io, f.cpu_ns_per_io, f.doorbells_per_io
        );
    }
}
