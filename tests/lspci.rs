//! pcibus agrees with lspci (pciutils), the tool every PCI user trusts: on this machine's
//! live sysfs and on the fixture trees (`lspci -A linux-sysfs -O sysfs.path=ROOT/bus/pci`).
//!
//! Needs `lspci`; without it the tests say so and pass, unless `PCIBUS_REQUIRE_LSPCI=1`
//! (CI installs pciutils and sets it).

#[path = "common/skip.rs"]
mod skip;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use pcibus::testing::FakeSysfs;
use pcibus::{DeviceRecord, Scanner, SysfsRoot};

/// lspci -vmmnk -D output: one map of field → value per device, by slot.
fn lspci(extra: &[&str]) -> Option<BTreeMap<String, BTreeMap<String, String>>> {
    let out = match Command::new("lspci").args(extra).args(["-vmmnk", "-D"]).output() {
        Ok(out) => out,
        Err(_) if std::env::var_os("PCIBUS_REQUIRE_LSPCI").is_some_and(|v| v == "1") => {
            panic!("lspci is required (PCIBUS_REQUIRE_LSPCI=1) but not installed: apt-get install pciutils")
        }
        Err(_) => {
            skip::skip(
                "lspci not installed (apt-get install pciutils); PCIBUS_REQUIRE_LSPCI=1 makes this fail",
            );
            return None;
        }
    };
    assert!(
        out.status.success(),
        "lspci failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let mut devices = BTreeMap::new();
    for block in text.split("\n\n").filter(|b| !b.trim().is_empty()) {
        let fields: BTreeMap<String, String> = block
            .lines()
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
            .collect();
        devices.insert(fields["Slot"].clone(), fields);
    }
    Some(devices)
}

fn hex(v: Option<&String>) -> Option<u32> {
    v.map(|s| u32::from_str_radix(s, 16).unwrap())
}

/// Checks every field lspci and pcibus both report: ids, class, revision, subsystem ids,
/// driver, NUMA node, IOMMU group.
fn assert_agree(what: &str, ours: &[DeviceRecord], theirs: &BTreeMap<String, BTreeMap<String, String>>) {
    let our_slots: Vec<String> = ours.iter().map(|d| d.address.to_string()).collect();
    let their_slots: Vec<String> = theirs.keys().cloned().collect();
    assert_eq!(our_slots, their_slots, "{what}: device lists differ");
    for d in ours {
        let l = &theirs[&d.address.to_string()];
        let ctx = format!("{what} {}", d.address);
        assert!(d.problems.is_empty(), "{ctx}: {:?}", d.problems);
        assert_eq!(hex(l.get("Vendor")), d.vendor.map(|v| v.0.into()), "{ctx} vendor");
        assert_eq!(hex(l.get("Device")), d.device.map(|v| v.0.into()), "{ctx} device");
        let class = d.class.unwrap();
        assert_eq!(hex(l.get("Class")), Some(class.value() >> 8), "{ctx} class");
        // lspci leaves out a zero revision, prog-if and subsystem.
        assert_eq!(
            hex(l.get("ProgIf")).unwrap_or(0),
            u32::from(class.prog_if()),
            "{ctx} prog-if"
        );
        assert_eq!(
            hex(l.get("Rev")).unwrap_or(0),
            u32::from(d.revision.unwrap()),
            "{ctx} revision"
        );
        assert_eq!(
            hex(l.get("SVendor")).unwrap_or(0),
            d.subsystem_vendor.map_or(0, |v| v.0.into()),
            "{ctx} subsystem vendor"
        );
        assert_eq!(
            hex(l.get("SDevice")).unwrap_or(0),
            d.subsystem_device.map_or(0, |v| v.0.into()),
            "{ctx} subsystem device"
        );
        assert_eq!(l.get("Driver"), d.driver.as_ref(), "{ctx} driver");
        assert_eq!(
            l.get("NUMANode").map(|n| n.parse::<u32>().unwrap()),
            d.numa_node,
            "{ctx} numa"
        );
        assert_eq!(
            l.get("IOMMUGroup").map(|n| n.parse::<u32>().unwrap()),
            d.iommu_group,
            "{ctx} group"
        );
    }
}

// The DPDK legacy tree has no config files, which lspci needs.
const FIXTURES: [&str; 3] = [
    "this-machine.pcifix",
    "qemu-q35-sriov-nvme.pcifix",
    "cardbus-ti-pci1510.pcifix",
];

/// The capability offsets lspci -vvv prints, by slot: standard (`Capabilities: [a0] ...`)
/// and extended (`Capabilities: [100 v1] ...`), each in list order.
type CapOffsets = BTreeMap<String, (Vec<u16>, Vec<u16>)>;

fn lspci_capabilities(extra: &[&str]) -> Option<CapOffsets> {
    let out = Command::new("lspci")
        .args(extra)
        .args(["-vvv", "-D"])
        .output()
        .ok()?;
    assert!(out.status.success(), "lspci failed");
    let text = String::from_utf8(out.stdout).unwrap();
    let mut caps = CapOffsets::new();
    let mut slot = None;
    for line in text.lines() {
        if !line.starts_with(char::is_whitespace) && !line.is_empty() {
            let s = line.split_whitespace().next().unwrap().to_owned();
            caps.entry(s.clone()).or_default();
            slot = Some(s);
            continue;
        }
        let Some(rest) = line.trim_start().strip_prefix("Capabilities: [") else {
            continue;
        };
        let Some((inside, _)) = rest.split_once(']') else {
            continue;
        };
        let entry = caps.get_mut(slot.as_ref().unwrap()).unwrap();
        match inside.split_once(' ') {
            Some((offset, _version)) => entry.1.push(u16::from_str_radix(offset, 16).unwrap()),
            None => entry.0.push(u16::from_str_radix(inside, 16).unwrap()),
        }
    }
    Some(caps)
}

#[test]
fn fixture_capabilities_agree_with_lspci() {
    for name in FIXTURES {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures").join(name);
        let fake = FakeSysfs::from_fixture_file(path).unwrap();
        let sysfs_path = format!("sysfs.path={}", fake.root().join("bus/pci").display());
        if lspci(&["-A", "linux-sysfs", "-O", &sysfs_path]).is_none() {
            return;
        }
        let theirs = lspci_capabilities(&["-A", "linux-sysfs", "-O", &sysfs_path]).unwrap();
        let root = SysfsRoot::new(fake.root());
        let ours = Scanner::new(root.clone()).scan().unwrap();
        for d in &ours.devices {
            let x = pcibus::sysfs::details::read(&root, d);
            let ctx = format!("{name} {}", d.address);
            assert!(x.problems.is_empty(), "{ctx}: {:?}", x.problems);
            let standard: Vec<u16> = x.capabilities.iter().map(|c| c.offset.into()).collect();
            let extended: Vec<u16> = x.extended_capabilities.iter().map(|c| c.offset).collect();
            assert_eq!(
                (standard, extended),
                theirs[&d.address.to_string()],
                "{ctx}: capability offsets (standard, extended)"
            );
        }
    }
}

#[test]
fn fixtures_agree_with_lspci() {
    for name in FIXTURES {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures").join(name);
        let fake = FakeSysfs::from_fixture_file(path).unwrap();
        let sysfs_path = format!("sysfs.path={}", fake.root().join("bus/pci").display());
        let Some(theirs) = lspci(&["-A", "linux-sysfs", "-O", &sysfs_path]) else {
            return;
        };
        let ours = Scanner::new(SysfsRoot::new(fake.root())).scan().unwrap();
        assert_agree(name, &ours.devices, &theirs);
    }
}

#[test]
fn this_machine_agrees_with_lspci() {
    if !Path::new("/sys/bus/pci/devices").exists() {
        skip::skip("no /sys/bus/pci on this machine");
        return;
    }
    let Some(theirs) = lspci(&[]) else { return };
    let ours = Scanner::new(SysfsRoot::new("/sys")).scan().unwrap();
    assert_agree("/sys", &ours.devices, &theirs);
}
