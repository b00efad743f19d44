//! The kernel side of mapping a vfio-pci device: the VFIO device ioctls, pread/pwrite of
//! regions, mmap of BARs, eventfds. The crate's mmap/ioctl unsafe module: each call is
//! wrapped into a safe function over a device fd that EAL owns (it opened it in
//! `rte_vfio_setup_device` and closes it in `rte_vfio_release_device`; the caller keeps it
//! open across these calls).

use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

use pcibus::vfio::{RegionInfo, parse_region_info};

use crate::ffi::types::VfioIrqInfo;
use crate::ffi::types::measured::{
    VFIO_DEVICE_GET_IRQ_INFO, VFIO_DEVICE_GET_REGION_INFO, VFIO_DEVICE_RESET, VFIO_REGION_INFO_LEN,
};

/// Largest region info (with its capability chain) accepted from the kernel.
const MAX_REGION_INFO: usize = 64 * 1024;

/// `VFIO_DEVICE_GET_REGION_INFO` of region `index`, capability chain included (the buffer
/// grows to the `argsz` the kernel asks for, as 22.11's `pci_vfio_get_region_info`), decoded
/// by pcibus's parser.
pub fn region_info(fd: RawFd, index: u32) -> io::Result<RegionInfo> {
    let mut len = VFIO_REGION_INFO_LEN;
    loop {
        let mut buf = vec![0u8; len];
        buf[0..4].copy_from_slice(&(len as u32).to_ne_bytes());
        buf[8..12].copy_from_slice(&index.to_ne_bytes());
        // SAFETY: the buffer is `len` bytes, the argsz it declares; the kernel writes at most
        // argsz bytes into it.
        let ret = unsafe { libc::ioctl(fd, VFIO_DEVICE_GET_REGION_INFO as libc::c_ulong, buf.as_mut_ptr()) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        let wanted = u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        if wanted > len {
            if wanted > MAX_REGION_INFO {
                return Err(io::Error::other(format!(
                    "region {index} info of {wanted} bytes (more than {MAX_REGION_INFO})"
                )));
            }
            len = wanted;
            continue;
        }
        return parse_region_info(&buf).map_err(io::Error::other);
    }
}

/// `VFIO_DEVICE_GET_IRQ_INFO` of IRQ index `index`: (flags, count).
pub fn irq_info(fd: RawFd, index: u32) -> io::Result<(u32, u32)> {
    let mut info = VfioIrqInfo {
        argsz: size_of::<VfioIrqInfo>() as u32,
        index,
        ..VfioIrqInfo::default()
    };
    // SAFETY: info is a struct vfio_irq_info (layout asserted against <linux/vfio.h>) whose
    // argsz is its size.
    let ret = unsafe { libc::ioctl(fd, VFIO_DEVICE_GET_IRQ_INFO as libc::c_ulong, &raw mut info) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((info.flags, info.count))
}

/// `VFIO_DEVICE_RESET`.
pub fn reset(fd: RawFd) -> io::Result<()> {
    // SAFETY: the ioctl takes no argument.
    if unsafe { libc::ioctl(fd, VFIO_DEVICE_RESET as libc::c_ulong) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// pread at `pos` of the device fd; the count read.
pub fn read_at(fd: RawFd, buf: &mut [u8], pos: u64) -> io::Result<usize> {
    let pos = libc::off_t::try_from(pos).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: buf is writable for its length.
    let n = unsafe { libc::pread(fd, buf.as_mut_ptr().cast(), buf.len(), pos) };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

/// pwrite at `pos` of the device fd; the count written.
pub fn write_at(fd: RawFd, buf: &[u8], pos: u64) -> io::Result<usize> {
    let pos = libc::off_t::try_from(pos).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: buf is readable for its length.
    let n = unsafe { libc::pwrite(fd, buf.as_ptr().cast(), buf.len(), pos) };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

/// pread of `len` bytes at `pos` into C memory.
///
/// # Safety
/// `data` is writable for `len` bytes.
pub unsafe fn read_raw(fd: RawFd, data: *mut u8, len: usize, pos: u64) -> io::Result<usize> {
    let pos = libc::off_t::try_from(pos).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: per the contract.
    let n = unsafe { libc::pread(fd, data.cast(), len, pos) };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

/// pwrite of `len` bytes at `pos` from C memory.
///
/// # Safety
/// `data` is readable for `len` bytes.
pub unsafe fn write_raw(fd: RawFd, data: *const u8, len: usize, pos: u64) -> io::Result<usize> {
    let pos = libc::off_t::try_from(pos).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: per the contract.
    let n = unsafe { libc::pwrite(fd, data.cast(), len, pos) };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

/// A non-blocking, close-on-exec eventfd (as 22.11 creates for each interrupt source).
pub fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: no pointers.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just created and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The system page size.
pub fn page_size() -> u64 {
    // SAFETY: no pointers.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(p).ok().filter(|&p| p > 0).unwrap_or(4096)
}

/// Where a BAR's reservation goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    /// Where the kernel chooses.
    Anywhere,
    /// Preferably at this address (a primary process: see `crate::mp::hint`); elsewhere
    /// when it is taken.
    Hint(u64),
    /// Exactly at this address (a secondary process, where the primary mapped it); an
    /// address range already in use fails (`EEXIST`), nothing there is replaced.
    Exact(u64),
}

impl Place {
    /// mmap's address argument and extra flags for this placement: none, a hint, or
    /// `MAP_FIXED_NOREPLACE` at the exact address (never `MAP_FIXED`). EINVAL for an
    /// address that does not fit a pointer.
    pub fn mmap_args(self) -> io::Result<(usize, libc::c_int)> {
        let (want, flags) = match self {
            Place::Anywhere => (0, 0),
            Place::Hint(a) => (a, 0),
            Place::Exact(a) => (a, libc::MAP_FIXED_NOREPLACE),
        };
        let want = usize::try_from(want).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        Ok((want, flags))
    }
}

/// An inaccessible anonymous reservation of `len` bytes placed as `place` says.
pub fn reserve(len: usize, place: Place) -> io::Result<*mut libc::c_void> {
    let (want, flags) = place.mmap_args()?;
    // SAFETY: an anonymous mapping; without MAP_FIXED the kernel never replaces existing
    // memory (MAP_FIXED_NOREPLACE fails with EEXIST instead, and a kernel older than 4.17
    // treats it as a hint, checked below).
    let addr = unsafe {
        libc::mmap(
            want as *mut libc::c_void,
            len,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | flags,
            -1,
            0,
        )
    };
    if addr == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    if let Place::Exact(_) = place
        && addr as usize != want
    {
        // SAFETY: the reservation just made, which nothing refers to.
        unsafe { libc::munmap(addr, len) };
        return Err(io::Error::from_raw_os_error(libc::EEXIST));
    }
    Ok(addr)
}

/// A BAR mapped into the process: an address-space reservation of the region's size
/// (inaccessible) with the mappable parts of the BAR mmapped over it from the device fd.
/// Dropping it unmaps the whole reservation.
#[derive(Debug)]
pub struct BarMapping {
    addr: *mut libc::c_void,
    len: usize,
}

// SAFETY: the mapping is process-wide memory; the struct only holds its address and length
// (it never dereferences them) and unmaps once, in drop.
unsafe impl Send for BarMapping {}

impl BarMapping {
    /// Reserves `len` bytes where `place` says and maps each (offset in the BAR, length)
    /// of `parts` from the device fd at `region_offset + offset`, shared, read-write, at the
    /// same offset in the reservation. On any failure nothing stays mapped.
    pub fn map(
        fd: RawFd,
        region_offset: u64,
        len: u64,
        parts: &[(u64, u64)],
        place: Place,
    ) -> io::Result<BarMapping> {
        let len = usize::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        let addr = reserve(len, place)?;
        let bar = BarMapping { addr, len };
        for &(offset, size) in parts {
            let (Ok(off), Ok(size)) = (usize::try_from(offset), usize::try_from(size)) else {
                return Err(io::Error::from_raw_os_error(libc::EINVAL));
            };
            if off.checked_add(size).is_none_or(|end| end > len) {
                return Err(io::Error::from_raw_os_error(libc::EINVAL));
            }
            let file_off = region_offset
                .checked_add(offset)
                .and_then(|o| libc::off_t::try_from(o).ok())
                .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
            // SAFETY: the target range lies inside our own reservation (checked above), so
            // MAP_FIXED replaces only memory this struct owns.
            let got = unsafe {
                libc::mmap(
                    bar.addr.cast::<u8>().add(off).cast(),
                    size,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED | libc::MAP_FIXED,
                    fd,
                    file_off,
                )
            };
            if got == libc::MAP_FAILED {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(bar)
    }

    /// The start of the reservation (what `mem_resource[i].addr` gets).
    pub fn addr(&self) -> *mut libc::c_void {
        self.addr
    }

    /// The length of the reservation (the region's size).
    pub fn reserved_len(&self) -> usize {
        self.len
    }
}

impl Drop for BarMapping {
    fn drop(&mut self) {
        // SAFETY: addr/len is the reservation this struct made; nothing of this crate refers
        // to it any more (mem_resource[i].addr is cleared before the drop).
        unsafe { libc::munmap(self.addr, self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    /// The mapping logic over a plain file standing in for the device fd: the parts show the
    /// file's bytes at their offsets, the rest of the reservation is not touched.
    #[test]
    fn bar_mapping_maps_parts_at_their_offsets() {
        let page = page_size() as usize;
        let path = std::env::temp_dir().join(format!("pcibus-dpdk-bar-{}", std::process::id()));
        let mut bytes = vec![0u8; 4 * page];
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = (i / page) as u8 + 1;
        }
        std::fs::write(&path, &bytes).unwrap();
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        // "Region" at file offset page, 3 pages long; map its page 0 and page 2.
        let parts = [(0, page as u64), (2 * page as u64, page as u64)];
        let m = BarMapping::map(
            f.as_raw_fd(),
            page as u64,
            3 * page as u64,
            &parts,
            Place::Anywhere,
        )
        .unwrap();
        assert_eq!(m.reserved_len(), 3 * page);
        // SAFETY: those pages are mapped readable (parts 0 and 2 of the reservation).
        let (a, c) = unsafe {
            (
                m.addr().cast::<u8>().read_volatile(),
                m.addr().cast::<u8>().add(2 * page).read_volatile(),
            )
        };
        assert_eq!((a, c), (2, 4));
        drop(m);
        // A part beyond the reservation is refused, leaving nothing mapped.
        assert!(
            BarMapping::map(
                f.as_raw_fd(),
                0,
                page as u64,
                &[(0, 2 * page as u64)],
                Place::Anywhere
            )
            .is_err()
        );
        let mut buf = [0u8; 1];
        assert_eq!(read_at(f.as_raw_fd(), &mut buf, 3 * page as u64).unwrap(), 1);
        assert_eq!(buf[0], 4);
        assert_eq!(write_at(f.as_raw_fd(), &[9], 0).unwrap(), 1);
        std::fs::remove_file(&path).unwrap();
    }

    /// A secondary's exact placement never replaces memory already there; a primary's hint
    /// is only a preference.
    #[test]
    fn exact_placement_refuses_a_taken_range_and_hints_yield() {
        let page = page_size() as usize;
        let taken = reserve(2 * page, Place::Anywhere).unwrap();
        let at = taken as u64;
        let e = reserve(page, Place::Exact(at + page as u64)).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EEXIST));
        let elsewhere = reserve(page, Place::Hint(at)).unwrap();
        assert_ne!(elsewhere, taken);
        // SAFETY: the reservations made above, used by nothing.
        unsafe {
            libc::munmap(elsewhere, page);
            libc::munmap(taken, 2 * page);
        }
        let again = reserve(page, Place::Exact(at)).unwrap();
        assert_eq!(again as u64, at);
        // SAFETY: as above.
        unsafe { libc::munmap(again, page) };
    }

    #[test]
    fn ioctls_on_a_non_vfio_fd_fail_with_errors() {
        let f = std::fs::File::open("/dev/null").unwrap();
        assert!(region_info(f.as_raw_fd(), 0).is_err());
        assert!(irq_info(f.as_raw_fd(), 2).is_err());
        assert!(reset(f.as_raw_fd()).is_err());
        assert!(eventfd().is_ok());
    }
}
