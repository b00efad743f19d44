//! Device models behind `FakeBacking` (`testing::model`), specified with the first of them,
//! QEMU's `edu` (`testing::models::edu`): its registers, interrupts (MSI and INTx through
//! the backing's VFIO-like interrupt model), DMA both ways into the backing's allocations,
//! the refusals the backing enforces, revoke and reset, and the bus's probe, request and
//! replug flows over a modelled edu attached by `FakeAttach::with_models`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use pcibus::bus::dma::DmaConstraints;
use pcibus::bus::id::IdEntry;
use pcibus::bus::map::{Change, DeviceMap};
use pcibus::bus::{
    BarInfo, Bus, BusEvent, DeviceBacking, DmaMemory, Driver, Interrupt, InterruptKind, ProbeDevice,
    ProbeOutcome, RegisterIo, Removal, RemovalCause,
};
use pcibus::hotplug::event::{Action, Uevent};
use pcibus::hotplug::monitor::Event;
use pcibus::testing::FakeSysfs;
use pcibus::testing::backing::{
    AttachCall, FakeAttach, FakeBacking, FakeLayout, FakeRegisters, MODEL_ADDRESS,
};
use pcibus::testing::model::{DeviceModel, ModelConfig, ModelContext, cap};
use pcibus::testing::models::EduModel;
use pcibus::testing::models::edu::{
    DMA_BUFFER, DMA_IRQ, DMA_START, DMA_TO_RAM, EDU_BAR_SIZE, EDU_ID, IRQ_DMA, IRQ_FACT, STATUS_COMPUTING,
    STATUS_IRQ_FACT, regs,
};
use pcibus::{PciAddress, Scanner, SysfsRoot};

const WAIT: Duration = Duration::from_secs(10);

// An edu with bus mastering on, as the bus leaves a device it opened, and its BAR 0.
fn edu() -> (FakeBacking, FakeRegisters) {
    let device = FakeBacking::with_model(EduModel::new());
    device.set_bus_master(true).unwrap();
    let bar = device.map_bar(0).unwrap();
    (device, bar)
}

fn edu_state<R>(device: &FakeBacking, f: impl FnOnce(&mut EduModel) -> R) -> R {
    device.with_model_state(f).expect("an edu model")
}

// Starts a DMA command and runs it.
fn dma(device: &FakeBacking, bar: &FakeRegisters, src: u64, dst: u64, count: u64, cmd: u64) {
    bar.write64(regs::DMA_SRC, src).unwrap();
    bar.write64(regs::DMA_DST, dst).unwrap();
    bar.write64(regs::DMA_COUNT, count).unwrap();
    bar.write64(regs::DMA_CMD, cmd | DMA_START).unwrap();
    assert!(device.step_model(), "the transfer is the model's pending work");
    assert_eq!(bar.read64(regs::DMA_CMD).unwrap() & DMA_START, 0, "done");
}

// --- registers and config space ---

#[test]
fn edu_config_space_and_bar_are_qemu_s() {
    let (device, _) = edu();
    let mut c = [0u8; 64];
    device.read_config(0, &mut c).unwrap();
    assert_eq!(u16::from_le_bytes([c[0], c[1]]), 0x1234);
    assert_eq!(u16::from_le_bytes([c[2], c[3]]), 0x11e8);
    assert_eq!(c[8], 0x10, "revision");
    assert_eq!(&c[9..12], &[0x00, 0x00, 0xff], "class ff0000");
    assert_eq!(&c[0x2c..0x30], &[0xf4, 0x1a, 0x00, 0x11], "subsystem 1af4:1100");
    assert_eq!(c[0x3d], 1, "INTA");
    assert_eq!(c[6] & 0x10, 0x10, "a capability list");
    assert_eq!(c[0x34], 0x40);
    let mut msi = [0u8; 4];
    device.read_config(0x40, &mut msi).unwrap();
    assert_eq!(msi[0], cap::MSI);
    assert_eq!(msi[1], 0, "the only capability");
    assert_eq!(
        u16::from_le_bytes([msi[2], msi[3]]),
        0x0080,
        "64-bit, one vector, disabled"
    );
    assert_eq!(device.bar_info(0).unwrap(), BarInfo::memory32(0, EDU_BAR_SIZE));
    assert!(!device.bar_info(1).unwrap().exists());
    // VFIO's counts follow from the config space: no MSI-X, no PCIe error reporting.
    let counts: Vec<u32> = [
        InterruptKind::Intx,
        InterruptKind::Msi,
        InterruptKind::MsiX,
        InterruptKind::Error,
    ]
    .iter()
    .map(|&k| device.interrupt_count(k))
    .collect();
    assert_eq!(counts, [1, 1, 0, 0]);
    assert_eq!(device.address(), MODEL_ADDRESS);
}

#[test]
fn edu_identifies_itself_and_inverts_the_liveness_register() {
    let (device, bar) = edu();
    assert_eq!(bar.read32(regs::ID).unwrap(), EDU_ID);
    bar.write32(regs::ID, 0).unwrap();
    assert_eq!(bar.read32(regs::ID).unwrap(), EDU_ID, "read-only");
    bar.write32(regs::LIVENESS, 0x1234_5678).unwrap();
    assert_eq!(bar.read32(regs::LIVENESS).unwrap(), !0x1234_5678);
    // Offsets that name no register, and the write-only ones, read all-ones.
    for offset in [
        0x0c,
        0x10,
        regs::IRQ_RAISE,
        regs::IRQ_ACK,
        0x84,
        0x100,
        EDU_BAR_SIZE - 4,
    ] {
        assert_eq!(bar.read32(offset).unwrap(), u32::MAX, "{offset:#x}");
    }
    device.assert_no_model_faults();
}

#[test]
fn edu_takes_only_4_byte_accesses_below_0x80_and_4_or_8_above() {
    let (device, bar) = edu();
    bar.write32(regs::LIVENESS, 0).unwrap();
    assert_eq!(bar.read8(regs::ID).unwrap(), 0xff);
    assert_eq!(bar.read16(regs::ID).unwrap(), 0xffff);
    assert_eq!(bar.read64(regs::ID).unwrap(), u64::MAX);
    bar.write8(regs::LIVENESS, 1).unwrap();
    bar.write16(regs::LIVENESS, 1).unwrap();
    bar.write64(regs::ID, 1).unwrap(); // 0x00..0x08: the liveness register's too
    assert_eq!(
        bar.read32(regs::LIVENESS).unwrap(),
        u32::MAX,
        "no narrow or wide write reached it"
    );
    // From 0x80 on both widths work, and a 4-byte write sets the whole address.
    bar.write64(regs::DMA_SRC, 0x1_2345_6000).unwrap();
    assert_eq!(bar.read64(regs::DMA_SRC).unwrap(), 0x1_2345_6000);
    assert_eq!(bar.read32(regs::DMA_SRC).unwrap(), 0x2345_6000);
    bar.write32(regs::DMA_SRC, 0x7000).unwrap();
    assert_eq!(bar.read64(regs::DMA_SRC).unwrap(), 0x7000);
    assert_eq!(bar.read16(regs::DMA_SRC).unwrap(), 0xffff);
    let stats = device.model_stats();
    assert_eq!(stats.guest_errors, 7, "{:?}", device.model_faults());
    assert_eq!(edu_state(&device, |e| e.bad_width()), 7);
    assert_eq!(stats.bad_dma, 0);
}

#[test]
fn edu_computes_factorials_in_the_background() {
    let (device, bar) = edu();
    bar.write32(regs::FACTORIAL, 10).unwrap();
    assert_eq!(
        bar.read32(regs::STATUS).unwrap() & STATUS_COMPUTING,
        STATUS_COMPUTING
    );
    // Ignored while computing.
    bar.write32(regs::FACTORIAL, 3).unwrap();
    assert_eq!(bar.read32(regs::FACTORIAL).unwrap(), 10, "the operand until done");
    bar.write32(regs::STATUS, STATUS_COMPUTING).unwrap();
    assert_eq!(
        bar.read32(regs::STATUS).unwrap(),
        STATUS_COMPUTING,
        "computing is read-only"
    );
    assert!(device.step_model());
    assert!(!device.step_model(), "nothing left to do");
    assert_eq!(bar.read32(regs::STATUS).unwrap(), 0);
    assert_eq!(bar.read32(regs::FACTORIAL).unwrap(), 3_628_800);
    // 13! wraps at 32 bits.
    bar.write32(regs::FACTORIAL, 13).unwrap();
    device.step_model();
    assert_eq!(bar.read32(regs::FACTORIAL).unwrap(), 6_227_020_800u64 as u32);
    assert_eq!(bar.read32(regs::IRQ_STATUS).unwrap(), 0, "no interrupt asked");
    device.assert_no_model_faults();
}

#[test]
fn a_model_thread_completes_work_without_stepping() {
    let (device, bar) = edu();
    let thread = device.spawn_model_thread().unwrap().unwrap();
    bar.write32(regs::FACTORIAL, 12).unwrap();
    let start = Instant::now();
    while bar.read32(regs::STATUS).unwrap() & STATUS_COMPUTING != 0 && start.elapsed() < WAIT {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(bar.read32(regs::FACTORIAL).unwrap(), 479_001_600);
    assert!(thread.is_running());
    // The thread holds no handle of the device.
    assert_eq!(device.extra_handles(), 1, "the BAR only");
    drop(bar);
    assert_eq!(device.extra_handles(), 0);
    device.revoke().unwrap();
    let start = Instant::now();
    while thread.is_running() && start.elapsed() < WAIT {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(!thread.is_running(), "stops once the device is closed");
}

// --- interrupts ---

#[test]
fn edu_interrupts_are_msi_when_msi_is_enabled() {
    let (device, bar) = edu();
    let irq = device.enable_interrupts(InterruptKind::Msi, 1).unwrap().remove(0);
    let mut control = [0u8; 2];
    device.read_config(0x42, &mut control).unwrap();
    assert_eq!(
        u16::from_le_bytes(control) & 1,
        1,
        "MSI Enable set, as vfio-pci does"
    );
    bar.write32(regs::IRQ_RAISE, 0x40).unwrap();
    assert!(irq.try_wait());
    assert_eq!(bar.read32(regs::IRQ_STATUS).unwrap(), 0x40);
    // Each raise sends a message, whatever the status held.
    bar.write32(regs::IRQ_RAISE, 0x40).unwrap();
    assert!(irq.try_wait());
    bar.write32(regs::IRQ_ACK, 0x40).unwrap();
    assert_eq!(bar.read32(regs::IRQ_STATUS).unwrap(), 0);
    assert!(!irq.try_wait());
    // A factorial asked to interrupt.
    bar.write32(regs::STATUS, STATUS_IRQ_FACT).unwrap();
    bar.write32(regs::FACTORIAL, 4).unwrap();
    assert!(!irq.try_wait(), "not before the work is done");
    device.step_model();
    assert!(irq.try_wait());
    assert_eq!(bar.read32(regs::IRQ_STATUS).unwrap(), IRQ_FACT);
    assert_eq!(bar.read32(regs::FACTORIAL).unwrap(), 24);
    assert!(!device.model_stats().faulted());
    // Disabled: the enable bit goes.
    device.disable_interrupts(InterruptKind::Msi).unwrap();
    device.read_config(0x42, &mut control).unwrap();
    assert_eq!(u16::from_le_bytes(control) & 1, 0);
}

#[test]
fn edu_intx_is_a_level_that_vfio_automasks() {
    let (device, bar) = edu();
    let irq = device
        .enable_interrupts(InterruptKind::Intx, 1)
        .unwrap()
        .remove(0);
    bar.write32(regs::IRQ_RAISE, 0x2).unwrap();
    assert!(irq.try_wait());
    // Automasked: the next raise is not signalled...
    bar.write32(regs::IRQ_RAISE, 0x4).unwrap();
    assert!(!irq.try_wait());
    // ...and an unmask while the line is still asserted fires again at once.
    irq.unmask().unwrap();
    assert!(irq.try_wait(), "the line is still asserted");
    // The handler's order: acknowledge, then unmask: quiet.
    bar.write32(regs::IRQ_ACK, 0x6).unwrap();
    irq.unmask().unwrap();
    assert!(!irq.try_wait());
    // A partial acknowledgement keeps the line asserted.
    bar.write32(regs::IRQ_RAISE, 0x3).unwrap();
    assert!(irq.try_wait());
    bar.write32(regs::IRQ_ACK, 0x1).unwrap();
    irq.unmask().unwrap();
    assert!(irq.try_wait(), "status 0x2 still asserts INTx");
    bar.write32(regs::IRQ_ACK, 0x2).unwrap();
    irq.unmask().unwrap();
    assert!(!irq.try_wait());
}

#[test]
fn a_reset_keeps_edu_s_registers_but_deasserts_intx() {
    let (device, bar) = edu();
    bar.write32(regs::LIVENESS, 5).unwrap();
    bar.write32(regs::IRQ_RAISE, 0x8).unwrap();
    device.reset().unwrap();
    assert_eq!(device.resets(), 1);
    // QEMU's edu has no reset handler: the status survives (a pending interrupt the next
    // driver finds), the line is down.
    assert_eq!(bar.read32(regs::IRQ_STATUS).unwrap(), 0x8);
    assert_eq!(bar.read32(regs::LIVENESS).unwrap(), !5);
    let irq = device
        .enable_interrupts(InterruptKind::Intx, 1)
        .unwrap()
        .remove(0);
    assert!(!irq.try_wait(), "INTx deasserted by the reset");
    bar.write32(regs::IRQ_RAISE, 0x8).unwrap();
    assert!(irq.try_wait());
}

// --- DMA ---

#[test]
fn edu_dma_goes_both_ways_between_allocations_and_its_buffer() {
    let (device, bar) = edu();
    let irq = device.enable_interrupts(InterruptKind::Msi, 1).unwrap().remove(0);
    let from = edu_dma(&device, 4096);
    let to = edu_dma(&device, 4096);
    assert!(from.iova() + 4096 <= 1 << 28 && to.iova() + 4096 <= 1 << 28);
    let data: Vec<u8> = (0..200u8).collect();
    from.write_at(16, &data).unwrap();

    // RAM to the device's buffer, at offset 0x100 of it, interrupting when done.
    dma(&device, &bar, from.iova() + 16, DMA_BUFFER + 0x100, 200, DMA_IRQ);
    assert_eq!(
        &edu_state(&device, |e| e.buffer()[0x100..0x100 + 200].to_vec()),
        &data
    );
    assert!(irq.try_wait());
    assert_eq!(bar.read32(regs::IRQ_STATUS).unwrap(), IRQ_DMA);
    bar.write32(regs::IRQ_ACK, IRQ_DMA).unwrap();

    // And back to RAM, elsewhere, without an interrupt.
    dma(
        &device,
        &bar,
        DMA_BUFFER + 0x100,
        to.iova() + 1000,
        200,
        DMA_TO_RAM,
    );
    let mut back = vec![0u8; 200];
    to.read_at(1000, &mut back).unwrap();
    assert_eq!(back, data);
    assert!(!irq.try_wait());
    let stats = device.model_stats();
    assert_eq!((stats.dma_reads, stats.dma_writes), (1, 1));
    device.assert_no_model_faults();
}

#[test]
fn dma_registers_are_frozen_while_a_transfer_runs() {
    let (device, bar) = edu();
    let ram = edu_dma(&device, 4096);
    bar.write64(regs::DMA_SRC, ram.iova()).unwrap();
    bar.write64(regs::DMA_DST, DMA_BUFFER).unwrap();
    bar.write64(regs::DMA_COUNT, 8).unwrap();
    // A command without the start bit is ignored.
    bar.write64(regs::DMA_CMD, DMA_IRQ).unwrap();
    assert_eq!(bar.read64(regs::DMA_CMD).unwrap(), 0);
    bar.write64(regs::DMA_CMD, DMA_START).unwrap();
    assert_eq!(
        bar.read64(regs::DMA_CMD).unwrap(),
        DMA_START,
        "runs until the model steps"
    );
    bar.write64(regs::DMA_COUNT, 4096).unwrap();
    bar.write64(regs::DMA_CMD, DMA_START | DMA_TO_RAM).unwrap();
    assert_eq!(bar.read64(regs::DMA_COUNT).unwrap(), 8);
    assert_eq!(bar.read64(regs::DMA_CMD).unwrap(), DMA_START);
    assert!(edu_state(&device, |e| e.dma_running()));
    device.step_model();
    assert_eq!(bar.read64(regs::DMA_CMD).unwrap(), 0);
    assert_eq!(edu_state(&device, |e| e.transfers()), 1);
}

#[test]
fn dma_to_freed_memory_outside_allocations_or_read_only_memory_is_refused_and_counted() {
    let (device, bar) = edu();
    edu_state(&device, |e| e.buffer_mut().fill(0xaa));
    let freed = edu_dma(&device, 4096);
    let freed_iova = freed.iova();
    drop(freed);
    let live = edu_dma(&device, 4096);
    let read_only = device
        .alloc_dma_with(4096, &DmaConstraints::new().address_bits(28).device_read_only())
        .unwrap();
    read_only.write_at(0, &[7; 16]).unwrap();

    dma(&device, &bar, DMA_BUFFER, freed_iova, 16, DMA_TO_RAM);
    assert_eq!(device.model_stats().bad_dma, 1);
    assert!(
        device.model_faults()[0].contains("freed"),
        "{:?}",
        device.model_faults()
    );

    // Past the end of a live allocation (straddling into nothing).
    dma(&device, &bar, DMA_BUFFER, live.iova() + 4090, 16, DMA_TO_RAM);
    assert_eq!(device.model_stats().bad_dma, 2);
    assert!(device.model_faults()[1].contains("no live DMA allocation"));
    let mut bytes = [0u8; 6];
    live.read_at(4090, &mut bytes).unwrap();
    assert_eq!(bytes, [0; 6], "nothing written");

    // A write to memory the device may only read; reading it is fine.
    dma(&device, &bar, DMA_BUFFER, read_only.iova(), 16, DMA_TO_RAM);
    assert_eq!(device.model_stats().bad_dma, 3);
    assert!(device.model_faults()[2].contains("read-only"));
    let mut bytes = [0u8; 16];
    read_only.read_at(0, &mut bytes).unwrap();
    assert_eq!(bytes, [7; 16]);
    dma(&device, &bar, read_only.iova(), DMA_BUFFER, 16, 0);
    assert_eq!(device.model_stats().bad_dma, 3);
    assert_eq!(edu_state(&device, |e| e.buffer()[..16].to_vec()), [7; 16]);

    let stats = device.model_stats();
    assert!(stats.faulted());
    assert_eq!((stats.dma_reads, stats.dma_writes), (1, 0));
    assert!(
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| device.assert_no_model_faults())).is_err()
    );
}

#[test]
fn dma_and_msi_with_bus_mastering_off_are_refused_loudly() {
    let device = FakeBacking::with_model(EduModel::new());
    assert!(
        !device.bus_master().unwrap(),
        "off until the bus (or the test) turns it on"
    );
    let bar = device.map_bar(0).unwrap();
    let irq = device.enable_interrupts(InterruptKind::Msi, 1).unwrap().remove(0);
    let ram = edu_dma(&device, 4096);
    ram.write_at(0, &[9; 8]).unwrap();
    bar.write64(regs::DMA_SRC, ram.iova()).unwrap();
    bar.write64(regs::DMA_DST, DMA_BUFFER).unwrap();
    bar.write64(regs::DMA_COUNT, 8).unwrap();
    bar.write64(regs::DMA_CMD, DMA_START | DMA_IRQ).unwrap();
    device.step_model();
    let stats = device.model_stats();
    assert_eq!(stats.dma_without_bus_master, 1);
    assert_eq!(
        stats.msi_without_bus_master, 1,
        "the completion's MSI is a memory write too"
    );
    assert_eq!(stats.dma_reads, 0);
    assert!(!irq.try_wait());
    assert_eq!(edu_state(&device, |e| e.buffer()[..8].to_vec()), [0; 8]);
    assert!(device.model_faults()[0].contains("bus mastering off"));
    // On: the same transfer goes through.
    device.set_bus_master(true).unwrap();
    bar.write64(regs::DMA_CMD, DMA_START | DMA_IRQ).unwrap();
    device.step_model();
    assert_eq!(edu_state(&device, |e| e.buffer()[..8].to_vec()), [9; 8]);
    assert!(irq.try_wait());
}

// DMA memory edu reaches: under its 28 address lines, as its driver must ask (an
// allocation without the limit lands above 4 GiB on a FakeBacking, out of its reach).
fn edu_dma(device: &FakeBacking, len: usize) -> pcibus::testing::backing::FakeDma {
    device
        .alloc_dma_with(len, &pcibus::bus::DmaConstraints::new().address_bits(28))
        .unwrap()
}

#[test]
fn an_allocation_without_the_address_limit_is_out_of_edus_reach() {
    // The driver that forgot edu's 28-bit mask: its memory lands above 4 GiB, the device
    // clamps the address (as QEMU does) and the test sees it.
    let (device, bar) = edu();
    let ram = device.alloc_dma(4096).unwrap();
    assert!(
        ram.iova() >= pcibus::testing::backing::FAKE_HIGH_IOVA,
        "{:#x}",
        ram.iova()
    );
    dma(&device, &bar, DMA_BUFFER, ram.iova(), 8, DMA_TO_RAM);
    assert_eq!(edu_state(&device, |e| e.clamped_dma()), 1);
    assert!(!device.model_faults().is_empty());
}

#[test]
fn dma_addresses_above_the_mask_are_clamped_and_reported_as_qemu_does() {
    let (device, bar) = edu();
    let ram = edu_dma(&device, 4096);
    let iova = ram.iova();
    // A driver that set a 32-bit address where the device takes 28 bits: the device
    // writes at the clamped address, which is this allocation here.
    dma(&device, &bar, DMA_BUFFER, iova | 1 << 30, 8, DMA_TO_RAM);
    assert_eq!(edu_state(&device, |e| e.clamped_dma()), 1);
    let stats = device.model_stats();
    assert_eq!(stats.guest_errors, 1);
    assert_eq!(stats.dma_writes, 1, "clamped, then done");
    assert!(device.model_faults()[0].contains("clamping"));
    // With a mask of its own (QEMU's dma_mask property) the same address is fine.
    let wide = FakeBacking::with_model(EduModel::with_dma_mask(u64::MAX));
    wide.set_bus_master(true).unwrap();
    let wide_bar = wide.map_bar(0).unwrap();
    let ram = wide.alloc_dma(4096).unwrap();
    dma(&wide, &wide_bar, ram.iova(), DMA_BUFFER, 8, 0);
    assert_eq!(edu_state(&wide, |e| e.clamped_dma()), 0);
    wide.assert_no_model_faults();
}

#[test]
fn a_transfer_outside_the_device_buffer_is_skipped_as_a_guest_error() {
    let (device, bar) = edu();
    let ram = edu_dma(&device, 8192);
    dma(&device, &bar, ram.iova(), DMA_BUFFER + 4000, 200, DMA_IRQ);
    assert_eq!(edu_state(&device, |e| e.out_of_buffer()), 1);
    assert_eq!(device.model_stats().guest_errors, 1);
    assert_eq!(device.model_stats().dma_reads, 0);
    assert_eq!(
        bar.read32(regs::IRQ_STATUS).unwrap(),
        IRQ_DMA,
        "completes all the same"
    );
}

// --- revoke ---

#[test]
fn after_revoke_registers_read_all_ones_and_nothing_reaches_the_model() {
    let (device, bar) = edu();
    bar.write32(regs::LIVENESS, 1).unwrap();
    bar.write32(regs::FACTORIAL, 5).unwrap();
    device.revoke().unwrap();
    assert_eq!(bar.read32(regs::ID).unwrap(), u32::MAX);
    assert_eq!(bar.read64(regs::DMA_CMD).unwrap(), u64::MAX);
    bar.write32(regs::LIVENESS, 2).unwrap();
    assert!(!device.step_model(), "no longer stepped");
    edu_state(&device, |e| {
        assert_eq!(e.factorials(), 0);
        assert_eq!(e.bad_width(), 0);
    });
    // The model's own reads say so too: the liveness write never arrived.
    assert!(device.map_bar(0).is_err());
    drop(bar);
    assert_eq!(device.extra_handles(), 0);
}

// --- models of the test's own ---

// A device with a read-to-clear event register at BAR 2 offset 0, 16-bit registers, and
// MSI-X: a write of N to offset 4 raises MSI-X vector N.
#[derive(Default)]
struct Events {
    events: u16,
    accesses: Vec<(u32, u64, usize)>,
}

impl DeviceModel for Events {
    fn layout(&self) -> FakeLayout {
        FakeLayout::empty()
            .bar(BarInfo::memory64(0, 0x4000))
            .bar(BarInfo::memory32(2, 0x100))
    }
    fn config(&self) -> ModelConfig {
        ModelConfig::new(0x8086, 0x1234)
            .power_management()
            .msix(8, 0, 0x2000, 0, 0x3000)
            .pci_express()
            .vendor_specific(b"pcibus")
    }
    fn read(&mut self, _: &ModelContext, bar: u32, offset: u64, size: usize) -> u64 {
        self.accesses.push((bar, offset, size));
        match (bar, offset) {
            (2, 0) => u64::from(std::mem::take(&mut self.events)),
            _ => 0,
        }
    }
    fn write(&mut self, ctx: &ModelContext, bar: u32, offset: u64, size: usize, value: u64) {
        self.accesses.push((bar, offset, size));
        if (bar, offset) == (2, 4) {
            self.events |= 1 << value;
            ctx.raise(InterruptKind::MsiX, value as u32);
        }
    }
}

#[test]
fn a_model_sees_every_width_and_its_config_says_its_interrupts() {
    let device = FakeBacking::with_model(Events::default());
    device.set_bus_master(true).unwrap();
    assert_eq!(device.interrupt_count(InterruptKind::MsiX), 8);
    assert_eq!(device.interrupt_count(InterruptKind::Msi), 0);
    assert_eq!(device.interrupt_count(InterruptKind::Intx), 0, "no interrupt pin");
    assert_eq!(device.interrupt_count(InterruptKind::Error), 1, "PCI Express");
    let mut c = [0u8; 256];
    device.read_config(0, &mut c).unwrap();
    let caps: Vec<(usize, u8)> = {
        let mut at = c[0x34] as usize;
        let mut out = Vec::new();
        while at != 0 {
            out.push((at, c[at]));
            at = c[at + 1] as usize;
        }
        out
    };
    assert_eq!(
        caps,
        [
            (0x40, cap::PM),
            (0x48, cap::MSIX),
            (0x54, cap::EXP),
            (0x90, cap::VENDOR)
        ]
    );
    assert_eq!(&c[0x90 + 3..0x90 + 9], b"pcibus");
    assert_eq!(c[0x92], 9, "the vendor capability's length");
    // BAR 0 is 64-bit: its register says so, BAR 1 is its upper half.
    assert_eq!(u32::from_le_bytes(c[0x10..0x14].try_into().unwrap()) & 0x6, 0x4);

    let irqs = device.enable_interrupts(InterruptKind::MsiX, 8).unwrap();
    let regs = device.map_bar(2).unwrap();
    regs.write16(4, 3).unwrap();
    regs.write8(4, 5).unwrap();
    assert!(irqs[3].try_wait() && irqs[5].try_wait() && !irqs[0].try_wait());
    assert_eq!(regs.read16(0).unwrap(), 1 << 3 | 1 << 5);
    assert_eq!(regs.read16(0).unwrap(), 0, "read to clear");
    let bar0 = device.map_bar_range(0, 0x1000, 0x1000).unwrap();
    bar0.read64(8).unwrap();
    bar0.read32(4).unwrap();
    let accesses = device
        .with_model_state(|m: &mut Events| m.accesses.clone())
        .unwrap();
    assert_eq!(
        accesses,
        [
            (2, 4, 2),
            (2, 4, 1),
            (2, 0, 2),
            (2, 0, 2),
            (0, 0x1008, 8),
            (0, 0x1004, 4)
        ]
    );
    assert!(
        device.with_model_state(|_: &mut EduModel| ()).is_none(),
        "not an edu"
    );
    // A masked vector remembers, as FakeBacking's interrupt model does.
    device.mask_interrupt(InterruptKind::MsiX, 1).unwrap();
    regs.write32(4, 1).unwrap();
    assert!(!irqs[1].try_wait());
    device.unmask_interrupt(InterruptKind::MsiX, 1).unwrap();
    assert!(irqs[1].try_wait());
}

// --- the bus over modelled devices ---

const EDU_AT: &str = "0000:00:04.0";

fn addr(s: &str) -> PciAddress {
    s.parse().unwrap()
}

type Log = Arc<Mutex<Vec<String>>>;

// A tiny edu driver: checks the device, computes a factorial, moves bytes through the
// device's buffer by DMA, and keeps its MSI vector, as a real driver would.
struct EduDriver {
    log: Log,
    table: Vec<IdEntry>,
    held: BTreeMap<PciAddress, (FakeBacking, FakeRegisters, Interrupt)>,
}

impl EduDriver {
    fn new(log: &Log) -> Self {
        EduDriver {
            log: Arc::clone(log),
            table: vec![IdEntry::vendor_device(0x1234, 0x11e8)],
            held: BTreeMap::new(),
        }
    }
}

fn poll_until(bar: &FakeRegisters, offset: u64, mut done: impl FnMut(u64) -> bool) -> Result<u64, String> {
    let start = Instant::now();
    loop {
        let v = bar.read64(offset).map_err(|e| e.to_string())?;
        if done(v) {
            return Ok(v);
        }
        if start.elapsed() > WAIT {
            return Err(format!("register {offset:#x} stuck at {v:#x}"));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

impl EduDriver {
    fn bring_up(&self, backing: &FakeBacking) -> Result<(FakeRegisters, Interrupt, u32), String> {
        let e = |e: pcibus::bus::BackingError| e.to_string();
        let bar = backing.map_bar(0).map_err(e)?;
        if bar.read32(regs::ID).map_err(e)? != EDU_ID {
            return Err("not an edu".into());
        }
        bar.write32(regs::LIVENESS, 0x5a5a_0000).map_err(e)?;
        if bar.read32(regs::LIVENESS).map_err(e)? != !0x5a5a_0000 {
            return Err("liveness check failed".into());
        }
        let irq = backing
            .enable_interrupts(InterruptKind::Msi, 1)
            .map_err(e)?
            .remove(0);
        bar.write32(regs::STATUS, STATUS_IRQ_FACT).map_err(e)?;
        bar.write32(regs::FACTORIAL, 6).map_err(e)?;
        if !irq.wait(Some(WAIT)).map_err(|e| e.to_string())? {
            return Err("no factorial interrupt".into());
        }
        let fact = bar.read32(regs::FACTORIAL).map_err(e)?;
        bar.write32(regs::IRQ_ACK, IRQ_FACT).map_err(e)?;
        // A round trip through the device's buffer, within the 28-bit mask.
        let constraints = DmaConstraints::new().address_bits(28);
        let out = backing.alloc_dma_with(4096, &constraints).map_err(e)?;
        let back = backing.alloc_dma_with(4096, &constraints).map_err(e)?;
        out.write_at(0, b"edu round trip").unwrap();
        for (src, dst, cmd) in [(out.iova(), DMA_BUFFER, 0), (DMA_BUFFER, back.iova(), DMA_TO_RAM)] {
            bar.write64(regs::DMA_SRC, src).map_err(e)?;
            bar.write64(regs::DMA_DST, dst).map_err(e)?;
            bar.write64(regs::DMA_COUNT, 14).map_err(e)?;
            bar.write64(regs::DMA_CMD, cmd | DMA_START).map_err(e)?;
            poll_until(&bar, regs::DMA_CMD, |v| v & DMA_START == 0)?;
        }
        let mut got = [0u8; 14];
        back.read_at(0, &mut got).unwrap();
        if &got != b"edu round trip" {
            return Err(format!("DMA brought back {got:?}"));
        }
        Ok((bar, irq, fact))
    }
}

impl Driver<FakeBacking> for EduDriver {
    type Device = ();
    fn name(&self) -> &str {
        "edu-test"
    }
    fn id_table(&self) -> &[IdEntry] {
        &self.table
    }
    fn probe(&mut self, device: ProbeDevice<'_, FakeBacking>) -> ProbeOutcome<()> {
        let address = device.record.address;
        match self.bring_up(device.backing) {
            Ok((bar, irq, fact)) => {
                self.log.lock().push(format!("probe {address}: 6! = {fact}"));
                self.held.insert(address, (device.backing.clone(), bar, irq));
                ProbeOutcome::Bound(())
            }
            Err(e) => {
                self.log.lock().push(format!("probe {address} failed: {e}"));
                ProbeOutcome::Failed(e.into())
            }
        }
    }
    fn remove(&mut self, _device: (), removal: &Removal) {
        self.log
            .lock()
            .push(format!("remove {} ({})", removal.address, removal.cause));
        self.held.remove(&removal.address);
    }
}

fn edu_tree() -> FakeSysfs {
    let fake = FakeSysfs::new().unwrap();
    fake.device(EDU_AT)
        .vendor(0x1234)
        .device_id(0x11e8)
        .class(0xff0000)
        .driver("vfio-pci")
        .iommu_group(3)
        .create()
        .unwrap();
    fake.device("0000:00:05.0").create().unwrap();
    fake
}

fn edu_attach() -> FakeAttach {
    FakeAttach::with_models(|record| {
        (record.vendor.map(|v| v.0) == Some(0x1234) && record.device.map(|d| d.0) == Some(0x11e8))
            .then(|| Box::new(EduModel::new()) as Box<dyn DeviceModel>)
    })
}

fn uevent(action: Action, address: &str) -> Event {
    let devpath = format!("/devices/pci0000:00/{address}");
    let vars = vec![
        ("ACTION".to_string(), action.as_str().to_string()),
        ("DEVPATH".to_string(), devpath.clone()),
        ("SUBSYSTEM".to_string(), "pci".to_string()),
        ("PCI_SLOT_NAME".to_string(), address.to_string()),
        ("SEQNUM".to_string(), "7".to_string()),
    ];
    Event::Uevent(Uevent::from_vars(action, devpath, vars).unwrap())
}

#[test]
fn the_bus_probes_a_modelled_edu_and_gives_it_back_on_request() {
    let fake = edu_tree();
    let attach = edu_attach();
    let log = Log::default();
    let map = DeviceMap::new(Scanner::new(SysfsRoot::new(fake.root())).no_claims()).unwrap();
    let mut bus = Bus::new(map, attach.clone())
        .selection(pcibus::bus::devargs::Selection::from_args([("-a", EDU_AT)]).unwrap());
    bus.register(Box::new(EduDriver::new(&log)));
    let reports = bus.probe_all();
    assert_eq!(reports.len(), 1, "{reports:?}");
    assert_eq!(
        reports[0].result.as_deref().ok(),
        Some("edu-test"),
        "{:?}",
        log.lock()
    );
    assert_eq!(*log.lock(), [format!("probe {EDU_AT}: 6! = 720")]);
    {
        let device = attach.device(addr(EDU_AT)).unwrap();
        assert!(device.bus_master().unwrap(), "the bus turned bus mastering on");
        device.assert_no_model_faults();
        assert_eq!(edu_state(&device, |e| (e.factorials(), e.transfers())), (1, 2));
    }

    // The kernel asks for it back (VFIO's REQ): the driver lets go, the device is closed.
    assert!(attach.request_removal(addr(EDU_AT)));
    let events = bus.wait(None, WAIT).unwrap();
    let BusEvent::Removed(r) = &events[0] else {
        panic!("{events:?}")
    };
    assert_eq!(
        (r.address, &r.cause, r.leaked),
        (addr(EDU_AT), &RemovalCause::Request, 0)
    );
    assert_eq!(
        log.lock().last().unwrap(),
        &format!("remove {EDU_AT} (vfio removal request)")
    );
    assert!(matches!(
        attach.calls().last(),
        Some(AttachCall::Detach(a, _, 0)) if *a == addr(EDU_AT)
    ));
    assert!(
        attach.device(addr(EDU_AT)).is_none(),
        "closed: no handle left anywhere"
    );
}

#[test]
fn a_replugged_modelled_edu_is_a_fresh_device_and_is_probed_again() {
    let fake = edu_tree();
    let attach = edu_attach();
    let log = Log::default();
    let map = DeviceMap::new(Scanner::new(SysfsRoot::new(fake.root())).no_claims()).unwrap();
    let mut bus = Bus::new(map, attach.clone())
        .selection(pcibus::bus::devargs::Selection::from_args([("-a", EDU_AT)]).unwrap())
        .settle(Duration::from_millis(50));
    bus.register(Box::new(EduDriver::new(&log)));
    assert_eq!(bus.probe_all().len(), 1);
    // Leave a pending interrupt status behind, which a fresh device does not have.
    attach
        .device(addr(EDU_AT))
        .unwrap()
        .map_bar(0)
        .unwrap()
        .write32(regs::IRQ_RAISE, 0x80)
        .unwrap();

    let dir = fake.root().join(fake.device_dir(EDU_AT).unwrap());
    let link = fake.root().join("bus/pci/devices").join(EDU_AT);
    let target = std::fs::read_link(&link).unwrap();
    let away = fake.root().join("unplugged");
    std::fs::rename(&dir, &away).unwrap();
    std::fs::remove_file(&link).unwrap();
    let events = bus.handle(&uevent(Action::Remove, EDU_AT)).unwrap();
    assert!(
        events
            .iter()
            .any(|e| matches!(e, BusEvent::Removed(r) if r.cause == RemovalCause::Uevent(Action::Remove))),
        "{events:?}"
    );

    std::fs::rename(&away, &dir).unwrap();
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let events = bus.handle(&uevent(Action::Add, EDU_AT)).unwrap();
    assert!(
        matches!(events[..], [BusEvent::Map(Change::Added(a))] if a == addr(EDU_AT)),
        "{events:?}"
    );
    let start = Instant::now();
    let mut probed = None;
    while probed.is_none() && start.elapsed() < WAIT {
        for event in bus.wait(None, WAIT).unwrap() {
            if let BusEvent::Probed(p) = event {
                probed = Some(p);
            }
        }
    }
    let probed = probed.expect("probed again after settling");
    assert_eq!(probed.result.as_deref().ok(), Some("edu-test"));
    assert_eq!(
        *log.lock(),
        [
            format!("probe {EDU_AT}: 6! = 720"),
            format!("remove {EDU_AT} (remove uevent)"),
            format!("probe {EDU_AT}: 6! = 720"),
        ]
    );
    let device = attach.device(addr(EDU_AT)).unwrap();
    assert_eq!(
        edu_state(&device, |e| e.irq_status()),
        0,
        "a new model from the factory: the old status is gone with the old device"
    );
    device.assert_no_model_faults();
}
