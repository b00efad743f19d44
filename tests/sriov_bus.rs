//! SR-IOV through the bus (issue 16 §4): [`Bus::set_vfs_with`] asks the PF's driver
//! first ([`Driver::sriov_configure`]), refuses to remove VFs the bus holds, changes the
//! count through a [`VfControl`], reads NumVFs back from the PF's config space (never
//! `sriov_numvfs`, which takes the device lock), and rolls back a failed change.
//!
//! On the q35 fixture with an SR-IOV NVMe (PF 01:00.0, VFs 01:00.1 and 01:00.2); the fake
//! PF's config space gets an SR-IOV capability, and a fake `VfControl` records the changes
//! and updates NumVFs there, as the kernel's write of VF Enable and NumVFs would.

use std::sync::Arc;

use parking_lot::Mutex;
use pcibus::PciAddress;
use pcibus::bus::id::{CLASS_EXACT, IdEntry};
use pcibus::bus::sriov::{ChangeError, Rollback, SetVfsError, VfControl, VfError, vf_address};
use pcibus::bus::{Bus, DeviceBacking, Driver, DriverError, ProbeDevice, ProbeOutcome, Removal};
use pcibus::testing::FakeSysfs;
use pcibus::testing::backing::{FakeAttach, FakeBacking};

mod common;
use common::{addr, allow, map, qemu};

const PF: &str = "0000:01:00.0";
const VF1: &str = "0000:01:00.1";
const VF2: &str = "0000:01:00.2";
const SRIOV_AT: u64 = 0x100;

/// Gives `pf` an SR-IOV capability (the only extended one) at 0x100.
fn sriov_cap(pf: &FakeBacking, total: u16, num: u16, offset: u16, stride: u16) {
    let header: u32 = 0x0010 | (1 << 16);
    pf.write_config(SRIOV_AT, &header.to_le_bytes()).unwrap();
    pf.write_config(SRIOV_AT + 0x0e, &total.to_le_bytes()).unwrap();
    pf.write_config(SRIOV_AT + 0x10, &num.to_le_bytes()).unwrap();
    pf.write_config(SRIOV_AT + 0x14, &offset.to_le_bytes()).unwrap();
    pf.write_config(SRIOV_AT + 0x16, &stride.to_le_bytes()).unwrap();
}

fn num_vfs(pf: &FakeBacking) -> u16 {
    let mut b = [0u8; 2];
    pf.read_config(SRIOV_AT + 0x10, &mut b).unwrap();
    u16::from_le_bytes(b)
}

/// What happened, in order: the driver's answers and the control's changes.
type Log = Arc<Mutex<Vec<String>>>;

struct PfDriver {
    table: [IdEntry; 1],
    refuse: bool,
    log: Log,
}

impl Driver<FakeBacking> for PfDriver {
    type Device = ();

    fn name(&self) -> &str {
        "pfdrv"
    }
    fn id_table(&self) -> &[IdEntry] {
        &self.table
    }
    fn probe(&mut self, _device: ProbeDevice<'_, FakeBacking>) -> ProbeOutcome {
        ProbeOutcome::Bound(())
    }
    fn remove(&mut self, _: (), _removal: &Removal) {}
    fn sriov_configure(&mut self, _pf: &mut (), n: u16) -> Result<(), DriverError> {
        self.log.lock().push(format!("asked {n}"));
        if self.refuse {
            return Err("not now".into());
        }
        Ok(())
    }
}

/// Changes NumVFs in the fake PF's config space, as the kernel does; fails the changes
/// numbered in `fail` (1-based), after going through 0 as the kernel's sysfs does.
struct FakeVfs {
    pf: FakeBacking,
    log: Log,
    fail: Vec<usize>,
    calls: Mutex<usize>,
}

impl VfControl for FakeVfs {
    fn num_vfs(&self) -> Result<u16, VfError> {
        panic!("the bus must not read sriov_numvfs (it takes the device lock)");
    }
    fn set_num_vfs(&self, _n: u16) -> Result<Vec<PciAddress>, VfError> {
        panic!("the bus must not read sriov_numvfs (it takes the device lock)");
    }
    fn change_num_vfs(&self, now: u16, n: u16) -> Result<(), VfError> {
        let call = {
            let mut c = self.calls.lock();
            *c += 1;
            *c
        };
        self.log.lock().push(format!("change {now} -> {n}"));
        if now != 0 && n != 0 {
            self.pf
                .write_config(SRIOV_AT + 0x10, &0u16.to_le_bytes())
                .unwrap();
        }
        if self.fail.contains(&call) {
            return Err(VfError::Sysfs {
                path: "sriov_numvfs".into(),
                value: Some(n.to_string()),
                source: std::io::Error::from_raw_os_error(12), // ENOMEM
            });
        }
        self.pf.write_config(SRIOV_AT + 0x10, &n.to_le_bytes()).unwrap();
        Ok(())
    }
}

struct Setup {
    _fake: FakeSysfs,
    bus: Bus<FakeAttach>,
    log: Log,
}

fn setup(allowed: &[&str], refuse: bool) -> Setup {
    let fake = qemu();
    let log = Log::default();
    let mut bus = Bus::new(map(&fake), FakeAttach::new()).selection(allow(allowed));
    bus.register(Box::new(PfDriver {
        table: [IdEntry::class(0x010802, CLASS_EXACT)],
        refuse,
        log: Arc::clone(&log),
    }));
    assert_eq!(bus.probe_all().len(), allowed.len());
    Setup {
        _fake: fake,
        bus,
        log,
    }
}

fn control(s: &Setup, fail: &[usize]) -> FakeVfs {
    FakeVfs {
        pf: s.bus.backing(addr(PF)).unwrap().clone(),
        log: Arc::clone(&s.log),
        fail: fail.to_vec(),
        calls: Mutex::new(0),
    }
}

#[test]
fn the_driver_is_asked_first_and_can_refuse() {
    let mut s = setup(&[PF], true);
    sriov_cap(s.bus.backing(addr(PF)).unwrap(), 4, 0, 1, 1);
    let vfs = control(&s, &[]);

    let e = s.bus.set_vfs_with(addr(PF), 2, &vfs).unwrap_err();
    assert!(
        matches!(&e, SetVfsError::Refused { driver, asked: 2, .. } if driver == "pfdrv"),
        "{e:?}"
    );
    assert!(e.to_string().contains("not now"), "{e}");
    // Nothing was written.
    assert_eq!(*s.log.lock(), ["asked 2"]);
    assert_eq!(num_vfs(&vfs.pf), 0);

    s.bus.driver_mut::<PfDriver>().unwrap().refuse = false;
    let done = s.bus.set_vfs_with(addr(PF), 2, &vfs).unwrap();
    assert_eq!((done.previous, done.num_vfs), (0, 2));
    assert_eq!(done.vfs, [addr(VF1), addr(VF2)]);
    assert_eq!(*s.log.lock(), ["asked 2", "asked 2", "change 0 -> 2"]);
    assert_eq!(num_vfs(&vfs.pf), 2);

    // The same count again: nothing to ask, nothing to write.
    let same = s.bus.set_vfs_with(addr(PF), 2, &vfs).unwrap();
    assert_eq!(same.vfs, [addr(VF1), addr(VF2)]);
    assert_eq!(s.log.lock().len(), 3);
}

#[test]
fn a_held_vf_blocks_disabling_and_changing() {
    let mut s = setup(&[PF, VF1], false);
    sriov_cap(s.bus.backing(addr(PF)).unwrap(), 4, 2, 1, 1);
    let vfs = control(&s, &[]);

    for n in [0, 3] {
        let e = s.bus.set_vfs_with(addr(PF), n, &vfs).unwrap_err();
        match &e {
            SetVfsError::VfsInUse { vfs, .. } => assert_eq!(*vfs, [(addr(VF1), "pfdrv".to_owned())]),
            other => panic!("{other:?}"),
        }
    }
    // Neither asked nor written.
    assert!(s.log.lock().is_empty());
    assert_eq!(num_vfs(&vfs.pf), 2);

    s.bus.detach(addr(VF1)).unwrap();
    let done = s.bus.set_vfs_with(addr(PF), 0, &vfs).unwrap();
    assert_eq!((done.previous, done.num_vfs, done.vfs.len()), (2, 0, 0));
    assert_eq!(*s.log.lock(), ["asked 0", "change 2 -> 0"]);
}

#[test]
fn a_failed_change_is_rolled_back_and_both_errors_said() {
    let mut s = setup(&[PF], false);
    sriov_cap(s.bus.backing(addr(PF)).unwrap(), 4, 2, 1, 1);
    // The change to 3 removes the 2 VFs, then fails to create 3.
    let vfs = control(&s, &[1]);
    let e = s.bus.set_vfs_with(addr(PF), 3, &vfs).unwrap_err();
    match &e {
        SetVfsError::Change {
            from: 2,
            to: 3,
            error,
            rollback: Rollback::RolledBack,
            ..
        } => assert!(
            matches!(**error, ChangeError::Control(VfError::Sysfs { .. })),
            "{e:?}"
        ),
        other => panic!("{other:?}"),
    }
    assert_eq!(*s.log.lock(), ["asked 3", "change 2 -> 3", "change 0 -> 2"]);
    assert_eq!(num_vfs(&vfs.pf), 2);

    // The rollback fails too: both errors in the message.
    s.log.lock().clear();
    let vfs = control(&s, &[1, 2]);
    let e = s.bus.set_vfs_with(addr(PF), 3, &vfs).unwrap_err();
    assert!(
        matches!(
            &e,
            SetVfsError::Change {
                rollback: Rollback::Failed(_),
                ..
            }
        ),
        "{e:?}"
    );
    let text = e.to_string();
    assert!(text.contains("write \"3\""), "{text}");
    assert!(
        text.contains("rolling back") && text.contains("write \"2\""),
        "{text}"
    );
    assert_eq!(num_vfs(&vfs.pf), 0);
}

#[test]
fn a_change_that_reads_back_another_count_is_rolled_back() {
    struct Short(FakeVfs);
    impl VfControl for Short {
        fn num_vfs(&self) -> Result<u16, VfError> {
            unreachable!()
        }
        fn set_num_vfs(&self, _n: u16) -> Result<Vec<PciAddress>, VfError> {
            unreachable!()
        }
        // Creates one VF fewer than asked (the first time).
        fn change_num_vfs(&self, now: u16, n: u16) -> Result<(), VfError> {
            let first = self.0.log.lock().len() == 1;
            self.0.change_num_vfs(now, if first { n - 1 } else { n })
        }
    }
    let mut s = setup(&[PF], false);
    sriov_cap(s.bus.backing(addr(PF)).unwrap(), 4, 0, 1, 1);
    let vfs = Short(control(&s, &[]));
    let e = s.bus.set_vfs_with(addr(PF), 2, &vfs).unwrap_err();
    match &e {
        SetVfsError::Change {
            error,
            rollback: Rollback::RolledBack,
            ..
        } => assert!(matches!(**error, ChangeError::ReadBack { got: 1 }), "{e:?}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(num_vfs(&vfs.0.pf), 0);
}

#[test]
fn vf_addresses_come_from_offset_and_stride() {
    let mut s = setup(&[PF], false);
    sriov_cap(s.bus.backing(addr(PF)).unwrap(), 8, 0, 0x80, 2);
    let vfs = control(&s, &[]);
    let done = s.bus.set_vfs_with(addr(PF), 3, &vfs).unwrap();
    assert_eq!(
        done.vfs,
        [addr("0000:01:10.0"), addr("0000:01:10.2"), addr("0000:01:10.4")]
    );
    // Routing ids carry into the next bus, and stop at bus 255.
    let pf = addr("0000:01:00.0");
    assert_eq!(vf_address(pf, 0xff, 1, 0), Some(addr("0000:01:1f.7")));
    assert_eq!(vf_address(pf, 0xff, 1, 1), Some(addr("0000:02:00.0")));
    assert_eq!(vf_address(addr("0000:ff:1f.0"), 0x10, 1, 0), None);
}

#[test]
fn what_the_bus_refuses_before_asking() {
    let mut s = setup(&[PF], false);
    let vfs = control(&s, &[]);
    // No SR-IOV capability yet.
    assert!(matches!(
        s.bus.set_vfs_with(addr(PF), 1, &vfs),
        Err(SetVfsError::NotSriov(_))
    ));
    sriov_cap(s.bus.backing(addr(PF)).unwrap(), 2, 0, 1, 1);
    assert!(matches!(
        s.bus.set_vfs_with(addr(PF), 3, &vfs),
        Err(SetVfsError::TooMany {
            asked: 3,
            total: 2,
            ..
        })
    ));
    assert!(matches!(
        s.bus.set_vfs_with(addr(VF1), 1, &vfs),
        Err(SetVfsError::NotHeld(_))
    ));
    assert!(s.log.lock().is_empty());
}

// After a change the bus's map shows the VFs created (no uevent needed), a VF outside the
// selection is offered once `Bus::allow` admits it, and removing the VFs takes them out of
// the map again.
#[test]
fn the_map_shows_the_vfs_at_once_and_allow_admits_them() {
    use pcibus::bus::map::Change;

    let fake = FakeSysfs::new().unwrap();
    fake.device(PF)
        .class(0x010802)
        .sriov_totalvfs(4)
        .create()
        .unwrap();
    let log = Log::default();
    let mut bus = Bus::new(map(&fake), FakeAttach::new()).selection(allow(&[PF]));
    bus.register(Box::new(PfDriver {
        table: [IdEntry::class(0x010802, CLASS_EXACT)],
        refuse: false,
        log: Arc::clone(&log),
    }));
    assert_eq!(bus.probe_all().len(), 1);
    let pf = bus.backing(addr(PF)).unwrap().clone();
    sriov_cap(&pf, 4, 0, 1, 1);
    assert_eq!(bus.num_vfs(addr(PF)).unwrap(), 0);

    // The kernel's part: NumVFs in config space, and the VFs' devices in sysfs.
    struct Creating<'a> {
        inner: FakeVfs,
        fake: &'a FakeSysfs,
    }
    impl VfControl for Creating<'_> {
        fn num_vfs(&self) -> Result<u16, VfError> {
            unreachable!()
        }
        fn set_num_vfs(&self, _: u16) -> Result<Vec<PciAddress>, VfError> {
            unreachable!()
        }
        fn change_num_vfs(&self, now: u16, n: u16) -> Result<(), VfError> {
            self.inner.change_num_vfs(now, n)?;
            for (i, vf) in [VF1, VF2].iter().enumerate() {
                if i < usize::from(n) {
                    self.fake.device(vf).class(0x010802).physfn(PF).create().unwrap();
                } else if self.fake.device_dir(vf).is_some() {
                    self.fake.remove_device(vf).unwrap();
                    std::fs::remove_file(self.fake.root().join("bus/pci/devices").join(vf)).unwrap();
                }
            }
            Ok(())
        }
    }
    let control = Creating {
        inner: FakeVfs {
            pf: pf.clone(),
            log: Arc::clone(&log),
            fail: Vec::new(),
            calls: Mutex::new(0),
        },
        fake: &fake,
    };
    let done = bus.set_vfs_with(addr(PF), 2, &control).unwrap();
    assert_eq!(done.vfs, [addr(VF1), addr(VF2)]);
    // (The PF's record is updated too: its `virtfnN` links.)
    let vfs_only = |m: &[Change]| -> Vec<Change> {
        m.iter()
            .copied()
            .filter(|c| *c != Change::Updated(addr(PF)))
            .collect()
    };
    assert_eq!(
        vfs_only(&done.map),
        [Change::Added(addr(VF1)), Change::Added(addr(VF2))]
    );
    assert_eq!(bus.map().get(addr(VF1)).unwrap().physfn, Some(addr(PF)));
    assert_eq!(bus.num_vfs(addr(PF)).unwrap(), 2);

    // Outside the selection: not offered, until allowed.
    assert!(bus.probe(addr(VF1)).is_none());
    bus.allow(pcibus::bus::devargs::DevArg::new(addr(VF1))).unwrap();
    assert!(bus.probe(addr(VF1)).unwrap().result.is_ok());
    assert!(bus.held().iter().any(|(a, _)| *a == addr(VF1)));
    // Allowed twice: refused, as on the command line.
    assert!(bus.allow(pcibus::bus::devargs::DevArg::new(addr(VF1))).is_err());

    bus.detach(addr(VF1)).unwrap();
    let done = bus.set_vfs_with(addr(PF), 0, &control).unwrap();
    assert_eq!(
        vfs_only(&done.map),
        [Change::Removed(addr(VF1)), Change::Removed(addr(VF2))]
    );
    assert!(bus.map().get(addr(VF1)).is_none());
}
