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
//! Operator requests (`steward dlq`, `steward flush`) arrive through the
//! target's inbox (see `sinks::requests`) and are applied between batches; a
//! batch in flight or backing off is abandoned for one.
//!
//! One driver runs per target, so a slow or failing target only grows its own
//! backlog and never holds up the others.
//!
//! The driver reaches the state file only through [`Outbox`]: its target's
//! queues, dead letters and acknowledgements, nothing of the daemon's.
//! Generic over it like over its sink, so the calls stay direct; the unit
//! tests wrap the store in one that fails on demand (`testkit::Faulty`).
//!
//! The files follow the driver's seams, each a state or a step of its own:
//! - `batch`: the loop that gathers outbox batches (per-key cut, linger)
//!   and hands them to lanes;
//! - `flights`: batches in flight at once, settled in outbox order;
//! - `settle`: sorting a batch (held, windowed, sent) and recording its
//!   outcome in one store transaction;
//! - `lane`: delivering one batch: retries, bisection of a rejected batch,
//!   dead letters and the keys they hold;
//! - `pacing`: when the next request may go (rate limits, backoff, `Retry-After`);
//! - `window`: batch windows; `operator`: operator requests;
//!   `target_metrics`: the target's metrics.
//!
//! Held keys are one set (`Driver::held`) read where a batch is sorted
//! (`settle`), grown where an event is dead-lettered (`lane`) and reloaded
//! after an operator request (`operator`): no step of its own, so no file.

mod batch;
mod flights;
mod lane;
mod operator;
mod pacing;
mod settle;
mod target_metrics;
#[cfg(test)]
mod testkit;
mod window;

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use super::requests::{self, Inbox};
use steward_core::config::TargetConfig;
use steward_core::model::Event;
use steward_store::{Outbox, StoreError};

use batch::KeySet;
use lane::Lane;
use pacing::{backoff, Limits};
use target_metrics::TargetMetrics;

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
    /// A failure worth retrying (the target may accept the batch later).
    pub fn retryable(message: impl Into<String>) -> DeliveryError {
        DeliveryError {
            retryable: true,
            message: message.into(),
            retry_after: None,
            status: None,
        }
    }

    /// A failure that retrying cannot mend (the target refuses the batch).
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

/// The appender's side of a driver: tells it that new entries were appended
/// (the daemon holds the `watch::Sender` itself; the tests use this).
#[cfg(test)]
#[derive(Clone, Debug)]
pub(crate) struct DriverHandle {
    wake: watch::Sender<u64>,
}

#[cfg(test)]
impl DriverHandle {
    /// A handle and the receiver to pass to [`run_target`].
    pub(crate) fn new() -> (DriverHandle, watch::Receiver<u64>) {
        let (wake, rx) = watch::channel(0);
        (DriverHandle { wake }, rx)
    }

    /// Wakes the driver: entries up to `last_seq` are in its outbox.
    /// Never blocks; many notifications before the driver looks collapse into one.
    pub(crate) fn notify(&self, last_seq: u64) {
        self.wake.send_replace(last_seq);
    }
}

/// Delivers the target's outbox until `shutdown` becomes true (or its sender
/// is dropped), applying the operator requests `inbox` receives. Returns `Ok` on shutdown, leaving unacknowledged entries in
/// the outbox for the next start; `Err` only when the store is unusable
/// (corrupted, undecodable entry), since retrying cannot help then.
///
/// One sink per batch that may be in flight at once: `sinks.len()` is the
/// target's `max_in_flight`; settlement follows the outbox order, so per-key
/// order holds with batches in flight.
pub async fn run_target<D: Deliver + 'static, O: Outbox>(
    target: TargetConfig,
    store: O,
    sinks: Vec<D>,
    wake: watch::Receiver<u64>,
    inbox: Inbox,
    shutdown: watch::Receiver<bool>,
) -> Result<(), StoreError> {
    let limits = Arc::new(Limits::new(&target));
    let metrics = Arc::new(TargetMetrics::new(&target.name));
    let max = target.batch_max_events.max(1).min(limits.max_batch());
    let target = Arc::new(target);
    let lanes: Vec<Lane<D, O>> = sinks
        .into_iter()
        .map(|sink| Lane {
            sink,
            target: Arc::clone(&target),
            store: store.clone(),
            shutdown: shutdown.clone(),
            inbox: inbox.clone(),
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
        acked_lazily: KeySet::default(),
        acked_lazily_at: 0,
        inbox,
        flush: false,
        next_open: HashMap::new(),
    };
    match driver.run().await {
        Ok(()) | Err(Stop::Shutdown | Stop::Interrupted) => Ok(()),
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

/// Which of the target's queues in the store a batch was read from: the
/// outbox, the replay queue (dead letters put back by `steward dlq replay`)
/// or the window buffer. All entries of one batch come from one queue, and
/// settling the batch takes them off that queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TargetQueue {
    Outbox,
    Replay,
    Window,
}

struct Driver<D, O> {
    target: Arc<TargetConfig>,
    store: O,
    /// Idle lanes. A lane owns a sink; a batch in flight owns its lane.
    lanes: Vec<Lane<D, O>>,
    /// Number of lanes: most outbox batches in flight at once.
    max_in_flight: usize,
    wake: watch::Receiver<u64>,
    wake_open: bool,
    shutdown: watch::Receiver<bool>,
    metrics: Arc<TargetMetrics>,
    /// Keys (`key_of`) with dead letters: their events are parked, not sent.
    held: HashSet<String>,
    /// Operator requests waiting for this driver.
    inbox: Inbox,
    /// `steward flush` asked to open every window now.
    flush: bool,
    /// Per windowed entity, the next opening (Unix seconds).
    next_open: HashMap<String, i64>,
    max: usize,
    /// Keys (`key_hash`) of batches acknowledged without fsync, and the
    /// store's durable commit count after the last of those
    /// acknowledgements (see [`Driver::settle_durably_before`]).
    acked_lazily: KeySet,
    acked_lazily_at: u64,
}

impl<D: Deliver + 'static, O: Outbox> Driver<D, O> {
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

/// Called on the blocking thread after each store call of a driver (the
/// daemon collects the thread's allocator heap there, see
/// [`set_blocking_call_hook`]).
static BLOCKING_CALL_DONE: std::sync::OnceLock<fn()> = std::sync::OnceLock::new();

/// Sets what runs on a blocking thread after each of the drivers' store
/// calls: the batches read there are freed on other threads, and the
/// thread's allocator takes their pages back only when it next allocates or
/// collects, so the daemon has it collect (at most once a second). Set once;
/// later calls are ignored.
pub fn set_blocking_call_hook(hook: fn()) {
    let _ = BLOCKING_CALL_DONE.set(hook);
}

/// Runs a blocking store call off the async threads. Transient failures (full
/// disk, I/O) are retried with backoff until they clear; `Ok(None)` means
/// shutdown was requested meanwhile.
async fn store_call<T, F>(
    store: &impl Outbox,
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
        let result = match tokio::task::spawn_blocking(move || {
            let result = call();
            if let Some(hook) = BLOCKING_CALL_DONE.get() {
                hook();
            }
            result
        })
        .await
        {
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

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::sync::watch;
    use tokio::time::Instant;

    use super::testkit::*;
    use super::{run_target, DriverHandle};

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
            crate::requests::Inbox::default(),
            shutdown.clone(),
        ));
        let t_bad = tokio::spawn(run_target(
            target("bad", 16, 0),
            store.clone(),
            vec![bad.clone()],
            wake_bad,
            crate::requests::Inbox::default(),
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

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn operator_requests_are_answered_while_a_batch_hangs() {
        use crate::requests::{Inbox, Request, Response};
        let (_dir, store) = temp_store();
        append(&store, &["t"], 1..4);
        let fake = Fake {
            hang: true,
            ..Fake::default()
        };
        let (_handle, wake) = DriverHandle::new();
        let (stop, shutdown) = watch::channel(false);
        let inbox = Inbox::default();
        let task = tokio::spawn(run_target(
            target("t", 10, 0),
            store.clone(),
            vec![fake.clone()],
            wake,
            inbox.clone(),
            shutdown,
        ));
        wait_until("an attempt", || !fake.attempts.lock().unwrap().is_empty()).await;
        let answer = |request| {
            let answer = inbox.submit(request);
            async move {
                tokio::time::timeout(Duration::from_secs(5), answer)
                    .await
                    .expect("answered although the batch hangs")
                    .expect("the driver answers")
            }
        };
        assert_eq!(answer(Request::Flush).await, Response::Flushed);
        let filter = steward_store::DlqFilter {
            key: Some("none".into()),
            ..Default::default()
        };
        assert_eq!(
            answer(Request::Drop { filter }).await,
            Response::Dropped { count: 0 }
        );
        stop.send(true).unwrap();
        task.await.unwrap().unwrap();
        assert_eq!(store.backlog("t").unwrap(), 3, "nothing was acknowledged");
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
                crate::requests::Inbox::default(),
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

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_store_failure_that_clears_is_retried_without_losing_or_repeating_events() {
        let (_dir, store) = temp_store();
        append(&store, &["t"], 1..101);
        let outbox = Faulty::new(&store);
        outbox
            .settle_failures
            .store(3, std::sync::atomic::Ordering::SeqCst);
        let (_handle, wake) = DriverHandle::new();
        let (stop, shutdown) = watch::channel(false);
        let fake = Fake::default();
        let task = tokio::spawn(run_target(
            target("t", 10, 0),
            outbox.clone(),
            vec![fake.clone()],
            wake,
            crate::requests::Inbox::default(),
            shutdown,
        ));
        wait_until("settled", || store.backlog("t").unwrap() == 0).await;
        stop.send(true).unwrap();
        task.await.unwrap().unwrap();

        // Each batch reached the target once: only the store call was retried.
        assert_eq!(*fake.accepted.lock().unwrap(), (1..101).collect::<Vec<_>>());
        assert_eq!(fake.attempts.lock().unwrap().len(), 10);
        assert_eq!(
            outbox
                .settle_failures
                .load(std::sync::atomic::Ordering::SeqCst),
            0
        );
        assert_eq!(store.target_stats("t").unwrap().delivered_total, 100);
    }

    #[tokio::test]
    async fn a_damaged_state_file_stops_the_driver_with_its_error() {
        let (_dir, store) = temp_store();
        append(&store, &["t"], 1..11);
        let outbox = Faulty::new(&store);
        outbox
            .damaged
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let (_handle, wake) = DriverHandle::new();
        let (_stop, shutdown) = watch::channel(false);
        let fake = Fake::default();
        let result = tokio::time::timeout(
            Duration::from_secs(5),
            run_target(
                target("t", 10, 0),
                outbox,
                vec![fake.clone()],
                wake,
                crate::requests::Inbox::default(),
                shutdown,
            ),
        )
        .await
        .expect("the driver stops by itself");
        let err = result.unwrap_err();
        assert!(err.is_damage(), "{err}");
        assert!(fake.attempts.lock().unwrap().is_empty());
        assert_eq!(store.backlog("t").unwrap(), 10);
    }

    /// The blocking threads that read the batches are asked to collect
    /// their heap after each store call (see `set_blocking_call_hook`).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_blocking_call_hook_runs_after_the_store_calls() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static CALLS: AtomicUsize = AtomicUsize::new(0);
        fn hook() {
            CALLS.fetch_add(1, Ordering::SeqCst);
        }
        super::set_blocking_call_hook(hook);
        let (_dir, store) = temp_store();
        append(&store, &["t"], 1..11);
        let (_handle, wake) = DriverHandle::new();
        let (stop, shutdown) = watch::channel(false);
        let fake = Fake::default();
        let task = tokio::spawn(run_target(
            target("t", 10, 0),
            store.clone(),
            vec![fake.clone()],
            wake,
            crate::requests::Inbox::default(),
            shutdown,
        ));
        wait_until("settled", || store.backlog("t").unwrap() == 0).await;
        stop.send(true).unwrap();
        task.await.unwrap().unwrap();
        assert!(
            CALLS.load(Ordering::SeqCst) >= 2,
            "the read and the settlement: {}",
            CALLS.load(Ordering::SeqCst)
        );
    }
}
