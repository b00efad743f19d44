//! An NVMe controller emulated in the process, behind [`DeviceBacking`]: an NVMe driver
//! generic over the trait drives [`EmulatedNvme`] exactly as it drives a VFIO function,
//! through BAR 0 registers, doorbells, DMA memory and MSI-X eventfds, so driver tests run
//! without hardware, and with faults no hardware produces on demand.
//!
//! The same controller also runs as a device model of the test kit
//! ([`NvmeModel`], in a [`FakeBacking`](super::backing::FakeBacking)): one command
//! processing, reaching memory through either the emulator's own DMA table or the kit's
//! checked DMA.
//!
//! ```
//! use pcibus::bus::backing::{DeviceBacking, RegisterIo};
//! use pcibus::nvme::spec::{reg, Cap};
//! use pcibus::testing::nvme::{EmuConfig, EmulatedNvme};
//! let emu = EmulatedNvme::new(EmuConfig::default())?;
//! let bar = emu.map_bar(0)?;
//! assert_eq!(Cap(bar.read64(reg::CAP)?).max_queue_entries(), 2048);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # What is emulated
//!
//! - Registers: CAP (MQES, CQR=1, TO, DSTRD, CSS=NVM, 4 KiB pages only), VS 1.4, CC
//!   (enable with admin queue checks, reset, shutdown notification), CSTS (RDY, CFS,
//!   SHST), AQA, ASQ, ACQ, doorbells at the configured stride. INTMS/INTMC and NSSR are
//!   accepted and ignored; other registers read zero. CSTS.RDY follows CC.EN after
//!   [`EmuConfig::ready_delay`] (not within the register write), both ways.
//! - One processing thread per enabled controller. It takes submission entries between
//!   its head and the doorbell (or shadow doorbell) tail, executes them in order, and
//!   posts completions with the phase tag, SQ head and SQ id (in order, or shuffled per
//!   burst with [`EmuConfig::shuffle_completions`]); it never overwrites an entry the host
//!   has not released through the CQ head doorbell (a full CQ stops the SQs that feed it).
//!   After a batch it signals the eventfd of each completion queue's vector.
//! - Doorbells are writes, as on hardware: a tail or head is taken from a write, never
//!   from a register value that was not written again, and a queue created with an id
//!   used before starts at 0 whatever the old queue's doorbell held. An invalid write (no
//!   such doorbell register, or a value beyond the queue) is counted in
//!   [`EmuStats::invalid_doorbell_writes`], ignored, and reported by an Asynchronous Event
//!   of type Error status (Write to Invalid Doorbell Register or Invalid Doorbell Write
//!   Value, log page Error Information), masked from then on until the host reads that
//!   log page.
//! - Admin: Identify (CNS 00h, 01h, 02h, and 14h/15h with SR-IOV), Get/Set Features
//!   (Number of Queues; a few others stored and echoed), Create/Delete I/O CQ/SQ with the
//!   specification's checks, Get Log Page (below), Asynchronous Event Request (held until
//!   an event: [`EmulatedNvme::complete_async_event`], an error event, a SMART / health
//!   or namespace event below), Abort (best effort:
//!   nothing is aborted unless [`EmuConfig::abort_succeeds`]), Doorbell Buffer
//!   Config, Virtualization Management (actions 1, 7, 8, 9; Secondary Controller Offline
//!   releases the secondary's resources, as QEMU does).
//! - NVM: Read, Write, Flush, Write Zeroes, Dataset Management (deallocate) over sparse
//!   RAM namespaces (memory is used only for what was written); deallocated blocks read
//!   zero. PRP1 with an offset, PRP2 as a page or a list with chained list pages, MDTS.
//!   ONCS, the Write Zeroes size limit and the Dataset Management limits (Identify CNS
//!   06h) as configured, enforced.
//! - SGLs for I/O commands when [`EmuConfig::sgl`] is on (below).
//! - Metadata ([`NamespaceConfig`]): with extended LBAs each block's metadata moves
//!   after its data through the PRPs (N × (block + metadata) bytes); otherwise it moves
//!   through MPTR, which must point into DMA memory. End-to-end protection types 1–3
//!   (8 bytes: CRC16 guard, application tag, reference tag, first or last in the
//!   metadata): checked as PRCHK asks (guard, application tag under its mask, reference
//!   tag; type 1's initial tag must be the starting LBA's; the escape tags turn checks
//!   off), inserted on writes and stripped on reads with PRACT (no metadata moves when the
//!   protection information is all of it). Blocks never written carry all-ones metadata.
//! - CAP.CRMS and CRTO (NVMe 2.0 ready timeouts) when configured.
//! - Log pages: SMART / Health Information (02h) counting the Reads and Writes completed
//!   and their data units, the errors logged, and what [`EmulatedNvme::update_health`]
//!   sets; Error Information (01h, 16 entries, newest first) listing commands completed
//!   with an error status (other than aborts) and invalid doorbell writes; the Changed
//!   Namespace List (04h) that [`EmulatedNvme::notify_namespace_changed`] fills. Other
//!   pages read as zeros. Get Log Page honours the offset and length; read without
//!   Retain Asynchronous Event, a page clears its list (04h) and unmasks its event type.
//!   SMART and notice events are raised only when the host enabled them (Set Features
//!   Asynchronous Event Configuration), as on hardware; error events always.
//! - DMA: every address the controller touches is looked up, when it touches it, in the
//!   table of live allocations made through [`DeviceBacking::alloc_dma`]. An address
//!   outside them fails the command with Data Transfer Error and counts in
//!   [`EmuStats::bad_dma`]. Freed IOVAs are handed out again, lowest first (unless
//!   [`EmuConfig::fresh_iovas`]), as behind an IOMMU: DMA for a command whose buffer the
//!   driver freed lands in whatever buffer has the address now, and counts in
//!   [`EmuStats::late_dma`] when that buffer is newer than the command. Allocations are
//!   separated by an unmapped page, so an overrun by one byte is caught.
//! - Faults ([`Fault`]): swallowed and stalled commands, error statuses, wrong command ids,
//!   duplicate and stale completions, SQ heads going backwards, fatal status (with the
//!   controller stopped, with its DMA going on, on shutdown, or at the first I/O command
//!   after every reset), a reset during I/O,
//!   surprise removal, delays, a controller slow or never ready, lost interrupts, a
//!   smaller queue grant after a reset ([`EmulatedNvme::limit_io_queues`]), an Abort
//!   Command Limit ([`EmuConfig::abort_limit`]).
//!
//! # SGLs
//!
//! With [`EmuConfig::sgl`], Identify Controller SGLS reads 1 (SGLs for I/O commands, any
//! byte alignment) and an I/O command may set PSDT 01b: its data pointer is one SGL
//! descriptor, MPTR a plain metadata address. Data Block, Segment and Last Segment
//! descriptors (sub type 0, address) are followed, every address looked up as for PRPs.
//! Checked as strictly as the specification allows a controller to:
//!
//! - a descriptor type other than those three (Bit Bucket, keyed, transport, vendor), or a
//!   sub type other than address: SGL Descriptor Type Invalid;
//! - a Segment or Last Segment descriptor whose length is zero or not a multiple of 16,
//!   whose list address is not qword (8-byte) aligned, that is not the last descriptor of
//!   a Segment's list, or that appears in a Last Segment's list; a Segment's list that does
//!   not end with one: Invalid SGL Segment Descriptor;
//! - more than 65,536 descriptors walked for one command (a list that loops): Invalid
//!   Number of SGL Descriptors;
//! - Data Blocks describing fewer bytes than the command moves, or more (SGLS bit 18, an
//!   SGL longer than the transfer, is not offered): Data SGL Length Invalid.
//!
//! PSDT 10b (a metadata SGL; SGLS bit 19 is not offered), PSDT 11b, any PSDT on an admin
//! command or, without [`EmuConfig::sgl`], on an I/O command: Invalid Field in Command.
//! [`EmuStats::sgl_commands`] counts the commands that came with SGLs.
//!
//! # Strict by default
//!
//! The defaults behave as hardware may, not as kindly as it could: RDY takes time, IOVAs
//! are reused, Abort aborts nothing. A test that relies on a kinder controller says so
//! with [`EmuConfig::ready_delay`] = 0, [`EmuConfig::fresh_iovas`] or
//! [`EmuConfig::abort_succeeds`]; [`EmuConfig::shuffle_completions`] makes it stricter
//! still.
//!
//! # What is not
//!
//! Bit Bucket and metadata SGLs, 32/64-bit guard protection formats, fused commands, namespace management and
//! attachment commands (the test attaches, detaches and resizes namespaces:
//! [`EmulatedNvme::detach_namespace`]), firmware and format commands, reservations, controller memory buffer,
//! persistent memory region, boot partitions, pin-based interrupts and MSI-X masking,
//! interrupt coalescing, weighted round robin arbitration, NVM subsystem reset, multiple
//! I/O command sets, asynchronous events the controller raises on its own other than for
//! invalid doorbell writes (SMART and namespace events come from the test), log pages
//! other than 01h, 02h and 04h (zeros). SR-IOV
//! has no virtual functions behind it: Virtualization Management keeps the books (Identify
//! 14h/15h) and nothing more. Statuses are posted without the Do Not Retry bit.
//!
//! # Dropping
//!
//! [`EmulatedNvme`], its [`EmuRegisters`] and its [`EmuDma`] buffers are handles of one
//! controller ([`DeviceBacking::extra_handles`] counts them). When the last handle drops,
//! the processing thread is stopped and joined, and the controller's memory is freed; the
//! thread holds no handle, so it never keeps the controller alive.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::ops::Deref;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering, fence};
use std::sync::{Arc, OnceLock, Weak};
use std::thread::{self, JoinHandle, Thread};
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};

use crate::addr::PciAddress;
use crate::bus::backing::{BackingError, DeviceBacking, DmaMemory, MapDmaError, RegisterIo};
use crate::bus::bar::BarInfo;
use crate::bus::interrupt::InterruptKind;
use crate::nvme::spec::{
    self, Command, Completion, Status, admin, cc, cns, csts, dsm, feature, io as nvm, oacs, oncs, reg,
    virt_mgmt,
};
use crate::vfio::DmaConstraints;
use crate::vfio::{DmaBuffer, PAGE, cpu_page_size};

mod logs;
mod model;

pub use model::NvmeModel;

use super::model::{DmaFault, ModelContext};

// `PAGE`, here: the NVMe memory page (CC.MPS = 0, as the driver sets it), which PRPs and
// queue addresses are counted in: 4 KiB whatever the CPU's page. The emulated IOMMU's
// mappings are whole CPU pages (`cpu_page_size`), as VFIO's are.
const PAGE_U64: u64 = PAGE as u64;
/// NVMe version 1.4.0.
const VERSION: u32 = 0x0001_0400;
/// Sparse namespace storage granule.
const CHUNK: u64 = 64 * 1024;
/// Commands taken from one SQ before the next SQ gets a turn.
const BURST: u32 = 64;
/// Outstanding Asynchronous Event Requests accepted (Identify AERL is this minus one).
const AER_LIMIT: usize = 4;
/// Commands the controller keeps without completing (swallowed by a fault, AERs).
const HELD_LIMIT: usize = 65536;
/// Log page identifier of Error Information.
const LOG_ERROR_INFORMATION: u8 = 0x01;
/// Asynchronous event information of the Error status type: write to an invalid doorbell
/// register, and invalid doorbell write value.
const AEI_INVALID_DOORBELL_REGISTER: u32 = 0x00;
const AEI_INVALID_DOORBELL_VALUE: u32 = 0x01;
/// Where the first allocation lands.
const FIRST_IOVA: u64 = 0x1_0000_0000;

// ------------------------------------------------------------------------------------
// Configuration
// ------------------------------------------------------------------------------------

/// One namespace: `blocks` logical blocks of `block_size` bytes (512 or 4096), backed
/// by RAM as it is written, optionally with `metadata_size` bytes of metadata per block
/// (extended LBAs or a separate buffer) and end-to-end protection information.
///
/// `Default` is 1 GiB of 512-byte blocks without metadata; [`NamespaceConfig::new`] sets
/// the size alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NamespaceConfig {
    /// Namespace size in logical blocks.
    pub blocks: u64,
    /// Logical block size in bytes: 512 or 4096.
    pub block_size: u32,
    /// Metadata bytes per block (the LBA format's MS): 0 to 128.
    pub metadata_size: u16,
    /// Extended LBAs (FLBAS bit 4): each block's metadata travels right after its data,
    /// through the PRPs (a transfer of N blocks moves N × (block size + metadata size)
    /// bytes). Otherwise the metadata is a separate buffer at the command's MPTR.
    pub extended_lba: bool,
    /// End-to-end protection type (DPS bits 2:0): 0 none, 1 to 3; needs 8 bytes of
    /// metadata or more. The 8-byte protection information (guard CRC16, application tag,
    /// reference tag) is checked as PRCHK asks; with PRACT the controller inserts it on
    /// writes and strips it on reads when it is all the metadata.
    pub protection: u8,
    /// Protection information in the first 8 bytes of the metadata (DPS bit 3) instead of
    /// the last 8.
    pub protection_first: bool,
}

impl NamespaceConfig {
    /// `blocks` blocks of `block_size` bytes, no metadata.
    pub const fn new(blocks: u64, block_size: u32) -> Self {
        NamespaceConfig {
            blocks,
            block_size,
            metadata_size: 0,
            extended_lba: false,
            protection: 0,
            protection_first: false,
        }
    }
}

impl Default for NamespaceConfig {
    fn default() -> Self {
        NamespaceConfig::new(1 << 21, 512)
    }
}

/// SR-IOV resources for Virtualization Management (Identify CNS 14h/15h).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SriovConfig {
    /// Virtual functions, each with a secondary controller (ids 1..=vfs); at most 127.
    pub vfs: u16,
    /// Flexible VQ (queue) resources, all allocated to the primary controller at first.
    pub flexible_vq: u16,
    /// Flexible VI (interrupt) resources, likewise.
    pub flexible_vi: u16,
}

/// How the emulated controller looks. `Default` is a QEMU-like controller with one
/// 1 GiB namespace of 512-byte blocks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmuConfig {
    /// The PCI address the backing reports.
    pub address: PciAddress,
    /// PCI vendor id (config space and Identify VID/SSVID); QEMU's 0x1b36 by default.
    pub vendor_id: u16,
    /// PCI device id; QEMU's NVMe 0x0010 by default.
    pub device_id: u16,
    /// Serial number (at most 20 ASCII characters).
    pub serial: String,
    /// Model number (at most 40).
    pub model: String,
    /// Firmware revision (at most 8).
    pub firmware: String,
    /// Namespaces, NSID 1 first; at most 4096 (more than one active namespace list of
    /// 1,024 entries).
    pub namespaces: Vec<NamespaceConfig>,
    /// Maximum queue entries (a count, 2 to 65536); CAP.MQES is this minus one.
    pub mqes: u32,
    /// Doorbell stride exponent: doorbells are `4 << dstrd` bytes apart (0 to 15).
    pub dstrd: u8,
    /// Maximum Data Transfer Size, a power of two of 4 KiB pages (0: no limit; at most 16).
    pub mdts: u8,
    /// I/O queue pairs the controller grants at most (1 to 65535).
    pub max_io_queues: u16,
    /// Whether Doorbell Buffer Config is supported (OACS bit 8).
    pub shadow_doorbells: bool,
    /// SR-IOV with Virtualization Management (OACS bit 7), if any.
    pub sriov: Option<SriovConfig>,
    /// Whether the processing thread spins on the doorbells instead of sleeping (for
    /// benchmarks: no wake-up latency, one core busy).
    pub busy_poll: bool,
    /// MSI-X vectors (1 to 2048).
    pub msix_vectors: u16,
    /// Optional NVM Command Support (Identify Controller ONCS) the controller reports and
    /// honours: without [`oncs::WRITE_ZEROES`] or [`oncs::DATASET_MANAGEMENT`] those
    /// commands fail with Invalid Command Opcode. Both by default.
    pub oncs: u16,
    /// Write Zeroes Size Limit (NVM Identify Controller, CNS 06h): a power of two of 4 KiB
    /// pages; a longer Write Zeroes fails with Invalid Field. 0: no limit.
    pub wzsl: u8,
    /// Dataset Management Ranges Limit: ranges per command (0: the 256 of the command).
    pub dmrl: u8,
    /// Dataset Management Range Size Limit: blocks per range (0: no limit).
    pub dmrsl: u32,
    /// Dataset Management Size Limit: blocks per command, all ranges (0: no limit).
    pub dmsl: u64,
    /// NVMe 2.0 ready timeouts: `Some(crto)` sets CAP.CRMS (CRWMS and CRIMS) and the CRTO
    /// register (bits 15:0 CRWMT, 31:16 CRIMT, in 500 ms units); CAP.TO becomes
    /// min(CRWMT, 255) as the specification asks. `None`: neither.
    pub crto: Option<u32>,
    /// Abort Command Limit, zero-based as Identify Controller's ACL (byte 258) reports
    /// it: an Abort that arrives while `abort_limit + 1` Aborts are outstanding (held by a
    /// [`Fault::NeverComplete`] on Abort) completes with Abort Command Limit Exceeded and
    /// counts in [`EmuStats::aborts_over_limit`].
    pub abort_limit: u8,
    /// How long CSTS.RDY takes to follow CC.EN, both ways: after the host sets CC.EN the
    /// controller reports ready (and takes commands) this much later; after it clears
    /// CC.EN, RDY stays 1 this long (the controller stops processing at once). Not zero by
    /// default (10 ms), as on hardware, so a driver's wait for RDY (bounded by CAP.TO) is
    /// exercised; [`Duration::ZERO`] is the kind controller that is ready within the
    /// register write. [`Fault::ReadySlow`] and [`Fault::ReadyNever`] change it at run time.
    /// A reset through [`DeviceBacking::reset`] (a function level reset) clears RDY at once.
    pub ready_delay: Duration,
    /// CAP.TO, the worst case time to ready the controller reports, in 500 ms units
    /// (1 to 255); 15 (7.5 s, QEMU's) by default. A driver waits this long for RDY before
    /// it gives up, so a test of [`Fault::ReadyNever`] sets it low.
    pub cap_timeout: u8,
    /// Whether [`DeviceBacking::alloc_dma`] gives every allocation an IOVA never used
    /// before. By default (false) a freed IOVA is handed out again, lowest address first,
    /// as an IOMMU allocator does: DMA the controller does late (for a command the driver
    /// gave up on) lands in whatever buffer has the address now and corrupts it, as on
    /// hardware. The kind controller (true) fails such DMA and counts it in
    /// [`EmuStats::bad_dma`].
    pub fresh_iovas: bool,
    /// Whether Abort aborts a command the controller holds (one swallowed by
    /// [`Fault::NeverComplete`] or stalled by [`Fault::Stall`], an Asynchronous Event
    /// Request). By default (false) Abort never aborts anything: the specification makes
    /// Abort best effort, and a command already being executed is typically not aborted,
    /// so Abort completes successfully with dword 0 bit 0 set ("not aborted") and the
    /// command stays where it is; a driver must then reset the controller (or delete the
    /// queue) to get it back. The kind controller (true) aborts held commands, which
    /// complete with Command Abort Requested.
    pub abort_succeeds: bool,
    /// Out-of-order completion: with `Some(seed)`, the completions of each burst of I/O
    /// commands the controller takes from one submission queue (up to 64, as many as fit
    /// the completion queue) are posted in an order shuffled by a generator seeded with
    /// `seed` (deterministic for a given sequence of bursts), each carrying the SQ head as
    /// it is when posted. Hardware completes commands in any order; a driver that relies
    /// on order (or on the SQ head of one completion to free another's slot) fails here.
    /// `None` (the default) completes in submission order. Admin commands always complete
    /// in order.
    pub shuffle_completions: Option<u64>,
    /// Whether I/O commands take SGLs (Identify Controller SGLS bits 1:0 = 01b: any byte
    /// alignment; no Bit Bucket, no metadata SGLs, no SGL longer than the transfer). Off
    /// by default, so the driver's PRP paths stay what the default controller tests; QEMU's
    /// controller reports SGLs, so a test of the SGL path turns it on. See [SGLs](self#sgls)
    /// for how strictly they are checked.
    pub sgl: bool,
}

const DEFAULT_ADDRESS: PciAddress = match PciAddress::new(0, 0, 4, 0) {
    Some(a) => a,
    None => panic!("0000:00:04.0 is a valid address"),
};

impl Default for EmuConfig {
    fn default() -> Self {
        EmuConfig {
            address: DEFAULT_ADDRESS,
            vendor_id: 0x1b36,
            device_id: 0x0010,
            serial: "EMU0001".into(),
            model: "pcibus emulated NVMe".into(),
            firmware: "1.0".into(),
            namespaces: vec![NamespaceConfig::default()],
            mqes: 2048,
            dstrd: 0,
            mdts: 7,
            max_io_queues: 64,
            shadow_doorbells: true,
            sriov: None,
            busy_poll: false,
            msix_vectors: 16,
            oncs: oncs::WRITE_ZEROES | oncs::DATASET_MANAGEMENT,
            wzsl: 0,
            dmrl: 0,
            dmrsl: 0,
            dmsl: 0,
            crto: None,
            abort_limit: 3,
            ready_delay: Duration::from_millis(10),
            cap_timeout: 0x0f,
            fresh_iovas: false,
            abort_succeeds: false,
            shuffle_completions: None,
            sgl: false,
        }
    }
}

impl EmuConfig {
    fn check(&self) -> Result<(), EmuError> {
        let bad = |field: &'static str, value: String, expected: &'static str| {
            Err(EmuError::Config {
                field,
                value,
                expected,
            })
        };
        for (field, s, max) in [
            ("serial", &self.serial, 20),
            ("model", &self.model, 40),
            ("firmware", &self.firmware, 8),
        ] {
            if s.len() > max || !s.bytes().all(|b| (0x20..0x7f).contains(&b)) {
                return bad(
                    field,
                    format!("{s:?}"),
                    "printable ASCII within the field's width",
                );
            }
        }
        if self.namespaces.len() > 4096 {
            return bad("namespaces", self.namespaces.len().to_string(), "at most 4096");
        }
        for ns in &self.namespaces {
            if ns.block_size != 512 && ns.block_size != 4096 {
                return bad("block_size", ns.block_size.to_string(), "512 or 4096");
            }
            if ns.metadata_size > 128 {
                return bad("metadata_size", ns.metadata_size.to_string(), "0 to 128");
            }
            if ns.protection > 3 || (ns.protection != 0 && ns.metadata_size < 8) {
                return bad(
                    "protection",
                    ns.protection.to_string(),
                    "0 to 3, and 8 bytes of metadata or more for 1 to 3",
                );
            }
            if ns.blocks == 0
                || ns
                    .blocks
                    .checked_mul(u64::from(ns.block_size))
                    .is_none_or(|b| b > 1 << 50)
            {
                return bad("blocks", ns.blocks.to_string(), "1 block to 1 PiB");
            }
        }
        if !(2..=65536).contains(&self.mqes) {
            return bad("mqes", self.mqes.to_string(), "2 to 65536");
        }
        if self.dstrd > 15 {
            return bad("dstrd", self.dstrd.to_string(), "0 to 15");
        }
        if self.mdts > 16 {
            return bad("mdts", self.mdts.to_string(), "0 to 16");
        }
        if self.max_io_queues == 0 {
            return bad("max_io_queues", "0".into(), "1 to 65535");
        }
        if self.cap_timeout == 0 {
            return bad("cap_timeout", "0".into(), "1 to 255 (500 ms units)");
        }
        if !(1..=2048).contains(&self.msix_vectors) {
            return bad("msix_vectors", self.msix_vectors.to_string(), "1 to 2048");
        }
        if let Some(s) = self.sriov
            && s.vfs > 127
        {
            return bad("sriov.vfs", s.vfs.to_string(), "at most 127");
        }
        Ok(())
    }

    fn cap(&self) -> u64 {
        let (to, crms) = match self.crto {
            // CAP.TO is the lower of CRWMT and 0xff; CRWMS and CRIMS both set.
            Some(crto) => (u64::from(crto & 0xffff).min(0xff), 3u64 << 59),
            None => (u64::from(self.cap_timeout), 0),
        };
        u64::from(self.mqes - 1)
            | 1 << 16 // CQR: queues must be physically contiguous
            | to << 24
            | u64::from(self.dstrd) << 32
            | 1 << 37 // CSS: the NVM command set
            | crms
    }

    fn stride(&self) -> u64 {
        4 << self.dstrd
    }

    fn wzsl_bytes(&self) -> Option<u64> {
        (self.wzsl != 0).then(|| PAGE_U64.checked_shl(u32::from(self.wzsl)).unwrap_or(u64::MAX))
    }

    fn max_transfer(&self) -> u64 {
        if self.mdts == 0 {
            u64::MAX
        } else {
            PAGE_U64 << self.mdts
        }
    }
}

/// Why an [`EmulatedNvme`] could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EmuError {
    /// A configuration value out of range.
    #[error("emulated NVMe: {field} = {value}, expected {expected}")]
    Config {
        /// The field.
        field: &'static str,
        /// Its value.
        value: String,
        /// What it may be.
        expected: &'static str,
    },
}

// ------------------------------------------------------------------------------------
// Faults and statistics
// ------------------------------------------------------------------------------------

/// Which commands a [`Fault`] applies to. Admin and NVM opcodes overlap (01h is Create
/// I/O SQ and Write), so the queue kind is part of the match.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommandMatch {
    /// Every command.
    Any,
    /// Every admin command.
    AnyAdmin,
    /// Every I/O command.
    AnyIo,
    /// Admin commands with this opcode.
    Admin(u8),
    /// I/O commands with this opcode.
    Io(u8),
}

impl CommandMatch {
    fn matches(self, is_admin: bool, opcode: u8) -> bool {
        match self {
            CommandMatch::Any => true,
            CommandMatch::AnyAdmin => is_admin,
            CommandMatch::AnyIo => !is_admin,
            CommandMatch::Admin(o) => is_admin && o == opcode,
            CommandMatch::Io(o) => !is_admin && o == opcode,
        }
    }
}

/// A misbehaviour to inject with [`EmulatedNvme::inject`]. Faults with a count apply to
/// the next `count` matching commands; the "next completion" faults to the next
/// completion posted on any queue. They survive controller resets; clear them with
/// [`EmulatedNvme::clear_faults`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Fault {
    /// Matching commands are consumed (the SQ head moves on) and never completed, unless
    /// aborted or their SQ is deleted.
    NeverComplete {
        /// Which commands.
        command: CommandMatch,
        /// How many.
        count: u32,
    },
    /// Matching commands are fetched (the SQ head moves on) and wait, not executed, until
    /// [`EmulatedNvme::release_stalled`]; then they execute, their DMA happening at that
    /// moment, and complete. A stalled command is being executed as far as Abort is
    /// concerned (see [`EmuConfig::abort_succeeds`]); deleting its SQ ends it as aborted. For
    /// what a driver does while a command is slow, deterministically: what it frees, and
    /// what the late DMA then hits.
    Stall {
        /// Which commands.
        command: CommandMatch,
        /// How many.
        count: u32,
    },
    /// Matching commands complete with `status`, without being executed.
    Status {
        /// Which commands.
        command: CommandMatch,
        /// The status (phase excluded; may carry DNR).
        status: Status,
        /// How many.
        count: u32,
    },
    /// The next completion carries a command id nobody used (0xffff, or 0xfffe when the
    /// command's own id is 0xffff); the command is thereby lost.
    WrongCid,
    /// The next completion is posted twice (two CQ entries).
    Duplicate,
    /// The next completion is written with the previous phase, so the host must not see
    /// it as new; the controller moves its tail on regardless (the completion is lost and
    /// later ones queue up behind it).
    StalePhase,
    /// CSTS.CFS becomes 1 and the controller stops processing, until a reset (CC.EN 0).
    FatalStatus,
    /// At the next shutdown notification (CC.SHN) the controller fails instead: CSTS.CFS
    /// becomes 1 and CSTS.SHST never reports the shutdown complete.
    FatalOnShutdown,
    /// CSTS.CFS becomes 1 but the controller goes on as before until a reset (CC.EN 0):
    /// it fetches and executes commands, moves their data and posts completions. The
    /// harmful kind of fatal status: a driver that frees the buffers of outstanding
    /// commands when it sees CFS, with the controller still enabled and bus mastering on,
    /// has them written afterwards (see [`EmuStats::late_dma`]).
    FatalStatusDmaContinues,
    /// From now on, until [`EmulatedNvme::clear_faults`], the controller fails (CSTS.CFS
    /// becomes 1 and it stops processing, as [`Fault::FatalStatus`]) at the first I/O
    /// command it fetches after each enable: a controller that a reset brings back only
    /// for admin commands, whatever the number of resets.
    FatalOnIo,
    /// A reset the host driver did not ask for, during I/O, as a function level reset by
    /// someone else does: at once, the controller stops, every queue is gone, and CC,
    /// CSTS (RDY 0), AQA, ASQ and ACQ read 0 (as after [`DeviceBacking::reset`]). Commands
    /// outstanding never complete. Config space is left as it is.
    Reset,
    /// The next `count` interrupts (eventfd signals) are not sent; the completions are
    /// posted as usual. A driver that sleeps on the interrupt must still find them.
    LostInterrupt {
        /// How many.
        count: u32,
    },
    /// The next completion reports an SQ head one entry behind the one the previous
    /// completion of its queue reported: a head going backwards, which a driver must not
    /// take for a queue emptier than it is.
    SqHeadBackwards,
    /// The next `count` completions report the SQ head the previous completion of their
    /// queue reported, as a controller that never updates it does: a driver that takes
    /// ring space from that field alone stalls; the entries of completed commands were
    /// consumed all the same.
    SqHeadFrozen {
        /// How many completions.
        count: u32,
    },
    /// Surprise removal: from now on every register reads all-ones, writes are dropped and
    /// nothing is processed. Irreversible.
    Gone,
    /// Every command waits this long before it is executed (until cleared).
    Delay(Duration),
    /// A made-up completion entry, posted just before the next real completion (on that
    /// completion's queue): every field as given (command id, SQ head, SQ id, status,
    /// dwords 0 and 1) but the phase tag, which the controller sets so the host takes it
    /// as new. For fuzzing what a driver does with entries it did not expect.
    Forge(Completion),
    /// Every CSTS.RDY transition (after CC.EN is set or cleared) takes this long instead of
    /// [`EmuConfig::ready_delay`], until cleared: a controller slow to become ready (or to
    /// finish a reset), within or beyond CAP.TO.
    ReadySlow(Duration),
    /// CSTS.RDY never becomes 1 after CC.EN is set (the controller never processes a
    /// command), until cleared and the controller is disabled and enabled again: a driver
    /// must give up after CAP.TO ([`EmuConfig::cap_timeout`]). Disabling still works.
    ReadyNever,
}

/// Counters of what the controller did, from [`EmulatedNvme::stats`]. Cumulative over the
/// controller's life (resets included).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct EmuStats {
    /// Commands taken from submission queues.
    pub commands: u64,
    /// Admin commands taken, by opcode.
    pub admin_commands: BTreeMap<u8, u64>,
    /// I/O commands taken, by opcode.
    pub io_commands: BTreeMap<u8, u64>,
    /// Completion entries written.
    pub completions: u64,
    /// MMIO writes to SQ tail doorbells.
    pub sq_doorbell_writes: u64,
    /// MMIO writes to CQ head doorbells.
    pub cq_doorbell_writes: u64,
    /// Doorbell writes the controller ignored: no such queue, or a value beyond the queue.
    pub invalid_doorbell_writes: u64,
    /// New tails or heads the controller found in the shadow doorbell buffer.
    pub shadow_doorbell_updates: u64,
    /// Event index updates the controller wrote.
    pub event_index_writes: u64,
    /// Eventfd signals sent.
    pub interrupts: u64,
    /// DMA attempts outside live allocations (each failed its command or was dropped).
    pub bad_dma: u64,
    /// Aborts that arrived with [`EmuConfig::abort_limit`] + 1 Aborts already outstanding
    /// (completed with Abort Command Limit Exceeded).
    pub aborts_over_limit: u64,
    /// DMA transfers into a buffer allocated after the command was fetched: the command's
    /// own buffer was freed and its IOVA handed out again (see
    /// [`EmuConfig::fresh_iovas`]). The transfer is done, as on hardware, and corrupts the
    /// new buffer; a driver that keeps its buffers until their commands end never causes
    /// one.
    pub late_dma: u64,
    /// I/O commands taken whose data pointer was an SGL (PSDT 01b), valid or not.
    pub sgl_commands: u64,
    /// DMA the controller attempted while Bus Master Enable was off in its Command
    /// register: refused, as a real function's memory requests never leave it then (the
    /// command fails with Data Transfer Error; queues are not fetched or posted). Logged
    /// as an error: a driver that forgot bus mastering sees this instead of silence.
    pub dma_without_bus_master: u64,
    /// Times the controller was enabled (CC.EN 0 → 1): bring-up, then once per reset.
    pub enables: u64,
}

impl EmuStats {
    /// Admin commands taken with `opcode`.
    pub fn admin(&self, opcode: u8) -> u64 {
        self.admin_commands.get(&opcode).copied().unwrap_or(0)
    }
    /// I/O commands taken with `opcode`.
    pub fn io(&self, opcode: u8) -> u64 {
        self.io_commands.get(&opcode).copied().unwrap_or(0)
    }
}

#[derive(Debug)]
struct Counters {
    admin: Box<[AtomicU64]>,
    io: Box<[AtomicU64]>,
    completions: AtomicU64,
    sq_doorbells: AtomicU64,
    cq_doorbells: AtomicU64,
    invalid_doorbells: AtomicU64,
    shadow_updates: AtomicU64,
    event_index_writes: AtomicU64,
    interrupts: AtomicU64,
    bad_dma: AtomicU64,
    aborts_over_limit: AtomicU64,
    late_dma: AtomicU64,
    sgl_commands: AtomicU64,
    dma_without_bus_master: AtomicU64,
    enables: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

impl Counters {
    fn new() -> Self {
        let table = || (0..256).map(|_| AtomicU64::new(0)).collect();
        Counters {
            admin: table(),
            io: table(),
            completions: AtomicU64::new(0),
            sq_doorbells: AtomicU64::new(0),
            cq_doorbells: AtomicU64::new(0),
            invalid_doorbells: AtomicU64::new(0),
            shadow_updates: AtomicU64::new(0),
            event_index_writes: AtomicU64::new(0),
            interrupts: AtomicU64::new(0),
            bad_dma: AtomicU64::new(0),
            aborts_over_limit: AtomicU64::new(0),
            late_dma: AtomicU64::new(0),
            sgl_commands: AtomicU64::new(0),
            dma_without_bus_master: AtomicU64::new(0),
            enables: AtomicU64::new(0),
        }
    }

    fn snapshot(&self) -> EmuStats {
        let map = |t: &[AtomicU64]| -> BTreeMap<u8, u64> {
            t.iter()
                .enumerate()
                .filter_map(|(op, n)| {
                    let n = n.load(Ordering::Relaxed);
                    (n != 0).then_some((op as u8, n))
                })
                .collect()
        };
        let admin_commands = map(&self.admin);
        let io_commands = map(&self.io);
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        EmuStats {
            commands: admin_commands.values().chain(io_commands.values()).sum(),
            admin_commands,
            io_commands,
            completions: load(&self.completions),
            sq_doorbell_writes: load(&self.sq_doorbells),
            cq_doorbell_writes: load(&self.cq_doorbells),
            invalid_doorbell_writes: load(&self.invalid_doorbells),
            shadow_doorbell_updates: load(&self.shadow_updates),
            event_index_writes: load(&self.event_index_writes),
            interrupts: load(&self.interrupts),
            bad_dma: load(&self.bad_dma),
            aborts_over_limit: load(&self.aborts_over_limit),
            late_dma: load(&self.late_dma),
            sgl_commands: load(&self.sgl_commands),
            dma_without_bus_master: load(&self.dma_without_bus_master),
            enables: load(&self.enables),
        }
    }
}

#[derive(Debug, Default)]
struct FaultState {
    never: Vec<(CommandMatch, u32)>,
    stall: Vec<(CommandMatch, u32)>,
    status: Vec<(CommandMatch, Status, u32)>,
    wrong_cid: u32,
    duplicate: u32,
    stale_phase: u32,
    delay: Option<Duration>,
    forged: VecDeque<Completion>,
    lost_irqs: u32,
    sq_head_back: u32,
    sq_head_frozen: u32,
    // Read at CC writes only, so not part of `is_empty` (which gates the command path).
    ready_slow: Option<Duration>,
    ready_never: bool,
}

impl FaultState {
    fn is_empty(&self) -> bool {
        self.never.is_empty()
            && self.stall.is_empty()
            && self.status.is_empty()
            && self.wrong_cid == 0
            && self.duplicate == 0
            && self.stale_phase == 0
            && self.lost_irqs == 0
            && self.sq_head_back == 0
            && self.sq_head_frozen == 0
            && self.forged.is_empty()
            && self.delay.is_none()
    }
}

// ------------------------------------------------------------------------------------
// Namespaces
// ------------------------------------------------------------------------------------

#[derive(Debug)]
struct Namespace {
    // Size in blocks (`EmulatedNvme::resize_namespace` changes it).
    size: AtomicU64,
    // Attached to the controller (active); `EmulatedNvme::detach_namespace` clears it.
    attached: AtomicBool,
    block_size: u32,
    // Sparse: chunk index → CHUNK bytes. A missing chunk reads zero.
    chunks: Mutex<HashMap<u64, Box<[u8]>>>,
    // Metadata bytes per block, extended LBAs, protection type and place (DPS).
    ms: u16,
    extended: bool,
    pi: u8,
    pi_first: bool,
    // Sparse metadata: LBA → its `ms` bytes. A missing block's metadata reads all-ones (so
    // its protection information has the escape application tag: never checked).
    meta: Mutex<BTreeMap<u64, Box<[u8]>>>,
}

type Chunks = HashMap<u64, Box<[u8]>>;

// Splits `len` bytes at byte `pos` of the namespace into (chunk, offset in chunk, length,
// offset in the range) pieces.
fn pieces(pos: u64, len: u64) -> impl Iterator<Item = (u64, usize, usize, usize)> {
    let mut done = 0u64;
    std::iter::from_fn(move || {
        if done >= len {
            return None;
        }
        let at = pos + done;
        let (chunk, off) = (at / CHUNK, at % CHUNK);
        let n = (CHUNK - off).min(len - done);
        let item = (chunk, off as usize, n as usize, done as usize);
        done += n;
        Some(item)
    })
}

impl Namespace {
    fn blocks(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    fn bytes(&self) -> u64 {
        self.blocks() * u64::from(self.block_size)
    }

    fn read_into_dma(map: &Chunks, pos: u64, buf: &DmaBuffer, off: usize, len: usize) {
        for (chunk, coff, n, done) in pieces(pos, len as u64) {
            match map.get(&chunk) {
                Some(c) => buf.write_at(off + done, &c[coff..coff + n]),
                None => buf.fill(off + done, n, 0),
            };
        }
    }

    fn write_from_dma(map: &mut Chunks, pos: u64, buf: &DmaBuffer, off: usize, len: usize) {
        for (chunk, coff, n, done) in pieces(pos, len as u64) {
            let c = map
                .entry(chunk)
                .or_insert_with(|| vec![0u8; CHUNK as usize].into_boxed_slice());
            buf.read_at(off + done, &mut c[coff..coff + n]);
        }
    }

    // Costs O(chunks stored) at most, whatever the range: a DSM range may span terabytes.
    fn zero(map: &mut Chunks, pos: u64, len: u64) {
        if len == 0 {
            return;
        }
        let end = pos + len;
        let (first, last) = (pos.div_ceil(CHUNK), end / CHUNK);
        // Whole chunks are dropped; for a range of many chunks, walk the map instead.
        if last > first && last - first > map.len() as u64 {
            map.retain(|&k, _| !(first..last).contains(&k));
        } else {
            for k in first..last {
                map.remove(&k);
            }
        }
        // The partial chunks at either end.
        for k in [pos / CHUNK, (end - 1) / CHUNK] {
            let start = k * CHUNK;
            if let Some(c) = map.get_mut(&k) {
                let from = pos.max(start) - start;
                let to = end.min(start + CHUNK) - start;
                c[from as usize..to as usize].fill(0);
            }
        }
    }
}

// ------------------------------------------------------------------------------------
// Shared controller state
// ------------------------------------------------------------------------------------

#[derive(Debug)]
struct DmaEntry {
    len: u64,
    buf: Weak<DmaBuffer>,
    // Allocation order: an allocation newer than a command cannot be its buffer.
    serial: u64,
}

#[derive(Debug, Clone, Copy, Default)]
struct Secondary {
    online: bool,
    nvq: u16,
    nvi: u16,
}

#[derive(Debug)]
struct SriovState {
    config: SriovConfig,
    primary: [u16; 2],
    next_primary: [u16; 2],
    secondaries: Vec<Secondary>,
}

#[derive(Debug)]
struct Shared {
    cfg: EmuConfig,
    cap: u64,
    bar_len: u64,
    cc: AtomicU32,
    csts: AtomicU32,
    aqa: AtomicU32,
    asq: AtomicU64,
    acq: AtomicU64,
    intms: AtomicU32,
    gone: AtomicBool,
    halted: AtomicBool,
    // Fault::FatalOnShutdown armed.
    fatal_on_shutdown: AtomicBool,
    // Fault::FatalOnIo armed (until the faults are cleared).
    fatal_on_io: AtomicBool,
    // I/O queues Set Features grants at most from now on (`EmulatedNvme::limit_io_queues`).
    grant_limit: AtomicU32,
    // When CSTS.RDY, still 1 after CC.EN was cleared, becomes 0 (applied lazily by CSTS
    // reads).
    unready_at: Mutex<Option<Instant>>,
    unready_pending: AtomicBool,
    // MMIO doorbells: SQ y tail at 2y, CQ y head at 2y + 1. Each holds the value last
    // written (low 32 bits) and a count of writes (high 32 bits): a doorbell is an event,
    // and a register that was not written since the controller last looked holds no new
    // tail or head, whatever its value.
    doorbells: Box<[AtomicU64]>,
    sleeping: AtomicBool,
    stop: AtomicBool,
    waker: Mutex<Option<Thread>>,
    // The control path (CC writes, reset, drop): the processing thread's handle.
    worker: Mutex<Option<JoinHandle<()>>>,
    dma: RwLock<BTreeMap<u64, DmaEntry>>,
    next_iova: AtomicU64,
    alloc_serial: AtomicU64,
    namespaces: Vec<Namespace>,
    faults: Mutex<FaultState>,
    faults_pending: AtomicBool,
    async_events: Mutex<VecDeque<u32>>,
    async_pending: AtomicBool,
    // Set by `EmulatedNvme::release_stalled`.
    release: AtomicBool,
    // Error status events are masked (one was raised, the log page not read yet).
    error_events_masked: AtomicBool,
    // Log pages, and what enables and masks SMART and notice events.
    logs: logs::LogState,
    irqs: RwLock<Vec<OwnedFd>>,
    config_space: Mutex<Vec<u8>>,
    // Bus Master Enable, as last written to the Command register (read on every DMA).
    bus_master: AtomicBool,
    sriov: Mutex<Option<SriovState>>,
    counters: Counters,
    // Set for a controller that runs as a device model (`NvmeModel`): DMA, bus mastering
    // and interrupts go through the model kit's context instead of the table, the flag
    // and the eventfds above, and the engine is stepped by the model.
    model: Option<ModelPort>,
}

// What a controller running as a device model has instead of a processing thread.
struct ModelPort {
    // The kit's context, from the first callback on (every callback passes it).
    ctx: OnceLock<ModelContext>,
    // The engine while the controller is enabled (`Shared::enable` puts it here,
    // `stop_worker` takes it out).
    engine: Mutex<Option<Box<Engine>>>,
}

impl fmt::Debug for ModelPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ModelPort")
            .field("ctx", &self.ctx.get())
            .field("enabled", &self.engine.lock().is_some())
            .finish()
    }
}

impl Shared {
    fn new(cfg: EmuConfig, model: bool) -> Shared {
        let queues = usize::from(cfg.max_io_queues) + 1;
        let bar_len = (0x1000 + 2 * queues as u64 * cfg.stride())
            .next_power_of_two()
            .max(0x4000);
        let mut config = vec![0u8; 4096];
        config[0..2].copy_from_slice(&cfg.vendor_id.to_le_bytes());
        config[2..4].copy_from_slice(&cfg.device_id.to_le_bytes());
        config[4..6].copy_from_slice(&0x0006u16.to_le_bytes()); // memory space, bus master
        config[8] = 2; // revision
        config[9..12].copy_from_slice(&0x01_08_02u32.to_le_bytes()[..3]); // NVMe class
        config[0x10] = 0x04; // BAR 0: 64-bit memory
        config[0x2c..0x2e].copy_from_slice(&cfg.vendor_id.to_le_bytes());
        config[0x2e..0x30].copy_from_slice(&cfg.device_id.to_le_bytes());
        let sriov = cfg.sriov.map(|s| SriovState {
            config: s,
            primary: [s.flexible_vq, s.flexible_vi],
            next_primary: [s.flexible_vq, s.flexible_vi],
            secondaries: vec![Secondary::default(); usize::from(s.vfs)],
        });
        Shared {
            cap: cfg.cap(),
            bar_len,
            cc: AtomicU32::new(0),
            csts: AtomicU32::new(0),
            aqa: AtomicU32::new(0),
            asq: AtomicU64::new(0),
            acq: AtomicU64::new(0),
            intms: AtomicU32::new(0),
            gone: AtomicBool::new(false),
            halted: AtomicBool::new(false),
            fatal_on_shutdown: AtomicBool::new(false),
            fatal_on_io: AtomicBool::new(false),
            grant_limit: AtomicU32::new(u32::from(cfg.max_io_queues)),
            unready_at: Mutex::new(None),
            unready_pending: AtomicBool::new(false),
            doorbells: (0..2 * queues).map(|_| AtomicU64::new(0)).collect(),
            sleeping: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            waker: Mutex::new(None),
            worker: Mutex::new(None),
            dma: RwLock::new(BTreeMap::new()),
            next_iova: AtomicU64::new(FIRST_IOVA),
            alloc_serial: AtomicU64::new(0),
            namespaces: cfg
                .namespaces
                .iter()
                .map(|n| Namespace {
                    size: AtomicU64::new(n.blocks),
                    attached: AtomicBool::new(true),
                    block_size: n.block_size,
                    chunks: Mutex::new(HashMap::new()),
                    ms: n.metadata_size,
                    extended: n.extended_lba,
                    pi: n.protection,
                    pi_first: n.protection_first,
                    meta: Mutex::new(BTreeMap::new()),
                })
                .collect(),
            faults: Mutex::new(FaultState::default()),
            faults_pending: AtomicBool::new(false),
            async_events: Mutex::new(VecDeque::new()),
            async_pending: AtomicBool::new(false),
            release: AtomicBool::new(false),
            error_events_masked: AtomicBool::new(false),
            logs: logs::LogState::new(),
            irqs: RwLock::new(Vec::new()),
            bus_master: AtomicBool::new(super::bus_master_bit(&config)),
            config_space: Mutex::new(config),
            sriov: Mutex::new(sriov),
            counters: Counters::new(),
            model: model.then(|| ModelPort {
                ctx: OnceLock::new(),
                engine: Mutex::new(None),
            }),
            cfg,
        }
    }

    fn gone(&self) -> bool {
        self.gone.load(Ordering::Acquire)
    }

    // The model kit's context, for a controller running as a device model.
    fn ctx(&self) -> Option<&ModelContext> {
        self.model.as_ref().and_then(|m| m.ctx.get())
    }

    // Bus Master Enable now: the Command register as last written (the model kit's, for
    // a model).
    fn bus_master_now(&self) -> bool {
        match self.ctx() {
            Some(ctx) => ctx.bus_master(),
            None => self.bus_master.load(Ordering::Acquire),
        }
    }

    // Memory resolved earlier (a queue, a shadow doorbell buffer) was freed since.
    fn lost_memory(&self, what: &str) {
        bump(&self.counters.bad_dma);
        if let Some(ctx) = self.ctx() {
            ctx.refuse_freed(format_args!("{what}"));
        }
    }

    fn kick(&self) {
        if self.sleeping.load(Ordering::SeqCst)
            && let Some(t) = &*self.waker.lock()
        {
            t.unpark();
        }
    }

    fn lookup(&self, iova: u64, len: u64) -> Option<CacheEntry> {
        let table = self.dma.read();
        let (&base, e) = table.range(..=iova).next_back()?;
        let end = iova.checked_add(len)?;
        (end <= base + e.len).then(|| CacheEntry {
            base,
            len: e.len,
            buf: e.buf.clone(),
            serial: e.serial,
        })
    }

    fn read32(&self, offset: u64) -> u32 {
        let lo = |v: u64| v as u32;
        let hi = |v: u64| (v >> 32) as u32;
        match offset {
            0x00 => lo(self.cap),
            0x04 => hi(self.cap),
            reg::VS => VERSION,
            reg::INTMS | reg::INTMC => self.intms.load(Ordering::Acquire),
            reg::CC => self.cc.load(Ordering::Acquire),
            reg::CSTS => {
                self.settle_unready();
                self.csts.load(Ordering::Acquire)
            }
            reg::AQA => self.aqa.load(Ordering::Acquire),
            0x28 => lo(self.asq.load(Ordering::Acquire)),
            0x2c => hi(self.asq.load(Ordering::Acquire)),
            0x30 => lo(self.acq.load(Ordering::Acquire)),
            0x34 => hi(self.acq.load(Ordering::Acquire)),
            reg::CRTO => self.cfg.crto.unwrap_or(0),
            _ => 0,
        }
    }

    fn read64(&self, offset: u64) -> u64 {
        match offset {
            reg::ASQ => self.asq.load(Ordering::Acquire),
            reg::ACQ => self.acq.load(Ordering::Acquire),
            _ => u64::from(self.read32(offset)) | u64::from(self.read32(offset + 4)) << 32,
        }
    }

    fn write64(self: &Arc<Self>, offset: u64, value: u64) {
        match offset {
            reg::ASQ => self.asq.store(value & !0xfff, Ordering::Release),
            reg::ACQ => self.acq.store(value & !0xfff, Ordering::Release),
            _ => {
                self.write32(offset, value as u32);
                self.write32(offset + 4, (value >> 32) as u32);
            }
        }
    }

    // A function level reset: the controller's registers and queues back to power-on.
    fn function_reset(&self) {
        let mut worker = self.worker.lock();
        if self.gone() {
            return;
        }
        self.disable(&mut worker, true);
        self.cc.store(0, Ordering::Release);
        self.aqa.store(0, Ordering::Release);
        self.asq.store(0, Ordering::Release);
        self.acq.store(0, Ordering::Release);
        self.intms.store(0, Ordering::Release);
    }

    // An Asynchronous Event of type Error status with `info` (00h: write to an invalid
    // doorbell register, 01h: invalid doorbell write value), log page Error Information.
    // Events of the type stay masked from then on until the host reads the log page.
    fn error_event(&self, info: u32) {
        // Not a command's error: no queue or command id.
        self.logs.record_error(0xffff, 0xffff, Status::SUCCESS, 0, 0);
        if self.error_events_masked.swap(true, Ordering::AcqRel) {
            return;
        }
        self.raise_event(info << 8 | u32::from(LOG_ERROR_INFORMATION) << 16);
    }

    // Completes an Asynchronous Event Request with `dw0` once the host has one
    // outstanding.
    fn raise_event(&self, dw0: u32) {
        self.async_events.lock().push_back(dw0);
        self.async_pending.store(true, Ordering::Release);
        if let Some(t) = &*self.waker.lock() {
            t.unpark();
        }
    }

    // Clears CSTS.RDY if the delay after CC.EN 1 -> 0 has passed.
    fn settle_unready(&self) {
        if !self.unready_pending.load(Ordering::Acquire) {
            return;
        }
        let mut at = self.unready_at.lock();
        if at.is_some_and(|t| Instant::now() >= t) {
            *at = None;
            self.unready_pending.store(false, Ordering::Release);
            self.csts.fetch_and(!csts::RDY, Ordering::AcqRel);
        }
    }

    // How long the next CSTS.RDY transition takes; `None`: RDY never becomes 1.
    fn ready_delay(&self) -> (Duration, bool) {
        let f = self.faults.lock();
        (f.ready_slow.unwrap_or(self.cfg.ready_delay), f.ready_never)
    }

    fn set_half(word: &AtomicU64, high: bool, value: u32) {
        let _ = word.fetch_update(Ordering::AcqRel, Ordering::Acquire, |old| {
            Some(if high {
                old & 0xffff_ffff | u64::from(value) << 32
            } else {
                old & !0xffff_ffff | u64::from(value & !0xfff)
            })
        });
    }

    fn write32(self: &Arc<Self>, offset: u64, value: u32) {
        match offset {
            reg::INTMS => {
                self.intms.fetch_or(value, Ordering::AcqRel);
            }
            reg::INTMC => {
                self.intms.fetch_and(!value, Ordering::AcqRel);
            }
            reg::CC => self.write_cc(value),
            reg::AQA => self.aqa.store(value & 0x0fff_0fff, Ordering::Release),
            0x28 => Self::set_half(&self.asq, false, value),
            0x2c => Self::set_half(&self.asq, true, value),
            0x30 => Self::set_half(&self.acq, false, value),
            0x34 => Self::set_half(&self.acq, true, value),
            o if o >= reg::DOORBELLS => self.doorbell(o - reg::DOORBELLS, value),
            _ => {} // read-only or reserved
        }
    }

    fn doorbell(&self, rel: u64, value: u32) {
        let stride = self.cfg.stride();
        let index = rel / stride;
        let counters = &self.counters;
        if !rel.is_multiple_of(stride) || index >= self.doorbells.len() as u64 {
            bump(&counters.invalid_doorbells);
            self.error_event(AEI_INVALID_DOORBELL_REGISTER);
            return;
        }
        bump(if index.is_multiple_of(2) {
            &counters.sq_doorbells
        } else {
            &counters.cq_doorbells
        });
        let _ = self.doorbells[index as usize].fetch_update(Ordering::SeqCst, Ordering::SeqCst, |old| {
            Some((old >> 32).wrapping_add(1) << 32 | u64::from(value))
        });
        self.kick();
    }

    fn write_cc(self: &Arc<Self>, value: u32) {
        let mut worker = self.worker.lock();
        if self.gone() {
            return;
        }
        let old = self.cc.swap(value, Ordering::AcqRel);
        let (was, now) = (old & cc::EN != 0, value & cc::EN != 0);
        if was && !now {
            self.disable(&mut worker, false);
            return;
        }
        if !was && now {
            self.enable(&mut worker, value);
        }
        let (old_shn, shn) = (old & cc::SHN_MASK, value & cc::SHN_MASK);
        if now && shn != 0 && old_shn == 0 {
            // Shutdown: stop processing; the queues stay until the host resets.
            self.stop_worker(&mut worker);
            if self.fatal_on_shutdown.swap(false, Ordering::AcqRel) {
                self.halted.store(true, Ordering::Release);
                return self.fail(format_args!("shutdown notification (injected fault)"));
            }
            let _ = self.csts.fetch_update(Ordering::AcqRel, Ordering::Acquire, |c| {
                Some(c & !csts::SHST_MASK | csts::SHST_COMPLETE)
            });
        } else if shn == 0 && old_shn != 0 {
            self.csts.fetch_and(!csts::SHST_MASK, Ordering::AcqRel);
        }
    }

    fn stop_worker(&self, worker: &mut Option<JoinHandle<()>>) {
        if let Some(m) = &self.model {
            // Not running: the model steps it under the model's lock, which every
            // register access holds too.
            drop(m.engine.lock().take());
        }
        if let Some(handle) = worker.take() {
            self.stop.store(true, Ordering::SeqCst);
            handle.thread().unpark();
            // A panic of the processing thread is a bug of the emulator; the controller
            // is reset either way.
            if handle.join().is_err() {
                log::error!("{}: emulated NVMe processing thread panicked", self.cfg.address);
            }
            self.stop.store(false, Ordering::SeqCst);
            *self.waker.lock() = None;
        }
    }

    // Stops processing and forgets every queue. CSTS.RDY, if it was 1, stays 1 for the
    // ready delay unless `at_once` (a function level reset).
    fn disable(&self, worker: &mut Option<JoinHandle<()>>, at_once: bool) {
        self.stop_worker(worker);
        for d in self.doorbells.iter() {
            d.store(0, Ordering::Release);
        }
        self.halted.store(false, Ordering::Release);
        let (delay, _) = self.ready_delay();
        let ready = self.csts.load(Ordering::Acquire) & csts::RDY != 0;
        let mut unready = self.unready_at.lock();
        if ready && !at_once && !delay.is_zero() {
            self.csts.store(csts::RDY, Ordering::Release);
            *unready = Some(Instant::now() + delay);
            self.unready_pending.store(true, Ordering::Release);
        } else {
            self.csts.store(0, Ordering::Release);
            *unready = None;
            self.unready_pending.store(false, Ordering::Release);
        }
        drop(unready);
        if let Some(s) = &mut *self.sriov.lock() {
            // A controller reset of the primary takes its secondaries offline and applies
            // its pending flexible allocation.
            s.primary = s.next_primary;
            for sec in &mut s.secondaries {
                sec.online = false;
            }
        }
    }

    fn fail(&self, why: fmt::Arguments<'_>) {
        log::warn!(
            "{}: emulated NVMe: {why}: controller fatal status",
            self.cfg.address
        );
        self.csts.fetch_or(csts::CFS, Ordering::AcqRel);
    }

    fn enable(self: &Arc<Self>, worker: &mut Option<JoinHandle<()>>, value: u32) {
        if self.halted.load(Ordering::Acquire) {
            return;
        }
        let mps = value >> cc::MPS_SHIFT & 0xf;
        let css = value >> cc::CSS_SHIFT & 0x7;
        let ams = value >> cc::AMS_SHIFT & 0x7;
        if mps != 0 || css != 0 || ams != 0 {
            return self.fail(format_args!(
                "CC {value:#x}: MPS {mps}, CSS {css}, AMS {ams} not supported"
            ));
        }
        let aqa = self.aqa.load(Ordering::Acquire);
        let (asqs, acqs) = ((aqa & 0xfff) + 1, (aqa >> 16 & 0xfff) + 1);
        if asqs < 2 || acqs < 2 || asqs > self.cfg.mqes || acqs > self.cfg.mqes {
            return self.fail(format_args!("AQA {aqa:#x}: admin queue sizes {asqs}/{acqs}"));
        }
        let (asq, acq) = (self.asq.load(Ordering::Acquire), self.acq.load(Ordering::Acquire));
        let sq = self.queue_memory(asq, u64::from(asqs) * 64, false);
        let cq = self.queue_memory(acq, u64::from(acqs) * 16, true);
        let (Some(sq), Some(cq)) = (sq, cq) else {
            bump(&self.counters.bad_dma);
            return self.fail(format_args!("ASQ {asq:#x} / ACQ {acq:#x} outside DMA memory"));
        };
        // A host that enables again before RDY went to 0 gets a fresh start.
        *self.unready_at.lock() = None;
        self.unready_pending.store(false, Ordering::Release);
        self.csts.store(0, Ordering::Release);
        let (delay, never) = self.ready_delay();
        bump(&self.counters.enables);
        let mut engine = Engine::new(Arc::clone(self));
        engine.ready_after = (!never).then_some(delay);
        let mut admin_sq = Sq::new(asqs, 0, sq);
        // Doorbell writes before the enable are not tails of this queue.
        admin_sq.mmio_seen = self.doorbells[0].load(Ordering::SeqCst);
        engine.sqs[0] = Some(admin_sq);
        let mut admin_cq = Cq::new(acqs, true, 0, cq);
        admin_cq.mmio_seen = self.doorbells[1].load(Ordering::SeqCst);
        admin_cq.sqs = 1;
        engine.cqs[0] = Some(admin_cq);
        engine.active.push(0);
        if let Some(m) = &self.model {
            *m.engine.lock() = Some(Box::new(engine));
            return;
        }
        let spawned = thread::Builder::new()
            .name(format!("nvme-emu {}", self.cfg.address))
            .spawn(move || engine.run());
        match spawned {
            Ok(handle) => {
                *self.waker.lock() = Some(handle.thread().clone());
                *worker = Some(handle);
            }
            Err(e) => self.fail(format_args!("spawning the processing thread: {e}")),
        }
    }

    // Queue memory: page aligned, inside one allocation (for a model, one the device may
    // `write` if it writes the queue; refusals are counted by the kit). Bus mastering is
    // checked at each access (`Engine::round`), not here: setting up queues moves no data.
    fn queue_memory(&self, iova: u64, len: u64, write: bool) -> Option<Mem> {
        if !iova.is_multiple_of(PAGE_U64) {
            return None;
        }
        if let Some(ctx) = self.ctx() {
            let (buf, off) = ctx.resolve(iova, usize::try_from(len).ok()?, write).ok()?;
            return Some(Mem {
                buf: Arc::downgrade(&buf),
                off,
            });
        }
        let e = self.lookup(iova, len)?;
        Some(Mem {
            buf: e.buf,
            off: (iova - e.base) as usize,
        })
    }
}

// ------------------------------------------------------------------------------------
// The processing engine (owned by the processing thread)
// ------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct Mem {
    buf: Weak<DmaBuffer>,
    off: usize,
}

#[derive(Debug)]
struct Sq {
    size: u32,
    head: u32,
    tail: u32,
    cqid: u16,
    mem: Mem,
    // The MMIO doorbell (value and write count) when last looked at.
    mmio_seen: u64,
    // The SQ head the last completion reported.
    reported: u32,
    shadow_seen: u32,
    event_index: Option<u32>,
}

impl Sq {
    fn new(size: u32, cqid: u16, mem: Mem) -> Sq {
        Sq {
            size,
            head: 0,
            tail: 0,
            cqid,
            mem,
            mmio_seen: 0,
            reported: 0,
            shadow_seen: 0,
            event_index: None,
        }
    }
}

#[derive(Debug)]
struct Cq {
    size: u32,
    head: u32,
    tail: u32,
    phase: bool,
    ien: bool,
    vector: u16,
    mem: Mem,
    sqs: u32,
    mmio_seen: u64,
    shadow_seen: u32,
    backlog: VecDeque<Completion>,
}

impl Cq {
    fn new(size: u32, ien: bool, vector: u16, mem: Mem) -> Cq {
        Cq {
            size,
            head: 0,
            tail: 0,
            phase: true,
            ien,
            vector,
            mem,
            sqs: 0,
            mmio_seen: 0,
            shadow_seen: 0,
            backlog: VecDeque::new(),
        }
    }

    fn full(&self) -> bool {
        (self.tail + 1) % self.size == self.head
    }
}

#[derive(Debug)]
struct Shadow {
    doorbells: Mem,
    event_indexes: Mem,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HeldKind {
    AsyncEvent,
    Swallowed,
    // Fetched, not executed until `release_stalled`; the newest allocation at its fetch.
    Stalled(Command, u64),
}

#[derive(Debug)]
struct Held {
    sqid: u16,
    cid: u16,
    kind: HeldKind,
    // An Abort (counts against the Abort Command Limit while held).
    abort: bool,
}

enum Outcome {
    Done(Status, u32),
    Hold(HeldKind),
}

fn ok(dw0: u32) -> Outcome {
    Outcome::Done(Status::SUCCESS, dw0)
}

fn err(s: Status) -> Outcome {
    Outcome::Done(s, 0)
}

struct Seg {
    buf: Arc<DmaBuffer>,
    off: usize,
    len: usize,
}

#[derive(Debug, Clone)]
struct CacheEntry {
    base: u64,
    len: u64,
    buf: Weak<DmaBuffer>,
    serial: u64,
}

struct Engine {
    shared: Arc<Shared>,
    sqs: Vec<Option<Sq>>,
    cqs: Vec<Option<Cq>>,
    // Existing SQ ids, in service order.
    active: Vec<u16>,
    granted: (u16, u16),
    io_queues_created: bool,
    shadow: Option<Shadow>,
    held: Vec<Held>,
    features: [u32; 0x10],
    cache: [Option<CacheEntry>; 4],
    cache_next: usize,
    segs: Vec<Seg>,
    // Vectors to signal at the end of this round.
    irq_vectors: Vec<u16>,
    stride_words: usize,
    // How long after the start CSTS.RDY becomes 1 (`None`: never).
    ready_after: Option<Duration>,
    // The newest allocation when the command being executed was fetched.
    fetch_serial: u64,
    // Shuffled completions: the generator's state, the CQ whose completions wait for the
    // end of the burst, and those completions.
    rng: Option<u64>,
    deferring: Option<u16>,
    deferred: Vec<(u16, Completion)>,
    // For a model (`step`): when the controller was enabled, and whether CSTS.RDY is 1.
    born: Instant,
    ready: bool,
}

// xorshift64*: deterministic, good enough to shuffle a burst.
fn xorshift(state: &mut u64) -> u64 {
    let mut x = *state;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *state = x;
    x.wrapping_mul(0x2545_f491_4f6c_dd1d)
}

impl Engine {
    fn new(shared: Arc<Shared>) -> Engine {
        let queues = usize::from(shared.cfg.max_io_queues) + 1;
        let max = shared.grant_limit.load(Ordering::Acquire) as u16;
        let stride_words = (shared.cfg.stride() / 4) as usize;
        Engine {
            sqs: (0..queues).map(|_| None).collect(),
            cqs: (0..queues).map(|_| None).collect(),
            active: Vec::new(),
            granted: (max, max),
            io_queues_created: false,
            shadow: None,
            held: Vec::new(),
            features: [0; 0x10],
            cache: Default::default(),
            cache_next: 0,
            segs: Vec::new(),
            irq_vectors: Vec::new(),
            stride_words,
            ready_after: Some(Duration::ZERO),
            fetch_serial: 0,
            // A zero state would stay zero.
            rng: shared.cfg.shuffle_completions.map(|seed| seed | 1),
            deferring: None,
            deferred: Vec::new(),
            born: Instant::now(),
            ready: false,
            shared,
        }
    }

    // One step of a controller running as a device model: what `run` does in one turn of
    // its loop, without sleeping (CSTS.RDY becomes 1 at the first step after the ready
    // delay).
    fn step(&mut self) -> bool {
        if !self.ready {
            match self.ready_after {
                Some(d) if self.born.elapsed() >= d => {
                    self.shared.csts.fetch_or(csts::RDY, Ordering::AcqRel);
                    self.ready = true;
                    return true;
                }
                _ => return false,
            }
        }
        if self.shared.gone() || self.shared.halted.load(Ordering::Acquire) {
            return false;
        }
        let progressed = self.round();
        self.signal();
        progressed
    }

    fn run(mut self) {
        let shared = Arc::clone(&self.shared);
        // Ready (and processing) only after the ready delay, or never.
        match self.ready_after {
            Some(d) => {
                self.sleep(d);
                if shared.stop.load(Ordering::Acquire) {
                    return;
                }
                shared.csts.fetch_or(csts::RDY, Ordering::AcqRel);
            }
            None => {
                while !shared.stop.load(Ordering::Acquire) {
                    thread::park_timeout(Duration::from_millis(50));
                }
                return;
            }
        }
        let mut idle_spins = 0u32;
        while !shared.stop.load(Ordering::Acquire) {
            if shared.gone() || shared.halted.load(Ordering::Acquire) {
                thread::park_timeout(Duration::from_millis(50));
                continue;
            }
            let progressed = self.round();
            self.signal();
            if progressed {
                idle_spins = 0;
                continue;
            }
            if shared.cfg.busy_poll {
                idle_spins = idle_spins.wrapping_add(1);
                if idle_spins.is_multiple_of(1024) {
                    thread::yield_now();
                } else {
                    std::hint::spin_loop();
                }
                continue;
            }
            // Sleep unless a doorbell arrives: whoever writes a doorbell after we look
            // sees `sleeping` and unparks us (both sides are SeqCst).
            shared.sleeping.store(true, Ordering::SeqCst);
            fence(Ordering::SeqCst);
            if !self.has_work() && !shared.stop.load(Ordering::SeqCst) {
                thread::park_timeout(Duration::from_millis(100));
            }
            shared.sleeping.store(false, Ordering::SeqCst);
        }
    }

    // ---- doorbells

    fn shadow_word(&self, index: usize) -> Option<u32> {
        let sh = self.shadow.as_ref()?;
        let buf = sh.doorbells.buf.upgrade()?;
        buf.load_acquire::<u32>(sh.doorbells.off + index * 4 * self.stride_words)
    }

    fn write_event_index(&self, index: usize, value: u32) {
        if let Some(sh) = &self.shadow {
            match sh.event_indexes.buf.upgrade() {
                Some(buf) => {
                    buf.store_release::<u32>(sh.event_indexes.off + index * 4 * self.stride_words, value);
                    bump(&self.shared.counters.event_index_writes);
                }
                None => self.shared.lost_memory("the shadow event index buffer"),
            }
        }
    }

    // The newest tail: from the shadow buffer if it changed since we last looked, else from
    // the MMIO doorbell if it was written since. A value not written again is no new tail
    // (hardware latches a doorbell write; it does not poll the register).
    fn refresh_sq_tail(&mut self, qid: u16) {
        // With shadow doorbells, an I/O queue's value comes from the shadow buffer only (the
        // MMIO write is a wake-up): taking whichever of the two changed last can go
        // backwards, since the host writes the shadow before the MMIO doorbell and this
        // thread reads them at different moments. The admin queue has no shadow: MMIO.
        let i = usize::from(qid);
        let shadow = if i > 0 { self.shadow_word(2 * i) } else { None };
        let mmio = self.shared.doorbells[2 * i].load(Ordering::SeqCst);
        let counters = &self.shared.counters;
        let Some(sq) = self.sqs[i].as_mut() else { return };
        let (value, changed) = match shadow {
            Some(s) => {
                let changed = s != sq.shadow_seen;
                if changed {
                    sq.shadow_seen = s;
                    bump(&counters.shadow_updates);
                }
                (s, changed)
            }
            None => {
                let changed = mmio != sq.mmio_seen;
                sq.mmio_seen = mmio;
                (mmio as u32, changed)
            }
        };
        if !changed {
            return;
        }
        if value < sq.size {
            sq.tail = value;
        } else {
            bump(&counters.invalid_doorbells);
            self.shared.error_event(AEI_INVALID_DOORBELL_VALUE);
        }
    }

    fn refresh_cq_head(&mut self, cqid: u16) {
        // With shadow doorbells, an I/O queue's value comes from the shadow buffer only (the
        // MMIO write is a wake-up): taking whichever of the two changed last can go
        // backwards, since the host writes the shadow before the MMIO doorbell and this
        // thread reads them at different moments. The admin queue has no shadow: MMIO.
        let i = usize::from(cqid);
        let shadow = if i > 0 { self.shadow_word(2 * i + 1) } else { None };
        let mmio = self.shared.doorbells[2 * i + 1].load(Ordering::SeqCst);
        let counters = &self.shared.counters;
        let Some(cq) = self.cqs[i].as_mut() else { return };
        let (value, changed) = match shadow {
            Some(s) => {
                let changed = s != cq.shadow_seen;
                if changed {
                    cq.shadow_seen = s;
                    bump(&counters.shadow_updates);
                }
                (s, changed)
            }
            None => {
                let changed = mmio != cq.mmio_seen;
                cq.mmio_seen = mmio;
                (mmio as u32, changed)
            }
        };
        if !changed {
            return;
        }
        if value < cq.size {
            cq.head = value;
        } else {
            bump(&counters.invalid_doorbells);
            self.shared.error_event(AEI_INVALID_DOORBELL_VALUE);
        }
    }

    // Whether CQ `cqid` has room for one more entry, after flushing its backlog.
    fn cq_has_room(&mut self, cqid: u16) -> bool {
        self.refresh_cq_head(cqid);
        self.flush_backlog(cqid);
        let blocked = self.cqs[usize::from(cqid)]
            .as_ref()
            .is_none_or(|cq| cq.full() || !cq.backlog.is_empty());
        if blocked && self.shadow.is_some() {
            // Ask the host to ring the head doorbell on its next update, then look again
            // (the host writes the shadow head before it reads the event index).
            let head = self.cqs[usize::from(cqid)].as_ref().map_or(0, |c| c.head);
            self.write_event_index(2 * usize::from(cqid) + 1, head);
            fence(Ordering::SeqCst);
            self.refresh_cq_head(cqid);
            self.flush_backlog(cqid);
            return self.cqs[usize::from(cqid)]
                .as_ref()
                .is_some_and(|cq| !cq.full() && cq.backlog.is_empty());
        }
        !blocked
    }

    fn has_work(&mut self) -> bool {
        if self.shared.async_pending.load(Ordering::Acquire) || self.shared.release.load(Ordering::Acquire) {
            return true;
        }
        for k in 0..self.active.len() {
            let qid = self.active[k];
            self.refresh_sq_tail(qid);
            let Some(sq) = &self.sqs[usize::from(qid)] else {
                continue;
            };
            if sq.head != sq.tail {
                let cqid = sq.cqid;
                if self.cq_has_room(cqid) {
                    return true;
                }
            }
        }
        false
    }

    // ---- the main loop

    fn round(&mut self) -> bool {
        let mut progressed = false;
        if !self.shared.bus_master_now() {
            // No command fetch, no completion post: every one is a memory access. Work left
            // in a queue is counted once per round that finds it.
            if self.has_work() {
                self.bus_master_on(0, 0);
            }
            return false;
        }
        if self.shared.release.swap(false, Ordering::AcqRel) {
            progressed |= self.release_stalled();
        }
        if self.shared.async_pending.load(Ordering::Acquire) {
            progressed |= self.deliver_async_events();
        }
        let mut k = 0;
        while k < self.active.len() {
            let qid = self.active[k];
            k += 1;
            self.refresh_sq_tail(qid);
            let mut n = 0;
            while n < BURST {
                let Some(sq) = &self.sqs[usize::from(qid)] else {
                    break;
                };
                if sq.head == sq.tail {
                    break;
                }
                let cqid = sq.cqid;
                if !self.cq_has_room(cqid) || self.cq_free(cqid) <= self.deferred.len() {
                    break;
                }
                if self.shared.stop.load(Ordering::Relaxed) || self.shared.halted.load(Ordering::Relaxed) {
                    return progressed;
                }
                if qid != 0 && self.rng.is_some() {
                    self.deferring = Some(cqid);
                }
                self.process_one(qid);
                self.deferring = None;
                progressed = true;
                n += 1;
                if n == BURST {
                    break;
                }
                if self.sqs[usize::from(qid)]
                    .as_ref()
                    .is_some_and(|s| s.head == s.tail)
                {
                    self.refresh_sq_tail(qid);
                }
            }
            self.post_deferred(qid);
            self.update_sq_event_index(qid);
        }
        progressed
    }

    // Free entries of CQ `cqid` beyond its backlog.
    fn cq_free(&self, cqid: u16) -> usize {
        self.cqs[usize::from(cqid)].as_ref().map_or(0, |cq| {
            let free = (cq.head + cq.size - cq.tail - 1) % cq.size;
            (free as usize).saturating_sub(cq.backlog.len())
        })
    }

    // Posts the completions of SQ `qid`'s burst in a shuffled order
    // (`EmuConfig::shuffle_completions`), each with the SQ head as it is now.
    fn post_deferred(&mut self, qid: u16) {
        if self.deferred.is_empty() {
            return;
        }
        let mut batch = std::mem::take(&mut self.deferred);
        if let Some(rng) = self.rng.as_mut() {
            for i in (1..batch.len()).rev() {
                let j = (xorshift(rng) % (i as u64 + 1)) as usize;
                batch.swap(i, j);
            }
        }
        let head = self.sqs[usize::from(qid)].as_ref().map(|sq| sq.head as u16);
        for (cqid, mut c) in batch.drain(..) {
            if let Some(h) = head {
                c.sq_head = h;
            }
            self.post(cqid, c);
        }
        self.deferred = batch;
    }

    fn update_sq_event_index(&mut self, qid: u16) {
        if self.shadow.is_none() {
            return;
        }
        let Some(sq) = &self.sqs[usize::from(qid)] else {
            return;
        };
        let tail = sq.tail;
        if sq.event_index != Some(tail) {
            self.write_event_index(2 * usize::from(qid), tail);
            if let Some(sq) = self.sqs[usize::from(qid)].as_mut() {
                sq.event_index = Some(tail);
            }
        }
    }

    fn process_one(&mut self, qid: u16) {
        let Some(sq) = self.sqs[usize::from(qid)].as_mut() else {
            return;
        };
        let slot = sq.head;
        sq.head = (sq.head + 1) % sq.size;
        let mut bytes = [0u8; 64];
        let fetched = sq
            .mem
            .buf
            .upgrade()
            .and_then(|b| b.read_at(sq.mem.off + slot as usize * 64, &mut bytes));
        if fetched.is_none() {
            // The SQ's memory is gone: the command cannot even be read.
            self.shared.lost_memory("a submission queue");
            return;
        }
        let cmd = Command::from_bytes(&bytes);
        self.fetch_serial = self.shared.alloc_serial.load(Ordering::Acquire);
        let is_admin = qid == 0;
        let table = if is_admin {
            &self.shared.counters.admin
        } else {
            &self.shared.counters.io
        };
        bump(&table[usize::from(cmd.opcode)]);

        if !is_admin && self.shared.fatal_on_io.load(Ordering::Acquire) {
            // Fault::FatalOnIo: fetched, never completed; processing stops until a reset.
            self.shared.halted.store(true, Ordering::Release);
            return self
                .shared
                .fail(format_args!("I/O command fetched (injected fault)"));
        }
        if is_admin && cmd.opcode == admin::ABORT && self.aborts_over_limit() {
            bump(&self.shared.counters.aborts_over_limit);
            return self.complete(qid, cmd.cid, Status::ABORT_LIMIT_EXCEEDED, 0);
        }
        if self.shared.faults_pending.load(Ordering::Acquire) {
            let (delay, pre) = self.command_faults(is_admin, cmd.opcode);
            if let Some(d) = delay {
                self.sleep(d);
            }
            match pre {
                Some(Outcome::Hold(HeldKind::Stalled(..))) => {
                    let kind = HeldKind::Stalled(cmd, self.fetch_serial);
                    return self.hold(qid, cmd.cid, cmd.opcode, kind);
                }
                Some(Outcome::Hold(kind)) => return self.hold(qid, cmd.cid, cmd.opcode, kind),
                Some(Outcome::Done(status, dw0)) => {
                    self.log_outcome(qid, &cmd, status);
                    return self.complete(qid, cmd.cid, status, dw0);
                }
                None => {}
            }
        }
        self.execute(qid, &cmd);
    }

    fn execute(&mut self, qid: u16, cmd: &Command) {
        let psdt = cmd.flags & spec::sgl::PSDT_MASK;
        if qid != 0 && psdt == spec::sgl::PSDT_SGL {
            bump(&self.shared.counters.sgl_commands);
        }
        let sgl_ok = qid != 0 && self.shared.cfg.sgl && psdt == spec::sgl::PSDT_SGL;
        let outcome = if cmd.flags & 0x03 != 0 || (psdt != 0 && !sgl_ok) {
            // Fused operations are not supported; SGLs only for I/O commands, when
            // configured, and without metadata SGLs (PSDT 01b only).
            err(Status::INVALID_FIELD)
        } else if qid == 0 {
            self.admin_command(cmd)
        } else {
            self.io_command(cmd)
        };
        match outcome {
            Outcome::Done(status, dw0) => {
                self.log_outcome(qid, cmd, status);
                self.complete(qid, cmd.cid, status, dw0)
            }
            Outcome::Hold(kind) => self.hold(qid, cmd.cid, cmd.opcode, kind),
        }
    }

    // What the log pages keep of a command completing with `status`: its data moved (SMART
    // / health), or its error (Error Information; aborts are not errors of the controller).
    fn log_outcome(&self, qid: u16, cmd: &Command, status: Status) {
        let rw = qid != 0 && matches!(cmd.opcode, nvm::READ | nvm::WRITE);
        if status.is_success() {
            if rw && let Some(i) = self.namespace_index(cmd.nsid) {
                let blocks = u64::from(cmd.cdw[2] & 0xffff) + 1;
                let bytes = blocks * u64::from(self.shared.namespaces[i].block_size);
                self.shared.logs.io_done(cmd.opcode == nvm::WRITE, bytes);
            }
            return;
        }
        if matches!(status, Status::ABORT_REQUESTED | Status::ABORTED_SQ_DELETION) {
            return;
        }
        let lba = if rw {
            u64::from(cmd.cdw[0]) | u64::from(cmd.cdw[1]) << 32
        } else {
            0
        };
        self.shared.logs.record_error(qid, cmd.cid, status, cmd.nsid, lba);
    }

    // Whether ACL + 1 Aborts are outstanding already.
    fn aborts_over_limit(&self) -> bool {
        let held = self.held.iter().filter(|h| h.abort).count();
        held > usize::from(self.shared.cfg.abort_limit)
    }

    // Executes the stalled commands (`EmulatedNvme::release_stalled`), in the order they
    // were fetched.
    fn release_stalled(&mut self) -> bool {
        let (stalled, kept): (Vec<Held>, Vec<Held>) = std::mem::take(&mut self.held)
            .into_iter()
            .partition(|h| matches!(h.kind, HeldKind::Stalled(..)));
        self.held = kept;
        let any = !stalled.is_empty();
        for h in stalled {
            if let HeldKind::Stalled(cmd, serial) = h.kind {
                self.fetch_serial = serial;
                self.execute(h.sqid, &cmd);
            }
        }
        any
    }

    fn command_faults(&mut self, is_admin: bool, opcode: u8) -> (Option<Duration>, Option<Outcome>) {
        let mut f = self.shared.faults.lock();
        let delay = f.delay;
        let mut pre = None;
        if let Some(i) = f.never.iter().position(|(m, _)| m.matches(is_admin, opcode)) {
            f.never[i].1 -= 1;
            if f.never[i].1 == 0 {
                f.never.remove(i);
            }
            pre = Some(Outcome::Hold(HeldKind::Swallowed));
        } else if let Some(i) = f.stall.iter().position(|(m, _)| m.matches(is_admin, opcode)) {
            f.stall[i].1 -= 1;
            if f.stall[i].1 == 0 {
                f.stall.remove(i);
            }
            pre = Some(Outcome::Hold(HeldKind::Stalled(Command::default(), 0)));
        } else if let Some(i) = f.status.iter().position(|(m, _, _)| m.matches(is_admin, opcode)) {
            let status = f.status[i].1;
            f.status[i].2 -= 1;
            if f.status[i].2 == 0 {
                f.status.remove(i);
            }
            pre = Some(Outcome::Done(status, 0));
        }
        if f.is_empty() {
            self.shared.faults_pending.store(false, Ordering::Release);
        }
        (delay, pre)
    }

    fn sleep(&self, d: Duration) {
        let until = Instant::now() + d;
        while !self.shared.stop.load(Ordering::Relaxed) {
            let now = Instant::now();
            if now >= until {
                break;
            }
            thread::sleep((until - now).min(Duration::from_millis(5)));
        }
    }

    fn hold(&mut self, sqid: u16, cid: u16, opcode: u8, kind: HeldKind) {
        if self.held.len() >= HELD_LIMIT {
            self.held.remove(0);
        }
        let abort = sqid == 0 && opcode == admin::ABORT;
        self.held.push(Held {
            sqid,
            cid,
            kind,
            abort,
        });
    }

    fn complete(&mut self, sqid: u16, cid: u16, status: Status, dw0: u32) {
        let Some(sq) = &self.sqs[usize::from(sqid)] else {
            return;
        };
        let c = Completion {
            dw0,
            dw1: 0,
            sq_head: sq.head as u16,
            sq_id: sqid,
            cid,
            status: (status.0 & 0x7fff) << 1,
        };
        let cqid = sq.cqid;
        self.post(cqid, c);
    }

    // Queues a completion on CQ `cqid` and writes what fits (or keeps it for the end of the
    // burst, when completions are shuffled).
    fn post(&mut self, cqid: u16, mut c: Completion) {
        if self.deferring == Some(cqid) {
            self.deferred.push((cqid, c));
            return;
        }
        let mut copies = 1;
        let mut stale = false;
        let mut back = false;
        let mut frozen = false;
        let mut forged = Vec::new();
        if self.shared.faults_pending.load(Ordering::Acquire) {
            let mut f = self.shared.faults.lock();
            forged.extend(f.forged.drain(..));
            if f.wrong_cid > 0 {
                f.wrong_cid -= 1;
                c.cid = if c.cid == 0xffff { 0xfffe } else { 0xffff };
            }
            if f.duplicate > 0 {
                f.duplicate -= 1;
                copies = 2;
            }
            if f.stale_phase > 0 {
                f.stale_phase -= 1;
                stale = true;
            }
            if f.sq_head_back > 0 {
                f.sq_head_back -= 1;
                back = true;
            }
            if f.sq_head_frozen > 0 {
                f.sq_head_frozen -= 1;
                frozen = true;
            }
            if f.is_empty() {
                self.shared.faults_pending.store(false, Ordering::Release);
            }
        }
        if stale {
            c.dw1 |= STALE_MARK;
        }
        if let Some(sq) = self.sqs.get_mut(usize::from(c.sq_id)).and_then(Option::as_mut) {
            if back {
                c.sq_head = ((sq.reported + sq.size - 1) % sq.size) as u16;
            } else if frozen {
                c.sq_head = sq.reported as u16;
            } else {
                sq.reported = u32::from(c.sq_head);
            }
        }
        let Some(cq) = self.cqs[usize::from(cqid)].as_mut() else {
            return;
        };
        for mut f in forged {
            f.dw1 &= !STALE_MARK;
            cq.backlog.push_back(f);
        }
        for _ in 0..copies {
            cq.backlog.push_back(c);
        }
        self.flush_backlog(cqid);
    }

    fn flush_backlog(&mut self, cqid: u16) {
        let counters = &self.shared.counters;
        let Some(cq) = self.cqs[usize::from(cqid)].as_mut() else {
            return;
        };
        if cq.backlog.is_empty() {
            return;
        }
        let buf = cq.mem.buf.upgrade();
        while !cq.full() {
            let Some(mut c) = cq.backlog.pop_front() else {
                break;
            };
            let stale = c.dw1 & STALE_MARK != 0;
            c.dw1 &= !STALE_MARK;
            let phase = cq.phase != stale;
            c.status = c.status & !1 | u16::from(phase);
            let b = c.to_bytes();
            let off = cq.mem.off + cq.tail as usize * 16;
            let written = buf.as_ref().and_then(|buf| {
                let w0 = u64::from_ne_bytes(b[0..8].try_into().ok()?);
                let w1 = u64::from_ne_bytes(b[8..16].try_into().ok()?);
                buf.write::<u64>(off, w0)?;
                // The word with the phase tag last, with release: a host that reads it
                // with acquire sees the rest.
                buf.store_release::<u64>(off + 8, w1)
            });
            if written.is_none() {
                self.shared.lost_memory("a completion queue");
            } else {
                bump(&counters.completions);
            }
            cq.tail += 1;
            if cq.tail == cq.size {
                cq.tail = 0;
                cq.phase = !cq.phase;
            }
            if cq.ien && !self.irq_vectors.contains(&cq.vector) {
                self.irq_vectors.push(cq.vector);
            }
        }
    }

    // Signals the vectors of CQs that got entries since the last call.
    fn signal(&mut self) {
        if self.irq_vectors.is_empty() {
            return;
        }
        if self.shared.faults_pending.load(Ordering::Acquire) {
            let mut f = self.shared.faults.lock();
            if f.lost_irqs > 0 {
                let lost = (f.lost_irqs as usize).min(self.irq_vectors.len());
                f.lost_irqs -= lost as u32;
                self.irq_vectors.drain(..lost);
            }
            if f.is_empty() {
                self.shared.faults_pending.store(false, Ordering::Release);
            }
        }
        if let Some(ctx) = self.shared.ctx() {
            // Through the kit's interrupt model: the vector of the kind enabled (an INTx
            // pulse for INTx), not delivered while it is masked or bus mastering is off.
            let enabled = ctx.enabled_interrupts();
            for v in self.irq_vectors.drain(..) {
                let delivered = match enabled {
                    Some((InterruptKind::Intx, _)) => ctx.raise(InterruptKind::Intx, 0),
                    Some((kind, n)) if u32::from(v) < n => ctx.raise(kind, u32::from(v)),
                    _ => false,
                };
                if delivered {
                    bump(&self.shared.counters.interrupts);
                }
            }
            return;
        }
        let irqs = self.shared.irqs.read();
        for v in self.irq_vectors.drain(..) {
            if let Some(fd) = irqs.get(usize::from(v)) {
                // EAGAIN (counter saturated) still leaves it readable.
                let _ = nix::unistd::write(fd, &1u64.to_ne_bytes());
                bump(&self.shared.counters.interrupts);
            }
        }
    }

    fn deliver_async_events(&mut self) -> bool {
        let mut progressed = false;
        while let Some(i) = self.held.iter().position(|h| h.kind == HeldKind::AsyncEvent) {
            let Some(dw0) = self.shared.async_events.lock().pop_front() else {
                break;
            };
            let h = self.held.remove(i);
            self.complete(h.sqid, h.cid, Status::SUCCESS, dw0);
            progressed = true;
        }
        if self.shared.async_events.lock().is_empty() {
            self.shared.async_pending.store(false, Ordering::Release);
        }
        progressed
    }

    // ---- DMA

    // The buffer behind `len` bytes at `iova` for the command being executed. DMA into a
    // buffer allocated after the command was fetched is done (as hardware would) and
    // counted as late.
    fn resolve(&mut self, iova: u64, len: usize) -> Option<(Arc<DmaBuffer>, usize)> {
        let len = len as u64;
        let end = iova.checked_add(len)?;
        let mut found = None;
        for e in self.cache.iter().flatten() {
            if iova >= e.base && end <= e.base + e.len {
                // A dead entry: the buffer is gone, but its IOVA may belong to another one
                // now (the table knows).
                if let Some(b) = e.buf.upgrade() {
                    found = Some((b, (iova - e.base) as usize, e.serial));
                }
                break;
            }
        }
        if found.is_none() {
            let e = self.shared.lookup(iova, len)?;
            let arc = e.buf.upgrade()?;
            found = Some((arc, (iova - e.base) as usize, e.serial));
            self.cache[self.cache_next] = Some(e);
            self.cache_next = (self.cache_next + 1) % self.cache.len();
        }
        let (buf, off, serial) = found?;
        if serial > self.fetch_serial {
            bump(&self.shared.counters.late_dma);
        }
        Some((buf, off))
    }

    // The buffer behind a DMA transfer, or why there is none: Bus Master Enable off (the
    // request never leaves the function), or no live buffer there (`bad_dma`).
    // For a model, the kit resolves it (and counts what it refuses); `write`: the device
    // writes the memory.
    fn dma_target(&mut self, iova: u64, len: usize, write: bool) -> Result<(Arc<DmaBuffer>, usize), Status> {
        if let Some(ctx) = self.shared.ctx() {
            return ctx.reach(iova, len, write).map_err(|fault| {
                let counters = &self.shared.counters;
                bump(match fault {
                    DmaFault::BusMasterOff { .. } => &counters.dma_without_bus_master,
                    _ => &counters.bad_dma,
                });
                Status::DATA_TRANSFER_ERROR
            });
        }
        if !self.bus_master_on(iova, len) {
            return Err(Status::DATA_TRANSFER_ERROR);
        }
        self.resolve(iova, len).ok_or_else(|| {
            bump(&self.shared.counters.bad_dma);
            Status::DATA_TRANSFER_ERROR
        })
    }

    // Whether the function may master the bus now; counted and logged when not.
    fn bus_master_on(&self, iova: u64, len: usize) -> bool {
        if self.shared.bus_master_now() {
            return true;
        }
        bump(&self.shared.counters.dma_without_bus_master);
        if let Some(ctx) = self.shared.ctx() {
            ctx.refuse_without_bus_master(iova, len, false);
            return false;
        }
        log::error!(
            "emulated NVMe {}: DMA of {len} bytes at IOVA {iova:#x} with Bus Master Enable off: refused (a real \
             device's would never reach memory; turn bus mastering on: DeviceBacking::set_bus_master)",
            self.shared.cfg.address
        );
        false
    }

    fn push_seg(&mut self, out: &mut Vec<Seg>, iova: u64, len: usize, write: bool) -> Result<(), Status> {
        let (buf, off) = self.dma_target(iova, len, write)?;
        if let Some(last) = out.last_mut()
            && Arc::ptr_eq(&last.buf, &buf)
            && last.off + last.len == off
        {
            last.len += len;
            return Ok(());
        }
        out.push(Seg { buf, off, len });
        Ok(())
    }

    // The host memory of a `len`-byte transfer described by PRP1/PRP2.
    fn prp_segments(
        &mut self,
        prp1: u64,
        prp2: u64,
        len: usize,
        write: bool,
        out: &mut Vec<Seg>,
    ) -> Result<(), Status> {
        out.clear();
        if len == 0 {
            return Ok(());
        }
        let off1 = (prp1 % PAGE_U64) as usize;
        if !off1.is_multiple_of(4) {
            return Err(Status::PRP_OFFSET_INVALID);
        }
        let first = len.min(PAGE - off1);
        self.push_seg(out, prp1, first, write)?;
        let mut left = len - first;
        if left == 0 {
            return Ok(());
        }
        if left <= PAGE {
            if !prp2.is_multiple_of(PAGE_U64) {
                return Err(Status::PRP_OFFSET_INVALID);
            }
            return self.push_seg(out, prp2, left, write);
        }
        if !prp2.is_multiple_of(8) {
            return Err(Status::PRP_OFFSET_INVALID);
        }
        let mut list = prp2;
        while left > 0 {
            let room = (PAGE - (list % PAGE_U64) as usize) / 8;
            let needed = left.div_ceil(PAGE);
            let (count, chain) = if needed <= room {
                (needed, false)
            } else {
                (room - 1, true)
            };
            let entries = count + usize::from(chain);
            let (buf, off) = self.dma_target(list, entries * 8, false)?;
            for i in 0..count {
                let entry = u64::from_le(buf.read::<u64>(off + 8 * i).unwrap_or(u64::MAX));
                if !entry.is_multiple_of(PAGE_U64) {
                    return Err(Status::PRP_OFFSET_INVALID);
                }
                let n = left.min(PAGE);
                self.push_seg(out, entry, n, write)?;
                left -= n;
            }
            if chain {
                list = u64::from_le(buf.read::<u64>(off + 8 * count).unwrap_or(u64::MAX));
                if !list.is_multiple_of(PAGE_U64) {
                    return Err(Status::PRP_OFFSET_INVALID);
                }
            }
        }
        Ok(())
    }

    // The host memory of a `len`-byte transfer of `cmd`: its PRPs, or its SGL (PSDT 01b;
    // `execute` refused it unless SGLs are on).
    // `write`: the device writes the memory (a read command's data).
    fn data_segments(
        &mut self,
        cmd: &Command,
        len: usize,
        write: bool,
        out: &mut Vec<Seg>,
    ) -> Result<(), Status> {
        if cmd.flags & spec::sgl::PSDT_MASK == spec::sgl::PSDT_SGL {
            self.sgl_segments(cmd.prp1, cmd.prp2, len, write, out)
        } else {
            self.prp_segments(cmd.prp1, cmd.prp2, len, write, out)
        }
    }

    // The host memory of a `len`-byte transfer described by the SGL descriptor in the data
    // pointer (`prp1`, `prp2`), checked as the module docs' SGLs section says.
    fn sgl_segments(
        &mut self,
        prp1: u64,
        prp2: u64,
        len: usize,
        write: bool,
        out: &mut Vec<Seg>,
    ) -> Result<(), Status> {
        use spec::sgl::{DATA_BLOCK, DESCRIPTOR_SIZE, LAST_SEGMENT, SEGMENT};
        const MAX_DESCRIPTORS: usize = 65536;
        out.clear();
        let mut left = len;
        let mut take = |this: &mut Self, out: &mut Vec<Seg>, addr: u64, dlen: u32| -> Result<(), Status> {
            let dlen = dlen as usize;
            if dlen == 0 {
                return Ok(());
            }
            if dlen > left || addr.checked_add(dlen as u64).is_none() {
                return Err(Status::DATA_SGL_LENGTH_INVALID);
            }
            this.push_seg(out, addr, dlen, write)?;
            left -= dlen;
            Ok(())
        };
        let (addr, dlen, kind, sub) = spec::sgl::parse_dptr(prp1, prp2);
        if sub != 0 {
            return Err(Status::SGL_DESCRIPTOR_TYPE_INVALID);
        }
        let mut seg = match kind {
            DATA_BLOCK => {
                take(self, out, addr, dlen)?;
                None
            }
            SEGMENT | LAST_SEGMENT => Some((addr, dlen, kind)),
            _ => return Err(Status::SGL_DESCRIPTOR_TYPE_INVALID),
        };
        let mut walked = 0usize;
        while let Some((addr, slen, kind)) = seg.take() {
            let slen = slen as usize;
            if slen == 0 || !slen.is_multiple_of(DESCRIPTOR_SIZE) || !addr.is_multiple_of(8) {
                return Err(Status::INVALID_SGL_SEGMENT_DESCRIPTOR);
            }
            let n = slen / DESCRIPTOR_SIZE;
            walked += n;
            if walked > MAX_DESCRIPTORS {
                return Err(Status::INVALID_SGL_DESCRIPTOR_COUNT);
            }
            let (buf, off) = self.dma_target(addr, slen, false)?;
            let mut list = vec![0u8; slen];
            buf.read_at(off, &mut list);
            for (i, d) in list.chunks_exact(DESCRIPTOR_SIZE).enumerate() {
                let mut b = [0u8; DESCRIPTOR_SIZE];
                b.copy_from_slice(d);
                let (daddr, dlen, dkind, dsub) = spec::sgl::parse(&b);
                if dsub != 0 {
                    return Err(Status::SGL_DESCRIPTOR_TYPE_INVALID);
                }
                match dkind {
                    DATA_BLOCK => take(self, out, daddr, dlen)?,
                    // A Segment's list ends with the descriptor of the next list; a Last
                    // Segment's list has none.
                    SEGMENT | LAST_SEGMENT if kind == SEGMENT && i == n - 1 => {
                        seg = Some((daddr, dlen, dkind));
                    }
                    SEGMENT | LAST_SEGMENT => return Err(Status::INVALID_SGL_SEGMENT_DESCRIPTOR),
                    _ => return Err(Status::SGL_DESCRIPTOR_TYPE_INVALID),
                }
            }
            if kind == SEGMENT && seg.is_none() {
                return Err(Status::INVALID_SGL_SEGMENT_DESCRIPTOR);
            }
        }
        if left != 0 {
            return Err(Status::DATA_SGL_LENGTH_INVALID);
        }
        Ok(())
    }

    fn write_host(&mut self, cmd: &Command, data: &[u8]) -> Result<(), Status> {
        let mut segs = std::mem::take(&mut self.segs);
        let r = self.data_segments(cmd, data.len(), true, &mut segs);
        if r.is_ok() {
            let mut done = 0;
            for s in &segs {
                s.buf.write_at(s.off, &data[done..done + s.len]);
                done += s.len;
            }
        }
        segs.clear();
        self.segs = segs;
        r
    }

    fn read_host(&mut self, cmd: &Command, len: usize) -> Result<Vec<u8>, Status> {
        let mut segs = std::mem::take(&mut self.segs);
        let r = self.data_segments(cmd, len, false, &mut segs);
        let mut data = vec![0u8; len];
        if r.is_ok() {
            let mut done = 0;
            for s in &segs {
                s.buf.read_at(s.off, &mut data[done..done + s.len]);
                done += s.len;
            }
        }
        segs.clear();
        self.segs = segs;
        r.map(|()| data)
    }

    // ---- admin commands

    fn admin_command(&mut self, cmd: &Command) -> Outcome {
        match cmd.opcode {
            admin::IDENTIFY => self.identify(cmd),
            admin::SET_FEATURES => self.set_features(cmd),
            admin::GET_FEATURES => self.get_features(cmd),
            admin::CREATE_CQ => self.create_cq(cmd),
            admin::CREATE_SQ => self.create_sq(cmd),
            admin::DELETE_SQ => self.delete_sq(cmd),
            admin::DELETE_CQ => self.delete_cq(cmd),
            admin::GET_LOG_PAGE => self.get_log_page(cmd),
            admin::ASYNC_EVENT => {
                let outstanding = self
                    .held
                    .iter()
                    .filter(|h| h.kind == HeldKind::AsyncEvent)
                    .count();
                if outstanding >= AER_LIMIT {
                    err(Status::ASYNC_EVENT_LIMIT_EXCEEDED)
                } else {
                    Outcome::Hold(HeldKind::AsyncEvent)
                }
            }
            admin::ABORT => self.abort(cmd),
            admin::DOORBELL_BUFFER_CONFIG if self.shared.cfg.shadow_doorbells => {
                self.doorbell_buffer_config(cmd)
            }
            admin::VIRT_MGMT if self.shared.cfg.sriov.is_some() => self.virt_mgmt(cmd),
            _ => err(Status::INVALID_OPCODE),
        }
    }

    fn identify(&mut self, cmd: &Command) -> Outcome {
        let cns = cmd.cdw[0] & 0xff;
        let cntid = (cmd.cdw[0] >> 16) as u16;
        let data = match cns {
            cns::NAMESPACE => match self.namespace_index(cmd.nsid) {
                Some(i) => identify_namespace(&self.shared.namespaces[i]),
                // An inactive namespace (allocated, not attached) reads zeros.
                None if (1..=self.shared.namespaces.len() as u32).contains(&cmd.nsid) => vec![0u8; 4096],
                None => return err(Status::INVALID_NAMESPACE),
            },
            cns::CONTROLLER => identify_controller(&self.shared.cfg),
            cns::IO_CONTROLLER => {
                // Only the NVM command set (CSI 0).
                if cmd.cdw[1] >> 24 != 0 {
                    return err(Status::INVALID_FIELD);
                }
                let cfg = &self.shared.cfg;
                let mut b = vec![0u8; 4096];
                b[1] = cfg.wzsl;
                b[3] = cfg.dmrl;
                put(&mut b, 4, &cfg.dmrsl.to_le_bytes());
                put(&mut b, 8, &cfg.dmsl.to_le_bytes());
                b
            }
            cns::ACTIVE_NAMESPACES => {
                if cmd.nsid >= 0xffff_fffe {
                    return err(Status::INVALID_NAMESPACE);
                }
                let mut b = vec![0u8; 4096];
                let count = self.shared.namespaces.len() as u32;
                let active = (cmd.nsid + 1..=count).filter(|&n| {
                    self.shared.namespaces[n as usize - 1]
                        .attached
                        .load(Ordering::Acquire)
                });
                for (slot, nsid) in active.take(1024).enumerate() {
                    b[4 * slot..4 * slot + 4].copy_from_slice(&nsid.to_le_bytes());
                }
                b
            }
            cns::PRIMARY_CONTROLLER_CAPS | cns::SECONDARY_CONTROLLERS => {
                let sriov = self.shared.sriov.lock();
                match (&*sriov, cns) {
                    (Some(s), cns::PRIMARY_CONTROLLER_CAPS) => primary_caps(s, &self.shared.cfg),
                    (Some(s), _) => secondary_list(s, cntid),
                    (None, _) => return err(Status::INVALID_FIELD),
                }
            }
            _ => return err(Status::INVALID_FIELD),
        };
        match self.write_host(cmd, &data) {
            Ok(()) => ok(0),
            Err(s) => err(s),
        }
    }

    // The index of active namespace `nsid` (attached).
    fn namespace_index(&self, nsid: u32) -> Option<usize> {
        let i = usize::try_from(nsid).ok()?.checked_sub(1)?;
        self.shared
            .namespaces
            .get(i)
            .is_some_and(|n| n.attached.load(Ordering::Acquire))
            .then_some(i)
    }

    fn set_features(&mut self, cmd: &Command) -> Outcome {
        let fid = (cmd.cdw[0] & 0xff) as u8;
        match fid {
            feature::NUMBER_OF_QUEUES => {
                if self.io_queues_created {
                    return err(Status::COMMAND_SEQUENCE_ERROR);
                }
                let (nsqr, ncqr) = (cmd.cdw[1] & 0xffff, cmd.cdw[1] >> 16);
                if nsqr == 0xffff || ncqr == 0xffff {
                    return err(Status::INVALID_FIELD);
                }
                let max = self.shared.grant_limit.load(Ordering::Acquire);
                let sq = (nsqr + 1).min(max) as u16;
                let cq = (ncqr + 1).min(max) as u16;
                self.granted = (sq, cq);
                ok(u32::from(cq - 1) << 16 | u32::from(sq - 1))
            }
            0x01..=0x0b => {
                self.features[usize::from(fid)] = cmd.cdw[1];
                if fid == feature::ASYNC_EVENT_CONFIG {
                    self.shared.logs.aec.store(cmd.cdw[1], Ordering::Release);
                }
                ok(0)
            }
            _ => err(Status::INVALID_FIELD),
        }
    }

    fn get_features(&mut self, cmd: &Command) -> Outcome {
        let fid = (cmd.cdw[0] & 0xff) as u8;
        match fid {
            feature::NUMBER_OF_QUEUES => {
                let (sq, cq) = self.granted;
                ok(u32::from(cq - 1) << 16 | u32::from(sq - 1))
            }
            0x01..=0x0b => ok(self.features[usize::from(fid)]),
            _ => err(Status::INVALID_FIELD),
        }
    }

    fn get_log_page(&mut self, cmd: &Command) -> Outcome {
        let (id, _, len, offset, retain) = spec::logs::parse_get_log_page(cmd);
        // Reading Error Information without Retain Asynchronous Event unmasks error events.
        if id == LOG_ERROR_INFORMATION && !retain {
            self.shared.error_events_masked.store(false, Ordering::Release);
        }
        if len as u64 > self.shared.cfg.max_transfer().min(1 << 20) {
            return err(Status::INVALID_FIELD);
        }
        // The page from `offset`, zeros past its end (and for pages without contents).
        let mut data = vec![0u8; len];
        if let Some(page) = self.shared.logs.page(id, retain)
            && let Some(from) = usize::try_from(offset).ok().filter(|&o| o < page.len())
        {
            let n = (page.len() - from).min(len);
            data[..n].copy_from_slice(&page[from..from + n]);
        }
        match self.write_host(cmd, &data) {
            Ok(()) => ok(0),
            Err(s) => err(s),
        }
    }

    fn queue_args(&self, cmd: &Command) -> (u16, u32) {
        ((cmd.cdw[0] & 0xffff) as u16, (cmd.cdw[0] >> 16) + 1)
    }

    fn create_cq(&mut self, cmd: &Command) -> Outcome {
        let (qid, size) = self.queue_args(cmd);
        let (pc, ien, vector) = (
            cmd.cdw[1] & 1 != 0,
            cmd.cdw[1] & 2 != 0,
            (cmd.cdw[1] >> 16) as u16,
        );
        if qid == 0 || qid > self.granted.1 || self.cqs[usize::from(qid)].is_some() {
            return err(Status::INVALID_QUEUE_ID);
        }
        if size < 2 || size > self.shared.cfg.mqes {
            return err(Status::INVALID_QUEUE_SIZE);
        }
        if ien && vector >= self.shared.cfg.msix_vectors {
            return err(Status::INVALID_INTERRUPT_VECTOR);
        }
        let iocqes = self.shared.cc.load(Ordering::Acquire) >> cc::IOCQES_SHIFT & 0xf;
        if !pc || !cmd.prp1.is_multiple_of(PAGE_U64) || iocqes != 4 {
            return err(Status::INVALID_FIELD);
        }
        let Some(mem) = self.shared.queue_memory(cmd.prp1, u64::from(size) * 16, true) else {
            bump(&self.shared.counters.bad_dma);
            return err(Status::DATA_TRANSFER_ERROR);
        };
        let mut cq = Cq::new(size, ien, vector, mem);
        // A new queue starts at head 0: what the doorbell holds from a deleted queue of the
        // same id is not a head of this one.
        let i = 2 * usize::from(qid) + 1;
        cq.mmio_seen = self.shared.doorbells[i].load(Ordering::SeqCst);
        cq.shadow_seen = self.shadow_word(i).unwrap_or(0);
        self.cqs[usize::from(qid)] = Some(cq);
        self.io_queues_created = true;
        ok(0)
    }

    fn create_sq(&mut self, cmd: &Command) -> Outcome {
        let (qid, size) = self.queue_args(cmd);
        let (pc, cqid) = (cmd.cdw[1] & 1 != 0, (cmd.cdw[1] >> 16) as u16);
        if qid == 0 || qid > self.granted.0 || self.sqs[usize::from(qid)].is_some() {
            return err(Status::INVALID_QUEUE_ID);
        }
        if cqid == 0 || usize::from(cqid) >= self.cqs.len() || self.cqs[usize::from(cqid)].is_none() {
            return err(Status::INVALID_CQ);
        }
        if size < 2 || size > self.shared.cfg.mqes {
            return err(Status::INVALID_QUEUE_SIZE);
        }
        let iosqes = self.shared.cc.load(Ordering::Acquire) >> cc::IOSQES_SHIFT & 0xf;
        if !pc || !cmd.prp1.is_multiple_of(PAGE_U64) || iosqes != 6 {
            return err(Status::INVALID_FIELD);
        }
        let Some(mem) = self.shared.queue_memory(cmd.prp1, u64::from(size) * 64, false) else {
            bump(&self.shared.counters.bad_dma);
            return err(Status::DATA_TRANSFER_ERROR);
        };
        let mut sq = Sq::new(size, cqid, mem);
        // A new queue starts at tail 0: what the doorbell holds from a deleted queue of the
        // same id is not a tail of this one.
        let i = 2 * usize::from(qid);
        sq.mmio_seen = self.shared.doorbells[i].load(Ordering::SeqCst);
        sq.shadow_seen = self.shadow_word(i).unwrap_or(0);
        self.sqs[usize::from(qid)] = Some(sq);
        if let Some(cq) = self.cqs[usize::from(cqid)].as_mut() {
            cq.sqs += 1;
        }
        self.active.push(qid);
        self.io_queues_created = true;
        if self.shadow.is_some() {
            self.write_event_index(i, 0);
        }
        ok(0)
    }

    fn delete_sq(&mut self, cmd: &Command) -> Outcome {
        let qid = (cmd.cdw[0] & 0xffff) as u16;
        if qid == 0 || usize::from(qid) >= self.sqs.len() || self.sqs[usize::from(qid)].is_none() {
            return err(Status::INVALID_QUEUE_ID);
        }
        // Commands the controller holds for this SQ are aborted.
        let (gone, kept): (Vec<Held>, Vec<Held>) = std::mem::take(&mut self.held)
            .into_iter()
            .partition(|h| h.sqid == qid);
        self.held = kept;
        for h in gone {
            self.complete(qid, h.cid, Status::ABORTED_SQ_DELETION, 0);
        }
        if let Some(sq) = self.sqs[usize::from(qid)].take()
            && let Some(cq) = self.cqs[usize::from(sq.cqid)].as_mut()
        {
            cq.sqs -= 1;
        }
        self.active.retain(|&q| q != qid);
        ok(0)
    }

    fn delete_cq(&mut self, cmd: &Command) -> Outcome {
        let qid = (cmd.cdw[0] & 0xffff) as u16;
        let Some(cq) = self
            .cqs
            .get(usize::from(qid))
            .and_then(Option::as_ref)
            .filter(|_| qid != 0)
        else {
            return err(Status::INVALID_QUEUE_ID);
        };
        if cq.sqs > 0 {
            return err(Status::INVALID_QUEUE_DELETION);
        }
        self.cqs[usize::from(qid)] = None;
        ok(0)
    }

    fn abort(&mut self, cmd: &Command) -> Outcome {
        let (sqid, cid) = ((cmd.cdw[0] & 0xffff) as u16, (cmd.cdw[0] >> 16) as u16);
        if !self.shared.cfg.abort_succeeds {
            // Whatever it is, it is being executed (or done): not aborted.
            return ok(1);
        }
        match self.held.iter().position(|h| h.sqid == sqid && h.cid == cid) {
            Some(i) => {
                let h = self.held.remove(i);
                self.complete(h.sqid, h.cid, Status::ABORT_REQUESTED, 0);
                ok(0)
            }
            None => ok(1), // not aborted
        }
    }

    fn doorbell_buffer_config(&mut self, cmd: &Command) -> Outcome {
        if !cmd.prp1.is_multiple_of(PAGE_U64) || !cmd.prp2.is_multiple_of(PAGE_U64) {
            return err(Status::INVALID_FIELD);
        }
        let dbs = self.shared.queue_memory(cmd.prp1, PAGE_U64, false);
        let eis = self.shared.queue_memory(cmd.prp2, PAGE_U64, true);
        let (Some(doorbells), Some(event_indexes)) = (dbs, eis) else {
            bump(&self.shared.counters.bad_dma);
            return err(Status::DATA_TRANSFER_ERROR);
        };
        self.shadow = Some(Shadow {
            doorbells,
            event_indexes,
        });
        // The shadow buffer starts from what the controller knows, so a stale value in
        // it is not taken for a new doorbell.
        let dbs = self.shadow.as_ref().and_then(|s| s.doorbells.buf.upgrade());
        let words = self.stride_words;
        let off = self.shadow.as_ref().map_or(0, |s| s.doorbells.off);
        for i in 0..self.sqs.len() {
            if let Some(sq) = self.sqs[i].as_mut() {
                if let Some(b) = &dbs {
                    b.store_release::<u32>(off + 2 * i * 4 * words, sq.tail);
                }
                sq.shadow_seen = sq.tail;
                sq.event_index = None;
            }
            if let Some(cq) = self.cqs[i].as_mut() {
                if let Some(b) = &dbs {
                    b.store_release::<u32>(off + (2 * i + 1) * 4 * words, cq.head);
                }
                cq.shadow_seen = cq.head;
            }
        }
        ok(0)
    }

    fn virt_mgmt(&mut self, cmd: &Command) -> Outcome {
        let act = (cmd.cdw[0] & 0xf) as u8;
        let rt = (cmd.cdw[0] >> 8 & 0x7) as u8;
        let cntlid = (cmd.cdw[0] >> 16) as u16;
        let nr = (cmd.cdw[1] & 0xffff) as u16;
        let mut guard = self.shared.sriov.lock();
        let Some(s) = guard.as_mut() else {
            return err(Status::INVALID_OPCODE);
        };
        let total = [s.config.flexible_vq, s.config.flexible_vi];
        let needs_rt = matches!(
            act,
            virt_mgmt::PRIMARY_FLEXIBLE_ALLOCATION | virt_mgmt::SECONDARY_ASSIGN
        );
        if needs_rt && rt > virt_mgmt::RESOURCE_VI {
            return err(Status::INVALID_RESOURCE_ID);
        }
        let r = rt as usize & 1;
        let assigned = |s: &SriovState, except: Option<usize>| -> u32 {
            s.secondaries
                .iter()
                .enumerate()
                .filter(|&(i, _)| Some(i) != except)
                .map(|(_, sec)| u32::from(if r == 0 { sec.nvq } else { sec.nvi }))
                .sum()
        };
        let secondary = usize::from(cntlid)
            .checked_sub(1)
            .filter(|&i| i < s.secondaries.len());
        match act {
            virt_mgmt::PRIMARY_FLEXIBLE_ALLOCATION => {
                if cntlid != 0 {
                    return err(Status::INVALID_CONTROLLER_ID);
                }
                if u32::from(nr) + assigned(s, None) > u32::from(total[r]) {
                    return err(Status::INVALID_RESOURCE_COUNT);
                }
                // Takes effect at the next controller reset.
                s.next_primary[r] = nr;
                ok(u32::from(nr))
            }
            virt_mgmt::SECONDARY_OFFLINE => {
                let Some(i) = secondary else {
                    return err(Status::INVALID_CONTROLLER_ID);
                };
                // Offline releases the secondary's flexible resources, as QEMU does: a
                // host must Assign them again before Online.
                s.secondaries[i] = Secondary::default();
                ok(0)
            }
            virt_mgmt::SECONDARY_ASSIGN => {
                let Some(i) = secondary else {
                    return err(Status::INVALID_CONTROLLER_ID);
                };
                if s.secondaries[i].online {
                    return err(Status::INVALID_SECONDARY_STATE);
                }
                let free = u32::from(total[r])
                    .saturating_sub(u32::from(s.primary[r]))
                    .saturating_sub(assigned(s, Some(i)));
                if u32::from(nr) > free {
                    return err(Status::INVALID_RESOURCE_COUNT);
                }
                if r == 0 {
                    s.secondaries[i].nvq = nr;
                } else {
                    s.secondaries[i].nvi = nr;
                }
                ok(u32::from(nr))
            }
            virt_mgmt::SECONDARY_ONLINE => {
                let Some(i) = secondary else {
                    return err(Status::INVALID_CONTROLLER_ID);
                };
                let sec = &mut s.secondaries[i];
                // An admin queue pair and one I/O pair, and an interrupt, at least.
                if sec.nvq < 2 || sec.nvi < 1 {
                    return err(Status::INVALID_SECONDARY_STATE);
                }
                sec.online = true;
                ok(0)
            }
            _ => err(Status::INVALID_FIELD),
        }
    }

    // ---- NVM commands

    fn io_command(&mut self, cmd: &Command) -> Outcome {
        match cmd.opcode {
            nvm::FLUSH => {
                if cmd.nsid == spec::NSID_ALL || self.namespace_index(cmd.nsid).is_some() {
                    ok(0)
                } else {
                    err(Status::INVALID_NAMESPACE)
                }
            }
            nvm::READ | nvm::WRITE => self.read_write(cmd),
            nvm::WRITE_ZEROES if self.shared.cfg.oncs & oncs::WRITE_ZEROES != 0 => self.write_zeroes(cmd),
            nvm::DATASET_MANAGEMENT if self.shared.cfg.oncs & oncs::DATASET_MANAGEMENT != 0 => {
                self.dataset_management(cmd)
            }
            _ => err(Status::INVALID_OPCODE),
        }
    }

    // The namespace and the byte range of an LBA-range command.
    fn lba_range(&self, cmd: &Command) -> Result<(usize, u64, u64), Status> {
        let i = self.namespace_index(cmd.nsid).ok_or(Status::INVALID_NAMESPACE)?;
        let ns = &self.shared.namespaces[i];
        let slba = u64::from(cmd.cdw[0]) | u64::from(cmd.cdw[1]) << 32;
        let nlb = u64::from(cmd.cdw[2] & 0xffff) + 1;
        if slba.checked_add(nlb).is_none_or(|end| end > ns.blocks()) {
            return Err(Status::LBA_OUT_OF_RANGE);
        }
        let bs = u64::from(ns.block_size);
        Ok((i, slba * bs, nlb * bs))
    }

    fn read_write(&mut self, cmd: &Command) -> Outcome {
        if let Some(i) = self.namespace_index(cmd.nsid) {
            let ns = &self.shared.namespaces[i];
            if ns.ms > 0 {
                return self.read_write_metadata(cmd, i);
            }
            let len = (u64::from(cmd.cdw[2] & 0xffff) + 1) * u64::from(ns.block_size);
            if len > self.shared.cfg.max_transfer() {
                return err(Status::INVALID_FIELD);
            }
        }
        let (i, pos, len) = match self.lba_range(cmd) {
            Ok(r) => r,
            Err(s) => return err(s),
        };
        let mut segs = std::mem::take(&mut self.segs);
        let r = self.data_segments(cmd, len as usize, cmd.opcode != nvm::WRITE, &mut segs);
        if r.is_ok() {
            let ns = &self.shared.namespaces[i];
            let mut map = ns.chunks.lock();
            let mut at = pos;
            for s in &segs {
                if cmd.opcode == nvm::WRITE {
                    Namespace::write_from_dma(&mut map, at, &s.buf, s.off, s.len);
                } else {
                    Namespace::read_into_dma(&map, at, &s.buf, s.off, s.len);
                }
                at += s.len as u64;
            }
        }
        segs.clear();
        self.segs = segs;
        match r {
            Ok(()) => ok(0),
            Err(s) => err(s),
        }
    }

    fn write_zeroes(&mut self, cmd: &Command) -> Outcome {
        match self.lba_range(cmd) {
            Ok((i, pos, len)) => {
                let ns = &self.shared.namespaces[i];
                if let Some(max) = self.shared.cfg.wzsl_bytes()
                    && len > max
                {
                    return err(Status::INVALID_FIELD);
                }
                if ns.ms > 0 {
                    let bs = u64::from(ns.block_size);
                    let (slba, nlb) = (pos / bs, len / bs);
                    let pi = Pi::of(ns, cmd);
                    if let Err(s) = pi.check_ref_seed(slba) {
                        return err(s);
                    }
                    // The metadata is cleared, or with PRACT the protection information
                    // generated for zeroed data.
                    let zero = vec![0u8; ns.block_size as usize];
                    let mut meta = ns.meta.lock();
                    for k in 0..nlb {
                        let mut m = vec![0u8; usize::from(ns.ms)].into_boxed_slice();
                        if pi.pract {
                            pi.generate(ns, &zero, &mut m, k);
                        }
                        meta.insert(slba + k, m);
                    }
                }
                Namespace::zero(&mut ns.chunks.lock(), pos, len);
                ok(0)
            }
            Err(s) => err(s),
        }
    }

    // A read or write of a namespace with metadata: the data and metadata travel through
    // the PRPs (extended LBAs) or the data through the PRPs and the metadata through MPTR,
    // except the protection information that PRACT inserts or strips when it is all the
    // metadata; protection information is checked as PRCHK asks.
    fn read_write_metadata(&mut self, cmd: &Command, i: usize) -> Outcome {
        let shared = Arc::clone(&self.shared);
        let ns = &shared.namespaces[i];
        let (bs, ms) = (ns.block_size as usize, usize::from(ns.ms));
        let slba = u64::from(cmd.cdw[0]) | u64::from(cmd.cdw[1]) << 32;
        let nlb = u64::from(cmd.cdw[2] & 0xffff) + 1;
        if slba.checked_add(nlb).is_none_or(|end| end > ns.blocks()) {
            return err(Status::LBA_OUT_OF_RANGE);
        }
        let n = nlb as usize;
        let pi = Pi::of(ns, cmd);
        // With PRACT and only the 8 bytes of protection information, no metadata moves.
        let moves_meta = !(pi.pract && ms == 8);
        let host_block = bs + if ns.extended && moves_meta { ms } else { 0 };
        let len = n * host_block;
        if len as u64 > shared.cfg.max_transfer() {
            return err(Status::INVALID_FIELD);
        }
        if let Err(s) = pi.check_ref_seed(slba) {
            return err(s);
        }
        let separate = moves_meta && !ns.extended;
        if cmd.opcode == nvm::WRITE {
            let host = match self.read_host(cmd, len) {
                Ok(d) => d,
                Err(s) => return err(s),
            };
            let meta_in = if separate {
                let mut m = vec![0u8; n * ms];
                if let Err(s) = self.read_mptr(cmd.mptr, &mut m) {
                    return err(s);
                }
                m
            } else {
                Vec::new()
            };
            let mut data = Vec::with_capacity(n * bs);
            let mut metas = Vec::with_capacity(n);
            for k in 0..n {
                let block = &host[k * host_block..k * host_block + bs];
                let mut m = vec![0u8; ms].into_boxed_slice();
                if ns.extended && moves_meta {
                    m.copy_from_slice(&host[k * host_block + bs..(k + 1) * host_block]);
                } else if separate {
                    m.copy_from_slice(&meta_in[k * ms..(k + 1) * ms]);
                }
                if pi.pract {
                    pi.generate(ns, block, &mut m, k as u64);
                } else if let Err(s) = pi.check(ns, block, &m, k as u64) {
                    return err(s);
                }
                data.extend_from_slice(block);
                metas.push(m);
            }
            let mut map = ns.chunks.lock();
            for (chunk, coff, len, done) in pieces(slba * bs as u64, data.len() as u64) {
                let c = map
                    .entry(chunk)
                    .or_insert_with(|| vec![0u8; CHUNK as usize].into_boxed_slice());
                c[coff..coff + len].copy_from_slice(&data[done..done + len]);
            }
            let mut meta = ns.meta.lock();
            for (k, m) in metas.into_iter().enumerate() {
                meta.insert(slba + k as u64, m);
            }
            return ok(0);
        }
        // Read.
        let mut data = vec![0u8; n * bs];
        {
            let map = ns.chunks.lock();
            for (chunk, coff, len, done) in pieces(slba * bs as u64, data.len() as u64) {
                if let Some(c) = map.get(&chunk) {
                    data[done..done + len].copy_from_slice(&c[coff..coff + len]);
                }
            }
        }
        let metas: Vec<Box<[u8]>> = {
            let meta = ns.meta.lock();
            (0..nlb)
                .map(|k| {
                    meta.get(&(slba + k))
                        .cloned()
                        .unwrap_or_else(|| vec![0xff; ms].into_boxed_slice())
                })
                .collect()
        };
        for (k, m) in metas.iter().enumerate() {
            if let Err(s) = pi.check(ns, &data[k * bs..(k + 1) * bs], m, k as u64) {
                return err(s);
            }
        }
        let mut host = Vec::with_capacity(len);
        for (k, m) in metas.iter().enumerate() {
            host.extend_from_slice(&data[k * bs..(k + 1) * bs]);
            if ns.extended && moves_meta {
                host.extend_from_slice(m);
            }
        }
        if separate {
            let all: Vec<u8> = metas.iter().flat_map(|m| m.iter().copied()).collect();
            if let Err(s) = self.write_mptr(cmd.mptr, &all) {
                return err(s);
            }
        }
        match self.write_host(cmd, &host) {
            Ok(()) => ok(0),
            Err(s) => err(s),
        }
    }

    // The metadata buffer at MPTR: one contiguous piece of DMA memory, dword aligned.
    fn read_mptr(&mut self, mptr: u64, out: &mut [u8]) -> Result<(), Status> {
        let (buf, off) = self.mptr_buffer(mptr, out.len(), false)?;
        buf.read_at(off, out);
        Ok(())
    }

    fn write_mptr(&mut self, mptr: u64, data: &[u8]) -> Result<(), Status> {
        let (buf, off) = self.mptr_buffer(mptr, data.len(), true)?;
        buf.write_at(off, data);
        Ok(())
    }

    fn mptr_buffer(&mut self, mptr: u64, len: usize, write: bool) -> Result<(Arc<DmaBuffer>, usize), Status> {
        if !mptr.is_multiple_of(4) {
            return Err(Status::INVALID_FIELD);
        }
        self.dma_target(mptr, len, write)
    }

    fn dataset_management(&mut self, cmd: &Command) -> Outcome {
        let Some(i) = self.namespace_index(cmd.nsid) else {
            return err(Status::INVALID_NAMESPACE);
        };
        let nr = (cmd.cdw[0] & 0xff) as usize + 1;
        let cfg = &self.shared.cfg;
        if cfg.dmrl != 0 && nr > usize::from(cfg.dmrl) {
            return err(Status::INVALID_FIELD);
        }
        let data = match self.read_host(cmd, nr * dsm::RANGE_SIZE) {
            Ok(d) => d,
            Err(s) => return err(s),
        };
        if cmd.cdw[1] & dsm::DEALLOCATE == 0 {
            return ok(0); // hints only
        }
        let ns = &self.shared.namespaces[i];
        let bs = u64::from(ns.block_size);
        let (dmrsl, dmsl) = (u64::from(self.shared.cfg.dmrsl), self.shared.cfg.dmsl);
        let mut ranges = Vec::with_capacity(nr);
        let mut total = 0u64;
        for r in data.chunks_exact(dsm::RANGE_SIZE) {
            let nlb = u64::from(u32::from_le_bytes([r[4], r[5], r[6], r[7]]));
            let slba = u64::from_le_bytes([r[8], r[9], r[10], r[11], r[12], r[13], r[14], r[15]]);
            if slba.checked_add(nlb).is_none_or(|end| end > ns.blocks()) {
                return err(Status::LBA_OUT_OF_RANGE);
            }
            total += nlb;
            if (dmrsl != 0 && nlb > dmrsl) || (dmsl != 0 && total > dmsl) {
                return err(Status::INVALID_FIELD);
            }
            ranges.push((slba, nlb));
        }
        let mut map = ns.chunks.lock();
        let mut meta = ns.meta.lock();
        for (slba, nlb) in ranges {
            Namespace::zero(&mut map, slba * bs, nlb * bs);
            if ns.ms > 0 && nlb > 0 {
                let gone: Vec<u64> = meta.range(slba..slba + nlb).map(|(&k, _)| k).collect();
                for k in gone {
                    meta.remove(&k);
                }
            }
        }
        ok(0)
    }
}

// The protection information settings of one command (PRINFO, ILBRT, LBAT/LBATM) on a
// namespace; all off when the namespace has no protection information (PRINFO is then
// ignored).
#[derive(Debug, Clone, Copy)]
struct Pi {
    ty: u8,
    pract: bool,
    guard: bool,
    app: bool,
    reftag: bool,
    ilbrt: u32,
    lbat: u16,
    lbatm: u16,
}

impl Pi {
    fn of(ns: &Namespace, cmd: &Command) -> Pi {
        let prinfo = cmd.cdw[2] >> 26 & 0xf;
        let on = ns.pi != 0;
        Pi {
            ty: ns.pi,
            pract: on && prinfo & 8 != 0,
            guard: on && prinfo & 4 != 0,
            app: on && prinfo & 2 != 0,
            // Type 3 has no reference tag to check.
            reftag: on && prinfo & 1 != 0 && ns.pi != 3,
            ilbrt: cmd.cdw[4],
            lbat: cmd.cdw[5] as u16,
            lbatm: (cmd.cdw[5] >> 16) as u16,
        }
    }

    // Type 1: the initial reference tag checked must be the starting LBA's low 32 bits.
    fn check_ref_seed(&self, slba: u64) -> Result<(), Status> {
        if self.ty == 1 && self.reftag && self.ilbrt != slba as u32 {
            return Err(Status::INVALID_PROTECTION_INFO);
        }
        Ok(())
    }

    // The reference tag of the command's block `k`.
    fn expected_ref(&self, k: u64) -> u32 {
        if self.ty == 3 {
            self.ilbrt
        } else {
            self.ilbrt.wrapping_add(k as u32)
        }
    }

    fn place(ns: &Namespace) -> usize {
        if ns.pi_first { 0 } else { usize::from(ns.ms) - 8 }
    }

    // PRACT on a write: the protection information of `data`, block `k`, into `meta`.
    fn generate(&self, ns: &Namespace, data: &[u8], meta: &mut [u8], k: u64) {
        if self.ty == 0 {
            return;
        }
        let at = Self::place(ns);
        meta[at..at + 2].copy_from_slice(&spec::crc16_t10dif(data).to_be_bytes());
        meta[at + 2..at + 4].copy_from_slice(&self.lbat.to_be_bytes());
        meta[at + 4..at + 8].copy_from_slice(&self.expected_ref(k).to_be_bytes());
    }

    // The checks PRCHK asks of block `k`'s `data` and `meta`.
    fn check(&self, ns: &Namespace, data: &[u8], meta: &[u8], k: u64) -> Result<(), Status> {
        if self.ty == 0 {
            return Ok(());
        }
        let at = Self::place(ns);
        let guard = u16::from_be_bytes([meta[at], meta[at + 1]]);
        let app = u16::from_be_bytes([meta[at + 2], meta[at + 3]]);
        let reftag = u32::from_be_bytes([meta[at + 4], meta[at + 5], meta[at + 6], meta[at + 7]]);
        // The escape values turn every check off.
        if app == 0xffff && (self.ty != 3 || reftag == 0xffff_ffff) {
            return Ok(());
        }
        if self.guard && spec::crc16_t10dif(data) != guard {
            return Err(Status::GUARD_CHECK_ERROR);
        }
        if self.app && app & self.lbatm != self.lbat & self.lbatm {
            return Err(Status::APP_TAG_CHECK_ERROR);
        }
        if self.reftag && reftag != self.expected_ref(k) {
            return Err(Status::REF_TAG_CHECK_ERROR);
        }
        Ok(())
    }
}

// A completion waiting in a backlog that must be written with the wrong phase. Dword 1 is
// reserved in NVMe completions (zero), so its top bit carries the mark until written.
const STALE_MARK: u32 = 1 << 31;

// ------------------------------------------------------------------------------------
// Identify data
// ------------------------------------------------------------------------------------

fn put(b: &mut [u8], at: usize, bytes: &[u8]) {
    b[at..at + bytes.len()].copy_from_slice(bytes);
}

fn ascii_field(b: &mut [u8], at: usize, width: usize, s: &str) {
    b[at..at + width].fill(b' ');
    let n = s.len().min(width);
    b[at..at + n].copy_from_slice(&s.as_bytes()[..n]);
}

fn identify_controller(cfg: &EmuConfig) -> Vec<u8> {
    let mut b = vec![0u8; 4096];
    put(&mut b, 0, &cfg.vendor_id.to_le_bytes());
    put(&mut b, 2, &cfg.vendor_id.to_le_bytes());
    ascii_field(&mut b, 4, 20, &cfg.serial);
    ascii_field(&mut b, 24, 40, &cfg.model);
    ascii_field(&mut b, 64, 8, &cfg.firmware);
    b[72] = 6; // recommended arbitration burst
    b[77] = cfg.mdts;
    put(&mut b, 78, &0u16.to_le_bytes()); // controller id: the primary is 0
    put(&mut b, 80, &VERSION.to_le_bytes());
    b[111] = 1; // an I/O controller
    let mut oacs_bits = 0u16;
    if cfg.shadow_doorbells {
        oacs_bits |= oacs::DOORBELL_BUFFER_CONFIG;
    }
    if cfg.sriov.is_some() {
        oacs_bits |= oacs::VIRT_MGMT;
    }
    put(&mut b, 256, &oacs_bits.to_le_bytes());
    b[258] = cfg.abort_limit; // zero-based
    b[259] = (AER_LIMIT - 1) as u8;
    b[262] = (logs::ERROR_LOG_ENTRIES - 1) as u8;
    // Namespace attribute notices supported.
    put(&mut b, 92, &spec::logs::aec::NAMESPACE_ATTRIBUTE.to_le_bytes());
    b[260] = 0x03; // one firmware slot, read-only
    b[512] = 0x66;
    b[513] = 0x44;
    put(&mut b, 516, &(cfg.namespaces.len() as u32).to_le_bytes());
    put(&mut b, 520, &cfg.oncs.to_le_bytes());
    b[525] = 0x07; // volatile write cache present; Flush takes the broadcast NSID
    if cfg.sgl {
        // SGLs for I/O commands, no alignment rule; nothing of bits 2 and up.
        put(&mut b, 536, &1u32.to_le_bytes());
    }
    let nqn = format!("nqn.2024-01.io.pcibus:emu:{}", cfg.serial);
    let n = nqn.len().min(255);
    put(&mut b, 768, &nqn.as_bytes()[..n]);
    put(&mut b, 2048, &2500u16.to_le_bytes()); // power state 0: 25 W
    b
}

fn identify_namespace(ns: &Namespace) -> Vec<u8> {
    let mut b = vec![0u8; 4096];
    for at in [0, 8, 16] {
        put(&mut b, at, &ns.blocks().to_le_bytes());
    }
    // Two LBA formats, 512 and 4096 bytes, and a third with the namespace's metadata.
    b[25] = if ns.ms > 0 { 2 } else { 1 };
    b[26] = if ns.ms > 0 {
        2
    } else {
        u8::from(ns.block_size == 4096)
    } | if ns.extended { 0x10 } else { 0 };
    b[27] = 0x03; // metadata: extended LBAs and separate buffers supported
    b[28] = 0x1f; // protection types 1–3, first or last 8 bytes of metadata
    b[29] = ns.pi | u8::from(ns.pi_first) << 3;
    b[33] = 0x09; // deallocated blocks read zero; Write Zeroes may deallocate
    put(&mut b, 128, &(9u32 << 16).to_le_bytes());
    put(&mut b, 132, &(12u32 << 16).to_le_bytes());
    let lbads = ns.block_size.trailing_zeros();
    put(&mut b, 136, &(u32::from(ns.ms) | lbads << 16).to_le_bytes());
    b
}

fn primary_caps(s: &SriovState, cfg: &EmuConfig) -> Vec<u8> {
    let mut b = vec![0u8; 4096];
    b[4] = 0x3; // VQ and VI resources supported
    let c = s.config;
    put(&mut b, 32, &u32::from(c.flexible_vq).to_le_bytes());
    let vq_assigned: u32 = s.secondaries.iter().map(|x| u32::from(x.nvq)).sum();
    put(&mut b, 36, &vq_assigned.to_le_bytes());
    put(&mut b, 40, &s.primary[0].to_le_bytes());
    put(&mut b, 42, &(cfg.max_io_queues.saturating_add(1)).to_le_bytes());
    put(&mut b, 44, &c.flexible_vq.to_le_bytes());
    put(&mut b, 46, &1u16.to_le_bytes());
    put(&mut b, 64, &u32::from(c.flexible_vi).to_le_bytes());
    let vi_assigned: u32 = s.secondaries.iter().map(|x| u32::from(x.nvi)).sum();
    put(&mut b, 68, &vi_assigned.to_le_bytes());
    put(&mut b, 72, &s.primary[1].to_le_bytes());
    put(&mut b, 74, &cfg.msix_vectors.to_le_bytes());
    put(&mut b, 76, &c.flexible_vi.to_le_bytes());
    put(&mut b, 78, &1u16.to_le_bytes());
    b
}

fn secondary_list(s: &SriovState, from: u16) -> Vec<u8> {
    let mut b = vec![0u8; 4096];
    let mut n = 0usize;
    for (i, sec) in s.secondaries.iter().enumerate() {
        let scid = i as u16 + 1;
        if scid < from || n == 127 {
            continue;
        }
        let e = 32 + 32 * n;
        put(&mut b, e, &scid.to_le_bytes());
        put(&mut b, e + 2, &0u16.to_le_bytes());
        b[e + 4] = u8::from(sec.online);
        put(&mut b, e + 8, &scid.to_le_bytes()); // VF number
        put(&mut b, e + 10, &sec.nvq.to_le_bytes());
        put(&mut b, e + 12, &sec.nvi.to_le_bytes());
        n += 1;
    }
    b[0] = n as u8;
    b
}

// ------------------------------------------------------------------------------------
// Handles
// ------------------------------------------------------------------------------------

// One handle of the controller. The last one to drop stops the processing thread.
#[derive(Debug)]
struct Handle {
    shared: Arc<Shared>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        let mut worker = self.shared.worker.lock();
        self.shared.stop_worker(&mut worker);
    }
}

/// An emulated NVMe controller; clones are handles of the same controller. See the
/// [module docs](self).
#[derive(Debug, Clone)]
pub struct EmulatedNvme {
    handle: Arc<Handle>,
}

/// BAR 0 of an [`EmulatedNvme`]: the controller registers and doorbells. A handle of the
/// controller.
#[derive(Debug, Clone)]
pub struct EmuRegisters {
    handle: Arc<Handle>,
}

/// DMA memory of an [`EmulatedNvme`]: a [`DmaBuffer`] at an IOVA the controller can reach
/// until this is dropped. A handle of the controller.
pub struct EmuDma {
    buffer: Arc<DmaBuffer>,
    iova: u64,
    handle: Arc<Handle>,
}

impl fmt::Debug for EmuDma {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EmuDma")
            .field("iova", &format_args!("{:#x}", self.iova))
            .field("len", &self.buffer.len())
            .finish()
    }
}

impl Deref for EmuDma {
    type Target = DmaBuffer;
    fn deref(&self) -> &DmaBuffer {
        &self.buffer
    }
}

impl DmaMemory for EmuDma {
    fn iova(&self) -> u64 {
        self.iova
    }
}

impl Drop for EmuDma {
    fn drop(&mut self) {
        // Unmapped first: from here on the controller's lookups fail (and its cached
        // `Weak`s die with the buffer).
        self.handle.shared.dma.write().remove(&self.iova);
    }
}

/// Whether an [`EmulatedNvme`]'s internals still exist, without keeping them: from
/// [`EmulatedNvme::liveness`], for leak tests.
#[derive(Debug, Clone)]
pub struct Liveness(Weak<Shared>);

impl Liveness {
    /// Whether the controller (its state and its processing thread) is still alive.
    pub fn is_alive(&self) -> bool {
        self.0.strong_count() > 0
    }
}

impl EmulatedNvme {
    /// A disabled controller (CC.EN = 0) as `config` describes it.
    pub fn new(config: EmuConfig) -> Result<Self, EmuError> {
        config.check()?;
        Ok(EmulatedNvme {
            handle: Arc::new(Handle {
                shared: Arc::new(Shared::new(config, false)),
            }),
        })
    }

    fn shared(&self) -> &Arc<Shared> {
        &self.handle.shared
    }

    /// The configuration it was built with.
    pub fn config(&self) -> &EmuConfig {
        &self.shared().cfg
    }

    /// Injects a fault (see [`Fault`]).
    pub fn inject(&self, fault: Fault) {
        let shared = self.shared();
        match fault {
            Fault::Gone => {
                shared.gone.store(true, Ordering::Release);
                return;
            }
            Fault::FatalStatus => {
                shared.halted.store(true, Ordering::Release);
                shared.csts.fetch_or(csts::CFS, Ordering::AcqRel);
                return;
            }
            Fault::FatalOnShutdown => {
                shared.fatal_on_shutdown.store(true, Ordering::Release);
                return;
            }
            Fault::FatalOnIo => {
                shared.fatal_on_io.store(true, Ordering::Release);
                return;
            }
            Fault::FatalStatusDmaContinues => {
                shared.csts.fetch_or(csts::CFS, Ordering::AcqRel);
                return;
            }
            Fault::Reset => {
                shared.function_reset();
                return;
            }
            _ => {}
        }
        let mut f = shared.faults.lock();
        match fault {
            Fault::NeverComplete { command, count } if count > 0 => f.never.push((command, count)),
            Fault::Stall { command, count } if count > 0 => f.stall.push((command, count)),
            Fault::Status {
                command,
                status,
                count,
            } if count > 0 => f.status.push((command, status, count)),
            Fault::WrongCid => f.wrong_cid += 1,
            Fault::Duplicate => f.duplicate += 1,
            Fault::StalePhase => f.stale_phase += 1,
            Fault::Forge(c) => f.forged.push_back(c),
            Fault::Delay(d) => f.delay = (!d.is_zero()).then_some(d),
            Fault::ReadySlow(d) => f.ready_slow = Some(d),
            Fault::ReadyNever => f.ready_never = true,
            Fault::LostInterrupt { count } => f.lost_irqs += count,
            Fault::SqHeadBackwards => f.sq_head_back += 1,
            Fault::SqHeadFrozen { count } => f.sq_head_frozen += count,
            _ => {}
        }
        shared.faults_pending.store(!f.is_empty(), Ordering::Release);
    }

    /// Removes the faults not yet used up (and the delays, [`Fault::ReadySlow`] and
    /// [`Fault::ReadyNever`], [`Fault::FatalOnIo`]). `Gone` and `FatalStatus` stay.
    pub fn clear_faults(&self) {
        let shared = self.shared();
        shared.fatal_on_io.store(false, Ordering::Release);
        *shared.faults.lock() = FaultState::default();
        shared.faults_pending.store(false, Ordering::Release);
    }

    /// Executes and completes every command held by [`Fault::Stall`] so far, in the order
    /// they were fetched.
    pub fn release_stalled(&self) {
        let shared = self.shared();
        shared.release.store(true, Ordering::Release);
        if let Some(t) = &*shared.waker.lock() {
            t.unpark();
        }
    }

    /// Completes one held Asynchronous Event Request with `dw0` (event type, information,
    /// log page). Queued until the host has one outstanding.
    pub fn complete_async_event(&self, dw0: u32) {
        self.shared().raise_event(dw0);
    }

    /// Changes the SMART / Health Information the controller reports (the I/O counters
    /// and the error count are its own). Critical warning bits newly set raise a SMART /
    /// Health event (information 02h spare, 01h temperature, 00h reliability; log page
    /// 02h) if the host enabled them in the Asynchronous Event Configuration (Set
    /// Features 0Bh) and no SMART event is waiting for the host to read that page.
    pub fn update_health(&self, f: impl FnOnce(&mut spec::SmartLog)) {
        let shared = self.shared();
        if let Some(dw0) = shared.logs.update_health(f) {
            shared.raise_event(dw0);
        }
    }

    /// Namespaces `nsids` changed (attributes, capacity, attachment): they join the
    /// Changed Namespace List (log page 04h), and a Namespace Attribute Changed notice is
    /// raised if the host enabled it (Asynchronous Event Configuration bit 8) and no such
    /// notice is waiting for the host to read the list.
    pub fn notify_namespace_changed(&self, nsids: &[u32]) {
        let shared = self.shared();
        if let Some(dw0) = shared.logs.namespaces_changed(nsids) {
            shared.raise_event(dw0);
        }
    }

    /// Detaches namespace `nsid` from the controller, as Namespace Attachment would: it
    /// leaves the active namespace list, Identify Namespace reads zeros for it, and I/O to
    /// it fails with Invalid Namespace or Format; its data is kept. Then a change is
    /// notified as [`notify_namespace_changed`](Self::notify_namespace_changed) does. False
    /// if the controller has no namespace `nsid`.
    pub fn detach_namespace(&self, nsid: u32) -> bool {
        self.set_namespace(nsid, |ns| ns.attached.store(false, Ordering::Release))
    }

    /// Attaches namespace `nsid` (one of [`EmuConfig::namespaces`]) again, and notifies the
    /// change. False if the controller has no namespace `nsid`.
    pub fn attach_namespace(&self, nsid: u32) -> bool {
        self.set_namespace(nsid, |ns| ns.attached.store(true, Ordering::Release))
    }

    /// Changes the size of namespace `nsid` to `blocks` blocks (at least 1; data beyond
    /// the new end is kept but unreachable), and notifies the change. False if the
    /// controller has no namespace `nsid` or `blocks` is 0.
    pub fn resize_namespace(&self, nsid: u32, blocks: u64) -> bool {
        blocks > 0 && self.set_namespace(nsid, |ns| ns.size.store(blocks, Ordering::Release))
    }

    fn set_namespace(&self, nsid: u32, change: impl FnOnce(&Namespace)) -> bool {
        let Some(ns) = usize::try_from(nsid)
            .ok()
            .and_then(|n| n.checked_sub(1))
            .and_then(|i| self.shared().namespaces.get(i))
        else {
            return false;
        };
        change(ns);
        self.notify_namespace_changed(&[nsid]);
        true
    }

    /// From now on Set Features (Number of Queues) grants at most `n` I/O queue pairs (at
    /// least 1, at most [`EmuConfig::max_io_queues`]), as a controller whose resources
    /// were taken (SR-IOV reassignment, firmware) answers after a reset.
    pub fn limit_io_queues(&self, n: u16) {
        let n = n.clamp(1, self.shared().cfg.max_io_queues);
        self.shared().grant_limit.store(u32::from(n), Ordering::Release);
    }

    /// The metadata stored for block `lba` of namespace `nsid` (its metadata size in
    /// bytes; all-ones for a block never written with metadata). `None` if there is no
    /// such namespace or block, or the namespace has no metadata.
    pub fn namespace_metadata(&self, nsid: u32, lba: u64) -> Option<Vec<u8>> {
        let ns = self
            .shared()
            .namespaces
            .get(usize::try_from(nsid).ok()?.checked_sub(1)?)?;
        if ns.ms == 0 || lba >= ns.blocks() {
            return None;
        }
        let meta = ns.meta.lock();
        Some(
            meta.get(&lba)
                .map_or_else(|| vec![0xff; usize::from(ns.ms)], |m| m.to_vec()),
        )
    }

    /// What the controller did so far.
    pub fn stats(&self) -> EmuStats {
        self.shared().counters.snapshot()
    }

    /// Whether the processing thread runs (the controller is enabled and not shut down).
    pub fn is_processing(&self) -> bool {
        self.shared().worker.lock().is_some()
    }

    /// A weak view of the internals, alive while any handle is.
    pub fn liveness(&self) -> Liveness {
        Liveness(Arc::downgrade(self.shared()))
    }

    /// `len` bytes of namespace `nsid` from byte `offset` (deallocated blocks read zero).
    /// `None` if there is no such namespace or the range is outside it.
    pub fn namespace_read(&self, nsid: u32, offset: u64, len: usize) -> Option<Vec<u8>> {
        self.shared().namespace_read(nsid, offset, len)
    }

    /// Writes `data` into namespace `nsid` at byte `offset`, as if the host had. `None` if
    /// there is no such namespace or the range is outside it.
    pub fn namespace_write(&self, nsid: u32, offset: u64, data: &[u8]) -> Option<()> {
        self.shared().namespace_write(nsid, offset, data)
    }
}

// The namespaces' contents, for `EmulatedNvme` and `NvmeModel`.
impl Shared {
    fn namespace_read(&self, nsid: u32, offset: u64, len: usize) -> Option<Vec<u8>> {
        let ns = self.namespace(nsid, offset, len)?;
        let map = ns.chunks.lock();
        let mut out = vec![0u8; len];
        for (chunk, coff, n, done) in pieces(offset, len as u64) {
            if let Some(c) = map.get(&chunk) {
                out[done..done + n].copy_from_slice(&c[coff..coff + n]);
            }
        }
        Some(out)
    }

    fn namespace_write(&self, nsid: u32, offset: u64, data: &[u8]) -> Option<()> {
        let ns = self.namespace(nsid, offset, data.len())?;
        let mut map = ns.chunks.lock();
        for (chunk, coff, n, done) in pieces(offset, data.len() as u64) {
            let c = map
                .entry(chunk)
                .or_insert_with(|| vec![0u8; CHUNK as usize].into_boxed_slice());
            c[coff..coff + n].copy_from_slice(&data[done..done + n]);
        }
        Some(())
    }

    fn namespace(&self, nsid: u32, offset: u64, len: usize) -> Option<&Namespace> {
        let ns = self.namespaces.get(usize::try_from(nsid).ok()?.checked_sub(1)?)?;
        let end = offset.checked_add(len as u64)?;
        (end <= ns.bytes()).then_some(ns)
    }
}

impl EmuRegisters {
    fn check(&self, offset: u64, len: usize) -> Result<(), BackingError> {
        let shared = &self.handle.shared;
        if !offset.is_multiple_of(len as u64)
            || offset.checked_add(len as u64).is_none_or(|e| e > shared.bar_len)
        {
            return Err(BackingError::OutOfRange {
                address: shared.cfg.address,
                what: "BAR 0".into(),
                offset,
                len,
            });
        }
        Ok(())
    }
}

impl EmuRegisters {
    // A byte or halfword of the register dword holding it: the controller's registers
    // are dwords and qwords, and reading them has no side effects.
    fn read_narrow(&self, offset: u64, width: usize) -> Result<u32, BackingError> {
        self.check(offset, width)?;
        let dword = RegisterIo::read32(self, offset & !3)?;
        Ok(dword >> ((offset & 3) * 8))
    }

    // Narrow writes are not something an NVMe driver does (the spec has none), and
    // widening them would ring doorbells with made-up values: refused.
    fn narrow_write(&self, offset: u64, width: usize) -> Result<(), BackingError> {
        self.check(offset, width)?;
        Err(BackingError::Unsupported {
            address: self.handle.shared.cfg.address,
            operation: "an 8- or 16-bit write to NVMe controller registers",
        })
    }
}

impl RegisterIo for EmuRegisters {
    fn len(&self) -> u64 {
        self.handle.shared.bar_len
    }
    fn read8(&self, offset: u64) -> Result<u8, BackingError> {
        Ok(self.read_narrow(offset, 1)? as u8)
    }
    fn write8(&self, offset: u64, _value: u8) -> Result<(), BackingError> {
        self.narrow_write(offset, 1)
    }
    fn read16(&self, offset: u64) -> Result<u16, BackingError> {
        Ok(self.read_narrow(offset, 2)? as u16)
    }
    fn write16(&self, offset: u64, _value: u16) -> Result<(), BackingError> {
        self.narrow_write(offset, 2)
    }
    fn read32(&self, offset: u64) -> Result<u32, BackingError> {
        self.check(offset, 4)?;
        let shared = &self.handle.shared;
        Ok(if shared.gone() {
            u32::MAX
        } else {
            shared.read32(offset)
        })
    }
    fn write32(&self, offset: u64, value: u32) -> Result<(), BackingError> {
        self.check(offset, 4)?;
        let shared = &self.handle.shared;
        if !shared.gone() {
            shared.write32(offset, value);
        }
        Ok(())
    }
    fn read64(&self, offset: u64) -> Result<u64, BackingError> {
        self.check(offset, 8)?;
        let shared = &self.handle.shared;
        if shared.gone() {
            return Ok(u64::MAX);
        }
        Ok(shared.read64(offset))
    }
    fn write64(&self, offset: u64, value: u64) -> Result<(), BackingError> {
        self.check(offset, 8)?;
        let shared = &self.handle.shared;
        if !shared.gone() {
            shared.write64(offset, value);
        }
        Ok(())
    }
}

// The lowest IOVA from FIRST_IOVA where `len` bytes fit between live allocations (each
// followed by its guard page).
fn first_fit(table: &BTreeMap<u64, DmaEntry>, len: u64) -> u64 {
    let mut at = FIRST_IOVA;
    for (&base, e) in table.range(FIRST_IOVA..) {
        if base >= at + len {
            break;
        }
        at = at.max(base + e.len + cpu_page_size() as u64);
    }
    at
}

fn config_range(
    address: PciAddress,
    offset: u64,
    len: usize,
) -> Result<std::ops::Range<usize>, BackingError> {
    let start = usize::try_from(offset).unwrap_or(usize::MAX);
    match start.checked_add(len) {
        Some(end) if end <= 4096 => Ok(start..end),
        _ => Err(BackingError::OutOfRange {
            address,
            what: "config".into(),
            offset,
            len,
        }),
    }
}

impl EmulatedNvme {
    // Maps `buffer` at a free IOVA of the emulated IOMMU (see `EmuConfig::fresh_iovas`).
    fn map_buffer(&self, buffer: DmaBuffer) -> EmuDma {
        let size = buffer.len() as u64;
        let buffer = Arc::new(buffer);
        let shared = self.shared();
        let mut table = shared.dma.write();
        // An unmapped page after each allocation, so overruns are caught.
        let guard = cpu_page_size() as u64;
        let iova = if shared.cfg.fresh_iovas {
            shared.next_iova.fetch_add(size + guard, Ordering::Relaxed)
        } else {
            first_fit(&table, size + guard)
        };
        table.insert(
            iova,
            DmaEntry {
                len: size,
                buf: Arc::downgrade(&buffer),
                serial: shared.alloc_serial.fetch_add(1, Ordering::AcqRel) + 1,
            },
        );
        EmuDma {
            buffer,
            iova,
            handle: Arc::clone(&self.handle),
        }
    }
}

impl DeviceBacking for EmulatedNvme {
    type Registers = EmuRegisters;
    type Dma = EmuDma;

    fn address(&self) -> PciAddress {
        self.shared().cfg.address
    }

    fn map_bar(&self, index: u32) -> Result<EmuRegisters, BackingError> {
        if index != 0 {
            return Err(BackingError::OutOfRange {
                address: self.address(),
                what: format!("BAR {index}"),
                offset: 0,
                len: 0,
            });
        }
        Ok(EmuRegisters {
            handle: Arc::clone(&self.handle),
        })
    }

    fn bar_info(&self, index: u32) -> Result<BarInfo, BackingError> {
        match index {
            // As its config space says (0x10: 64-bit memory).
            0 => Ok(BarInfo::memory64(0, self.shared().bar_len)),
            1..=5 => Ok(BarInfo::absent(index)),
            _ => Err(BackingError::OutOfRange {
                address: self.address(),
                what: format!("BAR {index}"),
                offset: 0,
                len: 0,
            }),
        }
    }

    fn alloc_dma(&self, len: usize) -> Result<EmuDma, BackingError> {
        let size = len
            .max(1)
            .checked_next_multiple_of(cpu_page_size())
            .ok_or_else(|| BackingError::Other {
                address: self.address(),
                message: format!("{len} bytes of DMA memory"),
            })?;
        let buffer = DmaBuffer::new(size).map_err(|e| BackingError::Other {
            address: self.address(),
            message: format!("allocating {size} bytes of DMA memory: {e}"),
        })?;
        Ok(self.map_buffer(buffer))
    }

    fn map_dma(&self, buffer: DmaBuffer, constraints: &DmaConstraints) -> Result<EmuDma, Box<MapDmaError>> {
        // Like alloc_dma_with's default: this emulation places memory at no constraint.
        if let Some(operation) = constraints.first_nontrivial() {
            let error = BackingError::Unsupported {
                address: self.address(),
                operation,
            };
            return Err(Box::new(MapDmaError { error, buffer }));
        }
        Ok(self.map_buffer(buffer))
    }

    fn unmap_dma(&self, dma: EmuDma) -> Result<DmaBuffer, BackingError> {
        let buffer = Arc::clone(&dma.buffer);
        // Unmapped (out of the controller's table) first, then the buffer is the caller's,
        // unless the controller holds it this instant for a transfer.
        drop(dma);
        Arc::try_unwrap(buffer).map_err(|_| BackingError::Other {
            address: self.address(),
            message: "the controller is moving data in the buffer: it is not given back".into(),
        })
    }

    fn read_config(&self, offset: u64, buf: &mut [u8]) -> Result<(), BackingError> {
        let range = config_range(self.address(), offset, buf.len())?;
        if self.shared().gone() {
            buf.fill(0xff);
            return Ok(());
        }
        buf.copy_from_slice(&self.shared().config_space.lock()[range]);
        Ok(())
    }

    fn write_config(&self, offset: u64, buf: &[u8]) -> Result<(), BackingError> {
        let range = config_range(self.address(), offset, buf.len())?;
        if !self.shared().gone() {
            let mut config = self.shared().config_space.lock();
            config[range].copy_from_slice(buf);
            self.shared()
                .bus_master
                .store(super::bus_master_bit(&config), Ordering::Release);
        }
        Ok(())
    }

    fn max_interrupts(&self) -> u32 {
        u32::from(self.shared().cfg.msix_vectors)
    }

    fn route_interrupts(&self, fds: &[BorrowedFd<'_>]) -> Result<(), BackingError> {
        let max = self.max_interrupts() as usize;
        if fds.len() > max {
            return Err(BackingError::Other {
                address: self.address(),
                message: format!("{} vectors asked, {max} exist", fds.len()),
            });
        }
        let owned = fds
            .iter()
            .map(|fd| fd.as_fd().try_clone_to_owned())
            .collect::<Result<Vec<OwnedFd>, _>>()
            .map_err(|e| BackingError::Other {
                address: self.address(),
                message: format!("dup of an eventfd: {e}"),
            })?;
        *self.shared().irqs.write() = owned;
        Ok(())
    }

    fn reset(&self) -> Result<(), BackingError> {
        if self.shared().gone() {
            return Err(BackingError::Gone(self.address()));
        }
        self.shared().function_reset();
        Ok(())
    }

    fn extra_handles(&self) -> usize {
        Arc::strong_count(&self.handle).saturating_sub(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn pieces_split_at_chunk_boundaries() {
        let p: Vec<_> = pieces(CHUNK - 10, 30).collect();
        assert_eq!(p, [(0, (CHUNK - 10) as usize, 10, 0), (1, 0, 20, 10)]);
        assert_eq!(pieces(5, 0).count(), 0);
    }

    #[test]
    fn zeroing_drops_whole_chunks_and_clears_partial_ones() {
        let mut map = Chunks::new();
        for k in 0..4 {
            map.insert(k, vec![7u8; CHUNK as usize].into_boxed_slice());
        }
        // From the middle of chunk 0 to the middle of chunk 3.
        Namespace::zero(&mut map, CHUNK / 2, 3 * CHUNK);
        assert_eq!(
            map.keys().copied().collect::<std::collections::BTreeSet<_>>(),
            [0, 3].into()
        );
        assert!(map[&0][..CHUNK as usize / 2].iter().all(|&b| b == 7));
        assert!(map[&0][CHUNK as usize / 2..].iter().all(|&b| b == 0));
        assert!(map[&3][..CHUNK as usize / 2].iter().all(|&b| b == 0));
        assert!(map[&3][CHUNK as usize / 2..].iter().all(|&b| b == 7));
        // A huge range walks the map, not the range.
        Namespace::zero(&mut map, 0, 1 << 50);
        assert!(map.values().all(|c| c.iter().all(|&b| b == 0)));
        assert!(map.is_empty());
    }

    #[test]
    fn identify_data_parses_back() {
        let cfg = EmuConfig {
            mdts: 5,
            sriov: Some(SriovConfig {
                vfs: 3,
                flexible_vq: 6,
                flexible_vi: 3,
            }),
            ..EmuConfig::default()
        };
        let id = spec::IdentifyController::parse(&identify_controller(&cfg)).unwrap();
        assert_eq!((id.mdts, id.sqes, id.cqes), (5, 0x66, 0x44));
        assert_eq!(id.oacs, oacs::VIRT_MGMT | oacs::DOORBELL_BUFFER_CONFIG);
        assert!(id.subnqn.starts_with("nqn."));
        let shared = Shared::new(cfg, false);
        let ns = spec::IdentifyNamespace::parse(&identify_namespace(&shared.namespaces[0])).unwrap();
        assert_eq!((ns.nsze, ns.block_size()), (1 << 21, Some(512)));
        let sriov = shared.sriov.lock();
        let list = spec::parse_secondary_controllers(&secondary_list(sriov.as_ref().unwrap(), 2));
        assert_eq!(list.iter().map(|s| s.scid).collect::<Vec<_>>(), [2, 3]);
    }

    #[test]
    fn bar_covers_every_doorbell() {
        let cfg = EmuConfig {
            dstrd: 3,
            max_io_queues: 300,
            ..EmuConfig::default()
        };
        let shared = Shared::new(cfg, false);
        let cap = spec::Cap(shared.cap);
        assert!(cap.cq_doorbell(300) + 4 <= shared.bar_len);
        assert!(shared.bar_len.is_power_of_two());
    }

    proptest! {
        #[test]
        fn sparse_storage_matches_a_vec(ops in proptest::collection::vec((0u64..300_000, 0usize..150_000, any::<u8>(), any::<bool>()), 1..20)) {
            let e = EmulatedNvme::new(EmuConfig {
                namespaces: vec![NamespaceConfig::new(1024, 512)],
                ..EmuConfig::default()
            }).unwrap();
            let size = 1024 * 512;
            let mut model = vec![0u8; size];
            for (pos, len, byte, zero) in ops {
                let pos = pos.min(size as u64);
                let len = len.min(size - pos as usize);
                if zero {
                    let ns = &e.shared().namespaces[0];
                    Namespace::zero(&mut ns.chunks.lock(), pos, len as u64);
                    model[pos as usize..pos as usize + len].fill(0);
                } else {
                    e.namespace_write(1, pos, &vec![byte; len]).unwrap();
                    model[pos as usize..pos as usize + len].fill(byte);
                }
            }
            prop_assert_eq!(e.namespace_read(1, 0, size).unwrap(), model);
            prop_assert!(e.namespace_read(1, 1, size).is_none());
        }
    }
}
