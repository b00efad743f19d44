//! `pcibus vfio info`: what VFIO reports about one device.

use pcibus::bus::claim::{ClaimDir, ClaimInfo};

use super::*;

// Everything `vfio info` reports, gathered as JSON first so text and JSON agree.
pub(super) fn vfio_info(root: &SysfsRoot, address: PciAddress) -> Result<Value, Error> {
    use pcibus::vfio::{self, VfioDevice, irq, region_flags};
    // Opening the device resets it: not under the feet of another owner (a pcibus
    // process, or SPDK), who is named in the refusal. Claimed before anything else, as
    // the bus does; dropped after the device is closed (the end of this function, or an
    // early return: `dev` is declared later, so it is dropped first).
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
    let info = json!({
        "address": address.to_string(),
        "backend": dev.backend().name(),
        "ioas": dev.container().ioas_id(),
        "group": group,
        "viable": culprits.is_empty(),
        "regions": regions,
        "irqs": irqs,
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
