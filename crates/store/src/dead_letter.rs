//! Per-target dead letters, the replay queue and the batch-window buffer.
//!
//! Tables, one set per target (like the outboxes, so one target's churn
//! never touches another's pages):
//!
//! - `dlq:<target>`: dead-letter id (per target, increasing) → [`DeadLetter`]
//!   as JSON. Ids grow in the order events were given up on, which for one
//!   key is their commit order.
//! - `dlq_keys:<target>`: `entity \0 key` → first (lowest) dead-letter id of
//!   that key and how many entries it has. A key listed here is *held*: its
//!   later events are parked behind the first one instead of being delivered,
//!   so a target never sees a key's events out of order.
//! - `replay:<target>`: replay id → event JSON. Entries the operator sent back
//!   for delivery; the driver drains this queue before its outbox.
//! - `window:<target>`: `entity \0 key` → the latest event of that key waiting
//!   for its batch window (coalescing happens on the way in: a later event of
//!   the key replaces the earlier one, so a delete wins when it is the latest).
//! - `delivery_counters`: `<target> \0 <name>` → u64, so dead-letter, replay
//!   and window sizes are point lookups (status is O(1)).
//!
//! Everything the driver decides about one batch (outbox acknowledged, events
//! delivered, dead-lettered, buffered) is written by [`Store::settle`] in ONE
//! transaction, so a crash never leaves an event both in the outbox and in the
//! dead-letter queue, or in neither.

use std::collections::{BTreeMap, HashSet};

use redb::{Durability, ReadableTable, TableDefinition, TableError};
use serde::{Deserialize, Serialize};

use super::{advance_outbox, Store, StoreError, TxnError, TARGETS};
use steward_core::model::Event;

const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("delivery_counters");

const DLQ_LEN: &str = "dlq_len";
const DLQ_NEXT: &str = "dlq_next";
const DLQ_TOTAL: &str = "dlq_total";
const REPLAY_LEN: &str = "replay_len";
const REPLAY_NEXT: &str = "replay_next";
const WINDOW_LEN: &str = "window_len";

fn dlq_name(target: &str) -> String {
    format!("dlq:{target}")
}
fn dlq_keys_name(target: &str) -> String {
    format!("dlq_keys:{target}")
}
fn replay_name(target: &str) -> String {
    format!("replay:{target}")
}
fn window_name(target: &str) -> String {
    format!("window:{target}")
}
fn by_id(name: &str) -> TableDefinition<'_, u64, &'static [u8]> {
    TableDefinition::new(name)
}
fn by_key(name: &str) -> TableDefinition<'_, &'static str, &'static [u8]> {
    TableDefinition::new(name)
}
fn counter_key(target: &str, name: &str) -> String {
    format!("{target}\0{name}")
}

/// The hold/coalescing identity of an event: entity and key.
pub fn key_of(event: &Event) -> String {
    format!("{}\0{}", event.entity, event.key)
}

/// One dead-lettered event.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// Per target, increasing in the order events were given up on.
    pub id: u64,
    /// The event as it would have been delivered.
    pub event: Event,
    /// Why: the target's answer (status and body excerpt), or `held behind <id>`.
    pub error: String,
    /// Set when the event itself did not fail but waits behind an earlier
    /// dead letter of the same key.
    pub held_behind: Option<u64>,
    /// Delivery attempts made for it (0 when held).
    pub attempts: u32,
    /// Time of the first failed attempt, RFC 3339 UTC.
    pub first_failure: String,
    /// Time of the last failed attempt, RFC 3339 UTC.
    pub last_failure: String,
}

/// An event to dead-letter, as the driver hands it to [`Store::settle`].
#[derive(Clone, Debug)]
pub struct NewDeadLetter {
    /// The event given up on.
    pub event: Event,
    /// `None`: parked because its key is held (the store names the entry it waits behind).
    pub failure: Option<Failure>,
}

/// Why the driver gave up on an event.
#[derive(Clone, Debug)]
pub struct Failure {
    /// The target's answer (status and body excerpt) or the transport error.
    pub message: String,
    /// Delivery attempts made.
    pub attempts: u32,
    /// Time of the first failed attempt, RFC 3339 UTC.
    pub first_failure: String,
    /// Time of the last failed attempt, RFC 3339 UTC.
    pub last_failure: String,
}

/// What the driver did with one batch, applied atomically.
#[derive(Clone, Debug, Default)]
pub struct Settlement {
    /// Outbox entries up to this seq are done (delivered, dead-lettered or buffered).
    pub outbox_up_to: Option<u64>,
    /// Replay-queue entries up to this id are done.
    pub replay_up_to: Option<u64>,
    /// Window-buffer rows delivered: (`key_of`, event id); removed only if unchanged.
    pub window_done: Vec<(String, String)>,
    /// Events that reached the target.
    pub delivered: u64,
    /// In batch order.
    pub dead: Vec<NewDeadLetter>,
    /// Events of windowed entities to buffer, in outbox order.
    pub windowed: Vec<Event>,
    /// The target's last error after this batch (`None`: cleared when anything was delivered).
    pub error: Option<String>,
}

/// Sizes kept as counters, for status and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveryCounts {
    /// Entries in the dead-letter queue.
    pub dead_letters: u64,
    /// Every entry ever added to it.
    pub(crate) dead_lettered_total: u64,
    /// Entries sent back for delivery and not yet delivered.
    pub(crate) replay: u64,
    /// Coalesced events waiting for their batch window.
    pub(crate) windowed: u64,
}

/// Which dead letters a `dlq` command applies to; empty: all. A field it
/// does not know is refused: a misspelt filter must not select everything.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DlqFilter {
    /// Only dead letters of this entity.
    pub entity: Option<String>,
    /// Only dead letters of this key.
    pub key: Option<String>,
    /// Only the dead letter with this id.
    pub id: Option<u64>,
}

impl DlqFilter {
    pub(crate) fn matches(&self, d: &DeadLetter) -> bool {
        self.id.is_none_or(|id| d.id == id)
            && self.entity.as_deref().is_none_or(|e| d.event.entity == e)
            && self.key.as_deref().is_none_or(|k| d.event.key == k)
    }
}

/// `dlq_keys` value: first id, count.
fn encode_hold(first: u64, count: u64) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&first.to_le_bytes());
    b[8..].copy_from_slice(&count.to_le_bytes());
    b
}
fn decode_hold(b: &[u8]) -> Result<(u64, u64), TxnError> {
    if b.len() != 16 {
        return Err(TxnError::Corrupt(format!(
            "dead-letter key row is {} bytes, expected 16",
            b.len()
        )));
    }
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[..8]);
    let first = u64::from_le_bytes(x);
    x.copy_from_slice(&b[8..]);
    Ok((first, u64::from_le_bytes(x)))
}

fn json<T: Serialize>(v: &T) -> Result<Vec<u8>, TxnError> {
    serde_json::to_vec(v).map_err(|e| TxnError::Corrupt(format!("cannot encode: {e}")))
}
fn unjson<T: for<'de> Deserialize<'de>>(what: &str, b: &[u8]) -> Result<T, TxnError> {
    serde_json::from_slice(b).map_err(|e| TxnError::Corrupt(format!("{what}: {e}")))
}

struct Counters<'t> {
    table: redb::Table<'t, &'static str, u64>,
    target: String,
}

impl Counters<'_> {
    fn get(&self, name: &str) -> Result<u64, TxnError> {
        Ok(self
            .table
            .get(counter_key(&self.target, name).as_str())?
            .map_or(0, |g| g.value()))
    }
    fn set(&mut self, name: &str, v: u64) -> Result<(), TxnError> {
        self.table
            .insert(counter_key(&self.target, name).as_str(), v)?;
        Ok(())
    }
    fn add(&mut self, name: &str, delta: i64) -> Result<(), TxnError> {
        let v = self.get(name)?;
        self.set(name, v.saturating_add_signed(delta))
    }
}

fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

impl Store {
    /// Applies what the driver did with one batch (see [`Settlement`]) in one
    /// transaction. Returns the dead-letter ids assigned, in order.
    pub fn settle(&self, target: &str, s: &Settlement) -> Result<Vec<u64>, StoreError> {
        let now = chrono::Utc::now().timestamp_micros();
        let durability = self.lazy_durability();
        self.write(durability, |txn| {
            let mut targets = txn.open_table(TARGETS)?;
            let mut state =
                advance_outbox(txn, &targets, target, s.outbox_up_to.unwrap_or(0), now)?;
            let mut counters = Counters {
                table: txn.open_table(COUNTERS)?,
                target: target.to_string(),
            };
            if let Some(up_to) = s.replay_up_to {
                let name = replay_name(target);
                let mut replay = txn.open_table(by_id(&name))?;
                let mut removed = 0i64;
                let ids: Vec<u64> = replay
                    .range(..=up_to)?
                    .map(|r| r.map(|(k, _)| k.value()))
                    .collect::<Result<_, _>>()?;
                for id in ids {
                    replay.remove(id)?;
                    removed += 1;
                }
                counters.add(REPLAY_LEN, -removed)?;
            }
            if !s.window_done.is_empty() || !s.windowed.is_empty() {
                let name = window_name(target);
                let mut window = txn.open_table(by_key(&name))?;
                let mut delta = 0i64;
                for (key, id) in &s.window_done {
                    let current: Option<Event> = match window.get(key.as_str())? {
                        Some(g) => Some(unjson("window row", g.value())?),
                        None => None,
                    };
                    if current.is_some_and(|e| &e.id == id) {
                        window.remove(key.as_str())?;
                        delta -= 1;
                    }
                }
                for event in &s.windowed {
                    let bytes = json(event)?;
                    if window
                        .insert(key_of(event).as_str(), bytes.as_slice())?
                        .is_none()
                    {
                        delta += 1;
                    }
                }
                counters.add(WINDOW_LEN, delta)?;
            }
            let mut ids = Vec::with_capacity(s.dead.len());
            if !s.dead.is_empty() {
                let (dname, kname) = (dlq_name(target), dlq_keys_name(target));
                let mut dlq = txn.open_table(by_id(&dname))?;
                let mut keys = txn.open_table(by_key(&kname))?;
                let mut next = counters.get(DLQ_NEXT)?.max(1);
                let stamp = now_rfc3339();
                for d in &s.dead {
                    let id = next;
                    next += 1;
                    let k = key_of(&d.event);
                    let hold = match keys.get(k.as_str())? {
                        Some(g) => Some(decode_hold(g.value())?),
                        None => None,
                    };
                    // A held key parks the event even if it failed itself (a
                    // batch given up as a whole): it must wait behind the first.
                    let (held_behind, error, attempts, first, last) = if let Some((root, _)) = hold
                    {
                        (
                            Some(root),
                            format!("held behind {root}"),
                            0,
                            stamp.clone(),
                            stamp.clone(),
                        )
                    } else if let Some(f) = &d.failure {
                        (
                            None,
                            f.message.clone(),
                            f.attempts,
                            f.first_failure.clone(),
                            f.last_failure.clone(),
                        )
                    } else {
                        (
                            None,
                            "held behind an earlier dead letter of its key that is gone".into(),
                            0,
                            stamp.clone(),
                            stamp.clone(),
                        )
                    };
                    let record = DeadLetter {
                        id,
                        event: d.event.clone(),
                        error,
                        held_behind,
                        attempts,
                        first_failure: first,
                        last_failure: last,
                    };
                    dlq.insert(id, json(&record)?.as_slice())?;
                    let (root, count) = hold.unwrap_or((id, 0));
                    keys.insert(k.as_str(), encode_hold(root, count + 1).as_slice())?;
                    ids.push(id);
                }
                counters.set(DLQ_NEXT, next)?;
                counters.add(DLQ_LEN, ids.len() as i64)?;
                counters.add(DLQ_TOTAL, ids.len() as i64)?;
            }
            state.delivered_total = state.delivered_total.saturating_add(s.delivered);
            if s.delivered > 0 {
                state.last_delivered_at_micros = Some(now);
            }
            if s.error.is_some() || s.delivered > 0 {
                state.last_error = s
                    .error
                    .as_deref()
                    .map(|e| super::truncate(e, super::MAX_ERROR_BYTES).to_string());
            }
            targets.insert(target, state.encode().as_slice())?;
            Ok(ids)
        })
    }

    /// Counters of the target's dead letters, replay queue and window buffer.
    pub fn delivery_counts(&self, target: &str) -> Result<DeliveryCounts, StoreError> {
        self.read(|txn| {
            let table = match txn.open_table(COUNTERS) {
                Ok(t) => t,
                Err(TableError::TableDoesNotExist(_)) => return Ok(DeliveryCounts::default()),
                Err(e) => return Err(e.into()),
            };
            let get = |name: &str| -> Result<u64, TxnError> {
                Ok(table
                    .get(counter_key(target, name).as_str())?
                    .map_or(0, |g| g.value()))
            };
            Ok(DeliveryCounts {
                dead_letters: get(DLQ_LEN)?,
                dead_lettered_total: get(DLQ_TOTAL)?,
                replay: get(REPLAY_LEN)?,
                windowed: get(WINDOW_LEN)?,
            })
        })
    }

    /// Held keys (`key_of`) of the target: those with dead letters.
    pub fn held_keys(&self, target: &str) -> Result<HashSet<String>, StoreError> {
        let name = dlq_keys_name(target);
        self.read(|txn| {
            let keys = match txn.open_table(by_key(&name)) {
                Ok(t) => t,
                Err(TableError::TableDoesNotExist(_)) => return Ok(HashSet::new()),
                Err(e) => return Err(e.into()),
            };
            let mut out = HashSet::new();
            for item in keys.iter()? {
                out.insert(item?.0.value().to_string());
            }
            Ok(out)
        })
    }

    /// Dead letters matching `filter`, in id order.
    pub fn dead_letters(
        &self,
        target: &str,
        filter: &DlqFilter,
    ) -> Result<Vec<DeadLetter>, StoreError> {
        let name = dlq_name(target);
        self.read(|txn| {
            let dlq = match txn.open_table(by_id(&name)) {
                Ok(t) => t,
                Err(TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
                Err(e) => return Err(e.into()),
            };
            let mut out = Vec::new();
            let iter = match filter.id {
                Some(id) => dlq.range(id..=id)?,
                None => dlq.range(0..)?,
            };
            for item in iter {
                let (_, v) = item?;
                let d: DeadLetter = unjson("dead letter", v.value())?;
                if filter.matches(&d) {
                    out.push(d);
                }
            }
            Ok(out)
        })
    }

    /// Up to `max` replay-queue entries, in order.
    pub fn read_replay(&self, target: &str, max: usize) -> Result<Vec<(u64, Event)>, StoreError> {
        let name = replay_name(target);
        self.read(|txn| {
            let replay = match txn.open_table(by_id(&name)) {
                Ok(t) => t,
                Err(TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
                Err(e) => return Err(e.into()),
            };
            let mut out = Vec::new();
            for item in replay.iter()?.take(max) {
                let (k, v) = item?;
                out.push((k.value(), unjson("replay entry", v.value())?));
            }
            Ok(out)
        })
    }

    /// The event of record (`entity`, `key`) waiting in the target's
    /// window buffer, if any.
    pub fn windowed_event(
        &self,
        target: &str,
        entity: &str,
        key: &str,
    ) -> Result<Option<Event>, StoreError> {
        let name = window_name(target);
        self.read(|txn| {
            let window = match txn.open_table(by_key(&name)) {
                Ok(t) => t,
                Err(TableError::TableDoesNotExist(_)) => return Ok(None),
                Err(e) => return Err(e.into()),
            };
            let k = format!("{entity}\0{key}");
            let event = match window.get(k.as_str())? {
                Some(g) => Some(unjson("window row", g.value())?),
                None => None,
            };
            Ok(event)
        })
    }

    /// The window buffer's events of `entities`, grouped by entity in key order.
    pub fn read_window(&self, target: &str, entities: &[&str]) -> Result<Vec<Event>, StoreError> {
        let name = window_name(target);
        self.read(|txn| {
            let window = match txn.open_table(by_key(&name)) {
                Ok(t) => t,
                Err(TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
                Err(e) => return Err(e.into()),
            };
            let mut out = Vec::new();
            for entity in entities {
                let (lo, hi) = (format!("{entity}\0"), format!("{entity}\u{1}"));
                for item in window.range(lo.as_str()..hi.as_str())? {
                    out.push(unjson("window row", item?.1.value())?);
                }
            }
            Ok(out)
        })
    }

    /// Sends the dead letters matching `filter` back for delivery, ahead of
    /// the outbox and in their original order. A selection always takes whole
    /// keys: every dead letter of a selected entry's key goes too, so the key's
    /// order is kept and the key is released. Returns how many moved.
    pub fn replay_dead_letters(&self, target: &str, filter: &DlqFilter) -> Result<u64, StoreError> {
        let selected = self.dead_letters(target, filter)?;
        let keys: HashSet<String> = selected.iter().map(|d| key_of(&d.event)).collect();
        if keys.is_empty() {
            return Ok(0);
        }
        let all = self.dead_letters(target, &DlqFilter::default())?;
        let moving: Vec<DeadLetter> = all
            .into_iter()
            .filter(|d| keys.contains(&key_of(&d.event)))
            .collect();
        let n = moving.len() as u64;
        self.write(Durability::Immediate, |txn| {
            let (dname, kname, rname) =
                (dlq_name(target), dlq_keys_name(target), replay_name(target));
            let mut dlq = txn.open_table(by_id(&dname))?;
            let mut held = txn.open_table(by_key(&kname))?;
            let mut replay = txn.open_table(by_id(&rname))?;
            let mut counters = Counters {
                table: txn.open_table(COUNTERS)?,
                target: target.to_string(),
            };
            let mut next = counters.get(REPLAY_NEXT)?.max(1);
            for d in &moving {
                dlq.remove(d.id)?;
                replay.insert(next, json(&d.event)?.as_slice())?;
                next += 1;
            }
            for k in &keys {
                held.remove(k.as_str())?;
            }
            counters.set(REPLAY_NEXT, next)?;
            counters.add(REPLAY_LEN, n as i64)?;
            counters.add(DLQ_LEN, -(n as i64))?;
            Ok(())
        })?;
        self.inner
            .lazy_commits
            .store(0, std::sync::atomic::Ordering::Relaxed);
        Ok(n)
    }

    /// Deletes exactly the dead letters matching `filter`. A key stays held
    /// while any of its dead letters remain. Returns how many were deleted.
    pub fn drop_dead_letters(&self, target: &str, filter: &DlqFilter) -> Result<u64, StoreError> {
        let selected = self.dead_letters(target, filter)?;
        if selected.is_empty() {
            return Ok(0);
        }
        let all = self.dead_letters(target, &DlqFilter::default())?;
        let dropped: HashSet<u64> = selected.iter().map(|d| d.id).collect();
        // What remains per affected key: first id and count.
        let mut remaining: BTreeMap<String, (u64, u64)> = selected
            .iter()
            .map(|d| (key_of(&d.event), (0, 0)))
            .collect();
        for d in &all {
            if dropped.contains(&d.id) {
                continue;
            }
            if let Some(r) = remaining.get_mut(&key_of(&d.event)) {
                if r.1 == 0 {
                    r.0 = d.id;
                }
                r.1 += 1;
            }
        }
        let n = dropped.len() as u64;
        self.write(Durability::Immediate, |txn| {
            let (dname, kname) = (dlq_name(target), dlq_keys_name(target));
            let mut dlq = txn.open_table(by_id(&dname))?;
            let mut held = txn.open_table(by_key(&kname))?;
            for id in &dropped {
                dlq.remove(*id)?;
            }
            for (k, (first, count)) in &remaining {
                if *count == 0 {
                    held.remove(k.as_str())?;
                } else {
                    held.insert(k.as_str(), encode_hold(*first, *count).as_slice())?;
                }
            }
            let mut counters = Counters {
                table: txn.open_table(COUNTERS)?,
                target: target.to_string(),
            };
            counters.add(DLQ_LEN, -(n as i64))?;
            Ok(())
        })?;
        self.inner
            .lazy_commits
            .store(0, std::sync::atomic::Ordering::Relaxed);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use steward_core::model::{EventOp, Lsn};

    /// Keeps the latest event per entity and key, in the order each key was
    /// last seen; a delete wins when it is the latest. (The window buffer does
    /// the same on the way in; this is for batches read in one go.)
    fn coalesce(events: Vec<Event>) -> Vec<Event> {
        let mut index: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
        let mut out: Vec<Option<Event>> = Vec::new();
        for e in events {
            let k = key_of(&e);
            if let Some(&i) = index.get(&k) {
                out[i] = None;
            }
            index.insert(k, out.len());
            out.push(Some(e));
        }
        out.into_iter().flatten().collect()
    }

    fn ev(n: u64, key: &str, op: EventOp) -> Event {
        Event {
            change: None,
            tx_id: None,
            id: Event::source_id(Lsn(n), 0),
            entity: "product".into(),
            key: key.into(),
            op,
            version: n,
            time: "2024-05-01T12:00:00.000Z".into(),
            data: serde_json::json!({ "n": n }).into(),
        }
    }

    fn failure(msg: &str) -> Option<Failure> {
        Some(Failure {
            message: msg.into(),
            attempts: 1,
            first_failure: now_rfc3339(),
            last_failure: now_rfc3339(),
        })
    }

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("s.redb")).unwrap();
        (dir, s)
    }

    #[test]
    fn coalescing_keeps_the_latest_per_key_and_deletes_win() {
        let events = vec![
            ev(1, "a", EventOp::Upsert),
            ev(2, "b", EventOp::Upsert),
            ev(3, "a", EventOp::Upsert),
            ev(4, "b", EventOp::Delete),
            ev(5, "c", EventOp::Upsert),
        ];
        let out = coalesce(events);
        let v: Vec<(String, u64, EventOp)> = out
            .iter()
            .map(|e| (e.key.clone(), e.version, e.op))
            .collect();
        assert_eq!(
            v,
            [
                ("a".into(), 3, EventOp::Upsert),
                ("b".into(), 4, EventOp::Delete),
                ("c".into(), 5, EventOp::Upsert)
            ]
        );
    }

    #[test]
    fn dead_letters_hold_their_key_and_replay_in_order() {
        let (_d, s) = store();
        let events: Vec<Event> = (1..6)
            .map(|n| ev(n, if n % 2 == 0 { "x" } else { "y" }, EventOp::Upsert))
            .collect();
        let appends: Vec<(&str, &Event)> = events.iter().map(|e| ("t", e)).collect();
        s.commit(Lsn(10), &appends).unwrap();
        // Event 2 (key x) is rejected; event 4 (key x) is parked behind it.
        let ids = s
            .settle(
                "t",
                &Settlement {
                    outbox_up_to: Some(5),
                    delivered: 3,
                    dead: vec![
                        NewDeadLetter {
                            event: events[1].clone(),
                            failure: failure("HTTP 422: bad sku"),
                        },
                        NewDeadLetter {
                            event: events[3].clone(),
                            failure: None,
                        },
                    ],
                    ..Settlement::default()
                },
            )
            .unwrap();
        assert_eq!(ids, [1, 2]);
        assert_eq!(s.backlog("t").unwrap(), 0);
        let counts = s.delivery_counts("t").unwrap();
        assert_eq!((counts.dead_letters, counts.dead_lettered_total), (2, 2));
        assert_eq!(
            s.held_keys("t").unwrap(),
            HashSet::from(["product\0x".to_string()])
        );
        let all = s.dead_letters("t", &DlqFilter::default()).unwrap();
        assert_eq!(all[0].error, "HTTP 422: bad sku");
        assert_eq!(all[1].held_behind, Some(1));
        assert_eq!(all[1].error, "held behind 1");
        assert_eq!(s.target_stats("t").unwrap().delivered_total, 3);

        // Replay by id takes the whole key, in order, and releases it.
        let n = s
            .replay_dead_letters(
                "t",
                &DlqFilter {
                    id: Some(1),
                    ..Default::default()
                },
            )
            .unwrap();
        assert_eq!(n, 2);
        assert!(s.held_keys("t").unwrap().is_empty());
        let replay = s.read_replay("t", 10).unwrap();
        assert_eq!(
            replay.iter().map(|(_, e)| e.version).collect::<Vec<_>>(),
            [2, 4]
        );
        let counts = s.delivery_counts("t").unwrap();
        assert_eq!((counts.dead_letters, counts.replay), (0, 2));
        s.settle(
            "t",
            &Settlement {
                replay_up_to: Some(replay[1].0),
                delivered: 2,
                ..Default::default()
            },
        )
        .unwrap();
        assert!(s.read_replay("t", 10).unwrap().is_empty());
        assert_eq!(s.delivery_counts("t").unwrap().replay, 0);
    }

    #[test]
    fn dropping_the_first_dead_letter_keeps_the_key_held_by_the_rest() {
        let (_d, s) = store();
        let dead = vec![
            NewDeadLetter {
                event: ev(1, "x", EventOp::Upsert),
                failure: failure("HTTP 400"),
            },
            NewDeadLetter {
                event: ev(2, "x", EventOp::Upsert),
                failure: None,
            },
            NewDeadLetter {
                event: ev(3, "z", EventOp::Delete),
                failure: failure("HTTP 409"),
            },
        ];
        s.settle(
            "t",
            &Settlement {
                dead,
                ..Default::default()
            },
        )
        .unwrap();
        let filter = DlqFilter {
            key: Some("x".into()),
            ..Default::default()
        };
        assert_eq!(s.dead_letters("t", &filter).unwrap().len(), 2);
        assert_eq!(
            s.drop_dead_letters(
                "t",
                &DlqFilter {
                    id: Some(1),
                    ..Default::default()
                }
            )
            .unwrap(),
            1
        );
        assert!(s.held_keys("t").unwrap().contains("product\0x"));
        assert_eq!(s.delivery_counts("t").unwrap().dead_letters, 2);
        // A new event of key x is held behind the remaining entry (id 2).
        let ids = s
            .settle(
                "t",
                &Settlement {
                    dead: vec![NewDeadLetter {
                        event: ev(4, "x", EventOp::Upsert),
                        failure: None,
                    }],
                    ..Default::default()
                },
            )
            .unwrap();
        let d = s
            .dead_letters(
                "t",
                &DlqFilter {
                    id: Some(ids[0]),
                    ..Default::default()
                },
            )
            .unwrap();
        assert_eq!(d[0].held_behind, Some(2));
        assert_eq!(s.drop_dead_letters("t", &DlqFilter::default()).unwrap(), 3);
        assert!(s.held_keys("t").unwrap().is_empty());
        assert_eq!(s.delivery_counts("t").unwrap().dead_letters, 0);
        assert_eq!(s.drop_dead_letters("t", &DlqFilter::default()).unwrap(), 0);
    }

    #[test]
    fn the_window_buffer_coalesces_and_removes_only_what_was_delivered() {
        let (_d, s) = store();
        let windowed = vec![
            ev(1, "a", EventOp::Upsert),
            ev(2, "a", EventOp::Upsert),
            ev(3, "b", EventOp::Upsert),
            ev(4, "b", EventOp::Delete),
        ];
        s.settle(
            "t",
            &Settlement {
                windowed,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(s.delivery_counts("t").unwrap().windowed, 2);
        let w = s.read_window("t", &["product"]).unwrap();
        assert_eq!(w.iter().map(|e| e.version).collect::<Vec<_>>(), [2, 4]);
        assert!(s.read_window("t", &["partner"]).unwrap().is_empty());
        // Key a changes again before the delivery of version 2 is settled: it stays.
        let done: Vec<(String, String)> = w.iter().map(|e| (key_of(e), e.id.clone())).collect();
        s.settle(
            "t",
            &Settlement {
                windowed: vec![ev(5, "a", EventOp::Upsert)],
                ..Default::default()
            },
        )
        .unwrap();
        s.settle(
            "t",
            &Settlement {
                window_done: done,
                delivered: 2,
                ..Default::default()
            },
        )
        .unwrap();
        let w = s.read_window("t", &["product"]).unwrap();
        assert_eq!(w.iter().map(|e| e.version).collect::<Vec<_>>(), [5]);
        assert_eq!(s.delivery_counts("t").unwrap().windowed, 1);
    }
}
