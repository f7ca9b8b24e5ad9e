//! Errors of the replication wire client.
//!
//! Messages say what happened and, where the fix is on our side, which
//! configuration key to change. No variant ever carries the password.

use std::fmt;

/// Everything that can go wrong talking to the source PostgreSQL server.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// Reading from or writing to the socket failed.
    #[error("I/O error talking to the source PostgreSQL server: {0}")]
    Io(#[from] std::io::Error),

    /// TLS could not be set up: configuration, handshake or certificate.
    #[error("TLS to the source PostgreSQL server: {0}")]
    Tls(String),

    /// Logging in failed: the server refused the credentials at startup, the
    /// password could not be read, or the md5/SCRAM exchange broke down.
    #[error("authentication with the source PostgreSQL server failed: {0}")]
    Auth(String),

    /// The server asked for a password and `source` has none.
    #[error(
        "the source PostgreSQL server asked for a password but none is configured; \
         set source.password_file or source.password_env"
    )]
    NoPassword,

    /// The server sent an ErrorResponse.
    #[error("{}", ServerDisplay { code, message, hint: hint.as_deref() })]
    Server {
        /// Non-localized severity when the server sends one (ERROR, FATAL, PANIC).
        severity: String,
        /// SQLSTATE, e.g. `42704`.
        code: String,
        /// The primary message.
        message: String,
        /// Not shown by `Display`: it can quote row values.
        detail: Option<String>,
        /// The server's suggestion how to fix it.
        hint: Option<String>,
    },

    /// The server sent something this client does not expect or cannot
    /// parse, or a value cannot be sent (e.g. it contains a NUL).
    #[error("protocol error talking to the source PostgreSQL server: {0}")]
    Protocol(String),

    /// The configuration asks for something this server cannot do.
    #[error("{0}")]
    Unsupported(String),

    /// The connection ended in the middle of the session.
    #[error("the source PostgreSQL server closed the connection unexpectedly")]
    Closed,

    /// None of the servers of a multi-host URL was reachable in the role
    /// `target_session_attrs` asks for (a failover in progress, say).
    #[error("no server of {url} can be used{wanted}: {tried}")]
    NoSuitableHost {
        /// The URL, without a password.
        url: String,
        /// ` as target_session_attrs=...`, or empty for `any`.
        wanted: String,
        /// Each server with why it was passed over.
        tried: String,
    },

    /// Connecting took longer than `source.connect_timeout`.
    #[error(
        "timed out connecting to the source PostgreSQL server; check that it is reachable \
         or raise source.connect_timeout"
    )]
    Timeout,
}

struct ServerDisplay<'a> {
    code: &'a str,
    message: &'a str,
    hint: Option<&'a str>,
}

impl fmt::Display for ServerDisplay<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "source server error {}: {}", self.code, self.message)?;
        if let Some(hint) = self.hint {
            write!(f, " (hint: {hint})")?;
        }
        Ok(())
    }
}

impl WireError {
    /// The SQLSTATE of a server error.
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            WireError::Server { code, .. } => Some(code),
            _ => None,
        }
    }

    /// Whether retrying later (with a fresh connection) may succeed without
    /// anyone changing configuration: network trouble, server restarts,
    /// resource exhaustion. Authentication and protocol errors are not.
    pub fn is_transient(&self) -> bool {
        match self {
            WireError::Io(_)
            | WireError::Closed
            | WireError::Timeout
            | WireError::NoSuitableHost { .. } => true,
            WireError::Server { code, .. } => {
                // 08: connection exception; 57P01..03: admin/crash shutdown,
                // cannot connect now (starting up); 53: insufficient resources
                // (too many connections, disk full, out of memory).
                code.starts_with("08")
                    || matches!(code.as_str(), "57P01" | "57P02" | "57P03")
                    || code.starts_with("53")
            }
            WireError::Tls(_)
            | WireError::Auth(_)
            | WireError::NoPassword
            | WireError::Protocol(_)
            | WireError::Unsupported(_) => false,
        }
    }

    /// The server refused the credentials (wrong or rotated password, a
    /// pg_hba.conf rule) or the password could not be read. Worth retrying
    /// on a connection that worked before: the password file may be
    /// updated, or the rule fixed, while steward waits.
    pub fn is_auth_failure(&self) -> bool {
        match self {
            WireError::Auth(_) => true,
            WireError::Server { code, .. } => code.starts_with("28"),
            _ => false,
        }
    }

    pub(crate) fn protocol(msg: impl Into<String>) -> WireError {
        WireError::Protocol(msg.into())
    }
}

/// A tokio-postgres error for logs and status: for a server error its
/// SQLSTATE, message, detail and hint (tokio-postgres' own `Display` says
/// only "db error"); otherwise the error and its causes.
pub fn describe_pg_error(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        let mut text = format!("{} {}: {}", db.severity(), db.code().code(), db.message());
        if let Some(detail) = db.detail() {
            text.push_str(&format!(" (detail: {detail})"));
        }
        if let Some(hint) = db.hint() {
            text.push_str(&format!(" (hint: {hint})"));
        }
        return text;
    }
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let cause = s.to_string();
        if !text.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(code: &str) -> WireError {
        WireError::Server {
            severity: "FATAL".into(),
            code: code.into(),
            message: "m".into(),
            detail: Some("Key (id)=(5) already exists".into()),
            hint: None,
        }
    }

    #[test]
    fn transient_classification() {
        for code in [
            "08006", "08001", "57P01", "57P02", "57P03", "53300", "53100",
        ] {
            assert!(server(code).is_transient(), "{code}");
        }
        for code in ["28P01", "42501", "42704", "57014", "55000"] {
            assert!(!server(code).is_transient(), "{code}");
        }
        assert!(WireError::Closed.is_transient());
        assert!(WireError::Timeout.is_transient());
        assert!(WireError::Io(std::io::Error::other("x")).is_transient());
        assert!(!WireError::Auth("x".into()).is_transient());
        assert!(!WireError::NoPassword.is_transient());
        assert!(!WireError::Protocol("x".into()).is_transient());
        assert!(!WireError::Tls("x".into()).is_transient());
    }

    #[test]
    fn server_display_shows_code_message_hint_not_detail() {
        let e = WireError::Server {
            severity: "ERROR".into(),
            code: "42704".into(),
            message: "replication slot \"s\" does not exist".into(),
            detail: Some("secret row data".into()),
            hint: Some("create it".into()),
        };
        let text = e.to_string();
        assert!(text.contains("42704"));
        assert!(text.contains("does not exist"));
        assert!(text.contains("hint: create it"));
        assert!(!text.contains("secret row data"));
        assert_eq!(e.sqlstate(), Some("42704"));
        assert_eq!(WireError::Closed.sqlstate(), None);
    }

    #[test]
    fn no_password_names_the_keys() {
        let text = WireError::NoPassword.to_string();
        assert!(text.contains("source.password_file"));
        assert!(text.contains("source.password_env"));
    }
}
