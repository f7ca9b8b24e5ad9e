//! One replication session: START_REPLICATION, decode pgoutput, forward the
//! messages in stream order, and report the durable LSN back to the server.
//!
//! ```text
//!  walsender ──XLogData──▶ decode ──SourceEvent──▶ (bounded channel) ──▶ daemon
//!      ▲                                                                  │
//!      └── standby status (flush = what the daemon made durable) ◀── watch┘
//! ```
//!
//! The flush position sent to the server is never more than the daemon's
//! durable LSN, except for one case: when every transaction received so far
//! is durable and no transaction is open, the position of the last keepalive
//! (the server's decoding position) is confirmed too. Nothing before it can
//! still arrive, and confirming it lets the slot release WAL while Odoo churns
//! through tables steward does not publish.
//!
//! Large transactions (PostgreSQL 14+, `source.streaming`): the session asks
//! for pgoutput protocol 2 with `streaming = on`, so the server sends the
//! changes of a transaction that outgrows `logical_decoding_work_mem` before
//! it commits, in Stream Start … Stream Stop blocks, and ends it with Stream
//! Commit or Stream Abort. Those changes are spilled to the store
//! (`spill::StreamSpill`); at Stream Commit they are read back chunk by chunk and
//! forwarded as an ordinary Begin, changes, Commit with the commit LSN, so
//! the daemon maps them exactly like an unstreamed transaction (same event
//! ids). Aborted transactions and rolled-back subtransactions are dropped
//! from the spill and never reach the daemon.
//!
//! Why confirming positions while a streamed transaction is still open
//! loses nothing: the flush position means "every transaction that
//! committed before it is durable here". A streamed transaction that has not
//! committed yet commits after any position confirmed now. On reconnect the
//! server decodes from the slot's restart_lsn, which it never moves past the
//! first change of a transaction still in progress (restart points come
//! from running-xacts records, bounded by the oldest running transaction),
//! so it sends that transaction again in full, from its first change. That
//! is also why the spill is cleared at the start of every session. Stream
//! blocks count as "a transaction is open" for the keepalive rule above, and
//! a Stream Commit counts as a received commit from the moment it arrives,
//! so the keepalive position is confirmed only after its replay is durable.

use std::sync::Arc;
use std::time::Duration;

use std::collections::VecDeque;

use bytes::Bytes;
use tokio::sync::{mpsc, watch};
use tokio::time::{interval, MissedTickBehavior};

use crate::spill::{Committed, StreamSpill};
use steward_core::model::{Change, Lsn, Relation};
use steward_postgres::pgoutput::{self, PgOutputMessage};
use steward_postgres::{ReplicationClient, ReplicationMessage, ReplicationStream, WireError};
use steward_store::{Spill, StoreError};

/// What the source hands downstream, in stream order.
#[derive(Debug)]
///
/// Transactions arrive whole, Begin to Commit, in commit order (a streamed
/// transaction is replayed from the spill when it commits); transactions
/// committed before [`SessionParams::skip_before`] are left out. Times are
/// µs since 2000-01-01 UTC.
pub enum SourceEvent {
    /// A table's description, before its first change and after it changed.
    Relation(Relation),
    /// A transaction starts.
    Begin {
        /// LSN of its commit record.
        final_lsn: Lsn,
        /// Commit time.
        commit_time_micros: i64,
        /// Transaction ID.
        xid: u32,
    },
    /// A row change of the current transaction.
    Change(Change),
    /// `TRUNCATE` of tables, in the current transaction.
    Truncate {
        /// OIDs of the truncated tables.
        relation_ids: Vec<u32>,
    },
    /// The current transaction is complete.
    Commit {
        /// LSN of its commit record.
        commit_lsn: Lsn,
        /// End of its commit record: once the transaction is stored, the
        /// position that may be confirmed to the server.
        end_lsn: Lsn,
        /// Commit time.
        commit_time_micros: i64,
    },
    /// A keepalive outside any transaction: every transaction the server
    /// committed before this position has been sent.
    Position(Lsn),
}

/// Why a replication session ended.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// Connecting or talking to the server failed.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// A pgoutput message that does not decode.
    #[error("malformed pgoutput message in WAL record at {lsn}: {problem}; this is a bug or a corrupted stream — please report it with the server version")]
    Decode {
        /// WAL position of the message.
        lsn: Lsn,
        /// What is wrong with it.
        problem: String,
    },
    /// The server ended the copy (e.g. on shutdown); reconnecting may help.
    #[error("the server ended the replication stream")]
    Ended,
    /// A well-formed message where the protocol does not allow it (e.g. a
    /// change outside a transaction).
    #[error("unexpected pgoutput message at {lsn}: {what}")]
    Unexpected {
        /// WAL position of the message.
        lsn: Lsn,
        /// The message and why it is out of place.
        what: String,
    },
    /// The slot is gone.
    #[error("the replication slot '{slot}' no longer exists (someone dropped it while steward ran): changes since steward's checkpoint may be lost. Stop steward, run `steward repair -c FILE` (recreates the slot and sends each target only the records that differ) or `steward reset --all -c FILE` (recreates the slot and resends every target a snapshot), then start it")]
    SlotDropped {
        /// The slot's name.
        slot: String,
    },
    /// Writing a streamed transaction to the state file failed.
    #[error("cannot keep a streamed transaction's changes in the state file: {0}")]
    Spill(#[from] StoreError),
    /// The server removed WAL the slot still needed.
    #[error("the replication slot '{slot}' was invalidated: the server removed WAL it still needed (max_slot_wal_keep_size). Stop steward, run `steward repair -c FILE` (recreates the slot and sends each target only the records that differ) or `steward reset --all -c FILE` (recreates the slot and resends every target a snapshot), then start it; consider a larger max_slot_wal_keep_size")]
    SlotInvalidated {
        /// The slot's name.
        slot: String,
    },
}

impl SourceError {
    /// Whether reconnecting may help.
    pub fn is_transient(&self) -> bool {
        match self {
            // 55006: the slot is still held by the walsender of a previous
            // connection (after a crash it exits within moments).
            SourceError::Wire(e) => e.is_transient() || e.sqlstate() == Some("55006"),
            SourceError::Ended => true,
            // Disk full: a new session starts the spill afresh.
            SourceError::Spill(e) => e.is_transient(),
            SourceError::Decode { .. }
            | SourceError::Unexpected { .. }
            | SourceError::SlotDropped { .. }
            | SourceError::SlotInvalidated { .. } => false,
        }
    }
}

/// What one replication session ([`run_session`]) streams and from where.
pub struct SessionParams {
    /// The logical replication slot to stream from.
    pub slot: String,
    /// The publication whose tables' changes pgoutput sends.
    pub publication: String,
    /// Where to start; `Lsn::ZERO` lets the server use the slot's confirmed position.
    pub start: Lsn,
    /// Transactions whose commit LSN is below this are already durable: dropped.
    pub skip_before: Lsn,
    /// How often a standby status update is sent even when nothing changed.
    pub status_interval: Duration,
    /// Ask for streaming of in-progress transactions (used on PostgreSQL 14+).
    pub streaming: bool,
    /// Where streamed transactions are spilled until they commit.
    pub spill: Arc<dyn Spill>,
    /// Set by the daemon when it waits for the server's position (a
    /// snapshot chunk waiting for its consistent point): the session asks
    /// the server for a keepalive.
    pub position_wanted: Arc<std::sync::atomic::AtomicBool>,
}

/// First server version whose pgoutput can stream in-progress transactions.
const STREAMING_MIN_VERSION: u32 = 140000;

/// How often a durable-LSN advance is reported at most, so a busy stream
/// does not send a status update per commit.
const DURABLE_REPORT_INTERVAL: Duration = Duration::from_millis(100);

/// How often the session checks whether the daemon waits for the server's position.
const POSITION_POLL_INTERVAL: Duration = Duration::from_millis(200);

struct FlushTracker {
    /// End LSN of the last commit decoded and forwarded.
    received_commit_end: Lsn,
    /// The last keepalive position seen while no transaction was open.
    idle_wal_end: Lsn,
    /// Highest position received in any message (the "write" position).
    written: Lsn,
    last_flush_sent: Lsn,
}

impl FlushTracker {
    fn flush(&mut self, durable: Lsn) -> Lsn {
        let mut flush = durable;
        if durable >= self.received_commit_end {
            flush = flush.max(self.idle_wal_end);
        }
        // Never move backwards: the server would ignore it, and it would read as lag.
        self.last_flush_sent = self.last_flush_sent.max(flush);
        self.last_flush_sent
    }
}

/// Streams until shutdown (Ok) or an error. On shutdown the final status
/// update reports the durable LSN as of that moment.
pub async fn run_session(
    client: ReplicationClient,
    params: SessionParams,
    tx: mpsc::Sender<SourceEvent>,
    mut durable: watch::Receiver<Lsn>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), SourceError> {
    let publication = params.publication.clone();
    let streaming = params.streaming && client.server_version_num() >= STREAMING_MIN_VERSION;
    let mut options = vec![
        ("proto_version", if streaming { "2" } else { "1" }),
        ("publication_names", publication.as_str()),
    ];
    if streaming {
        options.push(("streaming", "on"));
    }
    // Cleared before the server can send anything (see the module documentation).
    let spill = StreamSpill::new(Arc::clone(&params.spill))?;
    let mut stream = client
        .start_logical_replication(&params.slot, params.start, &options)
        .await
        .map_err(|e| slot_error(e, &params.slot))?;
    tracing::info!(slot = %params.slot, start = %params.start, streaming, "replication started");

    let mut router = Router {
        skip_before: params.skip_before,
        streaming,
        in_txn: false,
        skipping: false,
        tracker: FlushTracker {
            received_commit_end: Lsn::ZERO,
            idle_wal_end: Lsn::ZERO,
            written: params.start,
            last_flush_sent: Lsn::ZERO,
        },
        spill,
        replay: None,
    };
    let mut pending: Option<SourceEvent> = None;
    let mut report_due = false;

    let mut status_tick = interval(params.status_interval);
    status_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut report_tick = interval(DURABLE_REPORT_INTERVAL);
    report_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut position_tick = interval(POSITION_POLL_INTERVAL);
    position_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);

    loop {
        if pending.is_none() {
            // A streamed transaction that committed is passed on before the
            // next message is read (the select below still answers the server).
            if let Some(replay) = router.replay.as_mut() {
                let (event, done) = replay.next(&router.spill)?;
                pending = Some(event);
                if done {
                    router.replay = None;
                }
            }
        }
        tokio::select! {
            biased;
            _ = shutdown.changed() => {
                let durable_now = *durable.borrow();
                let flush = router.tracker.flush(durable_now);
                send_status(&mut stream, router.tracker.written, flush, false).await?;
                tracing::info!(flush = %flush, "replication stopped; durable position confirmed");
                let _ = stream.close().await;
                return Ok(());
            }
            permit = tx.reserve(), if pending.is_some() => {
                match permit {
                    Ok(permit) => {
                        if let Some(event) = pending.take() {
                            permit.send(event);
                        }
                    }
                    // The daemon dropped its receiver: it is shutting down
                    // and says so once its last commit is durable; then the
                    // final status update confirms that position.
                    Err(_) => {
                        let _ = shutdown.wait_for(|stop| *stop).await;
                        let flush = router.tracker.flush(*durable.borrow());
                        send_status(&mut stream, router.tracker.written, flush, false).await?;
                        tracing::info!(flush = %flush, "replication stopped; durable position confirmed");
                        let _ = stream.close().await;
                        return Ok(());
                    }
                }
            }
            message = stream.recv(), if pending.is_none() => {
                match message? {
                    None => return Err(SourceError::Ended),
                    Some(ReplicationMessage::XLogData { wal_start, wal_end, data, .. }) => {
                        router.tracker.written = router.tracker.written.max(wal_end).max(wal_start);
                        let decoded = pgoutput::decode(&data, router.spill.in_stream())
                            .map_err(|e| SourceError::Decode { lsn: wal_start, problem: e.to_string() })?;
                        pending = router.route(decoded, &data, wal_start)?;
                    }
                    Some(ReplicationMessage::Keepalive { wal_end, reply_requested, .. }) => {
                        router.tracker.written = router.tracker.written.max(wal_end);
                        if !router.in_txn {
                            router.tracker.idle_wal_end = router.tracker.idle_wal_end.max(wal_end);
                            if router.replay.is_none() {
                                pending = Some(SourceEvent::Position(wal_end));
                            }
                        }
                        if reply_requested {
                            let flush = router.tracker.flush(*durable.borrow());
                            send_status(&mut stream, router.tracker.written, flush, false).await?;
                        }
                    }
                }
            }
            changed = durable.changed() => {
                if changed.is_err() {
                    // The daemon is gone; nothing more can become durable.
                    return Ok(());
                }
                report_due = true;
            }
            _ = report_tick.tick(), if report_due => {
                report_due = false;
                let flush = router.tracker.flush(*durable.borrow());
                send_status(&mut stream, router.tracker.written, flush, false).await?;
            }
            _ = position_tick.tick() => {
                if params.position_wanted.swap(false, std::sync::atomic::Ordering::Relaxed) {
                    let flush = router.tracker.flush(*durable.borrow());
                    send_status(&mut stream, router.tracker.written, flush, true).await?;
                }
            }
            _ = status_tick.tick() => {
                let flush = router.tracker.flush(*durable.borrow());
                send_status(&mut stream, router.tracker.written, flush, false).await?;
            }
        }
    }
}

/// Names a missing (42704) or invalidated (55000 "can no longer get changes")
/// slot instead of passing the server's terse message on.
fn slot_error(e: WireError, slot: &str) -> SourceError {
    match e.sqlstate() {
        Some("42704") => SourceError::SlotDropped {
            slot: slot.to_string(),
        },
        Some("55000")
            if e.to_string().contains("invalidated") || e.to_string().contains("no longer") =>
        {
            SourceError::SlotInvalidated {
                slot: slot.to_string(),
            }
        }
        _ => SourceError::Wire(e),
    }
}

async fn send_status(
    stream: &mut ReplicationStream,
    written: Lsn,
    flush: Lsn,
    reply: bool,
) -> Result<(), WireError> {
    let write = written.max(flush);
    tracing::trace!(%write, %flush, "standby status update");
    stream.send_status(write, flush, flush, reply).await
}

/// Per-session protocol state: which transaction is open, what is spilled.
struct Router {
    skip_before: Lsn,
    streaming: bool,
    /// A transaction (or a stream block) is being received.
    in_txn: bool,
    skipping: bool,
    tracker: FlushTracker,
    spill: StreamSpill,
    /// A committed streamed transaction being passed on.
    replay: Option<Replay>,
}

impl Router {
    /// Handles one decoded message; returns what to pass downstream, if anything.
    fn route(
        &mut self,
        message: PgOutputMessage,
        raw: &Bytes,
        lsn: Lsn,
    ) -> Result<Option<SourceEvent>, SourceError> {
        let unexpected = |what: String| SourceError::Unexpected { lsn, what };
        if self.spill.in_stream() {
            match message {
                PgOutputMessage::StreamStop => {
                    self.spill.stop()?;
                    self.in_txn = false;
                }
                // Applied when the transaction commits, in stream order.
                PgOutputMessage::Relation { .. } => self.spill.push(None, raw)?,
                PgOutputMessage::Change { xid, .. } | PgOutputMessage::Truncate { xid, .. } => {
                    self.spill.push(xid, raw)?;
                }
                PgOutputMessage::Type { .. }
                | PgOutputMessage::Origin { .. }
                | PgOutputMessage::Message { .. } => {}
                other @ (PgOutputMessage::Begin { .. }
                | PgOutputMessage::Commit { .. }
                | PgOutputMessage::StreamStart { .. }
                | PgOutputMessage::StreamCommit { .. }
                | PgOutputMessage::StreamAbort { .. }) => {
                    return Err(unexpected(format!("{other:?} inside a stream block")))
                }
            }
            return Ok(None);
        }
        Ok(match message {
            PgOutputMessage::Begin {
                final_lsn,
                commit_time_micros,
                xid,
            } => {
                self.in_txn = true;
                self.skipping = final_lsn < self.skip_before;
                if self.skipping {
                    tracing::debug!(commit = %final_lsn, "skipping a transaction the store already holds");
                    None
                } else {
                    Some(SourceEvent::Begin {
                        final_lsn,
                        commit_time_micros,
                        xid,
                    })
                }
            }
            PgOutputMessage::Commit {
                commit_lsn,
                end_lsn,
                commit_time_micros,
                ..
            } => {
                self.in_txn = false;
                if std::mem::take(&mut self.skipping) {
                    None
                } else {
                    self.tracker.received_commit_end =
                        self.tracker.received_commit_end.max(end_lsn);
                    Some(SourceEvent::Commit {
                        commit_lsn,
                        end_lsn,
                        commit_time_micros,
                    })
                }
            }
            PgOutputMessage::Relation { relation, .. } => Some(SourceEvent::Relation(relation)),
            PgOutputMessage::Change { change, .. } => {
                (!self.skipping).then_some(SourceEvent::Change(change))
            }
            PgOutputMessage::Truncate { relation_ids, .. } => {
                (!self.skipping).then_some(SourceEvent::Truncate { relation_ids })
            }
            PgOutputMessage::Type { .. }
            | PgOutputMessage::Origin { .. }
            | PgOutputMessage::Message { .. } => None,
            other @ (PgOutputMessage::StreamStart { .. }
            | PgOutputMessage::StreamStop
            | PgOutputMessage::StreamCommit { .. }
            | PgOutputMessage::StreamAbort { .. })
                if !self.streaming =>
            {
                return Err(unexpected(format!(
                    "{other:?} although streaming was not requested"
                )))
            }
            PgOutputMessage::StreamStart { xid, first_segment } => {
                if self.in_txn {
                    return Err(unexpected(format!(
                        "Stream Start for xid {xid} inside an unstreamed transaction"
                    )));
                }
                self.spill.start(xid, first_segment).map_err(unexpected)?;
                self.in_txn = true;
                None
            }
            PgOutputMessage::StreamStop => {
                return Err(unexpected("Stream Stop without a Stream Start".into()))
            }
            PgOutputMessage::StreamAbort { xid, subxid } => {
                tracing::debug!(
                    xid,
                    subxid,
                    "a streamed (sub)transaction aborted; its changes are dropped"
                );
                self.spill.abort(xid, subxid)?;
                None
            }
            PgOutputMessage::StreamCommit {
                xid,
                commit_lsn,
                end_lsn,
                commit_time_micros,
                ..
            } => {
                let Some(committed) = self.spill.commit(xid)? else {
                    return Err(unexpected(format!(
                        "Stream Commit for xid {xid}, which this session never received"
                    )));
                };
                if commit_lsn < self.skip_before {
                    tracing::debug!(commit = %commit_lsn, "skipping a streamed transaction the store already holds");
                    self.spill.finish(xid)?;
                    return Ok(None);
                }
                tracing::info!(
                    xid,
                    commit = %commit_lsn,
                    changes = committed.records,
                    "a streamed transaction committed; passing its spilled changes on"
                );
                self.tracker.received_commit_end = self.tracker.received_commit_end.max(end_lsn);
                self.replay = Some(Replay::new(
                    committed,
                    commit_lsn,
                    end_lsn,
                    commit_time_micros,
                ));
                None
            }
        })
    }
}

/// Reads a committed streamed transaction back from the spill, one chunk at
/// a time, as Begin, its messages in stream order, Commit.
struct Replay {
    xid: u32,
    commit_lsn: Lsn,
    chunks: std::vec::IntoIter<u64>,
    queue: VecDeque<SourceEvent>,
    commit: Option<SourceEvent>,
}

impl Replay {
    fn new(committed: Committed, commit_lsn: Lsn, end_lsn: Lsn, commit_time_micros: i64) -> Replay {
        Replay {
            xid: committed.xid,
            commit_lsn,
            chunks: committed.chunks.into_iter(),
            queue: VecDeque::from([SourceEvent::Begin {
                final_lsn: commit_lsn,
                commit_time_micros,
                xid: committed.xid,
            }]),
            commit: Some(SourceEvent::Commit {
                commit_lsn,
                end_lsn,
                commit_time_micros,
            }),
        }
    }

    /// The next event; `true` with the last one (the Commit).
    fn next(&mut self, spill: &StreamSpill) -> Result<(SourceEvent, bool), SourceError> {
        loop {
            if let Some(event) = self.queue.pop_front() {
                return Ok((event, false));
            }
            if let Some(seq) = self.chunks.next() {
                let Some(chunk) = spill.read(self.xid, seq)? else {
                    return Err(SourceError::Unexpected {
                        lsn: self.commit_lsn,
                        what: format!(
                            "chunk {seq} of the spilled changes of xid {} is missing from the state file",
                            self.xid
                        ),
                    });
                };
                self.load(chunk)?;
                continue;
            }
            spill.finish(self.xid)?;
            return match self.commit.take() {
                Some(commit) => Ok((commit, true)),
                None => Err(SourceError::Unexpected {
                    lsn: self.commit_lsn,
                    what: "a streamed transaction was passed on twice".into(),
                }),
            };
        }
    }

    fn load(&mut self, chunk: Vec<u8>) -> Result<(), SourceError> {
        let (lsn, xid) = (self.commit_lsn, self.xid);
        let decode_error = |problem: String| SourceError::Decode {
            lsn,
            problem: format!("spilled change of xid {xid}: {problem}"),
        };
        let records = steward_store::spill::records(&chunk).map_err(decode_error)?;
        let bytes = Bytes::from(chunk);
        for (_, range) in records {
            let message = pgoutput::decode(&bytes.slice(range), true)
                .map_err(|e| decode_error(e.to_string()))?;
            match message {
                PgOutputMessage::Relation { relation, .. } => {
                    self.queue.push_back(SourceEvent::Relation(relation));
                }
                PgOutputMessage::Change { change, .. } => {
                    self.queue.push_back(SourceEvent::Change(change));
                }
                PgOutputMessage::Truncate { relation_ids, .. } => {
                    self.queue.push_back(SourceEvent::Truncate { relation_ids });
                }
                _ => {}
            }
        }
        Ok(())
    }
}

/// When a session ends with a transient error, how long to wait before the next attempt.
pub fn reconnect_delay(attempt: u32) -> Duration {
    let base = Duration::from_millis(250).saturating_mul(1u32 << attempt.min(7));
    base.min(Duration::from_secs(30))
}

#[cfg(test)]
#[allow(clippy::disallowed_types)] // the tests spill into a real store and look into it
mod tests {
    use super::*;
    use steward_store::Store;

    #[test]
    fn keepalive_position_is_confirmed_only_when_everything_received_is_durable() {
        let mut t = FlushTracker {
            received_commit_end: Lsn(100),
            idle_wal_end: Lsn(500),
            written: Lsn(500),
            last_flush_sent: Lsn::ZERO,
        };
        // A received commit is not yet durable: only the durable position.
        assert_eq!(t.flush(Lsn(50)), Lsn(50));
        // Everything received is durable: the idle keepalive position too.
        assert_eq!(t.flush(Lsn(100)), Lsn(500));
        // Never backwards.
        t.received_commit_end = Lsn(900);
        assert_eq!(t.flush(Lsn(120)), Lsn(500));
    }

    /// pgoutput bytes of an Insert into relation 16400 with one text column,
    /// streamed (`xid` prefix) or not.
    fn insert(xid: Option<u32>, value: &str) -> Bytes {
        let mut b = vec![b'I'];
        if let Some(x) = xid {
            b.extend_from_slice(&x.to_be_bytes());
        }
        b.extend_from_slice(&16400u32.to_be_bytes());
        b.push(b'N');
        b.extend_from_slice(&1i16.to_be_bytes());
        b.push(b't');
        b.extend_from_slice(&(value.len() as i32).to_be_bytes());
        b.extend_from_slice(value.as_bytes());
        Bytes::from(b)
    }

    fn stream_start(xid: u32, first: bool) -> Bytes {
        let mut b = vec![b'S'];
        b.extend_from_slice(&xid.to_be_bytes());
        b.push(u8::from(first));
        Bytes::from(b)
    }

    fn stream_abort(xid: u32, subxid: u32) -> Bytes {
        let mut b = vec![b'A'];
        b.extend_from_slice(&xid.to_be_bytes());
        b.extend_from_slice(&subxid.to_be_bytes());
        Bytes::from(b)
    }

    fn stream_commit(xid: u32, commit: u64, end: u64) -> Bytes {
        let mut b = vec![b'c'];
        b.extend_from_slice(&xid.to_be_bytes());
        b.push(0);
        b.extend_from_slice(&commit.to_be_bytes());
        b.extend_from_slice(&end.to_be_bytes());
        b.extend_from_slice(&7i64.to_be_bytes());
        Bytes::from(b)
    }

    fn begin(final_lsn: u64, xid: u32) -> Bytes {
        let mut b = vec![b'B'];
        b.extend_from_slice(&final_lsn.to_be_bytes());
        b.extend_from_slice(&7i64.to_be_bytes());
        b.extend_from_slice(&xid.to_be_bytes());
        Bytes::from(b)
    }

    fn commit(commit: u64, end: u64) -> Bytes {
        let mut b = vec![b'C', 0];
        b.extend_from_slice(&commit.to_be_bytes());
        b.extend_from_slice(&end.to_be_bytes());
        b.extend_from_slice(&7i64.to_be_bytes());
        Bytes::from(b)
    }

    fn router(store: &Store, skip_before: Lsn) -> Router {
        Router {
            skip_before,
            streaming: true,
            in_txn: false,
            skipping: false,
            tracker: FlushTracker {
                received_commit_end: Lsn::ZERO,
                idle_wal_end: Lsn::ZERO,
                written: Lsn::ZERO,
                last_flush_sent: Lsn::ZERO,
            },
            spill: StreamSpill::new(Arc::new(store.clone())).unwrap(),
            replay: None,
        }
    }

    /// Feeds messages in; returns what goes downstream, replays included, as text.
    fn feed(r: &mut Router, messages: &[Bytes]) -> Vec<String> {
        let mut out = Vec::new();
        for raw in messages {
            let m = pgoutput::decode(raw, r.spill.in_stream()).unwrap();
            if let Some(e) = r.route(m, raw, Lsn(1)).unwrap() {
                out.push(show(&e));
            }
            while let Some(replay) = r.replay.as_mut() {
                let (e, done) = replay.next(&r.spill).unwrap();
                out.push(show(&e));
                if done {
                    r.replay = None;
                }
            }
        }
        out
    }

    fn show(e: &SourceEvent) -> String {
        match e {
            SourceEvent::Begin { final_lsn, xid, .. } => format!("begin {xid} @{}", final_lsn.0),
            SourceEvent::Commit { end_lsn, .. } => format!("commit {}", end_lsn.0),
            SourceEvent::Change(c) => match &c.new.as_ref().unwrap()[0] {
                steward_core::model::TupleValue::Text(t) => String::from_utf8(t.to_vec()).unwrap(),
                other => format!("{other:?}"),
            },
            SourceEvent::Relation(r) => format!("relation {}", r.id),
            SourceEvent::Truncate { .. } => "truncate".into(),
            SourceEvent::Position(l) => format!("position {}", l.0),
        }
    }

    #[test]
    fn streamed_transactions_are_passed_on_at_commit_without_aborted_parts() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.redb")).unwrap();
        let mut r = router(&store, Lsn(50));
        // Enough rows that xid 100's spill has many chunks.
        let many: Vec<Bytes> = (0..3000)
            .map(|i| insert(Some(100), &format!("a{i}")))
            .collect();
        let mut msgs = vec![stream_start(100, true)];
        msgs.extend(many);
        msgs.extend([
            insert(Some(101), "sub-rolled-back"),
            insert(Some(102), "sub-kept"),
            Bytes::from_static(b"E"),
            // An ordinary transaction between stream blocks flows at once.
            begin(300, 200),
            insert(None, "plain"),
            commit(300, 310),
            stream_start(100, false),
            insert(Some(101), "sub-rolled-back-2"),
            insert(Some(100), "b"),
            Bytes::from_static(b"E"),
            stream_abort(100, 101),
            // A transaction streamed, then rolled back whole.
            stream_start(400, true),
            insert(Some(400), "never"),
            Bytes::from_static(b"E"),
            stream_abort(400, 400),
            stream_commit(100, 500, 510),
        ]);
        let out = feed(&mut r, &msgs);
        let mut expected = vec!["begin 200 @300", "plain", "commit 310", "begin 100 @500"]
            .into_iter()
            .map(String::from)
            .collect::<Vec<_>>();
        expected.extend((0..3000).map(|i| format!("a{i}")));
        expected.extend(["sub-kept", "b", "commit 510"].map(String::from));
        assert_eq!(out, expected);
        assert_eq!(r.tracker.received_commit_end, Lsn(510));
        assert_eq!(
            store.spill_chunks().unwrap(),
            0,
            "nothing left in the spill"
        );
        assert_eq!(r.spill.open_transactions(), 0);
    }

    #[test]
    fn a_streamed_transaction_already_stored_is_skipped_and_inconsistent_streams_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.redb")).unwrap();
        let mut r = router(&store, Lsn(1000));
        let out = feed(
            &mut r,
            &[
                stream_start(7, true),
                insert(Some(7), "old"),
                Bytes::from_static(b"E"),
                stream_commit(7, 900, 910),
            ],
        );
        assert!(out.is_empty(), "{out:?}");
        assert_eq!(store.spill_chunks().unwrap(), 0);
        // A continuation of a transaction this session never saw started.
        let m = pgoutput::decode(&stream_start(8, false), false).unwrap();
        let e = r.route(m, &stream_start(8, false), Lsn(1)).unwrap_err();
        assert!(e.to_string().contains("never received"), "{e}");
        // Streaming not requested: stream messages are refused.
        r.streaming = false;
        let m = pgoutput::decode(&stream_start(9, true), false).unwrap();
        assert!(r.route(m, &stream_start(9, true), Lsn(1)).is_err());
    }

    #[test]
    fn a_new_session_starts_with_an_empty_spill() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.redb")).unwrap();
        let mut r = router(&store, Lsn(0));
        feed(
            &mut r,
            &[
                stream_start(7, true),
                insert(Some(7), "x"),
                Bytes::from_static(b"E"),
            ],
        );
        assert_eq!(store.spill_chunks().unwrap(), 1);
        let _next = router(&store, Lsn(0));
        assert_eq!(store.spill_chunks().unwrap(), 0);
    }

    /// pgoutput Relation message: relation 16400, `public.t`, one text column.
    fn relation_message() -> Bytes {
        let mut b = vec![b'R'];
        b.extend_from_slice(&16400u32.to_be_bytes());
        b.extend_from_slice(b"public\0t\0");
        b.push(b'd');
        b.extend_from_slice(&1i16.to_be_bytes());
        b.push(0);
        b.extend_from_slice(b"v\0");
        b.extend_from_slice(&25u32.to_be_bytes());
        b.extend_from_slice(&(-1i32).to_be_bytes());
        Bytes::from(b)
    }

    /// A standby status update as the server receives it.
    #[derive(Debug, PartialEq, Eq)]
    struct Status {
        write: Lsn,
        flush: Lsn,
        apply: Lsn,
    }

    /// The server end of a replication session, played by the test.
    struct FakeWalsender {
        io: tokio::io::DuplexStream,
    }

    impl FakeWalsender {
        /// The next frontend message, or `None` once the client hung up.
        async fn read_frame(&mut self) -> Option<(u8, Vec<u8>)> {
            use tokio::io::AsyncReadExt;
            let mut head = [0u8; 5];
            self.io.read_exact(&mut head).await.ok()?;
            let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
            let mut body = vec![0u8; len - 4];
            self.io.read_exact(&mut body).await.ok()?;
            Some((head[0], body))
        }

        async fn send(&mut self, tag: u8, body: &[u8]) {
            use tokio::io::AsyncWriteExt;
            let mut frame = vec![tag];
            frame.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
            frame.extend_from_slice(body);
            self.io.write_all(&frame).await.unwrap();
        }

        /// Takes START_REPLICATION and enters CopyBoth mode; returns the command.
        async fn accept_start(&mut self) -> String {
            let (tag, body) = self.read_frame().await.expect("START_REPLICATION");
            assert_eq!(tag, b'Q', "the session starts with a query");
            // CopyBothResponse: text format, no columns.
            self.send(b'W', &[0, 0, 0]).await;
            String::from_utf8_lossy(&body[..body.len() - 1]).into_owned()
        }

        async fn xlog(&mut self, start: u64, end: u64, data: &[u8]) {
            let mut p = vec![b'w'];
            p.extend(start.to_be_bytes());
            p.extend(end.to_be_bytes());
            p.extend(0i64.to_be_bytes());
            p.extend_from_slice(data);
            self.send(b'd', &p).await;
        }

        async fn keepalive(&mut self, wal_end: u64, reply_requested: bool) {
            let mut p = vec![b'k'];
            p.extend(wal_end.to_be_bytes());
            p.extend(0i64.to_be_bytes());
            p.push(u8::from(reply_requested));
            self.send(b'd', &p).await;
        }

        /// The next message, which must be a standby status update.
        async fn status(&mut self) -> Status {
            let (tag, body) = self.read_frame().await.expect("a status update");
            assert!(
                tag == b'd' && body.first() == Some(&b'r') && body.len() == 34,
                "expected a standby status update, got {:?} {body:?}",
                tag as char
            );
            let at = |i: usize| Lsn(u64::from_be_bytes(body[i..i + 8].try_into().unwrap()));
            assert_eq!(body[33], 0, "steward never asks the server for a reply");
            Status {
                write: at(1),
                flush: at(9),
                apply: at(17),
            }
        }
    }

    fn status(write: u64, flush: u64) -> Status {
        Status {
            write: Lsn(write),
            flush: Lsn(flush),
            apply: Lsn(flush),
        }
    }

    /// `fut`, or a failure naming `what` after `secs` seconds.
    async fn within<T>(secs: u64, what: &str, fut: impl std::future::Future<Output = T>) -> T {
        tokio::time::timeout(Duration::from_secs(secs), fut)
            .await
            .unwrap_or_else(|_| panic!("no {what} within {secs} s"))
    }

    /// A running `run_session` against a fake walsender. The status interval
    /// is an hour, so every status update the server sees after the first
    /// one was caused by something the test did.
    struct Session {
        server: FakeWalsender,
        events: mpsc::Receiver<SourceEvent>,
        durable: watch::Sender<Lsn>,
        shutdown: watch::Sender<bool>,
        task: tokio::task::JoinHandle<Result<(), SourceError>>,
        _dir: tempfile::TempDir,
    }

    impl Session {
        /// Starts a session; the server has answered START_REPLICATION and
        /// taken the status update sent on entering streaming mode.
        async fn start(start: Lsn, skip_before: Lsn, durable: Lsn) -> (Session, String) {
            let dir = tempfile::tempdir().unwrap();
            let store = Store::open(&dir.path().join("s.redb")).unwrap();
            let (client_io, server_io) = tokio::io::duplex(64 * 1024);
            let client = ReplicationClient::over_test_pipe(client_io, 150000);
            let params = SessionParams {
                slot: "steward".into(),
                publication: "steward".into(),
                start,
                skip_before,
                status_interval: Duration::from_secs(3600),
                streaming: false,
                spill: Arc::new(store),
                position_wanted: Default::default(),
            };
            let (tx, events) = mpsc::channel(64);
            let durable_at_start = durable;
            let (durable, durable_rx) = watch::channel(durable);
            let (shutdown, shutdown_rx) = watch::channel(false);
            let task = tokio::spawn(run_session(client, params, tx, durable_rx, shutdown_rx));
            let mut server = FakeWalsender { io: server_io };
            let command = within(5, "START_REPLICATION", server.accept_start()).await;
            let first = within(5, "first status update", server.status()).await;
            assert_eq!(
                first,
                status(start.0.max(durable_at_start.0), durable_at_start.0)
            );
            let session = Session {
                server,
                events,
                durable,
                shutdown,
                task,
                _dir: dir,
            };
            (session, command)
        }

        async fn next_event(&mut self) -> String {
            let event = within(5, "event from the session", self.events.recv())
                .await
                .expect("the session is running");
            show(&event)
        }
    }

    #[tokio::test]
    async fn a_keepalive_asking_for_a_reply_is_answered_at_once_with_the_durable_position() {
        let (mut s, command) = Session::start(Lsn(0x100), Lsn(0x100), Lsn(0x100)).await;
        assert!(
            command.starts_with("START_REPLICATION SLOT \"steward\" LOGICAL 0/100"),
            "{command}"
        );
        // A keepalive that does not ask for a reply gets none (the interval is an hour).
        s.server.keepalive(0x900, false).await;
        assert!(
            tokio::time::timeout(Duration::from_millis(300), s.server.status())
                .await
                .is_err(),
            "no status update without a request"
        );
        // Outside a transaction a keepalive tells the daemon the server's position.
        assert_eq!(s.next_event().await, "position 2304");

        // A transaction is received but not yet durable.
        s.server.xlog(0x950, 0x960, &begin(0x950, 42)).await;
        s.server.xlog(0x958, 0x960, &commit(0x950, 0x960)).await;
        assert_eq!(s.next_event().await, "begin 42 @2384");
        assert_eq!(s.next_event().await, "commit 2400");

        // The server asks: the answer comes at once, reports everything
        // received as written, and flushes only what is durable (not the
        // keepalive position, which lies past a commit not yet durable).
        s.server.keepalive(0x1000, true).await;
        assert_eq!(
            within(1, "reply to the keepalive", s.server.status()).await,
            status(0x1000, 0x100)
        );

        // Once the commit is durable, the idle keepalive position is confirmed.
        s.durable.send(Lsn(0x960)).unwrap();
        assert_eq!(
            within(1, "durable progress report", s.server.status()).await,
            status(0x1000, 0x1000)
        );
        s.server.keepalive(0x1100, true).await;
        assert_eq!(
            within(1, "reply to the second keepalive", s.server.status()).await,
            status(0x1100, 0x1100)
        );

        // Shutdown: a last status update, then the end of the copy.
        s.shutdown.send(true).unwrap();
        assert_eq!(
            within(1, "final status update", s.server.status()).await,
            status(0x1100, 0x1100)
        );
        let (tag, _) = within(1, "CopyDone", s.server.read_frame()).await.unwrap();
        assert_eq!(tag, b'c');
        drop(s.server);
        within(10, "session end", s.task).await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn malformed_pgoutput_stops_the_session_with_an_error_naming_the_lsn() {
        let cases: [(&str, &[u8]); 3] = [
            (
                "an Insert cut off after its relation id",
                b"I\x00\x00\x40\x10",
            ),
            ("a Begin three bytes long", b"B\x00\x01"),
            ("an unknown message type", b"\xff\x00"),
        ];
        for (what, bytes) in cases {
            let (mut s, _) = Session::start(Lsn(0x100), Lsn(0x100), Lsn(0x100)).await;
            s.server.xlog(0x1_6B37_4800, 0x1_6B37_4900, bytes).await;
            let e = within(5, "session end", s.task)
                .await
                .unwrap()
                .expect_err(what);
            let text = e.to_string();
            assert!(
                text.contains("WAL record at 1/6B374800"),
                "{what}: the error names the LSN as PostgreSQL writes it: {text}"
            );
            assert!(
                !e.is_transient(),
                "{what}: reconnecting cannot help: {text}"
            );
            assert!(s.events.try_recv().is_err(), "{what}: nothing passed on");
        }
    }

    #[tokio::test]
    async fn a_plain_transaction_the_store_already_holds_is_not_passed_on_again() {
        // The store's checkpoint is 0x510, the end of a transaction it holds;
        // the session starts earlier, so the server sends that transaction again.
        let (mut s, _) = Session::start(Lsn(0x100), Lsn(0x510), Lsn(0x510)).await;
        for (lsn, message) in [
            (0x4f0, begin(0x500, 7)),
            (0x4f8, relation_message()),
            (0x4f8, insert(None, "held")),
            (0x500, commit(0x500, 0x510)),
            (0x5f0, begin(0x600, 8)),
            (0x5f8, insert(None, "new")),
            (0x600, commit(0x600, 0x610)),
        ] {
            s.server.xlog(lsn, lsn + 8, &message).await;
        }
        // The relation passes (later transactions need it); the held
        // transaction does not.
        let mut got = Vec::new();
        for _ in 0..4 {
            got.push(s.next_event().await);
        }
        assert_eq!(
            got,
            ["relation 16400", "begin 8 @1536", "new", "commit 1552"]
        );
        assert!(
            tokio::time::timeout(Duration::from_millis(200), s.events.recv())
                .await
                .is_err(),
            "nothing more"
        );
        s.shutdown.send(true).unwrap();
        within(1, "final status update", s.server.status()).await;
        drop(s.server);
        within(10, "session end", s.task).await.unwrap().unwrap();
    }

    #[test]
    fn reconnect_delay_grows_and_is_capped() {
        assert!(reconnect_delay(0) < reconnect_delay(3));
        assert_eq!(reconnect_delay(30), Duration::from_secs(30));
    }
}
