// mimalloc: the pipeline allocates and frees many small strings and JSON
// values per event; glibc malloc spent a quarter of steward's CPU time on
// them (perf, W2 bench) and fragments under two threads.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    bound_allocator_memory();
    steward::cli::main()
}

/// steward's heap is small (about 35 MiB at peak draining a backlog, by
/// heaptrack) but churns: batches are built, committed and dropped. Two
/// allocator defaults turned that churn into resident memory (W1 bench,
/// 100,000 inserts, peak RSS): mimalloc asks for transparent huge pages, so
/// every first touch of a region commits and zeroes 2 MiB (188 MiB), and it
/// returns freed memory to the OS only after a delay, during which the next
/// batch takes fresh pages (122 MiB without huge pages, 70 MiB with both
/// changes). An operator's `MIMALLOC_PURGE_DELAY` still wins.
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
