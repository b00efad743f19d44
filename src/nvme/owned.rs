//! Memory the controller may still reach by DMA, and the proofs that it no longer can.
//!
//! # The rule
//!
//! Memory named by a command or a queue (an I/O buffer, a PRP list page, a ring) is
//! released — its last reference dropped, so a VFIO region is unmapped and its IOVA may be
//! handed out again — only once one of these is known:
//!
//! - the command's completion was posted (an Abort that aborts a command makes the
//!   controller post the command's completion, with status Command Abort Requested);
//! - the queue was deleted on the controller (Delete I/O SQ, then CQ, both succeeded:
//!   every command of the queue was completed or aborted first);
//! - the controller was disabled: CSTS.RDY read 0 after CC.EN was cleared;
//! - bus mastering was turned off in the function's Command register;
//! - no command ever named it: a request still waiting in a queue's software queue, none
//!   of whose commands was written to the submission queue.
//!
//! A command that timed out is only *abandoned*: the caller has its result, but the
//! controller may still execute it, so its buffer stays with the queue until one of the
//! above. Memory a queue cannot keep (the queue was dropped while the controller still
//! owns it: a failed deletion, a failed controller) is parked with the controller's shared
//! state until a reset disables the controller, [`Controller::revoke`] turns bus
//! mastering off, or the controller's last handle goes. The last handle first disables
//! the controller (CC.EN 0, CSTS.RDY 0 within the ready timeout) or, failing that, clears
//! Bus Master Enable and reads it back clear; then it releases what is parked with the
//! admin rings and the shadow doorbells, and without either proof leaks them all.
//!
//! The types carry the rule: [`DeviceOwned`] is released only with a [`Released`] proof,
//! and the proofs are made only where one of the above was seen. A `DeviceOwned` dropped
//! without one leaks its contents (logged) rather than free memory the device may write.
//!
//! [`Controller::revoke`]: super::Controller::revoke

use std::ops::Deref;
use std::sync::Arc;

use super::spec::Completion;
use crate::bus::backing::DmaMemory;
use crate::vfio::DmaBuffer;

/// Why device-owned memory may be released: made only where the controller is known to
/// be done with it (see the [module docs](self)).
#[derive(Debug)]
pub(crate) struct Released {
    why: Why,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Why {
    Completed,
    QueueDeleted,
    Disabled,
    BusMasterOff,
    NeverSubmitted,
}

impl Released {
    /// The controller posted `completion` for the command that used the memory.
    pub(crate) fn completed(completion: &Completion) -> Released {
        let _ = completion;
        Released { why: Why::Completed }
    }

    /// Delete I/O SQ and Delete I/O CQ of the queue that used the memory both completed
    /// successfully.
    pub(crate) fn queue_deleted(sq: &Completion, cq: &Completion) -> Released {
        let _ = (sq, cq);
        Released {
            why: Why::QueueDeleted,
        }
    }

    /// CSTS.RDY read 0 after CC.EN was cleared, later than the memory's last use.
    pub(crate) fn disabled() -> Released {
        Released { why: Why::Disabled }
    }

    /// Bus Master Enable was cleared in the function's Command register.
    pub(crate) fn bus_master_off() -> Released {
        Released {
            why: Why::BusMasterOff,
        }
    }

    /// No command naming the memory was written to a submission queue (a request that
    /// waited in the software queue and ended there).
    pub(crate) fn never_submitted() -> Released {
        Released {
            why: Why::NeverSubmitted,
        }
    }

    /// What it proves, for logs.
    pub(crate) fn reason(&self) -> &'static str {
        match self.why {
            Why::Completed => "its command completed",
            Why::QueueDeleted => "its queue was deleted",
            Why::Disabled => "the controller was disabled",
            Why::BusMasterOff => "bus mastering was turned off",
            Why::NeverSubmitted => "no command was ever sent with it",
        }
    }
}

/// A value (a buffer, a ring) the controller may still reach by DMA. Released only with a
/// [`Released`] proof; dropped without one, its contents leak (never freed under the
/// device).
pub(crate) struct DeviceOwned<T> {
    // `None` only once released.
    value: Option<T>,
}

impl<T> std::fmt::Debug for DeviceOwned<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DeviceOwned")
    }
}

impl<T> DeviceOwned<T> {
    /// `value`, handed to the controller.
    pub(crate) fn new(value: T) -> Self {
        DeviceOwned { value: Some(value) }
    }

    /// The same value, owned by the device still, as a `Box<dyn Send>` (to be parked).
    pub(crate) fn boxed(mut self) -> DeviceOwned<Box<dyn Send>>
    where
        T: Send + 'static,
    {
        DeviceOwned {
            value: self.value.take().map(|v| Box::new(v) as Box<dyn Send>),
        }
    }

    /// Drops the value: the controller can no longer reach it.
    pub(crate) fn release(mut self, proof: &Released) {
        let _ = proof;
        drop(self.value.take());
    }
}

impl<T> Drop for DeviceOwned<T> {
    fn drop(&mut self) {
        if let Some(value) = self.value.take() {
            log::error!(
                "memory the NVMe controller may still reach by DMA was dropped without proof that it cannot: \
                 leaking it"
            );
            std::mem::forget(value);
        }
    }
}

/// Queue memory (rings, PRP list pages) shared between a queue and, when the queue goes
/// while the controller may still use it, the controller's parked memory.
#[derive(Debug)]
pub(crate) struct SharedDma<D>(Arc<D>);

impl<D> SharedDma<D> {
    pub(crate) fn new(dma: D) -> Self {
        SharedDma(Arc::new(dma))
    }
}

impl<D> Clone for SharedDma<D> {
    fn clone(&self) -> Self {
        SharedDma(Arc::clone(&self.0))
    }
}

impl<D: DmaMemory> Deref for SharedDma<D> {
    type Target = DmaBuffer;
    fn deref(&self) -> &DmaBuffer {
        &self.0
    }
}

impl<D: DmaMemory> DmaMemory for SharedDma<D> {
    fn iova(&self) -> u64 {
        self.0.iova()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    struct Counted<'a>(&'a AtomicUsize);
    impl Drop for Counted<'_> {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn device_owned_memory_is_freed_only_with_a_proof() {
        let drops = AtomicUsize::new(0);
        DeviceOwned::new(Counted(&drops)).release(&Released::disabled());
        assert_eq!(drops.load(Ordering::SeqCst), 1);
        // Without a proof: leaked, never dropped.
        drop(DeviceOwned::new(Counted(&drops)));
        assert_eq!(drops.load(Ordering::SeqCst), 1);
        assert_eq!(
            Released::bus_master_off().reason(),
            "bus mastering was turned off"
        );
    }
}
