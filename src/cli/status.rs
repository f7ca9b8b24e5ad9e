//! `steward status`: the slot and lag as the server sees them, and each
//! target's backlog, from the store when the daemon is stopped or from the
//! daemon's control API while it runs (it holds the store locked).

use serde::Serialize;

use super::client;
use crate::daemon;
use crate::daemon::api::wire::{self, TargetStatusLine};
use steward_core::config::Config;
use steward_source::slot;
use steward_store::{Store, StoreError, TargetStats};

#[derive(Serialize)]
struct Report {
    daemon: DaemonReport,
    source: SourceReport,
    targets: Vec<TargetStatusLine>,
    snapshots: Vec<daemon::snapshot::SnapshotStatusLine>,
    /// Entities stopped by a schema change: their changes are not sent.
    stopped_entities: Vec<daemon::schema::StoppedEntity>,
}

#[derive(Serialize)]
struct DaemonReport {
    running: bool,
    /// Running, but it has not opened the state file yet.
    starting: bool,
    pid: Option<u32>,
    checkpoint: Option<String>,
    source_connected: Option<bool>,
    last_source_error: Option<String>,
    store_path: String,
    store_bytes: u64,
}

#[derive(Serialize, Default)]
struct SourceReport {
    url: String,
    slot: String,
    reachable: bool,
    error: Option<String>,
    slot_exists: Option<bool>,
    slot_active: Option<bool>,
    confirmed_flush_lsn: Option<String>,
    server_wal_lsn: Option<String>,
    lag_bytes: Option<u64>,
    wal_status: Option<String>,
    /// Why PostgreSQL (17+) invalidated the slot, if it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    invalidation_reason: Option<String>,
    /// The server steward reads from is a standby (in recovery).
    standby: Option<bool>,
    /// The slot is a failover slot (PostgreSQL 17+).
    failover: Option<bool>,
    /// The primary's `synchronized_standby_slots` (failover slots only).
    synchronized_standby_slots: Option<String>,
    /// The slot's copy on each standby of `source.url` (failover slots only).
    standbys: Vec<StandbySlotReport>,
}

/// The failover slot as one standby of the URL's host list holds it.
#[derive(Serialize, Default)]
struct StandbySlotReport {
    host: String,
    reachable: bool,
    error: Option<String>,
    /// The standby holds a copy of the slot.
    slot_exists: bool,
    /// `synced` in the standby's `pg_replication_slots`.
    synced: bool,
    /// A promotion of this standby keeps the slot: synchronised, persistent
    /// and not invalidated.
    failover_ready: bool,
    confirmed_flush_lsn: Option<String>,
    invalidation_reason: Option<String>,
}

pub(super) async fn run(config: Config, json: bool) -> anyhow::Result<()> {
    // The state file is read (and released) before the network is asked
    // anything, so it is held for milliseconds, not for a connection timeout.
    let local = local_view(&config).await?;
    let source = source_view(&config).await;
    let report = Report {
        daemon: local.daemon,
        source,
        targets: local.targets,
        snapshots: local.snapshots,
        stopped_entities: local.stopped_entities,
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_text(&report);
        print_stopped(&report);
        print_snapshots(&report);
    }
    Ok(())
}

/// What the state file (or the running daemon) says.
struct LocalView {
    daemon: DaemonReport,
    targets: Vec<TargetStatusLine>,
    snapshots: Vec<daemon::snapshot::SnapshotStatusLine>,
    stopped_entities: Vec<daemon::schema::StoppedEntity>,
}

/// A running daemon is asked through its control API and the state file is
/// not touched: opening it, even briefly, could make a starting daemon wait.
/// Otherwise the state file is opened once and closed before returning.
async fn local_view(config: &Config) -> anyhow::Result<LocalView> {
    let store_path = config.state.path.display().to_string();
    if let Some(daemon) = client::connect(config).await? {
        match daemon.get::<wire::Status>(&["status"], &[]).await? {
            Ok(status) => return Ok(from_daemon(store_path, Some(status), None)),
            Err(f) => anyhow::bail!("the daemon cannot report its status: {}", f.error.message),
        }
    }
    if !config.state.path.exists() {
        let targets = config
            .targets
            .iter()
            .map(|t| TargetStatusLine::new(&t.name, TargetStats::default()))
            .collect();
        let daemon = DaemonReport {
            running: false,
            starting: false,
            pid: None,
            checkpoint: None,
            source_connected: None,
            last_source_error: None,
            store_path,
            store_bytes: 0,
        };
        return Ok(LocalView {
            daemon,
            targets,
            snapshots: Vec::new(),
            stopped_entities: Vec::new(),
        });
    }
    match Store::open(&config.state.path) {
        Ok(store) => {
            let targets = config
                .targets
                .iter()
                .map(|t| Ok(TargetStatusLine::new(&t.name, store.target_stats(&t.name)?)))
                .collect::<Result<Vec<_>, StoreError>>()?;
            let daemon = DaemonReport {
                running: false,
                starting: false,
                pid: None,
                checkpoint: store.checkpoint()?.map(|l| l.to_string()),
                source_connected: None,
                last_source_error: None,
                store_path,
                store_bytes: store.file_size(),
            };
            let snapshots = daemon::snapshot::status_lines(&store);
            let stopped_entities = daemon::schema::stopped(&store);
            drop(store);
            Ok(LocalView {
                daemon,
                targets,
                snapshots,
                stopped_entities,
            })
        }
        // Held by a process that serves no control socket: another command
        // (or a daemon of a steward without one).
        Err(StoreError::Locked { .. }) => {
            let holder = daemon::lock::holder(&config.state.path).map(|h| h.pid);
            Ok(from_daemon(store_path, None, holder))
        }
        Err(e) => Err(e.into()),
    }
}

fn from_daemon(store_path: String, file: Option<wire::Status>, holder: Option<u32>) -> LocalView {
    let daemon = DaemonReport {
        running: true,
        starting: file.as_ref().is_some_and(|f| f.starting),
        pid: file.as_ref().map(|f| f.pid).or(holder),
        checkpoint: file
            .as_ref()
            .filter(|f| !f.starting)
            .and_then(|f| f.durable_lsn.clone()),
        source_connected: file.as_ref().map(|f| f.source_connected),
        last_source_error: file.as_ref().and_then(|f| f.last_source_error.clone()),
        store_path,
        store_bytes: file.as_ref().map(|f| f.store_bytes).unwrap_or(0),
    };
    let (targets, snapshots, stopped_entities) = match file {
        Some(f) => (f.targets, f.snapshots, f.stopped_entities),
        None => Default::default(),
    };
    LocalView {
        daemon,
        targets,
        snapshots,
        stopped_entities,
    }
}

async fn source_view(config: &Config) -> SourceReport {
    let mut report = SourceReport {
        url: config.source.url_display.clone(),
        slot: config.source.slot.clone(),
        ..SourceReport::default()
    };
    let client = match steward_postgres::connect_sql(&config.source).await {
        Ok(c) => c,
        Err(e) => {
            report.error = Some(e.to_string());
            return report;
        }
    };
    report.reachable = true;
    report.standby = slot::in_recovery(&client).await.ok();
    let current = slot::current_wal_lsn(&client).await;
    match slot::slot_info(&client, &config.source.slot).await {
        Ok(None) => report.slot_exists = Some(false),
        Ok(Some(info)) => {
            report.slot_exists = Some(true);
            report.failover = info.failover;
            report.slot_active = Some(info.active);
            report.confirmed_flush_lsn = info.confirmed_flush_lsn.map(|l| l.to_string());
            report.wal_status = info.wal_status.clone();
            report.invalidation_reason = info.invalidation_reason.clone();
            if let (Ok(current), Some(flushed)) = (&current, info.confirmed_flush_lsn) {
                report.lag_bytes = Some(current.0.saturating_sub(flushed.0));
            }
        }
        Err(e) => report.error = Some(e.to_string()),
    }
    if let Ok(current) = current {
        report.server_wal_lsn = Some(current.to_string());
    }
    if config.source.failover || report.failover == Some(true) {
        report.synchronized_standby_slots = slot::setting(&client, "synchronized_standby_slots")
            .await
            .ok()
            .flatten();
        report.standbys = standby_slots(config).await;
    }
    report
}

/// The slot on every server of `source.url` that is a standby: whether a
/// failover to it keeps the slot.
async fn standby_slots(config: &Config) -> Vec<StandbySlotReport> {
    let mut out = Vec::new();
    for host in config.source.hosts() {
        let at = config.source.at_host(&host);
        let mut line = StandbySlotReport {
            host: format!("{}:{}", host.host, host.port),
            ..StandbySlotReport::default()
        };
        let client = match steward_postgres::connect_sql(&at).await {
            Ok(c) => c,
            Err(e) => {
                line.error = Some(e.to_string());
                out.push(line);
                continue;
            }
        };
        line.reachable = true;
        match slot::in_recovery(&client).await {
            Ok(true) => {}
            // The primary (reported above) or an unknown state.
            Ok(false) => continue,
            Err(e) => {
                line.error = Some(e.to_string());
                out.push(line);
                continue;
            }
        }
        match slot::slot_info(&client, &config.source.slot).await {
            Ok(Some(info)) => {
                line.slot_exists = true;
                line.synced = info.synced == Some(true);
                line.failover_ready = line.synced
                    && !info.temporary
                    && info.invalidation_reason.is_none()
                    && info.wal_status.as_deref() != Some("lost");
                line.confirmed_flush_lsn = info.confirmed_flush_lsn.map(|l| l.to_string());
                line.invalidation_reason = info.invalidation_reason;
            }
            Ok(None) => {}
            Err(e) => line.error = Some(e.to_string()),
        }
        out.push(line);
    }
    out
}

fn print_text(r: &Report) {
    let d = &r.daemon;
    if d.starting {
        println!(
            "daemon     starting (pid {})",
            d.pid.map(|p| p.to_string()).unwrap_or_else(|| "?".into())
        );
    } else if d.running {
        println!(
            "daemon     running (pid {})",
            d.pid.map(|p| p.to_string()).unwrap_or_else(|| "?".into())
        );
    } else {
        println!("daemon     not running");
    }
    println!(
        "state      {} ({})",
        d.store_path,
        human_bytes(d.store_bytes)
    );
    println!(
        "checkpoint {}",
        d.checkpoint.as_deref().unwrap_or("none yet")
    );
    if let Some(e) = &d.last_source_error {
        println!("last source error: {e}");
    }
    let s = &r.source;
    println!();
    println!("source     {}", s.url);
    if !s.reachable {
        println!(
            "           unreachable: {}",
            s.error.as_deref().unwrap_or("unknown error")
        );
    } else {
        match s.slot_exists {
            Some(false) => println!(
                "slot       {} does not exist (steward run creates it)",
                s.slot
            ),
            Some(true) => {
                println!(
                    "slot       {} ({}), wal_status {}",
                    s.slot,
                    if s.slot_active == Some(true) {
                        "active"
                    } else {
                        "inactive"
                    },
                    s.wal_status.as_deref().unwrap_or("unknown")
                );
                println!(
                    "           confirmed {}  server WAL {}  lag {}",
                    s.confirmed_flush_lsn.as_deref().unwrap_or("-"),
                    s.server_wal_lsn.as_deref().unwrap_or("-"),
                    s.lag_bytes.map(human_bytes).unwrap_or_else(|| "-".into())
                );
            }
            None => println!("slot       unknown: {}", s.error.as_deref().unwrap_or("")),
        }
        let advice = crate::daemon::snapshot::slot_advice(
            s.slot_exists,
            s.wal_status.as_deref(),
            s.invalidation_reason.as_deref(),
            &s.slot,
        );
        if let Some(advice) = advice {
            println!("           {advice}");
        }
        if s.standby == Some(true) {
            println!("           (the source is a standby: steward decodes from it)");
        }
        print_failover(s);
    }
    println!();
    for t in &r.targets {
        println!(
            "target     {}: backlog {}, delivered {}, last delivery {}",
            t.name,
            t.backlog,
            t.delivered_total,
            t.last_delivered_at.as_deref().unwrap_or("never")
        );
        println!(
            "           cursor: appended seq {}, delivered seq {}",
            t.last_appended_seq,
            t.last_delivered_seq
                .map(|s| s.to_string())
                .unwrap_or_else(|| "none".into())
        );
        if t.dead_letters > 0 {
            println!(
                "           dead letters: {} (steward dlq list -c FILE --target {})",
                t.dead_letters, t.name
            );
        }
        if let Some(e) = &t.last_error {
            println!("           last error: {e}");
        }
    }
}

fn print_failover(s: &SourceReport) {
    match s.failover {
        Some(true) => {}
        Some(false) if s.slot_exists == Some(true) => {
            println!("failover   not a failover slot: a failover to a standby loses it");
            return;
        }
        _ => return,
    }
    println!(
        "failover   failover slot; synchronized_standby_slots = {}",
        match s.synchronized_standby_slots.as_deref() {
            None | Some("") => "'' (a standby may lack changes steward has: set it)",
            Some(v) => v,
        }
    );
    if s.standbys.is_empty() {
        println!("           no standby among the hosts of source.url to check");
    }
    for st in &s.standbys {
        if let Some(e) = &st.error {
            println!("standby    {}: unknown: {e}", st.host);
        } else if !st.slot_exists {
            println!(
                "standby    {}: NOT READY, no copy of the slot (sync_replication_slots = on, \
                 hot_standby_feedback = on, primary_slot_name and a dbname in primary_conninfo?)",
                st.host
            );
        } else if st.failover_ready {
            println!(
                "standby    {}: failover-ready (synced, confirmed {})",
                st.host,
                st.confirmed_flush_lsn.as_deref().unwrap_or("-")
            );
        } else {
            println!(
                "standby    {}: NOT READY, copy not usable yet (synced {}, invalidated {})",
                st.host,
                st.synced,
                st.invalidation_reason.as_deref().unwrap_or("no")
            );
        }
    }
}

fn print_stopped(r: &Report) {
    if r.stopped_entities.is_empty() {
        return;
    }
    println!();
    for s in &r.stopped_entities {
        println!(
            "entity     {} STOPPED since {}: {} has no column '{}'; its changes are not sent",
            s.entity, s.since, s.table, s.column
        );
        println!("           {}", s.reason);
        println!("           fix: {}", daemon::schema::FIX);
    }
}

fn print_snapshots(r: &Report) {
    if r.snapshots.is_empty() {
        return;
    }
    println!();
    for s in &r.snapshots {
        let phase = match s.phase {
            steward_store::SnapshotPhase::Pending => "pending",
            steward_store::SnapshotPhase::Running => "running",
            steward_store::SnapshotPhase::Done => "done",
        };
        let kind = if s.reconcile {
            "reconcile "
        } else if s.restore {
            "repair    "
        } else if s.reevaluate {
            "reevaluate"
        } else {
            "snapshot  "
        };
        println!(
            "{kind} {} / {}: {phase}, {} of ~{} rows (read {}, snapshots {}){}",
            s.target,
            s.entity,
            s.rows_done,
            s.rows_total_estimate.max(s.rows_done),
            s.rows_read,
            s.segments,
            s.consistent_lsn
                .as_deref()
                .map(|l| format!(", at {l}"))
                .unwrap_or_default()
        );
        if s.reconcile {
            let c = &s.counts;
            println!(
                "           {}{}",
                crate::daemon::reconcile::summary(s.dry_run, s.deep, c),
                s.finished_at
                    .as_deref()
                    .map(|t| format!(", finished {t}"))
                    .unwrap_or_default()
            );
        }
        if let Some(e) = &s.last_error {
            println!("           error: {e}");
        }
    }
}

fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}
