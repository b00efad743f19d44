#![no_main]
//! Decimal attributes (`sriov_*`, `irq`): never panic; u16 and u32 agree; round trip.
use libfuzzer_sys::fuzz_target;
use pcibus::sysfs::parse::{decimal_u16, decimal_u32, format_decimal};

fuzz_target!(|data: &[u8]| {
    let wide = decimal_u32("irq", data);
    let narrow = decimal_u16("sriov_numvfs", data);
    if let Ok(n) = narrow {
        assert_eq!(wide.as_ref().ok(), Some(&u32::from(n)));
    }
    if let Ok(v) = wide {
        assert_eq!(decimal_u32("irq", format_decimal(v).as_bytes()).unwrap(), v);
        assert_eq!(narrow.is_ok(), v <= u32::from(u16::MAX));
    }
});
