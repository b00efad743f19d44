#![no_main]
//! `class`: never panics; accepted values round-trip and fit 24 bits.
use libfuzzer_sys::fuzz_target;
use pcibus::sysfs::parse::{class, format_class};

fuzz_target!(|data: &[u8]| {
    if let Ok(c) = class(data) {
        assert!(c.value() <= 0xff_ffff);
        assert_eq!(class(format_class(c).as_bytes()).unwrap(), c);
    }
});
