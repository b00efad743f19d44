//! `pcibus bind` and `unbind` of several devices at once, by address or by selector
//! (`-d VVVV:DDDD`, `--class 0108`, `--all-nvme`), as dpdk-devbind.py binds several: each
//! device is reported on its own line, one failure does not stop the others.

use clap::CommandFactory;
use clap::error::ErrorKind;

use pcibus::select::IdFilter;

use super::*;

/// NVMe controllers: mass storage, non-volatile memory, NVM Express.
pub(super) const NVME_CLASS: u32 = 0x010802;

fn hex_part<T>(
    s: &str,
    what: &str,
    parse: fn(&str, u32) -> Result<T, std::num::ParseIntError>,
) -> Result<Option<T>, String> {
    if s.is_empty() {
        return Ok(None);
    }
    if !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!("bad {what} {s:?}: not hex digits"));
    }
    parse(s, 16)
        .map(Some)
        .map_err(|e| format!("bad {what} {s:?}: {e}"))
}

/// Parses `-d`'s `[VVVV]:[DDDD][:CCCC]` with the library's parser, as `list -d` does.
fn parse_ids(s: &str) -> Result<IdFilter, String> {
    s.parse::<IdFilter>().map_err(|e| e.to_string())
}

/// A class code prefix: `CC` (base class), `CCSS` (and subclass) or `CCSSPP` (and
/// programming interface), hex.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct ClassMatch {
    value: u32,
    /// Bits of the 24-bit class code that must match.
    mask: u32,
}

/// Parses `--class`.
pub(super) fn parse_class(s: &str) -> Result<ClassMatch, String> {
    let shift = match s.len() {
        2 => 16,
        4 => 8,
        6 => 0,
        _ => {
            return Err(format!(
                "bad class {s:?}: expected 2, 4 or 6 hex digits (01, 0108, 010802)"
            ));
        }
    };
    let value = hex_part(s, "class", u32::from_str_radix)?.unwrap_or(0);
    Ok(ClassMatch {
        value: value << shift,
        mask: 0xff_ffff >> shift << shift,
    })
}

impl ClassMatch {
    pub(super) const NVME: ClassMatch = ClassMatch {
        value: NVME_CLASS,
        mask: 0xff_ffff,
    };

    pub(super) fn matches(&self, d: &DeviceRecord) -> bool {
        d.class.is_some_and(|c| c.value() & self.mask == self.value)
    }
}

/// Devices chosen by what they are, not by address.
#[derive(clap::Args, Clone, Default)]
pub(super) struct Selectors {
    /// Every device with these ids: [VVVV]:[DDDD][:CCCC] in hex, as lspci's -d (an empty
    /// part matches anything). Repeatable.
    #[arg(short = 'd', long = "device", value_name = "[VVVV]:[DDDD][:CCCC]", value_parser = parse_ids)]
    pub ids: Vec<IdFilter>,
    /// Every device of this class: CC, CCSS or CCSSPP in hex (0108: NVM controllers).
    /// Repeatable.
    #[arg(long, value_name = "CLASS", value_parser = parse_class)]
    pub class: Vec<ClassMatch>,
    /// Every NVMe controller (class 010802).
    #[arg(long)]
    pub all_nvme: bool,
}

impl Selectors {
    pub(super) fn any(&self) -> bool {
        !self.ids.is_empty() || !self.class.is_empty() || self.all_nvme
    }

    pub(super) fn matches(&self, d: &DeviceRecord) -> bool {
        self.ids.iter().any(|m| m.matches(d))
            || self.class.iter().any(|m| m.matches(d))
            || (self.all_nvme && ClassMatch::NVME.matches(d))
    }
}

/// The devices of `root` (a scan that reads only what takes no device lock).
pub(super) fn scan_devices(root: &SysfsRoot) -> Result<Vec<DeviceRecord>, Error> {
    let scan = Scanner::new(root.clone()).scan()?;
    report_skipped(&scan);
    Ok(scan.devices)
}

/// The explicit addresses and every device the selectors match, sorted, each once.
fn targets(root: &SysfsRoot, addresses: &[PciAddress], select: &Selectors) -> Result<Vec<PciAddress>, Error> {
    let mut all = addresses.to_vec();
    if select.any() {
        let found: Vec<PciAddress> = scan_devices(root)?
            .iter()
            .filter(|d| select.matches(d))
            .map(|d| d.address)
            .collect();
        if found.is_empty() && addresses.is_empty() {
            return Err(format!(
                "no device in {} matches the selectors",
                root.devices_dir().display()
            )
            .into());
        }
        all.extend(found);
    }
    all.sort();
    all.dedup();
    Ok(all)
}

/// Exits with a usage error (status 2), as clap does for its own.
pub(super) fn usage(msg: impl std::fmt::Display) -> ! {
    Cli::command().error(ErrorKind::ArgumentConflict, msg).exit()
}

pub(super) use pcibus::error::chain;

/// The arguments of `bind` besides its positional ones.
#[derive(clap::Args)]
pub(super) struct BindArgs {
    /// The driver; then every positional argument is a device.
    #[arg(long, value_name = "DRIVER")]
    pub driver: Option<String>,
    #[command(flatten)]
    pub select: Selectors,
    /// Take the devices even if the host uses them (an interface up, a mounted disk).
    #[arg(long)]
    pub force: bool,
}

/// `bind ADDRESS... DRIVER`, `bind --driver DRIVER ADDRESS...`, and either with selectors.
pub(super) fn bind(
    out: &mut impl Write,
    root: &SysfsRoot,
    args: &[String],
    opts: &BindArgs,
) -> Result<(), Error> {
    let (driver, addresses) = match &opts.driver {
        Some(d) => (d.clone(), args),
        None => match args.split_last() {
            None => usage("bind: no driver: give DRIVER last, or --driver DRIVER"),
            Some((last, _)) if last.parse::<PciAddress>().is_ok() => usage(format!(
                "bind: the last argument must be the driver, and {last:?} is a device address \
                 (give the driver last, or --driver DRIVER)"
            )),
            Some((last, rest)) => (last.clone(), rest),
        },
    };
    // A name no driver can have is the command line's fault, found before any device is
    // touched (the library's bind checks it too).
    if let Err(e) = pcibus::sysfs::bind::check_driver_name(&driver) {
        usage(format!("bind: {e}"));
    }
    let addresses = addresses
        .iter()
        .map(|a| {
            a.parse::<PciAddress>()
                .unwrap_or_else(|e| usage(format!("bind: bad device address {:?}: {e}", short(a))))
        })
        .collect::<Vec<_>>();
    if addresses.is_empty() && !opts.select.any() {
        usage("bind: no device: give addresses before the driver, or -d, --class, --all-nvme");
    }
    let devices = targets(root, &addresses, &opts.select)?;
    each(out, "bind", &devices, |out, address| {
        let b = pcibus::sysfs::bind::bind(root, address, &driver, opts.force)?;
        match &b.previous {
            Some(p) if *p == b.driver => writeln!(out, "{address}: already on {driver}")?,
            Some(p) => writeln!(out, "{address}: {p} -> {driver}")?,
            None => writeln!(out, "{address}: (none) -> {driver}")?,
        }
        Ok(())
    })
}

/// `unbind ADDRESS...`, or with selectors.
pub(super) fn unbind(
    out: &mut impl Write,
    root: &SysfsRoot,
    addresses: &[PciAddress],
    select: &Selectors,
    force: bool,
) -> Result<(), Error> {
    if addresses.is_empty() && !select.any() {
        usage("unbind: no device: give addresses, or -d, --class, --all-nvme");
    }
    let devices = targets(root, addresses, select)?;
    each(out, "unbind", &devices, |out, address| {
        match pcibus::sysfs::bind::unbind(root, address, force)? {
            Some(p) => writeln!(out, "{address}: unbound from {p}")?,
            None => writeln!(out, "{address}: was not bound")?,
        }
        Ok(())
    })
}

/// Runs `f` on every device; a failure is reported on stderr and the rest go on. One
/// device: its error is the command's. Several: the error names the ones that failed.
fn each<W: Write>(
    out: &mut W,
    what: &str,
    devices: &[PciAddress],
    mut f: impl FnMut(&mut W, PciAddress) -> Result<(), Error>,
) -> Result<(), Error> {
    if let [one] = devices {
        return f(out, *one);
    }
    let mut failed = Vec::new();
    for &address in devices {
        if let Err(e) = f(out, address) {
            // What succeeded so far comes first, in order.
            out.flush()?;
            if e.is::<io::Error>() {
                // Standard output failed (a bind's own errors are BindErrors): no point
                // going on.
                return Err(e);
            }
            eprintln!("pcibus: {}", about(address, e.as_ref()));
            failed.push(address.to_string());
        }
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{what} failed for {} of {} devices: {}",
            failed.len(),
            devices.len(),
            failed.join(", ")
        )
        .into())
    }
}

/// An error about `address` on one line, naming the device once.
pub(super) fn about(address: PciAddress, e: &dyn std::error::Error) -> String {
    let msg = chain(e);
    if msg.contains(&address.to_string()) {
        msg
    } else {
        format!("{address}: {msg}")
    }
}

/// `s`, or its start and length if it is long (a 100,000-character argument is not echoed
/// whole).
pub(super) fn short(s: &str) -> String {
    const MAX: usize = 64;
    match s.char_indices().nth(MAX) {
        Some((i, _)) => format!("{}... ({} bytes)", &s[..i], s.len()),
        None => s.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_classes_parse_as_lspci_writes_them() {
        let ids = parse_ids(":0010:0108").unwrap();
        assert_eq!((ids.vendor, ids.device), (None, Some(0x10)));
        for bad in ["8086", "zz:1", "1:2:3:4:5", "12345:1", "+1:1"] {
            assert!(parse_ids(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_class("01").unwrap().mask, 0xff0000);
        assert_eq!(parse_class("0108").unwrap().value, 0x010800);
        assert_eq!(parse_class("010802").unwrap(), ClassMatch::NVME);
        for bad in ["1", "010", "01080", "0108020", "01g8", "+108"] {
            assert!(parse_class(bad).is_err(), "{bad}");
        }
    }
}
