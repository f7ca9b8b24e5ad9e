//! The control API: JSON over HTTP/1.1 on a Unix socket next to the state
//! file (`[control] socket`), served by the daemon for the command line
//! and the console; both call [`Control`]. Documented in `docs/control-api.md`.
//!
//! The socket exists exactly while a daemon owns the state file: it is
//! bound before the state file is opened and removed on exit, so a command
//! that can connect knows it must not open the state file itself, and one
//! that cannot (no socket, or a stale one left by a kill -9) may.
//!
//! Access is the socket file's: mode 0600 (the daemon's user) or, with
//! `[control] group`, 0660 and that group. Every action is written to the
//! audit trail under the name of the Unix user who connected (the peer's
//! credentials, `SO_PEERCRED`).

mod server;
mod service;
pub mod wire;

pub use server::{Attached, Server};
pub use service::{ApiError, Control, RunHandles};

/// The API's version: the first segment of every path (`/v1/...`). Within
/// a version fields may be added to responses and optional fields to
/// requests; anything else makes a new version.
pub const API_VERSION: &str = "v1";
