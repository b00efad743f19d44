//! What the admin queue does besides bring-up: Asynchronous Event Requests kept
//! outstanding and handed to a callback, log pages (SMART / health, Error Information),
//! and passthrough of admin commands with data the driver does not wrap.
//!
//! The details of asynchronous events are in [`Controller::on_async_event`]'s docs.

use std::fmt;
use std::sync::Arc;

use super::{Controller, PAGE, Shared, check_status};
use crate::bus::backing::{DeviceBacking, DmaMemory};
use crate::nvme::NvmeError;
use crate::nvme::io::Op;
use crate::nvme::owned::{DeviceOwned, Released};
use crate::nvme::spec::logs::{aec, get_log_page_command, lid};
use crate::nvme::spec::{
    AsyncEventInfo, AsyncEventType, Command, Completion, ErrorLogEntry, NSID_ALL, SmartLog, admin, feature,
    io, parse_changed_namespaces, parse_error_log,
};

/// What [`Controller::on_async_event`] registered.
pub(super) type Callback = Arc<dyn Fn(AsyncEvent) + Send + Sync>;

/// What [`Controller::on_timeout`] registered.
pub(super) type TimeoutCallback = Arc<dyn Fn(CommandTimeout) + Send + Sync>;

/// A command that timed out, as [`Controller::on_timeout`]'s callback hears of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct CommandTimeout {
    /// Its submission queue (0: the admin queue).
    pub qid: u16,
    /// Its command id.
    pub cid: u16,
    /// Its opcode.
    pub opcode: u8,
}

/// The opcode of the commands of an I/O request of kind `op`.
pub(crate) fn io_opcode(op: Op) -> u8 {
    match op {
        Op::Read => io::READ,
        Op::Write => io::WRITE,
        Op::Flush => io::FLUSH,
        Op::WriteZeroes => io::WRITE_ZEROES,
        Op::Deallocate => io::DATASET_MANAGEMENT,
        // Its own opcode is in the request (the timeout path reads it there).
        Op::Passthru => 0,
    }
}

/// Asynchronous Event Requests kept outstanding at most, whatever AERL allows (as SPDK).
const MAX_AERS: usize = 8;

/// SMART / Health critical warnings enabled in the Asynchronous Event Configuration:
/// spare, temperature, reliability, read-only, volatile memory backup (bits 0–4, as
/// Linux enables; bit 5 is newer and reserved on older controllers).
const AEC_SMART: u32 = 0x1f & aec::SMART_MASK;

/// One asynchronous event, as [`Controller::on_async_event`]'s callback receives it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct AsyncEvent {
    /// Asynchronous Event Type.
    pub kind: AsyncEventType,
    /// Asynchronous Event Information (its meaning depends on the type; see
    /// [`describe`](Self::describe)).
    pub info: u8,
    /// The log page the event names.
    pub log_page: u8,
    /// The completion's dword 0, as the controller wrote it.
    pub dw0: u32,
    /// The bytes of that log page, read to clear the event (`None` when the event has no
    /// log page or reading it failed, which is logged).
    pub log: Option<Vec<u8>>,
}

impl AsyncEvent {
    /// What the information code means, as the specification names it.
    pub fn describe(&self) -> Option<&'static str> {
        self.decoded().describe()
    }

    /// The SMART / Health Information read with the event (log page 02h).
    pub fn smart(&self) -> Option<SmartLog> {
        let log = self
            .log
            .as_deref()
            .filter(|_| self.log_page == lid::SMART_HEALTH)?;
        SmartLog::parse(log).ok()
    }

    /// The Error Information entries read with the event (log page 01h), newest first.
    pub fn errors(&self) -> Option<Vec<ErrorLogEntry>> {
        let log = self
            .log
            .as_deref()
            .filter(|_| self.log_page == lid::ERROR_INFORMATION)?;
        Some(parse_error_log(log))
    }

    /// The namespaces of the Changed Namespace List read with the event (log page 04h):
    /// namespaces whose attributes, capacity or attachment changed; a list of one
    /// 0xffff_ffff means more than 1,024 changed. [`Controller::namespaces`] has followed
    /// the change by the time the callback hears of it.
    pub fn changed_namespaces(&self) -> Option<Vec<u32>> {
        let log = self
            .log
            .as_deref()
            .filter(|_| self.log_page == lid::CHANGED_NAMESPACES)?;
        Some(parse_changed_namespaces(log))
    }

    fn decoded(&self) -> AsyncEventInfo {
        AsyncEventInfo {
            kind: self.kind,
            info: self.info,
            log_page: self.log_page,
        }
    }
}

impl fmt::Display for AsyncEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.decoded().fmt(f)
    }
}

/// The data of an admin command sent by [`Controller::admin_passthru`].
#[derive(Debug, Clone, Copy)]
pub enum AdminData<'a> {
    /// No data: the data pointer is cleared.
    None,
    /// The controller writes this many bytes (returned).
    FromDevice(usize),
    /// The controller reads these bytes.
    ToDevice(&'a [u8]),
}

// The log page bytes to read to clear an event pointing at `lid`: the whole page where
// its size is fixed, 512 bytes (SMART's size, a telemetry header) otherwise.
fn event_log_len(lid: u8, elpe: u8) -> usize {
    match lid {
        lid::ERROR_INFORMATION => ((usize::from(elpe) + 1) * 64).min(PAGE as usize),
        lid::CHANGED_NAMESPACES => PAGE as usize,
        _ => SmartLog::SIZE,
    }
}

impl<B: DeviceBacking> Shared<B> {
    /// Tells the timeout callback (if one is registered) that command `cid` of queue
    /// `qid` timed out. Called holding no lock of the driver, before anything is done
    /// about the command.
    pub(crate) fn command_timed_out(&self, qid: u16, cid: u16, opcode: u8) {
        let callback = self.timeout_callback.lock().clone();
        if let Some(cb) = callback {
            cb(CommandTimeout { qid, cid, opcode });
        }
    }

    /// Runs admin command `cmd` with `data` moved through a DMA buffer of its own (PRP1,
    /// PRP2, a PRP list beyond two pages), and returns its completion whatever its status,
    /// with the bytes the controller wrote (for [`AdminData::FromDevice`]). The buffer is
    /// released only once the command completed; one that timed out is parked with the
    /// controller until it is disabled.
    pub(super) fn admin_data(
        &self,
        mut cmd: Command,
        data: AdminData<'_>,
        what: &str,
    ) -> Result<(Completion, Vec<u8>), NvmeError> {
        let len = match data {
            AdminData::None => 0,
            AdminData::FromDevice(n) => n,
            AdminData::ToDevice(d) => d.len(),
        };
        // PRPs, not SGLs (PSDT 00b).
        cmd.flags &= !0xc0;
        if len == 0 {
            cmd.prp1 = 0;
            cmd.prp2 = 0;
            return Ok((self.admin_raw(cmd, what)?, Vec::new()));
        }
        if len as u64 > self.info.max_transfer {
            return Err(NvmeError::Invalid(format!(
                "{what}: {len} bytes of data, the controller takes at most {} in one command",
                self.info.max_transfer
            )));
        }
        let pages = len.div_ceil(PAGE as usize);
        let (buf, list) = self.with_backing(|b| {
            let buf = b.alloc_dma(len)?;
            let list = if pages > 2 {
                Some(b.alloc_dma(PAGE as usize)?)
            } else {
                None
            };
            Ok((buf, list))
        })?;
        if let AdminData::ToDevice(d) = data {
            let _ = buf.write_at(0, d);
        }
        let iova = buf.iova();
        cmd.prp1 = iova;
        cmd.prp2 = match &list {
            None if pages == 2 => iova + PAGE,
            None => 0,
            Some(l) => {
                for i in 1..pages {
                    let _ = l.write::<u64>((i - 1) * 8, iova + i as u64 * PAGE);
                }
                l.iova()
            }
        };
        let epoch = self.epoch();
        match self.admin_raw(cmd, what) {
            Ok(c) => {
                let mut out = Vec::new();
                if let AdminData::FromDevice(_) = data {
                    out = vec![0u8; len];
                    let _ = buf.read_at(0, &mut out);
                }
                let proof = Released::completed(&c);
                DeviceOwned::new(buf).release(&proof);
                if let Some(l) = list {
                    DeviceOwned::new(l).release(&proof);
                }
                Ok((c, out))
            }
            // Never sent (the queue was full).
            Err(e @ NvmeError::Invalid(_)) => Err(e),
            Err(e) => {
                // The controller may still execute it.
                let mut memory = vec![DeviceOwned::new(buf).boxed()];
                memory.extend(list.map(|l| DeviceOwned::new(l).boxed()));
                self.park(epoch, memory, None);
                Err(e)
            }
        }
    }

    /// `len` bytes of log page `id` of namespace `nsid` from byte `offset`, clearing the
    /// event that points at it (Retain Asynchronous Event 0).
    pub(super) fn log_page(&self, id: u8, nsid: u32, offset: u64, len: usize) -> Result<Vec<u8>, NvmeError> {
        let what = format!("Get Log Page {id:#04x}");
        let cmd = get_log_page_command(id, nsid, len, offset, false).ok_or_else(|| {
            NvmeError::Invalid(format!(
                "{what}: {len} bytes at offset {offset}: both must be nonzero multiples of 4"
            ))
        })?;
        let (c, data) = self.admin_data(cmd, AdminData::FromDevice(len), &what)?;
        let status = c.status();
        if !status.is_success() {
            return Err(NvmeError::Command {
                command: what,
                status,
            });
        }
        Ok(data)
    }

    /// Enables the events the driver handles (Asynchronous Event Configuration) and sends
    /// Asynchronous Event Requests until as many are outstanding as wanted. Nothing when
    /// no callback is registered.
    pub(super) fn arm_async_events(&self) -> Result<(), NvmeError> {
        if self.admin.lock().aer_target == 0 {
            return Ok(());
        }
        let supported = self.info.identify.oaes & (aec::NAMESPACE_ATTRIBUTE | aec::FIRMWARE_ACTIVATION);
        let mut cmd = Command::new(admin::SET_FEATURES);
        cmd.cdw[0] = u32::from(feature::ASYNC_EVENT_CONFIG);
        cmd.cdw[1] = AEC_SMART | supported;
        match self.admin(cmd, "Set Features (Asynchronous Event Configuration)") {
            Ok(_) => {}
            // Error events are reported whatever the configuration.
            Err(e @ NvmeError::Command { .. }) => log::warn!("{}: {e}", self.info.address),
            Err(e) => return Err(e),
        }
        self.top_up_aers()
    }

    // Sends Asynchronous Event Requests until `aer_target` are outstanding.
    fn top_up_aers(&self) -> Result<(), NvmeError> {
        if let Some(e) = self.removed() {
            return Err(e);
        }
        let mut a = self.admin.lock();
        let a = &mut *a;
        let mut pushed = false;
        while a.aers.len() < a.aer_target {
            let mut cmd = Command::new(admin::ASYNC_EVENT);
            cmd.cid = a.take_cid();
            if !a.ring.push(&cmd) {
                break;
            }
            a.aers.push(cmd.cid);
            pushed = true;
        }
        if pushed && let Some(regs) = a.regs.as_ref() {
            a.ring.ring_sq(regs, None)?;
        }
        Ok(())
    }
}

impl<B: DeviceBacking> Controller<B> {
    /// Registers `callback` for asynchronous events (replacing one registered before) and
    /// keeps Asynchronous Event Requests outstanding on the admin queue from now on (AERL +
    /// 1 of them, at most 8, leaving room on the queue for other commands), after enabling
    /// the SMART / Health critical warnings and the notices the controller supports (OAES:
    /// namespace attribute, firmware activation) in the Asynchronous Event Configuration.
    /// A controller reset arms them again.
    ///
    /// The admin queue is not polled on its own: an event's completion is harvested by any
    /// admin command that runs (on any thread), or by
    /// [`process_admin_completions`](Self::process_admin_completions), which the
    /// application calls periodically (as `spdk_nvme_ctrlr_process_admin_completions`),
    /// from one thread: every second or so, or more often to hear of events sooner. That
    /// call, for each event harvested, reads the log page the event names (without Retain
    /// Asynchronous Event, so the controller clears the event and reports that type again:
    /// the Changed Namespace List for a namespace notice, Error Information for an error
    /// event, SMART / Health for a health event), sends a new request in place of the one
    /// that completed, and calls the callback with the event and the page's bytes, on the
    /// calling thread, holding no lock of the driver: the callback may run admin commands
    /// of its own. For a Namespace Attribute Changed event, before the callback, the
    /// namespaces named in the Changed Namespace List are identified again and
    /// [`namespaces`](Self::namespaces) follows: a namespace no longer active leaves it
    /// (I/O to it then fails before reaching the controller), one attached joins it, one
    /// resized has its new size.
    pub fn on_async_event(
        &self,
        callback: impl Fn(AsyncEvent) + Send + Sync + 'static,
    ) -> Result<(), NvmeError> {
        *self.shared.aer_callback.lock() = Some(Arc::new(callback));
        {
            let mut a = self.shared.admin.lock();
            let room = usize::from(a.ring.depth() - 1) / 2;
            let limit = usize::from(self.shared.info.identify.aerl) + 1;
            a.aer_target = limit.min(MAX_AERS).min(room).max(1);
        }
        self.shared.arm_async_events()
    }

    /// Registers `callback` (replacing one registered before) to hear of every command
    /// that times out — its queue id (0 for the admin queue), command id and opcode — as
    /// SPDK's `spdk_nvme_ctrlr_register_timeout_callback`. It is called when the driver
    /// finds the command past its timeout ([`Options::io_timeout`](super::Options::io_timeout)
    /// or `admin_timeout`), before the driver sends its Abort (and, if that does not end it,
    /// resets the controller), on the thread that found it: the one polling the I/O queue,
    /// or running the admin command. It holds no lock of the driver, but should be short
    /// and must not use the queue it is called from.
    pub fn on_timeout(&self, callback: impl Fn(CommandTimeout) + Send + Sync + 'static) {
        *self.shared.timeout_callback.lock() = Some(Arc::new(callback));
    }

    /// Takes the admin queue's completions that no command waits for (Asynchronous
    /// Events, answers to Aborts) and handles the events harvested since the last call:
    /// for each, reads its log page, sends a new Asynchronous Event Request, and calls the
    /// callback of [`on_async_event`](Self::on_async_event). Returns how many events
    /// reached the callback. Call it periodically from one thread, as SPDK's
    /// `spdk_nvme_ctrlr_process_admin_completions`; see
    /// [`on_async_event`](Self::on_async_event).
    ///
    /// Fails when the controller is gone, failed (CSTS.CFS) or was removed.
    pub fn process_admin_completions(&self) -> Result<usize, NvmeError> {
        let shared = &self.shared;
        if let Some(e) = shared.removed() {
            return Err(e);
        }
        let events = {
            let mut a = shared.admin.lock();
            let a = &mut *a;
            let mut seen = false;
            while let Some(c) = a.ring.pop() {
                seen = true;
                a.harvest(c, shared.info.address, &shared.abort_answers);
            }
            let Some(regs) = a.regs.as_ref() else {
                return Err(shared.revoked_error());
            };
            if seen {
                a.ring.ring_cq(regs, None)?;
            }
            check_status(regs).map_err(|e| shared.name_removal(e))?;
            std::mem::take(&mut a.events)
        };
        let callback = shared.aer_callback.lock().clone();
        let mut delivered = 0;
        for c in events {
            let status = c.status();
            if !status.is_success() {
                // The controller takes fewer requests than asked (or none): no new one in
                // its place.
                let mut a = shared.admin.lock();
                a.aer_target = a.aer_target.saturating_sub(1);
                log::warn!(
                    "{}: Asynchronous Event Request failed: {status}; {} left outstanding",
                    shared.info.address,
                    a.aer_target
                );
                continue;
            }
            let info = AsyncEventInfo::from_dw0(c.dw0);
            log::info!("{}: asynchronous event: {info}", shared.info.address);
            let log = if info.kind == AsyncEventType::Immediate {
                None
            } else {
                let len = event_log_len(info.log_page, shared.info.identify.elpe);
                shared
                    .log_page(info.log_page, NSID_ALL, 0, len)
                    .inspect_err(|e| log::warn!("{}: {info}: reading its log page: {e}", shared.info.address))
                    .ok()
            };
            // Namespace Attribute Changed: the namespace list follows, before the callback
            // hears of it.
            if info.kind == AsyncEventType::Notice
                && info.info == 0
                && info.log_page == lid::CHANGED_NAMESPACES
                && let Some(log) = &log
            {
                let changed = parse_changed_namespaces(log);
                if let Err(e) = shared.refresh_namespaces(&changed) {
                    if e.is_fatal() {
                        return Err(e);
                    }
                    log::warn!("{}: updating the namespace list: {e}", shared.info.address);
                }
            }
            if !shared.shut_down.load(std::sync::atomic::Ordering::Acquire) {
                shared.top_up_aers()?;
            }
            if let Some(cb) = &callback {
                cb(AsyncEvent {
                    kind: info.kind,
                    info: info.info,
                    log_page: info.log_page,
                    dw0: c.dw0,
                    log,
                });
                delivered += 1;
            }
        }
        Ok(delivered)
    }

    /// Reads `len` bytes (a nonzero multiple of 4, at most
    /// [`ControllerInfo::max_transfer`](super::ControllerInfo::max_transfer)) of log page
    /// `id` of namespace `nsid` (0xffff_ffff: the controller as a whole) from byte
    /// `offset` (a multiple of 4). Reading a page clears the asynchronous event waiting
    /// for it.
    pub fn get_log_page(&self, id: u8, nsid: u32, offset: u64, len: usize) -> Result<Vec<u8>, NvmeError> {
        self.shared.log_page(id, nsid, offset, len)
    }

    /// The controller's SMART / Health Information (log page 02h, for the whole
    /// controller).
    pub fn smart_log(&self) -> Result<SmartLog, NvmeError> {
        let data = self.get_log_page(lid::SMART_HEALTH, NSID_ALL, 0, SmartLog::SIZE)?;
        Ok(SmartLog::parse(&data)?)
    }

    /// The controller's Error Information log (page 01h, ELPE + 1 entries, at most what
    /// one command moves): its most recent errors, newest first, empty entries left out.
    pub fn error_log(&self) -> Result<Vec<ErrorLogEntry>, NvmeError> {
        let entries = usize::from(self.shared.info.identify.elpe) + 1;
        let len = (entries * 64).min(self.shared.info.max_transfer as usize);
        let data = self.get_log_page(lid::ERROR_INFORMATION, NSID_ALL, 0, len)?;
        Ok(parse_error_log(&data))
    }

    /// Runs admin command `cmd` with `data` (the driver sets the data pointer: PRP1,
    /// PRP2, a PRP list; and the command id) and returns its completion — dword 0 and
    /// status, successful or not — and the bytes the controller wrote for
    /// [`AdminData::FromDevice`]. For commands the driver does not wrap (vendor commands,
    /// Get Features with data, Format NVM...); at most
    /// [`ControllerInfo::max_transfer`](super::ControllerInfo::max_transfer) bytes.
    /// Fails only when the command could not run (too much data, timeout, controller
    /// gone).
    pub fn admin_passthru(
        &self,
        cmd: Command,
        data: AdminData<'_>,
    ) -> Result<(Completion, Vec<u8>), NvmeError> {
        let what = format!("admin command {:#04x} (passthrough)", cmd.opcode);
        self.shared.admin_data(cmd, data, &what)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_log_lengths() {
        assert_eq!(event_log_len(lid::ERROR_INFORMATION, 15), 1024);
        assert_eq!(event_log_len(lid::ERROR_INFORMATION, 255), 4096);
        assert_eq!(event_log_len(lid::SMART_HEALTH, 0), 512);
        assert_eq!(event_log_len(lid::CHANGED_NAMESPACES, 0), 4096);
        assert_eq!(event_log_len(0xc0, 0), 512);
    }

    #[test]
    fn command_ids_skip_those_held_by_long_running_commands() {
        let held = [5u16, 6, 0xffff, 0];
        let busy = |cid: u16| held.contains(&cid);
        let mut next = 4;
        assert_eq!(super::super::take_cid(&mut next, busy), 4);
        assert_eq!(super::super::take_cid(&mut next, busy), 7);
        let mut next = 0xfffe;
        assert_eq!(super::super::take_cid(&mut next, busy), 0xfffe);
        // Past the wrap, 0xffff and 0 are taken.
        assert_eq!(super::super::take_cid(&mut next, busy), 1);
        assert_eq!(next, 2);
    }
}
