//! Development harness shared by `steward demo`, the tests and the benchmarks:
//! a throwaway PostgreSQL cluster with `wal_level=logical` and a recording
//! HTTP receiver.

pub mod cluster;
pub mod receiver;
pub mod tls;

pub use cluster::{DevCluster, DevClusterOptions, DevError};
pub use receiver::Receiver;
