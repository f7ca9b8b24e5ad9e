//! Values steward cannot encode, end to end: one source transaction with
//! good records, a jsonb value nested 200 deep in a mapped column, and the
//! values JSON and RFC 3339 have no plain form for (NaN, ±Infinity,
//! infinite timestamps, BC dates, years past 9999). The good and
//! representable records are delivered in their documented form, the deep
//! one is quarantined with entity, key, column and reason, the daemon keeps
//! running, other entities keep flowing, and nothing stalls after a restart.
//! The same deep value read by the initial snapshot is quarantined too.

use crate::support;

use std::time::Duration;

use serde_json::{json, Value};
use steward_devkit::receiver::Receiver;
use support::{wait_until, InProcess, TestDb};

const WAIT: Duration = Duration::from_secs(30);

const TABLE: &str = "CREATE TABLE x_poison (
    id int PRIMARY KEY,
    name text,
    attrs jsonb,
    weight float8,
    amount numeric,
    day date,
    at timestamp,
    at_tz timestamptz
)";

/// A jsonb value nested `depth` arrays deep, as SQL.
fn deep(depth: usize) -> String {
    format!("(repeat('[', {depth}) || '1' || repeat(']', {depth}))::jsonb")
}

async fn wait_streaming(db: &TestDb) {
    let slot = format!("steward_{}", db.name);
    for _ in 0..300 {
        let out = db.sql(&format!(
            "SELECT s.active FROM pg_replication_slots s JOIN pg_stat_replication r ON r.pid = s.active_pid \
             WHERE s.slot_name = '{slot}' AND r.state = 'streaming'"
        ));
        if out.lines().any(|l| l.trim() == "t") {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("steward did not start streaming from slot {slot}");
}

fn config_text(db: &TestDb, url: &str, initial: &str) -> String {
    format!(
        r#"
[source]
url = "{url_db}"
slot = "steward_{name}"
publication = "steward_{name}"
status_interval_ms = 500

[state]
path = "{state}"
commit_max_delay_ms = 5

[metrics]
listen = ""

[entities.poison]
table = "x_poison"
fields = {{ name = "name", attrs = "attrs", weight = "weight", amount = "amount", day = "day", at = "at", at_tz = "at_tz" }}

[entities.partner]
table = "res_partner"
fields = {{ name = "name" }}

[targets.wms]
type = "http"
url = "{url}"
entities = ["poison", "partner"]
initial = "{initial}"
batch_linger_ms = 5
retry_initial_ms = 50
retry_max_ms = 500
timeout_ms = 2000
"#,
        url_db = db.url(),
        name = db.name,
        state = db.state_path().display(),
    )
}

/// `steward ARGS -c CONFIG --json` against the running daemon.
fn cli(config: &std::path::Path, args: &[&str]) -> (bool, Value) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_steward"))
        .args(args)
        .arg("-c")
        .arg(config)
        .arg("--json")
        .output()
        .expect("run steward");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let value = serde_json::from_str(&text).unwrap_or_else(|e| {
        panic!(
            "steward {args:?}: not JSON ({e}): {text}\nstderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.success(), value)
}

/// The quarantine as `steward quarantine list` shows it, once it has `n` entries.
async fn quarantine_list(config: &std::path::Path, n: usize) -> Vec<Value> {
    let mut last = Value::Null;
    wait_until(&format!("{n} quarantined records"), WAIT, || {
        let (ok, list) = cli(config, &["quarantine", "list"]);
        last = list;
        ok && last["quarantine"].as_array().is_some_and(|l| l.len() == n)
    })
    .await;
    last["quarantine"].as_array().cloned().unwrap_or_default()
}

fn assert_quarantined_for_depth(entry: &Value, key: &str) {
    assert_eq!(entry["entity"], "poison", "{entry:#}");
    assert_eq!(entry["key"], key, "{entry:#}");
    assert_eq!(entry["rule"], "encoding", "{entry:#}");
    let message = entry["message"].as_str().unwrap_or_default();
    for needed in [
        "column 'attrs'",
        "public.x_poison",
        "nested deeper than 100 levels",
    ] {
        assert!(message.contains(needed), "{needed} in {message}");
    }
}

/// The data of the latest event of (entity, key), if any was delivered.
fn data_of(events: &[Value], entity: &str, key: &str) -> Option<Value> {
    events
        .iter()
        .rev()
        .find(|e| e["entity"] == entity && e["subject"] == key)
        .map(|e| e["data"].clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_value_steward_cannot_encode_is_quarantined_and_the_stream_goes_on() {
    let db = TestDb::new("poison_stream");
    db.sql(TABLE);
    let wms = Receiver::start().await.unwrap();
    let config_path = db.write_config(&config_text(&db, &wms.url(), "none"));
    let config = steward_sinks::config::load(&config_path).unwrap_or_else(|e| panic!("{e}"));
    let daemon = InProcess::start(config.clone());
    wait_streaming(&db).await;

    // One source transaction: good records, one too deep to deliver, and
    // every value with a documented special form.
    db.sql(&format!(
        "BEGIN;
         INSERT INTO x_poison (id, name, attrs) VALUES (1, 'good', '{{\"colour\": \"red\"}}');
         INSERT INTO x_poison (id, name, attrs) VALUES (2, 'deep', {deep});
         INSERT INTO x_poison (id, name, weight, amount) VALUES (3, 'nan', 'NaN', 'NaN');
         INSERT INTO x_poison (id, name, weight, amount) VALUES (4, 'inf', 'Infinity', 'Infinity');
         INSERT INTO x_poison (id, name, weight, amount) VALUES (5, '-inf', '-Infinity', '-Infinity');
         INSERT INTO x_poison (id, name, day, at, at_tz) VALUES (6, 'bc', '0044-03-15 BC', '0044-03-15 12:00:00 BC', '0001-12-31 23:59:59.5+00 BC');
         INSERT INTO x_poison (id, name, day, at, at_tz) VALUES (7, 'far', '10000-01-01', '12345-06-07 08:09:10', '10000-01-01 00:00:00+00');
         INSERT INTO x_poison (id, name, day, at, at_tz) VALUES (8, 'endless', 'infinity', '-infinity', 'infinity');
         INSERT INTO x_poison (id, name, attrs) VALUES (9, 'good too', '[[1, 2]]');
         COMMIT;",
        deep = deep(200)
    ));
    wms.wait_for_events(8, WAIT).await;
    let events = wms.accepted_events();
    let mut keys: Vec<&str> = events
        .iter()
        .filter(|e| e["entity"] == "poison")
        .filter_map(|e| e["subject"].as_str())
        .collect();
    keys.sort();
    assert_eq!(
        keys,
        vec!["1", "3", "4", "5", "6", "7", "8", "9"],
        "every record but the deep one is delivered: {events:#?}"
    );
    let of = |key| data_of(&events, "poison", key).unwrap();
    assert_eq!(of("1")["attrs"], json!({"colour": "red"}));
    assert_eq!(of("9")["attrs"], json!([[1, 2]]));
    assert_eq!(
        (of("3")["weight"].clone(), of("3")["amount"].clone()),
        (json!("NaN"), json!("NaN"))
    );
    assert_eq!(
        (of("4")["weight"].clone(), of("4")["amount"].clone()),
        (json!("Infinity"), json!("Infinity"))
    );
    assert_eq!(
        (of("5")["weight"].clone(), of("5")["amount"].clone()),
        (json!("-Infinity"), json!("-Infinity"))
    );
    assert_eq!(of("6")["day"], "-0043-03-15");
    assert_eq!(of("6")["at"], "-0043-03-15T12:00:00Z");
    assert_eq!(of("6")["at_tz"], "0000-12-31T23:59:59.5Z");
    assert_eq!(of("7")["day"], "+10000-01-01");
    assert_eq!(of("7")["at"], "+12345-06-07T08:09:10Z");
    assert_eq!(of("7")["at_tz"], "+10000-01-01T00:00:00Z");
    assert_eq!(of("8")["day"], "infinity");
    assert_eq!(of("8")["at"], "-infinity");
    assert_eq!(of("8")["at_tz"], "infinity");

    // The deep one is held, with entity, key, column and reason.
    let held = quarantine_list(&config_path, 1).await;
    assert_quarantined_for_depth(&held[0], "2");
    let shown = std::process::Command::new(env!("CARGO_BIN_EXE_steward"))
        .args(["quarantine", "list", "-c"])
        .arg(&config_path)
        .output()
        .expect("run steward");
    let shown = String::from_utf8_lossy(&shown.stdout);
    for needed in [
        "poison 2  rule=encoding",
        "column 'attrs' of public.x_poison",
        "nested deeper than 100 levels",
    ] {
        assert!(shown.contains(needed), "{needed} in {shown}");
    }
    assert!(!daemon.is_finished(), "the daemon keeps running");

    // Records of other entities committed afterwards flow.
    db.sql(
        "INSERT INTO res_partner (id, name, company_id, type, active, is_company) \
         VALUES (9001, 'After the poison', 1, 'contact', true, true)",
    );
    wait_until("the partner committed after it", WAIT, || {
        data_of(&wms.accepted_events(), "partner", "9001").is_some()
    })
    .await;
    assert!(!daemon.is_finished(), "the daemon keeps running");

    // After a restart nothing stalls: the commit is not read again as a
    // fatal one, later changes are delivered and the record is still held.
    daemon.stop().await.expect("a clean stop");
    let daemon = InProcess::start(config.clone());
    wait_streaming(&db).await;
    db.sql("UPDATE res_partner SET name = 'After the restart' WHERE id = 9001");
    db.sql("UPDATE x_poison SET name = 'changed' WHERE id = 1");
    wait_until("changes after the restart", WAIT, || {
        let events = wms.accepted_events();
        data_of(&events, "partner", "9001").is_some_and(|d| d["name"] == "After the restart")
            && data_of(&events, "poison", "1").is_some_and(|d| d["name"] == "changed")
    })
    .await;
    let held = quarantine_list(&config_path, 1).await;
    assert_quarantined_for_depth(&held[0], "2");
    assert!(
        data_of(&wms.accepted_events(), "poison", "2").is_none(),
        "the deep record was never delivered"
    );

    // A change that can be encoded releases and delivers it.
    db.sql("UPDATE x_poison SET attrs = '{\"fixed\": true}' WHERE id = 2");
    wait_until("the fixed record", WAIT, || {
        data_of(&wms.accepted_events(), "poison", "2").is_some()
    })
    .await;
    assert_eq!(
        data_of(&wms.accepted_events(), "poison", "2").unwrap()["attrs"],
        json!({"fixed": true})
    );
    quarantine_list(&config_path, 0).await;
    assert!(!daemon.is_finished());
    daemon.stop().await.expect("a clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_value_steward_cannot_encode_in_the_initial_snapshot_is_quarantined() {
    let db = TestDb::new("poison_snapshot");
    db.sql(TABLE);
    db.sql(&format!(
        "INSERT INTO x_poison (id, name, attrs) VALUES (1, 'good', '[1]'), (2, 'deep', {deep}), (3, 'good too', '{{}}');
         INSERT INTO x_poison (id, name, amount, day) VALUES (4, 'odd', 'NaN', '0044-03-15 BC');",
        deep = deep(200)
    ));
    let wms = Receiver::start().await.unwrap();
    let config_path = db.write_config(&config_text(&db, &wms.url(), "snapshot"));
    let config = steward_sinks::config::load(&config_path).unwrap_or_else(|e| panic!("{e}"));
    let daemon = InProcess::start(config);

    wait_until("the snapshot's good rows", WAIT, || {
        let events = wms.accepted_events();
        ["1", "3", "4"]
            .iter()
            .all(|k| data_of(&events, "poison", k).is_some())
    })
    .await;
    let events = wms.accepted_events();
    assert_eq!(data_of(&events, "poison", "4").unwrap()["amount"], "NaN");
    assert_eq!(
        data_of(&events, "poison", "4").unwrap()["day"],
        "-0043-03-15"
    );
    let held = quarantine_list(&config_path, 1).await;
    assert_quarantined_for_depth(&held[0], "2");
    assert!(data_of(&events, "poison", "2").is_none());
    assert!(!daemon.is_finished(), "the daemon keeps running");

    // The stream goes on after the snapshot.
    wait_streaming(&db).await;
    db.sql("UPDATE res_partner SET name = 'Streamed' WHERE id = (SELECT min(id) FROM res_partner)");
    wait_until("a streamed change after the snapshot", WAIT, || {
        wms.accepted_events()
            .iter()
            .any(|e| e["entity"] == "partner" && e["data"]["name"] == "Streamed")
    })
    .await;
    assert!(!daemon.is_finished());
    daemon.stop().await.expect("a clean stop");
}
