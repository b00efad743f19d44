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
    let deadline = Duration::from_millis(200);
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
        let timed_out: BTreeSet<&str> = d
            .problems
            .iter()
            .filter(|p| matches!(p.kind, ProblemKind::TimedOut { .. }))
            .map(|p| p.attribute)
            .collect();
        assert_eq!(
            timed_out,
            BTreeSet::from(BlockingAttr::ALL.map(BlockingAttr::name)),
            "{a}"
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
fn ids_come_from_the_id_files_not_uevent_or_modalias() {
    let fake = FakeSysfs::new().unwrap();
    fake.device("0000:00:02.0")
        .vendor(0x8086)
        .device_id(0x0953)
        .class(0x010802)
        .attr(
            "uevent",
            b"DRIVER=nvme\nPCI_CLASS=20000\nPCI_ID=DEAD:BEEF\n".to_vec(),
        )
        .attr(
            "modalias",
            b"pci:v0000DEADd0000BEEFsv00000000sd00000000bc02sc00i00\n".to_vec(),
        )
        .create()
        .unwrap();
    for ids in [IdSource::Config, IdSource::Files] {
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
    }
}
