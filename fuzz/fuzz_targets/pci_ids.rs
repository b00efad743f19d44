#![no_main]
//! pci.ids text: the streaming lookup never panics, whatever the file holds.
use libfuzzer_sys::fuzz_target;
use pcibus::names::Names;
use pcibus::{ClassCode, DeviceId, VendorId};

fuzz_target!(|data: &[u8]| {
    let ids = [
        (VendorId(0x8086), DeviceId(0x0953)),
        (VendorId(0x1af4), DeviceId(0x1041)),
    ];
    let classes = [ClassCode::from_parts(1, 8, 2), ClassCode::from_parts(2, 0, 0)];
    let names = Names::from_reader(data, ids, classes).expect("reading from a slice cannot fail");
    for (v, d) in ids {
        let _ = (names.vendor(v), names.device(v, d));
    }
    for c in classes {
        let _ = names.class(c);
    }
});
