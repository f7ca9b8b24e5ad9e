//! Sending one batch and classifying the outcome.
//!
//! Every failure becomes an [`HttpDeliveryFailure`] whose `retryable` flag
//! decides between "retry the same batch later" and "this batch will never be
//! accepted as is" (the driver dead-letters it). The rules follow what the
//! status codes promise: 408, 429 and 5xx say "later", other 4xx say "never";
//! a refused connection or a timeout says nothing about the batch, so retry.
//!
//! Messages never carry the URL's query or userinfo (they may hold tokens),
//! nor any request header value.

use std::error::Error as _;
use std::time::{Duration, SystemTime};

use reqwest::header::{HeaderMap, RETRY_AFTER};
use reqwest::StatusCode;

use super::HttpDeliveryFailure;

/// How much of an error response body goes into the message.
const EXCERPT_CHARS: usize = 512;
/// Bytes read from an error response body: enough for [`EXCERPT_CHARS`] of
/// 4-byte UTF-8, and small enough that a huge error page costs nothing.
const EXCERPT_READ_BYTES: usize = EXCERPT_CHARS * 4;
/// Bytes of a success body read (and discarded) so the connection can go
/// back to the pool; a larger body costs a new connection instead.
const DRAIN_SUCCESS_BYTES: usize = 64 * 1024;

/// What the sink needs to describe its target in messages.
pub(super) struct Endpoint<'a> {
    /// The URL without userinfo, query or fragment.
    pub(crate) url_display: &'a str,
    pub(crate) timeout: Duration,
    pub(crate) connect_timeout: Duration,
    pub(crate) target: &'a str,
    /// What a 401 / 403 asks the operator to check: the configuration key
    /// the credentials came from (see `HttpSink::new`).
    pub(crate) credentials: &'a str,
    /// Whether steward presents a client certificate.
    pub(crate) client_cert: bool,
}

/// Turns the outcome of `send()` into `Ok` (2xx) or a classified failure.
pub(super) async fn finish(
    endpoint: &Endpoint<'_>,
    sent: Result<reqwest::Response, reqwest::Error>,
) -> Result<(), HttpDeliveryFailure> {
    let mut response = match sent {
        Ok(r) => r,
        Err(e) => return Err(classify_error(endpoint, &e)),
    };
    let status = response.status();
    if status.is_success() {
        // A body error after a 2xx does not undo the acceptance.
        let _ = read_prefix(&mut response, DRAIN_SUCCESS_BYTES).await;
        return Ok(());
    }
    let retry_after = retry_after(status, response.headers(), SystemTime::now());
    let body = match read_prefix(&mut response, EXCERPT_READ_BYTES).await {
        Ok(bytes) => excerpt(&bytes),
        Err(e) => format!("(body unreadable: {})", root_cause(&e)),
    };
    Err(classify_status(endpoint, status, &body, retry_after))
}

/// Reads at most about `limit` bytes of the body.
async fn read_prefix(
    response: &mut reqwest::Response,
    limit: usize,
) -> Result<Vec<u8>, reqwest::Error> {
    let mut out = Vec::new();
    while out.len() < limit {
        match response.chunk().await? {
            Some(chunk) => out.extend_from_slice(&chunk),
            None => break,
        }
    }
    Ok(out)
}

/// The first [`EXCERPT_CHARS`] characters, on one line.
fn excerpt(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let mut out: String = text
        .trim()
        .chars()
        .take(EXCERPT_CHARS)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if text.trim().chars().nth(EXCERPT_CHARS).is_some() {
        out.push('…');
    }
    out
}

pub(super) fn classify_status(
    endpoint: &Endpoint<'_>,
    status: StatusCode,
    body: &str,
    retry_after: Option<Duration>,
) -> HttpDeliveryFailure {
    let code = status.as_u16();
    let retryable = code == 408 || code == 429 || status.is_server_error();
    let mut message = format!("HTTP {code} from {}", endpoint.url_display);
    if body.is_empty() {
        message.push_str(" (empty body)");
    } else {
        message.push_str(": ");
        message.push_str(body);
    }
    if let Some(hint) = hint(code, endpoint) {
        message.push_str(" (");
        message.push_str(&hint);
        message.push(')');
    }
    HttpDeliveryFailure {
        retryable,
        status: Some(code),
        message,
        retry_after,
    }
}

fn hint(code: u16, endpoint: &Endpoint<'_>) -> Option<String> {
    let target = endpoint.target;
    match code {
        300..=399 => Some(format!(
            "redirects are not followed for POST; set targets.{target}.url to the final URL"
        )),
        401 | 403 => Some(endpoint.credentials.to_string()),
        404 | 405 => Some(format!("check targets.{target}.url")),
        413 => Some(format!(
            "the batch is too large; lower targets.{target}.batch_max_events"
        )),
        _ => None,
    }
}

pub(super) fn classify_error(endpoint: &Endpoint<'_>, e: &reqwest::Error) -> HttpDeliveryFailure {
    let url = endpoint.url_display;
    let (retryable, message) = if e.is_connect() {
        let cause = if e.is_timeout() {
            format!("timed out after {}ms", endpoint.connect_timeout.as_millis())
        } else {
            root_cause(e)
        };
        let hint = tls_hint(endpoint, &cause);
        (true, format!("cannot connect to {url}: {cause}{hint}"))
    } else if e.is_timeout() {
        (
            true,
            format!(
                "timed out after {}ms waiting for {url}",
                endpoint.timeout.as_millis()
            ),
        )
    } else if e.is_builder() {
        // Cannot happen with a URL checked in `HttpSink::new`; retrying would not help.
        (
            false,
            format!("cannot build a request for {url}: {}", root_cause(e)),
        )
    } else {
        // Reset connections, broken pipes, protocol errors: nothing about the batch.
        let cause = root_cause(e);
        let hint = tls_hint(endpoint, &cause);
        (true, format!("request to {url} failed: {cause}{hint}"))
    };
    HttpDeliveryFailure {
        retryable,
        status: None,
        message,
        retry_after: None,
    }
}

/// The fix for the TLS failures an operator can fix in the configuration.
fn tls_hint(endpoint: &Endpoint<'_>, cause: &str) -> String {
    let target = endpoint.target;
    // Under TLS 1.3 a server that requires a client certificate checks it
    // after the client considers the handshake done: its alert can race the
    // request, and the client then sees only the connection closing.
    let closed = cause.contains("connection was not ready")
        || cause.contains("connection closed")
        || cause.contains("reset by peer");
    if cause.contains("UnknownIssuer") {
        format!(
            "; the target's certificate is not signed by a CA steward trusts: set \
             targets.{target}.ca_file to the CA certificate (PEM)"
        )
    } else if cause.contains("CertificateRequired") {
        format!(
            "; the target requires a client certificate: set targets.{target}.client_cert_file \
             and targets.{target}.client_key_file"
        )
    } else if cause.contains("BadCertificate") || cause.contains("UnknownCA") {
        format!(
            "; the target refused the client certificate: check targets.{target}.client_cert_file \
             (is it signed by a CA the target trusts?)"
        )
    } else if closed && !endpoint.client_cert && endpoint.url_display.starts_with("https://") {
        format!(
            "; the target closed the connection: if it requires a client certificate, set \
             targets.{target}.client_cert_file and targets.{target}.client_key_file"
        )
    } else {
        String::new()
    }
}

/// The innermost cause: the OS or TLS error that says what went wrong.
///
/// The outer `reqwest::Error` text is skipped on purpose: it contains the full
/// URL, query string included.
fn root_cause(e: &reqwest::Error) -> String {
    let mut inner: Option<&dyn std::error::Error> = e.source();
    let mut last = None;
    while let Some(err) = inner {
        last = Some(err);
        inner = err.source();
    }
    match last {
        Some(err) => err.to_string(),
        None => {
            let text = e.to_string();
            match e.url() {
                Some(url) => text.replace(url.as_str(), "<url>"),
                None => text,
            }
        }
    }
}

/// `Retry-After` of a 429 or 503, as delta-seconds or an HTTP-date.
///
/// Ignored on other statuses (RFC 9110 gives it meaning only there and on
/// 3xx) and when unparsable; the driver's own backoff applies then.
pub(super) fn retry_after(
    status: StatusCode,
    headers: &HeaderMap,
    now: SystemTime,
) -> Option<Duration> {
    if status != StatusCode::TOO_MANY_REQUESTS && status != StatusCode::SERVICE_UNAVAILABLE {
        return None;
    }
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    // IMF-fixdate ("Sun, 06 Nov 1994 08:49:37 GMT") is RFC 2822 compatible.
    let at = chrono::DateTime::parse_from_rfc2822(value).ok()?;
    let at = SystemTime::from(at);
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    fn endpoint() -> Endpoint<'static> {
        Endpoint {
            url_display: "https://wms.example/events",
            timeout: Duration::from_millis(1500),
            connect_timeout: Duration::from_millis(250),
            target: "wms",
            credentials: "check the credentials in targets.wms.headers.Authorization",
            client_cert: false,
        }
    }

    fn headers(retry_after: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            RETRY_AFTER,
            HeaderValue::from_str(retry_after).expect("valid header"),
        );
        h
    }

    #[test]
    fn statuses_are_classified() {
        let e = endpoint();
        for (code, retryable) in [
            (408, true),
            (429, true),
            (500, true),
            (502, true),
            (503, true),
            (599, true),
            (400, false),
            (401, false),
            (404, false),
            (409, false),
            (413, false),
            (422, false),
            (301, false),
        ] {
            let status = StatusCode::from_u16(code).expect("valid status");
            let f = classify_status(&e, status, "nope", None);
            assert_eq!(f.retryable, retryable, "{code}");
            assert_eq!(f.status, Some(code));
            assert!(
                f.message.starts_with(&format!(
                    "HTTP {code} from https://wms.example/events: nope"
                )),
                "{}",
                f.message
            );
        }
        let f = classify_status(&e, StatusCode::UNAUTHORIZED, "", None);
        assert_eq!(
            f.message,
            "HTTP 401 from https://wms.example/events (empty body) (check the credentials in targets.wms.headers.Authorization)"
        );
    }

    #[test]
    fn a_connection_closed_after_the_handshake_hints_at_a_missing_client_certificate() {
        let closed = "connection was not ready";
        let hint = tls_hint(&endpoint(), closed);
        assert!(
            hint.contains("if it requires a client certificate, set targets.wms.client_cert_file"),
            "{hint}"
        );
        let with_cert = Endpoint {
            client_cert: true,
            ..endpoint()
        };
        assert_eq!(
            tls_hint(&with_cert, closed),
            "",
            "a certificate is presented"
        );
        let plain = Endpoint {
            url_display: "http://wms.example/events",
            ..endpoint()
        };
        assert_eq!(tls_hint(&plain, closed), "", "no TLS");
        assert!(
            tls_hint(&endpoint(), "received fatal alert: CertificateRequired")
                .contains("; the target requires a client certificate")
        );
        assert_eq!(
            tls_hint(&endpoint(), "Connection refused (os error 111)"),
            ""
        );
    }

    #[test]
    fn retry_after_seconds_and_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(784_111_777); // Sun, 06 Nov 1994 08:49:37 GMT
        let s429 = StatusCode::TOO_MANY_REQUESTS;
        let s503 = StatusCode::SERVICE_UNAVAILABLE;
        assert_eq!(
            retry_after(s429, &headers("2"), now),
            Some(Duration::from_secs(2))
        );
        assert_eq!(
            retry_after(s503, &headers(" 120 "), now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(
            retry_after(s503, &headers("Sun, 06 Nov 1994 08:50:07 GMT"), now),
            Some(Duration::from_secs(30))
        );
        // A date in the past means "now".
        assert_eq!(
            retry_after(s429, &headers("Sun, 06 Nov 1994 08:00:00 GMT"), now),
            Some(Duration::ZERO)
        );
        assert_eq!(retry_after(s429, &headers("soon"), now), None);
        assert_eq!(retry_after(s429, &headers("-5"), now), None);
        assert_eq!(retry_after(s429, &HeaderMap::new(), now), None);
        assert_eq!(
            retry_after(StatusCode::INTERNAL_SERVER_ERROR, &headers("2"), now),
            None
        );
    }

    #[test]
    fn excerpts_are_bounded_and_single_line() {
        assert_eq!(excerpt(b"  bad\r\nthing \n"), "bad  thing");
        let long = "é".repeat(600);
        let e = excerpt(long.as_bytes());
        assert_eq!(e.chars().count(), EXCERPT_CHARS + 1);
        assert!(e.ends_with('…'));
        assert_eq!(excerpt(&[0xff, b'x']), "\u{fffd}x");
    }
}
