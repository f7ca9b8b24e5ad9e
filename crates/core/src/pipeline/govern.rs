//! Governance: decides, per mapped change and target, what is delivered.
//!
//! ```text
//!  Mapped ──▶ track row ──▶ document (fields, references, children)
//!         ──▶ publish_when? ── no ──▶ gated / unpublished (on_unpublish)
//!         ──▶ rules, business keys ── fail ──▶ quarantined (released when fixed)
//!         ──▶ per target: route? ──▶ field policy ──▶ same as last appended? ──▶ suppressed
//!                                                                        └──▶ delivered
//! ```
//!
//! No I/O of its own: the state that grows with the records (tracked rows,
//! business keys, references, and what each target was last sent of each
//! record) is read from the store through a [`StateReader`], with only the
//! changes not yet committed in memory; the quarantine, the counts and the
//! indices of business-object lines and external ids are held in memory,
//! loaded at start-up. Every change to the state
//! is queued as a [`GovDelta`] that the daemon writes in the same redb
//! transaction as the outbox appends it belongs with. Every decision is
//! also queued as an audit record.
//!
//! Within one source transaction, changes to one business object (a parent
//! and its child rows) and re-emissions (records whose referenced record
//! changed) are evaluated once, after the transaction's last change.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;

use serde_json::{Map, Value};

use super::assemble;
use super::map::{Mapped, Unencodable, ENCODING_RULE};
use super::redact;
use super::reference;
pub(crate) use super::store_view::short_hash;
use super::store_view::{Prior, Row, Sent, StoreView};
use super::target_rows::{self, ActualRows, TargetRow};
use crate::cel::CelInput;
use crate::config::governance::{Check, ChildConfig, EntityGovernance, OnUnpublish, TargetPolicy};
use crate::config::{Config, EntityConfig, EntityIndex, TargetIndex};
use crate::model::{ChangeOp, Event, EventData, EventOp, Lsn, SourceChange};
use crate::state::{published_digest, push_published_change, StateReader, WITHHELD};
use crate::state::{
    AuditRecord, GovDelta, GovLoader, GovOp, GovSnapshot, MemoryState, QuarantineEntry,
    ReconcileCounts,
};

/// The layout of [`Governance::summary`]: this byte, the fingerprint (16
/// bytes), per entity its tracked rows and its records in each held state
/// (4 × 8 bytes, big-endian), then per held record its hash (8 bytes) and
/// state (1 byte: [`RecordState::held_index`] + 1).
const SUMMARY_VERSION: u8 = 1;

/// Index offset of events the governance makes itself (re-emissions, business
/// objects): their ids never collide with those of source changes.
const SYNTHETIC_INDEX: u32 = 0x8000_0000;

/// The governance of one configuration: its in-memory state (see the
/// module documentation) and the decisions taken from it. Built with
/// [`Governance::new`], then restored with [`Governance::load`] (and
/// [`Governance::seed`] for entities without state yet).
pub struct Governance {
    entities: Vec<EntityConfig>,
    gov: Vec<EntityGovernance>,
    policies: Vec<TargetPolicy>,
    target_names: Vec<String>,
    entity_targets: Vec<Vec<TargetIndex>>,
    entity_index: HashMap<String, EntityIndex>,
    tracked: Vec<bool>,
    /// entity → (referencing entity, its many2one column).
    referenced_by: Vec<Vec<(EntityIndex, String)>>,
    /// (child entity, parent key) → child keys.
    children: HashMap<(EntityIndex, String), BTreeSet<String>>,
    /// Read from the store, with only changes in flight held here: the
    /// tracked rows, and the hash of the document last appended per
    /// (target, entity, key), or that steward decided NOT to deliver it
    /// ([`Sent::Withheld`]: gated, not routed, quarantined, unpublished; a
    /// re-evaluation after a configuration change sends newly publishable
    /// records among these, but not records the target never had any
    /// decision about).
    view: StoreView,
    quarantine: HashMap<(EntityIndex, String), QuarantineEntry>,
    /// (Odoo model, record id) → `ir_model_data` id → external id `module.name`.
    /// A record may have several; the oldest (lowest id) is delivered.
    external_ids: HashMap<(String, String), BTreeMap<i64, String>>,
    delta: GovDelta,
    /// Evaluation order within a transaction: an entity ranks above every
    /// entity it references, so a referenced record is decided first.
    rank: Vec<u32>,
    /// entity → (child entity, child column) of reference rules on child
    /// fields (`lines.product_id`) pointing at it.
    child_referenced_by: Vec<Vec<(EntityIndex, String)>>,
    /// Entities with a snapshot or re-read in progress (see [`Governance::watch`]).
    watched: Vec<bool>,
    /// (entity, key) → commit LSN of the last streamed change, for watched entities.
    touched: HashMap<(EntityIndex, String), u64>,
    /// entity → its columns that hold ids of other records (references,
    /// reference rules, child references), indexed in the store
    /// ([`Governance::referencing`]).
    ref_columns: Vec<Vec<String>>,
    /// (commit LSN, next index) of the ids of events the governance makes
    /// itself, carried across the pieces of a large transaction.
    synthetic: (u64, u32),
    /// Entities whose records are counted by state (see [`RecordState`]):
    /// those whose rows are tracked, except the ones steward adds itself.
    counted: Vec<bool>,
    /// Tracked rows per entity.
    row_counts: Vec<u64>,
    /// [`record_hash`] → state of every counted record that is not
    /// published; a record absent here but tracked is published. Kept
    /// small (only records held back) so that counting costs the hot path
    /// nothing while nothing is held.
    held: HashKeyed<RecordState>,
    /// Per entity, records in each held state (indexed by [`RecordState::held_index`]).
    held_counts: Vec<[u64; 3]>,
    /// The counts changed since [`Governance::take_counts_changed`].
    counts_changed: bool,
    /// The event a deep reconciliation's target refused for the record just
    /// decided (see [`Governance::refused_by`]).
    deep_refused: Option<EventOp>,
    /// The counts were restored from a summary ([`Governance::restore_summary`]):
    /// the rows loaded at start feed only the indices.
    summarised: bool,
}

/// What a snapshot or governed re-read decides for (see [`Governance::process_snapshot`]).
#[derive(Clone, Debug)]
pub struct SnapshotRead {
    /// The targets it sends to.
    pub targets: Vec<TargetIndex>,
    /// Send publishable documents even when equal to the last one appended.
    pub force: bool,
    /// Skip records the targets never had a decision about.
    pub known_only: bool,
    /// A reconciliation: decisions that change nothing (a document equal
    /// to the last one sent, a record still withheld) are not written to
    /// the audit trail, which would otherwise get a record per row and run.
    pub quiet: bool,
    /// A deep reconciliation: what its target actually holds for these
    /// rows' keys. For that target, documents are compared with its rows
    /// instead of with the hash of the last one sent.
    pub actual: Option<Arc<ActualRows>>,
}

/// What an evaluation of a record runs for (a streamed change, a
/// re-emission, an operator release, a snapshot, seed or pruned row): the
/// id, version, time and change kind of the events it makes, the targets
/// it decides for, and what is known of the record's values.
struct Trigger {
    id: String,
    version: u64,
    time: String,
    change: Option<SourceChange>,
    tx_id: Option<u32>,
    scope: Scope,
    values: Values,
}

/// What an evaluation knows about whether the record's values can be encoded.
enum Values {
    /// A change or a row read from the table, mapped just now: `Some` names
    /// the value steward cannot encode, and the record is quarantined.
    Read(Option<Unencodable>),
    /// Only the tracked row (re-emissions, operator releases): it holds an
    /// unencodable value as plain text, so it cannot tell whether the value
    /// is fixed. A record held for one stays held until a change tells.
    Tracked,
}

enum Scope {
    /// Every target of the entity (streamed changes, re-emissions).
    All,
    /// Only these targets (a snapshot or re-read for them); `force`: send
    /// publishable documents even when equal to the last one appended.
    Targets {
        targets: Vec<TargetIndex>,
        force: bool,
        /// See [`SnapshotRead::quiet`].
        quiet: bool,
        /// See [`SnapshotRead::actual`].
        deep: Option<Arc<ActualRows>>,
    },
}

/// A record's changes within one source transaction, folded together.
#[derive(serde::Serialize, serde::Deserialize)]
struct Staged {
    /// The last change's index in the transaction (evaluation order).
    index: u32,
    first_op: ChangeOp,
    last_op: ChangeOp,
    /// The row before the transaction (the first change's old row).
    old: Option<Arc<Map<String, Value>>>,
    /// Whether the governance knew the record before the transaction.
    seen: bool,
    row: Option<Arc<Map<String, Value>>>,
    /// The last change's mapped fields (a delete: the key fields).
    data: Map<String, Value>,
    id: String,
    version: u64,
    time: String,
    change: Option<SourceChange>,
    tx_id: Option<u32>,
    /// The last change's value steward cannot encode.
    unencodable: Option<Unencodable>,
}

/// The records a transaction marked for evaluation: each once, in the order
/// of (entity rank, first mark). Records marked while evaluating join the
/// queue unless already evaluated. Sized for the hot path: one entry per
/// record, found by a 64-bit hash of (entity, key), keys moved in, not copied.
#[derive(Default)]
struct Pending<'a> {
    entries: Vec<PendingEntry>,
    /// hash of (entity, key) → index of the newest entry with that hash;
    /// entries with the same hash are chained through `PendingEntry::next`.
    index: HashMap<u64, u32, BuildHasherDefault<DigestHasher>>,
    heap: std::collections::BinaryHeap<std::cmp::Reverse<(u32, u64, u32)>>,
    evaluating: bool,
    /// Marks of records without a change of their own, in order (they come
    /// after the records changed by the transaction).
    deferrals: u64,
    /// The rest of a large transaction, governed in pieces (see
    /// [`Governance::evaluate_piece`]): records marked that are not in this
    /// piece are looked up there.
    elsewhere: Option<&'a mut dyn Elsewhere>,
}

/// Where phase one of a transaction's governance puts its marks: the
/// in-memory queue of an ordinary transaction, or a piece of a large one.
trait Marks {
    /// Marks a record for evaluation without a change of its own.
    fn defer(&mut self, rank: u32, e: EntityIndex, key: String);
    /// Queues a changed record.
    fn stage(&mut self, rank: u32, e: EntityIndex, key: String, change: Staged);
}

impl Marks for Pending<'_> {
    fn defer(&mut self, rank: u32, e: EntityIndex, key: String) {
        Pending::defer(self, rank, e, key);
    }

    fn stage(&mut self, rank: u32, e: EntityIndex, key: String, change: Staged) {
        Pending::stage(self, rank, e, key, change);
    }
}

/// Where a record that is not in the piece being evaluated stands in its
/// large transaction (see [`Governance::evaluate_piece`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Place {
    /// In a later piece: it is evaluated there, with the transaction's final state.
    Later,
    /// In an earlier piece: evaluated already.
    Earlier,
    /// Not part of the transaction: evaluated in this piece, and reported
    /// [`Place::Earlier`] from then on.
    Absent,
}

/// The rest of a large transaction, as seen from the piece being evaluated.
pub(crate) trait Elsewhere {
    fn place(&mut self, e: EntityIndex, key: &str) -> Place;
}

/// A record of a large transaction after phase one of its governance
/// ([`Governance::stage_piece`]), waiting on disk for phase two
/// ([`Governance::evaluate_piece`]). Records are evaluated in the order of
/// (`rank`, `order`), as [`Pending`] orders an ordinary transaction.
#[derive(serde::Serialize, serde::Deserialize)]
pub(crate) struct StagedRecord {
    pub(crate) rank: u32,
    /// The record's last change index; marks without a change (`staged`
    /// `None`) come after every change of their rank.
    pub(crate) order: u64,
    pub(crate) entity: EntityIndex,
    pub(crate) key: String,
    staged: Option<Staged>,
}

impl StagedRecord {
    /// The order of the `n`th mark without a change of its own (after every change).
    pub(crate) fn deferral_order(n: u64) -> u64 {
        (1 << 32) + n
    }

    pub(crate) fn deferral(
        rank: u32,
        order: u64,
        entity: EntityIndex,
        key: String,
    ) -> StagedRecord {
        StagedRecord {
            rank,
            order,
            entity,
            key,
            staged: None,
        }
    }

    pub(crate) fn decode(bytes: &[u8]) -> Result<StagedRecord, String> {
        serde_json::from_slice(bytes).map_err(|e| format!("a staged record cannot be read: {e}"))
    }
}

/// Phase one of a piece of a large transaction: its changed records and the
/// records it marked for evaluation.
#[derive(Default)]
pub(crate) struct PhaseOne {
    pub(crate) records: Vec<StagedRecord>,
    pub(crate) deferred: Vec<(u32, EntityIndex, String)>,
}

impl Marks for PhaseOne {
    fn defer(&mut self, rank: u32, e: EntityIndex, key: String) {
        self.deferred.push((rank, e, key));
    }

    fn stage(&mut self, rank: u32, e: EntityIndex, key: String, change: Staged) {
        self.records.push(StagedRecord {
            rank,
            order: u64::from(change.index),
            entity: e,
            key,
            staged: Some(change),
        });
    }
}

struct PendingEntry {
    rank: u32,
    /// Within a rank: the index of the record's last change, so that a
    /// transaction's events keep its order (ids ascending).
    order: u64,
    e: EntityIndex,
    key: String,
    staged: Option<Staged>,
    next: Option<u32>,
    /// Evaluated already (and not queued again).
    done: bool,
}

/// A map keyed by a 64-bit hash that is used as is (see [`record_hash`]).
pub type HashKeyed<V> = HashMap<u64, V, BuildHasherDefault<DigestHasher>>;

/// The 64-bit hash of a record (entity, key) used to find it within a transaction.
pub fn record_hash(e: EntityIndex, key: &str) -> u64 {
    Pending::hash(e, key)
}

impl<'a> Pending<'a> {
    fn with_capacity(n: usize) -> Pending<'a> {
        Pending {
            entries: Vec::with_capacity(n),
            index: HashMap::with_capacity_and_hasher(n, Default::default()),
            ..Pending::default()
        }
    }

    fn hash(e: EntityIndex, key: &str) -> u64 {
        // FxHash-style: good enough to spread keys, a fraction of SipHash's cost.
        let mut h = (e.0 as u64).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
        for chunk in key.as_bytes().chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            h = (h.rotate_left(5) ^ u64::from_le_bytes(word))
                .wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
        }
        // Its low bits depend on the key's first bytes only: the maps mix
        // it ([`DigestHasher`]).
        h ^ key.len() as u64
    }

    fn find(&self, h: u64, e: EntityIndex, key: &str) -> Option<u32> {
        let mut at = self.index.get(&h).copied();
        while let Some(i) = at {
            let entry = &self.entries[i as usize];
            if entry.e == e && entry.key == key {
                return Some(i);
            }
            at = entry.next;
        }
        None
    }

    fn push(&mut self, h: u64, rank: u32, e: EntityIndex, key: String, staged: Option<Staged>) {
        let order = match &staged {
            Some(s) => u64::from(s.index),
            None => {
                self.deferrals += 1;
                StagedRecord::deferral_order(self.deferrals)
            }
        };
        self.push_at(h, rank, order, e, key, staged);
    }

    fn push_at(
        &mut self,
        h: u64,
        rank: u32,
        order: u64,
        e: EntityIndex,
        key: String,
        staged: Option<Staged>,
    ) {
        let i = self.entries.len() as u32;
        let next = self.index.insert(h, i);
        self.entries.push(PendingEntry {
            rank,
            order,
            e,
            key,
            staged,
            next,
            done: false,
        });
        if self.evaluating {
            self.heap.push(std::cmp::Reverse((rank, order, i)));
        }
    }

    fn defer(&mut self, rank: u32, e: EntityIndex, key: String) {
        let h = Self::hash(e, &key);
        if self.find(h, e, &key).is_some() {
            return;
        }
        if let Some(elsewhere) = self.elsewhere.as_mut() {
            if elsewhere.place(e, &key) != Place::Absent {
                // Evaluated in its own piece, as a record evaluated
                // already is not queued again here.
                return;
            }
        }
        self.push(h, rank, e, key, None);
    }

    /// [`Pending::defer`], queueing the record again if it was evaluated already.
    fn redo(&mut self, rank: u32, e: EntityIndex, key: String) {
        let h = Self::hash(e, &key);
        match self.find(h, e, &key) {
            None => {
                let place = match self.elsewhere.as_mut() {
                    Some(elsewhere) => elsewhere.place(e, &key),
                    None => Place::Absent,
                };
                // A record of an earlier piece is evaluated again, as one
                // evaluated already in this piece is.
                if place != Place::Later {
                    self.push(h, rank, e, key, None);
                }
            }
            Some(i) => {
                let entry = &mut self.entries[i as usize];
                if entry.done && self.evaluating {
                    entry.done = false;
                    self.deferrals += 1;
                    self.heap
                        .push(std::cmp::Reverse((rank, (1 << 32) + self.deferrals, i)));
                }
            }
        }
    }

    fn stage(&mut self, rank: u32, e: EntityIndex, key: String, change: Staged) {
        let h = Self::hash(e, &key);
        let Some(i) = self.find(h, e, &key) else {
            self.push(h, rank, e, key, Some(change));
            return;
        };
        let entry = &mut self.entries[i as usize];
        entry.order = u64::from(change.index);
        match &mut entry.staged {
            Some(s) => {
                s.index = change.index;
                s.last_op = change.last_op;
                s.row = change.row;
                s.data = change.data;
                s.id = change.id;
                s.version = change.version;
                s.time = change.time;
                s.change = change.change;
                s.tx_id = change.tx_id;
                s.unencodable = change.unencodable;
            }
            None => entry.staged = Some(change),
        }
    }

    fn next(&mut self) -> Option<(EntityIndex, String, Option<Staged>)> {
        if !self.evaluating {
            self.evaluating = true;
            self.heap = (0..self.entries.len() as u32)
                .map(|i| {
                    let entry = &self.entries[i as usize];
                    std::cmp::Reverse((entry.rank, entry.order, i))
                })
                .collect();
        }
        let std::cmp::Reverse((_, _, i)) = self.heap.pop()?;
        let entry = &mut self.entries[i as usize];
        entry.done = true;
        Some((entry.e, entry.key.clone(), entry.staged.take()))
    }
}

/// What a quarantine release did.
#[derive(Debug)]
pub struct Released {
    /// The events to append, each with its target.
    pub events: Vec<(TargetIndex, Event)>,
    /// `None` when released; the failure message when still failing.
    pub still_failing: Option<String>,
}

impl Governance {
    /// Empty state for `config`: nothing tracked, published or quarantined.
    pub fn new(config: &Config) -> Governance {
        let entities = config.entities.clone();
        let entity_count = entities.len();
        let mut gov = config.governance.entities.clone();
        gov.resize(entities.len(), EntityGovernance::default());
        let mut policies = config.governance.targets.clone();
        policies.resize(config.targets.len(), TargetPolicy::default());
        let entity_index: HashMap<String, EntityIndex> = config
            .iter_entities()
            .map(|(i, e)| (e.name.clone(), i))
            .collect();
        let entity_targets: Vec<Vec<TargetIndex>> = entities
            .iter()
            .map(|e| {
                config
                    .iter_targets()
                    .filter(|(_, t)| t.entities.iter().any(|n| n == &e.name))
                    .map(|(i, _)| i)
                    .collect()
            })
            .collect();
        let mut referenced_by = vec![Vec::new(); entities.len()];
        let mut child_referenced_by = vec![Vec::new(); entities.len()];
        for (i, g) in EntityIndex::enumerate(&gov) {
            for r in &g.refs {
                if let Some(&t) = entity_index.get(&r.entity) {
                    referenced_by[t].push((i, r.column.clone()));
                }
            }
            for c in &g.children {
                for r in &c.refs {
                    if let Some(&t) = entity_index.get(&r.entity) {
                        child_referenced_by[t].push((c.entity, r.column.clone()));
                    }
                }
            }
            for rule in &g.rules {
                for c in &rule.checks {
                    let Check::Reference { field, entity } = c else {
                        continue;
                    };
                    let Some(&t) = entity_index.get(entity) else {
                        continue;
                    };
                    match field.split_once('.') {
                        Some((child, field)) => {
                            if let Some(c) = g.children.iter().find(|c| c.name == child) {
                                child_referenced_by[t].push((c.entity, child_column(c, field)));
                            }
                        }
                        None => referenced_by[t].push((i, ref_column(g, field))),
                    }
                }
            }
        }
        for list in referenced_by
            .iter_mut()
            .chain(child_referenced_by.iter_mut())
        {
            list.sort();
            list.dedup();
        }
        let mut ref_columns: Vec<Vec<String>> = vec![Vec::new(); entity_count];
        for (r, column) in referenced_by
            .iter()
            .chain(child_referenced_by.iter())
            .flatten()
        {
            ref_columns[*r].push(column.clone());
        }
        for (i, g) in EntityIndex::enumerate(&gov) {
            for r in g.refs.iter().filter(|r| r.external_id) {
                ref_columns[i].push(r.column.clone());
            }
            for c in &g.children {
                for r in c.refs.iter().filter(|r| r.external_id) {
                    ref_columns[c.entity].push(r.column.clone());
                }
            }
        }
        for list in &mut ref_columns {
            list.sort();
            list.dedup();
        }
        // rank(e) = 1 + the highest rank of what e references (bounded, so a
        // reference cycle cannot loop).
        let mut rank = vec![0u32; entities.len()];
        for _ in 0..entities.len() {
            let mut changed = false;
            for (t, users) in EntityIndex::enumerate(&referenced_by) {
                for (u, _) in users {
                    if rank[*u] <= rank[t] {
                        rank[*u] = rank[t] + 1;
                        changed = true;
                    }
                }
            }
            for (t, users) in EntityIndex::enumerate(&child_referenced_by) {
                for (c, _) in users {
                    let p = gov[*c].child_of.map_or(*c, |(p, _)| p);
                    if rank[p] <= rank[t] {
                        rank[p] = rank[t] + 1;
                        changed = true;
                    }
                }
            }
            if !changed {
                break;
            }
        }
        let tracked = (0..entities.len())
            .map(EntityIndex)
            .map(|i| {
                gov[i].is_governed()
                    || !referenced_by[i].is_empty()
                    || !child_referenced_by[i].is_empty()
                    || entity_targets[i]
                        .iter()
                        .any(|&t| policies[t].route.is_some())
            })
            .collect();
        Governance {
            entities,
            gov,
            policies,
            target_names: config.targets.iter().map(|t| t.name.clone()).collect(),
            entity_targets,
            entity_index,
            tracked,
            referenced_by,
            children: HashMap::new(),
            view: StoreView::new(Box::<MemoryState>::default()),
            quarantine: HashMap::new(),
            external_ids: HashMap::new(),
            delta: GovDelta::default(),
            rank,
            child_referenced_by,
            watched: vec![false; entity_count],
            touched: HashMap::new(),
            ref_columns,
            synthetic: (0, 0),
            counted: Vec::new(),
            row_counts: vec![0; entity_count],
            held: HashKeyed::default(),
            held_counts: vec![[0; 3]; entity_count],
            counts_changed: true,
            deep_refused: None,
            summarised: false,
        }
        .with_counted()
    }

    fn with_counted(mut self) -> Governance {
        self.counted = (0..self.entities.len())
            .map(EntityIndex)
            .map(|e| self.tracked[e] && !self.is_hidden(e))
            .collect();
        self
    }

    /// Entities whose whole rows the mapping stage must capture.
    pub fn tracked_entities(&self) -> impl Iterator<Item = EntityIndex> + '_ {
        EntityIndex::enumerate(&self.tracked)
            .filter(|(_, t)| **t)
            .map(|(i, _)| i)
    }

    /// Entities whose state is read from their tables at start-up when
    /// steward has none yet, in the order to read them: external ids and
    /// child tables first, then by rank (referenced before referencing).
    pub fn seed_order(&self) -> Vec<EntityIndex> {
        let mut list: Vec<EntityIndex> = self.tracked_entities().collect();
        list.sort_by_key(|&e| {
            let hidden = self.gov[e].child_of.is_some() || !self.gov[e].external_ids_of.is_empty();
            (!hidden, self.rank[e], e)
        });
        list
    }

    /// Whether `entity` is one steward adds itself (a child table, `ir_model_data`).
    pub(crate) fn is_hidden(&self, entity: EntityIndex) -> bool {
        self.gov[entity].child_of.is_some() || !self.gov[entity].external_ids_of.is_empty()
    }

    /// Evaluation rank of `entity` (see [`Governance::rank`]).
    pub(crate) fn rank_of(&self, entity: EntityIndex) -> u32 {
        self.rank[entity]
    }

    /// The SQL condition restricting the start-up read of `entity`'s table,
    /// if only part of it is needed (the external ids of referenced models).
    pub fn seed_filter(&self, entity: EntityIndex) -> Option<String> {
        let models = &self.gov[entity].external_ids_of;
        // Model names were checked to be [A-Za-z0-9._] when the config loaded.
        (!models.is_empty()).then(|| {
            let list: Vec<String> = models.iter().map(|m| format!("'{m}'")).collect();
            format!("model IN ({})", list.join(", "))
        })
    }

    #[cfg(test)]
    pub(crate) fn tracked_count(&self, entity: EntityIndex) -> usize {
        self.row_counts[entity] as usize
    }

    /// The tracked row of (`e`, `key`), if any (read from the store, or
    /// the change in flight).
    fn tracked_row(&self, e: EntityIndex, key: &str) -> Option<Row> {
        self.view.row(e, &self.entities[e].name, key)
    }

    /// The tracked row of (e, key) before `row`, and whether it is `row`
    /// already (nothing to index or store again).
    fn prior_row(&self, e: EntityIndex, key: &str, row: Option<&Row>) -> (Option<Row>, bool) {
        let Some(row) = row else {
            return (self.tracked_row(e, key), false);
        };
        match self.view.prior_row(e, &self.entities[e].name, key, row) {
            Prior::Absent => (None, false),
            Prior::Same => (Some(Arc::clone(row)), true),
            Prior::Other(prev) => (Some(prev), false),
        }
    }

    /// The configuration of `entity`.
    pub fn entity_config(&self, entity: EntityIndex) -> &EntityConfig {
        &self.entities[entity]
    }

    #[cfg(test)]
    pub(crate) fn entity_by_name(&self, name: &str) -> Option<EntityIndex> {
        self.entity_index.get(name).copied()
    }

    /// Restores the state written by earlier runs, held in one
    /// [`GovSnapshot`]; names no longer configured are ignored. The reader
    /// set with [`Governance::set_state_reader`] holds its rows (they are
    /// read from there as needed). The daemon streams it instead
    /// ([`GovLoader`], then [`Governance::finish_load`]).
    pub fn load(&mut self, snap: GovSnapshot) {
        for (entity, key, bytes) in snap.rows {
            GovLoader::row(self, &entity, &key, &bytes);
        }
        for (entity, field, value, holder) in snap.unique {
            GovLoader::unique(self, &entity, &field, &value, &holder);
        }
        for q in snap.quarantine {
            GovLoader::quarantined(self, q);
        }
        self.finish_load();
    }

    /// Derives what is counted from the state loaded through [`GovLoader`]
    /// (after [`Governance::set_state_reader`]: tracked rows are read from it).
    pub fn finish_load(&mut self) {
        self.derive_counts();
    }

    /// Seeds tracked rows of `entity` read from its table (start-up, for references).
    pub fn seed(&mut self, entity: EntityIndex, rows: Vec<Map<String, Value>>) {
        for row in rows {
            let parts: Vec<String> = self.entities[entity]
                .key
                .iter()
                .map(|c| row.get(c).map(assemble::text).unwrap_or_default())
                .collect();
            let key = crate::model::event::join_key(parts.iter().map(String::as_str));
            let prev = self.tracked_row(entity, &key);
            self.set_row(entity, &key, prev, Some(Arc::new(row)));
        }
    }

    /// The counts (tracked rows, records held back) as derived from the
    /// state, for [`Governance::restore_summary`] at the next start: saved
    /// when the daemon stops, it spares that start reading every tracked
    /// row to count it and evaluate its gate.
    pub fn summary(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + 32 * self.row_counts.len() + 9 * self.held.len());
        out.push(SUMMARY_VERSION);
        out.extend_from_slice(&self.summary_fingerprint());
        for (rows, held) in self.row_counts.iter().zip(&self.held_counts) {
            for n in std::iter::once(rows).chain(held) {
                out.extend_from_slice(&n.to_be_bytes());
            }
        }
        for (hash, state) in &self.held {
            out.extend_from_slice(&hash.to_be_bytes());
            out.push(state.held_index().map_or(0, |i| i as u8 + 1));
        }
        out
    }

    /// Takes the counts of a [`Governance::summary`] of the state the store
    /// holds (before [`GovLoader`] loads it); false, taking nothing, when it
    /// was made for another configuration or is not one.
    pub fn restore_summary(&mut self, bytes: &[u8]) -> bool {
        let number = |b: &[u8]| u64::from_be_bytes(b.try_into().expect("8 bytes"));
        let entities = self.row_counts.len();
        let header = 17 + 32 * entities;
        if bytes.len() < header
            || bytes[0] != SUMMARY_VERSION
            || bytes[1..17] != self.summary_fingerprint()
            || !(bytes.len() - header).is_multiple_of(9)
        {
            return false;
        }
        let mut held = HashKeyed::default();
        for entry in bytes[header..].chunks_exact(9) {
            let state = match entry[8] {
                1 => RecordState::PendingApproval,
                2 => RecordState::Quarantined,
                3 => RecordState::Blocked,
                _ => return false,
            };
            held.insert(number(&entry[..8]), state);
        }
        for (e, counts) in bytes[17..header].chunks_exact(32).enumerate() {
            self.row_counts[e] = number(&counts[..8]);
            for (i, n) in counts[8..].chunks_exact(8).enumerate() {
                self.held_counts[e][i] = number(n);
            }
        }
        self.held = held;
        self.summarised = true;
        self.counts_changed = true;
        true
    }

    /// What a summary depends on: the entities in order (records are
    /// counted by position), which are counted, and their gates.
    fn summary_fingerprint(&self) -> [u8; 16] {
        let mut h = blake3::Hasher::new();
        for (e, entity) in EntityIndex::enumerate(&self.entities) {
            let gate = self.gov[e]
                .publish_when
                .as_ref()
                .map_or("", |g| g.source.as_str());
            for part in [entity.name.as_str(), gate] {
                h.update(&(part.len() as u64).to_le_bytes());
                h.update(part.as_bytes());
            }
            h.update(&[u8::from(self.counted[e]), u8::from(self.tracked[e])]);
        }
        let mut out = [0u8; 16];
        out.copy_from_slice(&h.finalize().as_bytes()[..16]);
        out
    }

    /// Frees the queue of state changes kept at the size of the largest
    /// batch, when it is empty (the daemon has been idle for a while).
    pub fn release_buffers(&mut self) {
        if self.delta.ops.is_empty() {
            self.delta.ops = Vec::new();
            self.delta.published = Vec::new();
        }
        self.view.sync();
        self.view.release();
    }

    /// Reads the published state from `reader` (the store's) from now on.
    pub fn set_state_reader(&mut self, reader: Box<dyn StateReader>) {
        self.view.set_reader(reader);
        self.view.sync();
    }

    /// The first error reading the store's published state since the last
    /// call: decisions taken since then read it as empty, and must not be
    /// committed.
    pub fn state_error(&mut self) -> Option<String> {
        self.view.error()
    }

    /// The state changes and audit records queued since the last call.
    pub fn take_delta(&mut self) -> GovDelta {
        // Sized like the last one: transactions tend to look alike, and
        // growing by doubling copies and touches fresh pages each time.
        let capacity = self.delta.ops.len();
        let published = self.delta.published.len();
        let delta = GovDelta {
            ops: std::mem::replace(&mut self.delta.ops, Vec::with_capacity(capacity)),
            published: std::mem::replace(&mut self.delta.published, Vec::with_capacity(published)),
            generation: self.view.seal(),
        };
        self.view.sync();
        delta
    }

    /// Records held in quarantine, for every entity (zeros included, so a
    /// gauge built from it returns to 0 when the last record is released).
    pub fn quarantine_counts(&self) -> Vec<(&str, usize)> {
        let mut counts = vec![0usize; self.entities.len()];
        for (e, _) in self.quarantine.keys() {
            counts[*e] += 1;
        }
        self.entities
            .iter()
            .zip(counts)
            .map(|(e, n)| (e.name.as_str(), n))
            .collect()
    }

    /// Records of every counted entity in each state, in configuration
    /// order (see [`RecordState`] for which entities are counted).
    pub fn record_counts(&self) -> Vec<EntityRecords> {
        EntityIndex::enumerate(&self.entities)
            .filter(|(e, _)| self.counted[*e])
            .map(|(e, entity)| {
                let [pending_approval, quarantined, blocked] = self.held_counts[e];
                EntityRecords {
                    entity: entity.name.clone(),
                    published: self.row_counts[e]
                        .saturating_sub(pending_approval + quarantined + blocked),
                    pending_approval,
                    quarantined,
                    blocked,
                }
            })
            .collect()
    }

    /// Whether [`Governance::record_counts`] may have changed since the last call.
    pub fn take_counts_changed(&mut self) -> bool {
        std::mem::take(&mut self.counts_changed)
    }

    /// Every record held in quarantine, by entity name, then key.
    pub fn quarantined(&self) -> Vec<&QuarantineEntry> {
        let mut list: Vec<&QuarantineEntry> = self.quarantine.values().collect();
        list.sort_by(|a, b| {
            a.entity
                .cmp(&b.entity)
                .then_with(|| key_order(&a.key, &b.key))
        });
        list
    }

    /// Governs the mapped changes of one source transaction; returns the
    /// events to append, each with its target index.
    pub fn process(
        &mut self,
        mut mapped: Vec<Mapped>,
        commit_lsn: Lsn,
        time: &str,
    ) -> Vec<(TargetIndex, Event)> {
        self.process_drain(&mut mapped, commit_lsn, time)
    }

    /// [`Governance::process`], leaving `mapped` empty with its capacity, for
    /// the caller to fill with the next transaction without growing a vector
    /// from nothing again.
    pub(crate) fn process_drain(
        &mut self,
        mapped: &mut Vec<Mapped>,
        commit_lsn: Lsn,
        time: &str,
    ) -> Vec<(TargetIndex, Event)> {
        let mut out = Vec::with_capacity(mapped.len());
        self.process_drain_into(mapped, commit_lsn, time, &mut out);
        out
    }

    /// [`Governance::process`], leaving `mapped` empty with its capacity (for
    /// the next transaction) and appending to `out`: the daemon's commit
    /// batch, so that a transaction's events are not copied into it.
    ///
    /// A transaction is governed in two phases. First every change updates
    /// the tracked state in order (rows, child index, external ids) and
    /// marks its record, and the records depending on it, for evaluation.
    /// Then each marked record is evaluated ONCE against its final state,
    /// referenced entities before the entities referencing them: Odoo's
    /// `create()` inserts a row and then updates computed columns in the same
    /// transaction, and a target must get one document per key per
    /// transaction, never the half-written first one with the same version.
    pub fn process_drain_into(
        &mut self,
        mapped: &mut Vec<Mapped>,
        commit_lsn: Lsn,
        time: &str,
        out: &mut Vec<(TargetIndex, Event)>,
    ) {
        out.reserve(mapped.len());
        let mut pending = Pending::with_capacity(mapped.len());
        for m in mapped.drain(..) {
            self.stage(m, &mut pending);
        }
        self.evaluate_pending(pending, commit_lsn, time, out);
    }

    /// Phase one for a piece of a transaction too large to hold in memory:
    /// the daemon stores its records (each folded to its final state, see
    /// `daemon::large_txn`), runs every piece through this, stores the
    /// result, and only then evaluates the pieces in order with
    /// [`Governance::evaluate_piece`]. So every record is evaluated once,
    /// against the whole transaction's final state, exactly as
    /// [`Governance::process_drain_into`] would.
    pub(crate) fn stage_piece(&mut self, mapped: &mut Vec<Mapped>) -> PhaseOne {
        let mut phase = PhaseOne::default();
        for m in mapped.drain(..) {
            self.stage(m, &mut phase);
        }
        phase
    }

    /// Phase two for a piece of a large transaction: `records` are the
    /// piece's records in (rank, order); `elsewhere` places records marked
    /// during evaluation that are not in the piece.
    pub(crate) fn evaluate_piece(
        &mut self,
        records: Vec<StagedRecord>,
        elsewhere: &mut dyn Elsewhere,
        commit_lsn: Lsn,
        time: &str,
        out: &mut Vec<(TargetIndex, Event)>,
    ) {
        let mut pending = Pending::with_capacity(records.len());
        pending.elsewhere = Some(elsewhere);
        for r in records {
            let h = Pending::hash(r.entity, &r.key);
            if pending.find(h, r.entity, &r.key).is_none() {
                // Marks made while evaluating this piece come after the stored ones.
                pending.deferrals = pending.deferrals.max(r.order.saturating_sub(1 << 32));
                pending.push_at(h, r.rank, r.order, r.entity, r.key, r.staged);
            }
        }
        self.evaluate_pending(pending, commit_lsn, time, out);
    }

    /// Phase one of [`Governance::process_drain_into`] for one change.
    fn stage(&mut self, m: Mapped, pending: &mut impl Marks) {
        let e = m.entity;
        let key = m.event.key.clone();
        let delete = m.op == ChangeOp::Delete;
        if !self.gov[e].external_ids_of.is_empty() {
            let prev = self.tracked_row(e, &key);
            let models = &self.gov[e].external_ids_of;
            let new = if delete { None } else { m.row.map(Arc::new) }.filter(|r| {
                r.get("model")
                    .and_then(Value::as_str)
                    .is_some_and(|m| models.iter().any(|x| x == m))
            });
            if prev.is_none() && new.is_none() {
                // Most of ir_model_data (views, menus, ...) is not referenced.
                return;
            }
            for (model, res_id) in [prev.as_deref(), new.as_deref()]
                .into_iter()
                .flatten()
                .filter_map(external_id_target)
            {
                for (r, column) in self.external_id_refs(&model) {
                    for k in self.referencing(r, &column, &res_id) {
                        pending.defer(self.rank[r], r, k);
                    }
                }
            }
            self.set_row(e, &key, prev, new);
            return;
        }
        if let Some((parent, _)) = self.gov[e].child_of {
            let prev = self.tracked_row(e, &key);
            let new = if delete { None } else { m.row.map(Arc::new) };
            let bad = if delete { None } else { m.unencodable.as_ref() };
            self.note_child_encoding(e, &key, bad, &m.data, m.event.version);
            for p in self.index_child(e, &key, prev.as_deref(), new.as_deref()) {
                pending.defer(self.rank[parent], parent, p);
            }
            self.set_row(e, &key, prev, new);
            return;
        }
        let tracked = self.tracked[e];
        let prev = if tracked {
            self.tracked_row(e, &key)
        } else {
            None
        };
        let row = if delete { None } else { m.row.map(Arc::new) };
        if tracked {
            self.set_row(e, &key, prev.clone(), row.clone());
        }
        self.defer_dependents(e, &key, pending);
        let change = Staged {
            index: m.index,
            first_op: m.first_op,
            last_op: m.op,
            old: m.old.map(Arc::new).or(prev.clone()),
            seen: prev.is_some(),
            row,
            data: m.data,
            id: m.event.id,
            version: m.event.version,
            time: m.event.time,
            change: m.event.change,
            tx_id: m.event.tx_id,
            unencodable: m.unencodable,
        };
        pending.stage(self.rank[e], e, key, change);
    }

    /// Phase two: evaluates every marked record once, lowest rank first.
    fn evaluate_pending(
        &mut self,
        mut pending: Pending,
        commit_lsn: Lsn,
        time: &str,
        out: &mut Vec<(TargetIndex, Event)>,
    ) {
        // The pieces of a large transaction share one sequence of ids.
        let mut synthetic = match self.synthetic {
            (lsn, next) if lsn == commit_lsn.0 => next,
            _ => 0,
        };
        while let Some((e, key, staged)) = pending.next() {
            if self.watched[e] {
                self.touched.insert((e, key.clone()), commit_lsn.0);
            }
            let held_before = self.is_quarantined(e, &key);
            match staged {
                Some(s) => {
                    if s.last_op == ChangeOp::Delete && s.first_op == ChangeOp::Insert {
                        // Inserted and deleted in one transaction: no target ever knew it.
                        continue;
                    }
                    let op = match (s.first_op, s.last_op) {
                        (_, ChangeOp::Delete) => "delete",
                        (ChangeOp::Insert, _) => "insert",
                        _ => "update",
                    };
                    let change = match (s.first_op, s.last_op, s.change) {
                        // The Debezium envelope keeps "c" for a key created in this transaction.
                        (ChangeOp::Insert, ChangeOp::Insert | ChangeOp::Update, _) => {
                            Some(SourceChange::Insert)
                        }
                        (ChangeOp::Delete, ChangeOp::Insert, _) => Some(SourceChange::Update),
                        (_, _, c) => c,
                    };
                    let row = if op == "delete" {
                        None
                    } else if self.tracked[e] {
                        // The final row: later changes of the transaction already replaced it.
                        self.tracked_row(e, &key).or(s.row)
                    } else {
                        s.row
                    };
                    let trigger = Trigger {
                        id: s.id,
                        version: s.version,
                        time: s.time,
                        change,
                        tx_id: s.tx_id,
                        scope: Scope::All,
                        values: Values::Read(s.unencodable),
                    };
                    self.evaluate(
                        e,
                        &key,
                        op,
                        row,
                        s.old.as_deref(),
                        s.seen,
                        s.data,
                        &trigger,
                        out,
                        &mut pending,
                    );
                }
                None => {
                    let Some(row) = self.tracked_row(e, &key) else {
                        continue;
                    };
                    let trigger = Trigger {
                        id: Event::source_id(commit_lsn, SYNTHETIC_INDEX + synthetic),
                        version: commit_lsn.0,
                        time: time.to_string(),
                        change: None,
                        tx_id: None,
                        scope: Scope::All,
                        values: Values::Tracked,
                    };
                    synthetic += 1;
                    self.evaluate(
                        e,
                        &key,
                        "update",
                        Some(row.clone()),
                        Some(&row),
                        true,
                        Map::new(),
                        &trigger,
                        out,
                        &mut pending,
                    );
                }
            }
            if held_before != self.is_quarantined(e, &key) {
                // Whether this record holds back the records referencing it changed.
                self.defer_dependents(e, &key, &mut pending);
            }
        }
        self.synthetic = (commit_lsn.0, synthetic);
    }

    /// Marks the tracked records whose references or reference rules point at (e, key).
    fn defer_dependents(&self, e: EntityIndex, key: &str, pending: &mut impl Marks) {
        for (r, column) in &self.referenced_by[e] {
            for k in self.referencing(*r, column, key) {
                pending.defer(self.rank[*r], *r, k);
            }
        }
        for (r, column) in &self.child_referenced_by[e] {
            for parent in self.parents_with_child_value(*r, column, key) {
                let p = self.gov[*r].child_of.map_or(*r, |(p, _)| p);
                pending.defer(self.rank[p], p, parent);
            }
        }
    }

    fn is_quarantined(&self, e: EntityIndex, key: &str) -> bool {
        !self.quarantine.is_empty() && self.quarantine.contains_key(&(e, key.to_string()))
    }

    /// Governs rows read by a snapshot (an initial snapshot, `steward reset`,
    /// an entity added to a target, a re-snapshot after a schema stop) or a
    /// governed re-read after a configuration change, through the same
    /// evaluation as streamed changes. `consistent` is the snapshot's
    /// consistent point; the caller has processed the stream up to it, so a
    /// record the stream changed since (recorded while its entity is
    /// watched, see [`Governance::watch`]) is newer in the governance than in
    /// the snapshot and is skipped. Events go to `targets` only; `force`
    /// sends publishable documents even when equal to the last one appended
    /// (the target is being rebuilt). `known_only` (a re-read after a
    /// configuration change) skips records the target never had a decision
    /// about. Records whose state these rows change
    /// for other reasons (a business key let go) are evaluated with version
    /// `position`, the stream's current position. One read may feed several
    /// targets; returns what each found, in the order of `read.targets`.
    pub fn process_snapshot(
        &mut self,
        mapped: &mut Vec<Mapped>,
        consistent: Lsn,
        read: &SnapshotRead,
        position: Lsn,
        out: &mut Vec<(TargetIndex, Event)>,
    ) -> Vec<ReconcileCounts> {
        let SnapshotRead {
            targets,
            force,
            known_only,
            quiet,
            actual,
        } = read;
        let (force, known_only) = (*force, *known_only);
        let mut pending = Pending::default();
        // What each target of the read found, in the order of `targets`.
        let mut counts = vec![ReconcileCounts::default(); targets.len()];
        for m in mapped.drain(..) {
            let e = m.entity;
            let key = m.event.key.clone();
            let hidden = self.is_hidden(e);
            if !hidden {
                counts.iter_mut().for_each(|c| c.checked += 1);
            }
            // A re-read after a configuration change decides only for the
            // targets that had this record or a decision about it: a new
            // rule is not a change of the record.
            let known = if known_only {
                let known: Vec<TargetIndex> = targets
                    .iter()
                    .copied()
                    .filter(|&t| self.sent(t, e, &key) != Sent::Nothing)
                    .collect();
                if known.len() < targets.len() {
                    for (c, t) in counts.iter_mut().zip(targets) {
                        if !known.contains(t) {
                            c.equal += 1;
                        }
                    }
                }
                if known.is_empty() {
                    continue;
                }
                Some(known)
            } else {
                None
            };
            let scope_targets = known.as_deref().unwrap_or(targets);
            if self
                .touched
                .get(&(e, key.clone()))
                .is_some_and(|v| *v >= consistent.0)
            {
                // The stream has sent (or decided) a newer version.
                if !hidden {
                    for (c, t) in counts.iter_mut().zip(targets) {
                        if scope_targets.contains(t) {
                            c.equal += 1;
                        }
                    }
                }
                continue;
            }
            if self.gov[e].child_of.is_some() || !self.gov[e].external_ids_of.is_empty() {
                if self.gov[e].child_of.is_some() {
                    let bad = m.unencodable.as_ref();
                    self.note_child_encoding(e, &key, bad, &m.data, m.event.version);
                }
                self.observe(e, &key, m.row);
                continue;
            }
            let row = m.row.map(Arc::new);
            let (prev, unchanged) = self.prior_row(e, &key, row.as_ref());
            if self.tracked[e] && !unchanged {
                self.set_row(e, &key, prev.clone(), row.clone());
            }
            let trigger = Trigger {
                id: m.event.id,
                version: m.event.version,
                time: m.event.time,
                change: Some(SourceChange::Snapshot),
                tx_id: None,
                scope: Scope::Targets {
                    targets: scope_targets.to_vec(),
                    force,
                    quiet: *quiet,
                    deep: actual.clone(),
                },
                values: Values::Read(m.unencodable),
            };
            let before = out.len();
            self.evaluate(
                e,
                &key,
                "snapshot",
                row,
                prev.as_deref(),
                true,
                m.data,
                &trigger,
                out,
                &mut pending,
            );
            for (c, t) in counts.iter_mut().zip(targets) {
                if !scope_targets.contains(t) {
                    continue;
                }
                if let Some(a) = actual.as_deref().filter(|a| a.target == *t) {
                    self.count_deep(a, *t, &key, before, out, c);
                    continue;
                }
                match out[before..]
                    .iter()
                    .find(|(x, _)| x == t)
                    .map(|(_, ev)| ev.op)
                {
                    Some(EventOp::Upsert) => c.resent += 1,
                    Some(EventOp::Delete) => c.deleted += 1,
                    None => c.equal += 1,
                }
            }
        }
        // Records released or held by these decisions (business keys let go,
        // references) are governed like any other: once, for every target.
        self.evaluate_pending(pending, position, &now_rfc3339(), out);
        counts
    }

    /// Forgets what target `target` was last sent of these (entity, key)
    /// records: their events were dropped from its dead letters, so the
    /// target may hold an older version, or still hold a record whose delete
    /// was dropped. Each is marked published with a document equal to none,
    /// so the next reconciliation sends it again (or, gone from the source,
    /// deletes it). Returns how many records were marked.
    pub fn forget_sent(&mut self, target: &str, records: &[(String, String)]) -> usize {
        let Some(t) = self.target_names.iter().position(|n| n == target) else {
            return 0;
        };
        let t = TargetIndex(t);
        let mut marked = 0;
        for (entity, key) in records {
            let Some(&e) = self.entity_index.get(entity) else {
                continue;
            };
            self.forget_one(t, e, key);
            marked += 1;
        }
        marked
    }

    /// Marks (t, e, key) as sent a document equal to none (see [`Governance::forget_sent`]).
    fn forget_one(&mut self, t: TargetIndex, e: EntityIndex, key: &str) {
        self.set_sent(t, e, key, Some(SENT_UNKNOWN));
    }

    /// Counts what a deep reconciliation found for one record against the
    /// target's row, from the event its evaluation made for target `t`
    /// (in `out[before..]`) or the one the target's guard refused.
    fn count_deep(
        &mut self,
        actual: &ActualRows,
        t: TargetIndex,
        key: &str,
        before: usize,
        out: &[(TargetIndex, Event)],
        counts: &mut ReconcileCounts,
    ) {
        let refused = self.deep_refused.take();
        let op = out[before..]
            .iter()
            .find(|(x, _)| *x == t)
            .map(|(_, ev)| ev.op)
            .or(refused);
        counts.add_drift(
            target_rows::drift_of(op, actual.row(key)),
            refused.is_some(),
        );
    }

    /// Before sending `op` to a deep reconciliation's target: whether the
    /// target's version guard refuses it (its row was written outside
    /// steward with a higher version). Then nothing is sent, the record is
    /// marked as sent a document equal to none (the target is not taken to
    /// hold it), and the refusal is audited and noted for [`Governance::count_deep`].
    #[allow(clippy::too_many_arguments)]
    fn refused_by(
        &mut self,
        held: Option<Option<&TargetRow>>,
        t: TargetIndex,
        e: EntityIndex,
        key: &str,
        op: EventOp,
        version: u64,
        id: &str,
    ) -> bool {
        let Some(row) = held.flatten().filter(|r| !r.accepts(version, id)) else {
            return false;
        };
        let guard = row.guard.as_ref().map_or_else(String::new, |(v, id)| {
            format!("_version {v}, _event_id {id}")
        });
        self.forget_one(t, e, key);
        self.audit(
            e,
            key,
            version,
            Some(t),
            "unrepairable",
            format!(
                "the target's row differs, but its version guard ({guard}) refuses steward's {} \
                 at version {version}: the row was written outside steward; nothing was sent",
                op.as_str()
            ),
        );
        self.deep_refused = Some(op);
        true
    }

    /// What [`Governance::process_snapshot`] would send target `t` for
    /// these rows (force off), changing nothing: a dry-run reconciliation.
    /// The same steps as [`Governance::decide`] (document, `publish_when`,
    /// rules, route, field policy, hash) without their effects.
    /// With `actual` (a deep reconciliation), compares with the target's rows.
    pub fn probe_snapshot(
        &self,
        mapped: &mut Vec<Mapped>,
        consistent: Lsn,
        t: TargetIndex,
        actual: Option<&ActualRows>,
    ) -> ReconcileCounts {
        let actual = actual.filter(|a| a.target == t);
        let mut counts = ReconcileCounts::default();
        for m in mapped.drain(..) {
            let e = m.entity;
            if self.is_hidden(e) {
                continue;
            }
            counts.checked += 1;
            let key = m.event.key.as_str();
            if self
                .touched
                .get(&(e, key.to_string()))
                .is_some_and(|v| *v >= consistent.0)
                || !self.entity_targets[e].contains(&t)
            {
                counts.equal += 1;
                continue;
            }
            let row = m.row.map(Arc::new);
            let deep = actual.map(|a| a.row(key));
            let op = self.probe(
                e,
                key,
                row.as_ref(),
                m.data,
                m.unencodable.is_some(),
                t,
                deep,
            );
            match deep {
                Some(held) => {
                    let refused = op.is_some()
                        && held.is_some_and(|r| !r.accepts(m.event.version, &m.event.id));
                    counts.add_drift(target_rows::drift_of(op, held), refused);
                }
                None => match op {
                    Some(EventOp::Upsert) => counts.resent += 1,
                    Some(EventOp::Delete) => counts.deleted += 1,
                    None => counts.equal += 1,
                },
            }
        }
        counts
    }

    /// The event [`Governance::decide`] would make for target `t` (None:
    /// none); `deep`: compared with the target's row (`Some(None)`: it has none).
    #[allow(clippy::too_many_arguments)]
    fn probe(
        &self,
        e: EntityIndex,
        key: &str,
        row: Option<&Arc<Map<String, Value>>>,
        fallback: Map<String, Value>,
        unencodable: bool,
        t: TargetIndex,
        deep: Option<Option<&TargetRow>>,
    ) -> Option<EventOp> {
        let published = match self.sent(t, e, key) {
            Sent::Hash(h) => Some(h),
            Sent::Nothing | Sent::Withheld => None,
        };
        let doc = match (row, self.tracked[e]) {
            (Some(r), true) => self.document(e, key, r),
            _ => fallback,
        };
        let old = self.tracked_row(e, key);
        let input = CelInput {
            row: row.map(AsRef::as_ref),
            old: old.as_deref(),
            op: "snapshot",
        };
        let publishable = match &self.gov[e].publish_when {
            None => true,
            Some(expr) => matches!(expr.test(&input), Ok(true)),
        };
        if unencodable
            || (publishable
                && (self.unencodable_child(e, key).is_some()
                    || self
                        .validate(e, key, &doc, row.map(AsRef::as_ref), &input)
                        .is_some()))
        {
            // Quarantined: the target keeps what it has.
            return None;
        }
        let routed = match &self.policies[t].route {
            None => true,
            Some(r) => matches!(r.test(&input), Ok(true)),
        };
        let name = &self.entities[e].name;
        if publishable && routed {
            let (data, _) = redact::apply(&self.policies[t], name, &doc);
            let data = EventData::from_map(&data);
            let same = match deep {
                Some(held) => held.is_some_and(|r| r.holds(&data)),
                None => published == Some(short_hash(&doc_hash(&data))),
            };
            return (!same).then_some(EventOp::Upsert);
        }
        match deep {
            Some(held) => {
                let held = held.filter(|r| r.present())?;
                match self.gov[e].on_unpublish {
                    OnUnpublish::Delete => Some(EventOp::Delete),
                    OnUnpublish::Upsert => {
                        let data =
                            EventData::from_map(&redact::apply(&self.policies[t], name, &doc).0);
                        (!held.holds(&data)).then_some(EventOp::Upsert)
                    }
                }
            }
            None => published.map(|_| match self.gov[e].on_unpublish {
                OnUnpublish::Delete => EventOp::Delete,
                OnUnpublish::Upsert => EventOp::Upsert,
            }),
        }
    }

    /// Governs, for target `t` only, records the target was sent that are
    /// gone from the source: `mapped` are deletes (key fields only) of keys
    /// a snapshot at `consistent` does not have. A record the stream changed
    /// since (re-created) is left to the stream; one not published to `t`
    /// needs nothing. Each is governed as deleted (its tracked row and
    /// business keys let go, a delete sent to `t`); with `dry_run` only
    /// counted. Records whose state this changes (references) are evaluated
    /// with version `position`.
    ///
    /// With `actual` (a deep reconciliation: the target's rows of these
    /// keys), a delete is sent only for a key whose row the target holds,
    /// whether or not it was sent; a key it was sent but does not hold is
    /// only forgotten.
    #[allow(clippy::too_many_arguments)]
    pub fn reconcile_absent(
        &mut self,
        mapped: &mut Vec<Mapped>,
        consistent: Lsn,
        t: TargetIndex,
        dry_run: bool,
        actual: Option<Arc<ActualRows>>,
        position: Lsn,
        out: &mut Vec<(TargetIndex, Event)>,
    ) -> ReconcileCounts {
        let mut counts = ReconcileCounts::default();
        let mut pending = Pending::default();
        let actual = actual.filter(|a| a.target == t);
        for m in mapped.drain(..) {
            let e = m.entity;
            let key = m.event.key.clone();
            let published = self.sent(t, e, &key).is_published();
            let held = actual.as_deref().map(|a| a.row(&key));
            let present = held.flatten().is_some_and(TargetRow::present);
            if self.is_hidden(e)
                || !(published || present)
                || self
                    .touched
                    .get(&(e, key.clone()))
                    .is_some_and(|v| *v >= consistent.0)
            {
                continue;
            }
            if dry_run {
                match held {
                    Some(row) if present => {
                        let refused = row.is_some_and(|r| !r.accepts(m.event.version, &m.event.id));
                        counts.add_drift(target_rows::Drift::Extra, refused);
                    }
                    Some(_) => {}
                    None => counts.deleted += 1,
                }
                continue;
            }
            let prev = self.tracked_row(e, &key);
            if prev.is_some() {
                self.set_row(e, &key, prev.clone(), None);
                self.defer_dependents(e, &key, &mut pending);
            }
            let trigger = Trigger {
                id: m.event.id,
                version: m.event.version,
                time: m.event.time,
                change: Some(SourceChange::Delete),
                tx_id: None,
                scope: Scope::Targets {
                    targets: vec![t],
                    force: false,
                    quiet: false,
                    deep: actual.clone(),
                },
                values: Values::Read(None),
            };
            let before = out.len();
            self.evaluate(
                e,
                &key,
                "delete",
                None,
                prev.as_deref(),
                true,
                m.data,
                &trigger,
                out,
                &mut pending,
            );
            match actual.as_deref() {
                Some(a) if present => self.count_deep(a, t, &key, before, out, &mut counts),
                Some(_) => {}
                None => {
                    counts.deleted += out[before..].iter().filter(|(x, _)| *x == t).count() as u64;
                }
            }
        }
        self.evaluate_pending(pending, position, &now_rfc3339(), out);
        counts
    }

    /// Learns the current rows of `entity` read from its table (start-up,
    /// for entities steward has no state of yet): the child rows of business
    /// objects, referenced records, external ids, and every governed record,
    /// whose business keys and quarantine are decided here without sending
    /// anything (each target learns a record from its own snapshot or the
    /// stream).
    pub fn seed_mapped(&mut self, mapped: &mut Vec<Mapped>, time: &str) {
        let mut pending = Pending::default();
        let mut out = Vec::new();
        for m in mapped.drain(..) {
            let e = m.entity;
            let key = m.event.key.clone();
            if self.gov[e].child_of.is_some()
                || !self.gov[e].external_ids_of.is_empty()
                || !self.gov[e].is_governed()
            {
                if self.gov[e].child_of.is_some() {
                    let bad = m.unencodable.as_ref();
                    self.note_child_encoding(e, &key, bad, &m.data, m.event.version);
                }
                self.observe(e, &key, m.row);
                continue;
            }
            let prev = self.tracked_row(e, &key);
            let row = m.row.map(Arc::new);
            self.set_row(e, &key, prev.clone(), row.clone());
            let trigger = Trigger {
                id: String::new(),
                version: 0,
                time: time.to_string(),
                change: None,
                tx_id: None,
                scope: Scope::Targets {
                    targets: Vec::new(),
                    force: false,
                    quiet: false,
                    deep: None,
                },
                values: Values::Read(m.unencodable),
            };
            self.evaluate(
                e,
                &key,
                "snapshot",
                row,
                prev.as_deref(),
                true,
                m.data,
                &trigger,
                &mut out,
                &mut pending,
            );
        }
        debug_assert!(out.is_empty());
    }

    /// Forgets the tracked records of `entity` that are not in `present`
    /// (every key read from its table just now, after a restored backup):
    /// each is governed as deleted, so a target that had it receives a
    /// delete with version `version`; child rows and external ids are
    /// dropped from the state. Returns the events and the number forgotten.
    pub fn prune_absent(
        &mut self,
        e: EntityIndex,
        present: &std::collections::HashSet<String>,
        version: Lsn,
        time: &str,
    ) -> (Vec<(TargetIndex, Event)>, usize) {
        let mut gone: Vec<String> = self
            .view
            .row_keys(e, &self.entities[e].name)
            .into_iter()
            .filter(|k| !present.contains(k))
            .collect();
        gone.sort_by(|a, b| key_order(a, b));
        let mut out = Vec::new();
        let mut pending = Pending::default();
        let hidden = self.is_hidden(e);
        for (i, key) in gone.iter().enumerate() {
            if hidden {
                let prev = self.tracked_row(e, key);
                if let Some((parent, _)) = self.gov[e].child_of {
                    for p in self.index_child(e, key, prev.as_deref(), None) {
                        pending.defer(self.rank[parent], parent, p);
                    }
                }
                self.set_row(e, key, prev, None);
                continue;
            }
            let prev = self.tracked_row(e, key);
            let data = prev
                .as_deref()
                .map(|r| assemble::key_data(&self.entities[e], r))
                .unwrap_or_default();
            self.set_row(e, key, prev.clone(), None);
            self.defer_dependents(e, key, &mut pending);
            let trigger = Trigger {
                // Its own id space: never equal to a streamed or re-emitted event's id.
                id: format!("{:016X}-P{i:08X}", version.0),
                version: version.0,
                time: time.to_string(),
                change: Some(SourceChange::Delete),
                tx_id: None,
                scope: Scope::All,
                values: Values::Read(None),
            };
            self.evaluate(
                e,
                key,
                "delete",
                None,
                prev.as_deref(),
                true,
                data,
                &trigger,
                &mut out,
                &mut pending,
            );
        }
        self.evaluate_pending(pending, version, time, &mut out);
        (out, gone.len())
    }

    /// Records a row in the tracked state only (child rows, external ids,
    /// referenced records).
    fn observe(&mut self, e: EntityIndex, key: &str, row: Option<Map<String, Value>>) {
        if !self.tracked[e] {
            return;
        }
        let row = row.map(Arc::new);
        if !self.gov[e].external_ids_of.is_empty() {
            let models = &self.gov[e].external_ids_of;
            let keep = row.as_ref().is_some_and(|r| {
                r.get("model")
                    .and_then(Value::as_str)
                    .is_some_and(|m| models.iter().any(|x| x == m))
            });
            if !keep {
                return;
            }
        }
        let (prev, unchanged) = self.prior_row(e, key, row.as_ref());
        if unchanged {
            return;
        }
        if self.gov[e].child_of.is_some() {
            self.index_child(e, key, prev.as_deref(), row.as_deref());
        }
        self.set_row(e, key, prev, row);
    }

    /// Entities whose streamed changes are remembered per key (with their
    /// commit LSN) so that [`Governance::process_snapshot`] can skip records
    /// the stream changed after a snapshot's consistent point. The memory
    /// is released when an entity stops being watched.
    pub fn watch(&mut self, entities: &[EntityIndex]) {
        let mut watched = vec![false; self.entities.len()];
        for &e in entities {
            if let Some(w) = watched.get_mut(e.0) {
                *w = true;
            }
        }
        if watched != self.watched {
            self.touched.retain(|(e, _), _| watched[*e]);
            self.watched = watched;
        }
    }

    /// Re-evaluates a quarantined record now (operator request).
    pub fn release(
        &mut self,
        entity: &str,
        key: &str,
        version: Lsn,
        time: &str,
    ) -> Result<Released, String> {
        let Some(&e) = self.entity_index.get(entity) else {
            return Err(format!("entity `{entity}` is not configured"));
        };
        if !self.quarantine.contains_key(&(e, key.to_string())) {
            return Err(format!("{entity} {key} is not quarantined"));
        }
        let Some(row) = self.tracked_row(e, key) else {
            return Err(format!(
                "{entity} {key} is quarantined but its row is not known; it is released by its next change"
            ));
        };
        let trigger = Trigger {
            id: format!(
                "{:016X}-R{:x}",
                version.0,
                chrono::Utc::now().timestamp_micros()
            ),
            version: version.0,
            time: time.to_string(),
            change: None,
            tx_id: None,
            scope: Scope::All,
            values: Values::Tracked,
        };
        let mut out = Vec::new();
        let mut pending = Pending::default();
        self.evaluate(
            e,
            key,
            "update",
            Some(row.clone()),
            Some(&row),
            true,
            Map::new(),
            &trigger,
            &mut out,
            &mut pending,
        );
        self.evaluate_pending(pending, version, time, &mut out);
        let still_failing = self
            .quarantine
            .get(&(e, key.to_string()))
            .map(|q| q.message.clone());
        Ok(Released {
            events: out,
            still_failing,
        })
    }

    /// Decides for one record ([`Governance::decide`]) and counts its new state.
    #[allow(clippy::too_many_arguments)]
    fn evaluate(
        &mut self,
        e: EntityIndex,
        key: &str,
        op: &str,
        row: Option<Arc<Map<String, Value>>>,
        old: Option<&Map<String, Value>>,
        seen: bool,
        fallback: Map<String, Value>,
        trigger: &Trigger,
        out: &mut Vec<(TargetIndex, Event)>,
        deferred: &mut Pending,
    ) {
        let gated = self.decide(e, key, op, row, old, seen, fallback, trigger, out, deferred);
        self.note_state(e, key, op == "delete", gated);
    }

    /// What each target gets of one record; returns whether its gate
    /// (`publish_when`) held it back.
    #[allow(clippy::too_many_arguments)]
    fn decide(
        &mut self,
        e: EntityIndex,
        key: &str,
        op: &str,
        row: Option<Arc<Map<String, Value>>>,
        old: Option<&Map<String, Value>>,
        seen: bool,
        fallback: Map<String, Value>,
        trigger: &Trigger,
        out: &mut Vec<(TargetIndex, Event)>,
        deferred: &mut Pending,
    ) -> bool {
        let name = self.entities[e].name.clone();
        let targets: Vec<TargetIndex> = match &trigger.scope {
            Scope::All => self.entity_targets[e].clone(),
            Scope::Targets { targets, .. } => self.entity_targets[e]
                .iter()
                .copied()
                .filter(|t| targets.contains(t))
                .collect(),
        };
        let force = matches!(trigger.scope, Scope::Targets { force: true, .. });
        let quiet = matches!(trigger.scope, Scope::Targets { quiet: true, .. });
        // A deep reconciliation's target: decided against its actual row.
        let deep = match &trigger.scope {
            Scope::Targets { deep: Some(a), .. } => Some(a.clone()),
            _ => None,
        };
        let held = |t: TargetIndex| {
            deep.as_deref()
                .filter(|a| a.target == t)
                .map(|a| a.row(key))
        };
        let version = trigger.version;
        let event = |op: EventOp, data: EventData| Event {
            change: trigger.change,
            tx_id: trigger.tx_id,
            id: trigger.id.clone(),
            entity: name.clone(),
            key: key.to_string(),
            op,
            version,
            time: trigger.time.clone(),
            data,
        };
        if op == "delete" {
            self.set_claims(e, key, Vec::new(), deferred);
            self.release_from_quarantine(e, key, version, "the record was deleted");
            let data = EventData::from_map(&fallback);
            for t in targets {
                let (slot, before) = self.sent_at(t, e, key);
                let was = before.is_published();
                if before == Sent::Withheld {
                    self.set_sent_at(slot, t, e, key, None);
                }
                let send = match held(t) {
                    Some(row) => row.is_some_and(TargetRow::present),
                    None => was || !seen,
                };
                if held(t).is_some() && !send {
                    // The target does not hold it: nothing to delete there.
                    if was {
                        self.set_sent_at(slot, t, e, key, None);
                    }
                } else if send {
                    self.set_sent_at(slot, t, e, key, None);
                    if self.refused_by(held(t), t, e, key, EventOp::Delete, version, &trigger.id) {
                        continue;
                    }
                    out.push((t, event(EventOp::Delete, data.clone())));
                    self.audit(e, key, version, Some(t), "delivered", "delete".into());
                } else {
                    self.audit(
                        e,
                        key,
                        version,
                        Some(t),
                        "gated",
                        "deleted; it was never delivered to this target".into(),
                    );
                }
            }
            return false;
        }

        let tracked = self.tracked[e];
        let doc = match (&row, tracked) {
            (Some(r), true) => self.document(e, key, r),
            _ => fallback,
        };
        let input = CelInput {
            row: row.as_deref(),
            old,
            op,
        };
        let (publishable, why) = match &self.gov[e].publish_when {
            None => (true, String::new()),
            Some(expr) => match expr.test(&input) {
                Ok(true) => (true, String::new()),
                Ok(false) => (false, format!("publish_when `{}` is false", expr.source)),
                Err(m) => (false, format!("publish_when could not be evaluated: {m}")),
            },
        };
        let failure = match &trigger.values {
            Values::Read(Some(bad)) => Some((ENCODING_RULE.to_string(), bad.to_string(), None)),
            Values::Tracked
                if self
                    .quarantine
                    .get(&(e, key.to_string()))
                    .is_some_and(|q| q.rule == ENCODING_RULE && q.blocked_by.is_none()) =>
            {
                // Held until a change of the record can be encoded.
                return false;
            }
            _ if publishable => self
                .unencodable_child(e, key)
                .or_else(|| self.validate(e, key, &doc, row.as_deref(), &input)),
            _ => None,
        };
        if let Some((rule, message, blocked_by)) = failure {
            self.set_claims(e, key, Vec::new(), deferred);
            let delivered = self.delivered_document(e, key, old, &targets);
            let entry = QuarantineEntry {
                entity: name.clone(),
                key: key.to_string(),
                version,
                rule: rule.clone(),
                message: message.clone(),
                document: Value::Object(doc),
                since: now_rfc3339(),
                blocked_by,
                delivered,
            };
            for &t in &targets {
                if let (slot, Sent::Nothing) = self.sent_at(t, e, key) {
                    self.set_sent_at(slot, t, e, key, Some(WITHHELD));
                }
            }
            self.quarantine.insert((e, key.to_string()), entry.clone());
            self.queue_quarantine(e, key, Some(entry));
            self.audit(
                e,
                key,
                version,
                None,
                "quarantined",
                format!("rule {rule}: {message}"),
            );
            return false;
        }
        if publishable {
            let claims = self.claim_values(e, &doc, row.as_deref());
            self.set_claims(e, key, claims, deferred);
            self.release_from_quarantine(e, key, version, "every rule passes now");
        } else {
            self.set_claims(e, key, Vec::new(), deferred);
            self.release_from_quarantine(
                e,
                key,
                version,
                "no longer publishable, so no longer validated",
            );
        }

        // The document as every target without a redaction of this entity
        // gets it: written and hashed once, shared by those targets.
        let mut unredacted: Option<(EventData, [u8; 16])> = None;
        for t in targets {
            let routed = match &self.policies[t].route {
                None => Ok(true),
                Some(r) => r
                    .test(&input)
                    .map_err(|m| format!("route could not be evaluated: {m}")),
            };
            let (slot, before) = self.sent_at(t, e, key);
            if publishable && routed == Ok(true) {
                let (data, notes) = redact::apply(&self.policies[t], &name, &doc);
                let (data, hash) = match data {
                    Cow::Borrowed(_) => unredacted
                        .get_or_insert_with(|| {
                            let data = EventData::from_map(&doc);
                            let hash = doc_hash(&data);
                            (data, hash)
                        })
                        .clone(),
                    Cow::Owned(redacted) => {
                        let data = EventData::from_map(&redacted);
                        let hash = doc_hash(&data);
                        (data, hash)
                    }
                };
                let sent_now = Sent::Hash(short_hash(&hash));
                let same = match held(t) {
                    Some(row) => row.is_some_and(|r| r.holds(&data)),
                    None => !force && before == sent_now,
                };
                if same {
                    if held(t).is_some() && before != sent_now {
                        // The target holds it: recorded as sent, so that an
                        // ordinary reconciliation agrees with this one.
                        self.set_sent_at(slot, t, e, key, Some(hash));
                    }
                    if quiet {
                        continue;
                    }
                    self.audit(
                        e,
                        key,
                        version,
                        Some(t),
                        "suppressed",
                        "same document as last delivered".into(),
                    );
                    continue;
                }
                self.set_sent_at(slot, t, e, key, Some(hash));
                if self.refused_by(held(t), t, e, key, EventOp::Upsert, version, &trigger.id) {
                    continue;
                }
                out.push((t, event(EventOp::Upsert, data)));
                self.audit(e, key, version, Some(t), "delivered", "upsert".into());
                if !notes.is_empty() {
                    self.audit(e, key, version, Some(t), "redacted", notes.join(", "));
                }
                continue;
            }
            let reason = if !publishable {
                why.clone()
            } else {
                match &routed {
                    Ok(_) => format!(
                        "route `{}` is false",
                        self.policies[t]
                            .route
                            .as_ref()
                            .map_or("", |r| r.source.as_str())
                    ),
                    Err(m) => m.clone(),
                }
            };
            let was = match held(t) {
                Some(row) => {
                    row.filter(|r| r.present())
                        .is_some_and(|r| match self.gov[e].on_unpublish {
                            OnUnpublish::Delete => true,
                            OnUnpublish::Upsert => !r.holds(&EventData::from_map(
                                &redact::apply(&self.policies[t], &name, &doc).0,
                            )),
                        })
                }
                None => before.is_published(),
            };
            // A record first seen by an update may have been delivered before steward tracked it.
            let unknown = !seen && op == "update";
            if was || unknown {
                self.set_sent_at(slot, t, e, key, Some(WITHHELD));
                let ev = match self.gov[e].on_unpublish {
                    OnUnpublish::Delete => {
                        let data = row
                            .as_deref()
                            .map(|r| assemble::key_data(&self.entities[e], r))
                            .unwrap_or_default();
                        event(EventOp::Delete, EventData::from_map(&data))
                    }
                    OnUnpublish::Upsert => event(
                        EventOp::Upsert,
                        EventData::from_map(&redact::apply(&self.policies[t], &name, &doc).0),
                    ),
                };
                if self.refused_by(held(t), t, e, key, ev.op, version, &trigger.id) {
                    continue;
                }
                out.push((t, ev));
                self.audit(e, key, version, Some(t), "unpublished", reason);
            } else {
                // (Deep: the target does not hold it, whatever was sent.)
                if before != Sent::Withheld {
                    self.set_sent_at(slot, t, e, key, Some(WITHHELD));
                } else if quiet {
                    continue;
                }
                let decision = if publishable { "not_routed" } else { "gated" };
                self.audit(e, key, version, Some(t), decision, reason);
            }
        }
        !publishable
    }

    /// The document of a tracked record: mapped fields, references,
    /// children (each with its own references), in the order the
    /// configuration writes them.
    fn document(&self, e: EntityIndex, key: &str, row: &Map<String, Value>) -> Map<String, Value> {
        let mut doc = assemble::document(&self.entities[e].fields, row);
        for r in &self.gov[e].refs {
            doc.insert(r.name.clone(), self.resolve_ref(r, row));
        }
        for c in &self.gov[e].children {
            let mut items: Vec<(String, Value)> = Vec::new();
            if let Some(keys) = self.children.get(&(c.entity, key.to_string())) {
                for k in keys {
                    if let Some(child) = self.tracked_row(c.entity, k) {
                        let mut d = assemble::document(&c.fields, &child);
                        for r in &c.refs {
                            d.insert(r.name.clone(), self.resolve_ref(r, &child));
                        }
                        let mut d = ordered(d, &c.field_order);
                        if !d.contains_key("id") {
                            d.insert("id".into(), child.get("id").cloned().unwrap_or(Value::Null));
                        }
                        items.push((k.clone(), Value::Object(d)));
                    }
                }
            }
            // Numeric ids in numeric order, so the document does not depend on hashing.
            items.sort_by(|a, b| key_order(&a.0, &b.0));
            doc.insert(
                c.name.clone(),
                Value::Array(items.into_iter().map(|(_, v)| v).collect()),
            );
        }
        ordered(doc, &self.gov[e].field_order)
    }

    fn resolve_ref(
        &self,
        r: &crate::config::governance::RefField,
        row: &Map<String, Value>,
    ) -> Value {
        match self.entity_index.get(&r.entity) {
            Some(_) if r.external_id => self.external_id(&r.model, row.get(&r.column)),
            Some(&t) => reference::resolve(r, &self.entities[t], row, |id| self.tracked_row(t, id)),
            None => Value::Null,
        }
    }

    /// Why record `id` of entity `t` is not published (the blocker of the
    /// records referencing it), or `None` when it is: it exists, passes its
    /// gate and is not quarantined.
    fn blocker(&self, t: EntityIndex, id: &str) -> Option<String> {
        let Some(referenced) = self.tracked_row(t, id) else {
            return Some("it does not exist or steward has not read it".into());
        };
        if let Some(expr) = &self.gov[t].publish_when {
            let ok = expr.test(&CelInput {
                row: Some(&referenced),
                old: None,
                op: "update",
            });
            if ok != Ok(true) {
                return Some(format!("not publishable: publish_when `{}`", expr.source));
            }
        }
        if let Some(q) = self.quarantine.get(&(t, id.to_string())) {
            return Some(format!("quarantined: {}", q.message));
        }
        None
    }

    /// Keys of parents whose child rows of child entity `c` hold `value` in `column`.
    fn parents_with_child_value(&self, c: EntityIndex, column: &str, value: &str) -> Vec<String> {
        let Some((p, ci)) = self.gov[c].child_of else {
            return Vec::new();
        };
        let parent_column = &self.gov[p].children[ci].parent;
        let mut out: Vec<String> = self
            .referencing(c, column, value)
            .into_iter()
            .filter_map(|k| self.tracked_row(c, &k))
            .filter_map(|row| {
                row.get(parent_column)
                    .filter(|v| !v.is_null())
                    .map(assemble::text)
            })
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// The ids a reference rule checks: the row's column (a reference
    /// field's many2one column when the rule names a reference field), or
    /// for `child.field` that column of every child row.
    fn reference_ids(
        &self,
        e: EntityIndex,
        key: &str,
        field: &str,
        row: Option<&Map<String, Value>>,
    ) -> Vec<String> {
        let g = &self.gov[e];
        match field.split_once('.') {
            Some((child, field)) => {
                let Some(c) = g.children.iter().find(|c| c.name == child) else {
                    return Vec::new();
                };
                let column = child_column(c, field);
                let mut ids = Vec::new();
                if let Some(keys) = self.children.get(&(c.entity, key.to_string())) {
                    for k in keys {
                        if let Some(v) = self
                            .tracked_row(c.entity, k)
                            .and_then(|r| r.get(&column).filter(|v| !v.is_null()).cloned())
                        {
                            ids.push(assemble::text(&v));
                        }
                    }
                }
                ids.sort();
                ids.dedup();
                ids
            }
            None => {
                let column = ref_column(g, field);
                row.and_then(|r| r.get(&column))
                    .filter(|v| !v.is_null())
                    .map(|v| vec![assemble::text(v)])
                    .unwrap_or_default()
            }
        }
    }

    /// The first failing rule (or business key), with a message for the operator.
    fn validate(
        &self,
        e: EntityIndex,
        key: &str,
        doc: &Map<String, Value>,
        row: Option<&Map<String, Value>>,
        input: &CelInput<'_>,
    ) -> Option<(String, String, Option<String>)> {
        for rule in &self.gov[e].rules {
            for check in &rule.checks {
                if let Err(detail) = self.check(e, key, check, doc, row, input) {
                    let message = match &rule.message {
                        Some(m) => format!("{m} ({detail})"),
                        None => format!("rule '{}' failed: {detail}", rule.name),
                    };
                    let blocked_by = match check {
                        Check::Reference { field, entity } => self
                            .reference_blocker(e, key, field, entity, row)
                            .map(|(id, _)| format!("{entity} {id}")),
                        _ => None,
                    };
                    return Some((rule.name.clone(), message, blocked_by));
                }
            }
        }
        for (fi, field) in self.gov[e].unique.iter().enumerate() {
            let Some(value) = assemble::lookup(field, doc, row) else {
                continue;
            };
            let raw = assemble::text(value);
            let norm = assemble::normalise(&raw);
            if norm.is_empty() {
                continue;
            }
            let entity = &self.entities[e].name;
            if let Some(holder) = self.view.unique_holder(&(e, fi, norm), entity, field) {
                if holder != key {
                    return Some((
                        format!("unique:{field}"),
                        format!(
                            "{field} '{raw}' is already used by {} {holder}; change one of the two records",
                            self.entities[e].name
                        ),
                        None,
                    ));
                }
            }
        }
        None
    }

    fn check(
        &self,
        e: EntityIndex,
        key: &str,
        check: &Check,
        doc: &Map<String, Value>,
        row: Option<&Map<String, Value>>,
        input: &CelInput<'_>,
    ) -> Result<(), String> {
        // A field, or for `child.field` that field of every child item.
        let values = |f: &str| -> Vec<Option<&Value>> {
            match f.split_once('.') {
                Some((child, field)) if !doc.contains_key(f) => match doc.get(child) {
                    Some(Value::Array(items)) => items
                        .iter()
                        .map(|item| item.get(field).filter(|v| !v.is_null()))
                        .collect(),
                    _ => Vec::new(),
                },
                _ => vec![assemble::lookup(f, doc, row)],
            }
        };
        let each = |f: &str, test: &dyn Fn(&Value) -> Result<(), String>| {
            values(f).into_iter().flatten().try_for_each(test)
        };
        match check {
            Check::Required(fields) => {
                let missing: Vec<&str> = fields
                    .iter()
                    .filter(|f| {
                        values(f).iter().any(|v| {
                            v.is_none_or(|v| v.as_str().is_some_and(|s| s.trim().is_empty()))
                        })
                    })
                    .map(String::as_str)
                    .collect();
                if missing.is_empty() {
                    Ok(())
                } else {
                    Err(format!("missing {}", missing.join(", ")))
                }
            }
            // Only `required` fails on a missing (null) value.
            Check::Regex { field, regex } => each(field, &|v| {
                if regex.is_match(&assemble::text(v)) {
                    Ok(())
                } else {
                    Err(format!(
                        "{field} '{}' does not match /{}/",
                        assemble::text(v),
                        regex.as_str()
                    ))
                }
            }),
            Check::Allowed { field, values } => each(field, &|v| {
                if values
                    .iter()
                    .any(|a| a == v || assemble::text(a) == assemble::text(v))
                {
                    Ok(())
                } else {
                    Err(format!(
                        "{field} '{}' is not one of {}",
                        assemble::text(v),
                        values
                            .iter()
                            .map(assemble::text)
                            .collect::<Vec<_>>()
                            .join(", ")
                    ))
                }
            }),
            Check::Range { field, min, max } => each(field, &|v| {
                // NaN compares false with every bound: it would pass any range.
                let Some(n) = assemble::text(v)
                    .parse::<f64>()
                    .ok()
                    .filter(|n| !n.is_nan())
                else {
                    return Err(format!("{field} '{}' is not a number", assemble::text(v)));
                };
                if min.is_some_and(|m| n < m) || max.is_some_and(|m| n > m) {
                    return Err(format!(
                        "{field} {} is outside {}..{}",
                        assemble::text(v),
                        min.map_or(String::new(), |m| m.to_string()),
                        max.map_or(String::new(), |m| m.to_string())
                    ));
                }
                Ok(())
            }),
            Check::Cel(expr) => match expr.test(input) {
                Ok(true) => Ok(()),
                Ok(false) => Err(format!("`{}` is false", expr.source)),
                Err(m) => Err(m),
            },
            Check::Reference { field, entity } => {
                if !self.entity_index.contains_key(entity) {
                    return Err(format!("entity {entity} is not configured"));
                }
                match self.reference_blocker(e, key, field, entity, row) {
                    Some((id, why)) => {
                        Err(format!("{field} = {id}: blocked by {entity} {id} ({why})"))
                    }
                    None => Ok(()),
                }
            }
        }
    }

    /// The first record a reference rule points at that is not published,
    /// with the reason.
    fn reference_blocker(
        &self,
        e: EntityIndex,
        key: &str,
        field: &str,
        entity: &str,
        row: Option<&Map<String, Value>>,
    ) -> Option<(String, String)> {
        let &t = self.entity_index.get(entity)?;
        self.reference_ids(e, key, field, row)
            .into_iter()
            .find_map(|id| self.blocker(t, &id).map(|why| (id, why)))
    }

    fn claim_values(
        &self,
        e: EntityIndex,
        doc: &Map<String, Value>,
        row: Option<&Map<String, Value>>,
    ) -> Vec<(usize, String)> {
        self.gov[e]
            .unique
            .iter()
            .enumerate()
            .filter_map(|(fi, f)| {
                let v = assemble::normalise(&assemble::text(assemble::lookup(f, doc, row)?));
                (!v.is_empty()).then_some((fi, v))
            })
            .collect()
    }

    /// Replaces the business keys held by (e, key); records quarantined on a
    /// key that was let go are re-evaluated at the end of the transaction.
    fn set_claims(
        &mut self,
        e: EntityIndex,
        key: &str,
        new: Vec<(usize, String)>,
        deferred: &mut Pending,
    ) {
        if self.gov[e].unique.is_empty() {
            return;
        }
        let entity = self.entities[e].name.clone();
        let old = self.view.claims(e, &entity, key, &self.gov[e].unique);
        if old.is_empty() && new.is_empty() {
            return;
        }
        let mut freed = false;
        let mut held = Vec::with_capacity(new.len());
        for (fi, value) in old {
            if new.contains(&(fi, value.clone())) {
                held.push((fi, value));
                continue;
            }
            // A claim is the holder's own: let it go.
            self.view.set_unique((e, fi, value.clone()), None);
            self.queue_unique(e, fi, &value, None);
            freed = true;
        }
        for (fi, value) in new {
            if held.contains(&(fi, value.clone())) {
                continue;
            }
            let field = &self.gov[e].unique[fi];
            let slot = (e, fi, value);
            if self.view.unique_holder(&slot, &entity, field).is_none() {
                self.view.set_unique(slot.clone(), Some(key.to_string()));
                self.queue_unique(e, fi, &slot.2, Some(key));
                held.push((slot.1, slot.2));
            }
        }
        self.view.set_claims(e, key, held);
        if freed {
            let mut waiting: Vec<String> = self
                .quarantine
                .iter()
                .filter(|((qe, _), q)| *qe == e && q.rule.starts_with("unique:"))
                .map(|((_, k), _)| k.clone())
                .collect();
            waiting.sort();
            for k in waiting {
                // Even one already decided in this transaction (quarantined,
                // so nothing was sent): the key it waited for is free now.
                deferred.redo(self.rank[e], e, k);
            }
        }
    }

    /// The external id of record `id` of `model`, or null when it has none.
    fn external_id(&self, model: &str, id: Option<&Value>) -> Value {
        let Some(id) = id.filter(|v| !v.is_null()) else {
            return Value::Null;
        };
        self.external_ids
            .get(&(model.to_string(), assemble::text(id)))
            .and_then(|ids| ids.values().next())
            .map_or(Value::Null, |x| Value::String(x.clone()))
    }

    /// (referencing entity, many2one column) of every external-id reference to `model`.
    fn external_id_refs(&self, model: &str) -> Vec<(EntityIndex, String)> {
        let mut out = Vec::new();
        for (i, g) in EntityIndex::enumerate(&self.gov) {
            for r in &g.refs {
                if r.external_id && r.model == model {
                    out.push((i, r.column.clone()));
                }
            }
        }
        out.sort();
        out.dedup();
        out
    }

    /// Keeps the external-id index in step with a tracked `ir_model_data` row.
    fn index_external_id(
        &mut self,
        e: EntityIndex,
        key: &str,
        prev: Option<&Map<String, Value>>,
        new: Option<&Map<String, Value>>,
    ) {
        if self.gov[e].external_ids_of.is_empty() {
            return;
        }
        let id: i64 = key.parse().unwrap_or(i64::MAX);
        if let Some(target) = prev.and_then(external_id_target) {
            if let Some(ids) = self.external_ids.get_mut(&target) {
                ids.remove(&id);
                if ids.is_empty() {
                    self.external_ids.remove(&target);
                }
            }
        }
        if let Some(row) = new {
            if let (Some(target), Some(module), Some(name)) = (
                external_id_target(row),
                row.get("module").and_then(Value::as_str),
                row.get("name").and_then(Value::as_str),
            ) {
                self.external_ids
                    .entry(target)
                    .or_default()
                    .insert(id, format!("{module}.{name}"));
            }
        }
    }

    /// A child row (a line of a business object) with a value steward cannot
    /// encode is held in quarantine under its own entity and key, which
    /// holds its parent back (see [`Governance::unencodable_child`]); a row
    /// that encodes (or its delete) releases it.
    fn note_child_encoding(
        &mut self,
        e: EntityIndex,
        key: &str,
        bad: Option<&Unencodable>,
        data: &Map<String, Value>,
        version: u64,
    ) {
        let Some(bad) = bad else {
            self.release_from_quarantine(e, key, version, "its values can be encoded now");
            return;
        };
        let entry = QuarantineEntry {
            entity: self.entities[e].name.clone(),
            key: key.to_string(),
            version,
            rule: ENCODING_RULE.to_string(),
            message: bad.to_string(),
            document: Value::Object(data.clone()),
            since: now_rfc3339(),
            blocked_by: None,
            delivered: self
                .quarantine
                .get(&(e, key.to_string()))
                .and_then(|q| q.delivered.clone()),
        };
        self.quarantine.insert((e, key.to_string()), entry.clone());
        self.queue_quarantine(e, key, Some(entry));
        self.audit(
            e,
            key,
            version,
            None,
            "quarantined",
            format!("rule {ENCODING_RULE}: {bad}"),
        );
    }

    /// The first child row of (e, key) held for a value steward cannot
    /// encode: the business object's document would carry it, so the
    /// object is held too, until that row changes.
    fn unencodable_child(
        &self,
        e: EntityIndex,
        key: &str,
    ) -> Option<(String, String, Option<String>)> {
        if self.quarantine.is_empty() {
            return None;
        }
        for c in &self.gov[e].children {
            let Some(keys) = self.children.get(&(c.entity, key.to_string())) else {
                continue;
            };
            for k in keys {
                if let Some(q) = self
                    .quarantine
                    .get(&(c.entity, k.clone()))
                    .filter(|q| q.rule == ENCODING_RULE)
                {
                    return Some((
                        ENCODING_RULE.to_string(),
                        format!("{} {k}: {}", q.entity, q.message),
                        Some(format!("{} {k}", q.entity)),
                    ));
                }
            }
        }
        None
    }

    /// Counts the state a record is in after its evaluation: `deleted`, or
    /// quarantined, or held by its gate (`gated`), or else published.
    fn note_state(&mut self, e: EntityIndex, key: &str, deleted: bool, gated: bool) {
        if !self.counted[e] {
            return;
        }
        let state = if deleted {
            None
        } else if let Some(q) = self.quarantined_entry(e, key) {
            Some(RecordState::of_entry(q))
        } else if gated {
            Some(RecordState::PendingApproval)
        } else {
            None
        };
        self.set_held(e, key, state);
    }

    fn quarantined_entry(&self, e: EntityIndex, key: &str) -> Option<&QuarantineEntry> {
        if self.quarantine.is_empty() {
            return None;
        }
        self.quarantine.get(&(e, key.to_string()))
    }

    /// Sets the held state of a counted record (`None`: published, or gone).
    fn set_held(&mut self, e: EntityIndex, key: &str, state: Option<RecordState>) {
        if state.is_none() && self.held.is_empty() {
            // The common case: nothing held, nothing to forget.
            return;
        }
        let h = record_hash(e, key);
        let was = match state {
            Some(s) => self.held.insert(h, s),
            None => self.held.remove(&h),
        };
        if was != state {
            if let Some(i) = was.and_then(RecordState::held_index) {
                self.held_counts[e][i] -= 1;
            }
            if let Some(i) = state.and_then(RecordState::held_index) {
                self.held_counts[e][i] += 1;
            }
            self.counts_changed = true;
        }
    }

    /// Completes the counts once the state is loaded: the rows were
    /// counted, and their gates evaluated, as they loaded; a quarantine
    /// entry of a tracked record decides its state.
    fn derive_counts(&mut self) {
        let mut states = Vec::new();
        for ((e, key), q) in &self.quarantine {
            if self.counted[*e] && self.tracked_row(*e, key).is_some() {
                states.push((*e, key.clone(), RecordState::of_entry(q)));
            }
        }
        for (e, key, state) in states {
            self.set_held(e, &key, Some(state));
        }
        self.counts_changed = true;
    }

    /// Takes a record out of quarantine, if it is there, with the reason in the audit trail.
    fn release_from_quarantine(&mut self, e: EntityIndex, key: &str, version: u64, reason: &str) {
        // Nothing is quarantined almost always: skip building the lookup key.
        if self.quarantine.is_empty() {
            return;
        }
        if self.quarantine.remove(&(e, key.to_string())).is_some() {
            self.queue_quarantine(e, key, None);
            self.audit(e, key, version, None, "released", reason.to_string());
        }
    }

    /// Replaces the tracked row of (e, key), `prev` (what
    /// [`Governance::tracked_row`] gives now), with `row`.
    fn set_row(&mut self, e: EntityIndex, key: &str, prev: Option<Row>, row: Option<Row>) {
        if !self.gov[e].external_ids_of.is_empty() || !self.ref_columns[e].is_empty() {
            self.index_external_id(e, key, prev.as_deref(), row.as_deref());
            self.index_refs(e, key, prev.as_deref(), row.as_deref());
        }
        let bytes = row.as_ref().and_then(|r| serde_json::to_vec(&**r).ok());
        match (&row, prev.is_some()) {
            (Some(_), false) => {
                self.row_counts[e] += 1;
                self.counts_changed |= self.counted[e];
            }
            (None, true) => {
                self.row_counts[e] -= 1;
                self.counts_changed |= self.counted[e];
                self.set_held(e, key, None);
            }
            _ => {}
        }
        self.view.set_row(e, key, row);
        self.delta.ops.push(GovOp::Row {
            entity: self.entities[e].name.clone(),
            key: key.to_string(),
            row: bytes,
        });
    }

    /// Keeps the (entity, column, id) → keys index in step with a tracked row.
    fn index_refs(
        &mut self,
        e: EntityIndex,
        key: &str,
        prev: Option<&Map<String, Value>>,
        new: Option<&Map<String, Value>>,
    ) {
        for column in &self.ref_columns[e] {
            let value = |r: Option<&Map<String, Value>>| {
                r.and_then(|r| r.get(column))
                    .filter(|v| !v.is_null())
                    .map(assemble::text)
            };
            let (before, after) = (value(prev), value(new));
            if before == after {
                continue;
            }
            for (id, present) in [(before, false), (after, true)] {
                let Some(id) = id else {
                    continue;
                };
                self.delta.ops.push(GovOp::Ref {
                    entity: self.entities[e].name.clone(),
                    column: column.clone(),
                    id: id.clone(),
                    key: key.to_string(),
                    present,
                });
                self.view
                    .set_ref((e, column.clone(), id, key.to_string()), present);
            }
        }
    }

    /// (entity, column) of every column whose ids the store indexes for
    /// this configuration, sorted: a store whose index covers other columns
    /// rebuilds it from the tracked rows ([`Governance::ref_entries`]).
    pub fn ref_columns(&self) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = EntityIndex::enumerate(&self.ref_columns)
            .flat_map(|(e, columns)| {
                columns
                    .iter()
                    .map(move |c| (self.entities[e].name.clone(), c.clone()))
            })
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// The (column, id) index entries of a tracked row of `entity` (a JSON
    /// object's bytes), as the governance writes them.
    pub fn ref_entries(&self, entity: &str, row: &[u8]) -> Vec<(String, String)> {
        let Some(&e) = self.entity_index.get(entity) else {
            return Vec::new();
        };
        if self.ref_columns[e].is_empty() {
            return Vec::new();
        }
        let Ok(Value::Object(row)) = serde_json::from_slice::<Value>(row) else {
            return Vec::new();
        };
        self.ref_columns[e]
            .iter()
            .filter_map(|c| {
                let id = row.get(c).filter(|v| !v.is_null())?;
                Some((c.clone(), assemble::text(id)))
            })
            .collect()
    }

    /// Keys of tracked records of `entity` whose `column` holds `id`, in key order.
    fn referencing(&self, entity: EntityIndex, column: &str, id: &str) -> Vec<String> {
        let mut keys = self
            .view
            .referencing(entity, &self.entities[entity].name, column, id);
        keys.sort_by(|a, b| key_order(a, b));
        keys
    }

    /// Updates the parent → children index for a child row; returns the parents touched.
    fn index_child(
        &mut self,
        e: EntityIndex,
        key: &str,
        prev: Option<&Map<String, Value>>,
        new: Option<&Map<String, Value>>,
    ) -> Vec<String> {
        let Some((p, c)) = self.gov[e].child_of else {
            return Vec::new();
        };
        let column = self.gov[p].children[c].parent.clone();
        let parent_of = |r: Option<&Map<String, Value>>| {
            r.and_then(|r| r.get(&column))
                .filter(|v| !v.is_null())
                .map(assemble::text)
        };
        let (before, after) = (parent_of(prev), parent_of(new));
        let mut touched = Vec::new();
        if let Some(b) = before {
            if let Some(set) = self.children.get_mut(&(e, b.clone())) {
                set.remove(key);
            }
            touched.push(b);
        }
        if let Some(a) = after {
            self.children
                .entry((e, a.clone()))
                .or_default()
                .insert(key.to_string());
            if !touched.contains(&a) {
                touched.push(a);
            }
        }
        touched
    }

    /// What target `t` was last sent of record (e, key).
    pub(crate) fn sent(&self, t: TargetIndex, e: EntityIndex, key: &str) -> Sent {
        self.sent_at(t, e, key).1
    }

    /// [`Governance::sent`], with the slot to change it by
    /// ([`Governance::set_sent_at`]) without hashing the names again.
    fn sent_at(&self, t: TargetIndex, e: EntityIndex, key: &str) -> (PublishedSlot, Sent) {
        let (target, entity) = (&self.target_names[t], &self.entities[e].name);
        let slot = published_slot(target, entity, key);
        (slot, self.view.get(&slot, target, entity, key))
    }

    /// Records what target `t` was sent of record (e, key) — a document's
    /// hash, [`WITHHELD`], or `None` for nothing — and queues it for the store.
    fn set_sent(&mut self, t: TargetIndex, e: EntityIndex, key: &str, hash: Option<[u8; 16]>) {
        let slot = published_slot(&self.target_names[t], &self.entities[e].name, key);
        self.set_sent_at(slot, t, e, key, hash);
    }

    /// [`Governance::set_sent`] for the slot [`Governance::sent_at`] gave.
    fn set_sent_at(
        &mut self,
        slot: PublishedSlot,
        t: TargetIndex,
        e: EntityIndex,
        key: &str,
        hash: Option<[u8; 16]>,
    ) {
        let (target, entity) = (&self.target_names[t], &self.entities[e].name);
        push_published_change(&mut self.delta.published, target, entity, key, hash);
        self.view.set(slot, Sent::of(hash));
    }

    fn queue_unique(&mut self, e: EntityIndex, fi: usize, value: &str, holder: Option<&str>) {
        self.delta.ops.push(GovOp::Unique {
            entity: self.entities[e].name.clone(),
            field: self.gov[e].unique[fi].clone(),
            value: value.to_string(),
            holder: holder.map(str::to_string),
        });
    }

    fn queue_quarantine(&mut self, e: EntityIndex, key: &str, entry: Option<QuarantineEntry>) {
        self.delta.ops.push(GovOp::Quarantine {
            entity: self.entities[e].name.clone(),
            key: key.to_string(),
            entry: entry.map(Box::new),
        });
    }

    /// The document a record entering quarantine had before, for the
    /// record view's diff: kept from its earlier entry while it stays in
    /// quarantine, else made from its previous row when some target has a
    /// document of it. Made only on entering quarantine, never on the way
    /// to delivery.
    fn delivered_document(
        &self,
        e: EntityIndex,
        key: &str,
        old: Option<&Map<String, Value>>,
        targets: &[TargetIndex],
    ) -> Option<Value> {
        if let Some(q) = self.quarantine.get(&(e, key.to_string())) {
            return q.delivered.clone();
        }
        let old = old.filter(|_| self.tracked[e])?;
        targets
            .iter()
            .any(|&t| self.sent(t, e, key).is_published())
            .then(|| Value::Object(self.document(e, key, old)))
    }

    fn audit(
        &mut self,
        e: EntityIndex,
        key: &str,
        version: u64,
        target: Option<TargetIndex>,
        decision: &str,
        detail: String,
    ) {
        self.delta.ops.push(GovOp::Audit(AuditRecord {
            time_micros: chrono::Utc::now().timestamp_micros(),
            entity: self.entities[e].name.clone(),
            key: key.to_string(),
            version,
            target: target.map(|t| self.target_names[t].clone()),
            decision: decision.to_string(),
            detail,
            user: None,
            comment: None,
            seq: None,
        }));
    }
}

/// The column a rule field names on the entity's row: a reference field's
/// many2one column, a plain mapped field's column, else the name itself.
fn ref_column(g: &EntityGovernance, field: &str) -> String {
    g.refs
        .iter()
        .find(|r| r.name == field)
        .map_or_else(|| field.to_string(), |r| r.column.clone())
}

/// [`ref_column`] for a child's field.
fn child_column(c: &ChildConfig, field: &str) -> String {
    if let Some(r) = c.refs.iter().find(|r| r.name == field) {
        return r.column.clone();
    }
    c.fields
        .iter()
        .find(|f| f.name == field && f.source.path.is_empty())
        .map_or_else(|| field.to_string(), |f| f.source.column.clone())
}

/// A digest of everything that decides what target `t` receives of entity
/// `e`: the mapping, gate, rules, business keys, references, children, and
/// the target's routing and redaction for it. A change between two runs
/// means every record of the entity must be evaluated again for the target.
pub fn config_fingerprint(config: &Config, t: TargetIndex, e: EntityIndex) -> String {
    let entity = &config.entities[e];
    let gov = config
        .governance
        .entities
        .get(e.0)
        .cloned()
        .unwrap_or_default();
    let policy = config
        .governance
        .targets
        .get(t.0)
        .cloned()
        .unwrap_or_default();
    let name = &entity.name;
    let hidden: Vec<&EntityConfig> = gov
        .children
        .iter()
        .filter_map(|c| config.entities.get(c.entity.0))
        .collect();
    let text = format!(
        "{entity:?}|{hidden:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{}",
        gov.publish_when,
        gov.on_unpublish,
        gov.rules,
        gov.unique,
        gov.refs,
        gov.children,
        gov.field_order,
        policy
            .allow
            .iter()
            .filter(|(x, _)| x == name)
            .collect::<Vec<_>>(),
        policy
            .mask
            .iter()
            .filter(|(x, _, _)| x == name)
            .collect::<Vec<_>>(),
        policy
            .hash
            .iter()
            .filter(|(x, _)| x == name)
            .collect::<Vec<_>>(),
        policy.route,
        policy.hash_key.is_some(),
    );
    blake3::hash(text.as_bytes()).to_hex()[..32].to_string()
}

/// Keys in a total order: numbers by value before other keys, those as text.
fn key_order(a: &str, b: &str) -> std::cmp::Ordering {
    match (a.parse::<i64>(), b.parse::<i64>()) {
        (Ok(x), Ok(y)) => x.cmp(&y),
        (Ok(_), Err(_)) => std::cmp::Ordering::Less,
        (Err(_), Ok(_)) => std::cmp::Ordering::Greater,
        _ => a.cmp(b),
    }
}

/// `doc` with the fields named in `order` first, in that order, then the rest.
fn ordered(mut doc: Map<String, Value>, order: &[String]) -> Map<String, Value> {
    if order.is_empty() {
        return doc;
    }
    let mut out = Map::with_capacity(doc.len());
    for name in order {
        if let Some(v) = doc.shift_remove(name) {
            out.insert(name.clone(), v);
        }
    }
    out.extend(doc);
    out
}

/// (model, record id) an `ir_model_data` row names.
fn external_id_target(row: &Map<String, Value>) -> Option<(String, String)> {
    let model = row.get("model")?.as_str()?;
    let res_id = row.get("res_id").filter(|v| !v.is_null())?;
    Some((model.to_string(), assemble::text(res_id)))
}

/// The slot of (target, entity, key) among the published changes in memory.
fn published_slot(target: &str, entity: &str, key: &str) -> PublishedSlot {
    let digest = published_digest(target, entity, key);
    let mut slot = [0u8; 12];
    slot.copy_from_slice(&digest[..12]);
    slot
}

/// Restores the state piece by piece as the store reads it; names no
/// longer configured are ignored.
impl GovLoader for Governance {
    fn row(&mut self, entity: &str, key: &str, bytes: &[u8]) {
        let Some(&e) = self.entity_index.get(entity) else {
            return;
        };
        if !self.summarised {
            self.row_counts[e] += 1;
        }
        let gate = self.gov[e]
            .publish_when
            .as_ref()
            .filter(|_| self.counted[e] && !self.summarised);
        // The references are indexed in the store (`Governance::ref_columns`).
        let indexed = self.gov[e].child_of.is_some() || !self.gov[e].external_ids_of.is_empty();
        if gate.is_none() && !indexed {
            return;
        }
        // The row itself stays in the store: only the indices and counts
        // derived from it are held.
        let Ok(Value::Object(row)) = serde_json::from_slice(bytes) else {
            return;
        };
        if let Some(expr) = gate {
            let input = CelInput {
                row: Some(&row),
                old: None,
                op: "update",
            };
            if expr.test(&input) != Ok(true) {
                self.set_held(e, key, Some(RecordState::PendingApproval));
            }
        }
        if indexed {
            self.index_child(e, key, None, Some(&row));
            self.index_external_id(e, key, None, Some(&row));
        }
    }

    fn unique(&mut self, _entity: &str, _field: &str, _value: &str, _holder: &str) {
        // Read from the store as needed (see `wants_unique`).
    }

    fn wants_unique(&self) -> bool {
        false
    }

    fn wants_rows(&self, entity: &str) -> bool {
        let Some(&e) = self.entity_index.get(entity) else {
            return false;
        };
        !self.summarised
            || self.gov[e].child_of.is_some()
            || !self.gov[e].external_ids_of.is_empty()
    }

    fn quarantined(&mut self, q: QuarantineEntry) {
        if let Some(&e) = self.entity_index.get(&q.entity) {
            self.quarantine.insert((e, q.key.clone()), q);
        }
    }
}

/// The key of the published changes held in memory until the store shows
/// them: the first 96 bits of the (target, entity, key) digest. Two records
/// in flight share a slot with odds of about 1 in 10^17 for a million; a
/// changed document is taken for the one before with odds of 1 in 2^64 per
/// change (8-byte document hashes compared). The store keeps the names and
/// full 16-byte hashes.
type PublishedSlot = super::slot_map::Slot;

/// The published state's value for a record whose last document sent never
/// reached the target (its dead letter was dropped): published, and equal
/// to no document, so the next reconciliation sends it again.
const SENT_UNKNOWN: [u8; 16] = [0xFF; 16];

/// The hasher of maps keyed by values that are hashes already
/// ([`record_hash`], the published state's slots, the delivery driver's key
/// hashes): a `u64` written gets one finalising mix (MurmurHash3's) instead
/// of SipHash. The mix is needed: the low bits of a multiply-based hash
/// depend only on a key's first bytes, and the maps pick the bucket by the
/// low bits, so without it the keys "100000" to "100999" shared one bucket
/// of 1,024 and each lookup walked them all. Each step of the mix is a
/// bijection, so distinct hashes stay distinct.
#[derive(Default)]
pub struct DigestHasher(u64);

impl Hasher for DigestHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }

    fn finish(&self) -> u64 {
        let mut h = self.0;
        h ^= h >> 33;
        h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^ (h >> 33)
    }
}

/// Over the delivered JSON text. BLAKE3 rather than SHA-256: as collision
/// resistant (a crafted document cannot pass for the one delivered before
/// and have its change suppressed) at a fraction of the cost without SHA
/// instructions. A hash stored by a version that used SHA-256 never matches,
/// so after an upgrade each record's next change is delivered once more
/// rather than suppressed: a redundant upsert, never a lost one.
fn doc_hash(data: &EventData) -> [u8; 16] {
    // A one-shot keyed hash costs a fraction of the incremental hasher's
    // set-up and finalisation on documents this small. Only upserts are
    // hashed; the key keeps the hash apart from any other BLAKE3 use.
    const KEY: &[u8; 32] = b"steward document hash: upsert\0\0\0";
    let mut out = [0u8; 16];
    out.copy_from_slice(&blake3::keyed_hash(KEY, data.as_str().as_bytes()).as_bytes()[..16]);
    out
}

fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

#[path = "record_status.rs"]
mod record_status;
pub use record_status::{
    diff_documents, Blocker, DocumentDiff, EntityRecords, FieldChange, Gate, HeldBack, RecordState,
    RecordStatus, RelatedRecord, TargetDecision, TargetStatus,
};

#[cfg(test)]
#[path = "govern_tests.rs"]
mod tests;
