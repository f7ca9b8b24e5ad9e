//! `steward demo`: everything a newcomer needs to see steward work, with
//! nothing but the PostgreSQL server binaries installed. A throwaway cluster
//! with Odoo-shaped data, a local receiver standing in for the MES and the
//! finance system, the daemon, and a few changes made live.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::watch;

use steward_devkit::cluster::{DevCluster, DevClusterOptions};
use steward_devkit::receiver::Receiver;

const DEMO_CONFIG: &str = include_str!("../../config/demo.toml");

struct Step {
    title: &'static str,
    sql: &'static str,
    /// Events this step produces, over both receivers; the demo waits for
    /// them (and for steward to confirm the step's WAL) before going on, so
    /// each step's events are printed under it.
    events: usize,
    /// What steward withholds in this step and why, as the demo shows it.
    withheld: Option<&'static str>,
}

/// Run before steward starts: the lifecycle state products are gated on
/// (as an Odoo Studio field would add it), every existing product approved.
const PREPARE: &str =
    "ALTER TABLE product_template ADD COLUMN x_lifecycle_state varchar DEFAULT 'draft'; \
                       UPDATE product_template SET x_lifecycle_state = 'approved'";

const STEPS: &[Step] = &[
    Step {
        title: "engineering creates a product as a draft (Odoo inserts the row, then fills computed columns, in one transaction)",
        sql: "BEGIN; \
              INSERT INTO product_template (categ_id, uom_id, uom_po_id, detailed_type, type, default_code, name, list_price, \
              active, tracking, purchase_line_warn, sale_line_warn, x_lifecycle_state, create_date) \
              VALUES (1, 1, 1, 'product', 'product', 'FURN_9001', '{\"en_US\": \"Standing Desk\", \"de_DE\": \"Stehpult\"}', \
              749.9000, true, 'none', 'no-message', 'no-message', 'draft', now() at time zone 'utc'); \
              UPDATE product_template SET write_date = create_date WHERE default_code = 'FURN_9001'; \
              COMMIT",
        events: 0,
        withheld: Some("the draft is gated (publish_when wants x_lifecycle_state == 'approved')"),
    },
    Step {
        title: "a bill of materials for the new product is created",
        sql: "BEGIN; \
              INSERT INTO mrp_bom (product_tmpl_id, product_uom_id, code, type, ready_to_produce, consumption, product_qty, active) \
              SELECT id, 1, 'BOM-9001', 'normal', 'all_available', 'flexible', 1, true FROM product_template WHERE default_code = 'FURN_9001'; \
              INSERT INTO mrp_bom_line (bom_id, product_id, product_uom_id, product_qty) \
              SELECT currval(pg_get_serial_sequence('mrp_bom', 'id')), p.id, 1, q \
              FROM (SELECT id FROM product_product ORDER BY id LIMIT 2) p, (VALUES (4)) v(q); \
              COMMIT",
        events: 0,
        withheld: Some("the BOM is quarantined by rule product_ready: it waits until product FURN_9001 may be published"),
    },
    Step {
        title: "engineering approves the product: it is published, and the BOM it held follows",
        sql: "UPDATE product_template SET x_lifecycle_state = 'approved', write_date = now() at time zone 'utc' WHERE default_code = 'FURN_9001'",
        events: 3,
        withheld: None,
    },
    Step {
        title: "its price changes (numeric keeps its exact digits)",
        sql: "UPDATE product_template SET list_price = 799.0000, write_date = now() at time zone 'utc' WHERE default_code = 'FURN_9001'",
        events: 2,
        withheld: None,
    },
    Step {
        title: "someone saves a second product with the same internal reference FURN_9001",
        sql: "INSERT INTO product_template (categ_id, uom_id, uom_po_id, detailed_type, type, default_code, name, list_price, \
              active, tracking, purchase_line_warn, sale_line_warn, x_lifecycle_state, create_date, write_date) \
              VALUES (1, 1, 1, 'product', 'product', 'FURN_9001', '{\"en_US\": \"Standing Desk XL\"}', \
              899.0000, true, 'none', 'no-message', 'no-message', 'approved', now() at time zone 'utc', now() at time zone 'utc')",
        events: 0,
        withheld: Some("the second product is quarantined: business key default_code FURN_9001 is held by the first"),
    },
    Step {
        title: "the steward corrects its reference to FURN_9002: released from quarantine and published",
        sql: "UPDATE product_template SET default_code = 'FURN_9002', write_date = now() at time zone 'utc' \
              WHERE name->>'en_US' = 'Standing Desk XL'",
        events: 2,
        withheld: None,
    },
    Step {
        title: "stock moves and journal lines churn (not master data: nothing is sent)",
        sql: "INSERT INTO stock_move (product_id, product_qty, state, date) SELECT 1, g, 'done', now() FROM generate_series(1, 50) g; \
              INSERT INTO account_move_line (name, debit, credit) VALUES ('NOISE-JOURNAL-LINE', 10, 0), ('NOISE-JOURNAL-LINE', 0, 10)",
        events: 0,
        withheld: None,
    },
    Step {
        title: "a work center's hourly cost is raised",
        sql: "UPDATE mrp_workcenter SET costs_hour = costs_hour + 5 WHERE id = (SELECT min(id) FROM mrp_workcenter)",
        events: 1,
        withheld: None,
    },
    Step {
        title: "a vendor gets a VAT number and a new bank account (finance receives the account number masked)",
        sql: "BEGIN; \
              UPDATE res_partner SET vat = 'BE0477472701' WHERE id = (SELECT min(id) FROM res_partner WHERE supplier_rank > 0); \
              INSERT INTO res_partner_bank (partner_id, acc_number, acc_holder_name, active) \
              SELECT min(id), 'BE71 0961 2345 6769', 'Vendor account', true FROM res_partner WHERE supplier_rank > 0; \
              COMMIT",
        events: 1,
        withheld: None,
    },
    Step {
        title: "the product is archived: withdrawn from every target",
        sql: "UPDATE product_template SET active = false, write_date = now() at time zone 'utc' WHERE default_code = 'FURN_9001'",
        events: 2,
        withheld: Some("BOM-9001 is quarantined, blocked by product FURN_9001; the MES keeps its last good version"),
    },
];

/// The console user the demo makes (an operator: every page and action).
const DEMO_USER: &str = "demo";

/// A fresh password for each demo run: 16 URL-safe characters.
fn demo_password() -> String {
    use base64::Engine;
    let bytes: [u8; 12] = rand::random();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// How long the demo waits for one step's events before going on anyway.
const STEP_TIMEOUT: Duration = Duration::from_secs(15);

pub(super) async fn run(once: bool) -> anyhow::Result<()> {
    // Installed first, so Ctrl-C at any moment ends the demo through the
    // cleanup below (without it, the default action would leave the state
    // directory behind).
    // With --once nothing stops the demo early; the sender is kept so that
    // the receiver never reads as closed.
    let (_never, mut stop) = watch::channel(false);
    if !once {
        stop = crate::cli::shutdown_on_signals()?;
    }
    println!("steward demo: starting a throwaway PostgreSQL with wal_level=logical ...");
    let cluster = tokio::task::spawn_blocking(|| DevCluster::start(DevClusterOptions::default()))
        .await?
        .context("cannot start the demo's PostgreSQL")?;
    let cluster = Arc::new(cluster);
    let state_dir = tempfile::Builder::new().prefix("steward-demo-").tempdir()?;
    let result = show(&cluster, &state_dir, &mut stop, once).await;
    // Everything is removed here, also after an error: the cluster's
    // directory when its last handle goes, the state directory explicitly.
    cluster.stop();
    let data_dir = cluster.data_dir().to_path_buf();
    drop(cluster);
    let removed = state_dir.close();
    result?;
    removed.context("cannot remove the demo's state directory")?;
    if data_dir.exists() {
        anyhow::bail!(
            "the demo's PostgreSQL directory {} was not removed",
            data_dir.display()
        );
    }
    println!("demo stopped; the throwaway cluster and state were removed.");
    Ok(())
}

async fn show(
    cluster: &Arc<DevCluster>,
    state_dir: &tempfile::TempDir,
    stop: &mut watch::Receiver<bool>,
    once: bool,
) -> anyhow::Result<()> {
    let c = cluster.clone();
    tokio::task::spawn_blocking(move || {
        c.create_database("odoo")?;
        c.load_odoo_fixture("odoo")?;
        c.psql("odoo", PREPARE).map(drop)
    })
    .await?
    .context("cannot load the Odoo fixture")?;
    let version = cluster.server_version_num();
    println!(
        "  PostgreSQL {}.{} on port {}, database odoo with Odoo 17 master data loaded",
        version / 10000,
        version % 10000,
        cluster.port()
    );
    println!("  cluster data: {}", cluster.data_dir().display());

    // Two receivers stand in for the MES and the finance system.
    let mes = Receiver::start()
        .await
        .context("cannot start the demo receiver")?;
    mes.on_event(|event| println!("{}", describe("mes", event)));
    let finance = Receiver::start()
        .await
        .context("cannot start the demo receiver")?;
    finance.on_event(|event| println!("{}", describe("finance", event)));
    println!(
        "  receivers: mes at {}, finance at {}",
        mes.url(),
        finance.url()
    );

    // The console on a free loopback port, with one operator to log in as.
    let console_listen = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .context("cannot find a free port for the console")?;
    let users_file = state_dir.path().join("users.toml");
    let password = demo_password();
    let mut users = crate::console::users::Users::default();
    users.add_user(
        DEMO_USER,
        crate::console::users::Role::Operator,
        &password,
        false,
    )?;
    users.save(&users_file)?;
    let text = DEMO_CONFIG
        .replace("{{CONSOLE_LISTEN}}", &console_listen.to_string())
        .replace("{{USERS_FILE}}", &users_file.display().to_string())
        .replace("{{SOURCE_URL}}", &cluster.url("odoo"))
        .replace(
            "{{STATE_PATH}}",
            &state_dir.path().join("steward.redb").display().to_string(),
        )
        .replace("{{MES_URL}}", &mes.url())
        .replace("{{FINANCE_URL}}", &finance.url());
    let config_path = state_dir.path().join("steward.toml");
    std::fs::write(&config_path, &text)?;
    let config = steward_sinks::config::load(&config_path).map_err(|e| anyhow::anyhow!("{e}"))?;
    println!(
        "  config: {} (entities product, bom, partner, uom, workcenter; targets mes, finance)",
        config_path.display()
    );

    println!(
        "  console: http://{console_listen}/ (log in as {DEMO_USER}, password {password}; \
         role operator)"
    );

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let mut daemon = tokio::spawn(crate::daemon::run(config, shutdown_rx));
    let delivered = || mes.accepted_count() + finance.accepted_count();
    let outcome = async {
        tokio::select! {
            _ = stop.changed() => return Ok(()),
            ready = wait_for_slot(cluster) => ready?,
        }
        println!("\nsteward is streaming. Making changes in Odoo's tables:\n");
        let mut expected = 0;
        for step in STEPS {
            println!("── {}", step.title);
            let c = cluster.clone();
            let sql = step.sql;
            let lsn = tokio::task::spawn_blocking(move || {
                c.psql("odoo", sql)?;
                c.psql("odoo", "SELECT pg_current_wal_lsn()")
            })
            .await??;
            expected += step.events;
            tokio::select! {
                _ = stop.changed() => return Ok(()),
                done = wait_for_step(cluster, lsn.trim(), || delivered() >= expected) => {
                    if !done? {
                        println!("   (still waiting for steward after {STEP_TIMEOUT:?}; going on)");
                    }
                }
            }
            if let Some(why) = step.withheld {
                println!("   ✗ withheld: {why}");
            }
        }
        println!(
            "\n{} events delivered (each change once per target that subscribes to its entity).",
            delivered()
        );
        if !once {
            println!(
                "\nTry your own changes:  {}/psql '{}'\n\
                 See what steward decided:  http://{console_listen}/ (user {DEMO_USER}, password {password})\n\
                 \x20                          steward audit -c {config} --limit 20\n\
                 \x20                          steward quarantine list -c {config}\n\
                 Press Ctrl-C to stop and clean up.",
                cluster.bin_dir().display(),
                cluster.url("odoo"),
                config = config_path.display(),
            );
            let _ = stop.changed().await;
        }
        anyhow::Ok(())
    };
    // The daemon ending on its own is an error worth showing at once.
    let outcome = tokio::select! {
        outcome = outcome => outcome,
        ended = &mut daemon => {
            return match ended {
                Ok(Ok(())) => Err(anyhow::anyhow!("steward stopped unexpectedly")),
                Ok(Err(e)) => Err(e.context("steward stopped")),
                Err(e) => Err(anyhow::anyhow!("the daemon task failed: {e}")),
            };
        }
    };
    let _ = shutdown_tx.send(true);
    daemon.await.context("the daemon task failed")??;
    mes.stop().await;
    finance.stop().await;
    outcome
}

async fn wait_for_slot(cluster: &Arc<DevCluster>) -> anyhow::Result<()> {
    for _ in 0..100 {
        let c = cluster.clone();
        let out = tokio::task::spawn_blocking(move || {
            c.psql(
                "odoo",
                "SELECT count(*) FROM pg_replication_slots s JOIN pg_stat_replication r ON r.pid = s.active_pid \
                 WHERE s.slot_name = 'steward_demo' AND r.state = 'streaming'",
            )
        })
        .await??;
        if out.trim().lines().any(|l| l.trim() == "1") {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("steward did not start streaming within 10 seconds; rerun with STEWARD_LOG=steward=debug to see why")
}

/// Waits until `arrived` holds and steward has confirmed WAL up to `lsn`
/// (so a step whose changes must not be sent has really been read);
/// `false` after [`STEP_TIMEOUT`].
async fn wait_for_step(
    cluster: &Arc<DevCluster>,
    lsn: &str,
    arrived: impl Fn() -> bool,
) -> anyhow::Result<bool> {
    let sql = format!(
        "SELECT confirmed_flush_lsn >= '{lsn}'::pg_lsn FROM pg_replication_slots WHERE slot_name = 'steward_demo'"
    );
    let deadline = tokio::time::Instant::now() + STEP_TIMEOUT;
    while tokio::time::Instant::now() < deadline {
        if arrived() {
            let c = cluster.clone();
            let sql = sql.clone();
            let out = tokio::task::spawn_blocking(move || c.psql("odoo", &sql)).await??;
            if out.trim() == "t" {
                return Ok(true);
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(false)
}

fn describe(target: &str, event: &serde_json::Value) -> String {
    let get = |k: &str| {
        event
            .get(k)
            .and_then(|v| v.as_str())
            .unwrap_or("?")
            .to_string()
    };
    let data = event
        .get("data")
        .map(std::string::ToString::to_string)
        .unwrap_or_default();
    format!(
        "   → {target:<8} {:<26} key {:<5} v{:<10} {data}",
        get("type"),
        get("subject"),
        get("version")
    )
}
