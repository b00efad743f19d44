//! The fast path: one device's record from the attributes whose read never waits.
//!
//! Everything here reads relative to the device's directory fd and turns every failure into
//! a [`Problem`](crate::record::Problem) of that record; nothing here may open an attribute
//! whose kernel `show()` can block, nor `config`, whose read waits while the function is
//! being reset (tests/scan.rs checks this with tripwire FIFOs). What only config space can
//! give is noted in [`ConfigWanted`] and read later through the pool.

use std::io;

use parking_lot::Mutex;

use crate::config;
use crate::model::{DeviceId, Sriov, VendorId};
use crate::record::{DeviceRecord, ProblemKind};
use crate::removal::registry::{DeviceIdentity, RemovalRegistry};
use crate::sysfs::dir::{ATTR_MAX, DirFd, basename};
use crate::sysfs::parse;
use crate::sysfs::scan::{IdSource, Ignored};
use crate::{ParseError, ParseErrorKind, PciAddress};

/// What the fast path could not learn from attributes that never wait, and config space
/// has. `config` is then read later, through the pool: a `config` read waits while the
/// function is being reset.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct ConfigWanted {
    /// Ids, class and revision from the header ([`IdSource::Config`]).
    pub(crate) header: bool,
    /// No `revision` file (kernels before it existed): config byte 8.
    pub(crate) revision: bool,
    /// No `subsystem_*` files: from the header (type 0), or the SSVID capability of a
    /// bridge (type 1), which is what lspci shows.
    pub(crate) subsystem: bool,
}

impl ConfigWanted {
    pub(crate) fn any(self) -> bool {
        self.header || self.revision || self.subsystem
    }

    /// How much of `config` answers it: the header, or the standard capabilities too.
    pub(crate) fn len(self) -> usize {
        if self.subsystem { 256 } else { 64 }
    }
}

/// A device the fast path read.
pub(crate) struct Found {
    pub(crate) dev: DeviceRecord,
    /// The incarnation read (the device directory's inode), when fstat worked.
    pub(crate) identity: Option<DeviceIdentity>,
    pub(crate) config: ConfigWanted,
}

// The fast path for one device.
pub(crate) fn read_device(
    ids: IdSource,
    registry: &RemovalRegistry,
    devices_dir: &DirFd,
    address: PciAddress,
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
    // Which incarnation this is: in the record (a device swapped at the same address is
    // another device), for the registry, and for the blocking reads that may mark it.
    let listed = registry.is_pending(address);
    let identity = DeviceIdentity::of_fd(&dir).ok();
    if let Some(p) = progress {
        *p.identity.lock() = identity;
    }
    let mut dev = DeviceRecord::new(address);
    dev.identity = identity;
    // Checked per incarnation: a device re-added at the same address is a new device.
    dev.removal_pending = listed && registry.is_pending_device(address, identity);
    if dev.removal_pending
        && let Some(p) = registry.get(address)
    {
        dev.removal_reasons = p.reasons.iter().map(ToString::to_string).collect();
    }
    let mut config = ConfigWanted::default();
    with_scratch(|buf| {
        let mut r = Reader {
            dir: &dir,
            dev: &mut dev,
            config: &mut config,
            progress,
            buf,
        };
        // A VF's config space reads 0xffff as vendor and device id, so learn first whether
        // this is one.
        r.dev.physfn = r.link_address("physfn");
        match ids {
            IdSource::Files => r.ids_from_modalias(),
            IdSource::IdFiles => r.ids_from_files(),
            IdSource::Config if r.dev.physfn.is_some() || r.dev.removal_pending => r.ids_from_files(),
            IdSource::Config => r.config.header = true,
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
    });
    // The kernel drops a VF's `physfn` link before it removes the VF (possibly under the
    // PF's device lock): learn the relation now, while it is there.
    if let Some(pf) = dev.physfn {
        registry.note_physfn(address, pf);
    }
    // A device removed while we read it: every attribute is gone.
    let vanished = dev.resources.is_empty()
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
        Outcome::Found(Box::new(Found {
            dev,
            identity,
            config,
        }))
    }
}

/// Ids, class and subsystem ids from the id files, for a device whose config header could
/// not give them ([`IdSource::Config`]: a VF, a header that reads all-ones, a read that
/// timed out). Leaves a device whose directory is gone as it is.
pub(crate) fn ids_from_files(devices_dir: &DirFd, dev: &mut DeviceRecord) {
    with_reader(devices_dir, dev, |r| r.ids_from_files());
}

/// Subsystem ids from the files, for a bridge whose header has none.
pub(crate) fn subsystem_from_files(devices_dir: &DirFd, dev: &mut DeviceRecord) {
    with_reader(devices_dir, dev, |r| r.subsystem_from_files());
}

fn with_reader(devices_dir: &DirFd, dev: &mut DeviceRecord, read: impl FnOnce(&mut Reader<'_>)) {
    let Ok(dir) = devices_dir.open_dir(&dev.address.to_string()) else {
        return;
    };
    let mut config = ConfigWanted::default();
    with_scratch(|buf| {
        let mut r = Reader {
            dir: &dir,
            dev,
            config: &mut config,
            progress: None,
            buf,
        };
        read(&mut r);
    });
}

/// Applies what a guarded read of `config` gave for `wanted`. Returns false when the header
/// is unusable for ids (short, or all-ones: a VF or a device that does not answer), so
/// the caller takes them from the id files.
pub(crate) fn apply_config(dev: &mut DeviceRecord, wanted: ConfigWanted, bytes: &[u8]) -> bool {
    let header = match config::parse_header(bytes) {
        Ok(h) if h.vendor.0 != 0xffff && h.device.0 != 0xffff => h,
        Ok(_) => return !wanted.header,
        Err(e) => {
            if !wanted.header {
                dev.report("config", ProblemKind::Parse(e));
            }
            return !wanted.header;
        }
    };
    if wanted.header {
        dev.vendor = Some(header.vendor);
        dev.device = Some(header.device);
        dev.class = Some(header.class);
    }
    if wanted.header || wanted.revision {
        dev.revision = Some(header.revision);
    }
    if wanted.header || wanted.subsystem {
        let (sv, sd) = match (
            header.header_type,
            header.subsystem_vendor,
            header.subsystem_device,
        ) {
            (_, Some(sv), Some(sd)) => (Some(sv), Some(sd)),
            // A PCI-to-PCI bridge keeps them in its SSVID capability (vendor at +4,
            // device at +6), as lspci shows.
            (1, _, _) => match config::find_capability(bytes, SSVID_CAPABILITY) {
                Some(at) => (
                    u16_at(bytes, usize::from(at) + 4).map(VendorId),
                    u16_at(bytes, usize::from(at) + 6).map(DeviceId),
                ),
                None => (None, None),
            },
            _ => (None, None),
        };
        dev.subsystem_vendor = sv;
        dev.subsystem_device = sd;
    }
    true
}

/// Standard capability id of the bridge subsystem vendor id capability.
const SSVID_CAPABILITY: u8 = 0x0d;

fn u16_at(bytes: &[u8], at: usize) -> Option<u16> {
    let b = bytes.get(at..at + 2)?;
    Some(u16::from_le_bytes([b[0], b[1]]))
}

pub(crate) enum Outcome {
    Found(Box<Found>),
    Vanished(PciAddress),
    Ignored(Ignored),
}

/// Which attribute a guarded per-device job is reading, so a timeout can name it, and
/// which incarnation of the device it read. Only guarded jobs keep one: the unguarded walk
/// has nobody to tell.
pub(crate) struct Progress {
    attribute: Mutex<&'static str>,
    pub(crate) identity: Mutex<Option<DeviceIdentity>>,
}

impl Default for Progress {
    fn default() -> Self {
        Progress {
            attribute: Mutex::new("device directory"),
            identity: Mutex::new(None),
        }
    }
}

impl Progress {
    pub(crate) fn at(&self, attribute: &'static str) {
        *self.attribute.lock() = attribute;
    }
    pub(crate) fn attribute(&self) -> &'static str {
        *self.attribute.lock()
    }
}

// Reads one device's attributes into its record, turning every failure into a problem.
struct Reader<'a> {
    dir: &'a DirFd,
    dev: &'a mut DeviceRecord,
    config: &'a mut ConfigWanted,
    progress: Option<&'a Progress>,
    buf: &'a mut [u8; ATTR_MAX],
}

// A read buffer per thread: zeroing a fresh page for every device costs more than the
// parsing of most of its attributes.
fn with_scratch<R>(f: impl FnOnce(&mut [u8; ATTR_MAX]) -> R) -> R {
    thread_local! {
        static SCRATCH: std::cell::RefCell<[u8; ATTR_MAX]> =
            const { std::cell::RefCell::new([0; ATTR_MAX]) };
    }
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buf) => f(&mut buf),
        Err(_) => f(&mut [0; ATTR_MAX]),
    })
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
        match self.dir.read(name, self.buf) {
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

    // Vendor, device, subsystem ids and class from `modalias` (one read, the kernel's
    // cached values, as in the id files), the revision from `revision`. The id files
    // when `modalias` is missing or does not parse.
    fn ids_from_modalias(&mut self) {
        self.at("modalias");
        let parsed = match self.dir.read("modalias", self.buf) {
            Ok(bytes) => parse::modalias(bytes).ok(),
            Err(_) => None,
        };
        let Some(m) = parsed else {
            return self.ids_from_files();
        };
        self.dev.vendor = Some(m.vendor);
        self.dev.device = Some(m.device);
        self.dev.subsystem_vendor = Some(m.subsystem_vendor);
        self.dev.subsystem_device = Some(m.subsystem_device);
        self.dev.class = Some(m.class);
        self.revision();
    }

    fn ids_from_files(&mut self) {
        self.dev.vendor = self
            .attr("vendor", true, |b| parse::hex_u16("vendor", b))
            .map(VendorId);
        self.dev.device = self
            .attr("device", true, |b| parse::hex_u16("device", b))
            .map(DeviceId);
        self.subsystem_from_files();
        if self.dev.subsystem_vendor.is_none()
            && self.dev.subsystem_device.is_none()
            && self.missing("subsystem_vendor")
        {
            self.config.subsystem = true;
        }
        self.dev.class = self.attr("class", true, parse::class);
        self.revision();
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

    // Kernels before `revision` existed: config byte 8, read later through the pool.
    fn revision(&mut self) {
        self.dev.revision = self.attr("revision", false, parse::revision);
        if self.dev.revision.is_none() && self.missing("revision") {
            self.config.revision = true;
        }
    }

    // Whether `name` does not exist (as opposed to failing to read or parse, which is
    // already a problem of the record).
    fn missing(&self, name: &'static str) -> bool {
        self.dev.problem(name).is_none() && !self.dir.exists(name)
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
