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
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}
