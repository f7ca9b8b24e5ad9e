//! `steward backup`: a consistent copy of the state file, taken by whoever
//! holds it open (the running daemon, or the command line when it is stopped).
//!
//! Consistency comes from exclusive access: the store's handle lock is taken
//! for writing, so no transaction is in flight and none can start; a durable
//! commit then puts every earlier non-durable one (acknowledgements) on disk,
//! and the file's bytes are exactly that committed state while they are
//! copied. Everything else (fsync, verification, rename) happens after the
//! lock is released, so the daemon waits only for the copy itself.
//!
//! The copy is marked as a backup ([`BACKUP_META`]): a daemon that starts on
//! it knows that the replication slot may have moved past its checkpoint and
//! repairs the targets (see `daemon::setup`).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::PoisonError;

use anyhow::{bail, Context};
use redb::Durability;
use serde::{Deserialize, Serialize};

use super::{Store, StoreError};
use steward_core::model::Lsn;

/// Meta key written into every backup (never into the live file): JSON of [`BackupMark`].
pub const BACKUP_META: &str = "backup.taken";

/// What a backup records about itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupMark {
    /// When the copy was taken, RFC 3339 UTC.
    pub taken_at: String,
    /// The checkpoint of the copy.
    pub(crate) checkpoint: Option<u64>,
}

/// The outcome of a backup, printed by the command line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupReport {
    /// The backup file.
    pub path: PathBuf,
    /// Its size in bytes.
    pub bytes: u64,
    /// The copy's checkpoint (an LSN as `X/Y`), read back from it.
    pub checkpoint: Option<String>,
    /// When the copy was taken, RFC 3339 UTC.
    pub taken_at: String,
}

impl Store {
    /// Writes a consistent copy of the state file to `dest` (mode 0600,
    /// fsynced, renamed into place), verifies that it opens as a state file
    /// and reports its checkpoint. An existing `dest` is refused unless `force`.
    pub fn backup_to(&self, dest: &Path, force: bool) -> anyhow::Result<BackupReport> {
        if same_file(self.path(), dest) {
            bail!(
                "{} is the state file itself; give the backup another path",
                dest.display()
            );
        }
        refuse_existing(dest, force)?;
        let tmp = tmp_path(dest);
        // A leftover of an interrupted backup: never a file anyone relies on.
        match std::fs::remove_file(&tmp) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("cannot remove {}", tmp.display())),
        }
        let mut out = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("cannot create {}", tmp.display()))?;
        let copied = self.copy_consistent(&mut out);
        let bytes = match copied.and_then(|n| {
            out.sync_all()
                .with_context(|| format!("cannot flush {} to disk", tmp.display()))?;
            Ok(n)
        }) {
            Ok(n) => n,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
        };
        drop(out);
        let taken_at = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let checkpoint = match mark_and_verify(&tmp, &taken_at) {
            Ok(c) => c,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(e.context(format!(
                    "the copy {} does not open as a state file; nothing was written to {}",
                    tmp.display(),
                    dest.display()
                )));
            }
        };
        // Checked again: another backup may have finished meanwhile.
        if let Err(e) = refuse_existing(dest, force) {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        std::fs::rename(&tmp, dest)
            .with_context(|| format!("cannot rename {} to {}", tmp.display(), dest.display()))?;
        sync_dir(dest)?;
        Ok(BackupReport {
            path: dest.to_path_buf(),
            bytes,
            checkpoint: checkpoint.map(|c| c.to_string()),
            taken_at,
        })
    }

    /// The durable commit and the copy, with no transaction in flight.
    fn copy_consistent(&self, out: &mut File) -> anyhow::Result<u64> {
        let path = self.path().to_path_buf();
        if self.inner.needs_reopen.load(Ordering::Acquire) {
            self.reopen()?;
        }
        let guard = self
            .inner
            .db
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        let Some(db) = guard.as_ref() else {
            bail!(
                "the state file {} is being reopened after a write failure; try again",
                path.display()
            );
        };
        let mut txn = db
            .begin_write()
            .map_err(|e| StoreError::from_redb(&path, e))?;
        txn.set_durability(Durability::Immediate)
            .map_err(|e| StoreError::from_redb(&path, e))?;
        txn.commit().map_err(|e| StoreError::from_redb(&path, e))?;
        self.inner.lazy_commits.store(0, Ordering::Relaxed);
        self.inner.durable_commits.fetch_add(1, Ordering::AcqRel);
        let mut src =
            File::open(&path).with_context(|| format!("cannot read {}", path.display()))?;
        // std::io::copy retries interrupted reads and, file to file, lets
        // the kernel copy (copy_file_range).
        let total = std::io::copy(&mut src, out)
            .with_context(|| format!("cannot copy {} to the backup", path.display()))?;
        drop(guard);
        Ok(total)
    }
}

/// Opens the copy (in this process: it is not the live file), stamps it as
/// a backup and returns its checkpoint.
fn mark_and_verify(copy: &Path, taken_at: &str) -> anyhow::Result<Option<Lsn>> {
    let store = Store::open(copy)?;
    let checkpoint = store.checkpoint()?;
    let mark = BackupMark {
        taken_at: taken_at.to_string(),
        checkpoint: checkpoint.map(|c| c.0),
    };
    store.set_meta(BACKUP_META, &serde_json::to_string(&mark)?)?;
    // Reads every target's bookkeeping: a copy that opens but cannot be read is no backup.
    for target in store.targets()? {
        store.backlog(&target)?;
    }
    drop(store);
    File::open(copy)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("cannot flush {} to disk", copy.display()))?;
    Ok(checkpoint)
}

fn refuse_existing(dest: &Path, force: bool) -> anyhow::Result<()> {
    match std::fs::symlink_metadata(dest) {
        Ok(m) if m.is_dir() => bail!(
            "{} is a directory; give the backup file's path",
            dest.display()
        ),
        Ok(_) if !force => bail!(
            "{} exists; give another path, or --force to replace it",
            dest.display()
        ),
        _ => Ok(()),
    }
}

/// Whether `dest` names the file at `state` (through any spelling of its directory).
fn same_file(state: &Path, dest: &Path) -> bool {
    let resolve = |p: &Path| -> Option<PathBuf> {
        let dir = match p.parent().filter(|d| !d.as_os_str().is_empty()) {
            Some(d) => d.to_path_buf(),
            None => PathBuf::from("."),
        };
        Some(std::fs::canonicalize(dir).ok()?.join(p.file_name()?))
    };
    match (resolve(state), resolve(dest)) {
        (Some(a), Some(b)) => a == b,
        _ => false,
    }
}

fn tmp_path(dest: &Path) -> PathBuf {
    let mut name = dest
        .file_name()
        .map(std::ffi::OsStr::to_os_string)
        .unwrap_or_default();
    name.push(".tmp");
    dest.with_file_name(name)
}

/// Makes the rename durable.
fn sync_dir(dest: &Path) -> anyhow::Result<()> {
    let dir = match dest.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(d) => d.to_path_buf(),
        None => PathBuf::from("."),
    };
    File::open(&dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("cannot flush the directory {}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use steward_core::model::{Event, EventOp};

    fn event(key: &str, version: u64) -> Event {
        Event {
            change: None,
            tx_id: None,
            id: format!("e-{key}-{version}"),
            entity: "product".into(),
            key: key.into(),
            op: EventOp::Upsert,
            version,
            time: "2024-01-01T00:00:00Z".into(),
            data: serde_json::json!({ "k": key }).into(),
        }
    }

    #[test]
    fn a_backup_holds_the_live_state_including_lazy_acks_and_is_marked() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.redb")).unwrap();
        let events = [event("1", 10), event("2", 11), event("3", 12)];
        let appends: Vec<(&str, &Event)> = events.iter().map(|e| ("wms", e)).collect();
        store.commit(Lsn(0x40), &appends).unwrap();
        // Not durable on its own: the backup's durable commit must carry it.
        store.ack("wms", 2, 2).unwrap();
        let dest = dir.path().join("b.redb");
        let report = store.backup_to(&dest, false).unwrap();
        assert_eq!(report.checkpoint.as_deref(), Some("0/40"));
        let mode = std::fs::metadata(&dest).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(!tmp_path(&dest).exists());
        // The live store keeps working after the backup.
        store.ack("wms", 3, 1).unwrap();
        drop(store);
        let copy = Store::open(&dest).unwrap();
        assert_eq!(copy.checkpoint().unwrap(), Some(Lsn(0x40)));
        assert_eq!(copy.backlog("wms").unwrap(), 1);
        let mark: BackupMark =
            serde_json::from_str(&copy.get_meta(BACKUP_META).unwrap().unwrap()).unwrap();
        assert_eq!(mark.checkpoint, Some(0x40));
    }

    #[test]
    fn an_existing_destination_is_kept_unless_forced() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.redb")).unwrap();
        let dest = dir.path().join("b.redb");
        std::fs::write(&dest, b"precious").unwrap();
        let e = store.backup_to(&dest, false).unwrap_err();
        assert!(e.to_string().contains("--force"), "{e}");
        assert_eq!(std::fs::read(&dest).unwrap(), b"precious");
        store.backup_to(&dest, true).unwrap();
        assert_ne!(std::fs::read(&dest).unwrap(), b"precious");
        // Never over the live file, however it is spelled.
        let live = dir.path().join(".").join("s.redb");
        let e = store.backup_to(&live, true).unwrap_err();
        assert!(e.to_string().contains("state file itself"), "{e}");
        assert!(store.checkpoint().is_ok());
    }
}
