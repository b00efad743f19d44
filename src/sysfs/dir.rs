//! Reading sysfs attributes relative to an open device directory.
//!
//! The scanner opens each device directory once and reads its attributes with `openat`
//! and `readlinkat` relative to it, so the kernel resolves `bus/pci/devices/ADDR` and its
//! symlink once per device instead of once per attribute.

use std::ffi::OsString;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::{OFlag, openat, readlinkat};
use nix::sys::stat::Mode;

/// The largest attribute the fast path reads. Kernel attributes fit in a page; the
/// `config` header the scanner needs is 64 bytes. More data is reported, not read.
pub(crate) const ATTR_MAX: usize = 4096;

/// An open directory (`O_PATH`), for `openat`-relative reads.
pub(crate) struct DirFd(OwnedFd);

impl DirFd {
    /// Opens `path` (following symlinks) as a directory.
    pub(crate) fn open(path: &Path) -> io::Result<DirFd> {
        let fd = nix::fcntl::open(
            path,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )?;
        Ok(DirFd(fd))
    }

    /// Opens the directory `name` inside this one (following a symlink named `name`).
    pub(crate) fn open_dir(&self, name: &str) -> io::Result<DirFd> {
        let fd = openat(
            self.0.as_fd(),
            name,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )?;
        Ok(DirFd(fd))
    }

    fn open_nonblocking(&self, name: &str) -> io::Result<OwnedFd> {
        let flags = OFlag::O_RDONLY | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC | OFlag::O_NOCTTY;
        Ok(openat(self.0.as_fd(), name, flags, Mode::empty())?)
    }

    /// Reads attribute `name` into `buf`, returning the bytes read. The open uses
    /// `O_NONBLOCK`, so a FIFO (how test trees model a blocking attribute) reads as empty
    /// instead of hanging the fast path; real sysfs files ignore the flag.
    ///
    /// Fails with [`TooLarge`] when the attribute holds more than `buf.len()` bytes.
    pub(crate) fn read<'b>(&self, name: &str, buf: &'b mut [u8]) -> io::Result<&'b [u8]> {
        let fd = self.open_nonblocking(name)?;
        let mut len = 0;
        while len < buf.len() {
            match nix::unistd::read(fd.as_fd(), &mut buf[len..]) {
                Ok(0) => return Ok(&buf[..len]),
                // A short read is the end: a sysfs attribute's `show()` output comes whole
                // in the first read, and a regular file gives all it has up to the count.
                // Not asking again saves a quarter of the fast path's system calls.
                Ok(n) if n < buf.len() - len => return Ok(&buf[..len + n]),
                Ok(n) => len += n,
                Err(Errno::EINTR) => continue,
                // A FIFO without a writer; nothing more will come.
                Err(Errno::EAGAIN) => return Ok(&buf[..len]),
                Err(e) => return Err(e.into()),
            }
        }
        let mut probe = [0u8; 1];
        match nix::unistd::read(fd.as_fd(), &mut probe) {
            Ok(0) | Err(Errno::EAGAIN) => Ok(&buf[..len]),
            Ok(_) => Err(io::Error::new(io::ErrorKind::FileTooLarge, TooLarge(buf.len()))),
            Err(e) => Err(e.into()),
        }
    }

    /// Reads attribute `name` with a plain blocking open and read (no `O_NONBLOCK`), at
    /// most `limit` bytes: for guarded reads only.
    pub(crate) fn read_blocking(&self, name: &str, limit: usize) -> io::Result<Vec<u8>> {
        use std::io::Read;
        let fd = openat(
            self.0.as_fd(),
            name,
            OFlag::O_RDONLY | OFlag::O_CLOEXEC | OFlag::O_NOCTTY,
            Mode::empty(),
        )?;
        let mut out = Vec::new();
        std::fs::File::from(fd).take(limit as u64).read_to_end(&mut out)?;
        Ok(out)
    }

    /// Whether entry `name` exists (not following a symlink). Opens nothing: a FIFO is
    /// only looked at.
    pub(crate) fn exists(&self, name: &str) -> bool {
        nix::sys::stat::fstatat(self.0.as_fd(), name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW).is_ok()
    }

    /// The text of symlink `name`; `Ok(None)` when there is no such entry.
    pub(crate) fn link(&self, name: &str) -> io::Result<Option<OsString>> {
        match readlinkat(self.0.as_fd(), name) {
            Ok(target) => Ok(Some(target)),
            Err(Errno::ENOENT) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }
}

impl AsFd for DirFd {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.0.as_fd()
    }
}

/// The attribute holds more bytes than the reader accepts.
#[derive(Debug, thiserror::Error)]
#[error("larger than {0} bytes")]
pub(crate) struct TooLarge(pub(crate) usize);

/// The last component of a link target (`../../../bus/pci/drivers/nvme` → `nvme`).
pub(crate) fn basename(target: &OsString) -> &[u8] {
    use std::os::unix::ffi::OsStrExt;
    let bytes = target.as_bytes();
    let trimmed = bytes.strip_suffix(b"/").unwrap_or(bytes);
    match trimmed.iter().rposition(|&b| b == b'/') {
        Some(i) => &trimmed[i + 1..],
        None => trimmed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basename_of_link_targets() {
        assert_eq!(basename(&"../../../bus/pci/drivers/nvme".into()), b"nvme");
        assert_eq!(basename(&"../../../kernel/iommu_groups/12/".into()), b"12");
        assert_eq!(basename(&"virtio-pci".into()), b"virtio-pci");
    }

    #[test]
    fn reads_report_oversized_attributes() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("big"), vec![b'x'; 10_000]).unwrap();
        std::fs::write(dir.path().join("small"), b"0x8086\n").unwrap();
        let d = DirFd::open(dir.path()).unwrap();
        let mut buf = [0u8; ATTR_MAX];
        assert_eq!(d.read("small", &mut buf).unwrap(), b"0x8086\n");
        let e = d.read("big", &mut buf).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::FileTooLarge);
        assert_eq!(e.to_string(), "larger than 4096 bytes");
        assert_eq!(
            d.read("missing", &mut buf).unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
        assert!(d.link("missing").unwrap().is_none());
    }

    #[test]
    fn a_fifo_reads_as_empty_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        nix::unistd::mkfifo(&dir.path().join("uevent"), Mode::S_IRUSR | Mode::S_IWUSR).unwrap();
        let d = DirFd::open(dir.path()).unwrap();
        let mut buf = [0u8; 64];
        assert_eq!(d.read("uevent", &mut buf).unwrap(), b"");
    }
}
