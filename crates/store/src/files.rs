//! Files and directories steward writes: owner-only (0600 / 0700) whatever
//! the umask. The state file holds withheld records in full (a quarantined
//! partner's bank account, say), and its backups too. None of it is for
//! other local users.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Mode of every file steward creates.
pub(crate) const FILE_MODE: u32 = 0o600;
/// Mode of every directory steward creates.
pub(crate) const DIR_MODE: u32 = 0o700;

/// Creates `dir` and its missing parents, each new one 0700. Directories
/// that exist already keep their mode: they may be shared on purpose
/// (`/var/lib`), and the files inside are 0600 anyway.
pub fn create_dir_all(dir: &Path) -> io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)
}

/// Creates a new file, 0600, failing if it exists.
pub(crate) fn create_new(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(FILE_MODE)
        .open(path)
}

/// Refuses a state file that users other than its owner may read or
/// write: it holds withheld records in full. The check is on the file
/// steward is about to use, so a copy restored with a loose mode is caught
/// too. A missing file passes (steward creates it 0600).
pub fn refuse_shared_state_file(path: &Path) -> anyhow::Result<()> {
    let mode = match std::fs::metadata(path) {
        Ok(meta) => meta.permissions().mode() & 0o777,
        Err(_) => return Ok(()),
    };
    if mode & 0o077 != 0 {
        anyhow::bail!(
            "the state file {path} has mode {mode:04o}: other users can read it, and it holds \
             withheld records in full; make it readable by the steward user alone, then start \
             again: chmod 600 {path}",
            path = path.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn files_and_directories_are_owner_only_whatever_the_umask() {
        let dir = tempfile::tempdir().unwrap();
        let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o000));
        let nested = dir.path().join("a/b");
        let made = create_dir_all(&nested);
        let file = dir.path().join("a/b/f");
        let created = create_new(&file).map(drop);
        nix::sys::stat::umask(old);
        made.unwrap();
        created.unwrap();
        assert_eq!(mode(&dir.path().join("a")), 0o700);
        assert_eq!(mode(&nested), 0o700);
        assert_eq!(mode(&file), 0o600);
        assert!(
            create_new(&file).is_err(),
            "an existing file is not replaced"
        );
    }

    #[test]
    fn a_state_file_others_may_read_is_refused_with_the_chmod_to_run() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        refuse_shared_state_file(&path).unwrap();
        std::fs::write(&path, b"x").unwrap();
        for (mode, refused) in [(0o600, false), (0o400, false), (0o640, true), (0o604, true)] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            let result = refuse_shared_state_file(&path);
            assert_eq!(result.is_err(), refused, "{mode:o}");
            if let Err(e) = result {
                let text = e.to_string();
                assert!(
                    text.ends_with(&format!("chmod 600 {}", path.display())),
                    "{text}"
                );
                assert!(text.contains(&format!("mode 0{mode:o}")), "{text}");
            }
        }
    }
}
