//! What the tests that run Debian's `dpdk-test` share (tests/smoke.rs, tests/install_system.rs):
//! the built drop-in, a fake sysfs tree and one `devargs_autotest` run over it.
// Each test binary uses a part of this module.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use pcibus::testing::FakeSysfs;

pub const DPDK_TEST: &str = "/usr/bin/dpdk-test";
pub const PLUGIN_DIR: &str = "/usr/lib/x86_64-linux-gnu/dpdk/pmds-23.0";

/// The cdylib cargo built for this test run.
pub fn built_library() -> PathBuf {
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

pub fn skip_without_dpdk_test(test: &str) -> bool {
    if Path::new(DPDK_TEST).is_file() {
        return false;
    }
    eprintln!("SKIPPED {test}: {DPDK_TEST} is not installed (Debian package dpdk-dev)");
    true
}

/// A fake sysfs (in `parent`, else FakeSysfs's default place): two virtio-net functions
/// bound to the kernel's virtio-pci (which DPDK's net_virtio matches, then fails to map:
/// nothing real is touched), and one with no driver (not listed by DPDK).
pub fn fake_tree(parent: Option<&Path>) -> FakeSysfs {
    let fake = match parent {
        Some(p) => FakeSysfs::new_in(p),
        None => FakeSysfs::new(),
    }
    .expect("temporary sysfs");
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
/// `extra` EAL arguments; `wrap` is the command line's prefix (empty, or unshare...). The
/// environment's `LD_LIBRARY_PATH` is dropped: only `env` sets it.
pub fn run_dpdk_test(env: &[(&str, &Path)], fake: &FakeSysfs, wrap: &[String], extra: &[&str]) -> String {
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
        .env_remove("LD_LIBRARY_PATH")
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

/// The number of lines of `text` that contain `needle`.
pub fn count(text: &str, needle: &str) -> usize {
    text.lines().filter(|l| l.contains(needle)).count()
}

/// What every run through the drop-in must show: DPDK's devargs test passed, exactly one
/// bus "pci" (EAL logs each bus's IOVA wish), served by pcibus (its devargs_parse logged),
/// the scan found the two bound devices and probed the one not blocked (run with
/// `-b 0000:00:05.0`), and not the unbound one.
pub fn assert_drop_in_served(text: &str) {
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

/// A fresh directory under the temporary directory, named after `what` and this process.
pub fn scratch_dir(what: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("pcibus-dpdk-{what}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temporary directory");
    dir
}

/// A directory made by `mktemp -d TEMPLATE`, removed on drop: with what it holds, or, for
/// [`TempDir::shallow`], only when empty (a directory that had mounts on it must never be
/// emptied recursively: a mount left behind would be emptied through it).
pub struct TempDir {
    path: PathBuf,
    recursive: bool,
}

impl TempDir {
    /// `template` is mktemp's, with its `XXXXXX`; a relative one goes to `$TMPDIR`.
    pub fn new(template: &str) -> Self {
        Self::make(template, true)
    }

    /// Like [`new`](Self::new), but dropping it only removes it when it is empty.
    pub fn shallow(template: &str) -> Self {
        Self::make(template, false)
    }

    fn make(template: &str, recursive: bool) -> Self {
        let mut cmd = Command::new("mktemp");
        cmd.arg("-d");
        if !template.starts_with('/') {
            cmd.arg("-t");
        }
        let out = cmd.arg(template).output().expect("mktemp");
        assert!(out.status.success(), "mktemp -d {template}");
        let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        TempDir { path, recursive }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = if self.recursive {
            std::fs::remove_dir_all(&self.path)
        } else {
            std::fs::remove_dir(&self.path)
        };
    }
}
