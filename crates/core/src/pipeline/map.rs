//! Table selection and field mapping.
//!
//! A Relation message binds a relation id to an entity plan with column
//! positions resolved once, so mapping a change is index lookups plus the
//! value conversion of only the mapped columns.

use std::collections::HashMap;

use serde_json::{Map, Value};

use crate::config::{Config, EntityConfig, EntityIndex, FieldSource, TargetIndex};
use crate::model::event::join_key;
use crate::model::value::{text_to_json, text_to_json_at};
use crate::model::{
    Change, ChangeOp, Event, EventData, EventOp, Lsn, Relation, SourceChange, TupleValue,
};
use steward_postgres::quote_ident;

/// Why an entity's changes cannot be mapped from a relation.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// The source table lacks a column the entity's key or fields name
    /// (a schema change); the entity stops until it is fixed.
    #[error("entity '{entity}': column '{column}' of {table} does not exist (the server's table has: {available}); restore the column, or change the entity's key or fields in the configuration and reload (SIGHUP) or restart steward")]
    MissingColumn {
        /// The entity's name.
        entity: String,
        /// `schema.table`.
        table: String,
        /// The missing column.
        column: String,
        /// The columns the table has, comma-separated.
        available: String,
    },
    /// A change names a relation id no Relation message described (a
    /// protocol violation).
    #[error("entity '{entity}': a change on {table} refers to relation id {relation_id}, which the server never described")]
    UnknownRelation {
        /// The entity's name.
        entity: String,
        /// `schema.table`.
        table: String,
        /// The id the change carried.
        relation_id: u32,
    },
}

/// A query reading the current values of `columns` (tuple positions) of one row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToastFill {
    /// A `SELECT` of the columns as text, by the row's key (values quoted inline).
    pub sql: String,
    /// The tuple positions of the selected columns, in the `SELECT`'s order.
    pub columns: Vec<usize>,
}

/// A mapped column whose value steward cannot encode (a `jsonb` document
/// nested too deep, text that is not what the column's type prints). The
/// change still maps, without that field: the governance holds the record in
/// quarantine (rule [`ENCODING_RULE`]) instead of delivering it, so one bad
/// value never stops the other records. The value itself is never part of
/// it (it may be personal data).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct Unencodable {
    pub(crate) table: String,
    pub(crate) column: String,
    /// The field the column maps to.
    pub(crate) field: String,
    pub(crate) problem: String,
}

/// The quarantine rule of records with a value steward cannot encode.
pub(crate) const ENCODING_RULE: &str = "encoding";

impl std::fmt::Display for Unencodable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "column '{}' of {} (field '{}') cannot be delivered: {}; the record is released by its next change with a value steward can encode",
            self.column, self.table, self.field, self.problem
        )
    }
}

/// An event and the entity it belongs to (which decides the targets).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Mapped {
    /// The entity the change maps to.
    pub entity: EntityIndex,
    /// The event's id, key, operation, version and time; `data` stays null.
    pub event: Event,
    /// Governance: the change's kind and, for entities whose rows are
    /// captured ([`Pipeline::capture_rows`]), every column of the new row and
    /// of the old row (when the server sent the whole old row).
    pub(crate) op: ChangeOp,
    /// The record's first change in its transaction, when several were
    /// folded into this one ([`Mapped::fold`]); else `op`.
    pub(crate) first_op: ChangeOp,
    /// The (last folded) change's index in its transaction: events of a
    /// transaction are delivered in this order.
    pub(crate) index: u32,
    /// The mapped fields (for a delete: the key fields). `event.data` is
    /// left null: governance decides the document each target receives.
    pub(crate) data: Map<String, Value>,
    pub(crate) row: Option<Map<String, Value>>,
    pub(crate) old: Option<Map<String, Value>>,
    /// The first mapped column of this change steward could not encode
    /// (left out of `data`): the governance quarantines the record.
    pub(crate) unencodable: Option<Unencodable>,
}

impl Mapped {
    /// The whole new row, for an entity whose rows are captured.
    pub fn row(&self) -> Option<&Map<String, Value>> {
        self.row.as_ref()
    }

    /// Folds a later change of the same record in the same transaction into
    /// this one: the final state and the last change's id, the first
    /// change's kind and old row. Whether a value cannot be encoded is a
    /// property of the final state too: a later good change supersedes a
    /// bad one, a later bad one makes the record bad.
    pub fn fold(&mut self, later: Mapped) {
        self.op = later.op;
        self.index = later.index;
        self.event = later.event;
        self.data = later.data;
        self.row = later.row;
        self.unencodable = later.unencodable;
        if self.old.is_none() && self.first_op != ChangeOp::Insert {
            self.old = later.old;
        }
    }
}

struct ResolvedSource {
    name: String,
    column: usize,
    type_oid: u32,
    path: Vec<String>,
}

struct ResolvedField {
    name: String,
    source: ResolvedSource,
    fallback: Option<ResolvedSource>,
}

struct EntityPlan {
    entity: EntityIndex,
    key_columns: Vec<usize>,
    /// For deletes: (field name, column index) of each key column.
    key_fields: Vec<(String, usize, u32)>,
    fields: Vec<ResolvedField>,
}

struct RelationPlan {
    table: String,
    plans: Vec<EntityPlan>,
    /// (name, type oid) of every column, for row capture.
    columns: Vec<(String, u32)>,
    /// REPLICA IDENTITY FULL: old tuples carry every column.
    full_identity: bool,
}

/// The mapping stage: which tables map to which entities, and how each
/// relation's columns map to an entity's fields. Built from a
/// configuration; relations are bound as the stream describes them.
pub struct Pipeline {
    entities: Vec<EntityConfig>,
    /// `schema.table` → entities.
    by_table: HashMap<String, Vec<EntityIndex>>,
    relations: HashMap<u32, RelationPlan>,
    /// entity → its targets.
    entity_targets: Vec<Vec<TargetIndex>>,
    /// entity index → whether whole rows are converted for governance.
    capture: Vec<bool>,
}

impl Pipeline {
    /// A pipeline for `config`'s entities, with no relation bound yet.
    pub fn new(config: &Config) -> Pipeline {
        let mut by_table: HashMap<String, Vec<EntityIndex>> = HashMap::new();
        for (i, e) in config.iter_entities() {
            by_table.entry(e.qualified_table()).or_default().push(i);
        }
        let entity_targets = config
            .entities
            .iter()
            .map(|e| {
                config
                    .iter_targets()
                    .filter(|(_, t)| t.entities.iter().any(|n| n == &e.name))
                    .map(|(i, _)| i)
                    .collect()
            })
            .collect();
        Pipeline {
            entities: config.entities.clone(),
            by_table,
            relations: HashMap::new(),
            entity_targets,
            capture: vec![false; config.entities.len()],
        }
    }

    /// Converts every column of this entity's rows, not only the mapped
    /// ones, for the governance (new row, and old row when sent whole).
    pub fn capture_rows(&mut self, entity: EntityIndex) {
        if let Some(c) = self.capture.get_mut(entity.0) {
            *c = true;
        }
    }

    /// The `schema.table` names the configuration maps, for the publication.
    pub fn tables(&self) -> Vec<(String, String)> {
        let mut tables: Vec<(String, String)> = self
            .entities
            .iter()
            .map(|e| (e.schema.clone(), e.table.clone()))
            .collect();
        tables.sort();
        tables.dedup();
        tables
    }

    /// The targets that receive `entity`, in configuration order.
    pub fn targets_of(&self, entity: EntityIndex) -> &[TargetIndex] {
        &self.entity_targets[entity]
    }

    /// The name of `entity`.
    pub fn entity_name(&self, entity: EntityIndex) -> &str {
        &self.entities[entity].name
    }

    /// The entities mapping `schema.table`.
    pub fn entities_of(&self, table: &str) -> &[EntityIndex] {
        self.by_table.get(table).map(Vec::as_slice).unwrap_or(&[])
    }

    /// [`Pipeline::bind_relation`], failing on the first entity that cannot
    /// be planned (snapshots and tests, where a missing column is an error).
    pub fn on_relation(&mut self, relation: &Relation) -> Result<(), PipelineError> {
        match self.bind_relation(relation).into_iter().next() {
            Some((_, e)) => Err(e),
            None => Ok(()),
        }
    }

    /// Binds a relation id to the entities mapping its table. Tables no
    /// entity maps are remembered as such so their changes are dropped cheaply.
    /// An entity whose key or fields name a column the relation lacks (a
    /// schema change) is left unbound — its changes on this relation produce
    /// no events — and returned with the reason; the others are bound.
    pub fn bind_relation(&mut self, relation: &Relation) -> Vec<(EntityIndex, PipelineError)> {
        let table = relation.qualified_name();
        let mut plans = Vec::new();
        let mut problems = Vec::new();
        if let Some(entities) = self.by_table.get(&table) {
            for &entity in entities {
                match self.plan_entity(entity, relation) {
                    Ok(plan) => plans.push(plan),
                    Err(e) => problems.push((entity, e)),
                }
            }
        }
        let columns = relation
            .columns
            .iter()
            .map(|c| (c.name.clone(), c.type_oid))
            .collect();
        self.relations.insert(
            relation.id,
            RelationPlan {
                table,
                plans,
                columns,
                full_identity: relation.replica_identity == b'f',
            },
        );
        problems
    }

    fn plan_entity(
        &self,
        entity: EntityIndex,
        relation: &Relation,
    ) -> Result<EntityPlan, PipelineError> {
        let config = &self.entities[entity];
        let find = |column: &str| -> Result<(usize, u32), PipelineError> {
            relation
                .columns
                .iter()
                .position(|c| c.name == column)
                .map(|i| (i, relation.columns[i].type_oid))
                .ok_or_else(|| PipelineError::MissingColumn {
                    entity: config.name.clone(),
                    table: relation.qualified_name(),
                    column: column.to_string(),
                    available: relation
                        .columns
                        .iter()
                        .map(|c| c.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                })
        };
        let resolve = |source: &FieldSource| -> Result<ResolvedSource, PipelineError> {
            let (column, type_oid) = find(&source.column)?;
            Ok(ResolvedSource {
                name: source.column.clone(),
                column,
                type_oid,
                path: source.path.clone(),
            })
        };
        let mut key_columns = Vec::with_capacity(config.key.len());
        let mut key_fields = Vec::with_capacity(config.key.len());
        for key in &config.key {
            let (index, type_oid) = find(key)?;
            key_columns.push(index);
            let name = config
                .fields
                .iter()
                .find(|f| f.source.column == *key && f.source.path.is_empty())
                .map(|f| f.name.clone())
                .unwrap_or_else(|| key.clone());
            key_fields.push((name, index, type_oid));
        }
        let mut fields = Vec::with_capacity(config.fields.len());
        for field in &config.fields {
            fields.push(ResolvedField {
                name: field.name.clone(),
                source: resolve(&field.source)?,
                fallback: field.fallback.as_ref().map(resolve).transpose()?,
            });
        }
        Ok(EntityPlan {
            entity,
            key_columns,
            key_fields,
            fields,
        })
    }

    /// The row read that fills the mapped columns an update left as
    /// unchanged TOAST (pgoutput does not resend them and, without REPLICA
    /// IDENTITY FULL, no old value carries them): `None` when nothing is
    /// missing. The query reads the row's current values by key.
    pub fn toast_fill_query(&self, change: &Change) -> Option<ToastFill> {
        let relation = self.relations.get(&change.relation_id)?;
        let new = change.new.as_deref()?;
        let old = change.old.as_deref();
        let mut columns: Vec<usize> = Vec::new();
        for plan in &relation.plans {
            for field in &plan.fields {
                for source in std::iter::once(&field.source).chain(field.fallback.as_ref()) {
                    let c = source.column;
                    let missing = matches!(new.get(c), Some(TupleValue::UnchangedToast))
                        && !matches!(old.and_then(|o| o.get(c)), Some(TupleValue::Text(_)));
                    if missing && !columns.contains(&c) {
                        columns.push(c);
                    }
                }
            }
        }
        if columns.is_empty() {
            return None;
        }
        let plan = relation.plans.first()?;
        let mut conditions = Vec::with_capacity(plan.key_columns.len());
        for &k in &plan.key_columns {
            let Some(TupleValue::Text(bytes)) = new.get(k) else {
                return None;
            };
            let value = std::str::from_utf8(bytes).ok()?;
            conditions.push(format!(
                "{} = {}",
                quote_ident(&relation.columns[k].0),
                steward_postgres::quote_literal(value)
            ));
        }
        let (schema, table) = relation.table.split_once('.')?;
        let select: Vec<String> = columns
            .iter()
            .map(|&c| format!("{}::text", quote_ident(&relation.columns[c].0)))
            .collect();
        Some(ToastFill {
            sql: format!(
                "SELECT {} FROM {}.{} WHERE {}",
                select.join(", "),
                quote_ident(schema),
                quote_ident(table),
                conditions.join(" AND ")
            ),
            columns,
        })
    }

    /// Whether changes of this relation id can produce events at all.
    pub fn is_mapped(&self, relation_id: u32) -> bool {
        self.relations
            .get(&relation_id)
            .is_some_and(|r| !r.plans.is_empty())
    }

    /// Maps one change (the `index`-th of the transaction committed at
    /// `commit_lsn`) into zero or more events, appended to `out`.
    pub fn map_change(
        &self,
        change: &Change,
        commit_lsn: Lsn,
        index: u32,
        commit_time: &str,
        out: &mut Vec<Mapped>,
    ) -> Result<(), PipelineError> {
        let Some(relation) = self.relations.get(&change.relation_id) else {
            // pgoutput always sends a Relation before the first change of a
            // relation on a stream, so this is a protocol violation.
            return Err(PipelineError::UnknownRelation {
                entity: String::new(),
                table: String::new(),
                relation_id: change.relation_id,
            });
        };
        for plan in &relation.plans {
            let entity = &self.entities[plan.entity];
            let mut unencodable = None;
            let (event, data) = match change.op {
                ChangeOp::Insert | ChangeOp::Update => {
                    let Some(new) = change.new.as_deref() else {
                        continue;
                    };
                    let Some(key) = key_text(new, &plan.key_columns) else {
                        unkeyed(
                            &entity.name,
                            &relation.table,
                            &entity.key,
                            "change",
                            commit_lsn,
                        );
                        continue;
                    };
                    let mut data = Map::with_capacity(plan.fields.len());
                    for field in &plan.fields {
                        let old = change.old.as_deref();
                        let converted = match field_value(new, old, &field.source) {
                            Ok(v) if v.is_null() => match &field.fallback {
                                Some(fallback) => field_value(new, old, fallback)
                                    .map_err(|problem| (fallback, problem)),
                                None => Ok(v),
                            },
                            Ok(v) => Ok(v),
                            Err(problem) => Err((&field.source, problem)),
                        };
                        match converted {
                            Ok(value) => {
                                data.insert(field.name.clone(), value);
                            }
                            Err((source, problem)) => {
                                unencodable.get_or_insert_with(|| Unencodable {
                                    table: relation.table.clone(),
                                    column: source.name.clone(),
                                    field: field.name.clone(),
                                    problem,
                                });
                            }
                        }
                    }
                    let event = Event {
                        change: Some(if change.op == ChangeOp::Insert {
                            SourceChange::Insert
                        } else {
                            SourceChange::Update
                        }),
                        tx_id: None,
                        id: Event::source_id(commit_lsn, index),
                        entity: entity.name.clone(),
                        key,
                        op: EventOp::Upsert,
                        version: commit_lsn.0,
                        time: commit_time.to_string(),
                        data: EventData::null(),
                    };
                    (event, data)
                }
                ChangeOp::Delete => {
                    let Some(old) = change.old.as_deref() else {
                        continue;
                    };
                    let Some(key) = key_text(old, &plan.key_columns) else {
                        unkeyed(
                            &entity.name,
                            &relation.table,
                            &entity.key,
                            "delete",
                            commit_lsn,
                        );
                        continue;
                    };
                    let mut data = Map::with_capacity(plan.key_fields.len());
                    for (name, column, type_oid) in &plan.key_fields {
                        // A delete must reach the targets: a key value that
                        // does not convert goes as its text (the event's key).
                        let value = match old.get(*column) {
                            Some(TupleValue::Text(bytes)) => text_to_json(*type_oid, bytes)
                                .unwrap_or_else(|_| {
                                    Value::String(String::from_utf8_lossy(bytes).into_owned())
                                }),
                            _ => Value::Null,
                        };
                        data.insert(name.clone(), value);
                    }
                    let event = Event {
                        change: Some(SourceChange::Delete),
                        tx_id: None,
                        id: Event::source_id(commit_lsn, index),
                        entity: entity.name.clone(),
                        key,
                        op: EventOp::Delete,
                        version: commit_lsn.0,
                        time: commit_time.to_string(),
                        data: EventData::null(),
                    };
                    (event, data)
                }
            };
            let capture = self.capture.get(plan.entity.0).copied().unwrap_or(false);
            let old_row = match (&change.old, relation.full_identity) {
                (Some(old), true) if capture => Some(row_json(&relation.columns, old, None)),
                _ => None,
            };
            let row = match (&change.new, &change.old) {
                (Some(new), old) if capture => Some(row_json(
                    &relation.columns,
                    new,
                    old.as_deref().filter(|_| relation.full_identity),
                )),
                (None, Some(_)) if capture => old_row.clone(),
                _ => None,
            };
            out.push(Mapped {
                entity: plan.entity,
                event,
                op: change.op,
                first_op: change.op,
                index,
                data,
                row,
                old: old_row,
                unencodable,
            });
        }
        Ok(())
    }
}

/// The value of one source column of a change, or why it cannot be encoded.
fn field_value(
    new: &[TupleValue],
    old: Option<&[TupleValue]>,
    source: &ResolvedSource,
) -> Result<Value, String> {
    let raw = match new.get(source.column) {
        Some(TupleValue::UnchangedToast) => old.and_then(|o| o.get(source.column)),
        other => other,
    };
    match raw {
        Some(TupleValue::Text(bytes)) => {
            text_to_json_at(source.type_oid, bytes, &source.path).map_err(|e| e.to_string())
        }
        Some(TupleValue::UnchangedToast) => Err(
            "the value is TOASTed and unchanged by this update, and the server did not send it; \
             set REPLICA IDENTITY FULL on the table so the old row carries it"
                .to_string(),
        ),
        _ => Ok(Value::Null),
    }
}

/// A row change without a usable key (a key column NULL, not UTF-8, or not
/// sent) names no record: it cannot be delivered, held or quarantined, and
/// must not stop the other records. It is counted per entity and logged,
/// at most every 10 seconds, so a mass import of such rows does not flood
/// the log; the record is delivered by its first change that has a key.
fn unkeyed(entity: &str, table: &str, key: &[String], op: &str, lsn: Lsn) {
    static LAST_WARNED: std::sync::Mutex<Option<std::time::Instant>> = std::sync::Mutex::new(None);
    static SKIPPED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    metrics::counter!(crate::metric::RECORDS_UNKEYED, "entity" => entity.to_string()).increment(1);
    let skipped = SKIPPED.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
    let mut last = LAST_WARNED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if last.is_some_and(|t| t.elapsed() < std::time::Duration::from_secs(10)) {
        return;
    }
    *last = Some(std::time::Instant::now());
    SKIPPED.store(0, std::sync::atomic::Ordering::Relaxed);
    tracing::warn!(
        entity,
        table,
        key = ?key,
        op,
        commit = %lsn,
        skipped,
        "a row change whose key columns are NULL, not UTF-8 or not sent names no record: skipped (steward_records_unkeyed_total); give the rows a key, or key the entity on a column that always has one (the primary key); for deletes check the table's REPLICA IDENTITY"
    );
}

fn key_text(tuple: &[TupleValue], key_columns: &[usize]) -> Option<String> {
    let mut parts = Vec::with_capacity(key_columns.len());
    for &column in key_columns {
        match tuple.get(column) {
            Some(TupleValue::Text(bytes)) => parts.push(std::str::from_utf8(bytes).ok()?),
            _ => return None,
        }
    }
    Some(join_key(parts))
}

/// Every column of a tuple as JSON (unchanged TOASTed values from `old` when
/// sent). A value that does not convert is kept as its text: governance
/// predicates must not fail on a column no field maps.
fn row_json(
    columns: &[(String, u32)],
    tuple: &[TupleValue],
    old: Option<&[TupleValue]>,
) -> Map<String, Value> {
    let mut out = Map::with_capacity(columns.len());
    for (i, (name, type_oid)) in columns.iter().enumerate() {
        let raw = match tuple.get(i) {
            Some(TupleValue::UnchangedToast) => old.and_then(|o| o.get(i)),
            other => other,
        };
        let value = match raw {
            Some(TupleValue::Text(bytes)) => text_to_json(*type_oid, bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(bytes).into_owned())),
            _ => Value::Null,
        };
        out.insert(name.clone(), value);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Column, Relation};

    fn relation(columns: &[&str]) -> Relation {
        Relation {
            id: 7,
            namespace: "public".into(),
            name: "product_template".into(),
            replica_identity: b'd',
            columns: columns
                .iter()
                .map(|name| Column {
                    is_key: *name == "id",
                    name: (*name).into(),
                    type_oid: if *name == "id" { 23 } else { 1043 },
                    type_modifier: -1,
                })
                .collect(),
        }
    }

    fn insert(values: &[&str]) -> Change {
        Change {
            relation_id: 7,
            op: ChangeOp::Insert,
            new: Some(
                values
                    .iter()
                    .map(|v| TupleValue::Text(bytes::Bytes::copy_from_slice(v.as_bytes())))
                    .collect(),
            ),
            old: None,
        }
    }

    #[test]
    fn a_value_that_does_not_convert_marks_the_record_and_maps_the_rest() {
        let text = r#"
[source]
url = "postgres://steward@localhost/odoo"
[state]
path = "/tmp/x.redb"
[entities.product]
table = "product_template"
fields = { number = "id", sku = "default_code" }
[targets.wms]
type = "http"
url = "http://localhost:1/"
entities = ["product"]
"#;
        let config = Config::parse(text, "t.toml".as_ref(), "/tmp".as_ref()).unwrap();
        let mut pipeline = Pipeline::new(&config);
        assert!(pipeline
            .bind_relation(&relation(&["id", "default_code"]))
            .is_empty());
        let mut out = Vec::new();
        // `id` is an int4 column; these bytes are not an integer.
        pipeline
            .map_change(
                &insert(&["12x", "B1"]),
                Lsn(0x1_6B37_4800),
                0,
                "t",
                &mut out,
            )
            .unwrap();
        pipeline
            .map_change(&insert(&["13", "B2"]), Lsn(0x1_6B37_4800), 1, "t", &mut out)
            .unwrap();
        assert_eq!(out.len(), 2);
        let bad = out[0].unencodable.as_ref().expect("marked");
        assert_eq!(
            (bad.column.as_str(), bad.field.as_str(), bad.table.as_str()),
            ("id", "number", "public.product_template")
        );
        let message = bad.to_string();
        for needed in ["'id'", "public.product_template", "not an integer"] {
            assert!(message.contains(needed), "{needed} in {message}");
        }
        assert!(
            !message.contains("12x"),
            "the value is not quoted: {message}"
        );
        assert_eq!(out[0].event.key, "12x");
        assert_eq!(out[0].data.get("sku"), Some(&Value::from("B1")));
        assert!(!out[0].data.contains_key("number"));
        assert!(out[1].unencodable.is_none());

        // Folding: the last change of the record decides.
        let mut first = out.remove(0);
        let good = out.remove(0);
        first.fold(good);
        assert!(first.unencodable.is_none());
        pipeline
            .map_change(&insert(&["1y", "B3"]), Lsn(0x1_6B37_4800), 2, "t", &mut out)
            .unwrap();
        first.fold(out.remove(0));
        assert_eq!(
            first.unencodable.as_ref().map(|u| u.column.as_str()),
            Some("id")
        );
    }

    #[test]
    fn a_change_whose_key_is_null_is_skipped_and_the_others_map() {
        let text = r#"
[source]
url = "postgres://steward@localhost/odoo"
[state]
path = "/tmp/x.redb"
[entities.product]
table = "product_template"
key = ["default_code"]
fields = { sku = "default_code", number = "id" }
[targets.wms]
type = "http"
url = "http://localhost:1/"
entities = ["product"]
"#;
        let config = Config::parse(text, "t.toml".as_ref(), "/tmp".as_ref()).unwrap();
        let mut pipeline = Pipeline::new(&config);
        assert!(pipeline
            .bind_relation(&relation(&["id", "default_code"]))
            .is_empty());
        let mut out = Vec::new();
        let mut unkeyed = insert(&["12", ""]);
        unkeyed.new.as_mut().unwrap()[1] = TupleValue::Null;
        pipeline
            .map_change(&unkeyed, Lsn(0x1_6B37_4800), 0, "t", &mut out)
            .expect("a NULL key skips the record, it does not stop the stream");
        pipeline
            .map_change(&insert(&["13", "B2"]), Lsn(0x1_6B37_4800), 1, "t", &mut out)
            .unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].event.key, "B2");
    }

    #[test]
    fn a_relation_without_a_mapped_column_unbinds_only_that_entity() {
        let text = r#"
[source]
url = "postgres://steward@localhost/odoo"
[state]
path = "/tmp/x.redb"
[entities.product]
table = "product_template"
fields = { sku = "default_code" }
[entities.product_code]
table = "product_template"
fields = { code = "barcode" }
[targets.wms]
type = "http"
url = "http://localhost:1/"
entities = ["product", "product_code"]
"#;
        let config = Config::parse(text, "t.toml".as_ref(), "/tmp".as_ref()).unwrap();
        let mut pipeline = Pipeline::new(&config);
        let sku = pipeline.entities_of("public.product_template")[0];
        assert_eq!(pipeline.entity_name(sku), "product");

        // A column was added: nothing stops.
        let problems = pipeline.bind_relation(&relation(&["id", "default_code", "barcode", "x"]));
        assert!(problems.is_empty());

        // default_code is gone: only `product` is unbound, with the fix.
        let problems = pipeline.bind_relation(&relation(&["id", "barcode", "x"]));
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].0, sku);
        let message = problems[0].1.to_string();
        for needed in [
            "'product'",
            "'default_code'",
            "public.product_template",
            "restore the column",
            "SIGHUP",
        ] {
            assert!(message.contains(needed), "{needed} in {message}");
        }
        assert!(pipeline.is_mapped(7));
        let mut out = Vec::new();
        pipeline
            .map_change(&insert(&["1", "B1", "y"]), Lsn(0x10), 0, "t", &mut out)
            .unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].event.entity, "product_code");
        assert_eq!(out[0].data["code"], "B1");
        assert!(pipeline.on_relation(&relation(&["id", "barcode"])).is_err());
    }
}
