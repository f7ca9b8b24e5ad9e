//! Durable snapshot bookkeeping: one job per (target, entity) being
//! (re)synchronised, the per-key version map that orders snapshot rows
//! against streamed events while a snapshot "window" is open, and the
//! outbox surgery of `steward reset`.
//!
//! A job survives crashes: it records the key of the last chunk whose rows
//! are in the outbox, so a restarted snapshot continues after it (with a new
//! consistent snapshot; see `daemon::snapshot` for why that stays correct).
//!
//! Version tables (`snapver:<target>:<entity>`, key → highest version
//! appended) exist only while the job's window is open; they are dropped when
//! it closes, so steady-state streaming pays nothing for them.

use redb::{Durability, ReadableTable, ReadableTableMetadata, TableDefinition, TableError};
use serde::{Deserialize, Serialize};

use super::tables::{
    chunk_events, chunk_len, encode_chunk, next_chunk, open_or_empty, outbox_table,
    outbox_table_name, CHECKPOINT_KEY, COUNTERS, TARGETS,
};
use super::{event_codec, load_state, Store, StoreError, TxnError};
use steward_core::model::Lsn;
pub use steward_core::state::ReconcileCounts;

/// `<target>\x1f<entity>` → JSON of [`SnapshotJob`].
const SNAPSHOTS: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshots");

fn job_key(target: &str, entity: &str) -> String {
    format!("{target}\u{1f}{entity}")
}

fn versions_name(target: &str, entity: &str) -> String {
    format!("snapver:{target}:{entity}")
}

fn versions_table(name: &str) -> TableDefinition<'_, &'static str, u64> {
    TableDefinition::new(name)
}

/// Where a [`SnapshotJob`] stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SnapshotPhase {
    /// Waiting for a consistent snapshot to read from.
    Pending,
    /// Reading chunks; `last_key` is the resume point.
    Running,
    /// Every row is in the outbox.
    Done,
}

/// Progress of one (target, entity) snapshot.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SnapshotJob {
    /// The target the rows go to.
    pub target: String,
    /// The entity whose table is read.
    pub entity: String,
    /// Pending, running or done.
    pub phase: SnapshotPhase,
    /// Consistent point of the snapshot currently (or last) read.
    pub consistent_lsn: Option<u64>,
    /// Highest consistent point used by this job: the window stays open
    /// until the stream's checkpoint has passed it (and the job is done).
    pub window_until: u64,
    /// Whether streamed events for this (target, entity) go through the version map.
    pub window_open: bool,
    /// Key column texts of the last row whose chunk is in the outbox.
    pub last_key: Option<Vec<String>>,
    /// Rows appended so far (each row counted once).
    pub rows_done: u64,
    /// The planner's estimate of the table's rows at the start.
    pub rows_total: u64,
    /// Every row read from the database by this job, including chunks read
    /// again after a crash: how much work a resume repeated.
    pub rows_read: u64,
    /// How many consistent snapshots this job used (1 without crashes).
    pub segments: u32,
    /// When reading began, RFC 3339 UTC.
    pub started_at: Option<String>,
    /// When the last row was appended, RFC 3339 UTC.
    pub finished_at: Option<String>,
    /// The last error that stopped the job; cleared when it runs again.
    pub last_error: Option<String>,
    /// A governed re-read after a configuration change: every record is
    /// evaluated again for the target; documents equal to the last one
    /// appended are suppressed (a snapshot sends every publishable one).
    #[serde(default)]
    pub reevaluate: bool,
    /// A snapshot that repairs the targets after the state file was
    /// restored from a backup older than the replication slot.
    #[serde(default)]
    pub restore: bool,
    /// A reconciliation: the records' governed documents are compared with
    /// what the target was last sent and only the differences are sent;
    /// after the table, the keys the target was sent that are gone from
    /// the source are deleted (see `daemon::reconcile`).
    #[serde(default)]
    pub reconcile: bool,
    /// A reconciliation that only counts and sends nothing.
    #[serde(default)]
    pub dry_run: bool,
    /// A reconciliation past the table: the last key the target was sent
    /// (`Store::published_keys`) swept for keys gone from the source
    /// (`None`: sweep not begun).
    #[serde(default)]
    pub swept_after: Option<String>,
    /// What a reconciliation found so far.
    #[serde(default)]
    pub counts: ReconcileCounts,
    /// A deep reconciliation: compared with the rows the target actually
    /// holds (read back from its tables) rather than with what it was
    /// sent; after the table, the target's rows of keys gone from the
    /// source are swept too.
    #[serde(default)]
    pub deep: bool,
    /// A deep reconciliation past the table: the last key of the target's
    /// table swept for rows the source does not have (None: not begun).
    #[serde(default)]
    pub target_swept_to: Option<String>,
    /// A deep reconciliation's sweep of the target's table is done.
    #[serde(default)]
    pub target_swept: bool,
    /// A reconciliation of a table keyed by one integer column, read from
    /// its first row on in key order: each chunk is compared with the
    /// integer keys the target was sent in the chunk's range, so the keys
    /// gone from the source are found while reading, and the sweep after
    /// the table asks the source only about the others (`false`: the sweep
    /// asks about every key).
    #[serde(default)]
    pub swept_while_reading: bool,
}

impl SnapshotJob {
    pub(crate) fn new(target: &str, entity: &str) -> SnapshotJob {
        SnapshotJob {
            target: target.to_string(),
            entity: entity.to_string(),
            phase: SnapshotPhase::Pending,
            consistent_lsn: None,
            window_until: 0,
            window_open: true,
            last_key: None,
            rows_done: 0,
            rows_total: 0,
            rows_read: 0,
            segments: 0,
            started_at: None,
            finished_at: None,
            last_error: None,
            reevaluate: false,
            restore: false,
            reconcile: false,
            dry_run: false,
            swept_after: None,
            deep: false,
            target_swept_to: None,
            target_swept: false,
            swept_while_reading: false,
            counts: ReconcileCounts::default(),
        }
    }
}

/// One item the version filter looks at ([`Store::admit_versions`]).
pub struct VersionCheck<'a> {
    /// Target of the job whose window is open.
    pub target: &'a str,
    /// Entity of that job.
    pub entity: &'a str,
    /// The record's key.
    pub key: &'a str,
    /// The record's version; admitted unless below the highest one recorded.
    pub version: u64,
    /// Whether an admitted version is recorded: yes for a streamed event, so
    /// that a read row older than it is refused later. A read row (snapshot,
    /// re-read) is only checked: rows are governed once the stream has passed
    /// their consistent point, so every event streamed after one is newer,
    /// and recording one version per row and target would cost a table
    /// insert for each.
    pub record: bool,
}

impl Store {
    /// Every snapshot job, in (target, entity) order.
    pub fn snapshot_jobs(&self) -> Result<Vec<SnapshotJob>, StoreError> {
        self.read(|txn| {
            let table = match txn.open_table(SNAPSHOTS) {
                Ok(t) => t,
                Err(TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
                Err(e) => return Err(e.into()),
            };
            let mut out = Vec::new();
            for item in table.iter()? {
                let (key, value) = item?;
                let job: SnapshotJob = serde_json::from_slice(value.value()).map_err(|e| {
                    TxnError::Corrupt(format!("snapshot job {:?}: {e}", key.value()))
                })?;
                out.push(job);
            }
            Ok(out)
        })
    }

    /// Stores the jobs (durably).
    pub fn put_snapshot_jobs(&self, jobs: &[SnapshotJob]) -> Result<(), StoreError> {
        self.write(Durability::Immediate, |txn| {
            let mut table = txn.open_table(SNAPSHOTS)?;
            for job in jobs {
                let bytes = serde_json::to_vec(job)
                    .map_err(|e| TxnError::Corrupt(format!("cannot encode snapshot job: {e}")))?;
                table.insert(job_key(&job.target, &job.entity).as_str(), bytes.as_slice())?;
            }
            Ok(())
        })
    }

    /// Starts a resynchronisation of `entities` for `target` in one durable
    /// transaction: removes the target's undelivered events of those entities
    /// from its outbox (the rest keep their order), clears their version maps
    /// and records fresh pending jobs with open windows. Returns the jobs.
    pub fn begin_resync(
        &self,
        target: &str,
        entities: &[String],
        drop_outbox: bool,
    ) -> Result<Vec<SnapshotJob>, StoreError> {
        self.begin_jobs(target, entities, drop_outbox, false, false)
    }

    /// Records snapshot jobs (every publishable record sent again, governed)
    /// for `entities` of `target` after a restored backup; the outbox is kept,
    /// so deletes still waiting in it are delivered.
    pub fn begin_restore_repair(
        &self,
        target: &str,
        entities: &[String],
    ) -> Result<Vec<SnapshotJob>, StoreError> {
        self.begin_jobs(target, entities, false, false, true)
    }

    /// Records governed re-read jobs (see [`SnapshotJob::reevaluate`]) for
    /// `entities` of `target`; the outbox is kept.
    pub fn begin_reevaluation(
        &self,
        target: &str,
        entities: &[String],
    ) -> Result<Vec<SnapshotJob>, StoreError> {
        self.begin_jobs(target, entities, false, true, false)
    }

    /// Records reconciliation jobs (see [`SnapshotJob::reconcile`]) for
    /// `entities` of `target`; the outbox is kept. The caller checks that
    /// no snapshot of them is still reading (it would be replaced).
    /// `deep`: against the target's actual rows (see [`SnapshotJob::deep`]).
    pub fn begin_reconcile(
        &self,
        target: &str,
        entities: &[String],
        dry_run: bool,
        deep: bool,
    ) -> Result<Vec<SnapshotJob>, StoreError> {
        let jobs: Vec<SnapshotJob> = entities
            .iter()
            .map(|e| SnapshotJob {
                reconcile: true,
                dry_run,
                deep,
                ..SnapshotJob::new(target, e)
            })
            .collect();
        self.write_new_jobs(&jobs, target, entities, false)?;
        Ok(jobs)
    }

    /// Up to `max` keys of `entity` that `target` was last sent a document
    /// of (not withheld, not deleted), in the store's order, after `after`
    /// (`None`: from the first).
    pub fn published_keys(
        &self,
        target: &str,
        entity: &str,
        after: Option<&str>,
        max: usize,
    ) -> Result<Vec<String>, StoreError> {
        self.read(|txn| super::published::keys_after(txn, target, entity, after, max))
    }

    /// Up to `max` integer keys of `entity` that `target` was sent (not
    /// withheld), ascending, in (`after`, `through`] (`after` `None`: from
    /// 0): the keys a reconciliation reading an integer-keyed table in key
    /// order compares each chunk with. Keys that are not canonical unsigned
    /// integers are not among them (see [`steward_core::state::published_store_key`]).
    pub fn published_integer_keys(
        &self,
        target: &str,
        entity: &str,
        after: Option<u64>,
        through: u64,
        max: usize,
    ) -> Result<Vec<u64>, StoreError> {
        self.read(|txn| {
            super::published::integer_keys_between(txn, target, entity, after, through, max)
        })
    }

    /// Entries of the published state (every target and record sent a
    /// document or withheld from it).
    pub fn published_entries(&self) -> Result<u64, StoreError> {
        self.read(super::published::entries)
    }

    fn begin_jobs(
        &self,
        target: &str,
        entities: &[String],
        drop_outbox: bool,
        reevaluate: bool,
        restore: bool,
    ) -> Result<Vec<SnapshotJob>, StoreError> {
        let jobs: Vec<SnapshotJob> = entities
            .iter()
            .map(|e| SnapshotJob {
                reevaluate,
                restore,
                ..SnapshotJob::new(target, e)
            })
            .collect();
        self.write_new_jobs(&jobs, target, entities, drop_outbox)?;
        Ok(jobs)
    }

    fn write_new_jobs(
        &self,
        jobs: &[SnapshotJob],
        target: &str,
        entities: &[String],
        drop_outbox: bool,
    ) -> Result<(), StoreError> {
        self.write(Durability::Immediate, |txn| {
            if drop_outbox {
                drop_outbox_entities(txn, target, entities)?;
            }
            let mut table = txn.open_table(SNAPSHOTS)?;
            for job in jobs {
                let name = versions_name(&job.target, &job.entity);
                txn.delete_table(versions_table(&name))?;
                let bytes = serde_json::to_vec(job)
                    .map_err(|e| TxnError::Corrupt(format!("cannot encode snapshot job: {e}")))?;
                table.insert(job_key(&job.target, &job.entity).as_str(), bytes.as_slice())?;
            }
            Ok(())
        })
    }

    /// The version filter of open windows: returns, for each item, whether
    /// it may be appended (its version is not below the highest version
    /// recorded for its key), and records the versions of those that may and
    /// ask for it. Not durable on its own: the caller's next durable commit (the
    /// append itself) persists it; see `daemon::snapshot` for why writing the
    /// map before the append is safe.
    pub fn admit_versions(&self, items: &[VersionCheck<'_>]) -> Result<Vec<bool>, StoreError> {
        if items.is_empty() {
            return Ok(Vec::new());
        }
        // A few (target, entity) pairs, most items in a row of the same.
        let mut names: Vec<((&str, &str), String)> = Vec::new();
        for item in items {
            let pair = (item.target, item.entity);
            if names.last().is_none_or(|(p, _)| *p != pair)
                && !names.iter().any(|(p, _)| *p == pair)
            {
                names.push((pair, versions_name(item.target, item.entity)));
            }
        }
        if items.iter().all(|item| !item.record) {
            // Read rows only (a snapshot's chunk): nothing to record, so
            // no write transaction.
            return self.read(|txn| {
                let mut out = vec![true; items.len()];
                for ((target, entity), name) in &names {
                    let Some(table) = open_or_empty!(txn, versions_table(name)) else {
                        continue;
                    };
                    if table.is_empty()? {
                        continue;
                    }
                    for (i, item) in items.iter().enumerate() {
                        if item.target == *target && item.entity == *entity {
                            let highest = table.get(item.key)?.map(|g| g.value());
                            out[i] = highest.is_none_or(|h| item.version >= h);
                        }
                    }
                }
                Ok(out)
            });
        }
        self.write(Durability::None, |txn| {
            let mut out = vec![false; items.len()];
            for ((target, entity), name) in &names {
                let mut table = txn.open_table(versions_table(name))?;
                // No streamed event recorded yet (a quiet source): nothing
                // to look up for each snapshot row.
                let mut empty = table.is_empty()?;
                for (i, item) in items.iter().enumerate() {
                    if item.target != *target || item.entity != *entity {
                        continue;
                    }
                    let highest = match empty {
                        true => None,
                        false => table.get(item.key)?.map(|g| g.value()),
                    };
                    if highest.is_some_and(|h| item.version < h) {
                        continue;
                    }
                    if item.record && highest != Some(item.version) {
                        table.insert(item.key, item.version)?;
                        empty = false;
                    }
                    out[i] = true;
                }
            }
            Ok(out)
        })
    }

    /// Closes a job's window: drops its version map (durably).
    pub fn close_snapshot_window(&self, job: &SnapshotJob) -> Result<(), StoreError> {
        let mut closed = job.clone();
        closed.window_open = false;
        self.write(Durability::Immediate, |txn| {
            let name = versions_name(&job.target, &job.entity);
            txn.delete_table(versions_table(&name))?;
            let bytes = serde_json::to_vec(&closed)
                .map_err(|e| TxnError::Corrupt(format!("cannot encode snapshot job: {e}")))?;
            txn.open_table(SNAPSHOTS)?
                .insert(job_key(&job.target, &job.entity).as_str(), bytes.as_slice())?;
            Ok(())
        })
    }

    /// Sets the checkpoint to exactly `lsn`, even backwards: only for
    /// `steward reset --all`, which replaces the replication slot.
    pub fn force_checkpoint(&self, lsn: Lsn) -> Result<(), StoreError> {
        self.write(Durability::Immediate, |txn| {
            let mut counters = txn.open_table(COUNTERS)?;
            if lsn == Lsn::ZERO {
                counters.remove(CHECKPOINT_KEY)?;
            } else {
                counters.insert(CHECKPOINT_KEY, lsn.0)?;
            }
            Ok(())
        })
    }
}

/// Rewrites the target's undelivered outbox without the events of
/// `entities`: everything pending counts as consumed (the cursor moves to the
/// end, delivered totals unchanged) and the kept events are appended again
/// after it, in their order, with new sequence numbers.
fn drop_outbox_entities(
    txn: &redb::WriteTransaction,
    target: &str,
    entities: &[String],
) -> Result<(), TxnError> {
    let mut targets = txn.open_table(TARGETS)?;
    let mut state = load_state(&targets, target)?;
    let name = outbox_table_name(target);
    let mut outbox = txn.open_table(outbox_table(&name))?;
    let start = state.last_delivered_seq + 1;
    let mut kept: Vec<Vec<u8>> = Vec::new();
    let mut firsts = Vec::new();
    for item in outbox.iter()? {
        let (first, chunk) = item?;
        let first = first.value();
        firsts.push(first);
        let events = chunk_events(chunk.value()).map_err(TxnError::Corrupt)?;
        for (seq, bytes) in (first..).zip(events) {
            if seq < start {
                continue;
            }
            let entity = event_codec::entity(bytes).map_err(|e| {
                TxnError::Corrupt(format!("outbox of target {target:?} at {seq}: {e}"))
            })?;
            if !entities.iter().any(|n| n == entity.as_ref()) {
                kept.push(bytes.to_vec());
            }
        }
    }
    for first in firsts {
        outbox.remove(first)?;
    }
    if state.last_seq > state.last_delivered_seq {
        // Not acknowledged: the record view must not read these as delivered.
        super::note_ack_time(txn, target, state.last_seq, super::CURSOR_RESET)?;
    }
    state.last_delivered_seq = state.last_seq;
    let mut rest = kept.as_slice();
    while !rest.is_empty() {
        let (n, bytes) = next_chunk(rest.iter().map(Vec::len));
        let mut chunk = Vec::with_capacity(bytes);
        encode_chunk(rest[..n].iter().map(Vec::as_slice), &mut chunk);
        outbox.insert(state.last_seq + 1, chunk.as_slice())?;
        state.last_seq += chunk_len(&chunk).map_err(TxnError::Corrupt)?;
        rest = &rest[n..];
    }
    targets.insert(target, state.encode().as_slice())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use steward_core::model::{Event, EventOp};

    fn event(entity: &str, key: &str, version: u64) -> Event {
        Event {
            change: None,
            tx_id: None,
            id: format!("{entity}-{key}-{version}"),
            entity: entity.into(),
            key: key.into(),
            op: EventOp::Upsert,
            version,
            time: "2024-01-01T00:00:00Z".into(),
            data: serde_json::json!({}).into(),
        }
    }

    #[test]
    fn resync_drops_only_the_entities_pending_events_and_keeps_order() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.redb")).unwrap();
        let events = [
            event("product", "1", 10),
            event("partner", "1", 10),
            event("product", "2", 11),
            event("partner", "2", 12),
        ];
        let appends: Vec<(&str, &Event)> = events.iter().map(|e| ("wms", e)).collect();
        store.commit(Lsn(20), &appends).unwrap();
        store.ack("wms", 1, 1).unwrap();
        let jobs = store
            .begin_resync("wms", &["product".to_string()], true)
            .unwrap();
        assert_eq!(jobs.len(), 1);
        let pending: Vec<(String, String)> = store
            .read_outbox("wms", None, 10)
            .unwrap()
            .into_iter()
            .map(|(_, e)| (e.entity, e.key))
            .collect();
        assert_eq!(
            pending,
            [
                ("partner".into(), "1".into()),
                ("partner".into(), "2".into())
            ]
        );
        assert_eq!(store.backlog("wms").unwrap(), 2);
        assert_eq!(
            store.snapshot_jobs().unwrap()[0].phase,
            SnapshotPhase::Pending
        );
    }

    #[test]
    fn version_filter_refuses_older_versions_per_key() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.redb")).unwrap();
        let check = |key: &'static str, version: u64| VersionCheck {
            target: "wms",
            entity: "product",
            key,
            version,
            record: true,
        };
        assert_eq!(
            store
                .admit_versions(&[check("1", 50), check("2", 49)])
                .unwrap(),
            [true, true]
        );
        // A snapshot row older than a streamed event is refused; newer passes.
        assert_eq!(
            store
                .admit_versions(&[check("1", 49), check("2", 60), check("1", 50)])
                .unwrap(),
            [false, true, true]
        );
        // A read row is checked but not recorded: a streamed event older
        // than it still passes (the stream is never behind a governed row).
        let read = |key: &'static str, version: u64| VersionCheck {
            record: false,
            ..check(key, version)
        };
        assert_eq!(
            store
                .admit_versions(&[read("1", 49), read("3", 70), check("3", 65)])
                .unwrap(),
            [false, true, true]
        );
        let job = SnapshotJob::new("wms", "product");
        store.close_snapshot_window(&job).unwrap();
        assert_eq!(store.admit_versions(&[check("1", 1)]).unwrap(), [true]);
    }
}
