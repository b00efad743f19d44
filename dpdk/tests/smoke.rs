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

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{
    PLUGIN_DIR, assert_drop_in_served, built_library, count, fake_tree, run_dpdk_test, skip_without_dpdk_test,
};

#[test]
fn devargs_autotest_through_ld_library_path() {
    if skip_without_dpdk_test("devargs_autotest_through_ld_library_path") {
        return;
    }
    let lib = tempfile_dir("ldpath");
    std::fs::copy(built_library(), lib.join("librte_bus_pci.so.23")).expect("copy the drop-in");
    let fake = fake_tree(None);
    let text = run_dpdk_test(&[("LD_LIBRARY_PATH", &lib)], &fake, &[], &["-b", "0000:00:05.0"]);
    if std::env::var_os("SMOKE_SHOW").is_some() {
        eprintln!("{text}");
    }
    assert_drop_in_served(&text);
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
    let fake = fake_tree(None);
    let wrap = [
        "unshare".to_string(),
        "-m".into(),
        "sh".into(),
        "-c".into(),
        format!("mount --bind {} {PLUGIN_DIR} && exec \"$@\"", plugins.display()),
        "sh".into(),
    ];
    let text = run_dpdk_test(&[], &fake, &wrap, &["-b", "0000:00:05.0"]);
    assert_drop_in_served(&text);
    assert_eq!(
        count(&text, "a second bus named \"pci\""),
        0,
        "the stock bus was loaded:\n{text}"
    );
    std::fs::remove_dir_all(&plugins).ok();
}

fn tempfile_dir(what: &str) -> PathBuf {
    common::scratch_dir(&format!("smoke-{what}"))
}
