//! End-to-end tests of the core pipeline against a real PostgreSQL with
//! wal_level=logical and real local HTTP receivers.

use crate::support;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::time::Duration;

use serde_json::Value;
use steward_devkit::receiver::Receiver;
use steward_devkit::DevCluster;
use support::{final_state, wait_until, InProcess, TestDb};

const WAIT: Duration = Duration::from_secs(30);

async fn wait_streaming(db: &TestDb) {
    let slot = format!("steward_{}", db.name);
    let mut active = false;
    for _ in 0..300 {
        // `active` alone is also true while the slot is being created, before
        // its consistent point: wait for a walsender that is streaming.
        let out = db.sql(&format!(
            "SELECT s.active FROM pg_replication_slots s JOIN pg_stat_replication r ON r.pid = s.active_pid \
             WHERE s.slot_name = '{slot}' AND r.state = 'streaming'"
        ));
        if out.lines().any(|l| l.trim() == "t") {
            active = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(active, "steward did not start streaming from slot {slot}");
}

fn events_of<'a>(events: &'a [Value], entity: &str) -> Vec<&'a Value> {
    events.iter().filter(|e| e["entity"] == entity).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_on_several_odoo_tables_arrive_as_cloudevents_in_commit_order() {
    several_tables_in_commit_order(support::cluster()).await;
}

/// The scenario on any cluster; `versions` runs it per PostgreSQL major.
pub(crate) async fn several_tables_in_commit_order(pg: &'static DevCluster) {
    let db = TestDb::on(pg, "several_tables");
    let wms = Receiver::start().await.unwrap();
    let config = db.config(&db.config_text(&[(
        "wms",
        &wms.url(),
        &["product", "partner", "uom", "workcenter", "bom"],
    )]));
    let daemon = InProcess::start(config);
    wait_streaming(&db).await;

    db.sql(
        "BEGIN; INSERT INTO product_template (id, categ_id, uom_id, uom_po_id, detailed_type, type, default_code, name, list_price, active, tracking, purchase_line_warn, sale_line_warn) \
         VALUES (9001, 1, 1, 1, 'product', 'product', 'FURN_9001', '{\"en_US\": \"Standing Desk\", \"de_DE\": \"Stehpult\"}', 749.9000, true, 'none', 'no-message', 'no-message');
         INSERT INTO product_template (id, categ_id, uom_id, uom_po_id, detailed_type, type, default_code, name, list_price, active, tracking, purchase_line_warn, sale_line_warn) \
         VALUES (9002, 1, 1, 1, 'product', 'product', 'FURN_9002', '{\"en_US\": \"Desk Lamp\"}', 12345678901234567890.123456789, true, 'none', 'no-message', 'no-message'); COMMIT;",
    );
    db.sql("UPDATE product_template SET list_price = 799.00 WHERE id = 9001");
    db.sql("UPDATE product_template SET list_price = 801.50 WHERE id = 9001");
    db.sql("INSERT INTO res_partner (id, name, vat, active, type) VALUES (7001, 'Acme Tooling', 'DE123456789', true, 'contact')");
    db.sql("DELETE FROM res_partner WHERE id = 7001");
    db.sql("UPDATE uom_uom SET factor = 12.000000 WHERE id = (SELECT min(id) FROM uom_uom WHERE uom_type = 'bigger')");
    db.sql("UPDATE mrp_workcenter SET costs_hour = 42.5 WHERE id = (SELECT min(id) FROM mrp_workcenter)");

    let arrived = wms.wait_for_events(8, WAIT).await;
    assert!(
        arrived >= 8,
        "8 events expected, {arrived} arrived: {:#?}",
        wms.requests()
            .iter()
            .map(|r| (r.status, String::from_utf8_lossy(&r.body).to_string()))
            .collect::<Vec<_>>()
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let events = wms.accepted_events();
    assert_eq!(events.len(), 8, "exactly one event per change: {events:#?}");

    // The CloudEvents envelope.
    let first = &events[0];
    assert_eq!(first["specversion"], "1.0");
    assert_eq!(first["source"], format!("steward://steward_{}", db.name));
    assert_eq!(first["type"], "steward.product.upsert");
    assert_eq!(first["subject"], "9001");
    assert_eq!(first["entity"], "product");
    assert_eq!(first["op"], "upsert");
    assert_eq!(first["datacontenttype"], "application/json");
    assert!(
        first["time"].as_str().unwrap().ends_with('Z'),
        "RFC 3339 UTC time: {}",
        first["time"]
    );
    assert!(first["version"].as_str().unwrap().parse::<u64>().is_ok());
    // Mapped data: translated jsonb name with fallback, exact numeric.
    assert_eq!(first["data"]["sku"], "FURN_9001");
    assert_eq!(first["data"]["name"], "Standing Desk");
    assert_eq!(first["data"]["name_de"], "Stehpult");
    assert_eq!(first["data"]["price"].to_string(), "749.9000");
    assert_eq!(first["data"]["uom_id"], 1);
    assert_eq!(first["data"]["active"], true);
    let lamp = &events[1];
    assert_eq!(lamp["data"]["name_de"], "Desk Lamp", "falls back to en_US");
    assert_eq!(
        lamp["data"]["price"].to_string(),
        "12345678901234567890.123456789",
        "never through f64"
    );
    // Both rows came in one transaction: one version, distinct ids.
    assert_eq!(first["version"], lamp["version"]);
    assert_ne!(first["id"], lamp["id"]);

    // Per key, commit order; versions strictly increase across transactions.
    let desk: Vec<&Value> = events
        .iter()
        .filter(|e| e["entity"] == "product" && e["subject"] == "9001")
        .collect();
    let prices: Vec<String> = desk
        .iter()
        .map(|e| e["data"]["price"].to_string())
        .collect();
    assert_eq!(prices, ["749.9000", "799.00", "801.50"]);
    let versions: Vec<u64> = desk
        .iter()
        .map(|e| e["version"].as_str().unwrap().parse().unwrap())
        .collect();
    assert!(
        versions.windows(2).all(|w| w[0] < w[1]),
        "versions increase: {versions:?}"
    );

    let partner = events_of(&events, "partner");
    assert_eq!(partner.len(), 2);
    assert_eq!(partner[0]["data"]["vat"], "DE123456789");
    assert_eq!(partner[1]["type"], "steward.partner.delete");
    assert_eq!(partner[1]["op"], "delete");
    assert_eq!(partner[1]["data"], serde_json::json!({ "id": 7001 }));

    assert_eq!(
        events_of(&events, "uom")[0]["data"]["factor"].to_string(),
        "12.000000"
    );
    assert_eq!(
        events_of(&events, "workcenter")[0]["data"]["costs_hour"],
        42.5
    );

    // Batches are CloudEvents batch requests.
    let requests = wms.requests();
    assert!(requests.iter().all(|r| r
        .headers
        .iter()
        .any(|(k, v)| k == "content-type" && v == "application/cloudevents-batch+json")));
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_master_tables_are_never_delivered_and_the_slot_keeps_up() {
    let db = TestDb::new("noise_only");
    let wms = Receiver::start().await.unwrap();
    let config = db.config(&db.config_text(&[("wms", &wms.url(), &["product", "partner"])]));
    let daemon = InProcess::start(config);
    wait_streaming(&db).await;

    for i in 0..50 {
        db.sql(&format!(
            "INSERT INTO stock_move (product_id, product_qty, state, date) VALUES (1, {i}, 'done', now());
             UPDATE stock_quant SET quantity = quantity + 1;
             INSERT INTO account_move_line (name, debit, credit) VALUES ('noise {i}', {i}, 0);"
        ));
    }
    let target = db.current_wal();
    wait_until(
        "the slot's confirmed_flush_lsn to pass the WAL written by non-master churn",
        WAIT,
        || db.confirmed_flush().is_some_and(|f| f >= target),
    )
    .await;
    assert_eq!(
        wms.accepted_count(),
        0,
        "non-master tables must never be delivered"
    );
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_target_does_not_stop_the_others_and_catches_up_when_it_returns() {
    let db = TestDb::new("dead_target");
    let mes = Receiver::start().await.unwrap();
    let finance = Receiver::start().await.unwrap();
    finance.stop().await;
    let config = db.config(&db.config_text(&[
        ("mes", &mes.url(), &["product"]),
        ("finance", &finance.url(), &["product"]),
    ]));
    let daemon = InProcess::start(config);
    wait_streaming(&db).await;

    for i in 0..20 {
        db.sql(&format!(
            "UPDATE product_template SET list_price = {i}.25 WHERE id = 1"
        ));
    }
    wait_until(
        "mes receives all 20 updates while finance is down",
        WAIT,
        || mes.accepted_count() >= 20,
    )
    .await;
    assert_eq!(finance.accepted_count(), 0);

    finance.restart().await.unwrap();
    wait_until("finance catches up after it returns", WAIT, || {
        finance.accepted_count() >= 20
    })
    .await;
    let prices: Vec<String> = finance
        .accepted_events()
        .iter()
        .map(|e| e["data"]["price"].to_string())
        .collect();
    let expected: Vec<String> = (0..20).map(|i| format!("{i}.25")).collect();
    assert_eq!(prices, expected, "in commit order, none lost");
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_resumes_from_the_checkpoint_without_gaps() {
    restart_resumes_without_gaps(support::cluster()).await;
}

/// The scenario on any cluster; `versions` runs it per PostgreSQL major.
pub(crate) async fn restart_resumes_without_gaps(pg: &'static DevCluster) {
    let db = TestDb::on(pg, "restart");
    let wms = Receiver::start().await.unwrap();
    let text = db.config_text(&[("wms", &wms.url(), &["product", "partner"])]);
    let daemon = InProcess::start(db.config(&text));
    wait_streaming(&db).await;
    for i in 0..10 {
        db.sql(&format!(
            "UPDATE product_template SET list_price = {i} WHERE id = 2"
        ));
    }
    wait_until("the first 10 events", WAIT, || wms.accepted_count() >= 10).await;
    daemon.stop().await.unwrap();

    // Changes made while steward is down wait in the slot.
    for i in 10..25 {
        db.sql(&format!(
            "UPDATE product_template SET list_price = {i} WHERE id = 2"
        ));
    }
    db.sql("UPDATE res_partner SET ref = 'R-1' WHERE id = (SELECT min(id) FROM res_partner)");
    let daemon = InProcess::start(db.config(&text));
    wait_until("the 16 changes made while down", WAIT, || {
        wms.accepted_count() >= 26
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let events = wms.accepted_events();
    let prices: Vec<String> = events
        .iter()
        .filter(|e| e["entity"] == "product")
        .map(|e| e["data"]["price"].to_string())
        .collect();
    let expected: Vec<String> = (0..25).map(|i| i.to_string()).collect();
    assert_eq!(prices, expected, "every update exactly once, in order");
    daemon.stop().await.unwrap();
}

/// The crash window between the store's durable commit and the status update
/// telling the server: the store holds transactions the slot never confirmed.
/// Made deterministic by rewinding the slot to a copy taken before them.
///
/// Two things keep them from being delivered again: steward starts
/// replication at its checkpoint, below which PostgreSQL does not decode
/// commits, and the session drops transactions committed below the
/// checkpoint. Against a real server this test fails only if both go (checked
/// by removing them); the second alone is tested in `source::stream` against
/// a fake walsender that does send such a transaction again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_held_in_the_store_but_never_confirmed_are_not_delivered_twice() {
    let db = TestDb::new("held_unconfirmed");
    let wms = Receiver::start().await.unwrap();
    let text = db.config_text(&[("wms", &wms.url(), &["product"])]);
    let slot = format!("steward_{}", db.name);
    let daemon = InProcess::start(db.config(&text));
    wait_streaming(&db).await;
    daemon.stop().await.unwrap();
    db.sql(&format!(
        "SELECT pg_copy_logical_replication_slot('{slot}', '{slot}_before')"
    ));
    let rewound_to = db.confirmed_flush().expect("slot");

    let daemon = InProcess::start(db.config(&text));
    wait_streaming(&db).await;
    for i in 0..10 {
        db.sql(&format!(
            "UPDATE product_template SET list_price = {i}.5 WHERE id = 5"
        ));
    }
    assert_eq!(wms.wait_for_events(10, WAIT).await, 10);
    // A batch still in flight at a stop is sent again (at least once), which
    // is not what this test is about: stop only once the cursor has moved.
    let config = db.dir.path().join("steward.toml");
    wait_until("the target's cursor past the 10 events", WAIT, || {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_steward"))
            .args(["status", "--json", "-c"])
            .arg(&config)
            .output()
            .expect("steward status");
        let report: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        report["targets"][0]["last_delivered_seq"] == 10
    })
    .await;
    daemon.stop().await.unwrap();
    assert!(db.confirmed_flush().expect("slot") > rewound_to);

    // The server forgets that it was told: the slot goes back to before the 10.
    db.sql(&format!(
        "SELECT pg_drop_replication_slot('{slot}');
         SELECT pg_copy_logical_replication_slot('{slot}_before', '{slot}');
         SELECT pg_drop_replication_slot('{slot}_before');"
    ));
    assert_eq!(db.confirmed_flush(), Some(rewound_to));

    let daemon = InProcess::start(db.config(&text));
    wait_streaming(&db).await;
    db.sql("UPDATE product_template SET list_price = 99.5 WHERE id = 5");
    wait_until("the change made after the restart", WAIT, || {
        wms.accepted_events()
            .iter()
            .any(|e| e["data"]["price"].to_string().as_str() == "99.5")
    })
    .await;
    // Anything re-sent would have arrived before the later change (one
    // outbox, in order); the slot has moved past the held transactions too.
    let target = db.current_wal();
    wait_until("the slot confirms past the restart", WAIT, || {
        db.confirmed_flush().is_some_and(|f| f >= target)
    })
    .await;
    daemon.stop().await.unwrap();
    let events = wms.accepted_events();
    let prices: Vec<String> = events
        .iter()
        .map(|e| e["data"]["price"].to_string())
        .collect();
    let mut expected: Vec<String> = (0..10).map(|i| format!("{i}.5")).collect();
    expected.push("99.5".into());
    assert_eq!(prices, expected, "each transaction exactly once");
    let ids: BTreeSet<&str> = events.iter().map(|e| e["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), events.len(), "no event id delivered twice");
}

/// A change the crash workload makes, as a target must see it at least once:
/// an event of `entity` for `key` with `op` whose data has these fields.
#[derive(Debug)]
struct Expected {
    entity: &'static str,
    key: u32,
    op: &'static str,
    /// (field, value as PostgreSQL prints it, whether it is a float8).
    fields: Vec<(&'static str, String, bool)>,
}

fn upsert(entity: &'static str, key: u32, fields: &[(&'static str, String)]) -> Expected {
    Expected {
        entity,
        key,
        op: "upsert",
        fields: fields
            .iter()
            .map(|(f, v)| (*f, v.clone(), *f == "costs_hour"))
            .collect(),
    }
}

fn delete(entity: &'static str, key: u32) -> Expected {
    Expected {
        entity,
        key,
        op: "delete",
        fields: Vec::new(),
    }
}

/// Whether a delivered JSON value is what PostgreSQL prints (`None` = NULL):
/// numerics with the same digits, floats as the same number.
fn same_value(value: &Value, db: Option<&str>, float: bool) -> bool {
    match (value, db) {
        (Value::Null, None) => true,
        (Value::String(s), Some(db)) => s == db,
        (Value::Bool(b), Some(db)) => b.to_string() == db,
        (Value::Number(n), Some(db)) if float => n
            .as_f64()
            .zip(db.parse::<f64>().ok())
            .is_some_and(|(a, b)| a == b),
        (Value::Number(n), Some(db)) => n.to_string() == db,
        _ => false,
    }
}

/// Reproducible step `i` of the crash workload over five master tables
/// (inserts, updates and deletes) plus noise: its SQL (one transaction) and
/// the changes it makes.
fn workload_step(i: u32) -> (String, Vec<Expected>) {
    let product = 1 + i % 7;
    let price = format!("{}.{:02}", 100 + i, i % 100);
    let mut sql =
        format!("BEGIN; UPDATE product_template SET list_price = {price} WHERE id = {product};");
    let mut changes = vec![upsert("product", product, &[("price", price.clone())])];
    match i % 5 {
        0 => {
            let id = 50_000 + i;
            sql.push_str(&format!(
                "INSERT INTO res_partner (id, name, ref, active, type) VALUES ({id}, 'Partner {i}', 'R-{i}', true, 'contact');"
            ));
            changes.push(upsert(
                "partner",
                id,
                &[
                    ("name", format!("Partner {i}")),
                    ("ref", format!("R-{i}")),
                    ("active", "true".into()),
                ],
            ));
        }
        1 => {
            let uom = 1 + (i / 5) % 5;
            let rounding = format!("0.{:03}", i % 900 + 1);
            sql.push_str(&format!(
                "UPDATE uom_uom SET rounding = {rounding} WHERE id = {uom};"
            ));
            changes.push(upsert("uom", uom, &[("rounding", rounding)]));
        }
        2 => {
            let workcenter = 1 + (i / 5) % 3;
            let partner = 50_000 + i - 2;
            sql.push_str(&format!(
                "UPDATE mrp_workcenter SET costs_hour = {i}.5 WHERE id = {workcenter};
                 UPDATE res_partner SET vat = 'VAT-{i}' WHERE id = {partner};"
            ));
            changes.push(upsert(
                "workcenter",
                workcenter,
                &[("costs_hour", format!("{i}.5"))],
            ));
            changes.push(upsert("partner", partner, &[("vat", format!("VAT-{i}"))]));
        }
        3 => {
            // Half the partners are deleted, half renamed and kept.
            let partner = 50_000 + i - 3;
            if (i / 5).is_multiple_of(2) {
                sql.push_str(&format!("DELETE FROM res_partner WHERE id = {partner};"));
                changes.push(delete("partner", partner));
            } else {
                sql.push_str(&format!(
                    "UPDATE res_partner SET name = 'Partner {i} renamed' WHERE id = {partner};"
                ));
                changes.push(upsert(
                    "partner",
                    partner,
                    &[("name", format!("Partner {i} renamed"))],
                ));
            }
        }
        _ => {
            let active = i.is_multiple_of(2);
            sql.push_str(&format!(
                "UPDATE product_template SET active = {active} WHERE id = {product};"
            ));
            changes.push(upsert(
                "product",
                product,
                &[("price", price), ("active", active.to_string())],
            ));
        }
    }
    match i % 3 {
        0 => {
            let bom = 1000 + i;
            sql.push_str(&format!(
                "INSERT INTO mrp_bom (id, product_tmpl_id, product_uom_id, type, ready_to_produce, consumption, product_qty, code, active) \
                 VALUES ({bom}, {product}, 1, 'normal', 'asap', 'flexible', {qty}.000, 'BOM-{i}', true);",
                qty = i + 1
            ));
            changes.push(upsert(
                "bom",
                bom,
                &[
                    ("product_tmpl_id", product.to_string()),
                    ("qty", format!("{}.000", i + 1)),
                    ("code", format!("BOM-{i}")),
                ],
            ));
        }
        1 => {
            let bom = 1000 + i - 1;
            sql.push_str(&format!(
                "UPDATE mrp_bom SET product_qty = {i}.250 WHERE id = {bom};"
            ));
            changes.push(upsert("bom", bom, &[("qty", format!("{i}.250"))]));
        }
        _ => {
            let bom = 1000 + i - 2;
            if (i / 3).is_multiple_of(2) {
                sql.push_str(&format!("DELETE FROM mrp_bom WHERE id = {bom};"));
                changes.push(delete("bom", bom));
            } else {
                sql.push_str(&format!(
                    "UPDATE mrp_bom SET active = false WHERE id = {bom};"
                ));
                changes.push(upsert("bom", bom, &[("active", "false".into())]));
            }
        }
    }
    sql.push_str(&format!("INSERT INTO stock_move (product_id, product_qty, state, date) VALUES ({product}, {i}, 'done', now()); COMMIT;"));
    (sql, changes)
}

/// What the crash suite compares per entity: the rows as PostgreSQL has
/// them (key first, then the mapped fields in `fields` order, all as text),
/// and, for tables the workload inserts into and deletes from, the key range
/// whose key set must be equal too.
struct Compared {
    entity: &'static str,
    sql: &'static str,
    fields: &'static [&'static str],
    key_range_from: Option<u32>,
}

const COMPARED: &[Compared] = &[
    Compared {
        entity: "product",
        sql: "SELECT id::text, default_code, name->>'en_US', coalesce(name->>'de_DE', name->>'en_US'), \
              list_price::text, uom_id::text, active::text FROM product_template WHERE id BETWEEN 1 AND 7",
        fields: &["sku", "name", "name_de", "price", "uom_id", "active"],
        key_range_from: None,
    },
    Compared {
        entity: "partner",
        sql: "SELECT id::text, name, vat, ref, active::text FROM res_partner WHERE id >= 50000",
        fields: &["name", "vat", "ref", "active"],
        key_range_from: Some(50_000),
    },
    Compared {
        entity: "uom",
        sql: "SELECT id::text, name->>'en_US', factor::text, rounding::text, active::text FROM uom_uom WHERE id BETWEEN 1 AND 5",
        fields: &["name", "factor", "rounding", "active"],
        key_range_from: None,
    },
    Compared {
        entity: "workcenter",
        sql: "SELECT id::text, code, name, costs_hour::text, active::text FROM mrp_workcenter WHERE id BETWEEN 1 AND 3",
        fields: &["code", "name", "costs_hour", "active"],
        key_range_from: None,
    },
    Compared {
        entity: "bom",
        sql: "SELECT id::text, product_tmpl_id::text, product_qty::text, code, active::text FROM mrp_bom WHERE id >= 1000",
        fields: &["product_tmpl_id", "qty", "code", "active"],
        key_range_from: Some(1000),
    },
];

/// Compares a target's final state (`key → data` per entity, deleted keys
/// absent) with the database, field by field, for every key the workload
/// touched; where it inserts and deletes, the key sets too.
async fn assert_equals_database(
    client: &tokio_postgres::Client,
    target: &str,
    state: &HashMap<String, std::collections::BTreeMap<String, Value>>,
    touched: &BTreeSet<(&str, String)>,
) {
    let empty = std::collections::BTreeMap::new();
    for table in COMPARED {
        let held = state.get(table.entity).unwrap_or(&empty);
        let rows = client.query(table.sql, &[]).await.unwrap();
        let db: std::collections::BTreeMap<String, Vec<Option<String>>> = rows
            .iter()
            .map(|r| {
                let key: String = r.get(0);
                let values = (1..=table.fields.len()).map(|c| r.get(c)).collect();
                (key, values)
            })
            .collect();
        if let Some(from) = table.key_range_from {
            let in_range = |k: &String| k.parse::<u32>().is_ok_and(|k| k >= from);
            let held_keys: BTreeSet<&String> = held.keys().filter(|k| in_range(k)).collect();
            let db_keys: BTreeSet<&String> = db.keys().collect();
            assert_eq!(
                held_keys, db_keys,
                "{target}: the {} keys from {from} on equal the database",
                table.entity
            );
        }
        let mut compared = 0;
        for (key, values) in &db {
            if !touched.contains(&(table.entity, key.clone())) {
                continue;
            }
            let data = held
                .get(key)
                .unwrap_or_else(|| panic!("{target}: {} {key} missing", table.entity));
            for (field, value) in table.fields.iter().zip(values) {
                assert!(
                    same_value(&data[*field], value.as_deref(), *field == "costs_hour"),
                    "{target}: {} {key} field {field} is {} but the database has {value:?}",
                    table.entity,
                    data[*field]
                );
            }
            compared += 1;
        }
        assert!(
            compared > 0,
            "{target}: no {} row was compared",
            table.entity
        );
    }
}

/// The crash suite, short: CI runs it on every change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_random_moments_loses_nothing() {
    let steps = env_or("STEWARD_KILL9_STEPS", 300);
    let kills = env_or("STEWARD_KILL9_KILLS", 6);
    kill9_suite(support::cluster(), steps, kills, 1).await;
}

/// The crash suite with four batches in flight per target: batches finish
/// out of order, and a kill between them must still lose nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_with_four_batches_in_flight_loses_nothing() {
    let steps = env_or("STEWARD_KILL9_STEPS", 200);
    let kills = env_or("STEWARD_KILL9_KILLS", 5);
    kill9_suite(support::cluster(), steps, kills, 4).await;
}

/// The crash suite, long: `cargo test --release --test pipeline -- --ignored kill_9 --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "long: 5,000 transactions and 200 kills"]
async fn kill_9_two_hundred_times_loses_nothing() {
    kill9_suite(
        support::cluster(),
        env_or("STEWARD_KILL9_STEPS", 5000),
        env_or("STEWARD_KILL9_KILLS", 200),
        env_or("STEWARD_KILL9_IN_FLIGHT", 1),
    )
    .await;
}

fn env_or(name: &str, default: u32) -> u32 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Mixed Odoo workload over five master tables plus noise, SIGKILL at random
/// instants, two targets (HTTP and PostgreSQL). Afterwards every change was
/// delivered at least once, no id ever carried different content, and both
/// targets' final state equals the database field by field.
pub(crate) async fn kill9_suite(
    pg: &'static DevCluster,
    steps: u32,
    kills: u32,
    max_in_flight: u32,
) {
    let db = TestDb::on(pg, "kill9");
    let wms = Receiver::start().await.unwrap();
    let all = ["product", "partner", "uom", "workcenter", "bom"];
    // The workload changes uom rounding: map it too.
    let mut text = db.config_text(&[("wms", &wms.url(), &all)]).replace(
        "factor = \"factor\", active",
        "factor = \"factor\", rounding = \"rounding\", active",
    );
    text.push_str(&format!("max_in_flight = {max_in_flight}\n"));
    text.push_str(&format!(
        "\n[targets.mirror]\ntype = \"postgres\"\nurl = \"{}\"\nentities = [{}]\n\
         table_prefix = \"mirror_\"\ncreate_tables = true\ninitial = \"none\"\nbatch_linger_ms = 5\nretry_initial_ms = 50\nretry_max_ms = 500\n\
         max_in_flight = {max_in_flight}\n",
        db.url(),
        all.map(|e| format!("\"{e}\"")).join(", ")
    ));
    let config = db.write_config(&text);
    let log = db.dir.path().join("steward.log");

    let mut child = Some(support::Child::run(&config, &log));
    wait_streaming(&db).await;

    let writer = {
        let name = db.name.clone();
        tokio::task::spawn_blocking(move || {
            for i in 0..steps {
                pg.psql(&name, &workload_step(i).0).expect("workload step");
            }
        })
    };
    let mut rng_state: u64 = 0x5DEECE66D;
    for _ in 0..kills {
        rng_state = rng_state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let pause = Duration::from_millis(200 + (rng_state >> 33) % 800);
        tokio::time::sleep(pause).await;
        child.take().expect("running").kill9();
        child = Some(support::Child::run(&config, &log));
    }
    writer.await.unwrap();

    // Quiescence: the slot has confirmed everything and the target's backlog drained.
    let target = db.current_wal();
    wait_until(
        "steward confirms all WAL after the last kill",
        Duration::from_secs(60),
        || db.confirmed_flush().is_some_and(|f| f >= target),
    )
    .await;
    let mut last = usize::MAX;
    wait_until(
        "every target's backlog drains and deliveries settle",
        Duration::from_secs(120),
        || {
            let out = std::process::Command::new(env!("CARGO_BIN_EXE_steward"))
                .args(["status", "--json", "-c"])
                .arg(&config)
                .output()
                .expect("steward status");
            let report: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
            let drained = report["targets"].as_array().is_some_and(|targets| {
                targets.len() == 2 && targets.iter().all(|t| t["backlog"] == 0)
            });
            let n = wms.accepted_count();
            let settled = drained && n == last;
            last = n;
            std::thread::sleep(Duration::from_millis(500));
            settled
        },
    )
    .await;
    let status = child.take().unwrap().terminate();
    assert!(status.success(), "steward exits 0 on SIGTERM");

    let events = wms.accepted_events();
    // Same id, same content, always.
    let mut by_id: HashMap<String, &Value> = HashMap::new();
    let mut duplicates = 0;
    for e in &events {
        let id = e["id"].as_str().unwrap().to_string();
        if let Some(previous) = by_id.insert(id.clone(), e) {
            duplicates += 1;
            assert_eq!(
                previous["data"], e["data"],
                "event {id} delivered with different content"
            );
            assert_eq!(previous["version"], e["version"]);
        }
    }
    // Every change of every step arrived at least once.
    let mut by_key: HashMap<(String, String), Vec<&Value>> = HashMap::new();
    for e in &events {
        by_key
            .entry((
                e["entity"].as_str().unwrap().to_string(),
                e["subject"].as_str().unwrap().to_string(),
            ))
            .or_default()
            .push(e);
    }
    // Per key, commit order even across crashes: an event arriving for the
    // first time is never older than one already received. Only the
    // batches in flight at a crash are sent again (whole, so a key's older
    // event in them can come again after its newer one, with the same id).
    for ((entity, key), list) in &by_key {
        let mut newest = 0u64;
        let mut seen = HashSet::new();
        for e in list {
            let version: u64 = e["version"].as_str().unwrap().parse().unwrap();
            let id = e["id"].as_str().unwrap();
            if seen.insert(id) {
                assert!(
                    version >= newest,
                    "{entity} {key}: new event {id} (version {version}) arrived after version {newest}"
                );
            }
            newest = newest.max(version);
        }
    }
    let bound = kills as usize * max_in_flight as usize * 500;
    assert!(
        duplicates <= bound,
        "{duplicates} events sent again for {kills} kills: more than the batches in flight ({bound})"
    );
    let mut touched: BTreeSet<(&str, String)> = BTreeSet::new();
    let mut expected_changes = 0;
    for i in 0..steps {
        for change in workload_step(i).1 {
            let key = change.key.to_string();
            let arrived = by_key
                .get(&(change.entity.to_string(), key.clone()))
                .is_some_and(|candidates| {
                    candidates.iter().any(|e| {
                        e["op"] == change.op
                            && change.fields.iter().all(|(field, value, float)| {
                                same_value(&e["data"][*field], Some(value), *float)
                            })
                    })
                });
            assert!(arrived, "step {i}: {change:?} was never delivered");
            touched.insert((change.entity, key));
            expected_changes += 1;
        }
    }
    // The receiver's final state equals the database.
    let mut state: HashMap<String, std::collections::BTreeMap<String, Value>> = HashMap::new();
    for ((entity, key), data) in final_state(&events) {
        state.entry(entity).or_default().insert(key, data);
    }
    let client = db.client().await;
    assert_equals_database(&client, "HTTP target", &state, &touched).await;
    // So does the PostgreSQL target's.
    let mut mirrored: HashMap<String, std::collections::BTreeMap<String, Value>> = HashMap::new();
    for entity in all {
        let rows = client
            .query(
                &format!("SELECT _key, data::text FROM mirror_{entity} WHERE NOT _deleted"),
                &[],
            )
            .await
            .unwrap();
        mirrored.insert(
            entity.to_string(),
            rows.iter()
                .map(|r| {
                    let data: Option<String> = r.get(1);
                    let data = data.map_or(Value::Null, |d| serde_json::from_str(&d).unwrap());
                    (r.get(0), data)
                })
                .collect(),
        );
    }
    assert_equals_database(&client, "PostgreSQL target", &mirrored, &touched).await;
    println!(
        "kill -9 suite: {steps} transactions ({expected_changes} changes), {kills} kills, {} events delivered over HTTP, \
         {} unique ids, {duplicates} redeliveries; both targets equal the database",
        events.len(),
        by_id.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_login_with_a_password_file_streams_and_a_wrong_password_fails_clearly() {
    let db = TestDb::new("scram");
    let role = format!("pw_scram_{}", db.name);
    db.sql(&format!(
        "SET password_encryption = 'scram-sha-256';
         CREATE ROLE {role} LOGIN REPLICATION PASSWORD 's3cret-Pa55';
         GRANT SELECT ON ALL TABLES IN SCHEMA public TO {role};
         CREATE PUBLICATION steward_{db} FOR TABLE product_template, res_partner, uom_uom, mrp_workcenter, mrp_bom;",
        db = db.name
    ));
    support::cluster()
        .set_hba(&[
            &format!("host all {role} 127.0.0.1/32 scram-sha-256"),
            &format!("host replication {role} 127.0.0.1/32 scram-sha-256"),
        ])
        .unwrap();
    let password_file = db.dir.path().join("pgpass");
    std::fs::write(&password_file, "s3cret-Pa55\n").unwrap();
    let wms = Receiver::start().await.unwrap();
    let text = db
        .config_text(&[("wms", &wms.url(), &["product"])])
        .replace("postgres://postgres@", &format!("postgres://{role}@"))
        .replace(
            "[state]",
            &format!(
                "password_file = \"{}\"\ncreate_publication = false\n\n[state]",
                password_file.display()
            ),
        );
    let daemon = InProcess::start(db.config(&text));
    wait_streaming(&db).await;
    db.sql("UPDATE product_template SET list_price = 1.5 WHERE id = 3");
    wait_until(
        "an event through the SCRAM-authenticated connection",
        WAIT,
        || wms.accepted_count() >= 1,
    )
    .await;
    daemon.stop().await.unwrap();

    std::fs::write(&password_file, "wrong-password").unwrap();
    let result = steward::daemon::run(db.config(&text), tokio::sync::watch::channel(false).1).await;
    let message = format!("{:#}", result.expect_err("a wrong password must fail"));
    assert!(
        message.contains("password authentication failed"),
        "{message}"
    );
    assert!(
        !message.contains("wrong-password") && !message.contains("s3cret"),
        "no secret in: {message}"
    );
}

/// `steward status` reports an LSN field as PostgreSQL writes it (`X/X`).
fn lsn_field(report: &Value, section: &str, field: &str) -> u64 {
    let text = report[section][field]
        .as_str()
        .unwrap_or_else(|| panic!("{section}.{field} missing: {report:#}"));
    text.parse::<steward_core::model::Lsn>()
        .unwrap_or_else(|e| panic!("{section}.{field}: {e}"))
        .0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_reports_slot_lag_and_targets_whether_or_not_the_daemon_runs() {
    status_reports_slot_and_targets(support::cluster()).await;
}

/// The scenario on any cluster; `versions` runs it per PostgreSQL major.
pub(crate) async fn status_reports_slot_and_targets(pg: &'static DevCluster) {
    let db = TestDb::on(pg, "status");
    let wms = Receiver::start().await.unwrap();
    wms.stop().await;
    let path = db.write_config(&db.config_text(&[("wms", &wms.url(), &["product"])]));
    let log = db.dir.path().join("steward.log");
    let child = support::Child::run(&path, &log);
    wait_streaming(&db).await;
    for i in 0..5 {
        db.sql(&format!(
            "UPDATE product_template SET list_price = {i} WHERE id = 4"
        ));
    }
    let after_updates = db.current_wal();
    let status = |json: bool| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_steward"));
        cmd.args(["status", "-c"]).arg(&path);
        if json {
            cmd.arg("--json");
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "status failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    // The slot and WAL positions must be real positions, consistent with
    // each other and with the server, not just present.
    let check_source = |report: &Value| {
        let confirmed = lsn_field(report, "source", "confirmed_flush_lsn");
        let server = lsn_field(report, "source", "server_wal_lsn");
        assert!(
            confirmed <= server,
            "confirmed past the server's WAL: {report:#}"
        );
        assert!(
            server <= db.current_wal(),
            "server WAL from the future: {report:#}"
        );
        assert_eq!(
            report["source"]["lag_bytes"].as_u64(),
            Some(server - confirmed),
            "{report:#}"
        );
        confirmed
    };
    let mut report = Value::Null;
    wait_until(
        "status shows the 5 undelivered events while the target is down, and the slot confirmed them",
        WAIT,
        || {
            report = serde_json::from_str(&status(true)).unwrap();
            report["targets"][0]["backlog"] == 5
                && report["source"]["confirmed_flush_lsn"]
                    .as_str()
                    .and_then(|l| l.parse::<steward_core::model::Lsn>().ok())
                    .is_some_and(|l| l.0 >= after_updates)
        },
    )
    .await;
    assert_eq!(report["daemon"]["running"], true);
    assert_eq!(report["source"]["slot_exists"], true);
    check_source(&report);
    let wms_status = &report["targets"][0];
    assert_eq!(wms_status["name"], "wms");
    assert_eq!(wms_status["last_appended_seq"], 5, "{report:#}");
    assert_eq!(wms_status["last_delivered_seq"], Value::Null, "{report:#}");
    assert!(
        wms_status["last_error"]
            .as_str()
            .unwrap_or("")
            .contains("connect"),
        "{report:#}"
    );
    let text = status(false);
    assert!(text.contains("target     wms: backlog 5"), "{text}");
    assert!(
        text.contains("cursor: appended seq 5, delivered seq none"),
        "{text}"
    );
    assert!(text.contains("confirmed "), "{text}");

    assert!(child.terminate().success());
    report = serde_json::from_str(&status(true)).unwrap();
    assert_eq!(report["daemon"]["running"], false);
    assert_eq!(
        report["targets"][0]["backlog"], 5,
        "the backlog survives in the store"
    );
    assert_eq!(report["targets"][0]["last_appended_seq"], 5, "{report:#}");
    assert_eq!(report["targets"][0]["last_delivered_seq"], Value::Null);
    check_source(&report);

    // The target returns: the cursor catches up with the outbox.
    wms.restart().await.unwrap();
    let child = support::Child::run(&path, &log);
    assert_eq!(wms.wait_for_events(5, WAIT).await, 5);
    wait_until(
        "status shows the cursor at the end of the outbox",
        WAIT,
        || {
            report = serde_json::from_str(&status(true)).unwrap();
            report["targets"][0]["last_delivered_seq"] == 5
        },
    )
    .await;
    assert_eq!(report["targets"][0]["backlog"], 0, "{report:#}");
    assert_eq!(report["targets"][0]["last_appended_seq"], 5, "{report:#}");
    let text = status(false);
    assert!(
        text.contains("cursor: appended seq 5, delivered seq 5"),
        "{text}"
    );
    assert!(child.terminate().success());
}

#[test]
fn check_config_lists_every_problem_and_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        r#"
[source]
url = "postgres://steward:hunter2@localhost/odoo"
slot = "Bad Slot!"

[state]
path = "state.redb"

[entities.product]
table = "product_template"
fields = { sku = "default_code" }
colour = "blue"

[targets.wms]
type = "carrier-pigeon"
url = "ftp://x"
entities = ["product", "nope"]
"#,
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_steward"))
        .args(["check-config", "-c"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    for key in [
        "source.url",
        "source.slot",
        "entities.product.colour",
        "targets.wms.type",
    ] {
        assert!(stderr.contains(key), "error list names {key}:\n{stderr}");
    }
    assert!(
        !stderr.contains("hunter2"),
        "the password must not be echoed:\n{stderr}"
    );

    let good = dir.path().join("good.toml");
    std::fs::write(&good, steward_core::config::Config::example()).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_steward"))
        .args(["check-config", "-c"])
        .arg(&good)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The demo a newcomer runs first, as they run it: every change shows up
/// once per subscribing target with its values, what governance withholds
/// (a draft, a BOM waiting for it, a duplicate reference) shows up nowhere
/// until it may, the bank account reaches finance masked, the non-master
/// churn shows up nowhere, and Ctrl-C ends it with exit 0 and nothing left
/// behind.
#[test]
fn the_demo_runs_end_to_end_and_ctrl_c_cleans_up() {
    use std::io::BufRead;
    /// A failed assertion must not leave the demo waiting for a Ctrl-C that
    /// never comes.
    struct Demo(std::process::Child);
    impl Drop for Demo {
        fn drop(&mut self) {
            if let Ok(None) = self.0.try_wait() {
                let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT);
                for _ in 0..100 {
                    if !matches!(self.0.try_wait(), Ok(None)) {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                let _ = self.0.kill();
                let _ = self.0.wait();
            }
        }
    }
    let stderr = tempfile::NamedTempFile::new().unwrap();
    let mut demo = Demo(
        std::process::Command::new(env!("CARGO_BIN_EXE_steward"))
            .arg("demo")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(stderr.reopen().unwrap())
            .spawn()
            .unwrap(),
    );
    let child = &mut demo.0;
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let output = |lines: &[String]| {
        format!(
            "{}\nstderr:\n{}",
            lines.join("\n"),
            std::fs::read_to_string(stderr.path()).unwrap_or_default()
        )
    };
    let mut lines: Vec<String> = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                let waiting = line.contains("Press Ctrl-C");
                lines.push(line);
                if waiting {
                    break;
                }
            }
            Err(_) => {
                let _ = child.kill();
                panic!("the demo never waited for Ctrl-C:\n{}", output(&lines));
            }
        }
    }
    let after = |prefix: &str| {
        lines
            .iter()
            .find_map(|l| l.strip_prefix(prefix))
            .unwrap_or_else(|| panic!("no {prefix:?} line:\n{}", output(&lines)))
            .to_string()
    };
    let data_dir = std::path::PathBuf::from(after("  cluster data: "));
    let cluster_root = data_dir.parent().unwrap().to_path_buf();
    let config = after("  config: ");
    let state_dir = std::path::Path::new(config.split_once(" (").unwrap().0)
        .parent()
        .unwrap()
        .to_path_buf();
    let postmaster: i32 = std::fs::read_to_string(data_dir.join("postmaster.pid"))
        .expect("the cluster runs while the demo waits")
        .lines()
        .next()
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(
        state_dir.join("steward.redb").exists(),
        "{}",
        output(&lines)
    );

    // Each event line: "→ TARGET TYPE key KEY vVERSION {data}".
    let mut per_target: HashMap<String, Vec<String>> = HashMap::new();
    for line in &lines {
        let Some(event) = line.trim_start().strip_prefix("→ ") else {
            continue;
        };
        let words: Vec<&str> = event.split_whitespace().collect();
        let data: Value = serde_json::from_str(&event[event.find('{').unwrap()..]).unwrap();
        let summary = match words[1] {
            "steward.product.upsert" => format!(
                "product {} {} active={}",
                data["sku"].as_str().unwrap(),
                data["price"],
                data["active"]
            ),
            "steward.workcenter.upsert" => format!(
                "workcenter {} costs_hour={}",
                data["code"].as_str().unwrap(),
                data["costs_hour"]
            ),
            "steward.partner.upsert" => {
                let banks = data["banks"]
                    .as_array()
                    .expect("the partner's bank accounts");
                let masked = banks.iter().all(|b| {
                    let n = b["acc_number"].as_str().unwrap();
                    n.starts_with("****") && n.len() > 4
                });
                format!(
                    "partner vat={} banks={} masked={masked}",
                    data["vat"].as_str().unwrap_or("-"),
                    banks.len()
                )
            }
            "steward.bom.upsert" => format!(
                "bom {} lines={}",
                data["code"].as_str().unwrap(),
                data["lines"].as_array().map_or(0, Vec::len)
            ),
            "steward.product.delete" => format!("product {} deleted", words[3]),
            other => format!("unexpected {other}: {data}"),
        };
        per_target
            .entry(words[0].to_string())
            .or_default()
            .push(summary);
    }
    // The draft and the BOM waiting for it are withheld until the product is
    // approved; the duplicate reference is held until it is corrected; the
    // archived product is withdrawn while its BOM stays as last delivered.
    let approved = "product FURN_9001 749.9000 active=true";
    let repriced = "product FURN_9001 799.0000 active=true";
    let released = "product FURN_9002 899.0000 active=true";
    let desk_key = lines
        .iter()
        .find(|l| l.contains("steward.product.upsert") && l.contains("FURN_9001"))
        .and_then(|l| l.split_whitespace().nth(4))
        .unwrap_or_else(|| panic!("no FURN_9001 event:\n{}", output(&lines)));
    let archived = format!("product {desk_key} deleted");
    let mes = [
        approved,
        "bom BOM-9001 lines=2",
        repriced,
        released,
        "workcenter CUT costs_hour=73.5",
        &archived,
    ];
    let finance = [
        approved,
        repriced,
        released,
        "partner vat=BE0477472701 banks=2 masked=true",
        &archived,
    ];
    assert_eq!(per_target["mes"], mes, "{}", output(&lines));
    assert_eq!(per_target["finance"], finance, "{}", output(&lines));
    assert_eq!(per_target.len(), 2);
    assert!(
        lines.iter().any(|l| l.starts_with("11 events delivered")),
        "{}",
        output(&lines)
    );
    let withheld: Vec<&String> = lines.iter().filter(|l| l.contains("✗ withheld:")).collect();
    assert_eq!(withheld.len(), 4, "{}", output(&lines));
    assert!(withheld[0].contains("gated"), "{}", output(&lines));
    assert!(withheld[2].contains("business key"), "{}", output(&lines));
    assert!(
        !lines.iter().any(|l| l.contains("NOISE-JOURNAL-LINE")),
        "non-master writes never reach a target"
    );

    // The console the demo prints, with its login: the overview says what
    // the open exception (the archived product) holds back.
    let console = after("  console: ");
    let url = console.split_whitespace().next().unwrap().to_string();
    let password = console
        .split("password ")
        .nth(1)
        .and_then(|p| p.split(';').next())
        .unwrap_or_else(|| panic!("no password in {console:?}"))
        .to_string();
    let overview = tokio::runtime::Runtime::new().unwrap().block_on(async {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap();
        let login = http
            .post(format!("{url}login"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(format!("user=demo&password={password}"))
            .send()
            .await
            .unwrap();
        assert_eq!(login.status().as_u16(), 303, "the demo login works");
        let cookie = login.headers()["set-cookie"].to_str().unwrap();
        let cookie = cookie.split(';').next().unwrap().to_string();
        let page = http
            .get(&url)
            .header("cookie", cookie)
            .send()
            .await
            .unwrap();
        assert_eq!(page.status().as_u16(), 200);
        page.text().await.unwrap()
    });
    assert!(
        overview.contains("1 bom record blocked by 1 product"),
        "{overview}"
    );

    // Ctrl-C.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("the demo did not stop on Ctrl-C:\n{}", output(&lines));
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    reader.join().unwrap();
    lines.extend(rx.try_iter());
    assert_eq!(status.code(), Some(0), "{}", output(&lines));
    assert!(
        lines.iter().any(|l| l.starts_with("demo stopped")),
        "{}",
        output(&lines)
    );
    assert!(!state_dir.exists(), "{} left behind", state_dir.display());
    assert!(
        !cluster_root.exists(),
        "{} left behind",
        cluster_root.display()
    );
    assert!(
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(postmaster), None).is_err(),
        "the demo's postmaster {postmaster} still runs"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn md5_login_streams() {
    let db = TestDb::new("md5");
    let role = format!("pw_md5_{}", db.name);
    db.sql(&format!(
        "SET password_encryption = 'md5';
         CREATE ROLE {role} LOGIN REPLICATION PASSWORD 'md5-Pa55';
         GRANT SELECT ON ALL TABLES IN SCHEMA public TO {role};
         CREATE PUBLICATION steward_{db} FOR TABLE product_template, res_partner, uom_uom, mrp_workcenter, mrp_bom;",
        db = db.name
    ));
    support::cluster()
        .set_hba(&[
            &format!("host all {role} 127.0.0.1/32 md5"),
            &format!("host replication {role} 127.0.0.1/32 md5"),
        ])
        .unwrap();
    std::env::set_var(
        format!("PG_PASSWORD_{}", db.name.to_uppercase()),
        "md5-Pa55",
    );
    let wms = Receiver::start().await.unwrap();
    let text = db
        .config_text(&[("wms", &wms.url(), &["product"])])
        .replace("postgres://postgres@", &format!("postgres://{role}@"))
        .replace(
            "[state]",
            &format!(
                "password_env = \"PG_PASSWORD_{}\"\ncreate_publication = false\n\n[state]",
                db.name.to_uppercase()
            ),
        );
    let daemon = InProcess::start(db.config(&text));
    wait_streaming(&db).await;
    db.sql("UPDATE product_template SET list_price = 2.5 WHERE id = 3");
    assert_eq!(
        wms.wait_for_events(1, WAIT).await,
        1,
        "an event through the md5-authenticated connection"
    );
    daemon.stop().await.unwrap();
}

/// Whether the walsender serving `slot` uses TLS, per pg_stat_ssl.
fn replication_uses_tls(psql: impl Fn(&str) -> String, slot: &str) -> bool {
    let out = psql(&format!(
        "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_replication_slots r ON r.active_pid = s.pid \
         WHERE r.slot_name = '{slot}'"
    ));
    match out.trim() {
        "t" => true,
        "f" => false,
        other => panic!("no walsender for slot {slot}: {other:?}"),
    }
}

/// The test cluster serves no TLS: `prefer` falls back to a plain connection,
/// `require` is refused with an error that says what to change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_tls_on_the_server_prefer_connects_plain_and_require_is_refused() {
    let db = TestDb::new("sslmode_plain");
    let wms = Receiver::start().await.unwrap();
    let base = db.config_text(&[("wms", &wms.url(), &["product"])]);
    let with_mode = |mode: &str| base.replace(&db.url(), &format!("{}?sslmode={mode}", db.url()));

    let daemon = InProcess::start(db.config(&with_mode("prefer")));
    wait_streaming(&db).await;
    assert!(
        !replication_uses_tls(|q| db.sql(q), &format!("steward_{}", db.name)),
        "prefer against a server without TLS connects in plain text"
    );
    db.sql("UPDATE product_template SET list_price = 4.75 WHERE id = 6");
    assert_eq!(wms.wait_for_events(1, WAIT).await, 1);
    daemon.stop().await.unwrap();

    let result = tokio::time::timeout(
        WAIT,
        steward::daemon::run(
            db.config(&with_mode("require")),
            tokio::sync::watch::channel(false).1,
        ),
    )
    .await
    .expect("a refusal is final, not retried");
    let message = format!("{:#}", result.expect_err("require without TLS must fail"));
    for needed in ["does not accept TLS", "source.sslmode = require"] {
        assert!(message.contains(needed), "{needed} in: {message}");
    }
    // The replication connection, which setup opens after the SQL one, says the same.
    let config = db.config(&with_mode("require"));
    let e = steward_postgres::ReplicationClient::connect(&config.source)
        .await
        .expect_err("require without TLS must fail");
    assert!(e.to_string().contains("does not accept TLS"), "{e}");
    assert!(!e.is_transient(), "not worth retrying: {e}");
}

/// Every sslmode against a server that offers TLS (with its own CA):
/// `require`, `prefer` and `verify-full` encrypt the replication connection,
/// `disable` stays plain, and without the CA `verify-full` refuses the server.
/// One cluster for all of them: starting a TLS cluster costs seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_tls_server_sslmodes_encrypt_or_not_as_configured_and_an_untrusted_certificate_is_refused(
) {
    support::init_logging();
    let cluster = steward_devkit::DevCluster::start(steward_devkit::DevClusterOptions {
        ssl: true,
        ..Default::default()
    })
    .expect("TLS cluster");
    cluster.create_database("odoo").unwrap();
    cluster.load_odoo_fixture("odoo").unwrap();
    let psql = |q: &str| cluster.psql("odoo", q).unwrap();
    let ca = cluster.ssl_ca_path().expect("CA").display().to_string();
    let dir = tempfile::tempdir().unwrap();
    let wms = Receiver::start().await.unwrap();
    let write = |query: &str| {
        let path = dir.path().join("steward.toml");
        std::fs::write(
            &path,
            format!(
                "[source]\nurl = \"postgres://postgres@localhost:{port}/odoo?{query}\"\n\
                 [state]\npath = \"state.redb\"\n\
                 [entities.product]\ntable = \"product_template\"\nfields = {{ price = \"list_price\" }}\n\
                 [targets.wms]\ntype = \"http\"\nurl = \"{url}\"\nentities = [\"product\"]\nbatch_linger_ms = 5\ninitial = \"none\"\n",
                port = cluster.port(),
                url = wms.url()
            ),
        )
        .unwrap();
        steward_sinks::config::load(&path).unwrap_or_else(|e| panic!("{e}"))
    };
    let wait_streaming = || async {
        for _ in 0..300 {
            let out = psql(
                "SELECT count(*) FROM pg_replication_slots s JOIN pg_stat_replication r ON r.pid = s.active_pid \
                 WHERE s.slot_name = 'steward' AND r.state = 'streaming'",
            );
            if out.trim() == "1" {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("steward did not start streaming");
    };
    let wait_released = || async {
        for _ in 0..300 {
            if psql("SELECT active FROM pg_replication_slots WHERE slot_name = 'steward'").trim()
                == "f"
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("the slot stayed in use after steward stopped");
    };
    // One change per mode, delivered through that mode's connection.
    let mut delivered = 0;
    let mut stream_with = |query: String, tls: bool| {
        let config = write(&query);
        let wait_streaming = &wait_streaming;
        let wait_released = &wait_released;
        let wms = &wms;
        delivered += 1;
        let n = delivered;
        async move {
            let daemon = InProcess::start(config);
            wait_streaming().await;
            assert_eq!(
                replication_uses_tls(psql, "steward"),
                tls,
                "{query}: the replication connection's encryption"
            );
            let price = format!("{n}.25");
            psql(&format!(
                "UPDATE product_template SET list_price = {price} WHERE id = 1"
            ));
            // By content, not by count: a batch in flight when the previous
            // run stopped is delivered again (at least once, same id).
            wait_until(&format!("{query}: the change arrives"), WAIT, || {
                wms.accepted_events()
                    .iter()
                    .any(|e| e["data"]["price"].to_string().as_str() == price)
            })
            .await;
            daemon.stop().await.unwrap();
            wait_released().await;
        }
    };
    // The default pg_hba.conf accepts plain and TLS connections alike.
    stream_with("sslmode=require".into(), true).await;
    stream_with("sslmode=prefer".into(), true).await;
    stream_with("sslmode=disable".into(), false).await;

    // hostssl only: a plain connection would be refused.
    cluster
        .set_hba(&[
            "hostssl all all 127.0.0.1/32 trust",
            "hostssl replication all 127.0.0.1/32 trust",
            "host all all 127.0.0.1/32 reject",
            "host replication all 127.0.0.1/32 reject",
        ])
        .unwrap();
    stream_with(format!("sslmode=verify-full&sslrootcert={ca}"), true).await;

    // Without the CA the server's certificate is not trusted: a clear, final error.
    let result = steward::daemon::run(
        write("sslmode=verify-full"),
        tokio::sync::watch::channel(false).1,
    )
    .await;
    let message = format!(
        "{:#}",
        result.expect_err("an untrusted certificate must be refused")
    );
    assert!(message.to_lowercase().contains("certificate"), "{message}");
}

/// One transaction updating many rows must not be held in memory whole.
/// `STEWARD_BIG_TXN_ROWS=1000000 cargo test --release --test pipeline big -- --nocapture` for the 1M-row figure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_big_transaction_passes_with_bounded_memory() {
    let rows: u64 = std::env::var("STEWARD_BIG_TXN_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000);
    let db = TestDb::new("big_txn");
    db.sql(
        "INSERT INTO product_template (id, categ_id, uom_id, uom_po_id, detailed_type, type, default_code, name, list_price, active, tracking, purchase_line_warn, sale_line_warn) \
         SELECT 100000 + g, 1, 1, 1, 'product', 'product', 'B-' || g, jsonb_build_object('en_US', 'Bulk product ' || g), g, true, 'none', 'no-message', 'no-message' \
         FROM generate_series(1, 1000) g",
    );
    let wms = Receiver::start_counting().await.unwrap();
    let text = db
        .config_text(&[("wms", &wms.url(), &["product"])])
        .replace(
            "commit_max_delay_ms = 5",
            "commit_max_delay_ms = 5\ncommit_max_events = 5000",
        )
        .replace(
            "batch_linger_ms = 5",
            "batch_linger_ms = 5\nbatch_max_events = 2000",
        );
    let config = db.write_config(&text);
    let log = db.dir.path().join("steward.log");
    let child = support::Child::run(&config, &log);
    wait_streaming(&db).await;
    let started = std::time::Instant::now();
    db.update_prices_in_one_transaction(rows);
    // One event per record per transaction: each of the (up to 1,000)
    // products, with its final price, however often the transaction changed it.
    let records = rows.min(1000) as usize;
    let delivered = wms.wait_for_events(records, Duration::from_secs(900)).await;
    let elapsed = started.elapsed();
    let peak_mib = steward_devkit::peak_rss_kib(child.child.id()) as f64 / 1024.0;
    assert!(child.terminate().success());
    assert_eq!(
        (delivered, wms.accepted_count()),
        (records, records),
        "one event per record of the transaction, none after"
    );
    println!("one transaction of {rows} updates: delivered in {elapsed:.1?}, steward peak RSS {peak_mib:.1} MiB");
    assert!(
        // A regression guard, not the goal: measured 222 MiB (debug, 200,000
        // changes) and 295 MiB (release, 1,000,000 changes); the 64 MiB goal
        // of the benchmark issue is not met yet.
        peak_mib < 512.0,
        "peak RSS {peak_mib:.1} MiB: the transaction was held in memory"
    );
}

/// An update that leaves a TOASTed mapped column unchanged: pgoutput sends it
/// as "unchanged", and the target must still get the real value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_toasted_column_left_unchanged_is_delivered_with_its_real_value() {
    let db = TestDb::new("toast");
    // 32 kB of incompressible-ish text: stored out of line (TOASTed).
    db.sql(
        "UPDATE product_template SET description = jsonb_build_object('en_US', \
         (SELECT string_agg(md5(g::text), '') FROM generate_series(1, 1000) g)) WHERE id = 8",
    );
    let wms = Receiver::start().await.unwrap();
    let text = db
        .config_text(&[("wms", &wms.url(), &["product"])])
        .replace(
            "price = \"list_price\",",
            "price = \"list_price\", description = \"description.en_US\",",
        );
    let daemon = InProcess::start(db.config(&text));
    wait_streaming(&db).await;
    db.sql("UPDATE product_template SET list_price = 1234.5 WHERE id = 8");
    assert_eq!(wms.wait_for_events(1, WAIT).await, 1);
    let event = &wms.accepted_events()[0];
    assert_eq!(event["data"]["price"].to_string(), "1234.5");
    let description = event["data"]["description"]
        .as_str()
        .expect("the real description, not null");
    assert_eq!(description.len(), 32_000, "the whole TOASTed value");
    assert!(
        description.starts_with("c4ca4238a0b923820dcc509a6f75849b"),
        "md5('1') first"
    );
    daemon.stop().await.unwrap();
}
