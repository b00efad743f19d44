//! Helpers the NVMe driver's test files share (each includes this module with `mod
//! common;` and uses what it needs).
#![allow(dead_code)]

use std::time::Duration;

use pcibus::nvme::{Controller, Options};
use pcibus::testing::nvme::{EmuConfig, EmulatedNvme};

pub fn emu(config: EmuConfig) -> EmulatedNvme {
    EmulatedNvme::new(config).unwrap()
}

/// Deadlines no test reaches unless something is broken: a loaded machine must not fail
/// a test.
pub fn quick() -> Options {
    Options {
        admin_timeout: Duration::from_secs(30),
        io_timeout: Duration::from_secs(30),
        ..Options::default()
    }
}

/// For tests of the timeout path itself: short enough to wait for, long enough that the
/// emulator answers every command that is not held on purpose.
pub fn short_io_timeout() -> Options {
    Options {
        io_timeout: Duration::from_secs(1),
        ..quick()
    }
}

/// Brought up with [`quick`] deadlines.
pub fn up(e: &EmulatedNvme) -> Controller<EmulatedNvme> {
    Controller::init(e.clone(), &quick()).unwrap()
}

/// `len` bytes of a pattern that differs with `seed`.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}
