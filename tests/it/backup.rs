//! `steward backup` and restoring a backup: a copy taken while the daemon
//! streams (or while it is stopped), and a daemon started on a restored
//! backup that is older than its replication slot repairs the targets: they
//! end with exactly the database's current records, governed.

use crate::support;

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use serde_json::Value;
use steward_devkit::receiver::{Behaviour, Receiver};
use support::{final_state, wait_until, InProcess, TestDb};

const WAIT: Duration = Duration::from_secs(60);

fn config_text(db: &TestDb, url: &str) -> String {
    format!(
        r#"
[source]
url = "{url_db}"
slot = "steward_{db}"
publication = "steward_{db}"
status_interval_ms = 200

[state]
path = "{state}"
commit_max_delay_ms = 5
audit_retention_days = 30

[metrics]
listen = ""

[entities.product]
table = "product_template"
fields = {{ sku = "default_code", price = "list_price", state = "x_lifecycle_state" }}
publish_when = "row.active && row.x_lifecycle_state == 'approved'"

[targets.wms]
type = "http"
url = "{url}"
entities = ["product"]
initial = "snapshot"
batch_linger_ms = 5
retry_initial_ms = 50
retry_max_ms = 200
timeout_ms = 5000
"#,
        url_db = db.url(),
        db = db.name,
        state = db.state_path().display()
    )
}

fn product(id: u32, state: &str, price: &str) -> String {
    format!(
        "INSERT INTO product_template (id, categ_id, uom_id, uom_po_id, detailed_type, type, default_code, name, list_price, active, tracking, purchase_line_warn, sale_line_warn, x_lifecycle_state) \
         VALUES ({id}, 1, 1, 1, 'product', 'product', 'SKU_{id}', '{{\"en_US\": \"Item {id}\"}}', {price}, true, 'none', 'no-message', 'no-message', '{state}');"
    )
}

/// `steward ARGS` as a second process: exit success, stdout, stderr.
async fn steward(args: &[&str]) -> (bool, String, String) {
    let args: Vec<String> = args.iter().map(std::string::ToString::to_string).collect();
    tokio::task::spawn_blocking(move || {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_steward"))
            .args(&args)
            .output()
            .expect("run steward");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    })
    .await
    .expect("steward task")
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// key → price of the products the target has now (latest version per key).
fn target_products(rx: &Receiver) -> BTreeMap<String, f64> {
    final_state(&rx.accepted_events())
        .into_iter()
        .filter(|((entity, _), _)| entity == "product")
        .map(|((_, key), data)| (key, data["price"].as_f64().unwrap_or(f64::NAN)))
        .collect()
}

fn expect(list: &[(&str, f64)]) -> BTreeMap<String, f64> {
    list.iter().map(|(k, p)| (k.to_string(), *p)).collect()
}

async fn wait_confirmed_past(db: &TestDb, lsn: u64) {
    wait_until("the slot confirms the changes", WAIT, || {
        db.confirmed_flush().is_some_and(|c| c >= lsn)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restored_backup_older_than_the_slot_is_repaired_to_the_current_rows() {
    let db = TestDb::new("backup_restore");
    db.sql("ALTER TABLE product_template ADD COLUMN x_lifecycle_state varchar DEFAULT 'draft'");
    db.sql(
        &[
            product(9001, "approved", "10"),
            product(9002, "approved", "20"),
            product(9003, "approved", "30"),
            product(9004, "approved", "40"),
            product(9005, "draft", "50"),
        ]
        .concat(),
    );
    let rx = Receiver::start().await.unwrap();
    let config_path = db.write_config(&config_text(&db, &rx.url()));
    let config = steward_sinks::config::load(&config_path).unwrap();
    let cfg = config_path.to_str().unwrap().to_string();

    let daemon = InProcess::start(config.clone());
    let initial = expect(&[
        ("9001", 10.0),
        ("9002", 20.0),
        ("9003", 30.0),
        ("9004", 40.0),
    ]);
    wait_until("the initial snapshot is delivered", WAIT, || {
        target_products(&rx) == initial
    })
    .await;
    db.sql("UPDATE product_template SET list_price = 11 WHERE id = 9001");
    wait_until("the stream delivers 9001's new price", WAIT, || {
        target_products(&rx).get("9001") == Some(&11.0)
    })
    .await;

    // A backup while the daemon streams: taken by the daemon itself.
    let backup = db.dir.path().join("backup").join("steward.redb.bak");
    std::fs::create_dir_all(backup.parent().unwrap()).unwrap();
    let dest = backup.to_str().unwrap();
    let (ok, out, err) = steward(&["backup", "-c", &cfg, dest, "--json"]).await;
    assert!(ok, "steward backup failed: {out}{err}");
    let report: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert!(report["checkpoint"].is_string(), "{report}");
    assert_eq!(mode(&backup), 0o600, "the backup is readable by others");
    // A second backup to the same place is refused: nothing is overwritten.
    let before = std::fs::read(&backup).unwrap();
    let (ok, _, err) = steward(&["backup", "-c", &cfg, dest]).await;
    assert!(!ok && err.contains("--force"), "{err}");
    assert_eq!(std::fs::read(&backup).unwrap(), before);

    // Changes after the backup that the daemon stores and confirms to the
    // server but cannot deliver: the restored backup knows nothing of them,
    // and the server never sends them again.
    rx.set_behaviour(Behaviour::Fail(503));
    db.sql("UPDATE product_template SET list_price = 99 WHERE id = 9002");
    db.sql("DELETE FROM product_template WHERE id = 9003");
    db.sql("UPDATE product_template SET x_lifecycle_state = 'draft' WHERE id = 9004");
    db.sql(&product(9006, "approved", "60"));
    db.sql(&product(9007, "draft", "70"));
    db.sql("UPDATE product_template SET list_price = 55 WHERE id = 9005");
    wait_confirmed_past(&db, db.current_wal()).await;
    daemon.stop().await.expect("daemon stops");

    // Restore: copy the backup over the state file, owner-only.
    std::fs::copy(&backup, db.state_path()).unwrap();
    std::fs::set_permissions(db.state_path(), std::fs::Permissions::from_mode(0o600)).unwrap();
    rx.set_behaviour(Behaviour::Ok);
    let daemon = InProcess::start(config.clone());
    let current = expect(&[("9001", 11.0), ("9002", 99.0), ("9006", 60.0)]);
    wait_until("the targets hold exactly the current rows", WAIT, || {
        target_products(&rx) == current
    })
    .await;

    // The stream goes on from the repaired state: a change back to the
    // value the backup knew as delivered is not taken for a no-op.
    db.sql("UPDATE product_template SET list_price = 20 WHERE id = 9002");
    wait_until("9002's price back to 20 reaches the target", WAIT, || {
        target_products(&rx).get("9002") == Some(&20.0)
    })
    .await;

    // Nothing ungoverned: the draft records never reached the target.
    let sent_keys: Vec<String> = rx
        .accepted_events()
        .iter()
        .filter_map(|e| e["subject"].as_str().map(str::to_string))
        .collect();
    for draft in ["9005", "9007"] {
        assert!(
            !sent_keys.iter().any(|k| k == draft),
            "draft product {draft} was sent"
        );
    }

    // The operator sees the repair: in the audit trail and in status.
    let (ok, out, err) = steward(&["audit", "-c", &cfg, "--entity", "product", "--json"]).await;
    assert!(ok, "steward audit failed: {out}{err}");
    let audit: Value = serde_json::from_str(&out).unwrap();
    let records = audit["audit"].as_array().cloned().unwrap_or_default();
    assert!(
        records
            .iter()
            .any(|r| r["decision"] == "restore_repair" && r["target"] == "wms"),
        "no restore_repair record in the audit trail: {audit}"
    );
    assert!(
        records
            .iter()
            .any(|r| r["key"] == "9003" && r["decision"] == "delivered" && r["detail"] == "delete"),
        "the delete of 9003 made by the repair is not in the audit trail: {audit}"
    );
    let (ok, out, err) = steward(&["status", "-c", &cfg, "--json"]).await;
    assert!(ok, "steward status failed: {out}{err}");
    let status: Value = serde_json::from_str(&out).unwrap();
    assert!(
        status["snapshots"].as_array().is_some_and(|l| l
            .iter()
            .any(|s| s["restore"] == true && s["target"] == "wms")),
        "steward status does not show the repair: {status}"
    );
    daemon.stop().await.expect("daemon stops");

    // The mark is gone: the next start does not repair again.
    let store = steward_store::Store::open(&db.state_path()).unwrap();
    assert_eq!(
        store
            .get_meta(steward_store::backup::BACKUP_META)
            .unwrap()
            .as_deref(),
        Some("")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_of_a_stopped_daemon_is_a_private_copy_and_never_overwrites() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state").join("steward.redb");
    let config_path = dir.path().join("steward.toml");
    std::fs::write(
        &config_path,
        format!(
            r#"
[source]
url = "postgres://steward@localhost/odoo"
[state]
path = "{}"
[entities.product]
table = "product_template"
fields = {{ sku = "default_code" }}
[targets.wms]
type = "http"
url = "http://127.0.0.1:9/x"
entities = ["product"]
"#,
            state.display()
        ),
    )
    .unwrap();
    let cfg = config_path.to_str().unwrap().to_string();
    let dest = dir.path().join("copy.redb");
    let dest_s = dest.to_str().unwrap().to_string();

    // No state file yet: nothing to back up, and none is created.
    let (ok, _, err) = steward(&["backup", "-c", &cfg, &dest_s]).await;
    assert!(!ok && err.contains("no state file"), "{err}");
    assert!(!state.exists() && !dest.exists());

    let event = steward_core::model::Event {
        change: None,
        tx_id: None,
        id: "e-1".into(),
        entity: "product".into(),
        key: "1".into(),
        op: steward_core::model::EventOp::Upsert,
        version: 0x50,
        time: "2024-01-01T00:00:00Z".into(),
        data: serde_json::json!({ "sku": "A_1" }).into(),
    };
    {
        let store = steward_store::Store::open(&state).unwrap();
        store
            .commit(steward_core::model::Lsn(0x50), &[("wms", &event)])
            .unwrap();
    }
    // Relative DEST: resolved against the command's working directory.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_steward"))
        .args(["backup", "-c", &cfg, "copy.redb"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("checkpoint 0/50"), "{text}");
    assert!(text.contains("daemon stopped"), "{text}");
    assert_eq!(mode(&dest), 0o600);
    let copy = steward_store::Store::open(&dest).unwrap();
    assert_eq!(copy.backlog("wms").unwrap(), 1);
    assert_eq!(
        copy.read_outbox("wms", None, 10).unwrap()[0].1.key,
        "1",
        "the copy holds the outbox"
    );
    drop(copy);

    std::fs::write(&dest, b"an older backup").unwrap();
    let (ok, _, err) = steward(&["backup", "-c", &cfg, &dest_s]).await;
    assert!(!ok && err.contains("--force"), "{err}");
    assert_eq!(std::fs::read(&dest).unwrap(), b"an older backup");
    let (ok, out, err) = steward(&["backup", "-c", &cfg, &dest_s, "--force"]).await;
    assert!(ok, "{out}{err}");
    assert_eq!(mode(&dest), 0o600);
    assert!(steward_store::Store::open(&dest).is_ok());
    // The state file itself is untouched and usable.
    assert!(steward_store::Store::open(&state).is_ok());
}
