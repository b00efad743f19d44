//! Recovery resets: the controller reset an I/O queue asks for when the controller failed
//! (CSTS.CFS) or a command it abandoned is stuck, backed off and bounded.
//!
//! The first recovery reset is immediate. When the controller fails again before any
//! queue saw a completion since, the next waits [`Options::recovery_backoff`], then twice
//! that, and so on up to [`Options::recovery_backoff_max`]; a queue that needs a reset
//! meanwhile gets [`NvmeError::RecoveryPending`] from its poll at once (nothing sleeps,
//! its requests stay). After [`Options::recovery_limit`] recovery resets in a row the
//! controller is declared failed: every queue operation fails with
//! [`NvmeError::Failed`], and no reset is tried until [`Controller::reset`].
//!
//! [`Options::recovery_backoff`]: super::Options::recovery_backoff
//! [`Options::recovery_backoff_max`]: super::Options::recovery_backoff_max
//! [`Options::recovery_limit`]: super::Options::recovery_limit
//! [`Controller::reset`]: super::Controller::reset

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::{Options, Shared};
use crate::bus::backing::DeviceBacking;
use crate::nvme::NvmeError;

/// Recovery resets done in a row, and whether the controller was declared failed.
#[derive(Debug)]
pub(super) struct State {
    backoff: Duration,
    backoff_max: Duration,
    limit: u32,
    // Recovery resets since a queue last saw a completion.
    resets: u32,
    last: Option<Instant>,
    // Why the controller was declared failed.
    failed: Option<String>,
}

impl State {
    pub(super) fn new(options: &Options) -> Self {
        State {
            backoff: options.recovery_backoff,
            backoff_max: options.recovery_backoff_max,
            limit: options.recovery_limit,
            resets: 0,
            last: None,
            failed: None,
        }
    }

    // How long after the last recovery reset the next may come.
    fn wait(&self) -> Duration {
        match self.resets {
            0 => Duration::ZERO,
            n => self
                .backoff
                .saturating_mul(1u32 << (n - 1).min(31))
                .min(self.backoff_max),
        }
    }

    // Why no recovery reset may be done now: declared failed, or backing off.
    fn refusal(&self, now: Instant) -> Option<NvmeError> {
        if let Some(why) = &self.failed {
            return Some(NvmeError::Failed(why.clone()));
        }
        let due = self.last? + self.wait();
        (now < due).then(|| NvmeError::RecoveryPending {
            resets: self.resets,
            retry_in: due - now,
        })
    }
}

impl<B: DeviceBacking> Shared<B> {
    /// A recovery reset (see the [module docs](self)), unless a reset happened since the
    /// caller saw `generation` (several queues seeing the same failure reset the
    /// controller once). Fails at once, without waiting for anything but a reset in
    /// progress, with [`NvmeError::RecoveryPending`] while backing off and
    /// [`NvmeError::Failed`] once the controller was declared failed.
    pub(crate) fn recovery_reset(&self, generation: u64, why: &str) -> Result<(), NvmeError> {
        if let Some(e) = self.recovery.lock().refusal(Instant::now()) {
            return Err(e);
        }
        let _one = self.resetting.lock();
        if self.generation.load(Ordering::Acquire) != generation {
            return Ok(());
        }
        {
            let mut r = self.recovery.lock();
            if let Some(e) = r.refusal(Instant::now()) {
                return Err(e);
            }
            if r.resets >= r.limit {
                let failed = format!(
                    "{} recovery resets in a row did not bring it back (last cause: {why}); no more resets \
                     until Controller::reset()",
                    r.resets
                );
                log::error!("{}: controller declared failed: {failed}", self.info.address);
                r.failed = Some(failed.clone());
                self.failed.store(true, Ordering::Release);
                return Err(NvmeError::Failed(failed));
            }
            r.resets += 1;
            r.last = Some(Instant::now());
        }
        self.recovering.store(true, Ordering::Release);
        self.reset_locked(why)
    }

    /// A queue saw completions: the controller works, so the recovery resets before
    /// were not in vain. One relaxed load unless a recovery reset awaits that news.
    #[inline]
    pub(crate) fn saw_completions(&self) {
        if self.recovering.load(Ordering::Relaxed) && self.recovering.swap(false, Ordering::AcqRel) {
            let mut r = self.recovery.lock();
            r.resets = 0;
            r.last = None;
        }
    }

    /// Whether recovery gave up (one load: for the I/O path's fast check).
    #[inline]
    pub(crate) fn is_failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    /// [`NvmeError::Failed`] once the controller was declared failed.
    #[inline]
    pub(crate) fn failed_error(&self) -> Option<NvmeError> {
        if !self.failed.load(Ordering::Acquire) {
            return None;
        }
        self.recovery.lock().failed.clone().map(NvmeError::Failed)
    }

    // A reset the application asked for worked: recovery starts afresh.
    pub(super) fn recovery_clear(&self) {
        let mut r = self.recovery.lock();
        r.resets = 0;
        r.last = None;
        r.failed = None;
        self.failed.store(false, Ordering::Release);
        self.recovering.store(false, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_backoff_doubles_up_to_its_maximum() {
        let mut s = State::new(&Options {
            recovery_backoff: Duration::from_millis(10),
            recovery_backoff_max: Duration::from_millis(50),
            ..Options::default()
        });
        let waits: Vec<u128> = (0..6)
            .map(|n| {
                s.resets = n;
                s.wait().as_millis()
            })
            .collect();
        assert_eq!(waits, [0, 10, 20, 40, 50, 50]);
        s.resets = 200;
        assert_eq!(s.wait(), Duration::from_millis(50));
    }
}
