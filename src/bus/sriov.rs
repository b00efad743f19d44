//! SR-IOV of a PF the bus holds: how many VFs it has, where they are, and changing their
//! number ([`Bus::set_vfs`](super::Bus::set_vfs)), with the PF's driver asked first
//! ([`Driver::sriov_configure`](super::Driver::sriov_configure)).
//!
//! The count and the VFs' routing come from the PF's config space (the SR-IOV extended
//! capability: [`config::sriov_capability`]), read through the PF's backing: reading
//! `sriov_numvfs` takes the PF's device lock, which a pending removal holds. Only the
//! change itself goes through sysfs ([`VfControl`], [`SysfsVfs`]), where the kernel
//! creates and removes the VFs' devices.
//!
//! What is specific to a device class (NVMe's Virtualization Management, which gives the
//! VFs' controllers their queues) stays with its driver: [`crate::nvme::sriov`].

use std::io;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::backing::{BackingError, DeviceBacking};
use super::driver::{DriverError, DriverPanicked};
use crate::addr::PciAddress;
use crate::config::{self, SriovCapability};
use crate::error::{ParseError, chain};
use crate::removal::pool::{BlockingPool, PoolError};
use crate::sysfs::scan::SysfsRoot;

/// What went wrong enabling or disabling VFs through the platform ([`VfControl`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VfError {
    /// A sysfs attribute could not be read or written. A write refused for lack of
    /// permission says what it needs ([`permission_hint`](crate::sysfs::bind::permission_hint)).
    #[error(
        "cannot {} {}{}",
        value.as_ref().map_or("read".to_owned(), |v| format!("write {v:?} to")),
        path.display(),
        value.as_ref().and(crate::sysfs::bind::permission_hint(path, source)).map(|h| format!(": {h}")).unwrap_or_default()
    )]
    Sysfs {
        /// The attribute.
        path: PathBuf,
        /// What was written (`None`: a read).
        value: Option<String>,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// A sysfs access that takes the device lock did not finish in time.
    #[error(
        "{} {} did not finish in time: the attribute takes the device lock (is a removal of the device pending, or does someone still hold one of its VFs?)",
        value.as_ref().map_or("reading".to_owned(), |v| format!("writing {v:?} to")), path.display()
    )]
    Stuck {
        /// The attribute.
        path: PathBuf,
        /// What was written (`None`: a read).
        value: Option<String>,
        /// How the wait ended.
        #[source]
        source: PoolError,
    },
}

/// The address of VF `index` (0-based: VF 1 is index 0) of `pf`, from the PF's First VF
/// Offset and VF Stride, as the kernel computes it: routing ids (bus << 8 | devfn) add up,
/// so a VF may sit on a bus number above the PF's. `None` past bus 255.
pub fn vf_address(pf: PciAddress, vf_offset: u16, vf_stride: u16, index: u16) -> Option<PciAddress> {
    let rid = (u32::from(pf.bus()) << 8 | u32::from(pf.devfn()))
        + u32::from(vf_offset)
        + u32::from(vf_stride) * u32::from(index);
    let bus = u8::try_from(rid >> 8).ok()?;
    let devfn = (rid & 0xff) as u8;
    PciAddress::new(pf.domain(), bus, devfn >> 3, devfn & 7)
}

/// The addresses of the first `n` VFs of `pf` under `cap`'s offset and stride, VF 1 first
/// (those that fit under bus 255).
pub fn vf_addresses(pf: PciAddress, cap: &SriovCapability, n: u16) -> Vec<PciAddress> {
    (0..n)
        .map_while(|i| vf_address(pf, cap.vf_offset, cap.vf_stride, i))
        .collect()
}

/// The SR-IOV capability in `backing`'s config space: `Ok(None)` when it has none (or no
/// extended config space).
pub fn read_sriov<B: DeviceBacking>(backing: &B) -> Result<Option<SriovCapability>, ConfigError> {
    let mut bytes = vec![0u8; 256];
    backing.read_config(0, &mut bytes).map_err(ConfigError::Read)?;
    let mut extended = vec![0u8; 4096 - 256];
    // A conventional PCI function has no extended space (the read fails): no SR-IOV.
    if backing.read_config(256, &mut extended).is_ok() {
        bytes.extend_from_slice(&extended);
    }
    config::sriov_capability(&bytes)
        .transpose()
        .map_err(ConfigError::Parse)
}

/// Reading the PF's SR-IOV capability failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// Reading config space through the backing failed.
    #[error("cannot read config space")]
    Read(#[source] BackingError),
    /// The capability is malformed.
    #[error("malformed SR-IOV capability")]
    Parse(#[source] ParseError),
}

/// What [`Bus::set_vfs`](super::Bus::set_vfs) did.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SetVfs {
    /// The PF.
    pub pf: PciAddress,
    /// NumVFs before.
    pub previous: u16,
    /// NumVFs now, read back from config space.
    pub num_vfs: u16,
    /// The VFs' addresses, VF 1 first (from the PF's address, VF offset and stride).
    pub vfs: Vec<PciAddress>,
    /// What the change did to the bus's device map (VFs added and removed), from one scan
    /// right after it; empty when nothing changed.
    pub map: Vec<crate::bus::map::Change>,
}

/// Why a change of the VF count failed, after the PF's driver agreed to it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ChangeError {
    /// The platform refused or failed the change.
    #[error(transparent)]
    Control(#[from] VfError),
    /// Config space says another count than asked for after the change.
    #[error("config space says NumVFs {got} after the change")]
    ReadBack {
        /// NumVFs read back.
        got: u16,
    },
    /// Config space could not be read after the change.
    #[error(transparent)]
    Config(#[from] ConfigError),
}

/// What became of the previous count after a failed change ([`SetVfsError::Change`]).
#[derive(Debug)]
#[non_exhaustive]
pub enum Rollback {
    /// Nothing changed: NumVFs is what it was.
    Unchanged,
    /// NumVFs had changed; it is back to what it was.
    RolledBack,
    /// NumVFs had changed and going back failed too.
    Failed(Box<ChangeError>),
    /// Config space could not be read to know: the count is unknown.
    Unknown(Box<ConfigError>),
}

impl std::fmt::Display for Rollback {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Rollback::Unchanged => f.write_str("the count is unchanged"),
            Rollback::RolledBack => f.write_str("rolled back to the previous count"),
            Rollback::Failed(e) => write!(
                f,
                "rolling back to the previous count failed too: {}",
                chain(e.as_ref())
            ),
            Rollback::Unknown(e) => write!(f, "the count is unknown: {}", chain(e.as_ref())),
        }
    }
}

/// What went wrong in [`Bus::set_vfs`](super::Bus::set_vfs).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SetVfsError {
    /// No driver of this bus holds the PF.
    #[error("{0}: no driver of this bus holds it")]
    NotHeld(PciAddress),
    /// The PF's config space has no SR-IOV capability.
    #[error("{0}: not an SR-IOV PF (no SR-IOV capability in its config space)")]
    NotSriov(PciAddress),
    /// The PF's SR-IOV capability could not be read.
    #[error("{pf}: reading its SR-IOV capability: {}", chain(error))]
    Config {
        /// The PF.
        pf: PciAddress,
        /// What went wrong.
        error: ConfigError,
    },
    /// More VFs asked for than the PF has (TotalVFs).
    #[error("{pf}: {asked} VFs asked for, the PF has at most {total}")]
    TooMany {
        /// The PF.
        pf: PciAddress,
        /// The count asked for.
        asked: u16,
        /// TotalVFs.
        total: u16,
    },
    /// This bus holds VFs of the PF (or keeps them open, releasing): removing them would
    /// wait for this process to close them, under the PF's device lock, for ever.
    #[error("{pf}: this bus holds or keeps open its VFs {}: detach them first", list(vfs))]
    VfsInUse {
        /// The PF.
        pf: PciAddress,
        /// The VFs, with the driver of each.
        vfs: Vec<(PciAddress, String)>,
    },
    /// The PF's driver refused ([`Driver::sriov_configure`](super::Driver::sriov_configure)).
    #[error("{pf}: driver {driver} refused {asked} VFs: {}", chain(error.as_ref()))]
    Refused {
        /// The PF.
        pf: PciAddress,
        /// The driver.
        driver: String,
        /// The count asked for.
        asked: u16,
        /// The driver's error.
        error: DriverError,
    },
    /// The PF's driver panicked in `sriov_configure`.
    #[error("{pf}: driver {}: {panicked}", .panicked.driver)]
    Panicked {
        /// The PF.
        pf: PciAddress,
        /// The panic.
        panicked: DriverPanicked,
    },
    /// Changing the count failed; [`Rollback`] says what became of the previous count.
    #[error(
        "{pf}: changing NumVFs from {from} to {to} failed: {}; {rollback}",
        chain(error)
    )]
    Change {
        /// The PF.
        pf: PciAddress,
        /// NumVFs before.
        from: u16,
        /// The count asked for.
        to: u16,
        /// What failed.
        error: Box<ChangeError>,
        /// What became of the previous count.
        rollback: Rollback,
    },
}

fn list(vfs: &[(PciAddress, String)]) -> String {
    vfs.iter()
        .map(|(a, d)| format!("{a} ({d})"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Enables and disables the VFs of a PF: what [`Bus::set_vfs`](super::Bus::set_vfs) and
/// NVMe's [`enable`](crate::nvme::sriov::enable) and
/// [`disable`](crate::nvme::sriov::disable) need of the platform. [`SysfsVfs`] does it
/// through sysfs.
pub trait VfControl {
    /// How many VFs are enabled now (for [`SysfsVfs`], `sriov_numvfs`, which takes the
    /// device lock: the bus reads NumVFs from config space instead).
    fn num_vfs(&self) -> Result<u16, VfError>;
    /// Enables `n` VFs (0: disables them), with no kernel driver probing them, and returns
    /// their addresses (VF 1 first).
    fn set_num_vfs(&self, n: u16) -> Result<Vec<PciAddress>, VfError>;
    /// Changes the number of VFs from `now` (what the caller read, from config space) to
    /// `n`, with no kernel driver probing the VFs created, without reading the count
    /// first. Default: [`set_num_vfs`](Self::set_num_vfs).
    fn change_num_vfs(&self, now: u16, n: u16) -> Result<(), VfError> {
        let _ = now;
        self.set_num_vfs(n).map(drop)
    }
}

/// [`VfControl`] through the PF's sysfs attributes. `sriov_numvfs` takes the device lock
/// (so does reading it), so each access runs on a [`BlockingPool`] thread and is waited
/// for until a deadline: a pending removal of the PF then ends in [`VfError::Stuck`],
/// not in a hang.
#[derive(Debug, Clone)]
pub struct SysfsVfs {
    root: SysfsRoot,
    pf: PciAddress,
    pool: BlockingPool,
    limit: Duration,
}

impl SysfsVfs {
    /// The VFs of `pf` under `root`, through the process's shared pool, 20 s per access
    /// (enabling VFs creates and announces PCI devices, which takes seconds on a slow
    /// machine).
    pub fn new(root: SysfsRoot, pf: PciAddress) -> Self {
        SysfsVfs {
            root,
            pf,
            pool: BlockingPool::shared(),
            limit: Duration::from_secs(20),
        }
    }

    /// Waits at most `limit` for each access.
    pub fn limit(mut self, limit: Duration) -> Self {
        self.limit = limit;
        self
    }

    /// Runs the accesses on `pool`.
    pub fn pool(mut self, pool: BlockingPool) -> Self {
        self.pool = pool;
        self
    }

    /// The VFs that exist now, from the `virtfnN` links (readlinks: no device lock).
    pub fn vfs(&self) -> Vec<PciAddress> {
        let dir = self.root.device_dir(self.pf);
        (0..)
            .map_while(|i| std::fs::read_link(dir.join(format!("virtfn{i}"))).ok())
            .filter_map(|t| t.file_name()?.to_str()?.parse().ok())
            .collect()
    }

    fn attr(&self, name: &str) -> PathBuf {
        self.root.device_dir(self.pf).join(name)
    }

    fn write(&self, name: &str, value: &str) -> Result<(), VfError> {
        let path = self.attr(name);
        let (p, v) = (path.clone(), value.to_owned());
        let outcome = self
            .pool
            .submit(move || std::fs::write(&p, v))
            .wait_until(Instant::now() + self.limit);
        let value = Some(value.to_owned());
        match outcome {
            Ok(Ok(())) => Ok(()),
            Ok(Err(source)) => Err(VfError::Sysfs { path, value, source }),
            Err(source) => Err(VfError::Stuck { path, value, source }),
        }
    }

    fn read(&self, name: &str) -> Result<String, VfError> {
        let path = self.attr(name);
        match self.pool.read(&path, 64, Instant::now() + self.limit) {
            Ok(Ok(b)) => Ok(String::from_utf8_lossy(&b).trim().to_owned()),
            Ok(Err(source)) => Err(VfError::Sysfs {
                path,
                value: None,
                source,
            }),
            Err(source) => Err(VfError::Stuck {
                path,
                value: None,
                source,
            }),
        }
    }
}

impl VfControl for SysfsVfs {
    fn num_vfs(&self) -> Result<u16, VfError> {
        let text = self.read("sriov_numvfs")?;
        text.parse().map_err(|_| VfError::Sysfs {
            path: self.attr("sriov_numvfs"),
            value: None,
            source: io::Error::new(io::ErrorKind::InvalidData, format!("{text:?} is not a number")),
        })
    }

    /// Reads `sriov_numvfs`, then as [`change_num_vfs`](VfControl::change_num_vfs).
    fn set_num_vfs(&self, n: u16) -> Result<Vec<PciAddress>, VfError> {
        let now = self.num_vfs()?;
        if now != n {
            self.change_num_vfs(now, n)?;
        }
        Ok(self.vfs())
    }

    /// Enabling sets `sriov_drivers_autoprobe` to 0 first (no kernel driver probes the
    /// VFs: NVMe's VF controllers are offline until
    /// [`enable`](crate::nvme::sriov::enable) sets them online; bind them afterwards);
    /// disabling sets it back to 1, the kernel's default. The kernel refuses to change a
    /// nonzero count to another nonzero one, so a different count goes through 0.
    fn change_num_vfs(&self, now: u16, n: u16) -> Result<(), VfError> {
        if now == n {
            return Ok(());
        }
        if n > 0 {
            self.write("sriov_drivers_autoprobe", "0")?;
        }
        if now != 0 && n != 0 {
            self.write("sriov_numvfs", "0")?;
        }
        self.write("sriov_numvfs", &n.to_string())?;
        if n == 0 {
            self.write("sriov_drivers_autoprobe", "1")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_write_says_what_it_needs() {
        let dir = PathBuf::from("/sys/bus/pci/devices/0000:01:00.0");
        for name in ["sriov_numvfs", "sriov_drivers_autoprobe"] {
            let path = dir.join(name);
            let e = VfError::Sysfs {
                path: path.clone(),
                value: Some("0".into()),
                source: io::Error::from(io::ErrorKind::PermissionDenied),
            };
            let text = e.to_string();
            assert!(
                text.contains(&format!("needs root (or write access to {})", path.display())),
                "{text}"
            );
            // Another failure, or a read, says no such thing.
            let e = VfError::Sysfs {
                path: path.clone(),
                value: Some("0".into()),
                source: io::Error::from(io::ErrorKind::InvalidInput),
            };
            assert!(!e.to_string().contains("needs root"), "{e}");
            let e = VfError::Sysfs {
                path,
                value: None,
                source: io::Error::from(io::ErrorKind::PermissionDenied),
            };
            assert!(!e.to_string().contains("write access"), "{e}");
        }
    }

    #[test]
    fn sysfs_vfs_through_a_fake_tree() {
        let tmp = tempfile::tempdir().unwrap();
        let root = SysfsRoot::new(tmp.path());
        let pf: PciAddress = "0000:01:00.0".parse().unwrap();
        let dir = root.device_dir(pf);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("sriov_numvfs"), "0\n").unwrap();
        std::fs::write(dir.join("sriov_drivers_autoprobe"), "1\n").unwrap();
        for (i, vf) in ["0000:01:00.1", "0000:01:00.2"].iter().enumerate() {
            std::os::unix::fs::symlink(format!("../{vf}"), dir.join(format!("virtfn{i}"))).unwrap();
        }
        let vfs = SysfsVfs::new(root.clone(), pf).limit(Duration::from_secs(5));
        assert_eq!(vfs.num_vfs().unwrap(), 0);
        let got = vfs.set_num_vfs(2).unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(
            std::fs::read_to_string(dir.join("sriov_drivers_autoprobe")).unwrap(),
            "0"
        );
        assert_eq!(vfs.num_vfs().unwrap(), 2);
        vfs.set_num_vfs(0).unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.join("sriov_drivers_autoprobe")).unwrap(),
            "1"
        );
        std::fs::write(dir.join("sriov_numvfs"), "x").unwrap();
        assert!(matches!(vfs.num_vfs(), Err(VfError::Sysfs { .. })));
    }

    #[test]
    fn change_num_vfs_goes_through_zero_with_autoprobe_off() {
        let tmp = tempfile::tempdir().unwrap();
        let root = SysfsRoot::new(tmp.path());
        let pf: PciAddress = "0000:01:00.0".parse().unwrap();
        let dir = root.device_dir(pf);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("sriov_numvfs"), "2\n").unwrap();
        std::fs::write(dir.join("sriov_drivers_autoprobe"), "1\n").unwrap();
        let vfs = SysfsVfs::new(root, pf).limit(Duration::from_secs(5));
        vfs.change_num_vfs(2, 3).unwrap();
        assert_eq!(std::fs::read_to_string(dir.join("sriov_numvfs")).unwrap(), "3");
        assert_eq!(
            std::fs::read_to_string(dir.join("sriov_drivers_autoprobe")).unwrap(),
            "0"
        );
    }
}
