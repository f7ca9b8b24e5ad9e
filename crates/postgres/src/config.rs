//! Connection and replication settings of a source database.

use std::path::PathBuf;
use std::time::Duration;

use crate::Secret;

/// TLS to the source, as libpq's `sslmode` (`allow` and `verify-ca` are not
/// offered).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SslMode {
    /// Plain TCP only.
    Disable,
    /// TLS when the server offers it, plain TCP otherwise; the server is not
    /// authenticated.
    Prefer,
    /// TLS or no connection; the server is not authenticated.
    Require,
    /// TLS with the certificate chain checked against `sslrootcert` (or the
    /// system's roots) and the host name checked against the certificate.
    VerifyFull,
}

impl SslMode {
    /// As written in `source.url` (`sslmode=...`).
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

/// Where and how to reach the source database, and which slot and
/// publication to replicate from (the `[source]` section of the configuration).
#[derive(Clone, Debug)]
pub struct SourceConfig {
    /// The URL as written, minus any password, for messages.
    pub url_display: String,
    /// A host name, an IP address, or a directory holding the server's Unix socket.
    pub host: String,
    /// TCP port, or the suffix of the socket file name (`.s.PGSQL.<port>`).
    pub port: u16,
    /// Role to log in as; it needs the REPLICATION attribute.
    pub user: String,
    /// Database to replicate.
    pub dbname: String,
    /// Re-read from its file or variable at each connection attempt; `None`
    /// when the server asks for none (trust, peer).
    pub password: Option<Secret>,
    /// TLS requirement.
    pub sslmode: SslMode,
    /// PEM file with the CA certificates to trust instead of the system's.
    pub sslrootcert: Option<PathBuf>,
    /// Limit for establishing a connection (TCP, TLS and authentication);
    /// zero means no limit, as in libpq.
    pub connect_timeout: Duration,
    /// Name of the logical replication slot.
    pub slot: String,
    /// Name of the publication the slot streams.
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
