//! Large transactions streamed by PostgreSQL before they commit (pgoutput
//! protocol 2, `streaming = on`), against a real PostgreSQL 15.
//!
//! Each test database gets `logical_decoding_work_mem = 64kB` (a per-database
//! setting the walsender picks up), so a few thousand row changes are enough
//! for the server to stream; the other test binaries keep the default.

use crate::support;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use serde_json::Value;
use steward_devkit::receiver::Receiver;
use steward_devkit::DevCluster;
use support::{final_state, wait_until, InProcess, TestDb};

const WAIT: Duration = Duration::from_secs(60);

/// A database whose walsenders stream any transaction over `work_mem` of
/// changes, with `products` extra products (ids 100001, 100002, ...).
fn streaming_db(test: &str, products: u32, work_mem: &str) -> TestDb {
    streaming_db_on(support::cluster(), test, products, work_mem)
}

/// As [`streaming_db`], on the cluster `pg`.
fn streaming_db_on(pg: &'static DevCluster, test: &str, products: u32, work_mem: &str) -> TestDb {
    let db = TestDb::on(pg, test);
    db.sql(&format!(
        "ALTER DATABASE \"{}\" SET logical_decoding_work_mem = '{work_mem}'",
        db.name
    ));
    db.sql(&format!(
        "INSERT INTO product_template (id, categ_id, uom_id, uom_po_id, detailed_type, type, default_code, name, list_price, active, tracking, purchase_line_warn, sale_line_warn) \
         SELECT 100000 + g, 1, 1, 1, 'product', 'product', 'S-' || g, jsonb_build_object('en_US', 'Streamed product ' || g), g, true, 'none', 'no-message', 'no-message' \
         FROM generate_series(1, {products}) g"
    ));
    db
}

async fn wait_streaming(db: &TestDb, slot: &str) {
    let sql = format!(
        "SELECT s.active FROM pg_replication_slots s JOIN pg_stat_replication r ON r.pid = s.active_pid \
         WHERE s.slot_name = '{slot}' AND r.state = 'streaming'"
    );
    wait_until(&format!("steward streams from slot {slot}"), WAIT, || {
        db.sql(&sql).lines().any(|l| l.trim() == "t")
    })
    .await;
}

/// `stream_txns` of the slot: transactions the server streamed to it.
fn streamed_txns(db: &TestDb, slot: &str) -> i64 {
    db.sql(&format!(
        "SELECT stream_txns FROM pg_stat_replication_slots WHERE slot_name = '{slot}'"
    ))
    .lines()
    .find_map(|l| l.trim().parse().ok())
    .unwrap_or(0)
}

fn slot_of(db: &TestDb) -> String {
    format!("steward_{}", db.name)
}

/// The standard test config, `streaming` set, on its own slot and state file.
fn config_for(db: &TestDb, url: &str, streaming: bool, suffix: &str) -> String {
    let slot = slot_of(db);
    db.config_text(&[("wms", url, &["product", "partner"])])
        .replace(
            &format!("slot = \"{slot}\""),
            &format!("slot = \"{slot}{suffix}\"\nstreaming = {streaming}"),
        )
        .replace(
            "steward.redb",
            &format!("steward{}.redb", suffix.replace('_', "-")),
        )
}

fn write_named(db: &TestDb, name: &str, text: &str) -> std::path::PathBuf {
    let path = db.dir.path().join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn prices(events: &[Value]) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for e in events.iter().filter(|e| e["entity"] == "product") {
        out.entry(e["subject"].as_str().unwrap().to_string())
            .or_default()
            .push(e["data"]["price"].to_string());
    }
    out
}

/// Runs `sql` once, with two daemons on two slots of the same database: one
/// with `streaming = false` (the server sends the transaction at its commit),
/// one with streaming. Returns (unstreamed, streamed) events once both have
/// `expected` events and nothing more arrives.
async fn run_both(db: &TestDb, sql: &str, expected: usize) -> (Vec<Value>, Vec<Value>) {
    let plain = Receiver::start().await.unwrap();
    let streamed = Receiver::start().await.unwrap();
    let plain_daemon = InProcess::start(db.config(&config_for(db, &plain.url(), false, "_plain")));
    wait_streaming(db, &format!("{}_plain", slot_of(db))).await;
    let streamed_daemon = InProcess::start(db.config(&config_for(db, &streamed.url(), true, "")));
    wait_streaming(db, &slot_of(db)).await;

    db.sql(sql);
    wait_until("the unstreamed daemon's events", WAIT, || {
        plain.accepted_count() >= expected
    })
    .await;
    wait_until("the streaming daemon's events", WAIT, || {
        streamed.accepted_count() >= expected
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        streamed_txns(db, &slot_of(db)) >= 1,
        "the server streamed the transaction to the streaming slot"
    );
    assert_eq!(
        streamed_txns(db, &format!("{}_plain", slot_of(db))),
        0,
        "streaming = false keeps protocol 1: nothing streamed"
    );
    plain_daemon.stop().await.unwrap();
    streamed_daemon.stop().await.unwrap();
    db.sql(&format!(
        "SELECT pg_drop_replication_slot('{}_plain')",
        slot_of(db)
    ));
    assert_eq!(
        steward_store::Store::open(&db.state_path())
            .unwrap()
            .spill_chunks()
            .unwrap(),
        0,
        "the spill is empty once the transaction is delivered"
    );
    // `source` names the slot; everything else must be equal.
    let without_source = |mut events: Vec<Value>| {
        for e in &mut events {
            e.as_object_mut().unwrap().remove("source");
        }
        events
    };
    (
        without_source(plain.accepted_events()),
        without_source(streamed.accepted_events()),
    )
}

fn ids(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_transaction_arrives_complete_in_order_once_with_the_unstreamed_ids() {
    streamed_transaction_complete_in_order(support::cluster()).await;
}

/// The scenario on any cluster; `versions` runs it per PostgreSQL major.
pub(crate) async fn streamed_transaction_complete_in_order(pg: &'static DevCluster) {
    let db = streaming_db_on(pg, "streamed_ids", 3000, "64kB");
    let partners: usize = db
        .sql("SELECT count(*) FROM res_partner")
        .lines()
        .find_map(|l| l.trim().parse().ok())
        .unwrap();
    // Two entities interleaved, and each product changed twice: one event
    // per record, the product's with its final price.
    let sql = "BEGIN; \
         UPDATE product_template SET list_price = list_price + 1000 WHERE id > 100000; \
         UPDATE res_partner SET ref = 'S-' || id; \
         UPDATE product_template SET list_price = list_price + 1000 WHERE id > 100000; \
         COMMIT;";
    let expected = 3000 + partners;
    let (plain, streamed) = run_both(&db, sql, expected).await;

    assert_eq!(streamed.len(), expected, "every change once, nothing more");
    let streamed_ids = ids(&streamed);
    assert_eq!(
        streamed_ids.iter().collect::<BTreeSet<_>>().len(),
        expected,
        "no id twice"
    );
    let mut sorted = streamed_ids.clone();
    sorted.sort();
    assert_eq!(streamed_ids, sorted, "delivered in transaction order");
    assert_eq!(
        streamed, plain,
        "the same events, ids and versions as the unstreamed transaction"
    );
    // Each product once, with the price of its second update.
    let p = prices(&streamed);
    assert_eq!(p["100007"], vec!["2007"]);
    assert_eq!(p.len(), 3000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolled_back_savepoints_inside_a_streamed_transaction_are_never_delivered() {
    let db = streaming_db("streamed_savepoints", 5500, "64kB");
    let range = |from: u32, to: u32| format!("id BETWEEN {} AND {}", 100_000 + from, 100_000 + to);
    let sql = format!(
        "BEGIN; \
         UPDATE product_template SET list_price = 1 WHERE {a}; \
         SAVEPOINT s; \
         UPDATE product_template SET list_price = 999999 WHERE {b}; \
         ROLLBACK TO SAVEPOINT s; \
         UPDATE product_template SET list_price = 2 WHERE {c}; \
         SAVEPOINT outer_sp; \
         UPDATE product_template SET list_price = 999997 WHERE {d}; \
         SAVEPOINT inner_sp; \
         UPDATE product_template SET list_price = 999998 WHERE {e}; \
         RELEASE SAVEPOINT inner_sp; \
         ROLLBACK TO SAVEPOINT outer_sp; \
         UPDATE product_template SET list_price = 4 WHERE {f}; \
         SAVEPOINT kept; \
         UPDATE product_template SET list_price = 5 WHERE {g}; \
         RELEASE SAVEPOINT kept; \
         COMMIT;",
        a = range(1, 1000),
        b = range(1001, 2000),
        c = range(2001, 3000),
        d = range(3001, 3500),
        e = range(3501, 4000),
        f = range(4001, 5000),
        g = range(5001, 5500),
    );
    let (plain, streamed) = run_both(&db, &sql, 3500).await;
    assert_eq!(streamed.len(), 3500);
    assert_eq!(
        streamed, plain,
        "the same events and ids as the transaction sent unstreamed"
    );
    let p = prices(&streamed);
    let expect = |n: u32, price: &str| {
        assert_eq!(p[&(100_000 + n).to_string()], vec![price.to_string()]);
    };
    expect(1, "1");
    expect(1000, "1");
    expect(2001, "2");
    expect(4500, "4");
    expect(5500, "5");
    for n in [1001, 1500, 2000, 3001, 3500, 3501, 4000] {
        assert!(
            !p.contains_key(&(100_000 + n).to_string()),
            "product {n} was changed only in a rolled-back savepoint"
        );
    }
    assert!(streamed
        .iter()
        .all(|e| e["data"]["price"].as_f64().unwrap_or(0.0) < 999_000.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_transaction_that_rolls_back_is_never_delivered() {
    let db = streaming_db("streamed_rollback", 3000, "64kB");
    let wms = Receiver::start().await.unwrap();
    let daemon = InProcess::start(db.config(&config_for(&db, &wms.url(), true, "")));
    wait_streaming(&db, &slot_of(&db)).await;

    db.sql("BEGIN; UPDATE product_template SET list_price = 999999 WHERE id > 100000; ROLLBACK;");
    wait_until("the server streamed the transaction", WAIT, || {
        streamed_txns(&db, &slot_of(&db)) >= 1
    })
    .await;
    db.sql("UPDATE product_template SET list_price = 5 WHERE id = 100001");
    db.sql("UPDATE product_template SET list_price = 6 WHERE id = 100002");
    wait_until("the later transactions", WAIT, || wms.accepted_count() >= 2).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    daemon.stop().await.unwrap();

    let p = prices(&wms.accepted_events());
    assert_eq!(
        p,
        BTreeMap::from([
            ("100001".to_string(), vec!["5".to_string()]),
            ("100002".to_string(), vec!["6".to_string()]),
        ]),
        "only the committed transactions"
    );
    assert_eq!(
        steward_store::Store::open(&db.state_path())
            .unwrap()
            .spill_chunks()
            .unwrap(),
        0,
        "the aborted transaction's spill is gone"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_while_a_streamed_transaction_is_half_spilled_loses_nothing() {
    kill9_while_half_spilled(support::cluster()).await;
}

/// The scenario on any cluster; `versions` runs it per PostgreSQL major.
pub(crate) async fn kill9_while_half_spilled(pg: &'static DevCluster) {
    let db = streaming_db_on(pg, "streamed_kill", 4000, "64kB");
    let wms = Receiver::start().await.unwrap();
    let config = write_named(&db, "steward.toml", &config_for(&db, &wms.url(), true, ""));
    let log = db.dir.path().join("steward.log");
    let child = support::Child::run(&config, &log);
    wait_streaming(&db, &slot_of(&db)).await;

    // The transaction's first half is streamed (and spilled) while it sleeps.
    let name = db.name.clone();
    let txn = tokio::task::spawn_blocking(move || {
        pg.psql(
            &name,
            "BEGIN; \
                 UPDATE product_template SET list_price = 7 WHERE id BETWEEN 100001 AND 102000; \
                 SELECT pg_sleep(4); \
                 UPDATE product_template SET list_price = 8 WHERE id BETWEEN 102001 AND 104000; \
                 COMMIT;",
        )
        .unwrap()
    });
    wait_until("the first half streamed", WAIT, || {
        streamed_bytes(&db, &slot_of(&db)) > 0
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    child.kill9();
    let child = support::Child::run(&config, &log);
    txn.await.unwrap();
    wait_until("every product of the transaction", WAIT, || {
        prices(&wms.accepted_events()).len() >= 4000
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(child.terminate().success());
    let log_text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(
        log_text.matches("a streamed transaction committed").count(),
        1,
        "killed while the transaction was open, replayed once after the restart:\n{log_text}"
    );

    let events = wms.accepted_events();
    // Duplicates are allowed (same id, same content); a gap or an id with two contents is not.
    let mut by_id: HashMap<String, &Value> = HashMap::new();
    for e in &events {
        let id = e["id"].as_str().unwrap().to_string();
        if let Some(before) = by_id.insert(id.clone(), e) {
            assert_eq!(before, e, "id {id} delivered with two contents");
        }
    }
    assert_eq!(
        by_id.len(),
        4000,
        "each change of the transaction once by id"
    );
    let state = final_state(&events);
    for n in [1u32, 2000, 2001, 4000] {
        let key = ("product".to_string(), (100_000 + n).to_string());
        let want = if n <= 2000 { "7" } else { "8" };
        assert_eq!(
            state[&key]["price"].to_string(),
            want,
            "product {n} ends on its committed price"
        );
    }
}

/// `stream_bytes` of the slot.
fn streamed_bytes(db: &TestDb, slot: &str) -> i64 {
    db.sql(&format!(
        "SELECT stream_bytes FROM pg_stat_replication_slots WHERE slot_name = '{slot}'"
    ))
    .lines()
    .find_map(|l| l.trim().parse().ok())
    .unwrap_or(0)
}

/// One streamed transaction of many updates passes with bounded memory.
/// The 1,000,000-row figure:
/// `STEWARD_STREAM_TXN_ROWS=1000000 cargo test --release --test streaming big -- --nocapture`
/// (`STEWARD_STREAM_WORK_MEM=64MB` for the server's default streaming threshold).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_big_streamed_transaction_passes_with_bounded_memory() {
    let rows: u64 = std::env::var("STEWARD_STREAM_TXN_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let work_mem = std::env::var("STEWARD_STREAM_WORK_MEM").unwrap_or_else(|_| "64kB".into());
    let db = streaming_db("streamed_big", 1000, &work_mem);
    let wms = Receiver::start_counting().await.unwrap();
    let text = config_for(&db, &wms.url(), true, "")
        .replace(
            "commit_max_delay_ms = 5",
            "commit_max_delay_ms = 5\ncommit_max_events = 5000",
        )
        .replace(
            "batch_linger_ms = 5",
            "batch_linger_ms = 5\nbatch_max_events = 2000",
        );
    let config = write_named(&db, "steward.toml", &text);
    let log = db.dir.path().join("steward.log");
    let child = support::Child::run(&config, &log);
    wait_streaming(&db, &slot_of(&db)).await;
    let started = std::time::Instant::now();
    db.update_prices_in_one_transaction(rows);
    let sql_done = started.elapsed();
    // One event per record per transaction: each of the (up to 1,000)
    // products, with its final price, however often the transaction changed it.
    let records = rows.min(1000) as usize;
    let delivered = wms
        .wait_for_events(records, Duration::from_secs(1800))
        .await;
    let elapsed = started.elapsed();
    let peak_mib = steward_devkit::peak_rss_kib(child.child.id()) as f64 / 1024.0;
    let streamed = streamed_txns(&db, &slot_of(&db));
    let state_mib = std::fs::metadata(db.state_path())
        .map(|m| m.len())
        .unwrap_or(0) as f64
        / 1024.0
        / 1024.0;
    assert!(child.terminate().success());
    assert_eq!(
        (delivered, wms.accepted_count()),
        (records, records),
        "one event per record of the transaction, none after"
    );
    assert!(streamed >= 1, "the server streamed the transaction");
    println!(
        "one streamed transaction of {rows} updates (logical_decoding_work_mem {work_mem}): \
         delivered in {elapsed:.1?} (of which the UPDATE statement itself {sql_done:.1?}), steward peak RSS {peak_mib:.1} MiB, state file {state_mib:.0} MiB"
    );
    assert!(
        peak_mib < 256.0,
        "peak RSS {peak_mib:.1} MiB: the transaction was held in memory"
    );
}
