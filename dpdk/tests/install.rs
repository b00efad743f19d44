//! dpdk/install and dpdk/uninstall against a throwaway root (`--root`): a temp dir holding a
//! dpkg database (status with librte-bus-pci23 and libdpdk-dev, the package's file list, an
//! empty diversions file) and the library path of Debian 12's DPDK. The host's own dpkg
//! database and libraries are never touched. Prints `SKIPPED` when dpkg-divert is absent.
mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::TempDir;

const PMDS: &str = "usr/lib/x86_64-linux-gnu/dpdk/pmds-23.0";
const TARGET: &str = "/usr/lib/x86_64-linux-gnu/dpdk/pmds-23.0/librte_bus_pci.so.23.0";
const DIVERTED: &str = "/usr/lib/x86_64-linux-gnu/dpdk/librte_bus_pci.so.23.0.distrib";
const STOCK_BYTES: &[u8] = b"the stock librte_bus_pci.so.23.0 of this throwaway root\n";

fn have_dpkg_divert() -> bool {
    let found = Command::new("dpkg-divert").arg("--version").output().is_ok();
    if !found {
        println!("SKIPPED: dpkg-divert not found (not a Debian system)");
    }
    found
}

/// The drop-in built for this test run (next to the test binary's deps directory).
fn built_library() -> PathBuf {
    let exe = std::env::current_exe().expect("test exe");
    let deps = exe.parent().expect("deps dir");
    [
        deps.join("librte_bus_pci.so"),
        deps.parent().expect("profile dir").join("librte_bus_pci.so"),
    ]
    .into_iter()
    .find(|p| p.exists())
    .unwrap_or_else(|| panic!("librte_bus_pci.so not found next to {}", exe.display()))
}

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(name)
}

/// A root whose dpkg database says librte-bus-pci23 and libdpdk-dev `version` are installed.
fn fake_root(version: &str) -> TempDir {
    let dir = TempDir::new("pcibus-dpdk-install.XXXXXX");
    let root = dir.path();
    let arch = String::from_utf8(
        Command::new("dpkg")
            .arg("--print-architecture")
            .output()
            .expect("dpkg")
            .stdout,
    )
    .expect("utf-8");
    let arch = arch.trim();
    let admin = root.join("var/lib/dpkg");
    fs::create_dir_all(admin.join("info")).unwrap();
    fs::create_dir_all(admin.join("updates")).unwrap();
    fs::write(admin.join("diversions"), "").unwrap();
    // The multi-arch database layout: list files are named package:arch.list.
    fs::write(admin.join("info/format"), "1\n").unwrap();
    let stanza = |pkg: &str| {
        format!(
            "Package: {pkg}\nStatus: install ok installed\nPriority: optional\nSection: libs\n\
             Maintainer: nobody <nobody@example.org>\nArchitecture: {arch}\nMulti-Arch: same\n\
             Source: dpdk\nVersion: {version}\nDescription: test stanza\n\n"
        )
    };
    fs::write(
        admin.join("status"),
        stanza("librte-bus-pci23") + &stanza("libdpdk-dev"),
    )
    .unwrap();
    let list = [
        "/.",
        "/usr",
        "/usr/lib",
        "/usr/lib/x86_64-linux-gnu",
        "/usr/lib/x86_64-linux-gnu/dpdk",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([
        format!("/{PMDS}"),
        TARGET.to_string(),
        format!("/{PMDS}/librte_bus_pci.so.23"),
        "/usr/lib/x86_64-linux-gnu/librte_bus_pci.so.23".to_string(),
    ])
    .collect::<Vec<_>>()
    .join("\n");
    fs::write(
        admin.join(format!("info/librte-bus-pci23:{arch}.list")),
        list + "\n",
    )
    .unwrap();
    let pmds = root.join(PMDS);
    fs::create_dir_all(&pmds).unwrap();
    fs::write(root.join(&TARGET[1..]), STOCK_BYTES).unwrap();
    std::os::unix::fs::symlink("librte_bus_pci.so.23.0", pmds.join("librte_bus_pci.so.23")).unwrap();
    std::os::unix::fs::symlink(
        "dpdk/pmds-23.0/librte_bus_pci.so.23",
        root.join("usr/lib/x86_64-linux-gnu/librte_bus_pci.so.23"),
    )
    .unwrap();
    dir
}

fn run(name: &str, root: &Path, extra: &[&Path]) -> Output {
    let out = Command::new(script(name))
        .arg("--root")
        .arg(root)
        .args(extra)
        .env_remove("DPKG_ROOT")
        .output()
        .expect("run the script");
    eprintln!(
        "{name}: {}\nstdout: {}stderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn diverter(root: &Path) -> String {
    let out = Command::new("dpkg-divert")
        .arg("--root")
        .arg(root)
        .args(["--listpackage", TARGET])
        .output()
        .expect("dpkg-divert");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Where dpkg would write librte-bus-pci23's copy of the file (an upgrade goes there).
fn truename(root: &Path) -> String {
    let out = Command::new("dpkg-divert")
        .arg("--root")
        .arg(root)
        .args(["--truename", TARGET])
        .output()
        .expect("dpkg-divert");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn install_and_uninstall_round_trip_idempotently() {
    if !have_dpkg_divert() {
        return;
    }
    let dir = fake_root("22.11.11-0+deb12u1");
    let root = dir.path();
    let lib = built_library();
    let drop_in = fs::read(&lib).unwrap();

    let first = run("install", root, &[&lib]);
    assert!(first.status.success());
    assert!(stdout(&first).contains("diverted"), "says what it did");
    assert_eq!(diverter(root), "pcibus-dpdk", "diversion registered");
    assert_eq!(
        truename(root),
        DIVERTED,
        "package upgrades write outside the plugin dir"
    );
    assert_eq!(
        fs::read(root.join(&TARGET[1..])).unwrap(),
        drop_in,
        "drop-in in place"
    );
    assert_eq!(
        fs::read(root.join(&DIVERTED[1..])).unwrap(),
        STOCK_BYTES,
        "stock kept"
    );
    // Nothing but the drop-in and its symlink in the directory EAL dlopens.
    let mut names: Vec<_> = fs::read_dir(root.join(PMDS))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["librte_bus_pci.so.23", "librte_bus_pci.so.23.0"]);

    let again = run("install", root, &[&lib]);
    assert!(again.status.success());
    assert!(stdout(&again).contains("nothing to do"));
    assert_eq!(diverter(root), "pcibus-dpdk");
    assert_eq!(fs::read(root.join(&TARGET[1..])).unwrap(), drop_in);
    assert_eq!(fs::read(root.join(&DIVERTED[1..])).unwrap(), STOCK_BYTES);

    let un = run("uninstall", root, &[]);
    assert!(un.status.success());
    assert!(stdout(&un).contains("stock library is back"));
    assert_eq!(diverter(root), "", "diversion removed");
    assert_eq!(truename(root), TARGET);
    assert_eq!(
        fs::read(root.join(&TARGET[1..])).unwrap(),
        STOCK_BYTES,
        "stock back"
    );
    assert!(!root.join(&DIVERTED[1..]).exists());

    let un_again = run("uninstall", root, &[]);
    assert!(un_again.status.success());
    assert!(stdout(&un_again).contains("nothing to do"));
    assert_eq!(fs::read(root.join(&TARGET[1..])).unwrap(), STOCK_BYTES);
}

/// A real `dpkg -i` of a newer librte-bus-pci23 into the throwaway root, with the drop-in
/// installed: dpkg writes the new stock library to the diverted name, the drop-in stays;
/// uninstall then brings the new stock library back.
#[test]
fn a_package_upgrade_leaves_the_drop_in_in_place() {
    if !have_dpkg_divert() {
        return;
    }
    if Command::new("dpkg-deb").arg("--version").output().is_err() {
        println!("SKIPPED: dpkg-deb not found");
        return;
    }
    let dir = fake_root("22.11.11-0+deb12u1");
    let root = dir.path();
    let lib = built_library();
    let drop_in = fs::read(&lib).unwrap();
    assert!(run("install", root, &[&lib]).status.success());

    let upgraded: &[u8] = b"librte_bus_pci.so.23.0 of librte-bus-pci23 22.11.12\n";
    let arch = String::from_utf8(
        Command::new("dpkg")
            .arg("--print-architecture")
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let pkg = root.join("build/pkg");
    fs::create_dir_all(pkg.join("DEBIAN")).unwrap();
    fs::create_dir_all(pkg.join(PMDS)).unwrap();
    fs::write(pkg.join(&TARGET[1..]), upgraded).unwrap();
    std::os::unix::fs::symlink(
        "librte_bus_pci.so.23.0",
        pkg.join(PMDS).join("librte_bus_pci.so.23"),
    )
    .unwrap();
    fs::write(
        pkg.join("DEBIAN/control"),
        format!(
            "Package: librte-bus-pci23\nVersion: 22.11.12-0+deb12u1\nArchitecture: {}\n\
             Multi-Arch: same\nMaintainer: nobody <nobody@example.org>\nDescription: test\n",
            arch.trim()
        ),
    )
    .unwrap();
    let deb = root.join("build/up.deb");
    let built = Command::new("dpkg-deb")
        .args(["--root-owner-group", "-b"])
        .arg(&pkg)
        .arg(&deb)
        .output()
        .unwrap();
    assert!(
        built.status.success(),
        "{}",
        String::from_utf8_lossy(&built.stderr)
    );
    // --log: dpkg's log is /var/log/dpkg.log of the host even with --root.
    let log = root.join("var/log/dpkg.log");
    fs::create_dir_all(log.parent().unwrap()).unwrap();
    let up = Command::new("dpkg")
        .arg(format!("--root={}", root.display()))
        .arg(format!("--log={}", log.display()))
        .args(["--force-script-chrootless", "--force-not-root", "-i"])
        .arg(&deb)
        .output()
        .unwrap();
    assert!(up.status.success(), "{}", String::from_utf8_lossy(&up.stderr));

    assert_eq!(
        fs::read(root.join(&TARGET[1..])).unwrap(),
        drop_in,
        "drop-in survives"
    );
    assert_eq!(
        fs::read(root.join(&DIVERTED[1..])).unwrap(),
        upgraded,
        "upgrade diverted"
    );
    assert_eq!(diverter(root), "pcibus-dpdk");

    assert!(run("uninstall", root, &[]).status.success());
    assert_eq!(
        fs::read(root.join(&TARGET[1..])).unwrap(),
        upgraded,
        "new stock back"
    );
    assert_eq!(diverter(root), "");
}

#[test]
fn both_refuse_another_dpdk_version() {
    if !have_dpkg_divert() {
        return;
    }
    let dir = fake_root("23.11.2-1");
    let root = dir.path();
    for (name, args) in [("install", vec![built_library()]), ("uninstall", vec![])] {
        let args: Vec<&Path> = args.iter().map(PathBuf::as_path).collect();
        let out = run(name, root, &args);
        assert_eq!(out.status.code(), Some(1), "{name} refuses");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("23.11.2-1") && err.contains("22.11"),
            "{name}: {err}"
        );
        assert_eq!(diverter(root), "");
        assert_eq!(fs::read(root.join(&TARGET[1..])).unwrap(), STOCK_BYTES);
    }
}

#[test]
fn install_leaves_a_foreign_diversion_alone() {
    if !have_dpkg_divert() {
        return;
    }
    let dir = fake_root("22.11.11-0+deb12u1");
    let root = dir.path();
    let added = Command::new("dpkg-divert")
        .arg("--root")
        .arg(root)
        .args([
            "--package",
            "someone-else",
            "--divert",
            "/usr/lib/elsewhere",
            "--add",
            TARGET,
        ])
        .output()
        .unwrap();
    assert!(added.status.success());
    let out = run("install", root, &[&built_library()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("someone-else"));
    assert_eq!(fs::read(root.join(&TARGET[1..])).unwrap(), STOCK_BYTES);
    let out = run("uninstall", root, &[]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(diverter(root), "someone-else");
}
