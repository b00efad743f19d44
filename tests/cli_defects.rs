//! The `pcibus` command line's defects of issue 17 (§1-§3), each run as a user would:
//! usage errors exit 2 with a message, nothing is touched on a bad driver name, errors
//! name their cause once and what they concern, unprivileged reads are said to be partial,
//! and the library's warnings reach stderr.

#[path = "common/cli.rs"]
mod cli;
use cli::{code, command, fixture, pcibus, stderr};
use std::path::Path;
use std::process::Stdio;

use pcibus::testing::FakeSysfs;
use serde_json::Value;

#[test]
fn bad_devargs_are_usage_errors_on_list_show_and_watch() {
    let fake = fixture("qemu-q35-sriov-nvme.pcifix");
    let bad: [(&[&str], &str); 4] = [
        (&["-a", "01:00.0,="], "empty key"),
        (&["-a", ",,,"], "not a PCI address"),
        (&["-a", "01:00.0", "-b", "01:00.0"], "both allowed and blocked"),
        (&["-a", "01:00.0", "-a", "01:00.0"], "allowed twice"),
    ];
    for command in [&["list"][..], &["show", "01:00.0"], &["watch"]] {
        for (devargs, why) in bad {
            let args: Vec<&str> = command.iter().chain(devargs).copied().collect();
            let o = pcibus(fake.root(), &args);
            let err = stderr(&o);
            assert_eq!(code(&o), 2, "{args:?}: {err}");
            assert!(err.contains(why), "{args:?}: {err}");
            assert!(o.stdout.is_empty(), "{args:?}");
        }
    }
}

#[test]
fn numbers_out_of_range_are_usage_errors() {
    let fake = fixture("qemu-q35-sriov-nvme.pcifix");
    for (args, why) in [
        (&["list", "--read", "all", "--timeout", "0"][..], "above 0"),
        (&["list", "--timeout", "0ms"], "above 0"),
        (&["list", "--timeout", "99999999999999999999999"], "too large"),
        (&["list", "--timeout", "400d"], "too long"),
        (&["list", "--timeout", "soon"], "\"soon\""),
        (&["show", "01:00.0", "--timeout", "0"], "above 0"),
        (&["list", "--threads", "0"], "1 to 64"),
        (&["list", "--threads", "100000"], "1 to 64"),
        (&["vfio", "irq-test", "01:00.0", "--count", "0"], "--count"),
        (&["vfio", "irq-test", "01:00.0", "--timeout", "0"], "above 0"),
        (&["vfio", "irq-test", "01:00.0", "--edu", "0"], "--edu"),
    ] {
        let o = pcibus(fake.root(), args);
        let err = stderr(&o);
        assert_eq!(code(&o), 2, "{args:?}: {err}");
        assert!(err.contains(why), "{args:?}: {err}");
    }
    // Plain numbers stay milliseconds; durations with units are taken too.
    for t in ["1000", "500ms", "2s"] {
        let o = pcibus(fake.root(), &["list", "--read", "all", "--timeout", t]);
        assert_eq!(code(&o), 0, "--timeout {t}: {}", stderr(&o));
    }
}

#[test]
fn bind_refuses_names_no_driver_can_have_and_touches_nothing() {
    let fake = FakeSysfs::new().unwrap();
    let dir = fake.device("0000:01:00.0").driver("nvme").create().unwrap();
    let unbind = fake.root().join("bus/pci/drivers/nvme/unbind");
    let before = std::fs::read(dir.join("driver_override")).ok();
    let unbind_before = std::fs::read(&unbind).ok();
    for name in ["", ".", "..", "../nvme", "a/b", "vfio pci", "vfio-pci\n"] {
        let o = pcibus(fake.root(), &["bind", "01:00.0", name]);
        let err = stderr(&o);
        assert_eq!(code(&o), 2, "{name:?}: {err}");
        assert!(err.contains("invalid driver name"), "{name:?}: {err}");
        assert_eq!(
            std::fs::read(dir.join("driver_override")).ok(),
            before,
            "{name:?}"
        );
        assert_eq!(std::fs::read(&unbind).ok(), unbind_before, "{name:?}");
        assert!(!fake.root().join("bus/pci/drivers_probe").exists(), "{name:?}");
    }
}

#[test]
fn snapshot_of_a_missing_root_says_the_cause_once() {
    let o = pcibus(Path::new("/nonexistent"), &["snapshot"]);
    let err = stderr(&o);
    assert_eq!(code(&o), 1, "{err}");
    assert!(err.contains("/nonexistent/bus/pci/devices"), "{err}");
    assert_eq!(err.matches("No such file or directory").count(), 1, "{err}");
}

#[test]
fn vfio_info_of_a_missing_device_says_so_before_opening_vfio() {
    if !Path::new("/sys/bus/pci/devices").is_dir() {
        eprintln!("SKIPPED: no /sys/bus/pci/devices here");
        return;
    }
    let claims = tempfile::tempdir().unwrap();
    for sub in [&["vfio", "info"][..], &["vfio", "reset", "--dry-run"]] {
        let mut args = sub.to_vec();
        args.insert(2, "ffff:ff:1f.7");
        let o = command(Path::new("/sys"), &args)
            .env("PCIBUS_CLAIM_DIR", claims.path())
            .env("PCIBUS_SPDK_LOCK_DIR", "")
            .output()
            .unwrap();
        let err = stderr(&o);
        assert_eq!(code(&o), 1, "{args:?}: {err}");
        assert!(err.contains("no device ffff:ff:1f.7"), "{args:?}: {err}");
        assert!(!err.contains("/dev/vfio"), "{args:?}: {err}");
    }
}

#[test]
fn a_bad_vfio_backend_variable_fails_only_the_commands_that_open_devices() {
    let fake = fixture("qemu-q35-sriov-nvme.pcifix");
    let o = command(fake.root(), &["list"])
        .env("PCIBUS_VFIO_BACKEND", "foo")
        .output()
        .unwrap();
    assert_eq!(code(&o), 0, "list never opens VFIO: {}", stderr(&o));
    for args in [&["vfio", "info", "01:00.0"][..], &["nvme", "identify", "01:00.0"]] {
        let o = command(fake.root(), args)
            .env("PCIBUS_VFIO_BACKEND", "foo")
            .output()
            .unwrap();
        let err = stderr(&o);
        assert_eq!(code(&o), 2, "{args:?}: {err}");
        assert!(err.contains("PCIBUS_VFIO_BACKEND=foo"), "{args:?}: {err}");
    }
    // The option still is checked wherever it is given.
    let o = pcibus(fake.root(), &["--vfio-backend", "foo", "list"]);
    assert_eq!(code(&o), 2, "{}", stderr(&o));
}

#[test]
fn a_failed_write_to_stdout_says_it_was_stdout() {
    let Ok(full) = std::fs::OpenOptions::new().write(true).open("/dev/full") else {
        eprintln!("SKIPPED: no /dev/full");
        return;
    };
    let fake = fixture("qemu-q35-sriov-nvme.pcifix");
    let o = command(fake.root(), &["list"]).stdout(full).output().unwrap();
    let err = stderr(&o);
    assert_eq!(code(&o), 1, "{err}");
    assert!(
        err.contains("writing standard output: No space left on device"),
        "{err}"
    );
}

#[test]
fn watch_prints_its_banner_on_stderr() {
    use std::io::{BufRead, BufReader, Read};
    use std::time::Duration;
    let fake = fixture("qemu-q35-sriov-nvme.pcifix");
    let mut child = command(fake.root(), &["watch"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let err = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut out = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    // The banner comes once the monitor listens; a generous wait, not a timing check.
    let first = rx.recv_timeout(Duration::from_secs(20)).unwrap_or_default();
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT);
    let status = child.wait().unwrap();
    let stdout = reader.join().unwrap();
    if first.starts_with("pcibus: ") && !first.contains("watching") {
        // No uevent socket here (its error is the first line): nothing to check.
        eprintln!("SKIPPED: watch could not start: {first}");
        return;
    }
    assert!(!stdout.contains("watching"), "the banner is on stdout: {stdout}");
    assert!(first.contains("watching PCI uevents"), "{first:?}");
    assert_eq!(status.code(), Some(0));
}

#[test]
fn a_huge_bad_address_is_quoted_shortened() {
    let fake = fixture("qemu-q35-sriov-nvme.pcifix");
    let huge = "x".repeat(100_000);
    for args in [
        &["show", huge.as_str()][..],
        &["bind", &huge, "vfio-pci"],
        &["vfio", "info", &huge],
    ] {
        let o = pcibus(fake.root(), args);
        let err = stderr(&o);
        assert_eq!(code(&o), 2, "{}", &err[..err.len().min(300)]);
        assert!(err.len() < 1000, "{} bytes: {}", err.len(), &err[..300]);
        assert!(err.contains("invalid PCI address \"xxxx"), "{err}");
    }
}

// An unprivileged reader of `config` gets its first 64 bytes (a fake tree with a 64-byte
// file is the same to the reader).
fn tree_with_a_short_config() -> FakeSysfs {
    let fake = FakeSysfs::new().unwrap();
    let mut config = vec![0u8; 64];
    config[..4].copy_from_slice(&[0x36, 0x1b, 0x10, 0x00]);
    config[6] = 0x10; // status: capability list
    config[0x34] = 0x40; // its first capability, past the 64 bytes
    fake.device("0000:01:00.0")
        .vendor(0x1b36)
        .device_id(0x0010)
        .class(0x010802)
        .config(config)
        .create()
        .unwrap();
    fake
}

#[test]
fn show_says_when_config_is_cut_short() {
    let fake = tree_with_a_short_config();
    let o = pcibus(fake.root(), &["show", "01:00.0", "--json"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    let problems = v["details"]["problems"].as_array().unwrap();
    let p = problems
        .iter()
        .find(|p| p["attribute"] == "config")
        .unwrap_or_else(|| panic!("no config problem in {problems:?}"));
    assert_eq!(p["kind"], "config_restricted");
    assert_eq!(p["error"], "64 of 256 bytes readable; capabilities need root");
    let o = pcibus(fake.root(), &["show", "01:00.0"]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("config: 64 of 256 bytes readable; capabilities need root"),
        "{text}"
    );
}

#[test]
fn snapshot_notes_a_config_cut_short() {
    let fake = tree_with_a_short_config();
    let o = pcibus(fake.root(), &["snapshot"]);
    let err = stderr(&o);
    assert_eq!(code(&o), 0, "{err}");
    let want = "0000:01:00.0/config: 64 of 256 bytes readable; capabilities need root";
    assert!(err.contains(want), "{err}");
    let fixture = String::from_utf8_lossy(&o.stdout);
    assert!(
        fixture
            .lines()
            .any(|l| l.starts_with('#') && l.contains("64 of 256 bytes readable")),
        "{fixture}"
    );
}

#[test]
fn library_warnings_reach_stderr_and_q_hides_them() {
    // A cheap trigger: a scan of the kernel's sysfs consults the claims directory, and
    // warns when it cannot be read (here a regular file).
    if !Path::new("/sys/bus/pci/devices").is_dir() {
        eprintln!("SKIPPED: no /sys/bus/pci/devices here");
        return;
    }
    let file = tempfile::NamedTempFile::new().unwrap();
    let run = |args: &[&str], rust_log: Option<&str>| {
        let mut c = command(Path::new("/sys"), args);
        c.env("PCIBUS_CLAIM_DIR", file.path());
        if let Some(l) = rust_log {
            c.env("RUST_LOG", l);
        }
        c.output().unwrap()
    };
    let o = run(&["list"], None);
    let err = stderr(&o);
    assert_eq!(code(&o), 0, "{err}");
    assert!(err.contains("pcibus: warning: claims directory"), "{err}");
    let o = run(&["-q", "list"], None);
    assert!(!stderr(&o).contains("claims directory"), "{}", stderr(&o));
    let o = run(&["list"], Some("off"));
    assert!(!stderr(&o).contains("claims directory"), "{}", stderr(&o));
    let o = run(&["-q", "list"], Some("pcibus=warn"));
    assert!(stderr(&o).contains("claims directory"), "RUST_LOG overrides -q");
}
