//! Drivers of different types in one bus: [`Driver`] has an associated type (its
//! per-device state), so `dyn Driver<B>` cannot name drivers of different state types.
//! The bus keeps each as a `dyn ErasedDriver<B>`, implemented for every `Driver<B>`, with
//! the state boxed as [`State`]; the state is downcast back to `D::Device` only here and
//! in the bus's typed accessors (`Bus::device_state`, which check the driver's type the
//! bus noted at registration), never by a driver or the application.

use std::any::Any;

use crate::addr::PciAddress;
use crate::bus::backing::DeviceBacking;
use crate::bus::driver::{Driver, DriverError, ProbeDevice, ProbeOutcome, Removal};
use crate::bus::errors::{ErrorAction, ErrorEvent};
use crate::bus::fault::BarFault;
use crate::bus::id::IdEntry;

/// A driver's state of one device, as the bus keeps it.
pub(crate) type State = Box<dyn Any + Send>;

/// [`Driver`] with its state type erased (see the [module docs](self)).
pub(crate) trait ErasedDriver<B>: Any + Send {
    fn id_table(&self) -> &[IdEntry];
    fn probe(&mut self, device: ProbeDevice<'_, B>) -> ProbeOutcome<State>;
    fn remove(&mut self, state: State, removal: &Removal);
    fn fault(&mut self, state: &mut State, fault: &BarFault);
    fn error_detected(&mut self, state: &mut State, event: &ErrorEvent) -> ErrorAction;
    fn sriov_configure(&mut self, state: &mut State, pf: PciAddress, n: u16) -> Result<(), DriverError>;
    fn probe_again(&self) -> bool;
}

impl<B: DeviceBacking, D: Driver<B>> ErasedDriver<B> for D {
    fn id_table(&self) -> &[IdEntry] {
        Driver::id_table(self)
    }

    fn probe(&mut self, device: ProbeDevice<'_, B>) -> ProbeOutcome<State> {
        match Driver::probe(self, device) {
            ProbeOutcome::Bound(state) => ProbeOutcome::Bound(Box::new(state)),
            ProbeOutcome::NotMine => ProbeOutcome::NotMine,
            ProbeOutcome::Failed(e) => ProbeOutcome::Failed(e),
        }
    }

    fn remove(&mut self, state: State, removal: &Removal) {
        match state.downcast::<D::Device>() {
            Ok(state) => Driver::remove(self, *state, removal),
            // Not reached: a state is kept with the index of the driver that made it.
            Err(_) => mismatch(Driver::name(self), removal.address, "remove"),
        }
    }

    fn fault(&mut self, state: &mut State, fault: &BarFault) {
        match state.downcast_mut::<D::Device>() {
            Some(state) => Driver::fault(self, state, fault),
            None => mismatch(Driver::name(self), fault.address, "fault"),
        }
    }

    fn error_detected(&mut self, state: &mut State, event: &ErrorEvent) -> ErrorAction {
        match state.downcast_mut::<D::Device>() {
            Some(state) => Driver::error_detected(self, state, event),
            None => {
                mismatch(Driver::name(self), event.address, "error_detected");
                ErrorAction::Keep
            }
        }
    }

    fn sriov_configure(&mut self, state: &mut State, pf: PciAddress, n: u16) -> Result<(), DriverError> {
        match state.downcast_mut::<D::Device>() {
            Some(state) => Driver::sriov_configure(self, state, n),
            None => {
                mismatch(Driver::name(self), pf, "sriov_configure");
                Err(format!(
                    "the state kept for driver {} is not of its type",
                    Driver::name(self)
                )
                .into())
            }
        }
    }

    fn probe_again(&self) -> bool {
        Driver::probe_again(self)
    }
}

fn mismatch(driver: &str, address: PciAddress, callback: &str) {
    log::error!("{address}: the state kept for driver {driver} is not of its type: {callback} not called");
}
