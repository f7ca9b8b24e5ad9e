//! Quarantined records: one row per (entity, key) that failed a validation
//! rule or claimed a business key already held, with the rule, a message for
//! the operator and the document that was withheld. Written through
//! [`super::governance::GovDelta`]; read here for the CLI and at start-up.

use redb::{ReadTransaction, ReadableTable, TableDefinition};

use super::tables::{join, open_or_empty};
use super::{Store, StoreError, TxnError};
use steward_core::state::QuarantineEntry;

/// `entity \0 key` → JSON [`QuarantineEntry`].
pub(crate) const QUARANTINE: TableDefinition<&str, &[u8]> = TableDefinition::new("quarantine");

pub(super) fn read_all(txn: &ReadTransaction) -> Result<Vec<QuarantineEntry>, TxnError> {
    let mut out = Vec::new();
    if let Some(t) = open_or_empty!(txn, QUARANTINE) {
        for item in t.iter()? {
            let (k, v) = item?;
            let entry: QuarantineEntry = serde_json::from_slice(v.value())
                .map_err(|e| TxnError::Corrupt(format!("quarantine entry {:?}: {e}", k.value())))?;
            out.push(entry);
        }
    }
    Ok(out)
}

impl Store {
    /// Every quarantined record, by entity then key.
    pub fn quarantine_list(&self) -> Result<Vec<QuarantineEntry>, StoreError> {
        self.read(read_all)
    }

    pub fn quarantine_get(
        &self,
        entity: &str,
        key: &str,
    ) -> Result<Option<QuarantineEntry>, StoreError> {
        self.read(|txn| {
            let Some(t) = open_or_empty!(txn, QUARANTINE) else {
                return Ok(None);
            };
            let k = join(&[entity, key]);
            let found = match t.get(k.as_str())? {
                Some(v) => serde_json::from_slice(v.value())
                    .map(Some)
                    .map_err(|e| TxnError::Corrupt(format!("quarantine entry {k:?}: {e}"))),
                None => Ok(None),
            };
            found
        })
    }
}
