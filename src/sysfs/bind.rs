//! Binding devices to kernel drivers: what `dpdk-devbind.py` does, through
//! `driver_override` and `drivers_probe`.
//!
//! Writes to `driver_override`, `unbind` and `drivers_probe` take the device lock; these
//! functions are for setup, not for a process that may be holding a device whose removal
//! is pending.
//!
//! # Trees that are not the kernel's sysfs
//!
//! On a fake tree (a [`SysfsRoot`] that is not a sysfs mount, see [`is_kernel_sysfs`])
//! these functions write the tree's files like the kernel's and check what the tree
//! shows (interfaces up, holders), but they do not look up the tree's block devices in
//! this system's `/proc/self/mounts`: a fake `nvme0n1` is not the host's.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use crate::addr::PciAddress;
use crate::error::chain;
use crate::sysfs::scan::SysfsRoot;

/// Why a binding did not happen.
///
/// Every error that [`bind`] returns after it changed something comes after a rollback
/// that put the device back on its previous driver with `driver_override` cleared, except
/// [`BindError::RollbackFailed`], which says where the device was left.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BindError {
    /// The driver name cannot be a driver's: empty, `.` or `..`, or with a `/`, a NUL or
    /// whitespace (it would name another directory, or be cut short by the kernel).
    /// Checked before anything is read or written.
    #[error("invalid driver name \"{name}\": {reason}")]
    BadDriverName {
        /// The name, shortened by [`crate::error::shorten`].
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The device does not exist.
    #[error("no PCI device {0}")]
    NoDevice(PciAddress),
    /// The driver is not registered with the PCI bus (its module is not loaded). Nothing
    /// was changed.
    #[error("driver {driver} is not loaded (modprobe {driver}); {address} left as it was")]
    NoDriver {
        /// The driver asked for.
        driver: String,
        /// The device.
        address: PciAddress,
    },
    /// The device is in use by the host and `force` was not given. Nothing was changed.
    #[error("{address} is in use: {} (use --force to take it anyway)", list(.uses))]
    InUse {
        /// The device.
        address: PciAddress,
        /// What uses it, at least one entry.
        uses: Vec<Use>,
    },
    /// A sysfs write failed. A permission error says what is needed (see
    /// [`permission_hint`]).
    #[error("cannot write {value:?} to {}{}", path.display(), permission_hint(path, source).map(|h| format!(": {h}")).unwrap_or_default())]
    Write {
        /// The file.
        path: PathBuf,
        /// What was written.
        value: String,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The device was removed (unplugged, `remove` written) while it was being bound:
    /// there is nothing to put back.
    #[error("{address} was removed while it was being bound to {driver}")]
    Removed {
        /// The device.
        address: PciAddress,
        /// The driver it was being bound to.
        driver: String,
    },
    /// The probe ran but the device did not end up on the driver.
    #[error(
        "{address} is on {} after probing, not {driver}: {}{}",
        .got.as_deref().unwrap_or("no driver"),
        if .probe.is_some() { "writing drivers_probe failed" } else { "the driver did not take it (see dmesg)" },
        if *.needs_enable_sriov { SRIOV_HINT } else { "" }
    )]
    NotBound {
        /// The device.
        address: PciAddress,
        /// The driver wanted.
        driver: String,
        /// The driver it was on after the probe.
        got: Option<String>,
        /// The error of the `drivers_probe` write, if it failed.
        #[source]
        probe: Option<io::Error>,
        /// The device is an SR-IOV PF, the driver is vfio-pci, and vfio-pci was loaded
        /// without `enable_sriov=Y`.
        needs_enable_sriov: bool,
    },
    /// The bind failed after the previous driver had been unbound (or the override set),
    /// and putting the device back failed too.
    #[error(
        "{} and putting {address} back on {} failed, it is now on {} (to restore by hand: {})",
        chain(.cause),
        .previous.as_deref().unwrap_or("no driver"),
        .now.as_deref().unwrap_or("no driver"),
        restore_hint(*.address, .previous.as_deref())
    )]
    RollbackFailed {
        /// The device.
        address: PciAddress,
        /// The driver it was on before the bind.
        previous: Option<String>,
        /// The driver it is on now.
        now: Option<String>,
        /// Why the bind failed.
        cause: Box<BindError>,
        /// Why the rollback failed.
        #[source]
        rollback: Box<BindError>,
    },
}

const SRIOV_HINT: &str = "; this is an SR-IOV PF: vfio-pci manages a PF's VFs only when loaded with \
     enable_sriov=Y (echo Y > /sys/module/vfio_pci/parameters/enable_sriov)";

fn restore_hint(address: PciAddress, previous: Option<&str>) -> String {
    let clear = format!("echo > /sys/bus/pci/devices/{address}/driver_override");
    match previous {
        Some(p) => format!("{clear}; echo {address} > /sys/bus/pci/drivers/{p}/bind"),
        None => clear,
    }
}

fn list(uses: &[Use]) -> String {
    uses.iter().map(Use::to_string).collect::<Vec<_>>().join("; ")
}

/// One way the host uses a device, found by [`in_use`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Use {
    /// A network interface of the device is up.
    InterfaceUp {
        /// The interface, e.g. `eth0`.
        name: String,
    },
    /// A block device of the device (or a partition of it) is mounted.
    Mounted {
        /// What is mounted, e.g. `/dev/nvme0n1p2`.
        source: String,
        /// Where.
        target: String,
    },
    /// A block device of the device (or a partition of it) is active swap.
    Swap {
        /// The swap area, e.g. `/dev/nvme0n1p3`.
        source: String,
    },
    /// A block device of the device has holders (LVM, MD, dm).
    Holders {
        /// The block device, e.g. `nvme0n1`.
        disk: String,
    },
    /// A block device of the device (or a partition) is open exclusively: a filesystem
    /// mounted in another mount namespace, a ZFS pool, a disk a VM or another program
    /// opened with `O_EXCL`. Found by an `O_EXCL` open of it, which fails with EBUSY.
    OpenExclusively {
        /// The device node, e.g. `/dev/nvme0n1`.
        source: String,
    },
}

impl fmt::Display for Use {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Use::InterfaceUp { name } => write!(f, "network interface {name} is up"),
            Use::Mounted { source, target } => write!(f, "{source} is mounted on {target}"),
            Use::Swap { source } => write!(f, "{source} is in use as swap"),
            Use::Holders { disk } => write!(f, "block device {disk} has holders (LVM, MD or dm)"),
            Use::OpenExclusively { source } => write!(
                f,
                "{source} is open exclusively (a filesystem mounted in another mount namespace, a ZFS pool, a VM's disk)"
            ),
        }
    }
}

/// What a bind changed, so it can be undone with [`restore`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binding {
    /// The device.
    pub address: PciAddress,
    /// The driver it was on before.
    pub previous: Option<String>,
    /// The driver it is on now.
    pub driver: String,
}

/// Whether `root` is the kernel's sysfs (its root and devices directory are sysfs
/// mounts: `statfs` reports `SYSFS_MAGIC`), not a fake tree or a copy. Only then do
/// devices under it correspond to this system's `/dev`, `/proc/self/mounts` and
/// `/dev/vfio`.
///
/// Any sysfs mount qualifies, wherever it is mounted: there is one kernel, and a sysfs
/// mounted in another network namespace (a container's, or the host's bind-mounted into
/// one) differs only in `class/net`, not in its PCI devices or IOMMU groups.
pub fn is_kernel_sysfs(root: &SysfsRoot) -> bool {
    use nix::sys::statfs::{SYSFS_MAGIC, statfs};
    [root.path(), root.devices_dir()]
        .into_iter()
        .all(|p| statfs(p).is_ok_and(|s| s.filesystem_type() == SYSFS_MAGIC))
}

/// The driver `address` is bound to now.
pub fn current_driver(root: &SysfsRoot, address: PciAddress) -> Option<String> {
    std::fs::read_link(root.device_dir(address).join("driver"))
        .ok()
        .and_then(|t| t.file_name().map(|n| n.to_string_lossy().into_owned()))
}

/// Whether a device is on a vfio driver (opened through VFIO like vfio-pci): vfio-pci
/// itself or a vendor's variant of it (`mlx5_vfio_pci`, `hisi_acc_vfio_pci`,
/// `nvgrace_gpu_vfio_pci`, ...). `device_dir` is its sysfs directory, `driver` the name of
/// the driver it is bound to.
///
/// What sysfs shows: every vfio driver registers the device with VFIO, which (on kernels
/// with the vfio device cdev, 6.6 and later, where the iommufd backend opens devices)
/// adds a `vfio-dev/vfioN` directory below the device; that is the one sign that does not
/// depend on the driver's name. Without the cdev there is no such sign, and the name
/// decides: `vfio-pci`, or one ending in `_vfio_pci` (the variants are named after their
/// modules) or `-vfio-pci`. An unbound device is on no driver. Reads no attribute: a
/// directory listing takes no device lock.
pub fn on_vfio(device_dir: &Path, driver: Option<&str>) -> bool {
    let Some(driver) = driver else {
        return false;
    };
    driver == "vfio-pci"
        || driver.ends_with("_vfio_pci")
        || driver.ends_with("-vfio-pci")
        || std::fs::read_dir(device_dir.join("vfio-dev")).is_ok_and(|mut d| d.next().is_some())
}

/// Checks that `name` can be a kernel driver's name, before it becomes part of a path
/// (`bus/pci/drivers/NAME`) or is written to `driver_override`: not empty, not `.` or
/// `..`, no `/`, NUL or whitespace.
pub fn check_driver_name(name: &str) -> Result<(), BindError> {
    let reason = if name.is_empty() {
        "empty"
    } else if name == "." || name == ".." {
        "not a name (a directory)"
    } else if name.contains('/') {
        "contains '/'"
    } else if name.contains('\0') {
        "contains a NUL byte"
    } else if name.chars().any(char::is_whitespace) {
        "contains whitespace"
    } else {
        return Ok(());
    };
    Err(BindError::BadDriverName {
        name: crate::error::shorten(name.as_bytes()),
        reason,
    })
}

/// What a write to `path` that failed with `error` needs, when it was refused for lack of
/// permission (`EACCES`, `EPERM`): "needs root (or write access to PATH)".
pub fn permission_hint(path: &Path, error: &io::Error) -> Option<String> {
    (error.kind() == io::ErrorKind::PermissionDenied)
        .then(|| format!("needs root (or write access to {})", path.display()))
}

fn driver_file(root: &SysfsRoot, driver: &str, file: &str) -> PathBuf {
    root.path().join(format!("bus/pci/drivers/{driver}/{file}"))
}

/// Binds `address` to `driver`: sets `driver_override`, unbinds the current driver,
/// probes. Refuses, unless `force`, a device the host is using (see [`in_use`]), and,
/// before anything else, a name no driver can have ([`check_driver_name`]).
///
/// If a step after the first write fails, the device is put back: `driver_override`
/// cleared, then the previous driver bound again; the error is the step's. If that fails
/// too, the error is [`BindError::RollbackFailed`], which says where the device is.
pub fn bind(root: &SysfsRoot, address: PciAddress, driver: &str, force: bool) -> Result<Binding, BindError> {
    check_driver_name(driver)?;
    let dir = root.device_dir(address);
    if !dir.exists() {
        return Err(BindError::NoDevice(address));
    }
    let previous = current_driver(root, address);
    if previous.as_deref() == Some(driver) {
        return Ok(Binding {
            address,
            previous,
            driver: driver.to_owned(),
        });
    }
    // Checked before anything changes: drivers_probe loads no module, so an unknown
    // driver would leave the device unbound from its old driver and on none.
    if !root.path().join(format!("bus/pci/drivers/{driver}")).is_dir() {
        return Err(BindError::NoDriver {
            driver: driver.to_owned(),
            address,
        });
    }
    if !force && previous.is_some() {
        let uses = in_use(root, address);
        if !uses.is_empty() {
            return Err(BindError::InUse { address, uses });
        }
    }
    // Nothing changed yet if this fails.
    write(&dir.join("driver_override"), driver)?;
    let rest = || {
        if let Some(old) = &previous {
            write(&driver_file(root, old, "unbind"), &address.to_string())?;
        }
        // The kernel's drivers_probe succeeds even when no driver takes the device; the
        // check below is what tells.
        let probe = write(&root.path().join("bus/pci/drivers_probe"), &address.to_string()).err();
        let got = current_driver(root, address);
        if got.is_none() && !dir.exists() {
            return Err(BindError::Removed {
                address,
                driver: driver.to_owned(),
            });
        }
        if got.as_deref() != Some(driver) {
            return Err(BindError::NotBound {
                address,
                driver: driver.to_owned(),
                got,
                probe: probe.map(|e| match e {
                    BindError::Write { source, .. } => source,
                    other => io::Error::other(other.to_string()),
                }),
                needs_enable_sriov: needs_enable_sriov(root, address, driver),
            });
        }
        Ok(())
    };
    match rest() {
        Ok(()) => Ok(Binding {
            address,
            previous,
            driver: driver.to_owned(),
        }),
        Err(cause) => Err(roll_back(root, address, previous, cause)),
    }
}

// Puts a device whose bind failed back where it was; returns the error to report.
fn roll_back(root: &SysfsRoot, address: PciAddress, previous: Option<String>, cause: BindError) -> BindError {
    // A device that is gone has nothing to put back: the removal is the news.
    if matches!(cause, BindError::Removed { .. }) {
        return cause;
    }
    let undo = || {
        // First: while the override names another driver, the previous one cannot bind.
        write(&root.device_dir(address).join("driver_override"), "\n")?;
        let now = current_driver(root, address);
        if now == previous {
            return Ok(());
        }
        if let Some(now) = &now {
            write(&driver_file(root, now, "unbind"), &address.to_string())?;
        }
        match &previous {
            // The kernel's bind write fails when the driver's probe does.
            Some(p) => write(&driver_file(root, p, "bind"), &address.to_string()),
            None => Ok(()),
        }
    };
    match undo() {
        Ok(()) => cause,
        // Removed meanwhile (the undo's writes found no device): that is what happened.
        Err(_) if !root.device_dir(address).exists() => {
            let driver = match &cause {
                BindError::NotBound { driver, .. } => driver.clone(),
                _ => "its new driver".to_owned(),
            };
            BindError::Removed { address, driver }
        }
        Err(rollback) => BindError::RollbackFailed {
            address,
            now: current_driver(root, address),
            previous,
            cause: Box::new(cause),
            rollback: Box::new(rollback),
        },
    }
}

/// Unbinds `address` from its driver and clears `driver_override`. Returns the driver it
/// was on. Refuses, unless `force`, a device the host is using.
pub fn unbind(root: &SysfsRoot, address: PciAddress, force: bool) -> Result<Option<String>, BindError> {
    let dir = root.device_dir(address);
    if !dir.exists() {
        return Err(BindError::NoDevice(address));
    }
    let previous = current_driver(root, address);
    if let Some(old) = &previous {
        if !force {
            let uses = in_use(root, address);
            if !uses.is_empty() {
                return Err(BindError::InUse { address, uses });
            }
        }
        write(&driver_file(root, old, "unbind"), &address.to_string())?;
    }
    // An empty write clears the override, so a later probe finds the native driver.
    write(&dir.join("driver_override"), "\n")?;
    Ok(previous)
}

/// Gives `address` back to the kernel: unbinds it from its driver, clears
/// `driver_override` and asks the kernel to probe it (`drivers_probe`), so its native
/// driver (nvme, ixgbe...) takes it. Returns the driver it is on afterwards. For a device
/// whose previous driver is not known (it was on vfio-pci before this process saw it).
pub fn reprobe(root: &SysfsRoot, address: PciAddress) -> Result<Option<String>, BindError> {
    unbind(root, address, true)?;
    // The kernel's drivers_probe succeeds even when no driver takes the device.
    write(&root.path().join("bus/pci/drivers_probe"), &address.to_string())?;
    Ok(current_driver(root, address))
}

/// Undoes [`bind`]: puts the device back on its previous driver (or none).
pub fn restore(root: &SysfsRoot, binding: &Binding) -> Result<(), BindError> {
    match &binding.previous {
        Some(previous) => {
            bind(root, binding.address, previous, true)?;
            write(&root.device_dir(binding.address).join("driver_override"), "\n")
        }
        None => unbind(root, binding.address, true).map(|_| ()),
    }
}

fn write(path: &Path, value: &str) -> Result<(), BindError> {
    std::fs::write(path, value).map_err(|source| BindError::Write {
        path: path.to_owned(),
        value: value.to_owned(),
        source,
    })
}

fn needs_enable_sriov(root: &SysfsRoot, address: PciAddress, driver: &str) -> bool {
    let dir = root.device_dir(address);
    let is_pf = dir.join("virtfn0").exists() || dir.join("sriov_totalvfs").exists();
    driver.starts_with("vfio")
        && is_pf
        && !std::fs::read_to_string(root.path().join("module/vfio_pci/parameters/enable_sriov"))
            .is_ok_and(|s| s.trim() == "Y")
}

/// How the host uses `address`, if it does: a network interface that is up, or a block
/// device below it with mounted partitions, active swap, holders (LVM, MD), or that is
/// open exclusively ([`held_exclusively`]: mounts of other mount namespaces, ZFS, VMs).
///
/// Mounts are looked up in `/proc/self/mounts`, and device nodes opened, only when `root`
/// is the kernel's sysfs ([`is_kernel_sysfs`]): the block devices of a fake tree are not
/// this system's.
pub fn in_use(root: &SysfsRoot, address: PciAddress) -> Vec<Use> {
    let dir = root.device_dir(address);
    let mut uses = Vec::new();
    for entry in std::fs::read_dir(dir.join("net")).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let flags = std::fs::read_to_string(entry.path().join("flags")).unwrap_or_default();
        let flags = u32::from_str_radix(flags.trim().trim_start_matches("0x"), 16).unwrap_or(0);
        // IFF_UP
        if flags & 1 != 0 {
            uses.push(Use::InterfaceUp { name });
        }
    }
    let kernel = is_kernel_sysfs(root);
    let (mounts, swaps) = if kernel {
        (
            std::fs::read_to_string("/proc/self/mounts").unwrap_or_default(),
            std::fs::read_to_string("/proc/swaps").unwrap_or_default(),
        )
    } else {
        (String::new(), String::new())
    };
    for disk in block_devices(&dir) {
        uses.extend(disk_uses(&disk, &mounts, &swaps));
        let holders = root.path().join(format!("class/block/{disk}/holders"));
        let has_holders = std::fs::read_dir(&holders).is_ok_and(|mut d| d.next().is_some());
        // A mount or a holder already claims the disk exclusively: said once, as that.
        let named = has_holders
            || uses
                .iter()
                .any(|u| matches!(u, Use::Mounted { .. } | Use::Swap { .. }));
        if has_holders {
            uses.push(Use::Holders { disk: disk.clone() });
        }
        if kernel && !named {
            for node in disk_nodes(root, &disk) {
                if held_exclusively(Path::new(&node)) {
                    uses.push(Use::OpenExclusively { source: node });
                }
            }
        }
    }
    uses
}

/// The network interfaces of `address` (the entries of its `net/` directory, e.g.
/// `eth0`), sorted. A directory listing: takes no device lock.
pub fn interfaces(root: &SysfsRoot, address: PciAddress) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(root.device_dir(address).join("net"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// The block devices below `address` (NVMe namespaces such as `nvme0n1`, a SCSI host's
/// `sda`), sorted: the disks [`in_use`] looks at. Directory listings only.
pub fn disks(root: &SysfsRoot, address: PciAddress) -> Vec<String> {
    block_devices(&root.device_dir(address))
}

/// The drivers that hand a device to userspace: `uio_pci_generic`, `igb_uio`, and the
/// vfio drivers ([`on_vfio`]). What dpdk-devbind.py calls DPDK-compatible drivers.
pub const UIO_DRIVERS: [&str; 2] = ["uio_pci_generic", "igb_uio"];

/// Whether a device is on a driver that hands it to userspace: a vfio driver
/// ([`on_vfio`]) or one of [`UIO_DRIVERS`].
pub fn on_userspace_driver(device_dir: &Path, driver: Option<&str>) -> bool {
    driver.is_some_and(|d| UIO_DRIVERS.contains(&d)) || on_vfio(device_dir, driver)
}

/// Whether the block device node `node` is open exclusively by someone (the kernel
/// refuses another exclusive open with EBUSY). The probe's own `O_EXCL` open, if it
/// succeeds, is closed at once. `false` when the node cannot be opened at all.
pub fn held_exclusively(node: &Path) -> bool {
    use std::os::unix::fs::OpenOptionsExt;
    matches!(
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_EXCL | nix::libc::O_NONBLOCK | nix::libc::O_CLOEXEC)
            .open(node),
        Err(e) if e.raw_os_error() == Some(nix::libc::EBUSY)
    )
}

// The device nodes of block device `disk` and its partitions. A namespace behind native
// NVMe multipath shows as `nvmeScCn1` below its controller; its node is the
// subsystem's `nvmeSn1`.
fn disk_nodes(root: &SysfsRoot, disk: &str) -> Vec<String> {
    let head = match disk.split_once('c') {
        Some((s, rest)) if s.starts_with("nvme") && rest.contains('n') => {
            format!("{s}{}", &rest[rest.find('n').unwrap_or(0)..])
        }
        _ => disk.to_owned(),
    };
    let mut nodes = vec![format!("/dev/{head}")];
    for e in std::fs::read_dir(root.path().join(format!("class/block/{head}")))
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with(&head) && name.len() > head.len() {
            nodes.push(format!("/dev/{name}"));
        }
    }
    nodes.retain(|n| Path::new(n).exists());
    nodes
}

// Block devices below a device directory: directories named under a `block` directory,
// found within a few levels (nvme/nvme0/nvme0n1, block/sda, host0/.../block/sda).
// How `/proc/self/mounts` and `/proc/swaps` (their text) use block device `disk` or its
// partitions.
fn disk_uses(disk: &str, mounts: &str, swaps: &str) -> Vec<Use> {
    let dev = format!("/dev/{disk}");
    let ours = |source: &str| {
        source == dev
            || source
                .strip_prefix(&dev)
                .is_some_and(|rest| rest.trim_start_matches('p').parse::<u32>().is_ok())
    };
    let mut uses = Vec::new();
    for line in mounts.lines() {
        let mut fields = line.split_whitespace();
        if let (Some(source), Some(target)) = (fields.next(), fields.next())
            && ours(source)
        {
            uses.push(Use::Mounted {
                source: source.to_owned(),
                target: target.to_owned(),
            });
        }
    }
    // The first line is the header ("Filename Type Size Used Priority").
    for line in swaps.lines().skip(1) {
        if let Some(source) = line.split_whitespace().next()
            && ours(source)
        {
            uses.push(Use::Swap {
                source: source.to_owned(),
            });
        }
    }
    uses
}

fn block_devices(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for entry in walkdir::WalkDir::new(dir)
        .min_depth(1)
        .max_depth(6)
        .follow_links(false)
    {
        let Ok(entry) = entry else { continue };
        if !entry.file_type().is_dir() {
            continue;
        }
        let name = entry.file_name().to_string_lossy();
        let parent = entry
            .path()
            .parent()
            .and_then(|p| p.file_name())
            .map(|n| n.to_string_lossy());
        let nvme_ns = name.starts_with("nvme") && name[4..].contains('n');
        if parent.as_deref() == Some("block")
            || (nvme_ns && entry.path().join("dev").exists() && entry.path().join("size").exists())
        {
            out.push(name.into_owned());
        }
    }
    out.sort();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mounts_and_swap_of_the_disk_and_its_partitions_are_uses_others_are_not() {
        let mounts = "/dev/nvme0n1p1 /boot ext4 rw 0 0\n/dev/nvme10n1 /data xfs rw 0 0\n\
                      proc /proc proc rw 0 0\n/dev/nvme0n1 /raw ext4 rw 0 0\n";
        let swaps = "Filename\tType\tSize\tUsed\tPriority\n\
                     /dev/nvme0n1p3 partition 8388604 0 -2\n/swapfile file 1024 0 -3\n";
        assert_eq!(
            disk_uses("nvme0n1", mounts, swaps),
            [
                Use::Mounted {
                    source: "/dev/nvme0n1p1".into(),
                    target: "/boot".into()
                },
                Use::Mounted {
                    source: "/dev/nvme0n1".into(),
                    target: "/raw".into()
                },
                Use::Swap {
                    source: "/dev/nvme0n1p3".into()
                },
            ]
        );
        // nvme10n1 is another disk; sdb only swaps to a file.
        assert!(disk_uses("nvme1n1", mounts, swaps).is_empty());
        assert!(disk_uses("sdb", "", swaps).is_empty());
        assert_eq!(
            Use::Swap {
                source: "/dev/nvme0n1p3".into()
            }
            .to_string(),
            "/dev/nvme0n1p3 is in use as swap"
        );
    }

    #[test]
    fn a_driver_that_is_not_loaded_changes_nothing() {
        let t = tempfile::tempdir().unwrap();
        let addr: PciAddress = "0000:01:00.0".parse().unwrap();
        let dev = t.path().join("bus/pci/devices/0000:01:00.0");
        std::fs::create_dir_all(&dev).unwrap();
        std::fs::create_dir_all(t.path().join("bus/pci/drivers/nvme")).unwrap();
        std::os::unix::fs::symlink("../../drivers/nvme", dev.join("driver")).unwrap();
        std::fs::write(dev.join("driver_override"), "(null)\n").unwrap();
        let root = SysfsRoot::new(t.path());
        let e = bind(&root, addr, "no-such-driver", false).unwrap_err();
        assert!(
            matches!(e, BindError::NoDriver { ref driver, address } if driver == "no-such-driver" && address == addr)
        );
        assert!(e.to_string().contains("not loaded"));
        assert_eq!(
            std::fs::read_to_string(dev.join("driver_override")).unwrap(),
            "(null)\n"
        );
        assert!(
            !t.path().join("bus/pci/drivers/nvme/unbind").exists(),
            "nothing unbound"
        );
        assert_eq!(current_driver(&root, addr).as_deref(), Some("nvme"));
    }

    #[test]
    fn vfio_pci_and_its_variants_are_vfio_drivers_by_name_or_by_vfio_dev() {
        let t = tempfile::tempdir().unwrap();
        for (driver, on) in [
            ("vfio-pci", true),
            ("mlx5_vfio_pci", true),
            ("nvme_vfio_pci", true),
            ("acme-vfio-pci", true),
            ("nvme", false),
            ("vfio_pci_x", false),
            ("vfiopci", false),
        ] {
            assert_eq!(on_vfio(t.path(), Some(driver)), on, "{driver}");
        }
        assert!(!on_vfio(t.path(), None));
        std::fs::create_dir(t.path().join("vfio-dev")).unwrap();
        assert!(
            !on_vfio(t.path(), Some("acme")),
            "an empty vfio-dev/ is no device"
        );
        std::fs::create_dir(t.path().join("vfio-dev/vfio0")).unwrap();
        assert!(on_vfio(t.path(), Some("acme")));
        assert!(!on_vfio(t.path(), None), "unbound");
    }

    const ADDR: &str = "0000:01:00.0";

    /// A device on `nvme` with `vfio-pci` loaded: the kernel's files as regular files.
    fn tree() -> (tempfile::TempDir, SysfsRoot, PathBuf) {
        let t = tempfile::tempdir().unwrap();
        let dev = t.path().join("bus/pci/devices").join(ADDR);
        std::fs::create_dir_all(&dev).unwrap();
        for d in ["nvme", "vfio-pci"] {
            let drv = t.path().join("bus/pci/drivers").join(d);
            std::fs::create_dir_all(&drv).unwrap();
            std::fs::write(drv.join("bind"), "").unwrap();
            std::fs::write(drv.join("unbind"), "").unwrap();
        }
        std::fs::write(t.path().join("bus/pci/drivers_probe"), "").unwrap();
        std::os::unix::fs::symlink("../../drivers/nvme", dev.join("driver")).unwrap();
        std::fs::write(dev.join("driver_override"), "(null)\n").unwrap();
        let root = SysfsRoot::new(t.path());
        (t, root, dev)
    }

    /// Plays the kernel for one bind: `nvme/unbind` and `drivers_probe` become named pipes;
    /// an unbind takes the device off nvme (removes its `driver` link) before the probe can
    /// start, and the probe binds nothing (vfio-pci's probe refused the device: the write
    /// succeeds, as the kernel's does). Returns what each received.
    fn kernel_whose_probe_fails(root: &SysfsRoot, dev: &Path) -> std::thread::JoinHandle<(String, String)> {
        let unbind = root.path().join("bus/pci/drivers/nvme/unbind");
        let probe = root.path().join("bus/pci/drivers_probe");
        for fifo in [&unbind, &probe] {
            std::fs::remove_file(fifo).unwrap();
            nix::unistd::mkfifo(fifo.as_path(), nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        }
        let link = dev.join("driver");
        std::thread::spawn(move || {
            let unbound = std::fs::read_to_string(&unbind).unwrap();
            std::fs::remove_file(&link).unwrap();
            let probed = std::fs::read_to_string(&probe).unwrap();
            (unbound, probed)
        })
    }

    #[test]
    fn a_device_removed_while_it_is_bound_is_reported_removed_not_unbound() {
        // Issue 14 §2: the removal hits during the probe; the old message blamed the driver
        // (and, for a PF, vfio-pci's enable_sriov) and said putting it back had failed.
        let (_t, root, dev) = tree();
        let addr: PciAddress = ADDR.parse().unwrap();
        let unbind = root.path().join("bus/pci/drivers/nvme/unbind");
        let probe = root.path().join("bus/pci/drivers_probe");
        for fifo in [&unbind, &probe] {
            std::fs::remove_file(fifo).unwrap();
            nix::unistd::mkfifo(fifo.as_path(), nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        }
        let gone = dev.clone();
        let kernel = std::thread::spawn(move || {
            std::fs::read_to_string(&unbind).unwrap();
            // Removed (hot-unplug, sysfs remove) right after the unbind, before the probe
            // write can open its file.
            std::fs::remove_dir_all(&gone).unwrap();
            std::fs::read_to_string(&probe).unwrap();
        });
        let e = bind(&root, addr, "vfio-pci", false).unwrap_err();
        kernel.join().unwrap();
        assert!(
            matches!(e, BindError::Removed { address, ref driver } if address == addr && driver == "vfio-pci"),
            "{e:?}"
        );
        let text = e.to_string();
        assert!(
            text.contains("removed") && !text.contains("enable_sriov") && !text.contains("back"),
            "{text}"
        );
    }

    #[test]
    fn a_bind_that_fails_after_the_unbind_puts_the_old_driver_back() {
        let (t, root, dev) = tree();
        let addr: PciAddress = ADDR.parse().unwrap();
        let kernel = kernel_whose_probe_fails(&root, &dev);
        let e = bind(&root, addr, "vfio-pci", false).unwrap_err();
        let (unbound, probed) = kernel.join().unwrap();
        assert_eq!((unbound.as_str(), probed.as_str()), (ADDR, ADDR));
        assert!(
            matches!(e, BindError::NotBound { ref driver, got: None, .. } if driver == "vfio-pci"),
            "{e:?}"
        );
        // Rolled back: the override cleared (else nvme could not bind), then nvme's bind.
        assert_eq!(
            std::fs::read_to_string(dev.join("driver_override")).unwrap(),
            "\n"
        );
        assert_eq!(
            std::fs::read_to_string(t.path().join("bus/pci/drivers/nvme/bind")).unwrap(),
            ADDR
        );
        assert_eq!(
            std::fs::read_to_string(t.path().join("bus/pci/drivers/vfio-pci/unbind")).unwrap(),
            ""
        );
    }

    #[test]
    fn a_failed_unbind_clears_the_override_and_keeps_the_io_error() {
        let (t, root, dev) = tree();
        let addr: PciAddress = ADDR.parse().unwrap();
        let unbind = t.path().join("bus/pci/drivers/nvme/unbind");
        std::fs::remove_file(&unbind).unwrap();
        std::fs::create_dir(&unbind).unwrap();
        let e = bind(&root, addr, "vfio-pci", false).unwrap_err();
        let BindError::Write {
            ref path,
            ref value,
            ref source,
        } = e
        else {
            panic!("{e:?}")
        };
        assert_eq!((path, value.as_str()), (&unbind, ADDR));
        assert_eq!(source.raw_os_error(), Some(nix::errno::Errno::EISDIR as i32));
        assert_no_cause_twice(&e);
        // Still on nvme: nothing to rebind, but the override no longer names vfio-pci.
        assert_eq!(
            std::fs::read_to_string(dev.join("driver_override")).unwrap(),
            "\n"
        );
        assert_eq!(
            std::fs::read_to_string(t.path().join("bus/pci/drivers/nvme/bind")).unwrap(),
            ""
        );
    }

    #[test]
    fn a_failed_rollback_says_where_the_device_is_and_keeps_both_errors() {
        let (t, root, dev) = tree();
        let addr: PciAddress = ADDR.parse().unwrap();
        let old_bind = t.path().join("bus/pci/drivers/nvme/bind");
        std::fs::remove_file(&old_bind).unwrap();
        std::fs::create_dir(&old_bind).unwrap();
        let kernel = kernel_whose_probe_fails(&root, &dev);
        let e = bind(&root, addr, "vfio-pci", false).unwrap_err();
        kernel.join().unwrap();
        let BindError::RollbackFailed {
            address,
            ref previous,
            ref now,
            ref cause,
            ref rollback,
        } = e
        else {
            panic!("{e:?}")
        };
        assert_eq!(address, addr);
        assert_eq!((previous.as_deref(), now.as_deref()), (Some("nvme"), None));
        assert!(matches!(**cause, BindError::NotBound { .. }), "{cause:?}");
        assert!(
            matches!(**rollback, BindError::Write { ref path, .. } if *path == old_bind),
            "{rollback:?}"
        );
        let msg = e.to_string();
        assert!(msg.contains("now on no driver"), "{msg}");
        assert!(msg.contains("/bus/pci/drivers/nvme/bind"), "{msg}");
        assert_no_cause_twice(&e);
    }

    #[test]
    fn a_probe_write_error_is_the_source_not_prose() {
        let (t, root, _dev) = tree();
        let addr: PciAddress = ADDR.parse().unwrap();
        let probe = t.path().join("bus/pci/drivers_probe");
        std::fs::remove_file(&probe).unwrap();
        std::fs::create_dir(&probe).unwrap();
        let e = bind(&root, addr, "vfio-pci", false).unwrap_err();
        let BindError::NotBound {
            probe: Some(ref io), ..
        } = e
        else {
            panic!("{e:?}")
        };
        assert_eq!(io.raw_os_error(), Some(nix::errno::Errno::EISDIR as i32));
        assert_no_cause_twice(&e);
    }

    // A reporter prints each error of the source chain: no message may repeat its source's.
    fn assert_no_cause_twice(e: &(dyn std::error::Error + 'static)) {
        let mut e = e;
        while let Some(source) = e.source() {
            let (msg, inner) = (e.to_string(), source.to_string());
            assert!(!msg.contains(&inner), "{msg:?} repeats its source {inner:?}");
            e = source;
        }
    }

    #[test]
    fn only_a_sysfs_mount_is_the_kernels_sysfs() {
        let (t, root, _dev) = tree();
        assert!(!is_kernel_sysfs(&root));
        // /sys on any Linux machine that runs these tests (containers included).
        let sys = SysfsRoot::new("/sys");
        if sys.devices_dir().is_dir() {
            assert!(is_kernel_sysfs(&sys));
            assert!(!is_kernel_sysfs(&SysfsRoot::from_devices_dir(t.path())));
        }
    }

    #[test]
    fn interfaces_and_disks_of_a_device_are_listed_sorted() {
        let t = tempfile::tempdir().unwrap();
        let addr: PciAddress = ADDR.parse().unwrap();
        let root = SysfsRoot::new(t.path());
        let dev = root.device_dir(addr);
        std::fs::create_dir_all(&dev).unwrap();
        assert!(interfaces(&root, addr).is_empty());
        assert!(disks(&root, addr).is_empty());
        for i in ["eth1", "eth0"] {
            std::fs::create_dir_all(dev.join("net").join(i)).unwrap();
        }
        for ns in ["nvme0n2", "nvme0n1"] {
            let ns = dev.join("nvme/nvme0").join(ns);
            std::fs::create_dir_all(&ns).unwrap();
            std::fs::write(ns.join("dev"), "259:0\n").unwrap();
            std::fs::write(ns.join("size"), "8\n").unwrap();
        }
        assert_eq!(interfaces(&root, addr), ["eth0", "eth1"]);
        assert_eq!(disks(&root, addr), ["nvme0n1", "nvme0n2"]);
    }

    #[test]
    fn uio_and_vfio_drivers_are_userspace_drivers_kernel_ones_are_not() {
        let t = tempfile::tempdir().unwrap();
        for (driver, userspace) in [
            (Some("vfio-pci"), true),
            (Some("mlx5_vfio_pci"), true),
            (Some("uio_pci_generic"), true),
            (Some("igb_uio"), true),
            (Some("nvme"), false),
            (Some("uio"), false),
            (None, false),
        ] {
            assert_eq!(on_userspace_driver(t.path(), driver), userspace, "{driver:?}");
        }
    }

    #[test]
    fn finds_block_devices_below_a_device() {
        let t = tempfile::tempdir().unwrap();
        let ns = t.path().join("nvme/nvme0/nvme0n1");
        std::fs::create_dir_all(&ns).unwrap();
        std::fs::write(ns.join("dev"), "259:0\n").unwrap();
        std::fs::write(ns.join("size"), "131072\n").unwrap();
        std::fs::create_dir_all(t.path().join("host0/target0:0:0/0:0:0:0/block/sda")).unwrap();
        assert_eq!(
            block_devices(t.path()),
            vec!["nvme0n1".to_owned(), "sda".to_owned()]
        );
    }

    #[test]
    fn names_no_driver_can_have_are_refused() {
        for ok in ["vfio-pci", "nvme", "mlx5_vfio_pci", "uio_pci_generic"] {
            assert!(check_driver_name(ok).is_ok(), "{ok}");
        }
        for (bad, why) in [
            ("", "empty"),
            (".", "directory"),
            ("..", "directory"),
            ("../nvme", "'/'"),
            ("vfio-pci/", "'/'"),
            ("vfio\0pci", "NUL"),
            ("vfio pci", "whitespace"),
            ("vfio-pci\n", "whitespace"),
        ] {
            let e = check_driver_name(bad).unwrap_err().to_string();
            assert!(e.starts_with("invalid driver name"), "{bad:?}: {e}");
            assert!(e.contains(why), "{bad:?}: {e}");
        }
        let long = "x".repeat(100_000);
        assert!(
            check_driver_name(&format!("{long} "))
                .unwrap_err()
                .to_string()
                .len()
                < 200
        );
    }

    #[test]
    fn a_refused_write_says_it_needs_root() {
        use nix::errno::Errno;
        let path = Path::new("/sys/bus/pci/drivers/nvme/unbind");
        for errno in [Errno::EACCES, Errno::EPERM] {
            let e = BindError::Write {
                path: path.to_owned(),
                value: "0000:01:00.0".into(),
                source: io::Error::from_raw_os_error(errno as i32),
            };
            assert_eq!(
                e.to_string(),
                "cannot write \"0000:01:00.0\" to /sys/bus/pci/drivers/nvme/unbind: needs root \
                 (or write access to /sys/bus/pci/drivers/nvme/unbind)"
            );
        }
        let e = BindError::Write {
            path: path.to_owned(),
            value: "0000:01:00.0".into(),
            source: io::Error::from_raw_os_error(Errno::ENODEV as i32),
        };
        assert!(!e.to_string().contains("root"), "{e}");
    }
}
