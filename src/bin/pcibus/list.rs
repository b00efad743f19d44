//! `pcibus list`: the table and the JSON array of scan records.

use super::*;
use pcibus::json::NamedRecord;
use pcibus::{DeviceId, VendorId};

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
    find_pci_ids()
        .and_then(|p| Names::lookup_records(&p, devices).ok())
        .unwrap_or_default()
}

pub(super) fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| v.to_string())
}

/// The table; with `kernel` (-k), lspci -k's lines after each device (modules when
/// modules.alias was read).
pub(super) fn write_table(
    out: &mut impl Write,
    scan: &Scan,
    kernel: Option<Option<&pcibus::modules_alias::ModuleAliases>>,
) -> io::Result<()> {
    let names = names_for(&scan.devices);
    writeln!(
        out,
        "{:<13} {:<9} {:<3} {:<6} {:<9} {:<14} {:>4} {:>5}  DESCRIPTION",
        "ADDRESS", "ID", "REV", "CLASS", "SUBSYSTEM", "DRIVER", "NUMA", "IOMMU"
    )?;
    for d in &scan.devices {
        let pair = |a: Option<VendorId>, b: Option<DeviceId>| match (a, b) {
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
            "{:<13} {:<9} {:<3} {:<6} {:<9} {:<14} {:>4} {:>5}  {desc}",
            d.address.to_string(),
            pair(d.vendor, d.device),
            d.revision.map_or_else(|| "-".into(), |r| format!("{r:02x}")),
            // All 24 bits, as the JSON and `show` have it.
            opt(d.class),
            pair(d.subsystem_vendor, d.subsystem_device),
            d.driver.as_deref().unwrap_or("-"),
            opt(d.numa_node),
            opt(d.iommu_group),
        )?;
        if let Some(aliases) = kernel {
            let modalias = crate::lspci::modalias_of(d);
            crate::lspci::write_kernel(out, "\t", d.driver.as_deref(), modalias.as_deref(), aliases)?;
        }
    }
    Ok(())
}

/// The subsystem as lspci -v's "Subsystem:" names it: the subsystem vendor's name and the
/// subsystem's (`Names::subsystem_name`); "VENDOR Device SSSS" without the latter,
/// "Device VVVV:SSSS" without the vendor's.
pub(super) fn describe_subsystem(names: &Names, d: &DeviceRecord) -> Option<String> {
    let (sv, sd) = (d.subsystem_vendor?, d.subsystem_device?);
    let name = d
        .vendor
        .zip(d.device)
        .and_then(|(v, dv)| names.subsystem_name(v, dv, sv, sd));
    Some(match (names.vendor(sv), name) {
        (Some(vendor), Some(name)) => format!("{vendor} {name}"),
        (Some(vendor), None) => format!("{vendor} Device {sd}"),
        (None, _) => format!("Device {sv}:{sd}"),
    })
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

// Streams the array so memory stays flat however many devices there are. Each device is
// the library's `NamedRecord`: the schema's `device` (schema/pcibus-v1.schema.json).
pub(super) fn write_json_list(out: &mut impl Write, scan: &Scan) -> io::Result<()> {
    let names = names_for(&scan.devices);
    out.write_all(b"[")?;
    for (i, d) in scan.devices.iter().enumerate() {
        out.write_all(if i == 0 { b"\n  " } else { b",\n  " })?;
        serde_json::to_writer(&mut *out, &NamedRecord::new(d, &names))?;
    }
    out.write_all(if scan.devices.is_empty() { b"]\n" } else { b"\n]\n" })
}

#[cfg(test)]
mod tests {
    use super::*;
    use pcibus::ClassCode;

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
