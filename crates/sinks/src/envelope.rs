//! Event envelopes: how one [`Event`] is wrapped on the wire.
//!
//! - CloudEvents 1.0 JSON (the default; see `cloudevents`).
//! - Debezium's change-event JSON, for consumers built on Debezium tooling:
//!   `{"before", "after", "source", "op", "ts_ms"}`.
//!
//! Debezium mapping, and why:
//! - `op`: from the source row change: insert → `"c"`, update → `"u"`,
//!   delete → `"d"`, a row of an initial snapshot → `"r"`. An event without
//!   one (made by governance, or coalesced in a batch window from an older
//!   state file) is an upsert → `"u"`. Targets should still apply events
//!   idempotently: a redelivered `"c"` may find the row already there.
//! - `before`: steward keeps no old rows. For deletes it holds what is known,
//!   the key fields (as Debezium does for tables with the default replica
//!   identity); for upserts it is null.
//! - `after`: the event's data; null for deletes.
//! - `source`: `connector` = "steward", `name` = the slot, `version` = steward's
//!   version, `ts_ms` = commit time, `db`/`schema`/`table` = the source table,
//!   `lsn` = commit LSN (the event's version), `txId` = the source
//!   transaction id (null for snapshot rows and governance events), plus
//!   steward's own `entity`, `key` and `event_id` (de-duplicate on `event_id`).
//! - `ts_ms` (top level): when steward encoded the event.

use std::collections::HashMap;

use serde::Serialize;

use crate::cloudevents::{write_batch, write_event, BATCH_CONTENT_TYPE};
use steward_core::config::Config;
use steward_core::model::{Event, EventData, EventOp, SourceChange};

/// How each event is wrapped on the wire (HTTP, NATS and file targets).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) enum Envelope {
    /// CloudEvents 1.0 JSON (structured mode); a JSON array per HTTP batch.
    #[default]
    CloudEvents,
    /// Debezium's change-event JSON (`before`/`after`/`source`/`op`/`ts_ms`).
    Debezium,
}

/// What the envelopes need besides the event: the source's names.
#[derive(Clone, Debug, Default)]
pub(crate) struct EnvelopeContext {
    /// CloudEvents `source`: `steward://<slot>`.
    pub(crate) source: String,
    pub(crate) slot: String,
    pub(crate) db: String,
    /// Entity name → (schema, table) of its source table.
    pub(crate) tables: HashMap<String, (String, String)>,
}

impl EnvelopeContext {
    pub(crate) fn from_config(config: &Config) -> EnvelopeContext {
        EnvelopeContext {
            source: format!("steward://{}", config.source.slot),
            slot: config.source.slot.clone(),
            db: config.source.dbname.clone(),
            tables: config
                .entities
                .iter()
                .map(|e| (e.name.clone(), (e.schema.clone(), e.table.clone())))
                .collect(),
        }
    }
}

#[derive(Serialize)]
struct DebeziumSource<'a> {
    version: &'static str,
    connector: &'static str,
    name: &'a str,
    ts_ms: i64,
    snapshot: &'static str,
    db: &'a str,
    schema: &'a str,
    table: &'a str,
    #[serde(rename = "txId")]
    tx_id: Option<u32>,
    lsn: u64,
    entity: &'a str,
    key: &'a str,
    event_id: &'a str,
}

#[derive(Serialize)]
struct Debezium<'a> {
    before: Option<&'a EventData>,
    after: Option<&'a EventData>,
    source: DebeziumSource<'a>,
    op: &'static str,
    ts_ms: i64,
}

fn commit_ms(time: &str) -> i64 {
    chrono::DateTime::parse_from_rfc3339(time)
        .map(|t| t.timestamp_millis())
        .unwrap_or(0)
}

fn debezium<'a>(event: &'a Event, ctx: &'a EnvelopeContext, now_ms: i64) -> Debezium<'a> {
    let (schema, table) = ctx
        .tables
        .get(&event.entity)
        .map(|(s, t)| (s.as_str(), t.as_str()))
        .unwrap_or(("", event.entity.as_str()));
    let (before, after, op) = match (event.op, event.change) {
        (EventOp::Delete, _) => (Some(&event.data), None, "d"),
        (EventOp::Upsert, Some(SourceChange::Insert)) => (None, Some(&event.data), "c"),
        (EventOp::Upsert, Some(SourceChange::Snapshot)) => (None, Some(&event.data), "r"),
        (EventOp::Upsert, _) => (None, Some(&event.data), "u"),
    };
    Debezium {
        before,
        after,
        source: DebeziumSource {
            version: env!("CARGO_PKG_VERSION"),
            connector: "steward",
            name: &ctx.slot,
            ts_ms: commit_ms(&event.time),
            snapshot: if event.change == Some(SourceChange::Snapshot) {
                "true"
            } else {
                "false"
            },
            db: &ctx.db,
            schema,
            table,
            tx_id: event.tx_id,
            lsn: event.version,
            entity: &event.entity,
            key: &event.key,
            event_id: &event.id,
        },
        op,
        ts_ms: now_ms,
    }
}

/// Appends one event in `envelope` form to `out` (no trailing newline).
pub(crate) fn write_one(
    envelope: Envelope,
    event: &Event,
    ctx: &EnvelopeContext,
    out: &mut Vec<u8>,
) -> Result<(), serde_json::Error> {
    match envelope {
        Envelope::CloudEvents => {
            write_event(event, &ctx.source, out);
            Ok(())
        }
        Envelope::Debezium => serde_json::to_writer(
            out,
            &debezium(event, ctx, chrono::Utc::now().timestamp_millis()),
        ),
    }
}

/// Appends the batch as one JSON array of envelopes to `out`.
pub(crate) fn write_array(
    envelope: Envelope,
    events: &[Event],
    ctx: &EnvelopeContext,
    out: &mut Vec<u8>,
) -> Result<(), serde_json::Error> {
    match envelope {
        Envelope::CloudEvents => {
            write_batch(events, &ctx.source, out);
            Ok(())
        }
        Envelope::Debezium => {
            let now = chrono::Utc::now().timestamp_millis();
            let views: Vec<Debezium> = events.iter().map(|e| debezium(e, ctx, now)).collect();
            serde_json::to_writer(out, &views)
        }
    }
}

/// The HTTP content type of a [`write_array`] body.
pub(crate) fn array_content_type(envelope: Envelope) -> &'static str {
    match envelope {
        Envelope::CloudEvents => BATCH_CONTENT_TYPE,
        Envelope::Debezium => "application/json",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use steward_core::model::Lsn;

    fn ctx() -> EnvelopeContext {
        EnvelopeContext {
            source: "steward://s1".into(),
            slot: "s1".into(),
            db: "odoo".into(),
            tables: [(
                "product".to_string(),
                ("public".to_string(), "product_template".to_string()),
            )]
            .into(),
        }
    }

    fn event(op: EventOp, data: &str) -> Event {
        Event {
            change: None,
            tx_id: None,
            id: Event::source_id(Lsn(0x16B3748), 3),
            entity: "product".into(),
            key: "7".into(),
            op,
            version: 0x16B3748,
            time: "2024-05-01T12:00:00.250Z".into(),
            data: serde_json::from_str(data).expect("json"),
        }
    }

    #[test]
    fn debezium_upsert_and_delete_shapes() {
        let mut buf = Vec::new();
        write_one(
            Envelope::Debezium,
            &event(EventOp::Upsert, r#"{"id":7,"price":1.10}"#),
            &ctx(),
            &mut buf,
        )
        .expect("encodes");
        let v: serde_json::Value = serde_json::from_slice(&buf).expect("json");
        assert_eq!(v["op"], "u");
        assert!(v["before"].is_null());
        assert_eq!(v["after"]["id"], 7);
        assert!(
            String::from_utf8_lossy(&buf).contains("1.10"),
            "exact numbers"
        );
        let s = &v["source"];
        assert_eq!(s["connector"], "steward");
        assert_eq!(s["name"], "s1");
        assert_eq!(s["db"], "odoo");
        assert_eq!(s["schema"], "public");
        assert_eq!(s["table"], "product_template");
        assert_eq!(s["lsn"], 0x16B3748u64);
        assert_eq!(s["ts_ms"], 1714564800250i64);
        assert!(s["txId"].is_null());
        assert_eq!(s["version"], env!("CARGO_PKG_VERSION"));
        assert_eq!(s["event_id"], "00000000016B3748-00000003");
        assert!(v["ts_ms"].as_i64().expect("ts_ms") > 1714564800250);

        let mut buf = Vec::new();
        write_array(
            Envelope::Debezium,
            &[event(EventOp::Delete, r#"{"id":7}"#)],
            &ctx(),
            &mut buf,
        )
        .expect("encodes");
        let v: serde_json::Value = serde_json::from_slice(&buf).expect("json");
        assert_eq!(v[0]["op"], "d");
        assert!(v[0]["after"].is_null());
        assert_eq!(v[0]["before"]["id"], 7);
    }

    #[test]
    fn cloudevents_single_event() {
        let mut buf = Vec::new();
        write_one(
            Envelope::CloudEvents,
            &event(EventOp::Upsert, "{}"),
            &ctx(),
            &mut buf,
        )
        .expect("encodes");
        let v: serde_json::Value = serde_json::from_slice(&buf).expect("json");
        assert_eq!(v["specversion"], "1.0");
        assert_eq!(v["source"], "steward://s1");
        assert_eq!(v["type"], "steward.product.upsert");
    }
}
