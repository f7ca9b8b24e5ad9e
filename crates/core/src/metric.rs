//! Names of the metrics steward exports, and their histogram buckets.

/// Server WAL position minus the slot's confirmed flush position, in bytes.
pub const SOURCE_LAG_BYTES: &str = "steward_source_lag_bytes";
/// Age of the oldest received but not yet confirmed commit; 0 when caught up.
pub const SOURCE_LAG_SECONDS: &str = "steward_source_lag_seconds";
/// 1 while the replication connection streams, else 0.
pub const SOURCE_CONNECTED: &str = "steward_source_connected";
/// Label `status`: one series per `pg_replication_slots.wal_status` value, 1 for the current one.
pub const SLOT_WAL_STATUS: &str = "steward_slot_wal_status";
/// `pg_replication_slots.safe_wal_size`: WAL that may still be written before the slot risks loss.
pub const SLOT_SAFE_WAL_SIZE_BYTES: &str = "steward_slot_safe_wal_size_bytes";
/// Label `entity`: events mapped from received row changes.
pub const EVENTS_RECEIVED: &str = "steward_events_received_total";
/// Label `entity`: events dropped before any outbox (no target takes the entity, or a gate skipped it).
pub const EVENTS_FILTERED: &str = "steward_events_filtered_total";
/// Label `entity`: row changes skipped because a key column is NULL or not UTF-8.
pub const RECORDS_UNKEYED: &str = "steward_records_unkeyed_total";
/// Events written to outboxes (one per target an event goes to).
pub const EVENTS_STORED: &str = "steward_events_stored_total";
/// Label `target`.
pub const EVENTS_DELIVERED: &str = "steward_events_delivered_total";
/// Label `target`: failed delivery attempts.
pub const DELIVERY_FAILURES: &str = "steward_delivery_failures_total";
/// Label `target`: events waiting in the outbox.
pub const TARGET_BACKLOG: &str = "steward_target_backlog_events";
/// Label `target`: age of the oldest event in the outbox (commit time → now); 0 when empty.
pub const TARGET_OLDEST_UNDELIVERED_SECONDS: &str = "steward_target_oldest_undelivered_seconds";
/// Label `target`: commit → acknowledged by the target.
pub const DELIVERY_LATENCY_SECONDS: &str = "steward_delivery_latency_seconds";
/// Size of the redb state file.
pub const STORE_BYTES: &str = "steward_store_bytes";
/// Duration of one group commit to the store.
pub const STORE_COMMIT_SECONDS: &str = "steward_store_commit_seconds";
/// The last LSN made durable in the store.
pub const DURABLE_LSN: &str = "steward_durable_lsn";
/// Label `version`: always 1.
pub const BUILD_INFO: &str = "steward_build_info";
/// Label `target`: events parked in the dead-letter queue (recorded by the DLQ when present).
pub const DEAD_LETTER_EVENTS: &str = "steward_dead_letter_events";
/// Label `entity`: records held in quarantine, one series per configured entity.
pub const QUARANTINED_RECORDS: &str = "steward_quarantined_records";
/// Labels `entity`, `state`: records of each governed entity per state now
/// (published, pending_approval, quarantined, blocked: each record in one;
/// dead_lettered: records with a dead letter at some target).
pub const RECORDS: &str = "steward_records";
/// Label `target`: events moved to the dead-letter queue.
pub const DEAD_LETTERS: &str = "steward_dead_letters_total";
/// Label `target`: delivery attempts retried after a failure.
pub const DELIVERY_RETRIES: &str = "steward_delivery_retries_total";
/// Label `target`: seconds spent waiting for the target's rate limit (whole seconds).
pub const THROTTLED_SECONDS: &str = "steward_throttled_seconds_total";
/// Label `target`: rows of initial snapshots / resyncs appended to the target's outbox.
pub const SNAPSHOT_ROWS: &str = "steward_snapshot_rows_total";
/// Labels `target`, `entity`, `result` = `checked` | `equal` | `resent` | `deleted`:
/// records compared, found as they should be, sent again, deleted by reconciliations;
/// deep ones also `changed` | `missing` | `extra` | `unrepairable`: rows found
/// differing, missing, extra at the target, and those its version guard refuses.
pub const RECONCILE_RECORDS: &str = "steward_reconcile_records_total";
/// Labels `target`, `entity`: Unix time the last reconciliation (not a dry run) completed.
pub const RECONCILE_LAST_COMPLETED: &str = "steward_reconcile_last_completed_timestamp_seconds";
/// Labels `target`, `entity`: records the last completed reconciliation re-sent or
/// deleted (or, deep, found unrepairable).
pub const RECONCILE_LAST_DRIFT: &str = "steward_reconcile_last_drift_records";
/// Labels `target`, `entity`: the scheduled reconciliation's interval in seconds
/// (a day for `at`), for the alert on a run that has not completed in time.
pub const RECONCILE_INTERVAL: &str = "steward_reconcile_interval_seconds";
/// Label `entity`: 1 while a schema change stops the entity (its table lacks a mapped column), else 0.
pub const ENTITY_STOPPED: &str = "steward_entity_stopped";
/// Completed configuration reloads (SIGHUP), label `result` = `applied` | `rejected`.
pub const CONFIG_RELOADS: &str = "steward_config_reloads_total";

/// Commit → ack latency buckets: 5 ms (same machine) up to a minute (a retry or two).
pub const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
/// Group commit durations: a fsync is ~1 ms on SSDs, a huge commit ~1 s.
pub const COMMIT_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];
