//! The bus itself: the `struct rte_bus` named "pci" that a constructor registers with EAL
//! (as `RTE_REGISTER_BUS(pci, ...)` does, at `RTE_PRIORITY_BUS`), its operations, and the
//! list of `struct rte_pci_device`s the scan fills.
//!
//! This is an unsafe boundary with C, like `crate::exports`: every operation takes raw
//! pointers from EAL or a PMD, and the devices are C structs PMDs reach into. The decisions
//! are made by the safe modules ([`crate::scan`], [`crate::matching`], [`crate::drivers`]).
//!
//! The device list: each device is a heap-allocated `rte_pci_device` (stable address until
//! `unplug` or `cleanup` frees it), kept sorted by address in a mutex-guarded vector; the
//! devices' own `next` links are kept in the same order for C code that follows them. The
//! lock is never held while calling into C code that might call back (a driver's probe or
//! remove, a `find_device` comparator), so a PMD may use the bus from its probe.

use core::cell::UnsafeCell;
use core::ffi::{CStr, c_char, c_int, c_void};
use core::ptr;
use std::ffi::CString;
use std::sync::{Mutex, MutexGuard, OnceLock};

use pcibus::removal::registry::Reason;
use pcibus::sysfs::scan::SysfsRoot;

use crate::drivers;
use crate::exports::{map_device, unmap_device};
use crate::ffi::eal;
use crate::ffi::errno::pcibus_dpdk_set_rte_errno;
use crate::ffi::kvargs;
use crate::ffi::pci::rte_pci_addr_parse;
use crate::ffi::types::measured::{
    RTE_DEV_BLOCKED, RTE_DEV_EVENT_REMOVE, RTE_IOVA_DC, RTE_IOVA_PA, RTE_PCI_DRV_KEEP_MAPPED_RES,
    RTE_PCI_DRV_NEED_MAPPING, RTE_PCI_DRV_PROBE_AGAIN, RTE_PCI_KDRV_IGB_UIO, RTE_PCI_KDRV_NIC_UIO,
    RTE_PCI_KDRV_NONE, RTE_PCI_KDRV_UIO_GENERIC, RTE_PCI_KDRV_UNKNOWN, RTE_PCI_KDRV_VFIO,
};
use crate::ffi::types::{
    PCI_PRI_STR_SIZE, RTE_DEV_NAME_MAX_LEN, RteBus, RteBusConf, RteDevCmp, RteDevargs, RteDevice,
    RteMemResource, RtePciAddr, RtePciDevice, RtePciDriver, RtePciId, TailqEntry,
};
use crate::guard;
use crate::log;
use crate::matching;
use crate::scan::{self, ScannedDevice};

/// The registered bus. EAL links it into its bus list and writes `conf.scan_mode` (from
/// `-a`/`-b`), so it is mutable memory shared with C.
struct BusCell(UnsafeCell<RteBus>);

// SAFETY: EAL owns the synchronisation of its bus list (it registers buses from
// constructors and reads them afterwards); this crate only reads `conf` through the
// pointer, as the stock bus does.
unsafe impl Sync for BusCell {}

static BUS: BusCell = BusCell(UnsafeCell::new(RteBus {
    next: TailqEntry {
        tqe_next: ptr::null_mut(),
        tqe_prev: ptr::null_mut(),
    },
    name: c"pci".as_ptr(),
    scan: Some(bus_scan),
    probe: Some(bus_probe),
    find_device: Some(bus_find_device),
    plug: Some(bus_plug),
    unplug: Some(bus_unplug),
    parse: Some(bus_parse),
    devargs_parse: Some(bus_devargs_parse),
    dma_map: Some(bus_dma_map),
    dma_unmap: Some(bus_dma_unmap),
    conf: RteBusConf { scan_mode: 0 },
    get_iommu_class: Some(bus_get_iommu_class),
    dev_iterate: Some(bus_dev_iterate),
    hot_unplug_handler: Some(bus_hot_unplug_handler),
    sigbus_handler: Some(bus_sigbus_handler),
    cleanup: Some(bus_cleanup),
}));

/// The bus, as C sees it.
pub fn bus() -> *mut RteBus {
    BUS.0.get()
}

/// `RTE_REGISTER_BUS(pci, ...)`: a constructor of priority `RTE_PRIORITY_BUS` (110), so it
/// runs before the PMDs' constructors (which call `rte_pci_register`) of the same object,
/// and, through the PMDs' `DT_NEEDED` on this library, before theirs.
#[cfg(not(test))]
extern "C" fn register_bus() {
    // SAFETY: the bus is a static with every mandatory operation set; EAL keeps the
    // pointer for the life of the process, which the static outlives.
    unsafe { eal::rte_bus_register(bus()) };
}

// GCC puts `__attribute__((constructor(110)))` into `.init_array.00110`; the linker sorts
// those sections by priority. Not in this crate's own unit tests (no EAL there to speak of).
#[cfg(not(test))]
#[used]
#[unsafe(link_section = ".init_array.00110")]
static REGISTER_BUS: extern "C" fn() = register_bus;

const _: () = assert!(crate::ffi::types::measured::RTE_PRIORITY_BUS == 110);

/// A device of the list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct DevPtr(*mut RtePciDevice);

// SAFETY: the pointer is a heap allocation this module owns (Box::into_raw) until it frees
// it under the list's lock; moving the address between threads moves no data.
unsafe impl Send for DevPtr {}

static DEVICES: Mutex<Vec<DevPtr>> = Mutex::new(Vec::new());

fn devices() -> MutexGuard<'static, Vec<DevPtr>> {
    DEVICES.lock().unwrap_or_else(|e| e.into_inner())
}

/// The devices on the bus, in address order (for `rte_pci_dump`).
pub fn snapshot() -> Vec<*mut RtePciDevice> {
    devices().iter().map(|d| d.0).collect()
}

fn set_rte_errno(e: c_int) {
    // SAFETY: sets a thread-local int.
    unsafe { pcibus_dpdk_set_rte_errno(e) };
}

/// `RTE_DEV_TO_PCI`: the `rte_pci_device` around a `rte_device`.
fn to_pci(dev: *const RteDevice) -> *mut RtePciDevice {
    if dev.is_null() {
        return ptr::null_mut();
    }
    dev.cast::<u8>()
        .wrapping_sub(core::mem::offset_of!(RtePciDevice, device))
        .cast::<RtePciDevice>()
        .cast_mut()
}

/// `rte_pci_addr_parse` of DPDK's librte_pci (the stock bus's parser: `BB:DD.F` or
/// `DDDD:BB:DD.F`, hex).
fn parse_addr(name: &CStr) -> Option<RtePciAddr> {
    let mut addr = RtePciAddr::default();
    // SAFETY: name is NUL-terminated; addr is a valid out-parameter.
    (unsafe { rte_pci_addr_parse(name.as_ptr(), &mut addr) } == 0).then_some(addr)
}

/// A NUL-terminated C array as a `CStr` (`None` without a NUL).
fn array_cstr(a: &[c_char]) -> Option<&CStr> {
    // SAFETY: c_char and u8 have the same size and alignment; the slice stays borrowed.
    let bytes = unsafe { core::slice::from_raw_parts(a.as_ptr().cast::<u8>(), a.len()) };
    CStr::from_bytes_until_nul(bytes).ok()
}

/// Copies `s` into a C array, truncated, NUL-terminated.
fn fill_array(dst: &mut [c_char], s: &str) {
    let n = s.len().min(dst.len().saturating_sub(1));
    for (d, b) in dst.iter_mut().zip(&s.as_bytes()[..n]) {
        *d = *b as c_char;
    }
    if let Some(end) = dst.get_mut(n) {
        *end = 0;
    }
}

/// EAL's devargs of the "pci" bus, in EAL's order, with the address each names.
fn pci_devargs() -> Vec<(RtePciAddr, c_int, *mut RteDevargs)> {
    let mut out = Vec::new();
    let mut da: *mut RteDevargs = ptr::null_mut();
    loop {
        // SAFETY: EAL walks its own list from `da` (null: the start), which it returned.
        da = unsafe { eal::rte_devargs_next(c"pci".as_ptr(), da) };
        if da.is_null() {
            return out;
        }
        // SAFETY: da is a live devargs of EAL's list; its name is an array in place.
        let (name, policy) = unsafe { (&(*da).name, (*da).policy) };
        if let Some(addr) = array_cstr(name).and_then(parse_addr) {
            out.push((addr, policy, da));
        }
    }
}

/// `pci_devargs_lookup`: the first devargs naming `addr`.
fn devargs_of(addr: RtePciAddr, list: &[(RtePciAddr, c_int, *mut RteDevargs)]) -> *mut RteDevargs {
    list.iter()
        .find(|(a, _, _)| *a == addr)
        .map_or(ptr::null_mut(), |(_, _, da)| *da)
}

/// `pci_common_set`: the canonical name, `device.name`, `device.devargs`, `bus_info`.
///
/// # Safety
/// `p` is a device of this module's list (or being added to it), not accessed elsewhere in
/// Rust during the call.
unsafe fn common_set(p: *mut RtePciDevice, devargs: *mut RteDevargs) {
    // SAFETY: per the contract, p is live; its fields are written in place.
    unsafe {
        let name = scan::device_name((*p).addr);
        fill_array(&mut (*p).name, &name);
        (*p).device.name = (*p).name.as_ptr();
        (*p).device.devargs = devargs;
        if (*p).bus_info.is_null() {
            let info = format!(
                "vendor_id={:x}, device_id={:x}",
                (*p).id.vendor_id,
                (*p).id.device_id
            );
            if let Ok(c) = CString::new(info) {
                (*p).bus_info = c.into_raw();
            }
        }
        (*p).device.bus_info = (*p).bus_info;
    }
}

/// Writes a scanned device's ids, BARs, driver kind and VF count.
///
/// # Safety
/// As [`common_set`].
unsafe fn fill(p: *mut RtePciDevice, d: &ScannedDevice) {
    // SAFETY: per the contract.
    unsafe {
        (*p).kdrv = d.kdrv;
        (*p).max_vfs = d.max_vfs;
        (*p).id = d.id;
        for (r, &(phys, len)) in (*p).mem_resource.iter_mut().zip(&d.mem) {
            *r = RteMemResource {
                phys_addr: phys,
                len,
                addr: ptr::null_mut(),
            };
        }
    }
}

fn new_device(d: &ScannedDevice, devargs: *mut RteDevargs) -> *mut RtePciDevice {
    // SAFETY: an all-zero rte_pci_device is valid (null pointers, zero numbers), as the
    // stock bus's memset.
    let p = Box::into_raw(Box::new(unsafe { core::mem::zeroed::<RtePciDevice>() }));
    // SAFETY: p was just allocated and is not shared yet.
    unsafe {
        (*p).device.bus = bus();
        (*p).addr = d.addr;
        (*p).device.numa_node = d.numa_node;
        fill(p, d);
        common_set(p, devargs);
    }
    p
}

/// Frees a device taken off the list (`pci_free`).
///
/// # Safety
/// `p` came from [`new_device`], is off the list, and nothing uses it any more.
unsafe fn free_device(p: *mut RtePciDevice) {
    // SAFETY: per the contract; bus_info came from CString::into_raw.
    unsafe {
        if !(*p).bus_info.is_null() {
            drop(CString::from_raw((*p).bus_info));
        }
        drop(Box::from_raw(p));
    }
}

/// Points each device's `next` at the following one (the order of the list).
fn relink(list: &[DevPtr]) {
    for (i, d) in list.iter().enumerate() {
        let next = list.get(i + 1).map_or(ptr::null_mut(), |n| n.0);
        let prev = match i.checked_sub(1) {
            // SAFETY: the previous device is live (on the list, under its lock).
            Some(j) => unsafe { &raw mut (*list[j].0).next.tqe_next },
            None => ptr::null_mut(),
        };
        // SAFETY: d is live, on the list, under its lock.
        unsafe {
            (*d.0).next.tqe_next = next;
            (*d.0).next.tqe_prev = prev;
        }
    }
}

fn sysfs_root() -> SysfsRoot {
    match std::env::var_os("SYSFS_PCI_DEVICES").filter(|v| !v.is_empty()) {
        Some(dir) => SysfsRoot::from_devices_dir(dir),
        None => SysfsRoot::from_env(),
    }
}

/// `rte_bus_find` comparator: 0 for a bus named "pci" that is not this one.
unsafe extern "C" fn other_pci_bus(b: *const RteBus, _data: *const c_void) -> c_int {
    // SAFETY: EAL passes a registered bus; its name is a NUL-terminated string.
    let is_pci = unsafe { !(*b).name.is_null() && CStr::from_ptr((*b).name) == c"pci" };
    c_int::from(!(is_pci && b != bus().cast_const()))
}

/// Takes any other bus named "pci" off EAL's list: the stock librte_bus_pci.so.23.0 that
/// EAL `dlopen`s from its default plugin directory (always, `-d` or not) when this library
/// was loaded in its place through `LD_LIBRARY_PATH`. Its PMDs registered with this bus
/// (the dynamic linker resolves `rte_pci_register` to the library loaded first), so the
/// other bus has no drivers; leaving it would scan every device a second time, the stock
/// way (reading `sriov_numvfs`). EAL scans buses in registration order, and this one
/// registered first (the application's `DT_NEEDED`), so the other is gone before its scan.
fn evict_other_pci_buses() {
    loop {
        // SAFETY: EAL walks its bus list with our comparator.
        let other = unsafe { eal::rte_bus_find(ptr::null(), other_pci_bus, ptr::null()) };
        if other.is_null() {
            return;
        }
        log::warn(
            "a second bus named \"pci\" is registered (the stock librte_bus_pci loaded as a plugin \
             from EAL's default driver directory): unregistered, pcibus's bus serves PCI",
        );
        // SAFETY: other is a registered bus; EAL unlinks it from its list.
        unsafe { eal::rte_bus_unregister(other) };
    }
}

/// `scan`: lists the devices (see [`crate::scan`]); a rescan updates the devices already
/// listed instead of adding them again.
unsafe extern "C" fn bus_scan() -> c_int {
    guard::ffi("pci bus scan", -1, || {
        evict_other_pci_buses();
        // SAFETY: no arguments.
        if unsafe { eal::rte_eal_has_pci() } == 0 {
            return 0;
        }
        let devargs = pci_devargs();
        // SAFETY: EAL writes scan_mode while parsing its arguments, before any scan.
        let scan_mode = unsafe { (*bus()).conf.scan_mode };
        let policies: Vec<(RtePciAddr, c_int)> = devargs.iter().map(|&(a, p, _)| (a, p)).collect();
        let filter = scan::Filter::new(scan_mode, &policies);
        let found = match scan::scan(sysfs_root(), &filter) {
            Ok(found) => found,
            Err(e) => {
                log::error(&format!("scan: {e}"));
                return -1;
            }
        };
        let mut list = devices();
        for d in &found {
            let da = devargs_of(d.addr, &devargs);
            let key = scan::addr_key(d.addr);
            // SAFETY: every pointer of the list is live under the lock.
            match list.binary_search_by_key(&key, |p| scan::addr_key(unsafe { (*p.0).addr })) {
                // SAFETY: p is live under the lock.
                Ok(i) => unsafe { update_device(list[i].0, d, da) },
                Err(i) => list.insert(i, DevPtr(new_device(d, da))),
            }
        }
        relink(&list);
        0
    })
}

/// A rescan of a listed device: a device no driver holds takes the new values; a probed
/// one keeps its own, with an error logged when they changed underneath it (a rebind
/// between a removal and a re-add), and takes new devargs.
///
/// # Safety
/// `p` is live, on the list, under its lock.
unsafe fn update_device(p: *mut RtePciDevice, d: &ScannedDevice, da: *mut RteDevargs) {
    // SAFETY: per the contract.
    unsafe {
        if (*p).device.driver.is_null() {
            fill(p, d);
            common_set(p, da);
            return;
        }
        let pending = scan::to_pcibus(d.addr).is_some_and(|a| scan::registry().is_pending(a));
        let vfs_changed = (*p).max_vfs != d.max_vfs && !pending;
        if (*p).kdrv != d.kdrv || vfs_changed || (*p).id != d.id {
            log::error(&format!(
                "unexpected device scan at {}: a probed device changed",
                scan::device_name(d.addr)
            ));
        } else if (*p).device.devargs != da {
            eal::rte_devargs_remove((*p).device.devargs);
            common_set(p, da);
        }
    }
}

/// Walks a driver's id table (up to the entry with `vendor_id == 0`).
///
/// # Safety
/// `dr` is a registered driver: a live `rte_pci_driver` whose `id_table` is null or ends
/// with a zero vendor.
unsafe fn id_table(dr: *const RtePciDriver) -> Vec<RtePciId> {
    let mut out = Vec::new();
    // SAFETY: per the contract.
    let mut e = unsafe { (*dr).id_table };
    if e.is_null() {
        return out;
    }
    // SAFETY: the table ends with a zero vendor; each entry before it is readable.
    while unsafe { (*e).vendor_id } != 0 {
        // SAFETY: as above.
        out.push(unsafe { *e });
        // SAFETY: the end entry has not been reached, so the next one exists.
        e = unsafe { e.add(1) };
    }
    out
}

fn vfio_noiommu() -> bool {
    static NOIOMMU: OnceLock<bool> = OnceLock::new();
    // SAFETY: no arguments; reads a module parameter.
    *NOIOMMU.get_or_init(|| unsafe { eal::rte_vfio_noiommu_is_enabled() } == 1)
}

/// `rte_pci_probe_one_driver`: 1 when the driver does not take the device, 0 when its
/// probe took it, negative on errors.
///
/// # Safety
/// `dr` is a registered driver and `p` a device of the list.
unsafe fn probe_one(dr: *mut RtePciDriver, p: *mut RtePciDevice) -> c_int {
    // SAFETY: per the contract, both are live; fields are read and written in place, and
    // only the driver's own callbacks are called.
    unsafe {
        let dev_id = (*p).id;
        if !matching::table_matches(&id_table(dr), &dev_id) {
            return 1;
        }
        let name = scan::device_name((*p).addr);
        let da = (*p).device.devargs;
        if !da.is_null() && (*da).policy == RTE_DEV_BLOCKED {
            log::info(&format!("{name}: device is blocked, not initializing"));
            return 1;
        }
        if (*p).device.numa_node < 0 && eal::rte_socket_count() > 1 {
            log::info(&format!("device {name} is not NUMA-aware"));
        }
        let flags = (*dr).drv_flags;
        let drv_name = cstr_or((*dr).driver.name, "?");
        let already = !(*p).device.driver.is_null();
        if already && flags & RTE_PCI_DRV_PROBE_AGAIN == 0 {
            log::debug(&format!("device {name} is already probed"));
            return -libc::EEXIST;
        }
        if !already {
            let wanted = matching::device_iova_mode(flags, (*p).kdrv, vfio_noiommu());
            let mode = eal::rte_eal_iova_mode();
            if wanted != RTE_IOVA_DC && wanted != mode {
                let pa_va = |m| if m == RTE_IOVA_PA { "PA" } else { "VA" };
                log::error(&format!(
                    "{name}: driver {drv_name} expects IOVA mode '{}' but it is '{}', not initializing",
                    pa_va(wanted),
                    pa_va(mode)
                ));
                return -libc::EINVAL;
            }
            (*p).intr_handle = eal::rte_intr_instance_alloc(eal::RTE_INTR_INSTANCE_F_PRIVATE);
            if (*p).intr_handle.is_null() {
                log::error(&format!("{name}: cannot allocate an interrupt instance"));
                return -libc::ENOMEM;
            }
            (*p).vfio_req_intr_handle = eal::rte_intr_instance_alloc(eal::RTE_INTR_INSTANCE_F_PRIVATE);
            if (*p).vfio_req_intr_handle.is_null() {
                free_intr_handles(p);
                log::error(&format!(
                    "{name}: cannot allocate the VFIO request interrupt instance"
                ));
                return -libc::ENOMEM;
            }
            // Before mapping: the mapping reads the driver's flags.
            (*p).driver = dr;
            if flags & RTE_PCI_DRV_NEED_MAPPING != 0 {
                let ret = map_device(p);
                if ret != 0 {
                    (*p).driver = ptr::null_mut();
                    free_intr_handles(p);
                    return ret;
                }
            }
        }
        log::info(&format!(
            "probe PCI driver: {drv_name} ({:x}:{:04x}) device: {name} (socket {})",
            dev_id.vendor_id,
            dev_id.device_id,
            (*p).device.numa_node
        ));
        let ret = match (*dr).probe {
            Some(probe) => probe(dr, p),
            None => -libc::ENOTSUP,
        };
        if already {
            return ret;
        }
        if ret != 0 {
            (*p).driver = ptr::null_mut();
            if flags & RTE_PCI_DRV_NEED_MAPPING != 0 && !(ret > 0 && flags & RTE_PCI_DRV_KEEP_MAPPED_RES != 0)
            {
                unmap_device(p);
            }
            free_intr_handles(p);
        } else {
            (*p).device.driver = &raw const (*dr).driver;
        }
        ret
    }
}

/// Frees and clears both interrupt instances.
///
/// # Safety
/// `p` is a live device.
unsafe fn free_intr_handles(p: *mut RtePciDevice) {
    // SAFETY: per the contract; rte_intr_instance_free accepts null.
    unsafe {
        eal::rte_intr_instance_free((*p).intr_handle);
        (*p).intr_handle = ptr::null_mut();
        eal::rte_intr_instance_free((*p).vfio_req_intr_handle);
        (*p).vfio_req_intr_handle = ptr::null_mut();
    }
}

fn cstr_or(s: *const c_char, default: &str) -> String {
    if s.is_null() {
        default.to_owned()
    } else {
        // SAFETY: C strings of DPDK structs (driver names) are NUL-terminated.
        unsafe { CStr::from_ptr(s) }.to_string_lossy().into_owned()
    }
}

/// `pci_probe_all_drivers`: the first registered driver that takes the device; 1 when
/// none does.
///
/// # Safety
/// `p` is null or a device of the list.
unsafe fn probe_all(p: *mut RtePciDevice) -> c_int {
    if p.is_null() {
        return -libc::EINVAL;
    }
    for dr in drivers::snapshot() {
        // SAFETY: registered drivers are live statics of their PMDs.
        let rc = unsafe { probe_one(dr.0, p) };
        if rc < 0 {
            return rc;
        }
        if rc == 0 {
            return 0;
        }
    }
    1
}

/// `probe`: every device against the drivers; -1 only when every device failed.
unsafe extern "C" fn bus_probe() -> c_int {
    guard::ffi("pci bus probe", -1, || {
        let list = snapshot();
        let mut failed = 0;
        for &p in &list {
            // SAFETY: p was on the list; devices are freed only by unplug/cleanup, which EAL
            // does not run during its probe.
            let ret = unsafe { probe_all(p) };
            if ret < 0 && ret != -libc::EEXIST {
                // SAFETY: as above.
                let name = scan::device_name(unsafe { (*p).addr });
                log::error(&format!("requested device {name} cannot be used ({ret})"));
                set_rte_errno(-ret);
                failed += 1;
            }
        }
        if !list.is_empty() && list.len() == failed {
            -1
        } else {
            0
        }
    })
}

/// `find_device`: the first device after `start` (from the first when null) for which
/// `cmp` returns 0.
unsafe extern "C" fn bus_find_device(
    start: *const RteDevice,
    cmp: RteDevCmp,
    data: *const c_void,
) -> *mut RteDevice {
    guard::ffi("pci bus find_device", ptr::null_mut(), || {
        let Some(cmp) = cmp else {
            return ptr::null_mut();
        };
        let list = snapshot();
        let from = if start.is_null() {
            0
        } else {
            match list.iter().position(|&p| p == to_pci(start)) {
                Some(i) => i + 1,
                None => return ptr::null_mut(),
            }
        };
        for &p in &list[from..] {
            // SAFETY: p is live (see bus_probe); cmp is EAL's or a caller's comparator.
            let dev = unsafe { &raw mut (*p).device };
            // SAFETY: the comparator receives a live device and the caller's data.
            if unsafe { cmp(dev, data) } == 0 {
                return dev;
            }
        }
        ptr::null_mut()
    })
}

/// `plug`: probes one device (hotplug's `rte_dev_probe`).
unsafe extern "C" fn bus_plug(dev: *mut RteDevice) -> c_int {
    guard::ffi("pci bus plug", -1, || {
        // SAFETY: EAL passes a device of this bus.
        unsafe { probe_all(to_pci(dev)) }
    })
}

/// `rte_pci_detach_dev`: the driver's remove, then unmapping and the interrupt instances.
///
/// # Safety
/// `p` is null or a device of the list.
unsafe fn detach(p: *mut RtePciDevice) -> c_int {
    if p.is_null() {
        return -libc::EINVAL;
    }
    // SAFETY: per the contract; the driver is live while registered.
    unsafe {
        let dr = (*p).driver;
        if !dr.is_null()
            && let Some(remove) = (*dr).remove
        {
            let ret = remove(p);
            if ret < 0 {
                return ret;
            }
        }
        (*p).driver = ptr::null_mut();
        (*p).device.driver = ptr::null();
        if !dr.is_null() && (*dr).drv_flags & RTE_PCI_DRV_NEED_MAPPING != 0 {
            unmap_device(p);
        }
        free_intr_handles(p);
    }
    0
}

/// `unplug`: detaches the device, takes it off the bus, drops its devargs and frees it.
unsafe extern "C" fn bus_unplug(dev: *mut RteDevice) -> c_int {
    guard::ffi("pci bus unplug", -1, || {
        let p = to_pci(dev);
        // SAFETY: EAL passes a device of this bus.
        let ret = unsafe { detach(p) };
        if ret == 0 {
            let mut list = devices();
            list.retain(|d| d.0 != p);
            relink(&list);
            drop(list);
            // SAFETY: p is off the list; EAL drops its references after a successful unplug.
            unsafe {
                eal::rte_devargs_remove((*p).device.devargs);
                free_device(p);
            }
        }
        ret
    })
}

/// `parse`: 0 when `name` is a PCI address (written to `addr` when not null), else 1.
unsafe extern "C" fn bus_parse(name: *const c_char, addr: *mut c_void) -> c_int {
    guard::ffi("pci bus parse", 1, || {
        if name.is_null() {
            return 1;
        }
        // SAFETY: EAL passes a NUL-terminated name.
        match parse_addr(unsafe { CStr::from_ptr(name) }) {
            Some(a) => {
                if !addr.is_null() {
                    // SAFETY: EAL passes a struct rte_pci_addr to fill (or null).
                    unsafe { addr.cast::<RtePciAddr>().write_unaligned(a) };
                }
                0
            }
            None => 1,
        }
    })
}

/// `devargs_parse`: the layered form's `bus=pci,addr=...` gives the devargs its
/// canonical name; 0 (and no name) without `addr`, -ENODEV for a bad list, -EINVAL for a
/// bad address.
unsafe extern "C" fn bus_devargs_parse(da: *mut RteDevargs) -> c_int {
    guard::ffi("pci bus devargs_parse", -libc::EINVAL, || {
        // SAFETY: EAL passes a devargs being parsed (or null).
        if da.is_null() || unsafe { (*da).bus_str }.is_null() {
            return 0;
        }
        // SAFETY: bus_str is NUL-terminated (EAL's copy of the bus part).
        let bus_str = unsafe { CStr::from_ptr((*da).bus_str) };
        // SAFETY: bus_str is NUL-terminated; null keys accept any key.
        let kv = unsafe { kvargs::rte_kvargs_parse(bus_str.as_ptr(), ptr::null()) };
        let shown = bus_str.to_string_lossy();
        let ret = if kv.is_null() {
            log::error(&format!("cannot parse argument list: {shown}"));
            -libc::ENODEV
        } else {
            // SAFETY: kv is a live list; the key is NUL-terminated.
            let addr = unsafe { kvargs::rte_kvargs_get(kv, c"addr".as_ptr()) };
            if addr.is_null() {
                log::debug(&format!("no PCI address specified using 'addr=<id>' in: {shown}"));
                0
            } else {
                // SAFETY: values of a kvargs list are NUL-terminated.
                match parse_addr(unsafe { CStr::from_ptr(addr) }) {
                    Some(a) => {
                        // SAFETY: da is live; its name is an array of RTE_DEV_NAME_MAX_LEN.
                        let name = unsafe { &mut (*da).name };
                        debug_assert_eq!(name.len(), RTE_DEV_NAME_MAX_LEN);
                        fill_array(name, &scan::device_name(a));
                        0
                    }
                    None => {
                        log::error(&format!("PCI address invalid: {shown}"));
                        -libc::EINVAL
                    }
                }
            }
        };
        // SAFETY: kv came from rte_kvargs_parse (null allowed).
        unsafe { kvargs::rte_kvargs_free(kv) };
        if ret != 0 {
            set_rte_errno(-ret);
        }
        ret
    })
}

/// `dma_map`: the driver's own, else EAL's default VFIO container for VFIO devices.
unsafe extern "C" fn bus_dma_map(dev: *mut RteDevice, addr: *mut c_void, iova: u64, len: usize) -> c_int {
    guard::ffi("pci bus dma_map", -1, || {
        // SAFETY: EAL passes a device of this bus (or null).
        unsafe { dma(dev, addr, iova, len, true) }
    })
}

/// `dma_unmap`: as [`bus_dma_map`].
unsafe extern "C" fn bus_dma_unmap(dev: *mut RteDevice, addr: *mut c_void, iova: u64, len: usize) -> c_int {
    guard::ffi("pci bus dma_unmap", -1, || {
        // SAFETY: as bus_dma_map.
        unsafe { dma(dev, addr, iova, len, false) }
    })
}

/// # Safety
/// `dev` is null or a device of this bus.
unsafe fn dma(dev: *mut RteDevice, addr: *mut c_void, iova: u64, len: usize, map: bool) -> c_int {
    let p = to_pci(dev);
    // SAFETY: per the contract.
    if p.is_null() || unsafe { (*p).driver }.is_null() {
        set_rte_errno(libc::EINVAL);
        return -1;
    }
    // SAFETY: p and its driver are live.
    unsafe {
        let dr = (*p).driver;
        let own = if map { (*dr).dma_map } else { (*dr).dma_unmap };
        if let Some(f) = own {
            return f(p, addr, iova, len);
        }
        if (*p).kdrv == RTE_PCI_KDRV_VFIO {
            let (vaddr, len) = (addr as u64, len as u64);
            let fd = eal::RTE_VFIO_DEFAULT_CONTAINER_FD;
            return if map {
                eal::rte_vfio_container_dma_map(fd, vaddr, iova, len)
            } else {
                eal::rte_vfio_container_dma_unmap(fd, vaddr, iova, len)
            };
        }
    }
    set_rte_errno(libc::ENOTSUP);
    -1
}

/// `pci_device_iommu_support_va` on x86: VA unless an Intel IOMMU's capability says
/// otherwise; sets EAL's DMA mask from its address width.
fn iommu_support_va(addr: RtePciAddr) -> bool {
    let path = sysfs_root()
        .devices_dir()
        .join(scan::device_name(addr))
        .join("iommu/intel-iommu/cap");
    match std::fs::read_to_string(&path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
        Err(e) => {
            log::error(&format!("cannot read {}: {e}", path.display()));
            false
        }
        Ok(text) => match matching::vtd_mgaw(&text) {
            Some(mgaw) => {
                // SAFETY: plain value argument.
                unsafe { eal::rte_mem_set_dma_mask(mgaw) };
                true
            }
            None => {
                log::error(&format!("cannot parse {}: {:?}", path.display(), text.trim()));
                false
            }
        },
    }
}

/// `get_iommu_class`: the IOVA mode the bus's matching drivers want.
unsafe extern "C" fn bus_get_iommu_class() -> c_int {
    guard::ffi("pci bus get_iommu_class", RTE_IOVA_DC, || {
        let list = snapshot();
        let drivers = drivers::snapshot();
        let mut iommu_va = None;
        let mut wanted = Vec::new();
        for &p in &list {
            // SAFETY: p is live (see bus_probe); registered drivers are live.
            unsafe {
                if iommu_va.is_none() {
                    iommu_va = Some(iommu_support_va((*p).addr));
                }
                let kdrv = (*p).kdrv;
                if kdrv == RTE_PCI_KDRV_UNKNOWN || kdrv == RTE_PCI_KDRV_NONE {
                    continue;
                }
                for dr in &drivers {
                    if matching::table_matches(&id_table(dr.0), &(*p).id) {
                        wanted.push(matching::device_iova_mode(
                            (*dr.0).drv_flags,
                            kdrv,
                            vfio_noiommu(),
                        ));
                    }
                }
            }
        }
        let (mode, warning) = matching::iommu_class(iommu_va, &wanted);
        if let Some(w) = warning {
            log::warn(w);
        }
        mode
    })
}

/// `rte_kvargs_process` handler of `dev_iterate`: 0 when `value` is the device's address.
unsafe extern "C" fn addr_kv_cmp(_key: *const c_char, value: *const c_char, opaque: *mut c_void) -> c_int {
    if value.is_null() || opaque.is_null() {
        return -1;
    }
    // SAFETY: kvargs values are NUL-terminated; opaque is the device's address (below).
    let (value, mine) = unsafe { (CStr::from_ptr(value), *opaque.cast::<RtePciAddr>()) };
    match parse_addr(value) {
        Some(a) if a == mine => 0,
        _ => -1,
    }
}

/// `pci_dev_match`: 0 when every `addr=` of the list names the device (an empty list
/// matches all).
unsafe extern "C" fn dev_match(dev: *const RteDevice, kvlist: *const c_void) -> c_int {
    if kvlist.is_null() {
        return 0;
    }
    let p = to_pci(dev);
    // SAFETY: find_device passes its devices; the address is copied out.
    let mut addr = unsafe { (*p).addr };
    // SAFETY: kvlist is the list bus_dev_iterate parsed; the handler reads `addr` only.
    let r = unsafe {
        kvargs::rte_kvargs_process(
            kvlist.cast(),
            c"addr".as_ptr(),
            addr_kv_cmp,
            (&raw mut addr).cast(),
        )
    };
    c_int::from(r != 0)
}

/// `dev_iterate`: the next device (after `start`) matching the `addr=` list `s`.
unsafe extern "C" fn bus_dev_iterate(
    start: *const c_void,
    s: *const c_char,
    _it: *const c_void,
) -> *mut c_void {
    guard::ffi("pci bus dev_iterate", ptr::null_mut(), || {
        let keys: [*const c_char; 2] = [c"addr".as_ptr(), ptr::null()];
        let mut kv = ptr::null_mut();
        if !s.is_null() {
            // SAFETY: s is NUL-terminated; keys is a NULL-terminated array of C strings.
            kv = unsafe { kvargs::rte_kvargs_parse(s, keys.as_ptr()) };
            if kv.is_null() {
                log::error("cannot parse argument list");
                set_rte_errno(libc::EINVAL);
                return ptr::null_mut();
            }
        }
        // SAFETY: start is null or a device this bus returned; dev_match reads kv.
        let dev = unsafe { bus_find_device(start.cast(), Some(dev_match), kv.cast_const().cast()) };
        // SAFETY: kv came from rte_kvargs_parse (null allowed).
        unsafe { kvargs::rte_kvargs_free(kv) };
        dev.cast()
    })
}

/// The removal of a device: for VFIO, the registry notes it (scans stop reading its
/// lock-taking state) and EAL's `RTE_DEV_EVENT_REMOVE` callbacks run; for UIO the registry
/// notes it and its BARs are remapped onto anonymous memory (22.11's
/// `pci_uio_remap_resource`: no event, as 22.11), so the driver's accesses stop faulting.
///
/// # Safety
/// `p` is null or a device of the list. With `in_signal`, nothing that allocates or locks
/// runs besides EAL's callbacks (the stock bus runs those from its SIGBUS handler too).
unsafe fn hot_unplug(p: *mut RtePciDevice, in_signal: bool) -> c_int {
    if p.is_null() {
        return -1;
    }
    // SAFETY: per the contract.
    let kdrv = unsafe { (*p).kdrv };
    match kdrv {
        k if k == RTE_PCI_KDRV_VFIO => {
            if !in_signal
                // SAFETY: p is live.
                && let Some(a) = scan::to_pcibus(unsafe { (*p).addr })
            {
                scan::registry().mark(a, Reason::RemovalRequested);
            }
            // SAFETY: the device's name is a NUL-terminated array in place.
            unsafe { eal::rte_dev_event_callback_process((*p).name.as_ptr(), RTE_DEV_EVENT_REMOVE) };
            0
        }
        k if k == RTE_PCI_KDRV_IGB_UIO || k == RTE_PCI_KDRV_UIO_GENERIC || k == RTE_PCI_KDRV_NIC_UIO => {
            if !in_signal
                // SAFETY: p is live.
                && let Some(a) = scan::to_pcibus(unsafe { (*p).addr })
            {
                scan::registry().mark(a, Reason::RemovalRequested);
            }
            // SAFETY: p is live; its mapped BARs are uio_pci's (nothing else maps a UIO
            // device). Async-signal-safe.
            let ret = unsafe { crate::uio_pci::remap_for_unplug(p) };
            if !in_signal {
                if ret == 0 {
                    log::info("hot-unplug of a UIO device: its BARs were remapped onto anonymous memory");
                } else {
                    log::error("hot-unplug of a UIO device: cannot remap its BARs");
                }
            }
            ret
        }
        _ => {
            if !in_signal {
                log::debug("hot-unplug: not managed by a supported kernel driver, skipped");
            }
            -1
        }
    }
}

/// Serialises the VFIO request notifier's handling (22.11's `failure_handle_lock`).
static REQUEST_LOCK: Mutex<()> = Mutex::new(());

/// The VFIO request notifier fired for `dev` (the kernel wants the device back): the
/// hot-unplug handler, as 22.11's `pci_vfio_req_handler`; -1 with a log line when the
/// device is no longer on the bus.
///
/// # Safety
/// `dev` is null or the `device` field of a live `rte_pci_device`.
pub(crate) unsafe fn vfio_request(dev: *mut RteDevice) -> c_int {
    let _serial = REQUEST_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let p = to_pci(dev);
    if p.is_null() || !devices().contains(&DevPtr(p)) {
        log::error("VFIO request for a device that is not on the pci bus");
        return -1;
    }
    // SAFETY: p is on the list, hence live.
    unsafe { hot_unplug(p, false) }
}

/// `hot_unplug_handler`.
unsafe extern "C" fn bus_hot_unplug_handler(dev: *mut RteDevice) -> c_int {
    guard::ffi("pci bus hot_unplug_handler", -1, || {
        // SAFETY: EAL passes a device of this bus.
        unsafe { hot_unplug(to_pci(dev), false) }
    })
}

/// `sigbus_handler`, called from EAL's SIGBUS handler: 1 when the address is in no
/// device's mapped BAR (not this bus's fault), 0 when the device's removal was signalled,
/// -1 when that failed. Only tries the list's lock (the interrupted thread may hold it)
/// and allocates nothing.
unsafe extern "C" fn bus_sigbus_handler(failure_addr: *const c_void) -> c_int {
    guard::ffi("pci bus sigbus_handler", -1, || {
        let Ok(list) = DEVICES.try_lock() else {
            return 1;
        };
        let at = failure_addr as u64;
        let hit = list.iter().copied().find(|d| {
            // SAFETY: devices of the list are live under its lock.
            let res = unsafe { &(*d.0).mem_resource };
            res.iter().any(|r| {
                let start = r.addr as u64;
                !r.addr.is_null() && at >= start && at - start < r.len
            })
        });
        drop(list);
        match hit {
            None => 1,
            Some(d) => {
                // SAFETY: the device was on the list.
                if unsafe { hot_unplug(d.0, true) } == 0 {
                    0
                } else {
                    -1
                }
            }
        }
    })
}

/// `cleanup` (`rte_eal_cleanup`): removes every device from its driver, releases it from
/// VFIO or UIO and frees it; -1 when a driver's remove failed.
unsafe extern "C" fn bus_cleanup() -> c_int {
    guard::ffi("pci bus cleanup", -1, || {
        let taken: Vec<DevPtr> = std::mem::take(&mut *devices());
        let mut error = 0;
        for d in taken {
            let p = d.0;
            // SAFETY: p is off the list now and live; its driver is live while registered.
            unsafe {
                let dr = (*p).driver;
                if !dr.is_null()
                    && let Some(remove) = (*dr).remove
                {
                    if remove(p) < 0 {
                        error = -1;
                    }
                    (*p).driver = ptr::null_mut();
                    (*p).device.driver = ptr::null();
                }
                // Unlike the stock bus (which leaves the mapping to the process's exit), a
                // device held through VFIO is released here: its request notifier's
                // callback must not outlive the device struct freed below. A device held
                // through UIO is unmapped too (its fds closed, its claim dropped).
                let name = scan::device_name((*p).addr);
                if ((*p).kdrv == RTE_PCI_KDRV_VFIO && crate::vfio_pci::is_held(&name))
                    || crate::uio_pci::is_held(&name)
                {
                    unmap_device(p);
                }
                free_intr_handles(p);
                free_device(p);
            }
        }
        error
    })
}

/// The text of `rte_pci_dump` for one device.
///
/// # Safety
/// `p` is a device of the list ([`snapshot`]), not freed during the call.
pub unsafe fn dump_text(p: *const RtePciDevice) -> String {
    // SAFETY: per the contract.
    let (addr, id, res) = unsafe { ((*p).addr, (*p).id, &(*p).mem_resource) };
    let mut s = format!(
        "{} - vendor:{:x} device:{:x}\n",
        scan::device_name(addr),
        id.vendor_id,
        id.device_id
    );
    for r in res {
        s.push_str(&format!("   {:016x} {:016x}\n", r.phys_addr, r.len));
    }
    s
}

const _: () = assert!(PCI_PRI_STR_SIZE < RTE_DEV_NAME_MAX_LEN);

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &CStr) -> Option<String> {
        let mut a = RtePciAddr::default();
        // SAFETY: s is NUL-terminated; a is a valid out-parameter.
        (unsafe { bus_parse(s.as_ptr(), (&raw mut a).cast()) } == 0).then(|| scan::device_name(a))
    }

    #[test]
    fn parse_accepts_what_dpdk_accepts() {
        assert_eq!(parse(c"1:2.3").as_deref(), Some("0000:01:02.3"));
        assert_eq!(parse(c"0000:00:04.0").as_deref(), Some("0000:00:04.0"));
        assert_eq!(parse(c"net_ring0"), None);
        assert_eq!(parse(c""), None);
        // SAFETY: a null out-parameter is allowed.
        assert_eq!(unsafe { bus_parse(c"00:04.0".as_ptr(), ptr::null_mut()) }, 0);
    }

    fn devargs_with(bus_str: &CStr) -> RteDevargs {
        // SAFETY: an all-zero devargs is valid (null pointers, empty name).
        let mut da: RteDevargs = unsafe { core::mem::zeroed() };
        da.bus_str = bus_str.as_ptr();
        da
    }

    #[test]
    fn devargs_parse_names_the_device_from_addr() {
        let mut da = devargs_with(c"bus=pci,addr=1:2.3");
        // SAFETY: da is live.
        assert_eq!(unsafe { bus_devargs_parse(&mut da) }, 0);
        assert_eq!(array_cstr(&da.name), Some(c"0000:01:02.3"));
        let mut da = devargs_with(c"bus=pci");
        // SAFETY: as above.
        assert_eq!(unsafe { bus_devargs_parse(&mut da) }, 0);
        assert_eq!(array_cstr(&da.name), Some(c""));
        let mut da = devargs_with(c"bus=pci,addr=zz");
        // SAFETY: as above.
        assert_eq!(unsafe { bus_devargs_parse(&mut da) }, -libc::EINVAL);
        // SAFETY: null is allowed.
        assert_eq!(unsafe { bus_devargs_parse(ptr::null_mut()) }, 0);
    }

    #[test]
    fn the_bus_has_every_operation_and_its_name() {
        // SAFETY: the static is only read here.
        let b = unsafe { &*bus() };
        // SAFETY: the name is a C literal.
        assert_eq!(unsafe { CStr::from_ptr(b.name) }, c"pci");
        assert!(b.scan.is_some() && b.probe.is_some() && b.find_device.is_some());
        assert!(b.plug.is_some() && b.unplug.is_some() && b.parse.is_some());
        assert!(b.devargs_parse.is_some() && b.dma_map.is_some() && b.dma_unmap.is_some());
        assert!(b.get_iommu_class.is_some() && b.dev_iterate.is_some());
        assert!(b.hot_unplug_handler.is_some() && b.sigbus_handler.is_some() && b.cleanup.is_some());
    }

    #[test]
    fn fill_array_truncates_and_terminates() {
        let mut a = [b'x' as c_char; 6];
        fill_array(&mut a, "0000:00:04.0");
        assert_eq!(array_cstr(&a), Some(c"0000:"));
        fill_array(&mut a, "ab");
        assert_eq!(array_cstr(&a), Some(c"ab"));
    }

    /// The hot-unplug of a UIO device (as from the SIGBUS hook) remaps its mapped BARs onto
    /// anonymous memory at the same address and returns 0 (it returned -1 before).
    #[test]
    fn uio_hot_unplug_remaps_mapped_bars() {
        use crate::uio_pci::sys::{Place, UioBar, mmio_read, open_rw};
        let path = std::env::temp_dir().join(format!("pcibus-busops-uio-{}", std::process::id()));
        std::fs::write(&path, [0x5au8; 4096]).unwrap();
        let bar = UioBar::map(&open_rw(&path).unwrap(), 4096, Place::Anywhere).unwrap();
        std::fs::remove_file(&path).unwrap();
        // SAFETY: an all-zero rte_pci_device is valid (null pointers, zero numbers).
        let mut dev: RtePciDevice = unsafe { core::mem::zeroed() };
        dev.kdrv = RTE_PCI_KDRV_UIO_GENERIC;
        dev.mem_resource[2].addr = bar.addr();
        dev.mem_resource[2].len = 4096;
        let mut b = 0u8;
        // SAFETY: the BAR is mapped; b is one byte.
        unsafe { mmio_read(bar.addr().cast::<u8>().add(7), &mut b, 1) };
        assert_eq!(b, 0x5a);
        // SAFETY: dev is live; its BAR is a UioBar.
        assert_eq!(unsafe { hot_unplug(&mut dev, true) }, 0);
        // SAFETY: as above (anonymous memory now).
        unsafe { mmio_read(bar.addr().cast::<u8>().add(7), &mut b, 1) };
        assert_eq!(b, 0, "anonymous memory at the same address");
        drop(bar);
    }
}
