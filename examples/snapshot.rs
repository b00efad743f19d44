//! Prints the PCI part of a sysfs tree as a fixture:
//! `cargo run --example snapshot -- [ROOT] > out.pcifix` (ROOT defaults to `/sys`).

use std::path::PathBuf;
use std::process::ExitCode;

use pcibus::sysfs::snapshot::{CaptureOptions, capture};

fn main() -> ExitCode {
    let root = std::env::args_os()
        .nth(1)
        .map_or_else(|| PathBuf::from("/sys"), PathBuf::from);
    match capture(&root, &CaptureOptions::default()) {
        Ok(fixture) => {
            for note in &fixture.notes {
                eprintln!("snapshot: {note}");
            }
            print!("{}", pcibus::fixture::write(&fixture));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("snapshot: {e}");
            ExitCode::FAILURE
        }
    }
}
