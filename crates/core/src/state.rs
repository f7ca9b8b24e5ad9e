//! The durable governance state, as it crosses into the store: the changes
//! of one batch ([`GovDelta`]), what is read back at start
//! ([`GovSnapshot`]), quarantine entries and audit records.

use serde::{Deserialize, Serialize};

/// A quarantined record (see the store's quarantine table).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct QuarantineEntry {
    pub entity: String,
    pub key: String,
    pub version: u64,
    pub rule: String,
    pub message: String,
    pub(crate) document: serde_json::Value,
    /// RFC 3339 UTC, when it was (last) quarantined.
    pub since: String,
    /// `entity key` of the record a reference rule waits for, when that is
    /// why it is held: it is released when that record is published.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blocked_by: Option<String>,
}

/// One governance decision (see the store's audit log).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// Microseconds since the Unix epoch.
    pub time_micros: i64,
    pub entity: String,
    pub key: String,
    pub version: u64,
    /// `None` for decisions about the record as a whole (quarantined, released).
    pub target: Option<String>,
    /// delivered, gated, unpublished, quarantined, released, suppressed, redacted, not_routed.
    pub decision: String,
    pub detail: String,
}

/// State changes of one batch of source transactions, in order.
#[derive(Debug, Default)]
pub struct GovDelta {
    pub ops: Vec<GovOp>,
}

#[derive(Debug)]
pub enum GovOp {
    Row {
        entity: String,
        key: String,
        row: Option<Vec<u8>>,
    },
    /// The record's digest and the hash of the
    /// document appended (`None`: no longer published).
    Published {
        digest: [u8; 16],
        hash: Option<[u8; 16]>,
    },
    Unique {
        entity: String,
        field: String,
        value: String,
        holder: Option<String>,
    },
    Quarantine {
        entity: String,
        key: String,
        entry: Option<Box<QuarantineEntry>>,
    },
    Audit(AuditRecord),
}

impl GovDelta {
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    pub fn append(&mut self, other: GovDelta) {
        if self.ops.is_empty() {
            // Take the other's vector rather than copying every op.
            self.ops = other.ops;
        } else {
            self.ops.extend(other.ops);
        }
    }
}

/// Everything the store (`load_governance`) read back.
#[derive(Debug, Default)]
pub struct GovSnapshot {
    pub rows: Vec<(String, String, Vec<u8>)>,
    /// [`published_digest`] → document hash.
    pub published: Vec<PublishedEntry>,
    pub unique: Vec<(String, String, String, String)>,
    pub quarantine: Vec<QuarantineEntry>,
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
