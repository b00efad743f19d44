//! Helpers the test files share (each includes this module with `mod common;` and uses
//! what it needs): the NVMe emulator's, and the bus tests' fake sysfs tree.
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

/// [`up`] with MSI-X vectors routed to eventfds (`Options::interrupts`), so queues can sleep.
pub fn up_with_interrupts(e: &EmulatedNvme) -> Controller<EmulatedNvme> {
    Controller::init(
        e.clone(),
        &Options {
            interrupts: true,
            ..quick()
        },
    )
    .unwrap()
}

/// `len` bytes of a pattern that differs with `seed`.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// QEMU's q35 tree with an SR-IOV NVMe (`fixtures/qemu-q35-sriov-nvme.pcifix`): the PF at
/// 01:00.0, its VFs at 01:00.1 and 01:00.2, an AHCI controller at 00:1f.2.
pub fn qemu() -> pcibus::testing::FakeSysfs {
    pcibus::testing::FakeSysfs::from_fixture_file(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fixtures")
            .join("qemu-q35-sriov-nvme.pcifix"),
    )
    .unwrap()
}

/// A PCI address from its text.
pub fn addr(s: &str) -> pcibus::PciAddress {
    s.parse().unwrap()
}

/// The device map of a fake tree, without claims.
pub fn map(fake: &pcibus::testing::FakeSysfs) -> pcibus::bus::map::DeviceMap {
    let root = pcibus::SysfsRoot::new(fake.root());
    pcibus::bus::map::DeviceMap::new(pcibus::Scanner::new(root).no_claims()).unwrap()
}

/// A selection that admits these addresses (`-a` each).
pub fn allow(addresses: &[&str]) -> pcibus::bus::devargs::Selection {
    pcibus::bus::devargs::Selection::from_args(addresses.iter().map(|a| ("-a", *a))).unwrap()
}

/// Replaces the device at `address` with a copy of itself, as a device swapped while the
/// uevents were lost: a new directory with the same contents, so only its incarnation
/// tells the new device from the old.
pub fn swap_unseen(fake: &pcibus::testing::FakeSysfs, address: &str) {
    let dir = fake.root().join(fake.device_dir(address).unwrap());
    let away = fake.root().join("swapped-out");
    std::fs::rename(&dir, &away).unwrap();
    let status = std::process::Command::new("cp")
        .arg("-a")
        .arg(&away)
        .arg(&dir)
        .status()
        .unwrap();
    assert!(status.success());
}
