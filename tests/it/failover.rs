//! A primary failover without failover slots: the promoted standby has no
//! copy of steward's slot. steward must refuse, say that the slot is gone
//! because of the failover and give the repair command, and the repair must
//! bring every target back to the new primary's data.

use crate::support;

use std::path::Path;
use std::time::Duration;

use steward_devkit::receiver::Receiver;
use steward_devkit::{DevCluster, DevClusterOptions};
use support::{target_prices, wait_until, InProcess, TestDb};

const WAIT: Duration = Duration::from_secs(120);

fn prices(pg: &DevCluster, db: &str) -> std::collections::BTreeMap<String, String> {
    pg.psql(db, "SELECT id, list_price FROM product_template")
        .unwrap()
        .lines()
        .filter_map(|l| {
            let (id, price) = l.split_once('|')?;
            Some((id.to_string(), price.to_string()))
        })
        .collect()
}

fn steward(args: &[&str], config: &Path) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_steward"))
        .args(args)
        .arg("-c")
        .arg(config)
        .env("STEWARD_LOG", "off")
        .output()
        .expect("run steward")
}

fn assert_failover_refusal(text: &str, slot: &str) {
    for needed in [
        &format!("replication slot '{slot}' is gone") as &str,
        "promoted standby",
        "failover",
        "failover slots (PostgreSQL 17",
        "timeline 2",
        "steward last streamed on timeline 1",
        "steward repair -c FILE",
    ] {
        assert!(text.contains(needed), "the refusal says {needed:?}: {text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_failover_without_failover_slots_steward_refuses_with_the_fix_and_repair_recovers()
{
    refused_after_failover_and_repaired(
        DevCluster::start(DevClusterOptions::default()).expect("start the primary"),
    )
    .await;
}

/// Products to one HTTP target, with an initial snapshot.
fn wms_config(db: &TestDb, wms: &Receiver) -> String {
    db.config_text(&[]) + &format!(
        "\n[targets.wms]\ntype = \"http\"\nurl = \"{}\"\nentities = [\"product\"]\ninitial = \"snapshot\"\n\
         batch_max_events = 5000\nbatch_linger_ms = 5\nretry_initial_ms = 50\nretry_max_ms = 500\ntimeout_ms = 5000\n",
        wms.url()
    )
}

/// The scenario with `primary` of any major; `versions` runs it per major.
pub(crate) async fn refused_after_failover_and_repaired(primary: DevCluster) {
    // Leaked like the shared cluster (TestDb needs it for the whole test);
    // its supervisor removes it when the test binary exits.
    let primary: &'static DevCluster = Box::leak(Box::new(primary));
    let db = TestDb::on(primary, "failover");
    db.sql(
        "INSERT INTO product_template (id, categ_id, uom_id, uom_po_id, detailed_type, type, default_code, name, list_price, active, tracking, purchase_line_warn, sale_line_warn) \
         SELECT 100000 + g, 1, 1, 1, 'product', 'product', 'F_' || g, jsonb_build_object('en_US', 'F ' || g), g, true, 'none', 'no-message', 'no-message' \
         FROM generate_series(1, 500) g",
    );
    let standby = primary
        .start_standby(DevClusterOptions::default())
        .expect("start the standby");
    let slot = format!("steward_{}", db.name);

    let wms = Receiver::start().await.unwrap();
    let cfg = db.write_config(&wms_config(&db, &wms));
    let daemon = InProcess::start(steward_sinks::config::load(&cfg).unwrap());
    let snapshot_rows = prices(primary, &db.name).len();
    wait_until("the initial snapshot arrives", WAIT, || {
        wms.accepted_count() >= snapshot_rows
    })
    .await;
    db.sql("UPDATE product_template SET list_price = 11 WHERE id = 100001");
    wait_until("a streamed change arrives", WAIT, || {
        target_prices(&wms.accepted_events()).get("100001") == Some(&"11".to_string())
    })
    .await;
    primary.wait_for_standby(&standby).unwrap();
    assert_eq!(
        standby
            .psql(
                "postgres",
                &format!("SELECT count(*) FROM pg_replication_slots WHERE slot_name = '{slot}'")
            )
            .unwrap(),
        "0\n",
        "without failover slots the standby has no copy of steward's slot"
    );

    // The primary fails; the standby is promoted, takes writes, and the
    // service address (here the port) moves to it.
    primary.stop();
    standby.promote().unwrap();
    standby
        .psql(
            &db.name,
            "UPDATE product_template SET list_price = 22 WHERE id = 100002; \
             DELETE FROM product_template WHERE id = 100003",
        )
        .unwrap();
    standby.restart_on_port(primary.port()).unwrap();

    // The running daemon reconnects to the new primary and stops.
    wait_until("the daemon stops", WAIT, || daemon.is_finished()).await;
    let err = daemon
        .stop()
        .await
        .expect_err("a failover without the slot is an error");
    assert_failover_refusal(&format!("{err:#}"), &slot);

    // Started again, it refuses the same way, before creating a slot.
    let again = InProcess::start(steward_sinks::config::load(&cfg).unwrap());
    wait_until("the daemon refuses to start", WAIT, || again.is_finished()).await;
    let err = again.stop().await.expect_err("refuses to start");
    assert_failover_refusal(&format!("{err:#}"), &slot);
    assert_eq!(
        standby
            .psql(
                "postgres",
                "SELECT count(*) FROM pg_replication_slots WHERE slot_type = 'logical'"
            )
            .unwrap(),
        "0\n",
        "the refusal creates no slot"
    );

    // The repair the message names.
    let out = steward(&["repair"], &cfg);
    assert!(
        out.status.success(),
        "steward repair: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let daemon = InProcess::start(steward_sinks::config::load(&cfg).unwrap());
    let expected = prices(&standby, &db.name);
    assert_eq!(expected.get("100002"), Some(&"22".to_string()));
    wait_until("the target matches the new primary", WAIT, || {
        target_prices(&wms.accepted_events()) == expected
    })
    .await;
    // And streams from the new primary's slot.
    standby
        .psql(
            &db.name,
            "UPDATE product_template SET list_price = 33 WHERE id = 100004",
        )
        .unwrap();
    let expected = prices(&standby, &db.name);
    wait_until("a change on the new primary arrives", WAIT, || {
        target_prices(&wms.accepted_events()) == expected
    })
    .await;
    daemon.stop().await.unwrap();
}

/// PostgreSQL 17+ says why a slot was invalidated; steward's refusal names
/// the reason and the repair. PostgreSQL 18's idle timeout is the one a
/// test can cause: steward stopped for longer than
/// `idle_replication_slot_timeout`, then a checkpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_invalidated_while_steward_was_stopped_is_refused_with_the_reason_and_repaired() {
    let pg = support::cluster_of(18);
    let db = TestDb::on(pg, "idle_slot");
    let wms = Receiver::start().await.unwrap();
    let cfg = db.write_config(&wms_config(&db, &wms));
    let slot = format!("steward_{}", db.name);
    let daemon = InProcess::start(steward_sinks::config::load(&cfg).unwrap());
    let rows = prices(pg, &db.name).len();
    wait_until("the initial snapshot arrives", WAIT, || {
        wms.accepted_count() >= rows
    })
    .await;
    daemon.stop().await.unwrap();

    let invalidated = || {
        pg.psql(
            &db.name,
            &format!(
                "SELECT coalesce(invalidation_reason, '') FROM pg_replication_slots WHERE slot_name = '{slot}'"
            ),
        )
        .unwrap()
        .trim()
        .to_string()
    };
    pg.psql(
        "postgres",
        "ALTER SYSTEM SET idle_replication_slot_timeout = '1s'; SELECT pg_reload_conf()",
    )
    .unwrap();
    db.sql("UPDATE product_template SET list_price = 33 WHERE id = (SELECT min(id) FROM product_template)");
    wait_until("the idle slot is invalidated", WAIT, || {
        std::thread::sleep(Duration::from_millis(1100));
        let _ = pg.psql("postgres", "CHECKPOINT");
        invalidated() == "idle_timeout"
    })
    .await;
    pg.psql(
        "postgres",
        "ALTER SYSTEM RESET idle_replication_slot_timeout; SELECT pg_reload_conf()",
    )
    .unwrap();

    let out = steward(&["run"], &cfg);
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "steward ran on an invalidated slot");
    for needed in [
        &format!("slot '{slot}' is invalidated (idle_timeout)") as &str,
        "idle_replication_slot_timeout",
        "steward repair -c FILE",
    ] {
        assert!(text.contains(needed), "{needed:?} missing from:\n{text}");
    }

    let out = steward(&["status"], &cfg);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("slot '{slot}' is invalidated (idle_timeout)")),
        "{text}"
    );

    let out = steward(&["repair"], &cfg);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let daemon = InProcess::start(steward_sinks::config::load(&cfg).unwrap());
    wait_until("the change made meanwhile arrives", WAIT, || {
        target_prices(&wms.accepted_events()) == prices(pg, &db.name)
    })
    .await;
    assert_eq!(invalidated(), "", "a new slot");
    daemon.stop().await.unwrap();
}
