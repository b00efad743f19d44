//! Futures over an NVMe I/O queue (feature `async`), driven by a minimal executor written
//! here (no runtime crate): the same queues as the blocking API, against the emulator.
#![cfg(feature = "async")]

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use pcibus::nvme::async_queue::AsyncQueue;
use pcibus::nvme::spec::{Status, io};
use pcibus::nvme::{Controller, NvmeError, Options};
use pcibus::testing::nvme::{CommandMatch, EmuConfig, EmulatedNvme, Fault, NamespaceConfig};

// Wakes by unparking the executor's thread, and counts wakes.
struct Unpark(std::thread::Thread, AtomicUsize);

impl Wake for Unpark {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.1.fetch_add(1, Ordering::SeqCst);
        self.0.unpark();
    }
}

// Runs `f` to completion on this thread, parking while it is pending; `on_idle` runs
// before each park (the application's own poller, for queues that do not wake
// themselves).
fn block_on<F: Future>(f: F, mut on_idle: impl FnMut()) -> F::Output {
    let mut f = std::pin::pin!(f);
    let waker = Arc::new(Unpark(std::thread::current(), AtomicUsize::new(0)));
    let w = Waker::from(Arc::clone(&waker));
    let mut cx = Context::from_waker(&w);
    loop {
        if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
        on_idle();
        std::thread::park_timeout(Duration::from_millis(10));
    }
}

// Every future of `futures` to completion, polled in turn (a join for the executor).
struct JoinAll<'a, T>(Vec<Option<Pin<Box<dyn Future<Output = T> + 'a>>>>, Vec<Option<T>>);

fn join_all<'a, T>(futures: Vec<Pin<Box<dyn Future<Output = T> + 'a>>>) -> JoinAll<'a, T> {
    let n = futures.len();
    JoinAll(
        futures.into_iter().map(Some).collect(),
        (0..n).map(|_| None).collect(),
    )
}

impl<T: Unpin> Future for JoinAll<'_, T> {
    type Output = Vec<T>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Vec<T>> {
        let this = Pin::into_inner(self);
        for (slot, out) in this.0.iter_mut().zip(this.1.iter_mut()) {
            if let Some(f) = slot
                && let Poll::Ready(v) = f.as_mut().poll(cx)
            {
                *out = Some(v);
                *slot = None;
            }
        }
        if this.0.iter().all(Option::is_none) {
            Poll::Ready(
                this.1
                    .iter_mut()
                    .map(|o| o.take().expect("every future done"))
                    .collect(),
            )
        } else {
            Poll::Pending
        }
    }
}

// A request future, boxed to be joined with others.
type Request<'a> = Pin<Box<dyn Future<Output = Result<(), NvmeError>> + 'a>>;

fn setup() -> (EmulatedNvme, Controller<EmulatedNvme>) {
    let e = EmulatedNvme::new(EmuConfig {
        namespaces: vec![NamespaceConfig::new(8192, 512)],
        ..EmuConfig::default()
    })
    .unwrap();
    let options = Options {
        admin_timeout: Duration::from_secs(30),
        io_timeout: Duration::from_secs(30),
        ..Options::default()
    };
    let c = Controller::init(e.clone(), &options).unwrap();
    (e, c)
}

#[test]
fn a_write_then_a_read_awaited() {
    let (e, c) = setup();
    let q = AsyncQueue::new(c.io_queue(8).unwrap());
    let data: Vec<u8> = (0..8192).map(|i| (i * 7) as u8).collect();
    let out = c.alloc_buffer(8192).unwrap();
    out.write_at(0, &data).unwrap();
    let back = c.alloc_buffer(8192).unwrap();
    block_on(
        async {
            q.write(1, 40, 16, &out, 0).await?;
            q.flush(1).await?;
            q.read(1, 40, 16, &back, 0).await
        },
        || {},
    )
    .unwrap();
    let mut got = vec![0u8; 8192];
    back.read_at(0, &mut got).unwrap();
    assert_eq!(got, data);
    assert_eq!(q.outstanding(), 0);
    assert_eq!(e.stats().bad_dma, 0);
}

#[test]
fn more_requests_than_the_queue_holds_all_complete() {
    let (e, c) = setup();
    let q = AsyncQueue::new(c.io_queue(4).unwrap());
    let buf = c.alloc_buffer(64 * 4096).unwrap();
    for i in 0..64u64 {
        e.namespace_write(1, i * 4096, &[i as u8; 4096]).unwrap();
    }
    let reads: Vec<Request<'_>> = (0..64u64)
        .map(|i| Box::pin(q.read(1, i * 8, 8, &buf, i as usize * 4096)) as Pin<Box<dyn Future<Output = _>>>)
        .collect();
    let results = block_on(join_all(reads), || {});
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    let mut got = vec![0u8; 64 * 4096];
    buf.read_at(0, &mut got).unwrap();
    for (i, chunk) in got.chunks(4096).enumerate() {
        assert!(chunk.iter().all(|&b| b == i as u8), "block group {i}");
    }
    assert_eq!(e.stats().io(io::READ), 64);
}

#[test]
fn a_failed_request_resolves_to_its_error_and_the_others_succeed() {
    let (e, c) = setup();
    let q = AsyncQueue::new(c.io_queue(8).unwrap());
    let buf = c.alloc_buffer(3 * 4096).unwrap();
    e.inject(Fault::Status {
        command: CommandMatch::Io(io::READ),
        status: Status::DATA_TRANSFER_ERROR,
        count: 1,
    });
    let reads: Vec<Request<'_>> = vec![
        Box::pin(q.read(1, 0, 8, &buf, 0)),
        Box::pin(q.read(1, 8, 8, &buf, 4096)),
        Box::pin(q.read(1, 16, 8, &buf, 8192)),
    ];
    let results = block_on(join_all(reads), || {});
    let failed: Vec<_> = results.iter().filter(|r| r.is_err()).collect();
    assert_eq!(failed.len(), 1, "{results:?}");
    assert!(
        matches!(failed[0], Err(NvmeError::Command { status, .. }) if *status == Status::DATA_TRANSFER_ERROR),
        "{failed:?}"
    );
    // An invalid request fails at once.
    let r = block_on(q.read(1, 8190, 8, &buf, 0), || {});
    assert!(matches!(r, Err(NvmeError::Invalid(_))), "{r:?}");
}

#[test]
fn a_dropped_future_abandons_its_request_without_disturbing_others() {
    let (e, c) = setup();
    let q = AsyncQueue::new(c.io_queue(8).unwrap());
    let buf = c.alloc_buffer(2 * 4096).unwrap();
    e.inject(Fault::Stall {
        command: CommandMatch::Io(io::READ),
        count: 1,
    });
    {
        // Polled once (submitted), then dropped while the controller holds it.
        let mut f = Box::pin(q.read(1, 0, 8, &buf, 0));
        let waker = Waker::noop();
        assert!(f.as_mut().poll(&mut Context::from_waker(waker)).is_pending());
    }
    assert_eq!(q.outstanding(), 1);
    block_on(q.read(1, 8, 8, &buf, 4096), || {}).unwrap();
    e.release_stalled();
    // The abandoned request ends; its result goes nowhere.
    block_on(
        std::future::poll_fn(|cx| {
            q.process_completions().unwrap();
            if q.outstanding() == 0 {
                Poll::Ready(())
            } else {
                cx.waker().wake_by_ref();
                Poll::Pending
            }
        }),
        || {},
    );
    block_on(q.flush(1), || {}).unwrap();
    assert_eq!(e.stats().bad_dma, 0);
}

#[test]
fn without_self_wake_the_application_polls_and_the_tasks_are_woken() {
    let (e, c) = setup();
    let q = AsyncQueue::new(c.io_queue(8).unwrap()).with_self_wake(false);
    let buf = c.alloc_buffer(4096).unwrap();
    // Held by the controller until the future was polled once.
    e.inject(Fault::Stall {
        command: CommandMatch::Io(io::READ),
        count: 1,
    });
    let counter = Arc::new(Unpark(std::thread::current(), AtomicUsize::new(0)));
    let waker = Waker::from(Arc::clone(&counter));
    let mut cx = Context::from_waker(&waker);
    let mut f = Box::pin(q.read(1, 0, 8, &buf, 0));
    assert!(f.as_mut().poll(&mut cx).is_pending());
    // Pending without waking itself: only the application's poll wakes it.
    assert_eq!(counter.1.load(Ordering::SeqCst), 0);
    // Released once the controller holds it (a release before the fetch releases nothing).
    let start = std::time::Instant::now();
    while e.stats().io(io::READ) == 0 {
        assert!(start.elapsed() < Duration::from_secs(30), "never fetched");
        std::thread::sleep(Duration::from_millis(1));
    }
    e.release_stalled();
    let start = std::time::Instant::now();
    while counter.1.load(Ordering::SeqCst) == 0 {
        q.process_completions().unwrap();
        assert!(start.elapsed() < Duration::from_secs(30), "never woken");
    }
    assert!(matches!(f.as_mut().poll(&mut cx), Poll::Ready(Ok(()))));
    assert!(
        q.interrupt_fd().is_none(),
        "the controller was brought up without interrupts"
    );
}

#[test]
fn futures_are_send_and_complete_on_another_thread() {
    // A multi-threaded runtime (tokio's default) requires `Send` futures: an `IoFuture` of
    // an `AsyncQueue` shared by reference (an `Arc` here) is awaited on another thread.
    fn send<T: Send>(_: &T) {}
    let (e, c) = setup();
    let q = Arc::new(AsyncQueue::new(c.io_queue(4).unwrap()));
    let buf = Arc::new(c.alloc_buffer(4096).unwrap());
    buf.write_at(0, &[0x5a; 512]).unwrap();
    let f = q.write(1, 3, 1, &buf, 0);
    send(&f);
    send(&*q);
    drop(f);
    let (q2, buf2) = (Arc::clone(&q), Arc::clone(&buf));
    std::thread::spawn(move || block_on(q2.write(1, 3, 1, &buf2, 0), || {}))
        .join()
        .unwrap()
        .unwrap();
    assert_eq!(e.namespace_read(1, 3 * 512, 512).unwrap(), vec![0x5a; 512]);
    assert_eq!(q.outstanding(), 0);
}
