//! `Controller::revoke` against threads caught half-way through taking device resources.
//!
//! The bus counts the device's handles right after the driver's `remove` (which revokes):
//! any left means a thread still holds the device open, so the bus parks the release and
//! the kernel's removal waits on it. The VM soak saw it in a third of its removals: the
//! load's reader thread was still allocating its buffer and queue (each DMA map is slow
//! in a TCG guest) when the next removal came, holding a clone of the backing while it did.
//! Rule under test: once `revoke` has returned, no thread of the driver holds a handle,
//! whatever it was doing.

use std::os::fd::BorrowedFd;
use std::sync::Arc;
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use parking_lot::{Condvar, Mutex};
use pcibus::PciAddress;
use pcibus::bus::{BackingError, DeviceBacking};
use pcibus::nvme::{Controller, Options};
use pcibus::testing::nvme::{EmuConfig, EmulatedNvme};

/// Stops `alloc_dma` while armed, until opened.
#[derive(Debug, Default)]
struct Gate {
    state: Mutex<(bool, bool)>, // (armed, someone waiting)
    changed: Condvar,
}

/// The emulated controller, with a count of its own clones (`token`) apart from what its
/// DMA buffers hold, and DMA allocations that can be held at a gate.
#[derive(Debug, Clone)]
struct Gated {
    inner: EmulatedNvme,
    gate: Arc<Gate>,
    token: Arc<()>,
}

impl DeviceBacking for Gated {
    type Registers = <EmulatedNvme as DeviceBacking>::Registers;
    type Dma = <EmulatedNvme as DeviceBacking>::Dma;

    fn address(&self) -> PciAddress {
        self.inner.address()
    }
    fn map_bar(&self, index: u32) -> Result<Self::Registers, BackingError> {
        self.inner.map_bar(index)
    }
    fn alloc_dma(&self, len: usize) -> Result<Self::Dma, BackingError> {
        let mut s = self.gate.state.lock();
        if s.0 {
            s.1 = true;
            self.gate.changed.notify_all();
            while s.0 {
                self.gate.changed.wait(&mut s);
            }
        }
        drop(s);
        self.inner.alloc_dma(len)
    }
    fn read_config(&self, offset: u64, buf: &mut [u8]) -> Result<(), BackingError> {
        self.inner.read_config(offset, buf)
    }
    fn write_config(&self, offset: u64, buf: &[u8]) -> Result<(), BackingError> {
        self.inner.write_config(offset, buf)
    }
    fn max_interrupts(&self) -> u32 {
        self.inner.max_interrupts()
    }
    fn route_interrupts(&self, fds: &[BorrowedFd<'_>]) -> Result<(), BackingError> {
        self.inner.route_interrupts(fds)
    }
    fn reset(&self) -> Result<(), BackingError> {
        self.inner.reset()
    }
    fn extra_handles(&self) -> usize {
        Arc::strong_count(&self.token).saturating_sub(1)
    }
}

impl Gated {
    fn arm(&self) {
        *self.gate.state.lock() = (true, false);
    }
    fn wait_for_a_waiter(&self) {
        let mut s = self.gate.state.lock();
        while !s.1 {
            self.gate.changed.wait(&mut s);
        }
    }
    fn open(&self) {
        self.gate.state.lock().0 = false;
        self.gate.changed.notify_all();
    }
}

fn setup() -> (Gated, Controller<Gated>) {
    let backing = Gated {
        inner: EmulatedNvme::new(EmuConfig::default()).unwrap(),
        gate: Arc::default(),
        token: Arc::new(()),
    };
    let options = Options {
        admin_timeout: Duration::from_secs(30),
        ..Options::default()
    };
    let c = Controller::init(backing.clone(), &options).unwrap();
    (backing, c)
}

// Starts `revoke` on a thread; when it has not returned after `grace`, opens the gate (the
// allocation it waits for may finish) and waits for it. Either way, checks the handles the
// moment revoke has returned, before the gate is opened when it returned on its own.
fn revoke_and_count(backing: &Gated, c: &Controller<Gated>) -> usize {
    let (tx, rx) = mpsc::channel();
    let (b, c) = (backing.clone(), c.clone());
    let revoker = thread::spawn(move || {
        c.revoke("test removal");
        drop(c);
        // The count as revoke leaves it (this thread's `b` is the test's own handle).
        tx.send(b.extra_handles().saturating_sub(1)).unwrap();
    });
    let extra = match rx.recv_timeout(Duration::from_millis(500)) {
        Ok(n) => n,
        Err(_) => {
            backing.open();
            rx.recv().unwrap()
        }
    };
    backing.open();
    revoker.join().unwrap();
    extra
}

#[test]
fn revoke_leaves_no_handle_with_a_thread_allocating_a_buffer() {
    let (backing, c) = setup();
    let base = backing.extra_handles();
    backing.arm();
    let user = {
        let c = c.clone();
        thread::spawn(move || c.alloc_buffer(4096).map(drop))
    };
    backing.wait_for_a_waiter();
    let extra = revoke_and_count(&backing, &c);
    let _ = user.join().unwrap();
    drop(c);
    assert_eq!(
        extra,
        base - 1,
        "after revoke returned, a thread allocating a buffer still held the device ({extra} handles besides the test's)"
    );
    assert_eq!(backing.extra_handles(), 0, "every handle let go at the end");
}

#[test]
fn revoke_leaves_no_handle_with_a_thread_creating_a_queue() {
    let (backing, c) = setup();
    let base = backing.extra_handles();
    backing.arm();
    let user = {
        let c = c.clone();
        thread::spawn(move || c.io_queue(8).map(drop))
    };
    backing.wait_for_a_waiter();
    let extra = revoke_and_count(&backing, &c);
    let made = user.join().unwrap();
    assert!(made.is_err(), "a queue created across a revoke must fail");
    drop(c);
    assert_eq!(
        extra,
        base - 1,
        "after revoke returned, a thread creating a queue still held the device ({extra} handles besides the test's)"
    );
    assert_eq!(backing.extra_handles(), 0, "every handle let go at the end");
}
