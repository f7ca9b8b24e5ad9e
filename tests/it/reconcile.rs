//! Reconciliation (`steward reconcile`, `steward repair`) against a real
//! PostgreSQL and real HTTP receivers: drift injected each way is found and
//! only the differences are sent; a dry run changes nothing; a run killed
//! with -9 resumes.

use crate::support;

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;
use steward_devkit::receiver::Receiver;
use support::{daemon_status, db_prices, target_prices, wait_until, Child, InProcess, TestDb};

const WAIT: Duration = Duration::from_secs(120);

/// Adds `n` product templates with ids from 100001, priced 1..n.
fn add_products(db: &TestDb, n: u32) {
    db.sql(&format!(
        "INSERT INTO product_template (id, categ_id, uom_id, uom_po_id, detailed_type, type, default_code, name, list_price, active, tracking, purchase_line_warn, sale_line_warn) \
         SELECT 100000 + g, 1, 1, 1, 'product', 'product', 'BULK_' || g, jsonb_build_object('en_US', 'Bulk ' || g), g, true, 'none', 'no-message', 'no-message' \
         FROM generate_series(1, {n}) g; ANALYZE product_template;"
    ));
}

/// One HTTP target `wms` of products, with an initial snapshot.
fn config_text(db: &TestDb, wms: &Receiver, product_extra: &str) -> String {
    let text = db.config_text(&[]);
    let text = text.replacen(
        "[entities.product]\ntable = \"product_template\"\n",
        &format!("[entities.product]\ntable = \"product_template\"\n{product_extra}"),
        1,
    );
    format!(
        "{text}\n[targets.wms]\ntype = \"http\"\nurl = \"{}\"\nentities = [\"product\"]\ninitial = \"snapshot\"\nbatch_max_events = 5000\nbatch_linger_ms = 5\nretry_initial_ms = 50\nretry_max_ms = 500\ntimeout_ms = 5000\n",
        wms.url()
    )
}

fn rows(db: &TestDb) -> usize {
    db.sql("SELECT count(*) FROM product_template")
        .trim()
        .parse()
        .unwrap()
}

fn steward(args: &[&str], config: &Path) -> std::process::Output {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_steward"))
        .args(args)
        .arg("-c")
        .arg(config)
        .env("STEWARD_LOG", "off")
        .output()
        .expect("run steward");
    assert!(
        out.status.success(),
        "steward {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The reconciliation line of (wms, product) in `steward status`, once it is done.
async fn reconciled(config: &Path) -> Value {
    let mut line = Value::Null;
    wait_until("the reconciliation finishes", WAIT, || {
        let v = daemon_status(config);
        line = v["snapshots"]
            .as_array()
            .and_then(|a| {
                a.iter()
                    .find(|s| s["reconcile"] == true && s["entity"] == "product")
                    .cloned()
            })
            .unwrap_or(Value::Null);
        line["phase"] == "done"
    })
    .await;
    line
}

fn counts(line: &Value) -> [u64; 4] {
    let c = &line["counts"];
    ["checked", "equal", "resent", "deleted"].map(|k| c[k].as_u64().unwrap_or(u64::MAX))
}

/// Starts steward until the initial snapshot of `wms` has arrived and
/// steward has recorded its acknowledgement; returns the daemon stopped
/// again. (A stop while the last response is on its way abandons that
/// request, and the next start sends its events again, as it must.)
async fn initial_snapshot(db: &TestDb, cfg: &Path, wms: &Receiver) {
    let n = rows(db);
    let daemon = InProcess::start(steward_sinks::config::load(cfg).unwrap());
    wait_until("the initial snapshot arrives", WAIT, || {
        wms.accepted_count() >= n
    })
    .await;
    wait_until("steward records the snapshot as acknowledged", WAIT, || {
        daemon_status(cfg)["targets"]
            .as_array()
            .is_some_and(|targets| targets.iter().all(|t| t["backlog"] == 0))
    })
    .await;
    daemon.stop().await.unwrap();
}

fn drop_slot(db: &TestDb) {
    db.sql(&format!(
        "SELECT pg_drop_replication_slot('steward_{}')",
        db.name
    ));
}

/// Changes made while the slot is gone: 10 prices, 3 deletes, 2 new products.
fn drift_in_the_source(db: &TestDb) {
    db.sql(
        "UPDATE product_template SET list_price = list_price + 1000 WHERE id BETWEEN 100001 AND 100010; \
         DELETE FROM product_template WHERE id BETWEEN 100011 AND 100013; \
         INSERT INTO product_template (id, categ_id, uom_id, uom_po_id, detailed_type, type, default_code, name, list_price, active, tracking, purchase_line_warn, sale_line_warn) \
         SELECT 200000 + g, 1, 1, 1, 'product', 'product', 'NEW_' || g, jsonb_build_object('en_US', 'New ' || g), g, true, 'none', 'no-message', 'no-message' \
         FROM generate_series(1, 2) g;",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repair_after_a_dropped_slot_sends_only_what_changed_meanwhile() {
    let db = TestDb::new("rec_repair");
    add_products(&db, 2000);
    let wms = Receiver::start().await.unwrap();
    let cfg = db.write_config(&config_text(&db, &wms, ""));
    initial_snapshot(&db, &cfg, &wms).await;

    // steward is stopped, its slot is dropped, and the source changes meanwhile.
    drop_slot(&db);
    drift_in_the_source(&db);
    let out = steward(&["repair"], &cfg);
    assert!(String::from_utf8_lossy(&out.stdout).contains("reconciles every target"));
    let before = wms.accepted_count();
    let daemon = InProcess::start(steward_sinks::config::load(&cfg).unwrap());
    let line = reconciled(&cfg).await;
    let expected = db_prices(&db);
    wait_until("the target matches the database again", WAIT, || {
        target_prices(&wms.accepted_events()) == expected
    })
    .await;
    // A change after the repair streams as usual on the new slot.
    db.sql("UPDATE product_template SET list_price = 7 WHERE id = 100500");
    wait_until("a change after the repair is streamed", WAIT, || {
        wms.accepted_count() >= before + 16
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let sent: Vec<Value> = wms.accepted_events()[before..].to_vec();
    daemon.stop().await.unwrap();

    let n = rows(&db) as u64;
    assert_eq!(
        counts(&line),
        [n, n - 12, 12, 3],
        "checked every row; 10 changed and 2 new re-sent, 3 gone deleted: {line}"
    );
    let upserts = sent.iter().filter(|e| e["op"] == "upsert").count();
    let deletes: Vec<&str> = sent
        .iter()
        .filter(|e| e["op"] == "delete")
        .map(|e| e["subject"].as_str().unwrap())
        .collect();
    assert_eq!(
        (upserts, sent.len()),
        (13, 16),
        "only the differences (and the later change) were sent, not all {n} records"
    );
    assert_eq!(deletes, ["100011", "100012", "100013"]);
    let audit = String::from_utf8_lossy(
        &steward(&["audit", "--decision", "reconciled", "--json"], &cfg).stdout,
    )
    .to_string();
    assert!(
        audit.contains("re-sent 12, deleted 3"),
        "the audit trail records the result: {audit}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repair_of_two_targets_reads_the_table_once_and_counts_each_target() {
    let db = TestDb::new("rec_shared");
    add_products(&db, 2000);
    let wms = Receiver::start().await.unwrap();
    let mes = Receiver::start().await.unwrap();
    // mes takes only the cheaper products: the same drift is another
    // difference there.
    let text = format!(
        "{}\n[targets.mes]\ntype = \"http\"\nurl = \"{}\"\nentities = [\"product\"]\ninitial = \"snapshot\"\nroute = \"row.list_price < 1005.0\"\nbatch_max_events = 5000\nbatch_linger_ms = 5\nretry_initial_ms = 50\nretry_max_ms = 500\ntimeout_ms = 5000\n",
        config_text(&db, &wms, ""),
        mes.url()
    );
    let cfg = db.write_config(&text);
    let n = rows(&db);
    let cheap: usize = db
        .sql("SELECT count(*) FROM product_template WHERE list_price < 1005")
        .trim()
        .parse()
        .unwrap();
    let daemon = InProcess::start(steward_sinks::config::load(&cfg).unwrap());
    wait_until("both initial snapshots arrive", WAIT, || {
        wms.accepted_count() >= n && mes.accepted_count() >= cheap
    })
    .await;
    // A stop drops deliveries in flight: a batch a receiver accepted whose
    // acknowledgement steward had not stored yet would come again after
    // the restart (at least once), and be counted as a difference below.
    wait_until("both targets' acknowledgements are stored", WAIT, || {
        daemon_status(&cfg)["targets"]
            .as_array()
            .is_some_and(|t| t.len() == 2 && t.iter().all(|t| t["backlog"] == 0))
    })
    .await;
    daemon.stop().await.unwrap();

    drop_slot(&db);
    drift_in_the_source(&db);
    steward(&["repair"], &cfg);
    let before = (wms.accepted_count(), mes.accepted_count());
    let child = Child::run(&cfg, &db.dir.path().join("steward.log"));
    let lines = reconciliations_done(&cfg, 2, WAIT).await;
    let line = |target: &str| {
        lines
            .iter()
            .find(|l| l["target"] == target)
            .cloned()
            .unwrap()
    };
    let n = rows(&db) as u64;
    assert_eq!(
        counts(&line("wms")),
        [n, n - 12, 12, 3],
        "wms: 10 changed and 2 new re-sent, 3 gone deleted"
    );
    // mes had products 1..1004; of the ten changed (now 1001..1010) four
    // still pass its route and six leave it; the three gone were there.
    assert_eq!(
        counts(&line("mes")),
        [n, n - 12, 6, 9],
        "mes: 4 changed and 2 new re-sent, 6 unrouted and 3 gone deleted"
    );
    wait_until("each target got its differences", WAIT, || {
        wms.accepted_count() >= before.0 + 15 && mes.accepted_count() >= before.1 + 15
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    child.terminate();
    assert_eq!(
        (
            wms.accepted_count() - before.0,
            mes.accepted_count() - before.1
        ),
        (15, 15),
        "only the differences were sent"
    );
    let log = std::fs::read_to_string(db.dir.path().join("steward.log")).unwrap();
    let reads: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("snapshot of entity started"))
        .collect();
    assert!(
        reads.len() == 1 && reads[0].contains("wms") && reads[0].contains("mes"),
        "one read of the table for both targets: {reads:?}"
    );
}

/// Keys gone from the source are found wherever they were in the table:
/// before the first row, across chunk boundaries, in a range wider than one
/// read of the targets' keys, after the last row, and a key that is not a
/// canonical number (looked up in the source); each target deletes only
/// what it was sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_gone_from_anywhere_in_the_table_are_deleted_at_each_target_that_had_them() {
    let db = TestDb::new("rec_gone");
    add_products(&db, 30_000);
    db.sql(
        "INSERT INTO product_template (id, categ_id, uom_id, uom_po_id, detailed_type, type, default_code, name, list_price, active, tracking, purchase_line_warn, sale_line_warn) \
         VALUES (-7, 1, 1, 1, 'product', 'product', 'NEG', '{\"en_US\": \"Negative\"}', 1, true, 'none', 'no-message', 'no-message')",
    );
    let wms = Receiver::start().await.unwrap();
    let mes = Receiver::start().await.unwrap();
    // mes takes only the products under 600: another set of keys.
    let text = format!(
        "{}\n[targets.mes]\ntype = \"http\"\nurl = \"{}\"\nentities = [\"product\"]\ninitial = \"snapshot\"\nroute = \"row.list_price < 600.0\"\nbatch_max_events = 5000\nbatch_linger_ms = 5\nretry_initial_ms = 50\nretry_max_ms = 500\ntimeout_ms = 5000\n",
        config_text(&db, &wms, ""),
        mes.url()
    );
    let cfg = db.write_config(&text);
    let cheap = |prices: &std::collections::BTreeMap<String, String>| {
        prices
            .iter()
            .filter(|(_, p)| p.parse::<f64>().unwrap() < 600.0)
            .map(|(k, p)| (k.clone(), p.clone()))
            .collect::<std::collections::BTreeMap<_, _>>()
    };
    let all = db_prices(&db);
    let daemon = InProcess::start(steward_sinks::config::load(&cfg).unwrap());
    wait_until("both initial snapshots arrive", WAIT, || {
        wms.accepted_count() >= all.len() && mes.accepted_count() >= cheap(&all).len()
    })
    .await;
    daemon.stop().await.unwrap();

    drop_slot(&db);
    db.sql(
        "DELETE FROM product_template WHERE id BETWEEN 100001 AND 100003 \
            OR id BETWEEN 100490 AND 100520 OR id BETWEEN 101001 AND 126000 \
            OR id > 129995 OR id = -7",
    );
    steward(&["repair"], &cfg);
    let before = (wms.accepted_count(), mes.accepted_count());
    let log = db.dir.path().join("steward.log");
    let child = Child::run_with_env(&cfg, &log, &[("STEWARD_SNAPSHOT_CHUNK_ROWS", "500")]);
    let lines = reconciliations_done(&cfg, 2, WAIT).await;
    let line = |target: &str| lines.iter().find(|l| l["target"] == target).unwrap();
    let n = rows(&db) as u64;
    assert_eq!(
        counts(line("wms")),
        [n, n, 0, 25_040],
        "wms: 3 + 31 + 25,000 + 5 + 1 keys gone"
    );
    assert_eq!(
        counts(line("mes")),
        [n, n, 0, 35],
        "mes had only 3 + 31 of the numbered ones, and -7"
    );
    let expected = db_prices(&db);
    wait_until("each target holds what the source has", WAIT, || {
        target_prices(&wms.accepted_events()) == expected
            && target_prices(&mes.accepted_events()) == cheap(&expected)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    child.terminate();
    assert_eq!(
        (
            wms.accepted_count() - before.0,
            mes.accepted_count() - before.1
        ),
        (25_040, 35),
        "one delete per key gone, nothing else"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_sends_and_changes_nothing_and_a_later_reconcile_repairs() {
    let db = TestDb::new("rec_dry");
    add_products(&db, 500);
    let wms = Receiver::start().await.unwrap();
    let cfg = db.write_config(&config_text(&db, &wms, ""));
    initial_snapshot(&db, &cfg, &wms).await;
    drop_slot(&db);
    drift_in_the_source(&db);

    let out = steward(&["repair", "--dry-run"], &cfg);
    assert!(String::from_utf8_lossy(&out.stdout).contains("dry run"));
    let before = wms.accepted_count();
    let daemon = InProcess::start(steward_sinks::config::load(&cfg).unwrap());
    let line = reconciled(&cfg).await;
    let n = rows(&db) as u64;
    assert_eq!(line["dry_run"], true);
    assert_eq!(counts(&line), [n, n - 12, 12, 3], "{line}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(wms.accepted_count(), before, "a dry run sends nothing");

    // Through the control API while the daemon runs: the dry run changed
    // nothing, so a second one finds the same, and a real run repairs it.
    let report = |args: &[&str]| -> Value {
        let out = steward(args, &cfg);
        let lines: Value = serde_json::from_slice(&out.stdout).expect("--json output");
        lines[0].clone()
    };
    let dry = report(&["reconcile", "--target", "wms", "--dry-run", "--json"]);
    assert_eq!(
        ["checked", "equal", "resent", "deleted"].map(|k| dry[k].as_u64().unwrap()),
        [n, n - 12, 12, 3],
        "{dry}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(wms.accepted_count(), before, "a dry run sends nothing");
    let real = report(&["reconcile", "--target", "wms", "--json"]);
    assert_eq!(
        ["checked", "equal", "resent", "deleted"].map(|k| real[k].as_u64().unwrap()),
        [n, n - 12, 12, 3],
        "{real}"
    );
    let expected = db_prices(&db);
    wait_until("the target matches the database", WAIT, || {
        target_prices(&wms.accepted_events()) == expected
    })
    .await;
    assert_eq!(wms.accepted_count(), before + 15);
    // Nothing differs any more.
    let again = report(&["reconcile", "--target", "wms", "--json"]);
    assert_eq!(
        ["checked", "equal", "resent", "deleted"].map(|k| again[k].as_u64().unwrap()),
        [n, n, 0, 0],
        "{again}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(wms.accepted_count(), before + 15);
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rule_change_that_unpublishes_is_reconciled_with_deletes() {
    let db = TestDb::new("rec_rule");
    add_products(&db, 300);
    let wms = Receiver::start().await.unwrap();
    let cfg = db.write_config(&config_text(&db, &wms, ""));
    initial_snapshot(&db, &cfg, &wms).await;

    // The gate now withholds three products the target holds.
    db.write_config(&config_text(
        &db,
        &wms,
        "publish_when = \"!(row.default_code in ['BULK_1', 'BULK_2', 'BULK_3'])\"\n",
    ));
    steward(&["reconcile", "--target", "wms"], &cfg);
    let before = wms.accepted_count();
    let daemon = InProcess::start(steward_sinks::config::load(&cfg).unwrap());
    let line = reconciled(&cfg).await;
    let n = rows(&db) as u64;
    assert_eq!(counts(&line), [n, n - 3, 0, 3], "{line}");
    wait_until("the deletes arrive", WAIT, || {
        wms.accepted_count() >= before + 3
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let sent: Vec<Value> = wms.accepted_events()[before..].to_vec();
    let deleted: Vec<&str> = sent
        .iter()
        .filter(|e| e["op"] == "delete")
        .map(|e| e["subject"].as_str().unwrap())
        .collect();
    assert_eq!(deleted, ["100001", "100002", "100003"], "{sent:#?}");
    assert_eq!(sent.len(), 3);
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_reconcile_resumes_and_finishes() {
    let db = TestDb::new("rec_crash");
    add_products(&db, 60_000);
    let wms = Receiver::start_counting().await.unwrap();
    let cfg = db.write_config(&config_text(&db, &wms, ""));
    initial_snapshot(&db, &cfg, &wms).await;
    drop_slot(&db);
    drift_in_the_source(&db);
    steward(&["repair"], &cfg);

    let log = db.dir.path().join("steward.log");
    let child = kill_9_mid_reconcile(&cfg, &log).await;
    let line = reconciled(&cfg).await;
    assert_eq!(
        line["segments"], 2,
        "one snapshot before the kill, one after"
    );
    let n = rows(&db) as u64;
    let [checked, _, resent, deleted] = counts(&line);
    assert!(checked >= n, "{line}");
    assert_eq!((resent, deleted), (12, 3), "{line}");
    // Each gone key is deleted once, though its chunk was read twice.
    let gone = || {
        wms.accepted_log()
            .iter()
            .filter(|e| e.id.starts_with("gone-"))
            .count()
    };
    wait_until("the deletes arrive", WAIT, || gone() >= 3).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(gone(), 3);
    assert!(child.terminate().success());
}

/// Gap repair at scale: 300,000 products, 1,000 of them changed while the
/// slot was gone; `steward repair` sends each of two targets about 1,000
/// events, not 300,000. Run with
/// `STEWARD_RECONCILE_ROWS=300000 cargo test --release --test it reconcile::gap_repair_at_scale -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn gap_repair_at_scale() {
    let n: u32 = std::env::var("STEWARD_RECONCILE_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300_000);
    let db = TestDb::alone("rec_scale");
    add_products(&db, n);
    let wms = Receiver::start_counting().await.unwrap();
    let mes = Receiver::start_counting().await.unwrap();
    let text = config_text(&db, &wms, "");
    let text = format!(
        "{text}\n[targets.mes]\ntype = \"http\"\nurl = \"{}\"\nentities = [\"product\"]\ninitial = \"snapshot\"\nbatch_max_events = 5000\nbatch_linger_ms = 5\nretry_initial_ms = 50\nretry_max_ms = 500\ntimeout_ms = 5000\n",
        mes.url()
    );
    let cfg = db.write_config(&text);
    let total = rows(&db);
    let started = Instant::now();
    let daemon = InProcess::start(steward_sinks::config::load(&cfg).unwrap());
    wait_until(
        "the initial snapshots arrive",
        Duration::from_secs(1800),
        || wms.accepted_count() >= total && mes.accepted_count() >= total,
    )
    .await;
    println!(
        "initial snapshots of {total} rows to 2 targets: {:?}",
        started.elapsed()
    );
    daemon.stop().await.unwrap();

    drop_slot(&db);
    let which = "id % 300 = 0 AND id > 100000 AND id <= 400000";
    let changed: usize = db
        .sql(&format!(
            "SELECT count(*) FROM product_template WHERE {which}"
        ))
        .trim()
        .parse()
        .unwrap();
    db.sql(&format!(
        "UPDATE product_template SET list_price = list_price + 0.5 WHERE {which}"
    ));
    steward(&["repair"], &cfg);
    let (wms_before, mes_before) = (wms.accepted_count(), mes.accepted_count());
    let started = Instant::now();
    let daemon = InProcess::start(steward_sinks::config::load(&cfg).unwrap());
    let lines = reconciliations_done(&cfg, 2, Duration::from_secs(1800)).await;
    let took = started.elapsed();
    wait_until("the differences arrive", WAIT, || {
        wms.accepted_count() >= wms_before + changed && mes.accepted_count() >= mes_before + changed
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (wms_got, mes_got) = (
        wms.accepted_count() - wms_before,
        mes.accepted_count() - mes_before,
    );
    daemon.stop().await.unwrap();
    println!(
        "gap repair: {total} rows, {changed} changed while the slot was gone; reconciled in {took:?}; \
         events received: wms {wms_got}, mes {mes_got}; lines: {lines:?}"
    );
    assert_eq!((wms_got, mes_got), (changed, changed));
}

async fn scrape(port: u16) -> String {
    steward_postgres::install_default_provider();
    match reqwest::get(format!("http://127.0.0.1:{port}/metrics")).await {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduled_reconciliation_runs_and_reports_in_status_audit_and_metrics() {
    let db = TestDb::new("rec_schedule");
    add_products(&db, 100);
    let wms = Receiver::start().await.unwrap();
    let port = support::free_port();
    let text = config_text(&db, &wms, "");
    let text = TestDb::with_metrics(&text, port, "");
    let text = format!("{text}reconcile = {{ every = \"2s\" }}\n");
    let cfg = db.write_config(&text);
    let n = rows(&db);
    // A process of its own: the metrics recorder is one per process.
    let daemon = support::Steward::start(&cfg, &db.dir.path().join("steward.log"), &[]);
    wait_until("the initial snapshot arrives", WAIT, || {
        wms.accepted_count() >= n
    })
    .await;
    let line = reconciled(&cfg).await;
    assert_eq!(counts(&line), [n as u64, n as u64, 0, 0], "{line}");
    let mut metrics = String::new();
    let deadline = Instant::now() + WAIT;
    while !metrics.contains("steward_reconcile_last_completed_timestamp_seconds{") {
        assert!(Instant::now() < deadline, "no reconcile metrics: {metrics}");
        tokio::time::sleep(Duration::from_millis(200)).await;
        metrics = scrape(port).await;
    }
    for needed in [
        "steward_reconcile_records_total{target=\"wms\",entity=\"product\",result=\"equal\"}",
        "steward_reconcile_interval_seconds{target=\"wms\",entity=\"product\"} 2",
        "steward_reconcile_last_drift_records{target=\"wms\",entity=\"product\"} 0",
    ] {
        assert!(metrics.contains(needed), "{needed} missing from\n{metrics}");
    }
    let (status, _) = daemon.terminate().await;
    assert!(status.success());
    assert_eq!(
        wms.accepted_count(),
        n,
        "nothing differed, nothing was sent"
    );
    let audit = String::from_utf8_lossy(
        &steward(&["audit", "--decision", "reconciled", "--json"], &cfg).stdout,
    )
    .to_string();
    assert!(
        audit.contains(&format!("checked {n}, equal {n}, re-sent 0, deleted 0")),
        "{audit}"
    );
    // Runs that change nothing do not fill the audit trail record by record.
    let suppressed: Value = serde_json::from_slice(
        &steward(&["audit", "--decision", "suppressed", "--json"], &cfg).stdout,
    )
    .unwrap();
    assert_eq!(
        suppressed["audit"].as_array().map(Vec::len),
        Some(0),
        "{suppressed}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_the_target_lost_with_dropped_dead_letters_are_sent_again() {
    let db = TestDb::new("rec_lost");
    add_products(&db, 100);
    let wms = Receiver::start().await.unwrap();
    let cfg = db.write_config(&config_text(&db, &wms, ""));
    let n = rows(&db) as u64;
    let daemon = InProcess::start(steward_sinks::config::load(&cfg).unwrap());
    wait_until("the initial snapshot arrives", WAIT, || {
        wms.accepted_count() as u64 >= n
    })
    .await;

    // The target refuses a change; its dead letter is dropped: the target
    // never got it (and keeps the old price), though steward sent it.
    wms.set_behaviour(steward_devkit::receiver::Behaviour::FailKey {
        key: "100005".into(),
        status: 400,
    });
    db.sql("UPDATE product_template SET list_price = 555 WHERE id = 100005");
    wait_until("the change is dead-lettered", WAIT, || {
        String::from_utf8_lossy(&steward(&["dlq", "list", "--target", "wms"], &cfg).stdout)
            .contains("1 dead letter(s)")
    })
    .await;
    let out = steward(&["dlq", "drop", "--target", "wms", "--key", "100005"], &cfg);
    assert!(String::from_utf8_lossy(&out.stdout).contains("dropped 1"));
    wms.set_behaviour(steward_devkit::receiver::Behaviour::Ok);
    assert_ne!(
        target_prices(&wms.accepted_events()).get("100005"),
        db_prices(&db).get("100005")
    );

    let before = wms.accepted_count();
    let out = steward(&["reconcile", "--target", "wms", "--json"], &cfg);
    let lines: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        ["checked", "equal", "resent", "deleted"].map(|k| lines[0][k].as_u64().unwrap()),
        [n, n - 1, 1, 0],
        "{lines}"
    );
    let expected = db_prices(&db);
    wait_until("the target has the lost change", WAIT, || {
        target_prices(&wms.accepted_events()) == expected
    })
    .await;
    assert_eq!(wms.accepted_count(), before + 1);
    daemon.stop().await.unwrap();
}

// ------------------------------------------------------- deep (PostgreSQL)

/// One PostgreSQL target `mirror` of products (schema `mdm` of the test
/// database itself), with an initial snapshot.
fn pg_config_text(db: &TestDb, delete_mode: &str) -> String {
    format!(
        "{}\n[targets.mirror]\ntype = \"postgres\"\nurl = \"{}\"\nentities = [\"product\"]\nschema = \"mdm\"\ncreate_tables = true\ndelete_mode = \"{delete_mode}\"\ninitial = \"snapshot\"\nbatch_linger_ms = 5\nretry_initial_ms = 50\nretry_max_ms = 500\n",
        db.config_text(&[]),
        db.url()
    )
}

/// Rows present (not marked deleted) in the target table.
fn held(db: &TestDb) -> u64 {
    // The table is created by the target's first connection.
    if db
        .sql("SELECT to_regclass('mdm.product') IS NOT NULL")
        .trim()
        != "t"
    {
        return 0;
    }
    db.sql("SELECT count(*) FROM mdm.product WHERE NOT _deleted")
        .trim()
        .parse()
        .unwrap_or(0)
}

/// Keys where the target table and the source differ: a product missing
/// there, a row there of no product, or a row whose document (sku, price)
/// or price column is not the product's.
fn mismatches(db: &TestDb) -> Vec<String> {
    db.sql(
        "SELECT coalesce(t._key, p.id::text) FROM product_template p \
         FULL JOIN (SELECT * FROM mdm.product WHERE NOT _deleted) t ON t._key = p.id::text \
         WHERE t._key IS NULL OR p.id IS NULL \
            OR t.data -> 'price' IS DISTINCT FROM to_jsonb(p.list_price) \
            OR t.data ->> 'sku' IS DISTINCT FROM p.default_code \
            OR t.price IS DISTINCT FROM t.data -> 'price' \
         ORDER BY 1",
    )
    .lines()
    .map(|l| l.trim().to_string())
    .filter(|l| !l.is_empty())
    .collect()
}

/// `steward reconcile --target mirror ARGS --json`: the report's line.
fn reconcile_json(cfg: &Path, args: &[&str]) -> Value {
    let mut all = vec!["reconcile", "--target", "mirror", "--json"];
    all.extend_from_slice(args);
    let out = steward(&all, cfg);
    let lines: Value = serde_json::from_slice(&out.stdout).expect("--json output");
    lines[0].clone()
}

/// checked, equal, re-sent, deleted, changed, missing, extra, unrepairable.
fn deep_counts(line: &Value) -> [u64; 8] {
    [
        "checked",
        "equal",
        "resent",
        "deleted",
        "changed",
        "missing",
        "extra",
        "unrepairable",
    ]
    .map(|k| line[k].as_u64().unwrap_or(u64::MAX))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deep_reconcile_repairs_rows_changed_deleted_and_inserted_at_a_postgres_target() {
    let db = TestDb::new("rec_deep_soft");
    add_products(&db, 300);
    let cfg = db.write_config(&pg_config_text(&db, "soft"));
    let n = rows(&db) as u64;
    let daemon = InProcess::start(steward_sinks::config::load(&cfg).unwrap());
    wait_until("the initial snapshot is in the target table", WAIT, || {
        held(&db) == n
    })
    .await;
    assert_eq!(mismatches(&db), Vec::<String>::new());

    // Behind steward's back: a document changed, a price column changed, a
    // row deleted, a row marked deleted, a row changed with a version
    // beyond any steward writes, and a row inserted.
    db.sql(
        "UPDATE mdm.product SET data = jsonb_set(data, '{price}', '999') WHERE _key = '100001'; \
         UPDATE mdm.product SET price = '999' WHERE _key = '100002'; \
         DELETE FROM mdm.product WHERE _key = '100003'; \
         UPDATE mdm.product SET _deleted = true WHERE _key = '100004'; \
         UPDATE mdm.product SET data = '{}', price = NULL, _version = 9223372036854775807 WHERE _key = '100005'; \
         INSERT INTO mdm.product (_key, _version, _deleted, _event_id, data) \
         VALUES ('999999', 1, false, 'by-hand', '{\"sku\": \"HAND\"}');",
    );
    let drifted = ["100001", "100002", "100003", "100004", "100005", "999999"];
    assert_eq!(mismatches(&db), drifted);

    // What steward sent is unchanged: an ordinary reconciliation finds nothing.
    let plain = reconcile_json(&cfg, &[]);
    assert_eq!(counts_of(&plain), [n, n, 0, 0], "{plain}");

    // A deep dry run finds every row and changes nothing.
    let want = [n, n - 5, 4, 1, 3, 2, 1, 1];
    let dry = reconcile_json(&cfg, &["--deep", "--dry-run"]);
    assert_eq!(deep_counts(&dry), want, "{dry}");
    assert_eq!(
        (dry["deep"].clone(), dry["dry_run"].clone()),
        (true.into(), true.into())
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(mismatches(&db), drifted, "a dry run changes nothing");

    // The deep run repairs all but the row whose version steward cannot beat.
    let deep = reconcile_json(&cfg, &["--deep"]);
    assert_eq!(deep_counts(&deep), want, "{deep}");
    let status = String::from_utf8_lossy(&steward(&["status"], &cfg).stdout).to_string();
    assert!(
        status.contains(&format!(
            "deep: checked {n}, equal {}, re-sent 4, deleted 1; at the target: changed 3, \
             missing 2, extra 1, unrepairable 1",
            n - 5
        )),
        "{status}"
    );
    wait_until("the target is repaired", WAIT, || {
        mismatches(&db) == ["100005"]
    })
    .await;
    assert_eq!(
        db.sql("SELECT _deleted FROM mdm.product WHERE _key = '999999'")
            .trim(),
        "t",
        "the inserted row is deleted the way this target deletes (soft)"
    );
    let audit = String::from_utf8_lossy(
        &steward(&["audit", "--decision", "unrepairable", "--json"], &cfg).stdout,
    )
    .to_string();
    assert!(audit.contains("100005"), "{audit}");
    let audit = String::from_utf8_lossy(
        &steward(&["audit", "--decision", "reconciled", "--json"], &cfg).stdout,
    )
    .to_string();
    assert!(
        audit.contains("at the target: changed 3, missing 2, extra 1, unrepairable 1"),
        "{audit}"
    );

    // The operator lowers the row's version; an ordinary reconciliation then
    // sends it (it is not taken for held), and a last deep run finds the
    // target equal to the source.
    db.sql("UPDATE mdm.product SET _version = 1 WHERE _key = '100005'");
    let plain = reconcile_json(&cfg, &[]);
    assert_eq!(counts_of(&plain), [n, n - 1, 1, 0], "{plain}");
    wait_until("the last row is repaired", WAIT, || {
        mismatches(&db).is_empty()
    })
    .await;
    let last = reconcile_json(&cfg, &["--deep"]);
    assert_eq!(deep_counts(&last), [n, n, 0, 0, 0, 0, 0, 0], "{last}");
    let plain = reconcile_json(&cfg, &[]);
    assert_eq!(counts_of(&plain), [n, n, 0, 0], "{plain}");
    daemon.stop().await.unwrap();
}

fn counts_of(line: &Value) -> [u64; 4] {
    ["checked", "equal", "resent", "deleted"].map(|k| line[k].as_u64().unwrap_or(u64::MAX))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deep_reconcile_in_delete_mode_restores_deleted_rows_and_removes_inserted_ones() {
    let db = TestDb::new("rec_deep_hard");
    add_products(&db, 100);
    let port = support::free_port();
    let text = TestDb::with_metrics(&pg_config_text(&db, "delete"), port, "");
    let cfg = db.write_config(&text);
    let n = rows(&db) as u64;
    // A process of its own: the metrics recorder is one per process.
    let daemon = support::Steward::start(&cfg, &db.dir.path().join("steward.log"), &[]);
    wait_until("the initial snapshot is in the target table", WAIT, || {
        held(&db) == n
    })
    .await;
    // A product deleted in the source is deleted at the target as usual.
    db.sql("DELETE FROM product_template WHERE id = 100010");
    wait_until("the delete arrives", WAIT, || held(&db) == n - 1).await;
    let n = n - 1;

    db.sql(
        "UPDATE mdm.product SET data = jsonb_set(data, '{sku}', '\"HAND\"') WHERE _key = '100001'; \
         DELETE FROM mdm.product WHERE _key IN ('100002', '100003'); \
         INSERT INTO mdm.product (_key, _version, _deleted, _event_id, data) \
         VALUES ('100010', 1, false, 'by-hand', '{}'), ('888888', 1, false, 'by-hand', '{}');",
    );
    assert_eq!(
        mismatches(&db),
        ["100001", "100002", "100003", "100010", "888888"]
    );
    let deep = reconcile_json(&cfg, &["--deep"]);
    assert_eq!(deep_counts(&deep), [n, n - 3, 3, 2, 1, 2, 2, 0], "{deep}");
    wait_until("the target is repaired", WAIT, || {
        mismatches(&db).is_empty()
    })
    .await;
    assert_eq!(
        db.sql("SELECT count(*) FROM mdm.product__deleted WHERE _key IN ('100010', '888888')")
            .trim(),
        "2",
        "rows removed by the repair leave tombstones, as steward's deletes do"
    );
    let last = reconcile_json(&cfg, &["--deep"]);
    assert_eq!(deep_counts(&last), [n, n, 0, 0, 0, 0, 0, 0], "{last}");

    let mut metrics = String::new();
    let needed = "steward_reconcile_records_total{target=\"mirror\",entity=\"product\",result=\"missing\"} 2";
    let deadline = Instant::now() + WAIT;
    while !metrics.contains(needed) {
        assert!(
            Instant::now() < deadline,
            "{needed} missing from\n{metrics}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        metrics = scrape(port).await;
    }
    for needed in [
        "steward_reconcile_records_total{target=\"mirror\",entity=\"product\",result=\"changed\"} 1",
        "steward_reconcile_records_total{target=\"mirror\",entity=\"product\",result=\"extra\"} 2",
    ] {
        assert!(metrics.contains(needed), "{needed} missing from\n{metrics}");
    }
    let (status, _) = daemon.terminate().await;
    assert!(status.success());
}

#[test]
fn deep_is_refused_for_a_target_without_tables() {
    let db = TestDb::new("rec_deep_http");
    let text = format!(
        "{}\n[targets.wms]\ntype = \"http\"\nurl = \"http://127.0.0.1:9/\"\nentities = [\"product\"]\n",
        db.config_text(&[])
    );
    let cfg = db.write_config(&text);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_steward"))
        .args(["reconcile", "--target", "wms", "--deep", "-c"])
        .arg(&cfg)
        .env("STEWARD_LOG", "off")
        .output()
        .expect("run steward");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("only a PostgreSQL target has") && stderr.contains("type http"),
        "{stderr}"
    );
}

/// What a deep reconciliation costs over an ordinary one: N products at a
/// PostgreSQL target, 100 of them changed there by hand; both runs timed.
/// Run with `STEWARD_DEEP_ROWS=50000 cargo test --test it
/// reconcile::deep_reconcile_at_scale -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn deep_reconcile_at_scale() {
    let n: u32 = std::env::var("STEWARD_DEEP_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50_000);
    let db = TestDb::alone("rec_deep_scale");
    add_products(&db, n);
    let cfg = db.write_config(&pg_config_text(&db, "soft"));
    let total = rows(&db) as u64;
    let daemon = InProcess::start(steward_sinks::config::load(&cfg).unwrap());
    wait_until(
        "the initial snapshot is in the target table",
        Duration::from_secs(1800),
        || held(&db) == total,
    )
    .await;
    db.sql(
        "UPDATE mdm.product SET data = jsonb_set(data, '{price}', '-1') \
         WHERE _key IN (SELECT _key FROM mdm.product ORDER BY _key LIMIT 100)",
    );
    let started = Instant::now();
    let plain = reconcile_json(&cfg, &[]);
    let plain_took = started.elapsed();
    let started = Instant::now();
    let deep = reconcile_json(&cfg, &["--deep"]);
    let deep_took = started.elapsed();
    println!(
        "{total} rows, 100 changed at the target: ordinary reconcile {plain_took:?} \
         (found {}), deep reconcile {deep_took:?} (changed {})",
        plain["resent"], deep["changed"]
    );
    assert_eq!(counts_of(&plain), [total, total, 0, 0], "{plain}");
    assert_eq!(
        deep_counts(&deep),
        [total, total - 100, 100, 0, 100, 0, 0, 0],
        "{deep}"
    );
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_deep_reconcile_resumes_and_repairs_everything() {
    let db = TestDb::new("rec_deep_crash");
    add_products(&db, 30_000);
    let cfg = db.write_config(&pg_config_text(&db, "soft"));
    let n = rows(&db) as u64;
    let log = db.dir.path().join("steward.log");
    let child = Child::run(&cfg, &log);
    wait_until("the initial snapshot is in the target table", WAIT, || {
        held(&db) == n
    })
    .await;
    assert!(child.terminate().success());

    // Drift all over the table, and a row of no product.
    db.sql(
        "UPDATE mdm.product SET data = jsonb_set(data, '{price}', '-1') WHERE _key LIKE '1%00'; \
         DELETE FROM mdm.product WHERE _key LIKE '1%50'; \
         INSERT INTO mdm.product (_key, _version, _deleted, _event_id, data) \
         VALUES ('999999', 1, false, 'by-hand', '{}');",
    );
    let drifted = mismatches(&db).len();
    assert!(drifted > 500, "{drifted}");
    // Recorded while the daemon is stopped; it runs at the next start.
    let out = steward(&["reconcile", "--target", "mirror", "--deep"], &cfg);
    assert!(String::from_utf8_lossy(&out.stdout).contains("deeply reconciled"));

    let child = kill_9_mid_reconcile(&cfg, &log).await;
    let line = reconciled(&cfg).await;
    assert_eq!(
        line["segments"], 2,
        "one snapshot before the kill, one after"
    );
    assert_eq!(line["deep"], true);
    let c = &line["counts"];
    assert!(c["checked"].as_u64().unwrap() >= n, "{line}");
    assert_eq!(
        c["extra"], 1,
        "the inserted row, found by the sweep: {line}"
    );
    wait_until("the target is repaired", WAIT, || {
        mismatches(&db).is_empty()
    })
    .await;
    let last = reconcile_json(&cfg, &["--deep"]);
    assert_eq!(deep_counts(&last), [n, n, 0, 0, 0, 0, 0, 0], "{last}");
    assert!(child.terminate().success());
}

/// Starts the daemon with small snapshot chunks, kills it with SIGKILL once
/// its pending reconciliation has done 5,000 rows but not all, and starts it
/// again.
async fn kill_9_mid_reconcile(cfg: &Path, log: &Path) -> Child {
    let child = Child::run_with_env(cfg, log, &[("STEWARD_SNAPSHOT_CHUNK_ROWS", "500")]);
    let deadline = Instant::now() + WAIT;
    loop {
        assert!(Instant::now() < deadline, "no reconciliation progress");
        let v = daemon_status(cfg);
        let line = v["snapshots"]
            .as_array()
            .and_then(|a| a.iter().find(|s| s["reconcile"] == true).cloned())
            .unwrap_or(Value::Null);
        if v["daemon"]["running"] == true && line["rows_done"].as_u64().unwrap_or(0) >= 5_000 {
            assert_ne!(
                line["phase"], "done",
                "finished before the kill; make it larger"
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    child.kill9();
    Child::run(cfg, log)
}

/// The status lines of the daemon's reconciliations once there are `n` and
/// all are done.
async fn reconciliations_done(cfg: &Path, n: usize, timeout: Duration) -> Vec<Value> {
    let mut lines = Vec::new();
    wait_until("the reconciliations finish", timeout, || {
        lines = daemon_status(cfg)["snapshots"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter(|s| s["reconcile"] == true)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        lines.len() == n && lines.iter().all(|l| l["phase"] == "done")
    })
    .await;
    lines
}
