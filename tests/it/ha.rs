//! High availability: a failover slot (PostgreSQL 17) that survives the
//! promotion of a standby, with steward following the primary through a
//! multi-host `source.url`; and decoding from a hot standby (PostgreSQL 16+)
//! with heartbeats written on the primary.

use crate::support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use steward_devkit::receiver::Receiver;
use steward_devkit::{DevCluster, DevClusterOptions};
use support::{daemon_status, target_prices, wait_until, InProcess, TestDb};

const WAIT: Duration = Duration::from_secs(180);
const PRODUCTS: u32 = 40;

fn leak(cluster: DevCluster) -> &'static DevCluster {
    support::init_logging();
    // Leaked like the shared cluster: TestDb needs it for the whole test,
    // and its supervisor removes it when the test binary exits.
    Box::leak(Box::new(cluster))
}

fn add_products(db: &TestDb) {
    db.sql(&format!(
        "INSERT INTO product_template (id, categ_id, uom_id, uom_po_id, detailed_type, type, default_code, name, list_price, active, tracking, purchase_line_warn, sale_line_warn) \
         SELECT 100000 + g, 1, 1, 1, 'product', 'product', 'HA_' || g, jsonb_build_object('en_US', 'HA ' || g), g, true, 'none', 'no-message', 'no-message' \
         FROM generate_series(1, {PRODUCTS}) g"
    ));
}

/// One transaction per product, each setting a price no other change
/// sets: `round * 1000 + product`. Returns the (key, price) pairs written.
fn price_round(pg: &DevCluster, db: &str, round: u32) -> Vec<(String, String)> {
    let mut written = Vec::new();
    let mut sql = String::new();
    for p in 1..=PRODUCTS {
        let price = round * 1000 + p;
        sql.push_str(&format!(
            "UPDATE product_template SET list_price = {price} WHERE id = {};\n",
            100_000 + p
        ));
        written.push(((100_000 + p).to_string(), price.to_string()));
    }
    pg.psql(db, &sql).unwrap();
    written
}

/// The target holds the last price written for each key.
fn holds_last(wms: &Receiver, written: &[(String, String)]) -> bool {
    let last: BTreeMap<&String, &String> = written.iter().map(|(k, p)| (k, p)).collect();
    let got = target_prices(&wms.accepted_events());
    last.iter().all(|(k, p)| got.get(*k) == Some(*p))
}

/// Every written (key, price) reached the target, and an event seen twice
/// is the same event (its id): redelivery, never a change decoded twice.
fn assert_all_delivered_once(events: &[serde_json::Value], written: &[(String, String)]) {
    let mut ids_of: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
    for e in events.iter().filter(|e| e["entity"] == "product") {
        let key = e["subject"].as_str().unwrap_or_default().to_string();
        let price = e["data"]["price"].to_string();
        let id = e["id"].as_str().unwrap_or_default().to_string();
        ids_of.entry((key, price)).or_default().insert(id);
    }
    for change in written {
        match ids_of.get(change) {
            None => panic!("change {change:?} never reached the target"),
            Some(ids) if ids.len() > 1 => {
                panic!("change {change:?} was delivered as different events {ids:?}")
            }
            Some(_) => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_slot_survives_promotion_and_steward_continues_on_the_new_primary() {
    let primary = leak(
        DevCluster::start_major(17, DevClusterOptions::default()).expect("start a PostgreSQL 17"),
    );
    let db = TestDb::on(primary, "ha_failover");
    add_products(&db);
    let standby = primary
        .start_standby(DevClusterOptions {
            extra_settings: vec![("sync_replication_slots".into(), "on".into())],
            ..DevClusterOptions::default()
        })
        .expect("start the standby");

    let wms = Receiver::start().await.unwrap();
    let single = format!("127.0.0.1:{}/", primary.port());
    let multi = format!("127.0.0.1:{},127.0.0.1:{}/", primary.port(), standby.port());
    let text = db
        .config_text(&[("wms", &wms.url(), &["product"])])
        .replacen(&single, &multi, 1)
        .replacen(
            "status_interval_ms = 500\n",
            "status_interval_ms = 500\nfailover = true\n",
            1,
        );
    let url_line = text.lines().find(|l| l.starts_with("url = ")).unwrap();
    let text = text.replacen(
        url_line,
        &format!(
            "{}?target_session_attrs=read-write\"",
            url_line.trim_end_matches('"')
        ),
        1,
    );
    let cfg = db.write_config(&text);
    // Not yet: without synchronized_standby_slots a failover could skip
    // changes, and steward refuses to start.
    let refused = std::process::Command::new(env!("CARGO_BIN_EXE_steward"))
        .args(["run", "-c"])
        .arg(&cfg)
        .env("STEWARD_LOG", "off")
        .output()
        .expect("run steward");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && stderr.contains("synchronized_standby_slots is empty"),
        "{stderr}"
    );
    // Logical walsenders send nothing the standby has not flushed: what
    // steward has, a promoted standby has too.
    primary
        .psql(
            "postgres",
            &format!(
                "ALTER SYSTEM SET synchronized_standby_slots = '{}'; SELECT pg_reload_conf()",
                standby.standby_slot()
            ),
        )
        .unwrap();
    let daemon = InProcess::start(steward_sinks::config::load(&cfg).unwrap());
    let slot = format!("steward_{}", db.name);
    wait_until("steward streams", WAIT, || {
        daemon_status(&cfg)["daemon"]["source_connected"] == true
    })
    .await;
    assert_eq!(
        db.sql(&format!(
            "SELECT failover FROM pg_replication_slots WHERE slot_name = '{slot}'"
        ))
        .trim(),
        "t",
        "steward's slot is a failover slot"
    );

    let mut written = price_round(primary, &db.name, 1);
    wait_until("the first changes arrive", WAIT, || {
        holds_last(&wms, &written)
    })
    .await;

    // `steward status` checks the standby of the URL's host list.
    let standby_host = format!("127.0.0.1:{}", standby.port());
    wait_until(
        "status shows the standby's copy failover-ready",
        WAIT,
        || {
            let status = daemon_status(&cfg);
            let standbys = status["source"]["standbys"].as_array().cloned();
            standbys.is_some_and(|s| {
                s.iter()
                    .any(|st| st["host"] == standby_host.as_str() && st["failover_ready"] == true)
            })
        },
    )
    .await;
    let synced = standby
        .psql(
            "postgres",
            &format!("SELECT synced FROM pg_replication_slots WHERE slot_name = '{slot}'"),
        )
        .unwrap();
    assert_eq!(synced.trim(), "t", "the standby holds a synced copy");

    // Changes right before the failure, then the primary fails and the
    // standby is promoted; changes on the new primary.
    written.extend(price_round(primary, &db.name, 2));
    primary.wait_for_standby(&standby).unwrap();
    primary.stop();
    standby.promote().unwrap();
    written.extend(price_round(&standby, &db.name, 3));

    wait_until("steward follows the new primary", WAIT, || {
        holds_last(&wms, &written)
    })
    .await;
    assert!(!daemon.is_finished(), "the daemon kept running");
    assert_all_delivered_once(&wms.accepted_events(), &written);
    let status = daemon_status(&cfg);
    assert_eq!(status["source"]["standby"], false, "{status:#}");
    assert_eq!(status["source"]["slot_active"], true, "{status:#}");
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steward_decodes_from_a_hot_standby_with_heartbeats_on_the_primary() {
    let primary = leak(
        DevCluster::start_major(16, DevClusterOptions::default()).expect("start a PostgreSQL 16"),
    );
    let db = TestDb::on(primary, "ha_standby");
    add_products(&db);
    let standby = primary
        .start_standby(DevClusterOptions::default())
        .expect("start the standby");

    let wms = Receiver::start().await.unwrap();
    let on_primary = format!("127.0.0.1:{}/", primary.port());
    let on_standby = format!("127.0.0.1:{}/", standby.port());
    let text = db
        .config_text(&[("wms", &wms.url(), &["product"])])
        .replacen(&on_primary, &on_standby, 1);

    // A standby cannot create the publication: the error says where to.
    let cfg = db.write_config(&text);
    let refused = InProcess::start(steward_sinks::config::load(&cfg).unwrap());
    wait_until("steward refuses", WAIT, || refused.is_finished()).await;
    let err = format!("{:#}", refused.stop().await.expect_err("no publication"));
    assert!(err.contains("run the statement on the primary"), "{err}");
    assert!(err.contains("CREATE PUBLICATION"), "{err}");

    db.sql(&format!(
        "CREATE PUBLICATION steward_{} FOR TABLE product_template, res_partner, uom_uom, mrp_workcenter, mrp_bom",
        db.name
    ));
    let text = text.replacen(
        "status_interval_ms = 500\n",
        &format!(
            "status_interval_ms = 500\nheartbeat_interval_ms = 200\nheartbeat_url = \"{}\"\n",
            db.url()
        ),
        1,
    );
    // The initial copy is read from the standby too (the snapshot the slot
    // exports there).
    let text = text.replacen("initial = \"none\"", "initial = \"snapshot\"", 1);
    let cfg = db.write_config(&text);
    let daemon = InProcess::start(steward_sinks::config::load(&cfg).unwrap());
    let slot = format!("steward_{}", db.name);
    // A slot being created is already listed (and active): wait for the
    // daemon to stream.
    wait_until(
        "steward creates its slot on the standby and streams",
        WAIT,
        || daemon_status(&cfg)["daemon"]["source_connected"] == true,
    )
    .await;
    assert_eq!(
        standby
            .psql(
                "postgres",
                &format!("SELECT count(*) FROM pg_replication_slots WHERE slot_name = '{slot}'"),
            )
            .unwrap()
            .trim(),
        "1",
        "the slot is on the standby"
    );
    assert_eq!(
        db.confirmed_flush(),
        None,
        "the slot is on the standby, not on the primary"
    );

    let products: Vec<(String, String)> = db
        .sql("SELECT id, list_price FROM product_template")
        .lines()
        .filter_map(|l| {
            let (id, price) = l.split_once('|')?;
            Some((id.to_string(), price.to_string()))
        })
        .collect();
    wait_until("the initial copy arrives", WAIT, || {
        holds_last(&wms, &products)
    })
    .await;
    let mut written = price_round(primary, &db.name, 1);
    written.extend(price_round(primary, &db.name, 2));
    wait_until(
        "changes made on the primary arrive from the standby",
        WAIT,
        || holds_last(&wms, &written),
    )
    .await;
    assert_all_delivered_once(&wms.accepted_events(), &written);
    let status = daemon_status(&cfg);
    assert_eq!(status["source"]["standby"], true, "{status:#}");

    // Quiet database: heartbeats written on the primary keep moving the
    // standby's slot (without them nothing is written after the last change
    // but one running-transactions record, so three rounds cannot pass).
    let confirmed = || {
        standby
            .psql(
                "postgres",
                &format!(
                    "SELECT confirmed_flush_lsn - '0/0'::pg_lsn FROM pg_replication_slots WHERE slot_name = '{slot}'"
                ),
            )
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    for _ in 0..3 {
        let now = db.current_wal();
        wait_until("the slot advances on a quiet database", WAIT, || {
            confirmed() > now
        })
        .await;
    }
    daemon.stop().await.unwrap();
}
