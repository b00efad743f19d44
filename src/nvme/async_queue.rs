//! Futures over an I/O queue (feature `async`), for programs on an async runtime (tokio,
//! smol, async-std, or none): `queue.read(...).await`. No runtime is a dependency; the
//! adapter is built on [`IoQueue`]'s public submit / poll with tags.
//!
//! # How the futures complete
//!
//! An [`AsyncQueue`] owns an [`IoQueue`] and lends it to the futures it makes. Polling a
//! future submits its request (if the queue has room; otherwise it waits for a slot) and
//! polls the queue once, handing every completion found to the future it belongs to and
//! waking that future's task. Nothing else polls the controller, so a future whose request
//! is outstanding must be polled again:
//!
//! - By default ([`AsyncQueue::new`]) it wakes its own task each time it is pending, so
//!   the executor keeps polling it — the queue is polled like an SPDK poller, on the
//!   executor's thread, between the other tasks. Lowest latency; the thread never sleeps
//!   while I/O is outstanding.
//! - With [`AsyncQueue::with_self_wake`]`(false)` a pending future only registers its
//!   waker; the application polls the queue with
//!   [`process_completions`](AsyncQueue::process_completions) — for example from a task
//!   that awaits the queue's [`interrupt_fd`](AsyncQueue::interrupt_fd) becoming
//!   readable through its runtime's fd readiness (tokio's `AsyncFd`), when the controller
//!   was brought up with interrupts — which wakes the tasks whose requests completed.
//!
//! Timeouts are the queue's: a request past [`Options::io_timeout`] completes with
//! [`NvmeError::Timeout`] at the next poll.
//!
//! # Threads
//!
//! The futures are `Send` (when the backing's DMA memory is `Sync`, as VFIO's and the
//! emulator's are), so a multi-threaded runtime may move a task awaiting one between its
//! worker threads, and the [`AsyncQueue`] is `Sync`, shared by reference or `Arc` among
//! tasks on any thread. The queue's state is behind a lock (uncontended when one thread
//! polls: a few nanoseconds more than a `RefCell`, and no runtime dependency); tasks on
//! several threads polling one queue take turns at it. For I/O that scales with threads,
//! give each thread its own queue.
//!
//! # Dropping
//!
//! A future dropped before its request completed abandons it: the request runs to its end
//! on the controller, the queue keeps the buffer until then (as for every request, see
//! [`Buffer`]), and its result is discarded. Dropping the [`AsyncQueue`] drops the queue
//! (see [`IoQueue`]'s "Dropping").
//!
//! [`Options::io_timeout`]: super::Options::io_timeout

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, Waker};

use parking_lot::Mutex;

use super::NvmeError;
use super::io::{Buffer, IoQueue, IoRequest};
use crate::bus::backing::DeviceBacking;

/// An [`IoQueue`] whose requests are futures. `Send` and `Sync`: its futures may be
/// awaited on any thread (see [Threads](self#threads)). See the [module docs](self).
pub struct AsyncQueue<B: DeviceBacking> {
    // Locked before `state` when both are held.
    queue: Mutex<IoQueue<B>>,
    state: Mutex<State>,
    next_tag: AtomicU64,
    self_wake: bool,
}

#[derive(Default)]
struct State {
    // Results that arrived, by tag, and the wakers of the futures waiting for them.
    results: HashMap<u64, Result<(), NvmeError>>,
    wakers: HashMap<u64, Waker>,
    // Futures waiting for room on the queue.
    waiting: Vec<Waker>,
    // Tags of futures dropped before their request completed.
    abandoned: HashSet<u64>,
}

impl<B: DeviceBacking> std::fmt::Debug for AsyncQueue<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AsyncQueue")
            .field("queue", &self.queue)
            .field("self_wake", &self.self_wake)
            .finish_non_exhaustive()
    }
}

impl<B: DeviceBacking> AsyncQueue<B> {
    /// Futures over `queue`, which must have nothing outstanding (its tags become the
    /// adapter's), waking themselves while pending.
    pub fn new(queue: IoQueue<B>) -> Self {
        AsyncQueue {
            queue: Mutex::new(queue),
            state: Mutex::default(),
            next_tag: AtomicU64::new(0),
            self_wake: true,
        }
    }

    /// Whether a pending future wakes its own task (the default); with `false` the
    /// application calls [`process_completions`](Self::process_completions).
    pub fn with_self_wake(mut self, on: bool) -> Self {
        self.self_wake = on;
        self
    }

    /// Reads `blocks` blocks at `lba` of namespace `nsid` into `buffer` at `offset`.
    pub fn read<'a>(
        &'a self,
        nsid: u32,
        lba: u64,
        blocks: u64,
        buffer: &'a Buffer<B>,
        offset: usize,
    ) -> IoFuture<'a, B> {
        self.submit(IoRequest::read(nsid, lba, blocks, buffer, offset))
    }

    /// Writes `blocks` blocks at `lba` of namespace `nsid` from `buffer` at `offset`.
    pub fn write<'a>(
        &'a self,
        nsid: u32,
        lba: u64,
        blocks: u64,
        buffer: &'a Buffer<B>,
        offset: usize,
    ) -> IoFuture<'a, B> {
        self.submit(IoRequest::write(nsid, lba, blocks, buffer, offset))
    }

    /// Flushes namespace `nsid`.
    pub fn flush(&self, nsid: u32) -> IoFuture<'_, B> {
        self.submit(IoRequest::flush(nsid))
    }

    /// Any request. Nothing is sent until the future is polled.
    pub fn submit<'a>(&'a self, request: IoRequest<'a, B>) -> IoFuture<'a, B> {
        let tag = self.next_tag.fetch_add(1, Ordering::Relaxed);
        IoFuture {
            queue: self,
            request: Some(request),
            tag,
            done: false,
        }
    }

    /// Polls the queue once: hands the completions found to their futures and wakes their
    /// tasks (and those waiting for room on the queue). Returns how many requests
    /// completed. For [`with_self_wake`](Self::with_self_wake)`(false)`.
    pub fn process_completions(&self) -> Result<usize, NvmeError> {
        let mut woken = Vec::new();
        let n = {
            let mut q = self.queue.lock();
            let mut state = self.state.lock();
            let st = &mut *state;
            let n = q.poll(|tag, r| {
                if st.abandoned.remove(&tag) {
                    return;
                }
                st.results.insert(tag, r);
                woken.extend(st.wakers.remove(&tag));
            })?;
            if n > 0 {
                woken.append(&mut st.waiting);
            }
            n
        };
        // Woken with no lock held: a waker may poll a future of this queue at once.
        for w in woken {
            w.wake();
        }
        Ok(n)
    }

    /// The eventfd the queue's completions signal, when the controller was brought up
    /// with interrupts: to wait for readability with the runtime's reactor, then call
    /// [`process_completions`](Self::process_completions). Valid while the queue lives.
    pub fn interrupt_fd(&self) -> Option<RawFd> {
        self.queue.lock().interrupt_fd().map(|fd| fd.as_raw_fd())
    }

    /// Requests submitted and not yet completed (abandoned ones included).
    pub fn outstanding(&self) -> usize {
        self.queue.lock().outstanding()
    }

    /// The queue back (the adapter's futures are gone: they borrow it). Requests of
    /// abandoned futures may still be outstanding; their results would come back with
    /// the adapter's tags.
    pub fn into_inner(self) -> IoQueue<B> {
        self.queue.into_inner()
    }
}

/// A request of an [`AsyncQueue`]: resolves to its result. See the [module docs](self).
#[must_use = "nothing is sent until the future is polled"]
pub struct IoFuture<'a, B: DeviceBacking> {
    queue: &'a AsyncQueue<B>,
    // Until submitted.
    request: Option<IoRequest<'a, B>>,
    tag: u64,
    done: bool,
}

impl<B: DeviceBacking> std::fmt::Debug for IoFuture<'_, B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoFuture")
            .field("tag", &self.tag)
            .field("submitted", &self.request.is_none())
            .field("done", &self.done)
            .finish()
    }
}

impl<B: DeviceBacking> Future for IoFuture<'_, B> {
    type Output = Result<(), NvmeError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        let aq = this.queue;
        if this.done {
            return Poll::Ready(Err(NvmeError::Invalid(
                "request future polled after it completed".into(),
            )));
        }
        if let Some(request) = this.request {
            let submitted = {
                let mut q = aq.queue.lock();
                match q.submit(&request, this.tag) {
                    Ok(()) => true,
                    // No room while requests are outstanding: wait for one to complete. An
                    // invalid request fails the same way once the queue is idle.
                    Err(NvmeError::Invalid(_)) if q.outstanding() > 0 => false,
                    Err(e) => {
                        this.done = true;
                        return Poll::Ready(Err(e));
                    }
                }
            };
            if submitted {
                this.request = None;
            } else {
                aq.state.lock().waiting.push(cx.waker().clone());
            }
        }
        if let Err(e) = aq.process_completions() {
            // The queue is dead: every request ended with this; ours, if submitted, is in
            // the results.
            if this.request.is_some() || !aq.state.lock().results.contains_key(&this.tag) {
                this.done = true;
                return Poll::Ready(Err(e));
            }
        }
        if this.request.is_none() {
            let mut state = aq.state.lock();
            if let Some(r) = state.results.remove(&this.tag) {
                this.done = true;
                return Poll::Ready(r);
            }
            // Under the same lock as the check: a completion handed over meanwhile by
            // another thread's poll finds this waker.
            state.wakers.insert(this.tag, cx.waker().clone());
        }
        if aq.self_wake {
            cx.waker().wake_by_ref();
        }
        Poll::Pending
    }
}

impl<B: DeviceBacking> Drop for IoFuture<'_, B> {
    fn drop(&mut self) {
        if self.done || self.request.is_some() {
            return;
        }
        // Submitted, not completed: its result is discarded when it comes.
        let mut state = self.queue.state.lock();
        state.wakers.remove(&self.tag);
        if state.results.remove(&self.tag).is_none() {
            state.abandoned.insert(self.tag);
        }
    }
}
