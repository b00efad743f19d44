//! Resets of a VFIO device: the function reset (`VFIO_DEVICE_RESET`) with the method the
//! kernel uses for it, and the bus or slot hot reset (`VFIO_DEVICE_PCI_HOT_RESET`).
//!
//! # Function reset
//!
//! vfio-pci offers `VFIO_DEVICE_RESET` when the kernel has a reset method for the
//! function (`VFIO_DEVICE_FLAGS_RESET` in `VFIO_DEVICE_GET_INFO`). Which one it uses, in
//! order, is the device's sysfs `reset_method` (Linux 5.15 on): `flr` (PCI Express
//! Function Level Reset), `af_flr`, `pm` (D3hot and back), `bus` (a secondary bus reset,
//! offered only when the function is alone on its bus), and others. Its `show()` reads
//! the methods the kernel stored at enumeration and takes no lock (Linux 6.1
//! `drivers/pci/pci.c` `reset_method_show`; unchanged through 6.12, moved to
//! `pci-sysfs.c` later), so [`ResetInfo`] reads it even for a device this process holds.
//! The attribute exists only when the function has some reset method.
//!
//! # Hot reset
//!
//! A bus or slot reset resets every function below the bridge, so the kernel allows it
//! only to a user that owns all of them: `VFIO_DEVICE_GET_PCI_HOT_RESET_INFO` lists the
//! affected functions ([`HotResetInfo`]), each with its IOMMU group (group backend) or,
//! for a device opened through its iommufd cdev, its device id in that iommufd.
//! `VFIO_DEVICE_PCI_HOT_RESET` then takes a group fd of every affected group (group
//! backend: each must be open in this process; [`VfioDevice::hot_reset`] uses the groups
//! of the device's container), or no fds at all (iommufd, Linux 6.7 on: every affected
//! device must be bound to the same iommufd, or share an IOMMU group with one that is).
//! The kernel also resets a bus only when every device on it is bound to vfio-pci.
//!
//! [`VfioDevice::hot_reset`] checks all this first and refuses, resetting nothing, while
//! any affected device is not held by this process ([`VfioError::HotResetNotHeld`]);
//! [`VfioDevice::hot_reset_info`] says the same beforehand ([`HotResetInfo::not_held`]).
//! Each such device is named with who has it, as far as this process can tell
//! ([`HotResetBlocker`]): the pcibus claim on it (the claimant's PID and command), the
//! processes with its VFIO group or device file open (`/proc/PID/fd`: QEMU or DPDK too,
//! which take no claim), its driver when that is not vfio-pci.
//!
//! What the kernel answers when asked anyway (`EINVAL` on 6.1 and 6.12, measured by the
//! VM test `d8-hot-reset-shared` with `pcibus-vmtest kernel-hot-reset`): see
//! [`VfioDevice::hot_reset`].

use std::fmt;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::Path;
use std::sync::Arc;

use super::caps::InfoError;
use super::{Container, Group, Space, VfioBackend, VfioDevice, VfioError, ioctl_err, sys};
use crate::addr::PciAddress;
use crate::removal::claim::ClaimDir;
use crate::sysfs::scan::SysfsRoot;

/// One of the kernel's function reset methods, by its `reset_method` name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ResetMethod {
    /// A quirk of the device's (`device_specific`).
    DeviceSpecific,
    /// The platform's ACPI `_RST` (`acpi`).
    Acpi,
    /// PCI Express Function Level Reset (`flr`).
    Flr,
    /// Advanced Features FLR of a conventional PCI function (`af_flr`).
    AfFlr,
    /// D3hot and back to D0, for a function without No_Soft_Reset (`pm`).
    Pm,
    /// A secondary bus reset of the bridge above a function alone on its bus (`bus`).
    Bus,
    /// A CXL port's bus reset (`cxl_bus`, Linux 6.10 on).
    CxlBus,
    /// A name this crate does not know.
    Other(String),
}

impl ResetMethod {
    /// The method named `name` (as in `reset_method`).
    pub fn from_name(name: &str) -> ResetMethod {
        match name {
            "device_specific" => ResetMethod::DeviceSpecific,
            "acpi" => ResetMethod::Acpi,
            "flr" => ResetMethod::Flr,
            "af_flr" => ResetMethod::AfFlr,
            "pm" => ResetMethod::Pm,
            "bus" => ResetMethod::Bus,
            "cxl_bus" => ResetMethod::CxlBus,
            other => ResetMethod::Other(other.to_owned()),
        }
    }

    /// Its `reset_method` name.
    pub fn name(&self) -> &str {
        match self {
            ResetMethod::DeviceSpecific => "device_specific",
            ResetMethod::Acpi => "acpi",
            ResetMethod::Flr => "flr",
            ResetMethod::AfFlr => "af_flr",
            ResetMethod::Pm => "pm",
            ResetMethod::Bus => "bus",
            ResetMethod::CxlBus => "cxl_bus",
            ResetMethod::Other(name) => name,
        }
    }
}

impl fmt::Display for ResetMethod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The methods a `reset_method` attribute names, in the kernel's order. Linux separates
/// them with spaces (its first versions with commas: both are accepted); empty text is no
/// method. Never fails: an unknown name is [`ResetMethod::Other`].
pub fn parse_reset_methods(text: &str) -> Vec<ResetMethod> {
    text.split(|c: char| c.is_whitespace() || c == ',')
        .filter(|name| !name.is_empty())
        .map(ResetMethod::from_name)
        .collect()
}

/// Whether a device can be reset on its own, and how ([`VfioDevice::reset_info`],
/// [`DeviceBacking::reset_info`](crate::bus::DeviceBacking::reset_info)).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ResetInfo {
    /// Whether a function reset is available ([`DeviceBacking::reset`] can work): for VFIO,
    /// `VFIO_DEVICE_FLAGS_RESET`.
    ///
    /// [`DeviceBacking::reset`]: crate::bus::DeviceBacking::reset
    pub function_reset: bool,
    /// The methods the kernel tries, first to last (`reset_method`); empty: none.
    /// `None`: not known (a kernel before 5.15 has no `reset_method`, or it could not be
    /// read).
    pub methods: Option<Vec<ResetMethod>>,
}

impl ResetInfo {
    /// A device's reset info.
    pub fn new(function_reset: bool, methods: Option<Vec<ResetMethod>>) -> ResetInfo {
        ResetInfo {
            function_reset,
            methods,
        }
    }

    /// The method a function reset uses (the kernel's first), if known and there is one.
    pub fn method(&self) -> Option<&ResetMethod> {
        self.methods.as_ref()?.first()
    }
}

impl fmt::Display for ResetInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.function_reset {
            return f.write_str("no function reset");
        }
        match self.methods.as_deref() {
            Some([first, rest @ ..]) => {
                write!(f, "function reset by {first}")?;
                if !rest.is_empty() {
                    let rest: Vec<&str> = rest.iter().map(ResetMethod::name).collect();
                    write!(f, " (then {})", rest.join(", "))?;
                }
                Ok(())
            }
            Some([]) => f.write_str("function reset (the kernel names no method)"),
            None => f.write_str("function reset (method not known: no reset_method attribute)"),
        }
    }
}

/// Who holds a device a hot reset would reset, as the kernel says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HotResetOwner {
    /// Group backend: the device's IOMMU group. The reset needs that group open.
    Group(u32),
    /// iommufd: bound to the asking device's iommufd, with this device id.
    DevId(u32),
    /// iommufd: not bound, but owned through an IOMMU group shared with a bound device
    /// (`VFIO_PCI_DEVID_OWNED`).
    Owned,
    /// iommufd: not owned by the asking device's iommufd (`VFIO_PCI_DEVID_NOT_OWNED`).
    NotOwned,
}

/// One device a hot reset would reset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HotResetDevice {
    /// The device.
    pub address: PciAddress,
    /// Its group or device id.
    pub owner: HotResetOwner,
}

/// What `VFIO_DEVICE_GET_PCI_HOT_RESET_INFO` says: the devices a hot reset would reset
/// (the asking device among them); and, from [`VfioDevice::hot_reset_info`], which of
/// them this process does not hold, with who does.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct HotResetInfo {
    /// The affected devices, in the kernel's order.
    pub devices: Vec<HotResetDevice>,
    /// iommufd: whether every affected device is owned by the asking device's iommufd
    /// (`VFIO_PCI_HOT_RESET_FLAG_DEV_ID_OWNED`). `None` for the group backend, where the
    /// groups say it.
    pub all_owned: Option<bool>,
    /// The affected devices a hot reset by this process cannot take with it, in the
    /// kernel's order: while there is one, [`VfioDevice::hot_reset`] refuses. Empty in
    /// what [`parse_hot_reset_info`] decodes (the kernel does not say it).
    pub not_held: Vec<HotResetBlocker>,
}

impl HotResetInfo {
    /// Info listing `devices`, with `all_owned` as the kernel would say it, and no
    /// [`not_held`](Self::not_held) devices.
    pub fn new(devices: Vec<HotResetDevice>, all_owned: Option<bool>) -> HotResetInfo {
        HotResetInfo {
            devices,
            all_owned,
            not_held: Vec::new(),
        }
    }

    /// The same info with `not_held` as the devices this process does not hold.
    pub fn with_not_held(mut self, not_held: Vec<HotResetBlocker>) -> HotResetInfo {
        self.not_held = not_held;
        self
    }

    /// The affected devices other than `address`.
    pub fn others(&self, address: PciAddress) -> Vec<PciAddress> {
        self.devices
            .iter()
            .map(|d| d.address)
            .filter(|a| *a != address)
            .collect()
    }
}

bitflags::bitflags! {
    /// `vfio_pci_hot_reset_info.flags`.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    struct HotResetFlags: u32 {
        /// `VFIO_PCI_HOT_RESET_FLAG_DEV_ID`: entries carry device ids (the cdev path),
        /// not group numbers.
        const DEV_ID = 1 << 0;
        /// `VFIO_PCI_HOT_RESET_FLAG_DEV_ID_OWNED`: every affected device is owned by the
        /// caller's iommufd.
        const DEV_ID_OWNED = 1 << 1;
    }
}

// VFIO_PCI_DEVID_OWNED, _NOT_OWNED: the device ids of entries of no particular device.
const DEVID_OWNED: u32 = 0;
const DEVID_NOT_OWNED: u32 = u32::MAX;
const HEADER: usize = 12;
const ENTRY: usize = 8;

/// Decodes a `struct vfio_pci_hot_reset_info` and its entries (native byte order): a
/// 12-byte header (`argsz`, `flags`, `count`), then `count` entries of 8 bytes (`u32`
/// group id or device id, `u16` segment, `u8` bus, `u8` devfn). A buffer shorter than the
/// header or than `count` entries is an error; bytes after them are ignored.
pub fn parse_hot_reset_info(buf: &[u8]) -> Result<HotResetInfo, InfoError> {
    let bad = |problem| InfoError {
        what: "PCI hot reset",
        problem,
    };
    let u32_at = |at: usize| u32::from_ne_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]]);
    if buf.len() < HEADER {
        return Err(bad("shorter than its 12-byte header"));
    }
    let flags = HotResetFlags::from_bits_retain(u32_at(4));
    let count = u32_at(8) as usize;
    let end = count
        .checked_mul(ENTRY)
        .and_then(|n| n.checked_add(HEADER))
        .ok_or(bad("its device count overflows"))?;
    if buf.len() < end {
        return Err(bad("its device count runs past the buffer"));
    }
    let dev_id = flags.contains(HotResetFlags::DEV_ID);
    let devices = buf[HEADER..end]
        .chunks_exact(ENTRY)
        .map(|e| {
            let id = u32::from_ne_bytes([e[0], e[1], e[2], e[3]]);
            let segment = u16::from_ne_bytes([e[4], e[5]]);
            let (bus, devfn) = (e[6], e[7]);
            let owner = match (dev_id, id) {
                (false, group) => HotResetOwner::Group(group),
                (true, DEVID_OWNED) => HotResetOwner::Owned,
                (true, DEVID_NOT_OWNED) => HotResetOwner::NotOwned,
                (true, devid) => HotResetOwner::DevId(devid),
            };
            // devfn >> 3 is at most 31 and devfn & 7 at most 7: always an address.
            let address = PciAddress::new(u32::from(segment), bus, devfn >> 3, devfn & 7)
                .unwrap_or_else(|| unreachable!("devfn splits into a valid device and function"));
            HotResetDevice { address, owner }
        })
        .collect();
    Ok(HotResetInfo::new(
        devices,
        dev_id.then_some(flags.contains(HotResetFlags::DEV_ID_OWNED)),
    ))
}

/// Encodes `info` as the kernel would (the inverse of [`parse_hot_reset_info`] for
/// addresses in segments below 65536): for tests and emulations.
pub fn encode_hot_reset_info(info: &HotResetInfo) -> Vec<u8> {
    let mut flags = HotResetFlags::empty();
    if let Some(owned) = info.all_owned {
        flags |= HotResetFlags::DEV_ID;
        flags.set(HotResetFlags::DEV_ID_OWNED, owned);
    }
    let size = HEADER + ENTRY * info.devices.len();
    let mut buf = Vec::with_capacity(size);
    buf.extend_from_slice(&(size as u32).to_ne_bytes());
    buf.extend_from_slice(&flags.bits().to_ne_bytes());
    buf.extend_from_slice(&(info.devices.len() as u32).to_ne_bytes());
    for d in &info.devices {
        let id = match d.owner {
            HotResetOwner::Group(g) | HotResetOwner::DevId(g) => g,
            HotResetOwner::Owned => DEVID_OWNED,
            HotResetOwner::NotOwned => DEVID_NOT_OWNED,
        };
        buf.extend_from_slice(&id.to_ne_bytes());
        buf.extend_from_slice(&(d.address.domain() as u16).to_ne_bytes());
        buf.push(d.address.bus());
        buf.push(d.address.devfn());
    }
    buf
}

/// Addresses as a list for messages.
pub(crate) fn list(devices: &[PciAddress]) -> String {
    devices
        .iter()
        .map(PciAddress::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Another process, as this one sees it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct OtherProcess {
    /// Its PID.
    pub pid: u32,
    /// Its command (`/proc/PID/comm`, or the claim record's), if known.
    pub command: Option<String>,
}

impl fmt::Display for OtherProcess {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.command {
            Some(c) => write!(f, "PID {} ({c})", self.pid),
            None => write!(f, "PID {}", self.pid),
        }
    }
}

/// A device a hot reset would reset that this process cannot take with it: its IOMMU
/// group is not open here (group backend), it is not owned by this device's iommufd, or
/// it is not on vfio-pci (the kernel resets a bus only when every device on it is). With
/// who has it, as far as this process can tell: the pcibus claim on it, the processes that
/// have its VFIO group or device file open, its driver.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct HotResetBlocker {
    /// The device.
    pub address: PciAddress,
    /// The driver it is bound to (sysfs `driver`); `None`: none (or not readable).
    pub driver: Option<String>,
    /// Whether that driver is vfio-pci or one of its variants
    /// ([`on_vfio`](crate::sysfs::bind::on_vfio)).
    pub on_vfio: bool,
    /// The process whose live pcibus claim names the device
    /// ([`crate::removal::claim`]).
    pub claimed_by: Option<OtherProcess>,
    /// Other processes that have its VFIO group file (`/dev/vfio/N`) or device file
    /// (`/dev/vfio/devices/vfioN`) open, from `/proc/PID/fd`: also the users of VFIO that
    /// take no pcibus claim (QEMU, DPDK). Empty when none was seen (or `/proc` was not
    /// readable).
    pub open_in: Vec<OtherProcess>,
}

impl HotResetBlocker {
    /// `address`, bound to `driver` (`on_vfio`: a vfio driver), with no holder known.
    pub fn new(address: PciAddress, driver: Option<String>, on_vfio: bool) -> HotResetBlocker {
        HotResetBlocker {
            address,
            driver,
            on_vfio,
            claimed_by: None,
            open_in: Vec::new(),
        }
    }

    /// The same, claimed by `process`.
    pub fn claimed_by(mut self, process: OtherProcess) -> HotResetBlocker {
        self.claimed_by = Some(process);
        self
    }

    /// The same, with its VFIO files open in `processes`.
    pub fn open_in(mut self, processes: Vec<OtherProcess>) -> HotResetBlocker {
        self.open_in = processes;
        self
    }

    /// Who has the device and why a hot reset cannot take it, without the address:
    /// `claimed by PID 812 (app), which has it open; on vfio-pci`.
    pub fn reason(&self) -> String {
        let mut parts = Vec::new();
        let claimant = self.claimed_by.as_ref().map(|c| c.pid);
        if let Some(c) = &self.claimed_by {
            let open = self.open_in.iter().any(|p| p.pid == c.pid);
            parts.push(format!(
                "claimed by {c}{}",
                if open { ", which has it open" } else { "" }
            ));
        }
        let others: Vec<String> = self
            .open_in
            .iter()
            .filter(|p| Some(p.pid) != claimant)
            .map(OtherProcess::to_string)
            .collect();
        if !others.is_empty() {
            parts.push(format!("open in {}", others.join(", ")));
        }
        parts.push(match (&self.driver, self.on_vfio) {
            (Some(d), true) if parts.is_empty() => format!("on {d}, not open in this process"),
            (Some(d), true) => format!("on {d}"),
            (Some(d), false) => format!("bound to {d}, not vfio-pci"),
            (None, _) => "bound to no driver, not vfio-pci".to_owned(),
        });
        parts.join("; ")
    }
}

impl fmt::Display for HotResetBlocker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.address, self.reason())
    }
}

/// Blockers as a list for messages.
pub(crate) fn blocker_list(blockers: &[HotResetBlocker]) -> String {
    blockers
        .iter()
        .map(HotResetBlocker::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// What a hot reset needs of every affected device, for the backend (`iommufd`: the
/// info has device ids).
pub(crate) fn hot_reset_need(iommufd: bool) -> &'static str {
    if iommufd {
        "every device it resets must be on vfio-pci and open in this process through the same iommufd (the reset passes no group fds; Linux 6.7 on)"
    } else {
        "every device it resets must be on vfio-pci and open in this process, in the same container (or another device of its IOMMU group), so that its group's fd can be passed"
    }
}

/// Where [`not_held`] looks for who has a device.
pub(crate) struct Lookup<'a> {
    /// sysfs: drivers, `iommu_group` and `vfio-dev` of the devices.
    pub root: &'a SysfsRoot,
    /// procfs: who has which VFIO file open.
    pub proc: &'a Path,
    /// The claims to read.
    pub claims: &'a ClaimDir,
    /// This process, left out of the openers.
    pub own_pid: u32,
}

/// The affected devices of `info` this process cannot take with it in a hot reset, with
/// who has them. `held_group`: whether a group is open in the device's container.
pub(crate) fn not_held(
    info: &HotResetInfo,
    held_group: impl Fn(u32) -> bool,
    look: &Lookup<'_>,
) -> Vec<HotResetBlocker> {
    let mut out = Vec::new();
    // The VFIO files of each blocker, for the /proc scan.
    let mut files: Vec<Vec<String>> = Vec::new();
    for d in &info.devices {
        let dir = look.root.device_dir(d.address);
        let driver = std::fs::read_link(dir.join("driver"))
            .ok()
            .and_then(|t| t.file_name().map(|n| n.to_string_lossy().into_owned()));
        let on_vfio = crate::sysfs::bind::on_vfio(&dir, driver.as_deref());
        let ours = match d.owner {
            HotResetOwner::Group(g) => held_group(g),
            HotResetOwner::NotOwned => false,
            HotResetOwner::DevId(_) | HotResetOwner::Owned => true,
        };
        if ours && on_vfio {
            continue;
        }
        let mut paths = Vec::new();
        let group = match d.owner {
            HotResetOwner::Group(g) => Some(g),
            _ => super::iommu_group(look.root, d.address).ok(),
        };
        if let Some(g) = group {
            paths.push(super::group_path(g).to_string_lossy().into_owned());
        }
        for cdev in std::fs::read_dir(dir.join("vfio-dev"))
            .into_iter()
            .flatten()
            .flatten()
        {
            paths.push(format!(
                "/dev/vfio/devices/{}",
                cdev.file_name().to_string_lossy()
            ));
        }
        files.push(paths);
        out.push(HotResetBlocker::new(d.address, driver, on_vfio));
    }
    if out.is_empty() {
        return out;
    }
    let claims = look.claims.list().unwrap_or_else(|e| {
        log::debug!("hot reset: claims not read: {e}");
        Vec::new()
    });
    let openers = openers(look.proc, look.own_pid, &files);
    for (b, open_in) in out.iter_mut().zip(openers) {
        b.claimed_by = claims
            .iter()
            .find(|c| c.address == b.address && c.live)
            .and_then(|c| {
                c.pid.map(|pid| OtherProcess {
                    pid,
                    command: c.command.clone(),
                })
            });
        b.open_in = open_in;
    }
    out
}

/// For each set of paths, the processes (other than `own_pid`) with one of them open,
/// from `proc`'s `PID/fd` links, in PID order. An unreadable `proc` (or process) is
/// skipped: this names holders where it can, it never fails.
pub(crate) fn openers(proc: &Path, own_pid: u32, files: &[Vec<String>]) -> Vec<Vec<OtherProcess>> {
    let mut out: Vec<Vec<OtherProcess>> = vec![Vec::new(); files.len()];
    if files.iter().all(Vec::is_empty) {
        return out;
    }
    let pids = std::fs::read_dir(proc)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != own_pid);
    let mut pids: Vec<u32> = pids.collect();
    pids.sort_unstable();
    for pid in pids {
        let dir = proc.join(pid.to_string());
        let mut hits = vec![false; files.len()];
        for fd in std::fs::read_dir(dir.join("fd")).into_iter().flatten().flatten() {
            let Ok(target) = std::fs::read_link(fd.path()) else {
                continue;
            };
            let target = target.to_string_lossy();
            for (hit, paths) in hits.iter_mut().zip(files) {
                *hit |= paths.iter().any(|p| *p == target);
            }
        }
        if hits.iter().any(|&h| h) {
            let command = std::fs::read_to_string(dir.join("comm"))
                .ok()
                .map(|c| c.trim_end().to_owned());
            for (list, hit) in out.iter_mut().zip(hits) {
                if hit {
                    list.push(OtherProcess {
                        pid,
                        command: command.clone(),
                    });
                }
            }
        }
    }
    out
}

impl Container {
    /// Group `number` if it is open and attached in this container (never opens it).
    fn open_group(&self, number: u32) -> Option<Arc<Group>> {
        match &self.space {
            Space::Group { groups, .. } => {
                let mut groups = groups.lock();
                groups.forget_dead(Group::is_attached);
                groups.groups.get(&number).cloned()
            }
            Space::Iommufd(_) => None,
        }
    }
}

impl VfioDevice {
    /// Whether vfio-pci offers a function reset for the device
    /// (`VFIO_DEVICE_FLAGS_RESET` of `VFIO_DEVICE_GET_INFO`).
    pub fn function_reset_available(&self) -> Result<bool, VfioError> {
        self.live()?;
        let info = sys::device_get_info(self.file.as_fd()).map_err(ioctl_err(
            "VFIO_DEVICE_GET_INFO",
            Some(self.address),
            None,
        ))?;
        Ok(sys::DeviceFlags::from_bits_retain(info.flags).contains(sys::DeviceFlags::RESET))
    }

    /// Whether the device can be reset on its own, and by which method: the VFIO flag,
    /// and the methods from `root`'s `reset_method` of the device (its `show()` takes no
    /// lock: see the [module docs](self)). A device without `reset_method` and without
    /// `reset` has no method; one with `reset` alone is on a kernel before 5.15 (methods
    /// not known).
    pub fn reset_info(&self, root: &SysfsRoot) -> Result<ResetInfo, VfioError> {
        let function_reset = self.function_reset_available()?;
        let dir = root.device_dir(self.address);
        let methods = match std::fs::read_to_string(dir.join("reset_method")) {
            Ok(text) => Some(parse_reset_methods(&text)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !dir.join("reset").exists() => {
                Some(Vec::new())
            }
            Err(_) => None,
        };
        Ok(ResetInfo::new(function_reset, methods))
    }

    /// The devices a bus or slot hot reset of this device would reset
    /// (`VFIO_DEVICE_GET_PCI_HOT_RESET_INFO`). [`VfioError::NoHotReset`] when the kernel
    /// can reset neither its slot nor its bus.
    pub fn hot_reset_info(&self) -> Result<HotResetInfo, VfioError> {
        self.live()?;
        let buf = match sys::device_get_pci_hot_reset_info(self.file.as_fd()) {
            Ok(buf) => buf,
            Err(e) if e.raw_os_error() == Some(nix::libc::ENODEV) => {
                return Err(VfioError::NoHotReset {
                    address: self.address,
                });
            }
            Err(e) => {
                return Err(ioctl_err(
                    "VFIO_DEVICE_GET_PCI_HOT_RESET_INFO",
                    Some(self.address),
                    None,
                )(e));
            }
        };
        let info = parse_hot_reset_info(&buf)?;
        let groups = self.open_groups(&info);
        let not_held = not_held(
            &info,
            |n| groups.iter().any(|g| g.number() == n),
            &Lookup {
                root: &SysfsRoot::from_env(),
                proc: Path::new("/proc"),
                claims: &ClaimDir::from_env(),
                own_pid: std::process::id(),
            },
        );
        Ok(info.with_not_held(not_held))
    }

    // The groups among those `info` names that are open in this device's container, each
    // once.
    fn open_groups(&self, info: &HotResetInfo) -> Vec<Arc<Group>> {
        let mut groups: Vec<Arc<Group>> = Vec::new();
        for d in &info.devices {
            if let HotResetOwner::Group(number) = d.owner
                && !groups.iter().any(|g| g.number() == number)
                && let Some(g) = self.container.open_group(number)
            {
                groups.push(g);
            }
        }
        groups
    }

    /// A bus or slot hot reset (`VFIO_DEVICE_PCI_HOT_RESET`): resets the device and every
    /// device [`hot_reset_info`](Self::hot_reset_info) lists, and returns that list. The
    /// group backend passes the fd of each affected group, which must be open in this
    /// device's container; iommufd passes none, and every affected device must be owned
    /// by the device's iommufd (Linux 6.7 on). Every affected device must be on vfio-pci.
    /// Otherwise [`VfioError::HotResetNotHeld`] names the devices this process does not
    /// hold and who has them ([`HotResetInfo::not_held`]), and nothing is reset: the
    /// kernel is not asked (it would refuse too, but only after quiescing the devices it
    /// checked, and with an errno that names nothing).
    ///
    /// What the kernel answers when asked anyway, with the group fds this process has
    /// (measured on Debian's 6.1 and 6.12, group backend, by the VM test
    /// `d8-hot-reset-shared`): `EINVAL`, both for a bus with a device on a host driver
    /// (the PF of an SR-IOV NVMe on nvme; a function on pci-stub in a group this process
    /// holds) and for one with a VF another process holds. A device in the same IOMMU
    /// group as one another process holds cannot be opened at all: the group's open
    /// fails with `EBUSY` ([`VfioError::OpenGroup`], which names who has the group).
    ///
    /// Every affected device this process has open loses its state (registers, interrupt
    /// setup): their drivers must know. The kernel restores their config space.
    pub fn hot_reset(&self) -> Result<HotResetInfo, VfioError> {
        let info = self.hot_reset_info()?;
        if !info.not_held.is_empty() {
            return Err(VfioError::HotResetNotHeld {
                address: self.address,
                devices: info.not_held.clone(),
                need: hot_reset_need(info.all_owned.is_some()),
            });
        }
        let groups = self.open_groups(&info);
        let fds: Vec<BorrowedFd<'_>> = match self.backend() {
            VfioBackend::Group => groups.iter().map(|g| g.as_fd()).collect(),
            _ => Vec::new(),
        };
        sys::device_pci_hot_reset(self.file.as_fd(), &fds).map_err(ioctl_err(
            "VFIO_DEVICE_PCI_HOT_RESET",
            Some(self.address),
            None,
        ))?;
        Ok(info)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::removal::claim::ClaimInfo;

    fn addr(s: &str) -> PciAddress {
        s.parse().unwrap()
    }

    #[test]
    fn reset_methods_are_read_in_the_kernel_s_order() {
        assert_eq!(
            parse_reset_methods("flr pm bus\n"),
            vec![ResetMethod::Flr, ResetMethod::Pm, ResetMethod::Bus]
        );
        // The first versions (5.15 rc) used commas.
        assert_eq!(
            parse_reset_methods("device_specific,af_flr"),
            vec![ResetMethod::DeviceSpecific, ResetMethod::AfFlr]
        );
        assert_eq!(parse_reset_methods("\n"), vec![]);
        assert_eq!(
            parse_reset_methods("cxl_bus magic"),
            vec![ResetMethod::CxlBus, ResetMethod::Other("magic".into())]
        );
    }

    #[test]
    fn reset_info_says_the_method_or_why_there_is_none() {
        let flr = ResetInfo::new(true, Some(vec![ResetMethod::Flr, ResetMethod::Bus]));
        assert_eq!(flr.method(), Some(&ResetMethod::Flr));
        assert_eq!(flr.to_string(), "function reset by flr (then bus)");
        let none = ResetInfo::new(false, Some(vec![]));
        assert_eq!(none.method(), None);
        assert_eq!(none.to_string(), "no function reset");
        assert_eq!(
            ResetInfo::new(true, None).to_string(),
            "function reset (method not known: no reset_method attribute)"
        );
    }

    // What the kernel answers for an NVMe drive in QEMU behind a root port (group mode):
    // the drive alone, in group 5.
    #[test]
    fn hot_reset_info_of_the_group_backend_names_groups() {
        let mut buf = Vec::new();
        for w in [20u32, 0, 1, 5] {
            buf.extend_from_slice(&w.to_ne_bytes());
        }
        buf.extend_from_slice(&0u16.to_ne_bytes());
        buf.extend_from_slice(&[0x01, 0x00]);
        let info = parse_hot_reset_info(&buf).unwrap();
        assert_eq!(info.all_owned, None);
        assert_eq!(
            info.devices,
            vec![HotResetDevice {
                address: addr("0000:01:00.0"),
                owner: HotResetOwner::Group(5),
            }]
        );
    }

    #[test]
    fn hot_reset_info_of_iommufd_names_device_ids_and_ownership() {
        let info = HotResetInfo::new(
            vec![
                HotResetDevice {
                    address: addr("0000:02:00.0"),
                    owner: HotResetOwner::DevId(3),
                },
                HotResetDevice {
                    address: addr("0000:02:00.1"),
                    owner: HotResetOwner::Owned,
                },
                HotResetDevice {
                    address: addr("0000:02:01.7"),
                    owner: HotResetOwner::NotOwned,
                },
            ],
            Some(false),
        );
        let buf = encode_hot_reset_info(&info);
        assert_eq!(buf.len(), 12 + 3 * 8);
        assert_eq!(parse_hot_reset_info(&buf).unwrap(), info);
        // On vfio-pci all three: only the one another iommufd owns is in the way.
        let sys = FakeSys::new();
        for a in ["0000:02:00.0", "0000:02:00.1", "0000:02:01.7"] {
            sys.device(a, Some("vfio-pci"), 4);
        }
        let blockers = not_held(&info, |_| false, &sys.lookup());
        assert_eq!(
            blockers,
            vec![HotResetBlocker::new(
                addr("0000:02:01.7"),
                Some("vfio-pci".into()),
                true
            )]
        );
        assert!(hot_reset_need(true).contains("iommufd"));
    }

    #[test]
    fn short_hot_reset_info_is_an_error() {
        assert!(parse_hot_reset_info(&[0; 11]).is_err());
        let mut buf = vec![0u8; 12];
        buf[8..12].copy_from_slice(&2u32.to_ne_bytes());
        buf.extend_from_slice(&[0; 8]);
        let e = parse_hot_reset_info(&buf).unwrap_err();
        assert_eq!(
            e.to_string(),
            "malformed VFIO PCI hot reset info: its device count runs past the buffer"
        );
    }

    /// A sysfs root, a /proc and a claims directory in a temporary directory.
    struct FakeSys {
        _dir: tempfile::TempDir,
        root: SysfsRoot,
        proc: std::path::PathBuf,
        claims: ClaimDir,
    }

    impl FakeSys {
        fn new() -> FakeSys {
            let dir = tempfile::tempdir().unwrap();
            let root = SysfsRoot::new(dir.path().join("sys"));
            std::fs::create_dir_all(root.devices_dir()).unwrap();
            let proc = dir.path().join("proc");
            std::fs::create_dir_all(&proc).unwrap();
            let claims = ClaimDir::new(dir.path().join("claims"));
            FakeSys {
                _dir: dir,
                root,
                proc,
                claims,
            }
        }

        /// A device in IOMMU group `group`, bound to `driver`.
        fn device(&self, address: &str, driver: Option<&str>, group: u32) {
            let dev = self.root.device_dir(addr(address));
            std::fs::create_dir_all(&dev).unwrap();
            let sys = self.root.path();
            if let Some(d) = driver {
                std::fs::create_dir_all(sys.join("bus/pci/drivers").join(d)).unwrap();
                std::os::unix::fs::symlink(sys.join("bus/pci/drivers").join(d), dev.join("driver")).unwrap();
            }
            let g = sys.join(format!("kernel/iommu_groups/{group}"));
            std::fs::create_dir_all(&g).unwrap();
            std::os::unix::fs::symlink(&g, dev.join("iommu_group")).unwrap();
        }

        /// Process `pid` (`comm`) with `file` open as fd 7.
        fn process(&self, pid: u32, comm: &str, file: &str) {
            let p = self.proc.join(pid.to_string());
            std::fs::create_dir_all(p.join("fd")).unwrap();
            std::fs::write(p.join("comm"), format!("{comm}\n")).unwrap();
            std::os::unix::fs::symlink(file, p.join("fd/7")).unwrap();
        }

        fn lookup(&self) -> Lookup<'_> {
            Lookup {
                root: &self.root,
                proc: &self.proc,
                claims: &self.claims,
                own_pid: 1,
            }
        }
    }

    fn in_group(address: &str, group: u32) -> HotResetDevice {
        HotResetDevice {
            address: addr(address),
            owner: HotResetOwner::Group(group),
        }
    }

    // d8-hot-reset-shared's first case: this process holds function 0 (group 8), another
    // claims function 1 (group 9) and has its group open. The refusal names function 1,
    // the claimant and the opener, and what a hot reset needs.
    #[test]
    fn a_hot_reset_names_who_holds_the_devices_it_would_also_reset() {
        let sys = FakeSys::new();
        sys.device("0000:02:00.0", Some("vfio-pci"), 8);
        sys.device("0000:02:00.1", Some("vfio-pci"), 9);
        sys.process(812, "pcibus-vmtest", "/dev/vfio/9");
        sys.process(813, "qemu-system-x86", "/dev/vfio/9");
        sys.process(814, "bash", "/dev/null");
        let claim = sys
            .claims
            .claim(addr("0000:02:00.1"), &ClaimInfo::new().command("pcibus-vmtest"))
            .unwrap();
        let info = HotResetInfo::new(
            vec![in_group("0000:02:00.0", 8), in_group("0000:02:00.1", 9)],
            None,
        );
        assert_eq!(not_held(&info, |g| g == 8 || g == 9, &sys.lookup()), vec![]);
        let blockers = not_held(&info, |g| g == 8, &sys.lookup());
        let me = std::process::id();
        let claimant = OtherProcess {
            pid: me,
            command: Some("pcibus-vmtest".into()),
        };
        let openers = vec![
            OtherProcess {
                pid: 812,
                command: Some("pcibus-vmtest".into()),
            },
            OtherProcess {
                pid: 813,
                command: Some("qemu-system-x86".into()),
            },
        ];
        assert_eq!(
            blockers,
            vec![
                HotResetBlocker::new(addr("0000:02:00.1"), Some("vfio-pci".into()), true)
                    .claimed_by(claimant)
                    .open_in(openers)
            ]
        );
        let e = VfioError::HotResetNotHeld {
            address: addr("0000:02:00.0"),
            devices: blockers,
            need: hot_reset_need(false),
        };
        assert_eq!(
            e.to_string(),
            format!(
                "0000:02:00.0: a hot reset would also reset 0000:02:00.1 (claimed by PID {me} (pcibus-vmtest); \
                 open in PID 812 (pcibus-vmtest), PID 813 (qemu-system-x86); on vfio-pci), which this process \
                 does not hold; nothing was reset: every device it resets must be on vfio-pci and open in this \
                 process, in the same container (or another device of its IOMMU group), so that its group's fd \
                 can be passed"
            )
        );
        drop(claim);
        // The claim gone, the opener alone is named; with none, where it is.
        let blockers = not_held(&info, |g| g == 8, &sys.lookup());
        assert_eq!(
            blockers[0].reason(),
            "open in PID 812 (pcibus-vmtest), PID 813 (qemu-system-x86); on vfio-pci"
        );
        let bare = HotResetBlocker::new(addr("0000:02:00.1"), Some("vfio-pci".into()), true);
        assert_eq!(
            bare.to_string(),
            "0000:02:00.1 (on vfio-pci, not open in this process)"
        );
        let both = bare
            .claimed_by(OtherProcess {
                pid: 812,
                command: None,
            })
            .open_in(vec![OtherProcess {
                pid: 812,
                command: Some("x".into()),
            }]);
        assert_eq!(
            both.reason(),
            "claimed by PID 812, which has it open; on vfio-pci"
        );
    }

    // The kernel resets a bus only when every device on it is on vfio-pci: a device on a
    // host driver (or on none) is in the way even in a group this process holds, which
    // the group check alone would let through to the kernel's EINVAL.
    #[test]
    fn a_device_not_on_vfio_pci_is_in_the_way_even_in_a_held_group() {
        let sys = FakeSys::new();
        sys.device("0000:02:00.0", Some("vfio-pci"), 8);
        sys.device("0000:02:00.1", Some("pci-stub"), 8);
        sys.device("0000:02:00.2", None, 8);
        let info = HotResetInfo::new(
            vec![
                in_group("0000:02:00.0", 8),
                in_group("0000:02:00.1", 8),
                in_group("0000:02:00.2", 8),
            ],
            None,
        );
        let blockers = not_held(&info, |_| true, &sys.lookup());
        let reasons: Vec<String> = blockers.iter().map(ToString::to_string).collect();
        assert_eq!(
            reasons,
            vec![
                "0000:02:00.1 (bound to pci-stub, not vfio-pci)",
                "0000:02:00.2 (bound to no driver, not vfio-pci)"
            ]
        );
    }

    fn owner() -> impl Strategy<Value = HotResetOwner> {
        prop_oneof![
            (1u32..u32::MAX).prop_map(HotResetOwner::DevId),
            Just(HotResetOwner::Owned),
            Just(HotResetOwner::NotOwned),
        ]
    }

    fn device(owner: impl Strategy<Value = HotResetOwner>) -> impl Strategy<Value = HotResetDevice> {
        (any::<u16>(), any::<u8>(), 0u8..32, 0u8..8, owner).prop_map(|(seg, bus, dev, func, owner)| {
            HotResetDevice {
                address: PciAddress::new(u32::from(seg), bus, dev, func).unwrap(),
                owner,
            }
        })
    }

    proptest! {
        #[test]
        fn hot_reset_info_round_trips_in_group_mode(
            devices in proptest::collection::vec(device(any::<u32>().prop_map(HotResetOwner::Group)), 0..16),
        ) {
            let info = HotResetInfo::new(devices, None);
            prop_assert_eq!(parse_hot_reset_info(&encode_hot_reset_info(&info)).unwrap(), info);
        }

        #[test]
        fn hot_reset_info_round_trips_in_iommufd_mode(
            devices in proptest::collection::vec(device(owner()), 0..16),
            owned in any::<bool>(),
        ) {
            let info = HotResetInfo::new(devices, Some(owned));
            prop_assert_eq!(parse_hot_reset_info(&encode_hot_reset_info(&info)).unwrap(), info);
        }

        #[test]
        fn hot_reset_info_never_panics(b in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = parse_hot_reset_info(&b);
        }

        #[test]
        fn reset_methods_round_trip(names in proptest::collection::vec("[a-z_]{1,12}", 0..8)) {
            let methods = parse_reset_methods(&names.join(" "));
            let back: Vec<&str> = methods.iter().map(ResetMethod::name).collect();
            prop_assert_eq!(back, names.iter().map(String::as_str).collect::<Vec<_>>());
        }
    }
}
