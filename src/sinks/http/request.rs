//! The request body: a CloudEvents 1.0 JSON batch (`application/cloudevents-batch+json`).
//!
//! Events are serialized straight from borrowed views of [`Event`] into one
//! buffer: a batch may hold thousands of events, and building a
//! `serde_json::Value` per event first would double the work and the memory.
//! `data` is copied as the JSON text the governor wrote (with
//! `arbitrary_precision`), so numbers keep the exact text they had in the
//! source (numeric columns).

use std::fmt;

use serde::{Serialize, Serializer};

use crate::model::{Event, EventData};

/// The media type of a CloudEvents JSON batch.
pub const BATCH_CONTENT_TYPE: &str = "application/cloudevents-batch+json";

/// One event in CloudEvents JSON form, borrowing everything from the [`Event`].
///
/// Extension attributes (`entity`, `op`, `version`) are strings because the
/// CloudEvents type system has no 64-bit integer: a JSON number would lose
/// precision in consumers that read numbers as doubles.
#[derive(Serialize)]
struct CloudEvent<'a> {
    specversion: &'static str,
    id: &'a str,
    source: &'a str,
    #[serde(rename = "type")]
    ty: EventType<'a>,
    subject: &'a str,
    time: &'a str,
    datacontenttype: &'static str,
    entity: &'a str,
    op: &'static str,
    #[serde(serialize_with = "as_decimal_string")]
    version: u64,
    data: &'a EventData,
}

/// `steward.<entity>.<op>`, written without allocating.
struct EventType<'a> {
    entity: &'a str,
    op: &'static str,
}

impl fmt::Display for EventType<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "steward.{}.{}", self.entity, self.op)
    }
}

impl Serialize for EventType<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

fn as_decimal_string<S: Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

impl<'a> CloudEvent<'a> {
    fn new(event: &'a Event, source: &'a str) -> Self {
        let op = event.op.as_str();
        CloudEvent {
            specversion: "1.0",
            id: &event.id,
            source,
            ty: EventType {
                entity: &event.entity,
                op,
            },
            subject: &event.key,
            time: &event.time,
            datacontenttype: "application/json",
            entity: &event.entity,
            op,
            version: event.version,
            data: &event.data,
        }
    }
}

/// A JSON array streamed from a slice without collecting views first.
struct Batch<'a> {
    events: &'a [Event],
    source: &'a str,
}

impl Serialize for Batch<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.events.iter().map(|e| CloudEvent::new(e, self.source)))
    }
}

/// Serializes `events` as one CloudEvents JSON batch into `out` (appending).
///
/// Fails only if a `data` value cannot be written as JSON (e.g. a
/// `serde_json::Value` holding an invalid arbitrary-precision number), which
/// would be a bug upstream; the error says which.
pub fn write_batch(
    events: &[Event],
    source: &str,
    out: &mut Vec<u8>,
) -> Result<(), serde_json::Error> {
    serde_json::to_writer(out, &Batch { events, source })
}

/// Serializes one event in CloudEvents JSON form into `out` (appending):
/// the per-message form used by the NATS and file targets.
pub fn write_event(
    event: &Event,
    source: &str,
    out: &mut Vec<u8>,
) -> Result<(), serde_json::Error> {
    serde_json::to_writer(out, &CloudEvent::new(event, source))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::EventOp;

    fn event(id: &str, op: EventOp, data: &str) -> Event {
        Event {
            change: None,
            tx_id: None,
            id: id.to_string(),
            entity: "product".to_string(),
            key: "a\\|b|7".to_string(),
            op,
            version: u64::MAX,
            time: "2024-05-01T12:00:00.123456Z".to_string(),
            data: serde_json::from_str(data).expect("test data is JSON"),
        }
    }

    #[test]
    fn batch_has_every_attribute_and_exact_numbers() {
        let events = vec![
            event(
                "00000000016B3748-00000001",
                EventOp::Upsert,
                r#"{"price": 12345678901234567890.123456789, "n": 0.10}"#,
            ),
            event("00000000016B3748-00000002", EventOp::Delete, "null"),
        ];
        let mut buf = Vec::new();
        write_batch(&events, "steward://slot1", &mut buf).expect("serializes");
        let text = std::str::from_utf8(&buf).expect("utf-8");
        // Exact number text survives (no f64 round trip).
        assert!(text.contains("12345678901234567890.123456789"), "{text}");
        assert!(text.contains("0.10"), "{text}");

        let parsed: Vec<serde_json::Value> = serde_json::from_slice(&buf).expect("valid JSON");
        assert_eq!(parsed.len(), 2);
        let first = &parsed[0];
        assert_eq!(first["specversion"], "1.0");
        assert_eq!(first["id"], "00000000016B3748-00000001");
        assert_eq!(first["source"], "steward://slot1");
        assert_eq!(first["type"], "steward.product.upsert");
        assert_eq!(first["subject"], "a\\|b|7");
        assert_eq!(first["time"], "2024-05-01T12:00:00.123456Z");
        assert_eq!(first["datacontenttype"], "application/json");
        assert_eq!(first["entity"], "product");
        assert_eq!(first["op"], "upsert");
        assert_eq!(first["version"], u64::MAX.to_string());
        assert_eq!(parsed[1]["type"], "steward.product.delete");
        assert!(parsed[1]["data"].is_null());
    }

    #[test]
    fn empty_batch_is_an_empty_array() {
        let mut buf = Vec::new();
        write_batch(&[], "steward://s", &mut buf).expect("serializes");
        assert_eq!(buf, b"[]");
    }
}
