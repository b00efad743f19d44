//! The in-tree NVMe driver, generic over [`crate::bus::DeviceBacking`]: no `unsafe` of its
//! own (everything unsafe stays in [`crate::vfio`]).
//!
//! [`spec`] holds the facts of the NVMe base specification the driver and the emulated
//! controller (`testing::nvme`) share.

pub mod spec;
