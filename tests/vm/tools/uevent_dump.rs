//! `uevent_dump`: the kernel's uevents through [`UeventMonitor`], on a real kernel.
//!
//! ```text
//! uevent_dump dump [SECONDS]   print every kernel uevent (escaped bytes) for SECONDS (10)
//! uevent_dump                  the VM test: see below
//! ```
//!
//! Run without arguments (as `tests/vm/run -e uevent_dump` installs it in the guest), it is
//! the hotplug monitor's VM test: while the monitor listens it removes the NVMe controller
//! through sysfs `remove`, brings it back with `rescan`, unbinds and rebinds `nvme`, and on
//! the `sriov` profile enables and disables 2 VFs. Each expected event (remove, add,
//! unbind, bind, VF add/remove, with the right `PCI_SLOT_NAME`) must be received within
//! 100 ms of the sysfs write returning. Every datagram is printed as escaped bytes
//! (`uevent: "..."`): the recorded samples of `src/hotplug/event.rs` come from there.
//! Exit 0 passes, 1 fails, 77 skips (no NVMe controller).

use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use pcibus::PciAddress;
use pcibus::hotplug::event::{Action, Uevent, escape_bytes};
use pcibus::hotplug::monitor::{Event, UeventMonitor};

/// How long after a sysfs write returns its event may take to arrive.
const DEADLINE: Duration = Duration::from_millis(100);

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("dump") => {
            let secs = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(10);
            dump(Duration::from_secs(secs))
        }
        None => match vm_test() {
            Ok(code) => code,
            Err(e) => {
                println!("FAIL: {e}");
                ExitCode::FAILURE
            }
        },
        Some(other) => {
            eprintln!("usage: uevent_dump [dump [SECONDS]] (unknown argument {other:?})");
            ExitCode::from(2)
        }
    }
}

fn print_event(ev: &Uevent) {
    println!("uevent: \"{}\"", escape_bytes(&ev.to_bytes()));
}

fn dump(time: Duration) -> ExitCode {
    let mut mon = match UeventMonitor::open() {
        Ok(m) => m,
        Err(e) => {
            eprintln!("uevent_dump: {e}: {:?}", std::error::Error::source(&e));
            return ExitCode::FAILURE;
        }
    };
    let end = Instant::now() + time;
    while let Some(left) = end.checked_duration_since(Instant::now()) {
        match mon.next_timeout(left) {
            Ok(Some(Event::Uevent(ev))) => print_event(&ev),
            Ok(Some(Event::Overflow)) => println!("overflow: events lost"),
            Ok(None) => break,
            Err(e) => {
                eprintln!("uevent_dump: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    ExitCode::SUCCESS
}

fn write(path: &str, value: &str) -> Result<Duration, String> {
    let t = Instant::now();
    std::fs::write(path, value).map_err(|e| format!("write {value:?} to {path}: {e}"))?;
    Ok(t.elapsed())
}

/// The NVMe controller (class 0x010802) that is not a VF.
fn nvme_pf() -> Option<String> {
    let mut found: Vec<String> = std::fs::read_dir("/sys/bus/pci/devices")
        .ok()?
        .flatten()
        .filter(|e| {
            let p = e.path();
            std::fs::read_to_string(p.join("class")).is_ok_and(|c| c.trim() == "0x010802")
                && !p.join("physfn").exists()
        })
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    found.sort();
    found.into_iter().next()
}

fn driver_of(addr: &str) -> Option<String> {
    let l = std::fs::read_link(format!("/sys/bus/pci/devices/{addr}/driver")).ok()?;
    Some(l.file_name()?.to_string_lossy().into_owned())
}

fn wait_until(what: &str, secs: u64, mut cond: impl FnMut() -> bool) -> Result<(), String> {
    let end = Instant::now() + Duration::from_secs(secs);
    while !cond() {
        if Instant::now() > end {
            return Err(format!("{what}: not after {secs} s"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

struct Checker {
    mon: UeventMonitor,
    kernel: String,
}

impl Checker {
    /// Prints and drops what is queued (events of earlier steps).
    fn drain(&mut self) -> Result<(), String> {
        while let Some(ev) = self.mon.try_next().map_err(|e| e.to_string())? {
            match ev {
                Event::Uevent(ev) => print_event(&ev),
                Event::Overflow => return Err("overflow while draining".into()),
            }
        }
        Ok(())
    }

    /// Writes `value` to `path`, then expects a `pci` event `action` for each address in
    /// `addrs` (with `DRIVER=driver`, if given; the kernel sends `unbind` after the driver
    /// is gone, without `DRIVER`) no later than [`DEADLINE`] after the write
    /// returned.
    fn step(
        &mut self,
        name: &str,
        path: &str,
        value: &str,
        action: Action,
        addrs: &[PciAddress],
        driver: Option<&str>,
    ) -> Result<(), String> {
        self.drain()?;
        let write_time = write(path, value)?;
        let returned = Instant::now();
        let mut missing: Vec<PciAddress> = addrs.to_vec();
        while !missing.is_empty() {
            let left = (returned + DEADLINE).saturating_duration_since(Instant::now());
            let ev = match self.mon.next_timeout(left).map_err(|e| e.to_string())? {
                Some(Event::Uevent(ev)) => ev,
                Some(Event::Overflow) => return Err(format!("{name}: overflow")),
                None => {
                    return Err(format!(
                        "{name}: no {action} event for {missing:?} within {DEADLINE:?} of the write returning"
                    ));
                }
            };
            print_event(&ev);
            if !ev.is_pci() || ev.action != action {
                continue;
            }
            let Some(a) = ev.pci_slot_name else {
                return Err(format!(
                    "{name}: pci event without PCI_SLOT_NAME: {:?}",
                    ev.devpath
                ));
            };
            if ev.pci_address() != Some(a) {
                return Err(format!(
                    "{name}: DEVPATH {} disagrees with PCI_SLOT_NAME {a}",
                    ev.devpath
                ));
            }
            if let Some(d) = driver
                && ev.driver.as_deref() != Some(d)
            {
                return Err(format!("{name}: DRIVER {:?}, want {d}", ev.driver));
            }
            if let Some(i) = missing.iter().position(|m| *m == a) {
                missing.remove(i);
                let after = returned.elapsed();
                println!(
                    "@@PCIBUS-MEASURE kernel={} step={name} addr={a} write_ms={} event_after_return_ms={}",
                    self.kernel,
                    write_time.as_millis(),
                    after.as_millis()
                );
            }
        }
        Ok(())
    }
}

fn vm_test() -> Result<ExitCode, String> {
    let kernel = std::env::var("PCIBUS_KERNEL").unwrap_or_else(|_| "?".into());
    let profile = std::env::var("PCIBUS_PROFILE").unwrap_or_default();
    let Some(pf) = nvme_pf() else {
        println!("skip: no NVMe controller");
        return Ok(ExitCode::from(77));
    };
    let addr = PciAddress::parse_strict(&pf).map_err(|e| e.to_string())?;
    wait_until("PF bound to nvme at start", 10, || {
        driver_of(&pf).as_deref() == Some("nvme")
    })?;
    let mon = UeventMonitor::open().map_err(|e| format!("{e}: {:?}", std::error::Error::source(&e)))?;
    let mut c = Checker { mon, kernel };
    let dev = format!("/sys/bus/pci/devices/{pf}");
    let nvme_ready = || std::fs::read_dir("/sys/class/nvme").is_ok_and(|mut d| d.next().is_some());

    c.step(
        "remove",
        &format!("{dev}/remove"),
        "1",
        Action::Remove,
        &[addr],
        None,
    )?;
    c.step("rescan", "/sys/bus/pci/rescan", "1", Action::Add, &[addr], None)?;
    wait_until("nvme bound after rescan", 10, || {
        driver_of(&pf).as_deref() == Some("nvme")
    })?;
    wait_until("nvme controller after rescan", 20, nvme_ready)?;
    c.step(
        "unbind",
        "/sys/bus/pci/drivers/nvme/unbind",
        &pf,
        Action::Unbind,
        &[addr],
        None,
    )?;
    c.step(
        "bind",
        "/sys/bus/pci/drivers/nvme/bind",
        &pf,
        Action::Bind,
        &[addr],
        Some("nvme"),
    )?;
    wait_until("nvme controller after bind", 20, nvme_ready)?;

    if profile == "sriov" && Path::new(&format!("{dev}/sriov_totalvfs")).exists() {
        // QEMU's VFs are offline until configured through the PF: keep drivers away.
        write(&format!("{dev}/sriov_drivers_autoprobe"), "0")?;
        let vfs: Vec<PciAddress> = (1..=2)
            .map(|f| PciAddress::parse_strict(&format!("{}.{f}", &pf[..pf.len() - 2])))
            .collect::<Result<_, _>>()
            .map_err(|e| e.to_string())?;
        let r = c.step(
            "sriov-enable",
            &format!("{dev}/sriov_numvfs"),
            "2",
            Action::Add,
            &vfs,
            None,
        );
        let r2 = c.step(
            "sriov-disable",
            &format!("{dev}/sriov_numvfs"),
            "0",
            Action::Remove,
            &vfs,
            None,
        );
        write(&format!("{dev}/sriov_drivers_autoprobe"), "1")?;
        r.and(r2)?;
    }
    c.drain()?;
    println!("skipped: {:?}", c.mon.skipped());
    Ok(ExitCode::SUCCESS)
}
