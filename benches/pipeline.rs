//! Events/s through the pure pipeline (mapping, then governance) over
//! synthetic changes of three entities, governed (lifecycle gate, rules,
//! business key, row capture, audit) versus mapping only, in the same run.
//! Run with `cargo bench --bench pipeline`.

use std::path::Path;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use steward_core::model::{Change, ChangeOp, Column, Lsn, Relation, TupleValue};
use steward_core::pipeline::{Governance, Pipeline};

const CHANGES: usize = 3000;

const BASE: &str = r#"
[source]
url = "postgres://steward@localhost/odoo"
[state]
path = "/tmp/steward-bench.redb"
[targets.wms]
type = "http"
url = "http://localhost/x"
entities = ["product", "partner", "uom"]
"#;

const MAPPING: &str = r#"
[entities.product]
table = "product_template"
fields = { sku = "default_code", name = "name.en_US", price = "list_price", active = "active", state = "x_lifecycle_state" }
[entities.partner]
table = "res_partner"
fields = { name = "name", vat = "vat", credit = "list_price", active = "active", state = "x_lifecycle_state" }
[entities.uom]
table = "uom_uom"
fields = { name = "name.en_US", factor = "list_price", active = "active" }
"#;

const GOVERNED: &str = r#"
[entities.product]
table = "product_template"
fields = { sku = "default_code", name = "name.en_US", price = "list_price", active = "active", state = "x_lifecycle_state" }
publish_when = "row.active && row.x_lifecycle_state in ['approved', 'released']"
unique = ["default_code"]
[[entities.product.rules]]
name = "sku"
regex = { field = "sku", pattern = "^SKU-[0-9]+$" }
required = ["name"]
[entities.partner]
table = "res_partner"
fields = { name = "name", vat = "vat", credit = "list_price", active = "active", state = "x_lifecycle_state" }
publish_when = "row.active"
[[entities.partner.rules]]
name = "vat"
cel = "row.vat.startsWith('DE')"
[entities.uom]
table = "uom_uom"
fields = { name = "name.en_US", factor = "list_price", active = "active" }
publish_when = "row.active"
[[entities.uom.rules]]
name = "factor"
range = { field = "factor", min = 0 }
"#;

/// The same wide-ish column set for every table (Odoo rows have dozens of columns).
const COLUMNS: &[(&str, u32)] = &[
    ("id", 23),
    ("default_code", 1043),
    ("name", 3802),
    ("vat", 1043),
    ("list_price", 1700),
    ("active", 16),
    ("x_lifecycle_state", 1043),
    ("write_date", 1114),
    ("create_uid", 23),
    ("write_uid", 23),
    ("description", 25),
    ("sale_delay", 701),
];

fn relations() -> Vec<Relation> {
    ["product_template", "res_partner", "uom_uom"]
        .iter()
        .enumerate()
        .map(|(i, t)| Relation {
            id: 100 + i as u32,
            namespace: "public".into(),
            name: t.to_string(),
            replica_identity: b'd',
            columns: COLUMNS
                .iter()
                .map(|(n, oid)| Column {
                    is_key: *n == "id",
                    name: n.to_string(),
                    type_oid: *oid,
                    type_modifier: -1,
                })
                .collect(),
        })
        .collect()
}

fn changes(round: u64) -> Vec<Change> {
    (0..CHANGES)
        .map(|i| {
            let text = |s: String| TupleValue::Text(Bytes::from(s));
            let values = vec![
                text(format!("{}", i / 3)),
                text(format!("SKU-{:06}", i / 3)),
                text(format!(
                    "{{\"en_US\": \"Item {i}\", \"de_DE\": \"Teil {i}\"}}"
                )),
                text(format!("DE{:09}", i)),
                text(format!("{}.{:04}", round, i)),
                text("t".into()),
                text("approved".into()),
                text("2024-05-01 12:00:00.123456".into()),
                text("2".into()),
                text("2".into()),
                text("a longer description of the item that nobody maps".into()),
                text("1.5".into()),
            ];
            Change {
                relation_id: 100 + (i % 3) as u32,
                op: ChangeOp::Update,
                new: Some(values),
                old: None,
            }
        })
        .collect()
}

fn setup(entities: &str) -> (Pipeline, Governance) {
    let text = format!("{BASE}{entities}");
    let config = steward_sinks::config::parse(&text, Path::new("bench.toml"), Path::new("/tmp"))
        .expect("config");
    let mut pipeline = Pipeline::new(&config);
    let governance = Governance::new(&config);
    for e in governance.tracked_entities().collect::<Vec<_>>() {
        pipeline.capture_rows(e);
    }
    for r in relations() {
        pipeline.on_relation(&r).expect("relation");
    }
    (pipeline, governance)
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("pipeline");
    group.throughput(Throughput::Elements(CHANGES as u64));
    for (name, entities) in [("mapping_only", MAPPING), ("governed", GOVERNED)] {
        let (pipeline, mut governance) = setup(entities);
        let mut round = 0u64;
        group.bench_function(name, |b| {
            b.iter_batched(
                || {
                    round += 1;
                    (round, changes(round))
                },
                |(round, changes)| {
                    let lsn = Lsn(0x1000 + round);
                    let mut mapped = Vec::with_capacity(changes.len());
                    for (i, change) in changes.iter().enumerate() {
                        pipeline
                            .map_change(change, lsn, i as u32, "2024-05-01T12:00:00Z", &mut mapped)
                            .expect("maps");
                    }
                    let events = governance.process(mapped, lsn, "2024-05-01T12:00:00Z");
                    assert_eq!(events.len(), CHANGES, "every change delivered");
                    governance.take_delta()
                },
                criterion::BatchSize::SmallInput,
            );
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
