//! End-to-end benchmark: steward draining real WAL into a local HTTP target,
//! next to `pg_recvlogical` draining the same WAL to /dev/null (the server's
//! decoding limit).
//!
//! `cargo bench --bench e2e` (all workloads), or `cargo bench --bench e2e -- W2`.
//! `STEWARD_BENCH_ROWS` overrides the 200,000 rows per workload;
//! `STEWARD_BENCH_WRAPPER` runs steward under a wrapper command (valgrind);
//! `STEWARD_BENCH_STATE` and `STEWARD_BENCH_TARGET` add lines to the
//! `[state]` section and to each target (`"max_in_flight = 4"`).
//! `--target http|postgres|nats|file` picks the target type (default http):
//! postgres writes into a fresh database of the same cluster (create_tables),
//! nats into a JetStream stream of a nats-server started here, file into a
//! temporary NDJSON file.
//! `cargo bench --bench e2e -- SCALE` measures W2 into 1, 3 and 10 HTTP
//! targets, then with 1, 100,000 and 1,000,000 changes per transaction.
//!
//! For each workload a fresh database gets two slots (steward's and
//! pg_recvlogical's) before the WAL is produced, so both drain exactly the
//! same backlog from a standing start.

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use steward_devkit::cluster::{DevCluster, DevClusterOptions};
use steward_devkit::receiver::Receiver;

// Shared with the snapshot and governed-state benches; this one only spawns.
#[allow(dead_code)]
#[path = "support/steward.rs"]
mod daemon;

struct Workload {
    name: &'static str,
    about: &'static str,
    /// SQL for one transaction of `n` rows starting at row `start`.
    txn: fn(start: u64, n: u64) -> String,
    /// Events steward delivers per row written.
    master_share: f64,
    /// The product id written last by the transaction `txn(start, n)`.
    last_product: fn(start: u64, n: u64) -> u64,
}

const WORKLOADS: &[Workload] = &[
    Workload {
        name: "W1",
        about: "product inserts",
        txn: |start, n| {
            format!(
                "INSERT INTO product_template (id, categ_id, uom_id, uom_po_id, detailed_type, type, default_code, name, list_price, active, tracking, purchase_line_warn, sale_line_warn) \
                 SELECT 100000 + g, 1, 1, 1, 'product', 'product', 'B-' || g, jsonb_build_object('en_US', 'Bench product ' || g), g * 1.25, true, 'none', 'no-message', 'no-message' \
                 FROM generate_series({start}, {end}) g",
                end = start + n - 1
            )
        },
        master_share: 1.0,
        last_product: |start, n| 100000 + start + n - 1,
    },
    Workload {
        name: "W2",
        about: "two-column product updates",
        txn: |start, n| {
            format!(
                "UPDATE product_template SET list_price = list_price + 1, write_date = now() WHERE id BETWEEN 100000 + {start} AND 100000 + {end}",
                end = start + n - 1
            )
        },
        master_share: 1.0,
        last_product: |start, n| 100000 + start + n - 1,
    },
    Workload {
        name: "W3",
        about: "half product updates, half stock moves",
        txn: |start, n| {
            let half = n / 2;
            format!(
                "UPDATE product_template SET list_price = list_price + 1 WHERE id BETWEEN 100000 + {start} AND 100000 + {end}; \
                 INSERT INTO stock_move (product_id, product_qty, state, date) SELECT 1, g, 'done', now() FROM generate_series(1, {half}) g",
                end = start + half - 1
            )
        },
        master_share: 0.5,
        last_product: |start, n| 100000 + start + n / 2 - 1,
    },
];

const ROWS_PER_TXN: u64 = 1000;

#[derive(Clone, Copy, PartialEq, Eq)]
enum TargetType {
    Http,
    Postgres,
    Nats,
    File,
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut target = TargetType::Http;
    let mut filter: Vec<String> = Vec::new();
    let mut i = 0;
    while i < args.len() {
        if args[i] == "--target" {
            target = match args.get(i + 1).map(String::as_str) {
                Some("http") => TargetType::Http,
                Some("postgres") => TargetType::Postgres,
                Some("nats") => TargetType::Nats,
                Some("file") => TargetType::File,
                other => panic!("--target {other:?}: use http, postgres, nats or file"),
            };
            i += 2;
            continue;
        }
        if !args[i].starts_with("--") {
            filter.push(args[i].clone());
        }
        i += 1;
    }
    let rows: u64 = std::env::var("STEWARD_BENCH_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000);
    let cluster = DevCluster::start(DevClusterOptions::default()).expect("start PostgreSQL");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    println!(
        "steward end-to-end benchmark: {rows} rows per workload, {ROWS_PER_TXN} rows per transaction, target {}, PostgreSQL {}, {} cores",
        match target {
            TargetType::Http => "http",
            TargetType::Postgres => "postgres",
            TargetType::Nats => "nats",
            TargetType::File => "file",
        },
        cluster.server_version_num(),
        std::thread::available_parallelism().map(std::num::NonZero::get).unwrap_or(1)
    );
    println!("| workload | events | steward events/s | pg_recvlogical rows/s | ratio | steward peak RSS | idle RSS |");
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    for w in WORKLOADS {
        if !filter.is_empty() && !filter.iter().any(|f| f == w.name) {
            continue;
        }
        let m = runtime.block_on(run_workload(&cluster, w, rows, target, DEFAULT_SHAPE));
        println!("| {} ({}) | {}", w.name, w.about, m.cells());
    }
    // Not part of the default run: it takes several minutes.
    if filter.iter().any(|f| f == "SCALE") {
        runtime.block_on(run_scale(&cluster, rows));
    }
    if filter.is_empty() || filter.iter().any(|f| f == "LATENCY") {
        runtime.block_on(run_latency(&cluster));
    }
}

/// Commit → ack latency at a fixed 2,000 events/s: 20 transactions of 100
/// product updates per second for `STEWARD_BENCH_LATENCY_SECS` (default 20)
/// into a local HTTP receiver. Latency is the receiver's arrival time minus
/// the event's commit time (the same machine's clock).
async fn run_latency(cluster: &DevCluster) {
    const TXNS_PER_SEC: u64 = 20;
    const ROWS_PER_TXN_LATENCY: u64 = 100;
    let secs: u64 = std::env::var("STEWARD_BENCH_LATENCY_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let db = "bench_latency";
    cluster.create_database(db).expect("create database");
    cluster.load_odoo_fixture(db).expect("fixture");
    cluster
        .psql(db, &(WORKLOADS[0].txn)(0, ROWS_PER_TXN_LATENCY))
        .expect("rows to update");
    let receiver = Receiver::start().await.expect("receiver");
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("steward.toml");
    std::fs::write(
        &config,
        format!(
            r#"[source]
url = "{url}"
slot = "steward_latency"
publication = "steward_latency"
[state]
path = "{state}"
# Off: another steward on the machine may hold the default port.
[metrics]
listen = ""
[entities.product]
table = "product_template"
fields = {{ sku = "default_code", name = "name.en_US", price = "list_price", uom_id = "uom_id", active = "active" }}
[targets.bench]
type = "http"
url = "{target}"
entities = ["product"]
initial = "none"
"#,
            url = cluster.url(db),
            state = dir.path().join("steward.redb").display(),
            target = receiver.url()
        ),
    )
    .expect("config");
    let mut child =
        steward_devkit::TerminateOnDrop(daemon::spawn(&config, &dir.path().join("steward.log")));
    loop {
        let out = cluster
            .psql(db, "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming' AND application_name = 'steward'")
            .unwrap_or_default();
        if out.trim() == "1" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let probe = LatencyProbe::start(cluster, db);
    let (client, connection) = tokio_postgres::connect(&cluster.url(db), tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(connection);
    let mut tick = tokio::time::interval(Duration::from_millis(1000 / TXNS_PER_SEC));
    let total = secs * TXNS_PER_SEC * ROWS_PER_TXN_LATENCY;
    for _ in 0..secs * TXNS_PER_SEC {
        tick.tick().await;
        client
            .batch_execute(&format!(
                "UPDATE product_template SET list_price = list_price + 1 WHERE id BETWEEN 100000 AND {}",
                100_000 + ROWS_PER_TXN_LATENCY - 1
            ))
            .await
            .expect("update");
    }
    let delivered = receiver
        .wait_for_events(total as usize, Duration::from_secs(120))
        .await;
    steward_devkit::terminate(&mut child.0);
    let source = probe.stop();
    let mut latencies: Vec<f64> = Vec::with_capacity(delivered);
    // The slowest event of each source transaction (by commit time, in
    // microseconds): the p99 of 40,000 events is about the fourth slowest of
    // 400 transactions, so the tail is a handful of transactions worth
    // seeing one by one, and comparing with PostgreSQL's own.
    let mut per_txn: HashMap<i64, f64> = HashMap::new();
    for request in receiver
        .requests()
        .iter()
        .filter(|r| (200..300).contains(&r.status))
    {
        let arrival = chrono::DateTime::<chrono::Utc>::from(request.wall);
        let Ok(events) = serde_json::from_slice::<Vec<serde_json::Value>>(&request.body) else {
            continue;
        };
        for event in events {
            if let Some(time) = event["time"]
                .as_str()
                .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
            {
                let ms = ms_between(arrival, time.with_timezone(&chrono::Utc));
                latencies.push(ms);
                let slowest = per_txn.entry(time.timestamp_micros()).or_insert(ms);
                *slowest = slowest.max(ms);
            }
        }
    }
    latencies.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
            .copied()
            .unwrap_or(f64::NAN)
    };
    println!();
    println!(
        "commit → ack latency at {} events/s for {secs} s: {} events, p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        TXNS_PER_SEC * ROWS_PER_TXN_LATENCY,
        latencies.len(),
        pct(0.50),
        pct(0.99),
        latencies.last().copied().unwrap_or(f64::NAN)
    );
    let mut slowest: Vec<f64> = per_txn.values().copied().collect();
    slowest.sort_by(|a, b| b.total_cmp(a));
    println!(
        "slowest of {} transactions: {} ms",
        slowest.len(),
        listed(&slowest)
    );
    // What PostgreSQL itself takes from COMMIT to a decoded transaction on
    // a client (WAL flush, walsender wake-up, decoding), and what steward
    // adds to it: the same transaction's arrival at the receiver minus its
    // arrival at pg_recvlogical, both decoding the same WAL at the same time.
    let mut own: Vec<f64> = source.values().copied().collect();
    own.sort_by(|a, b| b.total_cmp(a));
    let mut added: Vec<f64> = per_txn
        .iter()
        .filter_map(|(commit, ms)| Some(ms - source.get(commit)?))
        .collect();
    added.sort_by(|a, b| b.total_cmp(a));
    println!(
        "PostgreSQL alone (pg_recvlogical, test_decoding, {} transactions): {}",
        own.len(),
        distribution(&own)
    );
    println!(
        "steward's part (its arrival minus pg_recvlogical's, {} transactions): {}",
        added.len(),
        distribution(&added)
    );
    let _ = cluster.psql("postgres", &format!("DROP DATABASE {db} WITH (FORCE)"));
}

/// Milliseconds from `earlier` to `later`.
fn ms_between(later: chrono::DateTime<chrono::Utc>, earlier: chrono::DateTime<chrono::Utc>) -> f64 {
    (later - earlier).num_microseconds().unwrap_or(0) as f64 / 1000.0
}

/// p50, p99 and the largest values of `sorted` (largest first), in ms.
fn distribution(sorted: &[f64]) -> String {
    // The value that a share `p` of the values stays within.
    let at = |p: f64| {
        sorted
            .get((sorted.len() as f64 * (1.0 - p)) as usize)
            .copied()
            .unwrap_or(f64::NAN)
    };
    format!(
        "p50 {:.1} ms, p99 {:.1} ms; largest {} ms",
        at(0.50),
        at(0.99),
        listed(sorted)
    )
}

/// The eight largest of `sorted` (largest first), for a line of output.
fn listed(sorted: &[f64]) -> String {
    sorted
        .iter()
        .take(8)
        .map(|ms| format!("{ms:.1}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `pg_recvlogical` with test_decoding on a slot of its own, timing each
/// COMMIT line's arrival against the commit time it carries: PostgreSQL's
/// own commit → decoded latency on the same WAL as steward's.
struct LatencyProbe {
    child: std::process::Child,
    reader: std::thread::JoinHandle<HashMap<i64, f64>>,
}

impl LatencyProbe {
    fn start(cluster: &DevCluster, db: &str) -> LatencyProbe {
        cluster
            .psql(
                db,
                "SELECT pg_create_logical_replication_slot('latency_probe', 'test_decoding')",
            )
            .expect("probe slot");
        let mut child = Command::new(cluster.bin_dir().join("pg_recvlogical"))
            .args(["-d", &cluster.url(db), "--slot", "latency_probe", "--start"])
            .args(["-o", "include-timestamp=1", "-o", "skip-empty-xacts=1"])
            .args(["-f", "-"])
            .stdout(Stdio::piped())
            .spawn()
            .expect("run pg_recvlogical");
        let stdout = child.stdout.take().expect("piped");
        let reader = std::thread::spawn(move || {
            use std::io::BufRead;
            let mut arrivals = HashMap::new();
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let now = chrono::Utc::now();
                // "COMMIT 742 (at 2026-12-05 06:10:00.123456+00)"
                let Some(at) = line
                    .strip_prefix("COMMIT ")
                    .and_then(|l| l.split_once("(at "))
                    .and_then(|(_, t)| t.strip_suffix(')'))
                    .and_then(|t| {
                        chrono::DateTime::parse_from_str(t, "%Y-%m-%d %H:%M:%S%.f%#z").ok()
                    })
                else {
                    continue;
                };
                let ms = ms_between(now, at.with_timezone(&chrono::Utc));
                arrivals.insert(at.timestamp_micros(), ms);
            }
            arrivals
        });
        LatencyProbe { child, reader }
    }

    /// Stops pg_recvlogical; the latency of each transaction it received,
    /// by commit time in microseconds.
    fn stop(mut self) -> HashMap<i64, f64> {
        steward_devkit::terminate(&mut self.child);
        self.reader.join().expect("probe reader")
    }
}

/// How a workload's WAL is shaped: changes per transaction, and how many
/// targets (each its own HTTP receiver) take every event.
#[derive(Clone, Copy)]
struct Shape {
    rows_per_txn: u64,
    targets: usize,
}

const DEFAULT_SHAPE: Shape = Shape {
    rows_per_txn: ROWS_PER_TXN,
    targets: 1,
};

/// The SCALE phase: W2 against the number of targets, then against the
/// transaction size, each as one row of a table.
async fn run_scale(cluster: &DevCluster, rows: u64) {
    println!();
    println!("| targets | changes per transaction | events per target | steward events/s per target | pg_recvlogical rows/s | ratio | steward peak RSS | idle RSS |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- |");
    let w2 = &WORKLOADS[1];
    // (targets, changes per transaction, rows). One change per transaction
    // means a commit, with its WAL flush, per row: a tenth of the rows.
    let shapes = [
        (1, ROWS_PER_TXN, rows),
        (3, ROWS_PER_TXN, rows),
        (10, ROWS_PER_TXN, rows),
        (1, 1, rows / 10),
        (1, 10_000, rows),
        (1, 100_000, rows.max(100_000)),
        (1, 1_000_000, 1_000_000),
    ];
    // e.g. STEWARD_BENCH_SHAPES="10x1000 1x100000" (targets x changes per
    // transaction) runs only those.
    let only = std::env::var("STEWARD_BENCH_SHAPES").unwrap_or_default();
    for (targets, rows_per_txn, rows) in shapes {
        let name = format!("{targets}x{rows_per_txn}");
        if !only.is_empty() && !only.split_whitespace().any(|s| s == name) {
            continue;
        }
        let shape = Shape {
            rows_per_txn,
            targets,
        };
        let m = run_workload(cluster, w2, rows, TargetType::Http, shape).await;
        println!("| {targets} | {rows_per_txn} | {}", m.cells());
    }
}

/// One run's figures: events delivered per target, their rate, the rate at
/// which pg_recvlogical decoded the same WAL, and steward's peak RSS.
struct Measured {
    events: usize,
    steward_rate: f64,
    recv_rate: f64,
    ratio: f64,
    peak_rss_mib: f64,
    /// Resident memory `STEWARD_BENCH_IDLE_SECS` (default 5) after the
    /// last event arrived, with nothing more to do.
    idle_rss_mib: f64,
}

impl Measured {
    /// The figures as the last cells of a Markdown table row.
    fn cells(&self) -> String {
        format!(
            "{} | {:.0} | {:.0} | {:.2} | {:.1} MiB | {:.1} MiB |",
            self.events,
            self.steward_rate,
            self.recv_rate,
            self.ratio,
            self.peak_rss_mib,
            self.idle_rss_mib
        )
    }
}

async fn run_workload(
    cluster: &DevCluster,
    w: &Workload,
    rows: u64,
    target: TargetType,
    shape: Shape,
) -> Measured {
    assert!(
        shape.targets == 1 || target == TargetType::Http,
        "several targets are measured with HTTP receivers only"
    );
    let db = format!("bench_{}", w.name.to_lowercase());
    cluster.create_database(&db).expect("create database");
    cluster.load_odoo_fixture(&db).expect("fixture");
    if w.name != "W1" {
        // Updates need rows to update: insert them before the slots exist.
        for start in (0..rows).step_by(ROWS_PER_TXN as usize * 10) {
            cluster
                .psql(&db, &(WORKLOADS[0].txn)(start, ROWS_PER_TXN * 10))
                .expect("preload");
        }
    }
    cluster
        .psql(
            &db,
            "CREATE PUBLICATION steward_bench FOR TABLE product_template, res_partner, uom_uom; \
             SELECT pg_create_logical_replication_slot('steward_bench', 'pgoutput'); \
             SELECT pg_create_logical_replication_slot('recvlogical_bench', 'pgoutput');",
        )
        .expect("slots");
    // Up to 10,000 rows' worth of transactions per psql call.
    let txns_per_call = (10_000 / shape.rows_per_txn).max(1);
    let starts: Vec<u64> = (0..rows).step_by(shape.rows_per_txn as usize).collect();
    for call in starts.chunks(txns_per_call as usize) {
        let script: String = call
            .iter()
            .map(|&start| {
                let n = shape.rows_per_txn.min(rows - start);
                format!("BEGIN; {}; COMMIT;\n", (w.txn)(start, n))
            })
            .collect();
        cluster.psql(&db, &script).expect("workload");
    }
    let end_lsn = cluster
        .psql(&db, "SELECT pg_current_wal_lsn()")
        .expect("lsn");
    let end_lsn = end_lsn
        .lines()
        .map(str::trim)
        .find(|l| l.contains('/'))
        .expect("an LSN")
        .to_string();
    let expected = (rows as f64 * w.master_share) as usize;
    let last_product = starts
        .last()
        .map(|&start| (w.last_product)(start, shape.rows_per_txn.min(rows - start)))
        .expect("at least one transaction");

    // pg_recvlogical: the same WAL, decoded by the same plugin, written to /dev/null.
    let started = Instant::now();
    let status = Command::new(cluster.bin_dir().join("pg_recvlogical"))
        .args([
            "-d",
            &cluster.url(&db),
            "--slot",
            "recvlogical_bench",
            "--start",
            "--no-loop",
        ])
        .args([
            "-o",
            "proto_version=1",
            "-o",
            "publication_names=steward_bench",
        ])
        .args(["--endpos", &end_lsn, "-f", "/dev/null"])
        .stdout(Stdio::null())
        .status()
        .expect("run pg_recvlogical");
    assert!(status.success(), "pg_recvlogical failed");
    let recvlogical = started.elapsed();

    // steward: as a separate process, so its peak RSS is its own.
    let mut receivers = Vec::new();
    for _ in 0..shape.targets {
        receivers.push(Receiver::start_counting().await.expect("receiver"));
    }
    let receiver = &receivers[0];
    let dir = tempfile::tempdir().expect("tempdir");
    let target_db = format!("{db}_target");
    let mut nats: Option<std::process::Child> = None;
    let target_section = match target {
        TargetType::Http => format!("type = \"http\"\nurl = \"{}\"", receiver.url()),
        TargetType::Postgres => {
            let _ = cluster.psql("postgres", &format!("DROP DATABASE IF EXISTS {target_db}"));
            cluster
                .create_database(&target_db)
                .expect("target database");
            format!(
                "type = \"postgres\"\nurl = \"{}\"\ncreate_tables = true",
                cluster.url(&target_db)
            )
        }
        TargetType::Nats => {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("free port")
                .port();
            let child = Command::new("/usr/sbin/nats-server")
                .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
                .arg(dir.path().join("nats"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start /usr/sbin/nats-server");
            nats = Some(child);
            while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            format!(
                "type = \"nats\"\nurl = \"nats://127.0.0.1:{port}\"\nstream = \"STEWARD\"\ncreate_stream = true"
            )
        }
        TargetType::File => format!(
            "type = \"file\"\npath = \"{}\"\nmax_bytes = 1073741824",
            dir.path().join("events.ndjson").display()
        ),
    };
    let config = dir.path().join("steward.toml");
    std::fs::write(
        &config,
        format!(
            r#"[source]
url = "{url}"
slot = "steward_bench"
publication = "steward_bench"
create_publication = false
[state]
path = "{state}"
{state_extra}
# Off: another steward on the machine (another bench, a test) may hold the
# default port, and steward would exit at once.
[metrics]
listen = ""
[entities.product]
table = "product_template"
fields = {{ sku = "default_code", name = "name.en_US", price = "list_price", uom_id = "uom_id", active = "active" }}
{targets}"#,
            url = cluster.url(&db),
            state = dir.path().join("steward.redb").display(),
            // e.g. STEWARD_BENCH_STATE="commit_max_events = 5000" to try a setting.
            state_extra = std::env::var("STEWARD_BENCH_STATE").unwrap_or_default(),
            targets = (0..shape.targets)
                .map(|i| {
                    let section = match target {
                        TargetType::Http => {
                            format!("type = \"http\"\nurl = \"{}\"", receivers[i].url())
                        }
                        _ => target_section.clone(),
                    };
                    // The WAL is what is measured: no initial snapshot.
                    format!(
                        "[targets.bench{}]\n{section}\nentities = [\"product\"]\nbatch_max_events = 1000\ninitial = \"none\"\n{}\n",
                        if i == 0 { String::new() } else { i.to_string() },
                        // e.g. STEWARD_BENCH_TARGET="max_in_flight = 2" to try a setting.
                        std::env::var("STEWARD_BENCH_TARGET").unwrap_or_default()
                    )
                })
                .collect::<String>(),
        ),
    )
    .expect("config");
    let started = Instant::now();
    let mut child =
        steward_devkit::TerminateOnDrop(daemon::spawn(&config, &dir.path().join("steward.log")));
    let deadline = Instant::now() + Duration::from_secs(600);
    // A steward that exits (e.g. a port another process holds) fails the run
    // at once, with its log, instead of after the deadline.
    let log = dir.path().join("steward.log");
    let mut check_alive = || {
        if let Ok(Some(status)) = child.0.try_wait() {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(20).collect();
            panic!(
                "steward exited ({status}) before delivering everything; its log ends:\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
    };
    // When the last event was seen, where the probe itself takes a while.
    let mut arrived_at: Option<Instant> = None;
    let delivered = match target {
        TargetType::Http => loop {
            let mut n = usize::MAX;
            for r in &receivers {
                n = n.min(
                    r.wait_for_events(expected, Duration::from_millis(250))
                        .await,
                );
            }
            if n >= expected || Instant::now() >= deadline {
                break n;
            }
            check_alive();
        },
        TargetType::Postgres => {
            // The last transaction's last product arriving ends the wait;
            // the rows are then counted until all are there (with several
            // batches in flight, earlier ones may still be committing). One
            // connection probing the key index: a psql process counting the
            // whole table every 100 ms took CPU from steward and the target.
            let (client, conn) =
                tokio_postgres::connect(&cluster.url(&target_db), tokio_postgres::NoTls)
                    .await
                    .expect("connect to the target database");
            tokio::spawn(conn);
            let key = last_product.to_string();
            let mut n = 0;
            while n < expected && Instant::now() < deadline {
                check_alive();
                tokio::time::sleep(Duration::from_millis(10)).await;
                let arrived = client
                    .query_opt("SELECT 1 FROM public.product WHERE _key = $1", &[&key])
                    .await
                    .is_ok_and(|row| row.is_some());
                if arrived {
                    n = client
                        .query_one("SELECT count(*) FROM public.product", &[])
                        .await
                        .map(|row| row.get::<_, i64>(0) as usize)
                        .unwrap_or(0);
                    arrived_at = Some(Instant::now());
                }
            }
            n
        }
        TargetType::Nats => {
            let url = target_section
                .lines()
                .find_map(|l| l.strip_prefix("url = "))
                .map(|u| u.trim_matches('"').to_string())
                .expect("url");
            let client = async_nats::connect(url).await.expect("nats");
            let js = async_nats::jetstream::new(client);
            let mut n = 0;
            while n < expected && Instant::now() < deadline {
                check_alive();
                tokio::time::sleep(Duration::from_millis(100)).await;
                if let Ok(mut stream) = js.get_stream("STEWARD").await {
                    if let Ok(info) = stream.info().await {
                        n = info.state.messages as usize;
                    }
                }
            }
            n
        }
        TargetType::File => {
            // Only the bytes added since the last look are read: reading the
            // whole file each time took a core from steward by the end of
            // the run, and the short interval keeps the end time close.
            use std::io::Read;
            let path = dir.path().join("events.ndjson");
            let mut file = None;
            let mut buf = vec![0u8; 1 << 20];
            let mut n = 0;
            while n < expected && Instant::now() < deadline {
                check_alive();
                tokio::time::sleep(Duration::from_millis(10)).await;
                if file.is_none() {
                    file = std::fs::File::open(&path).ok();
                }
                if let Some(f) = file.as_mut() {
                    while let Ok(read @ 1..) = f.read(&mut buf) {
                        n += buf[..read].iter().filter(|&&c| c == b'\n').count();
                    }
                }
            }
            n
        }
    };
    let elapsed = arrived_at.unwrap_or_else(Instant::now) - started;
    let peak_rss = steward_devkit::peak_rss_kib(child.0.id());
    let idle_secs: u64 = std::env::var("STEWARD_BENCH_IDLE_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    tokio::time::sleep(Duration::from_secs(idle_secs)).await;
    let idle_rss = steward_devkit::rss_kib(child.0.id());
    steward_devkit::terminate(&mut child.0);
    assert!(
        delivered >= expected,
        "steward delivered {delivered} of {expected} events; see {}",
        dir.path().display()
    );

    let measured = Measured {
        events: expected,
        steward_rate: expected as f64 / elapsed.as_secs_f64(),
        recv_rate: expected as f64 / recvlogical.as_secs_f64(),
        ratio: recvlogical.as_secs_f64() / elapsed.as_secs_f64(),
        peak_rss_mib: peak_rss as f64 / 1024.0,
        idle_rss_mib: idle_rss as f64 / 1024.0,
    };
    if let Some(mut nats) = nats {
        let _ = nats.kill();
        let _ = nats.wait();
    }
    let _ = cluster.psql("postgres", &format!("DROP DATABASE {db} WITH (FORCE)"));
    let _ = cluster.psql(
        "postgres",
        &format!("DROP DATABASE IF EXISTS {target_db} WITH (FORCE)"),
    );
    if std::env::var_os("STEWARD_BENCH_KEEP").is_some() {
        // The state file and steward.log, for looking into a slow run.
        eprintln!("kept {}", dir.keep().display());
    }
    measured
}
