#![warn(missing_docs)]

//! Durable state in one redb file: the source checkpoint, one outbox per
//! target, per-target delivery bookkeeping and a little metadata.
//!
//! Crash safety rests on one rule: the outbox appends of a batch of source
//! transactions and the checkpoint that covers them are written in the SAME
//! redb write transaction with `Durability::Immediate` ([`Store::commit`]).
//! redb commits are atomic (copy-on-write pages plus a checksummed header
//! switch), so after a crash at any instant the file holds either the old
//! checkpoint and none of the batch's events, or the new checkpoint and all of
//! them. The daemon confirms to PostgreSQL only a checkpoint read back from
//! here, so every confirmed LSN has its events on disk; anything after it is
//! re-sent by the server and appended again. After a crash between our commit
//! and the next status update the server also re-sends transactions already
//! stored: the daemon skips those whose end LSN is at or below
//! [`Store::checkpoint`] (were one re-appended, its events would carry the
//! same deterministic ids, so targets would see duplicates, never gaps).
//!
//! Per-target bookkeeping (last sequence handed out, last acknowledged one,
//! hence the backlog, and delivered totals) lives in the same transactions as
//! the outbox changes it describes, so it never disagrees with the outbox,
//! even after a crash.
//!
//! Acknowledgements ([`Store::ack`]) and error notes are committed with
//! `Durability::None`: losing them in a crash only re-delivers a batch, which
//! targets de-duplicate by event id. Every later durable commit persists them
//! too. Because redb frees pages only on durable commits, every
//! 64th lazy commit (`LAZY_COMMITS_PER_DURABLE`) is made durable, so draining a
//! large backlog while the source is idle cannot grow the file without bound.
//!
//! redb refuses all further I/O once a write failed (e.g. a full disk). The
//! store then drops its handle and reopens the file on the next call, which
//! lets steward carry on by itself once space is freed.
//!
//! The daemon holds the [`Store`] itself; the other crates see it through a
//! narrow trait each, so they cannot reach state that is not theirs:
//! [`Outbox`] for a target's delivery driver (its outbox, replay queue,
//! window buffer and dead letters), [`Spill`] for the replication source
//! (streamed transactions until they commit), and core's
//! `steward_core::pipeline::large_txn::TxnStage` for large source
//! transactions. [`GovernanceState`] gathers the daemon's access to the
//! governance state, which changes only with the outbox appends it produced.

pub mod audit;
pub mod backup;
mod dead_letter;
mod error;
mod event_codec;
pub mod files;
pub mod governance;
mod open;
mod outbox;
mod published;
mod quarantine;
mod snapshot_progress;
pub mod spill;
mod tables;
mod txn_stage;

pub use dead_letter::{
    key_of, DeadLetter, DeliveryCounts, DlqFilter, Failure, NewDeadLetter, Settlement,
};
pub use error::StoreError;
pub use governance::GovernanceState;
pub use outbox::Outbox;
pub use snapshot_progress::{ReconcileCounts, SnapshotJob, SnapshotPhase, VersionCheck};
pub use spill::Spill;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

use redb::{
    Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableError,
};
use serde::Serialize;

use steward_core::model::{Event, Lsn};
use tables::open_or_empty;
use tables::{
    ack_times_floor_key, ack_times_table, ack_times_table_name, chunk_events, chunk_len,
    encode_chunk, next_chunk, outbox_table, outbox_table_name, TargetState, ACK_TIMES_MAX_ROWS,
    CHECKPOINT_KEY, COUNTERS, META, TARGETS,
};

/// Work done in a commit's write transaction after its appends, given the
/// last sequence number of each target appended to.
pub(crate) type CommitExtra<'a> =
    dyn FnMut(&redb::WriteTransaction, &[(String, u64)]) -> Result<(), Box<redb::Error>> + 'a;

/// The answer of [`Store::acknowledged_at`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Acknowledged {
    /// Not yet: the target's cursor is at `cursor`.
    No {
        /// The target's last acknowledged seq.
        cursor: u64,
    },
    /// At this time (µs since the Unix epoch), to the second.
    At(i64),
    /// Before this time (`None`: before steward noted times), but when is
    /// no longer known: the row was pruned.
    Before(Option<i64>),
    /// Never: a reset moved the cursor past it without a delivery (the
    /// snapshot sends the record again, or it was appended again with a
    /// new seq).
    Superseded,
}

/// The time noted for a cursor moved by a reset rather than a delivery.
pub(crate) const CURSOR_RESET: i64 = i64::MIN;

/// redb's page cache. Its default (1 GiB) is far more than steward's access
/// pattern needs: appends touch the tail of each outbox and drivers read near
/// its head, so a modest cache keeps memory bounded without slowing commits.
/// 16 MiB fills up while draining a backlog and is a quarter of peak RSS;
/// 4 MiB drains as fast (`STEWARD_BENCH_ROWS=100000 cargo bench --bench e2e
/// -- W1`; pages the cache drops are still in the OS page cache).
const CACHE_BYTES: usize = 4 * 1024 * 1024;

/// The commit thread's encoding buffers, kept between commits: a batch
/// encodes to megabytes, and fresh buffers for each commit cost a page
/// fault per 4 KiB (the allocator returns freed memory to the OS at once;
/// see `main.rs`).
#[derive(Default)]
struct EncodeBuffers {
    events: Vec<u8>,
    chunks: Vec<u8>,
}

thread_local! {
    static ENCODE_BUFFERS: std::cell::RefCell<EncodeBuffers> =
        std::cell::RefCell::new(EncodeBuffers::default());
}

/// Frees the calling thread's commit encoding buffers, which otherwise keep
/// the size of the largest commit: for a thread that has gone idle.
pub fn release_encode_buffers() {
    ENCODE_BUFFERS.with(|buffers| {
        if let Ok(mut buffers) = buffers.try_borrow_mut() {
            *buffers = EncodeBuffers::default();
        }
    });
}

/// See the module documentation: how many non-durable commits may pile up
/// before one is made durable so redb can reuse freed pages.
const LAZY_COMMITS_PER_DURABLE: u32 = 64;

/// Longest last-error text kept per target; longer ones are cut (at a character boundary).
const MAX_ERROR_BYTES: usize = 4096;

type Opener = Box<dyn Fn() -> Result<Database, StoreError> + Send + Sync>;

/// Handle to the state file; cheap to clone and shared by every task.
///
/// Methods are synchronous and may wait for the disk: call them from
/// `spawn_blocking` / `block_in_place` in async code.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    /// `None` only between dropping a failed handle and a successful reopen.
    db: RwLock<Option<Database>>,
    needs_reopen: AtomicBool,
    opener: Opener,
    lazy_commits: AtomicU32,
    /// Durable commits made by this handle: a lazy commit is durable once
    /// this has moved past its value at the lazy commit.
    durable_commits: AtomicU64,
    /// The latest generation of governance changes committed (see
    /// [`steward_core::state::StateReader`]), and the last handed out.
    visible_generation: AtomicU64,
    next_generation: AtomicU64,
}

/// Delivery figures of one target, for status output and metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct TargetStats {
    /// Events waiting for delivery: in the outbox, the replay queue and the
    /// batch-window buffer.
    pub backlog: u64,
    /// Events delivered since the state file was created.
    pub delivered_total: u64,
    /// The last sequence number appended to the outbox (0 if none yet).
    pub last_appended_seq: u64,
    /// The last outbox sequence number acknowledged (`None` before the first).
    pub last_delivered_seq: Option<u64>,
    /// Time of the last successful delivery, RFC 3339 UTC.
    pub last_delivered_at: Option<String>,
    /// The last delivery error, cleared by the next success.
    pub last_error: Option<String>,
    /// Events in the dead-letter queue.
    pub dead_letters: u64,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.inner.path)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Opens the state file, or creates it (and its directory) where no file
    /// exists. A damaged file (empty, cut short, failing redb's checksums,
    /// another program's) is [`StoreError::Corrupted`] and left untouched;
    /// see the `open` module. If another process (or another `Store` in
    /// this process) holds it, returns [`StoreError::Locked`].
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let file = path.to_path_buf();
        Store::open_with(
            path,
            Box::new(move || open::open_database(&file, CACHE_BYTES)),
        )
    }

    fn open_with(path: &Path, opener: Opener) -> Result<Store, StoreError> {
        let db = opener()?;
        let store = Store {
            inner: Arc::new(Inner {
                path: path.to_path_buf(),
                db: RwLock::new(Some(db)),
                needs_reopen: AtomicBool::new(false),
                opener,
                lazy_commits: AtomicU32::new(0),
                durable_commits: AtomicU64::new(0),
                visible_generation: AtomicU64::new(0),
                next_generation: AtomicU64::new(0),
            }),
        };
        // Creating the fixed tables up front lets readers treat a missing one as corruption.
        let migrated = store.write(Durability::Immediate, |txn| {
            txn.open_table(TARGETS)?;
            txn.open_table(META)?;
            txn.open_table(COUNTERS)?;
            let claims = governance::build_claims(txn).map_err(|e| TxnError::Redb(Box::new(e)))?;
            let published =
                published::migrate_legacy(txn).map_err(|e| TxnError::Redb(Box::new(e)))?;
            Ok((published, claims))
        })?;
        let (migrated, claims) = migrated;
        if let Some(claims) = claims.filter(|n| *n > 0) {
            tracing::info!(
                path = %path.display(),
                claims,
                "indexed the business keys by the records holding them"
            );
        }
        if let Some(entries) = migrated {
            tracing::info!(
                path = %path.display(),
                entries,
                "moved the published state into its own table"
            );
        }
        Ok(store)
    }

    /// The state file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Handles on the file in this process (this one and its clones): the
    /// file is closed, and its lock released, when the last one is dropped.
    pub fn handles(&self) -> usize {
        Arc::strong_count(&self.inner)
    }

    /// The end LSN of the last source transaction made durable, if any.
    pub fn checkpoint(&self) -> Result<Option<Lsn>, StoreError> {
        self.read(|txn| {
            let counters = txn.open_table(COUNTERS)?;
            let v = counters.get(CHECKPOINT_KEY)?.map(|g| Lsn(g.value()));
            Ok(v)
        })
    }

    /// In ONE durable write transaction: appends every event to its target's
    /// outbox (per-target sequence numbers 1, 2, 3, ... in the order given)
    /// and moves the checkpoint to `checkpoint`. The checkpoint never moves
    /// backwards: a lower value leaves the stored one in place, so a
    /// replayed transaction can never un-confirm later ones.
    ///
    /// Returns, per target appended to, the last sequence number assigned.
    pub fn commit(
        &self,
        checkpoint: Lsn,
        appends: &[(&str, &Event)],
    ) -> Result<Vec<(String, u64)>, StoreError> {
        self.commit_with(checkpoint, appends, &mut |_, _| Ok(()))
    }

    /// [`Store::commit`], also running `extra` in the same write transaction
    /// (governance state and audit records change atomically with the outbox).
    pub(crate) fn commit_with(
        &self,
        checkpoint: Lsn,
        appends: &[(&str, &Event)],
        extra: &mut CommitExtra<'_>,
    ) -> Result<Vec<(String, u64)>, StoreError> {
        ENCODE_BUFFERS.with(|buffers| {
            let mut buffers = buffers.borrow_mut();
            let EncodeBuffers { events, chunks } = &mut *buffers;
            events.clear();
            chunks.clear();
            self.commit_encoded(checkpoint, appends, extra, events, chunks)
        })
    }

    fn commit_encoded(
        &self,
        checkpoint: Lsn,
        appends: &[(&str, &Event)],
        extra: &mut CommitExtra<'_>,
        buf: &mut Vec<u8>,
        chunk_bytes: &mut Vec<u8>,
    ) -> Result<Vec<(String, u64)>, StoreError> {
        // Encode before taking redb's writer lock, into one buffer to spare an
        // allocation per event: acks from the drivers wait on that lock.
        let mut groups: Vec<(&str, Vec<(usize, usize)>)> = Vec::new();
        let mut last_group = 0;
        for (target, event) in appends {
            let start = buf.len();
            event_codec::encode(event, buf);
            let range = (start, buf.len());
            // Appends usually come in runs of one target; check the last one first.
            if groups.get(last_group).is_some_and(|(t, _)| t == target) {
                groups[last_group].1.push(range);
            } else if let Some(i) = groups.iter().position(|(t, _)| t == target) {
                last_group = i;
                groups[i].1.push(range);
            } else {
                last_group = groups.len();
                groups.push((target, vec![range]));
            }
        }

        // Cut each target's run into chunks (see `tables`), again before the writer lock.
        let mut chunk_spans: Vec<std::ops::Range<usize>> = Vec::new();
        let mut per_target: Vec<(&str, std::ops::Range<usize>)> = Vec::new();
        for (target, entries) in &groups {
            let first_chunk = chunk_spans.len();
            let mut rest = entries.as_slice();
            while !rest.is_empty() {
                let (n, _) = next_chunk(rest.iter().map(|&(s, e)| e - s));
                let start = chunk_bytes.len();
                encode_chunk(rest[..n].iter().map(|&(s, e)| &buf[s..e]), chunk_bytes);
                chunk_spans.push(start..chunk_bytes.len());
                rest = &rest[n..];
            }
            per_target.push((target, first_chunk..chunk_spans.len()));
        }
        let chunks: Vec<&[u8]> = chunk_spans
            .iter()
            .map(|span| &chunk_bytes[span.clone()])
            .collect();

        let result = self.write(Durability::Immediate, |txn| {
            let mut out = Vec::with_capacity(per_target.len());
            let mut targets = txn.open_table(TARGETS)?;
            for (target, chunk_range) in &per_target {
                let mut state = load_state(&targets, target)?;
                let name = outbox_table_name(target);
                let mut outbox = txn.open_table(outbox_table(&name))?;
                for chunk in &chunks[chunk_range.clone()] {
                    let first_seq = state.last_seq + 1;
                    outbox.insert(first_seq, *chunk)?;
                    state.last_seq += chunk_len(chunk).map_err(TxnError::Corrupt)?;
                }
                targets.insert(*target, state.encode().as_slice())?;
                out.push((target.to_string(), state.last_seq));
            }
            let mut counters = txn.open_table(COUNTERS)?;
            let previous = counters.get(CHECKPOINT_KEY)?.map(|g| g.value());
            if previous.is_none_or(|p| checkpoint.0 > p) {
                counters.insert(CHECKPOINT_KEY, checkpoint.0)?;
            }
            extra(txn, &out).map_err(TxnError::Redb)?;
            Ok(out)
        })?;
        // That durable commit also persisted every lazy one before it.
        self.inner.lazy_commits.store(0, Ordering::Relaxed);
        Ok(result)
    }

    /// Up to `max` entries of the target's outbox with seq > `after`
    /// (`None`: from the start), in sequence order.
    pub fn read_outbox(
        &self,
        target: &str,
        after: Option<u64>,
        max: usize,
    ) -> Result<Vec<(u64, Event)>, StoreError> {
        if max == 0 {
            return Ok(Vec::new());
        }
        let Some(after_plus_one) = after.map_or(Some(1), |a| a.checked_add(1)) else {
            return Ok(Vec::new());
        };
        let path = self.path();
        self.read(|txn| {
            let state = load_state(&txn.open_table(TARGETS)?, target)?;
            // The first chunk may still hold entries acknowledged already.
            let start = after_plus_one.max(state.last_delivered_seq + 1);
            if start > state.last_seq {
                return Ok(Vec::new());
            }
            let name = outbox_table_name(target);
            let outbox = match txn.open_table(outbox_table(&name)) {
                Ok(t) => t,
                Err(TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
                Err(e) => return Err(e.into()),
            };
            // The chunk holding `start` is keyed by its first seq, at or below `start`.
            let floor = match outbox.range(..=start)?.next_back() {
                Some(item) => item?.0.value(),
                None => start,
            };
            let mut out = Vec::with_capacity(max.min(4096));
            for item in outbox.range(floor..)? {
                let (first, chunk) = item?;
                let first = first.value();
                let events = chunk_events(chunk.value()).map_err(|detail| {
                    TxnError::Corrupt(format!("outbox of target {target:?} at {first}: {detail}"))
                })?;
                for (seq, bytes) in (first..).zip(events) {
                    if seq < start {
                        continue;
                    }
                    out.push((seq, decode_event(path, target, seq, bytes)?));
                    if out.len() == max {
                        return Ok(out);
                    }
                }
            }
            Ok(out)
        })
    }

    /// Removes the target's entries with seq <= `up_to`, adds `delivered` to
    /// its delivered counter, records the time and clears its last error (a
    /// successful delivery ends any error state). Not durable on its own; see
    /// the module documentation.
    pub fn ack(&self, target: &str, up_to: u64, delivered: u64) -> Result<(), StoreError> {
        let now = chrono::Utc::now().timestamp_micros();
        self.write(self.lazy_durability(), |txn| {
            let mut targets = txn.open_table(TARGETS)?;
            let mut state = advance_outbox(txn, &targets, target, up_to, now)?;
            state.delivered_total = state.delivered_total.saturating_add(delivered);
            state.last_delivered_at_micros = Some(now);
            state.last_error = None;
            targets.insert(target, state.encode().as_slice())?;
            Ok(())
        })
    }

    /// The number of durable commits so far (see [`Store::make_durable`]).
    pub fn durable_commits(&self) -> u64 {
        self.inner.durable_commits.load(Ordering::Acquire)
    }

    /// Makes every commit so far durable, acknowledgements included: one
    /// durable commit, which persists the lazy ones before it.
    pub fn make_durable(&self) -> Result<(), StoreError> {
        self.write(Durability::Immediate, |_| Ok(()))?;
        self.inner.lazy_commits.store(0, Ordering::Relaxed);
        Ok(())
    }

    /// Whether and when `target` acknowledged the entry `seq` of its outbox:
    /// its cursor passed it, at the time of the first cursor move at or
    /// past it (to the second). The cursor also passes entries given up
    /// on (dead letters) or parked in a batch window; the caller checks those.
    pub fn acknowledged_at(&self, target: &str, seq: u64) -> Result<Acknowledged, StoreError> {
        self.read(|txn| {
            let state = load_state(&txn.open_table(TARGETS)?, target)?;
            if seq > state.last_delivered_seq {
                return Ok(Acknowledged::No {
                    cursor: state.last_delivered_seq,
                });
            }
            let floor = match open_or_empty!(txn, COUNTERS) {
                Some(t) => t
                    .get(ack_times_floor_key(target).as_str())?
                    .map(|g| g.value()),
                None => None,
            };
            let name = ack_times_table_name(target);
            let first_after = match open_or_empty!(txn, ack_times_table(&name)) {
                Some(t) => match t.range(seq..)?.next() {
                    Some(item) => Some(item?.1.value()),
                    None => None,
                },
                None => None,
            };
            Ok(match first_after {
                Some(CURSOR_RESET) => Acknowledged::Superseded,
                Some(at) if floor.is_none_or(|f| seq > f) => Acknowledged::At(at),
                _ => Acknowledged::Before(first_after),
            })
        })
    }

    /// Number of entries waiting in the target's outbox (a point lookup).
    pub fn backlog(&self, target: &str) -> Result<u64, StoreError> {
        self.read(|txn| {
            let targets = txn.open_table(TARGETS)?;
            Ok(load_state(&targets, target)?.backlog())
        })
    }

    /// The target's outbox: (last seq appended, last seq its cursor passed).
    pub fn outbox_cursor(&self, target: &str) -> Result<(u64, u64), StoreError> {
        self.read(|txn| {
            let targets = txn.open_table(TARGETS)?;
            let state = load_state(&targets, target)?;
            Ok((state.last_seq, state.last_delivered_seq))
        })
    }

    /// The first entry still waiting in the target's outbox.
    pub fn oldest_pending(&self, target: &str) -> Result<Option<(u64, Event)>, StoreError> {
        Ok(self.read_outbox(target, None, 1)?.into_iter().next())
    }

    /// The target's delivery figures; all zero for a target never appended to.
    pub fn target_stats(&self, target: &str) -> Result<TargetStats, StoreError> {
        let state = self.read(|txn| {
            let targets = txn.open_table(TARGETS)?;
            load_state(&targets, target)
        })?;
        let counts = self.delivery_counts(target)?;
        Ok(TargetStats {
            // Replayed and window-held events wait too.
            backlog: state.backlog() + counts.replay + counts.windowed,
            dead_letters: counts.dead_letters,
            delivered_total: state.delivered_total,
            last_appended_seq: state.last_seq,
            last_delivered_seq: (state.last_delivered_seq > 0).then_some(state.last_delivered_seq),
            last_delivered_at: state.last_delivered_at_micros.and_then(|us| {
                chrono::DateTime::from_timestamp_micros(us)
                    .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
            }),
            last_error: state.last_error,
        })
    }

    /// Records (or with `None` clears) the target's last delivery error. Not durable on its own.
    pub fn set_target_error(&self, target: &str, error: Option<&str>) -> Result<(), StoreError> {
        let error = error.map(|e| truncate(e, MAX_ERROR_BYTES).to_string());
        self.write(self.lazy_durability(), |txn| {
            let mut targets = txn.open_table(TARGETS)?;
            let mut state = load_state(&targets, target)?;
            if state.last_error == error {
                return Ok(());
            }
            state.last_error = error;
            targets.insert(target, state.encode().as_slice())?;
            Ok(())
        })
    }

    /// Every target that has (or had) an outbox or stats, in name order.
    pub(crate) fn targets(&self) -> Result<Vec<String>, StoreError> {
        self.read(|txn| {
            let targets = txn.open_table(TARGETS)?;
            let mut out = Vec::new();
            for item in targets.iter()? {
                out.push(item?.0.value().to_string());
            }
            Ok(out)
        })
    }

    /// A value of the small key-value table for bookkeeping (schema
    /// fingerprints, backup marks).
    pub fn get_meta(&self, key: &str) -> Result<Option<String>, StoreError> {
        self.read(|txn| {
            let meta = txn.open_table(META)?;
            let v = meta.get(key)?.map(|g| g.value().to_string());
            Ok(v)
        })
    }

    /// Sets a [`Store::get_meta`] value, durably.
    pub fn set_meta(&self, key: &str, value: &str) -> Result<(), StoreError> {
        self.write(Durability::Immediate, |txn| {
            txn.open_table(META)?.insert(key, value)?;
            Ok(())
        })?;
        self.inner.lazy_commits.store(0, Ordering::Relaxed);
        Ok(())
    }

    /// Size of the state file in bytes (0 if it cannot be read).
    pub fn file_size(&self) -> u64 {
        std::fs::metadata(&self.inner.path)
            .map(|m| m.len())
            .unwrap_or(0)
    }

    fn lazy_durability(&self) -> Durability {
        let n = self.inner.lazy_commits.fetch_add(1, Ordering::Relaxed) + 1;
        if n >= LAZY_COMMITS_PER_DURABLE {
            self.inner.lazy_commits.store(0, Ordering::Relaxed);
            Durability::Immediate
        } else {
            Durability::None
        }
    }

    fn read<T>(
        &self,
        f: impl FnOnce(&redb::ReadTransaction) -> Result<T, TxnError>,
    ) -> Result<T, StoreError> {
        let path = self.path();
        self.with_db(|db| {
            let txn = db
                .begin_read()
                .map_err(|e| StoreError::from_redb(path, e))?;
            f(&txn).map_err(|e| e.into_store_error(path))
        })
    }

    fn write<T>(
        &self,
        durability: Durability,
        f: impl FnOnce(&redb::WriteTransaction) -> Result<T, TxnError>,
    ) -> Result<T, StoreError> {
        let path = self.path();
        self.with_db(|db| {
            let mut txn = db
                .begin_write()
                .map_err(|e| StoreError::from_redb(path, e))?;
            txn.set_durability(durability)
                .map_err(|e| StoreError::from_redb(path, e))?;
            // On error the transaction is dropped, which aborts it: nothing is half-written.
            let out = f(&txn).map_err(|e| e.into_store_error(path))?;
            txn.commit().map_err(|e| StoreError::from_redb(path, e))?;
            if matches!(durability, Durability::Immediate) {
                self.inner.durable_commits.fetch_add(1, Ordering::AcqRel);
            }
            Ok(out)
        })
    }

    fn with_db<T>(
        &self,
        f: impl FnOnce(&Database) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        if self.inner.needs_reopen.load(Ordering::Acquire) {
            self.reopen()?;
        }
        let guard = self.inner.db.read().unwrap_or_else(PoisonError::into_inner);
        let Some(db) = guard.as_ref() else {
            return Err(StoreError::Io {
                path: self.inner.path.clone(),
                source: std::io::Error::other(
                    "the file is being reopened after an earlier write failure",
                ),
            });
        };
        // redb may panic on damage it meets while reading; report it as
        // damage and open the file afresh (which verifies it) next time.
        let result = match open::guarded(|| f(db)) {
            Ok(result) => result,
            Err(panic) => {
                self.inner.needs_reopen.store(true, Ordering::Release);
                Err(open::damaged_by_panic(&self.inner.path, &panic))
            }
        };
        if let Err(e) = &result {
            if e.poisons_database() {
                self.inner.needs_reopen.store(true, Ordering::Release);
            }
        }
        result
    }

    /// Replaces the redb handle after a failed write. The old handle must be
    /// dropped first: it holds the file lock the new one needs.
    fn reopen(&self) -> Result<(), StoreError> {
        let mut guard = self
            .inner
            .db
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if !self.inner.needs_reopen.load(Ordering::Acquire) {
            return Ok(()); // another thread got there first
        }
        if let Some(old) = guard.take() {
            // Closing a handle after a failure may fail or panic in turn:
            // the open below is what matters.
            let _ = open::guarded(move || drop(old));
        }
        let db = (self.inner.opener)()?;
        *guard = Some(db);
        self.inner.needs_reopen.store(false, Ordering::Release);
        tracing::info!(path = %self.inner.path.display(), "reopened the state file after an earlier write failure");
        Ok(())
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(db) = self
            .db
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            // redb writes its last state on close, which can panic on a
            // damaged file; an error was reported already.
            let _ = open::guarded(move || drop(db));
        }
    }
}

/// The error type inside transaction closures: `?` works on redb errors there
/// and the file's path is added once, by [`Store::read`] / [`Store::write`].
enum TxnError {
    /// Boxed: `redb::Error` is large and this travels through every `?`.
    Redb(Box<redb::Error>),
    Corrupt(String),
    Store(StoreError),
}

macro_rules! txn_error_from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for TxnError {
            fn from(e: $t) -> Self {
                TxnError::Redb(Box::new(e.into()))
            }
        }
    )*};
}
txn_error_from_redb!(
    redb::StorageError,
    redb::TableError,
    redb::TransactionError,
    redb::CommitError
);

impl From<StoreError> for TxnError {
    fn from(e: StoreError) -> Self {
        TxnError::Store(e)
    }
}

impl TxnError {
    fn into_store_error(self, path: &Path) -> StoreError {
        match self {
            TxnError::Redb(e) => StoreError::from_redb(path, *e),
            TxnError::Corrupt(detail) => StoreError::Corrupted {
                path: path.to_path_buf(),
                detail,
            },
            TxnError::Store(e) => e,
        }
    }
}

/// Removes the target's outbox entries with seq <= `up_to` and returns its
/// state with `last_delivered_seq` moved (the caller updates the rest and
/// saves it). A move is noted in the target's ack-times table at `now`.
fn advance_outbox<T: ReadableTable<&'static str, &'static [u8]>>(
    txn: &redb::WriteTransaction,
    targets: &T,
    target: &str,
    up_to: u64,
    now: i64,
) -> Result<TargetState, TxnError> {
    let mut state = load_state(targets, target)?;
    let name = outbox_table_name(target);
    let mut outbox = txn.open_table(outbox_table(&name))?;
    // Never past the last appended entry: acknowledging beyond it must
    // not make later appends look delivered.
    let acked = up_to.min(state.last_seq).max(state.last_delivered_seq);
    // Whole chunks go; a partly acknowledged one stays until its last entry is.
    let mut done = Vec::new();
    for item in outbox.range(..=acked)? {
        let (first, chunk) = item?;
        let first = first.value();
        let len = chunk_len(chunk.value()).map_err(TxnError::Corrupt)?;
        if first.saturating_add(len).saturating_sub(1) > acked {
            break;
        }
        done.push(first);
    }
    for first in done {
        outbox.remove(first)?;
    }
    if acked > state.last_delivered_seq {
        note_ack_time(txn, target, acked, now)?;
    }
    state.last_delivered_seq = acked;
    Ok(state)
}

/// Notes that `target`'s cursor reached `acked` at `now`, in the write that
/// moves it (so the two are durable together). Within one second a later
/// move replaces the row, so the table grows by a row per second of
/// deliveries at most, and a time looked up is at most a second late; past
/// [`ACK_TIMES_MAX_ROWS`] the oldest rows go.
fn note_ack_time(
    txn: &redb::WriteTransaction,
    target: &str,
    acked: u64,
    now: i64,
) -> Result<(), TxnError> {
    let name = ack_times_table_name(target);
    let mut times = txn.open_table(ack_times_table(&name))?;
    let last = times.last()?.map(|(k, v)| (k.value(), v.value()));
    if let Some((seq, at)) = last {
        if at.div_euclid(1_000_000) == now.div_euclid(1_000_000) {
            times.remove(seq)?;
        }
    }
    times.insert(acked, now)?;
    if times.len()? > ACK_TIMES_MAX_ROWS {
        let pruned = times.pop_first()?.map(|(seq, _)| seq.value());
        drop(times);
        if let Some(seq) = pruned {
            txn.open_table(COUNTERS)?
                .insert(ack_times_floor_key(target).as_str(), seq)?;
        }
    }
    Ok(())
}

fn load_state<T: ReadableTable<&'static str, &'static [u8]>>(
    targets: &T,
    target: &str,
) -> Result<TargetState, TxnError> {
    match targets.get(target)? {
        Some(row) => TargetState::decode(row.value())
            .map_err(|detail| TxnError::Corrupt(format!("target {target:?}: {detail}"))),
        None => Ok(TargetState::default()),
    }
}

fn decode_event(path: &Path, target: &str, seq: u64, bytes: &[u8]) -> Result<Event, StoreError> {
    event_codec::decode(bytes).map_err(|detail| StoreError::Decode {
        path: path.to_path_buf(),
        target: target.to_string(),
        seq,
        detail,
    })
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests;
