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
mod attr;
pub mod bind;
pub mod config;
pub mod details;
pub mod device;
pub mod error;
pub mod fixture;
pub mod guard;
pub mod model;
pub mod names;
pub mod registry;
pub mod scan;
pub mod snapshot;
pub mod sysfs;
#[cfg(feature = "testing")]
pub mod testing;
pub mod vfio;

pub use addr::{AddressError, PciAddress};
pub use device::{Device, Problem, ProblemKind};
pub use error::{ParseError, ParseErrorKind};
pub use guard::{Guard, GuardError, GuardLimits};
pub use model::{
    Bar, BarKind, ClassCode, DeviceId, Link, LinkSpeed, Resource, ResourceSlot, Sriov, VendorId,
};
pub use registry::RemovalRegistry;
pub use scan::{BlockingAttr, IdSource, Scan, ScanError, Scanner, SysfsRoot};

// The README's example is compiled as a doctest.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
