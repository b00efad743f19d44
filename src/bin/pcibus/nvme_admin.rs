//! `pcibus nvme smart-log`, `error-log` and `admin-passthru`: log pages decoded, and any
//! admin command the driver does not wrap, with its completion and data.

use std::io::Write;
use std::path::PathBuf;

use serde_json::{Value, json};

use pcibus::bus::DeviceBacking;
use pcibus::nvme::spec::{Command, ErrorLogEntry, SmartLog, Status};
use pcibus::nvme::{AdminData, Controller};

type Error = Box<dyn std::error::Error>;

/// A number in decimal or with a `0x` prefix in hex.
pub(super) fn parse_number(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let r = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => t.parse(),
    };
    r.map_err(|_| format!("\"{s}\": expected a number (decimal, or hex with 0x)"))
}

pub(super) fn parse_u8(s: &str) -> Result<u8, String> {
    u8::try_from(parse_number(s)?).map_err(|_| format!("\"{s}\": at most 255"))
}

pub(super) fn parse_u32(s: &str) -> Result<u32, String> {
    u32::try_from(parse_number(s)?).map_err(|_| format!("\"{s}\": at most 0xffffffff"))
}

/// Command dwords 10 to 15 of a passthrough command (`admin-passthru`, `io-passthru`).
#[derive(clap::Args, Debug, Default, Clone, Copy)]
pub(super) struct CommandDwords {
    /// Command dword 10.
    #[arg(long, default_value = "0", value_parser = parse_u32)]
    pub(super) cdw10: u32,
    /// Command dword 11.
    #[arg(long, default_value = "0", value_parser = parse_u32)]
    pub(super) cdw11: u32,
    /// Command dword 12.
    #[arg(long, default_value = "0", value_parser = parse_u32)]
    pub(super) cdw12: u32,
    /// Command dword 13.
    #[arg(long, default_value = "0", value_parser = parse_u32)]
    pub(super) cdw13: u32,
    /// Command dword 14.
    #[arg(long, default_value = "0", value_parser = parse_u32)]
    pub(super) cdw14: u32,
    /// Command dword 15.
    #[arg(long, default_value = "0", value_parser = parse_u32)]
    pub(super) cdw15: u32,
}

impl CommandDwords {
    /// Dwords 10 to 15, in order.
    pub(super) fn array(&self) -> [u32; 6] {
        [
            self.cdw10, self.cdw11, self.cdw12, self.cdw13, self.cdw14, self.cdw15,
        ]
    }
}

/// Which way a passthrough command's data goes, and how much of it.
#[derive(clap::Args, Debug, Default)]
pub(super) struct DataArgs {
    /// Bytes of data the command moves (with --read: required; with --write: the file's
    /// size unless given, the file padded with zeroes to it).
    #[arg(long, value_parser = parse_number)]
    pub(super) data_len: Option<u64>,
    /// The controller writes data (controller to host), shown as a hex dump or written to
    /// --output.
    #[arg(long, conflicts_with = "write")]
    pub(super) read: bool,
    /// The controller reads the data from FILE (host to controller).
    #[arg(long, value_name = "FILE")]
    pub(super) write: Option<PathBuf>,
    /// With --read: write the data to FILE instead of a hex dump.
    #[arg(short = 'o', long, value_name = "FILE", requires = "read")]
    pub(super) output: Option<PathBuf>,
}

/// What `admin-passthru` sends.
#[derive(clap::Args, Debug)]
pub(super) struct PassthruArgs {
    /// Opcode (decimal or 0x hex).
    #[arg(long, value_parser = parse_u8)]
    pub(super) opcode: u8,
    /// Namespace ID.
    #[arg(long, default_value = "0", value_parser = parse_u32)]
    pub(super) nsid: u32,
    #[command(flatten)]
    pub(super) dwords: CommandDwords,
    #[command(flatten)]
    pub(super) data: DataArgs,
}

/// What a checked `admin-passthru` will do: the command and its data.
#[derive(Debug)]
pub(super) struct Passthru {
    cmd: Command,
    read_len: usize,
    write_data: Vec<u8>,
    output: Option<PathBuf>,
}

impl PassthruArgs {
    /// Checks the arguments and reads the input file: everything that can fail before the
    /// device is touched.
    pub(super) fn prepare(self) -> Result<Passthru, Error> {
        let mut cmd = Command::new(self.opcode);
        cmd.nsid = self.nsid;
        cmd.cdw = self.dwords.array();
        let (read_len, write_data) =
            data_plan(self.data.write.as_deref(), self.data.read, self.data.data_len)?;
        Ok(Passthru {
            cmd,
            read_len,
            write_data,
            output: self.data.output,
        })
    }
}

/// Runs a prepared passthrough command and prints its completion and data. Fails (after
/// printing) when the command completed with an error status.
pub(super) fn passthru<B: DeviceBacking>(
    out: &mut impl Write,
    c: &Controller<B>,
    p: &Passthru,
) -> Result<(), Error> {
    let data = if p.read_len > 0 {
        AdminData::FromDevice(p.read_len)
    } else if !p.write_data.is_empty() {
        AdminData::ToDevice(&p.write_data)
    } else {
        AdminData::None
    };
    let (done, bytes) = c.admin_passthru(p.cmd, data)?;
    write_completion(out, done.dw0, done.status())?;
    if p.read_len > 0 {
        write_data(out, p.output.as_deref(), &bytes)?;
    }
    let status = done.status();
    if !status.is_success() {
        return Err(format!("admin command {:#04x} failed: {status}", p.cmd.opcode).into());
    }
    Ok(())
}

/// Which way a passthrough command's data goes, from `--write FILE`, `--read` and
/// `--data-len`: `(bytes the controller writes, bytes it reads)`; the file is read (and
/// padded to `--data-len`) now, before the device is touched.
pub(super) fn data_plan(
    write: Option<&std::path::Path>,
    read: bool,
    data_len: Option<u64>,
) -> Result<(usize, Vec<u8>), Error> {
    let len = data_len.map(usize::try_from).transpose()?;
    Ok(match (write, read) {
        (Some(path), _) => {
            let mut data = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
            if let Some(n) = len {
                if data.len() > n {
                    return Err(format!(
                        "{}: {} bytes, more than --data-len {n}",
                        path.display(),
                        data.len()
                    )
                    .into());
                }
                data.resize(n, 0);
            }
            if data.is_empty() {
                return Err(format!("{}: empty (nothing to send)", path.display()).into());
            }
            (0, data)
        }
        (None, true) => match len {
            Some(n) if n > 0 => (n, Vec::new()),
            _ => return Err("--read needs --data-len (the bytes the controller writes)".into()),
        },
        (None, false) => {
            if len.is_some_and(|n| n > 0) {
                return Err("--data-len needs --read or --write (which way the data goes)".into());
            }
            (0, Vec::new())
        }
    })
}

/// The data a passthrough command brought back: to `output`, or as a hex dump.
pub(super) fn write_data(
    out: &mut impl Write,
    output: Option<&std::path::Path>,
    bytes: &[u8],
) -> Result<(), Error> {
    match output {
        Some(path) => std::fs::write(path, bytes).map_err(|e| format!("{}: {e}", path.display()))?,
        None => hex_dump(out, bytes)?,
    }
    Ok(())
}

/// A passthrough command's completion: dword 0 and status.
pub(super) fn write_completion(out: &mut impl Write, cdw0: u32, status: Status) -> std::io::Result<()> {
    writeln!(
        out,
        "completion: cdw0 {cdw0:#010x}, status {:#06x}: {status}",
        status.0
    )
}

/// `data` as lines of 16 bytes: offset, hex, printable ASCII.
pub(super) fn hex_dump(out: &mut impl Write, data: &[u8]) -> std::io::Result<()> {
    for (i, line) in data.chunks(16).enumerate() {
        let hex: Vec<String> = line.iter().map(|b| format!("{b:02x}")).collect();
        let text: String = line
            .iter()
            .map(|&b| if (0x20..0x7f).contains(&b) { b as char } else { '.' })
            .collect();
        writeln!(out, "{:08x}  {:<47}  {text}", i * 16, hex.join(" "))?;
    }
    Ok(())
}

/// The SMART / Health log as JSON (128-bit counters as numbers when they fit in 64 bits,
/// as decimal strings otherwise).
pub(super) fn smart_json(s: &SmartLog) -> Value {
    let n = |v: u128| u64::try_from(v).map_or_else(|_| json!(v.to_string()), |v| json!(v));
    json!({
        "critical_warning": s.critical_warning,
        "temperature_kelvin": s.temperature,
        "temperature_celsius": s.temperature_celsius(),
        "available_spare": s.available_spare,
        "available_spare_threshold": s.available_spare_threshold,
        "percentage_used": s.percentage_used,
        "endurance_group_warning": s.endurance_group_warning,
        "data_units_read": n(s.data_units_read),
        "data_units_written": n(s.data_units_written),
        "host_read_commands": n(s.host_read_commands),
        "host_write_commands": n(s.host_write_commands),
        "controller_busy_minutes": n(s.controller_busy_time),
        "power_cycles": n(s.power_cycles),
        "power_on_hours": n(s.power_on_hours),
        "unsafe_shutdowns": n(s.unsafe_shutdowns),
        "media_errors": n(s.media_errors),
        "error_log_entries": n(s.error_log_entries),
        "warning_temperature_minutes": s.warning_temperature_time,
        "critical_temperature_minutes": s.critical_temperature_time,
        "temperature_sensors_kelvin": s.temperature_sensors.iter().filter(|&&t| t != 0).collect::<Vec<_>>(),
    })
}

const WARNINGS: [&str; 6] = [
    "available spare below threshold",
    "temperature",
    "reliability degraded",
    "read-only",
    "volatile memory backup failed",
    "persistent memory region read-only",
];

pub(super) fn write_smart(out: &mut impl Write, s: &SmartLog) -> std::io::Result<()> {
    let warnings: Vec<&str> = WARNINGS
        .iter()
        .enumerate()
        .filter(|(i, _)| s.critical_warning & 1 << i != 0)
        .map(|(_, w)| *w)
        .collect();
    writeln!(
        out,
        "critical warning       {:#04x}{}",
        s.critical_warning,
        if warnings.is_empty() {
            String::new()
        } else {
            format!(" ({})", warnings.join(", "))
        }
    )?;
    match s.temperature_celsius() {
        Some(c) => writeln!(out, "temperature            {c} °C ({} K)", s.temperature)?,
        None => writeln!(out, "temperature            not reported")?,
    }
    writeln!(
        out,
        "available spare        {}% (threshold {}%)",
        s.available_spare, s.available_spare_threshold
    )?;
    writeln!(out, "percentage used        {}%", s.percentage_used)?;
    writeln!(
        out,
        "data units read        {} ({:.1} GB)",
        s.data_units_read,
        s.bytes_read() as f64 / 1e9
    )?;
    writeln!(
        out,
        "data units written     {} ({:.1} GB)",
        s.data_units_written,
        s.bytes_written() as f64 / 1e9
    )?;
    writeln!(out, "host read commands     {}", s.host_read_commands)?;
    writeln!(out, "host write commands    {}", s.host_write_commands)?;
    writeln!(out, "controller busy time   {} min", s.controller_busy_time)?;
    writeln!(out, "power cycles           {}", s.power_cycles)?;
    writeln!(out, "power on hours         {}", s.power_on_hours)?;
    writeln!(out, "unsafe shutdowns       {}", s.unsafe_shutdowns)?;
    writeln!(out, "media errors           {}", s.media_errors)?;
    writeln!(out, "error log entries      {}", s.error_log_entries)?;
    Ok(())
}

pub(super) fn error_json(e: &ErrorLogEntry) -> Value {
    json!({
        "error_count": e.error_count,
        "sqid": e.sqid,
        "cid": e.cid,
        "status": e.status.0,
        "status_text": e.status.to_string(),
        "parameter_location": e.parameter_location,
        "lba": e.lba,
        "nsid": e.nsid,
        "vendor_log_page": e.vendor_log_page,
    })
}

pub(super) fn write_errors(out: &mut impl Write, list: &[ErrorLogEntry]) -> std::io::Result<()> {
    if list.is_empty() {
        return writeln!(out, "no errors logged");
    }
    for e in list {
        let q = if e.sqid == 0xffff {
            "not a command's".to_owned()
        } else {
            format!("queue {} cid {}", e.sqid, e.cid)
        };
        writeln!(
            out,
            "#{:<6} {q}: {} (nsid {}, LBA {})",
            e.error_count, e.status, e.nsid, e.lba
        )?;
    }
    Ok(())
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use pcibus::nvme::Options;
    use pcibus::nvme::spec::{Status, admin, io};
    use pcibus::testing::nvme::{CommandMatch, EmuConfig, EmulatedNvme, Fault};
    use std::time::Duration;

    /// An emulated controller brought up with generous deadlines (the passthrough
    /// commands' tests share it).
    pub(crate) fn controller() -> (EmulatedNvme, Controller<EmulatedNvme>) {
        let e = EmulatedNvme::new(EmuConfig::default()).unwrap();
        let options = Options {
            admin_timeout: Duration::from_secs(30),
            io_timeout: Duration::from_secs(30),
            ..Options::default()
        };
        (e.clone(), Controller::init(e, &options).unwrap())
    }

    fn args(opcode: u8) -> PassthruArgs {
        PassthruArgs {
            opcode,
            nsid: 0,
            dwords: CommandDwords::default(),
            data: DataArgs::default(),
        }
    }

    #[test]
    fn numbers_in_decimal_or_hex() {
        assert_eq!(parse_number("0x1f"), Ok(31));
        assert_eq!(parse_number("4096"), Ok(4096));
        assert!(parse_number("0xzz").is_err());
        assert_eq!(parse_u8("0x06"), Ok(6));
        assert!(parse_u8("256").is_err());
    }

    #[test]
    fn passthru_prints_the_completion_and_a_hex_dump() {
        let (_e, c) = controller();
        let mut a = args(admin::IDENTIFY);
        a.dwords.cdw10 = 1;
        a.data.read = true;
        a.data.data_len = Some(4096);
        let mut out = Vec::new();
        passthru(&mut out, &c, &a.prepare().unwrap()).unwrap();
        let text = String::from_utf8(out).unwrap();
        let mut lines = text.lines();
        assert_eq!(
            lines.next(),
            Some("completion: cdw0 0x00000000, status 0x0000: SCT 0x0 SC 0x00 (success)")
        );
        assert_eq!(text.lines().count(), 1 + 256);
        // The model number at byte 24.
        assert!(
            text.contains("00000010  20 20 20 20 20 20 20 20 70 63 69 62 75 73 20 65          pcibus e\n"),
            "{text}"
        );
    }

    #[test]
    fn passthru_of_a_failing_command_prints_then_fails() {
        let (e, c) = controller();
        e.inject(Fault::Status {
            command: CommandMatch::Admin(0xc2),
            status: Status::INVALID_FIELD,
            count: 1,
        });
        let mut out = Vec::new();
        let err = passthru(&mut out, &c, &args(0xc2).prepare().unwrap()).unwrap_err();
        assert!(err.to_string().contains("0xc2 failed"), "{err}");
        assert!(
            String::from_utf8(out)
                .unwrap()
                .starts_with("completion: cdw0 0x00000000, status 0x0002")
        );
    }

    #[test]
    fn passthru_arguments_are_checked_before_the_device() {
        let mut a = args(1);
        a.data.read = true;
        assert!(a.prepare().unwrap_err().to_string().contains("--data-len"));
        let mut a = args(1);
        a.data.data_len = Some(8);
        assert!(a.prepare().unwrap_err().to_string().contains("--read or --write"));
        let mut a = args(1);
        a.data.write = Some("/nonexistent/pcibus-input".into());
        assert!(
            a.prepare()
                .unwrap_err()
                .to_string()
                .contains("/nonexistent/pcibus-input")
        );
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("in");
        std::fs::write(&f, [1u8; 10]).unwrap();
        let mut a = args(1);
        a.data.write = Some(f.clone());
        a.data.data_len = Some(16);
        let p = a.prepare().unwrap();
        assert_eq!(p.write_data, [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0]);
        let mut a = args(1);
        a.data.write = Some(f);
        a.data.data_len = Some(4);
        assert!(a.prepare().is_err());
    }

    #[test]
    fn smart_and_error_logs_print_as_text_and_json() {
        let (e, c) = controller();
        e.update_health(|h| h.critical_warning = 0x02);
        e.inject(Fault::Status {
            command: CommandMatch::Io(io::READ),
            status: Status::LBA_OUT_OF_RANGE,
            count: 1,
        });
        let buf = c.alloc_buffer(4096).unwrap();
        let mut q = c.io_queue(4).unwrap();
        assert!(q.read(1, 3, 1, &buf, 0).is_err());
        let s = c.smart_log().unwrap();
        let mut out = Vec::new();
        write_smart(&mut out, &s).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.starts_with("critical warning       0x02 (temperature)\n"),
            "{text}"
        );
        assert!(text.contains("temperature            35 °C (308 K)"), "{text}");
        let v = smart_json(&s);
        assert_eq!(v["critical_warning"], 2);
        assert_eq!(v["temperature_celsius"], 35);
        assert_eq!(v["error_log_entries"], 1);
        assert_eq!(
            smart_json(&SmartLog::default())["temperature_celsius"],
            Value::Null
        );
        let list = c.error_log().unwrap();
        let mut out = Vec::new();
        write_errors(&mut out, &list).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.starts_with(&format!("#1      queue {} cid ", q.qid())),
            "{text}"
        );
        assert!(text.contains("(nsid 1, LBA 3)"), "{text}");
        let v = error_json(&list[0]);
        assert_eq!((v["lba"].as_u64(), v["status"].as_u64()), (Some(3), Some(0x80)));
        let mut out = Vec::new();
        write_errors(&mut out, &[]).unwrap();
        assert_eq!(out, b"no errors logged\n");
    }
}
