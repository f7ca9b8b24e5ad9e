//! Governance state in the redb file: the last row seen per governed record
//! (for `old.*`, references, business objects and quarantine release), the
//! hash of the last document appended per target and key (no-op suppression
//! and "was published" for lifecycle gates and routing), the business-key
//! index both ways (duplicate detection), the reference index (re-emission)
//! and the quarantine.
//!
//! The governance reads it back as it needs it (`Store::state_reader`) and
//! hands every change to the daemon as a [`GovDelta`], written by
//! [`GovernanceState::commit_governed`] in the same transaction as the
//! outbox appends and the checkpoint: after a crash the state always
//! matches what was appended.

use redb::{ReadableTable, TableDefinition, TableHandle, WriteTransaction};

use super::tables::{join, open_or_empty};
use super::{Store, StoreError};
use steward_core::model::{json, Event, Lsn};
pub use steward_core::state::{
    AuditRecord, GovDelta, GovLoader, GovOp, GovSnapshot, QuarantineEntry,
};

/// `entity \0 key` → the row's columns as a JSON object.
pub(crate) const GOV_ROWS: TableDefinition<&str, &[u8]> = TableDefinition::new("gov_rows");
/// `entity \0 field \0 normalised value` → key of the record holding it.
pub(crate) const GOV_UNIQUE: TableDefinition<&str, &str> = TableDefinition::new("gov_unique");
/// `entity \0 holder key \0 field \0 normalised value` → nothing: the
/// business-key values each record holds, [`GOV_UNIQUE`] the other way round.
pub(crate) const GOV_CLAIMS: TableDefinition<&str, ()> = TableDefinition::new("gov_claims");

/// `entity \0 column \0 id \0 key` → nothing: the tracked records whose
/// column holds another record's id (references), for re-emission when the
/// referenced record changes. Which columns it covers is [`REF_COLUMNS_META`].
pub(crate) const GOV_REFS: TableDefinition<&str, ()> = TableDefinition::new("gov_refs");

/// The meta key naming the columns [`GOV_REFS`] indexes (`entity.column`,
/// sorted, one per line); the index is rebuilt when the configuration's differ.
const REF_COLUMNS_META: &str = "gov_ref_columns";

/// A tracked row's reference index entries, (column, id), from its entity
/// and its bytes: the governance's `ref_entries`.
pub type RefEntries<'a> = dyn Fn(&str, &[u8]) -> Vec<(String, String)> + 'a;

/// Tracked rows read per transaction while the reference index is rebuilt.
const REF_REBUILD_ROWS: usize = 20_000;

impl Store {
    /// Makes the reference index cover `columns` ((entity, column), from the
    /// governance's `ref_columns`): when it covers others (a configuration
    /// change, or a file written before it existed), it is rebuilt from the
    /// tracked rows, `entries` giving a row's (column, id) entries.
    /// Returns how many entries a rebuild wrote, `None` when none was needed.
    pub fn ensure_ref_index(
        &self,
        columns: &[(String, String)],
        entries: &RefEntries<'_>,
    ) -> Result<Option<u64>, StoreError> {
        let wanted: Vec<String> = columns.iter().map(|(e, c)| format!("{e}.{c}")).collect();
        let wanted = wanted.join("\n");
        if self.get_meta(REF_COLUMNS_META)?.as_deref() == Some(wanted.as_str()) {
            return Ok(None);
        }
        // Cleared first and marked only at the end: a rebuild cut short
        // starts again.
        self.write(redb::Durability::Immediate, |txn| {
            txn.open_table(super::META)?.remove(REF_COLUMNS_META)?;
            txn.delete_table(GOV_REFS)?;
            Ok(())
        })?;
        let indexed: std::collections::BTreeSet<&str> =
            columns.iter().map(|(e, _)| e.as_str()).collect();
        let mut after: Option<String> = None;
        let mut written = 0u64;
        loop {
            let (last, n) = self.write(redb::Durability::None, |txn| {
                let rows = txn.open_table(GOV_ROWS)?;
                let mut refs = txn.open_table(GOV_REFS)?;
                let from = after.as_deref().unwrap_or("");
                // From the last key read on, without it.
                let range = rows.range(from..)?.skip(usize::from(after.is_some()));
                let (mut last, mut read, mut n) = (None, 0, 0u64);
                for item in range.take(REF_REBUILD_ROWS) {
                    let (k, v) = item?;
                    let k = k.value();
                    read += 1;
                    last = Some(k.to_string());
                    let [entity, key] = split(k)[..] else {
                        continue;
                    };
                    if !indexed.contains(entity) {
                        continue;
                    }
                    for (column, id) in entries(entity, v.value()) {
                        refs.insert(join(&[entity, &column, &id, key]).as_str(), ())?;
                        n += 1;
                    }
                }
                Ok((last.filter(|_| read == REF_REBUILD_ROWS), n))
            })?;
            written += n;
            match last {
                Some(last) => after = Some(last),
                None => break,
            }
        }
        self.set_meta(REF_COLUMNS_META, &wanted)?;
        Ok(Some(written))
    }
}

/// Counters of the governance state, apart from the store's own (which a
/// commit already has open when it applies a delta).
const GOV_COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("gov_counters");
/// The counter of commits that changed the governance state.
const GOV_CHANGES: &str = "changes";
/// A summary the governance saved of the state (its counts) when it
/// stopped: the value of [`GOV_CHANGES`] then (8 bytes, big-endian), and its bytes.
const GOV_SUMMARY: TableDefinition<&str, &[u8]> = TableDefinition::new("gov_summary");

impl Store {
    /// Saves the governance's summary of the state as the store holds it now.
    pub fn save_governance_summary(&self, summary: &[u8]) -> Result<(), StoreError> {
        self.write(redb::Durability::Immediate, |txn| {
            let changes = txn
                .open_table(GOV_COUNTERS)?
                .get(GOV_CHANGES)?
                .map_or(0, |v| v.value());
            let mut bytes = Vec::with_capacity(8 + summary.len());
            bytes.extend_from_slice(&changes.to_be_bytes());
            bytes.extend_from_slice(summary);
            txn.open_table(GOV_SUMMARY)?
                .insert("summary", bytes.as_slice())?;
            Ok(())
        })
    }

    /// The summary saved by [`Store::save_governance_summary`], if the
    /// governance state has not changed since.
    pub fn governance_summary(&self) -> Result<Option<Vec<u8>>, StoreError> {
        self.read(|txn| {
            let changes = match open_or_empty!(txn, GOV_COUNTERS) {
                Some(t) => t.get(GOV_CHANGES)?.map_or(0, |v| v.value()),
                None => 0,
            };
            let Some(t) = open_or_empty!(txn, GOV_SUMMARY) else {
                return Ok(None);
            };
            let Some(v) = t.get("summary")? else {
                return Ok(None);
            };
            let v = v.value();
            Ok((v.len() >= 8 && v[..8] == changes.to_be_bytes()).then(|| v[8..].to_vec()))
        })
    }
}

/// Builds [`GOV_CLAIMS`] from [`GOV_UNIQUE`] in a state file written before
/// it existed; returns how many claims it wrote, `None` when it existed.
pub(super) fn build_claims(txn: &WriteTransaction) -> Result<Option<u64>, redb::Error> {
    if txn.list_tables()?.any(|t| t.name() == GOV_CLAIMS.name()) {
        return Ok(None);
    }
    let mut claims = txn.open_table(GOV_CLAIMS)?;
    let unique = txn.open_table(GOV_UNIQUE)?;
    let mut written = 0;
    for item in unique.iter()? {
        let (k, holder) = item?;
        if let [entity, field, value] = split(k.value())[..] {
            claims.insert(join(&[entity, holder.value(), field, value]).as_str(), ())?;
            written += 1;
        }
    }
    Ok(Some(written))
}

fn split(key: &str) -> Vec<&str> {
    key.split('\0').collect()
}

/// Writes `delta` inside a write transaction (the outbox commit's), which
/// appended `appends` and left each target's last sequence number in `last`.
#[allow(clippy::result_large_err)] // redb's own error type, boxed by the caller
pub(super) fn apply(
    txn: &WriteTransaction,
    delta: &GovDelta,
    appends: &[(&str, &Event)],
    last: &[(String, u64)],
) -> Result<(), redb::Error> {
    if delta.is_empty() {
        return Ok(());
    }
    let mut seqs = AppendSeqs::new(appends, last);
    // Any change makes a saved summary of the state out of date.
    let mut counters = txn.open_table(GOV_COUNTERS)?;
    let changes = counters.get(GOV_CHANGES)?.map_or(0, |v| v.value());
    counters.insert(GOV_CHANGES, changes + 1)?;
    drop(counters);
    let mut rows = txn.open_table(GOV_ROWS)?;
    let mut unique = txn.open_table(GOV_UNIQUE)?;
    let mut claims = txn.open_table(GOV_CLAIMS)?;
    let mut refs = txn.open_table(GOV_REFS)?;
    let mut quarantine = txn.open_table(super::quarantine::QUARANTINE)?;
    // Every record written into one buffer, each ending at its offset.
    let (mut audit, mut audit_ends) = (Vec::new(), Vec::new());
    for op in &delta.ops {
        match op {
            GovOp::Row { entity, key, row } => {
                let k = join(&[entity, key]);
                match row {
                    Some(bytes) => {
                        rows.insert(k.as_str(), bytes.as_slice())?;
                    }
                    None => {
                        rows.remove(k.as_str())?;
                    }
                }
            }
            GovOp::Unique {
                entity,
                field,
                value,
                holder,
            } => {
                let k = join(&[entity, field, value]);
                let was = match holder {
                    Some(h) => unique.insert(k.as_str(), h.as_str())?,
                    None => unique.remove(k.as_str())?,
                }
                .map(|h| h.value().to_string());
                if let Some(was) = was.filter(|w| Some(w) != holder.as_ref()) {
                    claims.remove(join(&[entity, &was, field, value]).as_str())?;
                }
                if let Some(h) = holder {
                    claims.insert(join(&[entity, h, field, value]).as_str(), ())?;
                }
            }
            GovOp::Ref {
                entity,
                column,
                id,
                key,
                present,
            } => {
                let k = join(&[entity, column, id, key]);
                if *present {
                    refs.insert(k.as_str(), ())?;
                } else {
                    refs.remove(k.as_str())?;
                }
            }
            GovOp::Quarantine { entity, key, entry } => {
                let k = join(&[entity, key]);
                match entry {
                    Some(e) => {
                        let bytes = serde_json::to_vec(e).map_err(|e| {
                            redb::Error::Io(std::io::Error::other(format!(
                                "cannot encode a quarantine entry: {e}"
                            )))
                        })?;
                        quarantine.insert(k.as_str(), bytes.as_slice())?;
                    }
                    None => {
                        quarantine.remove(k.as_str())?;
                    }
                }
            }
            GovOp::Audit(record) => {
                write_audit_record(record, seqs.of(record), &mut audit);
                audit_ends.push(audit.len());
            }
        }
    }
    drop((rows, unique, claims, refs, quarantine));
    super::published::apply(txn, &delta.published)?;
    let mut start = 0;
    let records: Vec<&[u8]> = audit_ends
        .iter()
        .map(|&end| {
            let record = &audit[start..end];
            start = end;
            record
        })
        .collect();
    super::audit::append(txn, &records)
}

/// Finds the outbox sequence number of the event an audit record of a
/// commit stands for. The governance pushes an event and its `delivered` (or
/// `unpublished`) record together, so per target the records and the
/// appends come in the same order; appends may be fewer (a running snapshot
/// drops stale versions), so each record looks a few appends ahead for its
/// own (entity, key, version) and gets none when its event was dropped.
struct AppendSeqs<'a> {
    appends: &'a [(&'a str, &'a Event)],
    /// Per target: the index in `appends` to look from, and its seq.
    cursors: Vec<(&'a str, usize, u64)>,
}

/// How many of a target's appends a record looks past for its own event.
const SEQ_LOOKAHEAD: usize = 64;

impl<'a> AppendSeqs<'a> {
    fn new(appends: &'a [(&'a str, &'a Event)], last: &'a [(String, u64)]) -> AppendSeqs<'a> {
        let cursors = last
            .iter()
            .map(|(target, last_seq)| {
                let count = appends.iter().filter(|(t, _)| t == target).count() as u64;
                let first = appends.iter().position(|(t, _)| t == target).unwrap_or(0);
                (target.as_str(), first, last_seq + 1 - count)
            })
            .collect();
        AppendSeqs { appends, cursors }
    }

    fn of(&mut self, record: &AuditRecord) -> Option<u64> {
        if record.decision != "delivered" && record.decision != "unpublished" {
            return None;
        }
        let target = record.target.as_deref()?;
        let cursor = self.cursors.iter_mut().find(|(t, _, _)| *t == target)?;
        let (mut i, mut seq, mut seen) = (cursor.1, cursor.2, 0);
        while i < self.appends.len() && seen < SEQ_LOOKAHEAD {
            let (t, event) = self.appends[i];
            i += 1;
            if t != target {
                continue;
            }
            if event.version == record.version
                && event.key == record.key
                && event.entity == record.entity
            {
                cursor.1 = i;
                cursor.2 = seq + 1;
                return Some(seq);
            }
            seq += 1;
            seen += 1;
        }
        None
    }
}

/// An audit record as JSON, written by hand: one per delivered event, and
/// serde's derived serializer (escaping every key byte by byte) takes about
/// a twentieth of steward's instructions on the product-insert workload
/// (`STEWARD_BENCH_WRAPPER="valgrind --tool=callgrind" cargo bench --bench
/// e2e -- W1`). Same bytes as `serde_json::to_vec`.
pub(crate) fn encode_audit_record(r: &AuditRecord) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(160);
    write_audit_record(r, None, &mut bytes);
    bytes
}

/// `seq` (when given) stands for the record's own.
fn write_audit_record(r: &AuditRecord, seq: Option<u64>, out: &mut Vec<u8>) {
    // The keys with their punctuation as literals: one copy each.
    out.reserve(
        120 + r.entity.len()
            + r.key.len()
            + r.target.as_ref().map_or(0, String::len)
            + r.decision.len()
            + r.detail.len(),
    );
    out.extend_from_slice(b"{\"time_micros\":");
    json::write_int(out, r.time_micros);
    out.extend_from_slice(b",\"entity\":");
    json::write_str(out, &r.entity);
    out.extend_from_slice(b",\"key\":");
    json::write_str(out, &r.key);
    out.extend_from_slice(b",\"version\":");
    json::write_int(out, r.version);
    out.extend_from_slice(b",\"target\":");
    match &r.target {
        Some(t) => json::write_str(out, t),
        None => out.extend_from_slice(b"null"),
    }
    out.extend_from_slice(b",\"decision\":");
    json::write_str(out, &r.decision);
    out.extend_from_slice(b",\"detail\":");
    json::write_str(out, &r.detail);
    // Left out when empty, as serde does (`skip_serializing_if`).
    for (key, value) in [
        (&b",\"user\":"[..], &r.user),
        (b",\"comment\":", &r.comment),
    ] {
        if let Some(v) = value {
            out.extend_from_slice(key);
            json::write_str(out, v);
        }
    }
    if let Some(seq) = seq.or(r.seq) {
        out.extend_from_slice(b",\"seq\":");
        json::write_int(out, seq);
    }
    out.push(b'}');
}

/// The durable governance state, as the daemon reads it at start and
/// changes it: always together with the outbox appends the change produced,
/// in one transaction. Delivery drivers and the source have no access to it.
pub trait GovernanceState {
    /// [`Store::commit`] plus the governance delta, in one durable transaction.
    fn commit_governed(
        &self,
        checkpoint: Lsn,
        appends: &[(&str, &Event)],
        delta: &GovDelta,
    ) -> Result<Vec<(String, u64)>, StoreError>;

    /// Reads the whole governance state into `into` (at start-up), one
    /// row or change at a time.
    fn load_governance_into(&self, into: &mut dyn GovLoader) -> Result<(), StoreError>;

    /// Reads the whole governance state into one [`GovSnapshot`].
    fn load_governance(&self) -> Result<GovSnapshot, StoreError> {
        let mut snap = GovSnapshot::default();
        self.load_governance_into(&mut snap)?;
        Ok(snap)
    }

    /// The published state as the governance reads it, record by record.
    fn state_reader(&self) -> Box<dyn steward_core::state::StateReader>;

    /// Applies a governance delta outside a source commit (a quarantine
    /// release on a stopped daemon), together with the events it produced.
    fn apply_governance(
        &self,
        appends: &[(&str, &Event)],
        delta: &GovDelta,
    ) -> Result<Vec<(String, u64)>, StoreError>;
}

impl GovernanceState for Store {
    fn commit_governed(
        &self,
        checkpoint: Lsn,
        appends: &[(&str, &Event)],
        delta: &GovDelta,
    ) -> Result<Vec<(String, u64)>, StoreError> {
        let out = self.commit_with(checkpoint, appends, &mut |txn, last| {
            apply(txn, delta, appends, last).map_err(Box::new)
        })?;
        self.inner
            .visible_generation
            .fetch_max(delta.generation, std::sync::atomic::Ordering::AcqRel);
        Ok(out)
    }

    fn load_governance_into(&self, into: &mut dyn GovLoader) -> Result<(), StoreError> {
        self.read(|txn| {
            if let Some(t) = open_or_empty!(txn, GOV_ROWS) {
                // Entity by entity (`entity \0 key`): an entity not wanted
                // is skipped in one seek.
                let mut from = String::new();
                'entities: loop {
                    let mut entity: Option<String> = None;
                    for item in t.range(from.as_str()..)? {
                        let (k, v) = item?;
                        let Some((e, key)) = k.value().split_once('\0') else {
                            continue;
                        };
                        if entity.as_deref() != Some(e) {
                            if !into.wants_rows(e) {
                                from = format!("{e}\u{1}");
                                continue 'entities;
                            }
                            entity = Some(e.to_string());
                        }
                        into.row(e, key, v.value());
                    }
                    break;
                }
            }
            if !into.wants_unique() {
                // Read from the store as needed instead.
            } else if let Some(t) = open_or_empty!(txn, GOV_UNIQUE) {
                for item in t.iter()? {
                    let (k, v) = item?;
                    if let [entity, field, value] = split(k.value())[..] {
                        into.unique(entity, field, value, v.value());
                    }
                }
            }
            for entry in super::quarantine::read_all(txn)? {
                into.quarantined(entry);
            }
            Ok(())
        })
    }

    fn apply_governance(
        &self,
        appends: &[(&str, &Event)],
        delta: &GovDelta,
    ) -> Result<Vec<(String, u64)>, StoreError> {
        let checkpoint = self.checkpoint()?.unwrap_or(Lsn::ZERO);
        self.commit_governed(checkpoint, appends, delta)
    }

    fn state_reader(&self) -> Box<dyn steward_core::state::StateReader> {
        Box::new(super::published::Reader::new(self.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn audit_records_are_written_as_serde_would() {
        let cases = [
            (None, "plain", None, None),
            (Some("wms \"eu\""), "tab\t\u{1} ü", None, None),
            (
                None,
                "human",
                Some("ops \"x\""),
                Some("checked\nwith finance"),
            ),
            (Some("wms"), "user only", Some("alice"), None),
        ];
        for (i, (target, text, user, comment)) in cases.into_iter().enumerate() {
            let record = AuditRecord {
                time_micros: -5,
                entity: format!("product{text}"),
                key: format!("7|{text}"),
                version: u64::MAX,
                target: target.map(str::to_string),
                decision: "delivered".into(),
                detail: format!("upsert {text}"),
                user: user.map(str::to_string),
                comment: comment.map(str::to_string),
                seq: (i % 2 == 1).then_some(u64::MAX - i as u64),
            };
            let mut out = Vec::new();
            write_audit_record(&record, None, &mut out);
            assert_eq!(out, serde_json::to_vec(&record).unwrap());
            let back: AuditRecord = serde_json::from_slice(&out).unwrap();
            assert_eq!(back, record);
        }
    }

    #[test]
    fn audit_records_stored_before_user_and_comment_existed_still_read() {
        let old = br#"{"time_micros":1,"entity":"product","key":"7","version":9,"target":null,"decision":"released","detail":"manual release"}"#;
        let record: AuditRecord = serde_json::from_slice(old).unwrap();
        assert_eq!((record.user, record.comment), (None, None));
        assert_eq!(record.decision, "released");
    }
}
