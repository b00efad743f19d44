//! `Controller::revoke` against threads caught half-way through taking device resources.
//!
//! The bus counts the device's handles right after the driver's `remove` (which revokes):
//! any left means a thread still holds the device open, so the bus parks the release and
//! the kernel's removal waits on it. The VM soak saw it in a third of its removals: the
//! load's reader thread was still allocating its buffer and queue (each DMA map is slow
//! in a TCG guest) when the next removal came, holding a clone of the backing while it did.
//! Rule under test: once `revoke` has returned, no thread of the driver holds a handle,
//! whatever it was doing: allocating, creating a queue, or dropping one (the mapping of a
//! queue being dropped is no longer reachable from the controller, yet still alive until
//! its unmap finishes: the soak caught that too).

use std::os::fd::BorrowedFd;
use std::sync::Arc;
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use parking_lot::{Condvar, Mutex};
use pcibus::PciAddress;
use pcibus::bus::{BackingError, DeviceBacking, RegisterIo};
use pcibus::nvme::{Controller, Options};
use pcibus::testing::nvme::{EmuConfig, EmulatedNvme};

/// Stops `alloc_dma` while armed, until opened.
#[derive(Debug, Default)]
struct Gate {
    state: Mutex<(bool, bool, bool)>, // (armed, someone waiting, opened)
    changed: Condvar,
}

impl Gate {
    // The first to pass an armed gate waits there, saying so, until it is opened; the
    // rest go through.
    fn pass(&self) {
        let mut s = self.state.lock();
        if s.0 {
            s.0 = false;
            s.1 = true;
            self.changed.notify_all();
            while !s.2 {
                self.changed.wait(&mut s);
            }
        }
    }
}

/// The emulated controller, with a count of its own handles (`token`: clones and BAR
/// mappings) apart from what its DMA buffers hold; DMA allocations (`gate`) and the
/// unmapping of BARs (`unmap`) can be held at a gate.
#[derive(Debug, Clone)]
struct Gated {
    inner: EmulatedNvme,
    gate: Arc<Gate>,
    unmap: Arc<Gate>,
    token: Arc<()>,
}

/// A BAR mapping of a [`Gated`] device: a handle of it until dropped, and its drop (the
/// unmap) waits at the device's `unmap` gate.
#[derive(Debug)]
struct GatedRegs {
    inner: <EmulatedNvme as DeviceBacking>::Registers,
    unmap: Arc<Gate>,
    _token: Arc<()>,
}

impl Drop for GatedRegs {
    fn drop(&mut self) {
        self.unmap.pass();
    }
}

impl RegisterIo for GatedRegs {
    fn len(&self) -> u64 {
        self.inner.len()
    }
    fn read32(&self, offset: u64) -> Result<u32, BackingError> {
        self.inner.read32(offset)
    }
    fn write32(&self, offset: u64, value: u32) -> Result<(), BackingError> {
        self.inner.write32(offset, value)
    }
    fn read64(&self, offset: u64) -> Result<u64, BackingError> {
        self.inner.read64(offset)
    }
    fn write64(&self, offset: u64, value: u64) -> Result<(), BackingError> {
        self.inner.write64(offset, value)
    }
    fn read8(&self, offset: u64) -> Result<u8, BackingError> {
        self.inner.read8(offset)
    }
    fn write8(&self, offset: u64, value: u8) -> Result<(), BackingError> {
        self.inner.write8(offset, value)
    }
    fn read16(&self, offset: u64) -> Result<u16, BackingError> {
        self.inner.read16(offset)
    }
    fn write16(&self, offset: u64, value: u16) -> Result<(), BackingError> {
        self.inner.write16(offset, value)
    }
}

impl DeviceBacking for Gated {
    type Registers = GatedRegs;
    type Dma = <EmulatedNvme as DeviceBacking>::Dma;

    fn address(&self) -> PciAddress {
        self.inner.address()
    }
    fn map_bar(&self, index: u32) -> Result<Self::Registers, BackingError> {
        Ok(GatedRegs {
            inner: self.inner.map_bar(index)?,
            unmap: Arc::clone(&self.unmap),
            _token: Arc::clone(&self.token),
        })
    }
    fn alloc_dma(&self, len: usize) -> Result<Self::Dma, BackingError> {
        self.gate.pass();
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

impl Gate {
    fn arm(&self) {
        *self.state.lock() = (true, false, false);
    }
    fn wait_for_a_waiter(&self) {
        let mut s = self.state.lock();
        while !s.1 {
            self.changed.wait(&mut s);
        }
    }
    fn open(&self) {
        self.state.lock().2 = true;
        self.changed.notify_all();
    }
}

impl Gated {
    fn arm(&self) {
        self.gate.arm();
    }
    fn wait_for_a_waiter(&self) {
        self.gate.wait_for_a_waiter();
    }
    fn open(&self) {
        self.gate.open();
        self.unmap.open();
    }
}

fn setup() -> (Gated, Controller<Gated>) {
    let backing = Gated {
        inner: EmulatedNvme::new(EmuConfig::default()).unwrap(),
        gate: Arc::default(),
        unmap: Arc::default(),
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
        extra, 0,
        "after revoke returned, a thread allocating a buffer still held the device ({extra} handles besides the test's)"
    );
    assert_eq!(backing.extra_handles(), 0, "every handle let go at the end");
}

#[test]
fn revoke_leaves_no_handle_with_a_thread_creating_a_queue() {
    let (backing, c) = setup();
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
        extra, 0,
        "after revoke returned, a thread creating a queue still held the device ({extra} handles besides the test's)"
    );
    assert_eq!(backing.extra_handles(), 0, "every handle let go at the end");
}

#[test]
fn revoke_leaves_no_handle_with_a_thread_dropping_a_queue() {
    let (backing, c) = setup();
    let q = c.io_queue(8).unwrap();
    backing.unmap.arm();
    // Dropping the queue deletes it on the controller, then unmaps its BAR mapping, which
    // waits at the gate.
    let user = thread::spawn(move || drop(q));
    backing.unmap.wait_for_a_waiter();
    let extra = revoke_and_count(&backing, &c);
    user.join().unwrap();
    drop(c);
    assert_eq!(
        extra, 0,
        "after revoke returned, a thread dropping its queue still held the device ({extra} handles besides the test's)"
    );
    assert_eq!(backing.extra_handles(), 0, "every handle let go at the end");
}

#[test]
fn revoke_leaves_no_handle_with_a_queue_whose_creation_failed() {
    use pcibus::nvme::spec::{Status, admin};
    use pcibus::testing::nvme::{CommandMatch, Fault};
    let (backing, c) = setup();
    backing.inner.inject(Fault::Status {
        command: CommandMatch::Admin(admin::CREATE_CQ),
        status: Status::INVALID_QUEUE_ID,
        count: 1,
    });
    backing.unmap.arm();
    // The controller refuses the queue; the thread drops the queue's BAR mapping, whose
    // unmap waits at the gate.
    let user = {
        let c = c.clone();
        thread::spawn(move || c.io_queue(8).map(drop))
    };
    backing.unmap.wait_for_a_waiter();
    let extra = revoke_and_count(&backing, &c);
    assert!(user.join().unwrap().is_err(), "the controller refused the queue");
    drop(c);
    assert_eq!(
        extra, 0,
        "after revoke returned, a thread whose queue creation failed still held the device ({extra} handles besides the test's)"
    );
    assert_eq!(backing.extra_handles(), 0, "every handle let go at the end");
}
