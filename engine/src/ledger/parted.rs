//! A hash map from transfer id split into many small maps, so that growing it never stops the
//! shard for long.
//!
//! A hash map grows by doubling: one insert moves every entry. The table of final transfers
//! only grows (millions an hour), and at 7M entries one doubling held a shard for ~0.9 s. Split
//! into [`PARTS`] maps chosen by the id, each doubles on its own, moving a 256th of the
//! entries; the memory a doubling needs on top of the table shrinks the same way.

use rustc_hash::FxHashMap;

use crate::ids::TransferId;

const PART_BITS: u32 = 8;
pub const PARTS: usize = 1 << PART_BITS;

pub struct Parted<V> {
    parts: Box<[FxHashMap<TransferId, V>]>,
}

/// Which part holds `id`. A multiplicative hash of both halves, independent of the maps' own
/// hash, whose top bits hashbrown uses as its tags: keys sharing a part share nothing else.
fn part(id: TransferId) -> usize {
    let [low, high] = crate::ids::halves(id.0);
    let top = (low ^ high).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - PART_BITS);
    usize::try_from(top).unwrap_or(0)
}

impl<V> std::fmt::Debug for Parted<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Parted").field("len", &self.len()).finish_non_exhaustive()
    }
}

impl<V> Default for Parted<V> {
    fn default() -> Self {
        Parted { parts: (0..PARTS).map(|_| FxHashMap::default()).collect() }
    }
}

impl<V> Parted<V> {
    pub fn get(&self, id: &TransferId) -> Option<&V> {
        self.parts[part(*id)].get(id)
    }

    pub fn insert(&mut self, id: TransferId, value: V) -> Option<V> {
        self.parts[part(id)].insert(id, value)
    }

    pub fn remove(&mut self, id: &TransferId) -> Option<V> {
        self.parts[part(*id)].remove(id)
    }

    pub fn len(&self) -> usize {
        self.parts.iter().map(|map| map.len()).sum()
    }

    /// Room for `additional` more entries, spread over the parts.
    pub fn reserve(&mut self, additional: usize) {
        let each = additional.div_ceil(PARTS);
        for map in self.parts.iter_mut() {
            map.reserve(each);
        }
    }

    #[cfg(test)]
    pub fn iter(&self) -> impl Iterator<Item = (&TransferId, &V)> {
        self.parts.iter().flat_map(|map| map.iter())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn behaves_as_one_map() {
        let mut parted = Parted::default();
        let mut model = std::collections::HashMap::new();
        // Ids in a run, ids differing only in their high half, and scattered ones.
        let ids: Vec<u128> = (1..2_000_u128)
            .chain((1..500_u128).map(|n| n << 64))
            .chain((1..500_u128).map(|n| n.wrapping_mul(0x0123_4567_89ab_cdef_0fed_cba9_8765_4321)))
            .collect();
        for (n, id) in ids.iter().enumerate() {
            assert_eq!(parted.insert(TransferId(*id), n), model.insert(*id, n));
        }
        for id in ids.iter().step_by(3) {
            assert_eq!(parted.remove(&TransferId(*id)), model.remove(id));
        }
        assert_eq!(parted.len(), model.len());
        for id in &ids {
            assert_eq!(parted.get(&TransferId(*id)), model.get(id));
        }
        let mut listed: Vec<_> = parted.iter().map(|(id, n)| (id.0, *n)).collect();
        let mut expected: Vec<_> = model.iter().map(|(id, n)| (*id, *n)).collect();
        listed.sort_unstable();
        expected.sort_unstable();
        assert_eq!(listed, expected);
    }

    #[test]
    fn sequential_ids_spread_over_the_parts() {
        let mut counts = vec![0_usize; PARTS];
        for id in 0..(PARTS as u128 * 64) {
            counts[part(TransferId(id))] += 1;
        }
        // Each part gets 64 on average; none is starved or flooded.
        assert!(counts.iter().all(|&n| (32..=128).contains(&n)), "{counts:?}");
    }
}
