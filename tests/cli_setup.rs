//! `pcibus bind`/`unbind` of several devices and by selector, and `pcibus setup`
//! (config, reset, status), run as a user would on fake sysfs trees.

#[path = "common/cli.rs"]
mod cli;
use cli::{code, pcibus, pcibus_env};
#[path = "common/kernel.rs"]
mod kernel;

use std::path::{Path, PathBuf};

use kernel::FakeKernel;
use pcibus::testing::FakeSysfs;
use serde_json::Value;

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn nvme(fake: &FakeSysfs, address: &str, driver: Option<&str>) -> PathBuf {
    let mut b = fake
        .device(address)
        .vendor(0x1b36)
        .device_id(0x0010)
        .class(0x010802);
    if let Some(d) = driver {
        b = b.driver(d);
    }
    b.create().unwrap()
}

// A disk below the device with a holder (LVM, MD, dm): the host uses it.
fn held_disk(fake: &FakeSysfs, dir: &Path, disk: &str) {
    std::fs::create_dir_all(dir.join("block").join(disk)).unwrap();
    std::fs::create_dir_all(fake.root().join("class/block").join(disk).join("holders/dm-0")).unwrap();
}

fn override_of(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("driver_override")).unwrap()
}

fn driver_of(dir: &Path) -> Option<String> {
    std::fs::read_link(dir.join("driver"))
        .ok()
        .map(|t| t.file_name().unwrap().to_string_lossy().into_owned())
}

/// NVMe controllers at 01:00.0 and 02:00.0 on nvme, 03:00.0 on nvme with a held disk,
/// an Ethernet controller (8086:1533) at 00:03.0 on e1000e; vfio-pci loaded.
fn tree() -> (FakeSysfs, [PathBuf; 4]) {
    let fake = FakeSysfs::new().unwrap();
    let a = nvme(&fake, "0000:01:00.0", Some("nvme"));
    let b = nvme(&fake, "0000:02:00.0", Some("nvme"));
    let c = nvme(&fake, "0000:03:00.0", Some("nvme"));
    held_disk(&fake, &c, "nvme2n1");
    let e = fake.device("0000:00:03.0").driver("e1000e").create().unwrap();
    fake.mkdir("bus/pci/drivers/vfio-pci").unwrap();
    (fake, [a, b, c, e])
}

#[test]
fn bind_of_several_devices_reports_each_and_goes_on_after_a_failure() {
    let (fake, [a, b, c, _]) = tree();
    let k = FakeKernel::start(fake.root(), "nvme");
    let o = pcibus(
        fake.root(),
        &["bind", "03:00.0", "01:00.0", "0000:02:00.0", "vfio-pci"],
    );
    assert_eq!(k.finish(), ["0000:01:00.0", "0000:02:00.0"]);
    let (out, err) = (text(&o.stdout), text(&o.stderr));
    assert_eq!(code(&o), 1, "{err}");
    assert_eq!(
        out,
        "0000:01:00.0: nvme -> vfio-pci\n0000:02:00.0: nvme -> vfio-pci\n"
    );
    assert!(
        err.contains("pcibus: 0000:03:00.0 is in use: block device nvme2n1 has holders"),
        "{err}"
    );
    assert!(
        err.lines()
            .last()
            .unwrap()
            .contains("bind failed for 1 of 3 devices: 0000:03:00.0"),
        "{err}"
    );
    assert_eq!(driver_of(&a).as_deref(), Some("vfio-pci"));
    assert_eq!(driver_of(&b).as_deref(), Some("vfio-pci"));
    assert_eq!(driver_of(&c).as_deref(), Some("nvme"));
    assert_eq!(override_of(&c), "(null)\n", "the refused one is untouched");

    // --force takes the one in use too.
    let k = FakeKernel::start(fake.root(), "nvme");
    let o = pcibus(fake.root(), &["bind", "--force", "--driver", "vfio-pci", "3:0.0"]);
    assert_eq!(k.finish(), ["0000:03:00.0"]);
    assert_eq!(code(&o), 0, "{}", text(&o.stderr));
    assert_eq!(text(&o.stdout), "0000:03:00.0: nvme -> vfio-pci\n");
}

#[test]
fn bind_address_driver_works_as_before() {
    let (fake, [a, _, c, _]) = tree();
    let k = FakeKernel::start(fake.root(), "nvme");
    let o = pcibus(fake.root(), &["bind", "01:00.0", "vfio-pci"]);
    k.finish();
    assert_eq!(code(&o), 0, "{}", text(&o.stderr));
    assert_eq!(text(&o.stdout), "0000:01:00.0: nvme -> vfio-pci\n");
    assert_eq!(override_of(&a), "vfio-pci");
    // One device's failure is the command's error, without a summary line.
    let o = pcibus(fake.root(), &["bind", "03:00.0", "vfio-pci"]);
    let err = text(&o.stderr);
    assert_eq!(code(&o), 1, "{err}");
    assert!(err.contains("0000:03:00.0 is in use"), "{err}");
    assert!(!err.contains("failed for"), "{err}");
    assert_eq!(override_of(&c), "(null)\n");
}

#[test]
fn bind_by_selector_takes_only_the_matching_devices() {
    let (fake, [a, b, c, e]) = tree();
    // Without a kernel nothing takes the devices: each is rolled back, and its probe
    // written, which tells which were tried.
    for sel in [
        &["--all-nvme"][..],
        &["--class", "0108"],
        &["-d", "1b36:"],
        &["-d", ":0010:0108"],
    ] {
        for d in [&a, &b, &c, &e] {
            std::fs::write(d.join("driver_override"), "(null)\n").unwrap();
        }
        let _ = std::fs::remove_file(fake.root().join("bus/pci/drivers_probe"));
        let mut args = vec!["bind"];
        args.extend_from_slice(sel);
        args.push("vfio-pci");
        let o = pcibus(fake.root(), &args);
        let err = text(&o.stderr);
        assert_eq!(code(&o), 1, "{sel:?}: {err}");
        assert!(
            err.contains("bind failed for 3 of 3 devices: 0000:01:00.0, 0000:02:00.0, 0000:03:00.0"),
            "{sel:?}: {err}"
        );
        assert!(
            err.contains("0000:01:00.0 is on nvme after probing, not vfio-pci"),
            "{err}"
        );
        assert_eq!(override_of(&a), "\n", "tried, rolled back");
        assert_eq!(
            override_of(&e),
            "(null)\n",
            "{sel:?}: the Ethernet controller untouched"
        );
        assert_eq!(
            std::fs::read_to_string(fake.root().join("bus/pci/drivers_probe")).unwrap(),
            "0000:02:00.0",
            "the last one probed (03:00.0 is in use)"
        );
    }
    // A selector that matches nothing is an error, not a silent success.
    let o = pcibus(fake.root(), &["bind", "-d", "abcd:", "vfio-pci"]);
    assert_eq!(code(&o), 1);
    assert!(text(&o.stderr).contains("no device"), "{}", text(&o.stderr));
}

#[test]
fn bind_usage_errors_exit_2_and_touch_nothing() {
    let (fake, [a, ..]) = tree();
    for (args, want) in [
        (&["bind"][..], "no driver"),
        (&["bind", "vfio-pci"], "no device"),
        (&["bind", "01:00.0", "02:00.0"], "must be the driver"),
        (&["bind", "01:zz.0", "vfio-pci"], "bad device address \"01:zz.0\""),
        (&["bind", "-d", "8086", "vfio-pci"], "[VVVV]:[DDDD]"),
        (&["bind", "--class", "1", "vfio-pci"], "2, 4 or 6 hex digits"),
        (&["unbind"], "no device"),
    ] {
        let o = pcibus(fake.root(), args);
        let err = text(&o.stderr);
        assert_eq!(code(&o), 2, "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
        assert_eq!(override_of(&a), "(null)\n", "{args:?}");
        assert!(!fake.root().join("bus/pci/drivers_probe").exists(), "{args:?}");
    }
    // A huge bad address is not echoed whole.
    let long = "x".repeat(100_000);
    let o = pcibus(fake.root(), &["bind", &long, "vfio-pci"]);
    assert_eq!(code(&o), 2);
    assert!(o.stderr.len() < 2000, "{} bytes", o.stderr.len());
}

#[test]
fn unbind_of_several_devices_goes_on_after_a_refusal_and_force_takes_it() {
    let (fake, [_, _, c, _]) = tree();
    let unbind = fake.root().join("bus/pci/drivers/nvme/unbind");
    let o = pcibus(fake.root(), &["unbind", "01:00.0", "03:00.0"]);
    let err = text(&o.stderr);
    assert_eq!(code(&o), 1, "{err}");
    assert_eq!(text(&o.stdout), "0000:01:00.0: unbound from nvme\n");
    assert!(
        err.contains("unbind failed for 1 of 2 devices: 0000:03:00.0"),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(&unbind).unwrap(), "0000:01:00.0");
    let o = pcibus(fake.root(), &["unbind", "--force", "-d", "8086:1533", "03:00.0"]);
    assert_eq!(code(&o), 0, "{}", text(&o.stderr));
    assert_eq!(
        text(&o.stdout),
        "0000:00:03.0: unbound from e1000e\n0000:03:00.0: unbound from nvme\n"
    );
    assert_eq!(std::fs::read_to_string(&unbind).unwrap(), "0000:03:00.0");
    assert_eq!(override_of(&c), "\n");
}

/// The setup tree: NVMe 01:00.0 and 02:00.0 on nvme (02 with a held disk), 03:00.0 on
/// vfio-pci, an Ethernet controller on e1000e; and the setup directory.
fn setup_tree() -> (FakeSysfs, tempfile::TempDir, [PathBuf; 4]) {
    let fake = FakeSysfs::new().unwrap();
    let a = nvme(&fake, "0000:01:00.0", Some("nvme"));
    let b = nvme(&fake, "0000:02:00.0", Some("nvme"));
    held_disk(&fake, &b, "nvme1n1");
    let c = nvme(&fake, "0000:03:00.0", Some("vfio-pci"));
    let e = fake.device("0000:00:03.0").driver("e1000e").create().unwrap();
    (fake, tempfile::tempdir().unwrap(), [a, b, c, e])
}

#[test]
fn setup_binds_the_free_nvme_controllers_skips_active_ones_and_reset_gives_them_back() {
    let (fake, dir, [a, b, c, e]) = setup_tree();
    let setup_dir = dir.path().to_str().unwrap();
    let k = FakeKernel::start(fake.root(), "nvme");
    let o = pcibus(fake.root(), &["setup", "--setup-dir", setup_dir]);
    assert_eq!(k.finish(), ["0000:01:00.0"]);
    let (out, err) = (text(&o.stdout), text(&o.stderr));
    assert_eq!(code(&o), 0, "{err}");
    assert_eq!(
        out,
        "0000:01:00.0 (1b36 0010): nvme -> vfio-pci\n\
         0000:02:00.0 (1b36 0010): Active devices: block device nvme1n1 has holders (LVM, MD or dm), so not binding PCI dev\n\
         0000:03:00.0 (1b36 0010): already on vfio-pci\n"
    );
    assert_eq!(driver_of(&a).as_deref(), Some("vfio-pci"));
    assert_eq!(driver_of(&b).as_deref(), Some("nvme"));
    assert_eq!(driver_of(&e).as_deref(), Some("e1000e"));
    // The way back is recorded for the one it took, and only for it.
    assert_eq!(
        std::fs::read_to_string(dir.path().join("0000:01:00.0")).unwrap(),
        "nvme\n"
    );
    assert!(!dir.path().join("0000:02:00.0").exists());
    assert!(!dir.path().join("0000:03:00.0").exists());

    // `setup status`: the NVMe controllers only.
    let o = pcibus(
        fake.root(),
        &["setup", "status", "--json", "--setup-dir", setup_dir],
    );
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    let got: Vec<(&str, &str, bool)> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["address"].as_str().unwrap(),
                d["group"].as_str().unwrap(),
                d["active"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            ("0000:01:00.0", "userspace", false),
            ("0000:02:00.0", "kernel", true),
            ("0000:03:00.0", "userspace", false),
        ]
    );

    // `setup reset`: 01:00.0 back to its recorded driver, 03:00.0 (no record) to nvme;
    // a record naming another driver wins.
    std::fs::write(dir.path().join("0000:03:00.0"), "acme\n").unwrap();
    fake.mkdir("bus/pci/drivers/acme").unwrap();
    let k = FakeKernel::start(fake.root(), "vfio-pci");
    let o = pcibus_env(
        fake.root(),
        &["setup", "reset"],
        &[("PCIBUS_SETUP_DIR", setup_dir)],
    );
    assert_eq!(k.finish(), ["0000:01:00.0", "0000:03:00.0"]);
    assert_eq!(code(&o), 0, "{}", text(&o.stderr));
    assert_eq!(
        text(&o.stdout),
        "0000:01:00.0 (1b36 0010): vfio-pci -> nvme\n\
         0000:02:00.0 (1b36 0010): already on nvme\n\
         0000:03:00.0 (1b36 0010): vfio-pci -> acme\n"
    );
    assert_eq!(driver_of(&a).as_deref(), Some("nvme"));
    assert_eq!(driver_of(&c).as_deref(), Some("acme"));
    // driver_override cleared, records gone.
    assert_eq!(override_of(&a), "\n");
    assert_eq!(override_of(&c), "\n");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);

    // A device on another kernel driver is left alone.
    let k = FakeKernel::start(fake.root(), "acme");
    let o = pcibus(fake.root(), &["setup", "reset", "--setup-dir", setup_dir]);
    assert_eq!(k.finish(), Vec::<String>::new());
    assert!(
        text(&o.stdout).contains("0000:03:00.0 (1b36 0010): on kernel driver acme, left as it is"),
        "{}",
        text(&o.stdout)
    );
}

#[test]
fn setup_reset_with_no_record_binds_nvme() {
    let (fake, dir, [_, _, c, _]) = setup_tree();
    let k = FakeKernel::start(fake.root(), "vfio-pci");
    let o = pcibus(
        fake.root(),
        &["setup", "reset", "--setup-dir", dir.path().to_str().unwrap()],
    );
    assert_eq!(k.finish(), ["0000:03:00.0"]);
    assert_eq!(code(&o), 0, "{}", text(&o.stderr));
    assert!(
        text(&o.stdout).contains("0000:03:00.0 (1b36 0010): vfio-pci -> nvme\n"),
        "{}",
        text(&o.stdout)
    );
    assert_eq!(driver_of(&c).as_deref(), Some("nvme"));
}

#[test]
fn setup_takes_allow_and_block_lists_from_options_and_the_environment() {
    let (fake, dir, [a, b, ..]) = setup_tree();
    let setup_dir = dir.path().to_str().unwrap();
    for (args, env) in [
        (
            &["setup", "--setup-dir", setup_dir, "-b", "0000:01:00.0"][..],
            &[][..],
        ),
        (
            &["setup", "--setup-dir", setup_dir],
            &[("PCI_BLOCKED", "0000:01:00.0 0000:03:00.0")],
        ),
        (
            &["setup", "--setup-dir", setup_dir],
            &[("PCI_ALLOWED", "0000:02:00.0")],
        ),
        (&["setup", "--setup-dir", setup_dir, "--allow", "2:0.0"], &[]),
    ] {
        let o = pcibus_env(fake.root(), args, env);
        let out = text(&o.stdout);
        assert_eq!(code(&o), 0, "{args:?} {env:?}: {}", text(&o.stderr));
        assert!(
            out.starts_with("0000:01:00.0 (1b36 0010): skipped, "),
            "{args:?} {env:?}: {out}"
        );
        assert!(out.contains("0000:02:00.0 (1b36 0010): Active devices"), "{out}");
        assert_eq!(override_of(&a), "(null)\n", "{args:?} {env:?}");
        assert_eq!(override_of(&b), "(null)\n");
    }
    let o = pcibus_env(fake.root(), &["setup"], &[("PCI_BLOCKED", "nonsense")]);
    assert_eq!(code(&o), 2, "{}", text(&o.stderr));
}

#[test]
fn a_failed_setup_bind_is_reported_rolled_back_and_not_recorded() {
    let (fake, dir, [a, ..]) = setup_tree();
    // No kernel: vfio-pci never takes 01:00.0.
    let o = pcibus(
        fake.root(),
        &["setup", "--setup-dir", dir.path().to_str().unwrap()],
    );
    let err = text(&o.stderr);
    assert_eq!(code(&o), 1, "{err}");
    assert!(
        err.contains("pcibus: 0000:01:00.0 is on nvme after probing, not vfio-pci"),
        "{err}"
    );
    assert!(err.contains("setup failed for 1: 0000:01:00.0"), "{err}");
    assert!(
        !dir.path().join("0000:01:00.0").exists(),
        "no record of a bind that did not happen"
    );
    assert_eq!(override_of(&a), "\n");
    // The others were still done.
    assert!(text(&o.stdout).contains("0000:03:00.0 (1b36 0010): already on vfio-pci"));
}
