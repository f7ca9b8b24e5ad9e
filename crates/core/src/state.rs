//! The durable governance state, as it crosses into the store: the changes
//! of one batch ([`GovDelta`]), what is read back at start
//! ([`GovSnapshot`]), quarantine entries and audit records.

use serde::{Deserialize, Serialize};

/// A quarantined record (see the store's quarantine table).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct QuarantineEntry {
    /// The entity's name.
    pub entity: String,
    /// The record's key, as in [`Event::key`](crate::model::Event::key).
    pub key: String,
    /// Commit LSN of the change that was held.
    pub version: u64,
    /// The failed rule's name (`encoding` for a value steward cannot encode).
    pub rule: String,
    /// Why the record is held, for the operator.
    pub message: String,
    /// The document as evaluated, before any target's field policy.
    pub(crate) document: serde_json::Value,
    /// RFC 3339 UTC, when it was (last) quarantined.
    pub since: String,
    /// `entity key` of the record a reference rule waits for, when that is
    /// why it is held: it is released when that record is published.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blocked_by: Option<String>,
    /// The document the record had when it entered quarantine, when it
    /// had been delivered to some target then (before any target's field
    /// policy): the record view compares the withheld document with it,
    /// for each target whose last delivered document hash it matches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) delivered: Option<serde_json::Value>,
}

/// One governance decision (see the store's audit log).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// Microseconds since the Unix epoch.
    pub time_micros: i64,
    /// The entity's name.
    pub entity: String,
    /// The record's key.
    pub key: String,
    /// Commit LSN of the change decided about.
    pub version: u64,
    /// `None` for decisions about the record as a whole (quarantined, released).
    pub target: Option<String>,
    /// delivered, gated, unpublished, quarantined, released, suppressed, redacted, not_routed.
    pub decision: String,
    /// Why, for the operator (the failed rule, the gate's expression, ...).
    pub detail: String,
    /// The person whose action this records (a release, a replay, a reset):
    /// the Unix user the control API saw; `None` for steward's own decisions.
    /// Records written before the field existed read as `None`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// What that person said about the action, if anything.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
    /// For a decision that appended an event (`delivered`, `unpublished`):
    /// its sequence number in the target's outbox, set by the store in the
    /// commit that appends it. Compared with the target's acknowledged
    /// cursor it tells whether, and when, the target acknowledged it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
}

/// State changes of one batch of source transactions, in order.
#[derive(Debug, Default)]
pub struct GovDelta {
    /// In the order they happened: the store applies them in this order.
    pub ops: Vec<GovOp>,
    /// Changes of what was last appended per target and record, each as
    /// [`push_published_change`] writes it (in order; a later change of a
    /// record replaces an earlier one). Bytes, not one op each, so the hot
    /// path allocates nothing per record and target.
    pub published: Vec<u8>,
    /// The governance's generation of these published changes (see
    /// [`StateReader`]); 0 when there are none. Deltas appended
    /// together keep the latest.
    pub generation: u64,
}

/// One change of the durable governance state.
#[derive(Debug)]
pub enum GovOp {
    /// A tracked row set or removed.
    Row {
        /// The entity's name.
        entity: String,
        /// The record's key.
        key: String,
        /// The row as a JSON object; `None`: no longer tracked.
        row: Option<Vec<u8>>,
    },
    /// A business-key value claimed or given up.
    Unique {
        /// The entity's name.
        entity: String,
        /// The business-key field.
        field: String,
        /// The value, normalised.
        value: String,
        /// The key of the record holding it; `None`: free again.
        holder: Option<String>,
    },
    /// A tracked record's column holding another record's id (a reference),
    /// indexed or no longer: the index finds the records to re-emit when
    /// the referenced one changes.
    Ref {
        /// The referencing entity's name.
        entity: String,
        /// Its column holding the id.
        column: String,
        /// The id, as text.
        id: String,
        /// The referencing record's key.
        key: String,
        /// `false`: the column no longer holds the id.
        present: bool,
    },
    /// A record quarantined, or released.
    Quarantine {
        /// The entity's name.
        entity: String,
        /// The record's key.
        key: String,
        /// `None`: released.
        entry: Option<Box<QuarantineEntry>>,
    },
    /// A decision for the audit log.
    Audit(AuditRecord),
}

impl GovDelta {
    /// Whether nothing changed.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty() && self.published.is_empty()
    }

    /// Adds `other`'s changes after this one's.
    pub fn append(&mut self, other: GovDelta) {
        if self.ops.is_empty() {
            // Take the other's vector rather than copying every op.
            self.ops = other.ops;
        } else {
            self.ops.extend(other.ops);
        }
        if self.published.is_empty() {
            self.published = other.published;
        } else {
            self.published.extend(other.published);
        }
        self.generation = self.generation.max(other.generation);
    }
}

/// Everything the store (`load_governance`) read back, held at once: for
/// tests and tools. The daemon restores its governance through
/// [`GovLoader`] instead.
#[derive(Debug, Default)]
pub struct GovSnapshot {
    /// Tracked rows: (entity, key, row as a JSON object).
    pub rows: Vec<(String, String, Vec<u8>)>,
    /// Claimed business-key values: (entity, field, normalised value, holder key).
    pub unique: Vec<(String, String, String, String)>,
    /// Records held in quarantine.
    pub quarantine: Vec<QuarantineEntry>,
}

/// Takes the governance state the store reads back at start, one piece at
/// a time, so that none of it is in memory twice while it loads (the
/// store's `load_governance_into`). The published state is not loaded: the
/// governance reads it from the store as it needs it ([`StateReader`]).
pub trait GovLoader {
    /// A tracked row: its entity, key and JSON object as bytes.
    fn row(&mut self, entity: &str, key: &str, row: &[u8]);
    /// A claimed business-key value: entity, field, normalised value, holder key.
    fn unique(&mut self, entity: &str, field: &str, value: &str, holder: &str);
    /// Whether to be handed the business-key values (a governance reads
    /// them from the store as it needs them).
    fn wants_unique(&self) -> bool {
        true
    }
    /// Whether to be handed the tracked rows of `entity` (a governance that
    /// restored its counts from a summary needs only those it indexes).
    fn wants_rows(&self, _entity: &str) -> bool {
        true
    }
    /// A record held in quarantine.
    fn quarantined(&mut self, entry: QuarantineEntry);
}

impl GovLoader for GovSnapshot {
    fn row(&mut self, entity: &str, key: &str, row: &[u8]) {
        self.rows.push((entity.into(), key.into(), row.to_vec()));
    }

    fn unique(&mut self, entity: &str, field: &str, value: &str, holder: &str) {
        self.unique
            .push((entity.into(), field.into(), value.into(), holder.into()));
    }

    fn quarantined(&mut self, entry: QuarantineEntry) {
        self.quarantine.push(entry);
    }
}

/// The key of one (target, entity, key) in the governance's memory: a
/// BLAKE3 digest over length-prefixed names, unambiguous and stable across
/// configuration changes (names, not positions in the configuration).
pub fn published_digest(target: &str, entity: &str, key: &str) -> [u8; 16] {
    // Assembled on the stack and hashed in one call: the incremental
    // hasher's set-up and finalisation cost more than the hashing here.
    let mut stack = [0u8; 256];
    let mut heap = Vec::new();
    let len = 24 + target.len() + entity.len() + key.len();
    let buf: &mut [u8] = if len <= stack.len() {
        &mut stack[..len]
    } else {
        heap.resize(len, 0);
        &mut heap
    };
    let mut at = 0;
    for part in [target, entity, key] {
        buf[at..at + 8].copy_from_slice(&(part.len() as u64).to_le_bytes());
        buf[at + 8..at + 8 + part.len()].copy_from_slice(part.as_bytes());
        at += 8 + part.len();
    }
    let mut out = [0u8; 16];
    out.copy_from_slice(&blake3::hash(buf).as_bytes()[..16]);
    out
}

/// The document hash the store keeps for a record withheld from a target
/// (gated, not routed, quarantined): a decision exists, nothing was sent.
pub const WITHHELD: [u8; 16] = [0u8; 16];

/// The governance state as the store holds it, read by the governance as it
/// needs it, so that none of what grows with the records is in memory: the
/// published state (what was last appended per target and record: a
/// document hash, [`WITHHELD`], or nothing) and the tracked rows. The
/// governance keeps its own changes in memory until the store shows them:
/// each delta's changes carry a generation ([`GovDelta::generation`], from
/// [`StateReader::next_generation`]), and once the store has committed a
/// generation, [`StateReader::refresh`] reports it and reading sees it.
pub trait StateReader: Send {
    /// The stored hash for (target, entity, key), as of the last refresh.
    /// A read error is kept (see [`StateReader::error`]) and reads as
    /// nothing stored.
    fn get(&self, target: &str, entity: &str, key: &str) -> Option<[u8; 16]>;
    /// The tracked row of (entity, key) as a JSON object's bytes, as of the
    /// last refresh. A read error is kept, as for [`StateReader::get`].
    fn row(&self, entity: &str, key: &str) -> Option<Vec<u8>>;
    /// The keys of every tracked row of `entity`, as of the last refresh.
    fn row_keys(&self, entity: &str) -> Vec<String>;
    /// The key of the record holding normalised business-key `value` of
    /// `field`, as of the last refresh.
    fn unique_holder(&self, entity: &str, field: &str, value: &str) -> Option<String>;
    /// The business-key values (field, normalised value) record `key`
    /// holds, as of the last refresh.
    fn claims(&self, entity: &str, key: &str) -> Vec<(String, String)>;
    /// The keys of the tracked records of `entity` whose `column` holds
    /// `id`, as of the last refresh.
    fn referencing(&self, entity: &str, column: &str, id: &str) -> Vec<String>;
    /// Reads from now on see every commit of a generation up to the one
    /// returned (and of none the governance still needs in memory).
    fn refresh(&mut self) -> u64;
    /// A new generation, greater than any handed out before for this store.
    fn next_generation(&mut self) -> u64;
    /// The first read error since the last call, if any: the decisions made
    /// since must not be committed.
    fn error(&mut self) -> Option<String>;
    /// Lets go of what a refresh holds (the store's read transaction) while idle.
    fn release(&mut self) {}
}

/// A [`StateReader`] over maps that never see later commits: the state of
/// tests and tools, and an empty one for a governance without a store.
#[derive(Debug, Default)]
pub struct MemoryState {
    /// Store key ([`published_store_key`]) → hash.
    pub map: std::collections::BTreeMap<Vec<u8>, [u8; 16]>,
    /// (entity, key) → tracked row as a JSON object's bytes.
    pub rows: std::collections::BTreeMap<(String, String), Vec<u8>>,
    /// (entity, field, normalised value) → holder key.
    pub unique: std::collections::BTreeMap<(String, String, String), String>,
    /// (entity, column, id, referencing key).
    pub refs: std::collections::BTreeSet<(String, String, String, String)>,
    generation: u64,
}

impl MemoryState {
    /// Applies the published changes and tracked rows of `delta`.
    pub fn apply(&mut self, delta: &GovDelta) {
        for (key, hash) in published_changes(&delta.published) {
            match hash {
                Some(hash) => self.map.insert(key.to_vec(), hash),
                None => self.map.remove(key),
            };
        }
        for op in &delta.ops {
            match op {
                GovOp::Row { entity, key, row } => {
                    let slot = (entity.clone(), key.clone());
                    match row {
                        Some(bytes) => self.rows.insert(slot, bytes.clone()),
                        None => self.rows.remove(&slot),
                    };
                }
                GovOp::Unique {
                    entity,
                    field,
                    value,
                    holder,
                } => {
                    let slot = (entity.clone(), field.clone(), value.clone());
                    match holder {
                        Some(h) => self.unique.insert(slot, h.clone()),
                        None => self.unique.remove(&slot),
                    };
                }
                GovOp::Ref {
                    entity,
                    column,
                    id,
                    key,
                    present,
                } => {
                    let entry = (entity.clone(), column.clone(), id.clone(), key.clone());
                    if *present {
                        self.refs.insert(entry);
                    } else {
                        self.refs.remove(&entry);
                    }
                }
                _ => {}
            }
        }
    }
}

impl StateReader for MemoryState {
    fn get(&self, target: &str, entity: &str, key: &str) -> Option<[u8; 16]> {
        let mut k = Vec::new();
        published_store_key(target, entity, key, &mut k);
        self.map.get(&k).copied()
    }

    fn row(&self, entity: &str, key: &str) -> Option<Vec<u8>> {
        self.rows
            .get(&(entity.to_string(), key.to_string()))
            .cloned()
    }

    fn row_keys(&self, entity: &str) -> Vec<String> {
        self.rows
            .keys()
            .filter(|(e, _)| e == entity)
            .map(|(_, k)| k.clone())
            .collect()
    }

    fn unique_holder(&self, entity: &str, field: &str, value: &str) -> Option<String> {
        let slot = (entity.to_string(), field.to_string(), value.to_string());
        self.unique.get(&slot).cloned()
    }

    fn claims(&self, entity: &str, key: &str) -> Vec<(String, String)> {
        self.unique
            .iter()
            .filter(|((e, _, _), holder)| e == entity && *holder == key)
            .map(|((_, field, value), _)| (field.clone(), value.clone()))
            .collect()
    }

    fn referencing(&self, entity: &str, column: &str, id: &str) -> Vec<String> {
        self.refs
            .iter()
            .filter(|(e, c, i, _)| e == entity && c == column && i == id)
            .map(|(_, _, _, key)| key.clone())
            .collect()
    }

    fn refresh(&mut self) -> u64 {
        0
    }

    fn next_generation(&mut self) -> u64 {
        self.generation += 1;
        self.generation
    }

    fn error(&mut self) -> Option<String> {
        None
    }
}

/// The store's key of one (target, entity, key): each name with a
/// big-endian 16-bit length, then the key, a canonical unsigned integer as
/// `1` and its 8 big-endian bytes (so numeric keys sort as numbers, and a
/// table read in key order meets them in order), any other key as `2` and
/// its bytes. Every (target, entity) is one contiguous range.
pub fn published_store_key(target: &str, entity: &str, key: &str, out: &mut Vec<u8>) {
    published_store_prefix(target, entity, out);
    published_store_suffix(key, out);
}

/// What follows [`published_store_prefix`] in [`published_store_key`].
pub fn published_store_suffix(key: &str, out: &mut Vec<u8>) {
    match canonical_integer(key) {
        Some(n) => {
            out.push(1);
            out.extend_from_slice(&n.to_be_bytes());
        }
        None => {
            out.push(2);
            out.extend_from_slice(key.as_bytes());
        }
    }
}

/// The start of every store key of (target, entity).
pub fn published_store_prefix(target: &str, entity: &str, out: &mut Vec<u8>) {
    for name in [target, entity] {
        let len = name.len().min(u16::MAX as usize);
        out.extend_from_slice(&(len as u16).to_be_bytes());
        out.extend_from_slice(&name.as_bytes()[..len]);
    }
}

/// The [`published_store_prefix`] a [`published_store_key`] starts with:
/// two names, each after its big-endian 16-bit length. The encoding is
/// prefix-free: no other (target, entity)'s keys start with it.
pub fn published_store_prefix_of(store_key: &[u8]) -> &[u8] {
    let mut at = 0;
    for _ in 0..2 {
        let len = store_key
            .get(at..at + 2)
            .map_or(0, |l| u16::from_be_bytes([l[0], l[1]]) as usize);
        at = (at + 2 + len).min(store_key.len());
    }
    &store_key[..at]
}

/// The record key of a store key that starts with `prefix`
/// ([`published_store_prefix`]); `None` for another prefix or bytes that
/// [`published_store_key`] does not write.
pub fn published_key_of(store_key: &[u8], prefix: &[u8]) -> Option<String> {
    let rest = store_key.strip_prefix(prefix)?;
    match rest.split_first()? {
        (1, n) => Some(u64::from_be_bytes(n.try_into().ok()?).to_string()),
        (2, k) => String::from_utf8(k.to_vec()).ok(),
        _ => None,
    }
}

/// `key` as an unsigned integer when it is one written canonically (no sign,
/// no leading zero), so that writing the number back gives `key` again.
pub fn canonical_integer(key: &str) -> Option<u64> {
    let b = key.as_bytes();
    if b.is_empty() || b.len() > 20 || !b.iter().all(u8::is_ascii_digit) {
        return None;
    }
    if b.len() > 1 && b[0] == b'0' {
        return None;
    }
    key.parse().ok()
}

/// Appends one published change to `out`: the store key's length (`u32`,
/// little-endian) and bytes, then `1` and the hash, or `0` when the record
/// is no longer published nor withheld.
pub fn push_published_change(
    out: &mut Vec<u8>,
    target: &str,
    entity: &str,
    key: &str,
    hash: Option<[u8; 16]>,
) {
    let at = out.len();
    out.extend_from_slice(&[0; 4]);
    published_store_key(target, entity, key, out);
    let len = (out.len() - at - 4) as u32;
    out[at..at + 4].copy_from_slice(&len.to_le_bytes());
    match hash {
        Some(hash) => {
            out.push(1);
            out.extend_from_slice(&hash);
        }
        None => out.push(0),
    }
}

/// The changes [`push_published_change`] wrote to `bytes`, in order; stops
/// at a torn entry (never written: entries are stored whole).
pub fn published_changes(bytes: &[u8]) -> impl Iterator<Item = (&[u8], Option<[u8; 16]>)> + '_ {
    let mut at = 0usize;
    std::iter::from_fn(move || {
        let len = u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?) as usize;
        let key = bytes.get(at + 4..at + 4 + len)?;
        at += 4 + len;
        let hash = match *bytes.get(at)? {
            1 => {
                let hash: [u8; 16] = bytes.get(at + 1..at + 17)?.try_into().ok()?;
                at += 17;
                Some(hash)
            }
            _ => {
                at += 1;
                None
            }
        };
        Some((key, hash))
    })
}

/// What a reconciliation found for one target and entity (see the
/// governance's `process_snapshot`, `probe_snapshot` and `reconcile_absent`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReconcileCounts {
    /// Records read from the source and compared.
    pub checked: u64,
    /// Records the target holds as it should (or rightly does not hold).
    pub equal: u64,
    /// Records sent again: their document differs from the last one sent.
    pub resent: u64,
    /// Deletes sent: records gone from the source or no longer publishable.
    pub deleted: u64,
    /// A deep reconciliation (the target's rows read back): rows whose
    /// document differs from the governed one.
    #[serde(default)]
    pub changed: u64,
    /// Deep: rows the target lacks (absent, or marked deleted) that it should hold.
    #[serde(default)]
    pub missing: u64,
    /// Deep: rows the target holds that it should not (not publishable,
    /// routed away, gone from the source, or never sent).
    #[serde(default)]
    pub extra: u64,
    /// Deep: differing rows the target's version guard would refuse (their
    /// `_version` was raised beyond what steward writes); nothing is sent
    /// for them. The others among changed, missing and extra are repaired
    /// (counted in `resent` and `deleted`).
    #[serde(default)]
    pub unrepairable: u64,
}

impl ReconcileCounts {
    /// Adds `other`'s counts to these.
    pub fn add(&mut self, other: ReconcileCounts) {
        self.checked += other.checked;
        self.equal += other.equal;
        self.resent += other.resent;
        self.deleted += other.deleted;
        self.changed += other.changed;
        self.missing += other.missing;
        self.extra += other.extra;
        self.unrepairable += other.unrepairable;
    }

    /// Whether the target differed from what it should hold.
    pub fn drift(&self) -> u64 {
        self.resent + self.deleted + self.unrepairable
    }

    /// Counts one deep comparison's finding.
    pub fn add_drift(&mut self, drift: crate::pipeline::target_rows::Drift, refused: bool) {
        use crate::pipeline::target_rows::Drift;
        match drift {
            Drift::Equal => {
                self.equal += 1;
                return;
            }
            Drift::Changed => self.changed += 1,
            Drift::Missing => self.missing += 1,
            Drift::Extra => self.extra += 1,
        }
        if refused {
            self.unrepairable += 1;
        } else if drift == Drift::Extra {
            self.deleted += 1;
        } else {
            self.resent += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store_key(target: &str, entity: &str, key: &str) -> Vec<u8> {
        let mut out = Vec::new();
        published_store_key(target, entity, key, &mut out);
        out
    }

    #[test]
    fn store_keys_sort_numbers_as_numbers_and_give_the_key_back() {
        let keys = ["0", "9", "10", "99", "100", "18446744073709551615"];
        let encoded: Vec<Vec<u8>> = keys.iter().map(|k| store_key("t", "e", k)).collect();
        assert!(encoded.windows(2).all(|w| w[0] < w[1]), "numeric order");
        // Not canonical integers: kept as text, after every number.
        for other in ["007", "-1", "1.5", "18446744073709551616", "", "a|b", "1 "] {
            let k = store_key("t", "e", other);
            assert!(k > *encoded.last().unwrap(), "{other:?}");
            let mut prefix = Vec::new();
            published_store_prefix("t", "e", &mut prefix);
            assert_eq!(published_key_of(&k, &prefix).as_deref(), Some(other));
        }
        let mut prefix = Vec::new();
        published_store_prefix("t", "e", &mut prefix);
        for (k, e) in keys.iter().zip(&encoded) {
            assert_eq!(published_key_of(e, &prefix).as_deref(), Some(*k));
        }
        // Names are length-prefixed: no (target, entity) is another's prefix.
        assert_ne!(store_key("ab", "c", "1"), store_key("a", "bc", "1"));
        let mut other = Vec::new();
        published_store_prefix("t", "ex", &mut other);
        assert_eq!(published_key_of(&store_key("t", "ex", "1"), &prefix), None);
        assert!(!store_key("t", "e", "1").starts_with(&other));
    }

    #[test]
    fn published_changes_read_back_as_written() {
        let mut bytes = Vec::new();
        push_published_change(&mut bytes, "mes", "product", "42", Some([7; 16]));
        push_published_change(&mut bytes, "mes", "product", "x", None);
        push_published_change(&mut bytes, "wms", "partner", "1|2", Some(WITHHELD));
        let changes: Vec<(Vec<u8>, Option<[u8; 16]>)> = published_changes(&bytes)
            .map(|(k, h)| (k.to_vec(), h))
            .collect();
        assert_eq!(
            changes,
            [
                (store_key("mes", "product", "42"), Some([7; 16])),
                (store_key("mes", "product", "x"), None),
                (store_key("wms", "partner", "1|2"), Some(WITHHELD)),
            ]
        );
        // A torn last entry is not read.
        assert_eq!(published_changes(&bytes[..bytes.len() - 3]).count(), 2);
    }
}
