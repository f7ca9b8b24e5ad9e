#![warn(missing_docs)]

//! Development harness shared by `steward demo`, the tests and the benchmarks:
//! a throwaway PostgreSQL cluster with `wal_level=logical` and a recording
//! HTTP receiver.

pub mod cluster;
pub mod pgbin;
pub mod receiver;
pub mod standby;
pub mod tls;

pub use cluster::{DevCluster, DevClusterOptions, DevError};
pub use pgbin::postgres_bin_dir;
pub use receiver::Receiver;

/// Peak resident set size (VmHWM) of a running process, in KiB; 0 when unknown.
pub fn peak_rss_kib(pid: u32) -> u64 {
    proc_status_kib(pid, "VmHWM:")
}

/// Resident set size now (VmRSS) of a running process, in KiB; 0 when unknown.
pub fn rss_kib(pid: u32) -> u64 {
    proc_status_kib(pid, "VmRSS:")
}

fn proc_status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// Stops `child` as systemd would (SIGTERM) and waits for it to exit.
pub fn terminate(child: &mut std::process::Child) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = child.wait();
}

/// A child process terminated (SIGTERM, then waited for) when dropped, so
/// a bench that fails half-way does not leave a steward running.
pub struct TerminateOnDrop(pub std::process::Child);

impl Drop for TerminateOnDrop {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            terminate(&mut self.0);
        }
    }
}

/// A command that runs `binary`, under `STEWARD_BENCH_WRAPPER` if set (the
/// benches): e.g. `valgrind --tool=callgrind` for instruction counts, which
/// do not vary with the machine's load as times do, or a script that runs
/// another build for an A/B comparison. The wrapper gets `binary` as its
/// first argument.
pub fn bench_command(binary: &str) -> std::process::Command {
    let wrapper = std::env::var("STEWARD_BENCH_WRAPPER").unwrap_or_default();
    match wrapper.split_whitespace().collect::<Vec<_>>()[..] {
        [] => std::process::Command::new(binary),
        [program, ref args @ ..] => {
            let mut c = std::process::Command::new(program);
            c.args(args).arg(binary);
            c
        }
    }
}
