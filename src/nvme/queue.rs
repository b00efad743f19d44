//! One submission/completion queue pair as rings in DMA memory: entries in, completions
//! out, doorbells (MMIO or shadow). No request bookkeeping: that is the admin queue's and
//! [`super::io::IoQueue`]'s.

use super::NvmeError;
use super::spec::{Cap, Command, Completion};
use crate::barrier;
use crate::bus::backing::{DmaMemory, RegisterIo};

/// Where a queue's doorbells are, in BAR 0 and (with shadow doorbells) in the shadow and
/// event index buffers.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Doorbells {
    pub(crate) sq: u64,
    pub(crate) cq: u64,
}

impl Doorbells {
    pub(crate) fn of(cap: Cap, qid: u16) -> Self {
        Doorbells {
            sq: cap.sq_doorbell(qid),
            cq: cap.cq_doorbell(qid),
        }
    }
}

/// The shadow doorbell and event index buffers (Doorbell Buffer Config), shared by all
/// queues of a controller: the same offsets as the MMIO doorbells, less 0x1000.
#[derive(Debug)]
pub(crate) struct Shadow<D> {
    pub(crate) doorbells: D,
    pub(crate) events: D,
}

// Whether the controller asked to be told of this doorbell update: the event index lies
// in (old, new] (modulo 2^16), as the spec's shadow doorbell rule says.
fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

/// A queue pair's rings.
#[derive(Debug)]
pub(crate) struct Ring<D> {
    pub(crate) qid: u16,
    depth: u16,
    sq: D,
    cq: D,
    sq_tail: u16,
    // The tail the controller was last told of.
    sq_rung: u16,
    // The controller's head, from completions.
    sq_head: u16,
    cq_head: u16,
    cq_rung: u16,
    phase: bool,
    doorbells: Doorbells,
    /// SQ doorbell writes (MMIO), for tests and benchmarks.
    pub(crate) sq_rings: u64,
}

impl<D: DmaMemory> Ring<D> {
    /// A ring pair of `depth` entries over `sq` and `cq` (zeroed here).
    pub(crate) fn new(qid: u16, depth: u16, sq: D, cq: D, doorbells: Doorbells) -> Self {
        sq.zero();
        cq.zero();
        Ring {
            qid,
            depth,
            sq,
            cq,
            sq_tail: 0,
            sq_rung: 0,
            sq_head: 0,
            cq_head: 0,
            cq_rung: 0,
            phase: true,
            doorbells,
            sq_rings: 0,
        }
    }

    /// Back to the state after creation (memory zeroed, indexes 0, phase 1): after a
    /// controller reset, before the queue is created again.
    pub(crate) fn reset(&mut self) {
        self.sq.zero();
        self.cq.zero();
        self.sq_tail = 0;
        self.sq_rung = 0;
        self.sq_head = 0;
        self.cq_head = 0;
        self.cq_rung = 0;
        self.phase = true;
    }

    /// The submission and completion queue memory.
    pub(crate) fn memory(&self) -> (&D, &D) {
        (&self.sq, &self.cq)
    }

    pub(crate) fn depth(&self) -> u16 {
        self.depth
    }
    pub(crate) fn sq_iova(&self) -> u64 {
        self.sq.iova()
    }
    pub(crate) fn cq_iova(&self) -> u64 {
        self.cq.iova()
    }

    /// Entries the submission queue can still take (one slot stays empty).
    pub(crate) fn free(&self) -> u16 {
        self.depth - 1 - self.distance(self.sq_head, self.sq_tail)
    }

    // How far `to` lies past `from` going round the ring (both below `depth`). No `%`: a
    // division costs tens of cycles, several times per I/O.
    fn distance(&self, from: u16, to: u16) -> u16 {
        if to >= from {
            to - from
        } else {
            to + self.depth - from
        }
    }

    /// Writes `cmd` at the tail; the controller sees it at the next
    /// [`ring_sq`](Self::ring_sq). False when the queue is full.
    #[inline]
    pub(crate) fn push(&mut self, cmd: &Command) -> bool {
        // Full when the tail's successor is the head (one slot stays empty): the same test
        // as `free() == 0`, from the successor the tail moves to anyway.
        let next = if self.sq_tail + 1 == self.depth {
            0
        } else {
            self.sq_tail + 1
        };
        if next == self.sq_head {
            return false;
        }
        let at = usize::from(self.sq_tail) * Command::SIZE;
        // Eight whole words (entries are 64-byte aligned; in bounds: the ring holds `depth`
        // entries), built from the fields: no byte array in between.
        let _ = self.sq.write_words(at, &words(cmd));
        self.sq_tail = next;
        true
    }

    /// Whether the submission queue is full ([`free`](Self::free) is 0), in a compare or two.
    #[inline]
    pub(crate) fn is_full(&self) -> bool {
        let next = if self.sq_tail + 1 == self.depth {
            0
        } else {
            self.sq_tail + 1
        };
        next == self.sq_head
    }

    /// Whether entries were pushed since the last doorbell.
    pub(crate) fn unrung(&self) -> bool {
        self.sq_tail != self.sq_rung
    }

    /// Tells the controller of the new tail: one doorbell for everything pushed since the
    /// last one (through the shadow buffer when there is one, and MMIO only when the
    /// controller's event index asks for it).
    pub(crate) fn ring_sq<R: RegisterIo>(
        &mut self,
        regs: &R,
        shadow: Option<&Shadow<D>>,
    ) -> Result<(), NvmeError> {
        match self.update_sq(shadow) {
            Some((at, value)) => write_sq_doorbell(regs, at, value),
            None => Ok(()),
        }
    }

    /// [`ring_sq`](Self::ring_sq) up to the MMIO write: publishes the new tail (in the
    /// shadow buffer when there is one) and returns the doorbell write still needed, if
    /// any, for [`write_sq_doorbell`]. Needs no registers, so a caller takes them only when an
    /// MMIO write is due.
    pub(crate) fn update_sq(&mut self, shadow: Option<&Shadow<D>>) -> Option<(u64, u32)> {
        if !self.unrung() {
            return None;
        }
        let (new, old) = (self.sq_tail, self.sq_rung);
        self.sq_rung = new;
        if let Some(s) = shadow
            && !self.update_shadow(s, self.doorbells.sq, new, old)
        {
            return None;
        }
        self.sq_rings += 1;
        Some((self.doorbells.sq, u32::from(new)))
    }

    // Writes this queue's shadow doorbells (the one at `at` now `new`, was `old`) and
    // reads its event index: whether the controller asked for an MMIO write too.
    //
    // A plain store of the whole 8-byte word, not a compare-and-swap of 4 bytes: with the
    // doorbell stride at 4 bytes the word holds this queue's SQ tail and CQ head, both
    // this ring's values; with a larger stride the doorbell is alone in its word (the rest
    // is reserved). Nobody else writes the word while the queue exists (the controller
    // writes the shadow buffer only when Doorbell Buffer Config sets it up).
    fn update_shadow(&self, s: &Shadow<D>, at: u64, new: u16, old: u16) -> bool {
        let shadow_at = |doorbell: u64| (doorbell - super::spec::reg::DOORBELLS) as usize;
        let base = shadow_at(at) & !7;
        // Each doorbell of this queue in the word, as `write::<u32>` would place it.
        let half = |doorbell: u64, value: u16| {
            let o = shadow_at(doorbell);
            let shift = if cfg!(target_endian = "little") {
                o % 8
            } else {
                4 - o % 8
            } * 8;
            if o & !7 == base {
                u64::from(value) << shift
            } else {
                0
            }
        };
        let word = half(self.doorbells.sq, self.sq_rung) | half(self.doorbells.cq, self.cq_rung);
        // The entries (or the completions consumed) before the value that publishes them,
        // as Linux and SPDK do before a shadow doorbell.
        barrier::wmb();
        let _ = s.doorbells.write::<u64>(base, word);
        // The shadow write before the event index read (the controller does the reverse).
        barrier::mb();
        let event = s.events.read::<u32>(shadow_at(at)).unwrap_or(0) as u16;
        need_event(event, new, old)
    }

    /// The next completion, if the controller posted one (its phase matches), its SQ head
    /// taken as the controller's ([`saw_sq_head`](Self::saw_sq_head)).
    #[inline]
    pub(crate) fn pop(&mut self) -> Option<Completion> {
        let c = self.pop_entry()?;
        self.saw_sq_head(c.sq_head);
        Some(c)
    }

    /// The next completion, as [`pop`](Self::pop), leaving the SQ head it reports to the
    /// caller: a caller that consumes several at once passes the last one's to
    /// [`saw_sq_head`](Self::saw_sq_head) (the controller's head only moves on, so the last
    /// completion's is the newest; an earlier one adds nothing the last does not say).
    #[inline]
    pub(crate) fn pop_entry(&mut self) -> Option<Completion> {
        let at = usize::from(self.cq_head) * Completion::SIZE;
        // The phase word first; the rest of the entry is complete once it is, read after
        // the barrier. (Entries are 16-byte aligned: two whole words.)
        let high = self.cq.read::<u64>(at + 8)?;
        if (u64::from_le(high) >> 48 & 1 == 1) != self.phase {
            return None;
        }
        barrier::dma_rmb();
        let low = u64::from_le(self.cq.read::<u64>(at)?);
        let high = u64::from_le(self.cq.read::<u64>(at + 8)?);
        let c = Completion {
            dw0: low as u32,
            dw1: (low >> 32) as u32,
            sq_head: high as u16,
            sq_id: (high >> 16) as u16,
            cid: (high >> 32) as u16,
            status: (high >> 48) as u16,
        };
        self.cq_head += 1;
        if self.cq_head == self.depth {
            self.cq_head = 0;
            self.phase = !self.phase;
        }
        Some(c)
    }

    /// A completion reported the controller's SQ head `head`: the known head moves there.
    /// The controller's SQ head lies between the head known so far and the tail; a value
    /// outside (a corrupt or stale entry) would make the queue look emptier than it is,
    /// and entries not yet fetched would be overwritten: it is ignored.
    #[inline]
    pub(crate) fn saw_sq_head(&mut self, head: u16) {
        if head < self.depth && self.distance(self.sq_head, head) <= self.distance(self.sq_head, self.sq_tail)
        {
            self.sq_head = head;
        } else {
            log::debug!(
                "queue {}: completion reports SQ head {} outside {}..={}: ignored",
                self.qid,
                head,
                self.sq_head,
                self.sq_tail
            );
        }
    }

    /// At most `in_flight` entries (the commands written and not completed) can still be
    /// unconsumed: the controller fetches entries in order, and a command that completed
    /// was fetched. Moves the known SQ head on when the heads completions reported say
    /// less (a controller that never updates the field would otherwise stall the ring
    /// with entries long consumed).
    pub(crate) fn bound_unconsumed(&mut self, in_flight: u16) {
        if self.distance(self.sq_head, self.sq_tail) > in_flight {
            self.sq_head = if self.sq_tail >= in_flight {
                self.sq_tail - in_flight
            } else {
                self.sq_tail + self.depth - in_flight
            };
        }
    }

    /// Tells the controller how far completions were consumed.
    pub(crate) fn ring_cq<R: RegisterIo>(
        &mut self,
        regs: &R,
        shadow: Option<&Shadow<D>>,
    ) -> Result<(), NvmeError> {
        match self.update_cq(shadow) {
            Some((at, value)) => write_cq_doorbell(regs, at, value),
            None => Ok(()),
        }
    }

    /// [`ring_cq`](Self::ring_cq) up to the MMIO write (for [`write_cq_doorbell`]), as
    /// [`update_sq`](Self::update_sq).
    pub(crate) fn update_cq(&mut self, shadow: Option<&Shadow<D>>) -> Option<(u64, u32)> {
        if self.cq_head == self.cq_rung {
            return None;
        }
        let (new, old) = (self.cq_head, self.cq_rung);
        self.cq_rung = new;
        if let Some(s) = shadow
            && !self.update_shadow(s, self.doorbells.cq, new, old)
        {
            return None;
        }
        Some((self.doorbells.cq, u32::from(new)))
    }
}

// The eight little-endian words of `cmd`'s entry, as `Command::to_bytes` lays them out.
#[inline]
fn words(cmd: &Command) -> [u64; Command::SIZE / 8] {
    let pair = |lo: u32, hi: u32| (u64::from(lo) | u64::from(hi) << 32).to_le();
    [
        (u64::from(cmd.opcode)
            | u64::from(cmd.flags) << 8
            | u64::from(cmd.cid) << 16
            | u64::from(cmd.nsid) << 32)
            .to_le(),
        pair(cmd.cdw2, cmd.cdw3),
        cmd.mptr.to_le(),
        cmd.prp1.to_le(),
        cmd.prp2.to_le(),
        pair(cmd.cdw[0], cmd.cdw[1]),
        pair(cmd.cdw[2], cmd.cdw[3]),
        pair(cmd.cdw[4], cmd.cdw[5]),
    ]
}

/// Writes an SQ tail doorbell register: `value` at `at` in BAR 0, after the barrier that
/// makes the entries written before it reach the controller first (Linux's `writel`).
pub(crate) fn write_sq_doorbell<R: RegisterIo>(regs: &R, at: u64, value: u32) -> Result<(), NvmeError> {
    barrier::dma_wmb();
    regs.write32(at, value)?;
    Ok(())
}

/// Writes a CQ head doorbell register, after the barrier that completes the reads of the
/// entries it hands back to the controller.
pub(crate) fn write_cq_doorbell<R: RegisterIo>(regs: &R, at: u64, value: u32) -> Result<(), NvmeError> {
    barrier::dma_mb();
    regs.write32(at, value)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{need_event, words};
    use crate::nvme::spec::Command;

    #[test]
    fn entry_words_match_the_entry_bytes() {
        let cmd = Command {
            opcode: 0x02,
            flags: 0x40,
            cid: 0x1234,
            nsid: 0x5678_9abc,
            cdw2: 1,
            cdw3: 2,
            mptr: 0x0102_0304_0506_0708,
            prp1: 0x1111_2222_3333_4444,
            prp2: 0x5555_6666_7777_8888,
            cdw: [10, 11, 12, 13, 14, 15],
        };
        let bytes: Vec<u8> = words(&cmd).iter().flat_map(|w| w.to_ne_bytes()).collect();
        assert_eq!(bytes, cmd.to_bytes());
    }

    #[test]
    fn event_index_rule() {
        // The controller wants to hear once the tail passes 5.
        assert!(need_event(5, 6, 5));
        assert!(need_event(5, 8, 3));
        assert!(!need_event(5, 5, 3));
        assert!(!need_event(9, 8, 3));
        // Across the wrap of the 16-bit counters.
        assert!(need_event(0xffff, 2, 0xfff0));
        assert!(!need_event(3, 2, 0xfff0));
    }
}
