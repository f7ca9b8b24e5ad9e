//! What the running daemon can be asked and told, whoever asks: the
//! control API's handlers on the Unix socket and the console's pages call
//! the same [`Control`] methods, so a release, a replay or a reset does the
//! same thing and writes the same audit record from either. The methods
//! reach the running pipeline through channels (see [`RunHandles`]).

use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use axum::http::StatusCode;
use tokio::sync::{mpsc, oneshot};

use super::wire;
use crate::daemon::govern::{self, Actor, GovCall};
use crate::daemon::snapshot::{self, ResetCall, ResetRequest};
use crate::daemon::{record, schema, DaemonState};
use steward_core::config::Config;
use steward_core::model::Lsn;
use steward_core::pipeline::govern::RecordState;
use steward_sinks::requests::{Inbox, Request as DriverRequest, Response as DriverResponse};
use steward_store::audit::AuditFilter;
use steward_store::backup::BackupReport;
use steward_store::governance::AuditRecord;
use steward_store::{DeadLetter, DlqFilter, Store, TargetStats};

/// How long a request waits for the consume loop, a driver or the
/// snapshot task before it is answered "busy" (503).
const ANSWER_WITHIN: Duration = Duration::from_secs(30);

/// What the methods reach of one daemon run (one per configuration load).
pub struct RunHandles {
    pub config: Config,
    pub store: Store,
    /// To the consume loop, which owns the governance state.
    pub governance: mpsc::Sender<GovCall>,
    /// To the snapshot task.
    pub resets: mpsc::Sender<ResetCall>,
    /// Per target name, its driver's inbox.
    pub inboxes: HashMap<String, Inbox>,
}

/// Why a request was not done: an HTTP status, a stable code for programs
/// and a message for people (the API answers `{"error": {code, message}}`).
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    pub fn internal(e: impl std::fmt::Display) -> ApiError {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("{e:#}"),
        )
    }

    fn busy(what: &str) -> ApiError {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "busy",
            format!(
                "{what} did not answer within {} s; see the daemon's log",
                ANSWER_WITHIN.as_secs()
            ),
        )
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// The daemon's operations, one handle shared by every front end.
#[derive(Clone)]
pub struct Control {
    state: Arc<DaemonState>,
    /// `None` while the daemon starts (before the state file is open) and
    /// between the runs of a reload.
    run: Arc<RwLock<Option<Arc<RunHandles>>>>,
}

impl Control {
    pub(super) fn new(state: Arc<DaemonState>) -> Control {
        Control {
            state,
            run: Arc::new(RwLock::new(None)),
        }
    }

    pub(super) fn set_run(&self, run: Option<RunHandles>) {
        *self.run.write().unwrap_or_else(PoisonError::into_inner) = run.map(Arc::new);
    }

    fn current(&self) -> Option<Arc<RunHandles>> {
        self.run
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn running(&self) -> Result<Arc<RunHandles>, ApiError> {
        self.current().ok_or_else(|| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "starting",
                "the daemon is starting (or reloading its configuration) and has not opened the \
                 state file yet; try again in a moment",
            )
        })
    }

    /// The running configuration; `None` while the daemon starts or reloads.
    pub fn config(&self) -> Option<Config> {
        self.current().map(|run| run.config.clone())
    }

    /// Which API and which daemon answer.
    pub fn version() -> wire::Version {
        wire::Version {
            api: super::API_VERSION.to_string(),
            daemon: env!("CARGO_PKG_VERSION").to_string(),
            pid: std::process::id(),
        }
    }

    /// The daemon's view of itself and its targets.
    pub async fn status(&self) -> Result<wire::Status, ApiError> {
        let run = self.current();
        let state = self.state.clone();
        blocking(move || Ok(collect_status(run.as_deref(), &state))).await
    }

    /// Snapshot and resynchronisation progress per target and entity.
    pub async fn snapshots(&self) -> Result<wire::Snapshots, ApiError> {
        let run = self.running()?;
        let lines = blocking(move || Ok(snapshot::status_lines(&run.store))).await?;
        Ok(wire::Snapshots { snapshots: lines })
    }

    /// The quarantine; with `blocked_by` (`entity key`), only the records
    /// waiting for that record.
    pub async fn quarantine_list(
        &self,
        blocked_by: Option<String>,
    ) -> Result<wire::QuarantineList, ApiError> {
        let run = self.running()?;
        let request = govern::Request::QuarantineList { blocked_by };
        let response = governance(&run, request, None).await?;
        if let Some(e) = response.error {
            return Err(ApiError::internal(e));
        }
        Ok(wire::QuarantineList {
            quarantine: response.quarantine,
        })
    }

    /// One record's quarantine entry.
    pub async fn quarantine_show(
        &self,
        entity: String,
        key: String,
    ) -> Result<wire::QuarantineList, ApiError> {
        let run = self.running()?;
        let request = govern::Request::QuarantineShow { entity, key };
        let response = governance(&run, request, None).await?;
        if let Some(e) = response.error {
            return Err(ApiError::new(StatusCode::NOT_FOUND, "not_quarantined", e));
        }
        Ok(wire::QuarantineList {
            quarantine: response.quarantine,
        })
    }

    /// Re-evaluates a quarantined record and publishes it if it passes now,
    /// in `actor`'s name.
    pub async fn release(
        &self,
        actor: Actor,
        entity: String,
        key: String,
    ) -> Result<wire::Released, ApiError> {
        let run = self.running()?;
        let request = govern::Request::QuarantineRelease { entity, key };
        let response = governance(&run, request, Some(actor)).await?;
        match (response.error, response.message) {
            (None, Some(message)) => Ok(wire::Released {
                message,
                events: response.events,
            }),
            (Some(e), Some(_)) => Err(ApiError::new(StatusCode::CONFLICT, "still_quarantined", e)),
            (Some(e), None) => Err(ApiError::new(StatusCode::NOT_FOUND, "not_quarantined", e)),
            (None, None) => Err(ApiError::internal("the governance loop gave no answer")),
        }
    }

    /// Everything steward knows about one record (see `daemon::record`).
    /// The governance answers in the consume loop; the live row is read
    /// here, never there, so a slow source delays only this answer.
    pub async fn record(&self, entity: String, key: String) -> Result<wire::Record, ApiError> {
        let run = self.running()?;
        if run.config.entity(&entity).is_none() {
            let names: Vec<&str> = run
                .config
                .entities
                .iter()
                .map(|e| e.name.as_str())
                .collect();
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "unknown_entity",
                format!(
                    "no entity `{entity}` in the running configuration; configured entities: {}",
                    names.join(", ")
                ),
            ));
        }
        let request = govern::Request::Record {
            entity: entity.clone(),
            key: key.clone(),
        };
        let response = governance(&run, request, None).await?;
        let status = match (response.record, response.error) {
            (Some(status), _) => *status,
            (None, Some(e)) => return Err(ApiError::new(StatusCode::NOT_FOUND, "not_a_record", e)),
            (None, None) => return Err(ApiError::internal("the governance loop gave no answer")),
        };
        let live = record::live_row(&run.config, &entity, &key).await;
        blocking(move || {
            record::assemble(&run.config, &run.store, status, Some(live))
                .map_err(ApiError::internal)
        })
        .await
    }

    /// The audit trail's records that `filter` selects.
    pub async fn audit(&self, filter: AuditFilter) -> Result<wire::AuditList, ApiError> {
        let run = self.running()?;
        let audit =
            blocking(move || run.store.audit_query(&filter).map_err(ApiError::internal)).await?;
        Ok(wire::AuditList { audit })
    }

    /// Copies the state file to `request.dest` while the pipeline goes on.
    pub async fn backup(
        &self,
        actor: Actor,
        request: wire::BackupRequest,
    ) -> Result<BackupReport, ApiError> {
        if !request.dest.is_absolute() {
            return Err(ApiError::bad_request(format!(
                "dest `{}` must be an absolute path (the daemon's working directory is not yours)",
                request.dest.display()
            )));
        }
        if !request.force && std::fs::symlink_metadata(&request.dest).is_ok() {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "exists",
                format!(
                    "{} exists; give another path, or force (--force) to replace it",
                    request.dest.display()
                ),
            ));
        }
        let run = self.running()?;
        // The copy runs at disk speed on a blocking thread; the pipeline goes on.
        blocking(move || {
            let report = govern::backup(&run.store, &request.dest, request.force).map_err(|e| {
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "backup_failed",
                    format!("{e:#}"),
                )
            })?;
            let detail = format!(
                "backup written to {} ({} bytes, checkpoint {})",
                report.path.display(),
                report.bytes,
                report.checkpoint.as_deref().unwrap_or("none")
            );
            audit_append(
                &run.store,
                &[actor.record("*", "*", None, "backup", detail)],
            )?;
            Ok(report)
        })
        .await
    }

    /// Starts resynchronising `target` (all its entities, or `entities`)
    /// from a fresh snapshot.
    pub async fn reset(
        &self,
        actor: Actor,
        target: String,
        entities: Vec<String>,
    ) -> Result<wire::ResetStarted, ApiError> {
        let run = self.running()?;
        target_of(&run, &target)?;
        let reset = ResetRequest {
            target: target.clone(),
            entities,
            ..ResetRequest::default()
        };
        snapshot::resolve_request(&run.config, &reset)
            .map_err(|e| ApiError::bad_request(format!("{e:#}")))?;
        let (reply, answer) = oneshot::channel();
        run.resets
            .try_send(ResetCall {
                request: reset,
                reply,
            })
            .map_err(|_| ApiError::busy("the snapshot task"))?;
        let entities = match within("the snapshot task", answer).await? {
            Ok(entities) => entities,
            Err(message) => {
                return Err(ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "reset_failed",
                    message,
                ))
            }
        };
        let records: Vec<AuditRecord> = entities
            .iter()
            .map(|e| {
                actor.record(
                    e,
                    "*",
                    Some(&target),
                    "reset",
                    "resynchronisation from a fresh snapshot requested".to_string(),
                )
            })
            .collect();
        let store = run.store.clone();
        blocking(move || audit_append(&store, &records)).await?;
        Ok(wire::ResetStarted { target, entities })
    }

    /// Starts a reconciliation of `entities` of `target` (see
    /// `daemon::reconcile`); its progress and results are in the snapshot
    /// lines (`reconcile` set).
    pub async fn reconcile(
        &self,
        actor: Actor,
        target: String,
        entities: Vec<String>,
        dry_run: bool,
        deep: bool,
    ) -> Result<wire::ResetStarted, ApiError> {
        let run = self.running()?;
        target_of(&run, &target)?;
        let request = ResetRequest {
            target: target.clone(),
            entities,
            reconcile: true,
            dry_run,
            deep,
        };
        snapshot::resolve_request(&run.config, &request)
            .map_err(|e| ApiError::bad_request(format!("{e:#}")))?;
        if deep {
            if let Some(t) = run.config.target(&target) {
                steward_sinks::target_reader(t, &run.config).map_err(ApiError::bad_request)?;
            }
        }
        let (reply, answer) = oneshot::channel();
        run.resets
            .try_send(ResetCall { request, reply })
            .map_err(|_| ApiError::busy("the snapshot task"))?;
        let entities = match within("the snapshot task", answer).await? {
            Ok(entities) => entities,
            Err(message) => {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    "reconcile_refused",
                    message,
                ))
            }
        };
        let detail = match (deep, dry_run) {
            (true, true) => "deep reconciliation requested (dry run)",
            (true, false) => "deep reconciliation requested",
            (false, true) => "reconciliation requested (dry run)",
            (false, false) => "reconciliation requested",
        };
        let records: Vec<AuditRecord> = entities
            .iter()
            .map(|e| actor.record(e, "*", Some(&target), "reconcile", detail.to_string()))
            .collect();
        let store = run.store.clone();
        blocking(move || audit_append(&store, &records)).await?;
        Ok(wire::ResetStarted { target, entities })
    }

    /// Opens `target`'s batch windows now.
    pub async fn flush(&self, actor: Actor, target: String) -> Result<(), ApiError> {
        let run = self.running()?;
        target_of(&run, &target)?;
        driver(&run, &target, DriverRequest::Flush).await?;
        let record = actor.record(
            "*",
            "*",
            Some(&target),
            "flush",
            "batch windows opened now".to_string(),
        );
        let store = run.store.clone();
        blocking(move || audit_append(&store, &[record])).await
    }

    /// `target`'s dead letters that `filter` selects.
    pub async fn dead_letters(
        &self,
        target: String,
        filter: DlqFilter,
    ) -> Result<Vec<DeadLetter>, ApiError> {
        let run = self.running()?;
        target_of(&run, &target)?;
        blocking(move || {
            run.store
                .dead_letters(&target, &filter)
                .map_err(ApiError::internal)
        })
        .await
    }

    /// One dead letter of `target`.
    pub async fn dead_letter(&self, target: String, id: u64) -> Result<DeadLetter, ApiError> {
        let filter = DlqFilter {
            id: Some(id),
            ..DlqFilter::default()
        };
        let found = self.dead_letters(target.clone(), filter).await?;
        found.into_iter().next().ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "no_dead_letter",
                format!("no dead letter with id {id} in target {target}"),
            )
        })
    }

    /// Sends `target`'s dead letters that `filter` selects again.
    pub async fn replay(
        &self,
        actor: Actor,
        target: String,
        filter: DlqFilter,
    ) -> Result<wire::Count, ApiError> {
        self.dlq_change(actor, target, filter, false).await
    }

    /// Deletes `target`'s dead letters that `filter` selects; an empty
    /// filter needs `all`.
    pub async fn drop_dead_letters(
        &self,
        actor: Actor,
        target: String,
        filter: DlqFilter,
        all: bool,
    ) -> Result<wire::Count, ApiError> {
        if filter == DlqFilter::default() && !all {
            return Err(ApiError::bad_request(
                "a drop deletes events for good: give a filter (id, key or entity), or all: true \
                 to drop every dead letter of the target",
            ));
        }
        self.dlq_change(actor, target, filter, true).await
    }

    /// A replay or a drop, by the target's driver, each dead letter it
    /// concerns written to the audit trail in the person's name.
    async fn dlq_change(
        &self,
        actor: Actor,
        target: String,
        filter: DlqFilter,
        drop: bool,
    ) -> Result<wire::Count, ApiError> {
        let run = self.running()?;
        let concerned = self.dead_letters(target.clone(), filter.clone()).await?;
        let request = if drop {
            DriverRequest::Drop { filter }
        } else {
            DriverRequest::Replay { filter }
        };
        let count = match driver(&run, &target, request).await? {
            DriverResponse::Replayed { count } | DriverResponse::Dropped { count } => count,
            other => return Err(ApiError::internal(format!("unexpected answer {other:?}"))),
        };
        if drop {
            // The target never got these: a reconciliation sends them again.
            let records = concerned
                .iter()
                .map(|d| (d.event.entity.clone(), d.event.key.clone()))
                .collect();
            let forget = govern::Request::ForgetSent {
                target: target.clone(),
                records,
            };
            governance(&run, forget, None).await?;
        }
        let decision = if drop { "dlq_dropped" } else { "dlq_replayed" };
        let records: Vec<AuditRecord> = concerned
            .iter()
            .map(|d| {
                let mut record = actor.record(
                    &d.event.entity,
                    &d.event.key,
                    Some(&target),
                    decision,
                    format!("dead letter {}: {}", d.id, d.error),
                );
                record.version = d.event.version;
                record
            })
            .collect();
        let store = run.store.clone();
        blocking(move || audit_append(&store, &records)).await?;
        Ok(wire::Count { count })
    }
}

/// The console's questions: the same governance state, asked through the
/// same consume loop as the control API's.
impl Control {
    /// Per entity the records in each state (dead-lettered: the records
    /// with a dead letter at some target), and what the open exceptions
    /// hold back.
    pub async fn overview(&self) -> Result<wire::Overview, ApiError> {
        let run = self.running()?;
        let response = governance(&run, govern::Request::Overview, None).await?;
        if let Some(e) = response.error {
            return Err(ApiError::internal(e));
        }
        let store_run = run.clone();
        let dead_lettered = blocking(move || {
            let mut keys = std::collections::HashSet::new();
            for target in &store_run.config.targets {
                keys.extend(
                    store_run
                        .store
                        .held_keys(&target.name)
                        .map_err(ApiError::internal)?,
                );
            }
            let mut counts: HashMap<String, u64> = HashMap::new();
            for key in &keys {
                if let Some((entity, _)) = key.split_once('\0') {
                    *counts.entry(entity.to_string()).or_default() += 1;
                }
            }
            let now = chrono::Utc::now();
            let lag = store_run
                .config
                .targets
                .iter()
                .map(|t| {
                    let age = match store_run.store.oldest_pending(&t.name) {
                        Ok(Some((_, event))) => chrono::DateTime::parse_from_rfc3339(&event.time)
                            .ok()
                            .map(|at| (now - at.with_timezone(&chrono::Utc)).num_seconds().max(0)),
                        _ => None,
                    };
                    wire::TargetLag {
                        target: t.name.clone(),
                        oldest_undelivered_seconds: age.and_then(|a| u64::try_from(a).ok()),
                    }
                })
                .collect();
            Ok((counts, lag))
        })
        .await?;
        let (dead_lettered, lag) = dead_lettered;
        Ok(wire::Overview {
            lag,
            entities: response
                .counts
                .into_iter()
                .map(|c| wire::EntityLine {
                    dead_lettered: dead_lettered.get(&c.entity).copied().unwrap_or(0),
                    records: c,
                })
                .collect(),
            held_back: response
                .held_back
                .iter()
                .map(|h| wire::HeldBackLine {
                    text: h.to_string(),
                    held: h.clone(),
                })
                .collect(),
        })
    }

    /// The keys of `entity`'s records in `state` (at most `limit`), and
    /// how many there are.
    pub async fn records_in_state(
        &self,
        entity: String,
        state: RecordState,
        limit: usize,
    ) -> Result<(Vec<String>, u64), ApiError> {
        let run = self.running()?;
        let request = govern::Request::RecordsInState {
            entity,
            state,
            limit,
        };
        let response = governance(&run, request, None).await?;
        match response.error {
            Some(e) => Err(ApiError::new(StatusCode::NOT_FOUND, "unknown_entity", e)),
            None => Ok((response.keys, response.total)),
        }
    }
}

/// A blocking store call off the async threads.
pub(super) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(|| {
        let result = f();
        crate::daemon::idle::thread_idle();
        result
    })
    .await
    .map_err(ApiError::internal)?
}

async fn within<T>(what: &str, answer: oneshot::Receiver<T>) -> Result<T, ApiError> {
    match tokio::time::timeout(ANSWER_WITHIN, answer).await {
        Ok(Ok(answer)) => Ok(answer),
        Ok(Err(_)) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "stopping",
            format!("{what} stopped before answering (the daemon is stopping or reloading)"),
        )),
        Err(_) => Err(ApiError::busy(what)),
    }
}

fn audit_append(store: &Store, records: &[AuditRecord]) -> Result<(), ApiError> {
    store.audit_append(records).map_err(|e| {
        ApiError::internal(format!(
            "the action was done, but its audit record could not be written: {e}"
        ))
    })
}

fn target_of(run: &RunHandles, target: &str) -> Result<(), ApiError> {
    if run.config.target(target).is_some() {
        return Ok(());
    }
    let names: Vec<&str> = run.config.targets.iter().map(|t| t.name.as_str()).collect();
    Err(ApiError::new(
        StatusCode::NOT_FOUND,
        "unknown_target",
        format!(
            "no target `{target}` in the running configuration; configured targets: {}",
            names.join(", ")
        ),
    ))
}

/// The daemon's status, from its in-memory state and the store.
fn collect_status(run: Option<&RunHandles>, state: &DaemonState) -> wire::Status {
    use std::sync::atomic::Ordering;
    let Some(run) = run else {
        return wire::Status {
            pid: std::process::id(),
            starting: true,
            source_connected: false,
            durable_lsn: None,
            last_source_error: None,
            store_bytes: 0,
            targets: Vec::new(),
            snapshots: Vec::new(),
            stopped_entities: Vec::new(),
        };
    };
    let store = &run.store;
    let targets = run
        .config
        .targets
        .iter()
        .map(|t| match store.target_stats(&t.name) {
            Ok(stats) => wire::TargetStatusLine::new(&t.name, stats),
            Err(e) => wire::TargetStatusLine {
                last_error: Some(format!("cannot read the target's state: {e}")),
                ..wire::TargetStatusLine::new(&t.name, TargetStats::default())
            },
        })
        .collect();
    wire::Status {
        pid: std::process::id(),
        starting: false,
        source_connected: state.connected.load(Ordering::Relaxed),
        durable_lsn: Some(Lsn(state.durable_lsn.load(Ordering::Relaxed)).to_string()),
        last_source_error: state
            .last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone(),
        store_bytes: store.file_size(),
        targets,
        snapshots: snapshot::status_lines(store),
        stopped_entities: schema::stopped(store),
    }
}

/// Asks the consume loop; `actor` is who acts (`None` for a question).
async fn governance(
    run: &RunHandles,
    request: govern::Request,
    actor: Option<Actor>,
) -> Result<govern::Response, ApiError> {
    let (reply, answer) = oneshot::channel();
    let call = GovCall {
        request,
        actor,
        reply,
    };
    run.governance.try_send(call).map_err(|e| match e {
        mpsc::error::TrySendError::Full(_) => ApiError::busy("the governance loop"),
        mpsc::error::TrySendError::Closed(_) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "stopping",
            "the daemon is stopping or reloading",
        ),
    })?;
    within("the governance loop", answer).await
}

/// Hands a request to a target's driver.
async fn driver(
    run: &RunHandles,
    target: &str,
    request: DriverRequest,
) -> Result<DriverResponse, ApiError> {
    let Some(inbox) = run.inboxes.get(target) else {
        return Err(ApiError::internal(format!(
            "target `{target}` has no driver"
        )));
    };
    let answer = inbox.submit(request);
    match within(&format!("the driver of target `{target}`"), answer).await? {
        DriverResponse::Error { message } => Err(ApiError::internal(message)),
        response => Ok(response),
    }
}
