#![no_main]
//! `modules.alias` parsing and glob matching: never panic, whatever the file and modalias.
use libfuzzer_sys::fuzz_target;
use pcibus::modules_alias::{ModuleAliases, glob_match};

fuzz_target!(|data: &[u8]| {
    // The first line is the modalias (and a glob pattern), the rest the file.
    let (first, file) = match data.iter().position(|&b| b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let aliases = ModuleAliases::parse(file);
    let modalias = String::from_utf8_lossy(first);
    let modules = aliases.modules_for(&modalias);
    assert!(modules.len() <= aliases.len());
    let _ = glob_match(first, file);
});
