#![no_main]
//! iommufd answers and names: the IOAS IOVA-range buffer decodes without panicking into
//! ranges that start before they end, whose count fits the buffer, with a page-sized
//! alignment; cdev names and /proc/devices text never panic; a cdev's `dev` attribute
//! parses only into numbers Linux can give, which print back as the text.
use libfuzzer_sys::fuzz_target;
use pcibus::vfio::iommufd::{has_char_device, parse_dev_number, vfio_dev_number};
use pcibus::vfio::parse_iova_ranges;

fuzz_target!(|data: &[u8]| {
    if let Ok(info) = parse_iova_ranges(data) {
        assert!(info.iova_ranges.iter().all(|r| r.start() <= r.end()));
        assert!(32 + info.iova_ranges.len() * 16 <= data.len());
        assert!(info.min_page_size() >= 4096 && info.min_page_size().is_power_of_two());
    }
    if let Ok(dev) = parse_dev_number(data) {
        assert!(dev.major < 1 << 12 && dev.minor < 1 << 20);
        let printed = dev.to_string();
        assert!(data == printed.as_bytes() || data == format!("{printed}\n").as_bytes());
    }
    if let Ok(text) = std::str::from_utf8(data) {
        if let Some(n) = vfio_dev_number(text) {
            assert_eq!(format!("vfio{n}"), text);
        }
        let _ = has_char_device(text, "vfio-dev");
    }
});
