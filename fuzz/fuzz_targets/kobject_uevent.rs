#![no_main]
//! `kobject_uevent` (netlink uevent datagrams): never panics, bounded, helpers total, and a
//! parsed kernel message writes back to the same event.
use libfuzzer_sys::fuzz_target;
use pcibus::hotplug::event::{Datagram, UEVENT_MSG_MAX, UEVENT_VARS_MAX, parse_datagram};

fuzz_target!(|data: &[u8]| {
    if let Ok(Datagram::Kernel(ev)) = parse_datagram(data) {
        assert!(data.len() <= UEVENT_MSG_MAX);
        assert!(ev.vars.len() <= UEVENT_VARS_MAX);
        let _ = (ev.pci_address(), ev.is_pci(), ev.var("SUBSYSTEM"));
        if ev.pci_slot_name.is_some() {
            assert_eq!(ev.pci_address(), ev.pci_slot_name);
        }
        assert_eq!(parse_datagram(&ev.to_bytes()), Ok(Datagram::Kernel(ev)));
    }
});
