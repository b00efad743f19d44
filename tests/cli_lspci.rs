//! lspci's conventions in the `pcibus` command line: `-s`/`-d` selectors on `list` and
//! `show`, revision and subsystem columns, `-k` kernel modules from modules.alias,
//! `list --tree`, BAR sizes and decoded capabilities in `show`. Where lspci is installed,
//! the selectors and the tree are compared with lspci's own on the same fake trees.

#[path = "common/cli.rs"]
mod cli;
use cli::{fixture, stdout};
use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

const QEMU: &str = "qemu-q35-sriov-nvme.pcifix";

fn pcibus(root: &Path, args: &[&str]) -> Output {
    // No modules.alias unless a test gives one: output that does not depend on the host.
    cli::pcibus_env(
        root,
        args,
        &[("PCIBUS_MODULES_ALIAS", "/nonexistent/modules.alias")],
    )
}

/// The addresses `list` prints.
fn listed(root: &Path, args: &[&str]) -> Vec<String> {
    let mut all = vec!["list"];
    all.extend(args);
    stdout(&pcibus(root, &all))
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().next().unwrap().to_owned())
        .collect()
}

/// lspci's output on a fake tree, `None` (and a note) when lspci is not installed.
fn lspci(root: &Path, args: &[&str]) -> Option<String> {
    let path = format!("sysfs.path={}", root.join("bus/pci").display());
    match Command::new("lspci")
        .args(["-A", "linux-sysfs", "-O", &path])
        .args(args)
        .output()
    {
        Ok(o) => {
            assert!(
                o.status.success(),
                "lspci {args:?}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            Some(String::from_utf8(o.stdout).unwrap())
        }
        Err(_) => {
            eprintln!("SKIPPED: the comparison with lspci (not installed)");
            None
        }
    }
}

const SELECTORS: [&[&str]; 16] = [
    &["-s", "01:"],
    &["-s", ":00.0"],
    &["-s", ".1"],
    &["-s", "0000:*:*.0"],
    &["-s", "1f"],
    &["-s", "1f.2"],
    &["-s", "0001:"],
    &["-s", "*"],
    &["-d", "8086:"],
    &["-d", ":0010"],
    &["-d", "::0108"],
    &["-d", "::01xx"],
    &["-d", "::06xx:00"],
    &["-d", "1b36::0108:02"],
    &["-d", "*:*"],
    &["-s", "00:", "-d", "8086:"],
];

#[test]
fn selectors_select_what_lspci_selects() {
    let fake = fixture(QEMU);
    let expected: [&[&str]; 16] = [
        &["0000:01:00.0", "0000:01:00.1", "0000:01:00.2"],
        &["0000:00:00.0", "0000:01:00.0"],
        &["0000:01:00.1"],
        &["0000:00:00.0", "0000:00:01.0", "0000:00:1f.0", "0000:01:00.0"],
        &["0000:00:1f.0", "0000:00:1f.2", "0000:00:1f.3"],
        &["0000:00:1f.2"],
        &["0000:01:00.0", "0000:01:00.1", "0000:01:00.2"],
        &[
            "0000:00:00.0",
            "0000:00:01.0",
            "0000:00:1f.0",
            "0000:00:1f.2",
            "0000:00:1f.3",
            "0000:01:00.0",
            "0000:01:00.1",
            "0000:01:00.2",
        ],
        &["0000:00:00.0", "0000:00:1f.0", "0000:00:1f.2", "0000:00:1f.3"],
        &["0000:01:00.0", "0000:01:00.1", "0000:01:00.2"],
        &["0000:01:00.0", "0000:01:00.1", "0000:01:00.2"],
        &["0000:00:1f.2", "0000:01:00.0", "0000:01:00.1", "0000:01:00.2"],
        &["0000:00:00.0", "0000:00:01.0", "0000:00:1f.0"],
        &["0000:01:00.0", "0000:01:00.1", "0000:01:00.2"],
        &[
            "0000:00:00.0",
            "0000:00:01.0",
            "0000:00:1f.0",
            "0000:00:1f.2",
            "0000:00:1f.3",
            "0000:01:00.0",
            "0000:01:00.1",
            "0000:01:00.2",
        ],
        &["0000:00:00.0", "0000:00:1f.0", "0000:00:1f.2", "0000:00:1f.3"],
    ];
    for (args, want) in SELECTORS.iter().zip(expected) {
        assert_eq!(listed(fake.root(), args), want, "list {args:?}");
        // lspci -D prints the same slots.
        let mut l = vec!["-D"];
        l.extend(*args);
        if let Some(theirs) = lspci(fake.root(), &l) {
            let theirs: Vec<&str> = theirs.lines().map(|l| l.split(' ').next().unwrap()).collect();
            assert_eq!(theirs, want, "lspci {args:?}");
        }
    }
}

#[test]
fn selectors_combine_with_devargs() {
    let fake = fixture(QEMU);
    assert_eq!(
        listed(fake.root(), &["-d", "::0108", "-b", "01:00.1"]),
        ["0000:01:00.0", "0000:01:00.2"]
    );
    assert_eq!(
        listed(fake.root(), &["-s", ".2", "-a", "01:00.0"]),
        Vec::<String>::new()
    );
}

#[test]
fn bad_selectors_are_usage_errors_naming_the_part() {
    let fake = fixture(QEMU);
    for (args, what) in [
        (["-s", "100:"], "invalid bus number"),
        (["-s", "0.8"], "invalid function number"),
        (["-d", "8086"], "':' expected"),
        (["-d", "::10000"], "invalid class code"),
    ] {
        let o = pcibus(fake.root(), &["list", args[0], args[1]]);
        assert_eq!(o.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(what) && err.contains(args[1]), "{args:?}: {err}");
    }
    // show needs an address or a selector.
    assert_eq!(pcibus(fake.root(), &["show"]).status.code(), Some(2));
}

#[test]
fn show_with_a_selector_shows_each_device() {
    let fake = fixture(QEMU);
    let out = stdout(&pcibus(fake.root(), &["show", "-s", "01:"]));
    let heads: Vec<&str> = out
        .lines()
        .filter(|l| l.starts_with("0000:"))
        .map(|l| l.split(' ').next().unwrap())
        .collect();
    assert_eq!(heads, ["0000:01:00.0", "0000:01:00.1", "0000:01:00.2"], "{out}");
    let v: Value =
        serde_json::from_str(&stdout(&pcibus(fake.root(), &["show", "-d", ":0010", "--json"]))).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 3);
    // The address alone keeps its single object; with a selector that rejects it, an error.
    let v: Value =
        serde_json::from_str(&stdout(&pcibus(fake.root(), &["show", "01:00.0", "--json"]))).unwrap();
    assert_eq!(v["address"], "0000:01:00.0");
    let o = pcibus(fake.root(), &["show", "01:00.0", "-d", "8086:"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("no device 0000:01:00.0 matching -d 8086:*:*:*"));
    let o = pcibus(fake.root(), &["show", "-s", "7:"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("no device matching -s *:07:*.*"));
}

#[test]
fn list_has_revision_and_subsystem_columns() {
    let fake = fixture(QEMU);
    let out = stdout(&pcibus(fake.root(), &["list"]));
    let head: Vec<&str> = out.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        &head[..8],
        [
            "ADDRESS",
            "ID",
            "REV",
            "CLASS",
            "SUBSYSTEM",
            "DRIVER",
            "NUMA",
            "IOMMU"
        ]
    );
    let nvme = out.lines().find(|l| l.starts_with("0000:01:00.0")).unwrap();
    let cols: Vec<&str> = nvme.split_whitespace().collect();
    assert_eq!(
        &cols[..6],
        ["0000:01:00.0", "1b36:0010", "02", "010802", "1af4:1100", "nvme"],
        "{out}"
    );
}

const ALIASES: &str = "\
alias pci:v*d*sv*sd*bc01sc08i02* nvme
alias pci:v00001B36d00000010sv*sd*bc*sc*i* qemu_nvme_extra
alias pci:v*d*sv*sd*bc06sc04i00* shpchp
alias usb:v*p*d*dc*dsc*dp*ic*isc*ip*in* usbcore
";

#[test]
fn kernel_modules_from_modules_alias() {
    let fake = fixture(QEMU);
    let dir = tempfile::tempdir().unwrap();
    let aliases = dir.path().join("modules.alias");
    std::fs::write(&aliases, ALIASES).unwrap();
    let path = aliases.to_str().unwrap();
    let out = stdout(&pcibus(
        fake.root(),
        &["list", "-k", "--modules-alias", path, "-s", "01:00.0"],
    ));
    assert!(
        out.contains("\tKernel driver in use: nvme\n\tKernel modules: nvme, qemu_nvme_extra\n"),
        "{out}"
    );
    let o = Command::new(env!("CARGO_BIN_EXE_pcibus"))
        .arg("--sysfs")
        .arg(fake.root())
        .args(["list", "-k", "-s", "00:01.0"])
        .env("PCIBUS_MODULES_ALIAS", path)
        .output()
        .unwrap();
    assert!(stdout(&o).contains("\tKernel driver in use: pcieport\n\tKernel modules: shpchp\n"));
    assert!(o.stderr.is_empty());
    let out = stdout(&pcibus(
        fake.root(),
        &["show", "01:00.1", "--modules-alias", path],
    ));
    assert!(out.contains("  Kernel modules: nvme, qemu_nvme_extra\n"), "{out}");
    // No modules.alias: said once on stderr, not an error; the driver is still shown.
    let o = pcibus(fake.root(), &["list", "-k"]);
    let out = stdout(&o);
    assert!(out.contains("\tKernel driver in use: nvme\n"));
    assert!(!out.contains("Kernel modules"));
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(err.matches("/nonexistent/modules.alias").count(), 1, "{err}");
    // Without -k, show says nothing about a missing file.
    assert!(pcibus(fake.root(), &["show", "01:00.0"]).stderr.is_empty());
}

#[test]
fn tree_as_lspci_draws_it() {
    let fake = fixture(QEMU);
    let want = "\
-[0000:00]-+-00.0
           +-01.0-[01]--+-00.0
           |            +-00.1
           |            \\-00.2
           +-1f.0
           +-1f.2
           \\-1f.3
";
    assert_eq!(stdout(&pcibus(fake.root(), &["list", "--tree"])), want);
    let selected = "\
-[0000:00]-+-01.0-[01]--+-00.0
           |            +-00.1
           |            \\-00.2
";
    assert_eq!(
        stdout(&pcibus(fake.root(), &["list", "-t", "-s", "01:"])),
        selected
    );
    for (args, ours) in [(&["-t"][..], want), (&["-t", "-s", "01:"], selected)] {
        if let Some(theirs) = lspci(fake.root(), args) {
            assert_eq!(theirs, ours, "lspci {args:?}");
        }
    }
    // A flat machine: one bus.
    let fake = fixture("this-machine.pcifix");
    let ours = stdout(&pcibus(fake.root(), &["list", "--tree"]));
    assert!(ours.starts_with("-[0000:00]-+-00.0\n"), "{ours}");
    if let Some(theirs) = lspci(fake.root(), &["-t"]) {
        assert_eq!(ours, theirs);
    }
}

#[test]
fn show_decodes_capabilities_and_sizes_as_lspci_vv() {
    let fake = fixture(QEMU);
    let out = stdout(&pcibus(fake.root(), &["show", "01:00.0"]));
    for want in [
        "[size=16K]",
        "      MSI-X: Enable+ Count=2 Masked-",
        "      Vector table: BAR=0 offset=00002000",
        "      PBA: BAR=0 offset=00003000",
        "      Express (v2) Endpoint, MSI 00",
        "      LnkCap: Port #0, Speed 2.5GT/s, Width x1, ASPM L0s",
        "      LnkSta: Speed 2.5GT/s, Width x1",
        "      Power Management version 3",
        "      Status: D0 NoSoftRst+ PME-Enable- DSel=0 DScale=0 PME-",
        "      Initial VFs: 2, Total VFs: 2, Number of VFs: 2",
        "      VF offset: 1, stride: 1, Device ID: 0010",
    ] {
        assert!(out.contains(want), "{want:?} not in\n{out}");
    }
    // Every decoded line is (the start of) a line lspci -vv prints for the device.
    let Some(theirs) = lspci(fake.root(), &["-vv", "-s", "01:00.0"]) else {
        return;
    };
    let norm = |l: &str| l.split_whitespace().collect::<Vec<_>>().join(" ");
    let theirs: Vec<String> = theirs.lines().map(norm).collect();
    for l in out.lines().filter(|l| l.starts_with("      ")) {
        let l = norm(l);
        assert!(
            theirs
                .iter()
                .any(|t| t.starts_with(&l) || t.contains(&format!("] {l}"))),
            "{l:?} is not lspci's"
        );
    }
}
