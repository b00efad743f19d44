//! A drop-in `librte_bus_pci.so.23` for DPDK 22.11 (Debian 12) whose PCI bus runs on
//! pcibus: see dpdk/README.md. The unsafe boundaries with C are the exported functions
//! ([`exports`]), the registered bus and its device list ([`busops`]), the mappings
//! ([`vfio_pci`], [`uio_pci`]), the records shared with secondary processes ([`mp`]) and
//! [`log`]; the decisions are in safe modules ([`scan`], [`matching`], [`drivers`],
//! [`config`], and the `plan` modules of the mapping ones). DPDK's struct layouts, checked
//! against DPDK's headers at build time, are in [`ffi::types`].

#![deny(clippy::undocumented_unsafe_blocks, clippy::missing_safety_doc)]

pub mod busops;
pub mod config;
pub mod drivers;
mod exports;
pub mod ffi;
pub mod guard;
pub mod log;
pub mod matching;
pub mod mp;
pub mod scan;
pub mod uio_pci;
pub mod vfio_pci;
