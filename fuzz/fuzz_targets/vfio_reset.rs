#![no_main]
//! VFIO's PCI hot reset info buffer and sysfs `reset_method` text: decoding never panics,
//! a decoded buffer never lists more devices than fit after its 12-byte header (8 bytes
//! each), and the method list has at most one method per name in the text.
use libfuzzer_sys::fuzz_target;
use pcibus::vfio::reset::{parse_hot_reset_info, parse_reset_methods};

fuzz_target!(|data: &[u8]| {
    if let Ok(info) = parse_hot_reset_info(data) {
        assert!(info.devices.len() <= data.len().saturating_sub(12) / 8);
    }
    let text = String::from_utf8_lossy(data);
    let methods = parse_reset_methods(&text);
    assert!(methods.len() <= text.split(|c: char| c.is_whitespace() || c == ',').count());
    let _ = pcibus::bus::bar::decode_bar_register(u32::from_le_bytes(
        data.get(..4).and_then(|b| b.try_into().ok()).unwrap_or([0; 4]),
    ));
});
