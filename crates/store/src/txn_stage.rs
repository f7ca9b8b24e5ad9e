//! The records of a source transaction too large to hold in memory, staged
//! until its commit (see `steward_core::pipeline::large_txn`): each record once, folded to
//! its final state, in the order its governance evaluates it.
//!
//! Layout: `(rank, order)` → the record's bytes (opaque here), and the
//! record's identity (entity and key, as bytes) → its `(rank, order)`, so a
//! later change of a staged record finds it. Nothing here is needed after a
//! crash or reconnect — the server sends every transaction not committed
//! before the confirmed position again — so every write is
//! `Durability::None` and a new replication session starts by clearing it.

use redb::{Durability, ReadableTable, TableDefinition};

use steward_core::pipeline::large_txn::{Merge, StagePos, StageRecord, TxnStage};

use super::{Store, StoreError, TxnError};

const STAGE: TableDefinition<(u32, u64), &[u8]> = TableDefinition::new("txn_stage");
const STAGE_INDEX: TableDefinition<&[u8], (u32, u64)> = TableDefinition::new("txn_stage_index");

impl TxnStage for Store {
    type Error = StoreError;

    /// Drops every staged record.
    fn stage_clear(&self) -> Result<(), StoreError> {
        self.write(Durability::None, |txn| {
            txn.delete_table(STAGE)?;
            txn.delete_table(STAGE_INDEX)?;
            Ok(())
        })
    }

    /// Stages records in one commit. A record already staged is replaced by
    /// `merge(its bytes, the new bytes)` and moves to the new position.
    fn stage_fold(
        &self,
        records: Vec<StageRecord>,
        merge: &mut Merge<'_>,
    ) -> Result<(), StoreError> {
        if records.is_empty() {
            return Ok(());
        }
        self.write(Durability::None, |txn| {
            let mut table = txn.open_table(STAGE)?;
            let mut index = txn.open_table(STAGE_INDEX)?;
            for (id, pos, bytes) in records {
                let earlier = index.get(id.as_slice())?.map(|g| g.value());
                let bytes = match earlier {
                    Some(at) => {
                        let old = table.remove(at)?.map(|g| g.value().to_vec());
                        match old {
                            Some(old) => merge(&old, bytes).map_err(TxnError::Corrupt)?,
                            None => bytes,
                        }
                    }
                    None => bytes,
                };
                table.insert(pos, bytes.as_slice())?;
                index.insert(id.as_slice(), pos)?;
            }
            Ok(())
        })
    }

    /// Replaces the records at `remove` by `put` (which may reuse their
    /// positions), and stages `marks` whose identity is not staged yet.
    fn stage_rewrite(
        &self,
        remove: &[(Vec<u8>, StagePos)],
        put: Vec<StageRecord>,
        marks: Vec<StageRecord>,
    ) -> Result<(), StoreError> {
        self.write(Durability::None, |txn| {
            let mut table = txn.open_table(STAGE)?;
            let mut index = txn.open_table(STAGE_INDEX)?;
            for (id, pos) in remove {
                table.remove(*pos)?;
                index.remove(id.as_slice())?;
            }
            for (id, pos, bytes) in put {
                table.insert(pos, bytes.as_slice())?;
                index.insert(id.as_slice(), pos)?;
            }
            for (id, pos, bytes) in marks {
                if index.get(id.as_slice())?.is_none() {
                    table.insert(pos, bytes.as_slice())?;
                    index.insert(id.as_slice(), pos)?;
                }
            }
            Ok(())
        })
    }

    /// Records identities at a position without staging a record (records
    /// evaluated outside their own entry).
    fn stage_note(&self, ids: &[(Vec<u8>, StagePos)]) -> Result<(), StoreError> {
        if ids.is_empty() {
            return Ok(());
        }
        self.write(Durability::None, |txn| {
            let mut index = txn.open_table(STAGE_INDEX)?;
            for (id, pos) in ids {
                index.insert(id.as_slice(), *pos)?;
            }
            Ok(())
        })
    }

    /// Up to `limit` staged records after `after` (from the first if `None`), in order.
    fn stage_read(
        &self,
        after: Option<StagePos>,
        limit: usize,
    ) -> Result<Vec<(StagePos, Vec<u8>)>, StoreError> {
        self.read(|txn| {
            let table = match txn.open_table(STAGE) {
                Ok(t) => t,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
                Err(e) => return Err(e.into()),
            };
            let range = match after {
                Some(after) => table.range(after..)?,
                None => table.range(..)?,
            };
            let mut out = Vec::with_capacity(limit.min(4096));
            for item in range {
                let (k, v) = item?;
                let pos = k.value();
                if Some(pos) == after {
                    continue;
                }
                out.push((pos, v.value().to_vec()));
                if out.len() >= limit {
                    break;
                }
            }
            Ok(out)
        })
    }

    /// Where the record with identity `id` is staged, if it is.
    fn stage_place(&self, id: &[u8]) -> Result<Option<StagePos>, StoreError> {
        self.read(|txn| {
            let index = match txn.open_table(STAGE_INDEX) {
                Ok(t) => t,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
                Err(e) => return Err(e.into()),
            };
            let at = index.get(id)?.map(|g| g.value());
            Ok(at)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.redb")).unwrap();
        (dir, store)
    }

    #[test]
    fn a_restaged_record_is_merged_and_moves_to_its_new_position() {
        let (_dir, s) = store();
        assert!(s.stage_read(None, 1).unwrap().is_empty());
        let rec = |id: &str, pos: StagePos, v: &str| (id.as_bytes().to_vec(), pos, v.into());
        let mut merge = |old: &[u8], new: Vec<u8>| {
            let mut m = old.to_vec();
            m.push(b'+');
            m.extend(new);
            Ok(m)
        };
        s.stage_fold(
            vec![rec("a", (0, 1), "a1"), rec("b", (1, 2), "b2")],
            &mut merge,
        )
        .unwrap();
        s.stage_fold(vec![rec("a", (0, 5), "a5")], &mut merge)
            .unwrap();
        let all = s.stage_read(None, 10).unwrap();
        assert_eq!(
            all,
            vec![((0, 5), b"a1+a5".to_vec()), ((1, 2), b"b2".to_vec())]
        );
        assert_eq!(s.stage_place(b"a").unwrap(), Some((0, 5)));
        assert_eq!(s.stage_read(Some((0, 5)), 10).unwrap().len(), 1);
        assert_eq!(s.stage_read(None, 1).unwrap().len(), 1);

        // A mark of a staged record is ignored; one of another record is staged.
        s.stage_rewrite(
            &[(b"b".to_vec(), (1, 2))],
            vec![rec("b", (1, 2), "B")],
            vec![rec("a", (0, 9), "mark"), rec("c", (2, 9), "mark")],
        )
        .unwrap();
        let all = s.stage_read(None, 10).unwrap();
        assert_eq!(all.len(), 3);
        assert_eq!(all[1], ((1, 2), b"B".to_vec()));
        assert_eq!(all[2], ((2, 9), b"mark".to_vec()));
        s.stage_note(&[(b"d".to_vec(), (1, 2))]).unwrap();
        assert_eq!(s.stage_place(b"d").unwrap(), Some((1, 2)));

        s.stage_clear().unwrap();
        assert!(s.stage_read(None, 1).unwrap().is_empty());
        assert_eq!(s.stage_place(b"a").unwrap(), None);
    }
}
