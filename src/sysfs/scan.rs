//! The sysfs walk: one [`DeviceRecord`] record per entry of `bus/pci/devices`.
//!
//! The fast path reads only attributes whose kernel `show()` takes no lock: the `config`
//! header (or the id files), `resource`, `numa_node`, `sriov_totalvfs` and its siblings that take no lock
//! siblings, and the `driver`, `iommu_group`, `physfn` and `virtfnN` links. The attributes
//! that take the device lock ([`BlockingAttr`]) are read only when asked for, through the
//! [`BlockingPool`], and never for a device in the [`RemovalRegistry`].
//!
//! ```no_run
//! use pcibus::sysfs::scan::{Scanner, SysfsRoot};
//! let scan = Scanner::new(SysfsRoot::from_env()).scan()?;
//! for dev in &scan.devices {
//!     println!("{} {:?}:{:?} driver {:?}", dev.address, dev.vendor, dev.device, dev.driver);
//! }
//! # Ok::<(), pcibus::sysfs::scan::ScanError>(())
//! ```

use std::collections::BTreeSet;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::PciAddress;
use crate::record::{DeviceRecord, ProblemKind};
use crate::removal::pool::{BlockingPool, PoolError};
use crate::removal::registry::{DeviceIdentity, RemovalRegistry};
use crate::sysfs::dir::{ATTR_MAX, DirFd};
use crate::sysfs::fast::{Outcome, Progress, read_device};
use crate::sysfs::parse;

/// Where sysfs is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SysfsRoot {
    root: PathBuf,
    devices: PathBuf,
}

impl SysfsRoot {
    /// A sysfs mounted (or faked) at `root`; devices are listed in `root/bus/pci/devices`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        let root = root.into();
        let devices = root.join("bus/pci/devices");
        SysfsRoot { root, devices }
    }

    /// A devices directory given directly, as DPDK's `SYSFS_PCI_DEVICES` does. The root is
    /// taken to be three levels up when the path ends in `bus/pci/devices`.
    pub fn from_devices_dir(devices: impl Into<PathBuf>) -> Self {
        let devices: PathBuf = devices.into();
        let root = if devices.ends_with("bus/pci/devices") {
            devices
                .ancestors()
                .nth(3)
                .map_or_else(|| devices.clone(), Path::to_path_buf)
        } else {
            devices.clone()
        };
        SysfsRoot { root, devices }
    }

    /// `PCIBUS_SYSFS` (a sysfs root) if set, else DPDK's `SYSFS_PCI_DEVICES` (a devices
    /// directory) if set, else `/sys`.
    pub fn from_env() -> Self {
        if let Some(root) = std::env::var_os("PCIBUS_SYSFS").filter(|v| !v.is_empty()) {
            SysfsRoot::new(root)
        } else if let Some(dir) = std::env::var_os("SYSFS_PCI_DEVICES").filter(|v| !v.is_empty()) {
            SysfsRoot::from_devices_dir(dir)
        } else {
            SysfsRoot::new("/sys")
        }
    }

    /// The sysfs root.
    pub fn path(&self) -> &Path {
        &self.root
    }

    /// The directory listing the devices.
    pub fn devices_dir(&self) -> &Path {
        &self.devices
    }

    /// The directory of one device.
    pub fn device_dir(&self, address: PciAddress) -> PathBuf {
        self.devices.join(address.to_string())
    }
}

/// Attributes whose kernel `show()` takes the device lock, so a read blocks while the
/// device's removal is pending (measured on 6.1; on 6.12 only the SR-IOV two block).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum BlockingAttr {
    /// `sriov_numvfs`: VFs enabled now.
    SriovNumvfs,
    /// `sriov_vf_total_msix`: MSI-X vectors the PF can hand to its VFs.
    SriovVfTotalMsix,
    /// `driver_override`.
    DriverOverride,
    /// `uevent`.
    Uevent,
}

impl BlockingAttr {
    /// All of them.
    pub const ALL: [BlockingAttr; 4] = [
        BlockingAttr::SriovNumvfs,
        BlockingAttr::SriovVfTotalMsix,
        BlockingAttr::DriverOverride,
        BlockingAttr::Uevent,
    ];

    /// The sysfs file name.
    pub const fn name(self) -> &'static str {
        match self {
            BlockingAttr::SriovNumvfs => "sriov_numvfs",
            BlockingAttr::SriovVfTotalMsix => "sriov_vf_total_msix",
            BlockingAttr::DriverOverride => "driver_override",
            BlockingAttr::Uevent => "uevent",
        }
    }

    // The SR-IOV attributes exist only on PFs.
    fn applies_to(self, dev: &DeviceRecord) -> bool {
        match self {
            BlockingAttr::SriovNumvfs | BlockingAttr::SriovVfTotalMsix => dev.sriov.is_some(),
            BlockingAttr::DriverOverride | BlockingAttr::Uevent => true,
        }
    }
}

/// Where the fast path takes ids, class and revision from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum IdSource {
    /// The first 64 bytes of `config`: one read instead of six. Falls back to the id
    /// files for VFs (whose config space reads 0xffff as ids), for devices whose header
    /// reads 0xffff or is short, for the subsystem ids of bridges, and for devices whose
    /// removal is pending (a `config` read waits while a device is being reset).
    #[default]
    Config,
    /// The `vendor`, `device`, `subsystem_*`, `class` and `revision` files, which carry the
    /// kernel's quirk-adjusted values.
    Files,
}

/// A scan could not run at all. One device's trouble never makes a scan fail: it
/// becomes a [`Problem`](crate::record::Problem) in that device's record.
#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    /// The devices directory cannot be read.
    #[error("cannot read the PCI devices directory {}", path.display())]
    Root {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The scanner defers scans while any removal is pending, and some are.
    #[error("scan deferred: removal pending for {}", list(pending))]
    Deferred {
        /// The devices whose removal is pending.
        pending: Vec<PciAddress>,
    },
}

fn list(addrs: &[PciAddress]) -> String {
    addrs.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(", ")
}

/// An entry of the devices directory that is not a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ignored {
    /// The entry's name (lossy UTF-8).
    pub name: String,
    /// Why it was ignored.
    pub reason: String,
}

/// What a scan found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Scan {
    /// One record per device, sorted by address.
    pub devices: Vec<DeviceRecord>,
    /// Entries of the devices directory that are not devices: names that are not PCI
    /// addresses as the kernel writes them, and entries that are not directories.
    pub ignored: Vec<Ignored>,
    /// Devices listed but gone before they could be read (removed during the scan).
    pub vanished: Vec<PciAddress>,
    /// Registry entries dropped by this scan because their device is gone.
    pub released: Vec<PciAddress>,
}

impl Scan {
    /// The record of `address`, if the scan has one.
    pub fn get(&self, address: PciAddress) -> Option<&DeviceRecord> {
        self.devices
            .binary_search_by_key(&address, |d| d.address)
            .ok()
            .map(|i| &self.devices[i])
    }
}

/// Scans sysfs for PCI devices. Cheap to clone; configure it with the builder methods.
#[derive(Debug, Clone)]
pub struct Scanner {
    root: SysfsRoot,
    registry: Arc<RemovalRegistry>,
    guard: BlockingPool,
    allow: Option<BTreeSet<PciAddress>>,
    block: BTreeSet<PciAddress>,
    blocking: Vec<BlockingAttr>,
    guard_everything: bool,
    timeout: Duration,
    defer: bool,
    threads: usize,
    ids: IdSource,
}

/// Fewest devices per scan thread: below this, starting a thread costs more than it saves.
const DEVICES_PER_THREAD: usize = 16;

impl Scanner {
    /// A scanner of `root` with its own registry and guard, reading no blocking attribute,
    /// a 1 s deadline for guarded reads, and a thread per core (at most 4).
    pub fn new(root: SysfsRoot) -> Self {
        Scanner {
            root,
            registry: Arc::new(RemovalRegistry::new()),
            guard: BlockingPool::default(),
            allow: None,
            block: BTreeSet::new(),
            blocking: Vec::new(),
            guard_everything: false,
            timeout: Duration::from_secs(1),
            defer: false,
            threads: thread::available_parallelism().map_or(1, |n| n.get().min(4)),
            ids: IdSource::default(),
        }
    }

    /// Shares `registry` (with the vfio layer, a uevent monitor, other scanners).
    pub fn registry(mut self, registry: Arc<RemovalRegistry>) -> Self {
        self.registry = registry;
        self
    }

    /// Shares `pool`'s threads.
    pub fn pool(mut self, pool: BlockingPool) -> Self {
        self.guard = pool;
        self
    }

    /// Scans only these devices (an allow list, applied before any attribute is read).
    pub fn allow(mut self, addresses: impl IntoIterator<Item = PciAddress>) -> Self {
        self.allow.get_or_insert_with(BTreeSet::new).extend(addresses);
        self
    }

    /// Never scans these devices (a block list, applied before any attribute is read).
    pub fn block(mut self, addresses: impl IntoIterator<Item = PciAddress>) -> Self {
        self.block.extend(addresses);
        self
    }

    /// Also reads `attr` (through the guard) for every device it applies to, except those
    /// whose removal is pending.
    pub fn read_blocking(mut self, attr: BlockingAttr) -> Self {
        if !self.blocking.contains(&attr) {
            self.blocking.push(attr);
            self.blocking.sort();
        }
        self
    }

    /// Reads every attribute through the guard, not only the blocking ones: each device is
    /// one guarded job, so even a read that takes no device lock but that hangs cannot hold up the scan.
    pub fn guard_everything(mut self, yes: bool) -> Self {
        self.guard_everything = yes;
        self
    }

    /// How long a scan waits for guarded reads, from its start (default 1 s).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Refuses to scan while any removal is pending ([`ScanError::Deferred`]), as SPDK's
    /// hotplug poller does.
    pub fn defer_while_removal_pending(mut self, yes: bool) -> Self {
        self.defer = yes;
        self
    }

    /// How many threads walk the devices (1 = walk on the calling thread).
    pub fn threads(mut self, threads: usize) -> Self {
        self.threads = threads.max(1);
        self
    }

    /// Where ids come from.
    pub fn id_source(mut self, ids: IdSource) -> Self {
        self.ids = ids;
        self
    }

    /// The root scanned.
    pub fn root(&self) -> &SysfsRoot {
        &self.root
    }

    /// The registry consulted.
    pub fn removal_registry(&self) -> &Arc<RemovalRegistry> {
        &self.registry
    }

    /// Scans the devices directory.
    pub fn scan(&self) -> Result<Scan, ScanError> {
        let deadline = Instant::now() + self.timeout;
        let dir_path = self.root.devices_dir();
        let root_err = |source| ScanError::Root {
            path: dir_path.to_path_buf(),
            source,
        };
        let devices_dir = Arc::new(DirFd::open(dir_path).map_err(root_err)?);
        let mut scan = Scan::default();
        let mut listed = Vec::new();
        for entry in std::fs::read_dir(dir_path).map_err(root_err)? {
            let entry = entry.map_err(root_err)?;
            let name = entry.file_name();
            match std::str::from_utf8(name.as_bytes())
                .ok()
                .map(PciAddress::parse_strict)
            {
                Some(Ok(address)) => listed.push(address),
                Some(Err(e)) => scan.ignored.push(Ignored {
                    name: name.to_string_lossy().into_owned(),
                    reason: e.reason.to_string(),
                }),
                None => scan.ignored.push(Ignored {
                    name: name.to_string_lossy().into_owned(),
                    reason: "not UTF-8".into(),
                }),
            }
        }
        listed.sort_unstable();

        scan.released = self.registry.prune(|a| {
            listed
                .binary_search(&a)
                .is_ok()
                .then(|| DeviceIdentity::of(&self.root.device_dir(a)).ok())
        });
        if self.defer && !self.registry.is_empty() {
            return Err(ScanError::Deferred {
                pending: self.registry.pending().into_iter().map(|p| p.address).collect(),
            });
        }
        let wanted: Vec<(PciAddress, bool)> = listed
            .into_iter()
            .filter(|a| self.allow.as_ref().is_none_or(|allow| allow.contains(a)) && !self.block.contains(a))
            .map(|a| (a, self.registry.is_pending(a)))
            .collect();

        let outcomes = if self.guard_everything {
            self.walk_guarded(&devices_dir, &wanted, deadline)
        } else {
            self.walk(&devices_dir, &wanted)
        };
        for outcome in outcomes {
            match outcome {
                Outcome::Found(dev) => scan.devices.push(*dev),
                Outcome::Vanished(a) => scan.vanished.push(a),
                Outcome::Ignored(ignored) => scan.ignored.push(ignored),
            }
        }
        if !self.guard_everything && !self.blocking.is_empty() {
            self.read_blocking_attrs(&mut scan.devices, deadline);
        }
        scan.ignored.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(scan)
    }

    /// Scans one device; `Ok(None)` when it does not exist (or vanished meanwhile).
    pub fn scan_device(&self, address: PciAddress) -> Result<Option<DeviceRecord>, ScanError> {
        let one = Scanner {
            allow: Some(BTreeSet::from([address])),
            ..self.clone()
        };
        Ok(one.scan()?.devices.pop())
    }

    // The fast path on `self.threads` threads, unguarded.
    fn walk(&self, devices_dir: &DirFd, wanted: &[(PciAddress, bool)]) -> Vec<Outcome> {
        let threads = self.threads.min(wanted.len().div_ceil(DEVICES_PER_THREAD)).max(1);
        if threads == 1 {
            return wanted
                .iter()
                .map(|&(a, pending)| read_device(self.ids, devices_dir, a, pending, None))
                .collect();
        }
        let next = AtomicUsize::new(0);
        const CHUNK: usize = 16;
        let mut parts: Vec<(usize, Outcome)> = thread::scope(|s| {
            let workers: Vec<_> = (0..threads)
                .map(|_| {
                    s.spawn(|| {
                        let mut out = Vec::new();
                        loop {
                            let start = next.fetch_add(CHUNK, Ordering::Relaxed);
                            if start >= wanted.len() {
                                break out;
                            }
                            for (i, &(a, pending)) in wanted.iter().enumerate().skip(start).take(CHUNK) {
                                out.push((i, read_device(self.ids, devices_dir, a, pending, None)));
                            }
                        }
                    })
                })
                .collect();
            workers
                .into_iter()
                .flat_map(|w| w.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
                .collect()
        });
        parts.sort_unstable_by_key(|(i, _)| *i);
        parts.into_iter().map(|(_, o)| o).collect()
    }

    // Every device is one job on the guard, blocking attributes included; the scan takes
    // what is done by the deadline.
    fn walk_guarded(
        &self,
        devices_dir: &Arc<DirFd>,
        wanted: &[(PciAddress, bool)],
        deadline: Instant,
    ) -> Vec<Outcome> {
        // Per device: which attribute its job is reading, and the record so far, so that a
        // timeout can name the attribute and keep what was read before it.
        struct Track {
            progress: Progress,
            partial: Mutex<Option<DeviceRecord>>,
        }
        let tracks: Arc<Vec<Track>> = Arc::new(
            wanted
                .iter()
                .map(|_| Track {
                    progress: Progress::default(),
                    partial: Mutex::new(None),
                })
                .collect(),
        );
        let me = Arc::new(self.clone());
        let jobs = wanted.iter().enumerate().map(|(i, &(address, pending))| {
            let (me, dir, tracks) = (Arc::clone(&me), Arc::clone(devices_dir), Arc::clone(&tracks));
            move || {
                let track = &tracks[i];
                let mut outcome = read_device(me.ids, &dir, address, pending, Some(&track.progress));
                if let Outcome::Found(dev) = &mut outcome
                    && !me.blocking.is_empty()
                {
                    *track.partial.lock() = Some((**dev).clone());
                    me.read_blocking_inline(&dir, dev, &track.progress);
                }
                outcome
            }
        });
        let results = self.guard.submit_all(jobs).wait_until(deadline);
        results
            .into_iter()
            .zip(wanted)
            .zip(tracks.iter())
            .map(|((result, &(address, _)), track)| match result {
                Ok(outcome) => outcome,
                Err(err) => {
                    let attribute = track.progress.attribute();
                    let mut dev = track
                        .partial
                        .lock()
                        .take()
                        .unwrap_or_else(|| DeviceRecord::new(address));
                    dev.report(attribute, timed_out(err, self.timeout));
                    self.registry.mark_stuck(address, None, attribute);
                    Outcome::Found(Box::new(dev))
                }
            })
            .collect()
    }

    // Submits every requested blocking read of every device at once, then collects them by
    // the deadline: K stuck reads cost one deadline, not K.
    fn read_blocking_attrs(&self, devices: &mut [DeviceRecord], deadline: Instant) {
        let mut reads = Vec::new();
        for (i, dev) in devices.iter_mut().enumerate() {
            for attr in self.blocking_to_read(dev) {
                reads.push((i, attr, self.root.device_dir(dev.address).join(attr.name())));
            }
        }
        let jobs: Vec<_> = reads
            .iter()
            .map(|(_, _, path)| {
                let path = path.clone();
                move || crate::removal::pool::read_blocking(&path, ATTR_MAX)
            })
            .collect();
        let results = self.guard.submit_all(jobs).wait_until(deadline);
        for ((i, attr, _), result) in reads.into_iter().zip(results) {
            let dev = &mut devices[i];
            match result {
                Ok(result) => apply_blocking(dev, attr, result),
                Err(err) => {
                    dev.report(attr.name(), timed_out(err, self.timeout));
                    self.registry.mark_stuck(dev.address, None, attr.name());
                }
            }
        }
    }

    // The requested blocking attributes that `dev` has; for a device whose removal is
    // pending, none, each reported as not read.
    fn blocking_to_read(&self, dev: &mut DeviceRecord) -> Vec<BlockingAttr> {
        let applicable: Vec<BlockingAttr> = self
            .blocking
            .iter()
            .copied()
            .filter(|a| a.applies_to(dev))
            .collect();
        if dev.removal_pending {
            for attr in applicable {
                dev.report(attr.name(), ProblemKind::RemovalPending);
            }
            return Vec::new();
        }
        applicable
    }

    // Inside a guarded per-device job: read the blocking attributes directly.
    fn read_blocking_inline(&self, devices_dir: &DirFd, dev: &mut DeviceRecord, progress: &Progress) {
        let attrs = self.blocking_to_read(dev);
        if attrs.is_empty() {
            return;
        }
        let dir = devices_dir.open_dir(&dev.address.to_string());
        for attr in attrs {
            progress.at(attr.name());
            let result = match &dir {
                Ok(d) => d.read_blocking(attr.name(), ATTR_MAX),
                Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
            };
            apply_blocking(dev, attr, result);
        }
    }
}

// A read that did not answer by the scan's deadline. All of a scan's guarded reads share
// that deadline, counted from the scan's start, so that is the wait reported (not the
// part of it left when the read was submitted).
fn timed_out(err: PoolError, deadline: Duration) -> ProblemKind {
    match err {
        PoolError::TimedOut { .. } => ProblemKind::TimedOut { waited: deadline },
        PoolError::NotStarted { .. } => ProblemKind::NotStarted { waited: deadline },
        PoolError::Panicked => ProblemKind::Io {
            kind: io::ErrorKind::Other,
            errno: None,
            message: "the read panicked (a bug in pcibus)".into(),
        },
    }
}

fn apply_blocking(dev: &mut DeviceRecord, attr: BlockingAttr, result: io::Result<Vec<u8>>) {
    let name = attr.name();
    let bytes = match result {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return,
        Err(e) => return dev.report(name, ProblemKind::io(&e)),
    };
    match attr {
        BlockingAttr::SriovNumvfs => match parse::decimal_u16(name, &bytes) {
            Ok(n) => {
                if let Some(s) = dev.sriov.as_mut() {
                    s.num_vfs = Some(n);
                }
            }
            Err(e) => dev.report(name, ProblemKind::Parse(e)),
        },
        BlockingAttr::SriovVfTotalMsix => match parse::decimal_u32(name, &bytes) {
            Ok(n) => dev.sriov_vf_total_msix = Some(n),
            Err(e) => dev.report(name, ProblemKind::Parse(e)),
        },
        BlockingAttr::DriverOverride => {
            let text = String::from_utf8_lossy(&bytes);
            let text = text.trim();
            // Unset reads as "(null)" on the kernels we know, empty on others.
            if !text.is_empty() && text != "(null)" {
                dev.driver_override = Some(text.to_owned());
            }
        }
        BlockingAttr::Uevent => match parse::uevent(&bytes) {
            Ok(u) => dev.uevent = Some(u.entries),
            Err(e) => dev.report(name, ProblemKind::Parse(e)),
        },
    }
}
