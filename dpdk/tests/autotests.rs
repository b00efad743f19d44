//! DPDK's own autotests that touch the PCI bus without hardware (issue 18's first proof),
//! run by Debian's `dpdk-test` through Debian's library and through the drop-in
//! (`LD_LIBRARY_PATH`), over the fake sysfs tree of `common::fake_tree`:
//!
//! - `devargs_autotest`: devargs parsing through the bus's `parse`/`devargs_parse`;
//! - `eal_flags_a_opt_autotest`, `eal_flags_b_opt_autotest`: EAL started again and again
//!   with good and bad `-a`/`-b` PCI addresses (and `pci:` prefixes, `type=` arguments);
//! - `eal_flags_misc_autotest`: `--vfio-intr`, `--no-pci`, `--iova-mode` and others;
//! - `multiprocess_autotest`: secondary processes attached to this one (they scan the bus);
//! - `interrupt_autotest`, `vdev_autotest`: EAL's interrupt thread and the other bus, with
//!   the PCI bus loaded beside them.
//!
//! The `eal_flags` and `multiprocess` tests start processes of their own that share this
//! one's hugepage memory: without free 2 MiB pages (and hugetlbfs mounted) they fail with
//! either library, so this test then prints `SKIPPED` and passes, unless
//! `PCIBUS_REQUIRE_HUGEPAGES=1` (CI sets it after reserving pages) makes that a failure.
//! Each autotest must pass with the stock library first (the baseline: a failure there is
//! the machine's, and is reported as such), then with the drop-in, whose log must show that
//! its bus served.

mod common;

use std::path::Path;
use std::process::Command;

use common::{DPDK_TEST, built_library, count, fake_tree, scratch_dir, skip_without_dpdk_test};

const AUTOTESTS: &[&str] = &[
    "devargs_autotest",
    "eal_flags_a_opt_autotest",
    "eal_flags_b_opt_autotest",
    "eal_flags_misc_autotest",
    "multiprocess_autotest",
    "interrupt_autotest",
    "vdev_autotest",
];

/// Free 2 MiB huge pages, and whether hugetlbfs is mounted anywhere.
fn hugepages() -> (u64, bool) {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let free = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("HugePages_Free:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    (
        free,
        mounts
            .lines()
            .any(|l| l.split_whitespace().nth(2) == Some("hugetlbfs")),
    )
}

/// Runs one autotest (`DPDK_TEST=name`) with EAL's debug log over `fake`; `ld_path` puts
/// the drop-in first. Returns whether it printed "Test OK", and its output.
fn autotest(name: &str, ld_path: Option<&Path>, devices: &Path) -> (bool, String) {
    let mut cmd = Command::new("timeout");
    cmd.args([
        "600",
        DPDK_TEST,
        "--no-telemetry",
        "-l",
        "0",
        "--log-level=lib.eal:debug",
    ])
    .env_remove("LD_LIBRARY_PATH")
    .env("DPDK_TEST", name)
    .env("SYSFS_PCI_DEVICES", devices);
    if let Some(dir) = ld_path {
        cmd.env("LD_LIBRARY_PATH", dir);
    }
    let out = cmd.output().expect("running dpdk-test");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success() && text.contains("Test OK"), text)
}

#[test]
fn dpdk_autotests_that_touch_the_bus_pass_through_the_drop_in() {
    if skip_without_dpdk_test("dpdk_autotests_that_touch_the_bus_pass_through_the_drop_in") {
        return;
    }
    let required = std::env::var_os("PCIBUS_REQUIRE_HUGEPAGES").is_some_and(|v| v == "1");
    let (free, mounted) = hugepages();
    if free < 128 || !mounted {
        let why = format!(
            "{free} free 2 MiB huge pages (128 needed), hugetlbfs {}mounted: DPDK's eal_flags and \
             multiprocess tests fail without them with either library \
             (echo 256 > /proc/sys/vm/nr_hugepages; mount -t hugetlbfs nodev /dev/hugepages)",
            if mounted { "" } else { "not " }
        );
        assert!(!required, "PCIBUS_REQUIRE_HUGEPAGES=1 but {why}");
        eprintln!("SKIPPED dpdk_autotests_that_touch_the_bus_pass_through_the_drop_in: {why}");
        return;
    }
    let lib = scratch_dir("autotests");
    std::fs::copy(built_library(), lib.join("librte_bus_pci.so.23")).expect("copy the drop-in");
    let fake = fake_tree(None);
    let devices = fake.root().join("bus/pci/devices");
    let mut failed = Vec::new();
    for name in AUTOTESTS {
        let (stock_ok, stock) = autotest(name, None, &devices);
        assert!(
            stock_ok,
            "{name} fails with Debian's own librte_bus_pci (the machine's problem, not the \
             drop-in's):\n{stock}"
        );
        assert!(
            !stock.contains("PCI (pcibus)"),
            "the drop-in answered the stock run of {name}"
        );
        let (ok, text) = autotest(name, Some(&lib), &devices);
        // The drop-in was loaded and took the stock bus (a plugin) off EAL's list.
        let served = count(&text, "a second bus named \"pci\" is registered") >= 1;
        eprintln!(
            "{name}: stock OK, drop-in {}",
            if ok && served { "OK" } else { "FAILED" }
        );
        if !ok || !served {
            failed.push(format!(
                "{name} (passed: {ok}, drop-in loaded: {served}):\n{text}"
            ));
        }
    }
    std::fs::remove_dir_all(&lib).ok();
    assert!(failed.is_empty(), "through the drop-in:\n{}", failed.join("\n\n"));
}
