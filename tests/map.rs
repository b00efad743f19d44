//! The incremental device map, specified against fake sysfs trees: after each change to
//! the tree and its uevent, the map equals a fresh full scan of the tree.

use pcibus::bus::map::{Change, DeviceMap};
use pcibus::hotplug::event::{Action, Uevent};
use pcibus::testing::FakeSysfs;
use pcibus::{DeviceRecord, PciAddress, Scanner, SysfsRoot};
use proptest::prelude::*;

fn addr(s: &str) -> PciAddress {
    s.parse().unwrap()
}

fn scanner(fake: &FakeSysfs) -> Scanner {
    Scanner::new(SysfsRoot::new(fake.root())).no_claims()
}

// The event the kernel sends for `address`, with `DRIVER` when given.
fn event(action: Action, address: PciAddress, driver: Option<&str>) -> Uevent {
    let devpath = format!("/devices/pci0000:00/{address}");
    let mut vars = vec![
        ("ACTION".to_string(), action.as_str().to_string()),
        ("DEVPATH".to_string(), devpath.clone()),
        ("SUBSYSTEM".to_string(), "pci".to_string()),
        ("PCI_SLOT_NAME".to_string(), address.to_string()),
    ];
    if let Some(d) = driver {
        vars.push(("DRIVER".to_string(), d.to_string()));
    }
    vars.push(("SEQNUM".to_string(), "1".to_string()));
    Uevent::from_vars(action, devpath, vars).unwrap()
}

fn add_device(fake: &FakeSysfs, address: PciAddress, driver: Option<&str>) {
    let b = fake.device(&address.to_string());
    match driver {
        Some(d) => b.driver(d),
        None => b,
    }
    .create()
    .unwrap();
}

// Deletes the device directory and its `bus/pci/devices` entry, and the links to it from
// its driver's directory, as the kernel does (a re-added device gets them anew).
fn remove_device(fake: &FakeSysfs, address: PciAddress) {
    let name = address.to_string();
    fake.remove_device(&name).unwrap();
    std::fs::remove_file(fake.root().join("bus/pci/devices").join(&name)).unwrap();
    for driver in std::fs::read_dir(fake.root().join("bus/pci/drivers"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let _ = std::fs::remove_file(driver.path().join(&name));
    }
}

// Points the device's `driver` link at `driver`, or removes it.
fn set_driver(fake: &FakeSysfs, address: PciAddress, driver: Option<&str>) {
    let dir = fake.device_dir(&address.to_string()).unwrap();
    let link = dir.join("driver");
    let _ = std::fs::remove_file(fake.root().join(&link));
    if let Some(d) = driver {
        let up = "../".repeat(dir.components().count());
        let target = format!("{up}bus/pci/drivers/{d}");
        fake.symlink(&link, target).unwrap();
    }
}

fn records(map: &DeviceMap) -> Vec<DeviceRecord> {
    map.iter().cloned().collect()
}

fn fresh(fake: &FakeSysfs) -> Vec<DeviceRecord> {
    scanner(fake).scan().unwrap().devices
}

#[test]
fn add_bind_unbind_remove_match_a_full_scan() {
    let fake = FakeSysfs::new().unwrap();
    let (a, b) = (addr("0000:00:01.0"), addr("0000:00:02.0"));
    add_device(&fake, a, Some("nvme"));
    let mut map = DeviceMap::new(scanner(&fake)).unwrap();
    assert_eq!(map.len(), 1);

    add_device(&fake, b, None);
    assert_eq!(map.apply(&event(Action::Add, b, None)).unwrap(), Change::Added(b));
    assert_eq!(records(&map), fresh(&fake));
    assert_eq!(map.get(b).unwrap().driver, None);

    set_driver(&fake, b, Some("vfio-pci"));
    assert_eq!(
        map.apply(&event(Action::Bind, b, Some("vfio-pci"))).unwrap(),
        Change::Updated(b)
    );
    assert_eq!(map.get(b).unwrap().driver.as_deref(), Some("vfio-pci"));
    assert_eq!(records(&map), fresh(&fake));

    set_driver(&fake, a, None);
    assert_eq!(
        map.apply(&event(Action::Unbind, a, None)).unwrap(),
        Change::Updated(a)
    );
    assert_eq!(map.get(a).unwrap().driver, None);
    assert_eq!(records(&map), fresh(&fake));

    remove_device(&fake, a);
    assert_eq!(
        map.apply(&event(Action::Remove, a, None)).unwrap(),
        Change::Removed(a)
    );
    assert_eq!(records(&map), fresh(&fake));
    assert_eq!(map.len(), 1);
}

#[test]
fn an_event_that_changed_nothing_is_unchanged() {
    let fake = FakeSysfs::new().unwrap();
    let a = addr("0000:00:01.0");
    add_device(&fake, a, Some("nvme"));
    let mut map = DeviceMap::new(scanner(&fake)).unwrap();
    assert_eq!(
        map.apply(&event(Action::Change, a, Some("nvme"))).unwrap(),
        Change::Unchanged
    );
    // A remove of a device the map does not have, and a late add of one already gone.
    let gone = addr("0000:00:09.0");
    assert_eq!(
        map.apply(&event(Action::Remove, gone, None)).unwrap(),
        Change::Unchanged
    );
    assert_eq!(
        map.apply(&event(Action::Add, gone, None)).unwrap(),
        Change::Unchanged
    );
    assert_eq!(records(&map), fresh(&fake));
}

#[test]
fn remove_does_not_read_sysfs() {
    let fake = FakeSysfs::new().unwrap();
    let a = addr("0000:00:01.0");
    add_device(&fake, a, None);
    let mut map = DeviceMap::new(scanner(&fake)).unwrap();
    // The device is still in the tree: a map that re-read it would keep the record.
    assert_eq!(
        map.apply(&event(Action::Remove, a, None)).unwrap(),
        Change::Removed(a)
    );
    assert!(map.is_empty());
}

#[test]
fn an_add_whose_device_is_gone_again_drops_the_record() {
    let fake = FakeSysfs::new().unwrap();
    let a = addr("0000:00:01.0");
    add_device(&fake, a, None);
    let mut map = DeviceMap::new(scanner(&fake)).unwrap();
    remove_device(&fake, a);
    assert_eq!(
        map.apply(&event(Action::Add, a, None)).unwrap(),
        Change::Removed(a)
    );
    assert!(map.is_empty());
}

#[test]
fn events_of_other_subsystems_are_not_pci() {
    let fake = FakeSysfs::new().unwrap();
    add_device(&fake, addr("0000:00:01.0"), Some("nvme"));
    let mut map = DeviceMap::new(scanner(&fake)).unwrap();
    let devpath = "/devices/pci0000:00/0000:00:01.0/nvme/nvme0".to_string();
    let ev = Uevent::from_vars(
        Action::Remove,
        devpath.clone(),
        vec![
            ("ACTION".into(), "remove".into()),
            ("DEVPATH".into(), devpath),
            ("SUBSYSTEM".into(), "nvme".into()),
        ],
    )
    .unwrap();
    assert_eq!(map.apply(&ev).unwrap(), Change::NotPci);
    assert_eq!(map.len(), 1);
}

#[test]
fn resync_reports_every_difference() {
    let fake = FakeSysfs::new().unwrap();
    let (a, b, c) = (addr("0000:00:01.0"), addr("0000:00:02.0"), addr("0000:00:03.0"));
    add_device(&fake, a, None);
    add_device(&fake, b, None);
    let mut map = DeviceMap::new(scanner(&fake)).unwrap();
    // Events lost: a removed, b bound, c added.
    remove_device(&fake, a);
    set_driver(&fake, b, Some("vfio-pci"));
    add_device(&fake, c, None);
    assert_eq!(
        map.resync().unwrap(),
        [Change::Removed(a), Change::Updated(b), Change::Added(c)]
    );
    assert_eq!(records(&map), fresh(&fake));
    assert_eq!(map.resync().unwrap(), []);
}

#[derive(Debug, Clone)]
enum Op {
    Remove(usize),
    Add(usize, Option<&'static str>),
    Driver(usize, Option<&'static str>),
}

const SLOTS: [&str; 4] = ["0000:00:01.0", "0000:00:02.0", "0000:03:00.0", "0000:03:00.1"];

fn op() -> impl Strategy<Value = Op> {
    let driver = prop::option::of(prop::sample::select(vec!["nvme", "vfio-pci", "ixgbe"]));
    let slot = 0..SLOTS.len();
    prop_oneof![
        slot.clone().prop_map(Op::Remove),
        (slot.clone(), driver.clone()).prop_map(|(s, d)| Op::Add(s, d)),
        (slot, driver).prop_map(|(s, d)| Op::Driver(s, d)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Any sequence of removes, adds and driver changes, each followed by its event,
    /// leaves the map equal to a fresh scan.
    #[test]
    fn events_keep_the_map_equal_to_a_fresh_scan(
        initial in prop::collection::vec(any::<bool>(), SLOTS.len()),
        ops in prop::collection::vec(op(), 1..12),
    ) {
        let fake = FakeSysfs::new().unwrap();
        let exists = |a: PciAddress| fake.root().join("bus/pci/devices").join(a.to_string()).exists();
        for (slot, _) in SLOTS.iter().zip(&initial).filter(|(_, on)| **on) {
            add_device(&fake, addr(slot), None);
        }
        let mut map = DeviceMap::new(scanner(&fake)).unwrap();
        for op in ops {
            let ev = match op {
                Op::Remove(s) => {
                    let a = addr(SLOTS[s]);
                    if exists(a) {
                        remove_device(&fake, a);
                    }
                    event(Action::Remove, a, None)
                }
                Op::Add(s, driver) => {
                    let a = addr(SLOTS[s]);
                    if !exists(a) {
                        add_device(&fake, a, driver);
                    }
                    event(Action::Add, a, None)
                }
                Op::Driver(s, driver) => {
                    let a = addr(SLOTS[s]);
                    if exists(a) {
                        set_driver(&fake, a, driver);
                    }
                    match driver {
                        Some(d) => event(Action::Bind, a, Some(d)),
                        None => event(Action::Unbind, a, None),
                    }
                }
            };
            map.apply(&ev).unwrap();
            prop_assert_eq!(records(&map), fresh(&fake));
        }
    }
}

// `echo remove > /sys/bus/pci/devices/X/uevent` (root) sends a `remove` uevent for a device
// that stays; the kernel marks such events with `SYNTH_UUID` (0 when none was given).
fn synthetic(action: Action, address: PciAddress) -> Uevent {
    let devpath = format!("/devices/pci0000:00/{address}");
    let vars = [
        ("ACTION", action.as_str()),
        ("DEVPATH", &devpath),
        ("SUBSYSTEM", "pci"),
        ("SYNTH_UUID", "0"),
        ("PCI_SLOT_NAME", &address.to_string()),
        ("SEQNUM", "2"),
    ]
    .map(|(k, v)| (k.to_string(), v.to_string()));
    Uevent::from_vars(action, devpath, vars.to_vec()).unwrap()
}

#[test]
fn a_synthetic_remove_of_a_present_device_keeps_its_record() {
    let fake = FakeSysfs::new().unwrap();
    let a = addr("0000:00:01.0");
    add_device(&fake, a, Some("nvme"));
    let mut map = DeviceMap::new(scanner(&fake)).unwrap();
    assert_eq!(
        map.apply(&synthetic(Action::Remove, a)).unwrap(),
        Change::Unchanged
    );
    assert_eq!(records(&map), fresh(&fake));
    // A synthetic remove of a device that is really gone removes it.
    remove_device(&fake, a);
    assert_eq!(
        map.apply(&synthetic(Action::Remove, a)).unwrap(),
        Change::Removed(a)
    );
}
