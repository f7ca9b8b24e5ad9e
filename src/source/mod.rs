//! The replication source: wire client, pgoutput decoder, slot and
//! publication management.

pub mod pgoutput;
pub mod slot;
pub mod snapshot;
pub mod spill;
pub mod stream;
pub mod wire;
