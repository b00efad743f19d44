//! Captures the PCI part of a live sysfs as a [`Fixture`].
//!
//! [`capture`] records, below `ROOT`:
//!
//! - every entry of `bus/pci/devices` as what it is: normally a `link` with its link text;
//!   a real directory there (as in DPDK's old test tree) is captured as a device directory;
//! - for each one that resolves to a directory inside `ROOT` (the link text is resolved
//!   lexically against the link's directory, never through a symlink, so loops and links
//!   out of the root are recorded but not followed), the device directory: its regular
//!   files with their contents, its symlinks (`driver`, `iommu_group`, `physfn`,
//!   `virtfn*`, `subsystem`, `firmware_node`, ...) as links, its named pipes as `fifo`s, the
//!   files of its `power/`, `msi_irqs/` and `link/` subdirectories, and any other
//!   subdirectory (class devices such as `nvme/`, `net/`, `virtio3/`, `pci_bus/`) as a
//!   `dir` with only its immediate subdirectories as `dir`s. Subdirectories named like a
//!   PCI address (devices behind a bridge) are skipped: they are captured as devices of
//!   their own;
//! - the targets of `driver` links (`bus/pci/drivers/NAME`: the directory and the names of
//!   its regular files, as empty files; its links are skipped) and of `iommu_group` links
//!   (`kernel/iommu_groups/N`: its regular files and the links in its `devices/`).
//!
//! Files are read up to [`MAX_FILE_LEN`] bytes. The contents of files that can be huge or
//! whose access has side effects are never read and recorded as empty files: see
//! [`is_unreadable`]. The attributes whose kernel read takes the device lock
//! ([`LOCKED_ATTRIBUTES`]) can block forever while a removal is pending, and `config` and
//! `vpd` wait while the function is being reset ([`WAITING_ATTRIBUTES`]); all of them are
//! read through [`CaptureOptions::locked_reader`], by default the process-wide
//! [`BlockingPool`] with a deadline of [`CaptureOptions::timeout`] per file. A file that fails to read is recorded as an
//! empty file, and the error is added to [`Fixture::notes`] (written as a comment).
//!
//! The result is normalized ([`Fixture::normalize`]): sorted, without implied `dir`s.

use std::collections::{BTreeMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::fs;
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileTypeExt;
use std::path::{Component, Path, PathBuf};

use std::time::{Duration, Instant};

use crate::fixture::{Entry, EntryKind, Fixture};
use crate::removal::pool::BlockingPool;

/// The most bytes read of any one file.
pub const MAX_FILE_LEN: usize = 64 * 1024;

/// Attributes whose kernel `show()` takes the device lock, and so can block while a
/// removal of the device is pending.
pub const LOCKED_ATTRIBUTES: &[&str] = &["uevent", "driver_override", "sriov_numvfs", "sriov_vf_total_msix"];

/// Attributes that take no device lock but whose read waits while the function is being
/// reset (vfio-pci resets a function on every open and close; a reset takes 100 ms or more,
/// and a device answering config requests with CRS can hold it for up to 60 s).
pub const WAITING_ATTRIBUTES: &[&str] = &["config", "vpd"];

/// Reads one file; used for [`LOCKED_ATTRIBUTES`] and [`WAITING_ATTRIBUTES`].
pub type Reader = Box<dyn Fn(&Path) -> io::Result<Vec<u8>> + Send + Sync>;

/// Options of [`capture`].
pub struct CaptureOptions {
    /// The most bytes recorded of any file (default [`MAX_FILE_LEN`]).
    pub max_file_len: usize,
    /// Reads the [`LOCKED_ATTRIBUTES`] and the [`WAITING_ATTRIBUTES`]; `None` (the
    /// default) reads them on the process-wide [`BlockingPool`], each with a deadline of
    /// `timeout`, and notes a read that did not answer in time.
    pub locked_reader: Option<Reader>,
    /// The deadline of each guarded read when `locked_reader` is `None` (default 1 s).
    pub timeout: Duration,
}

impl Default for CaptureOptions {
    fn default() -> Self {
        CaptureOptions {
            max_file_len: MAX_FILE_LEN,
            locked_reader: None,
            timeout: Duration::from_secs(1),
        }
    }
}

impl std::fmt::Debug for CaptureOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaptureOptions")
            .field("max_file_len", &self.max_file_len)
            .field("locked_reader", &self.locked_reader.as_ref().map(|_| "custom"))
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// Why [`capture`] failed as a whole (problems with single files are recorded as notes).
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// `ROOT/bus/pci/devices` could not be listed.
    #[error("cannot list {path}")]
    ListDevices {
        /// The directory.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
}

/// Whether the contents of the device file `name` must never be read: BAR mappings
/// (`resourceN`, `resourceN_wc`), `rom`, and the write-only triggers (`remove`, `rescan`,
/// `reset`, `bind`, `unbind`, `new_id`, `remove_id`).
pub fn is_unreadable(name: &[u8]) -> bool {
    if let Some(rest) = name.strip_prefix(b"resource") {
        let rest = rest.strip_suffix(b"_wc").unwrap_or(rest);
        if !rest.is_empty() && rest.iter().all(u8::is_ascii_digit) {
            return true;
        }
    }
    matches!(
        name,
        b"rom" | b"remove" | b"rescan" | b"reset" | b"bind" | b"unbind" | b"new_id" | b"remove_id"
    )
}

/// Captures the PCI part of the sysfs tree at `root` (normally `/sys`). See the module docs.
pub fn capture(root: &Path, options: &CaptureOptions) -> Result<Fixture, SnapshotError> {
    let devices = Path::new("bus/pci/devices");
    let list = root.join(devices);
    let mut names: Vec<OsString> = fs::read_dir(&list)
        .and_then(|rd| rd.map(|e| e.map(|e| e.file_name())).collect())
        .map_err(|source| SnapshotError::ListDevices {
            path: list.clone(),
            source,
        })?;
    names.sort();
    let mut c = Capturer {
        root,
        options,
        entries: BTreeMap::new(),
        notes: Vec::new(),
        done: HashSet::new(),
    };
    c.entries.insert(devices.to_path_buf(), EntryKind::Dir);
    for name in names {
        let rel = devices.join(&name);
        let Some(kind) = c.plain_entry(&rel, false) else {
            continue;
        };
        let device_dir = match &kind {
            EntryKind::Link(target) => c.resolve(devices, target).filter(|p| c.is_real_dir(p)),
            EntryKind::Dir => Some(rel.clone()),
            _ => None,
        };
        c.entries.insert(rel, kind);
        if let Some(dir) = device_dir {
            c.device(&dir);
        }
    }
    let mut fixture = Fixture {
        entries: c
            .entries
            .into_iter()
            .map(|(path, kind)| Entry { path, kind })
            .collect(),
        notes: c.notes,
    };
    fixture.normalize();
    Ok(fixture)
}

struct Capturer<'a> {
    root: &'a Path,
    options: &'a CaptureOptions,
    entries: BTreeMap<PathBuf, EntryKind>,
    notes: Vec<String>,
    /// Directories already captured (devices, drivers, groups).
    done: HashSet<PathBuf>,
}

impl Capturer<'_> {
    fn note(&mut self, rel: &Path, what: impl std::fmt::Display) {
        self.notes.push(format!("{}: {what}", rel.display()));
    }

    fn is_real_dir(&self, rel: &Path) -> bool {
        fs::symlink_metadata(self.root.join(rel)).is_ok_and(|m| m.is_dir())
    }

    /// Resolves link text `target` of a link in directory `dir` (both relative to the root)
    /// lexically; `None` when it leaves the root, is absolute, or passes through a symlink
    /// (the final component may be anything, including a symlink).
    fn resolve(&self, dir: &Path, target: &OsStr) -> Option<PathBuf> {
        let mut out = dir.to_path_buf();
        for comp in Path::new(target).components() {
            match comp {
                Component::Normal(c) => {
                    if out.as_os_str().is_empty() || self.is_real_dir(&out) {
                        out.push(c);
                    } else {
                        return None;
                    }
                }
                Component::ParentDir => {
                    if !out.pop() {
                        return None;
                    }
                }
                Component::CurDir => {}
                Component::RootDir | Component::Prefix(_) => return None,
            }
        }
        (!out.as_os_str().is_empty()).then_some(out)
    }

    fn read(&mut self, rel: &Path, locked: bool) -> Vec<u8> {
        let path = self.root.join(rel);
        let max = self.options.max_file_len;
        let result = match (&self.options.locked_reader, locked) {
            (Some(reader), true) => reader(&path).map(|mut v| {
                v.truncate(max);
                v
            }),
            (None, true) => BlockingPool::shared()
                .read(&path, max, Instant::now() + self.options.timeout)
                .unwrap_or_else(|e| Err(io::Error::new(io::ErrorKind::TimedOut, e))),
            _ => fs::File::open(&path).and_then(|f| {
                let mut v = Vec::new();
                f.take(max as u64).read_to_end(&mut v)?;
                Ok(v)
            }),
        };
        result.unwrap_or_else(|e| {
            self.note(rel, format_args!("read error: {e}"));
            Vec::new()
        })
    }

    /// The entry at `rel` as what it is, without descending; files are read unless
    /// `names_only`. `None` (with a note) for what a fixture cannot hold.
    fn plain_entry(&mut self, rel: &Path, names_only: bool) -> Option<EntryKind> {
        let meta = match fs::symlink_metadata(self.root.join(rel)) {
            Ok(m) => m,
            Err(e) => {
                self.note(rel, format_args!("stat error: {e}"));
                return None;
            }
        };
        let ft = meta.file_type();
        if ft.is_symlink() {
            match fs::read_link(self.root.join(rel)) {
                Ok(t) if !t.as_os_str().is_empty() => Some(EntryKind::Link(t.into_os_string())),
                Ok(_) => None,
                Err(e) => {
                    self.note(rel, format_args!("readlink error: {e}"));
                    None
                }
            }
        } else if ft.is_dir() {
            Some(EntryKind::Dir)
        } else if ft.is_fifo() {
            Some(EntryKind::Fifo)
        } else if ft.is_file() {
            let name = rel.file_name().map(OsStrExt::as_bytes).unwrap_or_default();
            if names_only || is_unreadable(name) {
                return Some(EntryKind::File(Vec::new()));
            }
            let locked = LOCKED_ATTRIBUTES
                .iter()
                .chain(WAITING_ATTRIBUTES)
                .any(|a| a.as_bytes() == name);
            let bytes = self.read(rel, locked);
            // An unprivileged reader gets 64 bytes of `config`: the fixture says so, rather
            // than look like a device without capabilities.
            if name == b"config"
                && !bytes.is_empty()
                && let Some(kind) = crate::record::ProblemKind::config_restricted(bytes.len(), meta.len())
            {
                self.note(rel, kind);
            }
            Some(EntryKind::File(bytes))
        } else {
            self.note(rel, "skipped: neither file, directory, symlink nor fifo");
            None
        }
    }

    fn children(&mut self, rel: &Path) -> Vec<OsString> {
        let listed: io::Result<Vec<OsString>> =
            fs::read_dir(self.root.join(rel)).and_then(|rd| rd.map(|e| e.map(|e| e.file_name())).collect());
        match listed {
            Ok(mut v) => {
                v.sort();
                v
            }
            Err(e) => {
                self.note(rel, format_args!("list error: {e}"));
                Vec::new()
            }
        }
    }

    /// Records the regular files (read), links and fifos of `rel`, and `rel` itself.
    fn flat_dir(&mut self, rel: &Path, names_only: bool, links: bool) {
        self.entries.insert(rel.to_path_buf(), EntryKind::Dir);
        for name in self.children(rel) {
            let child = rel.join(&name);
            match self.plain_entry(&child, names_only) {
                Some(EntryKind::Dir) | None => {}
                Some(EntryKind::Link(_)) if !links => {}
                Some(kind) => {
                    self.entries.insert(child, kind);
                }
            }
        }
    }

    fn device(&mut self, dir: &Path) {
        if !self.done.insert(dir.to_path_buf()) {
            return;
        }
        self.entries.insert(dir.to_path_buf(), EntryKind::Dir);
        for name in self.children(dir) {
            let rel = dir.join(&name);
            let Some(kind) = self.plain_entry(&rel, false) else {
                continue;
            };
            match &kind {
                EntryKind::Dir => {
                    let n = name.as_bytes();
                    let text = std::str::from_utf8(n).unwrap_or_default();
                    if crate::PciAddress::parse_strict(text).is_ok() {
                        continue;
                    }
                    if matches!(n, b"power" | b"msi_irqs" | b"link") {
                        self.flat_dir(&rel, false, true);
                    } else {
                        self.class_dir(&rel);
                    }
                    continue;
                }
                EntryKind::Link(target) if matches!(name.as_bytes(), b"driver" | b"iommu_group") => {
                    if let Some(t) = self.resolve(dir, target).filter(|t| self.is_real_dir(t))
                        && self.done.insert(t.clone())
                    {
                        if name == "driver" {
                            self.flat_dir(&t, true, false);
                        } else {
                            self.group(&t);
                        }
                    }
                }
                _ => {}
            }
            self.entries.insert(rel, kind);
        }
    }

    /// A class-device subtree: the directory and its immediate subdirectories.
    fn class_dir(&mut self, rel: &Path) {
        self.entries.insert(rel.to_path_buf(), EntryKind::Dir);
        for name in self.children(rel) {
            let child = rel.join(&name);
            if self.is_real_dir(&child) {
                self.entries.insert(child, EntryKind::Dir);
            }
        }
    }

    fn group(&mut self, rel: &Path) {
        self.flat_dir(rel, false, false);
        let devices = rel.join("devices");
        if self.is_real_dir(&devices) {
            self.flat_dir(&devices, true, true);
        }
    }
}
