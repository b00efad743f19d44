#![no_main]
//! `modalias`: never panics; round trip through the kernel's upper-case form.
use libfuzzer_sys::fuzz_target;
use pcibus::sysfs::parse::{format_modalias, modalias};

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = modalias(data) {
        let text = format_modalias(&m);
        assert_eq!(modalias(text.as_bytes()).unwrap(), m);
        assert!(data.trim_ascii().eq_ignore_ascii_case(text.trim_end().as_bytes()));
    }
});
