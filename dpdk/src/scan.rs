//! The safe half of the bus's `scan`: a [`pcibus::Scanner`] walk turned into what DPDK
//! 22.11's `pci_scan_one` puts in each `struct rte_pci_device` ([`ScannedDevice`]), and
//! the allow/block decision of `rte_pci_ignore_device` ([`Filter`]).
//!
//! What differs from the stock bus: the walk reads only attributes that take no device
//! lock (never `sriov_numvfs`), so a device whose removal is pending cannot block it.
//! `max_vfs` (the stock bus reads `sriov_numvfs`) comes from NumVFs in the SR-IOV
//! capability, read from the `config` file on a guard thread with a deadline, only for
//! PFs (devices with `sriov_totalvfs`), and never for a device whose removal is pending
//! (0 and a log line then, or when the read fails or does not come in time).
//!
//! What is kept: devices with no kernel driver are not listed (the stock bus frees them);
//! `kdrv` from the driver's name; `numa_node` -1 (`SOCKET_ID_ANY`) when the kernel has
//! none; a BAR's `phys_addr`/`len` only for memory BARs (`IORESOURCE_MEM`). A device whose
//! ids cannot be read is left out with a log line (the stock bus fails the whole scan).

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use core::ffi::c_int;

use pcibus::model::{ResourceSlot, flags};
use pcibus::removal::registry::RemovalRegistry;
use pcibus::sysfs::scan::{ScanError, Scanner, SysfsRoot};
use pcibus::{BlockingPool, DeviceRecord, PciAddress};

use crate::ffi::types::measured::{
    RTE_BUS_SCAN_ALLOWLIST, RTE_DEV_ALLOWED, RTE_DEV_BLOCKED, RTE_PCI_KDRV_IGB_UIO, RTE_PCI_KDRV_UIO_GENERIC,
    RTE_PCI_KDRV_UNKNOWN, RTE_PCI_KDRV_VFIO,
};
use crate::ffi::types::{PCI_MAX_RESOURCE, RtePciAddr, RtePciId};
use crate::log;

/// `SOCKET_ID_ANY`.
pub const SOCKET_ID_ANY: c_int = -1;

/// How long the guarded `config` read for `max_vfs` may take.
pub const CONFIG_DEADLINE: Duration = Duration::from_secs(1);

/// What the scan learned about one device, in the fields of `struct rte_pci_device`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScannedDevice {
    /// `addr`.
    pub addr: RtePciAddr,
    /// `id` (class in 24 bits).
    pub id: RtePciId,
    /// `mem_resource[i].phys_addr` and `.len`.
    pub mem: [(u64, u64); PCI_MAX_RESOURCE],
    /// `device.numa_node`.
    pub numa_node: c_int,
    /// `kdrv`.
    pub kdrv: c_int,
    /// `max_vfs`: NumVFs of the SR-IOV capability, 0 without one.
    pub max_vfs: u16,
}

/// The process's removal registry: what `hot_unplug_handler` (the VFIO request notifier)
/// marks and every scan consults.
pub fn registry() -> &'static Arc<RemovalRegistry> {
    static REGISTRY: OnceLock<Arc<RemovalRegistry>> = OnceLock::new();
    REGISTRY.get_or_init(|| Arc::new(RemovalRegistry::new()))
}

/// Converts between DPDK's and pcibus's addresses (`None`: not a valid function address,
/// e.g. device 0x20, which no sysfs lists).
pub fn to_pcibus(addr: RtePciAddr) -> Option<PciAddress> {
    PciAddress::new(addr.domain, addr.bus, addr.devid, addr.function)
}

/// pcibus's address as DPDK's.
pub fn to_rte(addr: PciAddress) -> RtePciAddr {
    RtePciAddr {
        domain: addr.domain(),
        bus: addr.bus(),
        devid: addr.device(),
        function: addr.function(),
    }
}

/// The name DPDK gives a device (`PCI_PRI_FMT`: `0000:00:04.0`).
pub fn device_name(addr: RtePciAddr) -> String {
    format!(
        "{:04x}:{:02x}:{:02x}.{:x}",
        addr.domain, addr.bus, addr.devid, addr.function
    )
}

/// Sort key of `rte_pci_addr_cmp`.
pub fn addr_key(addr: RtePciAddr) -> (u32, u8, u8, u8) {
    (addr.domain, addr.bus, addr.devid, addr.function)
}

/// `kdrv` of a bound kernel driver (`pci_scan_one`'s names), `None` when none is bound.
pub fn kdrv_of(driver: Option<&str>) -> Option<c_int> {
    Some(match driver? {
        "vfio-pci" => RTE_PCI_KDRV_VFIO,
        "igb_uio" => RTE_PCI_KDRV_IGB_UIO,
        "uio_pci_generic" => RTE_PCI_KDRV_UIO_GENERIC,
        _ => RTE_PCI_KDRV_UNKNOWN,
    })
}

/// Which devices a scan looks at: `rte_pci_ignore_device` decided before any attribute is
/// read (pcibus's allow and block lists), from EAL's devargs of the "pci" bus.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    /// Allow-list mode: only these.
    pub allow: Option<Vec<PciAddress>>,
    /// Never these.
    pub block: Vec<PciAddress>,
}

impl Filter {
    /// The filter of `scan_mode` (`rte_bus_conf.scan_mode`) and the devargs as
    /// `(address, policy)` in EAL's order. As `pci_devargs_lookup`, the first devargs of an
    /// address decides: allow-list mode keeps the addresses whose first devargs allows;
    /// the other modes drop those whose first devargs blocks.
    pub fn new(scan_mode: c_int, devargs: &[(RtePciAddr, c_int)]) -> Self {
        let mut first: BTreeMap<PciAddress, c_int> = BTreeMap::new();
        for &(addr, policy) in devargs {
            if let Some(a) = to_pcibus(addr) {
                first.entry(a).or_insert(policy);
            }
        }
        let with = |p: c_int| first.iter().filter(move |(_, v)| **v == p).map(|(a, _)| *a);
        if scan_mode == RTE_BUS_SCAN_ALLOWLIST {
            Filter {
                allow: Some(with(RTE_DEV_ALLOWED).collect()),
                block: Vec::new(),
            }
        } else {
            Filter {
                allow: None,
                block: with(RTE_DEV_BLOCKED).collect(),
            }
        }
    }
}

/// Scans `root` with `filter`: the devices DPDK would list, sorted by address.
pub fn scan(root: SysfsRoot, filter: &Filter) -> Result<Vec<ScannedDevice>, ScanError> {
    // One walker: the scan runs on an EAL lcore thread, and helper threads would inherit
    // its CPU affinity (one core), so they would only take turns with it.
    let mut scanner = Scanner::new(root).registry(Arc::clone(registry())).threads(1);
    if let Some(allow) = &filter.allow {
        scanner = scanner.allow(allow.iter().copied());
    }
    scanner = scanner.block(filter.block.iter().copied());
    let found = scanner.scan()?;
    let devices_dir = scanner.root().clone();
    Ok(found
        .devices
        .iter()
        .filter_map(|rec| match from_record(rec, |r| max_vfs(&devices_dir, r)) {
            Ok(dev) => dev,
            Err(why) => {
                log::warn(&format!("{}: not listed: {why}", rec.address));
                None
            }
        })
        .collect())
}

/// The device of one record: `Ok(None)` when no kernel driver is bound (DPDK does not list
/// those), an error naming what is missing when the ids are unknown. `max_vfs` is asked
/// only of PFs.
pub fn from_record(
    rec: &DeviceRecord,
    max_vfs: impl FnOnce(&DeviceRecord) -> u16,
) -> Result<Option<ScannedDevice>, String> {
    let Some(kdrv) = kdrv_of(rec.driver.as_deref()) else {
        return Ok(None);
    };
    let missing = |what: &str| {
        let problems: Vec<String> = rec.problems.iter().map(ToString::to_string).collect();
        if problems.is_empty() {
            format!("no {what}")
        } else {
            format!("no {what} ({})", problems.join("; "))
        }
    };
    let vendor = rec.vendor.ok_or_else(|| missing("vendor id"))?;
    let device = rec.device.ok_or_else(|| missing("device id"))?;
    let class = rec.class.ok_or_else(|| missing("class"))?;
    let mut mem = [(0u64, 0u64); PCI_MAX_RESOURCE];
    for r in &rec.resources {
        if let ResourceSlot::Bar(i) = r.slot
            && let Some(slot) = mem.get_mut(usize::from(i))
            && r.flags & flags::MEM != 0
        {
            *slot = (r.start, r.end.wrapping_sub(r.start).wrapping_add(1));
        }
    }
    let max_vfs = if rec.sriov.is_some() { max_vfs(rec) } else { 0 };
    Ok(Some(ScannedDevice {
        addr: to_rte(rec.address),
        id: RtePciId {
            class_id: class.value() & 0x00ff_ffff,
            vendor_id: vendor.0,
            device_id: device.0,
            subsystem_vendor_id: rec.subsystem_vendor.map_or(0, |v| v.0),
            subsystem_device_id: rec.subsystem_device.map_or(0, |d| d.0),
        },
        mem,
        numa_node: rec
            .numa_node
            .and_then(|n| c_int::try_from(n).ok())
            .unwrap_or(SOCKET_ID_ANY),
        kdrv,
        max_vfs,
    }))
}

/// NumVFs of a PF from its SR-IOV capability: the `config` file read on a guard thread
/// with [`CONFIG_DEADLINE`]; 0 with a log line when the removal is pending, the read fails
/// or does not return in time, or the capability is missing or short.
pub fn max_vfs(root: &SysfsRoot, rec: &DeviceRecord) -> u16 {
    let name = rec.address;
    if rec.removal_pending || registry().is_pending(name) {
        log::warn(&format!(
            "{name}: max_vfs 0: removal pending ({}), config space not read",
            rec.removal_reasons.join("; ")
        ));
        return 0;
    }
    let path = root.device_dir(name).join("config");
    let bytes = match BlockingPool::shared().read(&path, 4096, Instant::now() + CONFIG_DEADLINE) {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(e)) => {
            log::warn(&format!("{name}: max_vfs 0: reading {}: {e}", path.display()));
            return 0;
        }
        Err(e) => {
            log::warn(&format!("{name}: max_vfs 0: reading {}: {e}", path.display()));
            return 0;
        }
    };
    match pcibus::config::sriov_capability(&bytes) {
        Some(Ok(cap)) => cap.num_vfs,
        Some(Err(e)) => {
            log::warn(&format!("{name}: max_vfs 0: SR-IOV capability: {e}"));
            0
        }
        None => {
            log::warn(&format!(
                "{name}: max_vfs 0: no SR-IOV capability in {} bytes of config space",
                bytes.len()
            ));
            0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ffi::types::measured::RTE_BUS_SCAN_UNDEFINED;
    // The removal registry is the process's: a scan of one fake tree prunes the entries
    // of addresses that tree lacks (their removal "completed"), such as another test's
    // pending device. Tests that scan take turns.
    static SCANS: std::sync::Mutex<()> = std::sync::Mutex::new(());
    fn one_scan_at_a_time() -> std::sync::MutexGuard<'static, ()> {
        SCANS.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    use pcibus::removal::registry::Reason;
    use pcibus::testing::FakeSysfs;

    fn addr(s: &str) -> PciAddress {
        PciAddress::parse_strict(s).unwrap()
    }

    /// Config space with an SR-IOV capability at 0x100 whose NumVFs is `num_vfs`.
    fn sriov_config(num_vfs: u16) -> Vec<u8> {
        let mut cfg = vec![0u8; 4096];
        cfg[0..4].copy_from_slice(&[0x86, 0x80, 0xf0, 0x10]);
        cfg[6] = 0x10; // capability list
        cfg[0x34] = 0x40;
        cfg[0x40..0x44].copy_from_slice(&[0x10, 0x00, 0x02, 0x00]); // PCIe, end of list
        cfg[0x100..0x104].copy_from_slice(&(0x0010u32 | (1 << 16)).to_le_bytes());
        cfg[0x10e..0x110].copy_from_slice(&8u16.to_le_bytes()); // TotalVFs
        cfg[0x110..0x112].copy_from_slice(&num_vfs.to_le_bytes());
        cfg
    }

    #[test]
    fn scan_fills_ids_bars_numa_kdrv_and_max_vfs_and_skips_unbound() {
        let _turn = one_scan_at_a_time();
        let fake = FakeSysfs::new().unwrap();
        fake.device("0000:00:04.0")
            .vendor(0x1af4)
            .device_id(0x1000)
            .subsystem(0x1af4, 0x0001)
            .class(0x020000)
            .driver("vfio-pci")
            .numa_node(-1)
            .resources(&[(0xfe000000, 0xfe000fff, 0x40200), (0xc000, 0xc03f, 0x40101)])
            .create()
            .unwrap();
        fake.device("0000:00:05.0")
            .vendor(0x8086)
            .device_id(0x10c9)
            .class(0x020000)
            .driver("igb")
            .numa_node(1)
            .sriov_totalvfs(8)
            .config(sriov_config(3))
            .create()
            .unwrap();
        fake.device("0000:00:06.0")
            .driver("uio_pci_generic")
            .create()
            .unwrap();
        fake.device("0000:00:07.0").create().unwrap(); // no driver: not listed
        let root = SysfsRoot::new(fake.root());
        let devs = scan(root, &Filter::default()).unwrap();
        let names: Vec<String> = devs.iter().map(|d| device_name(d.addr)).collect();
        assert_eq!(names, ["0000:00:04.0", "0000:00:05.0", "0000:00:06.0"]);

        let virtio = &devs[0];
        assert_eq!(
            virtio.id,
            RtePciId {
                class_id: 0x020000,
                vendor_id: 0x1af4,
                device_id: 0x1000,
                subsystem_vendor_id: 0x1af4,
                subsystem_device_id: 0x0001
            }
        );
        assert_eq!(virtio.kdrv, RTE_PCI_KDRV_VFIO);
        assert_eq!(virtio.numa_node, SOCKET_ID_ANY);
        assert_eq!(virtio.mem[0], (0xfe000000, 0x1000));
        assert_eq!(virtio.mem[1], (0, 0), "I/O BARs are not memory resources");
        assert_eq!(virtio.max_vfs, 0);

        let pf = &devs[1];
        assert_eq!(pf.kdrv, RTE_PCI_KDRV_UNKNOWN);
        assert_eq!(pf.numa_node, 1);
        assert_eq!(pf.max_vfs, 3, "NumVFs from the SR-IOV capability");
        assert_eq!(devs[2].kdrv, RTE_PCI_KDRV_UIO_GENERIC);
    }

    #[test]
    fn max_vfs_is_zero_without_reading_config_when_removal_is_pending() {
        let _turn = one_scan_at_a_time();
        let fake = FakeSysfs::new().unwrap();
        // config is a tripwire: any open of it is counted.
        fake.device("0000:00:09.0")
            .driver("igb")
            .sriov_totalvfs(8)
            .tripwire("config")
            .create()
            .unwrap();
        let a = addr("0000:00:09.0");
        registry().mark(a, Reason::RemovalRequested);
        let devs = scan(SysfsRoot::new(fake.root()), &Filter::default()).unwrap();
        registry().release(a);
        assert_eq!(devs.len(), 1);
        assert_eq!(devs[0].max_vfs, 0);
        fake.settle_tripwires();
        assert_eq!(
            fake.tripped(),
            Vec::new(),
            "config of a pending device was opened"
        );
    }

    #[test]
    fn filter_follows_rte_pci_ignore_device() {
        let a = to_rte(addr("0000:00:04.0"));
        let b = to_rte(addr("0000:00:05.0"));
        let devargs = [(a, RTE_DEV_ALLOWED), (b, RTE_DEV_BLOCKED), (a, RTE_DEV_BLOCKED)];
        let allow = Filter::new(RTE_BUS_SCAN_ALLOWLIST, &devargs);
        assert_eq!(allow.allow, Some(vec![addr("0000:00:04.0")]));
        assert!(allow.block.is_empty());
        let block = Filter::new(RTE_BUS_SCAN_UNDEFINED, &devargs);
        assert_eq!(block.allow, None);
        assert_eq!(block.block, vec![addr("0000:00:05.0")]);
        // Allow-list mode with no allowed device scans nothing.
        assert_eq!(Filter::new(RTE_BUS_SCAN_ALLOWLIST, &[]).allow, Some(vec![]));
    }

    #[test]
    fn scan_applies_the_filter() {
        let _turn = one_scan_at_a_time();
        let fake = FakeSysfs::new().unwrap();
        fake.device("0000:00:04.0").driver("vfio-pci").create().unwrap();
        fake.device("0000:00:05.0").driver("vfio-pci").create().unwrap();
        let root = SysfsRoot::new(fake.root());
        let f = Filter {
            allow: None,
            block: vec![addr("0000:00:04.0")],
        };
        let devs = scan(root.clone(), &f).unwrap();
        assert_eq!(devs.len(), 1);
        assert_eq!(device_name(devs[0].addr), "0000:00:05.0");
        let f = Filter {
            allow: Some(vec![addr("0000:00:04.0")]),
            block: vec![],
        };
        assert_eq!(device_name(scan(root, &f).unwrap()[0].addr), "0000:00:04.0");
    }

    #[test]
    fn names_and_kdrv() {
        let a = RtePciAddr {
            domain: 0x10000,
            bus: 0xab,
            devid: 0x1f,
            function: 7,
        };
        assert_eq!(device_name(a), "10000:ab:1f.7");
        assert_eq!(kdrv_of(None), None);
        assert_eq!(kdrv_of(Some("vfio-pci")), Some(RTE_PCI_KDRV_VFIO));
        assert_eq!(kdrv_of(Some("igb_uio")), Some(RTE_PCI_KDRV_IGB_UIO));
        assert_eq!(kdrv_of(Some("nvme")), Some(RTE_PCI_KDRV_UNKNOWN));
    }
}
