//! The event contract every target receives, whatever its type.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::Lsn;

/// What a target does with the record: store the document, or remove the key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventOp {
    /// The record exists (again) as `data` holds it.
    Upsert,
    /// The record is gone for the target: deleted at the source, or no
    /// longer published; `data` holds its key fields only.
    Delete,
}

impl EventOp {
    /// `upsert` or `delete`, as serialized.
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
    /// A row inserted.
    Insert,
    /// A row updated.
    Update,
    /// A row deleted.
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
    /// Unique per change and stable across replays (see above).
    pub id: String,
    /// The entity's name (`[entities.NAME]`).
    pub entity: String,
    /// The key columns' values; composite keys joined by `|` with `\` escaping.
    pub key: String,
    /// Upsert or delete.
    pub op: EventOp,
    /// Commit LSN of the source transaction: monotonic per key.
    pub version: u64,
    /// Commit time, RFC 3339 UTC.
    pub time: String,
    /// The document the target receives (for a delete, the key fields).
    /// Null in a [`Mapped`](crate::pipeline::Mapped) event, before governance.
    pub data: EventData,
    /// The source row change (insert, update, delete, snapshot read), when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub change: Option<SourceChange>,
    /// The source transaction id (PostgreSQL xid), when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_id: Option<u32>,
}

/// An event's `data` (the mapped fields), held as the JSON text it is
/// stored and delivered as. Governance serialises a document once (its hash
/// needs the bytes anyway); the store, the delivery driver and every sink
/// then copy the text instead of parsing it into a tree and writing it back
/// out, which costs an allocation per field and per event at each step.
/// Shared, not copied: the targets that receive the same document (those
/// whose redaction leaves it as it is) hold one text between them until the
/// store has it, so a commit batch for ten targets does not hold ten copies.
#[derive(Clone)]
pub struct EventData(Arc<serde_json::value::RawValue>);

impl Serialize for EventData {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for EventData {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Box::<serde_json::value::RawValue>::deserialize(deserializer).map(EventData::from_raw)
    }
}

impl EventData {
    pub(crate) fn from_map(map: &serde_json::Map<String, serde_json::Value>) -> EventData {
        EventData::from_raw_result(serde_json::value::to_raw_value(map))
    }

    pub(crate) fn from_value(value: &serde_json::Value) -> EventData {
        EventData::from_raw_result(serde_json::value::to_raw_value(value))
    }

    /// `to_raw_value` wraps the text it just wrote without parsing it again,
    /// as `RawValue::from_string` would.
    /// Writing a `Value` fails only for a number that is not JSON, which the
    /// value conversion never produces (non-finite numbers become strings):
    /// a bug, reported loudly rather than stopping delivery.
    fn from_raw_result(
        raw: Result<Box<serde_json::value::RawValue>, serde_json::Error>,
    ) -> EventData {
        match raw {
            Ok(raw) => EventData::from_raw(raw),
            Err(e) => {
                tracing::error!(error = %e, "cannot write an event's data as JSON; it is delivered as null");
                EventData::null()
            }
        }
    }

    /// JSON text already checked, e.g. read back from the store.
    pub fn from_raw(raw: Box<serde_json::value::RawValue>) -> EventData {
        EventData(Arc::from(raw))
    }

    pub(crate) fn null() -> EventData {
        EventData::from_raw(serde_json::value::RawValue::NULL.to_owned())
    }

    /// The JSON text.
    pub fn as_str(&self) -> &str {
        self.0.get()
    }

    /// Parsed, for tests that look inside.
    #[cfg(test)]
    pub(crate) fn to_value(&self) -> serde_json::Value {
        serde_json::from_str(self.as_str()).unwrap_or(serde_json::Value::Null)
    }
}

impl PartialEq for EventData {
    fn eq(&self, other: &EventData) -> bool {
        self.as_str() == other.as_str()
    }
}

impl std::fmt::Debug for EventData {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<serde_json::Value> for EventData {
    fn from(value: serde_json::Value) -> EventData {
        EventData::from_value(&value)
    }
}

impl Event {
    /// The id of the change at `index` in the transaction committed at `commit_lsn`.
    /// `{lsn:016X}-{index:08X}`, written by hand: at this once-per-event
    /// call `format!` takes about 3% of the consume loop (perf on `cargo
    /// bench --bench e2e -- W1`).
    pub fn source_id(commit_lsn: Lsn, index: u32) -> String {
        let mut out = String::with_capacity(25);
        push_hex(&mut out, commit_lsn.0, 16);
        out.push('-');
        push_hex(&mut out, u64::from(index), 8);
        out
    }
}

/// Appends the low `digits` hexadecimal digits of `value`, upper case,
/// zero-padded: what `{value:0digits$X}` writes for a value that fits, at a
/// fraction of `format!`'s cost on the per-event and per-row ids.
pub(crate) fn push_hex(out: &mut String, value: u64, digits: u32) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for shift in (0..digits).rev() {
        out.push(char::from(HEX[((value >> (4 * shift)) & 0xF) as usize]));
    }
}

/// Joins key component texts so that different keys never collide:
/// `\` and `|` inside a component are escaped with `\`.
pub(crate) fn join_key<'a>(parts: impl IntoIterator<Item = &'a str>) -> String {
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

/// The component texts [`join_key`] joined into `key`.
pub fn split_key(key: &str) -> Vec<String> {
    let mut parts = vec![String::new()];
    let mut chars = key.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let (Some(next), Some(part)) = (chars.next(), parts.last_mut()) {
                    part.push(next);
                }
            }
            '|' => parts.push(String::new()),
            c => {
                if let Some(part) = parts.last_mut() {
                    part.push(c);
                }
            }
        }
    }
    parts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_key_gives_back_the_components() {
        for parts in [vec!["7"], vec!["1", "2"], vec!["a|b", "c\\"], vec!["", "x"]] {
            assert_eq!(split_key(&join_key(parts.iter().copied())), parts);
        }
    }

    #[test]
    fn composite_keys_are_unambiguous() {
        assert_eq!(join_key(["7"]), "7");
        assert_eq!(join_key(["1", "2"]), "1|2");
        assert_ne!(join_key(["a|b", "c"]), join_key(["a", "b|c"]));
        assert_eq!(join_key(["a|b", "c\\"]), "a\\|b|c\\\\");
    }

    #[test]
    fn event_data_keeps_the_exact_json_through_the_outbox_encoding() {
        let data: serde_json::Value =
            serde_json::from_str(r#"{"price":1234.5000,"name":{"en_US":"Desk"},"qty":-0.000}"#)
                .unwrap();
        let event = Event {
            id: Event::source_id(Lsn(0x100), 1),
            entity: "product".into(),
            key: "7".into(),
            op: EventOp::Upsert,
            version: 0x100,
            time: "2024-05-01T12:00:00.000Z".into(),
            data: data.clone().into(),
            change: None,
            tx_id: None,
        };
        assert_eq!(
            event.data.as_str(),
            r#"{"price":1234.5000,"name":{"en_US":"Desk"},"qty":-0.000}"#
        );
        let stored = serde_json::to_vec(&event).unwrap();
        let back: Event = serde_json::from_slice(&stored).unwrap();
        assert_eq!(back, event);
        assert_eq!(back.data.to_value(), data);
    }

    #[test]
    fn ids_are_fixed_width_and_ordered() {
        let a = Event::source_id(Lsn(0x16B3748), 1);
        let b = Event::source_id(Lsn(0x16B3748), 2);
        let c = Event::source_id(Lsn(0x1_0000_0000), 0);
        assert_eq!(a, "00000000016B3748-00000001");
        assert!(a < b && b < c);
        assert_eq!(
            Event::source_id(Lsn(u64::MAX - 1), u32::MAX - 5),
            format!("{:016X}-{:08X}", u64::MAX - 1, u32::MAX - 5)
        );
        assert_eq!(
            Event::source_id(Lsn(0xFEDC_BA98_7654_3210), 0x89AB_CDEF),
            "FEDCBA9876543210-89ABCDEF"
        );
    }
}
