//! Opening the state file when something else holds it for a moment.
//!
//! redb admits one open handle per file (an exclusive byte-range lock, an
//! open file description lock on Linux). A CLI
//! command run while the daemon starts (`steward status`, `steward dlq
//! list`) may hold it for a few milliseconds, and a reload opens it again
//! right after the previous run closed it. The daemon therefore waits for
//! the file (up to [`LOCK_WAIT`]), naming who holds it, instead of exiting.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use steward_store::{Store, StoreError};

/// How long the daemon waits for a state file held by another process.
pub const LOCK_WAIT: Duration = Duration::from_secs(30);

/// Pause between two attempts to open a held state file.
const RETRY_EVERY: Duration = Duration::from_millis(100);

/// A process holding a lock on a file, as `/proc/locks` reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Holder {
    pub pid: u32,
    /// The command line, arguments joined by spaces; empty when unreadable.
    pub command: String,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.pid == std::process::id() {
            return write!(
                f,
                "this steward process (pid {}, a handle not yet closed)",
                self.pid
            );
        }
        if self.command.is_empty() {
            write!(f, "pid {}", self.pid)
        } else {
            write!(f, "pid {} ({})", self.pid, self.command)
        }
    }
}

/// The process holding a lock on `path`, if the kernel says one does.
pub fn holder(path: &Path) -> Option<Holder> {
    let meta = std::fs::metadata(path).ok()?;
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    let pid = match lock_holder_pid(&locks, meta.dev(), meta.ino())? {
        pid if pid > 0 => u32::try_from(pid).ok()?,
        // An open file description lock belongs to no process (`/proc/locks`
        // shows -1): find who has the file open.
        _ => process_with_file_open(meta.dev(), meta.ino())?,
    };
    Some(Holder {
        pid,
        command: command_line(pid),
    })
}

/// A process (this one first) with the file `(dev, ino)` open, among those
/// whose descriptors this user may see.
fn process_with_file_open(dev: u64, ino: u64) -> Option<u32> {
    let has_open = |pid: u32| -> bool {
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            return false;
        };
        fds.flatten()
            .any(|fd| std::fs::metadata(fd.path()).is_ok_and(|m| m.dev() == dev && m.ino() == ino))
    };
    let own = std::process::id();
    if has_open(own) {
        return Some(own);
    }
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| *pid != own)
        .find(|pid| has_open(*pid))
}

/// The pid of the first granted lock on the file `(dev, ino)` in a
/// `/proc/locks` text (-1 for an open file description lock). Lines look
/// like `1: FLOCK  ADVISORY  WRITE 2317 fd:01:1835059 0 EOF`; waiters are
/// marked `->` and skipped.
fn lock_holder_pid(locks: &str, dev: u64, ino: u64) -> Option<i64> {
    let (major, minor) = (dev_major(dev), dev_minor(dev));
    locks.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.get(1) == Some(&"->") || fields.len() < 6 {
            return None;
        }
        let mut parts = fields[5].split(':');
        let maj = u64::from_str_radix(parts.next()?, 16).ok()?;
        let min = u64::from_str_radix(parts.next()?, 16).ok()?;
        let inode: u64 = parts.next()?.parse().ok()?;
        if (maj, min, inode) != (major, minor, ino) {
            return None;
        }
        fields[4].parse().ok()
    })
}

/// glibc's encoding of `dev_t` (as the kernel prints it in `/proc/locks`).
fn dev_major(dev: u64) -> u64 {
    ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff)
}

fn dev_minor(dev: u64) -> u64 {
    (dev & 0xff) | ((dev >> 12) & !0xff)
}

fn command_line(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|bytes| {
            bytes
                .split(|b| *b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default()
}

/// True when a process with this pid exists and has not exited (a zombie
/// counts as gone).
pub fn process_alive(pid: u32) -> bool {
    let Ok(raw) = i32::try_from(pid) else {
        return false;
    };
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name, which is in parentheses and may hold spaces.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => {
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(raw), None).is_ok()
                || std::path::Path::new(&format!("/proc/{pid}")).exists()
        }
    }
}

/// Opens the state file, waiting up to [`LOCK_WAIT`] while another process
/// (or a handle of this one not yet closed) holds it. `Ok(None)` when
/// `shutdown` was requested meanwhile.
pub async fn open_store(
    path: &Path,
    shutdown: &mut watch::Receiver<bool>,
) -> anyhow::Result<Option<Store>> {
    let started = Instant::now();
    let mut announced: Option<Option<u32>> = None;
    loop {
        let opened = tokio::task::block_in_place(|| Store::open(path));
        let err = match opened {
            Ok(store) => {
                if announced.is_some() {
                    tracing::info!(
                        path = %path.display(),
                        waited_ms = started.elapsed().as_millis() as u64,
                        "the state file was released; starting"
                    );
                }
                return Ok(Some(store));
            }
            Err(e @ StoreError::Locked { .. }) => e,
            Err(e) => return Err(e.into()),
        };
        let holder = holder(path);
        let who = holder
            .as_ref()
            .map_or_else(|| "another process".to_string(), Holder::to_string);
        if started.elapsed() >= LOCK_WAIT {
            return Err(anyhow::Error::from(err).context(format!(
                "waited {} s for the state file {}, still held by {who}",
                LOCK_WAIT.as_secs(),
                path.display()
            )));
        }
        let pid = holder.as_ref().map(|h| h.pid);
        if announced != Some(pid) {
            tracing::warn!(
                path = %path.display(),
                holder = %who,
                "the state file is in use by {who}; waiting up to {} s for it to be released",
                LOCK_WAIT.as_secs()
            );
            announced = Some(pid);
        }
        tokio::select! {
            _ = shutdown.wait_for(|stop| *stop) => return Ok(None),
            _ = tokio::time::sleep(RETRY_EVERY) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_holder_of_a_flock_on_the_file() {
        let locks = "\
1: POSIX  ADVISORY  WRITE 77 08:01:99 0 EOF
2: FLOCK  ADVISORY  WRITE 4242 fd:01:1835059 0 EOF
2: -> FLOCK  ADVISORY  WRITE 5151 fd:01:1835059 0 EOF
";
        // fd:01 is major 253, minor 1.
        let dev = (253u64 << 8) | 1;
        assert_eq!(lock_holder_pid(locks, dev, 1_835_059), Some(4242));
        assert_eq!(lock_holder_pid(locks, dev, 1_835_060), None);
        assert_eq!(lock_holder_pid(locks, (8 << 8) | 1, 99), Some(77));
        let ofd = "1: OFDLCK ADVISORY  WRITE -1 fd:01:42 0 0\n";
        assert_eq!(lock_holder_pid(ofd, dev, 42), Some(-1));
    }

    #[test]
    fn a_lock_held_here_names_this_process_and_its_command() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let store = Store::open(&path).unwrap();
        let holder = holder(&path).expect("the open store holds a lock");
        assert_eq!(holder.pid, std::process::id());
        assert!(!holder.command.is_empty());
        assert!(
            holder.to_string().contains("this steward process"),
            "{holder}"
        );
        drop(store);
        assert_eq!(super::holder(&path), None);
        assert!(process_alive(std::process::id()));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn waits_for_a_briefly_held_file_and_gives_up_on_shutdown() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let held = Store::open(&path).unwrap();
        let (stop_tx, mut stop) = watch::channel(false);
        let releaser = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            drop(held);
        });
        let store = open_store(&path, &mut stop).await.unwrap();
        assert!(store.is_some(), "opened once the other handle was dropped");
        releaser.await.unwrap();

        let _again = store;
        let _ = stop_tx.send(true);
        let mut stop = stop_tx.subscribe();
        assert!(open_store(&path, &mut stop).await.unwrap().is_none());
    }
}
