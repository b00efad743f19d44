//! Controller bring-up, the admin queue, namespaces, and what every queue shares.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::eventfd::{EfdFlags, EventFd};
use parking_lot::Mutex;
use std::os::fd::AsFd;

use super::io::IoQueue;
use super::queue::{Doorbells, Ring, Shadow};
use super::spec::{
    self, Cap, Command, Completion, IdentifyController, IdentifyNamespace, Status, admin, cc, cns, csts,
    feature, oacs, reg,
};
use super::{Dma, NvmeError};
use crate::addr::PciAddress;
use crate::bus::backing::{DeviceBacking, DmaMemory, RegisterIo};

/// PCI Command register: Memory Space Enable and Bus Master Enable.
const COMMAND_MEMORY: u16 = 1 << 1;
const COMMAND_MASTER: u16 = 1 << 2;

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
    /// so a queue can sleep until a completion ([`IoQueue::wait`]) instead of spinning.
    pub interrupts: bool,
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
        }
    }
}

/// A namespace, as Identify Namespace describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Namespace {
    /// Its ID.
    pub nsid: u32,
    /// Size in blocks.
    pub blocks: u64,
    /// Block size in bytes (512, 4096, ...).
    pub block_size: u32,
    /// The Identify data.
    pub identify: IdentifyNamespace,
}

impl Namespace {
    /// Size in bytes.
    pub fn bytes(&self) -> u64 {
        self.blocks.saturating_mul(u64::from(self.block_size))
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
    /// I/O queue pairs granted.
    pub io_queues: u16,
    /// Whether shadow doorbells are in use.
    pub shadow_doorbells: bool,
    /// MSI-X vectors routed to eventfds (0: polled only). Vector 0 is the admin queue's.
    pub interrupt_vectors: u32,
}

// The admin queue.
struct Admin<B: DeviceBacking> {
    ring: Ring<Dma<B>>,
    regs: Option<B::Registers>,
    next_cid: u16,
}

// One queue's registers, which `revoke` takes away.
pub(crate) type QueueRegs<B> = Arc<QueueRegsCell<B>>;
pub(crate) type QueueRegsCell<B> = Mutex<Option<<B as DeviceBacking>::Registers>>;

pub(crate) struct Shared<B: DeviceBacking> {
    pub(crate) info: ControllerInfo,
    pub(crate) namespaces: Vec<Namespace>,
    pub(crate) shadow: Option<Shadow<Dma<B>>>,
    pub(crate) io_timeout: Duration,
    // One eventfd per MSI-X vector routed (empty: polled only).
    pub(crate) interrupts: Vec<EventFd>,
    admin_timeout: Duration,
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
}

impl<B: DeviceBacking> Shared<B> {
    pub(crate) fn removed(&self) -> Option<NvmeError> {
        self.revoked
            .load(Ordering::Acquire)
            .then(|| NvmeError::Removed(self.reason.lock().clone()))
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

    /// Namespace `nsid`: a binary search (the list is sorted by NSID at bring-up), as each
    /// I/O request looks its namespace up.
    pub(crate) fn namespace(&self, nsid: u32) -> Option<&Namespace> {
        self.namespaces
            .binary_search_by_key(&nsid, |n| n.nsid)
            .ok()
            .map(|i| &self.namespaces[i])
    }

    pub(crate) fn backing(&self) -> Result<B, NvmeError> {
        match &*self.backing.lock() {
            Some(b) => Ok(b.clone()),
            None => Err(self.removed().unwrap_or(NvmeError::Removed("revoked".into()))),
        }
    }

    /// Runs one admin command and waits for it.
    pub(crate) fn admin(&self, mut cmd: Command, what: &str) -> Result<Completion, NvmeError> {
        if let Some(e) = self.removed() {
            return Err(e);
        }
        let mut a = self.admin.lock();
        let Admin { ring, regs, next_cid } = &mut *a;
        let Some(regs) = regs.as_ref() else {
            return Err(self.removed().unwrap_or(NvmeError::Removed("revoked".into())));
        };
        cmd.cid = *next_cid;
        *next_cid = next_cid.wrapping_add(1);
        if !ring.push(&cmd) {
            return Err(NvmeError::Invalid("admin queue full".into()));
        }
        ring.ring_sq(regs, None)?;
        let start = Instant::now();
        let mut spins = 0u32;
        loop {
            while let Some(c) = ring.pop() {
                if c.cid != cmd.cid {
                    // A stray completion (a command abandoned after its timeout).
                    log::debug!(
                        "{}: admin completion for cid {} ignored",
                        self.info.address,
                        c.cid
                    );
                    continue;
                }
                ring.ring_cq(regs, None)?;
                let status = c.status();
                return if status.is_success() {
                    Ok(c)
                } else {
                    Err(NvmeError::Command {
                        command: what.to_owned(),
                        status,
                    })
                };
            }
            if let Some(e) = self.removed() {
                return Err(e);
            }
            if start.elapsed() > self.admin_timeout {
                check_status(regs)?;
                return Err(NvmeError::Timeout {
                    what: what.to_owned(),
                    waited: self.admin_timeout,
                });
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
        }
    }

    /// Sends Abort for command `cid` of submission queue `sqid` without waiting for its
    /// answer (completions of earlier aborts are dropped here, and by `admin`).
    pub(crate) fn abort_nowait(&self, sqid: u16, cid: u16) {
        let mut a = self.admin.lock();
        let Admin { ring, regs, next_cid } = &mut *a;
        let Some(regs) = regs.as_ref() else { return };
        while ring.pop().is_some() {}
        let _ = ring.ring_cq(regs, None);
        let mut cmd = Command::new(admin::ABORT);
        cmd.cid = *next_cid;
        *next_cid = next_cid.wrapping_add(1);
        cmd.cdw[0] = u32::from(sqid) | u32::from(cid) << 16;
        if ring.push(&cmd) {
            let _ = ring.ring_sq(regs, None);
        }
    }

    /// Resets the controller (CC.EN 1 → 0 → 1, the admin queue set up again) and
    /// configures it again (queue count, shadow doorbells). Every I/O queue is gone on the
    /// controller; each creates itself again at its next use, ending what it had
    /// outstanding with [`NvmeError::Reset`].
    pub(crate) fn reset(&self, why: &str) -> Result<(), NvmeError> {
        use crate::bus::backing::DmaMemory;
        if let Some(e) = self.removed() {
            return Err(e);
        }
        let cap = self.info.cap;
        log::warn!("{}: resetting the controller: {why}", self.info.address);
        {
            let mut a = self.admin.lock();
            let Admin { ring, regs, next_cid } = &mut *a;
            let Some(regs) = regs.as_ref() else {
                return Err(self.removed().unwrap_or(NvmeError::Removed("revoked".into())));
            };
            let cc_now = regs.read32(reg::CC)?;
            if cc_now == u32::MAX {
                return Err(NvmeError::Gone);
            }
            regs.write32(reg::CC, cc_now & !(cc::EN | cc::SHN_MASK))?;
            wait_ready(regs, false, cap, "reset: controller disable (CSTS.RDY = 0)")?;
            ring.reset();
            *next_cid = 0;
            enable(regs, ring, cap, "reset: controller enable (CSTS.RDY = 1)")?;
        }
        let n = self.info.io_queues;
        let mut cmd = Command::new(admin::SET_FEATURES);
        cmd.cdw[0] = u32::from(feature::NUMBER_OF_QUEUES);
        cmd.cdw[1] = u32::from(n - 1) << 16 | u32::from(n - 1);
        self.admin(cmd, "Set Features (Number of Queues) after reset")?;
        if let Some(s) = &self.shadow {
            s.doorbells.zero();
            s.events.zero();
            let mut cmd = Command::new(admin::DOORBELL_BUFFER_CONFIG);
            cmd.prp1 = s.doorbells.iova();
            cmd.prp2 = s.events.iova();
            self.admin(cmd, "Doorbell Buffer Config after reset")?;
        }
        self.generation.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    pub(crate) fn alloc_qid(&self) -> Option<u16> {
        let mut q = self.qids.lock();
        let free = q.iter().skip(1).position(|used| !used)? + 1;
        q[free] = true;
        Some(free as u16)
    }

    pub(crate) fn free_qid(&self, qid: u16) {
        if let Some(slot) = self.qids.lock().get_mut(usize::from(qid)) {
            *slot = false;
        }
    }

    pub(crate) fn register_queue(&self, regs: &QueueRegs<B>) {
        let mut list = self.queue_regs.lock();
        list.retain(|w| w.strong_count() > 0);
        list.push(Arc::downgrade(regs));
    }
}

// Points a disabled controller at the admin queue `ring`, enables it (4 KiB pages, NVM
// command set, 64/16-byte entries) and waits until it is ready.
fn enable<R: RegisterIo, D: DmaMemory>(
    regs: &R,
    ring: &Ring<D>,
    cap: Cap,
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
    wait_ready(regs, true, cap, what)
}

// Sets and clears bits of the PCI Command register.
fn update_command<B: DeviceBacking>(backing: &B, set: u16, clear: u16) -> Result<(), NvmeError> {
    let mut command = [0u8; 2];
    backing.read_config(4, &mut command)?;
    let command = u16::from_le_bytes(command) & !clear | set;
    backing.write_config(4, &command.to_le_bytes())?;
    Ok(())
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
            .field("namespaces", &self.shared.namespaces.len())
            .field("revoked", &self.shared.revoked.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

fn wait_ready<R: RegisterIo>(regs: &R, ready: bool, cap: Cap, what: &str) -> Result<(), NvmeError> {
    let limit = Duration::from_millis(cap.timeout_ms().max(500));
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
        update_command(&backing, COMMAND_MEMORY | COMMAND_MASTER, 0)?;
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
        // Disable: an enabled controller that is not ready yet must become ready first.
        let cc_now = regs.read32(reg::CC)?;
        if cc_now & cc::EN != 0 {
            if regs.read32(reg::CSTS)? & csts::RDY == 0 {
                wait_ready(&regs, true, cap, "controller ready before disabling")?;
            }
            regs.write32(reg::CC, cc_now & !cc::EN)?;
        }
        wait_ready(&regs, false, cap, "controller disable (CSTS.RDY = 0)")?;

        let depth = options
            .admin_depth
            .clamp(2, 4096)
            .min(cap.max_queue_entries().min(4096) as u16);
        let sq = backing.alloc_dma(usize::from(depth) * Command::SIZE)?;
        let cq = backing.alloc_dma(usize::from(depth) * Completion::SIZE)?;
        let ring = Ring::new(0, depth, sq, cq, Doorbells::of(cap, 0));
        enable(&regs, &ring, cap, "controller enable (CSTS.RDY = 1)")?;

        let mut shared = Shared {
            info: ControllerInfo {
                address,
                cap,
                version,
                identify: IdentifyController::parse(&[0u8; 4096])?,
                max_transfer: 0,
                io_queues: 0,
                shadow_doorbells: false,
                interrupt_vectors: 0,
            },
            namespaces: Vec::new(),
            shadow: None,
            interrupts: Vec::new(),
            io_timeout: options.io_timeout,
            admin_timeout: options.admin_timeout,
            backing: Mutex::new(None),
            admin: Mutex::new(Admin {
                ring,
                regs: Some(regs),
                next_cid: 0,
            }),
            qids: Mutex::new(Vec::new()),
            queue_regs: Mutex::new(Vec::new()),
            revoked: AtomicBool::new(false),
            removing: Mutex::new(None),
            reason: Mutex::new(String::new()),
            generation: AtomicU64::new(0),
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
        let list = spec::parse_namespace_list(&identify::<B>(
            &run,
            &buf,
            cns::ACTIVE_NAMESPACES,
            0,
            "Identify active namespace list",
        )?);
        let mut namespaces = Vec::new();
        for nsid in list {
            let ns = IdentifyNamespace::parse(&identify::<B>(
                &run,
                &buf,
                cns::NAMESPACE,
                nsid,
                &format!("Identify namespace {nsid}"),
            )?)?;
            match ns.block_size() {
                Some(bs) if ns.nsze > 0 => namespaces.push(Namespace {
                    nsid,
                    blocks: ns.nsze,
                    block_size: bs,
                    identify: ns,
                }),
                _ => log::warn!("{address}: namespace {nsid} left out: no usable LBA format or size 0"),
            }
        }
        let want = options.io_queues.clamp(1, 65534);
        let mut cmd = Command::new(admin::SET_FEATURES);
        cmd.cdw[0] = u32::from(feature::NUMBER_OF_QUEUES);
        cmd.cdw[1] = u32::from(want - 1) << 16 | u32::from(want - 1);
        let c = run(cmd, "Set Features (Number of Queues)")?;
        let granted = want
            .min((c.dw0 & 0xffff) as u16 + 1)
            .min((c.dw0 >> 16) as u16 + 1);
        let mut shadow = None;
        if options.shadow_doorbells && id.oacs & oacs::DOORBELL_BUFFER_CONFIG != 0 {
            let doorbells = backing.alloc_dma(PAGE as usize)?;
            let events = backing.alloc_dma(PAGE as usize)?;
            let mut cmd = Command::new(admin::DOORBELL_BUFFER_CONFIG);
            cmd.prp1 = doorbells.iova();
            cmd.prp2 = events.iova();
            match run(cmd, "Doorbell Buffer Config") {
                Ok(_) => shadow = Some(Shadow { doorbells, events }),
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
        shared.info.io_queues = granted;
        shared.info.shadow_doorbells = shadow.is_some();
        shared.info.interrupt_vectors = interrupts.len() as u32;
        shared.interrupts = interrupts;
        // Sorted for `Shared::namespace` (the controller lists them in increasing order;
        // nothing relies on it).
        namespaces.sort_by_key(|n| n.nsid);
        namespaces.dedup_by_key(|n| n.nsid);
        shared.namespaces = namespaces;
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

    /// The active namespaces with a usable format, by NSID.
    pub fn namespaces(&self) -> &[Namespace] {
        &self.shared.namespaces
    }

    /// Namespace `nsid`.
    pub fn namespace(&self, nsid: u32) -> Option<&Namespace> {
        self.shared.namespace(nsid)
    }

    /// Allocates `len` bytes of DMA memory for I/O buffers (zeroed, whole pages).
    pub fn alloc_buffer(&self, len: usize) -> Result<super::Buffer<B>, NvmeError> {
        Ok(Arc::new(self.shared.backing()?.alloc_dma(len)?))
    }

    /// Creates an I/O queue pair of `depth` entries (capped by CAP.MQES) for the calling
    /// thread.
    pub fn io_queue(&self, depth: u16) -> Result<IoQueue<B>, NvmeError> {
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
    /// it themselves when a timed-out command can be neither completed nor aborted.
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
            let _ = update_command(b, 0, COMMAND_MASTER);
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

    /// Normal shutdown (CC.SHN = 01b, wait for CSTS.SHST = 10b, at most
    /// max(RTD3E, 10 s)), for an orderly release. Queues still open are not deleted
    /// (drop them first); after shutdown the controller takes no more commands.
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
