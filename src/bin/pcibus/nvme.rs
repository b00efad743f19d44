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
        /// How many blocks.
        #[arg(long)]
        blocks: u64,
        /// Namespace.
        #[arg(long, default_value_t = 1)]
        nsid: u32,
        /// Where the data goes (default: stdout).
        #[arg(short = 'o', long, value_name = "FILE")]
        output: Option<PathBuf>,
    },
    /// A load like spdk_nvme_perf or fio: queue depth kept full on each queue (one thread
    /// per queue), completions polled; a live one-line progress on a terminal, then a
    /// summary (IOPS, MiB/s, mean, p50, p99 and max latency, errors).
    Perf {
        #[command(flatten)]
        device: DeviceArgs,
        /// The pattern.
        #[arg(long, value_enum, default_value = "randread")]
        rw: Pattern,
        /// Bytes per I/O (`512`, `4k`, `128k`, `1m`).
        #[arg(long, default_value = "4k", value_parser = parse_size)]
        bs: usize,
        /// I/Os in flight per queue.
        #[arg(long, default_value_t = 32)]
        qd: u16,
        /// Seconds.
        #[arg(long, default_value_t = 10.0)]
        time: f64,
        /// Queues (threads).
        #[arg(long, default_value_t = 1)]
        queues: u16,
        /// Namespace.
        #[arg(long, default_value_t = 1)]
        nsid: u32,
        /// One JSON object instead of text.
        #[arg(long)]
        json: bool,
        /// Keep running across the device's removal and return, as SPDK's hotplug example
        /// does: in-flight I/O fails fast, the device is released at once, and the load
        /// resumes when it comes back (bound again after the settle delay). Counts removals
        /// and re-attaches.
        #[arg(long)]
        hotplug: bool,
        /// With --hotplug: milliseconds a returned device settles before it is attached.
        #[arg(long, default_value_t = 500)]
        settle_ms: u64,
        /// With completion interrupts (`,interrupts=1`): keep polling this many
        /// microseconds after the last completion before sleeping on the interrupt (the
        /// hybrid of polling and sleeping). 0 sleeps at once.
        #[arg(long, value_name = "US", default_value_t = 0)]
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
        /// Namespace.
        #[arg(long, default_value_t = 1)]
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
}

fn parse_size(s: &str) -> Result<usize, String> {
    let t = s.trim().to_ascii_lowercase();
    let (num, mult) = match t.strip_suffix(['k', 'm']) {
        Some(n) if t.ends_with('k') => (n, 1024),
        Some(n) => (n, 1 << 20),
        None => (t.as_str(), 1),
    };
    num.parse::<usize>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("\"{s}\": expected a size such as 4k, 512 or 1m"))
}

#[derive(clap::Args)]
pub(super) struct DeviceArgs {
    /// The controller, in devargs syntax: `0000:01:00.0` or
    /// `01:00.0,io_queues=2,shadow_doorbells=0,interrupts=1` (MSI-X completion interrupts:
    /// queues sleep until a completion instead of polling).
    device: String,
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
    let devarg = DevArg::parse_allow(&args.device)?;
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
            bs,
            qd,
            time,
            queues,
            nsid,
            json,
            hotplug,
            settle_ms,
            spin_us,
        } => {
            let (op, random) = match rw {
                Pattern::Read => (Op::Read, false),
                Pattern::Write => (Op::Write, false),
                Pattern::Randread => (Op::Read, true),
                Pattern::Randwrite => (Op::Write, true),
            };
            if !(time.is_finite() && time > 0.0) {
                return Err(format!("--time {time}: expected a positive number of seconds").into());
            }
            let config = PerfConfig {
                op,
                random,
                io_size: bs,
                queue_depth: qd,
                queues,
                duration: Duration::from_secs_f64(time),
                nsid,
                spin: (spin_us > 0).then(|| Duration::from_micros(spin_us)),
            };
            if hotplug {
                let (result, h) = perf_hotplug(root, &device, &config, Duration::from_millis(settle_ms))?;
                return write_perf(out, &config, rw, &result, json, Some(&h));
            }
            with_controller(root, &device, |c| {
                let result = perf_live(c, &config)?;
                write_perf(out, &config, rw, &result, json, None)?;
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

fn identify_json(c: &Controller<VfioBacking>) -> Value {
    let info = c.info();
    let id = &info.identify;
    json!({
        "address": info.address.to_string(),
        "model": id.model,
        "serial": id.serial,
        "firmware": id.firmware,
        "vendor": format!("{:04x}", id.vid),
        "subsystem_vendor": format!("{:04x}", id.ssvid),
        "controller_id": id.cntlid,
        "version": version(info.version),
        "mdts": id.mdts,
        "max_transfer": info.max_transfer,
        "max_queue_entries": info.cap.max_queue_entries(),
        "doorbell_stride": info.cap.doorbell_stride(),
        "io_queues": info.io_queues,
        "shadow_doorbells": info.shadow_doorbells,
        "interrupt_vectors": info.interrupt_vectors,
        "features": features(c),
        "subnqn": id.subnqn,
        "namespaces": c.namespaces().iter().map(|n| json!({
            "nsid": n.nsid,
            "blocks": n.blocks,
            "block_size": n.block_size,
            "bytes": n.bytes(),
            "metadata_size": n.metadata_size,
            "extended_lba": n.extended_lba,
            "protection_type": n.protection,
            "usable": n.is_usable(),
            "unusable_reason": n.unusable,
            "formats": n.identify.formats.iter().map(|f| json!({
                "block_size": 1u64 << f.lbads.min(63),
                "metadata": f.metadata,
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
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

fn write_perf(
    out: &mut impl Write,
    config: &PerfConfig,
    rw: Pattern,
    r: &PerfResult,
    json: bool,
    hotplug: Option<&Hotplug>,
) -> Result<(), Error> {
    let rw = match rw {
        Pattern::Read => "read",
        Pattern::Write => "write",
        Pattern::Randread => "randread",
        Pattern::Randwrite => "randwrite",
    };
    let us = |ns: u64| ns as f64 / 1000.0;
    let mib_s = r.iops() * config.io_size as f64 / (1u64 << 20) as f64;
    let doorbells_per_io = r.doorbells as f64 / (r.ios + r.errors).max(1) as f64;
    if json {
        let v = json!({
            "rw": rw,
            "bs": config.io_size,
            "qd": config.queue_depth,
            "queues": config.queues,
            "seconds": r.elapsed.as_secs_f64(),
            "ios": r.ios,
            "errors": r.errors,
            "iops": r.iops(),
            "mib_s": mib_s,
            "mean_us": r.latency.mean_ns() / 1000.0,
            "p50_us": us(r.latency.quantile_ns(0.5)),
            "p99_us": us(r.latency.quantile_ns(0.99)),
            "max_us": us(r.latency.max_ns()),
            "doorbells_per_io": doorbells_per_io,
            "cpu_ns_per_io": r.cpu.as_nanos() as f64 / (r.ios + r.errors).max(1) as f64,
            "first_error": r.first_error,
        });
        let mut v = v;
        if let Some(h) = hotplug {
            v["removals"] = json!(h.removals);
            v["reattaches"] = json!(h.reattaches);
            v["removal_drain_ms"] = json!(h.drain_ms);
            v["events"] = json!(h.events);
        }
        writeln!(out, "{v}")?;
    } else {
        writeln!(
            out,
            "{rw} bs {} qd {} x {} queue(s), {:.1} s: {:.0} IOPS, {mib_s:.1} MiB/s",
            config.io_size,
            config.queue_depth,
            config.queues,
            r.elapsed.as_secs_f64(),
            r.iops()
        )?;
        writeln!(
            out,
            "latency us: mean {:.1}  p50 {:.1}  p99 {:.1}  max {:.1};  {} I/Os, {} errors, {doorbells_per_io:.2} SQ doorbells per I/O, {:.0} ns CPU per I/O",
            r.latency.mean_ns() / 1000.0,
            us(r.latency.quantile_ns(0.5)),
            us(r.latency.quantile_ns(0.99)),
            us(r.latency.max_ns()),
            r.ios,
            r.errors,
            r.cpu.as_nanos() as f64 / (r.ios + r.errors).max(1) as f64
        )?;
        if let Some(e) = &r.first_error {
            writeln!(out, "first error: {e}")?;
        }
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
