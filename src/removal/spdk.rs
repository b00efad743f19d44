//! SPDK's device lock files, as [`Claim`](crate::removal::claim::Claim)s check and hold
//! them (see the [claim module docs](crate::removal::claim#spdk)).
//!
//! SPDK (`spdk_pci_device_claim`) opens `/var/tmp/spdk_pci_lock_0000:01:00.0`
//! (`O_RDWR | O_CREAT`, mode 0600), truncates it to `sizeof(int)`, write-locks the whole
//! file with `F_SETLK` (a classic POSIX record lock) and writes its PID there as a native
//! `int`; when the lock fails it reports "probably process N has claimed it", N read from
//! the file. On release it closes the file and unlinks it.
//!
//! Here the same file is write-locked with `F_OFD_SETLK`: OFD locks and record locks
//! conflict, so either side's lock refuses the other's, and our PID goes where SPDK reads
//! its holder's.

use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{AtFlags, FcntlArg, OFlag, fcntl, openat};
use nix::libc;
use nix::sys::stat::{Mode, fstat, fstatat};

use super::claim::whole_file;
use crate::addr::PciAddress;

/// Where SPDK keeps its lock files.
pub(crate) const DEFAULT_DIR: &str = "/var/tmp";

/// The lock file's name prefix: `spdk_pci_lock_0000:01:00.0`.
const PREFIX: &str = "spdk_pci_lock_";

/// How long a refused claimant waits for a holder that has just locked to write its PID.
const PID_WAIT: Duration = Duration::from_millis(50);

/// How often the file is opened again when it changes under us (SPDK unlinks it on
/// release, and may create it again at once).
const ATTEMPTS: usize = 8;

/// What went wrong with SPDK's lock file.
#[derive(Debug)]
pub(crate) enum SpdkError {
    /// Someone holds SPDK's lock: SPDK (a record lock), or a pcibus claiming in another
    /// claims directory (an OFD lock).
    Held {
        pid: Option<u32>,
        command: Option<String>,
    },
    /// An operation on the file or its directory failed.
    Io { op: &'static str, source: io::Error },
}

fn io_error(op: &'static str) -> impl FnOnce(Errno) -> SpdkError {
    move |e| SpdkError::Io { op, source: e.into() }
}

/// SPDK's lock file of `address` in `dir`.
pub(crate) fn lock_file(dir: &Path, address: PciAddress) -> PathBuf {
    dir.join(file_name(address))
}

// SPDK's `%04x:%02x:%02x.%x` is `PciAddress`'s `Display`.
fn file_name(address: PciAddress) -> String {
    format!("{PREFIX}{address}")
}

/// The directory from the value of [`SPDK_LOCK_DIR_ENV`](crate::removal::claim::SPDK_LOCK_DIR_ENV):
/// unset, [`DEFAULT_DIR`]; empty, none.
pub(crate) fn dir_from_env(var: Option<OsString>) -> Option<PathBuf> {
    match var {
        None => Some(PathBuf::from(DEFAULT_DIR)),
        Some(v) if v.is_empty() => None,
        Some(v) => Some(PathBuf::from(v)),
    }
}

/// SPDK's lock file of one device, write-locked by this process (`F_OFD_SETLK`).
///
/// Dropping it unlocks the file and closes it; the file stays (see
/// [`Claim`](crate::removal::claim::Claim)'s "Dropping"). A forked child's copy only
/// closes its fd, as for the claim itself.
#[derive(Debug)]
pub(crate) struct SpdkLock {
    path: PathBuf,
    file: File,
    owner: u32,
    released: bool,
}

impl SpdkLock {
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Unlocks and closes the file, reporting what dropping it would only log.
    pub(crate) fn release(mut self) -> io::Result<()> {
        self.released = true;
        self.unlock()
    }

    fn unlock(&self) -> io::Result<()> {
        if self.owner != std::process::id() {
            return Ok(());
        }
        fcntl(&self.file, FcntlArg::F_OFD_SETLK(&whole_file(libc::F_UNLCK)))?;
        Ok(())
    }
}

impl Drop for SpdkLock {
    fn drop(&mut self) {
        if !self.released
            && let Err(e) = self.unlock()
        {
            // Closing the fd below drops the lock anyway.
            log::warn!("unlock {}: {e}", self.path.display());
        }
    }
}

/// Checks SPDK's lock of `address` in `dir` and, where this process may, takes it.
///
/// `Err(Held)` if another holds it. `Ok(Some)`: locked, our PID written. `Ok(None)`: free
/// but not locked, because this process may not write the file (or create it: see
/// `may_create`), or there is no such directory; a debug log says which.
pub(crate) fn take(dir: &Path, address: PciAddress) -> Result<Option<SpdkLock>, SpdkError> {
    let path = lock_file(dir, address);
    let name = file_name(address);
    let dir_fd = match nix::fcntl::open(
        dir,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    ) {
        Ok(fd) => fd,
        Err(Errno::ENOENT) => {
            log::debug!(
                "{address}: no SPDK lock directory {}: SPDK's lock not checked",
                dir.display()
            );
            return Ok(None);
        }
        Err(e) => return Err(io_error("open the directory of")(e)),
    };
    for _ in 0..ATTEMPTS {
        let Some((file, writable)) = open(&dir_fd, dir, &name, address)? else {
            return Ok(None);
        };
        let meta = file
            .metadata()
            .map_err(|source| SpdkError::Io { op: "stat", source })?;
        if !meta.file_type().is_file() {
            // Not a file SPDK could lock and write its PID in: SPDK would fail too.
            log::warn!(
                "{address}: {} is not a regular file: SPDK's lock not checked",
                path.display()
            );
            return Ok(None);
        }
        if !writable || meta.nlink() != 1 {
            // Another name of the same file could be anything: only look.
            if writable {
                log::warn!(
                    "{address}: {} has {} links: not writing to it",
                    path.display(),
                    meta.nlink()
                );
            } else {
                log::debug!(
                    "{address}: {} is not writable by this process: SPDK's lock checked, not taken",
                    path.display()
                );
            }
            return match lock_holder(&file) {
                Some(_) => Err(held(&file)),
                None => Ok(None),
            };
        }
        match fcntl(&file, FcntlArg::F_OFD_SETLK(&whole_file(libc::F_WRLCK))) {
            Ok(_) => {}
            Err(Errno::EAGAIN | Errno::EACCES) => return Err(held(&file)),
            Err(e) => return Err(io_error("lock")(e)),
        }
        // SPDK unlinks the file when it releases the device: a lock on a file no longer
        // at `path` guards nothing (the next SPDK creates a new one). Open it again.
        if !still_at(&dir_fd, &name, &file) {
            continue;
        }
        let lock = SpdkLock {
            path,
            file,
            owner: std::process::id(),
            released: false,
        };
        // Dropping `lock` on failure unlocks it.
        if meta.len() < 4 {
            lock.file
                .set_len(4)
                .map_err(|source| SpdkError::Io { op: "extend", source })?;
        }
        let pid = std::process::id() as i32;
        lock.file
            .write_all_at(&pid.to_ne_bytes(), 0)
            .map_err(|source| SpdkError::Io {
                op: "write our PID to",
                source,
            })?;
        log::debug!("{address}: holding SPDK's lock {}", lock.path.display());
        return Ok(Some(lock));
    }
    Err(SpdkError::Io {
        op: "lock",
        source: io::Error::other("the file was replaced each time it was locked"),
    })
}

// SPDK's file of `name` in `dir`, and whether it is open for writing; `None` if it does
// not exist and may not be created, or may not be read.
fn open(
    dir_fd: &OwnedFd,
    dir: &Path,
    name: &str,
    address: PciAddress,
) -> Result<Option<(File, bool)>, SpdkError> {
    // O_NOFOLLOW: the directory may be /var/tmp, where anyone can plant a symlink to a
    // file of root's. O_NONBLOCK: nor may a FIFO planted there stop the claim.
    let flags = OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK;
    for _ in 0..ATTEMPTS {
        // Never O_CREAT on an existing file: with fs.protected_regular, even root is
        // refused an O_CREAT open of another user's file in a sticky directory.
        match openat(dir_fd, name, OFlag::O_RDWR | flags, Mode::empty()) {
            Ok(fd) => return Ok(Some((File::from(fd), true))),
            Err(Errno::ENOENT) => {}
            Err(Errno::EACCES | Errno::EPERM | Errno::EROFS) => {
                match openat(dir_fd, name, OFlag::O_RDONLY | flags, Mode::empty()) {
                    Ok(fd) => return Ok(Some((File::from(fd), false))),
                    // Gone meanwhile (SPDK released it): from the start.
                    Err(Errno::ENOENT) => continue,
                    Err(Errno::EACCES | Errno::EPERM) => {
                        log::debug!(
                            "{address}: {} is not readable by this process: SPDK's lock not checked",
                            dir.join(name).display()
                        );
                        return Ok(None);
                    }
                    Err(e) => return Err(io_error("open")(e)),
                }
            }
            Err(e) => return Err(io_error("open")(e)),
        }
        if !may_create(dir_fd) {
            log::debug!(
                "{address}: not creating SPDK's lock file in {} (it is another user's sticky directory)",
                dir.display()
            );
            return Ok(None);
        }
        match openat(
            dir_fd,
            name,
            OFlag::O_RDWR | OFlag::O_CREAT | OFlag::O_EXCL | flags,
            Mode::from_bits_truncate(0o600),
        ) {
            Ok(fd) => return Ok(Some((File::from(fd), true))),
            // SPDK created it meanwhile: open it as it is.
            Err(Errno::EEXIST) => {}
            Err(Errno::EACCES | Errno::EPERM | Errno::EROFS) => {
                log::debug!(
                    "{address}: {} is not writable by this process: SPDK's lock not taken",
                    dir.display()
                );
                return Ok(None);
            }
            Err(e) => return Err(io_error("create")(e)),
        }
    }
    Err(SpdkError::Io {
        op: "open",
        source: io::Error::other("the file kept vanishing and reappearing"),
    })
}

// Whether a file this process creates in the directory would not keep SPDK out of it
// later. In a sticky directory (/var/tmp), fs.protected_regular refuses SPDK's
// `O_RDWR | O_CREAT` open of an existing file owned by neither SPDK's user nor the
// directory's owner, even to root: so only the directory's owner (root, for /var/tmp)
// creates there.
fn may_create(dir_fd: &OwnedFd) -> bool {
    let Ok(st) = fstat(dir_fd) else {
        return false;
    };
    let sticky = st.st_mode & libc::S_ISVTX != 0;
    !sticky || st.st_uid == nix::unistd::geteuid().as_raw()
}

// Whether `name` in the directory is still the file open as `file`.
fn still_at(dir_fd: &OwnedFd, name: &str, file: &File) -> bool {
    let (Ok(there), Ok(ours)) = (fstatat(dir_fd, name, AtFlags::AT_SYMLINK_NOFOLLOW), fstat(file)) else {
        return false;
    };
    (there.st_dev, there.st_ino) == (ours.st_dev, ours.st_ino)
}

// The refusal: who holds the lock on `file`. A record lock reports its process
// (`F_OFD_GETLK`'s `l_pid`); an OFD lock (another pcibus) does not, and neither does a
// holder in a PID namespace this one cannot see: then the PID in the file, which a holder
// writes right after locking, so a zero is read again for a moment.
fn held(file: &File) -> SpdkError {
    let pid = lock_holder(file).flatten().or_else(|| {
        let deadline = Instant::now() + PID_WAIT;
        loop {
            if let Some(pid) = pid_in(file) {
                return Some(pid);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    });
    SpdkError::Held {
        pid,
        command: pid.and_then(comm_of),
    }
}

// `Some` if the file is locked against us, with the holder's PID if the kernel reports it.
fn lock_holder(file: &File) -> Option<Option<u32>> {
    let mut probe = whole_file(libc::F_WRLCK);
    fcntl(file, FcntlArg::F_OFD_GETLK(&mut probe)).ok()?;
    (i32::from(probe.l_type) != libc::F_UNLCK).then(|| u32::try_from(probe.l_pid).ok().filter(|&p| p > 0))
}

// The PID SPDK (or a pcibus) wrote at offset 0: a native-endian int.
fn pid_in(file: &File) -> Option<u32> {
    let mut buf = [0u8; 4];
    file.read_exact_at(&mut buf, 0).ok()?;
    u32::try_from(i32::from_ne_bytes(buf)).ok().filter(|&p| p > 0)
}

fn comm_of(pid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|c| c.trim_end_matches('\n').to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_file_is_named_as_spdk_names_it() {
        let a: PciAddress = "0000:01:00.0".parse().unwrap();
        assert_eq!(
            lock_file(Path::new("/var/tmp"), a),
            Path::new("/var/tmp/spdk_pci_lock_0000:01:00.0")
        );
        let a: PciAddress = "10000:e1:1f.7".parse().unwrap();
        assert_eq!(file_name(a), "spdk_pci_lock_10000:e1:1f.7");
    }

    #[test]
    fn the_directory_comes_from_the_environment() {
        assert_eq!(dir_from_env(None), Some(PathBuf::from("/var/tmp")));
        assert_eq!(dir_from_env(Some("".into())), None);
        assert_eq!(
            dir_from_env(Some("/srv/spdk".into())),
            Some(PathBuf::from("/srv/spdk"))
        );
    }
}
