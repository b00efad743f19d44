//! `pcibus nvme` numbers on the command line (issue 17 §1): every out-of-range value is a
//! usage error (exit 2) naming the bad text, found before any device is touched. Without a
//! real controller, well-formed commands get as far as needing the kernel's sysfs (exit 1).

use std::path::Path;
use std::process::{Command, Output};

use pcibus::testing::FakeSysfs;

fn fixture() -> FakeSysfs {
    FakeSysfs::from_fixture_file(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fixtures")
            .join("qemu-q35-sriov-nvme.pcifix"),
    )
    .unwrap()
}

fn pcibus(root: &Path, args: &[&str]) -> (Option<i32>, String) {
    let o: Output = Command::new(env!("CARGO_BIN_EXE_pcibus"))
        .arg("--sysfs")
        .arg(root)
        .args(args)
        .env_remove("PCIBUS_SYSFS")
        .env_remove("SYSFS_PCI_DEVICES")
        .output()
        .unwrap();
    (o.status.code(), String::from_utf8_lossy(&o.stderr).into_owned())
}

fn with<'a>(base: &[&'a str], rest: &[&'a str]) -> Vec<&'a str> {
    base.iter().chain(rest).copied().collect()
}

const PERF: [&str; 3] = ["nvme", "perf", "0000:01:00.0"];

// Accepted: they get as far as the device (here: a fake tree, which nvme refuses).
fn accepted(root: &Path, args: &[&str]) {
    let (code, err) = pcibus(root, args);
    assert_eq!(code, Some(1), "{args:?}: {err}");
    assert!(err.contains("nvme needs the kernel's sysfs"), "{args:?}: {err}");
}

// Refused by the parser: exit 2, a message with `why`, no panic.
fn refused(root: &Path, args: &[&str], why: &str) {
    let (code, err) = pcibus(root, args);
    assert_eq!(code, Some(2), "{args:?}: {err}");
    assert!(err.contains(why), "{args:?}: wanted {why:?} in: {err}");
    assert!(!err.contains("panicked"), "{args:?}: {err}");
}

#[test]
fn perf_time_is_seconds_or_a_duration_and_out_of_range_is_a_usage_error() {
    let fake = fixture();
    for time in ["10", "2.5", "10s", "500ms", "1m30s"] {
        accepted(fake.root(), &with(&PERF, &["--time", time]));
    }
    // 1e20 panicked (exit 101); NaN and 0 exited 1.
    for (time, why) in [
        ("1e20", "longer than a year"),
        ("NaN", "\"NaN\""),
        ("inf", "\"inf\""),
        ("0", "more than zero"),
        ("0ms", "more than zero"),
        ("-1", "\"-1\""),
        ("10x", "such as 10s"),
        ("500years", "longer than a year"),
    ] {
        // `--time=-1`: as `--time -1`, clap would take -1 for an option.
        refused(fake.root(), &with(&PERF, &[&format!("--time={time}")]), why);
    }
}

#[test]
fn perf_numbers_out_of_range_are_usage_errors() {
    let fake = fixture();
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("lat.csv");
    let csv = csv.to_str().unwrap();
    for args in [
        &["--bs", "512"][..],
        &["--bs", "128k", "--qd", "1", "--queues", "2"],
        &["--rw", "randrw", "--rwmixread", "70"],
        &["--rw", "rw"],
        &["--nsid", "0x2", "--spin-us", "50"],
        &["--histogram", csv],
    ] {
        accepted(fake.root(), &with(&PERF, args));
    }
    for (args, why) in [
        (&["--qd", "0"][..], "queue depth must be from 1"),
        (&["--qd", "65535"], "queue depth must be from 1 to 65534"),
        (&["--qd=-1"], "\"-1\""),
        (&["--queues", "0"], "number of queues must be from 1"),
        (&["--bs", "0"], "multiple of 512"),
        (&["--bs", "1000"], "multiple of 512"),
        (&["--bs", "4x"], "such as 512, 4k"),
        (&["--bs", "99999999999999999999k"], "expected a size"),
        (&["--bs", "2g"], "more than 1 GiB"),
        (&["--nsid", "0"], "namespace ID is 1 to"),
        (&["--nsid", "0xffffffff"], "namespace ID is 1 to"),
        (
            &["--rwmixread", "101", "--rw", "randrw"],
            "percentage must be from 0 to 100",
        ),
        (
            &["--rwmixread", "70"],
            "goes with --rw rw or randrw, not randread",
        ),
        (&["--settle-ms", "99999999999"], "milliseconds must be from 0"),
        (
            &["--spin-us", "18446744073709551615"],
            "microseconds must be from 0",
        ),
        (
            &["--hotplug", "--histogram", "/tmp/x.csv"],
            "--histogram is not written with --hotplug",
        ),
    ] {
        refused(fake.root(), &with(&PERF, args), why);
    }
}

#[test]
fn read_write_and_sriov_numbers_out_of_range_are_usage_errors() {
    let fake = fixture();
    let read = ["nvme", "read", "0000:01:00.0", "--lba", "0"];
    accepted(fake.root(), &with(&read, &["--blocks", "8"]));
    refused(
        fake.root(),
        &with(&read, &["--blocks", "0"]),
        "number of blocks must be from 1",
    );
    refused(
        fake.root(),
        &with(&read, &["--blocks", "1", "--nsid", "0"]),
        "namespace ID is 1 to",
    );
    refused(
        fake.root(),
        &[
            "nvme",
            "write",
            "0000:01:00.0",
            "--lba",
            "0",
            "--nsid",
            "4294967295",
            "-i",
            "/dev/null",
        ],
        "namespace ID is 1 to",
    );
    let sriov = ["nvme", "sriov", "0000:01:00.0", "--vfs", "1"];
    refused(
        fake.root(),
        &with(&sriov, &["--hold", "1e20"]),
        "longer than a year",
    );
    refused(fake.root(), &with(&sriov, &["--hold", "NaN"]), "\"NaN\"");
    refused(
        fake.root(),
        &with(&sriov, &["--io-mib", "0"]),
        "MiB must be from 1 to 1024",
    );
}
