//! Opening the state file, so that a damaged one is refused with one clear
//! error and left exactly as it was, and a missing one is the only kind
//! that starts a new state.
//!
//! 1. [`classify`] looks at the file before redb does: missing (create a
//!    new state, 0600), empty (damage: a state file is never empty, and redb
//!    would silently initialise it), not a regular file, not a redb file
//!    (another program's file), or shorter than redb's header.
//! 2. [`verify`] opens it through [`Overlay`], a backend that reads the file
//!    and keeps every write in memory: the recovery after a crash (kill -9,
//!    power loss) runs as it would for real, then redb's integrity check
//!    (`Database::check_integrity`) verifies the checksum of every page of
//!    the committed trees. A file redb cannot open or check this way, or one
//!    the check had to repair, is damaged; nothing was written to it. Files over
//!    [`VERIFY_MAX_BYTES`] skip this (it reads the whole file), with a
//!    warning.
//! 3. The real open; redb repeats the crash recovery, if any, on the file.
//!
//! redb reports most damage as errors, but some as panics (an assertion on a
//! truncated file, unreachable code on a zeroed page). [`guarded`] turns those
//! into errors without printing the panic, so the operator sees the one
//! message of [`StoreError::Corrupted`].

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::ops::Bound;
use std::panic::{self, AssertUnwindSafe};
use std::path::Path;
use std::sync::{Mutex, Once, PoisonError};

use redb::backends::FileBackend;
use redb::{BackendError, Database, DatabaseError, StorageBackend, StorageError};

use super::StoreError;

/// The first bytes of every redb file.
const REDB_MAGIC: [u8; 9] = [b'r', b'e', b'd', b'b', 0x1A, 0x0A, 0xA9, 0x0D, 0x0A];
/// redb's super-header (file header and both commit slots) fills the first
/// page; a file shorter than that was cut.
const HEADER_BYTES: u64 = 4096;

/// Largest file verified page by page when opened (step 2 of the module
/// documentation). Reading a gigabyte takes a second or two from a disk.
pub(crate) const VERIFY_MAX_BYTES: u64 = 1 << 30;

/// redb's page cache for the verification open: the check reads each page once.
const VERIFY_CACHE_BYTES: usize = 1024 * 1024;

/// What is at the state path before redb looks at it.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum FileKind {
    /// Nothing: a new state file is created.
    Missing,
    /// A redb file at least as long as its header.
    Redb { len: u64 },
    /// Anything else is damage, described for the operator.
    Damaged(String),
    /// A directory, a socket, ...: `state.path` names the wrong thing.
    NotAFile,
}

/// Looks at the file at `path` without changing it.
pub(super) fn classify(path: &Path) -> io::Result<FileKind> {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(FileKind::Missing),
        Err(e) => return Err(e),
    };
    if !meta.is_file() {
        return Ok(FileKind::NotAFile);
    }
    let len = meta.len();
    if len == 0 {
        return Ok(FileKind::Damaged(
            "it is empty (0 bytes); steward never leaves its state file empty, so it was \
             truncated or replaced"
                .into(),
        ));
    }
    let mut start = Vec::with_capacity(64);
    File::open(path)?.take(64).read_to_end(&mut start)?;
    Ok(classify_bytes(&start, len))
}

/// [`classify`] of an existing, non-empty file from its first bytes and length.
fn classify_bytes(start: &[u8], len: u64) -> FileKind {
    if !start.starts_with(&REDB_MAGIC) {
        return FileKind::Damaged(format!(
            "it is not a steward state file: {}",
            describe_foreign(start)
        ));
    }
    if len < HEADER_BYTES {
        return FileKind::Damaged(format!(
            "it is cut short: {len} bytes, less than the {HEADER_BYTES}-byte header of a state \
             file"
        ));
    }
    FileKind::Redb { len }
}

/// What a file that does not start with redb's signature looks like.
fn describe_foreign(start: &[u8]) -> String {
    const KNOWN: &[(&[u8], &str)] = &[
        (b"SQLite format 3\0", "an SQLite database"),
        (b"PK\x03\x04", "a zip archive"),
        (b"\x1f\x8b", "a gzip file"),
        (b"\x7fELF", "a program (ELF)"),
        (b"PGDMP", "a pg_dump archive"),
    ];
    if let Some((_, what)) = KNOWN.iter().find(|(magic, _)| start.starts_with(magic)) {
        return format!("it is {what}");
    }
    if start.iter().all(|&b| b == 0) {
        return "its first bytes are all zero (the redb header was wiped)".into();
    }
    if let Ok(text) = std::str::from_utf8(start) {
        if !text.chars().any(|c| c.is_control() && !c.is_whitespace()) {
            let line: String = text.lines().next().unwrap_or("").chars().take(40).collect();
            return format!("it holds text (starting {line:?})");
        }
    }
    "it does not start with the signature of a redb database".into()
}

/// Opens the state file at `path`, creating it (and its directory, 0700)
/// only where no file exists.
pub(super) fn open_database(path: &Path, cache_bytes: usize) -> Result<Database, StoreError> {
    let io_error = |e| StoreError::from_io(path, e);
    match classify(path).map_err(io_error)? {
        FileKind::Missing => create(path, cache_bytes),
        FileKind::NotAFile => Err(StoreError::NotAFile {
            path: path.to_path_buf(),
        }),
        FileKind::Damaged(detail) => Err(StoreError::Corrupted {
            path: path.to_path_buf(),
            detail,
        }),
        FileKind::Redb { len } => {
            if len <= VERIFY_MAX_BYTES {
                verify(path)?;
            } else {
                tracing::warn!(
                    path = %path.display(),
                    bytes = len,
                    limit = VERIFY_MAX_BYTES,
                    "the state file is too large to verify every page at each start; \
                     damage is detected when steward reads it"
                );
            }
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(path)
                .map_err(io_error)?;
            redb_open(path, || {
                let mut builder = redb::Builder::new();
                builder.set_cache_size(cache_bytes);
                builder.create_with_backend(FileBackend::new(file))
            })
        }
    }
}

fn create(path: &Path, cache_bytes: usize) -> Result<Database, StoreError> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        crate::files::create_dir_all(parent).map_err(|e| StoreError::from_io(path, e))?;
    }
    let file = match crate::files::create_new(path) {
        Ok(f) => f,
        // Another process created it meanwhile: open what it made.
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            return open_database(path, cache_bytes)
        }
        Err(e) => return Err(StoreError::from_io(path, e)),
    };
    let result = redb_open(path, || {
        let mut builder = redb::Builder::new();
        builder.set_cache_size(cache_bytes);
        builder.create_with_backend(FileBackend::new(file))
    });
    if result.is_err() {
        // A half-initialised file would read as damage at the next start;
        // it holds nothing yet.
        let _ = std::fs::remove_file(path);
    }
    result
}

/// Opens `path` through [`Overlay`] with redb's integrity check, so the file
/// is read in full but never written.
fn verify(path: &Path) -> Result<(), StoreError> {
    // Writable only so redb can take its locks (a write lock needs a
    // writable descriptor): the overlay never writes.
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| StoreError::from_io(path, e))?;
    let overlay = Overlay::new(FileBackend::new(file)).map_err(|e| StoreError::from_io(path, e))?;
    // A plain open first: after a crash it recovers the last complete
    // commit, as the real open will. The check then verifies every page of
    // what the real open will use. Had redb to fall back from the last
    // commit of a file that was closed cleanly or already recovered, that
    // commit is damaged: PostgreSQL may have been told it is stored, so
    // opening at the commit before would lose it.
    let mut db = redb_open(path, move || {
        let mut builder = redb::Builder::new();
        builder.set_cache_size(VERIFY_CACHE_BYTES);
        builder.create_with_backend(overlay)
    })?;
    let checked = guarded(|| db.check_integrity());
    let damage = match checked {
        Ok(Ok(true)) => None,
        Ok(Ok(false)) => Some(StoreError::Corrupted {
            path: path.to_path_buf(),
            detail: "its pages fail redb's checksums (the last commit or the allocator state)"
                .into(),
        }),
        Ok(Err(e)) => Some(open_error(path, e)),
        Err(panic) => Some(damaged_by_panic(path, &panic)),
    };
    // Dropped in any case: the overlay's writes go nowhere.
    let closed = close(path, db);
    match damage {
        Some(e) => Err(e),
        None => closed,
    }
}

/// Closes `db`, reporting a panic while it writes its last state as damage.
pub(super) fn close(path: &Path, db: Database) -> Result<(), StoreError> {
    match guarded(move || db.close()) {
        // A close error after a successful open of a verified file is
        // not damage; the next open repairs what the close left.
        Ok(_) => Ok(()),
        Err(panic) => Err(damaged_by_panic(path, &panic)),
    }
}

/// Runs one of redb's open calls, mapping its errors and panics.
fn redb_open(
    path: &Path,
    open: impl FnOnce() -> Result<Database, DatabaseError>,
) -> Result<Database, StoreError> {
    match guarded(open) {
        Ok(Ok(db)) => Ok(db),
        Ok(Err(e)) => Err(open_error(path, e)),
        Err(panic) => Err(damaged_by_panic(path, &panic)),
    }
}

/// redb reports a file that is not a database as an I/O error of kind
/// `InvalidData`; everything else maps as in [`StoreError::from_redb`].
fn open_error(path: &Path, e: DatabaseError) -> StoreError {
    match e {
        DatabaseError::Storage(StorageError::Io(io)) if io.kind() == io::ErrorKind::InvalidData => {
            StoreError::Corrupted {
                path: path.to_path_buf(),
                detail: io.to_string(),
            }
        }
        other => StoreError::from_redb(path, other),
    }
}

pub(super) fn damaged_by_panic(path: &Path, panic: &str) -> StoreError {
    StoreError::Corrupted {
        path: path.to_path_buf(),
        detail: format!("the database engine stopped on an inconsistency in it: {panic}"),
    }
}

thread_local! {
    /// Set while this thread runs [`guarded`] code: its panics are not printed.
    static QUIET: Cell<bool> = const { Cell::new(false) };
    static LAST_PANIC: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Runs `f`, turning a panic into `Err(message)`. The panic is not printed:
/// the caller reports it as an error of its own.
pub(crate) fn guarded<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            if QUIET.with(Cell::get) {
                let message = info
                    .payload()
                    .downcast_ref::<&str>()
                    .map(std::string::ToString::to_string)
                    .or_else(|| info.payload().downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "panic".into());
                let message = match info.location() {
                    Some(at) => format!("{message} (at {}:{})", at.file(), at.line()),
                    None => message,
                };
                LAST_PANIC.with(|last| *last.borrow_mut() = Some(message));
            } else {
                previous(info);
            }
        }));
    });
    let was_quiet = QUIET.with(|q| q.replace(true));
    let result = panic::catch_unwind(AssertUnwindSafe(f));
    QUIET.with(|q| q.set(was_quiet));
    result.map_err(|_| {
        LAST_PANIC
            .with(|last| last.borrow_mut().take())
            .unwrap_or_else(|| "panic".into())
    })
}

/// Block size of the overlay's copies.
const BLOCK: u64 = 4096;

/// A storage backend over a file that reads it and keeps writes in memory:
/// redb can open, recover and check the file without changing a byte of
/// it. Locks are taken on the file itself, so an overlay open is refused
/// while another process has the file, as a real open is.
#[derive(Debug)]
struct Overlay {
    file: FileBackend,
    state: Mutex<OverlayState>,
}

#[derive(Debug)]
struct OverlayState {
    /// Length redb sees.
    len: u64,
    /// Bytes below this offset not in `blocks` come from the file; above it
    /// they are zero (redb shrank the file, then grew it again).
    file_len: u64,
    /// Written blocks, by index.
    blocks: BTreeMap<u64, Vec<u8>>,
}

impl Overlay {
    fn new(file: FileBackend) -> io::Result<Overlay> {
        let len = file.len()?;
        Ok(Overlay {
            file,
            state: Mutex::new(OverlayState {
                len,
                file_len: len,
                blocks: BTreeMap::new(),
            }),
        })
    }

    /// The block as redb last left it.
    fn block(&self, state: &OverlayState, index: u64, out: &mut [u8]) -> Result<(), BackendError> {
        if let Some(block) = state.blocks.get(&index) {
            out.copy_from_slice(block);
            return Ok(());
        }
        out.fill(0);
        let start = index * BLOCK;
        let from_file = state.file_len.saturating_sub(start).min(BLOCK) as usize;
        if from_file > 0 {
            self.file.read(start, &mut out[..from_file])?;
        }
        Ok(())
    }
}

impl StorageBackend for Overlay {
    fn len(&self) -> Result<u64, BackendError> {
        Ok(self
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), BackendError> {
        let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let end = offset
            .checked_add(out.len() as u64)
            .filter(|&end| end <= state.len)
            .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "read past the end"))?;
        let mut block = vec![0u8; BLOCK as usize];
        let mut at = offset;
        while at < end {
            let index = at / BLOCK;
            self.block(&state, index, &mut block)?;
            let from = (at % BLOCK) as usize;
            let n = ((BLOCK as usize) - from).min((end - at) as usize);
            let done = (at - offset) as usize;
            out[done..done + n].copy_from_slice(&block[from..from + n]);
            at += n as u64;
        }
        Ok(())
    }

    fn set_len(&self, len: u64) -> Result<(), BackendError> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if len < state.len {
            state.file_len = state.file_len.min(len);
            // The tail of a block cut in the middle reads as zero when grown again.
            let keep = len.div_ceil(BLOCK);
            state.blocks.split_off(&keep);
            if !len.is_multiple_of(BLOCK) {
                let index = len / BLOCK;
                let mut block = vec![0u8; BLOCK as usize];
                self.block(&state, index, &mut block)?;
                block[(len % BLOCK) as usize..].fill(0);
                state.blocks.insert(index, block);
            }
        }
        state.len = len;
        Ok(())
    }

    fn sync_data(&self) -> Result<(), BackendError> {
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), BackendError> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let end = offset + data.len() as u64;
        if end > state.len {
            state.len = end;
        }
        let mut at = offset;
        while at < end {
            let index = at / BLOCK;
            let mut block = vec![0u8; BLOCK as usize];
            self.block(&state, index, &mut block)?;
            let from = (at % BLOCK) as usize;
            let n = ((BLOCK as usize) - from).min((end - at) as usize);
            let done = (at - offset) as usize;
            block[from..from + n].copy_from_slice(&data[done..done + n]);
            state.blocks.insert(index, block);
            at += n as u64;
        }
        Ok(())
    }

    fn close(&self) -> Result<(), BackendError> {
        self.file.close()
    }

    fn try_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.file.try_lock_range(start, end)
    }

    fn try_lock_shared_range(
        &self,
        start: Bound<u64>,
        end: Bound<u64>,
    ) -> Result<bool, BackendError> {
        self.file.try_lock_shared_range(start, end)
    }

    fn lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.file.lock_range(start, end)
    }

    fn lock_shared_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.file.lock_shared_range(start, end)
    }

    fn unlock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.file.unlock_range(start, end)
    }

    fn query_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.file.query_lock_range(start, end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn damaged(kind: FileKind) -> String {
        match kind {
            FileKind::Damaged(what) => what,
            other => panic!("not damage: {other:?}"),
        }
    }

    #[test]
    fn files_are_classified_by_their_first_bytes_and_length() {
        let mut redb_start = REDB_MAGIC.to_vec();
        redb_start.extend_from_slice(&[0; 20]);
        assert_eq!(
            classify_bytes(&redb_start, 72 * 1024),
            FileKind::Redb { len: 72 * 1024 }
        );
        assert!(damaged(classify_bytes(&redb_start, 4095)).contains("cut short: 4095 bytes"));
        assert!(damaged(classify_bytes(b"SQLite format 3\0\x10\x00", 8192)).contains("SQLite"));
        assert!(damaged(classify_bytes(&[0; 64], 8192)).contains("all zero"));
        let text = damaged(classify_bytes(b"[source]\nurl = \"postgres://\"\n", 30));
        assert!(
            text.contains("holds text (starting \"[source]\")"),
            "{text}"
        );
        assert!(damaged(classify_bytes(&[0xde, 0xad, 0x01, 0x00], 8192))
            .contains("does not start with the signature"));
        // A redb signature cut in the middle is not redb's.
        assert!(damaged(classify_bytes(&REDB_MAGIC[..5], 5)).contains("not a steward state file"));
    }

    #[test]
    fn missing_empty_and_directory_paths() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        assert_eq!(classify(&path).unwrap(), FileKind::Missing);
        std::fs::write(&path, b"").unwrap();
        assert!(damaged(classify(&path).unwrap()).contains("empty (0 bytes)"));
        assert_eq!(classify(dir.path()).unwrap(), FileKind::NotAFile);
    }

    #[test]
    fn a_panic_becomes_an_error_with_its_message() {
        let result: Result<(), String> = guarded(|| panic!("assertion failed: len >= header"));
        let message = result.unwrap_err();
        assert!(
            message.contains("assertion failed: len >= header"),
            "{message}"
        );
        assert!(message.contains("open.rs"), "{message}");
        assert_eq!(guarded(|| 7).unwrap(), 7);
    }

    #[test]
    fn the_overlay_reads_the_file_and_keeps_writes_to_itself() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let original: Vec<u8> = (0..3 * BLOCK + 100).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &original).unwrap();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let o = Overlay::new(FileBackend::new(file)).unwrap();
        let mut buf = vec![0u8; 200];
        o.read(BLOCK - 100, &mut buf).unwrap();
        assert_eq!(
            buf,
            original[(BLOCK - 100) as usize..(BLOCK + 100) as usize]
        );
        o.write(BLOCK - 10, &[7u8; 20]).unwrap();
        o.read(BLOCK - 100, &mut buf).unwrap();
        assert_eq!(buf[90..110], [7u8; 20]);
        assert_eq!(
            buf[..90],
            original[(BLOCK - 100) as usize..(BLOCK - 10) as usize]
        );
        // Shrink into a block, grow again: the cut part reads as zero.
        o.set_len(BLOCK + 50).unwrap();
        o.set_len(5 * BLOCK).unwrap();
        let mut tail = vec![1u8; 100];
        o.read(BLOCK + 50, &mut tail).unwrap();
        assert_eq!(tail, vec![0u8; 100]);
        o.read(3 * BLOCK, &mut tail).unwrap();
        assert_eq!(tail, vec![0u8; 100], "beyond the cut, the file is not read");
        assert!(o.read(5 * BLOCK - 10, &mut buf).is_err(), "past the end");
        o.write(6 * BLOCK, &[9]).unwrap();
        assert_eq!(o.len().unwrap(), 6 * BLOCK + 1);
        drop(o);
        assert_eq!(
            std::fs::read(&path).unwrap(),
            original,
            "the file is untouched"
        );
    }
}
