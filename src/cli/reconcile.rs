//! `steward reconcile -c FILE --target T [--entity E ...] [--dry-run] [--json]`:
//! compare what a target was sent with the source and send only what
//! differs (see `daemon::reconcile`); and `steward repair`: after a lost or
//! dropped slot, recreate it and reconcile every target.
//!
//! Against a running daemon the request goes through its control API and
//! the command follows it to the end, then prints per entity what was
//! checked, equal, re-sent and deleted. Against a stopped daemon it records
//! the jobs; they run at the next start and `steward status` shows their
//! results.

use std::time::{Duration, Instant};

use anyhow::bail;

use super::client::{self, Access};
use crate::daemon::api::wire;
use crate::daemon::reconcile::{self, ReconcileLine};
use crate::daemon::snapshot::{ResetRequest, SnapshotGate};
use steward_core::config::Config;
use steward_store::Store;

pub(super) struct ReconcileArgs {
    pub target: String,
    pub entities: Vec<String>,
    pub dry_run: bool,
    pub deep: bool,
    pub json: bool,
    pub wait: bool,
    pub comment: Option<String>,
}

pub(super) async fn run(config: Config, args: ReconcileArgs) -> anyhow::Result<()> {
    let request = ResetRequest {
        target: args.target.clone(),
        entities: args.entities.clone(),
        reconcile: true,
        dry_run: args.dry_run,
        deep: args.deep,
    };
    match client::access(&config).await? {
        Access::Daemon(daemon) => online(&config, &daemon, &args, &request).await,
        Access::Store(store) => offline(&config, &store, &args, &request),
    }
}

/// The daemon is stopped: record the jobs for its next start.
fn offline(
    config: &Config,
    store: &Store,
    args: &ReconcileArgs,
    request: &ResetRequest,
) -> anyhow::Result<()> {
    let entities = reconcile::resolve(config, store, request)?;
    reconcile::begin(
        &SnapshotGate::default(),
        store,
        &request.target,
        &entities,
        request.dry_run,
        request.deep,
    )?;
    audit_request(store, request, &entities, args.comment.clone())?;
    println!(
        "recorded: target '{}' is {}reconciled for {} at the next start of steward{}; \
         `steward status` shows the results",
        request.target,
        if request.deep { "deeply " } else { "" },
        entities.join(", "),
        if request.dry_run { " (dry run)" } else { "" }
    );
    Ok(())
}

fn audit_request(
    store: &Store,
    request: &ResetRequest,
    entities: &[String],
    comment: Option<String>,
) -> anyhow::Result<()> {
    let user = crate::daemon::govern::Actor::current(comment);
    let records: Vec<_> = entities
        .iter()
        .map(|e| {
            user.record(
                e,
                "*",
                Some(&request.target),
                "reconcile",
                format!(
                    "{}reconciliation requested{}",
                    if request.deep { "deep " } else { "" },
                    if request.dry_run { " (dry run)" } else { "" }
                ),
            )
        })
        .collect();
    store.audit_append(&records)?;
    Ok(())
}

/// `steward repair` (daemon stopped): at the next start the slot is dropped
/// and created again, and every target is reconciled from the new slot's
/// snapshot, so only the records that changed meanwhile are sent.
pub(super) async fn repair(config: Config, dry_run: bool) -> anyhow::Result<()> {
    let store = match client::access(&config).await? {
        Access::Daemon(_) => bail!(
            "repair replaces the replication slot and needs the daemon stopped: stop steward \
             (e.g. systemctl stop steward), run this command again, then start steward"
        ),
        Access::Store(store) => store,
    };
    for target in &config.targets {
        let request = ResetRequest {
            target: target.name.clone(),
            entities: target.entities.clone(),
            reconcile: true,
            dry_run,
            deep: false,
        };
        let entities = reconcile::resolve(&config, &store, &request)?;
        store.begin_reconcile(&target.name, &entities, dry_run, false)?;
        audit_request(&store, &request, &entities, None)?;
    }
    store.set_meta(crate::daemon::RESET_ALL_META, "1")?;
    if dry_run {
        println!(
            "recorded: at its next start steward drops and recreates the slot '{}' and compares \
             every target with a fresh snapshot, sending nothing (dry run); `steward status` \
             shows what differs, and `steward reconcile` repairs it",
            config.source.slot
        );
    } else {
        println!(
            "recorded: at its next start steward drops and recreates the slot '{}' and reconciles \
             every target with a fresh snapshot: only records that differ from what a target was \
             sent are sent again (or deleted)",
            config.source.slot
        );
    }
    Ok(())
}

/// The daemon runs: ask it through the control API and follow the jobs.
async fn online(
    config: &Config,
    daemon: &client::Client,
    args: &ReconcileArgs,
    request: &ResetRequest,
) -> anyhow::Result<()> {
    crate::daemon::snapshot::resolve_request(config, request)?;
    if request.deep {
        if let Some(target) = config.target(&request.target) {
            steward_sinks::target_reader(target, config).map_err(|e| anyhow::anyhow!(e))?;
        }
    }
    let body = wire::ReconcileRequest {
        entities: request.entities.clone(),
        dry_run: request.dry_run,
        deep: request.deep,
        comment: args.comment.clone(),
    };
    let started = daemon
        .post::<wire::ResetStarted>(&["targets", &request.target, "reconcile"], &body)
        .await?
        .map_err(|f| {
            anyhow::anyhow!(
                "the daemon rejected the reconciliation: {}",
                f.error.message
            )
        })?;
    if !args.json {
        eprintln!(
            "target '{}': {}reconciling {}{}",
            started.target,
            if request.deep { "deeply " } else { "" },
            started.entities.join(", "),
            if request.dry_run { " (dry run)" } else { "" }
        );
    }
    if !args.wait {
        return Ok(());
    }
    let lines = follow(daemon, &started.target, &started.entities).await?;
    print(&lines, args.json)
}

/// Waits until every job of the request is done; returns their lines.
async fn follow(
    daemon: &client::Client,
    target: &str,
    entities: &[String],
) -> anyhow::Result<Vec<ReconcileLine>> {
    let mut last_line = Instant::now();
    loop {
        let snapshots = match daemon.get::<wire::Snapshots>(&["snapshots"], &[]).await {
            Ok(Ok(s)) => s.snapshots,
            Ok(Err(f)) if f.error.code == "starting" => {
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
            Ok(Err(f)) => bail!("the daemon cannot report the progress: {}", f.error.message),
            Err(_) => bail!(
                "the daemon stopped; the reconciliation continues at its next start (see steward status)"
            ),
        };
        let lines: Vec<_> = snapshots
            .iter()
            .filter(|s| s.target == target && entities.contains(&s.entity) && s.reconcile)
            .collect();
        if last_line.elapsed() >= Duration::from_secs(5) {
            last_line = Instant::now();
            let done: u64 = lines.iter().map(|s| s.rows_done).sum();
            let total: u64 = lines
                .iter()
                .map(|s| s.rows_total_estimate.max(s.rows_done))
                .sum();
            eprintln!("{target}: {done}/{total} rows compared");
        }
        if let Some(err) = lines.iter().find_map(|s| s.last_error.clone()) {
            eprintln!("{target}: reconciliation error (retrying): {err}");
        }
        if lines.len() == entities.len()
            && lines
                .iter()
                .all(|s| s.phase == steward_store::SnapshotPhase::Done)
        {
            return Ok(lines.iter().map(|s| s.reconcile_line()).collect());
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Per entity: checked, equal, re-sent, deleted; for a deep run also
/// what differed at the target (changed, missing, extra) and what its
/// version guard refuses (unrepairable).
pub(super) fn print(lines: &[ReconcileLine], json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(lines)?);
        return Ok(());
    }
    let deep = lines.iter().any(|l| l.deep);
    let mut head = format!(
        "{:<16} {:<16} {:>10} {:>10} {:>10} {:>10}",
        "TARGET", "ENTITY", "CHECKED", "EQUAL", "RE-SENT", "DELETED"
    );
    if deep {
        head.push_str(&format!(
            " {:>10} {:>10} {:>10} {:>12}",
            "CHANGED", "MISSING", "EXTRA", "UNREPAIRABLE"
        ));
    }
    println!("{head}");
    for l in lines {
        let mut line = format!(
            "{:<16} {:<16} {:>10} {:>10} {:>10} {:>10}",
            l.target, l.entity, l.counts.checked, l.counts.equal, l.counts.resent, l.counts.deleted
        );
        if deep {
            line.push_str(&format!(
                " {:>10} {:>10} {:>10} {:>12}",
                l.counts.changed, l.counts.missing, l.counts.extra, l.counts.unrepairable
            ));
        }
        if l.dry_run {
            line.push_str("  (dry run)");
        }
        println!("{line}");
    }
    Ok(())
}
