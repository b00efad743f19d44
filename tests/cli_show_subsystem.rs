//! `pcibus show`'s subsystem is named as `lspci -v`'s "Subsystem:" line names it: the
//! subsystem vendor and the pci.ids subsystem entry ("Red Hat, Inc. QEMU Virtual
//! Machine"), or the device's own name when the subsystem ids are the device's ids; only
//! the vendor ("Red Hat, Inc. Device 1100") when pci.ids has no entry. Compared with the
//! real lspci on this machine's devices (skipped without lspci, as tests/lspci.rs).

#[path = "common/skip.rs"]
mod skip;

use std::process::Command;

fn lspci_subsystem(address: &str) -> Option<Option<String>> {
    let out = match Command::new("lspci").args(["-v", "-D", "-s", address]).output() {
        Ok(o) if o.status.success() => o,
        Ok(o) => panic!("lspci -v -s {address}: {}", String::from_utf8_lossy(&o.stderr)),
        Err(_) if std::env::var_os("PCIBUS_REQUIRE_LSPCI").is_some_and(|v| v == "1") => {
            panic!("lspci is required (PCIBUS_REQUIRE_LSPCI=1) but not installed")
        }
        Err(_) => return None,
    };
    let text = String::from_utf8(out.stdout).unwrap();
    Some(
        text.lines()
            .find_map(|l| l.trim().strip_prefix("Subsystem: "))
            .map(str::to_owned),
    )
}

// `  subsystem 1af4:1100  (NAME)` → NAME.
fn our_subsystem(address: &str) -> Option<String> {
    let out = Command::new(env!("CARGO_BIN_EXE_pcibus"))
        .args(["--sysfs", "/sys", "show", address])
        .env_remove("PCIBUS_SYSFS")
        .env_remove("SYSFS_PCI_DEVICES")
        .output()
        .unwrap();
    assert!(
        matches!(out.status.code(), Some(0 | 3)),
        "show {address}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with("subsystem "))
        .unwrap_or_else(|| panic!("no subsystem line in:\n{text}"));
    let (_, name) = line.split_once("  (")?;
    Some(name.strip_suffix(')').unwrap_or(name).to_owned())
}

#[test]
fn show_names_the_subsystem_as_lspci_v_does() {
    let Ok(dir) = std::fs::read_dir("/sys/bus/pci/devices") else {
        skip::skip("no /sys/bus/pci/devices here");
        return;
    };
    let mut addresses: Vec<String> = dir
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    addresses.sort();
    let mut compared = 0;
    for address in &addresses {
        let Some(theirs) = lspci_subsystem(address) else {
            skip::skip("lspci not installed (apt-get install pciutils)");
            return;
        };
        // lspci leaves the line out for a zero subsystem (and for bridges, whose
        // subsystem is in a capability); nothing to compare with then.
        let Some(theirs) = theirs else { continue };
        assert_eq!(
            our_subsystem(address).as_deref(),
            Some(theirs.as_str()),
            "{address}"
        );
        compared += 1;
    }
    if compared == 0 {
        skip::skip("no device here has a subsystem line in lspci -v");
    }
}
