//! When the next request may go: the target's rate limits, exponential
//! backoff with jitter between retries, and the target's own `Retry-After`.
//! Separate from `lane` because these only decide waiting, never what is sent.

use std::num::NonZeroU32;
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use rand::Rng;
use tokio::time::Instant;

use super::lane::Lane;
use super::{shutdown_requested, Deliver, Stop};
use steward_core::config::TargetConfig;

/// Longest pause honoured from a target's own `Retry-After`; a longer one is
/// more likely a misconfiguration than a wish to receive nothing for hours.
pub(super) const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// Shortest pause between attempts, so a zero `retry_initial` cannot spin.
pub(super) const MIN_RETRY_DELAY: Duration = Duration::from_millis(1);

impl<D: Deliver> Lane<D> {
    /// Waits for the rate limits to allow a request of `events` events.
    pub(super) async fn throttle(&mut self, events: usize) -> Result<(), Stop> {
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

/// The target's rate limiters.
pub(super) struct Limits {
    pub(super) requests: Option<DefaultDirectRateLimiter>,
    /// With the batch cap: a tenth of a second's worth, at least 1. Batches
    /// are capped at it and the limiter's burst is twice that, so a batch
    /// never needs more than the limiter can grant, and time lost between
    /// batches (timer overshoot, the request itself) is made up instead of
    /// lowering the rate. (The requests limiter has a burst of 2 for the same reason.)
    pub(super) events: Option<(DefaultDirectRateLimiter, u32)>,
}

impl Limits {
    pub(super) fn new(target: &TargetConfig) -> Limits {
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

    pub(super) fn max_batch(&self) -> usize {
        self.events
            .as_ref()
            .map_or(usize::MAX, |(_, b)| *b as usize)
    }
}

/// Exponential backoff with full jitter: a uniformly random delay up to
/// `initial * 2^attempt`, capped at `max`, so failing targets' retries spread out.
pub(super) fn backoff(initial: Duration, max: Duration, attempt: u32) -> Duration {
    let cap = initial
        .saturating_mul(2u32.saturating_pow(attempt.min(31)))
        .min(max)
        .max(MIN_RETRY_DELAY);
    let nanos = u64::try_from(cap.as_nanos()).unwrap_or(u64::MAX);
    let min = MIN_RETRY_DELAY.as_nanos() as u64;
    Duration::from_nanos(rand::thread_rng().gen_range(min..=nanos.max(min)))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::sync::watch;
    use tokio::time::Instant;

    use super::{backoff, MIN_RETRY_DELAY};
    use crate::driver::testkit::*;
    use crate::driver::{run_target, DriverHandle};

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
}
