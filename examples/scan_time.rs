//! Times one scan of a sysfs tree in a fresh process, the way the DPDK baseline in
//! BENCHMARKS.md is timed (its first `rte_pci_scan` in a fresh process):
//!
//! `cargo run --release --example scan_time -- ROOT [files|id-files|config] [THREADS]`
//! prints `MS DEVICES`.
use std::time::Instant;

use pcibus::{IdSource, Scanner, SysfsRoot};

fn main() {
    let mut args = std::env::args().skip(1);
    let root = args
        .next()
        .expect("usage: scan_time ROOT [files|id-files|config] [THREADS]");
    let ids = match args.next().as_deref() {
        None | Some("files") => IdSource::Files,
        Some("id-files") => IdSource::IdFiles,
        Some("config") => IdSource::Config,
        Some(other) => panic!("unknown id source {other}"),
    };
    let mut scanner = Scanner::new(SysfsRoot::new(root)).id_source(ids);
    if let Some(t) = args.next() {
        scanner = scanner.threads(t.parse().expect("threads"));
    }
    let t0 = Instant::now();
    let scan = scanner.scan().expect("scan");
    let ms = t0.elapsed().as_secs_f64() * 1e3;
    println!("{ms:.2} {}", scan.devices.len());
}
