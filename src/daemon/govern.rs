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

use steward_core::config::{Config, EntityIndex, TargetIndex};
use steward_core::model::{Event, Lsn};
use steward_core::pipeline::govern::RecordState;
use steward_core::pipeline::{snapshot_mapped, Governance, Pipeline};
use steward_source::snapshot as source_snapshot;
use steward_store::audit::AuditFilter;
use steward_store::backup::BackupReport;
use steward_store::governance::{AuditRecord, GovDelta, QuarantineEntry};
use steward_store::Store;

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    QuarantineList {
        /// `entity key`: only the records held back by that record.
        #[serde(default)]
        blocked_by: Option<String>,
    },
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
    /// `steward backup`: a consistent copy of the state file at `dest` (absolute).
    Backup {
        dest: PathBuf,
        #[serde(default)]
        force: bool,
    },
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Response {
    pub error: Option<String>,
    pub quarantine: Vec<QuarantineEntry>,
    pub audit: Vec<AuditRecord>,
    /// For a release: what happened.
    pub message: Option<String>,
    #[serde(default)]
    pub backup: Option<BackupReport>,
}

pub fn requests_dir(config: &Config) -> PathBuf {
    let mut p = config.state.path.clone().into_os_string();
    p.push(".requests");
    PathBuf::from(p)
}

/// Builds the governance, restores its state and tells the pipeline which rows to capture.
pub fn setup(
    config: &Config,
    store: &Store,
    pipeline: &mut Pipeline,
) -> anyhow::Result<Governance> {
    let mut governance = Governance::new(config);
    for e in governance.tracked_entities().collect::<Vec<_>>() {
        pipeline.capture_rows(e);
    }
    governance.load(store.load_governance()?);
    prune_audit(config, store);
    Ok(governance)
}

/// Sets `steward_quarantined_records{entity}` from the governance state, one
/// series per entity so that a release shows as a return to 0.
pub fn publish_quarantine(governance: &Governance) {
    for (entity, n) in governance.quarantine_counts() {
        metrics::gauge!(steward_core::metric::QUARANTINED_RECORDS, "entity" => entity.to_string())
            .set(n as f64);
    }
}

/// Sets `steward_records{entity,state}` for the governance states
/// (published, pending_approval, quarantined, blocked) of every counted
/// entity, zeros included; `dead_lettered` comes from the store (see
/// [`publish_dead_lettered`]).
pub fn publish_records(governance: &Governance) {
    for counts in governance.record_counts() {
        for state in RecordState::ALL {
            metrics::gauge!(
                steward_core::metric::RECORDS,
                "entity" => counts.entity.clone(),
                "state" => state.as_str()
            )
            .set(counts.count(state) as f64);
        }
    }
}

/// Sets `steward_records{entity,state="dead_lettered"}`: per entity a target
/// takes, the records with at least one dead letter at some target. Reads
/// only the dead-lettered keys of each target.
pub fn publish_dead_lettered(config: &Config, store: &Store) {
    let mut keys = std::collections::HashSet::new();
    for target in &config.targets {
        match store.held_keys(&target.name) {
            Ok(held) => keys.extend(held),
            // Published again at the next poll; a stale value beats a wrong 0.
            Err(_) => return,
        }
    }
    let mut counts: std::collections::HashMap<&str, u64> = std::collections::HashMap::new();
    for key in &keys {
        if let Some((entity, _)) = key.split_once('\0') {
            *counts.entry(entity).or_default() += 1;
        }
    }
    for entity in config.entities.iter().filter(|e| {
        config
            .targets
            .iter()
            .any(|t| t.entities.iter().any(|n| n == &e.name))
    }) {
        let n = counts.get(entity.name.as_str()).copied().unwrap_or(0);
        metrics::gauge!(
            steward_core::metric::RECORDS,
            "entity" => entity.name.clone(),
            "state" => "dead_lettered"
        )
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

/// Meta key prefix: the entity's state was read from its table once.
const SEEDED_META: &str = "gov.seeded:";

/// Reads, once, the tables of the entities whose rows the governance tracks
/// (governed entities, child tables of business objects, referenced
/// entities, external ids), so that steward's state covers records that
/// existed before it started: a business object is complete from its first
/// event, a reference to a record unchanged since resolves, and a business
/// key already held by an old record is known. Nothing is sent: each target
/// learns records from its own initial snapshot or from the stream. Values
/// are read as text and converted like streamed ones.
pub async fn seed_state(
    config: &Config,
    store: &Store,
    governance: &mut Governance,
) -> anyhow::Result<()> {
    // After a restored backup every tracked table is read again and records
    // gone from it are governed as deleted (see `daemon::setup`).
    let repair = store
        .get_meta(crate::daemon::setup::RESTORE_REPAIR_META)?
        .and_then(|v| v.parse::<u64>().ok())
        .map(Lsn);
    let mut todo = Vec::new();
    for e in governance.seed_order() {
        let name = &governance.entity_config(e).name;
        if repair.is_some()
            || store.get_meta(&format!("{SEEDED_META}{name}"))?.as_deref() != Some("1")
        {
            todo.push(e);
        }
    }
    if todo.is_empty() {
        return Ok(());
    }
    let reader = source_snapshot::open_plain(&config.source)
        .await
        .with_context(|| format!("cannot connect to the source {}", config.source.url_display))?;
    let time = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    let mut complete = true;
    for e in todo {
        let entity = governance.entity_config(e).clone();
        let context = || {
            format!(
                "cannot read {} for entity '{}' (steward's governance state)",
                entity.qualified_table(),
                entity.name
            )
        };
        let mut present = std::collections::HashSet::new();
        let prune = repair.is_some() && governance.seed_filter(e).is_none();
        let read = match governance.seed_filter(e) {
            Some(filter) => seed_filtered(config, governance, e, &filter).await,
            None => {
                let keys = prune.then_some(&mut present);
                seed_entity(config, &reader, governance, e, &time, keys).await
            }
        };
        let rows = match read.with_context(context) {
            Ok(rows) => rows,
            Err(error) => {
                // The entity's own mapping problem (a column gone) stops only
                // it; the read is tried again at the next start.
                tracing::error!(error = %format!("{error:#}"), "cannot read a table into steward's governance state; records of it that steward has not seen change are unknown to governance until the next start");
                let _ = governance.take_delta();
                complete = false;
                continue;
            }
        };
        let mut events = Vec::new();
        if let (true, Some(version)) = (prune, repair) {
            let (deletes, gone) = governance.prune_absent(e, &present, version, &time);
            if gone > 0 {
                tracing::warn!(
                    entity = %entity.name,
                    records = gone,
                    deletes = deletes.len(),
                    "records in the restored state file no longer exist in the database: governed as deleted"
                );
            }
            events = deletes;
        }
        let delta = governance.take_delta();
        let appends: Vec<(&str, &Event)> = events
            .iter()
            .map(|(t, ev)| (config.targets[*t].name.as_str(), ev))
            .collect();
        tokio::task::block_in_place(|| store.apply_governance(&appends, &delta))?;
        store.set_meta(&format!("{SEEDED_META}{}", entity.name), "1")?;
        tracing::info!(entity = %entity.name, rows, "read the table into steward's governance state");
    }
    if repair.is_some() && complete {
        store.set_meta(crate::daemon::setup::RESTORE_REPAIR_META, "")?;
        tracing::info!(
            "the governance state of the restored state file matches the database again"
        );
    }
    Ok(())
}

/// Reads a table in key order, a chunk at a time, into the governance.
async fn seed_entity(
    config: &Config,
    reader: &source_snapshot::SnapshotReader,
    governance: &mut Governance,
    e: EntityIndex,
    time: &str,
    mut present: Option<&mut std::collections::HashSet<String>>,
) -> anyhow::Result<usize> {
    let mut read = super::snapshot::table_read(config, e);
    let entity = governance.entity_config(e).clone();
    for column in reader.all_columns(&entity.schema, &entity.table).await? {
        if !read.columns.contains(&column) {
            read.columns.push(column);
        }
    }
    let relation = reader.relation(&read, 1).await?;
    let mut pipeline = Pipeline::new(config);
    pipeline.capture_rows(e);
    if let Some((_, problem)) = pipeline
        .bind_relation(&relation)
        .into_iter()
        .find(|(x, _)| *x == e)
    {
        return Err(problem.into());
    }
    let key_positions: Vec<usize> = entity
        .key
        .iter()
        .filter_map(|k| relation.columns.iter().position(|c| &c.name == k))
        .collect();
    let chunk = super::snapshot::CHUNK_ROWS;
    let mut last_key: Option<Vec<String>> = None;
    let mut total = 0;
    loop {
        let rows = reader
            .read_chunk(&read, &relation, last_key.as_deref(), chunk)
            .await?;
        let Some(last) = rows.last() else {
            break;
        };
        last_key = Some(
            key_positions
                .iter()
                .map(|&i| last.get(i).cloned().flatten().unwrap_or_default())
                .collect(),
        );
        let mut mapped = Vec::with_capacity(rows.len());
        for row in &rows {
            if let Some(m) = snapshot_mapped(&pipeline, relation.id, e, row, Lsn::ZERO, time)? {
                if let Some(keys) = present.as_deref_mut() {
                    keys.insert(m.event.key.clone());
                }
                mapped.push(m);
            }
        }
        governance.seed_mapped(&mut mapped, time);
        total += rows.len();
        if rows.len() < chunk {
            break;
        }
    }
    Ok(total)
}

/// `ir_model_data`: only the rows of the models references name.
async fn seed_filtered(
    config: &Config,
    governance: &mut Governance,
    e: EntityIndex,
    filter: &str,
) -> anyhow::Result<usize> {
    let entity = governance.entity_config(e).clone();
    let sql = steward_postgres::connect_sql(&config.source).await?;
    let query = format!(
        "SELECT row_to_json(t)::text FROM \"{}\".\"{}\" t WHERE {filter}",
        entity.schema, entity.table
    );
    let mut parsed = Vec::new();
    for msg in sql.simple_query(&query).await? {
        if let tokio_postgres::SimpleQueryMessage::Row(r) = msg {
            if let Some(Ok(Value::Object(m))) = r.get(0).map(serde_json::from_str::<Value>) {
                parsed.push(m);
            }
        }
    }
    let n = parsed.len();
    governance.seed(e, parsed);
    Ok(n)
}

/// Answers pending request files. Releases produce events and state
/// changes, returned for the committer (`version` is the latest commit LSN).
pub fn handle_requests(
    config: &Config,
    store: &Store,
    governance: &mut Governance,
    version: Lsn,
) -> Vec<(TargetIndex, Event)> {
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
            Ok(Request::Backup { dest, force }) => {
                // Taken at once (the command line then waits as long as the
                // copy takes); copied on a thread of its own so that the loop
                // waits only where it needs the state file during the copy.
                let _ = std::fs::remove_file(&path);
                let store = store.clone();
                let resp = path.with_extension("resp");
                let spawned = std::thread::Builder::new()
                    .name("steward-backup".into())
                    .spawn(move || write_response(&resp, &backup(&store, &dest, force)));
                if let Err(e) = spawned {
                    write_response(
                        &path.with_extension("resp"),
                        &Response {
                            error: Some(format!("cannot start the backup: {e}")),
                            ..Response::default()
                        },
                    );
                }
                continue;
            }
            Ok(req) => answer(store, governance, version, req, &mut events),
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

/// Runs a backup and logs its outcome.
pub fn backup(store: &Store, dest: &Path, force: bool) -> Response {
    let started = std::time::Instant::now();
    match store.backup_to(dest, force) {
        Ok(report) => {
            tracing::info!(
                path = %report.path.display(),
                bytes = report.bytes,
                checkpoint = report.checkpoint.as_deref().unwrap_or("none"),
                seconds = format!("{:.1}", started.elapsed().as_secs_f64()),
                "backup of the state file written"
            );
            Response {
                backup: Some(report),
                ..Response::default()
            }
        }
        Err(e) => {
            let error = format!("{e:#}");
            tracing::warn!(path = %dest.display(), error = %error, "backup of the state file failed");
            Response {
                error: Some(error),
                ..Response::default()
            }
        }
    }
}

fn write_response(path: &Path, response: &Response) {
    let tmp = path.with_extension("resp.tmp");
    let ok = serde_json::to_vec(response)
        .ok()
        .and_then(|b| steward_store::files::write_atomically(&tmp, path, &b).ok());
    if ok.is_none() {
        tracing::warn!(path = %path.display(), "cannot write a response to an operator request");
    }
}

/// Answers one request against the governance state (running or stopped daemon).
pub fn answer(
    store: &Store,
    governance: &mut Governance,
    version: Lsn,
    req: Request,
    events: &mut Vec<(TargetIndex, Event)>,
) -> Response {
    let mut r = Response::default();
    match req {
        Request::QuarantineList { blocked_by } => {
            r.quarantine = governance
                .quarantined()
                .into_iter()
                .filter(|q| blocked_by.is_none() || q.blocked_by == blocked_by)
                .cloned()
                .collect();
        }
        Request::QuarantineShow { entity, key } => {
            match governance
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
            match governance.release(&entity, &key, version, &time) {
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
        Request::Backup { dest, force } => r = backup(store, &dest, force),
    }
    r
}

/// Runs a request on a stopped daemon: opens the state file directly and
/// commits what a release produced.
pub fn answer_offline(config: &Config, store: &Store, req: Request) -> anyhow::Result<Response> {
    let mut pipeline = Pipeline::new(config);
    let mut governance = setup(config, store, &mut pipeline)?;
    let _ = governance.take_delta();
    let version = store.checkpoint()?.unwrap_or(Lsn::ZERO);
    let mut events = Vec::new();
    let response = answer(store, &mut governance, version, req, &mut events);
    let delta: GovDelta = governance.take_delta();
    if !events.is_empty() || !delta.is_empty() {
        let appends: Vec<(&str, &Event)> = events
            .iter()
            .map(|(t, e)| (config.targets[*t].name.as_str(), e))
            .collect();
        store.apply_governance(&appends, &delta)?;
    }
    Ok(response)
}
