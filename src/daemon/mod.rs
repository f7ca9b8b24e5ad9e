//! Wires the stages together; the group committer (`commit`) owns the durable LSN.
//!
//! ```text
//!  source task ──SourceEvent──▶ daemon loop ──commit──▶ store ──wake──▶ one driver task per target
//!       ▲                         │ (pipeline mapping, group commit)
//!       └──── durable LSN (watch) ◀┘
//! ```
//!
//! Shutdown order: stop taking source messages, commit every complete
//! transaction already received, let the source confirm that durable LSN to
//! the server, then stop the drivers at their cursors.

pub mod api;
mod commit;
pub mod control;
mod endpoint;
pub mod govern;
pub(crate) mod idle;
pub mod lock;
pub mod monitor;
mod privileges;
pub mod reconcile;
pub mod record;
pub mod schema;
mod setup;
pub mod snapshot;
pub mod systemd;
mod toast;

pub use setup::RESET_ALL_META;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use steward_core::config::{Config, EntityIndex};
use steward_core::model::value::pg_micros_to_rfc3339;
use steward_core::model::Lsn;
use steward_core::pipeline::govern::{record_hash, HashKeyed, SnapshotRead};
use steward_core::pipeline::{Governance, Mapped, Pipeline};
use steward_postgres::ReplicationClient;
use steward_sinks::driver;
use steward_source::stream::{self, SessionParams, SourceError, SourceEvent};
use steward_store::governance::{GovDelta, GovOp};
use steward_store::Store;

use commit::{commit_finished, Committer};

/// Messages buffered between the source task and the daemon loop: enough to
/// keep both cores busy, small enough to bound memory (events are small).
const SOURCE_CHANNEL_CAPACITY: usize = 2048;

/// Control API requests that may wait for the consume loop or the snapshot
/// task; more are refused as busy.
const CONTROL_CHANNEL_CAPACITY: usize = 16;

/// How often old audit records are pruned.
const AUDIT_PRUNE_EVERY: Duration = Duration::from_secs(3600);

/// How often a commit the store refused (disk full) is retried.
const STORE_RETRY_INTERVAL: Duration = Duration::from_secs(1);

/// Shared, lock-free-ish view of the daemon for the control API and health.
#[derive(Default)]
pub struct DaemonState {
    pub connected: std::sync::atomic::AtomicBool,
    pub durable_lsn: std::sync::atomic::AtomicU64,
    pub last_error: std::sync::Mutex<Option<String>>,
    pub health: monitor::Health,
}

/// Runs until `shutdown` turns true or a permanent error occurs, serving
/// the control API meanwhile.
pub async fn run(config: Config, shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
    steward_store::files::refuse_shared_state_file(&config.state.path)?;
    let state = Arc::new(DaemonState::default());
    let control = Arc::new(api::Server::bind(&config, state.clone())?);
    let console = match crate::console::Console::start(&config, control.control()).await {
        Ok(console) => console,
        Err(e) => {
            control.close().await;
            return Err(e);
        }
    };
    let result = run_with(config, shutdown, state, control.clone()).await;
    if let Some(console) = &console {
        console.close().await;
    }
    control.close().await;
    result
}

/// [`run`] reporting into `state` and answering through `control`, both of
/// which outlive it (the metrics listener, systemd notifications, the
/// control socket and reloads share them). `control` must be bound before
/// this is called: its socket is what tells the command line that a daemon
/// owns the state file.
///
/// When it returns, every task it started is joined and the state file is
/// closed: a reload, or a test, may open it again at once.
pub async fn run_with(
    config: Config,
    mut shutdown: watch::Receiver<bool>,
    state: Arc<DaemonState>,
    control: Arc<api::Server>,
) -> anyhow::Result<()> {
    steward_store::files::refuse_shared_state_file(&config.state.path)?;
    let store = match lock::open_store(&config.state.path, &mut shutdown).await {
        Ok(Some(store)) => store,
        Ok(None) => return Ok(()),
        Err(e) => return Err(e),
    };
    let result = run_open(&config, &store, shutdown, &state, &control).await;
    close_store(store).await;
    result
}

/// How long a stopping run waits for the last handles on the state file
/// (store calls of tasks already told to stop) to be dropped.
const CLOSE_WAIT: Duration = Duration::from_secs(10);

/// Drops this handle once it is the last one, so that the file is closed
/// (and unlocked) on return. Aborted tasks may leave a store call running
/// on a blocking thread for a moment; that call holds a handle until done.
async fn close_store(store: Store) {
    let started = Instant::now();
    while store.handles() > 1 {
        if started.elapsed() > CLOSE_WAIT {
            tracing::warn!(
                handles = store.handles() - 1,
                "state file handles still open after the daemon stopped; they close when their \
                 calls finish"
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    drop(store);
}

/// [`run_with`] once the state file is open. Returns only after every task
/// it spawned has finished.
async fn run_open(
    config: &Config,
    store: &Store,
    mut shutdown: watch::Receiver<bool>,
    state: &Arc<DaemonState>,
    control: &api::Server,
) -> anyhow::Result<()> {
    let config = config.clone();
    let store = store.clone();
    let state = state.clone();
    let mut pipeline = Pipeline::new(&config);
    *state
        .health
        .store_error
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = None;
    state
        .health
        .store_ok
        .store(true, std::sync::atomic::Ordering::Relaxed);
    state.health.note_caught_up();

    let mut governance = govern::setup(&config, &store, &mut pipeline)?;
    let mut prepared = setup::prepare(&config, &store, &pipeline).await?;
    govern::seed_state(&config, &store, &mut governance).await?;
    govern::publish_gauges(&governance);
    reconcile::publish_gauges(&store);
    let gate = snapshot::SnapshotGate::from_store(&store)?;
    let checkpoint = store.checkpoint()?.unwrap_or(Lsn::ZERO);
    state
        .durable_lsn
        .store(checkpoint.0, std::sync::atomic::Ordering::Relaxed);
    tracing::info!(
        slot = %config.source.slot,
        checkpoint = %checkpoint,
        entities = config.entities.len(),
        targets = config.targets.len(),
        "steward started"
    );

    // One driver per target, each over its own outbox cursor.
    let (driver_shutdown_tx, driver_shutdown_rx) = watch::channel(false);
    let mut wakers: Vec<Arc<watch::Sender<u64>>> = Vec::new();
    let mut inboxes = std::collections::HashMap::new();
    let mut drivers: Vec<(String, JoinHandle<anyhow::Result<()>>)> = Vec::new();
    // Every target's sinks are built before any driver starts, so a target
    // that cannot be set up leaves no driver running behind the error.
    let mut all_sinks = Vec::new();
    for target in &config.targets {
        // One sink (connection) per batch that may be in flight at once.
        let sinks = (0..target.delivery.max_in_flight.max(1))
            .map(|_| steward_sinks::build(target, &config))
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| format!("cannot set up target '{}'", target.name))?;
        all_sinks.push(sinks);
    }
    for (target, sinks) in config.targets.iter().zip(all_sinks) {
        let (wake_tx, wake_rx) = watch::channel(0u64);
        let inbox = steward_sinks::requests::Inbox::default();
        inboxes.insert(target.name.clone(), inbox.clone());
        let handle = tokio::spawn(driver::run_target(
            target.clone(),
            store.clone(),
            sinks,
            wake_rx,
            inbox,
            driver_shutdown_rx.clone(),
        ));
        let name = target.name.clone();
        drivers.push((
            name.clone(),
            tokio::spawn(async move {
                handle
                    .await
                    .map_err(|e| anyhow::anyhow!("target '{name}' task failed: {e}"))?
                    .map_err(anyhow::Error::from)
            }),
        ));
        wakers.push(Arc::new(wake_tx));
    }

    let monitor_task = monitor::spawn(config.clone(), store.clone(), state.clone());
    let heartbeat_task = config
        .source
        .heartbeat_interval
        .map(|every| monitor::spawn_heartbeat(config.clone(), every));
    let durable_tx = Arc::new(watch::channel(checkpoint).0);
    // One chunk at a time: the worker waits for each to be governed and committed.
    let (chunk_tx, mut chunk_rx) = mpsc::channel(1);
    let (reset_tx, reset_rx) = mpsc::channel(CONTROL_CHANNEL_CAPACITY);
    let (gov_tx, mut gov_calls) = mpsc::channel(CONTROL_CHANNEL_CAPACITY);
    // Detaches on drop, whichever way this run ends.
    let _attached = control.attach(api::RunHandles {
        config: config.clone(),
        store: store.clone(),
        governance: gov_tx,
        resets: reset_tx,
        inboxes,
    });
    let snapshot_task = tokio::spawn(
        snapshot::Worker {
            config: config.clone(),
            store: store.clone(),
            gate: gate.clone(),
            chunks: chunk_tx,
            durable: durable_tx.subscribe(),
            initial: prepared.initial_snapshot.take(),
            resets: reset_rx,
            shutdown: shutdown.clone(),
        }
        .run(),
    );
    let mut committer = Committer::new(&config, &store, gate, durable_tx, wakers, state.clone());

    let mut attempt: u32 = 0;
    let result: anyhow::Result<()> = loop {
        if *shutdown.borrow() {
            break Ok(());
        }
        let client = tokio::select! {
            _ = shutdown.changed() => break Ok(()),
            client = ReplicationClient::connect(&config.source) => client,
        };
        let client = match client {
            Ok(c) => c,
            // Refused credentials are retried too: the password is read
            // again on every attempt, so writing the new one to
            // password_file is all a rotation takes.
            Err(e) if e.is_transient() || e.is_auth_failure() => {
                let delay = stream::reconnect_delay(attempt);
                tracing::warn!(error = %e, retry_in = ?delay, "cannot connect to the source; retrying");
                *state
                    .last_error
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(e.to_string());
                attempt += 1;
                tokio::select! {
                    _ = shutdown.changed() => break Ok(()),
                    _ = tokio::time::sleep(delay) => continue,
                }
            }
            Err(e) => break Err(anyhow::Error::from(e).context("cannot connect to the source")),
        };
        let durable = committer.durable();
        let position_wanted = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let params = SessionParams {
            position_wanted: position_wanted.clone(),
            slot: config.source.slot.clone(),
            publication: config.source.publication.clone(),
            start: durable.max(prepared.start_floor),
            skip_before: durable,
            status_interval: config.source.status_interval,
            streaming: config.source.streaming,
            spill: Arc::new(store.clone()),
        };
        let (tx, rx) = mpsc::channel(SOURCE_CHANNEL_CAPACITY);
        let (session_shutdown_tx, session_shutdown_rx) = watch::channel(false);
        let session = tokio::spawn(stream::run_session(
            client,
            params,
            tx,
            committer.durable_tx.subscribe(),
            session_shutdown_rx,
        ));
        state
            .connected
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let mut snapshots = SnapshotIntake {
            rx: &mut chunk_rx,
            parked: None,
            position: durable.max(prepared.start_floor),
            position_wanted,
        };
        let outcome = consume(
            &config,
            &mut pipeline,
            &mut governance,
            &mut committer,
            rx,
            &mut snapshots,
            &mut gov_calls,
            &mut shutdown,
        )
        .await;
        // Whatever ended the session, complete transactions already received
        // are committed so that the source confirms them before it stops.
        let flushed = committer.flush_and_wait();
        // A batch the store could not take (disk full) is dropped here: it is
        // not confirmed, so the next session receives it again from the server.
        if committer.discard_pending() {
            // The in-memory governance state already counts the dropped
            // transactions: start again from what the store holds, since the
            // server sends them again.
            governance = match govern::setup(&config, &store, &mut pipeline) {
                Ok(g) => g,
                Err(e) => break Err(e),
            };
            govern::publish_gauges(&governance);
        }
        let _ = session_shutdown_tx.send(true);
        let session_result = match session.await {
            Ok(result) => result,
            Err(e) => {
                tracing::error!(error = %e, "replication task failed");
                Err(SourceError::Ended)
            }
        };
        state
            .connected
            .store(false, std::sync::atomic::Ordering::Relaxed);
        if let Err(e) = flushed {
            break Err(e);
        }
        match outcome {
            Err(e) => break Err(e),
            Ok(Consumed::Shutdown) => {
                if let Err(e) = session_result {
                    tracing::warn!(error = %e, "replication ended with an error during shutdown");
                }
                break Ok(());
            }
            Ok(Consumed::SourceEnded) => match session_result {
                Ok(()) => break Ok(()),
                Err(e) if e.is_transient() => {
                    let delay = stream::reconnect_delay(attempt);
                    tracing::warn!(error = %e, retry_in = ?delay, "replication interrupted; reconnecting");
                    *state
                        .last_error
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(e.to_string());
                    attempt += 1;
                    tokio::select! {
                        _ = shutdown.changed() => break Ok(()),
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
                Err(e @ SourceError::SlotDropped { .. }) => {
                    break Err(setup::explain_slot_dropped(
                        &config.source,
                        &store,
                        committer.durable(),
                        anyhow::Error::from(e),
                    )
                    .await)
                }
                Err(e) => break Err(anyhow::Error::from(e)),
            },
        }
        // A session that streamed for a while resets the backoff.
        attempt = attempt.min(2);
    };

    let _ = driver_shutdown_tx.send(true);
    for (name, handle) in drivers {
        match handle.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::error!(target = %name, error = %e, "target stopped with an error");
            }
            Err(e) => tracing::error!(target = %name, error = %e, "target task failed"),
        }
    }
    // The snapshot task stops between chunks once shutdown is set; on an
    // error exit it is stopped here (its progress is in the store).
    snapshot_task.abort();
    let _ = snapshot_task.await;
    monitor_task.abort();
    if let Some(h) = &heartbeat_task {
        h.abort();
    }
    let _ = monitor_task.await;
    if let Some(h) = heartbeat_task {
        let _ = h.await;
    }
    if result.is_ok() {
        // Everything received is committed: the counts match the store.
        govern::save_summary(&store, &governance);
    }
    result
}

enum Consumed {
    Shutdown,
    SourceEnded,
}

/// Snapshot chunks waiting to be governed in stream order.
struct SnapshotIntake<'a> {
    rx: &'a mut mpsc::Receiver<snapshot::SnapshotChunk>,
    /// A chunk whose consistent point the stream has not reached yet.
    parked: Option<snapshot::SnapshotChunk>,
    /// Everything the server committed before this position has been processed.
    position: Lsn,
    /// Asks the source session for a keepalive, which carries the server's
    /// position when the database is quiet.
    position_wanted: Arc<std::sync::atomic::AtomicBool>,
}

/// Governs a parked snapshot chunk once the stream has passed its
/// consistent point: the governance state is then at least as new as the
/// snapshot for every record, and records changed since are skipped.
fn govern_parked_chunk(
    config: &Config,
    governance: &mut Governance,
    committer: &mut Committer,
    snapshots: &mut SnapshotIntake<'_>,
) -> anyhow::Result<()> {
    let ready = snapshots
        .parked
        .as_ref()
        .is_some_and(|c| snapshots.position >= c.consistent);
    if !ready {
        if snapshots.parked.is_some() {
            snapshots
                .position_wanted
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
        return Ok(());
    }
    let Some(mut chunk) = snapshots.parked.take() else {
        return Ok(());
    };
    watch_windows(config, governance, committer);
    let position = committer.latest();
    let before = committer.batch.len();
    let counts = match chunk.kind {
        snapshot::ChunkKind::Probe => {
            let mut counts = Vec::with_capacity(chunk.targets.len());
            for (i, &t) in chunk.targets.iter().enumerate() {
                let mut rows = if i + 1 < chunk.targets.len() {
                    chunk.mapped.clone()
                } else {
                    std::mem::take(&mut chunk.mapped)
                };
                counts.push(governance.probe_snapshot(
                    &mut rows,
                    chunk.consistent,
                    t,
                    chunk.actual.as_deref(),
                ));
            }
            let _ = chunk.done.send(Ok(counts));
            return Ok(());
        }
        snapshot::ChunkKind::Absent { dry_run } => chunk
            .targets
            .iter()
            .map(|&t| {
                let mut rows = chunk.mapped.clone();
                governance.reconcile_absent(
                    &mut rows,
                    chunk.consistent,
                    t,
                    dry_run,
                    chunk.actual.clone(),
                    position,
                    &mut committer.batch,
                )
            })
            .collect(),
        snapshot::ChunkKind::Govern => governance.process_snapshot(
            &mut chunk.mapped,
            chunk.consistent,
            &SnapshotRead {
                targets: chunk.targets.clone(),
                force: chunk.force,
                known_only: chunk.known_only,
                quiet: chunk.quiet,
                actual: chunk.actual.take(),
            },
            position,
            &mut committer.batch,
        ),
    };
    let appended = committer.batch.len() > before;
    committer.add(appended, take_delta(governance)?, position)?;
    committer.flush_chunk(chunk.done, counts)
}

/// Tells the governance which entities have a snapshot window open, so that
/// it remembers which of their records the stream changes meanwhile.
///
/// Not through the gate's lock: the commit in flight holds it until its
/// fsync is done, and the stream would wait for every commit instead of
/// decoding the next transactions meanwhile.
fn watch_windows(config: &Config, governance: &mut Governance, committer: &Committer) {
    let windows = committer.gate.window_entities();
    if windows.is_empty() {
        drop(windows);
        governance.watch(&[]);
        return;
    }
    let entities: Vec<EntityIndex> = config
        .iter_entities()
        .filter(|(_, e)| windows.contains(&e.name))
        .map(|(i, _)| i)
        .collect();
    drop(windows);
    governance.watch(&entities);
}

/// The transaction being received.
struct OpenTxn {
    final_lsn: Lsn,
    time: String,
    /// The source transaction id, carried by its events.
    xid: u32,
    index: u32,
    /// One entry per record: later changes of a record are folded into its
    /// entry, so a transaction is held (and split into stored pieces) by
    /// records, not by changes.
    mapped: Vec<Mapped>,
    /// 64-bit hash of (entity, key) → position in `mapped`.
    positions: HashKeyed<usize>,
}

// The loop's inputs and the state it drives, each borrowed from the session
// around it: grouping them would only rename the borrows.
#[allow(clippy::too_many_arguments)]
async fn consume(
    config: &Config,
    pipeline: &mut Pipeline,
    governance: &mut Governance,
    committer: &mut Committer,
    mut rx: mpsc::Receiver<SourceEvent>,
    snapshots: &mut SnapshotIntake<'_>,
    gov_calls: &mut mpsc::Receiver<govern::GovCall>,
    shutdown: &mut watch::Receiver<bool>,
) -> anyhow::Result<Consumed> {
    let mut open: Option<OpenTxn> = None;
    // A transaction in progress when the last session ended is sent again from its start.
    let mut large = steward_core::pipeline::large_txn::LargeTxn::default();
    {
        let store = committer.store.clone();
        tokio::task::block_in_place(|| large.reset(&store))?;
    }
    // The last transaction's emptied change list and record index, reused
    // by the next: a fresh index is regrown (rehashed) as each transaction's
    // records arrive.
    let mut spare_mapped: Vec<Mapped> = Vec::new();
    let mut spare_positions: HashKeyed<usize> = HashKeyed::default();
    let mut toast = toast::ToastFiller::default();
    // Proof of life for the systemd watchdog, even when no messages arrive.
    let mut alive = tokio::time::interval(Duration::from_secs(1));
    let mut prune = tokio::time::interval_at(
        tokio::time::Instant::now() + AUDIT_PRUNE_EVERY,
        AUDIT_PRUNE_EVERY,
    );
    prune.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // When the last message or chunk arrived, and whether the buffers kept
    // for the next batch were freed since (see `idle`).
    let mut last_work = Instant::now();
    let mut released = false;
    loop {
        if committer.stalled {
            // The store refused the last commit (disk full, I/O error). Stop
            // taking messages — the source then stops reading, which holds the
            // server back — and retry until it works or we are told to stop.
            tokio::select! {
                biased;
                _ = shutdown.changed() => return Ok(Consumed::Shutdown),
                _ = tokio::time::sleep(STORE_RETRY_INTERVAL) => {
                    // Waiting for disk space is not a hang: keep the watchdog fed.
                    committer.state.health.note_loop_alive();
                    committer.flush()?;
                    continue;
                }
            }
        }
        if rx.is_empty() {
            // Nothing more at hand: group commit without waiting (see
            // `Committer::flush_if_idle`).
            committer.flush_if_idle()?;
        }
        let deadline = committer.deadline();
        let message = tokio::select! {
            biased;
            _ = shutdown.changed() => return Ok(Consumed::Shutdown),
            _ = alive.tick() => {
                committer.state.health.note_loop_alive();
                if !released
                    && committer.in_flight.is_none()
                    && last_work.elapsed() >= idle::RELEASE_AFTER
                {
                    released = true;
                    spare_mapped = Vec::new();
                    spare_positions = HashKeyed::default();
                    committer.release_buffers();
                    governance.release_buffers();
                    idle::collect();
                }
                continue;
            }
            // Take a finished commit's outcome at once: when the stream goes
            // quiet this is what marks the source caught up (lag 0).
            outcome = commit_finished(&mut committer.in_flight), if committer.in_flight.is_some() => {
                committer.in_flight = None;
                committer.take_outcome(outcome)?;
                continue;
            }
            _ = sleep_until_opt(deadline) => {
                committer.flush()?;
                continue;
            }
            Some(call) = gov_calls.recv() => {
                answer_call(governance, committer, call)?;
                continue;
            }
            _ = prune.tick() => {
                tokio::task::block_in_place(|| govern::prune_audit(config, &committer.store));
                continue;
            }
            chunk = snapshots.rx.recv(), if snapshots.parked.is_none() => {
                (last_work, released) = (Instant::now(), false);
                snapshots.parked = chunk;
                govern_parked_chunk(config, governance, committer, snapshots)?;
                continue;
            }
            message = rx.recv() => message,
        };
        (last_work, released) = (Instant::now(), false);
        let Some(message) = message else {
            return Ok(Consumed::SourceEnded);
        };
        match message {
            SourceEvent::Position(lsn) => {
                snapshots.position = snapshots.position.max(lsn);
                govern_parked_chunk(config, governance, committer, snapshots)?;
            }
            SourceEvent::Relation(relation) => committer.schema.on_relation(
                config,
                pipeline,
                &relation,
                &committer.store,
                &committer.gate,
            )?,
            SourceEvent::Begin {
                final_lsn,
                commit_time_micros,
                xid,
            } => {
                committer.state.health.note_begin(commit_time_micros);
                open = Some(OpenTxn {
                    final_lsn,
                    time: pg_micros_to_rfc3339(commit_time_micros),
                    xid,
                    index: 0,
                    mapped: std::mem::take(&mut spare_mapped),
                    positions: std::mem::take(&mut spare_positions),
                });
            }
            SourceEvent::Change(change) => {
                let Some(txn) = open.as_mut() else {
                    anyhow::bail!("the server sent a row change outside a transaction");
                };
                let index = txn.index;
                txn.index += 1;
                if pipeline.is_mapped(change.relation_id) {
                    let mut change = change;
                    if let Some(fill) = pipeline.toast_fill_query(&change) {
                        if !toast.fill(&config.source, &mut change, fill).await? {
                            continue;
                        }
                    }
                    let before = txn.mapped.len();
                    pipeline.map_change(
                        &change,
                        txn.final_lsn,
                        index,
                        &txn.time,
                        &mut txn.mapped,
                    )?;
                    for m in &mut txn.mapped[before..] {
                        m.event.tx_id = Some(txn.xid);
                    }
                    fold_repeats(txn, before);
                    let stage_at = if large.is_active() {
                        committer.large_piece()
                    } else {
                        committer.max_events
                    };
                    if txn.mapped.len() >= stage_at {
                        // A huge transaction (a mass price update, an import):
                        // stage its records on disk instead of holding them
                        // in memory, each folded into its staged entry.
                        committer.note_received(pipeline, &txn.mapped);
                        txn.positions.clear();
                        let store = committer.store.clone();
                        tokio::task::block_in_place(|| {
                            large.absorb(&store, governance, &mut txn.mapped)
                        })?;
                        // From here on at most a piece is held at a time:
                        // the room the first `commit_max_events` changes
                        // took is given back now instead of being kept for
                        // the rest of the transaction and after it.
                        txn.mapped.shrink_to(committer.large_piece());
                    }
                }
            }
            SourceEvent::Truncate { relation_ids } => {
                if let Some(txn) = open.as_mut() {
                    txn.index += 1;
                }
                if relation_ids.iter().any(|id| pipeline.is_mapped(*id)) {
                    tracing::warn!(
                        ?relation_ids,
                        "TRUNCATE of a mapped table is not propagated to targets; resynchronise them if it was intended"
                    );
                }
            }
            SourceEvent::Commit { end_lsn, .. } => {
                let Some(mut txn) = open.take() else {
                    anyhow::bail!("the server sent a commit without a transaction");
                };
                committer.note_received(pipeline, &txn.mapped);
                watch_windows(config, governance, committer);
                let before = committer.batch.len();
                let mut appended = false;
                if large.is_active() {
                    // The pieces are stored as they are governed; the
                    // checkpoint moves only with the commit below, so after
                    // a crash the server sends the whole transaction again
                    // and the stored pieces are re-sent with the same event
                    // ids, which targets de-duplicate.
                    let store = committer.store.clone();
                    let max = committer.large_piece();
                    tokio::task::block_in_place(|| {
                        large.absorb(&store, governance, &mut txn.mapped)?;
                        large.govern(
                            &store,
                            governance,
                            max,
                            txn.final_lsn,
                            &txn.time,
                            &mut |events, governance| {
                                appended |= !events.is_empty();
                                committer.add_partial(events, take_delta(governance)?)
                            },
                        )
                    })?;
                } else {
                    governance.process_drain_into(
                        &mut txn.mapped,
                        txn.final_lsn,
                        &txn.time,
                        &mut committer.batch,
                    );
                }
                spare_mapped = txn.mapped;
                txn.positions.clear();
                spare_positions = txn.positions;
                let appended = appended || committer.batch.len() > before;
                committer.add(appended, take_delta(governance)?, end_lsn)?;
                snapshots.position = snapshots.position.max(end_lsn);
                if snapshots.parked.is_some() {
                    govern_parked_chunk(config, governance, committer, snapshots)?;
                }
            }
        }
    }
}

/// Answers a quarantine request from the control API; what a release
/// produced joins the batch being committed, in the name of the person who
/// asked.
fn answer_call(
    governance: &mut Governance,
    committer: &mut Committer,
    call: govern::GovCall,
) -> anyhow::Result<()> {
    let version = committer.latest();
    let release = match &call.request {
        govern::Request::QuarantineRelease { entity, key } => Some((entity.clone(), key.clone())),
        _ => None,
    };
    // Dropped dead letters are forgotten durably before the drop is answered.
    let durable = matches!(call.request, govern::Request::ForgetSent { .. });
    let mut events = Vec::new();
    let store = committer.store.clone();
    let response = govern::answer(&store, governance, version, call.request, &mut events);
    let mut delta = take_delta(governance)?;
    if let (Some((entity, key)), Some(_)) = (release, &response.message) {
        let outcome = response.error.clone().unwrap_or_default();
        let actor = call.actor.unwrap_or_else(|| govern::Actor {
            user: "unknown".to_string(),
            comment: None,
        });
        actor.stamp_release(&mut delta, &entity, &key, version, &outcome);
    }
    if !events.is_empty() || !delta.is_empty() {
        let appended = !events.is_empty();
        committer.batch.extend(events);
        committer.add(appended, delta, version)?;
        if durable {
            committer.flush_and_wait()?;
        }
    }
    // The asker may have given up waiting; the release stands anyway.
    let _ = call.reply.send(response);
    Ok(())
}

/// Folds the changes mapped from `txn.mapped[from..]` into the entries of
/// records changed earlier in the transaction.
fn fold_repeats(txn: &mut OpenTxn, from: usize) {
    let mut i = from;
    while i < txn.mapped.len() {
        let m = &txn.mapped[i];
        let slot = record_hash(m.entity, &m.event.key);
        match txn.positions.get(&slot).copied() {
            Some(at)
                if txn.mapped[at].entity == m.entity && txn.mapped[at].event.key == m.event.key =>
            {
                let later = txn.mapped.remove(i);
                txn.mapped[at].fold(later);
            }
            // Two records with one hash (odds 2^-64): the second keeps its own entry.
            Some(_) => i += 1,
            None => {
                txn.positions.insert(slot, i);
                i += 1;
            }
        }
    }
}

/// The queued governance state changes; the quarantine and record-state
/// gauges are refreshed when they changed, so they move with the batch
/// that stores them. An error reading the published state from the store
/// fails the batch: its decisions read that state as empty.
fn take_delta(governance: &mut Governance) -> anyhow::Result<GovDelta> {
    let delta = governance.take_delta();
    if let Some(error) = governance.state_error() {
        anyhow::bail!("{error}");
    }
    if delta
        .ops
        .iter()
        .any(|op| matches!(op, GovOp::Quarantine { .. }))
    {
        govern::publish_quarantine(governance);
    }
    if governance.take_counts_changed() {
        govern::publish_records(governance);
    }
    Ok(delta)
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}
