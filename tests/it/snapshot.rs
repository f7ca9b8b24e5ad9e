//! Initial snapshots, `steward reset`, crash resume and lost slots against a
//! real PostgreSQL and real HTTP receivers.

use crate::support;

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;
use steward_devkit::receiver::Receiver;
use steward_devkit::DevCluster;
use support::{daemon_status, db_prices, target_prices, wait_until, Child, InProcess, TestDb};

const WAIT: Duration = Duration::from_secs(120);

/// Adds `n` product templates with ids from 100000.
fn add_products(db: &TestDb, n: u32) {
    db.sql(&format!(
        "INSERT INTO product_template (id, categ_id, uom_id, uom_po_id, detailed_type, type, default_code, name, list_price, active, tracking, purchase_line_warn, sale_line_warn) \
         SELECT 100000 + g, 1, 1, 1, 'product', 'product', 'BULK_' || g, jsonb_build_object('en_US', 'Bulk ' || g), g, true, 'none', 'no-message', 'no-message' \
         FROM generate_series(1, {n}) g; ANALYZE product_template;"
    ));
}

/// Per key, versions never go backwards in arrival order.
fn assert_versions_monotonic(events: &[Value]) {
    let mut last: HashMap<(String, String), u64> = HashMap::new();
    for e in events {
        let k = (
            e["entity"].as_str().unwrap().to_string(),
            e["subject"].as_str().unwrap().to_string(),
        );
        let v: u64 = e["version"].as_str().unwrap().parse().unwrap();
        if let Some(prev) = last.get(&k) {
            assert!(
                v >= *prev,
                "{k:?}: version {v} arrived after {prev} (id {})",
                e["id"]
            );
        }
        last.insert(k, v);
    }
}

fn snapshot_config(db: &TestDb, targets: &[(&str, &str, &[&str], &str)]) -> String {
    let mut text = db.config_text(&[]);
    for (name, url, entities, initial) in targets {
        let list = entities
            .iter()
            .map(|e| format!("\"{e}\""))
            .collect::<Vec<_>>()
            .join(", ");
        text.push_str(&format!(
            "\n[targets.{name}]\ntype = \"http\"\nurl = \"{url}\"\nentities = [{list}]\ninitial = \"{initial}\"\nbatch_max_events = 5000\nbatch_linger_ms = 5\nretry_initial_ms = 50\nretry_max_ms = 500\ntimeout_ms = 5000\n"
        ));
    }
    text
}

fn status_json(config: &Path) -> Value {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_steward"))
        .args(["status", "--json", "-c"])
        .arg(config)
        .output()
        .expect("run steward status");
    serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
}

/// Runs a stream of single-row price updates until `stop` flips.
fn spawn_writer(
    pg: &'static DevCluster,
    db_name: String,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<u32> {
    std::thread::spawn(move || {
        let mut n = 0u32;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let id = 100000 + (n * 7919) % 20000 + 1;
            pg.psql(
                &db_name,
                &format!(
                    "UPDATE product_template SET list_price = list_price + 1000 WHERE id = {id}; \
                         UPDATE product_template SET list_price = list_price + 1 WHERE id = {}",
                    100000 + (n * 31) % 20000 + 1
                ),
            )
            .expect("update");
            n += 1;
        }
        n
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn initial_snapshot_is_consistent_with_concurrent_writes() {
    snapshot_consistent_with_concurrent_writes(support::cluster()).await;
}

/// The scenario on any cluster; `versions` runs it per PostgreSQL major.
pub(crate) async fn snapshot_consistent_with_concurrent_writes(pg: &'static DevCluster) {
    let db = TestDb::on(pg, "snap_consistent");
    add_products(&db, 20000);
    let wms = Receiver::start().await.unwrap();
    let cfg = db.write_config(&snapshot_config(
        &db,
        &[("wms", &wms.url(), &["product", "uom"], "snapshot")],
    ));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = spawn_writer(pg, db.name.clone(), stop.clone());
    let daemon = InProcess::start(steward_sinks::config::load(&cfg).unwrap());
    // Writes go on during the snapshot and a little after it.
    wait_until("the snapshot rows arrive", WAIT, || {
        wms.accepted_count() >= 20000
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let updates = writer.join().unwrap();
    assert!(updates > 0, "the writer made updates during the snapshot");

    let expected = db_prices(&db);
    let deadline = Instant::now() + WAIT;
    loop {
        let got = target_prices(&wms.accepted_events());
        if got == expected {
            break;
        }
        if Instant::now() > deadline {
            let diff: Vec<_> = expected
                .iter()
                .filter(|(k, v)| got.get(*k) != Some(*v))
                .take(10)
                .collect();
            panic!(
                "the target's products differ from the database ({} vs {} keys), e.g. {diff:?}",
                got.len(),
                expected.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let events = wms.accepted_events();
    assert_versions_monotonic(&events);
    let snap_ids = events
        .iter()
        .filter(|e| e["id"].as_str().unwrap().starts_with("snap-"))
        .count();
    // A row updated by the stream before its snapshot row was queued gets
    // only the (newer) streamed event: a few snapshot rows are dropped.
    assert!(
        snap_ids >= 19000,
        "existing rows came as snapshot rows: {snap_ids}"
    );
    assert!(
        events.iter().any(|e| e["entity"] == "uom"),
        "every entity of the target is snapshotted"
    );
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_of_one_target_while_another_keeps_receiving() {
    let db = TestDb::new("snap_reset");
    add_products(&db, 20000);
    let mes = Receiver::start().await.unwrap();
    let erp = Receiver::start().await.unwrap();
    let cfg = db.write_config(&snapshot_config(
        &db,
        &[
            ("mes", &mes.url(), &["product"], "snapshot"),
            ("erp", &erp.url(), &["product"], "none"),
        ],
    ));
    let daemon = InProcess::start(steward_sinks::config::load(&cfg).unwrap());
    wait_until("the initial snapshot arrives", WAIT, || {
        mes.accepted_count() >= 20000
    })
    .await;
    assert_eq!(
        erp.accepted_count(),
        0,
        "initial = \"none\" gets no snapshot"
    );

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = spawn_writer(db.cluster(), db.name.clone(), stop.clone());
    wait_until("erp receives streamed changes", WAIT, || {
        erp.accepted_count() > 10
    })
    .await;
    let mes_before = mes.accepted_count();
    let cfg2 = cfg.clone();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_steward"))
            .args(["reset", "--target", "mes", "-c"])
            .arg(&cfg2)
            .output()
            .expect("run steward reset")
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "reset failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let erp_during = erp.accepted_count();
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.join().unwrap();
    wait_until(
        "the reset's fresh snapshot reaches the target",
        WAIT,
        || mes.accepted_count() >= mes_before + 19000,
    )
    .await;

    let expected = db_prices(&db);
    for (name, receiver) in [("mes", &mes), ("erp", &erp)] {
        let deadline = Instant::now() + WAIT;
        loop {
            let got = target_prices(&receiver.accepted_events());
            // erp never had a snapshot: it holds only the keys changed since.
            let matches = if name == "erp" {
                got.iter().all(|(k, v)| expected.get(k) == Some(v)) && !got.is_empty()
            } else {
                got == expected
            };
            if matches {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "target {name} differs from the database after the reset"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert_versions_monotonic(&receiver.accepted_events());
    }
    assert!(
        erp_during > 10,
        "the other target kept receiving during the reset"
    );
    let status = status_json(&cfg);
    let line = status["snapshots"]
        .as_array()
        .and_then(|s| s.iter().find(|l| l["target"] == "mes").cloned())
        .expect("status shows the reset's snapshot");
    assert_eq!(line["phase"], "done");
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_snapshot_resumes_from_the_last_chunk() {
    // 200,000 rows within WAIT: not while another test takes half the machine.
    let db = TestDb::alone("snap_crash");
    let total_extra = 200_000u32;
    add_products(&db, total_extra);
    let total: u64 = db
        .sql("SELECT count(*) FROM product_template")
        .trim()
        .parse()
        .unwrap();
    let wms = Receiver::start_counting().await.unwrap();
    let cfg = db.write_config(&snapshot_config(
        &db,
        &[("wms", &wms.url(), &["product"], "snapshot")],
    ));
    let log = db.dir.path().join("steward.log");
    std::env::set_var("STEWARD_SNAPSHOT_CHUNK_ROWS", "2000");
    let child = Child::run(&cfg, &log);
    let mut done_at_kill = 0;
    let deadline = Instant::now() + WAIT;
    while done_at_kill < 10_000 {
        assert!(Instant::now() < deadline, "no snapshot progress");
        let v = daemon_status(&cfg);
        if v["daemon"]["running"] == true {
            if let Some(line) = v["snapshots"].as_array().and_then(|a| a.first()) {
                assert_ne!(
                    line["phase"], "done",
                    "the snapshot finished before the kill; make it larger"
                );
                done_at_kill = line["rows_done"].as_u64().unwrap_or(0);
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    child.kill9();
    let child = Child::run(&cfg, &log);
    std::env::remove_var("STEWARD_SNAPSHOT_CHUNK_ROWS");
    let mut line = Value::Null;
    wait_until("the resumed snapshot finishes", WAIT, || {
        let v = daemon_status(&cfg);
        if v["daemon"]["running"] != true {
            return false;
        }
        line = v["snapshots"]
            .as_array()
            .and_then(|a| a.first().cloned())
            .unwrap_or(Value::Null);
        line["phase"] == "done"
    })
    .await;
    let rows_read = line["rows_read"].as_u64().unwrap();
    let rows_done = line["rows_done"].as_u64().unwrap();
    println!(
        "rows {total}, appended {rows_done}, read {rows_read} (killed at >= {done_at_kill}), snapshots {}",
        line["segments"]
    );
    assert_eq!(
        line["segments"], 2,
        "one snapshot before the kill, one after"
    );
    assert_eq!(rows_done, total, "every row appended once");
    // A restart from scratch would have read `done_at_kill` rows again.
    assert!(
        rows_read < total + done_at_kill,
        "the resumed snapshot re-read at most the chunk in flight: read {rows_read} of {total}"
    );
    // Distinct keys, not events: what was in flight at the kill arrives twice.
    let seen = || -> std::collections::HashSet<String> {
        wms.accepted_log()
            .iter()
            .filter_map(|e| e.id.split_once("-product-").map(|(_, k)| k.to_string()))
            .collect()
    };
    wait_until("every product reaches the target", WAIT, || {
        seen().len() as u64 >= total
    })
    .await;
    let status = child.terminate();
    assert!(status.success());
    assert_eq!(
        seen().len() as u64,
        total,
        "every product reached the target"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_dropped_while_running_stops_with_the_fix_and_reset_all_recovers() {
    dropped_slot_stops_and_reset_all_recovers(support::cluster()).await;
}

/// The scenario on any cluster; `versions` runs it per PostgreSQL major.
pub(crate) async fn dropped_slot_stops_and_reset_all_recovers(pg: &'static DevCluster) {
    let db = TestDb::on(pg, "snap_dropped");
    let wms = Receiver::start().await.unwrap();
    let cfg = db.write_config(&snapshot_config(
        &db,
        &[("wms", &wms.url(), &["product"], "snapshot")],
    ));
    let rows: usize = db
        .sql("SELECT count(*) FROM product_template")
        .trim()
        .parse()
        .unwrap();
    let daemon = InProcess::start(steward_sinks::config::load(&cfg).unwrap());
    wait_until("the initial snapshot arrives", WAIT, || {
        wms.accepted_count() >= rows
    })
    .await;
    db.sql("UPDATE product_template SET list_price = 1 WHERE id = (SELECT min(id) FROM product_template)");
    wait_until("a streamed change arrives", WAIT, || {
        wms.accepted_count() > rows
    })
    .await;

    // Someone drops the slot under the running daemon.
    let slot = format!("steward_{}", db.name);
    let mut dropped = false;
    for _ in 0..50 {
        let out = pg.psql(
            "postgres",
            &format!(
                "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = '{slot}' AND active; \
                 SELECT pg_sleep(0.05); SELECT pg_drop_replication_slot('{slot}');"
            ),
        );
        if out.is_ok() {
            dropped = true;
            break;
        }
    }
    assert!(dropped, "could not drop the slot");
    wait_until("the daemon stops", WAIT, || daemon.is_finished()).await;
    let err = daemon.stop().await.expect_err("a dropped slot is an error");
    let text = format!("{err:#}");
    assert!(
        text.contains("no longer exists") && text.contains("reset --all"),
        "the error names the problem and the fix: {text}"
    );

    // Meanwhile a change nobody streamed; then the documented fix.
    db.sql("UPDATE product_template SET list_price = 4242 WHERE id = (SELECT max(id) FROM product_template)");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_steward"))
        .args(["reset", "--all", "-c"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let before = wms.accepted_count();
    let daemon = InProcess::start(steward_sinks::config::load(&cfg).unwrap());
    wait_until("the fresh snapshot arrives", WAIT, || {
        wms.accepted_count() >= before + rows
    })
    .await;
    let expected = db_prices(&db);
    wait_until("the target matches the database again", WAIT, || {
        target_prices(&wms.accepted_events()) == expected
    })
    .await;
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_table_read_feeds_every_target() {
    let db = TestDb::new("snap_shared");
    add_products(&db, 3000);
    let receivers = [
        Receiver::start().await.unwrap(),
        Receiver::start().await.unwrap(),
        Receiver::start().await.unwrap(),
    ];
    let cfg = db.write_config(&snapshot_config(
        &db,
        &[
            ("mes", &receivers[0].url(), &["product"], "snapshot"),
            ("wms", &receivers[1].url(), &["product"], "snapshot"),
            ("plm", &receivers[2].url(), &["product"], "snapshot"),
        ],
    ));
    let products: usize = db
        .sql("SELECT count(*) FROM product_template")
        .trim()
        .parse()
        .unwrap();
    let chunk = 250;
    let chunks = products / chunk + 1;
    let scans_before = support::table_scans(&db, "product_template");
    let child = Child::run_with_env(
        &cfg,
        &db.dir.path().join("steward.log"),
        &[("STEWARD_SNAPSHOT_CHUNK_ROWS", &chunk.to_string())],
    );
    wait_until("every target has every product", WAIT, || {
        receivers.iter().all(|r| r.accepted_count() >= products)
    })
    .await;
    let status = daemon_status(&cfg);
    child.terminate();
    let lines = status["snapshots"].as_array().cloned().unwrap_or_default();
    assert_eq!(lines.len(), 3, "a job per target: {status}");
    for line in &lines {
        assert_eq!(line["phase"], "done", "{line}");
        assert_eq!(line["rows_done"], products as u64, "{line}");
    }
    let expected = db_prices(&db);
    for r in &receivers {
        let events = r.accepted_events();
        assert_eq!(events.len(), products, "one event per product");
        assert_eq!(target_prices(&events), expected);
    }
    let scans = support::steady_table_scans(&db, "product_template").await;
    let reads = scans - scans_before;
    // Three reads (one per target) would take at least 3 × chunks scans.
    assert!(
        reads >= chunks as u64 && reads < 2 * chunks as u64,
        "{reads} scans of the table for {chunks} chunks: the three targets share one read"
    );
}

/// Snapshot speed into the outbox. Run with
/// `STEWARD_SNAPSHOT_ROWS=1000000 cargo test --release --test snapshot snapshot_throughput -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn snapshot_throughput() {
    let n: u32 = std::env::var("STEWARD_SNAPSHOT_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let db = TestDb::new("snap_speed");
    add_products(&db, n);
    let wms = Receiver::start_counting().await.unwrap();
    let cfg = db.write_config(&snapshot_config(
        &db,
        &[("wms", &wms.url(), &["product"], "snapshot")],
    ));
    let child = Child::run(&cfg, &db.dir.path().join("steward.log"));
    let mut line = Value::Null;
    wait_until("the snapshot finishes", Duration::from_secs(1800), || {
        let v = daemon_status(&cfg);
        if v["daemon"]["running"] != true {
            return false;
        }
        line = v["snapshots"]
            .as_array()
            .and_then(|a| a.first().cloned())
            .unwrap_or(Value::Null);
        line["phase"] == "done"
    })
    .await;
    let t = |k: &str| chrono::DateTime::parse_from_rfc3339(line[k].as_str().unwrap()).unwrap();
    let secs = (t("finished_at") - t("started_at")).num_milliseconds() as f64 / 1000.0;
    let rows = line["rows_done"].as_u64().unwrap();
    println!(
        "snapshot: {rows} rows into the outbox in {secs:.1} s = {:.0} rows/s",
        rows as f64 / secs
    );
    let pid = child.child.id();
    let hwm = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmHWM"))
        .map(str::to_string);
    println!("steward peak RSS: {hwm:?}");
    child.terminate();
}
