//! Device errors (AER) through the bus: the bus watches the error notification of every
//! device it holds that has one, tells the driver ([`Driver::error_detected`]) when it
//! fires, reports [`BusEvent::Error`], and takes the device back if the driver asks.
//! In-memory devices (`testing::backing`) on QEMU's q35 tree with an SR-IOV NVMe.

use std::sync::Arc;

use parking_lot::Mutex;
use pcibus::bus::id::{CLASS_EXACT, IdEntry};
use pcibus::bus::interrupt::InterruptKind;
use pcibus::bus::map::DeviceMap;
use pcibus::bus::{
    Bus, BusEvent, Driver, ErrorAction, ErrorEvent, ProbeDevice, ProbeOutcome, Removal, RemovalCause,
};
use pcibus::testing::FakeSysfs;
use pcibus::testing::backing::{FakeAttach, FakeBacking};
use pcibus::{PciAddress, Scanner, SysfsRoot};

mod common;
use common::{addr, qemu};

const PF: &str = "0000:01:00.0";

#[derive(Default)]
struct Seen {
    errors: Vec<(PciAddress, u64)>,
    removed: Vec<Removal>,
}

struct Nvme {
    table: [IdEntry; 1],
    answer: ErrorAction,
    seen: Arc<Mutex<Seen>>,
}

impl Driver<FakeBacking> for Nvme {
    // The device's address, to check that the bus hands the right state to each callback.
    type Device = PciAddress;
    fn name(&self) -> &str {
        "nvme"
    }
    fn id_table(&self) -> &[IdEntry] {
        &self.table
    }
    fn probe(&mut self, device: ProbeDevice<'_, FakeBacking>) -> ProbeOutcome<PciAddress> {
        ProbeOutcome::Bound(device.record.address)
    }
    fn remove(&mut self, address: PciAddress, removal: &Removal) {
        assert_eq!(address, removal.address);
        self.seen.lock().removed.push(removal.clone());
    }
    fn error_detected(&mut self, address: &mut PciAddress, event: &ErrorEvent) -> ErrorAction {
        assert_eq!(*address, event.address);
        self.seen.lock().errors.push((*address, event.count));
        self.answer
    }
}

fn bus(answer: ErrorAction) -> (FakeSysfs, FakeAttach, Bus<FakeAttach>, Arc<Mutex<Seen>>) {
    let fake = qemu();
    let map = DeviceMap::new(Scanner::new(SysfsRoot::new(fake.root())).no_claims()).unwrap();
    let attach = FakeAttach::new();
    let mut bus = Bus::new(map, attach.clone())
        .selection(pcibus::bus::devargs::Selection::from_args([("-a", PF)]).unwrap());
    let seen = Arc::new(Mutex::new(Seen::default()));
    bus.register(Box::new(Nvme {
        table: [IdEntry::class(0x01_08_02, CLASS_EXACT)],
        answer,
        seen: Arc::clone(&seen),
    }));
    let reports = bus.probe_all();
    assert!(
        reports.iter().any(|r| r.address == addr(PF) && r.result.is_ok()),
        "{reports:?}"
    );
    (fake, attach, bus, seen)
}

#[test]
fn an_error_is_told_to_the_driver_which_keeps_the_device_by_default() {
    let (_fake, attach, mut bus, seen) = bus(ErrorAction::Keep);
    let fds_before = bus.fds().len();
    let device = attach.device(addr(PF)).unwrap();
    assert!(
        device.raise_error(),
        "the bus routed the device's error notification"
    );
    assert!(device.raise_error());
    drop(device);
    let events = bus.poll();
    let [BusEvent::Error(report)] = events.as_slice() else {
        panic!("{events:?}");
    };
    assert_eq!(report.event.address, addr(PF));
    assert_eq!(report.event.count, 2, "two notifications before the poll");
    assert_eq!(report.action, ErrorAction::Keep);
    assert_eq!(report.driver, "nvme");
    assert_eq!(seen.lock().errors, vec![(addr(PF), 2)]);
    assert!(seen.lock().removed.is_empty());
    assert_eq!(bus.held().len(), 1, "kept");
    assert_eq!(bus.fds().len(), fds_before);
    assert!(bus.poll().is_empty(), "told once");
}

#[test]
fn the_error_eventfd_wakes_an_event_loop() {
    let (_fake, attach, mut bus, _seen) = bus(ErrorAction::Keep);
    let device = attach.device(addr(PF)).unwrap();
    let fd = bus.event_fd().unwrap().try_clone_to_owned().unwrap();
    let mut fds = [nix::poll::PollFd::new(
        std::os::fd::AsFd::as_fd(&fd),
        nix::poll::PollFlags::POLLIN,
    )];
    assert_eq!(
        nix::poll::poll(&mut fds, nix::poll::PollTimeout::ZERO).unwrap(),
        0
    );
    device.raise_error();
    let mut fds = [nix::poll::PollFd::new(
        std::os::fd::AsFd::as_fd(&fd),
        nix::poll::PollFlags::POLLIN,
    )];
    assert_eq!(
        nix::poll::poll(&mut fds, nix::poll::PollTimeout::ZERO).unwrap(),
        1
    );
    drop(device);
    assert!(matches!(bus.poll().as_slice(), [BusEvent::Error(_)]));
}

#[test]
fn a_driver_that_gives_the_device_up_has_it_removed() {
    let (_fake, attach, mut bus, seen) = bus(ErrorAction::Remove);
    let device = attach.device(addr(PF)).unwrap();
    device.raise_error();
    drop(device);
    let events = bus.poll();
    let [BusEvent::Error(e), BusEvent::Removed(r)] = events.as_slice() else {
        panic!("{events:?}");
    };
    assert_eq!(e.action, ErrorAction::Remove);
    assert_eq!(r.cause, RemovalCause::Error);
    assert_eq!(r.leaked, 0);
    let removed: Vec<_> = seen
        .lock()
        .removed
        .iter()
        .map(|r| (r.address, r.cause.clone()))
        .collect();
    assert_eq!(removed, vec![(addr(PF), RemovalCause::Error)]);
    assert!(bus.held().is_empty());
    assert!(
        bus.fds().is_empty(),
        "no error eventfd of a device the bus let go"
    );
    assert!(
        attach
            .calls()
            .contains(&pcibus::testing::backing::AttachCall::Detach(
                addr(PF),
                pcibus::bus::attach::Release::Orderly,
                0
            )),
        "released as by a detach: {:?}",
        attach.calls()
    );
}

// A device without an error notification (conventional PCI) is held all the same.
#[test]
fn a_device_without_error_notification_is_not_watched() {
    let fake = qemu();
    let map = DeviceMap::new(Scanner::new(SysfsRoot::new(fake.root())).no_claims()).unwrap();
    let attach = FakeAttach::new();
    let mut bus = Bus::new(map, attach.clone())
        .selection(pcibus::bus::devargs::Selection::from_args([("-a", PF)]).unwrap());
    let seen = Arc::new(Mutex::new(Seen::default()));
    struct NoErr(Nvme);
    impl Driver<FakeBacking> for NoErr {
        type Device = ();
        fn name(&self) -> &str {
            "noerr"
        }
        fn id_table(&self) -> &[IdEntry] {
            &self.0.table
        }
        fn probe(&mut self, device: ProbeDevice<'_, FakeBacking>) -> ProbeOutcome {
            // Before the bus looks (after a bind): the device has no ERR index.
            device.backing.set_interrupt_count(InterruptKind::Error, 0);
            ProbeOutcome::Bound(())
        }
        fn remove(&mut self, _device: (), _removal: &Removal) {}
    }
    bus.register(Box::new(NoErr(Nvme {
        table: [IdEntry::class(0x01_08_02, CLASS_EXACT)],
        answer: ErrorAction::Keep,
        seen,
    })));
    bus.probe_all();
    assert_eq!(bus.held().len(), 1);
    let device = attach.device(addr(PF)).unwrap();
    assert!(!device.raise_error(), "nothing routed");
}
