//! Vendor, device and class names from the system's `pci.ids`.
//!
//! The file is 1.3 MB; a listing needs a few dozen of its names. [`Names::lookup`] reads it
//! once, line by line, and keeps only the names asked for.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, BufRead};
use std::path::{Path, PathBuf};

use crate::{ClassCode, DeviceId, VendorId};

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
        let ids: BTreeSet<(u16, u16)> = ids.into_iter().map(|(v, d)| (v.0, d.0)).collect();
        let vendors: BTreeSet<u16> = ids.iter().map(|(v, _)| *v).collect();
        let classes: BTreeSet<(u8, u8)> = classes.into_iter().map(|c| (c.base(), c.sub())).collect();
        let bases: BTreeSet<u8> = classes.iter().map(|(b, _)| *b).collect();
        let mut names = Names::default();
        // The section we are in: a vendor (Some) or a class (base class).
        let mut vendor: Option<u16> = None;
        let mut class: Option<u8> = None;
        let mut line = Vec::new();
        let mut reader = reader;
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
                    vendor = hex_field(body, 4).map(|(v, name)| {
                        let v = v as u16;
                        if vendors.contains(&v) {
                            names.vendors.insert(v, name.to_owned());
                        }
                        v
                    });
                }
                1 => {
                    if let Some(v) = vendor {
                        if let Some((d, name)) = hex_field(body, 4)
                            && ids.contains(&(v, d as u16))
                        {
                            names.devices.insert((v, d as u16), name.to_owned());
                        }
                    } else if let Some(base) = class
                        && let Some((sub, name)) = hex_field(body, 2)
                        && classes.contains(&(base, sub as u8))
                    {
                        names.subclasses.insert((base, sub as u8), name.to_owned());
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
