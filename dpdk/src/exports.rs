//! The 15 functions DPDK 22.11's librte_bus_pci.so.23 exports, with the C signatures of
//! `rte_bus_pci.h` / `bus_pci_driver.h`.
//!
//! Symbol versioning: rustc links a cdylib with a version script of its own (an anonymous
//! version node listing every `#[no_mangle]` function); GNU ld refuses a second script with
//! named nodes next to it, and lld lets the anonymous one win. So the functions here are
//! ordinary (mangled, unexported) Rust functions, and each exported name is an alias made
//! in `global_asm!` (`export!`): rustc does not list those, and `abi/version.map` gives
//! them their nodes (DPDK_23, EXPERIMENTAL, INTERNAL). This needs lld, Rust's default
//! linker on x86_64-unknown-linux-gnu since 1.90 (see dpdk/README.md).
//!
//! Every function takes raw pointers from C: this is the crate's unsafe boundary. Each
//! turns them into safe values (checking for null) and calls the safe modules.

use core::ffi::{c_char, c_int, c_void};

use libc::{FILE, off_t};

use crate::busops;
use crate::config;
use crate::drivers::{self, DriverPtr};
use crate::ffi::types::measured::{RTE_PCI_KDRV_IGB_UIO, RTE_PCI_KDRV_UIO_GENERIC, RTE_PCI_KDRV_VFIO};
use crate::ffi::types::{RtePciDevice, RtePciDriver, RtePciIoport};
use crate::guard;
use crate::log;
use crate::uio_pci;
use crate::vfio_pci;

/// Exports `$f` under the C name `$name` (an alias symbol; its version comes from
/// abi/version.map).
macro_rules! export {
    ($name:literal => $f:path) => {
        core::arch::global_asm!(
            concat!(".globl ", $name),
            concat!(".type ", $name, ", @function"),
            concat!(".set ", $name, ", {f}"),
            f = sym $f,
        );
    };
}

export!("rte_pci_dump" => pci_dump);
export!("rte_pci_find_ext_capability" => pci_find_ext_capability);
export!("rte_pci_get_sysfs_path" => pci_get_sysfs_path);
export!("rte_pci_ioport_map" => pci_ioport_map);
export!("rte_pci_ioport_read" => pci_ioport_read);
export!("rte_pci_ioport_unmap" => pci_ioport_unmap);
export!("rte_pci_ioport_write" => pci_ioport_write);
export!("rte_pci_map_device" => pci_map_device);
export!("rte_pci_pasid_set_state" => pci_pasid_set_state);
export!("rte_pci_read_config" => pci_read_config);
export!("rte_pci_register" => pci_register);
export!("rte_pci_set_bus_master" => pci_set_bus_master);
export!("rte_pci_unmap_device" => pci_unmap_device);
export!("rte_pci_unregister" => pci_unregister);
export!("rte_pci_write_config" => pci_write_config);

/// The device's name (`0000:00:04.0`) from `rte_pci_device.name`, or `None` for a null
/// pointer or a name that is not NUL-terminated UTF-8.
///
/// # Safety
/// `dev` is null or points to a live `struct rte_pci_device`.
unsafe fn device_name(dev: *const RtePciDevice) -> Option<String> {
    if dev.is_null() {
        return None;
    }
    // SAFETY: dev is non-null and, per the caller, points to a live rte_pci_device; the name
    // array is read in place, without creating a reference to the whole struct.
    let name = unsafe { &(*dev).name };
    let bytes: Vec<u8> = name.iter().take_while(|&&c| c != 0).map(|&c| c as u8).collect();
    if bytes.len() == name.len() {
        return None; // no NUL inside the array
    }
    String::from_utf8(bytes).ok()
}

/// `void rte_pci_dump(FILE *f)`: each device of the bus, as the stock bus prints it (the
/// address, vendor and device ids, then each BAR's address and length).
unsafe extern "C" fn pci_dump(f: *mut FILE) {
    guard::ffi("rte_pci_dump", (), || {
        if f.is_null() {
            return;
        }
        for p in busops::snapshot() {
            // SAFETY: p is a device of the list; C does not unplug devices while dumping them.
            let Ok(text) = std::ffi::CString::new(unsafe { busops::dump_text(p) }) else {
                continue;
            };
            // SAFETY: f is the caller's open stream; text is NUL-terminated.
            unsafe { libc::fputs(text.as_ptr(), f) };
        }
    })
}

/// `off_t rte_pci_find_ext_capability(struct rte_pci_device *dev, uint32_t cap)`: the
/// capability's offset, 0 when absent, -1 on error.
unsafe extern "C" fn pci_find_ext_capability(dev: *mut RtePciDevice, cap: u32) -> off_t {
    guard::ffi("rte_pci_find_ext_capability", -1, || {
        // SAFETY: C passes a live device or null.
        let Some(name) = (unsafe { device_name(dev) }) else {
            log::error("rte_pci_find_ext_capability: no device");
            return -1;
        };
        let Ok(cap) = u16::try_from(cap) else { return 0 };
        match config::find_ext_capability(&name, cap) {
            Ok(Some(pos)) => pos as off_t,
            Ok(None) => 0,
            Err(e) => {
                log::error(&format!("{name}: reading extended capabilities: {e}"));
                -1
            }
        }
    })
}

/// `const char *rte_pci_get_sysfs_path(void)`: `$SYSFS_PCI_DEVICES` or
/// `/sys/bus/pci/devices`.
unsafe extern "C" fn pci_get_sysfs_path() -> *const c_char {
    // SAFETY: the name is NUL-terminated; getenv's result stays valid until the variable is
    // changed, the same contract DPDK's own function gives its callers.
    let env = unsafe { libc::getenv(c"SYSFS_PCI_DEVICES".as_ptr()) };
    if env.is_null() {
        c"/sys/bus/pci/devices".as_ptr()
    } else {
        env
    }
}

/// `int rte_pci_ioport_map(struct rte_pci_device *dev, int bar, struct rte_pci_ioport *p)`:
/// for a device mapped through VFIO, `p->base` is BAR `bar`'s region offset in the device
/// fd (reads and writes pread/pwrite there, as 22.11 does); for a UIO device the port
/// number of an I/O BAR or the mapping of a memory BAR ([`uio_pci::ioport_map`]); 0, or -1
/// with a log line (a bad BAR, a device not mapped, another driver).
unsafe extern "C" fn pci_ioport_map(dev: *mut RtePciDevice, bar: c_int, p: *mut RtePciIoport) -> c_int {
    guard::ffi("rte_pci_ioport_map", -1, || {
        // SAFETY: C passes a live device and ioport (or null).
        unsafe { ioport_map(dev, bar, p) }
    })
}

/// # Safety
/// `dev` and `p` are null or live.
unsafe fn ioport_map(dev: *mut RtePciDevice, bar: c_int, p: *mut RtePciIoport) -> c_int {
    // SAFETY: per the contract.
    let Some(name) = (unsafe { device_name(dev) }) else {
        log::error("rte_pci_ioport_map: no device");
        return -1;
    };
    if p.is_null() {
        log::error(&format!("rte_pci_ioport_map({name}, bar {bar}): null ioport"));
        return -1;
    }
    // SAFETY: dev is live.
    let kdrv = unsafe { (*dev).kdrv };
    let uio = kdrv == RTE_PCI_KDRV_IGB_UIO || kdrv == RTE_PCI_KDRV_UIO_GENERIC;
    if kdrv != RTE_PCI_KDRV_VFIO && !uio {
        log::error(&format!(
            "rte_pci_ioport_map({name}, bar {bar}): only devices bound to vfio-pci, uio_pci_generic or igb_uio are supported (kdrv {kdrv})"
        ));
        return -1;
    }
    let Some(index) = usize::try_from(bar).ok().filter(|&b| b < vfio_pci::plan::BARS) else {
        log::error(&format!("rte_pci_ioport_map({name}): invalid bar ({bar})"));
        return -1;
    };
    if uio {
        // SAFETY: dev is live.
        return match unsafe { uio_pci::ioport_map(dev, &name, index) } {
            Ok(base) => {
                // SAFETY: p is the caller's live ioport.
                unsafe {
                    (*p).dev = dev;
                    (*p).base = base;
                    (*p).len = 0;
                }
                0
            }
            Err(why) => {
                log::error(&format!("rte_pci_ioport_map({name}, bar {bar}): {why}"));
                -1
            }
        };
    }
    match vfio_pci::ioport_base(&name, index) {
        Some(base) => {
            // SAFETY: p is the caller's live ioport.
            unsafe {
                (*p).dev = dev;
                (*p).base = base;
                (*p).len = 0;
            }
            0
        }
        None => {
            log::error(&format!(
                "rte_pci_ioport_map({name}, bar {bar}): the device is not mapped through VFIO by this process \
                 (rte_pci_map_device first) or has no such BAR"
            ));
            -1
        }
    }
}

/// The device and fd position of an ioport access; logs and gives `None` when unusable.
///
/// # Safety
/// `p` is null or a live ioport whose `dev` is null or live.
unsafe fn ioport_target(call: &str, p: *const RtePciIoport, offset: off_t) -> Option<(String, u64, u64)> {
    if p.is_null() {
        log::error(&format!("{call}: null ioport"));
        return None;
    }
    // SAFETY: per the contract.
    let (dev, base) = unsafe { ((*p).dev, (*p).base) };
    // SAFETY: per the contract.
    let Some(name) = (unsafe { device_name(dev) }) else {
        log::error(&format!("{call}: ioport without a device"));
        return None;
    };
    let Ok(offset) = u64::try_from(offset) else {
        log::error(&format!("{call}({name}): negative offset {offset}"));
        return None;
    };
    Some((name, base, offset))
}

/// `void rte_pci_ioport_read(struct rte_pci_ioport *p, void *data, size_t len, off_t
/// offset)`: pread of the BAR's VFIO region; on failure a log line and `data` untouched
/// (as the stock bus).
unsafe extern "C" fn pci_ioport_read(p: *mut RtePciIoport, data: *mut c_void, len: usize, offset: off_t) {
    guard::ffi("rte_pci_ioport_read", (), || {
        // SAFETY: C passes a live ioport (or null).
        let Some((name, base, offset)) = (unsafe { ioport_target("rte_pci_ioport_read", p, offset) }) else {
            return;
        };
        if data.is_null() {
            return;
        }
        // SAFETY: the caller passes len writable bytes at data.
        if let Some(r) = unsafe { uio_pci::ioport_access(&name, base, offset, data.cast(), len, false) } {
            if let Err(why) = r {
                log::error(&format!("rte_pci_ioport_read({name}): {why}"));
            }
            return;
        }
        // SAFETY: the caller passes len writable bytes at data.
        let r = vfio_pci::ioport_access(&name, base, offset, |fd, pos| unsafe {
            vfio_pci::sys::read_raw(fd, data.cast(), len, pos)
        });
        ioport_result("rte_pci_ioport_read", &name, base, offset, r);
    });
}

/// `void rte_pci_ioport_write(struct rte_pci_ioport *p, const void *data, size_t len,
/// off_t offset)`: pwrite of the BAR's VFIO region; on failure a log line.
unsafe extern "C" fn pci_ioport_write(p: *mut RtePciIoport, data: *const c_void, len: usize, offset: off_t) {
    guard::ffi("rte_pci_ioport_write", (), || {
        // SAFETY: C passes a live ioport (or null).
        let Some((name, base, offset)) = (unsafe { ioport_target("rte_pci_ioport_write", p, offset) }) else {
            return;
        };
        if data.is_null() {
            return;
        }
        // SAFETY: the caller passes len readable bytes at data (a write only reads it).
        let uio = unsafe { uio_pci::ioport_access(&name, base, offset, data.cast_mut().cast(), len, true) };
        if let Some(r) = uio {
            if let Err(why) = r {
                log::error(&format!("rte_pci_ioport_write({name}): {why}"));
            }
            return;
        }
        // SAFETY: the caller passes len readable bytes at data.
        let r = vfio_pci::ioport_access(&name, base, offset, |fd, pos| unsafe {
            vfio_pci::sys::write_raw(fd, data.cast(), len, pos)
        });
        ioport_result("rte_pci_ioport_write", &name, base, offset, r);
    });
}

fn ioport_result(call: &str, name: &str, base: u64, offset: u64, r: Option<Option<std::io::Result<usize>>>) {
    let why = match r {
        Some(Some(Ok(n))) if n > 0 => return,
        Some(Some(Ok(_))) => "nothing transferred".to_owned(),
        Some(Some(Err(e))) => e.to_string(),
        Some(None) => "offset overflows".to_owned(),
        None => "the device is no longer mapped".to_owned(),
    };
    log::error(&format!(
        "{call}({name}): PCI BAR region at {base:#x}, offset {offset:#x}: {why}"
    ));
}

/// `int rte_pci_ioport_unmap(struct rte_pci_ioport *p)`: nothing was mapped for a VFIO
/// port (accesses are preads), so 0. (22.11 returns -1 here for VFIO; virtio, its only
/// user, ignores the value.) A UIO port is forgotten (later accesses are refused); 0, as
/// 22.11 on x86.
unsafe extern "C" fn pci_ioport_unmap(p: *mut RtePciIoport) -> c_int {
    guard::ffi("rte_pci_ioport_unmap", -1, || {
        if p.is_null() {
            return -1;
        }
        // SAFETY: C passes a live ioport whose dev is null or live.
        if let Some(name) = unsafe { device_name((*p).dev) } {
            // SAFETY: as above.
            uio_pci::ioport_unmap(&name, unsafe { (*p).base });
        }
        0
    })
}

/// `int rte_pci_map_device(struct rte_pci_device *dev)`.
unsafe extern "C" fn pci_map_device(dev: *mut RtePciDevice) -> c_int {
    // SAFETY: C passes a live device or null.
    guard::ffi("rte_pci_map_device", -1, || unsafe { map_device(dev) })
}

/// The stock bus's dispatch on `kdrv`: VFIO through EAL's container ([`vfio_pci::map`]);
/// uio_pci_generic and igb_uio through their sysfs files ([`uio_pci::map`]); 1 ("skipped":
/// the probe moves on to the next driver) for a device bound to no driver DPDK maps
/// through.
///
/// # Safety
/// `dev` is null or a live device.
pub(crate) unsafe fn map_device(dev: *mut RtePciDevice) -> c_int {
    if dev.is_null() {
        log::error("rte_pci_map_device: no device");
        return -1;
    }
    // SAFETY: per the contract.
    let (kdrv, name) = unsafe { ((*dev).kdrv, device_name(dev).unwrap_or_default()) };
    if kdrv == RTE_PCI_KDRV_VFIO {
        // SAFETY: per the contract.
        unsafe { vfio_pci::map(dev, &name) }
    } else if kdrv == RTE_PCI_KDRV_IGB_UIO {
        // SAFETY: per the contract.
        unsafe { uio_pci::map(dev, &name, uio_pci::plan::UioDriver::IgbUio) }
    } else if kdrv == RTE_PCI_KDRV_UIO_GENERIC {
        // SAFETY: per the contract.
        unsafe { uio_pci::map(dev, &name, uio_pci::plan::UioDriver::Generic) }
    } else {
        log::debug(&format!(
            "{name}: not managed by a supported kernel driver, skipped"
        ));
        1
    }
}

/// Undoes [`map_device`].
///
/// # Safety
/// `dev` is null or a live device.
pub(crate) unsafe fn unmap_device(dev: *mut RtePciDevice) {
    if dev.is_null() {
        return;
    }
    // SAFETY: per the contract.
    let (kdrv, name) = unsafe { ((*dev).kdrv, device_name(dev).unwrap_or_default()) };
    if kdrv == RTE_PCI_KDRV_VFIO {
        // SAFETY: per the contract.
        unsafe { vfio_pci::unmap(dev, &name) };
    } else if kdrv == RTE_PCI_KDRV_IGB_UIO || kdrv == RTE_PCI_KDRV_UIO_GENERIC {
        // SAFETY: per the contract.
        unsafe { uio_pci::unmap(dev, &name) };
    }
}

/// `int rte_pci_pasid_set_state(const struct rte_pci_device *dev, off_t offset, bool
/// enable)`: writes the PASID Control register (at `offset`, the capability's offset + 6)
/// with Enable set or clear; 0 or -1.
unsafe extern "C" fn pci_pasid_set_state(dev: *const RtePciDevice, offset: off_t, enable: bool) -> c_int {
    guard::ffi("rte_pci_pasid_set_state", -1, || {
        // SAFETY: C passes a live device or null.
        let Some(name) = (unsafe { device_name(dev) }) else {
            return -1;
        };
        let Ok(offset) = u64::try_from(offset) else {
            return -1;
        };
        match config::write(&name, &u16::from(enable).to_le_bytes(), offset) {
            Ok(2) => 0,
            Ok(_) => -1,
            Err(e) => {
                log::error(&format!("{name}: writing PASID control at {offset:#x}: {e}"));
                -1
            }
        }
    })
}

/// `int rte_pci_read_config(const struct rte_pci_device *device, void *buf, size_t len,
/// off_t offset)`: the count read, or -1.
unsafe extern "C" fn pci_read_config(
    dev: *const RtePciDevice,
    buf: *mut c_void,
    len: usize,
    offset: off_t,
) -> c_int {
    guard::ffi("rte_pci_read_config", -1, || {
        // SAFETY: C passes a live device or null.
        let Some(name) = (unsafe { device_name(dev) }) else {
            return -1;
        };
        let (Ok(offset), false) = (u64::try_from(offset), buf.is_null()) else {
            return -1;
        };
        // SAFETY: the caller passes a buffer of len writable bytes (non-null, checked above);
        // nothing else accesses it during the call.
        let buf = unsafe { core::slice::from_raw_parts_mut(buf.cast::<u8>(), len) };
        match config::read(&name, buf, offset) {
            Ok(n) => c_int::try_from(n).unwrap_or(c_int::MAX),
            Err(e) => {
                log::error(&format!(
                    "{name}: reading {len} bytes of config space at {offset:#x}: {e}"
                ));
                -1
            }
        }
    })
}

/// `int rte_pci_write_config(const struct rte_pci_device *device, const void *buf, size_t
/// len, off_t offset)`: the count written, or -1.
unsafe extern "C" fn pci_write_config(
    dev: *const RtePciDevice,
    buf: *const c_void,
    len: usize,
    offset: off_t,
) -> c_int {
    guard::ffi("rte_pci_write_config", -1, || {
        // SAFETY: C passes a live device or null.
        let Some(name) = (unsafe { device_name(dev) }) else {
            return -1;
        };
        let (Ok(offset), false) = (u64::try_from(offset), buf.is_null()) else {
            return -1;
        };
        // SAFETY: the caller passes len readable bytes (non-null, checked above).
        let buf = unsafe { core::slice::from_raw_parts(buf.cast::<u8>(), len) };
        match config::write(&name, buf, offset) {
            Ok(n) => c_int::try_from(n).unwrap_or(c_int::MAX),
            Err(e) => {
                log::error(&format!(
                    "{name}: writing {len} bytes of config space at {offset:#x}: {e}"
                ));
                -1
            }
        }
    })
}

/// `void rte_pci_register(struct rte_pci_driver *driver)`: called by each PMD's
/// constructor (`RTE_PMD_REGISTER_PCI`), possibly before `main`.
unsafe extern "C" fn pci_register(driver: *mut RtePciDriver) {
    guard::ffi("rte_pci_register", (), || {
        if driver.is_null() {
            log::error("rte_pci_register: null driver");
            return;
        }
        drivers::register(DriverPtr(driver));
    })
}

/// `void rte_pci_unregister(struct rte_pci_driver *driver)`.
unsafe extern "C" fn pci_unregister(driver: *mut RtePciDriver) {
    guard::ffi("rte_pci_unregister", (), || {
        if !drivers::unregister(DriverPtr(driver)) {
            log::warn("rte_pci_unregister: driver was not registered");
        }
    })
}

/// `int rte_pci_set_bus_master(struct rte_pci_device *dev, bool enable)`: 0 or -1.
unsafe extern "C" fn pci_set_bus_master(dev: *mut RtePciDevice, enable: bool) -> c_int {
    guard::ffi("rte_pci_set_bus_master", -1, || {
        // SAFETY: C passes a live device or null.
        let Some(name) = (unsafe { device_name(dev) }) else {
            return -1;
        };
        match config::set_bus_master(&name, enable) {
            Ok(()) => 0,
            Err(e) => {
                log::error(&format!("{name}: setting bus master {enable}: {e}"));
                -1
            }
        }
    })
}

/// `void rte_pci_unmap_device(struct rte_pci_device *dev)`.
unsafe extern "C" fn pci_unmap_device(dev: *mut RtePciDevice) {
    // SAFETY: C passes a live device or null.
    guard::ffi("rte_pci_unmap_device", (), || unsafe { unmap_device(dev) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::ffi::CStr;

    #[test]
    fn device_name_stops_at_nul_and_rejects_unterminated() {
        // SAFETY: an all-zero rte_pci_device is valid (null pointers, zero numbers).
        let mut dev: RtePciDevice = unsafe { core::mem::zeroed() };
        for (d, s) in dev.name.iter_mut().zip(b"0000:00:04.0") {
            *d = *s as c_char;
        }
        // SAFETY: dev is a live device.
        assert_eq!(unsafe { device_name(&dev) }.as_deref(), Some("0000:00:04.0"));
        dev.name = [b'x' as c_char; 18];
        // SAFETY: as above.
        assert_eq!(unsafe { device_name(&dev) }, None);
        // SAFETY: null is allowed.
        assert_eq!(unsafe { device_name(core::ptr::null()) }, None);
    }

    fn vfio_device(name: &str) -> RtePciDevice {
        // SAFETY: an all-zero rte_pci_device is valid (null pointers, zero numbers).
        let mut dev: RtePciDevice = unsafe { core::mem::zeroed() };
        for (d, s) in dev.name.iter_mut().zip(name.as_bytes()) {
            *d = *s as c_char;
        }
        dev.kdrv = RTE_PCI_KDRV_VFIO;
        dev
    }

    /// Without EAL's VFIO (no rte_eal_init here) mapping a vfio-pci device fails with -1
    /// and a log line, and nothing is held; unmapping it is harmless.
    #[test]
    fn map_without_eal_vfio_fails_cleanly() {
        let mut dev = vfio_device("0000:00:09.0");
        // SAFETY: dev is a live device.
        assert_eq!(unsafe { pci_map_device(&mut dev) }, -1);
        assert!(!vfio_pci::is_held("0000:00:09.0"));
        assert!(dev.mem_resource.iter().all(|r| r.addr.is_null()));
        // SAFETY: as above; null is allowed too.
        unsafe {
            pci_unmap_device(&mut dev);
            pci_unmap_device(core::ptr::null_mut());
            assert_eq!(pci_map_device(core::ptr::null_mut()), -1);
        }
        // A device bound to no driver DPDK maps through is skipped (1), as the stock bus.
        dev.kdrv = crate::ffi::types::measured::RTE_PCI_KDRV_UNKNOWN;
        // SAFETY: as above.
        assert_eq!(unsafe { pci_map_device(&mut dev) }, 1);
    }

    /// I/O ports of a device not mapped through VFIO, bad BARs and null pointers: -1, data
    /// untouched, no panic.
    #[test]
    fn ioport_error_paths() {
        let mut dev = vfio_device("0000:00:0a.0");
        // SAFETY: an all-zero ioport is valid.
        let mut port: RtePciIoport = unsafe { core::mem::zeroed() };
        // SAFETY: live device and ioport, or null where the call allows it.
        unsafe {
            assert_eq!(pci_ioport_map(&mut dev, 0, &mut port), -1, "not mapped");
            assert_eq!(pci_ioport_map(&mut dev, 6, &mut port), -1, "bad bar");
            assert_eq!(pci_ioport_map(&mut dev, -1, &mut port), -1, "bad bar");
            assert_eq!(pci_ioport_map(&mut dev, 0, core::ptr::null_mut()), -1);
            assert_eq!(pci_ioport_map(core::ptr::null_mut(), 0, &mut port), -1);
            dev.kdrv = RTE_PCI_KDRV_IGB_UIO;
            assert_eq!(pci_ioport_map(&mut dev, 0, &mut port), -1, "UIO");
            port.dev = &mut dev;
            port.base = 4 << 40;
            let mut data = [0x5au8; 4];
            pci_ioport_read(&mut port, data.as_mut_ptr().cast(), 4, 0);
            assert_eq!(data, [0x5a; 4], "read of an unmapped device leaves data alone");
            pci_ioport_write(&mut port, data.as_ptr().cast(), 4, 0);
            pci_ioport_read(&mut port, data.as_mut_ptr().cast(), 4, -1);
            pci_ioport_read(core::ptr::null_mut(), data.as_mut_ptr().cast(), 4, 0);
            assert_eq!(pci_ioport_unmap(&mut port), 0);
            assert_eq!(pci_ioport_unmap(core::ptr::null_mut()), -1);
        }
    }

    /// A device bound to a UIO driver without a uio instance in sysfs (here: no sysfs
    /// directory at all) is skipped with 1, as 22.11's `pci_uio_alloc_resource`; unmapping
    /// it is harmless, and its I/O ports are refused.
    #[test]
    fn uio_device_without_instance_is_skipped() {
        use crate::ffi::eal::{RTE_INTR_INSTANCE_F_PRIVATE, rte_intr_instance_alloc, rte_intr_instance_free};
        for kdrv in [RTE_PCI_KDRV_UIO_GENERIC, RTE_PCI_KDRV_IGB_UIO] {
            let mut dev = vfio_device("0000:fe:1f.6");
            dev.kdrv = kdrv;
            // SAFETY: a private instance, freed below.
            dev.intr_handle = unsafe { rte_intr_instance_alloc(RTE_INTR_INSTANCE_F_PRIVATE) };
            // SAFETY: an all-zero ioport is valid.
            let mut port: RtePciIoport = unsafe { core::mem::zeroed() };
            // SAFETY: dev is a live device.
            unsafe {
                assert_eq!(pci_map_device(&mut dev), 1, "kdrv {kdrv}");
                assert!(!crate::uio_pci::is_held("0000:fe:1f.6"));
                pci_unmap_device(&mut dev);
                assert_eq!(pci_ioport_map(&mut dev, 0, &mut port), -1);
                rte_intr_instance_free(dev.intr_handle);
            }
        }
    }

    #[test]
    fn sysfs_path_is_not_null() {
        // SAFETY: no arguments; the result is a NUL-terminated string.
        let p = unsafe { CStr::from_ptr(pci_get_sysfs_path()) };
        assert!(!p.to_bytes().is_empty());
    }
}
