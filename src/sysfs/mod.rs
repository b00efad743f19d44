//! Reading PCI devices from sysfs (`/sys/bus/pci/devices/*`).
//!
//! The layers, bottom up: [`parse`] holds the pure parsers of attribute contents (bytes in,
//! typed value or [`ParseError`](crate::ParseError) out, no I/O, no panic on any input, and
//! `format_*` helpers that write attribute contents the way the kernel does, for fixtures);
//! `dir` reads attributes relative to an open device directory; [`scan`] walks
//! `bus/pci/devices` into [`DeviceRecord`](crate::DeviceRecord)s; [`details`] adds what
//! `pcibus show` prints; [`bind`] moves a device between kernel drivers; [`snapshot`]
//! captures a tree as a fixture.
//!
//! "Takes no device lock" is the property that matters here: an attribute whose kernel
//! `show()` takes no device lock answers even while a removal is pending. The fast path
//! reads only such attributes; the others go through the
//! [`BlockingPool`](crate::removal::pool::BlockingPool).

pub mod bind;
pub mod details;
pub(crate) mod dir;
mod fast;
pub mod parse;
pub mod scan;
pub mod snapshot;
