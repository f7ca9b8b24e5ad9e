// mimalloc: the pipeline allocates and frees many small strings and JSON
// values per event; glibc malloc spent a quarter of steward's CPU time on
// them (perf, W2 bench) and fragments under two threads.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    steward::cli::main()
}
