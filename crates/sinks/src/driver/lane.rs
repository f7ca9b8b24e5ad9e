//! A lane delivers one batch with its own sink: it retries what may succeed
//! later, bisects a batch the target rejects until the rejected events stand
//! alone, and dead-letters those (or a batch past `max_attempts` or
//! `max_age`), which holds their key for the rest of the batch. These are
//! one loop over the parts of a batch, so they share one file.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::pacing::{retry_delay, Limits};
use super::target_metrics::TargetMetrics;
use super::{shutdown_requested, Deliver, Stop};
use steward_core::config::TargetConfig;
use steward_core::model::Event;
use steward_store::{key_of, Failure, NewDeadLetter, Outbox};

/// The outcome of delivering a list of events with isolation.
#[derive(Default)]
pub(super) struct Isolated {
    pub(super) delivered: u64,
    pub(super) dead: Vec<NewDeadLetter>,
    pub(super) error: Option<String>,
    /// Keys that became held (a dead letter of their own) in this batch.
    pub(super) held: HashSet<String>,
}

/// What delivering one batch needs, owned, so that several batches can be in
/// flight at once, one per lane.
pub(super) struct Lane<D, O> {
    pub(super) sink: D,
    pub(super) target: Arc<TargetConfig>,
    pub(super) store: O,
    pub(super) shutdown: watch::Receiver<bool>,
    pub(super) inbox: super::requests::Inbox,
    /// Shared by the target's lanes.
    pub(super) limits: Arc<Limits>,
    pub(super) metrics: Arc<TargetMetrics>,
}

impl<D: Deliver, O: Outbox> Lane<D, O> {
    /// Delivers `events` in order. A rejected batch is bisected until the
    /// rejected events stand alone; those are dead-lettered (and hold their
    /// key, so the key's later events in the list are parked behind them).
    pub(super) async fn deliver_isolating(&mut self, events: Vec<Event>) -> Result<Isolated, Stop> {
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
                () = self.inbox.wait() => return Err(Stop::Interrupted),
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
            let delay = retry_delay(&err, &self.target, attempt);
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
                    tracing::warn!(target_name = %self.target.name, error = %e, "cannot record the delivery error");
                }
                Err(e) => {
                    tracing::warn!(target_name = %self.target.name, error = %e, "cannot record the delivery error");
                }
            }
            queue.push_front(part);
            tokio::select! {
                biased;
                _ = shutdown_requested(&mut self.shutdown) => return Err(Stop::Shutdown),
                () = self.inbox.wait() => return Err(Stop::Interrupted),
                _ = tokio::time::sleep(delay) => {}
            }
        }
        out.held = held;
        Ok(out)
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::sync::watch;

    use crate::driver::testkit::*;
    use crate::driver::{run_target, DriverHandle};
    use steward_core::model::Lsn;

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
            crate::requests::Inbox::default(),
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
            crate::requests::Inbox::default(),
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
            crate::requests::Inbox::default(),
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
            crate::requests::Inbox::default(),
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
}
