//! The record view: everything steward knows about one record, for
//! `GET /v1/record/{entity}/{key}`, `steward record` and the console. The
//! governance answers for its in-memory state (the consume loop's
//! [`govern::Request::Record`](super::govern::Request::Record), or the
//! state file on a stopped daemon); this module adds what the state file
//! and the database know: the live source row, each target's appended and
//! acknowledged versions, dead letters and the audit trail.
//!
//! How "acknowledged" is known without a write per event: the `delivered`
//! (or `unpublished`) audit record of each appended event carries its
//! outbox sequence number (the store sets it in the commit that appends
//! it), and each move of a target's acknowledged cursor notes its time
//! (`Store::acknowledged_at`). An event the cursor passed is acknowledged
//! unless it is in the dead-letter queue or the batch window.

use std::time::Duration;

use serde_json::{Map, Value};

use super::api::wire;
use steward_core::config::Config;
use steward_core::model::Lsn;
use steward_core::pipeline::govern::RecordStatus;
use steward_core::pipeline::{snapshot_mapped, Pipeline};
use steward_source::snapshot as source_snapshot;
use steward_store::governance::AuditRecord;
use steward_store::{Acknowledged, DeadLetter, DlqFilter, Store, StoreError};

/// How long the live read of a row may take before the answer falls back
/// on steward's copy.
pub const LIVE_READ_WITHIN: Duration = Duration::from_secs(5);

/// Appended events looked at per target for the last acknowledged one.
const APPENDS_PER_TARGET: usize = 20;

/// Reads the record's row from the source, with a plain (non-replication)
/// connection, only the columns steward maps: `Ok(None)` when the table
/// has no row with that key.
pub async fn live_row(
    config: &Config,
    entity: &str,
    key: &str,
) -> Result<Option<Map<String, Value>>, String> {
    match tokio::time::timeout(LIVE_READ_WITHIN, read_row(config, entity, key)).await {
        Ok(result) => result,
        Err(_) => Err(format!(
            "the source did not answer within {} s",
            LIVE_READ_WITHIN.as_secs()
        )),
    }
}

async fn read_row(
    config: &Config,
    entity: &str,
    key: &str,
) -> Result<Option<Map<String, Value>>, String> {
    let e = config
        .entity_index(entity)
        .ok_or_else(|| format!("entity `{entity}` is not configured"))?;
    let read = mapped_read(config, e);
    let parts = split_key(key);
    if parts.len() != read.key.len() {
        return Ok(None);
    }
    let reader = source_snapshot::open_plain(&config.source)
        .await
        .map_err(|e| format!("cannot connect to the source: {e}"))?;
    let relation = reader.relation(&read, 1).await.map_err(|e| e.to_string())?;
    let Some(row) = reader
        .read_row(&read, &relation, &parts)
        .await
        .map_err(|e| e.to_string())?
    else {
        return Ok(None);
    };
    let mut pipeline = Pipeline::new(config);
    pipeline.capture_rows(e);
    if let Some((_, problem)) = pipeline
        .bind_relation(&relation)
        .into_iter()
        .find(|(x, _)| *x == e)
    {
        return Err(problem.to_string());
    }
    let time = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    let mapped = snapshot_mapped(&pipeline, relation.id, e, row, Lsn::ZERO, &time)
        .map_err(|e| e.to_string())?;
    Ok(mapped.and_then(|m| m.row().cloned()))
}

/// The columns steward maps from the entity's table: those of its fields
/// (and its table's other entities', as the snapshot reads them) and of
/// its reference fields.
fn mapped_read(
    config: &Config,
    e: steward_core::config::EntityIndex,
) -> source_snapshot::TableRead {
    let mut read = super::snapshot::table_read(config, e);
    if let Some(gov) = config.governance.entities.get(e.0) {
        for column in gov.reference_columns() {
            if !read.columns.iter().any(|c| c == column) {
                read.columns.push(column.to_string());
            }
        }
    }
    read
}

/// A record key's column texts: `|` joins them, `\` escapes `|` and `\`.
pub fn split_key(key: &str) -> Vec<String> {
    let mut parts = Vec::new();
    let mut part = String::new();
    let mut chars = key.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => part.extend(chars.next()),
            '|' => parts.push(std::mem::take(&mut part)),
            c => part.push(c),
        }
    }
    parts.push(part);
    parts
}

/// The record view from the governance's `status`, the state file and the
/// live read's outcome (`None`: not tried).
pub fn assemble(
    config: &Config,
    store: &Store,
    status: RecordStatus,
    live: Option<Result<Option<Map<String, Value>>, String>>,
) -> Result<wire::Record, StoreError> {
    let targets: Vec<String> = status.targets.iter().map(|t| t.target.clone()).collect();
    let (audit, audit_more, appends) = history(store, &status.entity, &status.key, &targets)?;
    let mut delivery = Vec::with_capacity(targets.len());
    for (target, appended) in targets.iter().zip(appends) {
        let filter = DlqFilter {
            entity: Some(status.entity.clone()),
            key: Some(status.key.clone()),
            id: None,
        };
        let dead = store.dead_letters(target, &filter)?;
        let windowed = store
            .windowed_event(target, &status.entity, &status.key)?
            .map(|e| e.version);
        let mut lines = Vec::with_capacity(appended.len());
        for record in appended {
            lines.push(appended_line(store, target, record, &dead, windowed)?);
        }
        let last_acknowledged = lines
            .iter()
            .find(|a| a.state == wire::DeliveryState::Acknowledged)
            .cloned();
        delivery.push(wire::TargetDelivery {
            target: target.clone(),
            last_appended: lines.into_iter().next(),
            last_acknowledged,
            dead_letters: dead.iter().map(dead_letter_line).collect(),
        });
    }
    let source = source_row(config, &status, live);
    let known = status.state.is_some()
        || status.quarantine.is_some()
        || status
            .targets
            .iter()
            .any(|t| t.decision != steward_core::pipeline::govern::TargetDecision::Undecided)
        || !audit.is_empty()
        || delivery.iter().any(|d| !d.dead_letters.is_empty());
    let note = if !known {
        Some(format!(
            "steward knows nothing of {} {}: no row, decision, quarantine entry, dead letter or \
             audit record (the key may not exist, or the record has not changed since steward \
             started and its entity's rows are not tracked)",
            status.entity, status.key
        ))
    } else if status.row.is_none() && status.state.is_none() {
        Some(format!(
            "steward holds no row of {} {} (deleted, or its entity's rows are not tracked): the \
             targets' documents are not shown",
            status.entity, status.key
        ))
    } else {
        None
    };
    Ok(wire::Record {
        status,
        known,
        note,
        source,
        delivery,
        audit,
        audit_more,
    })
}

/// The record's audit trail, newest first (at most `Record::AUDIT_SHOWN`),
/// whether there is more, and per target its last appending decisions
/// (newest first, at most `APPENDS_PER_TARGET`), in one backward read.
#[allow(clippy::type_complexity)]
fn history(
    store: &Store,
    entity: &str,
    key: &str,
    targets: &[String],
) -> Result<(Vec<AuditRecord>, bool, Vec<Vec<AuditRecord>>), StoreError> {
    let mut audit = Vec::new();
    let mut more = false;
    let mut appends: Vec<Vec<AuditRecord>> = vec![Vec::new(); targets.len()];
    store.audit_of_record(entity, key, &mut |r| {
        if matches!(r.decision.as_str(), "delivered" | "unpublished") {
            if let Some(i) = targets.iter().position(|t| Some(t) == r.target.as_ref()) {
                if appends[i].len() < APPENDS_PER_TARGET {
                    appends[i].push(r.clone());
                }
            }
        }
        if audit.len() < wire::Record::AUDIT_SHOWN {
            audit.push(r);
        } else {
            more = true;
        }
        // Once the history is full, only targets without any append yet
        // are worth reading further for.
        !(more && appends.iter().all(|a| !a.is_empty()))
    })?;
    Ok((audit, more, appends))
}

fn appended_line(
    store: &Store,
    target: &str,
    record: AuditRecord,
    dead: &[DeadLetter],
    windowed: Option<u64>,
) -> Result<wire::Appended, StoreError> {
    let rfc3339 = |micros: i64| {
        chrono::DateTime::from_timestamp_micros(micros)
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
    };
    let mut line = wire::Appended {
        version: record.version,
        decision: record.decision,
        detail: record.detail,
        appended_at: rfc3339(record.time_micros).unwrap_or_default(),
        seq: record.seq,
        state: wire::DeliveryState::Unknown,
        acknowledged_at: None,
        acknowledged_before: None,
    };
    let Some(seq) = record.seq else {
        return Ok(line);
    };
    line.state = if dead.iter().any(|d| d.event.version == record.version) {
        wire::DeliveryState::DeadLettered
    } else if windowed == Some(record.version) {
        wire::DeliveryState::InWindow
    } else {
        match store.acknowledged_at(target, seq)? {
            Acknowledged::No { .. } => wire::DeliveryState::Pending,
            Acknowledged::At(at) => {
                line.acknowledged_at = rfc3339(at);
                wire::DeliveryState::Acknowledged
            }
            Acknowledged::Before(at) => {
                line.acknowledged_before = at.and_then(rfc3339);
                wire::DeliveryState::Acknowledged
            }
            Acknowledged::Superseded => wire::DeliveryState::Superseded,
        }
    };
    Ok(line)
}

fn dead_letter_line(d: &DeadLetter) -> wire::DeadLetterLine {
    wire::DeadLetterLine {
        id: d.id,
        version: d.event.version,
        error: d.error.clone(),
        held_behind: d.held_behind,
        attempts: d.attempts,
        last_failure: d.last_failure.clone(),
    }
}

/// The source row: live when read, else steward's copy, mapped columns only.
fn source_row(
    config: &Config,
    status: &RecordStatus,
    live: Option<Result<Option<Map<String, Value>>, String>>,
) -> wire::SourceRow {
    let mapped_columns = config
        .entity_index(&status.entity)
        .map(|e| mapped_read(config, e).columns)
        .unwrap_or_default();
    let last_read = status.row.as_ref().and_then(Value::as_object).map(|row| {
        row.iter()
            .filter(|(c, _)| mapped_columns.contains(c))
            .map(|(c, v)| (c.clone(), v.clone()))
            .collect::<Map<String, Value>>()
    });
    match live {
        Some(Ok(Some(row))) => {
            let differs = last_read.as_ref().map(|old| {
                row.iter()
                    .filter(|(c, v)| old.get(c.as_str()) != Some(v))
                    .map(|(c, _)| c.clone())
                    .collect()
            });
            wire::SourceRow {
                origin: wire::RowOrigin::Live,
                row: Some(Value::Object(row)),
                live_error: None,
                differs_from_last_read: differs,
            }
        }
        Some(Ok(None)) => wire::SourceRow {
            origin: wire::RowOrigin::None,
            row: None,
            live_error: None,
            differs_from_last_read: None,
        },
        Some(Err(e)) => wire::SourceRow {
            origin: if last_read.is_some() {
                wire::RowOrigin::LastRead
            } else {
                wire::RowOrigin::None
            },
            row: last_read.map(Value::Object),
            live_error: Some(e),
            differs_from_last_read: None,
        },
        None => wire::SourceRow {
            origin: if last_read.is_some() {
                wire::RowOrigin::LastRead
            } else {
                wire::RowOrigin::None
            },
            row: last_read.map(Value::Object),
            live_error: None,
            differs_from_last_read: None,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_split_into_their_column_texts() {
        assert_eq!(split_key("42"), ["42"]);
        assert_eq!(split_key("7|a"), ["7", "a"]);
        assert_eq!(split_key(r"a\|b|c\\"), ["a|b", r"c\"]);
    }
}
