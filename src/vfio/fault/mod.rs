//! Surviving surprise removal: an opt-in SIGBUS handler for mapped BARs.
//!
//! When a PCI device is surprise-removed (pulled, its slot powered off, a link down) while
//! this process has a BAR mapped through vfio, the next load or store through the mapping
//! can raise SIGBUS, and SIGBUS kills the process. A driver should instead see what a
//! read of a removed device returns through config space or pread: all ones. After
//! [`install`], the handler replaces a faulting area with memory reading `0xff`, the
//! access is retried and completes, and reads of the area return
//! `0xffff_ffff` from then on. The driver sees "device gone" in its registers; the bus
//! (and anyone else who [`subscribe`]d) learns which device it was.
//!
//! # Subscribers
//!
//! Each user of the reports has its own [`Subscriber`] ([`subscribe`]): its own eventfd,
//! and each fault reported to it once ([`Subscriber::take`]), whatever the others take.
//! A [`Bus`](crate::bus::Bus) subscribes by itself and acts on the faults of the devices
//! it holds only. [`events`] and [`take`] are a default subscriber for a process with a
//! single user. See [`Subscriber`] for the details.
//!
//! # Opt-in
//!
//! Nothing happens until [`install`] is called (once per process; later calls do
//! nothing). Every mapped area ([`MappedBar`](super::MappedBar)) is registered in a
//! process-wide table from the moment it is mapped until it is dropped, installed or not,
//! so areas mapped before [`install`] are covered too.
//!
//! # What the handler does, and what it does not
//!
//! The handler runs on the faulting thread, in the middle of a volatile access. It does
//! only async-signal-safe work: it finds the area in the table (atomics, no lock), maps
//! the all-ones file that [`install`] made (a memfd of [`ONES_LEN`] bytes of `0xff`)
//! privately over the area, once per `ONES_LEN` bytes, each `mmap` with `MAP_FIXED` (so
//! another thread reading the area meanwhile sees, at every address, either the old
//! mapping or all ones, never zeros), marks the area faulted for the subscribers live at
//! that moment, counts the fault ([`count`]) and writes to each of their eventfds. It
//! never allocates, locks, logs, or calls driver code: driver callbacks run later, from
//! the bus's event loop, when it sees its subscriber's eventfd readable and takes the
//! faults. `mmap`, `mremap` and `munmap` are not on POSIX's list of
//! async-signal-safe functions, but on Linux (glibc) they are plain system calls with no
//! user-space lock, which is what a handler needs.
//!
//! Writes to a replaced area land in a private copy of their page and are read back, not
//! as all ones (other pages, and other aliases of the same page of the file, still read
//! all ones): the area is no longer the device.
//! [`MappedBar::faulted`](super::MappedBar::faulted) tells a driver that wants to know.
//!
//! The replacement costs no memory proportional to the area: the all-ones file
//! ([`ONES_LEN`] bytes, once per process), a page per page written after the fault, and one
//! mapping (a kernel VMA) per `ONES_LEN` bytes of the area, 512 for a 1 GiB BAR. (`Rss`
//! counts the file's pages once per place they are read, though they exist once.) If the
//! process runs out of mappings (`vm.max_map_count`) midway, the rest of the area is
//! replaced by anonymous memory filled with `0xff`, which costs its size.
//!
//! # Chaining: a SIGBUS that is not ours is never swallowed
//!
//! Only a fault with `si_code == BUS_ADRERR` (what the kernel sends when a mapping's
//! backing page is gone: a vfio BAR of a removed device, a truncated file) inside a
//! registered area is handled. Any other SIGBUS goes where it would have gone without
//! this module: to the handler installed before [`install`] (called with the same
//! arguments), or, if that was the default action or "ignore", the default action is
//! restored and the process dies of SIGBUS as it would have (a fault repeats when the
//! handler returns; a SIGBUS sent by `kill` is raised again; a sent SIGBUS that was
//! ignored stays ignored). A handler installed *after* [`install`] replaces this one,
//! unless it chains in turn.
//!
//! # Limits
//!
//! The table has [`CAPACITY`] slots. An area mapped while it is full still works but is
//! not covered: a SIGBUS in it kills the process as before (logged once, as a warning).
//! A faulted area keeps its slot until every subscriber live at the fault has taken it
//! (or gone away), even if the area is dropped first; so faults are never lost, but a
//! subscriber that never takes (and is never dropped) can fill the table with faulted
//! areas. A fault with no subscriber frees its slot when its area is dropped. At most
//! [`SUBSCRIBERS`] subscribers exist at once.
//!
//! # Revoking
//!
//! The same replacement (the all-ones file, stride by stride), done on purpose and
//! reported to no subscriber, closes a device's mappings under their owner
//! ([`VfioDevice::revoke`](super::VfioDevice::revoke)): a mapping holds the device file
//! open, and the kernel's removal waits for that file. The handler then treats the area
//! as a replaced one (a fault in it is retried, never reported again), but it is not
//! [faulted](super::MappedBar::faulted), and its slot is freed when it is dropped, as a
//! live area's. It needs the table: an area it does not cover cannot be replaced safely
//! (its owner may be unmapping it), so a device with such an area cannot be revoked. A
//! revoke before [`install`] makes the all-ones file too.
#![allow(unsafe_code)]

use std::io::{self, Write};
use std::num::NonZeroUsize;
use std::os::fd::{AsRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, SealFlag, fcntl};
use nix::libc;
use nix::sys::memfd::{MFdFlags, memfd_create};
use nix::sys::mman::{MRemapFlags, MapFlags, ProtFlags, mmap_anonymous, mremap, munmap};
use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, raise, sigaction};
use parking_lot::Mutex;

use crate::addr::PciAddress;

mod subscriber;
mod table;

pub use subscriber::{SUBSCRIBERS, SubscribeError, Subscriber, events, subscribe, take};
use table::Table;

/// How many mapped areas the process-wide table covers.
pub const CAPACITY: usize = 256;

/// The size of the all-ones file the handler maps over a faulted area, one alias per
/// `ONES_LEN` bytes of the area: what the replacement costs in memory, once per process.
pub const ONES_LEN: usize = 2 << 20;

/// Which device and BAR a mapped area belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FaultOwner {
    /// The device.
    pub address: PciAddress,
    /// The region (BAR) index.
    pub region: u32,
}

/// A mapped area that was replaced by all-ones memory after a SIGBUS, as
/// [`Subscriber::take`] reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Fault {
    /// The area's device and BAR.
    pub owner: FaultOwner,
    /// Where in the area the first faulting access was, in bytes from its start.
    pub offset_in_area: u64,
    /// The area's length in bytes (all of it was replaced).
    pub area_len: u64,
}

/// Why [`install`] failed; nothing was installed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FaultError {
    /// `sigaction(SIGBUS)` failed, reading the old action or installing the handler.
    #[error("sigaction(SIGBUS) failed")]
    Sigaction(#[source] io::Error),
    /// The all-ones file the handler maps over a faulted area (a memfd of
    /// [`ONES_LEN`] bytes) could not be made.
    #[error("making the {ONES_LEN}-byte all-ones memfd for faulted BARs failed")]
    Memfd(#[source] io::Error),
}

/// Installs the SIGBUS handler, process-wide; later calls return `Ok` and do nothing.
/// See the [module docs](self) for what it does and when it passes a SIGBUS on.
pub fn install() -> Result<(), FaultError> {
    static LOCK: Mutex<()> = Mutex::new(());
    let _serial = LOCK.lock();
    if installed() {
        return Ok(());
    }
    make_ones().map_err(FaultError::Memfd)?;
    // The old action is stored before the handler can run, so the handler always has it.
    if OLD_ACTION.get().is_none() {
        // SAFETY: zeroed is a valid `sigaction` (SIG_DFL, no flags, empty mask).
        let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
        // SAFETY: a null new action only reads the current one into `old`, a valid out
        // pointer.
        if unsafe { libc::sigaction(libc::SIGBUS, std::ptr::null(), &mut old) } != 0 {
            return Err(FaultError::Sigaction(io::Error::last_os_error()));
        }
        let _ = OLD_ACTION.set(old);
    }
    let action = SigAction::new(
        SigHandler::SigAction(on_sigbus),
        SaFlags::SA_SIGINFO | SaFlags::SA_ONSTACK,
        SigSet::empty(),
    );
    // SAFETY: `on_sigbus` is async-signal-safe (atomics and system calls only, no
    // allocation, no lock) and never unwinds; the state it reads (table, subscribers,
    // all-ones file, old action) is static and initialized above or always valid.
    let replaced = match unsafe { sigaction(Signal::SIGBUS, &action) } {
        Ok(replaced) => libc::sigaction::from(replaced),
        Err(e) => return Err(FaultError::Sigaction(e.into())),
    };
    if let Some(old) = OLD_ACTION.get()
        && (old.sa_sigaction != replaced.sa_sigaction || old.sa_flags != replaced.sa_flags)
    {
        log::warn!(
            "the SIGBUS action changed while the fault handler was being installed; chaining to the older one"
        );
    }
    INSTALLED.store(true, Ordering::Release);
    Ok(())
}

/// Whether [`install`] has installed the handler.
pub fn installed() -> bool {
    INSTALLED.load(Ordering::Acquire)
}

/// How many areas the handler has replaced since the process started.
pub fn count() -> u64 {
    FAULTS.load(Ordering::Relaxed)
}

/// An area's entry in the table, from [`register`]; dropping it unregisters the area,
/// which must happen before the area is unmapped.
#[derive(Debug)]
pub(crate) struct Registration {
    index: usize,
    generation: u64,
}

/// Names a registered area for [`revoke`], from code other than its owner's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct AreaKey {
    index: usize,
    generation: u64,
}

/// Replaces the area registered as `key` with all-ones memory, as the handler does after
/// a fault, but reported to no subscriber (see [Revoking](self#revoking)). True if the
/// area no longer maps what it mapped: replaced now or earlier (a fault, a revoke), or
/// unmapped by its owner since. False if the replacement failed (the area is as it was,
/// or, if it failed midway, partly all ones: it stays live, and a fault may replace it).
/// Its owner may drop it meanwhile: unregistering waits for the replacement to end.
pub(crate) fn revoke(key: AreaKey) -> bool {
    // Not in a handler: the all-ones file can be made here if `install` has not, so the
    // replacement costs no memory proportional to the area.
    if let Err(e) = make_ones() {
        log::warn!(
            "making the {ONES_LEN}-byte all-ones memfd failed ({e}): revoked BAR areas are filled with anonymous memory instead"
        );
    }
    TABLE.revoke(key.index, key.generation, replace)
}

/// Registers `[start, start + len)`, a mapping owned by the caller, for the handler.
/// `None` when the table is full (logged once): the area then is not covered.
pub(crate) fn register(start: NonNull<u8>, len: usize, owner: FaultOwner) -> Option<Registration> {
    static WARNED: AtomicBool = AtomicBool::new(false);
    let registered = TABLE.register(start.as_ptr() as usize, len, owner);
    if registered.is_none() && !WARNED.swap(true, Ordering::Relaxed) {
        log::warn!(
            "SIGBUS fault table full ({CAPACITY} areas): BAR{} of {} and later areas are not covered against surprise removal",
            owner.region,
            owner.address
        );
    }
    registered.map(|(index, generation)| Registration { index, generation })
}

impl Registration {
    /// Whether the handler has replaced the area.
    pub(crate) fn faulted(&self) -> bool {
        TABLE.faulted(self.index, self.generation)
    }

    /// The area's key, for [`revoke`].
    pub(crate) fn key(&self) -> AreaKey {
        AreaKey {
            index: self.index,
            generation: self.generation,
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        TABLE.unregister(self.index, self.generation);
    }
}

static TABLE: Table<CAPACITY> = Table::new();
static INSTALLED: AtomicBool = AtomicBool::new(false);
/// The all-ones file (a sealed memfd of [`ONES_LEN`] bytes of `0xff`), made by [`install`]
/// or the first [`revoke`].
static ONES: OnceLock<OwnedFd> = OnceLock::new();
/// Its number, for the handler (-1: none).
static ONES_FD: AtomicI32 = AtomicI32::new(-1);
/// The SIGBUS action before [`install`], to chain to.
static OLD_ACTION: OnceLock<libc::sigaction> = OnceLock::new();
static FAULTS: AtomicU64 = AtomicU64::new(0);

/// The SIGBUS handler. Async-signal-safe: atomics and system calls only; saves and
/// restores `errno` for the interrupted code.
extern "C" fn on_sigbus(signal: libc::c_int, info: *mut libc::siginfo_t, context: *mut libc::c_void) {
    let errno = Errno::last_raw();
    // SAFETY: with SA_SIGINFO the kernel passes a valid siginfo (null checked anyway).
    // `si_addr` reads the fault member of its union, which holds plain integers whatever
    // the code; it is only used for BUS_ADRERR, where the kernel set it.
    let (code, addr) = unsafe {
        match info.as_ref() {
            Some(info) => (info.si_code, info.si_addr() as usize),
            None => (libc::SI_USER, 0),
        }
    };
    if !(code == libc::BUS_ADRERR && handle(addr)) {
        chain(signal, info, context, code);
    }
    Errno::set_raw(errno);
}

/// Handles a fault at `addr` if it lies in a registered area: true if the access can be
/// retried.
fn handle(addr: usize) -> bool {
    let Some(hit) = TABLE.find(addr) else {
        return false;
    };
    if !TABLE.claim(hit) {
        // Being replaced by another thread, or replaced already: retry the access. (If
        // the slot changed, the retry faults again and is looked up afresh.)
        return true;
    }
    if !replace(hit.start, hit.len) {
        TABLE.finish(hit, None, 0);
        return false;
    }
    // Read while the slot is claimed: a subscriber going away either is in this mask and
    // waits for the claim to end before clearing its bit, or is not in it.
    let subscribers = subscriber::live();
    TABLE.finish(hit, Some((addr - hit.start) as u64), subscribers);
    FAULTS.fetch_add(1, Ordering::Relaxed);
    subscriber::notify(subscribers);
    true
}

/// Replaces `[start, start + len)` by memory reading all ones, for the handler or
/// [`revoke`]. Async-signal-safe.
///
/// Stride by stride, each stride a private mapping of the all-ones file ([`ONES`]) put
/// over the area with `MAP_FIXED`: no memory proportional to the area, `len / ONES_LEN`
/// system calls. Each `mmap` replaces its range atomically (under the process's mmap
/// lock), so another thread reading any address of the area sees the old mapping (which
/// faults, and the handler has it retry while this one works) or all ones, never zeros
/// or a hole. The area is not replaced in one step, as building the aliases elsewhere and
/// moving them over with one `mremap` would do: before Linux 6.17, `mremap` refuses
/// (`EFAULT`) a source made of several mappings, and each alias is one. Nothing depends
/// on one step: the area's accesses fault until their stride is replaced (a device's BAR
/// pages are zapped together, a truncated file's too), and the handler holds the slot
/// (`FAULTING`) until the last stride is done, so those accesses are retried meanwhile. (A
/// revoke replaces a working area: until its stride is replaced, an access still reaches
/// the device, which is still open.)
///
/// If a stride cannot be mapped (out of mappings: `vm.max_map_count`), the rest of the
/// area is replaced as before the all-ones file existed: by anonymous memory filled with
/// `0xff` elsewhere and moved over the rest in one `mremap`, costing its size.
fn replace(start: usize, len: usize) -> bool {
    let mut done = 0;
    let fd = ONES_FD.load(Ordering::Acquire);
    while fd >= 0 && done < len {
        let stride = (len - done).min(ONES_LEN);
        // SAFETY: the target is inside a registered, live area (`find` matched it and
        // `claim` holds it, or `Table::revoke` claimed it by its generation), exactly as
        // it was mapped: its owner unregisters it before unmapping it, which waits while
        // it is claimed. Its owner reaches it only through raw pointers with volatile
        // accesses, so replacing its pages under it invalidates no reference. `fd` is the
        // all-ones file, open for the rest of the process and at least `stride` long
        // (sealed against shrinking). A raw mmap(2): no `BorrowedFd` needed in a handler.
        let mapped = unsafe {
            libc::mmap(
                (start + done) as *mut libc::c_void,
                stride,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_FIXED,
                fd,
                0,
            )
        };
        if mapped == libc::MAP_FAILED {
            break;
        }
        done += stride;
    }
    done == len || replace_by_copy(start + done, len - done)
}

/// Replaces `[start, start + len)`, a part of one live mapping, by private anonymous
/// memory filled with `0xff`, in one step. Async-signal-safe. Costs `len` bytes of memory.
fn replace_by_copy(start: usize, len: usize) -> bool {
    let (Some(size), Some(target)) = (NonZeroUsize::new(len), NonNull::new(start as *mut libc::c_void))
    else {
        return false;
    };
    // SAFETY: a fresh anonymous mapping at an address the kernel picks: replaces nothing.
    let Ok(fresh) = (unsafe {
        mmap_anonymous(
            None,
            size,
            ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
            MapFlags::MAP_PRIVATE,
        )
    }) else {
        return false;
    };
    // SAFETY: `fresh` is `len` writable bytes that nothing else knows of.
    unsafe { fresh.cast::<u8>().as_ptr().write_bytes(0xff, len) };
    // SAFETY: as in `replace`: the target is inside a registered, live area held by this
    // handler or a revoke, reached by its owner through raw pointers only. MREMAP_FIXED
    // replaces the old mapping atomically, and `fresh` does not overlap it.
    let moved = unsafe {
        mremap(
            fresh,
            len,
            len,
            MRemapFlags::MREMAP_MAYMOVE | MRemapFlags::MREMAP_FIXED,
            Some(target),
        )
    };
    if moved.is_err() {
        // SAFETY: `fresh` is still the mapping made above, used by nothing.
        if unsafe { munmap(fresh, len) }.is_err() {
            // Counted, not logged: logging is not async-signal-safe.
            super::dma::munmap_failed_in_signal_handler();
        }
        return false;
    }
    true
}

/// Makes the all-ones file ([`ONES`], [`ONES_FD`]) unless it exists.
fn make_ones() -> io::Result<()> {
    static LOCK: Mutex<()> = Mutex::new(());
    let _serial = LOCK.lock();
    if ONES.get().is_none() {
        let ones = ones_file()?;
        ONES_FD.store(ones.as_raw_fd(), Ordering::Release);
        let _ = ONES.set(ones);
    }
    Ok(())
}

/// Makes the all-ones file: [`ONES_LEN`] bytes of `0xff` in a memfd, sealed against
/// shrinking (a shorter file would fault in the aliases) and growing.
fn ones_file() -> io::Result<OwnedFd> {
    let fd = memfd_create(
        c"pcibus-fault-ones",
        MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
    )?;
    let mut file = std::fs::File::from(fd);
    let chunk = vec![0xffu8; 64 << 10];
    for _ in 0..ONES_LEN / chunk.len() {
        file.write_all(&chunk)?;
    }
    let fd = OwnedFd::from(file);
    fcntl(
        &fd,
        FcntlArg::F_ADD_SEALS(SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SEAL),
    )?;
    Ok(fd)
}

/// Passes a SIGBUS that is not ours to the action that was there before [`install`].
fn chain(signal: libc::c_int, info: *mut libc::siginfo_t, context: *mut libc::c_void, code: libc::c_int) {
    let Some(old) = OLD_ACTION.get() else {
        return default_action(code);
    };
    let own = on_sigbus as extern "C" fn(_, _, _) as usize;
    match old.sa_sigaction {
        // A sent SIGBUS that was ignored stays ignored (a fault would kill anyway).
        libc::SIG_IGN if code <= 0 => {}
        libc::SIG_DFL | libc::SIG_IGN => default_action(code),
        handler if handler == own => default_action(code),
        handler if old.sa_flags & libc::SA_SIGINFO != 0 => {
            // SAFETY: the kernel holds this value as an SA_SIGINFO handler, installed by
            // whoever set it with that signature.
            let handler: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                unsafe { std::mem::transmute(handler) };
            handler(signal, info, context);
        }
        handler => {
            // SAFETY: as above, a plain `sa_handler`.
            let handler: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute(handler) };
            handler(signal);
        }
    }
}

/// Restores the default action so the process dies of this SIGBUS as it would have: a
/// fault repeats on return; anything else is raised again (pending until the handler
/// returns).
fn default_action(code: libc::c_int) {
    let default = SigAction::new(SigHandler::SigDfl, SaFlags::empty(), SigSet::empty());
    // SAFETY: SIG_DFL is always a valid action; sigaction(2) is async-signal-safe.
    let _ = unsafe { sigaction(Signal::SIGBUS, &default) };
    let repeats = matches!(
        code,
        libc::BUS_ADRALN | libc::BUS_ADRERR | libc::BUS_OBJERR | libc::BUS_MCEERR_AR
    );
    if !repeats {
        let _ = raise(Signal::SIGBUS);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::table::{FREE, LIVE, ORPHAN, tag_generation, tag_state};
    use super::*;
    use crate::vfio::mmio::MmioArea;
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    use std::io::Write;
    use std::os::fd::{AsFd, BorrowedFd};
    use std::time::{Duration, Instant};

    const PAGE: usize = 4096;

    /// Tests that fault areas hold this: a subscriber sees every fault in the process,
    /// and [`count`] counts them all.
    pub(crate) static SERIAL: Mutex<()> = Mutex::new(());

    fn owner(address: &str, region: u32) -> FaultOwner {
        FaultOwner {
            address: address.parse().unwrap(),
            region,
        }
    }

    /// A file of `pages` pages whose 32-bit word at byte offset `o` is `0x5a00_0000 + o`,
    /// mapped as an area of `owner`.
    fn file_area(pages: usize, owner: FaultOwner) -> (std::fs::File, MmioArea) {
        let mut file = tempfile::tempfile().unwrap();
        let words: Vec<u8> = (0..pages * PAGE / 4)
            .flat_map(|i| (0x5a00_0000 + 4 * i as u32).to_ne_bytes())
            .collect();
        file.write_all(&words).unwrap();
        let area = MmioArea::map(file.as_fd(), 0, pages * PAGE, owner).unwrap();
        (file, area)
    }

    fn readable(fd: BorrowedFd<'_>) -> bool {
        let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
        poll(&mut fds, PollTimeout::ZERO).unwrap() == 1
    }

    #[test]
    fn a_vanished_mapping_reads_all_ones_and_is_reported_once() {
        let _serial = SERIAL.lock();
        install().unwrap();
        install().unwrap();
        let mut subscriber = subscribe().unwrap();
        let bar2 = owner("0000:5e:00.1", 2);
        let (file, area) = file_area(2, bar2);
        assert_eq!(area.read32(0), Some(0x5a00_0000));
        assert_eq!(area.read32(PAGE + 8), Some(0x5a00_0000 + PAGE as u32 + 8));
        assert!(!area.faulted());
        let faults = count();

        // The backing pages go, as a BAR's do on surprise removal: the next access faults.
        file.set_len(0).unwrap();
        assert_eq!(area.read32(PAGE + 8), Some(0xffff_ffff));
        assert_eq!(area.read32(0), Some(0xffff_ffff));
        assert_eq!(area.read64(PAGE - 8), Some(u64::MAX));
        assert!(area.faulted());
        assert_eq!(count(), faults + 1);

        assert!(readable(subscriber.as_fd()));
        assert_eq!(
            subscriber.take(),
            [Fault {
                owner: bar2,
                offset_in_area: (PAGE + 8) as u64,
                area_len: (2 * PAGE) as u64,
            }]
        );
        assert!(!readable(subscriber.as_fd()));
        assert!(subscriber.take().is_empty());

        // Writes land in the replacement; nothing faults any more.
        assert_eq!(area.write32(4, 0x1234_5678), Some(()));
        assert_eq!(area.write64(PAGE, 0), Some(()));
        assert!(area.faulted());
        assert_eq!(count(), faults + 1);
        assert!(subscriber.take().is_empty());
    }

    #[test]
    fn a_fault_of_an_area_dropped_before_take_is_still_reported() {
        let _serial = SERIAL.lock();
        install().unwrap();
        let mut subscriber = subscribe().unwrap();
        let bar0 = owner("10000:e1:1f.7", 0);
        let (file, area) = file_area(1, bar0);
        file.set_len(0).unwrap();
        assert_eq!(area.read32(12), Some(0xffff_ffff));
        drop(area);
        let faults = subscriber.take();
        assert_eq!(faults.len(), 1);
        assert_eq!((faults[0].owner, faults[0].offset_in_area), (bar0, 12));
        assert!(subscriber.take().is_empty());
    }

    #[test]
    fn threads_racing_on_a_vanishing_area_see_its_content_or_all_ones() {
        // One alias of the all-ones file, and several (the last one partial): each address
        // goes from the old mapping to all ones in one step.
        for pages in [16, 3 * ONES_LEN / PAGE + 3] {
            let _serial = SERIAL.lock();
            install().unwrap();
            let mut subscriber = subscribe().unwrap();
            let bar0 = owner("0000:65:00.0", 0);
            let (file, area) = file_area(pages, bar0);
            let faults = count();
            std::thread::scope(|s| {
                for t in 0..8 {
                    let area = &area;
                    s.spawn(move || {
                        let mut at = t * 4 * 1031 % (pages * PAGE);
                        loop {
                            let value = area.read32(at).unwrap();
                            if value == 0xffff_ffff {
                                break;
                            }
                            assert_eq!(value, 0x5a00_0000 + at as u32, "never zeros or torn");
                            at = (at + 4 * 1031) % (pages * PAGE);
                        }
                    });
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
                file.set_len(0).unwrap();
            });
            assert_eq!(count(), faults + 1, "replaced once");
            for at in (0..pages * PAGE).step_by(PAGE) {
                assert_eq!(area.read32(at), Some(u32::MAX));
            }
            let taken = subscriber.take();
            assert_eq!(taken.len(), 1);
            assert_eq!(taken[0].owner, bar0);
        }
    }

    #[test]
    fn the_fallback_fills_the_rest_of_an_area_in_one_step() {
        let len = 4 * PAGE;
        // SAFETY: a fresh private mapping that only this test uses, unmapped at the end.
        let start = unsafe {
            mmap_anonymous(
                None,
                NonZeroUsize::new(len).unwrap(),
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_PRIVATE,
            )
        }
        .unwrap();
        let bytes = start.cast::<u8>().as_ptr();
        // SAFETY: inside the mapping; no reference into it is made.
        unsafe { bytes.write_bytes(0x11, len) };
        assert!(replace_by_copy(bytes as usize + PAGE, 3 * PAGE));
        // SAFETY: reads inside the mapping (replaced in part, at the same place and size).
        let read = |at: usize| unsafe { bytes.add(at).read_volatile() };
        assert_eq!((read(0), read(PAGE - 1)), (0x11, 0x11));
        assert_eq!((read(PAGE), read(len - 1)), (0xff, 0xff));
        // SAFETY: the mapping made above (its tail replaced in place), used no more.
        unsafe { munmap(start, len) }.unwrap();
    }

    /// The `field` (`Rss`, `Anonymous`) bytes of the mappings inside
    /// `[start, start + len)`, from `/proc/self/smaps`: what this area costs, whatever other
    /// tests allocate meanwhile.
    fn smaps_in(start: usize, len: usize, field: &str) -> usize {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut inside = false;
        let mut kib = 0;
        for line in smaps.lines() {
            if let Some((range, _)) = line.split_once(' ')
                && let Some((from, to)) = range.split_once('-')
                && let (Ok(from), Ok(to)) = (usize::from_str_radix(from, 16), usize::from_str_radix(to, 16))
            {
                inside = from >= start && to <= start + len;
            } else if inside
                && let Some((name, value)) = line.split_once(':')
                && name == field
            {
                kib += value
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<usize>()
                    .unwrap();
            }
        }
        kib << 10
    }

    #[test]
    fn a_large_area_is_replaced_without_memory_proportional_to_it() {
        let _serial = SERIAL.lock();
        install().unwrap();
        const LEN: usize = 256 << 20;
        let file = tempfile::tempfile().unwrap();
        file.set_len(LEN as u64).unwrap();
        let area = MmioArea::map(file.as_fd(), 0, LEN, owner("0000:c1:00.0", 1)).unwrap();
        let registration = area.registration().unwrap();
        let start = TABLE.slots[registration.index].start.load(Ordering::Relaxed);
        assert_eq!(area.read32(0), Some(0), "a hole of the sparse file");

        file.set_len(0).unwrap();
        for at in (0..LEN).step_by(1 << 20) {
            assert_eq!(area.read32(at + 12), Some(u32::MAX), "at {at:#x}");
        }
        assert_eq!(area.read64(LEN - 8), Some(u64::MAX));
        assert!(area.faulted());
        // Reads map pages of the shared all-ones file (fault-around maps up to 64 KiB of
        // it per read, each counted in Rss as often as mapped); none is the process's own.
        assert_eq!(smaps_in(start, LEN, "Anonymous"), 0);
        let resident = smaps_in(start, LEN, "Rss");
        assert!(
            resident <= 32 << 20,
            "{} MiB resident for a 256 MiB area read in 257 places",
            resident >> 20
        );

        // A write lands in a private copy of its page only.
        assert_eq!(area.write32(8, 0x1234_5678), Some(()));
        assert_eq!(smaps_in(start, LEN, "Anonymous"), PAGE);
        assert_eq!(area.read32(8), Some(0x1234_5678));
        assert_eq!(area.read32(12), Some(u32::MAX));
        for at in [PAGE + 8, (2 << 20) + 8, (64 << 20) + 8] {
            assert_eq!(area.read32(at), Some(u32::MAX), "another alias at {at:#x}");
        }
    }

    #[test]
    fn two_subscribers_each_see_a_fault_once_and_its_slot_is_freed_after_both() {
        let _serial = SERIAL.lock();
        install().unwrap();
        let mut a = subscribe().unwrap();
        let mut b = subscribe().unwrap();
        let bar1 = owner("0000:3b:00.0", 1);
        let (file, area) = file_area(1, bar1);
        let index = area.registration().unwrap().index;
        let generation = area.registration().unwrap().generation;
        file.set_len(0).unwrap();
        assert_eq!(area.read32(0), Some(u32::MAX));
        assert!(readable(a.as_fd()) && readable(b.as_fd()));

        let seen = a.take();
        assert_eq!(seen.iter().map(|f| f.owner).collect::<Vec<_>>(), [bar1]);
        assert!(a.take().is_empty());
        assert!(readable(b.as_fd()), "a's take leaves b's events alone");
        drop(area);
        assert_eq!(
            tag_state(TABLE.slots[index].tag.load(Ordering::SeqCst)),
            ORPHAN,
            "b has not taken it"
        );
        assert_eq!(b.take(), seen);
        // Freed once every subscriber that existed at the fault took it or went away
        // (other tests' buses may be subscribed too).
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let tag = TABLE.slots[index].tag.load(Ordering::SeqCst);
            if tag_generation(tag) != generation || tag_state(tag) == FREE {
                break;
            }
            assert!(Instant::now() < deadline, "the slot is never freed");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn a_subscriber_made_after_a_fault_does_not_see_it() {
        let _serial = SERIAL.lock();
        install().unwrap();
        let bar0 = owner("0000:3b:00.1", 0);
        let (file, area) = file_area(1, bar0);
        file.set_len(0).unwrap();
        assert_eq!(area.read32(0), Some(u32::MAX));
        let mut late = subscribe().unwrap();
        assert!(late.take().iter().all(|f| f.owner != bar0));
    }

    #[test]
    fn subscriber_slots_run_out_and_come_back() {
        // Not while a test's bus subscribes.
        let _serial = SERIAL.lock();
        // Other tests' buses may hold a few slots: take what is left.
        let mut held = Vec::new();
        let full = loop {
            match subscribe() {
                Ok(s) => held.push(s),
                Err(e) => break e,
            }
            assert!(held.len() <= SUBSCRIBERS);
        };
        assert!(matches!(full, SubscribeError::Full), "{full}");
        held.pop();
        let again = subscribe().unwrap();
        assert!(matches!(subscribe(), Err(SubscribeError::Full)));
        drop(again);
    }

    #[test]
    fn the_default_subscriber_reports_faults_from_its_first_use() {
        let _serial = SERIAL.lock();
        install().unwrap();
        let before = owner("0000:3c:00.0", 0);
        let (file, first) = file_area(1, before);
        file.set_len(0).unwrap();
        assert_eq!(first.read32(0), Some(u32::MAX));
        let events = events().unwrap();
        assert_eq!(events.as_raw_fd(), super::events().unwrap().as_raw_fd());
        assert!(take().iter().all(|f| f.owner != before), "made after that fault");

        let after = owner("0000:3c:00.1", 0);
        let (file, area) = file_area(1, after);
        file.set_len(0).unwrap();
        assert_eq!(area.read32(0), Some(u32::MAX));
        assert!(readable(events));
        assert_eq!(take().iter().map(|f| f.owner).collect::<Vec<_>>(), [after]);
        // Other tests count on freed slots: end it.
        subscriber::end_default();
    }

    #[test]
    fn a_revoked_area_reads_all_ones_no_longer_maps_its_file_and_is_no_fault() {
        let _serial = SERIAL.lock();
        // Were the file still mapped, the access after truncating it would be a fault
        // (counted), not a crash.
        install().unwrap();
        let mut subscriber = subscribe().unwrap();
        let bar0 = owner("0000:5e:00.2", 0);
        // Several aliases of the all-ones file, the last one partial.
        let pages = ONES_LEN / PAGE + 2;
        let (file, area) = file_area(pages, bar0);
        let key = area.key().unwrap();
        assert_eq!(area.read32(PAGE), Some(0x5a00_0000 + PAGE as u32));
        assert!(revoke(key));
        assert_eq!(area.read32(PAGE), Some(0xffff_ffff));
        assert_eq!(area.read64(0), Some(u64::MAX));
        assert_eq!(
            area.read32(pages * PAGE - 4),
            Some(0xffff_ffff),
            "the last stride too"
        );
        // The file is no longer mapped: a write stays in the replacement, and truncating
        // the file (which faults a live mapping) changes nothing.
        assert_eq!(area.write32(0, 0x1234_5678), Some(()));
        let mut word = [0u8; 4];
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut word, 0).unwrap();
        assert_eq!(u32::from_ne_bytes(word), 0x5a00_0000);
        let faults = count();
        file.set_len(0).unwrap();
        assert_eq!(area.read32(4), Some(0xffff_ffff));
        assert_eq!(area.read32(ONES_LEN + 4), Some(0xffff_ffff));
        assert_eq!(count(), faults);
        assert!(!area.faulted(), "revoked, not faulted");
        assert!(!readable(subscriber.as_fd()), "no subscriber is woken");
        assert!(
            subscriber.take().iter().all(|f| f.owner != bar0),
            "never reported"
        );
        assert!(revoke(key), "revoking again changes nothing");
        let (index, generation) = (key.index, key.generation);
        drop(area);
        let tag = TABLE.slots[index].tag.load(Ordering::Relaxed);
        assert_eq!(tag_state(tag), FREE, "dropping the area frees its slot");
        assert!(
            revoke(AreaKey { index, generation }),
            "an area unmapped since needs nothing"
        );
    }

    #[test]
    fn revoking_and_dropping_an_area_at_once_is_safe() {
        let _serial = SERIAL.lock();
        for _ in 0..20 {
            let (_file, area) = file_area(4, owner("0000:5e:00.3", 0));
            let key = area.key().unwrap();
            std::thread::scope(|s| {
                s.spawn(|| revoke(key));
                s.spawn(move || drop(area));
            });
            let tag = TABLE.slots[key.index].tag.load(Ordering::Relaxed);
            assert!(
                tag_generation(tag) != key.generation || tag_state(tag) == FREE,
                "the slot is free once both are done"
            );
        }
    }

    #[test]
    fn an_area_is_registered_while_mapped_only() {
        let bar4 = owner("0000:00:1f.0", 4);
        let (_file, area) = file_area(1, bar4);
        let registration = area.registration().unwrap();
        let (index, generation) = (registration.index, registration.generation);
        let tag = TABLE.slots[index].tag.load(Ordering::Relaxed);
        assert_eq!((tag_generation(tag), tag_state(tag)), (generation, LIVE));
        drop(area);
        // The table is the process's: another test may take the freed slot at once (a new
        // generation), which is fine; this area's registration must be gone.
        let tag = TABLE.slots[index].tag.load(Ordering::Relaxed);
        assert!(
            tag_generation(tag) != generation || tag_state(tag) == FREE,
            "dropping the area frees its slot"
        );
    }
}
