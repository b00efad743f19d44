//! The bus: which devices a driver gets, on what terms, and how it gives them back.
//!
//! [`Bus`] (in [`probe`]) holds the registered [`Driver`]s and the devices they drive: it
//! offers devices to drivers in address order, claims and opens each ([`attach`]), and
//! takes devices back through one path on a removal request, a uevent, a BAR fault or an
//! orderly detach. Drivers see devices through [`backing::DeviceBacking`], so the same
//! driver runs on VFIO and on an emulation.
//!
//! [`id`] matches scan records against drivers' id tables; [`devargs`] parses DPDK-style
//! allow and block lists with per-device arguments; [`claim`] makes one process the owner
//! of a device, visibly to every other process; [`map`] keeps the scan's records current
//! from uevents, one device per event.

pub mod attach;
pub mod backing;
pub mod bar;
/// Claims moved below the scanner, to [`crate::removal::claim`]; this path stays for users.
pub use crate::removal::claim;
pub mod devargs;
pub mod dma;
pub mod driver;
pub mod errors;
pub mod fault;
pub mod id;
pub mod interrupt;
pub mod map;
pub mod probe;
mod reset;
pub mod sriov;

pub use crate::vfio::reset::{
    HotResetBlocker, HotResetDevice, HotResetInfo, HotResetOwner, OtherProcess, ResetInfo, ResetMethod,
};
pub use attach::{Attach, AttachError, Attached, BindPolicy, Release, VfioAttach};
pub use backing::{BackingError, DeviceBacking, DmaMemory, MapDmaError, RegisterIo, VfioBacking};
pub use bar::{BarInfo, BarKind, DeviceRegion};
pub use dma::{DmaBlock, DmaConstraints, DmaPool, DmaPoolOptions};
pub use driver::{Driver, DriverError, DriverPanicked, ProbeDevice, ProbeOutcome, Removal, RemovalCause};
pub use errors::{ErrorAction, ErrorEvent, ErrorReport};
pub use fault::{BarFault, FaultReason};
pub use interrupt::{Interrupt, InterruptError, InterruptKind};
pub use probe::{
    Bus, BusError, BusEvent, FaultReport, ProbeError, ProbeReport, ReleasedReport, RemovedReport,
};
pub use sriov::{SetVfs, SetVfsError, SysfsVfs, VfControl, VfError};
