//! The sysfs walk: one [`DeviceRecord`] record per entry of `bus/pci/devices`.
//!
//! The fast path reads only attributes whose read never waits: `modalias` and `revision`
//! (or the id files), `resource`, `numa_node`, `sriov_totalvfs` and its siblings, and the
//! `driver`, `iommu_group`, `physfn` and `virtfnN` links. It never opens `config` (a read
//! of it waits while the function is being reset, which vfio-pci does on every open and
//! close) nor the attributes that take the device lock ([`BlockingAttr`]). Those are read
//! only when asked for, through the [`BlockingPool`], each with its own deadline; the
//! blocking attributes never for a device in the [`RemovalRegistry`] or held open by this
//! process through vfio ([`crate::removal::held`]), checked again right before each read.
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
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::thread;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::PciAddress;
use crate::record::{DeviceRecord, ProblemKind};
use crate::removal::claim::ClaimDir;
use crate::removal::held;
use crate::removal::pool::BlockingPool;
use crate::removal::registry::{DeviceIdentity, RemovalRegistry, StuckId};
use crate::sysfs::bind::is_kernel_sysfs;
use crate::sysfs::dir::{ATTR_MAX, DirFd};
use crate::sysfs::fast::{
    ConfigWanted, Found, Outcome, Progress, apply_config, ids_from_files, read_device, subsystem_from_files,
};
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

/// Where ids, class and revision come from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum IdSource {
    /// `modalias` (vendor, device, subsystem ids and class in one read) and `revision`:
    /// the kernel's cached, quirk-adjusted values, which never wait. The id files where
    /// `modalias` is missing or does not parse. Where the kernel has no `revision` file,
    /// or no subsystem ids, `config` is read for them, through the pool.
    #[default]
    Files,
    /// The six id files (`vendor`, `device`, `subsystem_vendor`, `subsystem_device`,
    /// `class`, `revision`), with the same fallbacks as [`IdSource::Files`]. Slower: six
    /// reads instead of two.
    IdFiles,
    /// The first 64 bytes of `config`, as the device reports them, read through the pool
    /// with the scan's timeout (a `config` read waits while the function is being reset).
    /// The id files for VFs (whose config space reads 0xffff as ids), for devices whose
    /// header reads 0xffff, is short or did not come in time, for the subsystem ids of
    /// bridges, and for devices whose removal is pending.
    Config,
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
    private_fd_tables: bool,
    claims: Claims,
    ids: IdSource,
}

// Gives the calling walker thread a private copy of the fd table. Every attribute read is
// an open and a close, and both take the process's fd-table lock: with two walkers on two
// cores that lock costs ~10% of a scan (measured: 45.7 → 41.8 ms at 4,096 devices). The
// walker opens and closes only its own fds, returns none, and exits at the end of the scan,
// which drops the copy. The copy holds references to the files open when it was made, so
// a file another thread closes during a scan is released when the walkers end (a scan
// takes milliseconds; the fast path never waits). Only threads the scanner spawned do this,
// never the caller's thread. Where unsharing is refused (seccomp), walkers share the table.
fn private_fd_table() {
    if let Err(e) = nix::sched::unshare(nix::sched::CloneFlags::CLONE_FILES) {
        log::debug!("walker keeps the shared fd table: unshare(CLONE_FILES): {e}");
    }
}

// Which claims directory a scan consults.
#[derive(Debug, Clone)]
enum Claims {
    // The host's (`ClaimDir::from_env`), when scanning the kernel's sysfs. Shared by the
    // scanner's clones: it remembers the marks it made in the registry.
    Host(Arc<ClaimDir>),
    Dir(Arc<ClaimDir>),
    None,
}

/// Fewest devices per scan thread: below this, starting a thread costs more than it saves.
const DEVICES_PER_THREAD: usize = 16;

impl Scanner {
    /// A scanner of `root` with its own registry, the process-wide [`BlockingPool`], ids
    /// from [`IdSource::Files`], reading no blocking attribute, a 1 s deadline per guarded
    /// read, and a thread per core (at most 4).
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
            private_fd_tables: false,
            claims: Claims::Host(Arc::new(ClaimDir::from_env())),
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

    /// Also reads `attr` (through the pool) for every device it applies to, except those
    /// whose removal is pending ([`ProblemKind::RemovalPending`]) and those this process
    /// holds open through vfio ([`ProblemKind::HeldOpen`]): a read of a held device's
    /// lock-taking attribute could wait for the process's own fd to be closed. Both are
    /// checked again on the helper thread right before each read.
    pub fn read_blocking(mut self, attr: BlockingAttr) -> Self {
        if !self.blocking.contains(&attr) {
            self.blocking.push(attr);
            self.blocking.sort();
        }
        self
    }

    /// Reads every attribute through the pool, not only the blocking ones: each device is
    /// one guarded job, so even a read that takes no device lock but hangs cannot hold up
    /// the scan.
    pub fn guard_everything(mut self, yes: bool) -> Self {
        self.guard_everything = yes;
        self
    }

    /// How long each guarded read may take, counted from its submission (default 1 s). A
    /// read that started and has not returned by then is stuck in the kernel
    /// ([`ProblemKind::TimedOut`], and the device goes into the registry until the read
    /// returns); one that could not start because every helper thread was busy or stuck
    /// is [`ProblemKind::NotStarted`] (the registry is not touched). Reads left in the
    /// queue while others complete are not given up: only a deadline without any progress
    /// leaves them unread.
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

    /// How many threads walk the devices: the calling thread, and `threads - 1` helpers
    /// that take chunks of the work while there is some (1 = the calling thread alone).
    /// Default: the available parallelism, at most 4. A helper that is not scheduled (the
    /// host's cores busy polling) delays the scan by at most one chunk of 16 devices. See
    /// [`private_fd_tables`](Self::private_fd_tables).
    pub fn threads(mut self, threads: usize) -> Self {
        self.threads = threads.max(1);
        self
    }

    /// Whether the helper walker threads work on a private copy of the fd table
    /// (`unshare(CLONE_FILES)`), so that their opens and closes do not contend with the
    /// calling thread's on the process's fd-table lock. **Off by default**: it gains about
    /// 7% of a scan of 4,096 devices (44.8 → 41.8 ms), but each helper copies the whole fd
    /// table (in a host process, thousands of fds, vfio devices among them), and a file
    /// another thread closes while a scan runs — a device fd whose close a removal waits
    /// for — is released only when the helpers end, since their copies still refer to it.
    /// Worth it for a tool that holds few fds (the `pcibus` command line turns it on).
    /// Guarded reads (the pool's threads) never do this: a stuck thread must not keep the
    /// process's files open.
    pub fn private_fd_tables(mut self, yes: bool) -> Self {
        self.private_fd_tables = yes;
        self
    }

    /// Consults `dir` for claims other processes are releasing (see
    /// [`ClaimDir::feed`](crate::removal::claim::ClaimDir::feed)): such devices count as
    /// removal-pending in this scan's registry, and their blocking attributes are not read.
    /// By default a scan of the kernel's sysfs consults `ClaimDir::from_env()` (the host's
    /// claims describe the host's devices, not a fake tree's).
    pub fn claim_dir(mut self, dir: Arc<ClaimDir>) -> Self {
        self.claims = Claims::Dir(dir);
        self
    }

    /// Consults no claims directory.
    pub fn no_claims(mut self) -> Self {
        self.claims = Claims::None;
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
        // An entry goes when its device is gone or is a new incarnation (re-added).
        let identify = |a: PciAddress| {
            listed
                .binary_search(&a)
                .is_ok()
                .then(|| DeviceIdentity::of(&self.root.device_dir(a)).ok())
        };
        self.scan_listed(&devices_dir, &listed, identify, true, scan)
    }

    /// Scans one device; `Ok(None)` when it does not exist (or vanished meanwhile). Reads
    /// only that device's directory: the devices directory is not listed. The claims
    /// directory is consulted only when blocking attributes are asked for (it is what keeps
    /// their reads away from devices other processes are releasing); a map reading one
    /// device per uevent does not pay for listing every claim.
    pub fn scan_device(&self, address: PciAddress) -> Result<Option<DeviceRecord>, ScanError> {
        let dir_path = self.root.devices_dir();
        let devices_dir = Arc::new(DirFd::open(dir_path).map_err(|source| ScanError::Root {
            path: dir_path.to_path_buf(),
            source,
        })?);
        // Other devices' registry entries are left alone (`Some(None)` keeps an entry).
        let identify = |a: PciAddress| {
            if a != address {
                return Some(None);
            }
            devices_dir
                .open_dir(&a.to_string())
                .ok()
                .map(|d| DeviceIdentity::of_fd(&d).ok())
        };
        let claims = !self.blocking.is_empty();
        let scan = self.scan_listed(&devices_dir, &[address], identify, claims, Scan::default())?;
        Ok(scan.devices.into_iter().next())
    }

    // What `scan` does once it knows the addresses to read.
    fn scan_listed(
        &self,
        devices_dir: &Arc<DirFd>,
        listed: &[PciAddress],
        identify: impl FnMut(PciAddress) -> Option<Option<DeviceIdentity>>,
        consult_claims: bool,
        mut scan: Scan,
    ) -> Result<Scan, ScanError> {
        // Devices other processes are releasing count as pending, before anything is read.
        let claims = match &self.claims {
            _ if !consult_claims => None,
            Claims::Dir(dir) => Some(dir),
            Claims::Host(dir) if is_kernel_sysfs(&self.root) => Some(dir),
            Claims::Host(_) | Claims::None => None,
        };
        if let Some(dir) = claims
            && let Err(e) = dir.feed(&self.registry)
        {
            log::warn!("claims directory {}: {e}", dir.path().display());
        }
        scan.released = self.registry.prune(identify);
        if self.defer && !self.registry.is_empty() {
            return Err(ScanError::Deferred {
                pending: self.registry.pending().into_iter().map(|p| p.address).collect(),
            });
        }
        let wanted: Vec<PciAddress> = listed
            .iter()
            .copied()
            .filter(|a| self.allow.as_ref().is_none_or(|allow| allow.contains(a)) && !self.block.contains(a))
            .collect();

        let outcomes = if self.guard_everything {
            self.walk_guarded(devices_dir, wanted)
        } else {
            self.walk(devices_dir, &wanted)
        };
        let mut found = Vec::with_capacity(outcomes.len());
        for outcome in outcomes {
            match outcome {
                Outcome::Found(f) => found.push(*f),
                Outcome::Vanished(a) => scan.vanished.push(a),
                Outcome::Ignored(ignored) => scan.ignored.push(ignored),
            }
        }
        if !self.guard_everything {
            self.read_guarded(devices_dir, &mut found);
        }
        scan.devices = found.into_iter().map(|f| f.dev).collect();
        scan.ignored.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(scan)
    }

    // The fast path on `self.threads` threads, unguarded.
    fn walk(&self, devices_dir: &DirFd, wanted: &[PciAddress]) -> Vec<Outcome> {
        let threads = self.threads.min(wanted.len().div_ceil(DEVICES_PER_THREAD)).max(1);
        let read = |a| read_device(self.ids, &self.registry, devices_dir, a, None);
        if threads == 1 {
            return wanted.iter().map(|&a| read(a)).collect();
        }
        let next = AtomicUsize::new(0);
        const CHUNK: usize = 16;
        // Every walker takes the next chunk until none is left.
        let work = || {
            let mut out = Vec::new();
            loop {
                let start = next.fetch_add(CHUNK, Ordering::Relaxed);
                if start >= wanted.len() {
                    break out;
                }
                for (i, &a) in wanted.iter().enumerate().skip(start).take(CHUNK) {
                    out.push((i, read(a)));
                }
            }
        };
        // The calling thread walks too, and the others only help: on a host whose cores are
        // busy (DPDK and SPDK poll on theirs), a helper that is not scheduled holds up at
        // most the one chunk it took, and the scan costs about what one thread's does
        // instead of waiting for threads that cannot run.
        let mut parts: Vec<(usize, Outcome)> = thread::scope(|s| {
            let helpers: Vec<_> = (1..threads)
                .map(|_| {
                    s.spawn(|| {
                        if self.private_fd_tables {
                            private_fd_table();
                        }
                        work()
                    })
                })
                .collect();
            let mut parts = work();
            for h in helpers {
                parts.extend(h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)));
            }
            parts
        });
        parts.sort_unstable_by_key(|(i, _)| *i);
        parts.into_iter().map(|(_, o)| o).collect()
    }

    // Every device is one job on the pool, `config` and blocking attributes included.
    fn walk_guarded(&self, devices_dir: &Arc<DirFd>, wanted: Vec<PciAddress>) -> Vec<Outcome> {
        let tracks: Arc<Vec<Track>> = Arc::new(wanted.iter().map(|_| Track::default()).collect());
        let wanted = Arc::new(wanted);
        let me = Arc::new(self.clone());
        let results = run_guarded(
            &self.guard,
            &self.registry,
            self.timeout,
            wanted.len(),
            |i| {
                let (me, dir, tracks, wanted) = (
                    Arc::clone(&me),
                    Arc::downgrade(devices_dir),
                    Arc::clone(&tracks),
                    Arc::clone(&wanted),
                );
                // Held weakly, as in `GuardedSpec::run`.
                move || match dir.upgrade() {
                    Some(dir) => me.guarded_device(&dir, wanted[i], &tracks[i]),
                    None => Outcome::Vanished(wanted[i]),
                }
            },
            |i| {
                let p = &tracks[i].progress;
                Some((wanted[i], *p.identity.lock(), p.attribute()))
            },
        );
        results
            .into_iter()
            .zip(wanted.iter())
            .zip(tracks.iter())
            .map(|((result, &address), track)| {
                let kind = match result {
                    Ran::Done(outcome) => return outcome,
                    Ran::Stuck => ProblemKind::TimedOut { waited: self.timeout },
                    Ran::NotStarted => ProblemKind::NotStarted { waited: self.timeout },
                    Ran::Panicked => panicked(),
                };
                let identity = *track.progress.identity.lock();
                let mut dev = track
                    .partial
                    .lock()
                    .take()
                    .unwrap_or_else(|| DeviceRecord::new(address));
                dev.report(track.progress.attribute(), kind);
                Outcome::Found(Box::new(Found {
                    dev,
                    identity,
                    config: ConfigWanted::default(),
                }))
            })
            .collect()
    }

    // One device, inside a guarded job: the fast path, then `config` and the blocking
    // attributes directly.
    fn guarded_device(&self, devices_dir: &DirFd, address: PciAddress, track: &Track) -> Outcome {
        let mut outcome = read_device(
            self.ids,
            &self.registry,
            devices_dir,
            address,
            Some(&track.progress),
        );
        if let Outcome::Found(f) = &mut outcome {
            if f.config.any() {
                track.progress.at("config");
                let read = devices_dir
                    .open_dir(&address.to_string())
                    .and_then(|d| d.read_blocking("config", f.config.len()));
                apply_config_read(devices_dir, &mut f.dev, f.config, read);
            }
            let attrs = self.blocking_to_read(&mut f.dev);
            if !attrs.is_empty() {
                *track.partial.lock() = Some(f.dev.clone());
                let dir = devices_dir.open_dir(&address.to_string());
                for attr in attrs {
                    track.progress.at(attr.name());
                    let result = match &dir {
                        Ok(d) => blocking_read(&self.registry, d, address, f.identity, attr),
                        Err(e) => Guarded::Read(Err(io::Error::new(e.kind(), e.to_string()))),
                    };
                    apply_guarded(&mut f.dev, attr, result);
                }
            }
        }
        outcome
    }

    // After the fast walk: every `config` read it asked for and every requested blocking
    // read, each one job on the pool with its own deadline. K stuck reads cost one
    // deadline, not K.
    fn read_guarded(&self, devices_dir: &Arc<DirFd>, found: &mut [Found]) {
        let mut reads: Vec<GuardedSpec> = Vec::new();
        for (i, f) in found.iter_mut().enumerate() {
            if f.config.any() {
                reads.push(GuardedSpec {
                    index: i,
                    address: f.dev.address,
                    identity: f.identity,
                    want: Want::Config(f.config),
                });
            }
            for attr in self.blocking_to_read(&mut f.dev) {
                reads.push(GuardedSpec {
                    index: i,
                    address: f.dev.address,
                    identity: f.identity,
                    want: Want::Attr(attr),
                });
            }
        }
        if reads.is_empty() {
            return;
        }
        let reads = Arc::new(reads);
        let results = run_guarded(
            &self.guard,
            &self.registry,
            self.timeout,
            reads.len(),
            |k| {
                let (reads, dir, registry) = (
                    Arc::clone(&reads),
                    Arc::downgrade(devices_dir),
                    Arc::clone(&self.registry),
                );
                move || reads[k].run(&dir, &registry)
            },
            // A stuck `config` read means a reset, not a removal: only the blocking
            // attributes mark the registry.
            |k| match reads[k].want {
                Want::Attr(attr) => Some((reads[k].address, reads[k].identity, attr.name())),
                Want::Config(_) => None,
            },
        );
        for (spec, result) in reads.iter().zip(results) {
            let dev = &mut found[spec.index].dev;
            let missed = match result {
                Ran::Done(done) => {
                    match spec.want {
                        Want::Attr(attr) => apply_guarded(dev, attr, done),
                        Want::Config(wanted) => {
                            let read = match done {
                                Guarded::Read(r) => r,
                                // Config reads are never skipped.
                                Guarded::Skipped(_) | Guarded::NotRead(_) => continue,
                            };
                            apply_config_read(devices_dir, dev, wanted, read);
                        }
                    }
                    continue;
                }
                Ran::Stuck => ProblemKind::TimedOut { waited: self.timeout },
                Ran::NotStarted => ProblemKind::NotStarted { waited: self.timeout },
                Ran::Panicked => panicked(),
            };
            match spec.want {
                Want::Attr(attr) => dev.report(attr.name(), missed),
                Want::Config(wanted) if wanted.header => ids_from_files(devices_dir, dev),
                Want::Config(wanted) => {
                    if wanted.revision {
                        dev.report("revision", missed.clone());
                    }
                    if wanted.subsystem {
                        dev.report("subsystem_vendor", missed);
                    }
                }
            }
        }
    }

    // The requested blocking attributes that `dev` has; for a device whose removal is
    // pending or that this process holds open, none, each reported as not read.
    fn blocking_to_read(&self, dev: &mut DeviceRecord) -> Vec<BlockingAttr> {
        let applicable: Vec<BlockingAttr> = self
            .blocking
            .iter()
            .copied()
            .filter(|a| a.applies_to(dev))
            .collect();
        if applicable.is_empty() {
            return applicable;
        }
        let Some(why) = lock_unsafe(&self.registry, dev.address, dev.removal_pending) else {
            return applicable;
        };
        let skip = why.kind();
        for attr in applicable {
            dev.report(attr.name(), skip.clone());
        }
        Vec::new()
    }
}

// Per device of a guarded walk: which attribute its job is reading and the record so far,
// so that a timeout can name the attribute and keep what was read before it.
#[derive(Default)]
struct Track {
    progress: Progress,
    partial: Mutex<Option<DeviceRecord>>,
}

#[derive(Debug, Clone, Copy)]
enum Want {
    Config(ConfigWanted),
    Attr(BlockingAttr),
}

// One guarded read of one device.
struct GuardedSpec {
    index: usize,
    address: PciAddress,
    identity: Option<DeviceIdentity>,
    want: Want,
}

impl GuardedSpec {
    // Runs on a pool thread.
    // Jobs hold the devices directory weakly: one still queued when its scan has returned
    // (its helper threads all stuck) holds no fd, and a stuck one only its device's.
    fn run(&self, devices_dir: &Weak<DirFd>, registry: &RemovalRegistry) -> Guarded {
        let Some(devices) = devices_dir.upgrade() else {
            return Guarded::Read(Err(io::Error::from(io::ErrorKind::NotFound)));
        };
        let dir = match devices.open_dir(&self.address.to_string()) {
            Ok(d) => d,
            Err(e) => return Guarded::Read(Err(e)),
        };
        drop(devices);
        match self.want {
            Want::Attr(attr) => blocking_read(registry, &dir, self.address, self.identity, attr),
            Want::Config(wanted) => Guarded::Read(dir.read_blocking("config", wanted.len())),
        }
    }
}

// What a guarded read of a blocking attribute gave.
enum Guarded {
    Read(io::Result<Vec<u8>>),
    // Not read, and why: the device's own state (a `RemovalPending` here marks the record).
    Skipped(ProblemKind),
    // Not read because of another device's state (a VF's pending removal).
    NotRead(ProblemKind),
}

// Reads `attr` of the device whose directory is `dir`, checking right before the read that
// this process does not hold the device open and that its removal is not pending: a REQ
// may have come since the scan decided to read it.
fn blocking_read(
    registry: &RemovalRegistry,
    dir: &DirFd,
    address: PciAddress,
    identity: Option<DeviceIdentity>,
    attr: BlockingAttr,
) -> Guarded {
    if held::is_held(address) {
        return Guarded::Skipped(ProblemKind::HeldOpen);
    }
    let now = DeviceIdentity::of_fd(dir).ok();
    if identity.is_some() && now.is_some() && now != identity {
        // Removed and re-added since the fast path read it: not the device of this record.
        return Guarded::Read(Err(io::Error::from(io::ErrorKind::NotFound)));
    }
    let pending = registry.is_pending_device(address, now.or(identity));
    match lock_unsafe(registry, address, pending) {
        None => {}
        // Only the device's own removal makes its record removal-pending.
        Some(LockUnsafe::VfPending) => return Guarded::NotRead(ProblemKind::RemovalPending),
        Some(why) => return Guarded::Skipped(why.kind()),
    }
    Guarded::Read(dir.read_blocking(attr.name(), ATTR_MAX))
}

// Why a read of a lock-taking attribute of `address` could wait on a removal, following
// the table in `crate::removal`.
enum LockUnsafe {
    // Its own removal is pending.
    Pending,
    // This process holds it open, or holds one of its VFs (the PF's `sriov_numvfs` store
    // removes them under the PF's lock).
    Held,
    // The removal of one of its VFs is pending: it may be running under this PF's lock.
    VfPending,
}

impl LockUnsafe {
    fn kind(&self) -> ProblemKind {
        match self {
            LockUnsafe::Pending | LockUnsafe::VfPending => ProblemKind::RemovalPending,
            LockUnsafe::Held => ProblemKind::HeldOpen,
        }
    }
}

// `pending`: whether the device's own removal is pending. `None`: safe to read.
fn lock_unsafe(registry: &RemovalRegistry, address: PciAddress, pending: bool) -> Option<LockUnsafe> {
    if pending {
        return Some(LockUnsafe::Pending);
    }
    if held::lock_held_by(address).is_some() {
        return Some(LockUnsafe::Held);
    }
    let vf = registry.pending_vf_of(address)?;
    log::debug!(
        "{address}: not reading its lock-taking attributes: the removal of its VF {} is pending",
        vf.address
    );
    Some(LockUnsafe::VfPending)
}

fn apply_guarded(dev: &mut DeviceRecord, attr: BlockingAttr, result: Guarded) {
    match result {
        Guarded::Read(r) => apply_blocking(dev, attr, r),
        Guarded::Skipped(kind) => {
            if kind == ProblemKind::RemovalPending {
                dev.removal_pending = true;
            }
            dev.report(attr.name(), kind);
        }
        Guarded::NotRead(kind) => dev.report(attr.name(), kind),
    }
}

// What a guarded read of `config` gave, into `dev`: ids from the id files when the header
// was wanted for them and is unusable.
fn apply_config_read(
    devices_dir: &DirFd,
    dev: &mut DeviceRecord,
    wanted: ConfigWanted,
    read: io::Result<Vec<u8>>,
) {
    match read {
        Ok(bytes) if apply_config(dev, wanted, &bytes) => {
            // A bridge's header has no subsystem ids, and 64 bytes no capabilities.
            if wanted.header && dev.subsystem_vendor.is_none() {
                subsystem_from_files(devices_dir, dev);
            }
        }
        Ok(_) => ids_from_files(devices_dir, dev),
        Err(_) if wanted.header => ids_from_files(devices_dir, dev),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => dev.report("config", ProblemKind::io(&e)),
    }
}

fn panicked() -> ProblemKind {
    ProblemKind::Io {
        kind: io::ErrorKind::Other,
        errno: None,
        message: "the read panicked (a bug in pcibus)".into(),
    }
}

/// How one guarded job ended.
pub(crate) enum Ran<T> {
    Done(T),
    /// Never started: every helper thread was busy or stuck, and no job of its round
    /// finished in the time given.
    NotStarted,
    /// Started and did not return within its time: stuck (in the kernel, for a sysfs
    /// read). Its `stuck` mark, if any, was made; the job clears it when it returns.
    Stuck,
    Panicked,
}

// The life of one job of a round. The waiter and the job hand it over under the round's
// lock, so a job cannot finish unseen between the waiter's look and its mark.
enum JobState<T> {
    Queued,
    // Since when, on which thread.
    Running(Instant, nix::unistd::Pid),
    // `None`: the job panicked.
    Finished(Option<T>),
    // The waiter gave up on it before it started; if the pool still runs it, it returns
    // at once.
    Cancelled,
    // The waiter gave up on it while it ran, and marked the registry with this id (if
    // any): the job clears the mark when its read returns.
    Abandoned(Option<StuckId>),
    Taken,
}

struct Round<T> {
    jobs: Mutex<Vec<JobState<T>>>,
    changed: Condvar,
    registry: Arc<RemovalRegistry>,
}

impl<T> Round<T> {
    fn run(&self, k: usize, work: impl FnOnce() -> T) {
        {
            let mut jobs = self.jobs.lock();
            if !matches!(jobs[k], JobState::Queued) {
                return;
            }
            jobs[k] = JobState::Running(Instant::now(), nix::unistd::gettid());
        }
        let value = std::panic::catch_unwind(std::panic::AssertUnwindSafe(work)).ok();
        let stuck = {
            let mut jobs = self.jobs.lock();
            match std::mem::replace(&mut jobs[k], JobState::Taken) {
                JobState::Running(..) => {
                    jobs[k] = JobState::Finished(value);
                    None
                }
                JobState::Abandoned(id) => id,
                other => {
                    jobs[k] = other;
                    None
                }
            }
        };
        self.changed.notify_all();
        // The read returned, so the kernel released whatever held it: the mark goes.
        if let Some(id) = stuck {
            self.registry.read_returned(id);
        }
    }
}

// The least time a job that started just before its deadline gets to run. Sysfs reads take
// microseconds; one asleep in the kernel this long (the pool's stall threshold) waits for
// something (a lock, a reset). Kept short: with more stuck reads than helper threads, jobs
// start late, and each late start may stretch the scan by this much.
const LATE_START_GRACE: Duration = Duration::from_millis(20);

// How often a job whose thread is still running (state R: starved of CPU, not blocked) when
// its time is up gets another `timeout`.
const MAX_EXTENSIONS: u32 = 10;

// Whether thread `tid` of this process is running or runnable, not asleep (in the kernel).
fn thread_is_running(tid: nix::unistd::Pid) -> bool {
    std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next())
            == Some('R')
    })
}

/// Runs `count` jobs (`make(i)` builds job `i`) on `pool`, each with `timeout` counted from
/// its submission; a job that starts late gets at least `LATE_START_GRACE` (or `timeout`
/// if shorter) from its start, and one whose
/// thread is running rather than asleep when its time is up gets up to `MAX_EXTENSIONS`
/// more (a starved CPU is not a stuck read). A job still running after its time is stuck: `stuck(i)` names what to mark in the registry (or
/// nothing), and the job clears that mark itself when it returns. Jobs that had not
/// started when their round ended are submitted again, with a fresh deadline, when the
/// round finished some job, left none stuck, and the pool has a thread that is not stuck;
/// otherwise they are [`Ran::NotStarted`]. So a large healthy batch completes however long the queue, and a
/// pool whose threads are all stuck costs one timeout (plus the time of jobs that started
/// late), not one per job.
pub(crate) fn run_guarded<T, J>(
    pool: &BlockingPool,
    registry: &Arc<RemovalRegistry>,
    timeout: Duration,
    count: usize,
    make: impl Fn(usize) -> J,
    stuck: impl Fn(usize) -> Option<(PciAddress, Option<DeviceIdentity>, &'static str)>,
) -> Vec<Ran<T>>
where
    T: Send + 'static,
    J: FnOnce() -> T + Send + 'static,
{
    let mut out: Vec<Option<Ran<T>>> = (0..count).map(|_| None).collect();
    let mut todo: Vec<usize> = (0..count).collect();
    while !todo.is_empty() {
        let round = Arc::new(Round {
            jobs: Mutex::new(todo.iter().map(|_| JobState::Queued).collect()),
            changed: Condvar::new(),
            registry: Arc::clone(registry),
        });
        let deadline = Instant::now() + timeout;
        let jobs: Vec<_> = todo
            .iter()
            .enumerate()
            .map(|(k, &i)| {
                let round = Arc::clone(&round);
                let work = make(i);
                move || round.run(k, work)
            })
            .collect();
        // The pool's wait also starts helper threads in place of ones that get stuck.
        drop(pool.submit_all(jobs).wait_until(deadline));
        let mut jobs = round.jobs.lock();
        // A job that started late still gets `grace` to run, so that a read is never called
        // stuck a moment after it began; one whose thread is running (not asleep in the
        // kernel) when its time is up is slow, not stuck: it gets more.
        let grace = timeout.min(LATE_START_GRACE);
        let mut until: Vec<Option<Instant>> = vec![None; todo.len()];
        let mut extended = vec![0u32; todo.len()];
        loop {
            let now = Instant::now();
            let mut next: Option<Instant> = None;
            for (k, job) in jobs.iter().enumerate() {
                let JobState::Running(started, tid) = job else {
                    continue;
                };
                let mut end = *until[k].get_or_insert((*started + grace).max(deadline));
                if end <= now && extended[k] < MAX_EXTENSIONS && thread_is_running(*tid) {
                    extended[k] += 1;
                    end = now + timeout;
                    until[k] = Some(end);
                }
                if end > now {
                    next = Some(next.map_or(end, |n| n.min(end)));
                }
            }
            let Some(next) = next else { break };
            round.changed.wait_until(&mut jobs, next);
        }
        // The queue was merely long: this round got work done, none of its jobs is stuck,
        // and neither are all the pool's threads. Only then does another round help; else
        // the jobs still queued would most likely wait another timeout for nothing.
        let progressed = jobs.iter().any(|j| matches!(j, JobState::Finished(_)))
            && !jobs.iter().any(|j| matches!(j, JobState::Running(..)))
            && pool.stuck() < pool.limits().max_threads;
        let mut again = Vec::new();
        for (k, &i) in todo.iter().enumerate() {
            out[i] = match std::mem::replace(&mut jobs[k], JobState::Taken) {
                JobState::Finished(Some(v)) => Some(Ran::Done(v)),
                JobState::Finished(None) => Some(Ran::Panicked),
                JobState::Running(..) => {
                    let id = stuck(i).map(|(address, identity, attribute)| {
                        registry.mark_stuck(address, identity, attribute)
                    });
                    jobs[k] = JobState::Abandoned(id);
                    Some(Ran::Stuck)
                }
                JobState::Queued => {
                    jobs[k] = JobState::Cancelled;
                    if progressed {
                        again.push(i);
                        None
                    } else {
                        Some(Ran::NotStarted)
                    }
                }
                other => {
                    jobs[k] = other;
                    Some(Ran::NotStarted)
                }
            };
        }
        drop(jobs);
        todo = again;
    }
    out.into_iter().map(|r| r.unwrap_or(Ran::NotStarted)).collect()
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
