//! What the driver's unit tests share: a fake sink, a store in a temporary
//! directory, an outbox that fails on demand and helpers to fill the outbox.

// The tests run the driver over a real store, and fill and inspect it.
#![allow(clippy::disallowed_types)]

use std::collections::HashSet;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use super::{Deliver, DeliveryError};
use steward_core::config::TargetConfig;
use steward_core::model::{Event, EventOp, Lsn};
use steward_store::{DeadLetter, DeliveryCounts, DlqFilter, Outbox, Settlement, Store, StoreError};

const WAIT: Duration = Duration::from_secs(20);

pub(super) fn target(name: &str, max: usize, linger_ms: u64) -> TargetConfig {
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

pub(super) fn event(n: u64) -> Event {
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
pub(super) fn append(
    store: &Store,
    targets: &[&str],
    range: std::ops::Range<u64>,
) -> Vec<(String, u64)> {
    let events: Vec<Event> = range.clone().map(event).collect();
    let appends: Vec<(&str, &Event)> = events
        .iter()
        .flat_map(|e| targets.iter().map(move |t| (*t, e)))
        .collect();
    store.commit(Lsn(range.end), &appends).unwrap()
}

#[derive(Clone, Default)]
pub(super) struct Fake {
    /// Every attempted batch (event versions), accepted or not.
    pub(super) attempts: Arc<Mutex<Vec<Vec<u64>>>>,
    /// Accepted events, in order.
    pub(super) accepted: Arc<Mutex<Vec<u64>>>,
    pub(super) fail_first: usize,
    pub(super) always_fail: bool,
    pub(super) hang: bool,
    pub(super) retry_after: Option<Duration>,
    /// Answer 422 (a content rejection) to any batch holding this key.
    pub(super) reject_key: Option<String>,
    /// Never answer a batch holding this key.
    pub(super) hang_key: Option<String>,
    /// Take this long per attempt: a slow target.
    pub(super) latency: Duration,
    /// Attempts in progress now, and the most ever at once.
    pub(super) in_flight: Arc<AtomicUsize>,
    pub(super) max_in_flight: Arc<AtomicUsize>,
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

pub(super) fn temp_store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("state.redb")).unwrap();
    (dir, store)
}

pub(super) async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < WAIT, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Appends events `range` to `target`, event n with key `n % keys`.
pub(super) fn append_keyed(store: &Store, target: &str, range: std::ops::Range<u64>, keys: u64) {
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

pub(super) fn lanes(fake: &Fake, n: usize) -> Vec<Fake> {
    (0..n).map(|_| fake.clone()).collect()
}

/// The store as the driver sees it, with failures on demand: the next
/// `settle_failures` settlements fail as on a full disk (nothing written),
/// and while `damaged` is set every outbox read finds a damaged file.
#[derive(Clone)]
pub(super) struct Faulty {
    pub(super) store: Store,
    pub(super) settle_failures: Arc<AtomicUsize>,
    pub(super) damaged: Arc<AtomicBool>,
}

impl Faulty {
    pub(super) fn new(store: &Store) -> Faulty {
        Faulty {
            store: store.clone(),
            settle_failures: Arc::new(AtomicUsize::new(0)),
            damaged: Arc::new(AtomicBool::new(false)),
        }
    }
}

impl Outbox for Faulty {
    fn path(&self) -> &Path {
        self.store.path()
    }
    fn read_outbox(
        &self,
        target: &str,
        after: Option<u64>,
        max: usize,
    ) -> Result<Vec<(u64, Event)>, StoreError> {
        if self.damaged.load(AtomicOrdering::SeqCst) {
            return Err(StoreError::Corrupted {
                path: self.store.path().to_path_buf(),
                detail: "a test damaged it".into(),
            });
        }
        self.store.read_outbox(target, after, max)
    }
    fn backlog(&self, target: &str) -> Result<u64, StoreError> {
        self.store.backlog(target)
    }
    fn read_replay(&self, target: &str, max: usize) -> Result<Vec<(u64, Event)>, StoreError> {
        self.store.read_replay(target, max)
    }
    fn read_window(&self, target: &str, entities: &[&str]) -> Result<Vec<Event>, StoreError> {
        self.store.read_window(target, entities)
    }
    fn settle(&self, target: &str, settlement: &Settlement) -> Result<Vec<u64>, StoreError> {
        let fail = self
            .settle_failures
            .fetch_update(AtomicOrdering::SeqCst, AtomicOrdering::SeqCst, |n| {
                n.checked_sub(1)
            })
            .is_ok();
        if fail {
            return Err(StoreError::DiskFull {
                path: self.store.path().to_path_buf(),
            });
        }
        self.store.settle(target, settlement)
    }
    fn set_target_error(&self, target: &str, error: Option<&str>) -> Result<(), StoreError> {
        self.store.set_target_error(target, error)
    }
    fn delivery_counts(&self, target: &str) -> Result<DeliveryCounts, StoreError> {
        self.store.delivery_counts(target)
    }
    fn held_keys(&self, target: &str) -> Result<HashSet<String>, StoreError> {
        self.store.held_keys(target)
    }
    fn dead_letters(
        &self,
        target: &str,
        filter: &DlqFilter,
    ) -> Result<Vec<DeadLetter>, StoreError> {
        self.store.dead_letters(target, filter)
    }
    fn replay_dead_letters(&self, target: &str, filter: &DlqFilter) -> Result<u64, StoreError> {
        self.store.replay_dead_letters(target, filter)
    }
    fn drop_dead_letters(&self, target: &str, filter: &DlqFilter) -> Result<u64, StoreError> {
        self.store.drop_dead_letters(target, filter)
    }
    fn get_meta(&self, key: &str) -> Result<Option<String>, StoreError> {
        self.store.get_meta(key)
    }
    fn set_meta(&self, key: &str, value: &str) -> Result<(), StoreError> {
        self.store.set_meta(key, value)
    }
    fn durable_commits(&self) -> u64 {
        self.store.durable_commits()
    }
    fn make_durable(&self) -> Result<(), StoreError> {
        self.store.make_durable()
    }
}
