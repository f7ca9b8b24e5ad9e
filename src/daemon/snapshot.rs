//! Initial snapshots and resynchronisation (`steward reset`), running in
//! their own task while streaming to every target goes on.
//!
//! ## Ordering snapshot rows against streamed events
//!
//! Snapshot rows and streamed events go into the same per-target outbox, and
//! per key a target must never get an older version after a newer one. A
//! snapshot read at consistent point C contains exactly the transactions
//! whose commit LSN is below C; its rows get version C − 1 (see
//! `pipeline::snapshot_version`), so they are newer than everything they
//! contain and older than every streamed transaction they do not contain.
//!
//! A snapshot chunk is governed only once the stream has passed C (see
//! `daemon::govern_parked_chunk`), so every streamed change older than C is
//! appended before the snapshot's rows and every change appended after them
//! is newer than C − 1. What is left to order is a streamed change newer
//! than C that went out before the chunk holding its key was governed.
//! While a (target, entity) is being snapshotted its *window* is open: each
//! streamed event for it records its version in a per-key map in the store
//! (`store::snapshot_progress`), and each snapshot row is checked against
//! the map under one lock (the [`SnapshotGate`]); a row older than the
//! version recorded for its key is dropped. Rows are not recorded (nothing
//! older can follow them), which keeps a snapshot into N targets from paying
//! N map inserts per row:
//!
//! ```text
//!  stream (commit order)  ── v=90 k=1 ── v=95 k=3 ── v=130 k=2 ──┬──────────▶
//!                                │           │           │        │ stream passes C
//!  snapshot at C=120 (v=119)  ───┼───────────┼───────────┼────────┴ k=1 ─ k=2 ─ k=3 ─▶
//!                                ▼           ▼           ▼            ▼     ▼     ▼
//!  version map / outbox:     k1:90 ✓     k3:95 ✓    k2:130 ✓       k1 ✓  k2 ✗  k3 ✓
//! ```
//!
//! - A streamed change older than C (already in the snapshot) is superseded
//!   by the snapshot row that follows it.
//! - A streamed change newer than C is kept; a snapshot row arriving after it
//!   for the same key is dropped.
//!
//! The window opens before the snapshot's consistent point is known (at
//! reset time, or at start-up before streaming begins) and closes once the
//! job is done AND the stream's durable checkpoint has passed C: after that
//! no change older than C can arrive any more, so the map is dropped and
//! streaming pays nothing for it.
//!
//! The map update is written (not durably) before the append it admits and
//! made durable by it. After a crash in between, the map may name a version
//! whose event is missing: the server replays its transaction (it was not
//! confirmed), and the event passes again (equal versions pass). So the map
//! can only err towards admitting, never towards losing.
//!
//! ## Crashes mid-snapshot
//!
//! A job records, with each chunk appended, the key of its last row. An
//! exported snapshot does not survive the exporting session, so a restarted
//! job continues after that key in a NEW snapshot (a temporary slot at a
//! later consistent point C2): rows already sent (version C − 1) are then
//! brought up to date by the stream (its changes since are newer than
//! C − 1 and pass the window), and rows read from C2 carry version C2 − 1.
//!
//! ## Requests from `steward reset`
//!
//! Against a running daemon, `steward reset` asks the control API, which
//! hands the request to this task ([`ResetCall`]); it is applied between
//! snapshot rounds, never while a job runs. Against a stopped daemon, the
//! CLI records the jobs in the store itself.

mod deep;

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use steward_core::config::{Config, EntityIndex, TargetIndex};
use steward_core::model::split_key;
use steward_core::model::{Event, Lsn, SourceChange};
use steward_core::pipeline::{absent_mapped, snapshot_mapped, Governance, Mapped, Pipeline};
use steward_core::state::canonical_integer;
use steward_source::snapshot::{self as source_snapshot, SnapshotReader, TableRead};
use steward_store::{ReconcileCounts, SnapshotJob, SnapshotPhase, Store, VersionCheck};

/// Keys looked up in the source per query while sweeping for keys gone.
const SWEEP_BATCH: usize = 1000;
/// Keys the target was sent read from the store at a time while sweeping.
const SWEEP_KEYS: usize = 4 * SWEEP_BATCH;

/// What a reconciliation's sweep reads and maps with.
struct Sweep<'a> {
    read: &'a TableRead,
    relation: &'a steward_core::model::Relation,
    pipeline: &'a Pipeline,
    entity: EntityIndex,
    time: &'a str,
    /// The snapshot's consistent point: keys gone are deleted as of it.
    consistent: Lsn,
}

impl Sweep<'_> {
    /// The record of a key gone from the source (`parts`: its key columns'
    /// texts, in key order), mapped as deleted at the consistent point.
    fn gone(&self, parts: &[String]) -> anyhow::Result<Option<Mapped>> {
        let mut row = vec![None; self.relation.columns.len()];
        let key_positions = self
            .read
            .key
            .iter()
            .filter_map(|k| self.relation.columns.iter().position(|c| &c.name == k));
        for (part, at) in parts.iter().zip(key_positions) {
            row[at] = Some(part.clone());
        }
        Ok(absent_mapped(
            self.pipeline,
            self.relation.id,
            self.entity,
            row,
            self.consistent,
            self.time,
        )?)
    }
}

/// Integer keys a target was sent read from the store at a time while
/// comparing a chunk's range with them.
const GONE_KEYS: usize = 20_000;

/// PostgreSQL's integer types: a key column of one of them is read in the
/// order [`steward_core::state::published_store_key`] stores its values.
const INTEGER_TYPES: [u32; 3] = [20, 21, 23];

/// Rows per chunk (one store commit each) of a read for one target;
/// `STEWARD_SNAPSHOT_CHUNK_ROWS` overrides it (smaller chunks: less work
/// repeated after a crash, more commits). A 1,000,000-row snapshot into one
/// target peaked at 63.6 MiB at 75,854 rows/s with 5,000 rows a chunk,
/// 82.7–84.7 MiB at 66,462–68,968 rows/s with 10,000 (profiling build,
/// `STEWARD_BENCH_TARGETS=1 cargo bench --bench snapshot -- SNAPSHOT`).
pub const CHUNK_ROWS: usize = 5_000;
/// The fewest rows per chunk of a read shared by many targets.
const MIN_SHARED_CHUNK_ROWS: usize = 1_000;

/// Rows per chunk of a read feeding `targets` targets. Each row becomes an
/// event and an audit record per target, and up to three chunks are in
/// memory at once (one written, one governed, the next read; see
/// [`Worker::run_group`]), so the chunk shrinks with the targets
/// and the events in flight stay about the same: a 1,000,000-row snapshot
/// into three targets peaked at 64.9 MiB at 30,612 rows/s with 1,666 rows
/// a chunk, 78.6–82.0 MiB at 24,564–31,744 rows/s with 3,333
/// (`STEWARD_BENCH_TARGETS=3 cargo bench --bench snapshot -- SNAPSHOT`).
/// A reconciliation sends only what differs: its chunks are sized by the
/// targets that its last chunk sent much to (see [`Worker::run_group`]).
///
/// Those figures are for a few mapped columns. A governed entity is read
/// whole (its gate, rules and routes may use any column: an Odoo product
/// has about 70), each row several kilobytes once mapped, so past
/// [`NARROW_COLUMNS`] a chunk holds fewer rows, as many cells as a narrow one.
pub(crate) fn chunk_rows(targets: usize, columns: usize) -> usize {
    std::env::var("STEWARD_SNAPSHOT_CHUNK_ROWS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|n| *n > 0)
        .unwrap_or_else(|| {
            let rows = (CHUNK_ROWS / targets.max(1)).max(MIN_SHARED_CHUNK_ROWS);
            if columns <= NARROW_COLUMNS {
                rows
            } else {
                (rows * NARROW_COLUMNS / columns).max(MIN_WIDE_CHUNK_ROWS)
            }
        })
}

/// Columns up to which a read's chunks are sized by rows alone.
const NARROW_COLUMNS: usize = 16;
/// The fewest rows per chunk of a read of whole rows.
const MIN_WIDE_CHUNK_ROWS: usize = 200;

/// The next chunk's rows of a reconciliation whose last chunk of `rows`
/// rows found `counts` (one per target): targets a tenth of whose rows
/// differed get events like a snapshot's, so the chunk shrinks as for a
/// snapshot into that many targets; with none, it is one target's.
fn reconcile_chunk_rows(counts: &[ReconcileCounts], rows: usize, columns: usize) -> usize {
    let sending = counts
        .iter()
        .filter(|c| c.checked.saturating_sub(c.equal) * 10 >= rows as u64)
        .count();
    chunk_rows(sending.max(1), columns)
}

/// Progress is logged at most this often per job.
const LOG_EVERY: Duration = Duration::from_secs(5);
/// How often the task looks for closable windows.
const POLL: Duration = Duration::from_millis(500);

/// The (target, entity) pairs with an open window, behind the lock that
/// serialises every filtered append. Cheap to clone.
#[derive(Clone, Default)]
pub struct SnapshotGate {
    windows: Arc<Mutex<HashSet<(String, String)>>>,
    /// The entities of `windows`, replaced before a guard that changed them
    /// releases the gate: the stream reads them without waiting for the
    /// gate, which a commit holds until its fsync is done.
    entities: Arc<Mutex<Vec<String>>>,
}

/// The gate's lock; see [`SnapshotGate::lock`].
pub struct GateGuard<'a> {
    windows: MutexGuard<'a, HashSet<(String, String)>>,
    entities: &'a Mutex<Vec<String>>,
    changed: bool,
}

impl std::ops::Deref for GateGuard<'_> {
    type Target = HashSet<(String, String)>;

    fn deref(&self) -> &Self::Target {
        &self.windows
    }
}

impl std::ops::DerefMut for GateGuard<'_> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        self.changed = true;
        &mut self.windows
    }
}

impl Drop for GateGuard<'_> {
    // Runs before `windows` is unlocked, so a window is listed by
    // `window_entities` before any append or snapshot can follow its opening.
    fn drop(&mut self) {
        if self.changed {
            let mut names: Vec<String> = self.windows.iter().map(|(_, e)| e.clone()).collect();
            names.sort_unstable();
            names.dedup();
            *self.entities.lock().unwrap_or_else(PoisonError::into_inner) = names;
        }
    }
}

impl SnapshotGate {
    /// The gate with the windows of the store's open jobs.
    pub fn from_store(store: &Store) -> anyhow::Result<SnapshotGate> {
        let gate = SnapshotGate::default();
        {
            let mut w = gate.lock();
            for job in store.snapshot_jobs()? {
                if job.window_open {
                    w.insert((job.target, job.entity));
                }
            }
        }
        Ok(gate)
    }

    pub fn lock(&self) -> GateGuard<'_> {
        GateGuard {
            windows: self.windows.lock().unwrap_or_else(PoisonError::into_inner),
            entities: &self.entities,
            changed: false,
        }
    }

    /// The entities with an open window for some target, sorted, without
    /// taking the gate: never waits for a commit in flight.
    pub fn window_entities(&self) -> MutexGuard<'_, Vec<String>> {
        self.entities.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Drops the events of `batch` (target index, event) that an open window
/// refuses. Call with the gate's guard held until the batch is committed.
pub fn filter_batch(
    windows: &HashSet<(String, String)>,
    store: &Store,
    target_names: &[String],
    batch: Vec<(TargetIndex, Event)>,
) -> anyhow::Result<Vec<(TargetIndex, Event)>> {
    if windows.is_empty() {
        return Ok(batch);
    }
    let open: Vec<(usize, &str)> = windows
        .iter()
        .filter_map(|(target, entity)| {
            let t = target_names.iter().position(|n| n == target)?;
            Some((t, entity.as_str()))
        })
        .collect();
    let windowed = |t: TargetIndex, e: &Event| {
        open.iter()
            .any(|&(o, entity)| o == t.0 && entity == e.entity)
    };
    let checks: Vec<VersionCheck<'_>> = batch
        .iter()
        .filter(|(t, e)| windowed(*t, e))
        .map(|(t, e)| VersionCheck {
            target: &target_names[t.0],
            entity: &e.entity,
            key: &e.key,
            version: e.version,
            record: e.change != Some(SourceChange::Snapshot),
        })
        .collect();
    if checks.is_empty() {
        return Ok(batch);
    }
    let admitted = store.admit_versions(&checks)?;
    drop(checks);
    let mut verdicts = admitted.into_iter();
    let mut dropped = 0usize;
    let kept: Vec<(TargetIndex, Event)> = batch
        .into_iter()
        .filter(|(t, e)| {
            if !windowed(*t, e) {
                return true;
            }
            let keep = verdicts.next().unwrap_or(true);
            dropped += usize::from(!keep);
            keep
        })
        .collect();
    if dropped > 0 {
        tracing::debug!(
            dropped,
            "streamed events older than a snapshot row already queued were dropped"
        );
    }
    Ok(kept)
}

/// A `steward reset` request.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ResetRequest {
    pub target: String,
    /// Empty: every entity of the target.
    #[serde(default)]
    pub entities: Vec<String>,
    /// A reconciliation (see `daemon::reconcile`) instead of a resend.
    #[serde(default)]
    pub reconcile: bool,
    /// A reconciliation that only counts.
    #[serde(default)]
    pub dry_run: bool,
    /// A reconciliation against the target's actual rows (PostgreSQL targets).
    #[serde(default)]
    pub deep: bool,
}

/// A reset for the snapshot task, from the control API: answered with the
/// entities being resynchronised, or why the request was refused.
pub struct ResetCall {
    pub request: ResetRequest,
    pub reply: tokio::sync::oneshot::Sender<Result<Vec<String>, String>>,
}

/// Checks a request against the configuration; returns the entities to resync.
pub fn resolve_request(config: &Config, request: &ResetRequest) -> anyhow::Result<Vec<String>> {
    let Some(target) = config.target(&request.target) else {
        anyhow::bail!(
            "unknown target '{}'; configured targets: {}",
            request.target,
            config
                .targets
                .iter()
                .map(|t| t.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    };
    if request.entities.is_empty() {
        return Ok(target.entities.clone());
    }
    for e in &request.entities {
        if !target.entities.contains(e) {
            anyhow::bail!(
                "target '{}' does not receive entity '{e}'; it receives: {}",
                target.name,
                target.entities.join(", ")
            );
        }
    }
    Ok(request.entities.clone())
}

/// Starts a resync under the gate: outbox rows of those entities dropped,
/// jobs pending, windows open.
pub fn begin_resync(
    gate: &SnapshotGate,
    store: &Store,
    target: &str,
    entities: &[String],
) -> anyhow::Result<()> {
    let mut windows = gate.lock();
    let jobs = store.begin_resync(target, entities, true)?;
    for job in jobs {
        windows.insert((job.target, job.entity));
    }
    Ok(())
}

/// Rows of one snapshot chunk on their way to the governance, which runs in
/// the daemon loop: snapshot rows take the same governed path as streamed
/// changes (see [`steward_core::pipeline::Governance::process_snapshot`]). The loop
/// governs them once it has processed the stream up to `consistent`,
/// commits the events durably and answers on `done`.
pub struct SnapshotChunk {
    pub mapped: Vec<Mapped>,
    pub consistent: Lsn,
    /// The targets the rows are for: one read feeds every target whose job
    /// reads the same entity from the same position in the same way.
    pub targets: Vec<TargetIndex>,
    /// A snapshot (true) sends every publishable record; a re-read after a
    /// configuration change (false) suppresses unchanged documents.
    pub force: bool,
    /// A re-read after a configuration change: records the target never
    /// had a decision about (it had no snapshot of them, and they have not
    /// changed since) are left alone: a new rule is not a change of them.
    pub known_only: bool,
    /// A reconciliation's: unchanged decisions are not audited.
    pub quiet: bool,
    /// What the loop does with the rows.
    pub kind: ChunkKind,
    /// A deep reconciliation's: what its target holds for the rows' keys.
    pub actual: Option<std::sync::Arc<steward_core::pipeline::target_rows::ActualRows>>,
    /// Answered once the chunk is governed and committed, with what each
    /// target's reconciliation found in it (in the order of `targets`).
    pub done: ChunkDone,
}

/// What the daemon loop does with a chunk's rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkKind {
    /// Govern them ([`Governance::process_snapshot`]).
    Govern,
    /// Only count what governing them would send (a dry-run reconciliation).
    Probe,
    /// Deletes of keys the target was sent that are gone from the source
    /// ([`Governance::reconcile_absent`]); `dry_run` only counts them.
    Absent { dry_run: bool },
}

pub struct Worker {
    pub config: Config,
    pub store: Store,
    pub gate: SnapshotGate,
    pub chunks: tokio::sync::mpsc::Sender<SnapshotChunk>,
    pub durable: watch::Receiver<Lsn>,
    /// The snapshot exported when the slot was created, if it was just now.
    pub initial: Option<SnapshotReader>,
    /// Resets asked for through the control API.
    pub resets: tokio::sync::mpsc::Receiver<ResetCall>,
    pub shutdown: watch::Receiver<bool>,
}

impl Worker {
    pub async fn run(mut self) {
        let mut attempt = 0u32;
        let mut schedule = block(|| super::reconcile::Schedule::new(&self.config, &self.store));
        loop {
            if *self.shutdown.borrow() {
                return;
            }
            self.take_resets();
            block(|| schedule.start_due(&self.config, &self.gate, &self.store));
            match self.round().await {
                Ok(true) => attempt = 0,
                Ok(false) => {
                    let mut shutdown = self.shutdown.clone();
                    tokio::select! {
                        _ = shutdown.changed() => return,
                        _ = tokio::time::sleep(POLL) => {}
                        Some(call) = self.resets.recv() => self.reset(call),
                    }
                }
                Err(e) => {
                    let delay = steward_source::stream::reconnect_delay(attempt);
                    attempt += 1;
                    tracing::warn!(error = %format!("{e:#}"), retry_in = ?delay, "snapshot interrupted; it resumes from its last chunk");
                    let mut shutdown = self.shutdown.clone();
                    tokio::select! {
                        _ = shutdown.changed() => return,
                        _ = tokio::time::sleep(delay) => {}
                        // A reset is answered at once, and tries again now.
                        Some(call) = self.resets.recv() => self.reset(call),
                    }
                }
            }
        }
    }

    /// Jobs of configured targets and entities only (a removed target's job waits).
    fn jobs(&self) -> anyhow::Result<Vec<SnapshotJob>> {
        let jobs = block(|| self.store.snapshot_jobs())?;
        Ok(jobs
            .into_iter()
            .filter(|j| {
                self.config
                    .target(&j.target)
                    .is_some_and(|t| t.entities.contains(&j.entity))
            })
            .collect())
    }

    /// One pass: close finished windows, run pending jobs. Ok(true) when work was done.
    async fn round(&mut self) -> anyhow::Result<bool> {
        let jobs = self.jobs()?;
        let durable = *self.durable.borrow();
        for job in &jobs {
            if job.window_open && job.phase == SnapshotPhase::Done && durable.0 >= job.window_until
            {
                let mut windows = self.gate.lock();
                block(|| self.store.close_snapshot_window(job))?;
                windows.remove(&(job.target.clone(), job.entity.clone()));
                tracing::info!(target_name = %job.target, entity = %job.entity, "snapshot complete; the stream has passed its consistent point");
            }
        }
        let active: Vec<SnapshotJob> = jobs
            .into_iter()
            .filter(|j| j.phase != SnapshotPhase::Done)
            .collect();
        if active.is_empty() {
            // An unused initial snapshot (every target has initial = "none").
            self.initial = None;
            return Ok(false);
        }
        let reader = match self.initial.take() {
            Some(r) => r,
            None => source_snapshot::open_temporary(&self.config.source)
                .await
                .context(
                    "cannot take a consistent snapshot through a temporary replication slot",
                )?,
        };
        tracing::info!(consistent_point = %reader.consistent, jobs = active.len(), "snapshot started");
        for group in read_groups(active) {
            if *self.shutdown.borrow() {
                return Ok(true);
            }
            let names: Vec<(String, String)> = group
                .iter()
                .map(|j| (j.target.clone(), j.entity.clone()))
                .collect();
            if let Err(e) = self.run_group(&reader, group).await {
                // Shown by `steward status` until the job makes progress again.
                let message = format!("{e:#}");
                let mut jobs = block(|| self.store.snapshot_jobs())?;
                jobs.retain(|j| names.contains(&(j.target.clone(), j.entity.clone())));
                for j in &mut jobs {
                    j.last_error = Some(message.clone());
                }
                block(|| self.store.put_snapshot_jobs(&jobs))?;
                return Err(e);
            }
        }
        Ok(true)
    }

    /// Reads one entity's table once for a group of jobs (see
    /// [`read_groups`]): every chunk is governed for all their targets at
    /// once, and each job records its own progress and findings.
    async fn run_group(
        &self,
        reader: &SnapshotReader,
        mut jobs: Vec<SnapshotJob>,
    ) -> anyhow::Result<()> {
        let config = &self.config;
        let Some(entity_index) = jobs.first().and_then(|j| config.entity_index(&j.entity)) else {
            return Ok(());
        };
        let mut target_indexes = Vec::with_capacity(jobs.len());
        jobs.retain(|job| match config.target_index(&job.target) {
            Some(t) => {
                target_indexes.push(t);
                true
            }
            None => false,
        });
        let Some(first) = jobs.first().cloned() else {
            return Ok(());
        };
        let entity = &config.entities[entity_index];
        let tracked = Governance::new(config)
            .tracked_entities()
            .any(|e| e == entity_index);
        let mut read = table_read(config, entity_index);
        if tracked {
            // Governance reads whole rows (gates and routes use unmapped columns).
            for column in reader.all_columns(&entity.schema, &entity.table).await? {
                if !read.columns.contains(&column) {
                    read.columns.push(column);
                }
            }
        }
        let relation = reader.relation(&read, 1).await?;
        let mut pipeline = Pipeline::new(config);
        if tracked {
            pipeline.capture_rows(entity_index);
        }
        let problem = pipeline
            .bind_relation(&relation)
            .into_iter()
            .find(|(e, _)| *e == entity_index);
        if let Some((_, e)) = problem {
            for job in &mut jobs {
                job.last_error = Some(e.to_string());
            }
            block(|| self.store.put_snapshot_jobs(&jobs))?;
            return Err(e.into());
        }
        let key_positions: Vec<usize> = entity
            .key
            .iter()
            .filter_map(|k| relation.columns.iter().position(|c| &c.name == k))
            .collect();
        // A reconciliation reading a table keyed by one integer column from
        // its first row compares each chunk with the keys the targets were
        // sent (see `SnapshotJob::swept_while_reading`). A group that read
        // part of the table without comparing (an older steward) sweeps all
        // of it after the table.
        let integer_key = matches!(key_positions.as_slice(),
            [at] if entity.key.len() == 1 && INTEGER_TYPES.contains(&relation.columns[*at].type_oid));
        let sweeps_while_reading = first.reconcile
            && !first.deep
            && integer_key
            && jobs
                .iter()
                .all(|j| j.last_key.is_none() || j.swept_while_reading);

        let consistent = reader.consistent;
        let estimate = if jobs.iter().any(|j| j.segments == 0 || j.rows_total == 0) {
            Some(reader.estimate_rows(&read).await?)
        } else {
            None
        };
        let now = || chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
        for job in &mut jobs {
            if let Some(estimate) = estimate.filter(|_| job.segments == 0 || job.rows_total == 0) {
                job.rows_total = estimate;
            }
            job.phase = SnapshotPhase::Running;
            job.swept_while_reading = sweeps_while_reading;
            job.consistent_lsn = Some(consistent.0);
            job.window_until = job.window_until.max(consistent.0);
            job.segments += 1;
            job.last_error = None;
            job.started_at.get_or_insert_with(now);
        }
        block(|| self.store.put_snapshot_jobs(&jobs))?;
        let target_names: Vec<String> = jobs.iter().map(|j| j.target.clone()).collect();
        tracing::info!(
            targets = ?target_names, entity = %first.entity, consistent_point = %consistent,
            resume_after = ?first.last_key, estimate = first.rows_total, "snapshot of entity started"
        );

        let mut deep = match target_indexes.as_slice() {
            [t] => deep::DeepRead::open(config, &first, *t)?,
            _ => None,
        };
        if let Some(d) = &deep {
            if !self
                .await_target_backlog(&first, consistent, d.target)
                .await?
            {
                return Ok(());
            }
        }
        let started = Instant::now();
        let rows_at_start = first.rows_done;
        let mut rows_done = first.rows_done;
        let mut last_log = Instant::now();
        let time = now();
        // A reconciliation starts with the chunk of one target: most of
        // what it reads is equal and sends nothing (a 1,000,000-row
        // reconciliation of three targets, 1,000 rows changed: 199,292 /
        // 202,324 rows/s at 55.8 / 58.8 MiB with 5,000 rows a chunk,
        // 161,552 / 180,048 at 46.3 / 47.0 MiB with 1,666).
        let columns = read.columns.len();
        let mut chunk = chunk_rows(if first.reconcile { 1 } else { jobs.len() }, columns);
        let kind = match (first.reconcile, first.dry_run) {
            (true, true) => ChunkKind::Probe,
            _ => ChunkKind::Govern,
        };
        // A chunk read and mapped: its rows, the key to read the next one
        // after, the mapped records, and when comparing while reading the
        // rows' integer keys (ascending).
        struct Fetched {
            rows: usize,
            asked: usize,
            last_key: Option<Vec<String>>,
            mapped: Vec<Mapped>,
            keys: Vec<u64>,
        }
        let fetch = |after: Option<Vec<String>>, asked: usize| {
            let (read, relation, pipeline) = (&read, &relation, &pipeline);
            let (key_positions, time) = (&key_positions, &time);
            async move {
                let rows = reader
                    .read_chunk(read, relation, after.as_deref(), asked)
                    .await?;
                let last_key = rows.last().map(|last| {
                    key_positions
                        .iter()
                        .map(|&i| last.get(i).cloned().flatten().unwrap_or_default())
                        .collect()
                });
                let keys = match (sweeps_while_reading, key_positions.as_slice()) {
                    (true, [at]) => rows
                        .iter()
                        .filter_map(|r| r.get(*at).and_then(Option::as_deref))
                        .filter_map(canonical_integer)
                        .collect(),
                    _ => Vec::new(),
                };
                let read = rows.len();
                let mut mapped = Vec::with_capacity(read);
                for row in rows {
                    if let Some(m) =
                        snapshot_mapped(pipeline, relation.id, entity_index, row, consistent, time)?
                    {
                        mapped.push(m);
                    }
                }
                anyhow::Ok(Fetched {
                    rows: read,
                    asked,
                    last_key,
                    mapped,
                    keys,
                })
            }
        };
        let sweep = Sweep {
            read: &read,
            relation: &relation,
            pipeline: &pipeline,
            entity: entity_index,
            time: &time,
            consistent,
        };
        // The greatest integer key read so far: the chunks compared cover
        // the targets' integer keys up to it.
        let mut compared_through = first
            .last_key
            .as_ref()
            .and_then(|k| k.first())
            .and_then(|k| canonical_integer(k));
        // Chunks handed to the daemon loop and not yet answered, oldest
        // first. A snapshot keeps two: the loop governs one while the
        // other is written, and the next is read and mapped meanwhile. A
        // reconciliation's comparisons (deep, dry-run, or sweeping the
        // targets' keys after each chunk) take one at a time.
        let depth = match sweeps_while_reading || deep.is_some() || kind == ChunkKind::Probe {
            true => 1,
            false => 2,
        };
        let mut outstanding: VecDeque<Unanswered> = VecDeque::with_capacity(depth);
        let mut fetched = fetch(first.last_key.clone(), chunk).await?;
        loop {
            if *self.shutdown.borrow() {
                return Ok(());
            }
            let Fetched {
                rows: n,
                asked,
                last_key,
                mapped,
                keys,
            } = fetched;
            if n > 0 {
                let actual = match &mut deep {
                    Some(d) => Some(
                        d.actual(mapped.iter().map(|m| m.event.key.as_str()))
                            .await?,
                    ),
                    None => None,
                };
                let message = SnapshotChunk {
                    mapped,
                    consistent,
                    targets: target_indexes.clone(),
                    // A reconciliation sends only documents that differ.
                    force: !first.reevaluate && !first.reconcile,
                    known_only: first.reevaluate,
                    quiet: first.reconcile,
                    kind,
                    actual,
                    done: tokio::sync::oneshot::channel().0,
                };
                let Some(answer) = self.hand_over(message).await else {
                    return Ok(()); // the daemon loop is gone: shutting down
                };
                outstanding.push_back(Unanswered {
                    answer,
                    rows: n,
                    last_key: last_key.clone(),
                    keys,
                });
            }
            let more = n > 0 && n >= asked;
            // The next chunk is read and mapped while the loop governs and
            // commits the ones handed over. The snapshot's transaction sees
            // the same rows whenever they are read; progress is recorded
            // only for chunks committed, in order.
            let next = async {
                match more {
                    true => fetch(last_key, chunk).await.map(Some),
                    false => Ok(None),
                }
            };
            let keep = if more { depth - 1 } else { 0 };
            let settled = async {
                let mut settled = Vec::new();
                while outstanding.len() > keep {
                    let done = outstanding.pop_front().expect("counted");
                    let Some(mut counts) = answered(done.answer).await? else {
                        return anyhow::Ok(None);
                    };
                    if sweeps_while_reading {
                        let Some(gone) = self
                            .govern_gone(
                                &target_names,
                                &target_indexes,
                                &sweep,
                                first.dry_run,
                                compared_through,
                                &done.keys,
                            )
                            .await?
                        else {
                            return Ok(None);
                        };
                        counts.iter_mut().zip(gone).for_each(|(c, g)| c.add(g));
                    }
                    if let Some(&last) = done.keys.last() {
                        compared_through = Some(last);
                    }
                    settled.push((done.rows, done.last_key, counts));
                }
                Ok(Some(settled))
            };
            let (settled, next) = tokio::join!(settled, next);
            let Some(settled) = settled? else {
                return Ok(()); // the daemon loop is gone: shutting down
            };
            for (n, last_key, counts) in settled {
                if first.reconcile {
                    chunk = reconcile_chunk_rows(&counts, n, columns);
                }
                rows_done += n as u64;
                for (job, found) in jobs.iter_mut().zip(counts) {
                    job.rows_read += n as u64;
                    job.rows_done += n as u64;
                    job.counts.add(found);
                    job.last_key = last_key.clone();
                    if job.reconcile {
                        super::reconcile::count(job, found);
                    }
                    metrics::counter!(steward_core::metric::SNAPSHOT_ROWS, "target" => job.target.clone())
                        .increment(n as u64);
                }
                block(|| self.store.put_snapshot_jobs(&jobs))?;
            }
            if last_log.elapsed() >= LOG_EVERY {
                last_log = Instant::now();
                let rate =
                    (rows_done - rows_at_start) as f64 / started.elapsed().as_secs_f64().max(1e-3);
                tracing::info!(
                    targets = ?target_names, entity = %first.entity, rows = rows_done,
                    estimate = first.rows_total, rows_per_s = rate as u64, "snapshot progress"
                );
            }
            match next? {
                Some(f) => fetched = f,
                None => break,
            }
        }
        for (job, &target) in jobs.iter_mut().zip(&target_indexes) {
            if job.swept_while_reading && job.swept_after.is_none() {
                // Every integer key up to the last one read was compared.
                job.swept_after = job
                    .last_key
                    .as_ref()
                    .and_then(|k| k.first())
                    .filter(|k| canonical_integer(k).is_some())
                    .cloned();
            }
            if job.reconcile {
                if let Some(d) = &mut deep {
                    if !self.sweep_target(reader, d, job, &sweep).await? {
                        return Ok(());
                    }
                }
                if !self
                    .sweep(reader, job, target, &sweep, deep.is_some())
                    .await?
                {
                    return Ok(());
                }
            }
            job.phase = SnapshotPhase::Done;
            job.finished_at = Some(now());
            block(|| self.store.put_snapshot_jobs(std::slice::from_ref(job)))?;
            if job.reconcile {
                super::reconcile::finished(&self.store, job);
            }
        }
        let secs = started.elapsed().as_secs_f64();
        tracing::info!(
            targets = ?target_names, entity = %first.entity, rows = rows_done,
            seconds = format!("{secs:.1}"),
            rows_per_s = ((rows_done - rows_at_start) as f64 / secs.max(1e-3)) as u64,
            "snapshot of entity finished"
        );
        Ok(())
    }

    /// Hands a chunk to the daemon loop and waits until it is governed and
    /// committed; `None` when the loop is gone (shutting down).
    async fn govern(&self, chunk: SnapshotChunk) -> anyhow::Result<Option<Vec<ReconcileCounts>>> {
        match self.hand_over(chunk).await {
            Some(answer) => answered(answer).await,
            None => Ok(None),
        }
    }

    /// Hands a chunk to the daemon loop; `None` when the loop is gone
    /// (shutting down). Its answer comes once it is governed and committed.
    async fn hand_over(&self, mut chunk: SnapshotChunk) -> Option<ChunkAnswer> {
        let (done, answer) = tokio::sync::oneshot::channel();
        chunk.done = done;
        self.chunks.send(chunk).await.ok()?;
        Some(answer)
    }

    /// Deletes at the targets, through the governance, the integer keys
    /// they were sent in (`after`, last of `keys`] that the chunk just
    /// read (`keys`, ascending) does not have: gone from the source. Each
    /// target deletes only what it was sent. Returns what each target
    /// found (in the order of `targets`); `None` when shutting down.
    async fn govern_gone(
        &self,
        target_names: &[String],
        targets: &[TargetIndex],
        sweep: &Sweep<'_>,
        dry_run: bool,
        after: Option<u64>,
        keys: &[u64],
    ) -> anyhow::Result<Option<Vec<ReconcileCounts>>> {
        let mut counts = vec![ReconcileCounts::default(); targets.len()];
        let Some(&through) = keys.last() else {
            return Ok(Some(counts));
        };
        let entity = &self.config.entities[sweep.entity].name;
        let mut from = after;
        loop {
            // A piece of the range at a time: up to where the first target
            // with more keys than one read takes stopped.
            let mut upto = through;
            let mut sent = Vec::new();
            for target in target_names {
                let piece = block(|| {
                    self.store
                        .published_integer_keys(target, entity, from, through, GONE_KEYS)
                })?;
                if piece.len() >= GONE_KEYS {
                    upto = upto.min(piece.last().copied().unwrap_or(through));
                }
                sent.extend(piece);
            }
            sent.retain(|k| *k <= upto && keys.binary_search(k).is_err());
            sent.sort_unstable();
            sent.dedup();
            for batch in sent.chunks(SWEEP_BATCH) {
                let mut mapped = Vec::with_capacity(batch.len());
                for key in batch {
                    let parts = [key.to_string()];
                    if let Some(m) = sweep.gone(&parts)? {
                        mapped.push(m);
                    }
                }
                if mapped.is_empty() {
                    continue;
                }
                let chunk = SnapshotChunk {
                    mapped,
                    consistent: sweep.consistent,
                    targets: targets.to_vec(),
                    force: false,
                    known_only: false,
                    quiet: true,
                    kind: ChunkKind::Absent { dry_run },
                    actual: None,
                    done: tokio::sync::oneshot::channel().0,
                };
                let Some(found) = self.govern(chunk).await? else {
                    return Ok(None);
                };
                counts.iter_mut().zip(found).for_each(|(c, f)| c.add(f));
            }
            if upto >= through {
                return Ok(Some(counts));
            }
            from = Some(upto);
        }
    }

    /// A reconciliation's second part: the keys the target was sent
    /// (`Store::published_keys`) that this snapshot does not have are
    /// deleted at the target, through the governance. After a deep job's
    /// sweep of the target's table (`deep`), which deleted the rows the
    /// target holds of keys gone, the others are only forgotten: the
    /// target is taken to hold none of them (reading it again would find
    /// the rows whose deletes are still on their way). A job that compared
    /// its chunks while reading ([`Worker::govern_gone`]) starts after the
    /// last integer key read and looks up only keys that are not such
    /// numbers. Resumable: the job records the last key swept. Ok(false)
    /// when shutting down.
    async fn sweep(
        &self,
        reader: &SnapshotReader,
        job: &mut SnapshotJob,
        target: TargetIndex,
        sweep: &Sweep<'_>,
        deep: bool,
    ) -> anyhow::Result<bool> {
        let consistent = reader.consistent;
        loop {
            if *self.shutdown.borrow() {
                return Ok(false);
            }
            let keys = block(|| {
                self.store.published_keys(
                    &job.target,
                    &job.entity,
                    job.swept_after.as_deref(),
                    SWEEP_KEYS,
                )
            })?;
            let Some(last) = keys.last().cloned() else {
                return Ok(true);
            };
            let mut counts = ReconcileCounts::default();
            for batch in keys.chunks(SWEEP_BATCH) {
                let parts: Vec<Vec<String>> = batch.iter().map(|k| split_key(k)).collect();
                // Swept while reading, the table had no integer key above
                // the sweep's start (see `SnapshotJob::swept_while_reading`):
                // only the other keys are looked up.
                let known_gone = |p: &Vec<String>| {
                    job.swept_while_reading
                        && matches!(p.as_slice(), [k] if canonical_integer(k).is_some())
                };
                let lookup: Vec<Vec<String>> =
                    parts.iter().filter(|p| !known_gone(p)).cloned().collect();
                let present: HashSet<Vec<String>> = reader
                    .present_keys(sweep.read, &lookup)
                    .await?
                    .into_iter()
                    .collect();
                let mut mapped = Vec::new();
                for key in parts.iter().filter(|p| !present.contains(*p)) {
                    if let Some(m) = sweep.gone(key)? {
                        mapped.push(m);
                    }
                }
                if mapped.is_empty() {
                    continue;
                }
                let actual = deep.then(|| {
                    std::sync::Arc::new(steward_core::pipeline::target_rows::ActualRows {
                        target,
                        rows: Default::default(),
                    })
                });
                let chunk = SnapshotChunk {
                    mapped,
                    consistent,
                    targets: vec![target],
                    force: false,
                    known_only: false,
                    quiet: true,
                    kind: ChunkKind::Absent {
                        dry_run: job.dry_run,
                    },
                    actual,
                    done: tokio::sync::oneshot::channel().0,
                };
                let Some(found) = self.govern(chunk).await? else {
                    return Ok(false);
                };
                found.into_iter().for_each(|f| counts.add(f));
            }
            job.counts.add(counts);
            job.swept_after = Some(last);
            block(|| self.store.put_snapshot_jobs(std::slice::from_ref(job)))?;
            super::reconcile::count(job, counts);
        }
    }

    /// Applies the resets waiting.
    fn take_resets(&mut self) {
        while let Ok(call) = self.resets.try_recv() {
            self.reset(call);
        }
    }

    fn reset(&self, call: ResetCall) {
        let request = call.request;
        let outcome = if request.reconcile {
            block(|| {
                let entities = super::reconcile::resolve(&self.config, &self.store, &request)?;
                super::reconcile::begin(
                    &self.gate,
                    &self.store,
                    &request.target,
                    &entities,
                    request.dry_run,
                    request.deep,
                )?;
                Ok(entities)
            })
        } else {
            resolve_request(&self.config, &request).and_then(|entities| {
                block(|| begin_resync(&self.gate, &self.store, &request.target, &entities))?;
                Ok(entities)
            })
        };
        let answer = match outcome {
            Ok(entities) => {
                if request.reconcile {
                    tracing::info!(target_name = %request.target, ?entities, dry_run = request.dry_run, deep = request.deep, "reconciliation requested");
                } else {
                    tracing::info!(target_name = %request.target, ?entities, "reset requested: resynchronising");
                }
                Ok(entities)
            }
            Err(e) => {
                tracing::error!(target_name = %request.target, error = %format!("{e:#}"), "rejected a reset request");
                Err(format!("{e:#}"))
            }
        };
        let _ = call.reply.send(answer);
    }
}

/// What each target found in a chunk, or why it was not committed.
type ChunkResult = Result<Vec<ReconcileCounts>, String>;
/// Where the daemon loop answers a chunk (see [`SnapshotChunk::done`]).
pub type ChunkDone = tokio::sync::oneshot::Sender<ChunkResult>;
/// Where the worker waits for that answer.
type ChunkAnswer = tokio::sync::oneshot::Receiver<ChunkResult>;

/// A chunk handed to the daemon loop, not yet answered: its rows, the key
/// the read goes on after, and its integer keys when sweeping while reading.
struct Unanswered {
    answer: ChunkAnswer,
    rows: usize,
    last_key: Option<Vec<String>>,
    keys: Vec<u64>,
}

/// What each target found in a chunk, once the loop governed and committed
/// it; `None` when the loop is gone (shutting down).
async fn answered(answer: ChunkAnswer) -> anyhow::Result<Option<Vec<ReconcileCounts>>> {
    match answer.await {
        Ok(Ok(counts)) => Ok(Some(counts)),
        Ok(Err(e)) => anyhow::bail!("{e}"),
        Err(_) => anyhow::bail!("the daemon loop dropped a snapshot chunk (the source session ended); the snapshot resumes"),
    }
}

/// Groups jobs that one table read can feed: the same entity read the same
/// way (snapshot, re-read or reconciliation) from the same position. The
/// jobs of a start-up snapshot or of `steward repair` are such a group, so
/// N targets cost one read of each table, not N.
fn read_groups(jobs: Vec<SnapshotJob>) -> Vec<Vec<SnapshotJob>> {
    let shares_read = |a: &SnapshotJob, b: &SnapshotJob| {
        a.entity == b.entity
            && a.reconcile == b.reconcile
            && a.dry_run == b.dry_run
            && a.reevaluate == b.reevaluate
            && a.last_key == b.last_key
            // A deep reconciliation reads its target's rows with each chunk: alone.
            && !a.deep
            && !b.deep
    };
    let mut groups: Vec<Vec<SnapshotJob>> = Vec::new();
    for job in jobs {
        match groups.iter_mut().find(|g| shares_read(&g[0], &job)) {
            Some(group) => group.push(job),
            None => groups.push(vec![job]),
        }
    }
    groups
}

/// What to read for entity `index`: its key, then every column any entity
/// of the same table maps (the pipeline plans them all from one relation).
pub fn table_read(config: &Config, index: EntityIndex) -> TableRead {
    let entity = &config.entities[index];
    let mut columns: Vec<String> = entity.key.clone();
    for other in config
        .entities
        .iter()
        .filter(|e| e.schema == entity.schema && e.table == entity.table)
    {
        let names = other
            .key
            .iter()
            .cloned()
            .chain(other.fields.iter().flat_map(|f| {
                std::iter::once(f.source.column.clone())
                    .chain(f.fallback.as_ref().map(|s| s.column.clone()))
            }));
        for name in names {
            if !columns.contains(&name) {
                columns.push(name);
            }
        }
    }
    TableRead {
        schema: entity.schema.clone(),
        table: entity.table.clone(),
        key: entity.key.clone(),
        columns,
    }
}

fn block<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

/// Status lines for `steward status` and the control API.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SnapshotStatusLine {
    pub target: String,
    pub entity: String,
    pub phase: SnapshotPhase,
    pub rows_done: u64,
    pub rows_total_estimate: u64,
    pub rows_read: u64,
    pub segments: u32,
    pub consistent_lsn: Option<String>,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub last_error: Option<String>,
    /// A governed re-read after a configuration change, not a snapshot.
    #[serde(default)]
    pub reevaluate: bool,
    /// Sending every record again after a restored backup.
    #[serde(default)]
    pub restore: bool,
    /// A reconciliation (sends only what differs), with what it found so far.
    #[serde(default)]
    pub reconcile: bool,
    #[serde(default)]
    pub dry_run: bool,
    /// A deep reconciliation (against the target's actual rows).
    #[serde(default)]
    pub deep: bool,
    #[serde(default)]
    pub counts: ReconcileCounts,
}

impl SnapshotStatusLine {
    /// The line of `steward reconcile`'s report.
    pub fn reconcile_line(&self) -> super::reconcile::ReconcileLine {
        super::reconcile::ReconcileLine {
            finished_at: self.finished_at.clone(),
            last_error: self.last_error.clone(),
            ..super::reconcile::ReconcileLine::new(
                &self.target,
                &self.entity,
                self.dry_run,
                self.deep,
                self.phase == SnapshotPhase::Done,
                &self.counts,
            )
        }
    }
}

impl From<&SnapshotJob> for SnapshotStatusLine {
    fn from(j: &SnapshotJob) -> Self {
        SnapshotStatusLine {
            target: j.target.clone(),
            entity: j.entity.clone(),
            phase: j.phase,
            rows_done: j.rows_done,
            rows_total_estimate: j.rows_total,
            rows_read: j.rows_read,
            segments: j.segments,
            consistent_lsn: j.consistent_lsn.map(|l| Lsn(l).to_string()),
            started_at: j.started_at.clone(),
            finished_at: j.finished_at.clone(),
            last_error: j.last_error.clone(),
            reevaluate: j.reevaluate,
            restore: j.restore,
            reconcile: j.reconcile,
            dry_run: j.dry_run,
            deep: j.deep,
            counts: j.counts,
        }
    }
}

pub fn status_lines(store: &Store) -> Vec<SnapshotStatusLine> {
    store
        .snapshot_jobs()
        .map(|jobs| jobs.iter().map(SnapshotStatusLine::from).collect())
        .unwrap_or_default()
}

/// What to tell the operator about the slot's state, if anything is wrong.
pub fn slot_advice(
    exists: Option<bool>,
    wal_status: Option<&str>,
    invalidation_reason: Option<&str>,
    slot: &str,
) -> Option<String> {
    if let Some(reason) = invalidation_reason {
        return Some(invalidated_slot_advice(reason, slot));
    }
    match (exists, wal_status) {
        (Some(false), _) => Some(format!(
            "slot '{slot}' is missing: if steward had streamed before, changes may be lost; \
             stop steward and run `steward repair -c FILE` (sends each target only what \
             differs) or `steward reset --all -c FILE` (sends everything), then start it"
        )),
        (_, Some("lost")) => Some(format!(
            "slot '{slot}' is invalidated (wal_status lost): the server removed WAL it still needed; \
             stop steward and run `steward repair -c FILE` (sends each target only what \
             differs) or `steward reset --all -c FILE` (sends everything), then start it"
        )),
        (_, Some("unreserved")) => Some(format!(
            "slot '{slot}' is at risk (wal_status unreserved): it is behind max_slot_wal_keep_size \
             and will be invalidated at the next checkpoint unless steward catches up; make sure \
             steward runs and the targets accept events, or raise max_slot_wal_keep_size"
        )),
        (_, Some("extended")) => Some(format!(
            "slot '{slot}' retains more WAL than max_wal_size (wal_status extended); steward is \
             lagging: check the daemon and its targets"
        )),
        _ => None,
    }
}

/// What to do about a slot PostgreSQL 17+ marked invalidated, by its
/// `invalidation_reason`.
fn invalidated_slot_advice(reason: &str, slot: &str) -> String {
    let why = match reason {
        "wal_removed" => "the server removed WAL it still needed (raise max_slot_wal_keep_size)",
        "rows_removed" => {
            "the primary removed catalog rows it still needed (decoding on a standby needs \
             hot_standby_feedback = on and a physical slot)"
        }
        "wal_level_insufficient" => "the primary's wal_level is below logical",
        "idle_timeout" => {
            "it was unused for longer than idle_replication_slot_timeout (raise it, or keep \
             steward running)"
        }
        _ => "see invalidation_reason in pg_replication_slots",
    };
    format!(
        "slot '{slot}' is invalidated ({reason}): {why}; changes since steward last ran may be \
         missing, so stop steward and run `steward repair -c FILE` (sends each target only what \
         differs) or `steward reset --all -c FILE` (sends everything), then start it"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reconciliation_reads_one_targets_chunk_until_its_targets_get_much() {
        let found = |differ: u64| ReconcileCounts {
            checked: 5_000,
            equal: 5_000 - differ,
            resent: differ,
            ..ReconcileCounts::default()
        };
        // Little drift: one target's chunk, however many targets.
        assert_eq!(reconcile_chunk_rows(&[found(3); 3], 5_000, 6), CHUNK_ROWS);
        assert_eq!(reconcile_chunk_rows(&[], 5_000, 6), CHUNK_ROWS);
        // A tenth of the rows differing for two of three targets: the chunk
        // of a snapshot into two.
        let counts = [found(500), found(499), found(5_000)];
        assert_eq!(reconcile_chunk_rows(&counts, 5_000, 6), CHUNK_ROWS / 2);
        assert_eq!(
            reconcile_chunk_rows(&[found(5_000); 10], 5_000, 6),
            MIN_SHARED_CHUNK_ROWS
        );
    }

    #[test]
    fn whole_rows_are_read_in_chunks_of_as_many_cells_as_narrow_ones() {
        assert_eq!(chunk_rows(1, NARROW_COLUMNS), CHUNK_ROWS);
        // An Odoo product read whole: 70 columns.
        assert_eq!(chunk_rows(1, 70), CHUNK_ROWS * NARROW_COLUMNS / 70);
        assert_eq!(chunk_rows(3, 70), CHUNK_ROWS / 3 * NARROW_COLUMNS / 70);
        assert_eq!(chunk_rows(10, 500), MIN_WIDE_CHUNK_ROWS);
    }

    #[test]
    fn window_entities_are_read_while_a_commit_holds_the_gate() {
        let gate = SnapshotGate::default();
        gate.lock().insert(("t1".into(), "product".into()));
        {
            let mut windows = gate.lock();
            windows.insert(("t2".into(), "product".into()));
            windows.insert(("t1".into(), "partner".into()));
        }
        // A commit holds the gate until its fsync is done; the stream reads
        // the window entities meanwhile, from another thread.
        let held = gate.lock();
        let reader = gate.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(reader.window_entities().clone());
        });
        let read = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("window_entities waited for the gate");
        assert_eq!(read, ["partner", "product"]);
        assert_eq!(held.len(), 3, "reading the gate changes nothing");
        drop(held);

        gate.lock().remove(&("t1".into(), "product".into()));
        assert_eq!(*gate.window_entities(), ["partner", "product"]);
        gate.lock().clear();
        assert!(gate.window_entities().is_empty());
    }
}
