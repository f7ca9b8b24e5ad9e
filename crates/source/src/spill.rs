//! Bookkeeping of streamed in-progress transactions (pgoutput protocol 2).
//!
//! Between Stream Start and Stream Stop the server sends changes of a
//! transaction that has not committed yet. They cannot be mapped yet: event
//! ids and versions come from the commit LSN, known only at Stream Commit. So
//! each message is appended, as the server sent it, to a small in-memory
//! chunk; full chunks go to the store's spill table (`store::spill`) in
//! batches, and at Stream Stop whatever is buffered is written too. Memory
//! per open transaction is one small index entry per chunk (its number and
//! the range of subtransaction ids in it), so a ROLLBACK TO SAVEPOINT only
//! rewrites the chunks that can hold the subtransaction's changes.
//!
//! PostgreSQL tags every streamed change with the xid of the
//! (sub)transaction that made it (`pgoutput_change`: `xid =
//! change->txn->xid` while streaming; verified against PostgreSQL 15: after
//! `SAVEPOINT a; INSERT ...; ROLLBACK TO a` the inserts carry the
//! subtransaction's xid and Stream Abort names (top xid, that xid)). Relation
//! messages are kept under the top-level xid: an extra schema message is
//! harmless, a missing one is not.

use std::collections::HashMap;
use std::sync::Arc;

use steward_store::spill::{push_record, SPILL_CHUNK_BYTES};
use steward_store::{Spill, StoreError};

/// Buffered chunks are written once they hold this many bytes.
const WRITE_BATCH_BYTES: usize = 1024 * 1024;

#[derive(Debug, Clone, Copy)]
struct ChunkInfo {
    seq: u64,
    min_subxid: u32,
    max_subxid: u32,
}

#[derive(Debug, Default)]
struct SpilledTxn {
    next_seq: u64,
    chunks: Vec<ChunkInfo>,
    records: u64,
}

/// A streamed transaction that committed: its chunks, in order.
#[derive(Debug)]
pub(crate) struct Committed {
    pub(crate) xid: u32,
    pub(crate) chunks: Vec<u64>,
    pub(crate) records: u64,
}

pub(crate) struct StreamSpill {
    store: Arc<dyn Spill>,
    txns: HashMap<u32, SpilledTxn>,
    /// Top-level xid of the open stream block.
    current: Option<u32>,
    chunk: Vec<u8>,
    chunk_min: u32,
    chunk_max: u32,
    ready: Vec<((u32, u64), Vec<u8>)>,
    ready_bytes: usize,
}

impl StreamSpill {
    /// Starts empty: whatever an earlier session spilled is dropped, since the
    /// server sends every transaction that was not committed before the
    /// confirmed position again, from its first change.
    pub(crate) fn new(store: Arc<dyn Spill>) -> Result<StreamSpill, StoreError> {
        block(|| store.spill_clear())?;
        Ok(StreamSpill {
            store,
            txns: HashMap::new(),
            current: None,
            chunk: Vec::new(),
            chunk_min: u32::MAX,
            chunk_max: 0,
            ready: Vec::new(),
            ready_bytes: 0,
        })
    }

    pub(crate) fn in_stream(&self) -> bool {
        self.current.is_some()
    }

    /// Stream Start. `Err` names what is inconsistent in the stream.
    pub(crate) fn start(&mut self, xid: u32, first_segment: bool) -> Result<(), String> {
        if let Some(open) = self.current {
            return Err(format!(
                "Stream Start for xid {xid} while the stream block of xid {open} is still open"
            ));
        }
        match (first_segment, self.txns.contains_key(&xid)) {
            (true, true) => {
                return Err(format!(
                "Stream Start marked as the first segment of xid {xid}, which was already streamed"
            ))
            }
            (false, false) => {
                return Err(format!(
                "Stream Start continues xid {xid}, whose first segment this session never received"
            ))
            }
            (true, false) => {
                self.txns.insert(xid, SpilledTxn::default());
            }
            (false, true) => {}
        }
        self.current = Some(xid);
        Ok(())
    }

    /// One message of the open stream block. `subxid`: the xid it carries;
    /// `None` files it under the top-level transaction.
    pub(crate) fn push(&mut self, subxid: Option<u32>, message: &[u8]) -> Result<(), StoreError> {
        let Some(top) = self.current else {
            return Ok(());
        };
        let subxid = subxid.unwrap_or(top);
        push_record(&mut self.chunk, subxid, message);
        self.chunk_min = self.chunk_min.min(subxid);
        self.chunk_max = self.chunk_max.max(subxid);
        if let Some(txn) = self.txns.get_mut(&top) {
            txn.records += 1;
        }
        if self.chunk.len() >= SPILL_CHUNK_BYTES {
            self.seal();
            if self.ready_bytes >= WRITE_BATCH_BYTES {
                self.write()?;
            }
        }
        Ok(())
    }

    /// Stream Stop: everything of the block goes to the store.
    pub(crate) fn stop(&mut self) -> Result<(), StoreError> {
        self.seal();
        self.write()?;
        self.current = None;
        Ok(())
    }

    /// Stream Abort: all of `xid` when `subxid == xid`, otherwise only the
    /// changes of that subtransaction (a ROLLBACK TO SAVEPOINT).
    pub(crate) fn abort(&mut self, xid: u32, subxid: u32) -> Result<(), StoreError> {
        self.seal();
        self.write()?;
        if subxid == xid {
            if self.txns.remove(&xid).is_some() {
                block(|| self.store.spill_drop(xid))?;
            }
            return Ok(());
        }
        let Some(txn) = self.txns.get_mut(&xid) else {
            return Ok(());
        };
        let store = &self.store;
        let mut kept = Vec::with_capacity(txn.chunks.len());
        for info in std::mem::take(&mut txn.chunks) {
            if subxid < info.min_subxid || subxid > info.max_subxid {
                kept.push(info);
                continue;
            }
            if let Some(left) = block(|| store.spill_remove_subxact(xid, info.seq, subxid))? {
                if left.records > 0 {
                    kept.push(ChunkInfo {
                        seq: info.seq,
                        min_subxid: left.min_subxid,
                        max_subxid: left.max_subxid,
                    });
                }
                txn.records = txn.records.saturating_sub(u64::from(left.removed));
            }
        }
        txn.chunks = kept;
        Ok(())
    }

    /// Stream Commit: the transaction's chunks, in order, for replay. They
    /// stay in the store until [`StreamSpill::finish`].
    pub(crate) fn commit(&mut self, xid: u32) -> Result<Option<Committed>, StoreError> {
        self.seal();
        self.write()?;
        Ok(self.txns.remove(&xid).map(|txn| Committed {
            xid,
            chunks: txn.chunks.iter().map(|c| c.seq).collect(),
            records: txn.records,
        }))
    }

    pub(crate) fn read(&self, xid: u32, seq: u64) -> Result<Option<Vec<u8>>, StoreError> {
        block(|| self.store.spill_read(xid, seq))
    }

    /// Drops a committed transaction's chunks once replayed (or skipped).
    pub(crate) fn finish(&self, xid: u32) -> Result<(), StoreError> {
        block(|| self.store.spill_drop(xid))
    }

    /// Streamed transactions neither committed nor aborted yet.
    #[cfg(test)]
    pub(crate) fn open_transactions(&self) -> usize {
        self.txns.len()
    }

    fn seal(&mut self) {
        if self.chunk.is_empty() {
            return;
        }
        let Some(top) = self.current else {
            return;
        };
        let Some(txn) = self.txns.get_mut(&top) else {
            return;
        };
        let seq = txn.next_seq;
        txn.next_seq += 1;
        txn.chunks.push(ChunkInfo {
            seq,
            min_subxid: self.chunk_min,
            max_subxid: self.chunk_max,
        });
        let chunk = std::mem::take(&mut self.chunk);
        self.ready_bytes += chunk.len();
        self.ready.push(((top, seq), chunk));
        self.chunk_min = u32::MAX;
        self.chunk_max = 0;
    }

    fn write(&mut self) -> Result<(), StoreError> {
        if self.ready.is_empty() {
            return Ok(());
        }
        let ready = std::mem::take(&mut self.ready);
        self.ready_bytes = 0;
        block(|| self.store.spill_write(&ready))
    }
}

/// Store calls wait for the disk; the source task runs on the multi-threaded runtime.
fn block<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}
