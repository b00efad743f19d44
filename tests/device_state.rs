//! Per-device state (issue 16 §4): what a driver's probe returns in
//! [`ProbeOutcome::Bound`] is kept by the bus for that device and that incarnation of it,
//! reached by the application through [`Bus::device_state`] (typed, no downcast), and
//! handed back by value to [`Driver::remove`].
//!
//! And the framework's revocation of a device whose driver kept handles of it after
//! `remove` for a removal (issue 16 §4, "a revocable handle provided by the framework").
//!
//! On the q35 fixture with an SR-IOV NVMe: the PF at 01:00.0, its VFs at 01:00.1 and
//! 01:00.2.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use pcibus::PciAddress;
use pcibus::bus::attach::Release;
use pcibus::bus::id::{CLASS_EXACT, IdEntry};
use pcibus::bus::{
    BackingError, Bus, BusEvent, DeviceBacking, Driver, ProbeDevice, ProbeOutcome, RegisterIo, Removal,
    RemovalCause,
};
use pcibus::hotplug::monitor::Event;
use pcibus::removal::registry::DeviceIdentity;
use pcibus::testing::backing::{AttachCall, FakeAttach, FakeBacking, FakeRegisters};

mod common;
use common::{addr, allow, map, qemu, swap_unseen};

const PF: &str = "0000:01:00.0";
const VF1: &str = "0000:01:00.1";
const VF2: &str = "0000:01:00.2";
const AHCI: &str = "0000:00:1f.2";

/// What the driver keeps of one device.
#[derive(Debug)]
struct Dev {
    // Which probe made it (1, 2, ...): tells one state from another.
    serial: u32,
    // The incarnation it was probed for.
    identity: Option<DeviceIdentity>,
    // The application's notes (through `device_state_mut`).
    notes: Vec<String>,
    backing: FakeBacking,
    bar: FakeRegisters,
    // A counted handle: alive while the state is.
    _token: Arc<()>,
}

/// What `remove` received.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Removed {
    address: PciAddress,
    serial: u32,
    identity: Option<DeviceIdentity>,
    notes: Vec<String>,
    cause: RemovalCause,
}

#[derive(Default)]
struct Shared {
    removed: Vec<Removed>,
    // Handles `remove` kept on purpose (a leaking driver).
    leaked: Vec<(FakeBacking, FakeRegisters)>,
}

struct Stateful {
    table: [IdEntry; 1],
    serial: u32,
    token: Arc<()>,
    decline: BTreeSet<PciAddress>,
    panic_in_remove: bool,
    leak_in_remove: bool,
    again: bool,
    shared: Arc<Mutex<Shared>>,
}

impl Stateful {
    fn new(shared: &Arc<Mutex<Shared>>) -> Self {
        Stateful {
            table: [IdEntry::class(0x010802, CLASS_EXACT)],
            serial: 0,
            token: Arc::new(()),
            decline: BTreeSet::new(),
            panic_in_remove: false,
            leak_in_remove: false,
            again: false,
            shared: Arc::clone(shared),
        }
    }
}

impl Driver<FakeBacking> for Stateful {
    type Device = Dev;

    fn name(&self) -> &str {
        "stateful"
    }
    fn id_table(&self) -> &[IdEntry] {
        &self.table
    }
    fn probe(&mut self, device: ProbeDevice<'_, FakeBacking>) -> ProbeOutcome<Dev> {
        if self.decline.contains(&device.record.address) {
            return ProbeOutcome::NotMine;
        }
        let bar = match device.backing.map_bar(0) {
            Ok(b) => b,
            Err(e) => return ProbeOutcome::Failed(e.into()),
        };
        self.serial += 1;
        ProbeOutcome::Bound(Dev {
            serial: self.serial,
            identity: device.record.identity,
            notes: Vec::new(),
            backing: device.backing.clone(),
            bar,
            _token: Arc::clone(&self.token),
        })
    }
    fn remove(&mut self, device: Dev, removal: &Removal) {
        if self.panic_in_remove {
            panic!("remove of {} went wrong", removal.address);
        }
        self.shared.lock().removed.push(Removed {
            address: removal.address,
            serial: device.serial,
            identity: device.identity,
            notes: device.notes.clone(),
            cause: removal.cause.clone(),
        });
        if self.leak_in_remove {
            self.shared.lock().leaked.push((device.backing, device.bar));
        }
    }
    fn probe_again(&self) -> bool {
        self.again
    }
}

/// Another driver type, with state of another type.
struct Other {
    table: [IdEntry; 1],
}

impl Driver<FakeBacking> for Other {
    type Device = FakeBacking;

    fn name(&self) -> &str {
        "other"
    }
    fn id_table(&self) -> &[IdEntry] {
        &self.table
    }
    fn probe(&mut self, device: ProbeDevice<'_, FakeBacking>) -> ProbeOutcome<FakeBacking> {
        ProbeOutcome::Bound(device.backing.clone())
    }
    fn remove(&mut self, _device: FakeBacking, _removal: &Removal) {}
}

#[test]
fn the_state_probe_returns_is_what_remove_receives() {
    let fake = qemu();
    let attach = FakeAttach::new();
    let shared = Arc::default();
    let mut bus = Bus::new(map(&fake), attach.clone()).selection(allow(&[PF, VF1]));
    bus.register(Box::new(Stateful::new(&shared)));
    assert_eq!(bus.probe_all().len(), 2);

    let pf = bus.device_state::<Stateful>(addr(PF)).expect("held");
    let vf = bus.device_state::<Stateful>(addr(VF1)).expect("held");
    assert_eq!((pf.serial, vf.serial), (1, 2));
    assert_eq!(pf.identity, bus.map().get(addr(PF)).unwrap().identity);
    assert_eq!(pf.backing.address(), addr(PF));
    assert_eq!(
        bus.device_states::<Stateful>()
            .map(|(a, d)| (a, d.serial))
            .collect::<Vec<_>>(),
        [(addr(PF), 1), (addr(VF1), 2)]
    );
    // The application works on the state in place.
    bus.device_state_mut::<Stateful>(addr(PF))
        .unwrap()
        .notes
        .push("seen".into());
    bus.device_state::<Stateful>(addr(PF))
        .unwrap()
        .bar
        .write32(0x14, 7)
        .unwrap();

    let r = bus.detach(addr(PF)).unwrap();
    assert_eq!((r.leaked, r.panicked.as_ref()), (0, None));
    assert_eq!(
        shared.lock().removed,
        [Removed {
            address: addr(PF),
            serial: 1,
            identity: bus.map().get(addr(PF)).unwrap().identity,
            notes: vec!["seen".into()],
            cause: RemovalCause::Detach,
        }]
    );
    assert!(
        bus.device_state::<Stateful>(addr(PF)).is_none(),
        "gone with the device"
    );
    assert_eq!(bus.device_state::<Stateful>(addr(VF1)).unwrap().serial, 2);
    drop(bus);
    assert_eq!(
        shared.lock().removed.iter().map(|r| r.serial).collect::<Vec<_>>(),
        [1, 2],
        "dropping the bus hands back the rest"
    );
}

#[test]
fn the_accessors_answer_none_for_a_device_the_driver_does_not_hold() {
    let fake = qemu();
    let attach = FakeAttach::new();
    let shared = Arc::default();
    let mut bus = Bus::new(map(&fake), attach.clone()).selection(allow(&[PF, VF1]));
    let mut stateful = Stateful::new(&shared);
    stateful.decline.insert(addr(VF1));
    bus.register(Box::new(stateful));
    bus.register(Box::new(Other {
        table: [IdEntry::class(0x010802, CLASS_EXACT)],
    }));
    bus.probe_all();
    assert_eq!(bus.held(), [(addr(PF), "stateful"), (addr(VF1), "other")]);

    assert!(bus.device_state::<Stateful>(addr(PF)).is_some());
    assert!(
        bus.device_state::<Stateful>(addr(VF1)).is_none(),
        "another driver's"
    );
    assert!(bus.device_state_mut::<Stateful>(addr(VF1)).is_none());
    assert!(bus.device_state::<Other>(addr(PF)).is_none(), "another driver's");
    assert_eq!(
        bus.device_state::<Other>(addr(VF1)).map(|b| b.address()),
        Some(addr(VF1))
    );
    assert!(bus.device_state::<Stateful>(addr(VF2)).is_none(), "not selected");
    assert!(bus.device_state::<Stateful>(addr(AHCI)).is_none(), "no driver's");
    assert_eq!(bus.device_states::<Other>().count(), 1);
}

#[test]
fn a_device_replaced_at_the_same_address_gets_fresh_state() {
    let fake = qemu();
    let attach = FakeAttach::new();
    let shared: Arc<Mutex<Shared>> = Arc::default();
    let mut bus = Bus::new(map(&fake), attach.clone())
        .selection(allow(&[PF]))
        .settle(Duration::ZERO);
    bus.register(Box::new(Stateful::new(&shared)));
    assert_eq!(bus.probe_all().len(), 1);
    let old = bus.map().get(addr(PF)).unwrap().identity;
    assert!(old.is_some());
    bus.device_state_mut::<Stateful>(addr(PF))
        .unwrap()
        .notes
        .push("of the first".into());

    // Swapped unseen (the uevents were lost): a new directory with the same contents, so
    // only the incarnation tells the new device from the old.
    swap_unseen(&fake, PF);
    let events = bus.handle(&Event::Overflow).unwrap();
    assert!(
        events
            .iter()
            .any(|e| matches!(e, BusEvent::Removed(r) if r.address == addr(PF))),
        "{events:?}"
    );
    assert_eq!(
        shared.lock().removed,
        [Removed {
            address: addr(PF),
            serial: 1,
            identity: old,
            notes: vec!["of the first".into()],
            cause: RemovalCause::Uevent(pcibus::hotplug::event::Action::Remove),
        }],
        "the old incarnation's state went to remove"
    );
    assert!(bus.device_state::<Stateful>(addr(PF)).is_none());

    let mut probed = Vec::new();
    let start = std::time::Instant::now();
    while probed.is_empty() && start.elapsed() < Duration::from_secs(5) {
        probed = bus.wait(None, Duration::from_millis(100)).unwrap();
    }
    assert!(
        matches!(&probed[..], [BusEvent::Probed(p)] if p.address == addr(PF) && p.result.is_ok()),
        "{probed:?}"
    );
    let new = bus.device_state::<Stateful>(addr(PF)).unwrap();
    assert_eq!(new.serial, 2);
    assert!(new.notes.is_empty(), "nothing of the old state");
    assert_ne!(new.identity, old);
    assert_eq!(new.identity, bus.map().get(addr(PF)).unwrap().identity);
}

#[test]
fn a_probe_again_replaces_the_state_and_drops_the_old_one() {
    let fake = qemu();
    let attach = FakeAttach::new();
    let shared: Arc<Mutex<Shared>> = Arc::default();
    let mut bus = Bus::new(map(&fake), attach.clone()).selection(allow(&[PF]));
    let mut driver = Stateful::new(&shared);
    driver.again = true;
    let token = Arc::clone(&driver.token);
    bus.register(Box::new(driver));
    bus.probe_all();
    // The driver's, this test's, the state's.
    assert_eq!(Arc::strong_count(&token), 3);
    let reports = bus.probe_all();
    assert!(reports[0].result.is_ok(), "{reports:?}");
    assert_eq!(bus.device_state::<Stateful>(addr(PF)).unwrap().serial, 2);
    assert_eq!(Arc::strong_count(&token), 3, "the first state was dropped");
    assert!(shared.lock().removed.is_empty(), "still bound: no remove");
}

#[test]
fn a_panic_in_remove_still_drops_the_state() {
    let fake = qemu();
    let attach = FakeAttach::new();
    let shared: Arc<Mutex<Shared>> = Arc::default();
    let mut bus = Bus::new(map(&fake), attach.clone()).selection(allow(&[PF]));
    let mut driver = Stateful::new(&shared);
    driver.panic_in_remove = true;
    let token = Arc::clone(&driver.token);
    bus.register(Box::new(driver));
    bus.probe_all();
    // The driver's, this test's, the state's.
    assert_eq!(Arc::strong_count(&token), 3);

    assert!(attach.request_removal(addr(PF)));
    let events = bus.wait(None, Duration::from_secs(5)).unwrap();
    let [BusEvent::Removed(r)] = events.as_slice() else {
        panic!("{events:?}")
    };
    assert!(r.panicked.is_some());
    assert_eq!(r.leaked, 0, "the unwinding dropped the state's handles");
    assert_eq!(Arc::strong_count(&token), 2, "and the state");
    assert_eq!(
        attach.calls().last().unwrap(),
        &AttachCall::Detach(addr(PF), Release::Removal, 0)
    );
    assert!(bus.releasing().is_empty());
}
// Issue 16 §4, the framework's revocable handle: a driver that keeps a handle after
// `remove` for a removal the kernel waits for (a request) does not keep the device open:
// the bus revokes it, so the kept handle reads all-ones and fails, and the device is
// closed and released at once.
#[test]
fn a_handle_kept_after_remove_for_a_request_is_revoked_and_the_device_released() {
    let fake = qemu();
    let attach = FakeAttach::new();
    let shared: Arc<Mutex<Shared>> = Arc::default();
    let mut bus = Bus::new(map(&fake), attach.clone()).selection(allow(&[PF]));
    let mut driver = Stateful::new(&shared);
    driver.leak_in_remove = true;
    bus.register(Box::new(driver));
    bus.probe_all();
    let backing = attach.device(addr(PF)).unwrap();
    bus.device_state::<Stateful>(addr(PF))
        .unwrap()
        .bar
        .write32(0x14, 7)
        .unwrap();
    drop(backing);

    assert!(attach.request_removal(addr(PF)));
    let events = bus.wait(None, Duration::from_secs(5)).unwrap();
    let [BusEvent::Removed(r)] = events.as_slice() else {
        panic!("{events:?}")
    };
    assert_eq!((&r.cause, r.leaked, r.revoked), (&RemovalCause::Request, 2, true));
    assert!(bus.releasing().is_empty(), "not kept open");
    assert_eq!(
        attach.calls().last().unwrap(),
        &AttachCall::Detach(addr(PF), Release::Removal, 2),
        "closed at once, the kept handles still alive"
    );
    assert!(!bus.map().scanner().removal_registry().is_pending(addr(PF)));
    let (backing, bar) = shared.lock().leaked.pop().unwrap();
    assert_eq!(bar.read32(0x14).unwrap(), u32::MAX, "registers read all-ones");
    bar.write32(0x14, 1).unwrap();
    assert_eq!(bar.read32(0x14).unwrap(), u32::MAX, "and drop writes");
    assert!(
        matches!(backing.map_bar(0), Err(BackingError::Gone(a)) if a == addr(PF)),
        "other operations fail"
    );
    drop((backing, bar));
    assert!(bus.poll().is_empty(), "nothing left to release");
}

// What stays as it was: an orderly detach does not revoke (restoring the previous driver
// needs every handle gone), nor does a backing that cannot be revoked.
#[test]
fn a_handle_kept_after_an_orderly_detach_or_of_an_irrevocable_backing_keeps_the_device_open() {
    for irrevocable in [false, true] {
        let fake = qemu();
        let attach = FakeAttach::new();
        if irrevocable {
            attach.irrevocable();
        }
        let shared: Arc<Mutex<Shared>> = Arc::default();
        let mut bus = Bus::new(map(&fake), attach.clone()).selection(allow(&[PF]));
        let mut driver = Stateful::new(&shared);
        driver.leak_in_remove = true;
        bus.register(Box::new(driver));
        bus.probe_all();
        let r = if irrevocable {
            assert!(attach.request_removal(addr(PF)));
            let events = bus.wait(None, Duration::from_secs(5)).unwrap();
            let [BusEvent::Removed(r)] = events.as_slice() else {
                panic!("{events:?}")
            };
            (r.leaked, r.revoked)
        } else {
            let r = bus.detach(addr(PF)).unwrap();
            (r.leaked, r.revoked)
        };
        assert_eq!(r, (2, false), "irrevocable: {irrevocable}");
        assert_eq!(bus.releasing(), [(addr(PF), "stateful")]);
        let (backing, bar) = shared.lock().leaked.pop().unwrap();
        bar.write32(0x14, 7).unwrap();
        assert_eq!(bar.read32(0x14).unwrap(), 7, "still the device");
        assert!(!backing.is_revoked());
        drop((backing, bar));
        let events = bus.poll();
        assert!(matches!(events[..], [BusEvent::Released(_)]), "{events:?}");
    }
}

// The same for a device kept open after an orderly detach (or a probe's rollback) that
// the kernel then asks for: the kept handles no longer keep it open once it is a removal.
#[test]
fn a_device_kept_open_after_a_detach_is_revoked_when_the_kernel_asks_for_it() {
    let fake = qemu();
    let attach = FakeAttach::new();
    let shared: Arc<Mutex<Shared>> = Arc::default();
    let mut bus = Bus::new(map(&fake), attach.clone()).selection(allow(&[PF]));
    let mut driver = Stateful::new(&shared);
    driver.leak_in_remove = true;
    bus.register(Box::new(driver));
    bus.probe_all();
    let r = bus.detach(addr(PF)).unwrap();
    assert_eq!((r.leaked, r.revoked), (2, false));
    assert_eq!(bus.releasing(), [(addr(PF), "stateful")]);

    assert!(attach.request_removal(addr(PF)));
    let events = bus.poll();
    let [BusEvent::Released(r)] = events.as_slice() else {
        panic!("{events:?}")
    };
    assert_eq!((r.address, &r.cause), (addr(PF), &Some(RemovalCause::Detach)));
    assert_eq!(
        attach.calls().last().unwrap(),
        &AttachCall::Detach(addr(PF), Release::Removal, 2),
        "closed as a removal (the binding left alone), the kept handles still alive"
    );
    assert!(bus.releasing().is_empty());
    assert!(!bus.map().scanner().removal_registry().is_pending(addr(PF)));
    let (backing, bar) = shared.lock().leaked.pop().unwrap();
    assert!(backing.is_revoked());
    assert_eq!(bar.read32(0x14).unwrap(), u32::MAX);
}
