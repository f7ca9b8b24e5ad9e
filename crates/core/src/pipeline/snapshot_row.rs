//! Mapping of rows read from a table snapshot (text values, as the server's
//! type output functions print them, which is also what pgoutput sends) into
//! the same events streamed changes produce. Pure: the reading is done by
//! `source::snapshot`.

use bytes::Bytes;

use super::{Mapped, Pipeline, PipelineError};
use crate::config::EntityIndex;
use crate::model::{push_hex, Change, ChangeOp, Lsn, SourceChange, TupleValue};

#[cfg(test)]
use crate::model::{Event, EventData};

/// The version of a row read in the snapshot whose consistent point is
/// `consistent`: one below it. Every transaction the snapshot contains has
/// its commit record wholly before the consistent point (version < C - 1);
/// every one it does not contain is streamed with a commit LSN >= C. A
/// target comparing versions therefore orders the snapshot row correctly
/// against both, even against a commit that starts exactly at C.
pub(crate) fn snapshot_version(consistent: Lsn) -> u64 {
    consistent.0.saturating_sub(1)
}

/// Deterministic id of a snapshot row: the same snapshot re-read after a
/// crash produces the same ids, so targets can de-duplicate.
pub(crate) fn snapshot_id(consistent: Lsn, entity: &str, key: &str) -> String {
    row_id("snap-", consistent, entity, key)
}

/// `{prefix}{consistent as 16 upper-case hex digits}-{entity}-{key}`,
/// written by hand: once per row read, where `format!` cost ten times as much.
fn row_id(prefix: &str, consistent: Lsn, entity: &str, key: &str) -> String {
    let mut id = String::with_capacity(prefix.len() + 18 + entity.len() + key.len());
    id.push_str(prefix);
    push_hex(&mut id, consistent.0, 16);
    id.push('-');
    id.push_str(entity);
    id.push('-');
    id.push_str(key);
    id
}

/// The event a snapshot row maps to before governance (its mapped fields as
/// `data`): what [`snapshot_mapped`] hands the governance, seen as an event.
/// Only for tests of the mapping; targets receive governed documents.
#[cfg(test)]
fn snapshot_event(
    pipeline: &Pipeline,
    relation_id: u32,
    entity: EntityIndex,
    row: &[Option<String>],
    consistent: Lsn,
    time: &str,
) -> Result<Option<Event>, PipelineError> {
    Ok(snapshot_mapped(
        pipeline,
        relation_id,
        entity,
        row.to_vec(),
        consistent,
        time,
    )?
    .map(|m| {
        let mut event = m.event;
        event.data = EventData::from_map(&m.data);
        event
    }))
}

/// Maps one snapshot row of the relation `relation_id` (which the pipeline
/// must know, see [`Pipeline::on_relation`]) for entity `entity`, as
/// the governance takes it: the mapped change (with
/// the whole row for entities whose rows are captured), carrying the
/// snapshot's id, version and `Snapshot` change kind. The row is taken:
/// its column texts become the change's values without a copy.
pub fn snapshot_mapped(
    pipeline: &Pipeline,
    relation_id: u32,
    entity: EntityIndex,
    row: Vec<Option<String>>,
    consistent: Lsn,
    time: &str,
) -> Result<Option<Mapped>, PipelineError> {
    let tuple = tuple_of(row);
    let change = Change {
        relation_id,
        op: ChangeOp::Insert,
        new: Some(tuple),
        old: None,
    };
    let mut out: Vec<Mapped> = Vec::with_capacity(1);
    pipeline.map_change(&change, consistent, 0, time, &mut out)?;
    Ok(out.into_iter().find(|m| m.entity == entity).map(|mut m| {
        m.event.id = snapshot_id(consistent, &m.event.entity, &m.event.key);
        m.event.version = snapshot_version(consistent);
        m.event.change = Some(SourceChange::Snapshot);
        m
    }))
}

/// A row's column texts as the tuple a decoded change carries, each text
/// kept as it is rather than copied.
fn tuple_of(row: Vec<Option<String>>) -> Vec<TupleValue> {
    row.into_iter()
        .map(|v| match v {
            Some(text) => TupleValue::Text(Bytes::from(text)),
            None => TupleValue::Null,
        })
        .collect()
}

/// Maps a key a snapshot at `consistent` does not have (the record is gone
/// from the table) as the delete the stream would have carried: `row` holds
/// the key columns' texts at their positions in the relation and nothing
/// else. Version and id as for the snapshot's rows, with an id of its own.
pub fn absent_mapped(
    pipeline: &Pipeline,
    relation_id: u32,
    entity: EntityIndex,
    row: Vec<Option<String>>,
    consistent: Lsn,
    time: &str,
) -> Result<Option<Mapped>, PipelineError> {
    let tuple = tuple_of(row);
    let change = Change {
        relation_id,
        op: ChangeOp::Delete,
        new: None,
        old: Some(tuple),
    };
    let mut out: Vec<Mapped> = Vec::with_capacity(1);
    pipeline.map_change(&change, consistent, 0, time, &mut out)?;
    Ok(out.into_iter().find(|m| m.entity == entity).map(|mut m| {
        m.event.id = row_id("gone-", consistent, &m.event.entity, &m.event.key);
        m.event.version = snapshot_version(consistent);
        m.event.change = Some(SourceChange::Delete);
        m
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::model::{Column, Relation};

    #[test]
    fn row_ids_read_as_the_formatted_position_entity_and_key() {
        for lsn in [0, 0x100, 0x1A2B_3C4D_5E6F_7089, u64::MAX] {
            assert_eq!(
                snapshot_id(Lsn(lsn), "product", "7|a"),
                format!("snap-{lsn:016X}-product-7|a")
            );
            assert_eq!(
                row_id("gone-", Lsn(lsn), "uom", ""),
                format!("gone-{lsn:016X}-uom-")
            );
        }
    }

    #[test]
    fn a_snapshot_row_maps_like_a_streamed_insert_with_snapshot_version_and_id() {
        let text = r#"
[source]
url = "postgres://steward@localhost/odoo"
[state]
path = "/tmp/x.redb"
[entities.product]
table = "product_template"
fields = { sku = "default_code", name = "name.en_US", price = "list_price" }
[targets.wms]
type = "http"
url = "http://localhost:1/"
entities = ["product"]
"#;
        let config = Config::parse(text, "t.toml".as_ref(), "/tmp".as_ref()).unwrap();
        let mut pipeline = Pipeline::new(&config);
        let col = |name: &str, oid: u32| Column {
            is_key: name == "id",
            name: name.into(),
            type_oid: oid,
            type_modifier: -1,
        };
        pipeline
            .on_relation(&Relation {
                id: 7,
                namespace: "public".into(),
                name: "product_template".into(),
                replica_identity: b'd',
                columns: vec![
                    col("id", 23),
                    col("default_code", 1043),
                    col("name", 3802),
                    col("list_price", 1700),
                ],
            })
            .unwrap();
        let row = vec![
            Some("42".to_string()),
            None,
            Some(r#"{"en_US": "Desk"}"#.to_string()),
            Some("10.50".to_string()),
        ];
        let e = snapshot_event(&pipeline, 7, EntityIndex(0), &row, Lsn(0x100), "t")
            .unwrap()
            .unwrap();
        assert_eq!(e.key, "42");
        assert_eq!(e.version, 0xFF);
        assert_eq!(e.id, "snap-0000000000000100-product-42");
        let data = e.data.to_value();
        assert_eq!(data["name"], "Desk");
        assert_eq!(data["price"].to_string(), "10.50");
        assert!(data["sku"].is_null());
    }
}
