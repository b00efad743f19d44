//! The devices this process holds open through vfio.
//!
//! A process that holds a device's vfio fd must never read that device's blocking
//! attributes: if the kernel starts removing the device, it takes the device lock and waits
//! for the fd to be closed, the read waits for the lock, and the fd is closed only when the
//! process exits, which it cannot do while a thread is stuck in the read. So the vfio layer
//! registers every device it opens here ([`HeldOpen`], dropped with the device), and scans
//! in this process never read the blocking attributes of a held device (what a caller
//! needs from them is in config space, which vfio gives without the device lock).
//!
//! A held VF also makes its **PF's** lock-taking attributes off limits: `echo 0 >
//! PF/sriov_numvfs` holds the PF's device lock while it removes each VF, and the VF's
//! removal waits for this process to close it (see [`crate::removal`] for the table). So
//! a hold records the PF of the device ([`HeldOpen::with_physfn`]), and
//! [`lock_held_by`] answers for both.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use parking_lot::Mutex;

use crate::PciAddress;

// Per held address: how many holds, and the PF each hold named (a VF's PF never changes
// while it is open, but a hold that could not learn it says `None`).
#[derive(Default)]
struct Holds {
    count: usize,
    physfns: Vec<PciAddress>,
}

fn table() -> &'static Mutex<BTreeMap<PciAddress, Holds>> {
    static HELD: OnceLock<Mutex<BTreeMap<PciAddress, Holds>>> = OnceLock::new();
    HELD.get_or_init(Default::default)
}

/// While alive, `address` counts as held open by this process. Several may exist for one
/// address (a device opened twice); the address is held until the last goes.
#[derive(Debug)]
#[must_use = "the device counts as held only while this value lives"]
pub struct HeldOpen {
    address: PciAddress,
    physfn: Option<PciAddress>,
}

impl HeldOpen {
    /// Marks `address` as held open by this process. For a VF, use
    /// [`with_physfn`](Self::with_physfn), so that its PF's lock-taking attributes are
    /// kept away from too.
    pub fn new(address: PciAddress) -> HeldOpen {
        Self::with_physfn(address, None)
    }

    /// Marks `address` as held open by this process, and, when it is a VF, its PF
    /// `physfn` as one whose device lock a removal of `address` may hold (the PF's
    /// `sriov_numvfs` store removes its VFs under the PF's lock).
    pub fn with_physfn(address: PciAddress, physfn: Option<PciAddress>) -> HeldOpen {
        let mut held = table().lock();
        let e = held.entry(address).or_default();
        e.count += 1;
        e.physfns.extend(physfn);
        HeldOpen { address, physfn }
    }

    /// The device held.
    pub fn address(&self) -> PciAddress {
        self.address
    }

    /// The PF named when the hold was made, if any.
    pub fn physfn(&self) -> Option<PciAddress> {
        self.physfn
    }
}

impl Drop for HeldOpen {
    fn drop(&mut self) {
        let mut held = table().lock();
        if let Some(e) = held.get_mut(&self.address) {
            e.count -= 1;
            if let Some(pf) = self.physfn
                && let Some(i) = e.physfns.iter().position(|p| *p == pf)
            {
                e.physfns.swap_remove(i);
            }
            if e.count == 0 {
                held.remove(&self.address);
            }
        }
    }
}

/// Whether this process holds `address` open through vfio.
pub fn is_held(address: PciAddress) -> bool {
    table().lock().contains_key(&address)
}

/// Whether a read of a lock-taking attribute of `address` could wait for this process:
/// the device this process holds whose removal would hold `address`'s device lock. That
/// is `address` itself when it is held, or a held VF whose PF is `address`.
pub fn lock_held_by(address: PciAddress) -> Option<PciAddress> {
    let held = table().lock();
    if held.contains_key(&address) {
        return Some(address);
    }
    held.iter()
        .find(|(_, e)| e.physfns.contains(&address))
        .map(|(vf, _)| *vf)
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

    #[test]
    fn a_held_vf_holds_its_pfs_lock_taking_attributes() {
        let pf: PciAddress = "7777:01:00.0".parse().unwrap();
        let vf: PciAddress = "7777:01:00.1".parse().unwrap();
        assert_eq!(lock_held_by(pf), None);
        let h = HeldOpen::with_physfn(vf, Some(pf));
        assert_eq!(lock_held_by(vf), Some(vf));
        assert_eq!(lock_held_by(pf), Some(vf), "the PF's lock is the VF's removal's");
        assert!(!is_held(pf), "the PF itself is not open");
        let plain = HeldOpen::new(vf);
        drop(h);
        assert_eq!(lock_held_by(pf), None, "the hold that named the PF is gone");
        assert_eq!(lock_held_by(vf), Some(vf));
        drop(plain);
        assert_eq!(lock_held_by(vf), None);
    }
}
