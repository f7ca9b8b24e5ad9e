//! The governor: decides, per mapped change and target, what is delivered.
//!
//! ```text
//!  Mapped ──▶ track row ──▶ document (fields, references, children)
//!         ──▶ publish_when? ── no ──▶ gated / unpublished (on_unpublish)
//!         ──▶ rules, business keys ── fail ──▶ quarantined (released when fixed)
//!         ──▶ per target: route? ──▶ field policy ──▶ same as last appended? ──▶ suppressed
//!                                                                        └──▶ delivered
//! ```
//!
//! No I/O: state (tracked rows, published hashes, business-key index,
//! quarantine) is held in memory, loaded from redb at start-up, and every
//! change to it is queued as a [`GovDelta`] that the daemon writes in the
//! same redb transaction as the outbox appends it belongs with. Every
//! decision is also queued as an audit record.
//!
//! Within one source transaction, changes to one business object (a parent
//! and its child rows) and re-emissions (records whose referenced record
//! changed) are evaluated once, after the transaction's last change.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hash, Hasher};
use std::sync::Arc;

use serde_json::{Map, Value};

use super::assemble;
use super::cel::CelInput;
use super::map::Mapped;
use super::redact;
use super::reference::{self, Rows};
use crate::config::governance::{Check, EntityGovernance, OnUnpublish, TargetPolicy};
use crate::config::{Config, EntityConfig};
use crate::model::{ChangeOp, Event, EventData, EventOp, Lsn, SourceChange};
use crate::store::governance::{AuditRecord, GovDelta, GovOp, GovSnapshot, QuarantineEntry};
use crate::store::published::published_digest;

/// Index offset of events the governor makes itself (re-emissions, business
/// objects): their ids never collide with those of source changes.
const SYNTHETIC_INDEX: u32 = 0x8000_0000;

pub struct Governor {
    entities: Vec<EntityConfig>,
    gov: Vec<EntityGovernance>,
    policies: Vec<TargetPolicy>,
    target_names: Vec<String>,
    entity_targets: Vec<Vec<usize>>,
    entity_index: HashMap<String, usize>,
    tracked: Vec<bool>,
    /// entity → (referencing entity, its many2one column).
    referenced_by: Vec<Vec<(usize, String)>>,
    rows: Rows,
    /// (child entity, parent key) → child keys.
    children: HashMap<(usize, String), BTreeSet<String>>,
    /// Hash of the document last appended per (target, entity, key), both
    /// shortened (see [`PublishedSlot`]).
    published: HashMap<PublishedSlot, [u8; 8], BuildHasherDefault<DigestHasher>>,
    /// (entity, unique field index, normalised value) → holder key.
    unique: HashMap<(usize, usize, String), String>,
    claims: HashMap<(usize, String), Vec<(usize, String)>>,
    quarantine: HashMap<(usize, String), QuarantineEntry>,
    /// (Odoo model, record id) → `ir_model_data` id → external id `module.name`.
    /// A record may have several; the oldest (lowest id) is delivered.
    external_ids: HashMap<(String, String), BTreeMap<i64, String>>,
    delta: GovDelta,
}

/// Where an evaluation's events come from.
struct Origin {
    id: String,
    version: u64,
    time: String,
    change: Option<SourceChange>,
    tx_id: Option<u32>,
}

/// What a quarantine release did.
#[derive(Debug)]
pub struct Released {
    pub events: Vec<(usize, Event)>,
    /// `None` when released; the failure message when still failing.
    pub still_failing: Option<String>,
}

impl Governor {
    pub fn new(config: &Config) -> Governor {
        let entities = config.entities.clone();
        let mut gov = config.governance.entities.clone();
        gov.resize(entities.len(), EntityGovernance::default());
        let mut policies = config.governance.targets.clone();
        policies.resize(config.targets.len(), TargetPolicy::default());
        let entity_index: HashMap<String, usize> = entities
            .iter()
            .enumerate()
            .map(|(i, e)| (e.name.clone(), i))
            .collect();
        let entity_targets: Vec<Vec<usize>> = entities
            .iter()
            .map(|e| {
                config
                    .targets
                    .iter()
                    .enumerate()
                    .filter(|(_, t)| t.entities.iter().any(|n| n == &e.name))
                    .map(|(i, _)| i)
                    .collect()
            })
            .collect();
        let mut referenced_by = vec![Vec::new(); entities.len()];
        for (i, g) in gov.iter().enumerate() {
            for r in &g.refs {
                if let Some(&t) = entity_index.get(&r.entity) {
                    referenced_by[t].push((i, r.column.clone()));
                }
            }
            for rule in &g.rules {
                for c in &rule.checks {
                    if let Check::Reference { field, entity } = c {
                        if let Some(&t) = entity_index.get(entity) {
                            referenced_by[t].push((i, field.clone()));
                        }
                    }
                }
            }
        }
        for list in &mut referenced_by {
            list.sort();
            list.dedup();
        }
        let tracked = (0..entities.len())
            .map(|i| {
                gov[i].is_governed()
                    || !referenced_by[i].is_empty()
                    || entity_targets[i]
                        .iter()
                        .any(|&t| policies[t].route.is_some())
            })
            .collect();
        Governor {
            entities,
            gov,
            policies,
            target_names: config.targets.iter().map(|t| t.name.clone()).collect(),
            entity_targets,
            entity_index,
            tracked,
            referenced_by,
            rows: HashMap::new(),
            children: HashMap::new(),
            published: HashMap::default(),
            unique: HashMap::new(),
            claims: HashMap::new(),
            quarantine: HashMap::new(),
            external_ids: HashMap::new(),
            delta: GovDelta::default(),
        }
    }

    /// Entities whose whole rows the mapping stage must capture.
    pub fn tracked_entities(&self) -> impl Iterator<Item = usize> + '_ {
        self.tracked
            .iter()
            .enumerate()
            .filter(|(_, t)| **t)
            .map(|(i, _)| i)
    }

    /// Entities referenced by others (their tables are read at start-up when nothing is tracked yet).
    pub fn referenced_entities(&self) -> Vec<usize> {
        (0..self.entities.len())
            .filter(|&i| {
                !self.referenced_by[i].is_empty() || !self.gov[i].external_ids_of.is_empty()
            })
            .collect()
    }

    /// The SQL condition restricting the start-up read of `entity`'s table,
    /// if only part of it is needed (the external ids of referenced models).
    pub fn seed_filter(&self, entity: usize) -> Option<String> {
        let models = &self.gov[entity].external_ids_of;
        // Model names were checked to be [A-Za-z0-9._] when the config loaded.
        (!models.is_empty()).then(|| {
            let list: Vec<String> = models.iter().map(|m| format!("'{m}'")).collect();
            format!("model IN ({})", list.join(", "))
        })
    }

    pub fn tracked_count(&self, entity: usize) -> usize {
        self.rows.keys().filter(|(e, _)| *e == entity).count()
    }

    pub fn entity_config(&self, entity: usize) -> &EntityConfig {
        &self.entities[entity]
    }

    pub fn entity_by_name(&self, name: &str) -> Option<usize> {
        self.entity_index.get(name).copied()
    }

    /// Restores the state written by earlier runs; names no longer configured are ignored.
    pub fn load(&mut self, snap: GovSnapshot) {
        for (entity, key, bytes) in snap.rows {
            let Some(&e) = self.entity_index.get(&entity) else {
                continue;
            };
            if let Ok(Value::Object(row)) = serde_json::from_slice(&bytes) {
                self.index_child(e, &key, None, Some(&row));
                self.index_external_id(e, &key, None, Some(&row));
                self.rows.insert((e, key), Arc::new(row));
            }
        }
        // Entries of targets or entities no longer configured stay: their
        // digests never match a configured (target, entity, key).
        self.published.extend(
            snap.published
                .into_iter()
                .map(|(digest, hash)| (PublishedKey(digest).slot(), short_hash(&hash))),
        );
        for (entity, field, value, holder) in snap.unique {
            let Some(&e) = self.entity_index.get(&entity) else {
                continue;
            };
            let Some(fi) = self.gov[e].unique.iter().position(|f| *f == field) else {
                continue;
            };
            self.claims
                .entry((e, holder.clone()))
                .or_default()
                .push((fi, value.clone()));
            self.unique.insert((e, fi, value), holder);
        }
        for q in snap.quarantine {
            if let Some(&e) = self.entity_index.get(&q.entity) {
                self.quarantine.insert((e, q.key.clone()), q);
            }
        }
    }

    /// Seeds tracked rows of `entity` read from its table (start-up, for references).
    pub fn seed(&mut self, entity: usize, rows: Vec<Map<String, Value>>) {
        for row in rows {
            let parts: Vec<String> = self.entities[entity]
                .key
                .iter()
                .map(|c| row.get(c).map(assemble::text).unwrap_or_default())
                .collect();
            let key = crate::model::event::join_key(parts.iter().map(String::as_str));
            self.set_row(entity, &key, Some(Arc::new(row)));
        }
    }

    /// The state changes and audit records queued since the last call.
    pub fn take_delta(&mut self) -> GovDelta {
        // Sized like the last one: transactions tend to look alike, and
        // growing by doubling copies and touches fresh pages each time.
        let capacity = self.delta.ops.len();
        GovDelta {
            ops: std::mem::replace(&mut self.delta.ops, Vec::with_capacity(capacity)),
        }
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

    pub fn quarantined(&self) -> Vec<&QuarantineEntry> {
        let mut list: Vec<&QuarantineEntry> = self.quarantine.values().collect();
        list.sort_by(|a, b| (&a.entity, &a.key).cmp(&(&b.entity, &b.key)));
        list
    }

    /// Governs the mapped changes of one source transaction; returns the
    /// events to append, each with its target index.
    pub fn process(
        &mut self,
        mut mapped: Vec<Mapped>,
        commit_lsn: Lsn,
        time: &str,
    ) -> Vec<(usize, Event)> {
        self.process_drain(&mut mapped, commit_lsn, time)
    }

    /// [`Governor::process`], leaving `mapped` empty with its capacity, for
    /// the caller to fill with the next transaction without growing a vector
    /// from nothing again.
    pub fn process_drain(
        &mut self,
        mapped: &mut Vec<Mapped>,
        commit_lsn: Lsn,
        time: &str,
    ) -> Vec<(usize, Event)> {
        let mut out = Vec::with_capacity(mapped.len());
        self.process_drain_into(mapped, commit_lsn, time, &mut out);
        out
    }

    /// [`Governor::process_drain`], appending to `out`: the daemon's commit
    /// batch, so that a transaction's events are not copied into it.
    pub fn process_drain_into(
        &mut self,
        mapped: &mut Vec<Mapped>,
        commit_lsn: Lsn,
        time: &str,
        out: &mut Vec<(usize, Event)>,
    ) {
        out.reserve(mapped.len());
        let mut deferred: Vec<(usize, String)> = Vec::new();
        for m in mapped.drain(..) {
            let e = m.entity;
            let key = m.event.key.clone();
            let delete = m.op == ChangeOp::Delete;
            if !self.gov[e].external_ids_of.is_empty() {
                let prev = self.rows.get(&(e, key.clone())).cloned();
                let models = &self.gov[e].external_ids_of;
                let new = if delete { None } else { m.row.map(Arc::new) }.filter(|r| {
                    r.get("model")
                        .and_then(Value::as_str)
                        .is_some_and(|m| models.iter().any(|x| x == m))
                });
                if prev.is_none() && new.is_none() {
                    // Most of ir_model_data (views, menus, ...) is not referenced.
                    continue;
                }
                for (model, res_id) in [prev.as_deref(), new.as_deref()]
                    .into_iter()
                    .flatten()
                    .filter_map(external_id_target)
                {
                    for (r, column) in self.external_id_refs(&model) {
                        for k in reference::referencing(&self.rows, r, &column, &res_id) {
                            defer(&mut deferred, r, k);
                        }
                    }
                }
                self.set_row(e, &key, new);
                continue;
            }
            if let Some((parent, _)) = self.gov[e].child_of {
                let prev = self.rows.get(&(e, key.clone())).cloned();
                let new = if delete { None } else { m.row.map(Arc::new) };
                for p in self.index_child(e, &key, prev.as_deref(), new.as_deref()) {
                    defer(&mut deferred, parent, p);
                }
                self.set_row(e, &key, new);
                continue;
            }
            let tracked = self.tracked[e];
            let prev = if tracked {
                self.rows.get(&(e, key.clone())).cloned()
            } else {
                None
            };
            let row = if delete { None } else { m.row.map(Arc::new) };
            if tracked {
                self.set_row(e, &key, row.clone());
            }
            for (r, column) in self.referenced_by[e].clone() {
                for k in reference::referencing(&self.rows, r, &column, &key) {
                    defer(&mut deferred, r, k);
                }
            }
            if !self.gov[e].children.is_empty() && !delete {
                defer(&mut deferred, e, key);
                continue;
            }
            let old = m.old.map(Arc::new).or_else(|| prev.clone());
            let origin = Origin {
                id: m.event.id,
                version: m.event.version,
                time: m.event.time,
                change: m.event.change,
                tx_id: m.event.tx_id,
            };
            let op = match m.op {
                ChangeOp::Insert => "insert",
                ChangeOp::Update => "update",
                ChangeOp::Delete => "delete",
            };
            let fallback = m.data;
            self.evaluate(
                e,
                &key,
                op,
                row,
                old.as_deref(),
                prev.is_some(),
                fallback,
                &origin,
                out,
                &mut deferred,
            );
        }
        // Business objects, re-emissions and records waiting on a released key.
        let mut done: HashSet<(usize, String)> = HashSet::new();
        let mut n = 0u32;
        while let Some((e, key)) = (!deferred.is_empty()).then(|| deferred.remove(0)) {
            if !done.insert((e, key.clone())) {
                continue;
            }
            let Some(row) = self.rows.get(&(e, key.clone())).cloned() else {
                continue;
            };
            let origin = Origin {
                id: Event::source_id(commit_lsn, SYNTHETIC_INDEX + n),
                version: commit_lsn.0,
                time: time.to_string(),
                change: None,
                tx_id: None,
            };
            n += 1;
            self.evaluate(
                e,
                &key,
                "update",
                Some(row.clone()),
                Some(&row),
                true,
                Map::new(),
                &origin,
                out,
                &mut deferred,
            );
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
        let Some(row) = self.rows.get(&(e, key.to_string())).cloned() else {
            return Err(format!(
                "{entity} {key} is quarantined but its row is not known; it is released by its next change"
            ));
        };
        let origin = Origin {
            id: format!(
                "{:016X}-R{:x}",
                version.0,
                chrono::Utc::now().timestamp_micros()
            ),
            version: version.0,
            time: time.to_string(),
            change: None,
            tx_id: None,
        };
        let mut out = Vec::new();
        let mut deferred = Vec::new();
        self.evaluate(
            e,
            key,
            "update",
            Some(row.clone()),
            Some(&row),
            true,
            Map::new(),
            &origin,
            &mut out,
            &mut deferred,
        );
        let still_failing = self
            .quarantine
            .get(&(e, key.to_string()))
            .map(|q| q.message.clone());
        Ok(Released {
            events: out,
            still_failing,
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn evaluate(
        &mut self,
        e: usize,
        key: &str,
        op: &str,
        row: Option<Arc<Map<String, Value>>>,
        old: Option<&Map<String, Value>>,
        seen: bool,
        fallback: Map<String, Value>,
        origin: &Origin,
        out: &mut Vec<(usize, Event)>,
        deferred: &mut Vec<(usize, String)>,
    ) {
        let name = self.entities[e].name.clone();
        let version = origin.version;
        let event = |op: EventOp, data: EventData| Event {
            change: origin.change,
            tx_id: origin.tx_id,
            id: origin.id.clone(),
            entity: name.clone(),
            key: key.to_string(),
            op,
            version,
            time: origin.time.clone(),
            data,
        };
        if op == "delete" {
            self.set_claims(e, key, Vec::new(), deferred);
            self.release_from_quarantine(e, key, version, "the record was deleted");
            let data = EventData::from_map(&fallback);
            for t in self.entity_targets[e].clone() {
                let pkey = self.published_key(t, e, key);
                let was = self.published.remove(&pkey.slot());
                if was.is_some() || !seen {
                    self.queue_published(pkey, None);
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
            return;
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
        if publishable {
            if let Some((rule, message)) = self.validate(e, key, &doc, row.as_deref(), &input) {
                self.set_claims(e, key, Vec::new(), deferred);
                let entry = QuarantineEntry {
                    entity: name.clone(),
                    key: key.to_string(),
                    version,
                    rule: rule.clone(),
                    message: message.clone(),
                    document: Value::Object(doc),
                    since: now_rfc3339(),
                };
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
                return;
            }
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

        for t in self.entity_targets[e].clone() {
            let routed = match &self.policies[t].route {
                None => Ok(true),
                Some(r) => r
                    .test(&input)
                    .map_err(|m| format!("route could not be evaluated: {m}")),
            };
            let pkey = self.published_key(t, e, key);
            if publishable && routed == Ok(true) {
                let (data, notes) = redact::apply(&self.policies[t], &name, &doc);
                let data = EventData::from_map(&data);
                let hash = doc_hash(&data);
                if self.published.get(&pkey.slot()) == Some(&short_hash(&hash)) {
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
                self.published.insert(pkey.slot(), short_hash(&hash));
                self.queue_published(pkey, Some(hash));
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
            let was = self.published.contains_key(&pkey.slot());
            // A record first seen by an update may have been delivered before steward tracked it.
            let unknown = !seen && op == "update";
            if was || unknown {
                self.published.remove(&pkey.slot());
                self.queue_published(pkey, None);
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
                out.push((t, ev));
                self.audit(e, key, version, Some(t), "unpublished", reason);
            } else {
                let decision = if publishable { "not_routed" } else { "gated" };
                self.audit(e, key, version, Some(t), decision, reason);
            }
        }
    }

    /// The document of a tracked record: mapped fields, references, children.
    fn document(&self, e: usize, key: &str, row: &Map<String, Value>) -> Map<String, Value> {
        let mut doc = assemble::document(&self.entities[e].fields, row);
        for r in &self.gov[e].refs {
            let value = match self.entity_index.get(&r.entity) {
                Some(_) if r.external_id => self.external_id(&r.model, row.get(&r.column)),
                Some(&t) => reference::resolve(r, t, &self.entities[t], row, &self.rows),
                None => Value::Null,
            };
            doc.insert(r.name.clone(), value);
        }
        for c in &self.gov[e].children {
            let mut items: Vec<(String, Value)> = Vec::new();
            if let Some(keys) = self.children.get(&(c.entity, key.to_string())) {
                for k in keys {
                    if let Some(child) = self.rows.get(&(c.entity, k.clone())) {
                        let mut d = assemble::document(&c.fields, child);
                        d.insert("id".into(), child.get("id").cloned().unwrap_or(Value::Null));
                        items.push((k.clone(), Value::Object(d)));
                    }
                }
            }
            // Numeric ids in numeric order, so the document does not depend on hashing.
            items.sort_by(|a, b| match (a.0.parse::<i64>(), b.0.parse::<i64>()) {
                (Ok(x), Ok(y)) => x.cmp(&y),
                _ => a.0.cmp(&b.0),
            });
            doc.insert(
                c.name.clone(),
                Value::Array(items.into_iter().map(|(_, v)| v).collect()),
            );
        }
        doc
    }

    /// The first failing rule (or business key), with a message for the operator.
    fn validate(
        &self,
        e: usize,
        key: &str,
        doc: &Map<String, Value>,
        row: Option<&Map<String, Value>>,
        input: &CelInput<'_>,
    ) -> Option<(String, String)> {
        for rule in &self.gov[e].rules {
            for check in &rule.checks {
                if let Err(detail) = self.check(check, doc, row, input) {
                    let message = match &rule.message {
                        Some(m) => format!("{m} ({detail})"),
                        None => format!("rule '{}' failed: {detail}", rule.name),
                    };
                    return Some((rule.name.clone(), message));
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
            if let Some(holder) = self.unique.get(&(e, fi, norm)) {
                if holder != key {
                    return Some((
                        format!("unique:{field}"),
                        format!(
                            "{field} '{raw}' is already used by {} {holder}; change one of the two records",
                            self.entities[e].name
                        ),
                    ));
                }
            }
        }
        None
    }

    fn check(
        &self,
        check: &Check,
        doc: &Map<String, Value>,
        row: Option<&Map<String, Value>>,
        input: &CelInput<'_>,
    ) -> Result<(), String> {
        let get = |f: &str| assemble::lookup(f, doc, row);
        match check {
            Check::Required(fields) => {
                let missing: Vec<&str> = fields
                    .iter()
                    .filter(|f| {
                        get(f).map_or(true, |v| v.as_str().is_some_and(|s| s.trim().is_empty()))
                    })
                    .map(String::as_str)
                    .collect();
                if missing.is_empty() {
                    Ok(())
                } else {
                    Err(format!("missing {}", missing.join(", ")))
                }
            }
            Check::Regex { field, regex } => match get(field) {
                Some(v) if regex.is_match(&assemble::text(v)) => Ok(()),
                Some(v) => Err(format!(
                    "{field} '{}' does not match /{}/",
                    assemble::text(v),
                    regex.as_str()
                )),
                None => Err(format!("{field} is missing")),
            },
            Check::Allowed { field, values } => match get(field) {
                Some(v)
                    if values
                        .iter()
                        .any(|a| a == v || assemble::text(a) == assemble::text(v)) =>
                {
                    Ok(())
                }
                Some(v) => Err(format!(
                    "{field} '{}' is not one of {}",
                    assemble::text(v),
                    values
                        .iter()
                        .map(assemble::text)
                        .collect::<Vec<_>>()
                        .join(", ")
                )),
                None => Err(format!("{field} is missing")),
            },
            Check::Range { field, min, max } => {
                let Some(v) = get(field) else {
                    return Err(format!("{field} is missing"));
                };
                let Ok(n) = assemble::text(v).parse::<f64>() else {
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
            }
            Check::Cel(expr) => match expr.test(input) {
                Ok(true) => Ok(()),
                Ok(false) => Err(format!("`{}` is false", expr.source)),
                Err(m) => Err(m),
            },
            Check::Reference { field, entity } => {
                let Some(id) = get(field) else {
                    return Ok(());
                };
                let id = assemble::text(id);
                let Some(&t) = self.entity_index.get(entity) else {
                    return Err(format!("entity {entity} is not configured"));
                };
                let Some(referenced) = self.rows.get(&(t, id.clone())) else {
                    return Err(format!("{field} = {id}: {entity} {id} is not known"));
                };
                if let Some(expr) = &self.gov[t].publish_when {
                    let ok = expr.test(&CelInput {
                        row: Some(referenced),
                        old: None,
                        op: "update",
                    });
                    if ok != Ok(true) {
                        return Err(format!("{field} = {id}: {entity} {id} is not publishable"));
                    }
                }
                Ok(())
            }
        }
    }

    fn claim_values(
        &self,
        e: usize,
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
        e: usize,
        key: &str,
        new: Vec<(usize, String)>,
        deferred: &mut Vec<(usize, String)>,
    ) {
        if self.gov[e].unique.is_empty() {
            return;
        }
        let old = self
            .claims
            .remove(&(e, key.to_string()))
            .unwrap_or_default();
        let mut freed = false;
        for (fi, value) in &old {
            if new.contains(&(*fi, value.clone())) {
                continue;
            }
            let k = (e, *fi, value.clone());
            if self.unique.get(&k).is_some_and(|h| h == key) {
                self.unique.remove(&k);
                self.queue_unique(e, *fi, value, None);
                freed = true;
            }
        }
        for (fi, value) in &new {
            let k = (e, *fi, value.clone());
            if let std::collections::hash_map::Entry::Vacant(slot) = self.unique.entry(k) {
                slot.insert(key.to_string());
                self.queue_unique(e, *fi, value, Some(key));
            }
        }
        if !new.is_empty() {
            self.claims.insert((e, key.to_string()), new);
        }
        if freed {
            let mut waiting: Vec<String> = self
                .quarantine
                .iter()
                .filter(|((qe, _), q)| *qe == e && q.rule.starts_with("unique:"))
                .map(|((_, k), _)| k.clone())
                .collect();
            waiting.sort();
            for k in waiting {
                defer(deferred, e, k);
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
    fn external_id_refs(&self, model: &str) -> Vec<(usize, String)> {
        let mut out = Vec::new();
        for (i, g) in self.gov.iter().enumerate() {
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
        e: usize,
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

    /// Takes a record out of quarantine, if it is there, with the reason in the audit trail.
    fn release_from_quarantine(&mut self, e: usize, key: &str, version: u64, reason: &str) {
        // Nothing is quarantined almost always: skip building the lookup key.
        if self.quarantine.is_empty() {
            return;
        }
        if self.quarantine.remove(&(e, key.to_string())).is_some() {
            self.queue_quarantine(e, key, None);
            self.audit(e, key, version, None, "released", reason.to_string());
        }
    }

    fn set_row(&mut self, e: usize, key: &str, row: Option<Arc<Map<String, Value>>>) {
        if !self.gov[e].external_ids_of.is_empty() {
            // Only the ir_model_data rows feed an index; other rows skip the lookup.
            let prev = self.rows.get(&(e, key.to_string())).cloned();
            self.index_external_id(e, key, prev.as_deref(), row.as_deref());
        }
        let bytes = row.as_ref().and_then(|r| serde_json::to_vec(&**r).ok());
        match row {
            Some(r) => {
                self.rows.insert((e, key.to_string()), r);
            }
            None => {
                self.rows.remove(&(e, key.to_string()));
            }
        }
        self.delta.ops.push(GovOp::Row {
            entity: self.entities[e].name.clone(),
            key: key.to_string(),
            row: bytes,
        });
    }

    /// Updates the parent → children index for a child row; returns the parents touched.
    fn index_child(
        &mut self,
        e: usize,
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

    fn queue_published(&mut self, key: PublishedKey, hash: Option<[u8; 16]>) {
        self.delta.ops.push(GovOp::Published {
            digest: key.0,
            hash,
        });
    }

    fn published_key(&self, t: usize, e: usize, key: &str) -> PublishedKey {
        PublishedKey(published_digest(
            &self.target_names[t],
            &self.entities[e].name,
            key,
        ))
    }

    fn queue_unique(&mut self, e: usize, fi: usize, value: &str, holder: Option<&str>) {
        self.delta.ops.push(GovOp::Unique {
            entity: self.entities[e].name.clone(),
            field: self.gov[e].unique[fi].clone(),
            value: value.to_string(),
            holder: holder.map(str::to_string),
        });
    }

    fn queue_quarantine(&mut self, e: usize, key: &str, entry: Option<QuarantineEntry>) {
        self.delta.ops.push(GovOp::Quarantine {
            entity: self.entities[e].name.clone(),
            key: key.to_string(),
            entry: entry.map(Box::new),
        });
    }

    fn audit(
        &mut self,
        e: usize,
        key: &str,
        version: u64,
        target: Option<usize>,
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
        }));
    }
}

/// (model, record id) an `ir_model_data` row names.
fn external_id_target(row: &Map<String, Value>) -> Option<(String, String)> {
    let model = row.get("model")?.as_str()?;
    let res_id = row.get("res_id").filter(|v| !v.is_null())?;
    Some((model.to_string(), assemble::text(res_id)))
}

fn defer(list: &mut Vec<(usize, String)>, e: usize, key: String) {
    if !list.iter().any(|(x, k)| *x == e && *k == key) {
        list.push((e, key));
    }
}

/// A (target, entity, key) as the 128-bit digest the store keeps.
#[derive(Clone, Copy, PartialEq, Eq)]
struct PublishedKey([u8; 16]);

impl PublishedKey {
    fn slot(&self) -> PublishedSlot {
        let mut slot = [0u8; 12];
        slot.copy_from_slice(&self.0[..12]);
        PublishedSlot(slot)
    }
}

/// The key of [`Governor::published`]: the first 96 bits of the digest.
/// The map holds an entry per record and target for the life of the daemon
/// and is most of the governor's memory; 12-byte keys and 8-byte document
/// hashes (20 bytes an entry instead of 32) keep it 40% smaller. Two records
/// share a slot with odds of about 1 in 10^17 for a million records; a changed
/// document is taken for the one before with odds of 1 in 2^64 per change.
/// The store keeps the full 16-byte digests and hashes.
#[derive(Clone, Copy, PartialEq, Eq)]
struct PublishedSlot([u8; 12]);

fn short_hash(hash: &[u8; 16]) -> [u8; 8] {
    let mut short = [0u8; 8];
    short.copy_from_slice(&hash[..8]);
    short
}

impl Hash for PublishedSlot {
    fn hash<H: Hasher>(&self, state: &mut H) {
        let mut first = [0u8; 8];
        first.copy_from_slice(&self.0[..8]);
        state.write_u64(u64::from_le_bytes(first));
    }
}

/// A [`PublishedSlot`] is already a uniform digest: hashing it again would
/// only cost time.
#[derive(Default)]
struct DigestHasher(u64);

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
        self.0
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
