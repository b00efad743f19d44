//! The drop-in's ABI against Debian's librte_bus_pci.so.23.0 (DPDK 22.11): the same
//! defined dynamic symbols with the same versions, the same version nodes, the same
//! SONAME, and nothing else exported. Runs binutils' `nm` and `readelf` on the built
//! library (`cargo test -p pcibus-dpdk --test abi`, which builds it first).

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use common::built_library;

const STOCK: &str = "/usr/lib/x86_64-linux-gnu/dpdk/pmds-23.0/librte_bus_pci.so.23.0";

fn run(cmd: &str, args: &[&str], lib: &Path) -> String {
    let out = Command::new(cmd)
        .args(args)
        .arg(lib)
        .output()
        .unwrap_or_else(|e| panic!("running {cmd} (binutils): {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} {}: {}",
        lib.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

/// Defined dynamic symbols as "TYPE name@@VERSION", version-name ('A') entries left out
/// (GNU ld emits them, lld does not; the version definitions are compared separately).
fn exports(lib: &Path) -> BTreeSet<String> {
    run("nm", &["-D", "--defined-only", "--with-symbol-versions"], lib)
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() == 3 && f[1] != "A").then(|| format!("{} {}", f[1], f[2]))
        })
        .collect()
}

/// The names in the version definition section, the base entry (the SONAME) left out.
fn version_definitions(lib: &Path) -> BTreeSet<String> {
    let text = run("readelf", &["-V", "--wide"], lib);
    let Some(section) = text.split("Version definition section").nth(1) else {
        return BTreeSet::new();
    };
    let section = section.split("Version needs section").next().unwrap_or(section);
    section
        .lines()
        .filter(|l| l.contains("Flags:") && !l.contains("BASE"))
        .filter_map(|l| l.split("Name:").nth(1))
        .map(|n| n.trim().to_string())
        .collect()
}

fn soname(lib: &Path) -> String {
    run("readelf", &["-d", "--wide"], lib)
        .lines()
        .find(|l| l.contains("(SONAME)"))
        .and_then(|l| l.split('[').nth(1))
        .map(|s| s.trim_end_matches(']').to_string())
        .unwrap_or_default()
}

/// abi/debian-22.11.11.exports: "T name@@VERSION" and "A VERSION" lines.
fn recorded() -> (BTreeSet<String>, BTreeSet<String>) {
    let text = include_str!("../abi/debian-22.11.11.exports");
    let lines = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty());
    let (mut syms, mut nodes) = (BTreeSet::new(), BTreeSet::new());
    for l in lines {
        match l.split_once(' ') {
            Some(("A", node)) => {
                nodes.insert(node.to_string());
            }
            Some(_) => {
                syms.insert(l.to_string());
            }
            None => panic!("bad line in the recorded exports: {l}"),
        }
    }
    (syms, nodes)
}

#[test]
fn exports_match_debians_library() {
    let lib = built_library();
    let (syms, _) = recorded();
    assert_eq!(syms.len(), 15, "the recorded list has DPDK 22.11's 15 functions");
    assert_eq!(exports(&lib), syms, "exports of {}", lib.display());
}

#[test]
fn version_nodes_and_soname_match() {
    let lib = built_library();
    let (_, nodes) = recorded();
    assert_eq!(version_definitions(&lib), nodes);
    assert_eq!(soname(&lib), "librte_bus_pci.so.23");
}

/// When Debian's library is installed, the recorded list still describes it (a DPDK
/// update that changed the ABI shows up here, not in a PMD failing to load).
#[test]
fn recorded_list_matches_the_installed_stock_library() {
    let stock = Path::new(STOCK);
    if !stock.is_file() {
        eprintln!("skipped: {STOCK} is not installed (apt-get install librte-bus-pci23)");
        return;
    }
    let (syms, nodes) = recorded();
    assert_eq!(exports(stock), syms);
    assert_eq!(version_definitions(stock), nodes);
    assert_eq!(soname(stock), "librte_bus_pci.so.23");
}
