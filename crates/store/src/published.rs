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
//! and each change is rewritten a bounded number of times.

use std::collections::HashMap;

use redb::{ReadableTable, TableDefinition, WriteTransaction};

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

#[cfg(test)]
pub(crate) use steward_core::state::published_digest;
pub(crate) use steward_core::state::{PublishedChange, PublishedEntry};

/// Appends `changes` (in order) inside `txn`, compacting the log when due.
#[allow(clippy::result_large_err)] // redb's own error type, boxed by the caller
pub(super) fn append(
    txn: &WriteTransaction,
    changes: &[PublishedChange],
) -> Result<(), redb::Error> {
    if changes.is_empty() {
        return Ok(());
    }
    write_rows(txn, changes.iter().copied())?;
    let mut counters = txn.open_table(LOG_COUNTERS)?;
    let entries = counters.get(LOG_ENTRIES)?.map_or(0, |v| v.value()) + changes.len() as u64;
    counters.insert(LOG_ENTRIES, entries)?;
    let live = counters.get(LIVE_AT_COMPACTION)?.map_or(0, |v| v.value());
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

/// Replaces the log by its live entries.
#[allow(clippy::result_large_err)]
fn compact(txn: &WriteTransaction) -> Result<(), redb::Error> {
    let live = {
        let mut log = txn.open_table(PUBLISHED_LOG)?;
        let mut live: HashMap<[u8; 16], [u8; 16]> = HashMap::new();
        while let Some((_, row)) = log.pop_first()? {
            fold(row.value(), &mut live);
        }
        live
    };
    let n = live.len() as u64;
    write_rows(txn, live.into_iter().map(|(d, h)| (d, Some(h))))?;
    let mut counters = txn.open_table(LOG_COUNTERS)?;
    counters.insert(LOG_ENTRIES, n)?;
    counters.insert(LIVE_AT_COMPACTION, n)?;
    Ok(())
}

/// Applies one row's changes to `live`. A torn last entry cannot happen
/// (rows are written whole in a transaction); a short one is ignored.
fn fold(row: &[u8], live: &mut HashMap<[u8; 16], [u8; 16]>) {
    for entry in row.chunks_exact(ENTRY_LEN) {
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

/// The live state: the log replayed.
pub(super) fn load(txn: &redb::ReadTransaction) -> Result<Vec<PublishedEntry>, TxnError> {
    let mut live = HashMap::new();
    if let Some(t) = open_or_empty!(txn, PUBLISHED_LOG) {
        for item in t.iter()? {
            let (row, bytes) = item?;
            if bytes.value().len() % ENTRY_LEN != 0 {
                return Err(TxnError::Corrupt(format!(
                    "gov_published_log row {} is {} bytes, not a multiple of {ENTRY_LEN}",
                    row.value(),
                    bytes.value().len()
                )));
            }
            fold(bytes.value(), &mut live);
        }
    }
    Ok(live.into_iter().collect())
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
