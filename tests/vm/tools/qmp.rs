//! `qmp`: send one command to a QEMU QMP socket and print QEMU's reply, for the VM suite.
//!
//! ```text
//! qmp SOCKET COMMAND_JSON [TIMEOUT_SECONDS]
//! qmp /tmp/vm.sock '{"execute":"device_del","arguments":{"id":"nvme0"}}'
//! ```
//!
//! `tests/vm/run` builds it for the host (`cargo build --example qmp`, not static) and runs
//! it for every `@@PCIBUS-QMP` request a guest test makes (see tests/vm/README.md), so the
//! harness needs no socat or python. It reads QEMU's greeting, negotiates with
//! `qmp_capabilities`, sends the command and prints the reply (one line of JSON).
//!
//! `device_del` only *starts* an unplug: QEMU returns at once and removes the device when
//! the guest has let go of it (ejected it through ACPI, or powered the slot off). So after a
//! successful `device_del` this waits for the `DEVICE_DELETED` event of that id, and a
//! `device_add` of the same id right after cannot fail with "Duplicate ID".
//!
//! Exit status: 0 QEMU returned success, 1 QEMU returned an error (the reply is printed),
//! 2 anything else (cannot connect, malformed input, no answer within the timeout,
//! default 30 s; the reason goes to stderr).

use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::os::unix::net::UnixStream;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use serde_json::Value;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 2 || args.len() > 3 {
        eprintln!("usage: qmp SOCKET COMMAND_JSON [TIMEOUT_SECONDS]");
        return ExitCode::from(2);
    }
    let timeout = match args.get(2).map(|s| s.parse::<u64>()) {
        None => Duration::from_secs(30),
        Some(Ok(s)) => Duration::from_secs(s),
        Some(Err(_)) => {
            eprintln!("qmp: timeout '{}' is not a number of seconds", args[2]);
            return ExitCode::from(2);
        }
    };
    match run(&args[0], &args[1], timeout) {
        Ok(reply) => {
            println!("{reply}");
            if reply.get("return").is_some() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("qmp: {e}");
            ExitCode::from(2)
        }
    }
}

/// One QMP session: greeting, capabilities, the command; returns the command's reply.
fn run(socket: &str, command: &str, timeout: Duration) -> Result<Value, String> {
    let cmd: Value = serde_json::from_str(command).map_err(|e| format!("command is not JSON: {e}"))?;
    let execute = cmd
        .get("execute")
        .and_then(Value::as_str)
        .ok_or("command has no \"execute\"")?;
    let stream = UnixStream::connect(socket).map_err(|e| format!("connect {socket}: {e}"))?;
    let mut session = Session {
        reader: BufReader::new(stream),
        deadline: Instant::now() + timeout,
        deleted: Vec::new(),
    };

    let greeting = session.message()?;
    if greeting.get("QMP").is_none() {
        return Err(format!("no QMP greeting but {greeting}"));
    }
    session.send(&serde_json::json!({ "execute": "qmp_capabilities" }))?;
    let caps = session.reply()?;
    if caps.get("return").is_none() {
        return Err(format!("qmp_capabilities refused: {caps}"));
    }

    session.send(&cmd)?;
    let reply = session.reply()?;
    if execute == "device_del" && reply.get("return").is_some() {
        let id = cmd
            .pointer("/arguments/id")
            .and_then(Value::as_str)
            .unwrap_or_default();
        session.device_deleted(id)?;
    }
    Ok(reply)
}

struct Session {
    reader: BufReader<UnixStream>,
    deadline: Instant,
    /// The ids of the `DEVICE_DELETED` events seen so far (one may come before the
    /// `device_del` reply when the guest is quick).
    deleted: Vec<String>,
}

impl Session {
    fn send(&mut self, msg: &Value) -> Result<(), String> {
        let mut line = msg.to_string();
        line.push('\n');
        self.reader
            .get_mut()
            .write_all(line.as_bytes())
            .map_err(|e| format!("send: {e}"))
    }

    /// The next message (QMP sends one JSON object per line).
    fn message(&mut self) -> Result<Value, String> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err("no answer from QEMU in time".into());
        }
        self.reader
            .get_ref()
            .set_read_timeout(Some(left))
            .map_err(|e| format!("set timeout: {e}"))?;
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => Err("QEMU closed the QMP connection".into()),
            Ok(_) => serde_json::from_str(&line).map_err(|e| format!("bad QMP message {line:?}: {e}")),
            // The read timeout shows as WouldBlock (EAGAIN) on Linux.
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                Err("no answer from QEMU in time".into())
            }
            Err(e) => Err(format!("reading from QEMU: {e}")),
        }
    }

    /// The reply to the last command, noting the events that come before it.
    fn reply(&mut self) -> Result<Value, String> {
        loop {
            let msg = self.message()?;
            if msg.get("return").is_some() || msg.get("error").is_some() {
                return Ok(msg);
            }
            self.note_event(&msg);
        }
    }

    fn note_event(&mut self, msg: &Value) {
        if msg.get("event").and_then(Value::as_str) == Some("DEVICE_DELETED")
            && let Some(dev) = msg.pointer("/data/device").and_then(Value::as_str)
        {
            self.deleted.push(dev.to_owned());
        }
    }

    /// Waits for the `DEVICE_DELETED` event of device `id`.
    fn device_deleted(&mut self, id: &str) -> Result<(), String> {
        while !self.deleted.iter().any(|d| d == id) {
            let msg = self
                .message()
                .map_err(|e| format!("waiting for DEVICE_DELETED of {id}: {e}"))?;
            self.note_event(&msg);
        }
        Ok(())
    }
}
