#![no_main]
//! `vendor`, `device`, `subsystem_*`: never panics; accepted values round-trip.
use libfuzzer_sys::fuzz_target;
use pcibus::sysfs::parse::{format_hex_u16, hex_u16};

fuzz_target!(|data: &[u8]| {
    if let Ok(v) = hex_u16("vendor", data) {
        assert_eq!(hex_u16("vendor", format_hex_u16(v).as_bytes()).unwrap(), v);
    }
});
