//! What a driver sees of its device: [`DeviceBacking`], in the spirit of OpenVMM's trait of
//! the same name.
//!
//! A driver generic over `B: DeviceBacking` maps BARs ([`RegisterIo`]), allocates memory
//! the device can reach ([`DmaMemory`]), routes its MSI-X vectors to eventfds and reads and
//! writes its config space, and never learns whether the device is a VFIO function
//! ([`VfioBacking`]) or an emulation in the same process (the NVMe emulator of the
//! `testing` feature), so the same driver code runs in unit tests and on hardware.
//!
//! Every method takes `&self` and the backing is `Clone` (a handle): a driver keeps clones
//! in its per-device state and in its queues, and drops them all in
//! [`Driver::remove`](super::driver::Driver::remove). The bus checks that it did
//! ([`DeviceBacking::extra_handles`]): a handle kept after removal keeps a VFIO device
//! open, and the kernel's removal waits for it.
//!
//! A backing that can close its device under live handles ([`DeviceBacking::revoke`])
//! lets the bus answer a removal request without the driver: while the driver is busy
//! probing another device, or probing this one (see [`Bus`](super::Bus)).

use std::fmt;
use std::ops::Deref;
use std::os::fd::BorrowedFd;
use std::sync::Arc;

use crate::addr::PciAddress;
use crate::bus::bar::{BarInfo, DeviceRegion};
use crate::vfio::{DmaBuffer, DmaRegion, MappedBar, VfioDevice, VfioError};

/// Why a backing operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BackingError {
    /// The VFIO layer refused or failed.
    #[error(transparent)]
    Vfio(#[from] VfioError),
    /// An access outside the BAR or config space, or misaligned.
    #[error("{address}: {what} at {offset:#x} (+{len}) is out of range")]
    OutOfRange {
        /// The device.
        address: PciAddress,
        /// What was accessed ("BAR 0", "config").
        what: String,
        /// Where.
        offset: u64,
        /// How many bytes.
        len: usize,
    },
    /// The device (or its emulation) is gone.
    #[error("{0}: device gone")]
    Gone(PciAddress),
    /// The backing cannot do this (for example [`DeviceBacking::revoke`]).
    #[error("{address}: {operation} is not supported by this backing")]
    Unsupported {
        /// The device.
        address: PciAddress,
        /// What was asked (`"revoke"`).
        operation: &'static str,
    },
    /// Anything else, said by the backing.
    #[error("{address}: {message}")]
    Other {
        /// The device.
        address: PciAddress,
        /// What went wrong.
        message: String,
    },
}

/// A mapped BAR, or a window of one ([`DeviceBacking::map_bar_range`]): 8-, 16-, 32- and
/// 64-bit register accesses at byte offsets, each one access of exactly its width,
/// naturally aligned (a misaligned or outside access is [`BackingError::OutOfRange`]).
/// An I/O-port BAR has no 8-byte accesses ([`BackingError::Unsupported`]).
///
/// A device that is gone reads all-ones (a surprise-removed VFIO device whose BAR faulted
/// reads `0xffff_ffff` once [`crate::vfio::fault`] replaced the mapping); drivers treat
/// all-ones from a register that cannot hold it as "device gone".
pub trait RegisterIo: Send + Sync + fmt::Debug {
    /// The BAR's size in bytes.
    fn len(&self) -> u64;
    /// Whether the BAR has no bytes (never, for a mapped BAR).
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// A 32-bit read at `offset` (4-byte aligned).
    fn read32(&self, offset: u64) -> Result<u32, BackingError>;
    /// A 32-bit write at `offset`.
    fn write32(&self, offset: u64, value: u32) -> Result<(), BackingError>;
    /// A 64-bit read at `offset` (8-byte aligned).
    fn read64(&self, offset: u64) -> Result<u64, BackingError>;
    /// A 64-bit write at `offset`.
    fn write64(&self, offset: u64, value: u64) -> Result<(), BackingError>;

    // Issue 16 §2: narrow accesses and ordered doorbell writes.

    /// An 8-bit read at `offset`: one access of exactly that width (a device register
    /// may have side effects on its neighbours' bytes, so it is never a wider access).
    fn read8(&self, offset: u64) -> Result<u8, BackingError>;
    /// An 8-bit write at `offset`, of exactly that width.
    fn write8(&self, offset: u64, value: u8) -> Result<(), BackingError>;
    /// A 16-bit read at `offset` (2-byte aligned: otherwise [`BackingError::OutOfRange`]),
    /// of exactly that width (virtio's common configuration has 16-bit fields).
    fn read16(&self, offset: u64) -> Result<u16, BackingError>;
    /// A 16-bit write at `offset` (2-byte aligned), of exactly that width.
    fn write16(&self, offset: u64, value: u16) -> Result<(), BackingError>;

    /// A 32-bit write that the device sees after every store this thread made to DMA
    /// memory before it: [`dma_wmb`](crate::barrier::dma_wmb), then
    /// [`write32`](Self::write32). For a doorbell that publishes descriptors or
    /// submission entries. Linux's `writel` is the same pair (its `writel_relaxed` is
    /// the bare store, as `write32` here); SPDK puts `spdk_wmb` before its doorbell
    /// stores. On x86-64 the barrier costs no instruction.
    fn write32_after_dma(&self, offset: u64, value: u32) -> Result<(), BackingError> {
        crate::barrier::dma_wmb();
        self.write32(offset, value)
    }
    /// [`write32_after_dma`](Self::write32_after_dma) for a 16-bit doorbell (virtio's
    /// queue notification is a 16-bit write of the queue index).
    fn write16_after_dma(&self, offset: u64, value: u16) -> Result<(), BackingError> {
        crate::barrier::dma_wmb();
        self.write16(offset, value)
    }
}

/// Memory the device can reach by DMA: a [`DmaBuffer`] (atomic, aligned accesses; no
/// references into it) at an I/O virtual address. Unmapped and freed on drop.
pub trait DmaMemory: Deref<Target = DmaBuffer> + Send + Sync + fmt::Debug {
    /// The address the device uses for the buffer's first byte.
    fn iova(&self) -> u64;
}

/// A device as a driver drives it. See the [module docs](self).
pub trait DeviceBacking: Clone + Send + Sync + fmt::Debug + 'static {
    /// A mapped BAR.
    type Registers: RegisterIo;
    /// A DMA allocation.
    type Dma: DmaMemory;

    /// The device's address.
    fn address(&self) -> PciAddress;
    /// Maps BAR `index` (0–5).
    fn map_bar(&self, index: u32) -> Result<Self::Registers, BackingError>;
    /// Allocates `len` bytes (rounded up to whole pages), zeroed, mapped for the device.
    fn alloc_dma(&self, len: usize) -> Result<Self::Dma, BackingError>;
    /// Reads config space at `offset`.
    fn read_config(&self, offset: u64, buf: &mut [u8]) -> Result<(), BackingError>;
    /// Writes config space at `offset`.
    fn write_config(&self, offset: u64, buf: &[u8]) -> Result<(), BackingError>;
    /// How many MSI-X vectors the device has (0: none).
    fn max_interrupts(&self) -> u32;
    /// Routes MSI-X vectors `0..fds.len()` to these eventfds, in one call; an empty slice
    /// disables MSI-X. The eventfds stay the caller's.
    fn route_interrupts(&self, fds: &[BorrowedFd<'_>]) -> Result<(), BackingError>;
    /// A function-level reset.
    fn reset(&self) -> Result<(), BackingError>;
    /// How many handles to the device exist besides this one (clones, mapped BARs). The
    /// bus calls it on its own handle after [`Driver::remove`](super::driver::Driver::remove)
    /// and after a failed probe: anything but 0 means the driver kept the device.
    fn extra_handles(&self) -> usize;
    /// Closes the device under every handle of it, at once: afterwards mapped registers
    /// read all-ones and drop writes, every other operation of every handle fails with
    /// [`BackingError::Gone`], and the device counts as closed for whoever waits for its
    /// close (for VFIO, the kernel's removal). The handles stay valid values until
    /// dropped ([`extra_handles`](Self::extra_handles) still counts them); DMA memory
    /// already allocated stays the owner's.
    ///
    /// The bus calls it on its own handle only for a device the kernel wants back while
    /// the device's driver cannot let go in time: the driver is busy probing another
    /// device, or is probing this one. It then closes the device and tells the driver
    /// ([`Driver::remove`](super::driver::Driver::remove)) when the probe returns.
    ///
    /// Default: [`BackingError::Unsupported`]: the bus then waits for the probe before it
    /// closes the device (see [`Bus`](super::Bus)).
    fn revoke(&self) -> Result<(), BackingError> {
        Err(BackingError::Unsupported {
            address: self.address(),
            operation: "revoke",
        })
    }
    /// Says that the device is being taken away while its DMA may be in flight: DMA
    /// addresses of memory freed from now on are not handed out again until the device
    /// can no longer reach them (it is closed). For VFIO,
    /// [`VfioDevice::quarantine_iovas`]. Default: nothing (an emulation never reuses a
    /// freed address under its device).
    fn quarantine_dma(&self) {}

    // Issue 16 §2: BARs without mapping them, windows of BARs, device-specific regions.

    /// What BAR `index` (0–5) is, without mapping it: kind, size, prefetchable, which
    /// parts [`map_bar`](Self::map_bar) mmaps. For VFIO, from the region info and the
    /// flag bits of the BAR's config-space register (read, never sized by writing).
    /// Index 6 and up is [`BackingError::OutOfRange`].
    ///
    /// Default: [`BackingError::Unsupported`] (a backing that does not know; guessing
    /// from a mapping's length would hide that it cannot say the kind).
    fn bar_info(&self, index: u32) -> Result<BarInfo, BackingError> {
        let _ = index;
        Err(BackingError::Unsupported {
            address: self.address(),
            operation: "bar_info",
        })
    }
    /// Maps `len` bytes of BAR `index` from `offset`: registers whose offsets are
    /// relative to the window and whose [`len`](RegisterIo::len) is `len`; accesses
    /// outside it fail with [`BackingError::OutOfRange`] (so do a window that is empty or
    /// leaves the BAR). Accesses stay naturally aligned within the BAR. Only the pages
    /// holding the window are mapped (the rounding is the backing's business). For
    /// drivers that reach one structure in a shared BAR (a virtio capability).
    ///
    /// Default: [`BackingError::Unsupported`].
    fn map_bar_range(&self, index: u32, offset: u64, len: u64) -> Result<Self::Registers, BackingError> {
        let _ = (index, offset, len);
        Err(BackingError::Unsupported {
            address: self.address(),
            operation: "map_bar_range",
        })
    }
    /// The device-specific regions (VFIO region index 9 and up), in index order.
    /// Default: none.
    fn regions(&self) -> Vec<DeviceRegion> {
        Vec::new()
    }
    /// Reads device-specific region `index` at `offset` into `buf` (any length within the
    /// region). Default: [`BackingError::Unsupported`].
    fn read_region(&self, index: u32, offset: u64, buf: &mut [u8]) -> Result<(), BackingError> {
        let _ = (index, offset, buf);
        Err(BackingError::Unsupported {
            address: self.address(),
            operation: "read_region",
        })
    }
    /// Writes `buf` to device-specific region `index` at `offset`. Default:
    /// [`BackingError::Unsupported`].
    fn write_region(&self, index: u32, offset: u64, buf: &[u8]) -> Result<(), BackingError> {
        let _ = (index, offset, buf);
        Err(BackingError::Unsupported {
            address: self.address(),
            operation: "write_region",
        })
    }
}

/// A VFIO device as a [`DeviceBacking`]: a handle (`Arc`) of an open [`VfioDevice`]. DMA
/// memory comes from the device's container. [`revoke`](DeviceBacking::revoke) is
/// [`VfioDevice::revoke`].
#[derive(Debug)]
pub struct VfioBacking {
    device: Arc<VfioDevice>,
    _hold: crate::vfio::holders::Hold,
}

impl Clone for VfioBacking {
    fn clone(&self) -> Self {
        VfioBacking::new(Arc::clone(&self.device))
    }
}

impl VfioBacking {
    /// The backing of an open device.
    pub fn new(device: Arc<VfioDevice>) -> Self {
        let hold = crate::vfio::holders::Hold::new(device.address(), "backing");
        VfioBacking { device, _hold: hold }
    }

    /// The device, for what the trait does not cover (region info, other interrupts).
    pub fn device(&self) -> &Arc<VfioDevice> {
        &self.device
    }
}

// The register errors a driver matches on, in the backing's terms: a bad offset is
// OutOfRange whichever backing said it, an I/O-port BAR's missing 8-byte access is
// Unsupported.
fn register_error(e: VfioError) -> BackingError {
    match e {
        VfioError::OutOfRange {
            address,
            region,
            offset,
            len,
        } => BackingError::OutOfRange {
            address,
            what: format!("BAR {region}"),
            offset,
            len,
        },
        VfioError::IoPortWidth { address, .. } => BackingError::Unsupported {
            address,
            operation: "an 8-byte access to an I/O-port BAR",
        },
        e => BackingError::Vfio(e),
    }
}

impl RegisterIo for MappedBar {
    fn len(&self) -> u64 {
        let window = self.window();
        window.end - window.start
    }
    fn read32(&self, offset: u64) -> Result<u32, BackingError> {
        MappedBar::read32(self, offset).map_err(register_error)
    }
    fn write32(&self, offset: u64, value: u32) -> Result<(), BackingError> {
        MappedBar::write32(self, offset, value).map_err(register_error)
    }
    fn read64(&self, offset: u64) -> Result<u64, BackingError> {
        MappedBar::read64(self, offset).map_err(register_error)
    }
    fn write64(&self, offset: u64, value: u64) -> Result<(), BackingError> {
        MappedBar::write64(self, offset, value).map_err(register_error)
    }
    fn read8(&self, offset: u64) -> Result<u8, BackingError> {
        MappedBar::read8(self, offset).map_err(register_error)
    }
    fn write8(&self, offset: u64, value: u8) -> Result<(), BackingError> {
        MappedBar::write8(self, offset, value).map_err(register_error)
    }
    fn read16(&self, offset: u64) -> Result<u16, BackingError> {
        MappedBar::read16(self, offset).map_err(register_error)
    }
    fn write16(&self, offset: u64, value: u16) -> Result<(), BackingError> {
        MappedBar::write16(self, offset, value).map_err(register_error)
    }
}

impl DmaMemory for DmaRegion {
    fn iova(&self) -> u64 {
        DmaRegion::iova(self)
    }
}

impl DeviceBacking for VfioBacking {
    type Registers = MappedBar;
    type Dma = DmaRegion;

    fn address(&self) -> PciAddress {
        self.device.address()
    }
    fn map_bar(&self, index: u32) -> Result<MappedBar, BackingError> {
        Ok(self.device.map_bar(index)?)
    }
    fn alloc_dma(&self, len: usize) -> Result<DmaRegion, BackingError> {
        Ok(self.device.container().alloc_dma(len)?)
    }
    fn read_config(&self, offset: u64, buf: &mut [u8]) -> Result<(), BackingError> {
        Ok(self.device.read_config(offset, buf)?)
    }
    fn write_config(&self, offset: u64, buf: &[u8]) -> Result<(), BackingError> {
        Ok(self.device.write_config(offset, buf)?)
    }
    fn max_interrupts(&self) -> u32 {
        self.device
            .irq_info(crate::vfio::irq::MSIX)
            .map_or(0, |i| i.count)
    }
    fn route_interrupts(&self, fds: &[BorrowedFd<'_>]) -> Result<(), BackingError> {
        if fds.is_empty() {
            return Ok(self.device.disable_irq(crate::vfio::irq::MSIX)?);
        }
        Ok(self.device.enable_msix(fds)?)
    }
    fn reset(&self) -> Result<(), BackingError> {
        Ok(self.device.reset()?)
    }
    fn extra_handles(&self) -> usize {
        Arc::strong_count(&self.device).saturating_sub(1)
    }
    fn revoke(&self) -> Result<(), BackingError> {
        Ok(self.device.revoke()?)
    }
    fn quarantine_dma(&self) {
        self.device.quarantine_iovas();
    }
    fn bar_info(&self, index: u32) -> Result<BarInfo, BackingError> {
        if index >= crate::vfio::ROM_REGION {
            return Err(BackingError::OutOfRange {
                address: self.address(),
                what: format!("BAR {index}"),
                offset: 0,
                len: 0,
            });
        }
        // A BAR VFIO reports no region for (a device with fewer regions) is absent.
        let Ok(region) = self.device.region(index) else {
            return Ok(BarInfo::absent(index));
        };
        if region.size == 0 {
            return Ok(BarInfo::absent(index));
        }
        Ok(BarInfo::from_vfio(region, self.device.bar_register(index)?))
    }
    fn map_bar_range(&self, index: u32, offset: u64, len: u64) -> Result<MappedBar, BackingError> {
        self.device
            .map_bar_range(index, offset, len)
            .map_err(register_error)
    }
    fn regions(&self) -> Vec<DeviceRegion> {
        (crate::bus::bar::FIRST_DEVICE_REGION..self.device.num_regions())
            .filter_map(|index| DeviceRegion::from_vfio(self.device.region(index).ok()?))
            .collect()
    }
    fn read_region(&self, index: u32, offset: u64, buf: &mut [u8]) -> Result<(), BackingError> {
        self.device
            .read_region(index, offset, buf)
            .map_err(register_error)
    }
    fn write_region(&self, index: u32, offset: u64, buf: &[u8]) -> Result<(), BackingError> {
        self.device
            .write_region(index, offset, buf)
            .map_err(register_error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // A driver matches one variant for a bad offset whichever backing it runs on, and an
    // I/O BAR's missing 8-byte access is "unsupported", not "the device failed".
    #[test]
    fn vfio_register_errors_are_said_in_the_backing_s_terms() {
        let address: PciAddress = "0000:00:03.0".parse().unwrap();
        let e = register_error(VfioError::OutOfRange {
            address,
            region: 2,
            offset: 0x21,
            len: 4,
        });
        assert!(
            matches!(&e, BackingError::OutOfRange { what, offset: 0x21, len: 4, .. } if what == "BAR 2"),
            "{e:?}"
        );
        let e = register_error(VfioError::IoPortWidth {
            address,
            region: 2,
            offset: 0,
        });
        assert!(matches!(e, BackingError::Unsupported { .. }), "{e:?}");
        let e = register_error(VfioError::Revoked { address });
        assert!(
            matches!(e, BackingError::Vfio(VfioError::Revoked { .. })),
            "{e:?}"
        );
    }
}
