//! CloudEvents 1.0 JSON: one event, or a batch (`application/cloudevents-batch+json`,
//! the body of an HTTP target's request).
//!
//! Events are serialized straight from borrowed views of [`Event`] into one
//! buffer: a batch may hold thousands of events, and building a
//! `serde_json::Value` per event first would double the work and the memory.
//! `data` is copied as the JSON text the governance wrote (with
//! `arbitrary_precision`), so numbers keep the exact text they had in the
//! source (numeric columns).
//!
//! Written here rather than with the `cloudevents-sdk` crate: its event type
//! owns its data as a `serde_json::Value` and would mean one more copy and
//! parse of every document, and steward needs only the structured JSON form.

use steward_core::model::{json, Event};

/// The media type of a CloudEvents JSON batch.
pub(crate) const BATCH_CONTENT_TYPE: &str = "application/cloudevents-batch+json";

/// One event in CloudEvents JSON form, written by hand: serde's derived
/// serializer escapes every key and value byte by byte, and with it serde
/// takes about a tenth of steward's instructions on the product-insert
/// workload (`STEWARD_BENCH_WRAPPER="valgrind --tool=callgrind" cargo bench
/// --bench e2e -- W1`). The output is byte for byte what the derived form
/// (kept in the tests as the reference) writes.
///
/// Extension attributes (`entity`, `op`, `version`) are strings because the
/// CloudEvents type system has no 64-bit integer: a JSON number would lose
/// precision in consumers that read numbers as doubles.
fn write_cloud_event(event: &Event, source: &str, out: &mut Vec<u8>) {
    let op = event.op.as_str();
    out.push(b'{');
    json::write_key(out, "specversion", true);
    out.extend_from_slice(b"\"1.0\"");
    json::write_key(out, "id", false);
    json::write_str(out, &event.id);
    json::write_key(out, "source", false);
    json::write_str(out, source);
    json::write_key(out, "type", false);
    if json::is_plain(&event.entity) {
        out.extend_from_slice(b"\"steward.");
        out.extend_from_slice(event.entity.as_bytes());
        out.push(b'.');
        out.extend_from_slice(op.as_bytes());
        out.push(b'"');
    } else {
        json::write_str(out, &format!("steward.{}.{op}", event.entity));
    }
    json::write_key(out, "subject", false);
    json::write_str(out, &event.key);
    json::write_key(out, "time", false);
    json::write_str(out, &event.time);
    json::write_key(out, "datacontenttype", false);
    out.extend_from_slice(b"\"application/json\"");
    json::write_key(out, "entity", false);
    json::write_str(out, &event.entity);
    json::write_key(out, "op", false);
    json::write_str(out, op);
    json::write_key(out, "version", false);
    out.push(b'"');
    json::write_int(out, event.version);
    out.push(b'"');
    json::write_key(out, "data", false);
    out.extend_from_slice(event.data.as_str().as_bytes());
    out.push(b'}');
}

/// Serializes `events` as one CloudEvents JSON batch into `out` (appending).
pub(crate) fn write_batch(events: &[Event], source: &str, out: &mut Vec<u8>) {
    out.push(b'[');
    for (i, event) in events.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_cloud_event(event, source, out);
    }
    out.push(b']');
}

/// Serializes one event in CloudEvents JSON form into `out` (appending):
/// the per-message form used by the NATS and file targets.
pub(crate) fn write_event(event: &Event, source: &str, out: &mut Vec<u8>) {
    write_cloud_event(event, source, out);
}

#[cfg(test)]
mod tests {
    use super::*;
    use steward_core::model::EventOp;

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
        write_batch(&events, "steward://slot1", &mut buf);
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
        write_batch(&[], "steward://s", &mut buf);
        assert_eq!(buf, b"[]");
    }

    /// serde's derived form of the envelope: the bytes the hand-written one must match.
    #[derive(serde::Serialize)]
    struct Reference<'a> {
        specversion: &'static str,
        id: &'a str,
        source: &'a str,
        #[serde(rename = "type")]
        ty: String,
        subject: &'a str,
        time: &'a str,
        datacontenttype: &'static str,
        entity: &'a str,
        op: &'static str,
        version: String,
        data: &'a steward_core::model::EventData,
    }

    fn reference(e: &Event, source: &str) -> Reference<'static> {
        let e: &'static Event = Box::leak(Box::new(e.clone()));
        let source: &'static str = Box::leak(source.to_string().into_boxed_str());
        Reference {
            specversion: "1.0",
            id: &e.id,
            source,
            ty: format!("steward.{}.{}", e.entity, e.op.as_str()),
            subject: &e.key,
            time: &e.time,
            datacontenttype: "application/json",
            entity: &e.entity,
            op: e.op.as_str(),
            version: e.version.to_string(),
            data: &e.data,
        }
    }

    #[test]
    fn output_is_byte_for_byte_the_derived_serializers() {
        let mut odd = event("id \"quoted\"\n", EventOp::Delete, r#"{"a": [1, "x\ty"]}"#);
        odd.entity = "pro\\duct\u{1}".into();
        odd.key = "ключ|\t".into();
        odd.version = 0;
        let events = vec![
            event(
                "00000000016B3748-00000001",
                EventOp::Upsert,
                r#"{"p": 1.50}"#,
            ),
            odd,
        ];
        for source in ["steward://slot1", "steward://\"odd\""] {
            let mut batch = Vec::new();
            write_batch(&events, source, &mut batch);
            let expected: Vec<Reference> = events.iter().map(|e| reference(e, source)).collect();
            assert_eq!(
                String::from_utf8(batch).unwrap(),
                serde_json::to_string(&expected).unwrap()
            );
            for e in &events {
                let mut one = Vec::new();
                write_event(e, source, &mut one);
                assert_eq!(
                    String::from_utf8(one).unwrap(),
                    serde_json::to_string(&reference(e, source)).unwrap()
                );
            }
        }
    }
}
