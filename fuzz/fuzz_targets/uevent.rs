#![no_main]
//! `uevent`: never panics (typed helpers included), bounded, round trip.
use libfuzzer_sys::fuzz_target;
use pcibus::sysfs::parse::{UEVENT_MAX_LINES, format_uevent, uevent};

fuzz_target!(|data: &[u8]| {
    if let Ok(u) = uevent(data) {
        assert!(u.entries.len() <= UEVENT_MAX_LINES);
        let _ = (u.driver(), u.pci_class(), u.pci_id(), u.pci_subsys_id());
        let _ = (u.slot_name(), u.modalias());
        assert_eq!(uevent(format_uevent(&u).as_bytes()).unwrap(), u);
    }
});
