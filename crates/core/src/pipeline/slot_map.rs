//! The published state's map: a key that is a uniform digest (the 96-bit
//! slot in the governance, the 128-bit digest in the store) → a small value,
//! held as sorted buckets of entries instead of a hash table.
//!
//! A hash table of 20-byte entries takes 44 MiB for a million of them (its
//! buckets are a power of two, at most seven eighths full) and, while it
//! doubles, both tables at once: 66 MiB. Here an entry takes its 20 bytes
//! and at most an eighth more: the slots are uniform, so the first bits of
//! a slot pick a bucket of about [`SPLIT_AT`] entries, kept sorted; the next
//! bits tell about where in its bucket a slot stands, so a search looks at a
//! few neighbouring entries rather than across the bucket. Searching is
//! mostly waiting for the bucket's memory: perf on `STEWARD_BENCH_TARGETS=3
//! cargo bench --bench snapshot -- SNAPSHOT` put 15% of steward's samples in
//! it with binary searches over buckets of 128, 10% with this and buckets
//! of 64, and the snapshot ran 2-9% faster. An insert moves the rest of its
//! bucket by one entry. When
//! the buckets fill up they are split one at a time, so growing never holds
//! two copies of the map.

/// The slot's bits that choose a bucket: at least this many…
const MIN_BITS: u32 = 4;
/// …and at most this many (65,536 buckets); beyond 4 million entries the
/// buckets grow instead.
const MAX_BITS: u32 = 16;
/// Entries per bucket, on average, before the buckets double.
const SPLIT_AT: usize = 64;
/// Entries searched either side of where a slot's bits put it in its bucket
/// before searching the whole bucket (about two standard deviations of a
/// uniform key's rank in a bucket of [`SPLIT_AT`]).
const NEAR: usize = 8;

/// The governance's key: the first 96 bits of a published digest.
pub type Slot = [u8; 12];

/// A key of a [`SlotMap`]: bytes of a uniform digest, so its first bits
/// spread the keys evenly over the buckets.
pub trait DigestKey: Copy + Ord {
    /// The key's first four bytes, big-endian.
    fn prefix(&self) -> u32;
}

impl<const N: usize> DigestKey for [u8; N] {
    fn prefix(&self) -> u32 {
        let mut first = [0u8; 4];
        first.copy_from_slice(&self[..4]);
        u32::from_be_bytes(first)
    }
}

/// A map from a [`DigestKey`] to `V`; see the module documentation.
pub struct SlotMap<V, K = Slot> {
    /// Bucket `i` holds the keys whose first `bits` bits are `i`, sorted.
    buckets: Vec<Vec<(K, V)>>,
    bits: u32,
    len: usize,
}

impl<V: Copy, K: DigestKey> Default for SlotMap<V, K> {
    fn default() -> Self {
        SlotMap {
            buckets: vec![Vec::new(); 1 << MIN_BITS],
            bits: MIN_BITS,
            len: 0,
        }
    }
}

impl<V: Copy, K: DigestKey> SlotMap<V, K> {
    fn find(&self, slot: &K) -> (usize, Result<usize, usize>) {
        let prefix = slot.prefix();
        let b = (prefix >> (32 - self.bits)) as usize;
        let bucket = &self.buckets[b];
        // The bits after the bucket's, as a fraction of the bucket's range:
        // uniform keys stand at about that fraction of the bucket.
        let fraction = u64::from(prefix << self.bits);
        let guess = ((fraction * bucket.len() as u64) >> 32) as usize;
        let (lo, hi) = (guess.saturating_sub(NEAR), (guess + NEAR).min(bucket.len()));
        let within =
            (lo == 0 || bucket[lo - 1].0 < *slot) && (hi == bucket.len() || *slot < bucket[hi].0);
        let at = if within {
            match bucket[lo..hi].binary_search_by(|(s, _)| s.cmp(slot)) {
                Ok(i) => Ok(lo + i),
                Err(i) => Err(lo + i),
            }
        } else {
            bucket.binary_search_by(|(s, _)| s.cmp(slot))
        };
        (b, at)
    }

    /// The value of `slot`.
    pub fn get(&self, slot: &K) -> Option<V> {
        match self.find(slot) {
            (b, Ok(i)) => Some(self.buckets[b][i].1),
            _ => None,
        }
    }

    /// Whether `slot` has a value.
    pub fn contains_key(&self, slot: &K) -> bool {
        self.find(slot).1.is_ok()
    }

    /// Sets `slot` to `value`; returns the value it replaced.
    pub fn insert(&mut self, slot: K, value: V) -> Option<V> {
        let (b, at) = self.find(&slot);
        let bucket = &mut self.buckets[b];
        match at {
            Ok(i) => Some(std::mem::replace(&mut bucket[i].1, value)),
            Err(i) => {
                if bucket.len() == bucket.capacity() {
                    // An eighth more, not double: little room stays unused.
                    bucket.reserve_exact((bucket.len() / 8).max(4));
                }
                bucket.insert(i, (slot, value));
                self.len += 1;
                if self.bits < MAX_BITS && self.len > SPLIT_AT << self.bits {
                    self.split();
                }
                None
            }
        }
    }

    /// Removes `slot`; returns its value.
    pub fn remove(&mut self, slot: &K) -> Option<V> {
        let (b, at) = self.find(slot);
        let i = at.ok()?;
        let bucket = &mut self.buckets[b];
        let (_, value) = bucket.remove(i);
        self.len -= 1;
        if bucket.capacity() > 2 * bucket.len() + 8 {
            bucket.shrink_to(bucket.len() + bucket.len() / 8 + 4);
        }
        Some(value)
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it holds no entry.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Every entry, in key order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = (K, V)> + '_ {
        Entries {
            inner: self.buckets.iter().flatten(),
            left: self.len,
        }
    }

    /// Doubles the buckets: each splits on the next bit of its slots. The
    /// old buckets are freed one by one as they are split.
    fn split(&mut self) {
        self.bits += 1;
        let shift = 32 - self.bits;
        let old = std::mem::take(&mut self.buckets);
        let mut buckets = Vec::with_capacity(old.len() * 2);
        for bucket in old {
            // Sorted, so the slots with the new bit clear come first.
            let at = bucket.partition_point(|(s, _)| (s.prefix() >> shift) & 1 == 0);
            buckets.push(bucket[..at].to_vec());
            buckets.push(bucket[at..].to_vec());
        }
        self.buckets = buckets;
    }

    /// Bytes held by the entries and buckets (for tests of the bound).
    #[cfg(test)]
    fn heap_bytes(&self) -> usize {
        self.buckets.capacity() * std::mem::size_of::<Vec<(K, V)>>()
            + self
                .buckets
                .iter()
                .map(|b| b.capacity() * std::mem::size_of::<(K, V)>())
                .sum::<usize>()
    }
}

/// [`SlotMap::iter`]: the entries, counted so the length is known.
struct Entries<'a, K, V> {
    inner: std::iter::Flatten<std::slice::Iter<'a, Vec<(K, V)>>>,
    left: usize,
}

impl<K: Copy, V: Copy> Iterator for Entries<'_, K, V> {
    type Item = (K, V);

    fn next(&mut self) -> Option<(K, V)> {
        let next = self.inner.next().copied();
        self.left = self.left.saturating_sub(usize::from(next.is_some()));
        next
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.left, Some(self.left))
    }
}

impl<K: Copy, V: Copy> ExactSizeIterator for Entries<'_, K, V> {}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn slot(n: u64) -> Slot {
        let hash = blake3::hash(&n.to_le_bytes());
        let mut s = [0u8; 12];
        s.copy_from_slice(&hash.as_bytes()[..12]);
        s
    }

    #[test]
    fn behaves_as_a_hash_map_through_inserts_overwrites_removes_and_splits() {
        let mut map = SlotMap::<[u8; 8]>::default();
        let mut model = HashMap::new();
        // Enough to split the buckets several times, with removals between.
        for n in 0..60_000u64 {
            let v = n.to_le_bytes();
            assert_eq!(map.insert(slot(n), v), model.insert(slot(n), v));
            if n % 3 == 0 {
                let k = slot(n / 2);
                assert_eq!(map.remove(&k), model.remove(&k));
            }
            if n % 5 == 0 {
                let k = slot(n / 3);
                let v = (n + 7).to_le_bytes();
                assert_eq!(map.insert(k, v), model.insert(k, v));
            }
        }
        assert_eq!(map.len(), model.len());
        for n in 0..70_000u64 {
            let k = slot(n);
            assert_eq!(map.get(&k), model.get(&k).copied(), "{n}");
            assert_eq!(map.contains_key(&k), model.contains_key(&k));
        }
        let listed: Vec<Slot> = map.iter().map(|(s, _)| s).collect();
        let mut sorted = listed.clone();
        sorted.sort();
        assert_eq!(listed, sorted, "entries in slot order");
        assert_eq!(listed.len(), model.len());
        // Emptied, it gives its memory back.
        for k in model.keys() {
            assert!(map.remove(k).is_some());
        }
        assert_eq!(map.len(), 0);
        assert!(map.iter().next().is_none());
    }

    #[test]
    fn an_entry_costs_little_more_than_its_bytes() {
        let mut map = SlotMap::<[u8; 8]>::default();
        let n = 1_000_000u64;
        for i in 0..n {
            map.insert(slot(i), [0; 8]);
        }
        let per_entry = map.heap_bytes() as f64 / n as f64;
        // 20 bytes of entry; a hash table takes 44 (and 66 while it grows).
        assert!(per_entry < 24.0, "{per_entry:.1} bytes per entry");
    }
}
