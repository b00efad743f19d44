#![no_main]
//! `numa_node`: never panics; round trip.
use libfuzzer_sys::fuzz_target;
use pcibus::sysfs::parse::{format_numa_node, numa_node};

fuzz_target!(|data: &[u8]| {
    if let Ok(n) = numa_node(data) {
        assert_eq!(numa_node(format_numa_node(n).as_bytes()).unwrap(), n);
    }
});
