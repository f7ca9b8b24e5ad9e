//! File target: appends each event as one JSON line (NDJSON) to a file,
//! rotated by size, and fsyncs before reporting a batch delivered.
//!
//! Rotation keeps `max_files` older files: `events.ndjson.1` is the newest
//! rotated file, `events.ndjson.<max_files>` the oldest; beyond that they are
//! deleted. A batch is never split across files, so a file may exceed
//! `max_bytes` by at most one batch. A failed write is cut back off the file
//! (truncated to its previous length) so a retry never leaves a half line.
//! Replays after a crash can repeat the last batch: readers de-duplicate on
//! the event id (`id` in CloudEvents, `source.event_id` in Debezium).

pub(crate) mod config;

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

pub(crate) use self::config::FileTargetConfig;
use crate::envelope::{write_one, Envelope, EnvelopeContext};
use crate::DeliveryError;
use steward_core::config::TargetConfig;
use steward_core::model::Event;

struct Active {
    file: File,
    size: u64,
}

pub(crate) struct FileSink {
    target: String,
    path: PathBuf,
    envelope: Envelope,
    ctx: EnvelopeContext,
    max_bytes: u64,
    max_files: u32,
    /// `None` while a blocking write holds it, or after an open failed (reopened next time).
    active: Option<Active>,
}

impl FileSink {
    /// Checks that the file's directory exists; the file is opened (and
    /// created) on the first delivery.
    pub(crate) fn open(
        target: &TargetConfig,
        cfg: &FileTargetConfig,
        ctx: EnvelopeContext,
    ) -> Result<FileSink, String> {
        let dir = parent(&cfg.path);
        if !dir.is_dir() {
            return Err(format!(
                "targets.{}.path: directory `{}` does not exist; create it or fix the path",
                target.name,
                dir.display()
            ));
        }
        Ok(FileSink {
            target: target.name.clone(),
            path: cfg.path.clone(),
            envelope: cfg.envelope,
            ctx,
            max_bytes: cfg.max_bytes,
            max_files: cfg.max_files,
            active: None,
        })
    }

    pub(crate) async fn deliver(&mut self, events: &[Event]) -> Result<(), DeliveryError> {
        if events.is_empty() {
            return Ok(());
        }
        let mut buf = Vec::with_capacity(events.len() * 256);
        for event in events {
            write_one(self.envelope, event, &self.ctx, &mut buf).map_err(|e| {
                DeliveryError::permanent(format!("cannot encode event {} as JSON: {e}", event.id))
            })?;
            buf.push(b'\n');
        }
        let active = self.active.take();
        let (path, max_bytes, max_files) = (self.path.clone(), self.max_bytes, self.max_files);
        let joined =
            tokio::task::spawn_blocking(move || append(active, &path, max_bytes, max_files, &buf))
                .await;
        let (active, result) = match joined {
            Ok(r) => r,
            Err(e) => (None, Err(format!("the writer task failed: {e}"))),
        };
        self.active = active;
        result.map_err(|m| {
            DeliveryError::retryable(format!(
                "target {}: cannot write `{}`: {m}",
                self.target,
                self.path.display()
            ))
        })
    }
}

fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

fn open_active(path: &Path) -> std::io::Result<Active> {
    let file = OpenOptions::new().create(true).append(true).open(path)?;
    let size = file.metadata()?.len();
    Ok(Active { file, size })
}

/// `events.ndjson` → `events.ndjson.<n>`.
fn numbered(path: &Path, n: u32) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(format!(".{n}"));
    PathBuf::from(s)
}

fn rotate(path: &Path, max_files: u32) -> std::io::Result<()> {
    if max_files == 0 {
        std::fs::remove_file(path)?;
    } else {
        match std::fs::remove_file(numbered(path, max_files)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        for n in (1..max_files).rev() {
            match std::fs::rename(numbered(path, n), numbered(path, n + 1)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        std::fs::rename(path, numbered(path, 1))?;
    }
    // The renames must be durable before events go to the new file.
    File::open(parent(path))?.sync_all()
}

/// Appends `buf` (whole lines) durably, rotating first when it would overflow.
/// Returns the open file for the next call (or `None` to reopen).
fn append(
    active: Option<Active>,
    path: &Path,
    max_bytes: u64,
    max_files: u32,
    buf: &[u8],
) -> (Option<Active>, Result<(), String>) {
    let mut active = match active {
        Some(a) => a,
        None => match open_active(path) {
            Ok(a) => a,
            Err(e) => return (None, Err(format!("cannot open it: {e}"))),
        },
    };
    if active.size > 0 && active.size + buf.len() as u64 > max_bytes {
        drop(active);
        if let Err(e) = rotate(path, max_files) {
            return (None, Err(format!("cannot rotate it: {e}")));
        }
        active = match open_active(path) {
            Ok(a) => a,
            Err(e) => return (None, Err(format!("cannot open it after rotating: {e}"))),
        };
        // A fresh file's directory entry must be durable too.
        if let Err(e) = File::open(parent(path)).and_then(|d| d.sync_all()) {
            return (None, Err(format!("cannot sync its directory: {e}")));
        }
    }
    let before = active.size;
    let written = active
        .file
        .write_all(buf)
        .and_then(|()| active.file.sync_data());
    match written {
        Ok(()) => {
            active.size += buf.len() as u64;
            (Some(active), Ok(()))
        }
        Err(e) => {
            // Cut a partial write back off so the retry starts on a line boundary.
            let _ = active.file.set_len(before);
            (None, Err(e.to_string()))
        }
    }
}
