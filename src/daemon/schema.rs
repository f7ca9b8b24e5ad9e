//! Schema changes on mapped tables (Odoo module upgrades).
//!
//! A Relation message with new columns just re-binds the pipeline. One
//! that lacks a column an entity maps (or its key) *stops* that entity: its
//! changes produce no events, while every other entity keeps flowing and the
//! LSN keeps being confirmed. So that the skipped changes are not lost, the
//! stop is recorded durably in the store before any of them is skipped, and
//! when the entity maps again — a later Relation message has the column, or
//! the configuration (reloaded or at start-up) maps only columns that exist —
//! steward schedules a re-snapshot of the entity for every target that takes
//! it (the `steward reset --target T --entity E` mechanism).

use serde::{Deserialize, Serialize};

use super::snapshot::{self, SnapshotGate};
use steward_core::config::Config;
use steward_core::model::Relation;
use steward_core::pipeline::{Pipeline, PipelineError};
use steward_store::Store;

/// Meta key: JSON list of [`StoppedEntity`].
const STOPPED_META: &str = "schema.stopped";

/// An entity whose table no longer has a column it maps.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StoppedEntity {
    pub entity: String,
    pub table: String,
    pub column: String,
    pub reason: String,
    pub since: String,
}

/// The stopped entities recorded in the store (for `steward status`).
pub fn stopped(store: &Store) -> Vec<StoppedEntity> {
    store
        .get_meta(STOPPED_META)
        .ok()
        .flatten()
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or_default()
}

fn save(store: &Store, list: &[StoppedEntity]) -> anyhow::Result<()> {
    let text = serde_json::to_string(list)?;
    tokio::task::block_in_place(|| store.set_meta(STOPPED_META, &text))?;
    Ok(())
}

fn set_gauge(entity: &str, stopped: bool) {
    metrics::gauge!(steward_core::metric::ENTITY_STOPPED, "entity" => entity.to_string())
        .set(if stopped { 1.0 } else { 0.0 });
}

/// The operator's fix, shared by the log line and the status.
pub const FIX: &str = "restore the column, or change the entity's mapping in the configuration \
                       and reload (SIGHUP) or restart steward; steward then re-sends the entity \
                       to its targets by a snapshot";

/// Schedules the re-snapshot of a recovered entity; returns the targets.
fn resync(
    config: &Config,
    store: &Store,
    gate: Option<&SnapshotGate>,
    entity: &str,
) -> anyhow::Result<Vec<String>> {
    let entities = [entity.to_string()];
    let mut targets = Vec::new();
    for target in config
        .targets
        .iter()
        .filter(|t| t.entities.iter().any(|e| e == entity))
    {
        tokio::task::block_in_place(|| match gate {
            Some(gate) => snapshot::begin_resync(gate, store, &target.name, &entities),
            None => store
                .begin_resync(&target.name, &entities, true)
                .map(|_| ())
                .map_err(Into::into),
        })?;
        targets.push(target.name.clone());
    }
    Ok(targets)
}

/// The stopped entities of the running daemon.
pub struct SchemaGuard {
    stopped: Vec<StoppedEntity>,
}

impl SchemaGuard {
    pub fn load(config: &Config, store: &Store) -> SchemaGuard {
        let stopped = stopped(store);
        for e in &config.entities {
            set_gauge(&e.name, stopped.iter().any(|s| s.entity == e.name));
        }
        for s in stopped
            .iter()
            .filter(|s| config.entities.iter().any(|e| e.name == s.entity))
        {
            tracing::error!(
                entity = %s.entity, table = %s.table, column = %s.column,
                "entity stopped by a schema change (since {}): {}. Fix: {FIX}",
                s.since, s.reason
            );
        }
        SchemaGuard { stopped }
    }

    /// Binds `relation` in the pipeline, stopping the entities it no longer
    /// fits and recovering the stopped ones it fits again. A stop is durable
    /// before this returns, so before any change it causes to skip.
    pub fn on_relation(
        &mut self,
        config: &Config,
        pipeline: &mut Pipeline,
        relation: &Relation,
        store: &Store,
        gate: &SnapshotGate,
    ) -> anyhow::Result<()> {
        let problems = pipeline.bind_relation(relation);
        let table = relation.qualified_name();
        let mut changed = false;
        for &entity in pipeline.entities_of(&table) {
            let name = pipeline.entity_name(entity).to_string();
            let known = self.stopped.iter().position(|s| s.entity == name);
            if let Some((_, problem)) = problems.iter().find(|(e, _)| *e == entity) {
                let column = match problem {
                    PipelineError::MissingColumn { column, .. } => column.clone(),
                    _ => String::new(),
                };
                tracing::error!(
                    entity = %name, table = %table, column = %column,
                    "entity stopped by a schema change: its changes are not sent to any target \
                     until it maps again; other entities keep flowing. {problem}. Fix: {FIX}"
                );
                set_gauge(&name, true);
                let line = StoppedEntity {
                    entity: name,
                    table: table.clone(),
                    column,
                    reason: problem.to_string(),
                    since: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                };
                match known {
                    Some(i) if self.stopped[i].column == line.column => {}
                    Some(i) => {
                        self.stopped[i] = line;
                        changed = true;
                    }
                    None => {
                        self.stopped.push(line);
                        changed = true;
                    }
                }
            } else if let Some(i) = known {
                // Scheduled before the stop is cleared: a crash in between
                // recovers (and re-snapshots) again, it never forgets.
                let targets = resync(config, store, Some(gate), &name)?;
                tracing::warn!(
                    entity = %name, table = %table, targets = ?targets,
                    "entity maps again after a schema change: resuming it and re-sending it to \
                     its targets by a snapshot (changes skipped while it was stopped)"
                );
                set_gauge(&name, false);
                self.stopped.remove(i);
                changed = true;
            }
        }
        if changed {
            save(store, &self.stopped)?;
        }
        Ok(())
    }
}

/// At start-up (also after a reload): a stopped entity whose configured
/// columns all exist in the table now recovers at once, instead of at the
/// next change of its table. If the stream still holds changes from before
/// the column came back, their Relation message stops it again, and the
/// next one recovers it again: redundant snapshots, never a lost change.
pub async fn recover_at_startup(
    sql: &tokio_postgres::Client,
    config: &Config,
    store: &Store,
) -> anyhow::Result<()> {
    let mut list = stopped(store);
    if list.is_empty() {
        return Ok(());
    }
    let mut changed = false;
    for entity in &config.entities {
        let Some(i) = list.iter().position(|s| s.entity == entity.name) else {
            continue;
        };
        let rows = sql
            .query(
                "SELECT a.attname::text FROM pg_attribute a \
                 JOIN pg_class c ON c.oid = a.attrelid \
                 JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE n.nspname = $1 AND c.relname = $2 AND a.attnum > 0 AND NOT a.attisdropped",
                &[&entity.schema, &entity.table],
            )
            .await?;
        let columns: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
        let missing = entity_columns(entity)
            .into_iter()
            .find(|c| !columns.contains(c));
        if let Some(column) = missing {
            tracing::warn!(
                entity = %entity.name, column = %column,
                "entity still stopped: its table still lacks the column. Fix: {FIX}"
            );
            continue;
        }
        let targets = resync(config, store, None, &entity.name)?;
        tracing::warn!(
            entity = %entity.name, targets = ?targets,
            "entity maps again after a schema change: resuming it and re-sending it to its \
             targets by a snapshot (changes skipped while it was stopped)"
        );
        list.remove(i);
        changed = true;
    }
    if changed {
        save(store, &list)?;
    }
    Ok(())
}

/// Every column an entity reads: key, fields and fallbacks.
pub fn entity_columns(entity: &steward_core::config::EntityConfig) -> Vec<String> {
    let mut out: Vec<String> = entity.key.clone();
    for f in &entity.fields {
        for c in std::iter::once(&f.source.column).chain(f.fallback.as_ref().map(|s| &s.column)) {
            if !out.contains(c) {
                out.push(c.clone());
            }
        }
    }
    out
}
