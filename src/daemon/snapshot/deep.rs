//! A deep reconciliation's reads of its target (`steward reconcile
//! --deep`, PostgreSQL targets): the target's rows for each chunk of
//! source rows, and a sweep of the target's table for rows whose keys the
//! source does not have. The governance decides against those rows (see
//! `steward_core::pipeline::target_rows`); nothing here makes documents.
//!
//! Before comparing, the job waits until the target has taken what was
//! queued for it up to the snapshot's consistent point: a row the outbox
//! still holds an event for would otherwise look changed.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use steward_core::config::{Config, TargetIndex};
use steward_core::model::{split_key, Lsn};
use steward_core::pipeline::absent_mapped;
use steward_core::pipeline::target_rows::ActualRows;
use steward_sinks::TargetReader;
use steward_source::snapshot::SnapshotReader;
use steward_store::{ReconcileCounts, SnapshotJob};

use super::{block, ChunkKind, SnapshotChunk, Sweep, Worker, SWEEP_BATCH};

/// The longest a deep job waits for its target to take its backlog
/// before comparing anyway (rows with an event still queued then count as
/// changed, and are sent again: redundant, never wrong).
const BACKLOG_WAIT: Duration = Duration::from_secs(60);

/// The target reader of a deep job.
pub(super) struct DeepRead {
    reader: TargetReader,
    pub(super) target: TargetIndex,
    entity: String,
}

impl DeepRead {
    /// The reader for `job` if it is a deep reconciliation.
    pub(super) fn open(
        config: &Config,
        job: &SnapshotJob,
        target: TargetIndex,
    ) -> anyhow::Result<Option<DeepRead>> {
        if !(job.reconcile && job.deep) {
            return Ok(None);
        }
        let reader = steward_sinks::target_reader(&config.targets[target], config)
            .map_err(|e| anyhow::anyhow!(e))?;
        Ok(Some(DeepRead {
            reader,
            target,
            entity: job.entity.clone(),
        }))
    }

    /// What the target holds for `keys`.
    pub(super) async fn actual<'a>(
        &mut self,
        keys: impl Iterator<Item = &'a str>,
    ) -> anyhow::Result<Arc<ActualRows>> {
        let keys: Vec<String> = keys.map(str::to_string).collect();
        let rows = self
            .reader
            .rows(&self.entity, &keys)
            .await
            .map_err(|e| anyhow::anyhow!(e))?;
        Ok(Arc::new(ActualRows {
            target: self.target,
            rows,
        }))
    }
}

impl Worker {
    /// Waits (at most [`BACKLOG_WAIT`]) until `job`'s target has taken
    /// every event queued for it once the stream passed `consistent`.
    /// `Ok(false)` when shutting down.
    pub(super) async fn await_target_backlog(
        &self,
        job: &SnapshotJob,
        consistent: Lsn,
        target: TargetIndex,
    ) -> anyhow::Result<bool> {
        // An empty chunk is answered once the stream has passed `consistent`.
        let barrier = SnapshotChunk {
            mapped: Vec::new(),
            consistent,
            targets: vec![target],
            force: false,
            known_only: false,
            quiet: true,
            kind: ChunkKind::Probe,
            actual: None,
            done: tokio::sync::oneshot::channel().0,
        };
        if self.govern(barrier).await?.is_none() {
            return Ok(false);
        }
        let (head, _) = block(|| self.store.outbox_cursor(&job.target))?;
        let started = Instant::now();
        let mut logged = false;
        loop {
            if *self.shutdown.borrow() {
                return Ok(false);
            }
            let (_, cursor) = block(|| self.store.outbox_cursor(&job.target))?;
            if cursor >= head {
                return Ok(true);
            }
            if started.elapsed() >= BACKLOG_WAIT {
                tracing::warn!(
                    target_name = %job.target, entity = %job.entity, waiting = head - cursor,
                    "the target has not taken its backlog; the deep reconciliation compares anyway \
                     (rows with an event still queued count as changed and are sent again)"
                );
                return Ok(true);
            }
            if !logged {
                logged = true;
                tracing::info!(
                    target_name = %job.target, entity = %job.entity, waiting = head - cursor,
                    "deep reconciliation waits for the target to take its backlog"
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A deep reconciliation's sweep of the target's table: rows present
    /// there whose keys the snapshot does not have (inserted behind
    /// steward's back, or a delete lost) are deleted through the
    /// governance. Resumable: the job records the last key swept.
    /// `Ok(false)` when shutting down.
    pub(super) async fn sweep_target(
        &self,
        reader: &SnapshotReader,
        deep: &mut DeepRead,
        job: &mut SnapshotJob,
        sweep: &Sweep<'_>,
    ) -> anyhow::Result<bool> {
        let consistent = reader.consistent;
        let key_columns: Vec<(usize, u32)> = sweep
            .read
            .key
            .iter()
            .filter_map(|k| {
                sweep
                    .relation
                    .columns
                    .iter()
                    .position(|c| &c.name == k)
                    .map(|at| (at, sweep.relation.columns[at].type_oid))
            })
            .collect();
        while !job.target_swept {
            if *self.shutdown.borrow() {
                return Ok(false);
            }
            let keys = deep
                .reader
                .keys_after(&deep.entity, job.target_swept_to.as_deref(), SWEEP_BATCH)
                .await
                .map_err(|e| anyhow::anyhow!(e))?;
            let Some(last) = keys.last().cloned() else {
                job.target_swept = true;
                block(|| self.store.put_snapshot_jobs(std::slice::from_ref(job)))?;
                break;
            };
            let mut counts = ReconcileCounts::default();
            // Keys the source's key columns cannot hold are not there: not looked up.
            let (lookup, foreign): (Vec<&String>, Vec<&String>) = keys
                .iter()
                .partition(|k| plausible(&split_key(k), &key_columns));
            let parts: Vec<Vec<String>> = lookup.iter().map(|k| split_key(k)).collect();
            let present: HashSet<Vec<String>> = reader
                .present_keys(sweep.read, &parts)
                .await?
                .into_iter()
                .collect();
            let mut mapped = Vec::new();
            for (key, p) in lookup.iter().zip(&parts) {
                if present.contains(p) {
                    continue;
                }
                let mut row = vec![None; sweep.relation.columns.len()];
                for (part, &(at, _)) in p.iter().zip(&key_columns) {
                    row[at] = Some(part.clone());
                }
                match absent_mapped(
                    sweep.pipeline,
                    sweep.relation.id,
                    sweep.entity,
                    row,
                    consistent,
                    sweep.time,
                ) {
                    // Mapped to the same key: steward's delete reaches the row.
                    Ok(Some(m)) if m.event.key == **key => mapped.push(m),
                    _ => unaddressable(job, key, &mut counts),
                }
            }
            for key in foreign {
                unaddressable(job, key, &mut counts);
            }
            if !mapped.is_empty() {
                let actual = deep
                    .actual(mapped.iter().map(|m| m.event.key.as_str()))
                    .await?;
                let chunk = SnapshotChunk {
                    mapped,
                    consistent,
                    targets: vec![deep.target],
                    force: false,
                    known_only: false,
                    quiet: true,
                    kind: ChunkKind::Absent {
                        dry_run: job.dry_run,
                    },
                    actual: Some(actual),
                    done: tokio::sync::oneshot::channel().0,
                };
                let Some(found) = self.govern(chunk).await? else {
                    return Ok(false);
                };
                found.into_iter().for_each(|f| counts.add(f));
            }
            job.counts.add(counts);
            job.target_swept_to = Some(last);
            block(|| self.store.put_snapshot_jobs(std::slice::from_ref(job)))?;
            crate::daemon::reconcile::count(job, counts);
        }
        Ok(true)
    }
}

/// A row at the target whose key steward's events can never name (not a
/// key of the source's key columns): extra, and not repairable by steward.
fn unaddressable(job: &SnapshotJob, key: &str, counts: &mut ReconcileCounts) {
    tracing::warn!(
        target_name = %job.target, entity = %job.entity, key,
        "the target holds a row whose key the source's key columns cannot hold; steward cannot \
         delete it: remove it at the target"
    );
    counts.extra += 1;
    counts.unrepairable += 1;
}

/// Whether `parts` can be a key of these key columns (position, type OID):
/// one part per column, integer columns holding integers.
fn plausible(parts: &[String], columns: &[(usize, u32)]) -> bool {
    const INTEGERS: [u32; 3] = [20, 21, 23];
    parts.len() == columns.len()
        && parts
            .iter()
            .zip(columns)
            .all(|(p, (_, oid))| !INTEGERS.contains(oid) || p.parse::<i64>().is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_keys_the_key_columns_can_hold_are_looked_up() {
        let int_key = [(0, 23)];
        let text_key = [(0, 25)];
        let s = |v: &[&str]| v.iter().map(ToString::to_string).collect::<Vec<_>>();
        assert!(plausible(&s(&["42"]), &int_key));
        assert!(!plausible(&s(&["x42"]), &int_key));
        assert!(!plausible(&s(&["1", "2"]), &int_key), "one part per column");
        assert!(plausible(&s(&["x42"]), &text_key));
        assert!(plausible(&s(&["1", "a"]), &[(0, 20), (3, 1043)]));
    }
}
