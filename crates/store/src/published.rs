//! The hash of the last document appended per target and record (no-op
//! suppression and "was published" for lifecycle gates and routing), keyed
//! by [`published_digest`].
//!
//! Stored as a log of changes, one redb row per commit (up to
//! [`ENTRIES_PER_ROW`] changes of [`ENTRY_LEN`] bytes each), replayed at
//! start-up. A row per record costs a B-tree insert per delivered event,
//! half of the commit thread's time on the product-insert workload (perf on
//! `cargo bench --bench e2e -- W1`). The log is compacted in
//! the commit that takes it past twice the live set (plus
//! [`COMPACT_SLACK`]), so it stays within a small multiple of the live set
//! and each change is rewritten a bounded number of times. The live set is
//! the governance's count when it gives one: a log that only grows with it
//! (an initial snapshot) has nothing to drop and is left alone.

use redb::{ReadableTable, TableDefinition, WriteTransaction};
use steward_core::pipeline::slot_map::SlotMap;

use super::tables::open_or_empty;
use super::TxnError;

/// Row number → changes, each `digest (16) | present (1) | hash (16)`.
pub(crate) const PUBLISHED_LOG: TableDefinition<u64, &[u8]> =
    TableDefinition::new("gov_published_log");

/// The log's own counters (the commit holds the store's `counters` table
/// open while governance state is written).
const LOG_COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("gov_published_counters");
/// Changes in the log (live or superseded).
const LOG_ENTRIES: &str = "log_entries";
/// Live entries right after the last compaction.
const LIVE_AT_COMPACTION: &str = "live_at_compaction";

pub(crate) const ENTRY_LEN: usize = 33;
/// About 60 KiB a row, like outbox chunks.
pub(crate) const ENTRIES_PER_ROW: usize = 1860;
/// Superseded entries tolerated beyond the live set before compacting.
pub(crate) const COMPACT_SLACK: u64 = 100_000;

/// Row number → (target, entity, key) names of records that became
/// published to a target, as `steward_core::state::push_published_name`
/// writes them: the keys a target was sent, which the digests of
/// [`PUBLISHED_LOG`] cannot give back. Appended once per record and target
/// when it goes from not published to published (not on every change),
/// compacted with the log (names no longer published are dropped). Row
/// numbers only grow, also across compactions, so a reader paging by row
/// number meets every name live when it started.
pub(crate) const PUBLISHED_NAMES: TableDefinition<u64, &[u8]> =
    TableDefinition::new("gov_published_names");
/// The next row number of [`PUBLISHED_NAMES`].
const NAMES_NEXT_ROW: &str = "names_next_row";
/// About 60 KiB a row of names.
const NAMES_ROW_BYTES: usize = 60 * 1024;

#[cfg(test)]
pub(crate) use steward_core::state::published_digest;
pub(crate) use steward_core::state::PublishedChange;

/// Appends `changes` (in order) inside `txn`, compacting the log when due:
/// when it holds more than twice the live entries (plus [`COMPACT_SLACK`]),
/// the live entries being `live` as the governance counts them after these
/// changes, or as many as the last compaction kept if that is more (`live`
/// is 0 when not known).
#[allow(clippy::result_large_err)] // redb's own error type, boxed by the caller
pub(super) fn append(
    txn: &WriteTransaction,
    changes: &[PublishedChange],
    names: &[u8],
    live: u64,
) -> Result<(), redb::Error> {
    if !names.is_empty() {
        append_names(txn, names)?;
    }
    if changes.is_empty() {
        return Ok(());
    }
    write_rows(txn, changes.iter().copied())?;
    let mut counters = txn.open_table(LOG_COUNTERS)?;
    let entries = counters.get(LOG_ENTRIES)?.map_or(0, |v| v.value()) + changes.len() as u64;
    counters.insert(LOG_ENTRIES, entries)?;
    let live = counters
        .get(LIVE_AT_COMPACTION)?
        .map_or(0, |v| v.value())
        .max(live);
    drop(counters);
    if entries > live.saturating_mul(2).saturating_add(COMPACT_SLACK) {
        compact(txn)?;
    }
    Ok(())
}

#[allow(clippy::result_large_err)]
fn write_rows(
    txn: &WriteTransaction,
    changes: impl ExactSizeIterator<Item = PublishedChange>,
) -> Result<(), redb::Error> {
    let mut log = txn.open_table(PUBLISHED_LOG)?;
    let mut next = log.last()?.map_or(1, |(row, _)| row.value() + 1);
    let mut row = Vec::with_capacity(changes.len().min(ENTRIES_PER_ROW) * ENTRY_LEN);
    for (digest, hash) in changes {
        row.extend_from_slice(&digest);
        row.push(u8::from(hash.is_some()));
        row.extend_from_slice(&hash.unwrap_or_default());
        if row.len() == ENTRIES_PER_ROW * ENTRY_LEN {
            log.insert(next, row.as_slice())?;
            next += 1;
            row.clear();
        }
    }
    if !row.is_empty() {
        log.insert(next, row.as_slice())?;
    }
    Ok(())
}

/// Appends encoded names, split into rows at entry boundaries.
#[allow(clippy::result_large_err)]
fn append_names(txn: &WriteTransaction, names: &[u8]) -> Result<(), redb::Error> {
    let mut counters = txn.open_table(LOG_COUNTERS)?;
    let mut next = counters.get(NAMES_NEXT_ROW)?.map_or(1, |v| v.value());
    let mut table = txn.open_table(PUBLISHED_NAMES)?;
    let mut start = 0usize;
    let mut at = 0usize;
    for entry in name_entries(names) {
        if at + entry.len() - start > NAMES_ROW_BYTES && at > start {
            table.insert(next, &names[start..at])?;
            next += 1;
            start = at;
        }
        at += entry.len();
    }
    if at > start {
        table.insert(next, &names[start..at])?;
        next += 1;
    }
    counters.insert(NAMES_NEXT_ROW, next)?;
    Ok(())
}

/// The encoded entries of `bytes`, each whole (three length-prefixed parts).
fn name_entries(bytes: &[u8]) -> impl Iterator<Item = &[u8]> + '_ {
    let mut at = 0usize;
    std::iter::from_fn(move || {
        let begin = at;
        for _ in 0..3 {
            let len = u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?) as usize;
            at += 4 + len;
        }
        bytes.get(begin..at)
    })
}

/// Drops the names whose record is no longer published (or is named twice),
/// rewriting the rest after the last row number. Consumes `live`: a name is
/// kept when its digest is still there, published, and taken out, so the
/// second name of a record finds it gone. Kept names are written a row at a
/// time, not gathered first.
#[allow(clippy::result_large_err)]
fn compact_names(txn: &WriteTransaction, live: &mut Live) -> Result<(), redb::Error> {
    let last_old = {
        let counters = txn.open_table(LOG_COUNTERS)?;
        let next = counters.get(NAMES_NEXT_ROW)?.map_or(1, |v| v.value());
        next - 1
    };
    let mut kept = Vec::new();
    loop {
        let row = {
            let mut table = txn.open_table(PUBLISHED_NAMES)?;
            let first = table.first()?.map(|(row, _)| row.value());
            match first {
                Some(row) if row <= last_old => {
                    table.remove(row)?.map(|bytes| bytes.value().to_vec())
                }
                _ => None,
            }
        };
        let Some(row) = row else {
            break;
        };
        for entry in name_entries(&row) {
            let Some([t, e, k]) = steward_core::state::published_names(entry).next() else {
                continue;
            };
            let digest = steward_core::state::published_digest(t, e, k);
            if live.remove(&digest).is_some_and(|h| h != [0u8; 16]) {
                kept.extend_from_slice(entry);
            }
        }
        if kept.len() >= NAMES_ROW_BYTES {
            append_names(txn, &kept)?;
            kept.clear();
        }
    }
    if !kept.is_empty() {
        append_names(txn, &kept)?;
    }
    Ok(())
}

/// The keys of `entity` named for `target` in up to `rows` rows of names
/// after row `after`, and the last row read (`None`: no rows after it).
pub(super) fn keys_after(
    txn: &redb::ReadTransaction,
    target: &str,
    entity: &str,
    after: u64,
    rows: usize,
) -> Result<(Vec<String>, Option<u64>), TxnError> {
    let mut keys = Vec::new();
    let mut last = None;
    if let Some(t) = open_or_empty!(txn, PUBLISHED_NAMES) {
        for item in t.range(after + 1..)?.take(rows) {
            let (row, bytes) = item?;
            last = Some(row.value());
            for [t, e, k] in steward_core::state::published_names(bytes.value()) {
                if t == target && e == entity {
                    keys.push(k.to_string());
                }
            }
        }
    }
    Ok((keys, last))
}

/// The live state while the log is compacted: digest → hash, at most 36
/// bytes an entry (a hash table takes 38 to 66, and more while it grows).
type Live = SlotMap<[u8; 16], [u8; 16]>;

/// Replaces the log by its live entries.
#[allow(clippy::result_large_err)]
fn compact(txn: &WriteTransaction) -> Result<(), redb::Error> {
    let mut live = {
        let mut log = txn.open_table(PUBLISHED_LOG)?;
        let mut live = Live::default();
        while let Some((_, row)) = log.pop_first()? {
            fold(row.value(), &mut live);
        }
        live
    };
    let n = live.len() as u64;
    write_rows(txn, live.iter().map(|(d, h)| (d, Some(h))))?;
    compact_names(txn, &mut live)?;
    let mut counters = txn.open_table(LOG_COUNTERS)?;
    counters.insert(LOG_ENTRIES, n)?;
    counters.insert(LIVE_AT_COMPACTION, n)?;
    Ok(())
}

/// Applies one row's changes to `live`. A torn last entry cannot happen
/// (rows are written whole in a transaction); a short one is ignored.
fn fold(row: &[u8], live: &mut Live) {
    for (digest, hash) in changes(row) {
        match hash {
            Some(hash) => live.insert(digest, hash),
            None => live.remove(&digest),
        };
    }
}

/// The changes of one row of the log, in order.
fn changes(row: &[u8]) -> impl Iterator<Item = PublishedChange> + '_ {
    row.chunks_exact(ENTRY_LEN).map(|entry| {
        let mut digest = [0u8; 16];
        digest.copy_from_slice(&entry[..16]);
        let hash = (entry[16] == 1).then(|| {
            let mut hash = [0u8; 16];
            hash.copy_from_slice(&entry[17..]);
            hash
        });
        (digest, hash)
    })
}

/// Replays the log into `apply`, change by change in the order written:
/// nothing but one row at a time is held here.
pub(super) fn replay(
    txn: &redb::ReadTransaction,
    apply: &mut dyn FnMut(PublishedChange),
) -> Result<(), TxnError> {
    if let Some(t) = open_or_empty!(txn, PUBLISHED_LOG) {
        for item in t.iter()? {
            let (row, bytes) = item?;
            let bytes = bytes.value();
            if bytes.len() % ENTRY_LEN != 0 {
                return Err(TxnError::Corrupt(format!(
                    "gov_published_log row {} is {} bytes, not a multiple of {ENTRY_LEN}",
                    row.value(),
                    bytes.len()
                )));
            }
            changes(bytes).for_each(&mut *apply);
        }
    }
    Ok(())
}

/// Rows in the log (for tests of compaction).
#[cfg(test)]
pub(super) fn log_entries(txn: &redb::ReadTransaction) -> Result<usize, TxnError> {
    let mut n = 0;
    if let Some(t) = open_or_empty!(txn, PUBLISHED_LOG) {
        for item in t.iter()? {
            n += item?.1.value().len() / ENTRY_LEN;
        }
    }
    Ok(n)
}

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
