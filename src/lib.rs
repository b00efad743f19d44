// The crate's root docs are the README (so its examples are doctests and appear on
// docs.rs), then the map of the modules.
//
// The README links items as [`Scanner`] with reference definitions at its end that point
// at docs.rs, so that the links work on GitHub too. The definitions here come first, and
// CommonMark uses the first definition of a label: rustdoc resolves these as intra-doc
// links (to this very version, checked by `-D rustdoc::broken-intra-doc-links`), and the
// README's own definitions only serve GitHub.
//! [`Scanner`]: crate::Scanner
//! [`DeviceRecord`]: crate::DeviceRecord
//! [`PciAddress`]: crate::PciAddress
//! [`names`]: crate::names
//! [`bus`]: crate::bus
//! [`bus::Bus`]: crate::bus::Bus
//! [`bus::Driver`]: crate::bus::Driver
//! [`bus::DeviceBacking`]: crate::bus::DeviceBacking
//! [`nvme`]: crate::nvme
//! [`nvme::Controller`]: crate::nvme::Controller
//! [`vfio`]: crate::vfio
//! [`vfio::VfioDevice`]: crate::vfio::VfioDevice
//! [`hotplug`]: crate::hotplug
//! [`fixture`]: crate::fixture
//! [`pcibus::drivers::edu`]: crate::drivers::edu
//! [`examples/edu.rs`]: https://docs.rs/crate/pcibus/latest/source/examples/edu.rs
#![cfg_attr(
    feature = "testing",
    doc = "[`testing::FakeSysfs`]: crate::testing::FakeSysfs"
)]
#![doc = include_str!("../README.md")]
//!
//! ## The crate, module by module
//!
//! pcibus enumerates PCI devices from sysfs without ever blocking on a device whose removal is
//! pending: the scanner reads only attributes whose kernel `show()` takes no device lock;
//! the attributes that can block (`sriov_numvfs`, `sriov_vf_total_msix`, `driver_override`,
//! `uevent`, and `config` during a reset) are read only on request, through a
//! [`BlockingPool`] with a deadline; and a [`RemovalRegistry`] records devices whose removal
//! is pending so that scans keep away from them.
//!
//! The layers, module by module:
//!
//! - [`PciAddress`] names a function; [`config`] and [`sysfs::parse`] are the pure parsers;
//! - [`sysfs`] reads sysfs: [`sysfs::scan`] walks `bus/pci/devices` into
//!   [`DeviceRecord`]s (the scan's record of a function, see [`record`]),
//!   [`sysfs::details`] adds what `pcibus show` prints, [`sysfs::bind`] moves a device to
//!   vfio-pci, [`sysfs::snapshot`] captures a tree;
//! - [`removal`] keeps scans away from devices being removed: [`removal::pool`] runs the
//!   reads that may block, [`removal::registry`] records pending removals,
//!   [`removal::held`] the devices this process holds open, [`removal::claim`] one owner
//!   per device across processes (which scans consult, so it sits below them);
//! - [`bus`] decides which devices a driver gets: [`bus::id`] id tables with class masks,
//!   [`bus::devargs`] DPDK's allow and block lists, [`bus::Bus`] the probe loop that hands devices to [`bus::Driver`]s
//!   through [`bus::DeviceBacking`] and takes them back;
//! - [`drivers`] holds drivers for devices other than NVMe, written on the public driver
//!   API alone: [`drivers::edu`] (QEMU's `edu`) is the worked example of a driver; the
//!   NVMe driver is [`nvme`] ([`nvme::driver::NvmeDriver`]);
//! - [`hotplug`] receives the kernel's uevents ([`hotplug::event`] parses them,
//!   [`hotplug::monitor`] is the pollable netlink socket);
//! - [`vfio`] opens a device, maps its BARs and DMA memory and routes its interrupts (its
//!   `sys`, `mmio`, `dma` and `fault` modules hold all of the crate's `unsafe`; `fault` is
//!   the opt-in SIGBUS handler that turns a surprise-removed BAR into all-ones);
//! - [`barrier`] orders CPU accesses for a device (doorbells, completions), per
//!   architecture (its `asm!` barriers are `unsafe` too);
//! - [`fixture`] is the text format of sysfs trees, and (feature `testing`)
//!   `testing::FakeSysfs` builds them on disk for tests;
//! - (feature `serde`, on with `cli`) `json`: `serde::Serialize` on the records, the JSON
//!   that `pcibus ... --json` prints, and the rules of its schema.
#![cfg_attr(docsrs, feature(doc_cfg))]
#![deny(unsafe_code)]
#![deny(clippy::undocumented_unsafe_blocks, clippy::missing_safety_doc)]
#![warn(missing_docs)]

mod addr;
pub mod barrier;
pub mod bus;
pub mod capability;
pub mod config;
pub mod drivers;
pub mod error;
pub mod fixture;
pub mod hotplug;
#[cfg(feature = "serde")]
#[cfg_attr(docsrs, doc(cfg(feature = "serde")))]
pub mod json;
pub mod model;
pub mod modules_alias;
pub mod names;
pub mod nvme;
pub mod record;
pub mod removal;
pub mod select;
pub mod sysfs;
#[cfg(feature = "testing")]
#[cfg_attr(docsrs, doc(cfg(feature = "testing")))]
pub mod testing;
pub mod vfio;

pub use addr::{AddressError, PciAddress};
pub use error::{ParseError, ParseErrorKind};
pub use model::{
    Bar, BarKind, ClassCode, DeviceId, Link, LinkSpeed, Resource, ResourceSlot, Sriov, VendorId,
};
pub use record::{DeviceRecord, Problem, ProblemKind};
pub use removal::pool::{BlockingPool, PoolError, PoolLimits};
pub use removal::registry::RemovalRegistry;
pub use sysfs::scan::{BlockingAttr, IdSource, Scan, ScanError, Scanner, SysfsRoot};
