//! [`VfioDevice::revoke`]: closing a device under the handles that hold it open.
//!
//! A VFIO device is open while its fd is, and every mapping of one of its BARs holds the
//! fd's file too; the kernel's removal of the device waits until all of them are gone.
//! Handles are `Arc`s the driver owns, so the fd closes when the driver drops them. To
//! close it without the driver (the bus does while the driver is busy probing another
//! device), `revoke` takes away what the handles reach: it replaces every mapped area
//! with memory reading all-ones (as the SIGBUS handler does for a surprise-removed
//! device: [`fault`](super::fault#revoking)), and makes the fd refer to an eventfd
//! instead of the device. The file is then released, and vfio-pci closes the device as
//! after a last `close`: it is reset if it can be, and a waiting removal goes on.

use std::os::fd::AsFd;
use std::sync::atomic::Ordering;

use super::{VfioDevice, VfioError, fault, sys};

impl VfioDevice {
    /// Closes the device under every handle of it, at once: its mapped BAR areas are
    /// replaced with memory reading all-ones (as after a surprise removal:
    /// [`fault`](super::fault#revoking)), and its fd made to refer to an eventfd, so the
    /// kernel sees the device closed (a waiting removal goes on). Every other operation
    /// of every handle fails with [`VfioError::Revoked`] from then on. The handles stay valid values until dropped. DMA memory
    /// of the container is untouched (the device no longer reaches it: closing it turns
    /// its bus mastering off); until the device is closed its IOVAs are quarantined
    /// ([`quarantine_iovas`](Self::quarantine_iovas)). Revoking again does nothing more.
    ///
    /// Fails with [`VfioError::NotRevocable`], changing nothing, if a mapped area is not
    /// covered by the SIGBUS table (it was full: [`fault::CAPACITY`] areas): such an area
    /// cannot be replaced safely under its owner. If replacing an area or the fd fails
    /// midway, the device is revoked (every operation fails) but may stay open until its
    /// handles are dropped.
    ///
    /// This process's scans go on treating the device as held ([`HeldOpen`]) until the
    /// last handle is dropped.
    ///
    /// [`HeldOpen`]: crate::removal::held::HeldOpen
    pub fn revoke(&self) -> Result<(), VfioError> {
        // Held throughout: no BAR is mapped meanwhile (`map_bar` maps under it and checks
        // `revoked`).
        let mapped = self.mapped.lock();
        let uncovered = mapped.areas.iter().filter(|key| key.is_none()).count();
        if uncovered > 0 {
            return Err(VfioError::NotRevocable {
                address: self.address,
                reason: format!(
                    "{uncovered} mapped BAR area(s) are not in the SIGBUS table (it was full), so they cannot be replaced under their owner"
                ),
                source: None,
            });
        }
        self.revoked.store(true, Ordering::Release);
        // Until the device is closed, its DMA may be in flight: the IOVAs of buffers
        // freed meanwhile are not handed out again.
        self.quarantine_iovas();
        let failed = mapped
            .areas
            .iter()
            .flatten()
            .filter(|key| !fault::revoke(**key))
            .count();
        if failed > 0 {
            return Err(VfioError::NotRevocable {
                address: self.address,
                reason: format!("replacing {failed} mapped BAR area(s) with all-ones memory failed"),
                source: None,
            });
        }
        sys::revoke_fd(self.file.as_fd()).map_err(|source| VfioError::NotRevocable {
            address: self.address,
            reason: "making the device fd refer to an eventfd failed".into(),
            source: Some(source),
        })?;
        // Closed: vfio-pci disabled it (bus mastering off).
        self.quarantine.lock().take();
        log::info!(
            "{}: revoked: the device is closed under {} mapped area(s) and every handle",
            self.address,
            mapped.areas.len()
        );
        Ok(())
    }

    /// Whether [`revoke`](Self::revoke) closed the device under its handles.
    pub fn is_revoked(&self) -> bool {
        self.revoked.load(Ordering::Acquire)
    }
}
