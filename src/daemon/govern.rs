//! Governance around the consume loop: start-up (state load, first read of
//! referenced tables), audit pruning, and quarantine requests: the control
//! API hands them to the consume loop, which owns the governance state, as
//! [`GovCall`]s; a stopped daemon's command line answers them itself
//! ([`answer_offline`]).

use std::path::Path;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use steward_core::config::{Config, EntityIndex, TargetIndex};
use steward_core::model::{Event, Lsn};
use steward_core::pipeline::govern::{EntityRecords, HeldBack, RecordState, RecordStatus};
use steward_core::pipeline::{snapshot_mapped, Governance, Pipeline};
use steward_source::snapshot as source_snapshot;
use steward_store::audit::AuditFilter;
use steward_store::backup::BackupReport;
use steward_store::governance::{AuditRecord, GovDelta, GovOp, QuarantineEntry};
use steward_store::{GovernanceState, Store};

/// A quarantine request for the consume loop, from the control API.
pub struct GovCall {
    /// Only quarantine requests come this way (the API reads the audit
    /// trail and takes backups itself).
    pub request: Request,
    /// Who acts (a release); recorded with the audit records the action
    /// produces. `None` for a question.
    pub actor: Option<Actor>,
    pub reply: tokio::sync::oneshot::Sender<Response>,
}

/// The person behind an action, for the audit trail.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Actor {
    /// The Unix user name (or `uid N` when the user has no name).
    pub user: String,
    pub comment: Option<String>,
}

impl Actor {
    /// The user running this process (the command line on a stopped daemon).
    pub fn current(comment: Option<String>) -> Actor {
        Actor {
            user: user_name(nix::unistd::getuid().as_raw()),
            comment,
        }
    }

    /// An audit record of this actor's action.
    pub fn record(
        &self,
        entity: &str,
        key: &str,
        target: Option<&str>,
        decision: &str,
        detail: String,
    ) -> AuditRecord {
        AuditRecord {
            time_micros: chrono::Utc::now().timestamp_micros(),
            entity: entity.to_string(),
            key: key.to_string(),
            version: 0,
            target: target.map(str::to_string),
            decision: decision.to_string(),
            detail,
            user: Some(self.user.clone()),
            comment: self.comment.clone(),
            seq: None,
        }
    }

    /// Names this actor on every audit record of `delta`: the decisions a
    /// release produced are the person's doing. When the release produced
    /// none (it still fails without a new decision), the attempt itself is
    /// recorded.
    pub fn stamp_release(
        &self,
        delta: &mut GovDelta,
        entity: &str,
        key: &str,
        version: Lsn,
        outcome: &str,
    ) {
        let mut any = false;
        for op in &mut delta.ops {
            if let GovOp::Audit(record) = op {
                record.user = Some(self.user.clone());
                record.comment.clone_from(&self.comment);
                any = true;
            }
        }
        if !any {
            let mut record = self.record(entity, key, None, "release_refused", outcome.to_string());
            record.version = version.0;
            delta.ops.push(GovOp::Audit(record));
        }
    }
}

/// The name of Unix user `uid`, or `uid N` when it has none.
pub fn user_name(uid: u32) -> String {
    match nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)) {
        Ok(Some(user)) => user.name,
        _ => format!("uid {uid}"),
    }
}

#[derive(Clone, Debug)]
pub enum Request {
    QuarantineList {
        /// `entity key`: only the records held back by that record.
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
    Audit(AuditFilter),
    /// Per entity the records in each state, and what the open exceptions
    /// hold back (the console's overview).
    Overview,
    /// The keys of `entity`'s records in `state`, at most `limit`.
    RecordsInState {
        entity: String,
        state: RecordState,
        limit: usize,
    },
    /// Dead letters of these (entity, key) records were dropped from
    /// `target`: what it was sent is unknown (see
    /// `Governance::forget_sent`).
    ForgetSent {
        target: String,
        records: Vec<(String, String)>,
    },
    /// What the governance knows of one record (the record view).
    Record {
        entity: String,
        key: String,
    },
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Response {
    pub error: Option<String>,
    pub quarantine: Vec<QuarantineEntry>,
    pub audit: Vec<AuditRecord>,
    /// For a release: what happened.
    pub message: Option<String>,
    /// For a release: how many events it queued for delivery.
    #[serde(skip)]
    pub events: usize,
    /// For an overview: per entity, its records in each state.
    pub counts: Vec<EntityRecords>,
    /// For an overview: what the open exceptions hold back.
    pub held_back: Vec<HeldBack>,
    /// For records in a state: their keys, and how many there are in all.
    pub keys: Vec<String>,
    pub total: u64,
    /// For a record question: the governance's answer.
    #[serde(skip)]
    pub record: Option<Box<RecordStatus>>,
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
    // Tracked rows, business keys and references are read from the store
    // as needed, not loaded.
    let columns = governance.ref_columns();
    let started = std::time::Instant::now();
    if let Some(entries) =
        store.ensure_ref_index(&columns, &|entity, row| governance.ref_entries(entity, row))?
    {
        tracing::info!(
            entries,
            seconds = format!("{:.1}", started.elapsed().as_secs_f64()),
            "indexed the references of the tracked rows"
        );
    }
    governance.set_state_reader(store.state_reader());
    // Saved when steward last stopped, if nothing changed since: then only
    // the rows the governance indexes are read, not every tracked row.
    let summarised = match store.governance_summary()? {
        Some(summary) => governance.restore_summary(&summary),
        None => false,
    };
    store.load_governance_into(&mut governance)?;
    governance.finish_load();
    tracing::debug!(
        summarised,
        seconds = format!("{:.2}", started.elapsed().as_secs_f64()),
        "governance state loaded"
    );
    prune_audit(config, store);
    Ok(governance)
}

/// Saves the governance's counts for the next start (see
/// [`Governance::summary`]); a failure only makes that start slower.
pub fn save_summary(store: &Store, governance: &Governance) {
    if let Err(e) = store.save_governance_summary(&governance.summary()) {
        tracing::warn!(error = %e, "cannot save the governance summary; the next start counts the records again");
    }
}

/// Sets `steward_quarantined_records{entity}` from the governance state, one
/// series per entity so that a release shows as a return to 0.
pub fn publish_quarantine(governance: &Governance) {
    for (entity, n) in governance.quarantine_counts() {
        metrics::gauge!(steward_core::metric::QUARANTINED_RECORDS, "entity" => entity.to_string())
            .set(n as f64);
    }
}

/// Sets every gauge of the governance state (quarantined records and
/// record states) from scratch, as after a (re)load.
pub fn publish_gauges(governance: &Governance) {
    publish_quarantine(governance);
    publish_records(governance);
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
                seed_entity(config, store, &reader, governance, e, &time, keys).await
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
        if let Some(error) = governance.state_error() {
            anyhow::bail!("{error}");
        }
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

/// Reads a table in key order, a chunk at a time, into the governance,
/// committing each chunk's state (the rows live in the store, not in memory).
async fn seed_entity(
    config: &Config,
    store: &Store,
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
    let chunk = super::snapshot::chunk_rows(1, read.columns.len());
    let fetch = |after: Option<Vec<String>>| {
        let (read, relation) = (&read, &relation);
        async move {
            reader
                .read_chunk(read, relation, after.as_deref(), chunk)
                .await
        }
    };
    let mut total = 0;
    let mut rows = fetch(None).await?;
    while let Some(last) = rows.last() {
        let last_key: Vec<String> = key_positions
            .iter()
            .map(|&i| last.get(i).cloned().flatten().unwrap_or_default())
            .collect();
        let more = rows.len() >= chunk;
        // The server reads the next chunk while this one is mapped,
        // governed and written (first in the join: its query goes out
        // before the mapping takes the thread).
        let next = async {
            if more {
                fetch(Some(last_key)).await.map(Some)
            } else {
                Ok(None)
            }
        };
        let this = async {
            let read = rows.len();
            let mut mapped = Vec::with_capacity(read);
            for row in rows {
                if let Some(m) = snapshot_mapped(&pipeline, relation.id, e, row, Lsn::ZERO, time)? {
                    if let Some(keys) = present.as_deref_mut() {
                        keys.insert(m.event.key.clone());
                    }
                    mapped.push(m);
                }
            }
            governance.seed_mapped(&mut mapped, time);
            let delta = governance.take_delta();
            if let Some(error) = governance.state_error() {
                anyhow::bail!("{error}");
            }
            let store = store.clone();
            tokio::task::spawn_blocking(move || store.apply_governance(&[], &delta)).await??;
            // The chunk's rows are in the store now: let go of them.
            governance.release_buffers();
            anyhow::Ok(read)
        };
        let (next, this) = tokio::join!(next, this);
        total += this?;
        match next? {
            Some(next) => rows = next,
            None => break,
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

/// Runs a backup and logs its outcome.
pub fn backup(store: &Store, dest: &Path, force: bool) -> anyhow::Result<BackupReport> {
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
            Ok(report)
        }
        Err(e) => {
            tracing::warn!(path = %dest.display(), error = %format!("{e:#}"), "backup of the state file failed");
            Err(e)
        }
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
                    r.events = done.events.len();
                    events.extend(done.events);
                }
                Err(e) => r.error = Some(e),
            }
        }
        Request::ForgetSent { target, records } => {
            r.events = governance.forget_sent(&target, &records);
        }
        Request::Audit(filter) => match store.audit_query(&filter) {
            Ok(list) => r.audit = list,
            Err(e) => r.error = Some(e.to_string()),
        },
        Request::Overview => {
            r.counts = governance.record_counts();
            r.held_back = governance.held_back();
        }
        Request::RecordsInState {
            entity,
            state,
            limit,
        } => match governance.records_in_state(&entity, state, limit) {
            Ok((keys, total)) => (r.keys, r.total) = (keys, total),
            Err(e) => r.error = Some(e),
        },
        Request::Record { entity, key } => match governance.record_status(&entity, &key) {
            Ok(status) => r.record = Some(Box::new(status)),
            Err(e) => r.error = Some(e),
        },
    }
    r
}

/// Runs a request on a stopped daemon: opens the state file directly and
/// commits what a release produced, in the name of this process's user
/// (with `comment`).
pub fn answer_offline(
    config: &Config,
    store: &Store,
    req: Request,
    comment: Option<String>,
) -> anyhow::Result<Response> {
    let mut pipeline = Pipeline::new(config);
    let mut governance = setup(config, store, &mut pipeline)?;
    let _ = governance.take_delta();
    let version = store.checkpoint()?.unwrap_or(Lsn::ZERO);
    let mut events = Vec::new();
    let release = match &req {
        Request::QuarantineRelease { entity, key } => Some((entity.clone(), key.clone())),
        _ => None,
    };
    let response = answer(store, &mut governance, version, req, &mut events);
    let mut delta: GovDelta = governance.take_delta();
    if let Some(error) = governance.state_error() {
        anyhow::bail!("{error}");
    }
    if let (Some((entity, key)), Some(_)) = (release, &response.message) {
        let outcome = response.error.clone().unwrap_or_default();
        Actor::current(comment).stamp_release(&mut delta, &entity, &key, version, &outcome);
    }
    if !events.is_empty() || !delta.is_empty() {
        let appends: Vec<(&str, &Event)> = events
            .iter()
            .map(|(t, e)| (config.targets[*t].name.as_str(), e))
            .collect();
        store.apply_governance(&appends, &delta)?;
    }
    Ok(response)
}
