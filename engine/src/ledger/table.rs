//! An open-addressing hash table whose slots hold their entries whole, for the ledger's two big
//! maps: accounts by id and final transfers by id.
//!
//! hashbrown, which the ledger used before, keeps a separate array of control bytes: a lookup
//! among millions of entries misses the cache twice (the control group, then the bucket) and the
//! bucket's address is known only after the first miss, so nothing can fetch it ahead. Here an
//! entry's slot is a function of its key alone ([`Table::prefetch`] computes it and asks the CPU
//! for the line without waiting), and an entry found in its home slot costs one line.
//!
//! Linear probing, at most three quarters full, with backward-shift removal (no tombstones).
//! The slot index is the hash scaled to the slot count (the high half of `hash × slots`), so a
//! table may have any number of slots: the parts of a [`super::parted::Parted`] map grow by
//! half at staggered sizes, and never all at once.

/// What a [`Table`] stores: a fixed-size entry that carries its own key.
pub(crate) trait Entry: Copy {
    type Key: Copy + Eq;
    /// The content of an empty slot.
    const FREE: Self;
    fn key(&self) -> Self::Key;
    /// Whether `key` is the key of [`Entry::FREE`]: an entry with it is kept beside the slots.
    fn is_free_key(key: Self::Key) -> bool;
    /// A well-mixed hash under the table's `seed`: its top bits choose the slot.
    fn hash(key: Self::Key, seed: [u64; 2]) -> u64;
}

pub(crate) struct Table<E> {
    /// `base × (512 + stagger) / 512` slots (or none).
    slots: Vec<E>,
    /// Top bits of the hash that choose a part, not a slot: dropped before the hash is scaled.
    hash_shift: u32,
    /// Where within a growth step this table's sizes lie (0 to 255): the parts of one map take
    /// different ones, so that they do not all grow at the same entry count.
    stagger: usize,
    /// The step of the growth series the size was taken from (`MIN_SLOTS × (3/2)^k`, rounded
    /// down at each step; 0 while empty): the stagger scales it, so that it keeps its full
    /// resolution at every size rather than rounding away at the small first ones.
    base: usize,
    /// Entries in `slots`, not counting `aside`.
    len: usize,
    /// The entry whose key is the free slot's, if one was inserted.
    aside: Option<E>,
    /// Mixed into every key's hash ([`seed`]).
    seed: [u64; 2],
}

impl<E: Entry> std::fmt::Debug for Table<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Table").field("len", &self.len()).field("slots", &self.slots.len()).finish()
    }
}

impl<E: Entry> Default for Table<E> {
    fn default() -> Self {
        Table::in_part(0, 0)
    }
}

/// The smallest table; a table never shrinks.
const MIN_SLOTS: usize = 8;

impl<E: Entry> Table<E> {
    /// A table for one part of a map: the top `hash_shift` bits of a hash chose the part, and
    /// `stagger` (0 to 255) where its sizes lie within a growth step.
    pub fn in_part(hash_shift: u32, stagger: usize) -> Self {
        Table {
            slots: Vec::new(),
            hash_shift,
            stagger: stagger % 256,
            base: 0,
            len: 0,
            aside: None,
            seed: seed(),
        }
    }

    pub fn len(&self) -> usize {
        self.len + usize::from(self.aside.is_some())
    }

    /// Slots allocated, free or not.
    #[cfg(test)]
    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    /// The slot after `at`, wrapping at the end.
    fn next(&self, at: usize) -> usize {
        if at + 1 == self.slots.len() { 0 } else { at + 1 }
    }

    /// `key`'s home slot: its hash (less the part's bits) scaled to the slot count.
    fn home(&self, key: E::Key) -> usize {
        let hash = E::hash(key, self.seed) << self.hash_shift;
        let scaled = u128::from(hash) * self.slots.len() as u128;
        usize::try_from(crate::ids::halves(scaled)[1]).unwrap_or(0)
    }

    fn is_free(entry: &E) -> bool {
        E::is_free_key(entry.key())
    }

    /// The slot holding `key`, if any (for a key that is not the free one).
    fn find(&self, key: E::Key) -> Option<usize> {
        if self.slots.is_empty() {
            return None;
        }
        let mut at = self.home(key);
        loop {
            let entry = &self.slots[at];
            if Self::is_free(entry) {
                return None;
            }
            if entry.key() == key {
                return Some(at);
            }
            at = self.next(at);
        }
    }

    pub fn get(&self, key: E::Key) -> Option<&E> {
        if E::is_free_key(key) {
            return self.aside.as_ref();
        }
        self.find(key).map(|at| &self.slots[at])
    }

    pub fn get_mut(&mut self, key: E::Key) -> Option<&mut E> {
        if E::is_free_key(key) {
            return self.aside.as_mut();
        }
        self.find(key).map(|at| &mut self.slots[at])
    }

    /// Two distinct entries at once. For equal keys the second is `None`.
    pub fn get_disjoint_mut(&mut self, [a, b]: [E::Key; 2]) -> [Option<&mut E>; 2] {
        if a == b {
            return [self.get_mut(a), None];
        }
        match (E::is_free_key(a), E::is_free_key(b)) {
            (true, _) => {
                let found = self.find(b);
                [self.aside.as_mut(), found.map(|at| &mut self.slots[at])]
            }
            (_, true) => {
                let found = self.find(a);
                [found.map(|at| &mut self.slots[at]), self.aside.as_mut()]
            }
            _ => match (self.find(a), self.find(b)) {
                (Some(x), Some(y)) => match self.slots.get_disjoint_mut([x, y]) {
                    Ok([x, y]) => [Some(x), Some(y)],
                    Err(_) => [None, None],
                },
                (Some(x), None) => [Some(&mut self.slots[x]), None],
                (None, Some(y)) => [None, Some(&mut self.slots[y])],
                (None, None) => [None, None],
            },
        }
    }

    /// Asks the CPU for the cache lines where `key`'s slot and the next begin, without waiting,
    /// so that a lookup soon after finds them cached. Changes nothing.
    pub fn prefetch(&self, key: E::Key) {
        if self.slots.is_empty() {
            return;
        }
        let at = self.home(key);
        prefetch(&self.slots[at]);
        // Linear probing goes on into the next slots: their line, when the entry is smaller.
        if size_of::<E>() < 64 {
            // One wrap at most, and no division on this hot path (a table has at least eight
            // slots; an entry so small that it reaches past them is simply not fetched ahead).
            let ahead = at + 64 / size_of::<E>().max(1);
            let ahead = ahead.checked_sub(self.slots.len()).unwrap_or(ahead);
            if let Some(slot) = self.slots.get(ahead) {
                prefetch(slot);
            }
        }
    }

    /// Inserts `entry`, returning the entry it replaced (same key).
    pub fn insert(&mut self, entry: E) -> Option<E> {
        let key = entry.key();
        if E::is_free_key(key) {
            return self.aside.replace(entry);
        }
        self.reserve(1);
        let mut at = self.home(key);
        loop {
            let slot = &mut self.slots[at];
            if Self::is_free(slot) {
                *slot = entry;
                self.len += 1;
                return None;
            }
            if slot.key() == key {
                return Some(std::mem::replace(slot, entry));
            }
            at = self.next(at);
        }
    }

    pub fn remove(&mut self, key: E::Key) -> Option<E> {
        if E::is_free_key(key) {
            return self.aside.take();
        }
        let mut hole = self.find(key)?;
        let removed = std::mem::replace(&mut self.slots[hole], E::FREE);
        self.len -= 1;
        // Backward shift: move up every later entry of the run that may sit in the hole (its
        // home is not cyclically within (hole, at]), so that no lookup stops at the hole early.
        let mut at = hole;
        loop {
            at = self.next(at);
            if Self::is_free(&self.slots[at]) {
                return Some(removed);
            }
            let home = self.home(self.slots[at].key());
            let stays = if hole <= at { hole < home && home <= at } else { hole < home || home <= at };
            if !stays {
                self.slots[hole] = self.slots[at];
                self.slots[at] = E::FREE;
                hole = at;
            }
        }
    }

    /// Room for `additional` more entries without growing.
    pub fn reserve(&mut self, additional: usize) {
        let needed = self.len.saturating_add(additional);
        // At most three quarters full.
        if needed.saturating_mul(4) <= self.slots.len().saturating_mul(3) {
            return;
        }
        // Grown by half each time: a table's sizes are `base × (512 + stagger) / 512` for the
        // steps `base` of `MIN_SLOTS × (3/2)^k`.
        let size = |base: usize| base.saturating_mul(512 + self.stagger) / 512;
        let mut base = self.base.max(MIN_SLOTS);
        while size(base).saturating_mul(3) < needed.saturating_mul(4) {
            base = base.saturating_add(base / 2);
        }
        self.base = base;
        let slots = size(base);
        let old = std::mem::replace(&mut self.slots, vec![E::FREE; slots]);
        self.len = 0;
        for entry in old.into_iter().filter(|entry| !Self::is_free(entry)) {
            self.place(entry);
        }
    }

    /// Puts an entry whose key is not in the table into its slot (room is there).
    fn place(&mut self, entry: E) {
        let mut at = self.home(entry.key());
        while !Self::is_free(&self.slots[at]) {
            at = self.next(at);
        }
        self.slots[at] = entry;
        self.len += 1;
    }

    pub fn iter(&self) -> impl Iterator<Item = &E> {
        self.slots.iter().filter(|entry| !Self::is_free(entry)).chain(self.aside.as_ref())
    }
}

impl<E: Entry> FromIterator<E> for Table<E> {
    fn from_iter<I: IntoIterator<Item = E>>(entries: I) -> Self {
        let entries = entries.into_iter();
        let mut table = Table::default();
        table.reserve(entries.size_hint().0);
        for entry in entries {
            table.insert(entry);
        }
        table
    }
}

/// A hint to fetch the line holding `at` into every cache level; no effect on the program.
#[inline(always)]
fn prefetch<T>(at: &T) {
    #[cfg(all(target_arch = "x86_64", target_feature = "sse"))]
    safe_arch::prefetch_t0(at);
    #[cfg(not(all(target_arch = "x86_64", target_feature = "sse")))]
    let _ = at;
}

/// Two random words drawn once per process, which every table keeps and mixes into its keys'
/// hashes: a caller choosing keys (transfer ids are the caller's) cannot aim them at one run
/// of slots and make every insert probe it. Nothing stored depends on them.
pub(crate) fn seed() -> [u64; 2] {
    static SEED: std::sync::OnceLock<[u64; 2]> = std::sync::OnceLock::new();
    *SEED.get_or_init(|| [rand::random::<u64>(), rand::random::<u64>() | 1])
}

/// Multiplies and folds the 128-bit product: a fast mix whose every output bit depends on
/// every input bit (the folded multiply of wyhash and foldhash).
pub(crate) fn fold(a: u64, b: u64) -> u64 {
    let product = u128::from(a) * u128::from(b);
    // Low half, then high half: the truncation is the point.
    #[allow(clippy::cast_possible_truncation)]
    let low = product as u64;
    low ^ crate::ids::halves(product)[1]
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    struct Pair(u64, u64);

    impl Entry for Pair {
        type Key = u64;
        const FREE: Pair = Pair(0, 0);
        fn key(&self) -> u64 {
            self.0
        }
        fn is_free_key(key: u64) -> bool {
            key == 0
        }
        fn hash(key: u64, [a, b]: [u64; 2]) -> u64 {
            // Few distinct homes, so that runs form, wrap around the end and get shifted.
            fold((key % 13) ^ a, b)
        }
    }

    #[derive(Debug, Clone)]
    enum Step {
        Insert(u64, u64),
        Remove(u64),
        Get(u64),
        Reserve(u8),
    }

    fn step() -> impl Strategy<Value = Step> {
        let key = 0_u64..40;
        prop_oneof![
            4 => (key.clone(), any::<u64>()).prop_map(|(k, v)| Step::Insert(k, v)),
            2 => key.clone().prop_map(Step::Remove),
            2 => key.prop_map(Step::Get),
            1 => any::<u8>().prop_map(Step::Reserve),
        ]
    }

    proptest! {
        #[test]
        fn behaves_as_a_map(
            steps in proptest::collection::vec(step(), 1..300),
            // Sizes between powers of two, and a part's bits dropped from the hash.
            stagger in 0_usize..256,
            hash_shift in 0_u32..9,
        ) {
            let mut table: Table<Pair> = Table::in_part(hash_shift, stagger);
            let mut model: HashMap<u64, u64> = HashMap::new();
            for step in steps {
                match step {
                    Step::Insert(k, v) => {
                        prop_assert_eq!(table.insert(Pair(k, v)).map(|p| p.1), model.insert(k, v));
                    }
                    Step::Remove(k) => prop_assert_eq!(table.remove(k).map(|p| p.1), model.remove(&k)),
                    Step::Get(k) => prop_assert_eq!(table.get(k).map(|p| p.1), model.get(&k).copied()),
                    Step::Reserve(n) => table.reserve(usize::from(n)),
                }
                prop_assert_eq!(table.len(), model.len());
                for k in 0..40 {
                    prop_assert_eq!(table.get(k).map(|p| p.1), model.get(&k).copied(), "key {}", k);
                }
            }
            let mut listed: Vec<_> = table.iter().map(|p| (p.0, p.1)).collect();
            let mut expected: Vec<_> = model.into_iter().collect();
            listed.sort_unstable();
            expected.sort_unstable();
            prop_assert_eq!(listed, expected);
        }
    }

    #[test]
    fn disjoint_lookups_cover_the_aside_entry_and_equal_keys() {
        let mut table: Table<Pair> = [Pair(0, 10), Pair(1, 11), Pair(2, 12)].into_iter().collect();
        let [a, b] = table.get_disjoint_mut([0, 2]);
        let (a, b) = (a.expect("aside"), b.expect("slot"));
        a.1 += 1;
        b.1 += 1;
        let [a, b] = table.get_disjoint_mut([1, 0]);
        assert_eq!((a.map(|p| p.1), b.map(|p| p.1)), (Some(11), Some(11)));
        let [a, b] = table.get_disjoint_mut([2, 2]);
        assert_eq!((a.map(|p| p.1), b.is_none()), (Some(13), true));
        let [a, b] = table.get_disjoint_mut([7, 1]);
        assert_eq!((a.is_none(), b.map(|p| p.1)), (true, Some(11)));
        table.prefetch(5);
        Table::<Pair>::default().prefetch(5);
    }

    #[test]
    fn stays_at_most_three_quarters_full() {
        let mut table: Table<Pair> = Table::default();
        for k in 1..=1000 {
            table.insert(Pair(k, k));
            assert!(table.len() * 4 <= table.slots.len() * 3, "{} in {}", table.len(), table.slots.len());
        }
        table.reserve(3000);
        // 1000 + 3000 entries at three quarters need 5334 slots; grown by half at a time from 8
        // (12, 18, … 3444, 5166), that is 7749.
        assert_eq!(table.slots.len(), 7749);
        assert_eq!(table.len(), 1000);
        // A staggered table starts a quarter of a step up: 12 × 3/2 … past 1334 for 1000.
        let mut table: Table<Pair> = Table::in_part(8, 128);
        for k in 1..=1000 {
            table.insert(Pair(k, k));
            assert!(table.len() * 4 <= table.slots.len() * 3, "{} in {}", table.len(), table.slots.len());
        }
        assert!((1334..2001).contains(&table.slots.len()), "{}", table.slots.len());
    }
}
