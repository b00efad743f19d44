#![no_main]
//! VFIO region and IOMMU info buffers (capability chains): decoding never panics, and
//! every sparse-mmap area it returns lies inside its region.
use libfuzzer_sys::fuzz_target;
use pcibus::vfio::{parse_iommu_info, parse_region_info};

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = parse_region_info(data) {
        for (offset, size) in r.mmap_areas() {
            assert!(offset.checked_add(size).is_some_and(|end| end <= r.size));
        }
    }
    if let Ok(i) = parse_iommu_info(data) {
        assert!(i.iova_ranges.iter().all(|r| r.start() <= r.end()));
    }
});
