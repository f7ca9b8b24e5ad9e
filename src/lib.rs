//! steward: governed master data from Odoo's PostgreSQL write-ahead log.
//!
//! Data flows one way through the stages, each a crate of this workspace:
//!
//! ```text
//!  PostgreSQL ──pgoutput──▶ source ──Change──▶ core ──Event──▶ store ──outbox──▶ sinks ──▶ targets
//!  (walsender)              slot, stream,      mapping,        redb: checkpoint,  one cursor and
//!  steward-postgres         snapshot           governance      outbox per target  one task per target
//!      ▲                                                            │
//!      └────────── standby status: flush = durable LSN ◀────────────┘ (via daemon)
//! ```
//!
//! This crate is the daemon, which wires the stages together and owns the
//! durable LSN (with its metrics and health endpoint), and the command line. `steward-devkit`
//! holds the throwaway PostgreSQL cluster and recording HTTP receiver used
//! by `steward demo`, the tests and the benchmarks.

pub mod cli;
pub mod console;
pub mod daemon;
