#![no_main]
//! `resource`: never panics, stays within the line cap, and what it returns formats and
//! parses back to the same resources.
use libfuzzer_sys::fuzz_target;
use pcibus::sysfs::parse::{RESOURCE_MAX_LINES, format_resource, resource};

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = resource(data) {
        assert!(!r.is_empty() && r.len() <= RESOURCE_MAX_LINES);
        assert_eq!(resource(format_resource(&r).as_bytes()).unwrap(), r);
        for x in &r {
            let _ = (x.size(), x.kind(), pcibus::Bar::from_resource(x));
        }
    }
});
