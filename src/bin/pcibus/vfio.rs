//! `pcibus vfio info`: what VFIO reports about one device; `pcibus vfio regs`: register
//! accesses to its BARs through the calls a driver makes.

use std::collections::BTreeMap;
use std::sync::Arc;

use pcibus::bus::claim::{ClaimDir, ClaimInfo};
use pcibus::bus::{BarInfo, DeviceBacking, DeviceRegion, RegisterIo, VfioBacking};

use super::*;

/// The first check of the vfio commands: a device that does not exist is said to be
/// missing, before anything else (a claim, `/dev/vfio`) can fail in its own words.
pub(super) fn device_exists(root: &SysfsRoot, address: PciAddress) -> Result<(), Error> {
    let dir = root.device_dir(address);
    match std::fs::symlink_metadata(&dir) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            Err(format!("no device {address} in {}", root.devices_dir().display()).into())
        }
        Err(e) => Err(format!("{}: {e}", dir.display()).into()),
    }
}

// Everything `vfio info` reports, gathered as JSON first so text and JSON agree.
pub(super) fn vfio_info(root: &SysfsRoot, address: PciAddress) -> Result<Value, Error> {
    use pcibus::vfio::{self, RegionFlags, VfioDevice, irq};
    // Opening the device resets it: not under the feet of another owner (a pcibus
    // process, or SPDK), who is named in the refusal. Claimed before anything else, as
    // the bus does; dropped after the device is closed (the end of this function, or an
    // early return: `dev` is declared later, so it is dropped first).
    device_exists(root, address)?;
    let claim = ClaimDir::for_claiming().claim(address, &ClaimInfo::new())?;
    // Then the backend: what the kernel lacks for it is the first thing to say.
    let container = vfio::Container::with_backend(vfio_backend())?;
    let group = vfio::iommu_group(root, address)?;
    let culprits = vfio::non_vfio_members(root, group);
    let dev = VfioDevice::open_in(root, address, &container)?;
    let mut regions = Vec::new();
    for index in 0..dev.num_regions() {
        let Ok(r) = dev.region(index) else { continue };
        let mut flags = Vec::new();
        for (bit, name) in [
            (RegionFlags::READ, "read"),
            (RegionFlags::WRITE, "write"),
            (RegionFlags::MMAP, "mmap"),
            (RegionFlags::CAPS, "caps"),
        ] {
            if r.flags.contains(bit) {
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
            "flags": i.flags.bits(),
        }));
    }
    // What a driver learns through its backing: each BAR's facts without mapping it, and
    // the device-specific regions.
    let backing = VfioBacking::new(Arc::clone(&dev));
    let bars: Vec<Value> = (0..6)
        .map(|index| match backing.bar_info(index) {
            Ok(info) => bar_json(&info),
            Err(e) => json!({"index": index, "error": e.to_string()}),
        })
        .collect();
    let device_regions: Vec<Value> = backing.regions().iter().map(device_region_json).collect();
    drop(backing);
    let iommu = dev.container().iommu_info();
    let info = json!({
        "address": address.to_string(),
        "backend": dev.backend().name(),
        "ioas": dev.container().ioas_id(),
        "group": group,
        "viable": culprits.is_empty(),
        "regions": regions,
        "irqs": irqs,
        "bars": bars,
        "device_regions": device_regions,
        "iommu_page_sizes": iommu.as_ref().map(|i| i.page_sizes),
        "iova_ranges": iommu.map(|i| i.iova_ranges.iter().map(|r| json!({"start": r.start(), "end": r.end()})).collect::<Vec<_>>()),
    });
    drop(dev);
    drop(claim);
    Ok(info)
}

pub(super) fn write_vfio_info(out: &mut impl Write, v: &Value) -> io::Result<()> {
    writeln!(
        out,
        "{}  IOMMU group {}  viable {}",
        v["address"].as_str().unwrap_or("?"),
        v["group"],
        v["viable"]
    )?;
    match v["ioas"].as_u64() {
        Some(ioas) => writeln!(
            out,
            "  backend {} (IOAS {ioas})",
            v["backend"].as_str().unwrap_or("?")
        )?,
        None => writeln!(out, "  backend {}", v["backend"].as_str().unwrap_or("?"))?,
    }
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
    for b in v["bars"].as_array().into_iter().flatten() {
        write_bar(out, b)?;
    }
    for r in v["device_regions"].as_array().into_iter().flatten() {
        writeln!(
            out,
            "  device region {} type {:#x} subtype {:#x}{} size {:#x} {}",
            r["index"],
            r["type"].as_u64().unwrap_or(0),
            r["subtype"].as_u64().unwrap_or(0),
            r["vendor"]
                .as_u64()
                .map_or(String::new(), |v| format!(" (vendor {v:04x})")),
            r["size"].as_u64().unwrap_or(0),
            [("read", "read"), ("write", "write"), ("mmap", "mmap")]
                .iter()
                .filter(|(k, _)| r[*k].as_bool() == Some(true))
                .map(|(_, n)| *n)
                .collect::<Vec<_>>()
                .join(",")
        )?;
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

/// What `vfio irq-test` does (see its `--help`).
pub(super) struct IrqTest {
    /// intx, msi, msix or best.
    pub kind: String,
    /// Vectors to enable.
    pub count: u32,
    /// Signal every vector through VFIO's loopback trigger.
    pub loopback: bool,
    /// Interrupts to raise through QEMU's edu device.
    pub edu: Option<u32>,
    /// Unmask (INTx) after each edu interrupt.
    pub unmask: bool,
    /// How long to wait for each interrupt.
    pub timeout: std::time::Duration,
}

// QEMU's edu device (hw/misc/edu.c): BAR0 registers.
const EDU_VENDOR: u16 = 0x1234;
const EDU_DEVICE: u16 = 0x11e8;
/// Interrupt status (read): the bits raised and not yet acknowledged.
const EDU_IRQ_STATUS: u64 = 0x24;
/// Raise (write): ORs the value into the status and interrupts (MSI if enabled, else
/// INTx, which stays asserted while the status is not 0).
const EDU_IRQ_RAISE: u64 = 0x60;
/// Acknowledge (write): clears these bits of the status (INTx deasserts at 0).
const EDU_IRQ_ACK: u64 = 0x64;

/// Enables interrupts on `address` through the driver API ([`VfioBacking`]) and reports
/// what arrived, as JSON (`ok`: every interrupt waited for arrived).
pub(super) fn irq_test(root: &SysfsRoot, address: PciAddress, test: &IrqTest) -> Result<Value, Error> {
    use std::sync::Arc;
    use std::time::Instant;

    use pcibus::bus::{DeviceBacking, InterruptKind, VfioBacking};
    use pcibus::vfio::{self, VfioDevice};

    device_exists(root, address)?;
    let claim = ClaimDir::for_claiming().claim(address, &ClaimInfo::new())?;
    let container = vfio::Container::with_backend(vfio_backend())?;
    let dev = VfioDevice::open_in(root, address, &container)?;
    let backing = VfioBacking::new(Arc::clone(&dev));
    let kinds: Vec<Value> = [
        InterruptKind::Intx,
        InterruptKind::Msi,
        InterruptKind::MsiX,
        InterruptKind::Error,
    ]
    .into_iter()
    .map(|k| {
        json!({
            "kind": k.name(),
            "count": backing.interrupt_count(k),
            "maskable": backing.interrupt_maskable(k),
        })
    })
    .collect();
    let (kind, irqs) = match test.kind.as_str() {
        "best" => backing.enable_best_interrupts(test.count)?,
        other => {
            let kind: InterruptKind = other.parse()?;
            (kind, backing.enable_interrupts(kind, test.count)?)
        }
    };
    let mut events = Vec::new();
    let mut ok = true;
    if test.loopback {
        for irq in &irqs {
            let start = Instant::now();
            dev.trigger_irq(kind.vfio_index(), irq.vector())?;
            let arrived = irq.wait(Some(test.timeout))?;
            let us = start.elapsed().as_micros() as u64;
            irq.unmask()?;
            ok &= arrived;
            events.push(json!({"source": "loopback", "vector": irq.vector(), "arrived": arrived, "us": us}));
        }
    }
    if let Some(n) = test.edu {
        let mut id = [0u8; 4];
        backing.read_config(0, &mut id)?;
        let (vendor, device) = (
            u16::from_le_bytes([id[0], id[1]]),
            u16::from_le_bytes([id[2], id[3]]),
        );
        if (vendor, device) != (EDU_VENDOR, EDU_DEVICE) {
            return Err(
                format!("{address} is {vendor:04x}:{device:04x}, not QEMU's edu device (1234:11e8)").into(),
            );
        }
        // An MSI is a memory write of the device's: QEMU drops it while bus mastering is
        // off, and vfio-pci never turns it on (the bus would; this command opens the
        // device without one).
        backing.set_bus_master(true)?;
        let bar = backing.map_bar(0)?;
        let irq = &irqs[0];
        // Whatever an earlier user left raised is acknowledged first.
        let stale = bar.read32(EDU_IRQ_STATUS)?;
        if stale != 0 {
            bar.write32(EDU_IRQ_ACK, stale)?;
        }
        irq.take()?;
        irq.unmask()?;
        for i in 0..n {
            let value = 0x0001_0000 | (i + 1);
            let start = Instant::now();
            bar.write32(EDU_IRQ_RAISE, value)?;
            let arrived = irq.wait(Some(test.timeout))?;
            let us = start.elapsed().as_micros() as u64;
            let status = bar.read32(EDU_IRQ_STATUS)?;
            bar.write32(EDU_IRQ_ACK, status)?;
            if test.unmask {
                irq.unmask()?;
            }
            ok &= arrived;
            events.push(json!({
                "source": "edu", "n": i + 1, "vector": irq.vector(), "arrived": arrived,
                "us": us, "status": status, "unmasked": test.unmask,
            }));
        }
        drop(bar);
    }
    backing.disable_interrupts(kind)?;
    let report = json!({
        "address": address.to_string(),
        "kinds": kinds,
        "msix_resizable": dev.msix_resizable().ok(),
        "enabled": kind.name(),
        "vectors": irqs.len(),
        "events": events,
        "ok": ok,
    });
    drop(irqs);
    drop(backing);
    drop(dev);
    drop(claim);
    Ok(report)
}

pub(super) fn write_irq_test(out: &mut impl Write, v: &Value) -> io::Result<()> {
    write!(out, "{}", v["address"].as_str().unwrap_or("?"))?;
    for k in v["kinds"].as_array().into_iter().flatten() {
        write!(
            out,
            "  {} {}{}",
            k["kind"].as_str().unwrap_or("?"),
            k["count"],
            if k["maskable"] == json!(true) {
                " (maskable)"
            } else {
                ""
            }
        )?;
    }
    match v["msix_resizable"].as_bool() {
        Some(r) => writeln!(out, "  MSI-X resizable {r}")?,
        None => writeln!(out)?,
    }
    writeln!(
        out,
        "  enabled {}: {} vectors",
        v["enabled"].as_str().unwrap_or("?"),
        v["vectors"]
    )?;
    for e in v["events"].as_array().into_iter().flatten() {
        let what = match e["source"].as_str() {
            Some("edu") => format!("edu #{} vector {}", e["n"], e["vector"]),
            _ => format!("loopback vector {}", e["vector"]),
        };
        if e["arrived"] == json!(true) {
            write!(out, "  {what}: arrived after {} us", e["us"])?;
        } else {
            write!(out, "  {what}: did not arrive")?;
        }
        match e["status"].as_u64() {
            Some(s) => writeln!(out, " (status {s:#x})")?,
            None => writeln!(out)?,
        }
    }
    writeln!(
        out,
        "  {}",
        if v["ok"] == json!(true) {
            "ok"
        } else {
            "MISSING INTERRUPTS"
        }
    )
}

fn bar_json(info: &BarInfo) -> Value {
    json!({
        "index": info.index,
        "kind": info.kind.name(),
        "size": info.size,
        "prefetchable": info.prefetchable,
        "mmap": info.is_mappable(),
        "mmap_areas": info.mmap_areas.iter().map(|r| json!({"offset": r.start, "size": r.end - r.start})).collect::<Vec<_>>(),
    })
}

fn device_region_json(r: &DeviceRegion) -> Value {
    json!({
        "index": r.index, "size": r.size, "type": r.region_type, "subtype": r.subtype,
        "vendor": r.vendor(), "read": r.readable, "write": r.writable, "mmap": r.mappable,
    })
}

// `BAR2    io    size 0x20`, `BAR0    mem64 size 0x4000 mmap 0x0+0x2000 0x3000+0x1000`.
fn write_bar(out: &mut impl Write, b: &Value) -> io::Result<()> {
    if let Some(e) = b["error"].as_str() {
        return writeln!(out, "  BAR{}    {e}", b["index"]);
    }
    if b["kind"].as_str() == Some("absent") {
        return Ok(());
    }
    let areas: Vec<String> = b["mmap_areas"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|a| {
            format!(
                "{:#x}+{:#x}",
                a["offset"].as_u64().unwrap_or(0),
                a["size"].as_u64().unwrap_or(0)
            )
        })
        .collect();
    let size = b["size"].as_u64().unwrap_or(0);
    let mmap = match areas.as_slice() {
        [] => "no mmap (read/write calls)".to_owned(),
        [whole] if *whole == format!("0x0+{size:#x}") => "mmap".to_owned(),
        _ => format!("mmap {}", areas.join(" ")),
    };
    writeln!(
        out,
        "  BAR{}    {:<5} {}size {size:#x}  {mmap}",
        b["index"],
        b["kind"].as_str().unwrap_or("?"),
        if b["prefetchable"].as_bool() == Some(true) {
            "prefetchable "
        } else {
            ""
        },
    )
}

/// One `vfio regs` access: `BAR:OFFSET:WIDTH` reads, `BAR:OFFSET:WIDTH=VALUE` writes.
/// The command fails (after printing every outcome) if any access was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Access {
    bar: u32,
    offset: u64,
    bits: u32,
    value: Option<u64>,
}

fn number(s: &str) -> Result<u64, String> {
    let r = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => s.parse(),
    };
    r.map_err(|_| format!("{s:?} is not a number (decimal, or hex with 0x)"))
}

impl std::str::FromStr for Access {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (what, value) = match s.split_once('=') {
            Some((w, v)) => (w, Some(number(v)?)),
            None => (s, None),
        };
        let mut parts = what.split(':');
        let (Some(bar), Some(offset), Some(bits), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(format!(
                "{s:?}: expected BAR:OFFSET:WIDTH or BAR:OFFSET:WIDTH=VALUE"
            ));
        };
        let bar = number(bar)?;
        if bar > 5 {
            return Err(format!("{s:?}: BAR {bar} (0 to 5)"));
        }
        let bits = number(bits)?;
        if ![8, 16, 32, 64].contains(&bits) {
            return Err(format!("{s:?}: width {bits} bits (8, 16, 32 or 64)"));
        }
        if let Some(v) = value
            && bits < 64
            && v >> bits != 0
        {
            return Err(format!("{s:?}: {v:#x} does not fit in {bits} bits"));
        }
        Ok(Access {
            bar: bar as u32,
            offset: number(offset)?,
            bits: bits as u32,
            value,
        })
    }
}

/// `--window OFFSET+LEN`.
pub(super) fn parse_window(s: &str) -> Result<(u64, u64), String> {
    let (o, l) = s
        .split_once('+')
        .ok_or_else(|| format!("{s:?}: expected OFFSET+LEN"))?;
    Ok((number(o)?, number(l)?))
}

fn access(regs: &impl RegisterIo, a: &Access) -> Result<u64, pcibus::bus::BackingError> {
    match (a.bits, a.value) {
        (8, None) => regs.read8(a.offset).map(u64::from),
        (16, None) => regs.read16(a.offset).map(u64::from),
        (32, None) => regs.read32(a.offset).map(u64::from),
        (_, None) => regs.read64(a.offset),
        (8, Some(v)) => regs.write8(a.offset, v as u8).map(|()| v),
        (16, Some(v)) => regs.write16(a.offset, v as u16).map(|()| v),
        (32, Some(v)) => regs.write32(a.offset, v as u32).map(|()| v),
        (_, Some(v)) => regs.write64(a.offset, v).map(|()| v),
    }
}

// Does the accesses in order on BARs mapped (or windowed) through `VfioBacking`, as a
// driver's `map_bar`/`map_bar_range` would; each access's outcome is reported, a refused
// one included (an I/O BAR's 8-byte access, an offset outside the window).
pub(super) fn vfio_regs(
    root: &SysfsRoot,
    address: PciAddress,
    window: Option<(u64, u64)>,
    accesses: &[Access],
) -> Result<Value, Error> {
    use pcibus::vfio::{self, VfioDevice};
    // Claimed first, as `vfio info`: opening the device resets it.
    device_exists(root, address)?;
    let claim = ClaimDir::for_claiming().claim(address, &ClaimInfo::new())?;
    let container = vfio::Container::with_backend(vfio_backend())?;
    let dev = VfioDevice::open_in(root, address, &container)?;
    let backing = VfioBacking::new(Arc::clone(&dev));
    let mut mapped = BTreeMap::new();
    let mut results = Vec::new();
    for a in accesses {
        let bar = match mapped.entry(a.bar) {
            std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::btree_map::Entry::Vacant(e) => {
                let regs = match window {
                    Some((offset, len)) => backing.map_bar_range(a.bar, offset, len),
                    None => backing.map_bar(a.bar),
                }?;
                e.insert(regs)
            }
        };
        let outcome = access(bar, a);
        results.push(json!({
            "bar": a.bar, "offset": a.offset, "bits": a.bits, "write": a.value.is_some(),
            "io": bar.is_io(), "value": outcome.as_ref().ok(), "error": outcome.as_ref().err().map(|e| e.to_string()),
        }));
    }
    drop(mapped);
    drop(backing);
    drop(dev);
    drop(claim);
    Ok(json!({
        "address": address.to_string(),
        "window": window.map(|(o, l)| json!({"offset": o, "len": l})),
        "accesses": results,
    }))
}

// `BAR2+0x4 r32 0x80080783`, `BAR2+0x0 r64 refused: ...`.
pub(super) fn write_vfio_regs(out: &mut impl Write, v: &Value) -> io::Result<()> {
    for a in v["accesses"].as_array().into_iter().flatten() {
        let bits = a["bits"].as_u64().unwrap_or(0);
        let head = format!(
            "BAR{}+{:#x} {}{bits}{}",
            a["bar"],
            a["offset"].as_u64().unwrap_or(0),
            if a["write"].as_bool() == Some(true) {
                "w"
            } else {
                "r"
            },
            if a["io"].as_bool() == Some(true) {
                " (io)"
            } else {
                ""
            },
        );
        match (a["value"].as_u64(), a["error"].as_str()) {
            (Some(value), _) => writeln!(out, "{head} {value:#0width$x}", width = bits as usize / 4 + 2)?,
            (None, e) => writeln!(out, "{head} refused: {}", e.unwrap_or("?"))?,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accesses_parse_and_refuse_nonsense() {
        let a: Access = "2:0x4:32".parse().unwrap();
        assert_eq!(
            a,
            Access {
                bar: 2,
                offset: 4,
                bits: 32,
                value: None
            }
        );
        let a: Access = "0:8:16=0xbeef".parse().unwrap();
        assert_eq!(a.value, Some(0xbeef));
        for bad in [
            "6:0:32",
            "0:0:24",
            "0:0",
            "0:0:8=0x100",
            "0:x:8",
            "0:0:32:1",
            "0:0:64=z",
        ] {
            assert!(bad.parse::<Access>().is_err(), "{bad}");
        }
        assert_eq!(parse_window("0x1000+0x38").unwrap(), (0x1000, 0x38));
        assert!(parse_window("0x1000").is_err());
    }
}
