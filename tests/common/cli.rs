//! Running the `pcibus` binary as a user would, for the CLI tests (`#[path]`-included):
//! on a sysfs root of the test's, with none of the environment variables that would send
//! it elsewhere or change what it prints.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Output};

use pcibus::testing::FakeSysfs;

/// Variables that redirect the CLI (its sysfs root, VFIO backend, log level, setup.sh's
/// lists and record directory): removed from every run; a test sets what it needs.
const CLEARED: [&str; 7] = [
    "PCIBUS_SYSFS",
    "SYSFS_PCI_DEVICES",
    "PCIBUS_VFIO_BACKEND",
    "RUST_LOG",
    "PCI_ALLOWED",
    "PCI_BLOCKED",
    "PCIBUS_SETUP_DIR",
];

/// The fake tree of `fixtures/NAME`.
pub fn fixture(name: &str) -> FakeSysfs {
    FakeSysfs::from_fixture_file(Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures").join(name)).unwrap()
}

/// `pcibus --sysfs ROOT ARGS...`, not started yet.
pub fn command(root: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_pcibus"));
    c.arg("--sysfs").arg(root).args(args);
    for name in CLEARED {
        c.env_remove(name);
    }
    c
}

/// Runs `pcibus --sysfs ROOT ARGS...` to the end.
pub fn pcibus(root: &Path, args: &[&str]) -> Output {
    command(root, args).output().unwrap()
}

/// The same, with these variables set.
pub fn pcibus_env(root: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = command(root, args);
    c.envs(env.iter().copied());
    c.output().unwrap()
}

/// Standard output of a run that must have succeeded (else the test fails with stderr).
pub fn stdout(o: &Output) -> String {
    assert!(
        o.status.success(),
        "exit {:?}, stderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout.clone()).unwrap()
}

/// Standard error, lossily.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The exit status (-1: killed by a signal).
pub fn code(o: &Output) -> i32 {
    o.status.code().unwrap_or(-1)
}
