//! Fake sysfs trees in temporary directories, for tests of this crate and of drivers built
//! on it (feature `testing`).
//!
//! A [`FakeSysfs`] is a temporary directory laid out like `/sys`. Fill it from a fixture
//! ([`FakeSysfs::from_fixture`], see [`crate::fixture`] for the format), from code with
//! the device builder, which writes the kernel's layout and formats, or with the
//! [`Synthetic`] generator for large trees:
//!
//! ```
//! use pcibus::testing::FakeSysfs;
//! let fake = FakeSysfs::new()?;
//! fake.device("0000:01:00.0")
//!     .vendor(0x8086)
//!     .device_id(0x0953)
//!     .class(0x010802)
//!     .numa_node(0)
//!     .driver("nvme")
//!     .iommu_group(12)
//!     .create()?;
//! fake.device("0000:02:00.0").create()?; // defaults: an Intel Ethernet controller
//! let vendor = std::fs::read_to_string(fake.root().join("bus/pci/devices/0000:01:00.0/vendor"))?;
//! assert_eq!(vendor, "0x8086\n");
//! # Ok::<(), std::io::Error>(())
//! ```
//!
//! Hostile trees: [`DeviceBuilder::fifo`] turns an attribute into a named pipe whose open
//! blocks (like an attribute whose read waits for the device lock);
//! [`FakeSysfs::remove_device`] deletes a device directory but leaves its
//! `bus/pci/devices` link dangling; [`FakeSysfs::junk_file`], [`FakeSysfs::junk_link`] and
//! [`FakeSysfs::link_loop`] put junk in `bus/pci/devices`. Readers blocked on a FIFO are
//! released by [`FakeSysfs::answer_fifos`], and always when the `FakeSysfs` is dropped.
//!
//! Tripwires: a FIFO opened with `O_NONBLOCK` reads as empty, so a hostile tree cannot
//! catch code that opens an attribute it must never open. [`DeviceBuilder::tripwire`]
//! (or [`FakeSysfs::tripwire`]) makes the attribute a FIFO watched by a thread that counts
//! every open of it, blocking or not; [`FakeSysfs::opens`] and [`FakeSysfs::tripped`]
//! report them:
//!
//! ```
//! use pcibus::testing::FakeSysfs;
//! let fake = FakeSysfs::new()?;
//! let dir = fake.device("0000:01:00.0").tripwire("uevent").create()?;
//! assert_eq!(fake.opens(dir.join("uevent")), 0);
//! drop(std::fs::OpenOptions::new().read(true)
//!     .custom_flags(nix::libc::O_NONBLOCK).open(dir.join("uevent"))?);
//! # use std::os::unix::fs::OpenOptionsExt;
//! assert!(fake.wait_for_opens(dir.join("uevent"), 1, std::time::Duration::from_secs(5)));
//! # Ok::<(), std::io::Error>(())
//! ```

pub mod backing;

/// Whether Bus Master Enable (bit 2 of the Command register) is set in config space bytes:
/// what the emulations check before they let a device reach memory.
pub(crate) fn bus_master_bit(config: &[u8]) -> bool {
    config
        .get(crate::vfio::COMMAND as usize)
        .is_some_and(|c| u16::from(*c) & crate::vfio::COMMAND_MASTER != 0)
}

pub mod model;
pub mod models;
pub mod nvme;

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::fmt::Write as _;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write as _};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt, symlink};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::stat::Mode;
use parking_lot::Mutex;

use crate::PciAddress;
use crate::fixture::{self, EntryKind, Fixture};
use crate::sysfs::snapshot::{self, CaptureOptions};

/// A sysfs tree in a temporary directory, deleted on drop.
#[derive(Debug)]
pub struct FakeSysfs {
    dir: Option<tempfile::TempDir>,
    root: PathBuf,
    /// Absolute paths of the FIFOs created, for [`FakeSysfs::answer_fifos`].
    fifos: Mutex<BTreeSet<PathBuf>>,
    /// Absolute paths of the tripwires, with their watchers.
    tripwires: Mutex<BTreeMap<PathBuf, Tripwire>>,
}

/// A FIFO whose opens a thread counts. Dropping it stops the thread: the FIFO is opened
/// through an `O_PATH` descriptor kept from its creation, so this works even after its
/// directory was deleted.
struct Tripwire {
    opens: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    fifo: OwnedFd,
    watcher: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Tripwire {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tripwire")
            .field("opens", &self.opens.load(Ordering::SeqCst))
            .finish()
    }
}

impl Tripwire {
    fn new(path: &Path) -> io::Result<Tripwire> {
        let fifo = nix::fcntl::open(
            path,
            OFlag::O_PATH | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW,
            Mode::empty(),
        )?;
        let opens = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let watch_path = PathBuf::from(format!("/proc/self/fd/{}", fifo.as_raw_fd()));
        let (o, st) = (Arc::clone(&opens), Arc::clone(&stop));
        let (tid_tx, tid_rx) = std::sync::mpsc::channel();
        let watcher = std::thread::Builder::new()
            .name("pcibus-tripwire".into())
            .spawn(move || {
                let _ = tid_tx.send(nix::unistd::gettid());
                watch(&watch_path, &o, &st)
            })?;
        // A reader that comes and goes before the watcher's first open would be missed:
        // wait until the watcher sleeps (in that open: it has no other place to sleep).
        if let Ok(tid) = tid_rx.recv() {
            let stat = format!("/proc/self/task/{tid}/stat");
            let end = Instant::now() + Duration::from_secs(2);
            while Instant::now() < end {
                let state = fs::read_to_string(&stat).ok().and_then(|s| {
                    let after = s.rsplit_once(')')?.1;
                    after.trim_start().chars().next()
                });
                if state == Some('S') {
                    break;
                }
                std::thread::yield_now();
            }
        }
        Ok(Tripwire {
            opens,
            stop,
            fifo,
            watcher: Some(watcher),
        })
    }
}

// A writer's blocking open of a FIFO returns once a reader has opened it since the open
// began, even a reader that used O_NONBLOCK and has already closed (the kernel counts
// reader opens). So: open, count, close, wait until that reader has gone (a
// non-blocking writer open fails with ENXIO when the FIFO has no reader), repeat. The first
// open is always seen; readers whose opens overlap count once, and one that comes and goes
// in the instant between two of the watcher's opens can be missed.
fn watch(path: &Path, opens: &AtomicUsize, stop: &AtomicBool) {
    loop {
        let writer = match nix::fcntl::open(path, OFlag::O_WRONLY | OFlag::O_CLOEXEC, Mode::empty()) {
            Ok(fd) => fd,
            Err(Errno::EINTR) => continue,
            Err(_) => return,
        };
        if stop.load(Ordering::SeqCst) {
            return;
        }
        opens.fetch_add(1, Ordering::SeqCst);
        // Closing at once gives a blocking reader end of file.
        drop(writer);
        loop {
            if stop.load(Ordering::SeqCst) {
                return;
            }
            match nix::fcntl::open(
                path,
                OFlag::O_WRONLY | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC,
                Mode::empty(),
            ) {
                Err(Errno::ENXIO) => break,
                Ok(still_read) => {
                    drop(still_read);
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(Errno::EINTR) => {}
                Err(_) => return,
            }
        }
    }
}

impl Drop for Tripwire {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let Some(watcher) = self.watcher.take() else {
            return;
        };
        let reopen = PathBuf::from(format!("/proc/self/fd/{}", self.fifo.as_raw_fd()));
        // Each reader open releases a writer open begun before it; repeat until the
        // watcher has seen the stop flag.
        while !watcher.is_finished() {
            let _ = nix::fcntl::open(
                &reopen,
                OFlag::O_RDONLY | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC,
                Mode::empty(),
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        let _ = watcher.join();
    }
}

fn invalid(what: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, what.to_string())
}

/// `to` as a link text relative to the directory `from_dir` (both relative to the root).
fn relative(from_dir: &Path, to: &Path) -> PathBuf {
    let from: Vec<Component> = from_dir.components().collect();
    let to: Vec<Component> = to.components().collect();
    let common = from.iter().zip(&to).take_while(|(a, b)| a == b).count();
    let mut out = PathBuf::new();
    for _ in common..from.len() {
        out.push("..");
    }
    for c in &to[common..] {
        out.push(c);
    }
    out
}

/// Resolves link text of a link in `dir` lexically; `None` when it leaves the root.
fn resolve_lexically(dir: &Path, target: &Path) -> Option<PathBuf> {
    let mut out = dir.to_path_buf();
    for c in target.components() {
        match c {
            Component::Normal(c) => out.push(c),
            Component::ParentDir => {
                if !out.pop() {
                    return None;
                }
            }
            Component::CurDir => {}
            _ => return None,
        }
    }
    Some(out)
}

fn open_fifo_writer(path: &Path) -> io::Result<Option<File>> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_fifo() => {}
        Ok(_) => return Err(invalid(format_args!("{} is not a FIFO", path.display()))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    }
    match OpenOptions::new()
        .write(true)
        .custom_flags((OFlag::O_NONBLOCK | OFlag::O_NOFOLLOW).bits())
        .open(path)
    {
        Ok(f) => Ok(Some(f)),
        // No reader has it open: nobody to answer.
        Err(e) if e.raw_os_error() == Some(nix::libc::ENXIO) => Ok(None),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Where [`FakeSysfs::new`] makes its temporary directory.
fn default_parent() -> PathBuf {
    if let Some(dir) = std::env::var_os("PCIBUS_FAKE_SYSFS_DIR") {
        return PathBuf::from(dir);
    }
    if std::env::var_os("TMPDIR").is_none() {
        let shm = Path::new("/dev/shm");
        let roomy = nix::sys::statvfs::statvfs(shm)
            .is_ok_and(|s| s.blocks_available().saturating_mul(s.fragment_size()) >= 2 << 30);
        if roomy
            && nix::unistd::access(
                shm,
                nix::unistd::AccessFlags::W_OK | nix::unistd::AccessFlags::X_OK,
            )
            .is_ok()
        {
            return shm.to_path_buf();
        }
    }
    std::env::temp_dir()
}

impl FakeSysfs {
    /// An empty tree with `bus/pci/devices`, `bus/pci/drivers`, `devices` and
    /// `kernel/iommu_groups`.
    ///
    /// The temporary directory is made in `$PCIBUS_FAKE_SYSFS_DIR` if set, else in
    /// `$TMPDIR` if set, else in `/dev/shm` when it has at least 2 GiB free (sysfs lives in
    /// memory, and creating many small files on a journaling file system is several times
    /// slower), else in the system's temporary directory. See also [`FakeSysfs::new_in`].
    pub fn new() -> io::Result<Self> {
        Self::new_in(default_parent())
    }

    /// An empty tree (see [`FakeSysfs::new`]) in a new temporary directory below `parent`.
    pub fn new_in(parent: impl AsRef<Path>) -> io::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("pcibus-sysfs-")
            .tempdir_in(parent)?;
        let root = dir.path().to_path_buf();
        for d in [
            "bus/pci/devices",
            "bus/pci/drivers",
            "devices",
            "kernel/iommu_groups",
        ] {
            fs::create_dir_all(root.join(d))?;
        }
        Ok(FakeSysfs {
            dir: Some(dir),
            root,
            fifos: Mutex::new(BTreeSet::new()),
            tripwires: Mutex::new(BTreeMap::new()),
        })
    }

    /// A tree from fixture text (see [`crate::fixture`]); a parse error is
    /// [`io::ErrorKind::InvalidData`].
    pub fn from_fixture(text: &str) -> io::Result<Self> {
        let fixture = fixture::parse(text).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        let fake = Self::new()?;
        fake.materialize(&fixture)?;
        Ok(fake)
    }

    /// A tree from a fixture file.
    pub fn from_fixture_file(path: impl AsRef<Path>) -> io::Result<Self> {
        let path = path.as_ref();
        let text = fs::read_to_string(path)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        Self::from_fixture(&text).map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))
    }

    /// The root of the tree (what `/sys` is on a live system).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Adds the entries of `fixture` to the tree, parents first. Fails on an invalid
    /// fixture ([`Fixture::check`]), on an entry whose path exists as something else, and
    /// before writing through a symlink or a non-directory.
    pub fn materialize(&self, fixture: &Fixture) -> io::Result<()> {
        fixture.check().map_err(invalid)?;
        let mut entries: Vec<_> = fixture.entries.iter().collect();
        entries.sort_by(|a, b| a.path.cmp(&b.path));
        for entry in entries {
            match &entry.kind {
                EntryKind::Dir => self.mkdir(&entry.path)?,
                EntryKind::File(data) => self.write(&entry.path, data)?,
                EntryKind::Link(target) => self.symlink(&entry.path, target)?,
                EntryKind::Fifo => self.mkfifo(&entry.path)?,
            }
        }
        Ok(())
    }

    /// Captures the tree with [`snapshot::capture`] and default options.
    pub fn capture(&self) -> Fixture {
        snapshot::capture(&self.root, &CaptureOptions::default()).unwrap_or_default()
    }

    /// Checks `rel` and creates its missing parents as real directories; the absolute path.
    /// Refuses paths that would go through a symlink or a non-directory.
    fn prepare(&self, rel: &Path) -> io::Result<PathBuf> {
        fixture::check_path(rel).map_err(|why| invalid(format_args!("{}: {why}", rel.display())))?;
        let mut cur = self.root.clone();
        let parent = rel.parent().unwrap_or(Path::new(""));
        for c in parent.components() {
            cur.push(c);
            match fs::symlink_metadata(&cur) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => {
                    return Err(io::Error::new(
                        io::ErrorKind::NotADirectory,
                        format!("{}: parent is a symlink or not a directory", cur.display()),
                    ));
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => match fs::create_dir(&cur) {
                    Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e),
                    _ => {}
                },
                Err(e) => return Err(e),
            }
        }
        Ok(self.root.join(rel))
    }

    fn exists_as(&self, path: &Path, what: &str) -> io::Error {
        io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{} exists and is not {what}", path.display()),
        )
    }

    /// Writes a regular file at `rel` (relative to the root), replacing a regular file.
    pub fn write(&self, rel: impl AsRef<Path>, data: &[u8]) -> io::Result<()> {
        let path = self.prepare(rel.as_ref())?;
        match fs::symlink_metadata(&path) {
            Ok(m) if !m.is_file() => return Err(self.exists_as(&path, "a regular file")),
            _ => {}
        }
        OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .custom_flags(OFlag::O_NOFOLLOW.bits())
            .open(&path)?
            .write_all(data)
    }

    /// Creates a directory at `rel` (and its parents); fine if it exists.
    pub fn mkdir(&self, rel: impl AsRef<Path>) -> io::Result<()> {
        let path = self.prepare(rel.as_ref())?;
        match fs::symlink_metadata(&path) {
            Ok(m) if m.is_dir() => Ok(()),
            Ok(_) => Err(self.exists_as(&path, "a directory")),
            Err(_) => fs::create_dir(&path),
        }
    }

    /// Creates a symlink at `rel` with link text `target` (never followed here).
    pub fn symlink(&self, rel: impl AsRef<Path>, target: impl AsRef<OsStr>) -> io::Result<()> {
        let path = self.prepare(rel.as_ref())?;
        symlink(target.as_ref(), path)
    }

    /// Creates a named pipe at `rel`: opening it for reading blocks until a writer appears
    /// ([`FakeSysfs::answer_fifo`]).
    pub fn mkfifo(&self, rel: impl AsRef<Path>) -> io::Result<()> {
        let path = self.prepare(rel.as_ref())?;
        nix::unistd::mkfifo(&path, Mode::from_bits_truncate(0o644)).map_err(io::Error::from)?;
        self.fifos.lock().insert(path);
        Ok(())
    }

    /// Makes `rel` a tripwire: a FIFO (replacing a regular file there) whose every open, by
    /// any reader with any flags, is counted ([`FakeSysfs::opens`]). A blocking reader
    /// reads end of file. The watcher thread stops when the `FakeSysfs` is dropped.
    pub fn tripwire(&self, rel: impl AsRef<Path>) -> io::Result<()> {
        let path = self.prepare(rel.as_ref())?;
        if fs::symlink_metadata(&path).is_ok_and(|m| m.is_file()) {
            fs::remove_file(&path)?;
        }
        nix::unistd::mkfifo(&path, Mode::from_bits_truncate(0o644)).map_err(io::Error::from)?;
        let wire = Tripwire::new(&path)?;
        self.tripwires.lock().insert(path, wire);
        Ok(())
    }

    /// How often the tripwire at `path` (relative to the root, or absolute) was opened so
    /// far; 0 for a path that is no tripwire.
    pub fn opens(&self, path: impl AsRef<Path>) -> usize {
        let path = self.root.join(path.as_ref());
        self.tripwires
            .lock()
            .get(&path)
            .map_or(0, |t| t.opens.load(Ordering::SeqCst))
    }

    /// Waits until the tripwire at `path` was opened at least `n` times, at most `timeout`
    /// (the watcher counts an open a moment after it happened). Whether it was.
    pub fn wait_for_opens(&self, path: impl AsRef<Path>, n: usize, timeout: Duration) -> bool {
        let path = path.as_ref();
        let end = Instant::now() + timeout;
        while self.opens(path) < n {
            if Instant::now() >= end {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        true
    }

    /// Every tripwire opened so far (absolute path, opens), in path order. Counts lag
    /// opens by a moment: to assert that nothing was opened, let a few milliseconds pass
    /// first (see [`FakeSysfs::settle_tripwires`]).
    pub fn tripped(&self) -> Vec<(PathBuf, usize)> {
        self.tripwires
            .lock()
            .iter()
            .map(|(p, t)| (p.clone(), t.opens.load(Ordering::SeqCst)))
            .filter(|(_, n)| *n > 0)
            .collect()
    }

    /// Gives the tripwire watchers time to count opens that already happened.
    pub fn settle_tripwires(&self) {
        std::thread::sleep(Duration::from_millis(20));
    }

    /// Releases the readers blocked opening any FIFO of the tree: their `open` returns and
    /// their `read` sees end of file. Returns how many FIFOs had a reader.
    pub fn answer_fifos(&self) -> usize {
        let fifos: Vec<PathBuf> = self.fifos.lock().iter().cloned().collect();
        fifos
            .iter()
            .filter(|p| self.answer_fifo(p, b"").unwrap_or(false))
            .count()
    }

    /// Releases the readers blocked opening the FIFO at `path` (relative to the root, or
    /// absolute): writes `data` and closes, so they read `data` then end of file. `false`
    /// when no reader had it open (the data is not kept for later readers).
    pub fn answer_fifo(&self, path: impl AsRef<Path>, data: &[u8]) -> io::Result<bool> {
        let path = self.root.join(path.as_ref());
        let Some(mut writer) = open_fifo_writer(&path)? else {
            return Ok(false);
        };
        // Blocking from now on, so data larger than the pipe buffer gets through.
        nix::fcntl::fcntl(&writer, nix::fcntl::FcntlArg::F_SETFL(OFlag::empty())).map_err(io::Error::from)?;
        writer.write_all(data)?;
        Ok(true)
    }

    /// Opens every FIFO below `under` read-write (which releases readers blocked in
    /// `open`, and keeps their `read` waiting until the returned files are closed).
    fn hold_fifos(&self, under: &Path) -> Vec<File> {
        let fifos = self.fifos.lock();
        fifos
            .iter()
            .filter(|p| p.starts_with(under))
            .filter(|p| fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_fifo()))
            .filter_map(|p| {
                OpenOptions::new()
                    .read(true)
                    .write(true)
                    .custom_flags((OFlag::O_NONBLOCK | OFlag::O_NOFOLLOW).bits())
                    .open(p)
                    .ok()
            })
            .collect()
    }

    /// Starts building the device directory named `name` (normally a PCI address; any
    /// single path component is accepted, for junk).
    pub fn device(&self, name: &str) -> DeviceBuilder<'_> {
        DeviceBuilder {
            fake: self,
            spec: DeviceSpec::new(name),
            vf_index: None,
        }
    }

    /// The device directory `bus/pci/devices/NAME` leads to, relative to the root: the
    /// link resolved lexically, or the entry itself when it is a directory.
    pub fn device_dir(&self, name: &str) -> Option<PathBuf> {
        let list = Path::new("bus/pci/devices");
        let entry = list.join(name);
        let meta = fs::symlink_metadata(self.root.join(&entry)).ok()?;
        if meta.is_dir() {
            return Some(entry);
        }
        let target = fs::read_link(self.root.join(&entry)).ok()?;
        resolve_lexically(list, &target).filter(|p| !p.as_os_str().is_empty())
    }

    /// Deletes the directory of device `name` but leaves its `bus/pci/devices` link (and
    /// the links to it from its driver and IOMMU group) dangling: a device that vanished
    /// during a scan. Readers blocked on its FIFOs are released with end of file.
    pub fn remove_device(&self, name: &str) -> io::Result<()> {
        let dir = self
            .device_dir(name)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("no device {name}")))?;
        // Refuse to go through a symlink.
        self.prepare(&dir)?;
        let abs = self.root.join(&dir);
        if !fs::symlink_metadata(&abs)?.is_dir() {
            return Err(invalid(format_args!("{} is not a directory", dir.display())));
        }
        let held = self.hold_fifos(&abs);
        let result = fs::remove_dir_all(&abs);
        drop(held);
        result
    }

    /// Puts a regular file named `name` in `bus/pci/devices`.
    pub fn junk_file(&self, name: &str, data: &[u8]) -> io::Result<()> {
        self.write(Path::new("bus/pci/devices").join(name), data)
    }

    /// Puts a symlink named `name` with link text `target` in `bus/pci/devices`.
    pub fn junk_link(&self, name: &str, target: &str) -> io::Result<()> {
        self.symlink(Path::new("bus/pci/devices").join(name), target)
    }

    /// Puts a link loop in `bus/pci/devices`: `name` → `name.loop` → `name`.
    pub fn link_loop(&self, name: &str) -> io::Result<()> {
        let other = format!("{name}.loop");
        self.junk_link(name, &other)?;
        self.junk_link(&other, name)
    }
}

impl Drop for FakeSysfs {
    fn drop(&mut self) {
        // Release readers blocked opening a FIFO, delete the tree, then let their reads
        // see end of file.
        self.tripwires.lock().clear();
        let held = self.hold_fifos(&self.root.clone());
        if let Some(dir) = self.dir.take() {
            let _ = dir.close();
        }
        drop(held);
    }
}

/// SR-IOV capability of a physical function.
#[derive(Debug, Clone, Copy)]
struct SriovSpec {
    total: u16,
    num: u16,
    offset: u16,
    stride: u16,
    vf_device: u16,
}

/// Everything written for one device.
#[derive(Debug, Clone)]
struct DeviceSpec {
    name: String,
    parent: Option<PathBuf>,
    vendor: u16,
    device: u16,
    class: u32,
    revision: u8,
    subsystem: (u16, u16),
    numa_node: i32,
    irq: u32,
    driver: Option<String>,
    iommu_group: Option<u32>,
    resources: Vec<(u64, u64, u64)>,
    resource_text: Option<Vec<u8>>,
    config: Option<Vec<u8>>,
    sriov: Option<SriovSpec>,
    physfn: Option<(String, PathBuf, usize)>,
    class_dirs: Vec<String>,
    attrs: Vec<(PathBuf, Vec<u8>)>,
    fifos: Vec<PathBuf>,
    tripwires: Vec<PathBuf>,
    without: Vec<PathBuf>,
}

/// IORESOURCE_MEM | IORESOURCE_SIZEALIGN: a 32-bit memory BAR.
const MEM32: u64 = 0x40200;
/// ... | IORESOURCE_MEM_64 | IORESOURCE_PREFETCH: a 64-bit prefetchable memory BAR.
const MEM64_PREFETCH: u64 = 0x14220c;

impl DeviceSpec {
    fn new(name: &str) -> Self {
        let (bus, devfn) = match PciAddress::parse_strict(name) {
            Ok(a) => (u64::from(a.bus()), u64::from(a.devfn())),
            Err(_) => (0, 0),
        };
        let start = 0xe000_0000 + (bus << 20) + (devfn << 12);
        DeviceSpec {
            name: name.to_string(),
            parent: None,
            vendor: 0x8086,
            device: 0x1533,
            class: 0x020000,
            revision: 3,
            subsystem: (0x8086, 0x0001),
            numa_node: 0,
            irq: 16,
            driver: None,
            iommu_group: None,
            resources: vec![(start, start + 0x3fff, MEM32)],
            resource_text: None,
            config: None,
            sriov: None,
            physfn: None,
            class_dirs: Vec::new(),
            attrs: Vec::new(),
            fifos: Vec::new(),
            tripwires: Vec::new(),
            without: Vec::new(),
        }
    }

    /// `devices/pciDDDD:BB` for an address-like name, else `devices/platform`.
    fn default_parent(name: &str) -> PathBuf {
        let mut parts = name.splitn(3, ':');
        match (parts.next(), parts.next(), parts.next()) {
            (Some(d), Some(b), Some(_)) => PathBuf::from(format!("devices/pci{d}:{b}")),
            _ => PathBuf::from("devices/platform"),
        }
    }

    fn dir(&self) -> PathBuf {
        self.parent
            .clone()
            .unwrap_or_else(|| Self::default_parent(&self.name))
            .join(&self.name)
    }

    fn resource_file(&self) -> Vec<u8> {
        if let Some(text) = &self.resource_text {
            return text.clone();
        }
        let mut out = String::with_capacity(13 * 57);
        for i in 0..13 {
            let (s, e, f) = self.resources.get(i).copied().unwrap_or_default();
            let _ = writeln!(out, "0x{s:016x} 0x{e:016x} 0x{f:016x}");
        }
        out.into_bytes()
    }

    fn config_space(&self) -> Vec<u8> {
        let mut c = vec![0u8; 256];
        let put16 = |c: &mut [u8], at: usize, v: u16| c[at..at + 2].copy_from_slice(&v.to_le_bytes());
        put16(&mut c, 0x00, self.vendor);
        put16(&mut c, 0x02, self.device);
        put16(&mut c, 0x04, if self.driver.is_some() { 0x0406 } else { 0 });
        c[0x08] = self.revision;
        c[0x09] = self.class as u8;
        c[0x0a] = (self.class >> 8) as u8;
        c[0x0b] = (self.class >> 16) as u8;
        c[0x0e] = 0;
        let mut bar = 0;
        for &(start, end, flags) in self.resources.iter().take(6) {
            if bar >= 6 {
                break;
            }
            let at = 0x10 + 4 * bar;
            if end == 0 && start == 0 {
                bar += 1;
                continue;
            }
            if flags & 0x100 != 0 {
                c[at..at + 4].copy_from_slice(&((start as u32 & !3) | 1).to_le_bytes());
                bar += 1;
            } else {
                let mem64 = flags & 0x0010_0000 != 0;
                let prefetch = flags & 0x2000 != 0;
                let low = (start as u32 & !0xf) | if mem64 { 4 } else { 0 } | if prefetch { 8 } else { 0 };
                c[at..at + 4].copy_from_slice(&low.to_le_bytes());
                bar += 1;
                if mem64 && bar < 6 {
                    c[at + 4..at + 8].copy_from_slice(&((start >> 32) as u32).to_le_bytes());
                    bar += 1;
                }
            }
        }
        put16(&mut c, 0x2c, self.subsystem.0);
        put16(&mut c, 0x2e, self.subsystem.1);
        c[0x3c] = self.irq as u8;
        c[0x3d] = 1;
        c
    }
}

/// Writes one device directory and its links. `root` is the tree's root; all names in
/// `spec` have been checked. Driver and group directories are created if missing.
fn write_device(root: &Path, spec: &DeviceSpec) -> io::Result<PathBuf> {
    let rel = spec.dir();
    let dir = root.join(&rel);
    fs::create_dir_all(dir.parent().unwrap_or(root))?;
    fs::create_dir(&dir)?;
    // Files are created relative to the directory's descriptor: no path walk from `/`
    // for each of the ~45 entries (a third of the generator's time).
    let dir_fd = File::open(&dir)?;
    let put = |name: &str, data: &[u8]| -> io::Result<()> {
        let flags = OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW;
        let fd = nix::fcntl::openat(&dir_fd, name, flags, Mode::from_bits_truncate(0o644))?;
        if !data.is_empty() {
            File::from(fd).write_all(data)?;
        }
        Ok(())
    };
    let (v, d, (sv, sd)) = (spec.vendor, spec.device, spec.subsystem);
    put("vendor", format!("0x{v:04x}\n").as_bytes())?;
    put("device", format!("0x{d:04x}\n").as_bytes())?;
    put("subsystem_vendor", format!("0x{sv:04x}\n").as_bytes())?;
    put("subsystem_device", format!("0x{sd:04x}\n").as_bytes())?;
    put("class", format!("0x{:06x}\n", spec.class).as_bytes())?;
    put("revision", format!("0x{:02x}\n", spec.revision).as_bytes())?;
    put("numa_node", format!("{}\n", spec.numa_node).as_bytes())?;
    put("irq", format!("{}\n", spec.irq).as_bytes())?;
    put("resource", &spec.resource_file())?;
    for (i, &(s, e, f)) in spec.resources.iter().enumerate().take(6) {
        if s != 0 || e != 0 {
            put(&format!("resource{i}"), b"")?;
            if f & 0x2000 != 0 {
                put(&format!("resource{i}_wc"), b"")?;
            }
        }
    }
    match &spec.config {
        Some(c) => put("config", c)?,
        None => put("config", &spec.config_space())?,
    }
    let (cc, sc, pi) = (
        (spec.class >> 16) & 0xff,
        (spec.class >> 8) & 0xff,
        spec.class & 0xff,
    );
    let modalias = format!("pci:v{v:08X}d{d:08X}sv{sv:08X}sd{sd:08X}bc{cc:02X}sc{sc:02X}i{pi:02X}");
    put("modalias", format!("{modalias}\n").as_bytes())?;
    let mut uevent = String::new();
    if let Some(drv) = &spec.driver {
        let _ = writeln!(uevent, "DRIVER={drv}");
    }
    let _ = write!(
        uevent,
        "PCI_CLASS={:X}\nPCI_ID={v:04X}:{d:04X}\nPCI_SUBSYS_ID={sv:04X}:{sd:04X}\nPCI_SLOT_NAME={}\nMODALIAS={modalias}\n",
        spec.class, spec.name
    );
    put("uevent", uevent.as_bytes())?;
    put("enable", if spec.driver.is_some() { b"1\n" } else { b"0\n" })?;
    let cpus: &[u8] = if spec.numa_node == 1 { b"2-3\n" } else { b"0-1\n" };
    put("local_cpulist", cpus)?;
    put("local_cpus", if spec.numa_node == 1 { b"c\n" } else { b"3\n" })?;
    put("driver_override", b"(null)\n")?;
    put("msi_bus", b"1\n")?;
    put("dma_mask_bits", b"64\n")?;
    put("consistent_dma_mask_bits", b"64\n")?;
    put("d3cold_allowed", b"1\n")?;
    put("broken_parity_status", b"0\n")?;
    put("ari_enabled", b"0\n")?;
    put("power_state", b"D0\n")?;
    put("current_link_speed", b"8.0 GT/s PCIe\n")?;
    put("current_link_width", b"4\n")?;
    put("max_link_speed", b"8.0 GT/s PCIe\n")?;
    put("max_link_width", b"4\n")?;
    put("remove", b"")?;
    put("rescan", b"")?;
    put("reset", b"")?;
    nix::sys::stat::mkdirat(&dir_fd, "power", Mode::from_bits_truncate(0o755))?;
    put("power/control", b"on\n")?;
    put("power/runtime_status", b"active\n")?;
    put("power/runtime_active_time", b"0\n")?;
    put("power/runtime_suspended_time", b"0\n")?;
    nix::unistd::symlinkat(&relative(&rel, Path::new("bus/pci")), &dir_fd, "subsystem")?;
    if let Some(s) = spec.sriov {
        put("sriov_totalvfs", format!("{}\n", s.total).as_bytes())?;
        put("sriov_numvfs", format!("{}\n", s.num).as_bytes())?;
        put("sriov_offset", format!("{}\n", s.offset).as_bytes())?;
        put("sriov_stride", format!("{}\n", s.stride).as_bytes())?;
        put("sriov_vf_device", format!("{:x}\n", s.vf_device).as_bytes())?;
        put("sriov_drivers_autoprobe", b"1\n")?;
    }
    for class_dir in &spec.class_dirs {
        fs::create_dir_all(dir.join(class_dir))?;
    }
    if let Some((_, pf_dir, index)) = &spec.physfn {
        symlink(relative(&rel, pf_dir), dir.join("physfn"))?;
        let pf_abs = root.join(pf_dir);
        if fs::symlink_metadata(&pf_abs).is_ok_and(|m| m.is_dir()) {
            symlink(relative(pf_dir, &rel), pf_abs.join(format!("virtfn{index}")))?;
        }
    }
    if let Some(drv) = &spec.driver {
        let drv_dir = Path::new("bus/pci/drivers").join(drv);
        ensure_driver(root, &drv_dir)?;
        symlink(relative(&rel, &drv_dir), dir.join("driver"))?;
        symlink(relative(&drv_dir, &rel), root.join(&drv_dir).join(&spec.name))?;
    }
    if let Some(group) = spec.iommu_group {
        let group_dir = PathBuf::from(format!("kernel/iommu_groups/{group}"));
        let abs = root.join(&group_dir);
        if !abs.is_dir() {
            fs::create_dir_all(abs.join("devices"))?;
            fs::write(abs.join("type"), b"DMA\n")?;
            fs::write(
                abs.join("reserved_regions"),
                b"0x00000000fee00000 0x00000000feefffff msi\n",
            )?;
        }
        symlink(relative(&rel, &group_dir), dir.join("iommu_group"))?;
        let back = group_dir.join("devices");
        symlink(relative(&back, &rel), root.join(&back).join(&spec.name))?;
    }
    let list = Path::new("bus/pci/devices");
    fs::create_dir_all(root.join(list))?;
    symlink(relative(list, &rel), root.join(list).join(&spec.name))?;
    Ok(rel)
}

fn ensure_driver(root: &Path, drv_dir: &Path) -> io::Result<()> {
    let abs = root.join(drv_dir);
    if abs.is_dir() {
        return Ok(());
    }
    fs::create_dir_all(&abs)?;
    for f in ["bind", "unbind", "new_id", "remove_id", "uevent"] {
        fs::write(abs.join(f), b"")?;
    }
    Ok(())
}

/// Builds one device directory; see [`FakeSysfs::device`]. Without any setter the device is
/// an Intel Ethernet controller (`8086:1533`, class `0x020000`) on NUMA node 0 with one
/// 32-bit memory BAR, no driver and no IOMMU group.
#[must_use = "call create() to write the device"]
#[derive(Debug)]
pub struct DeviceBuilder<'a> {
    fake: &'a FakeSysfs,
    spec: DeviceSpec,
    vf_index: Option<usize>,
}

impl DeviceBuilder<'_> {
    /// The `vendor` id (also in `config`, `modalias` and `uevent`).
    pub fn vendor(mut self, id: u16) -> Self {
        self.spec.vendor = id;
        self
    }
    /// The `device` id.
    pub fn device_id(mut self, id: u16) -> Self {
        self.spec.device = id;
        self
    }
    /// The 24-bit `class` code (class, subclass, programming interface).
    pub fn class(mut self, class: u32) -> Self {
        self.spec.class = class & 0xff_ffff;
        self
    }
    /// The `revision`.
    pub fn revision(mut self, revision: u8) -> Self {
        self.spec.revision = revision;
        self
    }
    /// `subsystem_vendor` and `subsystem_device`.
    pub fn subsystem(mut self, vendor: u16, device: u16) -> Self {
        self.spec.subsystem = (vendor, device);
        self
    }
    /// `numa_node` (`-1` when the platform does not say).
    pub fn numa_node(mut self, node: i32) -> Self {
        self.spec.numa_node = node;
        self
    }
    /// `irq`.
    pub fn irq(mut self, irq: u32) -> Self {
        self.spec.irq = irq;
        self
    }
    /// Binds to driver `name`: the `driver` link, `bus/pci/drivers/NAME` and its back-link.
    pub fn driver(mut self, name: &str) -> Self {
        self.spec.driver = Some(name.to_string());
        self
    }
    /// Puts the device in IOMMU group `group`: the `iommu_group` link, the group directory
    /// (`type`, `reserved_regions`) and its `devices/ADDR` back-link.
    pub fn iommu_group(mut self, group: u32) -> Self {
        self.spec.iommu_group = Some(group);
        self
    }
    /// The `resource` lines `(start, end, flags)`, padded to 13 with zero lines; also the
    /// BARs of `config` and the `resourceN` files.
    pub fn resources(mut self, lines: &[(u64, u64, u64)]) -> Self {
        self.spec.resources = lines.to_vec();
        self
    }
    /// The exact text of `resource` (e.g. malformed); BARs in `config` stay as they were.
    pub fn resource_text(mut self, text: impl Into<Vec<u8>>) -> Self {
        self.spec.resource_text = Some(text.into());
        self
    }
    /// The exact bytes of `config` (default: 256 bytes consistent with the ids).
    pub fn config(mut self, bytes: impl Into<Vec<u8>>) -> Self {
        self.spec.config = Some(bytes.into());
        self
    }
    /// Writes (or overwrites) the attribute file `name` (may be `dir/file`).
    pub fn attr(mut self, name: &str, bytes: impl Into<Vec<u8>>) -> Self {
        self.spec.attrs.push((PathBuf::from(name), bytes.into()));
        self
    }
    /// Makes attribute `name` a named pipe whose open blocks until answered.
    pub fn fifo(mut self, name: &str) -> Self {
        self.spec.fifos.push(PathBuf::from(name));
        self
    }
    /// Makes attribute `name` a tripwire (see [`FakeSysfs::tripwire`]): a FIFO whose every
    /// open is counted, so a test can assert that an attribute is never opened.
    pub fn tripwire(mut self, name: &str) -> Self {
        self.spec.tripwires.push(PathBuf::from(name));
        self
    }
    /// Leaves out attribute (or directory, or link) `name`.
    pub fn without(mut self, name: &str) -> Self {
        self.spec.without.push(PathBuf::from(name));
        self
    }
    /// Adds a class-device directory, e.g. `nvme/nvme0` or `net/eth0`.
    pub fn class_dir(mut self, path: &str) -> Self {
        self.spec.class_dirs.push(path.to_string());
        self
    }
    /// Makes this an SR-IOV physical function with `total` VFs (`sriov_totalvfs`; also
    /// `sriov_numvfs` 0, `sriov_offset` 128, `sriov_stride` 1, `sriov_vf_device`).
    pub fn sriov_totalvfs(mut self, total: u16) -> Self {
        let vf_device = self.spec.device;
        let s = self.spec.sriov.get_or_insert(SriovSpec {
            total,
            num: 0,
            offset: 128,
            stride: 1,
            vf_device,
        });
        s.total = total;
        self
    }
    /// `sriov_numvfs` (implies [`DeviceBuilder::sriov_totalvfs`] of at least `n`).
    pub fn sriov_numvfs(mut self, n: u16) -> Self {
        let total = self.spec.sriov.map_or(n, |s| s.total.max(n));
        self = self.sriov_totalvfs(total);
        if let Some(s) = &mut self.spec.sriov {
            s.num = n;
        }
        self
    }
    /// `sriov_vf_device`.
    pub fn sriov_vf_device(mut self, id: u16) -> Self {
        let total = self.spec.sriov.map_or(0, |s| s.total);
        self = self.sriov_totalvfs(total);
        if let Some(s) = &mut self.spec.sriov {
            s.vf_device = id;
        }
        self
    }
    /// Makes this a virtual function of `pf`: its directory goes next to the PF's, with a
    /// `physfn` link, and the PF gets a `virtfnN` link (N = [`DeviceBuilder::vf_index`], or
    /// the number of `virtfn*` links it already has).
    pub fn physfn(mut self, pf: &str) -> Self {
        self.spec.physfn = Some((pf.to_string(), PathBuf::new(), 0));
        self
    }
    /// The N of the PF's `virtfnN` link.
    pub fn vf_index(mut self, n: usize) -> Self {
        self.vf_index = Some(n);
        self
    }
    /// Puts the device directory in `dir` (relative to the root, e.g. below a bridge:
    /// `devices/pci0000:00/0000:00:1c.0`) instead of `devices/pciDDDD:BB`.
    pub fn parent_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.spec.parent = Some(dir.into());
        self
    }

    /// Writes the device; returns its directory (absolute). Fails if it exists.
    pub fn create(mut self) -> io::Result<PathBuf> {
        let fake = self.fake;
        let name = &self.spec.name;
        if name.contains('/') || fixture::check_path(Path::new(name)).is_err() {
            return Err(invalid(format_args!("bad device name {name:?}")));
        }
        for d in &self.spec.class_dirs {
            fixture::check_path(Path::new(d)).map_err(invalid)?;
        }
        if let Some(drv) = &self.spec.driver
            && (drv.contains('/') || fixture::check_path(Path::new(drv)).is_err())
        {
            return Err(invalid(format_args!("bad driver name {drv:?}")));
        }
        if let Some((pf, _, _)) = self.spec.physfn.clone() {
            let pf_dir = fake
                .device_dir(&pf)
                .unwrap_or_else(|| DeviceSpec::default_parent(&pf).join(&pf));
            if self.spec.parent.is_none() {
                self.spec.parent = pf_dir.parent().map(Path::to_path_buf);
            }
            let index = self.vf_index.unwrap_or_else(|| {
                fs::read_dir(fake.root.join(&pf_dir)).map_or(0, |rd| {
                    rd.filter_map(Result::ok)
                        .filter(|e| e.file_name().as_encoded_bytes().starts_with(b"virtfn"))
                        .count()
                })
            });
            self.spec.physfn = Some((pf, pf_dir, index));
        }
        let rel = self.spec.dir();
        // Refuse to build below a symlink; creates the parents.
        fake.prepare(&rel)?;
        write_device(&fake.root, &self.spec)?;
        for (name, data) in &self.spec.attrs {
            fake.write(rel.join(name), data)?;
        }
        for name in &self.spec.fifos {
            let path = rel.join(name);
            fixture::check_path(&path).map_err(invalid)?;
            let abs = fake.root.join(&path);
            if fs::symlink_metadata(&abs).is_ok_and(|m| m.is_file()) {
                fs::remove_file(&abs)?;
            }
            fake.mkfifo(&path)?;
        }
        for name in &self.spec.tripwires {
            let path = rel.join(name);
            fixture::check_path(&path).map_err(invalid)?;
            fake.tripwire(&path)?;
        }
        for name in &self.spec.without {
            let path = rel.join(name);
            fixture::check_path(&path).map_err(invalid)?;
            fake.prepare(&path)?;
            let abs = fake.root.join(&path);
            match fs::symlink_metadata(&abs) {
                Ok(m) if m.is_dir() => fs::remove_dir_all(&abs)?,
                Ok(_) => fs::remove_file(&abs)?,
                Err(_) => {}
            }
        }
        Ok(fake.root.join(rel))
    }
}

/// A generator of large, realistic, deterministic trees, for benchmarks and scale tests.
///
/// `devices` PCI functions in all: `pfs` SR-IOV physical functions (Intel 82599, driver
/// `ixgbe`) with `vfs_per_pf` enabled virtual functions each (half bound to `vfio-pci`),
/// and the rest plain endpoints: NVMe drives (mostly `nvme`, some `vfio-pci`, some
/// unbound), Ethernet controllers (`ixgbe`), virtio devices and unbound system
/// peripherals. Endpoints sit 8 to a bus, PFs one to a bus with their VFs at routing
/// offset 128, stride 1. Buses spread round-robin over domains `0000` and `0001` (and
/// `10000`, like Intel VMD, from 1,024 devices on). Every device has its own IOMMU group;
/// NUMA node 0 or 1 by bus. The same `Synthetic` always builds the same tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Synthetic {
    /// PCI functions in all (PFs and VFs included).
    pub devices: usize,
    /// SR-IOV physical functions among them.
    pub pfs: usize,
    /// Enabled VFs per PF (`sriov_numvfs`).
    pub vfs_per_pf: usize,
    /// Varies which endpoints get which kind and driver.
    pub seed: u64,
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

impl Synthetic {
    /// `devices` functions, an eighth of them in SR-IOV PFs (one PF per 64 devices, at
    /// least one from 16 devices on) with 7 VFs each; seed 0.
    pub fn new(devices: usize) -> Self {
        let vfs_per_pf = 7;
        Synthetic {
            devices,
            pfs: if devices >= 16 { (devices / 64).max(1) } else { 0 },
            vfs_per_pf,
            seed: 0,
        }
    }

    fn domains(&self) -> Vec<u32> {
        let pfs = self.pfs.min(self.devices / (self.vfs_per_pf + 1));
        let plain = self.devices - pfs * (self.vfs_per_pf + 1);
        let buses = plain.div_ceil(8) + pfs * (1 + (128 + self.vfs_per_pf) / 256);
        let mut n = if self.devices >= 1024 {
            3
        } else if self.devices >= 64 {
            2
        } else {
            1
        };
        n = n.max(buses.div_ceil(200));
        let mut domains: Vec<u32> = (0..n as u32).collect();
        if self.devices >= 1024
            && let Some(last) = domains.last_mut()
        {
            *last = 0x10000;
        }
        domains
    }

    fn specs(&self) -> Vec<DeviceSpec> {
        let pfs = self.pfs.min(self.devices / (self.vfs_per_pf + 1));
        let plain = self.devices - pfs * (self.vfs_per_pf + 1);
        let domains = self.domains();
        let mut next_bus = vec![1u32; domains.len()];
        let mut turn = 0usize;
        // Allocates `count` buses in the next domain round-robin: (domain index, first bus).
        let mut alloc = |count: u32| {
            let d = turn % domains.len();
            turn += 1;
            let first = next_bus[d];
            next_bus[d] += count;
            (d, first)
        };
        let mut specs = Vec::with_capacity(self.devices);
        let mut group = 0u32;
        let mut new_spec = |domain: u32, bus: u32, devfn: u32| {
            let name = PciAddress::new(domain, bus as u8, (devfn >> 3) as u8, (devfn & 7) as u8)
                .map(|a| a.to_string())
                .unwrap_or_default();
            let mut s = DeviceSpec::new(&name);
            group += 1;
            s.iommu_group = Some(group);
            s.irq = 24 + group;
            s.numa_node = i32::from(bus >= 0x80) ^ i32::from(domain == 1);
            (s, group)
        };
        let mut plain_left = plain;
        let mut pf_left = pfs;
        let mut i = 0u64;
        // Interleave endpoint buses and PF buses so both kinds spread over all domains.
        while plain_left > 0 || pf_left > 0 {
            if plain_left > 0 {
                let (d, bus) = alloc(1);
                for slot in 0..plain_left.min(8) as u32 {
                    let (mut s, group) = new_spec(domains[d], bus, slot << 3);
                    let h = splitmix(self.seed ^ i);
                    i += 1;
                    let bar = (0x2_0000_0000u64 + (u64::from(group) << 20), 0x4000u64);
                    match h % 4 {
                        0 => {
                            (s.vendor, s.device, s.class) = (0x8086, 0x0a54, 0x010802);
                            s.subsystem = (0x8086, 0x4802);
                            s.resources = vec![(bar.0, bar.0 + bar.1 - 1, MEM64_PREFETCH & !0x2000)];
                            s.driver = match (h >> 8) % 10 {
                                0 => Some("vfio-pci".into()),
                                1 => None,
                                _ => Some("nvme".into()),
                            };
                            if s.driver.as_deref() == Some("nvme") {
                                s.class_dirs.push(format!("nvme/nvme{}", group));
                            }
                        }
                        1 => {
                            (s.vendor, s.device, s.class) = (0x8086, 0x1528, 0x020000);
                            s.subsystem = (0x8086, 0x0001);
                            s.resources = vec![(bar.0, bar.0 + 0x1f_ffff, MEM64_PREFETCH)];
                            s.driver = Some("ixgbe".into());
                            s.class_dirs.push(format!("net/eth{group}"));
                        }
                        2 => {
                            (s.vendor, s.device, s.class) = (0x1af4, 0x1041, 0x020000);
                            s.subsystem = (0x1af4, 0x1100);
                            s.driver = (h >> 8).is_multiple_of(2).then(|| "virtio-pci".to_string());
                            s.revision = 1;
                            if s.driver.is_some() {
                                s.class_dirs.push(format!("virtio{group}"));
                            }
                        }
                        _ => {
                            (s.vendor, s.device, s.class) = (0x8086, 0x2f28, 0x088000);
                            s.subsystem = (0x8086, 0x0000);
                            s.resources = Vec::new();
                            s.numa_node = -1;
                        }
                    }
                    specs.push(s);
                }
                plain_left -= plain_left.min(8);
            }
            if pf_left > 0 {
                pf_left -= 1;
                let vfs = self.vfs_per_pf as u32;
                let last_rid = 128 + vfs.saturating_sub(1);
                let (d, bus) = alloc(1 + last_rid / 256);
                let (mut pf, group) = new_spec(domains[d], bus, 0);
                (pf.vendor, pf.device, pf.class) = (0x8086, 0x10fb, 0x020000);
                pf.subsystem = (0x8086, 0x000c);
                pf.driver = Some("ixgbe".into());
                let bar = 0x3_0000_0000u64 + (u64::from(group) << 24);
                pf.resources = vec![
                    (bar, bar + 0x7_ffff, MEM64_PREFETCH),
                    (0, 0, 0),
                    (
                        0xe000 + u64::from(group) * 0x20,
                        0xe01f + u64::from(group) * 0x20,
                        0x40101,
                    ),
                    (0, 0, 0),
                    (bar + 0x8_0000, bar + 0x8_3fff, MEM64_PREFETCH),
                ];
                pf.sriov = Some(SriovSpec {
                    total: 63.max(vfs) as u16,
                    num: vfs as u16,
                    offset: 128,
                    stride: 1,
                    vf_device: 0x10ed,
                });
                pf.class_dirs.push(format!("net/eth{group}"));
                let pf_name = pf.name.clone();
                let pf_dir = pf.dir();
                specs.push(pf);
                for n in 0..vfs {
                    let rid = 128 + n;
                    let (mut vf, _) = new_spec(domains[d], bus + rid / 256, rid % 256);
                    (vf.vendor, vf.device, vf.class) = (0x8086, 0x10ed, 0x020000);
                    vf.subsystem = (0x8086, 0x000c);
                    vf.parent = pf_dir.parent().map(Path::to_path_buf);
                    let vbar = bar + 0x10_0000 + u64::from(n) * 0x8000;
                    vf.resources = vec![
                        (vbar, vbar + 0x3fff, MEM64_PREFETCH),
                        (0, 0, 0),
                        (0, 0, 0),
                        (vbar + 0x4000, vbar + 0x7fff, MEM64_PREFETCH),
                    ];
                    vf.driver = (n % 2 == 0).then(|| "vfio-pci".to_string());
                    vf.physfn = Some((pf_name.clone(), pf_dir.clone(), n as usize));
                    specs.push(vf);
                }
            }
        }
        specs
    }

    /// The addresses the tree will have, sorted.
    pub fn addresses(&self) -> Vec<PciAddress> {
        let mut v: Vec<PciAddress> = self.specs().iter().filter_map(|s| s.name.parse().ok()).collect();
        v.sort();
        v
    }

    /// Writes the tree into `fake` (which should be empty); returns the addresses, sorted.
    /// Uses two threads.
    pub fn build(&self, fake: &FakeSysfs) -> io::Result<Vec<PciAddress>> {
        let specs = self.specs();
        let root = fake.root();
        for drv in ["nvme", "ixgbe", "vfio-pci", "virtio-pci"] {
            ensure_driver(root, &Path::new("bus/pci/drivers").join(drv))?;
        }
        // PFs before their VFs (the VFs link back): split by PF blocks, not mid-block.
        let half = specs.len() / 2;
        let split = (half..specs.len())
            .find(|&i| specs[i].physfn.is_none())
            .unwrap_or(specs.len());
        let (a, b) = specs.split_at(split);
        std::thread::scope(|scope| {
            let t = scope.spawn(|| b.iter().try_for_each(|s| write_device(root, s).map(drop)));
            let first = a.iter().try_for_each(|s| write_device(root, s).map(drop));
            let second = t
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("generator thread panicked")));
            first.and(second)
        })?;
        let mut v: Vec<PciAddress> = specs.iter().filter_map(|s| s.name.parse().ok()).collect();
        v.sort();
        Ok(v)
    }
}
