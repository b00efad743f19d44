//! `pcibus`: list PCI devices the way pcibus sees them, show one, snapshot sysfs.
#![deny(clippy::undocumented_unsafe_blocks, clippy::missing_safety_doc)]

use std::io::{self, Write};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use serde_json::{Value, json};

use pcibus::bus::claim::{ClaimDir, ClaimRecord, ClaimState};
use pcibus::names::{Names, find_pci_ids};
use pcibus::record::{Problem, ProblemKind};
use pcibus::sysfs::bind::is_kernel_sysfs;
use pcibus::{BlockingAttr, DeviceRecord, IdSource, PciAddress, Scan, Scanner, SysfsRoot};

/// What the exit status means; shown by `--help`, repeated in the README.
const EXIT_STATUS_HELP: &str = "\
Exit status:
  0    done; list and show read every attribute they asked for
  1    error: the message on stderr says what and where
  2    usage error (bad arguments)
  3    list, show: printed, but some attributes asked for were not read (a guarded read
       timed out or never started, or was skipped because the device's removal is
       pending); those devices' problems say which. Attributes that were read but are
       unreadable or malformed are problems too, but do not change the status.

--sysfs ROOT that is not the kernel's sysfs (a fake tree or a copy): list, show and
snapshot read it; bind and unbind write its files and check only what it shows (not this
system's mounts); vfio info refuses it (its IOMMU groups are not this system's).";

/// Exit status: every attribute asked for was read.
const EXIT_COMPLETE: u8 = 0;
/// Exit status: an error.
const EXIT_ERROR: u8 = 1;
/// Exit status: the scan ran but some guarded reads did not answer.
const EXIT_INCOMPLETE: u8 = 3;

#[derive(Parser)]
#[command(
    name = "pcibus",
    version,
    about = "PCI devices from sysfs, without blocking on devices being removed",
    after_help = EXIT_STATUS_HELP
)]
struct Cli {
    /// Sysfs root to read (a live /sys or a fake tree). Default: $PCIBUS_SYSFS, else
    /// DPDK's $SYSFS_PCI_DEVICES (a devices directory), else /sys.
    #[arg(long, global = true, value_name = "ROOT")]
    sysfs: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// List the devices: address, ids, class, driver, NUMA node, IOMMU group, names.
    List {
        /// One JSON array, one object per device, sorted by address.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        scan: ScanArgs,
    },
    /// Everything about one device: BARs, capabilities, SR-IOV relations, problems.
    Show {
        /// The device, e.g. 0000:01:00.0 or 1:0.0.
        address: PciAddress,
        /// JSON instead of text.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        scan: ScanArgs,
    },
    /// Bind a device to a kernel driver (driver_override + drivers_probe), e.g. vfio-pci.
    ///
    /// If the new driver does not take the device, driver_override is cleared and the old
    /// driver binds it again; if that fails too, the error says where the device is.
    Bind {
        /// The device.
        address: PciAddress,
        /// The driver, e.g. vfio-pci or nvme.
        driver: String,
        /// Take the device even if the host uses it (an interface up, a mounted disk).
        #[arg(long)]
        force: bool,
    },
    /// Unbind a device from its driver and clear its driver_override.
    Unbind {
        /// The device.
        address: PciAddress,
        /// Take the device even if the host uses it.
        #[arg(long)]
        force: bool,
    },
    /// VFIO facts of a device bound to vfio-pci.
    Vfio {
        #[command(subcommand)]
        command: VfioCommand,
    },
    /// Devices claimed by pcibus processes, and by whom.
    ///
    /// Holder PID and command, claim age, whether the holder is releasing the device (and
    /// why), the driver it named; "stale" marks a claim whose holder died (free to take).
    Claims {
        /// One JSON array, one object per claim, sorted by address.
        #[arg(long)]
        json: bool,
        /// The claims directory. Default: $PCIBUS_CLAIM_DIR, else /run/pcibus/claims.
        #[arg(long, value_name = "DIR")]
        claim_dir: Option<PathBuf>,
    },
    /// Capture the PCI part of sysfs as a pcibus fixture (text).
    Snapshot {
        /// Write here instead of standard output.
        #[arg(short, long, value_name = "FILE")]
        output: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum VfioCommand {
    /// Group and viability, regions with sizes and flags, interrupt indexes, IOVA ranges.
    Info {
        /// The device.
        address: PciAddress,
        /// JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(clap::Args)]
struct ScanArgs {
    /// Only these devices, in DPDK's devargs syntax (`0000:02:00.0`, `02:00.0` for domain 0;
    /// per-device `,key=value` arguments are accepted and checked, and matter to drivers,
    /// not to listings). Repeatable.
    #[arg(short = 'a', long = "allow", value_name = "DEVARGS")]
    allow: Vec<String>,
    /// Never these devices. Repeatable.
    #[arg(short = 'b', long = "block", value_name = "ADDRESS")]
    block: Vec<String>,
    /// Also read these attributes, which block while a removal is pending, each through a
    /// guard with the scan's deadline.
    #[arg(long = "read", value_enum, value_name = "ATTR")]
    read: Vec<Attr>,
    /// Deadline for each guarded read, in milliseconds from its submission.
    #[arg(long, default_value_t = 1000, value_name = "MS")]
    timeout: u64,
    /// Read every attribute through the guard.
    #[arg(long)]
    guard_all: bool,
    /// Where ids, class and revision come from: `files` (default: `modalias` and
    /// `revision`, kernel-cached, never wait), `id-files` (the six id files), `config` (the
    /// config header, read through the guard: it waits while the device is being reset).
    #[arg(long, value_enum, default_value_t = Ids::Files, value_name = "SOURCE")]
    ids: Ids,
    /// Walker threads (default: one per core, at most 4).
    #[arg(long)]
    threads: Option<usize>,
}

#[derive(Clone, Copy, ValueEnum)]
enum Ids {
    Files,
    IdFiles,
    Config,
}

#[derive(Clone, Copy, ValueEnum)]
enum Attr {
    SriovNumvfs,
    SriovVfTotalMsix,
    DriverOverride,
    Uevent,
    All,
}

impl ScanArgs {
    fn scanner(&self, root: SysfsRoot) -> Result<Scanner, Error> {
        let selection = pcibus::bus::devargs::Selection::from_args(
            self.allow
                .iter()
                .map(|a| ("-a", a.as_str()))
                .chain(self.block.iter().map(|b| ("-b", b.as_str()))),
        )?;
        let mut s = Scanner::new(root)
            .timeout(Duration::from_millis(self.timeout))
            .guard_everything(self.guard_all)
            .id_source(match self.ids {
                Ids::Files => IdSource::Files,
                Ids::IdFiles => IdSource::IdFiles,
                Ids::Config => IdSource::Config,
            });
        if let Some(n) = self.threads {
            s = s.threads(n);
        }
        for a in &self.read {
            let attrs: &[BlockingAttr] = match a {
                Attr::SriovNumvfs => &[BlockingAttr::SriovNumvfs],
                Attr::SriovVfTotalMsix => &[BlockingAttr::SriovVfTotalMsix],
                Attr::DriverOverride => &[BlockingAttr::DriverOverride],
                Attr::Uevent => &[BlockingAttr::Uevent],
                Attr::All => &BlockingAttr::ALL,
            };
            for &attr in attrs {
                s = s.read_blocking(attr);
            }
        }
        if !selection.allowed().is_empty() {
            s = s.allow(selection.allowed().iter().map(|d| d.address()));
        }
        Ok(s.block(selection.blocked().iter().copied()))
    }
}

fn main() {
    let cli = Cli::parse();
    // Before any thread exists: from here on the work runs in a child process.
    let report = detach::start();
    let code = std::panic::catch_unwind(move || {
        let root = cli.sysfs.clone().map_or_else(SysfsRoot::from_env, SysfsRoot::new);
        match run(cli, root) {
            Ok(Outcome::Complete) => EXIT_COMPLETE,
            Ok(Outcome::Incomplete) => EXIT_INCOMPLETE,
            Err(e) => {
                // A broken pipe (`pcibus list | head`) is not an error worth a message.
                if e.downcast_ref::<io::Error>()
                    .is_some_and(|e| e.kind() == io::ErrorKind::BrokenPipe)
                {
                    return EXIT_COMPLETE;
                }
                let mut msg = format!("pcibus: {e}");
                let mut source = e.source();
                while let Some(s) = source {
                    msg.push_str(&format!(": {s}"));
                    source = s.source();
                }
                eprintln!("{msg}");
                EXIT_ERROR
            }
        }
    })
    .unwrap_or(101);
    if let Some(report) = report {
        detach::finish(report, code);
    }
    std::process::exit(code.into());
}

/// A guarded read stuck in the kernel (a removal pending) is a thread in uninterruptible
/// sleep, and a process cannot exit until all its threads have: `pcibus list --read all`
/// would print its listing by the deadline and then hang its caller (a shell waiting for
/// it, `$(pcibus list ...)` reading to end of file) until the removal completes. So the
/// command runs in a child process, which, once done, lets go of the caller's stdin,
/// stdout and stderr and reports its exit code to the parent; the parent, the process
/// the caller waits for, exits with it at once. A stuck child lingers harmlessly and goes
/// when the kernel lets its reads return.
mod detach {
    use std::os::fd::OwnedFd;

    use nix::errno::Errno;
    use nix::sys::wait::{WaitStatus, waitpid};
    use nix::unistd::{ForkResult, fork, pipe};

    /// Forks. Returns in the child, with the pipe to report the exit code on; the parent
    /// never returns. `None` (no fork) if the pipe or the fork fails: then the command runs
    /// in this process.
    pub fn start() -> Option<OwnedFd> {
        let (read_end, write_end) = pipe().ok()?;
        // SAFETY: called at the top of main, before pcibus starts any thread, so the child
        // is a copy of a single-threaded process and may do anything afterwards.
        match unsafe { fork() } {
            Ok(ForkResult::Child) => {
                drop(read_end);
                Some(write_end)
            }
            Ok(ForkResult::Parent { child }) => {
                drop(write_end);
                let mut byte = [0u8; 1];
                let code = loop {
                    match nix::unistd::read(&read_end, &mut byte) {
                        Ok(1) => {
                            reap_unless_stuck(child);
                            break i32::from(byte[0]);
                        }
                        Err(Errno::EINTR) => continue,
                        // The child ended without reporting (killed): its status says how.
                        _ => {
                            break match waitpid(child, None) {
                                Ok(WaitStatus::Exited(_, code)) => code,
                                Ok(WaitStatus::Signaled(_, signal, _)) => 128 + signal as i32,
                                _ => 1,
                            };
                        }
                    }
                };
                std::process::exit(code);
            }
            Err(_) => None,
        }
    }

    /// A child that reported normally exits a moment later: reap it, so that its CPU time
    /// and peak RSS count in what the caller measures (`time`, wait4). One with reads stuck
    /// in the kernel does not exit: leave it after 100 ms.
    fn reap_unless_stuck(child: nix::unistd::Pid) {
        use nix::sys::wait::WaitPidFlag;
        for _ in 0..100 {
            match waitpid(child, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) => std::thread::sleep(std::time::Duration::from_millis(1)),
                _ => return,
            }
        }
    }

    /// In the child, when done: flush, hand the caller's standard streams back, report.
    pub fn finish(report: OwnedFd, code: u8) {
        use std::io::Write;
        let _ = std::io::stdout().flush();
        let _ = std::io::stderr().flush();
        if let Ok(null) = std::fs::File::options().read(true).write(true).open("/dev/null") {
            let _ = nix::unistd::dup2_stdin(&null);
            let _ = nix::unistd::dup2_stdout(&null);
            let _ = nix::unistd::dup2_stderr(&null);
        }
        let _ = nix::unistd::write(&report, &[code]);
    }
}

type Error = Box<dyn std::error::Error>;

/// How completely a command did what it was asked.
enum Outcome {
    Complete,
    /// Some attributes asked for were not read: see [`unanswered`].
    Incomplete,
}

/// Whether a problem means an attribute asked for was not read at all (as opposed to
/// read and found bad): scripts must not take the listing as complete.
fn unanswered(p: &Problem) -> bool {
    matches!(
        p.kind,
        ProblemKind::TimedOut { .. }
            | ProblemKind::NotStarted { .. }
            | ProblemKind::RemovalPending
            | ProblemKind::HeldOpen
    )
}

fn outcome<'a>(mut problems: impl Iterator<Item = &'a Problem>) -> Outcome {
    if problems.any(unanswered) {
        Outcome::Incomplete
    } else {
        Outcome::Complete
    }
}

// Devices under a root that is not the kernel's sysfs are not this system's: their IOMMU
// group numbers name nothing in /dev/vfio, their disks are not in /proc/self/mounts.
fn not_kernel_sysfs(root: &SysfsRoot) -> Option<String> {
    (!is_kernel_sysfs(root)).then(|| {
        format!(
            "{} is not the kernel's sysfs (not a sysfs mount)",
            root.path().display()
        )
    })
}

fn run(cli: Cli, root: SysfsRoot) -> Result<Outcome, Error> {
    let stdout = io::stdout();
    let mut out = io::BufWriter::new(stdout.lock());
    let mut done = Outcome::Complete;
    if let Command::Bind { .. } | Command::Unbind { .. } = cli.command
        && let Some(why) = not_kernel_sysfs(&root)
    {
        eprintln!(
            "pcibus: note: {why}: writing its files only; the in-use check sees what the tree \
             shows, not this system's mounts"
        );
    }
    match cli.command {
        Command::List { json, scan } => {
            let scan = scan.scanner(root)?.scan()?;
            done = outcome(scan.devices.iter().flat_map(|d| &d.problems));
            if json {
                write_json_list(&mut out, &scan)?;
            } else {
                write_table(&mut out, &scan)?;
            }
            report_skipped(&scan);
        }
        Command::Show { address, json, scan } => {
            // `show` wants everything; the blocking attributes are read through the guard.
            let scanner = BlockingAttr::ALL
                .into_iter()
                .fold(scan.scanner(root)?, Scanner::read_blocking)
                .allow([address]);
            let scan = scanner.scan()?;
            let Some(dev) = scan.devices.first() else {
                return Err(format!(
                    "no device {address} in {}",
                    scanner.root().devices_dir().display()
                )
                .into());
            };
            let details = pcibus::sysfs::details::read(scanner.root(), dev);
            done = outcome(dev.problems.iter().chain(&details.problems));
            if json {
                let mut v = device_json(dev);
                v["details"] = details_json(&details);
                serde_json::to_writer_pretty(&mut out, &v)?;
                writeln!(out)?;
            } else {
                write_show(&mut out, dev, &details)?;
            }
        }
        Command::Bind {
            address,
            driver,
            force,
        } => {
            let b = pcibus::sysfs::bind::bind(&root, address, &driver, force)?;
            match &b.previous {
                Some(p) if *p == b.driver => writeln!(out, "{address}: already on {driver}")?,
                Some(p) => writeln!(out, "{address}: {p} -> {driver}")?,
                None => writeln!(out, "{address}: (none) -> {driver}")?,
            }
        }
        Command::Unbind { address, force } => match pcibus::sysfs::bind::unbind(&root, address, force)? {
            Some(p) => writeln!(out, "{address}: unbound from {p}")?,
            None => writeln!(out, "{address}: was not bound")?,
        },
        Command::Vfio {
            command: VfioCommand::Info { address, json },
        } => {
            if let Some(why) = not_kernel_sysfs(&root) {
                return Err(format!(
                    "vfio info needs the kernel's sysfs: {why}, so its IOMMU groups are not this \
                     system's"
                )
                .into());
            }
            let info = vfio_info(&root, address)?;
            if json {
                serde_json::to_writer_pretty(&mut out, &info)?;
                writeln!(out)?;
            } else {
                write_vfio_info(&mut out, &info)?;
            }
        }
        Command::Claims { json, claim_dir } => {
            let dir = claim_dir.map_or_else(ClaimDir::from_env, ClaimDir::new);
            write_claims(&mut out, &dir.list()?, json)?;
        }
        Command::Snapshot { output } => {
            // The lock-taking attributes go through the guard, so a snapshot of a system
            // with a removal pending records a read error instead of hanging.
            let guard = pcibus::BlockingPool::default();
            let options = pcibus::sysfs::snapshot::CaptureOptions {
                locked_reader: Some(Box::new(move |path| {
                    let deadline = std::time::Instant::now() + Duration::from_secs(1);
                    guard
                        .read(path, pcibus::sysfs::snapshot::MAX_FILE_LEN, deadline)
                        .unwrap_or_else(|e| Err(io::Error::new(io::ErrorKind::TimedOut, e)))
                })),
                ..Default::default()
            };
            let fixture = pcibus::sysfs::snapshot::capture(root.path(), &options)?;
            let text = pcibus::fixture::write(&fixture);
            match output {
                Some(path) => std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?,
                None => out.write_all(text.as_bytes())?,
            }
        }
    }
    out.flush()?;
    Ok(done)
}

// Entries that are not devices, and devices that went away, go to stderr: the listing
// itself stays parseable.
fn report_skipped(scan: &Scan) {
    for i in &scan.ignored {
        eprintln!(
            "pcibus: ignored {:?} in the devices directory: {}",
            i.name, i.reason
        );
    }
    for a in &scan.vanished {
        eprintln!("pcibus: {a} vanished during the scan");
    }
}

fn names_for(devices: &[DeviceRecord]) -> Names {
    let ids = devices.iter().filter_map(|d| Some((d.vendor?, d.device?)));
    let classes = devices.iter().filter_map(|d| d.class);
    find_pci_ids()
        .and_then(|p| Names::lookup(&p, ids, classes).ok())
        .unwrap_or_default()
}

fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| v.to_string())
}

fn write_table(out: &mut impl Write, scan: &Scan) -> io::Result<()> {
    let names = names_for(&scan.devices);
    writeln!(
        out,
        "{:<13} {:<9} {:<6} {:<14} {:>4} {:>5}  DESCRIPTION",
        "ADDRESS", "ID", "CLASS", "DRIVER", "NUMA", "IOMMU"
    )?;
    for d in &scan.devices {
        let id = match (d.vendor, d.device) {
            (Some(v), Some(dv)) => format!("{v}:{dv}"),
            _ => "????:????".into(),
        };
        let mut desc = describe(&names, d);
        if !d.problems.is_empty() {
            desc.push_str(&format!(
                " [{} problem(s): pcibus show {}]",
                d.problems.len(),
                d.address
            ));
        }
        writeln!(
            out,
            "{:<13} {:<9} {:<6} {:<14} {:>4} {:>5}  {desc}",
            d.address.to_string(),
            id,
            d.class
                .map_or_else(|| "-".into(), |c| format!("{:04x}", c.value() >> 8)),
            d.driver.as_deref().unwrap_or("-"),
            opt(d.numa_node),
            opt(d.iommu_group),
        )?;
    }
    Ok(())
}

fn describe(names: &Names, d: &DeviceRecord) -> String {
    let class = d.class.and_then(|c| names.class(c)).unwrap_or("");
    let vendor = d.vendor.and_then(|v| names.vendor(v));
    let device = d.vendor.zip(d.device).and_then(|(v, dv)| names.device(v, dv));
    match (vendor, device) {
        (Some(v), Some(dv)) => format!("{class}: {v} {dv}"),
        (Some(v), None) => format!("{class}: {v} Device {}", opt(d.device)),
        _ => class.to_owned(),
    }
}

fn device_json(d: &DeviceRecord) -> Value {
    json!({
        "address": d.address.to_string(),
        "vendor": d.vendor.map(|v| v.0),
        "device": d.device.map(|v| v.0),
        "subsystem_vendor": d.subsystem_vendor.map(|v| v.0),
        "subsystem_device": d.subsystem_device.map(|v| v.0),
        "class": d.class.map(|c| c.value()),
        "revision": d.revision,
        "numa_node": d.numa_node,
        "driver": d.driver,
        "iommu_group": d.iommu_group,
        "physfn": d.physfn.map(|a| a.to_string()),
        "sriov": d.sriov.as_ref().map(|s| json!({"total_vfs": s.total_vfs, "num_vfs": s.num_vfs})),
        "bars": d.bars().map(|b| json!({
            "index": b.index,
            "start": b.start,
            "size": b.size,
            "kind": b.kind.to_string(),
            "prefetchable": b.prefetchable,
        })).collect::<Vec<_>>(),
        "problems": d.problems.iter().map(problem_json).collect::<Vec<_>>(),
    })
}

// `kind` and `errno` are for scripts: match on them, not on the message.
fn problem_json(p: &Problem) -> Value {
    let kind = match &p.kind {
        ProblemKind::Parse(_) => "parse",
        ProblemKind::Io { .. } => "io",
        ProblemKind::TimedOut { .. } => "timed_out",
        ProblemKind::NotStarted { .. } => "not_started",
        ProblemKind::RemovalPending => "removal_pending",
        ProblemKind::HeldOpen => "held_open",
        _ => "other",
    };
    json!({
        "attribute": p.attribute,
        "kind": kind,
        "errno": p.kind.raw_os_error(),
        "error": p.kind.to_string(),
    })
}

// Streams the array so memory stays flat however many devices there are.
fn write_json_list(out: &mut impl Write, scan: &Scan) -> io::Result<()> {
    out.write_all(b"[")?;
    for (i, d) in scan.devices.iter().enumerate() {
        out.write_all(if i == 0 { b"\n  " } else { b",\n  " })?;
        serde_json::to_writer(&mut *out, &device_json(d))?;
    }
    out.write_all(if scan.devices.is_empty() { b"]\n" } else { b"\n]\n" })
}

fn claim_json(c: &ClaimRecord) -> Value {
    let (state, reason) = match &c.state {
        Some(ClaimState::Active) => (Some("active"), None),
        Some(ClaimState::Releasing { reason }) => (Some("releasing"), Some(reason.as_str())),
        _ => (None, None),
    };
    json!({
        "address": c.address.to_string(),
        "live": c.live,
        "pid": c.pid,
        "command": c.command,
        "since": c.since.and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).map(|d| d.as_secs()),
        "driver": c.driver,
        "state": state,
        "reason": reason,
    })
}

// `pcibus claims`: the table says "stale" for a claim whose holder is gone (free to take).
fn write_claims(out: &mut impl Write, claims: &[ClaimRecord], json: bool) -> io::Result<()> {
    if json {
        out.write_all(b"[")?;
        for (i, c) in claims.iter().enumerate() {
            out.write_all(if i == 0 { b"\n  " } else { b",\n  " })?;
            serde_json::to_writer(&mut *out, &claim_json(c))?;
        }
        return out.write_all(if claims.is_empty() { b"]\n" } else { b"\n]\n" });
    }
    writeln!(
        out,
        "{:<13} {:>7} {:<15} {:>6} {:<9} {:<8} REASON",
        "ADDRESS", "PID", "COMMAND", "AGE", "STATE", "DRIVER"
    )?;
    let now = std::time::SystemTime::now();
    for c in claims {
        let state = match (&c.state, c.live) {
            (_, false) => "stale",
            (Some(ClaimState::Active), true) => "active",
            (Some(ClaimState::Releasing { .. }), true) => "releasing",
            _ => "?",
        };
        let reason = match &c.state {
            Some(ClaimState::Releasing { reason }) => reason.as_str(),
            _ => "",
        };
        let age = c
            .since
            .and_then(|t| now.duration_since(t).ok())
            .map_or_else(|| "-".to_owned(), |d| age(d.as_secs()));
        writeln!(
            out,
            "{:<13} {:>7} {:<15} {:>6} {:<9} {:<8} {reason}",
            c.address.to_string(),
            opt(c.pid),
            c.command.as_deref().unwrap_or("-"),
            age,
            state,
            c.driver.as_deref().unwrap_or("-"),
        )?;
    }
    Ok(())
}

fn age(secs: u64) -> String {
    match secs {
        0..60 => format!("{secs}s"),
        60..3600 => format!("{}m", secs / 60),
        3600..86400 => format!("{}h", secs / 3600),
        _ => format!("{}d", secs / 86400),
    }
}

fn details_json(x: &pcibus::sysfs::details::Details) -> Value {
    json!({
        "capabilities": x.capabilities.iter().map(|c| json!({
            "id": c.id, "offset": c.offset, "name": pcibus::config::capability_name(c.id),
        })).collect::<Vec<_>>(),
        "extended_capabilities": x.extended_capabilities.iter().map(|c| json!({
            "id": c.id, "version": c.version, "offset": c.offset,
            "name": pcibus::config::extended_capability_name(c.id),
        })).collect::<Vec<_>>(),
        "current_link": x.current_link.map(link_json),
        "max_link": x.max_link.map(link_json),
        "modalias": x.modalias,
        "local_cpus": x.local_cpus,
        "problems": x.problems.iter().map(problem_json).collect::<Vec<_>>(),
    })
}

fn link_json(l: pcibus::Link) -> Value {
    json!({"speed_mts": l.speed.map(|s| s.0), "width": l.width})
}

fn write_show(out: &mut impl Write, d: &DeviceRecord, x: &pcibus::sysfs::details::Details) -> io::Result<()> {
    let names = names_for(std::slice::from_ref(d));
    writeln!(out, "{}  {}", d.address, describe(&names, d))?;
    writeln!(
        out,
        "  vendor {}  device {}  revision {}",
        opt(d.vendor),
        opt(d.device),
        opt(d.revision.map(|r| format!("{r:02x}")))
    )?;
    writeln!(
        out,
        "  subsystem {}:{}",
        opt(d.subsystem_vendor),
        opt(d.subsystem_device)
    )?;
    writeln!(out, "  class {}", opt(d.class))?;
    writeln!(
        out,
        "  driver {}  driver_override {}",
        d.driver.as_deref().unwrap_or("-"),
        d.driver_override.as_deref().unwrap_or("-")
    )?;
    writeln!(
        out,
        "  numa node {}  iommu group {}",
        opt(d.numa_node),
        opt(d.iommu_group)
    )?;
    if let Some(cpus) = &x.local_cpus {
        writeln!(
            out,
            "  local cpus {}",
            pcibus::sysfs::parse::format_cpu_list(cpus).trim_end()
        )?;
    }
    if let Some(m) = &x.modalias {
        writeln!(out, "  modalias {m}")?;
    }
    for (label, link) in [("link now", x.current_link), ("link max", x.max_link)] {
        if let Some(l) = link {
            writeln!(out, "  {label} {} x{}", opt(l.speed), opt(l.width))?;
        }
    }
    for b in d.bars() {
        writeln!(
            out,
            "  BAR{} {} at {:#x} size {:#x}{}",
            b.index,
            b.kind,
            b.start,
            b.size,
            if b.prefetchable { " prefetchable" } else { "" }
        )?;
    }
    for c in &x.capabilities {
        writeln!(
            out,
            "  capability {:#04x} {} at {:#04x}",
            c.id,
            pcibus::config::capability_name(c.id),
            c.offset
        )?;
    }
    for c in &x.extended_capabilities {
        writeln!(
            out,
            "  extended capability {:#06x} v{} {} at {:#05x}",
            c.id,
            c.version,
            pcibus::config::extended_capability_name(c.id),
            c.offset
        )?;
    }
    if let Some(s) = &d.sriov {
        writeln!(
            out,
            "  SR-IOV: total VFs {}  enabled {}  offset {}  stride {}  VF device {}",
            s.total_vfs,
            opt(s.num_vfs),
            opt(s.vf_offset),
            opt(s.vf_stride),
            opt(s.vf_device)
        )?;
        for (n, vf) in s.virtfns.iter().enumerate() {
            writeln!(out, "    virtfn{n} {vf}")?;
        }
    }
    if let Some(pf) = d.physfn {
        writeln!(out, "  physfn {pf}")?;
    }
    if d.removal_pending {
        writeln!(out, "  removal pending")?;
    }
    for p in d.problems.iter().chain(&x.problems) {
        writeln!(out, "  problem: {p}")?;
    }
    Ok(())
}

// Everything `vfio info` reports, gathered as JSON first so text and JSON agree.
fn vfio_info(root: &SysfsRoot, address: PciAddress) -> Result<Value, Error> {
    use pcibus::vfio::{self, VfioDevice, irq, region_flags};
    let group = vfio::iommu_group(root, address)?;
    let culprits = vfio::non_vfio_members(root, group);
    let dev = VfioDevice::open(root, address)?;
    let mut regions = Vec::new();
    for index in 0..dev.num_regions() {
        let Ok(r) = dev.region(index) else { continue };
        let mut flags = Vec::new();
        for (bit, name) in [
            (region_flags::READ, "read"),
            (region_flags::WRITE, "write"),
            (region_flags::MMAP, "mmap"),
            (region_flags::CAPS, "caps"),
        ] {
            if r.flags & bit != 0 {
                flags.push(name);
            }
        }
        let name = match index {
            0..=5 => format!("BAR{index}"),
            6 => "ROM".into(),
            7 => "config".into(),
            8 => "VGA".into(),
            n => format!("region{n}"),
        };
        regions.push(json!({
            "index": index, "name": name, "size": r.size, "offset": r.offset, "flags": flags,
            "mmap_areas": r.mmap_areas().iter().map(|(o, s)| json!({"offset": o, "size": s})).collect::<Vec<_>>(),
            "msix_mappable": r.msix_mappable,
        }));
    }
    let mut irqs = Vec::new();
    for index in 0..dev.num_irqs() {
        let Ok(i) = dev.irq_info(index) else { continue };
        irqs.push(json!({
            "index": index,
            "name": irq::NAMES.get(index as usize).copied().unwrap_or("?"),
            "count": i.count,
            "flags": i.flags,
        }));
    }
    let iommu = dev.container().iommu_info();
    Ok(json!({
        "address": address.to_string(),
        "group": group,
        "viable": culprits.is_empty(),
        "regions": regions,
        "irqs": irqs,
        "iommu_page_sizes": iommu.as_ref().map(|i| i.page_sizes),
        "iova_ranges": iommu.map(|i| i.iova_ranges.iter().map(|r| json!({"start": r.start(), "end": r.end()})).collect::<Vec<_>>()),
    }))
}

fn write_vfio_info(out: &mut impl Write, v: &Value) -> io::Result<()> {
    writeln!(
        out,
        "{}  IOMMU group {}  viable {}",
        v["address"].as_str().unwrap_or("?"),
        v["group"],
        v["viable"]
    )?;
    for r in v["regions"].as_array().into_iter().flatten() {
        if r["size"].as_u64() == Some(0) {
            continue;
        }
        let flags: Vec<&str> = r["flags"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|f| f.as_str())
            .collect();
        writeln!(
            out,
            "  region {:<2} {:<7} size {:#x}  {}",
            r["index"],
            r["name"].as_str().unwrap_or("?"),
            r["size"].as_u64().unwrap_or(0),
            flags.join(",")
        )?;
        let areas = r["mmap_areas"].as_array().map_or(0, |a| a.len());
        if flags.contains(&"mmap") && areas > 1 {
            for a in r["mmap_areas"].as_array().into_iter().flatten() {
                writeln!(
                    out,
                    "      mmap {:#x}+{:#x}",
                    a["offset"].as_u64().unwrap_or(0),
                    a["size"].as_u64().unwrap_or(0)
                )?;
            }
        }
    }
    for i in v["irqs"].as_array().into_iter().flatten() {
        writeln!(
            out,
            "  irq {} {:<5} count {}",
            i["index"],
            i["name"].as_str().unwrap_or("?"),
            i["count"]
        )?;
    }
    for r in v["iova_ranges"].as_array().into_iter().flatten() {
        writeln!(
            out,
            "  IOVA {:#x}-{:#x}",
            r["start"].as_u64().unwrap_or(0),
            r["end"].as_u64().unwrap_or(0)
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use pcibus::{ClassCode, DeviceId, VendorId};

    #[test]
    fn an_unnamed_device_is_described_as_lspci_does() {
        let ids = "1b36  Red Hat, Inc.\n\t0001  QEMU PCI-PCI bridge\nC 01  Mass storage controller\n\t08  Non-Volatile memory controller\n";
        let mut d = DeviceRecord::new("0000:01:00.0".parse().unwrap());
        d.vendor = Some(VendorId(0x1b36));
        d.device = Some(DeviceId(0x0010));
        d.class = Some(ClassCode::from_parts(0x01, 0x08, 0x02));
        let names =
            Names::from_reader(ids.as_bytes(), [(VendorId(0x1b36), DeviceId(0x0010))], d.class).unwrap();
        assert_eq!(
            describe(&names, &d),
            "Non-Volatile memory controller: Red Hat, Inc. Device 0010"
        );
    }
}
