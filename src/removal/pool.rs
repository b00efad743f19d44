//! Guarded reads: work that may block in the kernel, run on helper threads and waited for
//! only until a deadline.
//!
//! A read of `sriov_numvfs` while the device's removal is pending sits in the kernel until
//! the device is released, and nothing can cancel it. So the read runs on a helper thread;
//! the caller waits on a [`Ticket`] (or a [`Batch`]) until its deadline and then walks
//! away. Two outcomes are kept apart, because only one says something about the device:
//!
//! - [`PoolError::TimedOut`]: the job started and did not finish: it is stuck (in the
//!   kernel, for a sysfs read). The thread stays stuck, but the pool notices (a job
//!   running longer than [`PoolLimits::stall`] no longer counts as capacity) and starts
//!   another thread so that other work goes on; when the stuck job returns, its thread
//!   takes new work again.
//! - [`PoolError::NotStarted`]: every thread was busy or stuck until the deadline. The job
//!   leaves the queue at once and never runs, so abandoned work never piles up.
//!
//! The number of threads is bounded by [`PoolLimits::max_threads`]. The default pool
//! ([`BlockingPool::shared`]) is one per process, so the bound holds for the process.
//!
//! # Dropping
//!
//! Dropping a [`Ticket`] or [`Batch`] before its jobs started removes them from the queue.
//! Dropping the last handle of a private pool lets its idle threads exit; threads stuck in
//! a job stay until the job returns. The shared pool lives as long as the process.
//!
//! # Process exit
//!
//! `exit` does not wait for helper threads, but a thread stuck in the kernel on a device
//! lock keeps the process from being torn down until the lock is released. A process that
//! holds a device open through vfio must therefore never read that device's blocking
//! attributes (the scanner refuses to: see [`crate::removal::held`]), or the removal that
//! waits for its fd and the read that waits for the removal wait for each other.
//!
//! ```
//! use std::time::{Duration, Instant};
//! use pcibus::removal::pool::BlockingPool;
//! let guard = BlockingPool::new(Default::default());
//! let ticket = guard.submit(|| 6 * 7);
//! assert_eq!(ticket.wait_until(Instant::now() + Duration::from_secs(1)).unwrap(), 42);
//! ```

use std::collections::VecDeque;
use std::io;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

/// How a [`BlockingPool`] sizes its pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolLimits {
    /// Threads that run jobs when none is stuck (default: available parallelism, at most 8).
    pub parallelism: usize,
    /// Most threads alive at once, stuck ones included (default 32).
    pub max_threads: usize,
    /// A job running longer than this counts as stuck (default 20 ms; sysfs reads take
    /// microseconds).
    pub stall: Duration,
    /// An idle thread above `parallelism` exits after this long (default 1 s).
    pub idle_exit: Duration,
}

impl Default for PoolLimits {
    fn default() -> Self {
        let cores = thread::available_parallelism().map_or(2, |n| n.get());
        PoolLimits {
            parallelism: cores.clamp(1, 8),
            max_threads: 32,
            stall: Duration::from_millis(20),
            idle_exit: Duration::from_secs(1),
        }
    }
}

/// A guarded job did not finish in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PoolError {
    /// The deadline passed before the job started: every thread was busy or stuck. The job
    /// left the queue and will never run.
    #[error("not started within {waited:?} (every helper thread busy or stuck)")]
    NotStarted {
        /// How long the caller waited.
        waited: Duration,
    },
    /// The job started but did not finish by the deadline: it is stuck (for a sysfs read,
    /// in the kernel). It runs on; its result is dropped.
    #[error("timed out after {waited:?} ({stuck} helper threads stuck)")]
    TimedOut {
        /// How long the caller waited.
        waited: Duration,
        /// Threads stuck in jobs when the wait ended.
        stuck: usize,
    },
    /// The job panicked.
    #[error("guarded job panicked")]
    Panicked,
}

type Job = Box<dyn FnOnce() + Send + 'static>;

// A queued job and the ticket or batch it belongs to, so that its waiter can take it out
// of the queue when it gives up.
struct Queued {
    owner: u64,
    run: Job,
}

// A job's life, decided by one compare-and-swap so that "never started" is exact: the
// worker moves QUEUED to STARTED before running it, the waiter that gives up moves QUEUED
// to ABANDONED (the job then never runs).
const QUEUED: u8 = 0;
const STARTED: u8 = 1;
const ABANDONED: u8 = 2;

// Moves a job's life from `from` to `to`; false if it was not at `from`.
fn moved(life: &AtomicU8, from: u8, to: u8) -> bool {
    life.compare_exchange(from, to, Ordering::AcqRel, Ordering::Acquire)
        .is_ok()
}

/// A pool of helper threads for work that may block. Clones share the pool.
#[derive(Clone)]
pub struct BlockingPool {
    handle: Arc<Handle>,
}

impl std::fmt::Debug for BlockingPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let st = self.handle.shared.state.lock();
        f.debug_struct("BlockingPool")
            .field("limits", &self.handle.shared.limits)
            .field("threads", &st.threads)
            .field("queued", &st.queue.len())
            .finish()
    }
}

/// The process-wide pool ([`BlockingPool::shared`]): `max_threads` then bounds the helper
/// threads of the whole process, not of each scanner.
impl Default for BlockingPool {
    fn default() -> Self {
        BlockingPool::shared()
    }
}

// Dropping the last BlockingPool handle tells the workers to exit once the queue is empty. The
// workers hold `Shared`, not `Handle`, so they do not keep the pool alive themselves.
struct Handle {
    shared: Arc<Shared>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.shared.state.lock().shutdown = true;
        self.shared.work.notify_all();
    }
}

struct Shared {
    state: Mutex<State>,
    next_owner: AtomicU64,
    work: Condvar,
    limits: PoolLimits,
}

#[derive(Default)]
struct State {
    queue: VecDeque<Queued>,
    threads: usize,
    idle: usize,
    starting: usize,
    // When each worker's current job started, indexed by worker slot; `None` when idle.
    running: Vec<Option<Instant>>,
    free_slots: Vec<usize>,
    shutdown: bool,
}

impl State {
    fn stuck(&self, now: Instant, stall: Duration) -> usize {
        self.running
            .iter()
            .flatten()
            .filter(|t| now.duration_since(**t) >= stall)
            .count()
    }
}

impl BlockingPool {
    /// A pool with these limits. Threads start lazily, on the first jobs.
    pub fn new(limits: PoolLimits) -> Self {
        let limits = PoolLimits {
            parallelism: limits.parallelism.max(1),
            max_threads: limits.max_threads.max(limits.parallelism.max(1)),
            ..limits
        };
        BlockingPool {
            handle: Arc::new(Handle {
                shared: Arc::new(Shared {
                    state: Mutex::new(State::default()),
                    next_owner: AtomicU64::new(0),
                    work: Condvar::new(),
                    limits,
                }),
            }),
        }
    }

    /// The process-wide pool, with default limits, created on first use. Scanners,
    /// `details::read` and snapshots use it unless given their own, so the bound on helper
    /// threads holds for the process.
    pub fn shared() -> BlockingPool {
        static SHARED: std::sync::OnceLock<BlockingPool> = std::sync::OnceLock::new();
        SHARED
            .get_or_init(|| BlockingPool::new(PoolLimits::default()))
            .clone()
    }

    /// The limits in force.
    pub fn limits(&self) -> PoolLimits {
        self.handle.shared.limits
    }

    /// Threads alive now, stuck ones included.
    pub fn threads(&self) -> usize {
        self.handle.shared.state.lock().threads
    }

    /// Threads whose current job has run longer than the stall threshold.
    pub fn stuck(&self) -> usize {
        let st = self.handle.shared.state.lock();
        st.stuck(Instant::now(), self.handle.shared.limits.stall)
    }

    /// Queues `job`; its result comes through the returned ticket. A job whose ticket was
    /// dropped or gave up before it started leaves the queue and never runs.
    pub fn submit<T, F>(&self, job: F) -> Ticket<T>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let slot = Arc::new(Slot {
            life: AtomicU8::new(QUEUED),
            result: Mutex::new(None),
            ready: Condvar::new(),
        });
        let theirs = Arc::clone(&slot);
        let run: Job = Box::new(move || {
            if !moved(&theirs.life, QUEUED, STARTED) {
                return;
            }
            let outcome = catch_unwind(AssertUnwindSafe(job)).map_err(|_| PoolError::Panicked);
            *theirs.result.lock() = Some(outcome);
            theirs.ready.notify_one();
        });
        let owner = self.enqueue(std::iter::once(run));
        Ticket {
            slot,
            owner,
            pool: self.clone(),
        }
    }

    /// Queues all `jobs` at once, to be waited for together with one deadline: one queue
    /// lock for the lot, and one wake-up of the waiter when the last one finishes (not one
    /// per job), which is what makes guarding thousands of small reads cheap.
    pub fn submit_all<T, F>(&self, jobs: impl IntoIterator<Item = F>) -> Batch<T>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let jobs: Vec<F> = jobs.into_iter().collect();
        let shared = Arc::new(BatchShared {
            slots: (0..jobs.len())
                .map(|_| BatchSlot {
                    life: AtomicU8::new(QUEUED),
                    result: Mutex::new(None),
                })
                .collect(),
            remaining: AtomicUsize::new(jobs.len()),
            lock: Mutex::new(()),
            done: Condvar::new(),
        });
        let runs = jobs.into_iter().enumerate().map(|(i, job)| {
            let batch = Arc::clone(&shared);
            Box::new(move || {
                let slot = &batch.slots[i];
                if !moved(&slot.life, QUEUED, STARTED) {
                    return;
                }
                let outcome = catch_unwind(AssertUnwindSafe(job)).map_err(|_| PoolError::Panicked);
                *slot.result.lock() = Some(outcome);
                if batch.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
                    let _held = batch.lock.lock();
                    batch.done.notify_all();
                }
            }) as Job
        });
        let owner = self.enqueue(runs);
        Batch {
            shared,
            owner,
            pool: self.clone(),
        }
    }

    // Queues jobs under one owner id and wakes or starts threads for them.
    fn enqueue(&self, runs: impl Iterator<Item = Job>) -> u64 {
        let shared = &self.handle.shared;
        let owner = shared.next_owner.fetch_add(1, Ordering::Relaxed);
        let mut st = shared.state.lock();
        let before = st.queue.len();
        st.queue.extend(runs.map(|run| Queued { owner, run }));
        match st.queue.len() - before {
            0 => {}
            1 if st.idle > 0 => {
                shared.work.notify_one();
            }
            _ if st.idle > 0 => {
                shared.work.notify_all();
            }
            _ => {}
        }
        spawn_as_needed(shared, &mut st);
        owner
    }

    // Takes the jobs of `owner` that have not started out of the queue. They are dropped
    // after the lock is released (dropping a closure may close files).
    fn withdraw(&self, owner: u64) {
        let mut st = self.handle.shared.state.lock();
        if !st.queue.iter().any(|q| q.owner == owner) {
            return;
        }
        let (taken, rest): (VecDeque<Queued>, VecDeque<Queued>) =
            st.queue.drain(..).partition(|q| q.owner == owner);
        st.queue = rest;
        drop(st);
        drop(taken);
    }

    /// Jobs waiting in the queue (not started).
    pub fn queued(&self) -> usize {
        self.handle.shared.state.lock().queue.len()
    }

    /// Reads a whole file (at most `limit` bytes) on a guard thread, waiting until
    /// `deadline`. The open does not use `O_NONBLOCK`, so a FIFO blocks here the way a
    /// locked sysfs attribute does in the kernel.
    pub fn read(
        &self,
        path: &Path,
        limit: usize,
        deadline: Instant,
    ) -> Result<io::Result<Vec<u8>>, PoolError> {
        let path = path.to_owned();
        self.submit(move || read_blocking(&path, limit))
            .wait_until(deadline)
    }

    // Called by waiters every `stall`: a worker may have become stuck since the last check.
    fn rebalance(&self) {
        let shared = &self.handle.shared;
        let mut st = shared.state.lock();
        spawn_as_needed(shared, &mut st);
    }
}

// Starts threads while work is queued that no idle thread will take, the threads that are
// not stuck are fewer than `parallelism`, and the bound allows.
fn spawn_as_needed(shared: &Arc<Shared>, st: &mut State) {
    let limits = shared.limits;
    let now = Instant::now();
    let busy = st.running.iter().flatten().count();
    let healthy = busy - st.stuck(now, limits.stall);
    let capacity = healthy + st.idle + st.starting;
    let uncovered = st.queue.len().saturating_sub(st.idle + st.starting);
    let want = uncovered
        .min(limits.parallelism.saturating_sub(capacity))
        .min(limits.max_threads.saturating_sub(st.threads));
    for _ in 0..want {
        let slot = st.free_slots.pop().unwrap_or_else(|| {
            st.running.push(None);
            st.running.len() - 1
        });
        let worker_shared = Arc::clone(shared);
        let spawned = thread::Builder::new()
            .name("pcibus-guard".into())
            .spawn(move || worker(worker_shared, slot));
        match spawned {
            Ok(_) => {
                st.threads += 1;
                st.starting += 1;
            }
            Err(e) => {
                // Out of threads: the queued work waits for a running thread, or times out.
                log::warn!("pcibus guard: cannot start a thread: {e}");
                st.free_slots.push(slot);
                break;
            }
        }
    }
}

fn worker(shared: Arc<Shared>, slot: usize) {
    let limits = shared.limits;
    let mut st = shared.state.lock();
    st.starting -= 1;
    loop {
        if let Some(job) = st.queue.pop_front() {
            st.running[slot] = Some(Instant::now());
            drop(st);
            (job.run)();
            st = shared.state.lock();
            st.running[slot] = None;
            continue;
        }
        if st.shutdown {
            break;
        }
        st.idle += 1;
        let timed_out = shared.work.wait_for(&mut st, limits.idle_exit).timed_out();
        st.idle -= 1;
        if timed_out && st.queue.is_empty() && st.threads > limits.parallelism {
            break;
        }
    }
    st.threads -= 1;
    st.free_slots.push(slot);
}

struct BatchSlot<T> {
    life: AtomicU8,
    result: Mutex<Option<Result<T, PoolError>>>,
}

struct BatchShared<T> {
    slots: Vec<BatchSlot<T>>,
    remaining: AtomicUsize,
    lock: Mutex<()>,
    done: Condvar,
}

/// Jobs submitted together by [`BlockingPool::submit_all`], waited for until one deadline.
/// Dropping it takes the jobs that have not started out of the queue.
#[must_use = "a batch does nothing unless waited on"]
pub struct Batch<T> {
    shared: Arc<BatchShared<T>>,
    owner: u64,
    pool: BlockingPool,
}

impl<T> Batch<T> {
    /// Waits until every job is done or `deadline` passes, then returns each job's result
    /// in submission order: its value; [`PoolError::TimedOut`] for a job that started and
    /// had not finished; [`PoolError::NotStarted`] for one that had not started (it is
    /// taken out of the queue and never runs).
    pub fn wait_until(self, deadline: Instant) -> Vec<Result<T, PoolError>> {
        let begun = Instant::now();
        let stall = self.pool.handle.shared.limits.stall;
        let b = &self.shared;
        {
            let mut held = b.lock.lock();
            loop {
                if b.remaining.load(Ordering::Acquire) == 0 {
                    break;
                }
                let now = Instant::now();
                if now >= deadline {
                    break;
                }
                let tick = deadline.min(now + stall);
                if b.done.wait_until(&mut held, tick).timed_out() && tick < deadline {
                    // No completion for a stall period: a worker may be stuck holding up
                    // the queue.
                    drop(held);
                    self.pool.rebalance();
                    held = b.lock.lock();
                }
            }
        }
        let waited = begun.elapsed();
        // Decide every unfinished job's fate first (so none starts meanwhile), then take
        // the abandoned ones out of the queue.
        let mut abandoned = false;
        let fates: Vec<Option<PoolError>> = b
            .slots
            .iter()
            .map(|slot| {
                moved(&slot.life, QUEUED, ABANDONED).then(|| {
                    abandoned = true;
                    PoolError::NotStarted { waited }
                })
            })
            .collect();
        if abandoned {
            self.pool.withdraw(self.owner);
        }
        let stuck = self.pool.stuck();
        b.slots
            .iter()
            .zip(fates)
            .map(|(slot, fate)| match fate {
                Some(e) => Err(e),
                None => slot
                    .result
                    .lock()
                    .take()
                    .unwrap_or(Err(PoolError::TimedOut { waited, stuck })),
            })
            .collect()
    }
}

impl<T> Drop for Batch<T> {
    fn drop(&mut self) {
        let mut abandoned = false;
        for slot in &self.shared.slots {
            abandoned |= moved(&slot.life, QUEUED, ABANDONED);
        }
        if abandoned {
            self.pool.withdraw(self.owner);
        }
    }
}

struct Slot<T> {
    life: AtomicU8,
    result: Mutex<Option<Result<T, PoolError>>>,
    ready: Condvar,
}

/// The result of a job submitted to a [`BlockingPool`], to be waited for until a deadline.
/// Dropping it takes the job out of the queue if it has not started.
#[must_use = "a ticket does nothing unless waited on"]
pub struct Ticket<T> {
    slot: Arc<Slot<T>>,
    owner: u64,
    pool: BlockingPool,
}

impl<T> Ticket<T> {
    /// Waits until the job is done or `deadline` passes, whichever is first. A job that
    /// has not started by then never runs ([`PoolError::NotStarted`]); one that started
    /// and has not finished is stuck ([`PoolError::TimedOut`]).
    pub fn wait_until(self, deadline: Instant) -> Result<T, PoolError> {
        let begun = Instant::now();
        let stall = self.pool.handle.shared.limits.stall;
        let mut result = self.slot.result.lock();
        loop {
            if let Some(outcome) = result.take() {
                return outcome;
            }
            let now = Instant::now();
            if now >= deadline {
                drop(result);
                let waited = now.duration_since(begun);
                return Err(self.give_up(waited));
            }
            let tick = deadline.min(now + stall);
            if self.slot.ready.wait_until(&mut result, tick).timed_out() && tick < deadline {
                // No answer within a stall period: make sure a stuck worker is not
                // holding up the queue this job sits in.
                drop(result);
                self.pool.rebalance();
                result = self.slot.result.lock();
            }
        }
    }

    fn give_up(&self, waited: Duration) -> PoolError {
        if moved(&self.slot.life, QUEUED, ABANDONED) {
            self.pool.withdraw(self.owner);
            PoolError::NotStarted { waited }
        } else {
            PoolError::TimedOut {
                waited,
                stuck: self.pool.stuck(),
            }
        }
    }

    /// The result if the job is done, without waiting.
    pub fn try_take(&mut self) -> Option<Result<T, PoolError>> {
        self.slot.result.lock().take()
    }
}

impl<T> Drop for Ticket<T> {
    fn drop(&mut self) {
        if moved(&self.slot.life, QUEUED, ABANDONED) {
            self.pool.withdraw(self.owner);
        }
    }
}

/// Reads a whole file, at most `limit` bytes, with a plain blocking open and read: what the
/// guard threads do for a single attribute.
pub fn read_blocking(path: &Path, limit: usize) -> io::Result<Vec<u8>> {
    use std::io::Read;
    let file = std::fs::File::open(path)?;
    let mut out = Vec::new();
    file.take(limit as u64).read_to_end(&mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    fn limits(parallelism: usize, max_threads: usize) -> PoolLimits {
        PoolLimits {
            parallelism,
            max_threads,
            stall: Duration::from_millis(10),
            idle_exit: Duration::from_millis(200),
        }
    }

    fn soon(ms: u64) -> Instant {
        Instant::now() + Duration::from_millis(ms)
    }

    #[test]
    fn runs_jobs_and_returns_results() {
        let g = BlockingPool::new(limits(2, 4));
        let tickets: Vec<_> = (0..100).map(|i| g.submit(move || i * 2)).collect();
        let sum: i32 = tickets
            .into_iter()
            .map(|t| t.wait_until(soon(5000)).unwrap())
            .sum();
        assert_eq!(sum, (0..100).map(|i| i * 2).sum::<i32>());
        assert!(
            g.threads() <= 2,
            "no job stalled, so no thread beyond parallelism"
        );
    }

    #[test]
    fn a_stuck_job_times_out_and_others_still_run() {
        let g = BlockingPool::new(limits(1, 4));
        let (release, gate) = mpsc::channel::<()>();
        let stuck = g.submit(move || gate.recv().ok());
        // With parallelism 1 the next job queues behind the stuck one until the pool
        // notices the stall and starts another thread.
        let other = g.submit(|| "done");
        assert_eq!(other.wait_until(soon(2000)).unwrap(), "done");
        let err = stuck.wait_until(soon(30)).unwrap_err();
        assert!(matches!(err, PoolError::TimedOut { stuck: 1, .. }), "{err:?}");
        release.send(()).unwrap();
    }

    #[test]
    fn stuck_threads_are_bounded_and_reused() {
        let g = BlockingPool::new(limits(1, 3));
        let (release, gate) = mpsc::channel::<()>();
        let gate = Arc::new(std::sync::Mutex::new(gate));
        let mut blocked = Vec::new();
        for _ in 0..3 {
            let gate = Arc::clone(&gate);
            blocked.push(g.submit(move || {
                let _ = gate.lock().unwrap().recv();
            }));
            thread::sleep(Duration::from_millis(15));
            g.rebalance();
        }
        // All three threads are stuck: a fourth job cannot start and is given up on time.
        let t0 = Instant::now();
        let err = g.submit(|| ()).wait_until(soon(50)).unwrap_err();
        assert!(matches!(err, PoolError::NotStarted { .. }), "{err:?}");
        assert_eq!(g.queued(), 0, "the job left the queue");
        assert!(t0.elapsed() < Duration::from_millis(500));
        assert_eq!(g.threads(), 3);
        // Release them: the same threads take new work.
        for _ in 0..3 {
            release.send(()).unwrap();
        }
        assert_eq!(g.submit(|| 7).wait_until(soon(2000)).unwrap(), 7);
        assert!(g.threads() <= 3);
        drop(blocked);
    }

    #[test]
    fn abandoned_jobs_are_skipped() {
        let g = BlockingPool::new(limits(1, 1));
        let (release, gate) = mpsc::channel::<()>();
        let _stuck = g.submit(move || gate.recv().ok());
        let ran = Arc::new(AtomicUsize::new(0));
        for _ in 0..10 {
            let ran = Arc::clone(&ran);
            let _ = g
                .submit(move || ran.fetch_add(1, Ordering::SeqCst))
                .wait_until(soon(1));
        }
        release.send(()).unwrap();
        assert_eq!(g.submit(|| ()).wait_until(soon(2000)), Ok(()));
        assert_eq!(
            ran.load(Ordering::SeqCst),
            0,
            "jobs whose callers gave up never ran"
        );
    }

    #[test]
    fn a_batch_returns_results_in_order_and_times_out_the_stuck() {
        let g = BlockingPool::new(limits(2, 8));
        let (release, gate) = mpsc::channel::<()>();
        let gate = Arc::new(std::sync::Mutex::new(gate));
        let jobs: Vec<Box<dyn FnOnce() -> usize + Send>> = (0..50)
            .map(|i| -> Box<dyn FnOnce() -> usize + Send> {
                if i == 3 || i == 40 {
                    let gate = Arc::clone(&gate);
                    Box::new(move || {
                        let _ = gate.lock().unwrap().recv();
                        i
                    })
                } else {
                    Box::new(move || i)
                }
            })
            .collect();
        let t0 = Instant::now();
        let out = g.submit_all(jobs).wait_until(soon(300));
        assert!(t0.elapsed() < Duration::from_secs(3));
        for (i, r) in out.iter().enumerate() {
            match i {
                3 | 40 => assert!(matches!(r, Err(PoolError::TimedOut { .. })), "{i}: {r:?}"),
                _ => assert_eq!(r, &Ok(i)),
            }
        }
        release.send(()).unwrap();
        release.send(()).unwrap();
        let all_fast = g.submit_all((0..10).map(|i| move || i)).wait_until(soon(2000));
        assert_eq!(all_fast, (0..10).map(Ok).collect::<Vec<_>>());
    }

    #[test]
    fn not_started_and_stuck_are_told_apart() {
        let g = BlockingPool::new(limits(1, 1));
        let (release, gate) = mpsc::channel::<()>();
        let stuck = g.submit(move || gate.recv().ok());
        // The only thread is now stuck: the next job can never start.
        let queued = g.submit(|| 1);
        assert!(matches!(
            stuck.wait_until(soon(30)),
            Err(PoolError::TimedOut { stuck: 1, .. })
        ));
        assert!(matches!(
            queued.wait_until(soon(30)),
            Err(PoolError::NotStarted { .. })
        ));
        // In a batch too, job by job.
        let (release2, gate2) = mpsc::channel::<()>();
        release.send(()).unwrap();
        let jobs: Vec<Box<dyn FnOnce() -> u32 + Send>> = vec![
            Box::new(move || {
                let _ = gate2.recv();
                0
            }),
            Box::new(|| 1),
        ];
        let out = g.submit_all(jobs).wait_until(soon(100));
        assert!(matches!(out[0], Err(PoolError::TimedOut { .. })), "{:?}", out[0]);
        assert!(
            matches!(out[1], Err(PoolError::NotStarted { .. })),
            "{:?}",
            out[1]
        );
        assert_eq!(g.queued(), 0);
        release2.send(()).unwrap();
        assert_eq!(g.submit(|| 5).wait_until(soon(2000)), Ok(5));
    }

    #[test]
    fn given_up_jobs_leave_the_queue_and_free_what_they_hold() {
        // Every thread stuck; 100 rounds of 100 jobs each hold a reference to `held`. If
        // abandoned jobs stayed queued until a thread came free, the count would grow by
        // 10,000.
        let g = BlockingPool::new(limits(2, 2));
        let (release, gate) = mpsc::channel::<()>();
        let gate = Arc::new(std::sync::Mutex::new(gate));
        let stuck: Vec<_> = (0..2)
            .map(|_| {
                let gate = Arc::clone(&gate);
                g.submit(move || {
                    let _ = gate.lock().unwrap().recv();
                })
            })
            .collect();
        thread::sleep(Duration::from_millis(30));
        let held = Arc::new(());
        for round in 0..100 {
            let jobs: Vec<_> = (0..100)
                .map(|_| {
                    let held = Arc::clone(&held);
                    move || drop(held)
                })
                .collect();
            let batch = g.submit_all(jobs);
            if round % 2 == 0 {
                let out = batch.wait_until(soon(1));
                assert!(out.iter().all(|r| matches!(r, Err(PoolError::NotStarted { .. }))));
            } else {
                drop(batch); // a caller that gives up without waiting
            }
            let ticket = {
                let held = Arc::clone(&held);
                g.submit(move || drop(held))
            };
            drop(ticket);
            assert_eq!(g.queued(), 0, "round {round}");
            assert_eq!(Arc::strong_count(&held), 1, "round {round}");
        }
        assert_eq!(g.threads(), 2, "no thread beyond the bound");
        release.send(()).unwrap();
        release.send(()).unwrap();
        drop(stuck);
    }

    #[test]
    fn the_default_pool_is_one_per_process() {
        let a = BlockingPool::default();
        let b = BlockingPool::shared();
        assert!(Arc::ptr_eq(&a.handle, &b.handle));
    }

    #[test]
    fn a_panicking_job_is_reported_and_the_pool_survives() {
        let g = BlockingPool::new(limits(1, 2));
        let err = g.submit(|| panic!("boom")).wait_until(soon(2000));
        assert_eq!(err.map(|_: ()| ()), Err(PoolError::Panicked));
        assert_eq!(g.submit(|| 1).wait_until(soon(2000)), Ok(1));
    }

    #[test]
    fn reads_files_and_times_out_on_a_fifo() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("vendor");
        std::fs::write(&file, b"0x8086\n").unwrap();
        let fifo = dir.path().join("uevent");
        nix::unistd::mkfifo(
            &fifo,
            nix::sys::stat::Mode::S_IRUSR | nix::sys::stat::Mode::S_IWUSR,
        )
        .unwrap();
        let g = BlockingPool::new(limits(1, 2));
        assert_eq!(g.read(&file, 4096, soon(2000)).unwrap().unwrap(), b"0x8086\n");
        let t0 = Instant::now();
        assert!(matches!(
            g.read(&fifo, 4096, soon(50)),
            Err(PoolError::TimedOut { .. })
        ));
        assert!(t0.elapsed() < Duration::from_millis(500));
        // Free the thread stuck in open(): a writer appears and goes.
        let _ = std::fs::OpenOptions::new().write(true).open(&fifo);
    }
}
