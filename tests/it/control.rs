//! The control API: the daemon's Unix socket (owner-only, or a group's),
//! its life across a clean stop and a kill -9, every CLI command through it
//! while the daemon runs (and no request files), raw requests, and the
//! audit trail naming the Unix user behind each action.

use crate::support;

use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use steward_devkit::receiver::{Behaviour, Receiver};
use support::{wait_until, InProcess, Steward, TestDb};

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

fn socket_of(db: &TestDb) -> PathBuf {
    db.dir.path().join("steward.redb.sock")
}

fn mode(path: &Path) -> u32 {
    std::fs::symlink_metadata(path)
        .unwrap()
        .permissions()
        .mode()
        & 0o777
}

fn me() -> String {
    nix::unistd::User::from_uid(nix::unistd::getuid())
        .unwrap()
        .expect("the test runs as a named user")
        .name
}

/// Runs the steward binary: success, stdout, stderr.
fn steward(args: &[&str], config: &Path) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_steward"))
        .args(args)
        .arg("-c")
        .arg(config)
        .env("STEWARD_LOG", "steward=warn")
        .output()
        .expect("run steward");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs the steward binary, panicking on failure; returns stdout.
fn ok(args: &[&str], config: &Path) -> String {
    let (success, stdout, stderr) = steward(args, config);
    assert!(success, "steward {args:?} failed: {stderr}\n{stdout}");
    stdout
}

fn json(args: &[&str], config: &Path) -> Value {
    let text = ok(args, config);
    serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("steward {args:?}: not JSON ({e}): {text}"))
}

/// One HTTP/1.1 request over the socket: status and JSON body.
fn raw(socket: &Path, method: &str, path: &str, body: &str) -> (u16, Value) {
    let mut conn = UnixStream::connect(socket).expect("connect to the control socket");
    conn.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: steward\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    conn.write_all(request.as_bytes()).unwrap();
    let mut text = String::new();
    conn.read_to_string(&mut text).unwrap();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

fn insert_product(id: u64, code: &str) -> String {
    format!(
        "INSERT INTO product_template (id, categ_id, uom_id, uom_po_id, detailed_type, type, default_code, name, list_price, active, tracking, purchase_line_warn, sale_line_warn) \
         VALUES ({id}, 1, 1, 1, 'product', 'product', '{code}', '{{\"en_US\": \"Product {id}\"}}', 10, true, 'none', 'no-message', 'no-message');"
    )
}

/// Products with a SKU rule, delivered to `wms`; `control` lines, if any, as `[control]`.
fn config(db: &TestDb, url: &str, control: &str) -> PathBuf {
    let mut text = db.config_text(&[("wms", url, &["product"])]);
    text.push_str(
        r#"
[[entities.product.rules]]
name = "sku_format"
regex = { field = "sku", pattern = "^[A-Z]+_[0-9]+$" }
message = "internal references look like FURN_0001"
"#,
    );
    if !control.is_empty() {
        text.push_str(&format!("\n[control]\n{control}\n"));
    }
    db.write_config(&text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_socket_is_owner_only_answers_raw_requests_and_goes_with_the_daemon() {
    let db = TestDb::new("ctl_socket");
    let wms = Receiver::start().await.unwrap();
    let config = config(&db, &wms.url(), "");
    let socket = socket_of(&db);
    let steward = Steward::start(&config, &db.dir.path().join("steward.log"), &[]);
    steward.wait_log("steward started", 1).await;
    assert_eq!(mode(&socket), 0o600, "owner-only by default");

    let (status, body) = raw(&socket, "GET", "/v1", "");
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["api"], "v1");
    assert_eq!(body["daemon"], env!("CARGO_PKG_VERSION"));
    assert!(body["pid"].as_u64().is_some(), "{body}");

    let mut body = Value::Null;
    wait_until("the daemon has opened the state file", WAIT, || {
        let (status, answer) = raw(&socket, "GET", "/v1/status", "");
        assert_eq!(status, 200, "{answer}");
        body = answer;
        body["starting"] == false
    })
    .await;
    assert_eq!(body["targets"][0]["name"], "wms", "{body}");
    assert!(body["durable_lsn"].is_string(), "{body}");

    let (status, body) = raw(&socket, "GET", "/v1/no-such-thing", "");
    assert_eq!(status, 404);
    assert_eq!(body["error"]["code"], "not_found", "{body}");
    assert!(body["error"]["message"].is_string(), "{body}");

    let (status, body) = raw(&socket, "DELETE", "/v1/status", "");
    assert_eq!(status, 405);
    assert_eq!(body["error"]["code"], "method_not_allowed", "{body}");

    for (path, bad) in [
        ("/v1/quarantine/product/1/release", "{not json"),
        ("/v1/quarantine/product/1/release", r#"{"comment": 7}"#),
        (
            "/v1/targets/wms/dead-letters/replay",
            r#"{"filter": {"idd": 1}}"#,
        ),
        ("/v1/backup", r#"{"dest": "relative/path"}"#),
    ] {
        let (status, body) = raw(&socket, "POST", path, bad);
        assert_eq!(status, 400, "{path} {bad}: {body}");
        assert_eq!(body["error"]["code"], "bad_request", "{body}");
    }
    let (status, body) = raw(&socket, "POST", "/v1/targets/wms/dead-letters/drop", "");
    assert_eq!(status, 400, "a drop without a filter needs all: {body}");
    let (status, body) = raw(&socket, "GET", "/v1/targets/nope/dead-letters", "");
    assert_eq!(status, 404);
    assert_eq!(body["error"]["code"], "unknown_target", "{body}");
    let (status, body) = raw(&socket, "GET", "/v1/audit?limit=many", "");
    assert_eq!(status, 400, "{body}");

    let (exit, logs) = steward.terminate().await;
    assert!(exit.success(), "{logs}");
    assert!(!socket.exists(), "the socket is removed on a clean exit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_group_the_socket_is_0660_and_that_groups() {
    let db = TestDb::new("ctl_group");
    let wms = Receiver::start().await.unwrap();
    let gid = nix::unistd::getgid();
    let group = nix::unistd::Group::from_gid(gid)
        .unwrap()
        .expect("the test's group has a name")
        .name;
    let config = config(&db, &wms.url(), &format!("group = \"{group}\""));
    let daemon = InProcess::start(steward_sinks::config::load(&config).unwrap());
    let socket = socket_of(&db);
    wait_until("the socket exists", WAIT, || socket.exists()).await;
    assert_eq!(mode(&socket), 0o660);
    assert_eq!(std::fs::metadata(&socket).unwrap().gid(), gid.as_raw());
    let status = json(&["status", "--json"], &config);
    assert_eq!(status["daemon"]["running"], true, "{status}");
    daemon.stop().await.unwrap();
    assert!(!socket.exists());

    // A group that does not exist stops the start with a clear error.
    let config = config_with_group(&db, &wms.url(), "steward-no-such-group");
    let (success, _, stderr) = steward(&["run"], &config);
    assert!(!success);
    assert!(
        stderr.contains("no group named `steward-no-such-group`"),
        "{stderr}"
    );
}

fn config_with_group(db: &TestDb, url: &str, group: &str) -> PathBuf {
    config(db, url, &format!("group = \"{group}\""))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_socket_after_kill_9_is_replaced_and_not_taken_for_a_daemon() {
    let db = TestDb::new("ctl_stale");
    let wms = Receiver::start().await.unwrap();
    let config = config(&db, &wms.url(), "");
    let socket = socket_of(&db);
    let steward = Steward::start(&config, &db.dir.path().join("first.log"), &[]);
    steward.wait_log("steward started", 1).await;
    steward.kill9();
    assert!(socket.exists(), "kill -9 leaves the socket behind");

    // Nobody listens: the commands open the state file themselves.
    let status = json(&["status", "--json"], &config);
    assert_eq!(status["daemon"]["running"], false, "{status}");
    assert_eq!(status["targets"][0]["name"], "wms", "{status}");
    let list = ok(&["dlq", "list", "--target", "wms"], &config);
    assert!(list.contains("no dead letters"), "{list}");
    let quarantine = json(&["quarantine", "list", "--json"], &config);
    assert!(quarantine["quarantine"].is_array(), "{quarantine}");

    // The next daemon replaces the socket and serves it.
    let steward = Steward::start(&config, &db.dir.path().join("second.log"), &[]);
    steward.wait_log("steward started", 1).await;
    assert!(
        steward.logs().contains("replaced a control socket"),
        "{}",
        steward.logs()
    );
    let (status, body) = raw(&socket, "GET", "/v1", "");
    assert_eq!(status, 200, "{body}");
    let status = json(&["status", "--json"], &config);
    assert_eq!(status["daemon"]["running"], true, "{status}");

    // A second daemon for the same state file refuses to start.
    let (success, _, stderr) = steward_run_briefly(&config);
    assert!(!success);
    assert!(stderr.contains("another steward daemon serves"), "{stderr}");
    assert!(
        socket.exists(),
        "the refused daemon left the live socket alone"
    );

    let (exit, logs) = steward.terminate().await;
    assert!(exit.success(), "{logs}");
    assert!(!socket.exists());
}

fn steward_run_briefly(config: &Path) -> (bool, String, String) {
    steward(&["run"], config)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_command_goes_through_the_api_and_actions_are_audited_with_the_user() {
    let db = TestDb::new("ctl_commands");
    let wms = Receiver::start().await.unwrap();
    wms.set_behaviour(Behaviour::FailKey {
        key: "9002".into(),
        status: 422,
    });
    let config = config(&db, &wms.url(), "");
    let daemon = InProcess::start(steward_sinks::config::load(&config).unwrap());
    wait_streaming(&db).await;
    let user = me();

    db.sql(&insert_product(9001, "FURN_9001"));
    db.sql(&insert_product(9002, "FURN_9002"));
    db.sql(&insert_product(9003, "bad-code"));
    wait_until("a dead letter and a quarantined record", WAIT, || {
        let list = ok(&["dlq", "list", "--target", "wms"], &config);
        let quarantine = json(&["quarantine", "list", "--json"], &config);
        list.contains("1 dead letter(s)")
            && quarantine["quarantine"]
                .as_array()
                .is_some_and(|q| q.iter().any(|e| e["key"] == "9003"))
    })
    .await;

    let status = json(&["status", "--json"], &config);
    assert_eq!(status["daemon"]["running"], true, "{status}");
    assert_eq!(status["daemon"]["starting"], false, "{status}");
    assert!(status["daemon"]["checkpoint"].is_string(), "{status}");
    assert_eq!(status["targets"][0]["dead_letters"], 1, "{status}");

    let shown = json(
        &["quarantine", "show", "product", "9003", "--json"],
        &config,
    );
    assert_eq!(shown["quarantine"][0]["rule"], "sku_format", "{shown}");
    let blocked = json(
        &[
            "quarantine",
            "list",
            "--blocked-by",
            "product",
            "1",
            "--json",
        ],
        &config,
    );
    assert_eq!(blocked["quarantine"], serde_json::json!([]), "{blocked}");
    // Still failing: refused, and the attempt is in the audit trail.
    let (success, stdout, _) = steward(
        &[
            "quarantine",
            "release",
            "product",
            "9003",
            "--json",
            "--comment",
            "checked with purchasing",
        ],
        &config,
    );
    assert!(!success, "{stdout}");
    assert!(stdout.contains("still fails"), "{stdout}");
    let (success, _, stderr) = steward(&["quarantine", "show", "product", "424242"], &config);
    assert!(!success);
    assert!(stderr.contains("not quarantined"), "{stderr}");

    let show = json(&["dlq", "show", "--target", "wms", "--id", "1"], &config);
    assert_eq!(show["event"]["key"], "9002", "{show}");
    wms.set_behaviour(Behaviour::Ok);
    let replayed = ok(
        &[
            "dlq",
            "replay",
            "--target",
            "wms",
            "--key",
            "9002",
            "--comment",
            "receiver fixed",
        ],
        &config,
    );
    assert!(replayed.contains("replayed 1"), "{replayed}");
    wait_until("9002 delivered after the replay", WAIT, || {
        wms.accepted_events().iter().any(|e| e["subject"] == "9002")
    })
    .await;
    let dropped = ok(&["dlq", "drop", "--target", "wms", "--all"], &config);
    assert!(dropped.contains("dropped 0"), "{dropped}");
    let flushed = ok(&["flush", "--target", "wms"], &config);
    assert!(
        flushed.contains("flush of target wms requested"),
        "{flushed}"
    );
    let backup = db.dir.path().join("copy.redb");
    let report = ok(
        &[
            "backup",
            backup.to_str().unwrap(),
            "--comment",
            "before the upgrade",
        ],
        &config,
    );
    assert!(report.contains("by the running daemon"), "{report}");
    assert!(backup.exists());
    let reset = ok(
        &["reset", "--target", "wms", "--comment", "resync"],
        &config,
    );
    assert!(reset.contains("snapshot complete"), "{reset}");

    // Every action, in the user's name; `--user` finds them.
    let audit = json(&["audit", "--user", &user, "--json"], &config);
    let records = audit["audit"].as_array().cloned().unwrap_or_default();
    let decisions: Vec<(String, String, String)> = records
        .iter()
        .map(|r| {
            assert_eq!(r["user"], user.as_str(), "{r}");
            (
                r["decision"].as_str().unwrap_or_default().to_string(),
                r["entity"].as_str().unwrap_or_default().to_string(),
                r["key"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    let has = |d: &str, e: &str, k: &str| {
        decisions
            .iter()
            .any(|(dd, ee, kk)| dd == d && ee == e && kk == k)
    };
    assert!(
        records.iter().any(|r| r["key"] == "9003"
            && r["entity"] == "product"
            && r["comment"] == "checked with purchasing"),
        "the release attempt: {audit}"
    );
    assert!(has("dlq_replayed", "product", "9002"), "{decisions:?}");
    assert!(has("flush", "*", "*"), "{decisions:?}");
    assert!(has("backup", "*", "*"), "{decisions:?}");
    assert!(has("reset", "product", "*"), "{decisions:?}");
    let replay = records
        .iter()
        .find(|r| r["decision"] == "dlq_replayed")
        .unwrap();
    assert_eq!(replay["target"], "wms");
    assert_eq!(replay["comment"], "receiver fixed");
    // The other filters.
    let by_decision = json(
        &[
            "audit",
            "--decision",
            "dlq_replayed",
            "--target",
            "wms",
            "--json",
        ],
        &config,
    );
    assert_eq!(
        by_decision["audit"].as_array().map(Vec::len),
        Some(1),
        "{by_decision}"
    );
    let nobody = json(&["audit", "--user", "nobody-at-all", "--json"], &config);
    assert_eq!(nobody["audit"], serde_json::json!([]), "{nobody}");
    let text = ok(&["audit", "--decision", "backup"], &config);
    assert!(text.contains(&format!("by {user}")), "{text}");

    // No request files, no status file: only the socket next to the state.
    let mut names: Vec<String> = std::fs::read_dir(db.dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("steward.redb"))
        .collect();
    names.sort();
    assert_eq!(names, ["steward.redb", "steward.redb.sock"]);

    daemon.stop().await.unwrap();
}
