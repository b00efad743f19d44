//! The in-tree NVMe driver, generic over [`DeviceBacking`]: the same code drives a
//! controller through VFIO and the emulated one of the `testing` feature. It has no
//! `unsafe` of its own (everything unsafe stays in [`crate::vfio`]).
//!
//! - [`Controller`] brings a controller up (disable, admin queues, enable, Identify,
//!   namespaces, queue count, shadow doorbells when offered) and hands out
//!   [`IoQueue`]s: one per thread, owned by it (`Send`, not `Sync`), so the I/O path
//!   takes no lock.
//! - An [`IoQueue`] submits reads, writes, flushes, write-zeroes and deallocations with
//!   PRP lists built from DMA buffers (SGLs for vectored requests PRPs cannot express,
//!   where the controller offers them), raw I/O commands (passthrough), splits what
//!   exceeds MDTS, rings one doorbell per batch and polls completions (one doorbell per
//!   poll).
//! - Failure never hangs a caller: commands time out, a controller whose registers read
//!   all-ones is gone, one with CSTS.CFS is reset (below), and a controller taken away
//!   ([`Controller::revoke`], what the bus's removal calls) fails every queue at its next
//!   use and drops every handle of the device at once, so the kernel's removal need not
//!   wait for threads to notice.
//! - Namespaces with metadata: 8-byte protection information (types 1–3) is driven with
//!   PRACT (the controller inserts, checks and strips it; buffers hold data only); every
//!   other metadata format is listed but refused with its reason (see [`Namespace`]).
//!   Write Zeroes and Dataset Management follow ONCS and the NVM command set's limits
//!   (WZSL, DMRSL, DMSL), split or refused before anything is sent.
//! - Memory the controller may still reach by DMA is never released under it: a buffer of
//!   a command that timed out stays with its queue until the command completes, the
//!   controller is disabled (a reset) or bus mastering is off; what a queue cannot keep is
//!   parked with the controller until then (the rule, and the types that carry it, are in
//!   `owned.rs`). A controller reporting CSTS.CFS is reset, as the specification's
//!   recovery says: outstanding requests end once with [`NvmeError::Reset`] and the queues
//!   create themselves again; recovery resets back off and, after
//!   [`Options::recovery_limit`] in a row, the controller is declared failed
//!   ([`NvmeError::Failed`]). Aborts for timed-out commands stay within the controller's
//!   Abort Command Limit; a command not completed an I/O timeout after its Abort's answer
//!   (the controller says "not aborted": it still executes it), whose Abort stays
//!   unanswered for the admin timeout, or that gets no Abort within an I/O timeout, is
//!   ended by a controller reset. The controller's last handle disables the controller
//!   (or turns bus mastering off) before it frees the admin rings.
//! - [`driver::NvmeDriver`] registers all of it with the [`crate::bus::Bus`].
//! - Admin: asynchronous events handed to a callback with the log page that clears them,
//!   SMART / health and Error Information logs, admin passthrough (see
//!   [`Controller::on_async_event`], [`Controller::process_admin_completions`]).
//! - With the `async` feature, `async_queue::AsyncQueue`: futures over an I/O queue,
//!   without a runtime dependency.
//!
//! [`spec`] holds the facts of the NVMe base specification the driver and the emulated
//! controller share.

use std::time::Duration;

use crate::bus::backing::{BackingError, DeviceBacking};

#[cfg(feature = "async")]
#[cfg_attr(docsrs, doc(cfg(feature = "async")))]
pub mod async_queue;
mod controller;
pub mod driver;
mod io;
mod owned;
pub mod perf;
mod queue;
pub mod spec;
pub mod sriov;

pub use controller::{AdminData, AsyncEvent, CommandTimeout, Controller, ControllerInfo, Namespace, Options};
pub use io::{
    Buffer, DEFAULT_QUEUE_LIMIT, DataDirection, IoCompletion, IoPassthru, IoQueue, IoRequest, Op,
    PassthruData, Segment,
};

use spec::{IdentifyError, LogError, Status};

/// What went wrong driving a controller. Every error ends the request it belongs to; none
/// leaves a caller waiting.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NvmeError {
    /// A register or DMA access failed.
    #[error(transparent)]
    Backing(#[from] BackingError),
    /// The controller completed the command with an error.
    #[error("{command} failed: {status}")]
    Command {
        /// What was asked ("Identify controller", "Read", ...).
        command: String,
        /// The controller's status.
        status: Status,
    },
    /// A command or a state change did not finish in time.
    #[error("{what}: no answer within {} ms", .waited.as_millis())]
    Timeout {
        /// What was waited for.
        what: String,
        /// How long.
        waited: Duration,
    },
    /// The registers read all-ones: the device is gone (surprise removal).
    #[error("controller gone: its registers read all-ones")]
    Gone,
    /// The controller reports a fatal error (CSTS.CFS).
    #[error("controller failed: CSTS.CFS set (CSTS {csts:#x})")]
    Fatal {
        /// The status register.
        csts: u32,
    },
    /// The controller was reset (after a command that neither completed nor could be
    /// aborted): requests outstanding at the time ended with this; the queues work again.
    #[error("controller reset: {0}")]
    Reset(String),
    /// The controller failed again after every recovery reset, up to
    /// [`Options::recovery_limit`] of them in a row: it was declared failed, and no queue
    /// works (nor is another reset tried) until [`Controller::reset`].
    #[error("controller failed for good: {0}")]
    Failed(String),
    /// The controller needs a recovery reset, but the last ones did not bring it back and
    /// the next waits out its backoff ([`Options::recovery_backoff`]): poll again later.
    /// Outstanding requests stay until the reset ends them.
    #[error(
        "controller recovery pending: {resets} reset(s) in a row did not bring it back; the next in {} ms (poll again)",
        .retry_in.as_millis()
    )]
    RecoveryPending {
        /// Recovery resets done in a row.
        resets: u32,
        /// How long until the next may be done.
        retry_in: Duration,
    },
    /// The controller was taken away (its device is being removed or detached).
    #[error("controller removed: {0}")]
    Removed(String),
    /// The request cannot be expressed: bad alignment, a buffer too small, a namespace or
    /// range the controller does not have, a queue full.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The queue cannot take the request now: its submission queue has too few free slots
    /// and its software queue holds `limit` requests already (with `limit` 0, software
    /// queueing is off: see [`IoQueue::set_queue_limit`]). Poll, then retry.
    #[error(
        "queue {qid} full: {needed} commands needed, {free} slots free, {queued} requests waiting (limit {limit}); poll, then retry"
    )]
    QueueFull {
        /// The queue.
        qid: u16,
        /// Commands the request takes.
        needed: u64,
        /// Submission queue slots free.
        free: usize,
        /// Requests waiting in the software queue.
        queued: usize,
        /// The software queue's limit.
        limit: usize,
    },
    /// Identify data did not parse.
    #[error(transparent)]
    Identify(#[from] IdentifyError),
    /// A log page did not parse.
    #[error(transparent)]
    Log(#[from] LogError),
    /// The controller does not offer what was asked (a command set, SR-IOV, ...).
    #[error("not supported: {0}")]
    Unsupported(String),
}

impl NvmeError {
    /// Whether the controller can no longer be used (gone, failed, removed): every later
    /// request fails the same way.
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            NvmeError::Gone | NvmeError::Fatal { .. } | NvmeError::Removed(_) | NvmeError::Failed(_)
        )
    }
}

/// DMA memory of backing `B`.
pub type Dma<B> = <B as DeviceBacking>::Dma;
