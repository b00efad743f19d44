//! The emulated controller's log pages and the events that point at them: SMART / Health
//! Information (from the I/O it did, and what a test sets), Error Information (errors it
//! completed commands with, invalid doorbell writes), the Changed Namespace List; the
//! Asynchronous Event Configuration that enables SMART and notice events, and each event
//! type masked from its report until the host reads its log page.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use parking_lot::Mutex;

use crate::nvme::spec::logs::{aec, critical};
use crate::nvme::spec::{AsyncEventInfo, AsyncEventType, ErrorLogEntry, SmartLog, Status, lid};

/// Entries the Error Information log keeps (Identify ELPE is this minus one).
pub(super) const ERROR_LOG_ENTRIES: usize = 16;

#[derive(Debug)]
pub(super) struct LogState {
    // Newest first, at most ERROR_LOG_ENTRIES.
    errors: Mutex<VecDeque<ErrorLogEntry>>,
    error_count: AtomicU64,
    changed: Mutex<Vec<u32>>,
    // What a test set; the I/O counters are filled in when the page is read.
    health: Mutex<SmartLog>,
    host_reads: AtomicU64,
    host_writes: AtomicU64,
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
    // Asynchronous Event Configuration (Set Features 0Bh).
    pub(super) aec: AtomicU32,
    // A SMART / notice event was raised and its log page not read since.
    smart_masked: AtomicBool,
    notice_masked: AtomicBool,
}

impl LogState {
    pub(super) fn new() -> Self {
        let health = SmartLog {
            temperature: 308,
            available_spare: 100,
            available_spare_threshold: 10,
            power_cycles: 1,
            ..SmartLog::default()
        };
        LogState {
            errors: Mutex::new(VecDeque::new()),
            error_count: AtomicU64::new(0),
            changed: Mutex::new(Vec::new()),
            health: Mutex::new(health),
            host_reads: AtomicU64::new(0),
            host_writes: AtomicU64::new(0),
            bytes_read: AtomicU64::new(0),
            bytes_written: AtomicU64::new(0),
            aec: AtomicU32::new(0),
            smart_masked: AtomicBool::new(false),
            notice_masked: AtomicBool::new(false),
        }
    }

    /// An error to list in the Error Information log (`sqid`/`cid` 0xffff: not a
    /// command's).
    pub(super) fn record_error(&self, sqid: u16, cid: u16, status: Status, nsid: u32, lba: u64) {
        let error_count = self.error_count.fetch_add(1, Ordering::AcqRel) + 1;
        let mut errors = self.errors.lock();
        errors.push_front(ErrorLogEntry {
            error_count,
            sqid,
            cid,
            status,
            parameter_location: 0xffff,
            lba,
            nsid,
            ..ErrorLogEntry::default()
        });
        errors.truncate(ERROR_LOG_ENTRIES);
    }

    /// A Read (`write` false) or Write of `bytes` completed successfully.
    pub(super) fn io_done(&self, write: bool, bytes: u64) {
        let (commands, total) = if write {
            (&self.host_writes, &self.bytes_written)
        } else {
            (&self.host_reads, &self.bytes_read)
        };
        commands.fetch_add(1, Ordering::Relaxed);
        total.fetch_add(bytes, Ordering::Relaxed);
    }

    /// The bytes of log page `id` (`None`: a page the controller has no contents for,
    /// read as zeros). Reading a page without Retain Asynchronous Event (`retain`)
    /// clears what it reports and unmasks its event type.
    pub(super) fn page(&self, id: u8, retain: bool) -> Option<Vec<u8>> {
        match id {
            lid::ERROR_INFORMATION => {
                let errors = self.errors.lock();
                let mut b = vec![0u8; ERROR_LOG_ENTRIES * 64];
                for (i, e) in errors.iter().enumerate() {
                    b[i * 64..(i + 1) * 64].copy_from_slice(&e.to_bytes());
                }
                Some(b)
            }
            lid::SMART_HEALTH => {
                let mut s = *self.health.lock();
                let units = |bytes: u64| u128::from(bytes.div_ceil(512_000));
                s.host_read_commands = u128::from(self.host_reads.load(Ordering::Relaxed));
                s.host_write_commands = u128::from(self.host_writes.load(Ordering::Relaxed));
                s.data_units_read = units(self.bytes_read.load(Ordering::Relaxed));
                s.data_units_written = units(self.bytes_written.load(Ordering::Relaxed));
                s.error_log_entries = u128::from(self.error_count.load(Ordering::Acquire));
                if !retain {
                    self.smart_masked.store(false, Ordering::Release);
                }
                Some(s.to_bytes().to_vec())
            }
            lid::CHANGED_NAMESPACES => {
                let mut changed = self.changed.lock();
                let mut b = vec![0u8; 4096];
                if changed.len() > 1024 {
                    b[..4].copy_from_slice(&u32::MAX.to_le_bytes());
                } else {
                    for (i, n) in changed.iter().enumerate() {
                        b[i * 4..i * 4 + 4].copy_from_slice(&n.to_le_bytes());
                    }
                }
                if !retain {
                    changed.clear();
                    self.notice_masked.store(false, Ordering::Release);
                }
                Some(b)
            }
            _ => None,
        }
    }

    /// Changes the health a test controls; returns the SMART / Health event to raise for
    /// critical warning bits newly set that the host enabled, unless that type is masked.
    pub(super) fn update_health(&self, f: impl FnOnce(&mut SmartLog)) -> Option<u32> {
        let mut h = self.health.lock();
        let before = h.critical_warning;
        f(&mut h);
        let new = h.critical_warning & !before & self.aec.load(Ordering::Acquire) as u8;
        if new == 0 || self.smart_masked.swap(true, Ordering::AcqRel) {
            return None;
        }
        let info = if new & critical::SPARE != 0 {
            2
        } else if new & critical::TEMPERATURE != 0 {
            1
        } else {
            0
        };
        Some(
            AsyncEventInfo {
                kind: AsyncEventType::SmartHealth,
                info,
                log_page: lid::SMART_HEALTH,
            }
            .to_dw0(),
        )
    }

    /// Adds `nsids` to the Changed Namespace List; returns the Namespace Attribute Changed
    /// notice to raise if the host enabled it and it is not masked.
    pub(super) fn namespaces_changed(&self, nsids: &[u32]) -> Option<u32> {
        {
            let mut changed = self.changed.lock();
            for &n in nsids {
                if !changed.contains(&n) {
                    changed.push(n);
                }
            }
        }
        if self.aec.load(Ordering::Acquire) & aec::NAMESPACE_ATTRIBUTE == 0
            || self.notice_masked.swap(true, Ordering::AcqRel)
        {
            return None;
        }
        Some(
            AsyncEventInfo {
                kind: AsyncEventType::Notice,
                info: 0,
                log_page: lid::CHANGED_NAMESPACES,
            }
            .to_dw0(),
        )
    }
}
