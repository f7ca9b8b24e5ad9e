//! The audit trail: every governance decision (delivered, gated,
//! unpublished, quarantined, released, suppressed, redacted, not routed), in
//! order. Pruned by age ([`Store::audit_prune`], `state.audit_retention_days`).
//!
//! Records are stored in chunks, like the outbox (see `tables`): one redb row
//! per commit (up to `CHUNK_MAX_EVENTS` records), keyed by the sequence
//! number of its first record. One row per record costs a B-tree insert per
//! delivered event, about a tenth of steward's CPU on the product-insert
//! workload (perf on `cargo bench --bench e2e -- W1`). Records
//! are appended in time order, so pruning drops whole chunks from the front.

use redb::{ReadableTable, TableDefinition, WriteTransaction};

use super::tables::open_or_empty;
use super::tables::{chunk_events, chunk_len, encode_chunk, next_chunk};
use super::{Store, StoreError, TxnError};
use steward_core::state::AuditRecord;

/// first seq → chunk of JSON [`AuditRecord`]s.
pub(crate) const AUDIT_LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("audit_log");

/// Filters for [`Store::audit_query`].
#[derive(Clone, Debug, Default)]
pub struct AuditFilter {
    /// Only records of this entity.
    pub entity: Option<String>,
    /// Only records of this key.
    pub key: Option<String>,
    /// Only records at or after this time, µs since the Unix epoch.
    pub since_micros: Option<i64>,
    /// Only records before this time, µs since the Unix epoch.
    pub until_micros: Option<i64>,
    /// Only decisions about this target (records without one never match).
    pub target: Option<String>,
    /// Only this decision (`released`, `dlq_replayed`, ...).
    pub decision: Option<String>,
    /// Only actions of this user.
    pub user: Option<String>,
    /// At most this many records, the newest ones.
    pub limit: Option<usize>,
}

impl AuditFilter {
    fn matches(&self, r: &AuditRecord) -> bool {
        let differs = |want: &Option<String>, have: Option<&str>| {
            want.as_deref().is_some_and(|w| Some(w) != have)
        };
        !(differs(&self.entity, Some(&r.entity))
            || differs(&self.key, Some(&r.key))
            || differs(&self.target, r.target.as_deref())
            || differs(&self.decision, Some(&r.decision))
            || differs(&self.user, r.user.as_deref())
            || self.since_micros.is_some_and(|s| r.time_micros < s)
            || self.until_micros.is_some_and(|u| r.time_micros >= u))
    }
}

/// Appends records (already JSON-encoded, in order) inside `txn`.
#[allow(clippy::result_large_err)] // redb's own error type, boxed by the caller
pub(super) fn append(txn: &WriteTransaction, records: &[&[u8]]) -> Result<(), redb::Error> {
    if records.is_empty() {
        return Ok(());
    }
    let mut log = txn.open_table(AUDIT_LOG)?;
    let mut next = match log.last()? {
        Some((first, chunk)) => first.value() + chunk_len(chunk.value()).unwrap_or(0),
        None => 1,
    };
    let mut rest = records;
    while !rest.is_empty() {
        let (n, bytes) = next_chunk(rest.iter().map(|r| r.len()));
        let mut chunk = Vec::with_capacity(bytes);
        encode_chunk(rest[..n].iter().copied(), &mut chunk);
        log.insert(next, chunk.as_slice())?;
        next += n as u64;
        rest = &rest[n..];
    }
    Ok(())
}

fn decode(first: u64, chunk: &[u8]) -> Result<Vec<AuditRecord>, TxnError> {
    let corrupt = |detail: String| TxnError::Corrupt(format!("audit chunk at {first}: {detail}"));
    chunk_events(chunk)
        .map_err(corrupt)?
        .into_iter()
        .enumerate()
        .map(|(i, bytes)| {
            serde_json::from_slice(bytes)
                .map_err(|e| corrupt(format!("record {}: {e}", first + i as u64)))
        })
        .collect()
}

impl Store {
    /// Matching records, oldest first (the last `limit` when limited).
    pub fn audit_query(&self, filter: &AuditFilter) -> Result<Vec<AuditRecord>, StoreError> {
        self.read(|txn| {
            // With a limit only the newest matches are kept as the log is
            // read, so a broad query over a long log stays small.
            let mut out = std::collections::VecDeque::new();
            let Some(t) = open_or_empty!(txn, AUDIT_LOG) else {
                return Ok(Vec::new());
            };
            for item in t.iter()? {
                let (first, chunk) = item?;
                for r in decode(first.value(), chunk.value())? {
                    if filter.matches(&r) {
                        if filter.limit.is_some_and(|l| out.len() >= l) {
                            out.pop_front();
                        }
                        if filter.limit != Some(0) {
                            out.push_back(r);
                        }
                    }
                }
            }
            Ok(out.into())
        })
    }

    /// The records of one record (`entity`, `key`), newest first, handed
    /// to `visit` until it returns `false`. Reads the log from its end and
    /// decodes only records whose bytes name the record, so a recent
    /// record's history costs little however long the log is.
    pub fn audit_of_record(
        &self,
        entity: &str,
        key: &str,
        visit: &mut dyn FnMut(AuditRecord) -> bool,
    ) -> Result<(), StoreError> {
        // The encoder writes `"entity":…,"key":…` side by side, escaped as
        // serde_json escapes (see `governance::write_audit_record`).
        let needle = format!(
            "\"entity\":{},\"key\":{},",
            serde_json::Value::from(entity),
            serde_json::Value::from(key)
        );
        let needle = needle.as_bytes();
        self.read(|txn| {
            let Some(t) = open_or_empty!(txn, AUDIT_LOG) else {
                return Ok(());
            };
            for item in t.iter()?.rev() {
                let (first, chunk) = item?;
                let first = first.value();
                let corrupt =
                    |detail: String| TxnError::Corrupt(format!("audit chunk at {first}: {detail}"));
                let records = chunk_events(chunk.value()).map_err(corrupt)?;
                for (i, bytes) in records.iter().enumerate().rev() {
                    if !bytes.windows(needle.len()).any(|w| w == needle) {
                        continue;
                    }
                    let r: AuditRecord = serde_json::from_slice(bytes)
                        .map_err(|e| corrupt(format!("record {}: {e}", first + i as u64)))?;
                    if r.entity == entity && r.key == key && !visit(r) {
                        return Ok(());
                    }
                }
            }
            Ok(())
        })
    }

    /// Appends records of actions taken outside a source commit (a dead
    /// letter replayed, a reset, a backup), durably, in one transaction.
    pub fn audit_append(&self, records: &[AuditRecord]) -> Result<(), StoreError> {
        let encoded: Vec<Vec<u8>> = records
            .iter()
            .map(super::governance::encode_audit_record)
            .collect();
        let encoded: Vec<&[u8]> = encoded.iter().map(Vec::as_slice).collect();
        self.write(redb::Durability::Immediate, |txn| {
            append(txn, &encoded).map_err(|e| TxnError::Redb(Box::new(e)))
        })
    }

    /// Removes records older than `before_micros`; returns how many. A chunk
    /// goes once its newest record is old, so a few records may outlive the
    /// retention by the time one commit spans.
    pub fn audit_prune(&self, before_micros: i64) -> Result<usize, StoreError> {
        let removed = self.write(redb::Durability::Immediate, |txn| {
            let mut t = txn.open_table(AUDIT_LOG)?;
            let mut old = Vec::new();
            let mut count = 0;
            for item in t.iter()? {
                let (first, chunk) = item?;
                let first = first.value();
                // A chunk that cannot be read is dropped with the old ones
                // rather than blocking pruning forever.
                let newest = decode(first, chunk.value())
                    .ok()
                    .and_then(|records| records.last().map(|r| r.time_micros));
                match newest {
                    Some(t) if t >= before_micros => break,
                    _ => {
                        old.push(first);
                        count += chunk_len(chunk.value()).unwrap_or(0) as usize;
                    }
                }
            }
            for k in &old {
                t.remove(*k)?;
            }
            Ok(count)
        })?;
        Ok(removed)
    }
}
