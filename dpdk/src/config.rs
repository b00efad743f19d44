//! Config space of a device through its sysfs `config` file: the safe half of
//! `rte_pci_read_config`, `rte_pci_write_config`, `rte_pci_find_ext_capability`,
//! `rte_pci_set_bus_master` and `rte_pci_pasid_set_state`.
//!
//! The `config` file takes no device lock (unlike `sriov_numvfs`), so it is safe on a device
//! whose removal is pending; the kernel serves it for any driver binding (vfio-pci, uio, none).
//! A device this process has mapped through VFIO is read and written through its VFIO
//! config region instead (as the stock bus does), so vfio-pci's virtualisation of config
//! space (Command, MSI/MSI-X, BARs) sees every access.

use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use crate::vfio_pci;

/// Where the PCI devices are: `$SYSFS_PCI_DEVICES`, else `/sys/bus/pci/devices` (as DPDK).
pub fn sysfs_devices_dir() -> PathBuf {
    std::env::var_os("SYSFS_PCI_DEVICES").map_or_else(|| PathBuf::from("/sys/bus/pci/devices"), PathBuf::from)
}

fn config_path(name: &str) -> PathBuf {
    sysfs_devices_dir().join(name).join("config")
}

/// Reads up to `buf.len()` bytes at `offset` of `name`'s config space; the count read.
pub fn read(name: &str, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let len = buf.len();
    if let Some(r) =
        vfio_pci::config_access(name, offset, len, |fd, pos| vfio_pci::sys::read_at(fd, buf, pos))
    {
        return r;
    }
    OpenOptions::new()
        .read(true)
        .open(config_path(name))?
        .read_at(buf, offset)
}

/// Writes `buf` at `offset` of `name`'s config space; the count written.
pub fn write(name: &str, buf: &[u8], offset: u64) -> io::Result<usize> {
    if let Some(r) = vfio_pci::config_access(name, offset, buf.len(), |fd, pos| {
        vfio_pci::sys::write_at(fd, buf, pos)
    }) {
        return r;
    }
    OpenOptions::new()
        .write(true)
        .open(config_path(name))?
        .write_at(buf, offset)
}

fn read_exact<const N: usize>(name: &str, offset: u64) -> io::Result<[u8; N]> {
    let mut buf = [0u8; N];
    match read(name, &mut buf, offset)? {
        n if n == N => Ok(buf),
        n => Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("config space of {name}: {n} of {N} bytes at {offset:#x}"),
        )),
    }
}

/// First extended capability with ID `cap` (from offset 0x100): its offset, `None` when
/// absent. A loop in the list ends the walk (at most (4096 - 256) / 4 headers).
pub fn find_ext_capability(name: &str, cap: u16) -> io::Result<Option<u64>> {
    let mut pos = 0x100u64;
    for _ in 0..(4096 - 256) / 4 {
        let header = u32::from_le_bytes(read_exact::<4>(name, pos)?);
        if header == 0 || header == u32::MAX {
            return Ok(None);
        }
        if (header & 0xffff) as u16 == cap {
            return Ok(Some(pos));
        }
        let next = u64::from((header >> 20) & 0xffc);
        if next < 0x100 {
            return Ok(None);
        }
        pos = next;
    }
    Ok(None)
}

/// Bus Master Enable, bit 2 of the Command register (offset 4).
const COMMAND: u64 = 0x04;
const BUS_MASTER: u16 = 1 << 2;

/// Sets or clears Bus Master Enable; writes only when it changes.
pub fn set_bus_master(name: &str, enable: bool) -> io::Result<()> {
    let old = u16::from_le_bytes(read_exact::<2>(name, COMMAND)?);
    let new = if enable {
        old | BUS_MASTER
    } else {
        old & !BUS_MASTER
    };
    if new != old {
        let n = write(name, &new.to_le_bytes(), COMMAND)?;
        if n != 2 {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                format!("config space of {name}: command write short"),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    /// A fake device directory with a 4 KiB config file, under a private SYSFS_PCI_DEVICES.
    /// One test sets the variable (the others in this module only read through it).
    #[test]
    fn config_helpers_walk_ext_caps_and_toggle_bus_master() {
        let dir = std::env::temp_dir().join(format!("pcibus-dpdk-config-{}", std::process::id()));
        let dev = dir.join("0000:00:04.0");
        fs::create_dir_all(&dev).unwrap();
        let mut cfg = vec![0u8; 4096];
        cfg[4] = 0x02; // memory space on, bus master off
        // 0x100: AER (id 1) -> 0x140: SR-IOV (id 0x10) -> end.
        cfg[0x100..0x104].copy_from_slice(&(0x0001u32 | (1 << 16) | (0x140 << 20)).to_le_bytes());
        cfg[0x140..0x144].copy_from_slice(&(0x0010u32 | (1 << 16)).to_le_bytes());
        fs::write(dev.join("config"), &cfg).unwrap();
        // SAFETY: set_var is unsafe in edition 2024 because of concurrent environment
        // access; no other test in this crate reads or writes SYSFS_PCI_DEVICES concurrently.
        unsafe { std::env::set_var("SYSFS_PCI_DEVICES", &dir) };

        let name = "0000:00:04.0";
        assert_eq!(find_ext_capability(name, 0x10).unwrap(), Some(0x140));
        assert_eq!(find_ext_capability(name, 0x1b).unwrap(), None);
        set_bus_master(name, true).unwrap();
        assert_eq!(fs::read(dev.join("config")).unwrap()[4], 0x06);
        set_bus_master(name, false).unwrap();
        assert_eq!(fs::read(dev.join("config")).unwrap()[4], 0x02);
        let mut buf = [0u8; 2];
        assert_eq!(read(name, &mut buf, 4).unwrap(), 2);
        assert!(read("0000:00:05.0", &mut buf, 0).is_err());
        fs::remove_dir_all(&dir).unwrap();
    }
}
