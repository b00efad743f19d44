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
//! [`VfioDevice::hot_reset`] checks this first and names the devices this process does
//! not hold ([`VfioError::HotResetNotHeld`]).

use std::fmt;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::Arc;

use super::caps::InfoError;
use super::{Container, Group, Space, VfioBackend, VfioDevice, VfioError, ioctl_err, sys};
use crate::addr::PciAddress;
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
/// (the asking device among them).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct HotResetInfo {
    /// The affected devices, in the kernel's order.
    pub devices: Vec<HotResetDevice>,
    /// iommufd: whether every affected device is owned by the asking device's iommufd
    /// (`VFIO_PCI_HOT_RESET_FLAG_DEV_ID_OWNED`). `None` for the group backend, where the
    /// groups say it.
    pub all_owned: Option<bool>,
}

impl HotResetInfo {
    /// Info listing `devices`, with `all_owned` as the kernel would say it.
    pub fn new(devices: Vec<HotResetDevice>, all_owned: Option<bool>) -> HotResetInfo {
        HotResetInfo { devices, all_owned }
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
    Ok(HotResetInfo {
        devices,
        all_owned: dev_id.then_some(flags.contains(HotResetFlags::DEV_ID_OWNED)),
    })
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

/// What a hot reset needs that this process lacks: the affected devices it does not hold,
/// and what the backend wants of them. `held_group`: whether a group is open in the
/// device's container.
pub(crate) fn not_held(
    info: &HotResetInfo,
    held_group: impl Fn(u32) -> bool,
) -> Option<(Vec<PciAddress>, &'static str)> {
    let missing: Vec<PciAddress> = info
        .devices
        .iter()
        .filter(|d| match d.owner {
            HotResetOwner::Group(g) => !held_group(g),
            HotResetOwner::NotOwned => true,
            HotResetOwner::DevId(_) | HotResetOwner::Owned => false,
        })
        .map(|d| d.address)
        .collect();
    if missing.is_empty() {
        return None;
    }
    let need = if info.all_owned.is_some() {
        "open them in this process through the same iommufd (the reset passes no group fds; Linux 6.7 on)"
    } else {
        "open them (or another device of each of their IOMMU groups) in the same container, so that their groups' fds can be passed"
    };
    Some((missing, need))
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
        Ok(parse_hot_reset_info(&buf)?)
    }

    /// A bus or slot hot reset (`VFIO_DEVICE_PCI_HOT_RESET`): resets the device and every
    /// device [`hot_reset_info`](Self::hot_reset_info) lists, and returns that list. The
    /// group backend passes the fd of each affected group, which must be open in this
    /// device's container; iommufd passes none, and every affected device must be owned
    /// by the device's iommufd (Linux 6.7 on). Otherwise
    /// [`VfioError::HotResetNotHeld`] names the devices this process does not hold,
    /// without asking the kernel.
    ///
    /// Every affected device this process has open loses its state (registers, interrupt
    /// setup): their drivers must know. The kernel restores their config space.
    pub fn hot_reset(&self) -> Result<HotResetInfo, VfioError> {
        let info = self.hot_reset_info()?;
        // The open groups among the affected ones, each once.
        let mut groups: Vec<Arc<Group>> = Vec::new();
        for d in &info.devices {
            if let HotResetOwner::Group(number) = d.owner
                && !groups.iter().any(|g| g.number() == number)
                && let Some(g) = self.container.open_group(number)
            {
                groups.push(g);
            }
        }
        if let Some((devices, need)) = not_held(&info, |n| groups.iter().any(|g| g.number() == n)) {
            return Err(VfioError::HotResetNotHeld {
                address: self.address,
                devices,
                need,
            });
        }
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
        let (missing, need) = not_held(&info, |_| false).unwrap();
        assert_eq!(missing, vec![addr("0000:02:01.7")]);
        assert!(need.contains("iommufd"), "{need}");
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

    // The message names the devices this process lacks and what to do about them.
    #[test]
    fn a_hot_reset_names_the_devices_this_process_does_not_hold() {
        let info = HotResetInfo::new(
            vec![
                HotResetDevice {
                    address: addr("0000:00:04.0"),
                    owner: HotResetOwner::Group(4),
                },
                HotResetDevice {
                    address: addr("0000:00:05.0"),
                    owner: HotResetOwner::Group(7),
                },
            ],
            None,
        );
        assert_eq!(not_held(&info, |_| true), None);
        let (devices, need) = not_held(&info, |g| g == 4).unwrap();
        let e = VfioError::HotResetNotHeld {
            address: addr("0000:00:04.0"),
            devices,
            need,
        };
        assert_eq!(
            e.to_string(),
            "0000:00:04.0: a hot reset would also reset 0000:00:05.0, which this process does not hold: \
             open them (or another device of each of their IOMMU groups) in the same container, so that their groups' fds can be passed"
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
