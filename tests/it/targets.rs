//! Target types against real servers: PostgreSQL (version-guarded upserts,
//! end to end from the Odoo fixture), NATS JetStream (de-duplication on
//! redelivery, subject templates), the NDJSON file target (rotation), the
//! Debezium envelope, and Standard Webhooks signatures on HTTP targets.

use crate::support;

use std::net::TcpListener;
use std::path::Path;
use std::time::Duration;

use base64::Engine as _;
use hmac::{Hmac, KeyInit, Mac};
use serde_json::{json, Value};
use sha2::Sha256;
use steward_core::config::Config;
use steward_core::model::{Event, EventOp, Lsn};
use steward_devkit::receiver::{Receiver, ReceiverTls};
use steward_devkit::tls::TestPki;
use steward_devkit::{DevCluster, DevClusterOptions};
use steward_sinks::{AnySink, Deliver};
use support::{wait_until, InProcess, TestDb};

const WAIT: Duration = Duration::from_secs(30);

/// A config whose source is the test database and whose only target is `target`.
fn config_with(db: &TestDb, target: &str) -> Config {
    let mut text = db.config_text(&[]);
    text.push_str("\n[targets.t]\n");
    text.push_str(target);
    text.push_str("\nbatch_linger_ms = 5\nretry_initial_ms = 50\nretry_max_ms = 500\n");
    db.config(&text)
}

/// A PostgreSQL target of products into `mdm.product` of the test database.
fn mdm_product_sink(db: &TestDb) -> AnySink {
    sink(&config_with(
        db,
        &format!(
            "type = \"postgres\"\nurl = \"{}\"\nentities = [\"product\"]\nschema = \"mdm\"\ncreate_tables = true",
            db.url()
        ),
    ))
}

fn sink(config: &Config) -> AnySink {
    steward_sinks::build(&config.targets[0], config).unwrap_or_else(|e| panic!("sink builds: {e}"))
}

fn event(key: &str, version: u64, op: EventOp, price: &str) -> Event {
    Event {
        change: None,
        tx_id: None,
        id: Event::source_id(Lsn(version), 0),
        entity: "product".into(),
        key: key.into(),
        op,
        version,
        time: "2024-05-01T12:00:00Z".into(),
        data: match op {
            EventOp::Upsert => serde_json::from_str(&format!(
                r#"{{"sku":"SKU-{key}","price":{price},"name":null}}"#
            ))
            .expect("json"),
            EventOp::Delete => json!({ "id": key }).into(),
        },
    }
}

async fn deliver(sink: &mut AnySink, events: &[Event]) {
    sink.deliver(events)
        .await
        .unwrap_or_else(|e| panic!("delivered: {e}"));
}

async fn wait_streaming(db: &TestDb) {
    let slot = format!("steward_{}", db.name);
    wait_until("steward streams from its slot", WAIT, || {
        db.sql(&format!(
            "SELECT 1 FROM pg_replication_slots s JOIN pg_stat_replication r ON r.pid = s.active_pid \
             WHERE s.slot_name = '{slot}' AND r.state = 'streaming'"
        ))
        .lines()
        .any(|l| l.trim() == "1")
    })
    .await;
}

// ------------------------------------------------------------------ postgres

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_rows_never_regress_under_reordering_and_replay() {
    let db = TestDb::new("pg_guard");
    let mut pg = mdm_product_sink(&db);
    let row = |key: &str| {
        db.sql(&format!(
            "SELECT _version, _deleted, price, sku #>> '{{}}', coalesce(name::text, 'NULL') FROM mdm.product WHERE _key = '{key}'"
        ))
        .trim()
        .to_string()
    };

    // v3, then a stale v2, then v3 again (a replay): the row stays at v3.
    deliver(&mut pg, &[event("1", 3, EventOp::Upsert, "3.30")]).await;
    assert_eq!(
        row("1"),
        "3|f|3.30|SKU-1|NULL",
        "field columns; JSON null is NULL"
    );
    deliver(&mut pg, &[event("1", 2, EventOp::Upsert, "2.20")]).await;
    assert_eq!(
        row("1"),
        "3|f|3.30|SKU-1|NULL",
        "a stale event does not regress the row"
    );
    deliver(&mut pg, &[event("1", 3, EventOp::Upsert, "9.99")]).await;
    assert_eq!(
        row("1"),
        "3|f|3.30|SKU-1|NULL",
        "a replay of v3 changes nothing"
    );

    // One batch, several versions of a key out of order: the newest wins.
    deliver(
        &mut pg,
        &[
            event("2", 7, EventOp::Upsert, "7"),
            event("2", 9, EventOp::Upsert, "9"),
            event("2", 8, EventOp::Upsert, "8"),
            event("1", 4, EventOp::Upsert, "4.40"),
        ],
    )
    .await;
    assert_eq!(row("2"), "9|f|9|SKU-2|NULL");
    assert_eq!(row("1"), "4|f|4.40|SKU-1|NULL");

    // Soft delete (the default) keeps a tombstone that a stale upsert cannot undo.
    deliver(&mut pg, &[event("1", 5, EventOp::Delete, "")]).await;
    assert_eq!(
        row("1"),
        "5|t|4.40|SKU-1|NULL",
        "marked deleted, last data kept"
    );
    deliver(&mut pg, &[event("1", 4, EventOp::Upsert, "4.40")]).await;
    assert_eq!(
        row("1"),
        "5|t|4.40|SKU-1|NULL",
        "stale upsert after delete is ignored"
    );
    deliver(&mut pg, &[event("1", 6, EventOp::Upsert, "6")]).await;
    assert_eq!(row("1"), "6|f|6|SKU-1|NULL", "a newer upsert re-creates it");
    assert_eq!(
        db.sql("SELECT _updated_at = '2024-05-01T12:00:00Z' FROM mdm.product WHERE _key = '1'")
            .trim(),
        "t",
        "the commit time lands in _updated_at"
    );

    // Hard deletes keep a tombstone in <table>__deleted.
    let config = config_with(
        &db,
        &format!(
            "type = \"postgres\"\nurl = \"{}\"\nentities = [\"product\"]\nschema = \"hard\"\ncreate_tables = true\ndelete_mode = \"delete\"",
            db.url()
        ),
    );
    let mut hard = sink(&config);
    deliver(&mut hard, &[event("5", 3, EventOp::Upsert, "3")]).await;
    deliver(&mut hard, &[event("5", 4, EventOp::Delete, "")]).await;
    let count = || {
        db.sql("SELECT count(*) FROM hard.product")
            .trim()
            .to_string()
    };
    assert_eq!(count(), "0", "the row is gone");
    deliver(&mut hard, &[event("5", 3, EventOp::Upsert, "3")]).await;
    assert_eq!(
        count(),
        "0",
        "a replayed stale upsert does not resurrect it"
    );
    assert_eq!(
        db.sql("SELECT _version, _deleted_at = '2024-05-01T12:00:00Z' FROM hard.product__deleted WHERE _key = '5'")
            .trim(),
        "4|t"
    );
    deliver(&mut hard, &[event("5", 5, EventOp::Upsert, "5")]).await;
    assert_eq!(count(), "1", "a newer upsert brings it back");
}

/// The documents travel as binary jsonb: every kind of JSON value must land
/// in `data` and the field columns exactly as the server's own parse of the
/// same text, for several rows of one batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_columns_equal_the_server_parse_of_each_document() {
    let db = TestDb::new("pg_jsonb");
    let mut pg = mdm_product_sink(&db);
    let docs = [
        r#"{"sku":"Ünïcødé \"quoted\" \\ back\nline \u00e9 \ud83d\ude00","price":12345678901234567890.123456789,"name":{"en_US":"x","fr_FR":null},"active":true,"extra":[1,2,{"a":[]}]}"#,
        r#"{"sku":"","price":-1.5e-7,"name":"plain","active":false,"uom_id":null}"#,
        r#"{"price":0,"name":[],"active":null}"#,
    ];
    let events: Vec<Event> = docs
        .iter()
        .enumerate()
        .map(|(i, doc)| {
            let mut e = event(&format!("k{i}"), 10 + i as u64, EventOp::Upsert, "0");
            e.data = serde_json::from_str(doc).expect("json");
            e
        })
        .collect();
    deliver(&mut pg, &events).await;
    for (i, doc) in docs.iter().enumerate() {
        let literal = doc.replace('\'', "''");
        let check = db.sql(&format!(
            "SELECT data = '{literal}'::jsonb, \
             sku IS NOT DISTINCT FROM NULLIF('{literal}'::jsonb -> 'sku', 'null'), \
             price IS NOT DISTINCT FROM NULLIF('{literal}'::jsonb -> 'price', 'null'), \
             name IS NOT DISTINCT FROM NULLIF('{literal}'::jsonb -> 'name', 'null'), \
             active IS NOT DISTINCT FROM NULLIF('{literal}'::jsonb -> 'active', 'null'), \
             uom_id IS NULL \
             FROM mdm.product WHERE _key = 'k{i}'"
        ));
        assert_eq!(check.trim(), "t|t|t|t|t|t", "document {i}: {doc}");
    }
    assert_eq!(
        db.sql("SELECT price::text FROM mdm.product WHERE _key = 'k0'")
            .trim(),
        "12345678901234567890.123456789",
        "numerics stay exact"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_errors_name_the_table_and_the_fix() {
    let db = TestDb::new("pg_errors");
    let config = config_with(
        &db,
        &format!(
            "type = \"postgres\"\nurl = \"{}\"\nentities = [\"product\"]\ntable_prefix = \"missing_\"",
            db.url()
        ),
    );
    let mut pg = sink(&config);
    let e = pg
        .deliver(&[event("1", 3, EventOp::Upsert, "1")])
        .await
        .expect_err("no table and create_tables = false");
    // Retried, not dead-lettered: the events are fine, the target needs a fix.
    assert!(e.retryable, "{e}");
    assert!(e.message.contains("public.missing_product"), "{e}");
    assert!(e.message.contains("create_tables = true"), "{e}");

    // Nothing listens: retryable.
    let port = free_port();
    let config = config_with(
        &db,
        &format!(
            "type = \"postgres\"\nurl = \"postgres://postgres@127.0.0.1:{port}/x?connect_timeout=2\"\nentities = [\"product\"]"
        ),
    );
    let e = sink(&config)
        .deliver(&[event("1", 3, EventOp::Upsert, "1")])
        .await
        .expect_err("nothing listens");
    assert!(e.retryable, "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_target_mirrors_the_odoo_products_end_to_end() {
    let db = TestDb::new("pg_e2e");
    let config = config_with(
        &db,
        &format!(
            "type = \"postgres\"\nurl = \"{}\"\nentities = [\"product\", \"partner\"]\nschema = \"mdm\"\ncreate_tables = true\nbatch_max_events = 1000",
            db.url()
        ),
    );
    let daemon = InProcess::start(config);
    wait_streaming(&db).await;

    // steward streams changes only: touch every product so each is delivered,
    // then insert, update and delete some.
    db.sql("UPDATE product_template SET write_date = now()");
    db.sql(
        "INSERT INTO product_template (id, categ_id, uom_id, uom_po_id, detailed_type, type, default_code, name, list_price, active, tracking, purchase_line_warn, sale_line_warn) \
         VALUES (9001, 1, 1, 1, 'product', 'product', 'FURN_9001', '{\"en_US\": \"Standing Desk\"}', 749.9000, true, 'none', 'no-message', 'no-message'), \
                (9002, 1, 1, 1, 'product', 'product', 'FURN_9002', '{\"en_US\": \"Lamp\"}', 12345678901234567890.123456789, true, 'none', 'no-message', 'no-message')",
    );
    db.sql("UPDATE product_template SET list_price = 801.50 WHERE id = 9001");
    db.sql("DELETE FROM product_template WHERE id = 9002");

    let source = || {
        db.sql("SELECT id, default_code, list_price, name->>'en_US', active::text FROM product_template ORDER BY id")
    };
    let target = || {
        db.sql(
            "SELECT _key, sku #>> '{}', price #>> '{}', name #>> '{}', active #>> '{}' \
             FROM mdm.product WHERE NOT _deleted ORDER BY _key::int",
        )
    };
    let expected = source();
    assert!(
        expected.lines().count() > 3,
        "the fixture has products: {expected}"
    );
    wait_until("the target table equals product_template", WAIT, || {
        db.sql("SELECT to_regclass('mdm.product') IS NOT NULL")
            .trim()
            == "t"
            && target() == expected
    })
    .await;
    assert!(expected.contains("801.50"), "{expected}");
    assert_eq!(
        db.sql("SELECT _deleted FROM mdm.product WHERE _key = '9002'")
            .trim(),
        "t",
        "the deleted product is a soft-deleted tombstone"
    );
    daemon.stop().await.expect("clean stop");
}

// ---------------------------------------------------------------------- nats

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

struct NatsServer {
    child: std::process::Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn start_nats() -> Option<NatsServer> {
    start_nats_with(&[]).await
}

/// nats-server with JetStream and `extra` arguments (e.g. `--auth TOKEN`).
async fn start_nats_with(extra: &[&str]) -> Option<NatsServer> {
    let bin = Path::new("/usr/sbin/nats-server");
    if !bin.exists() {
        println!("SKIPPED: /usr/sbin/nats-server is not installed (apt-get install nats-server)");
        return None;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let child = std::process::Command::new(bin)
        .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
        .arg(dir.path())
        .args(extra)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start nats-server");
    let server = NatsServer {
        child,
        url: format!("nats://127.0.0.1:{port}"),
        _dir: dir,
    };
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Some(server);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("nats-server did not listen on {port}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_jetstream_deduplicates_redelivered_batches() {
    let Some(nats) = start_nats().await else {
        return;
    };
    let db = TestDb::new("nats");
    let config = config_with(
        &db,
        &format!(
            "type = \"nats\"\nurl = \"{}\"\nentities = [\"product\"]\nstream = \"STEWARD\"\ncreate_stream = true\nsubject = \"steward.{{target}}.{{entity}}.{{key}}\"",
            nats.url
        ),
    );
    let mut sink = sink(&config);
    let batch = vec![
        event("1", 10, EventOp::Upsert, "1"),
        event("a.b", 11, EventOp::Upsert, "2"),
        event("1", 12, EventOp::Delete, ""),
    ];
    deliver(&mut sink, &batch).await;
    // A redelivery of the same batch (e.g. after a crash before the ack was stored).
    deliver(&mut sink, &batch).await;

    let client = async_nats::connect(&nats.url).await.expect("connect");
    let js = async_nats::jetstream::new(client);
    let mut stream = js.get_stream("STEWARD").await.expect("stream exists");
    let info = stream.info().await.expect("info");
    assert_eq!(
        info.state.messages, 3,
        "duplicates were dropped by JetStream"
    );
    assert_eq!(
        info.config.duplicate_window,
        Duration::from_secs(120),
        "default duplicate window"
    );

    let consumer = stream
        .create_consumer(async_nats::jetstream::consumer::pull::Config::default())
        .await
        .expect("consumer");
    use futures_util::StreamExt;
    let mut messages = consumer
        .fetch()
        .max_messages(10)
        .expires(Duration::from_secs(1))
        .messages()
        .await
        .expect("fetch");
    let mut got = Vec::new();
    while let Some(m) = messages.next().await {
        let m = m.expect("message");
        let id = m
            .headers
            .as_ref()
            .and_then(|h| h.get(async_nats::header::NATS_MESSAGE_ID))
            .map(std::string::ToString::to_string)
            .unwrap_or_else(|| panic!("Nats-Msg-Id on {} {:?}", m.subject, m.headers));
        let body: Value = serde_json::from_slice(&m.payload).expect("json");
        got.push((m.subject.to_string(), id, body));
        m.ack().await.expect("ack");
    }
    assert_eq!(got.len(), 3, "each event received once: {got:#?}");
    assert_eq!(got[0].0, "steward.t.product.1");
    assert_eq!(
        got[1].0, "steward.t.product.a%2Eb",
        "dots in keys are escaped"
    );
    assert_eq!(got[2].0, "steward.t.product.1");
    for ((_, id, body), ev) in got.iter().zip(&batch) {
        assert_eq!(id, &ev.id);
        assert_eq!(body["id"], ev.id.as_str(), "CloudEvents payload");
        assert_eq!(body["op"], ev.op.as_str());
    }
}

/// What JetStream answers besides an ack reaches the operator as a retryable
/// error naming the event: no stream for the subject, a stream that refuses
/// the message; and once the cause is fixed the same sink delivers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_refusals_are_retryable_errors_that_name_the_event() {
    let Some(nats) = start_nats().await else {
        return;
    };
    let db = TestDb::new("nats_refusals");
    let mut sink = sink(&config_with(
        &db,
        &format!(
            "type = \"nats\"\nurl = \"{}\"\nentities = [\"product\"]\nsubject = \"mdm.{{entity}}\"\ntimeout_ms = 3000",
            nats.url
        ),
    ));
    let batch: Vec<Event> = (1..=3)
        .map(|k| event(&k.to_string(), 20 + k, EventOp::Upsert, "1"))
        .collect();

    let e = sink.deliver(&batch).await.expect_err("no stream yet");
    println!("no stream: {e}");
    assert!(e.retryable, "{e}");
    assert!(e.message.contains(&batch[0].id), "{e}");
    assert!(e.message.contains("no JetStream stream captures"), "{e}");

    // A stream that takes one message and refuses the rest.
    let client = async_nats::connect(&nats.url).await.expect("connect");
    let js = async_nats::jetstream::new(client);
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "MDM".into(),
        subjects: vec!["mdm.>".into()],
        max_messages: 1,
        discard: async_nats::jetstream::stream::DiscardPolicy::New,
        ..Default::default()
    })
    .await
    .expect("stream");
    let e = sink.deliver(&batch).await.expect_err("stream full");
    println!("stream full: {e}");
    assert!(e.retryable, "{e}");
    assert!(e.message.contains(&batch[1].id), "{e}");
    assert!(e.message.contains("maximum messages"), "{e}");

    let mut stream = js.get_stream("MDM").await.expect("stream");
    let mut config = stream.info().await.expect("info").config.clone();
    config.max_messages = -1;
    js.update_stream(config).await.expect("room");
    deliver(&mut sink, &batch).await;
    assert_eq!(
        stream.info().await.expect("info").state.messages,
        3,
        "the first message once, then the other two"
    );
}

// ---------------------------------------------------------------------- file

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_target_rotates_by_size_and_keeps_whole_lines() {
    let db = TestDb::new("file_rotation");
    let out = db.dir.path().join("out");
    std::fs::create_dir(&out).expect("dir");
    let path = out.join("events.ndjson");
    let config = config_with(
        &db,
        &format!(
            "type = \"file\"\npath = \"{}\"\nentities = [\"product\"]\nmax_bytes = 2048\nmax_files = 2\nenvelope = \"debezium\"",
            path.display()
        ),
    );
    let mut sink = sink(&config);
    // 20 batches of 3 events (~1.2 KiB per batch): several rotations.
    for b in 0..20u64 {
        let batch: Vec<Event> = (0..3)
            .map(|i| {
                event(
                    &format!("{}", b * 3 + i),
                    100 + b * 3 + i,
                    EventOp::Upsert,
                    "1.5",
                )
            })
            .collect();
        deliver(&mut sink, &batch).await;
    }
    let rotated = |n: u32| out.join(format!("events.ndjson.{n}"));
    assert!(path.exists() && rotated(1).exists() && rotated(2).exists());
    assert!(
        !rotated(3).exists(),
        "only max_files rotated files are kept"
    );
    let mut keys = Vec::new();
    for file in [rotated(2), rotated(1), path.clone()] {
        let text = std::fs::read_to_string(&file).expect("read");
        assert!(text.ends_with('\n'));
        assert!(
            text.len() <= 2048,
            "{} is {} bytes",
            file.display(),
            text.len()
        );
        for line in text.lines() {
            let v: Value = serde_json::from_str(line).expect("each line is one JSON event");
            keys.push(
                v["source"]["key"]
                    .as_str()
                    .expect("key")
                    .parse::<u64>()
                    .expect("n"),
            );
        }
    }
    let last = *keys.last().expect("lines");
    assert_eq!(
        last, 59,
        "the newest event is at the end of the active file"
    );
    let expected: Vec<u64> = (keys[0]..=59).collect();
    assert_eq!(
        keys, expected,
        "the kept files hold a gap-free, ordered tail"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debezium_envelope_shape() {
    let db = TestDb::new("debezium");
    let path = db.dir.path().join("dbz.ndjson");
    let config = config_with(
        &db,
        &format!(
            "type = \"file\"\npath = \"{}\"\nentities = [\"product\"]\nenvelope = \"debezium\"",
            path.display()
        ),
    );
    let mut sink = sink(&config);
    deliver(
        &mut sink,
        &[
            event(
                "7",
                0x16B3748,
                EventOp::Upsert,
                "12345678901234567890.123456789",
            ),
            event("7", 0x16B3750, EventOp::Delete, ""),
        ],
    )
    .await;
    let text = std::fs::read_to_string(&path).expect("read");
    assert!(
        text.contains("12345678901234567890.123456789"),
        "exact numbers: {text}"
    );
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect();
    assert_eq!(lines.len(), 2);
    let (u, d) = (&lines[0], &lines[1]);
    let mut top: Vec<&str> = u
        .as_object()
        .expect("object")
        .keys()
        .map(String::as_str)
        .collect();
    top.sort();
    assert_eq!(top, ["after", "before", "op", "source", "ts_ms"]);
    assert_eq!(u["op"], "u");
    assert!(u["before"].is_null());
    assert_eq!(u["after"]["sku"], "SKU-7");
    assert_eq!(d["op"], "d");
    assert!(d["after"].is_null());
    assert_eq!(
        d["before"]["id"], "7",
        "deletes carry the key fields in before"
    );
    let s = &u["source"];
    assert_eq!(s["connector"], "steward");
    assert_eq!(s["name"], format!("steward_{}", db.name));
    assert_eq!(s["db"], db.name.as_str());
    assert_eq!(s["schema"], "public");
    assert_eq!(s["table"], "product_template");
    assert_eq!(s["lsn"], 0x16B3748u64);
    assert_eq!(s["ts_ms"], 1714564800000i64);
    assert!(s["txId"].is_null());
    assert_eq!(s["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(s["event_id"], Event::source_id(Lsn(0x16B3748), 0).as_str());
    assert!(u["ts_ms"].as_i64().expect("ts_ms") >= 1714564800000);
}

// ------------------------------------------------------------------ webhooks

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_batches_carry_a_verifiable_standard_webhooks_signature() {
    let db = TestDb::new("webhook");
    let receiver = Receiver::start().await.expect("receiver");
    let key_bytes = b"0123456789abcdef0123456789abcdef";
    let secret_file = db.dir.path().join("wms.whsec");
    std::fs::write(
        &secret_file,
        format!(
            "whsec_{}\n",
            base64::engine::general_purpose::STANDARD.encode(key_bytes)
        ),
    )
    .expect("secret");
    let token_file = db.dir.path().join("wms.token");
    std::fs::write(&token_file, "tok-123\n").expect("token");
    let config = config_with(
        &db,
        &format!(
            "type = \"http\"\nurl = \"{}\"\nentities = [\"product\"]\nsigning_secret_file = \"{}\"\nbearer_token_file = \"{}\"",
            receiver.url(),
            secret_file.display(),
            token_file.display()
        ),
    );
    let mut sink = sink(&config);
    let batch = vec![
        event("1", 10, EventOp::Upsert, "1"),
        event("2", 11, EventOp::Upsert, "2"),
    ];
    deliver(&mut sink, &batch).await;
    deliver(&mut sink, &batch[..1]).await;

    let requests = receiver.requests();
    assert_eq!(requests.len(), 2);
    for (req, expected_id) in requests.iter().zip([
        format!("{}..{}", batch[0].id, batch[1].id),
        batch[0].id.clone(),
    ]) {
        let header = |n: &str| {
            req.headers
                .iter()
                .find(|(k, _)| k == n)
                .map(|(_, v)| v.clone())
                .unwrap_or_else(|| panic!("header {n}"))
        };
        let id = header("webhook-id");
        let ts = header("webhook-timestamp");
        assert_eq!(id, expected_id);
        let now = chrono::Utc::now().timestamp();
        let ts_num: i64 = ts.parse().expect("unix seconds");
        assert!((now - ts_num).abs() < 60, "fresh timestamp");
        // Verified independently of steward's code.
        let mut mac = Hmac::<Sha256>::new_from_slice(key_bytes).expect("key");
        mac.update(format!("{id}.{ts}.").as_bytes());
        mac.update(&req.body);
        let expected = format!(
            "v1,{}",
            base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
        );
        assert_eq!(header("webhook-signature"), expected);
        assert_eq!(header("authorization"), "Bearer tok-123");
    }
    assert_eq!(receiver.accepted_count(), 3);
}

// ----------------------------------------------------------------- TLS, auth

fn pki(db: &TestDb) -> TestPki {
    let dir = db.dir.path().join("pki");
    std::fs::create_dir(&dir).expect("pki dir");
    TestPki::generate(&dir).unwrap_or_else(|e| panic!("{e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_target_needs_its_ca_file_and_loses_nothing_until_it_is_given() {
    let db = TestDb::new("https_ca");
    let pki = pki(&db);
    let wms = Receiver::start_tls(ReceiverTls {
        cert: pki.server_cert.clone(),
        key: pki.server_key.clone(),
        client_ca: None,
    })
    .await
    .expect("https receiver");
    assert!(wms.url().starts_with("https://127.0.0.1:"));
    let target = |extra: &str| {
        format!(
            "type = \"http\"\nurl = \"{}\"\nentities = [\"product\"]\ninitial = \"none\"\n{extra}",
            wms.url()
        )
    };

    // Without ca_file the receiver's certificate is not trusted: a clear,
    // retryable error (the events wait in the outbox).
    let config = config_with(&db, &target(""));
    let e = sink(&config)
        .deliver(&[event("1", 3, EventOp::Upsert, "1")])
        .await
        .expect_err("an untrusted certificate is refused");
    assert!(e.retryable, "{e}");
    assert!(e.message.contains("certificate"), "{e}");
    assert!(
        e.message.contains("set targets.t.ca_file"),
        "names the fix: {e}"
    );
    assert!(e.message.contains(&wms.url()), "names the target: {e}");
    let daemon = InProcess::start(config);
    wait_streaming(&db).await;
    db.sql("UPDATE product_template SET list_price = 4.50 WHERE id = 1");
    wait_until("several refused handshakes", WAIT, || {
        wms.tls_failures().len() >= 3
    })
    .await;
    daemon.stop().await.expect("clean stop");
    assert_eq!(wms.accepted_count(), 0);
    {
        let store = steward_store::Store::open(&db.state_path()).expect("store");
        let stats = store.target_stats("t").expect("stats");
        assert_eq!(stats.backlog, 1, "the event waits in the outbox");
        let err = stats
            .last_error
            .expect("the error is recorded for steward status");
        assert!(err.contains("certificate"), "{err}");
    }

    // Fixed: with the CA the waiting event arrives.
    let config = config_with(
        &db,
        &target(&format!("ca_file = \"{}\"", pki.ca_cert.display())),
    );
    let daemon = InProcess::start(config);
    assert_eq!(wms.wait_for_events(1, WAIT).await, 1);
    daemon.stop().await.expect("clean stop");
    assert_eq!(
        wms.accepted_events()[0]["data"]["price"].to_string(),
        "4.50"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_target_presents_its_client_certificate_to_a_server_requiring_one() {
    let db = TestDb::new("https_mtls");
    let pki = pki(&db);
    let wms = Receiver::start_tls(ReceiverTls {
        cert: pki.server_cert.clone(),
        key: pki.server_key.clone(),
        client_ca: Some(pki.ca_cert.clone()),
    })
    .await
    .expect("https receiver");
    let target = |extra: &str| {
        format!(
            "type = \"http\"\nurl = \"{}\"\nentities = [\"product\"]\nca_file = \"{}\"\n{extra}",
            wms.url(),
            pki.ca_cert.display()
        )
    };
    let batch = [event("1", 3, EventOp::Upsert, "1")];

    let without = config_with(&db, &target(""));
    // Under TLS 1.3 the server's "certificate required" alert can race the
    // request, and the client then only sees the connection close: either
    // way the error names the setting (a conditional hint for the close).
    // Each failure is retried by the driver; it must appear within five.
    let mut errors = Vec::new();
    for _ in 0..5 {
        let e = sink(&without)
            .deliver(&batch)
            .await
            .expect_err("no client certificate");
        println!("without a client certificate: {e}");
        assert!(e.retryable, "{e}");
        let named = e.message.contains("set targets.t.client_cert_file");
        errors.push(e.message);
        if named {
            break;
        }
    }
    assert!(
        errors
            .last()
            .is_some_and(|m| m.contains("set targets.t.client_cert_file")),
        "says what is missing: {errors:?}"
    );
    // The receiver notes the failed handshake on its own task, which may
    // run after the client has already read the alert.
    let noted = |r: &Receiver| {
        r.tls_failures()
            .iter()
            .any(|f| f.to_lowercase().contains("certificate"))
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !noted(&wms) && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(noted(&wms), "{:?}", wms.tls_failures());
    assert_eq!(wms.accepted_count(), 0);

    let with = config_with(
        &db,
        &target(&format!(
            "client_cert_file = \"{}\"\nclient_key_file = \"{}\"",
            pki.client_cert.display(),
            pki.client_key.display()
        )),
    );
    deliver(&mut sink(&with), &batch).await;
    assert_eq!(wms.accepted_count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_target_over_verify_full_tls_with_a_password_file() {
    let db = TestDb::new("pg_tls");
    let tls = DevCluster::start(DevClusterOptions {
        ssl: true,
        ..Default::default()
    })
    .expect("TLS cluster");
    tls.create_database("mdm").expect("database");
    let password = "Wr1ter-pw-7f3c";
    tls.psql(
        "postgres",
        &format!(
            "CREATE ROLE writer LOGIN PASSWORD '{password}'; GRANT ALL ON DATABASE mdm TO writer;"
        ),
    )
    .expect("role");
    // The writer may only come in over TLS, with its password.
    tls.set_hba(&[
        "hostssl all writer 127.0.0.1/32 scram-sha-256",
        "host all writer 127.0.0.1/32 reject",
    ])
    .expect("hba");
    let ca = tls.ssl_ca_path().expect("CA").display().to_string();
    let secret = db.dir.path().join("writer.password");
    std::fs::write(&secret, format!("{password}\n")).expect("password file");
    let target = |query: &str, password_file: &Path| {
        format!(
            "type = \"postgres\"\nurl = \"postgres://writer@localhost:{}/mdm?{query}\"\n\
             password_file = \"{}\"\nentities = [\"product\"]\nschema = \"mdm\"\ncreate_tables = true",
            tls.port(),
            password_file.display()
        )
    };
    let verify = format!("sslmode=verify-full&sslrootcert={ca}");

    let mut pg = sink(&config_with(&db, &target(&verify, &secret)));
    deliver(
        &mut pg,
        &[
            event("1", 3, EventOp::Upsert, "3.30"),
            event("2", 4, EventOp::Upsert, "4.40"),
        ],
    )
    .await;
    assert_eq!(
        tls.psql("mdm", "SELECT _key, price FROM mdm.product ORDER BY _key")
            .expect("rows")
            .trim(),
        "1|3.30\n2|4.40"
    );
    assert_eq!(
        tls.psql(
            "mdm",
            "SELECT bool_and(s.ssl) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) WHERE a.usename = 'writer'"
        )
        .expect("ssl")
        .trim(),
        "t",
        "the target's connection uses TLS"
    );
    drop(pg);

    // A wrong password: a clear error that does not show either password.
    let wrong = db.dir.path().join("wrong.password");
    std::fs::write(&wrong, "not-the-password\n").expect("file");
    let e = sink(&config_with(&db, &target(&verify, &wrong)))
        .deliver(&[event("1", 5, EventOp::Upsert, "5")])
        .await
        .expect_err("wrong password");
    println!("wrong password: {e}");
    assert!(e.message.contains("password authentication failed"), "{e}");
    assert!(
        e.message.contains("targets.t.password_file"),
        "names the key: {e}"
    );
    assert!(
        !e.message.contains("source"),
        "a target, not the source: {e}"
    );
    assert!(
        !e.message.contains("not-the-password") && !e.message.contains(password),
        "{e}"
    );

    // verify-full without the CA: the server's certificate is not trusted.
    let e = sink(&config_with(&db, &target("sslmode=verify-full", &secret)))
        .deliver(&[event("1", 5, EventOp::Upsert, "5")])
        .await
        .expect_err("untrusted certificate");
    println!("without sslrootcert: {e}");
    assert!(e.message.to_lowercase().contains("certificate"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_target_authenticates_with_a_token_or_user_and_password_and_fails_clearly() {
    let db = TestDb::new("nats_auth");
    let nats_target = |url: &str, auth: &str| {
        format!(
            "type = \"nats\"\nurl = \"{url}\"\nentities = [\"product\"]\nstream = \"STEWARD\"\ncreate_stream = true\n\
             subject = \"steward.{{entity}}.{{key}}\"\nconnect_timeout_ms = 2000\n{auth}"
        )
    };
    let write = |name: &str, text: &str| {
        let path = db.dir.path().join(name);
        std::fs::write(&path, format!("{text}\n")).expect("secret file");
        path.display().to_string()
    };
    let batch = [event("1", 3, EventOp::Upsert, "1")];

    // Token.
    let token = "tok-5b7e1c";
    let Some(nats) = start_nats_with(&["--auth", token]).await else {
        return;
    };
    let right = write("nats.token", token);
    let wrong = write("wrong.token", "tok-wrong-0000");
    deliver(
        &mut sink(&config_with(
            &db,
            &nats_target(&nats.url, &format!("token_file = \"{right}\"")),
        )),
        &batch,
    )
    .await;
    for auth in [format!("token_file = \"{wrong}\""), String::new()] {
        let e = sink(&config_with(&db, &nats_target(&nats.url, &auth)))
            .deliver(&batch)
            .await
            .expect_err("refused");
        println!("nats token {auth:?}: {e}");
        assert!(
            e.message.contains("check the URL and the credentials"),
            "{e}"
        );
        assert!(!e.retryable, "{e}");
        assert!(!e.message.contains("tok-"), "no token in the message: {e}");
    }
    drop(nats);

    // User and password.
    let Some(nats) = start_nats_with(&["--user", "steward", "--pass", "pw-91d2aa"]).await else {
        return;
    };
    let right = write("nats.password", "pw-91d2aa");
    let wrong = write("wrong.password", "pw-wrong-00");
    deliver(
        &mut sink(&config_with(
            &db,
            &nats_target(
                &nats.url,
                &format!("user = \"steward\"\npassword_file = \"{right}\""),
            ),
        )),
        &batch,
    )
    .await;
    let e = sink(&config_with(
        &db,
        &nats_target(
            &nats.url,
            &format!("user = \"steward\"\npassword_file = \"{wrong}\""),
        ),
    ))
    .deliver(&batch)
    .await
    .expect_err("refused");
    println!("nats wrong password: {e}");
    assert!(
        e.message.contains("check the URL and the credentials"),
        "{e}"
    );
    assert!(
        !e.message.contains("pw-"),
        "no password in the message: {e}"
    );

    // What arrived: the two accepted batches, one per server (the second
    // server has its own stream).
    let client = async_nats::ConnectOptions::new()
        .user_and_password("steward".into(), "pw-91d2aa".into())
        .connect(&nats.url)
        .await
        .expect("connect");
    let js = async_nats::jetstream::new(client);
    let mut stream = js.get_stream("STEWARD").await.expect("stream");
    assert_eq!(stream.info().await.expect("info").state.messages, 1);
}

// ------------------------------------------------------------ debezium, http

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debezium_over_http_snapshot_insert_update_delete_end_to_end() {
    let db = TestDb::new("dbz_http");
    let wms = Receiver::start().await.expect("receiver");
    wms.accept_any_json(true);
    // initial = snapshot (the default): existing products first, as "r".
    let config = config_with(
        &db,
        &format!(
            "type = \"http\"\nurl = \"{}\"\nentities = [\"product\"]\nenvelope = \"debezium\"",
            wms.url()
        ),
    );
    let products: usize = db
        .sql("SELECT count(*) FROM product_template")
        .trim()
        .parse()
        .expect("count");
    let daemon = InProcess::start(config);
    assert_eq!(wms.wait_for_events(products, WAIT).await, products);
    wait_streaming(&db).await;

    let xid = |sql: &str| -> u64 {
        db.sql(&format!("{sql} RETURNING txid_current() % 4294967296"))
            .trim()
            .parse()
            .expect("xid")
    };
    let x_insert = xid(
        "INSERT INTO product_template (id, categ_id, uom_id, uom_po_id, detailed_type, type, default_code, name, list_price, active, tracking, purchase_line_warn, sale_line_warn) \
         VALUES (9001, 1, 1, 1, 'product', 'product', 'DBZ-1', '{\"en_US\": \"Debezium Desk\"}', 10.50, true, 'none', 'no-message', 'no-message')",
    );
    let x_update = xid("UPDATE product_template SET list_price = 11.25 WHERE id = 9001");
    let x_delete = xid("DELETE FROM product_template WHERE id = 9001");
    assert_eq!(wms.wait_for_events(products + 3, WAIT).await, products + 3);
    daemon.stop().await.expect("clean stop");

    let requests = wms.requests();
    let content_type = requests[0]
        .headers
        .iter()
        .find(|(k, _)| k == "content-type")
        .map(|(_, v)| v.clone());
    assert_eq!(content_type.as_deref(), Some("application/json"));
    let events = wms.accepted_events();
    // What a Debezium consumer reads: op, before/after, source.{lsn, txId, table, snapshot}, ts_ms.
    for e in &events[..products] {
        assert_eq!(e["op"], "r", "{e}");
        assert!(e["before"].is_null() && e["after"].is_object(), "{e}");
        assert_eq!(e["source"]["snapshot"], "true");
        assert!(e["source"]["txId"].is_null());
    }
    let live = &events[products..];
    let ops: Vec<&str> = live.iter().map(|e| e["op"].as_str().expect("op")).collect();
    assert_eq!(ops, ["c", "u", "d"]);
    let (c, u, d) = (&live[0], &live[1], &live[2]);
    assert!(c["before"].is_null());
    assert_eq!(c["after"]["sku"], "DBZ-1");
    assert_eq!(c["after"]["price"].to_string(), "10.50", "exact numbers");
    assert_eq!(u["after"]["price"].to_string(), "11.25");
    assert!(d["after"].is_null());
    assert_eq!(
        d["before"]["id"], 9001,
        "a delete carries the key in before"
    );
    let mut lsns = Vec::new();
    for (e, x) in live.iter().zip([x_insert, x_update, x_delete]) {
        let s = &e["source"];
        assert_eq!(s["connector"], "steward");
        assert_eq!(s["db"], db.name.as_str());
        assert_eq!(s["schema"], "public");
        assert_eq!(s["table"], "product_template");
        assert_eq!(s["snapshot"], "false");
        assert_eq!(s["txId"], x, "the source transaction id: {e}");
        assert!(s["ts_ms"].as_i64().expect("commit time") > 1_600_000_000_000);
        assert!(e["ts_ms"].as_i64().expect("ts_ms") >= s["ts_ms"].as_i64().unwrap());
        lsns.push(s["lsn"].as_u64().expect("lsn"));
    }
    assert!(
        lsns.windows(2).all(|w| w[0] < w[1]),
        "commit LSNs ascend: {lsns:?}"
    );
}
