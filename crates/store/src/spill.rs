//! The spill of streamed in-progress transactions (pgoutput protocol 2,
//! `streaming = on`): the server sends the changes of a large transaction
//! before it commits, and they wait here until its Stream Commit or Stream
//! Abort. Nothing here is needed after a crash or reconnect — the server sends
//! every transaction not committed before the confirmed position again from
//! its first change — so every write is `Durability::None` and a new
//! replication session starts by clearing the table.
//!
//! Layout: `(top-level xid, chunk number)` → a chunk of records, each
//! `subxid: u32 LE, len: u32 LE, bytes` where `bytes` is the pgoutput message
//! exactly as the server sent it and `subxid` the (sub)transaction it belongs
//! to. Chunks of up to [`SPILL_CHUNK_BYTES`] keep the B-tree small and the
//! writes sequential (one redb row per change would cost a B-tree insert per
//! row, see `tables`).

use redb::{Durability, ReadableTable, ReadableTableMetadata, TableDefinition};

use super::{Store, StoreError, TxnError};

/// `(top xid, chunk number)` → records (see the module documentation).
const STREAM_SPILL: TableDefinition<(u32, u64), &[u8]> = TableDefinition::new("stream_spill");

/// A chunk is closed once it holds this many bytes (a single larger record
/// gets a chunk of its own).
pub const SPILL_CHUNK_BYTES: usize = 60 * 1024;

/// Appends one record to a chunk being built.
pub fn push_record(chunk: &mut Vec<u8>, subxid: u32, message: &[u8]) {
    chunk.extend_from_slice(&subxid.to_le_bytes());
    chunk.extend_from_slice(&(message.len() as u32).to_le_bytes());
    chunk.extend_from_slice(message);
}

/// The records of a chunk, in order: `(subxid, byte range of the message)`.
pub fn records(chunk: &[u8]) -> Result<Vec<(u32, std::ops::Range<usize>)>, String> {
    let mut out = Vec::new();
    let mut at = 0usize;
    while at < chunk.len() {
        let header = chunk
            .get(at..at + 8)
            .ok_or_else(|| format!("spill chunk record at {at} has a truncated header"))?;
        let subxid = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let len = u32::from_le_bytes([header[4], header[5], header[6], header[7]]) as usize;
        let start = at + 8;
        let end = start
            .checked_add(len)
            .filter(|&e| e <= chunk.len())
            .ok_or_else(|| format!("spill chunk record at {at} claims {len} bytes past the end"))?;
        out.push((subxid, start..end));
        at = end;
    }
    Ok(out)
}

/// What is left of a chunk after [`Spill::spill_remove_subxact`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkLeft {
    /// Records still in the chunk.
    pub records: u32,
    /// Records removed from it.
    pub removed: u32,
    /// Smallest subxid of the remaining records (`u32::MAX` if none).
    pub min_subxid: u32,
    /// Largest subxid of the remaining records (0 if none).
    pub max_subxid: u32,
}

/// What the replication source may do with the state file: spill the
/// changes of streamed transactions until they commit, read them back and
/// drop them. Nothing else of the store is within its reach.
///
/// The source holds it as a `dyn Spill`: a call moves a whole chunk (up to
/// [`SPILL_CHUNK_BYTES`]) or a batch of them, so the indirect call is
/// nothing beside it, and the streaming session stays one non-generic
/// function.
pub trait Spill: Send + Sync {
    /// Drops every spilled change. Called when a replication session starts.
    fn spill_clear(&self) -> Result<(), StoreError>;

    /// Writes chunks (`(xid, chunk number)`, bytes) in one non-durable commit.
    fn spill_write(&self, chunks: &[((u32, u64), Vec<u8>)]) -> Result<(), StoreError>;

    /// The chunk `(xid, seq)`, if it exists.
    fn spill_read(&self, xid: u32, seq: u64) -> Result<Option<Vec<u8>>, StoreError>;

    /// Removes the records of `subxid` from chunk `(xid, seq)` (a ROLLBACK TO
    /// SAVEPOINT), deleting the chunk when nothing is left. Returns what is
    /// left, `None` if the chunk does not exist.
    fn spill_remove_subxact(
        &self,
        xid: u32,
        seq: u64,
        subxid: u32,
    ) -> Result<Option<ChunkLeft>, StoreError>;

    /// Drops every chunk of `xid` (after its commit was replayed, or its abort).
    fn spill_drop(&self, xid: u32) -> Result<(), StoreError>;
}

impl Spill for Store {
    fn spill_clear(&self) -> Result<(), StoreError> {
        self.write(self.lazy_durability(), |txn| {
            txn.delete_table(STREAM_SPILL)?;
            Ok(())
        })
    }

    fn spill_write(&self, chunks: &[((u32, u64), Vec<u8>)]) -> Result<(), StoreError> {
        if chunks.is_empty() {
            return Ok(());
        }
        self.write(Durability::None, |txn| {
            let mut table = txn.open_table(STREAM_SPILL)?;
            for (key, bytes) in chunks {
                table.insert(*key, bytes.as_slice())?;
            }
            Ok(())
        })
    }

    fn spill_read(&self, xid: u32, seq: u64) -> Result<Option<Vec<u8>>, StoreError> {
        self.read(|txn| {
            let table = match txn.open_table(STREAM_SPILL) {
                Ok(t) => t,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
                Err(e) => return Err(e.into()),
            };
            let v = table.get((xid, seq))?.map(|g| g.value().to_vec());
            Ok(v)
        })
    }

    fn spill_remove_subxact(
        &self,
        xid: u32,
        seq: u64,
        subxid: u32,
    ) -> Result<Option<ChunkLeft>, StoreError> {
        self.write(Durability::None, |txn| {
            let mut table = txn.open_table(STREAM_SPILL)?;
            let Some(chunk) = table.get((xid, seq))?.map(|g| g.value().to_vec()) else {
                return Ok(None);
            };
            let recs = records(&chunk).map_err(|detail| {
                TxnError::Corrupt(format!("stream spill of xid {xid}, chunk {seq}: {detail}"))
            })?;
            let mut kept = Vec::with_capacity(chunk.len());
            let mut left = ChunkLeft {
                records: 0,
                removed: 0,
                min_subxid: u32::MAX,
                max_subxid: 0,
            };
            for (sub, range) in recs {
                if sub == subxid {
                    left.removed += 1;
                    continue;
                }
                push_record(&mut kept, sub, &chunk[range]);
                left.records += 1;
                left.min_subxid = left.min_subxid.min(sub);
                left.max_subxid = left.max_subxid.max(sub);
            }
            if kept.is_empty() {
                table.remove((xid, seq))?;
            } else if kept.len() != chunk.len() {
                table.insert((xid, seq), kept.as_slice())?;
            }
            Ok(Some(left))
        })
    }

    fn spill_drop(&self, xid: u32) -> Result<(), StoreError> {
        self.write(self.lazy_durability(), |txn| {
            let mut table = txn.open_table(STREAM_SPILL)?;
            let mut keys = Vec::new();
            for item in table.range((xid, 0)..=(xid, u64::MAX))? {
                keys.push(item?.0.value());
            }
            for key in keys {
                table.remove(key)?;
            }
            Ok(())
        })
    }
}

impl Store {
    /// Number of spilled chunks (all transactions), for tests and status.
    pub fn spill_chunks(&self) -> Result<u64, StoreError> {
        self.read(|txn| match txn.open_table(STREAM_SPILL) {
            Ok(t) => Ok(t.len()?),
            Err(redb::TableError::TableDoesNotExist(_)) => Ok(0),
            Err(e) => Err(e.into()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(records_: &[(u32, &str)]) -> Vec<u8> {
        let mut c = Vec::new();
        for (sub, m) in records_ {
            push_record(&mut c, *sub, m.as_bytes());
        }
        c
    }

    fn texts(c: &[u8]) -> Vec<(u32, String)> {
        records(c)
            .unwrap()
            .into_iter()
            .map(|(s, r)| (s, String::from_utf8(c[r].to_vec()).unwrap()))
            .collect()
    }

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.redb")).unwrap();
        (dir, store)
    }

    #[test]
    fn records_round_trip_and_reject_garbage() {
        let c = chunk(&[(7, "a"), (8, ""), (7, "ccc")]);
        assert_eq!(
            texts(&c),
            vec![(7, "a".into()), (8, String::new()), (7, "ccc".into())]
        );
        assert!(records(&c[..c.len() - 1]).is_err());
        assert!(records(&c[..5]).is_err());
        assert!(records(&[]).unwrap().is_empty());
    }

    #[test]
    fn chunks_come_back_per_transaction_in_order_and_drop_alone() {
        let (_d, s) = store();
        s.spill_write(&[
            ((10, 1), chunk(&[(10, "t10 second")])),
            ((10, 0), chunk(&[(10, "t10 first")])),
            ((11, 0), chunk(&[(11, "t11")])),
        ])
        .unwrap();
        assert_eq!(
            texts(&s.spill_read(10, 0).unwrap().unwrap())[0].1,
            "t10 first"
        );
        assert_eq!(
            texts(&s.spill_read(10, 1).unwrap().unwrap())[0].1,
            "t10 second"
        );
        assert_eq!(s.spill_chunks().unwrap(), 3);
        s.spill_drop(10).unwrap();
        assert_eq!(s.spill_read(10, 0).unwrap(), None);
        assert_eq!(s.spill_chunks().unwrap(), 1, "the other transaction stays");
        s.spill_clear().unwrap();
        assert_eq!(s.spill_chunks().unwrap(), 0);
        assert_eq!(s.spill_read(11, 0).unwrap(), None);
    }

    #[test]
    fn a_subtransaction_abort_removes_only_its_records() {
        let (_d, s) = store();
        s.spill_write(&[
            (
                (10, 0),
                chunk(&[(10, "a"), (12, "b"), (10, "c"), (13, "d")]),
            ),
            ((10, 1), chunk(&[(12, "e")])),
        ])
        .unwrap();
        let left = s.spill_remove_subxact(10, 0, 12).unwrap().unwrap();
        assert_eq!(
            left,
            ChunkLeft {
                records: 3,
                removed: 1,
                min_subxid: 10,
                max_subxid: 13
            }
        );
        assert_eq!(
            texts(&s.spill_read(10, 0).unwrap().unwrap()),
            vec![(10, "a".into()), (10, "c".into()), (13, "d".into())]
        );
        // A chunk left empty is gone.
        assert_eq!(
            s.spill_remove_subxact(10, 1, 12).unwrap().unwrap().records,
            0
        );
        assert_eq!(s.spill_read(10, 1).unwrap(), None);
        assert_eq!(s.spill_remove_subxact(10, 1, 12).unwrap(), None);
    }
}
