#![no_main]
//! Configuration space: header, both capability walks, SR-IOV and link decode never panic
//! nor loop, and walks return bounded lists of offsets inside the buffer.
use libfuzzer_sys::fuzz_target;
use pcibus::config::{
    MAX_CAPABILITIES, MAX_EXT_CAPABILITIES, capabilities, extended_capabilities, find_capability,
    find_extended_capability, parse_header, pcie_link, sriov_capability,
};

fuzz_target!(|data: &[u8]| {
    // Short inputs are padded to 4096 bytes half of the time (chosen by the first byte), so
    // that the extended list, which needs a full 4 KiB, is reached.
    let mut buf = data.to_vec();
    if data.first().is_some_and(|b| b & 1 == 1) && buf.len() < 4096 {
        buf.resize(4096, 0);
    }
    let b = &buf[..];
    let header = parse_header(b);
    let caps = capabilities(b);
    let ext = extended_capabilities(b);
    if header.is_err() {
        assert!(caps.is_err() && ext.is_err());
    }
    if let Ok(caps) = &caps {
        assert!(caps.len() <= MAX_CAPABILITIES);
        for c in caps {
            assert!(c.offset >= 0x40 && usize::from(c.offset) + 1 < b.len());
        }
        // `find_*` returns the first entry of the walk with that id.
        for c in caps.iter().take(4) {
            let first = caps.iter().find(|x| x.id == c.id).map(|x| x.offset);
            assert_eq!(find_capability(b, c.id), first);
        }
    }
    if let Ok(ext) = &ext {
        assert!(ext.len() <= MAX_EXT_CAPABILITIES);
        for c in ext {
            assert!(c.offset >= 0x100 && usize::from(c.offset) + 3 < b.len());
        }
        for c in ext.iter().take(4) {
            let first = ext.iter().find(|x| x.id == c.id).map(|x| x.offset);
            assert_eq!(find_extended_capability(b, c.id), first);
        }
    }
    let _ = sriov_capability(b);
    if let Some((cur, max)) = pcie_link(b) {
        assert!(cur.width.is_none_or(|w| w <= 32) && max.width.is_none_or(|w| w <= 32));
    }
});
