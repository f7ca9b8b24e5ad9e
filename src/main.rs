// mimalloc: the pipeline allocates and frees many small strings and JSON
// values per event; glibc malloc spends a quarter of steward's CPU time on
// them (perf on `cargo bench --bench e2e -- W2`) and fragments under two
// threads.
#[cfg(not(feature = "system-alloc"))]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    bound_allocator_memory();
    steward::cli::main()
}

/// steward's heap is small but churns: batches are built, committed and
/// dropped. Draining a backlog (`STEWARD_BENCH_ROWS=100000 cargo bench
/// --bench e2e -- W1`) peaks at about 35 MiB of heap (heaptrack as
/// `STEWARD_BENCH_WRAPPER`), and two allocator defaults turn the churn into
/// resident memory (peak RSS of the same run): mimalloc asks
/// for transparent huge pages, so every first touch of a region commits and
/// zeroes 2 MiB (188 MiB with the defaults), and it returns freed memory to
/// the OS only after a delay, during which the next batch takes fresh pages
/// (122 MiB without huge pages, 70 MiB with neither). An operator's
/// `MIMALLOC_PURGE_DELAY` still wins.
#[cfg(not(feature = "system-alloc"))]
fn bound_allocator_memory() {
    /// `mi_option_purge_delay` in mimalloc's `mi_option_t` (libmimalloc-sys
    /// does not name it).
    const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    // mimalloc read its environment before `main`, so setting the variable
    // now would be too late: set the option itself.
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: stores an integer option; 15 is a valid index in this mimalloc.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0) };
    }
    #[cfg(target_os = "linux")]
    if let Err(e) = nix::sys::prctl::set_thp_disable(true) {
        // Only memory efficiency is at stake: carry on.
        eprintln!("steward: cannot opt out of transparent huge pages: {e}");
    }
}

/// The system allocator has neither setting.
#[cfg(feature = "system-alloc")]
fn bound_allocator_memory() {}
