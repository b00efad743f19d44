//! BAR faults that are not removals.
//!
//! After [`fault::install`](crate::vfio::fault::install), a SIGBUS on a mapped BAR is
//! turned into all-ones reads and reported to the bus. Most often the device is gone
//! (surprise removal), and the bus takes it back ([`RemovalCause::Fault`]). But vfio-pci
//! also refuses BAR accesses (and the process gets SIGBUS) while the device is present
//! and its BARs do not decode: in D3hot, where its own driver may have put it (through
//! its PM capability, or VFIO's low-power feature), or with Memory Space Enable clear in
//! its Command register. Taking such a device back would tear down a driver for its own
//! power management. So the bus first looks, without taking any device lock:
//!
//! - whether the device is still there: in the bus's map, and its sysfs `power_state`
//!   readable;
//! - whether its removal is pending (the scanner's removal registry: a removal request, a
//!   `remove` uevent);
//! - its sysfs `power_state` (the kernel's `current_state`; reading it takes no lock);
//! - if that is not D3hot, its Command register (a config read through the device's own
//!   handle; not done for D3hot, where a VFIO config access would wake the device from
//!   runtime low power).
//!
//! A device that is there, not pending, and in D3hot or not decoding memory is not being
//! removed: the driver is told through [`Driver::fault`](super::Driver::fault) and the
//! bus reports [`BusEvent::Fault`](super::BusEvent::Fault); the device stays held. Anything
//! else, including "D3cold" (a powered-off slot looks like that), an unreadable state and
//! a failed config read, is a removal. [`FaultFacts::not_a_removal`] is that decision,
//! apart from the reads.
//!
//! A device surprise-removed while in D3hot is reported as such a fault; its removal still
//! reaches the bus through the kernel's request and the `remove` uevent.
//!
//! [`RemovalCause::Fault`]: super::RemovalCause::Fault

use crate::addr::PciAddress;

/// What sysfs `power_state` says of a device in D3hot.
pub const D3HOT: &str = "D3hot";

/// Why a fault on a BAR of a device that is still there is not its removal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FaultReason {
    /// The device is in D3hot (sysfs `power_state`): its BARs do not decode until it is
    /// back in D0.
    LowPower,
    /// Memory Space Enable is clear in the device's Command register: its memory BARs do
    /// not decode.
    DecodingOff,
}

impl std::fmt::Display for FaultReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            FaultReason::LowPower => "device in D3hot",
            FaultReason::DecodingOff => "memory decoding off",
        })
    }
}

/// What the bus knows of a device whose BAR faulted: the inputs of
/// [`not_a_removal`](Self::not_a_removal). See the [module docs](self).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FaultFacts<'a> {
    /// The device is still there (in the map, its sysfs directory readable).
    pub present: bool,
    /// Its removal is pending (a removal request or a `remove` uevent was seen).
    pub removal_pending: bool,
    /// Its sysfs `power_state` as read (`None`: unreadable).
    pub power_state: Option<&'a str>,
    /// Whether Memory Space Enable is set in its Command register (`None`: not read, or
    /// the read failed).
    pub memory_decoding: Option<bool>,
}

impl FaultFacts<'_> {
    /// Why the fault is not a removal, or `None` if it is one: only a device that is
    /// there and not pending, and in D3hot or not decoding memory, is not being removed.
    pub fn not_a_removal(&self) -> Option<FaultReason> {
        if !self.present || self.removal_pending {
            return None;
        }
        if self.power_state.is_some_and(is_d3hot) {
            return Some(FaultReason::LowPower);
        }
        (self.memory_decoding == Some(false)).then_some(FaultReason::DecodingOff)
    }
}

/// Whether sysfs `power_state` text says D3hot.
pub fn is_d3hot(power_state: &str) -> bool {
    power_state.trim() == D3HOT
}

/// A fault on a held device's BAR that is not its removal, as
/// [`Driver::fault`](super::Driver::fault) receives it.
///
/// The mapped area that faulted (all of it, [`area_len`](Self::area_len) bytes) now reads
/// all ones and no longer reaches the device, even once the device decodes again: map the
/// BAR again then, and drop the old mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct BarFault {
    /// The device.
    pub address: PciAddress,
    /// The BAR.
    pub region: u32,
    /// Where in the mapped area the first faulting access was, in bytes from its start.
    pub offset_in_area: u64,
    /// The mapped area's length in bytes.
    pub area_len: u64,
    /// Why it is not a removal.
    pub reason: FaultReason,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn there(power_state: &str, memory_decoding: Option<bool>) -> FaultFacts<'_> {
        FaultFacts {
            present: true,
            removal_pending: false,
            power_state: Some(power_state),
            memory_decoding,
        }
    }

    #[test]
    fn a_device_there_in_d3hot_is_not_being_removed() {
        assert_eq!(
            there("D3hot\n", None).not_a_removal(),
            Some(FaultReason::LowPower)
        );
        assert_eq!(
            there("D3hot", Some(true)).not_a_removal(),
            Some(FaultReason::LowPower)
        );
    }

    #[test]
    fn a_device_there_with_decoding_off_is_not_being_removed() {
        assert_eq!(
            there("D0\n", Some(false)).not_a_removal(),
            Some(FaultReason::DecodingOff)
        );
    }

    #[test]
    fn a_device_there_in_d0_and_decoding_is_being_removed() {
        assert_eq!(there("D0\n", Some(true)).not_a_removal(), None);
        assert_eq!(there("D0\n", None).not_a_removal(), None, "config unreadable");
    }

    #[test]
    fn d3cold_and_unknown_states_are_removals() {
        for state in ["D3cold\n", "unknown\n", "error\n", "D1\n", "d3hot\n", ""] {
            assert_eq!(there(state, None).not_a_removal(), None, "{state:?}");
        }
    }

    #[test]
    fn a_device_gone_or_pending_is_being_removed_whatever_its_state() {
        let gone = FaultFacts {
            present: false,
            ..there("D3hot\n", Some(false))
        };
        assert_eq!(gone.not_a_removal(), None);
        let pending = FaultFacts {
            removal_pending: true,
            ..there("D3hot\n", Some(false))
        };
        assert_eq!(pending.not_a_removal(), None);
        let unreadable = FaultFacts {
            power_state: None,
            ..there("", None)
        };
        assert_eq!(unreadable.not_a_removal(), None);
        assert_eq!(FaultFacts::default().not_a_removal(), None);
    }
}
