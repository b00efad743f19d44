//! The NVMe driver's own CPU cost per 4 KiB I/O: QD 32 of reads on one queue of the
//! emulated controller, its processing thread busy-polling on the other core, the driver
//! thread resubmitting what each poll completed.
//!
//! The driver's cost is the time the driver thread spends in polls that completed
//! something plus the resubmission and doorbell after them, per I/O: polls that found
//! nothing are the thread waiting for the device, not the driver working. The driver
//! thread's whole CPU time per I/O (waiting included) is printed beside it. Two loops in
//! the same run: batched (one SQ doorbell per poll's worth of resubmissions, as the driver
//! is meant to be used) and unbatched (a doorbell after every submission), each with
//! shadow doorbells off and on, and both again with polls 8 µs apart (the wait not counted)
//! so that each poll harvests a batch of completions.
//!
//! `cargo bench --bench nvme` (seconds per loop: `PCIBUS_BENCH_SECS`, default 3).

use std::time::{Duration, Instant};

use nix::time::{ClockId, clock_gettime};
use pcibus::nvme::{Controller, IoRequest, Op, Options};
use pcibus::testing::nvme::{EmuConfig, EmulatedNvme};

const QD: u16 = 32;
const IO: usize = 4096;

fn thread_cpu() -> Duration {
    clock_gettime(ClockId::CLOCK_THREAD_CPUTIME_ID).map_or(Duration::ZERO, Duration::from)
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
    let emu = EmulatedNvme::new(EmuConfig {
        busy_poll: true,
        shadow_doorbells: shadow,
        ..EmuConfig::default()
    })
    .expect("emulator");
    let c = Controller::init(emu.clone(), &Options::default()).expect("bring-up");
    let mut q = c.io_queue(QD + 1).expect("queue");
    let buf = c.alloc_buffer(usize::from(QD) * IO).expect("buffer");
    let blocks = (IO / 512) as u64;
    let span = c.namespace(1).expect("namespace 1").blocks / blocks;
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut next_lba = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x % span) * blocks
    };
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
    let secs = std::env::var("PCIBUS_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3.0);
    println!(
        "NVMe driver on the emulated controller: 4 KiB random reads, QD {QD}, one queue, {secs} s per loop"
    );
    println!(
        "{:<44} {:>10} {:>12} {:>16} {:>14} {:>12}",
        "loop", "I/Os", "IOPS", "driver ns/I/O", "thread CPU ns/I/O", "doorbells/I/O"
    );
    let gap = Duration::from_micros(8);
    for (batched, shadow, gap) in [
        (true, false, Duration::ZERO),
        (false, false, Duration::ZERO),
        (true, true, Duration::ZERO),
        (false, true, Duration::ZERO),
        (true, false, gap),
        (false, false, gap),
    ] {
        let f = run(batched, shadow, gap, secs);
        println!(
            "{:<44} {:>10} {:>12.0} {:>16.1} {:>14.1} {:>12.3}",
            format!(
                "{}, shadow {}{}",
                if batched { "batched" } else { "unbatched" },
                if shadow { "on" } else { "off" },
                if gap.is_zero() {
                    String::new()
                } else {
                    format!(", polls {} us apart", gap.as_micros())
                }
            ),
            f.ios,
            f.iops,
            f.driver_ns_per_io,
            f.cpu_ns_per_io,
            f.doorbells_per_io
        );
    }
}
