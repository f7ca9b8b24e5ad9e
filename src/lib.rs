//! steward: governed master data from Odoo's PostgreSQL write-ahead log.
//!
//! Data flows one way through the stages, each in its own folder:
//!
//! ```text
//!  PostgreSQL ──pgoutput──▶ source ──Change──▶ pipeline ──Event──▶ store ──outbox──▶ sinks ──▶ targets
//!  (walsender)              wire, decoder,      table selection,    redb: checkpoint,   one cursor and
//!                           slot, snapshot      mapping             outbox per target   one task per target
//!      ▲                                                               │
//!      └────────── standby status: flush = durable LSN ◀───────────────┘ (via daemon)
//! ```
//!
//! `daemon` wires the stages together and owns the durable LSN; `cli` is the
//! command line. `dev` holds the throwaway PostgreSQL cluster and recording
//! HTTP receiver used by `steward demo`, the tests and the benchmarks.

pub mod cli;
pub mod config;
pub mod daemon;
pub mod dev;
pub mod files;
pub mod metrics;
pub mod model;
pub mod pipeline;
pub mod sinks;
pub mod source;
pub mod store;
