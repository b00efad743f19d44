//! Binding devices to kernel drivers: what `dpdk-devbind.py` does, through
//! `driver_override` and `drivers_probe`.
//!
//! Writes to `driver_override`, `unbind` and `drivers_probe` take the device lock; these
//! functions are for setup, not for a process that may be holding a device whose removal
//! is pending.

use std::io;
use std::path::{Path, PathBuf};

use crate::PciAddress;
use crate::sysfs::scan::SysfsRoot;

/// Why a binding did not happen.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BindError {
    /// The device does not exist.
    #[error("no PCI device {0}")]
    NoDevice(PciAddress),
    /// The driver is not registered with the PCI bus (its module is not loaded). Nothing
    /// was changed.
    #[error("driver {0} is not loaded (modprobe {0}); {1} left as it was")]
    NoDriver(String, PciAddress),
    /// The device is in use by the host and `force` was not given.
    #[error("{address} is in use: {reason} (use --force to take it anyway)")]
    InUse {
        /// The device.
        address: PciAddress,
        /// What uses it.
        reason: String,
    },
    /// A sysfs write failed.
    #[error("write {value:?} to {}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// What was written.
        value: String,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The probe ran but the device did not end up on the driver.
    #[error("{address} is on {} after probing, not {driver}{hint}", got.as_deref().unwrap_or("no driver"))]
    NotBound {
        /// The device.
        address: PciAddress,
        /// The driver wanted.
        driver: String,
        /// The driver it is on.
        got: Option<String>,
        /// Advice.
        hint: String,
    },
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

/// The driver `address` is bound to now.
pub fn current_driver(root: &SysfsRoot, address: PciAddress) -> Option<String> {
    std::fs::read_link(root.device_dir(address).join("driver"))
        .ok()
        .and_then(|t| t.file_name().map(|n| n.to_string_lossy().into_owned()))
}

/// Binds `address` to `driver`: sets `driver_override`, unbinds the current driver,
/// probes. Refuses, unless `force`, a device the host is using (a network interface that
/// is up, a block device with mounted partitions or holders).
pub fn bind(root: &SysfsRoot, address: PciAddress, driver: &str, force: bool) -> Result<Binding, BindError> {
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
        return Err(BindError::NoDriver(driver.to_owned(), address));
    }
    if !force
        && previous.is_some()
        && let Some(reason) = in_use(root, address)
    {
        return Err(BindError::InUse { address, reason });
    }
    write(&dir.join("driver_override"), driver)?;
    if let Some(old) = &previous {
        write(
            &root.path().join(format!("bus/pci/drivers/{old}/unbind")),
            &address.to_string(),
        )?;
    }
    // A probe error (no driver accepted it) shows as the check below failing.
    let probe = write(&root.path().join("bus/pci/drivers_probe"), &address.to_string());
    let got = current_driver(root, address);
    if got.as_deref() != Some(driver) {
        return Err(BindError::NotBound {
            address,
            driver: driver.to_owned(),
            got,
            hint: bind_hint(root, address, driver, probe.err()),
        });
    }
    Ok(Binding {
        address,
        previous,
        driver: driver.to_owned(),
    })
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
        if !force && let Some(reason) = in_use(root, address) {
            return Err(BindError::InUse { address, reason });
        }
        write(
            &root.path().join(format!("bus/pci/drivers/{old}/unbind")),
            &address.to_string(),
        )?;
    }
    // An empty write clears the override, so a later probe finds the native driver.
    write(&dir.join("driver_override"), "\n")?;
    Ok(previous)
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

fn bind_hint(root: &SysfsRoot, address: PciAddress, driver: &str, probe: Option<BindError>) -> String {
    let mut hint = String::new();
    if !root.path().join(format!("bus/pci/drivers/{driver}")).exists() {
        hint.push_str(&format!(": driver {driver} is not loaded (modprobe {driver})"));
    } else if let Some(e) = probe {
        let cause = match &e {
            BindError::Write { source, .. } => source.to_string(),
            other => other.to_string(),
        };
        hint.push_str(&format!(": the probe failed ({cause}); see dmesg"));
    }
    let dir = root.device_dir(address);
    let has_vfs = dir.join("virtfn0").exists();
    if driver.starts_with("vfio") && (has_vfs || dir.join("sriov_totalvfs").exists()) {
        let enabled = std::fs::read_to_string(root.path().join("module/vfio_pci/parameters/enable_sriov"))
            .map(|s| s.trim() == "Y")
            .unwrap_or(false);
        if !enabled {
            hint.push_str(
                "; this is an SR-IOV PF: vfio-pci manages a PF's VFs only when loaded with \
                 enable_sriov=Y (echo Y > /sys/module/vfio_pci/parameters/enable_sriov)",
            );
        }
    }
    hint
}

/// Why the host is using `address`, if it is: a network interface that is up, or a block
/// device below it with mounted partitions or holders (LVM, MD).
pub fn in_use(root: &SysfsRoot, address: PciAddress) -> Option<String> {
    let dir = root.device_dir(address);
    let mut reasons = Vec::new();
    for entry in std::fs::read_dir(dir.join("net")).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let flags = std::fs::read_to_string(entry.path().join("flags")).unwrap_or_default();
        let flags = u32::from_str_radix(flags.trim().trim_start_matches("0x"), 16).unwrap_or(0);
        // IFF_UP
        if flags & 1 != 0 {
            reasons.push(format!("network interface {name} is up"));
        }
    }
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    for disk in block_devices(&dir) {
        let dev = format!("/dev/{disk}");
        for line in mounts.lines() {
            let mut fields = line.split_whitespace();
            let (Some(source), Some(target)) = (fields.next(), fields.next()) else {
                continue;
            };
            if source == dev
                || source
                    .strip_prefix(&dev)
                    .is_some_and(|rest| rest.trim_start_matches('p').parse::<u32>().is_ok())
            {
                reasons.push(format!("{source} is mounted on {target}"));
            }
        }
        let holders = root.path().join(format!("class/block/{disk}/holders"));
        if std::fs::read_dir(&holders).is_ok_and(|mut d| d.next().is_some()) {
            reasons.push(format!("block device {disk} has holders (LVM, MD or dm)"));
        }
    }
    (!reasons.is_empty()).then(|| reasons.join("; "))
}

// Block devices below a device directory: directories named under a `block` directory,
// found within a few levels (nvme/nvme0/nvme0n1, block/sda, host0/.../block/sda).
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
        assert!(matches!(e, BindError::NoDriver(ref d, a) if d == "no-such-driver" && a == addr));
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
}
