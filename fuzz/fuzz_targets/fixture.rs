#![no_main]
//! The fixture text format: parsing never panics, and whatever parses writes back to text
//! that parses to the same fixture.
use libfuzzer_sys::fuzz_target;
use pcibus::fixture::{parse, write};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(mut f) = parse(text) {
        let again = parse(&write(&f)).expect("written fixtures parse");
        f.normalize();
        let mut g = again;
        g.normalize();
        assert_eq!(f.entries, g.entries);
    }
});
