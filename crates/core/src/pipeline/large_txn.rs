//! A source transaction that touches more records than
//! `state.commit_max_events` (a mass import, a price update of every
//! product) is not held in memory: its records go to a [`TxnStage`] (the
//! state file's, in the daemon), each folded into its staged entry, so a record
//! changed again after it was staged still yields ONE document per key for
//! the transaction, carrying its final state.
//!
//! At the commit the stage is governed in two passes over pieces of
//! `commit_max_events` records, the two phases of an ordinary
//! transaction's governance (`Governance::process_drain_into`) spread over
//! disk: phase one updates the tracked state with every record and marks
//! the records depending on them; phase two evaluates every record once,
//! in the same (rank, order) an ordinary transaction uses. Memory holds one
//! piece at a time.

use anyhow::Context;

use crate::config::{EntityIndex, TargetIndex};
use crate::model::{Event, Lsn};
use crate::pipeline::govern::{Elsewhere, Place, StagedRecord};
use crate::pipeline::{Governance, Mapped};

/// Where a staged record stands: (evaluation rank, order within the rank).
pub type StagePos = (u32, u64);

/// A record to stage: its identity, position and bytes.
pub type StageRecord = (Vec<u8>, StagePos, Vec<u8>);

/// Merges a staged record's bytes with a later change's.
pub type Merge<'a> = dyn FnMut(&[u8], Vec<u8>) -> Result<Vec<u8>, String> + 'a;

/// Where the records of a large transaction wait for its commit: each record
/// once, under its identity, ordered by position. Bytes are opaque to the
/// stage. Nothing staged outlives a replication session, so a stage needs
/// no durability.
pub trait TxnStage {
    /// What the stage's storage fails with.
    type Error: std::error::Error + Send + Sync + 'static;

    /// Drops every staged record.
    fn stage_clear(&self) -> Result<(), Self::Error>;

    /// Stages records in one step. A record already staged is replaced by
    /// `merge(its bytes, the new bytes)` and moves to the new position.
    fn stage_fold(
        &self,
        records: Vec<StageRecord>,
        merge: &mut Merge<'_>,
    ) -> Result<(), Self::Error>;

    /// Replaces the records at `remove` by `put` (which may reuse their
    /// positions), and stages `marks` whose identity is not staged yet.
    fn stage_rewrite(
        &self,
        remove: &[(Vec<u8>, StagePos)],
        put: Vec<StageRecord>,
        marks: Vec<StageRecord>,
    ) -> Result<(), Self::Error>;

    /// Records identities at a position without staging a record (records
    /// evaluated outside their own entry).
    fn stage_note(&self, ids: &[(Vec<u8>, StagePos)]) -> Result<(), Self::Error>;

    /// Up to `limit` staged records after `after` (from the first if `None`), in order.
    fn stage_read(
        &self,
        after: Option<StagePos>,
        limit: usize,
    ) -> Result<Vec<(StagePos, Vec<u8>)>, Self::Error>;

    /// Where the record with identity `id` is staged, if it is.
    fn stage_place(&self, id: &[u8]) -> Result<Option<StagePos>, Self::Error>;
}

/// Tags of staged bytes: a change not yet through phase one, or a record after it.
const TAG_MAPPED: u8 = b'M';
const TAG_STAGED: u8 = b'S';

/// Takes a governed piece's events (and the governance, whose state changes go with them).
pub(crate) type Emit<'a> =
    dyn FnMut(Vec<(TargetIndex, Event)>, &mut Governance) -> anyhow::Result<()> + 'a;

/// Stages and governs the source transactions too large to hold in memory
/// (see the module documentation); one per replication session.
#[derive(Default)]
pub struct LargeTxn {
    staged: bool,
    marks: u64,
}

impl LargeTxn {
    /// Whether the open transaction has records on the stage.
    pub fn is_active(&self) -> bool {
        self.staged
    }

    /// Drops what an abandoned transaction staged (a new replication session).
    pub fn reset<S: TxnStage>(&mut self, store: &S) -> anyhow::Result<()> {
        store
            .stage_clear()
            .context("cannot clear the stage of large transactions")?;
        *self = LargeTxn::default();
        Ok(())
    }

    /// Moves the transaction's records so far to the stage, folding each
    /// into the entry of its record if it has one.
    pub fn absorb<S: TxnStage>(
        &mut self,
        store: &S,
        governance: &Governance,
        mapped: &mut Vec<Mapped>,
    ) -> anyhow::Result<()> {
        let records = mapped
            .drain(..)
            .map(|m| {
                Ok((
                    identity(m.entity, &m.event.key),
                    (governance.rank_of(m.entity), u64::from(m.index)),
                    encode(TAG_MAPPED, &m)?,
                ))
            })
            .collect::<Result<Vec<StageRecord>, String>>()
            .map_err(anyhow::Error::msg)?;
        store
            .stage_fold(records, &mut |old, new| {
                let mut old = decode_mapped(old)?;
                old.fold(decode_mapped(&new)?);
                encode(TAG_MAPPED, &old)
            })
            .context("cannot stage a large transaction's records")?;
        self.staged = true;
        Ok(())
    }

    /// Governs the staged transaction, handing each piece's events to
    /// `emit`, then clears the stage.
    pub fn govern<S: TxnStage>(
        &mut self,
        store: &S,
        governance: &mut Governance,
        piece: usize,
        commit_lsn: Lsn,
        time: &str,
        emit: &mut Emit<'_>,
    ) -> anyhow::Result<()> {
        let piece = piece.max(1);
        self.phase_one(store, governance, piece)?;
        let mut after = None;
        loop {
            let read = store
                .stage_read(after, piece)
                .context("cannot read a large transaction's stage")?;
            let Some(&(cursor, _)) = read.last() else {
                break;
            };
            let mut records = Vec::with_capacity(read.len());
            for (_, bytes) in read {
                records.push(decode_staged(&bytes).map_err(anyhow::Error::msg)?);
            }
            let mut places = StagePlaces {
                store,
                cursor,
                evaluated: Vec::new(),
                error: None,
            };
            let mut out = Vec::with_capacity(records.len());
            governance.evaluate_piece(records, &mut places, commit_lsn, time, &mut out);
            if let Some(e) = places.error {
                return Err(e).context("cannot read a large transaction's stage");
            }
            let evaluated: Vec<_> = places
                .evaluated
                .into_iter()
                .map(|id| (id, cursor))
                .collect();
            store
                .stage_note(&evaluated)
                .context("cannot stage a large transaction's records")?;
            emit(out, governance)?;
            after = Some(cursor);
        }
        self.reset(store)
    }

    /// Phase one over every piece: tracked state, and marks of dependents.
    fn phase_one<S: TxnStage>(
        &mut self,
        store: &S,
        governance: &mut Governance,
        piece: usize,
    ) -> anyhow::Result<()> {
        let mut after = None;
        loop {
            let read = store
                .stage_read(after, piece)
                .context("cannot read a large transaction's stage")?;
            let Some(&(last, _)) = read.last() else {
                return Ok(());
            };
            after = Some(last);
            let mut mapped = Vec::with_capacity(read.len());
            let mut remove = Vec::with_capacity(read.len());
            for (pos, bytes) in read {
                // Marks of earlier pieces are already through phase one.
                if bytes.first() == Some(&TAG_MAPPED) {
                    let m = decode_mapped(&bytes).map_err(anyhow::Error::msg)?;
                    remove.push((identity(m.entity, &m.event.key), pos));
                    mapped.push(m);
                }
            }
            let phase = governance.stage_piece(&mut mapped);
            let put = phase
                .records
                .iter()
                .map(|r| {
                    Ok((
                        identity(r.entity, &r.key),
                        (r.rank, r.order),
                        encode(TAG_STAGED, r)?,
                    ))
                })
                .collect::<Result<Vec<StageRecord>, String>>()
                .map_err(anyhow::Error::msg)?;
            let marks = phase
                .deferred
                .into_iter()
                .map(|(rank, entity, key)| {
                    self.marks += 1;
                    let order = StagedRecord::deferral_order(self.marks);
                    let id = identity(entity, &key);
                    let mark = StagedRecord::deferral(rank, order, entity, key);
                    Ok((id, (rank, order), encode(TAG_STAGED, &mark)?))
                })
                .collect::<Result<Vec<StageRecord>, String>>()
                .map_err(anyhow::Error::msg)?;
            store
                .stage_rewrite(&remove, put, marks)
                .context("cannot stage a large transaction's records")?;
        }
    }
}

/// Places records for the governance from the stage, while a piece ending at
/// `cursor` is evaluated.
struct StagePlaces<'a, S: TxnStage> {
    store: &'a S,
    cursor: StagePos,
    /// Records outside the transaction evaluated in this piece.
    evaluated: Vec<Vec<u8>>,
    error: Option<S::Error>,
}

impl<S: TxnStage> Elsewhere for StagePlaces<'_, S> {
    fn place(&mut self, e: EntityIndex, key: &str) -> Place {
        let id = identity(e, key);
        match self.store.stage_place(&id) {
            Ok(Some(at)) if at > self.cursor => Place::Later,
            Ok(Some(_)) => Place::Earlier,
            Ok(None) => {
                self.evaluated.push(id);
                Place::Absent
            }
            Err(e) => {
                self.error.get_or_insert(e);
                Place::Earlier
            }
        }
    }
}

/// A record's identity on the stage: entity index, then key.
fn identity(entity: EntityIndex, key: &str) -> Vec<u8> {
    let mut id = Vec::with_capacity(4 + key.len());
    id.extend_from_slice(&(entity.0 as u32).to_be_bytes());
    id.extend_from_slice(key.as_bytes());
    id
}

fn encode<T: serde::Serialize>(tag: u8, value: &T) -> Result<Vec<u8>, String> {
    let mut bytes = vec![tag];
    serde_json::to_writer(&mut bytes, value)
        .map_err(|e| format!("a large transaction's record cannot be staged: {e}"))?;
    Ok(bytes)
}

fn decode_mapped(bytes: &[u8]) -> Result<Mapped, String> {
    match bytes.split_first() {
        Some((&TAG_MAPPED, json)) => {
            serde_json::from_slice(json).map_err(|e| format!("a staged change cannot be read: {e}"))
        }
        _ => Err("a staged change has an unknown form".into()),
    }
}

fn decode_staged(bytes: &[u8]) -> Result<StagedRecord, String> {
    match bytes.split_first() {
        Some((&TAG_STAGED, json)) => StagedRecord::decode(json),
        _ => Err("a staged record has an unknown form".into()),
    }
}

/// A stage in memory, for tests of the governance of large transactions.
#[cfg(test)]
#[derive(Default)]
pub(crate) struct MemoryStage {
    records: std::cell::RefCell<std::collections::BTreeMap<StagePos, Vec<u8>>>,
    index: std::cell::RefCell<std::collections::HashMap<Vec<u8>, StagePos>>,
}

#[cfg(test)]
impl TxnStage for MemoryStage {
    type Error = std::convert::Infallible;

    fn stage_clear(&self) -> Result<(), Self::Error> {
        self.records.borrow_mut().clear();
        self.index.borrow_mut().clear();
        Ok(())
    }

    fn stage_fold(
        &self,
        records: Vec<StageRecord>,
        merge: &mut Merge<'_>,
    ) -> Result<(), Self::Error> {
        let (mut table, mut index) = (self.records.borrow_mut(), self.index.borrow_mut());
        for (id, pos, bytes) in records {
            let bytes = match index.get(&id).and_then(|at| table.remove(at)) {
                Some(old) => merge(&old, bytes).expect("staged bytes merge"),
                None => bytes,
            };
            table.insert(pos, bytes);
            index.insert(id, pos);
        }
        Ok(())
    }

    fn stage_rewrite(
        &self,
        remove: &[(Vec<u8>, StagePos)],
        put: Vec<StageRecord>,
        marks: Vec<StageRecord>,
    ) -> Result<(), Self::Error> {
        let (mut table, mut index) = (self.records.borrow_mut(), self.index.borrow_mut());
        for (id, pos) in remove {
            table.remove(pos);
            index.remove(id);
        }
        for (id, pos, bytes) in put {
            table.insert(pos, bytes);
            index.insert(id, pos);
        }
        for (id, pos, bytes) in marks {
            if let std::collections::hash_map::Entry::Vacant(slot) = index.entry(id) {
                table.insert(pos, bytes);
                slot.insert(pos);
            }
        }
        Ok(())
    }

    fn stage_note(&self, ids: &[(Vec<u8>, StagePos)]) -> Result<(), Self::Error> {
        let mut index = self.index.borrow_mut();
        for (id, pos) in ids {
            index.insert(id.clone(), *pos);
        }
        Ok(())
    }

    fn stage_read(
        &self,
        after: Option<StagePos>,
        limit: usize,
    ) -> Result<Vec<(StagePos, Vec<u8>)>, Self::Error> {
        use std::ops::Bound;
        let from = after.map_or(Bound::Unbounded, Bound::Excluded);
        Ok(self
            .records
            .borrow()
            .range((from, Bound::Unbounded))
            .take(limit)
            .map(|(pos, bytes)| (*pos, bytes.clone()))
            .collect())
    }

    fn stage_place(&self, id: &[u8]) -> Result<Option<StagePos>, Self::Error> {
        Ok(self.index.borrow().get(id).copied())
    }
}
