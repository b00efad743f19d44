//! The scanner, specified against fake sysfs trees: checked-in fixtures (this machine,
//! QEMU with an SR-IOV NVMe, DPDK's historical test tree) and trees built in code,
//! hostile ones included.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pcibus::removal::registry::Reason;
use pcibus::testing::{FakeSysfs, Synthetic};
use pcibus::{
    BarKind, BlockingAttr, ClassCode, DeviceId, IdSource, PciAddress, ProblemKind, RemovalRegistry,
    ScanError, Scanner, SysfsRoot, VendorId,
};

fn addr(s: &str) -> PciAddress {
    s.parse().unwrap()
}

fn fixture(name: &str) -> FakeSysfs {
    FakeSysfs::from_fixture_file(Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures").join(name)).unwrap()
}

fn scanner(fake: &FakeSysfs) -> Scanner {
    Scanner::new(SysfsRoot::new(fake.root()))
}

// A bound generous enough for a loaded CI machine yet far below "hung": these tests
// assert that scans do not wait on blocked reads, not how fast they are (BENCHMARKS.md
// has the figures).
const NOT_HUNG: Duration = Duration::from_secs(5);

#[test]
fn dpdk_legacy_tree() {
    let fake = fixture("dpdk-legacy.pcifix");
    let scan = scanner(&fake).scan().unwrap();
    let addrs: Vec<String> = scan.devices.iter().map(|d| d.address.to_string()).collect();
    assert_eq!(addrs, ["0000:01:00.0", "0000:01:02.0"]);

    let nic = &scan.devices[0];
    assert_eq!(
        (nic.vendor, nic.device),
        (Some(VendorId(0x0001)), Some(DeviceId(0x1234)))
    );
    assert_eq!(nic.class, ClassCode::new(0x020000));
    assert_eq!(nic.numa_node, None, "numa_node -1 means none");
    assert_eq!(nic.driver, None);
    let bars: Vec<(u8, BarKind, u64)> = nic.bars().map(|b| (b.index, b.kind, b.size)).collect();
    assert_eq!(
        bars,
        [
            (0, BarKind::Mem32, 0x80000),
            (2, BarKind::Io, 0x20),
            (4, BarKind::Mem32, 0x4000)
        ]
    );
    assert_eq!(nic.sriov.as_ref().map(|s| s.total_vfs), Some(63));
    assert!(nic.problems.is_empty(), "{:?}", nic.problems);

    let other = &scan.devices[1];
    assert_eq!(
        (other.vendor, other.device),
        (Some(VendorId(0x0002)), Some(DeviceId(0xabcd)))
    );
    assert_eq!(other.class, ClassCode::new(0x100000));

    // Policy: a directory whose name is not a PCI address the kernel could write is not a
    // device. DPDK accepts device number 0xab; the kernel never creates one (devfn has 5
    // bits of device), so it is ignored and reported, never scanned.
    assert_eq!(scan.ignored.len(), 1);
    assert_eq!(scan.ignored[0].name, "0000:02:ab.0");
    assert_eq!(scan.ignored[0].reason, "device number above 0x1f");
}

#[test]
fn qemu_sriov_nvme_tree() {
    let fake = fixture("qemu-q35-sriov-nvme.pcifix");
    let scan = scanner(&fake).scan().unwrap();
    let (pf, vf1, vf2) = (addr("0000:01:00.0"), addr("0000:01:00.1"), addr("0000:01:00.2"));

    let pf_dev = scan.get(pf).unwrap();
    assert_eq!(pf_dev.class, ClassCode::new(0x010802));
    assert_eq!(pf_dev.driver.as_deref(), Some("nvme"));
    assert_eq!(pf_dev.iommu_group, Some(3));
    let sriov = pf_dev.sriov.as_ref().unwrap();
    assert_eq!(sriov.total_vfs, 2);
    assert_eq!(
        sriov.num_vfs, None,
        "sriov_numvfs takes the device lock: not read unless asked"
    );
    assert_eq!(sriov.virtfns, [vf1, vf2]);
    assert_eq!(pf_dev.physfn, None);

    for (vf, group) in [(vf1, 4), (vf2, 5)] {
        let d = scan.get(vf).unwrap();
        assert_eq!(d.physfn, Some(pf));
        assert_eq!(d.iommu_group, Some(group));
        assert_eq!(d.driver, None, "sriov_drivers_autoprobe was off");
        assert_eq!(
            (d.vendor, d.device),
            (Some(VendorId(0x1b36)), Some(DeviceId(0x0010)))
        );
    }
    // ICH9's functions share group 2.
    for f in ["0000:00:1f.0", "0000:00:1f.2", "0000:00:1f.3"] {
        assert_eq!(scan.get(addr(f)).unwrap().iommu_group, Some(2), "{f}");
    }
    for d in &scan.devices {
        assert!(d.problems.is_empty(), "{}: {:?}", d.address, d.problems);
    }
    assert!(scan.ignored.is_empty() && scan.vanished.is_empty());
}

#[test]
fn config_and_id_files_agree_on_every_fixture() {
    for name in [
        "this-machine.pcifix",
        "qemu-q35-sriov-nvme.pcifix",
        "dpdk-legacy.pcifix",
    ] {
        let fake = fixture(name);
        let from_config = scanner(&fake).scan().unwrap();
        let from_files = scanner(&fake).id_source(IdSource::Files).scan().unwrap();
        assert_eq!(from_config, from_files, "{name}");
    }
}

#[test]
fn guarding_everything_gives_the_same_records() {
    for name in [
        "this-machine.pcifix",
        "qemu-q35-sriov-nvme.pcifix",
        "dpdk-legacy.pcifix",
    ] {
        let fake = fixture(name);
        let plain = scanner(&fake).scan().unwrap();
        let guarded = scanner(&fake).guard_everything(true).scan().unwrap();
        assert_eq!(plain, guarded, "{name}");
    }
}

#[test]
fn blocking_attributes_are_read_only_when_asked() {
    let fake = fixture("qemu-q35-sriov-nvme.pcifix");
    let scan = BlockingAttr::ALL
        .into_iter()
        .fold(scanner(&fake), Scanner::read_blocking)
        .scan()
        .unwrap();
    let pf = scan.get(addr("0000:01:00.0")).unwrap();
    assert_eq!(pf.sriov.as_ref().unwrap().num_vfs, Some(2));
    assert_eq!(pf.driver_override, None, "\"(null)\" means unset");
    let uevent = pf.uevent.as_ref().unwrap();
    assert!(
        uevent.contains(&("DRIVER".to_owned(), "nvme".to_owned())),
        "{uevent:?}"
    );
    assert!(pf.problems.is_empty(), "{:?}", pf.problems);
}

#[test]
fn records_are_sorted_and_complete_on_a_generated_tree() {
    let fake = FakeSysfs::new().unwrap();
    let spec = Synthetic {
        pfs: 4,
        vfs_per_pf: 3,
        ..Synthetic::new(200)
    };
    let built = spec.build(&fake).unwrap();
    for threads in [1, 2, 4] {
        let scan = scanner(&fake).threads(threads).scan().unwrap();
        let got: Vec<PciAddress> = scan.devices.iter().map(|d| d.address).collect();
        let mut want = built.clone();
        want.sort();
        assert_eq!(got, want, "threads={threads}");
        for d in &scan.devices {
            assert!(d.problems.is_empty(), "{}: {:?}", d.address, d.problems);
            assert!(d.vendor.is_some() && d.class.is_some());
        }
        // Every VF a PF lists names it back as its PF.
        for pf in scan.devices.iter().filter(|d| d.sriov.is_some()) {
            for vf in &pf.sriov.as_ref().unwrap().virtfns {
                assert_eq!(scan.get(*vf).unwrap().physfn, Some(pf.address));
            }
        }
    }
}

/// A tree with every kind of trouble: lock-taking attributes that never answer (FIFOs),
/// garbage in attributes, junk names, link loops, a device that vanished, and a
/// multi-megabyte attribute.
fn hostile_tree() -> FakeSysfs {
    let fake = FakeSysfs::new().unwrap();
    // Well-formed devices whose lock-taking attributes hang, as during a pending removal.
    for a in ["0000:00:02.0", "0000:00:03.0"] {
        fake.device(a)
            .vendor(0x8086)
            .device_id(0x0953)
            .class(0x010802)
            .driver("nvme")
            .iommu_group(7)
            .sriov_totalvfs(4)
            .fifo("sriov_numvfs")
            .fifo("sriov_vf_total_msix")
            .fifo("uevent")
            .fifo("driver_override")
            .create()
            .unwrap();
    }
    fake.device("0000:00:04.0")
        .vendor(0x1af4)
        .device_id(0x1041)
        .class(0x020000)
        .create()
        .unwrap();
    // Garbage.
    fake.device("0000:00:05.0")
        .without("config")
        .attr("modalias", b"pci:garbage\n".to_vec())
        .attr("vendor", b"zz\n".to_vec())
        .attr("class", b"0x1234567\n".to_vec())
        .attr("numa_node", b"-7\n".to_vec())
        .resource_text(b"0x1 0x2\nnot a line\n".to_vec())
        .create()
        .unwrap();
    // A multi-megabyte attribute.
    fake.device("0000:00:06.0")
        .resource_text(vec![b'0'; 5 << 20])
        .create()
        .unwrap();
    // Junk in the devices directory.
    fake.junk_file("README", b"not a device").unwrap();
    fake.junk_file("0000:00:07.0", b"a regular file named like a device")
        .unwrap();
    fake.junk_link("0000:00:08.0", "../../../nowhere").unwrap();
    fake.link_loop("0000:00:09.0").unwrap();
    fake.junk_link("0000:00:0a.0", "../../../devices/pci0000:00/0000:00:0a.0/loop")
        .unwrap();
    fake.device("0000:00:0b.0").create().unwrap();
    fake.remove_device("0000:00:0b.0").unwrap();
    fake
}

#[test]
fn a_hostile_tree_is_listed_without_blocking_or_failing() {
    let fake = hostile_tree();
    let t0 = Instant::now();
    let scan = scanner(&fake).scan().unwrap();
    assert!(t0.elapsed() < NOT_HUNG);

    let good = scan.get(addr("0000:00:02.0")).unwrap();
    assert_eq!(
        (good.vendor, good.device),
        (Some(VendorId(0x8086)), Some(DeviceId(0x0953)))
    );
    assert_eq!(good.driver.as_deref(), Some("nvme"));
    assert_eq!(good.iommu_group, Some(7));
    assert_eq!(good.sriov.as_ref().map(|s| s.total_vfs), Some(4));
    assert!(good.problems.is_empty(), "{:?}", good.problems);
    assert!(scan.get(addr("0000:00:04.0")).unwrap().problems.is_empty());

    let bad = scan.get(addr("0000:00:05.0")).unwrap();
    let attrs: BTreeSet<&str> = bad.problems.iter().map(|p| p.attribute).collect();
    assert_eq!(
        attrs,
        BTreeSet::from(["vendor", "class", "numa_node", "resource"])
    );
    assert_eq!(bad.vendor, None);
    let vendor = bad.problem("vendor").unwrap().to_string();
    assert!(
        vendor.contains("\"zz\\n\""),
        "the error quotes the text: {vendor}"
    );

    let huge = scan.get(addr("0000:00:06.0")).unwrap();
    let p = huge.problem("resource").unwrap();
    assert!(matches!(p.kind, ProblemKind::Io { .. }), "{p}");
    assert!(p.to_string().contains("larger than"), "{p}");

    // A link whose directory is gone is a device removed between listing and reading; a
    // link that never had a target looks the same to the kernel's ENOENT.
    assert_eq!(
        scan.vanished,
        [addr("0000:00:08.0"), addr("0000:00:0a.0"), addr("0000:00:0b.0")]
    );
    let ignored: BTreeSet<&str> = scan.ignored.iter().map(|i| i.name.as_str()).collect();
    assert_eq!(
        ignored,
        BTreeSet::from(["0000:00:07.0", "0000:00:09.0", "0000:00:09.0.loop", "README"])
    );
    let reasons: Vec<&str> = scan.ignored.iter().map(|i| i.reason.as_str()).collect();
    assert!(reasons[0].starts_with("not a device directory"), "{reasons:?}");
}

#[test]
fn blocked_attributes_time_out_by_the_deadline_and_mark_the_registry() {
    let fake = hostile_tree();
    let registry = Arc::new(RemovalRegistry::new());
    // Long enough for the guard to start its reads on a loaded host (the checks below
    // allow for one that did not start), far below NOT_HUNG.
    let deadline = Duration::from_millis(1000);
    let scanner = BlockingAttr::ALL
        .into_iter()
        .fold(scanner(&fake), Scanner::read_blocking)
        .registry(Arc::clone(&registry))
        .timeout(deadline);
    let t0 = Instant::now();
    let scan = scanner.scan().unwrap();
    let took = t0.elapsed();
    assert!(took >= deadline && took < NOT_HUNG, "{took:?}");

    for a in ["0000:00:02.0", "0000:00:03.0"] {
        let d = scan.get(addr(a)).unwrap();
        // Each blocking attribute is its own guarded read: stuck (TimedOut), or, on a host
        // too loaded to start every read's thread within the deadline, never started
        // (NotStarted). Both are reported; which one depends on the machine's load.
        let missed: BTreeSet<&str> = d
            .problems
            .iter()
            .filter(|p| {
                matches!(
                    p.kind,
                    ProblemKind::TimedOut { .. } | ProblemKind::NotStarted { .. }
                )
            })
            .map(|p| p.attribute)
            .collect();
        assert_eq!(
            missed,
            BTreeSet::from(BlockingAttr::ALL.map(BlockingAttr::name)),
            "{a}: {:?}",
            d.problems
        );
        assert!(
            d.problems
                .iter()
                .any(|p| matches!(p.kind, ProblemKind::TimedOut { .. })),
            "{a}: no read got stuck: {:?}",
            d.problems
        );
        // The fast-path facts are still there.
        assert_eq!(d.vendor, Some(VendorId(0x8086)));
        assert!(registry.is_pending(addr(a)));
        assert!(matches!(
            registry.get(addr(a)).unwrap().reason,
            Reason::StuckRead { .. }
        ));
    }
    // A device whose reads answered is not marked.
    assert!(!registry.is_pending(addr("0000:00:04.0")));

    // The next scan keeps away from the pending devices' blocking attributes: no read is
    // attempted, so it does not wait for the deadline at all.
    let slow = scanner.clone().timeout(Duration::from_secs(3600));
    let t0 = Instant::now();
    let again = slow.scan().unwrap();
    assert!(t0.elapsed() < NOT_HUNG);
    let d = again.get(addr("0000:00:02.0")).unwrap();
    assert!(d.removal_pending);
    assert!(
        d.problems.iter().all(|p| p.kind == ProblemKind::RemovalPending),
        "{:?}",
        d.problems
    );
    assert_eq!(d.problems.len(), 4);
    assert_eq!(
        d.vendor,
        Some(VendorId(0x8086)),
        "attributes that take no device lock are still read"
    );
}

#[test]
fn guarding_everything_bounds_a_scan_by_its_deadline() {
    let fake = hostile_tree();
    let deadline = Duration::from_millis(200);
    let scan = scanner(&fake)
        .guard_everything(true)
        .read_blocking(BlockingAttr::Uevent)
        .timeout(deadline)
        .scan()
        .unwrap();
    let d = scan.get(addr("0000:00:02.0")).unwrap();
    let p = d.problem("uevent").unwrap();
    assert!(matches!(p.kind, ProblemKind::TimedOut { .. }), "{p}");
    assert_eq!(
        d.driver.as_deref(),
        Some("nvme"),
        "what was read before the stuck read is kept"
    );
    assert!(scan.get(addr("0000:00:04.0")).unwrap().problems.is_empty());
}

#[test]
fn deferral_and_release() {
    let fake = fixture("qemu-q35-sriov-nvme.pcifix");
    let registry = Arc::new(RemovalRegistry::new());
    let s = scanner(&fake)
        .registry(Arc::clone(&registry))
        .defer_while_removal_pending(true);
    assert!(s.scan().is_ok());

    registry.mark(addr("0000:01:00.1"), Reason::RemovalRequested);
    match s.scan() {
        Err(ScanError::Deferred { pending }) => assert_eq!(pending, [addr("0000:01:00.1")]),
        other => panic!("expected a deferred scan, got {other:?}"),
    }
    // The device goes away: the next scan drops the entry and runs.
    std::fs::remove_file(fake.root().join("bus/pci/devices/0000:01:00.1")).unwrap();
    let scan = s.scan().unwrap();
    assert_eq!(scan.released, [addr("0000:01:00.1")]);
    assert!(registry.is_empty());
    assert!(scan.get(addr("0000:01:00.1")).is_none());
}

#[test]
fn allow_and_block_lists_apply_before_any_read() {
    let fake = hostile_tree();
    // 0000:00:09.0 is a link loop: opening it would be reported as ignored. Listed in a
    // block list (or left out of an allow list), it is never opened.
    let blocked = scanner(&fake)
        .block([addr("0000:00:09.0"), addr("0000:00:05.0")])
        .scan()
        .unwrap();
    assert!(blocked.ignored.iter().all(|i| i.name != "0000:00:09.0"));
    assert!(blocked.get(addr("0000:00:05.0")).is_none());
    assert!(blocked.get(addr("0000:00:04.0")).is_some());

    let allowed = scanner(&fake).allow([addr("0000:00:04.0")]).scan().unwrap();
    assert_eq!(allowed.devices.len(), 1);
    assert!(allowed.ignored.iter().all(|i| i.name != "0000:00:09.0"));
    assert!(allowed.vanished.is_empty());
}

#[test]
fn roots_from_the_environment_and_dpdk() {
    let fake = fixture("dpdk-legacy.pcifix");
    let devices = fake.root().join("bus/pci/devices");
    let r = SysfsRoot::from_devices_dir(&devices);
    assert_eq!(r.devices_dir(), devices);
    assert_eq!(r.path(), fake.root());
    let scan = Scanner::new(r).scan().unwrap();
    assert_eq!(scan.devices.len(), 2);

    let missing = Scanner::new(SysfsRoot::new(fake.root().join("nope")))
        .scan()
        .unwrap_err();
    assert!(matches!(missing, ScanError::Root { .. }));
    assert!(missing.to_string().contains("nope/bus/pci/devices"), "{missing}");
}

#[test]
fn scan_device_finds_one() {
    let fake = fixture("qemu-q35-sriov-nvme.pcifix");
    let s = scanner(&fake);
    let d = s.scan_device(addr("0000:01:00.0")).unwrap().unwrap();
    assert_eq!(d.class, ClassCode::new(0x010802));
    assert!(s.scan_device(addr("0000:05:00.0")).unwrap().is_none());
}

#[test]
fn every_timed_out_read_reports_the_scans_deadline() {
    let fake = hostile_tree();
    let scan = BlockingAttr::ALL
        .into_iter()
        .fold(scanner(&fake), Scanner::read_blocking)
        .timeout(Duration::from_millis(150))
        .scan()
        .unwrap();
    let texts: Vec<String> = scan
        .devices
        .iter()
        .flat_map(|d| &d.problems)
        .filter(|p| matches!(p.kind, ProblemKind::TimedOut { .. }))
        .map(|p| p.kind.to_string())
        .collect();
    assert_eq!(texts.len(), 8);
    assert!(
        texts.iter().all(|t| t == "read timed out after 150 ms"),
        "{texts:?}"
    );
}

#[test]
fn ids_come_from_kernel_cached_attributes_never_uevent() {
    let fake = FakeSysfs::new().unwrap();
    fake.device("0000:00:02.0")
        .vendor(0x8086)
        .device_id(0x0953)
        .class(0x010802)
        .attr(
            "uevent",
            b"DRIVER=nvme\nPCI_CLASS=20000\nPCI_ID=DEAD:BEEF\n".to_vec(),
        )
        .create()
        .unwrap();
    for ids in [IdSource::Files, IdSource::IdFiles, IdSource::Config] {
        let scan = scanner(&fake)
            .id_source(ids)
            .read_blocking(BlockingAttr::Uevent)
            .scan()
            .unwrap();
        let d = &scan.devices[0];
        assert_eq!(
            (d.vendor, d.device),
            (Some(VendorId(0x8086)), Some(DeviceId(0x0953))),
            "{ids:?}"
        );
        assert_eq!(d.class, ClassCode::new(0x010802), "{ids:?}");
        assert!(d.problems.is_empty(), "{ids:?}: {:?}", d.problems);
    }
}

// Every attribute whose read can wait: the four that take the device lock, and `config`
// (waits while the function is being reset).
const WAITING: [&str; 5] = [
    "config",
    "sriov_numvfs",
    "sriov_vf_total_msix",
    "driver_override",
    "uevent",
];

// A PF and a plain device whose waiting attributes are all tripwires.
fn tripwired_tree() -> FakeSysfs {
    tripwired_tree_at("0000:00:02.0", "0000:00:03.0")
}

fn tripwired_tree_at(pf: &str, plain: &str) -> FakeSysfs {
    let fake = FakeSysfs::new().unwrap();
    for (a, pf) in [(pf, true), (plain, false)] {
        let mut b = fake.device(a).vendor(0x8086).device_id(0x0953).class(0x010802);
        if pf {
            b = b.sriov_totalvfs(4);
        }
        for attr in WAITING {
            if pf || !attr.starts_with("sriov") {
                b = b.tripwire(attr);
            }
        }
        b.create().unwrap();
    }
    fake
}

fn opens(fake: &FakeSysfs, a: &str, attr: &str) -> usize {
    fake.opens(fake.device_dir(a).unwrap().join(attr))
}

#[test]
fn the_fast_path_never_opens_config_or_a_blocking_attribute() {
    let fake = tripwired_tree();
    for s in [
        scanner(&fake),
        scanner(&fake).threads(1),
        scanner(&fake).id_source(IdSource::IdFiles),
    ] {
        let scan = s.scan().unwrap();
        let d = scan.get(addr("0000:00:02.0")).unwrap();
        assert_eq!(d.vendor, Some(VendorId(0x8086)));
        assert!(d.revision.is_some() && d.subsystem_vendor.is_some());
        assert!(d.problems.is_empty(), "{:?}", d.problems);
    }
    fake.settle_tripwires();
    assert_eq!(fake.tripped(), []);
}

#[test]
fn blocking_attributes_asked_for_are_each_opened_once_through_the_pool() {
    for guard_everything in [false, true] {
        let fake = tripwired_tree();
        let scan = BlockingAttr::ALL
            .into_iter()
            .fold(scanner(&fake), Scanner::read_blocking)
            .guard_everything(guard_everything)
            .scan()
            .unwrap();
        assert_eq!(scan.devices.len(), 2);
        for (a, attrs) in [
            ("0000:00:02.0", &BlockingAttr::ALL[..]),
            ("0000:00:03.0", &BlockingAttr::ALL[2..]),
        ] {
            for attr in attrs {
                assert!(
                    fake.wait_for_opens(fake.device_dir(a).unwrap().join(attr.name()), 1, NOT_HUNG),
                    "{a} {attr:?}"
                );
            }
        }
        fake.settle_tripwires();
        for a in ["0000:00:02.0", "0000:00:03.0"] {
            assert_eq!(opens(&fake, a, "config"), 0, "{a}: config");
            for attr in BlockingAttr::ALL {
                assert!(opens(&fake, a, attr.name()) <= 1, "{a} {attr:?}");
            }
        }
    }
}

#[test]
fn without_a_revision_file_the_revision_comes_from_config_through_the_pool() {
    let fake = FakeSysfs::new().unwrap();
    fake.device("0000:00:02.0")
        .revision(0x42)
        .without("revision")
        .create()
        .unwrap();
    for ids in [IdSource::Files, IdSource::IdFiles] {
        let scan = scanner(&fake).id_source(ids).scan().unwrap();
        let d = &scan.devices[0];
        assert_eq!(d.revision, Some(0x42), "{ids:?}");
        assert!(d.problems.is_empty(), "{ids:?}: {:?}", d.problems);
    }
}

// A PCI-to-PCI bridge's config space (header type 1) with an SSVID capability at 0x40
// giving subsystem ids 1af4:1100.
fn bridge_config() -> Vec<u8> {
    let mut c = vec![0u8; 256];
    c[0..2].copy_from_slice(&0x8086u16.to_le_bytes());
    c[2..4].copy_from_slice(&0x7000u16.to_le_bytes());
    c[0x06] = 0x10; // status: capabilities list
    c[0x08] = 0x03; // revision
    c[0x0a] = 0x04; // subclass: PCI-to-PCI bridge
    c[0x0b] = 0x06; // base class: bridge
    c[0x0e] = 0x01; // header type 1
    c[0x34] = 0x40;
    c[0x40] = 0x0d; // SSVID
    c[0x41] = 0x00;
    c[0x44..0x46].copy_from_slice(&0x1af4u16.to_le_bytes());
    c[0x46..0x48].copy_from_slice(&0x1100u16.to_le_bytes());
    c
}

#[test]
fn a_bridge_without_subsystem_files_gets_them_from_its_ssvid_capability() {
    let fake = FakeSysfs::new().unwrap();
    fake.device("0000:00:1c.0")
        .vendor(0x8086)
        .device_id(0x7000)
        .class(0x060400)
        .revision(3)
        .config(bridge_config())
        .without("subsystem_vendor")
        .without("subsystem_device")
        .without("modalias")
        .create()
        .unwrap();
    // (With ids from the header, a bridge's subsystem ids come from the files, or from
    // nowhere: an unprivileged read of `config` gives 64 bytes, no capabilities.)
    for ids in [IdSource::Files, IdSource::IdFiles] {
        let scan = scanner(&fake).id_source(ids).scan().unwrap();
        let d = &scan.devices[0];
        assert_eq!(
            (d.subsystem_vendor, d.subsystem_device),
            (Some(VendorId(0x1af4)), Some(DeviceId(0x1100))),
            "{ids:?}"
        );
        assert_eq!(d.class, ClassCode::new(0x060400), "{ids:?}");
        assert!(d.problems.is_empty(), "{ids:?}: {:?}", d.problems);
    }
}

// `pcibus list --json --read all --timeout 50` on a healthy tree of 4,096 devices.
fn large_tree() -> FakeSysfs {
    let fake = FakeSysfs::new().unwrap();
    Synthetic {
        pfs: 16,
        vfs_per_pf: 4,
        ..Synthetic::new(4096)
    }
    .build(&fake)
    .unwrap();
    fake
}

fn read_all(s: Scanner) -> Scanner {
    BlockingAttr::ALL.into_iter().fold(s, Scanner::read_blocking)
}

#[test]
fn a_short_deadline_on_a_large_healthy_tree_reports_nothing_and_marks_nothing() {
    let fake = large_tree();
    let registry = Arc::new(RemovalRegistry::new());
    let s = read_all(scanner(&fake))
        .registry(Arc::clone(&registry))
        .timeout(Duration::from_millis(50))
        .defer_while_removal_pending(true);
    for _ in 0..2 {
        // The second scan would be deferred if the first had marked anything.
        let scan = s.scan().unwrap();
        assert_eq!(scan.devices.len(), 4096);
        let problems: Vec<_> = scan
            .devices
            .iter()
            .flat_map(|d| d.problems.iter().map(move |p| (d.address, p)))
            .take(5)
            .collect();
        assert!(problems.is_empty(), "{problems:?}");
        assert!(registry.is_empty(), "{:?}", registry.pending().first());
        assert!(scan.devices.iter().all(|d| d.uevent.is_some()));
    }
}

// A pool whose only thread is busy until the returned sender sends (or is dropped).
fn busy_pool() -> (pcibus::BlockingPool, std::sync::mpsc::Sender<()>) {
    let pool = pcibus::BlockingPool::new(pcibus::PoolLimits {
        parallelism: 1,
        max_threads: 1,
        ..Default::default()
    });
    let (release, gate) = std::sync::mpsc::channel::<()>();
    let started = pool.submit(move || {
        let _ = gate.recv();
    });
    std::mem::forget(started);
    // Let the pool's thread take the job.
    std::thread::sleep(Duration::from_millis(50));
    (pool, release)
}

#[test]
fn reads_that_never_started_are_not_stuck_and_mark_nothing() {
    let fake = fixture("qemu-q35-sriov-nvme.pcifix");
    let registry = Arc::new(RemovalRegistry::new());
    let (pool, release) = busy_pool();
    let scan = scanner(&fake)
        .pool(pool)
        .read_blocking(BlockingAttr::Uevent)
        .registry(Arc::clone(&registry))
        .timeout(Duration::from_millis(100))
        .scan()
        .unwrap();
    drop(release);
    for d in &scan.devices {
        let p = d.problem("uevent").unwrap();
        assert_eq!(
            p.kind,
            ProblemKind::NotStarted {
                waited: Duration::from_millis(100)
            },
            "{}",
            d.address
        );
    }
    assert!(registry.is_empty(), "{:?}", registry.pending());
}

#[test]
fn a_stuck_read_marks_its_device_incarnation_until_it_returns() {
    let fake = hostile_tree();
    let registry = Arc::new(RemovalRegistry::new());
    let a = addr("0000:00:02.0");
    let scan = scanner(&fake)
        .allow([a])
        .read_blocking(BlockingAttr::Uevent)
        .registry(Arc::clone(&registry))
        .timeout(Duration::from_millis(100))
        .scan()
        .unwrap();
    assert!(matches!(
        scan.devices[0].problem("uevent").unwrap().kind,
        ProblemKind::TimedOut { .. }
    ));
    let dir = fake.root().join(fake.device_dir("0000:00:02.0").unwrap());
    let pending = registry.get(a).unwrap();
    assert_eq!(
        pending.identity,
        Some(pcibus::removal::registry::DeviceIdentity::of(&dir).unwrap())
    );
    // The read returns (the lock was released): the mark goes with it.
    let seen = registry.generation();
    fake.answer_fifos();
    let t0 = Instant::now();
    while !registry.is_empty() && t0.elapsed() < NOT_HUNG {
        registry.wait_for_change(seen, Duration::from_millis(100));
    }
    assert!(registry.is_empty(), "{:?}", registry.pending());
}

#[test]
fn a_hot_replaced_device_does_not_inherit_pending() {
    let fake = FakeSysfs::new().unwrap();
    let a = addr("0000:00:02.0");
    fake.device("0000:00:02.0").fifo("uevent").create().unwrap();
    let registry = Arc::new(RemovalRegistry::new());
    let s = scanner(&fake)
        .read_blocking(BlockingAttr::Uevent)
        .registry(Arc::clone(&registry))
        .timeout(Duration::from_millis(100));
    let before = s.scan().unwrap();
    assert!(matches!(
        before.get(a).unwrap().problem("uevent").unwrap().kind,
        ProblemKind::TimedOut { .. }
    ));
    assert!(registry.is_pending(a));
    // Removed and re-added while the read is still stuck: a new directory at the same
    // address. The old one is kept (renamed) so that its inode cannot be reused.
    let dir = fake.root().join(fake.device_dir("0000:00:02.0").unwrap());
    let aside = dir.with_extension("old");
    std::fs::rename(&dir, &aside).unwrap();
    std::fs::remove_file(fake.root().join("bus/pci/devices/0000:00:02.0")).unwrap();
    fake.device("0000:00:02.0").create().unwrap();
    let after = s.scan().unwrap();
    assert_eq!(after.released, [a]);
    let d = after.get(a).unwrap();
    assert!(!d.removal_pending);
    assert!(d.uevent.is_some(), "{:?}", d.problems);
    assert!(registry.is_empty(), "{:?}", registry.pending());
    // The old incarnation's read returns: harmless.
    fake.answer_fifo(aside.join("uevent"), b"").unwrap();
}

#[test]
fn never_reads_the_blocking_attributes_of_a_device_held_open() {
    // Held open counts for the whole process, so for every test running in it: an
    // address no other test uses.
    let fake = tripwired_tree_at("0042:00:00.0", "0042:00:00.1");
    let held = pcibus::removal::held::HeldOpen::new(addr("0042:00:00.0"));
    for guard_everything in [false, true] {
        let scan = read_all(scanner(&fake))
            .guard_everything(guard_everything)
            .scan()
            .unwrap();
        let d = scan.get(addr("0042:00:00.0")).unwrap();
        for attr in BlockingAttr::ALL {
            assert_eq!(
                d.problem(attr.name()).map(|p| &p.kind),
                Some(&ProblemKind::HeldOpen),
                "{attr:?}"
            );
        }
        assert_eq!(d.vendor, Some(VendorId(0x8086)));
        // The other device is read as usual.
        let other = scan.get(addr("0042:00:00.1")).unwrap();
        assert!(other.uevent.is_some(), "{:?}", other.problems);
    }
    fake.settle_tripwires();
    for attr in WAITING {
        assert_eq!(opens(&fake, "0042:00:00.0", attr), 0, "{attr}");
    }
    drop(held);
}

#[test]
fn a_removal_marked_after_submission_is_seen_before_the_read() {
    let fake = tripwired_tree();
    let registry = Arc::new(RemovalRegistry::new());
    let (pool, release) = busy_pool();
    let s = scanner(&fake)
        .pool(pool)
        .allow([addr("0000:00:03.0")])
        .read_blocking(BlockingAttr::Uevent)
        .registry(Arc::clone(&registry))
        .timeout(Duration::from_secs(10));
    let scan = std::thread::spawn(move || s.scan().unwrap());
    // The scan has walked and queued its read behind the busy thread: a REQ comes.
    std::thread::sleep(Duration::from_millis(200));
    registry.mark(addr("0000:00:03.0"), Reason::RemovalRequested);
    release.send(()).unwrap();
    let scan = scan.join().unwrap();
    let d = scan.get(addr("0000:00:03.0")).unwrap();
    assert_eq!(
        d.problem("uevent").map(|p| &p.kind),
        Some(&ProblemKind::RemovalPending)
    );
    assert!(d.removal_pending);
    fake.settle_tripwires();
    assert_eq!(opens(&fake, "0000:00:03.0", "uevent"), 0);
}

// Open fds of this process into `dir` (other tests of the process open their own).
fn fds_under(dir: &Path) -> usize {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|t| t.starts_with(dir))
        .count()
}

#[test]
fn scans_while_every_helper_thread_is_stuck_hold_no_fds() {
    let fake = hostile_tree();
    let pool = pcibus::BlockingPool::new(pcibus::PoolLimits {
        parallelism: 1,
        max_threads: 2,
        ..Default::default()
    });
    let registry = Arc::new(RemovalRegistry::new());
    let s = scanner(&fake)
        .pool(pool)
        .registry(Arc::clone(&registry))
        .read_blocking(BlockingAttr::Uevent)
        .timeout(Duration::from_millis(20));
    // The first scans leave both helper threads stuck on the FIFOs.
    for _ in 0..3 {
        s.scan().unwrap();
        registry.pending().iter().for_each(|p| {
            registry.release(p.address);
        });
    }
    let stuck = fds_under(fake.root());
    let t0 = Instant::now();
    for _ in 0..100 {
        let scan = s.scan().unwrap();
        assert_eq!(scan.devices.len(), 5);
        registry.pending().iter().for_each(|p| {
            registry.release(p.address);
        });
    }
    assert!(t0.elapsed() < NOT_HUNG * 4, "{:?}", t0.elapsed());
    assert!(stuck <= 2, "only the stuck reads hold fds: {stuck}");
    assert_eq!(fds_under(fake.root()), stuck);
}

#[test]
fn scan_device_reads_one_device_and_leaves_other_registry_entries_alone() {
    let fake = FakeSysfs::new().unwrap();
    fake.device("0000:01:00.0").create().unwrap();
    fake.device("0000:02:00.0").create().unwrap();
    let registry = Arc::new(RemovalRegistry::new());
    // Pending: one device that exists, one that is gone.
    registry.mark(addr("0000:02:00.0"), Reason::Uevent);
    registry.mark(addr("0000:09:00.0"), Reason::Uevent);
    let scanner = Scanner::new(SysfsRoot::new(fake.root())).registry(Arc::clone(&registry));
    let one = scanner.scan_device(addr("0000:01:00.0")).unwrap().unwrap();
    assert_eq!(one.address, addr("0000:01:00.0"));
    assert!(registry.is_pending(addr("0000:02:00.0")));
    assert!(
        registry.is_pending(addr("0000:09:00.0")),
        "only a full scan knows it is gone"
    );
    assert!(scanner.scan_device(addr("0000:03:00.0")).unwrap().is_none());
    // A full scan prunes the gone one.
    scanner.scan().unwrap();
    assert!(!registry.is_pending(addr("0000:09:00.0")));
}

// Issue 14 §1: a PF with one VF, the PF's waiting attributes tripwires. While the VF is
// removed by `echo 0 > PF/sriov_numvfs`, the kernel holds the PF's device lock.
fn pf_with_a_vf(pf: &str, vf: &str) -> FakeSysfs {
    let fake = FakeSysfs::new().unwrap();
    let mut b = fake
        .device(pf)
        .vendor(0x1b36)
        .device_id(0x0010)
        .class(0x010802)
        .sriov_numvfs(1);
    for attr in WAITING {
        b = b.tripwire(attr);
    }
    b.create().unwrap();
    fake.device(vf)
        .vendor(0x1b36)
        .device_id(0x0010)
        .class(0x010802)
        .physfn(pf)
        .create()
        .unwrap();
    fake
}

// What `sriov_numvfs=0` does before it asks the VF's holder to let go: it removes the
// PF's `virtfnN` link and the VF's `physfn` link.
fn unlink_vf(fake: &FakeSysfs, pf: &str, vf: &str) {
    let dir = |a| fake.root().join(fake.device_dir(a).unwrap());
    std::fs::remove_file(dir(pf).join("virtfn0")).unwrap();
    std::fs::remove_file(dir(vf).join("physfn")).unwrap();
}

fn assert_pf_attrs(scan: &pcibus::Scan, pf: &str, want: &ProblemKind) {
    let d = scan.get(addr(pf)).unwrap();
    for attr in BlockingAttr::ALL {
        assert_eq!(
            d.problem(attr.name()).map(|p| &p.kind),
            Some(want),
            "{attr:?}: {:?}",
            d.problems
        );
    }
    assert!(
        !d.removal_pending,
        "the PF is not being removed: {:?}",
        d.removal_reasons
    );
    assert_eq!(d.vendor, Some(VendorId(0x1b36)));
}

#[test]
fn never_reads_the_lock_taking_attributes_of_the_pf_of_a_held_vf() {
    // Held open counts for the whole process: addresses no other test uses.
    let (pf, vf) = ("0043:01:00.0", "0043:01:00.1");
    let fake = pf_with_a_vf(pf, vf);
    let held = pcibus::removal::held::HeldOpen::with_physfn(addr(vf), Some(addr(pf)));
    // Before the removal starts, and after the kernel has unlinked the VF.
    for unlinked in [false, true] {
        if unlinked {
            unlink_vf(&fake, pf, vf);
        }
        for guard_everything in [false, true] {
            let scan = read_all(scanner(&fake))
                .guard_everything(guard_everything)
                .timeout(Duration::from_millis(300))
                .scan()
                .unwrap();
            assert_pf_attrs(&scan, pf, &ProblemKind::HeldOpen);
        }
    }
    fake.settle_tripwires();
    for attr in WAITING {
        assert_eq!(opens(&fake, pf, attr), 0, "{attr}");
    }
    drop(held);
}

#[test]
fn a_pending_vf_keeps_scans_off_its_pfs_lock_taking_attributes() {
    let (pf, vf) = ("0000:01:00.0", "0000:01:00.1");
    let fake = pf_with_a_vf(pf, vf);
    let registry = Arc::new(RemovalRegistry::new());
    let s = || {
        read_all(scanner(&fake))
            .registry(Arc::clone(&registry))
            .timeout(Duration::from_millis(300))
    };
    // A scan that reads nothing blocking learns which PF the VF has.
    scanner(&fake).registry(Arc::clone(&registry)).scan().unwrap();
    unlink_vf(&fake, pf, vf);
    registry.mark(addr(vf), Reason::RemovalRequested);
    for guard_everything in [false, true] {
        let scan = s().guard_everything(guard_everything).scan().unwrap();
        assert_pf_attrs(&scan, pf, &ProblemKind::RemovalPending);
        assert!(scan.get(addr(vf)).unwrap().removal_pending);
    }
    fake.settle_tripwires();
    for attr in WAITING {
        assert_eq!(opens(&fake, pf, attr), 0, "{attr}");
    }
}
