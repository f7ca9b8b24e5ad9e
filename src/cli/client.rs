//! The command line's side of the control API (see `daemon::api`): while a
//! daemon serves the socket, every command asks it; otherwise the command
//! opens the state file itself.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::daemon::api::wire::ErrorDetail;
use steward_core::config::Config;
use steward_store::{Store, StoreError};

/// How long a command waits for a state file another command holds for a
/// moment (no daemon serves the socket meanwhile).
const LOCK_PATIENCE: Duration = Duration::from_secs(5);

/// How long a request waits for a daemon that is starting (it may wait
/// for the state file and read tables before it can answer).
const START_PATIENCE: Duration = Duration::from_secs(120);

/// How a command reaches the state: through the running daemon, or the
/// state file itself when no daemon runs.
pub(crate) enum Access {
    Daemon(Client),
    Store(Store),
}

/// Connects to the running daemon, or opens the state file when no daemon
/// serves the control socket. A state file held without a daemon (another
/// command) is waited for a few seconds.
pub(crate) async fn access(config: &Config) -> anyhow::Result<Access> {
    let started = Instant::now();
    loop {
        if let Some(client) = connect(config).await? {
            return Ok(Access::Daemon(client));
        }
        match Store::open(&config.state.path) {
            Ok(store) => return Ok(Access::Store(store)),
            Err(e @ StoreError::Locked { .. }) => {
                if started.elapsed() >= LOCK_PATIENCE {
                    let holder = crate::daemon::lock::holder(&config.state.path)
                        .map_or_else(|| "another process".to_string(), |h| h.to_string());
                    return Err(anyhow::Error::from(e).context(format!(
                        "the state file is held by {holder}, and no daemon serves the control \
                         socket {}",
                        config.control_socket().display()
                    )));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// The running daemon's API, if a daemon serves the socket. A socket
/// nobody listens on (left by a daemon killed with -9) means no daemon; a
/// socket this user may not use is an error, never a reason to open the
/// state file behind the daemon's back.
pub(crate) async fn connect(config: &Config) -> anyhow::Result<Option<Client>> {
    let socket = config.control_socket();
    match tokio::net::UnixStream::connect(&socket).await {
        Ok(_) => Ok(Some(Client { socket })),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            Ok(None)
        }
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            let who = match &config.control.group {
                Some(group) => format!(
                    "its user and the members of group `{group}` may use it; ask an \
                     administrator to add you to group `{group}`"
                ),
                None => "only its user may use it; run the command as that user, or ask an \
                         administrator to set [control] group and add you to that group"
                    .to_string(),
            };
            anyhow::bail!(
                "permission denied on the control socket {}: the daemon runs, and {who}",
                socket.display()
            )
        }
        Err(e) => Err(anyhow::anyhow!(
            "cannot connect to the daemon's control socket {}: {e}",
            socket.display()
        )),
    }
}

/// Requests to the daemon, one connection each.
pub(crate) struct Client {
    socket: PathBuf,
}

/// The daemon's answer: the body, or its error.
pub(crate) type Answer<T> = Result<T, ApiFailure>;

/// An error the daemon answered with.
#[derive(Debug)]
pub(crate) struct ApiFailure {
    pub error: ErrorDetail,
}

impl std::fmt::Display for ApiFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.error.message)
    }
}

impl Client {
    /// `GET` `path` (segments, each escaped) with `query` parameters.
    pub(crate) async fn get<T: DeserializeOwned>(
        &self,
        path: &[&str],
        query: &[(&str, Option<String>)],
    ) -> anyhow::Result<Answer<T>> {
        self.call(Method::GET, &target(path, query), None).await
    }

    /// `POST` `body` as JSON to `path`.
    pub(crate) async fn post<T: DeserializeOwned>(
        &self,
        path: &[&str],
        body: &impl Serialize,
    ) -> anyhow::Result<Answer<T>> {
        let body = serde_json::to_vec(body)?;
        self.call(Method::POST, &target(path, &[]), Some(body))
            .await
    }

    /// Sends the request; a daemon still starting is asked again until it
    /// answers (or [`START_PATIENCE`] has passed).
    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        target: &str,
        body: Option<Vec<u8>>,
    ) -> anyhow::Result<Answer<T>> {
        let started = Instant::now();
        loop {
            let answer = self.call_once(method.clone(), target, body.clone()).await?;
            match answer {
                Err(f) if f.error.code == "starting" && started.elapsed() < START_PATIENCE => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                answer => return Ok(answer),
            }
        }
    }

    async fn call_once<T: DeserializeOwned>(
        &self,
        method: Method,
        target: &str,
        body: Option<Vec<u8>>,
    ) -> anyhow::Result<Answer<T>> {
        let context = || format!("the daemon's control socket {}", self.socket.display());
        let stream = tokio::net::UnixStream::connect(&self.socket)
            .await
            .with_context(|| format!("cannot connect to {}", context()))?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .with_context(context)?;
        let connection = tokio::spawn(connection);
        let request = hyper::Request::builder()
            .method(method)
            .uri(target)
            .header(hyper::header::HOST, "steward")
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body.unwrap_or_default())))?;
        let response = sender
            .send_request(request)
            .await
            .with_context(|| format!("no answer on {}", context()))?;
        let status = response.status();
        let bytes = response
            .into_body()
            .collect()
            .await
            .with_context(|| format!("the answer on {} broke off", context()))?
            .to_bytes();
        drop(sender);
        connection.abort();
        decode(status, &bytes)
    }
}

fn decode<T: DeserializeOwned>(status: StatusCode, bytes: &[u8]) -> anyhow::Result<Answer<T>> {
    if status.is_success() {
        // A 204 has no body: `()` reads it as JSON null.
        let bytes = if bytes.is_empty() {
            &b"null"[..]
        } else {
            bytes
        };
        return serde_json::from_slice(bytes)
            .map(Ok)
            .with_context(|| format!("the daemon's answer ({status}) is not what this steward expects; is the daemon another version?"));
    }
    match serde_json::from_slice::<crate::daemon::api::wire::ErrorBody>(bytes) {
        Ok(body) => Ok(Err(ApiFailure { error: body.error })),
        Err(_) => anyhow::bail!(
            "the daemon answered {status}: {}",
            String::from_utf8_lossy(bytes)
        ),
    }
}

/// `/v1/<segments>?<query>`, each segment and parameter escaped.
fn target(path: &[&str], query: &[(&str, Option<String>)]) -> String {
    let mut out = format!("/{}", crate::daemon::api::API_VERSION);
    for segment in path {
        out.push('/');
        escape(segment, &mut out);
    }
    let mut sep = '?';
    for (name, value) in query {
        if let Some(value) = value {
            out.push(sep);
            escape(name, &mut out);
            out.push('=');
            escape(value, &mut out);
            sep = '&';
        }
    }
    out
}

/// Percent-encodes every byte but the unreserved ones (RFC 3986), so a key
/// holding `/`, `|`, `?` or spaces stays one segment or value.
fn escape(text: &str, out: &mut String) {
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
}

/// The daemon's error as this command's failure.
pub(crate) fn refused(failure: ApiFailure) -> anyhow::Error {
    anyhow::anyhow!("{}", failure.error.message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_and_queries_are_escaped() {
        assert_eq!(target(&["status"], &[]), "/v1/status");
        assert_eq!(
            target(&["quarantine", "product", "7|a b/c", "release"], &[]),
            "/v1/quarantine/product/7%7Ca%20b%2Fc/release"
        );
        assert_eq!(
            target(
                &["audit"],
                &[
                    ("entity", Some("product".into())),
                    ("key", None),
                    ("user", Some("a&b".into()))
                ]
            ),
            "/v1/audit?entity=product&user=a%26b"
        );
    }

    #[test]
    fn errors_and_bodies_are_decoded() {
        let ok: Answer<crate::daemon::api::wire::Count> =
            decode(StatusCode::OK, br#"{"count":3}"#).unwrap();
        assert_eq!(ok.unwrap().count, 3);
        let none: Answer<()> = decode(StatusCode::NO_CONTENT, b"").unwrap();
        assert!(none.is_ok());
        let failed: Answer<()> = decode(
            StatusCode::CONFLICT,
            br#"{"error":{"code":"still_quarantined","message":"rule x fails"}}"#,
        )
        .unwrap();
        let failure = failed.unwrap_err();
        assert_eq!(failure.error.code, "still_quarantined");
        assert!(decode::<()>(StatusCode::BAD_GATEWAY, b"<html>").is_err());
    }
}
