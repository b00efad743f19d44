//! Registers and BARs through the backing trait (issue 16 §2), specified with the
//! in-memory device (`testing::backing`): accesses of every width, BAR facts without
//! mapping, windows of BARs, an I/O-port BAR, device-specific regions, and what each
//! misuse answers.

use pcibus::bus::{BackingError, BarInfo, BarKind, DeviceBacking, DeviceRegion, RegisterIo};
use pcibus::testing::backing::{FAKE_BAR_SIZE, FakeBacking, FakeLayout};
use pcibus::{DeviceRecord, PciAddress};

fn record() -> DeviceRecord {
    DeviceRecord::new("0000:00:03.0".parse::<PciAddress>().unwrap())
}

// QEMU's e1000e: 128 KiB of registers (BAR 0), a 32-byte I/O BAR (BAR 2), MSI-X in BAR 3
// (here 64-bit and prefetchable, to have one of each), and a vendor region.
fn e1000e() -> FakeBacking {
    let layout = FakeLayout::empty()
        .bar(BarInfo::memory32(0, 0x2_0000))
        .bar(BarInfo::io(2, 0x20))
        .bar(BarInfo::memory64(3, 0x4000).with_prefetchable(true))
        .region(DeviceRegion::new(9, 0x100, 1 << 31 | 0x8086, 3).read_only())
        .region(DeviceRegion::new(10, 0x10, 5, 1));
    FakeBacking::with_layout(&record(), layout)
}

fn out_of_range(r: Result<impl std::fmt::Debug, BackingError>) -> (u64, usize) {
    match r {
        Err(BackingError::OutOfRange { offset, len, .. }) => (offset, len),
        other => panic!("expected OutOfRange, got {other:?}"),
    }
}

fn unsupported(r: Result<impl std::fmt::Debug, BackingError>) -> &'static str {
    match r {
        Err(BackingError::Unsupported { operation, .. }) => operation,
        other => panic!("expected Unsupported, got {other:?}"),
    }
}

#[test]
fn narrow_accesses_are_the_bytes_of_the_wide_ones() {
    let dev = FakeBacking::new(&record());
    let bar = dev.map_bar(0).unwrap();
    bar.write32(0x10, 0x4433_2211).unwrap();
    assert_eq!(bar.read8(0x10).unwrap(), 0x11);
    assert_eq!(bar.read8(0x13).unwrap(), 0x44);
    assert_eq!(bar.read16(0x12).unwrap(), 0x4433);
    // A narrow write changes only its own bytes.
    bar.write8(0x11, 0xaa).unwrap();
    bar.write16(0x12, 0xbbcc).unwrap();
    assert_eq!(bar.read32(0x10).unwrap(), 0xbbcc_aa11);
    bar.write64(0x18, 0x0807_0605_0403_0201).unwrap();
    assert_eq!(bar.read16(0x1e).unwrap(), 0x0807);
    bar.write8(0x1f, 0xff).unwrap();
    assert_eq!(bar.read64(0x18).unwrap(), 0xff07_0605_0403_0201);
    // The last byte of the BAR is reachable, the one after it is not.
    bar.write8(FAKE_BAR_SIZE - 1, 7).unwrap();
    assert_eq!(bar.read8(FAKE_BAR_SIZE - 1).unwrap(), 7);
    assert_eq!(out_of_range(bar.read8(FAKE_BAR_SIZE)), (FAKE_BAR_SIZE, 1));
}

#[test]
fn every_width_refuses_misaligned_and_outside_accesses() {
    let dev = FakeBacking::new(&record());
    let bar = dev.map_bar(1).unwrap();
    assert_eq!(out_of_range(bar.read16(1)), (1, 2));
    assert_eq!(out_of_range(bar.write16(3, 0)), (3, 2));
    assert_eq!(out_of_range(bar.read32(2)), (2, 4));
    assert_eq!(out_of_range(bar.write32(6, 0)), (6, 4));
    assert_eq!(out_of_range(bar.read64(4)), (4, 8));
    assert_eq!(out_of_range(bar.write64(12, 0)), (12, 8));
    assert_eq!(out_of_range(bar.write8(FAKE_BAR_SIZE, 0)), (FAKE_BAR_SIZE, 1));
    assert_eq!(out_of_range(bar.read16(FAKE_BAR_SIZE)), (FAKE_BAR_SIZE, 2));
    assert_eq!(out_of_range(bar.read32(u64::MAX - 3)), (u64::MAX - 3, 4));
    assert_eq!(
        out_of_range(bar.read64(FAKE_BAR_SIZE - 4)),
        (FAKE_BAR_SIZE - 4, 8)
    );
}

#[test]
fn a_gone_device_reads_all_ones_at_every_width_and_drops_writes() {
    let dev = FakeBacking::new(&record());
    let bar = dev.map_bar(0).unwrap();
    bar.write32(0, 0x1234_5678).unwrap();
    dev.set_gone();
    assert_eq!(bar.read8(0).unwrap(), 0xff);
    assert_eq!(bar.read16(2).unwrap(), 0xffff);
    assert_eq!(bar.read32(0).unwrap(), u32::MAX);
    bar.write8(0, 0).unwrap();
    bar.write16(0, 0).unwrap();
    // Misuse is still misuse on a gone device.
    assert_eq!(out_of_range(bar.read16(1)), (1, 2));
}

#[test]
fn the_ordered_doorbell_writes_are_writes() {
    let dev = FakeBacking::new(&record());
    let bar = dev.map_bar(0).unwrap();
    bar.write32_after_dma(0x1000, 7).unwrap();
    bar.write16_after_dma(0x1006, 9).unwrap();
    assert_eq!(bar.read32(0x1000).unwrap(), 7);
    assert_eq!(bar.read16(0x1006).unwrap(), 9);
    assert_eq!(out_of_range(bar.write32_after_dma(0x1002, 0)), (0x1002, 4));
}

#[test]
fn bar_info_says_kind_size_and_mapping_without_mapping() {
    let dev = e1000e();
    let bar0 = dev.bar_info(0).unwrap();
    assert_eq!(
        (bar0.kind, bar0.size, bar0.prefetchable),
        (BarKind::Memory32, 0x2_0000, false)
    );
    assert_eq!(bar0.mmap_areas, vec![0..0x2_0000]);
    assert_eq!(dev.bar_info(1).unwrap(), BarInfo::absent(1));
    let io = dev.bar_info(2).unwrap();
    assert_eq!((io.kind, io.size), (BarKind::Io, 0x20));
    assert!(!io.is_mappable(), "I/O ports are never mmapped");
    let msix = dev.bar_info(3).unwrap();
    assert!(msix.is_64bit() && msix.prefetchable);
    // Its upper half.
    assert_eq!(dev.bar_info(4).unwrap().kind, BarKind::Absent);
    assert_eq!(dev.bar_info(5).unwrap(), BarInfo::absent(5));
    assert_eq!(out_of_range(dev.bar_info(6)), (0, 0));
    // No mapping was made: the device has no handle besides this one.
    assert_eq!(dev.extra_handles(), 0);
}

#[test]
fn the_config_space_bar_registers_agree_with_bar_info() {
    let dev = e1000e();
    let reg = |i: u64| {
        let mut b = [0u8; 4];
        dev.read_config(0x10 + 4 * i, &mut b).unwrap();
        u32::from_le_bytes(b)
    };
    assert_eq!(reg(0) & 0xf, 0);
    assert_eq!(reg(2) & 1, 1);
    assert_eq!(reg(3) & 0xf, 0b1100);
    for i in 0..6 {
        let info = dev.bar_info(i as u32).unwrap();
        if info.exists() {
            assert_eq!(
                pcibus::bus::bar::decode_bar_register(reg(i)),
                (info.kind, info.prefetchable)
            );
        }
    }
}

#[test]
fn absent_bars_cannot_be_mapped() {
    let dev = e1000e();
    assert_eq!(out_of_range(dev.map_bar(1)), (0, 0));
    assert_eq!(out_of_range(dev.map_bar(4)), (0, 0));
    assert_eq!(out_of_range(dev.map_bar(6)), (0, 0));
}

#[test]
fn an_io_bar_has_1_2_and_4_byte_accesses_and_refuses_8() {
    let dev = e1000e();
    let io = dev.map_bar(2).unwrap();
    assert_eq!(io.len(), 0x20);
    // e1000e's IOADDR/IODATA pair.
    io.write32(0, 0x8).unwrap();
    io.write8(4, 0x12).unwrap();
    io.write16(6, 0x3456).unwrap();
    assert_eq!(io.read32(0).unwrap(), 0x8);
    assert_eq!(io.read32(4).unwrap(), 0x3456_0012);
    assert_eq!(io.read16(4).unwrap(), 0x0012);
    assert_eq!(io.read8(7).unwrap(), 0x34);
    assert!(unsupported(io.read64(0)).contains("I/O-port"));
    assert!(unsupported(io.write64(8, 1)).contains("I/O-port"));
    // Nothing was written by the refused write.
    assert_eq!(io.read32(8).unwrap(), 0);
    assert_eq!(out_of_range(io.read32(0x20)), (0x20, 4));
}

#[test]
fn a_window_is_its_own_register_space() {
    let dev = FakeBacking::new(&record());
    let bar = dev.map_bar(0).unwrap();
    // A virtio-style common configuration structure at 0x1000 + 0x38.
    let window = dev.map_bar_range(0, 0x1000, 0x38).unwrap();
    assert_eq!(window.len(), 0x38);
    window.write16(0x16, 0xbeef).unwrap();
    window.write8(0x14, 1).unwrap();
    assert_eq!(bar.read16(0x1016).unwrap(), 0xbeef);
    assert_eq!(bar.read8(0x1014).unwrap(), 1);
    bar.write32(0x1030, 0xcafe).unwrap();
    assert_eq!(window.read32(0x30).unwrap(), 0xcafe);
    assert_eq!(window.read64(0x30).unwrap(), 0xcafe);
    // Its end is the end.
    assert_eq!(out_of_range(window.read32(0x38)), (0x38, 4));
    assert_eq!(out_of_range(window.read64(0x34)), (0x34, 8));
    assert_eq!(out_of_range(window.write8(0x38, 0)), (0x38, 1));
}

#[test]
fn window_accesses_are_aligned_in_the_bar() {
    let dev = FakeBacking::new(&record());
    let window = dev.map_bar_range(0, 0x104, 0x10).unwrap();
    window.write32(0, 1).unwrap();
    // 0x104 is not 8-byte aligned in the BAR, 0x108 is.
    assert_eq!(out_of_range(window.read64(0)), (0, 8));
    assert_eq!(window.read64(4).unwrap(), 0);
    assert_eq!(out_of_range(window.read16(1)), (1, 2));
}

#[test]
fn windows_must_fit_their_bar() {
    let dev = e1000e();
    assert_eq!(
        out_of_range(dev.map_bar_range(0, 0x1_ff00, 0x101)),
        (0x1_ff00, 0x101)
    );
    assert_eq!(out_of_range(dev.map_bar_range(0, 0x100, 0)), (0x100, 0));
    assert_eq!(out_of_range(dev.map_bar_range(0, u64::MAX, 2)), (u64::MAX, 2));
    assert_eq!(out_of_range(dev.map_bar_range(1, 0, 4)), (0, 0), "absent BAR");
    // A window of the I/O BAR is still an I/O BAR.
    let io = dev.map_bar_range(2, 0x10, 0x10).unwrap();
    io.write32(0xc, 5).unwrap();
    assert_eq!(dev.map_bar(2).unwrap().read32(0x1c).unwrap(), 5);
    assert!(unsupported(io.read64(0)).contains("I/O-port"));
    // The whole BAR as a window is the BAR.
    assert_eq!(dev.map_bar_range(0, 0, 0x2_0000).unwrap().len(), 0x2_0000);
}

#[test]
fn device_specific_regions_are_listed_read_and_written() {
    let dev = e1000e();
    let regions = dev.regions();
    assert_eq!(regions.iter().map(|r| r.index).collect::<Vec<_>>(), [9, 10]);
    assert_eq!(regions[0].vendor(), Some(0x8086));
    assert!(regions[0].readable && !regions[0].writable);
    dev.write_region(10, 4, &[1, 2, 3]).unwrap();
    let mut buf = [0u8; 8];
    dev.read_region(10, 0, &mut buf).unwrap();
    assert_eq!(buf, [0, 0, 0, 0, 1, 2, 3, 0]);
    assert!(unsupported(dev.write_region(9, 0, &[1])).contains("read-only"));
    assert_eq!(out_of_range(dev.read_region(10, 0xc, &mut buf)), (0xc, 8));
    assert_eq!(out_of_range(dev.read_region(11, 0, &mut buf)), (0, 8));
    assert_eq!(out_of_range(dev.write_region(10, u64::MAX, &[1])), (u64::MAX, 1));
    assert!(FakeBacking::new(&record()).regions().is_empty());
}

#[test]
fn after_revoke_registers_read_all_ones_and_the_rest_fails() {
    let dev = e1000e();
    let bar = dev.map_bar(0).unwrap();
    let io = dev.map_bar(2).unwrap();
    let window = dev.map_bar_range(0, 0x100, 0x10).unwrap();
    dev.revoke().unwrap();
    assert_eq!(bar.read16(0).unwrap(), 0xffff);
    assert_eq!(io.read8(4).unwrap(), 0xff);
    assert_eq!(window.read32(0).unwrap(), u32::MAX);
    io.write32(0, 1).unwrap();
    assert!(matches!(dev.bar_info(0), Err(BackingError::Gone(_))));
    assert!(matches!(dev.map_bar_range(0, 0, 4), Err(BackingError::Gone(_))));
    assert!(matches!(
        dev.read_region(10, 0, &mut [0]),
        Err(BackingError::Gone(_))
    ));
}

// The NVMe emulator: narrow reads are bytes of its dword registers, narrow writes are
// refused (NVMe has none), BAR 0 is 64-bit memory, and what it does not model
// (windows, regions) answers the trait's defaults.
#[test]
fn the_nvme_emulator_answers_the_new_calls() {
    use pcibus::testing::nvme::{EmuConfig, EmulatedNvme};
    let e = EmulatedNvme::new(EmuConfig::default()).unwrap();
    let bar = e.map_bar(0).unwrap();
    let vs = bar.read32(0x08).unwrap();
    assert_eq!(bar.read16(0x0a).unwrap(), (vs >> 16) as u16);
    assert_eq!(bar.read8(0x09).unwrap(), (vs >> 8) as u8);
    assert_eq!(out_of_range(bar.read16(0x0b)), (0x0b, 2));
    assert!(unsupported(bar.write8(0x14, 1)).contains("NVMe"));
    assert!(unsupported(bar.write16(0x14, 1)).contains("NVMe"));
    let info = e.bar_info(0).unwrap();
    assert_eq!((info.kind, info.size), (BarKind::Memory64, bar.len()));
    assert_eq!(e.bar_info(2).unwrap(), BarInfo::absent(2));
    assert_eq!(unsupported(e.map_bar_range(0, 0, 0x1000)), "map_bar_range");
    assert!(e.regions().is_empty());
    assert_eq!(unsupported(e.read_region(9, 0, &mut [0])), "read_region");
    assert_eq!(unsupported(e.write_region(9, 0, &[0])), "write_region");
}
