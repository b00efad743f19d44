//! Controller bring-up, the admin queue, namespaces, and what every queue shares.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::eventfd::{EfdFlags, EventFd};
use parking_lot::Mutex;
use std::os::fd::AsFd;

use super::io::IoQueue;

mod events;
mod namespaces;
mod recovery;
use super::owned::{DeviceOwned, Released, SharedDma};
use super::queue::{Doorbells, Ring, Shadow};
use super::spec::{
    Cap, Command, Completion, IdentifyController, IdentifyControllerNvm, IdentifyNamespace, Status, admin,
    cc, cns, csts, feature, oacs, prinfo, reg,
};
use super::{Dma, NvmeError};
use crate::addr::PciAddress;
use crate::bus::backing::{DeviceBacking, DmaMemory, RegisterIo};
pub(crate) use events::io_opcode;
pub use events::{AdminData, AsyncEvent, CommandTimeout};
pub(crate) use namespaces::find_namespace;

/// The host page size the driver programs (CC.MPS = 0).
pub(crate) const PAGE: u64 = 4096;
/// The largest transfer one command carries, whatever MDTS allows: one PRP list page holds
/// its entries without chaining.
const MAX_TRANSFER: u64 = 1 << 20;

/// What [`Controller::init`] does.
#[derive(Debug, Clone)]
pub struct Options {
    /// Admin queue entries (2–4096; capped by CAP.MQES).
    pub admin_depth: u16,
    /// I/O queue pairs to ask for (Set Features Number of Queues).
    pub io_queues: u16,
    /// Use shadow doorbells (Doorbell Buffer Config) when the controller offers them.
    pub shadow_doorbells: bool,
    /// How long an admin command may take.
    pub admin_timeout: Duration,
    /// How long an I/O command may take before it fails with a timeout.
    pub io_timeout: Duration,
    /// Route MSI-X vectors to eventfds and create I/O completion queues with interrupts on,
    /// so a queue can sleep until a completion ([`IoQueue::wait`]) instead of spinning, or
    /// spin briefly and then sleep ([`IoQueue::wait_spinning`], for hosts whose cores are
    /// shared).
    pub interrupts: bool,
    /// How long after a recovery reset (CSTS.CFS, a stuck command) that did not bring the
    /// controller back the next may come; doubled at each one in a row, up to
    /// [`recovery_backoff_max`](Self::recovery_backoff_max). Meanwhile polls fail at once
    /// with [`NvmeError::RecoveryPending`].
    pub recovery_backoff: Duration,
    /// The longest wait between two recovery resets in a row.
    pub recovery_backoff_max: Duration,
    /// Recovery resets in a row (none bringing a completion) after which the controller is
    /// declared failed: every queue operation then fails with [`NvmeError::Failed`] until
    /// [`Controller::reset`].
    pub recovery_limit: u32,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            admin_depth: 32,
            io_queues: 64,
            shadow_doorbells: true,
            admin_timeout: Duration::from_secs(5),
            io_timeout: Duration::from_secs(10),
            interrupts: false,
            recovery_backoff: Duration::from_millis(10),
            recovery_backoff_max: Duration::from_secs(4),
            recovery_limit: 8,
        }
    }
}

/// A namespace, as Identify Namespace describes it.
///
/// # Metadata and protection information
///
/// The driver moves data only: buffers hold whole blocks of data, never metadata. A
/// namespace whose format has metadata is driven only when that needs no metadata
/// buffer — 8 bytes of end-to-end protection information (type 1, 2 or 3), which the
/// controller inserts on writes and checks and strips on reads (PRACT = 1; the guard is
/// checked, and for types 1 and 2 the reference tag, set to the low 32 bits of each
/// command's starting LBA). Every other format with metadata — metadata without
/// protection, or protection with more than 8 bytes of metadata, in extended LBAs or a
/// separate buffer (MPTR) — is *refused*, as Linux gives such namespaces a capacity of
/// 0: the namespace is listed with the reason in [`unusable`](Self::unusable), and every
/// request to it fails with [`NvmeError::Unsupported`] naming the reason before anything
/// reaches the controller. (Sending such a namespace plain data would have the
/// controller move more bytes than the buffer holds, or DMA metadata to MPTR 0.)
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Namespace {
    /// Its ID.
    pub nsid: u32,
    /// Size in blocks (as reported, even when the namespace is unusable).
    pub blocks: u64,
    /// Block size in bytes (512, 4096, ...): the data of a block, without metadata.
    pub block_size: u32,
    /// Metadata bytes per block of the format in use (0: none).
    pub metadata_size: u16,
    /// Whether the metadata travels with each block's data (extended LBAs) rather than in
    /// a separate buffer.
    pub extended_lba: bool,
    /// End-to-end protection type (0: none, 1–3).
    pub protection: u8,
    /// Why the driver refuses I/O to this namespace (`None`: it is usable). See the
    /// [type docs](Self).
    pub unusable: Option<String>,
    /// The Identify data.
    pub identify: IdentifyNamespace,
    // PRINFO bits of CDW12 for reads, writes and write zeroes, and whether CDW14 carries
    // the reference tag (the starting LBA's low 32 bits).
    pub(crate) prinfo: u32,
    pub(crate) reftag: bool,
}

impl Namespace {
    /// The namespace `nsid` that Identify Namespace `identify` describes, with its block
    /// size `block_size`, and how the driver drives it.
    fn new(nsid: u32, block_size: u32, identify: IdentifyNamespace) -> Self {
        let (prinfo, reftag, unusable) = match access(&identify) {
            Ok((p, r)) => (p, r, None),
            Err(why) => (0, false, Some(why)),
        };
        Namespace {
            nsid,
            blocks: identify.nsze,
            block_size,
            metadata_size: identify.metadata_size(),
            extended_lba: identify.extended_lba(),
            protection: identify.protection_type(),
            unusable,
            prinfo,
            reftag,
            identify,
        }
    }

    /// Size in bytes.
    pub fn bytes(&self) -> u64 {
        self.blocks.saturating_mul(u64::from(self.block_size))
    }

    /// Whether the driver does I/O to it ([`unusable`](Self::unusable) is `None`).
    pub fn is_usable(&self) -> bool {
        self.unusable.is_none()
    }
}

// How the driver drives a namespace of this format with data-only buffers: the PRINFO
// bits and whether a reference tag goes in CDW14; or why it cannot.
fn access(id: &IdentifyNamespace) -> Result<(u32, bool), String> {
    let layout = if id.extended_lba() {
        "extended LBAs"
    } else {
        "a separate buffer"
    };
    match (id.metadata_size(), id.protection_type()) {
        (0, 0) => Ok((0, false)),
        (0, t) => Err(format!(
            "protection type {t} without metadata (an inconsistent format)"
        )),
        (ms, 0) => Err(format!(
            "{ms} bytes of metadata per block in {layout}: the driver has no metadata buffers"
        )),
        (8, 1 | 2) => Ok((prinfo::PRACT | prinfo::PRCHK_GUARD | prinfo::PRCHK_REF, true)),
        (8, 3) => Ok((prinfo::PRACT | prinfo::PRCHK_GUARD, false)),
        (ms, t @ 1..=3) => Err(format!(
            "protection type {t} with {ms} bytes of metadata per block in {layout}: the controller \
             inserts and strips only 8 bytes of protection information, the rest of the metadata \
             would need metadata buffers"
        )),
        (_, t) => Err(format!("reserved protection type {t}")),
    }
}

/// What bring-up learnt about the controller.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ControllerInfo {
    /// The device.
    pub address: PciAddress,
    /// CAP.
    pub cap: Cap,
    /// VS.
    pub version: u32,
    /// Identify Controller.
    pub identify: IdentifyController,
    /// The largest transfer of one command, in bytes (MDTS, at most 1 MiB).
    pub max_transfer: u64,
    /// The NVM command set's limits (Identify CNS 06h: Write Zeroes size, Dataset
    /// Management ranges); all zero (no limits) when the controller (before NVMe 1.4) has
    /// not that structure.
    pub identify_nvm: IdentifyControllerNvm,
    /// How long CSTS.RDY may take to follow CC.EN: CAP.TO, or with CAP.CRMS.CRWMS set
    /// (NVMe 2.0) CRTO.CRWMT, which can say more than CAP.TO's 127.5 s.
    pub ready_timeout: Duration,
    /// I/O queue pairs granted.
    pub io_queues: u16,
    /// Whether shadow doorbells are in use.
    pub shadow_doorbells: bool,
    /// MSI-X vectors routed to eventfds (0: polled only). Vector 0 is the admin queue's.
    pub interrupt_vectors: u32,
}

// The admin queue.
struct Admin<B: DeviceBacking> {
    // Shared: the last handle keeps the memory (leaks it) when it cannot prove the
    // controller is done with it.
    ring: Ring<SharedDma<Dma<B>>>,
    regs: Option<B::Registers>,
    next_cid: u16,
    // Command ids of Aborts sent and not yet answered (at most ACL + 1).
    aborts: Vec<u16>,
    // Command ids of Asynchronous Event Requests outstanding, how many there should be
    // (0: no callback registered), and the AER completions harvested and not yet handed
    // to `Controller::process_admin_completions`.
    aers: Vec<u16>,
    aer_target: usize,
    events: Vec<Completion>,
}

impl<B: DeviceBacking> Admin<B> {
    // A command id no command outstanding for long (an Abort, an AER) holds: after 65,536
    // admin commands the counter comes round to them again.
    fn take_cid(&mut self) -> u16 {
        let Admin {
            next_cid,
            aborts,
            aers,
            ..
        } = self;
        take_cid(next_cid, |cid| aborts.contains(&cid) || aers.contains(&cid))
    }

    // A completion nobody waits for: the answer to an Abort (which then no longer is
    // outstanding; kept in `answers` for the queue that sent it), an Asynchronous Event
    // (kept for `process_admin_completions`), or a stray one (a command abandoned after
    // its timeout), logged.
    fn harvest(&mut self, c: Completion, address: PciAddress, answers: &Mutex<HashMap<u16, AbortAnswer>>) {
        let before = self.aborts.len();
        self.aborts.retain(|&cid| cid != c.cid);
        if before != self.aborts.len() {
            // Dword 0 bit 0 set: not aborted. An error status (Abort Command Limit
            // Exceeded...) did not abort it either.
            let aborted = c.status().is_success() && c.dw0 & 1 == 0;
            answers.lock().insert(
                c.cid,
                AbortAnswer {
                    aborted,
                    at: Instant::now(),
                },
            );
            return;
        }
        if let Some(i) = self.aers.iter().position(|&cid| cid == c.cid) {
            self.aers.swap_remove(i);
            self.events.push(c);
            return;
        }
        log::debug!("{address}: admin completion for cid {} ignored", c.cid);
    }
}

/// The controller's answer to an Abort.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AbortAnswer {
    /// Whether it aborted the command (whose completion, Command Abort Requested, then
    /// comes); otherwise the command is still live in the controller.
    pub(crate) aborted: bool,
    /// When the driver saw the answer.
    pub(crate) at: Instant,
}

// The next command id from `next` that `busy` does not claim (`next` moves past it).
fn take_cid(next: &mut u16, busy: impl Fn(u16) -> bool) -> u16 {
    loop {
        let cid = *next;
        *next = next.wrapping_add(1);
        if !busy(cid) {
            return cid;
        }
    }
}

// Memory and queue ids of queues that went while the controller could still use them:
// kept until the controller is disabled or bus mastering is off.
#[derive(Default)]
struct Parked {
    memory: Vec<DeviceOwned<Box<dyn Send>>>,
    qids: Vec<u16>,
}

pub(crate) type QueueRegsCell<B> = Mutex<Option<<B as DeviceBacking>::Registers>>;

// One queue's registers, which `revoke` takes away, as the queue owns them (made by
// `Shared::register_queue`). When the owner drops them, the mapping is taken out under
// the cell's lock while `revoke` can still reach the cell, so a revoke meanwhile waits for
// the unmap. Left to the `Arc`'s own drop, the unmap would run after the last strong count
// went, out of revoke's sight, and revoke could return with the device still open (the bus
// then parks it).
pub(crate) struct QueueRegs<B: DeviceBacking>(pub(super) Arc<QueueRegsCell<B>>);

impl<B: DeviceBacking> std::ops::Deref for QueueRegs<B> {
    type Target = QueueRegsCell<B>;
    fn deref(&self) -> &QueueRegsCell<B> {
        &self.0
    }
}

impl<B: DeviceBacking> Drop for QueueRegs<B> {
    fn drop(&mut self) {
        let mut cell = self.0.lock();
        drop(cell.take());
    }
}

pub(crate) struct Shared<B: DeviceBacking> {
    pub(crate) info: ControllerInfo,
    // The namespace list (see `namespaces`), its generation, and the namespaces that
    // left it at run time.
    namespaces: parking_lot::RwLock<Arc<[Namespace]>>,
    namespace_generation: AtomicU64,
    removed_namespaces: Mutex<Vec<u32>>,
    // Shared with the I/O rings' memory type (queues park theirs).
    pub(crate) shadow: Option<Shadow<SharedDma<Dma<B>>>>,
    pub(crate) io_timeout: Duration,
    // One eventfd per MSI-X vector routed (empty: polled only).
    pub(crate) interrupts: Vec<EventFd>,
    pub(crate) admin_timeout: Duration,
    backing: Mutex<Option<B>>,
    admin: Mutex<Admin<B>>,
    // Queue ids in use (index = qid) and every queue's registers, for revoke.
    qids: Mutex<Vec<bool>>,
    queue_regs: Mutex<Vec<Weak<QueueRegsCell<B>>>>,
    revoked: AtomicBool,
    reason: Mutex<String>,
    // Set when a removal of the device began (`Controller::begin_removal`): what a failure
    // seen from then on is reported as.
    removing: Mutex<Option<String>>,
    // Bumped by each controller reset: queues made before it create themselves again.
    pub(crate) generation: AtomicU64,
    // I/O queue pairs granted by the last Set Features (Number of Queues): at bring-up,
    // then after each reset (never more than at bring-up).
    io_queues_now: AtomicU16,
    // Set by a normal shutdown (its I/O queues deleted, the controller takes no more
    // commands); a reset clears it.
    pub(crate) shut_down: AtomicBool,
    // Controller disables seen complete (CSTS.RDY 0 after CC.EN 0), counted before the
    // reset that did it bumps `generation`.
    disables: AtomicU64,
    // Set once Bus Master Enable was cleared (revoke, or the last handle going).
    bus_master_off: AtomicBool,
    parked: Mutex<Parked>,
    // One reset at a time.
    resetting: Mutex<()>,
    // Answers to Aborts not yet taken by the queue that sent them, by the Abort's command
    // id (a lock of its own: the I/O path never waits for the admin queue's).
    abort_answers: Mutex<HashMap<u16, AbortAnswer>>,
    // Recovery resets in a row; `failed` mirrors whether the controller was declared
    // failed, `recovering` whether a recovery reset awaits a completion (both read on the
    // I/O path without the lock).
    recovery: Mutex<recovery::State>,
    failed: AtomicBool,
    recovering: AtomicBool,
    // What `Controller::on_async_event` and `Controller::on_timeout` registered.
    aer_callback: Mutex<Option<events::Callback>>,
    timeout_callback: Mutex<Option<events::TimeoutCallback>>,
}

impl<B: DeviceBacking> Shared<B> {
    /// I/O queue pairs the controller grants now (the last Set Features' answer).
    pub(crate) fn io_queues(&self) -> u16 {
        self.io_queues_now.load(Ordering::Acquire)
    }

    // Whether `removed` would say so, without building its error: for the I/O path.
    #[inline]
    pub(crate) fn is_revoked(&self) -> bool {
        self.revoked.load(Ordering::Acquire)
    }

    pub(crate) fn removed(&self) -> Option<NvmeError> {
        self.revoked
            .load(Ordering::Acquire)
            .then(|| NvmeError::Removed(self.reason.lock().clone()))
    }

    // Why a handle this controller dropped (its backing, its registers) is gone: the
    // revocation's reason, or just "revoked" before that reason is set.
    pub(crate) fn revoked_error(&self) -> NvmeError {
        self.removed()
            .unwrap_or_else(|| NvmeError::Removed("revoked".into()))
    }

    // A failure (gone, fatal status) seen while the device is being removed or after it
    // was revoked is the removal's doing: say so.
    pub(crate) fn name_removal(&self, e: NvmeError) -> NvmeError {
        if !matches!(e, NvmeError::Gone | NvmeError::Fatal { .. }) {
            return e;
        }
        if let Some(removed) = self.removed() {
            return removed;
        }
        match &*self.removing.lock() {
            Some(why) => NvmeError::Removed(why.clone()),
            None => e,
        }
    }

    // Runs `f` with the device's backing, holding it: `revoke` waits for `f` to return
    // before it lets the backing go. So no thread still holds a handle of the device
    // (a clone of the backing, a mapping `f` made) once `revoke` has returned, which is
    // when the bus counts them — a clone taken out of the lock would outlive it. `f` must
    // not wait for anything `revoke` holds before this lock (the admin queue, the queue
    // registrations): allocating and mapping only.
    pub(crate) fn with_backing<T>(&self, f: impl FnOnce(&B) -> Result<T, NvmeError>) -> Result<T, NvmeError> {
        match &*self.backing.lock() {
            Some(b) => f(b),
            None => Err(self.revoked_error()),
        }
    }

    /// Runs one admin command and waits for it; an error status is an error.
    pub(crate) fn admin(&self, cmd: Command, what: &str) -> Result<Completion, NvmeError> {
        let c = self.admin_raw(cmd, what)?;
        let status = c.status();
        if status.is_success() {
            Ok(c)
        } else {
            Err(NvmeError::Command {
                command: what.to_owned(),
                status,
            })
        }
    }

    /// Runs one admin command and waits for its completion, whatever its status.
    pub(crate) fn admin_raw(&self, mut cmd: Command, what: &str) -> Result<Completion, NvmeError> {
        if let Some(e) = self.removed() {
            return Err(e);
        }
        if self.shut_down.load(Ordering::Acquire) {
            return Err(NvmeError::Removed(format!(
                "{what}: the controller was shut down"
            )));
        }
        let mut guard = self.admin.lock();
        let a = &mut *guard;
        if a.regs.is_none() {
            return Err(self.revoked_error());
        }
        cmd.cid = a.take_cid();
        let Admin { ring, regs, .. } = &mut *a;
        let Some(regs) = regs.as_ref() else {
            return Err(self.revoked_error());
        };
        if !ring.push(&cmd) {
            return Err(NvmeError::Invalid("admin queue full".into()));
        }
        ring.ring_sq(regs, None)?;
        let start = Instant::now();
        let mut spins = 0u32;
        let timed_out = loop {
            while let Some(c) = a.ring.pop() {
                if c.cid != cmd.cid {
                    // An Abort's answer, an asynchronous event, or a stray completion.
                    a.harvest(c, self.info.address, &self.abort_answers);
                    continue;
                }
                let Admin { ring, regs, .. } = &mut *a;
                if let Some(regs) = regs.as_ref() {
                    ring.ring_cq(regs, None)?;
                }
                return Ok(c);
            }
            let Some(regs) = a.regs.as_ref() else {
                return Err(self.revoked_error());
            };
            if let Some(e) = self.removed() {
                return Err(e);
            }
            if start.elapsed() > self.admin_timeout {
                check_status(regs)?;
                break NvmeError::Timeout {
                    what: what.to_owned(),
                    waited: self.admin_timeout,
                };
            }
            spins += 1;
            if spins < 1000 {
                std::hint::spin_loop();
            } else {
                if spins.is_multiple_of(256) {
                    check_status(regs)?;
                }
                thread::sleep(Duration::from_micros(50));
            }
        };
        // The callback runs without the admin queue's lock: it may send admin commands.
        drop(guard);
        self.command_timed_out(0, cmd.cid, cmd.opcode);
        Err(timed_out)
    }

    /// Sends Abort for command `cid` of submission queue `sqid` without waiting for its
    /// answer (answers are collected here, by `admin` and by `collect_abort_answers`, and
    /// taken with `take_abort_answer`): returns the Abort's command id. `None`, nothing
    /// sent, when it cannot be sent now: the Abort Command Limit (ACL + 1 outstanding) is
    /// reached, the admin queue is full, or another thread holds the admin queue (an admin
    /// command in progress: the I/O path never waits for it). The caller tries again
    /// later; a command that never gets its Abort is ended by a controller reset.
    pub(crate) fn try_abort(&self, sqid: u16, cid: u16) -> Option<u16> {
        let mut a = self.admin.try_lock()?;
        let a = &mut *a;
        a.regs.as_ref()?;
        let mut seen = false;
        while let Some(c) = a.ring.pop() {
            seen = true;
            a.harvest(c, self.info.address, &self.abort_answers);
        }
        if a.aborts.len() > usize::from(self.info.identify.acl) {
            if seen && let Some(regs) = a.regs.as_ref() {
                let _ = a.ring.ring_cq(regs, None);
            }
            return None;
        }
        let mut cmd = Command::new(admin::ABORT);
        cmd.cid = a.take_cid();
        cmd.cdw[0] = u32::from(sqid) | u32::from(cid) << 16;
        let Admin {
            ring, regs, aborts, ..
        } = a;
        let regs = regs.as_ref()?;
        if seen {
            let _ = ring.ring_cq(regs, None);
        }
        if !ring.push(&cmd) {
            return None;
        }
        aborts.push(cmd.cid);
        // An answer left from an earlier Abort with this command id is not this one's.
        self.abort_answers.lock().remove(&cmd.cid);
        // A failed doorbell write leaves it in the ring: the next admin command rings it.
        let _ = ring.ring_sq(regs, None);
        Some(cmd.cid)
    }

    /// Takes the admin queue's completions nobody waits for (answers to Aborts among
    /// them), unless another thread holds the admin queue (whose command then collects
    /// them): the I/O path never waits for it.
    pub(crate) fn collect_abort_answers(&self) {
        let Some(mut a) = self.admin.try_lock() else {
            return;
        };
        let a = &mut *a;
        let mut seen = false;
        while let Some(c) = a.ring.pop() {
            seen = true;
            a.harvest(c, self.info.address, &self.abort_answers);
        }
        if seen && let Some(regs) = a.regs.as_ref() {
            let _ = a.ring.ring_cq(regs, None);
        }
    }

    /// The answer to the Abort with command id `abort_cid`, once it came (taken).
    pub(crate) fn take_abort_answer(&self, abort_cid: u16) -> Option<AbortAnswer> {
        self.abort_answers.lock().remove(&abort_cid)
    }

    // The epoch of memory in use from now on: the controller disables seen so far.
    pub(crate) fn epoch(&self) -> u64 {
        self.disables.load(Ordering::Acquire)
    }

    /// Proof that memory the controller used in `epoch` (or earlier) is out of its reach:
    /// the controller was disabled since, or bus mastering is off.
    pub(crate) fn quiesced_since(&self, epoch: u64) -> Option<Released> {
        if self.bus_master_off.load(Ordering::Acquire) {
            return Some(Released::bus_master_off());
        }
        (self.disables.load(Ordering::Acquire) > epoch).then(Released::disabled)
    }

    /// Keeps `memory` the controller may still reach (used in `epoch`), and queue id `qid`
    /// it may still own, until the controller is disabled or bus mastering is off; at once
    /// if that happened already.
    pub(crate) fn park(&self, epoch: u64, memory: Vec<DeviceOwned<Box<dyn Send>>>, qid: Option<u16>) {
        let mut parked = self.parked.lock();
        if let Some(proof) = self.quiesced_since(epoch) {
            drop(parked);
            for m in memory {
                m.release(&proof);
            }
            if let Some(qid) = qid {
                self.free_qid(qid);
            }
            return;
        }
        parked.memory.extend(memory);
        parked.qids.extend(qid);
    }

    // Releases what was parked: `proof` says the controller can no longer reach it.
    fn unpark(&self, proof: &Released) {
        let parked = std::mem::take(&mut *self.parked.lock());
        if !parked.memory.is_empty() {
            log::info!(
                "{}: {} parked DMA allocation(s) released: {}",
                self.info.address,
                parked.memory.len(),
                proof.reason()
            );
        }
        for m in parked.memory {
            m.release(proof);
        }
        for qid in parked.qids {
            self.free_qid(qid);
        }
    }

    /// Resets the controller (CC.EN 1 → 0 → 1, the admin queue set up again) and
    /// configures it again (queue count, shadow doorbells). Every I/O queue is gone on the
    /// controller; each creates itself again at its next use, ending what it had
    /// outstanding with [`NvmeError::Reset`].
    pub(crate) fn reset(&self, why: &str) -> Result<(), NvmeError> {
        let _one = self.resetting.lock();
        self.reset_locked(why)?;
        self.recovery_clear();
        Ok(())
    }

    fn reset_locked(&self, why: &str) -> Result<(), NvmeError> {
        use crate::bus::backing::DmaMemory;
        if let Some(e) = self.removed() {
            return Err(e);
        }
        let limit = self.info.ready_timeout;
        log::warn!("{}: resetting the controller: {why}", self.info.address);
        {
            let mut a = self.admin.lock();
            let Admin {
                ring,
                regs,
                next_cid,
                aborts,
                aers,
                ..
            } = &mut *a;
            let Some(regs) = regs.as_ref() else {
                return Err(self.revoked_error());
            };
            disable(regs, limit, "reset: controller disable (CSTS.RDY = 0)")?;
            // Disabled: every command is gone, with every I/O queue and every Abort, and
            // the controller reaches no memory until it is enabled again.
            self.disables.fetch_add(1, Ordering::AcqRel);
            self.unpark(&Released::disabled());
            aborts.clear();
            self.abort_answers.lock().clear();
            // Gone with the controller's state; armed again below.
            aers.clear();
            ring.reset();
            *next_cid = 0;
            enable(regs, ring, limit, "reset: controller enable (CSTS.RDY = 1)")?;
        }
        self.shut_down.store(false, Ordering::Release);
        let n = self.info.io_queues;
        let mut cmd = Command::new(admin::SET_FEATURES);
        cmd.cdw[0] = u32::from(feature::NUMBER_OF_QUEUES);
        cmd.cdw[1] = u32::from(n - 1) << 16 | u32::from(n - 1);
        let c = self.admin(cmd, "Set Features (Number of Queues) after reset")?;
        // The controller may grant fewer than before (resources reassigned): queues above
        // the grant cannot be created again, and no new queue gets their ids.
        let granted = granted_queues(n, c.dw0);
        if granted < n {
            log::warn!(
                "{}: after the reset the controller grants {granted} of {n} I/O queues",
                self.info.address
            );
        }
        self.io_queues_now.store(granted, Ordering::Release);
        if let Some(s) = &self.shadow {
            s.doorbells.zero();
            s.events.zero();
            let mut cmd = Command::new(admin::DOORBELL_BUFFER_CONFIG);
            cmd.prp1 = s.doorbells.iova();
            cmd.prp2 = s.events.iova();
            self.admin(cmd, "Doorbell Buffer Config after reset")?;
        }
        // Asynchronous events as they were before (the configuration is gone too).
        if let Err(e) = self.arm_async_events() {
            log::warn!("{}: asynchronous events after reset: {e}", self.info.address);
        }
        self.generation.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    pub(crate) fn alloc_qid(&self) -> Option<u16> {
        let mut q = self.qids.lock();
        let granted = usize::from(self.io_queues());
        let free = q.iter().take(granted + 1).skip(1).position(|used| !used)? + 1;
        q[free] = true;
        Some(free as u16)
    }

    pub(crate) fn free_qid(&self, qid: u16) {
        if let Some(slot) = self.qids.lock().get_mut(usize::from(qid)) {
            *slot = false;
        }
    }

    // Registers a queue's BAR mapping for `revoke` to take away, and gives it to the
    // queue.
    pub(crate) fn register_queue(&self, registers: B::Registers) -> QueueRegs<B> {
        let cell = Arc::new(Mutex::new(Some(registers)));
        let mut list = self.queue_regs.lock();
        list.retain(|w| w.strong_count() > 0);
        list.push(Arc::downgrade(&cell));
        QueueRegs(cell)
    }
}

// I/O queue pairs granted by Set Features (Number of Queues) answering `dw0`, of `want`.
fn granted_queues(want: u16, dw0: u32) -> u16 {
    want.min((dw0 & 0xffff) as u16 + 1).min((dw0 >> 16) as u16 + 1)
}

impl<B: DeviceBacking> Shared<B> {
    // At the last handle: makes the controller unable to reach memory it was given — the
    // admin rings, the shadow doorbells, what queues parked — and says how (`None`: it
    // could not). Bus mastering off already (revoke) will do; else the controller is
    // disabled (CC.EN 0, then CSTS.RDY 0 within the ready timeout); else Bus Master Enable
    // is cleared and read back clear.
    fn stop_dma_for_good(&mut self) -> Option<Released> {
        if self.bus_master_off.load(Ordering::Acquire) {
            return Some(Released::bus_master_off());
        }
        let address = self.info.address;
        if let Some(regs) = self.admin.get_mut().regs.as_ref() {
            match disable(
                regs,
                self.info.ready_timeout,
                "disable at the last handle (CSTS.RDY = 0)",
            ) {
                Ok(()) => return Some(Released::disabled()),
                Err(e) => log::warn!("{address}: {e}; turning bus mastering off instead"),
            }
        }
        if let Some(b) = self.backing.get_mut().as_ref() {
            match clear_bus_master(b) {
                Ok(()) => return Some(Released::bus_master_off()),
                Err(e) => log::warn!("{address}: clearing Bus Master Enable: {e}"),
            }
        }
        None
    }
}

impl<B: DeviceBacking> Drop for Shared<B> {
    fn drop(&mut self) {
        // Everything the controller may still reach by DMA: it is enabled with bus
        // mastering on until shown otherwise, and an Asynchronous Event Request (or a
        // command abandoned after its timeout) may complete into the admin queue at any
        // moment.
        let (sq, cq) = self.admin.get_mut().ring.memory();
        let mut memory = vec![DeviceOwned::new((sq.clone(), cq.clone())).boxed()];
        if let Some(shadow) = self.shadow.take() {
            memory.push(DeviceOwned::new(shadow).boxed());
        }
        memory.append(&mut self.parked.get_mut().memory);
        match self.stop_dma_for_good() {
            Some(proof) => {
                for m in memory {
                    m.release(&proof);
                }
            }
            None => {
                // Each `DeviceOwned` leaks its memory as it drops (the admin rings through
                // the clones above).
                log::error!(
                    "{}: the controller may still reach {} DMA allocation(s) (the admin rings among them): it \
                     could be neither disabled nor have bus mastering turned off; leaking them",
                    self.info.address,
                    memory.len()
                );
            }
        }
    }
}

// Clears CC.EN and waits (at most `limit`) for CSTS.RDY 0: the controller is then idle
// and reaches no memory until it is enabled again.
fn disable<R: RegisterIo>(regs: &R, limit: Duration, what: &str) -> Result<(), NvmeError> {
    let cc_now = regs.read32(reg::CC)?;
    if cc_now == u32::MAX {
        return Err(NvmeError::Gone);
    }
    regs.write32(reg::CC, cc_now & !(cc::EN | cc::SHN_MASK))?;
    wait_ready(regs, false, limit, what)
}

// Clears Bus Master Enable and reads it back: a device that is gone (config space
// all-ones) or ignored the write leaves it set, which proves nothing.
fn clear_bus_master<B: DeviceBacking>(backing: &B) -> Result<(), NvmeError> {
    backing.set_bus_master(false)?;
    if backing.bus_master()? {
        return Err(NvmeError::Removed(
            "Bus Master Enable still reads set after it was cleared: the device is gone or ignored the write"
                .into(),
        ));
    }
    Ok(())
}

// Points a disabled controller at the admin queue `ring`, enables it (4 KiB pages, NVM
// command set, 64/16-byte entries) and waits until it is ready.
fn enable<R: RegisterIo, D: DmaMemory>(
    regs: &R,
    ring: &Ring<D>,
    limit: Duration,
    what: &str,
) -> Result<(), NvmeError> {
    let last = u32::from(ring.depth() - 1);
    regs.write32(reg::AQA, last << 16 | last)?;
    // Two 32-bit writes each: every controller takes them (some refuse 64-bit ones).
    for (at, iova) in [(reg::ASQ, ring.sq_iova()), (reg::ACQ, ring.cq_iova())] {
        regs.write32(at, iova as u32)?;
        regs.write32(at + 4, (iova >> 32) as u32)?;
    }
    // The zeroed admin rings before the enable that hands them to the controller.
    crate::barrier::dma_wmb();
    regs.write32(reg::CC, cc::EN | 6 << cc::IOSQES_SHIFT | 4 << cc::IOCQES_SHIFT)?;
    wait_ready(regs, true, limit, what)
}

// Gone (all-ones) or failed (CFS) controllers end waits at once.
pub(crate) fn check_status<R: RegisterIo>(regs: &R) -> Result<(), NvmeError> {
    let csts = regs.read32(reg::CSTS)?;
    if csts == u32::MAX {
        return Err(NvmeError::Gone);
    }
    if csts & csts::CFS != 0 {
        return Err(NvmeError::Fatal { csts });
    }
    Ok(())
}

/// A controller brought up by the driver: cheap to clone (a handle), shared by the threads
/// that make [`IoQueue`]s from it. See the [module docs](super).
pub struct Controller<B: DeviceBacking> {
    shared: Arc<Shared<B>>,
}

impl<B: DeviceBacking> Clone for Controller<B> {
    fn clone(&self) -> Self {
        Controller {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<B: DeviceBacking> std::fmt::Debug for Controller<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Controller")
            .field("address", &self.shared.info.address)
            .field("model", &self.shared.info.identify.model)
            .field("namespaces", &self.shared.namespaces.read().len())
            .field("revoked", &self.shared.revoked.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

// Waits (at most `limit`, at least 500 ms) for CSTS.RDY to become `ready`.
fn wait_ready<R: RegisterIo>(regs: &R, ready: bool, limit: Duration, what: &str) -> Result<(), NvmeError> {
    let limit = limit.max(Duration::from_millis(500));
    let start = Instant::now();
    loop {
        let csts = regs.read32(reg::CSTS)?;
        if csts == u32::MAX {
            return Err(NvmeError::Gone);
        }
        if ready && csts & csts::CFS != 0 {
            return Err(NvmeError::Fatal { csts });
        }
        if (csts & csts::RDY != 0) == ready {
            return Ok(());
        }
        if start.elapsed() > limit {
            return Err(NvmeError::Timeout {
                what: what.to_owned(),
                waited: limit,
            });
        }
        thread::sleep(Duration::from_micros(100));
    }
}

fn identify<B: DeviceBacking>(
    shared_admin: &dyn Fn(Command, &str) -> Result<Completion, NvmeError>,
    buf: &Dma<B>,
    cns_value: u32,
    nsid: u32,
    what: &str,
) -> Result<Vec<u8>, NvmeError> {
    use crate::bus::backing::DmaMemory;
    buf.zero();
    let mut cmd = Command::new(admin::IDENTIFY);
    cmd.nsid = nsid;
    cmd.prp1 = buf.iova();
    cmd.cdw[0] = cns_value;
    shared_admin(cmd, what)?;
    let mut data = vec![0u8; 4096];
    let _ = buf.read_at(0, &mut data);
    Ok(data)
}

impl<B: DeviceBacking> Controller<B> {
    /// Brings the controller up: reads CAP, disables it, sets up the admin queue,
    /// enables it, identifies it and its active namespaces, asks for `io_queues` queue
    /// pairs and turns shadow doorbells on when offered.
    pub fn init(backing: B, options: &Options) -> Result<Controller<B>, NvmeError> {
        use crate::bus::backing::DmaMemory;
        let address = backing.address();
        // Memory space (the registers) and bus mastering (the controller's DMA) on.
        backing.set_bus_master(true)?;
        let regs = backing.map_bar(0)?;
        let cap = Cap(regs.read64(reg::CAP)?);
        if cap.0 == u64::MAX {
            return Err(NvmeError::Gone);
        }
        let version = regs.read32(reg::VS)?;
        if cap.css() & 1 == 0 {
            return Err(NvmeError::Unsupported(format!(
                "{address}: no NVM command set (CAP.CSS {:#x})",
                cap.css()
            )));
        }
        if !(cap.page_size_min()..=cap.page_size_max()).contains(&PAGE) {
            return Err(NvmeError::Unsupported(format!(
                "{address}: 4 KiB pages not supported (CAP.MPSMIN {} bytes)",
                cap.page_size_min()
            )));
        }
        // NVMe 2.0: a controller that may take longer than CAP.TO can say reports it in
        // CRTO.
        let crto = if cap.crwms() { regs.read32(reg::CRTO)? } else { 0 };
        let ready_timeout = Duration::from_millis(cap.ready_timeout_ms(crto));
        // Disable: an enabled controller that is not ready yet must become ready first.
        let cc_now = regs.read32(reg::CC)?;
        if cc_now & cc::EN != 0 {
            if regs.read32(reg::CSTS)? & csts::RDY == 0 {
                wait_ready(&regs, true, ready_timeout, "controller ready before disabling")?;
            }
            regs.write32(reg::CC, cc_now & !cc::EN)?;
        }
        wait_ready(&regs, false, ready_timeout, "controller disable (CSTS.RDY = 0)")?;

        let depth = options
            .admin_depth
            .clamp(2, 4096)
            .min(cap.max_queue_entries().min(4096) as u16);
        let sq = backing.alloc_dma(usize::from(depth) * Command::SIZE)?;
        let cq = backing.alloc_dma(usize::from(depth) * Completion::SIZE)?;
        let ring = Ring::new(
            0,
            depth,
            SharedDma::new(sq),
            SharedDma::new(cq),
            Doorbells::of(cap, 0),
        );
        enable(&regs, &ring, ready_timeout, "controller enable (CSTS.RDY = 1)")?;

        let mut shared = Shared {
            info: ControllerInfo {
                address,
                cap,
                version,
                identify: IdentifyController::parse(&[0u8; 4096])?,
                max_transfer: 0,
                identify_nvm: IdentifyControllerNvm::default(),
                ready_timeout,
                io_queues: 0,
                shadow_doorbells: false,
                interrupt_vectors: 0,
            },
            namespaces: parking_lot::RwLock::new(Arc::from(Vec::new())),
            namespace_generation: AtomicU64::new(0),
            removed_namespaces: Mutex::new(Vec::new()),
            shadow: None,
            interrupts: Vec::new(),
            io_timeout: options.io_timeout,
            admin_timeout: options.admin_timeout,
            backing: Mutex::new(None),
            admin: Mutex::new(Admin {
                ring,
                regs: Some(regs),
                next_cid: 0,
                aborts: Vec::new(),
                aers: Vec::new(),
                aer_target: 0,
                events: Vec::new(),
            }),
            qids: Mutex::new(Vec::new()),
            queue_regs: Mutex::new(Vec::new()),
            revoked: AtomicBool::new(false),
            removing: Mutex::new(None),
            reason: Mutex::new(String::new()),
            generation: AtomicU64::new(0),
            io_queues_now: AtomicU16::new(0),
            shut_down: AtomicBool::new(false),
            disables: AtomicU64::new(0),
            bus_master_off: AtomicBool::new(false),
            parked: Mutex::new(Parked::default()),
            resetting: Mutex::new(()),
            abort_answers: Mutex::new(HashMap::new()),
            recovery: Mutex::new(recovery::State::new(options)),
            failed: AtomicBool::new(false),
            recovering: AtomicBool::new(false),
            aer_callback: Mutex::new(None),
            timeout_callback: Mutex::new(None),
        };
        let buf = backing.alloc_dma(4096)?;
        let run = |cmd: Command, what: &str| shared.admin(cmd, what);
        let id = IdentifyController::parse(&identify::<B>(
            &run,
            &buf,
            cns::CONTROLLER,
            0,
            "Identify controller",
        )?)?;
        if id.sqes & 0xf > 6 || id.cqes & 0xf > 4 {
            return Err(NvmeError::Unsupported(format!(
                "{address}: entry sizes SQES {:#x} CQES {:#x}",
                id.sqes, id.cqes
            )));
        }
        // The NVM command set's limits (NVMe 1.4 and later); an older or odd controller
        // that refuses the structure has none.
        let mut identify_nvm = IdentifyControllerNvm::default();
        if version >= 0x0001_0400 {
            let mut cmd = Command::new(admin::IDENTIFY);
            cmd.prp1 = buf.iova();
            cmd.cdw[0] = cns::IO_CONTROLLER;
            buf.zero();
            match run(cmd, "Identify controller (NVM command set)") {
                Ok(_) => {
                    let mut data = vec![0u8; 4096];
                    let _ = buf.read_at(0, &mut data);
                    identify_nvm = IdentifyControllerNvm::parse(&data)?;
                }
                Err(e) if Controller::<B>::status_of(&e).is_some() => {
                    log::info!("{address}: no NVM command set limits: {e}");
                }
                Err(e) => return Err(e),
            }
        }
        let list = namespaces::active_namespace_ids(|after| {
            identify::<B>(
                &run,
                &buf,
                cns::ACTIVE_NAMESPACES,
                after,
                "Identify active namespace list",
            )
        })?;
        let mut namespaces = Vec::new();
        for nsid in list {
            let data = identify::<B>(
                &run,
                &buf,
                cns::NAMESPACE,
                nsid,
                &format!("Identify namespace {nsid}"),
            )?;
            namespaces.extend(namespaces::namespace_from(address, nsid, &data)?);
        }
        let want = options.io_queues.clamp(1, 65534);
        let mut cmd = Command::new(admin::SET_FEATURES);
        cmd.cdw[0] = u32::from(feature::NUMBER_OF_QUEUES);
        cmd.cdw[1] = u32::from(want - 1) << 16 | u32::from(want - 1);
        let c = run(cmd, "Set Features (Number of Queues)")?;
        let granted = granted_queues(want, c.dw0);
        let mut shadow = None;
        if options.shadow_doorbells && id.oacs & oacs::DOORBELL_BUFFER_CONFIG != 0 {
            let doorbells = backing.alloc_dma(PAGE as usize)?;
            let events = backing.alloc_dma(PAGE as usize)?;
            let mut cmd = Command::new(admin::DOORBELL_BUFFER_CONFIG);
            cmd.prp1 = doorbells.iova();
            cmd.prp2 = events.iova();
            match run(cmd, "Doorbell Buffer Config") {
                Ok(_) => {
                    shadow = Some(Shadow {
                        doorbells: SharedDma::new(doorbells),
                        events: SharedDma::new(events),
                    })
                }
                Err(e) => log::warn!("{address}: shadow doorbells offered but refused: {e}"),
            }
        }
        let mut interrupts = Vec::new();
        if options.interrupts {
            // Every vector in one call: some kernels (6.1) cannot add vectors to MSI-X once
            // it is enabled.
            let n = backing.max_interrupts().min(u32::from(granted) + 1);
            if n == 0 {
                return Err(NvmeError::Unsupported(format!("{address}: no MSI-X vectors")));
            }
            for _ in 0..n {
                interrupts.push(
                    EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
                        .map_err(|e| NvmeError::Invalid(format!("eventfd for an interrupt vector: {e}")))?,
                );
            }
            let fds: Vec<_> = interrupts.iter().map(|e| e.as_fd()).collect();
            backing.route_interrupts(&fds)?;
        }
        let max_transfer = id
            .max_transfer(cap.page_size_min())
            .unwrap_or(MAX_TRANSFER)
            .min(MAX_TRANSFER);
        shared.info.identify = id;
        shared.info.max_transfer = max_transfer;
        shared.info.identify_nvm = identify_nvm;
        shared.info.io_queues = granted;
        *shared.io_queues_now.get_mut() = granted;
        shared.info.shadow_doorbells = shadow.is_some();
        shared.info.interrupt_vectors = interrupts.len() as u32;
        shared.interrupts = interrupts;
        // Sorted by NSID there (the controller lists them in increasing order; nothing
        // relies on it).
        shared.set_namespaces(namespaces);
        shared.shadow = shadow;
        *shared.qids.get_mut() = vec![false; usize::from(granted) + 1];
        *shared.backing.get_mut() = Some(backing);
        Ok(Controller {
            shared: Arc::new(shared),
        })
    }

    /// What bring-up learnt.
    pub fn info(&self) -> &ControllerInfo {
        &self.shared.info
    }

    /// The active namespaces with a valid format, by NSID: the usable ones and those
    /// the driver refuses ([`Namespace::unusable`] says why). A snapshot: the list follows
    /// Namespace Attribute Changed events as
    /// [`process_admin_completions`](Self::process_admin_completions) handles them
    /// (namespaces attached, detached, resized), and a later call returns the new list.
    pub fn namespaces(&self) -> Arc<[Namespace]> {
        self.shared.namespace_list()
    }

    /// Namespace `nsid`, as the list has it now (see [`namespaces`](Self::namespaces)).
    pub fn namespace(&self, nsid: u32) -> Option<Namespace> {
        self.shared.namespace(nsid)
    }

    /// I/O queue pairs the controller grants now: [`ControllerInfo::io_queues`] at
    /// bring-up, what the last reset's Set Features granted since (never more).
    pub fn io_queues(&self) -> u16 {
        self.shared.io_queues()
    }

    /// Allocates `len` bytes of DMA memory for I/O buffers (zeroed, whole pages).
    pub fn alloc_buffer(&self, len: usize) -> Result<super::Buffer<B>, NvmeError> {
        self.shared.with_backing(|b| Ok(Arc::new(b.alloc_dma(len)?)))
    }

    /// Maps memory the application owns for the controller, as SPDK's `spdk_mem_register`:
    /// a [`DmaBuffer`](crate::vfio::DmaBuffer) of its own pages
    /// ([`DmaBuffer::from_memory`](crate::vfio::DmaBuffer::from_memory) of a
    /// [`CallerMemory`](crate::vfio::CallerMemory) such as a
    /// [`PageBuffer`](crate::vfio::PageBuffer)) becomes a [`Buffer`](super::Buffer) that
    /// requests read into and write from, like one from
    /// [`alloc_buffer`](Self::alloc_buffer). [`unregister_buffer`](Self::unregister_buffer)
    /// gives the memory back. On failure the memory comes back in the error, unmapped.
    pub fn register_buffer(
        &self,
        memory: crate::vfio::DmaBuffer,
    ) -> Result<super::Buffer<B>, Box<crate::bus::MapDmaError>> {
        let backing = self.shared.backing.lock();
        let Some(b) = &*backing else {
            return Err(Box::new(crate::bus::MapDmaError {
                error: crate::bus::BackingError::Other {
                    address: self.shared.info.address,
                    message: self.shared.revoked_error().to_string(),
                },
                buffer: memory,
            }));
        };
        Ok(Arc::new(b.map_dma(memory, &crate::bus::DmaConstraints::new())?))
    }

    /// Unmaps a buffer (from [`register_buffer`](Self::register_buffer), or any other) and
    /// gives its memory back once the controller can no longer reach it:
    /// [`DmaBuffer::into_memory`](crate::vfio::DmaBuffer::into_memory) then returns the
    /// caller's memory. Fails, keeping the buffer mapped, while anything else holds it: a
    /// clone of the application's, or a queue whose command may still use it (a request in
    /// flight, or one that timed out and was abandoned: see the
    /// no-late-DMA rule in the [module docs](super)). Poll the queue until the command ends.
    #[allow(clippy::type_complexity)]
    pub fn unregister_buffer(
        &self,
        buffer: super::Buffer<B>,
    ) -> Result<crate::vfio::DmaBuffer, (NvmeError, Option<super::Buffer<B>>)> {
        let dma = match Arc::try_unwrap(buffer) {
            Ok(dma) => dma,
            Err(buffer) => {
                let holders = Arc::strong_count(&buffer) - 1;
                return Err((
                    NvmeError::Invalid(format!(
                        "the buffer is still held {holders} more time(s) (a clone, or a command that may still \
                         use it): not unmapped"
                    )),
                    Some(buffer),
                ));
            }
        };
        let backing = self.shared.backing.lock();
        match &*backing {
            // A failed unmap keeps the memory from everyone (the device might still reach it).
            Some(b) => b.unmap_dma(dma).map_err(|e| (NvmeError::from(e), None)),
            // Revoked: the device is closed, but the mapping is the backing's to undo.
            None => Err((self.shared.revoked_error(), Some(Arc::new(dma)))),
        }
    }

    /// Creates an I/O queue pair of `depth` entries (capped by CAP.MQES) for the calling
    /// thread.
    pub fn io_queue(&self, depth: u16) -> Result<IoQueue<B>, NvmeError> {
        if let Some(e) = self.shared.failed_error() {
            return Err(e);
        }
        IoQueue::create(Arc::clone(&self.shared), depth)
    }

    /// Runs an admin command and waits for it (Identify, Get Log Page, vendor commands...).
    /// Data goes through `cmd.prp1`/`prp2`, which must point at this controller's DMA
    /// memory.
    pub fn admin(&self, cmd: Command, what: &str) -> Result<Completion, NvmeError> {
        self.shared.admin(cmd, what)
    }

    /// Resets the controller and sets it up again; every I/O queue creates itself again at
    /// its next use, ending what it had outstanding with [`NvmeError::Reset`]. Queues do
    /// it themselves when a timed-out command can be neither completed nor aborted, or the
    /// controller failed (CSTS.CFS), backing off and up to a bound
    /// ([`Options::recovery_limit`]); a controller declared failed is reset again only
    /// here, which starts recovery afresh when it works.
    pub fn reset(&self) -> Result<(), NvmeError> {
        self.shared.reset("asked by the application")
    }

    /// Whether the controller was taken away.
    pub fn is_revoked(&self) -> bool {
        self.shared.revoked.load(Ordering::Acquire)
    }

    /// Says that the device is being removed (`reason`, e.g. "vfio removal request"),
    /// before the driver shuts the controller down and [revokes](Self::revoke) it: a
    /// failure an I/O thread sees from now on (registers all-ones, CSTS.CFS) is reported as
    /// [`NvmeError::Removed`] with this reason, not as the controller's failure. The first
    /// reason stands.
    pub fn begin_removal(&self, reason: &str) {
        self.shared
            .removing
            .lock()
            .get_or_insert_with(|| reason.to_owned());
    }

    /// Takes the controller away: every queue fails at its next use (outstanding requests
    /// end with [`NvmeError::Removed`]) and every handle of the device this controller
    /// holds — its backing, the admin and queue registers — is dropped now, whatever the
    /// threads using the queues are doing. What the bus's removal calls: the kernel's
    /// removal then does not wait for those threads. DMA memory stays until its owners drop
    /// it. Idempotent.
    pub fn revoke(&self, reason: &str) {
        // The reason before the flag: a thread that sees the flag reads the reason.
        {
            let mut r = self.shared.reason.lock();
            if self.shared.revoked.load(Ordering::Acquire) {
                return;
            }
            *r = reason.to_owned();
            self.shared.revoked.store(true, Ordering::Release);
        }
        // No more DMA from the function: the threads holding queues free their buffers
        // (unmapping them) as they see the revocation, possibly while commands are still
        // in flight. Bus Master Enable off stops the controller's DMA at once (a device
        // that is gone ignores the write).
        if let Some(b) = self.shared.backing.lock().as_ref() {
            // Whatever the controller still writes must not land in memory mapped again.
            b.quarantine_dma();
            // Read back: a device that is gone (all-ones) or ignored the write proves
            // nothing, and its parked memory must stay parked.
            match clear_bus_master(b) {
                Ok(()) => {
                    self.shared.bus_master_off.store(true, Ordering::Release);
                    self.shared.unpark(&Released::bus_master_off());
                }
                // Memory the controller may still reach stays parked (and leaks if the
                // controller's last handle cannot turn bus mastering off either).
                Err(e) => log::warn!(
                    "{}: revoke: clearing Bus Master Enable failed: {e}",
                    self.shared.info.address
                ),
            }
        }
        // An admin command in progress sees `revoked` at its next poll and lets go.
        self.shared.admin.lock().regs = None;
        for q in self.shared.queue_regs.lock().drain(..) {
            if let Some(q) = q.upgrade() {
                *q.lock() = None;
            }
        }
        *self.shared.backing.lock() = None;
    }

    /// Normal shutdown, for an orderly release: deletes the I/O queues still open on the
    /// controller (every submission queue, then every completion queue; the controller
    /// ends what they had outstanding), then CC.SHN = 01b and a wait for CSTS.SHST = 10b,
    /// at most max(RTD3E, 10 s), that ends at once if CSTS.CFS says the controller
    /// failed. After shutdown the controller takes no more commands: queues still held
    /// fail every request ([`NvmeError::Removed`]) and dropping them sends nothing, until
    /// a [`reset`](Self::reset).
    pub fn shutdown(&self) -> Result<(), NvmeError> {
        let limit =
            Duration::from_micros(u64::from(self.shared.info.identify.rtd3e)).max(Duration::from_secs(10));
        self.shutdown_within(limit)
    }

    /// [`shutdown`](Self::shutdown), waiting at most `limit` for CSTS.SHST.
    pub fn shutdown_within(&self, limit: Duration) -> Result<(), NvmeError> {
        if let Some(e) = self.shared.removed() {
            return Err(e);
        }
        if let Some(regs) = self.shared.admin.lock().regs.as_ref() {
            check_status(regs)?;
        }
        // The queues first: the specification asks the host to delete them before a
        // normal shutdown (Delete SQ ends the commands still in it).
        if !self.shared.shut_down.load(Ordering::Acquire) {
            let open: Vec<u16> = {
                let q = self.shared.qids.lock();
                (1..q.len()).filter(|&i| q[i]).map(|i| i as u16).collect()
            };
            for (opcode, kind) in [(admin::DELETE_SQ, "SQ"), (admin::DELETE_CQ, "CQ")] {
                for &qid in &open {
                    let mut cmd = Command::new(opcode);
                    cmd.cdw[0] = u32::from(qid);
                    if let Err(e) = self
                        .shared
                        .admin(cmd, &format!("Delete I/O {kind} {qid} (shutdown)"))
                    {
                        if e.is_fatal() {
                            return Err(e);
                        }
                        log::warn!("{}: shutdown: {e}", self.shared.info.address);
                    }
                }
            }
            self.shared.shut_down.store(true, Ordering::Release);
        }
        let a = self.shared.admin.lock();
        let Some(regs) = a.regs.as_ref() else {
            return Err(NvmeError::Removed("revoked".into()));
        };
        check_status(regs)?;
        let cc_now = regs.read32(reg::CC)?;
        regs.write32(reg::CC, (cc_now & !cc::SHN_MASK) | cc::SHN_NORMAL)?;
        let start = Instant::now();
        loop {
            let csts = regs.read32(reg::CSTS)?;
            if csts == u32::MAX {
                return Err(NvmeError::Gone);
            }
            if csts & csts::SHST_MASK == csts::SHST_COMPLETE {
                return Ok(());
            }
            if csts & csts::CFS != 0 {
                return Err(NvmeError::Fatal { csts });
            }
            if start.elapsed() > limit {
                return Err(NvmeError::Timeout {
                    what: "shutdown (CSTS.SHST = 10b)".into(),
                    waited: limit,
                });
            }
            thread::sleep(Duration::from_millis(1));
        }
    }

    /// The status of the last admin command's kind of failure, for callers matching on it.
    pub fn status_of(e: &NvmeError) -> Option<Status> {
        match e {
            NvmeError::Command { status, .. } => Some(*status),
            _ => None,
        }
    }
}
