//! The control API's request and response bodies, shared by the daemon
//! (`server`) and the command line (`cli::client`).

use serde::{Deserialize, Serialize};

use crate::daemon::schema::StoppedEntity;
use crate::daemon::snapshot::SnapshotStatusLine;
use steward_core::pipeline::govern::{EntityRecords, HeldBack, RecordStatus};
use steward_store::governance::{AuditRecord, QuarantineEntry};
use steward_store::{DeadLetter, DlqFilter, TargetStats};

/// `GET /v1`: which API and which daemon answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Version {
    /// The API version, e.g. `v1`.
    pub api: String,
    /// The daemon's version (its Cargo package version).
    pub daemon: String,
    pub pid: u32,
}

/// Every error: `{"error": {"code": "...", "message": "..."}}`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// Stable, for programs: `not_found`, `bad_request`, `not_quarantined`, ...
    pub code: String,
    /// For people.
    pub message: String,
}

/// `GET /v1/status`: the daemon's view of itself and its targets.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Status {
    pub pid: u32,
    /// The daemon has not opened the state file yet (or is reloading its
    /// configuration): the other figures are empty.
    pub starting: bool,
    pub source_connected: bool,
    /// The durable checkpoint; `None` while starting.
    pub durable_lsn: Option<String>,
    pub last_source_error: Option<String>,
    pub store_bytes: u64,
    pub targets: Vec<TargetStatusLine>,
    /// Snapshot and resync progress per target and entity.
    pub snapshots: Vec<SnapshotStatusLine>,
    /// Entities a schema change stopped (see `daemon::schema`).
    pub stopped_entities: Vec<StoppedEntity>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TargetStatusLine {
    pub name: String,
    pub backlog: u64,
    /// The target's cursor: the last outbox sequence number appended (0 if
    /// none yet) and the last one delivered. Together with the checkpoint
    /// they tell an operator where each target stands after a crash.
    pub last_appended_seq: u64,
    pub last_delivered_seq: Option<u64>,
    pub delivered_total: u64,
    pub last_delivered_at: Option<String>,
    pub last_error: Option<String>,
    /// Events in the target's dead-letter queue (`steward dlq list`).
    pub dead_letters: u64,
}

impl TargetStatusLine {
    pub fn new(name: &str, stats: TargetStats) -> TargetStatusLine {
        TargetStatusLine {
            name: name.to_string(),
            backlog: stats.backlog,
            last_appended_seq: stats.last_appended_seq,
            last_delivered_seq: stats.last_delivered_seq,
            delivered_total: stats.delivered_total,
            last_delivered_at: stats.last_delivered_at,
            last_error: stats.last_error,
            dead_letters: stats.dead_letters,
        }
    }
}

/// `GET /v1/snapshots`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Snapshots {
    pub snapshots: Vec<SnapshotStatusLine>,
}

/// `GET /v1/quarantine`, `GET /v1/quarantine/{entity}/{key}`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct QuarantineList {
    pub quarantine: Vec<QuarantineEntry>,
}

/// The optional body of an action: why, in the person's words (stored
/// with the audit record).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Action {
    #[serde(default)]
    pub comment: Option<String>,
}

/// `POST /v1/quarantine/{entity}/{key}/release`: the record passed every rule.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Released {
    pub message: String,
    /// Events queued for delivery.
    pub events: usize,
}

/// `GET /v1/audit`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AuditList {
    pub audit: Vec<AuditRecord>,
}

/// `POST /v1/backup`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupRequest {
    /// Absolute path, written by the daemon's user.
    pub dest: std::path::PathBuf,
    #[serde(default)]
    pub force: bool,
    #[serde(default)]
    pub comment: Option<String>,
}

/// `POST /v1/targets/{target}/reset`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResetRequest {
    /// Empty: every entity the target receives.
    #[serde(default)]
    pub entities: Vec<String>,
    #[serde(default)]
    pub comment: Option<String>,
}

/// The answer to a reset: what is being resynchronised.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ResetStarted {
    pub target: String,
    pub entities: Vec<String>,
}

/// `GET /v1/targets/{target}/dead-letters`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DeadLetters {
    pub dead_letters: Vec<DeadLetter>,
}

/// `POST /v1/targets/{target}/dead-letters/replay` and `.../drop`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DlqAction {
    /// Which dead letters; empty: all of the target's (a drop then needs `all`).
    #[serde(default)]
    pub filter: DlqFilter,
    /// A drop without a filter: confirms that every dead letter goes.
    #[serde(default)]
    pub all: bool,
    #[serde(default)]
    pub comment: Option<String>,
}

/// The answer to a replay or a drop.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Count {
    pub count: u64,
}

/// The console's overview: per entity the records in each state, and what
/// the open exceptions hold back.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Overview {
    /// Per target, how long its oldest undelivered event has waited.
    pub lag: Vec<TargetLag>,
    pub entities: Vec<EntityLine>,
    pub held_back: Vec<HeldBackLine>,
}

/// One entity's records per state.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EntityLine {
    #[serde(flatten)]
    pub records: EntityRecords,
    /// Records with a dead letter at one target or more.
    pub dead_lettered: u64,
}

/// Records blocked by others, as figures and as a sentence ("3 bom
/// records blocked by 1 quarantined product").
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HeldBackLine {
    #[serde(flatten)]
    pub held: HeldBack,
    pub text: String,
}

/// How far behind a target is.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TargetLag {
    pub target: String,
    /// The age of its oldest undelivered event; `None` when it has none.
    pub oldest_undelivered_seconds: Option<u64>,
}

/// `POST /v1/targets/{target}/reconcile`; answered with [`ResetStarted`].
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReconcileRequest {
    /// Empty: every entity the target receives.
    #[serde(default)]
    pub entities: Vec<String>,
    /// Only count what differs; send and change nothing.
    #[serde(default)]
    pub dry_run: bool,
    /// Compare with the rows the target actually holds (PostgreSQL targets).
    #[serde(default)]
    pub deep: bool,
    #[serde(default)]
    pub comment: Option<String>,
}

/// `GET /v1/record/{entity}/{key}`: everything steward knows about one
/// record. The governance's view (state, row as last read, gate,
/// quarantine entry, per target decision and document, blocked_by, blocks,
/// dependents) is flattened in; the rest comes from the state file and,
/// for `source`, from the database.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Record {
    #[serde(flatten)]
    pub status: RecordStatus,
    /// Whether steward knows anything of the record: a row, a decision, a
    /// quarantine entry, a dead letter or an audit record. An unknown key is
    /// no error: the answer says so here and in `note`.
    pub known: bool,
    /// For people: what the answer rests on when it is not the whole story.
    pub note: Option<String>,
    /// The record's source row, only the columns steward maps.
    pub source: SourceRow,
    /// Per target taking the entity: what was appended and acknowledged,
    /// and the record's dead letters.
    pub delivery: Vec<TargetDelivery>,
    /// The record's audit trail, newest first, at most [`Record::AUDIT_SHOWN`].
    pub audit: Vec<AuditRecord>,
    /// There are older audit records than those shown.
    pub audit_more: bool,
}

impl Record {
    pub const AUDIT_SHOWN: usize = 50;
}

/// Where the source row shown comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RowOrigin {
    /// Read from the database for this answer.
    Live,
    /// steward's copy, as it last read the row (the live read failed, or
    /// was not made).
    LastRead,
    /// Neither: no such row in the database and none in steward's state.
    None,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SourceRow {
    pub origin: RowOrigin,
    /// The mapped columns, converted as streamed values are.
    pub row: Option<serde_json::Value>,
    /// Why the row could not be read live (then `origin` is `last_read`).
    pub live_error: Option<String>,
    /// Read live: the mapped columns whose values differ from steward's
    /// copy (the change is on its way, or steward missed it). `None` when
    /// there is nothing to compare.
    pub differs_from_last_read: Option<Vec<String>>,
}

/// What became of the record's events at one target.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TargetDelivery {
    pub target: String,
    /// The last event appended to the target's outbox, and where it is.
    pub last_appended: Option<Appended>,
    /// The last event the target acknowledged (the last appended one, or
    /// an earlier one while that one is on its way or dead-lettered).
    pub last_acknowledged: Option<Appended>,
    /// The record's dead letters at this target.
    pub dead_letters: Vec<DeadLetterLine>,
}

/// One event of the record appended for a target.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Appended {
    /// The commit LSN of the change (the event's `version`).
    pub version: u64,
    /// The decision that appended it: `delivered` (upsert or delete) or
    /// `unpublished`, and its detail.
    pub decision: String,
    pub detail: String,
    /// When steward decided it, RFC 3339.
    pub appended_at: String,
    /// Its place in the target's outbox (`None` for events appended before
    /// steward noted it).
    pub seq: Option<u64>,
    pub state: DeliveryState,
    /// When the target acknowledged it (RFC 3339, to the second), for
    /// `acknowledged`.
    pub acknowledged_at: Option<String>,
    /// Acknowledged no later than this, when the exact time is no longer
    /// kept (see docs/control-api.md).
    pub acknowledged_before: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryState {
    /// The target acknowledged it.
    Acknowledged,
    /// Waiting in the outbox (the target has not acknowledged it yet).
    Pending,
    /// Given up on: in the dead-letter queue.
    DeadLettered,
    /// Parked in the target's batch window until it opens.
    InWindow,
    /// Not known (appended before steward noted outbox positions).
    Unknown,
    /// Never delivered as such: a reset of the target dropped it from the
    /// outbox (the snapshot sends the record again) or appended it again.
    Superseded,
}

/// A dead letter of the record.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DeadLetterLine {
    pub id: u64,
    pub version: u64,
    pub error: String,
    pub held_behind: Option<u64>,
    pub attempts: u32,
    pub last_failure: String,
}
