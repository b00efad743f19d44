//! A controller that does nothing but answer, in the thread that rings its doorbell: the
//! driver-only benchmark's device.
//!
//! An SQ tail doorbell write takes every new entry and posts its completion (success, no
//! data moved) before the write returns, so the driver's next poll finds them all: no
//! device thread, no waiting, and nearly no device work (a 4-byte read and a 16-byte
//! completion per command). Admin commands are answered as far as bring-up needs
//! (Identify, Set Features, queue creation and deletion, Doorbell Buffer Config).
//!
//! With shadow doorbells the event indexes are set after each batch so that the next
//! update asks for an MMIO write too (the loopback learns of new entries only from MMIO):
//! the driver's shadow path runs in full every time, its worst case.

use std::ops::Deref;
use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use pcibus::PciAddress;
use pcibus::bus::{BackingError, DeviceBacking, DmaMemory, RegisterIo};
use pcibus::nvme::spec::{Command, admin, cc, cns, csts, feature, reg};
use pcibus::vfio::DmaBuffer;

const QUEUES: u16 = 4;
const NS_BLOCKS: u64 = 1 << 21;

/// A loopback controller; clones are handles of the same one.
#[derive(Debug, Clone)]
pub struct Loopback {
    dev: Arc<Dev>,
}

#[derive(Debug)]
struct Dev {
    shadow_doorbells: bool,
    cc: AtomicU32,
    csts: AtomicU32,
    aqa: AtomicU32,
    asq: AtomicU64,
    acq: AtomicU64,
    next_iova: AtomicU64,
    // Every allocation, for the admin commands' PRPs.
    dma: Mutex<Vec<(u64, Arc<DmaBuffer>)>>,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    sqs: Vec<Option<Sq>>,
    cqs: Vec<Option<Cq>>,
    // Shadow doorbells and event indexes.
    shadow: Option<(Arc<DmaBuffer>, Arc<DmaBuffer>)>,
}

#[derive(Debug)]
struct Sq {
    buf: Arc<DmaBuffer>,
    size: u16,
    head: u16,
    cqid: u16,
}

#[derive(Debug)]
struct Cq {
    buf: Arc<DmaBuffer>,
    size: u16,
    tail: u16,
    phase: bool,
}

/// DMA memory of the loopback: plain memory at a made-up IOVA.
#[derive(Debug)]
pub struct LoopDma {
    buf: Arc<DmaBuffer>,
    iova: u64,
}

impl Deref for LoopDma {
    type Target = DmaBuffer;
    fn deref(&self) -> &DmaBuffer {
        &self.buf
    }
}

impl DmaMemory for LoopDma {
    fn iova(&self) -> u64 {
        self.iova
    }
}

/// BAR 0 of the loopback.
#[derive(Debug)]
pub struct LoopRegs {
    dev: Arc<Dev>,
}

impl Loopback {
    /// A controller with one namespace of 2^21 512-byte blocks, offering shadow doorbells
    /// when `shadow_doorbells`.
    pub fn new(shadow_doorbells: bool) -> Self {
        Loopback {
            dev: Arc::new(Dev {
                shadow_doorbells,
                cc: AtomicU32::new(0),
                csts: AtomicU32::new(0),
                aqa: AtomicU32::new(0),
                asq: AtomicU64::new(0),
                acq: AtomicU64::new(0),
                next_iova: AtomicU64::new(0x1_0000_0000),
                dma: Mutex::new(Vec::new()),
                state: Mutex::new(State::default()),
            }),
        }
    }
}

impl DeviceBacking for Loopback {
    type Registers = LoopRegs;
    type Dma = LoopDma;

    fn address(&self) -> PciAddress {
        "0000:00:04.0".parse().expect("address")
    }
    fn map_bar(&self, _index: u32) -> Result<LoopRegs, BackingError> {
        Ok(LoopRegs {
            dev: Arc::clone(&self.dev),
        })
    }
    fn alloc_dma(&self, len: usize) -> Result<LoopDma, BackingError> {
        let buf = Arc::new(DmaBuffer::new(len).map_err(|e| BackingError::Other {
            address: self.address(),
            message: e.to_string(),
        })?);
        let iova = self
            .dev
            .next_iova
            .fetch_add(buf.len().next_multiple_of(4096) as u64, Ordering::Relaxed);
        self.dev.dma.lock().expect("dma").push((iova, Arc::clone(&buf)));
        Ok(LoopDma { buf, iova })
    }
    fn read_config(&self, _offset: u64, buf: &mut [u8]) -> Result<(), BackingError> {
        buf.fill(0);
        Ok(())
    }
    fn write_config(&self, _offset: u64, _buf: &[u8]) -> Result<(), BackingError> {
        Ok(())
    }
    fn max_interrupts(&self) -> u32 {
        0
    }
    fn route_interrupts(&self, _fds: &[BorrowedFd<'_>]) -> Result<(), BackingError> {
        Ok(())
    }
    fn reset(&self) -> Result<(), BackingError> {
        Ok(())
    }
    fn extra_handles(&self) -> usize {
        Arc::strong_count(&self.dev) - 1
    }
}

impl Dev {
    fn cap(&self) -> u64 {
        // MQES 4095, contiguous queues, TO 500 ms, DSTRD 0, NVM command set, 4 KiB pages.
        4095 | 1 << 16 | 1 << 24 | 1 << 37
    }

    // The buffer holding `iova`, and the offset in it.
    fn at(&self, iova: u64) -> Option<(Arc<DmaBuffer>, usize)> {
        let dma = self.dma.lock().expect("dma");
        dma.iter()
            .find(|(start, b)| (*start..*start + b.len() as u64).contains(&iova))
            .map(|(start, b)| (Arc::clone(b), (iova - start) as usize))
    }

    fn enable(&self, value: u32) {
        let mut st = self.state.lock().expect("state");
        if value & cc::EN == 0 {
            *st = State::default();
            self.csts.store(0, Ordering::Release);
            return;
        }
        let aqa = self.aqa.load(Ordering::Acquire);
        let (sq_size, cq_size) = ((aqa & 0xfff) as u16 + 1, (aqa >> 16 & 0xfff) as u16 + 1);
        let sq = self.at(self.asq.load(Ordering::Acquire));
        let cq = self.at(self.acq.load(Ordering::Acquire));
        let (Some((sq, 0)), Some((cq, 0))) = (sq, cq) else {
            self.csts.store(csts::CFS, Ordering::Release);
            return;
        };
        st.sqs = (0..=QUEUES).map(|_| None).collect();
        st.cqs = (0..=QUEUES).map(|_| None).collect();
        st.sqs[0] = Some(Sq {
            buf: sq,
            size: sq_size,
            head: 0,
            cqid: 0,
        });
        st.cqs[0] = Some(Cq {
            buf: cq,
            size: cq_size,
            tail: 0,
            phase: true,
        });
        self.csts.store(csts::RDY, Ordering::Release);
    }

    // Takes SQ `qid`'s entries up to `tail` and completes each.
    fn run(&self, qid: usize, tail: u16) {
        let mut guard = self.state.lock().expect("state");
        let st = &mut *guard;
        loop {
            let Some(sq) = st.sqs.get_mut(qid).and_then(Option::as_mut) else {
                return;
            };
            if sq.head == tail || tail >= sq.size {
                break;
            }
            let at = usize::from(sq.head) * Command::SIZE;
            sq.head = (sq.head + 1) % sq.size;
            let (head, cqid) = (sq.head, usize::from(sq.cqid));
            let (cid, status, dw0) = if qid == 0 {
                let mut b = [0u8; 64];
                let _ = sq.buf.read_at(at, &mut b);
                let cmd = Command::from_bytes(&b);
                let (status, dw0) = self.admin(st, &cmd);
                (cmd.cid, status, dw0)
            } else {
                // An I/O command: its id (dword 0, bits 31:16) is all the loopback reads.
                ((sq.buf.read::<u32>(at).unwrap_or(0) >> 16) as u16, 0, 0)
            };
            post(st, cqid, qid as u16, head, cid, status, dw0);
        }
        if qid > 0
            && let Some((_, events)) = &st.shadow
        {
            // Ask for an MMIO write at the next update. (A whole word: the CQ head's event
            // index beside it stays 0.)
            let _ = events.write::<u64>(2 * qid * 4, u64::from(tail));
        }
    }

    // Answers admin command `cmd`: (status code, dword 0).
    fn admin(&self, st: &mut State, cmd: &Command) -> (u16, u32) {
        let (d10, d11) = (cmd.cdw[0], cmd.cdw[1]);
        match cmd.opcode {
            admin::IDENTIFY => {
                let Some((buf, off)) = self.at(cmd.prp1) else {
                    return (0x02, 0);
                };
                let mut b = vec![0u8; 4096];
                match d10 & 0xff {
                    cns::CONTROLLER => {
                        b[0..2].copy_from_slice(&0x1b36u16.to_le_bytes());
                        b[4..24].copy_from_slice(b"LOOPBACK0001        ");
                        b[24..64].copy_from_slice(&[b' '; 40]);
                        b[24..32].copy_from_slice(b"loopback");
                        b[64..72].copy_from_slice(b"1.0     ");
                        b[77] = 5; // MDTS: 128 KiB
                        b[80..84].copy_from_slice(&0x0001_0400u32.to_le_bytes());
                        if self.shadow_doorbells {
                            b[256..258].copy_from_slice(&(1u16 << 8).to_le_bytes());
                        }
                        b[512] = 0x66;
                        b[513] = 0x44;
                        b[516..520].copy_from_slice(&1u32.to_le_bytes());
                    }
                    cns::ACTIVE_NAMESPACES => {
                        if cmd.nsid == 0 {
                            b[0..4].copy_from_slice(&1u32.to_le_bytes());
                        }
                    }
                    cns::NAMESPACE if cmd.nsid == 1 => {
                        for o in [0, 8, 16] {
                            b[o..o + 8].copy_from_slice(&NS_BLOCKS.to_le_bytes());
                        }
                        // One LBA format, in use: 512-byte blocks, no metadata.
                        b[128..132].copy_from_slice(&(9u32 << 16).to_le_bytes());
                    }
                    _ => return (0x02, 0),
                }
                let _ = buf.write_at(off, &b);
                (0, 0)
            }
            admin::SET_FEATURES if d10 & 0xff == u32::from(feature::NUMBER_OF_QUEUES) => {
                let n = u32::from(QUEUES - 1);
                (0, n << 16 | n)
            }
            admin::CREATE_CQ | admin::CREATE_SQ => {
                let (qid, size) = ((d10 & 0xffff) as usize, (d10 >> 16) as u16 + 1);
                let Some((buf, 0)) = self.at(cmd.prp1) else {
                    return (0x02, 0);
                };
                if qid == 0 || qid > usize::from(QUEUES) {
                    return (0x101, 0);
                }
                if cmd.opcode == admin::CREATE_CQ {
                    st.cqs[qid] = Some(Cq {
                        buf,
                        size,
                        tail: 0,
                        phase: true,
                    });
                } else {
                    st.sqs[qid] = Some(Sq {
                        buf,
                        size,
                        head: 0,
                        cqid: (d11 >> 16) as u16,
                    });
                }
                (0, 0)
            }
            admin::DELETE_SQ | admin::DELETE_CQ => {
                let qid = (d10 & 0xffff) as usize;
                if cmd.opcode == admin::DELETE_SQ {
                    if let Some(q) = st.sqs.get_mut(qid) {
                        *q = None;
                    }
                } else if let Some(q) = st.cqs.get_mut(qid) {
                    *q = None;
                }
                (0, 0)
            }
            admin::DOORBELL_BUFFER_CONFIG if self.shadow_doorbells => {
                match (self.at(cmd.prp1), self.at(cmd.prp2)) {
                    (Some((doorbells, 0)), Some((events, 0))) => {
                        st.shadow = Some((doorbells, events));
                        (0, 0)
                    }
                    _ => (0x02, 0),
                }
            }
            admin::DOORBELL_BUFFER_CONFIG => (0x01, 0),
            _ => (0, 0),
        }
    }
}

// Posts a completion on CQ `cqid`: the first 8 bytes, then the second 8 with the phase.
fn post(st: &mut State, cqid: usize, sqid: u16, head: u16, cid: u16, status: u16, dw0: u32) {
    let Some(cq) = st.cqs.get_mut(cqid).and_then(Option::as_mut) else {
        return;
    };
    let at = usize::from(cq.tail) * 16;
    let status = status << 1 | u16::from(cq.phase);
    let mut high = [0u8; 8];
    high[0..2].copy_from_slice(&head.to_le_bytes());
    high[2..4].copy_from_slice(&sqid.to_le_bytes());
    high[4..6].copy_from_slice(&cid.to_le_bytes());
    high[6..8].copy_from_slice(&status.to_le_bytes());
    let _ = cq.buf.write::<u64>(at, u64::from(dw0));
    let _ = cq.buf.store_release::<u64>(at + 8, u64::from_ne_bytes(high));
    cq.tail += 1;
    if cq.tail == cq.size {
        cq.tail = 0;
        cq.phase = !cq.phase;
    }
}

impl RegisterIo for LoopRegs {
    fn len(&self) -> u64 {
        0x4000
    }
    fn read32(&self, offset: u64) -> Result<u32, BackingError> {
        let d = &self.dev;
        Ok(match offset {
            reg::CAP => d.cap() as u32,
            0x04 => (d.cap() >> 32) as u32,
            reg::VS => 0x0001_0400,
            reg::CC => d.cc.load(Ordering::Acquire),
            reg::CSTS => d.csts.load(Ordering::Acquire),
            reg::AQA => d.aqa.load(Ordering::Acquire),
            _ => 0,
        })
    }
    fn write32(&self, offset: u64, value: u32) -> Result<(), BackingError> {
        let d = &self.dev;
        let half = |word: &AtomicU64, high: bool| {
            let old = word.load(Ordering::Acquire);
            let new = if high {
                old & 0xffff_ffff | u64::from(value) << 32
            } else {
                old & !0xffff_ffff | u64::from(value)
            };
            word.store(new, Ordering::Release);
        };
        match offset {
            reg::CC => {
                let old = d.cc.swap(value, Ordering::AcqRel);
                if (old ^ value) & cc::EN != 0 {
                    d.enable(value);
                }
                if value & cc::SHN_MASK != 0 {
                    d.csts.fetch_or(csts::SHST_COMPLETE, Ordering::AcqRel);
                }
            }
            reg::AQA => d.aqa.store(value, Ordering::Release),
            0x28 | 0x2c => half(&d.asq, offset == 0x2c),
            0x30 | 0x34 => half(&d.acq, offset == 0x34),
            o if o >= reg::DOORBELLS => {
                let index = ((o - reg::DOORBELLS) / 4) as usize;
                // SQ tails (even) are taken at once; CQ heads need nothing (the driver
                // never has more commands out than its CQ holds).
                if index.is_multiple_of(2) {
                    d.run(index / 2, value as u16);
                }
            }
            _ => {}
        }
        Ok(())
    }
    fn read64(&self, offset: u64) -> Result<u64, BackingError> {
        Ok(u64::from(self.read32(offset)?) | u64::from(self.read32(offset + 4)?) << 32)
    }
    fn write64(&self, offset: u64, value: u64) -> Result<(), BackingError> {
        self.write32(offset, value as u32)?;
        self.write32(offset + 4, (value >> 32) as u32)
    }
    // The driver makes no narrow accesses to an NVMe controller; the bench never sees one.
    fn read8(&self, offset: u64) -> Result<u8, BackingError> {
        Ok((self.read32(offset & !3)? >> ((offset & 3) * 8)) as u8)
    }
    fn write8(&self, _offset: u64, _value: u8) -> Result<(), BackingError> {
        Err(narrow_write())
    }
    fn read16(&self, offset: u64) -> Result<u16, BackingError> {
        Ok((self.read32(offset & !3)? >> ((offset & 2) * 8)) as u16)
    }
    fn write16(&self, _offset: u64, _value: u16) -> Result<(), BackingError> {
        Err(narrow_write())
    }
}

fn narrow_write() -> BackingError {
    BackingError::Unsupported {
        address: "0000:00:04.0".parse().expect("address"),
        operation: "a narrow write to the loopback controller",
    }
}
