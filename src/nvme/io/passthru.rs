//! I/O passthrough: a raw NVMe I/O command the driver does not wrap, on an [`IoQueue`],
//! completing through the same [`poll`](IoQueue::poll) /
//! [`poll_completions`](IoQueue::poll_completions) path as every request.
//!
//! The caller gives the opcode, namespace and command dwords 2–3 and 10–15; the driver
//! fills in everything that names memory or the queue's state: the command id, the data
//! pointer (PRP1 and PRP2, or a PRP list in the slot's own list page, built from a region
//! of a [`Buffer`]), PSDT (PRPs), fused bits (none), and the metadata pointer (always 0:
//! a namespace whose metadata travels in a separate buffer is refused). So a passthrough
//! command can name no IOVA the application does not own through a buffer, and the buffer
//! is held, as for every request, until the controller is done with it (`owned.rs`).
//!
//! What the driver cannot check is the command's own transfer length (it depends on the
//! opcode): the caller sizes the region to what the command moves. The rest of the PRP
//! list page is cleared, so a command that moves more than the region finds null entries
//! rather than stale addresses of earlier commands.

use super::{Buffer, IoCompletion, IoQueue, NO_HOLD, Op, Plan, Request, Rest, UNSTAMPED, prps_pieces};
use crate::bus::backing::{DeviceBacking, DmaMemory};
use crate::nvme::NvmeError;
use crate::nvme::controller::PAGE;
use crate::nvme::owned::SharedDma;
use crate::nvme::spec::{Command, Status};

/// Which way a passthrough command's data moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataDirection {
    /// Host to controller (the command reads the buffer: a write).
    ToDevice,
    /// Controller to host (the command writes the buffer: a read).
    FromDevice,
}

/// A raw NVMe I/O command for [`IoQueue::submit_passthru`]: what the caller chooses. The
/// command id, data pointer, metadata pointer and PSDT / fused bits are the driver's.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IoPassthru {
    /// Opcode. Bits 1:0 give the data direction for opcodes that follow the
    /// specification's convention (01b host to controller, 10b controller to host); a
    /// [`PassthruData`] going the other way is refused.
    pub opcode: u8,
    /// Namespace ID.
    pub nsid: u32,
    /// Command dword 2.
    pub cdw2: u32,
    /// Command dword 3.
    pub cdw3: u32,
    /// Command dwords 10–15.
    pub cdw: [u32; 6],
}

impl IoPassthru {
    /// Opcode `opcode` on namespace `nsid`, every dword 0.
    pub fn new(opcode: u8, nsid: u32) -> Self {
        IoPassthru {
            opcode,
            nsid,
            ..Self::default()
        }
    }
}

/// The data of a passthrough command: `len` bytes of `buffer` from `offset`, moving
/// `direction`.
#[derive(Debug)]
pub struct PassthruData<'a, B: DeviceBacking> {
    /// The buffer.
    pub buffer: &'a Buffer<B>,
    /// Where the data starts in it (4-byte aligned, as PRP1's offset must be).
    pub offset: usize,
    /// Bytes: what the command moves (at most the controller's transfer limit).
    pub len: usize,
    /// Which way.
    pub direction: DataDirection,
}

impl<B: DeviceBacking> Clone for PassthruData<'_, B> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<B: DeviceBacking> Copy for PassthruData<'_, B> {}

impl<'a, B: DeviceBacking> PassthruData<'a, B> {
    /// `len` bytes of `buffer` from `offset` that the controller writes (a read).
    pub fn from_device(buffer: &'a Buffer<B>, offset: usize, len: usize) -> Self {
        PassthruData {
            buffer,
            offset,
            len,
            direction: DataDirection::FromDevice,
        }
    }
    /// `len` bytes of `buffer` from `offset` that the controller reads (a write).
    pub fn to_device(buffer: &'a Buffer<B>, offset: usize, len: usize) -> Self {
        PassthruData {
            direction: DataDirection::ToDevice,
            ..Self::from_device(buffer, offset, len)
        }
    }
}

// The command to write to the SQ for a passthrough request: `plan.raw` with the data
// pointer built from `plan.pieces` in slot `cmd.cid`'s list page (the rest of the page
// cleared). `cmd` holds the command id and namespace already.
pub(super) fn fill<D: DmaMemory>(cmd: &mut Command, plan: &Plan, list: &SharedDma<D>) {
    let Some(raw) = plan.raw else {
        return;
    };
    cmd.opcode = raw.opcode;
    cmd.cdw2 = raw.cdw2;
    cmd.cdw3 = raw.cdw3;
    cmd.cdw = raw.cdw;
    if !plan.pieces.is_empty() {
        let page = usize::from(cmd.cid) * PAGE as usize;
        let _ = list.write_at(page, &[0u8; PAGE as usize]);
        (cmd.prp1, cmd.prp2) = prps_pieces(list, cmd.cid, &plan.pieces);
    }
}

impl<B: DeviceBacking> IoQueue<B> {
    /// Queues the raw I/O command `cmd` with `data` (or none); `tag` comes back with its
    /// result from [`poll`](Self::poll), and [`poll_completions`](Self::poll_completions)
    /// gives its completion's dword 0 and full status. Software queueing and timeouts are
    /// those of every request (see [`submit`](Self::submit)).
    ///
    /// The driver builds the data pointer from `data` (PRPs) and sets no metadata pointer
    /// (see the [`IoPassthru`] fields for what the caller chooses). The command must move
    /// exactly `data.len` bytes: the driver cannot check the transfer length an arbitrary
    /// opcode implies.
    ///
    /// Fails at once (nothing sent) when the region does not fit its buffer or is not
    /// 4-byte aligned, is empty or longer than the controller's transfer limit, goes
    /// against the direction of the opcode's bits 1:0, or when `cmd.nsid` names a
    /// namespace whose metadata travels in a separate buffer (MPTR is not offered).
    pub fn submit_passthru(
        &mut self,
        cmd: &IoPassthru,
        data: Option<PassthruData<'_, B>>,
        tag: u64,
    ) -> Result<(), NvmeError> {
        self.check_alive()?;
        if self.shared.generation.load(std::sync::atomic::Ordering::Acquire) != self.generation {
            return Err(NvmeError::Reset(
                "the controller was reset: poll the queue (it creates itself again)".into(),
            ));
        }
        let what = format!("I/O passthrough of opcode {:#04x}", cmd.opcode);
        let invalid = |why: String| NvmeError::Invalid(format!("{what}: {why}"));
        if let Some(ns) = self.shared.namespace(cmd.nsid)
            && ns.metadata_size > 0
            && !ns.extended_lba
        {
            return Err(NvmeError::Unsupported(format!(
                "{what}: namespace {} keeps {} bytes of metadata per block in a separate buffer, and \
                 passthrough commands carry no metadata pointer",
                cmd.nsid, ns.metadata_size
            )));
        }
        let mut pieces = Vec::new();
        if let Some(d) = data {
            let max = self.shared.info.max_transfer;
            if d.len == 0
                || !d.offset.is_multiple_of(4)
                || d.offset.checked_add(d.len).is_none_or(|end| end > d.buffer.len())
            {
                return Err(invalid(format!(
                    "{} bytes at buffer offset {}: the buffer has {} bytes (the region must be nonempty, \
                     inside it, and start 4-byte aligned)",
                    d.len,
                    d.offset,
                    d.buffer.len()
                )));
            }
            if d.len as u64 > max {
                return Err(invalid(format!(
                    "{} bytes of data, the controller takes at most {max} in one command",
                    d.len
                )));
            }
            let implied = match cmd.opcode & 3 {
                1 => Some(DataDirection::ToDevice),
                2 => Some(DataDirection::FromDevice),
                _ => None,
            };
            if implied.is_some_and(|dir| dir != d.direction) {
                return Err(invalid(format!(
                    "the opcode's bits 1:0 ({:02b}b) say the data moves {}, the buffer was given {:?}",
                    cmd.opcode & 3,
                    if cmd.opcode & 3 == 1 {
                        "host to controller"
                    } else {
                        "controller to host"
                    },
                    d.direction
                )));
            }
            pieces.push((d.buffer.iova() + d.offset as u64, d.len as u64));
        }
        let free = self.free_slots();
        let fits = self.pending.is_empty() && free >= 1;
        if !fits && self.pending.len() >= self.queue_limit {
            return Err(NvmeError::QueueFull {
                qid: self.ring.qid,
                needed: 1,
                free,
                queued: self.pending.len(),
                limit: self.queue_limit,
            });
        }
        let raw = Command {
            opcode: cmd.opcode,
            nsid: cmd.nsid,
            cdw2: cmd.cdw2,
            cdw3: cmd.cdw3,
            cdw: cmd.cdw,
            ..Command::default()
        };
        let index = match self.free_requests.pop() {
            Some(i) => i,
            None => {
                self.requests.push(None);
                self.rests.push(Rest::default());
                (self.requests.len() - 1) as u32
            }
        };
        let hold = data.map_or(NO_HOLD, |d| self.holds.take(d.buffer));
        self.requests[index as usize] = Some(Request {
            tag,
            op: Op::Passthru,
            parts: 0,
            error: None,
            deadline: UNSTAMPED,
            ended: false,
            buffer: None,
            hold,
            plan: Some(Box::new(Plan {
                cmds: vec![(0, 0, (0, pieces.len() as u32))],
                pieces,
                raw: Some(raw),
                sgl: false,
            })),
            sent: false,
            cdw0: 0,
            status: Status::SUCCESS,
            commands: 1,
        });
        let mut rest = Rest {
            nsid: cmd.nsid,
            per_cmd: 1,
            ..Rest::default()
        };
        self.outstanding += 1;
        if fits {
            self.send(index, 1, &mut rest);
        } else {
            self.rests[index as usize] = rest;
            self.pending.push_back(index);
            self.send_queued();
        }
        Ok(())
    }

    /// Runs the raw I/O command `cmd` with `data` (see
    /// [`submit_passthru`](Self::submit_passthru)) on a queue with nothing else
    /// outstanding, and returns its completion — dword 0 and status, successful or not
    /// (a failed status is also in its `result`). Fails only when the command could not
    /// run, or ended without a completion (timeout, reset, removal).
    pub fn passthru(
        &mut self,
        cmd: &IoPassthru,
        data: Option<PassthruData<'_, B>>,
    ) -> Result<IoCompletion, NvmeError> {
        if self.outstanding != 0 {
            return Err(NvmeError::Invalid(format!(
                "queue {}: {} requests outstanding; passthru() needs an idle queue",
                self.ring.qid, self.outstanding
            )));
        }
        self.submit_passthru(cmd, data, 0)?;
        self.ring()?;
        let mut done = None;
        let mut spins = 0u32;
        while done.is_none() {
            self.poll_completions(|c| done = Some(c))?;
            spins += 1;
            if spins > 10_000 {
                std::thread::yield_now();
            }
        }
        match done {
            Some(c) if c.status.is_some() => Ok(c),
            Some(c) => Err(c
                .result
                .err()
                .unwrap_or_else(|| NvmeError::Invalid("no completion".into()))),
            None => Err(NvmeError::Invalid("no completion".into())),
        }
    }
}
