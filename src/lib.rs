//! pcibus: the PCI bus layer for Linux userspace drivers.
//!
//! It enumerates PCI devices from sysfs without ever blocking on a device whose removal is
//! pending: the scanner reads only attributes whose kernel `show()` takes no lock; the
//! attributes that can block (`sriov_numvfs`, `sriov_vf_total_msix`, `driver_override`,
//! `uevent`, and `config` during a reset) are read only on request, through a guard with a
//! deadline; and a [`RemovalRegistry`] records devices whose removal is pending so that scans
//! keep away from them.
//!
//! The data flow, module by module: a [`PciAddress`] names a function; [`scan`] walks
//! `bus/pci/devices`, reading attributes with the parsers of [`sysfs::parse`] and
//! [`config`] into [`Device`] records, with [`guard`] for the reads that may block and
//! [`registry`] for the devices being removed; [`bind`] moves a device to vfio-pci; [`vfio`]
//! opens it, maps its BARs and DMA memory and routes its interrupts (its `sys`, `mmio` and
//! `dma` modules hold all of the crate's `unsafe`). [`fixture`], [`snapshot`] and (feature
//! `testing`) `testing::FakeSysfs` make sysfs trees for tests.
#![deny(unsafe_code)]
#![deny(clippy::undocumented_unsafe_blocks, clippy::missing_safety_doc)]
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
