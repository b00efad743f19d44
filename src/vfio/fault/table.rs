//! The fixed-size, lock-free table of registered BAR areas that the SIGBUS handler
//! searches: atomics only, so the handler may read and change it.
//!
//! A faulted area's slot also holds which subscribers ([`super::Subscriber`]) have not
//! taken its fault yet: a bit per subscriber slot, set by the handler to the subscribers
//! live at the fault, cleared by each one's take (or its unsubscribing). The slot is
//! freed when its area is dropped and no bit is left.
//!
//! Orderings: the handler's claim of a slot, its read of the live subscribers, an
//! unsubscribing's clear of its live bit and its sweep of the slots are `SeqCst`, so a
//! sweep that does not wait for a claimed slot (`FAULTING`) cannot miss a bit the handler
//! sets; the last clear of a slot's bits and the drop of its area are `SeqCst` too, so
//! one of the two always sees the other and frees the slot.
//!
//! A revoked area ([`Table::revoke`]) is replaced as a faulted one is, but holds no
//! subscriber bit: it is no fault, and its slot is freed with its area, as a live one's.

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
/// Replaced; `unreported` says which subscribers have not taken the fault.
pub(super) const FAULTED: u64 = 4;
/// Replaced, and the area dropped (unmapped) before every subscriber took the fault: the
/// handler ignores it; the last take frees the slot.
pub(super) const ORPHAN: u64 = 6;
/// Replaced by [`Table::revoke`]: not a fault, never reported to any subscriber.
pub(super) const REVOKED: u64 = 7;
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

/// One registered area. The fields other than `tag` and `unreported` are written only
/// while the slot is `BUSY` (under a new generation), or, for `fault_offset`, `FAULTING`;
/// so a reader that sees the same generation, `FAULTED` or `ORPHAN`, before and after
/// reading them has a consistent copy.
pub(super) struct Slot {
    pub(super) tag: AtomicU64,
    pub(super) start: AtomicUsize,
    pub(super) len: AtomicUsize,
    address: AtomicU64,
    region: AtomicU32,
    fault_offset: AtomicU64,
    /// Bit `i`: subscriber slot `i` has not taken this fault. Zero unless faulted.
    pub(super) unreported: AtomicU32,
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
            unreported: AtomicU32::new(0),
        }
    }

    /// Frees the slot if it is generation `generation`'s orphan and every subscriber
    /// took its fault.
    fn free_if_done(&self, generation: u64) {
        if self.unreported.load(Ordering::SeqCst) == 0 {
            let _ = self.tag.compare_exchange(
                pack(generation, ORPHAN),
                pack(generation, FREE),
                Ordering::SeqCst,
                Ordering::Relaxed,
            );
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
            slot.unreported.store(0, Ordering::Relaxed);
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
            let tag = slot.tag.load(Ordering::SeqCst);
            if tag_generation(tag) != generation {
                return;
            }
            let next = match tag_state(tag) {
                // A revoked area holds no subscriber bit: nobody is owed a report.
                LIVE | REVOKED => FREE,
                // Kept for the subscribers that have not taken its fault.
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
                .compare_exchange(tag, pack(generation, next), Ordering::SeqCst, Ordering::Relaxed)
                .is_ok()
            {
                if next == ORPHAN {
                    // Every subscriber may have taken it already.
                    slot.free_if_done(generation);
                }
                return;
            }
        }
    }

    pub(super) fn faulted(&self, index: usize, generation: u64) -> bool {
        self.slots.get(index).is_some_and(|slot| {
            let tag = slot.tag.load(Ordering::Acquire);
            tag_generation(tag) == generation && matches!(tag_state(tag), FAULTED | ORPHAN)
        })
    }

    /// The mapped (live, or replaced after a fault or a revoke) area containing `addr`.
    /// Async-signal-safe.
    pub(super) fn find(&self, addr: usize) -> Option<Hit> {
        for (index, slot) in self.slots.iter().enumerate() {
            // A slot re-registered while we read it is retried; it cannot hold the area
            // being accessed (that area is alive), so a few tries are plenty.
            for _ in 0..4 {
                let tag = slot.tag.load(Ordering::Acquire);
                if !matches!(tag_state(tag), LIVE | FAULTING | FAULTED | REVOKED) {
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

    /// Takes a live hit for replacing: false if another thread is at it, it was replaced
    /// already (faulted or revoked), or the slot changed.
    pub(super) fn claim(&self, hit: Hit) -> bool {
        tag_state(hit.tag) == LIVE
            && self.slots.get(hit.index).is_some_and(|slot| {
                slot.tag
                    .compare_exchange(
                        hit.tag,
                        pack(tag_generation(hit.tag), FAULTING),
                        Ordering::SeqCst,
                        Ordering::Relaxed,
                    )
                    .is_ok()
            })
    }

    /// Ends a claim: the area was replaced (`Some(offset of the fault)`), to be reported
    /// to the subscribers in `subscribers` (read after the claim), or it was not.
    pub(super) fn finish(&self, hit: Hit, replaced: Option<u64>, subscribers: u32) {
        if let Some(slot) = self.slots.get(hit.index) {
            let next = match replaced {
                Some(offset) => {
                    slot.fault_offset.store(offset, Ordering::Relaxed);
                    slot.unreported.store(subscribers, Ordering::Relaxed);
                    FAULTED
                }
                None => LIVE,
            };
            slot.tag
                .store(pack(tag_generation(hit.tag), next), Ordering::SeqCst);
        }
    }

    /// Replaces slot `index`'s area of `generation` with `replace(start, len)` for its
    /// owner's device (`fault::revoke`), and marks it [`REVOKED`]: never reported, freed
    /// with its area. True if the area no longer maps what it mapped: replaced now or
    /// earlier (a fault, a revoke), or unregistered since (unmapped). False if `replace`
    /// failed (the area stays live).
    pub(super) fn revoke(
        &self,
        index: usize,
        generation: u64,
        replace: impl FnOnce(usize, usize) -> bool,
    ) -> bool {
        let Some(slot) = self.slots.get(index) else {
            return false;
        };
        loop {
            let tag = slot.tag.load(Ordering::SeqCst);
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
                // Replaced already (faulted, orphaned, revoked), or unregistered.
                _ => return true,
            }
            // Claimed as the handler claims it: the owner's unregister now waits for the
            // end, a fault in the area is retried meanwhile, and a subscriber going away
            // waits too (no bit is set here, so it need not, but it cannot tell).
            if slot
                .tag
                .compare_exchange(
                    tag,
                    pack(generation, FAULTING),
                    Ordering::SeqCst,
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
            slot.tag.store(pack(generation, next), Ordering::SeqCst);
            return replaced;
        }
    }

    /// Appends the faults subscriber `bit` has not taken, and marks them taken by it.
    /// One subscriber's calls (and its [`forget`](Self::forget)) must not overlap.
    pub(super) fn take(&self, bit: u32, out: &mut Vec<Fault>) {
        for slot in &self.slots {
            // Retried when the slot moves on meanwhile (FAULTED to ORPHAN when its area is
            // dropped, or freed and faulted again); states only move forward, so this ends.
            loop {
                let tag = slot.tag.load(Ordering::SeqCst);
                if !matches!(tag_state(tag), FAULTED | ORPHAN)
                    || slot.unreported.load(Ordering::SeqCst) & bit == 0
                {
                    break;
                }
                let address = decode(slot.address.load(Ordering::Relaxed));
                let region = slot.region.load(Ordering::Relaxed);
                let offset_in_area = slot.fault_offset.load(Ordering::Relaxed);
                let area_len = slot.len.load(Ordering::Relaxed) as u64;
                fence(Ordering::Acquire);
                let again = slot.tag.load(Ordering::SeqCst);
                if tag_generation(again) != tag_generation(tag)
                    || !matches!(tag_state(again), FAULTED | ORPHAN)
                {
                    continue;
                }
                // The bit was set in this generation and only this subscriber clears it, so
                // the slot was held for it all along: the fields above are this fault's.
                let before = slot.unreported.fetch_and(!bit, Ordering::SeqCst);
                // Always decodes: the word was encoded from a valid address.
                if let Some(address) = address
                    && before & bit != 0
                {
                    out.push(Fault {
                        owner: FaultOwner { address, region },
                        offset_in_area,
                        area_len,
                    });
                }
                if before == bit {
                    slot.free_if_done(tag_generation(tag));
                }
                break;
            }
        }
    }

    /// Clears subscriber `bit` from every fault, as if it had taken them all, freeing the
    /// slots of dropped areas it was the last to hold. Call once the subscriber's bit is
    /// cleared from the live subscribers (`SeqCst`), so no later fault sets it: a fault
    /// being recorded now (`FAULTING`) is waited for.
    pub(super) fn forget(&self, bit: u32) {
        for slot in &self.slots {
            loop {
                let tag = slot.tag.load(Ordering::SeqCst);
                match tag_state(tag) {
                    FAULTING => std::hint::spin_loop(),
                    FAULTED | ORPHAN => {
                        let before = slot.unreported.fetch_and(!bit, Ordering::SeqCst);
                        if before == bit {
                            slot.free_if_done(tag_generation(tag));
                        }
                        break;
                    }
                    _ => break,
                }
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

    const A: u32 = 1 << 0;
    const B: u32 = 1 << 3;

    /// Registers an area and records a fault in it at `offset`, reported to
    /// `subscribers`; returns its (index, generation).
    fn faulted(table: &Table<2>, start: usize, offset: u64, subscribers: u32) -> (usize, u64) {
        let registered = table.register(start, 0x2000, owner("0000:81:00.0", 3)).unwrap();
        let hit = table.find(start + offset as usize).unwrap();
        assert!(table.claim(hit));
        assert!(!table.claim(hit), "one thread replaces the area");
        table.finish(hit, Some(offset), subscribers);
        registered
    }

    fn taken(table: &Table<2>, bit: u32) -> Vec<Fault> {
        let mut out = Vec::new();
        table.take(bit, &mut out);
        out
    }

    fn state<const N: usize>(table: &Table<N>, index: usize) -> u64 {
        tag_state(table.slots[index].tag.load(Ordering::Relaxed))
    }

    #[test]
    fn a_fault_is_reported_once_to_each_subscriber_live_at_it() {
        let table = Table::<2>::new();
        let (index, generation) = faulted(&table, 0x4000, 0x1000, A | B);
        assert!(table.faulted(index, generation));
        assert!(table.find(0x5000).is_some(), "a replaced area is still ours");
        let first = taken(&table, A);
        assert_eq!(
            first
                .iter()
                .map(|f| (f.owner, f.offset_in_area, f.area_len))
                .collect::<Vec<_>>(),
            [(owner("0000:81:00.0", 3), 0x1000, 0x2000)]
        );
        assert!(taken(&table, A).is_empty(), "once for A");
        assert_eq!(taken(&table, B), first, "B sees it although A took it");
        assert!(taken(&table, B).is_empty());
        assert!(taken(&table, 1 << 5).is_empty(), "not subscribed at the fault");
        assert_eq!(state(&table, index), FAULTED, "the area is still mapped");
        table.unregister(index, generation);
        assert_eq!(state(&table, index), FREE, "taken by all, then dropped: freed");
    }

    #[test]
    fn a_subscriber_that_never_takes_holds_the_slot_not_the_others_reports() {
        let table = Table::<2>::new();
        let (index, generation) = faulted(&table, 0x4000, 0, A | B);
        table.unregister(index, generation);
        assert!(table.find(0x4000).is_none(), "unmapped: no longer matched");
        assert_eq!(taken(&table, A).len(), 1, "dropped before taken: still reported");
        assert_eq!(state(&table, index), ORPHAN, "B has not taken it");
        // A second fault while B still sits on the first.
        let (other, generation) = faulted(&table, 0x8000, 0, A | B);
        assert_eq!(taken(&table, A).len(), 1);
        table.unregister(other, generation);
        assert_eq!(state(&table, other), ORPHAN);
        assert!(
            table.register(0xc000, 0x1000, owner("0000:01:00.0", 0)).is_none(),
            "full"
        );
        // B takes them at last: both slots are freed.
        assert_eq!(taken(&table, B).len(), 2);
        assert_eq!((state(&table, index), state(&table, other)), (FREE, FREE));
    }

    #[test]
    fn a_subscriber_going_away_counts_as_taking() {
        let table = Table::<2>::new();
        let (index, generation) = faulted(&table, 0x4000, 0, A | B);
        table.unregister(index, generation);
        assert_eq!(taken(&table, A).len(), 1);
        table.forget(B);
        assert_eq!(state(&table, index), FREE);
        // And before the area is dropped: the drop frees it.
        let (index, generation) = faulted(&table, 0x4000, 0, A | B);
        table.forget(A);
        table.forget(B);
        assert_eq!(state(&table, index), FAULTED);
        table.unregister(index, generation);
        assert_eq!(state(&table, index), FREE);
    }

    #[test]
    fn a_fault_with_no_subscriber_frees_its_slot_with_its_area() {
        let table = Table::<2>::new();
        let (index, generation) = faulted(&table, 0x4000, 0, 0);
        assert!(table.faulted(index, generation));
        assert!(taken(&table, A).is_empty());
        table.unregister(index, generation);
        assert_eq!(state(&table, index), FREE);
    }

    #[test]
    fn a_failed_replacement_leaves_the_area_live() {
        let table = Table::<1>::new();
        let (index, generation) = table.register(0x4000, 0x1000, owner("0000:01:00.0", 0)).unwrap();
        let hit = table.find(0x4000).unwrap();
        assert!(table.claim(hit));
        table.finish(hit, None, A);
        assert!(!table.faulted(index, generation));
        let mut out = Vec::new();
        table.take(A, &mut out);
        assert!(out.is_empty());
        assert!(table.claim(table.find(0x4000).unwrap()));
    }

    #[test]
    fn a_revoked_area_is_matched_never_reported_and_freed_with_its_area() {
        let table = Table::<2>::new();
        let (index, generation) = table.register(0x4000, 0x2000, owner("0000:81:00.1", 0)).unwrap();
        let mut replaced = None;
        assert!(table.revoke(index, generation, |start, len| {
            replaced = Some((start, len));
            true
        }));
        assert_eq!(replaced, Some((0x4000, 0x2000)), "the whole area");
        assert_eq!(state(&table, index), REVOKED);
        // An access in it is the handler's, as in a replaced area: matched, not claimed
        // (retried), not a fault.
        let hit = table.find(0x5fff).expect("a revoked area is still ours");
        assert!(!table.claim(hit));
        assert!(!table.faulted(index, generation));
        assert!(taken(&table, A | B).is_empty());
        table.forget(A);
        assert_eq!(state(&table, index), REVOKED);
        assert!(
            table.revoke(index, generation, |_, _| unreachable!("replaced already")),
            "revoking again changes nothing"
        );
        table.unregister(index, generation);
        assert_eq!(state(&table, index), FREE, "dropping the area frees its slot");
        assert!(table.find(0x4000).is_none());
        assert!(
            table.revoke(index, generation, |_, _| unreachable!("unmapped")),
            "an area unmapped since needs nothing"
        );
    }

    #[test]
    fn revoking_a_faulted_area_leaves_its_fault_to_the_subscribers() {
        let table = Table::<2>::new();
        let (index, generation) = faulted(&table, 0x4000, 0x10, A);
        assert!(table.revoke(index, generation, |_, _| unreachable!("replaced already")));
        assert_eq!(state(&table, index), FAULTED);
        assert_eq!(taken(&table, A).len(), 1);
    }

    #[test]
    fn a_failed_revoke_leaves_the_area_live() {
        let table = Table::<1>::new();
        let (index, generation) = table.register(0x4000, 0x1000, owner("0000:01:00.0", 0)).unwrap();
        assert!(!table.revoke(index, generation, |_, _| false));
        assert_eq!(state(&table, index), LIVE);
        assert!(
            table.claim(table.find(0x4000).unwrap()),
            "a fault may still replace it"
        );
    }

    proptest! {
        #[test]
        fn addresses_round_trip_through_a_word(d: u32, b: u8, s in 0u8..32, f in 0u8..8) {
            let a = PciAddress::new(d, b, s, f).unwrap();
            prop_assert_eq!(decode(encode(a)), Some(a));
        }
    }
}
