//! A bus hot reset asked for through the driver API ([`DeviceBacking::hot_reset`]) when
//! the bus is shared: the reset also resets the other functions on it, so it is done only
//! when this process holds them all; otherwise it is refused before anything is reset,
//! naming each device in the way and who has it (the VM test d8-hot-reset-shared does the
//! same on a real kernel, with another process holding the second function).

use pcibus::PciAddress;
use pcibus::bus::{BackingError, DeviceBacking, HotResetBlocker, OtherProcess};
use pcibus::record::DeviceRecord;
use pcibus::testing::backing::{FakeBacking, FakeReset};
use pcibus::vfio::VfioError;

fn addr(s: &str) -> PciAddress {
    s.parse().unwrap()
}

// Function 0 of a two-function device behind a root port: a bus reset resets function 1.
fn function_0() -> FakeBacking {
    let backing = FakeBacking::new(&DeviceRecord::new(addr("0000:02:00.0")));
    backing.set_reset(FakeReset::None {
        also: vec![addr("0000:02:00.1")],
    });
    backing
}

fn held_by_another_process() -> HotResetBlocker {
    HotResetBlocker::new(addr("0000:02:00.1"), Some("vfio-pci".into()), true)
        .claimed_by(OtherProcess {
            pid: 812,
            command: Some("pcibus-vmtest".into()),
        })
        .open_in(vec![OtherProcess {
            pid: 812,
            command: Some("pcibus-vmtest".into()),
        }])
}

#[test]
fn a_hot_reset_that_would_reset_another_process_s_device_is_refused_naming_it() {
    let backing = function_0();
    backing.set_hot_reset_blockers(Some(vec![held_by_another_process()]));
    // What a dry run shows: the device, and who has it.
    let info = backing.hot_reset_info().unwrap();
    assert_eq!(info.others(backing.address()), vec![addr("0000:02:00.1")]);
    assert_eq!(info.not_held, vec![held_by_another_process()]);
    let e = backing.hot_reset().unwrap_err();
    let BackingError::Vfio(VfioError::HotResetNotHeld { address, devices, .. }) = &e else {
        panic!("not a refusal: {e:?}");
    };
    assert_eq!(*address, addr("0000:02:00.0"));
    assert_eq!(devices, &vec![held_by_another_process()]);
    let text = e.to_string();
    assert!(
        text.contains(
            "would also reset 0000:02:00.1 (claimed by PID 812 (pcibus-vmtest), which has it open; on vfio-pci)"
        ) && text.contains("nothing was reset"),
        "{text}"
    );
    assert_eq!(backing.hot_resets(), 0, "refused before any reset");
}

#[test]
fn a_device_on_a_host_driver_is_named_with_its_driver() {
    let backing = function_0();
    backing.set_hot_reset_blockers(Some(vec![HotResetBlocker::new(
        addr("0000:02:00.1"),
        Some("pci-stub".into()),
        false,
    )]));
    let text = backing.hot_reset().unwrap_err().to_string();
    assert!(
        text.contains("0000:02:00.1 (bound to pci-stub, not vfio-pci)"),
        "{text}"
    );
    assert_eq!(backing.hot_resets(), 0);
}

#[test]
fn a_device_nobody_has_open_is_still_in_the_way_until_this_process_opens_it() {
    let backing = function_0();
    let text = backing.hot_reset().unwrap_err().to_string();
    assert!(
        text.contains("0000:02:00.1 (on vfio-pci, not open in this process)"),
        "{text}"
    );
    assert_eq!(backing.hot_resets(), 0);
}

#[test]
fn holding_every_affected_device_the_hot_reset_is_done() {
    let backing = function_0();
    backing.set_hot_reset_blockers(Some(Vec::new()));
    let info = backing.hot_reset().unwrap();
    assert_eq!(info.devices.len(), 2, "it reset both functions: {info:?}");
    assert_eq!(backing.hot_resets(), 1);
}
