//! The group committer: complete source transactions, governed, go to the
//! store in one durable commit per group, on a thread of its own, and the
//! durable LSN (what the source confirms to PostgreSQL) follows the commits.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use steward_core::config::{Config, TargetIndex};
use steward_core::model::{Event, Lsn};
use steward_core::pipeline::{Mapped, Pipeline};
use steward_core::state::ReconcileCounts;
use steward_store::governance::{GovDelta, GovOp};
use steward_store::{GovernanceState, Store};

use super::{schema, snapshot, DaemonState};

/// A staged transaction's records go through staging, governance and the
/// store this many at a time (at most `commit_max_events`): in pieces of the
/// group commit's 20,000, a transaction of 1,000,000 changes peaked at
/// 111 MiB, in pieces of 5,000 at 78 MiB, and ran faster (README, "Large
/// transactions"). Batched transactions keep the larger groups, which save
/// fsyncs under a backlog.
pub(super) const LARGE_TXN_PIECE: usize = 5_000;

/// Groups complete transactions into one durable store commit.
///
/// The commit itself (filtering against snapshot windows, redb writes,
/// fsync) runs on a thread of its own while the consume loop goes on
/// decoding and mapping the next batch: with the two stages overlapped the
/// walsender is not left waiting for our fsync. At most one commit is in
/// flight, so batches reach the store in order, and the durable LSN (what the
/// source confirms) only moves once a commit has succeeded.
pub(super) struct Committer {
    /// Orders appends against running snapshots (see `snapshot`).
    pub(super) gate: snapshot::SnapshotGate,
    pub(super) store: Store,
    pub(super) durable_tx: Arc<watch::Sender<Lsn>>,
    wakers: Vec<Arc<watch::Sender<u64>>>,
    target_names: Vec<String>,
    pub(super) state: Arc<DaemonState>,
    pub(super) max_events: usize,
    max_delay: Duration,
    pub(super) batch: Vec<(TargetIndex, Event)>,
    batch_end: Option<Lsn>,
    batch_started: Option<Instant>,
    /// The commit running on its thread: the end LSN it covers, and where
    /// its outcome arrives.
    pub(super) in_flight: Option<(Lsn, tokio::sync::oneshot::Receiver<CommitOutcome>)>,
    commit_thread: CommitThread,
    /// The last commit's batch vector, returned empty for reuse. (Its delta
    /// is not kept: `GovDelta::append` takes the governance's vector instead.)
    spare: Option<Vec<(TargetIndex, Event)>>,
    /// The last commit failed with an error that may clear (disk full):
    /// the batch is kept and nothing more is confirmed until it succeeds.
    pub(super) stalled: bool,
    /// Per entity index.
    received: Vec<metrics::Counter>,
    filtered: Vec<metrics::Counter>,
    /// Governance state changes and audit records of the batch.
    delta: GovDelta,
    /// Entities stopped by a schema change (see `schema`).
    pub(super) schema: schema::SchemaGuard,
    /// Snapshot chunks whose events the commit in flight carries, answered
    /// with its outcome and their counts (see [`Committer::flush_chunk`]).
    chunk_answers: Vec<(snapshot::ChunkDone, Vec<ReconcileCounts>)>,
}

/// A chunk whose commit the store refused is read again.
const CHUNK_REFUSED: &str =
    "the state file does not accept writes; the snapshot chunk is read again";

/// One batch handed to the commit thread.
pub(super) struct CommitJob {
    end: Lsn,
    batch: Vec<(TargetIndex, Event)>,
    delta: GovDelta,
}

pub(super) enum CommitOutcome {
    /// With the job's batch vector, emptied, for the next batch to reuse.
    Committed(Vec<(TargetIndex, Event)>),
    /// The store refused the write with an error that may clear: the job
    /// comes back to be retried.
    Refused(CommitJob, steward_store::StoreError),
    Failed(anyhow::Error),
}

/// What the commit thread needs besides the job.
#[derive(Clone)]
struct CommitContext {
    gate: snapshot::SnapshotGate,
    store: Store,
    durable_tx: Arc<watch::Sender<Lsn>>,
    wakers: Vec<Arc<watch::Sender<u64>>>,
    target_names: Vec<String>,
    state: Arc<DaemonState>,
}

impl CommitContext {
    fn commit(&self, job: CommitJob) -> CommitOutcome {
        // Held until the batch is committed: a snapshot chunk must not slip
        // between the version check and the append.
        let windows = self.gate.lock();
        let batch =
            match snapshot::filter_batch(&windows, &self.store, &self.target_names, job.batch) {
                Ok(b) => b,
                Err(e) => return CommitOutcome::Failed(e),
            };
        let appends: Vec<(&str, &Event)> = batch
            .iter()
            .map(|(t, e)| (self.target_names[*t].as_str(), e))
            .collect();
        let started = Instant::now();
        let last = match self.store.commit_governed(job.end, &appends, &job.delta) {
            Ok(last) => last,
            Err(e) if e.is_transient() => {
                drop(appends);
                // Filtering again on the retry admits the same versions.
                return CommitOutcome::Refused(
                    CommitJob {
                        end: job.end,
                        batch,
                        delta: job.delta,
                    },
                    e,
                );
            }
            Err(e) => return CommitOutcome::Failed(e.into()),
        };
        metrics::histogram!(steward_core::metric::STORE_COMMIT_SECONDS)
            .record(started.elapsed().as_secs_f64());
        metrics::counter!(steward_core::metric::EVENTS_STORED).increment(appends.len() as u64);
        drop(windows);
        for (name, seq) in last {
            if let Some(i) = self.target_names.iter().position(|n| *n == name) {
                self.wakers[i].send_replace(seq);
            }
        }
        advance_durable(&self.durable_tx, &self.state, job.end);
        drop(appends);
        let mut spare = batch;
        spare.clear();
        CommitOutcome::Committed(spare)
    }
}

/// One long-lived thread for the commits. A thread per commit would cost a
/// spawn per batch and, worse, leave each finished thread's allocator heap
/// behind holding the pages of whatever it allocated that outlives it (redb's
/// cache entries), which inflated peak RSS.
#[derive(Default)]
struct CommitThread {
    jobs: Option<std::sync::mpsc::Sender<CommitWork>>,
}

impl CommitThread {
    fn run(&mut self, work: CommitWork) -> anyhow::Result<()> {
        let work = match &self.jobs {
            None => work,
            Some(jobs) => match jobs.send(work) {
                Ok(()) => return Ok(()),
                // The thread is gone (it only ends when a commit panicked): start another.
                Err(std::sync::mpsc::SendError(work)) => work,
            },
        };
        let (jobs, queue) = std::sync::mpsc::channel::<CommitWork>();
        std::thread::Builder::new()
            .name("steward-commit".into())
            .spawn(move || {
                // Ends when the committer (the only sender) is dropped.
                while let Some(work) = next_job(&queue) {
                    work();
                }
            })
            .map_err(|e| anyhow::anyhow!("cannot start the commit thread: {e}"))?;
        jobs.send(work)
            .map_err(|_| anyhow::anyhow!("the commit thread stopped at once"))?;
        self.jobs = Some(jobs);
        Ok(())
    }
}

/// The commit thread's next job; `None` once the committer is gone. A
/// thread left without work gives memory back (see `idle`): its heap at
/// once, its encoding buffers after [`super::idle::RELEASE_AFTER`].
fn next_job(queue: &std::sync::mpsc::Receiver<CommitWork>) -> Option<CommitWork> {
    use std::sync::mpsc::{RecvTimeoutError, TryRecvError};
    match queue.try_recv() {
        Ok(work) => return Some(work),
        Err(TryRecvError::Disconnected) => return None,
        Err(TryRecvError::Empty) => super::idle::thread_idle(),
    }
    match queue.recv_timeout(super::idle::RELEASE_AFTER) {
        Ok(work) => Some(work),
        Err(RecvTimeoutError::Disconnected) => None,
        Err(RecvTimeoutError::Timeout) => {
            steward_store::release_encode_buffers();
            super::idle::collect();
            queue.recv().ok()
        }
    }
}

/// A job for the commit thread.
type CommitWork = Box<dyn FnOnce() + Send>;

/// The outcome of the commit in flight (pending forever when there is none).
pub(super) async fn commit_finished(
    in_flight: &mut Option<(Lsn, tokio::sync::oneshot::Receiver<CommitOutcome>)>,
) -> CommitOutcome {
    match in_flight.as_mut() {
        Some((_, rx)) => rx.await.unwrap_or_else(|_| {
            CommitOutcome::Failed(anyhow::anyhow!(
                "the commit thread stopped without an outcome"
            ))
        }),
        None => std::future::pending().await,
    }
}

/// Moves the durable LSN forward (never back).
fn advance_durable(durable_tx: &watch::Sender<Lsn>, state: &DaemonState, lsn: Lsn) {
    durable_tx.send_if_modified(|d| {
        if lsn > *d {
            *d = lsn;
            true
        } else {
            false
        }
    });
    state
        .durable_lsn
        .fetch_max(lsn.0, std::sync::atomic::Ordering::Relaxed);
    metrics::gauge!(steward_core::metric::DURABLE_LSN).set(lsn.0 as f64);
}

impl Committer {
    /// A committer whose durable LSN starts at `durable_tx`'s value, waking
    /// `wakers` (one per configured target, in order) as events are stored.
    pub(super) fn new(
        config: &Config,
        store: &Store,
        gate: snapshot::SnapshotGate,
        durable_tx: Arc<watch::Sender<Lsn>>,
        wakers: Vec<Arc<watch::Sender<u64>>>,
        state: Arc<DaemonState>,
    ) -> Committer {
        let entity_counters = |name: &'static str| -> Vec<metrics::Counter> {
            config
                .entities
                .iter()
                .map(|e| metrics::counter!(name, "entity" => e.name.clone()))
                .collect()
        };
        Committer {
            gate,
            store: store.clone(),
            durable_tx,
            wakers,
            target_names: config.targets.iter().map(|t| t.name.clone()).collect(),
            state,
            max_events: config.state.commit_max_events,
            max_delay: config.state.commit_max_delay,
            batch: Vec::new(),
            batch_end: None,
            batch_started: None,
            in_flight: None,
            commit_thread: CommitThread::default(),
            spare: None,
            stalled: false,
            received: entity_counters(steward_core::metric::EVENTS_RECEIVED),
            filtered: entity_counters(steward_core::metric::EVENTS_FILTERED),
            delta: GovDelta::default(),
            schema: schema::SchemaGuard::load(config, store),
            chunk_answers: Vec::new(),
        }
    }

    pub(super) fn durable(&self) -> Lsn {
        *self.durable_tx.borrow()
    }

    pub(super) fn deadline(&self) -> Option<Instant> {
        self.batch_started.map(|t| t + self.max_delay)
    }

    /// The end of what has been handed to the store so far.
    fn handed(&self) -> Lsn {
        self.in_flight
            .as_ref()
            .map_or_else(|| self.durable(), |(end, _)| *end)
    }

    /// The LSN the next commit will cover (what a governance release is versioned with).
    pub(super) fn latest(&self) -> Lsn {
        self.batch_end.unwrap_or_else(|| self.handed())
    }

    /// Takes a transaction whose events the governance appended to
    /// `self.batch` (`appended`: whether there were any).
    pub(super) fn add(
        &mut self,
        appended: bool,
        delta: GovDelta,
        end_lsn: Lsn,
    ) -> anyhow::Result<()> {
        self.reap_if_finished()?;
        if !appended && delta.is_empty() && self.batch_end.is_none() && self.in_flight.is_none() {
            // Nothing of this transaction reaches any target and nothing is
            // waiting: it is as good as durable. Persisting the checkpoint can
            // wait for the next real commit; after a crash the server resumes
            // from its confirmed position, which is never before this one.
            self.advance(end_lsn);
            return Ok(());
        }
        Self::count_filtered(&delta);
        self.delta.append(delta);
        self.batch_end = Some(self.batch_end.map_or(end_lsn, |b| b.max(end_lsn)));
        self.batch_started.get_or_insert_with(Instant::now);
        if self.batch.len() >= self.max_events {
            self.flush()?;
        }
        Ok(())
    }

    /// Governance decisions that keep a record from a target count as filtered.
    fn count_filtered(delta: &GovDelta) {
        for op in &delta.ops {
            if let GovOp::Audit(record) = op {
                if matches!(
                    record.decision.as_str(),
                    "gated" | "not_routed" | "suppressed" | "quarantined"
                ) {
                    metrics::counter!(steward_core::metric::EVENTS_FILTERED, "entity" => record.entity.clone()).increment(1);
                }
            }
        }
    }

    /// How many records of a staged transaction (one of more than
    /// `commit_max_events`) are staged, governed and stored at a time.
    pub(super) fn large_piece(&self) -> usize {
        self.max_events.min(LARGE_TXN_PIECE)
    }

    /// Events of a transaction still open: stored with the batch, but the
    /// checkpoint stays where the complete transactions put it.
    pub(super) fn add_partial(
        &mut self,
        events: Vec<(TargetIndex, Event)>,
        delta: GovDelta,
    ) -> anyhow::Result<()> {
        Self::count_filtered(&delta);
        self.batch.extend(events);
        self.delta.append(delta);
        let handed = self.handed();
        self.batch_end.get_or_insert(handed);
        self.batch_started.get_or_insert_with(Instant::now);
        if self.batch.len() >= self.large_piece() {
            self.flush()?;
        }
        Ok(())
    }

    fn context(&self) -> CommitContext {
        CommitContext {
            gate: self.gate.clone(),
            store: self.store.clone(),
            durable_tx: self.durable_tx.clone(),
            wakers: self.wakers.clone(),
            target_names: self.target_names.clone(),
            state: self.state.clone(),
        }
    }

    /// Frees the batch buffers kept at the size of the largest batch (the
    /// daemon has been idle for a while).
    pub(super) fn release_buffers(&mut self) {
        self.spare = None;
        if self.batch.is_empty() {
            self.batch = Vec::new();
        }
    }

    /// Hands the batch to the commit thread, once the previous commit is done.
    pub(super) fn flush(&mut self) -> anyhow::Result<()> {
        self.reap()?;
        let Some(end) = self.batch_end.take() else {
            return Ok(());
        };
        // The previous job's emptied buffers, already grown to batch size:
        // growing fresh ones cost a page fault per 4 KiB (see `main.rs`).
        let job = CommitJob {
            end,
            batch: std::mem::replace(&mut self.batch, self.spare.take().unwrap_or_default()),
            delta: std::mem::take(&mut self.delta),
        };
        self.batch_started = None;
        let context = self.context();
        let (outcome_tx, outcome_rx) = tokio::sync::oneshot::channel();
        self.commit_thread.run(Box::new(move || {
            // A dropped receiver means the daemon is gone; nothing to tell.
            let _ = outcome_tx.send(context.commit(job));
        }))?;
        self.in_flight = Some((end, outcome_rx));
        Ok(())
    }

    /// Group commit that waits only while there is something to wait for.
    /// Called when the stream has nothing more at hand: the gathered
    /// transactions go to the store at once if no commit is in flight. If
    /// one is, its fsync is the window in which the group gathers, and it
    /// goes as soon as that commit is done. While messages keep arriving (a
    /// backlog) this is not called, and the group grows up to
    /// `commit_max_events` or `commit_max_delay`.
    pub(super) fn flush_if_idle(&mut self) -> anyhow::Result<()> {
        if self.in_flight.is_none() && self.batch_end.is_some() && !self.stalled {
            self.flush()?;
        }
        Ok(())
    }

    /// Hands over the batch that carries a snapshot chunk's events without
    /// waiting for it: the chunk's `done` is answered with `counts` once
    /// they are durable (or with why not). The next chunk is governed
    /// meanwhile, while this one is written.
    pub(super) fn flush_chunk(
        &mut self,
        done: snapshot::ChunkDone,
        counts: Vec<ReconcileCounts>,
    ) -> anyhow::Result<()> {
        self.flush()?;
        if self.in_flight.is_some() {
            self.chunk_answers.push((done, counts));
        } else {
            // Nothing needed writing (or it already was): as durable as it gets.
            let _ = done.send(match self.stalled {
                true => Err(CHUNK_REFUSED.to_string()),
                false => Ok(counts),
            });
        }
        Ok(())
    }

    /// Answers the chunks the finished commit carried.
    fn answer_chunks(&mut self, outcome: Result<(), &str>) {
        for (done, counts) in self.chunk_answers.drain(..) {
            // A dropped receiver: the snapshot stopped; nothing to tell.
            let _ = done.send(match outcome {
                Ok(()) => Ok(counts),
                Err(e) => Err(e.to_string()),
            });
        }
    }

    /// Hands over the batch and waits until everything handed over is committed.
    pub(super) fn flush_and_wait(&mut self) -> anyhow::Result<()> {
        self.flush()?;
        self.reap()
    }

    /// Takes the outcome of a commit that has finished; never waits.
    fn reap_if_finished(&mut self) -> anyhow::Result<()> {
        let Some((_, rx)) = self.in_flight.as_mut() else {
            return Ok(());
        };
        match rx.try_recv() {
            Ok(outcome) => {
                self.in_flight = None;
                self.take_outcome(outcome)
            }
            Err(tokio::sync::oneshot::error::TryRecvError::Empty) => Ok(()),
            Err(tokio::sync::oneshot::error::TryRecvError::Closed) => {
                self.in_flight = None;
                self.take_outcome(CommitOutcome::Failed(anyhow::anyhow!(
                    "the commit thread stopped without an outcome"
                )))
            }
        }
    }

    /// Waits for the commit in flight, if any, and takes its outcome.
    fn reap(&mut self) -> anyhow::Result<()> {
        let Some((_, rx)) = self.in_flight.take() else {
            return Ok(());
        };
        let outcome = tokio::task::block_in_place(|| rx.blocking_recv()).unwrap_or_else(|_| {
            CommitOutcome::Failed(anyhow::anyhow!(
                "the commit thread stopped without an outcome"
            ))
        });
        self.take_outcome(outcome)
    }

    /// A finished commit: a refused batch is put back in front of the one
    /// being gathered.
    pub(super) fn take_outcome(&mut self, outcome: CommitOutcome) -> anyhow::Result<()> {
        match outcome {
            CommitOutcome::Committed(spare) => {
                self.answer_chunks(Ok(()));
                self.spare = Some(spare);
                if std::mem::take(&mut self.stalled) {
                    tracing::info!("the state file accepts writes again; resuming");
                    self.set_store_error(None);
                    *self
                        .state
                        .last_error
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner) = None;
                }
                if self.batch_end.is_none() {
                    self.state.health.note_caught_up();
                }
                Ok(())
            }
            CommitOutcome::Refused(job, e) => {
                self.answer_chunks(Err(CHUNK_REFUSED));
                if !self.stalled {
                    tracing::error!(
                        error = %e,
                        "cannot write to the state file; steward stops confirming WAL to PostgreSQL and retries every second"
                    );
                }
                self.stalled = true;
                self.set_store_error(Some(e.to_string()));
                *self
                    .state
                    .last_error
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(e.to_string());
                let mut batch = job.batch;
                batch.append(&mut self.batch);
                self.batch = batch;
                let mut delta = job.delta;
                delta.append(std::mem::take(&mut self.delta));
                self.delta = delta;
                self.batch_end = Some(self.batch_end.map_or(job.end, |b| b.max(job.end)));
                self.batch_started.get_or_insert_with(Instant::now);
                Ok(())
            }
            CommitOutcome::Failed(e) => {
                self.answer_chunks(Err(&format!("{e:#}")));
                self.set_store_error(Some(format!("{e:#}")));
                Err(e)
            }
        }
    }

    /// What `/readyz` says about the store: `None` = writable.
    fn set_store_error(&self, error: Option<String>) {
        self.state
            .health
            .store_ok
            .store(error.is_none(), std::sync::atomic::Ordering::Relaxed);
        *self
            .state
            .health
            .store_error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = error;
    }

    /// Drops what could not be committed; true when anything was dropped.
    pub(super) fn discard_pending(&mut self) -> bool {
        // A commit still running either lands (and is confirmed) or comes back
        // refused and is dropped with the rest.
        let failed = self.reap().is_err();
        let dropped = failed || self.batch_end.is_some() || !self.delta.is_empty();
        self.batch.clear();
        self.delta = GovDelta::default();
        self.batch_end = None;
        self.batch_started = None;
        self.stalled = false;
        dropped
    }

    /// Counts the mapped changes of a transaction per entity.
    pub(super) fn note_received(&self, pipeline: &Pipeline, mapped: &[Mapped]) {
        for m in mapped {
            if let Some(c) = self.received.get(m.entity.0) {
                c.increment(1);
            }
            if pipeline.targets_of(m.entity).is_empty() {
                if let Some(c) = self.filtered.get(m.entity.0) {
                    c.increment(1);
                }
            }
        }
    }

    fn advance(&self, lsn: Lsn) {
        advance_durable(&self.durable_tx, &self.state, lsn);
        if self.batch_end.is_none() {
            self.state.health.note_caught_up();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use steward_core::model::EventOp;
    use steward_core::state::AuditRecord;
    use steward_store::audit::AuditFilter;
    use steward_store::StoreError;

    use super::*;

    const CONFIG: &str = r#"
[source]
url = "postgres://steward@localhost/odoo"
[state]
path = "/tmp/unused.redb"
[entities.product]
table = "product_template"
fields = { name = "name" }
[targets.wms]
type = "http"
url = "http://localhost:1/"
entities = ["product"]
[targets.erp]
type = "http"
url = "http://localhost:2/"
entities = ["product"]
"#;

    /// A committer over a fresh store, as `run_open` builds it.
    struct Rig {
        _dir: tempfile::TempDir,
        store: Store,
        gate: snapshot::SnapshotGate,
        state: Arc<DaemonState>,
        durable: watch::Receiver<Lsn>,
        wakes: Vec<watch::Receiver<u64>>,
        committer: Committer,
    }

    fn rig(max_events: usize, max_delay: Duration) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("state.redb")).unwrap();
        let mut config = Config::parse(CONFIG, "t.toml".as_ref(), "/tmp".as_ref()).unwrap();
        config.state.commit_max_events = max_events;
        config.state.commit_max_delay = max_delay;
        let gate = snapshot::SnapshotGate::from_store(&store).unwrap();
        let durable_tx = Arc::new(watch::channel(Lsn::ZERO).0);
        let durable = durable_tx.subscribe();
        let (wakers, wakes) = config
            .targets
            .iter()
            .map(|_| {
                let (tx, rx) = watch::channel(0u64);
                (Arc::new(tx), rx)
            })
            .unzip();
        let state = Arc::new(DaemonState::default());
        let committer = Committer::new(
            &config,
            &store,
            gate.clone(),
            durable_tx,
            wakers,
            state.clone(),
        );
        Rig {
            _dir: dir,
            store,
            gate,
            state,
            durable,
            wakes,
            committer,
        }
    }

    fn event(n: u64) -> Event {
        Event {
            change: None,
            tx_id: None,
            id: Event::source_id(Lsn(n), 0),
            entity: "product".into(),
            key: n.to_string(),
            op: EventOp::Upsert,
            version: n,
            time: chrono::Utc::now().to_rfc3339(),
            data: serde_json::json!({ "n": n }).into(),
        }
    }

    /// One audit record per transaction, to follow its governance delta.
    fn audited(end: u64) -> GovDelta {
        GovDelta {
            ops: vec![GovOp::Audit(AuditRecord {
                time_micros: end as i64,
                entity: "product".into(),
                key: end.to_string(),
                version: end,
                target: None,
                decision: "released".into(),
                detail: String::new(),
                user: None,
                comment: None,
                seq: None,
            })],
            ..GovDelta::default()
        }
    }

    /// A complete transaction ending at `end` whose events for `wms` are `events`.
    fn txn(c: &mut Committer, end: u64, events: &[u64]) {
        c.batch
            .extend(events.iter().map(|&n| (TargetIndex(0), event(n))));
        c.add(!events.is_empty(), audited(end), Lsn(end)).unwrap();
    }

    /// A transaction ending at `end` that reaches no target and changes no state.
    fn nothing(c: &mut Committer, end: u64) {
        c.add(false, GovDelta::default(), Lsn(end)).unwrap();
    }

    /// The versions in `wms`'s outbox, in outbox order.
    fn outbox(store: &Store) -> Vec<u64> {
        store
            .read_outbox("wms", None, 1000)
            .unwrap()
            .into_iter()
            .map(|(_, e)| e.version)
            .collect()
    }

    /// The transactions (by end LSN) whose governance delta is stored, in order.
    fn audit(store: &Store) -> Vec<u64> {
        store
            .audit_query(&AuditFilter::default())
            .unwrap()
            .into_iter()
            .map(|r| r.version)
            .collect()
    }

    /// Hands the batch over as `flush` does and answers as the commit
    /// thread does when the store refuses the write with an error that may
    /// clear (disk full), which a unit test cannot make a real file do.
    fn hand_over_refused(c: &mut Committer) {
        let end = c.batch_end.take().expect("a batch to hand over");
        let job = CommitJob {
            end,
            batch: std::mem::take(&mut c.batch),
            delta: std::mem::take(&mut c.delta),
        };
        c.batch_started = None;
        let (tx, rx) = tokio::sync::oneshot::channel();
        let refusal = StoreError::DiskFull {
            path: c.store.path().to_path_buf(),
        };
        let _ = tx.send(CommitOutcome::Refused(job, refusal));
        c.in_flight = Some((end, rx));
    }

    fn store_ok(state: &DaemonState) -> bool {
        state.health.store_ok.load(Ordering::Relaxed)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn transactions_are_grouped_into_one_commit_up_to_max_events() {
        let Rig {
            store,
            mut committer,
            durable,
            wakes,
            ..
        } = rig(3, Duration::from_secs(3600));
        let c = &mut committer;
        let commits = store.durable_commits();
        txn(c, 10, &[1]);
        txn(c, 20, &[2]);
        assert!(
            c.in_flight.is_none(),
            "below max_events nothing is handed over"
        );
        assert_eq!(outbox(&store), Vec::<u64>::new());
        assert_eq!(store.checkpoint().unwrap(), None);
        assert_eq!(*durable.borrow(), Lsn::ZERO);

        txn(c, 30, &[3]);
        assert!(c.in_flight.is_some(), "max_events reached: handed over");
        c.flush_and_wait().unwrap();
        assert_eq!(outbox(&store), [1, 2, 3]);
        assert_eq!(audit(&store), [10, 20, 30]);
        assert_eq!(store.durable_commits(), commits + 1, "one commit");
        assert_eq!(store.checkpoint().unwrap(), Some(Lsn(30)));
        assert_eq!(*durable.borrow(), Lsn(30));
        assert_eq!(c.deadline(), None);
        // The target appended to is woken with its last sequence number.
        assert_eq!(*wakes[0].borrow(), 3);
        assert!(!wakes[1].has_changed().unwrap(), "erp got nothing");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_idle_stream_commits_at_once_and_groups_behind_a_commit_in_flight() {
        let Rig {
            store,
            mut committer,
            durable,
            ..
        } = rig(1000, Duration::from_secs(3600));
        let c = &mut committer;
        let commits = store.durable_commits();
        c.flush_if_idle().unwrap();
        assert!(c.in_flight.is_none(), "nothing to commit");

        txn(c, 10, &[1]);
        c.flush_if_idle().unwrap();
        assert!(
            c.in_flight.is_some(),
            "nothing in flight: handed over at once, not after max_delay"
        );
        // Arriving while that commit runs, these wait for it and go together.
        txn(c, 20, &[2]);
        txn(c, 30, &[3]);
        let first = c.in_flight.as_ref().map(|(end, _)| *end);
        c.flush_if_idle().unwrap();
        assert_eq!(
            c.in_flight.as_ref().map(|(end, _)| *end),
            first,
            "one commit in flight at a time"
        );
        let outcome = commit_finished(&mut c.in_flight).await;
        c.in_flight = None;
        c.take_outcome(outcome).unwrap();
        assert_eq!(*durable.borrow(), Lsn(10));
        c.flush_if_idle().unwrap();
        c.flush_and_wait().unwrap();
        assert_eq!(outbox(&store), [1, 2, 3]);
        assert_eq!(*durable.borrow(), Lsn(30));
        assert_eq!(
            store.durable_commits(),
            commits + 2,
            "the two later transactions in one commit"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_batch_waits_at_most_max_delay_from_its_first_transaction() {
        let Rig { mut committer, .. } = rig(1000, Duration::from_millis(500));
        let c = &mut committer;
        assert_eq!(c.deadline(), None, "nothing waits");
        let before = Instant::now();
        txn(c, 10, &[1]);
        let deadline = c.deadline().expect("a deadline once a batch waits");
        assert!(deadline >= before + Duration::from_millis(500));
        assert!(deadline <= Instant::now() + Duration::from_millis(500));
        std::thread::sleep(Duration::from_millis(20));
        txn(c, 20, &[2]);
        assert_eq!(
            c.deadline(),
            Some(deadline),
            "later transactions do not push it back"
        );
        c.flush_and_wait().unwrap();
        assert_eq!(c.deadline(), None);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_empty_transaction_is_durable_at_once_only_when_nothing_waits() {
        let Rig {
            store,
            gate,
            mut committer,
            durable,
            ..
        } = rig(1000, Duration::from_secs(3600));
        let c = &mut committer;
        nothing(c, 10);
        assert_eq!(*durable.borrow(), Lsn(10), "nothing waits: durable at once");
        assert_eq!(store.checkpoint().unwrap(), None, "without a store commit");

        // Behind a batch still being gathered.
        txn(c, 20, &[1]);
        nothing(c, 30);
        assert_eq!(*durable.borrow(), Lsn(10));
        assert_eq!(c.latest(), Lsn(30));
        c.flush_and_wait().unwrap();
        assert_eq!(*durable.borrow(), Lsn(30));
        assert_eq!(store.checkpoint().unwrap(), Some(Lsn(30)));

        // Behind a commit in flight (held before the store by the gate).
        let held = gate.lock();
        txn(c, 40, &[2]);
        c.flush().unwrap();
        nothing(c, 50);
        assert_eq!(*durable.borrow(), Lsn(30));
        drop(held);
        c.flush_and_wait().unwrap();
        assert_eq!(*durable.borrow(), Lsn(50));
        assert_eq!(outbox(&store), [1, 2]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_durable_lsn_moves_only_once_the_commit_is_stored_and_never_back() {
        let Rig {
            store,
            gate,
            state,
            mut committer,
            mut durable,
            ..
        } = rig(1000, Duration::from_secs(3600));
        let c = &mut committer;
        // The commit thread takes the gate before writing: holding it keeps
        // the commit in flight.
        let held = gate.lock();
        txn(c, 10, &[1]);
        c.flush().unwrap();
        let observer = {
            let (mut durable, store) = (durable.clone(), store.clone());
            tokio::spawn(async move {
                durable.changed().await.unwrap();
                let seen = *durable.borrow();
                (seen, store.checkpoint().unwrap())
            })
        };
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(*durable.borrow(), Lsn::ZERO, "not durable while in flight");
        assert_eq!(state.durable_lsn.load(Ordering::Relaxed), 0);
        assert_eq!(c.latest(), Lsn(10));
        drop(held);
        c.flush_and_wait().unwrap();
        let (seen, stored) = observer.await.unwrap();
        assert_eq!(seen, Lsn(10));
        assert_eq!(stored, Some(Lsn(10)), "stored before it was announced");
        assert_eq!(state.durable_lsn.load(Ordering::Relaxed), 10);

        // A transaction ending earlier (one sent again) moves nothing back.
        durable.borrow_and_update();
        nothing(c, 5);
        txn(c, 7, &[2]);
        c.flush_and_wait().unwrap();
        assert!(!durable.has_changed().unwrap());
        assert_eq!(*durable.borrow(), Lsn(10));
        assert_eq!(state.durable_lsn.load(Ordering::Relaxed), 10);
        assert_eq!(store.checkpoint().unwrap(), Some(Lsn(10)));
    }

    /// A snapshot chunk's events, governed into the batch and handed over;
    /// returns where the chunk's answer arrives.
    fn chunk(
        c: &mut Committer,
        end: u64,
        events: &[u64],
    ) -> tokio::sync::oneshot::Receiver<Result<Vec<ReconcileCounts>, String>> {
        c.batch
            .extend(events.iter().map(|&n| (TargetIndex(0), event(n))));
        c.add(true, audited(end), Lsn(end)).unwrap();
        let (done, answer) = tokio::sync::oneshot::channel();
        let counts = vec![ReconcileCounts {
            checked: events.len() as u64,
            ..ReconcileCounts::default()
        }];
        c.flush_chunk(done, counts).unwrap();
        answer
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_snapshot_chunk_is_answered_once_stored_while_the_next_is_governed() {
        let Rig {
            store,
            gate,
            mut committer,
            ..
        } = rig(20_000, Duration::from_secs(3600));
        let c = &mut committer;
        // A commit holds the gate until it is stored: holding it here keeps
        // the first chunk's commit in flight.
        let held = gate.lock();
        let mut first = chunk(c, 10, &[1, 2]);
        assert!(c.in_flight.is_some(), "handed over without waiting");
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            first.try_recv().is_err(),
            "not answered before its events are stored"
        );
        assert_eq!(outbox(&store), Vec::<u64>::new());
        drop(held);
        // The next chunk was governed meanwhile; handing it over waits for
        // the first commit, which answers the first chunk.
        let second = chunk(c, 20, &[3]);
        let counts = first.await.unwrap().unwrap();
        assert_eq!(counts[0].checked, 2);
        assert_eq!(outbox(&store), vec![1, 2]);
        c.flush_and_wait().unwrap();
        assert_eq!(second.await.unwrap().unwrap()[0].checked, 1);
        assert_eq!(outbox(&store), vec![1, 2, 3]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_snapshot_chunk_whose_commit_is_refused_is_answered_with_an_error() {
        let Rig {
            store,
            mut committer,
            ..
        } = rig(20_000, Duration::from_secs(3600));
        let c = &mut committer;
        c.batch.push((TargetIndex(0), event(1)));
        c.add(true, audited(10), Lsn(10)).unwrap();
        hand_over_refused(c);
        let (done, answer) = tokio::sync::oneshot::channel();
        c.chunk_answers
            .push((done, vec![ReconcileCounts::default()]));
        c.reap().unwrap();
        assert_eq!(answer.await.unwrap().unwrap_err(), CHUNK_REFUSED);
        assert!(c.stalled);
        assert_eq!(outbox(&store), Vec::<u64>::new());
        // The refused events are written with the next chunk's, which is
        // answered once they are stored.
        let next = chunk(c, 20, &[2]);
        c.flush_and_wait().unwrap();
        assert!(next.await.unwrap().is_ok());
        assert_eq!(outbox(&store), vec![1, 2]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_refused_commit_is_reported_and_retried_without_loss_or_duplicates() {
        let Rig {
            store,
            state,
            mut committer,
            durable,
            ..
        } = rig(1000, Duration::from_secs(3600));
        let c = &mut committer;
        txn(c, 10, &[1, 2]);
        hand_over_refused(c);
        // Gathered while the refused commit was in flight.
        txn(c, 20, &[3]);
        assert!(c.stalled, "the refusal is taken with the next transaction");
        assert!(!store_ok(&state));
        let error = state.health.store_error.lock().unwrap().clone().unwrap();
        assert!(error.contains("is full"), "{error}");
        assert!(state.last_error.lock().unwrap().is_some());
        assert_eq!(*durable.borrow(), Lsn::ZERO, "nothing confirmed");
        assert!(c.deadline().is_some(), "the retry has a deadline");

        // Refused again, with what was gathered meanwhile.
        hand_over_refused(c);
        txn(c, 30, &[4]);
        c.reap().unwrap();
        assert!(c.stalled);
        assert_eq!(*durable.borrow(), Lsn::ZERO);
        assert_eq!(outbox(&store), Vec::<u64>::new());

        // The store takes writes again.
        c.flush_and_wait().unwrap();
        assert_eq!(outbox(&store), [1, 2, 3, 4], "each once, in order");
        assert_eq!(audit(&store), [10, 20, 30]);
        assert_eq!(*durable.borrow(), Lsn(30));
        assert_eq!(store.checkpoint().unwrap(), Some(Lsn(30)));
        assert!(!c.stalled);
        assert!(store_ok(&state));
        assert_eq!(*state.health.store_error.lock().unwrap(), None);
        assert_eq!(*state.last_error.lock().unwrap(), None);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn discard_pending_drops_only_what_the_store_did_not_take() {
        let Rig {
            store,
            mut committer,
            durable,
            ..
        } = rig(1000, Duration::from_secs(3600));
        let c = &mut committer;
        assert!(!c.discard_pending(), "nothing to drop");

        // A commit in flight lands; the batch gathered behind it is dropped.
        txn(c, 10, &[1]);
        c.flush().unwrap();
        txn(c, 20, &[2]);
        assert!(c.discard_pending());
        assert_eq!(outbox(&store), [1]);
        assert_eq!(*durable.borrow(), Lsn(10));
        assert_eq!(c.latest(), Lsn(10));
        assert_eq!(c.deadline(), None);
        assert!(!c.discard_pending(), "dropped once");

        // A refused commit is dropped with the rest and never comes back.
        txn(c, 30, &[3]);
        hand_over_refused(c);
        txn(c, 40, &[4]);
        assert!(c.discard_pending());
        assert!(!c.stalled);
        assert!(c.in_flight.is_none());
        txn(c, 50, &[5]);
        c.flush_and_wait().unwrap();
        assert_eq!(outbox(&store), [1, 5]);
        assert_eq!(audit(&store), [10, 50]);
        assert_eq!(*durable.borrow(), Lsn(50));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pieces_of_an_open_transaction_are_stored_but_not_confirmed_before_its_commit() {
        let Rig {
            store,
            mut committer,
            durable,
            ..
        } = rig(2, Duration::from_secs(3600));
        let c = &mut committer;
        txn(c, 10, &[1]);
        c.flush_and_wait().unwrap();
        assert_eq!(*durable.borrow(), Lsn(10));

        // A large transaction ending at 100, governed in pieces.
        for piece in [[2, 3], [4, 5], [6, 7]] {
            let events = piece.iter().map(|&n| (TargetIndex(0), event(n))).collect();
            c.add_partial(events, GovDelta::default()).unwrap();
        }
        c.flush_and_wait().unwrap();
        assert_eq!(outbox(&store), [1, 2, 3, 4, 5, 6, 7], "stored as they come");
        assert_eq!(
            *durable.borrow(),
            Lsn(10),
            "not confirmed before its commit"
        );
        assert_eq!(store.checkpoint().unwrap(), Some(Lsn(10)));

        // Its commit.
        c.add(true, audited(100), Lsn(100)).unwrap();
        c.flush_and_wait().unwrap();
        assert_eq!(*durable.borrow(), Lsn(100));
        assert_eq!(store.checkpoint().unwrap(), Some(Lsn(100)));
        assert_eq!(outbox(&store), [1, 2, 3, 4, 5, 6, 7]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_commit_thread_gone_without_an_answer_is_an_error() {
        let Rig {
            state,
            mut committer,
            ..
        } = rig(1000, Duration::from_secs(3600));
        let c = &mut committer;
        let (tx, rx) = tokio::sync::oneshot::channel();
        drop(tx);
        c.in_flight = Some((Lsn(10), rx));
        let err = c.flush_and_wait().unwrap_err();
        assert!(err.to_string().contains("commit thread"), "{err}");
        assert!(!store_ok(&state));
    }
}
