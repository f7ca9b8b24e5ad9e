//! Start-up checks against the source: wal_level, publication, slot, and
//! that the state file belongs to this database.

use anyhow::{bail, Context};

use crate::config::Config;
use crate::model::Lsn;
use crate::pipeline::Pipeline;
use crate::source::slot;
use crate::source::wire::{self, ReplicationClient, SnapshotAction};
use crate::store::Store;

pub struct Prepared {
    /// The lowest LSN a session may start from.
    pub start_floor: Lsn,
}

pub async fn prepare(
    config: &Config,
    store: &Store,
    pipeline: &Pipeline,
) -> anyhow::Result<Prepared> {
    let source = &config.source;
    let sql = wire::connect_sql(source)
        .await
        .with_context(|| format!("cannot connect to the source {}", source.url_display))?;
    slot::check_wal_level(&sql).await?;
    let tables = pipeline.tables();
    super::privileges::check(&sql, source, &tables).await?;
    slot::ensure_publication(
        &sql,
        &source.publication,
        &tables,
        source.create_publication,
    )
    .await?;
    for warning in slot::replica_identity_report(&sql, &tables).await? {
        tracing::warn!("{warning}");
    }

    let mut replication = ReplicationClient::connect(source).await.with_context(|| {
        format!(
            "cannot open a replication connection to {}",
            source.url_display
        )
    })?;
    let identity = replication.identify_system().await?;
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

    let checkpoint = store.checkpoint()?;
    match slot::slot_info(&sql, &source.slot).await? {
        Some(info) => {
            slot::check_slot_compatible(&info, &database)?;
            tracing::info!(
                slot = %source.slot,
                confirmed_flush = ?info.confirmed_flush_lsn.map(|l| l.to_string()),
                "using existing replication slot"
            );
        }
        None => {
            if let Some(checkpoint) = checkpoint {
                bail!(
                    "the replication slot '{}' no longer exists, but steward had streamed up to {checkpoint}: \
                     changes made since then may never reach the targets. Someone dropped the slot, or the \
                     server was rebuilt. To start over, move the state file {} aside and restart steward \
                     (targets then receive every change from the new slot onward)",
                    source.slot,
                    store.path().display()
                );
            }
            let created = replication
                .create_logical_slot(&source.slot, SnapshotAction::NoExport)
                .await?;
            tracing::info!(slot = %source.slot, consistent_point = %created.consistent_point, "created replication slot");
        }
    }
    drop(replication);
    Ok(Prepared {
        start_floor: Lsn::ZERO,
    })
}
