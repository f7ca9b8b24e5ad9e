//! steward's integration tests, one module per area, in one test binary.
//!
//! One binary rather than one per file: each test binary links the whole
//! daemon, so a change in any crate used to relink nineteen of them; the
//! modules also share one throwaway PostgreSQL cluster (a database per test).
//! Run one area with `cargo test --test it delivery::`.

mod support;

mod backup;
mod cli;
mod console;
mod console_browser;
mod control;
mod credentials;
mod delivery;
mod failover;
mod faults;
mod governance;
mod locks;
mod one_gate;
mod operations;
mod packaging;
mod pipeline;
mod poison;
mod properties;
mod reconcile;
mod record_states;
mod record_view;
mod schema;
mod slot;
mod snapshot;
mod state_file;
mod streaming;
mod targets;
mod versions;
