//! Log lines through EAL's `rte_log`, where DPDK applications look for them (and where
//! `--log-level` filters them), under the EAL log type as DPDK's own bus does.

use std::ffi::CString;

use crate::ffi::eal;

/// Logs `msg` at `level` (`eal::RTE_LOG_*`), prefixed "PCI (pcibus): ".
pub fn log(level: u32, msg: &str) {
    // Interior NULs cannot pass through printf's %s; show them instead of dropping the line.
    let line =
        CString::new(format!("PCI (pcibus): {msg}\n").replace('\0', "\\0")).expect("NULs were replaced");
    // SAFETY: the format is a NUL-terminated literal with one %s, and its argument is a
    // NUL-terminated string that lives across the call.
    unsafe {
        eal::rte_log(level, eal::RTE_LOGTYPE_EAL, c"%s".as_ptr(), line.as_ptr());
    }
}

/// Logs at `RTE_LOG_ERR`.
pub fn error(msg: &str) {
    log(eal::RTE_LOG_ERR, msg);
}

/// Logs at `RTE_LOG_WARNING`.
pub fn warn(msg: &str) {
    log(eal::RTE_LOG_WARNING, msg);
}

/// Logs at `RTE_LOG_INFO`.
pub fn info(msg: &str) {
    log(eal::RTE_LOG_INFO, msg);
}

/// Logs at `RTE_LOG_DEBUG`.
pub fn debug(msg: &str) {
    log(eal::RTE_LOG_DEBUG, msg);
}
