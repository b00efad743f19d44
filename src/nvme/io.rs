//! I/O queue pairs: requests in, completions out, on the thread that owns the queue.
//!
//! Vectored requests ([`IoQueue::submit_readv`]) use PRP lists where PRPs express them,
//! and SGLs where they do not and the controller offers SGLs (`io/sgl.rs`). Raw I/O
//! commands go through [`IoQueue::submit_passthru`] (`io/passthru.rs`).
//!
//! # Not yet done (issue 15 §7), and how it would fit
//!
//! - Registering application memory for DMA (as `spdk_mem_register`): a
//!   `DeviceBacking::register_dma(&self, memory) -> Result<Self::Dma, BackingError>`
//!   defaulting to Unsupported, implemented by VFIO (`VFIO_IOMMU_MAP_DMA` of the caller's
//!   pages, unmapped on drop) and by the emulator (entered in its table of live
//!   allocations, so DMA lookups find it). The registration would be a [`Buffer`] like any
//!   other: the queue holds an `Arc` of it while a command may reach it, so the owned.rs
//!   rule (released only with a proof) covers it unchanged; the memory itself must be owned
//!   by the registration (a `Box<[u8]>` or mapping moved into it), since a borrow cannot
//!   outlive an abandoned command.
//! - Zero-copy `&[u8]`/`&mut [u8]` of a buffer: `Arc::get_mut` on a [`Buffer`] proves no
//!   queue holds it (a command in flight, or abandoned, keeps a clone), but the IOMMU
//!   mapping stays: a device that misbehaves, or memory parked after a failed queue
//!   deletion, could still write it, and a Rust reference to memory changed behind it is
//!   undefined behaviour. So bytes go through `read_at`/`write_at` (volatile copies) only.

use std::cell::Cell;
use std::collections::VecDeque;
use std::marker::PhantomData;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use std::os::fd::{AsFd, BorrowedFd};

use super::controller::{Namespace, PAGE, QueueRegs, Shared, check_status, find_namespace};
use super::owned::{DeviceOwned, Released, SharedDma};
use super::queue::{Doorbells, Ring, write_cq_doorbell, write_sq_doorbell};
use super::spec::{Command, Completion, Status, admin, io, oncs};
use super::{Dma, NvmeError};
use crate::barrier;
use crate::bus::backing::{DeviceBacking, DmaMemory};

mod passthru;
mod sgl;
pub use passthru::{DataDirection, IoPassthru, PassthruData};

/// An I/O buffer: DMA memory shared with the queue while a request uses it. The queue
/// keeps a clone until the controller is done with it — the command completed, or the
/// controller was disabled or lost bus mastering — which for a request that timed out
/// may be well after its [`NvmeError::Timeout`]: a buffer is never freed under the
/// device.
pub type Buffer<B> = Arc<Dma<B>>;

/// What a request does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Read blocks into the buffer.
    Read,
    /// Write blocks from the buffer.
    Write,
    /// Make written data durable.
    Flush,
    /// Write zeroes to the blocks (no buffer).
    WriteZeroes,
    /// Deallocate (trim) the blocks (Dataset Management; no buffer).
    Deallocate,
    /// A raw I/O command ([`IoQueue::submit_passthru`]); not a kind of [`IoRequest`].
    Passthru,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Read => "Read",
            Op::Write => "Write",
            Op::Flush => "Flush",
            Op::WriteZeroes => "Write Zeroes",
            Op::Deallocate => "Dataset Management (deallocate)",
            Op::Passthru => "I/O passthrough",
        }
    }
}

/// One request: what to do, where, and with which buffer.
#[derive(Debug)]
pub struct IoRequest<'a, B: DeviceBacking> {
    /// What.
    pub op: Op,
    /// Namespace.
    pub nsid: u32,
    /// First block (ignored by flush).
    pub lba: u64,
    /// Blocks (ignored by flush).
    pub blocks: u64,
    /// The data, at a byte offset (reads and writes only; 4-byte aligned).
    pub buffer: Option<(&'a Buffer<B>, usize)>,
}

impl<B: DeviceBacking> Clone for IoRequest<'_, B> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<B: DeviceBacking> Copy for IoRequest<'_, B> {}

impl<'a, B: DeviceBacking> IoRequest<'a, B> {
    /// Read `blocks` blocks at `lba` into `buffer` at `offset`.
    pub fn read(nsid: u32, lba: u64, blocks: u64, buffer: &'a Buffer<B>, offset: usize) -> Self {
        IoRequest {
            op: Op::Read,
            nsid,
            lba,
            blocks,
            buffer: Some((buffer, offset)),
        }
    }
    /// Write `blocks` blocks at `lba` from `buffer` at `offset`.
    pub fn write(nsid: u32, lba: u64, blocks: u64, buffer: &'a Buffer<B>, offset: usize) -> Self {
        IoRequest {
            op: Op::Write,
            ..Self::read(nsid, lba, blocks, buffer, offset)
        }
    }
    /// Flush namespace `nsid`.
    pub fn flush(nsid: u32) -> Self {
        IoRequest {
            op: Op::Flush,
            nsid,
            lba: 0,
            blocks: 0,
            buffer: None,
        }
    }
    /// Write zeroes to `blocks` blocks at `lba`.
    pub fn write_zeroes(nsid: u32, lba: u64, blocks: u64) -> Self {
        IoRequest {
            op: Op::WriteZeroes,
            nsid,
            lba,
            blocks,
            buffer: None,
        }
    }
    /// Deallocate `blocks` blocks at `lba`.
    pub fn deallocate(nsid: u32, lba: u64, blocks: u64) -> Self {
        IoRequest {
            op: Op::Deallocate,
            ..Self::write_zeroes(nsid, lba, blocks)
        }
    }
}

const FREE: u32 = u32::MAX;

// A poll with requests outstanding (busy or empty) reads the clock once in this many, and checks
// the controller's status and the deadlines once per `CHECK_INTERVAL` of it.
const CHECK_EVERY: u32 = 32;
const CHECK_INTERVAL: Duration = Duration::from_millis(1);

// CLOCK_MONOTONIC_COARSE: read without a system call in a few nanoseconds, to the kernel's
// tick (1–4 ms) — plenty for deadlines of a hundred milliseconds and more, and cheaper per
// request than `Instant::now`.
#[inline]
fn coarse_now() -> Duration {
    use nix::time::{ClockId, clock_gettime};
    clock_gettime(ClockId::CLOCK_MONOTONIC_COARSE).map_or(Duration::ZERO, Duration::from)
}

// The deadline of a request whose latest command was written to the SQ after the last
// deadline check: that check's successor sets it (see `Request::deadline`).
const UNSTAMPED: Duration = Duration::MAX;

#[derive(Debug, Clone, Copy)]
struct Slot {
    request: u32,
    // When the request gave up on this command (timeout; an Abort was sent): the slot is
    // reusable only once the controller completes or aborts it, or after a controller
    // reset, which the queue does when that takes another timeout.
    abandoned: Option<Instant>,
    // Whether its Abort was sent (within the controller's Abort Command Limit).
    abort_sent: bool,
}

// An Abort sent for abandoned command `cid` (its own command id `abort_cid`).
#[derive(Debug, Clone, Copy)]
struct AbortSent {
    cid: u16,
    abort_cid: u16,
    sent: Instant,
    answered: Option<Instant>,
}

const FREE_SLOT: Slot = Slot {
    request: FREE,
    abandoned: None,
    abort_sent: false,
};

struct Request<B: DeviceBacking> {
    tag: u64,
    op: Op,
    // Commands on the controller (written to the SQ, not yet completed).
    parts: u32,
    // Boxed: the slab entry stays small (an `NvmeError` inline made every request a
    // memcpy on its way in and out).
    error: Option<Box<NvmeError>>,
    // On the coarse monotonic clock (`coarse_now`): a timeout after the first deadline
    // check that followed the write of the request's latest command to the SQ (the wait in
    // the software queue does not count); `UNSTAMPED` until that check. So a submission
    // reads no clock, and a timeout may end late by the time between two checks (about
    // `CHECK_INTERVAL` on a queue polled without pause), never early.
    deadline: Duration,
    // The caller has its result (a timeout); the request waits only for its abandoned
    // commands to end, holding the buffer until they do.
    ended: bool,
    // The buffers of a vectored request.
    buffer: Option<DeviceOwned<Held<B>>>,
    // The entry of the queue's `holds` with the buffer of a request with one (`NO_HOLD`:
    // none).
    hold: u32,
    // The commands of a vectored request (readv/writev), planned at submission.
    plan: Option<Box<Plan>>,
    // Whether a command of it was ever written to the SQ (its buffer named by one).
    sent: bool,
    // The completion that ended it: dword 0 and status.
    cdw0: u32,
    status: Status,
    // Commands still to be written to the SQ (the software queue's part); the rest of
    // what they need is the queue's `rests[index]` (written only for a request that
    // waits), kept out of the slab entry so that the entry stays small (moved in and out
    // without a `memcpy` call).
    commands: u32,
}

// The commands of a request not yet written to the SQ (`Request::commands` of them): from
// block `lba`, `blocks` blocks in all, data at `iova` onwards.
#[derive(Debug, Clone, Copy, Default)]
struct Rest {
    nsid: u32,
    lba: u64,
    blocks: u64,
    per_cmd: u64,
    block_size: u64,
    iova: u64,
    prinfo: u32,
    reftag: bool,
}

// The namespace the latest read or write named, as the queue's namespace list has it (usable),
// with what a read or write of it needs: one compare per submission instead of a search and
// the checks that depend on the namespace alone. Valid for the list of `namespace_generation`
// (taken again, and this emptied, when that changes). `nsid` 0: none.
#[derive(Debug, Clone, Copy, Default)]
struct NsCache {
    nsid: u32,
    blocks: u64,
    // log2 of the block size (a power of two; other sizes take the general path).
    block_shift: u32,
    // Blocks per read or write command (the controller's transfer limit).
    per_cmd: u64,
    prinfo: u32,
    reftag: bool,
}

/// How a request ended, as [`IoQueue::poll_completions`] reports it.
///
/// For a request the driver split into several commands (a transfer above the controller's
/// limit, or a request the software queue sent in parts), `cdw0` and `status` are those of
/// the first command that failed, or, when all succeeded, of the command whose completion
/// ended the request (the last to complete, which with out-of-order completions need not
/// be the one with the highest LBA).
#[derive(Debug)]
#[non_exhaustive]
pub struct IoCompletion {
    /// The tag given to [`IoQueue::submit`].
    pub tag: u64,
    /// The result: an error for a failed command ([`NvmeError::Command`] with the same
    /// status as below), a timeout, a reset or a removal.
    pub result: Result<(), NvmeError>,
    /// Dword 0 of the completion (command specific).
    pub cdw0: u32,
    /// The completion's status field, phase tag excluded: status code and type, More, Do
    /// Not Retry. `None` when the request ended without a completion from the controller
    /// (timeout, reset, removal); `cdw0` is then 0.
    pub status: Option<Status>,
}

impl IoCompletion {
    // Ended without a completion from the controller.
    fn without_status(tag: u64, e: NvmeError) -> Self {
        IoCompletion {
            tag,
            result: Err(e),
            cdw0: 0,
            status: None,
        }
    }
}

/// Requests the software queue of an [`IoQueue`] holds by default: see
/// [`IoQueue::set_queue_limit`].
pub const DEFAULT_QUEUE_LIMIT: usize = 1024;

/// An I/O submission/completion queue pair, owned by one thread (`Send`, not `Sync`): the
/// I/O path takes no lock shared with other queues.
///
/// Requests carry a caller's `tag`, returned with their result by [`poll`](Self::poll)
/// (or with dword 0 and the status of their completion by
/// [`poll_completions`](Self::poll_completions)). [`submit`](Self::submit) only writes
/// entries; one doorbell tells the controller of a whole batch ([`ring`](Self::ring), or
/// the next `poll`). A request larger than the controller's transfer limit is split into
/// several commands and completes once all have.
///
/// # Software queueing
///
/// When the submission queue has too few free slots for a request, or requests wait
/// already, the request waits in a software queue, in submission order, and `poll` writes
/// its commands to the submission queue as slots free — as SPDK does. A request needing
/// more commands than the whole queue has slots (a large transfer) is sent in parts this
/// way. A waiting request holds its buffer like one on the controller. The software queue
/// holds at most [`DEFAULT_QUEUE_LIMIT`] requests unless
/// [`set_queue_limit`](Self::set_queue_limit) says otherwise (0 turns it off: a request
/// that does not fit fails at once); past it, `submit` fails with
/// [`NvmeError::QueueFull`]. A request's timeout runs from the latest of its commands
/// written to the submission queue, not from `submit`.
///
/// # Timeouts
///
/// A submission reads no clock: a request's timeout starts at the queue's first deadline
/// check after its (latest) command was written to the submission queue. Polls check the
/// deadlines about once a millisecond while requests are outstanding (on every 32nd poll,
/// when a millisecond has passed since the last check; after [`wait`](Self::wait)'s sleep
/// at once), so a timeout is reported late by up to two check intervals, never early.
///
/// # Dropping
///
/// Deletes the submission and completion queues on the controller (unless it was revoked
/// or is gone) and frees their memory. Requests still outstanding are dropped without a
/// result. When the deletion fails, or the controller failed, the controller may still
/// reach the rings, PRP lists and buffers: they stay allocated, parked with the
/// controller, until a reset disables it or bus mastering is turned off.
pub struct IoQueue<B: DeviceBacking> {
    shared: Arc<Shared<B>>,
    regs: QueueRegs<B>,
    ring: Ring<SharedDma<Dma<B>>>,
    prp: SharedDma<Dma<B>>,
    // The rings' memory, for parking.
    memory: [SharedDma<Dma<B>>; 2],
    // The controller's disable count after the queue was (re)created on it.
    epoch: u64,
    slots: Vec<Slot>,
    free_cids: Vec<u16>,
    requests: Vec<Option<Request<B>>>,
    // What each request waiting in the software queue still has to write to the SQ, by
    // the same index.
    rests: Vec<Rest>,
    free_requests: Vec<u32>,
    holds: Holds<B>,
    outstanding: usize,
    // Requests (indexes into `requests`) with commands not yet written to the SQ, oldest
    // first; at most `queue_limit`.
    pending: VecDeque<u32>,
    queue_limit: usize,
    dead: Option<String>,
    // Polls since the clock was last read, and when (coarse clock) the controller's
    // status and the deadlines are next checked: an empty poll reads no clock.
    polls: u32,
    next_check: Duration,
    completions: u64,
    // The controller's reset count when the queue was (re)created on it.
    generation: u64,
    // The controller's namespace list as this queue last took it, and its generation.
    namespaces: Arc<[Namespace]>,
    namespace_generation: u64,
    ns_cache: NsCache,
    // Slots whose command was abandoned after a timeout and not yet answered.
    abandoned: usize,
    // The Aborts sent for abandoned commands (at most one each) and when they were
    // answered.
    aborts: Vec<AbortSent>,
    _not_sync: PhantomData<Cell<()>>,
}

impl<B: DeviceBacking> std::fmt::Debug for IoQueue<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoQueue")
            .field("qid", &self.ring.qid)
            .field("depth", &self.ring.depth())
            .field("outstanding", &self.outstanding)
            .finish_non_exhaustive()
    }
}

// The MSI-X vector of I/O queue `qid`, when interrupts are on.
fn vector<B: DeviceBacking>(shared: &Shared<B>, qid: u16) -> Option<u32> {
    let n = shared.interrupts.len() as u32;
    match n {
        0 => None,
        1 => Some(0),
        n => Some(1 + (u32::from(qid) - 1) % (n - 1)),
    }
}

// Creates the queue pair `ring` describes on the controller: the CQ, then the SQ.
fn create_on_controller<B: DeviceBacking, D: DmaMemory>(
    shared: &Shared<B>,
    ring: &Ring<D>,
) -> Result<(), NvmeError> {
    let (qid, depth) = (ring.qid, ring.depth());
    // A queue id used before keeps its last tail and head in the shadow buffers: start
    // them at 0 with the new rings, or the controller takes the old values as new entries.
    if let Some(s) = &shared.shadow {
        let cap = shared.info.cap;
        for at in [cap.sq_doorbell(qid), cap.cq_doorbell(qid)] {
            let at = (at - super::spec::reg::DOORBELLS) as usize;
            let _ = s.doorbells.write::<u32>(at, 0);
            let _ = s.events.write::<u32>(at, 0);
        }
        // Before the admin doorbell that creates the queue (its own barrier orders them too).
        barrier::dma_wmb();
    }
    let mut cmd = Command::new(admin::CREATE_CQ);
    cmd.prp1 = ring.cq_iova();
    cmd.cdw[0] = u32::from(depth - 1) << 16 | u32::from(qid);
    // Physically contiguous; with interrupts, enabled on this queue's vector (vectors past
    // the admin queue's, shared round-robin when fewer than queues).
    cmd.cdw[1] = 1;
    if let Some(v) = vector(shared, qid) {
        cmd.cdw[1] |= 1 << 1 | v << 16;
    }
    shared.admin(cmd, &format!("Create I/O CQ {qid}"))?;
    let mut cmd = Command::new(admin::CREATE_SQ);
    cmd.prp1 = ring.sq_iova();
    cmd.cdw[0] = u32::from(depth - 1) << 16 | u32::from(qid);
    cmd.cdw[1] = u32::from(qid) << 16 | 1;
    if let Err(e) = shared.admin(cmd, &format!("Create I/O SQ {qid}")) {
        let mut del = Command::new(admin::DELETE_CQ);
        del.cdw[0] = u32::from(qid);
        let _ = shared.admin(del, &format!("Delete I/O CQ {qid}"));
        return Err(e);
    }
    Ok(())
}

// One more command of the request at `index` ended after the request had its result (a
// timeout): the last one frees the request and releases its buffer.
fn abandoned_done<B: DeviceBacking>(
    requests: &mut [Option<Request<B>>],
    free_requests: &mut Vec<u32>,
    holds: &mut Holds<B>,
    index: usize,
    c: &Completion,
) {
    let Some(req) = requests.get_mut(index).and_then(Option::as_mut) else {
        return;
    };
    req.parts = req.parts.saturating_sub(1);
    if req.parts == 0
        && let Some(req) = requests[index].take()
    {
        free_requests.push(index as u32);
        let proof = Released::completed(c);
        if req.hold != NO_HOLD {
            holds.put(req.hold, &proof);
        }
        if let Some(b) = req.buffer {
            b.release(&proof);
        }
    }
}

/// One piece of a vectored request's data: `len` bytes of `buffer` from `offset`
/// ([`IoQueue::submit_readv`], [`IoQueue::submit_writev`]).
#[derive(Debug)]
pub struct Segment<'a, B: DeviceBacking> {
    /// The buffer.
    pub buffer: &'a Buffer<B>,
    /// Where the piece starts in it (4-byte aligned).
    pub offset: usize,
    /// Its length in bytes (a multiple of 4).
    pub len: usize,
}

impl<B: DeviceBacking> Clone for Segment<'_, B> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<B: DeviceBacking> Copy for Segment<'_, B> {}

impl<'a, B: DeviceBacking> Segment<'a, B> {
    /// `len` bytes of `buffer` from `offset`.
    pub fn new(buffer: &'a Buffer<B>, offset: usize, len: usize) -> Self {
        Segment { buffer, offset, len }
    }
}

// Where a request's data is.
#[derive(Clone, Copy)]
enum Data<'a, B: DeviceBacking> {
    None,
    Contiguous(&'a Buffer<B>, usize),
    Vectored(&'a [Segment<'a, B>]),
}

// The buffers a vectored request holds while the controller may reach them (held, never
// read: dropping them, with a proof, is the release). A request with one buffer holds it
// through the queue's `Holds`.
enum Held<B: DeviceBacking> {
    Many(#[allow(dead_code)] Vec<Buffer<B>>),
}

// No entry of `Holds`.
const NO_HOLD: u32 = u32::MAX;

// The buffers of the queue's single-buffer requests, each held by one clone of its `Arc`
// for all the requests that use it at the same time, with a count of them: a request
// takes and gives back a count, not a clone (two atomic read-modify-writes per I/O). A
// buffer is released as any `DeviceOwned`, only with a proof: the last user's (every
// other user's end came with one too), or one that covers the whole queue.
struct Holds<B: DeviceBacking> {
    entries: Vec<Hold<B>>,
    free: Vec<u32>,
    // The entry the latest request took, where a request with the same buffer finds it
    // (a pool of I/O memory used at offsets). Only it is compared: a buffer found in no
    // entry gets one more (two entries for one buffer are harmless).
    last: u32,
}

struct Hold<B: DeviceBacking> {
    // The buffer's address, 0 when the entry is free: compared only, and only while the
    // entry holds the buffer (so no other live buffer has that address).
    addr: usize,
    users: u32,
    buffer: Option<DeviceOwned<Buffer<B>>>,
}

impl<B: DeviceBacking> Holds<B> {
    fn new() -> Self {
        Holds {
            entries: Vec::new(),
            free: Vec::new(),
            last: NO_HOLD,
        }
    }

    // One more user of `buffer`: the entry it holds it in.
    #[inline]
    fn take(&mut self, buffer: &Buffer<B>) -> u32 {
        let addr = Arc::as_ptr(buffer) as usize;
        if let Some(e) = self.entries.get_mut(self.last as usize)
            && e.addr == addr
        {
            e.users += 1;
            return self.last;
        }
        self.take_new(buffer, addr)
    }

    #[inline(never)]
    fn take_new(&mut self, buffer: &Buffer<B>, addr: usize) -> u32 {
        let hold = Hold {
            addr,
            users: 1,
            buffer: Some(DeviceOwned::new(Arc::clone(buffer))),
        };
        let index = match self.free.pop() {
            Some(i) => {
                self.entries[i as usize] = hold;
                i
            }
            None => {
                self.entries.push(hold);
                (self.entries.len() - 1) as u32
            }
        };
        self.last = index;
        index
    }

    // A user of entry `index` ended, with `proof` that the controller no longer reaches
    // the buffer for it: the last one releases the buffer.
    #[inline]
    fn put(&mut self, index: u32, proof: &Released) {
        let Some(e) = self.entries.get_mut(index as usize) else {
            return;
        };
        e.users = e.users.saturating_sub(1);
        if e.users == 0 {
            self.release(index, proof);
        }
    }

    #[inline(never)]
    fn release(&mut self, index: u32, proof: &Released) {
        let e = &mut self.entries[index as usize];
        e.addr = 0;
        if let Some(b) = e.buffer.take() {
            b.release(proof);
            self.free.push(index);
        }
    }

    // Releases every buffer with `proof` (it covers them all): the requests that used them
    // are gone.
    fn release_all(&mut self, proof: &Released) {
        for e in self.entries.drain(..) {
            if let Some(b) = e.buffer {
                b.release(proof);
            }
        }
        self.free.clear();
        self.last = NO_HOLD;
    }

    // Every buffer still held (for parking): the requests that used them are gone.
    fn take_all(&mut self) -> Vec<DeviceOwned<Buffer<B>>> {
        self.free.clear();
        self.last = NO_HOLD;
        self.entries.drain(..).filter_map(|e| e.buffer).collect()
    }
}

// The commands of a vectored request: each (first block, blocks, its range in `pieces`),
// and `pieces` as (IOVA, bytes), each command's own. A passthrough request's one command
// is `raw` (its data pointer built from `pieces`).
// `sgl`: the commands' data pointers are SGLs (see sgl.rs), else PRPs.
struct Plan {
    cmds: Vec<(u64, u64, (u32, u32))>,
    pieces: Vec<(u64, u64)>,
    raw: Option<Command>,
    sgl: bool,
}

impl Plan {
    // Cuts the segments into commands of at most `per_cmd` blocks of `bs` bytes, chaining
    // segments in one PRP list where PRPs allow (the previous piece ends on a page, the
    // next starts on one), else cutting at the boundary if it falls on a block. Where
    // that cuts (or cannot) and the controller takes SGLs (`sgl`), the commands use SGLs
    // instead (sgl.rs): cut only at the transfer limit or a full descriptor page.
    fn new<B: DeviceBacking>(
        segments: &[Segment<'_, B>],
        lba: u64,
        blocks: u64,
        bs: u64,
        per_cmd: u64,
        op: Op,
        sgl: bool,
    ) -> Result<Plan, NvmeError> {
        let invalid = |why: String| NvmeError::Invalid(format!("vectored {}: {why}", op.name()));
        let mut total = 0u64;
        for (i, s) in segments.iter().enumerate() {
            if !s.offset.is_multiple_of(4)
                || !s.len.is_multiple_of(4)
                || s.len == 0
                || s.offset.checked_add(s.len).is_none_or(|end| end > s.buffer.len())
            {
                return Err(invalid(format!(
                    "segment {i} ({} bytes at offset {}) does not fit its {}-byte buffer, or is empty or not \
                     4-byte aligned",
                    s.len,
                    s.offset,
                    s.buffer.len()
                )));
            }
            total += s.len as u64;
        }
        if blocks.checked_mul(bs) != Some(total) {
            return Err(invalid(format!(
                "the segments hold {total} bytes, {blocks} blocks of {bs} need {}",
                blocks.saturating_mul(bs)
            )));
        }
        match Self::cut(segments, lba, bs, per_cmd, op, false) {
            Ok((plan, false)) => Ok(plan),
            Ok(_) | Err(_) if sgl => Ok(Self::cut(segments, lba, bs, per_cmd, op, true)?.0),
            r => r.map(|(plan, _)| plan),
        }
    }

    // The cutting of `new`, with PRPs or SGLs; with PRPs, whether a segment boundary cut a
    // command.
    fn cut<B: DeviceBacking>(
        segments: &[Segment<'_, B>],
        lba: u64,
        bs: u64,
        per_cmd: u64,
        op: Op,
        sgl: bool,
    ) -> Result<(Plan, bool), NvmeError> {
        let invalid = |why: String| NvmeError::Invalid(format!("vectored {}: {why}", op.name()));
        let max_bytes = per_cmd * bs;
        let mut cut_at_boundary = false;
        let mut plan = Plan {
            cmds: Vec::new(),
            pieces: Vec::with_capacity(segments.len()),
            raw: None,
            sgl,
        };
        let (mut at, mut first, mut bytes, mut stream) = (lba, 0usize, 0u64, 0u64);
        let mut close = |plan: &mut Plan, first: &mut usize, bytes: &mut u64| {
            let n = *bytes / bs;
            plan.cmds.push((at, n, (*first as u32, plan.pieces.len() as u32)));
            at += n;
            *first = plan.pieces.len();
            *bytes = 0;
        };
        for s in segments {
            let (mut iova, mut len) = (s.buffer.iova() + s.offset as u64, s.len as u64);
            if bytes > 0 && sgl {
                if plan.pieces.len() - first == sgl::MAX_DESCRIPTORS {
                    if bytes % bs != 0 {
                        return Err(invalid(format!(
                            "the {}th segment boundary of a command, at byte {stream} of the transfer, is not \
                             on a block boundary (a command's SGL holds {} descriptors)",
                            sgl::MAX_DESCRIPTORS,
                            sgl::MAX_DESCRIPTORS
                        )));
                    }
                    close(&mut plan, &mut first, &mut bytes);
                }
            } else if bytes > 0 {
                let (prev, prev_len) = plan.pieces[plan.pieces.len() - 1];
                if (prev + prev_len) % PAGE != 0 || iova % PAGE != 0 {
                    if bytes % bs != 0 {
                        return Err(invalid(format!(
                            "the segment boundary at byte {stream} of the transfer is neither on a page \
                             boundary (for a PRP list) nor on a block boundary (to split the request there)"
                        )));
                    }
                    close(&mut plan, &mut first, &mut bytes);
                    cut_at_boundary = true;
                }
            }
            while len > 0 {
                let take = len.min(max_bytes - bytes);
                plan.pieces.push((iova, take));
                (iova, len, bytes, stream) = (iova + take, len - take, bytes + take, stream + take);
                if bytes == max_bytes {
                    close(&mut plan, &mut first, &mut bytes);
                }
            }
        }
        if bytes > 0 {
            close(&mut plan, &mut first, &mut bytes);
        }
        Ok((plan, cut_at_boundary))
    }
}

// PRP1 and PRP2 for `pieces` (IOVA, bytes): every piece but the first starts on a page,
// every one but the last ends on one. Slot `cid`'s page of `list` holds the list when
// more than two pages are touched.
fn prps_pieces<D: DmaMemory>(list: &SharedDma<D>, cid: u16, pieces: &[(u64, u64)]) -> (u64, u64) {
    let Some(&(prp1, _)) = pieces.first() else {
        return (0, 0);
    };
    let page = usize::from(cid) * PAGE as usize;
    let (mut entries, mut second) = (0usize, 0u64);
    for (i, &(iova, len)) in pieces.iter().enumerate() {
        let end = iova + len;
        // The first piece's first page is PRP1; every other page start goes in the list.
        let mut p = if i == 0 { iova - iova % PAGE + PAGE } else { iova };
        while p < end {
            if entries == 0 {
                second = p;
            }
            let _ = list.write::<u64>(page + 8 * entries, p);
            entries += 1;
            p += PAGE;
        }
    }
    match entries {
        0 => (prp1, 0),
        1 => (prp1, second),
        _ => (prp1, list.iova() + page as u64),
    }
}

// PRP1 and PRP2 for `len` bytes at `iova` (contiguous), using slot `cid`'s page of `list`
// when more than two pages are touched.
#[inline]
fn prps<D: DmaMemory>(list: &SharedDma<D>, cid: u16, iova: u64, len: u64) -> (u64, u64) {
    let first = PAGE - iova % PAGE;
    if len <= first {
        return (iova, 0);
    }
    let rest = len - first;
    let second = iova + first;
    if rest <= PAGE {
        return (iova, second);
    }
    let page = usize::from(cid) * PAGE as usize;
    let entries = rest.div_ceil(PAGE);
    for i in 0..entries {
        let _ = list.write::<u64>(page + 8 * i as usize, second + i * PAGE);
    }
    (iova, list.iova() + page as u64)
}

impl<B: DeviceBacking> IoQueue<B> {
    pub(crate) fn create(shared: Arc<Shared<B>>, depth: u16) -> Result<Self, NvmeError> {
        let cap = shared.info.cap;
        let depth = depth.clamp(2, cap.max_queue_entries().min(4096) as u16);
        let qid = shared
            .alloc_qid()
            .ok_or_else(|| NvmeError::Invalid(format!("all {} I/O queues are in use", shared.io_queues())))?;
        // Whether the queue id went to the parked ones with the queue's memory.
        let mut parked = false;
        let made = (|| {
            // All under the backing's lock, so that a revoke meanwhile waits for it and
            // finds this queue's mapping registered (or taken back here) when it returns.
            let (sq, cq, prp, regs) = shared.with_backing(|backing| {
                let sq = SharedDma::new(backing.alloc_dma(usize::from(depth) * Command::SIZE)?);
                let cq = SharedDma::new(backing.alloc_dma(usize::from(depth) * Completion::SIZE)?);
                // One PRP list page per command slot.
                let prp = SharedDma::new(backing.alloc_dma(usize::from(depth) * PAGE as usize)?);
                // The mapping holds the device open: registered at once, so that a revoke
                // while the queue is created on the controller (admin round trips) drops
                // it too, or the device stays open under the removal until this thread
                // lets go.
                let regs = shared.register_queue(backing.map_bar(0)?);
                // Revoked before the registration: its sweep did not see this one (the
                // mapping goes with `regs`, under its lock).
                if let Some(e) = shared.removed() {
                    return Err(e);
                }
                Ok((sq, cq, prp, regs))
            })?;
            let memory = [sq.clone(), cq.clone()];
            let ring = Ring::new(qid, depth, sq, cq, Doorbells::of(cap, qid));
            // Before the creation: a reset meanwhile makes the queue create itself again.
            let generation = shared.generation.load(Ordering::Acquire);
            let epoch = shared.epoch();
            if let Err(e) = create_on_controller(&shared, &ring) {
                // Refused (or created and deleted again): the controller has none of it.
                // Anything else (no answer) may have left it the rings.
                if !matches!(e, NvmeError::Command { .. }) {
                    let memory = [memory[0].clone(), memory[1].clone(), prp.clone()]
                        .map(|m| DeviceOwned::new(m).boxed())
                        .into();
                    shared.park(epoch, memory, Some(qid));
                    parked = true;
                }
                return Err(e);
            }
            // After it: the queue's memory is in use from this epoch on.
            let epoch = shared.epoch();
            Ok((ring, prp, regs, memory, generation, epoch))
        })();
        let (ring, prp, regs, memory, generation, epoch) = match made {
            Ok(m) => m,
            Err(e) => {
                if !parked {
                    shared.free_qid(qid);
                }
                return Err(e);
            }
        };
        let slots = usize::from(depth) - 1;
        let namespace_generation = shared.namespace_generation();
        let namespaces = shared.namespace_list();
        Ok(IoQueue {
            namespaces,
            namespace_generation,
            ns_cache: NsCache::default(),
            shared,
            regs,
            ring,
            prp,
            memory,
            epoch,
            slots: vec![FREE_SLOT; slots],
            generation,
            abandoned: 0,
            aborts: Vec::new(),
            free_cids: (0..slots as u16).rev().collect(),
            requests: Vec::new(),
            rests: Vec::new(),
            free_requests: Vec::new(),
            holds: Holds::new(),
            outstanding: 0,
            pending: VecDeque::new(),
            queue_limit: DEFAULT_QUEUE_LIMIT,
            dead: None,
            polls: 0,
            next_check: Duration::ZERO,
            completions: 0,
            _not_sync: PhantomData,
        })
    }

    /// The queue ID.
    pub fn qid(&self) -> u16 {
        self.ring.qid
    }

    /// Commands that can be submitted before the queue is full.
    pub fn free_slots(&self) -> usize {
        self.free_cids.len().min(usize::from(self.ring.free()))
    }

    /// Requests submitted and not yet completed (those waiting in the software queue
    /// included).
    pub fn outstanding(&self) -> usize {
        self.outstanding
    }

    /// Requests with commands still waiting in the software queue (see [Software
    /// queueing](Self#software-queueing)).
    pub fn queued(&self) -> usize {
        self.pending.len()
    }

    /// Sets how many requests the software queue may hold (see [Software
    /// queueing](Self#software-queueing)); 0 turns software queueing off, so that a request
    /// that does not fit the submission queue fails with [`NvmeError::QueueFull`]. Requests
    /// waiting already stay.
    pub fn set_queue_limit(&mut self, requests: usize) {
        self.queue_limit = requests;
    }

    /// SQ doorbell writes to the device so far (shadow updates that needed none not
    /// counted).
    pub fn doorbell_writes(&self) -> u64 {
        self.ring.sq_rings
    }

    // Inlined: one test of three flags per submission and poll; the error is built out of
    // line.
    #[inline]
    fn check_alive(&self) -> Result<(), NvmeError> {
        if self.dead.is_none()
            && !self.shared.shut_down.load(Ordering::Acquire)
            && !self.shared.is_revoked()
            && !self.shared.is_failed()
        {
            return Ok(());
        }
        self.not_alive()
    }

    #[cold]
    #[inline(never)]
    fn not_alive(&self) -> Result<(), NvmeError> {
        if let Some(e) = self.shared.removed() {
            return Err(e);
        }
        if let Some(e) = self.shared.failed_error() {
            return Err(e);
        }
        if let Some(why) = &self.dead {
            return Err(NvmeError::Removed(why.clone()));
        }
        if self.shared.shut_down.load(Ordering::Acquire) {
            return Err(NvmeError::Removed(format!(
                "queue {}: the controller was shut down",
                self.ring.qid
            )));
        }
        Ok(())
    }

    /// Queues `request`; `tag` comes back with its result from [`poll`](Self::poll). The
    /// controller learns of it at the next [`ring`](Self::ring) or `poll`.
    ///
    /// When the submission queue has too few free slots, or requests wait in the software
    /// queue already, the request waits there behind them (see [Software
    /// queueing](Self#software-queueing)).
    ///
    /// Fails at once (nothing queued) when the request is invalid (namespace, range, a
    /// buffer too small or not dword-aligned), or with [`NvmeError::QueueFull`] when it
    /// would have to wait and the software queue is full or off (poll, then retry).
    #[inline]
    pub fn submit(&mut self, request: &IoRequest<'_, B>, tag: u64) -> Result<(), NvmeError> {
        if let (Op::Read | Op::Write, Some((buffer, offset))) = (request.op, request.buffer)
            && self.submit_one(
                request.op,
                request.nsid,
                request.lba,
                request.blocks,
                buffer,
                offset,
                tag,
            )
        {
            return Ok(());
        }
        let data = match request.buffer {
            Some((b, o)) => Data::Contiguous(b, o),
            None => Data::None,
        };
        self.submit_data(request.op, request.nsid, request.lba, request.blocks, data, tag)
    }

    // The common request, submitted without the general path's generality: a read or write
    // of one command, to the namespace of the latest read or write (`ns_cache`), on a live
    // queue with a free slot and nothing waiting in the software queue. False, having done
    // nothing, when any of that does not hold (or the request is invalid): `submit_data`
    // then takes it, and reports what is wrong with it.
    #[inline]
    #[allow(clippy::too_many_arguments)]
    fn submit_one(
        &mut self,
        op: Op,
        nsid: u32,
        lba: u64,
        blocks: u64,
        buffer: &Buffer<B>,
        offset: usize,
        tag: u64,
    ) -> bool {
        let ns = self.ns_cache;
        if ns.nsid != nsid
            || nsid == 0
            || blocks == 0
            || blocks > ns.per_cmd
            || lba.checked_add(blocks).is_none_or(|end| end > ns.blocks)
            || !offset.is_multiple_of(4)
            || !self.pending.is_empty()
            || self.free_cids.is_empty()
            || self.ring.is_full()
            || self.check_alive().is_err()
            || self.shared.generation.load(Ordering::Acquire) != self.generation
            || self.shared.namespace_generation() != self.namespace_generation
        {
            return false;
        }
        // `blocks` is at most 2^16 and the block size a power of two below 2^32: no overflow.
        let bytes = blocks << ns.block_shift;
        if (offset as u64)
            .checked_add(bytes)
            .is_none_or(|end| end > buffer.len() as u64)
        {
            return false;
        }
        let index = match self.free_requests.pop() {
            Some(i) => i,
            None => {
                self.requests.push(None);
                self.rests.push(Rest::default());
                (self.requests.len() - 1) as u32
            }
        };
        let hold = self.holds.take(buffer);
        let old = self.requests[index as usize].replace(Request {
            tag,
            op,
            parts: 1,
            error: None,
            deadline: UNSTAMPED,
            ended: false,
            buffer: None,
            hold,
            plan: None,
            sent: true,
            cdw0: 0,
            status: Status::SUCCESS,
            commands: 0,
        });
        // A free entry is `None`: nothing to drop (as in `submit_data`).
        debug_assert!(old.is_none());
        std::mem::forget(old);
        self.outstanding += 1;
        // Checked non-empty above.
        let cid = self.free_cids.pop().unwrap_or_default();
        let mut cmd = Command::new(if op == Op::Read { io::READ } else { io::WRITE });
        cmd.cid = cid;
        cmd.nsid = nsid;
        cmd.cdw[0] = lba as u32;
        cmd.cdw[1] = (lba >> 32) as u32;
        // Protection information as in `send`.
        cmd.cdw[2] = (blocks - 1) as u32 | ns.prinfo;
        if ns.reftag {
            cmd.cdw[4] = lba as u32;
        }
        (cmd.prp1, cmd.prp2) = prps(&self.prp, cid, buffer.iova() + offset as u64, bytes);
        self.slots[usize::from(cid)] = Slot {
            request: index,
            abandoned: None,
            abort_sent: false,
        };
        // Cannot fail: the ring has room (checked above).
        self.ring.push(&cmd);
        true
    }

    /// Queues a read of `blocks` blocks at `lba` into `segments`, in order (scatter): as
    /// [`submit`](Self::submit). Segments chain in one command's PRP list where PRPs allow
    /// (every segment but the first starts on a page, every one but the last ends on one).
    /// Where they do not, a controller that offers SGLs (Identify Controller SGLS) gets
    /// SGLs instead: any dword-aligned segments in one command (up to 256 per command; past
    /// that the request is cut at a block boundary, or refused). Without SGLs the request is
    /// split into commands at the segment boundary, which must then fall on a block
    /// boundary of the transfer, or the request is refused.
    pub fn submit_readv(
        &mut self,
        nsid: u32,
        lba: u64,
        blocks: u64,
        segments: &[Segment<'_, B>],
        tag: u64,
    ) -> Result<(), NvmeError> {
        self.submit_data(Op::Read, nsid, lba, blocks, Data::Vectored(segments), tag)
    }

    /// Queues a write of `blocks` blocks at `lba` from `segments`, in order (gather): as
    /// [`submit_readv`](Self::submit_readv).
    pub fn submit_writev(
        &mut self,
        nsid: u32,
        lba: u64,
        blocks: u64,
        segments: &[Segment<'_, B>],
        tag: u64,
    ) -> Result<(), NvmeError> {
        self.submit_data(Op::Write, nsid, lba, blocks, Data::Vectored(segments), tag)
    }

    #[inline]
    fn submit_data(
        &mut self,
        op: Op,
        nsid: u32,
        lba: u64,
        blocks: u64,
        data_in: Data<'_, B>,
        tag: u64,
    ) -> Result<(), NvmeError> {
        if let Err(e) = self.check_alive()
            && !self.revived_after_reset(&mut |_| {})?
        {
            return Err(e);
        }
        if self.shared.generation.load(Ordering::Acquire) != self.generation {
            return Err(NvmeError::Reset(
                "the controller was reset: poll the queue (it creates itself again)".into(),
            ));
        }
        let (buffer, offset) = match data_in {
            Data::Contiguous(b, o) => (Some(b), o),
            Data::None | Data::Vectored(_) => (None, 0),
        };
        // The list changed (a Namespace Attribute Changed event): take the new one.
        if self.shared.namespace_generation() != self.namespace_generation {
            self.namespace_generation = self.shared.namespace_generation();
            self.namespaces = self.shared.namespace_list();
            self.ns_cache = NsCache::default();
        }
        let Some(ns) = find_namespace(&self.namespaces, nsid) else {
            return Err(NvmeError::Invalid(if self.shared.namespace_removed(nsid) {
                format!(
                    "namespace {nsid} was removed (the controller reported it changed and no longer has it)"
                )
            } else {
                format!("no namespace {nsid}")
            }));
        };
        if let Some(why) = &ns.unusable {
            return Err(NvmeError::Unsupported(format!("namespace {nsid}: {why}")));
        }
        let bs = u64::from(ns.block_size);
        let info = &self.shared.info;
        let optional = match op {
            Op::WriteZeroes => Some((oncs::WRITE_ZEROES, 3)),
            Op::Deallocate => Some((oncs::DATASET_MANAGEMENT, 2)),
            _ => None,
        };
        if let Some((bit, n)) = optional
            && info.identify.oncs & bit == 0
        {
            return Err(NvmeError::Unsupported(format!(
                "{}: the controller does not offer it (ONCS bit {n} clear)",
                op.name()
            )));
        }
        if op != Op::Flush && (blocks == 0 || lba.checked_add(blocks).is_none_or(|end| end > ns.blocks)) {
            return Err(NvmeError::Invalid(format!(
                "{} of {blocks} blocks at LBA {lba}: namespace {nsid} has {} blocks",
                op.name(),
                ns.blocks
            )));
        }
        let data = matches!(op, Op::Read | Op::Write);
        let vectored = match data_in {
            Data::Vectored(segments) if data => Some(segments),
            _ => None,
        };
        if data && vectored.is_none() {
            let Some(buf) = buffer else {
                return Err(NvmeError::Invalid(format!("{} needs a buffer", op.name())));
            };
            let bytes = blocks * bs;
            if !offset.is_multiple_of(4)
                || (offset as u64)
                    .checked_add(bytes)
                    .is_none_or(|end| end > buf.len() as u64)
            {
                return Err(NvmeError::Invalid(format!(
                    "{} of {bytes} bytes at buffer offset {offset}: the buffer has {} bytes (offsets must be \
                     4-byte aligned)",
                    op.name(),
                    buf.len()
                )));
            }
        }
        // Commands this request takes. (No division when the block size is a power of two
        // and the request fits one command: a 64-bit division costs tens of cycles.)
        let max_transfer = self.shared.info.max_transfer;
        let per_cmd = match op {
            Op::Read | Op::Write if bs.is_power_of_two() => {
                (max_transfer >> bs.trailing_zeros()).clamp(1, 1 << 16)
            }
            Op::Read | Op::Write => (max_transfer / bs).clamp(1, 1 << 16),
            // WZSL, when reported.
            Op::WriteZeroes => info
                .identify_nvm
                .max_write_zeroes(info.cap.page_size_min())
                .map_or(1 << 16, |max| (max / bs).clamp(1, 1 << 16)),
            // One range per command: DMRSL (blocks per range) and DMSL (per command), when
            // reported.
            Op::Deallocate => [info.identify_nvm.dmrsl.into(), info.identify_nvm.dmsl]
                .into_iter()
                .filter(|&l| l != 0)
                .fold(u64::from(u32::MAX), u64::min),
            Op::Flush => u64::MAX,
            Op::Passthru => {
                return Err(NvmeError::Invalid(
                    "a passthrough command goes through IoQueue::submit_passthru, not an IoRequest".into(),
                ));
            }
        };
        if matches!(op, Op::Read | Op::Write) && bs.is_power_of_two() {
            self.ns_cache = NsCache {
                nsid,
                blocks: ns.blocks,
                block_shift: bs.trailing_zeros(),
                per_cmd,
                prinfo: ns.prinfo,
                reftag: ns.reftag,
            };
        }
        let plan = match vectored {
            Some(segments) => {
                let sgl = super::spec::sgl::supported(info.identify.sgls);
                Some(Box::new(Plan::new(segments, lba, blocks, bs, per_cmd, op, sgl)?))
            }
            None => None,
        };
        let parts = if let Some(plan) = &plan {
            plan.cmds.len() as u64
        } else if op == Op::Flush || blocks <= per_cmd {
            1
        } else {
            blocks.div_ceil(per_cmd)
        };
        let free = self.free_slots();
        let fits = self.pending.is_empty() && parts <= free as u64;
        if !fits && (self.pending.len() >= self.queue_limit || parts > u64::from(u32::MAX)) {
            return Err(NvmeError::QueueFull {
                qid: self.ring.qid,
                needed: parts,
                free,
                queued: self.pending.len(),
                limit: self.queue_limit,
            });
        }
        let iova = match buffer {
            Some(b) if data => b.iova() + offset as u64,
            _ => 0,
        };
        let index = match self.free_requests.pop() {
            Some(i) => i,
            None => {
                self.requests.push(None);
                self.rests.push(Rest::default());
                (self.requests.len() - 1) as u32
            }
        };
        let (buffer, hold) = match (&plan, vectored, buffer) {
            (Some(_), Some(segments), _) => (
                Some(DeviceOwned::new(Held::Many(
                    segments.iter().map(|s| Arc::clone(s.buffer)).collect(),
                ))),
                NO_HOLD,
            ),
            (None, _, Some(b)) if data => (None, self.holds.take(b)),
            _ => (None, NO_HOLD),
        };
        let old = self.requests[index as usize].replace(Request {
            tag,
            op,
            parts: 0,
            error: None,
            deadline: UNSTAMPED,
            ended: false,
            buffer,
            hold,
            plan,
            sent: false,
            cdw0: 0,
            status: Status::SUCCESS,
            commands: parts as u32,
        });
        // A free entry is `None`: nothing to drop, so no drop glue run for it.
        debug_assert!(old.is_none());
        std::mem::forget(old);
        let mut rest = Rest {
            nsid,
            lba,
            blocks,
            per_cmd,
            block_size: bs,
            iova,
            prinfo: ns.prinfo,
            reftag: ns.reftag,
        };
        self.outstanding += 1;
        if fits {
            // All its commands go now: nothing left to keep in `rests`.
            self.send(index, parts as u32, &mut rest);
        } else {
            self.rests[index as usize] = rest;
            self.pending.push_back(index);
            self.send_queued();
        }
        Ok(())
    }

    // Writes up to `max` more commands of the request at `index` to the SQ (the caller
    // checked that `max` slots are free), restarting its timeout (at the next check);
    // `rest` describes them (and is moved on past them).
    #[inline]
    fn send(&mut self, index: u32, max: u32, rest: &mut Rest) {
        let Some(req) = self.requests.get_mut(index as usize).and_then(Option::as_mut) else {
            return;
        };
        let op = req.op;
        let n_cmds = max.min(req.commands);
        req.parts += n_cmds;
        req.sent = true;
        req.deadline = UNSTAMPED;
        for _ in 0..n_cmds {
            // The next command: from the plan of a vectored request, else the next
            // `per_cmd` blocks.
            let (slba, n, pieces) = match &req.plan {
                Some(plan) => {
                    let (slba, n, pieces) = plan.cmds[plan.cmds.len() - req.commands as usize];
                    (slba, n, Some(pieces))
                }
                None => (rest.lba, rest.per_cmd.min(rest.blocks).max(1), None),
            };
            let cid = self.free_cids.pop().unwrap_or_default();
            let mut cmd = Command::new(match op {
                Op::Read => io::READ,
                Op::Write => io::WRITE,
                Op::Flush => io::FLUSH,
                Op::WriteZeroes => io::WRITE_ZEROES,
                Op::Deallocate => io::DATASET_MANAGEMENT,
                Op::Passthru => 0,
            });
            cmd.cid = cid;
            cmd.nsid = rest.nsid;
            match op {
                Op::Read | Op::Write | Op::WriteZeroes => {
                    cmd.cdw[0] = slba as u32;
                    cmd.cdw[1] = (slba >> 32) as u32;
                    // Protection information, when the namespace has it: the controller
                    // inserts and strips it (PRACT), checking the reference tag of the
                    // command's own first block.
                    cmd.cdw[2] = (n - 1) as u32 | rest.prinfo;
                    if rest.reftag {
                        cmd.cdw[4] = slba as u32;
                    }
                    if let (Some((from, to)), Some(plan)) = (pieces, &req.plan) {
                        let pieces = &plan.pieces[from as usize..to as usize];
                        if plan.sgl {
                            sgl::fill(&mut cmd, &self.prp, pieces);
                        } else {
                            (cmd.prp1, cmd.prp2) = prps_pieces(&self.prp, cid, pieces);
                        }
                    } else if op != Op::WriteZeroes {
                        let len = n * rest.block_size;
                        (cmd.prp1, cmd.prp2) = prps(&self.prp, cid, rest.iova, len);
                        rest.iova += len;
                    }
                }
                Op::Deallocate => {
                    // One range, in this command's PRP page: context attributes, length
                    // in blocks, starting LBA.
                    let page = usize::from(cid) * PAGE as usize;
                    let _ = self.prp.write::<u32>(page, 0);
                    let _ = self.prp.write::<u32>(page + 4, n as u32);
                    let _ = self.prp.write::<u64>(page + 8, slba);
                    cmd.prp1 = self.prp.iova() + page as u64;
                    // Number of ranges, zero-based; attribute: deallocate.
                    cmd.cdw[0] = 0;
                    cmd.cdw[1] = 1 << 2;
                }
                Op::Flush => {}
                Op::Passthru => {
                    if let Some(plan) = &req.plan {
                        passthru::fill(&mut cmd, plan, &self.prp);
                    }
                }
            }
            self.slots[usize::from(cid)] = Slot {
                request: index,
                abandoned: None,
                abort_sent: false,
            };
            // Cannot fail: the caller checked the free slots.
            self.ring.push(&cmd);
            rest.lba = slba + n;
            rest.blocks = rest.blocks.saturating_sub(n);
            req.commands -= 1;
        }
    }

    // Writes the software queue's commands to the SQ, oldest request first, as far as
    // slots are free. Whether it wrote any.
    fn send_queued(&mut self) -> bool {
        let mut any = false;
        while let Some(&index) = self.pending.front() {
            let free = self.free_slots() as u32;
            if free == 0 {
                break;
            }
            let left = self.requests[index as usize].as_ref().map_or(0, |r| r.commands);
            if left > 0 {
                let mut rest = self.rests[index as usize];
                self.send(index, free, &mut rest);
                self.rests[index as usize] = rest;
                any = true;
            }
            if left > free {
                break;
            }
            self.pending.pop_front();
        }
        any
    }

    /// Tells the controller of everything submitted since the last doorbell: one MMIO
    /// write (or a shadow doorbell update) for the whole batch.
    pub fn ring(&mut self) -> Result<(), NvmeError> {
        if !self.ring.unrung() {
            return Ok(());
        }
        if let Some(e) = self.shared.removed() {
            return Err(e);
        }
        // The registers are locked only for an MMIO write (none when a shadow doorbell
        // update suffices).
        let Some((at, value)) = self.ring.update_sq(self.shared.shadow.as_ref()) else {
            return Ok(());
        };
        let regs = self.regs.lock();
        let Some(regs) = regs.as_ref() else {
            drop(regs);
            return Err(self.fail_all_removed());
        };
        write_sq_doorbell(regs, at, value)
    }

    fn fail_all_removed(&self) -> NvmeError {
        self.shared
            .removed()
            .unwrap_or_else(|| NvmeError::Removed("queue registers revoked".into()))
    }

    /// Rings the doorbell for unsent submissions, then hands every completed request to
    /// `done` (its tag and result), ringing the completion doorbell once, and writes what
    /// waits in the software queue to the slots that freed. Returns how many requests
    /// completed. ([`poll_completions`](Self::poll_completions) gives the completions'
    /// dword 0 and status too.)
    ///
    /// Requests past their deadline complete with [`NvmeError::Timeout`]. When the
    /// controller is gone (registers all-ones), has failed (CSTS.CFS), or was revoked,
    /// every outstanding request completes with that error and the error is returned; the
    /// queue is then dead. A failed controller (CSTS.CFS) is reset instead, but not
    /// again and again: see [`Options::recovery_backoff`](super::Options::recovery_backoff)
    /// ([`NvmeError::RecoveryPending`], [`NvmeError::Failed`]).
    #[inline]
    pub fn poll(&mut self, mut done: impl FnMut(u64, Result<(), NvmeError>)) -> Result<usize, NvmeError> {
        self.poll_completions(|c| done(c.tag, c.result))
    }

    /// [`poll`](Self::poll), handing `done` each request's [`IoCompletion`]: its tag,
    /// result, and the dword 0 and status of the completion that ended it.
    pub fn poll_completions(&mut self, mut done: impl FnMut(IoCompletion)) -> Result<usize, NvmeError> {
        if let Err(e) = self.check_alive()
            && !self.revived_after_reset(&mut done)?
        {
            return Err(self.fail_all(e, &mut done));
        }
        let mut reset_ended = 0;
        if self.shared.generation.load(Ordering::Acquire) != self.generation {
            reset_ended = self.recreate("the controller was reset", &mut done)?;
        }
        // The registers are locked only for MMIO writes (doorbells, a status read): an empty
        // poll reads DMA memory only. Once locked for the SQ doorbell, the lock is kept for
        // the CQ doorbell after the completions.
        let mut guard = None;
        if let Some((at, value)) = self.ring.update_sq(self.shared.shadow.as_ref()) {
            let g = self.regs.lock();
            let written = match g.as_ref() {
                Some(regs) => write_sq_doorbell(regs, at, value),
                None => Err(self.fail_all_removed()),
            };
            if let Err(e) = written {
                drop((g, guard));
                return Err(self.fail_all(e, &mut done));
            }
            guard = Some(g);
        }
        let mut completed = reset_ended;
        let mut seen = 0usize;
        // The SQ head the last completion reported: taken once, after the loop (the
        // controller's head only moves on; the last one says the most).
        let mut sq_head = None;
        while let Some(c) = self.ring.pop_entry() {
            seen += 1;
            sq_head = Some(c.sq_head);
            let Some(slot) = self.slots.get(usize::from(c.cid)).copied() else {
                log::debug!(
                    "queue {}: completion with unknown cid {} ignored",
                    self.ring.qid,
                    c.cid
                );
                continue;
            };
            if slot.request == FREE {
                // A duplicate, or a cid nobody used.
                log::debug!(
                    "queue {}: completion for free cid {} ignored",
                    self.ring.qid,
                    c.cid
                );
                continue;
            }
            self.slots[usize::from(c.cid)] = FREE_SLOT;
            self.free_cids.push(c.cid);
            if slot.abandoned.is_some() {
                self.abandoned -= 1;
                if slot.abort_sent {
                    self.aborts.retain(|a| a.cid != c.cid);
                }
                abandoned_done(
                    &mut self.requests,
                    &mut self.free_requests,
                    &mut self.holds,
                    slot.request as usize,
                    &c,
                );
                continue;
            }
            let index = slot.request as usize;
            let Some(req) = self.requests.get_mut(index).and_then(Option::as_mut) else {
                continue;
            };
            let status = c.status();
            if req.error.is_none() {
                // The first failure decides the result; until one, the latest completion.
                req.cdw0 = c.dw0;
                req.status = status;
                if !status.is_success() {
                    req.error = Some(Box::new(NvmeError::Command {
                        command: req.op.name().to_owned(),
                        status,
                    }));
                    // Its commands still in the software queue are not sent.
                    if req.commands > 0 {
                        req.commands = 0;
                        self.pending.retain(|&i| i as usize != index);
                    }
                }
            }
            req.parts -= 1;
            if req.parts == 0 && req.commands == 0 {
                // What the caller gets, taken out in place: the slab entry is then emptied
                // where it is, not moved out whole.
                let (tag, cdw0, status, hold) = (req.tag, req.cdw0, req.status, req.hold);
                let rare = (req.buffer.take(), req.error.take(), req.plan.take());
                // Emptied of everything with drop glue: forgotten, not dropped (no drop
                // glue run on the I/O path).
                std::mem::forget(self.requests[index].take());
                self.free_requests.push(index as u32);
                self.outstanding -= 1;
                completed += 1;
                let proof = Released::completed(&c);
                if hold != NO_HOLD {
                    self.holds.put(hold, &proof);
                }
                let result = match rare {
                    // Nothing to drop: forgotten, as above.
                    none @ (None, None, None) => {
                        std::mem::forget(none);
                        Ok(())
                    }
                    (buffer, error, _plan) => {
                        if let Some(b) = buffer {
                            b.release(&proof);
                        }
                        error.map_or(Ok(()), |e| Err(*e))
                    }
                };
                done(IoCompletion {
                    tag,
                    result,
                    cdw0,
                    status: Some(status),
                });
            }
        }
        if let Some(head) = sq_head {
            self.ring.saw_sq_head(head);
        }
        if seen > 0 {
            self.shared.saw_completions();
            self.completions += seen as u64;
            self.ring
                .bound_unconsumed((self.slots.len() - self.free_cids.len()) as u16);
            if let Some((at, value)) = self.ring.update_cq(self.shared.shadow.as_ref()) {
                let g = guard.take().unwrap_or_else(|| self.regs.lock());
                let Some(regs) = g.as_ref() else {
                    drop((g, guard));
                    let e = self.fail_all_removed();
                    return Err(self.fail_all(e, &mut done));
                };
                write_cq_doorbell(regs, at, value)?;
            }
        }
        drop(guard);
        // Slots freed: what waits in the software queue takes them, told at once.
        if !self.pending.is_empty()
            && self.send_queued()
            && let Some((at, value)) = self.ring.update_sq(self.shared.shadow.as_ref())
        {
            let g = self.regs.lock();
            let written = match g.as_ref() {
                Some(regs) => write_sq_doorbell(regs, at, value),
                None => Err(self.fail_all_removed()),
            };
            if let Err(e) = written {
                drop(g);
                return Err(self.fail_all(e, &mut done));
            }
        }
        if self.outstanding == 0 && self.abandoned == 0 {
            return Ok(completed);
        }
        // Is the controller still there, is a request late? Asked on busy polls too (a
        // command stuck on a queue that is never idle must still time out), but the
        // clock, the coarse one, is read every `CHECK_EVERY` polls only.
        self.polls += 1;
        if self.polls < CHECK_EVERY {
            return Ok(completed);
        }
        self.polls = 0;
        let coarse = coarse_now();
        if coarse < self.next_check {
            return Ok(completed);
        }
        self.next_check = coarse + CHECK_INTERVAL;
        let status = match self.regs.lock().as_ref() {
            Some(regs) => check_status(regs).map_err(|e| self.shared.name_removal(e)),
            None => Err(self.fail_all_removed()),
        };
        if let Err(e) = status {
            // CSTS.CFS: the specification's recovery, a controller reset.
            if let NvmeError::Fatal { csts } = e {
                return self.recover(csts, completed, &mut done);
            }
            return Err(self.fail_all(e, &mut done));
        }
        let now = Instant::now();
        for index in 0..self.requests.len() {
            let Some(req) = self.requests[index].as_mut() else {
                continue;
            };
            // Only requests with commands on the controller time out: one waiting in
            // the software queue alone waits for those ahead of it.
            if req.ended || req.parts == 0 {
                continue;
            }
            // Written to the SQ since the last check: its timeout runs from now.
            if req.deadline == UNSTAMPED {
                req.deadline = coarse.saturating_add(self.shared.io_timeout);
                continue;
            }
            if req.deadline > coarse {
                continue;
            }
            // Reported now; its commands are abandoned, and the request (with its
            // buffer) stays until they end.
            req.ended = true;
            if req.commands > 0 {
                req.commands = 0;
                self.pending.retain(|&i| i as usize != index);
            }
            let (tag, op) = (req.tag, req.op);
            let raw = req.plan.as_ref().and_then(|p| p.raw).map(|c| c.opcode);
            for (cid, slot) in self.slots.iter_mut().enumerate() {
                if slot.request == index as u32 && slot.abandoned.is_none() {
                    slot.abandoned = Some(now);
                    self.abandoned += 1;
                    // The application hears of it before the Abort (below) goes.
                    let opcode = raw.unwrap_or_else(|| super::controller::io_opcode(op));
                    self.shared.command_timed_out(self.ring.qid, cid as u16, opcode);
                }
            }
            self.outstanding -= 1;
            completed += 1;
            log::warn!(
                "{}: queue {}: {} (tag {}) timed out; its commands are aborted, their slots and buffer kept \
                 until the controller answers (or a reset)",
                self.shared.info.address,
                self.ring.qid,
                op.name(),
                tag
            );
            done(IoCompletion::without_status(
                tag,
                NvmeError::Timeout {
                    what: op.name().to_owned(),
                    waited: self.shared.io_timeout,
                },
            ));
        }
        if self.abandoned > 0 {
            self.send_aborts();
            self.take_abort_answers();
        }
        // A command abandoned and still live in the controller past what its Abort allows:
        // only a controller reset gets its slot (and the controller) back.
        let stuck = (0..self.slots.len()).find_map(|cid| self.overdue(cid as u16, now));
        if let Some((cid, why)) = stuck {
            let why = format!("command {cid} of queue {} {why}", self.ring.qid);
            match self.shared.recovery_reset(self.generation, &why) {
                Ok(()) => completed += self.recreate(&why, &mut done)?,
                // Nothing waits: the abandoned commands keep their slots until the reset.
                Err(e @ NvmeError::RecoveryPending { .. }) => return Err(e),
                Err(e) => return Err(self.fail_all(e, &mut done)),
            }
        }
        Ok(completed)
    }

    // Sends Aborts for abandoned commands that have none yet, as far as the controller's
    // Abort Command Limit and the admin queue allow; the rest wait for a later poll (or the
    // reset that ends a command abandoned too long).
    fn send_aborts(&mut self) {
        let qid = self.ring.qid;
        for (cid, slot) in self.slots.iter_mut().enumerate() {
            if slot.abandoned.is_none() || slot.abort_sent {
                continue;
            }
            let Some(abort_cid) = self.shared.try_abort(qid, cid as u16) else {
                break;
            };
            slot.abort_sent = true;
            self.aborts.push(AbortSent {
                cid: cid as u16,
                abort_cid,
                sent: Instant::now(),
                answered: None,
            });
        }
    }

    // Notes the answers to this queue's Aborts that came (collecting the admin queue's
    // completions if no other thread holds it).
    fn take_abort_answers(&mut self) {
        if self.aborts.iter().all(|a| a.answered.is_some()) {
            return;
        }
        self.shared.collect_abort_answers();
        for a in self.aborts.iter_mut().filter(|a| a.answered.is_none()) {
            if let Some(answer) = self.shared.take_abort_answer(a.abort_cid) {
                a.answered = Some(answer.at);
                if !answer.aborted {
                    log::info!(
                        "{}: queue {}: command {} was not aborted: it is still live in the controller",
                        self.shared.info.address,
                        self.ring.qid,
                        a.cid
                    );
                }
            }
        }
    }

    // Whether abandoned command `cid` is past what its Abort allows, and how: not
    // completed an I/O timeout after its Abort's answer (aborted or not: the controller
    // said whether it still executes it), its Abort unanswered an admin timeout after it
    // went, or no Abort sent (the Abort Command Limit, a busy admin queue) an I/O timeout
    // after the command was abandoned.
    fn overdue(&self, cid: u16, now: Instant) -> Option<(u16, String)> {
        let abandoned = self.slots[usize::from(cid)].abandoned?;
        let io = self.shared.io_timeout;
        let (since, limit, what) = match self.aborts.iter().find(|a| a.cid == cid) {
            Some(AbortSent {
                answered: Some(at), ..
            }) => (*at, io, "not completed after its Abort was answered"),
            Some(a) => (a.sent, self.shared.admin_timeout, "has its Abort unanswered"),
            None => (abandoned, io, "got no Abort and did not complete"),
        };
        (now.duration_since(since) >= limit).then(|| (cid, format!("{what} within {} ms", limit.as_millis())))
    }

    // CSTS.CFS: the specification's recovery is a controller reset. Outstanding requests
    // end (once) with `Reset`, and the queue is created again; if the reset fails, the
    // queue is dead. Recovery resets back off and are bounded (`recovery_reset`): while
    // backing off the poll fails with `RecoveryPending` and the requests stay.
    fn recover(
        &mut self,
        csts: u32,
        completed: usize,
        done: &mut impl FnMut(IoCompletion),
    ) -> Result<usize, NvmeError> {
        let why = format!("controller failed (CSTS.CFS set, CSTS {csts:#x})");
        match self.shared.recovery_reset(self.generation, &why) {
            Ok(()) => Ok(completed + self.recreate(&why, done)?),
            // Nothing waits: the requests stay outstanding until the reset ends them.
            Err(e @ NvmeError::RecoveryPending { .. }) => Err(e),
            Err(e) => Err(self.fail_all(e, done)),
        }
    }

    // After a controller reset: ends every outstanding request with `Reset`, releases
    // every buffer (the controller was disabled), and creates the queue again on the
    // controller. Returns how many requests it ended.
    fn recreate(&mut self, why: &str, done: &mut impl FnMut(IoCompletion)) -> Result<usize, NvmeError> {
        let generation = self.shared.generation.load(Ordering::Acquire);
        let Some(proof) = self.shared.quiesced_since(self.epoch) else {
            // The reset's disable came before this queue was created: the queue lives on
            // the controller as it is.
            self.generation = generation;
            return Ok(0);
        };
        let mut ended = 0;
        for index in 0..self.requests.len() {
            if let Some(req) = self.requests[index].take() {
                self.free_requests.push(index as u32);
                if let Some(b) = req.buffer {
                    b.release(&proof);
                }
                if !req.ended {
                    ended += 1;
                    done(IoCompletion::without_status(
                        req.tag,
                        NvmeError::Reset(why.to_owned()),
                    ));
                }
            }
        }
        // The requests that used them are gone.
        self.holds.release_all(&proof);
        self.outstanding = 0;
        self.pending.clear();
        self.ring.reset();
        self.slots.fill(FREE_SLOT);
        self.abandoned = 0;
        self.aborts.clear();
        self.free_cids = (0..self.slots.len() as u16).rev().collect();
        let qid = self.ring.qid;
        let granted = self.shared.io_queues();
        let created = if qid > granted {
            Err(NvmeError::Removed(format!(
                "queue {qid} cannot be created again: after the reset the controller grants {granted} I/O queues"
            )))
        } else {
            create_on_controller(&self.shared, &self.ring)
        };
        if let Err(e) = created {
            let e = if e.is_fatal() {
                e
            } else {
                NvmeError::Removed(format!(
                    "queue {qid} could not be created again after a reset: {e}"
                ))
            };
            return Err(self.fail_all(e, done));
        }
        self.generation = generation;
        self.epoch = self.shared.epoch();
        Ok(ended)
    }

    // A queue that died of its controller's failure (recovery gave up, or it could not be
    // created again after a reset) lives again once the controller was reset since (the
    // application's `Controller::reset`) and is neither failed, removed nor shut down: it
    // is created again on the controller, with its queue id, as after a recovery reset.
    // `Ok(false)`: it stays dead (the caller reports why).
    #[cold]
    #[inline(never)]
    fn revived_after_reset(&mut self, done: &mut impl FnMut(IoCompletion)) -> Result<bool, NvmeError> {
        if self.dead.is_none()
            || self.shared.is_revoked()
            || self.shared.is_failed()
            || self.shared.removed().is_some()
            || self.shared.shut_down.load(Ordering::Acquire)
            || self.shared.generation.load(Ordering::Acquire) == self.generation
        {
            return Ok(false);
        }
        let why = self.dead.take().unwrap_or_default();
        log::info!(
            "{}: queue {}: the controller was reset since the queue failed ({why}): creating it again",
            self.shared.info.address,
            self.ring.qid
        );
        // Nothing is outstanding (the failure ended it all): `done` sees nothing.
        self.recreate("the controller was reset", done)?;
        Ok(true)
    }

    // Ends every outstanding request with `e`, marks the queue dead, returns `e`. Buffers
    // the controller may still reach are parked with the controller.
    fn fail_all(&mut self, e: NvmeError, done: &mut impl FnMut(IoCompletion)) -> NvmeError {
        let why = match &e {
            NvmeError::Removed(why) => why.clone(),
            other => other.to_string(),
        };
        let proof = self.shared.quiesced_since(self.epoch);
        let mut kept = Vec::new();
        for index in 0..self.requests.len() {
            if let Some(req) = self.requests[index].take() {
                self.free_requests.push(index as u32);
                if !req.sent && req.hold != NO_HOLD {
                    self.holds.put(req.hold, &Released::never_submitted());
                }
                match (req.buffer, &proof) {
                    (Some(b), _) if !req.sent => b.release(&Released::never_submitted()),
                    (Some(b), Some(proof)) => b.release(proof),
                    (Some(b), None) => kept.push(b.boxed()),
                    (None, _) => {}
                }
                if !req.ended {
                    done(IoCompletion::without_status(
                        req.tag,
                        NvmeError::Removed(why.clone()),
                    ));
                }
            }
        }
        self.pending.clear();
        // The buffers of requests with a command sent (the others' were given back above).
        match &proof {
            Some(proof) => self.holds.release_all(proof),
            None => kept.extend(self.holds.take_all().into_iter().map(DeviceOwned::boxed)),
        }
        if !kept.is_empty() {
            self.shared.park(self.epoch, kept, None);
        }
        self.outstanding = 0;
        // The slots name requests that are gone: the queue cannot go on.
        self.dead = Some(why);
        e
    }

    /// Submits one request and waits for it (polling), on a queue with nothing else
    /// outstanding.
    pub fn run(&mut self, request: &IoRequest<'_, B>) -> Result<(), NvmeError> {
        self.run_with(|q| q.submit(request, 0))
    }

    fn run_with(&mut self, submit: impl FnOnce(&mut Self) -> Result<(), NvmeError>) -> Result<(), NvmeError> {
        if self.outstanding != 0 {
            return Err(NvmeError::Invalid(format!(
                "queue {}: {} requests outstanding; run() needs an idle queue",
                self.ring.qid, self.outstanding
            )));
        }
        submit(self)?;
        self.ring()?;
        let mut result = None;
        let mut spins = 0u32;
        while result.is_none() {
            match self.poll(|_, r| result = Some(r)) {
                Ok(_) => {}
                // A blocking call waits out the backoff: the reset ends the request.
                Err(NvmeError::RecoveryPending { retry_in, .. }) => {
                    std::thread::sleep(retry_in.min(Duration::from_millis(10)));
                    continue;
                }
                Err(e) => return Err(e),
            }
            spins += 1;
            if spins > 10_000 {
                std::thread::yield_now();
            }
        }
        result.unwrap_or(Ok(()))
    }

    /// The eventfd this queue's completions signal, when the controller was brought up with
    /// [`Options::interrupts`](super::Options::interrupts): readable after a completion
    /// (several queues may share one when vectors are fewer than queues). For an event
    /// loop; [`wait`](Self::wait) does it for simple programs.
    pub fn interrupt_fd(&self) -> Option<BorrowedFd<'_>> {
        vector(&self.shared, self.ring.qid).map(|v| self.shared.interrupts[v as usize].as_fd())
    }

    /// [`poll`](Self::poll), and if nothing completed while requests are outstanding,
    /// sleeps until the queue's interrupt fires (or `timeout` passes), then polls again.
    /// Without interrupts it is `poll`.
    pub fn wait(
        &mut self,
        timeout: Duration,
        mut done: impl FnMut(u64, Result<(), NvmeError>),
    ) -> Result<usize, NvmeError> {
        self.wait_completions(timeout, |c| done(c.tag, c.result))
    }

    /// The hybrid of polling and sleeping: [`poll`](Self::poll)s for up to `spin` while
    /// requests are outstanding and nothing completed, then [`wait`](Self::wait)s (sleeps on
    /// the interrupt for up to `timeout`). Returns at the first poll that completed
    /// something, or after the sleep.
    ///
    /// Polling alone spends a whole core and, on a host whose cores are shared, loses the
    /// most when its thread is preempted; sleeping at once pays an interrupt's wake-up on
    /// every completion. Spinning for about one device latency after each submission takes
    /// the fast completions at polling's latency and gives the core back when the device is
    /// slow or idle (figures in BENCHMARKS.md, issue 15 §8: on a loaded host, 50 µs kept
    /// the QD 1 p99 at a fifth of polling's). The queue's interrupt still fires while it
    /// spins (vfio-pci cannot mask a single MSI-X vector). Without interrupts it polls for
    /// `spin` and returns.
    pub fn wait_spinning(
        &mut self,
        spin: Duration,
        timeout: Duration,
        mut done: impl FnMut(u64, Result<(), NvmeError>),
    ) -> Result<usize, NvmeError> {
        let started = Instant::now();
        loop {
            let n = self.poll(&mut done)?;
            if n > 0 || self.outstanding == 0 {
                return Ok(n);
            }
            if started.elapsed() >= spin {
                break;
            }
            std::hint::spin_loop();
        }
        // Without interrupts `wait` polls once more and returns: the spin is bounded.
        self.wait(timeout, done)
    }

    /// [`wait`](Self::wait), handing `done` each request's [`IoCompletion`] as
    /// [`poll_completions`](Self::poll_completions) does.
    pub fn wait_completions(
        &mut self,
        timeout: Duration,
        mut done: impl FnMut(IoCompletion),
    ) -> Result<usize, NvmeError> {
        let n = self.poll_completions(&mut done)?;
        if n > 0 || self.outstanding == 0 {
            return Ok(n);
        }
        let Some(v) = vector(&self.shared, self.ring.qid) else {
            return Ok(0);
        };
        // The controller's state outlives this borrow of the queue.
        let shared = Arc::clone(&self.shared);
        let efd = &shared.interrupts[v as usize];
        // Clear, then check once more: a completion posted before the clear is seen by the
        // poll, one after it signals the eventfd.
        let _ = efd.read();
        let n = self.poll_completions(&mut done)?;
        if n > 0 {
            return Ok(n);
        }
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        let mut fds = [PollFd::new(efd.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX)) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(NvmeError::Invalid(format!("poll on the interrupt eventfd: {e}"))),
        }
        // After a sleep this poll reads the clock, whatever the count of polls says.
        self.polls = CHECK_EVERY;
        self.poll_completions(done)
    }

    /// Reads `blocks` blocks at `lba` into `buffer` at `offset`, waiting for them.
    pub fn read(
        &mut self,
        nsid: u32,
        lba: u64,
        blocks: u64,
        buffer: &Buffer<B>,
        offset: usize,
    ) -> Result<(), NvmeError> {
        self.run(&IoRequest::read(nsid, lba, blocks, buffer, offset))
    }

    /// Writes `blocks` blocks at `lba` from `buffer` at `offset`, waiting for them.
    pub fn write(
        &mut self,
        nsid: u32,
        lba: u64,
        blocks: u64,
        buffer: &Buffer<B>,
        offset: usize,
    ) -> Result<(), NvmeError> {
        self.run(&IoRequest::write(nsid, lba, blocks, buffer, offset))
    }

    /// Reads `blocks` blocks at `lba` into `segments` in order, waiting for them (see
    /// [`submit_readv`](Self::submit_readv)).
    pub fn readv(
        &mut self,
        nsid: u32,
        lba: u64,
        blocks: u64,
        segments: &[Segment<'_, B>],
    ) -> Result<(), NvmeError> {
        self.run_with(|q| q.submit_readv(nsid, lba, blocks, segments, 0))
    }

    /// Writes `blocks` blocks at `lba` from `segments` in order, waiting for them (see
    /// [`submit_writev`](Self::submit_writev)).
    pub fn writev(
        &mut self,
        nsid: u32,
        lba: u64,
        blocks: u64,
        segments: &[Segment<'_, B>],
    ) -> Result<(), NvmeError> {
        self.run_with(|q| q.submit_writev(nsid, lba, blocks, segments, 0))
    }

    /// Flushes namespace `nsid`, waiting for it.
    pub fn flush(&mut self, nsid: u32) -> Result<(), NvmeError> {
        self.run(&IoRequest::flush(nsid))
    }
}

impl<B: DeviceBacking> IoQueue<B> {
    // Deletes the queue on the controller: proof that it no longer reaches the queue's
    // memory, or `None` when the deletion failed.
    fn delete_on_controller(&self) -> Option<Released> {
        let qid = self.ring.qid;
        let mut cmd = Command::new(admin::DELETE_SQ);
        cmd.cdw[0] = u32::from(qid);
        let deleted = self
            .shared
            .admin(cmd, &format!("Delete I/O SQ {qid}"))
            .and_then(|sq| {
                let mut cmd = Command::new(admin::DELETE_CQ);
                cmd.cdw[0] = u32::from(qid);
                let cq = self.shared.admin(cmd, &format!("Delete I/O CQ {qid}"))?;
                Ok(Released::queue_deleted(&sq, &cq))
            });
        deleted
            .inspect_err(|e| log::warn!("{}: deleting I/O queue {qid}: {e}", self.shared.info.address))
            .ok()
    }
}

impl<B: DeviceBacking> Drop for IoQueue<B> {
    fn drop(&mut self) {
        let qid = self.ring.qid;
        let proof = match self.shared.quiesced_since(self.epoch) {
            // Disabled since the queue was created (it is gone from the controller), or
            // bus mastering is off.
            Some(proof) => Some(proof),
            // After a shutdown the controller takes no commands (its deletes of the queues
            // may have failed): kept until a reset or bus mastering off.
            None if self.shared.removed().is_none()
                && self.dead.is_none()
                && !self.shared.shut_down.load(Ordering::Acquire) =>
            {
                self.delete_on_controller()
            }
            None => None,
        };
        // A request still wholly in the software queue never handed its buffer over.
        let never_sent = Released::never_submitted();
        for r in self.requests.iter().flatten() {
            if !r.sent && r.hold != NO_HOLD {
                self.holds.put(r.hold, &never_sent);
            }
        }
        let buffers = self
            .requests
            .iter_mut()
            .filter_map(|r| r.take())
            .filter_map(|r| match r.buffer {
                Some(b) if !r.sent => {
                    b.release(&never_sent);
                    None
                }
                b => b,
            });
        match proof {
            Some(proof) => {
                for b in buffers {
                    b.release(&proof);
                }
                self.holds.release_all(&proof);
                self.shared.free_qid(qid);
            }
            None => {
                // The controller may still own the queue, its id, and everything it
                // reaches: kept until it is disabled or bus mastering is off.
                let mut memory: Vec<_> = buffers.map(DeviceOwned::boxed).collect();
                memory.extend(self.holds.take_all().into_iter().map(DeviceOwned::boxed));
                for m in [&self.memory[0], &self.memory[1], &self.prp] {
                    memory.push(DeviceOwned::new(m.clone()).boxed());
                }
                self.shared.park(self.epoch, memory, Some(qid));
            }
        }
        // The BAR mapping goes with `self.regs` (`QueueRegs` unmaps under its lock, in
        // revoke's sight).
    }
}

#[cfg(all(test, feature = "testing"))]
mod tests {
    use std::sync::{Arc, mpsc};
    use std::time::{Duration, Instant};

    use crate::nvme::{Controller, IoRequest, Options};
    use crate::testing::nvme::{CommandMatch, EmuConfig, EmulatedNvme, Fault};

    #[test]
    fn requests_sharing_a_buffer_hold_it_until_the_last_command_ends() {
        // Issue 15 §6: a queue holds a buffer once for all its requests using it (a count,
        // not an `Arc` clone each). The count must keep the buffer for a command abandoned
        // after a timeout while the requests beside it complete, and give it back after.
        let e = EmulatedNvme::new(EmuConfig {
            abort_succeeds: true,
            ..EmuConfig::default()
        })
        .unwrap();
        let options = Options {
            io_timeout: Duration::from_millis(200),
            ..Options::default()
        };
        let c = Controller::init(e.clone(), &options).unwrap();
        let mut q = c.io_queue(8).unwrap();
        let buf = c.alloc_buffer(3 * 4096).unwrap();
        let other = c.alloc_buffer(4096).unwrap();
        // The first command is swallowed (until its Abort); the others complete.
        e.inject(Fault::NeverComplete {
            command: CommandMatch::AnyIo,
            count: 1,
        });
        q.submit(&IoRequest::read(1, 0, 8, &buf, 0), 0).unwrap();
        q.submit(&IoRequest::read(1, 8, 8, &buf, 4096), 1).unwrap();
        // Another buffer in between: the shared one is found again after it.
        q.submit(&IoRequest::read(1, 16, 8, &other, 0), 2).unwrap();
        q.submit(&IoRequest::read(1, 24, 8, &buf, 8192), 3).unwrap();
        q.ring().unwrap();
        assert!(Arc::strong_count(&buf) > 1);
        let mut ended = Vec::new();
        let start = Instant::now();
        while ended.len() < 4 && start.elapsed() < Duration::from_secs(30) {
            q.poll(|tag, r| ended.push((tag, r.is_ok()))).unwrap();
            std::thread::sleep(Duration::from_millis(1));
        }
        ended.sort_unstable();
        assert_eq!(ended, [(0, false), (1, true), (2, true), (3, true)]);
        assert_eq!(
            Arc::strong_count(&other),
            1,
            "a completed request's buffer is given back"
        );
        // Only polls consume completions: the Abort's effect is not seen yet.
        assert_eq!(
            Arc::strong_count(&buf),
            2,
            "the abandoned command keeps the buffer it shared with completed requests"
        );
        let start = Instant::now();
        while Arc::strong_count(&buf) > 1 && start.elapsed() < Duration::from_secs(30) {
            q.poll(|tag, _| panic!("request {tag} ended twice")).unwrap();
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(
            Arc::strong_count(&buf),
            1,
            "given back once the aborted command ended"
        );
        assert_eq!(e.stats().bad_dma, 0);
        // The queue goes on, the buffer held again and given back.
        q.read(1, 0, 8, &buf, 0).unwrap();
        assert_eq!(Arc::strong_count(&buf), 1);
    }

    #[test]
    fn an_empty_poll_takes_no_register_lock() {
        // Issue 15 §6: every poll locked the queue's registers (the lock revoke takes to
        // drop them), though a poll that finds no completion writes no register. Shown
        // with the lock held elsewhere: the poll blocked until it was released.
        let e = EmulatedNvme::new(EmuConfig::default()).unwrap();
        let c = Controller::init(e.clone(), &Options::default()).unwrap();
        let mut q = c.io_queue(8).unwrap();
        let buf = c.alloc_buffer(4096).unwrap();
        e.inject(Fault::NeverComplete {
            command: CommandMatch::AnyIo,
            count: 1,
        });
        q.submit(&IoRequest::read(1, 0, 8, &buf, 0), 1).unwrap();
        q.ring().unwrap();
        let regs = Arc::clone(&q.regs.0);
        let held = regs.lock();
        let (tx, rx) = mpsc::channel();
        let polling = std::thread::spawn(move || {
            let n = q.poll(|_, _| {}).map_err(|e| e.to_string());
            let _ = tx.send(n);
            q
        });
        // Generous: the poll either returns at once or blocks until the lock is released.
        let got = rx.recv_timeout(Duration::from_secs(30));
        drop(held);
        drop(polling.join().unwrap());
        assert!(matches!(got, Ok(Ok(0))), "{got:?}");
    }
}
