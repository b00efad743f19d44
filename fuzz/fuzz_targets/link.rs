#![no_main]
//! `current_link_speed`/`max_link_speed` and `*_link_width`: never panic; round trips.
use libfuzzer_sys::fuzz_target;
use pcibus::sysfs::parse::{LINK_WIDTH_MAX, format_link_speed, format_link_width, link_speed, link_width};

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = link_speed(data) {
        // Display keeps one decimal, so only whole hundreds of MT/s come back exactly.
        if s.is_none_or(|s| s.0 % 100 == 0) {
            assert_eq!(link_speed(format_link_speed(s).as_bytes()).unwrap(), s);
        }
    }
    if let Ok(w) = link_width(data) {
        assert!(w.is_none_or(|w| (1..=LINK_WIDTH_MAX).contains(&w)));
        assert_eq!(link_width(format_link_width(w).as_bytes()).unwrap(), w);
    }
});
