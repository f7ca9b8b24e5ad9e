//! Per-target delivery loop: reads the target's outbox in order, gathers a
//! batch, hands it to the target's sink and acknowledges it in the store only
//! once the sink reports the target durably accepted it.
//!
//! Failure policy (see `config::DeliveryPolicy`):
//! - Retryable failures (5xx, 408, 429, timeouts, refused connections) retry
//!   the same batch with exponential backoff and full jitter, capped at
//!   `retry_max`; a target's `Retry-After` is honoured up to one hour. After
//!   `max_attempts` or once the batch's oldest event is older than `max_age`
//!   (both unlimited by default) the batch's events are dead-lettered.
//! - A rejection (another 4xx, or an event the sink cannot encode) concerns
//!   the batch's content. A batch is all-or-nothing, so the driver bisects it
//!   to find the event(s) rejected on their own and dead-letters only those.
//! - 401, 403, 404, 405 and 407 mean the target refuses every request (wrong
//!   URL or credentials): dead-lettering would empty the outbox into the
//!   dead-letter queue, so such batches are retried every `retry_max` until
//!   the target or the configuration is fixed.
//! - A dead-lettered event *holds* its key (entity + key): the key's later
//!   events are parked behind it in the dead-letter queue, so a key's events
//!   never arrive out of order, while every other key keeps flowing.
//!   `steward dlq replay` puts a key's dead letters back ahead of the outbox.
//!
//! Events stay in the outbox until settled (delivered, dead-lettered or moved
//! to the window buffer) in one store transaction, so a crash or shutdown at
//! any point re-delivers at most the batch in flight, which targets
//! de-duplicate by event id.
//!
//! Batch windows: events of an entity in window mode move from the outbox to
//! the target's window buffer (latest event per key) and are delivered when
//! the window opens or on `steward flush`.
//!
//! Operator requests (`steward dlq`, `steward flush`) arrive as files (see
//! `sinks::requests`) and are applied between batches; a batch in flight or
//! backing off is abandoned for a request that changes what comes next.
//!
//! One driver runs per target, so a slow or failing target only grows its own
//! backlog and never holds up the others.

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::{FuturesUnordered, StreamExt};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use rand::RngExt;
use tokio::sync::watch;
use tokio::time::Instant;

use super::requests::{self, Request, Response};
use steward_core::config::{TargetConfig, Window};
use steward_core::model::Event;
use steward_store::{key_of, Failure, NewDeadLetter, Settlement, Store, StoreError};

/// Longest pause honoured from a target's own `Retry-After`; a longer one is
/// more likely a misconfiguration than a wish to receive nothing for hours.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// Shortest pause between attempts, so a zero `retry_initial` cannot spin.
const MIN_RETRY_DELAY: Duration = Duration::from_millis(1);

/// How often an idle driver looks at its outbox when nobody can wake it any more
/// (the daemon dropped the wake sender but did not ask for shutdown).
const IDLE_POLL: Duration = Duration::from_secs(1);

/// HTTP statuses that mean "every request is refused", not "this content is
/// refused": retried, never dead-lettered (see the module documentation).
const REFUSES_ALL: &[u16] = &[401, 403, 404, 405, 407];

/// A target's sink, e.g. the HTTP client. Tests use a fake.
pub trait Deliver: Send {
    /// Delivers the batch in order. Ok only when the target durably accepted all of it.
    fn deliver<'a>(
        &'a mut self,
        events: &'a [Event],
    ) -> impl Future<Output = Result<(), DeliveryError>> + Send + 'a;
}

/// Why a delivery attempt failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct DeliveryError {
    /// False when retrying as-is cannot help (e.g. HTTP 400, 422): the driver
    /// isolates the rejected event(s) and dead-letters them.
    pub retryable: bool,
    /// Operator-readable, e.g. `HTTP 503 from https://...: <body excerpt>`. Never secrets.
    pub message: String,
    /// The target's own wish, e.g. from a `Retry-After` header.
    pub retry_after: Option<Duration>,
    /// The HTTP status (or the like), when the target answered.
    pub status: Option<u16>,
}

impl DeliveryError {
    pub fn retryable(message: impl Into<String>) -> DeliveryError {
        DeliveryError {
            retryable: true,
            message: message.into(),
            retry_after: None,
            status: None,
        }
    }

    pub fn permanent(message: impl Into<String>) -> DeliveryError {
        DeliveryError {
            retryable: false,
            message: message.into(),
            retry_after: None,
            status: None,
        }
    }

    /// A rejection of the content (to isolate and dead-letter), as opposed to
    /// a failure to retry.
    fn rejects_content(&self) -> bool {
        !self.retryable && !self.status.is_some_and(|s| REFUSES_ALL.contains(&s))
    }
}

/// The daemon's side of a driver: tells it that new entries were appended.
#[derive(Clone, Debug)]
pub struct DriverHandle {
    wake: watch::Sender<u64>,
}

impl DriverHandle {
    /// A handle and the receiver to pass to [`run_target`].
    pub fn new() -> (DriverHandle, watch::Receiver<u64>) {
        let (wake, rx) = watch::channel(0);
        (DriverHandle { wake }, rx)
    }

    /// Wakes the driver: entries up to `last_seq` are in its outbox.
    /// Never blocks; many notifications before the driver looks collapse into one.
    pub fn notify(&self, last_seq: u64) {
        self.wake.send_replace(last_seq);
    }
}

/// Delivers the target's outbox until `shutdown` becomes true (or its sender
/// is dropped). Returns `Ok` on shutdown, leaving unacknowledged entries in
/// the outbox for the next start; `Err` only when the store is unusable
/// (corrupted, undecodable entry), since retrying cannot help then.
///
/// One sink per batch that may be in flight at once: `sinks.len()` is the
/// target's `max_in_flight` (see [`Driver::run`] for how order is kept).
pub async fn run_target<D: Deliver + 'static>(
    target: TargetConfig,
    store: Store,
    sinks: Vec<D>,
    wake: watch::Receiver<u64>,
    shutdown: watch::Receiver<bool>,
) -> Result<(), StoreError> {
    let requests_dir = requests::requests_dir(store.path());
    let limits = Arc::new(Limits::new(&target));
    let metrics = Arc::new(TargetMetrics::new(&target.name));
    let max = target.batch_max_events.max(1).min(limits.max_batch());
    let target = Arc::new(target);
    let lanes: Vec<Lane<D>> = sinks
        .into_iter()
        .map(|sink| Lane {
            sink,
            target: Arc::clone(&target),
            store: store.clone(),
            shutdown: shutdown.clone(),
            requests_dir: requests_dir.clone(),
            limits: Arc::clone(&limits),
            metrics: Arc::clone(&metrics),
        })
        .collect();
    if lanes.is_empty() {
        tracing::error!(target_name = %target.name, "no sink for the target: nothing is delivered");
        return Ok(());
    }
    let mut driver = Driver {
        max,
        max_in_flight: lanes.len(),
        lanes,
        target,
        store,
        wake,
        wake_open: true,
        shutdown,
        metrics,
        held: HashSet::new(),
        acked_lazily: HashSet::new(),
        acked_lazily_at: 0,
        requests_dir,
        flush: false,
        next_open: HashMap::new(),
    };
    match driver.run().await {
        Ok(()) | Err(Stop::Shutdown) | Err(Stop::Interrupted) => Ok(()),
        Err(Stop::Store(e)) => Err(e),
    }
}

/// Why a step of the driver ended early.
#[derive(Debug)]
enum Stop {
    Shutdown,
    /// An operator request that changes what is delivered next is waiting.
    Interrupted,
    Store(StoreError),
}

impl From<StoreError> for Stop {
    fn from(e: StoreError) -> Self {
        Stop::Store(e)
    }
}

/// Where a batch came from; all entries of one batch come from one place.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Origin {
    Outbox,
    Replay,
    Window,
}

struct Driver<D> {
    target: Arc<TargetConfig>,
    store: Store,
    /// Idle lanes. A lane owns a sink; a batch in flight owns its lane.
    lanes: Vec<Lane<D>>,
    /// Number of lanes: most outbox batches in flight at once.
    max_in_flight: usize,
    wake: watch::Receiver<u64>,
    wake_open: bool,
    shutdown: watch::Receiver<bool>,
    metrics: Arc<TargetMetrics>,
    /// Keys (`key_of`) with dead letters: their events are parked, not sent.
    held: HashSet<String>,
    requests_dir: PathBuf,
    /// `steward flush` asked to open every window now.
    flush: bool,
    /// Per windowed entity, the next opening (Unix seconds).
    next_open: HashMap<String, i64>,
    max: usize,
    /// Keys (`key_hash`) of batches acknowledged without fsync, and the
    /// store's durable commit count after the last of those
    /// acknowledgements (see [`Driver::settle_durably_before`]).
    acked_lazily: HashSet<u64>,
    acked_lazily_at: u64,
}

/// The outcome of delivering a list of events with isolation.
#[derive(Default)]
struct Isolated {
    delivered: u64,
    dead: Vec<NewDeadLetter>,
    error: Option<String>,
    /// Keys that became held (a dead letter of their own) in this batch.
    held: HashSet<String>,
}

/// One batch sorted by [`Driver::prepare`].
struct Prepared {
    origin: Origin,
    /// The last outbox seq or replay id of the batch.
    last: Option<u64>,
    /// Events of held keys, parked in the dead-letter queue.
    parked: Vec<NewDeadLetter>,
    /// Events of windowed entities, for the window buffer.
    windowed: Vec<Event>,
    /// Events to deliver; taken by the lane that delivers them.
    send: Vec<Event>,
    /// Commit times (Unix microseconds) of the events to deliver, one entry
    /// per run of equal times with its length, for the latency histogram.
    send_times: Vec<(i64, u64)>,
    window_done: Vec<(String, String)>,
}

/// An outbox batch handed to a lane; batches settle in outbox order.
struct InFlight {
    prepared: Prepared,
    /// `key_hash` of each of its events; no other batch in flight has any of them.
    keys: Vec<u64>,
    /// Set when its lane is done with it.
    outcome: Option<Isolated>,
}

/// A lane back from a batch: the batch's last seq, the lane, the outcome.
type LaneDone<D> = (u64, Lane<D>, Result<Isolated, Stop>);
type LaneFuture<D> = Pin<Box<dyn Future<Output = LaneDone<D>> + Send>>;

/// The outbox batches in flight, in outbox order, and their keys.
struct Flights<D> {
    pending: VecDeque<InFlight>,
    busy: HashSet<u64>,
    running: FuturesUnordered<LaneFuture<D>>,
    /// An operator request is waiting: no new batch starts, and what is not
    /// settled when the last lane is back is read again after the request.
    abandoning: bool,
}

impl<D: Deliver + 'static> Driver<D> {
    /// The delivery loop. Outbox batches go to idle lanes, so up to
    /// `max_in_flight` are in flight at once, under two rules:
    /// - per-key order: a batch never holds a key of a batch still in flight
    ///   (it ends before the first such event), so a key's events reach the
    ///   target one batch after the other;
    /// - batches settle in outbox order: a finished batch waits for the ones
    ///   before it, so the target's position in the outbox only ever moves
    ///   past a gap-free prefix, and a crash redelivers every batch not
    ///   settled (targets de-duplicate by event id).
    ///
    /// Replayed dead letters, batch windows and operator requests are handled
    /// when nothing is in flight.
    async fn run(&mut self) -> Result<(), Stop> {
        let name = self.target.name.clone();
        tracing::debug!(target_name = %name, max_in_flight = self.max_in_flight, "delivery driver started");
        let flush_key = requests::flush_meta_key(&name);
        let (held, flush) = {
            let (store, name, key) = (self.store.clone(), name.clone(), flush_key.clone());
            self.store_call(move || {
                let flush = store.get_meta(&key)?.is_some_and(|v| v == "1");
                if flush {
                    store.set_meta(&key, "0")?;
                }
                Ok((store.held_keys(&name)?, flush))
            })
            .await?
        };
        self.held = held;
        self.flush = flush;
        self.schedule_windows(false);
        self.refresh_gauges().await?;
        // Last sequence number handed to a lane by this run; the store also
        // skips settled entries, so starting from `None` is right after a
        // restart or an abandoned flight.
        let mut cursor: Option<u64> = None;
        let mut flights = Flights {
            pending: VecDeque::new(),
            busy: HashSet::new(),
            running: FuturesUnordered::new(),
            abandoning: false,
        };

        loop {
            if flights.pending.is_empty() {
                if flights.abandoning {
                    flights.abandoning = false;
                    cursor = None;
                }
                self.handle_requests().await?;

                // Replayed dead letters go first: they are older than the outbox.
                let replay = {
                    let (store, name, max) = (self.store.clone(), name.clone(), self.max);
                    self.store_call(move || store.read_replay(&name, max))
                        .await?
                };
                if let Some(&(last_id, _)) = replay.last() {
                    let events = replay.into_iter().map(|(_, e)| e).collect();
                    match self.process(Origin::Replay, events, Some(last_id)).await {
                        Err(Stop::Interrupted) => continue,
                        other => other?,
                    }
                    continue;
                }
            }

            // Marking the wake value seen BEFORE reading means an append that
            // lands after the read still wakes the wait below.
            self.wake.borrow_and_update();
            let room = !flights.abandoning && flights.pending.len() < self.max_in_flight;
            let mut batch = Vec::new();
            if room {
                let (store, name, max) = (self.store.clone(), name.clone(), self.max);
                let (read, backlog) = self
                    .store_call(move || {
                        let batch = store.read_outbox(&name, cursor, max)?;
                        let backlog = store.backlog(&name)?;
                        Ok((batch, backlog))
                    })
                    .await?;
                self.metrics.backlog.set(backlog as f64);
                batch = read;
                // Per-key order: end the batch before a key still in flight.
                if !flights.busy.is_empty() {
                    if let Some(cut) = batch
                        .iter()
                        .position(|(_, e)| flights.busy.contains(&key_hash(e)))
                    {
                        batch.truncate(cut);
                    }
                }
            }

            if batch.is_empty() && !flights.pending.is_empty() {
                // Wait for a lane to come back (or, with a lane free, for more events).
                let done = tokio::select! {
                    biased;
                    _ = shutdown_requested(&mut self.shutdown) => return Err(Stop::Shutdown),
                    Some(done) = flights.running.next() => Some(done),
                    changed = self.wake.changed(), if room && self.wake_open => {
                        if changed.is_err() {
                            self.wake_open = false;
                        }
                        None
                    }
                    _ = tokio::time::sleep(IDLE_POLL), if room && !self.wake_open => None,
                };
                if let Some(done) = done {
                    self.lane_done(done, &mut flights).await?;
                }
                continue;
            }

            if batch.is_empty() {
                // Windows open once the outbox is drained into the window
                // buffer, so a window (or flush) includes everything committed
                // before it.
                match self.deliver_due_windows().await {
                    Err(Stop::Interrupted) => continue,
                    Ok(true) => continue,
                    other => {
                        other?;
                    }
                }
                let next_window = self.next_window_instant();
                tokio::select! {
                    biased;
                    _ = shutdown_requested(&mut self.shutdown) => return Err(Stop::Shutdown),
                    changed = self.wake.changed(), if self.wake_open => {
                        if changed.is_err() {
                            self.wake_open = false;
                        }
                    }
                    _ = tokio::time::sleep(IDLE_POLL), if !self.wake_open => {}
                    _ = tokio::time::sleep(requests::POLL) => {}
                    _ = sleep_until_opt(next_window) => {}
                }
                continue;
            }

            // Linger: a small batch waits briefly for more so that a burst of
            // single-row transactions goes out as one request. Only when no
            // batch is in flight: lanes in flight are not driven meanwhile,
            // and a free lane is better used at once.
            if flights.pending.is_empty()
                && batch.len() < self.max
                && !self.target.batch_linger.is_zero()
            {
                let deadline = Instant::now() + self.target.batch_linger;
                while batch.len() < self.max {
                    tokio::select! {
                        biased;
                        _ = shutdown_requested(&mut self.shutdown) => return Err(Stop::Shutdown),
                        changed = self.wake.changed(), if self.wake_open => {
                            if changed.is_err() {
                                self.wake_open = false;
                                continue;
                            }
                            self.wake.borrow_and_update();
                            let after = batch.last().map(|(seq, _)| *seq);
                            let want = self.max - batch.len();
                            let (store, name) = (self.store.clone(), name.clone());
                            let more = self
                                .store_call(move || store.read_outbox(&name, after, want))
                                .await?;
                            batch.extend(more);
                        }
                        _ = tokio::time::sleep_until(deadline) => break,
                        // A long linger must not delay an operator request.
                        _ = interrupted(&self.store, &self.requests_dir, &self.target.name) => break,
                    }
                }
            }

            let Some(&(last_seq, _)) = batch.last() else {
                continue;
            };
            let Some(mut lane) = self.lanes.pop() else {
                // Cannot happen: a lane is idle whenever a batch is pending less.
                continue;
            };
            let keys: Vec<u64> = batch.iter().map(|(_, e)| key_hash(e)).collect();
            self.settle_durably_before(&keys).await?;
            let events = batch.into_iter().map(|(_, e)| e).collect();
            let mut prepared = self.prepare(Origin::Outbox, events, Some(last_seq));
            let send = std::mem::take(&mut prepared.send);
            flights.busy.extend(keys.iter().copied());
            flights.pending.push_back(InFlight {
                prepared,
                keys,
                outcome: None,
            });
            flights.running.push(Box::pin(async move {
                let outcome = lane.deliver_isolating(send).await;
                (last_seq, lane, outcome)
            }));
            cursor = Some(last_seq);
        }
    }

    /// Makes the acknowledgement of every earlier batch holding one of
    /// `keys` durable before a batch with them is sent. Acknowledgements are
    /// written without fsync (any later durable commit persists them), so
    /// after a crash the batches whose acknowledgement was lost are sent
    /// again. Were an older event of a key among them while a newer one had
    /// been delivered after it, the target would get them out of order;
    /// with this the re-sent batches are at most those in flight at the
    /// crash, and each key's events are re-sent in order. One fsync is
    /// paid only when a key comes back before the stream's own durable
    /// commits covered its acknowledgement.
    async fn settle_durably_before(&mut self, keys: &[u64]) -> Result<(), Stop> {
        if self.acked_lazily.is_empty() {
            return Ok(());
        }
        if self.store.durable_commits() > self.acked_lazily_at {
            self.acked_lazily.clear();
            return Ok(());
        }
        if keys.iter().any(|k| self.acked_lazily.contains(k)) {
            let store = self.store.clone();
            self.store_call(move || store.make_durable()).await?;
            self.acked_lazily.clear();
        }
        Ok(())
    }

    /// Takes a lane back, records its batch's outcome and settles every
    /// finished batch at the front, in outbox order.
    async fn lane_done(
        &mut self,
        (last_seq, lane, outcome): LaneDone<D>,
        flights: &mut Flights<D>,
    ) -> Result<(), Stop> {
        self.lanes.push(lane);
        match outcome {
            Ok(isolated) => {
                if let Some(f) = flights
                    .pending
                    .iter_mut()
                    .find(|f| f.prepared.last == Some(last_seq))
                {
                    f.outcome = Some(isolated);
                }
            }
            Err(Stop::Interrupted) => flights.abandoning = true,
            Err(e) => return Err(e),
        }
        while flights.pending.front().is_some_and(|f| f.outcome.is_some()) {
            let Some(InFlight {
                prepared,
                keys,
                outcome: Some(outcome),
            }) = flights.pending.pop_front()
            else {
                break;
            };
            self.settle(prepared, outcome).await?;
            self.acked_lazily_at = self.store.durable_commits();
            for k in &keys {
                flights.busy.remove(k);
                self.acked_lazily.insert(*k);
            }
        }
        if flights.abandoning && flights.running.is_empty() {
            // What is left was not (all) delivered: read again once the
            // operator request is applied.
            flights.pending.clear();
            flights.busy.clear();
        }
        Ok(())
    }

    /// Sorts, delivers and settles one batch while nothing else is in flight
    /// (replayed dead letters and batch windows).
    async fn process(
        &mut self,
        origin: Origin,
        events: Vec<Event>,
        last: Option<u64>,
    ) -> Result<(), Stop> {
        let mut prepared = self.prepare(origin, events, last);
        let Some(mut lane) = self.lanes.pop() else {
            return Ok(());
        };
        let send = std::mem::take(&mut prepared.send);
        let outcome = lane.deliver_isolating(send).await;
        self.lanes.push(lane);
        self.settle(prepared, outcome?).await
    }

    /// Sorts one batch into parked (held key), buffered (windowed entity) and
    /// sent events.
    fn prepare(&self, origin: Origin, events: Vec<Event>, last: Option<u64>) -> Prepared {
        let mut parked = Vec::new();
        let mut windowed = Vec::new();
        let mut send = Vec::new();
        let window_done: Vec<(String, String)> = if origin == Origin::Window {
            events.iter().map(|e| (key_of(e), e.id.clone())).collect()
        } else {
            Vec::new()
        };
        for e in events {
            if !self.held.is_empty() && self.held.contains(&key_of(&e)) {
                parked.push(NewDeadLetter {
                    event: e,
                    failure: None,
                });
            } else if origin == Origin::Outbox
                && *self.target.delivery.window_of(&e.entity) != Window::Realtime
            {
                windowed.push(e);
            } else {
                send.push(e);
            }
        }
        let send_times = commit_times(&send);
        Prepared {
            origin,
            last,
            parked,
            windowed,
            send,
            send_times,
            window_done,
        }
    }

    /// Records what became of one batch in one store transaction.
    async fn settle(&mut self, prepared: Prepared, outcome: Isolated) -> Result<(), Stop> {
        let Prepared {
            origin,
            last,
            parked,
            windowed,
            send: _,
            send_times,
            window_done,
        } = prepared;
        self.held.extend(outcome.held);
        let mut dead = parked;
        dead.extend(outcome.dead);
        let settlement = Settlement {
            outbox_up_to: if origin == Origin::Outbox { last } else { None },
            replay_up_to: if origin == Origin::Replay { last } else { None },
            window_done,
            delivered: outcome.delivered,
            dead,
            windowed,
            error: outcome.error,
        };
        let n_dead = settlement.dead.len() as u64;
        let (store, name) = (self.store.clone(), self.target.name.clone());
        let settlement = Arc::new(settlement);
        let (backlog, counts) = {
            let s = settlement.clone();
            self.store_call(move || {
                store.settle(&name, &s)?;
                Ok((store.backlog(&name)?, store.delivery_counts(&name)?))
            })
            .await?
        };
        self.metrics.backlog.set(backlog as f64);
        self.metrics.dead_letters.increment(n_dead);
        self.metrics
            .dead_letter_events
            .set(counts.dead_letters as f64);
        if outcome.delivered > 0 {
            self.metrics.delivered.increment(outcome.delivered);
            let now = chrono::Utc::now().timestamp_micros();
            for (time, count) in send_times {
                let micros = now.saturating_sub(time).max(0);
                self.metrics
                    .latency
                    .record_many(micros as f64 / 1e6, count as usize);
            }
        }
        Ok(())
    }
}

/// What delivering one batch needs, owned, so that several batches can be in
/// flight at once, one per lane.
struct Lane<D> {
    sink: D,
    target: Arc<TargetConfig>,
    store: Store,
    shutdown: watch::Receiver<bool>,
    requests_dir: PathBuf,
    /// Shared by the target's lanes.
    limits: Arc<Limits>,
    metrics: Arc<TargetMetrics>,
}

impl<D: Deliver> Lane<D> {
    /// Delivers `events` in order. A rejected batch is bisected until the
    /// rejected events stand alone; those are dead-lettered (and hold their
    /// key, so the key's later events in the list are parked behind them).
    async fn deliver_isolating(&mut self, events: Vec<Event>) -> Result<Isolated, Stop> {
        let mut out = Isolated::default();
        let mut held: HashSet<String> = HashSet::new();
        let mut queue: VecDeque<Vec<Event>> = VecDeque::new();
        if !events.is_empty() {
            queue.push_back(events);
        }
        let mut attempt: u32 = 0;
        let mut first_failure: Option<String> = None;
        let policy = self.target.delivery.clone();
        while let Some(part) = queue.pop_front() {
            let (parked, part): (Vec<Event>, Vec<Event>) = if held.is_empty() {
                (Vec::new(), part)
            } else {
                part.into_iter().partition(|e| held.contains(&key_of(e)))
            };
            out.dead
                .extend(parked.into_iter().map(|event| NewDeadLetter {
                    event,
                    failure: None,
                }));
            if part.is_empty() {
                continue;
            }
            self.throttle(part.len()).await?;
            let result = tokio::select! {
                biased;
                _ = shutdown_requested(&mut self.shutdown) => return Err(Stop::Shutdown),
                _ = interrupted(&self.store, &self.requests_dir, &self.target.name) => return Err(Stop::Interrupted),
                r = self.sink.deliver(&part) => r,
            };
            let err = match result {
                Ok(()) => {
                    if attempt > 0 {
                        tracing::info!(target_name = %self.target.name, attempts = attempt + 1, "delivery succeeded after retrying");
                    }
                    out.delivered += part.len() as u64;
                    out.error = None;
                    attempt = 0;
                    first_failure = None;
                    continue;
                }
                Err(err) => err,
            };
            self.metrics.failures.increment(1);
            attempt = attempt.saturating_add(1);
            let now = now_rfc3339();
            let first = first_failure.get_or_insert_with(|| now.clone()).clone();

            if err.rejects_content() {
                if part.len() > 1 {
                    // All-or-nothing batch: find the culprit(s) by halves, in order.
                    let mut left = part;
                    let right = left.split_off(left.len() / 2);
                    tracing::info!(
                        target_name = %self.target.name, events = left.len() + right.len(), error = %err.message,
                        "target rejected a batch; splitting it to find the rejected event(s)"
                    );
                    queue.push_front(right);
                    queue.push_front(left);
                } else {
                    let event = part.into_iter().next().expect("one event");
                    tracing::error!(
                        target_name = %self.target.name, entity = %event.entity, key = %event.key, id = %event.id,
                        error = %err.message,
                        "target rejected an event: moved to the dead-letter queue; later events of its key wait behind it (steward dlq)"
                    );
                    held.insert(key_of(&event));
                    out.error = Some(format!(
                        "dead-lettered {} {}: {}",
                        event.entity, event.key, err.message
                    ));
                    out.dead.push(NewDeadLetter {
                        event,
                        failure: Some(Failure {
                            message: err.message.clone(),
                            attempts: attempt,
                            first_failure: first,
                            last_failure: now,
                        }),
                    });
                }
                attempt = 0;
                first_failure = None;
                continue;
            }

            // Retry the same events (or give up on them per the policy).
            let too_many =
                err.retryable && policy.max_attempts > 0 && attempt >= policy.max_attempts;
            let too_old =
                err.retryable && policy.max_age.is_some_and(|max| oldest_age(&part) > max);
            if too_many || too_old {
                let why = if too_many {
                    format!("gave up after {attempt} attempts (max_attempts)")
                } else {
                    "gave up: oldest event older than max_age_ms".to_string()
                };
                tracing::error!(
                    target_name = %self.target.name, events = part.len(), attempts = attempt, error = %err.message,
                    "{why}; the events moved to the dead-letter queue"
                );
                let message = format!("{}; {why}", err.message);
                for event in part {
                    held.insert(key_of(&event));
                    out.dead.push(NewDeadLetter {
                        event,
                        failure: Some(Failure {
                            message: message.clone(),
                            attempts: attempt,
                            first_failure: first.clone(),
                            last_failure: now.clone(),
                        }),
                    });
                }
                out.error = Some(message);
                attempt = 0;
                first_failure = None;
                continue;
            }
            self.metrics.retries.increment(1);
            let delay = match err.retry_after {
                Some(d) => d.clamp(MIN_RETRY_DELAY, MAX_RETRY_AFTER),
                None if !err.retryable => self.target.retry_max.max(MIN_RETRY_DELAY),
                None => backoff(
                    self.target.retry_initial,
                    self.target.retry_max,
                    attempt - 1,
                ),
            };
            if err.retryable {
                tracing::warn!(
                    target_name = %self.target.name, attempt, events = part.len(),
                    retry_in_ms = delay.as_millis() as u64, error = %err.message,
                    "delivery failed; retrying the same batch"
                );
            } else {
                tracing::error!(
                    target_name = %self.target.name, attempt, events = part.len(),
                    retry_in_ms = delay.as_millis() as u64, error = %err.message,
                    "target refuses every request (check its URL and credentials); retrying until it is fixed"
                );
            }
            let (s, name, message) = (
                self.store.clone(),
                self.target.name.clone(),
                err.message.clone(),
            );
            match tokio::task::spawn_blocking(move || s.set_target_error(&name, Some(&message)))
                .await
            {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::warn!(target_name = %self.target.name, error = %e, "cannot record the delivery error")
                }
                Err(e) => {
                    tracing::warn!(target_name = %self.target.name, error = %e, "cannot record the delivery error")
                }
            }
            queue.push_front(part);
            tokio::select! {
                biased;
                _ = shutdown_requested(&mut self.shutdown) => return Err(Stop::Shutdown),
                _ = interrupted(&self.store, &self.requests_dir, &self.target.name) => return Err(Stop::Interrupted),
                _ = tokio::time::sleep(delay) => {}
            }
        }
        out.held = held;
        Ok(out)
    }

    /// Waits for the rate limits to allow a request of `events` events.
    async fn throttle(&mut self, events: usize) -> Result<(), Stop> {
        if self.limits.requests.is_none() && self.limits.events.is_none() {
            return Ok(());
        }
        let started = Instant::now();
        let limits = &self.limits;
        let wait = async {
            if let Some(r) = &limits.requests {
                r.until_ready().await;
            }
            if let Some((e, cap)) = &limits.events {
                let n = u32::try_from(events).unwrap_or(u32::MAX).clamp(1, *cap);
                if let Some(n) = NonZeroU32::new(n) {
                    // n never exceeds the cap (half the burst), so capacity suffices.
                    let _ = e.until_n_ready(n).await;
                }
            }
        };
        tokio::select! {
            biased;
            _ = shutdown_requested(&mut self.shutdown) => return Err(Stop::Shutdown),
            _ = wait => {}
        }
        self.metrics.add_throttled(started.elapsed());
        Ok(())
    }
}

impl<D: Deliver + 'static> Driver<D> {
    /// Applies waiting operator requests.
    async fn handle_requests(&mut self) -> Result<(), Stop> {
        let (dir, name) = (self.requests_dir.clone(), self.target.name.clone());
        let pending = tokio::task::spawn_blocking(move || requests::pending(&dir, &name))
            .await
            .unwrap_or_default();
        let mut changed = false;
        for p in pending {
            let response = match p.request {
                Err(message) => Response::Error { message },
                Ok(Request::Flush) => {
                    tracing::info!(target_name = %self.target.name, "flush requested: opening the batch windows now");
                    self.flush = true;
                    Response::Flushed
                }
                Ok(request) => {
                    changed |= request.is_mutating();
                    let (store, name) = (self.store.clone(), self.target.name.clone());
                    let r = request.clone();
                    let applied = self
                        .store_call(move || requests::apply(&store, &name, &r))
                        .await?;
                    tracing::info!(target_name = %self.target.name, ?request, "operator request applied");
                    applied
                }
            };
            let path = p.path;
            let _ = tokio::task::spawn_blocking(move || requests::respond(&path, &response)).await;
        }
        if changed {
            let (store, name) = (self.store.clone(), self.target.name.clone());
            self.held = self.store_call(move || store.held_keys(&name)).await?;
            self.refresh_gauges().await?;
        }
        Ok(())
    }

    async fn refresh_gauges(&mut self) -> Result<(), Stop> {
        let (store, name) = (self.store.clone(), self.target.name.clone());
        let counts = self
            .store_call(move || store.delivery_counts(&name))
            .await?;
        self.metrics
            .dead_letter_events
            .set(counts.dead_letters as f64);
        Ok(())
    }

    /// Sets the next opening of every windowed entity (all of them now when `now`).
    fn schedule_windows(&mut self, now: bool) {
        let t = chrono::Utc::now().timestamp();
        for entity in &self.target.entities {
            let w = self.target.delivery.window_of(entity);
            if let Some(next) = w.next_open_after(t) {
                self.next_open
                    .insert(entity.clone(), if now { t } else { next });
            }
        }
    }

    fn next_window_instant(&self) -> Option<Instant> {
        let earliest = self.next_open.values().min()?;
        let now = chrono::Utc::now().timestamp();
        Some(Instant::now() + Duration::from_secs(earliest.saturating_sub(now).max(0) as u64))
    }

    /// Delivers the window buffer of every entity whose window is open.
    /// True when some window was open (something may have been delivered).
    async fn deliver_due_windows(&mut self) -> Result<bool, Stop> {
        if self.next_open.is_empty() {
            self.flush = false;
            return Ok(false);
        }
        if self.flush {
            self.schedule_windows(true);
        }
        let now = chrono::Utc::now().timestamp();
        let due: Vec<String> = self
            .next_open
            .iter()
            .filter(|(_, &t)| t <= now)
            .map(|(e, _)| e.clone())
            .collect();
        if due.is_empty() {
            return Ok(false);
        }
        let (store, name, entities) = (self.store.clone(), self.target.name.clone(), due.clone());
        let events = self
            .store_call(move || {
                let refs: Vec<&str> = entities.iter().map(String::as_str).collect();
                store.read_window(&name, &refs)
            })
            .await?;
        tracing::info!(target_name = %self.target.name, entities = ?due, events = events.len(), "batch window open");
        let mut rest = events;
        while !rest.is_empty() {
            let tail = rest.split_off(rest.len().min(self.max));
            let chunk = std::mem::replace(&mut rest, tail);
            self.process(Origin::Window, chunk, None).await?;
        }
        self.flush = false;
        let t = chrono::Utc::now().timestamp();
        for entity in due {
            let next = self.target.delivery.window_of(&entity).next_open_after(t);
            if let Some(next) = next {
                self.next_open.insert(entity, next);
            }
        }
        Ok(true)
    }

    /// A blocking store call off the async threads; see [`store_call`].
    async fn store_call<T, F>(&mut self, f: F) -> Result<T, Stop>
    where
        T: Send + 'static,
        F: Fn() -> Result<T, StoreError> + Send + Sync + 'static,
    {
        match store_call(&self.store, &self.target, &mut self.shutdown, f).await {
            Ok(Some(v)) => Ok(v),
            Ok(None) => Err(Stop::Shutdown),
            Err(e) => Err(Stop::Store(e)),
        }
    }
}

/// Completes once an operator request that changes what comes next is waiting
/// (read-only ones are answered here directly). Polls every [`requests::POLL`].
async fn interrupted(store: &Store, dir: &std::path::Path, target: &str) {
    loop {
        tokio::time::sleep(requests::POLL).await;
        let (store, dir, target) = (store.clone(), dir.to_path_buf(), target.to_string());
        let mutating = tokio::task::spawn_blocking(move || {
            let mut mutating = false;
            for p in requests::pending(&dir, &target) {
                match &p.request {
                    Ok(r @ Request::List { .. }) => {
                        let response = requests::apply(&store, &target, r).unwrap_or_else(|e| {
                            Response::Error {
                                message: e.to_string(),
                            }
                        });
                        requests::respond(&p.path, &response);
                    }
                    _ => mutating = true,
                }
            }
            mutating
        })
        .await
        .unwrap_or(false);
        if mutating {
            return;
        }
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// Age of the oldest event (by commit time); zero when no time parses.
fn oldest_age(events: &[Event]) -> Duration {
    let now = chrono::Utc::now();
    events
        .iter()
        .filter_map(|e| chrono::DateTime::parse_from_rfc3339(&e.time).ok())
        .map(|t| {
            (now - t.with_timezone(&chrono::Utc))
                .to_std()
                .unwrap_or_default()
        })
        .max()
        .unwrap_or_default()
}

/// The target's rate limiters.
struct Limits {
    requests: Option<DefaultDirectRateLimiter>,
    /// With the batch cap: a tenth of a second's worth, at least 1. Batches
    /// are capped at it and the limiter's burst is twice that, so a batch
    /// never needs more than the limiter can grant, and time lost between
    /// batches (timer overshoot, the request itself) is made up instead of
    /// lowering the rate. (The requests limiter has a burst of 2 for the same reason.)
    events: Option<(DefaultDirectRateLimiter, u32)>,
}

impl Limits {
    fn new(target: &TargetConfig) -> Limits {
        let d = &target.delivery;
        let requests = d
            .rate_limit_requests_per_sec
            .and_then(NonZeroU32::new)
            .map(|r| {
                let two = NonZeroU32::new(2).unwrap_or(NonZeroU32::MIN);
                RateLimiter::direct(Quota::per_second(r).allow_burst(two))
            });
        let events = d
            .rate_limit_events_per_sec
            .and_then(NonZeroU32::new)
            .map(|r| {
                let cap = (r.get() / 10).max(1);
                let b = NonZeroU32::new(cap.saturating_mul(2)).unwrap_or(NonZeroU32::MIN);
                (
                    RateLimiter::direct(Quota::per_second(r).allow_burst(b)),
                    cap,
                )
            });
        Limits { requests, events }
    }

    fn max_batch(&self) -> usize {
        self.events
            .as_ref()
            .map_or(usize::MAX, |(_, b)| *b as usize)
    }
}

/// Runs a blocking store call off the async threads. Transient failures (full
/// disk, I/O) are retried with backoff until they clear; `Ok(None)` means
/// shutdown was requested meanwhile.
async fn store_call<T, F>(
    store: &Store,
    target: &TargetConfig,
    shutdown: &mut watch::Receiver<bool>,
    f: F,
) -> Result<Option<T>, StoreError>
where
    T: Send + 'static,
    F: Fn() -> Result<T, StoreError> + Send + Sync + 'static,
{
    let f = std::sync::Arc::new(f);
    let mut attempt: u32 = 0;
    loop {
        let call = f.clone();
        let result = match tokio::task::spawn_blocking(move || call()).await {
            Ok(r) => r,
            Err(e) => Err(StoreError::Internal {
                path: store.path().to_path_buf(),
                detail: format!("a store task of target {:?} failed: {e}", target.name),
            }),
        };
        match result {
            Ok(v) => return Ok(Some(v)),
            Err(e) if e.is_transient() => {
                let delay = backoff(target.retry_initial, target.retry_max, attempt);
                tracing::warn!(target_name = %target.name, error = %e, retry_in_ms = delay.as_millis() as u64, "state file unavailable to the delivery driver; retrying");
                attempt = attempt.saturating_add(1);
                tokio::select! {
                    biased;
                    _ = shutdown_requested(shutdown) => return Ok(None),
                    _ = tokio::time::sleep(delay) => {}
                }
            }
            Err(e) => return Err(e),
        }
    }
}

/// Completes once shutdown is requested or its sender is gone.
async fn shutdown_requested(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await.map(|_| ());
}

/// Exponential backoff with full jitter: a uniformly random delay up to
/// `initial * 2^attempt`, capped at `max`, so failing targets' retries spread out.
fn backoff(initial: Duration, max: Duration, attempt: u32) -> Duration {
    let cap = initial
        .saturating_mul(2u32.saturating_pow(attempt.min(31)))
        .min(max)
        .max(MIN_RETRY_DELAY);
    let nanos = u64::try_from(cap.as_nanos()).unwrap_or(u64::MAX);
    let min = MIN_RETRY_DELAY.as_nanos() as u64;
    Duration::from_nanos(rand::rng().random_range(min..=nanos.max(min)))
}

struct TargetMetrics {
    delivered: metrics::Counter,
    failures: metrics::Counter,
    retries: metrics::Counter,
    dead_letters: metrics::Counter,
    dead_letter_events: metrics::Gauge,
    /// Whole seconds spent waiting for the rate limits: `metrics` counters
    /// are integers, so the fraction is carried in `throttled_carry_us` until
    /// it adds up to a second (a restarted driver loses less than one).
    throttled: metrics::Counter,
    throttled_carry_us: std::sync::Mutex<u64>,
    backlog: metrics::Gauge,
    latency: metrics::Histogram,
}

impl TargetMetrics {
    fn new(target: &str) -> TargetMetrics {
        use steward_core::metric as m;
        let t = target.to_string();
        TargetMetrics {
            delivered: metrics::counter!(m::EVENTS_DELIVERED, "target" => t.clone()),
            failures: metrics::counter!(m::DELIVERY_FAILURES, "target" => t.clone()),
            retries: metrics::counter!(m::DELIVERY_RETRIES, "target" => t.clone()),
            dead_letters: metrics::counter!(m::DEAD_LETTERS, "target" => t.clone()),
            dead_letter_events: metrics::gauge!(m::DEAD_LETTER_EVENTS, "target" => t.clone()),
            throttled: metrics::counter!(m::THROTTLED_SECONDS, "target" => t.clone()),
            throttled_carry_us: std::sync::Mutex::new(0),
            backlog: metrics::gauge!(m::TARGET_BACKLOG, "target" => t.clone()),
            latency: metrics::histogram!(m::DELIVERY_LATENCY_SECONDS, "target" => t),
        }
    }
}

impl TargetMetrics {
    fn add_throttled(&self, waited: Duration) {
        let mut carry = self
            .throttled_carry_us
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        *carry = carry.saturating_add(u64::try_from(waited.as_micros()).unwrap_or(u64::MAX));
        let whole = *carry / 1_000_000;
        if whole > 0 {
            self.throttled.increment(whole);
            *carry -= whole * 1_000_000;
        }
    }
}

/// A key's identity for the in-flight rule: a hash, so that the check costs
/// no allocation per event. Two keys that collide only make a batch end
/// earlier than it had to.
fn key_hash(event: &Event) -> u64 {
    // FxHash's multiply-rotate step, eight bytes at a time: no keyed
    // hashing is needed for a set that only orders deliveries.
    fn mix(h: u64, word: u64) -> u64 {
        (h.rotate_left(5) ^ word).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95)
    }
    let mut h = 0u64;
    for part in [event.entity.as_bytes(), &[0xFF], event.key.as_bytes()] {
        let mut chunks = part.chunks_exact(8);
        for c in &mut chunks {
            h = mix(
                h,
                u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]),
            );
        }
        for &b in chunks.remainder() {
            h = mix(h, u64::from(b));
        }
    }
    h
}

/// The events' commit times as Unix microseconds, one entry per run of equal
/// times (a transaction's events share one), so each time is parsed once.
fn commit_times(events: &[Event]) -> Vec<(i64, u64)> {
    let mut out: Vec<(i64, u64)> = Vec::new();
    let mut last: Option<&str> = None;
    for event in events {
        if last == Some(event.time.as_str()) {
            if let Some((_, count)) = out.last_mut() {
                *count += 1;
            }
            continue;
        }
        last = Some(event.time.as_str());
        if let Ok(t) = chrono::DateTime::parse_from_rfc3339(&event.time) {
            out.push((t.timestamp_micros(), 1));
        } else {
            last = None;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering as AtomicOrdering};
    use std::sync::{Arc, Mutex};

    use super::*;
    use steward_core::model::{EventOp, Lsn};

    const WAIT: Duration = Duration::from_secs(20);

    #[test]
    fn throttled_time_is_a_counter_of_whole_seconds_that_keeps_fractions() {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            let m = TargetMetrics::new("wms");
            // 3 × 0.7 s = 2.1 s: two whole seconds, none lost to rounding.
            for _ in 0..3 {
                m.add_throttled(Duration::from_millis(700));
            }
        });
        let page = handle.render();
        assert!(
            page.contains("# TYPE steward_throttled_seconds_total counter"),
            "{page}"
        );
        assert!(
            page.contains("steward_throttled_seconds_total{target=\"wms\"} 2\n"),
            "{page}"
        );
    }

    fn target(name: &str, max: usize, linger_ms: u64) -> TargetConfig {
        TargetConfig {
            name: name.into(),
            entities: vec!["product".into()],
            batch_max_events: max,
            batch_linger: Duration::from_millis(linger_ms),
            retry_initial: Duration::from_millis(1),
            retry_max: Duration::from_millis(8),
            delivery: Default::default(),
            initial: steward_core::config::InitialSync::Snapshot,
            // The driver never builds a sink: the tests hand it fakes.
            type_name: "http".into(),
            settings: Arc::new(steward_core::config::Unchecked),
        }
    }

    fn event(n: u64) -> Event {
        Event {
            change: None,
            tx_id: None,
            id: Event::source_id(Lsn(n), 0),
            entity: "product".into(),
            key: (n % 7).to_string(),
            op: EventOp::Upsert,
            version: n,
            time: chrono::Utc::now().to_rfc3339(),
            data: serde_json::json!({ "n": n }).into(),
        }
    }

    /// Appends events `range` to each of `targets` in one commit.
    fn append(store: &Store, targets: &[&str], range: std::ops::Range<u64>) -> Vec<(String, u64)> {
        let events: Vec<Event> = range.clone().map(event).collect();
        let appends: Vec<(&str, &Event)> = events
            .iter()
            .flat_map(|e| targets.iter().map(move |t| (*t, e)))
            .collect();
        store.commit(Lsn(range.end), &appends).unwrap()
    }

    #[derive(Clone, Default)]
    struct Fake {
        /// Every attempted batch (event versions), accepted or not.
        attempts: Arc<Mutex<Vec<Vec<u64>>>>,
        /// Accepted events, in order.
        accepted: Arc<Mutex<Vec<u64>>>,
        fail_first: usize,
        always_fail: bool,
        hang: bool,
        retry_after: Option<Duration>,
        /// Answer 422 (a content rejection) to any batch holding this key.
        reject_key: Option<String>,
        /// Never answer a batch holding this key.
        hang_key: Option<String>,
        /// Take this long per attempt: a slow target.
        latency: Duration,
        /// Attempts in progress now, and the most ever at once.
        in_flight: Arc<AtomicUsize>,
        max_in_flight: Arc<AtomicUsize>,
    }

    /// Decrements the in-flight count when an attempt ends, however it ends.
    struct Leave(Arc<AtomicUsize>);
    impl Drop for Leave {
        fn drop(&mut self) {
            self.0.fetch_sub(1, AtomicOrdering::SeqCst);
        }
    }

    impl Deliver for Fake {
        async fn deliver(&mut self, events: &[Event]) -> Result<(), DeliveryError> {
            {
                let calls = {
                    let mut attempts = self.attempts.lock().unwrap();
                    attempts.push(events.iter().map(|e| e.version).collect());
                    attempts.len()
                };
                let now = self.in_flight.fetch_add(1, AtomicOrdering::SeqCst) + 1;
                let _leave = Leave(Arc::clone(&self.in_flight));
                self.max_in_flight.fetch_max(now, AtomicOrdering::SeqCst);
                if !self.latency.is_zero() {
                    tokio::time::sleep(self.latency).await;
                }
                let hangs = |k: &String| events.iter().any(|e| &e.key == k);
                if self.hang || self.hang_key.as_ref().is_some_and(hangs) {
                    std::future::pending::<()>().await;
                }
                if let Some(k) = &self.reject_key {
                    if events.iter().any(|e| &e.key == k) {
                        return Err(DeliveryError {
                            retryable: false,
                            message: format!(
                                "HTTP 422 from http://127.0.0.1:9/events: key {k} refused"
                            ),
                            retry_after: None,
                            status: Some(422),
                        });
                    }
                }
                if self.always_fail || calls <= self.fail_first {
                    return Err(DeliveryError {
                        retryable: true,
                        message: "HTTP 503 from http://127.0.0.1:9/events: busy".into(),
                        retry_after: self.retry_after,
                        status: Some(503),
                    });
                }
                self.accepted
                    .lock()
                    .unwrap()
                    .extend(events.iter().map(|e| e.version));
                Ok(())
            }
        }
    }

    fn temp_store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("state.redb")).unwrap();
        (dir, store)
    }

    async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
        let start = Instant::now();
        while !cond() {
            assert!(start.elapsed() < WAIT, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn delivers_everything_in_order_in_bounded_batches() {
        let (_dir, store) = temp_store();
        append(&store, &["wms"], 1..301);
        let (handle, wake) = DriverHandle::new();
        let (stop, shutdown) = watch::channel(false);
        let fake = Fake::default();
        let task = tokio::spawn(run_target(
            target("wms", 64, 2),
            store.clone(),
            vec![fake.clone()],
            wake,
            shutdown,
        ));

        // More arrives while the driver runs, in small commits.
        for start in (301..1001).step_by(50) {
            let last = append(&store, &["wms"], start..start + 50);
            handle.notify(last[0].1);
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        wait_until("all 1000 events", || {
            fake.accepted.lock().unwrap().len() >= 1000
        })
        .await;
        stop.send(true).unwrap();
        task.await.unwrap().unwrap();

        assert_eq!(
            *fake.accepted.lock().unwrap(),
            (1..1001).collect::<Vec<_>>()
        );
        let attempts = fake.attempts.lock().unwrap();
        assert!(attempts.iter().all(|b| !b.is_empty() && b.len() <= 64));
        assert!(
            attempts.iter().any(|b| b.len() == 64),
            "full batches expected"
        );
        assert_eq!(store.backlog("wms").unwrap(), 0);
        let stats = store.target_stats("wms").unwrap();
        assert_eq!(stats.delivered_total, 1000);
        assert_eq!(stats.last_delivered_seq, Some(1000));
    }

    #[tokio::test]
    async fn a_failing_batch_is_retried_unchanged_until_it_succeeds() {
        let (_dir, store) = temp_store();
        append(&store, &["wms"], 1..21);
        let (_handle, wake) = DriverHandle::new();
        let (stop, shutdown) = watch::channel(false);
        let fake = Fake {
            fail_first: 3,
            ..Fake::default()
        };
        let task = tokio::spawn(run_target(
            target("wms", 8, 0),
            store.clone(),
            vec![fake.clone()],
            wake,
            shutdown,
        ));
        wait_until("error recorded", || {
            store.target_stats("wms").unwrap().last_error.is_some()
        })
        .await;
        wait_until("all 20 events", || {
            fake.accepted.lock().unwrap().len() >= 20
        })
        .await;
        stop.send(true).unwrap();
        task.await.unwrap().unwrap();

        let attempts = fake.attempts.lock().unwrap();
        let first: Vec<u64> = (1..9).collect();
        assert_eq!(
            attempts[..4],
            [first.clone(), first.clone(), first.clone(), first]
        );
        assert_eq!(*fake.accepted.lock().unwrap(), (1..21).collect::<Vec<_>>());
        let stats = store.target_stats("wms").unwrap();
        assert_eq!(stats.last_error, None, "a success clears the error");
        assert_eq!(stats.backlog, 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failing_target_does_not_hold_up_another() {
        let (_dir, store) = temp_store();
        append(&store, &["good", "bad"], 1..101);
        let (_h1, wake_good) = DriverHandle::new();
        let (_h2, wake_bad) = DriverHandle::new();
        let (stop, shutdown) = watch::channel(false);
        let good = Fake::default();
        let bad = Fake {
            always_fail: true,
            ..Fake::default()
        };
        let t_good = tokio::spawn(run_target(
            target("good", 16, 0),
            store.clone(),
            vec![good.clone()],
            wake_good,
            shutdown.clone(),
        ));
        let t_bad = tokio::spawn(run_target(
            target("bad", 16, 0),
            store.clone(),
            vec![bad.clone()],
            wake_bad,
            shutdown,
        ));
        wait_until("good target done", || {
            good.accepted.lock().unwrap().len() >= 100
        })
        .await;
        wait_until("bad target retried", || {
            bad.attempts.lock().unwrap().len() >= 3
        })
        .await;
        stop.send(true).unwrap();
        t_good.await.unwrap().unwrap();
        t_bad.await.unwrap().unwrap();

        assert_eq!(*good.accepted.lock().unwrap(), (1..101).collect::<Vec<_>>());
        assert!(bad.accepted.lock().unwrap().is_empty());
        assert!(bad
            .attempts
            .lock()
            .unwrap()
            .iter()
            .all(|b| *b == (1..17).collect::<Vec<_>>()));
        assert_eq!(store.backlog("good").unwrap(), 0);
        assert_eq!(store.backlog("bad").unwrap(), 100);
        let err = store.target_stats("bad").unwrap().last_error.unwrap();
        assert!(err.contains("HTTP 503"), "{err}");
    }

    #[tokio::test]
    async fn shutdown_is_prompt_when_idle_hanging_or_backing_off() {
        for case in ["idle", "hanging", "backing off"] {
            let (_dir, store) = temp_store();
            if case != "idle" {
                append(&store, &["t"], 1..4);
            }
            let fake = Fake {
                hang: case == "hanging",
                always_fail: case == "backing off",
                retry_after: Some(Duration::from_secs(3000)),
                ..Fake::default()
            };
            let (_handle, wake) = DriverHandle::new();
            let (stop, shutdown) = watch::channel(false);
            let task = tokio::spawn(run_target(
                target("t", 10, 0),
                store.clone(),
                vec![fake.clone()],
                wake,
                shutdown,
            ));
            if case != "idle" {
                wait_until("an attempt", || !fake.attempts.lock().unwrap().is_empty()).await;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
            let start = Instant::now();
            stop.send(true).unwrap();
            tokio::time::timeout(Duration::from_secs(2), task)
                .await
                .unwrap_or_else(|_| panic!("{case}: driver did not stop"))
                .unwrap()
                .unwrap();
            assert!(start.elapsed() < Duration::from_secs(1), "{case}");
            // Nothing was acknowledged: the events wait for the next start.
            let expected = if case == "idle" { 0 } else { 3 };
            assert_eq!(store.backlog("t").unwrap(), expected, "{case}");
        }
    }

    #[tokio::test]
    async fn linger_gathers_later_appends_into_one_batch() {
        let (_dir, store) = temp_store();
        append(&store, &["t"], 1..2);
        let (handle, wake) = DriverHandle::new();
        let (stop, shutdown) = watch::channel(false);
        let fake = Fake::default();
        let task = tokio::spawn(run_target(
            target("t", 100, 400),
            store.clone(),
            vec![fake.clone()],
            wake,
            shutdown,
        ));
        tokio::time::sleep(Duration::from_millis(50)).await;
        let last = append(&store, &["t"], 2..4);
        handle.notify(last[0].1);
        wait_until("3 events", || fake.accepted.lock().unwrap().len() >= 3).await;
        stop.send(true).unwrap();
        task.await.unwrap().unwrap();
        assert_eq!(*fake.attempts.lock().unwrap(), vec![vec![1, 2, 3]]);
    }

    #[tokio::test]
    async fn retry_after_is_honoured() {
        let (_dir, store) = temp_store();
        append(&store, &["t"], 1..2);
        let (_handle, wake) = DriverHandle::new();
        let (stop, shutdown) = watch::channel(false);
        let fake = Fake {
            fail_first: 1,
            retry_after: Some(Duration::from_millis(150)),
            ..Fake::default()
        };
        let start = Instant::now();
        let task = tokio::spawn(run_target(
            target("t", 10, 0),
            store.clone(),
            vec![fake.clone()],
            wake,
            shutdown,
        ));
        wait_until("delivery", || !fake.accepted.lock().unwrap().is_empty()).await;
        assert!(start.elapsed() >= Duration::from_millis(150));
        stop.send(true).unwrap();
        task.await.unwrap().unwrap();
    }

    #[test]
    fn backoff_doubles_up_to_the_cap_with_jitter() {
        let initial = Duration::from_millis(100);
        let max = Duration::from_secs(5);
        for attempt in 0..100 {
            let cap = (initial * 2u32.saturating_pow(attempt.min(31))).min(max);
            for _ in 0..20 {
                let d = backoff(initial, max, attempt);
                assert!(
                    d >= MIN_RETRY_DELAY && d <= cap,
                    "attempt {attempt}: {d:?} > {cap:?}"
                );
            }
        }
        let spread: std::collections::HashSet<_> =
            (0..20).map(|_| backoff(initial, max, 10)).collect();
        assert!(spread.len() > 1, "jitter expected");
        assert_eq!(backoff(Duration::ZERO, Duration::ZERO, 3), MIN_RETRY_DELAY);
    }

    #[tokio::test]
    async fn a_rejected_key_is_isolated_dead_lettered_and_holds_only_itself() {
        let (_dir, store) = temp_store();
        append(&store, &["t"], 1..51);
        let (_handle, wake) = DriverHandle::new();
        let (stop, shutdown) = watch::channel(false);
        let fake = Fake {
            reject_key: Some("3".into()),
            ..Fake::default()
        };
        let task = tokio::spawn(run_target(
            target("t", 16, 0),
            store.clone(),
            vec![fake.clone()],
            wake,
            shutdown,
        ));
        let others: Vec<u64> = (1..51).filter(|n| n % 7 != 3).collect();
        wait_until("every other key", || {
            fake.accepted.lock().unwrap().len() >= others.len()
        })
        .await;
        wait_until("settled", || store.backlog("t").unwrap() == 0).await;
        stop.send(true).unwrap();
        task.await.unwrap().unwrap();

        assert_eq!(
            *fake.accepted.lock().unwrap(),
            others,
            "other keys flow, in order"
        );
        let dead = store
            .dead_letters("t", &steward_store::DlqFilter::default())
            .unwrap();
        let versions: Vec<u64> = dead.iter().map(|d| d.event.version).collect();
        assert_eq!(versions, [3, 10, 17, 24, 31, 38, 45]);
        assert!(dead[0].error.contains("HTTP 422"), "{}", dead[0].error);
        assert_eq!(dead[0].held_behind, None);
        assert!(dead[1..].iter().all(|d| d.held_behind == Some(dead[0].id)));
        let stats = store.target_stats("t").unwrap();
        assert_eq!(stats.dead_letters, 7);
        assert_eq!(stats.delivered_total, others.len() as u64);
        // Bisection: never more than ~2 log2(16) extra requests per rejected batch.
        assert!(fake.attempts.lock().unwrap().len() < 60);
    }

    #[tokio::test]
    async fn max_attempts_dead_letters_a_failing_batch() {
        let (_dir, store) = temp_store();
        append(&store, &["t"], 1..4);
        let (_handle, wake) = DriverHandle::new();
        let (stop, shutdown) = watch::channel(false);
        let fake = Fake {
            always_fail: true,
            ..Fake::default()
        };
        let mut t = target("t", 16, 0);
        t.delivery.max_attempts = 3;
        let task = tokio::spawn(run_target(
            t,
            store.clone(),
            vec![fake.clone()],
            wake,
            shutdown,
        ));
        wait_until("dead-lettered", || {
            store.target_stats("t").unwrap().dead_letters == 3
        })
        .await;
        stop.send(true).unwrap();
        task.await.unwrap().unwrap();
        assert_eq!(fake.attempts.lock().unwrap().len(), 3);
        assert_eq!(store.backlog("t").unwrap(), 0);
        let dead = store
            .dead_letters("t", &steward_store::DlqFilter::default())
            .unwrap();
        assert!(dead[0].error.contains("max_attempts"), "{}", dead[0].error);
        assert_eq!(dead[0].attempts, 3);
    }

    #[tokio::test]
    async fn max_age_dead_letters_a_failing_batch_of_old_events_only() {
        let (_dir, store) = temp_store();
        let mut old = event(1);
        old.time = "2020-01-01T00:00:00Z".into();
        store.commit(Lsn(1), &[("t", &old)]).unwrap();
        let (_handle, wake) = DriverHandle::new();
        let (stop, shutdown) = watch::channel(false);
        let fake = Fake {
            always_fail: true,
            ..Fake::default()
        };
        let mut t = target("t", 16, 0);
        t.delivery.max_age = Some(Duration::from_secs(3600));
        let task = tokio::spawn(run_target(
            t,
            store.clone(),
            vec![fake.clone()],
            wake,
            shutdown,
        ));
        wait_until("dead-lettered", || {
            store.target_stats("t").unwrap().dead_letters == 1
        })
        .await;
        // A fresh event is retried, not dead-lettered.
        append(&store, &["t"], 2..3);
        wait_until("retried", || fake.attempts.lock().unwrap().len() >= 4).await;
        stop.send(true).unwrap();
        task.await.unwrap().unwrap();
        assert_eq!(store.target_stats("t").unwrap().dead_letters, 1);
        assert_eq!(store.backlog("t").unwrap(), 1);
        let dead = store
            .dead_letters("t", &steward_store::DlqFilter::default())
            .unwrap();
        assert!(dead[0].error.contains("max_age_ms"), "{}", dead[0].error);
    }

    /// Appends events `range` to `target`, event n with key `n % keys`.
    fn append_keyed(store: &Store, target: &str, range: std::ops::Range<u64>, keys: u64) {
        let events: Vec<Event> = range
            .clone()
            .map(|n| Event {
                change: None,
                tx_id: None,
                key: (n % keys).to_string(),
                ..event(n)
            })
            .collect();
        let appends: Vec<(&str, &Event)> = events.iter().map(|e| (target, e)).collect();
        store.commit(Lsn(range.end), &appends).unwrap();
    }

    fn lanes(fake: &Fake, n: usize) -> Vec<Fake> {
        (0..n).map(|_| fake.clone()).collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn four_lanes_overlap_batches_and_keep_every_key_in_order() {
        for (keys, expect_overlap) in [(10_000u64, 4usize), (5, 2)] {
            let (_dir, store) = temp_store();
            append_keyed(&store, "t", 1..401, keys);
            let (_handle, wake) = DriverHandle::new();
            let (stop, shutdown) = watch::channel(false);
            let fake = Fake {
                latency: Duration::from_millis(20),
                ..Fake::default()
            };
            let task = tokio::spawn(run_target(
                target("t", 4, 0),
                store.clone(),
                lanes(&fake, 4),
                wake,
                shutdown,
            ));
            wait_until("settled", || store.backlog("t").unwrap() == 0).await;
            stop.send(true).unwrap();
            task.await.unwrap().unwrap();

            let accepted = fake.accepted.lock().unwrap().clone();
            let mut sorted = accepted.clone();
            sorted.sort_unstable();
            assert_eq!(
                sorted,
                (1..401).collect::<Vec<_>>(),
                "{keys} keys: each once"
            );
            for k in 0..keys.min(5) {
                let of_key: Vec<u64> = accepted.iter().copied().filter(|n| n % keys == k).collect();
                assert!(
                    of_key.windows(2).all(|w| w[0] < w[1]),
                    "key {k} out of order: {of_key:?}"
                );
            }
            let max = fake.max_in_flight.load(AtomicOrdering::SeqCst);
            assert!(
                (expect_overlap..=4).contains(&max),
                "{keys} keys: {max} batches in flight at once"
            );
            let stats = store.target_stats("t").unwrap();
            assert_eq!(stats.delivered_total, 400);
            assert_eq!(stats.last_delivered_seq, Some(400));
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn later_batches_acknowledged_before_an_earlier_one_do_not_move_the_outbox() {
        let (_dir, store) = temp_store();
        // Batches of 8 with distinct keys; the first one hangs (key "1").
        append_keyed(&store, "t", 1..41, 10_000);
        let (_handle, wake) = DriverHandle::new();
        let (stop, shutdown) = watch::channel(false);
        let stuck = Fake {
            hang_key: Some("1".into()),
            ..Fake::default()
        };
        let task = tokio::spawn(run_target(
            target("t", 8, 0),
            store.clone(),
            lanes(&stuck, 4),
            wake,
            shutdown,
        ));
        wait_until("batches 2 to 4 accepted", || {
            stuck.accepted.lock().unwrap().len() >= 24
        })
        .await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(*stuck.accepted.lock().unwrap(), (9..33).collect::<Vec<_>>());
        assert_eq!(
            store.backlog("t").unwrap(),
            40,
            "nothing settled past batch 1"
        );
        assert_eq!(store.target_stats("t").unwrap().last_delivered_seq, None);
        // Like a crash: stop with batch 1 never answered, then start again.
        stop.send(true).unwrap();
        task.await.unwrap().unwrap();

        let (_handle, wake) = DriverHandle::new();
        let (stop, shutdown) = watch::channel(false);
        let fine = Fake::default();
        let task = tokio::spawn(run_target(
            target("t", 8, 0),
            store.clone(),
            lanes(&fine, 4),
            wake,
            shutdown,
        ));
        wait_until("settled", || store.backlog("t").unwrap() == 0).await;
        stop.send(true).unwrap();
        task.await.unwrap().unwrap();
        let mut again = fine.accepted.lock().unwrap().clone();
        again.sort_unstable();
        assert_eq!(
            again,
            (1..41).collect::<Vec<_>>(),
            "batch 1 redelivered, and the rest"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn with_four_lanes_a_rejected_key_holds_only_itself() {
        let (_dir, store) = temp_store();
        append_keyed(&store, "t", 1..201, 20);
        let (_handle, wake) = DriverHandle::new();
        let (stop, shutdown) = watch::channel(false);
        let fake = Fake {
            reject_key: Some("3".into()),
            latency: Duration::from_millis(5),
            ..Fake::default()
        };
        let task = tokio::spawn(run_target(
            target("t", 8, 0),
            store.clone(),
            lanes(&fake, 4),
            wake,
            shutdown,
        ));
        wait_until("settled", || store.backlog("t").unwrap() == 0).await;
        stop.send(true).unwrap();
        task.await.unwrap().unwrap();

        let accepted = fake.accepted.lock().unwrap().clone();
        let mut sorted = accepted.clone();
        sorted.sort_unstable();
        let others: Vec<u64> = (1..201).filter(|n| n % 20 != 3).collect();
        assert_eq!(sorted, others, "every other key delivered once");
        for k in 0..20 {
            let of_key: Vec<u64> = accepted.iter().copied().filter(|n| n % 20 == k).collect();
            assert!(
                of_key.windows(2).all(|w| w[0] < w[1]),
                "key {k}: {of_key:?}"
            );
        }
        let dead = store
            .dead_letters("t", &steward_store::DlqFilter::default())
            .unwrap();
        let versions: Vec<u64> = dead.iter().map(|d| d.event.version).collect();
        assert_eq!(versions, (0..10).map(|i| 3 + 20 * i).collect::<Vec<_>>());
        assert_eq!(dead[0].held_behind, None);
        assert!(dead[1..].iter().all(|d| d.held_behind == Some(dead[0].id)));
        assert!(fake.max_in_flight.load(AtomicOrdering::SeqCst) >= 2);
    }
}
