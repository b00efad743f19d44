//! Log page and asynchronous event parsers against arbitrary bytes: SMART / health
//! information, Error Information entries, the Changed Namespace List, and an
//! Asynchronous Event Request's dword 0. None may panic; what parses formats back to the
//! same fields.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pcibus::nvme::spec::{
    AsyncEventInfo, ErrorLogEntry, SmartLog, parse_changed_namespaces, parse_error_log,
};

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = SmartLog::parse(data) {
        assert_eq!(SmartLog::parse(&s.to_bytes()).ok(), Some(s));
    }
    for e in parse_error_log(data) {
        assert_ne!(e.error_count, 0);
        assert_eq!(ErrorLogEntry::parse(&e.to_bytes()), Some(e));
    }
    let _ = parse_changed_namespaces(data);
    if let Some(b) = data.get(..4) {
        let e = AsyncEventInfo::from_dw0(u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
        assert_eq!(AsyncEventInfo::from_dw0(e.to_dw0()), e);
        let _ = e.to_string();
    }
});
