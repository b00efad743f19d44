//! Reading PCI devices from sysfs (`/sys/bus/pci/devices/*`).
//!
//! [`parse`] holds the pure parsers of attribute contents: bytes in, typed value or
//! [`ParseError`](crate::ParseError) out, with no I/O and no panic on any input. It also has
//! `format_*` helpers that write attribute contents the way the kernel does, for fixtures.

pub mod parse;
