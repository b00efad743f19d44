//! The removal registry: devices whose removal is pending.
//!
//! While the kernel removes a device bound to vfio-pci, it holds the device lock and waits
//! for userspace to close the device. Until then, reading an attribute whose `show()` takes
//! that lock blocks. The registry is where a process writes down what it knows about such
//! devices: a vfio removal request, a `remove` uevent, or a guarded read that timed out.
//! Scans consult it and keep away from the blocking attributes of every device in it.
//!
//! ```
//! use pcibus::{PciAddress, RemovalRegistry, registry::Reason};
//! let registry = RemovalRegistry::new();
//! let nvme: PciAddress = "0000:01:00.0".parse().unwrap();
//! registry.mark(nvme, Reason::RemovalRequested);
//! assert!(registry.is_pending(nvme));
//! registry.release(nvme); // the driver closed the device
//! assert!(!registry.is_pending(nvme));
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::time::Instant;

use parking_lot::Mutex;

use crate::PciAddress;

/// Why a device is in the registry.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Reason {
    /// vfio signalled the device's removal request (REQ) eventfd.
    RemovalRequested,
    /// A `remove` uevent arrived for the device.
    Uevent,
    /// A guarded read of this attribute did not answer by its deadline.
    TimedOut {
        /// The attribute whose read timed out.
        attribute: &'static str,
    },
    /// The caller's own reason.
    Other(String),
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::RemovalRequested => f.write_str("vfio removal request"),
            Reason::Uevent => f.write_str("remove uevent"),
            Reason::TimedOut { attribute } => write!(f, "read of {attribute} timed out"),
            Reason::Other(s) => f.write_str(s),
        }
    }
}

/// One pending device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    /// The device.
    pub address: PciAddress,
    /// Why it was marked (the first reason; later marks do not overwrite it).
    pub reason: Reason,
    /// When it was marked.
    pub since: Instant,
}

/// Devices whose removal is pending. Cheap to share: wrap it in an `Arc`.
#[derive(Debug, Default)]
pub struct RemovalRegistry {
    pending: Mutex<BTreeMap<PciAddress, Pending>>,
}

impl RemovalRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records that `address` is being removed. Returns `true` if it was not pending before.
    pub fn mark(&self, address: PciAddress, reason: Reason) -> bool {
        let mut pending = self.pending.lock();
        if pending.contains_key(&address) {
            return false;
        }
        log::warn!("{address}: removal pending ({reason}); its blocking attributes will not be read");
        pending.insert(
            address,
            Pending {
                address,
                reason,
                since: Instant::now(),
            },
        );
        true
    }

    /// Records that the caller released the device (closed its vfio fd): the removal can
    /// complete and the entry goes. Returns whether it was pending.
    pub fn release(&self, address: PciAddress) -> bool {
        self.pending.lock().remove(&address).is_some()
    }

    /// Whether `address` is pending.
    pub fn is_pending(&self, address: PciAddress) -> bool {
        self.pending.lock().contains_key(&address)
    }

    /// The entry for `address`, if pending.
    pub fn get(&self, address: PciAddress) -> Option<Pending> {
        self.pending.lock().get(&address).cloned()
    }

    /// All pending entries, in address order.
    pub fn pending(&self) -> Vec<Pending> {
        self.pending.lock().values().cloned().collect()
    }

    /// Whether no removal is pending.
    pub fn is_empty(&self) -> bool {
        self.pending.lock().is_empty()
    }

    /// Drops the entries of devices that no longer exist (`exists` returns false): their
    /// removal completed. Returns the addresses dropped. Scans call this with the device
    /// list they just read.
    pub fn prune(&self, mut exists: impl FnMut(PciAddress) -> bool) -> Vec<PciAddress> {
        let mut pending = self.pending.lock();
        let gone: Vec<PciAddress> = pending.keys().copied().filter(|a| !exists(*a)).collect();
        for a in &gone {
            pending.remove(a);
        }
        gone
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> PciAddress {
        s.parse().unwrap()
    }

    #[test]
    fn first_reason_is_kept() {
        let r = RemovalRegistry::new();
        assert!(r.mark(a("01:00.0"), Reason::TimedOut { attribute: "uevent" }));
        assert!(!r.mark(a("01:00.0"), Reason::RemovalRequested));
        assert_eq!(
            r.get(a("01:00.0")).unwrap().reason,
            Reason::TimedOut { attribute: "uevent" }
        );
    }

    #[test]
    fn prune_drops_devices_that_are_gone() {
        let r = RemovalRegistry::new();
        r.mark(a("01:00.0"), Reason::Uevent);
        r.mark(a("02:00.0"), Reason::Uevent);
        let gone = r.prune(|x| x == a("02:00.0"));
        assert_eq!(gone, vec![a("01:00.0")]);
        assert_eq!(
            r.pending().iter().map(|p| p.address).collect::<Vec<_>>(),
            vec![a("02:00.0")]
        );
        assert!(r.release(a("02:00.0")));
        assert!(r.is_empty());
    }
}
