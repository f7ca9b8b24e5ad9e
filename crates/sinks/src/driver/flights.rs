//! Outbox batches in flight at once, one per lane, and their settlement in
//! outbox order: a batch that finishes early waits for those before it, and
//! a key's acknowledgement is made durable before the key is sent again.
//! Kept apart from the loop that starts batches (`batch`) because this is
//! where the ordering guarantee after a crash is decided.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;

use futures_util::stream::FuturesUnordered;

use super::batch::KeySet;
use super::lane::{Isolated, Lane};
use super::settle::Prepared;
use super::{Deliver, Driver, Stop};
use steward_store::Outbox;

/// An outbox batch handed to a lane; batches settle in outbox order.
pub(super) struct InFlight {
    pub(super) prepared: Prepared,
    /// `key_hash` of each of its events; no other batch in flight has any of them.
    pub(super) keys: Vec<u64>,
    /// Set when its lane is done with it.
    pub(super) outcome: Option<Isolated>,
}

/// A lane back from a batch: the batch's last seq, the lane, the outcome.
pub(super) type LaneDone<D, O> = (u64, Lane<D, O>, Result<Isolated, Stop>);
pub(super) type LaneFuture<D, O> = Pin<Box<dyn Future<Output = LaneDone<D, O>> + Send>>;

/// The outbox batches in flight, in outbox order, and their keys.
pub(super) struct Flights<D, O> {
    pub(super) pending: VecDeque<InFlight>,
    pub(super) busy: KeySet,
    pub(super) running: FuturesUnordered<LaneFuture<D, O>>,
    /// An operator request is waiting: no new batch starts, and what is not
    /// settled when the last lane is back is read again after the request.
    pub(super) abandoning: bool,
}

impl<D: Deliver + 'static, O: Outbox> Driver<D, O> {
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
    pub(super) async fn settle_durably_before(&mut self, keys: &[u64]) -> Result<(), Stop> {
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
    pub(super) async fn lane_done(
        &mut self,
        (last_seq, lane, outcome): LaneDone<D, O>,
        flights: &mut Flights<D, O>,
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
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering as AtomicOrdering;
    use std::time::Duration;

    use tokio::sync::watch;

    use crate::driver::testkit::*;
    use crate::driver::{run_target, DriverHandle};

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
                crate::requests::Inbox::default(),
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
            crate::requests::Inbox::default(),
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
            crate::requests::Inbox::default(),
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
            crate::requests::Inbox::default(),
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
