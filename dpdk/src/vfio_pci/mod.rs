//! `rte_pci_map_device` / `rte_pci_unmap_device`, config space and I/O ports of devices
//! bound to vfio-pci, as DPDK 22.11's `drivers/bus/pci/linux/pci_vfio.c` does them:
//!
//! * the device fd comes from EAL's `rte_vfio_setup_device`, which puts the device's IOMMU
//!   group into EAL's default container, where EAL has mapped (and keeps mapping) its memory
//!   for DMA;
//! * each memory BAR VFIO lets us mmap is mapped into `mem_resource[i].addr`; the MSI-X
//!   table's BAR is mapped around the table's pages unless the region carries
//!   `VFIO_REGION_INFO_CAP_MSIX_MAPPABLE` ([`plan::bar_plan`]); I/O BARs are left to
//!   `rte_pci_ioport_*`, which pread/pwrite the region;
//! * `intr_handle` gets an eventfd, the device fd and the type of the IRQ index chosen from
//!   `rte_eal_vfio_intr_mode()` (MSI-X, MSI, INTx; [`plan::choose_irq`]); EAL's
//!   `rte_intr_enable` then does `VFIO_DEVICE_SET_IRQS` with them, as with the stock bus;
//! * Memory Space and Bus Master are set through the VFIO config region, the device reset
//!   (`VFIO_DEVICE_RESET`, when it can be);
//! * `vfio_req_intr_handle` gets the request notifier (`VFIO_PCI_REQ_IRQ_INDEX`, an
//!   eventfd) with a callback that runs the bus's hot-unplug handler
//!   (`RTE_DEV_EVENT_REMOVE` to the application).
//!
//! Held devices are in a table ([`HELD`]) with EAL's device fd; config space, I/O ports and
//! the unmapping find them there.
//!
//! Secondary processes ([`crate::mp`]): the primary records each mapped device in EAL's
//! shared memory and places its BARs past EAL's memory areas; a secondary gets the device
//! fd from `rte_vfio_setup_device` (EAL asks the primary for the group over its
//! multi-process channel), maps the recorded parts at the primary's addresses, and gives
//! `intr_handle` and `vfio_req_intr_handle` the device fd only, as 22.11's secondary: no
//! claim, no reset, no Command register change, no interrupt or notifier set-up. Its
//! unmapping unmaps its view and releases its fd.
//!
//! This is an unsafe boundary with C (EAL's functions, the device struct); the decisions
//! are in [`plan`], the system calls in [`sys`].

pub mod plan;
pub mod sys;

use core::ffi::{c_int, c_void};
use core::ptr;
use pcibus::PciAddress;
use pcibus::bus::claim::{Claim, ClaimDir, ClaimError, ClaimInfo};
use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::{Mutex, MutexGuard};

use crate::ffi::eal_vfio as eal;
use crate::ffi::types::measured::{
    RTE_INTR_HANDLE_UNKNOWN, RTE_INTR_HANDLE_VFIO_LEGACY, RTE_INTR_HANDLE_VFIO_MSI,
    RTE_INTR_HANDLE_VFIO_MSIX, RTE_INTR_HANDLE_VFIO_REQ, RTE_INTR_MODE_LEGACY, RTE_INTR_MODE_MSI,
    RTE_INTR_MODE_MSIX, RTE_INTR_MODE_NONE, RTE_PROC_PRIMARY, VFIO_IRQ_INFO_EVENTFD,
    VFIO_PCI_BAR5_REGION_INDEX, VFIO_PCI_CONFIG_REGION_INDEX, VFIO_PCI_INTX_IRQ_INDEX,
    VFIO_PCI_MSI_IRQ_INDEX, VFIO_PCI_MSIX_IRQ_INDEX, VFIO_PCI_REQ_IRQ_INDEX,
};
use crate::ffi::types::{RteDevice, RtePciDevice, VfioDeviceInfo};
use crate::log;
use crate::mp;
use crate::mp::plan::{BarRecord, Kind, Record};
use plan::{BarPlan, IntrMode};
use sys::{BarMapping, Place};

// The plan's constants are the kernel's.
const _: () = assert!(plan::INTX == VFIO_PCI_INTX_IRQ_INDEX && plan::MSI == VFIO_PCI_MSI_IRQ_INDEX);
const _: () = assert!(plan::MSIX == VFIO_PCI_MSIX_IRQ_INDEX && plan::REQ == VFIO_PCI_REQ_IRQ_INDEX);
const _: () = assert!(plan::CONFIG_REGION == VFIO_PCI_CONFIG_REGION_INDEX);
const _: () = assert!(plan::BARS == VFIO_PCI_BAR5_REGION_INDEX as usize + 1);
const _: () = assert!(plan::IRQ_INFO_EVENTFD == VFIO_IRQ_INFO_EVENTFD);

/// A region's place in the device fd: (offset, size).
type Region = (u64, u64);

/// A device this process holds through VFIO.
#[derive(Debug)]
struct Held {
    /// `0000:00:04.0`.
    name: String,
    /// EAL's device fd (EAL closes it in `rte_vfio_release_device`).
    fd: RawFd,
    /// The config region.
    config: Region,
    /// Each BAR's region (size 0: none), for I/O ports.
    bars: [Region; plan::BARS],
    /// The mapped BARs.
    maps: Vec<BarMapping>,
    /// The interrupt eventfd given to `intr_handle`.
    intr_fd: Option<OwnedFd>,
    /// The request notifier's eventfd given to `vfio_req_intr_handle`.
    req_fd: Option<OwnedFd>,
    /// The device's claim, taken before it was opened: other pcibus processes and SPDK
    /// (its lock files) see it held, and this process's scans treat it as held. Dropped
    /// after the device fd is released. None in a secondary process.
    claim: Option<Claim>,
    /// Mapped in a secondary process (the primary holds the device).
    secondary: bool,
    /// What the BARs' mappings are, for secondaries (see [`crate::mp`]).
    recorded: [Option<BarRecord>; plan::BARS],
}

/// Claims `name` for this process (`pcibus::bus::claim`: the claims directory, SPDK's lock
/// files) before it is opened: `Err` names the holder when another process has it. A
/// claims directory this process cannot use is logged and the device mapped unclaimed,
/// as the stock bus maps it.
pub(crate) fn claim(name: &str) -> Result<Option<Claim>, String> {
    let Ok(address) = name.parse::<PciAddress>() else {
        return Ok(None);
    };
    match ClaimDir::for_claiming().claim(address, &ClaimInfo::new().driver("dpdk")) {
        Ok(c) => Ok(Some(c)),
        Err(e @ (ClaimError::Held { .. } | ClaimError::HeldBySpdk { .. })) => Err(pcibus::error::chain(&e)),
        Err(e) => {
            log::warn(&format!(
                "{name}: not claimed ({}); mapped anyway",
                pcibus::error::chain(&e)
            ));
            Ok(None)
        }
    }
}

static HELD: Mutex<Vec<Held>> = Mutex::new(Vec::new());

fn held() -> MutexGuard<'static, Vec<Held>> {
    HELD.lock().unwrap_or_else(|e| e.into_inner())
}

/// Whether this process holds `name` through VFIO (mapped by [`map`]).
pub fn is_held(name: &str) -> bool {
    held().iter().any(|h| h.name == name)
}

fn sysfs_base() -> CString {
    let dir = crate::config::sysfs_devices_dir();
    CString::new(dir.as_os_str().as_encoded_bytes()).unwrap_or_else(|_| c"/sys/bus/pci/devices".to_owned())
}

/// A config access of a held device: `Some(result)` through the VFIO config region, `None`
/// when the device is not held (the caller uses sysfs).
pub fn config_access(
    name: &str,
    offset: u64,
    len: usize,
    f: impl FnOnce(RawFd, u64) -> io::Result<usize>,
) -> Option<io::Result<usize>> {
    let list = held();
    let h = list.iter().find(|h| h.name == name)?;
    // The lock stays held across the access: the fd cannot be released under it.
    Some(match plan::region_pos(h.config.0, h.config.1, offset, len) {
        Some(pos) => f(h.fd, pos),
        None => Err(io::Error::other(format!(
            "{len} bytes at {offset:#x} are beyond the config region ({:#x} bytes)",
            h.config.1
        ))),
    })
}

fn read_config(fd: RawFd, config: Region, buf: &mut [u8], offset: u64) -> io::Result<()> {
    let pos = plan::region_pos(config.0, config.1, offset, buf.len())
        .ok_or_else(|| io::Error::other(format!("config offset {offset:#x} out of range")))?;
    match sys::read_at(fd, buf, pos)? {
        n if n == buf.len() => Ok(()),
        n => Err(io::Error::other(format!(
            "short config read at {offset:#x}: {n} of {} bytes",
            buf.len()
        ))),
    }
}

fn write_config(fd: RawFd, config: Region, buf: &[u8], offset: u64) -> io::Result<()> {
    let pos = plan::region_pos(config.0, config.1, offset, buf.len())
        .ok_or_else(|| io::Error::other(format!("config offset {offset:#x} out of range")))?;
    match sys::write_at(fd, buf, pos)? {
        n if n == buf.len() => Ok(()),
        n => Err(io::Error::other(format!(
            "short config write at {offset:#x}: {n} of {} bytes",
            buf.len()
        ))),
    }
}

/// Sets (Memory Space + Bus Master) or clears (Bus Master) in the Command register.
fn set_master(fd: RawFd, config: Region, master: bool) -> io::Result<()> {
    let mut cmd = [0u8; 2];
    read_config(fd, config, &mut cmd, plan::COMMAND)?;
    let old = u16::from_le_bytes(cmd);
    let new = plan::command_with(old, master);
    if new != old {
        write_config(fd, config, &new.to_le_bytes(), plan::COMMAND)?;
    }
    Ok(())
}

fn intr_mode() -> IntrMode {
    // SAFETY: no arguments.
    match unsafe { eal::rte_eal_vfio_intr_mode() } {
        m if m == RTE_INTR_MODE_LEGACY => IntrMode::Legacy,
        m if m == RTE_INTR_MODE_MSI => IntrMode::Msi,
        m if m == RTE_INTR_MODE_MSIX => IntrMode::Msix,
        m => {
            if m != RTE_INTR_MODE_NONE {
                log::warn(&format!(
                    "unknown VFIO interrupt mode {m}: choosing automatically"
                ));
            }
            IntrMode::Auto
        }
    }
}

/// A failed step of a mapping (VFIO's or UIO's): which call, and why.
pub(crate) struct Failure(pub(crate) String);

impl<E: std::fmt::Display> From<(&str, E)> for Failure {
    fn from((what, e): (&str, E)) -> Failure {
        Failure(format!("{what}: {e}"))
    }
}

/// Checks an EAL setter's return.
pub(crate) fn eal_ok(what: &str, ret: c_int) -> Result<(), Failure> {
    if ret == 0 {
        Ok(())
    } else {
        Err(Failure(format!("{what} failed ({ret})")))
    }
}

/// `pci_vfio_map_resource` (primary, or secondary: [`map_secondary`]): 0, or the non-zero
/// return of `rte_vfio_setup_device` (1: not a VFIO device), or -1 with a log line naming
/// the device and the failed call.
///
/// # Safety
/// `dev` is a live device of the bus with both interrupt instances allocated (the probe
/// allocates them before mapping), not accessed elsewhere during the call.
pub unsafe fn map(dev: *mut RtePciDevice, name: &str) -> c_int {
    if is_held(name) {
        // A device kept mapped (RTE_PCI_DRV_KEEP_MAPPED_RES) and probed again.
        log::debug(&format!("{name}: already mapped through VFIO"));
        return 0;
    }
    // SAFETY: the module name is a NUL-terminated literal.
    if unsafe { eal::rte_vfio_is_enabled(c"vfio_pci".as_ptr()) } == 0 {
        log::error(&format!(
            "rte_pci_map_device({name}): bound to vfio-pci but EAL's VFIO is not enabled (vfio-pci module not loaded?)"
        ));
        return -1;
    }
    // SAFETY: no arguments.
    let secondary = unsafe { eal::rte_eal_process_type() } != RTE_PROC_PRIMARY;
    // SAFETY: per the contract.
    let (intr, req) = unsafe { ((*dev).intr_handle, (*dev).vfio_req_intr_handle) };
    if intr.is_null() || req.is_null() {
        log::error(&format!("rte_pci_map_device({name}): no interrupt instance"));
        return -1;
    }
    // SAFETY: both handles are live instances.
    if unsafe { eal::rte_intr_fd_set(intr, -1) != 0 || eal::rte_intr_fd_set(req, -1) != 0 } {
        log::error(&format!("rte_pci_map_device({name}): rte_intr_fd_set failed"));
        return -1;
    }
    let Ok(cname) = CString::new(name) else { return -1 };
    if secondary {
        // SAFETY: per the contract.
        return unsafe { map_secondary(dev, name, &cname) };
    }
    // Before the open, which resets the device: not under another process's feet.
    let claim = match claim(name) {
        Ok(c) => c,
        Err(why) => {
            log::error(&format!("rte_pci_map_device({name}): {why}"));
            return -1;
        }
    };
    let base = sysfs_base();
    let (fd, info) = match setup_device(&base, name, &cname, "") {
        Ok(x) => x,
        Err(ret) => return ret,
    };
    // SAFETY: per the contract; fd is EAL's open device fd.
    match unsafe { map_held(dev, name, fd, &info) } {
        Ok(mut h) => {
            h.claim = claim;
            mp::publish(&Record {
                // SAFETY: per the contract.
                addr: unsafe { (*dev).addr },
                kind: Kind::Vfio,
                pid: std::process::id() as i32,
                bars: h.recorded.clone(),
            });
            held().push(h);
            log::debug(&format!("{name}: mapped through VFIO (EAL's container)"));
            0
        }
        Err(Failure(why)) => {
            log::error(&format!("rte_pci_map_device({name}): {why}"));
            // SAFETY: fd came from rte_vfio_setup_device for this name; nothing uses it now.
            if unsafe { eal::rte_vfio_release_device(base.as_ptr(), cname.as_ptr(), fd) } < 0 {
                log::error(&format!("{name}: rte_vfio_release_device failed"));
            }
            -1
        }
    }
}

/// EAL's `rte_vfio_setup_device` for `cname` (its group in EAL's container, the device
/// fd and its info), or the call's non-zero return (logged when negative; `where_` is
/// added to the log line after `rte_pci_map_device(NAME)`).
fn setup_device(
    base: &CString,
    name: &str,
    cname: &CString,
    where_: &str,
) -> Result<(c_int, VfioDeviceInfo), c_int> {
    let mut fd: c_int = -1;
    let mut info = VfioDeviceInfo {
        argsz: size_of::<VfioDeviceInfo>() as u32,
        ..VfioDeviceInfo::default()
    };
    // SAFETY: NUL-terminated strings, valid out-parameters.
    let ret = unsafe { eal::rte_vfio_setup_device(base.as_ptr(), cname.as_ptr(), &mut fd, &mut info) };
    if ret == 0 {
        return Ok((fd, info));
    }
    if ret < 0 {
        log::error(&format!(
            "rte_pci_map_device({name}){where_}: rte_vfio_setup_device failed ({ret})"
        ));
    }
    Err(ret)
}

/// `rte_pci_map_device` in a secondary process: the primary's record of the device, the
/// device fd from EAL, every recorded BAR at the primary's address, the fd in both
/// interrupt handles. 0, the non-zero return of `rte_vfio_setup_device`, or -1 with a
/// log line.
///
/// # Safety
/// As [`map`].
unsafe fn map_secondary(dev: *mut RtePciDevice, name: &str, cname: &CString) -> c_int {
    // SAFETY: per the contract.
    let addr = unsafe { (*dev).addr };
    let rec = match mp::find(&addr, Kind::Vfio) {
        Ok(r) => r,
        Err(why) => {
            log::error(&format!(
                "rte_pci_map_device({name}) in a secondary process: {why}"
            ));
            return -1;
        }
    };
    let base = sysfs_base();
    let (fd, info) = match setup_device(&base, name, cname, " in a secondary process") {
        Ok(x) => x,
        Err(ret) => return ret,
    };
    // SAFETY: per the contract; fd is EAL's open device fd.
    match unsafe { map_secondary_held(dev, name, fd, &info, &rec) } {
        Ok(h) => {
            held().push(h);
            log::debug(&format!(
                "{name}: mapped through VFIO at the addresses of the primary (pid {})",
                rec.pid
            ));
            0
        }
        Err(Failure(why)) => {
            log::error(&format!(
                "rte_pci_map_device({name}) in a secondary process: {why}"
            ));
            // SAFETY: fd came from rte_vfio_setup_device for this name; nothing uses it now.
            if unsafe { eal::rte_vfio_release_device(base.as_ptr(), cname.as_ptr(), fd) } < 0 {
                log::error(&format!("{name}: rte_vfio_release_device failed"));
            }
            -1
        }
    }
}

/// # Safety
/// As [`map_held`].
unsafe fn map_secondary_held(
    dev: *mut RtePciDevice,
    name: &str,
    fd: RawFd,
    info: &VfioDeviceInfo,
    rec: &Record,
) -> Result<Held, Failure> {
    let config =
        sys::region_info(fd, plan::CONFIG_REGION).map_err(|e| ("VFIO_DEVICE_GET_REGION_INFO (config)", e))?;
    let mut h = Held {
        name: name.to_owned(),
        fd,
        config: (config.offset, config.size),
        bars: [(0, 0); plan::BARS],
        maps: Vec::new(),
        intr_fd: None,
        req_fd: None,
        claim: None,
        secondary: true,
        recorded: Default::default(),
    };
    // SAFETY: per the contract.
    let res = unsafe { setup_secondary(dev, &mut h, info, rec) };
    if res.is_err() {
        // SAFETY: per the contract; undoes what setup_secondary did.
        unsafe { teardown(dev, &mut h, false) };
    }
    res.map(|()| h)
}

/// # Safety
/// As [`map_held`].
unsafe fn setup_secondary(
    dev: *mut RtePciDevice,
    h: &mut Held,
    info: &VfioDeviceInfo,
    rec: &Record,
) -> Result<(), Failure> {
    let fd = h.fd;
    let nb = (info.num_regions as usize).min(plan::BARS);
    for i in 0..nb {
        let region = sys::region_info(fd, i as u32)
            .map_err(|e| (format!("VFIO_DEVICE_GET_REGION_INFO (BAR{i})"), e))?;
        h.bars[i] = (region.offset, region.size);
        let Some(b) = &rec.bars[i] else { continue };
        crate::mp::plan::check_bar(i, b, region.size).map_err(Failure)?;
        let m = BarMapping::map(fd, region.offset, b.len, &b.parts, Place::Exact(b.addr)).map_err(|e| {
            (
                format!(
                    "mmap of BAR{i} at {:#x} ({:#x} bytes, where the primary has it)",
                    b.addr, b.len
                ),
                e,
            )
        })?;
        // SAFETY: per the contract; the sigbus handler reads this field.
        unsafe { (*dev).mem_resource[i].addr = m.addr() };
        h.maps.push(m);
    }
    if let Some(i) = (nb..plan::BARS).find(|&i| rec.bars[i].is_some()) {
        return Err(Failure(format!(
            "the primary mapped BAR{i}, this process sees {nb} BAR regions"
        )));
    }
    // SAFETY: per the contract; both handles are live (checked by map); the fd stays open
    // while the device is held. As 22.11's secondary: the device fd only.
    unsafe {
        eal_ok(
            "rte_intr_dev_fd_set",
            eal::rte_intr_dev_fd_set((*dev).intr_handle, fd),
        )?;
        eal_ok(
            "rte_intr_dev_fd_set (request)",
            eal::rte_intr_dev_fd_set((*dev).vfio_req_intr_handle, fd),
        )?;
    }
    Ok(())
}

/// Everything after `rte_vfio_setup_device`; on failure, whatever was set up here is undone
/// (the caller releases the fd).
///
/// # Safety
/// As [`map`]; `fd` is the device's open VFIO fd.
unsafe fn map_held(
    dev: *mut RtePciDevice,
    name: &str,
    fd: RawFd,
    info: &VfioDeviceInfo,
) -> Result<Held, Failure> {
    let config =
        sys::region_info(fd, plan::CONFIG_REGION).map_err(|e| ("VFIO_DEVICE_GET_REGION_INFO (config)", e))?;
    let config: Region = (config.offset, config.size);
    let mut h = Held {
        name: name.to_owned(),
        fd,
        config,
        bars: [(0, 0); plan::BARS],
        maps: Vec::new(),
        intr_fd: None,
        req_fd: None,
        claim: None,
        secondary: false,
        recorded: Default::default(),
    };
    // SAFETY: per the contract.
    let res = unsafe { setup(dev, &mut h, info) };
    if res.is_err() {
        // SAFETY: per the contract; undoes what setup did.
        unsafe { teardown(dev, &mut h, false) };
    }
    res.map(|()| h)
}

/// # Safety
/// As [`map_held`].
unsafe fn setup(dev: *mut RtePciDevice, h: &mut Held, info: &VfioDeviceInfo) -> Result<(), Failure> {
    let fd = h.fd;
    let mut cfg = [0u8; 256];
    read_config(fd, h.config, &mut cfg, 0).map_err(|e| ("reading config space", e))?;
    let mut msix = plan::msix_table(&cfg);
    if let Some(t) = msix
        && usize::from(t.bar) < plan::BARS
        && sys::region_info(fd, t.bar.into())
            .map_err(|e| ("VFIO_DEVICE_GET_REGION_INFO (MSI-X BAR)", e))?
            .msix_mappable
    {
        log::debug(&format!("{}: VFIO reports the MSI-X BAR as mappable", h.name));
        msix = None;
    }
    let page = sys::page_size();
    let nb = (info.num_regions as usize).min(plan::BARS);
    for i in 0..nb {
        let bar = i as u8;
        let region = sys::region_info(fd, i as u32)
            .map_err(|e| (format!("VFIO_DEVICE_GET_REGION_INFO (BAR{i})"), e))?;
        h.bars[i] = (region.offset, region.size);
        let mut reg = [0u8; 4];
        read_config(fd, h.config, &mut reg, plan::BAR0 + 4 * i as u64)
            .map_err(|e| ("reading a BAR register", e))?;
        let io = plan::is_io_bar(u32::from_le_bytes(reg));
        match plan::bar_plan(bar, &region, io, msix, page) {
            BarPlan::Skip(why) => log::debug(&format!("{}: BAR{i} not mapped: {why}", h.name)),
            BarPlan::Map { len, parts } => {
                // Past EAL's memory, where secondaries can map it too.
                let place = mp::hint(len).map_or(Place::Anywhere, Place::Hint);
                let m = BarMapping::map(fd, region.offset, len, &parts, place)
                    .map_err(|e| (format!("mmap of BAR{i} ({len:#x} bytes, parts {parts:x?})"), e))?;
                // SAFETY: per the contract; the sigbus handler reads this field.
                unsafe { (*dev).mem_resource[i].addr = m.addr() };
                h.recorded[i] = Some(BarRecord {
                    addr: m.addr() as u64,
                    len,
                    parts,
                    wc: false,
                });
                h.maps.push(m);
            }
        }
    }
    // SAFETY: per the contract.
    unsafe { setup_interrupts(dev, h)? };
    set_master(fd, h.config, true).map_err(|e| ("setting Memory Space and Bus Master", e))?;
    if let Err(e) = sys::reset(fd)
        && e.raw_os_error() != Some(libc::EINVAL)
    {
        return Err(("VFIO_DEVICE_RESET", e).into());
    }
    // SAFETY: per the contract.
    unsafe { enable_notifier(dev, h) }
}

impl From<(String, io::Error)> for Failure {
    fn from((what, e): (String, io::Error)) -> Failure {
        Failure(format!("{what}: {e}"))
    }
}

/// `pci_vfio_setup_interrupts`.
///
/// # Safety
/// As [`map_held`].
unsafe fn setup_interrupts(dev: *mut RtePciDevice, h: &mut Held) -> Result<(), Failure> {
    // SAFETY: per the contract.
    let intr = unsafe { (*dev).intr_handle };
    let fd = h.fd;
    let choice = plan::choose_irq(intr_mode(), |i| sys::irq_info(fd, i).map_err(|e| e.to_string()))
        .map_err(|e| ("setting up interrupts", e))?;
    // SAFETY: intr is a live instance (checked by map).
    unsafe {
        if choice.index == plan::MSIX
            && u32::try_from(eal::rte_intr_nb_intr_get(intr)).unwrap_or(0) < choice.count
        {
            let count = c_int::try_from(choice.count).unwrap_or(c_int::MAX);
            eal_ok(
                "rte_intr_event_list_update",
                eal::rte_intr_event_list_update(intr, count),
            )?;
        }
    }
    let efd = sys::eventfd().map_err(|e| ("eventfd", e))?;
    let ty = match choice.index {
        plan::MSIX => RTE_INTR_HANDLE_VFIO_MSIX,
        plan::MSI => RTE_INTR_HANDLE_VFIO_MSI,
        _ => RTE_INTR_HANDLE_VFIO_LEGACY,
    };
    // SAFETY: intr is live; the fds stay open while the device is held.
    unsafe {
        eal_ok("rte_intr_fd_set", eal::rte_intr_fd_set(intr, efd.as_raw_fd()))?;
        h.intr_fd = Some(efd);
        eal_ok("rte_intr_dev_fd_set", eal::rte_intr_dev_fd_set(intr, fd))?;
        eal_ok("rte_intr_type_set", eal::rte_intr_type_set(intr, ty))?;
    }
    Ok(())
}

/// The request notifier's callback: the kernel asks for the device back (a sysfs remove,
/// an unbind); runs the bus's hot-unplug handler, as 22.11's `pci_vfio_req_handler`.
unsafe extern "C" fn req_handler(arg: *mut c_void) {
    crate::guard::ffi("VFIO request notifier", (), || {
        // SAFETY: the argument is the device's `device` field, registered by
        // enable_notifier and unregistered before the device is freed.
        let ret = unsafe { crate::busops::vfio_request(arg.cast::<RteDevice>()) };
        if ret != 0 {
            log::error("cannot handle hot-unplug of a device (VFIO request)");
        }
    });
}

/// `pci_vfio_enable_notifier`.
///
/// # Safety
/// As [`map_held`].
unsafe fn enable_notifier(dev: *mut RtePciDevice, h: &mut Held) -> Result<(), Failure> {
    // SAFETY: per the contract.
    let (req, arg) = unsafe {
        (
            (*dev).vfio_req_intr_handle,
            (&raw mut (*dev).device).cast::<c_void>(),
        )
    };
    let efd = sys::eventfd().map_err(|e| ("eventfd (request notifier)", e))?;
    // SAFETY: req is a live instance; the eventfd stays open while the device is held; the
    // callback's argument lives until unmap unregisters it.
    unsafe {
        eal_ok(
            "rte_intr_fd_set (request)",
            eal::rte_intr_fd_set(req, efd.as_raw_fd()),
        )?;
        h.req_fd = Some(efd);
        eal_ok(
            "rte_intr_type_set (request)",
            eal::rte_intr_type_set(req, RTE_INTR_HANDLE_VFIO_REQ),
        )?;
        eal_ok(
            "rte_intr_dev_fd_set (request)",
            eal::rte_intr_dev_fd_set(req, h.fd),
        )?;
        eal_ok(
            "rte_intr_callback_register (request notifier)",
            eal::rte_intr_callback_register(req, req_handler, arg),
        )?;
        let ret = eal::rte_intr_enable(req);
        if ret != 0 {
            if eal::rte_intr_callback_unregister(req, req_handler, arg) < 0 {
                log::error(&format!(
                    "{}: cannot unregister the request notifier callback",
                    h.name
                ));
            }
            return Err(Failure(format!(
                "rte_intr_enable (request notifier) failed ({ret})"
            )));
        }
    }
    Ok(())
}

/// Undoes the interrupt set-up and the mappings (not the fd). `notifier`: the request
/// notifier was enabled and its callback registered.
///
/// # Safety
/// `dev` is live; `h` is its held state, off the table (or never on it).
unsafe fn teardown(dev: *mut RtePciDevice, h: &mut Held, notifier: bool) {
    // SAFETY: per the contract.
    let (intr, req, arg) = unsafe {
        (
            (*dev).intr_handle,
            (*dev).vfio_req_intr_handle,
            (&raw mut (*dev).device).cast::<c_void>(),
        )
    };
    // SAFETY: the handles are live instances (or null, checked); the callback and argument
    // are what enable_notifier registered.
    unsafe {
        if notifier && !req.is_null() {
            if eal::rte_intr_disable(req) != 0 {
                log::error(&format!("{}: cannot disable the VFIO request notifier", h.name));
            }
            if eal::rte_intr_callback_unregister_sync(req, req_handler, arg) < 0 {
                log::error(&format!(
                    "{}: cannot unregister the VFIO request notifier callback",
                    h.name
                ));
            }
        }
        if !req.is_null() {
            eal::rte_intr_fd_set(req, -1);
            eal::rte_intr_type_set(req, RTE_INTR_HANDLE_UNKNOWN);
            eal::rte_intr_dev_fd_set(req, -1);
        }
        if !intr.is_null() {
            eal::rte_intr_fd_set(intr, -1);
            eal::rte_intr_dev_fd_set(intr, -1);
        }
    }
    h.req_fd = None;
    h.intr_fd = None;
    // SAFETY: per the contract; cleared before the memory goes away so the sigbus handler
    // no longer claims it.
    unsafe {
        for r in &mut (*dev).mem_resource {
            r.addr = ptr::null_mut();
        }
    }
    h.maps.clear();
}

/// `pci_vfio_unmap_resource`. Primary: the record for secondaries dropped, the notifier
/// off, the interrupt eventfd closed, Bus Master cleared, the BARs unmapped, the device fd
/// released to EAL. Secondary: its BAR mappings and its fd only. 0, or -1 with a log line
/// (a device this process does not hold).
///
/// # Safety
/// `dev` is a live device of the bus, not accessed elsewhere during the call.
pub unsafe fn unmap(dev: *mut RtePciDevice, name: &str) -> c_int {
    let taken = {
        let mut list = held();
        list.iter().position(|h| h.name == name).map(|i| list.remove(i))
    };
    let Some(mut h) = taken else {
        log::error(&format!(
            "rte_pci_unmap_device({name}): not mapped through VFIO by this process"
        ));
        return -1;
    };
    log::info(&format!("releasing PCI mapped resource for {name}"));
    if !h.secondary {
        // Secondaries starting from now do not find it.
        // SAFETY: per the contract.
        mp::forget(unsafe { &(*dev).addr });
    }
    let notifier = !h.secondary;
    // SAFETY: per the contract; h is off the table.
    unsafe { teardown(dev, &mut h, notifier) };
    let mut ret = 0;
    if h.secondary {
        // The primary's device: Bus Master stays as it is.
    } else if let Err(e) = set_master(h.fd, h.config, false) {
        log::error(&format!("rte_pci_unmap_device({name}): clearing Bus Master: {e}"));
        ret = -1;
    }
    let Ok(cname) = CString::new(name) else { return -1 };
    // SAFETY: the fd came from rte_vfio_setup_device for this name; nothing uses it now.
    if unsafe { eal::rte_vfio_release_device(sysfs_base().as_ptr(), cname.as_ptr(), h.fd) } < 0 {
        log::error(&format!(
            "rte_pci_unmap_device({name}): rte_vfio_release_device failed"
        ));
        ret = -1;
    }
    ret
}

/// The fd offset of BAR `bar`'s region, for `rte_pci_ioport_map` (`p->base`); `None` when
/// the device is not held or has no such BAR.
pub fn ioport_base(name: &str, bar: usize) -> Option<u64> {
    let list = held();
    let h = list.iter().find(|h| h.name == name)?;
    let &(offset, size) = h.bars.get(bar)?;
    (size != 0).then_some(offset)
}

/// An I/O port access of a held device at fd position `base + offset` (base from
/// [`ioport_base`]): `f(fd, pos)` under the table's lock; `None` when not held.
pub fn ioport_access<R>(
    name: &str,
    base: u64,
    offset: u64,
    f: impl FnOnce(RawFd, u64) -> R,
) -> Option<Option<R>> {
    let list = held();
    let h = list.iter().find(|h| h.name == name)?;
    Some(base.checked_add(offset).map(|pos| f(h.fd, pos)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_that_is_no_address_is_not_claimed() {
        assert_eq!(claim("not-an-address").map(|c| c.is_none()), Ok(true));
    }

    #[test]
    fn nothing_is_held_at_start_and_accesses_fall_back() {
        assert!(!is_held("0000:00:04.0"));
        assert!(config_access("0000:00:04.0", 0, 1, |_, _| Ok(1)).is_none());
        assert_eq!(ioport_base("0000:00:04.0", 0), None);
        assert!(ioport_access("0000:00:04.0", 0, 0, |_, _| ()).is_none());
    }
}
