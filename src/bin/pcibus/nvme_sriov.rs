//! `pcibus nvme sriov`: SR-IOV on an NVMe PF driven by pcibus. The PF is bound to vfio-pci
//! and claimed through the bus like the other nvme commands; the library's
//! [`pcibus::nvme::sriov::enable`] gives the VFs' controllers resources and sets them
//! online; the VFs are then bound to vfio-pci, claimed, opened with the PF's VF token and
//! brought up, and (with `--io-check`) driven concurrently with the PF. At the end
//! everything is taken down again: VF controllers shut down and closed, secondaries
//! offline, `sriov_numvfs` 0. The VFs cannot outlive this process anyway: closing the PF
//! resets it, and a PF reset takes every secondary controller offline.

use std::io::Write;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use pcibus::bus::devargs::{DevArg, Selection};
use pcibus::bus::driver::{Driver, ProbeDevice, ProbeOutcome, Removal};
use pcibus::bus::id::{CLASS_EXACT, IdEntry};
use pcibus::bus::map::DeviceMap;
use pcibus::bus::{BindPolicy, Bus, ProbeReport, VfioAttach, VfioBacking};
use pcibus::error::chain;
use pcibus::nvme::sriov::{self, BusVfs, Plan, Step};
use pcibus::nvme::{Controller, Options};
use pcibus::sysfs::bind;
use pcibus::vfio::{Container, VfToken, params};
use pcibus::{Scanner, SysfsRoot};

type Error = Box<dyn std::error::Error>;

#[derive(clap::Args)]
pub(super) struct SriovArgs {
    /// The PF (an SR-IOV NVMe controller), in devargs syntax: `0000:01:00.0`.
    #[arg(value_name = "DEVICE", value_parser = super::usage::DevArgParser)]
    device: DevArg,
    /// VFs to enable; 0 disables SR-IOV (secondary controllers offline, sriov_numvfs 0).
    #[arg(long)]
    vfs: u16,
    /// Write and read back a pattern through the PF and every VF at once (one thread per
    /// controller, a distinct LBA range each), then read every VF's range through the PF.
    #[arg(long)]
    io_check: bool,
    /// MiB each controller writes and reads back in --io-check (1 to 1024).
    #[arg(long, default_value = "2", value_parser = parse_io_mib)]
    io_mib: u32,
    /// VQ flexible resources (queue pairs, admin included) per VF.
    #[arg(long, default_value_t = 2)]
    vq: u16,
    /// VI flexible resources (interrupt vectors) per VF.
    #[arg(long, default_value_t = 1)]
    vi: u16,
    /// Reset the PF (after releasing its flexible resources) even when it holds none; the
    /// reset is otherwise skipped then.
    #[arg(long)]
    reset: bool,
    /// Do not attach the PF's namespaces to the VFs' controllers.
    #[arg(long)]
    no_attach: bool,
    /// Set vfio-pci's enable_sriov parameter to Y if it is not (vfio-pci creates VFs for
    /// a PF it drives only with it).
    #[arg(long)]
    enable_sriov: bool,
    /// How long to keep everything up (VFs online, bound, open) after printing, before
    /// taking it down, for looking at it from outside: seconds (`30`, `0.5`) or a duration
    /// (`30s`, `2m`); 0 does not wait.
    #[arg(long, default_value = "0", value_parser = super::nvme::args::parse_duration_or_zero)]
    hold: Duration,
    /// JSON instead of text.
    #[arg(long)]
    json: bool,
    /// Give the PF back to the kernel at the end.
    #[arg(long)]
    restore: bool,
    /// Bind the PF even if the host uses it.
    #[arg(long)]
    force: bool,
}

fn parse_io_mib(s: &str) -> Result<u32, String> {
    super::nvme::args::in_range(s, 1, 1024, "MiB").map(|n| n as u32)
}

// The PF for this command: the bus binds, opens and claims it; the command drives it.
// VFs are the other driver's.
struct PfHolder {
    table: [IdEntry; 1],
}

impl Driver<VfioBacking> for PfHolder {
    type Device = ();
    fn name(&self) -> &str {
        "nvme-sriov-pf"
    }
    fn id_table(&self) -> &[IdEntry] {
        &self.table
    }
    fn probe(&mut self, device: ProbeDevice<'_, VfioBacking>) -> ProbeOutcome {
        if device.record.physfn.is_some() {
            return ProbeOutcome::NotMine;
        }
        ProbeOutcome::Bound(())
    }
    fn remove(&mut self, _: (), _removal: &Removal) {}
}

// The VFs' controllers, brought up when the bus offers the VFs (bound to vfio-pci,
// claimed, opened with the PF's VF token by the bus) and shut down when it takes them
// back.
struct VfDriver {
    table: [IdEntry; 1],
}

impl Driver<VfioBacking> for VfDriver {
    type Device = Controller<VfioBacking>;
    fn name(&self) -> &str {
        "nvme-sriov-vf"
    }
    fn id_table(&self) -> &[IdEntry] {
        &self.table
    }
    fn probe(&mut self, device: ProbeDevice<'_, VfioBacking>) -> ProbeOutcome<Controller<VfioBacking>> {
        if device.record.physfn.is_none() {
            return ProbeOutcome::NotMine;
        }
        match Controller::init(device.backing.clone(), &Options::default()) {
            Ok(c) => ProbeOutcome::Bound(c),
            Err(e) => ProbeOutcome::Failed(format!("bring-up: {}", chain(&e)).into()),
        }
    }
    fn remove(&mut self, controller: Controller<VfioBacking>, _removal: &Removal) {
        if let Err(e) = controller.shutdown_within(Duration::from_secs(2)) {
            log::warn!("{}: shutdown: {e}", controller.info().address);
        }
    }
}

pub(super) fn run(out: &mut impl Write, root: &SysfsRoot, args: SriovArgs) -> Result<(), Error> {
    if let Some(why) = super::not_kernel_sysfs(root) {
        return Err(format!("nvme sriov needs the kernel's sysfs: {why}").into());
    }
    let devarg = args.device.clone();
    let address = devarg.address();
    match params::enable_sriov(root, args.enable_sriov) {
        Ok(true) => eprintln!("set vfio-pci's enable_sriov to Y (needed for VFs of a PF on vfio-pci)"),
        Ok(false) => {}
        Err(e @ params::ParamError::Off { .. }) => {
            return Err(format!("{e}; or rerun with --enable-sriov to set it").into());
        }
        Err(e) => return Err(e.into()),
    }
    let started = Instant::now();

    // The PF and its VFs, through one bus and one container: the PF gets the VF token
    // when it is opened, its VFs are opened with it.
    let token = VfToken::generate()?;
    let policy = BindPolicy {
        bind: true,
        force: args.force,
        restore: args.restore,
    };
    let map = DeviceMap::new(Scanner::new(root.clone()))?;
    let attach = VfioAttach::new(root.clone(), policy)
        .shared_container(Container::with_backend(crate::vfio_backend())?)
        .vf_token(token);
    let mut bus = Bus::new(map, attach).selection(Selection::new(vec![devarg], vec![])?);
    let nvme = IdEntry::class(0x01_08_02, CLASS_EXACT);
    bus.register(Box::new(PfHolder { table: [nvme] }));
    bus.register(Box::new(VfDriver { table: [nvme] }));
    let report = bus
        .probe_all()
        .into_iter()
        .find(|r| r.address == address)
        .ok_or_else(|| format!("{address}: no such PCI device, or not an NVMe controller"))?;
    if let Err(e) = report.result {
        return Err(chain(&e).into());
    }
    let backing = bus
        .backing(address)
        .cloned()
        .ok_or("the bus bound the PF but holds no device for it")?;
    let mut journal = Vec::new();
    let result = (|| -> Result<Value, Error> {
        let pf = Controller::init(backing.clone(), &Options::default())?;
        if args.vfs == 0 {
            let list = sriov::disable(&pf, &mut BusVfs::new(&mut bus, address), &mut journal);
            let _ = pf.shutdown_within(Duration::from_secs(2));
            list?;
            return Ok(json!({ "pf": address.to_string(), "disabled": true }));
        }
        let plan = Plan::new(args.vfs)
            .resources(args.vq, args.vi)
            .attach_namespaces(!args.no_attach)
            .always_reset(args.reset);
        let enabled = match sriov::enable(
            pf,
            &backing,
            &mut BusVfs::new(&mut bus, address),
            &plan,
            &mut journal,
        ) {
            Ok(e) => e,
            Err(e) => {
                // Best effort: leave no VFs behind.
                if let Ok(pf) = Controller::init(backing.clone(), &Options::default()) {
                    let _ = sriov::disable(&pf, &mut BusVfs::new(&mut bus, address), &mut Vec::new());
                    let _ = pf.shutdown_within(Duration::from_secs(2));
                }
                return Err(chain(&e).into());
            }
        };
        let driven = drive(&mut bus, root, &enabled, &args);
        let mut v = match driven {
            Ok(v) => v,
            Err(e) => json!({ "error": chain(e.as_ref()) }),
        };
        if let Some(o) = v.as_object_mut() {
            o.insert("vf_token".into(), json!(token.to_string()));
            o.insert("reset".into(), json!(enabled.reset));
            o.insert("caps_before".into(), caps_json(&enabled.caps_before));
            o.insert("caps".into(), caps_json(&enabled.caps));
            o.insert(
                "secondaries".into(),
                Value::Array(
                    enabled
                        .vfs
                        .iter()
                        .map(|vf| {
                            let s = vf.secondary;
                            json!({
                                "address": vf.address.to_string(),
                                "controller_id": s.scid,
                                "primary": s.pcid,
                                "vf": s.vfn,
                                "online": s.online,
                                "vq": s.nvq,
                                "vi": s.nvi,
                                "attached": vf.attached.iter().map(|(n, st)| json!({"nsid": n, "status": st.to_string()})).collect::<Vec<_>>(),
                            })
                        })
                        .collect(),
                ),
            );
        }
        if !args.hold.is_zero() {
            // Printed now, so an onlooker can read it while everything is up.
            v["journal"] = journal_json(&journal);
            print(out, &v, args.json)?;
            out.flush()?;
            std::thread::sleep(args.hold);
        }
        // Take it down: the VFs (the bus shuts their controllers down, closes them and
        // drops their claims: removing a VF this process holds would wait for its fd),
        // then the secondaries and the VFs themselves, then the PF.
        let t = Instant::now();
        for vf in &enabled.vfs {
            if bus.held().iter().any(|(a, _)| *a == vf.address)
                && let Err(e) = bus.detach(vf.address)
            {
                log::warn!("{}: detach: {e}", vf.address);
            }
        }
        let disabled = sriov::disable(&enabled.pf, &mut BusVfs::new(&mut bus, address), &mut journal);
        let _ = enabled.pf.shutdown_within(Duration::from_secs(2));
        drop(enabled);
        v["teardown_ms"] = json!(t.elapsed().as_millis() as u64);
        v["disabled"] = json!(disabled.is_ok());
        disabled?;
        Ok(v)
    })();
    drop(backing);
    drop(bus);
    if args.restore && bind::current_driver(root, address).as_deref() == Some("vfio-pci") {
        bind::reprobe(root, address)?;
    }
    let mut v = match result {
        Ok(v) => v,
        Err(e) => {
            print_journal_err(&journal);
            return Err(e);
        }
    };
    v["journal"] = journal_json(&journal);
    v["total_ms"] = json!(started.elapsed().as_millis() as u64);
    if args.hold.is_zero() || args.vfs == 0 {
        print(out, &v, args.json)?;
    } else if args.json {
        // The full record again, with teardown, for whoever reads to the end.
        writeln!(out, "{v}")?;
    } else {
        writeln!(out, "taken down in {} ms", v["teardown_ms"])?;
    }
    if v.get("error").is_some() {
        return Err(v["error"].as_str().unwrap_or("failed").into());
    }
    if let Some(checks) = v["io_check"].as_array()
        && checks.iter().any(|c| c["ok"] != json!(true))
    {
        return Err("I/O check failed".into());
    }
    Ok(())
}

// Offers every VF to the bus (which binds it to vfio-pci, claims it, opens it with the
// PF's VF token, and hands it to the VF driver, which brings its controller up);
// identifies; runs the I/O check.
fn drive(
    bus: &mut Bus<VfioAttach>,
    root: &SysfsRoot,
    enabled: &sriov::Enabled<VfioBacking>,
    args: &SriovArgs,
) -> Result<Value, Error> {
    let mut vfs = Vec::new();
    for vf in &enabled.vfs {
        let address = vf.address;
        bus.allow(DevArg::new(address))?;
        match bus.probe(address) {
            Some(ProbeReport { result: Ok(_), .. }) => {}
            Some(ProbeReport { result: Err(e), .. }) => {
                return Err(format!("{address}: {}", chain(&e)).into());
            }
            None => return Err(format!("{address}: the bus did not offer it (not in its map?)").into()),
        }
        let controller = bus
            .device_state::<VfDriver>(address)
            .cloned()
            .ok_or_else(|| format!("{address}: held by another driver"))?;
        vfs.push((bind::current_driver(root, address), controller));
    }
    let mut v = json!({
        "pf": controller_json(&enabled.pf, bind::current_driver(root, enabled.pf.info().address)),
        "vfs": vfs.iter().map(|(driver, c)| controller_json(c, driver.clone())).collect::<Vec<_>>(),
    });
    if args.io_check {
        let mut all = vec![("pf", enabled.pf.clone())];
        all.extend(vfs.iter().map(|(_, c)| ("vf", c.clone())));
        v["io_check"] = io_check(&all, args.io_mib)?;
    }
    Ok(v)
}

fn caps_json(c: &pcibus::nvme::spec::PrimaryControllerCaps) -> Value {
    json!({
        "controller_id": c.cntlid,
        "vq_flexible_total": c.vqfrt,
        "vq_assigned_to_secondaries": c.vqrfa,
        "vq_allocated_to_primary": c.vqrfap,
        "vq_private": c.vqprt,
        "vq_max_per_secondary": c.vqfrsm,
        "vi_flexible_total": c.vifrt,
        "vi_assigned_to_secondaries": c.virfa,
        "vi_allocated_to_primary": c.virfap,
        "vi_private": c.viprt,
        "vi_max_per_secondary": c.vifrsm,
    })
}

fn controller_json(c: &Controller<VfioBacking>, driver: Option<String>) -> Value {
    let info = c.info();
    json!({
        "address": info.address.to_string(),
        "driver": driver,
        "controller_id": info.identify.cntlid,
        "model": info.identify.model,
        "serial": info.identify.serial,
        "io_queues": info.io_queues,
        "shadow_doorbells": info.shadow_doorbells,
        "namespaces": c.namespaces().iter().map(|n| json!({
            "nsid": n.nsid,
            "blocks": n.blocks,
            "block_size": n.block_size,
        })).collect::<Vec<_>>(),
    })
}

fn journal_json(journal: &[Step]) -> Value {
    Value::Array(
        journal
            .iter()
            .map(|s| {
                json!({
                    "step": s.what,
                    "outcome": s.outcome,
                    "ok": s.ok,
                    "ms": s.elapsed.as_secs_f64() * 1000.0,
                })
            })
            .collect(),
    )
}

fn print_journal_err(journal: &[Step]) {
    for s in journal {
        eprintln!(
            "  {} {}: {} ({:.1} ms)",
            if s.ok { "ok  " } else { "FAIL" },
            s.what,
            s.outcome,
            s.elapsed.as_secs_f64() * 1000.0
        );
    }
}

fn print(out: &mut impl Write, v: &Value, json: bool) -> Result<(), Error> {
    if json {
        writeln!(out, "{v}")?;
        return Ok(());
    }
    writeln!(out, "SR-IOV steps:")?;
    for s in v["journal"].as_array().into_iter().flatten() {
        writeln!(
            out,
            "  {} {}: {} ({:.1} ms)",
            if s["ok"] == json!(true) { "ok  " } else { "FAIL" },
            s["step"].as_str().unwrap_or(""),
            s["outcome"].as_str().unwrap_or(""),
            s["ms"].as_f64().unwrap_or(0.0)
        )?;
    }
    if let Some(t) = v["vf_token"].as_str() {
        writeln!(out, "VF token {t}")?;
    }
    let ctrl = |out: &mut dyn Write, role: &str, c: &Value| -> std::io::Result<()> {
        let ns: Vec<String> = c["namespaces"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|n| format!("{} ({} x {} B)", n["nsid"], n["blocks"], n["block_size"]))
            .collect();
        writeln!(
            out,
            "{role} {}  driver {}  controller {}  {}  {} I/O queue(s)  namespaces: {}",
            c["address"].as_str().unwrap_or("?"),
            c["driver"].as_str().unwrap_or("none"),
            c["controller_id"],
            c["model"].as_str().unwrap_or(""),
            c["io_queues"],
            if ns.is_empty() {
                "none".into()
            } else {
                ns.join(", ")
            }
        )
    };
    if v["pf"].is_object() {
        ctrl(out, "PF", &v["pf"])?;
    }
    for c in v["vfs"].as_array().into_iter().flatten() {
        ctrl(out, "VF", c)?;
    }
    for s in v["secondaries"].as_array().into_iter().flatten() {
        writeln!(
            out,
            "secondary controller {} (VF {} = {}): {}, {} VQ, {} VI",
            s["controller_id"],
            s["vf"],
            s["address"].as_str().unwrap_or("?"),
            if s["online"] == json!(true) {
                "online"
            } else {
                "offline"
            },
            s["vq"],
            s["vi"]
        )?;
    }
    for c in v["io_check"].as_array().into_iter().flatten() {
        writeln!(
            out,
            "I/O {} {}: {} bytes at LBA {} of namespace {}: write {:.1} ms, read {:.1} ms, {}",
            c["role"].as_str().unwrap_or(""),
            c["address"].as_str().unwrap_or(""),
            c["bytes"],
            c["lba"],
            c["nsid"],
            c["write_ms"].as_f64().unwrap_or(0.0),
            c["read_ms"].as_f64().unwrap_or(0.0),
            if c["ok"] == json!(true) {
                "data checked".to_owned()
            } else {
                format!("FAILED: {}", c["error"].as_str().unwrap_or("?"))
            }
        )?;
    }
    if let Some(e) = v["error"].as_str() {
        writeln!(out, "error: {e}")?;
    }
    Ok(())
}

// The pattern of controller `index` at byte `at` of the namespace: distinct per
// controller, per position and per run.
fn pattern(run: u64, index: u64, at: u64) -> u64 {
    let mut z = run ^ index.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ at;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d1_049b_b133_11eb);
    z ^ (z >> 31)
}

fn fill(run: u64, index: u64, base: u64, len: usize) -> Vec<u8> {
    (0..len as u64 / 8)
        .flat_map(|w| pattern(run, index, base + w * 8).to_le_bytes())
        .collect()
}

// Where controller `index` writes: its own range, after the first 8 MiB.
fn range_of(index: usize, bytes: u64) -> u64 {
    (8 << 20) + index as u64 * bytes
}

#[derive(Default)]
struct IoResult {
    nsid: u32,
    lba: u64,
    blocks: u64,
    write: Duration,
    read: Duration,
    error: Option<String>,
}

type Queue = pcibus::nvme::IoQueue<VfioBacking>;

// The PF's reads of each VF's range (`None`: the VF had no namespace).
type CrossChecks = Vec<Option<Result<(), String>>>;

// Reads `bytes` at byte `base` of namespace `nsid` through `q` in 128 KiB commands and
// compares them with what controller `index` wrote there.
fn verify(
    c: &Controller<VfioBacking>,
    q: &mut Queue,
    nsid: u32,
    run: u64,
    index: usize,
    base: u64,
    bytes: u64,
) -> Result<(), String> {
    let bs = u64::from(c.namespace(nsid).ok_or("no such namespace")?.block_size);
    let chunk: u64 = 128 << 10;
    let back = c.alloc_buffer(chunk as usize).map_err(|e| e.to_string())?;
    let mut got = vec![0u8; chunk as usize];
    for off in (0..bytes).step_by(chunk as usize) {
        back.zero();
        q.read(nsid, (base + off) / bs, chunk / bs, &back, 0)
            .map_err(|e| format!("read at byte {}: {e}", base + off))?;
        back.read_at(0, &mut got).ok_or("buffer")?;
        if got != fill(run, index as u64, base + off, chunk as usize) {
            return Err(format!(
                "data read back at byte {} differs from what was written",
                base + off
            ));
        }
    }
    Ok(())
}

// One controller's part: write its range in 128 KiB commands, flush, read it back, compare.
fn io_one(c: &Controller<VfioBacking>, q: &mut Queue, run: u64, index: usize, bytes: u64) -> IoResult {
    let mut r = IoResult::default();
    let attempt = (|| -> Result<(), String> {
        let namespaces = c.namespaces();
        let ns = namespaces.first().ok_or("the controller has no namespace")?;
        let bs = u64::from(ns.block_size);
        let base = range_of(index, bytes);
        r.nsid = ns.nsid;
        r.lba = base / bs;
        r.blocks = bytes / bs;
        if base + bytes > ns.bytes() {
            return Err(format!(
                "namespace {} has {} bytes, the range ends at {}",
                ns.nsid,
                ns.bytes(),
                base + bytes
            ));
        }
        let chunk: u64 = 128 << 10;
        let out = c.alloc_buffer(chunk as usize).map_err(|e| e.to_string())?;
        let t = Instant::now();
        for off in (0..bytes).step_by(chunk as usize) {
            out.write_at(0, &fill(run, index as u64, base + off, chunk as usize))
                .ok_or("buffer")?;
            q.write(ns.nsid, (base + off) / bs, chunk / bs, &out, 0)
                .map_err(|e| format!("write at byte {}: {e}", base + off))?;
        }
        q.flush(ns.nsid).map_err(|e| format!("flush: {e}"))?;
        r.write = t.elapsed();
        let t = Instant::now();
        verify(c, q, ns.nsid, run, index, base, bytes)?;
        r.read = t.elapsed();
        Ok(())
    })();
    r.error = attempt.err();
    r
}

// Concurrent I/O on every controller (one thread and one queue each); once all are done,
// the PF's thread reads every VF's range through its own queue: the VFs wrote to the media
// the PF sees.
fn io_check(all: &[(&str, Controller<VfioBacking>)], mib: u32) -> Result<Value, Error> {
    let bytes = u64::from(mib.max(1)) << 20;
    let run = u64::from_le_bytes(VfToken::generate()?.to_bytes()[..8].try_into().unwrap_or([7; 8]));
    let (start, done) = (
        std::sync::Barrier::new(all.len()),
        std::sync::Barrier::new(all.len()),
    );
    let nsids: Vec<u32> = all
        .iter()
        .map(|(_, c)| c.namespaces().first().map_or(0, |n| n.nsid))
        .collect();
    let outcomes: Vec<(IoResult, CrossChecks)> = std::thread::scope(|s| {
        let handles: Vec<_> = all
            .iter()
            .enumerate()
            .map(|(i, (_, c))| {
                let (start, done, nsids) = (&start, &done, &nsids);
                s.spawn(move || {
                    let queue = c.io_queue(32);
                    start.wait();
                    let r = match queue {
                        Ok(mut q) => {
                            let r = io_one(c, &mut q, run, i, bytes);
                            done.wait();
                            let cross = if i == 0 {
                                (1..nsids.len())
                                    .map(|j| {
                                        (nsids[j] != 0).then(|| {
                                            verify(c, &mut q, nsids[j], run, j, range_of(j, bytes), bytes)
                                        })
                                    })
                                    .collect()
                            } else {
                                Vec::new()
                            };
                            return (r, cross);
                        }
                        Err(e) => IoResult {
                            error: Some(format!("I/O queue: {e}")),
                            ..IoResult::default()
                        },
                    };
                    done.wait();
                    (r, Vec::new())
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    let r = IoResult {
                        error: Some("thread panicked".into()),
                        ..IoResult::default()
                    };
                    (r, Vec::new())
                })
            })
            .collect()
    });
    let cross = outcomes.first().map(|(_, c)| c.clone()).unwrap_or_default();
    Ok(Value::Array(
        all.iter()
            .zip(&outcomes)
            .enumerate()
            .map(|(i, ((role, c), (r, _)))| {
                let through_pf = if i == 0 {
                    None
                } else {
                    cross.get(i - 1).cloned().flatten()
                };
                let error = r.error.clone().or_else(|| {
                    through_pf
                        .clone()
                        .and_then(|x| x.err())
                        .map(|e| format!("read through the PF: {e}"))
                });
                json!({
                    "role": role,
                    "address": c.info().address.to_string(),
                    "nsid": r.nsid,
                    "lba": r.lba,
                    "blocks": r.blocks,
                    "bytes": bytes,
                    "write_ms": r.write.as_secs_f64() * 1000.0,
                    "read_ms": r.read.as_secs_f64() * 1000.0,
                    "read_through_pf": through_pf.map(|x| x.is_ok()),
                    "ok": error.is_none(),
                    "error": error,
                })
            })
            .collect(),
    ))
}
