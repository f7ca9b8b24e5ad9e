//! Operator requests to a target's delivery driver (`steward dlq ...`,
//! `steward flush`), as files.
//!
//! While the daemon runs it holds the state file locked, so the command line
//! cannot change it. Instead it writes `<state>.requests/<target>.<id>.json`;
//! the target's driver polls that directory (every 500 ms), applies the
//! request between deliveries, and answers with
//! `<state>.requests/<target>.<id>.result.json`, which the command line prints
//! and removes. When the daemon is stopped the command line opens the store
//! and applies the request itself with the same [`apply`].

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use steward_store::{DeadLetter, DlqFilter, Outbox, StoreError};

/// How often a driver looks for requests.
pub(crate) const POLL: Duration = Duration::from_millis(500);

/// Meta key recording a `flush` made while the daemon was stopped.
pub(crate) fn flush_meta_key(target: &str) -> String {
    format!("flush_requested:{target}")
}

/// What an operator asks of a target's dead-letter queue or batch windows.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Show the dead letters that match.
    List {
        /// Which dead letters.
        filter: DlqFilter,
    },
    /// Put the matching dead letters back in line for delivery.
    Replay {
        /// Which dead letters.
        filter: DlqFilter,
    },
    /// Discard the matching dead letters for good.
    Drop {
        /// Which dead letters.
        filter: DlqFilter,
    },
    /// Open the target's batch windows now.
    Flush,
}

impl Request {
    /// Whether the request changes what the driver delivers next (it then
    /// abandons a batch in flight or backing off, and re-reads after applying it).
    pub(crate) fn is_mutating(&self) -> bool {
        !matches!(self, Request::List { .. })
    }
}

/// The driver's (or the stopped daemon's store's) answer to a [`Request`].
///
/// Adjacently tagged, not internally: serde buffers an internally tagged
/// enum's fields into a generic tree first, and an event's `data` (raw JSON
/// text) can only be read straight from the JSON.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "result", content = "body", rename_all = "snake_case")]
pub enum Response {
    /// The answer to [`Request::List`].
    DeadLetters {
        /// The matching dead letters, in id order.
        entries: Vec<DeadLetter>,
    },
    /// The answer to [`Request::Replay`].
    Replayed {
        /// How many dead letters were put back in line.
        count: u64,
    },
    /// The answer to [`Request::Drop`].
    Dropped {
        /// How many dead letters were discarded.
        count: u64,
    },
    /// The answer to [`Request::Flush`].
    Flushed,
    /// The request could not be read or applied.
    Error {
        /// Why, for the operator.
        message: String,
    },
}

/// `<state>.requests`, next to the state file.
pub(crate) fn requests_dir(state_path: &Path) -> PathBuf {
    let mut name = state_path
        .file_name()
        .map(std::ffi::OsStr::to_os_string)
        .unwrap_or_default();
    name.push(".requests");
    state_path.with_file_name(name)
}

/// Applies a request to an open store. `Flush` is recorded for the driver's
/// next start (only a running driver can open its windows).
pub fn apply(store: &impl Outbox, target: &str, request: &Request) -> Result<Response, StoreError> {
    Ok(match request {
        Request::List { filter } => Response::DeadLetters {
            entries: store.dead_letters(target, filter)?,
        },
        Request::Replay { filter } => Response::Replayed {
            count: store.replay_dead_letters(target, filter)?,
        },
        Request::Drop { filter } => Response::Dropped {
            count: store.drop_dead_letters(target, filter)?,
        },
        Request::Flush => {
            store.set_meta(&flush_meta_key(target), "1")?;
            Response::Flushed
        }
    })
}

/// A request file waiting for `target`'s driver.
#[derive(Debug)]
pub(crate) struct Pending {
    pub(crate) path: PathBuf,
    pub(crate) request: Result<Request, String>,
}

/// Requests waiting for `target`, oldest first (by file name, which starts
/// with a timestamp).
pub(crate) fn pending(dir: &Path, target: &str) -> Vec<Pending> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let prefix = format!("{target}.");
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                n.starts_with(&prefix) && n.ends_with(".json") && !n.ends_with(".result.json")
            })
        })
        .collect();
    paths.sort();
    paths
        .into_iter()
        .map(|path| {
            let request = std::fs::read(&path)
                .map_err(|e| format!("cannot read {}: {e}", path.display()))
                .and_then(|b| {
                    serde_json::from_slice(&b)
                        .map_err(|e| format!("{} is not a valid request: {e}", path.display()))
                });
            Pending { path, request }
        })
        .collect()
}

fn result_path(request: &Path) -> PathBuf {
    request.with_extension("result.json")
}

/// Answers a request: writes its result file and removes the request.
pub(crate) fn respond(request: &Path, response: &Response) {
    let out = result_path(request);
    let tmp = out.with_extension("tmp");
    let written = serde_json::to_vec_pretty(response)
        .map_err(std::io::Error::other)
        .and_then(|b| steward_store::files::write_atomically(&tmp, &out, &b));
    if let Err(e) = written {
        tracing::warn!(path = %out.display(), error = %e, "cannot write the answer to an operator request");
    }
    let _ = std::fs::remove_file(request);
}

/// Hands `request` to the running daemon and waits up to `timeout` for its answer.
pub async fn submit(
    state_path: &Path,
    target: &str,
    request: &Request,
    timeout: Duration,
) -> anyhow::Result<Response> {
    let dir = requests_dir(state_path);
    steward_store::files::create_dir_all(&dir)
        .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", dir.display()))?;
    let id = format!(
        "{:020}-{}-{:08x}",
        chrono::Utc::now().timestamp_micros(),
        std::process::id(),
        rand::random::<u32>()
    );
    let path = dir.join(format!("{target}.{id}.json"));
    let tmp = dir.join(format!(".{target}.{id}.tmp"));
    steward_store::files::write_atomically(&tmp, &path, &serde_json::to_vec(request)?)
        .map_err(|e| anyhow::anyhow!("cannot write the request {}: {e}", path.display()))?;
    let result = result_path(&path);
    let start = tokio::time::Instant::now();
    loop {
        if let Ok(bytes) = std::fs::read(&result) {
            let _ = std::fs::remove_file(&result);
            return Ok(serde_json::from_slice(&bytes)?);
        }
        if start.elapsed() > timeout {
            let _ = std::fs::remove_file(&path);
            anyhow::bail!(
                "the running daemon did not answer within {}s (is target `{target}` configured in the \
                 running daemon? see its log); the request was withdrawn",
                timeout.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use steward_core::model::{Event, EventOp, Lsn};

    #[test]
    fn a_dead_letter_list_survives_the_trip_from_daemon_to_cli() {
        let entry = DeadLetter {
            id: 7,
            event: Event {
                change: None,
                tx_id: Some(42),
                id: Event::source_id(Lsn(0x100), 3),
                entity: "product".into(),
                key: "9002".into(),
                op: EventOp::Upsert,
                version: 0x100,
                time: "2024-05-01T12:00:00.000Z".into(),
                data: serde_json::json!({ "sku": "A-1", "price": 12.5 }).into(),
            },
            error: "HTTP 422".into(),
            held_behind: None,
            attempts: 1,
            first_failure: "2024-05-01T12:00:01Z".into(),
            last_failure: "2024-05-01T12:00:02Z".into(),
        };
        let response = Response::DeadLetters {
            entries: vec![entry],
        };
        let text = serde_json::to_vec(&response).unwrap();
        let back: Response = serde_json::from_slice(&text).unwrap();
        assert_eq!(back, response);
    }
}
