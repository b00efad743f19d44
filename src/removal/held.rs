//! The devices this process holds open through vfio.
//!
//! A process that holds a device's vfio fd must never read that device's blocking
//! attributes: if the kernel starts removing the device, it takes the device lock and waits
//! for the fd to be closed, the read waits for the lock, and the fd is closed only when the
//! process exits, which it cannot do while a thread is stuck in the read. So the vfio layer
//! registers every device it opens here ([`HeldOpen`], dropped with the device), and scans
//! in this process never read the blocking attributes of a held device (what a caller
//! needs from them is in config space, which vfio gives without the device lock).

use std::collections::BTreeMap;
use std::sync::OnceLock;

use parking_lot::Mutex;

use crate::PciAddress;

fn table() -> &'static Mutex<BTreeMap<PciAddress, usize>> {
    static HELD: OnceLock<Mutex<BTreeMap<PciAddress, usize>>> = OnceLock::new();
    HELD.get_or_init(Default::default)
}

/// While alive, `address` counts as held open by this process. Several may exist for one
/// address (a device opened twice); the address is held until the last goes.
#[derive(Debug)]
#[must_use = "the device counts as held only while this value lives"]
pub struct HeldOpen {
    address: PciAddress,
}

impl HeldOpen {
    /// Marks `address` as held open by this process.
    pub fn new(address: PciAddress) -> HeldOpen {
        *table().lock().entry(address).or_insert(0) += 1;
        HeldOpen { address }
    }

    /// The device held.
    pub fn address(&self) -> PciAddress {
        self.address
    }
}

impl Drop for HeldOpen {
    fn drop(&mut self) {
        let mut held = table().lock();
        if let Some(n) = held.get_mut(&self.address) {
            *n -= 1;
            if *n == 0 {
                held.remove(&self.address);
            }
        }
    }
}

/// Whether this process holds `address` open through vfio.
pub fn is_held(address: PciAddress) -> bool {
    table().lock().contains_key(&address)
}

/// Every device this process holds open, in address order.
pub fn held() -> Vec<PciAddress> {
    table().lock().keys().copied().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_until_the_last_holder_goes() {
        // An address no other test uses: the table is process-wide.
        let a: PciAddress = "7777:00:00.0".parse().unwrap();
        assert!(!is_held(a));
        let h1 = HeldOpen::new(a);
        let h2 = HeldOpen::new(a);
        assert!(is_held(a) && held().contains(&a));
        drop(h1);
        assert!(is_held(a));
        drop(h2);
        assert!(!is_held(a));
    }
}
