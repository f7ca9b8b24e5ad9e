//! Operations: metrics and health endpoints, heartbeat, SIGHUP reload,
//! SIGTERM drain, least-privilege role, secrets kept out of logs, and the
//! systemd notify protocol — against a real PostgreSQL, with the steward
//! binary run as a child process where signals or the environment matter.

mod support;

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use steward::dev::receiver::{Behaviour, Receiver};
use steward::store::Store;
use support::{wait_until, TestDb};

const WAIT: Duration = Duration::from_secs(30);

/// The steward binary with a log file and extra environment.
struct Steward {
    child: std::process::Child,
    log: PathBuf,
}

impl Steward {
    fn start(config: &Path, log: &Path, env: &[(&str, &str)]) -> Steward {
        let file = std::fs::File::create(log).expect("log file");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_steward"));
        cmd.args(["run", "-c"])
            .arg(config)
            .env("STEWARD_LOG", "steward=debug")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log"))
            .stderr(file);
        for (k, v) in env {
            cmd.env(k, v);
        }
        Steward {
            child: cmd.spawn().expect("spawn steward"),
            log: log.to_path_buf(),
        }
    }

    fn signal(&self, signal: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, signal).expect("send a signal");
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log has `n` lines containing `text`.
    async fn wait_log(&self, text: &str, n: usize) {
        let start = Instant::now();
        loop {
            let logs = self.logs();
            if logs.matches(text).count() >= n {
                return;
            }
            if start.elapsed() > WAIT {
                panic!("timed out waiting for log line {text:?} (x{n}); log:\n{logs}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGTERM and the exit status, within `WAIT`.
    async fn terminate(mut self) -> (std::process::ExitStatus, String) {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return (status, self.logs());
            }
            if start.elapsed() > WAIT {
                let _ = self.child.kill();
                panic!("steward did not stop after SIGTERM; log:\n{}", self.logs());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Steward {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

async fn get(url: &str) -> Option<(u16, String)> {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_health_and_readiness_follow_a_target_outage() {
    let db = TestDb::new("ops_metrics");
    let wms = Receiver::start().await.unwrap();
    let port = free_port();
    let mut text = db.config_text(&[("wms", &wms.url(), &["product"])]);
    text = text.replace(
        "[state]",
        &format!(
            "heartbeat_interval_ms = 200\n\n[metrics]\nlisten = \"127.0.0.1:{port}\"\nready_max_target_stall_ms = 1000\n\n[state]"
        ),
    );
    let config = db.write_config(&text);
    let steward = Steward::start(&config, &db.dir.path().join("steward.log"), &[]);

    // Alive at once; ready once the source is connected.
    let start = Instant::now();
    loop {
        if let Some((200, body)) = get(&format!("http://127.0.0.1:{port}/healthz")).await {
            assert_eq!(body.trim(), "ok");
            break;
        }
        assert!(start.elapsed() < WAIT, "/healthz never answered; log:\n{}", steward.logs());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let start = Instant::now();
    while get(&format!("http://127.0.0.1:{port}/readyz")).await.map(|r| r.0) != Some(200) {
        assert!(start.elapsed() < WAIT, "/readyz never became 200; log:\n{}", steward.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let page = scrape(port).await;
    assert_eq!(
        sample(&page, "steward_build_info", &format!("version=\"{}\"", env!("CARGO_PKG_VERSION"))),
        Some(1.0),
        "{page}"
    );
    assert!(page.contains("# HELP steward_source_lag_bytes"), "{page}");

    // The heartbeat moves the slot on a quiet database: no table changes at all.
    let before = db.confirmed_flush().expect("slot");
    wait_until("the heartbeat advances the slot", WAIT, || {
        db.confirmed_flush().is_some_and(|c| c > before)
    })
    .await;

    // A delivered change counts, with a latency sample.
    let id = some_product(&db);
    update_product_price(&db, id, "10.00");
    assert_eq!(wms.wait_for_events(1, WAIT).await, 1);
    wait_metric(port, "delivered counter and latency histogram", |p| {
        sample(p, "steward_events_delivered_total", "target=\"wms\"").is_some_and(|v| v >= 1.0)
            && sample(p, "steward_delivery_latency_seconds_count", "target=\"wms\"")
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
    wait_metric(port, "backlog 3 while the target is down", |p| {
        sample(p, "steward_target_backlog_events", "target=\"wms\"") == Some(3.0)
            && sample(p, "steward_delivery_failures_total", "target=\"wms\"")
                .is_some_and(|v| v >= 1.0)
    })
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
        assert!(start.elapsed() < WAIT, "/readyz stayed {status} with a stalled target");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let page = scrape(port).await;
    assert!(
        sample(&page, "steward_target_oldest_undelivered_seconds", "target=\"wms\"")
            .is_some_and(|v| v > 0.0),
        "{page}"
    );

    // Lag in bytes is a real figure and moves.
    let lags: Vec<f64> = {
        let first = sample(&page, "steward_source_lag_bytes", "").expect("lag bytes");
        assert!(first >= 0.0);
        // The heartbeat writes WAL every 200 ms; the monitor polls every 5 s.
        let page = wait_metric(port, "lag bytes to change", |p| {
            sample(p, "steward_source_lag_bytes", "").is_some_and(|v| v != first)
        })
        .await;
        vec![first, sample(&page, "steward_source_lag_bytes", "").unwrap_or(first)]
    };
    assert!(lags.iter().all(|l| *l >= 0.0));

    // The target comes back: everything is delivered, backlog 0, ready again.
    wms.set_behaviour(Behaviour::Ok);
    assert!(wms.wait_for_events(4, WAIT).await >= 4);
    wait_metric(port, "backlog back to 0", |p| {
        sample(p, "steward_target_backlog_events", "target=\"wms\"") == Some(0.0)
            && sample(p, "steward_events_delivered_total", "target=\"wms\"")
                .is_some_and(|v| v >= 4.0)
    })
    .await;
    let start = Instant::now();
    while get(&format!("http://127.0.0.1:{port}/readyz")).await.map(|r| r.0) != Some(200) {
        assert!(start.elapsed() < WAIT, "/readyz did not recover");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let page = scrape(port).await;
    assert_eq!(sample(&page, "steward_slot_wal_status", "status=\"reserved\""), Some(1.0), "{page}");
    assert_eq!(sample(&page, "steward_source_lag_seconds", ""), Some(0.0), "{page}");
    let (status, _) = steward.terminate().await;
    assert!(status.success());
}
