//! `pcibus show`: everything about one device.

use super::*;
use crate::list::{describe, describe_subsystem, names_for, opt};

pub(super) fn write_show(
    out: &mut impl Write,
    d: &DeviceRecord,
    x: &pcibus::sysfs::details::Details,
) -> io::Result<()> {
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
        "  subsystem {}:{}{}",
        opt(d.subsystem_vendor),
        opt(d.subsystem_device),
        describe_subsystem(&names, d).map_or_else(String::new, |s| format!("  ({s})"))
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
            "  BAR{} {} at {:#x} size {:#x}{} [size={}]",
            b.index,
            b.kind,
            b.start,
            b.size,
            if b.prefetchable { " prefetchable" } else { "" },
            pcibus::capability::format_size(b.size)
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
        // Decoded as lspci -vv shows it, indented under the capability.
        if let Some(decoded) = x
            .config
            .as_deref()
            .and_then(|cfg| pcibus::capability::decode(cfg, c))
        {
            for line in decoded.to_string().lines() {
                writeln!(out, "      {line}")?;
            }
        }
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
        if c.id == pcibus::config::ext_cap_id::SRIOV
            && let Some(Ok(s)) = x.config.as_deref().and_then(pcibus::config::sriov_capability)
        {
            for line in pcibus::capability::SriovText(&s).to_string().lines() {
                writeln!(out, "      {line}")?;
            }
        }
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
        match d.removal_reasons.as_slice() {
            [] => writeln!(out, "  removal pending")?,
            reasons => writeln!(out, "  removal pending: {}", reasons.join("; "))?,
        }
    }
    for p in d.problems.iter().chain(&x.problems) {
        writeln!(out, "  problem: {p}")?;
    }
    Ok(())
}
