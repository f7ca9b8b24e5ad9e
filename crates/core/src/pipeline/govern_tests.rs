//! Table-driven unit tests of the governance, without PostgreSQL: a config
//! from TOML text, a pipeline capturing the tracked entities' rows, source
//! changes mapped by [`Pipeline::map_change`] and governed one transaction
//! at a time, like the daemon does.

use super::*;

use std::collections::{HashMap, HashSet};

use serde_json::{json, Value};

use crate::config::{Config, EntityIndex, TargetIndex};
use crate::model::{Change, ChangeOp, Column, Event, Lsn, Relation, SourceChange, TupleValue};
use crate::pipeline::large_txn::{LargeTxn, MemoryStage};
use crate::pipeline::store_view::TestStore;
use crate::pipeline::{snapshot_mapped, Mapped, Pipeline};
use crate::state::{AuditRecord, GovDelta, GovOp, GovSnapshot, QuarantineEntry};

const INT4: u32 = 23;
const VARCHAR: u32 = 1043;
const NUMERIC: u32 = 1700;
const FLOAT8: u32 = 701;
const DATE: u32 = 1082;
const TIMESTAMP: u32 = 1114;
const JSONB: u32 = 3802;

/// The Odoo-like tables every test config maps: (table, relation id, columns).
/// (table, relation id, (column, type oid)...).
type Table = (&'static str, u32, &'static [(&'static str, u32)]);

const SCHEMA: &[Table] = &[
    (
        "product_template",
        10,
        &[
            ("id", INT4),
            ("default_code", VARCHAR),
            ("name", VARCHAR),
            ("state", VARCHAR),
            ("list_price", NUMERIC),
            ("company_id", INT4),
            ("note", VARCHAR),
        ],
    ),
    (
        "mrp_bom",
        11,
        &[
            ("id", INT4),
            ("product_tmpl_id", INT4),
            ("code", VARCHAR),
            ("company_id", INT4),
            ("note", VARCHAR),
        ],
    ),
    (
        "mrp_bom_line",
        12,
        &[
            ("id", INT4),
            ("bom_id", INT4),
            ("product_id", INT4),
            ("product_qty", INT4),
        ],
    ),
    (
        "res_partner",
        13,
        &[
            ("id", INT4),
            ("name", VARCHAR),
            ("email", VARCHAR),
            ("ref", VARCHAR),
            ("iban", VARCHAR),
            ("company_id", INT4),
            ("note", VARCHAR),
        ],
    ),
    (
        "product_attribute",
        14,
        &[
            ("id", INT4),
            ("product_id", INT4),
            ("name", VARCHAR),
            ("attrs", JSONB),
            ("weight", FLOAT8),
            ("price", NUMERIC),
            ("sold_on", DATE),
            ("seen_at", TIMESTAMP),
        ],
    ),
];

const I: ChangeOp = ChangeOp::Insert;
const U: ChangeOp = ChangeOp::Update;
const D: ChangeOp = ChangeOp::Delete;

/// One source change: (table, op, columns set; `id` always given).
type Row<'a> = &'a [(&'a str, Option<&'a str>)];
type Step<'a> = (&'a str, ChangeOp, Row<'a>);
type OwnedRow<'a> = Vec<(&'a str, Option<&'a str>)>;

fn config(body: &str) -> Config {
    let text = format!(
        "[source]\nurl = \"postgres://steward@localhost/odoo\"\n[state]\npath = \"/tmp/x.redb\"\n{body}"
    );
    Config::parse(&text, "t.toml".as_ref(), "/tmp".as_ref()).unwrap_or_else(|e| panic!("{e}"))
}

/// An event as a target receives it.
#[derive(Clone, Debug, PartialEq)]
struct Ev {
    target: String,
    entity: String,
    key: String,
    op: &'static str,
    data: Value,
    /// The data's JSON text, as delivered.
    raw: String,
    version: u64,
    id: String,
    change: Option<SourceChange>,
}

/// (target, entity, key, op, data): what most tables compare.
type Brief = (String, String, String, &'static str, Value);

fn brief(evs: &[Ev]) -> Vec<Brief> {
    let mut out: Vec<Brief> = evs
        .iter()
        .map(|e| {
            (
                e.target.clone(),
                e.entity.clone(),
                e.key.clone(),
                e.op,
                e.data.clone(),
            )
        })
        .collect();
    out.sort_by(|a, b| (&a.0, &a.1, &a.2).cmp(&(&b.0, &b.1, &b.2)));
    out
}

fn up(target: &str, entity: &str, key: &str, data: Value) -> Brief {
    (target.into(), entity.into(), key.into(), "upsert", data)
}

fn del(target: &str, entity: &str, key: &str, data: Value) -> Brief {
    (target.into(), entity.into(), key.into(), "delete", data)
}

fn sorted(mut v: Vec<Brief>) -> Vec<Brief> {
    v.sort_by(|a, b| (&a.0, &a.1, &a.2).cmp(&(&b.0, &b.1, &b.2)));
    v
}

struct Harness {
    config: Config,
    gov: Governance,
    pipeline: Pipeline,
    /// The source database: (table, id) → column values.
    db: HashMap<(String, String), Vec<Option<String>>>,
    lsn: u64,
    /// Audit records of the last call.
    audit: Vec<AuditRecord>,
    /// Govern every transaction as a large one, staged in this store in
    /// pieces of this many records (see `daemon::large_txn`).
    large: Option<(usize, MemoryStage)>,
    /// The governance state as the store would hold it.
    durable: Durable,
    /// Tracked rows (entity, key) the last call wrote to the store.
    rows_written: Vec<(String, String)>,
}

/// The durable governance state, kept from the queued changes as the store
/// applies them, so that a test can restart the governance from it.
#[derive(Default)]
struct Durable {
    /// Tracked rows, business keys, references and the published state.
    published: TestStore,
    quarantine: std::collections::BTreeMap<(String, String), QuarantineEntry>,
}

impl Durable {
    fn apply_delta(&mut self, delta: &GovDelta) {
        for op in &delta.ops {
            if let GovOp::Quarantine { entity, key, entry } = op {
                let slot = (entity.clone(), key.clone());
                match entry {
                    Some(q) => self.quarantine.insert(slot, (**q).clone()),
                    None => self.quarantine.remove(&slot),
                };
            }
        }
        self.published.commit(delta);
    }

    fn snapshot(&self) -> GovSnapshot {
        let table = self.published.table();
        let state = table.committed();
        GovSnapshot {
            rows: state
                .rows
                .iter()
                .map(|((e, k), r)| (e.clone(), k.clone(), r.clone()))
                .collect(),
            unique: state
                .unique
                .iter()
                .map(|((e, f, v), h)| (e.clone(), f.clone(), v.clone(), h.clone()))
                .collect(),
            quarantine: self.quarantine.values().cloned().collect(),
        }
    }
}

impl Harness {
    fn new(body: &str) -> Harness {
        Harness::from_config(config(body))
    }

    fn from_config(config: Config) -> Harness {
        let durable = Durable::default();
        let mut gov = Governance::new(&config);
        gov.set_state_reader(Box::new(durable.published.clone()));
        let mut pipeline = Pipeline::new(&config);
        for e in gov.tracked_entities().collect::<Vec<_>>() {
            pipeline.capture_rows(e);
        }
        for (table, id, _) in SCHEMA {
            pipeline.on_relation(&relation(table, *id)).unwrap();
        }
        Harness {
            config,
            gov,
            pipeline,
            db: HashMap::new(),
            lsn: 0x1000,
            audit: Vec::new(),
            large: None,
            durable,
            rows_written: Vec::new(),
        }
    }

    /// A governance started from the durable state, as after a restart.
    fn restarted(&self) -> Governance {
        let mut gov = Governance::new(&self.config);
        gov.set_state_reader(Box::new(self.durable.published.clone()));
        gov.load(self.durable.snapshot());
        gov
    }

    /// (published, pending approval, quarantined, blocked) of `entity`,
    /// checked equal to what a restarted governance derives.
    fn counts(&self, entity: &str) -> (u64, u64, u64, u64) {
        let find = |gov: &Governance| {
            gov.record_counts()
                .into_iter()
                .find(|c| c.entity == entity)
                .map(|c| (c.published, c.pending_approval, c.quarantined, c.blocked))
                .unwrap_or_else(|| panic!("{entity} is not counted"))
        };
        let counts = find(&self.gov);
        assert_eq!(
            find(&self.restarted()),
            counts,
            "{entity}: the counts derived at start-up differ from the counts kept"
        );
        assert_eq!(
            find(&self.restarted_from_summary()),
            counts,
            "{entity}: the counts restored from a summary differ from the counts kept"
        );
        counts
    }

    /// A governance started from the durable state and the running one's
    /// summary, as after a clean stop.
    fn restarted_from_summary(&self) -> Governance {
        let mut gov = Governance::new(&self.config);
        gov.set_state_reader(Box::new(self.durable.published.clone()));
        assert!(gov.restore_summary(&self.gov.summary()));
        gov.load(self.durable.snapshot());
        gov
    }

    /// A harness whose transactions are all governed as large ones.
    fn large(body: &str, piece: usize) -> Harness {
        let mut h = Harness::new(body);
        h.large = Some((piece, MemoryStage::default()));
        h
    }

    fn entity(&self, name: &str) -> EntityIndex {
        self.gov.entity_by_name(name).unwrap()
    }

    fn target(&self, name: &str) -> TargetIndex {
        self.config.target_index(name).unwrap()
    }

    /// The full row after applying `cols` to the table's current row (or an
    /// empty one), as the database would hold it.
    fn write_row(&mut self, table: &str, op: ChangeOp, cols: Row) -> (Vec<Option<String>>, String) {
        let columns = columns(table);
        let id = cols
            .iter()
            .find(|(c, _)| *c == "id")
            .and_then(|(_, v)| *v)
            .expect("every change names its id")
            .to_string();
        let slot = (table.to_string(), id.clone());
        let mut row = match op {
            ChangeOp::Insert => vec![None; columns.len()],
            _ => self
                .db
                .get(&slot)
                .cloned()
                .unwrap_or_else(|| vec![None; columns.len()]),
        };
        for (c, v) in cols {
            let i = columns
                .iter()
                .position(|(n, _)| n == c)
                .unwrap_or_else(|| panic!("{table} has no column {c}"));
            row[i] = v.map(str::to_string);
        }
        if op == ChangeOp::Delete {
            self.db.remove(&slot);
        } else {
            self.db.insert(slot, row.clone());
        }
        (row, id)
    }

    fn change(&mut self, table: &str, op: ChangeOp, cols: Row) -> Change {
        let rel = SCHEMA.iter().find(|(t, _, _)| *t == table).unwrap().1;
        let (row, _) = self.write_row(table, op, cols);
        let tuple = |row: &[Option<String>], key_only: bool| -> Vec<TupleValue> {
            columns(table)
                .iter()
                .zip(row)
                .map(|((name, _), v)| match v {
                    Some(t) if !key_only || *name == "id" => {
                        TupleValue::Text(bytes::Bytes::copy_from_slice(t.as_bytes()))
                    }
                    _ => TupleValue::Null,
                })
                .collect()
        };
        match op {
            ChangeOp::Delete => Change {
                relation_id: rel,
                op,
                new: None,
                // Replica identity default: the old key only.
                old: Some(tuple(&row, true)),
            },
            _ => Change {
                relation_id: rel,
                op,
                new: Some(tuple(&row, false)),
                old: None,
            },
        }
    }

    fn next_lsn(&mut self) -> Lsn {
        self.lsn += 0x100;
        Lsn(self.lsn)
    }

    /// One source transaction; returns the events of every target, in the
    /// order the governance produced them.
    fn txn(&mut self, steps: &[Step]) -> Vec<Ev> {
        let lsn = self.next_lsn();
        let time = "2024-01-01T00:00:00Z";
        let mut mapped = Vec::new();
        for (i, (table, op, cols)) in steps.iter().enumerate() {
            let change = self.change(table, *op, cols);
            self.pipeline
                .map_change(&change, lsn, i as u32, time, &mut mapped)
                .unwrap();
            if let Some((piece, store)) = &self.large {
                // As the daemon does when a transaction outgrows memory.
                if mapped.len() >= *piece {
                    let mut staging = LargeTxn::default();
                    staging.absorb(store, &self.gov, &mut mapped).unwrap();
                }
            }
        }
        let out = match &self.large {
            None => self.gov.process(mapped, lsn, time),
            Some((piece, store)) => {
                let mut staging = LargeTxn::default();
                staging.absorb(store, &self.gov, &mut mapped).unwrap();
                let mut out = Vec::new();
                staging
                    .govern(store, &mut self.gov, *piece, lsn, time, &mut |events, _| {
                        out.extend(events);
                        Ok(())
                    })
                    .unwrap();
                out
            }
        };
        self.finish(out)
    }

    fn finish(&mut self, out: Vec<(TargetIndex, Event)>) -> Vec<Ev> {
        let delta = self.gov.take_delta();
        self.durable.apply_delta(&delta);
        self.rows_written = delta
            .ops
            .iter()
            .filter_map(|op| match op {
                GovOp::Row { entity, key, .. } => Some((entity.clone(), key.clone())),
                _ => None,
            })
            .collect();
        self.audit = delta
            .ops
            .into_iter()
            .filter_map(|op| match op {
                GovOp::Audit(a) => Some(a),
                _ => None,
            })
            .collect();
        out.into_iter()
            .map(|(t, e)| Ev {
                target: self.config.targets[t].name.clone(),
                entity: e.entity.clone(),
                key: e.key.clone(),
                op: e.op.as_str(),
                data: e.data.to_value(),
                raw: e.data.as_str().to_string(),
                version: e.version,
                id: e.id.clone(),
                change: e.change,
            })
            .collect()
    }

    /// Rows of `entity`'s table mapped as a snapshot at `consistent` reads them.
    fn snapshot_rows(&mut self, entity: &str, rows: &[Row], consistent: Lsn) -> Vec<Mapped> {
        let e = self.entity(entity);
        let table = self.config.entities[e].table.clone();
        let rel = SCHEMA.iter().find(|(t, _, _)| *t == table).unwrap().1;
        rows.iter()
            .filter_map(|cols| {
                let (row, _) = self.write_row(&table, ChangeOp::Insert, cols);
                snapshot_mapped(&self.pipeline, rel, e, row, consistent, "snap-time").unwrap()
            })
            .collect()
    }

    fn snapshot(
        &mut self,
        entity: &str,
        rows: &[Row],
        consistent: Lsn,
        targets: &[&str],
        force: bool,
    ) -> Vec<Ev> {
        self.snapshot_counted(entity, rows, consistent, targets, force)
            .0
    }

    /// A snapshot read, and what each of its targets found.
    fn snapshot_counted(
        &mut self,
        entity: &str,
        rows: &[Row],
        consistent: Lsn,
        targets: &[&str],
        force: bool,
    ) -> (Vec<Ev>, Vec<[u64; 4]>) {
        let mut mapped = self.snapshot_rows(entity, rows, consistent);
        let targets: Vec<TargetIndex> = targets.iter().map(|t| self.target(t)).collect();
        let position = Lsn(self.lsn);
        let mut out = Vec::new();
        let read = SnapshotRead {
            targets,
            force,
            known_only: false,
            quiet: false,
            actual: None,
        };
        let counts = self
            .gov
            .process_snapshot(&mut mapped, consistent, &read, position, &mut out)
            .into_iter()
            .map(|c| [c.checked, c.equal, c.resent, c.deleted])
            .collect();
        (self.finish(out), counts)
    }

    /// The start-up read of a table: nothing is sent.
    fn seed(&mut self, entity: &str, rows: &[Row]) {
        let mut mapped = self.snapshot_rows(entity, rows, Lsn::ZERO);
        self.gov.seed_mapped(&mut mapped, "seed-time");
        self.finish(Vec::new());
    }

    /// The last call's audit decisions: "entity key target decision".
    fn decisions(&self) -> Vec<String> {
        self.audit
            .iter()
            .map(|a| {
                format!(
                    "{} {} {} {}",
                    a.entity,
                    a.key,
                    a.target.as_deref().unwrap_or("-"),
                    a.decision
                )
            })
            .collect()
    }

    /// (entity, key, rule, message) of every quarantined record.
    fn held(&self) -> Vec<(String, String, String, String)> {
        self.gov
            .quarantined()
            .into_iter()
            .map(|q| {
                (
                    q.entity.clone(),
                    q.key.clone(),
                    q.rule.clone(),
                    q.message.clone(),
                )
            })
            .collect()
    }

    fn held_keys(&self) -> Vec<String> {
        self.gov
            .quarantined()
            .into_iter()
            .map(|q| format!("{} {}", q.entity, q.key))
            .collect()
    }
}

fn columns(table: &str) -> &'static [(&'static str, u32)] {
    SCHEMA
        .iter()
        .find(|(t, _, _)| *t == table)
        .unwrap_or_else(|| panic!("no table {table} in SCHEMA"))
        .2
}

fn relation(table: &str, id: u32) -> Relation {
    Relation {
        id,
        namespace: "public".into(),
        name: table.into(),
        replica_identity: b'd',
        columns: columns(table)
            .iter()
            .map(|(name, oid)| Column {
                is_key: *name == "id",
                name: (*name).into(),
                type_oid: *oid,
                type_modifier: -1,
            })
            .collect(),
    }
}

// ---------------------------------------------------------------------------
// 1. Odoo's write pattern: one document per key per transaction.

const PLAIN_PRODUCT: &str = r#"
[entities.product]
table = "product_template"
fields = { sku = "default_code", name = "name" }
[targets.wms]
type = "http"
url = "http://localhost:1/"
entities = ["product"]
[targets.erp]
type = "http"
url = "http://localhost:1/"
entities = ["product"]
"#;

const GATED_PRODUCT: &str = r#"
[entities.product]
table = "product_template"
fields = { sku = "default_code", name = "name" }
publish_when = "row.state == 'approved'"
unique = ["sku"]
[targets.wms]
type = "http"
url = "http://localhost:1/"
entities = ["product"]
[targets.erp]
type = "http"
url = "http://localhost:1/"
entities = ["product"]
"#;

#[test]
fn insert_then_two_updates_in_one_transaction_is_one_upsert_with_final_values() {
    for (label, body) in [("ungoverned", PLAIN_PRODUCT), ("governed", GATED_PRODUCT)] {
        let mut h = Harness::new(body);
        let evs = h.txn(&[
            (
                "product_template",
                I,
                &[
                    ("id", Some("1")),
                    ("default_code", Some("A_1")),
                    ("name", Some("n0")),
                    ("state", Some("draft")),
                ],
            ),
            (
                "product_template",
                U,
                &[
                    ("id", Some("1")),
                    ("name", Some("n1")),
                    ("state", Some("approved")),
                ],
            ),
            (
                "product_template",
                U,
                &[("id", Some("1")), ("name", Some("n2"))],
            ),
        ]);
        let final_doc = json!({"sku": "A_1", "name": "n2"});
        assert_eq!(
            brief(&evs),
            vec![
                up("erp", "product", "1", final_doc.clone()),
                up("wms", "product", "1", final_doc.clone()),
            ],
            "{label}"
        );
        for e in &evs {
            assert_eq!(
                e.change,
                Some(SourceChange::Insert),
                "{label}: Debezium keeps c"
            );
            assert_eq!(e.version, h.lsn, "{label}");
            assert_eq!(e.raw, r#"{"sku":"A_1","name":"n2"}"#, "{label}");
        }
        assert!(h.held().is_empty(), "{label}");
    }
}

#[test]
fn two_thousand_keys_written_three_times_in_one_transaction_give_one_event_each() {
    for (label, body) in [("ungoverned", PLAIN_PRODUCT), ("governed", GATED_PRODUCT)] {
        let mut h = Harness::new(body);
        let texts: Vec<[String; 4]> = (1..=2000)
            .map(|i| {
                [
                    i.to_string(),
                    format!("S_{i}"),
                    format!("mid-{i}"),
                    format!("final-{i}"),
                ]
            })
            .collect();
        let inserts = texts.iter().map(|[id, sku, _, _]| {
            let cols: OwnedRow = vec![
                ("id", Some(id.as_str())),
                ("default_code", Some(sku.as_str())),
                ("state", Some("approved")),
            ];
            (I, cols)
        });
        let updates = [2, 3].into_iter().flat_map(|round| {
            texts.iter().map(move |t| {
                let cols: OwnedRow = vec![
                    ("id", Some(t[0].as_str())),
                    ("name", Some(t[round].as_str())),
                ];
                (U, cols)
            })
        });
        let rows: Vec<(ChangeOp, OwnedRow)> = inserts.chain(updates).collect();
        let steps: Vec<Step> = rows
            .iter()
            .map(|(op, cols)| ("product_template", *op, cols.as_slice()))
            .collect();
        let evs = h.txn(&steps);
        let wms: Vec<&Ev> = evs.iter().filter(|e| e.target == "wms").collect();
        assert_eq!(wms.len(), 2000, "{label}");
        assert_eq!(evs.len(), 4000, "{label}: 2,000 per target");
        let keys: HashSet<&str> = wms.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(keys.len(), 2000, "{label}: one event per key");
        for e in &wms {
            assert_eq!(e.op, "upsert");
            assert_eq!(e.data["name"], json!(format!("final-{}", e.key)), "{label}");
            assert_eq!(e.change, Some(SourceChange::Insert), "{label}");
        }
    }
}

#[test]
fn changes_ending_in_a_delete_within_one_transaction() {
    let ins: Row = &[
        ("id", Some("1")),
        ("default_code", Some("A_1")),
        ("name", Some("n0")),
        ("state", Some("approved")),
    ];
    let upd1: Row = &[("id", Some("1")), ("name", Some("n1"))];
    let upd2: Row = &[("id", Some("1")), ("name", Some("n2"))];
    let gone: Row = &[("id", Some("1"))];
    // (label, delivered before?, transaction, events per target)
    let cases: &[(&str, bool, &[Step], Option<&str>)] = &[
        (
            "insert+delete",
            false,
            &[("product_template", I, ins), ("product_template", D, gone)],
            None,
        ),
        (
            "insert+update+delete",
            false,
            &[
                ("product_template", I, ins),
                ("product_template", U, upd1),
                ("product_template", D, gone),
            ],
            None,
        ),
        (
            "update+update+delete of a delivered record",
            true,
            &[
                ("product_template", U, upd1),
                ("product_template", U, upd2),
                ("product_template", D, gone),
            ],
            Some("delete"),
        ),
        (
            "update+update+delete of a record steward never saw",
            false,
            &[
                ("product_template", U, ins),
                ("product_template", U, upd2),
                ("product_template", D, gone),
            ],
            Some("delete"),
        ),
    ];
    for (body_label, body) in [("ungoverned", PLAIN_PRODUCT), ("governed", GATED_PRODUCT)] {
        for (label, before, steps, expected) in cases {
            let mut h = Harness::new(body);
            if *before {
                let first = h.txn(&[("product_template", I, ins)]);
                assert_eq!(first.len(), 2, "{body_label} {label}");
            }
            let evs = h.txn(steps);
            let want: Vec<Brief> = match expected {
                None => vec![],
                Some(_) => vec![
                    del("erp", "product", "1", json!({"id": 1})),
                    del("wms", "product", "1", json!({"id": 1})),
                ],
            };
            assert_eq!(brief(&evs), want, "{body_label} {label}");
            for e in &evs {
                assert_eq!(e.change, Some(SourceChange::Delete), "{body_label} {label}");
            }
        }
    }
}

#[test]
fn no_two_events_of_one_key_share_a_version() {
    for (label, body) in [("ungoverned", PLAIN_PRODUCT), ("governed", GATED_PRODUCT)] {
        let mut h = Harness::new(body);
        let p = |name: &'static str| -> OwnedRow<'static> {
            vec![("id", Some("1")), ("name", Some(name))]
        };
        let (a, b, c, d) = (p("a"), p("b"), p("c"), p("d"));
        let txns: Vec<Vec<Step>> = vec![
            vec![(
                "product_template",
                I,
                &[
                    ("id", Some("1")),
                    ("default_code", Some("A_1")),
                    ("state", Some("approved")),
                ],
            )],
            vec![("product_template", U, a.as_slice())],
            vec![
                ("product_template", U, b.as_slice()),
                ("product_template", U, c.as_slice()),
            ],
            vec![("product_template", U, d.as_slice())],
            vec![
                ("product_template", U, a.as_slice()),
                ("product_template", D, &[("id", Some("1"))]),
            ],
        ];
        let mut seen: HashMap<String, Vec<u64>> = HashMap::new();
        let mut ids = HashSet::new();
        for steps in &txns {
            for e in h.txn(steps) {
                assert!(
                    ids.insert((e.target.clone(), e.id.clone())),
                    "{label}: id {} twice",
                    e.id
                );
                seen.entry(e.target).or_default().push(e.version);
            }
        }
        for (target, versions) in seen {
            assert_eq!(
                versions.len(),
                txns.len(),
                "{label} {target}: one event per transaction"
            );
            assert!(
                versions.windows(2).all(|w| w[0] < w[1]),
                "{label} {target}: versions {versions:?} must increase"
            );
        }
    }
}

// ---------------------------------------------------------------------------
// 2. Lifecycle gate.

fn gate_config(on_unpublish: &str) -> String {
    format!(
        r#"
[entities.product]
table = "product_template"
fields = {{ sku = "default_code", state = "state" }}
publish_when = "row.state == 'approved'"
on_unpublish = "{on_unpublish}"
[targets.wms]
type = "http"
url = "http://localhost:1/"
entities = ["product"]
"#
    )
}

#[test]
fn lifecycle_gate_table() {
    // (on_unpublish, state inserted in an earlier transaction (None: steward
    // never saw the record), state written by an update, what the target
    // gets ("nothing", "upsert", "delete"), audit decision)
    let cases: &[(&str, Option<&str>, &str, &str, &str)] = &[
        ("delete", Some("draft"), "draft", "nothing", "gated"),
        ("delete", Some("draft"), "approved", "upsert", "delivered"),
        (
            "delete",
            Some("approved"),
            "approved",
            "upsert",
            "delivered",
        ),
        ("delete", Some("approved"), "draft", "delete", "unpublished"),
        ("upsert", Some("draft"), "draft", "nothing", "gated"),
        ("upsert", Some("draft"), "approved", "upsert", "delivered"),
        (
            "upsert",
            Some("approved"),
            "approved",
            "upsert",
            "delivered",
        ),
        ("upsert", Some("approved"), "draft", "upsert", "unpublished"),
        // First seen by an update: it may have been delivered before steward
        // tracked it, so leaving the gate unpublishes it.
        ("delete", None, "draft", "delete", "unpublished"),
        ("upsert", None, "draft", "upsert", "unpublished"),
        ("delete", None, "approved", "upsert", "delivered"),
    ];
    for (mode, before, after, expect, decision) in cases {
        let label = format!("{mode}: {before:?} -> {after}");
        let mut h = Harness::new(&gate_config(mode));
        if let Some(state) = before {
            let evs = h.txn(&[(
                "product_template",
                I,
                &[
                    ("id", Some("1")),
                    ("default_code", Some("A_1")),
                    ("state", Some(*state)),
                ],
            )]);
            assert_eq!(evs.len(), usize::from(*state == "approved"), "{label}");
        }
        let evs = h.txn(&[(
            "product_template",
            U,
            &[
                ("id", Some("1")),
                ("default_code", Some("A_2")),
                ("state", Some(*after)),
            ],
        )]);
        let want = match *expect {
            "nothing" => vec![],
            "upsert" => vec![up(
                "wms",
                "product",
                "1",
                json!({"sku": "A_2", "state": after}),
            )],
            "delete" => vec![del("wms", "product", "1", json!({"id": 1}))],
            _ => unreachable!(),
        };
        assert_eq!(brief(&evs), want, "{label}");
        assert_eq!(
            h.decisions(),
            vec![format!("product 1 wms {decision}")],
            "{label}"
        );

        // Once unpublished (or never published), further unpublishable changes send nothing.
        if *after == "draft" {
            let evs = h.txn(&[(
                "product_template",
                U,
                &[("id", Some("1")), ("default_code", Some("A_3"))],
            )]);
            assert_eq!(brief(&evs), vec![], "{label}: then another draft change");
            assert_eq!(h.decisions(), vec!["product 1 wms gated"], "{label}");
        }
    }
}

// ---------------------------------------------------------------------------
// 3. Validation rules.

fn rule_config(rule: &str) -> String {
    format!(
        r#"
[entities.product]
table = "product_template"
fields = {{ sku = "default_code", name = "name", state = "state", price = "list_price" }}
[[entities.product.rules]]
name = "r"
{rule}
[targets.wms]
type = "http"
url = "http://localhost:1/"
entities = ["product"]
"#
    )
}

const GOOD_PRODUCT: Row<'static> = &[
    ("id", Some("1")),
    ("default_code", Some("A_1")),
    ("name", Some("Desk")),
    ("state", Some("draft")),
    ("list_price", Some("50")),
];

#[test]
fn a_failing_rule_quarantines_and_a_fixing_change_releases() {
    // (rule, column, bad value, message)
    let cases: &[(&str, &str, Option<&str>, &str)] = &[
        (
            r#"required = ["sku", "name"]"#,
            "default_code",
            None,
            "rule 'r' failed: missing sku",
        ),
        (
            r#"required = ["sku", "name"]"#,
            "name",
            Some("   "),
            "rule 'r' failed: missing name",
        ),
        (
            r#"regex = { field = "sku", pattern = "^[A-Z]+_[0-9]+$" }"#,
            "default_code",
            Some("a-1"),
            "rule 'r' failed: sku 'a-1' does not match /^[A-Z]+_[0-9]+$/",
        ),
        (
            r#"allowed = { field = "state", values = ["draft", "approved"] }"#,
            "state",
            Some("weird"),
            "rule 'r' failed: state 'weird' is not one of draft, approved",
        ),
        (
            r#"range = { field = "price", min = 0, max = 100 }"#,
            "list_price",
            Some("150"),
            "rule 'r' failed: price 150 is outside 0..100",
        ),
        (
            r#"range = { field = "price", min = 0 }"#,
            "list_price",
            Some("-1"),
            "rule 'r' failed: price -1 is outside 0..",
        ),
        (
            r#"range = { field = "price", min = 0, max = 100 }"#,
            "list_price",
            Some("NaN"),
            "rule 'r' failed: price 'NaN' is not a number",
        ),
        (
            r#"range = { field = "price", min = 0 }"#,
            "list_price",
            Some("-Infinity"),
            "rule 'r' failed: price -Infinity is outside 0..",
        ),
        (
            r#"cel = "row.name != 'bad'""#,
            "name",
            Some("bad"),
            "rule 'r' failed: `row.name != 'bad'` is false",
        ),
        (
            "required = [\"sku\"]\nmessage = \"every product needs a SKU\"",
            "default_code",
            None,
            "every product needs a SKU (missing sku)",
        ),
    ];
    for (rule, column, bad, message) in cases {
        let label = format!("{rule} with {column} = {bad:?}");
        let mut h = Harness::new(&rule_config(rule));
        let mut row: Vec<(&str, Option<&str>)> = GOOD_PRODUCT.to_vec();
        row.iter_mut().find(|(c, _)| c == column).unwrap().1 = *bad;

        // Inserted failing: nothing sent, quarantined with the rule and message.
        let evs = h.txn(&[("product_template", I, &row)]);
        assert_eq!(brief(&evs), vec![], "{label}");
        assert_eq!(
            h.held(),
            vec![(
                "product".into(),
                "1".into(),
                "r".into(),
                message.to_string()
            )],
            "{label}"
        );
        assert_eq!(h.decisions(), vec!["product 1 - quarantined"], "{label}");
        let q = h.gov.quarantined()[0].clone();
        assert_eq!(
            q.document["sku"],
            row_value(&row, "default_code"),
            "{label}: the withheld document"
        );

        // A fixing change releases it: delivered.
        let good = GOOD_PRODUCT.iter().find(|(c, _)| c == column).unwrap().1;
        let evs = h.txn(&[("product_template", U, &[("id", Some("1")), (*column, good)])]);
        let good_doc = json!({"sku": "A_1", "name": "Desk", "state": "draft", "price": 50});
        assert_eq!(
            brief(&evs),
            vec![up("wms", "product", "1", good_doc)],
            "{label}"
        );
        assert!(h.held().is_empty(), "{label}");
        assert_eq!(
            h.decisions(),
            vec!["product 1 - released", "product 1 wms delivered"],
            "{label}"
        );

        // A bad edit of a delivered record: quarantined, no delete; the target keeps the last good version.
        let evs = h.txn(&[("product_template", U, &[("id", Some("1")), (*column, *bad)])]);
        assert_eq!(brief(&evs), vec![], "{label}: bad edit");
        assert_eq!(h.held_keys(), vec!["product 1"], "{label}");

        // Fixed back to what the target has: released, and nothing to send.
        let evs = h.txn(&[("product_template", U, &[("id", Some("1")), (*column, good)])]);
        assert_eq!(brief(&evs), vec![], "{label}: fixed back");
        assert!(h.held().is_empty(), "{label}");
        assert_eq!(
            h.decisions(),
            vec!["product 1 - released", "product 1 wms suppressed"],
            "{label}"
        );
    }
}

fn row_value(row: Row, column: &str) -> Value {
    row.iter()
        .find(|(c, _)| *c == column)
        .and_then(|(_, v)| *v)
        .map_or(Value::Null, |v| json!(v))
}

#[test]
fn only_required_fails_on_null() {
    // (rule, column left NULL, quarantined?)
    let cases: &[(&str, &str, bool)] = &[
        (
            r#"regex = { field = "sku", pattern = "^[A-Z]+_[0-9]+$" }"#,
            "default_code",
            false,
        ),
        (
            r#"allowed = { field = "state", values = ["draft"] }"#,
            "state",
            false,
        ),
        (
            r#"range = { field = "price", min = 0, max = 100 }"#,
            "list_price",
            false,
        ),
        (r#"required = ["price"]"#, "list_price", true),
    ];
    for (rule, column, quarantined) in cases {
        let mut h = Harness::new(&rule_config(rule));
        let mut row: Vec<(&str, Option<&str>)> = GOOD_PRODUCT.to_vec();
        row.iter_mut().find(|(c, _)| c == column).unwrap().1 = None;
        let evs = h.txn(&[("product_template", I, &row)]);
        assert_eq!(evs.len(), usize::from(!*quarantined), "{rule}");
        assert_eq!(h.held().len(), usize::from(*quarantined), "{rule}");
        if let Some(e) = evs.first() {
            let field = match *column {
                "default_code" => "sku",
                "list_price" => "price",
                other => other,
            };
            assert_eq!(e.data[field], Value::Null, "{rule}");
        }
    }
}

#[test]
fn an_operator_release_re_evaluates_the_record() {
    let mut h = Harness::new(&rule_config(r#"required = ["sku"]"#));
    let mut row = GOOD_PRODUCT.to_vec();
    row[1].1 = None;
    h.txn(&[("product_template", I, &row)]);
    assert_eq!(h.held_keys(), vec!["product 1"]);
    let released = h.gov.release("product", "1", Lsn(0x7000), "t").unwrap();
    assert!(released.events.is_empty());
    assert_eq!(
        released.still_failing.as_deref(),
        Some("rule 'r' failed: missing sku")
    );
    assert_eq!(h.held_keys(), vec!["product 1"]);
    assert!(h.gov.release("product", "2", Lsn(0x7000), "t").is_err());
    assert!(h.gov.release("nope", "1", Lsn(0x7000), "t").is_err());
}

// ---------------------------------------------------------------------------
// 4. Business keys.

const UNIQUE_PRODUCT: &str = r#"
[entities.product]
table = "product_template"
fields = { sku = "default_code", name = "name" }
unique = ["sku"]
[targets.wms]
type = "http"
url = "http://localhost:1/"
entities = ["product"]
"#;

fn sku(id: &'static str, sku: &'static str) -> OwnedRow<'static> {
    vec![
        ("id", Some(id)),
        ("default_code", Some(sku)),
        ("name", Some("n")),
    ]
}

#[test]
fn the_second_holder_of_a_business_key_is_quarantined_naming_the_holder() {
    let mut h = Harness::new(UNIQUE_PRODUCT);
    let evs = h.txn(&[("product_template", I, &sku("1", "A_1"))]);
    assert_eq!(evs.len(), 1);
    // Case and whitespace do not make another key.
    let evs = h.txn(&[("product_template", I, &sku("2", "  a_1 "))]);
    assert_eq!(brief(&evs), vec![]);
    let held = h.held();
    assert_eq!(held.len(), 1);
    assert_eq!((held[0].0.as_str(), held[0].1.as_str()), ("product", "2"));
    assert_eq!(held[0].2, "unique:sku");
    assert!(
        held[0].3.contains("already used by product 1"),
        "names the holder: {}",
        held[0].3
    );
}

#[test]
fn two_claims_of_one_key_in_one_transaction_keep_the_first() {
    let mut h = Harness::new(UNIQUE_PRODUCT);
    let evs = h.txn(&[
        ("product_template", I, &sku("1", "A_1")),
        ("product_template", I, &sku("2", "A_1")),
    ]);
    assert_eq!(
        brief(&evs),
        vec![up(
            "wms",
            "product",
            "1",
            json!({"sku": "A_1", "name": "n"})
        )]
    );
    assert_eq!(h.held_keys(), vec!["product 2"]);
}

#[test]
fn a_business_key_let_go_releases_the_waiting_record_in_the_same_transaction() {
    let waiting = json!({"sku": "a_1", "name": "n"});
    // (label, the transaction after product 2 was quarantined on product 1's key, events)
    let rename: Row = &[("id", Some("1")), ("default_code", Some("B_1"))];
    let cases: &[(&str, &[Step], Vec<Brief>)] = &[
        (
            "holder renamed",
            &[("product_template", U, rename)],
            vec![
                up("wms", "product", "1", json!({"sku": "B_1", "name": "n"})),
                up("wms", "product", "2", waiting.clone()),
            ],
        ),
        (
            "holder deleted",
            &[("product_template", D, &[("id", Some("1"))])],
            vec![
                del("wms", "product", "1", json!({"id": 1})),
                up("wms", "product", "2", waiting.clone()),
            ],
        ),
    ];
    for (label, steps, want) in cases {
        let mut h = Harness::new(UNIQUE_PRODUCT);
        h.txn(&[("product_template", I, &sku("1", "A_1"))]);
        h.txn(&[("product_template", I, &sku("2", "a_1"))]);
        assert_eq!(h.held_keys(), vec!["product 2"], "{label}");
        let evs = h.txn(steps);
        assert_eq!(brief(&evs), sorted(want.clone()), "{label}");
        assert!(h.held().is_empty(), "{label}: released");
        let twos: Vec<&Ev> = evs.iter().filter(|e| e.key == "2").collect();
        assert_eq!(twos.len(), 1, "{label}: one event for the released record");
        assert_eq!(twos[0].version, h.lsn, "{label}");
    }
}

#[test]
fn a_business_key_let_go_releases_a_waiting_record_changed_earlier_in_the_transaction() {
    let mut h = Harness::new(UNIQUE_PRODUCT);
    h.txn(&[("product_template", I, &sku("1", "A_1"))]);
    h.txn(&[("product_template", I, &sku("2", "a_1"))]);
    assert_eq!(h.held_keys(), vec!["product 2"]);
    // The waiting record changes (an unmapped column) before the holder lets
    // go of the key, in the same transaction: it is evaluated first.
    let evs = h.txn(&[
        (
            "product_template",
            U,
            &[("id", Some("2")), ("note", Some("x"))],
        ),
        (
            "product_template",
            U,
            &[("id", Some("1")), ("default_code", Some("B_1"))],
        ),
    ]);
    assert_eq!(
        brief(&evs),
        vec![
            up("wms", "product", "1", json!({"sku": "B_1", "name": "n"})),
            up("wms", "product", "2", json!({"sku": "a_1", "name": "n"})),
        ],
        "README: the second record is released when either record lets go of the key"
    );
    assert!(h.held().is_empty());
}

// ---------------------------------------------------------------------------
// 5. References and the dependency chain.

const CHAIN: &str = r#"
[entities.product]
table = "product_template"
fields = { sku = "default_code", name = "name" }
publish_when = "row.state == 'approved'"
[[entities.product.rules]]
name = "sku_format"
regex = { field = "sku", pattern = "^[A-Z]+_[0-9]+$" }
[entities.bom]
table = "mrp_bom"
fields = { code = "code", product = { ref = "product_tmpl_id", entity = "product", key = "sku" } }
[[entities.bom.rules]]
name = "product_ok"
reference = { field = "product_tmpl_id", entity = "product" }
[targets.wms]
type = "http"
url = "http://localhost:1/"
entities = ["product", "bom"]
"#;

fn product(id: &'static str, sku: &'static str, state: &'static str) -> OwnedRow<'static> {
    vec![
        ("id", Some(id)),
        ("default_code", Some(sku)),
        ("name", Some("Desk")),
        ("state", Some(state)),
    ]
}

const BOM_10: Row<'static> = &[
    ("id", Some("10")),
    ("product_tmpl_id", Some("1")),
    ("code", Some("B10")),
];

#[test]
fn a_record_referencing_an_unpublished_record_waits_for_it() {
    let mut h = Harness::new(CHAIN);
    let evs = h.txn(&[
        ("product_template", I, &product("1", "P_1", "draft")),
        ("mrp_bom", I, BOM_10),
    ]);
    assert_eq!(brief(&evs), vec![]);
    let held = h.held();
    assert_eq!(held.len(), 1);
    assert_eq!(
        (held[0].0.as_str(), held[0].1.as_str(), held[0].2.as_str()),
        ("bom", "10", "product_ok")
    );
    assert!(held[0].3.contains("blocked by product 1"), "{}", held[0].3);

    // The product is approved later, without touching the BOM: both delivered.
    let evs = h.txn(&[(
        "product_template",
        U,
        &[("id", Some("1")), ("state", Some("approved"))],
    )]);
    assert_eq!(
        brief(&evs),
        vec![
            up("wms", "bom", "10", json!({"code": "B10", "product": "P_1"})),
            up("wms", "product", "1", json!({"sku": "P_1", "name": "Desk"})),
        ]
    );
    assert_eq!(evs[0].entity, "product", "the referenced record first");
    assert!(evs.iter().all(|e| e.version == h.lsn));
    assert!(h.held().is_empty());

    // A rename of the product re-emits the BOM with the new business key.
    let evs = h.txn(&[(
        "product_template",
        U,
        &[("id", Some("1")), ("default_code", Some("P_2"))],
    )]);
    assert_eq!(
        brief(&evs),
        vec![
            up("wms", "bom", "10", json!({"code": "B10", "product": "P_2"})),
            up("wms", "product", "1", json!({"sku": "P_2", "name": "Desk"})),
        ]
    );

    // The product is blocked again: it is unpublished, the BOM held (no delete).
    let evs = h.txn(&[(
        "product_template",
        U,
        &[("id", Some("1")), ("state", Some("draft"))],
    )]);
    assert_eq!(
        brief(&evs),
        vec![del("wms", "product", "1", json!({"id": 1}))]
    );
    assert_eq!(h.held_keys(), vec!["bom 10"]);
    assert!(h.held()[0].3.contains("blocked by product 1"));

    // Approved again: the product is sent again; the BOM, which the target
    // kept, is released with nothing new to send.
    let evs = h.txn(&[(
        "product_template",
        U,
        &[("id", Some("1")), ("state", Some("approved"))],
    )]);
    assert_eq!(
        brief(&evs),
        vec![up(
            "wms",
            "product",
            "1",
            json!({"sku": "P_2", "name": "Desk"})
        )]
    );
    assert!(h.held().is_empty());
    assert!(h.decisions().contains(&"bom 10 - released".to_string()));
    assert!(h.decisions().contains(&"bom 10 wms suppressed".to_string()));
}

#[test]
fn a_quarantined_referenced_record_holds_the_records_referencing_it() {
    let mut h = Harness::new(CHAIN);
    // Passes its gate, fails a rule.
    let evs = h.txn(&[
        ("product_template", I, &product("1", "bad", "approved")),
        ("mrp_bom", I, BOM_10),
    ]);
    assert_eq!(brief(&evs), vec![]);
    assert_eq!(h.held_keys(), vec!["bom 10", "product 1"]);
    let bom = &h.held()[0];
    assert!(
        bom.3.contains("blocked by product 1 (quarantined"),
        "{}",
        bom.3
    );

    let evs = h.txn(&[(
        "product_template",
        U,
        &[("id", Some("1")), ("default_code", Some("P_1"))],
    )]);
    assert_eq!(
        brief(&evs),
        vec![
            up("wms", "bom", "10", json!({"code": "B10", "product": "P_1"})),
            up("wms", "product", "1", json!({"sku": "P_1", "name": "Desk"})),
        ]
    );
    assert!(h.held().is_empty());
}

#[test]
fn tracked_rows_leave_memory_once_stored_and_are_read_back_from_the_store() {
    let mut h = Harness::new(CHAIN);
    let evs = h.txn(&[("product_template", I, &product("1", "P_1", "approved"))]);
    assert_eq!(brief(&evs).len(), 1);
    // Once the store shows the commit (seen at the next sync), the row is
    // not held; nor cached after an idle release: the BOM's reference reads
    // the product's row, the rule its gate, from the store.
    h.gov.release_buffers();
    assert_eq!(h.gov.view.pending_rows(), 0, "committed rows are not held");
    let evs = h.txn(&[("mrp_bom", I, BOM_10)]);
    assert_eq!(
        brief(&evs),
        vec![up(
            "wms",
            "bom",
            "10",
            json!({"code": "B10", "product": "P_1"})
        )]
    );
    // Odoo's create(): an insert and an update of the same record in one
    // transaction; the update sees the insert's row before any commit.
    let evs = h.txn(&[
        ("product_template", I, &product("2", "P_2", "draft")),
        (
            "product_template",
            U,
            &[("id", Some("2")), ("state", Some("approved"))],
        ),
    ]);
    assert_eq!(
        brief(&evs),
        vec![up(
            "wms",
            "product",
            "2",
            json!({"sku": "P_2", "name": "Desk"})
        )]
    );
    assert_eq!(h.counts("product"), (2, 0, 0, 0));
    // A restarted governance reads the same rows from the store.
    let restarted = h.restarted();
    let status = restarted.record_status("product", "2").unwrap();
    assert_eq!(status.row.unwrap()["default_code"], json!("P_2"));
    assert_eq!(restarted.view.pending_rows(), 0);
    assert_eq!(
        restarted
            .records_in_state("product", RecordState::Published, 10)
            .unwrap(),
        (vec!["1".to_string(), "2".to_string()], 2)
    );
    // The BOM referencing product 1 is found in the store's reference
    // index: renaming the product re-emits it.
    h.gov = restarted;
    let evs = h.txn(&[(
        "product_template",
        U,
        &[("id", Some("1")), ("default_code", Some("P_9"))],
    )]);
    assert_eq!(
        brief(&evs),
        vec![
            up("wms", "bom", "10", json!({"code": "B10", "product": "P_9"})),
            up("wms", "product", "1", json!({"sku": "P_9", "name": "Desk"})),
        ]
    );
}

#[test]
fn a_referenced_record_is_decided_first_within_a_transaction() {
    let mut h = Harness::new(CHAIN);
    // The BOM comes first in the transaction; its product fails a rule.
    let evs = h.txn(&[
        ("mrp_bom", I, BOM_10),
        ("product_template", I, &product("1", "bad", "approved")),
    ]);
    assert_eq!(
        brief(&evs),
        vec![],
        "the BOM is held by the product decided in the same transaction"
    );
    assert_eq!(h.held_keys(), vec!["bom 10", "product 1"]);

    // Both fixed in one transaction, the BOM's change first.
    let evs = h.txn(&[
        ("mrp_bom", U, &[("id", Some("10")), ("code", Some("B11"))]),
        (
            "product_template",
            U,
            &[("id", Some("1")), ("default_code", Some("P_1"))],
        ),
    ]);
    assert_eq!(
        evs.iter()
            .map(|e| (e.entity.as_str(), e.key.as_str()))
            .collect::<Vec<_>>(),
        vec![("product", "1"), ("bom", "10")],
        "product first"
    );
    assert_eq!(evs[1].data, json!({"code": "B11", "product": "P_1"}));
    assert_eq!(evs[1].change, Some(SourceChange::Update));
    assert!(h.held().is_empty());

    // The product leaves its gate while the BOM changes: the BOM is held, not deleted.
    let evs = h.txn(&[
        ("mrp_bom", U, &[("id", Some("10")), ("code", Some("B12"))]),
        (
            "product_template",
            U,
            &[("id", Some("1")), ("state", Some("draft"))],
        ),
    ]);
    assert_eq!(
        brief(&evs),
        vec![del("wms", "product", "1", json!({"id": 1}))]
    );
    assert_eq!(h.held_keys(), vec!["bom 10"]);
}

// ---------------------------------------------------------------------------
// 6. Business objects.

const BOM_OBJECT: &str = r#"
[entities.product]
table = "product_template"
fields = { sku = "default_code" }
[entities.bom]
table = "mrp_bom"
fields = { code = "code" }
children = { lines = { table = "mrp_bom_line", parent = "bom_id", fields = { qty = "product_qty", product = { ref = "product_id", entity = "product", key = "sku" } } } }
[targets.wms]
type = "http"
url = "http://localhost:1/"
entities = ["bom"]
"#;

fn line(
    id: &'static str,
    bom: &'static str,
    product: &'static str,
    qty: &'static str,
) -> OwnedRow<'static> {
    vec![
        ("id", Some(id)),
        ("bom_id", Some(bom)),
        ("product_id", Some(product)),
        ("product_qty", Some(qty)),
    ]
}

#[test]
fn a_header_and_its_lines_are_one_document() {
    let mut h = Harness::new(BOM_OBJECT);
    let evs = h.txn(&[
        ("product_template", I, &product("1", "P_1", "draft")),
        ("product_template", I, &product("2", "P_2", "draft")),
        ("mrp_bom", I, &[("id", Some("10")), ("code", Some("B"))]),
        ("mrp_bom_line", I, &line("102", "10", "2", "3")),
        ("mrp_bom_line", I, &line("101", "10", "1", "2")),
    ]);
    assert_eq!(evs.len(), 1, "{evs:#?}");
    assert_eq!((evs[0].entity.as_str(), evs[0].key.as_str()), ("bom", "10"));
    assert_eq!(
        evs[0].raw,
        r#"{"code":"B","lines":[{"qty":2,"product":"P_1","id":101},{"qty":3,"product":"P_2","id":102}]}"#
    );
    assert_eq!(evs[0].change, Some(SourceChange::Insert));

    // A line deleted: the BOM is re-sent without it.
    let evs = h.txn(&[("mrp_bom_line", D, &[("id", Some("102"))])]);
    assert_eq!(
        brief(&evs),
        vec![up(
            "wms",
            "bom",
            "10",
            json!({"code": "B", "lines": [{"qty": 2, "product": "P_1", "id": 101}]})
        )]
    );
    assert_eq!(evs[0].version, h.lsn);

    // A line changed with its header: still one event.
    let evs = h.txn(&[
        (
            "mrp_bom_line",
            U,
            &[("id", Some("101")), ("product_qty", Some("5"))],
        ),
        ("mrp_bom", U, &[("id", Some("10")), ("code", Some("C"))]),
        ("mrp_bom_line", I, &line("103", "10", "2", "1")),
    ]);
    assert_eq!(
        brief(&evs),
        vec![up(
            "wms",
            "bom",
            "10",
            json!({"code": "C", "lines": [
                {"qty": 5, "product": "P_1", "id": 101},
                {"qty": 1, "product": "P_2", "id": 103},
            ]})
        )]
    );
}

#[test]
fn a_renamed_product_re_emits_the_business_objects_whose_lines_reference_it() {
    let mut h = Harness::new(BOM_OBJECT);
    h.txn(&[
        ("product_template", I, &product("1", "P_1", "draft")),
        ("mrp_bom", I, &[("id", Some("10")), ("code", Some("B"))]),
        ("mrp_bom_line", I, &line("101", "10", "1", "2")),
    ]);
    let evs = h.txn(&[(
        "product_template",
        U,
        &[("id", Some("1")), ("default_code", Some("P_9"))],
    )]);
    assert_eq!(
        brief(&evs),
        vec![up(
            "wms",
            "bom",
            "10",
            json!({"code": "B", "lines": [{"qty": 2, "product": "P_9", "id": 101}]})
        )],
        "README: renaming a referenced record re-emits every tracked record referencing it; \
         a child's fields take references the same way"
    );
}

const BOM_LINE_RULE: &str = r#"
[entities.product]
table = "product_template"
fields = { sku = "default_code" }
publish_when = "row.state == 'approved'"
[entities.bom]
table = "mrp_bom"
fields = { code = "code" }
children = { lines = { table = "mrp_bom_line", parent = "bom_id", fields = { qty = "product_qty", product = { ref = "product_id", entity = "product", key = "sku" } } } }
[[entities.bom.rules]]
name = "line_products"
reference = { field = "lines.product_id", entity = "product" }
[targets.wms]
type = "http"
url = "http://localhost:1/"
entities = ["bom"]
"#;

#[test]
fn a_reference_rule_on_a_child_field_holds_the_business_object() {
    let mut h = Harness::new(BOM_LINE_RULE);
    let evs = h.txn(&[
        ("product_template", I, &product("1", "P_1", "draft")),
        ("product_template", I, &product("2", "P_2", "approved")),
        ("mrp_bom", I, &[("id", Some("10")), ("code", Some("B"))]),
        ("mrp_bom_line", I, &line("101", "10", "1", "2")),
    ]);
    assert_eq!(brief(&evs), vec![]);
    let held = h.held();
    assert_eq!(held.len(), 1);
    assert_eq!(
        (held[0].0.as_str(), held[0].1.as_str(), held[0].2.as_str()),
        ("bom", "10", "line_products")
    );
    assert!(held[0].3.contains("blocked by product 1"), "{}", held[0].3);

    // The line is pointed at a publishable product: released.
    let evs = h.txn(&[(
        "mrp_bom_line",
        U,
        &[("id", Some("101")), ("product_id", Some("2"))],
    )]);
    assert_eq!(
        brief(&evs),
        vec![up(
            "wms",
            "bom",
            "10",
            json!({"code": "B", "lines": [{"qty": 2, "product": "P_2", "id": 101}]})
        )]
    );
    assert!(h.held().is_empty());
}

#[test]
fn a_reference_rule_on_a_child_field_follows_the_referenced_records_gate() {
    let mut h = Harness::new(BOM_LINE_RULE);
    h.txn(&[
        ("product_template", I, &product("1", "P_1", "draft")),
        ("mrp_bom", I, &[("id", Some("10")), ("code", Some("B"))]),
        ("mrp_bom_line", I, &line("101", "10", "1", "2")),
    ]);
    assert_eq!(h.held_keys(), vec!["bom 10"]);

    // The product is approved in a later transaction that does not touch the BOM.
    let evs = h.txn(&[(
        "product_template",
        U,
        &[("id", Some("1")), ("state", Some("approved"))],
    )]);
    assert_eq!(
        brief(&evs),
        vec![up(
            "wms",
            "bom",
            "10",
            json!({"code": "B", "lines": [{"qty": 2, "product": "P_1", "id": 101}]})
        )],
        "the BOM waits for its line's product like for a header reference"
    );
    assert!(h.held().is_empty());

    // Blocked again: the BOM is held again (no delete).
    let evs = h.txn(&[(
        "product_template",
        U,
        &[("id", Some("1")), ("state", Some("draft"))],
    )]);
    assert_eq!(brief(&evs), vec![]);
    assert_eq!(
        h.held_keys(),
        vec!["bom 10"],
        "the BOM is quarantined again"
    );
}

// ---------------------------------------------------------------------------
// 7. Per-target policy.

fn policy_config(key_file: &str) -> String {
    format!(
        r#"
[entities.partner]
table = "res_partner"
fields = {{ name = "name", email = "email", ref = "ref", iban = "iban", company = "company_id" }}
[targets.wms]
type = "http"
url = "http://localhost:1/"
entities = ["partner"]
fields = {{ partner = ["name", "email", "iban"] }}
mask = {{ "partner.iban" = "last4", "partner.email" = "full" }}
[targets.erp]
type = "http"
url = "http://localhost:1/"
entities = ["partner"]
hash = ["partner.ref"]
hash_key_file = "{key_file}"
[targets.crm]
type = "http"
url = "http://localhost:1/"
entities = ["partner"]
route = "row.company_id == 1"
"#
    )
}

fn hmac_hex(key: &str, value: &str) -> String {
    use hmac::{Hmac, KeyInit, Mac};
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(key.as_bytes()).unwrap();
    mac.update(value.as_bytes());
    mac.finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

const PARTNER_1: Row<'static> = &[
    ("id", Some("1")),
    ("name", Some("Acme")),
    ("email", Some("a@acme.example")),
    ("ref", Some("R1")),
    ("iban", Some("DE89 3704 0044 0532 0130 00")),
    ("company_id", Some("1")),
];

fn policy_harness(with_key: bool) -> Harness {
    let key_file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(key_file.path(), "k3y").unwrap();
    let mut config = config(&policy_config(&key_file.path().display().to_string()));
    if !with_key {
        let erp = config.target_index("erp").unwrap();
        config.governance.targets[erp].hash_key = None;
    }
    Harness::from_config(config)
}

#[test]
fn allow_list_mask_and_hash_per_target() {
    for with_key in [true, false] {
        let mut h = policy_harness(with_key);
        let evs = h.txn(&[("res_partner", I, PARTNER_1)]);
        let hashed = if with_key {
            json!(hmac_hex("k3y", "R1"))
        } else {
            Value::Null
        };
        assert_eq!(
            brief(&evs),
            vec![
                up(
                    "crm",
                    "partner",
                    "1",
                    json!({"name": "Acme", "email": "a@acme.example", "ref": "R1",
                           "iban": "DE89 3704 0044 0532 0130 00", "company": 1})
                ),
                up(
                    "erp",
                    "partner",
                    "1",
                    json!({"name": "Acme", "email": "a@acme.example", "ref": hashed,
                           "iban": "DE89 3704 0044 0532 0130 00", "company": 1})
                ),
                up(
                    "wms",
                    "partner",
                    "1",
                    json!({"name": "Acme", "email": "***", "iban": "******************3000"})
                ),
            ],
            "with key: {with_key}"
        );
        let redacted: Vec<(String, String)> = h
            .audit
            .iter()
            .filter(|a| a.decision == "redacted")
            .map(|a| (a.target.clone().unwrap(), a.detail.clone()))
            .collect();
        let erp_note = if with_key {
            "ref hashed"
        } else {
            "ref withheld (no hash key)"
        };
        assert_eq!(
            redacted,
            vec![
                (
                    "wms".to_string(),
                    "iban masked (last4), email masked (full)".to_string()
                ),
                ("erp".to_string(), erp_note.to_string()),
            ],
            "with key: {with_key}"
        );
    }
}

/// Targets without a redaction share one written document: the shared text
/// never reaches the redacting target between them, and each target's own
/// suppression still holds.
#[test]
fn targets_without_redaction_share_the_document_a_redacting_one_does_not() {
    let mut h = Harness::new(
        r#"
[entities.partner]
table = "res_partner"
fields = { name = "name", email = "email" }
[targets.a_plain]
type = "http"
url = "http://localhost:1/"
entities = ["partner"]
[targets.b_masked]
type = "http"
url = "http://localhost:1/"
entities = ["partner"]
mask = { "partner.email" = "full" }
[targets.c_plain]
type = "http"
url = "http://localhost:1/"
entities = ["partner"]
"#,
    );
    let plain = |email: &str| json!({"name": "Acme", "email": email});
    let masked = json!({"name": "Acme", "email": "***"});
    let evs = h.txn(&[("res_partner", I, PARTNER_1)]);
    assert_eq!(
        brief(&evs),
        vec![
            up("a_plain", "partner", "1", plain("a@acme.example")),
            up("b_masked", "partner", "1", masked.clone()),
            up("c_plain", "partner", "1", plain("a@acme.example")),
        ]
    );
    // Only the masked field changes: the masking target's document is the same.
    let evs = h.txn(&[(
        "res_partner",
        U,
        &[("id", Some("1")), ("email", Some("b@acme.example"))],
    )]);
    assert_eq!(
        brief(&evs),
        vec![
            up("a_plain", "partner", "1", plain("b@acme.example")),
            up("c_plain", "partner", "1", plain("b@acme.example")),
        ]
    );
    // The same row again: nothing for anyone.
    let evs = h.txn(&[(
        "res_partner",
        U,
        &[("id", Some("1")), ("email", Some("b@acme.example"))],
    )]);
    assert_eq!(brief(&evs), vec![]);
}

#[test]
fn routing_and_no_op_suppression_per_target() {
    let mut h = policy_harness(true);
    h.txn(&[("res_partner", I, PARTNER_1)]);
    let erp_doc = |r: &str, company: i64| {
        json!({"name": "Acme", "email": "a@acme.example", "ref": hmac_hex("k3y", r),
               "iban": "DE89 3704 0044 0532 0130 00", "company": company})
    };
    let crm_doc = |r: &str, company: i64| {
        json!({"name": "Acme", "email": "a@acme.example", "ref": r,
               "iban": "DE89 3704 0044 0532 0130 00", "company": company})
    };
    // (label, change, events, audit decisions)
    let cases: Vec<(&str, Row, Vec<Brief>, Vec<&str>)> = vec![
        (
            "a field wms does not receive",
            &[("id", Some("1")), ("ref", Some("R2"))],
            vec![
                up("crm", "partner", "1", crm_doc("R2", 1)),
                up("erp", "partner", "1", erp_doc("R2", 1)),
            ],
            vec![
                "partner 1 wms suppressed",
                "partner 1 erp delivered",
                "partner 1 erp redacted",
                "partner 1 crm delivered",
            ],
        ),
        (
            "an unmapped column only",
            &[("id", Some("1")), ("note", Some("x"))],
            vec![],
            vec![
                "partner 1 wms suppressed",
                "partner 1 erp suppressed",
                "partner 1 crm suppressed",
            ],
        ),
        (
            "leaves crm's route",
            &[("id", Some("1")), ("company_id", Some("2"))],
            vec![
                del("crm", "partner", "1", json!({"id": 1})),
                up("erp", "partner", "1", erp_doc("R2", 2)),
            ],
            vec![
                "partner 1 wms suppressed",
                "partner 1 erp delivered",
                "partner 1 erp redacted",
                "partner 1 crm unpublished",
            ],
        ),
        (
            "outside the route",
            &[("id", Some("1")), ("ref", Some("R3"))],
            vec![up("erp", "partner", "1", erp_doc("R3", 2))],
            vec![
                "partner 1 wms suppressed",
                "partner 1 erp delivered",
                "partner 1 erp redacted",
                "partner 1 crm not_routed",
            ],
        ),
        (
            "back in the route",
            &[("id", Some("1")), ("company_id", Some("1"))],
            vec![
                up("crm", "partner", "1", crm_doc("R3", 1)),
                up("erp", "partner", "1", erp_doc("R3", 1)),
            ],
            vec![
                "partner 1 wms suppressed",
                "partner 1 erp delivered",
                "partner 1 erp redacted",
                "partner 1 crm delivered",
            ],
        ),
    ];
    for (label, change, want, decisions) in cases {
        let evs = h.txn(&[("res_partner", U, change)]);
        assert_eq!(brief(&evs), sorted(want), "{label}");
        assert_eq!(h.decisions(), decisions, "{label}");
    }
    // A record never in the route is never sent there.
    let evs = h.txn(&[(
        "res_partner",
        I,
        &[
            ("id", Some("2")),
            ("name", Some("B")),
            ("company_id", Some("2")),
        ],
    )]);
    let targets: Vec<&str> = evs.iter().map(|e| e.target.as_str()).collect();
    assert_eq!(targets, vec!["wms", "erp"]);
    assert!(h
        .decisions()
        .contains(&"partner 2 crm not_routed".to_string()));
}

// ---------------------------------------------------------------------------
// 8. Snapshots govern like the stream.

const SNAP: &str = r#"
[entities.product]
table = "product_template"
fields = { sku = "default_code", name = "name", price = "list_price" }
publish_when = "row.state == 'approved'"
[[entities.product.rules]]
name = "sku_format"
regex = { field = "sku", pattern = "^[A-Z]+_[0-9]+$" }
[entities.bom]
table = "mrp_bom"
fields = { code = "code" }
children = { lines = { table = "mrp_bom_line", parent = "bom_id", fields = { qty = "product_qty", product = { ref = "product_id", entity = "product", key = "sku" } } } }
[targets.wms]
type = "http"
url = "http://localhost:1/"
entities = ["product", "bom"]
[targets.crm]
type = "http"
url = "http://localhost:1/"
entities = ["product"]
route = "row.company_id == 1"
"#;

fn priced(
    id: &'static str,
    sku: &'static str,
    state: &'static str,
    company: &'static str,
) -> OwnedRow<'static> {
    vec![
        ("id", Some(id)),
        ("default_code", Some(sku)),
        ("name", Some("Desk")),
        ("state", Some(state)),
        ("list_price", Some("10.50")),
        ("company_id", Some(company)),
    ]
}

#[test]
fn a_snapshot_row_delivers_the_same_bytes_as_a_streamed_insert() {
    let p1 = priced("1", "P_1", "approved", "1");
    let bom: Row = &[("id", Some("10")), ("code", Some("B"))];
    let l1 = line("101", "10", "1", "2");
    let l2 = line("102", "10", "1", "4");

    let mut stream = Harness::new(SNAP);
    let streamed = stream.txn(&[
        ("product_template", I, &p1),
        ("mrp_bom", I, bom),
        ("mrp_bom_line", I, &l1),
        ("mrp_bom_line", I, &l2),
    ]);
    assert_eq!(streamed.len(), 3, "{streamed:#?}");

    let mut snap = Harness::new(SNAP);
    // Start-up read of the tracked tables, then each entity's snapshot.
    snap.seed("product", &[&p1]);
    snap.seed("bom.lines", &[&l1, &l2]);
    let consistent = Lsn(0x9000);
    let mut snapped = snap.snapshot("product", &[&p1], consistent, &["wms", "crm"], false);
    snapped.extend(snap.snapshot("bom", &[bom], consistent, &["wms"], false));
    assert_eq!(snapped.len(), 3, "{snapped:#?}");

    for s in &snapped {
        let e = streamed
            .iter()
            .find(|e| (&e.target, &e.entity, &e.key) == (&s.target, &s.entity, &s.key))
            .unwrap_or_else(|| panic!("no streamed event for {s:?}"));
        assert_eq!(
            s.raw, e.raw,
            "same data bytes for {} {} {}",
            s.target, s.entity, s.key
        );
        assert_eq!(s.op, "upsert");
        assert_eq!(s.change, Some(SourceChange::Snapshot));
        assert_eq!(s.version, 0x9000 - 1);
        assert_eq!(
            s.id,
            format!("snap-0000000000009000-{}-{}", s.entity, s.key)
        );
    }
    assert!(
        snapped.iter().any(|s| s.raw.contains(r#""price":10.50"#)),
        "numerics keep their digits"
    );
}

#[test]
fn a_snapshot_of_rows_steward_holds_already_sends_them_and_stores_none_again() {
    let mut h = Harness::new(SNAP);
    let p1 = priced("1", "P_1", "approved", "1");
    let p2 = priced("2", "P_2", "approved", "1");
    h.seed("product", &[&p1, &p2]);
    assert_eq!(h.rows_written.len(), 2);
    let consistent = Lsn(0x9000);
    let evs = h.snapshot("product", &[&p1, &p2], consistent, &["wms", "crm"], false);
    assert_eq!(evs.len(), 4, "every target gets every record: {evs:#?}");
    assert!(
        h.rows_written.is_empty(),
        "unchanged rows are not written again: {:?}",
        h.rows_written
    );

    // A row that changed since it was read (another company: not for crm
    // any more) is stored and decided on as it is now; a re-read sends
    // only what differs.
    let moved = priced("2", "P_2", "approved", "2");
    let evs = h.snapshot(
        "product",
        &[&p1, &moved],
        Lsn(0x9100),
        &["wms", "crm"],
        false,
    );
    assert_eq!(
        h.rows_written,
        vec![("product".to_string(), "2".to_string())]
    );
    assert_eq!(
        brief(&evs),
        vec![del("crm", "product", "2", json!({"id": 2}))]
    );
    let status = h.restarted().record_status("product", "2").unwrap();
    assert_eq!(status.row.unwrap()["company_id"], json!(2));
}

#[test]
fn a_snapshot_sends_nothing_for_gated_quarantined_or_unrouted_records() {
    let mut h = Harness::new(SNAP);
    let rows: [&[(&str, Option<&str>)]; 4] = [
        &priced("3", "P_3", "draft", "1"),
        &priced("4", "bad", "approved", "1"),
        &priced("5", "P_5", "approved", "2"),
        &priced("6", "P_6", "approved", "1"),
    ];
    let evs = h.snapshot("product", &rows, Lsn(0x9000), &["wms", "crm"], false);
    let got: Vec<(String, String)> = evs
        .iter()
        .map(|e| (e.target.clone(), e.key.clone()))
        .collect();
    assert_eq!(
        got,
        vec![
            ("wms".to_string(), "5".to_string()),
            ("wms".to_string(), "6".to_string()),
            ("crm".to_string(), "6".to_string()),
        ]
    );
    assert_eq!(h.held_keys(), vec!["product 4"]);
    let d = h.decisions();
    for needed in [
        "product 3 wms gated",
        "product 3 crm gated",
        "product 5 crm not_routed",
    ] {
        assert!(d.contains(&needed.to_string()), "{needed} in {d:?}");
    }
}

#[test]
fn one_read_for_two_targets_counts_what_each_found() {
    let mut h = Harness::new(SNAP);
    let p6 = priced("6", "P_6", "approved", "1");
    assert_eq!(h.txn(&[("product_template", I, &p6)]).len(), 2);
    let rows: [&[(&str, Option<&str>)]; 3] = [
        &priced("3", "P_3", "draft", "1"),
        &priced("5", "P_5", "approved", "2"),
        &p6,
    ];
    let (evs, counts) = h.snapshot_counted("product", &rows, Lsn(0x9000), &["wms", "crm"], false);
    let got: Vec<(&str, &str)> = evs
        .iter()
        .map(|e| (e.target.as_str(), e.key.as_str()))
        .collect();
    assert_eq!(got, vec![("wms", "5")], "only what differs, per target");
    // [checked, equal, re-sent, deleted]: the draft is held back for both,
    // 5 is new to wms and not routed to crm, 6 is unchanged everywhere.
    assert_eq!(counts, vec![[3, 2, 1, 0], [3, 3, 0, 0]]);
}

#[test]
fn a_forced_snapshot_re_sends_unchanged_documents_only_to_its_targets() {
    let p1 = priced("1", "P_1", "approved", "1");
    // (force, events)
    for (force, want) in [(false, 0), (true, 1)] {
        let mut h = Harness::new(SNAP);
        let streamed = h.txn(&[("product_template", I, &p1)]);
        assert_eq!(streamed.len(), 2);
        let evs = h.snapshot("product", &[&p1], Lsn(0x9000), &["wms"], force);
        assert_eq!(evs.len(), want, "force = {force}");
        if force {
            assert_eq!(evs[0].target, "wms");
            assert_eq!(
                evs[0].raw,
                streamed.iter().find(|e| e.target == "wms").unwrap().raw
            );
            assert_eq!(h.decisions(), vec!["product 1 wms delivered"]);
        } else {
            assert_eq!(h.decisions(), vec!["product 1 wms suppressed"]);
        }
    }
}

#[test]
fn a_snapshot_skips_records_the_stream_changed_after_its_consistent_point() {
    let mut h = Harness::new(SNAP);
    let product = h.entity("product");
    h.gov.watch(&[product]);
    let consistent = Lsn(h.lsn + 0x10);
    // Streamed after the snapshot's consistent point.
    let evs = h.txn(&[("product_template", I, &priced("1", "P_1", "approved", "1"))]);
    assert_eq!(evs.len(), 2);
    assert!(h.lsn > consistent.0);
    // The snapshot read older values of 1 (and 2, which the stream did not touch).
    let mut old1 = priced("1", "P_1", "approved", "1");
    old1[2].1 = Some("Old desk");
    let evs = h.snapshot(
        "product",
        &[&old1, &priced("2", "P_2", "approved", "1")],
        consistent,
        &["wms"],
        true,
    );
    assert_eq!(
        evs.iter().map(|e| e.key.as_str()).collect::<Vec<_>>(),
        vec!["2"],
        "record 1 is newer in the governance than in the snapshot"
    );
    // Not watched: nothing is remembered, nothing skipped.
    h.gov.watch(&[]);
    let evs = h.snapshot("product", &[&old1], consistent, &["wms"], false);
    assert_eq!(evs.len(), 1);
    assert_eq!(evs[0].data["name"], "Old desk");
}

// ---------------------------------------------------------------------------
// 9. Seeding state from the tables at start-up.

#[test]
fn seeded_records_hold_their_business_keys() {
    let mut h = Harness::new(UNIQUE_PRODUCT);
    h.seed("product", &[&sku("1", "A_1")]);
    assert!(h.decisions().iter().all(|d| !d.contains("delivered")));
    let evs = h.txn(&[("product_template", I, &sku("2", "A_1"))]);
    assert_eq!(brief(&evs), vec![]);
    let held = h.held();
    assert_eq!(held.len(), 1);
    assert_eq!(held[0].1, "2");
    assert!(
        held[0].3.contains("already used by product 1"),
        "{}",
        held[0].3
    );
}

#[test]
fn seeded_lines_complete_a_business_object_on_its_first_change() {
    let mut h = Harness::new(BOM_OBJECT);
    h.seed(
        "product",
        &[&product("1", "P_1", "draft"), &product("2", "P_2", "draft")],
    );
    h.seed(
        "bom.lines",
        &[&line("101", "10", "1", "2"), &line("102", "10", "2", "3")],
    );
    h.seed("bom", &[&[("id", Some("10")), ("code", Some("B"))]]);
    let evs = h.txn(&[(
        "mrp_bom_line",
        U,
        &[("id", Some("101")), ("product_qty", Some("7"))],
    )]);
    assert_eq!(
        brief(&evs),
        vec![up(
            "wms",
            "bom",
            "10",
            json!({"code": "B", "lines": [
                {"qty": 7, "product": "P_1", "id": 101},
                {"qty": 3, "product": "P_2", "id": 102},
            ]})
        )]
    );
}

// ---------------------------------------------------------------------------
// Large transactions, staged on disk and governed in pieces.

/// Transactions exercising folding, deletes, dependencies, quarantine and
/// business objects, each over more records than a piece holds.
/// A row built at run time, kept for the test's whole run.
fn leak(row: OwnedRow<'static>) -> Row<'static> {
    Box::leak(row.into_boxed_slice())
}

fn large_scripts() -> Vec<(&'static str, Vec<Vec<Step<'static>>>)> {
    let chain = vec![
        vec![
            // The BOM is staged before the draft product it references.
            ("mrp_bom", I, BOM_10),
            ("product_template", I, leak(product("1", "P_1", "draft"))),
            ("product_template", I, leak(product("2", "P_2", "approved"))),
            (
                "product_template",
                U,
                &[("id", Some("2")), ("name", Some("Chair"))][..],
            ),
            ("product_template", I, leak(product("3", "bad", "approved"))),
            (
                "product_template",
                U,
                &[("id", Some("2")), ("name", Some("Stool"))][..],
            ),
            ("product_template", I, leak(product("4", "P_4", "approved"))),
            ("product_template", D, &[("id", Some("4"))][..]),
        ],
        vec![
            // Approving the product releases the BOM staged in an earlier piece.
            (
                "mrp_bom",
                U,
                &[("id", Some("10")), ("code", Some("B11"))][..],
            ),
            (
                "product_template",
                U,
                &[("id", Some("3")), ("default_code", Some("P_3"))][..],
            ),
            (
                "product_template",
                U,
                &[("id", Some("2")), ("name", Some("Bench"))][..],
            ),
            (
                "product_template",
                U,
                &[("id", Some("1")), ("state", Some("approved"))][..],
            ),
            (
                "product_template",
                U,
                &[("id", Some("3")), ("name", Some("Lamp"))][..],
            ),
        ],
        vec![
            // A product blocked: its BOM, not changed here, is held.
            (
                "product_template",
                U,
                &[("id", Some("2")), ("name", Some("Seat"))][..],
            ),
            (
                "product_template",
                U,
                &[("id", Some("1")), ("state", Some("draft"))][..],
            ),
            (
                "product_template",
                U,
                &[("id", Some("3")), ("name", Some("Light"))][..],
            ),
            ("product_template", D, &[("id", Some("2"))][..]),
        ],
    ];
    let object = vec![
        vec![
            ("product_template", I, leak(product("1", "P_1", "draft"))),
            ("product_template", I, leak(product("2", "P_2", "draft"))),
            ("mrp_bom", I, &[("id", Some("10")), ("code", Some("B"))][..]),
            ("mrp_bom_line", I, leak(line("102", "10", "2", "3"))),
            ("mrp_bom", I, &[("id", Some("11")), ("code", Some("C"))][..]),
            ("mrp_bom_line", I, leak(line("101", "10", "1", "2"))),
            ("mrp_bom_line", I, leak(line("111", "11", "1", "1"))),
            (
                "mrp_bom",
                U,
                &[("id", Some("10")), ("code", Some("B2"))][..],
            ),
        ],
        vec![
            (
                "mrp_bom_line",
                U,
                &[("id", Some("101")), ("product_qty", Some("5"))][..],
            ),
            (
                "product_template",
                U,
                &[("id", Some("2")), ("default_code", Some("P_9"))][..],
            ),
            ("mrp_bom_line", D, &[("id", Some("102"))][..]),
            ("mrp_bom", I, &[("id", Some("12")), ("code", Some("D"))][..]),
            ("mrp_bom", D, &[("id", Some("12"))][..]),
        ],
    ];
    vec![(CHAIN, chain), (BOM_OBJECT, object)]
}

/// Everything a target can tell apart: event by event, in order.
fn full(evs: &[Ev]) -> Vec<(String, String, String, &'static str, String, u64, String)> {
    evs.iter()
        .map(|e| {
            (
                e.target.clone(),
                e.entity.clone(),
                e.key.clone(),
                e.op,
                e.raw.clone(),
                e.version,
                e.id.clone(),
            )
        })
        .collect()
}

#[test]
fn a_large_transaction_governed_in_pieces_sends_what_an_ordinary_one_sends() {
    for (config, script) in large_scripts() {
        for piece in [1, 2, 3, 5] {
            let mut ordinary = Harness::new(config);
            let mut large = Harness::large(config, piece);
            for (n, steps) in script.iter().enumerate() {
                let expected = ordinary.txn(steps);
                let got = large.txn(steps);
                assert_eq!(
                    full(&got),
                    full(&expected),
                    "transaction {n} in pieces of {piece}"
                );
                assert_eq!(
                    large.held(),
                    ordinary.held(),
                    "transaction {n}, piece {piece}"
                );
                assert_eq!(large.decisions(), ordinary.decisions());
                assert_eq!(
                    large.gov.record_counts(),
                    ordinary.gov.record_counts(),
                    "transaction {n}, piece {piece}"
                );
                for c in ordinary.gov.record_counts() {
                    // Each checks the kept counts against a restart's.
                    ordinary.counts(&c.entity);
                    large.counts(&c.entity);
                }
                let mut seen = HashSet::new();
                for e in &got {
                    assert!(
                        seen.insert((e.target.clone(), e.entity.clone(), e.key.clone())),
                        "two events of {} {} in one transaction",
                        e.entity,
                        e.key
                    );
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------
// 10. Values steward cannot encode.

/// `attrs` nested `depth` levels deep.
fn nested(depth: usize) -> String {
    format!("{}1{}", "[".repeat(depth), "]".repeat(depth))
}

const ATTRIBUTES: &str = r#"
[entities.attr]
table = "product_attribute"
fields = { name = "name", attrs = "attrs", weight = "weight", price = "price", sold_on = "sold_on", seen_at = "seen_at" }
[targets.wms]
type = "http"
url = "http://localhost:1/"
entities = ["attr"]
"#;

/// The same entity, tracked (its product reference is resolved), next to products.
const TRACKED_ATTRIBUTES: &str = r#"
[entities.product]
table = "product_template"
fields = { sku = "default_code" }
[entities.attr]
table = "product_attribute"
fields = { name = "name", attrs = "attrs", product = { ref = "product_id", entity = "product", key = "sku" } }
[targets.wms]
type = "http"
url = "http://localhost:1/"
entities = ["product", "attr"]
"#;

fn attr<'a>(id: &'a str, attrs: &'a str) -> OwnedRow<'a> {
    vec![
        ("id", Some(id)),
        ("product_id", Some("1")),
        ("name", Some("colour")),
        ("attrs", Some(attrs)),
    ]
}

fn assert_held_for_encoding(h: &Harness, key: &str) {
    let held = h.held();
    let q = held
        .iter()
        .find(|q| q.0 == "attr" && q.1 == key)
        .unwrap_or_else(|| panic!("attr {key} held: {held:?}"));
    assert_eq!(q.2, "encoding");
    for needed in [
        "column 'attrs'",
        "public.product_attribute",
        "field 'attrs'",
        "nested deeper than 100 levels",
        "released by its next change",
    ] {
        assert!(q.3.contains(needed), "{needed} in {}", q.3);
    }
}

#[test]
fn a_value_steward_cannot_encode_quarantines_only_its_record() {
    let deep = nested(200);
    let mut h = Harness::new(ATTRIBUTES);
    let evs = h.txn(&[
        ("product_attribute", I, &attr("1", r#"{"a": 1}"#)),
        ("product_attribute", I, &attr("2", &deep)),
        (
            "product_attribute",
            I,
            &[
                ("id", Some("3")),
                ("weight", Some("NaN")),
                ("price", Some("-Infinity")),
                ("sold_on", Some("0044-03-15 BC")),
                ("seen_at", Some("10000-01-01 00:00:00")),
            ],
        ),
    ]);
    let keys: Vec<&str> = evs.iter().map(|e| e.key.as_str()).collect();
    assert_eq!(
        keys,
        vec!["1", "3"],
        "the commit's other records are delivered"
    );
    assert_eq!(
        evs[1].raw,
        r#"{"name":null,"attrs":null,"weight":"NaN","price":"-Infinity","sold_on":"-0043-03-15","seen_at":"+10000-01-01T00:00:00Z"}"#
    );
    assert_held_for_encoding(&h, "2");
    assert_eq!(h.held().len(), 1);
    assert!(h.decisions().contains(&"attr 2 - quarantined".to_string()));
    let q = h.gov.quarantined()[0].clone();
    assert_eq!(
        q.document,
        json!({"name": "colour", "weight": null, "price": null, "sold_on": null, "seen_at": null}),
        "the withheld document holds the values that could be encoded"
    );

    // Another change that cannot be encoded keeps it held; a good one releases it.
    let evs = h.txn(&[(
        "product_attribute",
        U,
        &[("id", Some("2")), ("name", Some("size"))],
    )]);
    assert!(evs.is_empty());
    assert_held_for_encoding(&h, "2");
    let evs = h.txn(&[(
        "product_attribute",
        U,
        &[("id", Some("2")), ("attrs", Some("[[1]]"))],
    )]);
    assert_eq!(
        brief(&evs),
        vec![up(
            "wms",
            "attr",
            "2",
            json!({"name": "size", "attrs": [[1]], "weight": null, "price": null, "sold_on": null, "seen_at": null})
        )]
    );
    assert!(h.held().is_empty());
    assert_eq!(
        h.decisions(),
        vec!["attr 2 - released", "attr 2 wms delivered"]
    );

    // A delete of a held record is delivered like any other and releases it.
    h.txn(&[(
        "product_attribute",
        U,
        &[("id", Some("2")), ("attrs", Some(&deep))],
    )]);
    assert_held_for_encoding(&h, "2");
    let evs = h.txn(&[("product_attribute", D, &[("id", Some("2"))])]);
    assert_eq!(brief(&evs), vec![del("wms", "attr", "2", json!({"id": 2}))]);
    assert!(h.held().is_empty());
}

#[test]
fn within_one_transaction_the_records_last_change_decides_whether_it_encodes() {
    let deep = nested(101);
    let mut h = Harness::new(ATTRIBUTES);
    let evs = h.txn(&[
        ("product_attribute", I, &attr("1", &deep)),
        (
            "product_attribute",
            U,
            &[("id", Some("1")), ("attrs", Some("[1]"))],
        ),
        ("product_attribute", I, &attr("2", "[2]")),
        (
            "product_attribute",
            U,
            &[("id", Some("2")), ("attrs", Some(&deep))],
        ),
    ]);
    assert_eq!(brief(&evs).len(), 1);
    assert_eq!(evs[0].key, "1");
    assert_eq!(evs[0].data["attrs"], json!([1]));
    assert_held_for_encoding(&h, "2");
    assert_eq!(h.held().len(), 1);
}

#[test]
fn a_tracked_record_held_for_encoding_waits_for_a_change_of_its_own() {
    let deep = nested(150);
    let mut h = Harness::new(TRACKED_ATTRIBUTES);
    h.txn(&[
        (
            "product_template",
            I,
            &[("id", Some("1")), ("default_code", Some("P_1"))],
        ),
        ("product_attribute", I, &attr("7", &deep)),
    ]);
    assert_held_for_encoding(&h, "7");

    // Its product changes: the re-evaluation from the tracked row cannot
    // tell whether the value is fixed, so it stays held (nothing sent).
    let evs = h.txn(&[(
        "product_template",
        U,
        &[("id", Some("1")), ("default_code", Some("P_2"))],
    )]);
    assert_eq!(
        brief(&evs),
        vec![up("wms", "product", "1", json!({"sku": "P_2"}))]
    );
    assert_held_for_encoding(&h, "7");

    // An operator release re-evaluates it: still failing.
    let released = h.gov.release("attr", "7", Lsn(0x9000), "t").unwrap();
    assert!(released.events.is_empty());
    assert!(released
        .still_failing
        .as_deref()
        .is_some_and(|m| m.contains("nested deeper than 100 levels")));
    assert_held_for_encoding(&h, "7");

    // A change that can be encoded releases and delivers it.
    let evs = h.txn(&[(
        "product_attribute",
        U,
        &[("id", Some("7")), ("attrs", Some(r#"{"k": "v"}"#))],
    )]);
    assert_eq!(
        brief(&evs),
        vec![up(
            "wms",
            "attr",
            "7",
            json!({"name": "colour", "attrs": {"k": "v"}, "product": "P_2"})
        )]
    );
    assert!(h.held().is_empty());
}

#[test]
fn a_snapshot_row_steward_cannot_encode_is_quarantined_and_the_others_delivered() {
    let deep = nested(200);
    let mut h = Harness::new(ATTRIBUTES);
    let evs = h.snapshot(
        "attr",
        &[&attr("1", "[1]"), &attr("2", &deep), &attr("3", "{}")],
        Lsn(0x100),
        &["wms"],
        false,
    );
    let keys: Vec<&str> = evs.iter().map(|e| e.key.as_str()).collect();
    assert_eq!(keys, vec!["1", "3"]);
    assert!(evs.iter().all(|e| e.change == Some(SourceChange::Snapshot)));
    assert_held_for_encoding(&h, "2");

    // The start-up read of a tracked table decides the same, sending nothing.
    let mut h = Harness::new(TRACKED_ATTRIBUTES);
    h.seed("attr", &[&attr("4", &deep), &attr("5", "[5]")]);
    assert_held_for_encoding(&h, "4");
    assert_eq!(h.held().len(), 1);
}

#[test]
fn a_document_at_the_depth_limit_is_delivered_and_read_back() {
    let limit = nested(crate::model::value::MAX_JSON_DEPTH);
    let config = r#"
[entities.attr]
table = "product_attribute"
fields = { name = "name", attrs = "attrs" }
[[entities.attr.rules]]
name = "has_attrs"
cel = "row.attrs != null"
[targets.wms]
type = "http"
url = "http://localhost:1/"
entities = ["attr"]
mask = { "attr.name" = "full" }
"#;
    let mut h = Harness::new(config);
    let evs = h.txn(&[("product_attribute", I, &attr("1", &limit))]);
    assert!(h.held().is_empty(), "{:?}", h.held());
    assert_eq!(evs.len(), 1);
    // Inside a delivery envelope, the document still parses back.
    let envelope = format!(r#"{{"events":[{{"data":{}}}]}}"#, evs[0].raw);
    let back: Value = serde_json::from_str(&envelope).expect("parses within serde_json's limit");
    assert_eq!(back["events"][0]["data"]["name"], "***");
    // As the outbox reads an event's data back (a checked raw value).
    assert!(serde_json::value::RawValue::from_string(envelope).is_ok());
}

#[test]
fn a_business_object_with_a_line_steward_cannot_encode_waits_for_that_line() {
    let mut h = Harness::new(BOM_OBJECT);
    h.txn(&[(
        "product_template",
        I,
        &[("id", Some("1")), ("default_code", Some("P_1"))],
    )]);
    // `product_qty` is an int4 column; this text is not an integer.
    let evs = h.txn(&[
        ("mrp_bom", I, &[("id", Some("10")), ("code", Some("B"))]),
        ("mrp_bom_line", I, &line("101", "10", "1", "2")),
        ("mrp_bom_line", I, &line("102", "10", "1", "2x")),
        ("mrp_bom", I, &[("id", Some("11")), ("code", Some("C"))]),
    ]);
    assert_eq!(
        brief(&evs),
        vec![up("wms", "bom", "11", json!({"code": "C", "lines": []}))],
        "the other business object is delivered"
    );
    let held = h.held();
    assert_eq!(held.len(), 2, "{held:?}");
    let line = held
        .iter()
        .find(|q| q.0 == "bom.lines")
        .expect("the line is held");
    assert_eq!((line.1.as_str(), line.2.as_str()), ("102", "encoding"));
    assert!(
        line.3.contains("column 'product_qty'") && line.3.contains("not an integer"),
        "{}",
        line.3
    );
    let bom = held
        .iter()
        .find(|q| q.0 == "bom")
        .expect("the object is held");
    assert_eq!((bom.1.as_str(), bom.2.as_str()), ("10", "encoding"));
    assert!(
        bom.3.starts_with("bom.lines 102: column 'product_qty'"),
        "{}",
        bom.3
    );
    let q = h
        .gov
        .quarantined()
        .into_iter()
        .find(|q| q.entity == "bom")
        .unwrap()
        .clone();
    assert_eq!(q.blocked_by.as_deref(), Some("bom.lines 102"));

    // A change of another line re-evaluates the object: still held.
    let evs = h.txn(&[(
        "mrp_bom_line",
        U,
        &[("id", Some("101")), ("product_qty", Some("3"))],
    )]);
    assert!(evs.is_empty(), "{evs:?}");
    assert_eq!(h.held().len(), 2);

    // The line is fixed: both released, the object delivered in full.
    let evs = h.txn(&[(
        "mrp_bom_line",
        U,
        &[("id", Some("102")), ("product_qty", Some("4"))],
    )]);
    assert_eq!(
        brief(&evs),
        vec![up(
            "wms",
            "bom",
            "10",
            json!({"code": "B", "lines": [
                {"qty": 3, "product": "P_1", "id": 101},
                {"qty": 4, "product": "P_1", "id": 102},
            ]})
        )]
    );
    assert!(h.held().is_empty(), "{:?}", h.held());
}

#[test]
fn records_gone_from_the_table_after_a_restore_are_deleted_where_they_were_delivered() {
    let mut h = Harness::new(&gate_config("delete"));
    let evs = h.txn(&[
        (
            "product_template",
            I,
            &[
                ("id", Some("1")),
                ("default_code", Some("A_1")),
                ("state", Some("approved")),
            ],
        ),
        (
            "product_template",
            I,
            &[
                ("id", Some("2")),
                ("default_code", Some("A_2")),
                ("state", Some("draft")),
            ],
        ),
        (
            "product_template",
            I,
            &[
                ("id", Some("3")),
                ("default_code", Some("A_3")),
                ("state", Some("approved")),
            ],
        ),
    ]);
    assert_eq!(evs.len(), 2, "{evs:?}");
    let e = h.entity("product");
    let present: HashSet<String> = ["3".to_string()].into();
    let (out, gone) = h.gov.prune_absent(e, &present, Lsn(0x9000), "t");
    assert_eq!(gone, 2);
    let evs = h.finish(out);
    assert_eq!(
        brief(&evs),
        [del("wms", "product", "1", json!({ "id": 1 }))],
        "only the delivered record is deleted; the draft never reached the target"
    );
    assert_eq!(evs[0].version, 0x9000);
    assert!(
        evs[0].id.contains("-P"),
        "ids of repair deletes are their own: {}",
        evs[0].id
    );
    assert!(
        h.decisions().contains(&"product 2 wms gated".to_string()),
        "{:?}",
        h.decisions()
    );
    assert_eq!(h.gov.tracked_count(e), 1);
    // Pruned records are forgotten: a record of the same key is new again.
    let evs = h.txn(&[(
        "product_template",
        I,
        &[
            ("id", Some("1")),
            ("default_code", Some("A_1")),
            ("state", Some("approved")),
        ],
    )]);
    assert_eq!(brief(&evs).len(), 1);
}

// ---------------------------------------------------------------------------
// 12. Record states, the record view and what exceptions hold back.

/// The CHAIN entities with two targets, the second routed by company.
const VIEW: &str = r#"
[entities.product]
table = "product_template"
fields = { sku = "default_code", name = "name" }
publish_when = "row.state == 'approved'"
[[entities.product.rules]]
name = "sku_format"
regex = { field = "sku", pattern = "^[A-Z]+_[0-9]+$" }
[entities.bom]
table = "mrp_bom"
fields = { code = "code", product = { ref = "product_tmpl_id", entity = "product", key = "sku" } }
[[entities.bom.rules]]
name = "product_ok"
reference = { field = "product_tmpl_id", entity = "product" }
[targets.wms]
type = "http"
url = "http://localhost:1/"
entities = ["product", "bom"]
[targets.crm]
type = "http"
url = "http://localhost:1/"
entities = ["product"]
route = "row.company_id == 1"
"#;

fn bom(id: &'static str, product: &'static str) -> OwnedRow<'static> {
    vec![
        ("id", Some(id)),
        ("product_tmpl_id", Some(product)),
        ("code", Some("B")),
    ]
}

fn decisions_of(status: &RecordStatus) -> Vec<(String, TargetDecision)> {
    status
        .targets
        .iter()
        .map(|t| (t.target.clone(), t.decision))
        .collect()
}

fn targets(list: &[(&str, TargetDecision)]) -> Vec<(String, TargetDecision)> {
    list.iter().map(|(t, d)| ((*t).to_string(), *d)).collect()
}

#[test]
fn a_summary_is_taken_only_by_the_configuration_it_was_made_for() {
    let mut h = Harness::new(CHAIN);
    h.txn(&[("product_template", I, &product("1", "P_1", "draft"))]);
    let summary = h.gov.summary();
    assert!(Governance::new(&h.config).restore_summary(&summary));
    let other_gate = CHAIN.replace("row.state == 'approved'", "row.state != 'draft'");
    assert!(!Governance::new(&config(&other_gate)).restore_summary(&summary));
    assert!(!Governance::new(&h.config).restore_summary(&summary[..summary.len() - 1]));
    assert!(!Governance::new(&h.config).restore_summary(b""));
    // The restored counts stand without reading the rows that gave them.
    let mut gov = Governance::new(&h.config);
    assert!(gov.restore_summary(&summary));
    assert!(!GovLoader::wants_rows(&gov, "product"));
    let product = gov
        .record_counts()
        .into_iter()
        .find(|c| c.entity == "product")
        .unwrap();
    assert_eq!((product.published, product.pending_approval), (0, 1));
}

#[test]
fn record_counts_follow_every_decision_and_survive_a_restart() {
    let mut h = Harness::new(CHAIN);
    assert_eq!(h.counts("product"), (0, 0, 0, 0));
    // A draft product and a BOM waiting for it.
    h.txn(&[
        ("product_template", I, &product("1", "P_1", "draft")),
        ("mrp_bom", I, BOM_10),
    ]);
    assert_eq!(h.counts("product"), (0, 1, 0, 0), "pending approval");
    assert_eq!(h.counts("bom"), (0, 0, 0, 1), "blocked by the draft");

    // Approved: both published.
    h.txn(&[(
        "product_template",
        U,
        &[("id", Some("1")), ("state", Some("approved"))],
    )]);
    assert_eq!(h.counts("product"), (1, 0, 0, 0));
    assert_eq!(h.counts("bom"), (1, 0, 0, 0));

    // A rule fails: the product is quarantined, the BOM blocked by it.
    h.txn(&[(
        "product_template",
        U,
        &[("id", Some("1")), ("default_code", Some("bad"))],
    )]);
    assert_eq!(h.counts("product"), (0, 0, 1, 0));
    assert_eq!(h.counts("bom"), (0, 0, 0, 1));

    // A second product with a bad SKU while in draft: gated, not validated.
    h.txn(&[("product_template", I, &product("2", "bad", "draft"))]);
    assert_eq!(h.counts("product"), (0, 1, 1, 0));

    // Fixed: published again, and so is the BOM.
    h.txn(&[(
        "product_template",
        U,
        &[("id", Some("1")), ("default_code", Some("P_1"))],
    )]);
    assert_eq!(h.counts("product"), (1, 1, 0, 0));
    assert_eq!(h.counts("bom"), (1, 0, 0, 0));

    // Deletes leave every count.
    h.txn(&[
        ("mrp_bom", D, &[("id", Some("10"))]),
        ("product_template", D, &[("id", Some("2"))]),
    ]);
    assert_eq!(h.counts("product"), (1, 0, 0, 0));
    assert_eq!(h.counts("bom"), (0, 0, 0, 0));

    // Inserted and deleted in one transaction: never counted.
    h.txn(&[
        ("product_template", I, &product("3", "bad", "approved")),
        ("product_template", D, &[("id", Some("3"))]),
    ]);
    assert_eq!(h.counts("product"), (1, 0, 0, 0));
}

#[test]
fn record_counts_cover_seeded_and_snapshot_records() {
    let mut h = Harness::new(CHAIN);
    h.seed(
        "product",
        &[
            &product("1", "P_1", "approved"),
            &product("2", "P_2", "draft"),
            &product("3", "bad", "approved"),
        ],
    );
    h.seed("bom", &[BOM_10, &bom("11", "2"), &bom("12", "3")]);
    assert_eq!(h.counts("product"), (1, 1, 1, 0));
    assert_eq!(h.counts("bom"), (1, 0, 0, 2));

    // Nothing is counted for an entity whose rows steward does not track.
    let h = Harness::new(PLAIN_PRODUCT);
    assert!(h.gov.record_counts().is_empty());
}

#[test]
fn a_record_on_one_target_and_not_routed_to_another_counts_as_published() {
    let mut h = Harness::new(VIEW);
    let mut row = product("1", "P_1", "approved");
    row.push(("company_id", Some("2")));
    let evs = h.txn(&[("product_template", I, &row)]);
    assert_eq!(evs.len(), 1, "{evs:?}");
    assert_eq!(h.counts("product"), (1, 0, 0, 0));
    let status = h.gov.record_status("product", "1").unwrap();
    assert_eq!(status.state, Some(RecordState::Published));
    assert_eq!(
        decisions_of(&status),
        targets(&[
            ("wms", TargetDecision::Delivered),
            ("crm", TargetDecision::NotRouted)
        ])
    );
    assert_eq!(status.targets[0].up_to_date, Some(true));
    assert_eq!(
        status.targets[0].document,
        Some(json!({"sku": "P_1", "name": "Desk"}))
    );
}

#[test]
fn the_record_view_of_a_draft_and_of_the_bom_waiting_for_it() {
    let mut h = Harness::new(VIEW);
    h.txn(&[
        ("product_template", I, &product("1", "P_1", "draft")),
        ("mrp_bom", I, &bom("10", "1")),
        ("mrp_bom", I, &bom("11", "1")),
    ]);

    let p = h.gov.record_status("product", "1").unwrap();
    assert_eq!(p.state, Some(RecordState::PendingApproval));
    let gate = p.gate.as_ref().unwrap();
    assert_eq!(
        (gate.expression.as_str(), gate.passes),
        ("row.state == 'approved'", false)
    );
    assert!(p.quarantine.is_none());
    assert_eq!(
        decisions_of(&p),
        targets(&[
            ("wms", TargetDecision::Gated),
            ("crm", TargetDecision::Gated)
        ])
    );
    assert!(p.blocked_by.is_empty(), "the gate holds it, not a record");
    let blocks: Vec<(&str, &str, &str)> = p
        .blocks
        .iter()
        .map(|r| (r.entity.as_str(), r.key.as_str(), r.via.as_str()))
        .collect();
    assert_eq!(
        blocks,
        vec![("bom", "10", "product_ok"), ("bom", "11", "product_ok")]
    );
    assert!(p
        .blocks
        .iter()
        .all(|r| r.state == Some(RecordState::Blocked)));
    assert_eq!(p.dependents_total, 2);
    assert_eq!(p.dependents[0].via, "product_tmpl_id");
    assert_eq!(p.row.as_ref().unwrap()["default_code"], json!("P_1"));

    let b = h.gov.record_status("bom", "10").unwrap();
    assert_eq!(b.state, Some(RecordState::Blocked));
    let q = b.quarantine.as_ref().unwrap();
    assert_eq!(
        (q.rule.as_str(), q.blocked_by.as_deref()),
        ("product_ok", Some("product 1"))
    );
    assert_eq!(b.blocked_by.len(), 1);
    let blocker = &b.blocked_by[0];
    assert_eq!(
        (
            blocker.entity.as_str(),
            blocker.key.as_str(),
            blocker.rule.as_str(),
            blocker.state
        ),
        (
            "product",
            "1",
            "product_ok",
            Some(RecordState::PendingApproval)
        )
    );
    assert!(
        blocker.reason.contains("publish_when"),
        "{}",
        blocker.reason
    );
    assert_eq!(
        decisions_of(&b),
        targets(&[("wms", TargetDecision::Quarantined)])
    );
    assert_eq!(
        b.targets[0].document,
        Some(json!({"code": "B", "product": "P_1"}))
    );
    assert_eq!(
        h.gov
            .held_back()
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
        vec!["2 bom records blocked by 1 product pending approval"]
    );

    // Approved: everything delivered and up to date, nothing held back.
    h.txn(&[(
        "product_template",
        U,
        &[("id", Some("1")), ("state", Some("approved"))],
    )]);
    let b = h.gov.record_status("bom", "10").unwrap();
    assert_eq!(b.state, Some(RecordState::Published));
    assert!(b.quarantine.is_none() && b.blocked_by.is_empty());
    assert_eq!(
        decisions_of(&b),
        targets(&[("wms", TargetDecision::Delivered)])
    );
    assert_eq!(b.targets[0].up_to_date, Some(true));
    assert!(h
        .gov
        .record_status("product", "1")
        .unwrap()
        .blocks
        .is_empty());
    assert!(h.gov.held_back().is_empty());

    // A rule fails: the target keeps the earlier document, no longer current.
    h.txn(&[(
        "product_template",
        U,
        &[("id", Some("1")), ("default_code", Some("bad"))],
    )]);
    let p = h.gov.record_status("product", "1").unwrap();
    assert_eq!(p.state, Some(RecordState::Quarantined));
    assert_eq!(p.quarantine.as_ref().unwrap().rule, "sku_format");
    assert_eq!(p.targets[0].decision, TargetDecision::Delivered);
    assert_eq!(p.targets[0].up_to_date, Some(false));
    assert_eq!(
        h.gov
            .held_back()
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
        vec!["2 bom records blocked by 1 quarantined product"]
    );
}

#[test]
fn the_record_view_of_unknown_records_and_entities() {
    let mut h = Harness::new(VIEW);
    let none = h.gov.record_status("product", "404").unwrap();
    assert_eq!(none.state, None);
    assert!(none.row.is_none() && none.gate.is_none());
    assert_eq!(
        decisions_of(&none),
        targets(&[
            ("wms", TargetDecision::Undecided),
            ("crm", TargetDecision::Undecided)
        ])
    );
    assert!(h.gov.record_status("nope", "1").is_err());

    // A BOM waiting for a product steward has never seen.
    h.txn(&[("mrp_bom", I, &bom("10", "7"))]);
    let b = h.gov.record_status("bom", "10").unwrap();
    assert_eq!(b.state, Some(RecordState::Blocked));
    assert_eq!(b.blocked_by[0].key, "7");
    assert_eq!(b.blocked_by[0].state, None);
    assert_eq!(
        h.gov
            .held_back()
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
        vec!["1 bom record blocked by 1 missing product"]
    );
}

#[test]
fn the_record_view_serializes_states_in_snake_case() {
    let mut h = Harness::new(VIEW);
    h.txn(&[("product_template", I, &product("1", "P_1", "draft"))]);
    let json = serde_json::to_value(h.gov.record_status("product", "1").unwrap()).unwrap();
    assert_eq!(json["state"], json!("pending_approval"));
    assert_eq!(json["targets"][0]["decision"], json!("gated"));
    let back: RecordStatus = serde_json::from_value(json).unwrap();
    assert_eq!(back.state, Some(RecordState::PendingApproval));
    let counts = serde_json::to_value(h.gov.record_counts()).unwrap();
    let product = counts
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["entity"] == "product")
        .unwrap();
    assert_eq!(product["pending_approval"], json!(1));
}

#[test]
fn a_business_object_held_for_its_own_line_counts_as_quarantined_not_blocked() {
    let mut h = Harness::new(BOM_OBJECT);
    h.txn(&[(
        "product_template",
        I,
        &[("id", Some("1")), ("default_code", Some("P_1"))],
    )]);
    h.txn(&[
        ("mrp_bom", I, &[("id", Some("10")), ("code", Some("B"))]),
        ("mrp_bom_line", I, &line("101", "10", "1", "2x")),
        ("mrp_bom", I, &[("id", Some("11")), ("code", Some("C"))]),
    ]);
    assert_eq!(h.counts("bom"), (1, 0, 1, 0));
    assert!(
        h.gov.held_back().is_empty(),
        "its own line is not another record"
    );
    assert!(h.gov.record_status("bom.lines", "101").is_err());
    let b = h.gov.record_status("bom", "10").unwrap();
    assert_eq!(b.state, Some(RecordState::Quarantined));
    assert_eq!(
        b.blocked_by
            .iter()
            .map(|x| (x.entity.as_str(), x.key.as_str(), x.rule.as_str()))
            .collect::<Vec<_>>(),
        vec![("bom.lines", "101", "encoding")]
    );
    let p = h.gov.record_status("product", "1").unwrap();
    assert_eq!(
        (
            p.dependents_total,
            p.dependents[0].entity.as_str(),
            p.dependents[0].via.as_str()
        ),
        (1, "bom", "lines.product_id")
    );

    h.txn(&[(
        "mrp_bom_line",
        U,
        &[("id", Some("101")), ("product_qty", Some("2"))],
    )]);
    assert_eq!(h.counts("bom"), (2, 0, 0, 0));
}

#[test]
fn records_in_state_lists_the_keys_of_one_state_in_key_order() {
    let mut h = Harness::new(VIEW);
    h.txn(&[
        ("product_template", I, &product("10", "P_10", "draft")),
        ("product_template", I, &product("9", "P_9", "draft")),
        ("product_template", I, &product("2", "P_2", "approved")),
        ("mrp_bom", I, &bom("7", "9")),
    ]);
    let pending = h
        .gov
        .records_in_state("product", RecordState::PendingApproval, 10)
        .unwrap();
    assert_eq!(
        pending,
        (vec!["9".to_string(), "10".to_string()], 2),
        "numbers by value"
    );
    let first = h
        .gov
        .records_in_state("product", RecordState::PendingApproval, 1)
        .unwrap();
    assert_eq!(first, (vec!["9".to_string()], 2), "limited, total kept");
    assert_eq!(
        h.gov
            .records_in_state("product", RecordState::Published, 10)
            .unwrap(),
        (vec!["2".to_string()], 1)
    );
    assert_eq!(
        h.gov
            .records_in_state("bom", RecordState::Blocked, 10)
            .unwrap(),
        (vec!["7".to_string()], 1)
    );
    // Approved: no longer pending.
    h.txn(&[(
        "product_template",
        U,
        &[("id", Some("9")), ("state", Some("approved"))],
    )]);
    assert_eq!(
        h.gov
            .records_in_state("product", RecordState::PendingApproval, 10)
            .unwrap(),
        (vec!["10".to_string()], 1)
    );
    let e = h
        .gov
        .records_in_state("nope", RecordState::Published, 10)
        .unwrap_err();
    assert!(e.contains("no entity `nope`"), "{e}");
}

const DIFF: &str = r#"
[entities.product]
table = "product_template"
fields = { sku = "default_code", name = "name", secret = "note", price = "list_price" }
[[entities.product.rules]]
name = "sku_format"
regex = { field = "sku", pattern = "^[A-Z]+_[0-9]+$" }
[targets.wms]
type = "http"
url = "http://localhost:1/"
entities = ["product"]
mask = { "product.secret" = "full" }
[targets.crm]
type = "http"
url = "http://localhost:1/"
entities = ["product"]
fields = { product = ["sku", "name"] }
"#;

fn diff_row(
    id: &'static str,
    sku: &'static str,
    secret: &'static str,
    price: &'static str,
) -> OwnedRow<'static> {
    vec![
        ("id", Some(id)),
        ("default_code", Some(sku)),
        ("name", Some("Desk")),
        ("note", Some(secret)),
        ("list_price", Some(price)),
    ]
}

#[test]
fn a_quarantined_record_shows_each_target_what_changed_within_its_policy() {
    let mut h = Harness::new(DIFF);
    h.txn(&[("product_template", I, &diff_row("1", "P_1", "s1", "10"))]);
    h.txn(&[("product_template", U, &diff_row("1", "bad", "s2", "12"))]);
    let p = h.gov.record_status("product", "1").unwrap();
    assert_eq!(p.state, Some(RecordState::Quarantined));
    let wms = &p.targets[0];
    assert_eq!(wms.target, "wms");
    assert_eq!(wms.up_to_date, Some(false));
    let diff = wms
        .diff
        .as_ref()
        .expect("a diff against the delivered document");
    assert!(diff.changed.contains_key("sku"));
    assert_eq!(diff.changed["sku"].delivered, json!("P_1"));
    assert_eq!(diff.changed["sku"].withheld, json!("bad"));
    assert!(diff.changed.contains_key("price"));
    assert!(
        !diff.changed.contains_key("secret") && diff.hidden == ["secret"],
        "a masked field is never shown: {diff:?}"
    );
    // The allow-list of crm drops price and secret: its diff has only sku.
    let crm = &p.targets[1];
    let diff = crm.diff.as_ref().unwrap();
    assert_eq!(diff.changed.keys().collect::<Vec<_>>(), ["sku"]);
    assert!(diff.added.is_empty() && diff.removed.is_empty());

    // Still quarantined after another bad change: the diff is still
    // against the document the targets have.
    h.txn(&[("product_template", U, &diff_row("1", "worse", "s3", "12"))]);
    let p = h.gov.record_status("product", "1").unwrap();
    assert_eq!(
        p.targets[1].diff.as_ref().unwrap().changed["sku"],
        FieldChange {
            delivered: json!("P_1"),
            withheld: json!("worse")
        }
    );
}

#[test]
fn a_record_quarantined_before_any_delivery_says_why_there_is_no_diff() {
    let mut h = Harness::new(DIFF);
    h.txn(&[("product_template", I, &diff_row("1", "bad", "s1", "10"))]);
    let p = h.gov.record_status("product", "1").unwrap();
    assert!(p.targets.iter().all(|t| t.diff.is_none()));
    assert_eq!(
        p.targets[0].diff_note.as_deref(),
        Some("the target has no document of this record")
    );
    let published = h.gov.record_status("product", "2").unwrap();
    assert!(published.targets.iter().all(|t| t.diff_note.is_none()));
}

#[test]
fn documents_diff_by_field() {
    let a = json!({"sku": "A", "gone": 1, "same": true, "lines": [1], "iban": "x"});
    let b = json!({"sku": "B", "new": null, "same": true, "lines": [2], "iban": "y"});
    let diff = diff_documents(
        a.as_object().unwrap(),
        b.as_object().unwrap(),
        &["iban".into(), "lines.qty".into()],
    );
    assert_eq!(diff.added.keys().collect::<Vec<_>>(), ["new"]);
    assert_eq!(diff.removed.get("gone"), Some(&json!(1)));
    assert_eq!(diff.changed.keys().collect::<Vec<_>>(), ["sku"]);
    assert_eq!(diff.hidden, ["iban", "lines"]);
    assert!(!diff.is_empty());
    assert!(diff_documents(a.as_object().unwrap(), a.as_object().unwrap(), &[]).is_empty());
}

// ---------------------------------------------------------------------------
// Deep reconciliation: decided against the target's actual rows.

fn gated(id: &'static str, sku: &'static str, state: &'static str) -> OwnedRow<'static> {
    vec![
        ("id", Some(id)),
        ("default_code", Some(sku)),
        ("state", Some(state)),
    ]
}

/// A row the target holds, written by steward at `version`.
fn held_row(data: Value, version: u64) -> target_rows::TargetRow {
    target_rows::TargetRow {
        data: Some(data),
        deleted: false,
        fields_match: true,
        guard: Some((version, Event::source_id(Lsn(version), 0))),
    }
}

/// A deep reconciliation of `rows` for wms against `actual`: probed (dry
/// run) first, which must find the same, then governed.
fn deep(
    h: &mut Harness,
    rows: &[Row],
    consistent: Lsn,
    actual: &HashMap<String, target_rows::TargetRow>,
) -> (Vec<Ev>, ReconcileCounts) {
    let wms = h.target("wms");
    let actual = Arc::new(ActualRows {
        target: wms,
        rows: actual.clone(),
    });
    let mut probed = h.snapshot_rows("product", rows, consistent);
    let mut mapped = h.snapshot_rows("product", rows, consistent);
    let dry = h
        .gov
        .probe_snapshot(&mut probed, consistent, wms, Some(&actual));
    let read = SnapshotRead {
        targets: vec![wms],
        force: false,
        known_only: false,
        quiet: true,
        actual: Some(actual),
    };
    let mut out = Vec::new();
    let counts = h
        .gov
        .process_snapshot(&mut mapped, consistent, &read, Lsn(h.lsn), &mut out)
        .remove(0);
    assert_eq!(dry, counts, "a dry run finds what the real run repairs");
    (h.finish(out), counts)
}

#[test]
fn a_deep_reconciliation_repairs_what_the_target_holds_not_what_was_sent() {
    let mut h = Harness::new(&gate_config("delete"));
    let rows = [
        gated("1", "A_1", "approved"),
        gated("2", "A_2", "approved"),
        gated("3", "A_3", "draft"),
        gated("4", "A_4", "approved"),
        gated("5", "A_5", "approved"),
    ];
    let steps: Vec<Step> = rows
        .iter()
        .map(|r| ("product_template", I, &r[..]))
        .collect();
    let sent = h.txn(&steps);
    assert_eq!(sent.len(), 4, "{sent:?}");
    let v = sent[0].version;
    // What the target holds, drifted behind steward's back: 1 as sent
    // (jsonb reordered its keys), 2 changed, 3 inserted by hand though
    // gated, 4 deleted, 5 changed with a version beyond steward's.
    let mut actual = HashMap::new();
    actual.insert(
        "1".into(),
        held_row(json!({"state": "approved", "sku": "A_1"}), v),
    );
    actual.insert(
        "2".into(),
        held_row(json!({"sku": "HAND", "state": "approved"}), v),
    );
    actual.insert(
        "3".into(),
        held_row(json!({"sku": "A_3", "state": "draft"}), v),
    );
    actual.insert("5".into(), held_row(json!({"sku": "HAND"}), u64::MAX >> 1));
    let consistent = Lsn(v + 0x100);
    let refs: Vec<Row> = rows.iter().map(|r| &r[..]).collect();
    let (evs, counts) = deep(&mut h, &refs, consistent, &actual);
    assert_eq!(
        sorted(brief(&evs)),
        sorted(vec![
            up(
                "wms",
                "product",
                "2",
                json!({"sku": "A_2", "state": "approved"})
            ),
            del("wms", "product", "3", json!({"id": 3})),
            up(
                "wms",
                "product",
                "4",
                json!({"sku": "A_4", "state": "approved"})
            ),
        ]),
        "nothing for 1 (equal) nor 5 (its guard refuses steward's version)"
    );
    assert!(evs.iter().all(|e| e.version == consistent.0 - 1));
    assert_eq!(
        counts,
        ReconcileCounts {
            checked: 5,
            equal: 1,
            resent: 2,
            deleted: 1,
            changed: 2,
            missing: 1,
            extra: 1,
            unrepairable: 1,
        }
    );
    assert!(
        h.decisions()
            .contains(&"product 5 wms unrepairable".to_string()),
        "{:?}",
        h.decisions()
    );

    // An ordinary reconciliation now agrees: the hashes are those sent,
    // except for 5, which the target is not taken to hold.
    let evs = h.snapshot("product", &refs, Lsn(consistent.0 + 0x100), &["wms"], false);
    assert_eq!(
        brief(&evs),
        vec![up(
            "wms",
            "product",
            "5",
            json!({"sku": "A_5", "state": "approved"})
        )]
    );

    // Once the target holds the repairs, a deep run finds everything equal.
    let repaired: HashMap<String, target_rows::TargetRow> = [
        ("1", json!({"sku": "A_1", "state": "approved"})),
        ("2", json!({"sku": "A_2", "state": "approved"})),
        ("4", json!({"sku": "A_4", "state": "approved"})),
        ("5", json!({"sku": "A_5", "state": "approved"})),
    ]
    .into_iter()
    .map(|(k, d)| (k.to_string(), held_row(d, consistent.0)))
    .chain([(
        "3".to_string(),
        target_rows::TargetRow {
            deleted: true,
            ..held_row(json!({"sku": "A_3", "state": "draft"}), consistent.0)
        },
    )])
    .collect();
    let (evs, counts) = deep(&mut h, &refs, Lsn(consistent.0 + 0x1000), &repaired);
    assert_eq!(brief(&evs), vec![]);
    assert_eq!((counts.checked, counts.equal, counts.drift()), (5, 5, 0));
}

#[test]
fn a_deep_sweep_deletes_rows_only_where_the_target_holds_them() {
    let mut h = Harness::new(&gate_config("delete"));
    let sent = h.txn(&[
        ("product_template", I, &gated("1", "A_1", "approved")),
        ("product_template", I, &gated("2", "A_2", "approved")),
    ]);
    assert_eq!(sent.len(), 2);
    // Gone from the source: 1 (the target lost it already), 2 (held), and
    // 9, which steward never knew (inserted at the target by hand).
    let wms = h.target("wms");
    let e = h.entity("product");
    let rel = SCHEMA
        .iter()
        .find(|(t, _, _)| *t == "product_template")
        .unwrap()
        .1;
    let consistent = Lsn(sent[0].version + 0x100);
    let width = columns("product_template").len();
    let id_at = columns("product_template")
        .iter()
        .position(|(c, _)| *c == "id")
        .unwrap();
    let absent = |h: &Harness, key: &str| {
        let mut row = vec![None; width];
        row[id_at] = Some(key.to_string());
        crate::pipeline::absent_mapped(&h.pipeline, rel, e, row, consistent, "t")
            .unwrap()
            .unwrap()
    };
    let mut mapped: Vec<Mapped> = ["1", "2", "9"].iter().map(|k| absent(&h, k)).collect();
    let actual = Arc::new(ActualRows {
        target: wms,
        rows: [
            ("2".to_string(), held_row(json!({"sku": "A_2"}), 1)),
            ("9".to_string(), held_row(json!({"sku": "X"}), 1)),
        ]
        .into(),
    });
    let mut dry: Vec<Mapped> = ["1", "2", "9"].iter().map(|k| absent(&h, k)).collect();
    let found = h.gov.reconcile_absent(
        &mut dry,
        consistent,
        wms,
        true,
        Some(actual.clone()),
        Lsn(h.lsn),
        &mut Vec::new(),
    );
    assert_eq!((found.extra, found.deleted), (2, 2));
    let mut out = Vec::new();
    let counts = h.gov.reconcile_absent(
        &mut mapped,
        consistent,
        wms,
        false,
        Some(actual),
        Lsn(h.lsn),
        &mut out,
    );
    let evs = h.finish(out);
    let keys: Vec<(&str, &str)> = evs.iter().map(|e| (e.key.as_str(), e.op)).collect();
    assert_eq!(keys, [("2", "delete"), ("9", "delete")]);
    assert_eq!(counts, found);
    // 1 is forgotten: an ordinary sweep finds nothing left to delete.
    let mut again = vec![absent(&h, "1"), absent(&h, "2")];
    let mut out = Vec::new();
    let counts = h.gov.reconcile_absent(
        &mut again,
        consistent,
        wms,
        false,
        None,
        Lsn(h.lsn),
        &mut out,
    );
    assert_eq!((out.len(), counts.deleted), (0, 0));
}

/// The record maps index buckets by the low bits of their hasher's output:
/// records whose keys share their first characters (consecutive ids) must
/// still spread, or every lookup of a transaction's records walks one long
/// probe sequence.
#[test]
fn record_maps_spread_consecutive_keys_over_their_buckets() {
    use std::hash::BuildHasher;
    let hasher = BuildHasherDefault::<DigestHasher>::default();
    for (first, count) in [(100_000u32, 1_000u32), (1, 1_000), (10_000_000, 4_096)] {
        let buckets = (count as usize).next_power_of_two();
        let mut used = HashSet::new();
        let mut all = HashSet::new();
        for id in first..first + count {
            let h = record_hash(EntityIndex(0), &id.to_string());
            used.insert(hasher.hash_one(h) as usize & (buckets - 1));
            all.insert(h);
        }
        assert_eq!(all.len(), count as usize, "no two keys share a hash");
        // A uniform hash fills about 1 - 1/e of the buckets (63%).
        assert!(
            used.len() * 2 > buckets,
            "keys from {first}: {count} records in {} of {buckets} buckets",
            used.len()
        );
    }
    assert_ne!(
        record_hash(EntityIndex(0), "7"),
        record_hash(EntityIndex(1), "7"),
        "the entity is part of the hash"
    );
}
