//! VFIO: drive a PCI device from userspace, safely.
//!
//! A [`Container`] is an IOMMU address space; a [`VfioDevice`] is the device fd, through
//! which its regions (BARs, config space) are read, written and mapped ([`MappedBar`]),
//! and its interrupts routed to eventfds. [`DmaBuffer`]s are mapped into the container as
//! [`DmaRegion`]s, at IOVAs taken from the ranges the IOMMU reports, and unmapped when
//! dropped.
//!
//! # Two backends
//!
//! The kernel offers two ways in ([`VfioBackend`]), and a container is of one of them:
//!
//! - **group**: `/dev/vfio/vfio` is a type1v2 container, each device's IOMMU group
//!   (`/dev/vfio/N`, a [`Group`], opened once per container and shared by the devices of
//!   the group) is attached to it, and the device fd comes from the group. What DPDK and
//!   SPDK use; every VFIO kernel has it unless `CONFIG_VFIO_CONTAINER` is off.
//! - **iommufd** (Linux 6.6 on, `CONFIG_IOMMUFD` and `CONFIG_VFIO_DEVICE_CDEV`): the device
//!   is opened as `/dev/vfio/devices/vfioN` (named by its sysfs `vfio-dev/`), bound to
//!   `/dev/iommu` and attached to an I/O address space (IOAS) of it, where its DMA is
//!   mapped ([`iommufd`]).
//!
//! [`Container::new`] takes iommufd when the kernel has it, else the group backend;
//! [`Container::with_backend`] chooses. Once open, a device fd is the same whichever
//! backend opened it, so nothing above this module (the bus's backing, the NVMe driver)
//! knows or cares which one it runs on.
//!
//! Every handle owns what it needs: a [`MappedBar`] holds an `Arc` of its device, a device
//! holds its group and container, a [`DmaRegion`] holds its container, and a container
//! keeps every group it attached. So a driver can keep the device and its mappings
//! together in one struct, and nothing is closed while something mapped through it lives.
//!
//! ```no_run
//! use pcibus::{PciAddress, SysfsRoot, vfio::VfioDevice};
//! let addr: PciAddress = "0000:01:00.0".parse()?;
//! let dev = VfioDevice::open(&SysfsRoot::new("/sys"), addr)?;
//! let bar0 = dev.map_bar(0)?;
//! let cap = bar0.read64(0)?; // NVMe CAP
//! let queue = dev.container().alloc_dma(4096)?; // unmapped when dropped
//! queue.write_obj(0, &[0u32; 16]).unwrap(); // a 64-byte submission entry
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # The exit rule
//!
//! While this process holds a device open through vfio, the kernel cannot finish removing
//! or unbinding it: it signals the REQ eventfd ([`VfioDevice::request_eventfd`]) and waits,
//! **holding the device lock**, until the device fd is closed. Hence:
//!
//! - when REQ fires, stop using the device and drop every handle to it (the device, its
//!   [`MappedBar`]s) promptly; the removal completes in tens of milliseconds after that;
//! - never read the held device's blocking sysfs attributes (`sriov_numvfs`,
//!   `sriov_vf_total_msix`, `driver_override`, `uevent`): such a read waits for the device
//!   lock, which the removal holds until the fd is closed. The scanner skips them for
//!   devices held here (they are registered in [`crate::removal::held`]); what a driver
//!   needs from them comes from config space instead ([`VfioDevice::sriov_num_vfs`],
//!   [`VfioDevice::msix_table_size`]);
//! - process exit closes every fd, but only once every thread has ended: a thread stuck
//!   in such a read keeps the fd open, the removal waits for the fd, the read for the
//!   removal, and the process never exits.

pub(crate) mod bar;
mod caps;
mod constraints;
mod dma;
pub mod fault;
pub mod holders;
pub mod iommufd;
mod iova;
mod irqs;
pub(crate) mod mmio;
pub mod params;
pub mod reset;
mod revoke;
mod sys;

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use nix::sys::eventfd::{EfdFlags, EventFd};
use parking_lot::Mutex;

pub use bar::MappedBar;
pub use caps::parse_iova_ranges;
pub use caps::{InfoError, IommuInfo, RegionFlags, RegionInfo, parse_iommu_info, parse_region_info};
pub use constraints::DmaConstraints;
pub use dma::{CallerMemory, NotPageAligned, PageBuffer};
pub use dma::{
    DmaBuffer, DmaObj, DmaRegion, HUGE_PAGE, HugePageSize, IovaQuarantine, PAGE, Scalar, cpu_page_size,
    munmap_failures,
};
pub use iommufd::{CdevProblem, DevNumber, VfioBackend, VfioBackendParseError};
pub use iova::IovaAllocator;
pub use reset::{
    HotResetBlocker, HotResetDevice, HotResetInfo, HotResetOwner, OtherProcess, ResetInfo, ResetMethod,
};

use crate::addr::PciAddress;
use crate::config::{self, SriovCapability};
use crate::error::ParseError;
use crate::removal::held::HeldOpen;
use crate::removal::registry::{DeviceIdentity, Reason, RemovalRegistry};
use crate::sysfs::scan::SysfsRoot;

/// Region index of PCI config space.
pub const CONFIG_REGION: u32 = 7;
/// Region index of the expansion ROM.
pub const ROM_REGION: u32 = 6;

/// Offset of the Command register in config space.
pub const COMMAND: u64 = 0x04;
/// Command register: Memory Space Enable.
pub const COMMAND_MEMORY: u16 = 1 << 1;
/// Command register: Bus Master Enable.
pub const COMMAND_MASTER: u16 = 1 << 2;

/// Interrupt indexes of a vfio-pci device.
pub mod irq {
    /// Legacy INTx.
    pub const INTX: u32 = 0;
    /// MSI.
    pub const MSI: u32 = 1;
    /// MSI-X.
    pub const MSIX: u32 = 2;
    /// Error reporting (AER).
    pub const ERR: u32 = 3;
    /// Device request: the kernel wants the device back (removal, unbind).
    pub const REQ: u32 = 4;
    /// Names for printing.
    pub const NAMES: [&str; 5] = ["INTx", "MSI", "MSI-X", "ERR", "REQ"];

    bitflags::bitflags! {
        /// An interrupt index's flags (`vfio_irq_info.flags`, `VFIO_IRQ_INFO_*`). Bits
        /// this crate does not know are kept, and `Debug` prints them in hex.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
        pub struct InfoFlags: u32 {
            /// `VFIO_IRQ_INFO_EVENTFD`: vectors can signal an eventfd.
            const EVENTFD = 1 << 0;
            /// `VFIO_IRQ_INFO_MASKABLE`: vectors can be masked and unmasked (vfio-pci: INTx).
            const MASKABLE = 1 << 1;
            /// `VFIO_IRQ_INFO_AUTOMASKED`: masked after each interrupt (vfio-pci: INTx).
            const AUTOMASKED = 1 << 2;
            /// `VFIO_IRQ_INFO_NORESIZE`: vectors cannot be added while the index is enabled
            /// (vfio-pci: MSI always, MSI-X before Linux 6.5).
            const NORESIZE = 1 << 3;
        }
    }

    /// The name of `index`, or `?`.
    pub fn name(index: u32) -> &'static str {
        NAMES.get(index as usize).copied().unwrap_or("?")
    }
}

/// What went wrong in the vfio layer. Each variant keeps the values involved and the
/// kernel's `io::Error` (as `source`), never only a message.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VfioError {
    /// `/dev/vfio/vfio` could not be opened.
    #[error("cannot open /dev/vfio/vfio (is the vfio module loaded? modprobe vfio-pci)")]
    NoVfio(#[source] io::Error),
    /// The group backend was asked for, but the kernel has no container (`/dev/vfio/vfio`
    /// is missing while `/dev/iommu` exists: `CONFIG_VFIO_CONTAINER` is off).
    #[error(
        "the kernel has no VFIO group mode: /dev/vfio/vfio is missing while /dev/iommu exists (CONFIG_VFIO_CONTAINER is off); use the iommufd backend (--vfio-backend iommufd)"
    )]
    NoGroupMode(#[source] io::Error),
    /// The iommufd backend was asked for, but `/dev/iommu` could not be opened.
    #[error(
        "cannot open /dev/iommu: the kernel has no iommufd (CONFIG_IOMMUFD; Debian's packaged kernels lack it) or it is not loaded (modprobe iommufd); use the group backend (--vfio-backend group)"
    )]
    NoIommufd(#[source] io::Error),
    /// The device has no usable vfio cdev for the iommufd backend.
    #[error("{address} cannot be opened through iommufd: {problem}")]
    NoDeviceCdev {
        /// The device.
        address: PciAddress,
        /// What is missing.
        problem: CdevProblem,
        /// The open's error, for [`CdevProblem::Open`].
        #[source]
        source: Option<io::Error>,
    },
    /// The cdev opened for the device is another device's: its `st_rdev` is not what the
    /// device's `vfio-dev/vfioN/dev` says. The device was unbound, and its vfioN number
    /// given to another device, between the lookup and the open; the fd was closed again.
    #[error(
        "{} is not the cdev of {address}: it is device {opened}, while {address}'s vfio-dev entry says {expected} (its number was recycled by an unbind and a bind meanwhile; open it again)",
        path.display()
    )]
    CdevMismatch {
        /// The device.
        address: PciAddress,
        /// The cdev opened.
        path: PathBuf,
        /// The numbers the device's `vfio-dev/vfioN/dev` gives.
        expected: DevNumber,
        /// The numbers of the node opened (`st_rdev`).
        opened: DevNumber,
    },
    /// iommufd refused to bind the device because its IOMMU group is used elsewhere: open
    /// through the group backend (EBUSY), or bound to another iommufd (EPERM), in this
    /// process (another container) or another.
    #[error(
        "{address} cannot be bound to this iommufd: its IOMMU group{} is in use elsewhere (open as /dev/vfio/N, or bound to another iommufd, by this process or another)",
        group.map(|g| format!(" {g}")).unwrap_or_default()
    )]
    GroupBusy {
        /// The device.
        address: PciAddress,
        /// Its IOMMU group, when the link could be read.
        group: Option<u32>,
        /// The kernel's error.
        #[source]
        source: io::Error,
    },
    /// iommufd refused to bind the device because it is open already: the device cdev
    /// can be open once at a time (EINVAL), in this process (another container) or another.
    #[error(
        "{address} is open already (through its vfio cdev or its group, by this process or another): the iommufd backend opens a device once at a time"
    )]
    AlreadyOpen {
        /// The device.
        address: PciAddress,
        /// The kernel's error.
        #[source]
        source: io::Error,
    },
    /// An IOMMU group was asked of a container of the iommufd backend, which has none.
    #[error("IOMMU groups belong to the group backend; this container is an iommufd IOAS")]
    NoGroups,
    /// The kernel speaks another VFIO API version.
    #[error("VFIO API version {version}, expected {}", sys::API_VERSION)]
    ApiVersion {
        /// What the kernel reported.
        version: i32,
    },
    /// The kernel lacks the type1v2 IOMMU backend.
    #[error(
        "the kernel offers no VFIO type1v2 IOMMU (modprobe vfio_iommu_type1; is the IOMMU on: intel_iommu=on?)"
    )]
    NoType1,
    /// The device has no IOMMU group.
    #[error(
        "{address} has no IOMMU group: the IOMMU is off or does not cover it (boot with intel_iommu=on or amd_iommu=on)"
    )]
    NoIommuGroup {
        /// The device.
        address: PciAddress,
        /// Reading its `iommu_group` link, when that failed.
        #[source]
        source: Option<io::Error>,
    },
    /// A group's character device could not be opened (EBUSY: another process, or
    /// another container of this one, has it; then the message names who, where this
    /// process can tell).
    #[error("cannot open {}{}", group_path(*.group).display(), open_group_detail(.source, .open_in, .claimed))]
    OpenGroup {
        /// The group.
        group: u32,
        /// For EBUSY: the other processes that have the group file open (`/proc/PID/fd`).
        open_in: Vec<OtherProcess>,
        /// For EBUSY: the group's devices another process claims, with the claimant.
        claimed: Vec<(PciAddress, OtherProcess)>,
        /// The kernel's error.
        #[source]
        source: io::Error,
    },
    /// The group holds devices bound to host drivers.
    #[error("IOMMU group {group} is not viable: {} must be bound to vfio-pci or unbound", culprits(.devices))]
    NotViable {
        /// The group.
        group: u32,
        /// Devices of the group not on a vfio driver, with their drivers.
        devices: Vec<(String, Option<String>)>,
    },
    /// A bus or slot hot reset of `address` would also reset devices this process does not
    /// hold (see [`reset`]): refused before asking the kernel, which would refuse too.
    /// Nothing was reset.
    #[error(
        "{address}: a hot reset would also reset {}, which this process does not hold; nothing was reset: {need}",
        reset::blocker_list(.devices)
    )]
    HotResetNotHeld {
        /// The device asked to be reset.
        address: PciAddress,
        /// The affected devices this process does not hold, with who has them.
        devices: Vec<HotResetBlocker>,
        /// What the backend needs (open their groups in the device's container; bind them
        /// to the device's iommufd).
        need: &'static str,
    },
    /// The kernel can reset neither the device's slot nor its bus
    /// (`VFIO_DEVICE_GET_PCI_HOT_RESET_INFO` answered ENODEV): the device is on a root
    /// bus, or a device on its bus forbids bus resets.
    #[error(
        "{address} has no bus or slot hot reset: it is on a root bus (no bridge above it to reset the bus), or a device on its bus cannot be bus reset"
    )]
    NoHotReset {
        /// The device.
        address: PciAddress,
    },
    /// A VFIO ioctl failed.
    #[error("{ioctl}{} failed{}", arg.map(|a| format!(" ({a:#x})")).unwrap_or_default(), address.map(|a| format!(" on {a}")).unwrap_or_default())]
    Ioctl {
        /// The ioctl, e.g. `VFIO_DEVICE_GET_REGION_INFO`.
        ioctl: &'static str,
        /// The device, for device ioctls.
        address: Option<PciAddress>,
        /// Its integer argument (region or IRQ index), when it has one.
        arg: Option<u64>,
        /// The kernel's error.
        #[source]
        source: io::Error,
    },
    /// A read or write of a device region through the device fd failed.
    #[error("{} of {len} bytes at {offset:#x} of region {region} of {address} failed", if *.write { "write" } else { "read" })]
    Access {
        /// The device.
        address: PciAddress,
        /// The region index.
        region: u32,
        /// Offset within the region.
        offset: u64,
        /// Bytes.
        len: usize,
        /// A write, not a read.
        write: bool,
        /// The kernel's error.
        #[source]
        source: io::Error,
    },
    /// Mapping (mmap) an area of a BAR failed.
    #[error("mmap of BAR{region} of {address} at {offset:#x} ({len} bytes) failed")]
    Mmap {
        /// The device.
        address: PciAddress,
        /// The BAR.
        region: u32,
        /// Offset of the area within the BAR.
        offset: u64,
        /// Bytes.
        len: u64,
        /// The kernel's error.
        #[source]
        source: io::Error,
    },
    /// An access outside a region or a mapped area, or misaligned.
    #[error("region {region} of {address}: {len} bytes at {offset:#x} are outside it or misaligned")]
    OutOfRange {
        /// The device.
        address: PciAddress,
        /// The region index.
        region: u32,
        /// The offset.
        offset: u64,
        /// Bytes of the access.
        len: usize,
    },
    /// An 8-byte access to an I/O-port BAR: ports have no 8-byte accesses, and splitting
    /// one in two would hide that it is not atomic. Use two 4-byte accesses.
    #[error("BAR {region} of {address} is an I/O-port BAR: no 8-byte access at {offset:#x}")]
    IoPortWidth {
        /// The device.
        address: PciAddress,
        /// The BAR.
        region: u32,
        /// The offset of the access.
        offset: u64,
    },
    /// The region does not exist on this device (size 0, or VFIO refused its info).
    #[error("{address} has no region {region}")]
    NoRegion {
        /// The device.
        address: PciAddress,
        /// The region index.
        region: u32,
        /// What `VFIO_DEVICE_GET_REGION_INFO` said at open, if it failed.
        #[source]
        source: Option<io::Error>,
    },
    /// Clearing Memory Space Enable while BARs are mapped: the next access to a mapping
    /// would raise SIGBUS. Drop the [`MappedBar`]s first.
    #[error("{address}: refusing to clear Memory Space Enable while {mapped_bars} BAR mapping(s) are alive")]
    MemorySpaceInUse {
        /// The device.
        address: PciAddress,
        /// Live [`MappedBar`]s.
        mapped_bars: usize,
    },
    /// The device was closed under this handle ([`VfioDevice::revoke`]): nothing reaches
    /// it any more.
    #[error("{address}: revoked (closed under its handles)")]
    Revoked {
        /// The device.
        address: PciAddress,
    },
    /// [`VfioDevice::revoke`] could not close the device under its handles.
    #[error("{address}: cannot revoke the device: {reason}")]
    NotRevocable {
        /// The device.
        address: PciAddress,
        /// Why.
        reason: String,
        /// The system's error, if one failed.
        #[source]
        source: Option<io::Error>,
    },
    /// Config space did not decode (a capability list running past the end).
    #[error("{address}: config space")]
    Config {
        /// The device.
        address: PciAddress,
        /// What did not decode.
        #[source]
        source: ParseError,
    },
    /// A DMA map before any device was opened in the container (the group backend sets
    /// the IOMMU up with the first group; an IOAS knows its IOVA ranges only once a device
    /// is attached).
    #[error("DMA map before any device was opened in the container (open a device first)")]
    NoGroupAttached,
    /// The container's IOMMU is gone: every device opened in it was removed, so the
    /// kernel detached their groups and released the IOMMU, with every mapping in it.
    /// Opening a device in the container again sets a new one up.
    #[error(
        "the container's IOMMU is gone: every device opened in it was removed (open a device in it again before mapping)"
    )]
    IommuGone,
    /// Allocating a DMA buffer failed.
    #[error("cannot allocate a DMA buffer of {len} bytes")]
    Alloc {
        /// Bytes asked for.
        len: usize,
        /// The mmap error.
        #[source]
        source: io::Error,
    },
    /// Pinning DMA memory failed: the memlock limit is the usual cause.
    #[error(
        "cannot map {size} bytes for DMA: pinning the pages failed (RLIMIT_MEMLOCK is {}; raise it with `ulimit -l` or run as root)",
        limit.map(|l| format!("{l} bytes")).unwrap_or_else(|| "unlimited".into())
    )]
    Memlock {
        /// Bytes asked for.
        size: u64,
        /// The soft limit in bytes, `None` when unlimited or unknown.
        limit: Option<u64>,
        /// The kernel's error.
        #[source]
        source: io::Error,
    },
    /// The map ioctl (`VFIO_IOMMU_MAP_DMA`, or `IOMMU_IOAS_MAP` with iommufd) failed for
    /// another reason.
    #[error("mapping {size} bytes for DMA{} failed", iova.map(|i| format!(" at IOVA {i:#x}")).unwrap_or_default())]
    Map {
        /// The IOVA tried (`None`: the kernel was to choose).
        iova: Option<u64>,
        /// Bytes.
        size: u64,
        /// The kernel's error.
        #[source]
        source: io::Error,
    },
    /// The unmap ioctl (`VFIO_IOMMU_UNMAP_DMA`, or `IOMMU_IOAS_UNMAP`) failed or unmapped
    /// less than the region: the region's pages and IOVA range are leaked (see
    /// [`DmaRegion`]).
    #[error("unmapping {size} bytes of DMA at IOVA {iova:#x} failed{}", unmapped.map(|n| format!(": {n} bytes unmapped")).unwrap_or_default())]
    Unmap {
        /// The region's IOVA.
        iova: u64,
        /// Its size.
        size: u64,
        /// Bytes the kernel said it unmapped, when it returned success for less.
        unmapped: Option<u64>,
        /// The kernel's error, when the ioctl failed.
        #[source]
        source: Option<io::Error>,
    },
    /// A fixed IOVA range that is outside the IOMMU's ranges, misaligned, or in use.
    #[error("IOVA range {iova:#x}+{size:#x} is outside the IOMMU's ranges, misaligned or already mapped")]
    IovaUnavailable {
        /// Its start.
        iova: u64,
        /// Bytes.
        size: u64,
    },
    /// Memory to be mapped for DMA that is not a whole number of the container's granules
    /// at an address aligned to one ([`Container::dma_granule`]: the CPU page or the
    /// IOMMU's smallest page, whichever is larger). The kernel would refuse it (`EINVAL`);
    /// on a kernel with 16 or 64 KiB pages a buffer of 4 KiB pages is such memory.
    #[error(
        "DMA memory at {vaddr:#x} ({size:#x} bytes) is not a whole number of the IOMMU's {granule:#x}-byte pages at an address aligned to one; allocate it with Container::alloc_dma, or in multiples of Container::dma_granule"
    )]
    NotGranuleAligned {
        /// Its address in the process.
        vaddr: u64,
        /// Its length.
        size: u64,
        /// What both must be multiples of.
        granule: u64,
    },
    /// No IOVA range of this size is left in the ranges the IOMMU reports.
    #[error("no IOVA range of {size} bytes left in the IOMMU's ranges")]
    IovaExhausted {
        /// Bytes asked for.
        size: u64,
    },
    /// No free IOVA range of this size and alignment ends at or below the device's address
    /// limit (a [`DmaConstraints`] address limit), though
    /// the IOMMU may have room above it.
    #[error(
        "no free IOVA range of {size} bytes aligned to {align:#x} ends at or below {max_iova:#x}, the device's address limit"
    )]
    IovaExhaustedBelow {
        /// Bytes asked for.
        size: u64,
        /// The alignment used (the largest of what was asked, the buffer's page size and
        /// the IOMMU's smallest page).
        align: u64,
        /// The highest IOVA the device can reach.
        max_iova: u64,
    },
    /// An eventfd could not be created.
    #[error("cannot create an eventfd")]
    Eventfd(#[source] io::Error),
    /// An interrupt index cannot be enabled while another is: vfio-pci enables one of
    /// INTx, MSI and MSI-X at a time.
    #[error("{address}: cannot enable {} while {} is enabled (one of INTx, MSI, MSI-X at a time)", irq::name(*.index), irq::name(*.enabled))]
    IrqBusy {
        /// The device.
        address: PciAddress,
        /// The index asked for.
        index: u32,
        /// The index that is enabled.
        enabled: u32,
    },
    /// Enabling MSI or MSI-X found fewer vectors than asked for (the host ran out of
    /// interrupt vectors, or the device's capability says fewer); nothing was enabled.
    #[error("{address}: {asked} {} vectors asked, the kernel could allocate {available}", irq::name(*.index))]
    IrqVectors {
        /// The device.
        address: PciAddress,
        /// The index.
        index: u32,
        /// Vectors asked for.
        asked: u32,
        /// Vectors the kernel could have given.
        available: u32,
    },
    /// A VFIO info structure did not decode.
    #[error(transparent)]
    Info(#[from] InfoError),
    /// A VF token problem at open: the device is a VF whose PF is bound to vfio-pci and
    /// no token, or the wrong one, was given; or a token was given for a device that takes
    /// none.
    #[error("{}", vf_token_message(*.address, *.pf, *.problem))]
    VfToken {
        /// The device being opened.
        address: PciAddress,
        /// Its PF (from the `physfn` link), when it is a VF.
        pf: Option<PciAddress>,
        /// What is wrong.
        problem: VfTokenProblem,
        /// The kernel's error (EACCES, or EINVAL for a token it did not expect).
        #[source]
        source: io::Error,
    },
}

/// What is wrong with the VF token given to [`VfioDevice::open_vf`] or
/// [`VfioDevice::open_in_with_token`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VfTokenProblem {
    /// The PF is bound to vfio-pci, so the VF opens only with the token its user set.
    Missing,
    /// The token is not the one the PF's user set.
    Wrong,
    /// A token was given, but the device is not a VF of a PF on vfio-pci.
    NotExpected,
}

fn vf_token_message(address: PciAddress, pf: Option<PciAddress>, problem: VfTokenProblem) -> String {
    let pf = pf.map_or_else(|| "its PF".to_owned(), |p| format!("its PF {p}"));
    match problem {
        VfTokenProblem::Missing => format!(
            "{address} is a VF and {pf} is bound to vfio-pci: opening it needs the VF token the PF's user set (VfioDevice::set_vf_token on the PF, then VfioDevice::open_vf)"
        ),
        VfTokenProblem::Wrong => format!(
            "the VF token given for {address} is not the one the user of {pf} set (VFIO_DEVICE_FEATURE PCI_VF_TOKEN)"
        ),
        VfTokenProblem::NotExpected => {
            format!("a VF token was given for {address}, but it is not a VF whose PF is bound to vfio-pci")
        }
    }
}

/// A VF token: the UUID a PF's vfio user shares with the users of its VFs
/// ([`VfioDevice::set_vf_token`], [`VfioDevice::open_vf`]). vfio-pci asks for it because a
/// PF's driver can disrupt or observe its VFs (reset them, reassign their resources), so a
/// VF's user must show it cooperates with the PF's. Printed and parsed in the 8-4-4-4-12
/// hex form the kernel expects (`bd8d9d2b-5a5f-4f5a-a211-f591514ba1f3`).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct VfToken([u8; 16]);

impl VfToken {
    /// A random token (a version 4 UUID) from `/dev/urandom`.
    pub fn generate() -> io::Result<VfToken> {
        use std::io::Read;
        let mut b = [0u8; 16];
        File::open("/dev/urandom")?.read_exact(&mut b)?;
        // Version 4 (random) and the RFC 4122 variant, so tools print it as a UUID.
        b[6] = (b[6] & 0x0f) | 0x40;
        b[8] = (b[8] & 0x3f) | 0x80;
        Ok(VfToken(b))
    }

    /// The token of these bytes (in printed order).
    pub fn from_bytes(bytes: [u8; 16]) -> Self {
        VfToken(bytes)
    }

    /// Its bytes, in printed order (what `VFIO_DEVICE_FEATURE` takes).
    pub fn to_bytes(self) -> [u8; 16] {
        self.0
    }
}

impl std::fmt::Display for VfToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, b) in self.0.iter().enumerate() {
            if matches!(i, 4 | 6 | 8 | 10) {
                f.write_str("-")?;
            }
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl std::fmt::Debug for VfToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "VfToken({self})")
    }
}

/// Why a text is not a VF token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{text:?} is not a UUID (8-4-4-4-12 hex digits)")]
pub struct VfTokenParseError {
    /// The text, shortened to 64 characters.
    pub text: String,
}

impl std::str::FromStr for VfToken {
    type Err = VfTokenParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || VfTokenParseError {
            text: s.chars().take(64).collect(),
        };
        let t = s.trim().as_bytes();
        if t.len() != 36 || [8, 13, 18, 23].iter().any(|&i| t[i] != b'-') {
            return Err(err());
        }
        let hex: Vec<u8> = t.iter().copied().filter(|&c| c != b'-').collect();
        let mut out = [0u8; 16];
        for (i, pair) in hex.chunks_exact(2).enumerate() {
            let pair = std::str::from_utf8(pair).map_err(|_| err())?;
            *out.get_mut(i).ok_or_else(err)? = u8::from_str_radix(pair, 16).map_err(|_| err())?;
        }
        if hex.len() != 32 {
            return Err(err());
        }
        Ok(VfToken(out))
    }
}

/// The PF of `address`, from its `physfn` link (a readlink: no device lock).
pub fn physfn(root: &SysfsRoot, address: PciAddress) -> Option<PciAddress> {
    std::fs::read_link(root.device_dir(address).join("physfn"))
        .ok()?
        .file_name()?
        .to_str()?
        .parse()
        .ok()
}

// Why a group could not be opened: for EBUSY, who has it (as far as this process can
// tell); else the usual cause.
fn open_group_detail(
    source: &io::Error,
    open_in: &[OtherProcess],
    claimed: &[(PciAddress, OtherProcess)],
) -> String {
    if source.raw_os_error() != Some(nix::libc::EBUSY) {
        return " (is the device bound to vfio-pci?)".to_owned();
    }
    let mut s = String::from(": the group is in use by another process (or another container of this one)");
    if !open_in.is_empty() {
        let who: Vec<String> = open_in.iter().map(OtherProcess::to_string).collect();
        s.push_str(&format!("; open in {}", who.join(", ")));
    }
    if !claimed.is_empty() {
        let who: Vec<String> = claimed.iter().map(|(a, p)| format!("{a} by {p}")).collect();
        s.push_str(&format!("; its devices claimed: {}", who.join(", ")));
    }
    s
}

// Who has group `number` open, and which of its devices other processes claim: for the
// EBUSY of its open.
fn group_holders(root: &SysfsRoot, number: u32) -> (Vec<OtherProcess>, Vec<(PciAddress, OtherProcess)>) {
    let own = std::process::id();
    let path = group_path(number).to_string_lossy().into_owned();
    let open_in = reset::openers(std::path::Path::new("/proc"), own, &[vec![path]])
        .pop()
        .unwrap_or_default();
    let members: Vec<PciAddress> =
        std::fs::read_dir(root.path().join(format!("kernel/iommu_groups/{number}/devices")))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .collect();
    let claimed = crate::removal::claim::ClaimDir::from_env()
        .list()
        .unwrap_or_default()
        .into_iter()
        .filter(|c| c.live && members.contains(&c.address))
        .filter_map(|c| {
            let pid = c.pid.filter(|&p| p != own)?;
            Some((
                c.address,
                OtherProcess {
                    pid,
                    command: c.command,
                },
            ))
        })
        .collect();
    (open_in, claimed)
}

fn culprits(devices: &[(String, Option<String>)]) -> String {
    devices
        .iter()
        .map(|(a, d)| format!("{a} (driver {})", d.as_deref().unwrap_or("none")))
        .collect::<Vec<_>>()
        .join(", ")
}

fn ioctl_err(
    ioctl: &'static str,
    address: Option<PciAddress>,
    arg: Option<u64>,
) -> impl FnOnce(io::Error) -> VfioError {
    move |source| VfioError::Ioctl {
        ioctl,
        address,
        arg,
        source,
    }
}

/// An IOMMU address space for DMA, of either backend ([`VfioBackend`]): a VFIO type1v2
/// container with its groups, or an iommufd IOAS. Shared as `Arc<Container>` by the
/// devices opened in it and the [`DmaRegion`]s mapped in it; which backend it is changes
/// nothing for them.
///
/// A group-backend container keeps every [`Group`] it attached, open and attached, for its
/// whole life: the kernel tears the IOMMU (and every mapping in it) down when the last
/// group leaves a container, so groups that came and went with their devices would unmap
/// the [`DmaRegion`]s behind their backs. An iommufd IOAS keeps its mappings whatever
/// devices come and go.
///
/// # Hot removal (group backend)
///
/// The kernel detaches a group from its container when the group's last device is
/// removed, although the group fd stays open here; when that was the container's last
/// group, it releases the IOMMU with every mapping in it, and the group number may go to
/// a new group. The container copes with each of these:
///
/// - a detached group is forgotten at the next group lookup (`VFIO_GROUP_GET_STATUS`
///   answers ENODEV), so a device re-added under a recycled number opens the new group;
/// - the next group attached to a container whose IOMMU is gone (`VFIO_IOMMU_GET_INFO`
///   answers EINVAL) sets a new IOMMU up, with a fresh IOVA space;
/// - a [`DmaRegion`] of the IOMMU that went has nothing left to unmap: its pages are
///   freed, not leaked, and the new IOMMU is never asked to unmap its IOVA;
/// - a map while the container has no IOMMU is [`VfioError::IommuGone`].
///
/// # Dropping
///
/// The container goes when the last `Arc` goes: after every [`VfioDevice`] opened in it
/// and every [`DmaRegion`] mapped in it. A group container closes its groups first (the
/// last one out takes the IOMMU mappings with it: only regions whose unmap failed can be
/// left, see [`Container::leaked`]), then its fd; an iommufd one closes the iommufd, which
/// destroys the IOAS and what is still mapped in it. Until then the groups stay open, so
/// another process (or another container) cannot open them.
///
/// # Process exit
///
/// Exit closes the fds like a drop. Nothing here blocks exit; see the exit rule in the
/// [module docs](self) for the device fds.
#[derive(Debug)]
pub struct Container {
    space: Space,
    // Filled when the first device is attached (the IOMMU type can be set, and the IOVA
    // ranges are known, only then).
    iommu: Mutex<Option<iova::IovaSpace>>,
}

/// The kernel objects behind a [`Container`].
#[derive(Debug)]
enum Space {
    Group {
        // Declared before `fd`: the groups close (detach) before the container fd.
        groups: Mutex<GroupTable<Group>>,
        fd: OwnedFd,
    },
    Iommufd(iommufd::Ioas),
}

impl AsFd for Container {
    /// The container fd (`/dev/vfio/vfio`), or the iommufd (`/dev/iommu`).
    fn as_fd(&self) -> BorrowedFd<'_> {
        match &self.space {
            Space::Group { fd, .. } => fd.as_fd(),
            Space::Iommufd(ioas) => ioas.as_fd(),
        }
    }
}

impl Container {
    /// A container of the backend [`VfioBackend::Auto`] chooses on this kernel: iommufd
    /// when it has `/dev/iommu` and the device cdevs, else the group backend.
    pub fn new() -> Result<Arc<Container>, VfioError> {
        Self::with_backend(VfioBackend::Auto)
    }

    /// A container of `backend` ([`VfioBackend::Auto`] resolved now). Group: opens
    /// `/dev/vfio/vfio` and checks the API version and type1v2 support. Iommufd: opens
    /// `/dev/iommu` and allocates an IOAS. The errors name what the kernel lacks.
    pub fn with_backend(backend: VfioBackend) -> Result<Arc<Container>, VfioError> {
        let space = match backend.resolve() {
            VfioBackend::Iommufd => Space::Iommufd(iommufd::Ioas::new()?),
            _ => Self::open_type1()?,
        };
        Ok(Arc::new(Container {
            space,
            iommu: Mutex::new(None),
        }))
    }

    fn open_type1() -> Result<Space, VfioError> {
        let file = File::options()
            .read(true)
            .write(true)
            .open(iommufd::CONTAINER_PATH)
            .map_err(|e| {
                if e.kind() == io::ErrorKind::NotFound && std::path::Path::new(iommufd::IOMMUFD_PATH).exists()
                {
                    VfioError::NoGroupMode(e)
                } else {
                    VfioError::NoVfio(e)
                }
            })?;
        let fd = OwnedFd::from(file);
        let version =
            sys::get_api_version(fd.as_fd()).map_err(ioctl_err("VFIO_GET_API_VERSION", None, None))?;
        if version != sys::API_VERSION {
            return Err(VfioError::ApiVersion { version });
        }
        let has_type1 = sys::check_extension(fd.as_fd(), sys::TYPE1V2_IOMMU).map_err(ioctl_err(
            "VFIO_CHECK_EXTENSION",
            None,
            Some(sys::TYPE1V2_IOMMU.into()),
        ))?;
        if !has_type1 {
            return Err(VfioError::NoType1);
        }
        Ok(Space::Group {
            groups: Mutex::new(GroupTable::default()),
            fd,
        })
    }

    /// The backend: [`VfioBackend::Group`] or [`VfioBackend::Iommufd`] (never `Auto`).
    pub fn backend(&self) -> VfioBackend {
        match self.space {
            Space::Group { .. } => VfioBackend::Group,
            Space::Iommufd(_) => VfioBackend::Iommufd,
        }
    }

    /// The iommufd IOAS id, for an iommufd container.
    pub fn ioas_id(&self) -> Option<u32> {
        match &self.space {
            Space::Iommufd(ioas) => Some(ioas.id()),
            Space::Group { .. } => None,
        }
    }

    /// A group container on `/dev/null` (every ioctl fails with ENOTTY) with an IOVA space
    /// over `ranges`: for tests of the failure paths.
    #[cfg(test)]
    pub(crate) fn fake_for_tests(ranges: Vec<std::ops::RangeInclusive<u64>>) -> Arc<Container> {
        let info = IommuInfo {
            page_sizes: 0x1000,
            iova_ranges: ranges,
        };
        Arc::new(Container {
            space: Space::Group {
                groups: Mutex::new(GroupTable::default()),
                fd: OwnedFd::from(File::open("/dev/null").unwrap()),
            },
            iommu: Mutex::new(Some(iova::IovaSpace::new(info))),
        })
    }

    /// A group container on `/dev/null` with no group attached: for tests.
    #[cfg(test)]
    pub(crate) fn fake_unattached_for_tests() -> Arc<Container> {
        Arc::new(Container {
            space: Space::Group {
                groups: Mutex::new(GroupTable::default()),
                fd: OwnedFd::from(File::open("/dev/null").unwrap()),
            },
            iommu: Mutex::new(None),
        })
    }

    /// The IOMMU group `number`, attached to this container: the one already open here,
    /// else opened now (checked viable, attached; the first group also sets the IOMMU
    /// type) and kept until the container goes. The kernel lets a group be open only
    /// once, so two functions of one group must be opened in the same container.
    /// [`VfioError::NoGroups`] for an iommufd container.
    pub fn group(&self, root: &SysfsRoot, number: u32) -> Result<Arc<Group>, VfioError> {
        match &self.space {
            Space::Group { groups, .. } => groups.lock().get_or_open(number, Group::is_attached, || {
                Group::open(self, root, number).map(Arc::new)
            }),
            Space::Iommufd(_) => Err(VfioError::NoGroups),
        }
    }

    /// The numbers of the groups attached to this container (none for iommufd). Groups
    /// the kernel detached (their last device was removed) are forgotten here.
    pub fn groups(&self) -> Vec<u32> {
        match &self.space {
            Space::Group { groups, .. } => {
                let mut groups = groups.lock();
                groups.forget_dead(Group::is_attached);
                groups.live()
            }
            Space::Iommufd(_) => Vec::new(),
        }
    }

    fn attach(&self, group: &OwnedFd, number: u32) -> Result<(), VfioError> {
        let Space::Group { fd, .. } = &self.space else {
            return Err(VfioError::NoGroups);
        };
        sys::group_set_container(group.as_fd(), fd.as_fd()).map_err(ioctl_err(
            "VFIO_GROUP_SET_CONTAINER",
            None,
            Some(number.into()),
        ))?;
        // Every group, not only the first, reads GET_INFO: a group behind another IOMMU
        // (or with other reserved regions, such as an MSI window) narrows what may be
        // mapped, and a container whose IOMMU went with its last group needs a new one.
        let mut iommu = self.iommu.lock();
        let lost = iova::IovaSpace::attach_type1(
            &mut iommu,
            || sys::iommu_get_info(fd.as_fd()),
            || sys::set_iommu(fd.as_fd(), sys::TYPE1V2_IOMMU),
        )?;
        if let Some(old) = lost {
            log_iommu_gone(&old);
            log::info!("group {number} attached: the container's IOMMU is set up again");
        }
        Ok(())
    }

    /// Whether the container has no IOMMU any more: a type1 container whose groups all
    /// left (their last devices removed: the kernel detaches them then, and releases the
    /// IOMMU with the last) answers every IOMMU ioctl with EINVAL, `VFIO_IOMMU_GET_INFO`
    /// among them. An iommufd IOAS never loses its mappings.
    fn iommu_gone(&self) -> bool {
        match &self.space {
            Space::Group { fd, .. } => {
                matches!(sys::iommu_get_info(fd.as_fd()), Err(e) if e.raw_os_error() == Some(nix::libc::EINVAL))
            }
            Space::Iommufd(_) => false,
        }
    }

    /// The container's IOMMU was found gone: its IOVA space goes too.
    fn iommu_lost(&self, slot: &mut Option<iova::IovaSpace>) {
        if let Some(old) = iova::IovaSpace::iommu_gone(slot) {
            log_iommu_gone(&old);
        }
    }

    /// Opens `address` through this container's backend: a group's device fd, or the
    /// device cdev bound to the iommufd and attached to the IOAS (then the IOVA ranges are
    /// read again: each device may narrow them). Returns the fd and, for the group
    /// backend, the group.
    fn open_device(
        &self,
        root: &SysfsRoot,
        address: PciAddress,
        token: Option<VfToken>,
    ) -> Result<(OwnedFd, Option<Arc<Group>>), VfioError> {
        match &self.space {
            Space::Group { .. } => {
                let number = iommu_group(root, address)?;
                let group = self.group(root, number)?;
                let fd = group
                    .device_fd_with(address, token)
                    .map_err(|e| vf_token_error(root, address, token, e))?;
                Ok((fd, Some(group)))
            }
            Space::Iommufd(ioas) => {
                let fd = ioas.open_device(root, address, token)?;
                let info = ioas.ranges()?;
                let mut iommu = self.iommu.lock();
                match iommu.as_mut() {
                    Some(space) => space.narrow(info),
                    None => *iommu = Some(iova::IovaSpace::exact(info)),
                }
                Ok((fd, None))
            }
        }
    }

    /// What the IOMMU reports (after the first device is attached): for the group backend
    /// the type1 info, for iommufd the IOAS's IOVA ranges and alignment.
    pub fn iommu_info(&self) -> Option<IommuInfo> {
        self.iommu.lock().as_ref().map(|s| s.info.clone())
    }
}

fn log_iommu_gone(old: &iova::IovaSpace) {
    log::warn!(
        "the container's IOMMU is gone (every group it had left it: their devices were removed), with every DMA mapping in it{}; the next device opened in it sets a new one up",
        if old.leaked.is_empty() {
            String::new()
        } else {
            format!(
                " ({} region(s) that failed to unmap before, whose pages stay leaked)",
                old.leaked.len()
            )
        }
    );
}

/// The groups attached to a container, by number. Each is opened once and kept while the
/// kernel keeps it attached.
#[derive(Debug)]
struct GroupTable<G> {
    groups: BTreeMap<u32, Arc<G>>,
}

impl<G> Default for GroupTable<G> {
    fn default() -> Self {
        GroupTable {
            groups: BTreeMap::new(),
        }
    }
}

impl<G> GroupTable<G> {
    /// The group `number`, or a new one from `open` (called with the table locked, so one
    /// group is never opened twice at once).
    ///
    /// Groups that are not `alive` are forgotten first: the kernel detached them (their
    /// last device was removed), their fds can do nothing more, and their numbers may
    /// have gone to new groups, which must be opened, not served from here.
    fn get_or_open(
        &mut self,
        number: u32,
        alive: impl Fn(&G) -> bool,
        open: impl FnOnce() -> Result<Arc<G>, VfioError>,
    ) -> Result<Arc<G>, VfioError> {
        self.forget_dead(alive);
        if let Some(group) = self.groups.get(&number) {
            return Ok(Arc::clone(group));
        }
        let group = open()?;
        self.groups.insert(number, Arc::clone(&group));
        Ok(group)
    }

    /// Drops the groups that are not `alive`. (Devices still holding one keep its fd.)
    fn forget_dead(&mut self, alive: impl Fn(&G) -> bool) {
        self.groups.retain(|_, g| alive(g));
    }

    fn live(&self) -> Vec<u32> {
        self.groups.keys().copied().collect()
    }
}

/// An IOMMU group (`/dev/vfio/N`), attached to a [`Container`]. Obtained from
/// [`Container::group`] (or through [`VfioDevice::open`]); the open devices of the group
/// share it, and so does the container that attached it.
///
/// # Dropping
///
/// The container keeps the group, so the group fd closes when the container goes (after
/// its devices and [`DmaRegion`]s), not with the last device: the IOMMU mappings of the
/// container live as long as one group is attached. Closing it detaches the group; it
/// can then be opened again, here or by another process. A group whose last device was
/// removed is detached by the kernel already; the container forgets it then (see
/// [`Container`], "Hot removal"), and its fd closes when no device holds it.
///
/// # Process exit
///
/// As for the container: closed at exit, nothing blocks.
#[derive(Debug)]
pub struct Group {
    fd: OwnedFd,
    number: u32,
}

impl AsFd for Group {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl Group {
    /// Opens group `number`, checks it is viable (a non-viable group's error names the
    /// devices, from `ROOT/kernel/iommu_groups/N/devices`, that are bound to host
    /// drivers) and attaches it to `container`.
    fn open(container: &Container, root: &SysfsRoot, number: u32) -> Result<Group, VfioError> {
        let file = File::options()
            .read(true)
            .write(true)
            .open(group_path(number))
            .map_err(|source| {
                let (open_in, claimed) = if source.raw_os_error() == Some(nix::libc::EBUSY) {
                    group_holders(root, number)
                } else {
                    (Vec::new(), Vec::new())
                };
                VfioError::OpenGroup {
                    group: number,
                    open_in,
                    claimed,
                    source,
                }
            })?;
        let fd = OwnedFd::from(file);
        let flags = sys::group_get_status(fd.as_fd()).map_err(ioctl_err(
            "VFIO_GROUP_GET_STATUS",
            None,
            Some(number.into()),
        ))?;
        if !flags.contains(sys::GroupFlags::VIABLE) {
            return Err(VfioError::NotViable {
                group: number,
                devices: non_vfio_members(root, number),
            });
        }
        container.attach(&fd, number)?;
        Ok(Group { fd, number })
    }

    /// The group number.
    pub fn number(&self) -> u32 {
        self.number
    }

    /// Whether the kernel still has the group: when its last device is removed, the
    /// kernel detaches it from its container and answers `VFIO_GROUP_GET_STATUS` with
    /// ENODEV from then on, although this fd stays open. Any other answer counts as
    /// attached (forgetting a live group would detach it, and with the last group the
    /// container's IOMMU would go).
    fn is_attached(&self) -> bool {
        !matches!(sys::group_get_status(self.fd.as_fd()), Err(e) if e.raw_os_error() == Some(nix::libc::ENODEV))
    }

    fn device_fd_with(&self, address: PciAddress, token: Option<VfToken>) -> Result<OwnedFd, VfioError> {
        let name = address.to_string();
        match token {
            None => sys::group_get_device_fd(self.as_fd(), &name),
            Some(t) => sys::group_get_vf_device_fd(self.as_fd(), &name, &t.to_string()),
        }
        .map_err(ioctl_err(
            "VFIO_GROUP_GET_DEVICE_FD",
            Some(address),
            Some(self.number.into()),
        ))
    }
}

// Turns the kernel's refusals of a device fd that are about VF tokens into
// [`VfioError::VfToken`]: EACCES for a VF (or a PF whose VFs are in use) without the right
// token, EINVAL for a token where none is expected.
fn vf_token_error(root: &SysfsRoot, address: PciAddress, token: Option<VfToken>, e: VfioError) -> VfioError {
    let VfioError::Ioctl { source, .. } = &e else {
        return e;
    };
    let problem = match (source.raw_os_error(), token) {
        (Some(nix::libc::EACCES), None) => VfTokenProblem::Missing,
        (Some(nix::libc::EACCES), Some(_)) => VfTokenProblem::Wrong,
        (Some(nix::libc::EINVAL), Some(_)) => VfTokenProblem::NotExpected,
        _ => return e,
    };
    let VfioError::Ioctl { source, .. } = e else {
        unreachable!("matched above")
    };
    VfioError::VfToken {
        address,
        pf: physfn(root, address),
        problem,
        source,
    }
}

/// The members of group `number` not bound to a vfio driver, with their drivers.
pub fn non_vfio_members(root: &SysfsRoot, number: u32) -> Vec<(String, Option<String>)> {
    let dir = root.path().join(format!("kernel/iommu_groups/{number}/devices"));
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let driver = std::fs::read_link(entry.path().join("driver"))
            .ok()
            .and_then(|t| t.file_name().map(|n| n.to_string_lossy().into_owned()));
        if driver.is_some() && !crate::sysfs::bind::on_vfio(&entry.path(), driver.as_deref()) {
            out.push((name, driver));
        }
    }
    out.sort();
    out
}

/// The IOMMU group of `address`, from its `iommu_group` link.
pub fn iommu_group(root: &SysfsRoot, address: PciAddress) -> Result<u32, VfioError> {
    let link = root.device_dir(address).join("iommu_group");
    let target = std::fs::read_link(&link).map_err(|source| VfioError::NoIommuGroup {
        address,
        source: Some(source),
    })?;
    target
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.parse().ok())
        .ok_or(VfioError::NoIommuGroup {
            address,
            source: None,
        })
}

/// Interrupt index facts (`VFIO_DEVICE_GET_IRQ_INFO`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IrqInfo {
    /// The index ([`irq`]).
    pub index: u32,
    /// What the index can do.
    pub flags: irq::InfoFlags,
    /// Vectors.
    pub count: u32,
}

/// An open vfio-pci device, shared as `Arc<VfioDevice>` with its [`MappedBar`]s.
///
/// While it is open the device counts as held by this process
/// ([`crate::removal::held`]): scans in this process never read its blocking attributes.
///
/// # Dropping
///
/// The device fd closes when the last `Arc` goes: drop every [`MappedBar`] of the device
/// too (each holds an `Arc`). Closing the fd makes vfio-pci reset the function (if it can)
/// and release it: a pending removal or unbind then completes. [`revoke`](Self::revoke)
/// closes it earlier, under the handles that are still alive. Interrupt eventfds
/// registered with it stop firing; the eventfds themselves are the caller's to close.
/// The container (with its groups) goes when no other device and no [`DmaRegion`] holds
/// it. Stop the device's DMA before dropping the [`DmaRegion`]s it uses (they may
/// outlive the device, but a device still running would fault on the unmapped IOVAs).
///
/// # Process exit
///
/// Exit closes the fd, but only after every thread has ended. Follow the exit rule in the
/// [module docs](self): on a REQ ([`request_eventfd`](Self::request_eventfd),
/// [`poll_request`](Self::poll_request)) drop the device promptly, and never read this
/// device's blocking sysfs attributes while holding it — a thread stuck in such a read
/// keeps the process, and so the fd, alive forever while a removal waits for the fd.
#[derive(Debug)]
pub struct VfioDevice {
    address: PciAddress,
    file: File,
    // Held from a removal or revoke until the device is closed (dropped after `file`).
    quarantine: Mutex<Option<dma::IovaQuarantine>>,
    num_regions: u32,
    num_irqs: u32,
    // Region info by index, fetched at open (it never changes for vfio-pci): the info, or
    // the errno VFIO answered with.
    regions: Vec<Result<RegionInfo, i32>>,
    config: RegionInfo,
    // Live MappedBars. Locked across the check and the write of a Command write that
    // clears Memory Space Enable, so no mapping appears in between, and across `revoke`.
    mapped: Mutex<Mappings>,
    // Which of INTx, MSI, MSI-X is enabled, and whether ERR is (see `irqs`).
    irqs: Mutex<irqs::IrqState>,
    // Closed under its handles (`revoke`): every operation fails.
    revoked: AtomicBool,
    identity: Option<DeviceIdentity>,
    // None for the iommufd backend.
    group: Option<Arc<Group>>,
    container: Arc<Container>,
    // Dropped after the fd closes (fields drop in order): the device stays "held" until
    // then.
    _held: HeldOpen,
}

// The live mappings of a device: how many MappedBars, and their areas in the SIGBUS
// table (`None`: an area the full table does not cover), for `revoke` to replace.
#[derive(Debug, Default)]
struct Mappings {
    bars: usize,
    areas: Vec<Option<fault::AreaKey>>,
}

impl AsFd for VfioDevice {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

impl VfioDevice {
    /// Opens `address` in a new container: finds its group, checks viability, attaches,
    /// gets the device fd.
    pub fn open(root: &SysfsRoot, address: PciAddress) -> Result<Arc<VfioDevice>, VfioError> {
        let container = Container::new()?;
        Self::open_in(root, address, &container)
    }

    /// Opens `address` in an existing container (devices sharing one IOVA space). A device
    /// whose group is already open in `container` (another function of it is open) reuses
    /// that group.
    pub fn open_in(
        root: &SysfsRoot,
        address: PciAddress,
        container: &Arc<Container>,
    ) -> Result<Arc<VfioDevice>, VfioError> {
        Self::open_with(root, address, container, None)
    }

    /// Opens VF `address` of a PF bound to vfio-pci, in a new container, with the VF token
    /// the PF's user set ([`set_vf_token`](Self::set_vf_token)). A missing or wrong token
    /// is [`VfioError::VfToken`], naming the PF.
    pub fn open_vf(
        root: &SysfsRoot,
        address: PciAddress,
        token: VfToken,
    ) -> Result<Arc<VfioDevice>, VfioError> {
        let container = Container::new()?;
        Self::open_with(root, address, &container, Some(token))
    }

    /// [`open_in`](Self::open_in) with a VF token (for a VF whose PF is bound to vfio-pci;
    /// `None`: no token, as `open_in`). VFs can share their PF's container: then one IOVA
    /// space serves the PF and all its VFs.
    pub fn open_in_with_token(
        root: &SysfsRoot,
        address: PciAddress,
        container: &Arc<Container>,
        token: Option<VfToken>,
    ) -> Result<Arc<VfioDevice>, VfioError> {
        Self::open_with(root, address, container, token)
    }

    fn open_with(
        root: &SysfsRoot,
        address: PciAddress,
        container: &Arc<Container>,
        token: Option<VfToken>,
    ) -> Result<Arc<VfioDevice>, VfioError> {
        // Held from before the fd exists until after it is closed; a VF's PF with it (its
        // `physfn` link is gone by the time the VF's removal asks us to let go).
        let held = HeldOpen::with_physfn(address, physfn(root, address));
        // The sysfs directory's identity, for registry marks (a stat: takes no device lock).
        let identity = DeviceIdentity::of(&root.device_dir(address)).ok();
        let (fd, group) = container.open_device(root, address, token)?;
        let info = sys::device_get_info(fd.as_fd()).map_err(ioctl_err(
            "VFIO_DEVICE_GET_INFO",
            Some(address),
            None,
        ))?;
        let mut regions = Vec::with_capacity(info.num_regions as usize);
        for index in 0..info.num_regions {
            regions.push(match sys::device_get_region_info(fd.as_fd(), index) {
                Ok(buf) => Ok(parse_region_info(&buf)?),
                Err(e) => Err(e.raw_os_error().unwrap_or(nix::libc::EIO)),
            });
        }
        let config = match regions.get(CONFIG_REGION as usize) {
            Some(Ok(r)) if r.size > 0 => r.clone(),
            other => {
                return Err(VfioError::NoRegion {
                    address,
                    region: CONFIG_REGION,
                    source: match other {
                        Some(Err(e)) => Some(io::Error::from_raw_os_error(*e)),
                        _ => None,
                    },
                });
            }
        };
        Ok(Arc::new(VfioDevice {
            address,
            file: File::from(fd),
            quarantine: Mutex::new(None),
            num_regions: info.num_regions,
            num_irqs: info.num_irqs,
            regions,
            config,
            mapped: Mutex::new(Mappings::default()),
            irqs: Mutex::new(irqs::IrqState::default()),
            revoked: AtomicBool::new(false),
            identity,
            group,
            container: Arc::clone(container),
            _held: held,
        }))
    }

    /// The device's address.
    pub fn address(&self) -> PciAddress {
        self.address
    }

    /// Holds its container's IOVAs back from reuse ([`Container::quarantine_iovas`]) until
    /// the device is closed — its last handle dropped, or [`revoke`](Self::revoke)
    /// closing it — after which vfio-pci has disabled it (bus mastering off). For a
    /// removal while the device's DMA may be in flight: buffers freed meanwhile are
    /// unmapped, and their IOVAs are not mapped again under a late write. Idempotent.
    pub fn quarantine_iovas(&self) {
        let mut q = self.quarantine.lock();
        if q.is_none() {
            *q = Some(self.container.quarantine_iovas());
        }
    }

    /// The container it is attached to.
    pub fn container(&self) -> &Arc<Container> {
        &self.container
    }
    /// Its IOMMU group, for the group backend (`None` when it was opened through
    /// iommufd: the kernel still has the group, but this process holds no fd of it).
    pub fn group(&self) -> Option<&Arc<Group>> {
        self.group.as_ref()
    }

    /// The backend that opened it (its container's).
    pub fn backend(&self) -> VfioBackend {
        self.container.backend()
    }
    /// How many regions VFIO reports.
    pub fn num_regions(&self) -> u32 {
        self.num_regions
    }
    /// How many interrupt indexes VFIO reports.
    pub fn num_irqs(&self) -> u32 {
        self.num_irqs
    }
    /// The identity of the device's sysfs directory at open, if it could be read.
    pub fn identity(&self) -> Option<DeviceIdentity> {
        self.identity
    }

    /// What `VFIO_DEVICE_GET_REGION_INFO` said about region `index` at open.
    pub fn region(&self, index: u32) -> Result<&RegionInfo, VfioError> {
        match self.regions.get(index as usize) {
            Some(Ok(r)) => Ok(r),
            Some(Err(errno)) => Err(VfioError::NoRegion {
                address: self.address,
                region: index,
                source: Some(io::Error::from_raw_os_error(*errno)),
            }),
            None => Err(VfioError::NoRegion {
                address: self.address,
                region: index,
                source: None,
            }),
        }
    }

    /// `VFIO_DEVICE_GET_IRQ_INFO` for `index`.
    pub fn irq_info(&self, index: u32) -> Result<IrqInfo, VfioError> {
        self.live()?;
        let info = sys::device_get_irq_info(self.file.as_fd(), index).map_err(ioctl_err(
            "VFIO_DEVICE_GET_IRQ_INFO",
            Some(self.address),
            Some(index.into()),
        ))?;
        Ok(IrqInfo {
            index,
            flags: irq::InfoFlags::from_bits_retain(info.flags),
            count: info.count,
        })
    }

    /// Reads config space at `offset` into `buf`. VFIO reads config space without taking
    /// the device lock, so this is safe to call while a removal of the device is pending.
    pub fn read_config(&self, offset: u64, buf: &mut [u8]) -> Result<(), VfioError> {
        self.region_read(&self.config, offset, buf)
    }

    /// Writes `buf` to config space at `offset`.
    ///
    /// A write that clears Memory Space Enable (Command register, offset 4, bit 1) while
    /// [`MappedBar`]s of this device are alive is refused
    /// ([`VfioError::MemorySpaceInUse`]): the next access through a mapping would raise
    /// SIGBUS. Drop the mappings first, or use
    /// [`disable_memory_space`](Self::disable_memory_space).
    pub fn write_config(&self, offset: u64, buf: &[u8]) -> Result<(), VfioError> {
        if clears_memory_space(offset, buf) {
            let mapped = self.mapped.lock();
            if mapped.bars > 0 {
                return Err(VfioError::MemorySpaceInUse {
                    address: self.address,
                    mapped_bars: mapped.bars,
                });
            }
            // Held across the write: no mapping can appear before it lands.
            return self.region_write(&self.config, offset, buf);
        }
        self.region_write(&self.config, offset, buf)
    }

    /// Clears Memory Space Enable in the Command register, the explicit way to turn off
    /// the device's BARs (before a BAR resize, or to quiesce a device). Refused with
    /// [`VfioError::MemorySpaceInUse`] while a [`MappedBar`] of the device lives; no BAR
    /// can be mapped while the read-modify-write is in progress. Turn it back on by
    /// writing the Command register with the bit set ([`COMMAND_MEMORY`]).
    pub fn disable_memory_space(&self) -> Result<(), VfioError> {
        let mapped = self.mapped.lock();
        if mapped.bars > 0 {
            return Err(VfioError::MemorySpaceInUse {
                address: self.address,
                mapped_bars: mapped.bars,
            });
        }
        let mut cmd = [0u8; 2];
        self.region_read(&self.config, COMMAND, &mut cmd)?;
        let cmd = u16::from_le_bytes(cmd) & !COMMAND_MEMORY;
        self.region_write(&self.config, COMMAND, &cmd.to_le_bytes())
    }

    /// How many [`MappedBar`]s of this device are alive.
    pub fn mapped_bars(&self) -> usize {
        self.mapped.lock().bars
    }

    /// The whole config space as VFIO presents it (256 or 4096 bytes).
    pub fn config(&self) -> Result<Vec<u8>, VfioError> {
        let mut buf = vec![0u8; self.config.size.min(4096) as usize];
        self.region_read(&self.config, 0, &mut buf)?;
        Ok(buf)
    }

    /// Offset of standard capability `id` in config space.
    pub fn find_capability(&self, id: u8) -> Result<Option<u8>, VfioError> {
        Ok(config::find_capability(&self.config()?, id))
    }

    /// Offset of extended capability `id` in config space.
    pub fn find_extended_capability(&self, id: u16) -> Result<Option<u16>, VfioError> {
        Ok(config::find_extended_capability(&self.config()?, id))
    }

    /// The SR-IOV capability's registers, from config space: `None` when the device has
    /// none. What `sriov_numvfs` and `sriov_totalvfs` say, without the device lock that
    /// reading `sriov_numvfs` takes (see the exit rule in the [module docs](self)).
    pub fn sriov(&self) -> Result<Option<SriovCapability>, VfioError> {
        config::sriov_capability(&self.config()?)
            .transpose()
            .map_err(|source| VfioError::Config {
                address: self.address,
                source,
            })
    }

    /// NumVFs (SR-IOV capability +0x10): the VFs enabled now, as `sriov_numvfs` reports.
    pub fn sriov_num_vfs(&self) -> Result<Option<u16>, VfioError> {
        Ok(self.sriov()?.map(|s| s.num_vfs))
    }

    /// TotalVFs (SR-IOV capability +0x0e): as `sriov_totalvfs` reports.
    pub fn sriov_total_vfs(&self) -> Result<Option<u16>, VfioError> {
        Ok(self.sriov()?.map(|s| s.total_vfs))
    }

    /// The MSI-X table size (Message Control bits 10:0, plus one): `None` without an MSI-X
    /// capability. The vectors a function has, which a driver wanted from
    /// `sriov_vf_total_msix` and the like, read without the device lock.
    pub fn msix_table_size(&self) -> Result<Option<u16>, VfioError> {
        Ok(msix_table_size(&self.config()?))
    }

    fn region_read(&self, region: &RegionInfo, offset: u64, buf: &mut [u8]) -> Result<(), VfioError> {
        self.live()?;
        self.check(region, offset, buf.len())?;
        self.file
            .read_exact_at(buf, region.offset + offset)
            .map_err(|source| VfioError::Access {
                address: self.address,
                region: region.index,
                offset,
                len: buf.len(),
                write: false,
                source,
            })
    }

    fn region_write(&self, region: &RegionInfo, offset: u64, buf: &[u8]) -> Result<(), VfioError> {
        self.live()?;
        self.check(region, offset, buf.len())?;
        self.file
            .write_all_at(buf, region.offset + offset)
            .map_err(|source| VfioError::Access {
                address: self.address,
                region: region.index,
                offset,
                len: buf.len(),
                write: true,
                source,
            })
    }

    // Fails once the device is revoked: its fd no longer refers to it.
    fn live(&self) -> Result<(), VfioError> {
        if self.revoked.load(Ordering::Acquire) {
            return Err(VfioError::Revoked {
                address: self.address,
            });
        }
        Ok(())
    }

    fn check(&self, region: &RegionInfo, offset: u64, len: usize) -> Result<(), VfioError> {
        if offset.checked_add(len as u64).is_none_or(|end| end > region.size) {
            return Err(VfioError::OutOfRange {
                address: self.address,
                region: region.index,
                offset,
                len,
            });
        }
        Ok(())
    }

    /// Sets the VF token of this PF (`VFIO_DEVICE_FEATURE`, `SET | PCI_VF_TOKEN`): the
    /// UUID that the users of its VFs must present to open them ([`open_vf`](Self::open_vf)).
    /// Set it before the VFs are opened; while VFs are open the kernel keeps the token and
    /// asks it of a new opener of the PF too. Fails (ENOTTY) on a device without SR-IOV.
    pub fn set_vf_token(&self, token: VfToken) -> Result<(), VfioError> {
        self.live()?;
        sys::device_set_vf_token(self.file.as_fd(), token.to_bytes()).map_err(ioctl_err(
            "VFIO_DEVICE_FEATURE (SET PCI_VF_TOKEN)",
            Some(self.address),
            None,
        ))
    }

    /// `VFIO_DEVICE_RESET`.
    pub fn reset(&self) -> Result<(), VfioError> {
        self.live()?;
        sys::device_reset(self.file.as_fd()).map_err(ioctl_err("VFIO_DEVICE_RESET", Some(self.address), None))
    }

    /// Routes MSI-X vectors 0..fds.len() to these eventfds, in one call (6.1 cannot grow
    /// MSI-X once enabled).
    pub fn enable_msix(&self, fds: &[BorrowedFd<'_>]) -> Result<(), VfioError> {
        self.set_irq_eventfds(irq::MSIX, fds)
    }

    /// Disables interrupt `index`; nothing if it is not enabled.
    pub fn disable_irq(&self, index: u32) -> Result<(), VfioError> {
        self.set_irq_eventfds(index, &[])
    }

    /// Routes interrupt index `index` to these eventfds (none: disables it). One of INTx,
    /// MSI and MSI-X can be enabled at a time ([`VfioError::IrqBusy`]); see
    /// [`set_irq_eventfds_from`](Self::set_irq_eventfds_from).
    pub fn set_irq_eventfds(&self, index: u32, fds: &[BorrowedFd<'_>]) -> Result<(), VfioError> {
        self.set_irq_eventfds_from(index, 0, fds)
    }

    /// Registers an eventfd (non-blocking, close-on-exec) for the device request (REQ)
    /// interrupt: the kernel signals it when it wants the device back (removal, unbind),
    /// and then waits, holding the device lock, until this process closes the device. It
    /// signals again every 10 s while it waits, and never gives up.
    ///
    /// Poll it with [`poll_request`](Self::poll_request) (or put it in an epoll set: it
    /// implements `AsFd`); on a request, drop every handle to the device promptly.
    ///
    /// # Dropping
    ///
    /// The eventfd is the caller's: dropping it closes it, but the kernel keeps its own
    /// reference until the device closes or the REQ index is disabled
    /// ([`disable_irq`](Self::disable_irq)`(irq::REQ)`). It may be dropped before or
    /// after the device. Dropping it does not answer a request: only closing the device
    /// does.
    ///
    /// # Process exit
    ///
    /// A request that nobody polls is answered at exit, when the device fd closes: the
    /// removal then completes, unless a thread of this process is stuck in a read of the
    /// device's blocking attributes (see the exit rule in the [module docs](self)).
    pub fn request_eventfd(&self) -> Result<EventFd, VfioError> {
        let efd = EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
            .map_err(|e| VfioError::Eventfd(e.into()))?;
        self.set_irq_eventfds(irq::REQ, &[efd.as_fd()])?;
        Ok(efd)
    }

    /// Checks the REQ eventfd without blocking; on a request, marks the device in
    /// `registry` with the identity of its sysfs directory at open (so scans keep away
    /// from its blocking attributes, and a device re-added at the same address does not
    /// inherit the mark) and returns true. The caller must then drop the device promptly.
    pub fn poll_request(&self, efd: &EventFd, registry: &RemovalRegistry) -> bool {
        match efd.read() {
            Ok(n) if n > 0 => {
                match self.identity {
                    Some(identity) => registry.mark_device(self.address, identity, Reason::RemovalRequested),
                    None => registry.mark(self.address, Reason::RemovalRequested),
                };
                true
            }
            _ => false,
        }
    }
}

/// Whether writing `buf` at config `offset` clears Memory Space Enable: the write covers
/// the low byte of the Command register and has bit 1 clear there.
fn clears_memory_space(offset: u64, buf: &[u8]) -> bool {
    offset <= COMMAND
        && COMMAND < offset.saturating_add(buf.len() as u64)
        && buf[(COMMAND - offset) as usize] & COMMAND_MEMORY as u8 == 0
}

/// The MSI-X table size from config space bytes: Message Control (capability + 2) bits
/// 10:0, plus one.
fn msix_table_size(config_bytes: &[u8]) -> Option<u16> {
    let cap = usize::from(config::find_capability(config_bytes, config::cap_id::MSIX)?);
    let mc = config_bytes.get(cap + 2..cap + 4)?;
    Some((u16::from_le_bytes([mc[0], mc[1]]) & 0x7ff) + 1)
}

/// The vfio character device path of a group.
pub fn group_path(number: u32) -> PathBuf {
    PathBuf::from(format!("/dev/vfio/{number}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    // d8-hot-reset-shared: another process holds the other function of the group.
    #[test]
    fn a_busy_group_names_who_has_it() {
        let vmtest = || OtherProcess {
            pid: 812,
            command: Some("pcibus-vmtest".into()),
        };
        let e = VfioError::OpenGroup {
            group: 8,
            open_in: vec![vmtest()],
            claimed: vec![("0000:02:00.1".parse().unwrap(), vmtest())],
            source: io::Error::from_raw_os_error(nix::libc::EBUSY),
        };
        assert_eq!(
            e.to_string(),
            "cannot open /dev/vfio/8: the group is in use by another process (or another container of this one); \
             open in PID 812 (pcibus-vmtest); its devices claimed: 0000:02:00.1 by PID 812 (pcibus-vmtest)"
        );
        let e = VfioError::OpenGroup {
            group: 8,
            open_in: Vec::new(),
            claimed: Vec::new(),
            source: io::Error::from_raw_os_error(nix::libc::ENOENT),
        };
        assert_eq!(
            e.to_string(),
            "cannot open /dev/vfio/8 (is the device bound to vfio-pci?)"
        );
    }

    #[test]
    fn irq_info_flags_are_typed() {
        // vfio-pci's INTx: eventfd, maskable, automasked; MSI: eventfd, noresize.
        let intx = irq::InfoFlags::from_bits_retain(0x7);
        assert!(intx.contains(irq::InfoFlags::MASKABLE | irq::InfoFlags::AUTOMASKED));
        assert!(!intx.contains(irq::InfoFlags::NORESIZE));
        assert_eq!(format!("{intx:?}"), "InfoFlags(EVENTFD | MASKABLE | AUTOMASKED)");
        let unknown = irq::InfoFlags::from_bits_retain(0x9 | 1 << 16);
        assert_eq!(unknown.bits(), 0x9 | 1 << 16);
        assert_eq!(format!("{unknown:?}"), "InfoFlags(EVENTFD | NORESIZE | 0x10000)");
    }

    #[test]
    fn only_writes_clearing_memory_enable_are_caught() {
        // Command low byte at offset 4; bit 1 is Memory Space Enable.
        assert!(clears_memory_space(4, &[0x04]), "bus master only");
        assert!(clears_memory_space(4, &[0x00, 0x00]));
        assert!(
            clears_memory_space(0, &[0x86, 0x80, 0x10, 0x00, 0x05, 0x00]),
            "a header write"
        );
        assert!(clears_memory_space(3, &[0xff, 0x00]));
        assert!(!clears_memory_space(4, &[0x06]), "memory and bus master on");
        assert!(!clears_memory_space(4, &[0x02, 0x00]));
        assert!(!clears_memory_space(5, &[0x00]), "the Command high byte");
        assert!(
            !clears_memory_space(0, &[0x00; 4]),
            "ends before the Command register"
        );
        assert!(!clears_memory_space(6, &[0x00; 2]), "the Status register");
        assert!(!clears_memory_space(4, &[]));
        assert!(!clears_memory_space(u64::MAX, &[0x00]));
    }

    fn with_cap(bytes: &mut [u8], at: usize, id: u8, next: u8) {
        bytes[at] = id;
        bytes[at + 1] = next;
    }

    #[test]
    fn msix_table_size_from_message_control() {
        let mut cfg = vec![0u8; 256];
        cfg[0..4].copy_from_slice(&[0x36, 0x1b, 0x10, 0x00]); // vendor, device
        cfg[6] = 0x10; // Status: capability list
        cfg[0x34] = 0x40;
        with_cap(&mut cfg, 0x40, config::cap_id::PM, 0x60);
        with_cap(&mut cfg, 0x60, config::cap_id::MSIX, 0);
        // Message Control: enable (bit 15) and table size 65 - 1.
        cfg[0x62..0x64].copy_from_slice(&(0x8000u16 | 64).to_le_bytes());
        assert_eq!(msix_table_size(&cfg), Some(65));
        cfg[0x62..0x64].copy_from_slice(&0x07ffu16.to_le_bytes());
        assert_eq!(msix_table_size(&cfg), Some(2048));
        with_cap(&mut cfg, 0x40, config::cap_id::PM, 0);
        assert_eq!(msix_table_size(&cfg), None, "no MSI-X capability");
    }

    #[test]
    fn groups_are_opened_once_and_kept() {
        let opens = Cell::new(0);
        let open = |n: u32| {
            opens.set(opens.get() + 1);
            Ok(Arc::new(n))
        };
        let alive = |_: &u32| true;
        let mut table = GroupTable::<u32>::default();
        let a = table.get_or_open(5, alive, || open(5)).unwrap();
        let b = table.get_or_open(5, alive, || open(5)).unwrap();
        assert!(Arc::ptr_eq(&a, &b), "two functions of group 5 share one open");
        assert_eq!(opens.get(), 1);
        let c = table.get_or_open(7, alive, || open(7)).unwrap();
        assert_eq!((opens.get(), table.live()), (2, vec![5, 7]));
        // Kept while the container lives, even when no device holds it: the IOMMU
        // mappings of the container need one attached group.
        drop((a, b, c));
        assert_eq!(table.live(), vec![5, 7]);
        let d = table.get_or_open(5, alive, || open(5)).unwrap();
        assert_eq!((opens.get(), *d), (2, 5), "not opened again");
        // A failed open leaves nothing behind.
        let e = table.get_or_open(9, alive, || Err(VfioError::NoGroupAttached));
        assert!(e.is_err() && table.live() == vec![5, 7]);
    }

    // The kernel detaches a group whose last device was removed, and may give its number
    // to the next group: a device re-added with that number gets a new open, not the
    // dead group; dead groups are forgotten, live ones kept.
    #[test]
    fn dead_groups_are_forgotten_and_their_numbers_opened_afresh() {
        let dead = std::cell::RefCell::new(Vec::<u32>::new());
        let opens = Cell::new(0);
        // A group is its number plus 100 × the open that made it, so opens differ.
        let open = |n: u32| {
            opens.set(opens.get() + 1);
            Ok(Arc::new(n + 100 * opens.get()))
        };
        let alive = |g: &u32| !dead.borrow().contains(g);
        let mut table = GroupTable::<u32>::default();
        let held = table.get_or_open(5, alive, || open(5)).unwrap();
        let other = table.get_or_open(7, alive, || open(7)).unwrap();
        assert_eq!((*held, *other), (105, 207));
        // Group 5's device is removed: the kernel detaches it, and 5 comes back as a new
        // group (the device re-added, or another).
        *dead.borrow_mut() = vec![105];
        let again = table.get_or_open(5, alive, || open(5)).unwrap();
        assert_eq!(*again, 305, "opened afresh");
        assert!(!Arc::ptr_eq(&held, &again));
        assert_eq!(table.live(), vec![5, 7]);
        // The live group 7 was not opened again.
        assert!(Arc::ptr_eq(
            &table.get_or_open(7, alive, || open(7)).unwrap(),
            &other
        ));
        // A dead group whose number nobody asks for is forgotten at the next lookup.
        *dead.borrow_mut() = vec![207];
        table.forget_dead(alive);
        assert_eq!(table.live(), vec![5]);
        assert_eq!(opens.get(), 3);
    }

    #[test]
    fn vf_tokens_print_and_parse_as_uuids() {
        let t = VfToken::from_bytes([
            0xbd, 0x8d, 0x9d, 0x2b, 0x5a, 0x5f, 0x4f, 0x5a, 0xa2, 0x11, 0xf5, 0x91, 0x51, 0x4b, 0xa1, 0xf3,
        ]);
        assert_eq!(t.to_string(), "bd8d9d2b-5a5f-4f5a-a211-f591514ba1f3");
        assert_eq!("BD8D9D2B-5A5F-4F5A-A211-F591514BA1F3".parse::<VfToken>(), Ok(t));
        for bad in [
            "",
            "bd8d9d2b5a5f4f5aa211f591514ba1f3",
            "bd8d9d2b-5a5f-4f5a-a211-f591514ba1f",
            "bd8d9d2b-5a5f-4f5a-a211-f591514ba1fg",
            "bd8d9d2b+5a5f-4f5a-a211-f591514ba1f3",
            "bd8d9d2b-5a5f-4f5a-a211-f591514ba1é",
        ] {
            assert!(bad.parse::<VfToken>().is_err(), "{bad:?}");
        }
        let g = VfToken::generate().unwrap();
        assert_eq!(g.to_string().parse::<VfToken>(), Ok(g));
        assert_eq!(g.to_bytes()[6] >> 4, 4, "version 4");
        assert_eq!(g.to_bytes()[8] >> 6, 2, "RFC 4122 variant");
        assert_ne!(g, VfToken::generate().unwrap());
    }

    #[test]
    fn vf_token_refusals_name_the_problem() {
        let root = SysfsRoot::new("/nonexistent");
        let vf: PciAddress = "0000:01:00.1".parse().unwrap();
        let refused = |errno| {
            ioctl_err("VFIO_GROUP_GET_DEVICE_FD", Some(vf), Some(3))(io::Error::from_raw_os_error(errno))
        };
        let t = VfToken::from_bytes([1; 16]);
        let e = vf_token_error(&root, vf, None, refused(nix::libc::EACCES));
        assert!(matches!(
            e,
            VfioError::VfToken {
                problem: VfTokenProblem::Missing,
                ..
            }
        ));
        assert!(e.to_string().contains("needs the VF token"), "{e}");
        let e = vf_token_error(&root, vf, Some(t), refused(nix::libc::EACCES));
        assert!(
            matches!(
                e,
                VfioError::VfToken {
                    problem: VfTokenProblem::Wrong,
                    ..
                }
            ),
            "{e}"
        );
        let e = vf_token_error(&root, vf, Some(t), refused(nix::libc::EINVAL));
        assert!(
            matches!(
                e,
                VfioError::VfToken {
                    problem: VfTokenProblem::NotExpected,
                    ..
                }
            ),
            "{e}"
        );
        let e = vf_token_error(&root, vf, None, refused(nix::libc::EINVAL));
        assert!(
            matches!(e, VfioError::Ioctl { .. }),
            "EINVAL without a token is not about tokens"
        );
    }

    #[test]
    fn errors_keep_the_kernel_error() {
        use std::error::Error;
        let e = ioctl_err("VFIO_DEVICE_GET_IRQ_INFO", "0000:01:00.0".parse().ok(), Some(4))(
            io::Error::from_raw_os_error(nix::libc::EINVAL),
        );
        assert_eq!(
            e.to_string(),
            "VFIO_DEVICE_GET_IRQ_INFO (0x4) failed on 0000:01:00.0"
        );
        let source = e.source().and_then(|s| s.downcast_ref::<io::Error>()).unwrap();
        assert_eq!(source.raw_os_error(), Some(nix::libc::EINVAL));
    }
}
