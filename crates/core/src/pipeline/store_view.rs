//! The governance state that grows with the records, as the governance sees
//! it: the store's state ([`StateReader`]) under the changes the governance
//! made that the store does not show yet:
//!
//! - what was last appended per target and record (the published state: a
//!   million partners into three targets are three million entries);
//! - the tracked rows (the last row read of every governed record, all its
//!   columns: kilobytes each);
//! - the business keys: which record holds each value, and which values
//!   each record holds;
//! - the references: which records hold each id in each column.
//!
//! Held in memory they were most of steward's memory, growing with Odoo's
//! tables. Here only the changes in flight are: each is kept, with the
//! generation of the delta that carries it, until the store reports that
//! generation committed, and then read from the store; recently read rows
//! are kept in a cache of bounded size.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use serde_json::{Map, Value};

use super::slot_map::{Slot, SlotMap};
use crate::config::EntityIndex;
use crate::state::{StateReader, WITHHELD};

/// A tracked row: all the columns of a record as last read.
pub(crate) type Row = Arc<Map<String, Value>>;

/// What a target was last sent of a record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Sent {
    /// Nothing, and nothing was decided for it.
    Nothing,
    /// Nothing: the record is withheld from it (gated, not routed,
    /// quarantined).
    Withheld,
    /// A document with this (shortened) hash.
    Hash([u8; 8]),
}

impl Sent {
    pub(crate) fn of(hash: Option<[u8; 16]>) -> Sent {
        match hash {
            None => Sent::Nothing,
            Some(h) if h == WITHHELD => Sent::Withheld,
            Some(h) => Sent::Hash(short_hash(&h)),
        }
    }

    pub(crate) fn is_published(self) -> bool {
        matches!(self, Sent::Hash(_))
    }
}

/// The first 8 bytes of a document hash: what the governance compares.
pub(crate) fn short_hash(hash: &[u8; 16]) -> [u8; 8] {
    let mut short = [0u8; 8];
    short.copy_from_slice(&hash[..8]);
    short
}

/// The store's governance state under the governance's own changes.
pub(crate) struct StoreView {
    /// Published changes not yet seen in the store: slot → (what was sent, generation).
    pending: SlotMap<(Sent, u64)>,
    /// Tracked rows changed and not yet seen in the store: (entity, key) →
    /// (the row, or `None` for no longer tracked; generation).
    rows: HashMap<(EntityIndex, String), (Option<Row>, u64)>,
    /// Business-key values changed and not yet seen in the store:
    /// (entity, unique field index, normalised value) → (holder, generation).
    unique: HashMap<UniqueSlot, (Option<String>, u64)>,
    /// What each record changed above holds now: (entity, key) → (values, generation).
    claims: HashMap<(EntityIndex, String), (Claims, u64)>,
    /// References changed and not yet seen in the store: (referencing
    /// entity, column, id, referencing key) → (present, generation).
    refs: BTreeMap<RefSlot, (bool, u64)>,
    /// The changes per generation, oldest first; the last one is the
    /// generation being written when `open` is set.
    generations: VecDeque<Generation>,
    open: bool,
    reader: Box<dyn StateReader>,
    /// Rows read from the store lately (interior: reading is `&self`).
    cache: RefCell<RowCache>,
}

/// What one generation changed.
struct Generation {
    number: u64,
    slots: Vec<Slot>,
    rows: Vec<(EntityIndex, String)>,
    unique: Vec<UniqueSlot>,
    claims: Vec<(EntityIndex, String)>,
    refs: Vec<RefSlot>,
}

/// (referencing entity, column, id, referencing key).
pub(crate) type RefSlot = (EntityIndex, String, String, String);

/// The business-key values a record holds: (field index, normalised value).
pub(crate) type Claims = Vec<(usize, String)>;

/// (entity, index of the business-key field, normalised value).
pub(crate) type UniqueSlot = (EntityIndex, usize, String);

impl StoreView {
    pub(crate) fn new(reader: Box<dyn StateReader>) -> StoreView {
        StoreView {
            pending: SlotMap::default(),
            rows: HashMap::new(),
            unique: HashMap::new(),
            claims: HashMap::new(),
            refs: BTreeMap::new(),
            generations: VecDeque::new(),
            open: false,
            reader,
            cache: RefCell::new(RowCache::default()),
        }
    }

    /// Reads from `reader` from now on; changes not yet committed are kept.
    pub(crate) fn set_reader(&mut self, reader: Box<dyn StateReader>) {
        self.reader = reader;
        self.cache.get_mut().clear();
    }

    /// What (target, entity, key), whose digest's slot is `slot`, was last sent.
    pub(crate) fn get(&self, slot: &Slot, target: &str, entity: &str, key: &str) -> Sent {
        match self.pending.get(slot) {
            Some((sent, _)) => sent,
            None => Sent::of(self.reader.get(target, entity, key)),
        }
    }

    /// The tracked row of (`e`, named `entity`, `key`), if any.
    pub(crate) fn row(&self, e: EntityIndex, entity: &str, key: &str) -> Option<Row> {
        match self.held_row(e, key) {
            Some(row) => row,
            None => self.decode_row(e, key, &self.reader.row(entity, key)?),
        }
    }

    /// The row of (`e`, `key`) in flight or cached (`Some(None)`: in flight
    /// as no longer tracked); `None` when only the store can tell.
    fn held_row(&self, e: EntityIndex, key: &str) -> Option<Option<Row>> {
        // Nothing in flight almost always between bursts: skip the key.
        if !self.rows.is_empty() {
            if let Some((row, _)) = self.rows.get(&(e, key.to_string())) {
                return Some(row.clone());
            }
        }
        self.cache.borrow_mut().get(e, key).map(Some)
    }

    /// A row as the store holds it (`bytes`), decoded into the cache.
    fn decode_row(&self, e: EntityIndex, key: &str, bytes: &[u8]) -> Option<Row> {
        let row = match serde_json::from_slice(bytes) {
            Ok(Value::Object(row)) => Arc::new(row),
            // Written by steward as a JSON object: anything else is not a row.
            _ => return None,
        };
        self.cache.borrow_mut().insert(e, key, Arc::clone(&row));
        Some(row)
    }

    /// The tracked row of (`e`, named `entity`, `key`) before `row`, and
    /// whether it equals `row`. A snapshot or re-read mostly finds the row
    /// it read before: the stored bytes are compared with `row` as it would
    /// be written, without decoding them (decoding every tracked row was a
    /// fifth of a governed snapshot's time).
    pub(crate) fn prior_row(
        &self,
        e: EntityIndex,
        entity: &str,
        key: &str,
        row: &Map<String, Value>,
    ) -> Prior {
        let known = |stored: Option<Row>| match stored {
            None => Prior::Absent,
            Some(stored) if *stored == *row => Prior::Same,
            Some(stored) => Prior::Other(stored),
        };
        if let Some(stored) = self.held_row(e, key) {
            return known(stored);
        }
        let Some(bytes) = self.reader.row(entity, key) else {
            return Prior::Absent;
        };
        if serializes_to(row, &bytes) {
            return Prior::Same;
        }
        known(self.decode_row(e, key, &bytes))
    }

    /// The keys of every tracked row of (`e`, named `entity`).
    pub(crate) fn row_keys(&self, e: EntityIndex, entity: &str) -> Vec<String> {
        let mut keys: std::collections::BTreeSet<String> =
            self.reader.row_keys(entity).into_iter().collect();
        for ((x, key), (row, _)) in &self.rows {
            if *x == e {
                if row.is_some() {
                    keys.insert(key.clone());
                } else {
                    keys.remove(key);
                }
            }
        }
        keys.into_iter().collect()
    }

    /// Records a change of what a target was sent (also queued for the
    /// store by the caller).
    pub(crate) fn set(&mut self, slot: Slot, sent: Sent) {
        let generation = self.open_generation();
        generation.slots.push(slot);
        let number = generation.number;
        self.pending.insert(slot, (sent, number));
    }

    /// Records a change of a tracked row (also queued for the store by the caller).
    pub(crate) fn set_row(&mut self, e: EntityIndex, key: &str, row: Option<Row>) {
        let generation = self.open_generation();
        let number = generation.number;
        generation.rows.push((e, key.to_string()));
        self.rows.insert((e, key.to_string()), (row, number));
    }

    /// The key of the record holding business-key value `slot` (of the
    /// field named `field` of the entity named `entity`).
    pub(crate) fn unique_holder(
        &self,
        slot: &UniqueSlot,
        entity: &str,
        field: &str,
    ) -> Option<String> {
        match self.unique.get(slot) {
            Some((holder, _)) => holder.clone(),
            None => self.reader.unique_holder(entity, field, &slot.2),
        }
    }

    /// Records a change of a business-key value's holder (also queued for
    /// the store by the caller).
    pub(crate) fn set_unique(&mut self, slot: UniqueSlot, holder: Option<String>) {
        let generation = self.open_generation();
        generation.unique.push(slot.clone());
        let number = generation.number;
        self.unique.insert(slot, (holder, number));
    }

    /// The business-key values (field index, normalised value) record
    /// (`e`, named `entity`, `key`) holds; `fields`: the entity's
    /// business-key fields.
    pub(crate) fn claims(
        &self,
        e: EntityIndex,
        entity: &str,
        key: &str,
        fields: &[String],
    ) -> Vec<(usize, String)> {
        if !self.claims.is_empty() {
            if let Some((values, _)) = self.claims.get(&(e, key.to_string())) {
                return values.clone();
            }
        }
        self.reader
            .claims(entity, key)
            .into_iter()
            .filter_map(|(field, value)| Some((fields.iter().position(|f| *f == field)?, value)))
            .collect()
    }

    /// Records what record (`e`, `key`) holds now, after its changes
    /// through [`StoreView::set_unique`].
    pub(crate) fn set_claims(&mut self, e: EntityIndex, key: &str, values: Vec<(usize, String)>) {
        let generation = self.open_generation();
        generation.claims.push((e, key.to_string()));
        let number = generation.number;
        self.claims.insert((e, key.to_string()), (values, number));
    }

    /// The keys of the tracked records of (`e`, named `entity`) whose
    /// `column` holds `id`.
    pub(crate) fn referencing(
        &self,
        e: EntityIndex,
        entity: &str,
        column: &str,
        id: &str,
    ) -> Vec<String> {
        let mut keys = self.reader.referencing(entity, column, id);
        if !self.refs.is_empty() {
            let from = (e, column.to_string(), id.to_string(), String::new());
            let changed = self
                .refs
                .range(from..)
                .take_while(|((x, c, i, _), _)| *x == e && c == column && i == id);
            for ((_, _, _, key), (present, _)) in changed {
                match (keys.iter().position(|k| k == key), present) {
                    (None, true) => keys.push(key.clone()),
                    (Some(at), false) => {
                        keys.swap_remove(at);
                    }
                    _ => {}
                }
            }
        }
        keys
    }

    /// Records that (`e`, `key`)'s `column` holds `id` (or no longer);
    /// also queued for the store by the caller.
    pub(crate) fn set_ref(&mut self, slot: RefSlot, present: bool) {
        let generation = self.open_generation();
        generation.refs.push(slot.clone());
        let number = generation.number;
        self.refs.insert(slot, (present, number));
    }

    fn open_generation(&mut self) -> &mut Generation {
        if !self.open {
            let number = self.reader.next_generation();
            self.generations.push_back(Generation {
                number,
                slots: Vec::new(),
                rows: Vec::new(),
                unique: Vec::new(),
                claims: Vec::new(),
                refs: Vec::new(),
            });
            self.open = true;
        }
        self.generations
            .back_mut()
            .expect("an open generation was just pushed")
    }

    /// Ends the generation of the changes made since the last call and
    /// returns it (0: there were none), for the delta that carries them.
    pub(crate) fn seal(&mut self) -> u64 {
        if !std::mem::replace(&mut self.open, false) {
            return 0;
        }
        self.generations.back().map_or(0, |g| g.number)
    }

    /// Forgets the changes the store now shows.
    pub(crate) fn sync(&mut self) {
        let visible = self.reader.refresh();
        let closed = self.generations.len() - usize::from(self.open);
        let mut dropped = 0;
        while dropped < closed && self.generations[0].number <= visible {
            let generation = self.generations.pop_front().expect("counted");
            let number = generation.number;
            // A later generation's change of the same thing stays.
            for slot in generation.slots {
                if self.pending.get(&slot).is_some_and(|(_, g)| g == number) {
                    self.pending.remove(&slot);
                }
            }
            let cache = self.cache.get_mut();
            for slot in generation.rows {
                if let Some((row, _)) = self.rows.get(&slot).filter(|(_, g)| *g == number) {
                    // What the store now shows: a record changed lately is
                    // likely read again (Odoo writes one in several statements).
                    match row {
                        Some(row) => cache.insert(slot.0, &slot.1, Arc::clone(row)),
                        None => cache.remove(slot.0, &slot.1),
                    }
                    self.rows.remove(&slot);
                }
            }
            forget(&mut self.unique, generation.unique, number);
            forget(&mut self.claims, generation.claims, number);
            for slot in generation.refs {
                if self.refs.get(&slot).is_some_and(|(_, g)| *g == number) {
                    self.refs.remove(&slot);
                }
            }
            dropped += 1;
        }
        if dropped > 0 && self.generations.is_empty() {
            // Give back the memory of a burst.
            self.pending = SlotMap::default();
            self.rows = HashMap::new();
            self.unique = HashMap::new();
            self.claims = HashMap::new();
            self.refs = BTreeMap::new();
        }
    }

    /// The first read error of the store since the last call.
    pub(crate) fn error(&mut self) -> Option<String> {
        self.reader.error()
    }

    /// Lets go of the store's read transaction and of the row cache while idle.
    pub(crate) fn release(&mut self) {
        self.reader.release();
        self.cache.get_mut().clear();
    }

    /// Published changes held in memory (for tests).
    #[cfg(test)]
    pub(crate) fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Row changes held in memory (for tests).
    #[cfg(test)]
    pub(crate) fn pending_rows(&self) -> usize {
        self.rows.len()
    }
}

/// A tracked row as it stood before a new one was read.
pub(crate) enum Prior {
    /// None was tracked.
    Absent,
    /// The same row.
    Same,
    /// Another row.
    Other(Row),
}

/// Whether `row` serializes to exactly `bytes` (as `serde_json::to_vec`
/// writes it); stops at the first byte that differs and allocates nothing.
fn serializes_to(row: &Map<String, Value>, bytes: &[u8]) -> bool {
    struct Compare<'a>(&'a [u8]);
    impl std::io::Write for Compare<'_> {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            match self.0.strip_prefix(buf) {
                Some(rest) => {
                    self.0 = rest;
                    Ok(buf.len())
                }
                None => Err(std::io::ErrorKind::InvalidData.into()),
            }
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut rest = Compare(bytes);
    serde_json::to_writer(&mut rest, row).is_ok() && rest.0.is_empty()
}

/// Removes from `changes` those of `keys` still carrying generation `number`.
fn forget<K: std::hash::Hash + Eq, V>(
    changes: &mut HashMap<K, (V, u64)>,
    keys: Vec<K>,
    number: u64,
) {
    for key in keys {
        if changes.get(&key).is_some_and(|(_, g)| *g == number) {
            changes.remove(&key);
        }
    }
}

/// How many bytes the rows in the cache take in memory, about (see
/// [`decoded_bytes`]). Not their JSON size: decoded, a row takes two to
/// three times that, and a budget in JSON bytes let the cache hold 9.4 MB
/// at a governed snapshot's peak (heaptrack, `STEWARD_BENCH_RECORDS=10000
/// cargo bench --bench governed`).
const ROW_CACHE_BYTES: usize = 4 << 20;

/// Rows read lately, in two halves: a row is looked up in the newer, then
/// in the older (and moved to the newer); when the newer holds half the
/// budget, the older is dropped and the newer becomes the older. A row read
/// again within about half the budget stays; the cost is one map lookup or
/// two, and no bookkeeping per read.
#[derive(Default)]
struct RowCache {
    newer: HashMap<(EntityIndex, String), (Row, usize)>,
    older: HashMap<(EntityIndex, String), (Row, usize)>,
    newer_bytes: usize,
}

/// What a decoded row takes on the heap, about: per field an `IndexMap`
/// entry (hash, `String` and `Value` headers) and its slot in the index
/// table, plus the text of the name and of the value.
fn decoded_bytes(row: &serde_json::Map<String, Value>) -> usize {
    fn value(v: &Value) -> usize {
        match v {
            Value::String(s) => s.len(),
            // Kept as its text (arbitrary precision).
            Value::Number(n) => n.as_str().len(),
            Value::Array(items) => items.iter().map(|v| 32 + value(v)).sum(),
            Value::Object(map) => decoded_bytes(map),
            Value::Null | Value::Bool(_) => 0,
        }
    }
    const PER_FIELD: usize = 72;
    64 + row
        .iter()
        .map(|(k, v)| PER_FIELD + k.len() + value(v))
        .sum::<usize>()
}

impl RowCache {
    fn get(&mut self, e: EntityIndex, key: &str) -> Option<Row> {
        if self.newer.is_empty() && self.older.is_empty() {
            return None;
        }
        let slot = (e, key.to_string());
        if let Some((row, _)) = self.newer.get(&slot) {
            return Some(Arc::clone(row));
        }
        let (row, bytes) = self.older.remove(&slot)?;
        self.put(slot, Arc::clone(&row), bytes);
        Some(row)
    }

    /// Adds a row as the store has it.
    fn insert(&mut self, e: EntityIndex, key: &str, row: Row) {
        let slot = (e, key.to_string());
        self.older.remove(&slot);
        let bytes = decoded_bytes(&row);
        self.put(slot, row, bytes);
    }

    fn put(&mut self, slot: (EntityIndex, String), row: Row, bytes: usize) {
        if self.newer_bytes + bytes > ROW_CACHE_BYTES / 2 {
            self.older = std::mem::take(&mut self.newer);
            self.newer_bytes = 0;
        }
        self.newer_bytes += bytes;
        if let Some((_, was)) = self.newer.insert(slot, (row, bytes)) {
            self.newer_bytes -= was;
        }
    }

    fn remove(&mut self, e: EntityIndex, key: &str) {
        if self.newer.is_empty() && self.older.is_empty() {
            return;
        }
        let slot = (e, key.to_string());
        if let Some((_, bytes)) = self.newer.remove(&slot) {
            self.newer_bytes -= bytes;
        }
        self.older.remove(&slot);
    }

    fn clear(&mut self) {
        *self = RowCache::default();
    }
}

/// A store's governance state for tests: a delta's changes are read, and its
/// generation shown, once [`TestStore::commit`] applied it.
#[cfg(test)]
#[derive(Clone, Default)]
pub(crate) struct TestStore(std::sync::Arc<std::sync::Mutex<TestTable>>);

#[cfg(test)]
#[derive(Default)]
pub(crate) struct TestTable {
    committed: crate::state::MemoryState,
    pub(crate) visible: u64,
    next: u64,
}

#[cfg(test)]
impl TestStore {
    pub(crate) fn commit(&self, delta: &crate::state::GovDelta) {
        let mut t = self.table();
        t.committed.apply(delta);
        t.visible = t.visible.max(delta.generation);
    }

    pub(crate) fn table(&self) -> std::sync::MutexGuard<'_, TestTable> {
        self.0.lock().unwrap()
    }
}

#[cfg(test)]
impl TestTable {
    /// What the store holds.
    pub(crate) fn committed(&self) -> &crate::state::MemoryState {
        &self.committed
    }
}

#[cfg(test)]
impl StateReader for TestStore {
    fn get(&self, target: &str, entity: &str, key: &str) -> Option<[u8; 16]> {
        self.table().committed.get(target, entity, key)
    }
    fn row(&self, entity: &str, key: &str) -> Option<Vec<u8>> {
        self.table().committed.row(entity, key)
    }
    fn row_keys(&self, entity: &str) -> Vec<String> {
        self.table().committed.row_keys(entity)
    }
    fn unique_holder(&self, entity: &str, field: &str, value: &str) -> Option<String> {
        self.table().committed.unique_holder(entity, field, value)
    }
    fn claims(&self, entity: &str, key: &str) -> Vec<(String, String)> {
        self.table().committed.claims(entity, key)
    }
    fn referencing(&self, entity: &str, column: &str, id: &str) -> Vec<String> {
        self.table().committed.referencing(entity, column, id)
    }
    fn refresh(&mut self) -> u64 {
        self.table().visible
    }
    fn next_generation(&mut self) -> u64 {
        let mut t = self.table();
        t.next += 1;
        t.next
    }
    fn error(&mut self) -> Option<String> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{push_published_change, GovDelta};

    fn slot(n: u8) -> Slot {
        [n; 12]
    }

    fn delta(hash: [u8; 16], generation: u64) -> GovDelta {
        let mut delta = GovDelta {
            generation,
            ..GovDelta::default()
        };
        push_published_change(&mut delta.published, "t", "e", "1", Some(hash));
        delta
    }

    #[test]
    fn changes_stay_in_memory_until_the_store_shows_them() {
        let store = TestStore::default();
        let mut state = StoreView::new(Box::new(store.clone()));
        let hash = [7u8; 16];
        state.set(slot(1), Sent::of(Some(hash)));
        let g1 = state.seal();
        assert!(g1 > 0);
        assert_eq!(state.seal(), 0, "nothing changed since");
        // A later change of the same record, in the next generation.
        state.set(slot(1), Sent::Withheld);
        let g2 = state.seal();
        assert!(g2 > g1);

        state.sync();
        assert_eq!(state.get(&slot(1), "t", "e", "1"), Sent::Withheld);
        store.commit(&delta(hash, g1));
        state.sync();
        assert_eq!(
            state.get(&slot(1), "t", "e", "1"),
            Sent::Withheld,
            "the later generation's change stays in memory"
        );
        assert_eq!(state.pending(), 1);
        store.commit(&delta(WITHHELD, g2));
        state.sync();
        assert_eq!(state.pending(), 0);
        assert_eq!(state.get(&slot(1), "t", "e", "1"), Sent::Withheld);
        assert_eq!(state.get(&slot(2), "t", "e", "2"), Sent::Nothing);
    }

    #[test]
    fn the_generation_being_written_is_never_dropped() {
        let store = TestStore::default();
        let mut state = StoreView::new(Box::new(store.clone()));
        state.set(slot(1), Sent::Hash([1; 8]));
        // The store already shows a later generation (another governance's).
        store.table().visible = 100;
        state.sync();
        assert_eq!(state.get(&slot(1), "t", "e", "1"), Sent::Hash([1; 8]));
        let g = state.seal();
        assert!(g <= 100);
        state.sync();
        assert_eq!(state.pending(), 0, "sealed and shown: dropped");
    }

    fn row_delta(key: &str, row: Option<&Row>, generation: u64) -> GovDelta {
        GovDelta {
            ops: vec![crate::state::GovOp::Row {
                entity: "e".into(),
                key: key.into(),
                row: row.map(|r| serde_json::to_vec(&**r).unwrap()),
            }],
            generation,
            ..GovDelta::default()
        }
    }

    fn row_of(n: i64) -> Row {
        let mut m = Map::new();
        m.insert("id".into(), Value::from(n));
        m.insert("name".into(), Value::from(format!("record {n}")));
        Arc::new(m)
    }

    #[test]
    fn a_row_read_again_unchanged_is_compared_as_stored_without_decoding() {
        let store = TestStore::default();
        let view = StoreView::new(Box::new(store.clone()));
        let e = EntityIndex(0);
        store.commit(&row_delta("1", Some(&row_of(1)), 1));
        assert!(matches!(
            view.prior_row(e, "e", "1", &row_of(1)),
            Prior::Same
        ));
        assert!(
            view.cache.borrow().newer.is_empty(),
            "equal bytes: nothing decoded into the cache"
        );
        match view.prior_row(e, "e", "1", &row_of(2)) {
            Prior::Other(stored) => assert_eq!(stored, row_of(1)),
            _ => panic!("a changed row is another row"),
        }
        assert!(matches!(
            view.prior_row(e, "e", "2", &row_of(2)),
            Prior::Absent
        ));

        // The same fields in another order: not the same bytes, the same row.
        let mut reordered = Map::new();
        reordered.insert("name".into(), Value::from("record 3"));
        reordered.insert("id".into(), Value::from(3));
        store.commit(&row_delta("3", Some(&Arc::new(reordered)), 2));
        let view = StoreView::new(Box::new(store.clone()));
        assert!(matches!(
            view.prior_row(e, "e", "3", &row_of(3)),
            Prior::Same
        ));

        // A row longer or shorter than the stored one differs.
        let mut longer = (*row_of(1)).clone();
        longer.insert("extra".into(), Value::Null);
        assert!(matches!(
            view.prior_row(e, "e", "1", &longer),
            Prior::Other(_)
        ));
        let mut shorter = (*row_of(1)).clone();
        shorter.shift_remove("name");
        assert!(matches!(
            view.prior_row(e, "e", "1", &shorter),
            Prior::Other(_)
        ));
    }

    #[test]
    fn tracked_rows_are_read_from_the_store_once_it_has_them() {
        let store = TestStore::default();
        let mut view = StoreView::new(Box::new(store.clone()));
        let e = EntityIndex(0);
        view.set_row(e, "1", Some(row_of(1)));
        let g1 = view.seal();
        assert_eq!(view.row(e, "e", "1"), Some(row_of(1)), "in flight");
        assert_eq!(view.row(e, "e", "2"), None);

        store.commit(&row_delta("1", Some(&row_of(1)), g1));
        view.sync();
        assert_eq!(view.pending_rows(), 0, "committed: not held any more");
        assert_eq!(view.row(e, "e", "1"), Some(row_of(1)));
        assert_eq!(view.row_keys(e, "e"), vec!["1".to_string()]);

        // Deleted, not yet committed: gone already for the governance,
        // while the store still has it.
        view.set_row(e, "1", None);
        let g2 = view.seal();
        view.sync();
        assert_eq!(view.row(e, "e", "1"), None);
        assert!(view.row_keys(e, "e").is_empty());
        store.commit(&row_delta("1", None, g2));
        view.sync();
        assert_eq!(view.pending_rows(), 0);
        assert_eq!(view.row(e, "e", "1"), None, "the cache forgot it too");
    }

    #[test]
    fn a_later_change_of_a_row_stays_until_its_own_generation_is_stored() {
        let store = TestStore::default();
        let mut view = StoreView::new(Box::new(store.clone()));
        let e = EntityIndex(0);
        view.set_row(e, "1", Some(row_of(1)));
        let g1 = view.seal();
        view.set_row(e, "1", Some(row_of(2)));
        let g2 = view.seal();
        store.commit(&row_delta("1", Some(&row_of(1)), g1));
        view.sync();
        assert_eq!(view.row(e, "e", "1"), Some(row_of(2)));
        store.commit(&row_delta("1", Some(&row_of(2)), g2));
        view.sync();
        assert_eq!(view.row(e, "e", "1"), Some(row_of(2)));
    }

    #[test]
    fn the_row_cache_holds_about_its_budget() {
        let mut cache = RowCache::default();
        let e = EntityIndex(0);
        let row = row_of(1);
        let bytes = decoded_bytes(&row);
        let rows = 4 * ROW_CACHE_BYTES / bytes;
        for i in 0..rows {
            cache.insert(e, &i.to_string(), Arc::clone(&row));
        }
        let held = cache.newer.len() + cache.older.len();
        assert!(held <= ROW_CACHE_BYTES / bytes, "{held} rows held");
        assert!(held >= ROW_CACHE_BYTES / bytes / 2, "{held} rows held");
        assert!(
            cache.get(e, &(rows - 1).to_string()).is_some(),
            "the newest stays"
        );
        assert!(cache.get(e, "0").is_none(), "the oldest went");
        // A row read again moves to the newer half and outlives older ones.
        let kept = (rows - held + 10).to_string();
        assert!(cache.get(e, &kept).is_some(), "among the older half");
        for i in rows..rows + ROW_CACHE_BYTES / bytes / 4 {
            cache.insert(e, &i.to_string(), Arc::clone(&row));
        }
        assert!(cache.get(e, &kept).is_some());
    }
}
