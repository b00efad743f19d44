#![no_main]
//! DPDK devargs (`-a`/`-b` values): never panics; an accepted allow entry's Display is
//! canonical (it parses back to the same value and prints the same text); errors point
//! inside the text; `reject_unknown` and `Selection` agree with what was parsed.
use libfuzzer_sys::fuzz_target;
use pcibus::bus::devargs::{DevArg, Selection};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match DevArg::parse_allow(text) {
        Ok(d) => {
            let canonical = d.to_string();
            let again = DevArg::parse_allow(&canonical).unwrap();
            assert_eq!(again, d);
            assert_eq!(again.to_string(), canonical);
            let keys: Vec<&str> = d.args().map(|(k, _)| k).collect();
            assert!(d.reject_unknown(&keys).is_ok());
            for (k, v) in d.args() {
                assert_eq!(d.get(k), Some(v));
            }
            if let Some((first, _)) = d.args().next() {
                let e = d.reject_unknown(&keys[1..]).unwrap_err();
                assert!(canonical[e.position..].starts_with(first));
            }
            let s = Selection::from_args([("-a", text)]).unwrap();
            assert!(s.admits(d.address()));
            assert_eq!(s.devarg(d.address()), Some(&d));
        }
        Err(e) => assert!(e.position <= text.len(), "{e}"),
    }
    match DevArg::parse_block(text) {
        Ok(a) => {
            assert_eq!(DevArg::parse_block(&a.to_string()).unwrap(), a);
            let s = Selection::from_args([("-b", text)]).unwrap();
            assert!(!s.admits(a));
        }
        Err(e) => assert!(e.position <= text.len(), "{e}"),
    }
});
