//! Governed state at scale: steward's memory and start-up time against the
//! number of records it governs (issue "Scale", goal 1).
//!
//! Products (a gate, a business key, a reference to their unit) and partners
//! (a gate, a rule) go to `STEWARD_BENCH_TARGETS` HTTP targets (default 3).
//! For each size in `STEWARD_BENCH_RECORDS` (default `10000,100000,1000000`:
//! that many products and as many partners; the tables grow from one size
//! to the next), on a fresh state file. Every tenth product is not for sale
//! (gated); every thousandth partner has no e-mail (quarantined;
//! `STEWARD_BENCH_QUARANTINE_EVERY`).
//!
//! - snapshot: the initial snapshot of both tables into every target, until
//!   every target has every publishable record: seconds, peak RSS;
//! - start-up: steward stopped and started again on that state: seconds until
//!   it logs "steward started" (state loaded, ready to stream), RSS then;
//! - stream: `STEWARD_BENCH_UPDATES` (default 20,000) changes in transactions
//!   of 100 in Odoo's pattern (half of them new products, each inserted and
//!   then updated in its transaction; the rest updates of random products
//!   and partners), delivered to every target: peak RSS while streaming
//!   (counted from the start-up), idle RSS 5 s after the last event arrived.
//!
//! `cargo bench --bench governed`; `STEWARD_BENCH_WRAPPER` runs steward under
//! a command, as in the e2e bench.

use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

use steward_devkit::cluster::{DevCluster, DevClusterOptions};
use steward_devkit::receiver::Receiver;

#[path = "support/steward.rs"]
mod daemon;
use daemon::{assert_running, spawn, stop, wait_done};

const DB: &str = "bench_governed";
/// Products whose id is a multiple of this are not for sale: gated.
const GATED_EVERY: u64 = 10;
/// Partners whose id is a multiple of this have no e-mail: quarantined
/// (`STEWARD_BENCH_QUARANTINE_EVERY`; quarantined records are held in memory).
fn no_email_every() -> u64 {
    std::env::var("STEWARD_BENCH_QUARANTINE_EVERY")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(1000)
}

fn main() {
    let env_list = |name: &str, default: &str| -> Vec<u64> {
        std::env::var(name)
            .unwrap_or_else(|_| default.into())
            .split(',')
            .filter_map(|n| n.trim().parse().ok())
            .collect()
    };
    let sizes = env_list("STEWARD_BENCH_RECORDS", "10000,100000,1000000");
    let targets = env_list("STEWARD_BENCH_TARGETS", "3")
        .first()
        .copied()
        .unwrap_or(3) as usize;
    let updates = env_list("STEWARD_BENCH_UPDATES", "20000")
        .first()
        .copied()
        .unwrap_or(20_000);
    let cluster = DevCluster::start(DevClusterOptions::default()).expect("start PostgreSQL");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    println!(
        "steward governed-state benchmark: {targets} targets, PostgreSQL {}, {} cores",
        cluster.server_version_num(),
        std::thread::available_parallelism()
            .map(std::num::NonZero::get)
            .unwrap_or(1)
    );
    cluster.create_database(DB).expect("create database");
    cluster.load_odoo_fixture(DB).expect("fixture");
    println!("| records (products + partners) | snapshot | snapshot peak RSS | start-up | RSS after start-up | stream peak RSS | idle RSS | events per target |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- |");
    let mut loaded = 0;
    for &size in &sizes {
        load(&cluster, loaded, size);
        loaded = loaded.max(size);
        runtime.block_on(run(&cluster, size, targets, updates));
    }
    let _ = cluster.psql("postgres", &format!("DROP DATABASE {DB} WITH (FORCE)"));
}

/// Grows both tables from `from` to `to` records each.
fn load(cluster: &DevCluster, from: u64, to: u64) {
    let step = 50_000;
    let no_email = no_email_every();
    let mut start = from;
    while start < to {
        let end = (start + step).min(to);
        cluster
            .psql(DB, &format!(
                "INSERT INTO product_template (id, categ_id, uom_id, uom_po_id, detailed_type, type, default_code, name, list_price, active, sale_ok, tracking, purchase_line_warn, sale_line_warn) \
                 SELECT 100000 + g, 1, 1, 1, 'product', 'product', 'G-' || g, jsonb_build_object('en_US', 'Governed product ' || g), g * 1.25, true, g % {GATED_EVERY} <> 0, 'none', 'no-message', 'no-message' \
                 FROM generate_series({}, {end}) g;
                 INSERT INTO res_partner (id, name, complete_name, ref, email, active, is_company, type, lang) \
                 SELECT 100000 + g, 'Partner ' || g, 'Partner ' || g, 'P-' || g, CASE WHEN g % {no_email} = 0 THEN NULL ELSE 'p' || g || '@example.com' END, true, g % 3 = 0, 'contact', 'en_US' \
                 FROM generate_series({}, {end}) g",
                start + 1,
                start + 1
            ))
            .expect("load records");
        start = end;
    }
    cluster
        .psql(
            DB,
            "VACUUM ANALYZE product_template; VACUUM ANALYZE res_partner",
        )
        .expect("analyze");
}

/// Publishable records among the `size` of each table the bench adds (the
/// fixture's own are sent as well).
fn publishable(size: u64) -> u64 {
    (size - size / GATED_EVERY) + (size - size / no_email_every())
}

async fn run(cluster: &DevCluster, size: u64, targets: usize, updates: u64) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut receivers = Vec::new();
    for _ in 0..targets {
        receivers.push(Receiver::start_counting().await.expect("receiver"));
    }
    let slot = format!("steward_governed_{size}");
    let mut text = format!(
        r#"[source]
url = "{url}"
slot = "{slot}"
publication = "steward_governed"
[state]
path = "{state}"
# Off: another steward on the machine may hold the default port.
[metrics]
listen = ""
[entities.uom]
table = "uom_uom"
fields = {{ name = "name.en_US" }}
[entities.product]
table = "product_template"
fields = {{ sku = "default_code", name = "name.en_US", price = "list_price", uom = {{ ref = "uom_id", entity = "uom", key = "name" }} }}
publish_when = "row.active && row.sale_ok"
unique = ["default_code"]
[entities.partner]
table = "res_partner"
fields = {{ name = "name", ref = "ref", email = "email", company = "is_company" }}
publish_when = "row.active"
[[entities.partner.rules]]
name = "email_required"
required = ["email"]
message = "a partner needs an e-mail address"
"#,
        url = cluster.url(DB),
        state = dir.path().join("steward.redb").display(),
    );
    for (i, r) in receivers.iter().enumerate() {
        text.push_str(&format!(
            "[targets.t{i}]\ntype = \"http\"\nurl = \"{}\"\nentities = [\"product\", \"partner\"]\ninitial = \"snapshot\"\nbatch_max_events = 5000\n",
            r.url()
        ));
    }
    let config = dir.path().join("steward.toml");
    std::fs::write(&config, text).expect("config");

    let started = Instant::now();
    let log = dir.path().join("snapshot.log");
    let mut child = spawn(&config, &log);
    wait_done(&config, &mut child, &log, |_| true);
    let expected = publishable(size) as usize;
    for r in &receivers {
        r.wait_for_events(expected, Duration::from_secs(3600)).await;
    }
    let snapshot = started.elapsed();
    let snapshot_rss = steward_devkit::peak_rss_kib(child.id());
    stop(child);

    let log = dir.path().join("run.log");
    let started = Instant::now();
    let mut child = spawn(&config, &log);
    wait_logged(&mut child, &log, "steward started");
    let startup = started.elapsed();
    let startup_rss = steward_devkit::rss_kib(child.id());

    let before: Vec<usize> = receivers.iter().map(Receiver::accepted_count).collect();
    let txns = updates.div_ceil(100);
    for t in 0..txns {
        // Odoo's create(): an insert, then its computed columns written
        // back in the same transaction; and writes to existing records.
        let sql = if t % 2 == 0 {
            format!(
                "DO $$ DECLARE x int; BEGIN FOR i IN 1..100 LOOP \
                 INSERT INTO product_template (categ_id, uom_id, uom_po_id, detailed_type, type, default_code, name, list_price, active, sale_ok, tracking, purchase_line_warn, sale_line_warn) \
                 VALUES (1, 1, 1, 'product', 'product', 'N-{size}-{t}-' || i, jsonb_build_object('en_US', 'New product'), 10, true, true, 'none', 'no-message', 'no-message') RETURNING id INTO x; \
                 UPDATE product_template SET list_price = 11, write_date = now() WHERE id = x; END LOOP; END $$"
            )
        } else {
            format!(
                "BEGIN; UPDATE product_template SET list_price = list_price + 1, write_date = now() \
                 WHERE id IN (SELECT 100000 + 1 + ((g * 7919 + {t}::bigint * 104729) % {size}) FROM generate_series(1, 50) g) AND sale_ok; \
                 UPDATE res_partner SET phone = '{t}', email = coalesce(email, 'fixed@example.com'), write_date = now() \
                 WHERE id IN (SELECT 100000 + 1 + ((g * 6007 + {t}::bigint * 15485863) % {size}) FROM generate_series(1, 50) g); COMMIT"
            )
        };
        cluster.psql(DB, &sql).expect("stream changes");
    }
    reset_peak(child.id());
    // Every target gets the same records; wait until the counts settle.
    let mut last = Vec::new();
    let mut settled = Instant::now();
    loop {
        let now: Vec<usize> = receivers.iter().map(Receiver::accepted_count).collect();
        if now != last {
            last = now;
            settled = Instant::now();
        } else if settled.elapsed() > Duration::from_secs(3) {
            break;
        }
        assert_running(&mut child, &log);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let stream_rss = steward_devkit::peak_rss_kib(child.id());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle_rss = steward_devkit::rss_kib(child.id());
    let sent: Vec<String> = receivers
        .iter()
        .zip(&before)
        .map(|(r, b)| (r.accepted_count() - b).to_string())
        .collect();
    stop(child);
    println!(
        "| {size} + {size} | {:.1} s | {:.1} MiB | {:.2} s | {:.1} MiB | {:.1} MiB | {:.1} MiB | {} |",
        snapshot.as_secs_f64(),
        snapshot_rss as f64 / 1024.0,
        startup.as_secs_f64(),
        startup_rss as f64 / 1024.0,
        stream_rss as f64 / 1024.0,
        idle_rss as f64 / 1024.0,
        sent.join(" / ")
    );
    let _ = cluster.psql(DB, &format!("SELECT pg_drop_replication_slot('{slot}')"));
    let _ = cluster.psql(
        DB,
        &format!("DELETE FROM product_template WHERE default_code LIKE 'N-{size}-%'"),
    );
}

/// Starts counting the peak RSS from now (`/proc/PID/clear_refs`).
fn reset_peak(pid: u32) {
    let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
}

fn wait_logged(child: &mut Child, log: &Path, line: &str) {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        assert_running(child, log);
        assert!(Instant::now() < deadline, "steward did not start");
        if std::fs::read_to_string(log).is_ok_and(|s| s.contains(line)) {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
