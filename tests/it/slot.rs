//! A replication slot the server invalidated (`wal_status = lost`) against a
//! real PostgreSQL. The test changes server-wide WAL settings
//! (`max_wal_size`, `max_slot_wal_keep_size`) of the shared cluster, which
//! would invalidate other tests' slots too: it runs alone, and the settings
//! are reset however it ends.

use crate::support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use steward_devkit::receiver::Receiver;
use support::{db_prices, target_prices, wait_until, InProcess, TestDb};

const WAIT: Duration = Duration::from_secs(120);

fn steward(args: &[&str], config: &Path) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_steward"))
        .args(args)
        .arg("-c")
        .arg(config)
        .output()
        .expect("run steward");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn server(sql: &str) -> String {
    support::cluster()
        .psql("postgres", sql)
        .unwrap_or_else(|e| panic!("SQL failed: {e}\n{sql}"))
}

fn wal_status(slot: &str) -> String {
    server(&format!(
        "SELECT wal_status FROM pg_replication_slots WHERE slot_name = '{slot}'"
    ))
    .trim()
    .to_string()
}

/// Writes a little WAL and moves to the next segment, `n` times.
fn switch_segments(n: usize) {
    for _ in 0..n {
        server(
            "SELECT pg_logical_emit_message(false, 'steward-test', 'x'); SELECT pg_switch_wal();",
        );
    }
}

const RESET_WAL_SETTINGS: &str =
    "ALTER SYSTEM RESET max_wal_size; ALTER SYSTEM RESET max_slot_wal_keep_size; SELECT pg_reload_conf();";

/// Puts the server's WAL settings back when dropped, also after a failed
/// assertion, waiting until the server uses them.
struct ResetWalSettings;

impl Drop for ResetWalSettings {
    fn drop(&mut self) {
        let cluster = support::cluster();
        let _ = cluster.psql("postgres", RESET_WAL_SETTINGS);
        let deadline = std::time::Instant::now() + WAIT;
        while std::time::Instant::now() < deadline
            && cluster
                .psql("postgres", "SHOW max_slot_wal_keep_size")
                .is_ok_and(|v| v.trim() != "-1")
        {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Sets server-wide WAL settings and waits until the server uses them.
async fn set_wal_settings(max_wal_size: &str, keep: &str) {
    server(&format!(
        "ALTER SYSTEM SET max_wal_size = '{max_wal_size}'; \
         ALTER SYSTEM SET max_slot_wal_keep_size = '{keep}'; SELECT pg_reload_conf();"
    ));
    wait_until("the server reloads its WAL settings", WAIT, || {
        server("SHOW max_slot_wal_keep_size").trim() == keep
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalidated_slot_is_reported_at_risk_then_lost_and_reset_all_recovers() {
    let db = TestDb::alone("slot_lost");
    // Declared after `db`, so dropped before it gives up its turn.
    let _reset = ResetWalSettings;
    let wms = Receiver::start().await.unwrap();
    let text = db
        .config_text(&[("wms", &wms.url(), &["product"])])
        .replace("initial = \"none\"", "initial = \"snapshot\"");
    let cfg = db.write_config(&text);
    let slot = format!("steward_{}", db.name);
    let rows = db_prices(&db).len();

    let daemon = InProcess::start(steward_sinks::config::load(&cfg).unwrap());
    wait_until("the initial snapshot arrives", WAIT, || {
        wms.accepted_count() >= rows
    })
    .await;
    daemon.stop().await.unwrap();

    // Steward is down while the server writes more WAL than max_wal_size.
    db.sql("UPDATE product_template SET list_price = 777 WHERE id = (SELECT min(id) FROM product_template)");
    set_wal_settings("32MB", "-1").await;
    switch_segments(4);
    wait_until("the slot's wal_status is extended", WAIT, || {
        wal_status(&slot) == "extended"
    })
    .await;
    let (ok, out, err) = steward(&["status"], &cfg);
    assert!(ok, "{err}");
    assert!(
        out.contains("wal_status extended") && out.contains("steward is lagging"),
        "status reports the retained WAL:\n{out}"
    );

    // A limit on what slots may keep: the slot is behind it (unreserved) ...
    // (max_wal_size back to 1GB so that no checkpoint starts by itself.)
    server("CHECKPOINT");
    set_wal_settings("1GB", "1MB").await;
    switch_segments(1);
    wait_until("the slot's wal_status is unreserved", WAIT, || {
        wal_status(&slot) == "unreserved"
    })
    .await;
    let (ok, out, err) = steward(&["status"], &cfg);
    assert!(ok, "{err}");
    assert!(
        out.contains("at risk (wal_status unreserved)") && out.contains("max_slot_wal_keep_size"),
        "status warns before the slot is lost:\n{out}"
    );

    // ... and the next checkpoint invalidates it.
    server("CHECKPOINT");
    wait_until("the slot's wal_status is lost", WAIT, || {
        wal_status(&slot) == "lost"
    })
    .await;
    // The server stops limiting slots, so the recreated one is kept.
    server(RESET_WAL_SETTINGS);

    // Starting fails with the problem and the fix.
    let daemon = InProcess::start(steward_sinks::config::load(&cfg).unwrap());
    wait_until("the daemon stops", WAIT, || daemon.is_finished()).await;
    let error = format!(
        "{:#}",
        daemon.stop().await.expect_err("a lost slot is an error")
    );
    assert!(
        error.contains("invalidated")
            && error.contains("wal_status lost")
            && error.contains("steward reset --all"),
        "the error names the problem and the fix: {error}"
    );

    // Status shows it, in text and JSON.
    let (ok, out, err) = steward(&["status"], &cfg);
    assert!(ok, "{err}");
    assert!(
        out.contains("wal_status lost") && out.contains("steward reset --all"),
        "{out}"
    );
    let (ok, out, err) = steward(&["status", "--json"], &cfg);
    assert!(ok, "{err}");
    let status: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(status["source"]["wal_status"], "lost", "{status}");

    // The documented fix: reset --all recreates the slot and re-snapshots.
    let (ok, _, err) = steward(&["reset", "--all"], &cfg);
    assert!(ok, "{err}");
    let before = wms.accepted_count();
    let daemon = InProcess::start(steward_sinks::config::load(&cfg).unwrap());
    wait_until("the fresh snapshot arrives", WAIT, || {
        wms.accepted_count() >= before + rows
    })
    .await;
    db.sql("UPDATE product_template SET list_price = 778 WHERE id = (SELECT max(id) FROM product_template)");
    let expected = db_prices(&db);
    wait_until("the target matches the database again", WAIT, || {
        target_prices(&wms.accepted_events()) == expected
    })
    .await;
    assert_eq!(wal_status(&slot), "reserved");
    daemon.stop().await.unwrap();
}
