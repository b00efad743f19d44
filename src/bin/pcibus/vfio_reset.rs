//! `pcibus vfio reset`: how a device can be reset, and a reset: the function reset by the
//! kernel's method, or (`--hot`) the bus or slot hot reset, naming the devices it would
//! take with it.

use std::sync::Arc;

use pcibus::bus::claim::{ClaimDir, ClaimInfo};
use pcibus::bus::{DeviceBacking, HotResetOwner, OtherProcess, VfioBacking};

use super::*;

fn owner(o: HotResetOwner) -> Value {
    match o {
        HotResetOwner::Group(g) => json!({ "group": g }),
        HotResetOwner::DevId(d) => json!({ "devid": d }),
        HotResetOwner::Owned => json!("owned"),
        HotResetOwner::NotOwned => json!("not owned"),
    }
}

// `group 3`, `iommufd device 2`, `owned`, `not owned`: the owner as the text says it.
fn owner_text(v: &Value) -> String {
    if let Some(g) = v["group"].as_u64() {
        format!("group {g}")
    } else if let Some(d) = v["devid"].as_u64() {
        format!("iommufd device {d}")
    } else {
        v.as_str().unwrap_or("?").to_owned()
    }
}

fn process(p: &OtherProcess) -> Value {
    json!({ "pid": p.pid, "command": p.command })
}

// Everything gathered as JSON first, so text and JSON agree. `with`: other devices to
// claim and open in the same container first, so that a hot reset can take them along.
pub(super) fn vfio_reset(
    root: &SysfsRoot,
    address: PciAddress,
    with: &[PciAddress],
    hot: bool,
    dry_run: bool,
) -> Result<Value, Error> {
    use pcibus::vfio::{self, VfioDevice};
    // Claimed first, as `vfio info`: opening the device resets it (if it can).
    super::vfio::device_exists(root, address)?;
    for &other in with {
        super::vfio::device_exists(root, other)?;
    }
    let claims = ClaimDir::for_claiming();
    let claim = claims.claim(address, &ClaimInfo::new())?;
    let container = vfio::Container::with_backend(vfio_backend())?;
    let dev = VfioDevice::open_in(root, address, &container)?;
    // Held until the reset is done: claims, then the devices.
    let mut others = Vec::new();
    for &other in with.iter().filter(|&&a| a != address) {
        let claim = claims.claim(other, &ClaimInfo::new())?;
        let dev = VfioDevice::open_in(root, other, &container)?;
        others.push((claim, dev));
    }
    let backing = VfioBacking::new(Arc::clone(&dev));
    let info = backing.reset_info()?;
    let hot_info = backing.hot_reset_info();
    let mut v = json!({
        "address": address.to_string(),
        "backend": dev.backend().to_string(),
        "function_reset": info.function_reset,
        "methods": info.methods.as_ref().map(|m| m.iter().map(|m| m.name().to_owned()).collect::<Vec<_>>()),
        "summary": info.to_string(),
    });
    v["hot_reset"] = match &hot_info {
        Ok(h) => json!({
            "devices": h.devices.iter().map(|d| json!({"address": d.address.to_string(), "owner": owner(d.owner)})).collect::<Vec<_>>(),
            "also_resets": h.others(address).iter().map(|a| a.to_string()).collect::<Vec<_>>(),
            "all_owned": h.all_owned,
            "not_held": h.not_held.iter().map(|b| json!({
                "address": b.address.to_string(),
                "driver": b.driver,
                "on_vfio": b.on_vfio,
                "claimed_by": b.claimed_by.as_ref().map(process),
                "open_in": b.open_in.iter().map(process).collect::<Vec<_>>(),
                "reason": b.reason(),
            })).collect::<Vec<_>>(),
        }),
        Err(e) => json!({ "error": pcibus::error::chain(&e) }),
    };
    if !dry_run {
        let done = if hot {
            backing.hot_reset().map(|_| "hot reset")
        } else {
            backing.reset().map(|()| "function reset")
        };
        v["reset"] = match done {
            Ok(what) => json!({ "done": what }),
            Err(e) => json!({ "error": pcibus::error::chain(&e) }),
        };
    }
    drop(backing);
    drop(dev);
    drop(others);
    drop(claim);
    Ok(v)
}

// `0000:00:04.0: no function reset; a bus reset would also reset: 0000:00:05.0`.
pub(super) fn write_vfio_reset(out: &mut impl Write, v: &Value) -> io::Result<()> {
    let address = v["address"].as_str().unwrap_or("?");
    write!(out, "{address}: {}", v["summary"].as_str().unwrap_or("?"))?;
    match v["hot_reset"]["also_resets"].as_array() {
        Some(others) if others.is_empty() => writeln!(out, "; a bus reset would reset it alone")?,
        Some(others) => {
            let list: Vec<&str> = others.iter().filter_map(Value::as_str).collect();
            writeln!(out, "; a bus reset would also reset: {}", list.join(", "))?;
        }
        None => writeln!(
            out,
            "; no bus reset: {}",
            v["hot_reset"]["error"].as_str().unwrap_or("?")
        )?,
    }
    if let Some(devices) = v["hot_reset"]["devices"].as_array() {
        let not_held = v["hot_reset"]["not_held"].as_array();
        for d in devices {
            let address = d["address"].as_str().unwrap_or("?");
            write!(out, "  hot reset affects {address} ({})", owner_text(&d["owner"]))?;
            match not_held.and_then(|n| n.iter().find(|b| b["address"].as_str() == Some(address))) {
                Some(b) => writeln!(out, ": not held here: {}", b["reason"].as_str().unwrap_or("?"))?,
                None => writeln!(out)?,
            }
        }
    }
    match (&v["reset"]["done"], &v["reset"]["error"]) {
        (Value::String(done), _) => writeln!(out, "  {done}: done")?,
        (_, Value::String(e)) => writeln!(out, "  reset refused: {e}")?,
        _ => {}
    }
    Ok(())
}
