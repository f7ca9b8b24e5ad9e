//! The target's metrics (see `steward_core::metric`). The module is not
//! called `metrics` so that the `metrics` crate keeps its name here.

use std::time::Duration;

use super::{Deliver, Driver, Stop};
use steward_store::Outbox;

pub(super) struct TargetMetrics {
    pub(super) delivered: metrics::Counter,
    pub(super) failures: metrics::Counter,
    pub(super) retries: metrics::Counter,
    pub(super) dead_letters: metrics::Counter,
    pub(super) dead_letter_events: metrics::Gauge,
    /// Whole seconds spent waiting for the rate limits: `metrics` counters
    /// are integers, so the fraction is carried in `throttled_carry_us` until
    /// it adds up to a second (a restarted driver loses less than one).
    pub(super) throttled: metrics::Counter,
    pub(super) throttled_carry_us: std::sync::Mutex<u64>,
    pub(super) backlog: metrics::Gauge,
    pub(super) latency: metrics::Histogram,
}

impl TargetMetrics {
    pub(super) fn new(target: &str) -> TargetMetrics {
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
    pub(super) fn add_throttled(&self, waited: Duration) {
        let mut carry = self
            .throttled_carry_us
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *carry = carry.saturating_add(u64::try_from(waited.as_micros()).unwrap_or(u64::MAX));
        let whole = *carry / 1_000_000;
        if whole > 0 {
            self.throttled.increment(whole);
            *carry -= whole * 1_000_000;
        }
    }
}

impl<D: Deliver + 'static, O: Outbox> Driver<D, O> {
    pub(super) async fn refresh_gauges(&mut self) -> Result<(), Stop> {
        let (store, name) = (self.store.clone(), self.target.name.clone());
        let counts = self
            .store_call(move || store.delivery_counts(&name))
            .await?;
        self.metrics
            .dead_letter_events
            .set(counts.dead_letters as f64);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::TargetMetrics;

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
}
