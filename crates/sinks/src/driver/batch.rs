//! The delivery loop: reads the outbox, gathers a batch (ended before a key
//! still in flight, lingering briefly for more only while another batch is
//! in flight) and
//! hands it to an idle lane. What happens to a batch once handed over lives
//! in `flights` and `settle`; this file only decides what goes out next.

use std::collections::{HashSet, VecDeque};
use std::hash::BuildHasherDefault;
use std::time::Duration;

use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::time::Instant;

use super::flights::{Flights, InFlight};
use super::{requests, shutdown_requested, sleep_until_opt, Deliver, Driver, Stop, TargetQueue};
use steward_core::model::Event;
use steward_core::pipeline::govern::DigestHasher;
use steward_store::Outbox;

/// How often an idle driver looks at its outbox when nobody can wake it any more
/// (the daemon dropped the wake sender but did not ask for shutdown).
const IDLE_POLL: Duration = Duration::from_secs(1);

/// How often an idle driver looks at its queues even though it was not
/// woken: entries another store handle added without a wake-up (the tests'
/// appends) are found within this.
const IDLE_RECHECK: Duration = Duration::from_millis(500);

impl<D: Deliver + 'static, O: Outbox> Driver<D, O> {
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
    pub(super) async fn run(&mut self) -> Result<(), Stop> {
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
            busy: KeySet::default(),
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
                    match self
                        .process(TargetQueue::Replay, events, Some(last_id))
                        .await
                    {
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
                    () = self.inbox.wait() => {}
                    _ = tokio::time::sleep(IDLE_RECHECK) => {}
                    _ = sleep_until_opt(next_window) => {}
                }
                continue;
            }

            // Linger, only under load: with nothing in flight the batch goes
            // at once (a commit appends its whole group at once, so what the
            // outbox holds is all there is for now). With a batch in flight
            // and a lane free, a small batch waits up to `batch_linger` for
            // more, so that a busy target gets fuller requests; a lane
            // coming back ends the wait.
            if !flights.pending.is_empty()
                && batch.len() < self.max
                && !self.target.batch_linger.is_zero()
            {
                let deadline = Instant::now() + self.target.batch_linger;
                while batch.len() < self.max {
                    tokio::select! {
                        biased;
                        _ = shutdown_requested(&mut self.shutdown) => return Err(Stop::Shutdown),
                        Some(done) = flights.running.next() => {
                            self.lane_done(done, &mut flights).await?;
                            break;
                        }
                        changed = self.wake.changed(), if self.wake_open => {
                            if changed.is_err() {
                                self.wake_open = false;
                                continue;
                            }
                            self.wake.borrow_and_update();
                            let after = batch.last().map(|(seq, _)| *seq);
                            let want = self.max - batch.len();
                            let (store, name) = (self.store.clone(), name.clone());
                            let mut more = self
                                .store_call(move || store.read_outbox(&name, after, want))
                                .await?;
                            // Per-key order, as for the batch itself.
                            let cut = more
                                .iter()
                                .position(|(_, e)| flights.busy.contains(&key_hash(e)));
                            if let Some(cut) = cut {
                                more.truncate(cut);
                            }
                            batch.extend(more);
                            if cut.is_some() {
                                break;
                            }
                        }
                        _ = tokio::time::sleep_until(deadline) => break,
                        // A long linger must not delay an operator request.
                        () = self.inbox.wait() => break,
                    }
                }
                if flights.abandoning {
                    // A lane came back interrupted: nothing more goes out
                    // until the batches in flight are settled.
                    continue;
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
            let mut prepared = self.prepare(TargetQueue::Outbox, events, Some(last_seq));
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
}

/// A key's identity for the in-flight rule: a hash, so that the check costs
/// no allocation per event. Two keys that collide only make a batch end
/// earlier than it had to.
pub(super) fn key_hash(event: &Event) -> u64 {
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

/// A set of [`key_hash`] values, which are hashes already: the set mixes
/// each once instead of running SipHash over it (four set operations per
/// event).
pub(super) type KeySet = HashSet<u64, BuildHasherDefault<DigestHasher>>;

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::sync::watch;

    use crate::driver::testkit::*;
    use crate::driver::{run_target, DriverHandle};

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
            crate::requests::Inbox::default(),
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
    async fn an_idle_target_gets_each_batch_at_once_whatever_the_linger() {
        let (_dir, store) = temp_store();
        append(&store, &["t"], 1..2);
        let (handle, wake) = DriverHandle::new();
        let (stop, shutdown) = watch::channel(false);
        let fake = Fake::default();
        // A linger longer than the wait below: an idle target must not use it.
        let task = tokio::spawn(run_target(
            target("t", 100, 600_000),
            store.clone(),
            vec![fake.clone()],
            wake,
            crate::requests::Inbox::default(),
            shutdown,
        ));
        wait_until("event 1", || !fake.accepted.lock().unwrap().is_empty()).await;
        // One commit's events go out together.
        let last = append(&store, &["t"], 2..4);
        handle.notify(last[0].1);
        wait_until("3 events", || fake.accepted.lock().unwrap().len() >= 3).await;
        stop.send(true).unwrap();
        task.await.unwrap().unwrap();
        assert_eq!(*fake.attempts.lock().unwrap(), vec![vec![1], vec![2, 3]]);
    }

    #[tokio::test]
    async fn a_free_lane_lingers_while_a_batch_is_in_flight() {
        let (_dir, store) = temp_store();
        let (handle, wake) = DriverHandle::new();
        let (stop, shutdown) = watch::channel(false);
        // Two lanes to a slow target.
        let fake = Fake {
            latency: Duration::from_millis(300),
            ..Fake::default()
        };
        let task = tokio::spawn(run_target(
            target("t", 100, 600_000),
            store.clone(),
            vec![fake.clone(), fake.clone()],
            wake,
            crate::requests::Inbox::default(),
            shutdown,
        ));
        let last = append(&store, &["t"], 1..2);
        handle.notify(last[0].1);
        wait_until("batch 1 in flight", || {
            !fake.attempts.lock().unwrap().is_empty()
        })
        .await;
        // Two commits while batch 1 is in flight: the free lane waits for
        // the second instead of sending each alone, until batch 1 is back.
        let last = append(&store, &["t"], 2..3);
        handle.notify(last[0].1);
        tokio::time::sleep(Duration::from_millis(30)).await;
        let last = append(&store, &["t"], 3..4);
        handle.notify(last[0].1);
        wait_until("3 events", || fake.accepted.lock().unwrap().len() >= 3).await;
        stop.send(true).unwrap();
        task.await.unwrap().unwrap();
        assert_eq!(*fake.attempts.lock().unwrap(), vec![vec![1], vec![2, 3]]);
    }
}
