//! The hash of the last document appended per target and record (no-op
//! suppression, "was published" for lifecycle gates and routing, and the
//! keys a target holds for reconciliation), keyed by
//! [`published_store_key`]: one table, read by the governance record by
//! record ([`Reader`]) instead of held in its memory.
//!
//! Keys sort by target, entity, then key, with numeric keys as numbers: the
//! records of one change or one snapshot chunk (consecutive ids, mostly)
//! share leaf pages, so a batch's inserts and reads touch few pages and a
//! (target, entity) is one range to list.

use std::collections::HashMap;
use std::ops::Bound;
use std::sync::atomic::Ordering;
use std::sync::{Mutex, PoisonError};

use redb::{
    ReadOnlyTable, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition,
    TableHandle, WriteTransaction,
};
use steward_core::pipeline::slot_map::SlotMap;
use steward_core::state::{
    published_changes, published_key_of, published_store_key, published_store_prefix,
    published_store_prefix_of, published_store_suffix, StateReader, WITHHELD,
};

use super::tables::open_or_empty;
use super::{Store, TxnError};

/// [`published_store_key`] → the document's hash ([`WITHHELD`]: withheld).
pub(crate) const GOV_PUBLISHED: TableDefinition<&[u8], [u8; 16]> =
    TableDefinition::new("gov_published");

/// Applies the published changes of a delta inside `txn`: each key ends
/// with its last change. Keys past the greatest one their (target, entity)
/// holds — a snapshot into a target, new records — are spliced in as one run
/// per (target, entity) instead of inserted one by one: redb builds the
/// leaves once and fills them, where an insert per key rewrites a leaf per
/// key and leaves appended pages half empty.
#[allow(clippy::result_large_err)] // redb's own error type, boxed by the caller
pub(super) fn apply(txn: &WriteTransaction, changes: &[u8]) -> Result<(), redb::Error> {
    if changes.is_empty() {
        return Ok(());
    }
    let mut table = txn.open_table(GOV_PUBLISHED)?;
    let mut end = Vec::new();
    for (prefix, changes) in last_changes(changes) {
        // Every key under the prefix sorts below the prefix and 0xff.
        end.clear();
        end.extend_from_slice(prefix);
        end.push(u8::MAX);
        let last = match table.range(prefix..end.as_slice())?.next_back() {
            Some(entry) => Some(entry?.0.value().to_vec()),
            None => None,
        };
        let new = match &last {
            Some(last) => changes.partition_point(|(key, _)| *key <= last.as_slice()),
            None => 0,
        };
        for (key, hash) in &changes[..new] {
            match hash {
                Some(hash) => {
                    table.insert(*key, hash)?;
                }
                None => {
                    table.remove(*key)?;
                }
            }
        }
        let mut appended = changes[new..]
            .iter()
            .filter_map(|(key, hash)| Some((*key, (*hash)?)))
            .peekable();
        if let Some((first, _)) = appended.peek() {
            let mut cursor = table.lower_bound_mut(Bound::Included(*first))?;
            for (key, hash) in appended {
                cursor.insert_before(key, hash)?;
            }
            cursor.close()?;
        }
    }
    Ok(())
}

type Change<'a> = (&'a [u8], Option<[u8; 16]>);

/// The changes per (target, entity) prefix, in key order, each key with its
/// last change. A delta lists a record's targets one after another and its
/// records mostly in key order: grouped first, each group is usually sorted
/// already, and checking that is cheaper than sorting.
fn last_changes(changes: &[u8]) -> Vec<(&[u8], Vec<Change<'_>>)> {
    let mut groups: Vec<(&[u8], Vec<Change<'_>>)> = Vec::new();
    let mut index: HashMap<&[u8], usize> = HashMap::new();
    let mut last = 0;
    for change in published_changes(changes) {
        let prefix = published_store_prefix_of(change.0);
        let next = (last + 1) % groups.len().max(1);
        last = if groups.get(next).is_some_and(|g| g.0 == prefix) {
            next
        } else if groups.get(last).is_some_and(|g| g.0 == prefix) {
            last
        } else {
            *index.entry(prefix).or_insert_with(|| {
                groups.push((prefix, Vec::new()));
                groups.len() - 1
            })
        };
        groups[last].1.push(change);
    }
    for (_, changes) in &mut groups {
        if changes.is_sorted_by(|a, b| a.0 < b.0) {
            continue;
        }
        // Stable: a key's changes stay in the order they were made.
        changes.sort_by(|a, b| a.0.cmp(b.0));
        let mut kept = 0;
        for i in 0..changes.len() {
            if kept > 0 && changes[kept - 1].0 == changes[i].0 {
                changes[kept - 1] = changes[i];
            } else {
                changes[kept] = changes[i];
                kept += 1;
            }
        }
        changes.truncate(kept);
    }
    groups
}

/// Up to `max` keys of `entity` that `target` was sent (published, not
/// withheld), in the table's order, after key `after` (`None`: from the first).
pub(super) fn keys_after(
    txn: &redb::ReadTransaction,
    target: &str,
    entity: &str,
    after: Option<&str>,
    max: usize,
) -> Result<Vec<String>, TxnError> {
    let mut prefix = Vec::new();
    published_store_prefix(target, entity, &mut prefix);
    let mut start = prefix.clone();
    match after {
        Some(key) => {
            start.clear();
            published_store_key(target, entity, key, &mut start);
            // The least key after `key`'s.
            start.push(0);
        }
        None => start.push(0),
    }
    let mut keys = Vec::new();
    if let Some(t) = open_or_empty!(txn, GOV_PUBLISHED) {
        for item in t.range(start.as_slice()..)? {
            let (k, hash) = item?;
            let k = k.value();
            if !k.starts_with(&prefix) {
                break;
            }
            if hash.value() == WITHHELD {
                continue;
            }
            match published_key_of(k, &prefix) {
                Some(key) => keys.push(key),
                None => {
                    return Err(TxnError::Corrupt(format!(
                        "gov_published holds a key steward does not write: {k:?}"
                    )))
                }
            }
            if keys.len() >= max {
                break;
            }
        }
    }
    Ok(keys)
}

/// Up to `max` integer keys ([`published_store_key`]'s canonical unsigned
/// integers) of `entity` that `target` was sent (published, not withheld),
/// ascending, greater than `after` (`None`: from 0) and at most `through`.
pub(super) fn integer_keys_between(
    txn: &redb::ReadTransaction,
    target: &str,
    entity: &str,
    after: Option<u64>,
    through: u64,
    max: usize,
) -> Result<Vec<u64>, TxnError> {
    let first = match after {
        Some(n) if n >= through => return Ok(Vec::new()),
        Some(n) => n + 1,
        None => 0,
    };
    let bound = |n: u64| {
        let mut k = Vec::new();
        published_store_prefix(target, entity, &mut k);
        k.push(1);
        k.extend_from_slice(&n.to_be_bytes());
        k
    };
    let (start, end) = (bound(first), bound(through));
    let mut keys = Vec::new();
    if let Some(t) = open_or_empty!(txn, GOV_PUBLISHED) {
        for item in t.range(start.as_slice()..=end.as_slice())? {
            let (k, hash) = item?;
            if hash.value() == WITHHELD {
                continue;
            }
            let k = k.value();
            let n = k[start.len() - 8..]
                .try_into()
                .ok()
                .filter(|_| k.len() == start.len())
                .map(u64::from_be_bytes)
                .ok_or_else(|| {
                    TxnError::Corrupt(format!(
                        "gov_published holds a key steward does not write: {k:?}"
                    ))
                })?;
            keys.push(n);
            if keys.len() >= max {
                break;
            }
        }
    }
    Ok(keys)
}

/// Entries of the table (for tests and figures).
pub(super) fn entries(txn: &redb::ReadTransaction) -> Result<u64, TxnError> {
    Ok(match open_or_empty!(txn, GOV_PUBLISHED) {
        Some(t) => t.len()?,
        None => 0,
    })
}

/// The published state of state files written before it had a table of its
/// own: a log of (digest, hash) changes and, apart, the names of the records
/// that became published. Read once into [`GOV_PUBLISHED`], then dropped.
const LEGACY_LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("gov_published_log");
const LEGACY_NAMES: TableDefinition<u64, &[u8]> = TableDefinition::new("gov_published_names");
const LEGACY_COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("gov_published_counters");
const LEGACY_ENTRY_LEN: usize = 33;

/// Moves a legacy published log into [`GOV_PUBLISHED`]; returns the entries
/// moved, or `None` when there was no log. A digest cannot be turned back
/// into its names, so only records named in the log's names (those sent a
/// document) move; records only withheld from a target are not carried
/// over, and a re-read after a configuration change treats them as never
/// decided about.
#[allow(clippy::result_large_err)]
pub(super) fn migrate_legacy(txn: &WriteTransaction) -> Result<Option<u64>, redb::Error> {
    let exists = txn.list_tables()?.any(|t| t.name() == LEGACY_LOG.name());
    if !exists {
        return Ok(None);
    }
    let mut live: SlotMap<[u8; 16], [u8; 16]> = SlotMap::default();
    {
        let log = txn.open_table(LEGACY_LOG)?;
        for item in log.iter()? {
            let (_, row) = item?;
            for entry in row.value().chunks_exact(LEGACY_ENTRY_LEN) {
                let mut digest = [0u8; 16];
                digest.copy_from_slice(&entry[..16]);
                if entry[16] == 1 {
                    let mut hash = [0u8; 16];
                    hash.copy_from_slice(&entry[17..]);
                    live.insert(digest, hash);
                } else {
                    live.remove(&digest);
                }
            }
        }
    }
    let mut moved = 0;
    {
        let names = txn.open_table(LEGACY_NAMES)?;
        let mut table = txn.open_table(GOV_PUBLISHED)?;
        let mut key = Vec::new();
        for item in names.iter()? {
            let (_, bytes) = item?;
            for [t, e, k] in legacy_names(bytes.value()) {
                let digest = steward_core::state::published_digest(t, e, k);
                // Taken out, so that a record named twice moves once.
                if let Some(hash) = live.remove(&digest).filter(|h| *h != WITHHELD) {
                    key.clear();
                    published_store_key(t, e, k, &mut key);
                    table.insert(key.as_slice(), hash)?;
                    moved += 1;
                }
            }
        }
    }
    txn.delete_table(LEGACY_LOG)?;
    txn.delete_table(LEGACY_NAMES)?;
    txn.delete_table(LEGACY_COUNTERS)?;
    Ok(Some(moved))
}

/// The (target, entity, key) names of a legacy names row: each part a
/// little-endian `u32` length and its bytes.
fn legacy_names(bytes: &[u8]) -> impl Iterator<Item = [&str; 3]> + '_ {
    let mut at = 0usize;
    std::iter::from_fn(move || {
        let mut parts = [""; 3];
        for part in &mut parts {
            let len = u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?) as usize;
            *part = std::str::from_utf8(bytes.get(at + 4..at + 4 + len)?).ok()?;
            at += 4 + len;
        }
        Some(parts)
    })
}

/// Writes a legacy log and names (for the migration's test).
#[cfg(test)]
pub(super) fn write_legacy(
    txn: &WriteTransaction,
    changes: &[([u8; 16], Option<[u8; 16]>)],
    names: &[[&str; 3]],
) -> Result<(), redb::Error> {
    let mut row = Vec::new();
    for (digest, hash) in changes {
        row.extend_from_slice(digest);
        row.push(u8::from(hash.is_some()));
        row.extend_from_slice(&hash.unwrap_or_default());
    }
    txn.open_table(LEGACY_LOG)?.insert(1, row.as_slice())?;
    let mut bytes = Vec::new();
    for name in names {
        for part in name {
            bytes.extend_from_slice(&(part.len() as u32).to_le_bytes());
            bytes.extend_from_slice(part.as_bytes());
        }
    }
    txn.open_table(LEGACY_NAMES)?.insert(1, bytes.as_slice())?;
    txn.open_table(LEGACY_COUNTERS)?.insert("log_entries", 1)?;
    Ok(())
}

/// The governance's view of [`GOV_PUBLISHED`] and the tracked rows
/// (`gov_rows`): one read transaction, renewed
/// when the store has committed a newer generation of governance changes,
/// and opened again on the next read after [`StateReader::release`].
pub(crate) struct Reader {
    store: Store,
    open: Mutex<Open>,
    error: Mutex<Option<String>>,
}

#[derive(Default)]
struct Open {
    /// Whether a transaction is open (`table` is `None` in it when the
    /// table does not exist yet).
    open: bool,
    table: Option<ReadOnlyTable<&'static [u8], [u8; 16]>>,
    rows: Option<ReadOnlyTable<&'static str, &'static [u8]>>,
    unique: Option<ReadOnlyTable<&'static str, &'static str>>,
    claims: Option<ReadOnlyTable<&'static str, ()>>,
    refs: Option<ReadOnlyTable<&'static str, ()>>,
    /// The generation the open transaction shows.
    generation: u64,
    key: Vec<u8>,
    /// Per (target, entity) prefix looked up in this transaction, the
    /// greatest key the table holds under it (`None`: none). A key above it
    /// is not in the table: a snapshot, which reads records in key order,
    /// into a target not sent them yet then looks nothing up per record.
    last_keys: HashMap<Vec<u8>, Option<Vec<u8>>>,
}

impl Reader {
    pub(super) fn new(store: Store) -> Reader {
        Reader {
            store,
            open: Mutex::new(Open::default()),
            error: Mutex::new(None),
        }
    }

    fn fail(&self, message: String) {
        let mut error = self.error.lock().unwrap_or_else(PoisonError::into_inner);
        error.get_or_insert(message);
    }

    /// Opens a read transaction on the current file, showing at least every
    /// generation committed before it was called.
    fn begin(&self, open: &mut Open) -> Result<(), String> {
        let visible = self.store.inner.visible_generation.load(Ordering::Acquire);
        open.open = false;
        open.table = None;
        open.rows = None;
        open.unique = None;
        open.claims = None;
        open.refs = None;
        let path = self.store.path().display().to_string();
        let guard = self
            .store
            .inner
            .db
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        let Some(db) = guard.as_ref() else {
            return Err(format!("{path}: the state file is being reopened"));
        };
        let opened = super::open::guarded(|| {
            let txn = db.begin_read().map_err(|e| e.to_string())?;
            macro_rules! table {
                ($def:expr) => {
                    match txn.open_table($def) {
                        Ok(table) => Some(table),
                        Err(redb::TableError::TableDoesNotExist(_)) => None,
                        Err(e) => return Err(e.to_string()),
                    }
                };
            }
            Ok(Open {
                open: true,
                table: table!(GOV_PUBLISHED),
                rows: table!(super::governance::GOV_ROWS),
                unique: table!(super::governance::GOV_UNIQUE),
                claims: table!(super::governance::GOV_CLAIMS),
                refs: table!(super::governance::GOV_REFS),
                generation: visible,
                key: Vec::new(),
                last_keys: HashMap::new(),
            })
        });
        match opened {
            Ok(Ok(opened)) => {
                *open = Open {
                    key: std::mem::take(&mut open.key),
                    ..opened
                };
                Ok(())
            }
            Ok(Err(e)) | Err(e) => Err(format!("{path}: cannot read the governance state: {e}")),
        }
    }
}

impl Reader {
    /// Runs `read` on the open read transaction (opening one if needed);
    /// an error is kept for [`StateReader::error`] and reads as nothing.
    fn read<T>(
        &self,
        what: &str,
        read: impl FnOnce(&mut Open) -> Result<Option<T>, redb::StorageError>,
    ) -> Option<T> {
        if self.store.inner.needs_reopen.load(Ordering::Acquire) {
            // A reopen waits for no reader: stop using the old file.
            self.fail(format!(
                "{}: the state file is being reopened",
                self.store.path().display()
            ));
            return None;
        }
        let mut guard = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let open = &mut *guard;
        if !open.open {
            if let Err(e) = self.begin(open) {
                self.fail(e);
                return None;
            }
        }
        match super::open::guarded(|| read(open)) {
            Ok(Ok(value)) => value,
            Ok(Err(e)) => {
                self.fail(format!(
                    "{}: cannot read the {what}: {e}",
                    self.store.path().display()
                ));
                None
            }
            Err(panic) => {
                self.store.inner.needs_reopen.store(true, Ordering::Release);
                self.fail(format!(
                    "{}: cannot read the {what}: {panic}",
                    self.store.path().display()
                ));
                None
            }
        }
    }
}

impl Reader {
    /// What follows `parts` (joined and ended by `\0`) in every key of the
    /// table `table` picks that starts with them.
    fn suffixes<V: redb::Value + 'static>(
        &self,
        what: &str,
        table: impl FnOnce(&Open) -> Option<&ReadOnlyTable<&'static str, V>>,
        parts: &[&str],
    ) -> Vec<String> {
        self.read(what, |open| {
            let Some(table) = table(open) else {
                return Ok(None);
            };
            let prefix = super::tables::join(parts);
            let (from, to) = (format!("{prefix}\0"), format!("{prefix}\u{1}"));
            let mut out = Vec::new();
            for entry in table.range(from.as_str()..to.as_str())? {
                let (k, _) = entry?;
                out.push(k.value()[from.len()..].to_string());
            }
            Ok(Some(out))
        })
        .unwrap_or_default()
    }
}

impl StateReader for Reader {
    fn get(&self, target: &str, entity: &str, key: &str) -> Option<[u8; 16]> {
        self.read("published state", |open| {
            let Some(table) = open.table.as_ref() else {
                return Ok(None);
            };
            open.key.clear();
            published_store_prefix(target, entity, &mut open.key);
            let prefix_len = open.key.len();
            published_store_suffix(key, &mut open.key);
            let prefix = &open.key[..prefix_len];
            let last = match open.last_keys.get(prefix) {
                Some(last) => last,
                None => {
                    // The greatest key under the prefix: the last one below
                    // the prefix's end (every key under it is longer).
                    let mut end = prefix.to_vec();
                    end.push(u8::MAX);
                    let last = match table.range(prefix..end.as_slice())?.next_back() {
                        Some(entry) => Some(entry?.0.value().to_vec()),
                        None => None,
                    };
                    open.last_keys.entry(prefix.to_vec()).or_insert(last)
                }
            };
            if last
                .as_deref()
                .is_none_or(|last| open.key.as_slice() > last)
            {
                return Ok(None);
            }
            table.get(open.key.as_slice()).map(|v| v.map(|v| v.value()))
        })
    }

    fn row(&self, entity: &str, key: &str) -> Option<Vec<u8>> {
        self.read("tracked rows", |open| {
            let Some(table) = open.rows.as_ref() else {
                return Ok(None);
            };
            let k = super::tables::join(&[entity, key]);
            table.get(k.as_str()).map(|v| v.map(|v| v.value().to_vec()))
        })
    }

    fn unique_holder(&self, entity: &str, field: &str, value: &str) -> Option<String> {
        self.read("business keys", |open| {
            let Some(table) = open.unique.as_ref() else {
                return Ok(None);
            };
            let k = super::tables::join(&[entity, field, value]);
            table
                .get(k.as_str())
                .map(|v| v.map(|v| v.value().to_string()))
        })
    }

    fn claims(&self, entity: &str, key: &str) -> Vec<(String, String)> {
        // `entity \0 key \0 field \0 value`: a record's claims sort together.
        self.suffixes("business keys", |o| o.claims.as_ref(), &[entity, key])
            .into_iter()
            .filter_map(|rest| {
                let (field, value) = rest.split_once('\0')?;
                Some((field.to_string(), value.to_string()))
            })
            .collect()
    }

    fn referencing(&self, entity: &str, column: &str, id: &str) -> Vec<String> {
        // `entity \0 column \0 id \0 key`: one id's records sort together.
        self.suffixes(
            "reference index",
            |o| o.refs.as_ref(),
            &[entity, column, id],
        )
    }

    fn row_keys(&self, entity: &str) -> Vec<String> {
        // `entity \0 key`: every key of the entity sorts together.
        self.suffixes("tracked rows", |o| o.rows.as_ref(), &[entity])
    }

    fn refresh(&mut self) -> u64 {
        let visible = self.store.inner.visible_generation.load(Ordering::Acquire);
        let open = self.open.get_mut().unwrap_or_else(PoisonError::into_inner);
        if !open.open || visible != open.generation {
            let mut taken = std::mem::take(open);
            let result = self.begin(&mut taken);
            let generation = taken.generation;
            *self.open.get_mut().unwrap_or_else(PoisonError::into_inner) = taken;
            if let Err(e) = result {
                self.fail(e);
            }
            return generation;
        }
        open.generation
    }

    fn next_generation(&mut self) -> u64 {
        self.store
            .inner
            .next_generation
            .fetch_add(1, Ordering::AcqRel)
            + 1
    }

    fn error(&mut self) -> Option<String> {
        self.error
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }

    fn release(&mut self) {
        let open = self.open.get_mut().unwrap_or_else(PoisonError::into_inner);
        open.open = false;
        open.table = None;
        open.rows = None;
        open.unique = None;
        open.claims = None;
        open.refs = None;
    }
}

#[cfg(test)]
pub(crate) use steward_core::state::published_digest;

#[cfg(test)]
mod tests {
    use super::published_digest;

    #[test]
    fn digests_are_unambiguous_and_long_keys_work() {
        assert_ne!(
            published_digest("ab", "c", "d"),
            published_digest("a", "bc", "d")
        );
        assert_ne!(
            published_digest("a", "b", "cd"),
            published_digest("a", "bc", "d")
        );
        let long = "k".repeat(1000);
        assert_eq!(
            published_digest("t", "e", &long),
            published_digest("t", "e", &long)
        );
        assert_ne!(
            published_digest("t", "e", &long),
            published_digest("t", "e", &long[1..])
        );
    }
}
