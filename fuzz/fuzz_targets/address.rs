#![no_main]
//! PCI address parsing: never panics; what strict parsing accepts, Display writes back
//! unchanged and lenient parsing agrees with.
use libfuzzer_sys::fuzz_target;
use pcibus::PciAddress;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let lenient = PciAddress::parse_lenient(text);
    if let Ok(a) = PciAddress::parse_strict(text) {
        assert_eq!(a.to_string(), text);
        assert_eq!(lenient.as_ref().ok(), Some(&a));
    }
    if let Ok(a) = lenient {
        assert_eq!(PciAddress::parse_strict(&a.to_string()).unwrap(), a);
    }
});
