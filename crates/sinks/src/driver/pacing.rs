//! When the next request may go: the target's rate limits, exponential
//! backoff with jitter between retries, and the target's own `Retry-After`.
//! Separate from `lane` because these only decide waiting, never what is sent.

use std::num::NonZeroU32;
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use rand::RngExt;
use tokio::time::Instant;

use super::lane::Lane;
use super::{shutdown_requested, Deliver, DeliveryError, Stop};
use steward_core::config::TargetConfig;
use steward_store::Outbox;

/// Longest pause honoured from a target's own `Retry-After`; a longer one is
/// more likely a misconfiguration than a wish to receive nothing for hours.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// Shortest pause between attempts, so a zero `retry_initial` cannot spin.
pub(super) const MIN_RETRY_DELAY: Duration = Duration::from_millis(1);

impl<D: Deliver, O: Outbox> Lane<D, O> {
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

/// How long to wait before sending a failed batch again, after `failures`
/// failed attempts (at least one): the target's own `Retry-After` when it
/// gave one, `retry_max` when it refuses every request (retrying sooner
/// cannot help), exponential backoff otherwise.
pub(super) fn retry_delay(err: &DeliveryError, target: &TargetConfig, failures: u32) -> Duration {
    match err.retry_after {
        Some(d) => d.clamp(MIN_RETRY_DELAY, MAX_RETRY_AFTER),
        None if !err.retryable => target.retry_max.max(MIN_RETRY_DELAY),
        None => backoff(
            target.retry_initial,
            target.retry_max,
            failures.saturating_sub(1),
        ),
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
    Duration::from_nanos(rand::rng().random_range(min..=nanos.max(min)))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::sync::watch;
    use tokio::time::Instant;

    use super::{backoff, retry_delay, MAX_RETRY_AFTER, MIN_RETRY_DELAY};
    use crate::driver::testkit::*;
    use crate::driver::{run_target, DeliveryError, DriverHandle};

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
            crate::requests::Inbox::default(),
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

    #[test]
    fn retry_delay_follows_retry_after_then_refusal_then_backoff() {
        let t = target("t", 10, 0);
        let with = |retry_after: Option<Duration>, retryable: bool| DeliveryError {
            retry_after,
            ..if retryable {
                DeliveryError::retryable("HTTP 503")
            } else {
                DeliveryError::permanent("HTTP 401")
            }
        };
        let secs = |s| Some(Duration::from_secs(s));
        assert_eq!(
            retry_delay(&with(secs(2), true), &t, 1),
            Duration::from_secs(2)
        );
        assert_eq!(
            retry_delay(&with(secs(2), false), &t, 1),
            Duration::from_secs(2)
        );
        assert_eq!(
            retry_delay(&with(secs(86_400), true), &t, 1),
            MAX_RETRY_AFTER
        );
        assert_eq!(retry_delay(&with(secs(0), true), &t, 1), MIN_RETRY_DELAY);
        // A target refusing every request is retried every retry_max.
        assert_eq!(retry_delay(&with(None, false), &t, 1), t.retry_max);
        for failures in [0, 1, 5, 40] {
            let d = retry_delay(&with(None, true), &t, failures);
            assert!(
                d >= MIN_RETRY_DELAY && d <= t.retry_max,
                "{failures}: {d:?}"
            );
        }
    }
}
