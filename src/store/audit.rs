//! The audit trail: an append-only table of every governance decision
//! (delivered, gated, unpublished, quarantined, released, suppressed,
//! redacted, not routed), keyed by a sequence number so that records keep
//! their order. Pruned by age ([`Store::audit_prune`], `state.audit_retention_days`).

use redb::{ReadableTable, TableDefinition, TableError};

use super::governance::{open_or_empty, AuditRecord};
use super::{Store, StoreError, TxnError};

/// seq → JSON [`AuditRecord`].
pub(crate) const AUDIT: TableDefinition<u64, &[u8]> = TableDefinition::new("audit");

/// Filters for [`Store::audit_query`].
#[derive(Clone, Debug, Default)]
pub struct AuditFilter {
    pub entity: Option<String>,
    pub key: Option<String>,
    /// Microseconds since the Unix epoch.
    pub since_micros: Option<i64>,
    pub limit: Option<usize>,
}

impl Store {
    /// Matching records, oldest first (the last `limit` when limited).
    pub fn audit_query(&self, filter: &AuditFilter) -> Result<Vec<AuditRecord>, StoreError> {
        self.read(|txn| {
            let mut out = Vec::new();
            let Some(t) = open_or_empty!(txn, AUDIT) else {
                return Ok(out);
            };
            for item in t.iter()? {
                let (k, v) = item?;
                let r: AuditRecord = serde_json::from_slice(v.value())
                    .map_err(|e| TxnError::Corrupt(format!("audit record {}: {e}", k.value())))?;
                if filter.entity.as_ref().is_some_and(|e| *e != r.entity)
                    || filter.key.as_ref().is_some_and(|k| *k != r.key)
                    || filter.since_micros.is_some_and(|s| r.time_micros < s)
                {
                    continue;
                }
                out.push(r);
            }
            if let Some(limit) = filter.limit {
                let skip = out.len().saturating_sub(limit);
                out.drain(..skip);
            }
            Ok(out)
        })
    }

    /// Removes records older than `before_micros`; returns how many.
    pub fn audit_prune(&self, before_micros: i64) -> Result<usize, StoreError> {
        let removed = self.write(redb::Durability::Immediate, |txn| {
            let mut t = txn.open_table(AUDIT)?;
            let mut old = Vec::new();
            for item in t.iter()? {
                let (k, v) = item?;
                // Records are appended in time order: stop at the first young one.
                match serde_json::from_slice::<AuditRecord>(v.value()) {
                    Ok(r) if r.time_micros < before_micros => old.push(k.value()),
                    Ok(_) => break,
                    Err(_) => old.push(k.value()),
                }
            }
            for k in &old {
                t.remove(*k)?;
            }
            Ok(old.len())
        })?;
        Ok(removed)
    }
}
