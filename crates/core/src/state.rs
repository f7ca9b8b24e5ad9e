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
    /// The (target, entity, key) names of records that became published to
    /// a target, each as [`push_published_name`] writes it: the published
    /// state is keyed by digests, and reconciliation needs the keys a target
    /// was sent to find the ones gone from the source. Bytes, not strings,
    /// so the hot path allocates nothing per record.
    pub published_names: Vec<u8>,
    /// Records the published state holds (published or withheld, per
    /// target) after these changes; 0 when not known. The store compacts
    /// its log of that state only once it outgrows twice this: while the
    /// state grows (an initial snapshot) the log holds no superseded
    /// changes, and compacting it would only cost memory and time.
    pub published_live: u64,
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
    /// What was last appended for a record to a target changed.
    Published {
        /// [`published_digest`] of (target, entity, key).
        digest: [u8; 16],
        /// A hash of the document appended (all zeros: withheld from the
        /// target); `None`: no longer published.
        hash: Option<[u8; 16]>,
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
        self.ops.is_empty() && self.published_names.is_empty()
    }

    /// Adds `other`'s changes after this one's.
    pub fn append(&mut self, other: GovDelta) {
        if self.ops.is_empty() {
            // Take the other's vector rather than copying every op.
            self.ops = other.ops;
        } else {
            self.ops.extend(other.ops);
        }
        if self.published_names.is_empty() {
            self.published_names = other.published_names;
        } else {
            self.published_names.extend(other.published_names);
        }
        self.published_live = other.published_live;
    }
}

/// Everything the store (`load_governance`) read back, held at once: for
/// tests and tools. The daemon restores its governance through
/// [`GovLoader`] instead.
#[derive(Debug, Default)]
pub struct GovSnapshot {
    /// Tracked rows: (entity, key, row as a JSON object).
    pub rows: Vec<(String, String, Vec<u8>)>,
    /// [`published_digest`] → document hash.
    pub published: std::collections::BTreeMap<[u8; 16], [u8; 16]>,
    /// Claimed business-key values: (entity, field, normalised value, holder key).
    pub unique: Vec<(String, String, String, String)>,
    /// Records held in quarantine.
    pub quarantine: Vec<QuarantineEntry>,
}

/// Takes the governance state the store reads back at start, one piece at
/// a time, so that none of it is in memory twice while it loads: restoring
/// a million records' published hashes from a copy of them all would need
/// the copy as well (the store's `load_governance_into`).
pub trait GovLoader {
    /// A tracked row: its entity, key and JSON object as bytes.
    fn row(&mut self, entity: &str, key: &str, row: &[u8]);
    /// One change of the published state, in the order they were written:
    /// applying all of them in turn gives the live state.
    fn published(&mut self, change: PublishedChange);
    /// A claimed business-key value: entity, field, normalised value, holder key.
    fn unique(&mut self, entity: &str, field: &str, value: &str, holder: &str);
    /// A record held in quarantine.
    fn quarantined(&mut self, entry: QuarantineEntry);
}

impl GovLoader for GovSnapshot {
    fn row(&mut self, entity: &str, key: &str, row: &[u8]) {
        self.rows.push((entity.into(), key.into(), row.to_vec()));
    }

    fn published(&mut self, (digest, hash): PublishedChange) {
        match hash {
            Some(hash) => self.published.insert(digest, hash),
            None => self.published.remove(&digest),
        };
    }

    fn unique(&mut self, entity: &str, field: &str, value: &str, holder: &str) {
        self.unique
            .push((entity.into(), field.into(), value.into(), holder.into()));
    }

    fn quarantined(&mut self, entry: QuarantineEntry) {
        self.quarantine.push(entry);
    }
}

/// One change: the record's digest and its new hash (`None`: no longer published).
pub type PublishedChange = ([u8; 16], Option<[u8; 16]>);
/// One live entry: the record's digest and the hash of its last document.
pub type PublishedEntry = ([u8; 16], [u8; 16]);

/// The key of one (target, entity, key) in the published state. BLAKE3 over
/// length-prefixed names: unambiguous, and stable across configuration
/// changes (names, not positions in the configuration).
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

/// Appends one (target, entity, key) name to `out`: each part as a
/// little-endian `u32` length and its bytes.
pub fn push_published_name(out: &mut Vec<u8>, target: &str, entity: &str, key: &str) {
    for part in [target, entity, key] {
        out.extend_from_slice(&(part.len() as u32).to_le_bytes());
        out.extend_from_slice(part.as_bytes());
    }
}

/// The names [`push_published_name`] wrote to `bytes`, in order; stops at
/// a torn entry (never written: entries are stored whole).
pub fn published_names(bytes: &[u8]) -> impl Iterator<Item = [&str; 3]> + '_ {
    let mut at = 0usize;
    std::iter::from_fn(move || {
        let mut parts = [""; 3];
        for part in &mut parts {
            let len_bytes = bytes.get(at..at + 4)?;
            let len = u32::from_le_bytes(len_bytes.try_into().ok()?) as usize;
            let text = bytes.get(at + 4..at + 4 + len)?;
            *part = std::str::from_utf8(text).ok()?;
            at += 4 + len;
        }
        Some(parts)
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
