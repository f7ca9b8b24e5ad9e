//! Start-up checks against the source: wal_level, publication, slot, and
//! that the state file belongs to this database; which targets need an
//! initial snapshot (see `daemon::snapshot`), and `steward reset --all`
//! (drop and recreate the slot) when one was recorded.

use anyhow::{bail, Context};

use steward_core::config::{Config, InitialSync};
use steward_core::model::Lsn;
use steward_core::pipeline::Pipeline;
use steward_postgres::{self, ReplicationClient, SnapshotAction};
use steward_source::slot;
use steward_source::snapshot::{self as source_snapshot, SnapshotReader};
use steward_store::backup::{BackupMark, BACKUP_META};
use steward_store::governance::{AuditRecord, GovDelta, GovOp};
use steward_store::{GovernanceState, Store};

pub(super) struct Prepared {
    /// The lowest LSN a session may start from.
    pub start_floor: Lsn,
    /// The snapshot exported by the slot created just now, imported.
    pub initial_snapshot: Option<SnapshotReader>,
}

/// Meta key: `steward reset --all` was recorded while the daemon was stopped.
pub const RESET_ALL_META: &str = "reset_all";
/// Meta key prefix: the entities a target was last configured with.
const SEEN_META: &str = "snapshot.seen:";
/// Meta key: this state file tracks which targets were initialised.
const TRACKING_META: &str = "snapshot.tracking";
/// Meta key: the governance state of a restored backup is still to be read
/// again from the tables (see `govern::seed_state`); holds the slot's
/// confirmed position at the restore, the version of the deletes it sends.
/// Empty once done.
pub(super) const RESTORE_REPAIR_META: &str = "restore.repair";
/// Meta key: the server's timeline when steward last started streaming. A
/// newer timeline on a server without the slot means a promoted standby.
pub(super) const TIMELINE_META: &str = "timeline";

/// The refusal when steward had streamed up to `checkpoint` but its slot is
/// not on the server it reached. `timeline` is the server's now,
/// `streamed_on` the one steward last streamed on (unknown for state files
/// from before it was recorded; a timeline above 1 is then taken as a sign).
pub(super) fn missing_slot_refusal(
    slot: &str,
    checkpoint: Lsn,
    timeline: u32,
    streamed_on: Option<u32>,
    state_path: &std::path::Path,
) -> String {
    let fix = format!(
        "Stop steward, run `steward repair -c FILE` (recreates the slot on this server and sends \
         each target only the records that differ) or `steward reset --all -c FILE` (recreates the \
         slot and sends every target a fresh snapshot), then start it; or move the state file {} \
         aside and start steward (targets then receive only changes from the new slot onward)",
        state_path.display()
    );
    let promoted = match streamed_on {
        Some(before) => timeline > before,
        None => timeline > 1,
    };
    if promoted {
        let since = streamed_on.map_or_else(
            || "steward has no record of the timeline it streamed on".to_string(),
            |t| format!("steward last streamed on timeline {t}"),
        );
        format!(
            "the replication slot '{slot}' is gone: it does not exist on this server, which is on \
             timeline {timeline} ({since}), so the server is a promoted standby (a failover \
             happened) or was restored from a backup. Replication slots are not copied to standbys \
             unless they are failover slots (PostgreSQL 17 and later), so the slot stayed on the \
             old primary, and the changes since steward's checkpoint {checkpoint} cannot be \
             streamed from here. {fix}"
        )
    } else {
        format!(
            "the replication slot '{slot}' no longer exists, but steward had streamed up to \
             {checkpoint}: changes made since then may never reach the targets. Someone dropped \
             the slot, or the server was rebuilt. {fix}"
        )
    }
}

/// The timeline steward last streamed on, if recorded.
fn streamed_timeline(store: &Store) -> anyhow::Result<Option<u32>> {
    Ok(store
        .get_meta(TIMELINE_META)?
        .and_then(|t| t.parse::<u32>().ok()))
}

/// What to say when a running session finds its slot gone: after a
/// reconnect to a promoted standby (an address that moved), the failover
/// refusal; otherwise `dropped` (someone dropped the slot).
pub(super) async fn explain_slot_dropped(
    source: &steward_core::config::SourceConfig,
    store: &Store,
    checkpoint: Lsn,
    dropped: anyhow::Error,
) -> anyhow::Error {
    let Ok(mut client) = ReplicationClient::connect(source).await else {
        return dropped;
    };
    let Ok(identity) = client.identify_system().await else {
        return dropped;
    };
    let streamed_on = streamed_timeline(store).ok().flatten();
    match streamed_on {
        Some(before) if identity.timeline > before => anyhow::anyhow!(missing_slot_refusal(
            &source.slot,
            checkpoint,
            identity.timeline,
            streamed_on,
            store.path(),
        )),
        _ => dropped,
    }
}

pub(super) async fn prepare(
    config: &Config,
    store: &Store,
    pipeline: &Pipeline,
) -> anyhow::Result<Prepared> {
    let source = &config.source;
    let sql = steward_postgres::connect_sql(source)
        .await
        .with_context(|| format!("cannot connect to the source {}", source.url_display))?;
    slot::check_wal_level(&sql).await?;
    let standby = slot::in_recovery(&sql).await?;
    let tables = pipeline.tables();
    super::privileges::check(&sql, source, &tables).await?;
    // A standby is read-only: the publication comes from the primary.
    slot::ensure_publication(
        &sql,
        &source.publication,
        &tables,
        source.create_publication && !standby,
    )
    .await
    .map_err(|e| {
        let e = anyhow::Error::from(e);
        if standby {
            e.context(
                "the source is a standby, which cannot create or change a publication: \
                 run the statement on the primary (it reaches the standby by replication)",
            )
        } else {
            e
        }
    })?;
    for warning in slot::replica_identity_report(&sql, &tables).await? {
        tracing::warn!("{warning}");
    }
    super::toast::startup_report(&sql, config, &tables)
        .await
        .context("cannot read which mapped columns can be TOASTed")?;
    super::schema::recover_at_startup(&sql, config, store).await?;

    let mut replication = ReplicationClient::connect(source).await.with_context(|| {
        format!(
            "cannot open a replication connection to {}",
            source.url_display
        )
    })?;
    let identity = replication.identify_system().await?;
    check_high_availability(config, &sql, &replication, standby).await?;
    let database = identity
        .dbname
        .clone()
        .unwrap_or_else(|| source.dbname.clone());
    let expected = [
        ("system_id", identity.systemid.clone()),
        ("database", database.clone()),
        ("slot", source.slot.clone()),
    ];
    for (key, value) in &expected {
        match store.get_meta(key)? {
            Some(stored) if &stored != value => bail!(
                "the state file {} was written for {key} '{stored}', but the source now has '{value}'. \
                 Point state.path at a new file to start over for this source, or restore the original source",
                store.path().display()
            ),
            Some(_) => {}
            None => store.set_meta(key, value)?,
        }
    }

    let reset_all = store.get_meta(RESET_ALL_META)?.as_deref() == Some("1");
    if reset_all {
        if let Some(info) = slot::slot_info(&sql, &source.slot).await? {
            if info.active {
                bail!(
                    "steward repair or reset --all must recreate the replication slot '{}', but it is in use (pid {:?}); \
                     stop the other steward (or client) using it and start again",
                    source.slot,
                    info.active_pid
                );
            }
            sql.execute("SELECT pg_drop_replication_slot($1)", &[&source.slot])
                .await
                .with_context(|| {
                    format!(
                        "cannot drop the replication slot '{}' to recreate it (repair or reset --all)",
                        source.slot
                    )
                })?;
            tracing::warn!(slot = %source.slot, "repair or reset --all: dropped the replication slot to recreate it");
        }
        store.force_checkpoint(Lsn::ZERO)?;
    }
    let new_jobs = plan_initial_snapshots(config, store)?;
    plan_reevaluations(config, store)?;

    // A checkpoint of 0/0 means only snapshot rows were ever stored.
    let checkpoint = store.checkpoint()?.filter(|c| *c > Lsn::ZERO);
    let mut initial_snapshot = None;
    match slot::slot_info(&sql, &source.slot).await? {
        Some(info) => {
            if info.invalidation_reason.is_some() || info.wal_status.as_deref() == Some("lost") {
                bail!(
                    "{}",
                    crate::daemon::snapshot::slot_advice(
                        Some(true),
                        info.wal_status.as_deref(),
                        info.invalidation_reason.as_deref(),
                        &source.slot
                    )
                    .unwrap_or_default()
                );
            }
            slot::check_slot_compatible(&info, &database)?;
            if let Some(advice) = crate::daemon::snapshot::slot_advice(
                Some(true),
                info.wal_status.as_deref(),
                None,
                &source.slot,
            ) {
                tracing::warn!("{advice}");
            }
            tracing::info!(
                slot = %source.slot,
                confirmed_flush = ?info.confirmed_flush_lsn.map(|l| l.to_string()),
                "using existing replication slot"
            );
            if source.failover && info.failover != Some(true) {
                // The slot is not in use (a session using it would hold it
                // and steward's own session has not started).
                replication
                    .set_slot_failover(&source.slot, true)
                    .await
                    .with_context(|| {
                        format!(
                            "source.failover = true, but the existing slot '{}' is not a failover \
                             slot and cannot be made one; run \
                             ALTER_REPLICATION_SLOT {} (FAILOVER true) on a replication \
                             connection (psql \"dbname=... replication=database\") while no \
                             one uses the slot",
                            source.slot, source.slot
                        )
                    })?;
                tracing::warn!(
                    slot = %source.slot,
                    "source.failover = true: the existing slot was not a failover slot; made it \
                     one (ALTER_REPLICATION_SLOT ... (FAILOVER true)), so standbys with \
                     sync_replication_slots = on now synchronise it"
                );
            }
            if !reset_all {
                plan_restore_repair(config, store, info.confirmed_flush_lsn)?;
            }
        }
        None => {
            if let Some(checkpoint) = checkpoint {
                let streamed_on = streamed_timeline(store)?;
                bail!(
                    "{}",
                    missing_slot_refusal(
                        &source.slot,
                        checkpoint,
                        identity.timeline,
                        streamed_on,
                        store.path()
                    )
                );
            }
            let pending = store
                .snapshot_jobs()?
                .iter()
                .any(|j| j.phase != steward_store::SnapshotPhase::Done);
            let action = if pending {
                SnapshotAction::Export
            } else {
                SnapshotAction::NoExport
            };
            if standby {
                tracing::info!(
                    slot = %source.slot,
                    "creating the slot on a standby: this waits for the primary to log its \
                     running transactions (every 15 s while it is busy; \
                     SELECT pg_log_standby_snapshot() on the primary makes it now)"
                );
            }
            let nudge = standby.then(|| spawn_standby_snapshot_nudge(source));
            let created = replication
                .create_logical_slot(&source.slot, action, source.failover)
                .await;
            if let Some(nudge) = nudge {
                nudge.abort();
            }
            let created = created?;
            tracing::info!(slot = %source.slot, consistent_point = %created.consistent_point, "created replication slot");
            if let Some(name) = &created.snapshot_name {
                // The replication connection must stay open until this import.
                initial_snapshot = Some(
                    source_snapshot::import(source, name, created.consistent_point)
                        .await
                        .context("cannot import the snapshot exported by the new slot")?,
                );
            }
        }
    }
    drop(replication);
    store.set_meta(TIMELINE_META, &identity.timeline.to_string())?;
    // Planned (or not needed): the mark has done its work.
    if store.get_meta(BACKUP_META)?.is_some_and(|m| !m.is_empty()) {
        store.set_meta(BACKUP_META, "")?;
    }
    if reset_all {
        store.set_meta(RESET_ALL_META, "0")?;
    }
    if new_jobs > 0 {
        tracing::info!(
            jobs = new_jobs,
            "initial snapshots planned for new targets and entities"
        );
    }
    Ok(Prepared {
        // A slot created just now starts at its consistent point: nothing
        // before it is ever streamed, so the stream is "at" it from the start.
        start_floor: initial_snapshot
            .as_ref()
            .map_or(Lsn::ZERO, |r: &SnapshotReader| r.consistent),
        initial_snapshot,
    })
}

/// Refuses what a failover slot or decoding from a standby cannot do on
/// this server or where a failover could lose or skip changes, and warns
/// where a standby could lose its slot.
async fn check_high_availability(
    config: &Config,
    sql: &tokio_postgres::Client,
    replication: &ReplicationClient,
    standby: bool,
) -> anyhow::Result<()> {
    let source = &config.source;
    let version = replication.server_version_num();
    if standby {
        if version < 160_000 {
            bail!(
                "the source {} is a standby (in recovery), and logical decoding on a standby \
                 needs PostgreSQL 16 or later (it runs {}.{}); point source.url at the primary",
                source.url_display,
                version / 10000,
                version % 10000
            );
        }
        if source.failover {
            bail!(
                "source.failover = true, but the source {} is a standby: a failover slot is \
                 created on the primary (standbys synchronise it); point source.url at the \
                 primary (with target_session_attrs=read-write) or set source.failover = false",
                source.url_display
            );
        }
        let feedback = slot::setting(sql, "hot_standby_feedback").await?;
        if feedback.as_deref() != Some("on") {
            tracing::warn!(
                "the source is a standby with hot_standby_feedback = off: the primary may remove \
                 catalog rows the slot still needs, which invalidates it (a repair then); set \
                 hot_standby_feedback = on on the standby (and use a physical slot, primary_slot_name)"
            );
        }
        tracing::info!(
            "the source is a standby: decoding from it; heartbeats, if configured, go to \
             source.heartbeat_url"
        );
    }
    if source.failover {
        if version < 170_000 {
            bail!(
                "source.failover = true needs PostgreSQL 17 or later (failover slots), but the \
                 source runs {}.{}; set source.failover = false, or upgrade the server",
                version / 10000,
                version % 10000
            );
        }
        // Without it the primary sends steward changes no standby has yet;
        // after a failover the new primary reuses those positions for other
        // changes, which steward would then skip as already received.
        let waits_for = slot::setting(sql, "synchronized_standby_slots").await?;
        if waits_for.as_deref().unwrap_or("").is_empty() {
            bail!(
                "source.failover = true but synchronized_standby_slots is empty on the primary: \
                 steward could receive changes a standby does not have yet, and after a failover \
                 to that standby it would skip the new primary's changes at those positions; set \
                 synchronized_standby_slots to the standbys' physical slots (see `steward \
                 setup-sql`), or set source.failover = false"
            );
        }
    }
    Ok(())
}

/// Creating a slot on a standby waits for a running-transactions record
/// from the primary; with `source.heartbeat_url` set, steward asks the
/// primary to log one now and again until the slot exists (needs the
/// right to run `pg_log_standby_snapshot()`; without it the slot comes once
/// the primary logs one by itself).
fn spawn_standby_snapshot_nudge(
    source: &steward_postgres::SourceConfig,
) -> tokio::task::JoinHandle<()> {
    let primary = source.heartbeat_via.clone();
    tokio::spawn(async move {
        let Some(primary) = primary else {
            return;
        };
        let mut client = None;
        loop {
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            if client.is_none() {
                match steward_postgres::connect_sql(&primary).await {
                    Ok(c) => client = Some(c),
                    Err(e) => {
                        tracing::debug!(error = %e, "cannot reach source.heartbeat_url to log a standby snapshot");
                        continue;
                    }
                }
            }
            if let Some(c) = &client {
                if let Err(e) = c.execute("SELECT pg_log_standby_snapshot()", &[]).await {
                    tracing::debug!(error = %steward_postgres::describe_pg_error(&e), "pg_log_standby_snapshot() on the primary failed");
                    return;
                }
            }
            tokio::time::sleep(std::time::Duration::from_secs(2)).await;
        }
    })
}

/// A state file restored from a backup (`steward backup` marks its copies)
/// whose checkpoint is behind the slot's confirmed position: the server
/// never sends again what it confirmed, so the changes in between, and the
/// deliveries of them, are unknown to this state. The targets are repaired
/// from the tables: every tracked table is read again into the governance
/// state, records gone from it are governed as deleted
/// (`govern::seed_state`), and every target gets a governed snapshot of
/// every entity it receives.
fn plan_restore_repair(
    config: &Config,
    store: &Store,
    confirmed: Option<Lsn>,
) -> anyhow::Result<()> {
    let Some(mark) = store.get_meta(BACKUP_META)?.filter(|m| !m.is_empty()) else {
        return Ok(());
    };
    let mark: Option<BackupMark> = serde_json::from_str(&mark).ok();
    let taken_at = mark
        .as_ref()
        .map_or("an unknown time", |m| m.taken_at.as_str());
    let checkpoint = store.checkpoint()?.unwrap_or(Lsn::ZERO);
    let Some(confirmed) = confirmed.filter(|c| *c > checkpoint) else {
        tracing::info!(
            taken_at,
            checkpoint = %checkpoint,
            "the state file is a restored backup and the slot has not moved past it: nothing to repair"
        );
        return Ok(());
    };
    tracing::warn!(
        taken_at,
        checkpoint = %checkpoint,
        slot = %config.source.slot,
        confirmed_flush = %confirmed,
        "the state file is older than the replication slot (a restored backup): the changes in \
         between cannot be streamed again; every record is read again from the database and sent \
         to every target (governed), and records deleted meanwhile are deleted on the targets"
    );
    let now = chrono::Utc::now().timestamp_micros();
    let mut delta = GovDelta::default();
    for target in &config.targets {
        store.begin_restore_repair(&target.name, &target.entities)?;
        for entity in &target.entities {
            delta.ops.push(GovOp::Audit(AuditRecord {
                time_micros: now,
                entity: entity.clone(),
                key: "*".into(),
                version: confirmed.0,
                target: Some(target.name.clone()),
                decision: "restore_repair".into(),
                detail: format!(
                    "state file restored from a backup taken {taken_at} (checkpoint {checkpoint}); \
                     the slot had confirmed {confirmed}: every record is read again and sent"
                ),
                user: None,
                comment: None,
                seq: None,
            }));
        }
    }
    store.apply_governance(&[], &delta)?;
    store.set_meta(RESTORE_REPAIR_META, &confirmed.0.to_string())?;
    Ok(())
}

/// Meta key prefix: the configuration fingerprint of a (target, entity).
const CONFIG_META: &str = "gov.config:";

/// Records a governed re-read for every (target, entity) whose mapping,
/// governance, routing or redaction changed since the last run (a reload or
/// a restart with an edited file): each record is then evaluated again
/// against its current row, so a stricter gate unpublishes, a looser one
/// publishes and a changed mapping re-sends, without waiting for each
/// record's next change.
fn plan_reevaluations(config: &Config, store: &Store) -> anyhow::Result<()> {
    let jobs = store.snapshot_jobs()?;
    for (t, target) in config.iter_targets() {
        let mut changed = Vec::new();
        for name in &target.entities {
            let Some(e) = config.entity_index(name) else {
                continue;
            };
            let fingerprint = steward_core::pipeline::govern::config_fingerprint(config, t, e);
            let key = format!("{CONFIG_META}{}:{name}", target.name);
            let before = store.get_meta(&key)?;
            let busy = jobs.iter().any(|j| {
                j.target == target.name
                    && &j.entity == name
                    && j.phase != steward_store::SnapshotPhase::Done
                    && !j.reevaluate
                    && !(j.reconcile && j.dry_run)
            });
            if before.as_deref().is_some_and(|b| b != fingerprint) && !busy {
                changed.push(name.clone());
            }
            store.set_meta(&key, &fingerprint)?;
        }
        if !changed.is_empty() {
            store.begin_reevaluation(&target.name, &changed)?;
            tracing::info!(target_name = %target.name, entities = ?changed, "the configuration of these entities changed: every record is evaluated again for the target");
        }
    }
    Ok(())
}

/// Records a pending snapshot job for every (target, entity) steward has not
/// seen before, for targets with `initial = "snapshot"`. A state file written
/// before this tracking existed counts its targets as initialised.
fn plan_initial_snapshots(config: &Config, store: &Store) -> anyhow::Result<usize> {
    let upgrading = store.get_meta(TRACKING_META)?.is_none()
        && store.checkpoint()?.is_some_and(|c| c > Lsn::ZERO);
    let mut planned = 0;
    for target in &config.targets {
        let key = format!("{SEEN_META}{}", target.name);
        let seen: Vec<String> = match store.get_meta(&key)? {
            Some(s) => s
                .split(',')
                .filter(|e| !e.is_empty())
                .map(str::to_string)
                .collect(),
            None if upgrading => target.entities.clone(),
            None => Vec::new(),
        };
        let new: Vec<String> = target
            .entities
            .iter()
            .filter(|e| !seen.contains(e))
            .cloned()
            .collect();
        if target.initial == InitialSync::Snapshot && !new.is_empty() {
            store.begin_resync(&target.name, &new, false)?;
            tracing::info!(target_name = %target.name, entities = ?new, "new target or entities: an initial snapshot will be sent");
            planned += new.len();
        }
        store.set_meta(&key, &target.entities.join(","))?;
    }
    store.set_meta(TRACKING_META, "1")?;
    Ok(planned)
}
