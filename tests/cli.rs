//! The `pcibus` command line, run as a user would.

#[path = "common/cli.rs"]
mod cli;
use cli::{code, fixture, pcibus, stdout};
#[path = "common/skip.rs"]
mod skip;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use pcibus::testing::FakeSysfs;
use serde_json::Value;

// The schema's `device` (schema/pcibus-v1.schema.json), in the order printed.
const KEYS: [&str; 26] = [
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
    "bars",
    "sriov",
    "physfn",
    "removal_pending",
    "removal_reasons",
    "driver_override",
    "sriov_vf_total_msix",
    "uevent",
    "problems",
    "vendor_name",
    "device_name",
    "subsystem_vendor_name",
    "subsystem_name",
    "class_name",
    "subclass_name",
    "prog_if_name",
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
    assert_eq!(pf["vendor"], "1b36");
    assert_eq!(pf["device"], "0010");
    assert_eq!(pf["class"], "010802");
    assert_eq!(pf["driver"], "nvme");
    assert_eq!(pf["iommu_group"], 3);
    assert_eq!(pf["numa_node"], Value::Null);
    assert_eq!(pf["physfn"], Value::Null);
    assert_eq!(
        pf["sriov"],
        serde_json::json!({"total_vfs": 2, "num_vfs": null, "vf_offset": 1, "vf_stride": 1,
            "vf_device": "0010", "virtfns": ["0000:01:00.1", "0000:01:00.2"]})
    );
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
    // Revision and subsystem ids sit beside the ids and the class.
    assert!(
        lines[1].starts_with("0000:00:00.0  8086:0d57 00  060000 0000:0000"),
        "{out}"
    );
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
fn a_hostile_tree_lists_and_does_not_hang() {
    let fake = FakeSysfs::new().unwrap();
    fake.device("0000:00:02.0")
        .fifo("uevent")
        .fifo("driver_override")
        .create()
        .unwrap();
    fake.device("0000:00:03.0")
        .attr("modalias", b"pci:garbage\n".to_vec())
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
    // Bad attributes are problems in the listing (exit 0); the FIFOs asked for with
    // --read all do not answer (exit 3).
    for (args, want) in [
        (&["list"][..], 0),
        (&["list", "--json"], 0),
        (&["list", "--read", "all", "--timeout", "100"], 3),
    ] {
        let o = pcibus(fake.root(), args);
        assert_eq!(code(&o), want, "{args:?}: {}", String::from_utf8_lossy(&o.stderr));
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
    let vendor = bad["problems"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["attribute"] == "vendor")
        .expect("a problem for vendor");
    assert!(vendor["error"].as_str().unwrap().contains("\"garbage\""));
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
        ("104c".into(), "ac56".into())
    );
    assert_eq!(
        v["details"]["capabilities"],
        serde_json::json!([{"id": "01", "offset": 0xa0, "name": "Power Management"}])
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

#[test]
fn vfio_info_refuses_a_root_that_is_not_the_kernels_sysfs() {
    // Its IOMMU group numbers are not this system's /dev/vfio/N.
    let fake = fixture("qemu-q35-sriov-nvme.pcifix");
    let o = pcibus(fake.root(), &["vfio", "info", "01:00.0"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(code(&o), 1, "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains(&fake.root().display().to_string()), "{err}");
    assert!(err.contains("is not the kernel's sysfs"), "{err}");
    assert!(
        !err.contains("/dev/vfio"),
        "nothing of the host was opened: {err}"
    );
}

#[test]
fn vfio_irq_test_refuses_a_root_that_is_not_the_kernels_sysfs() {
    let fake = fixture("qemu-q35-sriov-nvme.pcifix");
    let o = pcibus(
        fake.root(),
        &["vfio", "irq-test", "01:00.0", "--kind", "msix", "--loopback"],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(code(&o), 1, "{err}");
    assert!(err.contains("is not the kernel's sysfs"), "{err}");
    assert!(
        !err.contains("/dev/vfio"),
        "nothing of the host was opened: {err}"
    );
}

#[test]
fn the_vfio_backend_is_checked_before_anything_runs() {
    let fake = fixture("qemu-q35-sriov-nvme.pcifix");
    let o = pcibus(fake.root(), &["--vfio-backend", "container", "list"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(code(&o), 2, "{err}");
    assert!(err.contains("auto, group, iommufd"), "{err}");
    // The variable is the option's default, checked by the commands that open devices.
    let o = Command::new(env!("CARGO_BIN_EXE_pcibus"))
        .args([
            "--sysfs",
            fake.root().to_str().unwrap(),
            "vfio",
            "info",
            "01:00.0",
        ])
        .env("PCIBUS_VFIO_BACKEND", "vfio")
        .output()
        .unwrap();
    assert_eq!(code(&o), 2, "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("PCIBUS_VFIO_BACKEND")
            || String::from_utf8_lossy(&o.stderr).contains("'vfio'")
    );
}

#[test]
fn iommufd_on_a_kernel_without_it_says_what_is_missing() {
    if Path::new("/dev/iommu").exists() {
        skip::skip("this kernel has /dev/iommu");
        return;
    }
    let Some(dev) = std::fs::read_dir("/sys/bus/pci/devices")
        .ok()
        .and_then(|mut d| d.next())
        .and_then(|e| e.ok())
    else {
        skip::skip("no PCI device here");
        return;
    };
    let addr = dev.file_name().to_string_lossy().into_owned();
    // `vfio info` claims the device first: in a directory of this test's, and leaving
    // SPDK's files in /var/tmp alone.
    let claims = tempfile::tempdir().unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_pcibus"))
        .args([
            "--sysfs",
            "/sys",
            "--vfio-backend",
            "iommufd",
            "vfio",
            "info",
            &addr,
        ])
        .env("PCIBUS_CLAIM_DIR", claims.path())
        .env("PCIBUS_SPDK_LOCK_DIR", "")
        .env_remove("PCIBUS_SYSFS")
        .env_remove("SYSFS_PCI_DEVICES")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(code(&o), 1, "{err}");
    assert!(
        err.contains("cannot open /dev/iommu") && err.contains("CONFIG_IOMMUFD"),
        "{err}"
    );
    assert!(err.contains("--vfio-backend group"), "names the way out: {err}");
}

// A disk this machine has mounted, by the name sysfs would give it ("vda", "nvme0n1p2").
fn a_host_mounted_disk() -> Option<String> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    mounts.lines().find_map(|l| {
        let name = l.split_whitespace().next()?.strip_prefix("/dev/")?;
        name.bytes()
            .all(|b| b.is_ascii_alphanumeric())
            .then(|| name.to_owned())
    })
}

#[test]
fn unbind_on_a_fake_tree_writes_its_files_and_ignores_the_hosts_mounts() {
    let disk = a_host_mounted_disk().unwrap_or_else(|| "nvme0n1".into());
    let fake = FakeSysfs::new().unwrap();
    let dir = fake
        .device("0000:01:00.0")
        .class(0x010802)
        .driver("nvme")
        .create()
        .unwrap();
    std::fs::create_dir_all(dir.join("block").join(&disk)).unwrap();
    let o = pcibus(fake.root(), &["unbind", "01:00.0"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(code(&o), 0, "{err}");
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "0000:01:00.0: unbound from nvme\n"
    );
    assert!(err.contains("is not the kernel's sysfs"), "{err}");
    assert!(err.contains("mounts"), "{err}");
    assert_eq!(
        std::fs::read_to_string(fake.root().join("bus/pci/drivers/nvme/unbind")).unwrap(),
        "0000:01:00.0"
    );
    // What the tree itself shows still counts.
    let fake = FakeSysfs::new().unwrap();
    let dir = fake.device("0000:01:00.0").driver("nvme").create().unwrap();
    std::fs::create_dir_all(dir.join("block/nvme0n1")).unwrap();
    std::fs::create_dir_all(fake.root().join("class/block/nvme0n1/holders/dm-0")).unwrap();
    let o = pcibus(fake.root(), &["unbind", "01:00.0"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(code(&o), 1, "{err}");
    assert!(err.contains("block device nvme0n1 has holders"), "{err}");
}

#[test]
fn exit_3_when_guarded_reads_do_not_answer() {
    // Scripts must be able to tell a complete listing from one with holes.
    let fake = fixture("qemu-q35-sriov-nvme.pcifix");
    for args in [
        &["list", "--read", "all", "--timeout", "100"][..],
        &["list", "--json", "--read", "all"],
        &["show", "01:00.0", "--json"],
    ] {
        let o = pcibus(fake.root(), args);
        assert_eq!(code(&o), 0, "{args:?}: {}", String::from_utf8_lossy(&o.stderr));
    }
    let fake = FakeSysfs::new().unwrap();
    fake.device("0000:00:02.0").create().unwrap();
    fake.device("0000:00:03.0")
        .sriov_totalvfs(4)
        .fifo("sriov_numvfs")
        .fifo("uevent")
        .create()
        .unwrap();
    let t0 = Instant::now();
    let o = pcibus(
        fake.root(),
        &["list", "--json", "--read", "all", "--timeout", "100"],
    );
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    assert_eq!(code(&o), 3, "{}", String::from_utf8_lossy(&o.stderr));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        v.as_array().unwrap().len(),
        2,
        "the listing is printed all the same"
    );
    let kinds: Vec<&str> = v[1]["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["kind"].as_str().unwrap())
        .collect();
    assert!(
        kinds.iter().all(|k| ["timed_out", "not_started"].contains(k)),
        "{kinds:?}"
    );
    assert!(!kinds.is_empty());
    let o = pcibus(fake.root(), &["show", "00:03.0", "--timeout", "100"]);
    assert_eq!(code(&o), 3, "{}", String::from_utf8_lossy(&o.stderr));
    // Without --read the FIFOs are not asked for: complete.
    assert_eq!(code(&pcibus(fake.root(), &["list"])), 0);
}

#[test]
fn help_documents_the_exit_status() {
    let o = Command::new(env!("CARGO_BIN_EXE_pcibus"))
        .arg("--help")
        .output()
        .unwrap();
    let help = stdout(&o);
    for want in [
        "Exit status:",
        "  0 ",
        "  1 ",
        "  2 ",
        "  3 ",
        "not the kernel's sysfs",
    ] {
        assert!(help.contains(want), "missing {want:?} in\n{help}");
    }
}

#[test]
fn list_takes_dpdk_allow_and_block_lists() {
    let fake = fixture("qemu-q35-sriov-nvme.pcifix");
    let addresses = |args: &[&str]| -> Vec<String> {
        let o = pcibus(fake.root(), args);
        assert_eq!(code(&o), 0, "{args:?}: {}", String::from_utf8_lossy(&o.stderr));
        let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .map(|d| d["address"].as_str().unwrap().to_owned())
            .collect()
    };
    // Domain 0 implied, per-device arguments accepted, repeatable.
    assert_eq!(
        addresses(&["list", "--json", "-a", "01:00.0,k=v", "-a", "0000:01:00.2"]),
        ["0000:01:00.0", "0000:01:00.2"]
    );
    let all = addresses(&["list", "--json"]);
    let rest = addresses(&["list", "--json", "-b", "0000:01:00.1", "-b", "00:1f.3"]);
    assert_eq!(rest.len(), all.len() - 2);
    assert!(!rest.iter().any(|a| a == "0000:01:00.1" || a == "0000:00:1f.3"));
    // Contradictions and bad text are errors that quote what was typed.
    let o = pcibus(fake.root(), &["list", "-a", "01:00.0", "-b", "01:00.0"]);
    assert_eq!(code(&o), 2);
    assert!(String::from_utf8_lossy(&o.stderr).contains("both allowed and blocked"));
    let o = pcibus(fake.root(), &["list", "-a", "zz"]);
    assert_eq!(code(&o), 2);
    assert!(String::from_utf8_lossy(&o.stderr).contains("\"zz\""));
}

#[test]
fn watch_prints_uevents_as_json_lines_and_exits_0_on_sigint() {
    use std::io::{BufRead, BufReader};
    // A harmless event: `change` on /dev/null's device (no driver reacts to it). Needs root
    // to write it and a kernel that delivers uevents here.
    let trigger = Path::new("/sys/devices/virtual/mem/null/uevent");
    if std::fs::OpenOptions::new().write(true).open(trigger).is_err() {
        skip::skip(format!("cannot write {} (not root?)", trigger.display()));
        return;
    }
    let mut child = Command::new(env!("CARGO_BIN_EXE_pcibus"))
        .args(["watch", "--json", "--all"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    // Until the monitor is listening, events are missed: trigger until one is seen.
    let uuid = "5e1f0a7c-0000-4000-8000-00000000c11a";
    let mut seen = None;
    for _ in 0..50 {
        std::fs::write(trigger, format!("change {uuid}")).unwrap();
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(100)) {
            seen = Some(line);
            break;
        }
    }
    let Some(line) = seen else {
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        let _ = child.wait();
        skip::skip("no uevent reached `pcibus watch` (none delivered in this namespace?)");
        return;
    };
    let v: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["action"], "change");
    assert_eq!(v["devpath"], "/devices/virtual/mem/null");
    assert_eq!(v["subsystem"], "mem");
    assert_eq!(v["address"], Value::Null);
    assert!(v["seqnum"].as_u64().is_some());
    // Not a PCI function's event: the device map is not touched.
    assert_eq!(v["map"]["change"], "not_pci");
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "{status:?}");
}

// `pcibus nvme` commands need a real device; without one, what can be checked is that the
// arguments parse (or are refused) and that input files are checked before any device is
// touched.
#[test]
fn nvme_log_and_passthru_arguments_are_checked_before_the_device() {
    let fake = fixture("qemu-q35-sriov-nvme.pcifix");
    let run = |args: &[&str]| {
        let o = pcibus(fake.root(), args);
        (o.status.code(), String::from_utf8_lossy(&o.stderr).into_owned())
    };
    // Well-formed: they get as far as needing the kernel's sysfs.
    for args in [
        &["nvme", "smart-log", "0000:01:00.0", "--json"][..],
        &["nvme", "error-log", "0000:01:00.0"],
        &[
            "nvme",
            "admin-passthru",
            "0000:01:00.0",
            "--opcode",
            "0x06",
            "--cdw10",
            "1",
            "--read",
            "--data-len",
            "4096",
        ],
    ] {
        let (code, err) = run(args);
        assert_eq!(code, Some(1), "{args:?}: {err}");
        assert!(err.contains("nvme needs the kernel's sysfs"), "{args:?}: {err}");
    }
    // Refused by the parser (exit 2).
    for (args, why) in [
        (
            &["nvme", "admin-passthru", "0000:01:00.0", "--opcode", "0x1ff"][..],
            "at most 255",
        ),
        (
            &[
                "nvme",
                "admin-passthru",
                "0000:01:00.0",
                "--opcode",
                "6",
                "--cdw10",
                "x",
            ],
            "expected a number",
        ),
        (
            &[
                "nvme",
                "admin-passthru",
                "0000:01:00.0",
                "--opcode",
                "6",
                "--read",
                "--write",
                "f",
            ],
            "cannot be used with",
        ),
        (
            &[
                "nvme",
                "admin-passthru",
                "0000:01:00.0",
                "--opcode",
                "6",
                "-o",
                "f",
            ],
            "--read",
        ),
    ] {
        let (code, err) = run(args);
        assert_eq!(code, Some(2), "{args:?}: {err}");
        assert!(err.contains(why), "{args:?}: {err}");
    }
    // Checked before the device: no data length, a missing input file.
    let (code, err) = run(&[
        "nvme",
        "admin-passthru",
        "0000:01:00.0",
        "--opcode",
        "6",
        "--read",
    ]);
    assert_eq!(code, Some(1));
    assert!(err.contains("--read needs --data-len"), "{err}");
    let (code, err) = run(&[
        "nvme",
        "admin-passthru",
        "0000:01:00.0",
        "--opcode",
        "0xc1",
        "--write",
        "/nonexistent/in",
    ]);
    assert_eq!(code, Some(1));
    assert!(err.contains("/nonexistent/in"), "{err}");
}

// `pcibus nvme io-passthru` parses as `admin-passthru` does (plus CDW2/3), and checks its
// data arguments before any device is touched.
#[test]
fn nvme_io_passthru_arguments_are_checked_before_the_device() {
    let fake = fixture("qemu-q35-sriov-nvme.pcifix");
    let run = |args: &[&str]| {
        let o = pcibus(fake.root(), args);
        (o.status.code(), String::from_utf8_lossy(&o.stderr).into_owned())
    };
    let base = ["nvme", "io-passthru", "0000:01:00.0", "--opcode"];
    let with = |rest: &[&'static str]| -> Vec<&'static str> { base.iter().chain(rest).copied().collect() };
    let (code, err) = run(&with(&[
        "0x02",
        "--nsid",
        "1",
        "--cdw2",
        "0x10",
        "--cdw12",
        "7",
        "--read",
        "--data-len",
        "4096",
    ]));
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("nvme needs the kernel's sysfs"), "{err}");
    for (args, why) in [
        (with(&["0x1ff"]), "at most 255"),
        (with(&["2", "--cdw3", "x"]), "expected a number"),
        (with(&["2", "--read", "--write", "f"]), "cannot be used with"),
    ] {
        let (code, err) = run(&args);
        assert_eq!(code, Some(2), "{args:?}: {err}");
        assert!(err.contains(why), "{args:?}: {err}");
    }
    let (code, err) = run(&with(&["2", "--read"]));
    assert_eq!(code, Some(1));
    assert!(err.contains("--read needs --data-len"), "{err}");
    let (code, err) = run(&with(&["1", "--write", "/nonexistent/in"]));
    assert_eq!(code, Some(1));
    assert!(err.contains("/nonexistent/in"), "{err}");
}
