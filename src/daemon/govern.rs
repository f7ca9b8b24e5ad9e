//! Governance around the consume loop: start-up (state load, first read of
//! referenced tables), audit pruning, and operator requests for a running
//! daemon (`steward quarantine ...` / `steward audit ...` write a request
//! file next to the state file; the loop answers within 2 s).
//!
//! Request protocol: the CLI writes `<state>.requests/<id>.req` (JSON
//! [`Request`], written to a temporary name then renamed), the daemon
//! writes `<id>.resp` (JSON [`Response`]) and removes the request.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::config::Config;
use crate::model::{Event, Lsn};
use crate::pipeline::{Governor, Pipeline};
use crate::source::wire;
use crate::store::audit::AuditFilter;
use crate::store::governance::{AuditRecord, GovDelta, QuarantineEntry};
use crate::store::Store;

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    QuarantineList,
    QuarantineShow {
        entity: String,
        key: String,
    },
    QuarantineRelease {
        entity: String,
        key: String,
    },
    Audit {
        entity: Option<String>,
        key: Option<String>,
        since_micros: Option<i64>,
        limit: Option<usize>,
    },
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Response {
    pub error: Option<String>,
    pub quarantine: Vec<QuarantineEntry>,
    pub audit: Vec<AuditRecord>,
    /// For a release: what happened.
    pub message: Option<String>,
}

pub fn requests_dir(config: &Config) -> PathBuf {
    let mut p = config.state.path.clone().into_os_string();
    p.push(".requests");
    PathBuf::from(p)
}

/// Builds the governor, restores its state and tells the pipeline which rows to capture.
pub fn setup(config: &Config, store: &Store, pipeline: &mut Pipeline) -> anyhow::Result<Governor> {
    let mut governor = Governor::new(config);
    for e in governor.tracked_entities().collect::<Vec<_>>() {
        pipeline.capture_rows(e);
    }
    governor.load(store.load_governance()?);
    prune_audit(config, store);
    Ok(governor)
}

/// Sets `steward_quarantined_records{entity}` from the governor's state, one
/// series per entity so that a release shows as a return to 0.
pub fn publish_quarantine(governor: &Governor) {
    for (entity, n) in governor.quarantine_counts() {
        metrics::gauge!(crate::metrics::QUARANTINED_RECORDS, "entity" => entity.to_string())
            .set(n as f64);
    }
}

pub fn prune_audit(config: &Config, store: &Store) {
    let days = i64::from(config.governance.audit_retention_days);
    let before = chrono::Utc::now().timestamp_micros() - days * 86_400_000_000;
    match store.audit_prune(before) {
        Ok(0) => {}
        Ok(n) => tracing::info!(removed = n, days, "pruned old audit records"),
        Err(e) => tracing::warn!(error = %e, "cannot prune the audit trail"),
    }
}

/// Reads the tables of referenced entities that have no tracked rows yet, so
/// that references to records unchanged since steward started resolve.
pub async fn seed_references(
    config: &Config,
    store: &Store,
    governor: &mut Governor,
) -> anyhow::Result<()> {
    let todo: Vec<usize> = governor
        .referenced_entities()
        .into_iter()
        .filter(|&e| governor.tracked_count(e) == 0)
        .collect();
    if todo.is_empty() {
        return Ok(());
    }
    let sql = wire::connect_sql(&config.source)
        .await
        .with_context(|| format!("cannot connect to the source {}", config.source.url_display))?;
    for e in todo {
        let entity = governor.entity_config(e).clone();
        let filter = governor
            .seed_filter(e)
            .map(|f| format!(" WHERE {f}"))
            .unwrap_or_default();
        let query = format!(
            "SELECT row_to_json(t)::text FROM \"{}\".\"{}\" t{filter}",
            entity.schema, entity.table
        );
        let rows = sql.simple_query(&query).await.with_context(|| {
            format!(
                "cannot read {} for entity '{}' (referenced by another entity)",
                entity.qualified_table(),
                entity.name
            )
        })?;
        let mut parsed = Vec::new();
        for msg in rows {
            if let tokio_postgres::SimpleQueryMessage::Row(r) = msg {
                if let Some(Ok(Value::Object(m))) = r.get(0).map(serde_json::from_str::<Value>) {
                    parsed.push(m);
                }
            }
        }
        tracing::info!(entity = %entity.name, rows = parsed.len(), "read referenced table");
        governor.seed(e, parsed);
    }
    let delta = governor.take_delta();
    tokio::task::block_in_place(|| store.apply_governance(&[], &delta))?;
    Ok(())
}

/// Answers pending request files. Releases produce events and state
/// changes, returned for the committer (`version` is the latest commit LSN).
pub fn handle_requests(
    config: &Config,
    store: &Store,
    governor: &mut Governor,
    version: Lsn,
) -> Vec<(usize, Event)> {
    let dir = requests_dir(config);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut events = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().and_then(|e| e.to_str()) != Some("req") {
            continue;
        }
        let response = match std::fs::read(&path)
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice::<Request>(&b).map_err(|e| e.to_string()))
        {
            Ok(req) => answer(store, governor, version, req, &mut events),
            Err(e) => Response {
                error: Some(format!("unreadable request: {e}")),
                ..Response::default()
            },
        };
        let _ = std::fs::remove_file(&path);
        write_response(&path.with_extension("resp"), &response);
    }
    events
}

fn write_response(path: &Path, response: &Response) {
    let tmp = path.with_extension("resp.tmp");
    let ok = serde_json::to_vec(response)
        .ok()
        .and_then(|b| std::fs::write(&tmp, b).ok())
        .and_then(|_| std::fs::rename(&tmp, path).ok());
    if ok.is_none() {
        tracing::warn!(path = %path.display(), "cannot write a response to an operator request");
    }
}

/// Answers one request against the governor's state (running or stopped daemon).
pub fn answer(
    store: &Store,
    governor: &mut Governor,
    version: Lsn,
    req: Request,
    events: &mut Vec<(usize, Event)>,
) -> Response {
    let mut r = Response::default();
    match req {
        Request::QuarantineList => {
            r.quarantine = governor.quarantined().into_iter().cloned().collect();
        }
        Request::QuarantineShow { entity, key } => {
            match governor
                .quarantined()
                .into_iter()
                .find(|q| q.entity == entity && q.key == key)
            {
                Some(q) => r.quarantine.push(q.clone()),
                None => r.error = Some(format!("{entity} {key} is not quarantined")),
            }
        }
        Request::QuarantineRelease { entity, key } => {
            let time = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
            match governor.release(&entity, &key, version, &time) {
                Ok(done) => {
                    r.message = Some(match &done.still_failing {
                        None => format!(
                            "{entity} {key} released: {} event(s) queued for delivery",
                            done.events.len()
                        ),
                        Some(m) => format!("{entity} {key} still fails and stays quarantined: {m}"),
                    });
                    if done.still_failing.is_some() {
                        r.error = r.message.clone();
                    }
                    events.extend(done.events);
                }
                Err(e) => r.error = Some(e),
            }
        }
        Request::Audit {
            entity,
            key,
            since_micros,
            limit,
        } => match store.audit_query(&AuditFilter {
            entity,
            key,
            since_micros,
            limit,
        }) {
            Ok(list) => r.audit = list,
            Err(e) => r.error = Some(e.to_string()),
        },
    }
    r
}

/// Runs a request on a stopped daemon: opens the state file directly and
/// commits what a release produced.
pub fn answer_offline(config: &Config, store: &Store, req: Request) -> anyhow::Result<Response> {
    let mut pipeline = Pipeline::new(config);
    let mut governor = setup(config, store, &mut pipeline)?;
    let _ = governor.take_delta();
    let version = store.checkpoint()?.unwrap_or(Lsn::ZERO);
    let mut events = Vec::new();
    let response = answer(store, &mut governor, version, req, &mut events);
    let delta: GovDelta = governor.take_delta();
    if !events.is_empty() || !delta.is_empty() {
        let appends: Vec<(&str, &Event)> = events
            .iter()
            .map(|(t, e)| (config.targets[*t].name.as_str(), e))
            .collect();
        store.apply_governance(&appends, &delta)?;
    }
    Ok(response)
}
