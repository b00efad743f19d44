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
use crate::log;

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
}

/// `off_t rte_pci_find_ext_capability(struct rte_pci_device *dev, uint32_t cap)`: the
/// capability's offset, 0 when absent, -1 on error.
unsafe extern "C" fn pci_find_ext_capability(dev: *mut RtePciDevice, cap: u32) -> off_t {
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

/// `int rte_pci_ioport_map(struct rte_pci_device *dev, int bar, struct rte_pci_ioport *p)`.
/// TODO(issue 18): not implemented; -1.
unsafe extern "C" fn pci_ioport_map(_dev: *mut RtePciDevice, bar: c_int, _p: *mut RtePciIoport) -> c_int {
    log::error(&format!(
        "rte_pci_ioport_map(bar {bar}): not implemented by pcibus yet"
    ));
    -1
}

/// `void rte_pci_ioport_read(struct rte_pci_ioport *p, void *data, size_t len, off_t
/// offset)`. TODO(issue 18): not implemented; fills `data` with 0xff (what a read of an
/// absent device returns) so callers never see stale memory.
unsafe extern "C" fn pci_ioport_read(_p: *mut RtePciIoport, data: *mut c_void, len: usize, _offset: off_t) {
    log::error("rte_pci_ioport_read: not implemented by pcibus yet");
    if !data.is_null() {
        // SAFETY: the caller passes a buffer of len writable bytes.
        unsafe { core::ptr::write_bytes(data.cast::<u8>(), 0xff, len) };
    }
}

/// `int rte_pci_ioport_unmap(struct rte_pci_ioport *p)`. TODO(issue 18): -1.
unsafe extern "C" fn pci_ioport_unmap(_p: *mut RtePciIoport) -> c_int {
    log::error("rte_pci_ioport_unmap: not implemented by pcibus yet");
    -1
}

/// `void rte_pci_ioport_write(struct rte_pci_ioport *p, const void *data, size_t len,
/// off_t offset)`. TODO(issue 18): not implemented; drops the write.
unsafe extern "C" fn pci_ioport_write(
    _p: *mut RtePciIoport,
    _data: *const c_void,
    _len: usize,
    _offset: off_t,
) {
    log::error("rte_pci_ioport_write: not implemented by pcibus yet");
}

/// `int rte_pci_map_device(struct rte_pci_device *dev)`.
unsafe extern "C" fn pci_map_device(dev: *mut RtePciDevice) -> c_int {
    // SAFETY: C passes a live device or null.
    unsafe { map_device(dev) }
}

/// The stock bus's dispatch on `kdrv`: 1 ("skipped": the probe moves on to the next
/// driver) for a device bound to no driver DPDK maps through. TODO(issue 18): VFIO (BARs
/// through EAL's container, `rte_vfio_setup_device`) and UIO mapping: -1 with a log line.
///
/// # Safety
/// `dev` is null or a live device.
pub(crate) unsafe fn map_device(dev: *mut RtePciDevice) -> c_int {
    if dev.is_null() {
        return -1;
    }
    // SAFETY: per the contract.
    let (kdrv, name) = unsafe { ((*dev).kdrv, device_name(dev).unwrap_or_default()) };
    if kdrv == RTE_PCI_KDRV_VFIO || kdrv == RTE_PCI_KDRV_IGB_UIO || kdrv == RTE_PCI_KDRV_UIO_GENERIC {
        log::error(&format!(
            "rte_pci_map_device({name}): mapping BARs is not implemented by pcibus yet"
        ));
        -1
    } else {
        log::debug(&format!(
            "{name}: not managed by a supported kernel driver, skipped"
        ));
        1
    }
}

/// Undoes [`map_device`]: nothing is mapped yet, so nothing to undo.
///
/// # Safety
/// `dev` is null or a live device.
pub(crate) unsafe fn unmap_device(_dev: *mut RtePciDevice) {}

/// `int rte_pci_pasid_set_state(const struct rte_pci_device *dev, off_t offset, bool
/// enable)`: writes the PASID Control register (at `offset`, the capability's offset + 6)
/// with Enable set or clear; 0 or -1.
unsafe extern "C" fn pci_pasid_set_state(dev: *const RtePciDevice, offset: off_t, enable: bool) -> c_int {
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
}

/// `int rte_pci_read_config(const struct rte_pci_device *device, void *buf, size_t len,
/// off_t offset)`: the count read, or -1.
unsafe extern "C" fn pci_read_config(
    dev: *const RtePciDevice,
    buf: *mut c_void,
    len: usize,
    offset: off_t,
) -> c_int {
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
}

/// `int rte_pci_write_config(const struct rte_pci_device *device, const void *buf, size_t
/// len, off_t offset)`: the count written, or -1.
unsafe extern "C" fn pci_write_config(
    dev: *const RtePciDevice,
    buf: *const c_void,
    len: usize,
    offset: off_t,
) -> c_int {
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
}

/// `void rte_pci_register(struct rte_pci_driver *driver)`: called by each PMD's
/// constructor (`RTE_PMD_REGISTER_PCI`), possibly before `main`.
unsafe extern "C" fn pci_register(driver: *mut RtePciDriver) {
    if driver.is_null() {
        log::error("rte_pci_register: null driver");
        return;
    }
    drivers::register(DriverPtr(driver));
}

/// `void rte_pci_unregister(struct rte_pci_driver *driver)`.
unsafe extern "C" fn pci_unregister(driver: *mut RtePciDriver) {
    if !drivers::unregister(DriverPtr(driver)) {
        log::warn("rte_pci_unregister: driver was not registered");
    }
}

/// `int rte_pci_set_bus_master(struct rte_pci_device *dev, bool enable)`: 0 or -1.
unsafe extern "C" fn pci_set_bus_master(dev: *mut RtePciDevice, enable: bool) -> c_int {
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
}

/// `void rte_pci_unmap_device(struct rte_pci_device *dev)`.
unsafe extern "C" fn pci_unmap_device(dev: *mut RtePciDevice) {
    // SAFETY: C passes a live device or null.
    unsafe { unmap_device(dev) }
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

    #[test]
    fn sysfs_path_is_not_null() {
        // SAFETY: no arguments; the result is a NUL-terminated string.
        let p = unsafe { CStr::from_ptr(pci_get_sysfs_path()) };
        assert!(!p.to_bytes().is_empty());
    }
}
