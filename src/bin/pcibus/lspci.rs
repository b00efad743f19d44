//! lspci's conventions on `list` and `show`: `-s`/`-d` selectors, `-k` kernel modules,
//! `list --tree`.

use std::path::PathBuf;

use pcibus::modules_alias::{self, ModuleAliases};
use pcibus::select::{IdFilter, SlotFilter};
use pcibus::sysfs::parse::{Modalias, format_modalias};

use super::*;
use crate::list::{write_json_list, write_table};
use crate::show::write_show;

/// `-s`, `-d`, `-k`: lspci's options, shared by `list` and `show`.
#[derive(clap::Args)]
pub(super) struct LspciArgs {
    /// Only devices at these slots, as lspci's -s: `[[[[DDDD]:]BB]:][SS][.[F]]`, hex;
    /// a part left out or `*` matches anything (`01:` bus 1, `.1` function 1 of every
    /// device, `0000:*:*.0`). Combines with -a/-b (a device must pass both).
    #[arg(short = 's', long = "slot", value_name = "[[[[DDDD]:]BB]:][SS][.[F]]")]
    pub slot: Option<SlotFilter>,
    /// Only devices with these ids, as lspci's -d: `[VVVV]:[DDDD][:CCCC[:PP]]` (vendor,
    /// device, class as base+subclass with `x` for any digit, prog-if), hex; a part left
    /// out or `*` matches anything (`8086:`, `::0108` NVMe, `::02xx` network).
    #[arg(short = 'd', long = "id", value_name = "[VVVV]:[DDDD][:CCCC[:PP]]")]
    pub id: Option<IdFilter>,
    /// Kernel driver in use and the kernel modules that could drive each device, as
    /// lspci -k: modules.alias patterns matched against the device's modalias.
    #[arg(short = 'k', long = "kernel")]
    pub kernel: bool,
    /// modules.alias to read for -k. Default: $PCIBUS_MODULES_ALIAS, else
    /// /lib/modules/$(uname -r)/modules.alias.
    #[arg(long, value_name = "FILE")]
    pub modules_alias: Option<PathBuf>,
}

impl LspciArgs {
    /// Whether -s and -d select `d`.
    pub fn selects(&self, d: &DeviceRecord) -> bool {
        self.slot.is_none_or(|s| s.matches(d)) && self.id.is_none_or(|i| i.matches(d))
    }

    /// Whether -s or -d was given.
    pub fn selecting(&self) -> bool {
        self.slot.is_some() || self.id.is_some()
    }

    /// The selectors as given, for messages.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(s) = &self.slot {
            parts.push(format!("-s {s}"));
        }
        if let Some(i) = &self.id {
            parts.push(format!("-d {i}"));
        }
        parts.join(" ")
    }

    /// modules.alias, when -k asked for it (or `always`); a missing or unreadable file is
    /// said once on stderr when -k was given, and gives no modules.
    pub fn aliases(&self, always: bool) -> Option<ModuleAliases> {
        if !self.kernel && !always {
            return None;
        }
        let path = self.modules_alias.clone().or_else(modules_alias::default_path);
        let read = path.as_ref().map(|p| (p, std::fs::read(p)));
        match read {
            Some((_, Ok(bytes))) => Some(ModuleAliases::parse(&bytes)),
            Some((p, Err(e))) => {
                if self.kernel {
                    eprintln!(
                        "pcibus: note: {}: {e}; kernel modules not shown (--modules-alias or ${} names another file)",
                        p.display(),
                        modules_alias::ENV
                    );
                }
                None
            }
            None => {
                if self.kernel {
                    eprintln!("pcibus: note: no kernel release known; kernel modules not shown");
                }
                None
            }
        }
    }
}

/// `list --tree`.
#[derive(clap::Args)]
pub(super) struct ListView {
    /// A tree of buses, bridges and devices as lspci -t draws it (from sysfs: a device's
    /// directory is under its parent bridge's). With -s/-d, the paths to the selected
    /// devices.
    #[arg(short = 't', long)]
    pub tree: bool,
}

/// The modalias of a scan record, from its ids (the kernel's `modalias` holds the same).
pub(super) fn modalias_of(d: &DeviceRecord) -> Option<String> {
    let m = Modalias {
        vendor: d.vendor?,
        device: d.device?,
        subsystem_vendor: d.subsystem_vendor?,
        subsystem_device: d.subsystem_device?,
        class: d.class?,
    };
    Some(format_modalias(&m).trim_end().to_owned())
}

/// lspci -k's lines: "Kernel driver in use" (when `driver` is given), "Kernel modules".
pub(super) fn write_kernel(
    out: &mut impl Write,
    indent: &str,
    driver: Option<&str>,
    modalias: Option<&str>,
    aliases: Option<&ModuleAliases>,
) -> io::Result<()> {
    if let Some(drv) = driver {
        writeln!(out, "{indent}Kernel driver in use: {drv}")?;
    }
    if let (Some(a), Some(m)) = (aliases, modalias) {
        let modules = a.modules_for(m);
        if !modules.is_empty() {
            writeln!(out, "{indent}Kernel modules: {}", modules.join(", "))?;
        }
    }
    Ok(())
}

/// `pcibus list`.
pub(super) fn run_list(
    out: &mut impl Write,
    root: SysfsRoot,
    json: bool,
    scan: ScanArgs,
    view: ListView,
) -> Result<Outcome, Error> {
    let scanner = scan.scanner(root)?;
    let mut result = scanner.scan()?;
    let sel = &scan.lspci;
    if view.tree {
        let done = outcome(result.devices.iter().flat_map(|d| &d.problems));
        let nodes = crate::tree::topology(scanner.root(), &result.devices);
        crate::tree::write_tree(out, &nodes, &|a| result.get(a).is_some_and(|d| sel.selects(d)))?;
        report_skipped(&result);
        return Ok(done);
    }
    result.devices.retain(|d| sel.selects(d));
    let done = outcome(result.devices.iter().flat_map(|d| &d.problems));
    if json {
        write_json_list(out, &result)?;
    } else {
        let aliases = sel.aliases(false);
        write_table(out, &result, sel.kernel.then_some(aliases.as_ref()))?;
    }
    report_skipped(&result);
    Ok(done)
}

/// `pcibus show`: one device by address, or every one -s/-d select.
pub(super) fn run_show(
    out: &mut impl Write,
    root: SysfsRoot,
    address: Option<PciAddress>,
    json: bool,
    scan: ScanArgs,
) -> Result<Outcome, Error> {
    // `show` wants everything; the blocking attributes are read through the guard.
    let mut scanner = BlockingAttr::ALL
        .into_iter()
        .fold(scan.scanner(root)?, Scanner::read_blocking);
    if let Some(a) = address {
        scanner = scanner.allow([a]);
    }
    let mut result = scanner.scan()?;
    let sel = &scan.lspci;
    result.devices.retain(|d| sel.selects(d));
    if result.devices.is_empty() {
        let what = match (address, sel.selecting()) {
            (Some(a), false) => format!("no device {a}"),
            (Some(a), true) => format!("no device {a} matching {}", sel.describe()),
            (None, _) => format!("no device matching {}", sel.describe()),
        };
        return Err(format!("{what} in {}", scanner.root().devices_dir().display()).into());
    }
    let aliases = sel.aliases(true);
    let mut done = Outcome::Complete;
    let many = address.is_none();
    if json && many {
        out.write_all(b"[")?;
    }
    let names = crate::list::names_for(&result.devices);
    for (i, dev) in result.devices.iter().enumerate() {
        let details = pcibus::sysfs::details::read(scanner.root(), dev);
        if let Outcome::Incomplete = outcome(dev.problems.iter().chain(&details.problems)) {
            done = Outcome::Incomplete;
        }
        if json {
            let v = pcibus::json::ShownDevice {
                device: pcibus::json::NamedRecord::new(dev, &names),
                details: &details,
            };
            if many {
                out.write_all(if i == 0 { b"\n" } else { b",\n" })?;
            }
            serde_json::to_writer_pretty(&mut *out, &v)?;
            if !many {
                writeln!(out)?;
            }
        } else {
            if i > 0 {
                writeln!(out)?;
            }
            write_show(out, dev, &details)?;
            let modalias = details.modalias.clone().or_else(|| modalias_of(dev));
            // `show` says the driver already.
            write_kernel(out, "  ", None, modalias.as_deref(), aliases.as_ref())?;
        }
    }
    if json && many {
        out.write_all(b"\n]\n")?;
    }
    Ok(done)
}
