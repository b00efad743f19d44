//! `pcibus status`: the devices grouped by how they are driven, as `dpdk-devbind.py
//! --status` shows them: on a userspace driver (vfio-pci, uio), on a kernel driver, on
//! none; with their interfaces, disks, the userspace drivers they could use, and
//! `*Active*` for those the host uses (the check `bind` refuses them with).

use pcibus::sysfs::bind::{UIO_DRIVERS, disks, in_use, interfaces, on_userspace_driver};
use pcibus::{ClassCode, DeviceId, VendorId};

use super::devbind::{NVME_CLASS, Selectors};
use super::list::names_for;
use super::*;

/// Kinds of devices, by class, as dpdk-devbind's `--status-dev`.
#[derive(Clone, Copy, ValueEnum, PartialEq, Eq, Debug)]
pub(super) enum Kind {
    /// Network controllers (class 02).
    Net,
    /// Mass storage controllers (class 01).
    Storage,
    /// NVMe controllers (class 010802).
    Nvme,
    /// Encryption controllers (class 10) and co-processors (0b40, e.g. Intel QAT).
    Crypto,
    /// DMA engines (system peripherals, class 0880: Intel IOAT, DSA).
    Dma,
    /// Processing accelerators (class 12).
    Accel,
}

impl Kind {
    fn matches(self, d: &DeviceRecord) -> bool {
        let Some(c) = d.class else {
            return false;
        };
        match self {
            Kind::Net => c.base() == 0x02,
            Kind::Storage => c.base() == 0x01,
            Kind::Nvme => c.value() == NVME_CLASS,
            Kind::Crypto => c.base() == 0x10 || (c.base(), c.sub()) == (0x0b, 0x40),
            Kind::Dma => (c.base(), c.sub()) == (0x08, 0x80),
            Kind::Accel => c.base() == 0x12,
        }
    }
}

/// The arguments of `status`.
#[derive(clap::Args)]
pub(super) struct StatusArgs {
    /// Only devices of this kind (as dpdk-devbind's --status-dev). Repeatable.
    #[arg(long, value_enum, value_name = "KIND")]
    pub kind: Vec<Kind>,
    #[command(flatten)]
    pub select: Selectors,
    /// One JSON array, one object per device, sorted by address: address, vendor, device,
    /// class (lowercase hex strings), vendor_name, device_name, driver, group
    /// ("userspace", "kernel" or "none"), unused, interfaces, disks, active, uses
    /// (`status` in schema/pcibus-v1.schema.json).
    #[arg(long)]
    pub json: bool,
}

impl StatusArgs {
    fn wants(&self, d: &DeviceRecord) -> bool {
        (self.kind.is_empty() && !self.select.any())
            || self.kind.iter().any(|k| k.matches(d))
            || self.select.matches(d)
    }
}

/// How a device is driven (`group` in the JSON: "userspace", "kernel", "none").
#[derive(Clone, Copy, PartialEq, Eq, Debug, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum Group {
    /// vfio-pci (or a variant), uio_pci_generic, igb_uio: a userspace driver can have it.
    Userspace,
    /// Any other driver: the kernel drives it.
    Kernel,
    /// No driver.
    None,
}

impl Group {
    fn heading(self) -> &'static str {
        match self {
            Group::Userspace => "Devices using a userspace driver (DPDK/SPDK-compatible)",
            Group::Kernel => "Devices using a kernel driver",
            Group::None => "Devices using no driver",
        }
    }
}

/// One device as `status` shows it.
pub(super) struct Entry {
    record: DeviceRecord,
    group: Group,
    /// Userspace drivers that are loaded and that the device is not on.
    unused: Vec<String>,
    interfaces: Vec<String>,
    disks: Vec<String>,
    /// How the host uses it (empty: not in use), as `bind` would refuse it.
    uses: Vec<String>,
}

/// The entries of `devices` (in their order).
pub(super) fn entries(root: &SysfsRoot, devices: Vec<DeviceRecord>) -> Vec<Entry> {
    let loaded: Vec<&str> = ["vfio-pci"]
        .into_iter()
        .chain(UIO_DRIVERS)
        .filter(|d| root.path().join("bus/pci/drivers").join(d).is_dir())
        .collect();
    devices
        .into_iter()
        .map(|record| {
            let address = record.address;
            let driver = record.driver.as_deref();
            let group = match driver {
                None => Group::None,
                Some(_) if on_userspace_driver(&root.device_dir(address), driver) => Group::Userspace,
                Some(_) => Group::Kernel,
            };
            Entry {
                group,
                unused: loaded
                    .iter()
                    .filter(|d| Some(**d) != driver)
                    .map(|d| (*d).to_owned())
                    .collect(),
                interfaces: interfaces(root, address),
                disks: disks(root, address),
                uses: in_use(root, address).iter().map(ToString::to_string).collect(),
                record,
            }
        })
        .collect()
}

/// `pcibus status`.
pub(super) fn status(out: &mut impl Write, root: &SysfsRoot, args: &StatusArgs) -> Result<(), Error> {
    let devices = devbind::scan_devices(root)?
        .into_iter()
        .filter(|d| args.wants(d))
        .collect();
    write(out, &entries(root, devices), args.json)
}

/// The entries as text, grouped, or as one JSON array.
pub(super) fn write(out: &mut impl Write, entries: &[Entry], json: bool) -> Result<(), Error> {
    let records: Vec<DeviceRecord> = entries.iter().map(|e| e.record.clone()).collect();
    let names = names_for(&records);
    if json {
        let list: Vec<EntryJson<'_>> = entries.iter().map(|e| EntryJson::new(&names, e)).collect();
        serde_json::to_writer_pretty(&mut *out, &list)?;
        writeln!(out)?;
        return Ok(());
    }
    let mut first = true;
    for group in [Group::Userspace, Group::Kernel, Group::None] {
        let members: Vec<&Entry> = entries.iter().filter(|e| e.group == group).collect();
        if members.is_empty() {
            continue;
        }
        if !first {
            writeln!(out)?;
        }
        first = false;
        writeln!(out, "{}", group.heading())?;
        writeln!(out, "{}", "=".repeat(group.heading().len()))?;
        for e in members {
            writeln!(out, "{}", line(&names, e))?;
        }
    }
    if first {
        writeln!(out, "No devices")?;
    }
    Ok(())
}

fn hex4(v: Option<u16>) -> String {
    v.map_or_else(|| "????".to_owned(), |v| format!("{v:04x}"))
}

// `0000:01:00.0 'NVMe SSD Controller 1b36:0010' block=nvme0n1 drv=nvme unused=vfio-pci *Active*`
fn line(names: &Names, e: &Entry) -> String {
    let d = &e.record;
    let name = d
        .vendor
        .zip(d.device)
        .and_then(|(v, dv)| names.device(v, dv))
        .unwrap_or("Device");
    let mut s = format!(
        "{} '{name} {}:{}'",
        d.address,
        hex4(d.vendor.map(|v| v.0)),
        hex4(d.device.map(|v| v.0))
    );
    if !e.interfaces.is_empty() {
        s.push_str(&format!(" if={}", e.interfaces.join(",")));
    }
    if !e.disks.is_empty() {
        s.push_str(&format!(" block={}", e.disks.join(",")));
    }
    if let Some(drv) = &d.driver {
        s.push_str(&format!(" drv={drv}"));
    }
    if !e.unused.is_empty() {
        s.push_str(&format!(" unused={}", e.unused.join(",")));
    }
    if !e.uses.is_empty() {
        s.push_str(" *Active*");
    }
    s
}

/// One device of `status --json` and `setup status --json`: the schema's `status_entry`
/// (schema/pcibus-v1.schema.json). Ids, class and address serialize as in `list --json`
/// (the library's serde representation), names are pci.ids names as in its device objects.
#[derive(serde::Serialize)]
struct EntryJson<'a> {
    address: PciAddress,
    vendor: Option<VendorId>,
    device: Option<DeviceId>,
    class: Option<ClassCode>,
    vendor_name: Option<&'a str>,
    device_name: Option<&'a str>,
    driver: Option<&'a str>,
    group: Group,
    unused: &'a [String],
    interfaces: &'a [String],
    disks: &'a [String],
    active: bool,
    uses: &'a [String],
}

impl<'a> EntryJson<'a> {
    fn new(names: &'a Names, e: &'a Entry) -> Self {
        let d = &e.record;
        EntryJson {
            address: d.address,
            vendor: d.vendor,
            device: d.device,
            class: d.class,
            vendor_name: d.vendor.and_then(|v| names.vendor(v)),
            device_name: d.vendor.zip(d.device).and_then(|(v, dv)| names.device(v, dv)),
            driver: d.driver.as_deref(),
            group: e.group,
            unused: &e.unused,
            interfaces: &e.interfaces,
            disks: &e.disks,
            active: !e.uses.is_empty(),
            uses: &e.uses,
        }
    }
}
