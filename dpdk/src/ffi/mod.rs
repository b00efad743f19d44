//! The C side: DPDK's struct layouts (`types`) and the EAL functions this library calls
//! (`eal`). Everything here is declarations; the unsafe calls live in `crate::exports` and
//! `crate::log`.

pub mod types;

/// Functions of librte_eal.so.23 (all under its `DPDK_23` or `INTERNAL` version nodes).
pub mod eal {
    use core::ffi::{c_char, c_int};

    /// `RTE_LOG_ERR`.
    pub const RTE_LOG_ERR: u32 = 4;
    /// `RTE_LOG_WARNING`.
    pub const RTE_LOG_WARNING: u32 = 5;
    /// `RTE_LOG_INFO`.
    pub const RTE_LOG_INFO: u32 = 7;
    /// `RTE_LOGTYPE_EAL`: the log type DPDK's own PCI bus logs under.
    pub const RTE_LOGTYPE_EAL: u32 = 0;

    unsafe extern "C" {
        /// `int rte_log(uint32_t level, uint32_t logtype, const char *format, ...)`.
        pub fn rte_log(level: u32, logtype: u32, format: *const c_char, ...) -> c_int;
    }
}
