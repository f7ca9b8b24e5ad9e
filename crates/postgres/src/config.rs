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

/// One server of a multi-host `source.url`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceHost {
    /// A host name, an IP address, or a directory holding the server's Unix socket.
    pub host: String,
    /// TCP port, or the suffix of the socket file name.
    pub port: u16,
}

/// Which server of the host list a connection accepts, as libpq's
/// `target_session_attrs` (`prefer-standby` and `read-only` are not offered).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TargetSessionAttrs {
    /// The first server that accepts the connection.
    #[default]
    Any,
    /// A server that accepts writes: not in recovery and not
    /// `default_transaction_read_only`.
    ReadWrite,
    /// A server that is not in recovery.
    Primary,
    /// A server in recovery (a hot standby).
    Standby,
}

impl TargetSessionAttrs {
    /// As written in a URL (`target_session_attrs=...`).
    pub fn parse(text: &str) -> Option<TargetSessionAttrs> {
        match text {
            "any" => Some(TargetSessionAttrs::Any),
            "read-write" => Some(TargetSessionAttrs::ReadWrite),
            "primary" => Some(TargetSessionAttrs::Primary),
            "standby" => Some(TargetSessionAttrs::Standby),
            _ => None,
        }
    }

    /// As written in a URL.
    pub fn as_str(self) -> &'static str {
        match self {
            TargetSessionAttrs::Any => "any",
            TargetSessionAttrs::ReadWrite => "read-write",
            TargetSessionAttrs::Primary => "primary",
            TargetSessionAttrs::Standby => "standby",
        }
    }

    /// Whether a server in this state is acceptable.
    pub(crate) fn accepts(self, in_recovery: bool, read_only: bool) -> bool {
        match self {
            TargetSessionAttrs::Any => true,
            TargetSessionAttrs::ReadWrite => !in_recovery && !read_only,
            TargetSessionAttrs::Primary => !in_recovery,
            TargetSessionAttrs::Standby => in_recovery,
        }
    }
}

/// Where and how to reach the source database, and which slot and
/// publication to replicate from (the `[source]` section of the configuration).
#[derive(Clone, Debug)]
pub struct SourceConfig {
    /// The URL as written, minus any password, for messages.
    pub url_display: String,
    /// A host name, an IP address, or a directory holding the server's Unix
    /// socket; the first of several.
    pub host: String,
    /// TCP port, or the suffix of the socket file name (`.s.PGSQL.<port>`).
    pub port: u16,
    /// Further servers, tried in order after `host` (a primary and its
    /// standbys: after a failover the connection finds the new primary).
    pub other_hosts: Vec<SourceHost>,
    /// Which of the servers a connection accepts.
    pub target_session_attrs: TargetSessionAttrs,
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
    /// Create the slot as a failover slot (PostgreSQL 17+), which standbys
    /// with `sync_replication_slots` keep a synchronised copy of.
    pub failover: bool,
    /// Where heartbeats are written when not to this server (a standby
    /// cannot write WAL): the primary, with the same credentials.
    pub heartbeat_via: Option<Box<SourceConfig>>,
}

impl SourceConfig {
    /// Every server of the URL, in the order they are tried.
    pub fn hosts(&self) -> Vec<SourceHost> {
        let mut hosts = vec![SourceHost {
            host: self.host.clone(),
            port: self.port,
        }];
        hosts.extend(self.other_hosts.iter().cloned());
        hosts
    }

    /// This configuration for one of its servers alone, accepting it
    /// whatever its role.
    pub fn at_host(&self, host: &SourceHost) -> SourceConfig {
        SourceConfig {
            host: host.host.clone(),
            port: host.port,
            other_hosts: Vec::new(),
            target_session_attrs: TargetSessionAttrs::Any,
            ..self.clone()
        }
    }

    /// Whether a connection must try several servers or check the role of
    /// the one it reaches.
    pub(crate) fn needs_host_selection(&self) -> bool {
        !self.other_hosts.is_empty() || self.target_session_attrs != TargetSessionAttrs::Any
    }
}
