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
use pcibus::vfio::VfioBackend;
use pcibus::{BlockingAttr, DeviceRecord, IdSource, PciAddress, Scan, Scanner, SysfsRoot};

mod claims;
mod completions;
mod detach;
mod devbind;
mod list;
mod logging;
mod lspci;
mod nvme;
mod nvme_admin;
mod nvme_io_passthru;
mod nvme_sriov;
mod nvme_transfer;
mod setup;
mod show;
mod status;
mod tree;
mod usage;
mod vfio;
mod vfio_reset;
mod watch;

use claims::write_claims;
use list::report_skipped;
use lspci::{run_list, run_show};
use usage::UsageError;
use vfio::{IrqTest, irq_test, vfio_info, write_irq_test, write_vfio_info};

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
/// Exit status: a usage error (bad arguments).
const EXIT_USAGE: u8 = 2;
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
    /// VFIO backend of the commands that open devices (vfio, nvme): auto (iommufd
    /// when the kernel has /dev/iommu and the vfio device cdev, else group), group (the
    /// container and /dev/vfio/N, as DPDK and SPDK) or iommufd. Default:
    /// $PCIBUS_VFIO_BACKEND (checked only by those commands), else auto.
    #[arg(
        long,
        global = true,
        value_name = "BACKEND",
        value_parser = ["auto", "group", "iommufd"]
    )]
    vfio_backend: Option<String>,
    /// More messages from the library on stderr: -v info, -vv debug. $RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count, conflicts_with = "quiet")]
    verbose: u8,
    /// Only errors on stderr, no warnings or notes of the library. $RUST_LOG overrides.
    #[arg(short, long, global = true)]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// List the devices: address, ids, revision, class, subsystem ids, driver, NUMA node,
    /// IOMMU group, names.
    List {
        /// One JSON array, one object per device, sorted by address. `removal_pending` is
        /// null, or the reasons the removal registry gives (a vfio request, a uevent,
        /// another process's claim naming its PID, a stuck read).
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        scan: ScanArgs,
        #[command(flatten)]
        view: lspci::ListView,
    },
    /// Everything about one device: BARs, capabilities, SR-IOV relations, problems.
    ///
    /// With -s/-d instead of an address (or as well), every device they select, one after
    /// another (JSON: an array).
    Show {
        /// The device, e.g. 0000:01:00.0 or 1:0.0.
        #[arg(required_unless_present_any = ["slot", "id"], value_parser = usage::AddressParser)]
        address: Option<PciAddress>,
        /// JSON instead of text.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        scan: ScanArgs,
    },
    /// Bind devices to a kernel driver (driver_override + drivers_probe), e.g. vfio-pci:
    /// `bind ADDRESS... DRIVER`, `bind --driver DRIVER ADDRESS...`, or by selector
    /// (`bind --all-nvme vfio-pci`, `-d 8086:1533`, `--class 0108`).
    ///
    /// If the new driver does not take a device, driver_override is cleared and the old
    /// driver binds it again; if that fails too, the error says where the device is. Each
    /// device is reported on its own line; one failing does not stop the others, and the
    /// exit status is 1 if any failed.
    Bind {
        /// The devices (e.g. 0000:01:00.0 or 1:0.0), then the driver (e.g. vfio-pci or
        /// nvme) unless --driver names it.
        #[arg(value_name = "ADDRESS|DRIVER")]
        args: Vec<String>,
        #[command(flatten)]
        opts: devbind::BindArgs,
    },
    /// Unbind devices from their driver and clear their driver_override, by address or
    /// selector; as `bind`, each on its own line.
    Unbind {
        /// The devices.
        #[arg(value_name = "ADDRESS", value_parser = usage::AddressParser)]
        addresses: Vec<PciAddress>,
        #[command(flatten)]
        select: devbind::Selectors,
        /// Take the devices even if the host uses them.
        #[arg(long)]
        force: bool,
    },
    /// The devices grouped by how they are driven, as `dpdk-devbind.py --status`: on a
    /// userspace driver (vfio-pci, uio), on a kernel driver, on none; with interfaces
    /// (if=), disks (block=), driver (drv=), the loaded userspace drivers it is not on
    /// (unused=), and *Active* for those the host uses (which bind refuses).
    Status(status::StatusArgs),
    /// SPDK's scripts/setup.sh for NVMe: `config` binds every NVMe controller the host
    /// does not use to vfio-pci (an active one is skipped, naming its use), `reset` gives
    /// them back to the kernel driver recorded at config (else nvme), `status` shows them.
    Setup(setup::SetupArgs),
    /// A completion script for a shell, on standard output (e.g. `pcibus completions bash
    /// > /etc/bash_completion.d/pcibus`).
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// The man page (roff), on standard output (e.g. `pcibus man | man -l -`).
    Man,
    /// VFIO facts of a device bound to vfio-pci.
    Vfio {
        #[command(subcommand)]
        command: VfioCommand,
    },
    /// Print PCI hotplug events as the kernel sends them (add, remove, bind, unbind,
    /// change), until SIGINT or SIGTERM (then exit 0).
    Watch {
        /// One JSON object per line: action, address, subsystem, devpath, driver, seqnum,
        /// and `map`: what the event changed in the device map (`added`, `removed`,
        /// `updated` with the device's vendor, device, class and driver after it,
        /// `replaced` (another device at that address: the old one left unseen) with the
        /// same, or `unchanged`). `{"overflow":true,"resync":[...]}` when the kernel dropped events:
        /// the map is rebuilt by one scan and its changes listed.
        #[arg(long)]
        json: bool,
        /// Every kernel uevent, not only the PCI subsystem's.
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        select: SelectArgs,
    },
    /// The in-tree NVMe driver: identify a controller, read and write blocks, its logs,
    /// admin passthrough. Binds the
    /// device to vfio-pci if needed and claims it; `--restore` gives it back at the end.
    Nvme {
        #[command(subcommand)]
        command: nvme::NvmeCommand,
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
    ///
    /// Opening the device resets it, so the device is claimed first, as the nvme commands
    /// do: one another pcibus process or SPDK holds is refused, naming the holder.
    Info {
        /// The device.
        #[arg(value_parser = usage::AddressParser)]
        address: PciAddress,
        /// JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Enable a kind of interrupt through the driver API and report what arrives.
    ///
    /// Prints the device's vector counts per kind, enables the kind asked for (`best`:
    /// MSI-X, else MSI, else INTx), and waits for interrupts raised by the kernel
    /// (`--loopback`: VFIO signals each routed eventfd itself) or by QEMU's `edu` device
    /// (`--edu N`: N interrupts raised through BAR0 0x60, each acknowledged through 0x64 and,
    /// for INTx, unmasked). Claims the device first, as `vfio info` does.
    IrqTest {
        /// The device.
        #[arg(value_parser = usage::AddressParser)]
        address: PciAddress,
        /// intx, msi, msix or best.
        #[arg(long, default_value = "best")]
        kind: String,
        /// Vectors to enable (INTx has one; MSI-X at most 2048).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=2048))]
        count: u32,
        /// Signal every vector from the kernel (VFIO's loopback trigger) and wait for it.
        #[arg(long)]
        loopback: bool,
        /// Raise this many interrupts through QEMU's edu device (1234:11e8).
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
        edu: Option<u32>,
        /// With --edu and INTx: do not unmask after each interrupt (the second one then
        /// never arrives: VFIO automasks INTx).
        #[arg(long)]
        no_unmask: bool,
        /// How long to wait for each interrupt: milliseconds, or a duration with its unit
        /// (500ms, 2s). Above 0, at most a day.
        #[arg(long, default_value = "2000", value_name = "MS", value_parser = usage::TimeoutParser)]
        timeout: Duration,
        /// JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Register reads and writes on the device's BARs, in order, through the calls a
    /// driver makes (`map_bar`, or `map_bar_range` with --window): memory BARs through
    /// their mapping, I/O-port BARs through VFIO's region read/write. Each access prints
    /// its value, or why it was refused (an 8-byte access to an I/O BAR, an offset outside
    /// the window).
    ///
    /// The device is claimed and opened (which resets it) as for `vfio info`.
    Regs {
        /// The device.
        #[arg(value_parser = usage::AddressParser)]
        address: PciAddress,
        /// Map only this window of each BAR accessed (offsets are then relative to it).
        #[arg(long, value_name = "OFFSET+LEN", value_parser = vfio::parse_window)]
        window: Option<(u64, u64)>,
        /// JSON instead of text.
        #[arg(long)]
        json: bool,
        /// BAR:OFFSET:WIDTH reads, BAR:OFFSET:WIDTH=VALUE writes (WIDTH in bits: 8, 16,
        /// 32, 64; numbers decimal or 0x hex). E.g. e1000e's STATUS through its I/O BAR:
        /// `2:0:32=0x8 2:4:32 0:0x8:32`.
        #[arg(required = true, value_name = "ACCESS")]
        accesses: Vec<vfio::Access>,
    },
    /// How the device can be reset, then a reset: the function reset by the kernel's
    /// method (`reset_method`), or with --hot the bus or slot hot reset
    /// (VFIO_DEVICE_PCI_HOT_RESET), naming the devices it would also reset. Claims and
    /// opens the device (which resets it, if it can) as `vfio info` does.
    Reset {
        /// The device.
        #[arg(value_parser = usage::AddressParser)]
        address: PciAddress,
        /// A bus or slot hot reset instead of the function reset.
        #[arg(long)]
        hot: bool,
        /// With --hot: also claim and open this device (repeatable) in the same container
        /// first, so that the hot reset, which resets it too, may take it along (it must be
        /// on vfio-pci and free). Without it, a hot reset that would reset another device
        /// is refused, naming it and who holds it.
        #[arg(long = "with", value_name = "ADDRESS", value_parser = usage::AddressParser, requires = "hot")]
        with: Vec<PciAddress>,
        /// Only say how it could be reset.
        #[arg(long)]
        dry_run: bool,
        /// JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(clap::Args)]
struct ScanArgs {
    #[command(flatten)]
    select: SelectArgs,
    #[command(flatten)]
    lspci: lspci::LspciArgs,
    /// Also read these attributes, which block while a removal is pending, each through a
    /// guard with the scan's deadline.
    #[arg(long = "read", value_enum, value_name = "ATTR")]
    read: Vec<Attr>,
    /// Deadline for each guarded read from its submission: milliseconds, or a duration
    /// with its unit (500ms, 2s). Above 0, at most a day.
    #[arg(long, default_value = "1000", value_name = "MS", value_parser = usage::TimeoutParser)]
    timeout: Duration,
    /// Read every attribute through the guard.
    #[arg(long)]
    guard_all: bool,
    /// Where ids, class and revision come from: `files` (default: `modalias` and
    /// `revision`, kernel-cached, never wait), `id-files` (the six id files), `config` (the
    /// config header, read through the guard: it waits while the device is being reset).
    #[arg(long, value_enum, default_value_t = Ids::Files, value_name = "SOURCE")]
    ids: Ids,
    /// Walker threads (default: one per core, at most 4; 1 to 64).
    #[arg(long, value_parser = usage::threads)]
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

/// `-a`/`-b`, shared by the commands that select devices.
#[derive(clap::Args)]
struct SelectArgs {
    /// Only these devices, in DPDK's devargs syntax (`0000:02:00.0`, `02:00.0` for domain 0;
    /// per-device `,key=value` arguments are accepted and checked, and matter to drivers,
    /// not to listings). Repeatable.
    #[arg(short = 'a', long = "allow", value_name = "DEVARGS")]
    allow: Vec<String>,
    /// Never these devices. Repeatable.
    #[arg(short = 'b', long = "block", value_name = "ADDRESS")]
    block: Vec<String>,
}

impl SelectArgs {
    /// The selection; bad or contradicting devargs are a usage error.
    fn selection(&self) -> Result<pcibus::bus::devargs::Selection, UsageError> {
        pcibus::bus::devargs::Selection::from_args(
            self.allow
                .iter()
                .map(|a| ("-a", a.as_str()))
                .chain(self.block.iter().map(|b| ("-b", b.as_str()))),
        )
        .map_err(UsageError::new)
    }
}

impl ScanArgs {
    fn scanner(&self, root: SysfsRoot) -> Result<Scanner, Error> {
        let selection = self.select.selection()?;
        // `list` and `show` hold no devices and few fds: the helpers' private fd tables cost
        // nothing here.
        let mut s = Scanner::new(root)
            .private_fd_tables(true)
            .timeout(self.timeout)
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

/// The `--vfio-backend` of this run.
static VFIO_BACKEND: std::sync::OnceLock<VfioBackend> = std::sync::OnceLock::new();

/// The VFIO backend to open devices with (`--vfio-backend`, default auto).
fn vfio_backend() -> VfioBackend {
    VFIO_BACKEND.get().copied().unwrap_or_default()
}

/// The backend `--vfio-backend` names, else `$PCIBUS_VFIO_BACKEND` for the commands that
/// open devices: only they fail on a bad value of the variable.
fn choose_vfio_backend(cli: &Cli) -> Result<VfioBackend, UsageError> {
    if let Some(name) = &cli.vfio_backend {
        // The value parser allowed only names that parse.
        return Ok(name.parse().unwrap_or_default());
    }
    if !matches!(cli.command, Command::Vfio { .. } | Command::Nvme { .. }) {
        return Ok(VfioBackend::Auto);
    }
    VfioBackend::from_env().map_err(|_| {
        let value = std::env::var_os(VfioBackend::ENV).unwrap_or_default();
        UsageError::new(format!(
            "{}={}: not a VFIO backend (expected auto, group or iommufd)",
            VfioBackend::ENV,
            pcibus::error::shorten(value.as_encoded_bytes()),
        ))
    })
}

fn main() {
    let cli = Cli::parse();
    logging::init(logging::level(cli.verbose, cli.quiet));
    match choose_vfio_backend(&cli) {
        Ok(b) => {
            VFIO_BACKEND.get_or_init(|| b);
        }
        Err(e) => {
            eprintln!("pcibus: {e}");
            std::process::exit(EXIT_USAGE.into());
        }
    }
    // Before any thread exists: from here on the work runs in a child process. Not for
    // `watch`, which reads nothing that can block and must see its own SIGINT.
    let report = if matches!(cli.command, Command::Watch { .. }) {
        None
    } else {
        detach::start()
    };
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
                if e.is::<UsageError>() {
                    EXIT_USAGE
                } else {
                    EXIT_ERROR
                }
            }
        }
    })
    .unwrap_or(101);
    if let Some(report) = report {
        detach::finish(report, code);
    }
    std::process::exit(code.into());
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
    let mut out = io::BufWriter::new(usage::NamedStdout(stdout.lock()));
    let mut done = Outcome::Complete;
    if let Command::Bind { .. }
    | Command::Unbind { .. }
    | Command::Setup(setup::SetupArgs {
        action: setup::Action::Config | setup::Action::Reset,
        ..
    }) = cli.command
        && let Some(why) = not_kernel_sysfs(&root)
    {
        eprintln!(
            "pcibus: note: {why}: writing its files only; the in-use check sees what the tree \
             shows, not this system's mounts"
        );
    }
    match cli.command {
        Command::List { json, scan, view } => done = run_list(&mut out, root, json, scan, view)?,
        Command::Show { address, json, scan } => done = run_show(&mut out, root, address, json, scan)?,
        Command::Bind { args, opts } => devbind::bind(&mut out, &root, &args, &opts)?,
        Command::Unbind {
            addresses,
            select,
            force,
        } => devbind::unbind(&mut out, &root, &addresses, &select, force)?,
        Command::Status(args) => status::status(&mut out, &root, &args)?,
        Command::Setup(args) => setup::setup(&mut out, &root, &args)?,
        Command::Completions { shell } => completions::completions(&mut out, shell)?,
        Command::Man => completions::man(&mut out)?,
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
        Command::Vfio {
            command:
                VfioCommand::IrqTest {
                    address,
                    kind,
                    count,
                    loopback,
                    edu,
                    no_unmask,
                    timeout,
                    json,
                },
        } => {
            if let Some(why) = not_kernel_sysfs(&root) {
                return Err(format!("vfio irq-test needs the kernel's sysfs: {why}").into());
            }
            let test = IrqTest {
                kind,
                count,
                loopback,
                edu,
                unmask: !no_unmask,
                timeout,
            };
            let report = irq_test(&root, address, &test)?;
            if json {
                serde_json::to_writer_pretty(&mut out, &report)?;
                writeln!(out)?;
            } else {
                write_irq_test(&mut out, &report)?;
            }
            if report["ok"] == json!(false) {
                return Err("not every interrupt arrived".into());
            }
        }
        Command::Vfio {
            command:
                VfioCommand::Regs {
                    address,
                    window,
                    json,
                    accesses,
                },
        } => {
            if let Some(why) = not_kernel_sysfs(&root) {
                return Err(format!("vfio regs needs the kernel's sysfs: {why}").into());
            }
            let result = vfio::vfio_regs(&root, address, window, &accesses)?;
            if json {
                serde_json::to_writer_pretty(&mut out, &result)?;
                writeln!(out)?;
            } else {
                vfio::write_vfio_regs(&mut out, &result)?;
            }
            let refused = result["accesses"]
                .as_array()
                .map_or(0, |a| a.iter().filter(|a| !a["error"].is_null()).count());
            if refused > 0 {
                return Err(format!("{refused} of {} accesses refused", accesses.len()).into());
            }
        }
        Command::Vfio {
            command:
                VfioCommand::Reset {
                    address,
                    hot,
                    with,
                    dry_run,
                    json,
                },
        } => {
            if let Some(why) = not_kernel_sysfs(&root) {
                return Err(format!("vfio reset needs the kernel's sysfs: {why}").into());
            }
            let result = vfio_reset::vfio_reset(&root, address, &with, hot, dry_run)?;
            if json {
                serde_json::to_writer_pretty(&mut out, &result)?;
                writeln!(out)?;
            } else {
                vfio_reset::write_vfio_reset(&mut out, &result)?;
            }
            if let Some(e) = result["reset"]["error"].as_str() {
                return Err(e.to_owned().into());
            }
        }
        Command::Watch { json, all, select } => {
            watch::watch(&mut out, json, all, &select.selection()?, Scanner::new(root))?;
        }
        Command::Nvme { command } => nvme::run(&mut out, &root, command)?,
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
            // What could not be captured (read errors, a `config` cut to 64 bytes for a
            // user without root) is in the fixture's comments, and said here too.
            for note in &fixture.notes {
                eprintln!("pcibus: note: {note}");
            }
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
