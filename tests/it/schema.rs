//! Schema changes on mapped tables (Odoo module upgrades) against a real
//! PostgreSQL, with the steward binary as a child process: ADD COLUMN keeps
//! the pipeline running, DROP COLUMN of a mapped column stops only that
//! entity (shown by status and a metric) and its return re-snapshots it.

use crate::support;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use steward_devkit::receiver::Receiver;
use steward_devkit::DevCluster;
use support::{db_prices, final_state, free_port, wait_until, Steward, TestDb};

const WAIT: Duration = Duration::from_secs(30);

fn status(config: &Path, json: bool) -> String {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_steward"));
    cmd.arg("status");
    if json {
        cmd.arg("--json");
    }
    let out = cmd.arg("-c").arg(config).output().expect("steward status");
    assert!(
        out.status.success(),
        "steward status failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

async fn scrape(port: u16) -> String {
    steward_postgres::install_default_provider();
    match reqwest::get(format!("http://127.0.0.1:{port}/metrics")).await {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    }
}

/// `id → (sku, price)` of every product in the database.
fn db_products(db: &TestDb) -> BTreeMap<String, (String, String)> {
    db.sql("SELECT id, coalesce(default_code, ''), list_price FROM product_template")
        .lines()
        .filter_map(|l| {
            let mut parts = l.split('|');
            let id = parts.next()?.to_string();
            let sku = parts.next()?.to_string();
            let price = parts.next()?.to_string();
            Some((id, (sku, price)))
        })
        .collect()
}

/// `id → (sku, price)` of the latest version of each product a target holds.
fn target_products(events: &[Value]) -> BTreeMap<String, (String, String)> {
    let text = |v: &Value| match v {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        v => v.to_string(),
    };
    final_state(events)
        .into_iter()
        .filter(|((entity, _), _)| entity == "product")
        .map(|((_, key), data)| (key, (text(&data["sku"]), text(&data["price"]))))
        .collect()
}

fn count(events: &[Value], entity: &str) -> usize {
    events.iter().filter(|e| e["entity"] == entity).count()
}

fn some_product(db: &TestDb) -> i64 {
    db.sql("SELECT min(id) FROM product_template")
        .trim()
        .parse()
        .expect("a product id")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_added_column_keeps_the_pipeline_running_and_a_reload_can_map_it() {
    added_column_keeps_running(support::cluster()).await;
}

/// The scenario on any cluster; `versions` runs it per PostgreSQL major.
pub(crate) async fn added_column_keeps_running(pg: &'static DevCluster) {
    let db = TestDb::on(pg, "schema_add");
    let wms = Receiver::start().await.unwrap();
    let text = db.config_text(&[("wms", &wms.url(), &["product", "uom"])]);
    let config = db.write_config(&text);
    let steward = Steward::start(&config, &db.dir.path().join("steward.log"), &[]);
    steward.wait_log("replication started", 1).await;
    let id = some_product(&db);

    // The start-up report names the mapped TOASTable columns and the cost.
    let logs = steward.logs();
    let line = logs
        .lines()
        .find(|l| l.contains("public.product_template: mapped columns"))
        .unwrap_or_else(|| panic!("no TOAST report for product_template:\n{logs}"));
    for needed in [
        "INFO",
        "default_code",
        "name",
        "list_price",
        "can be TOASTed",
        "re-reads them from the table by key",
        "REPLICA IDENTITY FULL",
    ] {
        assert!(line.contains(needed), "{needed} in: {line}");
    }
    assert!(
        !line.contains("uom_id"),
        "an integer is never TOASTed: {line}"
    );
    assert!(
        logs.contains("public.uom_uom: mapped columns"),
        "uom maps jsonb and numeric columns:\n{logs}"
    );

    db.sql(&format!(
        "UPDATE product_template SET list_price = 11 WHERE id = {id}"
    ));
    assert_eq!(wms.wait_for_events(1, WAIT).await, 1);

    // An Odoo module upgrade adds a column; the next update still flows.
    db.sql("ALTER TABLE product_template ADD COLUMN x_colour varchar");
    db.sql(&format!(
        "UPDATE product_template SET list_price = 12, x_colour = 'red' WHERE id = {id}"
    ));
    assert_eq!(wms.wait_for_events(2, WAIT).await, 2);
    let event = &wms.accepted_events()[1];
    assert_eq!(event["data"]["price"].to_string(), "12");
    assert!(event["data"].get("colour").is_none());

    // The operator maps the new column and reloads.
    let mapped = text.replace(
        "price = \"list_price\",",
        "price = \"list_price\", colour = \"x_colour\",",
    );
    assert_ne!(mapped, text);
    std::fs::write(&config, &mapped).unwrap();
    steward.signal(nix::sys::signal::Signal::SIGHUP);
    steward.wait_log("configuration reloaded", 1).await;
    steward.wait_log("replication started", 2).await;
    db.sql(&format!(
        "UPDATE product_template SET list_price = 13, x_colour = 'blue' WHERE id = {id}"
    ));
    // The reload also re-evaluates the product for the new mapping: its
    // re-read (red, if read before the update) may arrive before the
    // update. What the target ends with is the row as it is now.
    let last_colour = || {
        wms.accepted_events()
            .iter()
            .rev()
            .find(|e| e["subject"].as_str().and_then(|s| s.parse().ok()) == Some(id))
            .map(|e| e["data"]["colour"].clone())
    };
    wait_until("the product's colour as it is now", WAIT, || {
        last_colour() == Some(serde_json::json!("blue"))
    })
    .await;

    let (status, logs) = steward.terminate().await;
    assert!(status.success(), "exit {status}; log:\n{logs}");
    assert!(!logs.contains("entity stopped"), "{logs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_mapped_column_stops_only_its_entity_and_its_return_resnapshots_it() {
    dropped_column_stops_its_entity_and_returns(support::cluster()).await;
}

/// The scenario on any cluster; `versions` runs it per PostgreSQL major.
pub(crate) async fn dropped_column_stops_its_entity_and_returns(pg: &'static DevCluster) {
    let db = TestDb::on(pg, "schema_drop");
    let wms = Receiver::start().await.unwrap();
    let port = free_port();
    let text = TestDb::with_metrics(
        &db.config_text(&[("wms", &wms.url(), &["product", "uom"])]),
        port,
        "",
    );
    let config = db.write_config(&text);
    let mut steward = Steward::start(&config, &db.dir.path().join("steward.log"), &[]);
    steward.wait_log("replication started", 1).await;
    let id = some_product(&db);
    db.sql(&format!(
        "UPDATE product_template SET list_price = 11 WHERE id = {id}"
    ));
    assert_eq!(wms.wait_for_events(1, WAIT).await, 1);

    // A module upgrade drops a column the product entity maps (sku).
    db.sql("ALTER TABLE product_template DROP COLUMN default_code");
    db.sql("UPDATE product_template SET list_price = list_price + 1");
    steward
        .wait_log("entity stopped by a schema change", 1)
        .await;
    let logs = steward.logs();
    let line = logs
        .lines()
        .find(|l| l.contains("entity stopped by a schema change"))
        .unwrap();
    for needed in [
        "product",
        "public.product_template",
        "default_code",
        "restore the column",
        "SIGHUP",
    ] {
        assert!(line.contains(needed), "the log names {needed}: {line}");
    }

    // Other entities keep flowing and the LSN keeps being confirmed.
    db.sql("UPDATE uom_uom SET factor = factor WHERE id = (SELECT min(id) FROM uom_uom)");
    let after = db.current_wal();
    wait_until("the uom change arrives", WAIT, || {
        count(&wms.accepted_events(), "uom") >= 1
    })
    .await;
    wait_until(
        "the slot is confirmed past the skipped changes",
        WAIT,
        || db.confirmed_flush().is_some_and(|c| c >= after),
    )
    .await;
    assert!(steward.running(), "the daemon stays up");
    assert_eq!(
        count(&wms.accepted_events(), "product"),
        1,
        "no product event while it is stopped"
    );

    // Status (JSON and text) and the metric show it.
    wait_until("the status shows the stop", WAIT, || {
        let v: Value = serde_json::from_str(&status(&config, true)).unwrap();
        v["stopped_entities"]
            .as_array()
            .is_some_and(|a| a.len() == 1)
    })
    .await;
    let v: Value = serde_json::from_str(&status(&config, true)).unwrap();
    let stopped = &v["stopped_entities"][0];
    assert_eq!(stopped["entity"], "product");
    assert_eq!(stopped["table"], "public.product_template");
    assert_eq!(stopped["column"], "default_code");
    let text_status = status(&config, false);
    assert!(
        text_status.contains("product STOPPED") && text_status.contains("default_code"),
        "{text_status}"
    );
    let page = scrape(port).await;
    assert!(
        page.contains("steward_entity_stopped{entity=\"product\"} 1"),
        "{page}"
    );

    // The column comes back (empty, as after a fresh ADD COLUMN) and rows change.
    db.sql("ALTER TABLE product_template ADD COLUMN default_code varchar");
    db.sql(&format!(
        "UPDATE product_template SET default_code = 'SKU-' || id, list_price = 99 WHERE id = {id}"
    ));
    steward.wait_log("entity maps again", 1).await;
    let expected = db_products(&db);
    assert!(expected.len() > 1);
    wait_until("the target equals the database again", WAIT, || {
        target_products(&wms.accepted_events()) == expected
    })
    .await;
    assert!(
        count(&wms.accepted_events(), "product") > expected.len(),
        "the products were re-sent by a snapshot"
    );
    wait_until("status no longer shows the stop", WAIT, || {
        let v: Value = serde_json::from_str(&status(&config, true)).unwrap();
        v["stopped_entities"]
            .as_array()
            .is_some_and(std::vec::Vec::is_empty)
    })
    .await;
    let page = scrape(port).await;
    assert!(
        page.contains("steward_entity_stopped{entity=\"product\"} 0"),
        "{page}"
    );

    // Later changes stream normally.
    db.sql(&format!(
        "UPDATE product_template SET list_price = 100 WHERE id = {id}"
    ));
    let expected = db_products(&db);
    wait_until("a later change arrives", WAIT, || {
        target_products(&wms.accepted_events()) == expected
    })
    .await;

    let (status, logs) = steward.terminate().await;
    assert!(status.success(), "exit {status}; log:\n{logs}");
}

fn target_prices(events: &[Value]) -> BTreeMap<String, String> {
    target_products(events)
        .into_iter()
        .map(|(k, (_, price))| (k, price))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_survives_a_restart_and_a_reload_without_the_column_recovers_it() {
    let db = TestDb::new("schema_reload");
    let wms = Receiver::start().await.unwrap();
    let text = db.config_text(&[("wms", &wms.url(), &["product", "uom"])]);
    let config = db.write_config(&text);
    let log = db.dir.path().join("steward.log");
    let steward = Steward::start(&config, &log, &[]);
    steward.wait_log("replication started", 1).await;

    db.sql("ALTER TABLE product_template DROP COLUMN default_code");
    db.sql("UPDATE product_template SET list_price = list_price + 1");
    steward
        .wait_log("entity stopped by a schema change", 1)
        .await;
    let (exit, logs) = steward.terminate().await;
    assert!(exit.success(), "exit {exit}; log:\n{logs}");

    // Recorded in the state file: status shows it with the daemon stopped,
    // and a restart keeps the entity stopped.
    let out = status(&config, false);
    assert!(
        out.contains("daemon     not running") && out.contains("product STOPPED"),
        "{out}"
    );
    db.sql("UPDATE product_template SET list_price = list_price + 1");
    let steward = Steward::start(&config, &log, &[]);
    steward.wait_log("replication started", 1).await;
    steward.wait_log("entity still stopped", 1).await;
    db.sql("UPDATE uom_uom SET factor = factor WHERE id = (SELECT min(id) FROM uom_uom)");
    wait_until("the uom change arrives", WAIT, || {
        count(&wms.accepted_events(), "uom") >= 1
    })
    .await;
    assert_eq!(count(&wms.accepted_events(), "product"), 0);

    // The operator drops the field from the mapping and reloads: the entity
    // recovers at once and is re-sent by a snapshot.
    let unmapped = text.replace("sku = \"default_code\", ", "");
    assert_ne!(unmapped, text);
    std::fs::write(&config, &unmapped).unwrap();
    steward.signal(nix::sys::signal::Signal::SIGHUP);
    steward.wait_log("configuration reloaded", 1).await;
    steward.wait_log("entity maps again", 1).await;
    let expected = db_prices(&db);
    wait_until("the target equals the database again", WAIT, || {
        target_prices(&wms.accepted_events()) == expected
    })
    .await;
    wait_until("status no longer shows the stop", WAIT, || {
        let v: Value = serde_json::from_str(&status(&config, true)).unwrap();
        v["stopped_entities"]
            .as_array()
            .is_some_and(std::vec::Vec::is_empty)
    })
    .await;
    let (status, logs) = steward.terminate().await;
    assert!(status.success(), "exit {status}; log:\n{logs}");
}
