//! Snapshot and reconciliation benchmark: one table of products read from a
//! consistent snapshot, governed and appended to the outboxes of 1 and 3
//! HTTP targets (release build, a separate steward process, so its peak RSS
//! is its own).
//!
//! `cargo bench --bench snapshot` runs both phases for 1 and 3 targets;
//! `cargo bench --bench snapshot -- SNAPSHOT` or `-- RECONCILE` one of them.
//! `STEWARD_BENCH_ROWS` sets the table size (default 1,000,000),
//! `STEWARD_BENCH_TARGETS` the target counts (default `1,3`),
//! `STEWARD_BENCH_CHANGED` the rows changed while the slot is gone (default 1,000),
//! `STEWARD_BENCH_WRAPPER` a command `steward run` runs under (see the e2e bench),
//! `STEWARD_BENCH_TARGETS_DOWN=1` points every target at a port that refuses
//! connections: the snapshot's own cost, with no delivery competing for the
//! cores (SNAPSHOT only; nothing is delivered).
//!
//! - SNAPSHOT: the initial snapshot of a fresh state file. Rows/s is table
//!   rows over the time from the first job's start to the last job's end
//!   (`steward status`: every row governed and durable in every outbox);
//!   "delivered" is until every receiver has every row.
//! - RECONCILE: after the snapshot, steward is stopped, `STEWARD_BENCH_CHANGED`
//!   rows change, and `steward repair` makes the next start recreate the slot
//!   and reconcile every target. Rows/s is table rows over the reconciliation's
//!   time; each target should receive exactly the changed rows.

use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::Value;
use steward_devkit::cluster::{DevCluster, DevClusterOptions};
use steward_devkit::receiver::Receiver;

#[path = "support/steward.rs"]
mod daemon;
use daemon::{spawn, stop, wait_done};

const DB: &str = "bench_snapshot";

fn main() {
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let wanted = |phase: &str| filter.is_empty() || filter.iter().any(|f| f == phase);
    let env_num = |name: &str, default: u64| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let rows = env_num("STEWARD_BENCH_ROWS", 1_000_000);
    let changed = env_num("STEWARD_BENCH_CHANGED", 1_000).min(rows);
    let target_counts: Vec<usize> = std::env::var("STEWARD_BENCH_TARGETS")
        .unwrap_or_else(|_| "1,3".into())
        .split(',')
        .filter_map(|n| n.trim().parse().ok())
        .collect();
    let cluster = DevCluster::start(DevClusterOptions::default()).expect("start PostgreSQL");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    println!(
        "steward snapshot benchmark: {rows} products, PostgreSQL {}, {} cores",
        cluster.server_version_num(),
        std::thread::available_parallelism()
            .map(std::num::NonZero::get)
            .unwrap_or(1)
    );
    cluster.create_database(DB).expect("create database");
    cluster.load_odoo_fixture(DB).expect("fixture");
    let step = 50_000;
    for start in (0..rows).step_by(step as usize) {
        let end = (start + step).min(rows);
        cluster
            .psql(DB, &format!(
                "INSERT INTO product_template (id, categ_id, uom_id, uom_po_id, detailed_type, type, default_code, name, list_price, active, tracking, purchase_line_warn, sale_line_warn) \
                 SELECT 100000 + g, 1, 1, 1, 'product', 'product', 'B-' || g, jsonb_build_object('en_US', 'Bench product ' || g), g * 1.25, true, 'none', 'no-message', 'no-message' \
                 FROM generate_series({}, {end}) g",
                start + 1
            ))
            .expect("load products");
    }
    cluster
        .psql(DB, "VACUUM ANALYZE product_template")
        .expect("analyze");
    println!("| phase | targets | rows | rows/s into the outboxes | delivered after | events per target | steward peak RSS |");
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    for &targets in &target_counts {
        runtime.block_on(run(&cluster, rows, changed, targets, &wanted));
    }
    let _ = cluster.psql("postgres", &format!("DROP DATABASE {DB} WITH (FORCE)"));
}

async fn run(
    cluster: &DevCluster,
    rows: u64,
    changed: u64,
    targets: usize,
    wanted: &dyn Fn(&str) -> bool,
) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut receivers = Vec::new();
    for _ in 0..targets {
        receivers.push(Receiver::start_counting().await.expect("receiver"));
    }
    let slot = format!("steward_bench_{targets}");
    let mut text = format!(
        r#"[source]
url = "{url}"
slot = "{slot}"
publication = "steward_bench"
[state]
path = "{state}"
# Off: another steward on the machine may hold the default port.
[metrics]
listen = ""
[entities.product]
table = "product_template"
fields = {{ sku = "default_code", name = "name.en_US", price = "list_price", uom_id = "uom_id", active = "active" }}
"#,
        url = cluster.url(DB),
        state = dir.path().join("steward.redb").display(),
    );
    // Targets that refuse connections: the snapshot's own cost, without
    // the deliveries competing for the machine's cores.
    let down = std::env::var_os("STEWARD_BENCH_TARGETS_DOWN").is_some();
    for (i, r) in receivers.iter().enumerate() {
        let url = if down {
            "http://127.0.0.1:9/".to_string()
        } else {
            r.url()
        };
        text.push_str(&format!(
            "[targets.t{i}]\ntype = \"http\"\nurl = \"{url}\"\nentities = [\"product\"]\ninitial = \"snapshot\"\nbatch_max_events = 5000\n"
        ));
    }
    let config = dir.path().join("steward.toml");
    std::fs::write(&config, text).expect("config");

    // The snapshot runs in any case: the reconciliation compares with it.
    let started = Instant::now();
    let log = dir.path().join("snapshot.log");
    let mut child = spawn(&config, &log);
    let jobs = wait_done(&config, &mut child, &log, |j| {
        !j["reconcile"].as_bool().unwrap_or(false)
    });
    let outbox_rate = rows as f64 / span_secs(&jobs);
    if down {
        let rss = steward_devkit::peak_rss_kib(child.id());
        stop(child);
        println!(
            "| SNAPSHOT, targets down | {targets} | {rows} | {outbox_rate:.0} | - | - | {:.1} MiB |",
            rss as f64 / 1024.0
        );
        let _ = cluster.psql(DB, &format!("SELECT pg_drop_replication_slot('{slot}')"));
        return;
    }
    for r in &receivers {
        r.wait_for_events(rows as usize, Duration::from_secs(1800))
            .await;
    }
    let delivered = started.elapsed();
    let counts: Vec<usize> = receivers.iter().map(Receiver::accepted_count).collect();
    let rss = steward_devkit::peak_rss_kib(child.id());
    stop(child);
    if wanted("SNAPSHOT") {
        println!(
            "| SNAPSHOT | {targets} | {rows} | {outbox_rate:.0} | {:.1} s | {} | {:.1} MiB |",
            delivered.as_secs_f64(),
            join(&counts),
            rss as f64 / 1024.0
        );
    }
    if !wanted("RECONCILE") {
        let _ = cluster.psql(DB, &format!("SELECT pg_drop_replication_slot('{slot}')"));
        return;
    }

    // A gap: rows change while steward is stopped and its slot is gone.
    cluster
        .psql(
            DB,
            &format!(
                "UPDATE product_template SET list_price = list_price + 1 WHERE id BETWEEN 100001 AND {}",
                100000 + changed
            ),
        )
        .expect("change rows");
    // The binary under test (`STEWARD_BENCH_WRAPPER`) repairs its own state file.
    let status = steward_devkit::bench_command(env!("CARGO_BIN_EXE_steward"))
        .args(["repair", "-c"])
        .arg(&config)
        .env("STEWARD_LOG", "off")
        .stdout(Stdio::null())
        .status()
        .expect("steward repair");
    assert!(status.success(), "steward repair failed");
    let before: Vec<usize> = receivers.iter().map(Receiver::accepted_count).collect();
    let log = dir.path().join("reconcile.log");
    let mut child = spawn(&config, &log);
    let jobs = wait_done(&config, &mut child, &log, |j| {
        j["reconcile"].as_bool().unwrap_or(false)
    });
    let rate = rows as f64 / span_secs(&jobs);
    let started = Instant::now();
    for (r, b) in receivers.iter().zip(&before) {
        r.wait_for_events(b + changed as usize, Duration::from_secs(600))
            .await;
    }
    // Anything more than the changed rows would show here.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let sent: Vec<usize> = receivers
        .iter()
        .zip(&before)
        .map(|(r, b)| r.accepted_count() - b)
        .collect();
    let rss = steward_devkit::peak_rss_kib(child.id());
    stop(child);
    println!(
        "| RECONCILE | {targets} | {rows} | {rate:.0} | {:.1} s | {} | {:.1} MiB |",
        started.elapsed().as_secs_f64(),
        join(&sent),
        rss as f64 / 1024.0
    );
    // Put the changed rows back for the next run.
    cluster
        .psql(
            DB,
            &format!(
                "UPDATE product_template SET list_price = list_price - 1 WHERE id BETWEEN 100001 AND {}",
                100000 + changed
            ),
        )
        .expect("restore rows");
    let _ = cluster.psql(DB, &format!("SELECT pg_drop_replication_slot('{slot}')"));
}

/// Seconds from the first job's start to the last job's end.
fn span_secs(jobs: &[Value]) -> f64 {
    let time = |j: &Value, k: &str| {
        chrono::DateTime::parse_from_rfc3339(j[k].as_str().expect("a time")).expect("RFC 3339")
    };
    let first = jobs.iter().map(|j| time(j, "started_at")).min().unwrap();
    let last = jobs.iter().map(|j| time(j, "finished_at")).max().unwrap();
    ((last - first).num_microseconds().unwrap_or(0) as f64 / 1e6).max(1e-3)
}

fn join(counts: &[usize]) -> String {
    counts
        .iter()
        .map(usize::to_string)
        .collect::<Vec<_>>()
        .join(" / ")
}
