//! `pcibus nvme io-passthru`: any NVM I/O command the driver does not wrap, sent on an I/O
//! queue with its data, its completion and data printed (as `admin-passthru` does for
//! admin commands).

use std::io::Write;
use std::path::PathBuf;

use pcibus::bus::DeviceBacking;
use pcibus::nvme::{Controller, IoPassthru, PassthruData};

use super::nvme_admin::{
    CommandDwords, DataArgs, data_plan, parse_u8, parse_u32, write_completion, write_data,
};

type Error = Box<dyn std::error::Error>;

/// What `io-passthru` sends.
#[derive(clap::Args, Debug)]
pub(super) struct IoPassthruArgs {
    /// Opcode (decimal or 0x hex).
    #[arg(long, value_parser = parse_u8)]
    pub(super) opcode: u8,
    /// Namespace ID.
    #[arg(long, default_value = "1", value_parser = parse_u32)]
    pub(super) nsid: u32,
    /// Command dword 2.
    #[arg(long, default_value = "0", value_parser = parse_u32)]
    pub(super) cdw2: u32,
    /// Command dword 3.
    #[arg(long, default_value = "0", value_parser = parse_u32)]
    pub(super) cdw3: u32,
    #[command(flatten)]
    pub(super) dwords: CommandDwords,
    #[command(flatten)]
    pub(super) data: DataArgs,
}

/// What a checked `io-passthru` will do: the command and its data.
#[derive(Debug)]
pub(super) struct IoPassthruPlan {
    cmd: IoPassthru,
    read_len: usize,
    write_data: Vec<u8>,
    output: Option<PathBuf>,
}

impl IoPassthruArgs {
    /// Checks the arguments and reads the input file: everything that can fail before the
    /// device is touched.
    pub(super) fn prepare(self) -> Result<IoPassthruPlan, Error> {
        let mut cmd = IoPassthru::new(self.opcode, self.nsid);
        cmd.cdw2 = self.cdw2;
        cmd.cdw3 = self.cdw3;
        cmd.cdw = self.dwords.array();
        let (read_len, write_data) =
            data_plan(self.data.write.as_deref(), self.data.read, self.data.data_len)?;
        Ok(IoPassthruPlan {
            cmd,
            read_len,
            write_data,
            output: self.data.output,
        })
    }
}

/// Runs a prepared I/O passthrough command on a queue of its own and prints its
/// completion and data. Fails (after printing) when the command completed with an error
/// status.
pub(super) fn io_passthru<B: DeviceBacking>(
    out: &mut impl Write,
    c: &Controller<B>,
    p: &IoPassthruPlan,
) -> Result<(), Error> {
    let len = p.read_len.max(p.write_data.len());
    let buffer = if len > 0 { Some(c.alloc_buffer(len)?) } else { None };
    if let Some(b) = &buffer
        && !p.write_data.is_empty()
    {
        b.write_at(0, &p.write_data)
            .ok_or("writing the data to the DMA buffer failed")?;
    }
    let data = buffer.as_ref().map(|b| {
        if p.read_len > 0 {
            PassthruData::from_device(b, 0, len)
        } else {
            PassthruData::to_device(b, 0, len)
        }
    });
    let mut q = c.io_queue(2)?;
    let done = q.passthru(&p.cmd, data)?;
    let status = done.status.unwrap_or_default();
    write_completion(out, done.cdw0, status)?;
    if let (Some(b), true) = (&buffer, p.read_len > 0) {
        let mut bytes = vec![0u8; len];
        b.read_at(0, &mut bytes)
            .ok_or("reading the data from the DMA buffer failed")?;
        write_data(out, p.output.as_deref(), &bytes)?;
    }
    if !status.is_success() {
        return Err(format!("I/O command {:#04x} failed: {status}", p.cmd.opcode).into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nvme_admin::tests::controller;
    use pcibus::nvme::spec::io;

    fn args(opcode: u8) -> IoPassthruArgs {
        IoPassthruArgs {
            opcode,
            nsid: 1,
            cdw2: 0,
            cdw3: 0,
            dwords: CommandDwords::default(),
            data: DataArgs::default(),
        }
    }

    #[test]
    fn io_passthru_writes_a_file_and_reads_it_back_as_a_hex_dump() {
        let (e, c) = controller();
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("in");
        std::fs::write(&f, b"pcibus io passthru").unwrap();
        // Write 1 block at LBA 3 from the file padded to 512 bytes.
        let mut a = args(io::WRITE);
        a.dwords.cdw10 = 3;
        a.data.write = Some(f);
        a.data.data_len = Some(512);
        let mut out = Vec::new();
        io_passthru(&mut out, &c, &a.prepare().unwrap()).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "completion: cdw0 0x00000000, status 0x0000: SCT 0x0 SC 0x00 (success)\n"
        );
        assert_eq!(&e.namespace_read(1, 3 * 512, 18).unwrap(), b"pcibus io passthru");
        let mut a = args(io::READ);
        a.dwords.cdw10 = 3;
        a.data.read = true;
        a.data.data_len = Some(512);
        let mut out = Vec::new();
        io_passthru(&mut out, &c, &a.prepare().unwrap()).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert_eq!(text.lines().count(), 1 + 32);
        assert!(
            text.contains("00000000  70 63 69 62 75 73 20 69 6f 20 70 61 73 73 74 68  pcibus io passth\n"),
            "{text}"
        );
    }

    #[test]
    fn io_passthru_of_a_failing_command_prints_then_fails() {
        let (_e, c) = controller();
        // LBA out of range.
        let mut a = args(io::READ);
        a.dwords.cdw11 = 0x100;
        a.data.read = true;
        a.data.data_len = Some(512);
        let mut out = Vec::new();
        let err = io_passthru(&mut out, &c, &a.prepare().unwrap()).unwrap_err();
        assert!(err.to_string().contains("0x02 failed"), "{err}");
        assert!(
            String::from_utf8(out)
                .unwrap()
                .starts_with("completion: cdw0 0x00000000, status 0x0080")
        );
    }

    #[test]
    fn io_passthru_arguments_are_checked_before_the_device() {
        let mut a = args(2);
        a.data.read = true;
        assert!(a.prepare().unwrap_err().to_string().contains("--data-len"));
        let mut a = args(2);
        a.data.data_len = Some(8);
        assert!(a.prepare().unwrap_err().to_string().contains("--read or --write"));
        let mut a = args(1);
        a.data.write = Some("/nonexistent/pcibus-input".into());
        assert!(a.prepare().is_err());
        let mut a = args(1);
        a.cdw2 = 7;
        a.dwords.cdw15 = 9;
        let p = a.prepare().unwrap();
        assert_eq!((p.cmd.cdw2, p.cmd.cdw[5], p.cmd.nsid), (7, 9, 1));
    }
}
