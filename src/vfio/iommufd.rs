//! The iommufd backend: a device opened through its cdev (`/dev/vfio/devices/vfioN`) and
//! bound to `/dev/iommu`, its DMA mapped in an I/O address space (IOAS) of that iommufd,
//! instead of a group attached to a type1 container. Since Linux 6.6 the kernel's VFIO work
//! happens here, and the container interface can be configured out.
//!
//! Once bound and attached, the device fd is the same as one from a group: regions, config
//! space, BAR mappings, interrupts and reset take the same ioctls, so [`super::VfioDevice`]
//! and everything above it do not know which backend opened it. What differs lives here
//! and in the [`super::Container`] (which is either a type1 container or an IOAS).

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::{VfToken, VfioError, ioctl_err, sys};
use crate::addr::PciAddress;
use crate::error::{ParseError, ParseErrorKind};
use crate::sysfs::scan::SysfsRoot;

/// The iommufd character device.
pub const IOMMUFD_PATH: &str = "/dev/iommu";
/// The type1 container character device of the group backend.
pub const CONTAINER_PATH: &str = "/dev/vfio/vfio";
/// Where the kernel puts the device cdevs.
pub const CDEV_DIR: &str = "/dev/vfio/devices";

/// Which kernel interface opens devices and maps their DMA.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum VfioBackend {
    /// iommufd when the kernel offers it together with the device cdev, else the group
    /// backend ([`resolve`](Self::resolve)).
    #[default]
    Auto,
    /// The group backend: `/dev/vfio/N` attached to a type1v2 container (`/dev/vfio/vfio`),
    /// what DPDK and SPDK use. Every kernel with VFIO has it unless `CONFIG_VFIO_CONTAINER`
    /// is off.
    Group,
    /// The device cdev (`/dev/vfio/devices/vfioN`) bound to `/dev/iommu`, DMA in an IOAS.
    /// Needs `CONFIG_IOMMUFD` and `CONFIG_VFIO_DEVICE_CDEV` (Linux 6.6 on).
    Iommufd,
}

impl VfioBackend {
    /// The environment variable [`from_env`](Self::from_env) reads.
    pub const ENV: &'static str = "PCIBUS_VFIO_BACKEND";

    /// The backend named by `PCIBUS_VFIO_BACKEND` (`auto`, `group` or `iommufd`), `Auto`
    /// when it is unset or empty. The library never reads it by itself: this is for
    /// programs that want the variable to choose (the `pcibus` CLI does, as the default of
    /// `--vfio-backend`).
    pub fn from_env() -> Result<VfioBackend, VfioBackendParseError> {
        match std::env::var(Self::ENV) {
            Ok(v) if !v.is_empty() => v.parse(),
            _ => Ok(VfioBackend::Auto),
        }
    }

    /// The backend this choice means on this kernel: `Auto` becomes `Iommufd` when
    /// `/dev/iommu` exists and the kernel registered the vfio device cdevs (`vfio-dev` in
    /// `/proc/devices`), else `Group`. `Group` and `Iommufd` stay as they are.
    pub fn resolve(self) -> VfioBackend {
        match self {
            VfioBackend::Auto => {
                let devices = std::fs::read_to_string("/proc/devices").unwrap_or_default();
                if Path::new(IOMMUFD_PATH).exists() && has_char_device(&devices, "vfio-dev") {
                    VfioBackend::Iommufd
                } else {
                    VfioBackend::Group
                }
            }
            other => other,
        }
    }

    /// The name, as parsed and printed.
    pub fn name(self) -> &'static str {
        match self {
            VfioBackend::Auto => "auto",
            VfioBackend::Group => "group",
            VfioBackend::Iommufd => "iommufd",
        }
    }
}

impl std::fmt::Display for VfioBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A backend name that is none of `auto`, `group`, `iommufd`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown VFIO backend {0:?} (expected auto, group or iommufd)")]
pub struct VfioBackendParseError(pub String);

impl std::str::FromStr for VfioBackend {
    type Err = VfioBackendParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(VfioBackend::Auto),
            "group" => Ok(VfioBackend::Group),
            "iommufd" => Ok(VfioBackend::Iommufd),
            other => Err(VfioBackendParseError(other.to_owned())),
        }
    }
}

/// Whether `/proc/devices` text lists a character device named `name` (lines `MAJOR
/// NAME` under `Character devices:`, before `Block devices:`).
pub fn has_char_device(proc_devices: &str, name: &str) -> bool {
    let mut in_char = false;
    for line in proc_devices.lines() {
        let line = line.trim();
        if line.ends_with(':') {
            in_char = line == "Character devices:";
            continue;
        }
        if in_char
            && let Some((major, n)) = line.split_once(char::is_whitespace)
            && major.parse::<u32>().is_ok()
            && n.trim() == name
        {
            return true;
        }
    }
    false
}

/// The number N of a `vfio-dev/` entry named `vfioN`.
pub fn vfio_dev_number(name: &str) -> Option<u32> {
    let digits = name.strip_prefix("vfio")?;
    // No sign, no leading zero (the kernel prints plain decimal).
    if digits.is_empty()
        || !digits.bytes().all(|b| b.is_ascii_digit())
        || (digits.len() > 1 && digits.starts_with('0'))
    {
        return None;
    }
    digits.parse().ok()
}

/// A device number, major and minor: what a sysfs `dev` attribute prints (`MAJ:MIN`) and
/// what `st_rdev` of an opened device node holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DevNumber {
    /// The major number (12 bits in Linux).
    pub major: u32,
    /// The minor number (20 bits in Linux).
    pub minor: u32,
}

/// The largest major number Linux gives (12 bits).
const MAX_MAJOR: u32 = (1 << 12) - 1;
/// The largest minor number Linux gives (20 bits).
const MAX_MINOR: u32 = (1 << 20) - 1;

impl DevNumber {
    /// The numbers of an `st_rdev`.
    pub fn from_rdev(rdev: u64) -> DevNumber {
        DevNumber {
            major: u32::try_from(nix::sys::stat::major(rdev)).unwrap_or(u32::MAX),
            minor: u32::try_from(nix::sys::stat::minor(rdev)).unwrap_or(u32::MAX),
        }
    }
}

impl std::fmt::Display for DevNumber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.major, self.minor)
    }
}

/// Parses a sysfs `dev` attribute: `MAJ:MIN` in plain decimal (no sign, no leading zero),
/// optionally ending in one newline, as the kernel prints it.
pub fn parse_dev_number(text: &[u8]) -> Result<DevNumber, ParseError> {
    let err = |kind| ParseError::new("dev", kind, text);
    let body = text.strip_suffix(b"\n").unwrap_or(text);
    if body.is_empty() {
        return Err(err(ParseErrorKind::Empty));
    }
    let invalid = || {
        err(ParseErrorKind::Invalid {
            expected: "MAJOR:MINOR in decimal",
        })
    };
    let colon = body.iter().position(|&b| b == b':').ok_or_else(invalid)?;
    let number = |digits: &[u8], max: u32| {
        if digits.is_empty()
            || !digits.iter().all(u8::is_ascii_digit)
            || (digits.len() > 1 && digits[0] == b'0')
        {
            return Err(invalid());
        }
        // All digits: a failed parse can only be an overflow.
        std::str::from_utf8(digits)
            .ok()
            .and_then(|d| d.parse::<u64>().ok())
            .and_then(|n| u32::try_from(n).ok())
            .filter(|&n| n <= max)
            .ok_or_else(|| err(ParseErrorKind::OutOfRange { max: max.into() }))
    };
    Ok(DevNumber {
        major: number(&body[..colon], MAX_MAJOR)?,
        minor: number(&body[colon + 1..], MAX_MINOR)?,
    })
}

/// Why a device has no usable cdev.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CdevProblem {
    /// No `vfio-dev/` directory: the device is not bound to a vfio driver.
    NotOnVfio {
        /// Its driver, if any.
        driver: Option<String>,
    },
    /// `vfio-dev/vfioN` exists but has no `dev` attribute: the kernel was built without
    /// `CONFIG_VFIO_DEVICE_CDEV`.
    NoCdevSupport,
    /// The kernel has the cdev but `/dev/vfio/devices/vfioN` could not be opened.
    Open {
        /// The path tried.
        path: PathBuf,
        /// The error's text (the error itself is the source).
        reason: String,
    },
    /// The cdev was opened, but the device's `vfio-dev/vfioN` entry was gone when its
    /// `dev` was read to check it: the device was unbound meanwhile.
    Vanished {
        /// The sysfs entry.
        entry: PathBuf,
    },
    /// The `dev` attribute of the device's `vfio-dev/vfioN` entry does not parse, so the
    /// opened cdev cannot be checked against it.
    BadDev {
        /// What is wrong with it.
        error: ParseError,
    },
}

impl std::fmt::Display for CdevProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CdevProblem::NotOnVfio { driver } => write!(
                f,
                "it has no vfio-dev/ directory in sysfs: it is not bound to vfio-pci (driver: {})",
                driver.as_deref().unwrap_or("none")
            ),
            CdevProblem::NoCdevSupport => f.write_str(
                "its vfio-dev/vfioN has no `dev` attribute: the kernel was built without CONFIG_VFIO_DEVICE_CDEV (use the group backend)",
            ),
            CdevProblem::Open { path, reason } => write!(f, "cannot open {}: {reason}", path.display()),
            CdevProblem::Vanished { entry } => write!(
                f,
                "{} went away while its cdev was being opened: the device was unbound meanwhile",
                entry.display()
            ),
            CdevProblem::BadDev { error } => write!(f, "its vfio-dev entry's {error}"),
        }
    }
}

/// The cdev path of `address`: `/dev/vfio/devices/vfioN` for the `vfio-dev/vfioN` entry of
/// its sysfs directory (read without taking the device lock: a directory listing and a
/// `stat`).
pub fn cdev_path(root: &SysfsRoot, address: PciAddress) -> Result<PathBuf, VfioError> {
    let (n, _) = vfio_dev_entry(root, address)?;
    Ok(Path::new(CDEV_DIR).join(format!("vfio{n}")))
}

/// The `vfio-dev/vfioN` entry of `address`: N and the entry's sysfs directory.
fn vfio_dev_entry(root: &SysfsRoot, address: PciAddress) -> Result<(u32, PathBuf), VfioError> {
    let dir = root.device_dir(address);
    let problem = |problem| VfioError::NoDeviceCdev {
        address,
        problem,
        source: None,
    };
    let found = std::fs::read_dir(dir.join("vfio-dev")).ok().and_then(|entries| {
        entries.flatten().find_map(|e| {
            e.file_name()
                .to_str()
                .and_then(vfio_dev_number)
                .map(|n| (n, e.path()))
        })
    });
    let Some((n, sys_dir)) = found else {
        let driver = crate::sysfs::bind::current_driver(root, address);
        return Err(problem(CdevProblem::NotOnVfio { driver }));
    };
    if !sys_dir.join("dev").exists() {
        return Err(problem(CdevProblem::NoCdevSupport));
    }
    Ok((n, sys_dir))
}

/// Opens the cdev of `address` (`CDEV_DIR/vfioN` for its `vfio-dev/vfioN` entry) and
/// checks that it is the device's.
///
/// The number N is the kernel's to recycle: between the sysfs lookup and the open, the
/// device may be unbound and another bound and given the same vfioN, and the open would
/// then hand that other device over to this claim. So, once open, the node's `st_rdev`
/// (fstat) is compared with the `dev` attribute of the device's own entry, read after the
/// open (a plain attribute: no device lock): an entry that is gone or names other numbers
/// means the fd is not this device's, and it is closed again.
fn open_cdev_in(root: &SysfsRoot, address: PciAddress, cdev_dir: &Path) -> Result<OwnedFd, VfioError> {
    let (n, entry) = vfio_dev_entry(root, address)?;
    let path = cdev_dir.join(format!("vfio{n}"));
    let open_failed = |path: &Path, source: std::io::Error| VfioError::NoDeviceCdev {
        address,
        problem: CdevProblem::Open {
            path: path.to_owned(),
            reason: source.to_string(),
        },
        source: Some(source),
    };
    let file = File::options()
        .read(true)
        .write(true)
        .open(&path)
        .map_err(|e| open_failed(&path, e))?;
    let opened = DevNumber::from_rdev(file.metadata().map_err(|e| open_failed(&path, e))?.rdev());
    let text = std::fs::read(entry.join("dev")).map_err(|source| VfioError::NoDeviceCdev {
        address,
        problem: CdevProblem::Vanished { entry },
        source: Some(source),
    })?;
    let expected = parse_dev_number(&text).map_err(|error| VfioError::NoDeviceCdev {
        address,
        problem: CdevProblem::BadDev { error },
        source: None,
    })?;
    if opened != expected {
        return Err(VfioError::CdevMismatch {
            address,
            path,
            expected,
            opened,
        });
    }
    Ok(OwnedFd::from(file))
}

/// An iommufd with one IOAS: the iommufd backend's side of a [`super::Container`].
#[derive(Debug)]
pub(super) struct Ioas {
    fd: OwnedFd,
    id: u32,
}

impl AsFd for Ioas {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl Ioas {
    /// Opens `/dev/iommu` and allocates an IOAS in it.
    pub(super) fn new() -> Result<Ioas, VfioError> {
        let file = File::options()
            .read(true)
            .write(true)
            .open(IOMMUFD_PATH)
            .map_err(VfioError::NoIommufd)?;
        let fd = OwnedFd::from(file);
        let id = sys::ioas_alloc(fd.as_fd()).map_err(ioctl_err("IOMMU_IOAS_ALLOC", None, None))?;
        Ok(Ioas { fd, id })
    }

    /// The IOAS id.
    pub(super) fn id(&self) -> u32 {
        self.id
    }

    /// The IOVA ranges the IOAS accepts now (they narrow with each attached device).
    pub(super) fn ranges(&self) -> Result<super::IommuInfo, VfioError> {
        let raw = sys::ioas_iova_ranges(self.fd.as_fd(), self.id).map_err(ioctl_err(
            "IOMMU_IOAS_IOVA_RANGES",
            None,
            Some(self.id.into()),
        ))?;
        Ok(super::caps::parse_iova_ranges(&raw)?)
    }

    /// Opens the cdev of `address`, binds it to this iommufd (with `token` for a VF whose
    /// PF is on vfio-pci) and attaches it to the IOAS: the returned fd works like a
    /// group's device fd.
    pub(super) fn open_device(
        &self,
        root: &SysfsRoot,
        address: PciAddress,
        token: Option<VfToken>,
    ) -> Result<OwnedFd, VfioError> {
        let device = open_cdev_in(root, address, Path::new(CDEV_DIR))?;
        self.bind(root, address, &device, token)?;
        sys::device_attach_iommufd_pt(device.as_fd(), self.id).map_err(ioctl_err(
            "VFIO_DEVICE_ATTACH_IOMMUFD_PT",
            Some(address),
            Some(self.id.into()),
        ))?;
        Ok(device)
    }

    fn bind(
        &self,
        root: &SysfsRoot,
        address: PciAddress,
        device: &OwnedFd,
        token: Option<VfToken>,
    ) -> Result<(), VfioError> {
        let bind = |token: Option<VfToken>| {
            sys::device_bind_iommufd(device.as_fd(), self.fd.as_fd(), token.map(VfToken::to_bytes))
        };
        let result = match bind(token) {
            // Kernels before the cdev VF token (6.12 among them) take no flags, and check no
            // token on this path: bind without one. A newer kernel answers EINVAL too for a
            // token where none is expected (the PF is not on vfio-pci), where binding
            // without it is what is wanted anyway.
            Err(e) if token.is_some() && e.raw_os_error() == Some(nix::libc::EINVAL) => {
                log::debug!(
                    "{address}: the kernel takes no VF token at VFIO_DEVICE_BIND_IOMMUFD; binding without it"
                );
                bind(None)
            }
            other => other,
        };
        match result {
            Ok(_devid) => Ok(()),
            Err(e) if matches!(e.raw_os_error(), Some(nix::libc::EBUSY | nix::libc::EPERM)) => {
                // EBUSY: a device of the IOMMU group is on a host driver (the kernel will not
                // hand the group's DMA over), or the group is open as /dev/vfio/N. EPERM:
                // the group's DMA belongs to another iommufd.
                let group = super::iommu_group(root, address).ok();
                let devices = group
                    .map(|g| super::non_vfio_members(root, g))
                    .unwrap_or_default();
                match group {
                    Some(group) if !devices.is_empty() => Err(VfioError::NotViable { group, devices }),
                    _ => Err(VfioError::GroupBusy {
                        address,
                        group,
                        source: e,
                    }),
                }
            }
            // The only EINVAL left with the flags and fd this sends: the device is open
            // already (the cdev path allows one open; vfio_df_open).
            Err(e) if e.raw_os_error() == Some(nix::libc::EINVAL) => {
                Err(VfioError::AlreadyOpen { address, source: e })
            }
            Err(e) => Err(super::vf_token_error(
                root,
                address,
                token,
                ioctl_err("VFIO_DEVICE_BIND_IOMMUFD", Some(address), None)(e),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const PROC_DEVICES: &str = "Character devices:\n  1 mem\n  4 tty\n 10 misc\n236 vfio-dev\n237 vfio\n\nBlock devices:\n  8 sd\n259 blkext\n";

    #[test]
    fn proc_devices_lists_character_devices_only() {
        assert!(has_char_device(PROC_DEVICES, "vfio-dev"));
        assert!(has_char_device(PROC_DEVICES, "vfio"));
        assert!(!has_char_device(PROC_DEVICES, "sd"), "a block device");
        assert!(!has_char_device(PROC_DEVICES, "vfio-de"));
        assert!(!has_char_device("", "vfio-dev"));
        assert!(!has_char_device("Block devices:\n236 vfio-dev\n", "vfio-dev"));
    }

    #[test]
    fn vfio_dev_names() {
        assert_eq!(vfio_dev_number("vfio0"), Some(0));
        assert_eq!(vfio_dev_number("vfio17"), Some(17));
        for bad in [
            "vfio",
            "vfio-1",
            "vfio+1",
            "vfio01",
            "vfio1a",
            "vfi1",
            "VFIO1",
            "vfio99999999999",
        ] {
            assert_eq!(vfio_dev_number(bad), None, "{bad}");
        }
    }

    #[test]
    fn backends_parse_and_print() {
        for b in [VfioBackend::Auto, VfioBackend::Group, VfioBackend::Iommufd] {
            assert_eq!(b.to_string().parse::<VfioBackend>(), Ok(b));
        }
        let e = "container".parse::<VfioBackend>().unwrap_err();
        assert_eq!(
            e.to_string(),
            "unknown VFIO backend \"container\" (expected auto, group or iommufd)"
        );
        assert_eq!(VfioBackend::Group.resolve(), VfioBackend::Group);
        assert_eq!(VfioBackend::Iommufd.resolve(), VfioBackend::Iommufd);
        assert_ne!(VfioBackend::Auto.resolve(), VfioBackend::Auto);
    }

    #[test]
    fn cdev_problems_name_the_cause() {
        let dir = std::env::temp_dir().join(format!("pcibus-cdev-{}", std::process::id()));
        let dev = dir.join("bus/pci/devices/0000:01:00.0");
        std::fs::create_dir_all(&dev).unwrap();
        let root = SysfsRoot::new(&dir);
        let addr: PciAddress = "0000:01:00.0".parse().unwrap();
        let msg = |e: VfioError| e.to_string();
        assert!(msg(cdev_path(&root, addr).unwrap_err()).contains("not bound to vfio-pci (driver: none)"));
        std::fs::create_dir_all(dev.join("vfio-dev/vfio3")).unwrap();
        assert!(msg(cdev_path(&root, addr).unwrap_err()).contains("without CONFIG_VFIO_DEVICE_CDEV"));
        std::fs::write(dev.join("vfio-dev/vfio3/dev"), "236:3\n").unwrap();
        assert_eq!(
            cdev_path(&root, addr).unwrap(),
            Path::new("/dev/vfio/devices/vfio3")
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn dev_attributes_parse() {
        let dev = |t: &str| parse_dev_number(t.as_bytes());
        assert_eq!(dev("236:3\n"), Ok(DevNumber { major: 236, minor: 3 }));
        assert_eq!(dev("0:0"), Ok(DevNumber { major: 0, minor: 0 }));
        assert_eq!(
            dev("4095:1048575\n"),
            Ok(DevNumber {
                major: 4095,
                minor: (1 << 20) - 1
            })
        );
        assert_eq!(dev("236:3\n").unwrap().to_string(), "236:3");
        for bad in [
            "",
            "\n",
            "236",
            "236:",
            ":3",
            "236:3:4",
            "236-3",
            " 236:3",
            "236:3 ",
            "236:3\n\n",
            "+236:3",
            "236:-3",
            "0236:3",
            "236:03",
            "236:3\r\n",
            "a:3",
        ] {
            assert!(dev(bad).is_err(), "{bad:?}");
        }
        let e = dev("4096:0\n").unwrap_err();
        assert!(matches!(e.kind, ParseErrorKind::OutOfRange { max: 4095 }), "{e}");
        let e = dev("1:1048576").unwrap_err();
        assert!(
            matches!(e.kind, ParseErrorKind::OutOfRange { max: 0xf_ffff }),
            "{e}"
        );
        assert_eq!(e.attribute, "dev");
        assert_eq!(dev("99999999999999999999:1").unwrap_err().attribute, "dev");
    }

    // The cdev named by the device's vfio-dev/vfioN entry is opened, then its st_rdev is
    // compared with that entry's `dev`: a number recycled in between (the device unbound,
    // another bound and given the same vfioN) opens another device's cdev, which must be
    // refused. Here the "cdev" is /dev/null, whose numbers are known.
    #[test]
    fn a_cdev_that_is_not_the_devices_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let dev = dir.path().join("sys/bus/pci/devices/0000:01:00.0");
        std::fs::create_dir_all(dev.join("vfio-dev/vfio3")).unwrap();
        let cdevs = dir.path().join("dev-vfio-devices");
        std::fs::create_dir_all(&cdevs).unwrap();
        std::os::unix::fs::symlink("/dev/null", cdevs.join("vfio3")).unwrap();
        let null = {
            use std::os::unix::fs::MetadataExt;
            DevNumber::from_rdev(std::fs::metadata("/dev/null").unwrap().rdev())
        };
        let root = SysfsRoot::new(dir.path().join("sys"));
        let addr: PciAddress = "0000:01:00.0".parse().unwrap();

        std::fs::write(dev.join("vfio-dev/vfio3/dev"), "236:3\n").unwrap();
        let e = open_cdev_in(&root, addr, &cdevs).unwrap_err();
        match &e {
            VfioError::CdevMismatch {
                address,
                path,
                expected,
                opened,
            } => {
                assert_eq!(*address, addr);
                assert_eq!(*path, cdevs.join("vfio3"));
                assert_eq!(*expected, DevNumber { major: 236, minor: 3 });
                assert_eq!(*opened, null);
            }
            other => panic!("{other:?}"),
        }
        let msg = e.to_string();
        assert!(
            msg.contains("0000:01:00.0") && msg.contains("236:3") && msg.contains(&null.to_string()),
            "{msg}"
        );

        // The entry agrees with what was opened: the fd is the device's.
        std::fs::write(dev.join("vfio-dev/vfio3/dev"), format!("{null}\n")).unwrap();
        assert!(open_cdev_in(&root, addr, &cdevs).is_ok());

        // A `dev` that does not parse is not taken on trust.
        std::fs::write(dev.join("vfio-dev/vfio3/dev"), "garbage\n").unwrap();
        let e = open_cdev_in(&root, addr, &cdevs).unwrap_err();
        assert!(
            matches!(
                &e,
                VfioError::NoDeviceCdev {
                    problem: CdevProblem::BadDev { .. },
                    ..
                }
            ),
            "{e:?}"
        );
    }

    proptest! {
        #[test]
        fn dev_numbers_round_trip(major in 0u32..4096, minor in 0u32..1 << 20, newline in any::<bool>()) {
            let d = DevNumber { major, minor };
            let text = if newline { format!("{d}\n") } else { d.to_string() };
            prop_assert_eq!(parse_dev_number(text.as_bytes()), Ok(d));
        }

        #[test]
        fn dev_parse_never_panics(b in proptest::collection::vec(any::<u8>(), 0..48)) {
            let _ = parse_dev_number(&b);
        }

        #[test]
        fn vfio_dev_numbers_round_trip(n in any::<u32>()) {
            prop_assert_eq!(vfio_dev_number(&format!("vfio{n}")), Some(n));
        }

        #[test]
        fn parsers_never_panic(s in ".{0,64}") {
            let _ = vfio_dev_number(&s);
            let _ = has_char_device(&s, "vfio-dev");
        }
    }
}
