//! Fault suite: a target down for a minute, PostgreSQL restarted mid-stream,
//! a target that stops answering, and the state file's disk filling up.

use crate::support;

use std::collections::BTreeSet;
use std::time::Duration;

use steward_devkit::receiver::{Behaviour, Receiver};
use steward_devkit::{DevCluster, DevClusterOptions};
use support::{free_port, wait_until, InProcess, TestDb};

const WAIT: Duration = Duration::from_secs(60);

async fn wait_streaming(psql: impl Fn(&str) -> String, slot: &str) {
    for _ in 0..600 {
        let out = psql(&format!(
            "SELECT count(*) FROM pg_replication_slots s JOIN pg_stat_replication r ON r.pid = s.active_pid \
             WHERE s.slot_name = '{slot}' AND r.state = 'streaming'"
        ));
        if out.trim() == "1" {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("steward did not start streaming from {slot}");
}

/// `/readyz` on `port`: status and body (0 when nothing answers).
async fn readyz(port: u16) -> (u16, String) {
    steward_postgres::install_default_provider();
    match reqwest::get(format!("http://127.0.0.1:{port}/readyz")).await {
        Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
        Err(_) => (0, String::new()),
    }
}

async fn wait_readyz(port: u16, status: u16) -> String {
    let start = std::time::Instant::now();
    loop {
        let (s, body) = readyz(port).await;
        if s == status {
            return body;
        }
        assert!(
            start.elapsed() < WAIT,
            "/readyz stayed {s} ({body}), expected {status}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn prices(receiver: &Receiver) -> Vec<String> {
    receiver
        .accepted_events()
        .iter()
        .map(|e| e["data"]["price"].to_string())
        .collect()
}

/// Every price 0..n in order, each at least once (redeliveries allowed).
fn assert_all_in_order(seen: &[String], n: usize) {
    let mut deduped: Vec<&String> = Vec::new();
    for p in seen {
        if deduped.last() != Some(&p) && !deduped.contains(&p) {
            deduped.push(p);
        }
    }
    let expected: Vec<String> = (0..n).map(|i| format!("{i}.5")).collect();
    assert_eq!(
        deduped.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
        expected
            .iter()
            .map(std::string::String::as_str)
            .collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_down_for_a_minute_receives_everything_when_it_returns() {
    let db = TestDb::new("target_down_60s");
    let wms = Receiver::start().await.unwrap();
    let config = db.config(&db.config_text(&[("wms", &wms.url(), &["product"])]));
    let daemon = InProcess::start(config);
    wait_streaming(|sql| db.sql(sql), &format!("steward_{}", db.name)).await;
    wms.stop().await;
    let down = std::time::Instant::now();
    for i in 0..30 {
        db.sql(&format!(
            "UPDATE product_template SET list_price = {i}.5 WHERE id = 5"
        ));
    }
    let down_for = Duration::from_secs(
        std::env::var("STEWARD_TARGET_DOWN_SECS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(60),
    );
    tokio::time::sleep(down_for.saturating_sub(down.elapsed())).await;
    assert_eq!(wms.accepted_count(), 0);
    wms.restart().await.unwrap();
    wait_until("all 30 updates after the target returns", WAIT, || {
        wms.accepted_count() >= 30
    })
    .await;
    assert_all_in_order(&prices(&wms), 30);
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_that_stops_answering_times_out_and_catches_up() {
    let db = TestDb::new("target_hangs");
    let wms = Receiver::start().await.unwrap();
    let config = db.config(&db.config_text(&[("wms", &wms.url(), &["product"])]));
    let daemon = InProcess::start(config);
    wait_streaming(|sql| db.sql(sql), &format!("steward_{}", db.name)).await;
    wms.set_behaviour(Behaviour::Hang);
    for i in 0..10 {
        db.sql(&format!(
            "UPDATE product_template SET list_price = {i}.5 WHERE id = 6"
        ));
    }
    // Requests arrive and are never answered: the sink's 2 s timeout fires and it retries.
    wait_until("at least two timed-out attempts", WAIT, || {
        wms.requests().iter().filter(|r| r.status == 0).count() >= 2
    })
    .await;
    assert_eq!(wms.accepted_count(), 0);
    wms.set_behaviour(Behaviour::Ok);
    wait_until("all 10 updates once the target answers again", WAIT, || {
        wms.accepted_count() >= 10
    })
    .await;
    assert_all_in_order(&prices(&wms), 10);
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restarted_mid_stream_reconnects_and_loses_nothing() {
    support::init_logging();
    // A cluster of its own: restarting the shared one would disturb other tests.
    let cluster = DevCluster::start(DevClusterOptions::default()).expect("cluster");
    cluster.create_database("odoo").unwrap();
    cluster.load_odoo_fixture("odoo").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let wms = Receiver::start().await.unwrap();
    let path = dir.path().join("steward.toml");
    std::fs::write(
        &path,
        format!(
            "[source]\nurl = \"{url}\"\n[state]\npath = \"state.redb\"\ncommit_max_delay_ms = 5\n\
             [entities.product]\ntable = \"product_template\"\nfields = {{ price = \"list_price\" }}\n\
             [targets.wms]\ntype = \"http\"\nurl = \"{target}\"\nentities = [\"product\"]\nbatch_linger_ms = 5\ninitial = \"none\"\n",
            url = cluster.url("odoo"),
            target = wms.url()
        ),
    )
    .unwrap();
    let daemon = InProcess::start(steward_sinks::config::load(&path).unwrap());
    wait_streaming(|sql| cluster.psql("odoo", sql).unwrap(), "steward").await;
    for i in 0..20 {
        cluster
            .psql(
                "odoo",
                &format!("UPDATE product_template SET list_price = {i}.5 WHERE id = 1"),
            )
            .unwrap();
    }
    cluster.restart().expect("restart PostgreSQL");
    for i in 20..40 {
        cluster
            .psql(
                "odoo",
                &format!("UPDATE product_template SET list_price = {i}.5 WHERE id = 1"),
            )
            .unwrap();
    }
    wait_until("all 40 updates across the restart", WAIT, || {
        prices(&wms).iter().collect::<BTreeSet<_>>().len() >= 40
    })
    .await;
    assert_all_in_order(&prices(&wms), 40);
    daemon.stop().await.unwrap();
}

/// The state file lives on a small tmpfs that is then filled up: steward
/// must stop confirming WAL, say why, corrupt nothing, and resume by itself
/// once space is freed. Needs root (mount); skipped otherwise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_stops_confirming_and_resumes_when_space_returns() {
    let db = TestDb::new("disk_full");
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
    let log = db.dir.path().join("steward.log");
    let child = support::Child::run(&config, &log);
    wait_streaming(|sql| db.sql(sql), &format!("steward_{}", db.name)).await;
    db.sql("UPDATE product_template SET list_price = 0.5 WHERE id = 7");
    assert_eq!(wms.wait_for_events(1, WAIT).await, 1);

    // Fill the disk, then write.
    disk.fill();
    let confirmed_before = db.confirmed_flush().unwrap();
    for i in 1..200 {
        db.sql(&format!(
            "UPDATE product_template SET list_price = {i}.5, description = to_jsonb(repeat('x', 4000)) WHERE id = 7"
        ));
    }
    let stuck_at = db.current_wal();
    wait_until("steward reports the full disk", WAIT, || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("cannot write to the state file")
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let confirmed = db.confirmed_flush().unwrap();
    assert!(confirmed < stuck_at, "nothing written while the disk is full may be confirmed ({confirmed} vs {stuck_at}, before {confirmed_before})");
    // A load balancer or operator asking /readyz learns why.
    let body = wait_readyz(port, 503).await;
    assert!(
        body.contains("store: cannot write the state file (") && body.contains("is full"),
        "{body}"
    );

    disk.free();
    wait_until("all 199 updates after space returns", WAIT, || {
        prices(&wms).iter().collect::<BTreeSet<_>>().len() >= 200
    })
    .await;
    wait_until("the slot confirms everything", WAIT, || {
        db.confirmed_flush().is_some_and(|f| f >= stuck_at)
    })
    .await;
    assert_all_in_order(&prices(&wms), 200);
    wait_readyz(port, 200).await;
    assert!(child.terminate().success());
}
