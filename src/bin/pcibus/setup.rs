//! `pcibus setup`: SPDK's `scripts/setup.sh` for NVMe. `config` binds every NVMe
//! controller the host does not use to vfio-pci (the in-use check of `bind` decides, and
//! an active one is skipped with the reason), `reset` gives them back to their kernel
//! driver, `status` shows them.
//!
//! Where the kernel driver is remembered: `config` writes, before it binds a device, the
//! name of the driver it was on to `SETUP_DIR/ADDRESS` (`/run/pcibus/setup` unless
//! `--setup-dir` or `$PCIBUS_SETUP_DIR` says otherwise; /run is emptied at boot, as the
//! bindings are). `reset` binds each device back to that driver, or, with no record (the
//! device was on vfio-pci before, or on no driver), to `nvme`, which is what the
//! device's modalias matches.

use std::path::Path;

use pcibus::sysfs::bind::{Binding, current_driver, in_use, on_userspace_driver, restore};

use super::devbind::{ClassMatch, about, scan_devices};
use super::*;

/// Where `config` records the drivers it took devices from.
pub(super) const DEFAULT_SETUP_DIR: &str = "/run/pcibus/setup";

/// The kernel driver of an NVMe controller.
const NVME_DRIVER: &str = "nvme";

/// What `setup` does.
#[derive(Clone, Copy, ValueEnum, PartialEq, Eq, Debug, Default)]
pub(super) enum Action {
    /// Bind the NVMe controllers the host does not use to the userspace driver.
    #[default]
    Config,
    /// Give them back to their kernel driver.
    Reset,
    /// Show them, as `pcibus status` does.
    Status,
}

/// The arguments of `setup`.
#[derive(clap::Args)]
pub(super) struct SetupArgs {
    /// config (default), reset or status.
    #[arg(value_enum, default_value_t)]
    pub action: Action,
    /// Only these devices (space-separated in $PCI_ALLOWED, as setup.sh). Repeatable.
    #[arg(
        short = 'a',
        long = "allow",
        value_name = "ADDRESS",
        env = "PCI_ALLOWED",
        value_delimiter = ' '
    )]
    pub allow: Vec<PciAddress>,
    /// Never these devices (space-separated in $PCI_BLOCKED). Repeatable.
    #[arg(
        short = 'b',
        long = "block",
        value_name = "ADDRESS",
        env = "PCI_BLOCKED",
        value_delimiter = ' '
    )]
    pub block: Vec<PciAddress>,
    /// The userspace driver `config` binds to.
    #[arg(long, default_value = "vfio-pci", value_name = "DRIVER")]
    pub driver: String,
    /// Where `config` records each device's kernel driver for `reset`.
    #[arg(long, value_name = "DIR", env = "PCIBUS_SETUP_DIR", default_value = DEFAULT_SETUP_DIR)]
    pub setup_dir: PathBuf,
    /// `status` as one JSON array (see `pcibus status --json`).
    #[arg(long)]
    pub json: bool,
}

impl SetupArgs {
    fn chosen(&self, address: PciAddress) -> Result<(), &'static str> {
        if self.block.contains(&address) {
            return Err("blocked (--block, PCI_BLOCKED)");
        }
        if !self.allow.is_empty() && !self.allow.contains(&address) {
            return Err("not allowed (--allow, PCI_ALLOWED)");
        }
        Ok(())
    }
}

/// The driver recorded for `address`, if a sane one is.
fn recorded(dir: &Path, address: PciAddress) -> Option<String> {
    let text = std::fs::read_to_string(dir.join(address.to_string())).ok()?;
    let name = text.trim();
    let sane =
        !name.is_empty() && !name.contains('/') && !name.bytes().all(|b| b == b'.') && name.len() <= 64;
    if sane {
        Some(name.to_owned())
    } else {
        eprintln!(
            "pcibus: ignoring {}: {:?} is not a driver name",
            dir.join(address.to_string()).display(),
            devbind::short(name)
        );
        None
    }
}

fn forget(dir: &Path, address: PciAddress) {
    let _ = std::fs::remove_file(dir.join(address.to_string()));
}

fn ids(d: &DeviceRecord) -> String {
    let hex = |v: Option<u16>| v.map_or_else(|| "????".to_owned(), |v| format!("{v:04x}"));
    format!("{} {}", hex(d.vendor.map(|v| v.0)), hex(d.device.map(|v| v.0)))
}

/// The devices `setup` manages: NVMe controllers, and devices it has a record of.
fn managed(root: &SysfsRoot, args: &SetupArgs) -> Result<Vec<DeviceRecord>, Error> {
    Ok(scan_devices(root)?
        .into_iter()
        .filter(|d| ClassMatch::NVME.matches(d) || recorded_quietly(&args.setup_dir, d.address))
        .collect())
}

fn recorded_quietly(dir: &Path, address: PciAddress) -> bool {
    dir.join(address.to_string()).is_file()
}

/// `pcibus setup`.
pub(super) fn setup(out: &mut impl Write, root: &SysfsRoot, args: &SetupArgs) -> Result<(), Error> {
    let devices = managed(root, args)?;
    let mut failed = Vec::new();
    match args.action {
        Action::Status => {
            let chosen = devices
                .into_iter()
                .filter(|d| args.chosen(d.address).is_ok())
                .collect();
            return status::write(out, &status::entries(root, chosen), args.json);
        }
        Action::Config => {
            for d in devices.iter().filter(|d| ClassMatch::NVME.matches(d)) {
                if let Err(e) = config_one(out, root, args, d) {
                    out.flush()?;
                    eprintln!("pcibus: {}", about(d.address, e.as_ref()));
                    failed.push(d.address.to_string());
                }
            }
        }
        Action::Reset => {
            for d in &devices {
                if let Err(e) = reset_one(out, root, args, d) {
                    out.flush()?;
                    eprintln!("pcibus: {}", about(d.address, e.as_ref()));
                    failed.push(d.address.to_string());
                }
            }
        }
    }
    if failed.is_empty() {
        Ok(())
    } else {
        let what = if args.action == Action::Reset {
            "reset"
        } else {
            "setup"
        };
        Err(format!("{what} failed for {}: {}", failed.len(), failed.join(", ")).into())
    }
}

fn config_one(
    out: &mut impl Write,
    root: &SysfsRoot,
    args: &SetupArgs,
    d: &DeviceRecord,
) -> Result<(), Error> {
    let address = d.address;
    if let Err(why) = args.chosen(address) {
        writeln!(out, "{address} ({}): skipped, {why}", ids(d))?;
        return Ok(());
    }
    let previous = current_driver(root, address);
    if previous.as_deref() == Some(args.driver.as_str()) {
        writeln!(out, "{address} ({}): already on {}", ids(d), args.driver)?;
        return Ok(());
    }
    let uses = in_use(root, address);
    if !uses.is_empty() {
        let uses: Vec<String> = uses.iter().map(ToString::to_string).collect();
        writeln!(
            out,
            "{address} ({}): Active devices: {}, so not binding PCI dev",
            ids(d),
            uses.join("; ")
        )?;
        return Ok(());
    }
    // Recorded first: a bind that is interrupted still leaves the way back. A device on
    // another userspace driver (uio) goes back to the kernel's, not to that.
    let record = previous
        .as_deref()
        .filter(|p| !on_userspace_driver(&root.device_dir(address), Some(p)));
    if let Some(p) = record {
        std::fs::create_dir_all(&args.setup_dir)
            .and_then(|()| std::fs::write(args.setup_dir.join(address.to_string()), format!("{p}\n")))
            .map_err(|e| {
                format!(
                    "cannot record its driver {p} in {} (so not binding it): {e}",
                    args.setup_dir.display()
                )
            })?;
    }
    match pcibus::sysfs::bind::bind(root, address, &args.driver, false) {
        Ok(b) => {
            let from = b.previous.as_deref().unwrap_or("no driver");
            writeln!(out, "{address} ({}): {from} -> {}", ids(d), args.driver)?;
            Ok(())
        }
        Err(e) => {
            // Rolled back (or the error says where it is): nothing to reset.
            if record.is_some() && current_driver(root, address) == previous {
                forget(&args.setup_dir, address);
            }
            Err(e.into())
        }
    }
}

fn reset_one(
    out: &mut impl Write,
    root: &SysfsRoot,
    args: &SetupArgs,
    d: &DeviceRecord,
) -> Result<(), Error> {
    let address = d.address;
    if let Err(why) = args.chosen(address) {
        writeln!(out, "{address} ({}): skipped, {why}", ids(d))?;
        return Ok(());
    }
    let target = recorded(&args.setup_dir, address).unwrap_or_else(|| NVME_DRIVER.to_owned());
    let now = current_driver(root, address);
    if now.as_deref() == Some(target.as_str()) {
        forget(&args.setup_dir, address);
        writeln!(out, "{address} ({}): already on {target}", ids(d))?;
        return Ok(());
    }
    if now.is_some() && !on_userspace_driver(&root.device_dir(address), now.as_deref()) {
        writeln!(
            out,
            "{address} ({}): on kernel driver {}, left as it is",
            ids(d),
            now.as_deref().unwrap_or_default()
        )?;
        return Ok(());
    }
    restore(
        root,
        &Binding {
            address,
            previous: Some(target.clone()),
            driver: now.clone().unwrap_or_default(),
        },
    )?;
    forget(&args.setup_dir, address);
    writeln!(
        out,
        "{address} ({}): {} -> {target}",
        ids(d),
        now.as_deref().unwrap_or("no driver")
    )?;
    Ok(())
}
