#![no_main]
//! iommufd answers and names: the IOAS IOVA-range buffer decodes without panicking into
//! ranges that start before they end, whose count fits the buffer, with a page-sized
//! alignment; cdev names and /proc/devices text never panic.
use libfuzzer_sys::fuzz_target;
use pcibus::vfio::iommufd::{has_char_device, vfio_dev_number};
use pcibus::vfio::parse_iova_ranges;

fuzz_target!(|data: &[u8]| {
    if let Ok(info) = parse_iova_ranges(data) {
        assert!(info.iova_ranges.iter().all(|r| r.start() <= r.end()));
        assert!(32 + info.iova_ranges.len() * 16 <= data.len());
        assert!(info.min_page_size() >= 4096 && info.min_page_size().is_power_of_two());
    }
    if let Ok(text) = std::str::from_utf8(data) {
        if let Some(n) = vfio_dev_number(text) {
            assert_eq!(format!("vfio{n}"), text);
        }
        let _ = has_char_device(text, "vfio-dev");
    }
});
