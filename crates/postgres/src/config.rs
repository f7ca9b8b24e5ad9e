//! Connection and replication settings of a source database.

use std::path::PathBuf;
use std::time::Duration;

use crate::Secret;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyFull,
}

impl SslMode {
    /// As written in `source.url` (`sslmode=...`).
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

#[derive(Clone, Debug)]
pub struct SourceConfig {
    /// The URL as written, minus any password, for messages.
    pub url_display: String,
    /// A host name, an IP address, or a directory holding the server's Unix socket.
    pub host: String,
    pub port: u16,
    pub user: String,
    pub dbname: String,
    pub password: Option<Secret>,
    pub sslmode: SslMode,
    /// PEM file with the CA certificates to trust instead of the system's.
    pub sslrootcert: Option<PathBuf>,
    pub connect_timeout: Duration,
    pub slot: String,
    pub publication: String,
    /// How often a standby status update is sent while streaming.
    pub status_interval: Duration,
    /// Create the publication when it does not exist (otherwise: error).
    pub create_publication: bool,
    /// How often a heartbeat message is written to the WAL; `None` = off.
    pub heartbeat_interval: Option<Duration>,
    /// Let PostgreSQL 14+ stream large transactions before they commit
    /// (pgoutput protocol 2); they are spilled to the state file meanwhile.
    pub streaming: bool,
}
