#![no_main]
//! `revision`: never panics; accepted values round-trip.
use libfuzzer_sys::fuzz_target;
use pcibus::sysfs::parse::{format_revision, revision};

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = revision(data) {
        assert_eq!(revision(format_revision(r).as_bytes()).unwrap(), r);
    }
});
