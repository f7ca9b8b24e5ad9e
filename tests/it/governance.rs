//! Governance end to end against a real PostgreSQL and real HTTP receivers:
//! lifecycle gates, quarantine (rules and duplicate business keys) with
//! automatic release, reference resolution and re-emission, no-op
//! suppression, business objects, per-target masking and routing, and the
//! audit trail as the `steward` CLI shows it while the daemon runs.

use crate::support;

use std::time::Duration;

use serde_json::Value;
use steward_devkit::receiver::Receiver;
use support::{wait_until, InProcess, TestDb};

const WAIT: Duration = Duration::from_secs(30);

async fn wait_streaming(db: &TestDb) {
    let slot = format!("steward_{}", db.name);
    for _ in 0..300 {
        let out = db.sql(&format!(
            "SELECT s.active FROM pg_replication_slots s JOIN pg_stat_replication r ON r.pid = s.active_pid \
             WHERE s.slot_name = '{slot}' AND r.state = 'streaming'"
        ));
        if out.lines().any(|l| l.trim() == "t") {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("steward did not start streaming from slot {slot}");
}

fn header(db: &TestDb) -> String {
    format!(
        r#"
[source]
url = "{url}"
slot = "steward_{db}"
publication = "steward_{db}"
status_interval_ms = 500

[state]
path = "{state}"
commit_max_delay_ms = 5
audit_retention_days = 30
"#,
        url = db.url(),
        db = db.name,
        state = db.state_path().display()
    )
}

fn target(name: &str, url: &str, entities: &str, extra: &str) -> String {
    format!(
        "\n[targets.{name}]\ntype = \"http\"\nurl = \"{url}\"\nentities = [{entities}]\nbatch_linger_ms = 5\nretry_initial_ms = 50\nretry_max_ms = 500\ninitial = \"none\"\n{extra}\n"
    )
}

/// Runs the steward binary (a second process: it reaches the running daemon through its control socket).
fn cli(config: &std::path::Path, args: &[&str]) -> (bool, Value) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_steward"))
        .args(args)
        .arg("-c")
        .arg(config)
        .arg("--json")
        .output()
        .expect("run steward");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let value = serde_json::from_str(&text).unwrap_or_else(|e| {
        panic!(
            "steward {args:?}: not JSON ({e}): {text}\nstderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.success(), value)
}

fn of<'a>(events: &'a [Value], entity: &str, key: &str) -> Vec<&'a Value> {
    events
        .iter()
        .filter(|e| e["entity"] == entity && e["subject"] == key)
        .collect()
}

fn insert_product(id: u32, code: &str, state: &str, company: &str) -> String {
    format!(
        "INSERT INTO product_template (id, categ_id, uom_id, uom_po_id, detailed_type, type, default_code, name, list_price, active, tracking, purchase_line_warn, sale_line_warn, company_id, x_lifecycle_state) \
         VALUES ({id}, 1, 1, 1, 'product', 'product', '{code}', '{{\"en_US\": \"Item {id}\"}}', 10.0, true, 'none', 'no-message', 'no-message', {company}, '{state}')"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_quarantine_references_and_no_op_suppression() {
    let db = TestDb::new("gov_lifecycle");
    db.sql("ALTER TABLE product_template ADD COLUMN x_lifecycle_state varchar");
    let wms = Receiver::start().await.unwrap();
    let mut text = header(&db);
    text.push_str(
        r#"
[entities.product]
table = "product_template"
fields = { sku = "default_code", name = "name.en_US", price = "list_price", state = "x_lifecycle_state", uom = { ref = "uom_id", entity = "uom", key = "name" } }
publish_when = "row.active && row.x_lifecycle_state in ['approved', 'released']"
on_unpublish = "delete"
unique = ["default_code"]

[[entities.product.rules]]
name = "sku_format"
regex = { field = "sku", pattern = "^\\s*[A-Za-z]+_[0-9]+\\s*$" }
message = "internal references look like FURN_0001"

[[entities.product.rules]]
name = "unit_publishable"
reference = { field = "uom_id", entity = "uom" }

[entities.uom]
table = "uom_uom"
fields = { name = "name.en_US", factor = "factor" }
"#,
    );
    text.push_str(&target("wms", &wms.url(), "\"product\"", ""));
    let config_path = db.write_config(&text);
    let config = steward_sinks::config::load(&config_path).unwrap_or_else(|e| panic!("{e}"));
    let daemon = InProcess::start(config);
    wait_streaming(&db).await;

    // A draft is never delivered.
    db.sql(&insert_product(9101, "FURN_9101", "draft", "NULL"));
    // Approval delivers it in full, with the unit's business key.
    db.sql("UPDATE product_template SET x_lifecycle_state = 'approved' WHERE id = 9101");
    wms.wait_for_events(1, WAIT).await;
    let events = wms.accepted_events();
    let desk = of(&events, "product", "9101");
    assert_eq!(
        desk.len(),
        1,
        "only the approved state is delivered: {events:#?}"
    );
    assert_eq!(desk[0]["data"]["sku"], "FURN_9101");
    assert_eq!(desk[0]["data"]["state"], "approved");
    assert_eq!(desk[0]["data"]["uom"], "Units", "uom_id as the unit's name");

    // A write to unmapped columns only: nothing is sent.
    db.sql("UPDATE product_template SET write_date = now(), sale_delay = 3 WHERE id = 9101");

    // A second product claiming the same business key (case and spaces differ) is quarantined.
    db.sql(&insert_product(9102, "furn_9101 ", "approved", "NULL"));
    // A rule failure is quarantined too.
    db.sql(&insert_product(9103, "bad-code", "approved", "NULL"));
    let (ok, list) = {
        let mut last = (false, Value::Null);
        wait_until("two quarantined products", WAIT, || {
            last = cli(&config_path, &["quarantine", "list"]);
            last.1["quarantine"]
                .as_array()
                .is_some_and(|l| l.len() == 2)
        })
        .await;
        last
    };
    assert!(ok, "{list}");
    let q = list["quarantine"].as_array().unwrap();
    let dup = q
        .iter()
        .find(|e| e["key"] == "9102")
        .expect("9102 quarantined");
    assert_eq!(dup["rule"], "unique:default_code");
    assert!(
        dup["message"].as_str().unwrap().contains("product 9101"),
        "the message names the holder: {dup}"
    );
    let bad = q
        .iter()
        .find(|e| e["key"] == "9103")
        .expect("9103 quarantined");
    assert_eq!(bad["rule"], "sku_format");
    assert!(
        bad["message"].as_str().unwrap().contains("FURN_0001"),
        "{bad}"
    );
    let (ok, shown) = cli(&config_path, &["quarantine", "show", "product", "9102"]);
    assert!(ok);
    assert_eq!(shown["quarantine"][0]["document"]["sku"], "furn_9101 ");
    // Releasing a record that still fails keeps it quarantined and says why.
    let (ok, still) = cli(&config_path, &["quarantine", "release", "product", "9103"]);
    assert!(!ok, "release of a failing record fails: {still}");
    assert!(
        still["message"].as_str().unwrap().contains("still fails"),
        "{still}"
    );

    // Fixing the records releases them automatically.
    db.sql("UPDATE product_template SET default_code = 'FURN_9102' WHERE id = 9102");
    db.sql("UPDATE product_template SET default_code = 'FURN_9103' WHERE id = 9103");
    wms.wait_for_events(3, WAIT).await;

    // Renaming the unit re-emits the products referencing it.
    db.sql(
        "UPDATE uom_uom SET name = '{\"en_US\": \"Pieces\", \"de_DE\": \"Stück\"}' WHERE id = 1",
    );
    wms.wait_for_events(6, WAIT).await;

    // Archiving unpublishes.
    db.sql("UPDATE product_template SET active = false WHERE id = 9101");
    wms.wait_for_events(7, WAIT).await;
    // Let anything unexpected arrive before counting.
    db.sql("UPDATE product_template SET list_price = 11 WHERE id = 9101");
    tokio::time::sleep(Duration::from_millis(500)).await;

    let events = wms.accepted_events();
    let desk = of(&events, "product", "9101");
    let ops: Vec<(&str, &str)> = desk
        .iter()
        .map(|e| {
            (
                e["op"].as_str().unwrap(),
                e["data"]["uom"].as_str().unwrap_or("-"),
            )
        })
        .collect();
    assert_eq!(
        ops,
        [("upsert", "Units"), ("upsert", "Pieces"), ("delete", "-")],
        "approved, re-emitted after the rename, unpublished when archived; nothing for the unmapped write or while archived: {events:#?}"
    );
    assert_eq!(
        desk[2]["data"],
        serde_json::json!({ "id": 9101 }),
        "a delete carries the key"
    );
    for key in ["9102", "9103"] {
        let got = of(&events, "product", key);
        assert_eq!(got.len(), 2, "{key}: released, then re-emitted: {got:#?}");
        assert_eq!(got[0]["data"]["uom"], "Units");
        assert_eq!(got[1]["data"]["uom"], "Pieces");
    }
    assert_eq!(events.len(), 7, "{events:#?}");
    let (_, list) = cli(&config_path, &["quarantine", "list"]);
    assert_eq!(list["quarantine"], serde_json::json!([]));

    // The audit trail tells the story of each record.
    let (ok, audit) = cli(
        &config_path,
        &["audit", "--entity", "product", "--key", "9101"],
    );
    assert!(ok, "{audit}");
    let decisions: Vec<&str> = audit["audit"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["decision"].as_str().unwrap())
        .collect();
    assert_eq!(
        decisions,
        [
            "gated",
            "delivered",
            "suppressed",
            "delivered",
            "unpublished",
            "gated"
        ],
        "{audit:#}"
    );
    let (_, audit) = cli(
        &config_path,
        &[
            "audit", "--entity", "product", "--key", "9102", "--since", "1h",
        ],
    );
    let decisions: Vec<&str> = audit["audit"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["decision"].as_str().unwrap())
        .collect();
    assert_eq!(
        decisions,
        ["quarantined", "released", "delivered", "delivered"],
        "{audit:#}"
    );
    daemon.stop().await.unwrap();

    // With the daemon stopped, the CLI reads the state file itself.
    let (ok, audit) = cli(
        &config_path,
        &[
            "audit", "--entity", "product", "--key", "9103", "--limit", "1",
        ],
    );
    assert!(ok);
    assert_eq!(audit["audit"].as_array().unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn business_objects_masking_and_routing() {
    let db = TestDb::new("gov_objects");
    db.sql("ALTER TABLE product_template ADD COLUMN x_lifecycle_state varchar");
    let wms = Receiver::start().await.unwrap();
    let finance = Receiver::start().await.unwrap();
    let plant = Receiver::start().await.unwrap();
    let mut text = header(&db);
    text.push_str(
        r#"
[entities.product]
table = "product_template"
fields = { sku = "default_code", company = "company_id" }

[entities.bom]
table = "mrp_bom"
fields = { code = "code", qty = "product_qty" }
children = { lines = { table = "mrp_bom_line", parent = "bom_id", fields = { product = "product_id", qty = "product_qty" } } }

[entities.bank]
table = "res_partner_bank"
fields = { acc_number = "acc_number", partner = "partner_id" }
"#,
    );
    text.push_str(&target(
        "wms",
        &wms.url(),
        "\"bom\", \"bank\"",
        "mask = { \"bank.acc_number\" = \"last4\" }",
    ));
    text.push_str(&target("finance", &finance.url(), "\"bank\"", ""));
    text.push_str(&target(
        "plant",
        &plant.url(),
        "\"product\"",
        "route = \"row.company_id == 1\"",
    ));
    let config_path = db.write_config(&text);
    let config = steward_sinks::config::load(&config_path).unwrap_or_else(|e| panic!("{e}"));
    let daemon = InProcess::start(config);
    wait_streaming(&db).await;

    // A BOM and its two lines in one transaction: one document.
    db.sql(
        "BEGIN; \
         INSERT INTO mrp_bom (id, product_tmpl_id, product_uom_id, type, ready_to_produce, consumption, product_qty, code, active) \
         VALUES (901, 1, 1, 'normal', 'all_available', 'warning', 2, 'BOM-901', true); \
         INSERT INTO mrp_bom_line (id, product_id, product_uom_id, bom_id, product_qty) VALUES (9011, 1, 1, 901, 4), (9012, 2, 1, 901, 8); \
         COMMIT;",
    );
    // A bank account: masked for the WMS, as is for finance.
    db.sql(
        "INSERT INTO res_partner_bank (id, partner_id, acc_number, active) VALUES (901, 1, 'DE12 3456 7890 1234 5678 90', true)",
    );
    // Routing: only company 1's products reach the plant.
    db.sql(&insert_product(9201, "FURN_9201", "approved", "1"));
    db.sql(&insert_product(9202, "FURN_9202", "approved", "NULL"));
    // Moving a product out of the plant's company unpublishes it there.
    db.sql("UPDATE product_template SET company_id = NULL WHERE id = 9201");

    wms.wait_for_events(2, WAIT).await;
    finance.wait_for_events(1, WAIT).await;
    plant.wait_for_events(2, WAIT).await;
    // A change to one line re-emits the whole BOM once.
    db.sql("UPDATE mrp_bom_line SET product_qty = 5 WHERE id = 9011");
    wms.wait_for_events(3, WAIT).await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    let events = wms.accepted_events();
    let boms = of(&events, "bom", "901");
    assert_eq!(boms.len(), 2, "one event per transaction: {events:#?}");
    let lines = boms[0]["data"]["lines"].as_array().unwrap();
    assert_eq!(boms[0]["data"]["code"], "BOM-901");
    assert_eq!(lines.len(), 2, "{:#}", boms[0]);
    assert_eq!(lines[0]["product"], 1);
    assert_eq!(lines[1]["qty"].to_string(), "8");
    assert_eq!(boms[1]["data"]["lines"][0]["qty"].to_string(), "5");

    let bank_wms = of(&events, "bank", "901");
    assert_eq!(bank_wms.len(), 1);
    assert_eq!(bank_wms[0]["data"]["acc_number"], "******************7890");
    let fin = finance.accepted_events();
    assert_eq!(fin[0]["data"]["acc_number"], "DE12 3456 7890 1234 5678 90");
    assert!(
        !events.iter().any(|e| e.to_string().contains("DE12 3456")),
        "the WMS never sees the real account"
    );

    let plant_events = plant.accepted_events();
    let summary: Vec<(&str, &str)> = plant_events
        .iter()
        .map(|e| (e["subject"].as_str().unwrap(), e["op"].as_str().unwrap()))
        .collect();
    assert_eq!(
        summary,
        [("9201", "upsert"), ("9201", "delete")],
        "{plant_events:#?}"
    );

    let (_, audit) = cli(&config_path, &["audit", "--entity", "bank"]);
    let decisions: Vec<(String, String)> = audit["audit"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["target"].as_str().unwrap_or("-").to_string(),
                a["decision"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert!(
        decisions.contains(&("wms".into(), "redacted".into())),
        "{decisions:?}"
    );
    assert!(
        decisions.contains(&("finance".into(), "delivered".into())),
        "{decisions:?}"
    );
    let (_, audit) = cli(
        &config_path,
        &["audit", "--entity", "product", "--key", "9202"],
    );
    assert_eq!(audit["audit"][0]["decision"], "not_routed", "{audit:#}");
    daemon.stop().await.unwrap();
}

/// `ir_model_data` as Odoo 17 creates it (the fixture holds no external ids).
const IR_MODEL_DATA: &str = "CREATE TABLE ir_model_data (
    id serial PRIMARY KEY, create_uid integer, create_date timestamp, write_date timestamp,
    write_uid integer, res_id integer, noupdate boolean DEFAULT false,
    name varchar NOT NULL, module varchar NOT NULL, model varchar NOT NULL);
INSERT INTO ir_model_data (name, module, model, res_id) VALUES
    ('product_uom_unit', 'uom', 'uom.uom', 1),
    ('product_uom_dozen', 'uom', 'uom.uom', 2),
    ('view_partner_form', 'base', 'ir.ui.view', 1);";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn references_deliver_odoo_external_ids_and_follow_their_changes() {
    let db = TestDb::new("gov_xid");
    db.sql("ALTER TABLE product_template ADD COLUMN x_lifecycle_state varchar");
    db.sql(IR_MODEL_DATA);
    let wms = Receiver::start().await.unwrap();
    let mut text = header(&db);
    text.push_str(
        r#"
[entities.product]
table = "product_template"
fields = { sku = "default_code", uom = { ref = "uom_id", entity = "uom", external_id = true }, uom_name = { ref = "uom_id", entity = "uom", key = "name" } }

[entities.uom]
table = "uom_uom"
fields = { name = "name.en_US" }
"#,
    );
    text.push_str(&target("wms", &wms.url(), "\"product\"", ""));
    let config_path = db.write_config(&text);
    let load = || steward_sinks::config::load(&config_path).unwrap_or_else(|e| panic!("{e}"));
    let daemon = InProcess::start(load());
    wait_streaming(&db).await;

    // External ids that existed before steward started resolve (start-up read).
    db.sql(&insert_product(9201, "FURN_9201", "approved", "NULL"));
    assert_eq!(wms.wait_for_events(1, WAIT).await, 1);
    let events = wms.accepted_events();
    assert_eq!(
        events[0]["data"]["uom"], "uom.product_uom_unit",
        "{events:#?}"
    );
    assert_eq!(events[0]["data"]["uom_name"], "Units");

    // A unit and its external id created with the product referencing it (an import).
    db.sql(
        "BEGIN; \
         INSERT INTO uom_uom (id, category_id, uom_type, name, factor, rounding, active) \
         VALUES (9201, 1, 'bigger', '{\"en_US\": \"Pallet\"}', 0.01, 1, true); \
         INSERT INTO ir_model_data (name, module, model, res_id) VALUES ('uom_pallet', '__import__', 'uom.uom', 9201); \
         UPDATE product_template SET uom_id = 9201, uom_po_id = 9201 WHERE id = 9201; \
         COMMIT;",
    );
    wait_until("the product with the imported unit", WAIT, || {
        wms.accepted_events()
            .last()
            .is_some_and(|e| e["data"]["uom"] == "__import__.uom_pallet")
    })
    .await;

    // Renaming the external id re-emits the products referencing that unit.
    db.sql("UPDATE ir_model_data SET module = 'plant', name = 'pallet_eu' WHERE res_id = 9201 AND model = 'uom.uom'");
    wait_until("the re-emitted product", WAIT, || {
        wms.accepted_events()
            .last()
            .is_some_and(|e| e["data"]["uom"] == "plant.pallet_eu")
    })
    .await;
    // External ids of other models (views, menus: most of ir_model_data) change nothing.
    let before = wms.accepted_events().len();
    db.sql("INSERT INTO ir_model_data (name, module, model, res_id) VALUES ('menu_x', 'base', 'ir.ui.menu', 9201)");
    db.sql("UPDATE ir_model_data SET name = 'view_partner_form2' WHERE model = 'ir.ui.view'");
    daemon.stop().await.unwrap();
    assert_eq!(
        wms.accepted_events().len(),
        before,
        "{:#?}",
        wms.accepted_events()
    );

    // After a restart the external ids come from the state file; deleting one
    // delivers null rather than a stale id.
    let daemon = InProcess::start(load());
    wait_streaming(&db).await;
    db.sql("DELETE FROM ir_model_data WHERE res_id = 9201 AND model = 'uom.uom'");
    wait_until(
        "the product without an external id for its unit",
        WAIT,
        || {
            wms.accepted_events()
                .last()
                .is_some_and(|e| e["data"]["uom"].is_null() && e["data"]["uom_name"] == "Pallet")
        },
    )
    .await;
    db.sql("UPDATE product_template SET uom_id = 2, uom_po_id = 2 WHERE id = 9201");
    wait_until("the product back on a seeded unit", WAIT, || {
        wms.accepted_events()
            .last()
            .is_some_and(|e| e["data"]["uom"] == "uom.product_uom_dozen")
    })
    .await;
    daemon.stop().await.unwrap();
}
