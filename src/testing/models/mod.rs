//! Ready-made [`DeviceModel`](super::model::DeviceModel)s of real devices, for tests of
//! their drivers: QEMU's `edu` ([`EduModel`]), and the emulated NVMe controller
//! ([`NvmeModel`](crate::testing::nvme::NvmeModel), next to the emulator it shares its
//! command processing with).

pub mod edu;

pub use edu::EduModel;
