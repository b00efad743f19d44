//! A load generator over [`IoQueue`]s, like `spdk_nvme_perf`: one queue per thread, a
//! fixed queue depth kept full, completions polled and resubmitted in batches (one
//! doorbell per batch), latency per I/O in a log-linear histogram.
//!
//! Generic over the backing, so the CLI (`pcibus nvme perf`) runs it on VFIO and tests and
//! benchmarks run it on the emulated controller.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::{Controller, IoQueue, IoRequest, NvmeError, Op};
use crate::bus::backing::DeviceBacking;

/// What to run.
#[derive(Debug, Clone)]
pub struct PerfConfig {
    /// Read or write.
    pub op: Op,
    /// Random offsets (else sequential, wrapping).
    pub random: bool,
    /// Bytes per I/O (a multiple of the block size).
    pub io_size: usize,
    /// I/Os in flight per queue.
    pub queue_depth: u16,
    /// Queues (threads).
    pub queues: u16,
    /// How long.
    pub duration: Duration,
    /// Namespace.
    pub nsid: u32,
    /// With completion interrupts (the controller brought up with
    /// [`Options::interrupts`](super::Options::interrupts)): keep polling this long after
    /// the last completion before sleeping on the interrupt (a hybrid of polling and
    /// sleeping, which gives a core back when the device is idle). `None`: sleep at once
    /// (or, without interrupts, always poll).
    pub spin: Option<Duration>,
}

/// Latencies, in a log-linear histogram of nanoseconds (16 sub-buckets per power of two:
/// under 7% error).
#[derive(Debug, Clone)]
pub struct Histogram {
    counts: Vec<u64>,
    total: u64,
    sum_ns: u128,
    max_ns: u64,
}

const SUB: u32 = 16;

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: vec![0; (64 * SUB) as usize],
            total: 0,
            sum_ns: 0,
            max_ns: 0,
        }
    }
}

impl Histogram {
    fn index(ns: u64) -> usize {
        if ns < u64::from(SUB) {
            return ns as usize;
        }
        let log = 63 - ns.leading_zeros();
        let sub = (ns >> (log - 4)) as u32 & (SUB - 1);
        ((log - 3) * SUB + sub) as usize
    }

    fn lower_bound(index: usize) -> u64 {
        let index = index as u32;
        if index < SUB {
            return u64::from(index);
        }
        let log = index / SUB + 3;
        let sub = u64::from(index % SUB);
        (1u64 << log) | sub << (log - 4)
    }

    /// Adds one latency.
    pub fn record(&mut self, ns: u64) {
        self.counts[Self::index(ns)] += 1;
        self.total += 1;
        self.sum_ns += u128::from(ns);
        self.max_ns = self.max_ns.max(ns);
    }

    /// Adds another histogram.
    pub fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.total += other.total;
        self.sum_ns += other.sum_ns;
        self.max_ns = self.max_ns.max(other.max_ns);
    }

    /// Latencies recorded.
    pub fn count(&self) -> u64 {
        self.total
    }

    /// Mean, in nanoseconds.
    pub fn mean_ns(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            self.sum_ns as f64 / self.total as f64
        }
    }

    /// The `q` quantile (0–1), in nanoseconds (the lower bound of its bucket).
    pub fn quantile_ns(&self, q: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let want = ((self.total as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= want {
                return Self::lower_bound(i);
            }
        }
        self.max_ns
    }

    /// The largest latency, in nanoseconds.
    pub fn max_ns(&self) -> u64 {
        self.max_ns
    }
}

/// What a run (or the part of it so far) measured.
#[derive(Debug, Clone, Default)]
pub struct PerfResult {
    /// I/Os completed successfully.
    pub ios: u64,
    /// I/Os that failed.
    pub errors: u64,
    /// Time measured.
    pub elapsed: Duration,
    /// Latencies of the successful I/Os.
    pub latency: Histogram,
    /// SQ doorbell writes to the device.
    pub doorbells: u64,
    /// CPU time of the queues' threads (user and system), waiting included: a polling
    /// thread's whole core, a sleeping one's share of it, as SPDK and fio report cost.
    pub cpu: Duration,
    /// The first error seen, if any.
    pub first_error: Option<String>,
}

impl PerfResult {
    /// Adds what another queue (or another part of a run) measured; its elapsed time is
    /// not added (the parts ran side by side).
    pub fn merge(&mut self, other: PerfResult) {
        self.ios += other.ios;
        self.errors += other.errors;
        self.doorbells += other.doorbells;
        self.cpu += other.cpu;
        self.latency.merge(&other.latency);
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
    }

    /// I/Os per second.
    pub fn iops(&self) -> f64 {
        self.ios as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

// A fast, seedable generator for random offsets.
struct XorShift(u64);
impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Progress shared with the caller while a run goes: I/Os and errors so far.
#[derive(Debug, Default)]
pub struct Progress {
    /// Successful I/Os so far.
    pub ios: AtomicU64,
    /// Failed I/Os so far.
    pub errors: AtomicU64,
    /// Sum of latencies so far, in nanoseconds.
    pub latency_ns: AtomicU64,
    /// Set to stop the run early.
    pub stop: AtomicBool,
}

/// Runs `config` on `controller`, one thread per queue; `progress` is updated as it goes
/// (every few hundred I/Os per thread). Stops at the end of the duration, on
/// `progress.stop`, or when the controller fails for good (the error is in the result).
pub fn run<B: DeviceBacking>(
    controller: &Controller<B>,
    config: &PerfConfig,
    progress: &Progress,
) -> Result<PerfResult, NvmeError> {
    let ns = controller
        .namespace(config.nsid)
        .ok_or_else(|| NvmeError::Invalid(format!("no namespace {}", config.nsid)))?;
    let bs = ns.block_size as usize;
    if config.io_size == 0 || !config.io_size.is_multiple_of(bs) {
        return Err(NvmeError::Invalid(format!(
            "I/O size {} is not a multiple of the block size {bs}",
            config.io_size
        )));
    }
    if !matches!(config.op, Op::Read | Op::Write) {
        return Err(NvmeError::Invalid("perf runs reads or writes".into()));
    }
    let blocks = (config.io_size / bs) as u64;
    let slots = ns.blocks / blocks;
    if slots == 0 {
        return Err(NvmeError::Invalid("the namespace is smaller than one I/O".into()));
    }
    let results = Mutex::new(Vec::new());
    let start = Instant::now();
    std::thread::scope(|s| {
        for q in 0..config.queues.max(1) {
            let results = &results;
            s.spawn(move || {
                let r = one_queue(controller, config, progress, q, blocks, slots);
                results.lock().unwrap_or_else(|e| e.into_inner()).push(r);
            });
        }
    });
    let elapsed = start.elapsed();
    let mut total = PerfResult {
        elapsed,
        ..Default::default()
    };
    for r in results.into_inner().unwrap_or_else(|e| e.into_inner()) {
        total.merge(r?);
    }
    Ok(total)
}

fn one_queue<B: DeviceBacking>(
    controller: &Controller<B>,
    config: &PerfConfig,
    progress: &Progress,
    index: u16,
    blocks: u64,
    slots: u64,
) -> Result<PerfResult, NvmeError> {
    let depth = config.queue_depth.max(1);
    let mut queue: IoQueue<B> = match controller.io_queue(depth.saturating_add(1)) {
        Ok(q) => q,
        Err(e) => return ended(PerfResult::default(), e),
    };
    let buffer = match controller.alloc_buffer(usize::from(depth) * config.io_size) {
        Ok(b) => b,
        Err(e) => return ended(PerfResult::default(), e),
    };
    let mut rng =
        XorShift(0x9e37_79b9_7f4a_7c15 ^ (u64::from(index) + 1).wrapping_mul(0xbf58_476d_1ce4_e5b9));
    // Sequential queues start apart from each other.
    let mut next_seq = u64::from(index) * (slots / u64::from(config.queues.max(1)));
    let mut submitted_at = vec![Instant::now(); usize::from(depth)];
    let mut result = PerfResult::default();
    let deadline = Instant::now() + config.duration;
    let mut pick = |rng: &mut XorShift| {
        let slot = if config.random {
            rng.next() % slots
        } else {
            let s = next_seq % slots;
            next_seq += 1;
            s
        };
        slot * blocks
    };
    // Tag `tag`'s I/O at `lba`, in its own part of the buffer.
    let request = |tag: u16, lba: u64| IoRequest {
        op: config.op,
        nsid: config.nsid,
        lba,
        blocks,
        buffer: Some((&buffer, usize::from(tag) * config.io_size)),
    };
    for tag in 0..depth {
        let req = request(tag, pick(&mut rng));
        if let Err(e) = queue.submit(&req, u64::from(tag)) {
            return ended(result, e);
        }
        submitted_at[usize::from(tag)] = Instant::now();
    }
    if let Err(e) = queue.ring() {
        return ended(result, e);
    }
    let mut done_tags: Vec<u16> = Vec::with_capacity(usize::from(depth));
    let (mut ios, mut errors, mut lat) = (0u64, 0u64, 0u64);
    let mut stopping = false;
    // With interrupts the thread sleeps until a completion instead of spinning (after
    // `spin` of polling, in the hybrid mode).
    let sleeps = queue.interrupt_fd().is_some();
    let mut last_found = Instant::now();
    let cpu_at_start = thread_cpu();
    loop {
        let handle = |tag: u64, r: Result<(), NvmeError>| {
            let tag = tag as u16;
            match r {
                Ok(()) => {
                    let ns = submitted_at[usize::from(tag)].elapsed().as_nanos() as u64;
                    result.latency.record(ns);
                    result.ios += 1;
                    ios += 1;
                    lat += ns;
                }
                Err(e) => {
                    result.errors += 1;
                    errors += 1;
                    if result.first_error.is_none() {
                        result.first_error = Some(e.to_string());
                    }
                }
            }
            done_tags.push(tag);
        };
        let spinning = config.spin.is_some_and(|spin| last_found.elapsed() < spin);
        let now_ok = if sleeps && !spinning {
            queue.wait(Duration::from_millis(100), handle)
        } else {
            queue.poll(handle)
        };
        if config.spin.is_some() && matches!(now_ok, Ok(n) if n > 0) {
            last_found = Instant::now();
        }
        if let Err(e) = now_ok {
            if result.first_error.is_none() {
                result.first_error = Some(e.to_string());
            }
            if e.is_fatal() {
                break;
            }
        }
        if ios + errors >= 256 {
            progress.ios.fetch_add(ios, Ordering::Relaxed);
            progress.errors.fetch_add(errors, Ordering::Relaxed);
            progress.latency_ns.fetch_add(lat, Ordering::Relaxed);
            (ios, errors, lat) = (0, 0, 0);
            if progress.stop.load(Ordering::Relaxed) || Instant::now() >= deadline {
                stopping = true;
            }
        }
        if !stopping {
            for &tag in &done_tags {
                let req = request(tag, pick(&mut rng));
                if let Err(e) = queue.submit(&req, u64::from(tag)) {
                    if result.first_error.is_none() {
                        result.first_error = Some(e.to_string());
                    }
                    if e.is_fatal() {
                        stopping = true;
                        break;
                    }
                    continue;
                }
                submitted_at[usize::from(tag)] = Instant::now();
            }
            if let Err(e) = queue.ring()
                && e.is_fatal()
            {
                stopping = true;
            }
        }
        done_tags.clear();
        if stopping && queue.outstanding() == 0 {
            break;
        }
        if !stopping && queue.outstanding() == 0 {
            // Everything failed at submission: nothing left to wait for.
            break;
        }
    }
    progress.ios.fetch_add(ios, Ordering::Relaxed);
    progress.errors.fetch_add(errors, Ordering::Relaxed);
    progress.latency_ns.fetch_add(lat, Ordering::Relaxed);
    result.doorbells = queue.doorbell_writes();
    result.cpu = thread_cpu().saturating_sub(cpu_at_start);
    Ok(result)
}

// This thread's CPU time (CLOCK_THREAD_CPUTIME_ID: user and system).
fn thread_cpu() -> Duration {
    use nix::time::{ClockId, clock_gettime};
    clock_gettime(ClockId::CLOCK_THREAD_CPUTIME_ID).map_or(Duration::ZERO, Duration::from)
}

// A queue that could not start its load: what it measured (nothing) and why.
fn ended(mut result: PerfResult, e: NvmeError) -> Result<PerfResult, NvmeError> {
    if e.is_fatal() {
        result.first_error = Some(e.to_string());
        Ok(result)
    } else {
        Err(e)
    }
}

#[cfg(test)]
mod tests {
    use super::Histogram;

    #[test]
    fn histogram_quantiles_are_within_a_bucket() {
        let mut h = Histogram::default();
        for ns in 1..=10_000u64 {
            h.record(ns * 100);
        }
        let p50 = h.quantile_ns(0.5) as f64;
        let p99 = h.quantile_ns(0.99) as f64;
        assert!((p50 / 500_000.0 - 1.0).abs() < 0.07, "{p50}");
        assert!((p99 / 990_000.0 - 1.0).abs() < 0.07, "{p99}");
        assert_eq!(h.max_ns(), 1_000_000);
        assert!((h.mean_ns() - 500_050.0).abs() < 1.0);
        for ns in [0u64, 1, 15, 16, 17, 1000, 1 << 40, u64::MAX] {
            assert!(Histogram::lower_bound(Histogram::index(ns)) <= ns, "{ns}");
        }
    }
}
