//! The nvme commands' device argument is devargs text; a bad one is a usage error (exit
//! 2, as main.rs's EXIT_STATUS_HELP says), found before anything is opened or bound, and
//! its message names the argument without echoing a huge value whole.

use std::path::Path;
use std::process::{Command, Output};

use pcibus::testing::FakeSysfs;

fn pcibus(sysfs: Option<&Path>, args: &[&str]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_pcibus"));
    if let Some(root) = sysfs {
        c.arg("--sysfs").arg(root);
    }
    c.args(args)
        .env_remove("PCIBUS_SYSFS")
        .env_remove("SYSFS_PCI_DEVICES")
        .output()
        .unwrap()
}

const BAD: [&str; 5] = ["01:00.0,=", ",,,", "zz:00.0", "01:00.0,io_queues=", "pci:"];

// Each nvme command that takes a device, with the other arguments it needs.
fn commands(device: &str) -> Vec<Vec<String>> {
    let with = |cmd: &[&str]| -> Vec<String> {
        let mut v = vec!["nvme".to_owned(), cmd[0].to_owned(), device.to_owned()];
        v.extend(cmd[1..].iter().map(|s| (*s).to_owned()));
        v
    };
    vec![
        with(&["identify"]),
        with(&["smart-log"]),
        with(&["error-log"]),
        with(&["perf", "--time", "1s"]),
        with(&["read", "--lba", "0", "--blocks", "1"]),
        with(&["sriov", "--vfs", "1"]),
    ]
}

fn assert_usage_error(o: &Output, what: &str) {
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{what}: stderr: {stderr}");
    assert!(stderr.contains("DEVICE"), "{what}: names the argument: {stderr}");
}

#[test]
fn bad_devargs_are_usage_errors_on_the_kernels_sysfs() {
    // On this machine's /sys (where the nvme commands run); nothing is touched: the
    // argument is refused before the bus is made.
    for bad in BAD {
        for args in commands(bad) {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            assert_usage_error(&pcibus(None, &args), &format!("{args:?}"));
        }
    }
}

#[test]
fn bad_devargs_are_usage_errors_before_the_sysfs_check() {
    // A fake tree is not the kernel's sysfs (exit 1 for a good device argument), but a bad
    // argument is the first thing to say.
    let fake = FakeSysfs::new().unwrap();
    for args in commands("01:00.0,=") {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        assert_usage_error(&pcibus(Some(fake.root()), &args), &format!("{args:?}"));
    }
    let o = pcibus(Some(fake.root()), &["nvme", "identify", "01:00.0"]);
    assert_eq!(o.status.code(), Some(1), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn a_huge_bad_devarg_is_not_echoed_whole() {
    let huge = format!("01:00.0,={}", "x".repeat(100_000));
    let o = pcibus(None, &["nvme", "identify", &huge]);
    assert_usage_error(&o, "huge");
    assert!(o.stderr.len() < 2000, "{} bytes of stderr", o.stderr.len());
}
