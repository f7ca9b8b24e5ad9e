//! Health figures that need polling: the slot's lag and WAL status (from the
//! server, on a normal SQL connection), each target's backlog and the age of
//! its oldest undelivered event (from the store), the store's size; plus the
//! optional WAL heartbeat and the readiness verdict served on `/readyz`.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::DaemonState;
use steward_core::config::Config;
use steward_core::metric as m;
use steward_source::slot;
use steward_store::Store;

/// How often the server and the store are polled.
pub const MONITOR_INTERVAL: Duration = Duration::from_secs(5);

/// Microseconds between 1970-01-01 and PostgreSQL's epoch 2000-01-01.
const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;

/// `wal_status` values of PostgreSQL 13+, exported as one series each.
const WAL_STATUSES: &[&str] = &["reserved", "extended", "unreserved", "lost"];

/// Shared health figures (part of [`DaemonState`]).
#[derive(Default)]
pub struct Health {
    /// False until the store is open, and while its commits fail.
    pub store_ok: AtomicBool,
    /// Why the last store commit failed, while `store_ok` is false.
    pub store_error: Mutex<Option<String>>,
    /// Unix micros of the oldest received commit not yet durable; 0 = none.
    oldest_pending_commit: AtomicI64,
    /// Unix micros when everything received was last known durable.
    caught_up_at: AtomicI64,
    /// Unix micros of the consume loop's last turn (for the watchdog).
    pub loop_tick: AtomicI64,
    /// Readiness budget for a target's oldest undelivered event, in ms.
    pub stall_budget_ms: AtomicU64,
    /// Targets whose oldest undelivered event is older than the budget, with its age.
    pub stalled: Mutex<Vec<(String, u64)>>,
    /// Targets refusing steward's credentials, with the last error.
    pub credentials_refused: Mutex<Vec<(String, String)>>,
}

/// Whether a target's last delivery error says its credentials were
/// refused (a PostgreSQL target's SQLSTATE 28xxx, an HTTP 401): retried
/// until fixed, and reported on `/readyz` at once rather than after the
/// stall budget.
pub fn is_credentials_error(error: &str) -> bool {
    error.contains("authentication with the PostgreSQL server failed")
        || error.starts_with("HTTP 401 ")
}

pub fn now_micros() -> i64 {
    chrono::Utc::now().timestamp_micros()
}

impl Health {
    /// A transaction began (commit time in PostgreSQL micros): it is pending until durable.
    pub fn note_begin(&self, commit_time_pg_micros: i64) {
        let unix = commit_time_pg_micros.saturating_add(PG_EPOCH_OFFSET_MICROS);
        let _ = self.oldest_pending_commit.compare_exchange(
            0,
            unix.max(1),
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }

    /// Everything received so far is durable.
    pub fn note_caught_up(&self) {
        self.oldest_pending_commit.store(0, Ordering::Relaxed);
        self.caught_up_at.store(now_micros(), Ordering::Relaxed);
    }

    pub fn note_loop_alive(&self) {
        self.loop_tick.store(now_micros(), Ordering::Relaxed);
    }

    /// Seconds the source is behind: the oldest pending commit's age; 0 when
    /// caught up while connected; since the last caught-up moment when disconnected.
    pub fn lag_seconds(&self, connected: bool) -> f64 {
        let now = now_micros();
        let pending = self.oldest_pending_commit.load(Ordering::Relaxed);
        let since = if pending != 0 {
            pending
        } else if connected {
            return 0.0;
        } else {
            match self.caught_up_at.load(Ordering::Relaxed) {
                0 => return 0.0,
                t => t,
            }
        };
        (now - since).max(0) as f64 / 1e6
    }
}

pub fn publish_lag_seconds(state: &DaemonState) {
    let connected = state.connected.load(Ordering::Relaxed);
    metrics::gauge!(m::SOURCE_CONNECTED).set(if connected { 1.0 } else { 0.0 });
    metrics::gauge!(m::SOURCE_LAG_SECONDS).set(state.health.lag_seconds(connected));
}

/// Why the daemon is not ready; empty when it is.
pub fn readiness_problems(state: &DaemonState) -> Vec<String> {
    let mut problems = Vec::new();
    if !state.connected.load(Ordering::Relaxed) {
        let why = state
            .last_error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
            .unwrap_or_else(|| "not connected yet".into());
        problems.push(format!("source: not connected ({why})"));
    }
    if !state.health.store_ok.load(Ordering::Relaxed) {
        let error = state
            .health
            .store_error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        problems.push(match error {
            Some(e) => format!("store: cannot write the state file ({e})"),
            None => "store: not open yet".into(),
        });
    }
    for (target, error) in state
        .health
        .credentials_refused
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .iter()
    {
        problems.push(format!("target {target}: credentials refused ({error})"));
    }
    let budget = state.health.stall_budget_ms.load(Ordering::Relaxed);
    for (target, age_ms) in state
        .health
        .stalled
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .iter()
    {
        problems.push(format!(
            "target {target}: oldest undelivered event is {}s old (budget {}s)",
            age_ms / 1000,
            budget / 1000
        ));
    }
    problems
}

/// Polls every [`MONITOR_INTERVAL`] until aborted.
pub fn spawn(config: Config, store: Store, state: Arc<DaemonState>) -> tokio::task::JoinHandle<()> {
    state.health.stall_budget_ms.store(
        u64::try_from(config.metrics.ready_max_target_stall.as_millis()).unwrap_or(u64::MAX),
        Ordering::Relaxed,
    );
    tokio::spawn(async move {
        let mut sql: Option<tokio_postgres::Client> = None;
        let mut tick = tokio::time::interval(MONITOR_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            publish_lag_seconds(&state);
            poll_store(&config, &store, &state);
            poll_slot(&config, &mut sql).await;
        }
    })
}

fn poll_store(config: &Config, store: &Store, state: &DaemonState) {
    let budget = state.health.stall_budget_ms.load(Ordering::Relaxed);
    let now = chrono::Utc::now();
    let mut stalled = Vec::new();
    let mut refused = Vec::new();
    tokio::task::block_in_place(|| {
        metrics::gauge!(m::STORE_BYTES).set(store.file_size() as f64);
        super::govern::publish_dead_lettered(config, store);
        for target in &config.targets {
            let name = target.name.clone();
            if let Ok(backlog) = store.backlog(&name) {
                metrics::gauge!(m::TARGET_BACKLOG, "target" => name.clone()).set(backlog as f64);
            }
            let age_ms = match store.oldest_pending(&name) {
                Ok(Some((_, event))) => chrono::DateTime::parse_from_rfc3339(&event.time)
                    .map(|t| {
                        (now - t.with_timezone(&chrono::Utc))
                            .num_milliseconds()
                            .max(0)
                    })
                    .unwrap_or(0),
                _ => 0,
            } as u64;
            metrics::gauge!(m::TARGET_OLDEST_UNDELIVERED_SECONDS, "target" => name.clone())
                .set(age_ms as f64 / 1000.0);
            if let Ok(Some(error)) = store.target_stats(&name).map(|s| s.last_error) {
                if is_credentials_error(&error) {
                    refused.push((name.clone(), error));
                }
            }
            if age_ms > budget {
                stalled.push((name, age_ms));
            }
        }
    });
    *state
        .health
        .stalled
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = stalled;
    *state
        .health
        .credentials_refused
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = refused;
}

async fn poll_slot(config: &Config, sql: &mut Option<tokio_postgres::Client>) {
    if !matches!(sql, Some(c) if !c.is_closed()) {
        match steward_postgres::connect_sql(&config.source).await {
            Ok(c) => *sql = Some(c),
            Err(e) => {
                tracing::debug!(error = %e, "monitor: cannot connect to the source");
                return;
            }
        }
    }
    let Some(client) = sql.as_ref() else { return };
    match slot::slot_info(client, &config.source.slot).await {
        Ok(Some(info)) => {
            if let Some(lag) = info.lag_bytes() {
                metrics::gauge!(m::SOURCE_LAG_BYTES).set(lag as f64);
            }
            if let Some(status) = info.wal_status.as_deref() {
                for s in WAL_STATUSES {
                    metrics::gauge!(m::SLOT_WAL_STATUS, "status" => *s).set(if *s == status {
                        1.0
                    } else {
                        0.0
                    });
                }
            }
            if let Some(size) = info.safe_wal_size {
                metrics::gauge!(m::SLOT_SAFE_WAL_SIZE_BYTES).set(size as f64);
            }
        }
        Ok(None) => {
            // No slot at all reads as "lost": the alert on it names the fix.
            for s in WAL_STATUSES {
                metrics::gauge!(m::SLOT_WAL_STATUS, "status" => *s).set(if *s == "lost" {
                    1.0
                } else {
                    0.0
                });
            }
        }
        Err(e) => {
            tracing::debug!(error = %e, "monitor: cannot read the slot");
            *sql = None;
        }
    }
}

/// Writes a non-transactional logical message every `interval`, so the
/// walsender has WAL to decode on a quiet database: keepalives move, the slot
/// advances and lag in seconds stays meaningful. The source ignores these messages.
///
/// A standby cannot write WAL: the messages go to `source.heartbeat_url`
/// (the primary) when set; otherwise, while the source is a standby, no
/// heartbeat is written and a line says so once.
pub fn spawn_heartbeat(config: Config, interval: Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut sql: Option<tokio_postgres::Client> = None;
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut warned = false;
        let mut told_standby = false;
        let target = config
            .source
            .heartbeat_via
            .as_deref()
            .unwrap_or(&config.source);
        loop {
            tick.tick().await;
            if !matches!(&sql, Some(c) if !c.is_closed()) {
                match steward_postgres::connect_sql(target).await {
                    Ok(c) => sql = Some(c),
                    Err(e) => {
                        tracing::debug!(error = %e, "heartbeat: cannot connect to the source");
                        continue;
                    }
                }
            }
            let Some(client) = sql.as_ref() else { continue };
            if config.source.heartbeat_via.is_none() {
                match slot::in_recovery(client).await {
                    Ok(true) => {
                        if !told_standby {
                            tracing::warn!(
                                "heartbeat: the source is a standby, which cannot write WAL; no \
                                 heartbeats are written. Set source.heartbeat_url to the primary \
                                 (same database) to keep the slot moving on a quiet database"
                            );
                            told_standby = true;
                        }
                        continue;
                    }
                    Ok(false) => told_standby = false,
                    Err(_) => {
                        sql = None;
                        continue;
                    }
                }
            }
            match client
                .simple_query(
                    "SELECT pg_logical_emit_message(false, 'steward_heartbeat', now()::text)",
                )
                .await
            {
                Ok(_) => warned = false,
                Err(e) => {
                    let error = e
                        .as_db_error()
                        .map(|d| d.message().to_string())
                        .unwrap_or_else(|| e.to_string());
                    if !warned {
                        tracing::warn!(
                            %error,
                            "heartbeat: cannot write to the WAL; grant EXECUTE on \
                             pg_logical_emit_message(boolean, text, text) to steward's role \
                             or set source.heartbeat_interval_ms = 0"
                        );
                        warned = true;
                    }
                    sql = None;
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ready_state() -> DaemonState {
        let state = DaemonState::default();
        state.connected.store(true, Ordering::Relaxed);
        state.health.store_ok.store(true, Ordering::Relaxed);
        state
            .health
            .stall_budget_ms
            .store(300_000, Ordering::Relaxed);
        state
    }

    #[test]
    fn a_fresh_daemon_is_not_ready_and_says_why() {
        let problems = readiness_problems(&DaemonState::default());
        assert_eq!(
            problems,
            [
                "source: not connected (not connected yet)",
                "store: not open yet"
            ]
        );
    }

    #[test]
    fn readiness_names_the_source_error_the_store_error_and_each_stalled_target() {
        let state = ready_state();
        assert!(readiness_problems(&state).is_empty());

        state.connected.store(false, Ordering::Relaxed);
        *state.last_error.lock().unwrap() = Some("connection refused".into());
        assert_eq!(
            readiness_problems(&state),
            ["source: not connected (connection refused)"]
        );
        state.connected.store(true, Ordering::Relaxed);

        state.health.store_ok.store(false, Ordering::Relaxed);
        *state.health.store_error.lock().unwrap() = Some("No space left on device".into());
        assert_eq!(
            readiness_problems(&state),
            ["store: cannot write the state file (No space left on device)"]
        );
        state.health.store_ok.store(true, Ordering::Relaxed);

        *state.health.stalled.lock().unwrap() =
            vec![("wms".into(), 301_500), ("mes".into(), 900_000)];
        assert_eq!(
            readiness_problems(&state),
            [
                "target wms: oldest undelivered event is 301s old (budget 300s)",
                "target mes: oldest undelivered event is 900s old (budget 300s)"
            ]
        );
    }

    #[test]
    fn a_target_refusing_credentials_is_not_ready() {
        let state = ready_state();
        let error = "target pg: cannot connect to postgres://w@db/mdm: authentication with the \
                     PostgreSQL server failed: password authentication failed for user \"w\"; \
                     check targets.pg.password_file/password_env";
        assert!(is_credentials_error(error));
        assert!(is_credentials_error(
            "HTTP 401 from https://wms/x (empty body)"
        ));
        assert!(!is_credentials_error(
            "HTTP 503 from https://wms/x (empty body)"
        ));
        *state.health.credentials_refused.lock().unwrap() = vec![("pg".into(), error.into())];
        assert_eq!(
            readiness_problems(&state),
            [format!("target pg: credentials refused ({error})")]
        );
    }

    #[test]
    fn lag_seconds_counts_from_the_oldest_pending_commit_until_it_is_durable() {
        let health = Health::default();
        assert_eq!(health.lag_seconds(true), 0.0);
        // A commit made 30 s ago, received and not yet durable.
        let thirty_s_ago = now_micros() - 30_000_000 - PG_EPOCH_OFFSET_MICROS;
        health.note_begin(thirty_s_ago);
        // A later transaction does not make the lag look smaller.
        health.note_begin(thirty_s_ago + 29_000_000);
        let lag = health.lag_seconds(true);
        assert!((30.0..31.0).contains(&lag), "{lag}");
        health.note_caught_up();
        assert_eq!(health.lag_seconds(true), 0.0);
        // Disconnected after catching up: behind since then, as far as anyone knows.
        std::thread::sleep(Duration::from_millis(20));
        assert!(health.lag_seconds(false) >= 0.02);
    }
}
