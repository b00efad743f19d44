//! The bus's driver list: what `rte_pci_register` adds (from each PMD's constructor) and
//! `rte_pci_unregister` removes. The drivers themselves belong to the PMDs; the list holds
//! their addresses in registration order, as DPDK's TAILQ does.

use std::sync::Mutex;

use crate::ffi::types::RtePciDriver;

/// A registered driver's address. Only compared and handed back to C, never dereferenced
/// here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DriverPtr(pub *mut RtePciDriver);

// SAFETY: the pointer is an address owned by a PMD for the life of the process (a static
// `struct rte_pci_driver`); this module never dereferences it, so moving it between threads
// is as safe as moving an integer.
unsafe impl Send for DriverPtr {}

static DRIVERS: Mutex<Vec<DriverPtr>> = Mutex::new(Vec::new());

/// Appends a driver (a second registration of the same driver is ignored).
pub fn register(driver: DriverPtr) {
    let mut list = DRIVERS.lock().unwrap_or_else(|e| e.into_inner());
    if !list.contains(&driver) {
        list.push(driver);
    }
}

/// Removes a driver; false when it was not registered.
pub fn unregister(driver: DriverPtr) -> bool {
    let mut list = DRIVERS.lock().unwrap_or_else(|e| e.into_inner());
    let before = list.len();
    list.retain(|d| *d != driver);
    list.len() != before
}

/// The registered drivers, in registration order.
pub fn snapshot() -> Vec<DriverPtr> {
    DRIVERS.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn register_keeps_order_ignores_duplicates_and_unregister_removes() {
        let a = DriverPtr(std::ptr::without_provenance_mut(8));
        let b = DriverPtr(std::ptr::without_provenance_mut(16));
        register(a);
        register(b);
        register(a);
        let list = snapshot();
        let pos = |d| list.iter().position(|x| *x == d).unwrap();
        assert!(pos(a) < pos(b));
        assert_eq!(list.iter().filter(|d| **d == a).count(), 1);
        assert!(unregister(a));
        assert!(!unregister(a));
        assert!(!snapshot().contains(&a));
        assert!(unregister(b));
    }
}
