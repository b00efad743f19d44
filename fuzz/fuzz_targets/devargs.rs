#![no_main]
use libfuzzer_sys::fuzz_target;

// Filled in with the parser it fuzzes (issue 7).
fuzz_target!(|data: &[u8]| {
    let _ = data;
});
