//! The in-tree edu driver (`pcibus::drivers::edu`) against the edu model of the test kit
//! (`testing::models::EduModel` behind a `FakeBacking`, stepped by a model thread): probe,
//! factorial, DMA round trip, the INTx path, the errors of a device that misbehaves or is
//! gone, and removal through a `Bus` over `FakeAttach::with_models`.

use std::time::Duration;

use pcibus::bus::map::DeviceMap;
use pcibus::bus::{BusEvent, DeviceBacking, InterruptKind, RegisterIo, RemovalCause};
use pcibus::drivers::edu::{
    DMA_BUFFER_LEN, Edu, EduDriver, EduError, EduOptions, MAX_DMA_LEN, Register, TEST_IRQ,
};
use pcibus::testing::FakeSysfs;
use pcibus::testing::backing::{AttachCall, FakeAttach, FakeBacking};
use pcibus::testing::model::{DeviceModel, ModelConfig, ModelContext, ModelThread};
use pcibus::testing::models::EduModel;
use pcibus::testing::models::edu::regs;
use pcibus::{PciAddress, Scanner, SysfsRoot};

/// A generous timeout: no test waits for it unless something is broken.
const WAIT: Duration = Duration::from_secs(20);

fn options() -> EduOptions {
    EduOptions::new().timeout(WAIT)
}

/// A modelled edu as the bus leaves a device it opened (bus mastering on), with a model
/// thread doing its background work.
fn modelled(model: EduModel) -> (FakeBacking, ModelThread) {
    let device = FakeBacking::with_model(model);
    device.set_bus_master(true).unwrap();
    let thread = device.spawn_model_thread().unwrap().unwrap();
    (device, thread)
}

fn edu_state<R>(device: &FakeBacking, f: impl FnOnce(&mut EduModel) -> R) -> R {
    device.with_model_state(f).expect("an edu model")
}

#[test]
fn probe_takes_msi_and_the_self_test_passes() {
    let (device, _thread) = modelled(EduModel::new());
    let mut edu = Edu::open(&device, &options()).unwrap();
    assert_eq!(edu.interrupt_kind(), InterruptKind::Msi, "MSI is edu's best kind");
    assert_eq!(edu.version(), (1, 0));
    assert_eq!(device.enabled_interrupts(), Some((InterruptKind::Msi, 1)));
    let report = edu.self_test().unwrap();
    assert_eq!(report.factorial, (12, 479_001_600));
    assert_eq!(report.dma_bytes, MAX_DMA_LEN);
    assert!(report.to_string().contains("edu 1.0, MSI"), "{report}");
    // And again: every interrupt was acknowledged, nothing is left pending.
    edu.self_test().unwrap();
    assert_eq!(edu_state(&device, |e| e.irq_status()), 0);
    device.assert_no_model_faults();
}

#[test]
fn factorials_come_from_the_device_and_wrap_as_it_computes_them() {
    let (device, _thread) = modelled(EduModel::new());
    let mut edu = Edu::open(&device, &options()).unwrap();
    assert_eq!(edu.factorial(0).unwrap(), 1);
    assert_eq!(edu.factorial(5).unwrap(), 120);
    assert_eq!(edu.factorial(13).unwrap(), 0x7328_cc00, "13! modulo 2^32");
    assert_eq!(edu_state(&device, |e| e.factorials()), 3);
    device.assert_no_model_faults();
}

#[test]
fn a_dma_round_trip_goes_through_the_device_s_buffer_within_its_28_bits() {
    let (device, _thread) = modelled(EduModel::new());
    let mut edu = Edu::open(&device, &options()).unwrap();
    let data: Vec<u8> = (0..1000u32).map(|i| (i * 7 + 3) as u8).collect();
    edu.dma_roundtrip(&data).unwrap();
    edu_state(&device, |e| {
        assert_eq!(
            &e.buffer()[..data.len()],
            &data[..],
            "the data went through the device"
        );
        assert_eq!(e.transfers(), 2, "one transfer each way");
        assert_eq!(e.clamped_dma(), 0, "no address beyond the 28-bit mask");
        assert_eq!(e.out_of_buffer(), 0);
    });
    edu.dma_roundtrip(&[0xa5]).unwrap();
    edu.dma_roundtrip(&vec![0x3c; MAX_DMA_LEN]).unwrap();
    device.assert_no_model_faults();
}

#[test]
fn transfers_edu_cannot_make_are_refused_before_the_device_sees_them() {
    let (device, _thread) = modelled(EduModel::new());
    let mut edu = Edu::open(&device, &options()).unwrap();
    for len in [0, DMA_BUFFER_LEN, DMA_BUFFER_LEN + 1] {
        let e = edu.dma_roundtrip(&vec![1; len]).unwrap_err();
        assert!(matches!(e, EduError::DmaLength { len: l, .. } if l == len), "{e}");
        assert!(e.to_string().contains(&format!("{len} bytes")), "{e}");
    }
    assert_eq!(edu_state(&device, |e| e.transfers()), 0);
}

#[test]
fn without_msi_the_driver_takes_intx_and_unmasks_it_after_each_interrupt() {
    let device = FakeBacking::with_model(EduModel::new());
    device.set_bus_master(true).unwrap();
    device.set_interrupt_count(InterruptKind::Msi, 0);
    let _thread = device.spawn_model_thread().unwrap().unwrap();
    let mut edu = Edu::open(&device, &options()).unwrap();
    assert_eq!(edu.interrupt_kind(), InterruptKind::Intx);
    // Several interrupts in a row: each after the previous one was unmasked (VFIO masks
    // INTx after each; without the unmask the second never arrives).
    for _ in 0..3 {
        let report = edu.self_test().unwrap();
        assert!(report.to_string().contains("INTx"), "{report}");
    }
    assert_eq!(edu_state(&device, |e| e.irq_status()), 0);
    device.assert_no_model_faults();
}

#[test]
fn intx_can_be_asked_for_on_a_device_with_msi() {
    let (device, _thread) = modelled(EduModel::new());
    let mut edu = Edu::open(&device, &options().interrupts(InterruptKind::Intx)).unwrap();
    assert_eq!(edu.interrupt_kind(), InterruptKind::Intx);
    edu.test_interrupt().unwrap();
    edu.test_interrupt().unwrap();
    assert_eq!(edu.factorial(6).unwrap(), 720);
    device.assert_no_model_faults();
}

#[test]
fn an_interrupt_left_raised_by_a_previous_user_is_acknowledged_at_probe() {
    let (device, _thread) = modelled(EduModel::new());
    device.map_bar(0).unwrap().write32(regs::IRQ_RAISE, 0x80).unwrap();
    assert_eq!(edu_state(&device, |e| e.irq_status()), 0x80);
    let mut edu = Edu::open(&device, &options()).unwrap();
    assert_eq!(edu_state(&device, |e| e.irq_status()), 0);
    edu.self_test().unwrap();
}

/// An edu that is gone: every register reads all-ones.
struct AllOnes(EduModel);

impl DeviceModel for AllOnes {
    fn layout(&self) -> pcibus::testing::backing::FakeLayout {
        self.0.layout()
    }
    fn config(&self) -> ModelConfig {
        self.0.config()
    }
    fn read(&mut self, _: &ModelContext, _: u32, _: u64, _: usize) -> u64 {
        u64::MAX
    }
    fn write(&mut self, _: &ModelContext, _: u32, _: u64, _: usize, _: u64) {}
}

#[test]
fn a_device_that_reads_all_ones_is_gone_and_the_error_names_the_register() {
    let device = FakeBacking::with_model(AllOnes(EduModel::new()));
    let e = Edu::open(&device, &options()).unwrap_err();
    assert!(
        matches!(
            e,
            EduError::Gone {
                register: Register::Identification,
                value: u32::MAX,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.is_gone());
    assert!(
        e.to_string().contains("identification (0x00) reads 0xffffffff"),
        "{e}"
    );
    assert_eq!(device.extra_handles(), 0, "a failed probe keeps no handle");
}

#[test]
fn a_device_gone_under_the_driver_fails_each_operation_as_gone() {
    let (device, _thread) = modelled(EduModel::new());
    let mut edu = Edu::open(&device, &options()).unwrap();
    device.set_gone();
    let e = edu.factorial(5).unwrap_err();
    assert!(e.is_gone(), "{e}");
    assert!(edu.dma_roundtrip(b"x").unwrap_err().is_gone());
    assert!(edu.check_alive().unwrap_err().is_gone());
}

/// An edu whose identification register says something else.
struct WrongId(EduModel);

impl DeviceModel for WrongId {
    fn layout(&self) -> pcibus::testing::backing::FakeLayout {
        self.0.layout()
    }
    fn config(&self) -> ModelConfig {
        self.0.config()
    }
    fn read(&mut self, ctx: &ModelContext, bar: u32, offset: u64, size: usize) -> u64 {
        match offset {
            0 => 0x0100_00ee,
            _ => self.0.read(ctx, bar, offset, size),
        }
    }
    fn write(&mut self, ctx: &ModelContext, bar: u32, offset: u64, size: usize, value: u64) {
        self.0.write(ctx, bar, offset, size, value)
    }
}

#[test]
fn a_device_with_another_id_is_refused_naming_what_it_read() {
    let device = FakeBacking::with_model(WrongId(EduModel::new()));
    let e = Edu::open(&device, &options()).unwrap_err();
    assert!(matches!(e, EduError::NotEdu { id: 0x0100_00ee, .. }), "{e}");
    assert!(e.to_string().contains("0x010000ee"), "{e}");
    assert_eq!(device.extra_handles(), 0);
}

#[test]
fn work_that_never_ends_is_reported_busy_or_without_interrupt() {
    // No model thread: nothing ever completes.
    let device = FakeBacking::with_model(EduModel::new());
    device.set_bus_master(true).unwrap();
    let short = EduOptions::new().timeout(Duration::from_millis(30));
    let mut edu = Edu::open(&device, &short).unwrap();
    let e = edu.factorial(4).unwrap_err();
    assert!(
        matches!(
            e,
            EduError::NoInterrupt {
                operation: "factorial",
                status: 0,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("interrupt status (0x24) reads 0x0"), "{e}");
    drop(edu);
    // The factorial still computes: a new probe waits for it, then says so.
    let e = Edu::open(&device, &short).unwrap_err();
    assert!(
        matches!(
            e,
            EduError::Busy {
                register: Register::Status,
                value: 0x81,
                ..
            }
        ),
        "{e}"
    );
    // Once the device finishes, the probe goes through (and acknowledges the factorial's
    // interrupt bit left raised).
    device.step_model();
    Edu::open(&device, &short).unwrap();
    assert_eq!(edu_state(&device, |e| e.irq_status()), 0);
}

#[test]
fn an_interrupt_the_device_raised_but_that_never_arrived_is_told_apart() {
    let (device, _thread) = modelled(EduModel::new());
    let mut edu = Edu::open(&device, &options().timeout(Duration::from_millis(50))).unwrap();
    // With bus mastering off the device's MSI (a memory write) never reaches the host.
    device.set_bus_master(false).unwrap();
    let e = edu.test_interrupt().unwrap_err();
    assert!(
        matches!(
            e,
            EduError::InterruptLost {
                kind: InterruptKind::Msi,
                bit: TEST_IRQ,
                status: TEST_IRQ,
                ..
            }
        ),
        "{e}"
    );
    assert_eq!(
        edu_state(&device, |e| e.irq_status()),
        0,
        "acknowledged all the same"
    );
    device.set_bus_master(true).unwrap();
    edu.test_interrupt().unwrap();
}

// --- through a bus ---

const EDU_AT: &str = "0000:00:04.0";

fn addr(s: &str) -> PciAddress {
    s.parse().unwrap()
}

#[test]
fn the_bus_binds_edu_and_a_removal_request_takes_every_handle() {
    let fake = FakeSysfs::new().unwrap();
    fake.device(EDU_AT)
        .vendor(0x1234)
        .device_id(0x11e8)
        .class(0xff0000)
        .driver("vfio-pci")
        .iommu_group(3)
        .create()
        .unwrap();
    // Another device, which the driver's id table does not match.
    fake.device("0000:00:05.0").create().unwrap();
    let attach = FakeAttach::with_models(|record| {
        (record.vendor.map(|v| v.0) == Some(0x1234) && record.device.map(|d| d.0) == Some(0x11e8))
            .then(|| Box::new(EduModel::new()) as Box<dyn DeviceModel>)
    });
    let map = DeviceMap::new(Scanner::new(SysfsRoot::new(fake.root())).no_claims()).unwrap();
    let mut bus = pcibus::bus::Bus::new(map, attach.clone());
    bus.register(Box::new(EduDriver::<FakeBacking>::with_options(options())));

    let reports = bus.probe_all();
    assert_eq!(reports.len(), 1, "only the edu matches: {reports:?}");
    assert_eq!(reports[0].result.as_deref().ok(), Some("edu"), "{reports:?}");
    let held: Vec<_> = bus
        .device_states::<EduDriver<FakeBacking>>()
        .map(|(a, _)| a)
        .collect();
    assert_eq!(held, [addr(EDU_AT)]);
    let report = bus
        .device_state_mut::<EduDriver<FakeBacking>>(addr(EDU_AT))
        .unwrap()
        .self_test()
        .unwrap();
    assert_eq!(report.kind, InterruptKind::Msi);
    let device = attach.device(addr(EDU_AT)).unwrap();
    device.assert_no_model_faults();
    drop(device);

    // The kernel asks for it back (VFIO's REQ): the driver drops it all, the device closes.
    assert!(attach.request_removal(addr(EDU_AT)));
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
        (addr(EDU_AT), &RemovalCause::Request, 0),
        "no handle kept"
    );
    assert_eq!(bus.device_states::<EduDriver<FakeBacking>>().count(), 0);
    let driver = bus.driver_mut::<EduDriver<FakeBacking>>().unwrap();
    let taken = driver.take_removed();
    assert_eq!(taken.len(), 1);
    assert_eq!(taken[0].cause, RemovalCause::Request);
    assert!(matches!(
        attach.calls().last(),
        Some(AttachCall::Detach(a, _, 0)) if *a == addr(EDU_AT)
    ));
    assert!(attach.device(addr(EDU_AT)).is_none(), "closed");
}

#[test]
fn a_failed_probe_through_the_bus_says_why_and_keeps_nothing() {
    let fake = FakeSysfs::new().unwrap();
    fake.device(EDU_AT)
        .vendor(0x1234)
        .device_id(0x11e8)
        .class(0xff0000)
        .driver("vfio-pci")
        .iommu_group(3)
        .create()
        .unwrap();
    let attach =
        FakeAttach::with_models(|_| Some(Box::new(AllOnes(EduModel::new())) as Box<dyn DeviceModel>));
    let map = DeviceMap::new(Scanner::new(SysfsRoot::new(fake.root())).no_claims()).unwrap();
    let mut bus = pcibus::bus::Bus::new(map, attach.clone());
    bus.register(Box::new(EduDriver::<FakeBacking>::new()));
    let reports = bus.probe_all();
    let e = reports[0].result.as_ref().unwrap_err().to_string();
    assert!(e.contains("driver edu failed"), "{e}");
    assert!(e.contains("identification (0x00) reads 0xffffffff"), "{e}");
    assert_eq!(reports[0].leaked, 0);
    assert!(bus.held().is_empty());
}
