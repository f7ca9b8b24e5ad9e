//! One batch from sorting to settlement: its events are sorted into parked
//! (held key), windowed (for the window buffer) and sent, and what became of
//! them is recorded in one store transaction, with the metrics that follow
//! from it. Every kind of batch (outbox, replay, window) ends here.

use std::sync::Arc;

use super::lane::Isolated;
use super::{Deliver, Driver, Stop, TargetQueue};
use steward_core::config::Window;
use steward_core::model::Event;
use steward_store::{key_of, NewDeadLetter, Outbox, Settlement};

/// One batch sorted by [`Driver::prepare`].
pub(super) struct Prepared {
    pub(super) queue: TargetQueue,
    /// The last outbox seq or replay id of the batch.
    pub(super) last: Option<u64>,
    /// Events of held keys, parked in the dead-letter queue.
    pub(super) parked: Vec<NewDeadLetter>,
    /// Events of windowed entities, for the window buffer.
    pub(super) windowed: Vec<Event>,
    /// Events to deliver; taken by the lane that delivers them.
    pub(super) send: Vec<Event>,
    /// Commit times (Unix microseconds) of the events to deliver, one entry
    /// per run of equal times with its length, for the latency histogram.
    pub(super) send_times: Vec<(i64, u64)>,
    pub(super) window_done: Vec<(String, String)>,
}

impl<D: Deliver + 'static, O: Outbox> Driver<D, O> {
    /// Sorts, delivers and settles one batch while nothing else is in flight
    /// (replayed dead letters and batch windows).
    pub(super) async fn process(
        &mut self,
        queue: TargetQueue,
        events: Vec<Event>,
        last: Option<u64>,
    ) -> Result<(), Stop> {
        let mut prepared = self.prepare(queue, events, last);
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
    pub(super) fn prepare(
        &self,
        queue: TargetQueue,
        events: Vec<Event>,
        last: Option<u64>,
    ) -> Prepared {
        let mut parked = Vec::new();
        let mut windowed = Vec::new();
        let mut send = Vec::new();
        let window_done: Vec<(String, String)> = if queue == TargetQueue::Window {
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
            } else if queue == TargetQueue::Outbox
                && *self.target.delivery.window_of(&e.entity) != Window::Realtime
            {
                windowed.push(e);
            } else {
                send.push(e);
            }
        }
        let send_times = commit_times(&send);
        Prepared {
            queue,
            last,
            parked,
            windowed,
            send,
            send_times,
            window_done,
        }
    }

    /// Records what became of one batch in one store transaction.
    pub(super) async fn settle(
        &mut self,
        prepared: Prepared,
        outcome: Isolated,
    ) -> Result<(), Stop> {
        let Prepared {
            queue,
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
            outbox_up_to: if queue == TargetQueue::Outbox {
                last
            } else {
                None
            },
            replay_up_to: if queue == TargetQueue::Replay {
                last
            } else {
                None
            },
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
