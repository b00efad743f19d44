//! dpdk/install and dpdk/uninstall on the real system root, which the test leaves unchanged:
//! it runs itself again in a private mount namespace (`unshare --mount --propagation
//! private`) where overlayfs covers `/usr`, `/etc`, `/var` and `/run` with upper directories
//! in a tmpfs of that namespace. Everything the scripts, `dpkg-divert`, `dpkg -i`, `apt-get`,
//! `ldconfig` and `dpdk-test` write lands there and goes away with the namespace, whatever
//! happens; what they read is the machine's own dpkg database, library paths and DPDK.
//!
//! Inside: `dpdk/install` with no `--root` (the diversion in `dpkg-divert --list`, the drop-in
//! at the stock file's name, the stock file outside the plugin directory), `ldconfig`, then
//! Debian's `dpdk-test` (`devargs_autotest` over a fake sysfs, no `LD_LIBRARY_PATH`) served
//! by the drop-in; a second install changes nothing; a `dpkg -i` of librte-bus-pci23's own
//! `.deb` (the installed version, from apt's cache or `apt-get download`) writes the stock
//! library to the diverted name and leaves the drop-in in place; `dpdk/uninstall` twice,
//! and the same `dpdk-test` run served by the stock bus. Outside, afterwards: no pcibus
//! diversion in the machine's database, the stock file's bytes unchanged.
//!
//! Needs root, `dpdk-test` (dpdk-dev), librte-bus-pci23 22.11, mount namespaces and
//! overlayfs; prints `SKIPPED` and the reason otherwise, and when the drop-in is installed
//! on this machine for real.

mod common;

use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{
    DPDK_TEST, PLUGIN_DIR, TempDir, assert_drop_in_served, built_library, count, fake_tree, run_dpdk_test,
};

const TARGET: &str = "/usr/lib/x86_64-linux-gnu/dpdk/pmds-23.0/librte_bus_pci.so.23.0";
const DIVERTED: &str = "/usr/lib/x86_64-linux-gnu/dpdk/librte_bus_pci.so.23.0.distrib";
const STOCK_PKG: &str = "librte-bus-pci23";
/// The directories covered by an overlay inside the namespace: every place the scripts,
/// dpkg (database, log, the package's files), apt (cache, lists, log), ldconfig
/// (`/etc/ld.so.cache`, `/var/cache/ldconfig`) and EAL (`/run/dpdk`) write to.
const COVERED: [&str; 4] = ["/usr", "/etc", "/var", "/run"];
/// Set for the run inside the namespace: the directory to mount its tmpfs on.
const ENV_STATE: &str = "PCIBUS_INSTALL_SYSTEM_STATE";
/// Set for the run inside the namespace: the outer process's mount namespace.
const ENV_OUTER_NS: &str = "PCIBUS_INSTALL_SYSTEM_OUTER_NS";
const INNER_TEST: &str = "inside_the_private_mount_namespace";
/// `1`: a skip is a failure.
const ENV_REQUIRE: &str = "PCIBUS_REQUIRE_SYSTEM_INSTALL";
/// Printed by the inner run when it could not set up its overlays (nothing written yet).
const NO_OVERLAY: &str = "NO-OVERLAY:";
/// Printed by the inner run as its last line.
const ALL_DONE: &str = "inside: every step passed";

#[test]
fn install_and_uninstall_on_the_system_root_under_an_overlay() {
    let Some(stock) = preconditions() else {
        return;
    };
    // In /tmp, never under a covered directory: an overlay mounted over it would hide the
    // tmpfs mounted on it.
    let state = TempDir::shallow("/tmp/pcibus-dpdk-system.XXXXXX");
    let real = fs::canonicalize(state.path()).expect("state dir");
    if let Some(dir) = COVERED.iter().find(|d| real.starts_with(d)) {
        // The overlay over it would hide the tmpfs mounted on the state directory.
        skipped(&format!(
            "the temporary directory {} is under {dir}",
            real.display()
        ));
        return;
    }
    let outer_ns = fs::read_link("/proc/self/ns/mnt").expect("/proc/self/ns/mnt");
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "--"])
        .arg(std::env::current_exe().expect("test binary path"))
        .args([
            INNER_TEST,
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(ENV_STATE, state.path())
        .env(ENV_OUTER_NS, &outer_ns)
        .output()
        .expect("unshare");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!(
        "--- the run inside the namespace ({}) ---\n{text}--- end ---",
        out.status
    );

    // First of all, whatever happened inside: the machine is as it was.
    assert_eq!(
        real_divert_list()
            .lines()
            .filter(|l| l.contains("pcibus"))
            .count(),
        0,
        "the machine's dpkg database has a pcibus diversion after the test"
    );
    assert!(
        fs::read(TARGET).expect(TARGET) == stock,
        "{TARGET} changed on the machine"
    );
    assert!(!Path::new(DIVERTED).exists(), "{DIVERTED} exists on the machine");
    let left: Vec<_> = fs::read_dir(state.path()).expect("state dir").collect();
    assert!(
        left.is_empty(),
        "the namespace's tmpfs left files behind in {}",
        state.path().display()
    );

    if let Some(line) = text.lines().find(|l| l.starts_with(NO_OVERLAY)) {
        skipped(line);
        return;
    }
    assert!(out.status.success(), "the run inside the namespace failed");
    assert!(
        text.lines().any(|l| l == ALL_DONE),
        "the run inside the namespace did not get to its end (was the test filtered out?)"
    );
}

/// Says why the test cannot run here; a failure when `PCIBUS_REQUIRE_SYSTEM_INSTALL=1`
/// (CI sets it: a machine that cannot run it must not pass quietly).
fn skipped(why: &str) {
    if std::env::var_os(ENV_REQUIRE).is_some_and(|v| v == "1") {
        panic!("{ENV_REQUIRE}=1 but the test cannot run here: {why}");
    }
    println!("SKIPPED: {why} ({ENV_REQUIRE}=1 makes this a failure)");
    eprintln!("SKIPPED: {why} ({ENV_REQUIRE}=1 makes this a failure)");
}

/// The machine's stock library's bytes, or None (with a SKIPPED line) when the test cannot
/// run here.
fn preconditions() -> Option<Vec<u8>> {
    let skip = |why: &str| {
        skipped(why);
        None
    };
    // SAFETY: geteuid takes no arguments and touches no memory.
    if unsafe { libc::geteuid() } != 0 {
        return skip("needs root (mount namespace, overlayfs, dpkg)");
    }
    if !Path::new(DPDK_TEST).is_file() {
        return skip("dpdk-test is not installed (Debian package dpdk-dev)");
    }
    for tool in [
        "unshare",
        "mount",
        "dpkg",
        "dpkg-divert",
        "dpkg-query",
        "dpkg-deb",
        "apt-get",
        "tar",
        "ldconfig",
        "ldd",
    ] {
        if Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .map(|o| !o.status.success())
            .unwrap_or(true)
        {
            return skip(&format!("{tool} not found"));
        }
    }
    let version = installed_version();
    if !version.starts_with("22.11.") {
        return skip(&format!(
            "{STOCK_PKG} is not installed as DPDK 22.11 (version '{version}')"
        ));
    }
    if real_divert_list().contains("pcibus") {
        return skip(
            "the drop-in is installed on this machine (dpkg-divert --list names pcibus-dpdk): dpdk/uninstall first",
        );
    }
    let Ok(stock) = fs::read(TARGET) else {
        return skip(&format!("{TARGET} is missing"));
    };
    match Command::new("unshare")
        .args(["--mount", "--propagation", "private", "true"])
        .output()
    {
        Ok(o) if o.status.success() => Some(stock),
        Ok(o) => skip(&format!(
            "no private mount namespace here (unshare: {})",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => skip(&format!("unshare: {e}")),
    }
}

fn installed_version() -> String {
    Command::new("dpkg-query")
        .args(["-W", "-f", "${db:Status-Abbrev}${Version}", STOCK_PKG])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .and_then(|s| s.strip_prefix("ii ").map(str::to_string))
        .unwrap_or_default()
}

fn real_divert_list() -> String {
    let out = Command::new("dpkg-divert")
        .arg("--list")
        .output()
        .expect("dpkg-divert --list");
    assert!(out.status.success(), "dpkg-divert --list failed");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The test's inside, run by the test above in its mount namespace (with `--ignored`). Run
/// any other way it does nothing: without the namespace it would change the machine.
#[test]
#[ignore = "the inside of install_and_uninstall_on_the_system_root_under_an_overlay, which runs it in a private mount namespace"]
fn inside_the_private_mount_namespace() {
    let (Some(state), Some(outer_ns)) = (std::env::var_os(ENV_STATE), std::env::var_os(ENV_OUTER_NS)) else {
        println!("SKIPPED: run only by install_and_uninstall_on_the_system_root_under_an_overlay");
        return;
    };
    let state = PathBuf::from(state);
    let ns = fs::read_link("/proc/self/ns/mnt").expect("/proc/self/ns/mnt");
    assert_ne!(
        ns.as_os_str(),
        outer_ns.as_os_str(),
        "refusing to run: this process shares the caller's mount namespace"
    );
    if let Ok(init_ns) = fs::read_link("/proc/1/ns/mnt") {
        assert_ne!(
            ns, init_ns,
            "refusing to run: this process is in init's mount namespace"
        );
    }
    // Private: no mount made here propagates to the machine's namespace.
    let info = fs::read_to_string("/proc/self/mountinfo").expect("/proc/self/mountinfo");
    let shared: Vec<_> = info.lines().filter(|l| l.contains(" shared:")).collect();
    assert!(
        shared.is_empty(),
        "refusing to run: shared mounts in this namespace: {shared:#?}"
    );
    if let Err(why) = cover_with_overlays(&state) {
        println!("{NO_OVERLAY} {why}");
        return;
    }
    check_covered(&state);
    steps(&state);
    println!("{ALL_DONE}");
}

/// A tmpfs on `state`, and an overlay over each of COVERED with its upper directory there.
/// Nothing is written outside the namespace before this succeeds; an error leaves only
/// mounts of this namespace behind, which die with it.
fn cover_with_overlays(state: &Path) -> Result<(), String> {
    mount(
        &["-t", "tmpfs", "-o", "mode=0755", "pcibus-install-system"],
        state,
    )?;
    for dir in COVERED {
        let layer = state.join(&dir[1..]);
        let (upper, work) = (layer.join("upper"), layer.join("work"));
        for d in [&upper, &work] {
            fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
        }
        let opts = format!(
            "lowerdir={dir},upperdir={},workdir={}",
            upper.display(),
            work.display()
        );
        mount(&["-t", "overlay", "-o", &opts, "overlay"], Path::new(dir))?;
    }
    Ok(())
}

fn mount(args: &[&str], on: &Path) -> Result<(), String> {
    let out = Command::new("mount")
        .args(args)
        .arg(on)
        .output()
        .map_err(|e| format!("mount: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "mount {} {}: {}",
            args.join(" "),
            on.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Each covered directory's mount (the last listed at that path in /proc/self/mounts) is
/// an overlay whose upper directory is in this namespace's tmpfs.
fn check_covered(state: &Path) {
    let mounts = fs::read_to_string("/proc/self/mounts").expect("/proc/self/mounts");
    for dir in COVERED {
        let top = mounts
            .lines()
            .rfind(|l| l.split(' ').nth(1) == Some(dir))
            .unwrap_or_else(|| panic!("{dir} is not a mount point:\n{mounts}"));
        let upper = format!("upperdir={}/upper", state.join(&dir[1..]).display());
        assert!(
            top.split(' ').nth(2) == Some("overlay") && top.contains(&upper),
            "{dir} is not covered by our overlay: {top}"
        );
    }
}

/// Runs a command (in the environment an administrator's shell would have) and, if `show`,
/// prints it with its output.
fn run(words: &[&OsStr], show: bool) -> Output {
    let out = Command::new(words[0])
        .args(&words[1..])
        .env_remove("DPKG_ROOT")
        .env_remove("LD_LIBRARY_PATH")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}", words[0].to_string_lossy()));
    let shown: Vec<_> = words.iter().map(|w| w.to_string_lossy()).collect();
    if !show {
        println!("$ {} [{}]", shown.join(" "), out.status);
        return out;
    }
    println!(
        "$ {}\n{}{}[{}]",
        shown.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        out.status
    );
    out
}

/// The stdout of a command that must succeed, not printed (long listings).
fn quiet(words: &[&str]) -> String {
    let words: Vec<&OsStr> = words.iter().map(OsStr::new).collect();
    let out = run(&words, false);
    assert!(out.status.success(), "{} failed", words[0].to_string_lossy());
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a command that must succeed; its stdout.
fn ok(words: &[&str]) -> String {
    let words: Vec<&OsStr> = words.iter().map(OsStr::new).collect();
    let out = run(&words, true);
    assert!(out.status.success(), "{} failed", words[0].to_string_lossy());
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn script(name: &str, args: &[&Path]) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(name);
    let mut words = vec![path.as_os_str()];
    words.extend(args.iter().map(|a| a.as_os_str()));
    let out = run(&words, true);
    assert!(out.status.success(), "dpdk/{name} failed");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The pcibus diversion as `dpkg-divert --list` shows it, if any.
fn our_diversion() -> Option<String> {
    ok(&["dpkg-divert", "--list"])
        .lines()
        .find(|l| l.contains("pcibus"))
        .map(str::to_string)
}

fn truename() -> String {
    ok(&["dpkg-divert", "--truename", TARGET]).trim().to_string()
}

/// The plugin directory's entries, sorted.
fn plugin_dir() -> Vec<String> {
    let mut names: Vec<_> = fs::read_dir(PLUGIN_DIR)
        .expect(PLUGIN_DIR)
        .map(|e| e.expect(PLUGIN_DIR).file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Where the dynamic linker finds librte_bus_pci.so.23 after `ldconfig`, symlinks resolved,
/// as `ldconfig -p` and `ldd dpdk-test` say.
fn resolved_by_the_linker() -> (PathBuf, PathBuf) {
    ok(&["ldconfig"]);
    let cache = quiet(&["ldconfig", "-p"]);
    let line = cache
        .lines()
        .find(|l| l.trim_start().starts_with("librte_bus_pci.so.23 "))
        .unwrap_or_else(|| panic!("ldconfig -p has no librte_bus_pci.so.23:\n{cache}"));
    let cached = line.rsplit("=> ").next().expect("ldconfig -p line").trim();
    let ldd = quiet(&["ldd", DPDK_TEST]);
    let line = ldd
        .lines()
        .find(|l| l.trim_start().starts_with("librte_bus_pci.so.23 "))
        .unwrap_or_else(|| panic!("dpdk-test does not link librte_bus_pci.so.23:\n{ldd}"));
    let linked = line
        .split("=> ")
        .nth(1)
        .and_then(|r| r.split(" (").next())
        .expect("ldd line");
    let found = (
        fs::canonicalize(cached).expect("ldconfig's path"),
        fs::canonicalize(linked).expect("ldd's path"),
    );
    println!(
        "librte_bus_pci.so.23: ldconfig -p: {cached} -> {}; ldd dpdk-test: {linked} -> {}",
        found.0.display(),
        found.1.display()
    );
    found
}

fn devargs_autotest(state: &Path) -> String {
    let fake = fake_tree(Some(state));
    let text = run_dpdk_test(&[], &fake, &[], &["-b", "0000:00:05.0"]);
    println!("$ dpdk-test (devargs_autotest)\n{text}");
    text
}

/// librte-bus-pci23's `.deb` of the installed version: from apt's cache, else downloaded
/// (`apt-get download`, after an `apt-get update` if apt has no lists: both write inside
/// the overlay only).
fn stock_deb(state: &Path, version: &str) -> PathBuf {
    let arch = ok(&["dpkg", "--print-architecture"]).trim().to_string();
    // Debian's file name spells an epoch's ':' as %3a.
    let name = format!("{STOCK_PKG}_{}_{arch}.deb", version.replace(':', "%3a"));
    let cached = Path::new("/var/cache/apt/archives").join(&name);
    if cached.is_file() {
        return cached;
    }
    let dir = state.join("deb");
    fs::create_dir_all(&dir).expect("deb dir");
    let want = format!("{STOCK_PKG}:{arch}={version}");
    let download = || {
        Command::new("apt-get")
            .args(["-q", "-o", "APT::Sandbox::User=root", "download", &want])
            .current_dir(&dir)
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    };
    if !download() {
        ok(&["apt-get", "-q", "update"]);
        assert!(
            download(),
            "apt-get download {want} failed (twice, with an apt-get update between)"
        );
    }
    let deb = dir.join(&name);
    assert!(deb.is_file(), "apt-get download made no {}", deb.display());
    deb
}

/// The package's copy of the stock file, from the `.deb` itself.
fn file_in_deb(deb: &Path) -> Vec<u8> {
    let out = Command::new("sh")
        .args(["-c", "dpkg-deb --fsys-tarfile \"$1\" | tar -xOf - \".$2\"", "sh"])
        .arg(deb)
        .arg(TARGET)
        .output()
        .expect("dpkg-deb");
    assert!(
        out.status.success() && !out.stdout.is_empty(),
        "{} has no {TARGET}: {}",
        deb.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn steps(state: &Path) {
    let lib = built_library();
    let drop_in = fs::read(&lib).expect("the built drop-in");
    let stock = fs::read(TARGET).expect(TARGET);
    let version = installed_version();
    let listing = plugin_dir();
    assert_eq!(our_diversion(), None, "a pcibus diversion before install");

    // Install: the diversion in the machine's database, the drop-in at the stock file's
    // name, the stock file outside the plugin directory, and the writes in the overlay.
    let said = script("install", &[&lib]);
    assert!(
        said.contains("diverted"),
        "install did not say it diverted: {said}"
    );
    assert_eq!(
        our_diversion().as_deref(),
        Some(format!("diversion of {TARGET} to {DIVERTED} by pcibus-dpdk").as_str())
    );
    assert_eq!(
        truename(),
        DIVERTED,
        "dpkg would not write the package's file outside the plugin directory"
    );
    assert!(
        fs::read(TARGET).expect(TARGET) == drop_in,
        "the drop-in is not at {TARGET}"
    );
    assert!(
        fs::read(DIVERTED).expect(DIVERTED) == stock,
        "the stock file is not at {DIVERTED}"
    );
    assert_eq!(
        plugin_dir(),
        listing,
        "install changed the plugin directory's entries"
    );
    let upper_db = state.join("var/upper/lib/dpkg/diversions");
    assert!(
        fs::read_to_string(&upper_db).is_ok_and(|d| d.contains(TARGET)),
        "the diversion was not written to /var/lib/dpkg (the overlay's {})",
        upper_db.display()
    );
    assert!(
        fs::read(state.join("usr/upper").join(&TARGET[5..])).is_ok_and(|b| b == drop_in),
        "the drop-in was not written to {TARGET} (the overlay's upper /usr)"
    );

    // ldconfig (which every library package's trigger runs) keeps the linker on the drop-in.
    let (cached, linked) = resolved_by_the_linker();
    assert_eq!(cached, Path::new(TARGET), "ldconfig -p");
    assert_eq!(linked, Path::new(TARGET), "ldd dpdk-test");

    // A DPDK application, nothing in its environment: the drop-in's bus, and only it.
    let text = devargs_autotest(state);
    assert_drop_in_served(&text);
    assert_eq!(
        count(&text, "a second bus named \"pci\""),
        0,
        "the stock bus was loaded too"
    );

    // A second install changes nothing.
    let db = fs::read("/var/lib/dpkg/diversions").expect("diversions");
    let said = script("install", &[&lib]);
    assert!(said.contains("nothing to do"), "second install: {said}");
    assert!(
        fs::read("/var/lib/dpkg/diversions").expect("diversions") == db,
        "second install changed the diversions"
    );
    assert!(fs::read(TARGET).expect(TARGET) == drop_in);

    // The package reinstalled (what an upgrade does) while the drop-in is installed.
    let deb = stock_deb(state, &version);
    let packaged = file_in_deb(&deb);
    ok(&["dpkg", "-i", deb.to_str().expect("utf-8 path")]);
    assert_eq!(
        installed_version(),
        version,
        "dpkg -i left {STOCK_PKG} not installed"
    );
    assert!(
        fs::read(TARGET).expect(TARGET) == drop_in,
        "dpkg -i replaced the drop-in"
    );
    assert!(
        fs::read(DIVERTED).expect(DIVERTED) == packaged,
        "dpkg -i did not write the package's file to {DIVERTED}"
    );
    assert!(our_diversion().is_some(), "dpkg -i dropped the diversion");
    assert_eq!(
        plugin_dir(),
        listing,
        "dpkg -i changed the plugin directory's entries"
    );
    let (cached, linked) = resolved_by_the_linker();
    assert_eq!(
        (cached.as_path(), linked.as_path()),
        (Path::new(TARGET), Path::new(TARGET))
    );
    let text = devargs_autotest(state);
    assert_drop_in_served(&text);

    // Uninstall, twice.
    let said = script("uninstall", &[]);
    assert!(said.contains("stock library is back"), "uninstall: {said}");
    assert_eq!(our_diversion(), None, "uninstall left the diversion");
    assert_eq!(truename(), TARGET);
    assert!(
        fs::read(TARGET).expect(TARGET) == packaged,
        "the stock file is not back at {TARGET}"
    );
    assert!(!Path::new(DIVERTED).exists(), "{DIVERTED} left behind");
    assert_eq!(plugin_dir(), listing);
    let said = script("uninstall", &[]);
    assert!(said.contains("nothing to do"), "second uninstall: {said}");
    assert!(fs::read(TARGET).expect(TARGET) == packaged);

    // The same application, the stock bus.
    let (cached, linked) = resolved_by_the_linker();
    assert_eq!(
        (cached.as_path(), linked.as_path()),
        (Path::new(TARGET), Path::new(TARGET))
    );
    let text = devargs_autotest(state);
    assert!(
        text.contains("Test OK"),
        "devargs_autotest did not pass with the stock bus"
    );
    assert_eq!(count(&text, "Bus pci wants IOVA"), 1, "not exactly one pci bus");
    assert_eq!(count(&text, "PCI (pcibus)"), 0, "the drop-in is still loaded");
    assert_eq!(
        count(&text, "PCI device 0000:00:04.0 on NUMA socket"),
        1,
        "the stock bus did not scan the fake device"
    );
}
