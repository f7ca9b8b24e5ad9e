#![warn(missing_docs)]

//! The replication source: slot and publication management, the streaming
//! session (transactions, protocol-2 streamed transactions spilled to the
//! state file), and table snapshots at a slot's consistent point.

pub mod slot;
pub mod snapshot;
mod spill;
pub mod stream;
