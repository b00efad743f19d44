//! The `pcibus` command line, run as a user would.

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use pcibus::testing::FakeSysfs;
use serde_json::Value;

fn fixture(name: &str) -> FakeSysfs {
    FakeSysfs::from_fixture_file(Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures").join(name)).unwrap()
}

fn pcibus(root: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pcibus"))
        .arg("--sysfs")
        .arg(root)
        .args(args)
        .env_remove("PCIBUS_SYSFS")
        .env_remove("SYSFS_PCI_DEVICES")
        .output()
        .unwrap()
}

fn stdout(o: &Output) -> String {
    assert!(
        o.status.success(),
        "exit {:?}, stderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout.clone()).unwrap()
}

const KEYS: [&str; 14] = [
    "address",
    "vendor",
    "device",
    "subsystem_vendor",
    "subsystem_device",
    "class",
    "revision",
    "numa_node",
    "driver",
    "iommu_group",
    "physfn",
    "sriov",
    "bars",
    "problems",
];

#[test]
fn list_json_has_exactly_the_documented_keys() {
    let fake = fixture("qemu-q35-sriov-nvme.pcifix");
    let v: Value = serde_json::from_str(&stdout(&pcibus(fake.root(), &["list", "--json"]))).unwrap();
    let list = v.as_array().unwrap();
    assert_eq!(list.len(), 8);
    let want: Vec<&str> = KEYS.to_vec();
    let mut addrs = Vec::new();
    for d in list {
        let keys: Vec<&str> = d.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(keys, want);
        addrs.push(d["address"].as_str().unwrap().to_owned());
    }
    let mut sorted = addrs.clone();
    sorted.sort_by_key(|a| a.parse::<pcibus::PciAddress>().unwrap());
    assert_eq!(addrs, sorted);

    let pf = list.iter().find(|d| d["address"] == "0000:01:00.0").unwrap();
    assert_eq!(pf["vendor"], 0x1b36);
    assert_eq!(pf["device"], 0x0010);
    assert_eq!(pf["class"], 0x010802);
    assert_eq!(pf["driver"], "nvme");
    assert_eq!(pf["iommu_group"], 3);
    assert_eq!(pf["numa_node"], Value::Null);
    assert_eq!(pf["physfn"], Value::Null);
    assert_eq!(pf["sriov"], serde_json::json!({"total_vfs": 2, "num_vfs": null}));
    let bar0 = &pf["bars"][0];
    assert_eq!(bar0["index"], 0);
    assert_eq!(bar0["kind"], "mem64");
    assert_eq!(bar0["size"], 0x4000);
    let vf = list.iter().find(|d| d["address"] == "0000:01:00.1").unwrap();
    assert_eq!(vf["physfn"], "0000:01:00.0");
    assert_eq!(vf["sriov"], Value::Null);

    // --read sriov-numvfs fills num_vfs.
    let v: Value = serde_json::from_str(&stdout(&pcibus(
        fake.root(),
        &["list", "--json", "--read", "sriov-numvfs"],
    )))
    .unwrap();
    let pf = v
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["address"] == "0000:01:00.0")
        .unwrap();
    assert_eq!(pf["sriov"]["num_vfs"], 2);
}

#[test]
fn list_table_names_devices() {
    let fake = fixture("this-machine.pcifix");
    let out = stdout(&pcibus(fake.root(), &["list"]));
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("ADDRESS"), "{out}");
    assert_eq!(lines.len(), 7, "{out}");
    assert!(lines[1].starts_with("0000:00:00.0  8086:0d57 0600"), "{out}");
    assert!(out.contains("virtio-pci"), "{out}");
}

#[test]
fn an_unusable_root_is_one_clear_line_and_a_failure() {
    let o = pcibus(Path::new("/nonexistent/sysfs"), &["list"]);
    assert!(!o.status.success());
    let err = String::from_utf8(o.stderr).unwrap();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("pcibus: cannot read the PCI devices directory /nonexistent/sysfs/bus/pci/devices"),
        "{err}"
    );
    assert!(err.contains("No such file or directory"), "{err}");
}

#[test]
fn a_hostile_tree_lists_with_exit_0_and_no_hang() {
    let fake = FakeSysfs::new().unwrap();
    fake.device("0000:00:02.0")
        .fifo("uevent")
        .fifo("driver_override")
        .create()
        .unwrap();
    fake.device("0000:00:03.0")
        .attr("vendor", b"garbage".to_vec())
        .without("config")
        .create()
        .unwrap();
    fake.device("0000:00:04.0")
        .resource_text(vec![b'x'; 3 << 20])
        .create()
        .unwrap();
    fake.junk_file("junk", b"x").unwrap();
    fake.link_loop("0000:00:05.0").unwrap();
    fake.device("0000:00:06.0").create().unwrap();
    fake.remove_device("0000:00:06.0").unwrap();
    let t0 = Instant::now();
    for args in [
        &["list"][..],
        &["list", "--json"],
        &["list", "--read", "all", "--timeout", "100"],
    ] {
        let o = pcibus(fake.root(), args);
        assert!(
            o.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("ignored \"junk\""), "{err}");
        assert!(err.contains("0000:00:06.0 vanished"), "{err}");
    }
    assert!(t0.elapsed() < Duration::from_secs(10));
    let v: Value = serde_json::from_str(&stdout(&pcibus(fake.root(), &["list", "--json"]))).unwrap();
    let bad = v
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["address"] == "0000:00:03.0")
        .unwrap();
    assert_eq!(bad["vendor"], Value::Null);
    assert_eq!(bad["problems"][0]["attribute"], "vendor");
    assert!(
        bad["problems"][0]["error"]
            .as_str()
            .unwrap()
            .contains("\"garbage\"")
    );
}

#[test]
fn show_prints_everything_about_one_device() {
    let fake = fixture("qemu-q35-sriov-nvme.pcifix");
    let out = stdout(&pcibus(fake.root(), &["show", "01:00.0"]));
    for want in [
        "BAR0 mem64",
        "SR-IOV: total VFs 2  enabled 2",
        "virtfn1 0000:01:00.2",
        "MSI-X",
        "SR-IOV at",
    ] {
        assert!(out.contains(want), "missing {want:?} in\n{out}");
    }
    let v: Value =
        serde_json::from_str(&stdout(&pcibus(fake.root(), &["show", "01:00.1", "--json"]))).unwrap();
    assert_eq!(v["physfn"], "0000:01:00.0");
    assert!(!v["details"]["capabilities"].as_array().unwrap().is_empty());
    let o = pcibus(fake.root(), &["show", "05:00.0"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("no device 0000:05:00.0"));
}

#[test]
fn snapshot_round_trips_a_tree() {
    let fake = fixture("qemu-q35-sriov-nvme.pcifix");
    let text = stdout(&pcibus(fake.root(), &["snapshot"]));
    let again = FakeSysfs::from_fixture(&text).unwrap();
    let a = stdout(&pcibus(fake.root(), &["list", "--json", "--read", "all"]));
    let b = stdout(&pcibus(again.root(), &["list", "--json", "--read", "all"]));
    assert_eq!(a, b);
}

#[test]
fn show_lists_a_cardbus_bridges_capabilities() {
    // A type 2 header keeps its capabilities pointer at 0x14, not 0x34.
    let fake = fixture("cardbus-ti-pci1510.pcifix");
    let v: Value =
        serde_json::from_str(&stdout(&pcibus(fake.root(), &["show", "02:06.0", "--json"]))).unwrap();
    assert_eq!(
        (v["vendor"].clone(), v["device"].clone()),
        (0x104c.into(), 0xac56.into())
    );
    assert_eq!(
        v["details"]["capabilities"],
        serde_json::json!([{"id": 1, "offset": 0xa0, "name": "Power Management"}])
    );
    let out = stdout(&pcibus(fake.root(), &["show", "02:06.0"]));
    assert!(out.contains("capability 0x01 Power Management at 0xa0"), "{out}");
}

#[test]
fn json_problems_carry_the_errno() {
    // Scripts match on the errno, not on the message's wording.
    let fake = FakeSysfs::new().unwrap();
    let dir = fake.device("0000:00:02.0").without("numa_node").create().unwrap();
    std::fs::create_dir(dir.join("numa_node")).unwrap();
    let v: Value = serde_json::from_str(&stdout(&pcibus(fake.root(), &["list", "--json"]))).unwrap();
    let p = &v[0]["problems"][0];
    assert_eq!(p["attribute"], "numa_node");
    assert_eq!(p["kind"], "io", "{p}");
    assert_eq!(p["errno"], 21, "EISDIR: {p}");
    assert!(p["error"].as_str().unwrap().contains("Is a directory"), "{p}");
}
