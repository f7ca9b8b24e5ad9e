//! Quarantined records: one row per (entity, key) that failed a validation
//! rule or claimed a business key already held, with the rule, a message for
//! the operator and the document that was withheld. Written through
//! [`super::governance::GovDelta`]; read here with the rest of the governance
//! state ([`super::GovernanceState::load_governance`]).

use redb::{ReadTransaction, ReadableTable, TableDefinition};

use super::tables::open_or_empty;
use super::TxnError;
use steward_core::state::QuarantineEntry;

/// `entity \0 key` → JSON [`QuarantineEntry`].
pub(crate) const QUARANTINE: TableDefinition<&str, &[u8]> = TableDefinition::new("quarantine");

/// Every quarantined record, by entity then key.
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
