//! The kernel side of a UIO device: mmap of its sysfs `resourceN` files, the hot-unplug
//! remap onto anonymous memory, config-space pread/pwrite, and I/O port and MMIO accesses
//! for `rte_pci_ioport_read/write`. The crate's mmap/MMIO unsafe module for UIO: each call
//! is wrapped into a safe function or an `unsafe fn` whose contract names the memory.

use std::fs::File;

pub use crate::vfio_pci::sys::Place;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Opens a device file (`/dev/uioN`, sysfs `config`, `resourceN`) read-write, close-on-exec.
pub fn open_rw(path: &Path) -> io::Result<File> {
    File::options().read(true).write(true).open(path)
}

/// Creates the character device node `path` (`mknod PATH c MAJOR MINOR`, mode 0600), as
/// EAL's `--create-uio-dev` asks for a missing `/dev/uioN`. Needs CAP_MKNOD.
pub fn mknod_char(path: &Path, major: u32, minor: u32) -> io::Result<()> {
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL in the path"))?;
    // SAFETY: c_path is a valid NUL-terminated string for the duration of the call;
    // mknod reads it and touches no other memory of ours.
    let rc = unsafe {
        libc::mknod(
            c_path.as_ptr(),
            libc::S_IFCHR | libc::S_IRUSR | libc::S_IWUSR,
            libc::makedev(major, minor),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Reads the 16-bit register at `offset` of a config file.
pub fn read_u16(file: &File, offset: u64) -> io::Result<u16> {
    let mut b = [0u8; 2];
    file.read_exact_at(&mut b, offset)?;
    Ok(u16::from_le_bytes(b))
}

/// Writes the 16-bit register at `offset` of a config file.
pub fn write_u16(file: &File, offset: u64, value: u16) -> io::Result<()> {
    file.write_all_at(&value.to_le_bytes(), offset)
}

/// A BAR mapped from its sysfs `resourceN` file (shared, read-write); unmapped on drop.
#[derive(Debug)]
pub struct UioBar {
    addr: *mut libc::c_void,
    len: usize,
}

// SAFETY: the mapping is process-wide memory; the struct only holds its address and length
// (it never dereferences them) and unmaps once, in drop.
unsafe impl Send for UioBar {}

impl UioBar {
    /// Maps `len` bytes of `file` from offset 0, shared, read-write, where `place` says
    /// (see [`Place`]: an exact address already in use fails with `EEXIST`, nothing there
    /// is replaced).
    pub fn map(file: &File, len: u64, place: Place) -> io::Result<UioBar> {
        let len = usize::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        if len == 0 {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        let (want, flags) = place.mmap_args()?;
        // SAFETY: a new mapping; without MAP_FIXED the kernel never replaces existing memory
        // (MAP_FIXED_NOREPLACE fails with EEXIST instead; a kernel older than 4.17 takes it
        // as a hint, checked below). The fd may be closed afterwards (the mapping keeps its
        // own reference).
        let addr = unsafe {
            libc::mmap(
                want as *mut libc::c_void,
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | flags,
                file.as_raw_fd(),
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let bar = UioBar { addr, len };
        if matches!(place, Place::Exact(_)) && addr as usize != want {
            // Dropping it unmaps what the kernel put elsewhere.
            return Err(io::Error::from_raw_os_error(libc::EEXIST));
        }
        Ok(bar)
    }

    /// The mapping's address (`mem_resource[i].addr`).
    pub fn addr(&self) -> *mut libc::c_void {
        self.addr
    }

    /// The mapping's length.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the mapping is empty (never: [`UioBar::map`] refuses 0 bytes).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for UioBar {
    fn drop(&mut self) {
        // SAFETY: this struct owns the range [addr, addr + len) (the BAR mapping, or the
        // anonymous memory remap_anonymous put there); nothing of it is used after drop
        // (mem_resource[i].addr is cleared first by the caller).
        unsafe { libc::munmap(self.addr, self.len) };
    }
}

/// Replaces `len` bytes at `addr` (a BAR mapping of a removed device) with private
/// anonymous memory at the same address, so that the driver's later accesses read and
/// write ordinary memory instead of faulting (22.11's `pci_uio_remap_resource`).
/// Async-signal-safe: one `mmap` system call, no allocation, no lock.
///
/// # Safety
/// `[addr, addr + len)` is a BAR mapping this process made (a [`UioBar`]'s range): its old
/// contents become irrelevant.
pub unsafe fn remap_anonymous(addr: *mut libc::c_void, len: usize) -> bool {
    // SAFETY: per the contract, MAP_FIXED replaces only our own BAR mapping.
    let r = unsafe {
        libc::mmap(
            addr,
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
            -1,
            0,
        )
    };
    r == addr
}

/// The access sizes 22.11's `pci_uio_ioport_read/write` use: 4 bytes while at least 4
/// remain, then 2, then 1. Here also only at an address aligned to the size (an MMIO
/// access must be aligned).
fn step(at: u64, remaining: usize) -> usize {
    if remaining >= 4 && at.is_multiple_of(4) {
        4
    } else if remaining >= 2 && at.is_multiple_of(2) {
        2
    } else {
        1
    }
}

/// Reads `len` bytes of device memory at `addr` into `data`, in 4/2/1-byte volatile
/// accesses.
///
/// # Safety
/// `[addr, addr + len)` is inside a live BAR mapping; `data` is writable for `len` bytes.
pub unsafe fn mmio_read(addr: *const u8, data: *mut u8, len: usize) {
    let mut i = 0;
    while i < len {
        let s = step(addr as u64 + i as u64, len - i);
        // SAFETY: per the contract; the source is aligned to s (step), the destination is
        // written unaligned.
        unsafe {
            let (src, dst) = (addr.add(i), data.add(i));
            match s {
                4 => dst
                    .cast::<u32>()
                    .write_unaligned(src.cast::<u32>().read_volatile()),
                2 => dst
                    .cast::<u16>()
                    .write_unaligned(src.cast::<u16>().read_volatile()),
                _ => dst.write(src.read_volatile()),
            }
        }
        i += s;
    }
}

/// Writes `len` bytes of `data` to device memory at `addr`, in 4/2/1-byte volatile
/// accesses.
///
/// # Safety
/// `[addr, addr + len)` is inside a live BAR mapping; `data` is readable for `len` bytes.
pub unsafe fn mmio_write(addr: *mut u8, data: *const u8, len: usize) {
    let mut i = 0;
    while i < len {
        let s = step(addr as u64 + i as u64, len - i);
        // SAFETY: per the contract; the destination is aligned to s (step).
        unsafe {
            let (src, dst) = (data.add(i), addr.add(i));
            match s {
                4 => dst
                    .cast::<u32>()
                    .write_volatile(src.cast::<u32>().read_unaligned()),
                2 => dst
                    .cast::<u16>()
                    .write_volatile(src.cast::<u16>().read_unaligned()),
                _ => dst.write_volatile(src.read()),
            }
        }
        i += s;
    }
}

/// Port I/O (`in`/`out`), x86 only.
#[cfg(target_arch = "x86_64")]
mod pio {
    use core::arch::asm;

    /// # Safety
    /// The process has I/O privilege (`iopl(3)`), `port` belongs to a device it drives.
    pub unsafe fn inb(port: u16) -> u8 {
        let v: u8;
        // SAFETY: per the contract.
        unsafe { asm!("in al, dx", out("al") v, in("dx") port, options(nomem, nostack, preserves_flags)) };
        v
    }
    /// # Safety
    /// As [`inb`].
    pub unsafe fn inw(port: u16) -> u16 {
        let v: u16;
        // SAFETY: per the contract.
        unsafe { asm!("in ax, dx", out("ax") v, in("dx") port, options(nomem, nostack, preserves_flags)) };
        v
    }
    /// # Safety
    /// As [`inb`].
    pub unsafe fn inl(port: u16) -> u32 {
        let v: u32;
        // SAFETY: per the contract.
        unsafe { asm!("in eax, dx", out("eax") v, in("dx") port, options(nomem, nostack, preserves_flags)) };
        v
    }
    /// # Safety
    /// As [`inb`].
    pub unsafe fn outb(port: u16, v: u8) {
        // SAFETY: per the contract.
        unsafe { asm!("out dx, al", in("dx") port, in("al") v, options(nomem, nostack, preserves_flags)) };
    }
    /// # Safety
    /// As [`inb`].
    pub unsafe fn outw(port: u16, v: u16) {
        // SAFETY: per the contract.
        unsafe { asm!("out dx, ax", in("dx") port, in("ax") v, options(nomem, nostack, preserves_flags)) };
    }
    /// # Safety
    /// As [`inb`].
    pub unsafe fn outl(port: u16, v: u32) {
        // SAFETY: per the contract.
        unsafe { asm!("out dx, eax", in("dx") port, in("eax") v, options(nomem, nostack, preserves_flags)) };
    }
}

/// Reads `len` bytes from I/O ports `port..port + len` into `data` (4/2/1-byte `in`s);
/// `Err` on a non-x86 machine.
///
/// # Safety
/// The process has I/O privilege (`rte_eal_iopl_init` succeeded), the ports are a BAR of a
/// device this process drives (checked by the caller), `data` is writable for `len` bytes.
pub unsafe fn port_read(port: u16, data: *mut u8, len: usize) -> io::Result<()> {
    #[cfg(target_arch = "x86_64")]
    {
        let mut i = 0;
        while i < len {
            let p = port.wrapping_add(i as u16);
            let s = step(u64::from(p), len - i);
            // SAFETY: per the contract.
            unsafe {
                let dst = data.add(i);
                match s {
                    4 => dst.cast::<u32>().write_unaligned(pio::inl(p)),
                    2 => dst.cast::<u16>().write_unaligned(pio::inw(p)),
                    _ => dst.write(pio::inb(p)),
                }
            }
            i += s;
        }
        Ok(())
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (port, data, len);
        Err(io::Error::from(io::ErrorKind::Unsupported))
    }
}

/// Writes `len` bytes of `data` to I/O ports `port..port + len` (4/2/1-byte `out`s); `Err`
/// on a non-x86 machine.
///
/// # Safety
/// As [`port_read`]; `data` is readable for `len` bytes.
pub unsafe fn port_write(port: u16, data: *const u8, len: usize) -> io::Result<()> {
    #[cfg(target_arch = "x86_64")]
    {
        let mut i = 0;
        while i < len {
            let p = port.wrapping_add(i as u16);
            let s = step(u64::from(p), len - i);
            // SAFETY: per the contract.
            unsafe {
                let src = data.add(i);
                match s {
                    4 => pio::outl(p, src.cast::<u32>().read_unaligned()),
                    2 => pio::outw(p, src.cast::<u16>().read_unaligned()),
                    _ => pio::outb(p, src.read()),
                }
            }
            i += s;
        }
        Ok(())
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (port, data, len);
        Err(io::Error::from(io::ErrorKind::Unsupported))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_mapping_reads_and_writes_through_and_the_remap_detaches_it() {
        let dir = std::env::temp_dir().join(format!("pcibus-uio-sys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("resource0");
        std::fs::write(&path, [0x11u8; 4096]).unwrap();
        let f = open_rw(&path).unwrap();
        let bar = UioBar::map(&f, 4096, Place::Anywhere).unwrap();
        drop(f);
        let mut got = [0u8; 7];
        // SAFETY: 7 bytes inside the 4096-byte mapping; got is writable.
        unsafe { mmio_read(bar.addr().cast::<u8>().add(1), got.as_mut_ptr(), 7) };
        assert_eq!(got, [0x11; 7]);
        // SAFETY: as above.
        unsafe { mmio_write(bar.addr().cast::<u8>().add(8), [1, 2, 3, 4, 5].as_ptr(), 5) };
        assert_eq!(
            &std::fs::read(&path).unwrap()[8..13],
            &[1, 2, 3, 4, 5],
            "shared mapping"
        );
        // SAFETY: the range is bar's own mapping.
        assert!(unsafe { remap_anonymous(bar.addr(), bar.len()) });
        // SAFETY: the range is still mapped (anonymous now).
        unsafe {
            mmio_read(bar.addr().cast::<u8>(), got.as_mut_ptr(), 7);
            mmio_write(bar.addr().cast::<u8>().add(8), [9u8; 4].as_ptr(), 4);
        }
        assert_eq!(got, [0; 7], "the remapped range is fresh memory");
        assert_eq!(
            &std::fs::read(&path).unwrap()[8..12],
            &[1, 2, 3, 4],
            "the file no longer sees writes"
        );
        assert!(UioBar::map(&open_rw(&path).unwrap(), 0, Place::Anywhere).is_err());
        drop(bar);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn access_steps_are_aligned() {
        assert_eq!(step(0x10, 8), 4);
        assert_eq!(step(0x12, 8), 2);
        assert_eq!(step(0x13, 8), 1);
        assert_eq!(step(0x10, 3), 2);
        assert_eq!(step(0x10, 1), 1);
    }
}
