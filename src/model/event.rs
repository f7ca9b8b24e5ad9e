//! The event contract every target receives, whatever its type.

use serde::{Deserialize, Serialize};

use super::Lsn;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventOp {
    Upsert,
    Delete,
}

impl EventOp {
    pub fn as_str(self) -> &'static str {
        match self {
            EventOp::Upsert => "upsert",
            EventOp::Delete => "delete",
        }
    }
}

/// What happened to the source row, for envelopes that tell creates from
/// updates (Debezium's `op`). Absent for events made by steward itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceChange {
    Insert,
    Update,
    Delete,
    /// A row read by an initial snapshot.
    Snapshot,
}

/// One change of one entity record, as stored in a target's outbox and delivered.
///
/// `id` is derived from the source position only (commit LSN and the change's
/// index in its transaction), so a replay after a crash produces the same id
/// and a target can de-duplicate on it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub id: String,
    pub entity: String,
    /// The key columns' values; composite keys joined by `|` with `\` escaping.
    pub key: String,
    pub op: EventOp,
    /// Commit LSN of the source transaction: monotonic per key.
    pub version: u64,
    /// Commit time, RFC 3339 UTC.
    pub time: String,
    pub data: serde_json::Value,
    /// The source row change (insert, update, delete, snapshot read), when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub change: Option<SourceChange>,
    /// The source transaction id (PostgreSQL xid), when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_id: Option<u32>,
}

impl Event {
    /// The id of the change at `index` in the transaction committed at `commit_lsn`.
    pub fn source_id(commit_lsn: Lsn, index: u32) -> String {
        format!("{:016X}-{:08X}", commit_lsn.0, index)
    }
}

/// Joins key component texts so that different keys never collide:
/// `\` and `|` inside a component are escaped with `\`.
pub fn join_key<'a>(parts: impl IntoIterator<Item = &'a str>) -> String {
    let mut out = String::new();
    for (i, part) in parts.into_iter().enumerate() {
        if i > 0 {
            out.push('|');
        }
        for c in part.chars() {
            if c == '|' || c == '\\' {
                out.push('\\');
            }
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn composite_keys_are_unambiguous() {
        assert_eq!(join_key(["7"]), "7");
        assert_eq!(join_key(["1", "2"]), "1|2");
        assert_ne!(join_key(["a|b", "c"]), join_key(["a", "b|c"]));
        assert_eq!(join_key(["a|b", "c\\"]), "a\\|b|c\\\\");
    }

    #[test]
    fn ids_are_fixed_width_and_ordered() {
        let a = Event::source_id(Lsn(0x16B3748), 1);
        let b = Event::source_id(Lsn(0x16B3748), 2);
        let c = Event::source_id(Lsn(0x1_0000_0000), 0);
        assert_eq!(a, "00000000016B3748-00000001");
        assert!(a < b && b < c);
    }
}
