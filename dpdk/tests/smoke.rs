//! Smoke tests of the drop-in under DPDK's own `dpdk-test` (Debian's dpdk-dev), with no
//! hardware: the PCI devices are a fake sysfs tree (`SYSFS_PCI_DEVICES`, which the stock
//! bus and this one both honour), so no real device is probed.
//!
//! Two ways to load the drop-in without installing it (see dpdk/README.md):
//! - `LD_LIBRARY_PATH` naming a directory with it as `librte_bus_pci.so.23`: EAL still
//!   `dlopen`s the stock file from its default plugin directory, and the drop-in takes that
//!   second "pci" bus off EAL's list on its first scan;
//! - (root) a private copy of the plugin directory, with the drop-in in place of the stock
//!   file, bind-mounted over Debian's in a private mount namespace (`unshare -m`): the
//!   stock library is never loaded.
//!
//! Each test prints a `SKIPPED` line and passes when `dpdk-test` (or, for the second, root
//! or `unshare`) is missing.

use std::path::{Path, PathBuf};
use std::process::Command;

use pcibus::testing::FakeSysfs;

const DPDK_TEST: &str = "/usr/bin/dpdk-test";
const PLUGIN_DIR: &str = "/usr/lib/x86_64-linux-gnu/dpdk/pmds-23.0";

/// The cdylib cargo built for this test run.
fn built_library() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let deps = exe.parent().expect("deps dir");
    [
        deps.join("librte_bus_pci.so"),
        deps.parent().expect("profile dir").join("librte_bus_pci.so"),
    ]
    .into_iter()
    .find(|p| p.is_file())
    .unwrap_or_else(|| panic!("librte_bus_pci.so not found next to {}", exe.display()))
}

fn skip_without_dpdk_test(test: &str) -> bool {
    if Path::new(DPDK_TEST).is_file() {
        return false;
    }
    eprintln!("SKIPPED {test}: {DPDK_TEST} is not installed (Debian package dpdk-dev)");
    true
}

/// A fake sysfs: two virtio-net functions bound to the kernel's virtio-pci (which
/// DPDK's net_virtio matches, then fails to map: nothing real is touched), and one with
/// no driver (not listed by DPDK).
fn fake_tree() -> FakeSysfs {
    let fake = FakeSysfs::new().expect("temporary sysfs");
    for (name, driver) in [
        ("0000:00:04.0", Some("virtio-pci")),
        ("0000:00:05.0", Some("virtio-pci")),
        ("0000:00:06.0", None),
    ] {
        let mut dev = fake
            .device(name)
            .vendor(0x1af4)
            .device_id(0x1000)
            .subsystem(0x1af4, 0x0001)
            .class(0x020000)
            .resources(&[(0xfe000000, 0xfe000fff, 0x40200)]);
        if let Some(d) = driver {
            dev = dev.driver(d);
        }
        dev.create().expect("fake device");
    }
    fake
}

/// Runs `dpdk-test` with `DPDK_TEST=devargs_autotest`, EAL's debug log, the fake tree, and
/// `extra` EAL arguments; `wrap` is the command line's prefix (empty, or unshare...).
fn run_dpdk_test(env: &[(&str, &Path)], fake: &FakeSysfs, wrap: &[String], extra: &[&str]) -> String {
    let devices = fake.root().join("bus/pci/devices");
    let mut words: Vec<String> = wrap.to_vec();
    words.extend(
        [
            "timeout",
            "120",
            DPDK_TEST,
            "--no-huge",
            "-m",
            "128",
            "--no-shconf",
            "-l",
            "0",
            "--log-level=lib.eal:debug",
        ]
        .map(String::from),
    );
    words.extend(extra.iter().map(|s| s.to_string()));
    let mut cmd = Command::new(&words[0]);
    cmd.args(&words[1..])
        .env("DPDK_TEST", "devargs_autotest")
        .env("SYSFS_PCI_DEVICES", &devices);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("running dpdk-test");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "dpdk-test failed ({}):\n{text}", out.status);
    text
}

fn count(text: &str, needle: &str) -> usize {
    text.lines().filter(|l| l.contains(needle)).count()
}

/// What every run must show: DPDK's devargs test passed, exactly one bus "pci" (EAL logs
/// each bus's IOVA wish), served by pcibus (its devargs_parse logged), the scan found the
/// two bound devices and probed the one not blocked, and not the unbound one.
fn assert_common(text: &str) {
    assert!(text.contains("Test OK"), "devargs_autotest did not pass:\n{text}");
    assert_eq!(
        count(text, "Bus pci wants IOVA"),
        1,
        "not exactly one pci bus:\n{text}"
    );
    assert!(
        text.contains("PCI (pcibus): no PCI address specified using 'addr=<id>' in: bus=pci"),
        "the pci bus that parsed devargs is not pcibus's:\n{text}"
    );
    assert_eq!(
        count(
            text,
            "PCI (pcibus): probe PCI driver: net_virtio (1af4:1000) device: 0000:00:04.0"
        ),
        1,
        "the fake virtio device was not scanned and probed:\n{text}"
    );
    assert!(
        !text.contains("device: 0000:00:05.0"),
        "a blocked device was probed:\n{text}"
    );
    assert!(
        !text.contains("0000:00:06.0"),
        "an unbound device was listed:\n{text}"
    );
}

#[test]
fn devargs_autotest_through_ld_library_path() {
    if skip_without_dpdk_test("devargs_autotest_through_ld_library_path") {
        return;
    }
    let lib = tempfile_dir("ldpath");
    std::fs::copy(built_library(), lib.join("librte_bus_pci.so.23")).expect("copy the drop-in");
    let fake = fake_tree();
    let text = run_dpdk_test(&[("LD_LIBRARY_PATH", &lib)], &fake, &[], &["-b", "0000:00:05.0"]);
    if std::env::var_os("SMOKE_SHOW").is_some() {
        eprintln!("{text}");
    }
    assert_common(&text);
    assert_eq!(
        count(&text, "a second bus named \"pci\" is registered"),
        1,
        "the stock bus loaded from the plugin directory was not taken off:\n{text}"
    );
    std::fs::remove_dir_all(&lib).ok();
}

#[test]
fn devargs_autotest_with_a_private_plugin_directory() {
    if skip_without_dpdk_test("devargs_autotest_with_a_private_plugin_directory") {
        return;
    }
    // SAFETY of geteuid: no arguments, no memory.
    if unsafe { libc::geteuid() } != 0 || !Path::new("/usr/bin/unshare").is_file() {
        eprintln!(
            "SKIPPED devargs_autotest_with_a_private_plugin_directory: needs root and unshare(1) \
             for a private mount namespace"
        );
        return;
    }
    // A copy of Debian's plugin directory with the drop-in in place of the stock file.
    let plugins = tempfile_dir("plugins");
    std::fs::remove_dir(&plugins).ok();
    let st = Command::new("cp")
        .args(["-a", PLUGIN_DIR])
        .arg(&plugins)
        .status()
        .expect("cp");
    assert!(st.success(), "copying {PLUGIN_DIR}");
    let target = plugins.join("librte_bus_pci.so.23.0");
    std::fs::remove_file(&target).expect("remove the stock copy");
    std::fs::copy(built_library(), &target).expect("copy the drop-in");
    let fake = fake_tree();
    let wrap = [
        "unshare".to_string(),
        "-m".into(),
        "sh".into(),
        "-c".into(),
        format!("mount --bind {} {PLUGIN_DIR} && exec \"$@\"", plugins.display()),
        "sh".into(),
    ];
    let text = run_dpdk_test(&[], &fake, &wrap, &["-b", "0000:00:05.0"]);
    assert_common(&text);
    assert_eq!(
        count(&text, "a second bus named \"pci\""),
        0,
        "the stock bus was loaded:\n{text}"
    );
    std::fs::remove_dir_all(&plugins).ok();
}

fn tempfile_dir(what: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("pcibus-dpdk-smoke-{what}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temporary directory");
    dir
}
