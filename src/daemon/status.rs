//! The status file: while the daemon runs it holds the redb file locked, so
//! it publishes a small JSON snapshot of its state next to it every few
//! seconds for `steward status`.
//!
//! The daemon writes it (marked `starting`) before it opens the state file,
//! so CLI commands that find it, naming a live process, leave the state
//! file to the daemon from its first moment on (see [`running_daemon`]).

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::DaemonState;
use steward_core::config::Config;
use steward_core::model::Lsn;
use steward_store::{Store, TargetStats};

const STATUS_WRITE_INTERVAL: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusFile {
    pub pid: u32,
    /// The daemon has not opened the state file yet (the other figures are empty).
    #[serde(default)]
    pub starting: bool,
    pub written_at: String,
    pub source_connected: bool,
    pub durable_lsn: String,
    pub last_source_error: Option<String>,
    pub store_bytes: u64,
    pub targets: Vec<TargetStatusLine>,
    /// Snapshot and resync progress per target and entity.
    #[serde(default)]
    pub snapshots: Vec<super::snapshot::SnapshotStatusLine>,
    /// Entities a schema change stopped (see `daemon::schema`).
    #[serde(default)]
    pub stopped_entities: Vec<super::schema::StoppedEntity>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TargetStatusLine {
    pub name: String,
    pub backlog: u64,
    /// The target's cursor: the last outbox sequence number appended (0 if
    /// none yet) and the last one delivered. Together with the checkpoint
    /// they tell an operator where each target stands after a crash.
    #[serde(default)]
    pub last_appended_seq: u64,
    #[serde(default)]
    pub last_delivered_seq: Option<u64>,
    pub delivered_total: u64,
    pub last_delivered_at: Option<String>,
    pub last_error: Option<String>,
    /// Events in the target's dead-letter queue (`steward dlq list`).
    #[serde(default)]
    pub dead_letters: u64,
}

pub fn status_path(config: &Config) -> PathBuf {
    let mut name = config
        .state
        .path
        .file_name()
        .map(std::ffi::OsStr::to_os_string)
        .unwrap_or_default();
    name.push(".status.json");
    config.state.path.with_file_name(name)
}

impl TargetStatusLine {
    pub fn new(name: &str, stats: TargetStats) -> TargetStatusLine {
        TargetStatusLine {
            name: name.to_string(),
            backlog: stats.backlog,
            last_appended_seq: stats.last_appended_seq,
            last_delivered_seq: stats.last_delivered_seq,
            delivered_total: stats.delivered_total,
            last_delivered_at: stats.last_delivered_at,
            last_error: stats.last_error,
            dead_letters: stats.dead_letters,
        }
    }
}

pub fn collect(config: &Config, store: &Store, state: &DaemonState) -> StatusFile {
    let targets = config
        .targets
        .iter()
        .map(|t| match store.target_stats(&t.name) {
            Ok(stats) => TargetStatusLine::new(&t.name, stats),
            Err(e) => TargetStatusLine {
                last_error: Some(format!("cannot read the target's state: {e}")),
                ..TargetStatusLine::new(&t.name, TargetStats::default())
            },
        })
        .collect();
    StatusFile {
        pid: std::process::id(),
        starting: false,
        written_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        source_connected: state.connected.load(Ordering::Relaxed),
        durable_lsn: Lsn(state.durable_lsn.load(Ordering::Relaxed)).to_string(),
        last_source_error: state
            .last_error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone(),
        store_bytes: store.file_size(),
        targets,
        snapshots: super::snapshot::status_lines(store),
        stopped_entities: super::schema::stopped(store),
    }
}

fn write(config: &Config, status: &StatusFile) {
    let path = status_path(config);
    let tmp = path.with_extension("json.tmp");
    let result = serde_json::to_vec_pretty(status)
        .map_err(std::io::Error::other)
        .and_then(|bytes| steward_store::files::write_atomically(&tmp, &path, &bytes));
    if let Err(e) = result {
        tracing::debug!(path = %path.display(), error = %e, "cannot write the status file");
    }
}

pub fn spawn_writer(
    config: Config,
    store: Store,
    state: Arc<DaemonState>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(STATUS_WRITE_INTERVAL);
        loop {
            tick.tick().await;
            let status = tokio::task::block_in_place(|| collect(&config, &store, &state));
            write(&config, &status);
        }
    })
}

/// Announces this process as the daemon before it opens the state file.
/// Leaves the file alone when it names another live daemon (which keeps the
/// state file; this one will wait for it and give up).
pub fn write_starting(config: &Config) {
    if running_daemon(config).is_some() {
        return;
    }
    let status = StatusFile {
        pid: std::process::id(),
        starting: true,
        written_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        source_connected: false,
        durable_lsn: Lsn::ZERO.to_string(),
        last_source_error: None,
        store_bytes: 0,
        targets: Vec::new(),
        snapshots: Vec::new(),
        stopped_entities: Vec::new(),
    };
    write(config, &status);
}

/// On exit the file goes away: `steward status` then reads the store itself.
/// A file another live daemon wrote is left in place.
pub fn remove(config: &Config) {
    if read(config)
        .is_some_and(|f| f.pid != std::process::id() && super::lock::process_alive(f.pid))
    {
        return;
    }
    let _ = std::fs::remove_file(status_path(config));
}

/// The status file of a daemon running for this configuration in another
/// process, if there is one: CLI commands then ask it instead of opening
/// the state file. A file left by a daemon that died (kill -9) names a pid
/// that is gone and does not count.
pub fn running_daemon(config: &Config) -> Option<StatusFile> {
    read(config).filter(|f| f.pid != std::process::id() && super::lock::process_alive(f.pid))
}

pub fn read(config: &Config) -> Option<StatusFile> {
    let bytes = std::fs::read(status_path(config)).ok()?;
    serde_json::from_slice(&bytes).ok()
}
