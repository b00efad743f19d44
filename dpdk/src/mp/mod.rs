//! DPDK multi-process: what the primary process maps, secondary processes
//! (`--proc-type=secondary`) map too, at the same addresses.
//!
//! PMDs keep pointers into a device's BARs (`mem_resource[i].addr`) in EAL's shared memory
//! (an ethdev's private data), which every process of one EAL instance maps at the same
//! address; a secondary must therefore map each BAR where the primary did. As DPDK 22.11's
//! bus does, the primary records every mapped device in a list in EAL's shared memory (a
//! named tail queue of `rte_mem_config`, elements from `rte_zmalloc`): the device's
//! address, how it is mapped (VFIO or UIO) and each BAR's address, length and mmapped
//! parts ([`plan::SharedData`]). A secondary finds the record of the device it probes and
//! maps the same parts at the same addresses (`MAP_FIXED_NOREPLACE`: an address already in
//! use in the secondary fails the mapping with a log line instead of replacing what is
//! there). The primary places BARs past the end of EAL's memory areas (as 22.11 does),
//! where secondaries, which reserve the same areas, normally have nothing.
//!
//! # Why a list of our own, not 22.11's `VFIO_RESOURCE_LIST` / `UIO_RESOURCE_LIST`
//!
//! * Registering the stock names from a constructor (`EAL_REGISTER_TAILQ`) kills a process
//!   in which Debian's library is loaded too (the `LD_LIBRARY_PATH` route: EAL dlopens the
//!   stock plugin, whose constructor registers the same names, and EAL panics on a name
//!   registered twice).
//! * Sharing the stock list would let a stock secondary map BARs a drop-in primary placed:
//!   22.11's secondary maps with plain `MAP_FIXED` (replacing whatever the secondary has
//!   there) and trusts the record, so any difference in placement or layout corrupts its
//!   memory. A pair of one stock and one drop-in process must fail cleanly instead.
//!
//! So the queue is named [`plan::LIST_NAME`], registered by the primary only when it maps
//! its first device (`rte_eal_tailq_register` after `rte_eal_init`'s tail-queue set-up,
//! which creates it in shared memory and cannot collide with the stock names), and looked
//! up (never registered) by secondaries. Each record starts with a tag and its size
//! ([`plan::MAGIC`]): a record written by another build is refused. The mixed pairs:
//!
//! * stock primary, drop-in secondary: the secondary finds no [`plan::LIST_NAME`] list and
//!   `rte_pci_map_device` returns -1 with a log line saying the primary does not run the
//!   drop-in;
//! * drop-in primary, stock secondary: the secondary's EAL finds no `VFIO_RESOURCE_LIST`
//!   (the drop-in alone never creates it: `rte_eal_init` fails with "Cannot initialize
//!   tailq"), or, when the primary had Debian's library loaded too (`LD_LIBRARY_PATH`), an
//!   empty one (the stock bus logs "cannot find TAILQ entry for PCI device" and the probe
//!   fails). Neither maps anything.
//!
//! Both processes of a pair must also load the same set of libraries (both through the
//! installed drop-in or the plugin-directory namespace, or both by `LD_LIBRARY_PATH`): a
//! secondary in which Debian's library is loaded needs the stock lists its constructor
//! registers to exist in the primary.
//!
//! Secondaries take no claims (the primary holds the device), never reset it, never
//! touch its Command register, and arm no interrupts or request notifier (as 22.11's
//! secondaries: `intr_handle` only gets the device fd); unmapping in a secondary unmaps
//! its own view and leaves the record to the primary.

pub mod plan;

use core::ffi::{c_int, c_void};
use core::ptr;
use std::cell::UnsafeCell;
use std::ffi::CString;
use std::sync::Mutex;

use crate::ffi::eal_mp as eal;
use crate::ffi::types::{
    RTE_TAILQ_NAMESIZE, RteMemsegList, RtePciAddr, RteTailqElem, RteTailqHead, TailqEntry,
};
use crate::log;
use plan::{Kind, Lookup, Record, SharedData};

/// A record in EAL's shared memory: the queue links, then the data.
#[repr(C)]
#[derive(Debug)]
struct Shared {
    next: TailqEntry<Shared>,
    data: SharedData,
}

/// The registration element of the list (EAL keeps a pointer to it for the process's life).
struct Elem(UnsafeCell<RteTailqElem>);

// SAFETY: EAL reads and writes the element only inside rte_eal_tailq_register, which this
// module calls under REGISTER's lock; this module reads `head` under the same lock.
unsafe impl Sync for Elem {}

const fn elem_name() -> [core::ffi::c_char; RTE_TAILQ_NAMESIZE] {
    let src = plan::LIST_NAME.as_bytes();
    let mut out = [0 as core::ffi::c_char; RTE_TAILQ_NAMESIZE];
    let mut i = 0;
    while i < src.len() {
        out[i] = src[i] as core::ffi::c_char;
        i += 1;
    }
    out
}

static ELEM: Elem = Elem(UnsafeCell::new(RteTailqElem {
    head: ptr::null_mut(),
    next: TailqEntry {
        tqe_next: ptr::null_mut(),
        tqe_prev: ptr::null_mut(),
    },
    name: elem_name(),
}));

/// Whether the primary registered the list (`Some(head)`), or failed to (`Some(null)`:
/// logged once, not retried).
static REGISTER: Mutex<Option<usize>> = Mutex::new(None);

/// The next BAR address hint of the primary (0: not computed yet).
static NEXT_HINT: Mutex<u64> = Mutex::new(0);

/// Whether this process is a DPDK secondary process.
pub fn is_secondary() -> bool {
    // SAFETY: no arguments.
    let t = unsafe { eal::rte_eal_process_type() };
    t != crate::ffi::types::measured::RTE_PROC_PRIMARY
}

/// The system page size.
pub fn page_size() -> u64 {
    crate::vfio_pci::sys::page_size()
}

/// The primary's list head, registered on first use; null when EAL could not create it
/// (its table of named queues is full: logged once).
fn primary_head() -> *mut RteTailqHead {
    let mut reg = REGISTER.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(h) = *reg {
        return h as *mut RteTailqHead;
    }
    // SAFETY: the element is a static EAL may keep a pointer to; its name is
    // NUL-terminated; only this function touches it, under REGISTER's lock.
    let head = unsafe {
        if eal::rte_eal_tailq_register(ELEM.0.get()) == 0 {
            (*ELEM.0.get()).head
        } else {
            ptr::null_mut()
        }
    };
    if head.is_null() {
        log::warn(&format!(
            "cannot create the shared list {} (EAL's table of named lists full?): secondary \
             processes will not be able to map this process's devices",
            plan::LIST_NAME
        ));
    }
    *reg = Some(head as usize);
    head
}

/// The primary records `rec` for secondaries; a failure is logged (the mapping stands:
/// only secondaries are affected, and they say so).
pub fn publish(rec: &Record) {
    let name = plan::addr_name(&rec.addr);
    let data = match plan::encode(rec) {
        Ok(d) => d,
        Err(e) => {
            log::warn(&format!("{name}: not recorded for secondary processes: {e}"));
            return;
        }
    };
    let head = primary_head();
    if head.is_null() {
        return;
    }
    // SAFETY: a NUL-terminated type name; rte_zmalloc returns null or zeroed shared memory
    // of the size asked, aligned for any type.
    let p =
        unsafe { eal::rte_zmalloc(c"pcibus_mapped_bars".as_ptr(), size_of::<Shared>(), 0) }.cast::<Shared>();
    if p.is_null() {
        log::warn(&format!(
            "{name}: not recorded for secondary processes: rte_zmalloc of {} bytes failed",
            size_of::<Shared>()
        ));
        return;
    }
    // SAFETY: p is fresh memory of a Shared; head is EAL's live head of our list (its
    // elements are all Shared); the tail-queue write lock keeps other processes' walks
    // out while the links change.
    unsafe {
        p.write(Shared {
            next: TailqEntry {
                tqe_next: ptr::null_mut(),
                tqe_prev: ptr::null_mut(),
            },
            data,
        });
        eal::rte_mcfg_tailq_write_lock();
        let q = &raw mut (*head).tailq_head;
        (*p).next.tqe_prev = (*q).tqh_last.cast::<*mut Shared>();
        *(*q).tqh_last = p.cast::<c_void>();
        (*q).tqh_last = (&raw mut (*p).next.tqe_next).cast::<*mut c_void>();
        eal::rte_mcfg_tailq_write_unlock();
    }
    log::debug(&format!("{name}: mapping recorded for secondary processes"));
}

/// The primary forgets its record of `addr` (before unmapping it), if it has one.
pub fn forget(addr: &RtePciAddr) {
    let head = {
        let reg = REGISTER.lock().unwrap_or_else(|e| e.into_inner());
        match *reg {
            Some(h) if h != 0 => h as *mut RteTailqHead,
            _ => return,
        }
    };
    let mut found: *mut Shared = ptr::null_mut();
    // SAFETY: head is EAL's live head of our list, whose elements are Shared records this
    // process allocated; the write lock keeps other processes' walks out.
    unsafe {
        eal::rte_mcfg_tailq_write_lock();
        let q = &raw mut (*head).tailq_head;
        let mut p = (*q).tqh_first.cast::<Shared>();
        while !p.is_null() {
            if (*p).data.addr == *addr {
                let next = (*p).next.tqe_next;
                if next.is_null() {
                    (*q).tqh_last = (*p).next.tqe_prev.cast::<*mut c_void>();
                } else {
                    (*next).next.tqe_prev = (*p).next.tqe_prev;
                }
                *(*p).next.tqe_prev = next;
                found = p;
                break;
            }
            p = (*p).next.tqe_next;
        }
        eal::rte_mcfg_tailq_write_unlock();
        if !found.is_null() {
            eal::rte_free(found.cast());
        }
    }
}

/// A secondary's look-up of `addr` in the primary's list: copies of the records found.
fn lookup(addr: &RtePciAddr) -> Lookup {
    let Ok(name) = CString::new(plan::LIST_NAME) else {
        return Lookup::NoList;
    };
    // SAFETY: a NUL-terminated name; the result is EAL's shared table slot or null.
    let head = unsafe { eal::rte_eal_tailq_lookup(name.as_ptr()) };
    if head.is_null() {
        return Lookup::NoList;
    }
    let mut found = Vec::new();
    // SAFETY: the slot is named LIST_NAME, which only this library's primaries create, and
    // its elements are Shared records in EAL's shared memory (mapped at the same address
    // here); the read lock keeps the primary's changes out during the walk. Each record's
    // tag and size (the first 12 bytes of every build's record) are read before the rest.
    unsafe {
        eal::rte_mcfg_tailq_read_lock();
        let mut p = (*head).tailq_head.tqh_first.cast::<Shared>();
        let mut guard = 0usize;
        while !p.is_null() && guard < 4096 {
            // The tag and size first: a record of another build may be shorter than ours.
            let data = &raw const (*p).data;
            let (magic, size) = ((*data).magic, (*data).size);
            if magic != plan::MAGIC || size as usize != size_of::<SharedData>() {
                found.push(SharedData {
                    magic,
                    size,
                    ..SharedData::default()
                });
            } else if (*data).addr == *addr {
                found.push(*data);
            }
            p = (*p).next.tqe_next;
            guard += 1;
        }
        eal::rte_mcfg_tailq_read_unlock();
    }
    Lookup::Found(found)
}

/// A secondary's record of the device at `addr`, mapped by the primary as `kind`; `Err`
/// is the reason for the caller's log line.
pub fn find(addr: &RtePciAddr, kind: Kind) -> Result<Record, String> {
    plan::choose(&lookup(addr), addr, kind, page_size())
}

unsafe extern "C" fn max_end_cb(msl: *const RteMemsegList, arg: *mut c_void) -> c_int {
    crate::guard::ffi("memseg list walk", -1, || {
        // SAFETY: EAL passes a live memseg list; arg is the Vec `hint` passes.
        unsafe {
            let areas = &mut *arg.cast::<Vec<(u64, u64)>>();
            areas.push(((*msl).base_va as u64, (*msl).len as u64));
        }
        0
    })
}

/// The primary's address hint for a BAR of `len` bytes: the next page past EAL's memory
/// areas not yet handed out; `None` (the kernel chooses) when EAL has no areas.
pub fn hint(len: u64) -> Option<u64> {
    let mut next = NEXT_HINT.lock().unwrap_or_else(|e| e.into_inner());
    if *next == 0 {
        let mut areas: Vec<(u64, u64)> = Vec::new();
        // SAFETY: the callback only pushes to the Vec passed as its argument, which lives
        // across the call.
        unsafe { eal::rte_memseg_list_walk(max_end_cb, (&raw mut areas).cast()) };
        *next = plan::max_end(areas)?;
    }
    let (at, after) = plan::place(*next, len, page_size())?;
    *next = after;
    Some(at)
}
