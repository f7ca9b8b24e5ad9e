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

use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::{interval, MissedTickBehavior};

use crate::model::{Change, Lsn, Relation};
use crate::source::pgoutput::{self, PgOutputMessage};
use crate::source::wire::{ReplicationClient, ReplicationMessage, ReplicationStream, WireError};

/// What the source hands downstream, in stream order.
#[derive(Debug)]
pub enum SourceEvent {
    Relation(Relation),
    Begin {
        final_lsn: Lsn,
        commit_time_micros: i64,
        xid: u32,
    },
    Change(Change),
    Truncate {
        relation_ids: Vec<u32>,
    },
    Commit {
        commit_lsn: Lsn,
        end_lsn: Lsn,
        commit_time_micros: i64,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("malformed pgoutput message in WAL record at {lsn}: {problem}; this is a bug or a corrupted stream — please report it with the server version")]
    Decode { lsn: Lsn, problem: String },
    #[error("the server ended the replication stream")]
    Ended,
    #[error("unexpected pgoutput message at {lsn}: {what}")]
    Unexpected { lsn: Lsn, what: String },
    #[error("the replication slot '{slot}' no longer exists (someone dropped it while steward ran): changes since steward's checkpoint may be lost. Stop steward, run `steward reset --all -c FILE` (recreates the slot and resends every target a snapshot), then start it")]
    SlotDropped { slot: String },
    #[error("the replication slot '{slot}' was invalidated: the server removed WAL it still needed (max_slot_wal_keep_size). Stop steward, run `steward reset --all -c FILE` (recreates the slot and resends every target a snapshot), then start it; consider a larger max_slot_wal_keep_size")]
    SlotInvalidated { slot: String },
}

impl SourceError {
    /// Whether reconnecting may help.
    pub fn is_transient(&self) -> bool {
        match self {
            // 55006: the slot is still held by the walsender of a previous
            // connection (after a crash it exits within moments).
            SourceError::Wire(e) => e.is_transient() || e.sqlstate() == Some("55006"),
            SourceError::Ended => true,
            SourceError::Decode { .. }
            | SourceError::Unexpected { .. }
            | SourceError::SlotDropped { .. }
            | SourceError::SlotInvalidated { .. } => false,
        }
    }
}

pub struct SessionParams {
    pub slot: String,
    pub publication: String,
    /// Where to start; `Lsn::ZERO` lets the server use the slot's confirmed position.
    pub start: Lsn,
    /// Transactions whose commit LSN is below this are already durable: dropped.
    pub skip_before: Lsn,
    pub status_interval: Duration,
}

/// How often a durable-LSN advance is reported at most, so a busy stream
/// does not send a status update per commit.
const DURABLE_REPORT_INTERVAL: Duration = Duration::from_millis(100);

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
    let options = [
        ("proto_version", "1"),
        ("publication_names", publication.as_str()),
    ];
    let mut stream = client
        .start_logical_replication(&params.slot, params.start, &options)
        .await
        .map_err(|e| slot_error(e, &params.slot))?;
    tracing::info!(slot = %params.slot, start = %params.start, "replication started");

    let mut tracker = FlushTracker {
        received_commit_end: Lsn::ZERO,
        idle_wal_end: Lsn::ZERO,
        written: params.start,
        last_flush_sent: Lsn::ZERO,
    };
    let mut in_txn = false;
    let mut skipping = false;
    let mut pending: Option<SourceEvent> = None;
    let mut report_due = false;

    let mut status_tick = interval(params.status_interval);
    status_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut report_tick = interval(DURABLE_REPORT_INTERVAL);
    report_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);

    loop {
        tokio::select! {
            biased;
            _ = shutdown.changed() => {
                let durable_now = *durable.borrow();
                let flush = tracker.flush(durable_now);
                send_status(&mut stream, tracker.written, flush, false).await?;
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
                    // The daemon dropped its receiver: it is shutting down.
                    Err(_) => return Ok(()),
                }
            }
            message = stream.recv(), if pending.is_none() => {
                match message? {
                    None => return Err(SourceError::Ended),
                    Some(ReplicationMessage::XLogData { wal_start, wal_end, data, .. }) => {
                        tracker.written = tracker.written.max(wal_end).max(wal_start);
                        let decoded = pgoutput::decode(&data, false)
                            .map_err(|e| SourceError::Decode { lsn: wal_start, problem: e.to_string() })?;
                        pending = route(decoded, wal_start, &params, &mut in_txn, &mut skipping, &mut tracker)?;
                    }
                    Some(ReplicationMessage::Keepalive { wal_end, reply_requested, .. }) => {
                        tracker.written = tracker.written.max(wal_end);
                        if !in_txn {
                            tracker.idle_wal_end = tracker.idle_wal_end.max(wal_end);
                        }
                        if reply_requested {
                            let flush = tracker.flush(*durable.borrow());
                            send_status(&mut stream, tracker.written, flush, false).await?;
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
                let flush = tracker.flush(*durable.borrow());
                send_status(&mut stream, tracker.written, flush, false).await?;
            }
            _ = status_tick.tick() => {
                let flush = tracker.flush(*durable.borrow());
                send_status(&mut stream, tracker.written, flush, false).await?;
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

fn route(
    message: PgOutputMessage,
    lsn: Lsn,
    params: &SessionParams,
    in_txn: &mut bool,
    skipping: &mut bool,
    tracker: &mut FlushTracker,
) -> Result<Option<SourceEvent>, SourceError> {
    Ok(match message {
        PgOutputMessage::Begin {
            final_lsn,
            commit_time_micros,
            xid,
        } => {
            *in_txn = true;
            *skipping = final_lsn < params.skip_before;
            if *skipping {
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
            *in_txn = false;
            if std::mem::take(skipping) {
                None
            } else {
                tracker.received_commit_end = tracker.received_commit_end.max(end_lsn);
                Some(SourceEvent::Commit {
                    commit_lsn,
                    end_lsn,
                    commit_time_micros,
                })
            }
        }
        PgOutputMessage::Relation { relation, .. } => Some(SourceEvent::Relation(relation)),
        PgOutputMessage::Change { change, .. } => {
            (!*skipping).then_some(SourceEvent::Change(change))
        }
        PgOutputMessage::Truncate { relation_ids, .. } => {
            (!*skipping).then_some(SourceEvent::Truncate { relation_ids })
        }
        PgOutputMessage::Type { .. }
        | PgOutputMessage::Origin { .. }
        | PgOutputMessage::Message { .. } => None,
        other @ (PgOutputMessage::StreamStart { .. }
        | PgOutputMessage::StreamStop
        | PgOutputMessage::StreamCommit { .. }
        | PgOutputMessage::StreamAbort { .. }) => {
            return Err(SourceError::Unexpected {
                lsn,
                what: format!("{other:?} although streaming was not requested"),
            })
        }
    })
}

/// When a session ends with a transient error, how long to wait before the next attempt.
pub fn reconnect_delay(attempt: u32) -> Duration {
    let base = Duration::from_millis(250).saturating_mul(1u32 << attempt.min(7));
    base.min(Duration::from_secs(30))
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn reconnect_delay_grows_and_is_capped() {
        assert!(reconnect_delay(0) < reconnect_delay(3));
        assert_eq!(reconnect_delay(30), Duration::from_secs(30));
    }
}
