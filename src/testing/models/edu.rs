//! A model of QEMU's `edu` device (`-device edu`, QEMU's `hw/misc/edu.c` and
//! `docs/specs/edu.rst`), register for register, for tests of edu drivers.
//!
//! ```
//! use pcibus::bus::{DeviceBacking, RegisterIo};
//! use pcibus::testing::backing::FakeBacking;
//! use pcibus::testing::models::EduModel;
//! use pcibus::testing::models::edu::{regs, EDU_ID, STATUS_COMPUTING};
//!
//! let device = FakeBacking::with_model(EduModel::new());
//! device.set_bus_master(true)?; // as the bus does when it opens a device
//! let bar = device.map_bar(0)?;
//! assert_eq!(bar.read32(regs::ID)?, EDU_ID);
//! bar.write32(regs::FACTORIAL, 5)?;
//! assert_eq!(bar.read32(regs::STATUS)? & STATUS_COMPUTING, STATUS_COMPUTING);
//! device.step_model(); // or device.spawn_model_thread()
//! assert_eq!(bar.read32(regs::STATUS)? & STATUS_COMPUTING, 0);
//! assert_eq!(bar.read32(regs::FACTORIAL)?, 120);
//! # Ok::<(), pcibus::bus::BackingError>(())
//! ```
//!
//! # The device
//!
//! PCI `1234:11e8`, revision `0x10`, class `ff0000` (unclassified), subsystem
//! `1af4:1100` (QEMU's default), interrupt pin INTA, an MSI capability (one vector, 64-bit
//! addresses, no masking) and no MSI-X; BAR 0 is 1 MiB of 32-bit non-prefetchable memory:
//!
//! | offset | width | register |
//! |---|---|---|
//! | `0x00` | 4 | identification, `0x010000ed` (read-only) |
//! | `0x04` | 4 | liveness: reads back the bitwise inverse of what was written |
//! | `0x08` | 4 | factorial: a write starts computing its factorial (ignored while computing), a read gives the operand, then the result (32 bits, wrapping) |
//! | `0x20` | 4 | status: bit 0 computing (read-only), bit 7 raise interrupt `0x01` when the factorial is done |
//! | `0x24` | 4 | interrupt status (read-only) |
//! | `0x60` | 4 | interrupt raise: ORs the value into the status (write-only) |
//! | `0x64` | 4 | interrupt acknowledge: clears the value's bits from the status (write-only) |
//! | `0x80` | 4/8 | DMA source address |
//! | `0x88` | 4/8 | DMA destination address |
//! | `0x90` | 4/8 | DMA count |
//! | `0x98` | 4/8 | DMA command: bit 0 start (and busy), bit 1 direction (0: RAM to the device's buffer, 1: the buffer to RAM), bit 2 raise interrupt `0x100` when done |
//!
//! The device's DMA buffer is 4 KiB at device address `0x40000` ([`DMA_BUFFER`]): a
//! transfer's address on the device side must lie in it. An interrupt goes out as MSI
//! vector 0 when MSI is enabled (each raise sends one), else on INTx, asserted while the
//! interrupt status is nonzero. Writes to the DMA registers while a transfer runs are
//! ignored, and so is a command write without the start bit.
//!
//! # Strictness, as QEMU's
//!
//! - **Access widths**: below `0x80` only 4-byte accesses, from `0x80` on 4 or 8 bytes.
//!   Any other access reads all-ones and its write is ignored (what `edu_mmio_read` and
//!   `edu_mmio_write` do; QEMU's memory core refuses accesses narrower than 4 bytes before
//!   the device sees them, and answers them with zero on some versions: a driver must not
//!   rely on either). Each such access counts as a guest error
//!   ([`ModelStats::guest_errors`](crate::testing::model::ModelStats::guest_errors)), as
//!   QEMU logs an invalid access. A 4-byte write of a DMA register sets all 64 bits (the
//!   upper half zero); offsets that name no register read all-ones.
//! - **The DMA mask**: addresses on the RAM side are clamped to the device's DMA mask (28
//!   bits by default, [`DEFAULT_DMA_MASK`]; QEMU's `dma_mask` property,
//!   [`EduModel::with_dma_mask`]): QEMU ANDs the address with the mask and logs a guest
//!   error, and so does the model ([`EduModel::clamped_dma`], and a guest error), then
//!   transfers at the clamped address, which the backing most likely refuses (a driver
//!   that ignores the mask is caught twice).
//! - **Transfers outside the buffer**: QEMU logs a guest error and goes on (reading or
//!   writing past its buffer); the model logs the guest error and skips the transfer
//!   ([`EduModel::out_of_buffer`]), then completes the command as QEMU does.
//! - **Asynchrony**: the factorial and the DMA transfer complete in
//!   [`DeviceModel::step`] (QEMU: a thread, and a 100 ms timer), never inside the
//!   register write: a driver must poll the status (or the command's start bit), or wait
//!   for the interrupt.
//! - **Reset**: QEMU's edu has no reset handler: its registers, a pending interrupt status
//!   included, survive a function-level reset; the PCI core deasserts INTx. So does the
//!   model.
//! - **DMA and MSI need bus mastering**: refused by the backing while Bus Master Enable is
//!   off (see [`crate::testing::model`]); a refused transfer still completes.

use crate::bus::bar::BarInfo;
use crate::bus::interrupt::InterruptKind;
use crate::testing::backing::FakeLayout;
use crate::testing::model::{DeviceModel, ModelConfig, ModelContext};

/// The edu's vendor id (QEMU's).
pub const EDU_VENDOR: u16 = 0x1234;
/// The edu's device id.
pub const EDU_DEVICE: u16 = 0x11e8;
/// The edu's revision.
pub const EDU_REVISION: u8 = 0x10;
/// The edu's class code (unclassified device, "other").
pub const EDU_CLASS: u32 = 0xff_0000;
/// What the identification register reads: version 1.0, `0xed`.
pub const EDU_ID: u32 = 0x0100_00ed;
/// The size of BAR 0.
pub const EDU_BAR_SIZE: u64 = 1 << 20;

/// Register offsets in BAR 0.
pub mod regs {
    /// Identification ([`EDU_ID`](super::EDU_ID)).
    pub const ID: u64 = 0x00;
    /// Liveness check: reads the inverse of what was written.
    pub const LIVENESS: u64 = 0x04;
    /// Factorial operand and result.
    pub const FACTORIAL: u64 = 0x08;
    /// Status ([`STATUS_COMPUTING`](super::STATUS_COMPUTING),
    /// [`STATUS_IRQ_FACT`](super::STATUS_IRQ_FACT)).
    pub const STATUS: u64 = 0x20;
    /// Interrupt status.
    pub const IRQ_STATUS: u64 = 0x24;
    /// Interrupt raise.
    pub const IRQ_RAISE: u64 = 0x60;
    /// Interrupt acknowledge.
    pub const IRQ_ACK: u64 = 0x64;
    /// DMA source address.
    pub const DMA_SRC: u64 = 0x80;
    /// DMA destination address.
    pub const DMA_DST: u64 = 0x88;
    /// DMA transfer count.
    pub const DMA_COUNT: u64 = 0x90;
    /// DMA command.
    pub const DMA_CMD: u64 = 0x98;
}

/// Status: a factorial is being computed.
pub const STATUS_COMPUTING: u32 = 0x01;
/// Status: raise [`IRQ_FACT`] when a factorial is done.
pub const STATUS_IRQ_FACT: u32 = 0x80;
/// The interrupt status bit of a finished factorial.
pub const IRQ_FACT: u32 = 0x001;
/// The interrupt status bit of a finished DMA transfer.
pub const IRQ_DMA: u32 = 0x100;
/// DMA command: start (reads set while the transfer runs).
pub const DMA_START: u64 = 0x1;
/// DMA command: from the device's buffer to RAM (clear: RAM to the buffer).
pub const DMA_TO_RAM: u64 = 0x2;
/// DMA command: raise [`IRQ_DMA`] when done.
pub const DMA_IRQ: u64 = 0x4;
/// The device address of the device's DMA buffer.
pub const DMA_BUFFER: u64 = 0x40000;
/// The size of the device's DMA buffer.
pub const DMA_BUFFER_SIZE: usize = 4096;
/// QEMU's default DMA mask: 28 bits.
pub const DEFAULT_DMA_MASK: u64 = (1 << 28) - 1;

/// QEMU's `edu` device. See the [module docs](self).
#[derive(Debug, Clone)]
pub struct EduModel {
    dma_mask: u64,
    liveness: u32,
    factorial: u32,
    status: u32,
    irq_status: u32,
    dma_src: u64,
    dma_dst: u64,
    dma_count: u64,
    dma_cmd: u64,
    buffer: Vec<u8>,
    // Diagnostics.
    clamped_dma: u64,
    out_of_buffer: u64,
    bad_width: u64,
    factorials: u64,
    transfers: u64,
}

impl Default for EduModel {
    fn default() -> Self {
        Self::new()
    }
}

impl EduModel {
    /// An edu fresh from power-on, with QEMU's default 28-bit DMA mask.
    pub fn new() -> Self {
        Self::with_dma_mask(DEFAULT_DMA_MASK)
    }

    /// An edu whose DMA mask is `mask` (QEMU's `-device edu,dma_mask=...`).
    pub fn with_dma_mask(mask: u64) -> Self {
        EduModel {
            dma_mask: mask,
            liveness: 0,
            factorial: 0,
            status: 0,
            irq_status: 0,
            dma_src: 0,
            dma_dst: 0,
            dma_count: 0,
            dma_cmd: 0,
            buffer: vec![0; DMA_BUFFER_SIZE],
            clamped_dma: 0,
            out_of_buffer: 0,
            bad_width: 0,
            factorials: 0,
            transfers: 0,
        }
    }

    /// The DMA mask.
    pub fn dma_mask(&self) -> u64 {
        self.dma_mask
    }

    /// The device's 4 KiB DMA buffer.
    pub fn buffer(&self) -> &[u8] {
        &self.buffer
    }

    /// The device's DMA buffer, to fill in a test.
    pub fn buffer_mut(&mut self) -> &mut [u8] {
        &mut self.buffer
    }

    /// The interrupt status register.
    pub fn irq_status(&self) -> u32 {
        self.irq_status
    }

    /// How many transfers had a RAM address above the DMA mask (clamped, as QEMU does).
    pub fn clamped_dma(&self) -> u64 {
        self.clamped_dma
    }

    /// How many transfers were skipped because their device side left the buffer.
    pub fn out_of_buffer(&self) -> u64 {
        self.out_of_buffer
    }

    /// How many accesses were of a width the register does not take.
    pub fn bad_width(&self) -> u64 {
        self.bad_width
    }

    /// How many factorials were computed.
    pub fn factorials(&self) -> u64 {
        self.factorials
    }

    /// How many DMA commands completed (transferred or not).
    pub fn transfers(&self) -> u64 {
        self.transfers
    }

    /// Whether a DMA command runs.
    pub fn dma_running(&self) -> bool {
        self.dma_cmd & DMA_START != 0
    }

    // QEMU's width rule: 4 bytes below 0x80, 4 or 8 from there on.
    fn width_ok(&mut self, ctx: &ModelContext, offset: u64, size: usize, what: &str) -> bool {
        let ok = size == 4 || (offset >= regs::DMA_SRC && size == 8);
        if !ok {
            self.bad_width += 1;
            ctx.guest_error(format_args!(
                "edu: {size}-byte {what} at {offset:#x} (the register takes {})",
                if offset >= regs::DMA_SRC {
                    "4 or 8 bytes"
                } else {
                    "4 bytes"
                }
            ));
        }
        ok
    }

    fn raise_irq(&mut self, ctx: &ModelContext, bits: u32) {
        self.irq_status |= bits;
        if self.irq_status != 0 {
            if ctx.msi_enabled() {
                ctx.raise(InterruptKind::Msi, 0);
            } else {
                ctx.set_intx(true);
            }
        }
    }

    fn lower_irq(&mut self, ctx: &ModelContext, bits: u32) {
        self.irq_status &= !bits;
        if self.irq_status == 0 && !ctx.msi_enabled() {
            ctx.set_intx(false);
        }
    }

    // A DMA register write: ignored while a transfer runs.
    fn dma_register(&mut self, offset: u64, value: u64) {
        if self.dma_running() {
            return;
        }
        match offset {
            regs::DMA_SRC => self.dma_src = value,
            regs::DMA_DST => self.dma_dst = value,
            regs::DMA_COUNT => self.dma_count = value,
            regs::DMA_CMD if value & DMA_START != 0 => self.dma_cmd = value,
            _ => {}
        }
    }

    // A RAM-side address, clamped to the mask as QEMU does.
    fn clamp(&mut self, ctx: &ModelContext, address: u64) -> u64 {
        let clamped = address & self.dma_mask;
        if clamped != address {
            self.clamped_dma += 1;
            ctx.guest_error(format_args!(
                "edu: clamping DMA address {address:#018x} to {clamped:#018x} (DMA mask {:#x})",
                self.dma_mask
            ));
        }
        clamped
    }

    // The buffer range of a transfer of `count` bytes at device address `device`, if it
    // lies in the buffer (else a guest error).
    fn buffer_range(
        &mut self,
        ctx: &ModelContext,
        device: u64,
        count: u64,
    ) -> Option<std::ops::Range<usize>> {
        let end = device.checked_add(count);
        let inside =
            device >= DMA_BUFFER && end.is_some_and(|end| end <= DMA_BUFFER + DMA_BUFFER_SIZE as u64);
        if !inside {
            self.out_of_buffer += 1;
            ctx.guest_error(format_args!(
                "edu: DMA range {device:#x} (+{count:#x}) is outside the buffer {DMA_BUFFER:#x}..{:#x}; \
                 transfer skipped",
                DMA_BUFFER + DMA_BUFFER_SIZE as u64
            ));
            return None;
        }
        let start = (device - DMA_BUFFER) as usize;
        Some(start..start + count as usize)
    }

    fn run_dma(&mut self, ctx: &ModelContext) {
        let count = self.dma_count;
        if self.dma_cmd & DMA_TO_RAM == 0 {
            let src = self.clamp(ctx, self.dma_src);
            if let Some(range) = self.buffer_range(ctx, self.dma_dst, count) {
                let mut data = vec![0u8; range.len()];
                // A refused read (counted by the backing) leaves the buffer as it was.
                if ctx.dma_read(src, &mut data).is_ok() {
                    self.buffer[range].copy_from_slice(&data);
                }
            }
        } else {
            let dst = self.clamp(ctx, self.dma_dst);
            if let Some(range) = self.buffer_range(ctx, self.dma_src, count) {
                let _ = ctx.dma_write(dst, &self.buffer[range]);
            }
        }
        self.transfers += 1;
        self.dma_cmd &= !DMA_START;
        if self.dma_cmd & DMA_IRQ != 0 {
            self.raise_irq(ctx, IRQ_DMA);
        }
    }
}

/// `n!` modulo 2^32 (every factorial from 34! on is a multiple of 2^32).
fn factorial(n: u32) -> u32 {
    if n >= 34 {
        return 0;
    }
    (1..=n).fold(1u32, |acc, k| acc.wrapping_mul(k))
}

impl DeviceModel for EduModel {
    fn layout(&self) -> FakeLayout {
        FakeLayout::empty().bar(BarInfo::memory32(0, EDU_BAR_SIZE))
    }

    fn config(&self) -> ModelConfig {
        ModelConfig::new(EDU_VENDOR, EDU_DEVICE)
            .revision(EDU_REVISION)
            .class(EDU_CLASS)
            .subsystem(0x1af4, 0x1100)
            .interrupt_pin(1)
            .msi(1, true, false)
    }

    fn read(&mut self, ctx: &ModelContext, bar: u32, offset: u64, size: usize) -> u64 {
        if bar != 0 || !self.width_ok(ctx, offset, size, "read") {
            return u64::MAX;
        }
        match offset {
            regs::ID => u64::from(EDU_ID),
            regs::LIVENESS => u64::from(self.liveness),
            regs::FACTORIAL => u64::from(self.factorial),
            regs::STATUS => u64::from(self.status),
            regs::IRQ_STATUS => u64::from(self.irq_status),
            regs::DMA_SRC => self.dma_src,
            regs::DMA_DST => self.dma_dst,
            regs::DMA_COUNT => self.dma_count,
            regs::DMA_CMD => self.dma_cmd,
            _ => u64::MAX,
        }
    }

    fn write(&mut self, ctx: &ModelContext, bar: u32, offset: u64, size: usize, value: u64) {
        if bar != 0 || !self.width_ok(ctx, offset, size, "write") {
            return;
        }
        let value32 = value as u32;
        match offset {
            regs::LIVENESS => self.liveness = !value32,
            // Ignored while computing.
            regs::FACTORIAL if self.status & STATUS_COMPUTING == 0 => {
                self.factorial = value32;
                self.status |= STATUS_COMPUTING;
            }
            regs::STATUS => {
                if value32 & STATUS_IRQ_FACT != 0 {
                    self.status |= STATUS_IRQ_FACT;
                } else {
                    self.status &= !STATUS_IRQ_FACT;
                }
            }
            regs::IRQ_RAISE => self.raise_irq(ctx, value32),
            regs::IRQ_ACK => self.lower_irq(ctx, value32),
            regs::DMA_SRC | regs::DMA_DST | regs::DMA_COUNT | regs::DMA_CMD => {
                self.dma_register(offset, value)
            }
            _ => {}
        }
    }

    fn step(&mut self, ctx: &ModelContext) -> bool {
        let mut did = false;
        if self.status & STATUS_COMPUTING != 0 {
            self.factorial = factorial(self.factorial);
            self.factorials += 1;
            self.status &= !STATUS_COMPUTING;
            if self.status & STATUS_IRQ_FACT != 0 {
                self.raise_irq(ctx, IRQ_FACT);
            }
            did = true;
        }
        if self.dma_running() {
            self.run_dma(ctx);
            did = true;
        }
        did
    }

    // QEMU's edu has no reset handler: its registers survive; the backing has deasserted
    // INTx, as the PCI core does.
    fn reset(&mut self, _ctx: &ModelContext) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn factorials_wrap_at_32_bits() {
        assert_eq!(factorial(0), 1);
        assert_eq!(factorial(5), 120);
        assert_eq!(factorial(12), 479_001_600);
        assert_eq!(factorial(13), 6_227_020_800u64 as u32);
        let slow = |n: u32| (1..=n).fold(1u32, |a, k| a.wrapping_mul(k));
        for n in 0..80 {
            assert_eq!(factorial(n), slow(n), "{n}!");
        }
        assert_eq!(factorial(u32::MAX), 0);
    }
}
