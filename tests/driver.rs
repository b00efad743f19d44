//! The bus's probe loop and removal path, specified with in-memory devices
//! (`testing::backing`) on QEMU's q35 tree with an SR-IOV NVMe: the PF at 01:00.0, its VFs
//! at 01:00.1 and 01:00.2, an AHCI controller at 00:1f.2.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use pcibus::bus::attach::Release;
use pcibus::bus::claim::{ClaimDir, ClaimError, ClaimInfo};
use pcibus::bus::devargs::{DevArg, Selection};
use pcibus::bus::id::{CLASS_EXACT, IdEntry};
use pcibus::bus::map::Change;
use pcibus::bus::{
    Bus, BusEvent, DeviceBacking, Driver, DriverPanicked, ProbeDevice, ProbeError, ProbeOutcome, RegisterIo,
    Removal, RemovalCause,
};
use pcibus::hotplug::event::{Action, Uevent};
use pcibus::hotplug::monitor::Event;
use pcibus::testing::FakeSysfs;
use pcibus::testing::backing::{AttachCall, FakeAttach, FakeBacking, FakeRegisters};
use pcibus::{PciAddress, RemovalRegistry, SysfsRoot};

mod common;
use common::{addr, map, qemu, swap_unseen};

const PF: &str = "0000:01:00.0";
const VF1: &str = "0000:01:00.1";
const VF2: &str = "0000:01:00.2";
const AHCI: &str = "0000:00:1f.2";

fn allow(address: &str) -> Selection {
    Selection::from_args([("-a", address)]).unwrap()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Bind,
    Decline,
    Fail,
    // Fails but keeps a mapped BAR: a leak the bus must report.
    FailAndLeak,
    // Binds, and keeps its mapped BAR after `remove`: the device stays open.
    LeakOnRemove,
    // Panics in `probe` (after mapping a BAR, which the unwinding drops).
    PanicInProbe,
    // Binds; `remove` drops the device, then panics.
    PanicInRemove,
}

type Log = Arc<Mutex<Vec<String>>>;

struct TestDriver {
    name: &'static str,
    table: Vec<IdEntry>,
    mode: Mode,
    leaked: Vec<FakeRegisters>,
    log: Log,
    // Where the bus's claims are, to look at the claim while removing.
    claims: Option<ClaimDir>,
    again: bool,
    slow: Option<Slow>,
}

// A probe that takes long, as an NVMe bring-up waiting for the controller does (up to
// CAP.TO, 127.5 s): it says when it starts, then goes on for 10 s unless told to end.
struct Slow {
    address: PciAddress,
    started: mpsc::Sender<()>,
    release: mpsc::Receiver<()>,
    // Gives up as soon as the bus says its device was taken back.
    watch: bool,
}

// Makes `driver`'s probe of `address` slow: returns the receiver that hears it start and
// the sender that ends it (dropping it ends it too, as a failing test does).
fn slow(driver: &mut TestDriver, address: &str, watch: bool) -> (mpsc::Receiver<()>, mpsc::Sender<()>) {
    let (started, hear) = mpsc::channel();
    let (end, release) = mpsc::channel();
    driver.slow = Some(Slow {
        address: addr(address),
        started,
        release,
        watch,
    });
    (hear, end)
}

// Polls `done` until it holds or `limit` passes.
fn within(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if done() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    done()
}

// Whether `address` is closed (as a removal), out of `registry` and claimable in `claims`
// (the claim taken to see is dropped at once).
fn released(attach: &FakeAttach, registry: &RemovalRegistry, claims: &Path, address: &str) -> bool {
    closed(attach, address)
        && !registry.is_pending(addr(address))
        && ClaimDir::new(claims)
            .claim(addr(address), &ClaimInfo::new())
            .is_ok()
}

fn closed(attach: &FakeAttach, address: &str) -> bool {
    attach
        .calls()
        .iter()
        .any(|c| matches!(c, AttachCall::Detach(a, Release::Removal, _) if *a == addr(address)))
}

impl TestDriver {
    fn new(name: &'static str, mode: Mode, log: &Log) -> Self {
        TestDriver {
            name,
            table: vec![IdEntry::class(0x010802, CLASS_EXACT)],
            mode,
            leaked: Vec::new(),
            log: Arc::clone(log),
            claims: None,
            again: false,
            slow: None,
        }
    }
}

impl Driver<FakeBacking> for TestDriver {
    // Its handles of the device: a clone of the backing and BAR 0.
    type Device = (FakeBacking, FakeRegisters);

    fn name(&self) -> &str {
        self.name
    }
    fn id_table(&self) -> &[IdEntry] {
        &self.table
    }
    fn probe(&mut self, device: ProbeDevice<'_, FakeBacking>) -> ProbeOutcome<Self::Device> {
        let address = device.record.address;
        self.log.lock().push(format!(
            "{} probe {address}{}",
            self.name,
            if device.again { " again" } else { "" }
        ));
        if let Some(arg) = device.devarg
            && let Err(e) = arg.reject_unknown(&["queues"])
        {
            return ProbeOutcome::Failed(e.into());
        }
        let bar = match device.backing.map_bar(0) {
            Ok(b) => b,
            Err(e) => return ProbeOutcome::Failed(e.into()),
        };
        bar.write32(0x14, 1).unwrap();
        if let Some(slow) = self.slow.as_ref().filter(|s| s.address == address) {
            let _ = slow.started.send(());
            let start = Instant::now();
            while let Err(mpsc::RecvTimeoutError::Timeout) =
                slow.release.recv_timeout(Duration::from_millis(10))
                && start.elapsed() < Duration::from_secs(10)
            {
                if slow.watch && device.removal_requested() {
                    self.log
                        .lock()
                        .push(format!("{} probe {address} sees it taken back", self.name));
                    return ProbeOutcome::Failed("taken back while it got ready".into());
                }
            }
            self.log
                .lock()
                .push(format!("{} probe {address} done", self.name));
        }
        match self.mode {
            Mode::PanicInProbe => panic!("probe of {address} went wrong"),
            Mode::Bind | Mode::LeakOnRemove | Mode::PanicInRemove => {
                ProbeOutcome::Bound((device.backing.clone(), bar))
            }
            Mode::Decline => ProbeOutcome::NotMine,
            Mode::Fail => ProbeOutcome::Failed("controller did not become ready".into()),
            Mode::FailAndLeak => {
                self.leaked.push(bar);
                ProbeOutcome::Failed("controller did not become ready".into())
            }
        }
    }
    fn remove(&mut self, (backing, bar): Self::Device, removal: &Removal) {
        let address = removal.address;
        let releasing = self
            .claims
            .as_ref()
            .map(|d| d.releasing().unwrap().iter().any(|r| r.address == address));
        // Closed under the driver while it was probing another device.
        let revoked = backing.is_revoked();
        self.log.lock().push(format!(
            "{} remove {address} ({}){}{}",
            self.name,
            removal.cause,
            match releasing {
                Some(true) => " claim says releasing",
                Some(false) => " claim active",
                None => "",
            },
            if revoked { " revoked" } else { "" }
        ));
        if self.mode == Mode::LeakOnRemove {
            self.leaked.push(bar);
        } else {
            drop(bar);
        }
        drop(backing);
        if self.mode == Mode::PanicInRemove {
            panic!("remove of {address} went wrong");
        }
    }
    fn probe_again(&self) -> bool {
        self.again
    }
}

fn bound(reports: &[pcibus::bus::ProbeReport]) -> Vec<(String, String)> {
    reports
        .iter()
        .map(|r| {
            (
                r.address.to_string(),
                match &r.result {
                    Ok(d) => d.clone(),
                    Err(e) => format!("error: {e}"),
                },
            )
        })
        .collect()
}

#[test]
fn probes_every_matching_device_in_address_order_and_skips_the_rest() {
    let fake = qemu();
    let attach = FakeAttach::new();
    let log = Log::default();
    let mut bus = Bus::new(map(&fake), attach.clone());
    bus.register(Box::new(TestDriver::new("nvme-test", Mode::Bind, &log)));
    let reports = bus.probe_all();
    assert_eq!(
        bound(&reports),
        [PF, VF1, VF2].map(|a| (a.to_string(), "nvme-test".to_string()))
    );
    assert!(reports.iter().all(|r| r.leaked == 0));
    assert_eq!(
        *log.lock(),
        [PF, VF1, VF2].map(|a| format!("nvme-test probe {a}"))
    );
    // The AHCI controller matched no table: never opened.
    assert!(!attach.calls().contains(&AttachCall::Attach(addr(AHCI))));
    assert_eq!(
        bus.held(),
        [PF, VF1, VF2].map(|a| (addr(a), "nvme-test")).to_vec()
    );
    // Held devices are not offered again.
    assert!(bus.probe_all().is_empty());
    assert_eq!(log.lock().len(), 3);
    // The driver drives them: its writes reached the device.
    let dev = attach.device(addr(PF)).unwrap();
    assert_eq!(dev.map_bar(0).unwrap().read32(0x14).unwrap(), 1);
    drop(dev);
}

#[test]
fn a_declining_driver_passes_the_device_to_the_next() {
    let fake = qemu();
    let attach = FakeAttach::new();
    let log = Log::default();
    let mut bus = Bus::new(map(&fake), attach.clone()).selection(allow(PF));
    bus.register(Box::new(TestDriver::new("picky", Mode::Decline, &log)));
    bus.register(Box::new(TestDriver::new("generic", Mode::Bind, &log)));
    let reports = bus.probe_all();
    assert_eq!(bound(&reports), [(PF.to_string(), "generic".to_string())]);
    assert_eq!(
        *log.lock(),
        [format!("picky probe {PF}"), format!("generic probe {PF}")]
    );
    // One attach for both drivers; the declining one let go of its BAR.
    assert_eq!(attach.calls(), [AttachCall::Attach(addr(PF))]);
    assert_eq!(reports[0].leaked, 0);
}

// Records what a probe finds of the device's state, then acts as its mode says.
struct Inspector {
    name: &'static str,
    bind: bool,
    seen: Arc<Mutex<Vec<(String, bool, u32)>>>,
}

impl Driver<FakeBacking> for Inspector {
    type Device = ();

    fn name(&self) -> &str {
        self.name
    }
    fn id_table(&self) -> &[IdEntry] {
        const TABLE: &[IdEntry] = &[IdEntry::class(0x010802, CLASS_EXACT)];
        TABLE
    }
    fn probe(&mut self, device: ProbeDevice<'_, FakeBacking>) -> ProbeOutcome {
        let master = device.backing.bus_master().unwrap();
        // Whatever this driver did to the device, the next one must not find it.
        device.backing.map_bar(0).unwrap().write32(0x14, 0xdead).unwrap();
        self.seen
            .lock()
            .push((self.name.to_string(), master, device.backing.resets()));
        if self.bind {
            ProbeOutcome::Bound(())
        } else {
            ProbeOutcome::NotMine
        }
    }
    fn remove(&mut self, _: (), _removal: &Removal) {}
}

#[test]
fn the_bus_turns_bus_mastering_on_and_resets_the_device_between_two_drivers() {
    let fake = qemu();
    let attach = FakeAttach::new();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let mut bus = Bus::new(map(&fake), attach.clone()).selection(allow(PF));
    for (name, bind) in [("picky", false), ("generic", true)] {
        bus.register(Box::new(Inspector {
            name,
            bind,
            seen: Arc::clone(&seen),
        }));
    }
    let reports = bus.probe_all();
    assert_eq!(bound(&reports), [(PF.to_string(), "generic".to_string())]);
    // Both probes find DMA on; the second finds the device reset after the first declined.
    assert_eq!(
        *seen.lock(),
        [("picky".to_string(), true, 0), ("generic".to_string(), true, 1)]
    );
}

#[test]
fn a_failed_probe_is_rolled_back_and_no_other_driver_is_tried() {
    let fake = qemu();
    let claims = tempfile::tempdir().unwrap();
    let attach = FakeAttach::new();
    let log = Log::default();
    let mut bus = Bus::new(map(&fake), attach.clone())
        .selection(allow(PF))
        .claim_dir(Some(ClaimDir::new(claims.path())));
    bus.register(Box::new(TestDriver::new("broken", Mode::Fail, &log)));
    bus.register(Box::new(TestDriver::new("generic", Mode::Bind, &log)));
    let reports = bus.probe_all();
    assert_eq!(reports.len(), 1);
    match &reports[0].result {
        Err(ProbeError::Failed { driver, error, .. }) => {
            assert_eq!(driver, "broken");
            assert_eq!(error.to_string(), "controller did not become ready");
        }
        other => panic!("{other:?}"),
    }
    // The report's text says why, not only that it failed; and a printer that follows
    // `source()` does not print the driver's message twice.
    let e = reports[0].result.as_ref().unwrap_err();
    assert_eq!(
        e.to_string(),
        format!("{PF}: driver broken failed to probe it: controller did not become ready")
    );
    assert!(std::error::Error::source(e).is_none());
    assert_eq!(*log.lock(), [format!("broken probe {PF}")]);
    // Closed with a rollback (the binding is undone whatever the policy), no handle left.
    assert_eq!(
        attach.calls(),
        [
            AttachCall::Attach(addr(PF)),
            AttachCall::Detach(addr(PF), Release::Rollback, 0)
        ]
    );
    // The claim is free again: another owner gets it.
    let dir = ClaimDir::new(claims.path());
    assert!(dir.list().unwrap().iter().all(|c| !c.live));
    dir.claim(addr(PF), &ClaimInfo::new()).unwrap();
    assert!(bus.held().is_empty());
}

#[test]
fn a_driver_that_keeps_the_device_after_failing_is_reported_and_the_device_stays_claimed() {
    let fake = qemu();
    let claims = tempfile::tempdir().unwrap();
    let attach = FakeAttach::new();
    let log = Log::default();
    let mut bus = Bus::new(map(&fake), attach.clone())
        .selection(allow(PF))
        .claim_dir(Some(ClaimDir::new(claims.path())));
    bus.register(Box::new(TestDriver::new("leaky", Mode::FailAndLeak, &log)));
    let reports = bus.probe_all();
    assert_eq!(reports[0].leaked, 1);
    // Still open: not rolled back yet (putting its driver back would wait for the
    // close), and still claimed.
    assert_eq!(attach.calls(), [AttachCall::Attach(addr(PF))]);
    assert_eq!(bus.releasing(), [(addr(PF), "leaky")]);
    let other = ClaimDir::new(claims.path());
    assert!(matches!(
        other.claim(addr(PF), &ClaimInfo::new()),
        Err(ClaimError::Held { .. })
    ));
    assert!(bus.probe_all().is_empty(), "not offered again meanwhile");

    bus.driver_mut::<TestDriver>().unwrap().leaked.clear();
    let events = bus.poll();
    let [BusEvent::Released(r)] = events.as_slice() else {
        panic!("{events:?}")
    };
    assert_eq!(
        (r.address, r.driver.as_str(), &r.cause),
        (addr(PF), "leaky", &None)
    );
    assert_eq!(
        attach.calls().last().unwrap(),
        &AttachCall::Detach(addr(PF), Release::Rollback, 0)
    );
    other.claim(addr(PF), &ClaimInfo::new()).unwrap();
}

#[test]
fn devargs_reach_the_driver_which_rejects_unknown_keys() {
    let fake = qemu();
    let log = Log::default();
    let selection = Selection::new(
        vec![
            DevArg::parse_allow("01:00.1,queues=4").unwrap(),
            DevArg::parse_allow("01:00.2,qeueus=4").unwrap(),
        ],
        vec![],
    )
    .unwrap();
    let mut bus = Bus::new(map(&fake), FakeAttach::new()).selection(selection);
    bus.register(Box::new(TestDriver::new("nvme-test", Mode::Bind, &log)));
    let reports = bus.probe_all();
    assert_eq!(reports.len(), 2, "the PF is not allow-listed");
    assert_eq!(reports[0].result.as_deref().unwrap(), "nvme-test");
    let err = reports[1].result.as_ref().unwrap_err();
    let text = err.to_string();
    assert!(text.contains("qeueus"), "{text}");
    assert!(text.contains("nvme-test"), "{text}");
}

#[test]
fn a_claim_held_elsewhere_refuses_the_device_naming_the_holder() {
    let fake = qemu();
    let claims = tempfile::tempdir().unwrap();
    let other = ClaimDir::new(claims.path());
    let _held = other
        .claim(addr(PF), &ClaimInfo::new().command("spdk_tgt"))
        .unwrap();
    let attach = FakeAttach::new();
    let log = Log::default();
    let mut bus = Bus::new(map(&fake), attach.clone())
        .selection(allow(PF))
        .claim_dir(Some(ClaimDir::new(claims.path())));
    bus.register(Box::new(TestDriver::new("nvme-test", Mode::Bind, &log)));
    let reports = bus.probe_all();
    match &reports[0].result {
        Err(ProbeError::Claim(ClaimError::Held { pid, command, .. })) => {
            assert_eq!(*pid, Some(std::process::id()));
            assert_eq!(command.as_deref(), Some("spdk_tgt"));
        }
        other => panic!("{other:?}"),
    }
    let text = reports[0].result.as_ref().unwrap_err().to_string();
    assert!(
        text.contains("spdk_tgt") && text.contains(&std::process::id().to_string()),
        "{text}"
    );
    // Never opened, never probed.
    assert!(attach.calls().is_empty());
    assert!(log.lock().is_empty());
}

#[test]
fn a_request_takes_the_device_back_through_the_claim_and_holds_it_off() {
    let fake = qemu();
    let claims = tempfile::tempdir().unwrap();
    let attach = FakeAttach::new();
    let log = Log::default();
    let mut driver = TestDriver::new("nvme-test", Mode::Bind, &log);
    driver.claims = Some(ClaimDir::new(claims.path()));
    let mut bus = Bus::new(map(&fake), attach.clone())
        .selection(allow(PF))
        .claim_dir(Some(ClaimDir::new(claims.path())));
    bus.register(Box::new(driver));
    bus.probe_all();
    assert!(bus.poll().is_empty(), "nothing fired yet");
    assert_eq!(
        bus.fds().len(),
        2,
        "the request eventfd and the error (AER) eventfd of the one held device"
    );

    assert!(attach.request_removal(addr(PF)));
    let events = bus.wait(None, Duration::from_secs(5)).unwrap();
    assert_eq!(events.len(), 1, "{events:?}");
    let BusEvent::Removed(r) = &events[0] else {
        panic!("{events:?}")
    };
    assert_eq!(
        (r.address, r.driver.as_str(), &r.cause),
        (addr(PF), "nvme-test", &RemovalCause::Request)
    );
    assert_eq!(r.leaked, 0);
    assert!(r.error.is_none());
    // The claim said so before the driver let go; the device was closed without restoring
    // its binding (the kernel's unbind or removal is waiting for the close).
    assert_eq!(
        log.lock().last().unwrap(),
        &format!("nvme-test remove {PF} (vfio removal request) claim says releasing")
    );
    assert_eq!(
        attach.calls().last().unwrap(),
        &AttachCall::Detach(addr(PF), Release::Removal, 0)
    );
    assert!(
        ClaimDir::new(claims.path())
            .list()
            .unwrap()
            .iter()
            .all(|c| !c.live)
    );
    assert!(
        !bus.map().scanner().removal_registry().is_pending(addr(PF)),
        "the mark goes once the device is closed"
    );
    // Still present (an operator's unbind): not taken again behind the operator's back.
    assert!(bus.probe_all().is_empty());
}

fn uevent(action: Action, address: &str) -> Event {
    uevent_seq(action, address, 7)
}

fn uevent_seq(action: Action, address: &str, seqnum: u64) -> Event {
    let devpath = format!("/devices/pci0000:00/0000:00:01.0/{address}");
    let vars = vec![
        ("ACTION".to_string(), action.as_str().to_string()),
        ("DEVPATH".to_string(), devpath.clone()),
        ("SUBSYSTEM".to_string(), "pci".to_string()),
        ("PCI_SLOT_NAME".to_string(), address.to_string()),
        ("SEQNUM".to_string(), seqnum.to_string()),
    ];
    Event::Uevent(Uevent::from_vars(action, devpath, vars).unwrap())
}

#[test]
fn an_allow_listed_device_unplugged_and_replugged_is_probed_again_after_settling() {
    let fake = qemu();
    let attach = FakeAttach::new();
    let log = Log::default();
    let mut bus = Bus::new(map(&fake), attach.clone())
        .selection(allow(VF1))
        .settle(Duration::from_millis(300));
    bus.register(Box::new(TestDriver::new("nvme-test", Mode::Bind, &log)));
    assert_eq!(bus.probe_all().len(), 1);

    // Unplugged: the uevent takes it back.
    let dir = fake.root().join(fake.device_dir(VF1).unwrap());
    let link = fake.root().join("bus/pci/devices").join(VF1);
    let target = std::fs::read_link(&link).unwrap();
    let away = fake.root().join("unplugged");
    std::fs::rename(&dir, &away).unwrap();
    std::fs::remove_file(&link).unwrap();
    let events = bus.handle(&uevent(Action::Remove, VF1)).unwrap();
    assert!(
        matches!(events[0], BusEvent::Map(Change::Removed(a)) if a == addr(VF1)),
        "{events:?}"
    );
    let BusEvent::Removed(r) = &events[1] else {
        panic!("{events:?}")
    };
    assert_eq!(r.cause, RemovalCause::Uevent(Action::Remove));
    assert!(bus.held().is_empty());

    // Plugged back: read alone, offered once it settled.
    std::fs::rename(&away, &dir).unwrap();
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let events = bus.handle(&uevent(Action::Add, VF1)).unwrap();
    assert!(
        matches!(events[..], [BusEvent::Map(Change::Added(a))] if a == addr(VF1)),
        "{events:?}"
    );
    assert!(bus.poll().is_empty(), "still settling");
    assert!(bus.next_deadline().is_some());
    let start = std::time::Instant::now();
    let mut events = Vec::new();
    while events.is_empty() && start.elapsed() < Duration::from_secs(5) {
        events = bus.wait(None, Duration::from_secs(5)).unwrap();
    }
    assert!(
        start.elapsed() >= Duration::from_millis(250),
        "probed before settling"
    );
    let BusEvent::Probed(p) = &events[0] else {
        panic!("{events:?}")
    };
    assert_eq!(
        (p.address, p.result.as_deref().unwrap()),
        (addr(VF1), "nvme-test")
    );
    assert_eq!(
        *log.lock(),
        [
            format!("nvme-test probe {VF1}"),
            format!("nvme-test remove {VF1} (remove uevent)"),
            format!("nvme-test probe {VF1}"),
        ]
    );
    // A device the selection does not admit is never scheduled.
    bus.handle(&uevent(Action::Add, VF2)).unwrap();
    assert_eq!(bus.next_deadline(), None);
}

/// FakeAttach that, like VfioAttach, counts a device as attached only while it is on
/// vfio-pci.
struct OnVfioPci(FakeAttach);

impl pcibus::bus::Attach for OnVfioPci {
    type Backing = FakeBacking;
    fn attach(
        &mut self,
        record: &pcibus::DeviceRecord,
    ) -> Result<pcibus::bus::Attached<FakeBacking>, pcibus::bus::AttachError> {
        self.0.attach(record)
    }
    fn detach(
        &mut self,
        attached: pcibus::bus::Attached<FakeBacking>,
        release: Release,
    ) -> Result<(), pcibus::bus::AttachError> {
        self.0.detach(attached, release)
    }
    fn still_attached(&self, record: &pcibus::DeviceRecord) -> bool {
        record.driver.as_deref() == Some("vfio-pci")
    }
}

/// FakeAttach that also does to the fake tree what `VfioAttach` with `BindPolicy::bind`
/// does to the kernel's: attach sets `driver_override` to vfio-pci and moves the device's
/// `driver` link there; a rollback or an orderly release moves the link back and clears
/// `driver_override`.
struct Rebinding {
    inner: FakeAttach,
    root: std::path::PathBuf,
    previous: BTreeMap<PciAddress, std::path::PathBuf>,
}

impl Rebinding {
    fn new(fake: &FakeSysfs, inner: FakeAttach) -> Self {
        std::fs::create_dir_all(fake.root().join("bus/pci/drivers/vfio-pci")).unwrap();
        Rebinding {
            inner,
            root: fake.root().to_owned(),
            previous: BTreeMap::new(),
        }
    }

    fn dir(&self, address: PciAddress) -> std::path::PathBuf {
        self.root.join("bus/pci/devices").join(address.to_string())
    }

    fn relink(&self, address: PciAddress, target: &Path, driver_override: &str) {
        let link = self.dir(address).join("driver");
        std::fs::remove_file(&link).unwrap();
        std::os::unix::fs::symlink(target, &link).unwrap();
        std::fs::write(self.dir(address).join("driver_override"), driver_override).unwrap();
    }
}

impl pcibus::bus::Attach for Rebinding {
    type Backing = FakeBacking;
    fn attach(
        &mut self,
        record: &pcibus::DeviceRecord,
    ) -> Result<pcibus::bus::Attached<FakeBacking>, pcibus::bus::AttachError> {
        let address = record.address;
        let previous = std::fs::read_link(self.dir(address).join("driver")).unwrap();
        let vfio = self.root.join("bus/pci/drivers/vfio-pci");
        self.relink(address, &vfio, "vfio-pci\n");
        self.previous.insert(address, previous);
        self.inner.attach(record)
    }
    fn detach(
        &mut self,
        attached: pcibus::bus::Attached<FakeBacking>,
        release: Release,
    ) -> Result<(), pcibus::bus::AttachError> {
        let address = attached.backing.address();
        if let Some(previous) = self.previous.remove(&address)
            && release != Release::Removal
        {
            self.relink(address, &previous, "(null)\n");
        }
        self.inner.detach(attached, release)
    }
}

fn driver_of(fake: &FakeSysfs, address: &str) -> (String, String) {
    let dir = fake.root().join("bus/pci/devices").join(address);
    let link = std::fs::read_link(dir.join("driver")).unwrap();
    let driver = link.file_name().unwrap().to_string_lossy().into_owned();
    let driver_override = std::fs::read_to_string(dir.join("driver_override")).unwrap();
    (driver, driver_override.trim_end().to_owned())
}

#[test]
fn a_probe_that_panics_is_a_failure_and_is_rolled_back() {
    let fake = qemu();
    let claims = tempfile::tempdir().unwrap();
    let attach = FakeAttach::new();
    let log = Log::default();
    let mut bus = Bus::new(map(&fake), Rebinding::new(&fake, attach.clone()))
        .selection(allow(PF))
        .claim_dir(Some(ClaimDir::new(claims.path())));
    bus.register(Box::new(TestDriver::new("panicky", Mode::PanicInProbe, &log)));
    bus.register(Box::new(TestDriver::new("generic", Mode::Bind, &log)));
    let reports = bus.probe_all();
    let [report] = reports.as_slice() else {
        panic!("{reports:?}")
    };
    match &report.result {
        Err(ProbeError::Failed { driver, error, .. }) => {
            assert_eq!(driver, "panicky");
            let panicked = error.downcast_ref::<DriverPanicked>().unwrap();
            assert_eq!(
                (panicked.callback, panicked.message.as_str()),
                ("probe", "probe of 0000:01:00.0 went wrong")
            );
        }
        other => panic!("{other:?}"),
    }
    // A failure: no other driver is tried, and everything is undone.
    assert_eq!(*log.lock(), [format!("panicky probe {PF}")]);
    assert_eq!(report.leaked, 0, "the unwinding dropped the BAR");
    assert_eq!(
        attach.calls(),
        [
            AttachCall::Attach(addr(PF)),
            AttachCall::Detach(addr(PF), Release::Rollback, 0)
        ]
    );
    assert_eq!(driver_of(&fake, PF), ("nvme".into(), "(null)".into()));
    assert!(bus.held().is_empty());
    assert!(!bus.map().scanner().removal_registry().is_pending(addr(PF)));
    ClaimDir::new(claims.path())
        .claim(addr(PF), &ClaimInfo::new())
        .unwrap();
}

#[test]
fn a_remove_that_panics_still_closes_releases_and_unmarks_the_device() {
    let fake = qemu();
    let claims = tempfile::tempdir().unwrap();
    let attach = FakeAttach::new();
    let log = Log::default();
    let mut bus = Bus::new(map(&fake), attach.clone())
        .selection(allow(PF))
        .claim_dir(Some(ClaimDir::new(claims.path())));
    bus.register(Box::new(TestDriver::new("panicky", Mode::PanicInRemove, &log)));
    bus.probe_all();
    assert!(attach.request_removal(addr(PF)));
    let events = bus.wait(None, Duration::from_secs(5)).unwrap();
    let [BusEvent::Removed(r)] = events.as_slice() else {
        panic!("{events:?}")
    };
    assert_eq!((&r.cause, r.leaked), (&RemovalCause::Request, 0));
    assert_eq!(
        r.panicked.as_ref().map(|p| p.to_string()).as_deref(),
        Some("remove panicked: remove of 0000:01:00.0 went wrong")
    );
    assert_eq!(
        attach.calls().last().unwrap(),
        &AttachCall::Detach(addr(PF), Release::Removal, 0)
    );
    assert!(bus.held().is_empty());
    assert!(!bus.map().scanner().removal_registry().is_pending(addr(PF)));
    // A later scan does not take the device for one being removed.
    let scan = bus.map().scanner().scan().unwrap();
    assert!(!scan.get(addr(PF)).unwrap().removal_pending);
    ClaimDir::new(claims.path())
        .claim(addr(PF), &ClaimInfo::new())
        .unwrap();
}

#[test]
fn a_bus_dropped_while_a_panic_unwinds_releases_its_devices_without_aborting() {
    let fake = qemu();
    let claims = tempfile::tempdir().unwrap();
    let attach = FakeAttach::new();
    let log = Log::default();
    let mut bus = Bus::new(map(&fake), attach.clone())
        .selection(allow(PF))
        .claim_dir(Some(ClaimDir::new(claims.path())));
    bus.register(Box::new(TestDriver::new("panicky", Mode::PanicInRemove, &log)));
    assert_eq!(bus.probe_all().len(), 1);
    // The application fails while it holds the bus; the unwinding drops the bus, whose
    // driver panics again in `remove`. That must not abort the process.
    let joined = std::thread::spawn(move || {
        let _bus = bus;
        panic!("the application failed");
    })
    .join();
    let payload = joined.unwrap_err();
    assert_eq!(payload.downcast_ref::<&str>(), Some(&"the application failed"));
    assert_eq!(
        attach.calls().last().unwrap(),
        &AttachCall::Detach(addr(PF), Release::Orderly, 0)
    );
    ClaimDir::new(claims.path())
        .claim(addr(PF), &ClaimInfo::new())
        .unwrap();
}

#[test]
fn an_unbind_queued_by_the_attach_itself_is_not_taken_for_news() {
    // The bus attached PF (bound it to vfio-pci: the kernel queued an `unbind` from nvme
    // and a `bind`); before it reads them, a removal starts and the `driver` link goes.
    // The stale unbind must not take the device back (the removal request will, as a
    // request); an unbind sent after the attach does.
    let fake = qemu();
    std::fs::create_dir_all(fake.root().join("kernel")).unwrap();
    std::fs::write(fake.root().join("kernel/uevent_seqnum"), "50\n").unwrap();
    let vfio = fake.root().join("bus/pci/drivers/vfio-pci");
    std::fs::create_dir_all(&vfio).unwrap();
    let driver_link = fake.root().join(fake.device_dir(PF).unwrap()).join("driver");
    std::fs::remove_file(&driver_link).unwrap();
    std::os::unix::fs::symlink(&vfio, &driver_link).unwrap();
    let attach = FakeAttach::new();
    let log = Log::default();
    let mut bus = Bus::new(map(&fake), OnVfioPci(attach.clone())).selection(allow(PF));
    bus.register(Box::new(TestDriver::new("nvme-test", Mode::Bind, &log)));
    assert_eq!(
        bound(&bus.probe_all()),
        [(PF.to_string(), "nvme-test".to_string())]
    );

    std::fs::remove_file(&driver_link).unwrap();
    let events = bus.handle(&uevent_seq(Action::Unbind, PF, 49)).unwrap();
    assert!(
        !events.iter().any(|e| matches!(e, BusEvent::Removed(_))),
        "{events:?}"
    );
    assert_eq!(bus.held().len(), 1, "still held: the unbind predates the attach");

    let events = bus.handle(&uevent_seq(Action::Unbind, PF, 51)).unwrap();
    let Some(BusEvent::Removed(r)) = events.iter().find(|e| matches!(e, BusEvent::Removed(_))) else {
        panic!("{events:?}")
    };
    assert_eq!(r.cause, RemovalCause::Uevent(Action::Unbind));
    assert!(bus.held().is_empty());
}

#[test]
fn dropping_the_bus_detaches_every_device_in_order() {
    let fake = qemu();
    let attach = FakeAttach::new();
    let log = Log::default();
    let mut bus = Bus::new(map(&fake), attach.clone());
    bus.register(Box::new(TestDriver::new("nvme-test", Mode::Bind, &log)));
    bus.probe_all();
    let r = bus.detach(addr(VF2)).unwrap();
    assert_eq!(r.cause, RemovalCause::Detach);
    assert!(bus.detach(addr(VF2)).is_err(), "not held any more");
    drop(bus);
    let detaches: Vec<AttachCall> = attach
        .calls()
        .into_iter()
        .filter(|c| matches!(c, AttachCall::Detach(..)))
        .collect();
    assert_eq!(
        detaches,
        [VF2, PF, VF1].map(|a| AttachCall::Detach(addr(a), Release::Orderly, 0))
    );
}

#[test]
fn a_driver_that_asks_gets_its_devices_again() {
    let fake = qemu();
    let log = Log::default();
    let mut driver = TestDriver::new("nvme-test", Mode::Bind, &log);
    driver.again = true;
    let mut bus = Bus::new(map(&fake), FakeAttach::new()).selection(allow(PF));
    bus.register(Box::new(driver));
    bus.probe_all();
    bus.probe_all();
    assert_eq!(
        *log.lock(),
        [
            format!("nvme-test probe {PF}"),
            format!("nvme-test probe {PF} again")
        ]
    );
    assert_eq!(bus.device_states::<TestDriver>().count(), 1);
}

#[test]
fn a_failed_attach_is_reported_and_leaves_nothing() {
    let fake = qemu();
    let attach = FakeAttach::new();
    attach.refuse(addr(PF), "group 7 is not viable");
    let log = Log::default();
    let mut bus = Bus::new(map(&fake), attach.clone()).selection(allow(PF));
    bus.register(Box::new(TestDriver::new("nvme-test", Mode::Bind, &log)));
    let reports = bus.probe_all();
    let text = reports[0].result.as_ref().unwrap_err().to_string();
    assert!(text.contains("group 7 is not viable"), "{text}");
    assert!(log.lock().is_empty());
}

#[test]
fn a_device_whose_driver_kept_a_handle_stays_claimed_and_releasing_until_it_is_closed() {
    let fake = qemu();
    let claims = tempfile::tempdir().unwrap();
    let attach = FakeAttach::new();
    // A backing that can be revoked is closed under the kept handles instead
    // (tests/device_state.rs).
    attach.irrevocable();
    let log = Log::default();
    let mut bus = Bus::new(map(&fake), attach.clone())
        .selection(allow(PF))
        .claim_dir(Some(ClaimDir::new(claims.path())));
    bus.register(Box::new(TestDriver::new("leaky", Mode::LeakOnRemove, &log)));
    bus.probe_all();
    let registry = bus.map().scanner().removal_registry().clone();

    assert!(attach.request_removal(addr(PF)));
    let events = bus.wait(None, Duration::from_secs(5)).unwrap();
    let [BusEvent::Removed(r)] = events.as_slice() else {
        panic!("{events:?}")
    };
    assert_eq!((&r.cause, r.leaked), (&RemovalCause::Request, 1));

    // The kept BAR keeps the device open, so the kernel's removal still waits: another
    // process must still see it claimed and releasing, and scans must keep away from it.
    let other = ClaimDir::new(claims.path());
    match other.claim(addr(PF), &ClaimInfo::new()) {
        Err(ClaimError::Held { releasing, .. }) => {
            assert_eq!(releasing.as_deref(), Some("vfio removal request"))
        }
        other => panic!("{other:?}"),
    }
    assert!(registry.is_pending(addr(PF)));
    // Not closed (the REQ eventfd stays registered), not offered to a driver again.
    assert!(
        !attach.calls().iter().any(|c| matches!(c, AttachCall::Detach(..))),
        "{:?}",
        attach.calls()
    );
    assert!(bus.probe(addr(PF)).is_none());
    assert!(bus.poll().is_empty(), "still kept");
    assert_eq!(bus.releasing(), [(addr(PF), "leaky")]);
    assert!(bus.held().is_empty());
    assert!(bus.next_deadline().is_some(), "wait wakes up to look again");

    // The driver lets go: the next poll closes the device and ends the release.
    bus.driver_mut::<TestDriver>().unwrap().leaked.clear();
    let events = bus.poll();
    let [BusEvent::Released(r)] = events.as_slice() else {
        panic!("{events:?}")
    };
    assert_eq!(
        (r.address, r.driver.as_str(), &r.cause),
        (addr(PF), "leaky", &Some(RemovalCause::Request))
    );
    assert!(r.error.is_none());
    assert_eq!(
        attach.calls().last().unwrap(),
        &AttachCall::Detach(addr(PF), Release::Removal, 0)
    );
    assert!(!registry.is_pending(addr(PF)));
    other.claim(addr(PF), &ClaimInfo::new()).unwrap();
    assert!(bus.releasing().is_empty());
    assert_eq!(bus.next_deadline(), None);
}

#[test]
fn a_detach_while_the_driver_keeps_a_handle_restores_nothing_until_it_is_closed() {
    let fake = qemu();
    let claims = tempfile::tempdir().unwrap();
    let attach = FakeAttach::new();
    // A backing that can be revoked is closed under the kept handles once the kernel
    // asks for it (tests/device_state.rs).
    attach.irrevocable();
    let log = Log::default();
    let mut bus = Bus::new(map(&fake), attach.clone())
        .selection(allow(PF))
        .claim_dir(Some(ClaimDir::new(claims.path())));
    bus.register(Box::new(TestDriver::new("leaky", Mode::LeakOnRemove, &log)));
    bus.probe_all();
    let r = bus.detach(addr(PF)).unwrap();
    assert_eq!(r.leaked, 1);
    // Still open: restoring the previous driver now would wait for the close. The claim
    // stays, and says "active": nothing is being removed.
    assert_eq!(attach.calls(), [AttachCall::Attach(addr(PF))]);
    match ClaimDir::new(claims.path()).claim(addr(PF), &ClaimInfo::new()) {
        Err(ClaimError::Held { releasing, .. }) => assert_eq!(releasing, None),
        other => panic!("{other:?}"),
    }
    assert!(!bus.map().scanner().removal_registry().is_pending(addr(PF)));

    // The kernel asks for it meanwhile: from now on it is a removal (said in the claim
    // and the registry; the binding is left alone when it closes).
    assert!(attach.request_removal(addr(PF)));
    assert!(bus.poll().is_empty());
    assert!(bus.map().scanner().removal_registry().is_pending(addr(PF)));
    match ClaimDir::new(claims.path()).claim(addr(PF), &ClaimInfo::new()) {
        Err(ClaimError::Held { releasing, .. }) => {
            assert_eq!(releasing.as_deref(), Some("vfio removal request"))
        }
        other => panic!("{other:?}"),
    }
    bus.driver_mut::<TestDriver>().unwrap().leaked.clear();
    // Dropping the bus looks at it one last time.
    drop(bus);
    assert_eq!(
        attach.calls().last().unwrap(),
        &AttachCall::Detach(addr(PF), Release::Removal, 0)
    );
    ClaimDir::new(claims.path())
        .claim(addr(PF), &ClaimInfo::new())
        .unwrap();
}

#[test]
fn a_handle_that_outlives_the_bus_keeps_the_claim() {
    let fake = qemu();
    let claims = tempfile::tempdir().unwrap();
    let attach = FakeAttach::new();
    let log = Log::default();
    let mut bus = Bus::new(map(&fake), attach.clone())
        .selection(allow(PF))
        .claim_dir(Some(ClaimDir::new(claims.path())));
    bus.register(Box::new(TestDriver::new("nvme-test", Mode::Bind, &log)));
    bus.probe_all();
    // Something of the application's keeps the device open past the bus.
    let kept = attach.device(addr(PF)).unwrap();
    drop(bus);
    let other = ClaimDir::new(claims.path());
    assert!(
        matches!(
            other.claim(addr(PF), &ClaimInfo::new()),
            Err(ClaimError::Held { .. })
        ),
        "claimable while the device is open"
    );
    // Never closed by the bus: it is the application's handle that closes it.
    assert_eq!(attach.calls(), [AttachCall::Attach(addr(PF))]);
    drop(kept);
    // The claim was leaked on purpose: it stays until the process exits.
    assert!(matches!(
        other.claim(addr(PF), &ClaimInfo::new()),
        Err(ClaimError::Held { .. })
    ));
}

#[test]
fn the_claim_names_the_driver_that_bound_the_device() {
    let fake = qemu();
    let claims = tempfile::tempdir().unwrap();
    let log = Log::default();
    let mut bus = Bus::new(map(&fake), FakeAttach::new())
        .selection(allow(PF))
        .claim_dir(Some(ClaimDir::new(claims.path())));
    bus.register(Box::new(TestDriver::new("picky", Mode::Decline, &log)));
    bus.register(Box::new(TestDriver::new("generic", Mode::Bind, &log)));
    assert_eq!(bound(&bus.probe_all()), [(PF.to_string(), "generic".to_string())]);
    let listed = ClaimDir::new(claims.path()).list().unwrap();
    let [claim] = listed.as_slice() else {
        panic!("{listed:?}")
    };
    assert_eq!(
        (claim.address, claim.live, claim.driver.as_deref()),
        (addr(PF), true, Some("generic"))
    );
}

#[test]
fn a_device_on_a_vfio_variant_driver_is_on_vfio() {
    use pcibus::bus::{Attach, AttachError, BindPolicy, VfioAttach};
    let fake = FakeSysfs::new().unwrap();
    // No IOMMU group: opening it fails before anything of this machine's /dev is used.
    fake.device("0000:05:00.0")
        .class(0x010802)
        .driver("nvme_vfio_pci")
        .create()
        .unwrap();
    fake.device("0000:06:00.0")
        .class(0x010802)
        .driver("mlx5_vfio_pci")
        .iommu_group(9)
        .create()
        .unwrap();
    fake.device("0000:06:00.1")
        .class(0x020000)
        .driver("mlx5_core")
        .iommu_group(9)
        .create()
        .unwrap();
    // A variant whose name says nothing: its vfio-dev/ directory does.
    let accel = fake
        .device("0000:07:00.0")
        .class(0x120000)
        .driver("acme")
        .create()
        .unwrap();
    std::fs::create_dir_all(accel.join("vfio-dev/vfio3")).unwrap();
    let map = map(&fake);
    let root = SysfsRoot::new(fake.root());
    let mut attach = VfioAttach::new(
        root.clone(),
        BindPolicy {
            bind: true,
            ..BindPolicy::default()
        },
    );
    for (address, on_vfio) in [
        ("0000:05:00.0", true),
        ("0000:06:00.0", true),
        ("0000:06:00.1", false),
        ("0000:07:00.0", true),
    ] {
        let record = map.get(addr(address)).unwrap();
        assert_eq!(attach.still_attached(record), on_vfio, "{address}");
    }
    // Opened where it is, not bound to vfio-pci.
    let record = map.get(addr("0000:05:00.0")).unwrap();
    let err = attach.attach(record).unwrap_err();
    assert!(matches!(err, AttachError::Vfio(_)), "{err}");
    assert_eq!(
        driver_of(&fake, "0000:05:00.0"),
        ("nvme_vfio_pci".into(), "(null)".into())
    );
    // Only the member on a driver of the host keeps group 9 from being usable.
    assert_eq!(
        pcibus::vfio::non_vfio_members(&root, 9),
        [("0000:06:00.1".to_owned(), Some("mlx5_core".to_owned()))]
    );
}

#[test]
fn a_synthetic_remove_uevent_does_not_take_a_present_device_from_its_driver() {
    // Issue 14 §3: root's `echo remove > .../uevent` sends a `remove` (with SYNTH_UUID)
    // for a device that stays.
    let fake = qemu();
    let attach = FakeAttach::new();
    let log = Log::default();
    let mut bus = Bus::new(map(&fake), attach.clone()).selection(allow(VF1));
    bus.register(Box::new(TestDriver::new("nvme-test", Mode::Bind, &log)));
    assert_eq!(bus.probe_all().len(), 1);
    let Event::Uevent(mut u) = uevent(Action::Remove, VF1) else {
        unreachable!()
    };
    let mut vars: Vec<(String, String)> = ["ACTION", "DEVPATH", "SUBSYSTEM", "PCI_SLOT_NAME", "SEQNUM"]
        .into_iter()
        .map(|k| (k.to_string(), u.var(k).unwrap().to_string()))
        .collect();
    vars.push(("SYNTH_UUID".into(), "0".into()));
    u = Uevent::from_vars(Action::Remove, u.devpath.clone(), vars).unwrap();
    let events = bus.handle(&Event::Uevent(u)).unwrap();
    assert!(events.is_empty(), "{events:?}");
    assert_eq!(bus.held().len(), 1);
    assert_eq!(*log.lock(), [format!("nvme-test probe {VF1}")]);
}

#[test]
fn a_device_held_off_after_a_request_and_hot_swapped_unseen_is_offered_again() {
    // Issue 14 §3: the uevents of the swap were lost (an overflow); the new device has
    // the same ids and address, only its incarnation tells it apart.
    let fake = qemu();
    let attach = FakeAttach::new();
    let log = Log::default();
    let mut bus = Bus::new(map(&fake), attach.clone())
        .selection(allow(PF))
        .settle(Duration::ZERO);
    bus.register(Box::new(TestDriver::new("nvme-test", Mode::Bind, &log)));
    assert_eq!(bus.probe_all().len(), 1);
    assert!(attach.request_removal(addr(PF)));
    let events = bus.wait(None, Duration::from_secs(5)).unwrap();
    assert!(matches!(events[..], [BusEvent::Removed(_)]), "{events:?}");
    assert!(bus.probe_all().is_empty(), "held off while it is the same device");

    // Swapped: a new directory with the same contents.
    swap_unseen(&fake, PF);
    let events = bus.handle(&Event::Overflow).unwrap();
    let Some(BusEvent::Resynced(changes)) = events.last() else {
        panic!("{events:?}")
    };
    assert!(
        changes.iter().any(|c| c.address() == Some(addr(PF))),
        "the swap is a change: {changes:?}"
    );
    let mut probed = Vec::new();
    let start = std::time::Instant::now();
    while probed.is_empty() && start.elapsed() < Duration::from_secs(5) {
        probed = bus.wait(None, Duration::from_millis(100)).unwrap();
    }
    assert!(
        matches!(&probed[..], [BusEvent::Probed(p)] if p.address == addr(PF)),
        "{probed:?}"
    );
}

#[test]
fn a_request_is_answered_while_the_same_driver_probes_another_device_for_seconds() {
    // Issue 14 §4: a bring-up takes seconds (a controller that never gets ready takes
    // CAP.TO, up to 127.5 s); the kernel's removal of another device must not wait for it.
    let fake = qemu();
    let claims = tempfile::tempdir().unwrap();
    let attach = FakeAttach::new();
    let log = Log::default();
    let mut bus = Bus::new(map(&fake), attach.clone()).claim_dir(Some(ClaimDir::new(claims.path())));
    bus.register(Box::new(TestDriver::new("nvme-test", Mode::Bind, &log)));
    assert_eq!(bus.probe(addr(VF1)).unwrap().result.unwrap(), "nvme-test");
    let registry = bus.map().scanner().removal_registry().clone();
    let (started, release) = slow(bus.driver_mut::<TestDriver>().unwrap(), VF2, false);
    let probing = std::thread::spawn(move || {
        let report = bus.probe(addr(VF2));
        (bus, report)
    });
    started.recv_timeout(Duration::from_secs(5)).unwrap();

    assert!(attach.request_removal(addr(VF1)));
    // Closed, its mark and claim gone (in that order, so wait for the last).
    let free = || released(&attach, &registry, claims.path(), VF1);
    assert!(
        within(Duration::from_secs(2), free),
        "VF1 not released within 2 s of its request: {:?}",
        attach.calls()
    );
    assert!(!probing.is_finished(), "VF2's probe goes on");

    release.send(()).unwrap();
    let (mut bus, report) = probing.join().unwrap();
    assert_eq!(report.unwrap().result.unwrap(), "nvme-test");
    assert_eq!(bus.held(), [(addr(VF2), "nvme-test")]);
    // The driver's handles of VF1 were revoked under it, and it hears of the removal once
    // its probe is over.
    assert_eq!(
        log.lock()[1..],
        [
            format!("nvme-test probe {VF2}"),
            format!("nvme-test probe {VF2} done"),
            format!("nvme-test remove {VF1} (vfio removal request) revoked"),
        ]
    );
    // The report of the removal comes with the next poll.
    let events = bus.poll();
    let [BusEvent::Removed(r)] = events.as_slice() else {
        panic!("{events:?}")
    };
    assert_eq!(
        (r.address, &r.cause, r.revoked, r.leaked),
        (addr(VF1), &RemovalCause::Request, true, 0)
    );
    assert!(
        bus.probe_all().iter().all(|r| r.address != addr(VF1)),
        "held off as after any request"
    );
}

#[test]
fn a_request_for_the_device_being_probed_is_answered_without_waiting_for_the_probe() {
    let fake = qemu();
    let claims = tempfile::tempdir().unwrap();
    let attach = FakeAttach::new();
    let log = Log::default();
    let mut bus = Bus::new(map(&fake), attach.clone())
        .selection(allow(PF))
        .claim_dir(Some(ClaimDir::new(claims.path())));
    bus.register(Box::new(TestDriver::new("nvme-test", Mode::Bind, &log)));
    let registry = bus.map().scanner().removal_registry().clone();
    let (started, release) = slow(bus.driver_mut::<TestDriver>().unwrap(), PF, false);
    let probing = std::thread::spawn(move || {
        let reports = bus.probe_all();
        (bus, reports)
    });
    started.recv_timeout(Duration::from_secs(5)).unwrap();

    assert!(attach.request_removal(addr(PF)));
    // Closed, its mark and claim gone (in that order, so wait for the last).
    let free = || released(&attach, &registry, claims.path(), PF);
    assert!(
        within(Duration::from_secs(2), free),
        "PF not released within 2 s of its request: {:?}",
        attach.calls()
    );
    assert!(!probing.is_finished(), "the probe goes on");

    release.send(()).unwrap();
    let (mut bus, reports) = probing.join().unwrap();
    let [report] = reports.as_slice() else {
        panic!("{reports:?}")
    };
    match &report.result {
        Err(ProbeError::Removed { driver, cause, .. }) => {
            assert_eq!((driver.as_str(), cause), ("nvme-test", &RemovalCause::Request))
        }
        other => panic!("{other:?}"),
    }
    // The driver bound it, and was told at once that it is gone.
    assert!(bus.held().is_empty());
    assert!(bus.releasing().is_empty());
    assert!(bus.poll().is_empty());
    assert_eq!(
        *log.lock(),
        [
            format!("nvme-test probe {PF}"),
            format!("nvme-test probe {PF} done"),
            format!("nvme-test remove {PF} (vfio removal request) revoked"),
        ]
    );
    assert!(bus.probe_all().is_empty(), "held off as after any request");
}

#[test]
fn a_probe_that_watches_ends_early_when_its_device_is_taken_back_and_cannot_be_revoked() {
    // Without revoke, the device closes only when the probe lets go of it: a probe that
    // looks at `removal_requested` while it waits bounds that.
    let fake = qemu();
    let claims = tempfile::tempdir().unwrap();
    let attach = FakeAttach::new();
    attach.irrevocable();
    let log = Log::default();
    let mut bus = Bus::new(map(&fake), attach.clone())
        .selection(allow(PF))
        .claim_dir(Some(ClaimDir::new(claims.path())));
    bus.register(Box::new(TestDriver::new("nvme-test", Mode::Bind, &log)));
    let (started, _release) = slow(bus.driver_mut::<TestDriver>().unwrap(), PF, true);
    let probing = std::thread::spawn(move || {
        let reports = bus.probe_all();
        (bus, reports)
    });
    started.recv_timeout(Duration::from_secs(5)).unwrap();

    assert!(attach.request_removal(addr(PF)));
    assert!(
        within(Duration::from_secs(2), || closed(&attach, PF)),
        "PF not closed within 2 s of its request: {:?}",
        attach.calls()
    );
    let (mut bus, reports) = probing.join().unwrap();
    assert!(
        matches!(&reports[..], [r] if matches!(r.result, Err(ProbeError::Removed { .. })) && r.leaked == 0),
        "{reports:?}"
    );
    assert_eq!(
        *log.lock(),
        [
            format!("nvme-test probe {PF}"),
            format!("nvme-test probe {PF} sees it taken back"),
        ]
    );
    // Closed as a removal (its binding left alone), claim and mark gone.
    assert_eq!(
        attach.calls(),
        [
            AttachCall::Attach(addr(PF)),
            AttachCall::Detach(addr(PF), Release::Removal, 0)
        ]
    );
    assert!(!bus.map().scanner().removal_registry().is_pending(addr(PF)));
    ClaimDir::new(claims.path())
        .claim(addr(PF), &ClaimInfo::new())
        .unwrap();
    assert!(bus.poll().is_empty());
}

#[test]
fn without_revoke_a_request_during_another_probe_marks_the_device_at_once_and_closes_it_after() {
    // The documented limit: a device the bus cannot close under its driver's handles
    // waits for that driver's probe of another device; meanwhile the claim and the
    // registry say it is going, so that scans keep away from it.
    let fake = qemu();
    let claims = tempfile::tempdir().unwrap();
    let attach = FakeAttach::new();
    attach.irrevocable();
    let log = Log::default();
    let mut bus = Bus::new(map(&fake), attach.clone()).claim_dir(Some(ClaimDir::new(claims.path())));
    bus.register(Box::new(TestDriver::new("nvme-test", Mode::Bind, &log)));
    assert!(bus.probe(addr(VF1)).is_some());
    let registry = bus.map().scanner().removal_registry().clone();
    let (started, release) = slow(bus.driver_mut::<TestDriver>().unwrap(), VF2, false);
    let probing = std::thread::spawn(move || {
        let report = bus.probe(addr(VF2));
        (bus, report)
    });
    started.recv_timeout(Duration::from_secs(5)).unwrap();

    assert!(attach.request_removal(addr(VF1)));
    assert!(
        within(Duration::from_secs(2), || registry.is_pending(addr(VF1))),
        "VF1 not marked within 2 s of its request"
    );
    match ClaimDir::new(claims.path()).claim(addr(VF1), &ClaimInfo::new()) {
        Err(ClaimError::Held { releasing, .. }) => {
            assert_eq!(releasing.as_deref(), Some("vfio removal request"))
        }
        other => panic!("{other:?}"),
    }
    assert!(!closed(&attach, VF1), "open while the driver holds it");
    // The kernel asks again meanwhile: nothing more to do.
    assert!(attach.request_removal(addr(VF1)));
    std::thread::sleep(Duration::from_millis(50));

    release.send(()).unwrap();
    let (mut bus, report) = probing.join().unwrap();
    assert_eq!(report.unwrap().result.unwrap(), "nvme-test");
    assert!(closed(&attach, VF1));
    assert!(!registry.is_pending(addr(VF1)));
    let events = bus.poll();
    let [BusEvent::Removed(r)] = events.as_slice() else {
        panic!("{events:?}")
    };
    assert_eq!(
        (r.address, &r.cause, r.revoked, r.leaked),
        (addr(VF1), &RemovalCause::Request, false, 0)
    );
    assert_eq!(
        log.lock()[1..],
        [
            format!("nvme-test probe {VF2}"),
            format!("nvme-test probe {VF2} done"),
            format!("nvme-test remove {VF1} (vfio removal request)"),
        ]
    );
    assert_eq!(bus.held(), [(addr(VF2), "nvme-test")]);
}

#[test]
fn a_request_for_a_device_of_another_driver_is_answered_by_its_driver_during_a_probe() {
    let fake = qemu();
    let attach = FakeAttach::new();
    let log = Log::default();
    let mut bus = Bus::new(map(&fake), attach.clone());
    bus.register(Box::new(TestDriver::new("first", Mode::Bind, &log)));
    let mut second = TestDriver::new("second", Mode::Bind, &log);
    let (started, release) = slow(&mut second, VF2, false);
    bus.register(Box::new(second));
    assert!(bus.probe(addr(VF1)).is_some());
    // From now on `first` passes devices on: VF2 goes to `second`, slowly.
    bus.driver_mut::<TestDriver>().unwrap().mode = Mode::Decline;
    let probing = std::thread::spawn(move || {
        let report = bus.probe(addr(VF2));
        (bus, report)
    });
    started.recv_timeout(Duration::from_secs(5)).unwrap();

    assert!(attach.request_removal(addr(VF1)));
    let removed = format!("first remove {VF1} (vfio removal request)");
    assert!(
        within(Duration::from_secs(2), || log.lock().contains(&removed)
            && closed(&attach, VF1)),
        "{:?} {:?}",
        log.lock(),
        attach.calls()
    );
    assert!(!probing.is_finished());

    release.send(()).unwrap();
    let (mut bus, report) = probing.join().unwrap();
    assert_eq!(report.unwrap().result.unwrap(), "second");
    let events = bus.poll();
    assert!(
        matches!(&events[..], [BusEvent::Removed(r)] if r.address == addr(VF1) && !r.revoked),
        "{events:?}"
    );
    assert_eq!(bus.held(), [(addr(VF2), "second")]);
}

// Whether `fd` is readable now.
fn readable(fd: std::os::fd::BorrowedFd<'_>) -> bool {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
    poll(&mut fds, PollTimeout::ZERO).unwrap() == 1
}

#[test]
fn one_event_fd_follows_devices_as_they_come_and_go() {
    use std::os::fd::{AsFd, AsRawFd};
    let fake = qemu();
    let attach = FakeAttach::new();
    let log = Log::default();
    let mut bus = Bus::new(map(&fake), attach.clone()).selection(allow(PF));
    bus.register(Box::new(TestDriver::new("nvme-test", Mode::Bind, &log)));
    // The loop keeps its own handle of the fd (a dup of the epoll fd is the same set) and
    // never asks the bus again.
    let fd = bus.event_fd().unwrap().try_clone_to_owned().unwrap();
    let number = bus.event_fd().unwrap().as_raw_fd();
    let fd = fd.as_fd();
    assert!(!readable(fd), "nothing to do yet");

    // A device bound after the loop registered the fd: its request reaches the same fd.
    bus.probe_all();
    assert!(!readable(fd));
    assert!(attach.request_removal(addr(PF)));
    assert!(readable(fd), "the held device's request");
    let events = bus.poll();
    assert!(
        matches!(&events[..], [BusEvent::Removed(r)] if r.cause == RemovalCause::Request),
        "{events:?}"
    );
    // Handled, and the released device's eventfd is out of the set.
    assert!(!readable(fd));
    assert_eq!(
        bus.event_fd().unwrap().as_raw_fd(),
        number,
        "one fd for the bus's life"
    );
}
