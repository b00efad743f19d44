//! Vendor, device and class names from the system's `pci.ids`.
//!
//! The file is 1.3 MB; a listing needs a few dozen of its names. [`Names::lookup`] reads it
//! once, line by line, and keeps only the names asked for.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, BufRead};
use std::path::{Path, PathBuf};

use crate::{ClassCode, DeviceId, DeviceRecord, VendorId};

/// Where distributions install `pci.ids`, in the order lspci looks.
pub const PCI_IDS_PATHS: [&str; 4] = [
    "/usr/share/misc/pci.ids",
    "/usr/share/hwdata/pci.ids",
    "/usr/share/pci.ids",
    "/usr/local/share/pci.ids",
];

/// The first `pci.ids` that exists, if any.
pub fn find_pci_ids() -> Option<PathBuf> {
    PCI_IDS_PATHS.iter().map(PathBuf::from).find(|p| p.is_file())
}

/// The names found for a set of ids and classes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Names {
    vendors: BTreeMap<u16, String>,
    devices: BTreeMap<(u16, u16), String>,
    classes: BTreeMap<u8, String>,
    subclasses: BTreeMap<(u8, u8), String>,
    prog_ifs: BTreeMap<u32, String>,
    subsystems: BTreeMap<(u16, u16, u16, u16), String>,
}

// What a lookup keeps.
#[derive(Default)]
struct Wanted {
    vendors: BTreeSet<u16>,
    ids: BTreeSet<(u16, u16)>,
    subsystems: BTreeSet<(u16, u16, u16, u16)>,
    // 24-bit class codes.
    classes: BTreeSet<u32>,
}

impl Wanted {
    fn device(&mut self, v: VendorId, d: DeviceId) {
        self.vendors.insert(v.0);
        self.ids.insert((v.0, d.0));
    }
}

impl Names {
    /// Reads `pci.ids` at `path`, keeping the names of these (vendor, device) pairs and of
    /// these classes.
    pub fn lookup(
        path: &Path,
        ids: impl IntoIterator<Item = (VendorId, DeviceId)>,
        classes: impl IntoIterator<Item = ClassCode>,
    ) -> io::Result<Names> {
        let file = std::fs::File::open(path)?;
        Names::from_reader(io::BufReader::new(file), ids, classes)
    }

    /// As [`Names::lookup`], from any reader of `pci.ids` text.
    pub fn from_reader(
        reader: impl BufRead,
        ids: impl IntoIterator<Item = (VendorId, DeviceId)>,
        classes: impl IntoIterator<Item = ClassCode>,
    ) -> io::Result<Names> {
        let mut want = Wanted::default();
        for (v, d) in ids {
            want.device(v, d);
        }
        for c in classes {
            want.classes.insert(c.value());
        }
        Names::read(reader, &want)
    }

    /// Reads `pci.ids` at `path`, keeping every name these devices need: vendor, device,
    /// subsystem vendor, subsystem, class, subclass and programming interface.
    pub fn lookup_records(path: &Path, records: &[DeviceRecord]) -> io::Result<Names> {
        let file = std::fs::File::open(path)?;
        Names::from_reader_records(io::BufReader::new(file), records)
    }

    /// As [`Names::lookup_records`], from any reader of `pci.ids` text.
    pub fn from_reader_records(reader: impl BufRead, records: &[DeviceRecord]) -> io::Result<Names> {
        let mut want = Wanted::default();
        for d in records {
            if let (Some(v), Some(dv)) = (d.vendor, d.device) {
                want.device(v, dv);
                if let (Some(sv), Some(sd)) = (d.subsystem_vendor, d.subsystem_device) {
                    want.vendors.insert(sv.0);
                    want.subsystems.insert((v.0, dv.0, sv.0, sd.0));
                }
            }
            if let Some(c) = d.class {
                want.classes.insert(c.value());
            }
        }
        Names::read(reader, &want)
    }

    fn read(mut reader: impl BufRead, want: &Wanted) -> io::Result<Names> {
        let bases: BTreeSet<u8> = want.classes.iter().map(|c| (c >> 16) as u8).collect();
        let subclasses: BTreeSet<(u8, u8)> = want
            .classes
            .iter()
            .map(|c| ((c >> 16) as u8, (c >> 8) as u8))
            .collect();
        let mut names = Names::default();
        // The section we are in: a vendor (Some) or a class (base class), and the device
        // or subclass line last seen in it (for the third level).
        let mut vendor: Option<u16> = None;
        let mut device: Option<u16> = None;
        let mut class: Option<u8> = None;
        let mut subclass: Option<u8> = None;
        let mut line = Vec::new();
        loop {
            line.clear();
            if reader.read_until(b'\n', &mut line)? == 0 {
                break;
            }
            // pci.ids is UTF-8 by now, but a stray byte must not lose the whole file.
            let text = String::from_utf8_lossy(&line);
            let text = text.trim_end();
            if text.is_empty() || text.starts_with('#') {
                continue;
            }
            let depth = text.bytes().take_while(|&b| b == b'\t').count();
            let body = &text[depth..];
            match depth {
                0 if body.starts_with("C ") => {
                    vendor = None;
                    device = None;
                    subclass = None;
                    class = hex_field(&body[2..], 2).map(|(v, name)| {
                        let base = v as u8;
                        if bases.contains(&base) {
                            names.classes.insert(base, name.to_owned());
                        }
                        base
                    });
                }
                0 => {
                    class = None;
                    subclass = None;
                    device = None;
                    vendor = hex_field(body, 4).map(|(v, name)| {
                        let v = v as u16;
                        if want.vendors.contains(&v) {
                            names.vendors.insert(v, name.to_owned());
                        }
                        v
                    });
                }
                1 => {
                    if let Some(v) = vendor {
                        device = hex_field(body, 4).map(|(d, name)| {
                            let d = d as u16;
                            if want.ids.contains(&(v, d)) {
                                names.devices.insert((v, d), name.to_owned());
                            }
                            d
                        });
                    } else if let Some(base) = class {
                        subclass = hex_field(body, 2).map(|(sub, name)| {
                            let sub = sub as u8;
                            if subclasses.contains(&(base, sub)) {
                                names.subclasses.insert((base, sub), name.to_owned());
                            }
                            sub
                        });
                    }
                }
                2 => {
                    if let (Some(v), Some(d)) = (vendor, device) {
                        // "SSSS DDDD  name": subsystem vendor and device.
                        if let Some((sv, rest)) = hex_field(body, 4)
                            && let Some((sd, name)) = hex_field(rest, 4)
                            && want.subsystems.contains(&(v, d, sv as u16, sd as u16))
                        {
                            names
                                .subsystems
                                .insert((v, d, sv as u16, sd as u16), name.to_owned());
                        }
                    } else if let (Some(base), Some(sub)) = (class, subclass)
                        && let Some((p, name)) = hex_field(body, 2)
                    {
                        let code = ClassCode::from_parts(base, sub, p as u8).value();
                        if want.classes.contains(&code) {
                            names.prog_ifs.insert(code, name.to_owned());
                        }
                    }
                }
                _ => {}
            }
        }
        Ok(names)
    }

    /// The vendor's name.
    pub fn vendor(&self, vendor: VendorId) -> Option<&str> {
        self.vendors.get(&vendor.0).map(String::as_str)
    }

    /// The device's name.
    pub fn device(&self, vendor: VendorId, device: DeviceId) -> Option<&str> {
        self.devices.get(&(vendor.0, device.0)).map(String::as_str)
    }

    /// The subclass name, else the base class name.
    pub fn class(&self, class: ClassCode) -> Option<&str> {
        self.subclasses
            .get(&(class.base(), class.sub()))
            .or_else(|| self.classes.get(&class.base()))
            .map(String::as_str)
    }

    /// The base class name ("Mass storage controller"), as lspci's `-vmm` has none but
    /// `Class` for the subclass.
    pub fn base_class(&self, class: ClassCode) -> Option<&str> {
        self.classes.get(&class.base()).map(String::as_str)
    }

    /// The subclass name ("Non-Volatile memory controller"), without the base class
    /// fallback of [`Names::class`].
    pub fn subclass(&self, class: ClassCode) -> Option<&str> {
        self.subclasses
            .get(&(class.base(), class.sub()))
            .map(String::as_str)
    }

    /// The programming interface's name ("NVM Express"), for classes a lookup was asked
    /// for with their full 24-bit code.
    pub fn prog_if(&self, class: ClassCode) -> Option<&str> {
        self.prog_ifs.get(&class.value()).map(String::as_str)
    }

    /// The subsystem's name ("QEMU Virtual Machine"), as listed under its device, for
    /// lookups by [`Names::lookup_records`].
    pub fn subsystem(
        &self,
        vendor: VendorId,
        device: DeviceId,
        subsystem_vendor: VendorId,
        subsystem_device: DeviceId,
    ) -> Option<&str> {
        self.subsystems
            .get(&(vendor.0, device.0, subsystem_vendor.0, subsystem_device.0))
            .map(String::as_str)
    }

    /// The name of a device's subsystem as `lspci` gives it (`-v`'s "Subsystem:" after the
    /// subsystem vendor, `-vmm`'s SDevice): the `pci.ids` entry for this subsystem of this
    /// device ([`subsystem`](Self::subsystem)), or, when the subsystem ids are the device's
    /// own ids (virtio devices, many NICs), the device's name.
    pub fn subsystem_name(
        &self,
        vendor: VendorId,
        device: DeviceId,
        subsystem_vendor: VendorId,
        subsystem_device: DeviceId,
    ) -> Option<&str> {
        self.subsystem(vendor, device, subsystem_vendor, subsystem_device)
            .or_else(|| {
                (vendor == subsystem_vendor && device == subsystem_device)
                    .then(|| self.device(vendor, device))
                    .flatten()
            })
    }

    /// The names of one device, as the JSON output has them (`null` when unknown).
    pub fn of(&self, d: &DeviceRecord) -> DeviceNames {
        let own = |s: Option<&str>| s.map(str::to_owned);
        DeviceNames {
            vendor_name: own(d.vendor.and_then(|v| self.vendor(v))),
            device_name: own(d.vendor.zip(d.device).and_then(|(v, dv)| self.device(v, dv))),
            subsystem_vendor_name: own(d.subsystem_vendor.and_then(|v| self.vendor(v))),
            subsystem_name: match (d.vendor, d.device, d.subsystem_vendor, d.subsystem_device) {
                (Some(v), Some(dv), Some(sv), Some(sd)) => own(self.subsystem_name(v, dv, sv, sd)),
                _ => None,
            },
            class_name: own(d.class.and_then(|c| self.base_class(c))),
            subclass_name: own(d.class.and_then(|c| self.subclass(c))),
            prog_if_name: own(d.class.and_then(|c| self.prog_if(c))),
        }
    }
}

/// The `pci.ids` names of one device, as `lspci -vmm` gives them: `None` where the
/// database has none (or none was found).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct DeviceNames {
    /// The vendor's name.
    pub vendor_name: Option<String>,
    /// The device's name.
    pub device_name: Option<String>,
    /// The subsystem vendor's name.
    pub subsystem_vendor_name: Option<String>,
    /// The subsystem's name (listed under the device in `pci.ids`).
    pub subsystem_name: Option<String>,
    /// The base class's name.
    pub class_name: Option<String>,
    /// The subclass's name.
    pub subclass_name: Option<String>,
    /// The programming interface's name.
    pub prog_if_name: Option<String>,
}

// "8086  Intel Corporation" → (0x8086, "Intel Corporation"), for a field of `digits` hex
// digits followed by whitespace and the name.
fn hex_field(body: &str, digits: usize) -> Option<(u32, &str)> {
    let id = body.get(..digits)?;
    if !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let rest = body.get(digits..)?;
    if !rest.starts_with([' ', '\t']) {
        return None;
    }
    Some((u32::from_str_radix(id, 16).ok()?, rest.trim()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const IDS: &str = "# comment\n\
1af4  Red Hat, Inc.\n\
\t1041  Virtio 1.0 network device\n\
\t1042  Virtio 1.0 block device\n\
\t\t1af4 1100  QEMU Virtual Machine\n\
8086  Intel Corporation\n\
\t0953  PCIe Data Center SSD\n\
C 01  Mass storage controller\n\
\t08  Non-Volatile memory controller\n\
\t\t02  NVM Express\n\
C 02  Network controller\n\
\t00  Ethernet controller\n";

    #[test]
    fn keeps_only_what_was_asked() {
        let n = Names::from_reader(
            IDS.as_bytes(),
            [
                (VendorId(0x1af4), DeviceId(0x1041)),
                (VendorId(0x1234), DeviceId(1)),
            ],
            [
                ClassCode::new(0x010802).unwrap(),
                ClassCode::new(0x028000).unwrap(),
            ],
        )
        .unwrap();
        assert_eq!(n.vendor(VendorId(0x1af4)), Some("Red Hat, Inc."));
        assert_eq!(
            n.device(VendorId(0x1af4), DeviceId(0x1041)),
            Some("Virtio 1.0 network device")
        );
        assert_eq!(
            n.device(VendorId(0x1af4), DeviceId(0x1042)),
            None,
            "not asked for"
        );
        assert_eq!(n.vendor(VendorId(0x8086)), None, "not asked for");
        assert_eq!(n.vendor(VendorId(0x1234)), None, "not in the file");
        assert_eq!(
            n.class(ClassCode::new(0x010802).unwrap()),
            Some("Non-Volatile memory controller")
        );
        assert_eq!(
            n.class(ClassCode::new(0x028000).unwrap()),
            Some("Network controller"),
            "base class fallback"
        );
    }

    #[test]
    fn finds_subsystem_prog_if_and_base_class_names_of_records() {
        let mut d = DeviceRecord::new("0000:00:03.0".parse().unwrap());
        d.vendor = Some(VendorId(0x1af4));
        d.device = Some(DeviceId(0x1042));
        d.subsystem_vendor = Some(VendorId(0x1af4));
        d.subsystem_device = Some(DeviceId(0x1100));
        d.class = ClassCode::new(0x010802);
        let mut other = DeviceRecord::new("0000:00:04.0".parse().unwrap());
        other.vendor = Some(VendorId(0x8086));
        other.device = Some(DeviceId(0x0953));
        other.subsystem_vendor = Some(VendorId(0x8086));
        other.subsystem_device = Some(DeviceId(0x1100));
        other.class = ClassCode::new(0x020000);
        let n = Names::from_reader_records(IDS.as_bytes(), &[d.clone(), other.clone()]).unwrap();
        assert_eq!(
            n.of(&d),
            DeviceNames {
                vendor_name: Some("Red Hat, Inc.".into()),
                device_name: Some("Virtio 1.0 block device".into()),
                subsystem_vendor_name: Some("Red Hat, Inc.".into()),
                subsystem_name: Some("QEMU Virtual Machine".into()),
                class_name: Some("Mass storage controller".into()),
                subclass_name: Some("Non-Volatile memory controller".into()),
                prog_if_name: Some("NVM Express".into()),
            }
        );
        // The 1af4:1100 subsystem is listed under 1af4:1042 only; 020000 has no prog-if.
        let o = n.of(&other);
        assert_eq!(o.subsystem_name, None);
        assert_eq!(o.subsystem_vendor_name.as_deref(), Some("Intel Corporation"));
        assert_eq!(o.subclass_name.as_deref(), Some("Ethernet controller"));
        assert_eq!(o.prog_if_name, None);
        assert_eq!(
            n.of(&DeviceRecord::new("0000:00:05.0".parse().unwrap())),
            DeviceNames::default()
        );
    }

    #[test]
    fn a_subsystem_with_the_devices_own_ids_has_the_devices_name() {
        // As lspci: no per-device subsystem entry, but the subsystem ids are the device's
        // ids (virtio devices, many NICs), so the subsystem is the device itself.
        let mut d = DeviceRecord::new("0000:00:03.0".parse().unwrap());
        d.vendor = Some(VendorId(0x1af4));
        d.device = Some(DeviceId(0x1041));
        d.subsystem_vendor = Some(VendorId(0x1af4));
        d.subsystem_device = Some(DeviceId(0x1041));
        let mut unknown = d.clone();
        unknown.subsystem_device = Some(DeviceId(0x1100));
        let n = Names::from_reader_records(IDS.as_bytes(), &[d.clone(), unknown.clone()]).unwrap();
        assert_eq!(
            n.of(&d).subsystem_name.as_deref(),
            Some("Virtio 1.0 network device")
        );
        assert_eq!(
            n.subsystem_name(
                VendorId(0x1af4),
                DeviceId(0x1041),
                VendorId(0x1af4),
                DeviceId(0x1041)
            ),
            Some("Virtio 1.0 network device")
        );
        assert_eq!(
            n.subsystem(
                VendorId(0x1af4),
                DeviceId(0x1041),
                VendorId(0x1af4),
                DeviceId(0x1041)
            ),
            None,
            "subsystem() is the pci.ids entry alone"
        );
        // 1af4:1100 is a subsystem of 1af4:1042 only.
        assert_eq!(n.of(&unknown).subsystem_name, None);
    }

    proptest::proptest! {
        #[test]
        fn never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..2048)) {
            let ids = [(VendorId(0x8086), DeviceId(0x0953)), (VendorId(0x1af4), DeviceId(0x1041))];
            let classes = [ClassCode::new(0x010802).unwrap()];
            proptest::prop_assert!(Names::from_reader(&bytes[..], ids, classes).is_ok());
        }

        #[test]
        fn finds_what_a_generated_file_names(vendor in 1u16..0xffff, device: u16, name in "[A-Za-z0-9 ,.()-]{1,30}") {
            let text = format!("{vendor:04x}  V {name}\n\t{device:04x}  D {name}\n");
            let n = Names::from_reader(text.as_bytes(), [(VendorId(vendor), DeviceId(device))], []).unwrap();
            let want_vendor = format!("V {name}");
            let want_device = format!("D {name}");
            proptest::prop_assert_eq!(n.vendor(VendorId(vendor)), Some(want_vendor.trim()));
            proptest::prop_assert_eq!(n.device(VendorId(vendor), DeviceId(device)), Some(want_device.trim()));
        }
    }

    #[test]
    fn survives_garbage() {
        let junk = b"\xff\xfe\n\tzz\nC\n\t\t\t\n8086\n1af4\tx\n";
        assert!(Names::from_reader(&junk[..], [(VendorId(0x1af4), DeviceId(0))], []).is_ok());
    }
}
