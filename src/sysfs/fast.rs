//! The fast path: one device's record from the attributes whose read takes no device lock.
//!
//! Everything here reads relative to the device's directory fd and turns every failure into
//! a [`Problem`](crate::record::Problem) of that record; nothing here may open an attribute
//! whose kernel `show()` can block (tests/scan.rs checks this with tripwire FIFOs).

use std::io;

use parking_lot::Mutex;

use crate::config;
use crate::model::{DeviceId, Sriov, VendorId};
use crate::record::{DeviceRecord, ProblemKind};
use crate::sysfs::dir::{ATTR_MAX, DirFd, basename};
use crate::sysfs::parse;
use crate::sysfs::scan::{IdSource, Ignored};
use crate::{ParseError, ParseErrorKind, PciAddress};

// The fast path for one device.
pub(crate) fn read_device(
    ids: IdSource,
    devices_dir: &DirFd,
    address: PciAddress,
    pending: bool,
    progress: Option<&Progress>,
) -> Outcome {
    let name = address.to_string();
    if let Some(p) = progress {
        p.at("device directory");
    }
    let dir = match devices_dir.open_dir(&name) {
        Ok(dir) => dir,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Outcome::Vanished(address),
        Err(e) => {
            return Outcome::Ignored(Ignored {
                name,
                reason: format!("not a device directory: {e}"),
            });
        }
    };
    let mut dev = DeviceRecord::new(address);
    dev.removal_pending = pending;
    let mut r = Reader {
        dir: &dir,
        dev: &mut dev,
        progress,
        buf: [0; ATTR_MAX],
    };
    // A VF's config space reads 0xffff as vendor and device id, so learn first whether
    // this is one.
    r.dev.physfn = r.link_address("physfn");
    let from_config = ids == IdSource::Config && !pending && r.dev.physfn.is_none() && r.ids_from_config();
    if !from_config {
        r.ids_from_files();
    }
    if let Some(resources) = r.attr("resource", true, parse::resource) {
        r.dev.resources = resources;
    }
    r.dev.numa_node = r.attr("numa_node", false, parse::numa_node).flatten();
    r.dev.driver = r
        .link("driver")
        .map(|t| String::from_utf8_lossy(basename(&t)).into_owned());
    r.dev.iommu_group = r
        .link("iommu_group")
        .and_then(|t| r.parsed("iommu_group", parse::decimal_u32("iommu_group", basename(&t))));
    if let Some(total_vfs) = r.attr("sriov_totalvfs", false, |b| {
        parse::decimal_u16("sriov_totalvfs", b)
    }) {
        r.sriov(total_vfs);
    }
    // A device removed while we read it: every attribute is gone.
    let vanished = dev.vendor.is_none()
        && dev.problems.iter().any(|p| {
            matches!(
                p.kind,
                ProblemKind::Io {
                    kind: io::ErrorKind::NotFound,
                    ..
                }
            )
        })
        && devices_dir.open_dir(&name).is_err();
    if vanished {
        Outcome::Vanished(address)
    } else {
        Outcome::Found(Box::new(dev))
    }
}

pub(crate) enum Outcome {
    Found(Box<DeviceRecord>),
    Vanished(PciAddress),
    Ignored(Ignored),
}

/// Which attribute a guarded per-device job is reading, so a timeout can name it. Only
/// guarded jobs keep one: the unguarded walk has nobody to tell.
pub(crate) struct Progress(Mutex<&'static str>);

impl Default for Progress {
    fn default() -> Self {
        Progress(Mutex::new("device directory"))
    }
}

impl Progress {
    pub(crate) fn at(&self, attribute: &'static str) {
        *self.0.lock() = attribute;
    }
    pub(crate) fn attribute(&self) -> &'static str {
        *self.0.lock()
    }
}

// Reads one device's attributes into its record, turning every failure into a problem.
struct Reader<'a> {
    dir: &'a DirFd,
    dev: &'a mut DeviceRecord,
    progress: Option<&'a Progress>,
    buf: [u8; ATTR_MAX],
}

impl Reader<'_> {
    fn at(&self, name: &'static str) {
        if let Some(p) = self.progress {
            p.at(name);
        }
    }

    // Reads and parses `name`. A missing attribute is a problem only when `required`.
    fn attr<T>(
        &mut self,
        name: &'static str,
        required: bool,
        parse: impl FnOnce(&[u8]) -> Result<T, ParseError>,
    ) -> Option<T> {
        self.at(name);
        match self.dir.read(name, &mut self.buf) {
            Ok(bytes) => {
                let parsed = parse(bytes);
                self.parsed(name, parsed)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound && !required => None,
            Err(e) => {
                self.dev.report(name, ProblemKind::io(&e));
                None
            }
        }
    }

    fn parsed<T>(&mut self, name: &'static str, parsed: Result<T, ParseError>) -> Option<T> {
        match parsed {
            Ok(v) => Some(v),
            Err(e) => {
                self.dev.report(name, ProblemKind::Parse(e));
                None
            }
        }
    }

    fn link(&mut self, name: &'static str) -> Option<std::ffi::OsString> {
        self.at(name);
        match self.dir.link(name) {
            Ok(target) => target,
            Err(e) => {
                self.dev.report(name, ProblemKind::io(&e));
                None
            }
        }
    }

    // A link to another PCI function (`physfn`, `virtfnN`): the address it names.
    fn link_address(&mut self, name: &'static str) -> Option<PciAddress> {
        let target = self.link(name)?;
        let base = basename(&target);
        let parsed = std::str::from_utf8(base)
            .ok()
            .and_then(|s| PciAddress::parse_strict(s).ok())
            .ok_or_else(|| {
                ParseError::new(
                    name,
                    ParseErrorKind::Invalid {
                        expected: "a link to a PCI address",
                    },
                    base,
                )
            });
        self.parsed(name, parsed)
    }

    // Ids, class and revision from the config header. False when the header is missing,
    // short or says the device does not answer: the caller then reads the id files.
    fn ids_from_config(&mut self) -> bool {
        self.at("config");
        let Ok(bytes) = self.dir.read_prefix("config", &mut self.buf[..64]) else {
            return false;
        };
        let Ok(h) = config::parse_header(bytes) else {
            return false;
        };
        if h.vendor.0 == 0xffff || h.device.0 == 0xffff {
            return false;
        }
        self.dev.vendor = Some(h.vendor);
        self.dev.device = Some(h.device);
        self.dev.class = Some(h.class);
        self.dev.revision = Some(h.revision);
        match (h.subsystem_vendor, h.subsystem_device) {
            (Some(sv), Some(sd)) => {
                self.dev.subsystem_vendor = Some(sv);
                self.dev.subsystem_device = Some(sd);
            }
            // Bridges keep theirs in a capability; the kernel's files have them.
            _ => self.subsystem_from_files(),
        }
        true
    }

    fn ids_from_files(&mut self) {
        self.dev.vendor = self
            .attr("vendor", true, |b| parse::hex_u16("vendor", b))
            .map(VendorId);
        self.dev.device = self
            .attr("device", true, |b| parse::hex_u16("device", b))
            .map(DeviceId);
        self.subsystem_from_files();
        self.dev.class = self.attr("class", true, parse::class);
        self.dev.revision = self.attr("revision", false, parse::revision);
    }

    fn subsystem_from_files(&mut self) {
        self.dev.subsystem_vendor = self
            .attr("subsystem_vendor", false, |b| {
                parse::hex_u16("subsystem_vendor", b)
            })
            .map(VendorId);
        self.dev.subsystem_device = self
            .attr("subsystem_device", false, |b| {
                parse::hex_u16("subsystem_device", b)
            })
            .map(DeviceId);
    }

    fn sriov(&mut self, total_vfs: u16) {
        let mut sriov = Sriov {
            total_vfs,
            vf_offset: self.attr("sriov_offset", false, |b| parse::decimal_u16("sriov_offset", b)),
            vf_stride: self.attr("sriov_stride", false, |b| parse::decimal_u16("sriov_stride", b)),
            // Written as bare hex ("%x"), unlike the 0x-prefixed id files.
            vf_device: self.attr("sriov_vf_device", false, bare_hex_u16).map(DeviceId),
            ..Sriov::default()
        };
        // virtfn0..virtfn(N-1) exist for the N enabled VFs; counting them needs no lock,
        // unlike reading sriov_numvfs.
        for n in 0..total_vfs {
            let name = format!("virtfn{n}");
            let target = match self.dir.link(&name) {
                Ok(Some(target)) => target,
                Ok(None) => break,
                Err(e) => {
                    self.dev.report("virtfn", ProblemKind::io(&e));
                    break;
                }
            };
            match std::str::from_utf8(basename(&target)).map(PciAddress::parse_strict) {
                Ok(Ok(vf)) => sriov.virtfns.push(vf),
                _ => {
                    let e = ParseError::new(
                        "virtfn",
                        ParseErrorKind::Invalid {
                            expected: "a link to a PCI address",
                        },
                        basename(&target),
                    );
                    self.dev.report("virtfn", ProblemKind::Parse(e));
                }
            }
        }
        self.dev.sriov = Some(sriov);
    }
}

fn bare_hex_u16(bytes: &[u8]) -> Result<u16, ParseError> {
    let err = |kind| ParseError::new("sriov_vf_device", kind, bytes);
    let text = std::str::from_utf8(bytes)
        .map_err(|_| {
            err(ParseErrorKind::Invalid {
                expected: "hex digits",
            })
        })?
        .trim();
    let digits = text.strip_prefix("0x").unwrap_or(text);
    if digits.is_empty() {
        return Err(err(ParseErrorKind::Empty));
    }
    if digits.len() > 4 || !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(err(ParseErrorKind::Invalid {
            expected: "up to 4 hex digits",
        }));
    }
    u16::from_str_radix(digits, 16).map_err(|_| {
        err(ParseErrorKind::Invalid {
            expected: "up to 4 hex digits",
        })
    })
}
