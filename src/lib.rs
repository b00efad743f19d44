//! pcibus: the PCI bus layer for Linux userspace drivers.
//!
//! It enumerates PCI devices from sysfs without ever blocking on a device whose removal is
//! pending: the scanner reads only attributes whose kernel `show()` takes no lock; the
//! attributes that can block (`sriov_numvfs`, `sriov_vf_total_msix`, `driver_override`,
//! `uevent`, and `config` during a reset) are read only on request, through a guard with a
//! deadline; and a [`RemovalRegistry`] records devices whose removal is pending so that scans
//! keep away from them.
#![deny(unsafe_code)]
#![warn(missing_docs)]

mod addr;
pub mod error;
pub mod fixture;
pub mod model;
pub mod snapshot;
#[cfg(feature = "testing")]
pub mod testing;

pub use addr::{AddressError, PciAddress};
pub use error::{ParseError, ParseErrorKind};
pub use model::{
    Bar, BarKind, ClassCode, DeviceId, Link, LinkSpeed, Resource, ResourceSlot, Sriov, VendorId,
};
