//! What the governance knows about one record ([`Governance::record_status`]),
//! how many records of each entity are in each state
//! ([`Governance::record_counts`]), and what the open exceptions hold back
//! ([`Governance::held_back`]): pure queries over the in-memory state, for
//! the metrics, the control API and the console.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{
    doc_hash, record_hash, redact, short_hash, CelInput, Check, EntityIndex, EventData, Governance,
    QuarantineEntry, Sent, ENCODING_RULE,
};

/// Where a record of a counted entity stands now; every record is in
/// exactly one state. Counted entities are those whose rows steward tracks
/// (an entity with a gate, rules, business keys, references or children,
/// one another entity's references or reference rules point at, or one a
/// target routes), except the child tables and external ids steward adds
/// itself: their rows count as part of their parent.
///
/// The state is the record's, not a target's: a target that a route does
/// not give the record does not make it less published (the record view
/// shows each target's decision).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecordState {
    /// Nothing holds it back: it passes its gate, rules and business keys,
    /// and goes to every target whose route takes it.
    Published,
    /// Its gate (`publish_when`) is false: it waits for approval. A record
    /// delivered before and gated since was unpublished (see `on_unpublish`).
    PendingApproval,
    /// In quarantine for a rule, a business key or a value steward cannot
    /// encode (its own or one of its child rows').
    Quarantined,
    /// In quarantine only because a reference rule waits for another
    /// record (the entry's `blocked_by`) that is not publishable: it is
    /// released when that record is published.
    Blocked,
}

impl RecordState {
    /// Every state, in the order dashboards list them.
    pub const ALL: [RecordState; 4] = [
        RecordState::Published,
        RecordState::PendingApproval,
        RecordState::Quarantined,
        RecordState::Blocked,
    ];

    /// The name used in metrics labels and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            RecordState::Published => "published",
            RecordState::PendingApproval => "pending_approval",
            RecordState::Quarantined => "quarantined",
            RecordState::Blocked => "blocked",
        }
    }

    /// Index into the per-entity counts of held (not published) records.
    pub(super) fn held_index(self) -> Option<usize> {
        match self {
            RecordState::Published => None,
            RecordState::PendingApproval => Some(0),
            RecordState::Quarantined => Some(1),
            RecordState::Blocked => Some(2),
        }
    }

    /// The state of a record held by `entry`. A business object held for
    /// an unencodable value of one of its own child rows is quarantined,
    /// not blocked: the fix is in its own data.
    pub(super) fn of_entry(entry: &QuarantineEntry) -> RecordState {
        if entry.blocked_by.is_some() && entry.rule != ENCODING_RULE {
            RecordState::Blocked
        } else {
            RecordState::Quarantined
        }
    }
}

impl fmt::Display for RecordState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The records of one entity in each [`RecordState`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntityRecords {
    /// The entity's name.
    pub entity: String,
    /// Records nothing holds back.
    pub published: u64,
    /// Records whose gate is false.
    pub pending_approval: u64,
    /// Records in quarantine for their own data.
    pub quarantined: u64,
    /// Records in quarantine waiting for another record.
    pub blocked: u64,
}

impl EntityRecords {
    /// The number of records in `state`.
    pub fn count(&self, state: RecordState) -> u64 {
        match state {
            RecordState::Published => self.published,
            RecordState::PendingApproval => self.pending_approval,
            RecordState::Quarantined => self.quarantined,
            RecordState::Blocked => self.blocked,
        }
    }
}

/// Everything the governance knows about one record.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RecordStatus {
    /// The entity's name.
    pub entity: String,
    /// The record's key.
    pub key: String,
    /// `None` when steward holds no row of it: deleted, never seen, or of
    /// an entity whose rows steward does not track (then only `targets`
    /// and `quarantine` say anything).
    pub state: Option<RecordState>,
    /// The record's source row as steward last read it (all columns,
    /// before mapping and any target's redaction).
    pub row: Option<Value>,
    /// The entity's gate on that row, when it has one.
    pub gate: Option<Gate>,
    /// Its quarantine entry (rule, message, since, the withheld document,
    /// `blocked_by`), when it is held.
    pub quarantine: Option<QuarantineEntry>,
    /// Per target taking the entity: the last decision and the document it
    /// would get now.
    pub targets: Vec<TargetStatus>,
    /// The records it waits for: those its reference rules point at that
    /// are not publishable (rules are checked once the gate passes, so a
    /// record pending approval lists none).
    pub blocked_by: Vec<Blocker>,
    /// The records in quarantine waiting for this one (their `blocked_by`).
    pub blocks: Vec<RelatedRecord>,
    /// Records whose documents or rules use this one (references,
    /// reference rules, business-object lines), at most
    /// [`Governance::DEPENDENTS_SHOWN`] of them.
    pub dependents: Vec<RelatedRecord>,
    /// How many dependents there are in all.
    pub dependents_total: usize,
}

/// A gate (`publish_when`) evaluated on a record's row.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gate {
    /// The expression, as configured.
    pub expression: String,
    /// Whether it is true.
    pub passes: bool,
    /// Why it could not be evaluated (then it does not pass).
    pub error: Option<String>,
}

/// What steward last decided for one record and one target.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TargetStatus {
    /// The target's name.
    pub target: String,
    /// The last decision.
    pub decision: TargetDecision,
    /// For a delivered record: whether the document last appended for the
    /// target equals the one it would get now (`false`: the target has an
    /// earlier version, e.g. the current one is in quarantine).
    pub up_to_date: Option<bool>,
    /// The document the target would get now, after its field policy;
    /// `None` when steward holds no row of the record.
    pub document: Option<Value>,
    /// For a quarantined record: how the withheld document differs from
    /// the one the target last got, both after the target's field policy.
    pub diff: Option<DocumentDiff>,
    /// For a quarantined record without a diff: why there is none.
    pub diff_note: Option<String>,
}

/// How a withheld document differs from the last one a target got, field
/// by field (top-level fields; a children array is one field). Fields the
/// target's policy masks or hashes are left out, so a diff never shows
/// more of them than the target's own documents do.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DocumentDiff {
    /// Fields only the withheld document has, with their values.
    pub added: BTreeMap<String, Value>,
    /// Fields only the delivered document has, with their values.
    pub removed: BTreeMap<String, Value>,
    /// Fields both have with different values.
    pub changed: BTreeMap<String, FieldChange>,
    /// Fields left out because the target's policy masks or hashes them.
    pub hidden: Vec<String>,
}

impl DocumentDiff {
    /// Whether the documents are the same (but for hidden fields).
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.changed.is_empty()
    }
}

/// One field's value in the delivered and in the withheld document.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FieldChange {
    /// As the target last got it.
    pub delivered: Value,
    /// As withheld.
    pub withheld: Value,
}

/// The field diff of two documents, leaving out the top-level fields in
/// `hidden` (a child path `child.field` hides the whole `child` array).
pub fn diff_documents(
    delivered: &serde_json::Map<String, Value>,
    withheld: &serde_json::Map<String, Value>,
    hidden: &[String],
) -> DocumentDiff {
    let top: BTreeSet<&str> = hidden
        .iter()
        .map(|f| f.split_once('.').map_or(f.as_str(), |(child, _)| child))
        .collect();
    let mut diff = DocumentDiff {
        hidden: top.iter().map(|f| (*f).to_string()).collect(),
        ..DocumentDiff::default()
    };
    for (field, value) in withheld {
        if top.contains(field.as_str()) {
            continue;
        }
        match delivered.get(field) {
            None => {
                diff.added.insert(field.clone(), value.clone());
            }
            Some(before) if before != value => {
                diff.changed.insert(
                    field.clone(),
                    FieldChange {
                        delivered: before.clone(),
                        withheld: value.clone(),
                    },
                );
            }
            Some(_) => {}
        }
    }
    for (field, value) in delivered {
        if !top.contains(field.as_str()) && !withheld.contains_key(field) {
            diff.removed.insert(field.clone(), value.clone());
        }
    }
    diff
}

/// The last decision for one record and target, as the governance state
/// keeps it (the audit trail has every decision, with its reason).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TargetDecision {
    /// A document was appended to the target's outbox (whether the target
    /// acknowledged it is the outbox's and dead-letter queue's business).
    Delivered,
    /// Withheld by the gate; if it was delivered before, the target got
    /// the `on_unpublish` event.
    Gated,
    /// Withheld because the record is in quarantine.
    Quarantined,
    /// Withheld because the target's route does not take it.
    NotRouted,
    /// Withheld at the last decision for a reason that no longer holds:
    /// the record goes out with its next evaluation.
    Withheld,
    /// No decision yet: the target learns the record from its snapshot or
    /// from the record's next change.
    Undecided,
}

/// A record another waits for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Blocker {
    /// The entity's name.
    pub entity: String,
    /// The record's key.
    pub key: String,
    /// The rule that waits for it.
    pub rule: String,
    /// Why it is not publishable.
    pub reason: String,
    /// Its state; `None` when steward holds no row of it.
    pub state: Option<RecordState>,
}

/// A record linked to the one shown.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelatedRecord {
    /// The entity's name.
    pub entity: String,
    /// The record's key.
    pub key: String,
    /// Its state; `None` when steward holds no row of it.
    pub state: Option<RecordState>,
    /// What links them: the rule that waits (a blocked record), or the
    /// column holding the shown record's id (a dependent; `child.column`
    /// for a business object's lines).
    pub via: String,
}

/// What open exceptions hold back: records of `entity` blocked by records
/// of `blocker_entity` in `blocker_state`, e.g. "3 bom records blocked by
/// 1 quarantined product" (its `Display`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldBack {
    /// The blocked records' entity.
    pub entity: String,
    /// How many of its records are blocked.
    pub records: u64,
    /// The entity of the records they wait for.
    pub blocker_entity: String,
    /// How many distinct records they wait for.
    pub blockers: u64,
    /// The state of those; `None` when steward holds no row of them
    /// (missing, deleted, or not read yet).
    pub blocker_state: Option<RecordState>,
}

impl fmt::Display for HeldBack {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let noun = |n: u64, entity: &str| {
            if n == 1 {
                entity.to_string()
            } else {
                format!("{entity} records")
            }
        };
        let records = if self.records == 1 {
            "record"
        } else {
            "records"
        };
        write!(f, "{} {} {records} blocked by ", self.records, self.entity)?;
        let blockers = noun(self.blockers, &self.blocker_entity);
        match self.blocker_state {
            Some(RecordState::PendingApproval) => {
                write!(f, "{} {blockers} pending approval", self.blockers)
            }
            Some(state) => write!(f, "{} {} {blockers}", self.blockers, state.as_str()),
            None => write!(f, "{} missing {blockers}", self.blockers),
        }
    }
}

impl Governance {
    /// At most this many dependents are listed in a [`RecordStatus`].
    pub const DEPENDENTS_SHOWN: usize = 100;

    /// The state of a record of a counted entity; `None` when steward
    /// holds no row of it or does not count its entity.
    fn record_state(&self, entity: EntityIndex, key: &str) -> Option<RecordState> {
        if !self.counted.get(entity.0).copied().unwrap_or(false)
            || self.tracked_row(entity, key).is_none()
        {
            return None;
        }
        Some(
            self.held
                .get(&record_hash(entity, key))
                .copied()
                .unwrap_or(RecordState::Published),
        )
    }

    /// Everything the governance knows about record `key` of `entity`:
    /// its state, quarantine entry, gate, per-target decisions and
    /// documents, the records it waits for, blocks and is used by.
    pub fn record_status(&self, entity: &str, key: &str) -> Result<RecordStatus, String> {
        let Some(&e) = self.entity_index.get(entity) else {
            return Err(format!("entity `{entity}` is not configured"));
        };
        if self.is_hidden(e) {
            return Err(format!(
                "entity `{entity}` is part of other records (business-object lines or external ids); ask for the record it belongs to"
            ));
        }
        let tracked = self.tracked_row(e, key);
        let row = tracked.as_deref();
        let state = self.record_state(e, key);
        let input = CelInput {
            row,
            old: None,
            op: "update",
        };
        let gate = match (&self.gov[e].publish_when, row) {
            (Some(expr), Some(_)) => Some(match expr.test(&input) {
                Ok(passes) => Gate {
                    expression: expr.source.clone(),
                    passes,
                    error: None,
                },
                Err(m) => Gate {
                    expression: expr.source.clone(),
                    passes: false,
                    error: Some(m),
                },
            }),
            _ => None,
        };
        let quarantine = self.quarantine.get(&(e, key.to_string())).cloned();
        let doc = row
            .filter(|_| self.tracked[e])
            .map(|r| self.document(e, key, r));
        let mut targets = Vec::new();
        for &t in &self.entity_targets[e] {
            let sent = self.sent(t, e, key);
            let document = doc
                .as_ref()
                .map(|d| redact::apply(&self.policies[t], entity, d).0.into_owned());
            let delivered = match sent {
                Sent::Hash(h) => Some(h),
                Sent::Nothing | Sent::Withheld => None,
            };
            let up_to_date = match (delivered, &document) {
                (Some(hash), Some(d)) => {
                    Some(short_hash(&doc_hash(&EventData::from_map(d))) == hash)
                }
                _ => None,
            };
            let decision = if delivered.is_some() {
                TargetDecision::Delivered
            } else if sent == Sent::Withheld {
                match state {
                    Some(RecordState::Quarantined | RecordState::Blocked) => {
                        TargetDecision::Quarantined
                    }
                    Some(RecordState::PendingApproval) => TargetDecision::Gated,
                    Some(RecordState::Published) => match &self.policies[t].route {
                        Some(route) if route.test(&input) != Ok(true) => TargetDecision::NotRouted,
                        _ => TargetDecision::Withheld,
                    },
                    None if quarantine.is_some() => TargetDecision::Quarantined,
                    None => TargetDecision::Withheld,
                }
            } else {
                TargetDecision::Undecided
            };
            let (diff, diff_note) = match &quarantine {
                Some(q) => match self.quarantine_diff(t, entity, q, delivered) {
                    Ok(diff) => (Some(diff), None),
                    Err(note) => (None, Some(note)),
                },
                None => (None, None),
            };
            targets.push(TargetStatus {
                target: self.target_names[t].clone(),
                decision,
                up_to_date,
                document: document.map(Value::Object),
                diff,
                diff_note,
            });
        }
        let blocked_by = self.blockers_of(e, key, row, state, quarantine.as_ref());
        let blocks = self.blocked_records(&format!("{entity} {key}"));
        let (dependents, dependents_total) = self.dependents_of(e, key);
        Ok(RecordStatus {
            entity: entity.to_string(),
            key: key.to_string(),
            state,
            row: row.map(|r| Value::Object(r.clone())),
            gate,
            quarantine,
            targets,
            blocked_by,
            blocks,
            dependents,
            dependents_total,
        })
    }

    /// The diff between a quarantined record's withheld document and the
    /// one target `t` last got (whose hash is `delivered`), or why there is
    /// none. steward keeps only that document's hash: the document the
    /// record had on entering quarantine stands for it when their hashes
    /// match after the target's policy.
    fn quarantine_diff(
        &self,
        t: super::TargetIndex,
        entity: &str,
        q: &QuarantineEntry,
        delivered: Option<[u8; 8]>,
    ) -> Result<DocumentDiff, String> {
        let Some(hash) = delivered else {
            return Err("the target has no document of this record".to_string());
        };
        let (Some(Value::Object(before)), Value::Object(withheld)) = (&q.delivered, &q.document)
        else {
            return Err(
                "the document last delivered is not known (steward keeps only its hash)"
                    .to_string(),
            );
        };
        let policy = &self.policies[t];
        let before = redact::apply(policy, entity, before).0;
        if short_hash(&doc_hash(&EventData::from_map(&before))) != hash {
            return Err(
                "the document last delivered is not known: the target got another \
                        version than the one the record had on entering quarantine (steward \
                        keeps only the hash of the last delivered document)"
                    .to_string(),
            );
        }
        let withheld = redact::apply(policy, entity, withheld).0;
        let hidden: Vec<String> = policy
            .mask
            .iter()
            .filter(|(e, _, _)| e == entity)
            .map(|(_, f, _)| f.clone())
            .chain(
                policy
                    .hash
                    .iter()
                    .filter(|(e, _)| e == entity)
                    .map(|(_, f)| f.clone()),
            )
            .collect();
        Ok(diff_documents(&before, &withheld, &hidden))
    }

    /// The records a record's reference rules wait for, and the record its
    /// quarantine entry names when that is not among them (a child row).
    fn blockers_of(
        &self,
        e: EntityIndex,
        key: &str,
        row: Option<&serde_json::Map<String, Value>>,
        state: Option<RecordState>,
        entry: Option<&QuarantineEntry>,
    ) -> Vec<Blocker> {
        let mut out: Vec<Blocker> = Vec::new();
        if row.is_some() && state != Some(RecordState::PendingApproval) {
            for rule in &self.gov[e].rules {
                for check in &rule.checks {
                    let Check::Reference { field, entity } = check else {
                        continue;
                    };
                    let Some(&t) = self.entity_index.get(entity) else {
                        continue;
                    };
                    for id in self.reference_ids(e, key, field, row) {
                        let Some(reason) = self.blocker(t, &id) else {
                            continue;
                        };
                        if out.iter().any(|b| &b.entity == entity && b.key == id) {
                            continue;
                        }
                        out.push(Blocker {
                            entity: entity.clone(),
                            state: self.record_state(t, &id),
                            key: id,
                            rule: rule.name.clone(),
                            reason,
                        });
                    }
                }
            }
        }
        if let Some(q) = entry {
            if let Some((entity, id)) = q.blocked_by.as_deref().and_then(|b| b.split_once(' ')) {
                if !out.iter().any(|b| b.entity == entity && b.key == id) {
                    out.push(Blocker {
                        entity: entity.to_string(),
                        key: id.to_string(),
                        rule: q.rule.clone(),
                        reason: q.message.clone(),
                        state: self
                            .entity_index
                            .get(entity)
                            .and_then(|&t| self.record_state(t, id)),
                    });
                }
            }
        }
        out
    }

    /// Quarantined records whose `blocked_by` is `blocker` (`entity key`),
    /// by entity and key.
    fn blocked_records(&self, blocker: &str) -> Vec<RelatedRecord> {
        let mut out: Vec<RelatedRecord> = self
            .quarantine
            .iter()
            .filter(|(_, q)| q.blocked_by.as_deref() == Some(blocker))
            .map(|((qe, k), q)| RelatedRecord {
                entity: q.entity.clone(),
                key: k.clone(),
                state: self.record_state(*qe, k),
                via: q.rule.clone(),
            })
            .collect();
        out.sort_by(|a, b| {
            a.entity
                .cmp(&b.entity)
                .then_with(|| super::key_order(&a.key, &b.key))
        });
        out
    }

    /// Records referencing (e, key) through a tracked column: the first
    /// [`Governance::DEPENDENTS_SHOWN`], and how many there are.
    fn dependents_of(&self, e: EntityIndex, key: &str) -> (Vec<RelatedRecord>, usize) {
        let mut out = Vec::new();
        let mut total = 0;
        let mut add = |out: &mut Vec<RelatedRecord>, r: EntityIndex, k: String, via: String| {
            total += 1;
            if out.len() < Self::DEPENDENTS_SHOWN {
                out.push(RelatedRecord {
                    entity: self.entities[r].name.clone(),
                    state: self.record_state(r, &k),
                    key: k,
                    via,
                });
            }
        };
        for (r, column) in &self.referenced_by[e] {
            for k in self.referencing(*r, column, key) {
                add(&mut out, *r, k, column.clone());
            }
        }
        for (c, column) in &self.child_referenced_by[e] {
            let Some((p, ci)) = self.gov[*c].child_of else {
                continue;
            };
            let via = format!("{}.{column}", self.gov[p].children[ci].name);
            for k in self.parents_with_child_value(*c, column, key) {
                add(&mut out, p, k, via.clone());
            }
        }
        (out, total)
    }

    /// The keys of `entity`'s records in `state`, in key order (numbers
    /// by value), at most `limit` of them, and how many there are in all.
    /// Costs one pass over the keys of the rows steward tracks, in the
    /// store (the consume loop answers it between transactions).
    pub fn records_in_state(
        &self,
        entity: &str,
        state: RecordState,
        limit: usize,
    ) -> Result<(Vec<String>, u64), String> {
        let Some(&e) = self.entity_index.get(entity) else {
            return Err(format!(
                "there is no entity `{entity}` in the configuration"
            ));
        };
        if !self.counted.get(e.0).copied().unwrap_or(false) {
            return Err(format!(
                "steward does not track the records of `{entity}` (no gate, rules, business keys \
                 or references use them)"
            ));
        }
        let mut keys: Vec<String> = self
            .view
            .row_keys(e, entity)
            .into_iter()
            .filter(|key| {
                let held = self.held.get(&record_hash(e, key)).copied();
                held.unwrap_or(RecordState::Published) == state
            })
            .collect();
        let total = keys.len() as u64;
        keys.sort_by(|a, b| match (a.parse::<u64>(), b.parse::<u64>()) {
            (Ok(x), Ok(y)) => x.cmp(&y),
            (Ok(_), Err(_)) => std::cmp::Ordering::Less,
            (Err(_), Ok(_)) => std::cmp::Ordering::Greater,
            (Err(_), Err(_)) => a.cmp(b),
        });
        keys.truncate(limit);
        Ok((keys, total))
    }

    /// What the open exceptions hold back: blocked records grouped by
    /// their entity and the entity and state of the records they wait
    /// for, e.g. "3 bom records blocked by 1 quarantined product". Costs
    /// one pass over the quarantine.
    pub fn held_back(&self) -> Vec<HeldBack> {
        type Group = (u64, BTreeSet<String>);
        let mut groups: BTreeMap<(String, String, Option<RecordState>), Group> = BTreeMap::new();
        for q in self.quarantine.values() {
            if RecordState::of_entry(q) != RecordState::Blocked {
                continue;
            }
            let Some((entity, id)) = q.blocked_by.as_deref().and_then(|b| b.split_once(' ')) else {
                continue;
            };
            let state = self
                .entity_index
                .get(entity)
                .and_then(|&t| self.record_state(t, id));
            let group = groups
                .entry((q.entity.clone(), entity.to_string(), state))
                .or_default();
            group.0 += 1;
            group.1.insert(id.to_string());
        }
        groups
            .into_iter()
            .map(
                |((entity, blocker_entity, blocker_state), (records, blockers))| HeldBack {
                    entity,
                    records,
                    blocker_entity,
                    blockers: blockers.len() as u64,
                    blocker_state,
                },
            )
            .collect()
    }
}
