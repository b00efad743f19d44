//! Claims: one owner per device, visible to every process.
//!
//! Before a process opens a device through VFIO it takes a [`Claim`] on it: a lock file per
//! device (`0000:01:00.0.lock`) in a [`ClaimDir`] (default `/run/pcibus/claims`, or
//! `$PCIBUS_CLAIM_DIR`), write-locked with an **open-file-description lock**
//! (`F_OFD_SETLK`) and holding a short text record of the owner:
//!
//! ```text
//! pid=4242
//! comm=fio
//! since=1764110400
//! physfn=0000:01:00.0
//! state=active
//! ```
//!
//! A second claimant, in another process or on another fd of the same process, is refused
//! with [`ClaimError::Held`], which names the holder's PID and command. When the holder
//! dies the kernel drops its lock and the claim is free again: the file left behind is
//! stale and the next claimant reuses it. No cleanup is ever needed.
//!
//! SPDK takes the same kind of file lock with `F_SETLK`, a POSIX record lock: those belong
//! to the process, and *any* close of the same file anywhere in the process (a library
//! reading the lock file to print its owner, say) silently drops them. OFD locks belong to
//! the open file description, so only closing the claim itself releases it, and two fds of
//! one process conflict like two processes do.
//!
//! # SPDK
//!
//! SPDK claims a device with its own lock file, `/var/tmp/spdk_pci_lock_0000:01:00.0`:
//! it opens it (`O_RDWR | O_CREAT`, mode 0600), truncates it to `sizeof(int)`, write-locks
//! the whole file with `F_SETLK` and writes its PID at offset 0 as a native-endian `int`;
//! a second SPDK whose lock fails reports "probably process N has claimed it", N read from
//! there. A [`ClaimDir`] with an SPDK lock directory ([`ClaimDir::spdk_lock_dir`]) speaks
//! the same protocol from both sides:
//!
//! - **SPDK holds the device**: the claim is refused with [`ClaimError::HeldBySpdk`],
//!   which names SPDK's PID (the kernel reports a record lock's holder through
//!   `F_OFD_GETLK`; else the PID in the file) and its command (`/proc/PID/comm`).
//! - **We hold it**: the claim also write-locks SPDK's file, with `F_OFD_SETLK` (OFD and
//!   record locks conflict, so SPDK's `F_SETLK` then fails) and writes our PID where SPDK
//!   reads its holder's (a native-endian `i32` at offset 0, after making the file at
//!   least 4 bytes long), so SPDK's own message names us. Dropping or releasing the claim
//!   unlocks it and closes it, first; the file stays.
//!
//! Our own lock file is taken first, SPDK's second: if SPDK's is held, ours is dropped
//! again. So a pcibus claimant meets a pcibus holder in its claims directory, with its
//! record, and only SPDK (or a pcibus claiming in another directory, which also writes its
//! PID into SPDK's file) behind SPDK's file.
//!
//! [`ClaimDir::from_env`] and [`ClaimDir::for_claiming`] (so the bus, and the `pcibus`
//! command) use SPDK's directory, [`DEFAULT_SPDK_LOCK_DIR`] (`/var/tmp`), or
//! `$PCIBUS_SPDK_LOCK_DIR` ([`SPDK_LOCK_DIR_ENV`]; empty: none). [`ClaimDir::new`] uses
//! none, so claims in a test's temporary directory never touch `/var/tmp`.
//!
//! Where this process may not write SPDK's file, it only checks it: an existing file it
//! may read is probed with `F_OFD_GETLK` (which works on a read-only fd) and a held one
//! still refuses the claim; otherwise SPDK's lock is not checked at all. A debug log says
//! which. The file is created (mode 0600, as SPDK does) only by the owner of a sticky
//! directory such as `/var/tmp` (root): with `fs.protected_regular`, SPDK's
//! `O_RDWR | O_CREAT` open of a file another user left in a sticky directory fails, even
//! for root. An existing file is opened without `O_CREAT` for the same reason, and never
//! through a symlink (one there fails the claim: SPDK would lock its target); one that is
//! not a regular file is ignored (SPDK cannot lock it either), one with other links is
//! only probed, never written.
//!
//! What this cannot close: SPDK unlinks its file when it releases the device, after
//! closing it. A claim that locked the file in between holds a file no longer in the
//! directory (checked right after locking, and opened again if so, but not later), and
//! the next SPDK creates a new one. Two SPDK processes race the same way.
//!
//! # Removal awareness across processes
//!
//! When the holder learns that its device is being removed (vfio's REQ), it calls
//! [`Claim::mark_releasing`] before it starts to release: the record then says
//! `state=releasing` and why. Any other process learns it from [`ClaimDir::releasing`],
//! and [`ClaimDir::feed`] writes it into that process's [`RemovalRegistry`], so its scans
//! keep away from the device's lock-taking attributes at once instead of waiting for a
//! guarded read to time out. A VF's record names its PF (`physfn=`, from
//! [`ClaimInfo::physfn`]): while the VF is being released, its removal may hold the PF's
//! device lock (`echo 0 > PF/sriov_numvfs`), and by then the kernel has removed the VF's
//! `physfn` link, so the record is where other processes learn the relation.
//!
//! ```
//! use pcibus::removal::claim::{ClaimDir, ClaimError, ClaimInfo};
//! # let tmp = tempfile::tempdir().unwrap();
//! let dir = ClaimDir::new(tmp.path().join("claims"));
//! let nvme = "0000:01:00.0".parse().unwrap();
//! let claim = dir.claim(nvme, &ClaimInfo::new()).unwrap();
//! // Any other claimant is refused and told who holds it.
//! match dir.claim(nvme, &ClaimInfo::new()) {
//!     Err(ClaimError::Held { pid, .. }) => assert_eq!(pid, Some(std::process::id())),
//!     other => panic!("{other:?}"),
//! }
//! claim.mark_releasing("vfio removal request").unwrap();
//! assert_eq!(dir.releasing().unwrap()[0].address, nvme);
//! drop(claim);
//! assert!(dir.claim(nvme, &ClaimInfo::new()).is_ok());
//! ```
//!
//! # Permissions
//!
//! The directory is created mode 0755 by the first claimant, so only its owner (root, for
//! `/run/pcibus/claims`) can take claims there; anyone can list them, because probing a
//! lock ([`F_OFD_GETLK`](nix::fcntl::FcntlArg::F_OFD_GETLK)) works on a read-only fd.
//!
//! A user who is not root (and was given a device's VFIO files) claims in
//! `$PCIBUS_CLAIM_DIR` if set, else in `$XDG_RUNTIME_DIR/pcibus/claims`
//! ([`ClaimDir::for_claiming`], which the bus uses). Claims in different directories do not
//! see each other: such a claim refuses only claimants in the same directory, and only
//! readers of that directory learn that its device is being released. Readers (scans,
//! `pcibus claims`) keep reading [`DEFAULT_DIR`] ([`ClaimDir::from_env`]), so an
//! unprivileged process still keeps away from the devices root's processes release.

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, OFlag, fcntl, openat};
use nix::libc;
use nix::sys::stat::Mode;
use parking_lot::Mutex;

use crate::addr::PciAddress;
use crate::removal::registry::{Reason, RemovalRegistry};
use crate::removal::spdk::{self, SpdkError, SpdkLock};

/// The claims directory used when neither the caller nor `$PCIBUS_CLAIM_DIR` names one.
pub const DEFAULT_DIR: &str = "/run/pcibus/claims";

/// The environment variable that overrides [`DEFAULT_DIR`].
pub const DIR_ENV: &str = "PCIBUS_CLAIM_DIR";

/// The user's runtime directory (`/run/user/UID`): where [`ClaimDir::for_claiming`] puts
/// the claims of a user who cannot write [`DEFAULT_DIR`], below `pcibus/claims`.
pub const RUNTIME_DIR_ENV: &str = "XDG_RUNTIME_DIR";

/// Where SPDK keeps its device lock files (`spdk_pci_lock_0000:01:00.0`), and so where
/// [`ClaimDir::from_env`] and [`ClaimDir::for_claiming`] check and hold them, unless
/// [`SPDK_LOCK_DIR_ENV`] says otherwise. See the [module docs](self#spdk).
pub const DEFAULT_SPDK_LOCK_DIR: &str = spdk::DEFAULT_DIR;

/// The environment variable that overrides [`DEFAULT_SPDK_LOCK_DIR`] for
/// [`ClaimDir::from_env`] and [`ClaimDir::for_claiming`]; empty, SPDK's lock files are
/// left alone.
pub const SPDK_LOCK_DIR_ENV: &str = "PCIBUS_SPDK_LOCK_DIR";

/// The lock file's name suffix: `0000:01:00.0.lock`.
const SUFFIX: &str = ".lock";

/// Longest record read; real ones are well under 200 bytes.
const MAX_RECORD: u64 = 4096;

/// How long a refused claimant or a lister waits for a holder that has just taken its lock
/// to finish writing its record (it writes right after locking).
const RECORD_WAIT: Duration = Duration::from_millis(50);

/// What went wrong taking or updating a claim.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClaimError {
    /// Another open file description holds the claim: another process, or another claim
    /// in this one.
    #[error("{address} is claimed by {}", holder(*.pid, .command.as_deref(), .releasing.as_deref()))]
    #[non_exhaustive]
    Held {
        /// The device.
        address: PciAddress,
        /// The holder's PID, from its record; `None` if the record could not be read (the
        /// holder had just locked and not yet written it, or it is not a pcibus record).
        pid: Option<u32>,
        /// The holder's command (`/proc/PID/comm` when it claimed), from its record.
        command: Option<String>,
        /// Why the holder is releasing the device, if it is
        /// ([`Claim::mark_releasing`]): the claim should be free soon.
        releasing: Option<String>,
    },
    /// SPDK's lock file of the device is locked
    /// ([`ClaimDir::spdk_lock_dir`]): by an SPDK process, whose PID the kernel reports
    /// (or SPDK wrote in the file), or by a pcibus process claiming in another claims
    /// directory, which wrote its PID there too.
    #[error("{address} is claimed by SPDK: {}, lock file {}", spdk_holder(*.pid, .command.as_deref()), .path.display())]
    #[non_exhaustive]
    HeldBySpdk {
        /// The device.
        address: PciAddress,
        /// The holder's PID; `None` if neither the kernel nor the file says (a holder in
        /// another PID namespace that has not written it yet).
        pid: Option<u32>,
        /// The holder's command (`/proc/PID/comm`), if that process is visible here.
        command: Option<String>,
        /// SPDK's lock file.
        path: PathBuf,
    },
    /// This process may not create or write the claims directory (it is root's, or on a
    /// read-only file system).
    #[error(
        "claims directory {}: this process may not write it; run as root, or set {DIR_ENV} to a directory it can write (claims there are seen only by processes using the same directory)",
        .path.display()
    )]
    DirNotWritable {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The claims directory could not be created or opened.
    #[error("claims directory {}", .path.display())]
    Dir {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// An operation on a device's lock file (ours or SPDK's) failed. Refused for lack of
    /// permission (a claims directory or lock file of another user, a read-only file
    /// system), it says what is needed.
    #[error("claim of {address}: {op} {}{}", .path.display(), lock_file_hint(.path, .source))]
    Io {
        /// The device.
        address: PciAddress,
        /// The lock file: ours, or SPDK's.
        path: PathBuf,
        /// What was being done: "open", "lock", "write", ...
        op: &'static str,
        /// Why.
        #[source]
        source: io::Error,
    },
}

// What a lock file operation refused for lack of permission needs.
fn lock_file_hint(path: &Path, source: &io::Error) -> String {
    match source.kind() {
        io::ErrorKind::PermissionDenied | io::ErrorKind::ReadOnlyFilesystem => format!(
            ": needs root (or write access to {} and its directory), or {DIR_ENV} set to a directory this process can write",
            path.display()
        ),
        _ => String::new(),
    }
}

fn holder(pid: Option<u32>, command: Option<&str>, releasing: Option<&str>) -> String {
    let mut s = match (pid, command) {
        (Some(pid), Some(c)) => format!("PID {pid} ({c})"),
        (Some(pid), None) => format!("PID {pid}"),
        (None, _) => "another process (its claim record is not written yet)".to_owned(),
    };
    if let Some(reason) = releasing {
        s.push_str(&format!(", which is releasing it: {reason}"));
    }
    s
}

fn spdk_holder(pid: Option<u32>, command: Option<&str>) -> String {
    match (pid, command) {
        (Some(pid), Some(c)) => format!("PID {pid} ({c})"),
        (Some(pid), None) => format!("PID {pid}"),
        (None, _) => "a process whose PID is not known here".to_owned(),
    }
}

/// What a claimant says about itself in its record.
#[derive(Debug, Clone, Default)]
pub struct ClaimInfo {
    command: Option<String>,
    driver: Option<String>,
    physfn: Option<PciAddress>,
}

impl ClaimInfo {
    /// The defaults: the command is this process's `/proc/self/comm`, no driver named.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records `command` instead of `/proc/self/comm`.
    pub fn command(mut self, command: impl Into<String>) -> Self {
        self.command = Some(command.into());
        self
    }

    /// Records the driver that will own the device (`driver=` in the record).
    pub fn driver(mut self, driver: impl Into<String>) -> Self {
        self.driver = Some(driver.into());
        self
    }

    /// Records the device's PF, for a VF (`physfn=` in the record;
    /// [`DeviceRecord::physfn`](crate::record::DeviceRecord::physfn)). Other processes then
    /// keep away from the PF's lock-taking attributes while this claim is releasing.
    pub fn physfn(mut self, physfn: Option<PciAddress>) -> Self {
        self.physfn = physfn;
        self
    }
}

/// What a holder is doing with its device.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ClaimState {
    /// Using it.
    Active,
    /// Releasing it: the device's removal is pending until the holder closes it.
    Releasing {
        /// Why, as the holder said ([`Claim::mark_releasing`]).
        reason: String,
    },
}

impl fmt::Display for ClaimState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClaimState::Active => f.write_str("active"),
            ClaimState::Releasing { reason } => write!(f, "releasing ({reason})"),
        }
    }
}

/// One lock file of a [`ClaimDir`], as [`ClaimDir::list`] found it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ClaimRecord {
    /// The device.
    pub address: PciAddress,
    /// The lock file.
    pub path: PathBuf,
    /// Whether the lock is held: `false` means the holder is gone (it died, or released
    /// without clearing its record) and the record is stale; the device is free to claim.
    pub live: bool,
    /// The holder's PID. This and the fields below are `None` when the record is empty or
    /// incomplete (a holder that has just locked and not yet written).
    pub pid: Option<u32>,
    /// The holder's command.
    pub command: Option<String>,
    /// When the claim was taken.
    pub since: Option<SystemTime>,
    /// The driver the holder named, if any.
    pub driver: Option<String>,
    /// The device's PF, when the holder named one (the device is a VF).
    pub physfn: Option<PciAddress>,
    /// What the holder is doing.
    pub state: Option<ClaimState>,
}

/// A live claim whose holder is releasing its device ([`ClaimDir::releasing`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ReleasingClaim {
    /// The device.
    pub address: PciAddress,
    /// The holder's PID.
    pub pid: u32,
    /// The holder's command.
    pub command: String,
    /// Why it releases the device.
    pub reason: String,
    /// The device's PF, when the holder named one.
    pub physfn: Option<PciAddress>,
}

/// The directory of claims: one lock file per claimed device.
///
/// It holds only the path: the directory is opened anew by each operation, because a
/// reader (a scanner feeding its registry) may start before any claimant has created it,
/// and a reader must not create it.
#[derive(Debug)]
pub struct ClaimDir {
    path: PathBuf,
    // Where SPDK's lock files are checked and held; `None`: not at all.
    spdk: Option<PathBuf>,
    // The marks `feed` put in registries, so that it can take back those whose release
    // ended: (address, reason).
    fed: Mutex<Vec<(PciAddress, Reason)>>,
}

impl ClaimDir {
    /// Claims kept in `path` (created, mode 0755, by the first claim). SPDK's lock files
    /// are left alone unless [`spdk_lock_dir`](Self::spdk_lock_dir) names their directory:
    /// a claims directory of a test, say, has no business in `/var/tmp`.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        ClaimDir {
            path: path.into(),
            spdk: None,
            fed: Mutex::new(Vec::new()),
        }
    }

    /// Checks SPDK's lock file of each device claimed in `dir` (SPDK's is
    /// [`DEFAULT_SPDK_LOCK_DIR`]), refusing a device SPDK holds, and holds it while the
    /// claim lasts, so that SPDK refuses the device too; `None`: leaves SPDK's files alone.
    /// See the [module docs](self#spdk).
    pub fn spdk_lock_dir(mut self, dir: Option<PathBuf>) -> Self {
        self.spdk = dir;
        self
    }

    /// SPDK's lock file of `address`, if this directory's claims check SPDK's
    /// ([`spdk_lock_dir`](Self::spdk_lock_dir)).
    pub fn spdk_lock_file(&self, address: PciAddress) -> Option<PathBuf> {
        self.spdk.as_deref().map(|dir| spdk::lock_file(dir, address))
    }

    /// Claims kept in `$PCIBUS_CLAIM_DIR`, else in [`DEFAULT_DIR`]: the directory to read
    /// other processes' claims from. A process that takes claims uses
    /// [`for_claiming`](Self::for_claiming).
    ///
    /// Its claims check and hold SPDK's lock files in `$PCIBUS_SPDK_LOCK_DIR`, else in
    /// [`DEFAULT_SPDK_LOCK_DIR`] (none if the variable is empty).
    pub fn from_env() -> Self {
        Self::new(
            std::env::var_os(DIR_ENV)
                .filter(|v| !v.is_empty())
                .map_or_else(|| PathBuf::from(DEFAULT_DIR), PathBuf::from),
        )
        .spdk_lock_dir(spdk_dir_from_env())
    }

    /// The directory this process takes its claims in: `$PCIBUS_CLAIM_DIR` if set; else
    /// [`DEFAULT_DIR`] if the process is root or may create and write it; else (an
    /// unprivileged user, the default being root's) `$XDG_RUNTIME_DIR/pcibus/claims`, with
    /// a note in the log. Without a runtime directory it stays [`DEFAULT_DIR`], and a
    /// claim fails with [`ClaimError::DirNotWritable`], which says what to set.
    ///
    /// The fallback's price: its claims are not in [`DEFAULT_DIR`], so root's processes
    /// and this user's do not refuse each other's claims, and root's scans do not learn
    /// that this user releases a device (this user's scans still read [`DEFAULT_DIR`]:
    /// see the [module docs](self#permissions)).
    ///
    /// Its claims check and hold SPDK's lock files, as [`from_env`](Self::from_env)'s do.
    pub fn for_claiming() -> Self {
        let (path, fallback) = claiming_dir(
            std::env::var_os(DIR_ENV),
            std::env::var_os(RUNTIME_DIR_ENV),
            nix::unistd::geteuid().is_root(),
            may_create,
        );
        if fallback {
            log::info!(
                "claims go to {}: this user may not write {DEFAULT_DIR} (set {DIR_ENV} to choose; root's processes do not see these claims)",
                path.display()
            );
        }
        Self::new(path).spdk_lock_dir(spdk_dir_from_env())
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The lock file of `address`.
    pub fn file_of(&self, address: PciAddress) -> PathBuf {
        self.path.join(format!("{address}{SUFFIX}"))
    }

    fn dir_error(&self, source: io::Error) -> ClaimError {
        let path = self.path.clone();
        match source.kind() {
            io::ErrorKind::PermissionDenied | io::ErrorKind::ReadOnlyFilesystem => {
                ClaimError::DirNotWritable { path, source }
            }
            _ => ClaimError::Dir { path, source },
        }
    }

    fn open_dir(&self) -> Result<OwnedFd, Errno> {
        nix::fcntl::open(
            &self.path,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
    }

    fn create_dir(&self) -> Result<OwnedFd, ClaimError> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(&self.path)
            .map_err(|e| self.dir_error(e))?;
        self.open_dir().map_err(|e| self.dir_error(e.into()))
    }

    /// Takes the claim on `address`, or says who holds it.
    ///
    /// Creates the directory and the lock file if missing, write-locks the whole file
    /// with `F_OFD_SETLK` (never waiting), then writes the record. A stale file (its
    /// holder died) is simply locked and rewritten. Then, with an
    /// [SPDK lock directory](Self::spdk_lock_dir), SPDK's lock file: if it is held the
    /// claim is dropped again and the error is [`ClaimError::HeldBySpdk`].
    pub fn claim(&self, address: PciAddress, info: &ClaimInfo) -> Result<Claim, ClaimError> {
        let path = self.file_of(address);
        let io_error = |op, source| ClaimError::Io {
            address,
            path: path.clone(),
            op,
            source,
        };
        let dir = self.create_dir()?;
        // O_CLOEXEC: a program the holder execs must not inherit (and so keep) the claim.
        // O_NOFOLLOW: the lock is on this file, not on whatever a symlink points at.
        let fd = openat(
            &dir,
            lock_name(address).as_str(),
            OFlag::O_RDWR | OFlag::O_CREAT | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW,
            Mode::from_bits_truncate(0o644),
        )
        .map_err(|e| io_error("open", e.into()))?;
        let file = File::from(fd);
        match fcntl(&file, FcntlArg::F_OFD_SETLK(&whole_file(libc::F_WRLCK))) {
            Ok(_) => {}
            Err(Errno::EAGAIN | Errno::EACCES) => {
                let (pid, command, releasing) = match read_settled(&file, true) {
                    Some(r) => {
                        let releasing = match r.state {
                            Some(ClaimState::Releasing { reason }) => Some(reason),
                            _ => None,
                        };
                        (r.pid, r.command, releasing)
                    }
                    None => (lock_holder_pid(&file), None, None),
                };
                return Err(ClaimError::Held {
                    address,
                    pid,
                    command,
                    releasing,
                });
            }
            Err(e) => return Err(io_error("lock", e.into())),
        }
        let record = Record {
            pid: Some(std::process::id()),
            command: Some(match &info.command {
                Some(c) => c.clone(),
                None => own_comm(),
            }),
            since: Some(SystemTime::now()),
            driver: info.driver.clone(),
            physfn: info.physfn,
            state: Some(ClaimState::Active),
        };
        let mut claim = Claim {
            address,
            path: path.clone(),
            file,
            owner: std::process::id(),
            released: false,
            record: Mutex::new(record),
            spdk: None,
        };
        // Dropping `claim` on failure unlocks: a claim without a record is not kept.
        claim.write_record().map_err(|e| io_error("write", e))?;
        // Ours first: a second pcibus claimant is then refused by ours, with the record
        // that names the holder, and never sees our SPDK lock.
        if let Some(dir) = &self.spdk {
            claim.spdk = spdk::take(dir, address).map_err(|e| {
                let path = spdk::lock_file(dir, address);
                match e {
                    SpdkError::Held { pid, command } => ClaimError::HeldBySpdk {
                        address,
                        pid,
                        command,
                        path,
                    },
                    SpdkError::Io { op, source } => ClaimError::Io {
                        address,
                        path,
                        op,
                        source,
                    },
                }
            })?;
        }
        log::debug!("{address}: claimed ({})", claim.path.display());
        Ok(claim)
    }

    /// Every lock file in the directory, live or stale, in address order. Files that are
    /// not named `ADDRESS.lock`, and stale files with an empty record (claims released
    /// cleanly), are left out. A missing directory has no claims.
    ///
    /// Liveness is probed with `F_OFD_GETLK`, which reports a conflicting lock without
    /// taking one: listing never disturbs a claimant.
    pub fn list(&self) -> Result<Vec<ClaimRecord>, ClaimError> {
        let dir = match self.open_dir() {
            Ok(dir) => dir,
            Err(Errno::ENOENT) => return Ok(Vec::new()),
            Err(e) => return Err(self.dir_error(e.into())),
        };
        let dir_error = |e: Errno| self.dir_error(e.into());
        let mut names = Vec::new();
        let mut entries = nix::dir::Dir::openat(
            &dir,
            ".",
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(dir_error)?;
        for entry in entries.iter() {
            let entry = entry.map_err(dir_error)?;
            let name = OsStr::from_bytes(entry.file_name().to_bytes());
            if let Some(address) = address_of(name) {
                names.push(address);
            }
        }
        names.sort();
        let mut records = Vec::new();
        for address in names {
            match self.probe(&dir, address) {
                Ok(Some(r)) => records.push(r),
                Ok(None) => {}
                // One unreadable file does not hide the others.
                Err(e) => log::warn!("{e}"),
            }
        }
        Ok(records)
    }

    // Reads one lock file and whether it is locked; `None` if it vanished or is a
    // cleanly released (empty, unlocked) claim.
    fn probe(&self, dir: &OwnedFd, address: PciAddress) -> Result<Option<ClaimRecord>, ClaimError> {
        let path = self.file_of(address);
        let io_error = |op, e: Errno| ClaimError::Io {
            address,
            path: path.clone(),
            op,
            source: e.into(),
        };
        let fd = match openat(
            dir,
            lock_name(address).as_str(),
            OFlag::O_RDONLY | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK,
            Mode::empty(),
        ) {
            Ok(fd) => fd,
            Err(Errno::ENOENT) => return Ok(None),
            Err(e) => return Err(io_error("open", e)),
        };
        let file = File::from(fd);
        let mut probe = whole_file(libc::F_WRLCK);
        fcntl(&file, FcntlArg::F_OFD_GETLK(&mut probe)).map_err(|e| io_error("probe lock of", e))?;
        let live = i32::from(probe.l_type) != libc::F_UNLCK;
        // Listing (a scan feeding its registry) trusts the lock: a live claim's complete
        // record is taken at once, whatever PID it names.
        let record = if live {
            read_settled(&file, false)
        } else {
            read_record(&file).ok()
        };
        let record = record.unwrap_or_default();
        if !live && record.is_empty() {
            return Ok(None);
        }
        Ok(Some(ClaimRecord {
            address,
            path,
            live,
            pid: record
                .pid
                .or_else(|| (live && probe.l_pid > 0).then_some(probe.l_pid as u32)),
            command: record.command,
            since: record.since,
            driver: record.driver,
            physfn: record.physfn,
            state: record.state,
        }))
    }

    /// The live claims whose holders are releasing their devices, in address order.
    pub fn releasing(&self) -> Result<Vec<ReleasingClaim>, ClaimError> {
        Ok(self
            .list()?
            .into_iter()
            .filter(|r| r.live)
            .filter_map(|r| match (r.pid, r.state) {
                (Some(pid), Some(ClaimState::Releasing { reason })) => Some(ReleasingClaim {
                    address: r.address,
                    pid,
                    command: r.command.unwrap_or_default(),
                    reason,
                    physfn: r.physfn,
                }),
                _ => None,
            })
            .collect())
    }

    /// Brings `registry` up to date with the claims: notes the PF of every releasing VF
    /// whose record names it ([`RemovalRegistry::note_physfn`]), and marks every device
    /// that another live process is releasing, with
    /// `Reason::Other("being released by PID {pid} ({command}): {reason}")`, and takes
    /// back the marks of earlier calls whose release has ended (the claim was dropped or
    /// its holder died). Returns the addresses newly marked.
    ///
    /// A mark is taken back with [`RemovalRegistry::release`] only when it is the entry's
    /// only reason: the registry cannot drop one reason of several, so an entry that also
    /// has reasons of its own stays until those go. Claims of this process are skipped:
    /// it knows its own removals. Call it with one registry per `ClaimDir`.
    ///
    /// A mark lasts as long as the holder's claim says "releasing": holders drop the claim
    /// right after closing the device, or a device re-added at the same address meanwhile
    /// would be taken for the one being released.
    pub fn feed(&self, registry: &RemovalRegistry) -> Result<Vec<PciAddress>, ClaimError> {
        let me = std::process::id();
        let now: Vec<(PciAddress, Reason)> = self
            .releasing()?
            .into_iter()
            .filter(|r| r.pid != me)
            .inspect(|r| {
                if let Some(pf) = r.physfn {
                    registry.note_physfn(r.address, pf);
                }
            })
            .map(|r| {
                let reason = Reason::Other(format!(
                    "being released by PID {} ({}): {}",
                    r.pid, r.command, r.reason
                ));
                (r.address, reason)
            })
            .collect();
        let mut fed = self.fed.lock();
        for (address, reason) in fed.iter().filter(|m| !now.contains(m)) {
            if let Some(p) = registry.get(*address)
                && p.reasons.iter().all(|r| r == reason)
            {
                registry.release(*address);
                log::info!("{address}: {reason}: ended");
            }
        }
        let mut marked = Vec::new();
        for (address, reason) in &now {
            if registry.mark(*address, reason.clone()) {
                marked.push(*address);
            }
        }
        *fed = now;
        Ok(marked)
    }
}

/// An exclusive claim on one PCI function, visible to every process through its
/// [`ClaimDir`]. Taken by [`ClaimDir::claim`].
///
/// # Dropping
///
/// Dropping the claim unlocks and closes SPDK's lock file if it holds it
/// ([`ClaimDir::spdk_lock_dir`]), then empties its record, unlocks its own file
/// (`F_OFD_SETLK` with `F_UNLCK`) and closes it; the next claimant may take it at once.
/// The file itself stays: unlinking it would let a claimant that opened it just before
/// take a lock on a file no longer in the directory while a third creates a new one, and
/// both would own the device. A released file is empty and [`ClaimDir::list`] does not show it. SPDK's file
/// stays too, with our PID in it (SPDK overwrites it when it claims).
///
/// Drop the claim *after* closing the device: other processes stop treating the device as
/// "removal pending" as soon as its claim goes ([`ClaimDir::feed`]).
///
/// # Process exit
///
/// When the process ends without dropping the claim (`std::process::exit`, which runs no
/// destructors; an abort; SIGKILL; a crash), the kernel closes the fd and so drops the
/// lock: the claim is free, its file keeps a stale record ([`ClaimRecord::live`] is
/// `false`, and [`ClaimDir::releasing`] ignores it), and the next claimant overwrites it.
/// SPDK's lock file goes the same way. Nothing needs cleaning up.
///
/// # Fork
///
/// An OFD lock belongs to the open file description, which a forked child shares with its
/// parent through the inherited fd: while the child lives the claim stays held even after
/// the parent has died without dropping it, and the record still names the parent. The fd is opened with
/// `O_CLOEXEC`, so a child that execs another program lets go of it at once; a child that
/// does not exec holds the claim until it exits. A forked child's copy of a `Claim` never
/// empties the record or unlocks when dropped (it only closes its fds): the claim is the
/// parent's. The parent's drop unlocks the description for both. All of this holds for
/// SPDK's lock file too.
#[derive(Debug)]
pub struct Claim {
    address: PciAddress,
    path: PathBuf,
    file: File,
    // The process that took the claim: a forked child's copy leaves it alone on drop.
    owner: u32,
    // `release` ran: dropping must not clear the record again (it may be a new holder's).
    released: bool,
    // What the file says; the lock also serialises writes.
    record: Mutex<Record>,
    // SPDK's lock file of the device, held as long as the claim.
    spdk: Option<SpdkLock>,
}

impl Claim {
    /// The device claimed.
    pub fn address(&self) -> PciAddress {
        self.address
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// SPDK's lock file of the device, if the claim holds it ([`ClaimDir::spdk_lock_dir`];
    /// `None` also when this process may not write it).
    pub fn spdk_lock_file(&self) -> Option<&Path> {
        self.spdk.as_ref().map(SpdkLock::path)
    }

    /// Tells every other process that this holder is releasing the device (it received
    /// the removal request, say): the record says `state=releasing` and `reason`. Call it
    /// before starting to release, so that other processes' scans keep away from the
    /// device's lock-taking attributes meanwhile.
    pub fn mark_releasing(&self, reason: &str) -> Result<(), ClaimError> {
        self.record.lock().state = Some(ClaimState::Releasing {
            reason: reason.to_owned(),
        });
        self.write_record().map_err(|source| ClaimError::Io {
            address: self.address,
            path: self.path.clone(),
            op: "write",
            source,
        })
    }

    /// Names `driver` as the one that owns the device (`driver=` in the record), once it
    /// is known: a claim is taken before the drivers are asked.
    pub fn set_driver(&self, driver: &str) -> Result<(), ClaimError> {
        self.record.lock().driver = Some(driver.to_owned());
        self.write_record().map_err(|source| ClaimError::Io {
            address: self.address,
            path: self.path.clone(),
            op: "write",
            source,
        })
    }

    /// Releases the claim, reporting failures that dropping it would only log.
    pub fn release(mut self) -> Result<(), ClaimError> {
        let r = self.unlock();
        self.released = true;
        r
    }

    fn write_record(&self) -> io::Result<()> {
        let record = self.record.lock();
        let text = record.to_text();
        // Truncate, then write: a reader sees an empty or complete record, or (rarely) a
        // prefix, which lacks the final `state=` line and so reads as incomplete.
        self.file.set_len(0)?;
        self.file.write_all_at(text.as_bytes(), 0)
    }

    // SPDK's lock goes first, the reverse of taking them: a pcibus claimant that gets
    // ours then finds SPDK's free, or held by SPDK itself.
    fn unlock(&mut self) -> Result<(), ClaimError> {
        if self.owner != std::process::id() {
            return Ok(());
        }
        let spdk = self.spdk.take().map_or(Ok(()), |lock| {
            let path = lock.path().to_owned();
            lock.release().map_err(|source| ClaimError::Io {
                address: self.address,
                path,
                op: "unlock",
                source,
            })
        });
        let _serialise = self.record.lock();
        // Unlock even if clearing failed: a stale record is harmless, a held lock is not
        // (a forked child may share the description and keep it).
        let cleared = self.file.set_len(0).map_err(|e| ("clear", e));
        let unlocked = fcntl(&self.file, FcntlArg::F_OFD_SETLK(&whole_file(libc::F_UNLCK)))
            .map(drop)
            .map_err(|e| ("unlock", e.into()));
        let ours = cleared.and(unlocked).map_err(|(op, source)| ClaimError::Io {
            address: self.address,
            path: self.path.clone(),
            op,
            source,
        });
        match (ours, spdk) {
            (Err(e), Err(lost)) => {
                // Closing its fd drops SPDK's lock anyway.
                log::warn!("{lost}: {}", error_source(&lost));
                Err(e)
            }
            (ours, spdk) => ours.and(spdk),
        }
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        if let Err(e) = self.unlock() {
            // Closing the fd below drops the lock anyway; only the record may stay.
            log::warn!("{e}: {}", error_source(&e));
        }
    }
}

/// The record of a lock file: `key=value` lines, `state=` last.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Record {
    pid: Option<u32>,
    command: Option<String>,
    since: Option<SystemTime>,
    driver: Option<String>,
    physfn: Option<PciAddress>,
    state: Option<ClaimState>,
}

impl Record {
    fn is_empty(&self) -> bool {
        *self == Record::default()
    }

    fn to_text(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        if let Some(pid) = self.pid {
            let _ = writeln!(s, "pid={pid}");
        }
        if let Some(c) = &self.command {
            let _ = writeln!(s, "comm={}", one_line(c));
        }
        if let Some(t) = self.since {
            let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
            let _ = writeln!(s, "since={secs}");
        }
        if let Some(d) = &self.driver {
            let _ = writeln!(s, "driver={}", one_line(d));
        }
        if let Some(pf) = self.physfn {
            let _ = writeln!(s, "physfn={pf}");
        }
        match &self.state {
            Some(ClaimState::Active) => s.push_str("state=active\n"),
            Some(ClaimState::Releasing { reason }) => {
                let _ = writeln!(s, "reason={}", one_line(reason));
                s.push_str("state=releasing\n");
            }
            None => {}
        }
        s
    }

    /// Parses a record; `None` unless it is complete (a `pid=` line, and a `state=` line
    /// that ends the text). Unknown keys are ignored, for records of later versions.
    fn parse(text: &str) -> Option<Record> {
        if !text.ends_with('\n') {
            return None;
        }
        let mut r = Record::default();
        let mut state = None;
        let mut reason = None;
        let mut last_is_state = false;
        for line in text.lines() {
            let (key, value) = line.split_once('=')?;
            last_is_state = key == "state";
            match key {
                "pid" => r.pid = Some(value.parse().ok()?),
                "comm" => r.command = Some(value.to_owned()),
                "since" => r.since = value.parse().ok().map(|s| UNIX_EPOCH + Duration::from_secs(s)),
                "driver" => r.driver = Some(value.to_owned()),
                // A bad address is as good as none: the relation is an optimisation.
                "physfn" => r.physfn = value.parse().ok(),
                "reason" => reason = Some(value.to_owned()),
                "state" => state = Some(value.to_owned()),
                _ => {}
            }
        }
        if !last_is_state || r.pid.is_none() {
            return None;
        }
        r.state = match state.as_deref()? {
            "active" => Some(ClaimState::Active),
            "releasing" => Some(ClaimState::Releasing {
                reason: reason.unwrap_or_default(),
            }),
            // A state this version does not know: the holder is there, doing something.
            _ => None,
        };
        Some(r)
    }
}

// Reads the record; an empty file reads as an empty record, an incomplete one as an error.
fn read_record(file: &File) -> io::Result<Record> {
    let mut text = Vec::new();
    // `read_at`, not `read`: the offset of a shared description is not ours to move.
    let mut buf = [0u8; 512];
    while (text.len() as u64) < MAX_RECORD {
        let got = file.read_at(&mut buf, text.len() as u64)?;
        if got == 0 {
            break;
        }
        text.extend_from_slice(&buf[..got]);
    }
    if text.is_empty() {
        return Ok(Record::default());
    }
    Record::parse(&String::from_utf8_lossy(&text))
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "incomplete claim record"))
}

// The record of a file whose lock is held. A holder writes it right after locking, so an
// empty or incomplete one is read again for a moment. With `check_pid` (a refused
// claimant, who names the holder in its error), so is one naming a process that does not
// exist: a new holder that has locked a stale file but not yet rewritten it. Without it
// (listing, on every scan), a complete record is believed at once: the lock says the
// claim is live, and a holder in another PID namespace names a PID this one cannot see,
// which would cost the whole wait on every scan. After the wait, the last complete record
// read, else `None`.
fn read_settled(file: &File, check_pid: bool) -> Option<Record> {
    let deadline = Instant::now() + RECORD_WAIT;
    let mut last = None;
    loop {
        if let Ok(r) = read_record(file)
            && !r.is_empty()
        {
            if !check_pid || r.pid.is_some_and(exists) {
                return Some(r);
            }
            last = Some(r);
        }
        if Instant::now() >= deadline {
            return last;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

// Whether process `pid` exists (in this PID namespace).
fn exists(pid: u32) -> bool {
    let Ok(pid @ 1..) = i32::try_from(pid) else {
        return false;
    };
    // Signal 0 checks only: EPERM means it exists but is not ours to signal.
    !matches!(
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None),
        Err(Errno::ESRCH)
    )
}

// The PID `F_OFD_GETLK` reports for the lock on `file`: OFD locks report -1 (they belong
// to no process), a classic record lock (another tool's) reports its process.
fn lock_holder_pid(file: &File) -> Option<u32> {
    let mut probe = whole_file(libc::F_WRLCK);
    fcntl(file, FcntlArg::F_OFD_GETLK(&mut probe)).ok()?;
    (i32::from(probe.l_type) != libc::F_UNLCK && probe.l_pid > 0).then_some(probe.l_pid as u32)
}

// A lock request covering the whole file, however long it grows (SPDK's lock files take
// the same kind: `super::spdk`).
pub(super) fn whole_file(kind: libc::c_int) -> libc::flock {
    libc::flock {
        l_type: kind as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: 0,
        l_len: 0,
        // Must be 0 for the OFD commands.
        l_pid: 0,
    }
}

// Where `ClaimDir::for_claiming` claims, from `$PCIBUS_CLAIM_DIR`, `$XDG_RUNTIME_DIR`,
// whether the process is root and whether it may create `DEFAULT_DIR`: the directory, and
// whether it is the fallback.
fn claiming_dir(
    env: Option<OsString>,
    runtime: Option<OsString>,
    root: bool,
    may_create: impl Fn(&Path) -> bool,
) -> (PathBuf, bool) {
    if let Some(dir) = env.filter(|v| !v.is_empty()) {
        return (PathBuf::from(dir), false);
    }
    let default = PathBuf::from(DEFAULT_DIR);
    if root || may_create(&default) {
        return (default, false);
    }
    match runtime.map(PathBuf::from).filter(|p| p.is_absolute()) {
        Some(run) => (run.join("pcibus/claims"), true),
        None => (default, false),
    }
}

// Whether this process may write `dir`, or create it: the nearest existing ancestor must
// let it add entries (with its effective IDs, as `mkdir` checks).
fn may_create(dir: &Path) -> bool {
    let Some(existing) = dir.ancestors().find(|p| p.exists()) else {
        return false;
    };
    nix::unistd::eaccess(
        existing,
        nix::unistd::AccessFlags::W_OK | nix::unistd::AccessFlags::X_OK,
    )
    .is_ok()
}

// Where `ClaimDir::from_env` and `for_claiming` check SPDK's lock files.
fn spdk_dir_from_env() -> Option<PathBuf> {
    spdk::dir_from_env(std::env::var_os(SPDK_LOCK_DIR_ENV))
}

// The cause of an error, for a log line (the error's own message does not repeat it).
fn error_source(e: &ClaimError) -> String {
    std::error::Error::source(e).map_or_else(String::new, ToString::to_string)
}

fn own_comm() -> String {
    std::fs::read_to_string("/proc/self/comm")
        .map(|c| c.trim_end_matches('\n').to_owned())
        .unwrap_or_else(|_| "?".to_owned())
}

// Record values are single lines.
fn one_line(s: &str) -> String {
    s.replace(['\n', '\r'], " ")
}

fn lock_name(address: PciAddress) -> String {
    format!("{address}{SUFFIX}")
}

// The device a lock file is about: `0000:01:00.0.lock`, in the canonical spelling only.
fn address_of(name: &OsStr) -> Option<PciAddress> {
    let name = name.to_str()?.strip_suffix(SUFFIX)?;
    let address = PciAddress::parse_strict(name).ok()?;
    (address.to_string() == name).then_some(address)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_lock_file_says_what_it_needs() {
        // The claims directory exists (created by root) but this process may not create
        // its lock file in it, or the file is another user's.
        let dir = ClaimDir::new(DEFAULT_DIR);
        let address = addr("0000:01:00.0");
        for kind in [io::ErrorKind::PermissionDenied, io::ErrorKind::ReadOnlyFilesystem] {
            let e = ClaimError::Io {
                address,
                path: dir.file_of(address),
                op: "open",
                source: io::Error::from(kind),
            };
            let text = e.to_string();
            assert!(
                text.contains("needs root")
                    && text.contains(&dir.file_of(address).display().to_string())
                    && text.contains(DIR_ENV),
                "{text}"
            );
        }
        let e = ClaimError::Io {
            address,
            path: dir.file_of(address),
            op: "lock",
            source: io::Error::from(io::ErrorKind::InvalidInput),
        };
        assert!(!e.to_string().contains("needs root"), "{e}");
    }

    fn addr(s: &str) -> PciAddress {
        s.parse().unwrap()
    }

    #[test]
    fn a_record_round_trips() {
        let r = Record {
            pid: Some(42),
            command: Some("fio\nx".into()),
            since: Some(UNIX_EPOCH + Duration::from_secs(1_764_110_400)),
            driver: Some("nvme".into()),
            physfn: Some(addr("0000:01:00.0")),
            state: Some(ClaimState::Releasing {
                reason: "vfio removal request".into(),
            }),
        };
        let text = r.to_text();
        assert_eq!(
            text,
            "pid=42\ncomm=fio x\nsince=1764110400\ndriver=nvme\nphysfn=0000:01:00.0\nreason=vfio removal request\nstate=releasing\n"
        );
        let back = Record::parse(&text).unwrap();
        assert_eq!(back.command.as_deref(), Some("fio x"));
        assert_eq!(back.physfn, r.physfn);
        assert_eq!(back.state, r.state);
        assert_eq!(back.since, r.since);
    }

    #[test]
    fn an_incomplete_record_is_not_a_record() {
        for text in [
            "",
            "pid=42\n",
            "pid=42\ncomm=fio\nstate=act",
            "comm=fio\nstate=active\n",
            "pid=x\nstate=active\n",
        ] {
            assert_eq!(Record::parse(text), None, "{text:?}");
        }
        let r = Record::parse("pid=7\nfuture=1\nstate=active\n").unwrap();
        assert_eq!(r.pid, Some(7));
    }

    #[test]
    fn only_canonical_lock_names_are_claims() {
        assert_eq!(
            address_of(OsStr::new("0000:01:00.0.lock")),
            Some(addr("0000:01:00.0"))
        );
        for name in ["0000:01:00.0", "1:0.0.lock", "0000:01:00.0.lock.tmp", "x.lock"] {
            assert_eq!(address_of(OsStr::new(name)), None, "{name}");
        }
    }

    #[test]
    fn a_second_fd_of_this_process_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = ClaimDir::new(tmp.path().join("claims"));
        let a = addr("0000:01:00.0");
        let held = dir.claim(a, &ClaimInfo::new().command("holder")).unwrap();
        match dir.claim(a, &ClaimInfo::new()) {
            Err(ClaimError::Held {
                address,
                pid,
                command,
                releasing,
            }) => {
                assert_eq!(address, a);
                assert_eq!(pid, Some(std::process::id()));
                assert_eq!(command.as_deref(), Some("holder"));
                assert_eq!(releasing, None);
            }
            other => panic!("{other:?}"),
        }
        held.mark_releasing("REQ").unwrap();
        let e = dir.claim(a, &ClaimInfo::new()).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "0000:01:00.0 is claimed by PID {} (holder), which is releasing it: REQ",
                std::process::id()
            )
        );
    }

    #[test]
    fn a_record_naming_a_dead_process_is_read_again_then_believed() {
        // What a refused claimant sees while a new holder has locked a stale file and not
        // yet rewritten it; here the record stays, as if the holder were in another PID
        // namespace.
        let tmp = tempfile::tempdir().unwrap();
        let dir = ClaimDir::new(tmp.path());
        let a = addr("0000:01:00.0");
        let held = dir.claim(a, &ClaimInfo::new()).unwrap();
        std::fs::write(held.path(), "pid=999999999\ncomm=elsewhere\nstate=active\n").unwrap();
        let start = Instant::now();
        match dir.claim(a, &ClaimInfo::new()) {
            Err(ClaimError::Held { pid, command, .. }) => {
                assert_eq!(pid, Some(999_999_999));
                assert_eq!(command.as_deref(), Some("elsewhere"));
            }
            other => panic!("{other:?}"),
        }
        assert!(start.elapsed() >= RECORD_WAIT);
        assert!(exists(std::process::id()));
        assert!(!exists(999_999_999));
        assert!(!exists(0));
    }

    #[test]
    fn an_unprivileged_claimant_falls_back_to_its_runtime_directory() {
        let yes = |_: &Path| true;
        let no = |_: &Path| false;
        let env = || Some(OsString::from("/srv/claims"));
        let run = || Some(OsString::from("/run/user/1000"));
        let default = (PathBuf::from(DEFAULT_DIR), false);
        // PCIBUS_CLAIM_DIR wins, always.
        assert_eq!(
            claiming_dir(env(), run(), false, no),
            (PathBuf::from("/srv/claims"), false)
        );
        // Root, or a user who may write the default, claims there.
        assert_eq!(claiming_dir(None, run(), true, no), default);
        assert_eq!(claiming_dir(Some("".into()), run(), false, yes), default);
        // Anyone else: in XDG_RUNTIME_DIR, if there is one (an absolute path).
        assert_eq!(
            claiming_dir(None, run(), false, no),
            (PathBuf::from("/run/user/1000/pcibus/claims"), true)
        );
        assert_eq!(claiming_dir(None, None, false, no), default);
        assert_eq!(claiming_dir(None, Some("rel".into()), false, no), default);
    }

    #[test]
    fn a_directory_this_user_cannot_write_says_what_to_set() {
        let dir = ClaimDir::new(DEFAULT_DIR);
        let e = dir.dir_error(io::Error::from(io::ErrorKind::PermissionDenied));
        let text = e.to_string();
        assert!(
            text.contains(DEFAULT_DIR) && text.contains("PCIBUS_CLAIM_DIR") && text.contains("root"),
            "{text}"
        );
        // Other failures are just that.
        let e = dir.dir_error(io::Error::from(io::ErrorKind::NotFound));
        assert!(!e.to_string().contains("PCIBUS_CLAIM_DIR"), "{e}");
    }

    #[test]
    fn a_held_error_names_the_holder() {
        let e = ClaimError::Held {
            address: addr("0000:01:00.0"),
            pid: Some(42),
            command: Some("fio".into()),
            releasing: None,
        };
        assert_eq!(e.to_string(), "0000:01:00.0 is claimed by PID 42 (fio)");
    }
}
