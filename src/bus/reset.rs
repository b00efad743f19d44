//! The reset the bus does on its own: between two drivers' probes of a device (what the
//! driver that declined or failed did to the device, its registers or a pending
//! interrupt, is not the next one's to find), by the device's function reset, saying
//! which method the kernel used or why there was none. The bus never hot resets a bus or
//! slot on its own (it would reset devices other drivers hold); a driver can
//! ([`DeviceBacking::hot_reset`]).

use super::backing::DeviceBacking;
use crate::addr::PciAddress;
use crate::vfio::reset::list;

/// Resets `backing` before the next driver's probe and turns its DMA on again (as before
/// the first probe). Returns what to log: `Ok` what was done (with the method), `Err`
/// why the device was not reset (no function reset, and what a bus reset would take
/// with it; or the reset failed).
pub(crate) fn reset_for_next_driver<B: DeviceBacking>(
    address: PciAddress,
    backing: &B,
) -> Result<String, String> {
    let info = backing.reset_info().ok();
    let not_reset =
        "not reset before offering it to the next driver (it gets the device as the last one left it)";
    if info.as_ref().is_some_and(|i| !i.function_reset) {
        let bus = match backing.hot_reset_info() {
            Ok(hot) => match hot.others(address).as_slice() {
                [] => "a bus reset would reset it alone, but the bus does not do that on its own".to_owned(),
                others => format!(
                    "a bus reset would also reset {}, so the bus does not do it",
                    list(others)
                ),
            },
            Err(e) => format!("no bus reset either: {e}"),
        };
        return Err(format!("{address}: {not_reset}: it has no function reset; {bus}"));
    }
    let method = match info.as_ref().and_then(|i| i.method()) {
        Some(m) => format!("by {m}"),
        None => "method not known".to_owned(),
    };
    match backing.reset() {
        Ok(()) => {
            if let Err(e) = backing.set_bus_master(true) {
                log::warn!("{address}: turning bus mastering on after the reset failed: {e}");
            }
            Ok(format!(
                "{address}: reset ({method}) before offering it to the next driver"
            ))
        }
        Err(e) => Err(format!(
            "{address}: {not_reset}: its function reset ({method}) failed: {e}"
        )),
    }
}

#[cfg(all(test, feature = "testing"))]
mod tests {
    use super::*;
    use crate::record::DeviceRecord;
    use crate::testing::backing::{FakeBacking, FakeReset};

    fn device(reset: FakeReset) -> (PciAddress, FakeBacking) {
        let address: PciAddress = "0000:00:04.0".parse().unwrap();
        let backing = FakeBacking::new(&DeviceRecord::new(address));
        backing.set_reset(reset);
        (address, backing)
    }

    #[test]
    fn the_log_says_which_method_reset_the_device() {
        let (address, backing) = device(FakeReset::Flr);
        backing.set_bus_master(false).unwrap();
        assert_eq!(
            reset_for_next_driver(address, &backing),
            Ok("0000:00:04.0: reset (by flr) before offering it to the next driver".to_owned())
        );
        assert_eq!(backing.resets(), 1);
        assert!(
            backing.bus_master().unwrap(),
            "DMA on again, as before the first probe"
        );
        let (address, backing) = device(FakeReset::Bus);
        assert_eq!(
            reset_for_next_driver(address, &backing),
            Ok("0000:00:04.0: reset (by bus) before offering it to the next driver".to_owned())
        );
    }

    // QEMU's edu has no FLR: the bus says so, and what a bus reset would take with it.
    #[test]
    fn the_log_says_why_a_device_without_function_reset_was_not_reset() {
        let (address, backing) = device(FakeReset::None {
            also: vec!["0000:00:05.0".parse().unwrap()],
        });
        assert_eq!(
            reset_for_next_driver(address, &backing),
            Err(
                "0000:00:04.0: not reset before offering it to the next driver (it gets the device as the \
                 last one left it): it has no function reset; a bus reset would also reset 0000:00:05.0, \
                 so the bus does not do it"
                    .to_owned()
            )
        );
        assert_eq!(backing.resets(), 0);
        assert_eq!(backing.hot_resets(), 0, "never a hot reset on its own");
    }

    #[test]
    fn a_failed_reset_says_its_method_and_error() {
        let (address, backing) = device(FakeReset::Flr);
        backing.set_gone();
        let e = reset_for_next_driver(address, &FakeGone(backing)).unwrap_err();
        assert!(e.contains("its function reset (by flr) failed"), "{e}");
    }

    // A device whose reset fails though the kernel offers one (gone meanwhile).
    #[derive(Debug, Clone)]
    struct FakeGone(FakeBacking);

    impl DeviceBacking for FakeGone {
        type Registers = <FakeBacking as DeviceBacking>::Registers;
        type Dma = <FakeBacking as DeviceBacking>::Dma;
        fn address(&self) -> PciAddress {
            self.0.address()
        }
        fn map_bar(&self, index: u32) -> Result<Self::Registers, crate::bus::BackingError> {
            self.0.map_bar(index)
        }
        fn alloc_dma(&self, len: usize) -> Result<Self::Dma, crate::bus::BackingError> {
            self.0.alloc_dma(len)
        }
        fn read_config(&self, offset: u64, buf: &mut [u8]) -> Result<(), crate::bus::BackingError> {
            self.0.read_config(offset, buf)
        }
        fn write_config(&self, offset: u64, buf: &[u8]) -> Result<(), crate::bus::BackingError> {
            self.0.write_config(offset, buf)
        }
        fn max_interrupts(&self) -> u32 {
            0
        }
        fn route_interrupts(
            &self,
            _: &[std::os::fd::BorrowedFd<'_>],
        ) -> Result<(), crate::bus::BackingError> {
            Ok(())
        }
        fn reset_info(&self) -> Result<crate::bus::ResetInfo, crate::bus::BackingError> {
            Ok(crate::bus::ResetInfo::new(
                true,
                Some(vec![crate::bus::ResetMethod::Flr]),
            ))
        }
        fn reset(&self) -> Result<(), crate::bus::BackingError> {
            Err(crate::bus::BackingError::Gone(self.address()))
        }
        fn extra_handles(&self) -> usize {
            0
        }
    }
}
