//! Drivers for devices other than NVMe, written on the public driver API alone (no
//! `unsafe`, nothing but [`DeviceBacking`](crate::bus::DeviceBacking) between them and the
//! device), generic over the backing so that they run on VFIO and on a model of their
//! device in tests.
//!
//! - [`edu`]: QEMU's educational device (1234:11e8): MMIO registers, MSI or INTx, DMA
//!   under a 28-bit address limit. The worked example of the README's "Writing a driver".
//!
//! The NVMe driver is [`crate::nvme::driver::NvmeDriver`].

pub mod edu;
