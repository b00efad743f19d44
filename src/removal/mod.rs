//! Removal safety: the pool that runs reads which may block in the kernel, the registry of
//! devices whose removal is pending, the devices this process holds ([`held`]), and the
//! claims that tell every process who owns a device and whether it is releasing it
//! ([`claim`]). Scans consult all four, so this layer sits below the scanner and the bus.
//!
//! A read of an attribute whose `show()` takes the device lock blocks for as long as a
//! removal of that device is pending. [`pool::BlockingPool`] runs such reads on helper
//! threads and waits for them only until a deadline; [`registry::RemovalRegistry`] records
//! the devices whose removal is pending, so that scans keep away from them.
//!
//! # Which lock each attribute takes, and who holds it
//!
//! The rules below are derived from this table (kernel sources of 6.1 and 6.12; the
//! blocking column measured in the VM suite, see `tests/vm/README.md`):
//!
//! | attribute | `show()` waits for | blocks on |
//! |---|---|---|
//! | `sriov_numvfs`, `sriov_vf_total_msix` | the device lock of **this** function | 6.1, 6.12 |
//! | `driver_override` | the device lock (6.1; 6.12 takes a spinlock only) | 6.1 |
//! | `uevent` | the device lock (6.1's `uevent_show`; 6.12 does not take it) | 6.1 |
//! | `config` | `pci_cfg_access_lock`, held during a reset or an SR-IOV enable/disable | bounded (a reset: ~0.2 s) |
//! | everything the fast path reads | nothing | never |
//!
//! | operation | holds the device lock of | for how long |
//! |---|---|---|
//! | device removal (`remove`, hot-unplug, driver unbind) of a device on vfio | the device | until its vfio holder closes it |
//! | `echo N > PF/sriov_numvfs` (enable or disable) | **the PF** | while each VF is removed: until every VF's vfio holder closes it |
//! | PF removal | the PF; a PF driver that disables SR-IOV on remove (vfio-pci does) removes each VF under it | as the two rows above |
//! | `reset` (sysfs), driver bind | the device | bounded, unless a holder must let go first |
//!
//! So a read of a lock-taking attribute of device D may wait for **this** process when
//! this process holds D open, or holds a VF of D; and it may wait indefinitely when D's
//! removal is pending, or when the removal of a VF of D is pending. Scans therefore skip
//! the lock-taking attributes of:
//!
//! - a device whose removal is pending ([`registry::RemovalRegistry::is_pending_device`]);
//! - a device this process holds open ([`held::is_held`]);
//! - the PF of a VF this process holds open ([`held::lock_held_by`], from the PF the hold
//!   named);
//! - the PF of a VF whose removal is pending ([`registry::RemovalRegistry::pending_vf_of`]):
//!   in this process (a REQ, a uevent) or in another (its claim says releasing and names
//!   the PF, [`claim::ClaimInfo::physfn`]).
//!
//! The kernel removes a VF's `physfn` link (and the PF's `virtfnN`) *before* it removes
//! the VF, so the VF→PF relation is learned beforehand: when the VF is opened, when a scan
//! lists it, and from claim records.

pub mod claim;
pub mod held;
pub mod pool;
pub mod registry;
mod spdk;
