//! The JSON of `status --json` and `setup status --json` is in the one schema
//! (schema/pcibus-v1.schema.json, `$defs/status`), checked on real output of fake trees
//! and of every fixture; and the schema says which `--json` outputs are outside it.

#[path = "common/cli.rs"]
mod cli;
use cli::pcibus;
#[path = "common/json_schema.rs"]
mod json_schema;

use std::path::{Path, PathBuf};
use std::process::Output;

use pcibus::testing::FakeSysfs;
use serde_json::Value;

use json_schema::{check, check_def};

fn schema() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("schema/pcibus-v1.schema.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn json_of(o: &Output) -> Value {
    assert!(
        o.status.success(),
        "exit {:?}, stderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).unwrap()
}

fn conforms(v: &Value) {
    let s = schema();
    let errors = check_def(&s, "status", v);
    assert!(errors.is_empty(), "status: {errors:#?}\n{v:#}");
    // The schema's top level (anyOf every command's output) takes it too.
    let errors = check(&s, &s, v);
    assert!(errors.is_empty(), "top level: {errors:#?}");
}

/// An NVMe controller on nvme with a held namespace, one on vfio-pci, an Ethernet
/// controller with an interface that is up, one with no driver; uio_pci_generic loaded.
fn tree() -> FakeSysfs {
    let fake = FakeSysfs::new().unwrap();
    fake.device("0000:01:00.0")
        .vendor(0x1b36)
        .device_id(0x0010)
        .class(0x010802)
        .driver("vfio-pci")
        .create()
        .unwrap();
    let b = fake
        .device("0000:02:00.0")
        .vendor(0x1b36)
        .device_id(0x0010)
        .class(0x010802)
        .driver("nvme")
        .create()
        .unwrap();
    let ns = b.join("nvme/nvme0/nvme0n1");
    std::fs::create_dir_all(&ns).unwrap();
    std::fs::write(ns.join("dev"), "259:0\n").unwrap();
    std::fs::create_dir_all(fake.root().join("class/block/nvme0n1/holders/dm-0")).unwrap();
    let e = fake
        .device("0000:00:03.0")
        .vendor(0x8086)
        .device_id(0x10d3)
        .class(0x020000)
        .driver("e1000e")
        .create()
        .unwrap();
    std::fs::create_dir_all(e.join("net/eth0")).unwrap();
    std::fs::write(e.join("net/eth0/flags"), "0x1003\n").unwrap();
    fake.device("0000:00:04.0").create().unwrap();
    fake.mkdir("bus/pci/drivers/uio_pci_generic").unwrap();
    fake
}

#[test]
fn status_json_conforms() {
    let fake = tree();
    let v = json_of(&pcibus(fake.root(), &["status", "--json"]));
    assert_eq!(v.as_array().map(Vec::len), Some(4), "{v:#}");
    conforms(&v);
    // An empty selection is an empty array, which conforms too.
    let v = json_of(&pcibus(fake.root(), &["status", "--json", "--kind", "crypto"]));
    assert_eq!(v, serde_json::json!([]));
    conforms(&v);
}

#[test]
fn setup_status_json_conforms() {
    let fake = tree();
    let dir = tempfile::tempdir().unwrap();
    let v = json_of(&pcibus(
        fake.root(),
        &[
            "setup",
            "status",
            "--json",
            "--setup-dir",
            dir.path().to_str().unwrap(),
        ],
    ));
    assert_eq!(v.as_array().map(Vec::len), Some(2), "the NVMe controllers: {v:#}");
    conforms(&v);
}

fn fixtures() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures");
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "pcifix"))
        .collect();
    v.sort();
    v
}

#[test]
fn status_of_every_fixture_conforms() {
    for path in fixtures() {
        let fake = FakeSysfs::from_fixture_file(&path).unwrap();
        let v = json_of(&pcibus(fake.root(), &["status", "--json"]));
        assert!(!v.as_array().unwrap().is_empty(), "{}", path.display());
        conforms(&v);
    }
}

#[test]
fn status_names_follow_the_device_objects_rules() {
    // vendor_name/device_name are pci.ids names as in list's device objects: the same
    // values for the same device.
    let fake = tree();
    let status = json_of(&pcibus(fake.root(), &["status", "--json"]));
    let list = json_of(&pcibus(fake.root(), &["list", "--json"]));
    for s in status.as_array().unwrap() {
        let d = list
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["address"] == s["address"])
            .unwrap();
        for key in [
            "vendor",
            "device",
            "class",
            "driver",
            "vendor_name",
            "device_name",
        ] {
            assert_eq!(s[key], d[key], "{key} of {}", s["address"]);
        }
    }
}

#[test]
fn the_schema_says_which_json_outputs_it_does_not_cover() {
    let s = schema();
    let description = s["description"].as_str().unwrap();
    for command in [
        "status",
        "setup status",
        "vfio info",
        "vfio reset",
        "vfio regs",
        "vfio irq-test",
        "nvme identify",
        "nvme perf",
    ] {
        assert!(
            description.contains(command),
            "the schema's description does not name {command:?}: {description}"
        );
    }
}
