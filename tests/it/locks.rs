//! The state file between the daemon and the command line: CLI commands run
//! while the daemon starts or reloads never make it fail, and a stopped
//! daemon has closed the state file when its stop returns.

use crate::support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use steward_devkit::receiver::{Behaviour, Receiver};
use steward_store::Store;
use support::{wait_until, InProcess, Steward, TestDb};

const WAIT: Duration = Duration::from_secs(30);

/// Runs `steward status` and `steward dlq list` against `config`, one after
/// the other, until `stop`; counts the runs. A command's own failure does
/// not matter here, only what it does to the daemon.
fn hammer(
    config: PathBuf,
    stop: Arc<AtomicBool>,
    runs: Arc<AtomicUsize>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            for args in [
                &["status", "--json", "-c"][..],
                &["dlq", "list", "--target", "wms", "-c"][..],
            ] {
                let _ = Command::new(env!("CARGO_BIN_EXE_steward"))
                    .args(args)
                    .arg(&config)
                    .env("STEWARD_LOG", "off")
                    .output();
                runs.fetch_add(1, Ordering::Relaxed);
            }
        }
    })
}

async fn wait_streaming(db: &TestDb) {
    let sql = format!(
        "SELECT s.active FROM pg_replication_slots s JOIN pg_stat_replication r ON r.pid = s.active_pid \
         WHERE s.slot_name = 'steward_{}' AND r.state = 'streaming'",
        db.name
    );
    wait_until("steward streams", WAIT, || {
        db.sql(&sql).lines().any(|l| l.trim() == "t")
    })
    .await;
}

fn status_json(config: &Path) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_steward"))
        .args(["status", "--json", "-c"])
        .arg(config)
        .output()
        .expect("run steward status");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("status JSON")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_commands_during_start_up_and_reload_never_stop_the_daemon() {
    let db = TestDb::new("locks_start");
    let wms = Receiver::start().await.unwrap();
    let config = db.write_config(&db.config_text(&[("wms", &wms.url(), &["product"])]));
    // The state file exists before the first start, so the commands open it.
    drop(Store::open(&db.state_path()).unwrap());

    for round in 0..4 {
        let stop = Arc::new(AtomicBool::new(false));
        let runs = Arc::new(AtomicUsize::new(0));
        let hammers: Vec<_> = (0..2)
            .map(|_| hammer(config.clone(), stop.clone(), runs.clone()))
            .collect();
        // Let the commands get going before the daemon starts.
        wait_until("CLI commands running", WAIT, || {
            runs.load(Ordering::Relaxed) >= 2
        })
        .await;
        let log = db.dir.path().join(format!("steward-{round}.log"));
        let mut steward = Steward::start(&config, &log, &[]);
        steward.wait_log("replication started", 1).await;
        // Two reloads under the same fire.
        for n in 1..=2 {
            steward.signal(nix::sys::signal::Signal::SIGHUP);
            steward.wait_log("configuration reloaded", n).await;
            steward.wait_log("replication started", n + 1).await;
        }
        let before = runs.load(Ordering::Relaxed);
        wait_until(
            "more CLI commands ran against the running daemon",
            WAIT,
            || runs.load(Ordering::Relaxed) >= before + 4,
        )
        .await;
        stop.store(true, Ordering::Relaxed);
        for h in hammers {
            h.join().unwrap();
        }
        assert!(
            steward.running(),
            "round {round}: the daemon stopped; log:\n{}",
            steward.logs()
        );

        // It still streams, and status (without opening the state file) says it runs.
        let status = status_json(&config);
        assert_eq!(status["daemon"]["running"], true, "{status}");
        let id = round + 1;
        let key = id.to_string();
        let price = format!("{}.25", 30 + round);
        db.sql(&format!(
            "UPDATE product_template SET list_price = {price} WHERE id = {id}"
        ));
        wait_until("the change arrives", WAIT, || {
            wms.accepted_events().iter().any(|e| {
                let got = e["data"]["price"].to_string();
                e["subject"].as_str() == Some(key.as_str()) && got == price
            })
        })
        .await;

        let (exit, logs) = steward.terminate().await;
        assert!(exit.success(), "round {round}: exit {exit}; log:\n{logs}");
        assert!(!logs.contains("ERROR"), "round {round}: log:\n{logs}");
        // After SIGTERM the state file is free at once.
        drop(Store::open(&db.state_path()).expect("the stopped daemon released the state file"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_finding_the_state_file_held_waits_and_names_the_holder() {
    let db = TestDb::new("locks_wait");
    let wms = Receiver::start().await.unwrap();
    let config = db.write_config(&db.config_text(&[("wms", &wms.url(), &["product"])]));
    let held = Store::open(&db.state_path()).unwrap();
    let steward = Steward::start(&config, &db.dir.path().join("steward.log"), &[]);
    steward.wait_log("waiting up to 30 s", 1).await;
    let logs = steward.logs();
    assert!(
        logs.contains(&format!("pid {}", std::process::id())),
        "names the holder's pid: {logs}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    drop(held);
    steward.wait_log("the state file was released", 1).await;
    steward.wait_log("replication started", 1).await;
    let (exit, logs) = steward.terminate().await;
    assert!(exit.success(), "exit {exit}; log:\n{logs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_in_process_stop_releases_the_state_file_before_it_returns() {
    let db = TestDb::new("locks_stop");
    // A target that fails every request keeps store calls going (error notes)
    // right up to the stop.
    let wms = Receiver::start().await.unwrap();
    wms.set_behaviour(Behaviour::Fail(503));
    let text = db.config_text(&[("wms", &wms.url(), &["product"])]);
    for round in 0..12 {
        let daemon = InProcess::start(db.config(&text));
        wait_streaming(&db).await;
        db.sql(&format!(
            "UPDATE product_template SET list_price = {}.5 WHERE id = 1",
            10 + round
        ));
        let seen = wms.requests().len();
        wait_until("failing deliveries", WAIT, || {
            wms.requests().len() >= seen + 2
        })
        .await;
        daemon.stop().await.expect("clean stop");
        let store = Store::open(&db.state_path())
            .unwrap_or_else(|e| panic!("round {round}: the state file is still held: {e}"));
        assert!(store.target_stats("wms").unwrap().backlog >= 1);
    }
}
