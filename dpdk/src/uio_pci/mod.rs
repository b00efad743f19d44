//! `rte_pci_map_device` / `rte_pci_unmap_device`, I/O ports and the hot-unplug remap of
//! devices bound to `uio_pci_generic` or `igb_uio`, as DPDK 22.11's
//! `drivers/bus/pci/linux/pci_uio.c` and `pci_common_uio.c` do them:
//!
//! * the device's UIO instance is the `uioN` entry of its sysfs `uio/` directory (or
//!   `uio:uioN` in its directory on old kernels; [`plan::find_uio`]); `/dev/uioN` is the
//!   interrupt fd (`rte_intr_fd_set`), the device's sysfs `config` the config fd
//!   (`rte_intr_dev_fd_set`: EAL masks and unmasks INTx of uio_pci_generic through it);
//! * the handle type is `RTE_INTR_HANDLE_UIO` (igb_uio) or `RTE_INTR_HANDLE_UIO_INTX`
//!   (uio_pci_generic, which also gets Bus Master set: the driver does not set it);
//!   [`plan::intr_choice`];
//! * each memory BAR of the sysfs `resource` file ([`plan::bar_plan`]) is mmapped from its
//!   `resourceN` file (`resourceN_wc` first for `RTE_PCI_DRV_WC_ACTIVATE`) into
//!   `mem_resource[i].addr`;
//! * I/O ports (x86): an I/O BAR is accessed with `in`/`out` after `rte_eal_iopl_init`, a
//!   memory BAR through its mapping; `p->base` is the port number or the mapped address,
//!   as 22.11; accesses are checked against the BAR's size (22.11 does not check);
//! * a hot-unplug (the bus's handler, EAL's SIGBUS hook) remaps the device's BARs onto
//!   anonymous memory, so the driver's later accesses do not fault.
//!
//! A device is claimed (`pcibus::bus::claim`, shared with [`crate::vfio_pci`]) before it
//! is opened.
//!
//! Secondary processes ([`crate::mp`]): the primary records each mapped device in EAL's
//! shared memory and places its BARs past EAL's memory areas; a secondary maps the
//! recorded BARs from the same `resourceN` (or `_wc`) files at the primary's addresses and
//! gives its interrupt handle `config` (dev fd) and the type, but not `/dev/uioN`:
//! uio_pci_generic clears Bus Master whenever an fd of `/dev/uioN` is closed, so 22.11's
//! secondary, which opens it, stops the primary's DMA when it exits (seen in the VM test
//! `dpdk-secondary`; DPDK fixed it upstream in 2024 by opening it in the primary only, as
//! here). It takes no claim and leaves the Command register alone (22.11's secondary sets
//! Bus Master of a uio_pci_generic device again; the primary has). Unmapping in a
//! secondary unmaps its own view and closes its files.
//!
//! This is an unsafe boundary with C (EAL's functions, the device struct); the decisions
//! are in [`plan`], the system calls in [`sys`].

pub mod plan;
pub mod sys;

use core::ffi::c_int;
use core::ptr;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use pcibus::bus::claim::Claim;
use pcibus::model::Resource;

use crate::ffi::eal_uio;
use crate::ffi::eal_vfio as eal;
use crate::ffi::types::RtePciDevice;
use crate::ffi::types::measured::{
    RTE_INTR_HANDLE_UIO, RTE_INTR_HANDLE_UIO_INTX, RTE_INTR_HANDLE_UNKNOWN, RTE_PCI_DRV_WC_ACTIVATE,
    RTE_PROC_PRIMARY,
};
use crate::log;
use crate::mp;
use crate::mp::plan::{BarRecord, Kind, Record};
use crate::vfio_pci::{Failure, eal_ok};
use plan::{PortKind, UioDriver};
use sys::{Place, UioBar};

/// A device this process holds through UIO.
#[derive(Debug)]
struct Held {
    /// `0000:00:04.0`.
    name: String,
    /// `/dev/uioN`, given to `intr_handle` as its fd (not opened in a secondary: see the
    /// module docs).
    _uio: Option<File>,
    /// The device's sysfs `config`, given to `intr_handle` as its dev fd.
    _config: File,
    /// The mapped BARs (unmapped when this is dropped).
    _maps: Vec<UioBar>,
    /// The device's claim, taken before it was opened; dropped last. None in a secondary.
    _claim: Option<Claim>,
    /// Mapped in a secondary process (the primary holds the device and its record).
    secondary: bool,
}

static HELD: Mutex<Vec<Held>> = Mutex::new(Vec::new());

fn held() -> MutexGuard<'static, Vec<Held>> {
    HELD.lock().unwrap_or_else(|e| e.into_inner())
}

/// Whether this process holds `name` through UIO (mapped by [`map`]).
pub fn is_held(name: &str) -> bool {
    held().iter().any(|h| h.name == name)
}

/// An I/O port handed out by [`ioport_map`]: which device, what `p->base` is, and what it
/// reaches.
#[derive(Debug)]
struct Port {
    name: String,
    base: u64,
    kind: PortKind,
}

static PORTS: Mutex<Vec<Port>> = Mutex::new(Vec::new());

fn ports() -> MutexGuard<'static, Vec<Port>> {
    PORTS.lock().unwrap_or_else(|e| e.into_inner())
}

/// `/dev/uioN` fds opened by [`ioport_map`] for a device not mapped (22.11 gives its
/// interrupt handle one); closed when the device is mapped or the process ends.
static PORT_INTR: Mutex<Vec<(String, File)>> = Mutex::new(Vec::new());

fn port_intr() -> MutexGuard<'static, Vec<(String, File)>> {
    PORT_INTR.lock().unwrap_or_else(|e| e.into_inner())
}

fn fail(what: impl std::fmt::Display, e: impl std::fmt::Display) -> Failure {
    Failure(format!("{what}: {e}"))
}

/// EAL's `--create-uio-dev`: creates `DEVDIR/uioN` from the `major:minor` of the uio
/// instance's sysfs `dev` file when it does not exist (a container without devtmpfs);
/// an existing node is left as it is. Returns whether a node was made.
fn ensure_uio_node(dev_dir: &Path, n: u32, devdir: &Path) -> Result<bool, String> {
    let node = devdir.join(format!("uio{n}"));
    if node.symlink_metadata().is_ok() {
        return Ok(false);
    }
    let (path, text) = plan::uio_sysfs_dirs(dev_dir, n)
        .into_iter()
        .map(|d| d.join("dev"))
        .find_map(|p| std::fs::read(&p).ok().map(|t| (p, t)))
        .ok_or_else(|| format!("no dev file of uio{n} under {}", dev_dir.display()))?;
    let (major, minor) = plan::parse_dev_numbers(&text).ok_or_else(|| {
        format!(
            "{}: not major:minor: {:?}",
            path.display(),
            String::from_utf8_lossy(&text[..text.len().min(64)])
        )
    })?;
    sys::mknod_char(&node, major, minor)
        .map_err(|e| format!("mknod {} c {major} {minor}: {e}", node.display()))?;
    Ok(true)
}

fn read_resources(dev_dir: &Path) -> Result<Vec<Resource>, String> {
    let path = dev_dir.join("resource");
    let bytes = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    pcibus::sysfs::parse::resource(&bytes)
        .map_err(|e| format!("{}: {}", path.display(), pcibus::error::chain(&e)))
}

/// `pci_uio_map_resource` (primary or secondary process) for a device bound to `driver`:
/// 0, 1 (no UIO instance: "not managed by UIO driver, skipping", as 22.11), or -1 with a
/// log line naming the device and the failed step.
///
/// # Safety
/// `dev` is a live device of the bus, not accessed elsewhere during the call.
pub unsafe fn map(dev: *mut RtePciDevice, name: &str, driver: UioDriver) -> c_int {
    // SAFETY: per the contract.
    unsafe {
        map_in(
            dev,
            name,
            driver,
            &crate::config::sysfs_devices_dir(),
            Path::new("/dev"),
        )
    }
}

/// [`map`] with the sysfs devices directory and the directory of `uioN` device nodes given
/// (tests use files of their own).
///
/// # Safety
/// As [`map`].
unsafe fn map_in(
    dev: *mut RtePciDevice,
    name: &str,
    driver: UioDriver,
    sysfs: &Path,
    devdir: &Path,
) -> c_int {
    if is_held(name) {
        log::debug(&format!("{name}: already mapped through UIO"));
        return 0;
    }
    // SAFETY: no arguments.
    let secondary = unsafe { eal::rte_eal_process_type() } != RTE_PROC_PRIMARY;
    // SAFETY: per the contract.
    let intr = unsafe { (*dev).intr_handle };
    // SAFETY: intr is a live instance when not null (tested first).
    let unusable = intr.is_null()
        || unsafe { eal::rte_intr_fd_set(intr, -1) != 0 || eal::rte_intr_dev_fd_set(intr, -1) != 0 };
    if unusable {
        log::error(&format!(
            "rte_pci_map_device({name}): no usable interrupt instance"
        ));
        return -1;
    }
    let dev_dir = sysfs.join(name);
    let uio = match plan::find_uio(&dev_dir) {
        Ok(Some(n)) => n,
        Ok(None) => {
            log::warn(&format!(
                "{name}: not managed by UIO driver (no uio instance), skipping"
            ));
            return 1;
        }
        Err(e) => {
            log::warn(&format!(
                "{name}: cannot read {}: {e}; skipping",
                dev_dir.display()
            ));
            return 1;
        }
    };
    // SAFETY: per the contract.
    let addr = unsafe { (*dev).addr };
    let rec = if secondary {
        match mp::find(&addr, Kind::Uio) {
            Ok(r) => Some(r),
            Err(why) => {
                log::error(&format!(
                    "rte_pci_map_device({name}) in a secondary process: {why}"
                ));
                return -1;
            }
        }
    } else {
        None
    };
    // --create-uio-dev: the primary makes a missing /dev/uioN from sysfs (as 22.11 does;
    // a failure is a warning, and the open below then says what is missing).
    // SAFETY: no arguments; reads EAL's internal configuration.
    let create = !secondary && unsafe { eal_uio::rte_eal_create_uio_dev() } != 0;
    if create && let Err(why) = ensure_uio_node(&dev_dir, uio, devdir) {
        log::warn(&format!(
            "{name}: cannot create {}/uio{uio}: {why}",
            devdir.display()
        ));
    }
    // The primary holds the device; a secondary takes no claim.
    let claim = if secondary {
        None
    } else {
        match crate::vfio_pci::claim(name) {
            Ok(c) => c,
            Err(why) => {
                log::error(&format!("rte_pci_map_device({name}): {why}"));
                return -1;
            }
        }
    };
    // SAFETY: per the contract.
    let wc = unsafe {
        let dr = (*dev).driver;
        !dr.is_null() && (*dr).drv_flags & RTE_PCI_DRV_WC_ACTIVATE != 0
    };
    // SAFETY: per the contract.
    match unsafe {
        setup(
            dev,
            driver,
            &dev_dir,
            &devdir.join(format!("uio{uio}")),
            wc,
            rec.as_ref(),
        )
    } {
        Ok((uio_file, config, maps, recorded)) => {
            if !secondary {
                mp::publish(&Record {
                    addr,
                    kind: Kind::Uio,
                    pid: std::process::id() as i32,
                    bars: recorded,
                });
            }
            held().push(Held {
                name: name.to_owned(),
                _uio: uio_file,
                _config: config,
                _maps: maps,
                _claim: claim,
                secondary,
            });
            // The interrupt fd ioport_map may have opened is replaced by this one.
            port_intr().retain(|(n, _)| n != name);
            log::debug(&format!("{name}: mapped through UIO (uio{uio})"));
            0
        }
        Err(Failure(why)) => {
            let role = if secondary { " in a secondary process" } else { "" };
            log::error(&format!("rte_pci_map_device({name}){role}: {why}"));
            -1
        }
    }
}

type Recorded = [Option<BarRecord>; plan::BARS];
type Setup = (Option<File>, File, Vec<UioBar>, Recorded);

/// Opens the fds, fills the interrupt handle, sets Bus Master (uio_pci_generic), maps the
/// BARs; on failure undoes it all (the files close, the mappings go, the handle is reset).
///
/// # Safety
/// As [`map`]; `intr_handle` is a live instance.
unsafe fn setup(
    dev: *mut RtePciDevice,
    driver: UioDriver,
    dev_dir: &Path,
    uio_path: &Path,
    wc: bool,
    secondary: Option<&Record>,
) -> Result<Setup, Failure> {
    let mut maps = Vec::new();
    let mut recorded = Recorded::default();
    // SAFETY: per the contract.
    let res = unsafe {
        setup_steps(
            dev,
            driver,
            dev_dir,
            uio_path,
            wc,
            secondary,
            &mut maps,
            &mut recorded,
        )
    };
    match res {
        Ok((uio, config)) => Ok((uio, config, maps, recorded)),
        Err(e) => {
            // SAFETY: per the contract; the mappings are dropped after their addresses
            // are cleared; the handle forgets the fds setup_steps has closed (nothing
            // used them in between: the device is not probed yet).
            unsafe { reset(dev) };
            drop(maps);
            Err(e)
        }
    }
}

/// `secondary`: the primary's record (a secondary process maps the BARs it lists at its
/// addresses and leaves the Command register alone); `recorded` gets what a primary maps.
///
/// # Safety
/// As [`setup`].
#[allow(clippy::too_many_arguments)]
unsafe fn setup_steps(
    dev: *mut RtePciDevice,
    driver: UioDriver,
    dev_dir: &Path,
    uio_path: &Path,
    wc: bool,
    secondary: Option<&Record>,
    maps: &mut Vec<UioBar>,
    recorded: &mut Recorded,
) -> Result<(Option<File>, File), Failure> {
    // SAFETY: per the contract.
    let intr = unsafe { (*dev).intr_handle };
    // Not in a secondary: uio_pci_generic clears Bus Master whenever an fd of /dev/uioN is
    // closed, which a secondary's exit would do under the primary.
    let uio = match secondary {
        None => {
            Some(sys::open_rw(uio_path).map_err(|e| fail(format!("cannot open {}", uio_path.display()), e))?)
        }
        Some(_) => None,
    };
    let config_path = dev_dir.join("config");
    let config =
        sys::open_rw(&config_path).map_err(|e| fail(format!("cannot open {}", config_path.display()), e))?;
    let choice = plan::intr_choice(driver);
    let ty = if choice.uio {
        RTE_INTR_HANDLE_UIO
    } else {
        RTE_INTR_HANDLE_UIO_INTX
    };
    // SAFETY: intr is live; the files stay open while the device is held (on failure the
    // handle is reset before they close).
    unsafe {
        if let Some(uio) = &uio {
            eal_ok("rte_intr_fd_set", eal::rte_intr_fd_set(intr, uio.as_raw_fd()))?;
        }
        eal_ok(
            "rte_intr_dev_fd_set",
            eal::rte_intr_dev_fd_set(intr, config.as_raw_fd()),
        )?;
        eal_ok("rte_intr_type_set", eal::rte_intr_type_set(intr, ty))?;
    }
    if choice.set_master && secondary.is_none() {
        let cmd =
            sys::read_u16(&config, plan::COMMAND).map_err(|e| fail("reading the Command register", e))?;
        if let Some(new) = plan::with_master(cmd) {
            sys::write_u16(&config, plan::COMMAND, new).map_err(|e| fail("setting Bus Master", e))?;
        }
    }
    let resources = read_resources(dev_dir).map_err(|e| Failure(format!("reading the BARs: {e}")))?;
    let planned = plan::bar_plan(&resources);
    if let Some(rec) = secondary
        && let Some(i) =
            (0..plan::BARS).find(|&i| rec.bars[i].is_some() && !planned.iter().any(|b| b.bar == i))
    {
        return Err(Failure(format!(
            "the primary mapped BAR{i}, which is not a memory BAR here"
        )));
    }
    for b in planned {
        let mut file = None;
        let mut last = None;
        let mut used_wc = false;
        // A secondary opens the file the primary mapped; a primary tries `_wc` first when
        // the driver asks for write-combining.
        let (candidates, place) = match secondary {
            Some(rec) => {
                let Some(r) = &rec.bars[b.bar] else {
                    return Err(Failure(format!("the primary did not map BAR{}", b.bar)));
                };
                crate::mp::plan::check_bar(b.bar, r, b.len).map_err(Failure)?;
                let f = plan::resource_files(b.bar, r.wc).into_iter().next();
                (f.into_iter().collect::<Vec<_>>(), Place::Exact(r.addr))
            }
            None => (
                plan::resource_files(b.bar, wc),
                mp::hint(b.len).map_or(Place::Anywhere, Place::Hint),
            ),
        };
        for f in candidates {
            let path = dev_dir.join(&f);
            match sys::open_rw(&path) {
                Ok(x) => {
                    used_wc = f.ends_with("_wc");
                    file = Some(x);
                    break;
                }
                Err(e) => {
                    if f.ends_with("_wc") && e.kind() != io::ErrorKind::NotFound {
                        log::info(&format!(
                            "{} cannot be mapped ({e}); falling back to the non-prefetchable mapping",
                            path.display()
                        ));
                    }
                    last = Some(fail(format!("cannot open {}", path.display()), e));
                }
            }
        }
        let Some(file) = file else {
            return Err(last.unwrap_or_else(|| Failure(format!("no resource file for BAR{}", b.bar))));
        };
        let m = UioBar::map(&file, b.len, place).map_err(|e| {
            let at = match place {
                Place::Exact(a) => format!(" at {a:#x}, where the primary has it"),
                _ => String::new(),
            };
            fail(format!("mmap of BAR{} ({:#x} bytes{at})", b.bar, b.len), e)
        })?;
        // SAFETY: per the contract; the sigbus handler reads these fields.
        unsafe {
            let r = &raw mut (*dev).mem_resource[b.bar];
            (*r).phys_addr = b.phys;
            (*r).len = m.len() as u64;
            (*r).addr = m.addr();
        }
        recorded[b.bar] = Some(BarRecord {
            addr: m.addr() as u64,
            len: m.len() as u64,
            parts: vec![(0, m.len() as u64)],
            wc: used_wc,
        });
        maps.push(m);
    }
    Ok((uio, config))
}

/// Resets the interrupt handle (no fds, type unknown) and clears every `mem_resource[].addr`
/// (so the SIGBUS lookup stops claiming them before the mappings go).
///
/// # Safety
/// `dev` is live.
unsafe fn reset(dev: *mut RtePciDevice) {
    // SAFETY: per the contract.
    unsafe {
        let intr = (*dev).intr_handle;
        if !intr.is_null() {
            eal::rte_intr_fd_set(intr, -1);
            eal::rte_intr_dev_fd_set(intr, -1);
            eal::rte_intr_type_set(intr, RTE_INTR_HANDLE_UNKNOWN);
        }
        for r in &mut (*dev).mem_resource {
            r.addr = ptr::null_mut();
        }
    }
}

/// `pci_uio_unmap_resource` (a primary first drops its record for secondaries): the
/// interrupt handle reset, its fds closed, the BARs unmapped (and I/O ports through them
/// forgotten), the claim dropped (a secondary has none). 0, or -1 with a log line (a
/// device this process does not hold).
///
/// # Safety
/// `dev` is a live device of the bus, not accessed elsewhere during the call.
pub unsafe fn unmap(dev: *mut RtePciDevice, name: &str) -> c_int {
    let taken = {
        let mut list = held();
        list.iter().position(|h| h.name == name).map(|i| list.remove(i))
    };
    let Some(h) = taken else {
        log::error(&format!(
            "rte_pci_unmap_device({name}): not mapped through UIO by this process"
        ));
        return -1;
    };
    log::info(&format!("releasing PCI mapped resource for {name}"));
    if !h.secondary {
        // Secondaries starting from now do not find it.
        // SAFETY: per the contract.
        mp::forget(unsafe { &(*dev).addr });
    }
    // SAFETY: per the contract.
    unsafe { reset(dev) };
    ports().retain(|p| !(p.name == name && matches!(p.kind, PortKind::Mem { .. })));
    drop(h);
    0
}

/// The hot-unplug remap (22.11's `pci_uio_remap_resource`): every mapped BAR of `dev`
/// (`mem_resource[i].addr`/`len`) becomes anonymous memory. Async-signal-safe (no lock, no
/// allocation, no log): the SIGBUS hook calls it. 0, or -1 when a remap failed.
///
/// # Safety
/// `dev` is live; its non-null `mem_resource[i].addr` are this module's mappings of `len`
/// bytes (a UIO device's are: nothing else maps them).
pub unsafe fn remap_for_unplug(dev: *mut RtePciDevice) -> c_int {
    let mut ret = 0;
    // SAFETY: per the contract; the fields are read in place.
    unsafe {
        for i in 0..plan::BARS {
            let r = &raw const (*dev).mem_resource[i];
            let (addr, len) = ((*r).addr, (*r).len);
            if addr.is_null() || len == 0 {
                continue;
            }
            if !sys::remap_anonymous(addr, len as usize) {
                ret = -1;
            }
        }
    }
    ret
}

/// `rte_pci_ioport_map` for a UIO device (22.11's x86 `pci_uio_ioport_map`): `p->base` is
/// the port number of an I/O BAR (after `rte_eal_iopl_init`) or the mapped address of a
/// memory BAR (the device must be mapped). A device not mapped gets `/dev/uioN` as its
/// interrupt fd, as 22.11. `Ok(base)`, or `Err` saying why.
///
/// # Safety
/// `dev` is a live device of the bus.
pub unsafe fn ioport_map(dev: *mut RtePciDevice, name: &str, bar: usize) -> Result<u64, String> {
    // SAFETY: per the contract.
    unsafe { ioport_map_in(dev, name, bar, &crate::config::sysfs_devices_dir()) }
}

/// [`ioport_map`] with the sysfs devices directory given.
///
/// # Safety
/// As [`ioport_map`].
unsafe fn ioport_map_in(dev: *mut RtePciDevice, name: &str, bar: usize, sysfs: &Path) -> Result<u64, String> {
    let dev_dir = sysfs.join(name);
    let resources = read_resources(&dev_dir)?;
    let kind = plan::port_kind(&resources, bar)?;
    let base = match kind {
        PortKind::Io { base, .. } => {
            // SAFETY: no arguments.
            if unsafe { eal_uio::rte_eal_iopl_init() } != 0 {
                return Err("insufficient I/O port permissions (iopl)".to_owned());
            }
            u64::from(base)
        }
        PortKind::Mem { .. } => {
            // SAFETY: per the contract.
            let addr = unsafe { (*dev).mem_resource[bar].addr };
            if addr.is_null() || !is_held(name) {
                return Err(format!(
                    "memory BAR {bar} is not mapped (rte_pci_map_device first)"
                ));
            }
            addr as u64
        }
    };
    if !is_held(name) {
        // SAFETY: per the contract.
        unsafe { port_interrupt(dev, name, &dev_dir)? };
    }
    ports().push(Port {
        name: name.to_owned(),
        base,
        kind,
    });
    Ok(base)
}

/// 22.11 opens `/dev/uioN` into the interrupt handle (type `RTE_INTR_HANDLE_UIO`) of a
/// device whose handle is unset when an I/O port is mapped.
///
/// # Safety
/// `dev` is live.
unsafe fn port_interrupt(dev: *mut RtePciDevice, name: &str, dev_dir: &Path) -> Result<(), String> {
    // SAFETY: per the contract.
    let intr = unsafe { (*dev).intr_handle };
    // SAFETY: intr is live when not null.
    if intr.is_null() || unsafe { eal_uio::rte_intr_type_get(intr) } != RTE_INTR_HANDLE_UNKNOWN {
        return Ok(());
    }
    if mp::is_secondary() {
        // Closing /dev/uioN would clear Bus Master under the primary (see the module docs).
        return Ok(());
    }
    let n = plan::find_uio(dev_dir)
        .map_err(|e| format!("{}: {e}", dev_dir.display()))?
        .ok_or_else(|| format!("{}: no uio instance", dev_dir.display()))?;
    let path = PathBuf::from(format!("/dev/uio{n}"));
    let f = sys::open_rw(&path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    // SAFETY: intr is live; the file is kept open (PORT_INTR) while the handle uses it.
    unsafe {
        if eal::rte_intr_fd_set(intr, f.as_raw_fd()) != 0
            || eal::rte_intr_type_set(intr, RTE_INTR_HANDLE_UIO) != 0
        {
            eal::rte_intr_fd_set(intr, -1);
            return Err("setting the interrupt handle failed".to_owned());
        }
    }
    let mut list = port_intr();
    list.retain(|(x, _)| x != name);
    list.push((name.to_owned(), f));
    Ok(())
}

/// An access of `len` bytes at `offset` of a port [`ioport_map`] gave out (`base`):
/// `None` when it did not (not ours, or unmapped since), else the access's result.
///
/// # Safety
/// `data` is valid for `len` bytes (written for a read, read for a write).
pub unsafe fn ioport_access(
    name: &str,
    base: u64,
    offset: u64,
    data: *mut u8,
    len: usize,
    write: bool,
) -> Option<Result<(), String>> {
    let list = ports();
    let port = list.iter().find(|p| p.name == name && p.base == base)?;
    let size = match port.kind {
        PortKind::Io { len, .. } | PortKind::Mem { len } => len,
    };
    if !plan::port_range_ok(size, offset, len) {
        return Some(Err(format!(
            "{len} bytes at offset {offset:#x} are beyond the BAR ({size:#x} bytes)"
        )));
    }
    // The lock stays held across the access: an unmap cannot remove the mapping under it.
    Some(match port.kind {
        PortKind::Io { base: first, .. } => {
            // port_range_ok and PIO_MAX keep this below 0x10000.
            let Ok(p) = u16::try_from(u64::from(first) + offset) else {
                return Some(Err(format!("port {first:#x} + {offset:#x} overflows")));
            };
            // SAFETY: the ports are the BAR's (range checked), iopl was granted in
            // ioport_map; data per the contract.
            let r = unsafe {
                if write {
                    sys::port_write(p, data, len)
                } else {
                    sys::port_read(p, data, len)
                }
            };
            r.map_err(|e| e.to_string())
        }
        PortKind::Mem { .. } => {
            let at = (base + offset) as *mut u8;
            // SAFETY: the range is inside the BAR's live mapping (range checked; unmap
            // removes Mem ports under this lock before the mapping goes); data per the
            // contract.
            unsafe {
                if write {
                    sys::mmio_write(at, data, len);
                } else {
                    sys::mmio_read(at, data, len);
                }
            }
            Ok(())
        }
    })
}

/// `rte_pci_ioport_unmap` of a UIO port: forgets it (22.11's x86 version does nothing); 0.
pub fn ioport_unmap(name: &str, base: u64) -> c_int {
    let mut list = ports();
    if let Some(i) = list.iter().position(|p| p.name == name && p.base == base) {
        list.remove(i);
    }
    0
}

#[cfg(test)]
mod tests;
