//! The fixed-size, lock-free table of registered BAR areas that the SIGBUS handler
//! searches: atomics only, so the handler may read and change it.

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering, fence};

use super::{Fault, FaultOwner};
use crate::addr::PciAddress;

// Slot states. A slot's `tag` packs a generation (bumped by each registration) above the
// state, so a compare-exchange on the tag fails if the slot was reused in between.
pub(super) const FREE: u64 = 0;
/// Being registered: the fields are being written.
pub(super) const BUSY: u64 = 1;
pub(super) const LIVE: u64 = 2;
/// The handler is replacing the area.
pub(super) const FAULTING: u64 = 3;
/// Replaced, not reported yet.
pub(super) const FAULTED: u64 = 4;
/// Replaced and reported.
pub(super) const REPORTED: u64 = 5;
/// Replaced, not reported, and the area dropped (unmapped): the handler ignores it,
/// [`take`] reports it and frees the slot.
pub(super) const ORPHAN: u64 = 6;
pub(super) const STATE_BITS: u32 = 3;

pub(super) fn pack(generation: u64, state: u64) -> u64 {
    (generation << STATE_BITS) | state
}
pub(super) fn tag_state(tag: u64) -> u64 {
    tag & ((1 << STATE_BITS) - 1)
}
pub(super) fn tag_generation(tag: u64) -> u64 {
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
pub(super) struct Slot {
    pub(super) tag: AtomicU64,
    pub(super) start: AtomicUsize,
    pub(super) len: AtomicUsize,
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
pub(super) struct Hit {
    pub(super) index: usize,
    pub(super) tag: u64,
    pub(super) start: usize,
    pub(super) len: usize,
}

/// The fixed-size, lock-free table of registered areas; generic in its size for tests.
pub(super) struct Table<const N: usize> {
    pub(super) slots: [Slot; N],
}

impl<const N: usize> Table<N> {
    pub(super) const fn new() -> Self {
        Table {
            slots: [const { Slot::new() }; N],
        }
    }

    pub(super) fn register(&self, start: usize, len: usize, owner: FaultOwner) -> Option<(usize, u64)> {
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

    pub(super) fn unregister(&self, index: usize, generation: u64) {
        let Some(slot) = self.slots.get(index) else {
            return;
        };
        loop {
            let tag = slot.tag.load(Ordering::Acquire);
            if tag_generation(tag) != generation {
                return;
            }
            let next = match tag_state(tag) {
                LIVE | REPORTED => FREE,
                // Its fault is not reported yet: keep it for `take`.
                FAULTED => ORPHAN,
                // A handler is replacing this area. That happens only during an access to
                // it, which cannot overlap its drop; wait for it anyway rather than free a
                // slot a handler is writing.
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

    pub(super) fn faulted(&self, index: usize, generation: u64) -> bool {
        self.slots.get(index).is_some_and(|slot| {
            let tag = slot.tag.load(Ordering::Acquire);
            tag_generation(tag) == generation && matches!(tag_state(tag), FAULTED | REPORTED | ORPHAN)
        })
    }

    /// The mapped (live or replaced) area containing `addr`. Async-signal-safe.
    pub(super) fn find(&self, addr: usize) -> Option<Hit> {
        for (index, slot) in self.slots.iter().enumerate() {
            // A slot re-registered while we read it is retried; it cannot hold the area
            // being accessed (that area is alive), so a few tries are plenty.
            for _ in 0..4 {
                let tag = slot.tag.load(Ordering::Acquire);
                if !matches!(tag_state(tag), LIVE | FAULTING | FAULTED | REPORTED) {
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
    pub(super) fn claim(&self, hit: Hit) -> bool {
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
    pub(super) fn finish(&self, hit: Hit, replaced: Option<u64>) {
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

    pub(super) fn take(&self, out: &mut Vec<Fault>) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn owner(address: &str, region: u32) -> FaultOwner {
        FaultOwner {
            address: address.parse().unwrap(),
            region,
        }
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
