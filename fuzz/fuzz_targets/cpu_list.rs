#![no_main]
//! `local_cpulist`: never panics, result sorted, unique and bounded; round trip.
use libfuzzer_sys::fuzz_target;
use pcibus::sysfs::parse::{CPU_LIMIT, cpu_list, format_cpu_list};

fuzz_target!(|data: &[u8]| {
    if let Ok(v) = cpu_list(data) {
        assert!(v.windows(2).all(|w| w[0] < w[1]));
        assert!(v.last().is_none_or(|&c| c < CPU_LIMIT));
        assert_eq!(cpu_list(format_cpu_list(&v).as_bytes()).unwrap(), v);
    }
});
