//! `pcibus list`: the table and the JSON array of scan records.

use super::*;

// Entries that are not devices, and devices that went away, go to stderr: the listing
// itself stays parseable.
pub(super) fn report_skipped(scan: &Scan) {
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

pub(super) fn names_for(devices: &[DeviceRecord]) -> Names {
    let ids = devices.iter().filter_map(|d| Some((d.vendor?, d.device?)));
    let classes = devices.iter().filter_map(|d| d.class);
    find_pci_ids()
        .and_then(|p| Names::lookup(&p, ids, classes).ok())
        .unwrap_or_default()
}

pub(super) fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| v.to_string())
}

pub(super) fn write_table(out: &mut impl Write, scan: &Scan) -> io::Result<()> {
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

pub(super) fn describe(names: &Names, d: &DeviceRecord) -> String {
    let class = d.class.and_then(|c| names.class(c)).unwrap_or("");
    let vendor = d.vendor.and_then(|v| names.vendor(v));
    let device = d.vendor.zip(d.device).and_then(|(v, dv)| names.device(v, dv));
    match (vendor, device) {
        (Some(v), Some(dv)) => format!("{class}: {v} {dv}"),
        (Some(v), None) => format!("{class}: {v} Device {}", opt(d.device)),
        _ => class.to_owned(),
    }
}

pub(super) fn device_json(d: &DeviceRecord) -> Value {
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
        "removal_pending": d.removal_pending.then_some(&d.removal_reasons),
        "problems": d.problems.iter().map(problem_json).collect::<Vec<_>>(),
    })
}

// `kind` and `errno` are for scripts: match on them, not on the message.
pub(super) fn problem_json(p: &Problem) -> Value {
    let kind = match &p.kind {
        ProblemKind::Parse(_) => "parse",
        ProblemKind::Io { .. } => "io",
        ProblemKind::TimedOut { .. } => "timed_out",
        ProblemKind::NotStarted { .. } => "not_started",
        ProblemKind::RemovalPending => "removal_pending",
        ProblemKind::HeldOpen => "held_open",
        ProblemKind::ConfigRestricted { .. } => "config_restricted",
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
pub(super) fn write_json_list(out: &mut impl Write, scan: &Scan) -> io::Result<()> {
    out.write_all(b"[")?;
    for (i, d) in scan.devices.iter().enumerate() {
        out.write_all(if i == 0 { b"\n  " } else { b",\n  " })?;
        serde_json::to_writer(&mut *out, &device_json(d))?;
    }
    out.write_all(if scan.devices.is_empty() { b"]\n" } else { b"\n]\n" })
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
