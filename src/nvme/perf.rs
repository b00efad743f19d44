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
    /// each round of completions and resubmissions before sleeping on the interrupt
    /// ([`IoQueue::wait_spinning`](super::IoQueue::wait_spinning), a hybrid of polling and
    /// sleeping, which gives a core back when the device is slow or idle). `None`: sleep at
    /// once (or, without interrupts, always poll).
    pub spin: Option<Duration>,
    /// Mixed reads and writes, as fio's and spdk_nvme_perf's `rwmixread`: this percentage
    /// of the I/Os (0–100) are reads, the others writes, picked at random per I/O; `op` is
    /// then not used. `None`: every I/O is `op`.
    pub rwmix_read: Option<u8>,
}

/// Latencies, in a log-linear histogram of nanoseconds (HdrHistogram-like): every value
/// below 128 has its own bucket, and each power of two above is cut into 128 buckets, so a
/// bucket's width is under 1/128 of its values (percentiles within 0.4%, reported as the
/// bucket's middle). Fixed size (about 58 KiB), no sample is stored. Also keeps the exact
/// count, minimum, maximum, sum and sum of squares (so mean and standard deviation are
/// exact).
#[derive(Debug, Clone)]
pub struct Histogram {
    counts: Vec<u64>,
    total: u64,
    sum_ns: u128,
    sum_sq_ns: u128,
    min_ns: u64,
    max_ns: u64,
}

// Buckets per power of two, log2.
const SUB_BITS: u32 = 7;
const SUB: u32 = 1 << SUB_BITS;
// Powers of two from SUB up to 2^63, SUB buckets each, and the SUB exact values below.
const BUCKETS: usize = ((64 - SUB_BITS + 1) * SUB) as usize;

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: vec![0; BUCKETS],
            total: 0,
            sum_ns: 0,
            sum_sq_ns: 0,
            min_ns: u64::MAX,
            max_ns: 0,
        }
    }
}

/// One non-empty bucket of a [`Histogram`]: the latencies from `low_ns` to `high_ns`,
/// both included.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bucket {
    /// The smallest latency the bucket holds, in nanoseconds.
    pub low_ns: u64,
    /// The largest latency the bucket holds, in nanoseconds.
    pub high_ns: u64,
    /// Latencies recorded in it.
    pub count: u64,
}

impl Histogram {
    fn index(ns: u64) -> usize {
        if ns < u64::from(SUB) {
            return ns as usize;
        }
        let log = 63 - ns.leading_zeros();
        let sub = (ns >> (log - SUB_BITS)) as u32 & (SUB - 1);
        ((log - SUB_BITS + 1) * SUB + sub) as usize
    }

    // The smallest and the largest value of bucket `index`.
    fn bounds(index: usize) -> (u64, u64) {
        let index = index as u32;
        if index < SUB {
            return (u64::from(index), u64::from(index));
        }
        let log = index / SUB + SUB_BITS - 1;
        let sub = u64::from(index % SUB);
        let width = 1u64 << (log - SUB_BITS);
        let low = (1u64 << log) | sub << (log - SUB_BITS);
        (low, low + (width - 1))
    }

    /// Adds one latency.
    pub fn record(&mut self, ns: u64) {
        self.counts[Self::index(ns)] += 1;
        self.total += 1;
        self.sum_ns += u128::from(ns);
        self.sum_sq_ns = self.sum_sq_ns.saturating_add(u128::from(ns) * u128::from(ns));
        self.min_ns = self.min_ns.min(ns);
        self.max_ns = self.max_ns.max(ns);
    }

    /// Adds another histogram.
    pub fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.total += other.total;
        self.sum_ns += other.sum_ns;
        self.sum_sq_ns = self.sum_sq_ns.saturating_add(other.sum_sq_ns);
        self.min_ns = self.min_ns.min(other.min_ns);
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

    /// The sample standard deviation (as fio reports it: over `count - 1`), in
    /// nanoseconds; 0 with fewer than two latencies. Exact while the sums fit 128 bits
    /// (they do for any realistic run), else computed in floating point.
    pub fn stdev_ns(&self) -> f64 {
        let n = u128::from(self.total);
        if n < 2 {
            return 0.0;
        }
        // n·Σx² − (Σx)², over n·(n − 1).
        let exact = n
            .checked_mul(self.sum_sq_ns)
            .zip(self.sum_ns.checked_mul(self.sum_ns))
            .map(|(a, b)| a.saturating_sub(b));
        let variance = match exact {
            Some(num) if self.sum_sq_ns != u128::MAX => num as f64 / (n * (n - 1)) as f64,
            _ => {
                let mean = self.mean_ns();
                ((self.sum_sq_ns as f64 / n as f64 - mean * mean) * n as f64 / (n - 1) as f64).max(0.0)
            }
        };
        variance.sqrt()
    }

    /// The `q` quantile (0–1; `0.99` is p99), in nanoseconds: the middle of the bucket
    /// that holds it, kept within the minimum and maximum recorded (so a constant latency
    /// comes back exactly, as do the smallest and the largest). 0 when nothing was
    /// recorded.
    pub fn quantile_ns(&self, q: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let q = if q.is_nan() { 0.5 } else { q.clamp(0.0, 1.0) };
        let want = ((self.total as f64) * q).ceil().clamp(1.0, self.total as f64) as u64;
        // The smallest and the largest latencies are known exactly.
        if want == 1 {
            return self.min_ns;
        }
        if want == self.total {
            return self.max_ns;
        }
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= want {
                let (low, high) = Self::bounds(i);
                return (low + (high - low) / 2).clamp(self.min_ns, self.max_ns);
            }
        }
        self.max_ns
    }

    /// The smallest latency, in nanoseconds (0 when nothing was recorded).
    pub fn min_ns(&self) -> u64 {
        if self.total == 0 { 0 } else { self.min_ns }
    }

    /// The largest latency, in nanoseconds.
    pub fn max_ns(&self) -> u64 {
        self.max_ns
    }

    /// The non-empty buckets, from the smallest latencies up.
    pub fn buckets(&self) -> impl Iterator<Item = Bucket> + '_ {
        self.counts
            .iter()
            .enumerate()
            .filter(|(_, c)| **c > 0)
            .map(|(i, &count)| {
                let (low_ns, high_ns) = Self::bounds(i);
                Bucket {
                    low_ns,
                    high_ns,
                    count,
                }
            })
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
    /// Reads completed successfully (part of `ios`).
    pub reads: u64,
    /// Writes completed successfully (part of `ios`).
    pub writes: u64,
    /// What each queue measured, in queue order (empty in a queue's own result). Their
    /// `elapsed` is the queue's own time.
    pub per_queue: Vec<PerfResult>,
}

impl PerfResult {
    /// Adds what another queue (or another part of a run) measured; its elapsed time is
    /// not added (the parts ran side by side).
    pub fn merge(&mut self, other: PerfResult) {
        self.ios += other.ios;
        self.errors += other.errors;
        self.doorbells += other.doorbells;
        self.cpu += other.cpu;
        self.reads += other.reads;
        self.writes += other.writes;
        self.latency.merge(&other.latency);
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
        // Queue by queue (a run after a re-attach adds to the same queues).
        for (i, q) in other.per_queue.into_iter().enumerate() {
            match self.per_queue.get_mut(i) {
                Some(mine) => {
                    mine.merge(q);
                }
                None => self.per_queue.push(q),
            }
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
    if config.rwmix_read.is_none() && !matches!(config.op, Op::Read | Op::Write) {
        return Err(NvmeError::Invalid("perf runs reads or writes".into()));
    }
    if let Some(p) = config.rwmix_read
        && p > 100
    {
        return Err(NvmeError::Invalid(format!(
            "rwmix_read {p}: a percentage is at most 100"
        )));
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
                results.lock().unwrap_or_else(|e| e.into_inner()).push((q, r));
            });
        }
    });
    let elapsed = start.elapsed();
    let mut total = PerfResult {
        elapsed,
        ..Default::default()
    };
    let mut results = results.into_inner().unwrap_or_else(|e| e.into_inner());
    results.sort_by_key(|(q, _)| *q);
    let mut per_queue = Vec::with_capacity(results.len());
    for (_, r) in results {
        let r = r?;
        total.merge(r.clone());
        per_queue.push(r);
    }
    total.per_queue = per_queue;
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
    // Reads or writes, or (mixed) a read with probability rwmix_read %.
    let pick_op = |rng: &mut XorShift| match config.rwmix_read {
        None => config.op,
        Some(p) if rng.next() % 100 < u64::from(p) => Op::Read,
        Some(_) => Op::Write,
    };
    let mut ops = vec![config.op; usize::from(depth)];
    // Tag `tag`'s I/O at `lba`, in its own part of the buffer.
    let request = |tag: u16, op: Op, lba: u64| IoRequest {
        op,
        nsid: config.nsid,
        lba,
        blocks,
        buffer: Some((&buffer, usize::from(tag) * config.io_size)),
    };
    let started = Instant::now();
    for tag in 0..depth {
        let op = pick_op(&mut rng);
        ops[usize::from(tag)] = op;
        let req = request(tag, op, pick(&mut rng));
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
    let cpu_at_start = thread_cpu();
    loop {
        let handle = |tag: u64, r: Result<(), NvmeError>| {
            let tag = tag as u16;
            match r {
                Ok(()) => {
                    let ns = submitted_at[usize::from(tag)].elapsed().as_nanos() as u64;
                    result.latency.record(ns);
                    result.ios += 1;
                    match ops[usize::from(tag)] {
                        Op::Read => result.reads += 1,
                        _ => result.writes += 1,
                    }
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
        let now_ok = match (sleeps, config.spin) {
            (true, Some(spin)) => queue.wait_spinning(spin, Duration::from_millis(100), handle),
            (true, None) => queue.wait(Duration::from_millis(100), handle),
            (false, _) => queue.poll(handle),
        };
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
                let op = pick_op(&mut rng);
                ops[usize::from(tag)] = op;
                let req = request(tag, op, pick(&mut rng));
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
    result.elapsed = started.elapsed();
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
    use super::{BUCKETS, Histogram};

    fn within(got: u64, want: f64, rel: f64) {
        assert!(
            (got as f64 / want - 1.0).abs() <= rel,
            "{got} is not within {rel} of {want}"
        );
    }

    #[test]
    fn buckets_tile_the_whole_range() {
        assert_eq!(Histogram::bounds(0), (0, 0));
        for i in 0..BUCKETS {
            let (low, high) = Histogram::bounds(i);
            assert!(low <= high, "{i}");
            assert_eq!(Histogram::index(low), i, "{low}");
            assert_eq!(Histogram::index(high), i, "{high}");
            if i + 1 < BUCKETS {
                assert_eq!(high + 1, Histogram::bounds(i + 1).0, "{i}");
            }
            // A bucket is narrower than 1/128 of its values.
            assert!((high - low) as f64 <= low as f64 / 128.0, "{i}: {low}..={high}");
        }
        assert_eq!(Histogram::bounds(BUCKETS - 1).1, u64::MAX);
    }

    #[test]
    fn an_empty_histogram_reports_zeroes() {
        let h = Histogram::default();
        assert_eq!((h.count(), h.min_ns(), h.max_ns()), (0, 0, 0));
        assert_eq!(h.quantile_ns(0.99), 0);
        assert_eq!((h.mean_ns(), h.stdev_ns()), (0.0, 0.0));
        assert_eq!(h.buckets().count(), 0);
    }

    #[test]
    fn a_constant_latency_comes_back_exactly() {
        let mut h = Histogram::default();
        for _ in 0..1000 {
            h.record(123_457);
        }
        for q in [0.0, 0.5, 0.9, 0.99, 0.999, 0.9999, 1.0] {
            assert_eq!(h.quantile_ns(q), 123_457, "{q}");
        }
        assert_eq!((h.min_ns(), h.max_ns()), (123_457, 123_457));
        assert_eq!(h.stdev_ns(), 0.0);
        assert_eq!(h.mean_ns(), 123_457.0);
    }

    #[test]
    fn uniform_latencies_give_their_percentiles_and_stdev() {
        // 1..=N µs: the q quantile is q·N µs; the sample stdev is √(N(N+1)/12) µs.
        let n = 100_000u64;
        let mut h = Histogram::default();
        for i in 1..=n {
            h.record(i * 1000);
        }
        for q in [0.5, 0.9, 0.99, 0.999, 0.9999] {
            within(h.quantile_ns(q), q * n as f64 * 1000.0, 0.004);
        }
        assert_eq!((h.min_ns(), h.max_ns()), (1000, n * 1000));
        assert_eq!(h.quantile_ns(1.0), n * 1000);
        assert_eq!(h.quantile_ns(0.0), 1000);
        assert!((h.mean_ns() - (n + 1) as f64 * 500.0).abs() < 1e-6);
        let stdev = ((n * (n + 1)) as f64 / 12.0).sqrt() * 1000.0;
        assert!((h.stdev_ns() / stdev - 1.0).abs() < 1e-9, "{}", h.stdev_ns());
        assert_eq!(h.buckets().map(|b| b.count).sum::<u64>(), n);
    }

    #[test]
    fn exponential_latencies_give_their_tail() {
        // Quantiles of an exponential distribution with mean m: -m·ln(1 - q), sampled at
        // evenly spaced probabilities.
        let (n, m) = (200_000u64, 50_000.0f64);
        let mut h = Histogram::default();
        for i in 0..n {
            let p = (i as f64 + 0.5) / n as f64;
            h.record((-m * (1.0 - p).ln()) as u64);
        }
        for q in [0.5, 0.9, 0.99, 0.999, 0.9999] {
            within(h.quantile_ns(q), -m * (1.0f64 - q).ln(), 0.005);
        }
        within(h.mean_ns() as u64, m, 0.01);
        within(h.stdev_ns() as u64, m, 0.02);
    }

    #[test]
    fn a_rare_slow_mode_shows_in_the_tail_only() {
        // 99.5% at 10 µs, 0.5% at 2 ms: p99 is fast, p99.9 slow.
        let mut h = Histogram::default();
        for i in 0..10_000u64 {
            h.record(if i % 200 == 0 { 2_000_000 } else { 10_000 });
        }
        within(h.quantile_ns(0.5), 10_000.0, 0.004);
        within(h.quantile_ns(0.99), 10_000.0, 0.004);
        within(h.quantile_ns(0.999), 2_000_000.0, 0.004);
        assert_eq!(h.quantile_ns(0.9999), 2_000_000);
        assert_eq!(h.buckets().count(), 2);
    }

    #[test]
    fn merged_histograms_equal_one_that_saw_everything() {
        let (mut a, mut b, mut all) = (Histogram::default(), Histogram::default(), Histogram::default());
        for ns in (0..5000u64).map(|i| i * i) {
            if ns % 3 == 0 { &mut a } else { &mut b }.record(ns);
            all.record(ns);
        }
        a.merge(&b);
        assert_eq!(a.buckets().collect::<Vec<_>>(), all.buckets().collect::<Vec<_>>());
        assert_eq!(
            (a.count(), a.min_ns(), a.max_ns()),
            (all.count(), all.min_ns(), all.max_ns())
        );
        assert_eq!(a.stdev_ns(), all.stdev_ns());
        for q in [0.5, 0.99, 0.9999] {
            assert_eq!(a.quantile_ns(q), all.quantile_ns(q));
        }
        for ns in [0u64, 1, 127, 128, 129, 1000, 1 << 40, u64::MAX] {
            let (low, high) = Histogram::bounds(Histogram::index(ns));
            assert!(low <= ns && ns <= high, "{ns}");
        }
    }

    // Several queues: the result has one line per queue, in queue order, adding up to the
    // total; a mixed run does about the asked share of reads, and 0 and 100 are pure.
    #[test]
    fn a_mixed_run_on_several_queues_reports_each_queue_and_the_mix() {
        use super::{PerfConfig, Progress, run};
        use crate::nvme::{Controller, Op, Options};
        use crate::testing::nvme::{EmuConfig, EmulatedNvme};
        use std::time::Duration;

        let e = EmulatedNvme::new(EmuConfig::default()).unwrap();
        let c = Controller::init(e.clone(), &Options::default()).unwrap();
        for mix in [Some(70u8), Some(0), Some(100), None] {
            let config = PerfConfig {
                op: Op::Read,
                random: true,
                io_size: 4096,
                queue_depth: 8,
                queues: 2,
                duration: Duration::from_millis(300),
                nsid: 1,
                spin: None,
                rwmix_read: mix,
            };
            let r = run(&c, &config, &Progress::default()).unwrap();
            assert_eq!(r.errors, 0, "{:?}", r.first_error);
            assert!(r.ios > 0, "{mix:?}");
            assert_eq!(r.per_queue.len(), 2);
            assert_eq!(r.per_queue.iter().map(|q| q.ios).sum::<u64>(), r.ios);
            assert_eq!(r.per_queue.iter().map(|q| q.latency.count()).sum::<u64>(), r.ios);
            assert!(r.per_queue.iter().all(|q| q.ios > 0 && q.per_queue.is_empty()));
            assert_eq!(r.reads + r.writes, r.ios);
            match mix {
                Some(0) => assert_eq!(r.reads, 0),
                Some(100) | None => assert_eq!(r.writes, 0),
                // The share is checked once there are enough I/Os to tell (a busy host may
                // run few): 400 draws put 10 points at over 4 standard deviations.
                Some(p) if r.ios >= 400 => {
                    let share = r.reads as f64 / r.ios as f64 * 100.0;
                    assert!((share - f64::from(p)).abs() < 10.0, "{share}% reads");
                }
                Some(_) => assert!(r.reads > 0 || r.ios < 20, "{} I/Os, no read", r.ios),
            }
        }
        let mut bad = PerfConfig {
            op: Op::Read,
            random: true,
            io_size: 4096,
            queue_depth: 1,
            queues: 1,
            duration: Duration::from_millis(10),
            nsid: 1,
            spin: None,
            rwmix_read: Some(101),
        };
        assert!(run(&c, &bad, &Progress::default()).is_err());
        bad.rwmix_read = None;
        bad.op = Op::Flush;
        assert!(run(&c, &bad, &Progress::default()).is_err());
    }
}
