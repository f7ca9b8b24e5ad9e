//! HTTP target: POSTs each batch as one CloudEvents 1.0 JSON batch.
//!
//! One [`HttpSink`] per target holds a pooled keep-alive client, so a steady
//! stream of batches reuses one connection. The body is built in
//! `crate::cloudevents`, the call and the classification of its outcome live in
//! [`service`]. Header values come from [`Secret`]s: they are marked
//! sensitive in the request and never appear in `Debug` output, logs or
//! messages, and neither does the URL's query or userinfo.

pub(crate) mod config;
mod service;
mod signing;

use std::fmt;
use std::time::{Duration, Instant};

use reqwest::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE, USER_AGENT};

pub(crate) use self::config::{HttpExtras, HttpTargetConfig, SecretBytes};
use crate::envelope::{self, Envelope, EnvelopeContext};
use steward_core::config::{Secret, TargetConfig};
use steward_core::model::Event;

pub(crate) use signing::{sign, webhook_id};

const USER_AGENT_VALUE: &str = concat!("steward/", env!("CARGO_PKG_VERSION"));

/// Why a batch was not accepted by the target.
///
/// `retryable == false` means the target rejected this batch for what it is
/// (a 4xx other than 408/429): sending it again unchanged will fail again.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub(crate) struct HttpDeliveryFailure {
    pub(crate) retryable: bool,
    /// The HTTP status, when the target answered at all.
    pub(crate) status: Option<u16>,
    /// Names the URL (without query or userinfo) and the cause.
    pub(crate) message: String,
    /// From `Retry-After` on a 429 or 503; the driver should wait at least this long.
    pub(crate) retry_after: Option<Duration>,
}

/// Why the HTTP sink of a target cannot be set up. The settings' rules
/// (scheme, timeouts, reserved headers, ...) are checked once, when the
/// configuration is loaded (`config`); what remains are the conversions into
/// the client's types and the files read now.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HttpSinkError {
    #[error("targets.{target}.headers: {name:?} is not a valid HTTP header name (letters, digits and !#$%&'*+-.^_`|~ only)")]
    InvalidHeaderName { target: String, name: String },
    // The value is a secret: the message names the header only.
    #[error("targets.{target}.headers.{name}: the value is not a valid HTTP header value (it must not contain control characters such as a newline; check the file or variable it is read from)")]
    InvalidHeaderValue { target: String, name: String },
    #[error("target {target}: cannot build the HTTP client: {cause}")]
    Client { target: String, cause: String },
    #[error("targets.{target}.{key}: cannot use `{path}`: {cause}")]
    TlsFile {
        target: String,
        key: &'static str,
        path: String,
        cause: String,
    },
}

pub(crate) struct HttpSink {
    client: reqwest::Client,
    url: url::Url,
    /// `url` without userinfo, query and fragment: the only form shown anywhere.
    url_display: String,
    source: String,
    target: String,
    header_names: Vec<String>,
    /// The 401 / 403 hint naming where the credentials come from.
    credentials: String,
    /// Whether steward presents a client certificate (`client_cert_file`).
    client_cert: bool,
    timeout: Duration,
    connect_timeout: Duration,
    /// Size of the previous body, to allocate the next one in one go.
    body_size_hint: usize,
    envelope: Envelope,
    ctx: EnvelopeContext,
    signing_key: Option<SecretBytes>,
}

impl fmt::Debug for HttpSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpSink")
            .field("target", &self.target)
            .field("url", &self.url_display)
            .field("source", &self.source)
            .field("headers", &self.header_names)
            .field("timeout", &self.timeout)
            .field("connect_timeout", &self.connect_timeout)
            .finish_non_exhaustive()
    }
}

impl HttpSink {
    /// `source` is the CloudEvents source attribute, "steward://<slot>".
    pub(crate) fn new(
        target: &TargetConfig,
        http: &HttpTargetConfig,
        source: String,
    ) -> Result<HttpSink, HttpSinkError> {
        let name = &target.name;
        let credentials = credentials_hint(name, http);
        let mut headers = header_map(name, &http.headers)?;
        if let Some(token) = &http.extra.bearer_token {
            let mut value =
                HeaderValue::from_str(&format!("Bearer {}", token.expose())).map_err(|_| {
                    HttpSinkError::InvalidHeaderValue {
                        target: name.clone(),
                        name: "Authorization (bearer_token)".to_string(),
                    }
                })?;
            value.set_sensitive(true);
            headers.insert(reqwest::header::AUTHORIZATION, value);
        }
        steward_postgres::install_default_provider();
        let builder = reqwest::Client::builder();
        let builder = tls_files(name, &http.extra, builder)?;
        let client = builder
            .default_headers(headers)
            .connect_timeout(http.connect_timeout)
            .timeout(http.timeout)
            // A 301/302 would turn the POST into a GET and drop the batch.
            .redirect(reqwest::redirect::Policy::none())
            .pool_idle_timeout(Duration::from_secs(90))
            .tcp_keepalive(Duration::from_secs(60))
            .tcp_nodelay(true)
            .build()
            .map_err(|e| HttpSinkError::Client {
                target: name.clone(),
                cause: error_chain(&e),
            })?;
        Ok(HttpSink {
            client,
            url: http.url.clone(),
            url_display: display_url(&http.url),
            source: source.clone(),
            target: name.clone(),
            header_names: http.headers.iter().map(|(n, _)| n.clone()).collect(),
            credentials,
            client_cert: http.extra.client_identity.is_some(),
            timeout: http.timeout,
            connect_timeout: http.connect_timeout,
            body_size_hint: 0,
            envelope: http.extra.envelope,
            ctx: EnvelopeContext {
                source: source.clone(),
                ..EnvelopeContext::default()
            },
            signing_key: http.extra.signing_key.clone(),
        })
    }

    /// Names of the source used by the Debezium envelope (slot, database, tables).
    pub(crate) fn set_envelope_context(&mut self, ctx: EnvelopeContext) {
        self.ctx = ctx;
    }

    /// POSTs the whole batch as one CloudEvents 1.0 JSON batch. Ok only on 2xx.
    ///
    /// An empty batch is not sent and counts as delivered.
    pub(crate) async fn deliver(&mut self, events: &[Event]) -> Result<(), HttpDeliveryFailure> {
        if events.is_empty() {
            return Ok(());
        }
        let mut body = Vec::with_capacity(self.body_size_hint.max(256 * events.len()));
        envelope::write_array(self.envelope, events, &self.ctx, &mut body).map_err(|e| {
            HttpDeliveryFailure {
                retryable: false,
                status: None,
                message: format!(
                    "cannot encode the batch of {} events starting at {} as JSON: {e}",
                    events.len(),
                    events[0].id
                ),
                retry_after: None,
            }
        })?;
        let bytes = body.len();
        self.body_size_hint = bytes + bytes / 8;

        let started = Instant::now();
        let mut request = self.client.post(self.url.clone()).header(
            CONTENT_TYPE,
            HeaderValue::from_static(envelope::array_content_type(self.envelope)),
        );
        if let Some(key) = &self.signing_key {
            // Signed per attempt: the timestamp must be fresh for the receiver's
            // replay window, while webhook-id stays the same across retries.
            let id = webhook_id(events);
            let timestamp = chrono::Utc::now().timestamp();
            let signature = sign(&key.0, &id, timestamp, &body);
            let [id_header, timestamp_header, signature_header] = signing::HEADERS;
            request = request
                .header(id_header, id)
                .header(timestamp_header, timestamp.to_string())
                .header(signature_header, signature);
        }
        let sent = request.body(body).send().await;
        let endpoint = service::Endpoint {
            url_display: &self.url_display,
            timeout: self.timeout,
            connect_timeout: self.connect_timeout,
            target: &self.target,
            credentials: &self.credentials,
            client_cert: self.client_cert,
        };
        let outcome = service::finish(&endpoint, sent).await;
        let elapsed_ms = started.elapsed().as_millis() as u64;
        match &outcome {
            Ok(()) => tracing::debug!(
                target_name = %self.target, url = %self.url_display, events = events.len(), bytes, elapsed_ms,
                "batch delivered"
            ),
            Err(f) => tracing::debug!(
                target_name = %self.target, events = events.len(), bytes, elapsed_ms,
                retryable = f.retryable, "batch not delivered: {}", f.message
            ),
        }
        outcome
    }
}

/// The 401 / 403 hint: the key the credentials really come from (the
/// bearer token replaces an Authorization header).
fn credentials_hint(target: &str, http: &HttpTargetConfig) -> String {
    if let Some(token) = &http.extra.bearer_token {
        let key = token
            .key()
            .map(str::to_string)
            .unwrap_or_else(|| format!("targets.{target}.bearer_token_file"));
        return format!("check the token in {key}");
    }
    match http
        .headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("authorization"))
    {
        Some((n, secret)) => match secret.key() {
            Some(key) => format!("check the credentials in {key}"),
            None => format!("check the credentials in targets.{target}.headers.{n}"),
        },
        None => format!(
            "targets.{target} sends no credentials: set bearer_token_file or bearer_token_env, \
             or an Authorization header in targets.{target}.headers"
        ),
    }
}

fn header_map(target: &str, headers: &[(String, Secret)]) -> Result<HeaderMap, HttpSinkError> {
    let mut map = HeaderMap::new();
    let mut own_user_agent = false;
    for (name, value) in headers {
        let header = HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
            HttpSinkError::InvalidHeaderName {
                target: target.to_string(),
                name: name.clone(),
            }
        })?;
        let mut value = HeaderValue::from_str(value.expose()).map_err(|_| {
            HttpSinkError::InvalidHeaderValue {
                target: target.to_string(),
                name: name.clone(),
            }
        })?;
        value.set_sensitive(true);
        own_user_agent |= header == USER_AGENT;
        map.append(header, value);
    }
    if !own_user_agent {
        map.insert(USER_AGENT, HeaderValue::from_static(USER_AGENT_VALUE));
    }
    Ok(map)
}

/// Adds the custom CA and the client certificate (mutual TLS) to the client.
fn tls_files(
    target: &str,
    extra: &HttpExtras,
    mut builder: reqwest::ClientBuilder,
) -> Result<reqwest::ClientBuilder, HttpSinkError> {
    let fail = |key: &'static str, path: &std::path::Path, cause: String| HttpSinkError::TlsFile {
        target: target.to_string(),
        key,
        path: path.display().to_string(),
        cause,
    };
    if let Some(ca) = &extra.ca_file {
        let pem = std::fs::read(ca).map_err(|e| fail("ca_file", ca, e.to_string()))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
            fail(
                "ca_file",
                ca,
                format!(
                    "not PEM certificates ({}); give the CA's PEM file",
                    error_chain(&e)
                ),
            )
        })?;
        if certs.is_empty() {
            return Err(fail(
                "ca_file",
                ca,
                "holds no certificate (expected -----BEGIN CERTIFICATE-----)".into(),
            ));
        }
        // Trusted besides the system's store (the platform verifier, as for
        // PostgreSQL over TLS), not instead of it.
        builder = builder.tls_certs_merge(certs);
    }
    if let Some((cert, key)) = &extra.client_identity {
        let mut pem =
            std::fs::read(cert).map_err(|e| fail("client_cert_file", cert, e.to_string()))?;
        pem.push(b'\n');
        pem.extend(std::fs::read(key).map_err(|e| fail("client_key_file", key, e.to_string()))?);
        let identity = reqwest::Identity::from_pem(&pem).map_err(|e| {
            fail(
                "client_cert_file",
                cert,
                format!(
                    "with client_key_file: {}; give a PEM certificate chain and its PEM \
                     (PKCS#8, RSA or EC) private key",
                    error_chain(&e)
                ),
            )
        })?;
        builder = builder.identity(identity);
    }
    Ok(builder)
}

fn display_url(url: &url::Url) -> String {
    let mut shown = url.clone();
    // Both setters only fail for URLs that cannot have userinfo (no host),
    // which http(s) URLs always have.
    let _ = shown.set_username("");
    let _ = shown.set_password(None);
    shown.set_query(None);
    shown.set_fragment(None);
    shown.to_string()
}

/// The causes of a client build error, outermost first.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        source = cause.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cloudevents::BATCH_CONTENT_TYPE;
    use steward_core::model::EventOp;
    use steward_devkit::receiver::{Behaviour, Receiver};

    const TOKEN: &str = "Bearer s3cr3t-t0ken-value";

    fn config(url: &str, timeout: Duration) -> (TargetConfig, HttpTargetConfig) {
        let http = HttpTargetConfig {
            url: url::Url::parse(url).expect("test URL"),
            timeout,
            connect_timeout: Duration::from_secs(2),
            headers: vec![("Authorization".to_string(), Secret::new(TOKEN))],
            extra: Default::default(),
        };
        let target = TargetConfig {
            name: "wms".to_string(),
            entities: vec!["product".to_string()],
            batch_max_events: 100,
            batch_linger: Duration::from_millis(10),
            retry_initial: Duration::from_millis(100),
            retry_max: Duration::from_secs(10),
            delivery: Default::default(),
            initial: steward_core::config::InitialSync::Snapshot,
            type_name: "http".into(),
            settings: std::sync::Arc::new(crate::config::SinkConfig::Http(http.clone())),
        };
        (target, http)
    }

    fn sink(url: &str, timeout: Duration) -> HttpSink {
        let (target, http) = config(url, timeout);
        HttpSink::new(&target, &http, "steward://slot1".to_string()).expect("valid config")
    }

    fn events() -> Vec<Event> {
        (0..3u32)
            .map(|i| Event {
                change: None,
                tx_id: None,
                id: Event::source_id(steward_core::model::Lsn(0x16B3748), i),
                entity: "product".to_string(),
                key: format!("{}", 10 + i),
                op: if i == 2 {
                    EventOp::Delete
                } else {
                    EventOp::Upsert
                },
                version: 0x16B3748,
                time: "2024-05-01T12:00:00Z".to_string(),
                data: serde_json::from_str(
                    r#"{"name":"Chair","price":1234567890123456789.000000001}"#,
                )
                .expect("test JSON"),
            })
            .collect()
    }

    #[tokio::test]
    async fn delivers_a_cloudevents_batch() {
        let receiver = Receiver::start().await.expect("receiver starts");
        let mut sink = sink(&receiver.url(), Duration::from_secs(5));
        sink.deliver(&events()).await.expect("2xx is Ok");
        sink.deliver(&[]).await.expect("empty batch is Ok");

        let requests = receiver.requests();
        assert_eq!(requests.len(), 1, "the empty batch is not sent");
        let req = &requests[0];
        assert_eq!(req.status, 204);
        let header = |n: &str| {
            req.headers
                .iter()
                .find(|(k, _)| k == n)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(header("content-type"), Some(BATCH_CONTENT_TYPE));
        assert_eq!(header("user-agent"), Some(USER_AGENT_VALUE));
        assert_eq!(
            header("authorization"),
            Some(TOKEN),
            "the secret reaches the server"
        );
        let body = std::str::from_utf8(&req.body).expect("utf-8 body");
        assert!(
            body.contains("1234567890123456789.000000001"),
            "exact number: {body}"
        );

        let accepted = receiver.accepted_events();
        assert_eq!(accepted.len(), 3);
        assert_eq!(receiver.accepted_count(), 3);
        for (i, ev) in accepted.iter().enumerate() {
            assert_eq!(ev["specversion"], "1.0");
            assert_eq!(
                ev["id"],
                Event::source_id(steward_core::model::Lsn(0x16B3748), i as u32)
            );
            assert_eq!(ev["source"], "steward://slot1");
            assert_eq!(ev["subject"], (10 + i).to_string());
            assert_eq!(ev["time"], "2024-05-01T12:00:00Z");
            assert_eq!(ev["datacontenttype"], "application/json");
            assert_eq!(ev["entity"], "product");
            assert_eq!(ev["version"], 0x16B3748u64.to_string());
            assert_eq!(
                ev["data"]["price"].to_string(),
                "1234567890123456789.000000001"
            );
        }
        assert_eq!(accepted[0]["type"], "steward.product.upsert");
        assert_eq!(accepted[2]["type"], "steward.product.delete");
        assert_eq!(accepted[2]["op"], "delete");
    }

    #[tokio::test]
    async fn server_errors_are_retryable_with_an_excerpt() {
        let receiver = Receiver::start().await.expect("receiver starts");
        receiver.set_behaviour(Behaviour::Fail(500));
        let mut sink = sink(
            &format!("{}?token=hidden", receiver.url()),
            Duration::from_secs(5),
        );
        let f = sink.deliver(&events()).await.expect_err("500 fails");
        assert!(f.retryable);
        assert_eq!(f.status, Some(500));
        assert_eq!(f.retry_after, None);
        assert!(
            f.message
                .starts_with(&format!("HTTP 500 from {}: ", receiver.url())),
            "{}",
            f.message
        );
        assert!(
            f.message.contains("configured to fail"),
            "body excerpt: {}",
            f.message
        );
        assert!(
            !f.message.contains("hidden"),
            "no query in messages: {}",
            f.message
        );
        assert_eq!(receiver.accepted_count(), 0);
    }

    #[tokio::test]
    async fn client_errors_are_not_retryable() {
        let receiver = Receiver::start().await.expect("receiver starts");
        receiver.set_behaviour(Behaviour::Fail(422));
        let mut sink = sink(&receiver.url(), Duration::from_secs(5));
        let f = sink.deliver(&events()).await.expect_err("422 fails");
        assert!(!f.retryable);
        assert_eq!(f.status, Some(422));

        receiver.set_behaviour(Behaviour::Fail(408));
        let f = sink.deliver(&events()).await.expect_err("408 fails");
        assert!(f.retryable, "408 Request Timeout is retryable");
    }

    #[tokio::test]
    async fn too_many_requests_carries_retry_after() {
        let receiver = Receiver::start().await.expect("receiver starts");
        receiver.set_behaviour(Behaviour::FailWithRetryAfter {
            status: 429,
            retry_after: "2".to_string(),
        });
        let mut sink = sink(&receiver.url(), Duration::from_secs(5));
        let f = sink.deliver(&events()).await.expect_err("429 fails");
        assert!(f.retryable);
        assert_eq!(f.status, Some(429));
        assert_eq!(f.retry_after, Some(Duration::from_secs(2)));

        receiver.set_behaviour(Behaviour::FailTimes {
            status: 503,
            times: 1,
        });
        let f = sink.deliver(&events()).await.expect_err("first call fails");
        assert_eq!(f.status, Some(503));
        sink.deliver(&events()).await.expect("then Ok");
        assert_eq!(receiver.accepted_count(), 3);
    }

    #[tokio::test]
    async fn refused_connections_are_retryable() {
        let receiver = Receiver::start().await.expect("receiver starts");
        let mut sink = sink(&receiver.url(), Duration::from_secs(5));
        // Warm the pool first: a stopped receiver must also close kept-alive connections.
        sink.deliver(&events()).await.expect("delivered");
        receiver.stop().await;
        let f = sink.deliver(&events()).await.expect_err("nothing listens");
        assert!(f.retryable);
        assert_eq!(f.status, None);
        assert!(
            f.message
                .starts_with(&format!("cannot connect to {}: ", receiver.url())),
            "{}",
            f.message
        );

        receiver.restart().await.expect("restarts on the same port");
        sink.deliver(&events())
            .await
            .expect("delivered after restart");
        assert_eq!(receiver.accepted_count(), 6);
    }

    #[tokio::test]
    async fn hanging_targets_time_out() {
        let receiver = Receiver::start().await.expect("receiver starts");
        receiver.set_behaviour(Behaviour::Hang);
        let mut sink = sink(&receiver.url(), Duration::from_millis(200));
        let started = Instant::now();
        let f = sink.deliver(&events()).await.expect_err("no answer");
        assert!(started.elapsed() < Duration::from_secs(3));
        assert!(f.retryable);
        assert_eq!(
            f.message,
            format!("timed out after 200ms waiting for {}", receiver.url())
        );
        assert_eq!(receiver.requests().len(), 1, "the request arrived");
        assert_eq!(receiver.requests()[0].status, 0, "and was never answered");
    }

    #[tokio::test]
    async fn secrets_stay_out_of_debug_output() {
        let receiver = Receiver::start().await.expect("receiver starts");
        receiver.set_behaviour(Behaviour::Fail(401));
        let url = receiver.url().replace("http://", "http://user:pw-secret@");
        let mut sink = sink(&url, Duration::from_secs(5));
        let f = sink.deliver(&events()).await.expect_err("401 fails");
        for text in [
            format!("{sink:?}"),
            format!("{sink:#?}"),
            format!("{f:?}"),
            f.to_string(),
        ] {
            assert!(!text.contains("s3cr3t"), "{text}");
            assert!(!text.contains("pw-secret"), "{text}");
        }
        assert!(
            format!("{sink:?}").contains("Authorization"),
            "header names are shown"
        );
        assert!(
            f.message
                .contains("check the credentials in targets.wms.headers"),
            "{}",
            f.message
        );
        // Credentials in the URL become Basic auth and take precedence over a configured header.
        let req = &receiver.requests()[0];
        assert!(req
            .headers
            .iter()
            .any(|(k, v)| k == "authorization" && v.starts_with("Basic ")));
    }

    #[test]
    fn a_refused_token_is_traced_to_the_key_it_came_from() {
        use steward_core::config::SecretOrigin;
        let (_, mut http) = config("http://127.0.0.1:1/x", Duration::from_secs(1));
        assert_eq!(
            credentials_hint("wms", &http),
            "check the credentials in targets.wms.headers.Authorization"
        );
        http.extra.bearer_token = Some(Secret::with_origin(
            "t0ken",
            SecretOrigin::Env {
                key: "targets.wms.bearer_token_env".into(),
                name: "WMS_TOKEN".into(),
            },
        ));
        assert_eq!(
            credentials_hint("wms", &http),
            "check the token in targets.wms.bearer_token_env"
        );
        http.extra.bearer_token = None;
        http.headers = vec![(
            "authorization".into(),
            Secret::with_origin(
                "Bearer x",
                SecretOrigin::File {
                    key: "targets.wms.headers.authorization.file".into(),
                    path: "/run/token".into(),
                },
            ),
        )];
        assert_eq!(
            credentials_hint("wms", &http),
            "check the credentials in targets.wms.headers.authorization.file"
        );
        http.headers.clear();
        assert!(credentials_hint("wms", &http).contains("targets.wms sends no credentials"));
    }

    #[test]
    fn bad_configs_are_named() {
        let (target, mut http) = config("http://example.com/", Duration::from_secs(1));
        http.headers = vec![("X-Token".to_string(), Secret::new("line\nbreak-secret"))];
        let e = HttpSink::new(&target, &http, String::new()).expect_err("newline");
        assert!(
            e.to_string().starts_with("targets.wms.headers.X-Token: "),
            "{e}"
        );
        assert!(!format!("{e} {e:?}").contains("break-secret"));

        http.headers = vec![("Bad Name".to_string(), Secret::new("v"))];
        assert!(matches!(
            HttpSink::new(&target, &http, String::new()),
            Err(HttpSinkError::InvalidHeaderName { .. })
        ));
    }

    #[test]
    fn display_urls_hide_credentials_and_queries() {
        let url =
            url::Url::parse("https://u:p@wms.example:8443/in/events?token=x#frag").expect("URL");
        assert_eq!(display_url(&url), "https://wms.example:8443/in/events");
    }
}
