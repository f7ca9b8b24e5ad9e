//! Delivery policy end to end, against a real PostgreSQL and real HTTP
//! receivers: retries, dead letters with per-key hold, `steward dlq` against
//! a running and a stopped daemon, Retry-After, batch windows with
//! `steward flush`, and rate limits.

use crate::support;

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use steward_devkit::receiver::{Behaviour, Receiver};
use support::{wait_until, InProcess, TestDb};

const WAIT: Duration = Duration::from_secs(30);

async fn wait_streaming(db: &TestDb) {
    let slot = format!("steward_{}", db.name);
    wait_until("steward streams from its slot", WAIT, || {
        db.sql(&format!(
            "SELECT s.active FROM pg_replication_slots s JOIN pg_stat_replication r ON r.pid = s.active_pid \
             WHERE s.slot_name = '{slot}' AND r.state = 'streaming'"
        ))
        .lines()
        .any(|l| l.trim() == "t")
    })
    .await;
}

fn insert_product(id: u64, price: &str) -> String {
    format!(
        "INSERT INTO product_template (id, categ_id, uom_id, uom_po_id, detailed_type, type, default_code, name, list_price, active, tracking, purchase_line_warn, sale_line_warn) \
         VALUES ({id}, 1, 1, 1, 'product', 'product', 'P{id}', '{{\"en_US\": \"Product {id}\"}}', {price}, true, 'none', 'no-message', 'no-message');"
    )
}

fn set_price(id: u64, price: u64) -> String {
    format!("UPDATE product_template SET list_price = {price} WHERE id = {id};")
}

/// One target `wms` receiving products, with `extra` lines in its section.
fn config(
    db: &TestDb,
    url: &str,
    extra: &str,
) -> (std::path::PathBuf, steward_core::config::Config) {
    let text = format!("{}{extra}\n", db.config_text(&[("wms", url, &["product"])]));
    let path = db.write_config(&text);
    let config = steward_sinks::config::load(&path).unwrap_or_else(|e| panic!("{e}"));
    (path, config)
}

/// Runs the steward binary; returns stdout, panicking with stderr on failure.
fn steward(args: &[&str], config: &std::path::Path) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_steward"))
        .args(args)
        .arg("-c")
        .arg(config)
        .env("STEWARD_LOG", "steward=warn")
        .output()
        .expect("run steward");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "steward {args:?} failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn prices_of(events: &[Value], key: &str) -> Vec<String> {
    events
        .iter()
        .filter(|e| e["subject"] == key)
        .map(|e| e["data"]["price"].to_string())
        .collect()
}

/// All writes up to now are durable in steward's store (confirmed to the server).
async fn wait_durable(db: &TestDb) {
    let wal = db.current_wal();
    wait_until("steward confirms every change", WAIT, || {
        db.confirmed_flush().is_some_and(|c| c >= wal)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_failing_500_for_a_while_then_recovering_gets_everything_in_order() {
    let db = TestDb::new("fail_500");
    let wms = Receiver::start().await.unwrap();
    wms.set_behaviour(Behaviour::FailTimes {
        status: 500,
        times: 6,
    });
    let (_, config) = config(&db, &wms.url(), "batch_max_events = 7");
    let daemon = InProcess::start(config);
    wait_streaming(&db).await;

    db.sql(&insert_product(9001, "1"));
    for p in 2..=40 {
        db.sql(&set_price(9001, p));
    }
    assert!(wms.wait_for_events(40, WAIT).await >= 40);
    daemon.stop().await.unwrap();

    let failed = wms.requests().iter().filter(|r| r.status == 500).count();
    assert_eq!(failed, 6, "the first six attempts failed");
    let prices = prices_of(&wms.accepted_events(), "9001");
    let expected: Vec<String> = (1..=40).map(|p| p.to_string()).collect();
    // Retried batches may repeat; in order, nothing lost.
    let mut deduped = prices.clone();
    deduped.dedup();
    assert_eq!(deduped, expected, "{prices:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_daemon_commits_and_sends_each_change_at_once_whatever_the_delays() {
    let db = TestDb::new("at_once");
    let wms = Receiver::start().await.unwrap();
    // Group commit and linger set far beyond the wait below: a change on a
    // quiet stream must not wait for either.
    let text = db
        .config_text(&[("wms", &wms.url(), &["product"])])
        .replace("commit_max_delay_ms = 5\n", "commit_max_delay_ms = 10000\n")
        .replace("batch_linger_ms = 5\n", "batch_linger_ms = 60000\n");
    let path = db.write_config(&text);
    let config = steward_sinks::config::load(&path).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.state.commit_max_delay, Duration::from_secs(10));
    assert_eq!(config.targets[0].batch_linger, Duration::from_secs(60));
    let daemon = InProcess::start(config);
    wait_streaming(&db).await;

    // Real Odoo: the insert and its follow-up update in one transaction.
    let started = Instant::now();
    db.sql(&format!(
        "BEGIN; {} {} COMMIT;",
        insert_product(9101, "1"),
        set_price(9101, 2)
    ));
    assert_eq!(wms.wait_for_events(1, Duration::from_secs(5)).await, 1);
    let first = started.elapsed();
    let started = Instant::now();
    db.sql(&set_price(9101, 3));
    assert_eq!(wms.wait_for_events(2, Duration::from_secs(5)).await, 2);
    let second = started.elapsed();
    daemon.stop().await.unwrap();

    assert_eq!(prices_of(&wms.accepted_events(), "9101"), ["2", "3"]);
    assert_eq!(wms.requests().len(), 2, "one request per transaction");
    for took in [first, second] {
        assert!(took < Duration::from_secs(5), "took {took:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_key_is_dead_lettered_others_flow_and_replay_and_drop_work() {
    let db = TestDb::new("dlq_422");
    let wms = Receiver::start().await.unwrap();
    wms.set_behaviour(Behaviour::FailKey {
        key: "9002".into(),
        status: 422,
    });
    let (path, config) = config(&db, &wms.url(), "");
    let daemon = InProcess::start(config.clone());
    wait_streaming(&db).await;

    db.sql(&format!(
        "BEGIN; {} {} {} COMMIT;",
        insert_product(9001, "1"),
        insert_product(9002, "1"),
        insert_product(9003, "1")
    ));
    db.sql(&set_price(9002, 2)); // held behind the rejected insert
    db.sql(&set_price(9001, 2));
    db.sql(&set_price(9003, 2));
    wait_until("keys 9001 and 9003 delivered", WAIT, || {
        let e = wms.accepted_events();
        prices_of(&e, "9001").len() == 2 && prices_of(&e, "9003").len() == 2
    })
    .await;

    // `dlq list` against the running daemon (control API).
    let mut list = String::new();
    wait_until("two dead letters of key 9002", WAIT, || {
        list = steward(&["dlq", "list", "--target", "wms"], &path);
        list.contains("2 dead letter(s)")
    })
    .await;
    assert!(list.contains("HTTP 422"), "{list}");
    assert!(list.contains("held behind"), "{list}");
    assert!(prices_of(&wms.accepted_events(), "9002").is_empty());
    let show = steward(&["dlq", "show", "--target", "wms", "--id", "1"], &path);
    let shown: Value = serde_json::from_str(&show).unwrap();
    assert_eq!(shown["event"]["key"], "9002");
    assert_eq!(shown["event"]["op"], "upsert");
    assert!(shown["error"].as_str().unwrap().contains("422"), "{show}");
    assert_eq!(shown["attempts"], 1);

    // The receiver is fixed: replay delivers the insert, then the held update.
    wms.set_behaviour(Behaviour::Ok);
    let out = steward(
        &["dlq", "replay", "--target", "wms", "--key", "9002"],
        &path,
    );
    assert!(out.contains("replayed 2"), "{out}");
    wait_until("key 9002 delivered", WAIT, || {
        prices_of(&wms.accepted_events(), "9002").len() == 2
    })
    .await;
    assert_eq!(prices_of(&wms.accepted_events(), "9002"), ["1", "2"]);

    // A later rejection, dropped while the daemon is stopped (store opened directly).
    wms.set_behaviour(Behaviour::FailKey {
        key: "9003".into(),
        status: 400,
    });
    db.sql(&set_price(9003, 3));
    wait_until("one dead letter", WAIT, || {
        steward(&["dlq", "list", "--target", "wms", "--key", "9003"], &path)
            .contains("1 dead letter(s)")
    })
    .await;
    daemon.stop().await.unwrap();
    let status: Value = serde_json::from_str(&steward(&["status", "--json"], &path)).unwrap();
    assert_eq!(status["targets"][0]["dead_letters"], 1, "{status}");
    let out = steward(&["dlq", "drop", "--target", "wms", "--key", "9003"], &path);
    assert!(out.contains("dropped 1"), "{out}");
    let list = steward(&["dlq", "list", "--target", "wms"], &path);
    assert!(list.contains("no dead letters"), "{list}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_2_delays_the_next_attempt_by_2_seconds() {
    let db = TestDb::new("retry_after");
    let wms = Receiver::start().await.unwrap();
    wms.set_behaviour(Behaviour::FailWithRetryAfter {
        status: 429,
        retry_after: "2".into(),
    });
    let (_, config) = config(&db, &wms.url(), "");
    let daemon = InProcess::start(config);
    wait_streaming(&db).await;
    db.sql(&insert_product(9001, "1"));
    wait_until("a first attempt", WAIT, || !wms.requests().is_empty()).await;
    wms.set_behaviour(Behaviour::Ok);
    assert_eq!(wms.wait_for_events(1, WAIT).await, 1);
    daemon.stop().await.unwrap();
    let r = wms.requests();
    assert_eq!(r[0].status, 429);
    let gap = r[1].at - r[0].at;
    assert!(gap >= Duration::from_secs(2), "next attempt after {gap:?}");
    assert!(gap < Duration::from_secs(4), "next attempt after {gap:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_window_coalesces_1000_updates_of_10_keys_into_10_events_on_flush() {
    let db = TestDb::new("window");
    let wms = Receiver::start().await.unwrap();
    let (path, config) = config(&db, &wms.url(), "mode = \"window\"\nevery = \"1d\"");
    let daemon = InProcess::start(config);
    wait_streaming(&db).await;

    let ids: Vec<u64> = (9101..9111).collect();
    let inserts: String = ids.iter().map(|&id| insert_product(id, "0")).collect();
    db.sql(&format!("BEGIN; {inserts} COMMIT;"));
    // 99 transactions updating all 10 keys: 990 updates + 10 inserts.
    let updates: String = (1..100)
        .map(|p| {
            format!("UPDATE product_template SET list_price = {p} WHERE id BETWEEN 9101 AND 9110;")
        })
        .collect();
    db.sql(&updates);
    db.sql("DELETE FROM product_template WHERE id = 9110;");
    wait_durable(&db).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        wms.accepted_count(),
        0,
        "nothing is sent before the window opens"
    );

    let out = steward(&["flush", "--target", "wms"], &path);
    assert!(out.contains("flush"), "{out}");
    assert_eq!(wms.wait_for_events(10, WAIT).await, 10);
    tokio::time::sleep(Duration::from_millis(500)).await;
    daemon.stop().await.unwrap();

    let events = wms.accepted_events();
    assert_eq!(events.len(), 10, "one event per key: {events:#?}");
    assert_eq!(wms.requests().len(), 1, "one delivery");
    for id in &ids[..9] {
        assert_eq!(prices_of(&events, &id.to_string()), ["99"]);
    }
    let last: Vec<&Value> = events.iter().filter(|e| e["subject"] == "9110").collect();
    assert_eq!(last.len(), 1);
    assert_eq!(
        last[0]["op"], "delete",
        "a delete wins when it is the latest"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limit_of_100_events_per_second_holds_within_10_percent() {
    let db = TestDb::alone("rate_limit");
    let wms = Receiver::start().await.unwrap();
    let (_, config) = config(&db, &wms.url(), "rate_limit_events_per_sec = 100");
    let daemon = InProcess::start(config);
    wait_streaming(&db).await;

    let ids: Vec<u64> = (9201..9211).collect();
    let inserts: String = ids.iter().map(|&id| insert_product(id, "0")).collect();
    db.sql(&format!("BEGIN; {inserts} COMMIT;"));
    let updates: String = (1..50)
        .map(|p| {
            format!("UPDATE product_template SET list_price = {p} WHERE id BETWEEN 9201 AND 9210;")
        })
        .collect();
    db.sql(&updates);
    let started = Instant::now();
    assert_eq!(wms.wait_for_events(500, WAIT).await, 500);
    daemon.stop().await.unwrap();

    let log = wms.accepted_log();
    let first = log.first().unwrap().at;
    let last = log.last().unwrap().at;
    let first_batch = log.iter().filter(|e| e.at == first).count();
    // Events after the first request, over the time they took.
    let rate = (log.len() - first_batch) as f64 / (last - first).as_secs_f64();
    eprintln!(
        "rate limit 100/s: measured {rate:.1} events/s over {:.2} s ({} requests, {:.1} s in all)",
        (last - first).as_secs_f64(),
        wms.requests().len(),
        started.elapsed().as_secs_f64()
    );
    assert!(
        (90.0..=110.0).contains(&rate),
        "measured {rate:.1} events/s"
    );
    assert!(
        wms.requests().iter().all(|r| r.status == 204),
        "batches are capped at the burst, so none is refused"
    );
}

/// Config text with two HTTP targets receiving products: `one` and `four`
/// (max_in_flight 1 and 4), each with `extra` lines.
fn two_targets(db: &TestDb, one: &str, four: &str, extra: &str) -> steward_core::config::Config {
    let mut text = db.config_text(&[("one", one, &["product"])]);
    text.push_str(&format!("max_in_flight = 1\n{extra}\n"));
    text.push_str(&format!(
        "\n[targets.four]\ntype = \"http\"\nurl = \"{four}\"\nentities = [\"product\"]\ninitial = \"none\"\n\
         batch_linger_ms = 5\nretry_initial_ms = 50\nretry_max_ms = 500\ntimeout_ms = 5000\nmax_in_flight = 4\n{extra}\n"
    ));
    db.config(&text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_batches_in_flight_against_a_slow_receiver_are_faster_and_keep_key_order() {
    let db = TestDb::alone("in_flight");
    let one = Receiver::start().await.unwrap();
    let four = Receiver::start().await.unwrap();
    for r in [&one, &four] {
        r.set_latency(Duration::from_millis(20));
    }
    let config = two_targets(&db, &one.url(), &four.url(), "batch_max_events = 10");
    let daemon = InProcess::start(config);
    wait_streaming(&db).await;

    // 500 new products in one transaction: 50 full batches of distinct keys.
    let ids: Vec<u64> = (10_001..10_501).collect();
    let inserts: String = ids.iter().map(|&id| insert_product(id, "0")).collect();
    let started = Instant::now();
    db.sql(&format!("BEGIN; {inserts} COMMIT;"));
    assert_eq!(four.wait_for_events(500, WAIT).await, 500);
    assert_eq!(one.wait_for_events(500, WAIT).await, 500);
    // From the commit to the last event, and from the first request's arrival
    // to the last (delivery alone).
    let took = |r: &Receiver| {
        let log = r.accepted_log();
        let last = log.last().unwrap().at;
        (last - started, last - log.first().unwrap().at)
    };
    let ((t1, d1), (t4, d4)) = (took(&one), took(&four));
    // The first batch's events arrived with the first request: not in the span.
    let rate = |t: Duration| 490.0 / t.as_secs_f64();
    eprintln!(
        "500 events in batches of 10, receiver latency 20 ms: max_in_flight 1: {} ms from commit, \
         {:.0} events/s delivering; max_in_flight 4: {} ms from commit, {:.0} events/s delivering; \
         most concurrent requests {} / {}",
        t1.as_millis(),
        rate(d1),
        t4.as_millis(),
        rate(d4),
        one.max_concurrent_requests(),
        four.max_concurrent_requests()
    );
    assert_eq!(one.max_concurrent_requests(), 1);
    assert!(
        four.max_concurrent_requests() >= 2,
        "requests overlapped: {}",
        four.max_concurrent_requests()
    );
    assert!(
        t4.as_secs_f64() * 1.5 < t1.as_secs_f64(),
        "4 in flight ({t4:?}) clearly faster than 1 ({t1:?})"
    );

    // Many updates of few keys: every key's prices arrive in commit order.
    let keys = &ids[..5];
    let updates: String = (1..=40)
        .map(|p| {
            format!(
                "UPDATE product_template SET list_price = {p} WHERE id BETWEEN {} AND {};",
                keys[0], keys[4]
            )
        })
        .collect();
    db.sql(&updates);
    assert_eq!(four.wait_for_events(700, WAIT).await, 700);
    assert_eq!(one.wait_for_events(700, WAIT).await, 700);
    daemon.stop().await.unwrap();
    let expected: Vec<String> = std::iter::once("0".to_string())
        .chain((1..=40).map(|p| p.to_string()))
        .collect();
    for r in [&four, &one] {
        let events = r.accepted_events();
        for id in keys {
            assert_eq!(prices_of(&events, &id.to_string()), expected, "key {id}");
        }
    }
    assert!(four.requests().iter().all(|r| r.status == 204));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_four_in_flight_a_rejected_key_holds_back_only_itself() {
    let db = TestDb::new("in_flight_dlq");
    let wms = Receiver::start().await.unwrap();
    wms.set_latency(Duration::from_millis(20));
    wms.set_behaviour(Behaviour::FailKey {
        key: "9002".into(),
        status: 422,
    });
    let (path, config) = config(&db, &wms.url(), "max_in_flight = 4\nbatch_max_events = 3");
    let daemon = InProcess::start(config);
    wait_streaming(&db).await;

    let ids: Vec<u64> = (9001..9013).collect();
    let inserts: String = ids.iter().map(|&id| insert_product(id, "0")).collect();
    db.sql(&format!("BEGIN; {inserts} COMMIT;"));
    let updates: String = (1..=10)
        .map(|p| {
            format!("UPDATE product_template SET list_price = {p} WHERE id BETWEEN 9001 AND 9012;")
        })
        .collect();
    db.sql(&updates);
    let expected: Vec<String> = (0..=10).map(|p| p.to_string()).collect();
    wait_until("every other key delivered in full", WAIT, || {
        let events = wms.accepted_events();
        ids.iter()
            .filter(|&&id| id != 9002)
            .all(|id| prices_of(&events, &id.to_string()).len() == expected.len())
    })
    .await;
    let mut list = String::new();
    wait_until("key 9002 dead-lettered", WAIT, || {
        list = steward(&["dlq", "list", "--target", "wms"], &path);
        list.contains("11 dead letter(s)")
    })
    .await;
    daemon.stop().await.unwrap();

    let events = wms.accepted_events();
    for id in ids.iter().filter(|&&id| id != 9002) {
        assert_eq!(prices_of(&events, &id.to_string()), expected, "key {id}");
    }
    assert!(prices_of(&events, "9002").is_empty());
    assert!(list.contains("HTTP 422"), "{list}");
    assert!(
        wms.max_concurrent_requests() >= 2,
        "requests overlapped: {}",
        wms.max_concurrent_requests()
    );
}
