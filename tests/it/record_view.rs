//! The record view end to end (`GET /v1/record/{entity}/{key}`, `steward
//! record`): a steward process against a real PostgreSQL and real HTTP
//! receivers, with records created the way Odoo does (insert, then update
//! in the same transaction): a draft waiting for approval, a delivered
//! product then quarantined (with its diff per target), a BOM blocked by
//! it, a product a target refuses (dead letter), acknowledged versions
//! and times while a target is up and down, and the same questions with
//! the daemon stopped.

use crate::support;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use steward_devkit::receiver::{Behaviour, Receiver};
use support::{Steward, TestDb};

const WAIT: Duration = Duration::from_secs(30);

/// Runs the steward binary: success, stdout, stderr.
fn steward(args: &[&str], config: &Path) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_steward"))
        .args(args)
        .arg("-c")
        .arg(config)
        .env("STEWARD_LOG", "steward=warn")
        .output()
        .expect("run steward");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn record_text(config: &Path, entity: &str, key: &str) -> String {
    let (ok, stdout, stderr) = steward(&["record", entity, key], config);
    assert!(
        ok,
        "steward record {entity} {key} failed: {stderr}\n{stdout}"
    );
    stdout
}

fn record_json(config: &Path, entity: &str, key: &str) -> Value {
    let (ok, stdout, stderr) = steward(&["record", entity, key, "--json"], config);
    assert!(ok, "steward record {entity} {key} --json failed: {stderr}");
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"))
}

/// One HTTP/1.1 GET over the control socket: status and JSON body.
fn api_get(socket: &Path, path: &str) -> (u16, Value) {
    let mut conn = UnixStream::connect(socket).expect("connect to the control socket");
    conn.set_read_timeout(Some(WAIT)).unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: steward\r\nConnection: close\r\n\r\n");
    conn.write_all(request.as_bytes()).unwrap();
    let mut text = String::new();
    conn.read_to_string(&mut text).unwrap();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

/// The record's answer once `check` holds for it.
async fn wait_record(
    socket: &Path,
    entity: &str,
    key: &str,
    what: &str,
    steward: &Steward,
    check: impl Fn(&Value) -> bool,
) -> Value {
    let start = Instant::now();
    loop {
        let (status, body) = api_get(socket, &format!("/v1/record/{entity}/{key}"));
        if status == 200 && check(&body) {
            return body;
        }
        if start.elapsed() > WAIT {
            panic!(
                "timed out waiting for {what}; last answer ({status}): {body:#}\nlog:\n{}",
                steward.logs()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The delivery line of `target` in a record answer.
fn delivery<'a>(record: &'a Value, target: &str) -> &'a Value {
    record["delivery"]
        .as_array()
        .and_then(|d| d.iter().find(|t| t["target"] == target))
        .unwrap_or_else(|| panic!("no delivery line for {target}: {record:#}"))
}

/// The governance's line of `target` in a record answer.
fn target<'a>(record: &'a Value, name: &str) -> &'a Value {
    record["targets"]
        .as_array()
        .and_then(|d| d.iter().find(|t| t["target"] == name))
        .unwrap_or_else(|| panic!("no target line for {name}: {record:#}"))
}

/// Odoo's pattern: the record is inserted, then its fields written, in one
/// transaction.
fn create_product(db: &TestDb, id: u32, code: &str, state: &str) {
    db.sql(&format!(
        "BEGIN; INSERT INTO product_template (id, categ_id, uom_id, uom_po_id, detailed_type, type, default_code, name, list_price, active, tracking, purchase_line_warn, sale_line_warn) \
         VALUES ({id}, 1, 1, 1, 'product', 'product', NULL, '{{\"en_US\": \"Item {id}\"}}', 10.0, true, 'none', 'no-message', 'no-message'); \
         UPDATE product_template SET default_code = '{code}', x_lifecycle_state = '{state}' WHERE id = {id}; COMMIT;"
    ));
}

fn create_bom(db: &TestDb, id: u32, product: u32) {
    db.sql(&format!(
        "BEGIN; INSERT INTO mrp_bom (id, product_tmpl_id, product_uom_id, type, ready_to_produce, consumption, product_qty, active) \
         VALUES ({id}, {product}, 1, 'normal', 'all_available', 'warning', 1, true); \
         UPDATE mrp_bom SET code = 'BOM-{id}' WHERE id = {id}; COMMIT;"
    ));
}

fn config(db: &TestDb, wms: &str, mes: &str) -> PathBuf {
    let target = |name: &str, url: &str, entities: &str, extra: &str| {
        format!(
            "\n[targets.{name}]\ntype = \"http\"\nurl = \"{url}\"\nentities = [{entities}]\nbatch_linger_ms = 5\nretry_initial_ms = 50\nretry_max_ms = 200\ninitial = \"none\"\n{extra}"
        )
    };
    let mut text = format!(
        r#"
[source]
url = "{url}"
slot = "steward_{db}"
publication = "steward_{db}"
status_interval_ms = 500

[state]
path = "{state}"
commit_max_delay_ms = 5

[entities.product]
table = "product_template"
fields = {{ sku = "default_code", name = "name.en_US", state = "x_lifecycle_state", price = "list_price" }}
publish_when = "row.x_lifecycle_state == 'approved'"

[[entities.product.rules]]
name = "sku_format"
regex = {{ field = "sku", pattern = "^[A-Z]+_[0-9]+$" }}
message = "internal references look like FURN_0001"

[entities.bom]
table = "mrp_bom"
fields = {{ code = "code", product = {{ ref = "product_tmpl_id", entity = "product", key = "sku" }} }}

[[entities.bom.rules]]
name = "product_publishable"
reference = {{ field = "product_tmpl_id", entity = "product" }}
"#,
        url = db.url(),
        db = db.name,
        state = db.state_path().display()
    );
    text.push_str(&target("wms", wms, "\"product\", \"bom\"", ""));
    text.push_str(&target(
        "mes",
        mes,
        "\"product\"",
        "mask = { \"product.price\" = \"full\" }\n",
    ));
    db.write_config(&text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_record_view_answers_every_question_about_a_record() {
    let db = TestDb::new("record_view");
    db.sql("ALTER TABLE product_template ADD COLUMN x_lifecycle_state varchar");
    let wms = Receiver::start().await.unwrap();
    let mes = Receiver::start().await.unwrap();
    // The MES refuses one product's content: it is dead-lettered there.
    mes.set_behaviour(Behaviour::FailKey {
        key: "9404".into(),
        status: 422,
    });
    let config = config(&db, &wms.url(), &mes.url());
    let socket = db.dir.path().join("steward.redb.sock");
    let log = db.state_path().with_extension("log");
    let daemon = Steward::start(&config, &log, &[]);
    daemon.wait_log("replication started", 1).await;

    // A draft: pending approval, withheld by the gate at every target.
    create_product(&db, 9401, "FURN_9401", "draft");
    let draft = wait_record(&socket, "product", "9401", "a draft", &daemon, |r| {
        r["state"] == "pending_approval"
    })
    .await;
    assert_eq!(target(&draft, "wms")["decision"], "gated", "{draft:#}");
    assert!(delivery(&draft, "wms")["last_appended"].is_null());
    assert_eq!(draft["source"]["origin"], "live", "{draft:#}");
    assert_eq!(draft["source"]["row"]["default_code"], "FURN_9401");
    assert_eq!(
        draft["source"]["differs_from_last_read"],
        serde_json::json!([])
    );
    let text = record_text(&config, "product", "9401");
    assert!(
        text.starts_with(
            "product 9401: pending approval: gate `row.x_lifecycle_state == 'approved'` is false"
        ),
        "{text}"
    );

    // A product delivered and acknowledged by both targets, with the time.
    create_product(&db, 9402, "FURN_9402", "approved");
    let delivered = wait_record(
        &socket,
        "product",
        "9402",
        "an acknowledged product",
        &daemon,
        |r| {
            ["wms", "mes"]
                .iter()
                .all(|t| delivery(r, t)["last_acknowledged"]["acknowledged_at"].is_string())
        },
    )
    .await;
    let wms_line = delivery(&delivered, "wms");
    assert_eq!(wms_line["last_appended"]["state"], "acknowledged");
    assert_eq!(
        wms_line["last_appended"]["version"], wms_line["last_acknowledged"]["version"],
        "{delivered:#}"
    );
    let delivered_version = wms_line["last_appended"]["version"].as_u64().unwrap();
    assert!(delivered_version > 0);
    assert_eq!(target(&delivered, "wms")["up_to_date"], true);
    assert_eq!(delivered["state"], "published");

    // Then it fails a rule: quarantined, the targets keep the version they
    // acknowledged, and the diff shows what changed, within each policy.
    db.sql(
        "UPDATE product_template SET default_code = 'bad-code', list_price = 12 WHERE id = 9402",
    );
    let held = wait_record(
        &socket,
        "product",
        "9402",
        "a quarantined product",
        &daemon,
        |r| r["state"] == "quarantined",
    )
    .await;
    assert_eq!(held["quarantine"]["rule"], "sku_format");
    let wms_target = target(&held, "wms");
    assert_eq!(wms_target["up_to_date"], false, "{held:#}");
    assert_eq!(
        wms_target["diff"]["changed"]["sku"]["delivered"],
        "FURN_9402"
    );
    assert_eq!(wms_target["diff"]["changed"]["sku"]["withheld"], "bad-code");
    assert!(
        wms_target["diff"]["changed"]["price"].is_object(),
        "wms sees prices: {held:#}"
    );
    let mes_target = target(&held, "mes");
    assert_eq!(mes_target["diff"]["changed"]["sku"]["withheld"], "bad-code");
    assert!(
        mes_target["diff"]["changed"].get("price").is_none()
            && mes_target["diff"]["hidden"] == serde_json::json!(["price"]),
        "a field the MES's policy masks is never shown in its diff: {held:#}"
    );
    let held_wms = delivery(&held, "wms");
    assert_eq!(
        held_wms["last_acknowledged"]["version"].as_u64(),
        Some(delivered_version),
        "the target still has the version it acknowledged: {held:#}"
    );
    let text = record_text(&config, "product", "9402");
    assert!(
        text.starts_with("product 9402: quarantined since ")
            && text
                .lines()
                .next()
                .unwrap()
                .contains("by rule sku_format: internal references look like FURN_0001"),
        "{text}"
    );
    assert!(
        text.contains("~ sku: \"FURN_9402\" → \"bad-code\""),
        "{text}"
    );
    assert!(text.contains("acknowledged at "), "{text}");

    // A BOM referencing it is blocked; each record names the other.
    create_bom(&db, 9431, 9402);
    let bom = wait_record(&socket, "bom", "9431", "a blocked BOM", &daemon, |r| {
        r["state"] == "blocked"
    })
    .await;
    let blockers: Vec<(&Value, &Value)> = bom["blocked_by"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| (&b["entity"], &b["key"]))
        .collect();
    assert_eq!(
        blockers,
        [(&Value::from("product"), &Value::from("9402"))],
        "{bom:#}"
    );
    let product = wait_record(
        &socket,
        "product",
        "9402",
        "the product's blocks",
        &daemon,
        |r| r["blocks"].as_array().is_some_and(|b| !b.is_empty()),
    )
    .await;
    assert_eq!(product["blocks"][0]["entity"], "bom");
    assert_eq!(product["blocks"][0]["key"], "9431");
    assert_eq!(bom["source"]["row"]["product_tmpl_id"], 9402, "{bom:#}");
    let text = record_text(&config, "bom", "9431");
    assert!(
        text.starts_with("bom 9431: blocked by product 9402 (quarantined)"),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "steward record -c {} product 9402",
            config.display()
        )),
        "a link to the blocker: {text}"
    );
    let text = record_text(&config, "product", "9402");
    assert!(
        text.contains(&format!("steward record -c {} bom 9431", config.display())),
        "a link to the blocked BOM: {text}"
    );

    // A product the MES refuses: dead-lettered there, acknowledged by the WMS.
    create_product(&db, 9404, "FURN_9404", "approved");
    let dead = wait_record(&socket, "product", "9404", "a dead letter", &daemon, |r| {
        delivery(r, "mes")["dead_letters"]
            .as_array()
            .is_some_and(|d| !d.is_empty())
            && delivery(r, "wms")["last_acknowledged"].is_object()
    })
    .await;
    let mes_line = delivery(&dead, "mes");
    assert!(
        mes_line["dead_letters"][0]["error"]
            .as_str()
            .unwrap()
            .contains("422"),
        "{dead:#}"
    );
    assert_eq!(mes_line["last_appended"]["state"], "dead_lettered");
    assert!(mes_line["last_acknowledged"].is_null(), "{dead:#}");
    let text = record_text(&config, "product", "9404");
    assert!(
        text.starts_with("product 9404: published, dead-lettered at mes"),
        "{text}"
    );

    // While the WMS is down a new product is appended but not acknowledged;
    // once it is back, acknowledged with the time.
    wms.set_behaviour(Behaviour::Fail(503));
    create_product(&db, 9405, "FURN_9405", "approved");
    let pending = wait_record(
        &socket,
        "product",
        "9405",
        "a pending product",
        &daemon,
        |r| {
            delivery(r, "wms")["last_appended"]["state"] == "pending"
                && delivery(r, "mes")["last_acknowledged"].is_object()
        },
    )
    .await;
    assert!(
        delivery(&pending, "wms")["last_acknowledged"].is_null(),
        "{pending:#}"
    );
    assert!(delivery(&pending, "wms")["last_appended"]["acknowledged_at"].is_null());
    wms.set_behaviour(Behaviour::Ok);
    wait_record(
        &socket,
        "product",
        "9405",
        "the product acknowledged",
        &daemon,
        |r| delivery(r, "wms")["last_acknowledged"]["acknowledged_at"].is_string(),
    )
    .await;

    // An unknown entity is a 404; an unknown key an answer saying so.
    let (status, body) = api_get(&socket, "/v1/record/nosuch/1");
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("unknown_entity"))
    );
    let (status, body) = api_get(&socket, "/v1/record/product/777777");
    assert_eq!(status, 200, "{body:#}");
    assert_eq!(body["known"], false);
    assert!(
        body["note"].as_str().unwrap().contains("knows nothing"),
        "{body:#}"
    );
    assert_eq!(body["source"]["origin"], "none");

    // --json prints the API's answer.
    let json = record_json(&config, "product", "9402");
    assert_eq!(json["state"], "quarantined");
    assert_eq!(json["blocks"][0]["key"], "9431");
    assert!(json["audit"].as_array().unwrap().len() >= 2);
    assert_eq!(
        json["audit"][0]["decision"], "quarantined",
        "the audit trail is newest first: {json:#}"
    );

    // With the daemon stopped: the same answers from the state file, and
    // the row read live.
    let (status, logs) = daemon.terminate().await;
    assert!(status.success(), "{logs}");
    let offline = record_json(&config, "product", "9402");
    assert_eq!(offline["state"], "quarantined");
    assert!(
        offline["note"].as_str().unwrap().contains("not running"),
        "{offline:#}"
    );
    assert_eq!(offline["source"]["origin"], "live");
    assert_eq!(
        delivery(&offline, "wms")["last_acknowledged"]["version"].as_u64(),
        Some(delivered_version)
    );
    assert_eq!(
        target(&offline, "wms")["diff"]["changed"]["sku"]["withheld"],
        "bad-code"
    );
    let text = record_text(&config, "bom", "9431");
    assert!(
        text.starts_with("bom 9431: blocked by product 9402"),
        "{text}"
    );
    let (ok, _, stderr) = steward(&["record", "nosuch", "1"], &config);
    assert!(!ok && stderr.contains("no entity `nosuch`"), "{stderr}");
}
