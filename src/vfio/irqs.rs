//! Interrupt indexes of a [`VfioDevice`]: routing eventfds, masking, growing MSI-X.
//!
//! What vfio-pci does (drivers/vfio/pci/vfio_pci_intrs.c and vfio_pci_core.c, 6.1 to
//! 6.12), which these methods follow:
//!
//! - One of INTx, MSI and MSI-X is enabled at a time: routing eventfds to another while one
//!   is enabled fails with `EINVAL`. This device tracks which one is enabled and refuses
//!   first, naming both ([`VfioError::IrqBusy`]).
//! - Enabling MSI or MSI-X allocates `start + count` host vectors; when fewer are to be had
//!   the ioctl enables nothing and *returns* the number it could have had, not an error
//!   ([`VfioError::IrqVectors`]).
//! - Routing eventfds to an enabled MSI or MSI-X replaces vectors in place; vectors past
//!   those enabled are refused (`EINVAL`) unless the kernel allocates MSI-X vectors
//!   dynamically (Linux 6.5 on: `VFIO_IRQ_INFO_NORESIZE` is then absent for MSI-X; MSI
//!   always has it).
//! - INTx is masked by the kernel as it signals the eventfd and stays masked until an
//!   `ACTION_UNMASK`; an unmask while the device still asserts the line signals again.
//!   `ACTION_MASK`/`ACTION_UNMASK` exist for INTx only (start 0, count 1, and only while
//!   INTx is enabled, else `EINVAL`); for MSI and MSI-X vfio-pci has no handler and answers
//!   `ENOTTY`.
//! - ERR exists only for PCI Express devices (`VFIO_DEVICE_GET_IRQ_INFO` answers `EINVAL`
//!   otherwise); disabling an index that is not enabled answers `EINVAL`, so this device
//!   skips the ioctl then.
//! - `ACTION_TRIGGER` with `DATA_NONE` and a count signals the routed eventfds from the
//!   kernel, a loopback test ([`VfioDevice::trigger_irq`]).

use std::os::fd::{AsFd, BorrowedFd};

use super::sys::{self, IrqAction};
use super::{VfioDevice, VfioError, ioctl_err, irq};

/// Which of INTx, MSI and MSI-X is enabled (index, vectors), and whether ERR is.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct IrqState {
    enabled: Option<(u32, u32)>,
    err: bool,
}

impl VfioDevice {
    /// The interrupt index enabled now among INTx, MSI and MSI-X, and how many vectors
    /// of it are routed, as far as this device routed them.
    pub fn enabled_irq(&self) -> Option<(u32, u32)> {
        self.irqs.lock().enabled
    }

    /// Routes vectors `start..start + fds.len()` of interrupt index `index` to these
    /// eventfds; with `fds` empty, disables the index (nothing if it is not enabled).
    ///
    /// For INTx, MSI and MSI-X: one of them at a time ([`VfioError::IrqBusy`]); enabling
    /// MSI or MSI-X with more vectors than the kernel can allocate enables nothing
    /// ([`VfioError::IrqVectors`]). A `start` past the enabled vectors grows MSI-X, which
    /// only kernels without `VFIO_IRQ_INFO_NORESIZE` on it allow (6.5 on).
    pub fn set_irq_eventfds_from(
        &self,
        index: u32,
        start: u32,
        fds: &[BorrowedFd<'_>],
    ) -> Result<(), VfioError> {
        self.live()?;
        let delivery = matches!(index, irq::INTX | irq::MSI | irq::MSIX);
        let mut state = self.irqs.lock();
        if fds.is_empty() {
            let enabled = match index {
                irq::ERR => state.err,
                _ if delivery => state.enabled.is_some_and(|(on, _)| on == index),
                // REQ and device-specific indexes: not tracked, always asked.
                _ => true,
            };
            if !enabled {
                return Ok(());
            }
        } else if delivery
            && let Some((enabled, _)) = state.enabled
            && enabled != index
        {
            return Err(VfioError::IrqBusy {
                address: self.address,
                index,
                enabled,
            });
        }
        let returned = sys::device_set_irqs(self.file.as_fd(), index, start, fds).map_err(ioctl_err(
            "VFIO_DEVICE_SET_IRQS",
            Some(self.address),
            Some(index.into()),
        ))?;
        let end = start.saturating_add(fds.len() as u32);
        if returned > 0 && !fds.is_empty() {
            return Err(VfioError::IrqVectors {
                address: self.address,
                index,
                asked: end,
                available: returned as u32,
            });
        }
        if index == irq::ERR {
            state.err = !fds.is_empty();
        } else if delivery {
            state.enabled = match state.enabled {
                _ if fds.is_empty() => None,
                Some((on, n)) if on == index => Some((index, n.max(end))),
                _ => Some((index, end)),
            };
        }
        Ok(())
    }

    /// Masks `vector` of interrupt index `index` (`VFIO_IRQ_SET_ACTION_MASK`): vfio-pci
    /// masks INTx only, and answers MSI and MSI-X with `ENOTTY`.
    pub fn mask_irq(&self, index: u32, vector: u32) -> Result<(), VfioError> {
        self.irq_action(index, vector, IrqAction::Mask, "VFIO_DEVICE_SET_IRQS (mask)")
    }

    /// Unmasks `vector` of interrupt index `index` (`VFIO_IRQ_SET_ACTION_UNMASK`): re-arms
    /// an automasked INTx; signals its eventfd again at once if the device still asserts
    /// it. vfio-pci answers MSI and MSI-X with `ENOTTY`.
    pub fn unmask_irq(&self, index: u32, vector: u32) -> Result<(), VfioError> {
        self.irq_action(index, vector, IrqAction::Unmask, "VFIO_DEVICE_SET_IRQS (unmask)")
    }

    /// Signals the eventfd routed to `vector` of `index` from the kernel, as if the device
    /// had interrupted (`ACTION_TRIGGER` with `DATA_NONE`): a loopback test of the routing,
    /// not of the device.
    pub fn trigger_irq(&self, index: u32, vector: u32) -> Result<(), VfioError> {
        self.irq_action(
            index,
            vector,
            IrqAction::Trigger,
            "VFIO_DEVICE_SET_IRQS (trigger)",
        )
    }

    /// Whether vectors can be added to enabled MSI-X: the kernel does not say
    /// `VFIO_IRQ_INFO_NORESIZE` for it (Linux 6.5 on).
    pub fn msix_resizable(&self) -> Result<bool, VfioError> {
        Ok(!self.irq_info(irq::MSIX)?.flags.contains(irq::InfoFlags::NORESIZE))
    }

    fn irq_action(
        &self,
        index: u32,
        vector: u32,
        action: IrqAction,
        ioctl: &'static str,
    ) -> Result<(), VfioError> {
        self.live()?;
        sys::device_set_irqs_none(self.file.as_fd(), index, vector, 1, action).map_err(ioctl_err(
            ioctl,
            Some(self.address),
            Some(index.into()),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn irq_errors_name_the_indexes_and_both_counts() {
        let address = "0000:01:00.0".parse().unwrap();
        let busy = VfioError::IrqBusy {
            address,
            index: irq::MSI,
            enabled: irq::INTX,
        };
        assert_eq!(
            busy.to_string(),
            "0000:01:00.0: cannot enable MSI while INTx is enabled (one of INTx, MSI, MSI-X at a time)"
        );
        let fewer = VfioError::IrqVectors {
            address,
            index: irq::MSIX,
            asked: 64,
            available: 8,
        };
        assert_eq!(
            fewer.to_string(),
            "0000:01:00.0: 64 MSI-X vectors asked, the kernel could allocate 8"
        );
    }
}
