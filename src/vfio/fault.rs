//! Surviving surprise removal: an opt-in SIGBUS handler for mapped BARs.
//!
//! When a PCI device is surprise-removed (pulled, its slot powered off, a link down) while
//! this process has a BAR mapped through vfio, the next load or store through the mapping
//! can raise SIGBUS, and SIGBUS kills the process. A driver should instead see what a
//! read of a removed device returns through config space or pread: all ones. After
//! [`install`], the handler replaces a faulting area with anonymous memory filled with
//! `0xff`, the access is retried and completes, and reads of the area return
//! `0xffff_ffff` from then on. The driver sees "device gone" in its registers; the bus
//! learns which device it was from [`take`].
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
//! a private anonymous range, fills it with `0xff` and moves it over the whole area in one
//! `mremap` (so other threads reading the area meanwhile see either the old mapping or
//! all ones, never zeros), marks the area faulted, counts the fault ([`count`]) and writes
//! to an eventfd ([`events`]). It never allocates, locks, logs, or calls driver code:
//! driver callbacks run later, from the bus's event loop, when it sees [`events`] readable
//! and calls [`take`]. `mmap`, `mremap` and `munmap` are not on POSIX's list of
//! async-signal-safe functions, but on Linux (glibc) they are plain system calls with no
//! user-space lock, which is what a handler needs.
//!
//! Writes to a replaced area land in the anonymous memory and are read back, not as all
//! ones: the area is no longer the device. [`MappedBar::faulted`](super::MappedBar::faulted)
//! tells a driver that wants to know. The replacement costs as much memory as the area
//! (the fill touches every page): a few MiB for usual BARs, more for a large one.
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
//! A faulted area keeps its slot until its fault is reported by [`take`], even if the
//! area is dropped first; so faults are never lost, but a process that installs the
//! handler and never calls [`take`] can fill the table with faulted areas.
//!
//! # Revoking
//!
//! The same replacement, done on purpose and not reported as a fault, closes a device's
//! mappings under their owner ([`VfioDevice::revoke`](super::VfioDevice::revoke)): a
//! mapping holds the device file open, and the kernel's removal waits for that file. It
//! needs the table: an area it does not cover cannot be replaced safely (its owner may be
//! unmapping it), so a device with such an area cannot be revoked.
#![allow(unsafe_code)]

use std::io;
use std::num::NonZeroUsize;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::ptr::NonNull;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, AtomicU64, AtomicUsize, Ordering, fence};

use nix::errno::Errno;
use nix::libc;
use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::sys::mman::{MRemapFlags, MapFlags, ProtFlags, mmap_anonymous, mremap, munmap};
use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, raise, sigaction};
use parking_lot::Mutex;

use crate::addr::PciAddress;

/// How many mapped areas the process-wide table covers.
pub const CAPACITY: usize = 256;

/// Which device and BAR a mapped area belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FaultOwner {
    /// The device.
    pub address: PciAddress,
    /// The region (BAR) index.
    pub region: u32,
}

/// A mapped area that was replaced by all-ones memory after a SIGBUS, as [`take`]
/// reports it.
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
    /// The eventfd that [`events`] returns could not be created.
    #[error("eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC) for SIGBUS fault events failed")]
    Eventfd(#[source] io::Error),
    /// `sigaction(SIGBUS)` failed, reading the old action or installing the handler.
    #[error("sigaction(SIGBUS) failed")]
    Sigaction(#[source] io::Error),
}

/// Installs the SIGBUS handler, process-wide; later calls return `Ok` and do nothing.
/// See the [module docs](self) for what it does and when it passes a SIGBUS on.
pub fn install() -> Result<(), FaultError> {
    static LOCK: Mutex<()> = Mutex::new(());
    let _serial = LOCK.lock();
    if EVENTS.get().is_some() {
        return Ok(());
    }
    let efd = EventFd::from_value_and_flags(0, EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)
        .map_err(|e| FaultError::Eventfd(e.into()))?;
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
    EVENT_FD.store(efd.as_fd().as_raw_fd(), Ordering::Release);
    let action = SigAction::new(
        SigHandler::SigAction(on_sigbus),
        SaFlags::SA_SIGINFO | SaFlags::SA_ONSTACK,
        SigSet::empty(),
    );
    // SAFETY: `on_sigbus` is async-signal-safe (atomics and system calls only, no
    // allocation, no lock) and never unwinds; the state it reads (table, old action,
    // eventfd) is static and initialized above.
    let replaced = match unsafe { sigaction(Signal::SIGBUS, &action) } {
        Ok(replaced) => libc::sigaction::from(replaced),
        Err(e) => {
            EVENT_FD.store(-1, Ordering::Release);
            return Err(FaultError::Sigaction(e.into()));
        }
    };
    if let Some(old) = OLD_ACTION.get()
        && (old.sa_sigaction != replaced.sa_sigaction || old.sa_flags != replaced.sa_flags)
    {
        log::warn!(
            "the SIGBUS action changed while the fault handler was being installed; chaining to the older one"
        );
    }
    // Set last: `events()` is `Some` only once the handler is in place.
    let _ = EVENTS.set(efd);
    Ok(())
}

/// The eventfd that becomes readable after a fault, for poll/epoll; `None` before
/// [`install`]. Read the faults with [`take`], which also drains it.
pub fn events() -> Option<BorrowedFd<'static>> {
    EVENTS.get().map(|efd| efd.as_fd())
}

/// The faults not reported yet, each faulted area once, in no particular order. Drains
/// [`events`] first, so a fault recorded while this runs leaves it readable again (at
/// worst a later call returns nothing). Areas dropped since they faulted are reported
/// too, and their table slots freed.
pub fn take() -> Vec<Fault> {
    if let Some(efd) = events() {
        // Non-blocking: EAGAIN when there was nothing to drain.
        let _ = nix::unistd::read(efd, &mut [0u8; 8]);
    }
    let mut out = Vec::new();
    TABLE.take(&mut out);
    out
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
/// a fault, but not reported as one (see [Revoking](self#revoking)). True if the area no
/// longer maps what it mapped: replaced now or earlier (a fault, a revoke), or unmapped
/// by its owner since. False if the replacement failed (the area is as it was). Its owner
/// may drop it meanwhile: unregistering waits for the replacement to end.
pub(crate) fn revoke(key: AreaKey) -> bool {
    TABLE.revoke(key.index, key.generation)
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
/// The eventfd, owned here for [`events`]; set once the handler is installed.
static EVENTS: OnceLock<EventFd> = OnceLock::new();
/// Its number, for the handler (-1: none).
static EVENT_FD: AtomicI32 = AtomicI32::new(-1);
/// The SIGBUS action before [`install`], to chain to.
static OLD_ACTION: OnceLock<libc::sigaction> = OnceLock::new();
static FAULTS: AtomicU64 = AtomicU64::new(0);

// Slot states. A slot's `tag` packs a generation (bumped by each registration) above the
// state, so a compare-exchange on the tag fails if the slot was reused in between.
const FREE: u64 = 0;
/// Being registered: the fields are being written.
const BUSY: u64 = 1;
const LIVE: u64 = 2;
/// The handler is replacing the area.
const FAULTING: u64 = 3;
/// Replaced, not reported yet.
const FAULTED: u64 = 4;
/// Replaced and reported.
const REPORTED: u64 = 5;
/// Replaced, not reported, and the area dropped (unmapped): the handler ignores it,
/// [`take`] reports it and frees the slot.
const ORPHAN: u64 = 6;
/// Replaced by [`revoke`]: not a fault, never reported.
const REVOKED: u64 = 7;
const STATE_BITS: u32 = 3;

fn pack(generation: u64, state: u64) -> u64 {
    (generation << STATE_BITS) | state
}
fn tag_state(tag: u64) -> u64 {
    tag & ((1 << STATE_BITS) - 1)
}
fn tag_generation(tag: u64) -> u64 {
    tag >> STATE_BITS
}

/// A PCI address in one word: domain above bus above devfn.
fn encode(address: PciAddress) -> u64 {
    (u64::from(address.domain()) << 32) | (u64::from(address.bus()) << 16) | u64::from(address.devfn())
}
fn decode(word: u64) -> Option<PciAddress> {
    let devfn = word as u8;
    PciAddress::new((word >> 32) as u32, (word >> 16) as u8, devfn >> 3, devfn & 7)
}

/// One registered area. The fields other than `tag` are written only while the slot is
/// `BUSY` (under a new generation), so a reader that sees the same generation before and
/// after reading them has a consistent copy.
struct Slot {
    tag: AtomicU64,
    start: AtomicUsize,
    len: AtomicUsize,
    address: AtomicU64,
    region: AtomicU32,
    fault_offset: AtomicU64,
}

impl Slot {
    const fn new() -> Slot {
        Slot {
            tag: AtomicU64::new(0),
            start: AtomicUsize::new(0),
            len: AtomicUsize::new(0),
            address: AtomicU64::new(0),
            region: AtomicU32::new(0),
            fault_offset: AtomicU64::new(0),
        }
    }
}

/// A slot whose area contains a faulting address, as the handler found it.
#[derive(Debug, Clone, Copy)]
struct Hit {
    index: usize,
    tag: u64,
    start: usize,
    len: usize,
}

/// The fixed-size, lock-free table of registered areas; generic in its size for tests.
struct Table<const N: usize> {
    slots: [Slot; N],
}

impl<const N: usize> Table<N> {
    const fn new() -> Self {
        Table {
            slots: [const { Slot::new() }; N],
        }
    }

    fn register(&self, start: usize, len: usize, owner: FaultOwner) -> Option<(usize, u64)> {
        for (index, slot) in self.slots.iter().enumerate() {
            let tag = slot.tag.load(Ordering::Relaxed);
            if tag_state(tag) != FREE {
                continue;
            }
            let next = tag_generation(tag).wrapping_add(1) & (u64::MAX >> STATE_BITS);
            if slot
                .tag
                .compare_exchange(tag, pack(next, BUSY), Ordering::Acquire, Ordering::Relaxed)
                .is_err()
            {
                continue;
            }
            // Seqlock writer: a reader that sees any field written below also sees BUSY
            // (or later) when it re-reads the tag.
            fence(Ordering::Release);
            slot.start.store(start, Ordering::Relaxed);
            slot.len.store(len, Ordering::Relaxed);
            slot.address.store(encode(owner.address), Ordering::Relaxed);
            slot.region.store(owner.region, Ordering::Relaxed);
            slot.fault_offset.store(0, Ordering::Relaxed);
            slot.tag.store(pack(next, LIVE), Ordering::Release);
            return Some((index, next));
        }
        None
    }

    fn unregister(&self, index: usize, generation: u64) {
        let Some(slot) = self.slots.get(index) else {
            return;
        };
        loop {
            let tag = slot.tag.load(Ordering::Acquire);
            if tag_generation(tag) != generation {
                return;
            }
            let next = match tag_state(tag) {
                LIVE | REPORTED | REVOKED => FREE,
                // Its fault is not reported yet: keep it for `take`.
                FAULTED => ORPHAN,
                // A handler is replacing this area (that happens only during an access to
                // it, which cannot overlap its drop), or `revoke` is (that can): wait, so
                // that the area is not unmapped, and its range reused, under the
                // replacement.
                FAULTING => {
                    std::hint::spin_loop();
                    continue;
                }
                _ => return,
            };
            if slot
                .tag
                .compare_exchange(tag, pack(generation, next), Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
            {
                return;
            }
        }
    }

    fn faulted(&self, index: usize, generation: u64) -> bool {
        self.slots.get(index).is_some_and(|slot| {
            let tag = slot.tag.load(Ordering::Acquire);
            tag_generation(tag) == generation && matches!(tag_state(tag), FAULTED | REPORTED | ORPHAN)
        })
    }

    /// The mapped (live or replaced) area containing `addr`. Async-signal-safe.
    fn find(&self, addr: usize) -> Option<Hit> {
        for (index, slot) in self.slots.iter().enumerate() {
            // A slot re-registered while we read it is retried; it cannot hold the area
            // being accessed (that area is alive), so a few tries are plenty.
            for _ in 0..4 {
                let tag = slot.tag.load(Ordering::Acquire);
                if !matches!(tag_state(tag), LIVE | FAULTING | FAULTED | REPORTED | REVOKED) {
                    break;
                }
                let start = slot.start.load(Ordering::Relaxed);
                let len = slot.len.load(Ordering::Relaxed);
                // Seqlock reader: the fields were read before the tag is checked again.
                fence(Ordering::Acquire);
                if tag_generation(slot.tag.load(Ordering::Relaxed)) != tag_generation(tag) {
                    continue;
                }
                if addr >= start && addr - start < len {
                    return Some(Hit {
                        index,
                        tag,
                        start,
                        len,
                    });
                }
                break;
            }
        }
        None
    }

    /// Takes a live hit for replacing: false if another thread is at it, or the slot
    /// changed.
    fn claim(&self, hit: Hit) -> bool {
        tag_state(hit.tag) == LIVE
            && self.slots.get(hit.index).is_some_and(|slot| {
                slot.tag
                    .compare_exchange(
                        hit.tag,
                        pack(tag_generation(hit.tag), FAULTING),
                        Ordering::Acquire,
                        Ordering::Relaxed,
                    )
                    .is_ok()
            })
    }

    /// Ends a claim: the area was replaced (`Some(offset of the fault)`) or not.
    fn finish(&self, hit: Hit, replaced: Option<u64>) {
        if let Some(slot) = self.slots.get(hit.index) {
            let next = match replaced {
                Some(offset) => {
                    slot.fault_offset.store(offset, Ordering::Relaxed);
                    FAULTED
                }
                None => LIVE,
            };
            slot.tag
                .store(pack(tag_generation(hit.tag), next), Ordering::Release);
        }
    }

    /// Replaces slot `index`'s area of `generation` for its owner (`fault::revoke`).
    fn revoke(&self, index: usize, generation: u64) -> bool {
        let Some(slot) = self.slots.get(index) else {
            return false;
        };
        loop {
            let tag = slot.tag.load(Ordering::Acquire);
            if tag_generation(tag) != generation {
                // Unregistered, and the slot reused: the area was unmapped.
                return true;
            }
            match tag_state(tag) {
                LIVE => {}
                // The handler is replacing it after a fault: wait for the end.
                FAULTING => {
                    std::hint::spin_loop();
                    continue;
                }
                // Replaced already, or unregistered (unmapped).
                _ => return true,
            }
            // Claimed as the handler claims it: the owner's unregister now waits for the
            // end, and the handler retries an access meanwhile.
            if slot
                .tag
                .compare_exchange(
                    tag,
                    pack(generation, FAULTING),
                    Ordering::Acquire,
                    Ordering::Relaxed,
                )
                .is_err()
            {
                continue;
            }
            // Written before LIVE under this generation, and not since.
            let start = slot.start.load(Ordering::Relaxed);
            let len = slot.len.load(Ordering::Relaxed);
            let replaced = replace(start, len);
            let next = if replaced { REVOKED } else { LIVE };
            slot.tag.store(pack(generation, next), Ordering::Release);
            return replaced;
        }
    }

    fn take(&self, out: &mut Vec<Fault>) {
        for slot in &self.slots {
            // Retried when the slot moves on meanwhile (FAULTED to ORPHAN when its area is
            // dropped); states only move forward, so this ends.
            loop {
                let tag = slot.tag.load(Ordering::Acquire);
                let next = match tag_state(tag) {
                    FAULTED => REPORTED,
                    ORPHAN => FREE,
                    _ => break,
                };
                let address = decode(slot.address.load(Ordering::Relaxed));
                let region = slot.region.load(Ordering::Relaxed);
                let offset_in_area = slot.fault_offset.load(Ordering::Relaxed);
                let area_len = slot.len.load(Ordering::Relaxed) as u64;
                fence(Ordering::Acquire);
                if slot
                    .tag
                    .compare_exchange(
                        tag,
                        pack(tag_generation(tag), next),
                        Ordering::AcqRel,
                        Ordering::Relaxed,
                    )
                    .is_err()
                {
                    continue;
                }
                // Always decodes: the word was encoded from a valid address.
                if let Some(address) = address {
                    out.push(Fault {
                        owner: FaultOwner { address, region },
                        offset_in_area,
                        area_len,
                    });
                }
                break;
            }
        }
    }
}

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
        TABLE.finish(hit, None);
        return false;
    }
    TABLE.finish(hit, Some((addr - hit.start) as u64));
    FAULTS.fetch_add(1, Ordering::Relaxed);
    let fd = EVENT_FD.load(Ordering::Acquire);
    if fd >= 0 {
        let one = 1u64;
        // SAFETY: writes 8 bytes from a live local to the eventfd (it lives for the rest
        // of the process); write(2) is async-signal-safe.
        let _ = unsafe { libc::write(fd, (&raw const one).cast(), size_of::<u64>()) };
    }
    true
}

/// Replaces `[start, start + len)` by private anonymous memory reading all ones, in one
/// step. Async-signal-safe.
fn replace(start: usize, len: usize) -> bool {
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
    // SAFETY: the target is a registered, live area (`find` matched it and `claim` holds
    // it, or `Table::revoke` claimed it by its generation), exactly as it was mapped: its
    // owner unregisters it before unmapping it, which waits while it is claimed. Its
    // owner reaches it only through raw pointers with volatile accesses, so replacing its
    // pages under it invalidates no reference. MREMAP_FIXED replaces the old mapping
    // atomically, and `fresh` does not overlap it.
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
    use super::*;
    use crate::vfio::mmio::MmioArea;
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    use proptest::prelude::*;
    use std::io::Write;

    const PAGE: usize = 4096;

    /// Tests that fault areas or call `take` hold this: `take` is process-wide.
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

        let events = events().unwrap();
        assert!(readable(events));
        assert_eq!(
            take(),
            [Fault {
                owner: bar2,
                offset_in_area: (PAGE + 8) as u64,
                area_len: (2 * PAGE) as u64,
            }]
        );
        assert!(!readable(events));
        assert!(take().is_empty());

        // Writes land in the replacement; nothing faults any more.
        assert_eq!(area.write32(4, 0x1234_5678), Some(()));
        assert_eq!(area.write64(PAGE, 0), Some(()));
        assert!(area.faulted());
        assert_eq!(count(), faults + 1);
        assert!(take().is_empty());
    }

    #[test]
    fn a_fault_of_an_area_dropped_before_take_is_still_reported() {
        let _serial = SERIAL.lock();
        install().unwrap();
        let bar0 = owner("10000:e1:1f.7", 0);
        let (file, area) = file_area(1, bar0);
        file.set_len(0).unwrap();
        assert_eq!(area.read32(12), Some(0xffff_ffff));
        drop(area);
        let faults = take();
        assert_eq!(faults.len(), 1);
        assert_eq!((faults[0].owner, faults[0].offset_in_area), (bar0, 12));
        assert!(take().is_empty());
    }

    #[test]
    fn threads_racing_on_a_vanishing_area_see_its_content_or_all_ones() {
        let _serial = SERIAL.lock();
        install().unwrap();
        let bar0 = owner("0000:65:00.0", 0);
        let (file, area) = file_area(16, bar0);
        let faults = count();
        std::thread::scope(|s| {
            for t in 0..8 {
                let area = &area;
                s.spawn(move || {
                    let mut at = t * 4 * 1031 % (16 * PAGE);
                    loop {
                        let value = area.read32(at).unwrap();
                        if value == 0xffff_ffff {
                            break;
                        }
                        assert_eq!(value, 0x5a00_0000 + at as u32, "never zeros or torn");
                        at = (at + 4 * 1031) % (16 * PAGE);
                    }
                });
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
            file.set_len(0).unwrap();
        });
        assert_eq!(count(), faults + 1, "replaced once");
        let taken = take();
        assert_eq!(taken.len(), 1);
        assert_eq!(taken[0].owner, bar0);
    }

    #[test]
    fn a_revoked_area_reads_all_ones_no_longer_maps_its_file_and_is_no_fault() {
        let _serial = SERIAL.lock();
        // Were the file still mapped, the access after truncating it would be a fault
        // (counted), not a crash.
        install().unwrap();
        let bar0 = owner("0000:5e:00.2", 0);
        let (file, area) = file_area(2, bar0);
        let key = area.key().unwrap();
        assert_eq!(area.read32(PAGE), Some(0x5a00_0000 + PAGE as u32));
        assert!(revoke(key));
        assert_eq!(area.read32(PAGE), Some(0xffff_ffff));
        assert_eq!(area.read64(0), Some(u64::MAX));
        // The file is no longer mapped: a write stays in the replacement, and truncating
        // the file (which faults a live mapping) changes nothing.
        assert_eq!(area.write32(0, 0x1234_5678), Some(()));
        let mut word = [0u8; 4];
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut word, 0).unwrap();
        assert_eq!(u32::from_ne_bytes(word), 0x5a00_0000);
        let faults = count();
        file.set_len(0).unwrap();
        assert_eq!(area.read32(4), Some(0xffff_ffff));
        assert_eq!(count(), faults);
        assert!(!area.faulted(), "revoked, not faulted");
        assert!(take().iter().all(|f| f.owner != bar0), "never reported");
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
        let tag = TABLE.slots[index].tag.load(Ordering::Relaxed);
        assert_eq!(tag_state(tag), FREE, "dropping the area frees its slot");
    }

    #[test]
    fn a_dropped_range_no_longer_matches() {
        let table = Table::<4>::new();
        let bar1 = owner("0000:03:00.0", 1);
        let (index, generation) = table.register(0x10_0000, 0x4000, bar1).unwrap();
        let hit = table.find(0x10_3fff).unwrap();
        assert_eq!((hit.index, hit.start, hit.len), (index, 0x10_0000, 0x4000));
        assert!(table.find(0x10_4000).is_none(), "one past the end");
        assert!(table.find(0x0f_ffff).is_none());
        table.unregister(index, generation);
        assert!(table.find(0x10_0000).is_none());
        assert!(!table.faulted(index, generation));
        // The slot is reused under a new generation; the old registration is stale.
        let (again, next) = table.register(0x20_0000, 0x1000, bar1).unwrap();
        assert_eq!(again, index);
        assert_ne!(next, generation);
        table.unregister(index, generation);
        assert!(
            table.find(0x20_0000).is_some(),
            "a stale unregister changes nothing"
        );
    }

    #[test]
    fn a_full_table_registers_nothing_more() {
        let table = Table::<2>::new();
        let bar0 = owner("0000:03:00.0", 0);
        let first = table.register(0x1000, 0x1000, bar0).unwrap();
        table.register(0x2000, 0x1000, bar0).unwrap();
        assert_eq!(table.register(0x3000, 0x1000, bar0), None);
        assert!(table.find(0x3000).is_none(), "not covered");
        table.unregister(first.0, first.1);
        assert!(table.register(0x3000, 0x1000, bar0).is_some());
    }

    #[test]
    fn a_claimed_slot_reports_once_and_orphans_keep_their_report() {
        let table = Table::<2>::new();
        let bar3 = owner("0000:81:00.0", 3);
        let (index, generation) = table.register(0x4000, 0x2000, bar3).unwrap();
        let hit = table.find(0x5000).unwrap();
        assert!(table.claim(hit));
        assert!(!table.claim(hit), "one thread replaces the area");
        table.finish(hit, Some(0x1000));
        assert!(table.faulted(index, generation));
        assert!(table.find(0x5000).is_some(), "a replaced area is still ours");
        let mut out = Vec::new();
        table.take(&mut out);
        table.take(&mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(
            (out[0].owner, out[0].offset_in_area, out[0].area_len),
            (bar3, 0x1000, 0x2000)
        );

        // Faulted, dropped before `take`: reported, then the slot is free.
        let (index, generation) = table.register(0x8000, 0x1000, bar3).unwrap();
        let hit = table.find(0x8000).unwrap();
        assert!(table.claim(hit));
        table.finish(hit, Some(0));
        table.unregister(index, generation);
        assert!(table.find(0x8000).is_none(), "unmapped: no longer matched");
        let mut out = Vec::new();
        table.take(&mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(tag_state(table.slots[index].tag.load(Ordering::Relaxed)), FREE);
    }

    #[test]
    fn a_failed_replacement_leaves_the_area_live() {
        let table = Table::<1>::new();
        let (index, generation) = table.register(0x4000, 0x1000, owner("0000:01:00.0", 0)).unwrap();
        let hit = table.find(0x4000).unwrap();
        assert!(table.claim(hit));
        table.finish(hit, None);
        assert!(!table.faulted(index, generation));
        assert!(table.claim(table.find(0x4000).unwrap()));
    }

    proptest! {
        #[test]
        fn addresses_round_trip_through_a_word(d: u32, b: u8, s in 0u8..32, f in 0u8..8) {
            let a = PciAddress::new(d, b, s, f).unwrap();
            prop_assert_eq!(decode(encode(a)), Some(a));
        }
    }
}
