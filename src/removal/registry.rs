//! The removal registry: devices whose removal is pending.
//!
//! While the kernel removes a device bound to vfio-pci, it holds the device lock and waits
//! for userspace to close the device. Until then, reading an attribute whose `show()` takes
//! that lock blocks. The registry is where a process writes down what it knows about such
//! devices: a vfio removal request, a `remove` uevent, or a guarded read that is stuck in
//! the kernel. Scans consult it and keep away from the blocking attributes of every device
//! in it.
//!
//! An entry is keyed by address and, where known, by the device's [`DeviceIdentity`] (its
//! sysfs directory's inode, which the kernel allocates anew when a device is re-added), so
//! a device that is hot-replaced at the same address does not inherit "pending". Entries
//! go away:
//!
//! - when the process releases the device ([`RemovalRegistry::release`]);
//! - for a stuck read's entry, when that read returns ([`RemovalRegistry::read_returned`]):
//!   the kernel released the lock;
//! - when a scan finds the device gone, or present with another identity
//!   ([`RemovalRegistry::prune`]).
//!
//! A pending VF also makes its PF's lock-taking attributes off limits (its removal may be
//! running under the PF's device lock: `echo 0 > PF/sriov_numvfs`). The kernel removes a
//! VF's `physfn` link before it removes the VF, so the registry keeps which PF each VF
//! has, as scans, opens and claims learn it ([`RemovalRegistry::note_physfn`]), and
//! [`RemovalRegistry::pending_vf_of`] answers from that.
//!
//! Every change bumps a [generation](RemovalRegistry::generation), which interested parties
//! (the bus) poll cheaply or wait on ([`RemovalRegistry::wait_for_change`]).
//!
//! ```
//! use pcibus::{PciAddress, RemovalRegistry, removal::registry::Reason};
//! let registry = RemovalRegistry::new();
//! let nvme: PciAddress = "0000:01:00.0".parse().unwrap();
//! let seen = registry.generation();
//! registry.mark(nvme, Reason::RemovalRequested);
//! assert!(registry.is_pending(nvme));
//! assert!(registry.generation() > seen);
//! registry.release(nvme); // the driver closed the device
//! assert!(!registry.is_pending(nvme));
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::os::fd::AsFd;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::PciAddress;

/// Why a device is in the registry.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Reason {
    /// vfio signalled the device's removal request (REQ) eventfd.
    RemovalRequested,
    /// A `remove` uevent arrived for the device.
    Uevent,
    /// A guarded read of this attribute started and is stuck in the kernel (it did not
    /// return by its deadline). The entry goes when the read returns.
    StuckRead {
        /// The attribute whose read is stuck.
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
            Reason::StuckRead { attribute } => write!(f, "read of {attribute} stuck in the kernel"),
            Reason::Other(s) => f.write_str(s),
        }
    }
}

/// Which incarnation of a device a registry entry is about: the device and inode numbers
/// of its sysfs directory. The kernel gives a re-added device a new directory (kernfs
/// allocates inode numbers cyclically), so a hot-replaced device has another identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceIdentity {
    dev: u64,
    ino: u64,
}

impl DeviceIdentity {
    /// The identity of the device whose directory is `dir` (symlinks followed).
    pub fn of(dir: &Path) -> io::Result<DeviceIdentity> {
        let st = nix::sys::stat::stat(dir)?;
        Ok(DeviceIdentity {
            dev: st.st_dev,
            ino: st.st_ino,
        })
    }

    /// The identity of an open device directory.
    pub fn of_fd(dir: impl AsFd) -> io::Result<DeviceIdentity> {
        let st = nix::sys::stat::fstat(dir)?;
        Ok(DeviceIdentity {
            dev: st.st_dev,
            ino: st.st_ino,
        })
    }
}

/// Names one stuck read's mark, so that its return clears exactly that mark.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct StuckId(u64);

/// One pending device.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Pending {
    /// The device.
    pub address: PciAddress,
    /// The incarnation marked, when the marker knew it.
    pub identity: Option<DeviceIdentity>,
    /// Why it was marked: the first reason still standing.
    pub reason: Reason,
    /// Every reason standing, oldest first.
    pub reasons: Vec<Reason>,
    /// When it was first marked.
    pub since: Instant,
}

#[derive(Debug)]
struct Entry {
    identity: Option<DeviceIdentity>,
    // (reason, the stuck read that set it)
    reasons: Vec<(Reason, Option<StuckId>)>,
    since: Instant,
}

impl Entry {
    fn pending(&self, address: PciAddress) -> Pending {
        let reasons: Vec<Reason> = self.reasons.iter().map(|(r, _)| r.clone()).collect();
        Pending {
            address,
            identity: self.identity,
            reason: reasons[0].clone(),
            reasons,
            since: self.since,
        }
    }
}

/// Devices whose removal is pending. Cheap to share: wrap it in an `Arc`.
#[derive(Debug, Default)]
pub struct RemovalRegistry {
    pending: Mutex<BTreeMap<PciAddress, Entry>>,
    // VF -> PF, as learned; never taken while `pending` is held.
    physfns: Mutex<BTreeMap<PciAddress, PciAddress>>,
    generation: AtomicU64,
    next_stuck: AtomicU64,
    changed: Condvar,
}

impl RemovalRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    // Call with the lock held, after a change.
    fn bump(&self) {
        self.generation.fetch_add(1, Ordering::Release);
        self.changed.notify_all();
    }

    fn insert(
        &self,
        address: PciAddress,
        identity: Option<DeviceIdentity>,
        reason: Reason,
        stuck: Option<StuckId>,
    ) -> bool {
        let mut pending = self.pending.lock();
        // A mark for another incarnation replaces the old entry: that device is gone.
        if let Some(e) = pending.get(&address)
            && let (Some(old), Some(new)) = (e.identity, identity)
            && old != new
        {
            pending.remove(&address);
        }
        let new = match pending.get_mut(&address) {
            Some(e) => {
                if e.identity.is_none() {
                    e.identity = identity;
                }
                if stuck.is_none() && e.reasons.iter().any(|(r, _)| *r == reason) {
                    return false;
                }
                e.reasons.push((reason, stuck));
                false
            }
            None => {
                log::warn!("{address}: removal pending ({reason}); its blocking attributes will not be read");
                pending.insert(
                    address,
                    Entry {
                        identity,
                        reasons: vec![(reason, stuck)],
                        since: Instant::now(),
                    },
                );
                true
            }
        };
        self.bump();
        new
    }

    /// Records that `address` is being removed, not knowing which incarnation. Returns
    /// `true` if it was not pending before.
    pub fn mark(&self, address: PciAddress, reason: Reason) -> bool {
        self.insert(address, None, reason, None)
    }

    /// Records that the incarnation `identity` of `address` is being removed. Returns
    /// `true` if it was not pending before.
    pub fn mark_device(&self, address: PciAddress, identity: DeviceIdentity, reason: Reason) -> bool {
        self.insert(address, Some(identity), reason, None)
    }

    /// Records that a read of `attribute` of `address` started and is stuck in the kernel.
    /// Call [`read_returned`](Self::read_returned) with the id when the read returns.
    pub fn mark_stuck(
        &self,
        address: PciAddress,
        identity: Option<DeviceIdentity>,
        attribute: &'static str,
    ) -> StuckId {
        let id = StuckId(self.next_stuck.fetch_add(1, Ordering::Relaxed));
        self.insert(address, identity, Reason::StuckRead { attribute }, Some(id));
        id
    }

    /// A stuck read returned: the kernel released the device lock, so its mark goes (and
    /// the entry with it, unless another reason stands). Returns whether the entry went.
    pub fn read_returned(&self, id: StuckId) -> bool {
        let mut pending = self.pending.lock();
        let Some((&address, entry)) = pending
            .iter_mut()
            .find(|(_, e)| e.reasons.iter().any(|(_, s)| *s == Some(id)))
        else {
            return false;
        };
        entry.reasons.retain(|(_, s)| *s != Some(id));
        let gone = entry.reasons.is_empty();
        if gone {
            pending.remove(&address);
            log::info!("{address}: the stuck read returned; removal no longer pending");
        }
        self.bump();
        gone
    }

    /// Records that the caller released the device (closed its vfio fd): the removal can
    /// complete and the entry goes. Returns whether it was pending.
    pub fn release(&self, address: PciAddress) -> bool {
        let mut pending = self.pending.lock();
        let was = pending.remove(&address).is_some();
        if was {
            self.bump();
        }
        was
    }

    /// Whether `address` is pending.
    pub fn is_pending(&self, address: PciAddress) -> bool {
        self.pending.lock().contains_key(&address)
    }

    /// Whether the incarnation `identity` of `address` is pending: an entry for another
    /// incarnation does not count (an entry whose identity is unknown does).
    pub fn is_pending_device(&self, address: PciAddress, identity: Option<DeviceIdentity>) -> bool {
        match self.pending.lock().get(&address) {
            None => false,
            Some(e) => match (e.identity, identity) {
                (Some(old), Some(new)) => old == new,
                _ => true,
            },
        }
    }

    /// The entry for `address`, if pending.
    pub fn get(&self, address: PciAddress) -> Option<Pending> {
        self.pending.lock().get(&address).map(|e| e.pending(address))
    }

    /// All pending entries, in address order.
    pub fn pending(&self) -> Vec<Pending> {
        self.pending.lock().iter().map(|(a, e)| e.pending(*a)).collect()
    }

    /// Records that `vf` is a VF of `pf` (from its `physfn` link, or a claim record that
    /// named it). A VF's routing id is fixed by its PF's SR-IOV capability, so the relation
    /// outlives the VF and is kept; a later note for the same address replaces it.
    pub fn note_physfn(&self, vf: PciAddress, pf: PciAddress) {
        self.physfns.lock().insert(vf, pf);
    }

    /// The PF noted for `vf`.
    pub fn physfn_of(&self, vf: PciAddress) -> Option<PciAddress> {
        self.physfns.lock().get(&vf).copied()
    }

    /// A pending VF of `pf`, if any: while it is pending, the removal may be holding
    /// `pf`'s device lock, so `pf`'s lock-taking attributes must not be read.
    pub fn pending_vf_of(&self, pf: PciAddress) -> Option<Pending> {
        let pending = self.pending();
        if pending.is_empty() {
            return None;
        }
        let physfns = self.physfns.lock();
        pending.into_iter().find(|p| physfns.get(&p.address) == Some(&pf))
    }

    /// Whether no removal is pending.
    pub fn is_empty(&self) -> bool {
        self.pending.lock().is_empty()
    }

    /// Drops the entries of devices whose removal completed: `identify` returns `None` for
    /// a device that no longer exists, else its current identity (`Some(None)` when it
    /// could not be learned). An entry goes when its device is gone or is another
    /// incarnation than the one marked. Returns the addresses dropped. Scans call this with
    /// the device list they just read; `identify` is called only for pending addresses.
    pub fn prune(
        &self,
        mut identify: impl FnMut(PciAddress) -> Option<Option<DeviceIdentity>>,
    ) -> Vec<PciAddress> {
        let mut pending = self.pending.lock();
        let gone: Vec<PciAddress> = pending
            .iter()
            .filter(|(a, e)| match identify(**a) {
                None => true,
                Some(now) => matches!((e.identity, now), (Some(old), Some(now)) if old != now),
            })
            .map(|(a, _)| *a)
            .collect();
        for a in &gone {
            pending.remove(a);
        }
        if !gone.is_empty() {
            self.bump();
        }
        gone
    }

    /// A counter bumped by every change: compare it with an earlier reading to learn
    /// cheaply whether anything changed.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Waits until the generation differs from `seen` or `timeout` passes; returns the
    /// generation then.
    pub fn wait_for_change(&self, seen: u64, timeout: Duration) -> u64 {
        let deadline = Instant::now() + timeout;
        let mut pending = self.pending.lock();
        while self.generation() == seen {
            if self.changed.wait_until(&mut pending, deadline).timed_out() {
                break;
            }
        }
        self.generation()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn a(s: &str) -> PciAddress {
        s.parse().unwrap()
    }

    fn id(ino: u64) -> DeviceIdentity {
        DeviceIdentity { dev: 1, ino }
    }

    #[test]
    fn first_reason_is_kept_and_all_are_listed() {
        let r = RemovalRegistry::new();
        assert!(r.mark(a("01:00.0"), Reason::Uevent));
        assert!(!r.mark(a("01:00.0"), Reason::RemovalRequested));
        let p = r.get(a("01:00.0")).unwrap();
        assert_eq!(p.reason, Reason::Uevent);
        assert_eq!(p.reasons, vec![Reason::Uevent, Reason::RemovalRequested]);
    }

    #[test]
    fn prune_drops_devices_that_are_gone() {
        let r = RemovalRegistry::new();
        r.mark(a("01:00.0"), Reason::Uevent);
        r.mark(a("02:00.0"), Reason::Uevent);
        let gone = r.prune(|x| (x == a("02:00.0")).then_some(None));
        assert_eq!(gone, vec![a("01:00.0")]);
        assert_eq!(
            r.pending().iter().map(|p| p.address).collect::<Vec<_>>(),
            vec![a("02:00.0")]
        );
        assert!(r.release(a("02:00.0")));
        assert!(r.is_empty());
    }

    #[test]
    fn a_hot_replaced_device_does_not_inherit_pending() {
        let r = RemovalRegistry::new();
        r.mark_device(a("01:00.0"), id(7), Reason::RemovalRequested);
        assert!(r.is_pending_device(a("01:00.0"), Some(id(7))));
        assert!(
            !r.is_pending_device(a("01:00.0"), Some(id(8))),
            "another incarnation"
        );
        // Same incarnation still there: kept.
        assert!(r.prune(|_| Some(Some(id(7)))).is_empty());
        // Re-added with a new directory: dropped.
        assert_eq!(r.prune(|_| Some(Some(id(8)))), vec![a("01:00.0")]);
        assert!(r.is_empty());
        // A mark for a new incarnation replaces the old entry and its reasons.
        r.mark_device(a("01:00.0"), id(7), Reason::Uevent);
        r.mark_device(a("01:00.0"), id(9), Reason::RemovalRequested);
        let p = r.get(a("01:00.0")).unwrap();
        assert_eq!(
            (p.identity, p.reasons),
            (Some(id(9)), vec![Reason::RemovalRequested])
        );
    }

    #[test]
    fn a_stuck_reads_mark_goes_when_the_read_returns() {
        let r = RemovalRegistry::new();
        let s1 = r.mark_stuck(a("01:00.0"), None, "sriov_numvfs");
        let s2 = r.mark_stuck(a("01:00.0"), None, "uevent");
        assert!(!r.read_returned(s1), "the other stuck read still stands");
        assert!(r.is_pending(a("01:00.0")));
        assert!(r.read_returned(s2));
        assert!(r.is_empty());
        assert!(!r.read_returned(s2), "twice is harmless");
        // A REQ outlives a stuck read's return.
        let s3 = r.mark_stuck(a("01:00.0"), None, "sriov_numvfs");
        r.mark(a("01:00.0"), Reason::RemovalRequested);
        assert!(!r.read_returned(s3));
        assert_eq!(
            r.get(a("01:00.0")).unwrap().reasons,
            vec![Reason::RemovalRequested]
        );
    }

    #[test]
    fn a_pending_vf_makes_its_pf_pending_for_lock_taking_reads() {
        let r = RemovalRegistry::new();
        let (pf, vf, other) = (a("01:00.0"), a("01:00.1"), a("02:00.1"));
        r.note_physfn(vf, pf);
        r.note_physfn(other, a("02:00.0"));
        assert!(r.pending_vf_of(pf).is_none());
        r.mark(vf, Reason::RemovalRequested);
        assert_eq!(r.pending_vf_of(pf).map(|p| p.address), Some(vf));
        assert!(!r.is_pending(pf), "the PF itself is not being removed");
        assert!(r.pending_vf_of(a("02:00.0")).is_none());
        // The relation outlives the VF's entry, for the next time it is marked.
        r.release(vf);
        assert!(r.pending_vf_of(pf).is_none());
        assert_eq!(r.physfn_of(vf), Some(pf));
    }

    #[test]
    fn changes_bump_the_generation_and_wake_waiters() {
        let r = Arc::new(RemovalRegistry::new());
        let g0 = r.generation();
        assert_eq!(
            r.wait_for_change(g0, Duration::from_millis(10)),
            g0,
            "nothing changed"
        );
        let r2 = Arc::clone(&r);
        let waiter = std::thread::spawn(move || r2.wait_for_change(g0, Duration::from_secs(10)));
        std::thread::sleep(Duration::from_millis(20));
        r.mark(a("01:00.0"), Reason::Uevent);
        assert!(waiter.join().unwrap() > g0);
        let g1 = r.generation();
        assert!(!r.release(a("02:00.0")));
        assert_eq!(r.generation(), g1, "a no-op is no change");
        r.release(a("01:00.0"));
        assert!(r.generation() > g1);
    }
}
