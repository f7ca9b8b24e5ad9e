//! The group committer: complete source transactions, governed, go to the
//! store in one durable commit per group, on a thread of its own, and the
//! durable LSN (what the source confirms to PostgreSQL) follows the commits.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use steward_core::config::Config;
use steward_core::model::{Event, Lsn};
use steward_core::pipeline::{Mapped, Pipeline};
use steward_store::governance::{GovDelta, GovOp};
use steward_store::Store;

use super::{schema, snapshot, DaemonState};

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
    pub(super) batch: Vec<(usize, Event)>,
    batch_end: Option<Lsn>,
    batch_started: Option<Instant>,
    /// The commit running on its thread: the end LSN it covers, and where
    /// its outcome arrives.
    pub(super) in_flight: Option<(Lsn, tokio::sync::oneshot::Receiver<CommitOutcome>)>,
    commit_thread: CommitThread,
    /// The last commit's batch vector, returned empty for reuse. (Its delta
    /// is not kept: `GovDelta::append` takes the governor's vector instead.)
    spare: Option<Vec<(usize, Event)>>,
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
}

/// One batch handed to the commit thread.
pub(super) struct CommitJob {
    end: Lsn,
    batch: Vec<(usize, Event)>,
    delta: GovDelta,
}

pub(super) enum CommitOutcome {
    /// With the job's batch vector, emptied, for the next batch to reuse.
    Committed(Vec<(usize, Event)>),
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
    jobs: Option<std::sync::mpsc::Sender<Box<dyn FnOnce() + Send>>>,
}

impl CommitThread {
    fn run(&mut self, work: Box<dyn FnOnce() + Send>) -> anyhow::Result<()> {
        let work = match &self.jobs {
            None => work,
            Some(jobs) => match jobs.send(work) {
                Ok(()) => return Ok(()),
                // The thread is gone (it only ends when a commit panicked): start another.
                Err(std::sync::mpsc::SendError(work)) => work,
            },
        };
        let (jobs, queue) = std::sync::mpsc::channel::<Box<dyn FnOnce() + Send>>();
        std::thread::Builder::new()
            .name("steward-commit".into())
            .spawn(move || {
                // Ends when the committer (the only sender) is dropped.
                for work in queue {
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

    /// Takes a transaction whose events the governor appended to
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

    /// Events of a transaction still open: stored with the batch, but the
    /// checkpoint stays where the complete transactions put it.
    pub(super) fn add_partial(
        &mut self,
        events: Vec<(usize, Event)>,
        delta: GovDelta,
    ) -> anyhow::Result<()> {
        Self::count_filtered(&delta);
        self.batch.extend(events);
        self.delta.append(delta);
        let handed = self.handed();
        self.batch_end.get_or_insert(handed);
        self.batch_started.get_or_insert_with(Instant::now);
        if self.batch.len() >= self.max_events {
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
                self.spare = Some(spare);
                if std::mem::take(&mut self.stalled) {
                    tracing::info!("the state file accepts writes again; resuming");
                    self.set_store_error(None);
                    *self
                        .state
                        .last_error
                        .lock()
                        .unwrap_or_else(|p| p.into_inner()) = None;
                }
                if self.batch_end.is_none() {
                    self.state.health.note_caught_up();
                }
                Ok(())
            }
            CommitOutcome::Refused(job, e) => {
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
                    .unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
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
            .unwrap_or_else(|p| p.into_inner()) = error;
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
            if let Some(c) = self.received.get(m.entity) {
                c.increment(1);
            }
            if pipeline.targets_of(m.entity).is_empty() {
                if let Some(c) = self.filtered.get(m.entity) {
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
