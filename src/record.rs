//! The record a scan builds for each device, and the problems it met on the way.

use std::fmt;
use std::io;
use std::time::Duration;

use crate::model::{Bar, ClassCode, DeviceId, Resource, Sriov, VendorId};
use crate::removal::registry::DeviceIdentity;
use crate::{ParseError, PciAddress};

/// What a scan learned about one PCI function.
///
/// Fields the scan could not learn are `None` and the reason is in [`DeviceRecord::problems`];
/// a field the kernel does not report (no driver bound, no NUMA affinity) is `None` with
/// no problem.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct DeviceRecord {
    /// The function's address.
    pub address: PciAddress,
    /// Which incarnation of the device this is: its sysfs directory's device and inode
    /// numbers (one `fstat` of the directory the scan opens anyway). A device removed and
    /// added again at the same address, even with the same ids, has another; `None` when
    /// the `fstat` failed. Not in the JSON (it means nothing outside this boot).
    #[cfg_attr(feature = "serde", serde(skip))]
    pub identity: Option<DeviceIdentity>,
    /// Vendor id.
    pub vendor: Option<VendorId>,
    /// Device id.
    pub device: Option<DeviceId>,
    /// Subsystem vendor id.
    pub subsystem_vendor: Option<VendorId>,
    /// Subsystem device id.
    pub subsystem_device: Option<DeviceId>,
    /// Class code.
    pub class: Option<ClassCode>,
    /// Revision id.
    #[cfg_attr(feature = "serde", serde(serialize_with = "crate::json::revision"))]
    pub revision: Option<u8>,
    /// NUMA node, `None` when the kernel reports none (`-1`).
    pub numa_node: Option<u32>,
    /// The bound kernel driver (the `driver` link's last component).
    pub driver: Option<String>,
    /// The IOMMU group, from the `iommu_group` link.
    pub iommu_group: Option<u32>,
    /// Every line of the `resource` file; see [`DeviceRecord::bars`] for the present BARs
    /// (what the JSON has, as `bars`).
    #[cfg_attr(
        feature = "serde",
        serde(rename = "bars", serialize_with = "crate::json::bars")
    )]
    pub resources: Vec<Resource>,
    /// SR-IOV facts when the function is a PF (`sriov_totalvfs` exists).
    pub sriov: Option<Sriov>,
    /// The PF of a VF (the `physfn` link).
    pub physfn: Option<PciAddress>,
    /// The device was in the removal registry: its blocking attributes were not read.
    pub removal_pending: bool,
    /// Why its removal is pending, as the registry says (a vfio request, a uevent, "being
    /// released by PID 177 (spdk_tgt): vfio removal request" from another process's
    /// claim, a stuck read); empty when it is not.
    pub removal_reasons: Vec<String>,
    /// `driver_override`, when asked for and read in time (`None` also when empty).
    pub driver_override: Option<String>,
    /// `sriov_vf_total_msix`, when asked for and read in time.
    pub sriov_vf_total_msix: Option<u32>,
    /// The `uevent` variables, when asked for and read in time (an object in the JSON).
    #[cfg_attr(feature = "serde", serde(serialize_with = "crate::json::uevent_vars"))]
    pub uevent: Option<Vec<(String, String)>>,
    /// What went wrong, one entry per attribute.
    pub problems: Vec<Problem>,
}

impl DeviceRecord {
    /// A record with only the address known.
    pub fn new(address: PciAddress) -> Self {
        DeviceRecord {
            address,
            identity: None,
            vendor: None,
            device: None,
            subsystem_vendor: None,
            subsystem_device: None,
            class: None,
            revision: None,
            numa_node: None,
            driver: None,
            iommu_group: None,
            resources: Vec::new(),
            sriov: None,
            physfn: None,
            removal_pending: false,
            removal_reasons: Vec::new(),
            driver_override: None,
            sriov_vf_total_msix: None,
            uevent: None,
            problems: Vec::new(),
        }
    }

    /// The standard BARs that are present, in index order.
    pub fn bars(&self) -> impl Iterator<Item = Bar> + '_ {
        self.resources.iter().filter_map(Bar::from_resource)
    }

    /// The problem recorded for `attribute`, if any.
    pub fn problem(&self, attribute: &str) -> Option<&Problem> {
        self.problems.iter().find(|p| p.attribute == attribute)
    }

    pub(crate) fn report(&mut self, attribute: &'static str, kind: ProblemKind) {
        self.problems.push(Problem { attribute, kind });
    }
}

/// Something that went wrong reading one attribute of one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The attribute (sysfs file or link name).
    pub attribute: &'static str,
    /// What went wrong.
    pub kind: ProblemKind,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.attribute, self.kind)
    }
}

/// What went wrong with an attribute.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProblemKind {
    /// The text did not parse.
    Parse(ParseError),
    /// Reading it failed. Match on `errno` (or `kind`) rather than on the message:
    /// `ENODEV` or `ENOENT` from a device going away, `EIO` from one that does not answer.
    Io {
        /// The error's kind.
        kind: io::ErrorKind,
        /// The OS error number (`io::Error::raw_os_error`), when the error came from the
        /// kernel; `None` for errors pcibus made up (an attribute larger than expected).
        errno: Option<i32>,
        /// The error's message, as `io::Error` displays it.
        message: String,
    },
    /// A guarded read started but did not return by its deadline: it is stuck in the
    /// kernel (the device was then added to the removal registry until the read returns).
    TimedOut {
        /// The deadline it missed, counted from the read's submission.
        waited: Duration,
    },
    /// A guarded read never started before its deadline: every helper thread was busy or
    /// stuck. Says nothing about the device (it is not marked in the removal registry).
    NotStarted {
        /// The deadline, counted from the read's submission.
        waited: Duration,
    },
    /// Not read: this process holds the device open through vfio, and this attribute's
    /// read takes the device lock (see [`crate::removal::held`]).
    HeldOpen,
    /// Not read: the device's removal is pending and this attribute's read takes the
    /// device lock.
    RemovalPending,
    /// `config` was read but only its first bytes came: the kernel gives a reader without
    /// `CAP_SYS_ADMIN` the 64-byte header only (128 for a CardBus bridge), so the
    /// capabilities past it need root. What lspci shows as `<access denied>`.
    ConfigRestricted {
        /// The bytes the read returned.
        readable: usize,
        /// The bytes the file has (its size, at least
        /// [`CONFIG_SPACE_SIZE`](crate::config::CONFIG_SPACE_SIZE)).
        size: usize,
    },
}

impl ProblemKind {
    /// The problem of a failed read: keeps the error's kind, errno and message.
    pub fn io(e: &io::Error) -> Self {
        ProblemKind::Io {
            kind: e.kind(),
            errno: e.raw_os_error(),
            message: e.to_string(),
        }
    }

    /// The problem of a `config` read that returned `readable` bytes of a file of `size`,
    /// if it is one: fewer than [`CONFIG_SPACE_SIZE`](crate::config::CONFIG_SPACE_SIZE)
    /// bytes, so the capabilities could not be read.
    pub fn config_restricted(readable: usize, size: u64) -> Option<Self> {
        use crate::config::CONFIG_SPACE_SIZE;
        (readable < CONFIG_SPACE_SIZE).then(|| ProblemKind::ConfigRestricted {
            readable,
            size: usize::try_from(size).unwrap_or(usize::MAX).max(CONFIG_SPACE_SIZE),
        })
    }

    /// The OS error number of an [`ProblemKind::Io`] problem, if it has one.
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            ProblemKind::Io { errno, .. } => *errno,
            _ => None,
        }
    }

    /// The error kind of an [`ProblemKind::Io`] problem.
    pub fn io_kind(&self) -> Option<io::ErrorKind> {
        match self {
            ProblemKind::Io { kind, .. } => Some(*kind),
            _ => None,
        }
    }
}

impl From<io::Error> for ProblemKind {
    fn from(e: io::Error) -> Self {
        ProblemKind::io(&e)
    }
}

impl fmt::Display for ProblemKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            // The parse error names the attribute too; print only what follows it.
            ProblemKind::Parse(e) => write!(f, "{} in \"{}\"", e.kind, e.text),
            ProblemKind::Io { message, .. } => f.write_str(message),
            ProblemKind::TimedOut { waited } => write!(f, "read timed out after {} ms", waited.as_millis()),
            ProblemKind::NotStarted { waited } => write!(
                f,
                "read not started within {} ms (every helper thread busy or stuck)",
                waited.as_millis()
            ),
            ProblemKind::RemovalPending => f.write_str("not read: removal pending"),
            ProblemKind::HeldOpen => f.write_str("not read: this process holds the device open through vfio"),
            ProblemKind::ConfigRestricted { readable, size } => {
                write!(f, "{readable} of {size} bytes readable; capabilities need root")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::errno::Errno;

    #[test]
    fn an_io_problem_keeps_the_errno() {
        let e = io::Error::from_raw_os_error(Errno::ENODEV as i32);
        let k = ProblemKind::io(&e);
        assert!(matches!(
            k,
            ProblemKind::Io {
                errno: Some(n),
                ..
            } if n == Errno::ENODEV as i32
        ));
        assert_eq!(k.raw_os_error(), Some(Errno::ENODEV as i32));
        assert_eq!(k.io_kind(), Some(e.kind()));
        assert_eq!(k.to_string(), e.to_string());
        // Built by value, and from an error that has no errno.
        let k = ProblemKind::from(io::Error::other("larger than 1 MiB"));
        assert_eq!(k.raw_os_error(), None);
        assert_eq!(k.io_kind(), Some(io::ErrorKind::Other));
        assert_eq!(k.to_string(), "larger than 1 MiB");
        assert_eq!(ProblemKind::HeldOpen.raw_os_error(), None);
    }
}
