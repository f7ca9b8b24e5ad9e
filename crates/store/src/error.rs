//! Store errors, worded for the operator who reads them in the log: each
//! names the state file and, where there is one, the fix.

use std::io;
use std::path::{Path, PathBuf};

/// Why the state file could not be used; each message names the file and,
/// where there is one, the fix.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Another process (or another [`crate::Store`] in this one) has the file open.
    #[error(
        "the state file {} is in use by another steward process; stop that process first, \
         or give this one its own state.path",
        .path.display()
    )]
    Locked {
        /// The state file.
        path: PathBuf,
    },

    /// The file system (or quota) is full; transient.
    #[error(
        "the disk holding the state file {} is full: steward stops confirming to PostgreSQL \
         (the server keeps the WAL meanwhile) until space is freed on that file system, then \
         continues by itself",
        .path.display()
    )]
    DiskFull {
        /// The state file.
        path: PathBuf,
    },

    /// Reading, writing or creating the file or its directory failed; transient.
    #[error(
        "cannot use the state file {}: {source}; check that its directory exists and is \
         writable by the user steward runs as",
        .path.display()
    )]
    Io {
        /// The state file.
        path: PathBuf,
        /// The operating system's error.
        source: io::Error,
    },

    /// The file is damaged: steward refuses it and changes nothing in it.
    #[error(
        "the state file {path} is damaged: {detail}. steward leaves it as it is and does not \
         start afresh over it. Either stop steward and restore your last backup of it (made with \
         `steward backup`) to {path}, or, to start over, move it aside (mv {path} {path}.damaged) \
         and run `steward reset --all -c <config>`: every target then gets a full snapshot \
         again, and what the damaged file held (undelivered events, dead letters, quarantine, \
         audit trail) stays only in the file set aside",
        path = .path.display()
    )]
    Corrupted {
        /// The state file.
        path: PathBuf,
        /// What is wrong with it.
        detail: String,
    },

    /// The path names a directory or another non-file.
    #[error(
        "state.path {} is not a file (a directory?); point state.path at a file, for example \
         {}/state.redb",
        .path.display(),
        .path.display()
    )]
    NotAFile {
        /// The configured path.
        path: PathBuf,
    },

    /// A redb file whose format version or table types this build cannot read.
    #[error(
        "the state file {} has an on-disk format this steward cannot read ({detail}); run the \
         steward version that wrote it, or move the file aside",
        .path.display()
    )]
    Incompatible {
        /// The state file.
        path: PathBuf,
        /// redb's account of the mismatch.
        detail: String,
    },

    /// An outbox entry that does not decode as an event.
    #[error(
        "entry {seq} of target {target:?} in the state file {} cannot be decoded ({detail}); \
         the file was written by an incompatible steward version or is corrupted",
        .path.display()
    )]
    Decode {
        /// The state file.
        path: PathBuf,
        /// The target whose outbox holds the entry.
        target: String,
        /// The entry's sequence number.
        seq: u64,
        /// What failed to decode.
        detail: String,
    },

    /// A redb failure that means a bug rather than a problem with the environment.
    #[error("internal error on the state file {}: {detail}", .path.display())]
    Internal {
        /// The state file.
        path: PathBuf,
        /// redb's message.
        detail: String,
    },
}

impl StoreError {
    /// True when the store failed because its file system is out of space (or quota).
    #[cfg(test)]
    pub(crate) fn is_disk_full(&self) -> bool {
        matches!(self, StoreError::DiskFull { .. })
    }

    /// True for failures of the environment that may go away by themselves
    /// (a full disk, an I/O error): worth retrying after a pause, unlike
    /// corruption or an incompatible file.
    pub fn is_transient(&self) -> bool {
        self.poisons_database()
    }

    /// True when the state file itself is damaged or unreadable by this
    /// version (exit code 3): the operator must restore or replace it.
    pub fn is_damage(&self) -> bool {
        matches!(
            self,
            StoreError::Corrupted { .. }
                | StoreError::Incompatible { .. }
                | StoreError::Decode { .. }
        )
    }

    /// True when redb's in-process state must be discarded (it refuses all further
    /// I/O after one failed write) and the file reopened before the store is usable.
    pub(crate) fn poisons_database(&self) -> bool {
        matches!(self, StoreError::DiskFull { .. } | StoreError::Io { .. })
    }

    pub(crate) fn from_io(path: &Path, err: io::Error) -> StoreError {
        if is_out_of_space(&err) {
            StoreError::DiskFull {
                path: path.to_path_buf(),
            }
        } else {
            StoreError::Io {
                path: path.to_path_buf(),
                source: err,
            }
        }
    }

    /// Maps any redb error (they all convert into `redb::Error`).
    pub(crate) fn from_redb(path: &Path, err: impl Into<redb::Error>) -> StoreError {
        let path_buf = path.to_path_buf();
        match err.into() {
            redb::Error::DatabaseAlreadyOpen => StoreError::Locked { path: path_buf },
            redb::Error::Io(e) => StoreError::from_io(path, e),
            // redb refuses further I/O after a failed write; the failure itself was
            // reported earlier, most likely as a full disk.
            redb::Error::PreviousIo => StoreError::Io {
                path: path_buf,
                source: io::Error::other("an earlier write to the file failed"),
            },
            redb::Error::Corrupted(detail) => StoreError::Corrupted {
                path: path_buf,
                detail,
            },
            redb::Error::RepairAborted => StoreError::Corrupted {
                path: path_buf,
                detail: "repair after an unclean shutdown was aborted".into(),
            },
            redb::Error::UpgradeRequired(v) => StoreError::Incompatible {
                path: path_buf,
                detail: format!("redb file format {v} needs an upgrade"),
            },
            redb::Error::TableTypeMismatch(mismatch) => StoreError::Incompatible {
                path: path_buf,
                detail: format!("table {:?} has an unexpected layout", mismatch.table()),
            },
            other => StoreError::Internal {
                path: path_buf,
                detail: other.to_string(),
            },
        }
    }
}

fn is_out_of_space(err: &io::Error) -> bool {
    // ErrorKind::StorageFull / QuotaExceeded are newer than our minimum Rust version;
    // the errno is what the kernel reports either way.
    matches!(
        err.raw_os_error(),
        Some(code) if code == nix::errno::Errno::ENOSPC as i32 || code == nix::errno::Errno::EDQUOT as i32
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enospc_inside_redb_errors_is_disk_full() {
        let path = Path::new("/var/lib/steward/state.redb");
        let enospc = || io::Error::from_raw_os_error(nix::errno::Errno::ENOSPC as i32);
        let e = StoreError::from_redb(path, redb::StorageError::Io(enospc()));
        assert!(e.is_disk_full(), "{e}");
        assert!(e.to_string().contains("until space is freed"));
        let e = StoreError::from_redb(
            path,
            redb::CommitError::Storage(redb::StorageError::Io(enospc())),
        );
        assert!(e.is_disk_full());
        let e = StoreError::from_redb(path, redb::StorageError::Io(io::Error::other("boom")));
        assert!(!e.is_disk_full());
        assert!(e.poisons_database());
    }

    #[test]
    fn already_open_is_locked() {
        let e = StoreError::from_redb(
            Path::new("s.redb"),
            redb::DatabaseError::DatabaseAlreadyOpen,
        );
        assert!(matches!(e, StoreError::Locked { .. }));
        assert!(e.to_string().contains("another steward process"));
    }
}
