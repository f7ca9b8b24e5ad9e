//! Reconciliation (`steward reconcile`, `steward repair`, scheduled runs):
//! proves a target holds what it should and sends only what differs.
//!
//! A reconciliation is a snapshot job with `reconcile` set, run by the
//! snapshot task (`daemon::snapshot`) through the same governed path:
//!
//! 1. Every row of the entity's table is read from a consistent snapshot
//!    and governed for the target without `force`: a document equal to the
//!    last one sent (the published hash, `store::published`) is suppressed,
//!    a different one is sent as an upsert, one no longer publishable is
//!    unpublished (a delete, or an upsert with `on_unpublish = "upsert"`).
//! 2. The keys the target was sent (the published state's keys, listed in
//!    the store's order) that the snapshot does not have are governed as
//!    deleted for the target. For a table keyed by one integer column the
//!    snapshot reads rows in the order the store lists their keys, so each
//!    chunk is compared with the targets' keys in its range as it is read
//!    (one range read of the store per target, no query to the source);
//!    after the table, the keys above the last row read are gone, and only
//!    the keys that are not such numbers are looked up in the source. For
//!    other tables the keys are swept after the table, each looked up.
//!
//! Streaming goes on meanwhile; the job's window orders its events against
//! streamed ones per key as for a snapshot, and records the stream changed
//! after the snapshot's consistent point are left to the stream. A job
//! records its progress with each chunk (reading, then sweeping), so a
//! restarted daemon resumes it. `dry_run` counts without sending or
//! changing anything.
//!
//! A deep reconciliation (`deep`, PostgreSQL targets only) compares with
//! what the target actually holds instead of with what it was sent: for
//! each chunk the target's rows of its keys are read back (`snapshot::deep`)
//! and the governance decides against them, so rows changed, deleted or
//! inserted at the target behind steward's back are found and repaired.
//! After the table, the target's table is swept too, for rows whose keys
//! the source does not have. It reports per entity the rows changed,
//! missing and extra at the target, and those its version guard would
//! refuse (`unrepairable`).

use anyhow::bail;
use serde::{Deserialize, Serialize};

use steward_core::config::{Config, Window};
use steward_core::state::AuditRecord;
use steward_store::{ReconcileCounts, SnapshotJob, SnapshotPhase, Store};

use super::snapshot::{resolve_request, ResetRequest, SnapshotGate};

/// Label values of `steward_reconcile_records_total{result}`.
const RESULTS: [&str; 8] = [
    "checked",
    "equal",
    "resent",
    "deleted",
    "changed",
    "missing",
    "extra",
    "unrepairable",
];

/// Checks a reconciliation request: the target and entities exist and none
/// of them is still being snapshotted or reconciled. Returns the entities.
pub fn resolve(
    config: &Config,
    store: &Store,
    request: &ResetRequest,
) -> anyhow::Result<Vec<String>> {
    let entities = resolve_request(config, request)?;
    if request.deep {
        if let Some(target) = config.target(&request.target) {
            steward_sinks::target_reader(target, config).map_err(|e| anyhow::anyhow!(e))?;
        }
    }
    let busy: Vec<String> = store
        .snapshot_jobs()?
        .into_iter()
        .filter(|j| {
            j.target == request.target
                && entities.contains(&j.entity)
                && j.phase != SnapshotPhase::Done
        })
        .map(|j| j.entity)
        .collect();
    if !busy.is_empty() {
        bail!(
            "target '{}' is still being snapshotted or reconciled for {}; try again when that is done \
             (steward status shows its progress)",
            request.target,
            busy.join(", ")
        );
    }
    Ok(entities)
}

/// Records reconciliation jobs under the gate (their windows open at once).
pub fn begin(
    gate: &SnapshotGate,
    store: &Store,
    target: &str,
    entities: &[String],
    dry_run: bool,
    deep: bool,
) -> anyhow::Result<()> {
    let mut windows = gate.lock();
    for job in store.begin_reconcile(target, entities, dry_run, deep)? {
        windows.insert((job.target, job.entity));
    }
    Ok(())
}

/// Counts a chunk's findings in `steward_reconcile_records_total`.
pub fn count(job: &SnapshotJob, counts: ReconcileCounts) {
    if job.dry_run {
        return;
    }
    let values = [
        counts.checked,
        counts.equal,
        counts.resent,
        counts.deleted,
        counts.changed,
        counts.missing,
        counts.extra,
        counts.unrepairable,
    ];
    for (result, n) in RESULTS.into_iter().zip(values) {
        if n > 0 {
            metrics::counter!(
                steward_core::metric::RECONCILE_RECORDS,
                "target" => job.target.clone(),
                "entity" => job.entity.clone(),
                "result" => result
            )
            .increment(n);
        }
    }
}

/// Reports a finished job: log, audit record `reconciled`, and (not for a
/// dry run) the time of the last completed run.
pub fn finished(store: &Store, job: &SnapshotJob) {
    let c = job.counts;
    let detail = summary(job.dry_run, job.deep, &c);
    tracing::info!(
        target_name = %job.target, entity = %job.entity, dry_run = job.dry_run, deep = job.deep,
        checked = c.checked, equal = c.equal, resent = c.resent, deleted = c.deleted,
        changed = c.changed, missing = c.missing, extra = c.extra, unrepairable = c.unrepairable,
        "reconciliation finished"
    );
    let record = AuditRecord {
        time_micros: chrono::Utc::now().timestamp_micros(),
        entity: job.entity.clone(),
        key: "*".into(),
        version: job.consistent_lsn.unwrap_or(0).saturating_sub(1),
        target: Some(job.target.clone()),
        decision: "reconciled".into(),
        detail,
        user: None,
        comment: None,
        seq: None,
    };
    if let Err(e) = store.audit_append(&[record]) {
        tracing::warn!(error = %e, "cannot write the audit record of a reconciliation");
    }
    if !job.dry_run {
        publish_completed(job);
    }
}

/// The result as the audit record `reconciled` and the status line tell it.
pub fn summary(dry_run: bool, deep: bool, c: &ReconcileCounts) -> String {
    let run = match (dry_run, deep) {
        (true, true) => "deep dry run: ",
        (true, false) => "dry run: ",
        (false, true) => "deep: ",
        (false, false) => "",
    };
    let mut text = format!(
        "{run}checked {}, equal {}, re-sent {}, deleted {}",
        c.checked, c.equal, c.resent, c.deleted
    );
    if deep {
        text.push_str(&format!(
            "; at the target: changed {}, missing {}, extra {}, unrepairable {}",
            c.changed, c.missing, c.extra, c.unrepairable
        ));
    }
    text
}

fn publish_completed(job: &SnapshotJob) {
    let Some(at) = job.finished_at.as_deref().and_then(|t| {
        chrono::DateTime::parse_from_rfc3339(t)
            .ok()
            .map(|t| t.timestamp() as f64)
    }) else {
        return;
    };
    metrics::gauge!(
        steward_core::metric::RECONCILE_LAST_COMPLETED,
        "target" => job.target.clone(),
        "entity" => job.entity.clone()
    )
    .set(at);
    metrics::gauge!(
        steward_core::metric::RECONCILE_LAST_DRIFT,
        "target" => job.target.clone(),
        "entity" => job.entity.clone()
    )
    .set(job.counts.drift() as f64);
}

/// Sets the gauges of the last completed runs recorded in the store (at start).
pub fn publish_gauges(store: &Store) {
    for job in store.snapshot_jobs().unwrap_or_default() {
        if job.reconcile && !job.dry_run && job.phase == SnapshotPhase::Done {
            publish_completed(&job);
        }
    }
}

/// Scheduled reconciliations (`reconcile = { every | at }` per target and
/// entity): each (target, entity) with a schedule is reconciled when the
/// clock passes its next time after the last run started (or after the
/// daemon started, for one never reconciled). A run due while a snapshot or
/// reconciliation of the pair is still going starts when that is done.
pub struct Schedule {
    /// (target, entity, schedule, Unix time the next run is due, deep).
    due: Vec<(String, String, Window, i64, bool)>,
}

impl Schedule {
    /// The schedules of `config`, each due after its last run (recorded in
    /// the store) or after now.
    pub fn new(config: &Config, store: &Store) -> Schedule {
        let now = chrono::Utc::now().timestamp();
        let jobs = store.snapshot_jobs().unwrap_or_default();
        let mut due = Vec::new();
        for target in &config.targets {
            for entity in &target.entities {
                let Some(window) = target.delivery.reconcile_of(entity) else {
                    continue;
                };
                let last = jobs
                    .iter()
                    .find(|j| {
                        j.target == target.name && &j.entity == entity && j.reconcile && !j.dry_run
                    })
                    .and_then(|j| j.started_at.as_deref())
                    .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                    .map_or(now, |t| t.timestamp().min(now));
                let next = window.next_open_after(last).unwrap_or(i64::MAX);
                let interval = match window {
                    Window::Every(d) => d.as_secs() as f64,
                    _ => 86_400.0,
                };
                metrics::gauge!(
                    steward_core::metric::RECONCILE_INTERVAL,
                    "target" => target.name.clone(),
                    "entity" => entity.clone()
                )
                .set(interval);
                due.push((
                    target.name.clone(),
                    entity.clone(),
                    window,
                    next,
                    target.delivery.reconcile_deep,
                ));
            }
        }
        Schedule { due }
    }

    /// Starts the runs that are due (errors are logged; retried next time).
    pub fn start_due(&mut self, config: &Config, gate: &SnapshotGate, store: &Store) {
        if self.due.is_empty() {
            return;
        }
        let now = chrono::Utc::now().timestamp();
        for (target, entity, window, next, deep) in &mut self.due {
            if now < *next {
                continue;
            }
            let request = ResetRequest {
                target: target.clone(),
                entities: vec![entity.clone()],
                reconcile: true,
                dry_run: false,
                deep: *deep,
            };
            let started = resolve(config, store, &request)
                .and_then(|entities| begin(gate, store, target, &entities, false, *deep));
            match started {
                Ok(()) => {
                    tracing::info!(target_name = %target, entity = %entity, "scheduled reconciliation started");
                    let record = AuditRecord {
                        time_micros: chrono::Utc::now().timestamp_micros(),
                        entity: entity.clone(),
                        key: "*".into(),
                        version: 0,
                        target: Some(target.clone()),
                        decision: "reconcile".into(),
                        detail: if *deep {
                            "scheduled deep reconciliation started".into()
                        } else {
                            "scheduled reconciliation started".into()
                        },
                        user: None,
                        comment: None,
                        seq: None,
                    };
                    if let Err(e) = store.audit_append(&[record]) {
                        tracing::warn!(error = %e, "cannot write the audit record of a reconciliation");
                    }
                    *next = window.next_open_after(now).unwrap_or(i64::MAX);
                }
                // Busy (a snapshot of the pair is running): tried again next round.
                Err(e) => {
                    tracing::debug!(target_name = %target, entity = %entity, error = %format!("{e:#}"), "scheduled reconciliation waits");
                }
            }
        }
    }
}

/// One line of `steward reconcile`'s report.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ReconcileLine {
    pub target: String,
    pub entity: String,
    pub dry_run: bool,
    #[serde(default)]
    pub deep: bool,
    pub done: bool,
    #[serde(flatten)]
    pub counts: ReconcileCounts,
    pub finished_at: Option<String>,
    pub last_error: Option<String>,
}

impl ReconcileLine {
    /// The line of a job's findings.
    pub fn new(
        target: &str,
        entity: &str,
        dry_run: bool,
        deep: bool,
        done: bool,
        c: &ReconcileCounts,
    ) -> ReconcileLine {
        ReconcileLine {
            target: target.to_string(),
            entity: entity.to_string(),
            dry_run,
            deep,
            done,
            counts: *c,
            finished_at: None,
            last_error: None,
        }
    }
}

impl From<&SnapshotJob> for ReconcileLine {
    fn from(j: &SnapshotJob) -> Self {
        ReconcileLine {
            finished_at: j.finished_at.clone(),
            last_error: j.last_error.clone(),
            ..ReconcileLine::new(
                &j.target,
                &j.entity,
                j.dry_run,
                j.deep,
                j.phase == SnapshotPhase::Done,
                &j.counts,
            )
        }
    }
}
