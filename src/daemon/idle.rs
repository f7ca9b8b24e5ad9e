//! Gives memory back to the system when a thread falls idle.
//!
//! mimalloc returns a block freed by another thread to the heap of the
//! thread that allocated it, and that heap releases the pages only when its
//! own thread next allocates, frees or collects. The commit thread and the
//! runtime's workers pass events, batches and documents between them, so a
//! worker that goes idle after a burst would keep the pages it filled and
//! others emptied for as long as it stays idle. Each thread collects its
//! heap as it goes idle, at most once a second so that a busy runtime,
//! whose workers park thousands of times a second, does not pay for it.
//! The blocking pool's threads read the delivery drivers' batches from the
//! store, which are freed on the workers once sent; such a thread never
//! parks, so it goes through the same once-a-second collection after each
//! of those calls instead (`steward_sinks::driver::set_blocking_call_hook`,
//! and the control API's blocking calls). Ten targets,
//! `STEWARD_BENCH_SHAPES=10x1000 cargo bench --bench e2e -- SCALE`: peak
//! RSS 190–196 MiB without, 125–128 MiB with; three targets 87.5 -> 63.8 MiB.

use std::cell::Cell;
use std::time::{Duration, Instant};

const AT_MOST_EVERY: Duration = Duration::from_secs(1);

thread_local! {
    static LAST: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// How long the daemon and its commit thread wait without work before they
/// also free the buffers they keep at the size of the largest batch.
pub(crate) const RELEASE_AFTER: Duration = Duration::from_secs(2);

/// Called by a thread that has nothing to do (a runtime worker parking, the
/// commit thread with no commit waiting).
pub(crate) fn thread_idle() {
    LAST.with(|last| {
        let now = Instant::now();
        if last
            .get()
            .is_some_and(|t| now.duration_since(t) < AT_MOST_EVERY)
        {
            return;
        }
        last.set(Some(now));
        collect();
    });
}

/// Collects the calling thread's heap now (after freeing idle buffers).
/// Forced: blocks other threads freed are taken back as well, and empty
/// pages go back to the system at once (idle RSS 215 -> 171 MiB for ten
/// targets, `STEWARD_BENCH_SHAPES=10x1000 cargo bench --bench e2e --
/// SCALE`, against the unforced collection).
pub(crate) fn collect() {
    // SAFETY: mi_collect takes no pointer; it frees only memory this
    // thread's heap no longer uses. Without mimalloc as the allocator (the
    // system-alloc feature) its heap is empty and this costs nothing.
    unsafe { libmimalloc_sys::mi_collect(true) };
}
