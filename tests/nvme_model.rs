//! The emulated NVMe controller as a device model (`testing::nvme::NvmeModel`, issue 16 §5:
//! the NVMe emulator is one model among others): the in-tree driver brings it up behind a
//! `FakeBacking` and moves data through the kit's DMA checks and interrupt model, and the
//! bus probes it through `FakeAttach::with_models`.

use std::time::Duration;

use pcibus::bus::dma::DmaConstraints;
use pcibus::bus::map::DeviceMap;
use pcibus::bus::{BusEvent, DeviceBacking, DmaMemory, RegisterIo, RemovalCause};
use pcibus::nvme::driver::NvmeDriver;
use pcibus::nvme::spec::io;
use pcibus::nvme::{Controller, Options};
use pcibus::testing::FakeSysfs;
use pcibus::testing::backing::{FakeAttach, FakeBacking, FakeDma, FakeRegisters};
use pcibus::testing::model::DeviceModel;
use pcibus::testing::nvme::{EmuConfig, NvmeModel};
use pcibus::{PciAddress, Scanner, SysfsRoot};

mod common;
use common::{pattern, quick};

const WAIT: Duration = Duration::from_secs(30);

fn model() -> NvmeModel {
    NvmeModel::new(EmuConfig::default()).unwrap()
}

// Ready at the first step after the enable: for tests that step the model by hand.
fn ready_at_once() -> NvmeModel {
    NvmeModel::new(EmuConfig {
        ready_delay: Duration::ZERO,
        ..EmuConfig::default()
    })
    .unwrap()
}

fn stats(device: &FakeBacking) -> pcibus::testing::nvme::EmuStats {
    device
        .with_model_state(|m: &mut NvmeModel| m.stats())
        .expect("an NVMe model")
}

// Brings the controller up, writes a pattern through an I/O queue, reads it back, flushes.
fn round_trip(device: &FakeBacking, options: &Options) {
    let c = Controller::init(device.clone(), options).unwrap();
    let info = c.info();
    assert_eq!(info.identify.model, "pcibus emulated NVMe");
    assert_eq!(info.identify.serial, "EMU0001");
    let ns: Vec<(u32, u64, u32)> = c
        .namespaces()
        .iter()
        .map(|n| (n.nsid, n.blocks, n.block_size))
        .collect();
    let expected = &EmuConfig::default().namespaces[0];
    assert_eq!(ns[0], (1, expected.blocks, expected.block_size));

    let mut q = c.io_queue(32).unwrap();
    // 64 KiB at a dword offset: PRP1 with an offset and a PRP list.
    let data = pattern(64 * 1024, 3);
    let buf = c.alloc_buffer(64 * 1024 + 4096).unwrap();
    buf.write_at(4, &data).unwrap();
    q.write(1, 40, 128, &buf, 4).unwrap();
    let on_disk = device
        .with_model_state(|m: &mut NvmeModel| m.namespace_read(1, 40 * 512, data.len()))
        .flatten()
        .unwrap();
    assert!(on_disk == data, "the namespace holds what was written");
    let back = c.alloc_buffer(64 * 1024).unwrap();
    q.read(1, 40, 128, &back, 0).unwrap();
    let mut got = vec![0u8; data.len()];
    back.read_at(0, &mut got).unwrap();
    assert!(got == data, "read back what was written");
    q.flush(1).unwrap();
    let s = stats(device);
    assert_eq!((s.io(io::WRITE), s.io(io::READ), s.io(io::FLUSH)), (1, 1, 1));
    assert_eq!(s.bad_dma, 0);
    drop(q);
    drop(c);
    device.assert_no_model_faults();
}

#[test]
fn the_driver_brings_the_model_up_and_does_io_on_a_model_thread() {
    let device = FakeBacking::with_model(model());
    let _thread = device.spawn_model_thread().unwrap().unwrap();
    round_trip(&device, &quick());
}

#[test]
fn completions_raise_msix_through_the_kit() {
    let device = FakeBacking::with_model(model());
    let _thread = device.spawn_model_thread().unwrap().unwrap();
    let options = Options {
        interrupts: true,
        ..quick()
    };
    round_trip(&device, &options);
    assert!(device.routed_interrupts() > 0, "the driver routed MSI-X vectors");
    assert!(stats(&device).interrupts > 0, "and the controller raised them");
}

// A controller enabled by hand (admin queues of 16 in the backing's memory, stepped by
// the test), and its admin SQ, CQ and BAR 0.
fn enabled_by_hand(device: &FakeBacking) -> (FakeDma, FakeDma, FakeRegisters) {
    let sq = device.alloc_dma(4096).unwrap();
    let cq = device.alloc_dma(4096).unwrap();
    let bar = device.map_bar(0).unwrap();
    bar.write32(0x24, 0x000f_000f).unwrap(); // AQA: 16/16
    bar.write64(0x28, sq.iova()).unwrap();
    bar.write64(0x30, cq.iova()).unwrap();
    bar.write32(0x14, 0x0046_0001).unwrap(); // CC: EN, IOSQES 6, IOCQES 4
    device.run_model(16);
    assert_eq!(bar.read32(0x1c).unwrap() & 1, 1, "CSTS.RDY");
    (sq, cq, bar)
}

// Submits an Identify Controller into `data` in admin SQ slot 0.
fn submit_identify(sq: &FakeDma, bar: &FakeRegisters, data: &FakeDma) {
    let mut cmd = [0u8; 64];
    cmd[0] = 0x06;
    cmd[2] = 1;
    cmd[24..32].copy_from_slice(&data.iova().to_le_bytes());
    cmd[40] = 1; // CNS 01h
    sq.write_at(0, &cmd).unwrap();
    bar.write32(0x1000, 1).unwrap();
}

// The status field (without the phase tag) of admin CQ entry 0, and its phase tag.
fn first_completion(cq: &FakeDma) -> (u16, bool) {
    let mut entry = [0u8; 16];
    cq.read_at(0, &mut entry).unwrap();
    let status = u16::from_le_bytes([entry[14], entry[15]]);
    (status >> 1, status & 1 == 1)
}

#[test]
fn without_bus_mastering_the_model_fetches_nothing_and_the_kit_counts_it() {
    let device = FakeBacking::with_model(ready_at_once());
    // Bus mastering off (nobody turned it on).
    let (sq, cq, bar) = enabled_by_hand(&device);
    let data = device.alloc_dma(4096).unwrap();
    submit_identify(&sq, &bar, &data);
    device.run_model(16);
    let kit = device.model_stats();
    assert!(kit.dma_without_bus_master > 0, "{kit:?}");
    assert_eq!(stats(&device).admin(0x06), 0, "not fetched");
    // Bus mastering on: it is fetched and completed.
    device.set_bus_master(true).unwrap();
    device.run_model(16);
    assert_eq!(stats(&device).admin(0x06), 1);
    assert_eq!(first_completion(&cq), (0, true), "success, phase 1");
    let mut model_name = [0u8; 20];
    data.read_at(24, &mut model_name).unwrap();
    assert_eq!(&model_name, b"pcibus emulated NVMe");
}

#[test]
fn data_for_the_host_into_memory_the_device_may_only_read_is_refused() {
    let device = FakeBacking::with_model(ready_at_once());
    device.set_bus_master(true).unwrap();
    let (sq, cq, bar) = enabled_by_hand(&device);
    let data = device
        .alloc_dma_with(4096, &DmaConstraints::new().device_read_only())
        .unwrap();
    submit_identify(&sq, &bar, &data);
    device.run_model(16);
    // Data Transfer Error (generic status 04h), and the kit's count of it.
    assert_eq!(first_completion(&cq), (0x04, true));
    assert_eq!(device.model_stats().bad_dma, 1, "{:?}", device.model_faults());
    assert!(
        device.model_faults()[0].contains("read-only"),
        "{:?}",
        device.model_faults()
    );
}

#[test]
fn a_function_level_reset_puts_the_model_back_to_power_on_and_the_driver_starts_again() {
    let device = FakeBacking::with_model(model());
    let _thread = device.spawn_model_thread().unwrap().unwrap();
    drop(Controller::init(device.clone(), &quick()).unwrap());
    device.reset().unwrap();
    let bar = device.map_bar(0).unwrap();
    assert_eq!(
        (bar.read32(0x14).unwrap(), bar.read32(0x1c).unwrap()),
        (0, 0),
        "CC, CSTS"
    );
    assert_eq!(bar.read32(0x24).unwrap(), 0, "AQA");
    round_trip(&device, &quick());
}

#[test]
fn a_queue_outside_the_backing_s_memory_is_refused_and_counted_by_the_kit() {
    let device = FakeBacking::with_model(ready_at_once());
    device.set_bus_master(true).unwrap();
    let cq = device.alloc_dma(4096).unwrap();
    let bar = device.map_bar(0).unwrap();
    bar.write32(0x24, 0x000f_000f).unwrap();
    bar.write64(0x28, cq.iova() + 0x10_0000).unwrap(); // no allocation there
    bar.write64(0x30, cq.iova()).unwrap();
    bar.write32(0x14, 0x0046_0001).unwrap();
    device.run_model(16);
    assert_eq!(bar.read32(0x1c).unwrap() & 3, 2, "CSTS.CFS, never ready");
    assert_eq!(device.model_stats().bad_dma, 1);
    assert_eq!(stats(&device).bad_dma, 1);
}

const NVME_AT: &str = "0000:00:04.0";

fn addr(s: &str) -> PciAddress {
    s.parse().unwrap()
}

#[test]
fn the_bus_probes_the_driver_on_a_modelled_controller_and_gives_it_back_on_request() {
    let fake = FakeSysfs::new().unwrap();
    fake.device(NVME_AT)
        .vendor(0x1b36)
        .device_id(0x0010)
        .class(0x010802)
        .driver("vfio-pci")
        .iommu_group(3)
        .create()
        .unwrap();
    let attach = FakeAttach::with_models(|record| {
        (record.class == pcibus::model::ClassCode::new(0x010802))
            .then(|| Box::new(model()) as Box<dyn DeviceModel>)
    });
    let map = DeviceMap::new(Scanner::new(SysfsRoot::new(fake.root())).no_claims()).unwrap();
    let mut bus = pcibus::bus::Bus::new(map, attach.clone());
    bus.register(Box::new(NvmeDriver::<FakeBacking>::new(quick())));

    let reports = bus.probe_all();
    assert_eq!(reports.len(), 1, "{reports:?}");
    assert!(reports[0].result.is_ok(), "{reports:?}");
    {
        let c = bus
            .device_state::<NvmeDriver<FakeBacking>>(addr(NVME_AT))
            .expect("the driver holds the controller");
        let mut q = c.io_queue(8).unwrap();
        let data = pattern(4096, 9);
        let buf = c.alloc_buffer(4096).unwrap();
        buf.write_at(0, &data).unwrap();
        q.write(1, 0, 8, &buf, 0).unwrap();
        let back = c.alloc_buffer(4096).unwrap();
        q.read(1, 0, 8, &back, 0).unwrap();
        let mut got = vec![0u8; 4096];
        back.read_at(0, &mut got).unwrap();
        assert_eq!(got, data);
    }
    let device = attach.device(addr(NVME_AT)).unwrap();
    device.assert_no_model_faults();
    drop(device);

    assert!(attach.request_removal(addr(NVME_AT)));
    let events = bus.wait(None, WAIT).unwrap();
    let removed: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            BusEvent::Removed(r) => Some(r),
            _ => None,
        })
        .collect();
    assert_eq!(removed.len(), 1, "{events:?}");
    assert_eq!(
        (removed[0].address, &removed[0].cause, removed[0].leaked),
        (addr(NVME_AT), &RemovalCause::Request, 0),
        "no handle kept"
    );
    assert!(attach.device(addr(NVME_AT)).is_none(), "closed");
}
