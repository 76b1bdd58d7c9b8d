//! A hash map from transfer id split into many small maps, so that growing it never stops the
//! shard for long.
//!
//! A hash map grows by doubling: one insert moves every entry. The table of final transfers
//! only grows (millions an hour), and at 7M entries one doubling held a shard for ~0.9 s. Split
//! into [`PARTS`] maps chosen by the id, each doubles on its own, moving a 256th of the
//! entries; the memory a doubling needs on top of the table shrinks the same way.

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

/// Mixes both halves of an id. The top [`PART_BITS`] choose the part; the bits below them, the
/// slot within it.
fn mix(id: TransferId, [a, b]: [u64; 2]) -> u64 {
    let [low, high] = crate::ids::halves(id.0);
    fold(fold(low ^ a, 0x9E37_79B9_7F4A_7C15) ^ high, b)
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
    fn hash(key: TransferId, seed: [u64; 2]) -> u64 {
        mix(key, seed) << PART_BITS
    }
}

pub struct Parted {
    parts: Box<[Table<DoneSlot>]>,
    /// The process's [`seed`], which the parts' tables hash with too.
    seed: [u64; 2],
}

/// Which part holds `id`.
fn part(id: TransferId, seed: [u64; 2]) -> usize {
    usize::try_from(mix(id, seed) >> (64 - PART_BITS)).unwrap_or(0)
}

impl std::fmt::Debug for Parted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Parted").field("len", &self.len()).finish_non_exhaustive()
    }
}

impl Default for Parted {
    fn default() -> Self {
        Parted { parts: (0..PARTS).map(|_| Table::default()).collect(), seed: seed() }
    }
}

impl Parted {
    pub fn get(&self, id: &TransferId) -> Option<Done> {
        self.parts[part(*id, self.seed)].get(*id).map(|slot| Done(slot.bits))
    }

    pub fn insert(&mut self, id: TransferId, done: Done) -> Option<Done> {
        let [low, high] = crate::ids::halves(id.0);
        let slot = DoneSlot { low, high, bits: done.0 };
        self.parts[part(id, self.seed)].insert(slot).map(|old| Done(old.bits))
    }

    pub fn remove(&mut self, id: &TransferId) -> Option<Done> {
        self.parts[part(*id, self.seed)].remove(*id).map(|old| Done(old.bits))
    }

    /// Starts fetching the line where `id`'s entry is (or would go): see [`Table::prefetch`].
    pub fn prefetch(&self, id: TransferId) {
        self.parts[part(id, self.seed)].prefetch(id);
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

    #[cfg(test)]
    pub fn iter(&self) -> impl Iterator<Item = (TransferId, Done)> {
        self.parts.iter().flat_map(|table| table.iter()).map(|slot| (slot.key(), Done(slot.bits)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn behaves_as_one_map() {
        let mut parted = Parted::default();
        let mut model = std::collections::HashMap::new();
        let done = |n: usize| Done(n as u64 * 8 + 1);
        // Ids in a run, ids differing only in their high half, and scattered ones.
        let ids: Vec<u128> = (1..2_000_u128)
            .chain((1..500_u128).map(|n| n << 64))
            .chain((1..500_u128).map(|n| n.wrapping_mul(0x0123_4567_89ab_cdef_0fed_cba9_8765_4321)))
            .collect();
        for (n, id) in ids.iter().enumerate() {
            assert_eq!(parted.insert(TransferId(*id), done(n)), model.insert(*id, done(n)));
        }
        for id in ids.iter().step_by(3) {
            assert_eq!(parted.remove(&TransferId(*id)), model.remove(id));
        }
        assert_eq!(parted.len(), model.len());
        for id in &ids {
            assert_eq!(parted.get(&TransferId(*id)), model.get(id).copied());
        }
        let mut listed: Vec<_> = parted.iter().map(|(id, n)| (id.0, n.0)).collect();
        let mut expected: Vec<_> = model.iter().map(|(id, n)| (*id, n.0)).collect();
        listed.sort_unstable();
        expected.sort_unstable();
        assert_eq!(listed, expected);
    }

    #[test]
    fn sequential_ids_spread_over_the_parts() {
        let mut counts = vec![0_usize; PARTS];
        for id in 0..(PARTS as u128 * 64) {
            counts[part(TransferId(id), seed())] += 1;
        }
        // Each part gets 64 on average (a standard deviation of 8 for a good mix, whatever the
        // process's seed); none is starved or flooded.
        assert!(counts.iter().all(|&n| (16..=144).contains(&n)), "{counts:?}");
    }
}
