//! Operations: metrics and health endpoints, heartbeat, SIGHUP reload,
//! SIGTERM drain, least-privilege role, secrets kept out of logs, and the
//! systemd notify protocol — against a real PostgreSQL, with the steward
//! binary run as a child process where signals or the environment matter.

use crate::support;

use std::os::unix::net::UnixDatagram;
use std::process::Command;
use std::time::{Duration, Instant};

use steward_devkit::receiver::{Behaviour, Receiver};
use steward_store::Store;
use support::{free_port, wait_until, Steward, TestDb};

const WAIT: Duration = Duration::from_secs(30);

async fn get(url: &str) -> Option<(u16, String)> {
    steward_postgres::install_default_provider();
    let response = reqwest::get(url).await.ok()?;
    let status = response.status().as_u16();
    Some((status, response.text().await.ok()?))
}

/// The value of the sample `name{labels}` (labels as written, e.g. `target="wms"`; "" for none).
fn sample(page: &str, name: &str, labels: &str) -> Option<f64> {
    page.lines().find_map(|line| {
        let rest = line.strip_prefix(name)?;
        let (lbl, value) = match rest.strip_prefix('{') {
            Some(r) => {
                let (l, v) = r.split_once("} ")?;
                (l, v)
            }
            None => ("", rest.strip_prefix(' ')?),
        };
        let matches = if labels.is_empty() {
            lbl.is_empty()
        } else {
            lbl.contains(labels)
        };
        if matches {
            value.trim().parse().ok()
        } else {
            None
        }
    })
}

async fn scrape(port: u16) -> String {
    get(&format!("http://127.0.0.1:{port}/metrics"))
        .await
        .map(|(_, body)| body)
        .unwrap_or_default()
}

/// Polls the metrics page until `check` holds.
async fn wait_metric(port: u16, what: &str, mut check: impl FnMut(&str) -> bool) -> String {
    let start = Instant::now();
    loop {
        let page = scrape(port).await;
        if check(&page) {
            return page;
        }
        if start.elapsed() > WAIT {
            panic!("timed out waiting for {what}; last page:\n{page}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Polls `/readyz` until it answers `status`; returns the body.
async fn wait_readyz(port: u16, status: u16, steward: &Steward) -> String {
    let start = Instant::now();
    loop {
        if let Some((s, body)) = get(&format!("http://127.0.0.1:{port}/readyz")).await {
            if s == status {
                return body;
            }
        }
        assert!(
            start.elapsed() < WAIT,
            "/readyz never answered {status}; log:\n{}",
            steward.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Prometheus naming as scraped: `_total` is exactly the counters' suffix.
fn assert_counter_names(page: &str) {
    let mut seen = 0;
    for line in page.lines() {
        let Some(rest) = line.strip_prefix("# TYPE steward_") else {
            continue;
        };
        let (name, kind) = rest.split_once(' ').expect("# TYPE name kind");
        assert_eq!(
            kind == "counter",
            name.ends_with("_total"),
            "steward_{name} is a {kind}"
        );
        seen += 1;
    }
    assert!(seen >= 10, "too few metrics on the page:\n{page}");
}

/// After a clean stop: the slot confirmed at least what the store holds
/// (it may confirm more: WAL steward knows holds nothing for it).
fn assert_slot_confirmed_the_durable_position(db: &TestDb) {
    let checkpoint = Store::open(&db.state_path())
        .expect("the store is released")
        .checkpoint()
        .expect("checkpoint")
        .expect("a checkpoint");
    let confirmed = db.confirmed_flush().expect("slot");
    assert!(
        confirmed >= checkpoint.0,
        "confirmed {confirmed} < durable {}",
        checkpoint.0
    );
}

fn update_product_price(db: &TestDb, id: i64, price: &str) {
    db.sql(&format!(
        "UPDATE product_template SET list_price = {price} WHERE id = {id}"
    ));
}

fn some_product(db: &TestDb) -> i64 {
    db.sql("SELECT min(id) FROM product_template")
        .trim()
        .parse()
        .expect("a product id")
}

/// `n` distinct product ids.
fn products(db: &TestDb, n: usize) -> Vec<i64> {
    let ids: Vec<i64> = db
        .sql(&format!(
            "SELECT id FROM product_template ORDER BY id LIMIT {n}"
        ))
        .lines()
        .map(|l| l.trim().parse().expect("a product id"))
        .collect();
    assert_eq!(ids.len(), n, "the fixture has too few products");
    ids
}

/// Product events the receiver accepted for `id`, as their `price` text.
fn prices_of(wms: &Receiver, id: i64) -> Vec<String> {
    wms.accepted_events()
        .iter()
        .filter(|e| e["entity"] == "product" && e["subject"] == id.to_string().as_str())
        .map(|e| e["data"]["price"].to_string())
        .collect()
}

/// A rule no fixture product breaks: a price above 100,000 is quarantined.
const PRICE_CAP_RULE: &str = "[[entities.product.rules]]\nname = \"price_cap\"\n\
    range = { field = \"price\", max = 100000 }\nmessage = \"no product costs that much\"\n\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_health_and_readiness_follow_a_target_outage() {
    let db = TestDb::new("ops_metrics");
    let wms = Receiver::start().await.unwrap();
    let port = free_port();
    let text = db
        .config_text(&[("wms", &wms.url(), &["product"])])
        .replace("[state]", "heartbeat_interval_ms = 200\n\n[state]");
    let text = TestDb::with_metrics(&text, port, "ready_max_target_stall_ms = 1000\n");
    let config = db.write_config(&text);
    let steward = Steward::start(&config, &db.dir.path().join("steward.log"), &[]);

    // Alive at once; ready once the source is connected.
    let start = Instant::now();
    loop {
        if let Some((200, body)) = get(&format!("http://127.0.0.1:{port}/healthz")).await {
            assert_eq!(body.trim(), "ok");
            break;
        }
        assert!(
            start.elapsed() < WAIT,
            "/healthz never answered; log:\n{}",
            steward.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let start = Instant::now();
    while get(&format!("http://127.0.0.1:{port}/readyz"))
        .await
        .map(|r| r.0)
        != Some(200)
    {
        assert!(
            start.elapsed() < WAIT,
            "/readyz never became 200; log:\n{}",
            steward.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The slot lag comes from the monitor's own SQL connection, which may
    // still be connecting when the replication stream is already ready.
    let page = wait_metric(port, "the slot lag gauge", |p| {
        p.contains("# HELP steward_source_lag_bytes")
    })
    .await;
    assert_eq!(
        sample(
            &page,
            "steward_build_info",
            &format!("version=\"{}\"", env!("CARGO_PKG_VERSION"))
        ),
        Some(1.0),
        "{page}"
    );

    // The heartbeat moves the slot on a quiet database: no table changes at all.
    let before = db.confirmed_flush().expect("slot");
    wait_until("the heartbeat advances the slot", WAIT, || {
        db.confirmed_flush().is_some_and(|c| c > before)
    })
    .await;
    // Other tests' databases share this cluster's WAL, so the slot moving is
    // not proof on its own: a probe slot decoding only this database must
    // see steward's heartbeat messages.
    db.sql("SELECT pg_create_logical_replication_slot('ops_metrics_probe', 'test_decoding')");
    wait_until("a heartbeat message in this database's WAL", WAIT, || {
        db.sql(
            "SELECT count(*) FROM pg_logical_slot_peek_changes('ops_metrics_probe', NULL, NULL) \
             WHERE data LIKE 'message:%prefix: steward_heartbeat%'",
        )
        .trim()
            != "0"
    })
    .await;
    db.sql("SELECT pg_drop_replication_slot('ops_metrics_probe')");

    // A delivered change counts, with a latency sample.
    let id = some_product(&db);
    update_product_price(&db, id, "10.00");
    assert_eq!(wms.wait_for_events(1, WAIT).await, 1);
    wait_metric(port, "delivered counter and latency histogram", |p| {
        sample(p, "steward_events_delivered_total", "target=\"wms\"").is_some_and(|v| v >= 1.0)
            && sample(
                p,
                "steward_delivery_latency_seconds_count",
                "target=\"wms\"",
            )
            .is_some_and(|v| v >= 1.0)
            && sample(p, "steward_events_received_total", "entity=\"product\"")
                .is_some_and(|v| v >= 1.0)
    })
    .await;
    let page = scrape(port).await;
    assert!(
        page.contains("steward_delivery_latency_seconds_bucket{target=\"wms\",le=\"0.005\"}"),
        "explicit buckets expected:\n{page}"
    );

    // The target goes down: backlog grows, readiness fails naming it.
    wms.set_behaviour(Behaviour::Fail(503));
    for price in ["11.00", "12.00", "13.00"] {
        update_product_price(&db, id, price);
    }
    wait_metric(
        port,
        "backlog 3 and retries while the target is down",
        |p| {
            sample(p, "steward_target_backlog_events", "target=\"wms\"") == Some(3.0)
                && sample(p, "steward_delivery_failures_total", "target=\"wms\"")
                    .is_some_and(|v| v >= 1.0)
                && sample(p, "steward_delivery_retries_total", "target=\"wms\"")
                    .is_some_and(|v| v >= 1.0)
        },
    )
    .await;
    let start = Instant::now();
    loop {
        let (status, body) = get(&format!("http://127.0.0.1:{port}/readyz"))
            .await
            .unwrap_or((0, String::new()));
        if status == 503 {
            assert!(body.contains("target wms"), "{body}");
            break;
        }
        assert!(
            start.elapsed() < WAIT,
            "/readyz stayed {status} with a stalled target"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let page = scrape(port).await;
    assert!(
        sample(
            &page,
            "steward_target_oldest_undelivered_seconds",
            "target=\"wms\""
        )
        .is_some_and(|v| v > 0.0),
        "{page}"
    );
    // The outbox lives in the state file.
    assert!(
        sample(&page, "steward_store_bytes", "").is_some_and(|v| v > 0.0),
        "{page}"
    );

    // The target comes back: everything is delivered, backlog 0, ready again.
    wms.set_behaviour(Behaviour::Ok);
    assert!(wms.wait_for_events(4, WAIT).await >= 4);
    wait_metric(port, "backlog and oldest undelivered back to 0", |p| {
        sample(p, "steward_target_backlog_events", "target=\"wms\"") == Some(0.0)
            && sample(
                p,
                "steward_target_oldest_undelivered_seconds",
                "target=\"wms\"",
            ) == Some(0.0)
            && sample(p, "steward_events_delivered_total", "target=\"wms\"")
                .is_some_and(|v| v >= 4.0)
    })
    .await;
    let start = Instant::now();
    while get(&format!("http://127.0.0.1:{port}/readyz"))
        .await
        .map(|r| r.0)
        != Some(200)
    {
        assert!(start.elapsed() < WAIT, "/readyz did not recover");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let page = scrape(port).await;
    assert_eq!(
        sample(&page, "steward_slot_wal_status", "status=\"reserved\""),
        Some(1.0),
        "{page}"
    );
    assert_eq!(
        sample(&page, "steward_source_lag_seconds", ""),
        Some(0.0),
        "{page}"
    );
    assert_counter_names(&page);
    assert!(
        page.contains("# TYPE steward_throttled_seconds_total counter"),
        "{page}"
    );
    let (status, logs) = steward.terminate().await;
    assert!(status.success(), "exit {status}; log:\n{logs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lag_rises_while_steward_is_behind_and_returns_to_zero_once_caught_up() {
    // Steward falls behind for real: its state file's disk is full, so a
    // received change cannot be made durable and the slot's confirmed
    // position stays behind it for longer than the monitor's 5 s poll. No
    // heartbeat: after the change nothing else arrives, so only the commit's
    // own completion can mark the source caught up. Needs root (mount).
    const BEHIND_BYTES: f64 = 4.0 * 1024.0 * 1024.0;
    const SMALL_BYTES: f64 = 1024.0 * 1024.0;
    let db = TestDb::new("ops_lag");
    let Some(disk) = support::SmallDisk::mount(db.dir.path().join("state")) else {
        println!("skipped: cannot mount a tmpfs here (needs root)");
        return;
    };
    let wms = Receiver::start().await.unwrap();
    let port = free_port();
    let text = db
        .config_text(&[("wms", &wms.url(), &["product"])])
        .replace(
            &db.state_path().display().to_string(),
            &disk.path.join("steward.redb").display().to_string(),
        );
    let config = db.write_config(&TestDb::with_metrics(&text, port, ""));
    let steward = Steward::start(&config, &db.dir.path().join("steward.log"), &[]);
    steward.wait_log("replication started", 1).await;
    wait_metric(port, "both lag gauges at rest", |p| {
        sample(p, "steward_source_lag_seconds", "") == Some(0.0)
            && sample(p, "steward_source_lag_bytes", "").is_some_and(|v| v < SMALL_BYTES)
    })
    .await;

    // With the disk full: product changes until the store refuses one, then
    // ~8 MiB of WAL steward has no use for.
    disk.fill();
    let id = some_product(&db);
    const LAST: usize = 199;
    for i in 1..=LAST {
        db.sql(&format!(
            "UPDATE product_template SET list_price = {i}.5, \
             description = to_jsonb(repeat('x', 4000)) WHERE id = {id}"
        ));
    }
    steward.wait_log("cannot write to the state file", 1).await;
    db.sql(
        "CREATE TABLE ops_lag_filler AS \
         SELECT g, repeat('x', 200) AS pad FROM generate_series(1, 40000) g",
    );
    let page = wait_metric(port, "lag in seconds and bytes while behind", |p| {
        sample(p, "steward_source_lag_seconds", "").is_some_and(|v| v >= 1.0)
            && sample(p, "steward_source_lag_bytes", "").is_some_and(|v| v >= BEHIND_BYTES)
    })
    .await;
    let last_price = |wms: &Receiver| {
        wms.accepted_events()
            .iter()
            .any(|e| e["data"]["price"].as_f64() == Some(LAST as f64 + 0.5))
    };
    assert!(
        !last_price(&wms),
        "the last change was delivered, so steward was not behind:\n{page}"
    );

    // Space returns, the commit lands: delivered, and both gauges fall back.
    disk.free();
    wait_until("the last change delivered", WAIT, || last_price(&wms)).await;
    wait_metric(port, "both lag gauges back at rest", |p| {
        sample(p, "steward_source_lag_seconds", "") == Some(0.0)
            && sample(p, "steward_source_lag_bytes", "").is_some_and(|v| v < SMALL_BYTES)
    })
    .await;
    let (status, logs) = steward.terminate().await;
    assert!(status.success(), "exit {status}; log:\n{logs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filtered_quarantined_and_dead_lettered_events_show_in_metrics() {
    let db = TestDb::new("ops_gov_metrics");
    let wms = Receiver::start().await.unwrap();
    let port = free_port();
    let text = db
        .config_text(&[("wms", &wms.url(), &["product"])])
        .replace(
            "[entities.partner]",
            &format!("{PRICE_CAP_RULE}[entities.partner]"),
        );
    let config = db.write_config(&TestDb::with_metrics(&text, port, ""));
    let log = db.dir.path().join("steward.log");
    let steward = Steward::start(&config, &log, &[]);
    steward.wait_log("replication started", 1).await;
    // Published at start-up, zeros included.
    wait_metric(port, "the quarantine gauge at start-up", |p| {
        sample(p, "steward_quarantined_records", "entity=\"product\"") == Some(0.0)
    })
    .await;
    let ids = products(&db, 3);
    let (bad, rejected, other) = (ids[0], ids[1], ids[2]);

    // No target takes partners: received, and filtered.
    db.sql("UPDATE res_partner SET name = name || ' (moved)' WHERE id = (SELECT min(id) FROM res_partner)");
    wait_metric(port, "a filtered partner", |p| {
        sample(p, "steward_events_filtered_total", "entity=\"partner\"").is_some_and(|v| v >= 1.0)
    })
    .await;

    // A record failing a rule: quarantined, counted, not delivered.
    update_product_price(&db, bad, "500000.00");
    update_product_price(&db, other, "1.00");
    assert_eq!(wms.wait_for_events(1, WAIT).await, 1);
    wait_metric(port, "one quarantined product", |p| {
        sample(p, "steward_quarantined_records", "entity=\"product\"") == Some(1.0)
            && sample(p, "steward_events_filtered_total", "entity=\"product\"")
                .is_some_and(|v| v >= 1.0)
    })
    .await;
    assert!(
        prices_of(&wms, bad).is_empty(),
        "{:?}",
        wms.accepted_events()
    );

    // A restart reads the quarantine back: the gauge shows it before any change.
    let (status, logs) = steward.terminate().await;
    assert!(status.success(), "exit {status}; log:\n{logs}");
    let steward = Steward::start(&config, &log, &[]);
    steward.wait_log("replication started", 1).await;
    wait_metric(port, "the quarantine read back at start-up", |p| {
        sample(p, "steward_quarantined_records", "entity=\"product\"") == Some(1.0)
    })
    .await;

    // The fix releases it: delivered, and the gauge is back to 0.
    update_product_price(&db, bad, "50.00");
    wait_until("the fixed product is delivered", WAIT, || {
        !prices_of(&wms, bad).is_empty()
    })
    .await;
    assert_eq!(prices_of(&wms, bad), ["50.00"]);
    wait_metric(port, "the quarantine empty again", |p| {
        sample(p, "steward_quarantined_records", "entity=\"product\"") == Some(0.0)
    })
    .await;

    // A target refusing one record's content (422): dead-lettered, counted;
    // every other record keeps flowing.
    wms.set_behaviour(Behaviour::FailKey {
        key: rejected.to_string(),
        status: 422,
    });
    update_product_price(&db, rejected, "7.00");
    update_product_price(&db, other, "2.00");
    wait_metric(port, "one dead letter", |p| {
        sample(p, "steward_dead_letters_total", "target=\"wms\"") == Some(1.0)
            && sample(p, "steward_dead_letter_events", "target=\"wms\"") == Some(1.0)
    })
    .await;
    wait_until("the other product keeps flowing", WAIT, || {
        prices_of(&wms, other).contains(&"2.00".to_string())
    })
    .await;
    assert!(prices_of(&wms, rejected).is_empty());
    let (status, logs) = steward.terminate().await;
    assert!(status.success(), "exit {status}; log:\n{logs}");
}

/// A TCP proxy in front of PostgreSQL that the test cuts and restores: the
/// database host going away, for as long as the test wants.
struct Proxy {
    port: u16,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Proxy {
    async fn start() -> Proxy {
        let mut proxy = Proxy {
            port: free_port(),
            task: None,
        };
        proxy.restore().await;
        proxy
    }

    /// Closes the listener and every connection through it.
    async fn cut(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
    }

    async fn restore(&mut self) {
        let upstream = support::cluster().port();
        let start = Instant::now();
        let listener = loop {
            match tokio::net::TcpListener::bind(("127.0.0.1", self.port)).await {
                Ok(l) => break l,
                Err(e) if start.elapsed() < WAIT => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("cannot listen on {} again: {e}", self.port),
            }
        };
        self.task = Some(tokio::spawn(async move {
            // Dropped with the task on `cut`: every connection closes with it.
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((mut client, _)) = listener.accept().await {
                connections.spawn(async move {
                    if let Ok(mut server) =
                        tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await
                    {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
            }
        }));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_names_the_source_while_postgres_is_unreachable() {
    let db = TestDb::new("ops_ready_source");
    let wms = Receiver::start().await.unwrap();
    let mut proxy = Proxy::start().await;
    let port = free_port();
    let text = db
        .config_text(&[("wms", &wms.url(), &["product"])])
        .replace(
            &format!("@127.0.0.1:{}/", support::cluster().port()),
            &format!("@127.0.0.1:{}/", proxy.port),
        );
    let config = db.write_config(&TestDb::with_metrics(&text, port, ""));
    let steward = Steward::start(&config, &db.dir.path().join("steward.log"), &[]);
    wait_readyz(port, 200, &steward).await;

    proxy.cut().await;
    let body = wait_readyz(port, 503, &steward).await;
    assert!(body.contains("source: not connected ("), "{body}");
    assert!(!body.contains("store:"), "{body}");
    let page = scrape(port).await;
    assert_eq!(
        sample(&page, "steward_source_connected", ""),
        Some(0.0),
        "{page}"
    );
    // Odoo goes on meanwhile; the change waits in the slot.
    let id = some_product(&db);
    update_product_price(&db, id, "31.00");

    proxy.restore().await;
    wait_readyz(port, 200, &steward).await;
    assert_eq!(wms.wait_for_events(1, WAIT).await, 1);
    assert_eq!(prices_of(&wms, id), ["31.00"]);
    let (status, logs) = steward.terminate().await;
    assert!(status.success(), "exit {status}; log:\n{logs}");
}

/// The first event `receiver` accepted whose `data.price` is `price`,
/// waiting for it.
async fn priced(receiver: &Receiver, price: &str) -> serde_json::Value {
    let wanted: f64 = price.parse().expect("a price");
    let find = || {
        receiver
            .accepted_events()
            .into_iter()
            .find(|e| e["data"]["price"].as_f64() == Some(wanted))
    };
    wait_until(&format!("an event priced {price}"), WAIT, || {
        find().is_some()
    })
    .await;
    find().expect("found above")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_applies_a_valid_config_and_rejects_an_invalid_one() {
    let db = TestDb::new("ops_sighup");
    let wms = Receiver::start().await.unwrap();
    let mes = Receiver::start().await.unwrap();
    let text = db.config_text(&[("wms", &wms.url(), &["product"])]);
    let config = db.write_config(&text);
    let steward = Steward::start(&config, &db.dir.path().join("steward.log"), &[]);
    steward.wait_log("replication started", 1).await;

    let id = some_product(&db);
    update_product_price(&db, id, "20.00");
    assert_eq!(wms.wait_for_events(1, WAIT).await, 1);
    assert!(wms.accepted_events()[0]["data"].get("sku").is_some());

    // New mapping (sku is now called code) and a new target.
    let reloaded = db
        .config_text(&[
            ("wms", &wms.url(), &["product"]),
            ("mes", &mes.url(), &["product"]),
        ])
        .replace("sku = \"default_code\"", "code = \"default_code\"");
    std::fs::write(&config, &reloaded).unwrap();
    steward.signal(nix::sys::signal::Signal::SIGHUP);
    steward.wait_log("configuration reloaded", 1).await;
    steward.wait_log("replication started", 2).await;

    // Delivery is at least once: a batch whose acknowledgement was not yet
    // recorded when the reload restarted the targets comes again, so the
    // events are told apart by their price, not by their position.
    update_product_price(&db, id, "21.00");
    let after = priced(&wms, "21.00").await;
    let before = priced(&wms, "20.00").await;
    assert_eq!(after["data"]["code"], before["data"]["sku"]);
    assert!(
        after["data"].get("sku").is_none(),
        "old mapping after reload: {after}"
    );
    priced(&mes, "21.00").await;

    // An invalid file is refused and the running configuration keeps working.
    std::fs::write(
        &config,
        reloaded.replace("type = \"http\"", "type = \"ftp\""),
    )
    .unwrap();
    steward.signal(nix::sys::signal::Signal::SIGHUP);
    steward
        .wait_log("the new configuration is invalid", 1)
        .await;
    let logs = steward.logs();
    assert!(
        logs.contains("targets.wms.type"),
        "the problem is named:\n{logs}"
    );
    update_product_price(&db, id, "22.00");
    assert!(priced(&wms, "22.00").await["data"].get("code").is_some());
    priced(&mes, "22.00").await;

    let (status, logs) = steward.terminate().await;
    assert!(status.success(), "exit {status}; log:\n{logs}");
    assert_eq!(logs.matches("configuration reloaded").count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_adds_an_entity_and_a_rule_while_changes_keep_coming_then_sigint_drains() {
    let db = TestDb::new("ops_sighup_gov");
    let wms = Receiver::start().await.unwrap();
    let workcenter = "[entities.workcenter]\ntable = \"mrp_workcenter\"\n\
        fields = { code = \"code\", name = \"name\", costs_hour = \"costs_hour\", active = \"active\" }\n";
    let full = db.config_text(&[("wms", &wms.url(), &["product"])]);
    assert!(full.contains(workcenter), "{full}");
    // Before: no workcenter entity (not even in the publication), no rules.
    let config = db.write_config(&full.replace(workcenter, ""));
    // After: the entity, sent to wms with a snapshot of what exists, and a
    // validation rule on products.
    let reloaded = db
        .config_text(&[("wms", &wms.url(), &["product", "workcenter"])])
        .replace("initial = \"none\"", "initial = \"snapshot\"")
        .replace(
            "[entities.partner]",
            &format!("{PRICE_CAP_RULE}[entities.partner]"),
        );
    let steward = Steward::start(&config, &db.dir.path().join("steward.log"), &[]);
    steward.wait_log("replication started", 1).await;
    let ids = products(&db, 3);
    let (busy, capped, marker) = (ids[0], ids[1], ids[2]);
    // Without the rule, an expensive product is delivered.
    update_product_price(&db, capped, "400000.00");
    wait_until("the expensive product before the rule", WAIT, || {
        prices_of(&wms, capped) == ["400000.00"]
    })
    .await;

    // Odoo keeps writing products and work centers while the reload happens.
    let n = 120;
    let written = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let writer = {
        let (name, written) = (db.name.clone(), written.clone());
        std::thread::spawn(move || {
            for i in 0..n {
                support::cluster()
                    .psql(
                        &name,
                        &format!(
                            "UPDATE product_template SET list_price = {}.00 WHERE id = {busy}; \
                             UPDATE mrp_workcenter SET costs_hour = {i}.5 \
                             WHERE id = (SELECT id FROM mrp_workcenter ORDER BY id \
                             OFFSET {i} % (SELECT count(*) FROM mrp_workcenter) LIMIT 1)",
                            100 + i
                        ),
                    )
                    .expect("update");
                written.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        })
    };
    wait_until("the writer is under way", WAIT, || {
        written.load(std::sync::atomic::Ordering::Relaxed) >= 20
    })
    .await;
    std::fs::write(&config, &reloaded).unwrap();
    steward.signal(nix::sys::signal::Signal::SIGHUP);
    steward.wait_log("configuration reloaded", 1).await;
    steward.wait_log("replication started", 2).await;
    assert!(
        written.load(std::sync::atomic::Ordering::Relaxed) < n,
        "the writer finished before the reload; nothing was in flight"
    );
    wait_until("the writer finishes", Duration::from_secs(60), || {
        writer.is_finished()
    })
    .await;
    writer.join().expect("writer");

    // Nothing missing: every product price written across the reload...
    let last = format!("{}.00", 100 + n - 1);
    wait_until("the last product price", WAIT, || {
        prices_of(&wms, busy).contains(&last)
    })
    .await;
    let delivered: std::collections::BTreeSet<String> = prices_of(&wms, busy).into_iter().collect();
    let missing: Vec<String> = (0..n)
        .map(|i| format!("{}.00", 100 + i))
        .filter(|p| !delivered.contains(p))
        .collect();
    assert!(
        missing.is_empty(),
        "prices lost across the reload: {missing:?}"
    );
    // ...and every work center as the database has it now (snapshot + stream).
    let want: std::collections::BTreeMap<String, f64> = db
        .sql("SELECT id, costs_hour FROM mrp_workcenter")
        .lines()
        .filter_map(|l| {
            let (id, cost) = l.split_once('|')?;
            Some((id.to_string(), cost.parse().ok()?))
        })
        .collect();
    assert!(!want.is_empty());
    let got = || -> std::collections::BTreeMap<String, f64> {
        support::final_state(&wms.accepted_events())
            .into_iter()
            .filter(|((entity, _), _)| entity == "workcenter")
            .map(|((_, key), data)| (key, data["costs_hour"].as_f64().unwrap_or(f64::NAN)))
            .collect()
    };
    wait_until("every work center delivered as it is now", WAIT, || {
        got() == want
    })
    .await;

    // The new rule applies: the same kind of price is now quarantined.
    update_product_price(&db, capped, "500000.00");
    update_product_price(&db, marker, "3.00");
    wait_until("the marker after the capped product", WAIT, || {
        prices_of(&wms, marker) == ["3.00"]
    })
    .await;
    assert_eq!(
        prices_of(&wms, capped),
        ["400000.00"],
        "the rule did not apply"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_steward"))
        .args(["quarantine", "list", "--json", "-c"])
        .arg(&config)
        .output()
        .expect("steward quarantine list");
    let list: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
    let entries = list["quarantine"].as_array().expect("a list");
    assert_eq!(entries.len(), 1, "{list}");
    assert_eq!(entries[0]["key"], capped.to_string().as_str(), "{list}");
    assert_eq!(entries[0]["rule"], "price_cap", "{list}");

    // SIGINT (Ctrl-C in a terminal) drains like SIGTERM: exit 0, position confirmed.
    steward.signal(nix::sys::signal::Signal::SIGINT);
    let (status, logs) = steward.wait_exit().await;
    assert!(status.success(), "exit {status}; log:\n{logs}");
    assert!(logs.contains("SIGINT received"), "{logs}");
    assert!(logs.contains("durable position confirmed"), "{logs}");
    assert_slot_confirmed_the_durable_position(&db);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_are_one_object_per_line() {
    let db = TestDb::new("ops_json_logs");
    let wms = Receiver::start().await.unwrap();
    let config = db.write_config(&db.config_text(&[("wms", &wms.url(), &["product"])]));
    let steward = Steward::start_with(
        &["--log-format", "json"],
        &config,
        &db.dir.path().join("steward.log"),
        &[],
    );
    steward.wait_log("replication started", 1).await;
    update_product_price(&db, some_product(&db), "41.00");
    assert_eq!(wms.wait_for_events(1, WAIT).await, 1);
    let (status, logs) = steward.terminate().await;
    assert!(status.success(), "exit {status}; log:\n{logs}");
    let mut messages = Vec::new();
    for line in logs.lines() {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON object ({e}): {line}"));
        for field in ["timestamp", "level", "target", "message"] {
            assert!(v[field].is_string(), "no {field} in {line}");
        }
        chrono::DateTime::parse_from_rfc3339(v["timestamp"].as_str().unwrap())
            .unwrap_or_else(|e| panic!("timestamp ({e}): {line}"));
        messages.push(v["message"].as_str().unwrap().to_string());
    }
    // Structured fields stay fields: the slot of "replication started".
    let started = logs
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|v| v["message"] == "replication started")
        .expect("a replication started line");
    assert_eq!(
        started["slot"],
        format!("steward_{}", db.name).as_str(),
        "{started}"
    );
    assert!(
        messages.iter().any(|m| m.contains("SIGTERM received")),
        "{messages:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_journald_log_lines_carry_no_timestamp() {
    let db = TestDb::new("ops_journald_logs");
    let wms = Receiver::start().await.unwrap();
    let config = db.write_config(&db.config_text(&[("wms", &wms.url(), &["product"])]));
    let log = db.dir.path().join("steward.log");
    // systemd sets JOURNAL_STREAM (device:inode of the journal socket) for a
    // service whose stderr goes to the journal, which stamps every line itself.
    let steward = Steward::start(&config, &log, &[("JOURNAL_STREAM", "8:123456")]);
    steward.wait_log("replication started", 1).await;
    let (status, logs) = steward.terminate().await;
    assert!(status.success(), "exit {status}; log:\n{logs}");
    assert!(logs.lines().count() >= 3, "{logs}");
    for line in logs.lines() {
        assert!(
            ["TRACE", "DEBUG", " INFO", " WARN", "ERROR"]
                .iter()
                .any(|level| line.starts_with(level)),
            "a line not starting with its level (a timestamp?): {line:?}"
        );
        assert!(
            !line.contains('\u{1b}'),
            "colour codes in the journal: {line:?}"
        );
    }

    // Outside systemd the same run stamps its lines.
    let steward = Steward::start(&config, &log, &[]);
    steward.wait_log("replication started", 1).await;
    let (status, logs) = steward.terminate().await;
    assert!(status.success(), "exit {status}; log:\n{logs}");
    let year = chrono::Utc::now().format("%Y-").to_string();
    assert!(
        logs.lines().all(|l| l.starts_with(&year)),
        "timestamps (and no colour codes in a file) expected outside journald:\n{logs}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_confirms_the_durable_position_and_loses_nothing() {
    let db = TestDb::new("ops_sigterm");
    let wms = Receiver::start().await.unwrap();
    let text = db.config_text(&[("wms", &wms.url(), &["product"])]);
    let config = db.write_config(&text);
    let steward = Steward::start(&config, &db.dir.path().join("steward.log"), &[]);
    steward.wait_log("replication started", 1).await;

    // A burst still in flight when SIGTERM arrives.
    let id = some_product(&db);
    let n = 200;
    for i in 0..n {
        update_product_price(&db, id, &format!("{}.00", 100 + i));
    }
    let (status, logs) = steward.terminate().await;
    assert!(status.success(), "exit {status}; log:\n{logs}");
    assert!(logs.contains("durable position confirmed"), "{logs}");

    assert_slot_confirmed_the_durable_position(&db);

    // Nothing lost: a restart delivers the rest, the last price included.
    let steward = Steward::start(&config, &db.dir.path().join("steward2.log"), &[]);
    // The first run may have delivered everything already: still let this one
    // get going (signal handlers installed) before it is told to stop.
    steward.wait_log("replication started", 1).await;
    let last = format!("{}.00", 100 + n - 1);
    let start = Instant::now();
    while !wms.accepted_events().iter().any(|e| {
        let price = e["data"]["price"].to_string();
        price == last
    }) {
        assert!(start.elapsed() < WAIT, "the last change never arrived");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let prices: std::collections::BTreeSet<String> = wms
        .accepted_events()
        .iter()
        .map(|e| e["data"]["price"].to_string())
        .collect();
    let missing: Vec<String> = (0..n)
        .map(|i| format!("{}.00", 100 + i))
        .filter(|p| !prices.contains(p))
        .collect();
    assert!(
        missing.is_empty() && prices.len() == n,
        "every change delivered at least once; missing {missing:?}; got {prices:?}"
    );
    let (status, _) = steward.terminate().await;
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_timeout_exits_1_when_draining_hangs() {
    let db = TestDb::new("ops_timeout");
    let wms = Receiver::start().await.unwrap();
    let text = db
        .config_text(&[("wms", &wms.url(), &["product"])])
        .replace("[state]", "[daemon]\nshutdown_timeout_ms = 300\n\n[state]");
    let config = db.write_config(&text);
    let steward = Steward::start(&config, &db.dir.path().join("steward.log"), &[]);
    steward.wait_log("replication started", 1).await;
    // Stop the server's walsender from answering: the final status update
    // and stream close cannot complete while PostgreSQL is paused.
    let pid: i32 = db
        .sql(&format!(
            "SELECT active_pid FROM pg_replication_slots WHERE slot_name = 'steward_{}'",
            db.name
        ))
        .trim()
        .parse()
        .expect("walsender pid");
    let walsender = nix::unistd::Pid::from_raw(pid);
    nix::sys::signal::kill(walsender, nix::sys::signal::Signal::SIGSTOP).expect("SIGSTOP");
    let started = Instant::now();
    let (status, logs) = steward.terminate().await;
    nix::sys::signal::kill(walsender, nix::sys::signal::Signal::SIGCONT).expect("SIGCONT");
    assert_eq!(status.code(), Some(1), "log:\n{logs}");
    assert!(logs.contains("shutdown_timeout_ms"), "{logs}");
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_least_privilege_role_from_setup_sql_works_and_missing_grants_fail_clearly() {
    let db = TestDb::new("ops_leastpriv");
    let role = format!("lp_{}", db.name);
    let wms = Receiver::start().await.unwrap();
    let text = db
        .config_text(&[("wms", &wms.url(), &["product", "partner"])])
        .replace("postgres://postgres@", &format!("postgres://{role}@"))
        .replace(
            "[source]\n",
            "[source]\ncreate_publication = false\nheartbeat_interval_ms = 200\n",
        );
    let path = db.write_config(&text);
    let output = Command::new(env!("CARGO_BIN_EXE_steward"))
        .args(["setup-sql", "-c"])
        .arg(&path)
        .output()
        .expect("run setup-sql");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let script = String::from_utf8(output.stdout).expect("utf-8");
    assert!(
        script.contains(&format!("CREATE ROLE \"{role}\" LOGIN REPLICATION;")),
        "{script}"
    );
    assert!(!script.contains("SUPERUSER"));
    db.sql(&script);
    let attrs = db.sql(&format!(
        "SELECT rolsuper, rolreplication FROM pg_roles WHERE rolname = '{role}'"
    ));
    assert_eq!(attrs.trim(), "f|t");

    // The daemon runs as that role: publication owned by the administrator.
    let config = steward_sinks::config::load(&path).unwrap();
    let daemon = support::InProcess::start(config.clone());
    let id = some_product(&db);
    let start = Instant::now();
    loop {
        update_product_price(&db, id, "30.00");
        if wms.wait_for_events(1, Duration::from_millis(500)).await >= 1 {
            break;
        }
        assert!(
            start.elapsed() < WAIT,
            "nothing delivered with the least-privilege role"
        );
        assert!(!daemon.is_finished(), "the daemon stopped");
    }
    // The heartbeat works for this role too: the slot advances with no table change.
    let before = db.confirmed_flush().expect("slot");
    wait_until("the heartbeat advances the slot", WAIT, || {
        db.confirmed_flush().is_some_and(|c| c > before)
    })
    .await;
    daemon.stop().await.expect("clean stop");

    // Without SELECT on a configured table: refused, naming the GRANT.
    db.sql(&format!(
        "REVOKE SELECT ON product_template FROM \"{role}\""
    ));
    let (_tx, rx) = tokio::sync::watch::channel(false);
    let err = steward::daemon::run(config.clone(), rx)
        .await
        .expect_err("must refuse");
    let msg = format!("{err:#}");
    assert!(
        msg.contains(&format!(
            "GRANT SELECT ON TABLE \"public\".\"product_template\" TO \"{role}\""
        )),
        "{msg}"
    );
    db.sql(&format!("GRANT SELECT ON product_template TO \"{role}\""));

    // Without REPLICATION: refused, naming the ALTER ROLE.
    db.sql(&format!("ALTER ROLE \"{role}\" NOREPLICATION"));
    let (_tx, rx) = tokio::sync::watch::channel(false);
    let err = steward::daemon::run(config, rx)
        .await
        .expect_err("must refuse");
    let msg = format!("{err:#}");
    assert!(
        msg.contains(&format!("ALTER ROLE \"{role}\" REPLICATION")),
        "{msg}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_never_reach_the_logs_even_at_debug_level() {
    let db = TestDb::new("ops_secrets");
    let role = format!("sec_{}", db.name);
    let password = "pw-Hunter2-9f3c1a";
    let token = "tok-Sesame-77e0b2";
    db.sql(&format!(
        "CREATE ROLE \"{role}\" LOGIN REPLICATION SUPERUSER PASSWORD '{password}'"
    ));
    support::cluster()
        .set_hba(&[
            &format!("host all {role} 127.0.0.1/32 scram-sha-256"),
            &format!("host replication {role} 127.0.0.1/32 scram-sha-256"),
        ])
        .expect("require a password for the test role");
    std::fs::write(db.dir.path().join("pgpass"), format!("{password}\n")).unwrap();
    std::fs::write(db.dir.path().join("token"), format!("Bearer {token}\n")).unwrap();

    let wms = Receiver::start().await.unwrap();
    let text = db
        .config_text(&[("wms", &wms.url(), &["product"])])
        .replace("postgres://postgres@", &format!("postgres://{role}@"))
        .replace("[source]\n", "[source]\npassword_file = \"pgpass\"\n")
        + "headers = { \"Authorization\" = { file = \"token\" } }\n";
    let config = db.write_config(&text);
    let log = db.dir.path().join("steward.log");
    let steward = Steward::start(&config, &log, &[("STEWARD_LOG", "debug")]);
    steward.wait_log("replication started", 1).await;
    let id = some_product(&db);
    update_product_price(&db, id, "40.00");
    assert_eq!(wms.wait_for_events(1, WAIT).await, 1);
    // The secrets were used: the password to log in (scram), the token on the wire.
    let request = &wms.requests()[0];
    assert!(request
        .headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("authorization") && v == &format!("Bearer {token}")));
    let (status, logs) = steward.terminate().await;
    assert!(status.success(), "{logs}");
    assert!(logs.lines().count() > 10, "debug logs expected:\n{logs}");
    for secret in [password, token] {
        assert!(!logs.contains(secret), "a secret is in the logs:\n{logs}");
    }

    // A wrong password fails with a message that does not hold it either.
    std::fs::write(db.dir.path().join("pgpass"), "wrong-Pw-31337\n").unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_steward"))
        .args(["run", "-c"])
        .arg(&config)
        .env("STEWARD_LOG", "debug")
        .output()
        .expect("run");
    assert!(!output.status.success());
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(all.contains("password"), "the failure is explained:\n{all}");
    assert!(
        !all.contains("wrong-Pw-31337") && !all.contains(token),
        "{all}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_hears_ready_watchdog_pings_and_stopping() {
    let db = TestDb::new("ops_notify");
    let wms = Receiver::start().await.unwrap();
    let config = db.write_config(&db.config_text(&[("wms", &wms.url(), &["product"])]));
    let socket_path = db.dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).expect("bind the notify socket");
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let steward = Steward::start(
        &config,
        &db.dir.path().join("steward.log"),
        &[
            ("NOTIFY_SOCKET", socket_path.to_str().unwrap()),
            ("WATCHDOG_USEC", "2000000"),
        ],
    );
    let recv_until = |want: &str| -> Vec<String> {
        let start = Instant::now();
        let mut seen = Vec::new();
        let mut buf = [0u8; 512];
        while start.elapsed() < WAIT {
            if let Ok(n) = socket.recv(&mut buf) {
                let msg = String::from_utf8_lossy(&buf[..n]).to_string();
                let done = msg.lines().any(|l| l == want);
                seen.push(msg);
                if done {
                    return seen;
                }
            }
        }
        panic!("no {want} within {WAIT:?}; got {seen:?}");
    };
    let before_ready = recv_until("READY=1");
    assert!(
        before_ready.iter().all(|m| !m.contains("STOPPING")),
        "{before_ready:?}"
    );
    // Ready means set up: the slot exists and the store is open.
    assert!(
        db.confirmed_flush().is_some(),
        "READY=1 before the slot exists"
    );
    recv_until("WATCHDOG=1");
    recv_until("WATCHDOG=1");
    steward.signal(nix::sys::signal::Signal::SIGTERM);
    recv_until("STOPPING=1");
    let (status, logs) = steward.wait_exit().await;
    assert!(status.success(), "{logs}");
}

#[test]
fn password_file_may_name_the_systemd_credentials_directory() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("pgpass"), "s3cret\n").unwrap();
    let text = "[source]\nurl = \"postgres://steward@db/odoo\"\n\
                password_file = \"${CREDENTIALS_DIRECTORY}/pgpass\"\n\
                [state]\npath = \"s.redb\"\n\
                [entities.product]\ntable = \"product_template\"\nfields = { name = \"name\" }\n\
                [targets.t]\ntype = \"http\"\nurl = \"http://localhost:1/x\"\nentities = [\"product\"]\n";
    let path = dir.path().join("steward.toml");
    // Only this test touches CREDENTIALS_DIRECTORY.
    std::env::remove_var("CREDENTIALS_DIRECTORY");
    let errs = steward_sinks::config::parse(text, &path, dir.path()).expect_err("unset");
    assert!(errs.to_string().contains("source.password_file"), "{errs}");
    assert!(errs.to_string().contains("LoadCredential"), "{errs}");
    std::env::set_var("CREDENTIALS_DIRECTORY", dir.path());
    let config = steward_sinks::config::parse(text, &path, dir.path()).expect("valid");
    std::env::remove_var("CREDENTIALS_DIRECTORY");
    let password = config.source.password.expect("a password");
    assert_eq!(password.expose(), "s3cret");
}
