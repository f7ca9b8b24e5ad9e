//! The redb tables and the byte layout of the per-target state row.
//!
//! Layout choice: one outbox table per target (`outbox:<target>`, key `u64` seq,
//! value the encoded event) rather than one table keyed by `(target, seq)`:
//! keys stay 8 fixed-width bytes (denser pages, cheaper comparisons than a
//! length-prefixed string plus integer), a target's range is simply the whole
//! table, so reads and acks need no prefix bounds, one target's churn never
//! rewrites pages holding another's entries, and a target removed from the
//! configuration can later be dropped with one `delete_table`.

use redb::TableDefinition;

/// target name → [`TargetState`] bytes. Every target that ever had an outbox or stats.
pub(crate) const TARGETS: TableDefinition<&str, &[u8]> = TableDefinition::new("targets");
/// Operator-visible metadata (system_id, slot, database, ...).
pub(crate) const META: TableDefinition<&str, &str> = TableDefinition::new("meta");
/// Internal counters; currently only [`CHECKPOINT_KEY`].
pub(crate) const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("counters");
pub(crate) const CHECKPOINT_KEY: &str = "checkpoint";

pub(crate) fn outbox_table_name(target: &str) -> String {
    format!("outbox:{target}")
}

pub(crate) fn outbox_table(name: &str) -> TableDefinition<'_, u64, &'static [u8]> {
    TableDefinition::new(name)
}

/// Bookkeeping of one target, kept in one row so `backlog` and `target_stats`
/// are a single point lookup rather than a scan of the outbox.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct TargetState {
    /// Last sequence number handed out; the next append gets `last_seq + 1`.
    /// Kept here (not derived from the outbox's last key) because a fully
    /// acknowledged outbox is empty but must not reuse sequence numbers.
    pub last_seq: u64,
    /// Entries currently in the outbox.
    pub backlog: u64,
    pub delivered_total: u64,
    /// 0 when nothing was delivered yet (sequence numbers start at 1).
    pub last_delivered_seq: u64,
    /// Microseconds since the Unix epoch; `None` when nothing was delivered yet.
    pub last_delivered_at_micros: Option<i64>,
    pub last_error: Option<String>,
}

const VERSION: u8 = 1;
const FIXED_LEN: usize = 1 + 8 * 4 + 1 + 8 + 1;

impl TargetState {
    pub fn encode(&self) -> Vec<u8> {
        let err = self.last_error.as_deref().unwrap_or("");
        let mut out = Vec::with_capacity(FIXED_LEN + err.len());
        out.push(VERSION);
        out.extend_from_slice(&self.last_seq.to_le_bytes());
        out.extend_from_slice(&self.backlog.to_le_bytes());
        out.extend_from_slice(&self.delivered_total.to_le_bytes());
        out.extend_from_slice(&self.last_delivered_seq.to_le_bytes());
        out.push(self.last_delivered_at_micros.is_some() as u8);
        out.extend_from_slice(&self.last_delivered_at_micros.unwrap_or(0).to_le_bytes());
        out.push(self.last_error.is_some() as u8);
        out.extend_from_slice(err.as_bytes());
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<TargetState, String> {
        if bytes.len() < FIXED_LEN {
            return Err(format!(
                "target state row is {} bytes, expected at least {FIXED_LEN}",
                bytes.len()
            ));
        }
        if bytes[0] != VERSION {
            return Err(format!("target state row has unknown version {}", bytes[0]));
        }
        let u64_at = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&bytes[i..i + 8]);
            u64::from_le_bytes(b)
        };
        let has_at = bytes[33] != 0;
        let at = u64_at(34) as i64;
        let has_err = bytes[42] != 0;
        let last_error = if has_err {
            Some(
                std::str::from_utf8(&bytes[FIXED_LEN..])
                    .map_err(|_| "target state row has a last error that is not UTF-8".to_string())?
                    .to_string(),
            )
        } else {
            None
        };
        Ok(TargetState {
            last_seq: u64_at(1),
            backlog: u64_at(9),
            delivered_total: u64_at(17),
            last_delivered_seq: u64_at(25),
            last_delivered_at_micros: has_at.then_some(at),
            last_error,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_state_round_trips() {
        let states = [
            TargetState::default(),
            TargetState {
                last_seq: u64::MAX,
                backlog: 3,
                delivered_total: 99,
                last_delivered_seq: 7,
                last_delivered_at_micros: Some(-5),
                last_error: Some("HTTP 503 from https://wms/: busy ünïcode".into()),
            },
            TargetState {
                last_error: Some(String::new()),
                last_delivered_at_micros: Some(0),
                ..Default::default()
            },
        ];
        for s in states {
            assert_eq!(TargetState::decode(&s.encode()).unwrap(), s);
        }
    }

    #[test]
    fn truncated_or_unknown_rows_are_errors() {
        let bytes = TargetState::default().encode();
        assert!(TargetState::decode(&bytes[..10]).is_err());
        let mut v = bytes.clone();
        v[0] = 9;
        assert!(TargetState::decode(&v).is_err());
    }
}
