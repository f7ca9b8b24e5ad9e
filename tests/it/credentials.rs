//! Password rotation while streaming: steward re-reads `password_file` on
//! every reconnect, reports a refused password in `steward status` and
//! `/readyz` while it retries, and resumes with nothing lost.

use crate::support;

use std::process::Command;
use std::time::Duration;

use steward_devkit::receiver::Receiver;
use support::{free_port, wait_until, Steward, TestDb};

const WAIT: Duration = Duration::from_secs(60);

fn status_json(config: &std::path::Path) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_steward"))
        .args(["status", "--json", "-c"])
        .arg(config)
        .output()
        .expect("run steward status");
    serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
}

/// `GET /readyz` over a plain socket (callable from the sync polling closures).
fn readyz(port: u16) -> (u16, String) {
    use std::io::{Read, Write};
    let Ok(mut conn) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return (0, String::new());
    };
    let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = conn.write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let mut text = String::new();
    let _ = conn.read_to_string(&mut text);
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, text)
}

fn price_of(wms: &Receiver, key: &str) -> Option<String> {
    wms.accepted_events()
        .iter()
        .rev()
        .find(|e| e["entity"] == "product" && e["subject"].as_str() == Some(key))
        .map(|e| e["data"]["price"].to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_source_password_is_picked_up_from_password_file_without_a_restart() {
    let db = TestDb::new("cred_rotate");
    let role = format!("rot_{}", db.name);
    let (old, new) = ("first-Pa55-a1", "second-Pa55-b2");
    db.sql(&format!(
        "SET password_encryption = 'scram-sha-256';
         CREATE ROLE {role} LOGIN REPLICATION PASSWORD '{old}';
         GRANT SELECT ON ALL TABLES IN SCHEMA public TO {role};
         CREATE PUBLICATION steward_{db} FOR TABLE product_template, res_partner, uom_uom, mrp_workcenter, mrp_bom;",
        db = db.name
    ));
    support::cluster()
        .set_hba(&[
            &format!("host all {role} 127.0.0.1/32 scram-sha-256"),
            &format!("host replication {role} 127.0.0.1/32 scram-sha-256"),
        ])
        .unwrap();
    let password_file = db.dir.path().join("pgpass");
    std::fs::write(&password_file, format!("{old}\n")).unwrap();
    let wms = Receiver::start().await.unwrap();
    let port = free_port();
    let text = db
        .config_text(&[("wms", &wms.url(), &["product"])])
        .replace("postgres://postgres@", &format!("postgres://{role}@"))
        .replace(
            "[state]",
            &format!(
                "password_file = \"{}\"\ncreate_publication = false\n\n[state]",
                password_file.display()
            ),
        );
    let config = db.write_config(&TestDb::with_metrics(&text, port, ""));
    let mut steward = Steward::start(&config, &db.dir.path().join("steward.log"), &[]);
    steward.wait_log("replication started", 1).await;
    db.sql("UPDATE product_template SET list_price = 11.25 WHERE id = 1");
    wait_until("the first change", WAIT, || {
        price_of(&wms, "1").as_deref() == Some("11.25")
    })
    .await;

    // The password changes and the sessions are cut: reconnecting fails.
    db.sql(&format!(
        "ALTER ROLE {role} PASSWORD '{new}';
         SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{role}';"
    ));
    // Changes made meanwhile wait in the slot.
    db.sql("UPDATE product_template SET list_price = 12.50 WHERE id = 2");
    db.sql("UPDATE product_template SET list_price = 13.75 WHERE id = 3");

    wait_until("readyz reports the refused password", WAIT, || {
        let (code, body) = readyz(port);
        code == 503 && body.contains("password authentication failed")
    })
    .await;
    wait_until("status reports the refused password", WAIT, || {
        status_json(&config)["daemon"]["last_source_error"]
            .as_str()
            .is_some_and(|e| e.contains("password authentication failed"))
    })
    .await;
    let (_, body) = readyz(port);
    assert!(
        body.contains("source.password_file"),
        "names the key: {body}"
    );
    assert!(
        steward.running(),
        "a refused password is not fatal:\n{}",
        steward.logs()
    );
    steward
        .wait_log("cannot connect to the source; retrying", 2)
        .await;

    // The new password is written to the file: steward reconnects by itself.
    std::fs::write(&password_file, format!("{new}\n")).unwrap();
    wait_until("the changes made meanwhile arrive", WAIT, || {
        price_of(&wms, "2").as_deref() == Some("12.50")
            && price_of(&wms, "3").as_deref() == Some("13.75")
    })
    .await;
    wait_until("ready again", WAIT, || readyz(port).0 == 200).await;
    db.sql("UPDATE product_template SET list_price = 14.00 WHERE id = 1");
    wait_until("streaming goes on", WAIT, || {
        price_of(&wms, "1").as_deref() == Some("14.00")
    })
    .await;
    assert!(steward.running());
    let (exit, logs) = steward.terminate().await;
    assert!(exit.success(), "exit {exit}; log:\n{logs}");
    assert!(
        !logs.contains(old) && !logs.contains(new),
        "no password in the log"
    );
}

/// What tokio-postgres prints as "db error" reaches logs and status with
/// its SQLSTATE, message, detail and hint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgresql_errors_carry_sqlstate_message_detail_and_hint() {
    let db = TestDb::new("cred_pg_errors");
    let client = db.client().await;
    client
        .batch_execute("CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t VALUES (1)")
        .await
        .unwrap();
    let e = client
        .execute("INSERT INTO t VALUES (1)", &[])
        .await
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "db error",
        "tokio-postgres alone says nothing"
    );
    let text = steward_postgres::describe_pg_error(&e);
    assert!(
        text.starts_with("ERROR 23505: duplicate key value"),
        "{text}"
    );
    assert!(
        text.contains("(detail: Key (id)=(1) already exists.)"),
        "{text}"
    );

    let e = client
        .query("SELECT no_such_function(1)", &[])
        .await
        .unwrap_err();
    let text = steward_postgres::describe_pg_error(&e);
    assert!(
        text.starts_with("ERROR 42883: function no_such_function"),
        "{text}"
    );
    assert!(text.contains("(hint: No function matches"), "{text}");
}
