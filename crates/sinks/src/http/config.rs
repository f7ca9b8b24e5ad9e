//! The keys of `[targets.NAME]` with `type = "http"`: url, timeouts, headers,
//! envelope, signing, bearer token and TLS files.
//!
//! Secrets (header values, tokens, signing keys) are read here, at load time,
//! from the config text, a file or an environment variable, and only ever
//! stored in [`Secret`]s; no message contains them.

use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use reqwest::header::{HeaderName, HeaderValue};
use steward_core::config::check::{
    existing_file, join, optional_secret, resolve, secret_from_env, secret_from_file, type_name,
    Errors, Reader,
};
use steward_core::config::{Secret, TargetContext};
use toml::{Table, Value};

use crate::config::{envelope, HOUR_MS};
use crate::envelope::Envelope;

pub(crate) const KEYS: &[&str] = &[
    "url",
    "timeout_ms",
    "connect_timeout_ms",
    "headers",
    "envelope",
    "signing_secret_file",
    "signing_secret_env",
    "bearer_token_file",
    "bearer_token_env",
    "client_cert_file",
    "client_key_file",
    "ca_file",
];
/// Keys of a header whose value is read from elsewhere.
pub(crate) const HEADER_SOURCE_KEYS: &[&str] = &["file", "env"];
/// Headers a target's `headers` cannot set: steward or its HTTP client sets
/// them on every request, and a configured value would be dropped without a
/// word or would break the request.
/// - `host` comes from `url`; another one would not match the TLS server name.
/// - `content-length` and `transfer-encoding` frame the body.
/// - `connection`, `keep-alive`, `proxy-connection`, `te` and `upgrade` are
///   hop-by-hop: the client manages the connection, and over HTTP/2 hyper
///   drops them.
/// - `content-type` is steward's, per envelope; the client lets a request's
///   own header win over configured ones.
///
/// Checked here only: the sink sends the headers this check let through.
pub(crate) const RESERVED_HEADERS: &[&str] = &[
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "upgrade",
    "content-type",
];

/// Built by `check` only, so the sink can rely on its rules.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub(crate) struct HttpTargetConfig {
    pub(crate) url: url::Url,
    pub(crate) timeout: Duration,
    pub(crate) connect_timeout: Duration,
    /// Extra request headers; values may be secrets (read from files or the environment).
    pub(crate) headers: Vec<(String, Secret)>,
    /// Envelope, signing, bearer token and TLS options.
    pub(crate) extra: HttpExtras,
}

/// The HTTP target's optional features; `Default` is plain, unsigned CloudEvents.
#[derive(Clone, Debug, Default)]
pub(crate) struct HttpExtras {
    pub(crate) envelope: Envelope,
    /// Standard Webhooks signing key (raw bytes, `whsec_` already decoded).
    pub(crate) signing_key: Option<SecretBytes>,
    /// Sent as `Authorization: Bearer <token>`.
    pub(crate) bearer_token: Option<Secret>,
    /// PEM certificate chain and private key for mutual TLS.
    pub(crate) client_identity: Option<(PathBuf, PathBuf)>,
    /// PEM CA certificates trusted in addition to the system's.
    pub(crate) ca_file: Option<PathBuf>,
}

/// Key bytes that never print.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct SecretBytes(pub(crate) Vec<u8>);

impl std::fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretBytes(***)")
    }
}

pub(crate) fn check(
    target: &TargetContext,
    r: &Reader,
    errs: &mut Errors,
) -> Option<HttpTargetConfig> {
    let base_dir = target.base_dir;
    let url = r
        .required_string(
            "url",
            "the endpoint, e.g. url = \"https://wms.example/steward\"",
            errs,
        )
        .and_then(|u| check_url(&r.key("url"), u, errs));

    let timeout = r.int("timeout_ms", 10_000, 1, HOUR_MS, "milliseconds", errs);
    let connect_timeout = r.int(
        "connect_timeout_ms",
        5_000,
        1,
        HOUR_MS,
        "milliseconds",
        errs,
    );
    let headers = match r.table("headers", errs) {
        Some(t) => check_headers(&r.key("headers"), t, base_dir, errs),
        None if r.has("headers") => None,
        None => Some(Vec::new()),
    };

    let extra = check_extras(r, base_dir, errs);
    if let (Some(list), Some(extra)) = (&headers, &extra) {
        if !headers_steward_sets(r, list, extra, errs) {
            return None;
        }
    }
    Some(HttpTargetConfig {
        url: url?,
        timeout: Duration::from_millis(timeout?),
        connect_timeout: Duration::from_millis(connect_timeout?),
        headers: headers?,
        extra: extra?,
    })
}

/// An absolute http(s) URL without a password. The URL itself is not quoted
/// in messages: it could carry a token in its query.
fn check_url(key: &str, text: &str, errs: &mut Errors) -> Option<url::Url> {
    let url = match url::Url::parse(text) {
        Ok(u) => u,
        Err(e) => {
            errs.add(
                key,
                format!("is not a valid URL ({e}); expected e.g. https://wms.example/steward"),
            );
            return None;
        }
    };
    if !matches!(url.scheme(), "http" | "https") {
        errs.add(
            key,
            format!(
                "scheme `{}` is not supported; use an http:// or https:// URL",
                url.scheme()
            ),
        );
        return None;
    }
    if url.password().is_some() {
        errs.add(
            key,
            "contains a password; secrets must not live in config files: send credentials in a \
             header read from a file or the environment, e.g. headers = { Authorization = \
             { env = \"WMS_TOKEN\" } }",
        );
        return None;
    }
    if url.host_str().is_none_or(str::is_empty) {
        errs.add(
            key,
            "has no host; expected e.g. https://wms.example/steward",
        );
        return None;
    }
    Some(url)
}

fn check_headers(
    key: &str,
    table: &Table,
    base_dir: &Path,
    errs: &mut Errors,
) -> Option<Vec<(String, Secret)>> {
    let mut out = Some(Vec::with_capacity(table.len()));
    let mut seen: Vec<HeaderName> = Vec::new();
    for (name, value) in table {
        let hkey = join(key, name);
        let header = match HeaderName::from_bytes(name.as_bytes()) {
            Ok(h) => Some(h),
            Err(_) => {
                errs.add(
                    &hkey,
                    format!(
                        "`{name}` is not a valid HTTP header name; use letters, digits and \
                         !#$%&'*+-.^_`|~ (e.g. X-Api-Key)"
                    ),
                );
                None
            }
        };
        let mut name_ok = header.is_some();
        if let Some(h) = header {
            if RESERVED_HEADERS.contains(&h.as_str()) {
                errs.add(
                    &hkey,
                    format!(
                        "header {name} is set by steward or its HTTP client and cannot be \
                         configured; reserved: {}",
                        RESERVED_HEADERS.join(", ")
                    ),
                );
                name_ok = false;
            } else if seen.contains(&h) {
                errs.add(&hkey, "is given twice (header names ignore case); keep one");
                name_ok = false;
            }
            seen.push(h);
        }

        let (secret, origin) = match value {
            Value::String(s) => (Some(Secret::new(s.as_str())), "as written".to_string()),
            Value::Table(t) => {
                let r = Reader::new(&hkey, t, HEADER_SOURCE_KEYS, errs);
                let file = r.string("file", errs);
                let env = r.string("env", errs);
                match (file, env) {
                    (Some(f), None) => (
                        secret_from_file(&r.key("file"), base_dir, f, errs),
                        format!("read from `{}`", resolve(base_dir, f).display()),
                    ),
                    (None, Some(e)) => (
                        secret_from_env(&r.key("env"), e, errs),
                        format!("read from environment variable {e}"),
                    ),
                    (Some(_), Some(_)) => {
                        errs.add(&hkey, "give only one of file and env");
                        (None, String::new())
                    }
                    (None, None) => {
                        if !r.has("file") && !r.has("env") {
                            errs.add(
                                &hkey,
                                "give the value's source: { file = \"/path\" } or { env = \"NAME\" }",
                            );
                        }
                        (None, String::new())
                    }
                }
            }
            other => {
                errs.add(
                    &hkey,
                    format!(
                        "expected a string, {{ file = \"/path\" }} or {{ env = \"NAME\" }}, found {}",
                        type_name(other)
                    ),
                );
                (None, String::new())
            }
        };
        let value_ok = match &secret {
            Some(s) if HeaderValue::from_str(s.expose()).is_err() => {
                errs.add(
                    &hkey,
                    format!(
                        "the value ({origin}) is not a valid HTTP header value: use printable \
                         ASCII only (no newlines or other control characters)"
                    ),
                );
                false
            }
            Some(_) => true,
            None => false,
        };
        match (secret, out.as_mut()) {
            (Some(s), Some(list)) if name_ok && value_ok => list.push((name.clone(), s)),
            _ => out = None,
        }
    }
    out
}

/// Headers that `bearer_token_*` or `signing_secret_*` set on each request,
/// where they would replace the configured ones; `false` after reporting one.
fn headers_steward_sets(
    r: &Reader,
    headers: &[(String, Secret)],
    extra: &HttpExtras,
    errs: &mut Errors,
) -> bool {
    let mut ok = true;
    for (name, _) in headers {
        let lower = name.to_ascii_lowercase();
        let set_by = if extra.bearer_token.is_some() && lower == "authorization" {
            ["bearer_token_file", "bearer_token_env"]
        } else if extra.signing_key.is_some() && super::signing::HEADERS.contains(&lower.as_str()) {
            ["signing_secret_file", "signing_secret_env"]
        } else {
            continue;
        };
        let [file, env] = set_by;
        let by = if r.has(file) { file } else { env };
        errs.add(
            &join(&r.key("headers"), name),
            format!(
                "{name} is set by {}, which would replace this value; remove the header or \
                 {by}",
                r.key(by)
            ),
        );
        ok = false;
    }
    ok
}

/// Standard Webhooks keys are often written `whsec_<base64>`: that form is
/// decoded to the key bytes; any other text is used as is.
pub(crate) fn signing_key(secret: &Secret) -> Result<SecretBytes, String> {
    match secret.expose().strip_prefix("whsec_") {
        Some(b64) => base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map(SecretBytes)
            .map_err(|_| {
                "starts with whsec_ but the rest is not valid base64; give the key exactly as \
                 the receiver issued it"
                    .to_string()
            }),
        None => Ok(SecretBytes(secret.expose().as_bytes().to_vec())),
    }
}

/// Envelope, signing, bearer token and TLS files.
fn check_extras(r: &Reader, base_dir: &Path, errs: &mut Errors) -> Option<HttpExtras> {
    let envelope = envelope(r, errs);
    let signing = optional_secret(r, "signing_secret", base_dir, errs);
    let signing_key = match signing {
        Some(Some(s)) => match signing_key(&s) {
            Ok(k) => Some(Some(k)),
            Err(m) => {
                let which = if r.has("signing_secret_file") {
                    "signing_secret_file"
                } else {
                    "signing_secret_env"
                };
                errs.add(&r.key(which), format!("the secret {m}"));
                None
            }
        },
        Some(None) => Some(None),
        None => None,
    };
    let bearer_token = optional_secret(r, "bearer_token", base_dir, errs);
    if let Some(Some(t)) = &bearer_token {
        if HeaderValue::from_str(&format!("Bearer {}", t.expose())).is_err() {
            errs.add(
                &r.key("bearer_token_file"),
                "the token is not valid in an HTTP header (no newlines or control characters)",
            );
        }
    }
    let cert = existing_file(r, "client_cert_file", base_dir, errs);
    let key = existing_file(r, "client_key_file", base_dir, errs);
    let client_identity = match (cert, key) {
        (Some(Some(c)), Some(Some(k))) => Some(Some((c, k))),
        (Some(None), Some(None)) => Some(None),
        (Some(Some(_)), Some(None)) => {
            errs.add(
                &r.key("client_key_file"),
                "missing; client_cert_file needs the matching private key (PEM)",
            );
            None
        }
        (Some(None), Some(Some(_))) => {
            errs.add(
                &r.key("client_cert_file"),
                "missing; client_key_file needs the matching certificate chain (PEM)",
            );
            None
        }
        _ => None,
    };
    let ca_file = existing_file(r, "ca_file", base_dir, errs);
    Some(HttpExtras {
        envelope: envelope?,
        signing_key: signing_key?,
        bearer_token: bearer_token?,
        client_identity: client_identity?,
        ca_file: ca_file?,
    })
}
