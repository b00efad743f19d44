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
//! probing another device, or probing this one (see [`Bus`](super::Bus)), and when it
//! kept handles after `remove` for a removal: those handles then fail fast (registers
//! all-ones, everything else [`BackingError::Gone`]) instead of holding the device open.

use std::fmt;
use std::ops::Deref;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::Arc;

use crate::addr::PciAddress;
use crate::bus::bar::{BarInfo, DeviceRegion};
use crate::bus::interrupt::{Interrupt, InterruptError, InterruptKind, check_count, new_interrupts};
use crate::vfio::reset::{HotResetInfo, ResetInfo};
use crate::vfio::{
    COMMAND, COMMAND_MASTER, COMMAND_MEMORY, DmaBuffer, DmaConstraints, DmaRegion, MappedBar, VfioDevice,
    VfioError,
};

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
    /// Enabling, growing, masking or unmasking interrupts failed.
    #[error(transparent)]
    Interrupt(#[from] InterruptError),
    /// No DMA address meets the allocation's constraints
    /// ([`DeviceBacking::alloc_dma_with`]): no free range of `size` bytes, aligned to
    /// `align`, ends at or below `max_iova`, the device's address limit.
    #[error(
        "{address}: no free DMA address range of {size} bytes aligned to {align:#x} ends at or below {max_iova:#x}, the device's address limit"
    )]
    NoDmaAddress {
        /// The device.
        address: PciAddress,
        /// Bytes asked for.
        size: u64,
        /// The alignment used.
        align: u64,
        /// The highest IOVA the device can reach.
        max_iova: u64,
    },
    /// A [`DmaPool`](super::dma::DmaPool) has no free block and may not grow.
    #[error("{address}: DMA pool of {block_size}-byte blocks is exhausted ({chunks} chunk(s), its limit)")]
    DmaPoolExhausted {
        /// The device.
        address: PciAddress,
        /// The pool's block size.
        block_size: usize,
        /// Chunks the pool holds: its limit.
        chunks: usize,
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
    /// A mapped BAR. `'static`, so that a driver's per-device state can hold it
    /// ([`Driver::Device`](super::driver::Driver::Device)).
    type Registers: RegisterIo + 'static;
    /// A DMA allocation (`'static`, as [`Registers`](Self::Registers)).
    type Dma: DmaMemory + 'static;

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

    // Interrupts of every kind (see `super::interrupt`). Each has a default, so a backing
    // that implements only the two MSI-X methods above still works: MSI-X through
    // `route_interrupts`, every other kind unsupported.

    /// How many vectors of `kind` the device has (0: none). For [`InterruptKind::Error`],
    /// 1 if the device reports errors this way. Default: MSI-X from
    /// [`max_interrupts`](Self::max_interrupts), other kinds 0.
    fn interrupt_count(&self, kind: InterruptKind) -> u32 {
        match kind {
            InterruptKind::MsiX => self.max_interrupts(),
            _ => 0,
        }
    }
    /// Whether vectors of `kind` can be masked
    /// ([`mask_interrupt`](Self::mask_interrupt)). For VFIO: INTx only (its
    /// `VFIO_IRQ_INFO_MASKABLE`). Default: no.
    fn interrupt_maskable(&self, kind: InterruptKind) -> bool {
        let _ = kind;
        false
    }
    /// Enables vectors `0..count` of `kind`, each routed to a new eventfd, and returns
    /// them. `count` must be between 1 and [`interrupt_count`](Self::interrupt_count)
    /// ([`InterruptError::TooMany`] names both numbers). One of INTx, MSI and MSI-X can be
    /// enabled at a time ([`InterruptError::OtherKindEnabled`]); enabling the kind that is
    /// enabled replaces its vectors (the old handles stop firing). An INTx comes back
    /// automasked after each interrupt: see [`Interrupt::unmask`].
    ///
    /// Default: MSI-X through [`route_interrupts`](Self::route_interrupts), other kinds
    /// [`BackingError::Unsupported`].
    fn enable_interrupts(&self, kind: InterruptKind, count: u32) -> Result<Vec<Interrupt>, BackingError> {
        let address = self.address();
        if kind != InterruptKind::MsiX {
            return Err(BackingError::Unsupported {
                address,
                operation: "enable_interrupts (kinds other than MSI-X)",
            });
        }
        check_count(address, kind, count, self.interrupt_count(kind))?;
        let interrupts = new_interrupts(address, kind, 0, count)?;
        let fds: Vec<_> = interrupts.iter().map(|i| i.as_fd()).collect();
        self.route_interrupts(&fds)?;
        Ok(interrupts)
    }
    /// Enables up to `count` vectors of the best kind the device has: MSI-X, else MSI,
    /// else INTx (one vector), falling back to the next kind when enabling one fails (a
    /// device that is gone fails at once). Returns the kind and its vectors, which may be
    /// fewer than `count`: as many as the kind has.
    fn enable_best_interrupts(&self, count: u32) -> Result<(InterruptKind, Vec<Interrupt>), BackingError> {
        let address = self.address();
        if count == 0 {
            return Err(InterruptError::NoneAsked {
                address,
                kind: InterruptKind::MsiX,
            }
            .into());
        }
        let mut last = None;
        for kind in InterruptKind::BEST_FIRST {
            let available = self.interrupt_count(kind);
            if available == 0 {
                continue;
            }
            match self.enable_interrupts(kind, count.min(available)) {
                Ok(interrupts) => return Ok((kind, interrupts)),
                Err(e @ BackingError::Gone(_)) => return Err(e),
                Err(e) => {
                    log::debug!("{address}: enabling {kind} failed, trying the next kind: {e}");
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or(InterruptError::NoneAvailable { address }.into()))
    }
    /// Adds `count` vectors to the enabled `kind`, numbered after the present ones,
    /// without disabling it: MSI-X where the kernel allows it (VFIO: Linux 6.5 on, where
    /// MSI-X lacks `VFIO_IRQ_INFO_NORESIZE`); MSI and INTx never grow. Otherwise
    /// [`InterruptError::Unsupported`] with the reason (then disable and enable the whole
    /// set). Default: [`BackingError::Unsupported`].
    fn add_interrupts(&self, kind: InterruptKind, count: u32) -> Result<Vec<Interrupt>, BackingError> {
        let _ = (kind, count);
        Err(BackingError::Unsupported {
            address: self.address(),
            operation: "add_interrupts",
        })
    }
    /// Disables `kind` (every vector of it); nothing if it is not enabled. Default: MSI-X
    /// through [`route_interrupts`](Self::route_interrupts) with no fds, other kinds
    /// [`BackingError::Unsupported`].
    fn disable_interrupts(&self, kind: InterruptKind) -> Result<(), BackingError> {
        match kind {
            InterruptKind::MsiX => self.route_interrupts(&[]),
            _ => Err(BackingError::Unsupported {
                address: self.address(),
                operation: "disable_interrupts (kinds other than MSI-X)",
            }),
        }
    }
    /// Masks `vector` of the enabled `kind`: an interrupt raised while it is masked is
    /// delivered when it is unmasked. VFIO masks INTx only (see
    /// [`interrupt_maskable`](Self::interrupt_maskable)). Default:
    /// [`BackingError::Unsupported`].
    fn mask_interrupt(&self, kind: InterruptKind, vector: u32) -> Result<(), BackingError> {
        let _ = (kind, vector);
        Err(BackingError::Unsupported {
            address: self.address(),
            operation: "mask_interrupt",
        })
    }
    /// Unmasks `vector` of the enabled `kind`, delivering an interrupt raised while it was
    /// masked. For an automasked INTx this is [`Interrupt::unmask`]. Default:
    /// [`BackingError::Unsupported`].
    fn unmask_interrupt(&self, kind: InterruptKind, vector: u32) -> Result<(), BackingError> {
        let _ = (kind, vector);
        Err(BackingError::Unsupported {
            address: self.address(),
            operation: "unmask_interrupt",
        })
    }
    /// Routes the device's error notification (VFIO's ERR index: AER errors of a PCI
    /// Express device) to a new eventfd ([`InterruptKind::Error`], vector 0), for drivers
    /// that want to hear of errors. The device request (REQ) index is not offered: it is
    /// the bus's, which drives removal through it. Disable with
    /// [`disable_interrupts`](Self::disable_interrupts)`(InterruptKind::Error)`. Default:
    /// [`BackingError::Unsupported`].
    fn error_interrupt(&self) -> Result<Interrupt, BackingError> {
        Err(BackingError::Unsupported {
            address: self.address(),
            operation: "error_interrupt",
        })
    }
    /// A function-level reset, by the method the kernel has for the device
    /// ([`reset_info`](Self::reset_info)); fails when it has none.
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
    /// The bus calls it on its own handle only for a device the kernel wants back (a
    /// removal) while the device's driver cannot let go in time, or did not: the driver
    /// is busy probing another device, or is probing this one (the bus then closes the
    /// device and tells the driver, [`Driver::remove`](super::driver::Driver::remove),
    /// when the probe returns); or it kept handles after `remove` (the bus then closes
    /// the device at once). Never for an orderly detach, whose previous binding can be
    /// restored only once every handle is gone.
    ///
    /// Default: [`BackingError::Unsupported`]: the bus then waits for the probe, or for
    /// the kept handles to be dropped, before it closes the device (see
    /// [`Bus`](super::Bus)).
    fn revoke(&self) -> Result<(), BackingError> {
        Err(BackingError::Unsupported {
            address: self.address(),
            operation: "revoke",
        })
    }
    /// Turns the device's DMA on or off: Bus Master Enable (bit 2) of its Command register,
    /// read, changed and written back through config space. Without it the device's
    /// memory reads and writes, MSI and MSI-X messages included, never reach memory.
    ///
    /// The bus turns it on (with Memory Space Enable) when it opens a device, before the
    /// first probe, as DPDK does when it maps one: a driver that wants the device's DMA
    /// off until it has set the device up turns it off first thing in its probe. vfio-pci
    /// itself enables memory decoding on open but never bus mastering.
    fn set_bus_master(&self, on: bool) -> Result<(), BackingError> {
        let mut command = [0u8; 2];
        self.read_config(COMMAND, &mut command)?;
        let old = u16::from_le_bytes(command);
        let new = if on {
            old | COMMAND_MEMORY | COMMAND_MASTER
        } else {
            old & !COMMAND_MASTER
        };
        if new != old {
            self.write_config(COMMAND, &new.to_le_bytes())?;
        }
        Ok(())
    }
    /// Whether Bus Master Enable is set in the device's Command register.
    fn bus_master(&self) -> Result<bool, BackingError> {
        let mut command = [0u8; 2];
        self.read_config(COMMAND, &mut command)?;
        Ok(u16::from_le_bytes(command) & COMMAND_MASTER != 0)
    }
    /// Says that the device is being taken away while its DMA may be in flight: DMA
    /// addresses of memory freed from now on are not handed out again until the device
    /// can no longer reach them (it is closed). For VFIO,
    /// [`VfioDevice::quarantine_iovas`]. Default: nothing (an emulation never reuses a
    /// freed address under its device).
    fn quarantine_dma(&self) {}

    // --- DMA with constraints, and caller memory (issue 16 §3; see super::dma) ---

    /// Allocates `len` bytes (rounded up to whole pages), zeroed, mapped for the device as
    /// `constraints` ask: every byte's IOVA at or below their address limit
    /// ([`BackingError::NoDmaAddress`] when nothing fits there, naming the limit and the
    /// size), the IOVA aligned as asked, the pages preferably on their NUMA node, and the
    /// device allowed only to read if they say so. See [`DmaConstraints`].
    ///
    /// Default: [`alloc_dma`](Self::alloc_dma) for trivial constraints, else
    /// [`BackingError::Unsupported`] naming the first constraint it cannot honour.
    fn alloc_dma_with(&self, len: usize, constraints: &DmaConstraints) -> Result<Self::Dma, BackingError> {
        match constraints.first_nontrivial() {
            None => self.alloc_dma(len),
            Some(operation) => Err(BackingError::Unsupported {
                address: self.address(),
                operation,
            }),
        }
    }

    /// Maps `buffer` for the device as `constraints` ask (their NUMA node aside: the pages
    /// exist already). For memory the caller allocated
    /// ([`DmaBuffer::from_memory`](crate::vfio::DmaBuffer::from_memory) of a
    /// [`CallerMemory`](crate::vfio::CallerMemory), such as a
    /// [`PageBuffer`](crate::vfio::PageBuffer)), as SPDK's `spdk_mem_register`; a buffer
    /// of the crate's own works as well. [`unmap_dma`](Self::unmap_dma) gives the buffer
    /// back once the device can no longer reach it; dropping the result unmaps and frees
    /// it (the caller's memory with it). On failure the buffer comes back, unmapped, in
    /// the error (boxed: a failed map is rare, and a large `Err` would cost every call).
    ///
    /// Default: [`BackingError::Unsupported`].
    fn map_dma(
        &self,
        buffer: DmaBuffer,
        constraints: &DmaConstraints,
    ) -> Result<Self::Dma, Box<MapDmaError>> {
        let _ = constraints;
        Err(Box::new(MapDmaError {
            error: BackingError::Unsupported {
                address: self.address(),
                operation: "mapping memory for DMA",
            },
            buffer,
        }))
    }

    /// Unmaps `dma` (from [`map_dma`](Self::map_dma) or an allocation) and gives its
    /// buffer back, only once the device can no longer reach it: for VFIO, after the
    /// IOMMU unmap succeeded ([`DmaRegion::unmap`]). When the unmap fails the memory is
    /// leaked for good (the device might still reach it) and the error says so.
    /// Then [`DmaBuffer::into_memory`](crate::vfio::DmaBuffer::into_memory) returns the
    /// caller's memory.
    ///
    /// Default: [`BackingError::Unsupported`] (`dma` is dropped, which unmaps and frees it).
    fn unmap_dma(&self, dma: Self::Dma) -> Result<DmaBuffer, BackingError> {
        drop(dma);
        Err(BackingError::Unsupported {
            address: self.address(),
            operation: "unmapping DMA memory back to its buffer",
        })
    }

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

    // --- Resets (issue 16 §4; see crate::vfio::reset) ---

    /// Whether [`reset`](Self::reset) can work, and which method the kernel uses for it
    /// ([`ResetInfo`]). For VFIO, `VFIO_DEVICE_FLAGS_RESET` and sysfs `reset_method`
    /// (which takes no device lock). Default: [`BackingError::Unsupported`].
    fn reset_info(&self) -> Result<ResetInfo, BackingError> {
        Err(BackingError::Unsupported {
            address: self.address(),
            operation: "reset_info",
        })
    }
    /// The devices a bus or slot hot reset of this device would reset (itself included),
    /// with their groups or iommufd device ids ([`HotResetInfo`]). For VFIO,
    /// `VFIO_DEVICE_GET_PCI_HOT_RESET_INFO`; a device the kernel cannot hot reset is
    /// [`VfioError::NoHotReset`]. Default: [`BackingError::Unsupported`].
    fn hot_reset_info(&self) -> Result<HotResetInfo, BackingError> {
        Err(BackingError::Unsupported {
            address: self.address(),
            operation: "hot_reset_info",
        })
    }
    /// A bus or slot hot reset: resets this device and every other device
    /// [`hot_reset_info`](Self::hot_reset_info) lists, and returns that list. Only when
    /// this process holds all of them (for VFIO: their groups open in the device's
    /// container, or bound to its iommufd); otherwise an error names the ones it does not
    /// hold ([`VfioError::HotResetNotHeld`]). The state of every affected device is lost:
    /// for a device held by another driver, that driver must be told. The bus never does
    /// this on its own. Default: [`BackingError::Unsupported`].
    fn hot_reset(&self) -> Result<HotResetInfo, BackingError> {
        Err(BackingError::Unsupported {
            address: self.address(),
            operation: "hot_reset",
        })
    }
}

/// [`DeviceBacking::map_dma`] failed: why, and the buffer, unmapped, back.
#[derive(Debug, thiserror::Error)]
#[error("{error}")]
pub struct MapDmaError {
    /// Why.
    pub error: BackingError,
    /// The buffer, not mapped: the caller's again.
    pub buffer: DmaBuffer,
}

impl From<Box<MapDmaError>> for BackingError {
    /// Keeps the error; the buffer (with the caller's memory in it) is dropped.
    fn from(e: Box<MapDmaError>) -> BackingError {
        e.error
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

    /// New interrupts `start..start + count` of `kind`; an INTx unmasks through a weak
    /// reference to the device, so that it keeps no handle of it.
    fn new_interrupts(
        &self,
        kind: InterruptKind,
        start: u32,
        count: u32,
    ) -> Result<Vec<Interrupt>, BackingError> {
        let address = self.address();
        let interrupts = new_interrupts(address, kind, start, count)?;
        if !kind.is_automasked() {
            return Ok(interrupts);
        }
        Ok(interrupts
            .into_iter()
            .map(|i| {
                let (index, vector) = (kind.vfio_index(), i.vector());
                let device = Arc::downgrade(&self.device);
                i.with_unmask(move || match device.upgrade() {
                    Some(device) => Ok(device.unmask_irq(index, vector)?),
                    None => Err(BackingError::Gone(address)),
                })
            })
            .collect())
    }

    fn mask_or_unmask(&self, kind: InterruptKind, vector: u32, mask: bool) -> Result<(), BackingError> {
        let address = self.address();
        let index = kind.vfio_index();
        let operation = if mask { "mask" } else { "unmask" };
        if kind == InterruptKind::Error {
            return Err(InterruptError::Unsupported {
                address,
                kind,
                operation,
                reason: "the error notification has no mask",
            }
            .into());
        }
        if !self
            .device
            .enabled_irq()
            .is_some_and(|(on, n)| on == index && vector < n)
        {
            return Err(InterruptError::NotEnabled {
                address,
                kind,
                vector,
            }
            .into());
        }
        let done = if mask {
            self.device.mask_irq(index, vector)
        } else {
            self.device.unmask_irq(index, vector)
        };
        match done {
            Err(VfioError::Ioctl { source, .. }) if source.raw_os_error() == Some(nix::libc::ENOTTY) => {
                Err(InterruptError::Unsupported {
                    address,
                    kind,
                    operation,
                    reason: VFIO_MSI_MASK_REASON,
                }
                .into())
            }
            other => Ok(other?),
        }
    }
}

/// Why VFIO cannot mask MSI or MSI-X vectors.
const VFIO_MSI_MASK_REASON: &str = "vfio-pci masks INTx only (VFIO_DEVICE_SET_IRQS answers ENOTTY for MSI and MSI-X); \
     mask the interrupt's source in the device";

/// A VFIO error of enabling `kind`, as the backing-neutral error where there is one.
fn irq_error(e: VfioError, kind: InterruptKind) -> BackingError {
    match e {
        VfioError::IrqBusy { address, enabled, .. } => match InterruptKind::from_vfio_index(enabled) {
            Some(enabled) => InterruptError::OtherKindEnabled {
                address,
                enabled,
                wanted: kind,
            }
            .into(),
            None => e.into(),
        },
        e => e.into(),
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

    // Interrupts of every kind: what vfio-pci does is in `crate::vfio::irqs`.
    fn interrupt_count(&self, kind: InterruptKind) -> u32 {
        self.device.irq_info(kind.vfio_index()).map_or(0, |i| i.count)
    }
    fn interrupt_maskable(&self, kind: InterruptKind) -> bool {
        self.device
            .irq_info(kind.vfio_index())
            .is_ok_and(|i| i.count > 0 && i.flags.contains(crate::vfio::irq::InfoFlags::MASKABLE))
    }
    fn enable_interrupts(&self, kind: InterruptKind, count: u32) -> Result<Vec<Interrupt>, BackingError> {
        let address = self.address();
        check_count(address, kind, count, self.interrupt_count(kind))?;
        if kind == InterruptKind::Error {
            return Ok(vec![self.error_interrupt()?]);
        }
        let interrupts = self.new_interrupts(kind, 0, count)?;
        let index = kind.vfio_index();
        // Enabling the enabled kind replaces its vectors: vfio-pci would only re-route
        // those it has, and refuse more on kernels that cannot grow MSI-X.
        if self.device.enabled_irq().is_some_and(|(on, _)| on == index) {
            self.device.disable_irq(index)?;
        }
        let fds: Vec<_> = interrupts.iter().map(|i| i.as_fd()).collect();
        self.device
            .set_irq_eventfds(index, &fds)
            .map_err(|e| irq_error(e, kind))?;
        Ok(interrupts)
    }
    fn add_interrupts(&self, kind: InterruptKind, count: u32) -> Result<Vec<Interrupt>, BackingError> {
        let address = self.address();
        let index = kind.vfio_index();
        let start = match self.device.enabled_irq() {
            Some((on, n)) if on == index => n,
            _ => {
                return Err(InterruptError::NotEnabled {
                    address,
                    kind,
                    vector: 0,
                }
                .into());
            }
        };
        let unsupported = |reason| InterruptError::Unsupported {
            address,
            kind,
            operation: "growth",
            reason,
        };
        match kind {
            InterruptKind::MsiX if !self.device.msix_resizable()? => {
                return Err(unsupported(crate::bus::interrupt::NORESIZE_REASON).into());
            }
            InterruptKind::MsiX => {}
            _ => return Err(unsupported("only MSI-X can grow while enabled").into()),
        }
        if count == 0 {
            return Err(InterruptError::NoneAsked { address, kind }.into());
        }
        check_count(
            address,
            kind,
            start.saturating_add(count),
            self.interrupt_count(kind),
        )?;
        let interrupts = self.new_interrupts(kind, start, count)?;
        let fds: Vec<_> = interrupts.iter().map(|i| i.as_fd()).collect();
        self.device
            .set_irq_eventfds_from(index, start, &fds)
            .map_err(|e| irq_error(e, kind))?;
        Ok(interrupts)
    }
    fn disable_interrupts(&self, kind: InterruptKind) -> Result<(), BackingError> {
        Ok(self.device.disable_irq(kind.vfio_index())?)
    }
    fn mask_interrupt(&self, kind: InterruptKind, vector: u32) -> Result<(), BackingError> {
        self.mask_or_unmask(kind, vector, true)
    }
    fn unmask_interrupt(&self, kind: InterruptKind, vector: u32) -> Result<(), BackingError> {
        self.mask_or_unmask(kind, vector, false)
    }
    fn error_interrupt(&self) -> Result<Interrupt, BackingError> {
        let address = self.address();
        let kind = InterruptKind::Error;
        if self.interrupt_count(kind) == 0 {
            return Err(InterruptError::Unsupported {
                address,
                kind,
                operation: "error_interrupt",
                reason: crate::bus::interrupt::NO_ERR_REASON,
            }
            .into());
        }
        let interrupt = self.new_interrupts(kind, 0, 1)?.remove(0);
        self.device
            .set_irq_eventfds(kind.vfio_index(), &[interrupt.as_fd()])?;
        Ok(interrupt)
    }
    fn reset(&self) -> Result<(), BackingError> {
        // Said plainly rather than as the ioctl's EINVAL: VFIO reports whether the kernel
        // has a function reset for the device (FLR, PM, a bus reset of a device alone on
        // its bus...).
        if !self.device.function_reset_available()? {
            return Err(BackingError::Unsupported {
                address: self.address(),
                operation: "reset (the kernel has no function reset for this device: no FLR, no PM reset, not alone on a resettable bus)",
            });
        }
        Ok(self.device.reset()?)
    }
    fn reset_info(&self) -> Result<ResetInfo, BackingError> {
        Ok(self
            .device
            .reset_info(&crate::sysfs::scan::SysfsRoot::from_env())?)
    }
    fn hot_reset_info(&self) -> Result<HotResetInfo, BackingError> {
        Ok(self.device.hot_reset_info()?)
    }
    fn hot_reset(&self) -> Result<HotResetInfo, BackingError> {
        Ok(self.device.hot_reset()?)
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
    fn alloc_dma_with(&self, len: usize, constraints: &DmaConstraints) -> Result<DmaRegion, BackingError> {
        let container = self.device.container();
        container
            .alloc_dma_with(len, constraints)
            .map_err(|e| vfio_dma_error(self.address(), e))
    }
    fn map_dma(
        &self,
        buffer: DmaBuffer,
        constraints: &DmaConstraints,
    ) -> Result<DmaRegion, Box<MapDmaError>> {
        let container = self.device.container();
        container.map_returning(buffer, constraints).map_err(|failed| {
            let (e, buffer) = *failed;
            Box::new(MapDmaError {
                error: vfio_dma_error(self.address(), e),
                buffer,
            })
        })
    }
    fn unmap_dma(&self, dma: DmaRegion) -> Result<DmaBuffer, BackingError> {
        Ok(dma.unmap()?)
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

/// A VFIO DMA error as the backing says it: an address limit nothing fits under is
/// [`BackingError::NoDmaAddress`], whichever backing the driver runs on.
fn vfio_dma_error(address: PciAddress, e: VfioError) -> BackingError {
    match e {
        VfioError::IovaExhaustedBelow {
            size,
            align,
            max_iova,
        } => BackingError::NoDmaAddress {
            address,
            size,
            align,
            max_iova,
        },
        e => BackingError::Vfio(e),
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
