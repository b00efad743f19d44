//! VFIO: drive a PCI device from userspace, safely.
//!
//! A [`Container`] is an IOMMU address space (type1v2); a [`Group`] is the IOMMU group a
//! device sits in, attached to a container; a [`VfioDevice`] is the device fd, through
//! which its regions (BARs, config space) are read, written and mapped, and its interrupts
//! routed to eventfds. [`DmaBuffer`]s are mapped into the container at IOVAs taken from
//! the ranges the IOMMU reports.
//!
//! ```no_run
//! use pcibus::{PciAddress, SysfsRoot, vfio::VfioDevice};
//! let addr: PciAddress = "0000:01:00.0".parse()?;
//! let dev = VfioDevice::open(&SysfsRoot::new("/sys"), addr)?;
//! let bar0 = dev.map_bar(0)?;
//! let cap = bar0.read64(0)?; // NVMe CAP
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod caps;
mod dma;
mod mmio;
mod sys;

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;

use nix::sys::eventfd::{EfdFlags, EventFd};
use parking_lot::Mutex;

pub use caps::{InfoError, IommuInfo, RegionInfo, parse_iommu_info, parse_region_info, region_flags};
pub use dma::{DmaBuffer, HUGE_PAGE, IovaAllocator, PAGE, Scalar};

use crate::removal::registry::{Reason, RemovalRegistry};
use crate::sysfs::scan::SysfsRoot;
use crate::{PciAddress, config};

/// Region index of PCI config space.
pub const CONFIG_REGION: u32 = 7;
/// Region index of the expansion ROM.
pub const ROM_REGION: u32 = 6;

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
}

/// What went wrong in the vfio layer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VfioError {
    /// `/dev/vfio/vfio` could not be opened.
    #[error("cannot open /dev/vfio/vfio (is the vfio module loaded? modprobe vfio-pci)")]
    NoVfio(#[source] io::Error),
    /// The kernel lacks the type1v2 IOMMU backend.
    #[error(
        "the kernel offers no VFIO type1v2 IOMMU (modprobe vfio_iommu_type1; is the IOMMU on: intel_iommu=on?)"
    )]
    NoType1,
    /// The device has no IOMMU group.
    #[error(
        "{0} has no IOMMU group: the IOMMU is off or does not cover it (boot with intel_iommu=on or amd_iommu=on)"
    )]
    NoIommuGroup(PciAddress),
    /// The group holds devices bound to host drivers.
    #[error("IOMMU group {group} is not viable: {} must be bound to vfio-pci or unbound", culprits(.devices))]
    NotViable {
        /// The group.
        group: u32,
        /// Devices of the group not on a vfio driver, with their drivers.
        devices: Vec<(String, Option<String>)>,
    },
    /// Pinning DMA memory failed: the memlock limit is the usual cause.
    #[error(
        "cannot map {size} bytes for DMA: pinning the pages failed (RLIMIT_MEMLOCK is {limit}; raise it with `ulimit -l` or run as root)"
    )]
    Memlock {
        /// Bytes asked for.
        size: u64,
        /// The soft limit, in bytes, or "unlimited".
        limit: String,
        /// The kernel's error.
        #[source]
        source: io::Error,
    },
    /// No IOVA space left in the ranges the IOMMU reports.
    #[error("no IOVA range of {size} bytes left in the IOMMU's ranges")]
    IovaExhausted {
        /// Bytes asked for.
        size: u64,
    },
    /// An access outside a region or a mapped area, or misaligned.
    #[error("{what}: offset {offset:#x} is outside or misaligned")]
    OutOfRange {
        /// Which region.
        what: String,
        /// The offset.
        offset: u64,
    },
    /// A VFIO info structure did not decode.
    #[error(transparent)]
    Info(#[from] InfoError),
    /// A system call failed.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        #[source]
        source: io::Error,
    },
}

fn culprits(devices: &[(String, Option<String>)]) -> String {
    devices
        .iter()
        .map(|(a, d)| format!("{a} (driver {})", d.as_deref().unwrap_or("none")))
        .collect::<Vec<_>>()
        .join(", ")
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> VfioError {
    let what = what.into();
    move |source| VfioError::Io { what, source }
}

/// A VFIO container: one IOMMU address space, type1v2.
#[derive(Debug)]
pub struct Container {
    fd: OwnedFd,
    // Filled when the first group is attached (the IOMMU type can be set only then).
    iommu: Mutex<Option<(IommuInfo, IovaAllocator)>>,
}

impl AsFd for Container {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl Container {
    /// Opens `/dev/vfio/vfio` and checks the API version and type1v2 support.
    pub fn new() -> Result<Arc<Container>, VfioError> {
        let file = File::options()
            .read(true)
            .write(true)
            .open("/dev/vfio/vfio")
            .map_err(VfioError::NoVfio)?;
        let fd = OwnedFd::from(file);
        let version =
            sys::ioctl_value(fd.as_fd(), sys::GET_API_VERSION, 0).map_err(io_err("VFIO_GET_API_VERSION"))?;
        if version != sys::API_VERSION {
            return Err(VfioError::Io {
                what: format!("VFIO API version {version}, expected {}", sys::API_VERSION),
                source: io::ErrorKind::Unsupported.into(),
            });
        }
        let has_type1 = sys::ioctl_value(fd.as_fd(), sys::CHECK_EXTENSION, sys::TYPE1V2_IOMMU)
            .map_err(io_err("VFIO_CHECK_EXTENSION"))?;
        if has_type1 != 1 {
            return Err(VfioError::NoType1);
        }
        Ok(Arc::new(Container {
            fd,
            iommu: Mutex::new(None),
        }))
    }

    /// Attaches `group` (sets the IOMMU type on the first one).
    pub fn attach(&self, group: &Group) -> Result<(), VfioError> {
        sys::group_set_container(group.fd.as_fd(), self.fd.as_fd())
            .map_err(io_err("VFIO_GROUP_SET_CONTAINER"))?;
        let mut iommu = self.iommu.lock();
        if iommu.is_none() {
            sys::ioctl_value(self.fd.as_fd(), sys::SET_IOMMU, sys::TYPE1V2_IOMMU)
                .map_err(io_err("VFIO_SET_IOMMU"))?;
            let mut header = [0u8; 24];
            header[..4].copy_from_slice(&24u32.to_ne_bytes());
            let buf = sys::ioctl_chain(self.fd.as_fd(), sys::IOMMU_GET_INFO, &header)
                .map_err(io_err("VFIO_IOMMU_GET_INFO"))?;
            let info = parse_iommu_info(&buf)?;
            let ranges = if info.iova_ranges.is_empty() {
                // Kernels before 5.4 report no ranges: stay below 39 bits, which every
                // IOMMU we know of covers.
                vec![0..=(1u64 << 39) - 1]
            } else {
                info.iova_ranges.clone()
            };
            *iommu = Some((info, IovaAllocator::new(&ranges)));
        }
        Ok(())
    }

    /// What the IOMMU reports (after the first group is attached).
    pub fn iommu_info(&self) -> Option<IommuInfo> {
        self.iommu.lock().as_ref().map(|(info, _)| info.clone())
    }

    /// Maps `buffer` for DMA at an IOVA allocated from the IOMMU's ranges. The mapping
    /// lives until [`Container::unmap`].
    pub fn map(&self, buffer: &DmaBuffer) -> Result<DmaMapping, VfioError> {
        let size = buffer.len() as u64;
        let mut iommu = self.iommu.lock();
        let (info, alloc) = iommu.as_mut().ok_or_else(|| VfioError::Io {
            what: "DMA map before any group was attached".into(),
            source: io::ErrorKind::NotConnected.into(),
        })?;
        let align = if buffer.is_huge() {
            HUGE_PAGE as u64
        } else {
            info.min_page_size()
        };
        let iova = alloc
            .alloc(size, align)
            .ok_or(VfioError::IovaExhausted { size })?;
        let mut map = sys::DmaMap {
            flags: sys::DMA_MAP_FLAG_READ | sys::DMA_MAP_FLAG_WRITE,
            vaddr: buffer.vaddr(),
            iova,
            size,
            ..Default::default()
        };
        if let Err(source) = sys::ioctl_struct(self.fd.as_fd(), sys::IOMMU_MAP_DMA, &mut map) {
            alloc.free(iova, size);
            return Err(match source.raw_os_error() {
                Some(nix::libc::ENOMEM) | Some(nix::libc::EPERM) => VfioError::Memlock {
                    size,
                    limit: memlock_limit(),
                    source,
                },
                _ => VfioError::Io {
                    what: format!("VFIO_IOMMU_MAP_DMA of {size} bytes at IOVA {iova:#x}"),
                    source,
                },
            });
        }
        Ok(DmaMapping { iova, size })
    }

    /// Unmaps a mapping made by [`Container::map`] and frees its IOVA range.
    pub fn unmap(&self, mapping: DmaMapping) -> Result<(), VfioError> {
        let mut unmap = sys::DmaUnmap {
            iova: mapping.iova,
            size: mapping.size,
            ..Default::default()
        };
        sys::ioctl_struct(self.fd.as_fd(), sys::IOMMU_UNMAP_DMA, &mut unmap).map_err(io_err(format!(
            "VFIO_IOMMU_UNMAP_DMA at IOVA {:#x}",
            mapping.iova
        )))?;
        if let Some((_, alloc)) = self.iommu.lock().as_mut() {
            alloc.free(mapping.iova, mapping.size);
        }
        Ok(())
    }
}

fn memlock_limit() -> String {
    match nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_MEMLOCK) {
        Ok((soft, _)) if soft == nix::sys::resource::RLIM_INFINITY => "unlimited".into(),
        Ok((soft, _)) => format!("{soft} bytes"),
        Err(_) => "unknown".into(),
    }
}

/// A buffer's place in the IOMMU address space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use = "an unmapped mapping leaks IOVA space and pinned memory"]
pub struct DmaMapping {
    /// The address the device uses.
    pub iova: u64,
    /// Bytes mapped.
    pub size: u64,
}

/// An IOMMU group (`/dev/vfio/N`).
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
    /// Opens group `number` and checks it is viable; a non-viable group's error names the
    /// devices (from `ROOT/kernel/iommu_groups/N/devices`) that are bound to host drivers.
    pub fn open(root: &SysfsRoot, number: u32) -> Result<Group, VfioError> {
        let path = format!("/dev/vfio/{number}");
        let file = File::options()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(io_err(format!("open {path} (is the device bound to vfio-pci?)")))?;
        let group = Group {
            fd: OwnedFd::from(file),
            number,
        };
        let mut status = sys::GroupStatus::default();
        sys::ioctl_struct(group.fd.as_fd(), sys::GROUP_GET_STATUS, &mut status)
            .map_err(io_err("VFIO_GROUP_GET_STATUS"))?;
        if status.flags & sys::GROUP_FLAGS_VIABLE == 0 {
            return Err(VfioError::NotViable {
                group: number,
                devices: non_vfio_members(root, number),
            });
        }
        Ok(group)
    }

    /// The group number.
    pub fn number(&self) -> u32 {
        self.number
    }

    /// The device fd of `address`, which must be in this group.
    pub fn device_fd(&self, address: PciAddress) -> Result<OwnedFd, VfioError> {
        sys::group_get_device_fd(self.fd.as_fd(), &address.to_string())
            .map_err(io_err(format!("VFIO_GROUP_GET_DEVICE_FD {address}")))
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
        let on_vfio = driver.as_deref().is_some_and(|d| d.starts_with("vfio"));
        if !on_vfio && driver.is_some() {
            out.push((name, driver));
        }
    }
    out.sort();
    out
}

/// The IOMMU group of `address`, from its `iommu_group` link.
pub fn iommu_group(root: &SysfsRoot, address: PciAddress) -> Result<u32, VfioError> {
    let link = root.device_dir(address).join("iommu_group");
    let target = std::fs::read_link(&link).map_err(|_| VfioError::NoIommuGroup(address))?;
    target
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.parse().ok())
        .ok_or(VfioError::NoIommuGroup(address))
}

/// Interrupt index facts (`VFIO_DEVICE_GET_IRQ_INFO`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IrqInfo {
    /// The index ([`irq`]).
    pub index: u32,
    /// `VFIO_IRQ_INFO_*` flags (1 eventfd, 2 maskable, 4 automasked, 8 noresize).
    pub flags: u32,
    /// Vectors.
    pub count: u32,
}

/// An open vfio-pci device.
#[derive(Debug)]
pub struct VfioDevice {
    address: PciAddress,
    file: File,
    num_regions: u32,
    num_irqs: u32,
    group: Group,
    container: Arc<Container>,
}

impl AsFd for VfioDevice {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

impl VfioDevice {
    /// Opens `address` in a new container: finds its group, checks viability, attaches,
    /// gets the device fd.
    pub fn open(root: &SysfsRoot, address: PciAddress) -> Result<VfioDevice, VfioError> {
        let container = Container::new()?;
        Self::open_in(root, address, container)
    }

    /// Opens `address` in an existing container (devices sharing one IOVA space).
    pub fn open_in(
        root: &SysfsRoot,
        address: PciAddress,
        container: Arc<Container>,
    ) -> Result<VfioDevice, VfioError> {
        let number = iommu_group(root, address)?;
        let group = Group::open(root, number)?;
        container.attach(&group)?;
        let fd = group.device_fd(address)?;
        let mut info = sys::DeviceInfo::default();
        sys::ioctl_struct(fd.as_fd(), sys::DEVICE_GET_INFO, &mut info)
            .map_err(io_err("VFIO_DEVICE_GET_INFO"))?;
        Ok(VfioDevice {
            address,
            file: File::from(fd),
            num_regions: info.num_regions,
            num_irqs: info.num_irqs,
            group,
            container,
        })
    }

    /// The device's address.
    pub fn address(&self) -> PciAddress {
        self.address
    }
    /// The container it is attached to.
    pub fn container(&self) -> &Arc<Container> {
        &self.container
    }
    /// Its IOMMU group.
    pub fn group(&self) -> &Group {
        &self.group
    }
    /// How many regions VFIO reports.
    pub fn num_regions(&self) -> u32 {
        self.num_regions
    }
    /// How many interrupt indexes VFIO reports.
    pub fn num_irqs(&self) -> u32 {
        self.num_irqs
    }

    /// `VFIO_DEVICE_GET_REGION_INFO` for `index`.
    pub fn region(&self, index: u32) -> Result<RegionInfo, VfioError> {
        let mut header = [0u8; 32];
        header[8..12].copy_from_slice(&index.to_ne_bytes());
        let buf = sys::ioctl_chain(self.file.as_fd(), sys::DEVICE_GET_REGION_INFO, &header)
            .map_err(io_err(format!("VFIO_DEVICE_GET_REGION_INFO {index}")))?;
        Ok(parse_region_info(&buf)?)
    }

    /// `VFIO_DEVICE_GET_IRQ_INFO` for `index`.
    pub fn irq_info(&self, index: u32) -> Result<IrqInfo, VfioError> {
        let mut info = sys::IrqInfo {
            index,
            ..Default::default()
        };
        sys::ioctl_struct(self.file.as_fd(), sys::DEVICE_GET_IRQ_INFO, &mut info)
            .map_err(io_err(format!("VFIO_DEVICE_GET_IRQ_INFO {index}")))?;
        Ok(IrqInfo {
            index,
            flags: info.flags,
            count: info.count,
        })
    }

    /// Reads config space at `offset` into `buf`.
    pub fn read_config(&self, offset: u64, buf: &mut [u8]) -> Result<(), VfioError> {
        let region = self.region(CONFIG_REGION)?;
        self.region_read(&region, offset, buf)
    }

    /// Writes `buf` to config space at `offset`.
    pub fn write_config(&self, offset: u64, buf: &[u8]) -> Result<(), VfioError> {
        let region = self.region(CONFIG_REGION)?;
        self.region_write(&region, offset, buf)
    }

    /// The whole config space as VFIO presents it (256 or 4096 bytes).
    pub fn config(&self) -> Result<Vec<u8>, VfioError> {
        let region = self.region(CONFIG_REGION)?;
        let mut buf = vec![0u8; region.size.min(4096) as usize];
        self.region_read(&region, 0, &mut buf)?;
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

    fn region_read(&self, region: &RegionInfo, offset: u64, buf: &mut [u8]) -> Result<(), VfioError> {
        self.check(region, offset, buf.len())?;
        self.file
            .read_exact_at(buf, region.offset + offset)
            .map_err(io_err(format!(
                "{}: read region {} at {offset:#x}",
                self.address, region.index
            )))
    }

    fn region_write(&self, region: &RegionInfo, offset: u64, buf: &[u8]) -> Result<(), VfioError> {
        self.check(region, offset, buf.len())?;
        self.file
            .write_all_at(buf, region.offset + offset)
            .map_err(io_err(format!(
                "{}: write region {} at {offset:#x}",
                self.address, region.index
            )))
    }

    fn check(&self, region: &RegionInfo, offset: u64, len: usize) -> Result<(), VfioError> {
        if offset.checked_add(len as u64).is_none_or(|end| end > region.size) {
            return Err(VfioError::OutOfRange {
                what: format!("{} region {}", self.address, region.index),
                offset,
            });
        }
        Ok(())
    }

    /// `VFIO_DEVICE_RESET`.
    pub fn reset(&self) -> Result<(), VfioError> {
        sys::ioctl_value(self.file.as_fd(), sys::DEVICE_RESET, 0)
            .map_err(io_err(format!("{}: VFIO_DEVICE_RESET", self.address)))?;
        Ok(())
    }

    /// Maps BAR `index`: the areas VFIO allows (sparse mmap), leaving the MSI-X table out
    /// unless the region says it is mappable. Accesses outside the mapped areas go through
    /// pread/pwrite on the device fd.
    pub fn map_bar(&self, index: u32) -> Result<Bar<'_>, VfioError> {
        let region = self.region(index)?;
        if region.size == 0 {
            return Err(VfioError::OutOfRange {
                what: format!("{} BAR{index} (not implemented)", self.address),
                offset: 0,
            });
        }
        let mut areas = Vec::new();
        for (offset, size) in region.mmap_areas() {
            let area =
                mmio::MmioArea::map(self.file.as_fd(), region.offset + offset, size as usize).map_err(
                    io_err(format!("{}: mmap BAR{index} at {offset:#x}", self.address)),
                )?;
            areas.push((offset, area));
        }
        Ok(Bar {
            device: self,
            region,
            areas,
        })
    }

    /// Routes MSI-X vectors 0..fds.len() to these eventfds, in one call (6.1 cannot grow
    /// MSI-X once enabled).
    pub fn enable_msix(&self, fds: &[BorrowedFd<'_>]) -> Result<(), VfioError> {
        self.set_irq_eventfds(irq::MSIX, fds)
    }

    /// Disables interrupt `index`.
    pub fn disable_irq(&self, index: u32) -> Result<(), VfioError> {
        sys::set_irqs_eventfds(self.file.as_fd(), index, 0, &[])
            .map_err(io_err(format!("{}: disable IRQ index {index}", self.address)))
    }

    /// Routes interrupt index `index` to these eventfds.
    pub fn set_irq_eventfds(&self, index: u32, fds: &[BorrowedFd<'_>]) -> Result<(), VfioError> {
        let raw: Vec<i32> = fds.iter().map(|f| f.as_raw_fd()).collect();
        sys::set_irqs_eventfds(self.file.as_fd(), index, 0, &raw).map_err(io_err(format!(
            "{}: route IRQ index {index} to {} eventfds",
            self.address,
            raw.len()
        )))
    }

    /// Registers an eventfd for the device request (REQ) interrupt: the kernel signals it
    /// when it wants the device back (removal, unbind) and waits, holding the device lock,
    /// until this process closes the device.
    pub fn request_eventfd(&self) -> Result<EventFd, VfioError> {
        let efd = EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
            .map_err(|e| io_err("eventfd")(e.into()))?;
        self.set_irq_eventfds(irq::REQ, &[efd.as_fd()])?;
        Ok(efd)
    }

    /// Checks the REQ eventfd without blocking; on a request, marks the device in
    /// `registry` (so scans keep away from its blocking attributes) and returns true. The
    /// caller must then close the device promptly.
    pub fn poll_request(&self, efd: &EventFd, registry: &RemovalRegistry) -> bool {
        match efd.read() {
            Ok(n) if n > 0 => {
                registry.mark(self.address, Reason::RemovalRequested);
                true
            }
            _ => false,
        }
    }
}

/// A mapped BAR.
#[derive(Debug)]
pub struct Bar<'d> {
    device: &'d VfioDevice,
    region: RegionInfo,
    areas: Vec<(u64, mmio::MmioArea)>,
}

impl Bar<'_> {
    /// The region facts.
    pub fn info(&self) -> &RegionInfo {
        &self.region
    }

    /// The mapped areas as (offset, size).
    pub fn mapped(&self) -> Vec<(u64, u64)> {
        self.areas.iter().map(|(o, a)| (*o, a.len() as u64)).collect()
    }

    fn area(&self, offset: u64) -> Option<(&mmio::MmioArea, usize)> {
        self.areas
            .iter()
            .find(|(o, a)| offset >= *o && offset - *o < a.len() as u64)
            .map(|(o, a)| (a, (offset - o) as usize))
    }

    fn oob(&self, offset: u64) -> VfioError {
        VfioError::OutOfRange {
            what: format!("{} BAR{}", self.device.address, self.region.index),
            offset,
        }
    }

    /// A 32-bit read (volatile when mapped, pread otherwise).
    pub fn read32(&self, offset: u64) -> Result<u32, VfioError> {
        if let Some((area, at)) = self.area(offset) {
            return area.read32(at).ok_or_else(|| self.oob(offset));
        }
        let mut b = [0u8; 4];
        self.device.region_read(&self.region, offset, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    /// A 32-bit write.
    pub fn write32(&self, offset: u64, value: u32) -> Result<(), VfioError> {
        if let Some((area, at)) = self.area(offset) {
            return area.write32(at, value).ok_or_else(|| self.oob(offset));
        }
        self.device
            .region_write(&self.region, offset, &value.to_le_bytes())
    }

    /// A 64-bit read.
    pub fn read64(&self, offset: u64) -> Result<u64, VfioError> {
        if let Some((area, at)) = self.area(offset) {
            return area.read64(at).ok_or_else(|| self.oob(offset));
        }
        let mut b = [0u8; 8];
        self.device.region_read(&self.region, offset, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    /// A 64-bit write.
    pub fn write64(&self, offset: u64, value: u64) -> Result<(), VfioError> {
        if let Some((area, at)) = self.area(offset) {
            return area.write64(at, value).ok_or_else(|| self.oob(offset));
        }
        self.device
            .region_write(&self.region, offset, &value.to_le_bytes())
    }
}

/// The vfio character device path of a group (for messages).
pub fn group_path(number: u32) -> PathBuf {
    PathBuf::from(format!("/dev/vfio/{number}"))
}
