//! NVMe facts from the base specification (2.0) that the driver and the emulated
//! controller share: register offsets and fields, the 64-byte submission entry, the
//! 16-byte completion entry, opcodes, status codes, and pure parsers of Identify data.
//!
//! Entries travel through DMA memory as bytes ([`Command::to_bytes`],
//! [`Completion::from_bytes`]): no `unsafe`, no references into device-visible memory.

use std::fmt;

/// Controller registers (byte offsets in BAR 0).
pub mod reg {
    /// Controller Capabilities (64-bit).
    pub const CAP: u64 = 0x00;
    /// Version.
    pub const VS: u64 = 0x08;
    /// Interrupt Mask Set.
    pub const INTMS: u64 = 0x0c;
    /// Interrupt Mask Clear.
    pub const INTMC: u64 = 0x10;
    /// Controller Configuration.
    pub const CC: u64 = 0x14;
    /// Controller Status.
    pub const CSTS: u64 = 0x1c;
    /// NVM Subsystem Reset.
    pub const NSSR: u64 = 0x20;
    /// Admin Queue Attributes.
    pub const AQA: u64 = 0x24;
    /// Admin Submission Queue base (64-bit).
    pub const ASQ: u64 = 0x28;
    /// Admin Completion Queue base (64-bit).
    pub const ACQ: u64 = 0x30;
    /// Controller Ready Timeouts (NVMe 2.0; meaningful when CAP.CRMS is nonzero).
    pub const CRTO: u64 = 0x68;
    /// First doorbell.
    pub const DOORBELLS: u64 = 0x1000;
}

/// Controller Capabilities, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cap(pub u64);

impl Cap {
    /// Maximum Queue Entries Supported, as a count (MQES + 1).
    pub fn max_queue_entries(self) -> u32 {
        (self.0 & 0xffff) as u32 + 1
    }
    /// Contiguous Queues Required.
    pub fn contiguous_required(self) -> bool {
        self.0 >> 16 & 1 == 1
    }
    /// Timeout: worst-case time to become ready, in milliseconds (TO is in 500 ms units).
    pub fn timeout_ms(self) -> u64 {
        (self.0 >> 24 & 0xff) * 500
    }
    /// Doorbell stride in bytes (4 << DSTRD).
    pub fn doorbell_stride(self) -> u64 {
        4 << (self.0 >> 32 & 0xf)
    }
    /// NVM Subsystem Reset Supported.
    pub fn nssr(self) -> bool {
        self.0 >> 36 & 1 == 1
    }
    /// Command Sets Supported (bit 0: NVM; bit 7: admin only).
    pub fn css(self) -> u8 {
        (self.0 >> 37 & 0xff) as u8
    }
    /// Minimum memory page size in bytes (4 KiB << MPSMIN).
    pub fn page_size_min(self) -> u64 {
        4096 << (self.0 >> 48 & 0xf)
    }
    /// Maximum memory page size in bytes.
    pub fn page_size_max(self) -> u64 {
        4096 << (self.0 >> 52 & 0xf)
    }
    /// Controller Ready With Media Support (CAP.CRMS.CRWMS, bit 59): CSTS.RDY may take up
    /// to CRTO.CRWMT (which may exceed what CAP.TO can say) when CC.CRIME is 0.
    pub fn crwms(self) -> bool {
        self.0 >> 59 & 1 == 1
    }
    /// Controller Ready Independent of Media Support (CAP.CRMS.CRIMS, bit 60).
    pub fn crims(self) -> bool {
        self.0 >> 60 & 1 == 1
    }
    /// The worst-case time to become ready (or not ready) in milliseconds, given the CRTO
    /// register `crto` as read: with CAP.CRMS.CRWMS set, CRTO.CRWMT (bits 15:0, 500 ms
    /// units; the driver leaves CC.CRIME 0, so the media-ready time applies), unless it
    /// reads 0; otherwise CAP.TO.
    pub fn ready_timeout_ms(self, crto: u32) -> u64 {
        let crwmt = u64::from(crto & 0xffff);
        if self.crwms() && crwmt != 0 {
            crwmt * 500
        } else {
            self.timeout_ms()
        }
    }
    /// The doorbell offset of submission queue `qid`'s tail.
    pub fn sq_doorbell(self, qid: u16) -> u64 {
        reg::DOORBELLS + u64::from(qid) * 2 * self.doorbell_stride()
    }
    /// The doorbell offset of completion queue `qid`'s head.
    pub fn cq_doorbell(self, qid: u16) -> u64 {
        reg::DOORBELLS + (u64::from(qid) * 2 + 1) * self.doorbell_stride()
    }
}

/// Controller Configuration bits.
pub mod cc {
    /// Enable.
    pub const EN: u32 = 1;
    /// I/O Command Set Selected: shift (000b NVM).
    pub const CSS_SHIFT: u32 = 4;
    /// Memory Page Size: shift (page = 4 KiB << MPS).
    pub const MPS_SHIFT: u32 = 7;
    /// Arbitration Mechanism: shift.
    pub const AMS_SHIFT: u32 = 11;
    /// Shutdown Notification: shift (01b normal, 10b abrupt).
    pub const SHN_SHIFT: u32 = 14;
    /// Shutdown Notification mask.
    pub const SHN_MASK: u32 = 3 << SHN_SHIFT;
    /// Normal shutdown.
    pub const SHN_NORMAL: u32 = 1 << SHN_SHIFT;
    /// I/O Submission Queue Entry Size: shift (log2; 6 for 64 bytes).
    pub const IOSQES_SHIFT: u32 = 16;
    /// I/O Completion Queue Entry Size: shift (log2; 4 for 16 bytes).
    pub const IOCQES_SHIFT: u32 = 20;
}

/// Controller Status bits.
pub mod csts {
    /// Ready.
    pub const RDY: u32 = 1;
    /// Controller Fatal Status.
    pub const CFS: u32 = 1 << 1;
    /// Shutdown Status: shift (00b normal operation, 01b occurring, 10b complete).
    pub const SHST_SHIFT: u32 = 2;
    /// Shutdown Status mask.
    pub const SHST_MASK: u32 = 3 << SHST_SHIFT;
    /// Shutdown complete.
    pub const SHST_COMPLETE: u32 = 2 << SHST_SHIFT;
    /// Processing Paused.
    pub const PP: u32 = 1 << 5;
}

/// Admin command opcodes.
pub mod admin {
    /// Delete I/O Submission Queue.
    pub const DELETE_SQ: u8 = 0x00;
    /// Create I/O Submission Queue.
    pub const CREATE_SQ: u8 = 0x01;
    /// Get Log Page.
    pub const GET_LOG_PAGE: u8 = 0x02;
    /// Delete I/O Completion Queue.
    pub const DELETE_CQ: u8 = 0x04;
    /// Create I/O Completion Queue.
    pub const CREATE_CQ: u8 = 0x05;
    /// Identify.
    pub const IDENTIFY: u8 = 0x06;
    /// Abort.
    pub const ABORT: u8 = 0x08;
    /// Set Features.
    pub const SET_FEATURES: u8 = 0x09;
    /// Get Features.
    pub const GET_FEATURES: u8 = 0x0a;
    /// Asynchronous Event Request.
    pub const ASYNC_EVENT: u8 = 0x0c;
    /// Namespace Attachment.
    pub const NAMESPACE_ATTACHMENT: u8 = 0x15;
    /// Virtualization Management.
    pub const VIRT_MGMT: u8 = 0x1c;
    /// Doorbell Buffer Config (shadow doorbells).
    pub const DOORBELL_BUFFER_CONFIG: u8 = 0x7c;
}

/// NVM command set opcodes.
pub mod io {
    /// Flush.
    pub const FLUSH: u8 = 0x00;
    /// Write.
    pub const WRITE: u8 = 0x01;
    /// Read.
    pub const READ: u8 = 0x02;
    /// Write Zeroes.
    pub const WRITE_ZEROES: u8 = 0x08;
    /// Dataset Management (attribute deallocate: cdw11 bit 2).
    pub const DATASET_MANAGEMENT: u8 = 0x09;
}

/// Dataset Management attributes (command dword 11).
pub mod dsm {
    /// Attribute – Deallocate.
    pub const DEALLOCATE: u32 = 1 << 2;
    /// Size of one range entry (context attributes, length in blocks, starting LBA).
    pub const RANGE_SIZE: usize = 16;
}

/// The broadcast namespace ID (all namespaces, e.g. for Flush).
pub const NSID_ALL: u32 = 0xffff_ffff;

/// Identify CNS values.
pub mod cns {
    /// Identify Namespace (NSID).
    pub const NAMESPACE: u32 = 0x00;
    /// Identify Controller.
    pub const CONTROLLER: u32 = 0x01;
    /// Active Namespace ID list (NSIDs above NSID; at most 1,024 a page).
    pub const ACTIVE_NAMESPACES: u32 = 0x02;
    /// I/O Command Set specific Identify Controller (with CSI 0 in CDW11 bits 31:24: the
    /// NVM command set's limits, [`IdentifyControllerNvm`](super::IdentifyControllerNvm)).
    pub const IO_CONTROLLER: u32 = 0x06;
    /// Primary Controller Capabilities.
    pub const PRIMARY_CONTROLLER_CAPS: u32 = 0x14;
    /// Secondary Controller List.
    pub const SECONDARY_CONTROLLERS: u32 = 0x15;
}

/// Virtualization Management (admin 1Ch): actions (CDW10 bits 3:0) and resource types
/// (CDW10 bits 10:8). Flexible resources are queues (VQ: a submission/completion queue
/// pair, the admin queue included) and interrupt vectors (VI) that the primary controller
/// can hand to its secondary controllers (the controllers of its SR-IOV VFs).
pub mod virt_mgmt {
    /// Primary Controller Flexible Allocation: what the primary itself keeps of the
    /// flexible resources; takes effect at its next Controller Level Reset (an FLR).
    pub const PRIMARY_FLEXIBLE_ALLOCATION: u8 = 0x1;
    /// Secondary Controller Offline.
    pub const SECONDARY_OFFLINE: u8 = 0x7;
    /// Secondary Controller Assign: give flexible resources to an offline secondary.
    pub const SECONDARY_ASSIGN: u8 = 0x8;
    /// Secondary Controller Online.
    pub const SECONDARY_ONLINE: u8 = 0x9;
    /// Resource type: VQ (queue pairs).
    pub const RESOURCE_VQ: u8 = 0;
    /// Resource type: VI (interrupt vectors).
    pub const RESOURCE_VI: u8 = 1;
}

/// A Virtualization Management command: `action` on controller `cntlid`, for `count`
/// resources of type `resource` (count and type are ignored by the online and offline
/// actions).
pub fn virt_mgmt_command(action: u8, resource: u8, cntlid: u16, count: u16) -> Command {
    let mut cmd = Command::new(admin::VIRT_MGMT);
    cmd.cdw[0] = u32::from(action & 0xf) | u32::from(resource & 0x7) << 8 | u32::from(cntlid) << 16;
    cmd.cdw[1] = u32::from(count);
    cmd
}

/// Namespace Attachment select values (CDW10 bits 3:0).
pub mod ns_attach {
    /// Controller Attach.
    pub const ATTACH: u8 = 0;
    /// Controller Detach.
    pub const DETACH: u8 = 1;
}

/// A Namespace Attachment command for namespace `nsid` (`select`: [`ns_attach`]); its data
/// (4096 bytes, through PRP1) is a [`controller_list`].
pub fn namespace_attachment_command(nsid: u32, select: u8) -> Command {
    let mut cmd = Command::new(admin::NAMESPACE_ATTACHMENT);
    cmd.nsid = nsid;
    cmd.cdw[0] = u32::from(select & 0xf);
    cmd
}

/// A Controller List (4096 bytes): the number of identifiers, then the identifiers (at most
/// 2047; more are left out).
pub fn controller_list(ids: &[u16]) -> Vec<u8> {
    let ids = &ids[..ids.len().min(2047)];
    let mut b = vec![0u8; 4096];
    b[0..2].copy_from_slice(&(ids.len() as u16).to_le_bytes());
    for (i, id) in ids.iter().enumerate() {
        b[2 + 2 * i..4 + 2 * i].copy_from_slice(&id.to_le_bytes());
    }
    b
}

/// Primary Controller Capabilities (Identify CNS 14h): the flexible resources of an
/// SR-IOV primary controller and how they are shared out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct PrimaryControllerCaps {
    /// Controller Identifier of the primary.
    pub cntlid: u16,
    /// Port Identifier.
    pub portid: u16,
    /// Controller Resource Types supported (bit 0: VQ, bit 1: VI).
    pub crt: u8,
    /// VQ Flexible Resources Total.
    pub vqfrt: u32,
    /// VQ Resources Flexible Assigned (to secondaries).
    pub vqrfa: u32,
    /// VQ Resources Flexible Allocated to the Primary (now).
    pub vqrfap: u16,
    /// VQ Resources Private Total (the primary's own).
    pub vqprt: u16,
    /// VQ Flexible Resources Secondary Maximum (per secondary).
    pub vqfrsm: u16,
    /// VQ Flexible Resource Preferred Granularity.
    pub vqgran: u16,
    /// VI Flexible Resources Total.
    pub vifrt: u32,
    /// VI Resources Flexible Assigned (to secondaries).
    pub virfa: u32,
    /// VI Resources Flexible Allocated to the Primary (now).
    pub virfap: u16,
    /// VI Resources Private Total.
    pub viprt: u16,
    /// VI Flexible Resources Secondary Maximum.
    pub vifrsm: u16,
    /// VI Flexible Resource Preferred Granularity.
    pub vigran: u16,
}

impl PrimaryControllerCaps {
    /// Parses the 4096-byte structure.
    pub fn parse(b: &[u8]) -> Result<Self, IdentifyError> {
        IdentifyError::check(b, "primary controller capabilities")?;
        Ok(PrimaryControllerCaps {
            cntlid: le16(b, 0),
            portid: le16(b, 2),
            crt: b[4],
            vqfrt: le32(b, 32),
            vqrfa: le32(b, 36),
            vqrfap: le16(b, 40),
            vqprt: le16(b, 42),
            vqfrsm: le16(b, 44),
            vqgran: le16(b, 46),
            vifrt: le32(b, 64),
            virfa: le32(b, 68),
            virfap: le16(b, 72),
            viprt: le16(b, 74),
            vifrsm: le16(b, 76),
            vigran: le16(b, 78),
        })
    }

    /// Flexible VQ resources neither the primary nor a secondary holds.
    pub fn vq_free(&self) -> u32 {
        self.vqfrt
            .saturating_sub(self.vqrfa)
            .saturating_sub(u32::from(self.vqrfap))
    }

    /// Flexible VI resources neither the primary nor a secondary holds.
    pub fn vi_free(&self) -> u32 {
        self.vifrt
            .saturating_sub(self.virfa)
            .saturating_sub(u32::from(self.virfap))
    }
}

/// Feature identifiers.
pub mod feature {
    /// Number of Queues.
    pub const NUMBER_OF_QUEUES: u8 = 0x07;
    /// Asynchronous Event Configuration: which events the controller reports.
    pub const ASYNC_EVENT_CONFIG: u8 = 0x0b;
}

pub mod logs;
pub use logs::{
    AsyncEventInfo, AsyncEventType, ErrorLogEntry, LogError, SmartLog, get_log_page_command, lid,
    parse_changed_namespaces, parse_error_log,
};

/// Optional Admin Command Support bits (Identify Controller OACS).
pub mod oacs {
    /// Virtualization Management.
    pub const VIRT_MGMT: u16 = 1 << 7;
    /// Doorbell Buffer Config.
    pub const DOORBELL_BUFFER_CONFIG: u16 = 1 << 8;
}

/// Optional NVM Command Support bits (Identify Controller ONCS).
pub mod oncs {
    /// Dataset Management.
    pub const DATASET_MANAGEMENT: u16 = 1 << 2;
    /// Write Zeroes.
    pub const WRITE_ZEROES: u16 = 1 << 3;
}

/// Scatter gather lists (SGLs): the descriptors an I/O command's data pointer may hold
/// instead of PRPs, where Identify Controller's SGLS offers them.
///
/// A descriptor is 16 bytes: address (bytes 0–7), length (8–11), reserved, and the SGL
/// identifier in byte 15 (type in bits 7:4, sub type in bits 3:0; sub type 0 is an
/// address). In a command, PSDT (CDW0 bits 15:14, `Command::flags` bits 7:6) 01b says the
/// data pointer (bytes 24–39, `prp1` and `prp2`) holds one descriptor and MPTR a plain
/// metadata address.
pub mod sgl {
    /// Bytes per descriptor.
    pub const DESCRIPTOR_SIZE: usize = 16;
    /// Type: Data Block, the data's memory.
    pub const DATA_BLOCK: u8 = 0x0;
    /// Type: Bit Bucket (data discarded on reads).
    pub const BIT_BUCKET: u8 = 0x1;
    /// Type: Segment, the address of a list of descriptors whose last one points at the
    /// next list.
    pub const SEGMENT: u8 = 0x2;
    /// Type: Last Segment, the address of the last list (Data Block descriptors only).
    pub const LAST_SEGMENT: u8 = 0x3;
    /// `Command::flags` bits for PSDT 01b: SGLs for the data, MPTR a metadata address.
    pub const PSDT_SGL: u8 = 0x40;
    /// PSDT in `Command::flags` (bits 7:6).
    pub const PSDT_MASK: u8 = 0xc0;

    /// Whether SGLS (Identify Controller bytes 536–539) says the controller takes SGLs for
    /// I/O commands: bits 1:0 01b (any byte alignment) or 10b (Data Block addresses and
    /// lengths dword aligned).
    pub fn supported(sgls: u32) -> bool {
        matches!(sgls & 3, 1 | 2)
    }

    /// A descriptor as the data pointer of a command: (`prp1`, `prp2`).
    pub fn dptr(address: u64, length: u32, kind: u8) -> (u64, u64) {
        (address, u64::from(length) | u64::from(kind << 4) << 56)
    }

    /// A descriptor's bytes.
    pub fn descriptor(address: u64, length: u32, kind: u8) -> [u8; DESCRIPTOR_SIZE] {
        let mut b = [0u8; DESCRIPTOR_SIZE];
        b[0..8].copy_from_slice(&address.to_le_bytes());
        b[8..12].copy_from_slice(&length.to_le_bytes());
        b[15] = kind << 4;
        b
    }

    /// A descriptor's (address, length, type, sub type) from its bytes.
    pub fn parse(b: &[u8; DESCRIPTOR_SIZE]) -> (u64, u32, u8, u8) {
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[0..8]);
        let len = u32::from_le_bytes([b[8], b[9], b[10], b[11]]);
        (u64::from_le_bytes(a), len, b[15] >> 4, b[15] & 0xf)
    }

    /// The descriptor in a command's data pointer (`prp1`, `prp2`), as [`parse`] gives it.
    pub fn parse_dptr(prp1: u64, prp2: u64) -> (u64, u32, u8, u8) {
        let mut b = [0u8; DESCRIPTOR_SIZE];
        b[0..8].copy_from_slice(&prp1.to_le_bytes());
        b[8..16].copy_from_slice(&prp2.to_le_bytes());
        parse(&b)
    }
}

/// A submission queue entry (64 bytes), little-endian on the wire.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Command {
    /// Opcode.
    pub opcode: u8,
    /// Fused operation and PRP/SGL selection (bits 7:6 = 00: PRPs).
    pub flags: u8,
    /// Command identifier, echoed in the completion.
    pub cid: u16,
    /// Namespace.
    pub nsid: u32,
    /// Command dwords 2 and 3.
    pub cdw2: u32,
    /// Command dword 3.
    pub cdw3: u32,
    /// Metadata pointer.
    pub mptr: u64,
    /// PRP entry 1.
    pub prp1: u64,
    /// PRP entry 2 (or PRP list pointer).
    pub prp2: u64,
    /// Command dwords 10–15.
    pub cdw: [u32; 6],
}

impl Command {
    /// Size of an entry.
    pub const SIZE: usize = 64;

    /// A command with this opcode, everything else zero.
    #[inline]
    pub fn new(opcode: u8) -> Self {
        Command {
            opcode,
            ..Self::default()
        }
    }

    /// The entry's bytes.
    #[inline]
    pub fn to_bytes(&self) -> [u8; 64] {
        let mut b = [0u8; 64];
        b[0] = self.opcode;
        b[1] = self.flags;
        b[2..4].copy_from_slice(&self.cid.to_le_bytes());
        b[4..8].copy_from_slice(&self.nsid.to_le_bytes());
        b[8..12].copy_from_slice(&self.cdw2.to_le_bytes());
        b[12..16].copy_from_slice(&self.cdw3.to_le_bytes());
        b[16..24].copy_from_slice(&self.mptr.to_le_bytes());
        b[24..32].copy_from_slice(&self.prp1.to_le_bytes());
        b[32..40].copy_from_slice(&self.prp2.to_le_bytes());
        for (i, d) in self.cdw.iter().enumerate() {
            b[40 + 4 * i..44 + 4 * i].copy_from_slice(&d.to_le_bytes());
        }
        b
    }

    /// An entry from its bytes.
    pub fn from_bytes(b: &[u8; 64]) -> Self {
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let u64_at = |o: usize| u64::from(u32_at(o)) | u64::from(u32_at(o + 4)) << 32;
        Command {
            opcode: b[0],
            flags: b[1],
            cid: u16::from_le_bytes([b[2], b[3]]),
            nsid: u32_at(4),
            cdw2: u32_at(8),
            cdw3: u32_at(12),
            mptr: u64_at(16),
            prp1: u64_at(24),
            prp2: u64_at(32),
            cdw: [
                u32_at(40),
                u32_at(44),
                u32_at(48),
                u32_at(52),
                u32_at(56),
                u32_at(60),
            ],
        }
    }
}

/// A completion queue entry (16 bytes).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Completion {
    /// Command specific (dword 0).
    pub dw0: u32,
    /// Dword 1.
    pub dw1: u32,
    /// Submission queue head pointer.
    pub sq_head: u16,
    /// Submission queue identifier.
    pub sq_id: u16,
    /// Command identifier.
    pub cid: u16,
    /// Phase tag (bit 0) and status field (bits 15:1).
    pub status: u16,
}

impl Completion {
    /// Size of an entry.
    pub const SIZE: usize = 16;

    /// The entry's bytes.
    pub fn to_bytes(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0..4].copy_from_slice(&self.dw0.to_le_bytes());
        b[4..8].copy_from_slice(&self.dw1.to_le_bytes());
        b[8..10].copy_from_slice(&self.sq_head.to_le_bytes());
        b[10..12].copy_from_slice(&self.sq_id.to_le_bytes());
        b[12..14].copy_from_slice(&self.cid.to_le_bytes());
        b[14..16].copy_from_slice(&self.status.to_le_bytes());
        b
    }

    /// An entry from its bytes.
    pub fn from_bytes(b: &[u8; 16]) -> Self {
        Completion {
            dw0: u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            dw1: u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
            sq_head: u16::from_le_bytes([b[8], b[9]]),
            sq_id: u16::from_le_bytes([b[10], b[11]]),
            cid: u16::from_le_bytes([b[12], b[13]]),
            status: u16::from_le_bytes([b[14], b[15]]),
        }
    }

    /// The phase tag.
    pub fn phase(&self) -> bool {
        self.status & 1 == 1
    }

    /// The status field without the phase tag.
    pub fn status(&self) -> Status {
        Status(self.status >> 1)
    }
}

/// A completion's status field (phase tag removed): Status Code (bits 7:0), Status Code
/// Type (10:8), Do Not Retry (14).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Status(pub u16);

impl Status {
    /// Successful completion.
    pub const SUCCESS: Status = Status(0);
    /// Generic: Invalid Command Opcode.
    pub const INVALID_OPCODE: Status = Status(0x01);
    /// Generic: Invalid Field in Command.
    pub const INVALID_FIELD: Status = Status(0x02);
    /// Generic: Data Transfer Error.
    pub const DATA_TRANSFER_ERROR: Status = Status(0x04);
    /// Generic: Internal Error.
    pub const INTERNAL_ERROR: Status = Status(0x06);
    /// Generic: Command Abort Requested.
    pub const ABORT_REQUESTED: Status = Status(0x07);
    /// Generic: Command Aborted due to SQ Deletion.
    pub const ABORTED_SQ_DELETION: Status = Status(0x08);
    /// Generic: Invalid Namespace or Format.
    pub const INVALID_NAMESPACE: Status = Status(0x0b);
    /// Generic: Command Sequence Error.
    pub const COMMAND_SEQUENCE_ERROR: Status = Status(0x0c);
    /// Generic: Invalid SGL Segment Descriptor (a Segment or Last Segment descriptor with
    /// a bad length or address, or where none may be).
    pub const INVALID_SGL_SEGMENT_DESCRIPTOR: Status = Status(0x0d);
    /// Generic: Invalid Number of SGL Descriptors.
    pub const INVALID_SGL_DESCRIPTOR_COUNT: Status = Status(0x0e);
    /// Generic: Data SGL Length Invalid (the SGL describes less, or more, than the command
    /// moves).
    pub const DATA_SGL_LENGTH_INVALID: Status = Status(0x0f);
    /// Generic: SGL Descriptor Type Invalid.
    pub const SGL_DESCRIPTOR_TYPE_INVALID: Status = Status(0x11);
    /// Generic: PRP Offset Invalid.
    pub const PRP_OFFSET_INVALID: Status = Status(0x13);
    /// Generic: LBA Out of Range.
    pub const LBA_OUT_OF_RANGE: Status = Status(0x80);
    /// Command specific (NVM): Invalid Protection Information.
    pub const INVALID_PROTECTION_INFO: Status = Status(0x181);
    /// Media and data integrity: End-to-end Guard Check Error.
    pub const GUARD_CHECK_ERROR: Status = Status(0x282);
    /// Media and data integrity: End-to-end Application Tag Check Error.
    pub const APP_TAG_CHECK_ERROR: Status = Status(0x283);
    /// Media and data integrity: End-to-end Reference Tag Check Error.
    pub const REF_TAG_CHECK_ERROR: Status = Status(0x284);
    /// Command specific: Invalid Queue Identifier.
    pub const INVALID_QUEUE_ID: Status = Status(0x101);
    /// Command specific: Invalid Queue Size.
    pub const INVALID_QUEUE_SIZE: Status = Status(0x102);
    /// Command specific: Completion Queue Invalid (Create I/O SQ names a CQ that does not
    /// exist).
    pub const INVALID_CQ: Status = Status(0x100);
    /// Command specific: Abort Command Limit Exceeded.
    pub const ABORT_LIMIT_EXCEEDED: Status = Status(0x103);
    /// Command specific: Asynchronous Event Request Limit Exceeded.
    pub const ASYNC_EVENT_LIMIT_EXCEEDED: Status = Status(0x105);
    /// Command specific: Invalid Interrupt Vector.
    pub const INVALID_INTERRUPT_VECTOR: Status = Status(0x108);
    /// Command specific: Invalid Queue Deletion (a CQ that SQs still use).
    pub const INVALID_QUEUE_DELETION: Status = Status(0x10c);
    /// Command specific (Namespace Attachment): Namespace Already Attached.
    pub const NAMESPACE_ALREADY_ATTACHED: Status = Status(0x118);
    /// Command specific (Namespace Attachment): Namespace Is Private.
    pub const NAMESPACE_PRIVATE: Status = Status(0x119);
    /// Command specific (Virtualization Management): Invalid Controller Identifier.
    pub const INVALID_CONTROLLER_ID: Status = Status(0x11f);
    /// Command specific (Virtualization Management): Invalid Secondary Controller State.
    pub const INVALID_SECONDARY_STATE: Status = Status(0x120);
    /// Command specific (Virtualization Management): Invalid Number of Controller Resources.
    pub const INVALID_RESOURCE_COUNT: Status = Status(0x121);
    /// Command specific (Virtualization Management): Invalid Resource Identifier.
    pub const INVALID_RESOURCE_ID: Status = Status(0x122);

    /// A status from type and code.
    pub const fn new(sct: u8, sc: u8) -> Self {
        Status((sct as u16 & 7) << 8 | sc as u16)
    }
    /// Whether the command succeeded.
    pub fn is_success(self) -> bool {
        self.0 & 0x7ff == 0
    }
    /// Status Code Type.
    pub fn sct(self) -> u8 {
        (self.0 >> 8 & 7) as u8
    }
    /// Status Code.
    pub fn sc(self) -> u8 {
        self.0 as u8
    }
    /// Do Not Retry.
    pub fn dnr(self) -> bool {
        self.0 >> 14 & 1 == 1
    }
    /// More: the Error Information log page holds more about this status.
    pub fn more(self) -> bool {
        self.0 >> 13 & 1 == 1
    }
}

impl fmt::Debug for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Status({self})")
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match (self.sct(), self.sc()) {
            (0, 0x00) => "success",
            (0, 0x01) => "invalid command opcode",
            (0, 0x02) => "invalid field in command",
            (0, 0x04) => "data transfer error",
            (0, 0x06) => "internal error",
            (0, 0x07) => "command abort requested",
            (0, 0x08) => "command aborted due to SQ deletion",
            (0, 0x0b) => "invalid namespace or format",
            (0, 0x0c) => "command sequence error",
            (0, 0x13) => "PRP offset invalid",
            (0, 0x80) => "LBA out of range",
            (0, 0x81) => "capacity exceeded",
            (1, 0x00) => "completion queue invalid",
            (1, 0x01) => "invalid queue identifier",
            (1, 0x02) => "invalid queue size",
            (1, 0x05) => "asynchronous event request limit exceeded",
            (1, 0x08) => "invalid interrupt vector",
            (1, 0x0c) => "invalid queue deletion",
            (1, 0x18) => "namespace already attached",
            (1, 0x19) => "namespace is private",
            (1, 0x1a) => "namespace not attached",
            (1, 0x1c) => "controller list invalid",
            (1, 0x1f) => "invalid controller identifier",
            (1, 0x20) => "invalid secondary controller state",
            (1, 0x21) => "invalid number of controller resources",
            (1, 0x22) => "invalid resource identifier",
            (1, 0x81) => "invalid protection information",
            (2, 0x82) => "end-to-end guard check error",
            (2, 0x83) => "end-to-end application tag check error",
            (2, 0x84) => "end-to-end reference tag check error",
            (2, _) => "media or data integrity error",
            _ => "",
        };
        write!(f, "SCT {:#x} SC {:#04x}", self.sct(), self.sc())?;
        if !name.is_empty() {
            write!(f, " ({name})")?;
        }
        if self.dnr() {
            f.write_str(", do not retry")?;
        }
        Ok(())
    }
}

/// Why Identify data did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("identify {what}: {len} bytes, 4096 expected")]
pub struct IdentifyError {
    /// Which structure.
    pub what: &'static str,
    /// Its length.
    pub len: usize,
}

impl IdentifyError {
    /// Every Identify structure is one 4096-byte page: an error naming `what` otherwise.
    fn check(b: &[u8], what: &'static str) -> Result<(), IdentifyError> {
        if b.len() == 4096 {
            Ok(())
        } else {
            Err(IdentifyError { what, len: b.len() })
        }
    }
}

fn le16(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
fn le32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}
fn le64(b: &[u8], o: usize) -> u64 {
    u64::from(le32(b, o)) | u64::from(le32(b, o + 4)) << 32
}
// An ASCII field, space padded: trailing spaces and NULs dropped, bytes outside printable
// ASCII shown as '?'.
fn ascii(b: &[u8]) -> String {
    let s: String = b
        .iter()
        .map(|&c| if (0x20..0x7f).contains(&c) { c as char } else { '?' })
        .collect();
    s.trim_end_matches([' ', '?']).to_owned()
}

/// What the driver uses of Identify Controller (CNS 01h).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct IdentifyController {
    /// PCI Vendor ID.
    pub vid: u16,
    /// PCI Subsystem Vendor ID.
    pub ssvid: u16,
    /// Serial Number.
    pub serial: String,
    /// Model Number.
    pub model: String,
    /// Firmware Revision.
    pub firmware: String,
    /// Recommended Arbitration Burst (a power of two of commands).
    pub rab: u8,
    /// IEEE OUI Identifier (bytes 73–75, least significant byte first).
    pub ieee: u32,
    /// Controller Multi-Path I/O and Namespace Sharing Capabilities.
    pub cmic: u8,
    /// Maximum Data Transfer Size: a power of two in units of the minimum page size; 0 means
    /// no limit.
    pub mdts: u8,
    /// Controller ID.
    pub cntlid: u16,
    /// Version.
    pub ver: u32,
    /// RTD3 Entry Latency (µs): how long a shutdown may take.
    pub rtd3e: u32,
    /// Optional Admin Command Support.
    pub oacs: u16,
    /// Optional Asynchronous Events Supported (bit 8: namespace attribute notices, bit
    /// 9: firmware activation notices, ...).
    pub oaes: u32,
    /// Abort Command Limit, zero-based: at most `acl + 1` Aborts may be outstanding.
    pub acl: u8,
    /// Asynchronous Event Request Limit, zero-based: at most `aerl + 1` Asynchronous Event
    /// Requests may be outstanding.
    pub aerl: u8,
    /// Firmware Updates (slots, slot 1 read-only, activation without reset).
    pub frmw: u8,
    /// Log Page Attributes (bit 0: SMART / health information per namespace).
    pub lpa: u8,
    /// Error Log Page Entries, zero-based: the Error Information log holds `elpe + 1`
    /// entries.
    pub elpe: u8,
    /// Number of Power States Support, zero-based.
    pub npss: u8,
    /// Submission Queue Entry Size (required and maximum, log2).
    pub sqes: u8,
    /// Completion Queue Entry Size.
    pub cqes: u8,
    /// Number of Namespaces (the highest NSID).
    pub nn: u32,
    /// Optional NVM Command Support.
    pub oncs: u16,
    /// Fused Operation Support (bit 0: Compare and Write).
    pub fuses: u16,
    /// Format NVM Attributes.
    pub fna: u8,
    /// Volatile Write Cache present (bit 0).
    pub vwc: u8,
    /// Atomic Write Unit Normal, zero-based, in logical blocks.
    pub awun: u16,
    /// Atomic Write Unit Power Fail, zero-based, in logical blocks.
    pub awupf: u16,
    /// SGL Support (bytes 536–539): bits 1:0 say whether I/O commands of the NVM command
    /// set take SGLs (see [`sgl::supported`]).
    pub sgls: u32,
    /// NVM Subsystem NVMe Qualified Name.
    pub subnqn: String,
}

impl IdentifyController {
    /// Parses the 4096-byte structure.
    pub fn parse(b: &[u8]) -> Result<Self, IdentifyError> {
        IdentifyError::check(b, "controller")?;
        let nqn = &b[768..1024];
        let nqn = &nqn[..nqn.iter().position(|&c| c == 0).unwrap_or(nqn.len())];
        Ok(IdentifyController {
            vid: le16(b, 0),
            ssvid: le16(b, 2),
            serial: ascii(&b[4..24]),
            model: ascii(&b[24..64]),
            firmware: ascii(&b[64..72]),
            rab: b[72],
            ieee: u32::from(b[73]) | u32::from(b[74]) << 8 | u32::from(b[75]) << 16,
            cmic: b[76],
            mdts: b[77],
            cntlid: le16(b, 78),
            ver: le32(b, 80),
            rtd3e: le32(b, 88),
            oaes: le32(b, 92),
            oacs: le16(b, 256),
            acl: b[258],
            aerl: b[259],
            frmw: b[260],
            lpa: b[261],
            elpe: b[262],
            npss: b[263],
            sqes: b[512],
            cqes: b[513],
            nn: le32(b, 516),
            oncs: le16(b, 520),
            fuses: le16(b, 522),
            fna: b[524],
            vwc: b[525],
            awun: le16(b, 526),
            awupf: le16(b, 528),
            sgls: le32(b, 536),
            subnqn: ascii(nqn),
        })
    }

    /// The largest transfer in bytes, for minimum page size `page` (`None`: no limit).
    pub fn max_transfer(&self, page: u64) -> Option<u64> {
        (self.mdts != 0).then(|| page.checked_shl(u32::from(self.mdts)).unwrap_or(u64::MAX))
    }
}

/// An LBA format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LbaFormat {
    /// Metadata bytes per block.
    pub metadata: u16,
    /// Block size, log2 (9: 512 bytes, 12: 4096).
    pub lbads: u8,
    /// Relative performance.
    pub rp: u8,
}

/// What the driver uses of Identify Namespace (CNS 00h).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct IdentifyNamespace {
    /// Namespace Size, in blocks.
    pub nsze: u64,
    /// Namespace Capacity.
    pub ncap: u64,
    /// Namespace Utilization.
    pub nuse: u64,
    /// Namespace Features (thin provisioning, atomic parameters, ...).
    pub nsfeat: u8,
    /// Number of LBA Formats, zero-based (as reported; `formats` holds at most 64).
    pub nlbaf: u8,
    /// Formatted LBA Size: the index of the format in use (bits 3:0, and 6:5 above 16);
    /// bit 4: metadata at the end of each block's data (extended LBA).
    pub flbas: u8,
    /// Metadata Capabilities (bit 0: extended LBAs supported, bit 1: a separate buffer).
    pub mc: u8,
    /// End-to-end Data Protection Capabilities.
    pub dpc: u8,
    /// End-to-end Data Protection Type Settings: type in bits 2:0 (0 none, 1–3), bit 3:
    /// the protection information is the first 8 bytes of the metadata (else the last).
    pub dps: u8,
    /// Namespace Multi-path I/O and Namespace Sharing Capabilities.
    pub nmic: u8,
    /// Namespace Globally Unique Identifier (all zeroes: none).
    pub nguid: [u8; 16],
    /// IEEE Extended Unique Identifier (all zeroes: none).
    pub eui64: [u8; 8],
    /// The LBA formats (NLBAF + 1 of them, at most 64).
    pub formats: Vec<LbaFormat>,
}

impl IdentifyNamespace {
    /// Parses the 4096-byte structure.
    pub fn parse(b: &[u8]) -> Result<Self, IdentifyError> {
        IdentifyError::check(b, "namespace")?;
        let count = usize::from(b[25]) + 1;
        let formats = (0..count.min(64))
            .map(|i| {
                let d = le32(b, 128 + 4 * i);
                LbaFormat {
                    metadata: d as u16,
                    lbads: (d >> 16) as u8,
                    rp: (d >> 24 & 3) as u8,
                }
            })
            .collect();
        Ok(IdentifyNamespace {
            nsze: le64(b, 0),
            ncap: le64(b, 8),
            nuse: le64(b, 16),
            nsfeat: b[24],
            nlbaf: b[25],
            flbas: b[26],
            mc: b[27],
            dpc: b[28],
            dps: b[29],
            nmic: b[30],
            nguid: b[104..120].try_into().unwrap_or_default(),
            eui64: b[120..128].try_into().unwrap_or_default(),
            formats,
        })
    }

    /// The index of the LBA format in use.
    pub fn format_index(&self) -> usize {
        usize::from(self.flbas & 0xf) | usize::from(self.flbas >> 5 & 3) << 4
    }

    /// The format in use, if its index is within the list.
    pub fn format(&self) -> Option<LbaFormat> {
        self.formats.get(self.format_index()).copied()
    }

    /// Metadata bytes per block of the format in use (0 if none, or no valid format).
    pub fn metadata_size(&self) -> u16 {
        self.format().map_or(0, |f| f.metadata)
    }

    /// Whether metadata travels with each block's data (FLBAS bit 4: extended LBAs)
    /// rather than in a separate buffer (MPTR).
    pub fn extended_lba(&self) -> bool {
        self.flbas & 0x10 != 0
    }

    /// The end-to-end protection type in use (DPS bits 2:0): 0 none, 1–3 (4–7 reserved).
    pub fn protection_type(&self) -> u8 {
        self.dps & 7
    }

    /// Whether the protection information is the first 8 bytes of the metadata.
    pub fn protection_first(&self) -> bool {
        self.dps & 8 != 0
    }

    /// The block size in bytes, if the format in use is valid (512 bytes to 64 KiB).
    pub fn block_size(&self) -> Option<u32> {
        self.format()
            .filter(|f| (9..=16).contains(&f.lbads))
            .map(|f| 1u32 << f.lbads)
    }
}

/// What the driver uses of the NVM command set's Identify Controller (CNS 06h, CSI 0):
/// the limits of Write Zeroes and Dataset Management. Every field 0 means no limit
/// reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct IdentifyControllerNvm {
    /// Verify Size Limit (a power of two of the minimum page size).
    pub vsl: u8,
    /// Write Zeroes Size Limit (a power of two of the minimum page size).
    pub wzsl: u8,
    /// Write Uncorrectable Size Limit.
    pub wusl: u8,
    /// Dataset Management Ranges Limit: ranges in one command.
    pub dmrl: u8,
    /// Dataset Management Range Size Limit: logical blocks in one range.
    pub dmrsl: u32,
    /// Dataset Management Size Limit: logical blocks in one command, all ranges.
    pub dmsl: u64,
}

impl IdentifyControllerNvm {
    /// Parses the 4096-byte structure.
    pub fn parse(b: &[u8]) -> Result<Self, IdentifyError> {
        IdentifyError::check(b, "NVM command set controller")?;
        Ok(IdentifyControllerNvm {
            vsl: b[0],
            wzsl: b[1],
            wusl: b[2],
            dmrl: b[3],
            dmrsl: le32(b, 4),
            dmsl: le64(b, 8),
        })
    }

    /// The most bytes one Write Zeroes may cover, for minimum page size `page` (`None`: no
    /// limit reported).
    pub fn max_write_zeroes(&self, page: u64) -> Option<u64> {
        (self.wzsl != 0).then(|| page.checked_shl(u32::from(self.wzsl)).unwrap_or(u64::MAX))
    }
}

/// The guard of end-to-end protection information (16-bit guard format): the CRC-16 of
/// T10 DIF (polynomial 0x8BB7, initial value 0, not reflected) over a block's data.
pub fn crc16_t10dif(data: &[u8]) -> u16 {
    data.iter().fold(0u16, |crc, &b| {
        crc << 8 ^ CRC16_T10DIF[usize::from((crc >> 8) as u8 ^ b)]
    })
}

// The CRC of each byte value, a byte at a time.
const CRC16_T10DIF: [u16; 256] = {
    let mut table = [0u16; 256];
    let mut i = 0;
    while i < 256 {
        let mut crc = (i as u16) << 8;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 0x8000 != 0 {
                crc << 1 ^ 0x8bb7
            } else {
                crc << 1
            };
            bit += 1;
        }
        table[i] = crc;
        i += 1;
    }
    table
};

/// Protection Information field bits of command dword 12 (Read, Write, Write Zeroes).
pub mod prinfo {
    /// Protection Information Action: the controller inserts (writes) or strips (reads)
    /// the protection information; with 8 bytes of metadata none travels to the host.
    pub const PRACT: u32 = 1 << 29;
    /// Protection Information Check: the guard.
    pub const PRCHK_GUARD: u32 = 1 << 28;
    /// Protection Information Check: the application tag.
    pub const PRCHK_APP: u32 = 1 << 27;
    /// Protection Information Check: the reference tag (in CDW14).
    pub const PRCHK_REF: u32 = 1 << 26;
}

/// The namespace IDs of an active namespace list (CNS 02h): the nonzero entries before the
/// first zero.
pub fn parse_namespace_list(b: &[u8]) -> Vec<u32> {
    b.chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .take_while(|&n| n != 0)
        .collect()
}

/// One entry of the Secondary Controller List (CNS 15h).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SecondaryController {
    /// Secondary Controller Identifier.
    pub scid: u16,
    /// Primary Controller Identifier.
    pub pcid: u16,
    /// Online (bit 0 of SCS).
    pub online: bool,
    /// Virtual Function Number (1-based).
    pub vfn: u16,
    /// VQ flexible resources assigned.
    pub nvq: u16,
    /// VI flexible resources assigned.
    pub nvi: u16,
}

/// The entries of a Secondary Controller List (CNS 15h): a count byte, then 32-byte
/// entries. Entries past the buffer are left out.
pub fn parse_secondary_controllers(b: &[u8]) -> Vec<SecondaryController> {
    let Some(&count) = b.first() else {
        return Vec::new();
    };
    (0..usize::from(count))
        .map_while(|i| {
            let e = b.get(32 + 32 * i..64 + 32 * i)?;
            Some(SecondaryController {
                scid: le16(e, 0),
                pcid: le16(e, 2),
                online: e[4] & 1 == 1,
                vfn: le16(e, 8),
                nvq: le16(e, 10),
                nvi: le16(e, 12),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn qemu_cap_decodes() {
        // CAP of QEMU's emulated controller, read in the VM.
        let cap = Cap(0x0040_1820_0f01_07ff);
        assert_eq!(cap.max_queue_entries(), 2048);
        assert!(cap.contiguous_required());
        assert_eq!(cap.timeout_ms(), 7500);
        assert_eq!(cap.doorbell_stride(), 4);
        assert_eq!(cap.css(), 0xc1);
        assert_eq!(cap.page_size_min(), 4096);
        assert_eq!(cap.page_size_max(), 4096 << 4);
        assert_eq!((cap.sq_doorbell(0), cap.cq_doorbell(0)), (0x1000, 0x1004));
        assert_eq!((cap.sq_doorbell(3), cap.cq_doorbell(3)), (0x1018, 0x101c));
        // DSTRD 2: 16-byte stride.
        assert_eq!(Cap(2 << 32).cq_doorbell(1), 0x1000 + 3 * 16);
    }

    #[test]
    fn status_names_and_bits() {
        let s = Completion {
            status: (Status::new(0, 0x80).0 | 1 << 14) << 1 | 1,
            ..Default::default()
        };
        assert!(s.phase());
        assert_eq!(s.status().sc(), 0x80);
        assert!(s.status().dnr());
        assert!(!s.status().is_success());
        assert_eq!(
            s.status().to_string(),
            "SCT 0x0 SC 0x80 (LBA out of range), do not retry"
        );
        assert!(Status(1 << 14).is_success(), "DNR alone is not an error");
    }

    #[test]
    fn identify_controller_fields() {
        let mut b = vec![0u8; 4096];
        b[0..2].copy_from_slice(&0x1b36u16.to_le_bytes());
        b[4..24].copy_from_slice(b"deadbeef            ");
        b[24..64].copy_from_slice(b"QEMU NVMe Ctrl                          ");
        b[64..72].copy_from_slice(b"7.2.22  ");
        b[77] = 7;
        b[92..96].copy_from_slice(&0x0100u32.to_le_bytes());
        b[256..258].copy_from_slice(&0x01cau16.to_le_bytes());
        b[259] = 3;
        b[262] = 63;
        b[516..520].copy_from_slice(&256u32.to_le_bytes());
        b[768..782].copy_from_slice(b"nqn.2019-08.x\0");
        let id = IdentifyController::parse(&b).unwrap();
        assert_eq!(
            (
                id.vid,
                id.serial.as_str(),
                id.model.as_str(),
                id.firmware.as_str()
            ),
            (0x1b36, "deadbeef", "QEMU NVMe Ctrl", "7.2.22")
        );
        assert_eq!(id.max_transfer(4096), Some(512 * 1024));
        assert_ne!(id.oacs & oacs::DOORBELL_BUFFER_CONFIG, 0);
        assert_eq!(id.nn, 256);
        assert_eq!((id.oaes, id.aerl, id.elpe), (0x100, 3, 63));
        assert_eq!(id.subnqn, "nqn.2019-08.x");
        assert!(IdentifyController::parse(&b[..100]).is_err());
    }

    // The fields nvme-cli's id-ctrl / id-ns print that the driver does not use, each at its
    // offset (values chosen so that a wrong offset or width shows).
    #[test]
    fn identify_fields_nvme_cli_prints() {
        let mut b = vec![0u8; 4096];
        b[72] = 6; // rab
        b[73..76].copy_from_slice(&[0x38, 0x25, 0x00]); // ieee 002538, LSB first
        b[76] = 0x0b; // cmic
        b[77] = 9;
        b[260] = 0x17; // frmw
        b[261] = 0x0e;
        b[263] = 4; // npss
        b[520..522].copy_from_slice(&0x005fu16.to_le_bytes());
        b[522..524].copy_from_slice(&0x0001u16.to_le_bytes()); // fuses
        b[524] = 0x04; // fna
        b[525] = 0x07; // vwc
        b[526..528].copy_from_slice(&0x00ffu16.to_le_bytes()); // awun
        b[528..530].copy_from_slice(&0x0100u16.to_le_bytes()); // awupf
        let id = IdentifyController::parse(&b).unwrap();
        assert_eq!((id.rab, id.ieee, id.cmic, id.mdts), (6, 0x002538, 0x0b, 9));
        assert_eq!((id.frmw, id.lpa, id.npss), (0x17, 0x0e, 4));
        assert_eq!((id.oncs, id.fuses, id.fna, id.vwc), (0x5f, 1, 4, 7));
        assert_eq!((id.awun, id.awupf), (0xff, 0x100));

        let mut b = vec![0u8; 4096];
        b[24] = 0x1a; // nsfeat
        b[25] = 3; // nlbaf
        b[30] = 1; // nmic
        for i in 0..16 {
            b[104 + i] = 0xa0 + i as u8; // nguid
        }
        b[120..128].copy_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8]); // eui64
        let ns = IdentifyNamespace::parse(&b).unwrap();
        assert_eq!((ns.nsfeat, ns.nlbaf, ns.nmic), (0x1a, 3, 1));
        assert_eq!(ns.nguid[0], 0xa0);
        assert_eq!(ns.nguid[15], 0xaf);
        assert_eq!(ns.eui64, [1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(ns.formats.len(), 4);
    }

    #[test]
    fn identify_namespace_formats() {
        let mut b = vec![0u8; 4096];
        b[0..8].copy_from_slice(&2048u64.to_le_bytes());
        b[25] = 1; // two formats
        b[26] = 1; // the second in use
        b[128..132].copy_from_slice(&(9u32 << 16).to_le_bytes());
        b[132..136].copy_from_slice(&(12u32 << 16).to_le_bytes());
        let ns = IdentifyNamespace::parse(&b).unwrap();
        assert_eq!(ns.nsze, 2048);
        assert_eq!(ns.formats.len(), 2);
        assert_eq!(ns.block_size(), Some(4096));
        b[26] = 5; // beyond the list
        assert_eq!(IdentifyNamespace::parse(&b).unwrap().block_size(), None);
    }

    #[test]
    fn crc16_t10dif_check_value() {
        // The catalogued check value of CRC-16/T10-DIF.
        assert_eq!(crc16_t10dif(b"123456789"), 0xd0db);
        assert_eq!(crc16_t10dif(&[0; 512]), 0);
    }

    #[test]
    fn identify_namespace_metadata_and_protection() {
        let mut b = vec![0u8; 4096];
        b[25] = 2;
        b[26] = 0x12; // format 2, extended LBA
        b[27] = 3;
        b[29] = 0x09; // type 1, first 8 bytes
        b[136..140].copy_from_slice(&(8u32 | 9 << 16).to_le_bytes());
        let ns = IdentifyNamespace::parse(&b).unwrap();
        assert_eq!(ns.block_size(), Some(512));
        assert_eq!(ns.metadata_size(), 8);
        assert!(ns.extended_lba());
        assert_eq!((ns.protection_type(), ns.protection_first()), (1, true));
        let mut n = vec![0u8; 4096];
        n[1] = 2;
        n[3] = 16;
        n[4..8].copy_from_slice(&100u32.to_le_bytes());
        let nvm = IdentifyControllerNvm::parse(&n).unwrap();
        assert_eq!((nvm.wzsl, nvm.dmrl, nvm.dmrsl, nvm.dmsl), (2, 16, 100, 0));
        assert_eq!(nvm.max_write_zeroes(4096), Some(16384));
        assert_eq!(IdentifyControllerNvm::default().max_write_zeroes(4096), None);
    }

    #[test]
    fn ready_timeouts() {
        let cap = Cap(0x0f << 24);
        assert_eq!(cap.ready_timeout_ms(0x0001_0400), 7500, "CRWMS clear: CAP.TO");
        let cap = Cap(0xff << 24 | 3 << 59);
        assert!(cap.crwms() && cap.crims());
        assert_eq!(cap.ready_timeout_ms(0x0002_0400), 0x400 * 500);
        assert_eq!(cap.ready_timeout_ms(0), 0xff * 500, "CRWMT 0: CAP.TO");
    }

    #[test]
    fn lists() {
        let mut b = vec![0u8; 4096];
        b[0..4].copy_from_slice(&1u32.to_le_bytes());
        b[4..8].copy_from_slice(&3u32.to_le_bytes());
        assert_eq!(parse_namespace_list(&b), [1, 3]);
        let mut s = vec![0u8; 4096];
        s[0] = 2;
        s[32..34].copy_from_slice(&1u16.to_le_bytes());
        s[36] = 1;
        s[40..42].copy_from_slice(&1u16.to_le_bytes());
        s[42..44].copy_from_slice(&2u16.to_le_bytes());
        s[64..66].copy_from_slice(&2u16.to_le_bytes());
        let list = parse_secondary_controllers(&s);
        assert_eq!(list.len(), 2);
        assert_eq!(
            (list[0].scid, list[0].online, list[0].vfn, list[0].nvq),
            (1, true, 1, 2)
        );
        assert_eq!(parse_secondary_controllers(&s[..40]).len(), 0);
    }

    #[test]
    fn secondary_controller_entries_as_qemu_answers() {
        // Two entries, as QEMU (7.2) answered after assigning 2 VQ and 1 VI to secondary
        // controller 1 (VF 1) and setting it online; controller 2 (VF 2) untouched.
        let mut s = vec![0u8; 4096];
        s[0] = 2;
        s[32..34].copy_from_slice(&1u16.to_le_bytes());
        s[36] = 1;
        s[40..42].copy_from_slice(&1u16.to_le_bytes());
        s[42..44].copy_from_slice(&2u16.to_le_bytes());
        s[44..46].copy_from_slice(&1u16.to_le_bytes());
        s[64..66].copy_from_slice(&2u16.to_le_bytes());
        s[72..74].copy_from_slice(&2u16.to_le_bytes());
        let list = parse_secondary_controllers(&s);
        assert_eq!(
            list,
            [
                SecondaryController {
                    scid: 1,
                    pcid: 0,
                    online: true,
                    vfn: 1,
                    nvq: 2,
                    nvi: 1
                },
                SecondaryController {
                    scid: 2,
                    pcid: 0,
                    online: false,
                    vfn: 2,
                    nvq: 0,
                    nvi: 0
                },
            ]
        );
        assert!(parse_secondary_controllers(&s[..63]).is_empty());
        assert!(parse_secondary_controllers(&[]).is_empty());
    }

    #[test]
    fn virtualization_management_dwords() {
        // Assign 2 VQs to secondary controller 1: action 8, type 0, CNTLID in bits 31:16.
        let c = virt_mgmt_command(virt_mgmt::SECONDARY_ASSIGN, virt_mgmt::RESOURCE_VQ, 1, 2);
        assert_eq!((c.opcode, c.cdw[0], c.cdw[1]), (0x1c, 0x0001_0008, 2));
        // Release the primary's (CNTLID 0) flexible VIs: action 1, type 1, count 0.
        let c = virt_mgmt_command(
            virt_mgmt::PRIMARY_FLEXIBLE_ALLOCATION,
            virt_mgmt::RESOURCE_VI,
            0,
            0,
        );
        assert_eq!((c.cdw[0], c.cdw[1]), (0x0000_0101, 0));
        let c = virt_mgmt_command(virt_mgmt::SECONDARY_ONLINE, 0, 0xfffe, 0);
        assert_eq!(c.cdw[0], 0xfffe_0009);
        // Out-of-range action and type bits do not spill into neighbouring fields.
        assert_eq!(virt_mgmt_command(0xff, 0xff, 0, 0).cdw[0], 0x70f);
    }

    #[test]
    fn namespace_attachment_data() {
        let c = namespace_attachment_command(1, ns_attach::ATTACH);
        assert_eq!((c.opcode, c.nsid, c.cdw[0]), (0x15, 1, 0));
        assert_eq!(namespace_attachment_command(3, ns_attach::DETACH).cdw[0], 1);
        let l = controller_list(&[1, 2]);
        assert_eq!((l.len(), &l[..6]), (4096, &[2, 0, 1, 0, 2, 0][..]));
        assert_eq!(controller_list(&vec![7; 5000])[..2], 2047u16.to_le_bytes());
        assert_eq!(
            Status::NAMESPACE_ALREADY_ATTACHED.to_string(),
            "SCT 0x1 SC 0x18 (namespace already attached)"
        );
    }

    #[test]
    fn primary_controller_capabilities() {
        // QEMU's with sriov_max_vfs=2, sriov_vq_flexible=4, sriov_vi_flexible=2,
        // max_ioqpairs=6, msix_qsize=4, before anything was reassigned: the primary holds
        // every flexible resource.
        let mut b = vec![0u8; 4096];
        b[4] = 3;
        b[32..36].copy_from_slice(&4u32.to_le_bytes());
        b[40..42].copy_from_slice(&4u16.to_le_bytes());
        b[42..44].copy_from_slice(&3u16.to_le_bytes());
        b[44..46].copy_from_slice(&4u16.to_le_bytes());
        b[46..48].copy_from_slice(&1u16.to_le_bytes());
        b[64..68].copy_from_slice(&2u32.to_le_bytes());
        b[72..74].copy_from_slice(&2u16.to_le_bytes());
        b[74..76].copy_from_slice(&2u16.to_le_bytes());
        b[76..78].copy_from_slice(&2u16.to_le_bytes());
        b[78..80].copy_from_slice(&1u16.to_le_bytes());
        let c = PrimaryControllerCaps::parse(&b).unwrap();
        assert_eq!((c.cntlid, c.crt), (0, 3));
        assert_eq!(
            (c.vqfrt, c.vqrfa, c.vqrfap, c.vqprt, c.vqfrsm, c.vqgran),
            (4, 0, 4, 3, 4, 1)
        );
        assert_eq!(
            (c.vifrt, c.virfa, c.virfap, c.viprt, c.vifrsm, c.vigran),
            (2, 0, 2, 2, 2, 1)
        );
        assert_eq!((c.vq_free(), c.vi_free()), (0, 0));
        // Released by the primary, one VQ assigned to a secondary.
        b[36..40].copy_from_slice(&1u32.to_le_bytes());
        b[40..42].copy_from_slice(&0u16.to_le_bytes());
        assert_eq!(PrimaryControllerCaps::parse(&b).unwrap().vq_free(), 3);
        assert!(PrimaryControllerCaps::parse(&b[..80]).is_err());
    }

    proptest! {
        #[test]
        fn entries_round_trip(bytes in proptest::array::uniform32(any::<u8>()), more in proptest::array::uniform32(any::<u8>())) {
            let mut b = [0u8; 64];
            b[..32].copy_from_slice(&bytes);
            b[32..].copy_from_slice(&more);
            prop_assert_eq!(Command::from_bytes(&b).to_bytes(), b);
            let c: [u8; 16] = bytes[..16].try_into().unwrap();
            prop_assert_eq!(Completion::from_bytes(&c).to_bytes(), c);
        }

        #[test]
        fn identify_parsers_never_panic(data in proptest::collection::vec(any::<u8>(), 0..5000)) {
            let _ = IdentifyController::parse(&data);
            let _ = IdentifyNamespace::parse(&data);
            let _ = parse_namespace_list(&data);
            let _ = parse_secondary_controllers(&data);
            let _ = PrimaryControllerCaps::parse(&data);
            let _ = parse_secondary_controllers(&data);
            let _ = IdentifyControllerNvm::parse(&data);
        }
    }
}
