//! Per-target delivery loop: reads the target's outbox in order, gathers a
//! batch, hands it to the target's sink and acknowledges it in the store only
//! once the sink reports the target durably accepted it.
//!
//! A failing batch is retried as it is, forever, with exponential backoff:
//! skipping it would lose events or reorder them per key. Events stay in the
//! outbox until acknowledged, so a crash or shutdown at any point re-delivers
//! at most the batch in flight, which targets de-duplicate by event id.
//!
//! One driver runs per target, so a slow or failing target only grows its own
//! backlog and never holds up the others.

use std::future::Future;
use std::time::Duration;

use rand::Rng;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::config::TargetConfig;
use crate::model::Event;
use crate::store::{Store, StoreError};

/// Longest pause honoured from a target's own `Retry-After`; a longer one is
/// more likely a misconfiguration than a wish to receive nothing for hours.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// Shortest pause between attempts, so a zero `retry_initial` cannot spin.
const MIN_RETRY_DELAY: Duration = Duration::from_millis(1);

/// How often an idle driver looks at its outbox when nobody can wake it any more
/// (the daemon dropped the wake sender but did not ask for shutdown).
const IDLE_POLL: Duration = Duration::from_secs(1);

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
    /// False when retrying as-is cannot help (e.g. HTTP 400): the batch is still
    /// retried, since events are never skipped, but slowly and logged as an error.
    pub retryable: bool,
    /// Operator-readable, e.g. `HTTP 503 from https://...: <body excerpt>`. Never secrets.
    pub message: String,
    /// The target's own wish, e.g. from a `Retry-After` header.
    pub retry_after: Option<Duration>,
}

impl DeliveryError {
    pub fn retryable(message: impl Into<String>) -> DeliveryError {
        DeliveryError {
            retryable: true,
            message: message.into(),
            retry_after: None,
        }
    }

    pub fn permanent(message: impl Into<String>) -> DeliveryError {
        DeliveryError {
            retryable: false,
            message: message.into(),
            retry_after: None,
        }
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
pub async fn run_target<D: Deliver>(
    target: TargetConfig,
    store: Store,
    mut sink: D,
    mut wake: watch::Receiver<u64>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), StoreError> {
    let name = target.name.clone();
    let metrics = TargetMetrics::new(&name);
    let max = target.batch_max_events.max(1);
    let mut wake_open = true;
    // Last sequence number acknowledged by this run; the store also skips
    // acknowledged entries, so starting from `None` is right after a restart.
    let mut cursor: Option<u64> = None;
    tracing::debug!(target_name = %name, "delivery driver started");

    loop {
        // Marking the wake value seen BEFORE reading means an append that
        // lands after the read still wakes the wait below.
        wake.borrow_and_update();
        let read = {
            let (store, name) = (store.clone(), name.clone());
            store_call(&store.clone(), &target, &mut shutdown, move || {
                let batch = store.read_outbox(&name, cursor, max)?;
                let backlog = store.backlog(&name)?;
                Ok((batch, backlog))
            })
            .await?
        };
        let Some((mut batch, backlog)) = read else {
            return Ok(());
        };
        metrics.backlog.set(backlog as f64);

        if batch.is_empty() {
            tokio::select! {
                biased;
                _ = shutdown_requested(&mut shutdown) => return Ok(()),
                changed = wake.changed(), if wake_open => {
                    if changed.is_err() {
                        wake_open = false;
                    }
                }
                _ = tokio::time::sleep(IDLE_POLL), if !wake_open => {}
            }
            continue;
        }

        // Linger: a small batch waits briefly for more so that a burst of
        // single-row transactions goes out as one request.
        if batch.len() < max && !target.batch_linger.is_zero() {
            let deadline = Instant::now() + target.batch_linger;
            while batch.len() < max {
                tokio::select! {
                    biased;
                    _ = shutdown_requested(&mut shutdown) => return Ok(()),
                    changed = wake.changed(), if wake_open => {
                        if changed.is_err() {
                            wake_open = false;
                            continue;
                        }
                        wake.borrow_and_update();
                        let after = batch.last().map(|(seq, _)| *seq);
                        let want = max - batch.len();
                        let (store, name) = (store.clone(), name.clone());
                        let more = store_call(&store.clone(), &target, &mut shutdown, move || {
                            store.read_outbox(&name, after, want)
                        })
                        .await?;
                        match more {
                            Some(more) => batch.extend(more),
                            None => return Ok(()),
                        }
                    }
                    _ = tokio::time::sleep_until(deadline) => break,
                }
            }
        }

        let Some(&(last_seq, _)) = batch.last() else {
            continue;
        };
        let events: Vec<Event> = batch.into_iter().map(|(_, e)| e).collect();
        if !deliver_until_accepted(&target, &mut sink, &events, &metrics, &store, &mut shutdown)
            .await
        {
            return Ok(());
        }

        let count = events.len() as u64;
        let acked = {
            let (store, name) = (store.clone(), name.clone());
            store_call(&store.clone(), &target, &mut shutdown, move || {
                store.ack(&name, last_seq, count)?;
                store.backlog(&name)
            })
            .await?
        };
        let Some(backlog) = acked else {
            // Delivered but not acknowledged: re-delivered after restart, de-duplicated there.
            return Ok(());
        };
        cursor = Some(last_seq);
        metrics.delivered.increment(count);
        metrics.backlog.set(backlog as f64);
        let now = chrono::Utc::now();
        for event in &events {
            if let Ok(t) = chrono::DateTime::parse_from_rfc3339(&event.time) {
                let secs = (now - t.with_timezone(&chrono::Utc))
                    .num_microseconds()
                    .unwrap_or(0);
                metrics.latency.record(secs.max(0) as f64 / 1e6);
            }
        }
    }
}

/// Delivers one batch, retrying until the sink accepts it. False when shutdown
/// was requested first (the attempt in flight is abandoned).
async fn deliver_until_accepted<D: Deliver>(
    target: &TargetConfig,
    sink: &mut D,
    events: &[Event],
    metrics: &TargetMetrics,
    store: &Store,
    shutdown: &mut watch::Receiver<bool>,
) -> bool {
    let mut attempt: u32 = 0;
    loop {
        let result = tokio::select! {
            biased;
            _ = shutdown_requested(shutdown) => return false,
            r = sink.deliver(events) => r,
        };
        let err = match result {
            Ok(()) => {
                if attempt > 0 {
                    tracing::info!(target_name = %target.name, attempts = attempt + 1, "delivery succeeded after retrying");
                }
                return true;
            }
            Err(err) => err,
        };
        metrics.failures.increment(1);
        let delay = match err.retry_after {
            Some(d) => d.clamp(MIN_RETRY_DELAY, MAX_RETRY_AFTER),
            None if !err.retryable => target.retry_max.max(MIN_RETRY_DELAY),
            None => backoff(target.retry_initial, target.retry_max, attempt),
        };
        if err.retryable {
            tracing::warn!(
                target_name = %target.name, attempt = attempt + 1, events = events.len(),
                retry_in_ms = delay.as_millis() as u64, error = %err.message,
                "delivery failed; retrying the same batch"
            );
        } else {
            tracing::error!(
                target_name = %target.name, attempt = attempt + 1, events = events.len(),
                retry_in_ms = delay.as_millis() as u64, error = %err.message,
                "target rejected the batch; events are never skipped, so it is retried \
                 until the target or its configuration is fixed"
            );
        }
        let (s, name, message) = (store.clone(), target.name.clone(), err.message.clone());
        match tokio::task::spawn_blocking(move || s.set_target_error(&name, Some(&message))).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(target_name = %target.name, error = %e, "cannot record the delivery error")
            }
            Err(e) => {
                tracing::warn!(target_name = %target.name, error = %e, "cannot record the delivery error")
            }
        }
        attempt = attempt.saturating_add(1);
        tokio::select! {
            biased;
            _ = shutdown_requested(shutdown) => return false,
            _ = tokio::time::sleep(delay) => {}
        }
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
    Duration::from_nanos(rand::thread_rng().gen_range(min..=nanos.max(min)))
}

struct TargetMetrics {
    delivered: metrics::Counter,
    failures: metrics::Counter,
    backlog: metrics::Gauge,
    latency: metrics::Histogram,
}

impl TargetMetrics {
    fn new(target: &str) -> TargetMetrics {
        let t = target.to_string();
        TargetMetrics {
            delivered: metrics::counter!("steward_events_delivered_total", "target" => t.clone()),
            failures: metrics::counter!("steward_delivery_failures_total", "target" => t.clone()),
            backlog: metrics::gauge!("steward_target_backlog_events", "target" => t.clone()),
            latency: metrics::histogram!("steward_delivery_latency_seconds", "target" => t),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::config::{HttpTargetConfig, TargetKind};
    use crate::model::{EventOp, Lsn};

    const WAIT: Duration = Duration::from_secs(20);

    fn target(name: &str, max: usize, linger_ms: u64) -> TargetConfig {
        TargetConfig {
            name: name.into(),
            entities: vec!["product".into()],
            batch_max_events: max,
            batch_linger: Duration::from_millis(linger_ms),
            retry_initial: Duration::from_millis(1),
            retry_max: Duration::from_millis(8),
            kind: TargetKind::Http(HttpTargetConfig {
                url: "http://127.0.0.1:9/events".parse().unwrap(),
                timeout: Duration::from_secs(5),
                connect_timeout: Duration::from_secs(1),
                headers: Vec::new(),
            }),
            initial: crate::config::InitialSync::Snapshot,
        }
    }

    fn event(n: u64) -> Event {
        Event {
            id: Event::source_id(Lsn(n), 0),
            entity: "product".into(),
            key: (n % 7).to_string(),
            op: EventOp::Upsert,
            version: n,
            time: chrono::Utc::now().to_rfc3339(),
            data: serde_json::json!({ "n": n }),
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
    }

    impl Deliver for Fake {
        async fn deliver(&mut self, events: &[Event]) -> Result<(), DeliveryError> {
            {
                let calls = {
                    let mut attempts = self.attempts.lock().unwrap();
                    attempts.push(events.iter().map(|e| e.version).collect());
                    attempts.len()
                };
                if self.hang {
                    std::future::pending::<()>().await;
                }
                if self.always_fail || calls <= self.fail_first {
                    return Err(DeliveryError {
                        retryable: true,
                        message: "HTTP 503 from http://127.0.0.1:9/events: busy".into(),
                        retry_after: self.retry_after,
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
            fake.clone(),
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
            fake.clone(),
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
            good.clone(),
            wake_good,
            shutdown.clone(),
        ));
        let t_bad = tokio::spawn(run_target(
            target("bad", 16, 0),
            store.clone(),
            bad.clone(),
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
                fake.clone(),
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
            fake.clone(),
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
            fake.clone(),
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
}
