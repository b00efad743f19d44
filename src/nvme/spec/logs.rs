//! Log pages (Get Log Page) and Asynchronous Event Request completions: identifiers,
//! the command, and parsers — pure functions over bytes the controller wrote, which never
//! panic whatever those bytes are.

use std::fmt;

use super::{Command, Status, admin, le16, le32, le64};

/// Log page identifiers.
pub mod lid {
    /// Error Information: the controller's most recent errors, 64 bytes each.
    pub const ERROR_INFORMATION: u8 = 0x01;
    /// SMART / Health Information (512 bytes).
    pub const SMART_HEALTH: u8 = 0x02;
    /// Firmware Slot Information (512 bytes).
    pub const FIRMWARE_SLOT: u8 = 0x03;
    /// Changed Namespace List: up to 1,024 namespace IDs (4096 bytes).
    pub const CHANGED_NAMESPACES: u8 = 0x04;
}

/// Bytes of one Error Information log entry.
pub const ERROR_ENTRY_SIZE: usize = 64;

/// Get Log Page for `len` bytes (a nonzero multiple of 4) of log page `lid` of namespace
/// `nsid` (0xffff_ffff: the controller as a whole), from byte `offset` (a multiple of 4)
/// of the page. `retain` sets Retain Asynchronous Event: the read does not clear an
/// event waiting for this page. The data pointer is the caller's to set. `None` when
/// `len` or `offset` cannot be expressed.
pub fn get_log_page_command(lid: u8, nsid: u32, len: usize, offset: u64, retain: bool) -> Option<Command> {
    if len == 0 || !len.is_multiple_of(4) || !offset.is_multiple_of(4) {
        return None;
    }
    let numd = u32::try_from(len / 4 - 1).ok()?;
    let mut cmd = Command::new(admin::GET_LOG_PAGE);
    cmd.nsid = nsid;
    cmd.cdw[0] = u32::from(lid) | u32::from(retain) << 15 | (numd & 0xffff) << 16;
    cmd.cdw[1] = numd >> 16;
    cmd.cdw[2] = offset as u32;
    cmd.cdw[3] = (offset >> 32) as u32;
    Some(cmd)
}

/// What a Get Log Page command asks for: (log page id, NSID, bytes, offset, Retain
/// Asynchronous Event). The inverse of [`get_log_page_command`].
pub fn parse_get_log_page(cmd: &Command) -> (u8, u32, usize, u64, bool) {
    let numd = (cmd.cdw[0] >> 16 | (cmd.cdw[1] & 0xffff) << 16) as usize;
    (
        cmd.cdw[0] as u8,
        cmd.nsid,
        (numd + 1) * 4,
        u64::from(cmd.cdw[2]) | u64::from(cmd.cdw[3]) << 32,
        cmd.cdw[0] & 1 << 15 != 0,
    )
}

/// Why a log page did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("log page {what}: {len} bytes, at least {need} expected")]
pub struct LogError {
    /// Which log page.
    pub what: &'static str,
    /// The bytes given.
    pub len: usize,
    /// The bytes it needs.
    pub need: usize,
}

fn le128(b: &[u8], o: usize) -> u128 {
    u128::from(le64(b, o)) | u128::from(le64(b, o + 8)) << 64
}

/// Critical Warning bits of the SMART / Health Information log.
pub mod critical {
    /// Available spare capacity fell below its threshold.
    pub const SPARE: u8 = 1 << 0;
    /// A temperature is above an over-temperature or below an under-temperature threshold.
    pub const TEMPERATURE: u8 = 1 << 1;
    /// NVM subsystem reliability is degraded (media errors, internal errors).
    pub const RELIABILITY: u8 = 1 << 2;
    /// The media were placed in read-only mode.
    pub const READ_ONLY: u8 = 1 << 3;
    /// The volatile memory backup device failed.
    pub const VOLATILE_BACKUP: u8 = 1 << 4;
    /// The persistent memory region became read-only or unreliable.
    pub const PMR_READ_ONLY: u8 = 1 << 5;
}

/// The SMART / Health Information log page (02h). Counters are 128-bit, as the
/// specification has them; data units are thousands of 512-byte units (a data unit is
/// 512,000 bytes), rounded up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct SmartLog {
    /// Critical Warning: the [`critical`] bits.
    pub critical_warning: u8,
    /// Composite Temperature, in kelvins (0: not reported).
    pub temperature: u16,
    /// Available Spare: percentage of the spare capacity left (0–100).
    pub available_spare: u8,
    /// Available Spare Threshold: the percentage below which the spare warning is set.
    pub available_spare_threshold: u8,
    /// Percentage Used: the estimate of life used (may exceed 100).
    pub percentage_used: u8,
    /// Endurance Group Critical Warning Summary.
    pub endurance_group_warning: u8,
    /// Data Units Read (thousands of 512-byte units).
    pub data_units_read: u128,
    /// Data Units Written (thousands of 512-byte units).
    pub data_units_written: u128,
    /// Host Read Commands completed.
    pub host_read_commands: u128,
    /// Host Write Commands completed.
    pub host_write_commands: u128,
    /// Controller Busy Time, in minutes.
    pub controller_busy_time: u128,
    /// Power Cycles.
    pub power_cycles: u128,
    /// Power On Hours.
    pub power_on_hours: u128,
    /// Unsafe Shutdowns.
    pub unsafe_shutdowns: u128,
    /// Media and Data Integrity Errors.
    pub media_errors: u128,
    /// Number of Error Information Log Entries over the controller's life.
    pub error_log_entries: u128,
    /// Warning Composite Temperature Time, in minutes.
    pub warning_temperature_time: u32,
    /// Critical Composite Temperature Time, in minutes.
    pub critical_temperature_time: u32,
    /// Temperature Sensors 1–8, in kelvins (0: no such sensor).
    pub temperature_sensors: [u16; 8],
}

impl SmartLog {
    /// Bytes of the log page.
    pub const SIZE: usize = 512;

    /// Parses the log page (at least the first 512 bytes).
    pub fn parse(b: &[u8]) -> Result<Self, LogError> {
        if b.len() < Self::SIZE {
            return Err(LogError {
                what: "SMART / health information",
                len: b.len(),
                need: Self::SIZE,
            });
        }
        let mut temperature_sensors = [0u16; 8];
        for (i, t) in temperature_sensors.iter_mut().enumerate() {
            *t = le16(b, 200 + 2 * i);
        }
        Ok(SmartLog {
            critical_warning: b[0],
            temperature: le16(b, 1),
            available_spare: b[3],
            available_spare_threshold: b[4],
            percentage_used: b[5],
            endurance_group_warning: b[6],
            data_units_read: le128(b, 32),
            data_units_written: le128(b, 48),
            host_read_commands: le128(b, 64),
            host_write_commands: le128(b, 80),
            controller_busy_time: le128(b, 96),
            power_cycles: le128(b, 112),
            power_on_hours: le128(b, 128),
            unsafe_shutdowns: le128(b, 144),
            media_errors: le128(b, 160),
            error_log_entries: le128(b, 176),
            warning_temperature_time: le32(b, 192),
            critical_temperature_time: le32(b, 196),
            temperature_sensors,
        })
    }

    /// The log page's bytes (what a controller writes; the inverse of
    /// [`parse`](Self::parse)).
    pub fn to_bytes(&self) -> [u8; 512] {
        let mut b = [0u8; 512];
        b[0] = self.critical_warning;
        b[1..3].copy_from_slice(&self.temperature.to_le_bytes());
        b[3] = self.available_spare;
        b[4] = self.available_spare_threshold;
        b[5] = self.percentage_used;
        b[6] = self.endurance_group_warning;
        for (at, v) in [
            (32, self.data_units_read),
            (48, self.data_units_written),
            (64, self.host_read_commands),
            (80, self.host_write_commands),
            (96, self.controller_busy_time),
            (112, self.power_cycles),
            (128, self.power_on_hours),
            (144, self.unsafe_shutdowns),
            (160, self.media_errors),
            (176, self.error_log_entries),
        ] {
            b[at..at + 16].copy_from_slice(&v.to_le_bytes());
        }
        b[192..196].copy_from_slice(&self.warning_temperature_time.to_le_bytes());
        b[196..200].copy_from_slice(&self.critical_temperature_time.to_le_bytes());
        for (i, t) in self.temperature_sensors.iter().enumerate() {
            b[200 + 2 * i..202 + 2 * i].copy_from_slice(&t.to_le_bytes());
        }
        b
    }

    /// The composite temperature in degrees Celsius (`None` when not reported).
    pub fn temperature_celsius(&self) -> Option<i32> {
        (self.temperature != 0).then(|| i32::from(self.temperature) - 273)
    }

    /// Bytes that [`data_units_read`](Self::data_units_read) stands for (at most; units
    /// are rounded up).
    pub fn bytes_read(&self) -> u128 {
        self.data_units_read.saturating_mul(512_000)
    }

    /// Bytes that [`data_units_written`](Self::data_units_written) stands for (at most).
    pub fn bytes_written(&self) -> u128 {
        self.data_units_written.saturating_mul(512_000)
    }
}

/// One entry of the Error Information log page (01h).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct ErrorLogEntry {
    /// Error Count: the error's unique, increasing number (0: an empty entry).
    pub error_count: u64,
    /// Submission Queue ID of the command (0xffff: not tied to a command).
    pub sqid: u16,
    /// Command ID (0xffff: not tied to a command).
    pub cid: u16,
    /// The status the command completed with.
    pub status: Status,
    /// Parameter Error Location: byte (bits 7:0) and bit (10:8) of the command in error
    /// (0xffff: not reported).
    pub parameter_location: u16,
    /// The first LBA that had the error, if any.
    pub lba: u64,
    /// The namespace that had the error, if any.
    pub nsid: u32,
    /// Vendor Specific Information Available: a log page id with more (0: none).
    pub vendor_log_page: u8,
    /// Transport Type of the command (NVMe 1.4: 0 reserved).
    pub transport_type: u8,
    /// Command Specific Information.
    pub command_specific: u64,
    /// Transport Type Specific Information.
    pub transport_specific: u16,
}

impl ErrorLogEntry {
    /// Parses one 64-byte entry (`None` if `b` is shorter).
    pub fn parse(b: &[u8]) -> Option<Self> {
        if b.len() < ERROR_ENTRY_SIZE {
            return None;
        }
        Some(ErrorLogEntry {
            error_count: le64(b, 0),
            sqid: le16(b, 8),
            cid: le16(b, 10),
            status: Status(le16(b, 12) >> 1),
            parameter_location: le16(b, 14),
            lba: le64(b, 16),
            nsid: le32(b, 24),
            vendor_log_page: b[28],
            transport_type: b[29],
            command_specific: le64(b, 32),
            transport_specific: le16(b, 40),
        })
    }

    /// The entry's 64 bytes (the inverse of [`parse`](Self::parse); the phase tag bit of
    /// the status field is 0).
    pub fn to_bytes(&self) -> [u8; ERROR_ENTRY_SIZE] {
        let mut b = [0u8; ERROR_ENTRY_SIZE];
        b[0..8].copy_from_slice(&self.error_count.to_le_bytes());
        b[8..10].copy_from_slice(&self.sqid.to_le_bytes());
        b[10..12].copy_from_slice(&self.cid.to_le_bytes());
        b[12..14].copy_from_slice(&((self.status.0 & 0x7fff) << 1).to_le_bytes());
        b[14..16].copy_from_slice(&self.parameter_location.to_le_bytes());
        b[16..24].copy_from_slice(&self.lba.to_le_bytes());
        b[24..28].copy_from_slice(&self.nsid.to_le_bytes());
        b[28] = self.vendor_log_page;
        b[29] = self.transport_type;
        b[32..40].copy_from_slice(&self.command_specific.to_le_bytes());
        b[40..42].copy_from_slice(&self.transport_specific.to_le_bytes());
        b
    }
}

/// The entries of an Error Information log page, newest first as the controller lists
/// them: every whole 64-byte entry with a nonzero Error Count (empty entries left out).
pub fn parse_error_log(b: &[u8]) -> Vec<ErrorLogEntry> {
    b.chunks_exact(ERROR_ENTRY_SIZE)
        .filter_map(ErrorLogEntry::parse)
        .filter(|e| e.error_count != 0)
        .collect()
}

/// The namespace IDs of a Changed Namespace List log page (04h): the nonzero entries
/// before the first zero. A list whose first entry is 0xffff_ffff means more than 1,024
/// namespaces changed (every namespace should be looked at again).
pub fn parse_changed_namespaces(b: &[u8]) -> Vec<u32> {
    super::parse_namespace_list(b)
}

/// Asynchronous Event Type (bits 2:0 of an Asynchronous Event Request's completion
/// dword 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AsyncEventType {
    /// Error status (log page Error Information, usually).
    Error,
    /// SMART / Health status (log page SMART / Health Information).
    SmartHealth,
    /// Notice (namespace attribute changed, firmware activation starting, ...).
    Notice,
    /// Immediate (NVMe 2.0): a change reported without a log page to read.
    Immediate,
    /// I/O Command Specific status (reservations, sanitize, ...).
    IoCommandSet,
    /// Vendor specific.
    Vendor,
    /// A reserved type value.
    Reserved(u8),
}

impl AsyncEventType {
    /// The type of code `t` (3 bits).
    pub fn from_code(t: u8) -> Self {
        match t & 7 {
            0 => AsyncEventType::Error,
            1 => AsyncEventType::SmartHealth,
            2 => AsyncEventType::Notice,
            3 => AsyncEventType::Immediate,
            6 => AsyncEventType::IoCommandSet,
            7 => AsyncEventType::Vendor,
            t => AsyncEventType::Reserved(t),
        }
    }

    /// Its code.
    pub fn code(self) -> u8 {
        match self {
            AsyncEventType::Error => 0,
            AsyncEventType::SmartHealth => 1,
            AsyncEventType::Notice => 2,
            AsyncEventType::Immediate => 3,
            AsyncEventType::IoCommandSet => 6,
            AsyncEventType::Vendor => 7,
            AsyncEventType::Reserved(t) => t & 7,
        }
    }
}

/// What an Asynchronous Event Request's completion dword 0 says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AsyncEventInfo {
    /// Asynchronous Event Type.
    pub kind: AsyncEventType,
    /// Asynchronous Event Information (its meaning depends on the type).
    pub info: u8,
    /// The log page to read for details, which also clears the event (unless read with
    /// Retain Asynchronous Event).
    pub log_page: u8,
}

impl AsyncEventInfo {
    /// Decodes completion dword 0 (bits 2:0 type, 15:8 information, 23:16 log page).
    pub fn from_dw0(dw0: u32) -> Self {
        AsyncEventInfo {
            kind: AsyncEventType::from_code(dw0 as u8),
            info: (dw0 >> 8) as u8,
            log_page: (dw0 >> 16) as u8,
        }
    }

    /// Completion dword 0 saying this (the inverse of [`from_dw0`](Self::from_dw0)).
    pub fn to_dw0(self) -> u32 {
        u32::from(self.kind.code()) | u32::from(self.info) << 8 | u32::from(self.log_page) << 16
    }

    /// What the information code means for its type, as the specification names it
    /// (`None` for codes it does not define, and for vendor and command set events).
    pub fn describe(self) -> Option<&'static str> {
        Some(match (self.kind, self.info) {
            (AsyncEventType::Error, 0) => "write to an invalid doorbell register",
            (AsyncEventType::Error, 1) => "invalid doorbell write value",
            (AsyncEventType::Error, 2) => "diagnostic failure",
            (AsyncEventType::Error, 3) => "persistent internal error",
            (AsyncEventType::Error, 4) => "transient internal error",
            (AsyncEventType::Error, 5) => "firmware image load error",
            (AsyncEventType::SmartHealth, 0) => "NVM subsystem reliability",
            (AsyncEventType::SmartHealth, 1) => "temperature threshold",
            (AsyncEventType::SmartHealth, 2) => "spare below threshold",
            (AsyncEventType::Notice, 0) => "namespace attribute changed",
            (AsyncEventType::Notice, 1) => "firmware activation starting",
            (AsyncEventType::Notice, 2) => "telemetry log changed",
            (AsyncEventType::Notice, 3) => "asymmetric namespace access change",
            (AsyncEventType::Notice, 4) => "predictable latency event aggregate log change",
            (AsyncEventType::Notice, 5) => "LBA status information alert",
            (AsyncEventType::Notice, 6) => "endurance group event aggregate log page change",
            _ => return None,
        })
    }
}

impl fmt::Display for AsyncEventInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?} event", self.kind)?;
        match self.describe() {
            Some(what) => write!(f, ": {what}")?,
            None => write!(f, ", information {:#04x}", self.info)?,
        }
        write!(f, " (log page {:#04x})", self.log_page)
    }
}

/// Asynchronous Event Configuration (Set Features 0Bh) bits the driver turns on.
pub mod aec {
    /// SMART / Health critical warnings that raise an event: the [`super::critical`] bits.
    pub const SMART_MASK: u32 = 0xff;
    /// Namespace Attribute Notices (also the OAES bit saying they are supported).
    pub const NAMESPACE_ATTRIBUTE: u32 = 1 << 8;
    /// Firmware Activation Notices (also the OAES bit).
    pub const FIRMWARE_ACTIVATION: u32 = 1 << 9;
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn get_log_page_dwords() {
        // 4096 bytes: NUMD 1023 splits as NUMDL in CDW10 31:16 and NUMDU in CDW11 15:0.
        let c = get_log_page_command(lid::SMART_HEALTH, 0xffff_ffff, 4096, 0, false).unwrap();
        assert_eq!(c.opcode, admin::GET_LOG_PAGE);
        assert_eq!(c.cdw[0], 0x03ff_0002);
        assert_eq!(c.cdw[1], 0);
        // 1 MiB: NUMD 0x3ffff, with NUMDU 3; RAE bit 15; the offset in CDW12/13.
        let c = get_log_page_command(lid::ERROR_INFORMATION, 1, 1 << 20, 0x1_0000_0040, true).unwrap();
        assert_eq!(c.cdw[0], 0xffff_8001);
        assert_eq!(c.cdw[1], 3);
        assert_eq!((c.cdw[2], c.cdw[3]), (0x40, 1));
        assert_eq!(
            parse_get_log_page(&c),
            (lid::ERROR_INFORMATION, 1, 1 << 20, 0x1_0000_0040, true)
        );
        assert!(get_log_page_command(2, 0, 0, 0, false).is_none());
        assert!(get_log_page_command(2, 0, 6, 0, false).is_none());
        assert!(get_log_page_command(2, 0, 8, 2, false).is_none());
    }

    #[test]
    fn smart_log_fields_at_their_offsets() {
        let mut b = vec![0u8; 512];
        b[0] = critical::TEMPERATURE | critical::SPARE;
        b[1..3].copy_from_slice(&318u16.to_le_bytes());
        b[3] = 97;
        b[4] = 10;
        b[5] = 3;
        b[32] = 0x10; // data units read 16
        b[48..50].copy_from_slice(&0x0102u16.to_le_bytes());
        b[63] = 1; // data units written: the top byte of a 128-bit counter
        b[64] = 5;
        b[80] = 6;
        b[112] = 7;
        b[128] = 8;
        b[144] = 9;
        b[160] = 10;
        b[176] = 11;
        b[192] = 12;
        b[196] = 13;
        b[200..202].copy_from_slice(&300u16.to_le_bytes());
        b[214..216].copy_from_slice(&301u16.to_le_bytes());
        let s = SmartLog::parse(&b).unwrap();
        assert_eq!(s.critical_warning, 3);
        assert_eq!(s.temperature, 318);
        assert_eq!(s.temperature_celsius(), Some(45));
        assert_eq!(
            (s.available_spare, s.available_spare_threshold, s.percentage_used),
            (97, 10, 3)
        );
        assert_eq!(s.data_units_read, 16);
        assert_eq!(s.bytes_read(), 16 * 512_000);
        assert_eq!(s.data_units_written, 1u128 << 120 | 0x0102);
        assert_eq!(
            (
                s.host_read_commands,
                s.host_write_commands,
                s.power_cycles,
                s.power_on_hours
            ),
            (5, 6, 7, 8)
        );
        assert_eq!(
            (s.unsafe_shutdowns, s.media_errors, s.error_log_entries),
            (9, 10, 11)
        );
        assert_eq!(
            (s.warning_temperature_time, s.critical_temperature_time),
            (12, 13)
        );
        assert_eq!(s.temperature_sensors[0], 300);
        assert_eq!(s.temperature_sensors[7], 301);
        assert_eq!(SmartLog::parse(&s.to_bytes()).unwrap(), s);
        assert_eq!(SmartLog::default().temperature_celsius(), None);
        let e = SmartLog::parse(&b[..511]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "log page SMART / health information: 511 bytes, at least 512 expected"
        );
    }

    #[test]
    fn error_log_entries_newest_first_without_empty_ones() {
        let mut b = vec![0u8; 4 * 64];
        b[0] = 7; // error count
        b[8..10].copy_from_slice(&1u16.to_le_bytes());
        b[10..12].copy_from_slice(&0x42u16.to_le_bytes());
        // Status LBA Out of Range (0x80) with the phase tag set.
        b[12..14].copy_from_slice(&(0x80u16 << 1 | 1).to_le_bytes());
        b[14..16].copy_from_slice(&0xffffu16.to_le_bytes());
        b[16..24].copy_from_slice(&0x1234u64.to_le_bytes());
        b[24..28].copy_from_slice(&1u32.to_le_bytes());
        b[64] = 6;
        b[72..74].copy_from_slice(&0xffffu16.to_le_bytes());
        let list = parse_error_log(&b);
        assert_eq!(list.len(), 2);
        assert_eq!(list[0].error_count, 7);
        assert_eq!((list[0].sqid, list[0].cid), (1, 0x42));
        assert_eq!(list[0].status, Status::LBA_OUT_OF_RANGE);
        assert_eq!((list[0].lba, list[0].nsid), (0x1234, 1));
        assert_eq!(list[1].sqid, 0xffff);
        // A partial entry at the end is left out.
        assert_eq!(parse_error_log(&b[..100]).len(), 1);
        assert_eq!(ErrorLogEntry::parse(&list[0].to_bytes()), Some(list[0]));
    }

    #[test]
    fn async_event_dword0_decodes() {
        let e = AsyncEventInfo::from_dw0(0x0004_0002);
        assert_eq!(e.kind, AsyncEventType::Notice);
        assert_eq!((e.info, e.log_page), (0, lid::CHANGED_NAMESPACES));
        assert_eq!(e.describe(), Some("namespace attribute changed"));
        assert_eq!(
            e.to_string(),
            "Notice event: namespace attribute changed (log page 0x04)"
        );
        let e = AsyncEventInfo::from_dw0(0x0002_0101);
        assert_eq!((e.kind, e.info, e.log_page), (AsyncEventType::SmartHealth, 1, 2));
        assert_eq!(
            AsyncEventInfo::from_dw0(0x0001_0100).describe(),
            Some("invalid doorbell write value")
        );
        assert_eq!(AsyncEventInfo::from_dw0(0x00c0_5507).kind, AsyncEventType::Vendor);
        assert_eq!(AsyncEventInfo::from_dw0(0x00c0_5507).describe(), None);
        assert_eq!(AsyncEventInfo::from_dw0(4).kind, AsyncEventType::Reserved(4));
    }

    proptest! {
        #[test]
        fn log_parsers_never_panic(data in proptest::collection::vec(any::<u8>(), 0..2000)) {
            let _ = SmartLog::parse(&data);
            let _ = parse_error_log(&data);
            let _ = ErrorLogEntry::parse(&data);
            let _ = parse_changed_namespaces(&data);
        }

        #[test]
        fn smart_log_round_trips(data in proptest::collection::vec(any::<u8>(), 512)) {
            // Bytes outside the fields (reserved) are dropped; the fields come back.
            let s = SmartLog::parse(&data).unwrap();
            prop_assert_eq!(SmartLog::parse(&s.to_bytes()).unwrap(), s);
        }

        #[test]
        fn error_entries_round_trip(data in proptest::collection::vec(any::<u8>(), 64)) {
            let e = ErrorLogEntry::parse(&data).unwrap();
            prop_assert_eq!(ErrorLogEntry::parse(&e.to_bytes()).unwrap(), e);
        }

        #[test]
        fn async_event_dword0_round_trips(dw0 in any::<u32>()) {
            let e = AsyncEventInfo::from_dw0(dw0);
            prop_assert_eq!(e.to_dw0(), dw0 & 0x00ff_ff07);
            prop_assert_eq!(AsyncEventInfo::from_dw0(e.to_dw0()), e);
        }

        #[test]
        fn get_log_page_round_trips(lid in any::<u8>(), nsid in any::<u32>(), dwords in 1usize..=(1 << 20), offset in any::<u64>(), retain in any::<bool>()) {
            let offset = offset & !3;
            let c = get_log_page_command(lid, nsid, dwords * 4, offset, retain).unwrap();
            prop_assert_eq!(parse_get_log_page(&c), (lid, nsid, dwords * 4, offset, retain));
        }
    }
}
