//! A drop-in `librte_bus_pci.so.23` for DPDK 22.11 (Debian 12) whose PCI bus runs on
//! pcibus: see dpdk/README.md. The exported C ABI is in [`exports`] (its only unsafe
//! boundary with C besides [`log`]); DPDK's struct layouts, checked against DPDK's headers
//! at build time, are in [`ffi::types`].

pub mod config;
pub mod drivers;
mod exports;
pub mod ffi;
pub mod log;
