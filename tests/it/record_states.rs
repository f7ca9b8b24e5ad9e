//! `steward_records{entity,state}` end to end: a steward process against a
//! real PostgreSQL and real HTTP receivers, its metrics page scraped while
//! records are approved, fail a rule and are fixed, wait for a product, and
//! are refused by a target.

use crate::support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use steward_devkit::receiver::{Behaviour, Receiver};
use support::{free_port, Steward, TestDb};

const WAIT: Duration = Duration::from_secs(30);

/// (entity, state) → value of every `steward_records` series on the page.
fn records(page: &str) -> BTreeMap<(String, String), i64> {
    let label = |labels: &str, name: &str| {
        let start = labels.find(&format!("{name}=\""))? + name.len() + 2;
        let len = labels[start..].find('"')?;
        Some(labels[start..start + len].to_string())
    };
    page.lines()
        .filter_map(|line| {
            let rest = line.strip_prefix("steward_records{")?;
            let (labels, value) = rest.split_once("} ")?;
            Some((
                (label(labels, "entity")?, label(labels, "state")?),
                value.trim().parse::<f64>().ok()? as i64,
            ))
        })
        .collect()
}

async fn scrape(port: u16) -> String {
    steward_postgres::install_default_provider();
    match reqwest::get(format!("http://127.0.0.1:{port}/metrics")).await {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    }
}

/// The record counts once `check` holds for them.
async fn wait_records(
    port: u16,
    what: &str,
    steward: &Steward,
    check: impl Fn(&BTreeMap<(String, String), i64>) -> bool,
) -> BTreeMap<(String, String), i64> {
    let start = Instant::now();
    loop {
        let counts = records(&scrape(port).await);
        if check(&counts) {
            return counts;
        }
        if start.elapsed() > WAIT {
            panic!(
                "timed out waiting for {what}; steward_records: {counts:#?}\nlog:\n{}",
                steward.logs()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn get(counts: &BTreeMap<(String, String), i64>, entity: &str, state: &str) -> i64 {
    counts
        .get(&(entity.to_string(), state.to_string()))
        .copied()
        .unwrap_or(-1)
}

/// `counts` equals `base` except for the `changes` (entity, state, delta).
fn moved(
    base: &BTreeMap<(String, String), i64>,
    counts: &BTreeMap<(String, String), i64>,
    changes: &[(&str, &str, i64)],
) -> bool {
    base.iter().all(|((entity, state), before)| {
        let delta: i64 = changes
            .iter()
            .filter(|(e, s, _)| e == entity && s == state)
            .map(|(_, _, d)| d)
            .sum();
        get(counts, entity, state) == before + delta
    })
}

fn insert_product(id: u32, code: &str, state: &str) -> String {
    format!(
        "INSERT INTO product_template (id, categ_id, uom_id, uom_po_id, detailed_type, type, default_code, name, list_price, active, tracking, purchase_line_warn, sale_line_warn, x_lifecycle_state) \
         VALUES ({id}, 1, 1, 1, 'product', 'product', '{code}', '{{\"en_US\": \"Item {id}\"}}', 10.0, true, 'none', 'no-message', 'no-message', '{state}')"
    )
}

fn insert_bom(id: u32, product: u32) -> String {
    format!(
        "INSERT INTO mrp_bom (id, product_tmpl_id, product_uom_id, type, ready_to_produce, consumption, product_qty, code, active) \
         VALUES ({id}, {product}, 1, 'normal', 'all_available', 'warning', 1, 'BOM-{id}', true)"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn record_states_move_on_the_metrics_page() {
    let db = TestDb::new("records_metric");
    db.sql("ALTER TABLE product_template ADD COLUMN x_lifecycle_state varchar");
    let wms = Receiver::start().await.unwrap();
    let mes = Receiver::start().await.unwrap();
    // The MES refuses one product's content: it is dead-lettered there.
    mes.set_behaviour(Behaviour::FailKey {
        key: "9304".into(),
        status: 422,
    });
    let port = free_port();
    let target = |name: &str, url: &str, entities: &str| {
        format!(
            "\n[targets.{name}]\ntype = \"http\"\nurl = \"{url}\"\nentities = [{entities}]\nbatch_linger_ms = 5\nretry_initial_ms = 50\nretry_max_ms = 500\ninitial = \"none\"\n"
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

[metrics]
listen = "127.0.0.1:{port}"

[entities.product]
table = "product_template"
fields = {{ sku = "default_code", name = "name.en_US", state = "x_lifecycle_state" }}
publish_when = "row.x_lifecycle_state == 'approved'"

[[entities.product.rules]]
name = "sku_format"
regex = {{ field = "sku", pattern = "^[A-Z]+_[0-9]+$" }}

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
    text.push_str(&target("wms", &wms.url(), "\"product\", \"bom\""));
    text.push_str(&target("mes", &mes.url(), "\"product\""));
    let config = db.write_config(&text);
    let log = db.state_path().with_extension("log");
    let steward = Steward::start(&config, &log, &[]);
    steward.wait_log("replication started", 1).await;

    // The fixture's products (no lifecycle state: pending approval) and
    // BOMs (waiting for them) were read at start-up; every series is there.
    let base = wait_records(port, "the start-up counts", &steward, |c| {
        ["product", "bom"].iter().all(|e| {
            [
                "published",
                "pending_approval",
                "quarantined",
                "blocked",
                "dead_lettered",
            ]
            .iter()
            .all(|s| get(c, e, s) >= 0)
        })
    })
    .await;
    assert!(get(&base, "product", "pending_approval") > 0, "{base:#?}");
    assert_eq!(get(&base, "product", "published"), 0, "{base:#?}");
    assert!(
        get(&base, "bom", "blocked") > 0,
        "the fixture BOMs wait for their drafts: {base:#?}"
    );
    assert_eq!(get(&base, "bom", "quarantined"), 0, "{base:#?}");

    // A draft waits for approval, then is published.
    db.sql(&insert_product(9301, "FURN_9301", "draft"));
    wait_records(port, "a draft pending approval", &steward, |c| {
        moved(&base, c, &[("product", "pending_approval", 1)])
    })
    .await;
    db.sql("UPDATE product_template SET x_lifecycle_state = 'approved' WHERE id = 9301");
    wait_records(port, "the approved product published", &steward, |c| {
        moved(&base, c, &[("product", "published", 1)])
    })
    .await;

    // A product failing a rule is quarantined, then published once fixed.
    db.sql(&insert_product(9302, "bad-code", "approved"));
    wait_records(port, "a quarantined product", &steward, |c| {
        moved(
            &base,
            c,
            &[("product", "published", 1), ("product", "quarantined", 1)],
        )
    })
    .await;
    db.sql("UPDATE product_template SET default_code = 'FURN_9302' WHERE id = 9302");
    wait_records(port, "the fixed product published", &steward, |c| {
        moved(&base, c, &[("product", "published", 2)])
    })
    .await;

    // A BOM referencing a draft is blocked, and published when the product is approved.
    db.sql(&insert_product(9303, "FURN_9303", "draft"));
    db.sql(&insert_bom(9331, 9303));
    wait_records(port, "a blocked BOM", &steward, |c| {
        moved(
            &base,
            c,
            &[
                ("product", "published", 2),
                ("product", "pending_approval", 1),
                ("bom", "blocked", 1),
            ],
        )
    })
    .await;
    db.sql("UPDATE product_template SET x_lifecycle_state = 'approved' WHERE id = 9303");
    wait_records(port, "the BOM published with its product", &steward, |c| {
        moved(
            &base,
            c,
            &[("product", "published", 3), ("bom", "published", 1)],
        )
    })
    .await;

    // A product the MES refuses (422): published, and dead-lettered there.
    db.sql(&insert_product(9304, "FURN_9304", "approved"));
    wait_records(port, "a dead-lettered product", &steward, |c| {
        moved(
            &base,
            c,
            &[
                ("product", "published", 4),
                ("bom", "published", 1),
                ("product", "dead_lettered", 1),
            ],
        )
    })
    .await;
    assert_eq!(
        wms.accepted_events()
            .iter()
            .filter(|e| e["subject"] == "9304")
            .count(),
        1,
        "the other target has it"
    );

    // The counts survive a restart: derived from the state file.
    let (status, logs) = steward.terminate().await;
    assert!(status.success(), "{logs}");
    let steward = Steward::start(&config, &log, &[]);
    wait_records(port, "the same counts after a restart", &steward, |c| {
        moved(
            &base,
            c,
            &[
                ("product", "published", 4),
                ("bom", "published", 1),
                ("product", "dead_lettered", 1),
            ],
        )
    })
    .await;
    let (status, logs) = steward.terminate().await;
    assert!(status.success(), "{logs}");
}
