//! The bus (issue 7, in progress): which devices a driver gets and on what terms.
//!
//! [`id`] matches scan records against drivers' id tables; [`devargs`] parses DPDK-style
//! allow and block lists with per-device arguments; [`claim`] makes one process the owner
//! of a device, visibly to every other process; [`map`] keeps the scan's records current
//! from uevents, one device per event.

pub mod claim;
pub mod devargs;
pub mod id;
pub mod map;
