//! The emulated NVMe controller driven by hand, with raw commands, through
//! `DeviceBacking` only (plus the emulator's fault and inspection calls): what a driver
//! sees of it.

use std::os::fd::AsFd;
use std::sync::atomic::{Ordering, fence};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::eventfd::{EfdFlags, EventFd};
use pcibus::bus::backing::{DeviceBacking, DmaMemory, RegisterIo};
use pcibus::nvme::spec::{
    self, Cap, Command, Completion, IdentifyController, IdentifyNamespace, Status, admin, cc, cns, csts,
    feature, io, oacs, oncs, reg, virt_mgmt,
};
use pcibus::testing::nvme::{CommandMatch, EmuConfig, EmulatedNvme, Fault, NamespaceConfig, SriovConfig};
use proptest::prelude::*;

// Only so that a broken emulator fails instead of hanging; nothing is timed.
const PATIENCE: Duration = Duration::from_secs(20);

fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !f() {
        assert!(Instant::now() < deadline, "gave up waiting for {what}");
        thread::sleep(Duration::from_micros(200));
    }
}

/// One queue pair as a driver keeps it.
struct Queue<B: DeviceBacking> {
    qid: u16,
    sq: B::Dma,
    cq: B::Dma,
    sq_size: u32,
    cq_size: u32,
    tail: u32,
    head: u32,
    phase: bool,
    next_cid: u16,
}

impl<B: DeviceBacking> Queue<B> {
    fn new(dev: &B, qid: u16, sq_size: u32, cq_size: u32) -> Self {
        Queue {
            qid,
            sq: dev.alloc_dma(sq_size as usize * 64).unwrap(),
            cq: dev.alloc_dma(cq_size as usize * 16).unwrap(),
            sq_size,
            cq_size,
            tail: 0,
            head: 0,
            phase: true,
            next_cid: 0,
        }
    }

    /// Writes `cmd` at the tail with a fresh cid (returned); no doorbell.
    fn push(&mut self, mut cmd: Command) -> u16 {
        cmd.cid = self.next_cid;
        self.next_cid = self.next_cid.wrapping_add(1) % 0x8000;
        self.sq
            .write_at(self.tail as usize * 64, &cmd.to_bytes())
            .unwrap();
        self.tail = (self.tail + 1) % self.sq_size;
        cmd.cid
    }

    /// The completion at the head if its phase says it is new.
    fn peek(&self) -> Option<Completion> {
        let at = self.head as usize * 16;
        let word: u64 = self.cq.load_acquire(at + 8).unwrap();
        if (word >> 48 & 1 == 1) != self.phase {
            return None;
        }
        let mut b = [0u8; 16];
        self.cq.read_at(at, &mut b).unwrap();
        Some(Completion::from_bytes(&b))
    }

    fn pop(&mut self) -> Option<Completion> {
        let c = self.peek()?;
        self.head += 1;
        if self.head == self.cq_size {
            self.head = 0;
            self.phase = !self.phase;
        }
        Some(c)
    }
}

/// BAR 0 and the admin queue of an enabled controller.
struct Host<B: DeviceBacking> {
    dev: B,
    bar: B::Registers,
    cap: Cap,
    admin: Queue<B>,
}

impl<B: DeviceBacking> Host<B> {
    fn enable(dev: B) -> Self {
        let bar = dev.map_bar(0).unwrap();
        let cap = Cap(bar.read64(reg::CAP).unwrap());
        let admin = Queue::new(&dev, 0, 32, 32);
        let host = Host { dev, bar, cap, admin };
        host.start();
        host
    }

    fn start(&self) {
        let (s, c) = (self.admin.sq_size - 1, self.admin.cq_size - 1);
        self.bar.write32(reg::AQA, c << 16 | s).unwrap();
        self.bar.write64(reg::ASQ, self.admin.sq.iova()).unwrap();
        self.bar.write64(reg::ACQ, self.admin.cq.iova()).unwrap();
        self.bar
            .write32(reg::CC, cc::EN | 6 << cc::IOSQES_SHIFT | 4 << cc::IOCQES_SHIFT)
            .unwrap();
        eventually("CSTS.RDY", || self.csts() & (csts::RDY | csts::CFS) != 0);
        assert_eq!(self.csts() & csts::CFS, 0, "controller fatal status after enable");
    }

    fn csts(&self) -> u32 {
        self.bar.read32(reg::CSTS).unwrap()
    }

    /// CC.EN 0, then the wait for CSTS.RDY 0 (the controller takes its ready delay).
    fn disable(&self) {
        self.bar.write32(reg::CC, 0).unwrap();
        eventually("CSTS.RDY 0", || self.csts() & csts::RDY == 0);
    }

    fn ring_sq(&self, q: &Queue<B>) {
        self.bar.write32(self.cap.sq_doorbell(q.qid), q.tail).unwrap();
    }

    fn ring_cq(&self, q: &Queue<B>) {
        self.bar.write32(self.cap.cq_doorbell(q.qid), q.head).unwrap();
    }

    fn wait(&self, q: &mut Queue<B>) -> Completion {
        let mut got = None;
        eventually("a completion", || {
            got = q.pop();
            got.is_some()
        });
        self.ring_cq(q);
        got.unwrap()
    }

    fn exec(&self, q: &mut Queue<B>, cmd: Command) -> Completion {
        let cid = q.push(cmd);
        self.ring_sq(q);
        let c = self.wait(q);
        assert_eq!(c.cid, cid);
        assert_eq!(c.sq_id, q.qid);
        c
    }

    fn admin(&mut self, cmd: Command) -> Completion {
        let q = &mut self.admin;
        let cid = q.push(cmd);
        self.bar.write32(self.cap.sq_doorbell(0), q.tail).unwrap();
        let mut got = None;
        eventually("an admin completion", || {
            got = q.pop();
            got.is_some()
        });
        self.bar.write32(self.cap.cq_doorbell(0), q.head).unwrap();
        let c = got.unwrap();
        assert_eq!((c.cid, c.sq_id), (cid, 0));
        c
    }

    fn admin_ok(&mut self, cmd: Command) -> Completion {
        let c = self.admin(cmd);
        assert_eq!(c.status(), Status::SUCCESS, "admin {:#x}", cmd.opcode);
        c
    }

    fn identify(&mut self, cns: u32, nsid: u32) -> Vec<u8> {
        let buf = self.dev.alloc_dma(4096).unwrap();
        let mut cmd = Command::new(admin::IDENTIFY);
        cmd.nsid = nsid;
        cmd.prp1 = buf.iova();
        cmd.cdw[0] = cns;
        self.admin_ok(cmd);
        let mut b = vec![0u8; 4096];
        buf.read_at(0, &mut b).unwrap();
        b
    }

    fn create_cq_cmd(qid: u16, size: u32, prp: u64, irq: Option<u16>) -> Command {
        let mut cmd = Command::new(admin::CREATE_CQ);
        cmd.prp1 = prp;
        cmd.cdw[0] = (size - 1) << 16 | u32::from(qid);
        cmd.cdw[1] = 1 | irq.map_or(0, |v| 2 | u32::from(v) << 16);
        cmd
    }

    fn create_sq_cmd(qid: u16, size: u32, prp: u64, cqid: u16) -> Command {
        let mut cmd = Command::new(admin::CREATE_SQ);
        cmd.prp1 = prp;
        cmd.cdw[0] = (size - 1) << 16 | u32::from(qid);
        cmd.cdw[1] = 1 | u32::from(cqid) << 16;
        cmd
    }

    fn io_queue(&mut self, qid: u16, sq_size: u32, cq_size: u32, irq: Option<u16>) -> Queue<B> {
        let q = Queue::new(&self.dev, qid, sq_size, cq_size);
        self.admin_ok(Self::create_cq_cmd(qid, cq_size, q.cq.iova(), irq));
        self.admin_ok(Self::create_sq_cmd(qid, sq_size, q.sq.iova(), qid));
        q
    }
}

fn rw(opcode: u8, nsid: u32, lba: u64, blocks: u32, prp1: u64, prp2: u64) -> Command {
    let mut cmd = Command::new(opcode);
    cmd.nsid = nsid;
    cmd.prp1 = prp1;
    cmd.prp2 = prp2;
    cmd.cdw[0] = lba as u32;
    cmd.cdw[1] = (lba >> 32) as u32;
    cmd.cdw[2] = blocks - 1;
    cmd
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 9) as u8)
        .collect()
}

fn emu(cfg: EmuConfig) -> EmulatedNvme {
    EmulatedNvme::new(cfg).unwrap()
}

fn setup(cfg: EmuConfig) -> (EmulatedNvme, Host<EmulatedNvme>, Queue<EmulatedNvme>) {
    let e = emu(cfg);
    let mut host = Host::enable(e.clone());
    let q = host.io_queue(1, 64, 64, None);
    (e, host, q)
}

/// Writes a PRP list for the pages of `buf` after the first one into `list` at `at`.
fn prp_list(list: &impl std::ops::Deref<Target = pcibus::vfio::DmaBuffer>, at: usize, pages: &[u64]) {
    for (i, p) in pages.iter().enumerate() {
        list.write::<u64>(at + 8 * i, p.to_le()).unwrap();
    }
}

#[test]
fn registers_before_enable() {
    let e = emu(EmuConfig {
        dstrd: 2,
        mqes: 1024,
        ..EmuConfig::default()
    });
    let bar = e.map_bar(0).unwrap();
    let cap = Cap(bar.read64(reg::CAP).unwrap());
    assert_eq!(cap.max_queue_entries(), 1024);
    assert!(cap.contiguous_required());
    assert_eq!(cap.doorbell_stride(), 16);
    assert_eq!(cap.css() & 1, 1);
    assert_eq!(cap.page_size_min(), 4096);
    assert_eq!(
        u64::from(bar.read32(0).unwrap()) | u64::from(bar.read32(4).unwrap()) << 32,
        cap.0
    );
    assert_eq!(bar.read32(reg::VS).unwrap(), 0x0001_0400);
    assert_eq!(bar.read32(reg::CSTS).unwrap(), 0);
    // 64-bit ASQ through its 32-bit halves.
    bar.write32(reg::ASQ, 0x1234_5000).unwrap();
    bar.write32(reg::ASQ + 4, 0xab).unwrap();
    assert_eq!(bar.read64(reg::ASQ).unwrap(), 0xab_1234_5000);
    assert!(bar.read32(2).is_err(), "misaligned");
    assert!(bar.read64(4).is_err(), "misaligned 64-bit");
    assert!(bar.read32(bar.len()).is_err(), "past the BAR");
    assert!(e.map_bar(2).is_err());
    let mut id = [0u8; 4];
    e.read_config(0, &mut id).unwrap();
    assert_eq!(id, [0x36, 0x1b, 0x10, 0x00]);
    let mut class = [0u8; 3];
    e.read_config(9, &mut class).unwrap();
    assert_eq!(class, [0x02, 0x08, 0x01]);
    assert!(e.read_config(4095, &mut id).is_err());
    assert_eq!(e.max_interrupts(), 16);
    assert!(!e.is_processing());
}

#[test]
fn identify_controller_namespaces_and_list() {
    let e = emu(EmuConfig {
        serial: "SN42".into(),
        namespaces: vec![NamespaceConfig::new(1000, 512), NamespaceConfig::new(300, 4096)],
        ..EmuConfig::default()
    });
    let mut host = Host::enable(e.clone());
    assert!(e.is_processing());
    let id = IdentifyController::parse(&host.identify(cns::CONTROLLER, 0)).unwrap();
    assert_eq!((id.vid, id.ssvid), (0x1b36, 0x1b36));
    assert_eq!(id.serial, "SN42");
    assert_eq!(id.model, "pcibus emulated NVMe");
    assert_eq!(id.max_transfer(4096), Some(512 * 1024));
    assert_eq!((id.sqes, id.cqes, id.nn), (0x66, 0x44, 2));
    assert_eq!(id.ver, 0x0001_0400);
    assert_ne!(id.oacs & oacs::DOORBELL_BUFFER_CONFIG, 0);
    assert_eq!(id.oacs & oacs::VIRT_MGMT, 0);
    assert_eq!(id.oncs, oncs::WRITE_ZEROES | oncs::DATASET_MANAGEMENT);
    assert_eq!(id.vwc & 1, 1);
    assert_eq!(
        spec::parse_namespace_list(&host.identify(cns::ACTIVE_NAMESPACES, 0)),
        [1, 2]
    );
    assert_eq!(
        spec::parse_namespace_list(&host.identify(cns::ACTIVE_NAMESPACES, 1)),
        [2]
    );
    let ns1 = IdentifyNamespace::parse(&host.identify(cns::NAMESPACE, 1)).unwrap();
    assert_eq!((ns1.nsze, ns1.ncap, ns1.block_size()), (1000, 1000, Some(512)));
    let ns2 = IdentifyNamespace::parse(&host.identify(cns::NAMESPACE, 2)).unwrap();
    assert_eq!((ns2.nsze, ns2.block_size()), (300, Some(4096)));
    for nsid in [0, 3, 0xffff_ffff] {
        let mut cmd = Command::new(admin::IDENTIFY);
        cmd.nsid = nsid;
        cmd.prp1 = host.admin.cq.iova(); // never written: the command fails first
        assert_eq!(host.admin(cmd).status(), Status::INVALID_NAMESPACE, "nsid {nsid}");
    }
    let mut cmd = Command::new(admin::IDENTIFY);
    cmd.cdw[0] = 0x55;
    assert_eq!(host.admin(cmd).status(), Status::INVALID_FIELD);
    // Get Log Page: the length from NUMDL, the page's contents.
    let log = e.alloc_dma(4096).unwrap();
    log.fill(0, 4096, 0xff).unwrap();
    let mut cmd = Command::new(admin::GET_LOG_PAGE);
    cmd.prp1 = log.iova();
    cmd.cdw[0] = 127 << 16 | 0x02; // SMART, 128 dwords
    host.admin_ok(cmd);
    let mut b = vec![0u8; 4096];
    log.read_at(0, &mut b).unwrap();
    assert!(b[512..].iter().all(|&x| x == 0xff));
    let smart = pcibus::nvme::spec::SmartLog::parse(&b[..512]).unwrap();
    assert_eq!((smart.available_spare, smart.power_cycles), (100, 1));
    // The failed commands above are in the error log.
    assert!(smart.error_log_entries > 0);
    cmd.cdw[0] = 0xffff << 16 | 0x02;
    cmd.cdw[1] = 0xffff; // 16 GiB
    assert_eq!(host.admin(cmd).status(), Status::INVALID_FIELD);
    let s = e.stats();
    assert_eq!(s.admin(admin::IDENTIFY), 9);
    assert_eq!(s.bad_dma, 0);
}

#[test]
fn enable_with_admin_queue_outside_dma_memory_is_fatal() {
    let e = emu(EmuConfig::default());
    let bar = e.map_bar(0).unwrap();
    bar.write32(reg::AQA, 0x001f_001f).unwrap();
    bar.write64(reg::ASQ, 0x7000_0000).unwrap();
    bar.write64(reg::ACQ, 0x7001_0000).unwrap();
    bar.write32(reg::CC, cc::EN | 6 << 16 | 4 << 20).unwrap();
    assert_eq!(
        bar.read32(reg::CSTS).unwrap() & (csts::CFS | csts::RDY),
        csts::CFS
    );
    assert_eq!(e.stats().bad_dma, 1);
    assert!(!e.is_processing());
    // A reset clears it; a bad page size is refused the same way.
    bar.write32(reg::CC, 0).unwrap();
    assert_eq!(bar.read32(reg::CSTS).unwrap(), 0);
    let sq = e.alloc_dma(4096).unwrap();
    bar.write64(reg::ASQ, sq.iova()).unwrap();
    bar.write64(reg::ACQ, sq.iova()).unwrap();
    bar.write32(reg::CC, cc::EN | 1 << cc::MPS_SHIFT).unwrap();
    assert_eq!(bar.read32(reg::CSTS).unwrap() & csts::CFS, csts::CFS);
}

#[test]
fn queue_creation_and_deletion_are_checked() {
    let e = emu(EmuConfig {
        max_io_queues: 4,
        mqes: 256,
        ..EmuConfig::default()
    });
    let mut host = Host::enable(e.clone());
    let mut noq = Command::new(admin::SET_FEATURES);
    noq.cdw[0] = u32::from(feature::NUMBER_OF_QUEUES);
    noq.cdw[1] = 9 << 16 | 1; // 10 CQs, 2 SQs
    assert_eq!(host.admin_ok(noq).dw0, 3 << 16 | 1);
    let mut get = Command::new(admin::GET_FEATURES);
    get.cdw[0] = u32::from(feature::NUMBER_OF_QUEUES);
    assert_eq!(host.admin_ok(get).dw0, 3 << 16 | 1);

    let mem = e.alloc_dma(256 * 64).unwrap();
    let p = mem.iova();
    type H = Host<EmulatedNvme>;
    let cases = [
        (H::create_cq_cmd(0, 16, p, None), Status::INVALID_QUEUE_ID),
        (H::create_cq_cmd(5, 16, p, None), Status::INVALID_QUEUE_ID),
        (H::create_cq_cmd(1, 1, p, None), Status::INVALID_QUEUE_SIZE),
        (H::create_cq_cmd(1, 257, p, None), Status::INVALID_QUEUE_SIZE),
        (
            H::create_cq_cmd(1, 16, p, Some(16)),
            Status::INVALID_INTERRUPT_VECTOR,
        ),
        (H::create_cq_cmd(1, 16, p + 512, None), Status::INVALID_FIELD),
        (
            H::create_cq_cmd(1, 16, 0xdead_0000, None),
            Status::DATA_TRANSFER_ERROR,
        ),
        (H::create_sq_cmd(1, 16, p, 1), Status::INVALID_CQ),
        (H::create_sq_cmd(3, 16, p, 1), Status::INVALID_QUEUE_ID), // only 2 SQs granted
    ];
    for (cmd, want) in cases {
        assert_eq!(host.admin(cmd).status(), want, "{cmd:?}");
    }
    let mut pc0 = H::create_cq_cmd(1, 16, p, None);
    pc0.cdw[1] &= !1;
    assert_eq!(
        host.admin(pc0).status(),
        Status::INVALID_FIELD,
        "PC=0 with CAP.CQR"
    );
    assert_eq!(e.stats().bad_dma, 1);

    let q = host.io_queue(1, 16, 16, None);
    assert_eq!(
        host.admin(H::create_cq_cmd(1, 16, p, None)).status(),
        Status::INVALID_QUEUE_ID
    );
    assert_eq!(
        host.admin(H::create_sq_cmd(1, 16, p, 1)).status(),
        Status::INVALID_QUEUE_ID
    );
    assert_eq!(host.admin(noq).status(), Status::COMMAND_SEQUENCE_ERROR);
    let mut del_cq = Command::new(admin::DELETE_CQ);
    del_cq.cdw[0] = 1;
    assert_eq!(host.admin(del_cq).status(), Status::INVALID_QUEUE_DELETION);
    let mut del_sq = Command::new(admin::DELETE_SQ);
    del_sq.cdw[0] = 1;
    host.admin_ok(del_sq);
    assert_eq!(host.admin(del_sq).status(), Status::INVALID_QUEUE_ID);
    host.admin_ok(del_cq);
    assert_eq!(host.admin(del_cq).status(), Status::INVALID_QUEUE_ID);
    del_cq.cdw[0] = 0;
    assert_eq!(
        host.admin(del_cq).status(),
        Status::INVALID_QUEUE_ID,
        "the admin CQ"
    );
    assert_eq!(host.admin(Command::new(0xee)).status(), Status::INVALID_OPCODE);
    drop(q);
}

#[test]
fn write_then_read_4k_and_256k() {
    let (e, host, mut q) = setup(EmuConfig::default());
    // 4 KiB through PRP1 alone.
    let buf = e.alloc_dma(4096).unwrap();
    let data = pattern(4096, 1);
    buf.write_at(0, &data).unwrap();
    let c = host.exec(&mut q, rw(io::WRITE, 1, 8, 8, buf.iova(), 0));
    assert_eq!(c.status(), Status::SUCCESS);
    assert_eq!(e.namespace_read(1, 8 * 512, 4096).unwrap(), data);
    let back = e.alloc_dma(4096).unwrap();
    assert!(
        host.exec(&mut q, rw(io::READ, 1, 8, 8, back.iova(), 0))
            .status()
            .is_success()
    );
    let mut got = vec![0u8; 4096];
    back.read_at(0, &mut got).unwrap();
    assert_eq!(got, data);

    // 256 KiB: PRP1 the first page, PRP2 a list of the other 63.
    let len = 256 * 1024;
    let big = e.alloc_dma(len).unwrap();
    let data = pattern(len, 7);
    big.write_at(0, &data).unwrap();
    let list = e.alloc_dma(4096).unwrap();
    let pages: Vec<u64> = (1..64).map(|i| big.iova() + i * 4096).collect();
    prp_list(&list, 0, &pages);
    let c = host.exec(&mut q, rw(io::WRITE, 1, 1000, 512, big.iova(), list.iova()));
    assert_eq!(c.status(), Status::SUCCESS);
    assert_eq!(e.namespace_read(1, 1000 * 512, len).unwrap(), data);
    // Read it back into pages in reverse order, to see every list entry honoured.
    let scattered = e.alloc_dma(len).unwrap();
    let rev: Vec<u64> = (0..64).rev().map(|i| scattered.iova() + i * 4096).collect();
    prp_list(&list, 0, &rev[1..]);
    let c = host.exec(&mut q, rw(io::READ, 1, 1000, 512, rev[0], list.iova()));
    assert_eq!(c.status(), Status::SUCCESS);
    for (k, page) in (0..64).rev().enumerate() {
        let mut got = vec![0u8; 4096];
        scattered.read_at(page * 4096, &mut got).unwrap();
        assert_eq!(got, data[k * 4096..(k + 1) * 4096], "page {k}");
    }
    assert_eq!(e.stats().bad_dma, 0);
    assert_eq!(e.stats().io(io::WRITE), 2);
}

#[test]
fn prp1_offset_two_pages_and_chained_lists() {
    let (e, host, mut q) = setup(EmuConfig::default());
    let buf = e.alloc_dma(64 * 1024).unwrap();
    // 8 KiB from offset 512 of the first page: three pages, so PRP2 is a list of two.
    let data = pattern(8192, 3);
    buf.write_at(512, &data).unwrap();
    let list = e.alloc_dma(8192).unwrap();
    prp_list(&list, 0, &[buf.iova() + 4096, buf.iova() + 8192]);
    let c = host.exec(&mut q, rw(io::WRITE, 1, 0, 16, buf.iova() + 512, list.iova()));
    assert_eq!(c.status(), Status::SUCCESS);
    assert_eq!(e.namespace_read(1, 0, 8192).unwrap(), data);

    // Exactly two pages: PRP2 is the second page itself.
    let data = pattern(8192, 4);
    buf.write_at(16384, &data[..4096]).unwrap();
    buf.write_at(40960, &data[4096..]).unwrap();
    let c = host.exec(
        &mut q,
        rw(io::WRITE, 1, 100, 16, buf.iova() + 16384, buf.iova() + 40960),
    );
    assert_eq!(c.status(), Status::SUCCESS);
    assert_eq!(e.namespace_read(1, 100 * 512, 8192).unwrap(), data);

    // 40 KiB with the list starting 3 entries before the end of its page: two data
    // entries, then a pointer to the next list page holding the rest.
    let data = pattern(40960, 5);
    buf.write_at(0, &data).unwrap();
    let at = 4096 - 24;
    prp_list(
        &list,
        at,
        &[buf.iova() + 4096, buf.iova() + 8192, list.iova() + 4096],
    );
    let rest: Vec<u64> = (3..10).map(|i| buf.iova() + i * 4096).collect();
    prp_list(&list, 4096, &rest);
    let c = host.exec(
        &mut q,
        rw(io::WRITE, 1, 200, 80, buf.iova(), list.iova() + at as u64),
    );
    assert_eq!(c.status(), Status::SUCCESS);
    assert_eq!(e.namespace_read(1, 200 * 512, 40960).unwrap(), data);

    // A list entry with an offset is refused.
    prp_list(&list, 0, &[buf.iova() + 4096 + 8, buf.iova() + 8192]);
    let c = host.exec(&mut q, rw(io::READ, 1, 0, 24, buf.iova(), list.iova()));
    assert_eq!(c.status(), Status::PRP_OFFSET_INVALID);
    assert_eq!(e.stats().bad_dma, 0);
}

#[test]
fn mdts_lba_range_namespace_and_prp_checks() {
    let (e, host, mut q) = setup(EmuConfig::default());
    let buf = e.alloc_dma(4096).unwrap();
    let b = buf.iova();
    let blocks = e.config().namespaces[0].blocks;
    let cases = [
        (rw(io::READ, 1, 0, 1025, b, 0), Status::INVALID_FIELD), // 512 KiB + 512 > MDTS
        (rw(io::READ, 1, blocks - 1, 2, b, 0), Status::LBA_OUT_OF_RANGE),
        (rw(io::WRITE, 1, u64::MAX, 1, b, 0), Status::LBA_OUT_OF_RANGE),
        (rw(io::READ, 0, 0, 1, b, 0), Status::INVALID_NAMESPACE),
        (rw(io::READ, 2, 0, 1, b, 0), Status::INVALID_NAMESPACE),
        (rw(io::READ, 1, 0, 1, b + 2, 0), Status::PRP_OFFSET_INVALID),
        (
            rw(io::READ, 1, 0, 16, b, b + 4096 + 4),
            Status::PRP_OFFSET_INVALID,
        ),
        (rw(io::WRITE_ZEROES, 1, blocks, 1, 0, 0), Status::LBA_OUT_OF_RANGE),
        (rw(0x7f, 1, 0, 1, b, 0), Status::INVALID_OPCODE),
    ];
    for (cmd, want) in cases {
        assert_eq!(host.exec(&mut q, cmd).status(), want, "{cmd:?}");
    }
    let mut sgl = rw(io::READ, 1, 0, 1, b, 0);
    sgl.flags = 0x40;
    assert_eq!(host.exec(&mut q, sgl).status(), Status::INVALID_FIELD);
    let mut flush = Command::new(io::FLUSH);
    flush.nsid = spec::NSID_ALL;
    assert!(host.exec(&mut q, flush).status().is_success());
    flush.nsid = 9;
    assert_eq!(host.exec(&mut q, flush).status(), Status::INVALID_NAMESPACE);
    assert_eq!(e.stats().bad_dma, 0);
}

#[test]
fn dataset_management_and_write_zeroes_clear_ranges() {
    let (e, host, mut q) = setup(EmuConfig::default());
    let data = pattern(64 * 512, 9);
    e.namespace_write(1, 0, &data).unwrap();
    // Deallocate blocks 4..8 and 20..30.
    let ranges = e.alloc_dma(4096).unwrap();
    for (i, (slba, nlb)) in [(4u64, 4u32), (20, 10)].into_iter().enumerate() {
        ranges.write_at(i * 16 + 4, &nlb.to_le_bytes()).unwrap();
        ranges.write_at(i * 16 + 8, &slba.to_le_bytes()).unwrap();
    }
    let mut cmd = Command::new(io::DATASET_MANAGEMENT);
    cmd.nsid = 1;
    cmd.prp1 = ranges.iova();
    cmd.cdw[0] = 1; // two ranges
    cmd.cdw[1] = spec::dsm::DEALLOCATE;
    assert!(host.exec(&mut q, cmd).status().is_success());
    let mut want = data.clone();
    want[4 * 512..8 * 512].fill(0);
    want[20 * 512..30 * 512].fill(0);
    assert_eq!(e.namespace_read(1, 0, want.len()).unwrap(), want);
    // Write Zeroes over 40..50.
    assert!(
        host.exec(&mut q, rw(io::WRITE_ZEROES, 1, 40, 10, 0, 0))
            .status()
            .is_success()
    );
    want[40 * 512..50 * 512].fill(0);
    assert_eq!(e.namespace_read(1, 0, want.len()).unwrap(), want);
    // A range past the end fails the whole command and clears nothing.
    ranges.write_at(16 + 8, &u64::MAX.to_le_bytes()).unwrap();
    e.namespace_write(1, 4 * 512, &[1; 512]).unwrap();
    assert_eq!(host.exec(&mut q, cmd).status(), Status::LBA_OUT_OF_RANGE);
    assert_eq!(e.namespace_read(1, 4 * 512, 512).unwrap(), [1; 512]);
}

#[test]
fn queues_wrap_and_the_phase_flips() {
    let e = emu(EmuConfig::default());
    let mut host = Host::enable(e.clone());
    let mut q = host.io_queue(1, 4, 5, None);
    let mut flush = Command::new(io::FLUSH);
    flush.nsid = 1;
    // One at a time, then batches of three, for more than 2x both queue sizes.
    let mut phases = Vec::new();
    for _ in 0..12 {
        let c = host.exec(&mut q, flush);
        assert!(c.status().is_success());
        assert_eq!(u32::from(c.sq_head), q.tail);
        phases.push(q.phase);
    }
    assert!(phases.contains(&false) && phases.contains(&true));
    for _ in 0..6 {
        let cids: Vec<u16> = (0..3).map(|_| q.push(flush)).collect();
        host.ring_sq(&q);
        for cid in cids {
            let c = host.wait(&mut q);
            assert_eq!(c.cid, cid);
        }
    }
    assert_eq!(e.stats().io(io::FLUSH), 30);
}

#[test]
fn a_doorbell_counts_only_when_written_and_queue_deletion_resets_it() {
    // Shadow doorbells off: the MMIO doorbell register is the only tail.
    let e = emu(EmuConfig {
        shadow_doorbells: false,
        ..EmuConfig::default()
    });
    let mut host = Host::enable(e.clone());
    let mut q = host.io_queue(1, 13, 13, None);
    let mut flush = Command::new(io::FLUSH);
    flush.nsid = 1;
    assert!(host.exec(&mut q, flush).status().is_success());
    let mut del = Command::new(admin::DELETE_SQ);
    del.cdw[0] = 1;
    host.admin_ok(del);
    del.opcode = admin::DELETE_CQ;
    host.admin_ok(del);
    // The same id again, smaller: the old tail (1) is no tail of the new queue, and the
    // controller runs nothing the host did not submit.
    let mut q = host.io_queue(1, 2, 2, None);
    let before = e.stats().commands;
    let c = host.exec(&mut q, flush);
    assert!(c.status().is_success());
    assert_eq!(u32::from(c.sq_head), 1);
    assert_eq!(e.stats().commands, before + 1, "an empty slot ran");
    // Writing the tail it already has is no new command either.
    host.ring_sq(&q);
    let c = host.exec(&mut q, flush);
    assert_eq!(u32::from(c.sq_head), 0);
    assert_eq!(e.stats().commands, before + 2);
    assert!(q.peek().is_none());
}

#[test]
fn completions_can_come_out_of_order() {
    let (e, host, mut q) = setup(EmuConfig {
        shuffle_completions: Some(7),
        ..EmuConfig::default()
    });
    let mut flush = Command::new(io::FLUSH);
    flush.nsid = 1;
    let cids: Vec<u16> = (0..16).map(|_| q.push(flush)).collect();
    host.ring_sq(&q);
    let got: Vec<Completion> = (0..16).map(|_| host.wait(&mut q)).collect();
    let mut order: Vec<u16> = got.iter().map(|c| c.cid).collect();
    assert_ne!(order, cids, "one burst of 16, shuffled");
    // Every completion carries the SQ head as it was when posted: after the whole burst.
    assert!(got.iter().all(|c| c.sq_head == 16), "{got:?}");
    order.sort_unstable();
    assert_eq!(order, cids);
    assert_eq!(e.stats().io(io::FLUSH), 16);
    // A full CQ still holds the controller back: no completion is lost or overwritten.
    let mut small = {
        let mut host = host;
        let q2 = host.io_queue(2, 16, 4, None);
        (host, q2)
    };
    let cids: Vec<u16> = (0..10).map(|_| small.1.push(flush)).collect();
    small.0.ring_sq(&small.1);
    let mut seen: Vec<u16> = (0..10).map(|_| small.0.wait(&mut small.1).cid).collect();
    seen.sort_unstable();
    assert_eq!(seen, cids);
}

#[test]
fn a_full_completion_queue_holds_back_the_controller() {
    let e = emu(EmuConfig::default());
    let mut host = Host::enable(e.clone());
    let mut q = host.io_queue(1, 16, 4, None);
    let mut flush = Command::new(io::FLUSH);
    flush.nsid = 1;
    let base = e.stats().completions;
    let cids: Vec<u16> = (0..7).map(|_| q.push(flush)).collect();
    host.ring_sq(&q);
    // A CQ of 4 entries holds 3 before the host frees any.
    eventually("3 completions", || e.stats().completions >= base + 3);
    thread::sleep(Duration::from_millis(20));
    assert_eq!(
        e.stats().completions,
        base + 3,
        "the controller overwrote an unconsumed entry"
    );
    assert_eq!(e.stats().io(io::FLUSH), 3);
    let mut seen = Vec::new();
    while seen.len() < 7 {
        match q.pop() {
            Some(c) => seen.push(c.cid),
            None => {
                host.ring_cq(&q);
                eventually("more completions", || q.peek().is_some());
            }
        }
    }
    host.ring_cq(&q);
    assert_eq!(seen, cids);
}

#[test]
fn fault_never_complete_then_abort() {
    // The kind controller whose Abort aborts what it holds (the strict one's never does:
    // `abort_fails_by_default`).
    let (e, mut host, mut q) = setup(EmuConfig {
        abort_succeeds: true,
        ..EmuConfig::default()
    });
    let buf = e.alloc_dma(4096).unwrap();
    e.inject(Fault::NeverComplete {
        command: CommandMatch::Io(io::READ),
        count: 1,
    });
    let swallowed = q.push(rw(io::READ, 1, 0, 1, buf.iova(), 0));
    host.ring_sq(&q);
    let mut flush = Command::new(io::FLUSH);
    flush.nsid = 1;
    let c = host.exec(&mut q, flush);
    assert!(
        c.status().is_success(),
        "the next command completes, the read does not"
    );
    assert_eq!(e.stats().io(io::READ), 1);
    // Abort finds it.
    let mut abort = Command::new(admin::ABORT);
    abort.cdw[0] = u32::from(swallowed) << 16 | 1;
    assert_eq!(host.admin_ok(abort).dw0 & 1, 0, "aborted");
    let c = host.wait(&mut q);
    assert_eq!((c.cid, c.status()), (swallowed, Status::ABORT_REQUESTED));
    assert_eq!(host.admin_ok(abort).dw0 & 1, 1, "nothing left to abort");
    // The count is used up.
    assert!(
        host.exec(&mut q, rw(io::READ, 1, 0, 1, buf.iova(), 0))
            .status()
            .is_success()
    );
    // A swallowed command is completed as aborted when its SQ is deleted.
    e.inject(Fault::NeverComplete {
        command: CommandMatch::AnyIo,
        count: 1,
    });
    let swallowed = q.push(flush);
    host.ring_sq(&q);
    eventually("the flush taken", || e.stats().io(io::FLUSH) == 2);
    let mut del = Command::new(admin::DELETE_SQ);
    del.cdw[0] = 1;
    host.admin_ok(del);
    let c = host.wait(&mut q);
    assert_eq!((c.cid, c.status()), (swallowed, Status::ABORTED_SQ_DELETION));
}

#[test]
fn abort_fails_by_default() {
    let (e, mut host, mut q) = setup(EmuConfig::default());
    e.inject(Fault::NeverComplete {
        command: CommandMatch::Io(io::FLUSH),
        count: 1,
    });
    let mut flush = Command::new(io::FLUSH);
    flush.nsid = 1;
    let swallowed = q.push(flush);
    host.ring_sq(&q);
    eventually("the flush taken", || e.stats().io(io::FLUSH) == 1);
    let mut abort = Command::new(admin::ABORT);
    abort.cdw[0] = u32::from(swallowed) << 16 | 1;
    assert_eq!(host.admin_ok(abort).dw0 & 1, 1, "not aborted");
    assert!(q.peek().is_none(), "the command stays held");
    // Deleting the SQ still ends it.
    let mut del = Command::new(admin::DELETE_SQ);
    del.cdw[0] = 1;
    host.admin_ok(del);
    let c = host.wait(&mut q);
    assert_eq!((c.cid, c.status()), (swallowed, Status::ABORTED_SQ_DELETION));
}

#[test]
fn fault_stall_executes_at_release_and_counts_late_dma() {
    let (e, host, mut q) = setup(EmuConfig::default());
    e.namespace_write(1, 0, &[0x42; 4096]).unwrap();
    let first = e.alloc_dma(4096).unwrap();
    let iova = first.iova();
    e.inject(Fault::Stall {
        command: CommandMatch::Io(io::READ),
        count: 1,
    });
    let cid = q.push(rw(io::READ, 1, 0, 8, iova, 0));
    host.ring_sq(&q);
    eventually("the read fetched", || e.stats().io(io::READ) == 1);
    // The driver gives up on it and frees its buffer; the IOVA goes to a new buffer.
    drop(first);
    let next = e.alloc_dma(4096).unwrap();
    assert_eq!(next.iova(), iova);
    assert!(q.peek().is_none());
    e.release_stalled();
    let c = host.wait(&mut q);
    assert_eq!((c.cid, c.status()), (cid, Status::SUCCESS));
    let mut got = vec![0u8; 4096];
    next.read_at(0, &mut got).unwrap();
    assert_eq!(got, [0x42; 4096], "the late read landed in the new buffer");
    assert_eq!((e.stats().late_dma, e.stats().bad_dma), (1, 0));
    // A buffer that lives on is no late DMA.
    e.inject(Fault::Stall {
        command: CommandMatch::Io(io::READ),
        count: 1,
    });
    q.push(rw(io::READ, 1, 0, 8, iova, 0));
    host.ring_sq(&q);
    eventually("the second read fetched", || e.stats().io(io::READ) == 2);
    e.release_stalled();
    assert!(host.wait(&mut q).status().is_success());
    assert_eq!(e.stats().late_dma, 1);
}

#[test]
fn fault_status_and_delay() {
    let (e, host, mut q) = setup(EmuConfig::default());
    let buf = e.alloc_dma(4096).unwrap();
    buf.fill(0, 512, 0xaa).unwrap();
    e.inject(Fault::Status {
        command: CommandMatch::Io(io::WRITE),
        status: Status::INTERNAL_ERROR,
        count: 2,
    });
    for _ in 0..2 {
        let c = host.exec(&mut q, rw(io::WRITE, 1, 3, 1, buf.iova(), 0));
        assert_eq!(c.status(), Status::INTERNAL_ERROR);
    }
    assert_eq!(
        e.namespace_read(1, 3 * 512, 512).unwrap(),
        [0; 512],
        "not executed"
    );
    assert!(
        host.exec(&mut q, rw(io::WRITE, 1, 3, 1, buf.iova(), 0))
            .status()
            .is_success()
    );
    assert_eq!(e.namespace_read(1, 3 * 512, 512).unwrap(), [0xaa; 512]);
    e.inject(Fault::Delay(Duration::from_millis(2)));
    assert!(
        host.exec(&mut q, rw(io::READ, 1, 3, 1, buf.iova(), 0))
            .status()
            .is_success()
    );
    e.clear_faults();
    assert!(
        host.exec(&mut q, rw(io::READ, 1, 3, 1, buf.iova(), 0))
            .status()
            .is_success()
    );
}

#[test]
fn fault_wrong_cid_and_duplicate() {
    let (e, host, mut q) = setup(EmuConfig::default());
    let mut flush = Command::new(io::FLUSH);
    flush.nsid = 1;
    e.inject(Fault::WrongCid);
    let cid = q.push(flush);
    host.ring_sq(&q);
    let c = host.wait(&mut q);
    assert_ne!(c.cid, cid);
    assert_eq!(c.cid, 0xffff);
    e.inject(Fault::Duplicate);
    let cid = q.push(flush);
    host.ring_sq(&q);
    let first = host.wait(&mut q);
    let second = host.wait(&mut q);
    assert_eq!((first.cid, second.cid), (cid, cid));
    // Back to normal.
    let c = host.exec(&mut q, flush);
    assert!(c.status().is_success());
    assert!(q.peek().is_none());
}

#[test]
fn fault_stale_phase_is_not_consumed() {
    let (e, host, mut q) = setup(EmuConfig::default());
    let mut flush = Command::new(io::FLUSH);
    flush.nsid = 1;
    e.inject(Fault::StalePhase);
    q.push(flush);
    let second = q.push(flush);
    host.ring_sq(&q);
    // The second completion lands behind the stale one; the head entry never looks new.
    let at = (q.head as usize + 1) * 16;
    eventually("the second completion", || {
        let w: u64 = q.cq.load_acquire(at + 8).unwrap();
        (w >> 48 & 1 == 1) == q.phase
    });
    assert!(q.peek().is_none(), "a stale entry was taken as new");
    let mut b = [0u8; 16];
    q.cq.read_at(at, &mut b).unwrap();
    assert_eq!(Completion::from_bytes(&b).cid, second);
    assert_eq!(e.stats().io(io::FLUSH), 2);
}

#[test]
fn fault_fatal_status_until_reset() {
    let (e, mut host, mut q) = setup(EmuConfig::default());
    e.inject(Fault::FatalStatus);
    assert_ne!(host.csts() & csts::CFS, 0);
    let mut flush = Command::new(io::FLUSH);
    flush.nsid = 1;
    let before = e.stats().commands;
    q.push(flush);
    host.ring_sq(&q);
    thread::sleep(Duration::from_millis(20));
    assert_eq!(e.stats().commands, before, "processed after a fatal status");
    host.disable();
    assert_eq!(host.csts(), 0);
    host.admin = Queue::new(&host.dev, 0, 32, 32);
    host.start();
    let mut q = host.io_queue(1, 8, 8, None);
    assert!(host.exec(&mut q, flush).status().is_success());
}

#[test]
fn fault_fatal_status_with_dma_going_on() {
    let (e, host, mut q) = setup(EmuConfig::default());
    let buf = e.alloc_dma(4096).unwrap();
    buf.fill(0, 512, 0x3c).unwrap();
    e.inject(Fault::FatalStatusDmaContinues);
    assert_ne!(host.csts() & csts::CFS, 0);
    // Failed, and still moving data.
    let c = host.exec(&mut q, rw(io::WRITE, 1, 5, 1, buf.iova(), 0));
    assert!(c.status().is_success());
    assert_eq!(e.namespace_read(1, 5 * 512, 512).unwrap(), [0x3c; 512]);
    assert!(e.is_processing());
    // A reset ends it.
    host.disable();
    assert_eq!(host.csts() & csts::CFS, 0);
}

#[test]
fn fault_reset_during_io() {
    let (e, mut host, mut q) = setup(EmuConfig::default());
    e.inject(Fault::Stall {
        command: CommandMatch::AnyIo,
        count: 1,
    });
    let mut flush = Command::new(io::FLUSH);
    flush.nsid = 1;
    q.push(flush);
    host.ring_sq(&q);
    eventually("the flush taken", || e.stats().io(io::FLUSH) == 1);
    e.inject(Fault::Reset);
    assert!(!e.is_processing());
    assert_eq!(host.csts(), 0);
    for r in [reg::CC, reg::AQA] {
        assert_eq!(host.bar.read32(r).unwrap(), 0);
    }
    assert_eq!(host.bar.read64(reg::ASQ).unwrap(), 0);
    // What was outstanding is gone with the queues.
    e.release_stalled();
    assert!(q.peek().is_none());
    // The host brings it up again.
    host.admin = Queue::new(&host.dev, 0, 16, 16);
    host.start();
    let mut q = host.io_queue(1, 8, 8, None);
    assert!(host.exec(&mut q, flush).status().is_success());
}

#[test]
fn fault_lost_interrupt() {
    let e = emu(EmuConfig::default());
    let fds: Vec<EventFd> = (0..2)
        .map(|_| EventFd::from_value_and_flags(0, EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC).unwrap())
        .collect();
    let borrowed: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
    e.route_interrupts(&borrowed).unwrap();
    let mut host = Host::enable(e.clone());
    let mut q = host.io_queue(1, 8, 8, Some(1));
    let read = |f: &EventFd| f.read().unwrap_or(0);
    let mut flush = Command::new(io::FLUSH);
    flush.nsid = 1;
    e.inject(Fault::LostInterrupt { count: 1 });
    let before = e.stats().interrupts;
    assert!(host.exec(&mut q, flush).status().is_success());
    assert_eq!(read(&fds[1]), 0, "the completion came without its interrupt");
    assert_eq!(e.stats().interrupts, before);
    assert!(host.exec(&mut q, flush).status().is_success());
    eventually("the next interrupt", || read(&fds[1]) > 0);
}

#[test]
fn fault_sq_head_backwards() {
    let (e, host, mut q) = setup(EmuConfig::default());
    let mut flush = Command::new(io::FLUSH);
    flush.nsid = 1;
    for head in 1..=3 {
        assert_eq!(host.exec(&mut q, flush).sq_head, head);
    }
    e.inject(Fault::SqHeadBackwards);
    assert_eq!(
        host.exec(&mut q, flush).sq_head,
        2,
        "one behind the last reported"
    );
    assert_eq!(host.exec(&mut q, flush).sq_head, 5);
}

#[test]
fn an_invalid_doorbell_write_raises_an_error_event() {
    let (e, mut host, q) = setup(EmuConfig::default());
    let aers: Vec<u16> = (0..2)
        .map(|_| host.admin.push(Command::new(admin::ASYNC_EVENT)))
        .collect();
    host.bar
        .write32(host.cap.sq_doorbell(0), host.admin.tail)
        .unwrap();
    eventually("the AERs taken", || e.stats().admin(admin::ASYNC_EVENT) == 2);
    // A tail beyond the 64-entry queue: Error status, Invalid Doorbell Write Value, log
    // page Error Information.
    host.bar.write32(host.cap.sq_doorbell(q.qid), 1000).unwrap();
    let mut got = None;
    eventually("the event", || {
        got = host.admin.pop();
        got.is_some()
    });
    let c = got.unwrap();
    assert_eq!((c.cid, c.status(), c.dw0), (aers[0], Status::SUCCESS, 0x01_01_00));
    host.bar
        .write32(host.cap.cq_doorbell(0), host.admin.head)
        .unwrap();
    // Masked until the log page is read: a second bad write raises nothing.
    host.bar.write32(host.cap.sq_doorbell(q.qid), 2000).unwrap();
    eventually("the write seen", || e.stats().invalid_doorbell_writes == 2);
    let log = e.alloc_dma(4096).unwrap();
    let mut get_log = Command::new(admin::GET_LOG_PAGE);
    get_log.prp1 = log.iova();
    get_log.cdw[0] = 15 << 16 | 0x01;
    // The only completion is the Get Log Page's (Host::admin checks the cid).
    host.admin_ok(get_log);
    // A write to no doorbell register at all: Write to Invalid Doorbell Register.
    host.bar.write32(0x3000, 1).unwrap();
    let mut got = None;
    eventually("the second event", || {
        got = host.admin.pop();
        got.is_some()
    });
    let c = got.unwrap();
    assert_eq!((c.cid, c.dw0), (aers[1], 0x01_00_00));
    assert_eq!(e.stats().invalid_doorbell_writes, 3);
}

#[test]
fn fault_gone_reads_all_ones() {
    let (e, host, mut q) = setup(EmuConfig::default());
    e.inject(Fault::Gone);
    assert_eq!(host.bar.read32(reg::CSTS).unwrap(), u32::MAX);
    assert_eq!(host.bar.read64(reg::CAP).unwrap(), u64::MAX);
    let mut id = [0u8; 2];
    e.read_config(0, &mut id).unwrap();
    assert_eq!(id, [0xff, 0xff]);
    let before = e.stats();
    let mut flush = Command::new(io::FLUSH);
    flush.nsid = 1;
    q.push(flush);
    host.ring_sq(&q);
    thread::sleep(Duration::from_millis(20));
    assert_eq!(e.stats().commands, before.commands);
    assert_eq!(
        e.stats().sq_doorbell_writes,
        before.sq_doorbell_writes,
        "writes are dropped"
    );
    assert!(q.peek().is_none());
    // Tearing down a gone controller still works.
    host.bar.write32(reg::CC, 0).unwrap();
    assert!(e.reset().is_err());
}

#[test]
fn dma_to_a_dropped_or_foreign_buffer_fails() {
    let (e, host, mut q) = setup(EmuConfig::default());
    let buf = e.alloc_dma(4096).unwrap();
    let iova = buf.iova();
    drop(buf);
    let c = host.exec(&mut q, rw(io::READ, 1, 0, 8, iova, 0));
    assert_eq!(c.status(), Status::DATA_TRANSFER_ERROR);
    assert_eq!(e.stats().bad_dma, 1);
    // One byte past a live buffer (the next page is a guard).
    let live = e.alloc_dma(4096).unwrap();
    let c = host.exec(&mut q, rw(io::WRITE, 1, 0, 2, live.iova() + 3584, 0));
    assert_eq!(c.status(), Status::DATA_TRANSFER_ERROR);
    let c = host.exec(&mut q, rw(io::WRITE, 1, 0, 1, 0, 0));
    assert_eq!(c.status(), Status::DATA_TRANSFER_ERROR);
    assert_eq!(e.stats().bad_dma, 3);
    assert_eq!(
        e.namespace_read(1, 0, 1024).unwrap(),
        [0; 1024],
        "a failed write wrote nothing"
    );
}

#[test]
fn freed_iovas_are_reused_so_late_dma_lands_in_the_next_buffer() {
    let (e, host, mut q) = setup(EmuConfig::default());
    e.namespace_write(1, 0, &[0x77; 4096]).unwrap();
    let first = e.alloc_dma(4096).unwrap();
    let iova = first.iova();
    // The read is queued, then its buffer freed and another allocated before the
    // controller gets to it: the IOVA now belongs to the new buffer, and the read lands
    // there, as it would behind an IOMMU whose allocator handed the address out again.
    q.push(rw(io::READ, 1, 0, 8, iova, 0));
    drop(first);
    let next = e.alloc_dma(4096).unwrap();
    assert_eq!(next.iova(), iova, "the freed IOVA is handed out again");
    host.ring_sq(&q);
    assert!(host.wait(&mut q).status().is_success());
    let mut got = vec![0u8; 4096];
    next.read_at(0, &mut got).unwrap();
    assert_eq!(got, [0x77; 4096], "the read corrupted the next buffer");
    // Fetched after the new buffer was allocated: not counted as late (the controller
    // cannot know), only Fault::Stall shows a late one.
    assert_eq!((e.stats().bad_dma, e.stats().late_dma), (0, 0));
    // Lowest address first: a bigger buffer does not fit the hole of a smaller one.
    let small = e.alloc_dma(4096).unwrap();
    let _after = e.alloc_dma(4096).unwrap();
    let hole = small.iova();
    drop(small);
    // Three CPU pages (the emulator allocates whole ones) cannot fit a one-page hole.
    let big = e.alloc_dma(3 * pcibus::vfio::cpu_page_size()).unwrap();
    assert_ne!(big.iova(), hole);
    assert_eq!(e.alloc_dma(100).unwrap().iova(), hole);

    // The kind controller never reuses an IOVA: the same late read fails and is counted.
    let (e, host, mut q) = setup(EmuConfig {
        fresh_iovas: true,
        ..EmuConfig::default()
    });
    let first = e.alloc_dma(4096).unwrap();
    let iova = first.iova();
    q.push(rw(io::READ, 1, 0, 8, iova, 0));
    drop(first);
    let next = e.alloc_dma(4096).unwrap();
    assert_ne!(next.iova(), iova);
    host.ring_sq(&q);
    assert_eq!(host.wait(&mut q).status(), Status::DATA_TRANSFER_ERROR);
    assert_eq!(e.stats().bad_dma, 1);
}

fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

/// The driver side of shadow doorbells: write the shadow, and the MMIO doorbell only when
/// the controller's event index lies in (old, new].
fn shadow_ring(
    host: &Host<EmulatedNvme>,
    dbs: &pcibus::testing::nvme::EmuDma,
    eis: &pcibus::testing::nvme::EmuDma,
    index: usize,
    old: u32,
    new: u32,
    offset: u64,
) -> bool {
    dbs.store_release::<u32>(index * 4, new).unwrap();
    fence(Ordering::SeqCst);
    let event: u32 = eis.load_acquire(index * 4).unwrap();
    let ring = need_event(event as u16, new as u16, old as u16);
    if ring {
        host.bar.write32(offset, new).unwrap();
    }
    ring
}

fn shadow_doorbells(busy_poll: bool) {
    let e = emu(EmuConfig {
        busy_poll,
        ..EmuConfig::default()
    });
    let mut host = Host::enable(e.clone());
    let dbs = e.alloc_dma(4096).unwrap();
    let eis = e.alloc_dma(4096).unwrap();
    let mut cfg = Command::new(admin::DOORBELL_BUFFER_CONFIG);
    cfg.prp1 = dbs.iova();
    cfg.prp2 = eis.iova();
    host.admin_ok(cfg);
    let mut q = host.io_queue(1, 8, 4, None);
    let mut flush = Command::new(io::FLUSH);
    flush.nsid = 1;
    let mut mmio = 0;
    let mut done = 0;
    let mut batch = 1;
    while done < 100 {
        let old = q.tail;
        let cids: Vec<u16> = (0..batch).map(|_| q.push(flush)).collect();
        mmio += u32::from(shadow_ring(
            &host,
            &dbs,
            &eis,
            2,
            old,
            q.tail,
            host.cap.sq_doorbell(1),
        ));
        for cid in cids {
            let mut got = None;
            eventually("a completion through shadow doorbells", || {
                got = q.pop();
                got.is_some()
            });
            assert_eq!(got.unwrap().cid, cid);
            let old_head = (q.head + q.cq_size - 1) % q.cq_size;
            shadow_ring(&host, &dbs, &eis, 3, old_head, q.head, host.cap.cq_doorbell(1));
            done += 1;
        }
        batch = batch % 7 + 1;
    }
    let s = e.stats();
    assert_eq!(s.io(io::FLUSH), done);
    assert!(s.shadow_doorbell_updates > 0);
    assert!(s.event_index_writes > 0);
    assert!(u64::from(mmio) <= s.sq_doorbell_writes);
    assert_eq!(s.bad_dma, 0);
    // The event index follows the tail the controller has seen.
    let event: u32 = eis.load_acquire(2 * 4).unwrap();
    assert_eq!(event, q.tail);

    // Shadow only, no MMIO at all: still picked up (the controller polls the shadow
    // buffer before it sleeps and whenever it wakes).
    let old = q.tail;
    let cid = q.push(flush);
    dbs.store_release::<u32>(2 * 4, q.tail).unwrap();
    let _ = old;
    let mut got = None;
    eventually("a completion from a shadow-only doorbell", || {
        got = q.pop();
        got.is_some()
    });
    assert_eq!(got.unwrap().cid, cid);
}

#[test]
fn shadow_doorbells_sleeping_controller() {
    shadow_doorbells(false);
}

#[test]
fn shadow_doorbells_busy_polling_controller() {
    shadow_doorbells(true);
}

#[test]
fn msix_eventfds_are_signalled() {
    let e = emu(EmuConfig::default());
    let fds: Vec<EventFd> = (0..3)
        .map(|_| EventFd::from_value_and_flags(0, EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC).unwrap())
        .collect();
    let borrowed: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
    e.route_interrupts(&borrowed).unwrap();
    let too_many: Vec<_> = (0..17).map(|_| fds[0].as_fd()).collect();
    assert!(e.route_interrupts(&too_many).is_err());
    let mut host = Host::enable(e.clone());
    let mut q = host.io_queue(1, 8, 8, Some(2));
    let read = |f: &EventFd| f.read().unwrap_or(0);
    eventually("the admin vector", || read(&fds[0]) > 0);
    let mut flush = Command::new(io::FLUSH);
    flush.nsid = 1;
    host.exec(&mut q, flush);
    eventually("vector 2", || read(&fds[2]) > 0);
    assert_eq!(read(&fds[1]), 0, "vector 1 is nobody's");
    assert!(e.stats().interrupts >= 3);
}

#[test]
fn the_thread_ends_with_the_last_handle() {
    let (e, host, q) = setup(EmuConfig::default());
    let live = e.liveness();
    let buf = e.alloc_dma(4096).unwrap();
    // host.dev, host.bar, 2 admin + 2 I/O queue buffers, buf.
    assert_eq!(e.extra_handles(), 7);
    assert!(e.is_processing());
    drop((host, q, e));
    assert!(live.is_alive(), "a DMA buffer is a handle");
    drop(buf);
    assert!(!live.is_alive(), "the controller outlived its last handle");
}

#[test]
fn disable_resets_queues_and_reenable_works() {
    let (e, mut host, mut q) = setup(EmuConfig::default());
    let buf = e.alloc_dma(4096).unwrap();
    buf.fill(0, 512, 0x5a).unwrap();
    assert!(
        host.exec(&mut q, rw(io::WRITE, 1, 9, 1, buf.iova(), 0))
            .status()
            .is_success()
    );
    host.bar.write32(reg::CC, 0).unwrap();
    assert!(!e.is_processing(), "processing stops at once");
    host.disable();
    host.admin = Queue::new(&host.dev, 0, 16, 16);
    host.start();
    let fresh = Queue::new(&host.dev, 1, 8, 8);
    let c = host.admin(Host::<EmulatedNvme>::create_sq_cmd(1, 8, fresh.sq.iova(), 1));
    assert_eq!(c.status(), Status::INVALID_CQ, "the old CQ 1 survived the reset");
    let mut q = host.io_queue(1, 8, 8, None);
    let back = e.alloc_dma(4096).unwrap();
    assert!(
        host.exec(&mut q, rw(io::READ, 1, 9, 1, back.iova(), 0))
            .status()
            .is_success()
    );
    let mut got = [0u8; 512];
    back.read_at(0, &mut got).unwrap();
    assert_eq!(got, [0x5a; 512], "namespace data survives a controller reset");
}

#[test]
fn ready_follows_enable_after_a_delay_both_ways() {
    // A controller that takes an hour to become ready is not ready after the CC write.
    let e = emu(EmuConfig {
        ready_delay: Duration::from_secs(3600),
        ..EmuConfig::default()
    });
    let bar = e.map_bar(0).unwrap();
    let admin = Queue::new(&e, 0, 8, 8);
    bar.write32(reg::AQA, 7 << 16 | 7).unwrap();
    bar.write64(reg::ASQ, admin.sq.iova()).unwrap();
    bar.write64(reg::ACQ, admin.cq.iova()).unwrap();
    bar.write32(reg::CC, cc::EN | 6 << cc::IOSQES_SHIFT | 4 << cc::IOCQES_SHIFT)
        .unwrap();
    assert_eq!(
        bar.read32(reg::CSTS).unwrap() & csts::RDY,
        0,
        "ready inside the CC write"
    );
    // Disabling a controller that never got ready: RDY is 0 at once.
    bar.write32(reg::CC, 0).unwrap();
    assert_eq!(bar.read32(reg::CSTS).unwrap(), 0);
    assert!(!e.is_processing());

    // The default delay is short but not zero; a slow controller keeps RDY 1 after CC.EN
    // is cleared.
    assert!(!EmuConfig::default().ready_delay.is_zero());
    let e = emu(EmuConfig::default());
    let host = Host::enable(e.clone());
    e.inject(Fault::ReadySlow(Duration::from_secs(3600)));
    host.bar.write32(reg::CC, 0).unwrap();
    assert!(!e.is_processing(), "processing stops at the CC write");
    assert_eq!(
        host.csts() & csts::RDY,
        csts::RDY,
        "still ready until the delay passed"
    );
    // A function level reset ends it at once.
    e.reset().unwrap();
    assert_eq!(host.csts(), 0);
    e.clear_faults();
    let mut host = Host::enable(e.clone());
    host.identify(cns::CONTROLLER, 0);
}

#[test]
fn fault_ready_never_and_ready_slow() {
    let e = emu(EmuConfig::default());
    e.inject(Fault::ReadyNever);
    let bar = e.map_bar(0).unwrap();
    let admin = Queue::new(&e, 0, 8, 8);
    bar.write32(reg::AQA, 7 << 16 | 7).unwrap();
    bar.write64(reg::ASQ, admin.sq.iova()).unwrap();
    bar.write64(reg::ACQ, admin.cq.iova()).unwrap();
    let enable = cc::EN | 6 << cc::IOSQES_SHIFT | 4 << cc::IOCQES_SHIFT;
    bar.write32(reg::CC, enable).unwrap();
    // Many times the ready delay later, still not ready. (A loaded machine can only make
    // this pass for the wrong reason, never fail.)
    thread::sleep(EmuConfig::default().ready_delay * 10);
    assert_eq!(bar.read32(reg::CSTS).unwrap(), 0, "ready despite the fault");
    bar.write32(reg::CC, 0).unwrap();
    assert_eq!(bar.read32(reg::CSTS).unwrap(), 0);
    // Cleared, the next enable works; a slow one as well, only later.
    e.clear_faults();
    e.inject(Fault::ReadySlow(Duration::from_millis(200)));
    let mut host = Host::enable(e.clone());
    host.identify(cns::CONTROLLER, 0);
}

#[test]
fn shutdown_notification_completes() {
    let (e, host, _q) = setup(EmuConfig::default());
    let value = host.bar.read32(reg::CC).unwrap();
    host.bar.write32(reg::CC, value | cc::SHN_NORMAL).unwrap();
    eventually("SHST complete", || {
        host.csts() & csts::SHST_MASK == csts::SHST_COMPLETE
    });
    assert!(!e.is_processing());
    host.disable();
    assert_eq!(host.csts(), 0);
}

#[test]
fn async_event_requests_are_held() {
    let (e, mut host, _q) = setup(EmuConfig::default());
    let cids: Vec<u16> = (0..4)
        .map(|_| host.admin.push(Command::new(admin::ASYNC_EVENT)))
        .collect();
    host.bar
        .write32(host.cap.sq_doorbell(0), host.admin.tail)
        .unwrap();
    // A fifth is over the limit (Identify AERL + 1 = 4) and fails at once.
    let c = host.admin(Command::new(admin::ASYNC_EVENT));
    assert_eq!(c.status(), Status::ASYNC_EVENT_LIMIT_EXCEEDED);
    e.complete_async_event(0x0001_0002);
    let mut got = None;
    eventually("the event", || {
        got = host.admin.pop();
        got.is_some()
    });
    let c = got.unwrap();
    assert_eq!((c.cid, c.dw0), (cids[0], 0x0001_0002));
}

#[test]
fn sriov_virtualization_management() {
    let cfg = EmuConfig {
        sriov: Some(SriovConfig {
            vfs: 2,
            flexible_vq: 8,
            flexible_vi: 4,
        }),
        ..EmuConfig::default()
    };
    let e = emu(cfg);
    let mut host = Host::enable(e.clone());
    let id = IdentifyController::parse(&host.identify(cns::CONTROLLER, 0)).unwrap();
    assert_ne!(id.oacs & oacs::VIRT_MGMT, 0);
    let caps = host.identify(cns::PRIMARY_CONTROLLER_CAPS, 0);
    let le16 = |b: &[u8], o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
    let le32 = |b: &[u8], o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
    assert_eq!((le32(&caps, 32), le16(&caps, 40)), (8, 8), "VQFRT, VQRFAP");
    assert_eq!((le32(&caps, 64), le16(&caps, 72)), (4, 4), "VIFRT, VIRFAP");
    let list = spec::parse_secondary_controllers(&host.identify(cns::SECONDARY_CONTROLLERS, 0));
    assert_eq!(list.len(), 2);
    assert_eq!((list[1].scid, list[1].vfn, list[1].online), (2, 2, false));

    let vm = spec::virt_mgmt_command;
    // The primary holds everything: nothing to assign yet.
    let c = host.admin(vm(virt_mgmt::SECONDARY_ASSIGN, virt_mgmt::RESOURCE_VQ, 1, 2));
    assert_eq!(c.status(), Status::INVALID_RESOURCE_COUNT);
    host.admin_ok(vm(
        virt_mgmt::PRIMARY_FLEXIBLE_ALLOCATION,
        virt_mgmt::RESOURCE_VQ,
        0,
        0,
    ));
    host.admin_ok(vm(
        virt_mgmt::PRIMARY_FLEXIBLE_ALLOCATION,
        virt_mgmt::RESOURCE_VI,
        0,
        0,
    ));
    // Effective after a reset of the primary.
    e.reset().unwrap();
    host.admin = Queue::new(&host.dev, 0, 16, 16);
    host.start();
    let caps = host.identify(cns::PRIMARY_CONTROLLER_CAPS, 0);
    assert_eq!((le16(&caps, 40), le16(&caps, 72)), (0, 0));
    assert_eq!(
        host.admin(vm(virt_mgmt::SECONDARY_ONLINE, 0, 1, 0)).status(),
        Status::INVALID_SECONDARY_STATE
    );
    assert_eq!(
        host.admin_ok(vm(virt_mgmt::SECONDARY_ASSIGN, virt_mgmt::RESOURCE_VQ, 1, 2))
            .dw0,
        2
    );
    host.admin_ok(vm(virt_mgmt::SECONDARY_ASSIGN, virt_mgmt::RESOURCE_VI, 1, 1));
    assert_eq!(
        host.admin(vm(virt_mgmt::SECONDARY_ASSIGN, virt_mgmt::RESOURCE_VQ, 2, 7))
            .status(),
        Status::INVALID_RESOURCE_COUNT
    );
    host.admin_ok(vm(virt_mgmt::SECONDARY_ONLINE, 0, 1, 0));
    assert_eq!(
        host.admin(vm(virt_mgmt::SECONDARY_ASSIGN, virt_mgmt::RESOURCE_VQ, 1, 3))
            .status(),
        Status::INVALID_SECONDARY_STATE
    );
    assert_eq!(
        host.admin(vm(virt_mgmt::SECONDARY_ONLINE, 0, 3, 0)).status(),
        Status::INVALID_CONTROLLER_ID
    );
    assert_eq!(host.admin(vm(0xf, 0, 1, 0)).status(), Status::INVALID_FIELD);
    let list = spec::parse_secondary_controllers(&host.identify(cns::SECONDARY_CONTROLLERS, 0));
    assert_eq!((list[0].online, list[0].nvq, list[0].nvi), (true, 2, 1));
    // Offline gives the secondary's resources back (as QEMU does): assigned again before
    // it can be online again.
    host.admin_ok(vm(virt_mgmt::SECONDARY_OFFLINE, 0, 1, 0));
    let list = spec::parse_secondary_controllers(&host.identify(cns::SECONDARY_CONTROLLERS, 0));
    assert_eq!((list[0].online, list[0].nvq, list[0].nvi), (false, 0, 0));
    let caps = host.identify(cns::PRIMARY_CONTROLLER_CAPS, 0);
    assert_eq!((le32(&caps, 36), le32(&caps, 68)), (0, 0), "VQRFA, VIRFA");
    assert_eq!(
        host.admin(vm(virt_mgmt::SECONDARY_ONLINE, 0, 1, 0)).status(),
        Status::INVALID_SECONDARY_STATE
    );
    host.admin_ok(vm(virt_mgmt::SECONDARY_ASSIGN, virt_mgmt::RESOURCE_VQ, 1, 8));
    host.admin_ok(vm(virt_mgmt::SECONDARY_ASSIGN, virt_mgmt::RESOURCE_VQ, 1, 2));
    host.admin_ok(vm(virt_mgmt::SECONDARY_ASSIGN, virt_mgmt::RESOURCE_VI, 1, 1));
    host.admin_ok(vm(virt_mgmt::SECONDARY_ONLINE, 0, 1, 0));
    let from2 = spec::parse_secondary_controllers(&host.identify(cns::SECONDARY_CONTROLLERS | 2 << 16, 0));
    assert_eq!(from2.iter().map(|s| s.scid).collect::<Vec<_>>(), [2]);
    // A controller reset of the primary takes the secondaries offline.
    host.bar.write32(reg::CC, 0).unwrap();
    host.admin = Queue::new(&host.dev, 0, 16, 16);
    host.start();
    let list = spec::parse_secondary_controllers(&host.identify(cns::SECONDARY_CONTROLLERS, 0));
    assert!(!list[0].online);

    // Without SR-IOV the command does not exist.
    let (_, mut plain, _) = setup(EmuConfig::default());
    assert_eq!(
        plain.admin(vm(virt_mgmt::SECONDARY_ONLINE, 0, 1, 0)).status(),
        Status::INVALID_OPCODE
    );
    let mut cmd = Command::new(admin::IDENTIFY);
    cmd.cdw[0] = cns::SECONDARY_CONTROLLERS;
    assert_eq!(plain.admin(cmd).status(), Status::INVALID_FIELD);
}

#[test]
fn config_is_checked() {
    for cfg in [
        EmuConfig {
            mqes: 1,
            ..EmuConfig::default()
        },
        EmuConfig {
            namespaces: vec![NamespaceConfig::new(10, 1024)],
            ..EmuConfig::default()
        },
        EmuConfig {
            serial: "x".repeat(21),
            ..EmuConfig::default()
        },
        EmuConfig {
            msix_vectors: 0,
            ..EmuConfig::default()
        },
    ] {
        assert!(EmulatedNvme::new(cfg).is_err());
    }
}

fn metadata_namespace(metadata_size: u16, extended_lba: bool, protection: u8) -> NamespaceConfig {
    NamespaceConfig {
        metadata_size,
        extended_lba,
        protection,
        ..NamespaceConfig::new(1024, 512)
    }
}

// A Read or Write with PRINFO (CDW12 bits 29:26), the initial reference tag (CDW14) and a
// metadata pointer.
fn rw_pi(opcode: u8, lba: u64, blocks: u32, prp1: u64, prinfo: u32, ilbrt: u32, mptr: u64) -> Command {
    let mut cmd = rw(opcode, 1, lba, blocks, prp1, 0);
    cmd.cdw[2] |= prinfo;
    cmd.cdw[4] = ilbrt;
    cmd.mptr = mptr;
    cmd
}

#[test]
fn identify_namespace_reports_metadata_and_protection() {
    let mut ns = metadata_namespace(16, true, 2);
    ns.protection_first = true;
    let e = emu(EmuConfig {
        namespaces: vec![ns, NamespaceConfig::new(8, 4096)],
        ..EmuConfig::default()
    });
    let mut host = Host::enable(e);
    let id = IdentifyNamespace::parse(&host.identify(cns::NAMESPACE, 1)).unwrap();
    assert_eq!(
        (
            id.block_size(),
            id.metadata_size(),
            id.extended_lba(),
            id.protection_type(),
            id.protection_first()
        ),
        (Some(512), 16, true, 2, true)
    );
    let plain = IdentifyNamespace::parse(&host.identify(cns::NAMESPACE, 2)).unwrap();
    assert_eq!(
        (
            plain.block_size(),
            plain.metadata_size(),
            plain.extended_lba(),
            plain.protection_type()
        ),
        (Some(4096), 0, false, 0)
    );
}

#[test]
fn extended_lbas_move_data_and_metadata_through_the_prps() {
    let (e, host, mut q) = setup(EmuConfig {
        namespaces: vec![metadata_namespace(8, true, 0)],
        ..EmuConfig::default()
    });
    // Two blocks: 2 × (512 + 8) bytes, interleaved.
    let buf = e.alloc_dma(4096).unwrap();
    let host_bytes = pattern(2 * 520, 3);
    buf.write_at(0, &host_bytes).unwrap();
    assert!(
        host.exec(&mut q, rw(io::WRITE, 1, 10, 2, buf.iova(), 0))
            .status()
            .is_success()
    );
    assert_eq!(e.namespace_read(1, 10 * 512, 512).unwrap(), host_bytes[..512]);
    assert_eq!(e.namespace_read(1, 11 * 512, 512).unwrap(), host_bytes[520..1032]);
    assert_eq!(e.namespace_metadata(1, 10).unwrap(), host_bytes[512..520]);
    assert_eq!(e.namespace_metadata(1, 11).unwrap(), host_bytes[1032..1040]);
    // A driver that thinks in 512-byte blocks: 8 blocks fill its 4 KiB exactly, but the
    // controller moves 8 × 520 bytes, past the end of the buffer.
    let small = e.alloc_dma(4096).unwrap();
    let c = host.exec(&mut q, rw(io::READ, 1, 10, 8, small.iova(), 0));
    assert_eq!(c.status(), Status::DATA_TRANSFER_ERROR);
    assert_eq!(e.stats().bad_dma, 1);
}

#[test]
fn separate_metadata_moves_through_mptr() {
    let (e, host, mut q) = setup(EmuConfig {
        namespaces: vec![metadata_namespace(8, false, 0)],
        ..EmuConfig::default()
    });
    let buf = e.alloc_dma(4096).unwrap();
    let data = pattern(1024, 4);
    buf.write_at(0, &data).unwrap();
    // MPTR 0, as a driver that knows nothing of metadata leaves it: no DMA memory there.
    let c = host.exec(&mut q, rw(io::WRITE, 1, 0, 2, buf.iova(), 0));
    assert_eq!(c.status(), Status::DATA_TRANSFER_ERROR);
    assert_eq!(e.stats().bad_dma, 1);
    let meta = e.alloc_dma(4096).unwrap();
    meta.write_at(0, &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16])
        .unwrap();
    let c = host.exec(&mut q, rw_pi(io::WRITE, 0, 2, buf.iova(), 0, 0, meta.iova()));
    assert!(c.status().is_success());
    assert_eq!(e.namespace_read(1, 0, 1024).unwrap(), data);
    assert_eq!(
        e.namespace_metadata(1, 1).unwrap(),
        [9, 10, 11, 12, 13, 14, 15, 16]
    );
    let back = e.alloc_dma(4096).unwrap();
    let c = host.exec(&mut q, rw_pi(io::READ, 0, 2, back.iova(), 0, 0, meta.iova() + 64));
    assert!(c.status().is_success());
    let mut got = [0u8; 16];
    meta.read_at(64, &mut got).unwrap();
    assert_eq!(got, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]);
    assert_eq!(e.stats().bad_dma, 1);
}

#[test]
fn protection_information_is_checked_inserted_and_stripped() {
    use spec::prinfo::{PRACT, PRCHK_GUARD, PRCHK_REF};
    let (e, host, mut q) = setup(EmuConfig {
        namespaces: vec![metadata_namespace(8, false, 1)],
        ..EmuConfig::default()
    });
    let buf = e.alloc_dma(4096).unwrap();
    let data = pattern(1024, 5);
    buf.write_at(0, &data).unwrap();
    let meta = e.alloc_dma(4096).unwrap();
    // PRACT 0: the host's protection information (zeros here) is checked and fails.
    let check = PRCHK_GUARD | PRCHK_REF;
    let c = host.exec(&mut q, rw_pi(io::WRITE, 7, 2, buf.iova(), check, 7, meta.iova()));
    assert_eq!(c.status(), Status::GUARD_CHECK_ERROR);
    // Valid protection information passes.
    for k in 0..2usize {
        let mut pi = [0u8; 8];
        pi[0..2].copy_from_slice(&spec::crc16_t10dif(&data[k * 512..(k + 1) * 512]).to_be_bytes());
        pi[4..8].copy_from_slice(&(7 + k as u32).to_be_bytes());
        meta.write_at(8 * k, &pi).unwrap();
    }
    let c = host.exec(&mut q, rw_pi(io::WRITE, 7, 2, buf.iova(), check, 7, meta.iova()));
    assert!(c.status().is_success());
    // Type 1: the initial reference tag must be the LBA's.
    let c = host.exec(&mut q, rw_pi(io::WRITE, 7, 2, buf.iova(), check, 8, meta.iova()));
    assert_eq!(c.status(), Status::INVALID_PROTECTION_INFO);
    // PRACT 1 with 8 bytes of metadata: no metadata travels (MPTR 0 is never touched); the
    // controller generates it.
    let bad_dma = e.stats().bad_dma;
    let c = host.exec(
        &mut q,
        rw_pi(io::WRITE, 100, 2, buf.iova(), PRACT | check, 100, 0),
    );
    assert!(c.status().is_success());
    let pi = e.namespace_metadata(1, 101).unwrap();
    assert_eq!(pi[0..2], spec::crc16_t10dif(&data[512..]).to_be_bytes());
    assert_eq!(pi[4..8], 101u32.to_be_bytes());
    let back = e.alloc_dma(4096).unwrap();
    let c = host.exec(
        &mut q,
        rw_pi(io::READ, 100, 2, back.iova(), PRACT | check, 100, 0),
    );
    assert!(c.status().is_success());
    let mut got = vec![0u8; 1024];
    back.read_at(0, &mut got).unwrap();
    assert_eq!(got, data);
    assert_eq!(e.stats().bad_dma, bad_dma);
    // Data changed behind the protection information: the guard check catches it.
    e.namespace_write(1, 100 * 512, &[0xee; 4]).unwrap();
    let c = host.exec(
        &mut q,
        rw_pi(io::READ, 100, 1, back.iova(), PRACT | check, 100, 0),
    );
    assert_eq!(c.status(), Status::GUARD_CHECK_ERROR);
    // Blocks never written carry the escape tag: not checked.
    let c = host.exec(
        &mut q,
        rw_pi(io::READ, 500, 2, back.iova(), PRACT | check, 500, 0),
    );
    assert!(c.status().is_success());
    // Write Zeroes with PRACT leaves valid protection information.
    let mut wz = rw(io::WRITE_ZEROES, 1, 200, 4, 0, 0);
    wz.cdw[2] |= PRACT;
    wz.cdw[4] = 200;
    assert!(host.exec(&mut q, wz).status().is_success());
    let c = host.exec(
        &mut q,
        rw_pi(io::READ, 200, 4, back.iova(), PRACT | check, 200, 0),
    );
    assert!(c.status().is_success());
}

#[test]
fn oncs_and_the_nvm_command_set_limits_are_reported_and_enforced() {
    let (e, mut host, mut q) = setup(EmuConfig {
        oncs: 0,
        wzsl: 1,
        dmrl: 2,
        dmrsl: 16,
        dmsl: 20,
        ..EmuConfig::default()
    });
    let id = IdentifyController::parse(&host.identify(cns::CONTROLLER, 0)).unwrap();
    assert_eq!(id.oncs, 0);
    let mut cmd = Command::new(admin::IDENTIFY);
    let buf = e.alloc_dma(4096).unwrap();
    cmd.prp1 = buf.iova();
    cmd.cdw[0] = cns::IO_CONTROLLER;
    host.admin_ok(cmd);
    let mut b = vec![0u8; 4096];
    buf.read_at(0, &mut b).unwrap();
    let nvm = spec::IdentifyControllerNvm::parse(&b).unwrap();
    assert_eq!((nvm.wzsl, nvm.dmrl, nvm.dmrsl, nvm.dmsl), (1, 2, 16, 20));
    cmd.cdw[1] = 2 << 24; // another command set
    assert_eq!(host.admin(cmd).status(), Status::INVALID_FIELD);
    assert_eq!(
        host.exec(&mut q, rw(io::WRITE_ZEROES, 1, 0, 1, 0, 0)).status(),
        Status::INVALID_OPCODE
    );
    let mut dsm = Command::new(io::DATASET_MANAGEMENT);
    dsm.nsid = 1;
    dsm.prp1 = buf.iova();
    dsm.cdw[1] = spec::dsm::DEALLOCATE;
    assert_eq!(host.exec(&mut q, dsm).status(), Status::INVALID_OPCODE);

    let (e, host, mut q) = setup(EmuConfig {
        wzsl: 1,
        dmrl: 2,
        dmrsl: 16,
        dmsl: 20,
        ..EmuConfig::default()
    });
    // WZSL 1: 8 KiB, 16 blocks.
    assert!(
        host.exec(&mut q, rw(io::WRITE_ZEROES, 1, 0, 16, 0, 0))
            .status()
            .is_success()
    );
    assert_eq!(
        host.exec(&mut q, rw(io::WRITE_ZEROES, 1, 0, 17, 0, 0)).status(),
        Status::INVALID_FIELD
    );
    let ranges = e.alloc_dma(4096).unwrap();
    let mut dsm = Command::new(io::DATASET_MANAGEMENT);
    dsm.nsid = 1;
    dsm.prp1 = ranges.iova();
    dsm.cdw[1] = spec::dsm::DEALLOCATE;
    let mut set = |ranges_: &[(u64, u32)]| {
        for (i, (slba, nlb)) in ranges_.iter().enumerate() {
            ranges.write_at(i * 16 + 4, &nlb.to_le_bytes()).unwrap();
            ranges.write_at(i * 16 + 8, &slba.to_le_bytes()).unwrap();
        }
        dsm.cdw[0] = ranges_.len() as u32 - 1;
        dsm
    };
    for (r, want) in [
        (&[(0u64, 16u32)][..], Status::SUCCESS),
        (&[(0, 17)][..], Status::INVALID_FIELD),                // DMRSL
        (&[(0, 10), (20, 11)][..], Status::INVALID_FIELD),      // DMSL
        (&[(0, 1), (2, 1), (4, 1)][..], Status::INVALID_FIELD), // DMRL
        (&[(0, 10), (20, 10)][..], Status::SUCCESS),
    ] {
        let cmd = set(r);
        assert_eq!(host.exec(&mut q, cmd).status(), want, "{r:?}");
    }
}

#[test]
fn ready_timeouts_of_nvme_2() {
    let e = emu(EmuConfig {
        crto: Some(0x0010_0400),
        ..EmuConfig::default()
    });
    let bar = e.map_bar(0).unwrap();
    let cap = Cap(bar.read64(reg::CAP).unwrap());
    assert!(cap.crwms() && cap.crims());
    assert_eq!(cap.timeout_ms(), 255 * 500, "CAP.TO is min(CRWMT, 255)");
    assert_eq!(bar.read32(reg::CRTO).unwrap(), 0x0010_0400);
    assert_eq!(cap.ready_timeout_ms(bar.read32(reg::CRTO).unwrap()), 0x400 * 500);
    let plain = emu(EmuConfig::default()).map_bar(0).unwrap();
    assert!(!Cap(plain.read64(reg::CAP).unwrap()).crwms());
    assert_eq!(plain.read32(reg::CRTO).unwrap(), 0);
}

#[test]
fn active_namespace_lists_come_in_pages_of_1024() {
    let e = emu(EmuConfig {
        namespaces: vec![NamespaceConfig::new(8, 512); 1030],
        ..EmuConfig::default()
    });
    let mut host = Host::enable(e);
    let first = spec::parse_namespace_list(&host.identify(cns::ACTIVE_NAMESPACES, 0));
    assert_eq!((first.len(), first[0], first[1023]), (1024, 1, 1024));
    let rest = spec::parse_namespace_list(&host.identify(cns::ACTIVE_NAMESPACES, 1024));
    assert_eq!(rest, (1025..=1030).collect::<Vec<u32>>());
}

#[test]
fn a_queue_grant_limit_applies_from_the_next_set_features() {
    let e = emu(EmuConfig::default());
    let mut host = Host::enable(e.clone());
    e.limit_io_queues(2);
    let mut cmd = Command::new(admin::SET_FEATURES);
    cmd.cdw[0] = u32::from(feature::NUMBER_OF_QUEUES);
    cmd.cdw[1] = 7 << 16 | 7;
    assert_eq!(host.admin_ok(cmd).dw0, 1 << 16 | 1);
    let q = Queue::new(&e, 3, 4, 4);
    let c = host.admin(Host::<EmulatedNvme>::create_cq_cmd(3, 4, q.cq.iova(), None));
    assert_eq!(c.status(), Status::INVALID_QUEUE_ID);
}

#[test]
fn a_fatal_error_during_shutdown_never_reports_it_complete() {
    let (e, host, _q) = setup(EmuConfig::default());
    e.inject(Fault::FatalOnShutdown);
    let value = host.bar.read32(reg::CC).unwrap();
    host.bar.write32(reg::CC, value | cc::SHN_NORMAL).unwrap();
    eventually("CSTS.CFS", || host.csts() & csts::CFS != 0);
    assert_eq!(host.csts() & csts::SHST_MASK, 0);
    // A reset clears it, and the next shutdown completes.
    host.disable();
    assert_eq!(host.csts(), 0);
    host.start();
    let value = host.bar.read32(reg::CC).unwrap();
    host.bar.write32(reg::CC, value | cc::SHN_NORMAL).unwrap();
    eventually("SHST complete", || {
        host.csts() & csts::SHST_MASK == csts::SHST_COMPLETE
    });
}

fn small_namespace() -> EmuConfig {
    EmuConfig {
        namespaces: vec![NamespaceConfig::new(512, 512)],
        ..EmuConfig::default()
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Writes and reads of random LBA ranges give what a plain Vec gives.
    #[test]
    fn reads_match_a_model(ops in proptest::collection::vec((any::<bool>(), 0u64..512, 1u32..64, any::<u8>()), 1..24)) {
        let (e, host, mut q) = setup(small_namespace());
        let buf = e.alloc_dma(64 * 512).unwrap();
        let list = e.alloc_dma(4096).unwrap();
        let pages: Vec<u64> = (1..8).map(|i| buf.iova() + i * 4096).collect();
        prp_list(&list, 0, &pages);
        let mut model = vec![0u8; 512 * 512];
        for (write, lba, blocks, seed) in ops {
            let blocks = blocks.min(512 - lba as u32);
            let len = blocks as usize * 512;
            let prp2 = if len > 8192 { list.iova() } else { buf.iova() + 4096 };
            let range = lba as usize * 512..lba as usize * 512 + len;
            if write {
                let data = pattern(len, seed);
                buf.write_at(0, &data).unwrap();
                let c = host.exec(&mut q, rw(io::WRITE, 1, lba, blocks, buf.iova(), prp2));
                prop_assert!(c.status().is_success());
                model[range].copy_from_slice(&data);
            } else {
                buf.fill(0, len, 0xee).unwrap();
                let c = host.exec(&mut q, rw(io::READ, 1, lba, blocks, buf.iova(), prp2));
                prop_assert!(c.status().is_success());
                let mut got = vec![0u8; len];
                buf.read_at(0, &mut got).unwrap();
                prop_assert_eq!(&got[..], &model[range]);
            }
        }
        prop_assert_eq!(e.namespace_read(1, 0, model.len()).unwrap(), model);
        prop_assert_eq!(e.stats().bad_dma, 0);
    }

    /// Garbage in the queues gets a completion for every entry, never a panic or a hang;
    /// the controller still works afterwards.
    #[test]
    fn garbage_commands_are_answered(entries in proptest::collection::vec(proptest::array::uniform32(any::<u8>()), 1..12), admin_side in any::<bool>()) {
        let (e, mut host, mut q) = setup(small_namespace());
        let scratch = e.alloc_dma(4096).unwrap();
        for half in entries {
            let mut b = [0u8; 64];
            b[..32].copy_from_slice(&half);
            b[32..].copy_from_slice(&half);
            let mut cmd = Command::from_bytes(&b);
            // Keep out of what would take the controller down on purpose.
            if admin_side && matches!(cmd.opcode, admin::ASYNC_EVENT | admin::DELETE_SQ | admin::DELETE_CQ) {
                cmd.opcode = 0xff;
            }
            if cmd.opcode.is_multiple_of(3) {
                cmd.prp1 = scratch.iova() + (cmd.prp1 & 0xffc);
            }
            if admin_side {
                host.admin(cmd);
            } else {
                host.exec(&mut q, cmd);
            }
        }
        let id = IdentifyController::parse(&host.identify(cns::CONTROLLER, 0)).unwrap();
        prop_assert_eq!(id.nn, 1);
    }

    /// Register writes of any value at any offset never panic.
    #[test]
    fn register_writes_never_panic(writes in proptest::collection::vec((0u64..0x1100, any::<u32>()), 1..40)) {
        let e = emu(small_namespace());
        let bar = e.map_bar(0).unwrap();
        for (offset, value) in writes {
            let _ = bar.write32(offset & !3, value);
            let _ = bar.read32(offset & !3);
            let _ = bar.write64(offset & !7, u64::from(value) << 13);
        }
        bar.write32(reg::CC, 0).unwrap();
        prop_assert_eq!(bar.read32(reg::CSTS).unwrap() & csts::RDY, 0);
    }
}

// ---- SGLs (EmuConfig::sgl)

// `cmd` with PSDT 01b and the descriptor (`addr`, `len`, `kind`) as its data pointer.
fn with_sgl(mut cmd: Command, addr: u64, len: u32, kind: u8) -> Command {
    cmd.flags = spec::sgl::PSDT_SGL;
    (cmd.prp1, cmd.prp2) = spec::sgl::dptr(addr, len, kind);
    cmd
}

// Writes `descs` (address, length, type) as an SGL segment into `list` at `at`.
fn sgl_list(
    list: &impl std::ops::Deref<Target = pcibus::vfio::DmaBuffer>,
    at: usize,
    descs: &[(u64, u32, u8)],
) {
    for (i, &(a, l, k)) in descs.iter().enumerate() {
        list.write_at(at + 16 * i, &spec::sgl::descriptor(a, l, k))
            .unwrap();
    }
}

#[test]
fn sgl_data_blocks_segments_and_last_segments_move_the_data() {
    use spec::sgl::{DATA_BLOCK, LAST_SEGMENT, SEGMENT};
    let (e, mut host, mut q) = setup(EmuConfig {
        sgl: true,
        ..EmuConfig::default()
    });
    let id = IdentifyController::parse(&host.identify(cns::CONTROLLER, 0)).unwrap();
    assert_eq!(id.sgls & 3, 1);
    assert!(spec::sgl::supported(id.sgls));
    let buf = e.alloc_dma(16384).unwrap();
    let list = e.alloc_dma(4096).unwrap();
    // One Data Block at an odd address: SGLS 01b has no alignment rule.
    let data = pattern(1536, 1);
    buf.write_at(3, &data).unwrap();
    let c = host.exec(
        &mut q,
        with_sgl(rw(io::WRITE, 1, 10, 3, 0, 0), buf.iova() + 3, 1536, DATA_BLOCK),
    );
    assert_eq!(c.status(), Status::SUCCESS);
    assert_eq!(e.namespace_read(1, 10 * 512, 1536).unwrap(), data);
    // A Last Segment of three Data Blocks of any lengths.
    let data = pattern(1536, 2);
    buf.write_at(4097, &data[..100]).unwrap();
    buf.write_at(8190, &data[100..1100]).unwrap();
    buf.write_at(13, &data[1100..]).unwrap();
    let b = buf.iova();
    sgl_list(
        &list,
        0,
        &[
            (b + 4097, 100, DATA_BLOCK),
            (b + 8190, 1000, DATA_BLOCK),
            (b + 13, 436, DATA_BLOCK),
        ],
    );
    let c = host.exec(
        &mut q,
        with_sgl(rw(io::WRITE, 1, 20, 3, 0, 0), list.iova(), 48, LAST_SEGMENT),
    );
    assert_eq!(c.status(), Status::SUCCESS);
    assert_eq!(e.namespace_read(1, 20 * 512, 1536).unwrap(), data);
    // A Segment (two Data Blocks, then a Last Segment of one) reading it back scattered.
    let out = e.alloc_dma(4096).unwrap();
    let o = out.iova();
    sgl_list(
        &list,
        1024,
        &[
            (o + 1, 500, DATA_BLOCK),
            (o + 1000, 36, DATA_BLOCK),
            (list.iova() + 2048, 16, LAST_SEGMENT),
        ],
    );
    sgl_list(&list, 2048, &[(o + 2000, 1000, DATA_BLOCK)]);
    let c = host.exec(
        &mut q,
        with_sgl(rw(io::READ, 1, 20, 3, 0, 0), list.iova() + 1024, 48, SEGMENT),
    );
    assert_eq!(c.status(), Status::SUCCESS);
    let mut back = vec![0u8; 1536];
    out.read_at(1, &mut back[..500]).unwrap();
    out.read_at(1000, &mut back[500..536]).unwrap();
    out.read_at(2000, &mut back[536..]).unwrap();
    assert_eq!(back, data);
    assert_eq!(e.stats().sgl_commands, 3);
    assert_eq!(e.stats().bad_dma, 0);
}

#[test]
fn malformed_sgls_fail_with_the_specifications_status() {
    use spec::sgl::{BIT_BUCKET, DATA_BLOCK, LAST_SEGMENT, SEGMENT};
    let (e, mut host, mut q) = setup(EmuConfig {
        sgl: true,
        ..EmuConfig::default()
    });
    let buf = e.alloc_dma(8192).unwrap();
    let list = e.alloc_dma(4096).unwrap();
    let (b, l) = (buf.iova(), list.iova());
    let read2 = || rw(io::READ, 1, 0, 2, 0, 0); // 1,024 bytes
    // Lists: at 0 a good Last Segment list (two Data Blocks of 512); at 256 one holding a
    // Segment descriptor; at 512 a Segment list not ending in a segment descriptor; at 768
    // a Segment list pointing at itself; at 1024 one with a Bit Bucket.
    sgl_list(&list, 0, &[(b, 512, DATA_BLOCK), (b + 4096, 512, DATA_BLOCK)]);
    sgl_list(&list, 256, &[(b, 512, DATA_BLOCK), (l, 32, SEGMENT)]);
    sgl_list(&list, 512, &[(b, 512, DATA_BLOCK), (b + 4096, 512, DATA_BLOCK)]);
    sgl_list(&list, 768, &[(b, 0, DATA_BLOCK), (l + 768, 32, SEGMENT)]);
    sgl_list(&list, 1024, &[(b, 512, BIT_BUCKET), (b, 512, DATA_BLOCK)]);
    let mut subtype = with_sgl(read2(), b, 1024, DATA_BLOCK);
    subtype.prp2 |= 1 << 56;
    let cases = [
        (with_sgl(read2(), l, 32, LAST_SEGMENT), Status::SUCCESS),
        (
            with_sgl(read2(), b, 1024, BIT_BUCKET),
            Status::SGL_DESCRIPTOR_TYPE_INVALID,
        ),
        (
            with_sgl(read2(), b, 1024, 0x4),
            Status::SGL_DESCRIPTOR_TYPE_INVALID,
        ),
        (subtype, Status::SGL_DESCRIPTOR_TYPE_INVALID),
        (
            with_sgl(read2(), l + 1024, 32, LAST_SEGMENT),
            Status::SGL_DESCRIPTOR_TYPE_INVALID,
        ),
        // Lengths against the transfer: short, long, and a list short of it.
        (
            with_sgl(read2(), b, 512, DATA_BLOCK),
            Status::DATA_SGL_LENGTH_INVALID,
        ),
        (
            with_sgl(read2(), b, 1536, DATA_BLOCK),
            Status::DATA_SGL_LENGTH_INVALID,
        ),
        (
            with_sgl(read2(), l, 16, LAST_SEGMENT),
            Status::DATA_SGL_LENGTH_INVALID,
        ),
        // Segment descriptors: bad lengths, a misaligned list, one in a Last Segment, a
        // Segment list without one at its end.
        (
            with_sgl(read2(), l, 24, LAST_SEGMENT),
            Status::INVALID_SGL_SEGMENT_DESCRIPTOR,
        ),
        (
            with_sgl(read2(), l, 0, LAST_SEGMENT),
            Status::INVALID_SGL_SEGMENT_DESCRIPTOR,
        ),
        (
            with_sgl(read2(), l + 4, 32, LAST_SEGMENT),
            Status::INVALID_SGL_SEGMENT_DESCRIPTOR,
        ),
        (
            with_sgl(read2(), l + 256, 32, LAST_SEGMENT),
            Status::INVALID_SGL_SEGMENT_DESCRIPTOR,
        ),
        (
            with_sgl(read2(), l + 512, 32, SEGMENT),
            Status::INVALID_SGL_SEGMENT_DESCRIPTOR,
        ),
        // A loop.
        (
            with_sgl(read2(), l + 768, 32, SEGMENT),
            Status::INVALID_SGL_DESCRIPTOR_COUNT,
        ),
    ];
    for (cmd, want) in cases {
        assert_eq!(host.exec(&mut q, cmd).status(), want, "{cmd:?}");
    }
    assert_eq!(e.stats().bad_dma, 0);
    // A Data Block outside DMA memory.
    let c = host.exec(&mut q, with_sgl(read2(), 0x1000, 1024, DATA_BLOCK));
    assert_eq!(c.status(), Status::DATA_TRANSFER_ERROR);
    assert_eq!(e.stats().bad_dma, 1);
    // PSDT 10b (a metadata SGL) and 11b, and an SGL on an admin command.
    for psdt in [0x80, 0xc0] {
        let mut cmd = with_sgl(read2(), b, 1024, DATA_BLOCK);
        cmd.flags = psdt;
        assert_eq!(host.exec(&mut q, cmd).status(), Status::INVALID_FIELD);
    }
    let mut identify = with_sgl(Command::new(admin::IDENTIFY), b, 4096, DATA_BLOCK);
    identify.cdw[0] = cns::CONTROLLER;
    assert_eq!(host.admin(identify).status(), Status::INVALID_FIELD);
}
