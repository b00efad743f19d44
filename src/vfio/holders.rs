//! Where each handle of an open device was taken, for finding the one a driver kept.
//!
//! A VFIO device stays open while any handle of it lives (a [`VfioBacking`] clone, a
//! [`MappedBar`]), and the kernel's removal of the device waits for the last one. The bus
//! counts the handles left after a driver's `remove` and parks the release while any
//! remain; which code took them is what a driver author then needs to know.
//!
//! With `PCIBUS_TRACE_HANDLES=1` in the environment, every handle records the thread
//! and the stack it was taken on, and the bus logs the live ones of a device whose
//! driver kept some (at `warn`). Without it this costs one relaxed load per handle.
//!
//! [`VfioBacking`]: crate::bus::VfioBacking
//! [`MappedBar`]: super::MappedBar

use std::backtrace::Backtrace;
use std::collections::BTreeMap;
use std::sync::LazyLock;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;

use crate::addr::PciAddress;

/// The environment variable that turns tracing on (`1`).
pub const TRACE_ENV: &str = "PCIBUS_TRACE_HANDLES";

static ON: LazyLock<bool> = LazyLock::new(|| std::env::var_os(TRACE_ENV).is_some_and(|v| v == "1"));
static NEXT: AtomicU64 = AtomicU64::new(0);

struct Taken {
    address: PciAddress,
    kind: &'static str,
    thread: String,
    stack: Backtrace,
}

static LIVE: LazyLock<Mutex<BTreeMap<u64, Taken>>> = LazyLock::new(|| Mutex::new(BTreeMap::new()));

/// One handle's record; removed when dropped. Empty when tracing is off.
#[derive(Debug)]
pub(crate) struct Hold(Option<u64>);

impl Hold {
    /// Records a handle of `address` of `kind` ("backing", "BAR mapping") taken here.
    pub(crate) fn new(address: PciAddress, kind: &'static str) -> Hold {
        if !*ON {
            return Hold(None);
        }
        let id = NEXT.fetch_add(1, Ordering::Relaxed);
        let thread = std::thread::current();
        let taken = Taken {
            address,
            kind,
            thread: thread
                .name()
                .map_or_else(|| format!("{:?}", thread.id()), str::to_owned),
            stack: Backtrace::force_capture(),
        };
        LIVE.lock().insert(id, taken);
        Hold(Some(id))
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        if let Some(id) = self.0 {
            LIVE.lock().remove(&id);
        }
    }
}

/// The live handles of `address` as text, one entry each (kind, thread, stack), or
/// nothing when tracing is off.
pub fn describe(address: PciAddress) -> Vec<String> {
    if !*ON {
        return Vec::new();
    }
    LIVE.lock()
        .values()
        .filter(|t| t.address == address)
        .map(|t| format!("{} taken on thread {}:\n{}", t.kind, t.thread, t.stack))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn off_by_default_records_nothing() {
        // The test environment does not set the variable.
        if std::env::var_os(TRACE_ENV).is_some() {
            return;
        }
        let a: PciAddress = "0000:01:00.0".parse().unwrap();
        let h = Hold::new(a, "backing");
        assert!(h.0.is_none());
        assert!(describe(a).is_empty());
    }
}
