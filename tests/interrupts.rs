//! Interrupts of every kind through `DeviceBacking`, against `testing::FakeBacking`'s model:
//! INTx, MSI and MSI-X, one kind at a time; INTx automasked after each interrupt until
//! unmasked; masked vectors remember what was raised; MSI-X grows where the kernel allows.

use std::time::Duration;

use pcibus::bus::{BackingError, DeviceBacking, Interrupt, InterruptError, InterruptKind};
use pcibus::testing::backing::FakeBacking;
use pcibus::{DeviceRecord, PciAddress};

fn device() -> FakeBacking {
    let address: PciAddress = "0000:03:00.0".parse().unwrap();
    FakeBacking::new(&DeviceRecord::new(address))
}

fn interrupt_error(e: BackingError) -> InterruptError {
    match e {
        BackingError::Interrupt(e) => e,
        other => panic!("not an interrupt error: {other}"),
    }
}

/// Signalled, and nothing more pending.
fn fired_once(irq: &Interrupt) -> bool {
    irq.try_wait() && !irq.try_wait()
}

#[test]
fn counts_per_kind_are_the_models() {
    let dev = device();
    assert_eq!(dev.interrupt_count(InterruptKind::MsiX), 16);
    assert_eq!(dev.max_interrupts(), 16, "max_interrupts stays the MSI-X count");
    assert_eq!(dev.interrupt_count(InterruptKind::Msi), 1);
    assert_eq!(dev.interrupt_count(InterruptKind::Intx), 1);
    assert_eq!(dev.interrupt_count(InterruptKind::Error), 1);
    dev.set_interrupt_count(InterruptKind::Msi, 8);
    dev.set_interrupt_count(InterruptKind::MsiX, 0);
    assert_eq!(dev.interrupt_count(InterruptKind::Msi), 8);
    assert_eq!(dev.max_interrupts(), 0);
}

#[test]
fn msix_vectors_fire_their_own_eventfds() {
    let dev = device();
    let irqs = dev.enable_interrupts(InterruptKind::MsiX, 4).unwrap();
    assert_eq!(irqs.len(), 4);
    for (i, irq) in irqs.iter().enumerate() {
        assert_eq!((irq.kind(), irq.vector()), (InterruptKind::MsiX, i as u32));
    }
    assert_eq!(dev.enabled_interrupts(), Some((InterruptKind::MsiX, 4)));
    assert_eq!(dev.routed_interrupts(), 4);
    assert!(dev.raise(InterruptKind::MsiX, 2));
    assert!(irqs[2].wait(Some(Duration::from_secs(60))).unwrap());
    assert!(!irqs[0].try_wait() && !irqs[1].try_wait() && !irqs[3].try_wait());
    // Edge: no unmask needed between interrupts.
    assert!(dev.raise(InterruptKind::MsiX, 2));
    assert!(fired_once(&irqs[2]));
    assert!(!dev.raise(InterruptKind::MsiX, 4), "not enabled");
    assert!(!dev.raise(InterruptKind::Msi, 0), "another kind");
}

#[test]
fn msi_fires_and_then_disables() {
    let dev = device();
    dev.set_interrupt_count(InterruptKind::Msi, 4);
    let irqs = dev.enable_interrupts(InterruptKind::Msi, 2).unwrap();
    assert!(dev.raise(InterruptKind::Msi, 1));
    assert!(fired_once(&irqs[1]));
    dev.disable_interrupts(InterruptKind::Msi).unwrap();
    assert_eq!(dev.enabled_interrupts(), None);
    assert!(!dev.raise(InterruptKind::Msi, 1));
    assert!(!irqs[1].try_wait());
    dev.disable_interrupts(InterruptKind::Msi)
        .expect("disabling what is not enabled does nothing");
}

#[test]
fn intx_is_automasked_until_unmasked_and_a_raise_meanwhile_is_kept() {
    let dev = device();
    let mut irqs = dev.enable_interrupts(InterruptKind::Intx, 1).unwrap();
    let intx = irqs.pop().unwrap();
    assert!(dev.raise(InterruptKind::Intx, 0));
    assert!(fired_once(&intx));
    // Automasked: the device's next interrupt waits for the unmask (the issue measured
    // this on VFIO: without an unmask the second INTx never arrives).
    assert!(!dev.raise(InterruptKind::Intx, 0));
    assert!(!intx.try_wait());
    intx.unmask().unwrap();
    assert!(
        fired_once(&intx),
        "the interrupt raised while masked arrives on unmask"
    );
    // ... and masks again, having fired.
    assert!(!dev.raise(InterruptKind::Intx, 0));
    dev.unmask_interrupt(InterruptKind::Intx, 0).unwrap();
    assert!(fired_once(&intx));
    intx.unmask().unwrap();
    assert!(!intx.try_wait(), "nothing pending: the unmask only re-arms");
    assert!(dev.raise(InterruptKind::Intx, 0));
    assert!(fired_once(&intx));
}

#[test]
fn a_masked_msix_vector_remembers_and_fires_on_unmask() {
    let dev = device();
    let irqs = dev.enable_interrupts(InterruptKind::MsiX, 2).unwrap();
    assert!(dev.interrupt_maskable(InterruptKind::MsiX));
    dev.mask_interrupt(InterruptKind::MsiX, 1).unwrap();
    assert!(!dev.raise(InterruptKind::MsiX, 1));
    assert!(!dev.raise(InterruptKind::MsiX, 1));
    assert!(!irqs[1].try_wait());
    assert!(
        dev.raise(InterruptKind::MsiX, 0),
        "the other vector is not masked"
    );
    assert!(fired_once(&irqs[0]));
    dev.unmask_interrupt(InterruptKind::MsiX, 1).unwrap();
    assert!(fired_once(&irqs[1]), "one pending interrupt, delivered once");
    assert!(dev.raise(InterruptKind::MsiX, 1));
    assert!(fired_once(&irqs[1]));
    // Unmasking an unmasked vector delivers nothing.
    dev.unmask_interrupt(InterruptKind::MsiX, 1).unwrap();
    assert!(!irqs[1].try_wait());
}

#[test]
fn too_many_vectors_names_both_numbers() {
    let dev = device();
    let e = interrupt_error(dev.enable_interrupts(InterruptKind::MsiX, 17).unwrap_err());
    assert!(
        matches!(
            e,
            InterruptError::TooMany {
                kind: InterruptKind::MsiX,
                asked: 17,
                available: 16,
                ..
            }
        ),
        "{e:?}"
    );
    let text = e.to_string();
    assert!(text.contains("17") && text.contains("16"), "{text}");
    let e = interrupt_error(dev.enable_interrupts(InterruptKind::Intx, 2).unwrap_err());
    assert!(
        matches!(
            e,
            InterruptError::TooMany {
                asked: 2,
                available: 1,
                ..
            }
        ),
        "{e:?}"
    );
    let e = interrupt_error(dev.enable_interrupts(InterruptKind::MsiX, 0).unwrap_err());
    assert!(matches!(e, InterruptError::NoneAsked { .. }), "{e:?}");
    assert_eq!(dev.enabled_interrupts(), None, "nothing enabled by a failure");
}

#[test]
fn a_kind_the_device_lacks_is_refused() {
    let dev = device();
    dev.set_interrupt_count(InterruptKind::Msi, 0);
    let e = interrupt_error(dev.enable_interrupts(InterruptKind::Msi, 1).unwrap_err());
    assert!(matches!(e, InterruptError::TooMany { available: 0, .. }), "{e:?}");
}

#[test]
fn one_kind_at_a_time() {
    let dev = device();
    let _msix = dev.enable_interrupts(InterruptKind::MsiX, 2).unwrap();
    for kind in [InterruptKind::Msi, InterruptKind::Intx] {
        let e = interrupt_error(dev.enable_interrupts(kind, 1).unwrap_err());
        assert!(
            matches!(e, InterruptError::OtherKindEnabled { enabled: InterruptKind::MsiX, wanted, .. } if wanted == kind),
            "{e:?}"
        );
    }
    assert_eq!(dev.enabled_interrupts(), Some((InterruptKind::MsiX, 2)));
    // The error notification is not a delivery kind: it goes beside MSI-X.
    let err = dev.error_interrupt().unwrap();
    assert_eq!(err.kind(), InterruptKind::Error);
    assert!(dev.raise_error());
    assert!(fired_once(&err));
    dev.disable_interrupts(InterruptKind::MsiX).unwrap();
    let intx = dev.enable_interrupts(InterruptKind::Intx, 1).unwrap();
    assert_eq!(intx.len(), 1);
    dev.disable_interrupts(InterruptKind::Error).unwrap();
    assert!(!dev.raise_error());
}

#[test]
fn enabling_the_enabled_kind_again_replaces_its_vectors() {
    let dev = device();
    let old = dev.enable_interrupts(InterruptKind::MsiX, 2).unwrap();
    let new = dev.enable_interrupts(InterruptKind::MsiX, 3).unwrap();
    assert_eq!(dev.enabled_interrupts(), Some((InterruptKind::MsiX, 3)));
    assert!(dev.raise(InterruptKind::MsiX, 0));
    assert!(!old[0].try_wait());
    assert!(fired_once(&new[0]));
}

#[test]
fn the_best_kind_is_msix_then_msi_then_intx() {
    let dev = device();
    let (kind, irqs) = dev.enable_best_interrupts(32).unwrap();
    assert_eq!(
        (kind, irqs.len()),
        (InterruptKind::MsiX, 16),
        "as many as there are"
    );
    dev.disable_interrupts(kind).unwrap();

    dev.set_interrupt_count(InterruptKind::MsiX, 0);
    dev.set_interrupt_count(InterruptKind::Msi, 4);
    let (kind, irqs) = dev.enable_best_interrupts(2).unwrap();
    assert_eq!((kind, irqs.len()), (InterruptKind::Msi, 2));
    dev.disable_interrupts(kind).unwrap();

    dev.set_interrupt_count(InterruptKind::Msi, 0);
    let (kind, irqs) = dev.enable_best_interrupts(8).unwrap();
    assert_eq!((kind, irqs.len()), (InterruptKind::Intx, 1));
    dev.disable_interrupts(kind).unwrap();

    dev.set_interrupt_count(InterruptKind::Intx, 0);
    let e = interrupt_error(dev.enable_best_interrupts(1).unwrap_err());
    assert!(matches!(e, InterruptError::NoneAvailable { .. }), "{e:?}");
}

#[test]
fn the_best_kind_falls_back_when_the_better_one_cannot_be_enabled() {
    let dev = device();
    // With INTx enabled, MSI-X and MSI are refused (one kind at a time); enabling the
    // enabled kind replaces its vectors, so INTx is what the fallback gets.
    let _held = dev.enable_interrupts(InterruptKind::Intx, 1).unwrap();
    let (kind, _irqs) = dev.enable_best_interrupts(4).unwrap();
    assert_eq!(kind, InterruptKind::Intx);
}

#[test]
fn msix_grows_where_the_kernel_allows() {
    let dev = device();
    let first = dev.enable_interrupts(InterruptKind::MsiX, 2).unwrap();
    let more = dev.add_interrupts(InterruptKind::MsiX, 3).unwrap();
    assert_eq!(more.iter().map(Interrupt::vector).collect::<Vec<_>>(), [2, 3, 4]);
    assert_eq!(dev.enabled_interrupts(), Some((InterruptKind::MsiX, 5)));
    assert!(dev.raise(InterruptKind::MsiX, 4));
    assert!(fired_once(&more[2]));
    assert!(dev.raise(InterruptKind::MsiX, 0));
    assert!(fired_once(&first[0]), "the first vectors stay routed");
    let e = interrupt_error(dev.add_interrupts(InterruptKind::MsiX, 12).unwrap_err());
    assert!(
        matches!(
            e,
            InterruptError::TooMany {
                asked: 17,
                available: 16,
                ..
            }
        ),
        "{e:?}"
    );

    dev.set_dynamic_msix(false);
    let e = interrupt_error(dev.add_interrupts(InterruptKind::MsiX, 1).unwrap_err());
    assert!(
        matches!(
            e,
            InterruptError::Unsupported {
                kind: InterruptKind::MsiX,
                ..
            }
        ),
        "{e:?}"
    );
}

#[test]
fn msi_and_intx_never_grow_and_nothing_grows_unless_enabled() {
    let dev = device();
    dev.set_interrupt_count(InterruptKind::Msi, 8);
    let e = interrupt_error(dev.add_interrupts(InterruptKind::MsiX, 1).unwrap_err());
    assert!(
        matches!(
            e,
            InterruptError::NotEnabled {
                kind: InterruptKind::MsiX,
                ..
            }
        ),
        "{e:?}"
    );
    let _msi = dev.enable_interrupts(InterruptKind::Msi, 2).unwrap();
    let e = interrupt_error(dev.add_interrupts(InterruptKind::Msi, 1).unwrap_err());
    assert!(
        matches!(
            e,
            InterruptError::Unsupported {
                kind: InterruptKind::Msi,
                ..
            }
        ),
        "{e:?}"
    );
}

#[test]
fn masking_what_is_not_enabled_fails() {
    let dev = device();
    let e = interrupt_error(dev.mask_interrupt(InterruptKind::Intx, 0).unwrap_err());
    assert!(
        matches!(
            e,
            InterruptError::NotEnabled {
                kind: InterruptKind::Intx,
                vector: 0,
                ..
            }
        ),
        "{e:?}"
    );
    let _irqs = dev.enable_interrupts(InterruptKind::MsiX, 2).unwrap();
    let e = interrupt_error(dev.unmask_interrupt(InterruptKind::MsiX, 2).unwrap_err());
    assert!(matches!(e, InterruptError::NotEnabled { vector: 2, .. }), "{e:?}");
}

#[test]
fn route_interrupts_is_msix_enabled_with_the_callers_eventfds() {
    use std::os::fd::AsFd;
    let dev = device();
    let mine: Vec<Interrupt> = (0..3)
        .map(|v| Interrupt::new(InterruptKind::MsiX, v).unwrap())
        .collect();
    let fds: Vec<_> = mine.iter().map(|i| i.as_fd()).collect();
    dev.route_interrupts(&fds).unwrap();
    assert_eq!(dev.enabled_interrupts(), Some((InterruptKind::MsiX, 3)));
    assert!(dev.raise(InterruptKind::MsiX, 1));
    assert!(fired_once(&mine[1]));
    let too_many: Vec<_> = (0..17).map(|_| mine[0].as_fd()).collect();
    assert!(dev.route_interrupts(&too_many).is_err());
    dev.route_interrupts(&[]).unwrap();
    assert_eq!(dev.enabled_interrupts(), None);
}

#[test]
fn an_interrupt_does_not_keep_its_device_and_revoke_disables_everything() {
    let dev = device();
    let intx = dev.enable_interrupts(InterruptKind::Intx, 1).unwrap();
    assert_eq!(
        dev.extra_handles(),
        0,
        "an Interrupt is not a handle of the device"
    );
    dev.revoke().unwrap();
    assert_eq!(dev.enabled_interrupts(), None);
    assert!(!dev.raise(InterruptKind::Intx, 0));
    assert!(matches!(intx[0].unmask(), Err(BackingError::Gone(_))));
    assert!(matches!(
        dev.enable_interrupts(InterruptKind::Msi, 1),
        Err(BackingError::Gone(_))
    ));
}

#[test]
fn a_backing_with_only_the_msix_methods_gets_the_defaults() {
    // The NVMe emulator implements max_interrupts and route_interrupts only.
    use pcibus::testing::nvme::{EmuConfig, EmulatedNvme};
    let emu = EmulatedNvme::new(EmuConfig::default()).unwrap();
    assert_eq!(emu.interrupt_count(InterruptKind::MsiX), 16);
    assert_eq!(emu.interrupt_count(InterruptKind::Msi), 0);
    assert_eq!(emu.interrupt_count(InterruptKind::Intx), 0);
    assert!(!emu.interrupt_maskable(InterruptKind::MsiX));
    let irqs = emu.enable_interrupts(InterruptKind::MsiX, 3).unwrap();
    assert_eq!(irqs.iter().map(Interrupt::vector).collect::<Vec<_>>(), [0, 1, 2]);
    let e = interrupt_error(emu.enable_interrupts(InterruptKind::MsiX, 17).unwrap_err());
    assert!(
        matches!(
            e,
            InterruptError::TooMany {
                asked: 17,
                available: 16,
                ..
            }
        ),
        "{e:?}"
    );
    for e in [
        emu.enable_interrupts(InterruptKind::Msi, 1).unwrap_err(),
        emu.mask_interrupt(InterruptKind::MsiX, 0).unwrap_err(),
        emu.unmask_interrupt(InterruptKind::MsiX, 0).unwrap_err(),
        emu.add_interrupts(InterruptKind::MsiX, 1).unwrap_err(),
        emu.error_interrupt().unwrap_err(),
        emu.disable_interrupts(InterruptKind::Intx).unwrap_err(),
    ] {
        assert!(matches!(e, BackingError::Unsupported { .. }), "{e:?}");
    }
    let (kind, irqs) = emu.enable_best_interrupts(64).unwrap();
    assert_eq!((kind, irqs.len()), (InterruptKind::MsiX, 16));
    emu.disable_interrupts(InterruptKind::MsiX).unwrap();
}
