//! Ready-made [`DeviceModel`](super::model::DeviceModel)s of real devices, for tests of
//! their drivers: QEMU's `edu` ([`EduModel`]).

pub mod edu;

pub use edu::EduModel;
