//! `pcibus nvme`: the in-tree NVMe driver from the command line. Each command runs a bus
//! with the NVMe driver on one device: it binds the device to vfio-pci if needed (refusing
//! one the host uses), claims it, brings the controller up, does its work, shuts the
//! controller down and, with `--restore`, gives the device back to its previous driver.

use std::io::{Read, Write};
use std::path::PathBuf;

use serde_json::{Value, json};

use pcibus::bus::devargs::{DevArg, Selection};
use pcibus::bus::map::DeviceMap;
use pcibus::bus::{BindPolicy, Bus, VfioAttach, VfioBacking};
use pcibus::nvme::driver::NvmeDriver;
use pcibus::nvme::perf::{PerfConfig, PerfResult, Progress};
use pcibus::nvme::spec::{oacs, oncs};
use pcibus::nvme::{Controller, Op, Options};
use pcibus::{PciAddress, Scanner, SysfsRoot};
use std::io::IsTerminal;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

#[path = "nvme_args.rs"]
pub(super) mod args;
#[path = "nvme_perf.rs"]
mod report;

use args::{
    parse_blocks, parse_duration, parse_io_size, parse_nsid, parse_percent, parse_queue_depth, parse_queues,
    parse_settle_ms, parse_spin_us,
};

type Error = Box<dyn std::error::Error>;

#[derive(clap::Subcommand)]
pub(super) enum NvmeCommand {
    /// The controller (model, serial, firmware, transfer limit, queues, optional
    /// features) and its namespaces (size, LBA format).
    Identify {
        #[command(flatten)]
        device: DeviceArgs,
        /// JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// SMART / Health Information (log page 02h): critical warnings, temperature, spare,
    /// wear, data and commands counted, power cycles and hours, unsafe shutdowns, media
    /// errors.
    SmartLog {
        #[command(flatten)]
        device: DeviceArgs,
        /// JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Error Information log (page 01h): the controller's most recent errors, newest first.
    ErrorLog {
        #[command(flatten)]
        device: DeviceArgs,
        /// JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Send any admin command (vendor commands, features, log pages the driver does not
    /// wrap); print its completion (dword 0, status) and the data it returned. Fails when
    /// the command completes with an error status.
    AdminPassthru {
        #[command(flatten)]
        device: DeviceArgs,
        #[command(flatten)]
        command: super::nvme_admin::PassthruArgs,
    },
    /// Send any NVM I/O command the driver does not wrap on an I/O queue (the driver
    /// builds the data pointer from a buffer of --data-len bytes; no metadata pointer);
    /// print its completion (dword 0, status) and the data it returned. Fails when the
    /// command completes with an error status.
    IoPassthru {
        #[command(flatten)]
        device: DeviceArgs,
        #[command(flatten)]
        command: super::nvme_io_passthru::IoPassthruArgs,
    },
    /// Read blocks to a file (or stdout). Any size: the transfer is cut into requests of
    /// the controller's largest transfer, kept in flight together.
    Read {
        #[command(flatten)]
        device: DeviceArgs,
        /// First block.
        #[arg(long)]
        lba: u64,
        /// How many blocks (at least 1).
        #[arg(long, value_parser = parse_blocks)]
        blocks: u64,
        /// Namespace (1 to 4294967294).
        #[arg(long, default_value = "1", value_parser = parse_nsid)]
        nsid: u32,
        /// Where the data goes (default: stdout).
        #[arg(short = 'o', long, value_name = "FILE")]
        output: Option<PathBuf>,
    },
    /// A load like spdk_nvme_perf or fio: queue depth kept full on each queue (one thread
    /// per queue), completions polled; a live one-line progress on a terminal, then a
    /// summary: IOPS, MiB/s, latency min, avg, max, stdev and p50/p90/p99/p99.9/p99.99
    /// (from a log-linear histogram: within 0.4%), a line per queue when there are
    /// several, errors.
    Perf {
        #[command(flatten)]
        device: DeviceArgs,
        /// The pattern, as fio names them: rw and randrw mix reads and writes (see
        /// --rwmixread).
        #[arg(long, value_enum, default_value = "randread")]
        rw: Pattern,
        /// With --rw rw or randrw: the percentage of I/Os that are reads (0-100), as fio's
        /// rwmixread and spdk_nvme_perf's -M.
        #[arg(long, value_name = "PERCENT", value_parser = parse_percent)]
        rwmixread: Option<u8>,
        /// Bytes per I/O, a multiple of 512 (`512`, `4k` = 4096, `128k`, `1m`); at most the
        /// controller's largest transfer.
        #[arg(long, default_value = "4k", value_parser = parse_io_size)]
        bs: usize,
        /// I/Os in flight per queue (1 to 65534, and below the controller's queue size).
        #[arg(long, default_value = "32", value_parser = parse_queue_depth)]
        qd: u16,
        /// How long: seconds (`10`, `2.5`) or a duration (`10s`, `500ms`, `1m30s`).
        #[arg(long, default_value = "10", value_parser = parse_duration)]
        time: Duration,
        /// Queues (threads), at most the controller's I/O queues.
        #[arg(long, default_value = "1", value_parser = parse_queues)]
        queues: u16,
        /// Namespace (1 to 4294967294).
        #[arg(long, default_value = "1", value_parser = parse_nsid)]
        nsid: u32,
        /// Write the latency histogram (all queues) to FILE as CSV: a header
        /// `low_ns,high_ns,count`, then one row per non-empty bucket (latencies from
        /// low_ns to high_ns nanoseconds, both included), smallest first.
        #[arg(long, value_name = "FILE")]
        histogram: Option<PathBuf>,
        /// One JSON object instead of text.
        #[arg(long)]
        json: bool,
        /// Keep running across the device's removal and return, as SPDK's hotplug example
        /// does: in-flight I/O fails fast, the device is released at once, and the load
        /// resumes when it comes back (bound again after the settle delay). Counts removals
        /// and re-attaches.
        #[arg(long)]
        hotplug: bool,
        /// With --hotplug: milliseconds a returned device settles before it is attached
        /// (at most an hour).
        #[arg(long, default_value = "500", value_parser = parse_settle_ms)]
        settle_ms: u64,
        /// With completion interrupts (`,interrupts=1`): keep polling this many
        /// microseconds after the last completion before sleeping on the interrupt (the
        /// hybrid of polling and sleeping). 0 sleeps at once; at most 10 s.
        #[arg(long, value_name = "US", default_value = "0", value_parser = parse_spin_us)]
        spin_us: u64,
    },
    /// SR-IOV on a PF: give the VFs' controllers queues and interrupt vectors
    /// (Virtualization Management), enable the VFs, set their controllers online, bind and
    /// open them (with the PF's VF token), bring them up and identify them; with
    /// `--io-check`, drive the PF and all VFs at once and check the data. Everything is
    /// taken down at the end (the VFs cannot outlive this process's hold on the PF).
    Sriov(super::nvme_sriov::SriovArgs),
    /// Write a file (or stdin) at a block, padded with zeroes to whole blocks, then flush.
    /// Any size, as `read`.
    Write {
        #[command(flatten)]
        device: DeviceArgs,
        /// First block.
        #[arg(long)]
        lba: u64,
        /// Namespace (1 to 4294967294).
        #[arg(long, default_value = "1", value_parser = parse_nsid)]
        nsid: u32,
        /// Where the data comes from (default: stdin).
        #[arg(short = 'i', long, value_name = "FILE")]
        input: Option<PathBuf>,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub(super) enum Pattern {
    Read,
    Write,
    Randread,
    Randwrite,
    /// Sequential, reads and writes mixed.
    Rw,
    /// Random, reads and writes mixed.
    Randrw,
}

impl Pattern {
    fn name(self) -> &'static str {
        match self {
            Pattern::Read => "read",
            Pattern::Write => "write",
            Pattern::Randread => "randread",
            Pattern::Randwrite => "randwrite",
            Pattern::Rw => "rw",
            Pattern::Randrw => "randrw",
        }
    }
}

// A usage error found after parsing (arguments that do not go together): clap's message
// and exit status 2. Only before anything is touched: it exits at once.
fn usage_error(message: String) -> ! {
    use clap::CommandFactory;
    super::Cli::command()
        .error(clap::error::ErrorKind::ArgumentConflict, message)
        .exit()
}

#[derive(clap::Args)]
pub(super) struct DeviceArgs {
    /// The controller, in devargs syntax: `0000:01:00.0` or
    /// `01:00.0,io_queues=2,shadow_doorbells=0,interrupts=1` (MSI-X completion interrupts:
    /// queues sleep until a completion instead of polling).
    #[arg(value_name = "DEVICE", value_parser = super::usage::DevArgParser)]
    device: DevArg,
    /// Give the device back to the kernel when done: to the driver it had before this
    /// command bound it, or, if it was on vfio-pci already, to whichever kernel driver
    /// claims it (e.g. nvme).
    #[arg(long)]
    restore: bool,
    /// Bind even if the host uses the device (mounted, swap).
    #[arg(long)]
    force: bool,
}

// Runs `f` with the controller of `args.device`, through a bus that binds, claims and
// releases it.
// A bus over the kernel's sysfs with the NVMe driver, offered only `args.device`; and that
// device's address.
fn nvme_bus(root: &SysfsRoot, args: &DeviceArgs) -> Result<(Bus<VfioAttach>, PciAddress), Error> {
    if let Some(why) = super::not_kernel_sysfs(root) {
        return Err(format!("nvme needs the kernel's sysfs: {why}").into());
    }
    let devarg = args.device.clone();
    let address = devarg.address();
    let map = DeviceMap::new(Scanner::new(root.clone()))?;
    let policy = BindPolicy {
        bind: true,
        force: args.force,
        restore: args.restore,
    };
    let mut bus = Bus::new(
        map,
        VfioAttach::new(root.clone(), policy).backend(crate::vfio_backend()),
    )
    .selection(Selection::new(vec![devarg], vec![])?);
    bus.register(Box::new(NvmeDriver::<VfioBacking>::new(Options::default())));
    Ok((bus, address))
}

// After the bus is dropped: with `--restore`, a device that was on vfio-pci before the
// command (so the bus has no previous driver to put back) goes to whichever kernel driver
// takes it.
fn give_back(root: &SysfsRoot, args: &DeviceArgs, address: PciAddress) -> Result<(), Error> {
    if args.restore && pcibus::sysfs::bind::current_driver(root, address).as_deref() == Some("vfio-pci") {
        pcibus::sysfs::bind::reprobe(root, address)?;
    }
    Ok(())
}

fn with_controller<T>(
    root: &SysfsRoot,
    args: &DeviceArgs,
    f: impl FnOnce(&Controller<VfioBacking>) -> Result<T, Error>,
) -> Result<T, Error> {
    let (mut bus, address) = nvme_bus(root, args)?;
    let report = bus
        .probe_all()
        .into_iter()
        .find(|r| r.address == address)
        .ok_or_else(|| match bus.map().get(address) {
            None => format!("{address}: no such PCI device"),
            Some(r) => format!(
                "{address}: not an NVMe controller (class {})",
                r.class.map_or("unknown".into(), |c| format!("{:06x}", c.value()))
            ),
        })?;
    if let Err(e) = report.result {
        let mut msg = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            msg.push_str(&format!(": {s}"));
            source = s.source();
        }
        return Err(msg.into());
    }
    let controller = bus
        .device_state::<NvmeDriver<VfioBacking>>(address)
        .cloned()
        .ok_or("the NVMe driver bound the device but has no controller for it")?;
    let result = f(&controller);
    drop(controller);
    // Shuts the controller down, closes the device, restores its driver if asked.
    drop(bus);
    give_back(root, args, address)?;
    result
}

pub(super) fn run(out: &mut impl Write, root: &SysfsRoot, command: NvmeCommand) -> Result<(), Error> {
    match command {
        NvmeCommand::Identify { device, json } => with_controller(root, &device, |c| {
            if json {
                serde_json::to_writer_pretty(&mut *out, &identify_json(c))?;
                writeln!(out)?;
            } else {
                write_identify(out, c)?;
            }
            Ok(())
        }),
        NvmeCommand::SmartLog { device, json } => with_controller(root, &device, |c| {
            let s = c.smart_log()?;
            if json {
                writeln!(out, "{}", super::nvme_admin::smart_json(&s))?;
            } else {
                super::nvme_admin::write_smart(out, &s)?;
            }
            Ok(())
        }),
        NvmeCommand::ErrorLog { device, json } => with_controller(root, &device, |c| {
            let list = c.error_log()?;
            if json {
                let v: Vec<Value> = list.iter().map(super::nvme_admin::error_json).collect();
                writeln!(out, "{}", Value::Array(v))?;
            } else {
                super::nvme_admin::write_errors(out, &list)?;
            }
            Ok(())
        }),
        NvmeCommand::AdminPassthru { device, command } => {
            // The arguments and the input file are checked before the device is touched.
            let p = command.prepare()?;
            with_controller(root, &device, |c| super::nvme_admin::passthru(out, c, &p))
        }
        NvmeCommand::IoPassthru { device, command } => {
            let p = command.prepare()?;
            with_controller(root, &device, |c| {
                super::nvme_io_passthru::io_passthru(out, c, &p)
            })
        }
        NvmeCommand::Read {
            device,
            lba,
            blocks,
            nsid,
            output,
        } => with_controller(root, &device, |c| {
            let data = super::nvme_transfer::read_blocks(c, nsid, lba, blocks)?;
            match output {
                Some(p) => std::fs::write(&p, &data).map_err(|e| format!("{}: {e}", p.display()))?,
                None => out.write_all(&data)?,
            }
            Ok(())
        }),
        NvmeCommand::Perf {
            device,
            rw,
            rwmixread,
            bs,
            qd,
            time,
            queues,
            nsid,
            histogram,
            json,
            hotplug,
            settle_ms,
            spin_us,
        } => {
            let (op, random, mixed) = match rw {
                Pattern::Read => (Op::Read, false, false),
                Pattern::Write => (Op::Write, false, false),
                Pattern::Randread => (Op::Read, true, false),
                Pattern::Randwrite => (Op::Write, true, false),
                Pattern::Rw => (Op::Read, false, true),
                Pattern::Randrw => (Op::Read, true, true),
            };
            if let (Some(p), false) = (rwmixread, mixed) {
                usage_error(format!(
                    "--rwmixread {p} mixes reads and writes: it goes with --rw rw or randrw, not {}",
                    rw.name()
                ));
            }
            // Mixed: half reads unless told, as fio.
            let rwmix_read = mixed.then(|| rwmixread.unwrap_or(50));
            if hotplug && histogram.is_some() {
                usage_error("--histogram is not written with --hotplug".into());
            }
            // The file is created before the device is touched: a bad path costs no run.
            let histogram = histogram
                .map(|p| {
                    std::fs::File::create(&p)
                        .map(|f| (p.clone(), std::io::BufWriter::new(f)))
                        .map_err(|e| format!("--histogram {}: {e}", p.display()))
                })
                .transpose()?;
            let config = PerfConfig {
                op,
                random,
                io_size: bs,
                queue_depth: qd,
                queues,
                duration: time,
                nsid,
                spin: (spin_us > 0).then(|| Duration::from_micros(spin_us)),
                rwmix_read,
            };
            let info = report::RunInfo {
                rw: rw.name(),
                bs,
                qd,
                queues,
                rwmixread: rwmix_read,
            };
            if hotplug {
                let (result, h) = perf_hotplug(root, &device, &config, Duration::from_millis(settle_ms))?;
                return write_perf(out, &info, &result, json, Some(&h));
            }
            with_controller(root, &device, |c| {
                check_perf_against(c, &config)?;
                let result = perf_live(c, &config)?;
                write_perf(out, &info, &result, json, None)?;
                if let Some((path, mut file)) = histogram {
                    report::write_histogram_csv(&mut file, &result.latency)
                        .and_then(|()| file.flush())
                        .map_err(|e| format!("--histogram {}: {e}", path.display()))?;
                }
                Ok(())
            })
        }
        NvmeCommand::Sriov(args) => super::nvme_sriov::run(out, root, args),
        NvmeCommand::Write {
            device,
            lba,
            nsid,
            input,
        } => {
            let mut data = Vec::new();
            match &input {
                Some(p) => data = std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()))?,
                None => {
                    std::io::stdin().read_to_end(&mut data)?;
                }
            }
            if data.is_empty() {
                return Err("nothing to write (empty input)".into());
            }
            with_controller(root, &device, |c| {
                let (blocks, bs) = super::nvme_transfer::write_blocks(c, nsid, lba, &data)?;
                writeln!(
                    out,
                    "wrote {} bytes ({blocks} blocks of {bs}) at LBA {lba} of namespace {nsid}",
                    data.len()
                )?;
                Ok(())
            })
        }
    }
}

fn features(c: &Controller<VfioBacking>) -> Vec<&'static str> {
    let id = &c.info().identify;
    let mut f = Vec::new();
    if id.oacs & oacs::VIRT_MGMT != 0 {
        f.push("virtualization-management");
    }
    if id.oacs & oacs::DOORBELL_BUFFER_CONFIG != 0 {
        f.push("shadow-doorbells");
    }
    if id.oncs & oncs::WRITE_ZEROES != 0 {
        f.push("write-zeroes");
    }
    if id.oncs & oncs::DATASET_MANAGEMENT != 0 {
        f.push("deallocate");
    }
    if id.vwc & 1 != 0 {
        f.push("volatile-write-cache");
    }
    f
}

fn version(vs: u32) -> String {
    format!("{}.{}.{}", vs >> 16, vs >> 8 & 0xff, vs & 0xff)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

// Identify Namespace under nvme-cli's `id-ns -o json` names (numbers as numbers, NGUID and
// EUI-64 as hex strings), then what pcibus makes of it under "pcibus".
fn namespace_json(n: &pcibus::nvme::Namespace) -> Value {
    let id = &n.identify;
    let in_use = id.format_index();
    json!({
        "nsid": n.nsid,
        "nsze": id.nsze,
        "ncap": id.ncap,
        "nuse": id.nuse,
        "nsfeat": id.nsfeat,
        "nlbaf": id.nlbaf,
        "flbas": id.flbas,
        "mc": id.mc,
        "dpc": id.dpc,
        "dps": id.dps,
        "nmic": id.nmic,
        "nguid": hex(&id.nguid),
        "eui64": hex(&id.eui64),
        "lbafs": id.formats.iter().enumerate().map(|(i, f)| json!({
            "lbaf": i,
            "ms": f.metadata,
            "ds": f.lbads,
            "rp": f.rp,
            "in_use": u8::from(i == in_use),
        })).collect::<Vec<_>>(),
        "pcibus": {
            "block_size": n.block_size,
            "bytes": n.bytes(),
            "metadata_size": n.metadata_size,
            "extended_lba": n.extended_lba,
            "protection_type": n.protection,
            "usable": n.is_usable(),
            "unusable_reason": n.unusable,
        },
    })
}

// Identify Controller under nvme-cli's `id-ctrl -o json` names and number formats (numbers
// as JSON numbers, strings trimmed), so scripts written for nvme-cli read it unchanged; the
// namespaces under "namespaces" (as `id-ns`); what the driver set up under "pcibus".
fn identify_json(c: &Controller<VfioBacking>) -> Value {
    let info = c.info();
    let id = &info.identify;
    let mut v = json!({
        "vid": id.vid,
        "ssvid": id.ssvid,
        "sn": id.serial,
        "mn": id.model,
        "fr": id.firmware,
        "rab": id.rab,
        "ieee": id.ieee,
        "cmic": id.cmic,
        "mdts": id.mdts,
        "cntlid": id.cntlid,
        "ver": id.ver,
        "rtd3e": id.rtd3e,
        "oaes": id.oaes,
        "oacs": id.oacs,
        "acl": id.acl,
        "aerl": id.aerl,
        "frmw": id.frmw,
        "lpa": id.lpa,
        "elpe": id.elpe,
        "npss": id.npss,
        "sqes": id.sqes,
        "cqes": id.cqes,
        "nn": id.nn,
        "oncs": id.oncs,
        "fuses": id.fuses,
        "fna": id.fna,
        "vwc": id.vwc,
        "awun": id.awun,
        "awupf": id.awupf,
        "sgls": id.sgls,
    });
    // As nvme-cli: no subnqn key when the controller reports none.
    if !id.subnqn.is_empty() {
        v["subnqn"] = json!(id.subnqn);
    }
    v["namespaces"] = c.namespaces().iter().map(namespace_json).collect();
    v["pcibus"] = json!({
        "address": info.address.to_string(),
        "version": version(info.version),
        "max_transfer": info.max_transfer,
        "max_queue_entries": info.cap.max_queue_entries(),
        "doorbell_stride": info.cap.doorbell_stride(),
        "io_queues": info.io_queues,
        "shadow_doorbells": info.shadow_doorbells,
        "interrupt_vectors": info.interrupt_vectors,
        "features": features(c),
    });
    v
}

fn write_identify(out: &mut impl Write, c: &Controller<VfioBacking>) -> Result<(), Error> {
    let info = c.info();
    let id = &info.identify;
    writeln!(out, "{}  {}", info.address, id.model)?;
    writeln!(out, "  serial         {}", id.serial)?;
    writeln!(out, "  firmware       {}", id.firmware)?;
    writeln!(
        out,
        "  ids            {:04x} (subsystem vendor {:04x}), controller {}",
        id.vid, id.ssvid, id.cntlid
    )?;
    writeln!(out, "  version        {}", version(info.version))?;
    writeln!(
        out,
        "  max transfer   {} KiB (MDTS {})",
        info.max_transfer / 1024,
        id.mdts
    )?;
    writeln!(
        out,
        "  queues         {} I/O queue pairs of up to {} entries, doorbell stride {}",
        info.io_queues,
        info.cap.max_queue_entries(),
        info.cap.doorbell_stride()
    )?;
    writeln!(out, "  features       {}", features(c).join(", "))?;
    writeln!(
        out,
        "  shadow doorbells {}",
        if info.shadow_doorbells { "on" } else { "off" }
    )?;
    if !id.subnqn.is_empty() {
        writeln!(out, "  subsystem      {}", id.subnqn)?;
    }
    for n in c.namespaces().iter() {
        let mut extra = String::new();
        if n.metadata_size > 0 {
            extra = format!(
                ", {} bytes of metadata ({})",
                n.metadata_size,
                if n.extended_lba {
                    "extended LBAs"
                } else {
                    "separate"
                }
            );
        }
        if n.protection > 0 {
            extra += &format!(", protection type {}", n.protection);
        }
        writeln!(
            out,
            "  namespace {}    {} blocks of {} bytes ({:.1} GiB){extra}",
            n.nsid,
            n.blocks,
            n.block_size,
            n.bytes() as f64 / (1u64 << 30) as f64
        )?;
        if let Some(why) = &n.unusable {
            writeln!(out, "    not usable: {why}")?;
        }
    }
    Ok(())
}

// Runs perf with a one-line progress on stderr when it is a terminal.
fn perf_live(c: &Controller<VfioBacking>, config: &PerfConfig) -> Result<PerfResult, Error> {
    let progress = Progress::default();
    let live = std::io::stderr().is_terminal();
    let result = std::thread::scope(|s| {
        let worker = s.spawn(|| pcibus::nvme::perf::run(c, config, &progress));
        let (mut last_ios, mut last_lat, mut last) = (0u64, 0u64, Instant::now());
        while !worker.is_finished() {
            std::thread::sleep(Duration::from_millis(100));
            if !live || last.elapsed() < Duration::from_secs(1) {
                continue;
            }
            let ios = progress.ios.load(Ordering::Relaxed);
            let lat = progress.latency_ns.load(Ordering::Relaxed);
            let secs = last.elapsed().as_secs_f64();
            let n = ios - last_ios;
            let iops = n as f64 / secs;
            let mean_us = if n == 0 {
                0.0
            } else {
                (lat - last_lat) as f64 / n as f64 / 1000.0
            };
            eprint!(
                "\r{iops:>10.0} IOPS  {:>8.1} MiB/s  mean {mean_us:>7.1} us  errors {}   ",
                iops * config.io_size as f64 / (1u64 << 20) as f64,
                progress.errors.load(Ordering::Relaxed)
            );
            (last_ios, last_lat, last) = (ios, lat, Instant::now());
        }
        if live {
            eprintln!();
        }
        match worker.join() {
            Ok(r) => r.map_err(Error::from),
            Err(_) => Err(Error::from("perf thread panicked")),
        }
    })?;
    Ok(result)
}

// What the arguments ask that this controller cannot do, named by argument (the run
// would fail on each queue, less clearly).
fn check_perf_against(c: &Controller<VfioBacking>, config: &PerfConfig) -> Result<(), Error> {
    let info = c.info();
    let entries = info.cap.max_queue_entries();
    if u32::from(config.queue_depth) + 1 > entries {
        return Err(format!(
            "--qd {}: the controller's queues hold at most {} entries, so a queue depth of {} at most",
            config.queue_depth,
            entries,
            entries.saturating_sub(1)
        )
        .into());
    }
    if usize::from(config.queues) > usize::from(info.io_queues) {
        return Err(format!(
            "--queues {}: the controller gave {} I/O queue(s) (ask for more with `,io_queues=N`)",
            config.queues, info.io_queues
        )
        .into());
    }
    if config.io_size as u64 > info.max_transfer {
        return Err(format!(
            "--bs {}: more than the controller's largest transfer ({} bytes)",
            config.io_size, info.max_transfer
        )
        .into());
    }
    let ns = c
        .namespace(config.nsid)
        .ok_or_else(|| format!("--nsid {}: the controller has no such namespace", config.nsid))?;
    if !config.io_size.is_multiple_of(ns.block_size as usize) {
        return Err(format!(
            "--bs {}: not a whole number of namespace {}'s {}-byte blocks",
            config.io_size, config.nsid, ns.block_size
        )
        .into());
    }
    Ok(())
}

fn write_perf(
    out: &mut impl Write,
    info: &report::RunInfo,
    r: &PerfResult,
    json: bool,
    hotplug: Option<&Hotplug>,
) -> Result<(), Error> {
    if json {
        let mut v = report::perf_json(info, r);
        if let Some(h) = hotplug {
            v.insert("removals".into(), json!(h.removals));
            v.insert("reattaches".into(), json!(h.reattaches));
            v.insert("removal_drain_ms".into(), json!(h.drain_ms));
            v.insert("events".into(), json!(h.events));
        }
        writeln!(out, "{}", Value::Object(v))?;
    } else {
        report::write_perf_text(out, info, r)?;
        if let Some(h) = hotplug {
            writeln!(
                out,
                "hotplug: {} removals, {} re-attaches; load stopped {:?} ms after each removal",
                h.removals, h.reattaches, h.drain_ms
            )?;
        }
    }
    Ok(())
}

/// What `perf --hotplug` saw.
#[derive(Debug, Default)]
struct Hotplug {
    removals: u32,
    reattaches: u32,
    // Per removal: from the bus taking the device back to the load's threads ending.
    drain_ms: Vec<u64>,
    events: Vec<String>,
}

// Runs the load through a bus that keeps running across removals: on a removal the driver
// revokes the controller (in-flight I/O fails at once), the load ends and the device is
// released; when the device comes back and the bus binds it again, a new load starts.
fn perf_hotplug(
    root: &SysfsRoot,
    args: &DeviceArgs,
    config: &PerfConfig,
    settle: Duration,
) -> Result<(PerfResult, Hotplug), Error> {
    use pcibus::bus::BusEvent;
    use pcibus::hotplug::monitor::UeventMonitor;
    use std::sync::Arc;

    // Opened before the bus's first scan, so that no event is missed.
    let mut monitor = UeventMonitor::open()?.pci_only(true);
    let (bus, address) = nvme_bus(root, args)?;
    let mut bus = bus.settle(settle);
    for r in bus.probe_all() {
        if let Err(e) = r.result {
            return Err(format!("{}: {e}", r.address).into());
        }
    }
    let start = Instant::now();
    let deadline = start + config.duration;
    let mut total = PerfResult::default();
    let mut h = Hotplug::default();
    let mut worker: Option<Load> = None;
    let note = |h: &mut Hotplug, what: String| {
        let line = format!("+{} ms: {what}", start.elapsed().as_millis());
        eprintln!("{line}");
        h.events.push(line);
    };
    while Instant::now() < deadline {
        if worker.is_none()
            && let Some(c) = bus.device_state::<NvmeDriver<VfioBacking>>(address).cloned()
        {
            let progress = Arc::new(Progress::default());
            let mut cfg = config.clone();
            cfg.duration = deadline.saturating_duration_since(Instant::now());
            let p = Arc::clone(&progress);
            let handle = std::thread::spawn(move || pcibus::nvme::perf::run(&c, &cfg, &p));
            worker = Some((handle, progress));
        }
        let wait = deadline
            .saturating_duration_since(Instant::now())
            .min(Duration::from_millis(100));
        for event in bus.wait(Some(&mut monitor), wait)? {
            match &event {
                BusEvent::Removed(r) if r.address == address => {
                    let t = Instant::now();
                    h.removals += 1;
                    join_load(worker.take(), &mut total);
                    let ms = t.elapsed().as_millis() as u64;
                    h.drain_ms.push(ms);
                    note(
                        &mut h,
                        format!("{address} removed ({}); load stopped in {ms} ms", r.cause),
                    );
                }
                BusEvent::Probed(p) if p.address == address => match &p.result {
                    Ok(_) => {
                        h.reattaches += 1;
                        note(&mut h, format!("{address} attached again; load resumes"));
                    }
                    Err(e) => note(&mut h, format!("{address} came back but was not attached: {e}")),
                },
                _ => {}
            }
        }
    }
    join_load(worker.take(), &mut total);
    total.elapsed = start.elapsed();
    drop(bus);
    give_back(root, args, address)?;
    Ok((total, h))
}

// A running load: its thread and its progress (whose `stop` ends it).
type Load = (
    std::thread::JoinHandle<Result<PerfResult, pcibus::nvme::NvmeError>>,
    std::sync::Arc<Progress>,
);

// Stops and joins a load, adding what it measured to `total`.
fn join_load(load: Option<Load>, total: &mut PerfResult) {
    let Some((handle, progress)) = load else { return };
    progress.stop.store(true, Ordering::Relaxed);
    match handle.join() {
        Ok(Ok(r)) => total.merge(r),
        Ok(Err(e)) => {
            if total.first_error.is_none() {
                total.first_error = Some(e.to_string());
            }
        }
        Err(_) => total.first_error = Some("perf thread panicked".into()),
    }
}
