//! `pcibus status` (dpdk-devbind.py --status), `pcibus completions` and `pcibus man`, run
//! as a user would.

#[path = "common/cli.rs"]
mod cli;
use cli::{pcibus, stdout};
use std::path::Path;
use std::process::Command;

use pcibus::testing::FakeSysfs;
use serde_json::Value;

/// 01:00.0 NVMe on vfio-pci; 02:00.0 NVMe on nvme with namespace nvme0n1 held by dm;
/// 00:03.0 Ethernet on e1000e with eth0 up; 00:04.0 Ethernet with eth1 down, no driver;
/// vfio-pci and uio_pci_generic loaded.
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
    std::fs::write(ns.join("size"), "8\n").unwrap();
    std::fs::create_dir_all(fake.root().join("class/block/nvme0n1/holders/dm-0")).unwrap();
    let e = fake.device("0000:00:03.0").driver("e1000e").create().unwrap();
    std::fs::create_dir_all(e.join("net/eth0")).unwrap();
    std::fs::write(e.join("net/eth0/flags"), "0x1003\n").unwrap();
    let f = fake.device("0000:00:04.0").create().unwrap();
    std::fs::create_dir_all(f.join("net/eth1")).unwrap();
    std::fs::write(f.join("net/eth1/flags"), "0x1002\n").unwrap();
    fake.mkdir("bus/pci/drivers/uio_pci_generic").unwrap();
    fake
}

// A status line's start (up to the device name, which depends on this system's pci.ids)
// and its end.
fn has_line(out: &str, address: &str, ids: &str, tail: &str) -> bool {
    out.lines().any(|l| {
        l.starts_with(&format!("{address} '")) && l.contains(&format!(" {ids}' ")) && l.ends_with(tail)
    })
}

#[test]
fn status_groups_devices_by_driver_with_interfaces_disks_and_active_marks() {
    let fake = tree();
    let out = stdout(&pcibus(fake.root(), &["status"]));
    let headings: Vec<&str> = out.lines().filter(|l| l.starts_with("Devices using")).collect();
    assert_eq!(
        headings,
        [
            "Devices using a userspace driver (DPDK/SPDK-compatible)",
            "Devices using a kernel driver",
            "Devices using no driver"
        ],
        "{out}"
    );
    let sections: Vec<&str> = out.split("\n\n").collect();
    assert_eq!(sections.len(), 3, "{out}");
    assert!(
        has_line(
            sections[0],
            "0000:01:00.0",
            "1b36:0010",
            "drv=vfio-pci unused=uio_pci_generic"
        ),
        "{out}"
    );
    assert!(
        has_line(
            sections[1],
            "0000:00:03.0",
            "8086:1533",
            "if=eth0 drv=e1000e unused=vfio-pci,uio_pci_generic *Active*"
        ),
        "{out}"
    );
    assert!(
        has_line(
            sections[1],
            "0000:02:00.0",
            "1b36:0010",
            "block=nvme0n1 drv=nvme unused=vfio-pci,uio_pci_generic *Active*"
        ),
        "{out}"
    );
    assert!(
        has_line(
            sections[2],
            "0000:00:04.0",
            "8086:1533",
            "if=eth1 unused=vfio-pci,uio_pci_generic"
        ),
        "{out}"
    );
}

#[test]
fn status_json_uses_hex_strings_and_says_why_a_device_is_active() {
    let fake = tree();
    let v: Value = serde_json::from_str(&stdout(&pcibus(fake.root(), &["status", "--json"]))).unwrap();
    let list = v.as_array().unwrap();
    let addrs: Vec<&str> = list.iter().map(|d| d["address"].as_str().unwrap()).collect();
    assert_eq!(
        addrs,
        ["0000:00:03.0", "0000:00:04.0", "0000:01:00.0", "0000:02:00.0"]
    );
    let nvme = &list[3];
    let keys: Vec<&str> = nvme.as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        [
            "address",
            "vendor",
            "device",
            "class",
            "vendor_name",
            "device_name",
            "driver",
            "group",
            "unused",
            "interfaces",
            "disks",
            "active",
            "uses"
        ]
    );
    assert_eq!(nvme["vendor"], "1b36");
    assert_eq!(nvme["device"], "0010");
    assert_eq!(nvme["class"], "010802");
    assert_eq!(nvme["driver"], "nvme");
    assert_eq!(nvme["group"], "kernel");
    assert_eq!(nvme["disks"], serde_json::json!(["nvme0n1"]));
    assert_eq!(nvme["active"], true);
    assert_eq!(
        nvme["uses"],
        serde_json::json!(["block device nvme0n1 has holders (LVM, MD or dm)"])
    );
    assert_eq!(
        list[0]["uses"],
        serde_json::json!(["network interface eth0 is up"])
    );
    assert_eq!(list[1]["group"], "none");
    assert_eq!(list[1]["driver"], Value::Null);
    assert_eq!(list[1]["active"], false, "eth1 is down");
    assert_eq!(list[2]["group"], "userspace");
}

#[test]
fn status_filters_by_kind_and_selector() {
    let fake = tree();
    let addrs = |args: &[&str]| -> Vec<String> {
        let mut all = vec!["status", "--json"];
        all.extend_from_slice(args);
        let v: Value = serde_json::from_str(&stdout(&pcibus(fake.root(), &all))).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .map(|d| d["address"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(addrs(&["--kind", "net"]), ["0000:00:03.0", "0000:00:04.0"]);
    assert_eq!(addrs(&["--kind", "nvme"]), ["0000:01:00.0", "0000:02:00.0"]);
    assert_eq!(addrs(&["--kind", "storage"]), ["0000:01:00.0", "0000:02:00.0"]);
    assert!(addrs(&["--kind", "crypto"]).is_empty());
    assert_eq!(addrs(&["-d", "8086:", "--class", "010802"]).len(), 4);
    assert_eq!(addrs(&["--all-nvme"]), ["0000:01:00.0", "0000:02:00.0"]);
    let out = stdout(&pcibus(fake.root(), &["status", "--kind", "crypto"]));
    assert_eq!(out, "No devices\n");
}

// The subcommands `pcibus --help` lists.
fn subcommands() -> Vec<String> {
    let o = Command::new(env!("CARGO_BIN_EXE_pcibus"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8(o.stdout).unwrap();
    let section = help.split("Commands:").nth(1).unwrap();
    let names: Vec<String> = section
        .lines()
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        // Wrapped descriptions are indented further.
        .filter(|l| !l.starts_with("   "))
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .filter(|n| n != "help")
        .collect();
    for n in ["list", "bind", "unbind", "status", "setup", "completions", "man"] {
        assert!(names.iter().any(|x| x == n), "{n} in {names:?}");
    }
    names
}

#[test]
fn completions_name_every_subcommand_and_exist_for_each_shell() {
    let root = Path::new("/nonexistent");
    let bash = stdout(&pcibus(root, &["completions", "bash"]));
    assert!(bash.contains("complete -F _pcibus"), "{bash}");
    for name in subcommands() {
        assert!(bash.contains(&format!("pcibus,{name})")), "bash completes {name}");
    }
    assert!(bash.contains("--all-nvme"), "options of subcommands too");
    for shell in ["zsh", "fish", "elvish", "powershell"] {
        let out = stdout(&pcibus(root, &["completions", shell]));
        assert!(out.contains("setup"), "{shell}: {out}");
    }
    let o = pcibus(root, &["completions", "tcsh"]);
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn man_page_is_roff_naming_every_subcommand() {
    let man = stdout(&pcibus(Path::new("/nonexistent"), &["man"]));
    assert!(man.lines().any(|l| l.starts_with(".TH pcibus 1")), "{man}");
    assert!(man.contains(".SH SUBCOMMANDS"), "{man}");
    for name in subcommands() {
        assert!(man.contains(&format!("pcibus\\-{name}")), "man names {name}");
    }
}
