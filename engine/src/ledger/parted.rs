//! A hash map split into many small tables, so that growing it never stops the shard for long
//! and never needs room for the whole map twice.
//!
//! A hash table grows by doubling: one insert moves every entry, and for a moment the old and
//! the new slots are both allocated. The table of final transfers only grows (millions an
//! hour), and at 7M entries one doubling held a shard for ~0.9 s; the accounts table of a shard
//! holding 5M accounts doubled from 256 to 512 MB, 768 MB for a moment. Split into [`PARTS`]
//! tables chosen by the key's hash, each doubles on its own, moving a 256th of the entries.
//!
//! The parts grow by half at a time, at *staggered* sizes (part `i` starts `i/512` of the way
//! into a step): with equal sizes every part of a uniformly hashed map would grow within the
//! same few inserts, and the whole map would swing between three quarters full and a half (a
//! quarter of the memory idle, then none; with doubling, three eighths). Staggered, it stays
//! ~62 % full at any size. Growing by half moves each entry twice on average, not once: a
//! part's move is small and on the shard's thread, and the memory is worth more.

use super::Done;
use super::table::{Entry, Table, fold, seed};
use crate::ids::TransferId;

const PART_BITS: u32 = 8;
pub const PARTS: usize = 1 << PART_BITS;

/// A final transfer's entry: the id's halves and its [`Done`] bits. An id of zero (never a
/// transfer's) marks a free slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DoneSlot {
    low: u64,
    high: u64,
    bits: u64,
}

impl Entry for DoneSlot {
    type Key = TransferId;
    const FREE: DoneSlot = DoneSlot { low: 0, high: 0, bits: 0 };
    fn key(&self) -> TransferId {
        TransferId(crate::ids::from_halves([self.low, self.high]))
    }
    fn is_free_key(key: TransferId) -> bool {
        key.0 == 0
    }
    /// Mixes both halves of an id.
    fn hash(id: TransferId, [a, b]: [u64; 2]) -> u64 {
        let [low, high] = crate::ids::halves(id.0);
        fold(fold(low ^ a, 0x9E37_79B9_7F4A_7C15) ^ high, b)
    }
}

/// A map of [`PARTS`] tables: the top [`PART_BITS`] of a key's hash choose the table, the bits
/// below them the slot within it.
pub(crate) struct Parted<E> {
    parts: Box<[Table<E>]>,
    /// The process's [`seed`], which the parts' tables hash with too.
    seed: [u64; 2],
}

impl<E: Entry> std::fmt::Debug for Parted<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Parted").field("len", &self.len()).finish_non_exhaustive()
    }
}

impl<E: Entry> Default for Parted<E> {
    fn default() -> Self {
        // Part i's sizes lie a fraction i/256 of the way into a step.
        Parted { parts: (0..PARTS).map(|i| Table::in_part(PART_BITS, i)).collect(), seed: seed() }
    }
}

impl<E: Entry> Parted<E> {
    /// Which part holds `key`.
    fn part(&self, key: E::Key) -> usize {
        usize::try_from(E::hash(key, self.seed) >> (64 - PART_BITS)).unwrap_or(0)
    }

    pub fn get(&self, key: E::Key) -> Option<&E> {
        self.parts[self.part(key)].get(key)
    }

    pub fn get_mut(&mut self, key: E::Key) -> Option<&mut E> {
        let part = self.part(key);
        self.parts[part].get_mut(key)
    }

    pub fn contains_key(&self, key: E::Key) -> bool {
        self.get(key).is_some()
    }

    /// Inserts `entry`, returning the entry it replaced (same key).
    pub fn insert(&mut self, entry: E) -> Option<E> {
        let part = self.part(entry.key());
        self.parts[part].insert(entry)
    }

    pub fn remove(&mut self, key: E::Key) -> Option<E> {
        let part = self.part(key);
        self.parts[part].remove(key)
    }

    /// Two distinct entries at once. For equal keys the second is `None`.
    pub fn get_disjoint_mut(&mut self, [a, b]: [E::Key; 2]) -> [Option<&mut E>; 2] {
        let (part_a, part_b) = (self.part(a), self.part(b));
        if part_a == part_b {
            return self.parts[part_a].get_disjoint_mut([a, b]);
        }
        match self.parts.get_disjoint_mut([part_a, part_b]) {
            Ok([table_a, table_b]) => [table_a.get_mut(a), table_b.get_mut(b)],
            Err(_) => [None, None],
        }
    }

    /// Starts fetching the line where `key`'s entry is (or would go): see [`Table::prefetch`].
    pub fn prefetch(&self, key: E::Key) {
        self.parts[self.part(key)].prefetch(key);
    }

    pub fn len(&self) -> usize {
        self.parts.iter().map(|table| table.len()).sum()
    }

    /// Room for `additional` more entries, spread over the parts.
    pub fn reserve(&mut self, additional: usize) {
        let each = additional.div_ceil(PARTS);
        for table in self.parts.iter_mut() {
            table.reserve(each);
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = &E> {
        self.parts.iter().flat_map(|table| table.iter())
    }

    /// Slots allocated over all parts (free or not): what the map costs in memory.
    #[cfg(test)]
    pub fn capacity(&self) -> usize {
        self.parts.iter().map(|table| table.capacity()).sum()
    }
}

impl Parted<DoneSlot> {
    pub fn get_done(&self, id: &TransferId) -> Option<Done> {
        self.get(*id).map(|slot| Done(slot.bits))
    }

    pub fn insert_done(&mut self, id: TransferId, done: Done) -> Option<Done> {
        let [low, high] = crate::ids::halves(id.0);
        self.insert(DoneSlot { low, high, bits: done.0 }).map(|old| Done(old.bits))
    }

    pub fn remove_done(&mut self, id: &TransferId) -> Option<Done> {
        self.remove(*id).map(|old| Done(old.bits))
    }

    #[cfg(test)]
    pub fn iter_done(&self) -> impl Iterator<Item = (TransferId, Done)> {
        self.iter().map(|slot| (slot.key(), Done(slot.bits)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn behaves_as_one_map() {
        let mut parted: Parted<DoneSlot> = Parted::default();
        let mut model = std::collections::HashMap::new();
        let done = |n: usize| Done(n as u64 * 8 + 1);
        // Ids in a run, ids differing only in their high half, and scattered ones.
        let ids: Vec<u128> = (1..2_000_u128)
            .chain((1..500_u128).map(|n| n << 64))
            .chain((1..500_u128).map(|n| n.wrapping_mul(0x0123_4567_89ab_cdef_0fed_cba9_8765_4321)))
            .collect();
        for (n, id) in ids.iter().enumerate() {
            assert_eq!(parted.insert_done(TransferId(*id), done(n)), model.insert(*id, done(n)));
        }
        for id in ids.iter().step_by(3) {
            assert_eq!(parted.remove_done(&TransferId(*id)), model.remove(id));
        }
        assert_eq!(parted.len(), model.len());
        for id in &ids {
            assert_eq!(parted.get_done(&TransferId(*id)), model.get(id).copied());
        }
        let mut listed: Vec<_> = parted.iter_done().map(|(id, n)| (id.0, n.0)).collect();
        let mut expected: Vec<_> = model.iter().map(|(id, n)| (*id, n.0)).collect();
        listed.sort_unstable();
        expected.sort_unstable();
        assert_eq!(listed, expected);
    }

    #[test]
    fn sequential_ids_spread_over_the_parts() {
        let mut counts = vec![0_usize; PARTS];
        let parted: Parted<DoneSlot> = Parted::default();
        for id in 0..(PARTS as u128 * 64) {
            counts[parted.part(TransferId(id))] += 1;
        }
        // Each part gets 64 on average (a standard deviation of 8 for a good mix, whatever the
        // process's seed); none is starved or flooded.
        assert!(counts.iter().all(|&n| (16..=144).contains(&n)), "{counts:?}");
    }

    /// Staggered sizes keep the whole map over ~60 % full at every size, where parts growing
    /// together would leave it half full just after (three eighths, doubling).
    #[test]
    fn staggered_parts_keep_the_map_over_half_full() {
        let mut parted: Parted<DoneSlot> = Parted::default();
        let mut lowest = 1.0_f64;
        for n in 1..=400_000_u64 {
            parted.insert_done(TransferId(u128::from(n) * 0x9E37_79B9_7F4A_7C15_1234), Done(8));
            if n % 1_000 == 0 && n >= 20_000 {
                // A ratio for the test's own check; no money is involved.
                let load = parted.len() as f64 / parted.capacity() as f64;
                lowest = lowest.min(load);
            }
        }
        assert_eq!(parted.len(), 400_000);
        assert!(lowest > 0.58, "the map fell to {lowest:.3} full");
    }
}
