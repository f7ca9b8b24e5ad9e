//! The help text of every Prometheus metric steward exports, the
//! process-wide recorder, and the HTTP listener serving `/metrics`,
//! `/healthz` and `/readyz`.
//!
//! Metric names and buckets are constants in `steward_core::metric`, which
//! every crate records through, so a name cannot drift between the
//! recorder, the alert rules (`config/alerts.yml`) and the dashboard
//! (`config/grafana-dashboard.json`).

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use super::DaemonState;

use steward_core::metric::*;

/// Registers help texts (shown as `# HELP` lines).
fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_gauge!(
        SOURCE_LAG_BYTES,
        Unit::Bytes,
        "Server WAL position minus the slot's confirmed flush position"
    );
    describe_gauge!(
        SOURCE_LAG_SECONDS,
        Unit::Seconds,
        "Age of the oldest received but unconfirmed commit; 0 when caught up"
    );
    describe_gauge!(SOURCE_CONNECTED, "1 while the replication connection is up");
    describe_gauge!(
        SLOT_WAL_STATUS,
        "Replication slot wal_status: 1 for the current status"
    );
    describe_gauge!(
        SLOT_SAFE_WAL_SIZE_BYTES,
        Unit::Bytes,
        "WAL that can still be written before the slot risks losing WAL"
    );
    describe_counter!(
        EVENTS_RECEIVED,
        "Events mapped from received row changes, per entity"
    );
    describe_counter!(
        EVENTS_FILTERED,
        "Changes kept from targets, per entity: no target takes the entity, or governance gated, did not route, suppressed (no-op) or quarantined them"
    );
    describe_counter!(
        RECORDS_UNKEYED,
        "Row changes skipped because a key column is NULL or not UTF-8, per entity"
    );
    describe_counter!(EVENTS_STORED, "Events written to target outboxes");
    describe_counter!(DEAD_LETTERS, "Events moved to a target's dead-letter queue");
    describe_counter!(
        DELIVERY_RETRIES,
        "Delivery attempts retried after a failure"
    );
    describe_counter!(
        THROTTLED_SECONDS,
        Unit::Seconds,
        "Time spent waiting for a target's rate limit, in whole seconds"
    );
    describe_counter!(
        SNAPSHOT_ROWS,
        "Snapshot rows appended to the target's outbox (initial snapshots and resets)"
    );
    describe_counter!(
        RECONCILE_RECORDS,
        "Records compared by reconciliations, by result (checked, equal, resent, deleted)"
    );
    describe_gauge!(
        RECONCILE_LAST_COMPLETED,
        Unit::Seconds,
        "Unix time the last reconciliation of the target and entity completed"
    );
    describe_gauge!(
        RECONCILE_LAST_DRIFT,
        "Records the last completed reconciliation re-sent or deleted"
    );
    describe_gauge!(
        RECONCILE_INTERVAL,
        Unit::Seconds,
        "Interval of the scheduled reconciliation (a day for `at`)"
    );
    describe_counter!(EVENTS_DELIVERED, "Events acknowledged by the target");
    describe_counter!(DELIVERY_FAILURES, "Failed delivery attempts");
    describe_gauge!(TARGET_BACKLOG, "Events waiting in the target's outbox");
    describe_gauge!(
        TARGET_OLDEST_UNDELIVERED_SECONDS,
        Unit::Seconds,
        "Age of the oldest event waiting in the target's outbox; 0 when empty"
    );
    describe_histogram!(
        DELIVERY_LATENCY_SECONDS,
        Unit::Seconds,
        "Source commit to target acknowledgement"
    );
    describe_gauge!(STORE_BYTES, Unit::Bytes, "Size of the redb state file");
    describe_histogram!(
        STORE_COMMIT_SECONDS,
        Unit::Seconds,
        "Duration of one durable group commit"
    );
    describe_gauge!(DURABLE_LSN, "Last WAL position made durable in the store");
    describe_gauge!(BUILD_INFO, "Build information; always 1");
    describe_gauge!(DEAD_LETTER_EVENTS, "Events parked in the dead-letter queue");
    describe_gauge!(
        QUARANTINED_RECORDS,
        "Records held in quarantine (failing a rule or a business key), per entity"
    );
    describe_gauge!(
        RECORDS,
        "Records per entity and state: published, pending_approval, quarantined, blocked (each record in one), dead_lettered (a dead letter at some target)"
    );
    describe_counter!(CONFIG_RELOADS, "Configuration reloads (SIGHUP) by result");
    describe_gauge!(
        ENTITY_STOPPED,
        "1 while a schema change stops the entity (its table lacks a mapped column)"
    );
}

/// Installs the process-wide Prometheus recorder once and returns its handle.
/// Later calls (e.g. after a reload) return the same handle.
pub(super) fn install() -> anyhow::Result<&'static PrometheusHandle> {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    if let Some(h) = HANDLE.get() {
        return Ok(h);
    }
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full(DELIVERY_LATENCY_SECONDS.into()),
            LATENCY_BUCKETS,
        )?
        .set_buckets_for_metric(Matcher::Full(STORE_COMMIT_SECONDS.into()), COMMIT_BUCKETS)?
        .install_recorder()
        .map_err(|e| anyhow::anyhow!("cannot install the metrics recorder: {e}"))?;
    describe();
    metrics::gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    Ok(HANDLE.get_or_init(|| handle))
}

#[derive(Clone)]
struct Shared {
    handle: &'static PrometheusHandle,
    state: Arc<DaemonState>,
}

/// Binds `addr` (failing fast when it is taken) and serves until the process ends.
pub(super) async fn serve(addr: SocketAddr, state: Arc<DaemonState>) -> anyhow::Result<()> {
    let handle = install()?;
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        anyhow::anyhow!(
            "cannot listen for metrics on {addr}: {e}; change metrics.listen or free the port"
        )
    })?;
    tracing::info!(%addr, "serving /metrics, /healthz and /readyz");
    let app = Router::new()
        .route("/metrics", get(metrics_page))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(Shared { handle, state });
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "the metrics listener stopped");
        }
    });
    Ok(())
}

async fn metrics_page(State(s): State<Shared>) -> impl IntoResponse {
    // Lag in seconds is a function of "now": computed at scrape time so an
    // idle, caught-up daemon reads 0 and a stuck one keeps growing.
    super::monitor::publish_lag_seconds(&s.state);
    s.handle.run_upkeep();
    (
        [("content-type", "text/plain; version=0.0.4; charset=utf-8")],
        s.handle.render(),
    )
}

async fn readyz(State(s): State<Shared>) -> impl IntoResponse {
    let problems = super::monitor::readiness_problems(&s.state);
    if problems.is_empty() {
        (StatusCode::OK, "ready\n".to_string())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready:\n{}\n", problems.join("\n")),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: &[&str] = &[
        SOURCE_LAG_BYTES,
        SOURCE_LAG_SECONDS,
        SOURCE_CONNECTED,
        SLOT_WAL_STATUS,
        SLOT_SAFE_WAL_SIZE_BYTES,
        EVENTS_RECEIVED,
        EVENTS_FILTERED,
        RECORDS_UNKEYED,
        EVENTS_STORED,
        EVENTS_DELIVERED,
        DELIVERY_FAILURES,
        TARGET_BACKLOG,
        TARGET_OLDEST_UNDELIVERED_SECONDS,
        DELIVERY_LATENCY_SECONDS,
        STORE_BYTES,
        STORE_COMMIT_SECONDS,
        DURABLE_LSN,
        BUILD_INFO,
        DEAD_LETTER_EVENTS,
        QUARANTINED_RECORDS,
        RECORDS,
        DEAD_LETTERS,
        DELIVERY_RETRIES,
        THROTTLED_SECONDS,
        SNAPSHOT_ROWS,
        CONFIG_RELOADS,
        ENTITY_STOPPED,
        RECONCILE_RECORDS,
        RECONCILE_LAST_COMPLETED,
        RECONCILE_LAST_DRIFT,
        RECONCILE_INTERVAL,
    ];

    /// `steward_*` names used in a text, histogram suffixes removed.
    fn names_in(text: &str) -> Vec<String> {
        let mut out = Vec::new();
        let mut rest = text;
        while let Some(i) = rest.find("steward_") {
            let tail = &rest[i..];
            let end = tail
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(tail.len());
            let name = &tail[..end];
            let name = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(name);
            out.push(name.to_string());
            rest = &tail[end..];
        }
        out
    }

    #[test]
    fn alerts_and_dashboard_use_only_declared_metrics() {
        let dashboard = include_str!("../../config/grafana-dashboard.json");
        let parsed: serde_json::Value =
            serde_json::from_str(dashboard).expect("the dashboard is valid JSON");
        assert!(parsed["panels"].as_array().is_some_and(|p| p.len() >= 5));
        let alerts = include_str!("../../config/alerts.yml");
        for (file, text) in [("dashboard", dashboard), ("alerts.yml", alerts)] {
            for name in names_in(text) {
                // `steward_heartbeat` etc. are not metrics; only `steward_` + known prefixes are.
                assert!(
                    ALL.contains(&name.as_str()),
                    "{file} uses {name}, which steward_core::metric does not declare"
                );
            }
        }
        for needed in [
            SOURCE_LAG_BYTES,
            TARGET_BACKLOG,
            EVENTS_DELIVERED,
            DEAD_LETTER_EVENTS,
            RECORDS,
        ] {
            assert!(dashboard.contains(needed), "the dashboard lacks {needed}");
        }
    }

    /// Prometheus conventions, checked on the declarations: every metric is
    /// in `ALL` and described here, and `_total` is exactly the counters'
    /// suffix.
    #[test]
    fn every_metric_is_described_and_only_counters_end_in_total() {
        let names = include_str!("../../crates/core/src/metric.rs");
        let source = include_str!("endpoint.rs");
        let consts: Vec<(&str, &str)> = names
            .lines()
            .filter_map(|l| {
                let rest = l.strip_prefix("pub const ")?;
                let (ident, value) = rest.split_once(": &str = \"")?;
                Some((ident, value.strip_suffix("\";")?))
            })
            .collect();
        assert!(consts.len() >= ALL.len(), "{consts:?}");
        for (ident, name) in &consts {
            assert!(ALL.contains(name), "{name} is missing from ALL");
            let kind = ["counter", "gauge", "histogram"]
                .into_iter()
                .find(|k| {
                    let call = format!("describe_{k}!(");
                    source
                        .split(&call)
                        .skip(1)
                        .any(|after| after.trim_start().split([',', ' ']).next() == Some(*ident))
                })
                .unwrap_or_else(|| panic!("{name} ({ident}) has no describe_*! call"));
            assert_eq!(
                kind == "counter",
                name.ends_with("_total"),
                "{name} is described as a {kind}: only counters end in _total"
            );
        }
    }

    #[test]
    fn latency_buckets_are_increasing_and_span_5ms_to_60s() {
        assert!(LATENCY_BUCKETS.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(LATENCY_BUCKETS.first(), Some(&0.005));
        assert_eq!(LATENCY_BUCKETS.last(), Some(&60.0));
    }
}
