//! Standard Webhooks signatures (<https://www.standardwebhooks.com>): the
//! receiver recomputes `HMAC-SHA256(key, "{id}.{timestamp}.{body}")` with the
//! shared key and compares it to `webhook-signature` (`v1,<base64>`).

use base64::Engine as _;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use steward_core::model::Event;

/// The headers a signed request carries, set on each attempt.
pub(crate) const HEADERS: [&str; 3] = ["webhook-id", "webhook-timestamp", "webhook-signature"];

/// `webhook-id`: stable across retries of the same batch, so the receiver can
/// de-duplicate whole deliveries. The first event's id for one event, else
/// `<first>..<last>` (event ids are unique and ordered, so the pair names the batch).
pub(crate) fn webhook_id(events: &[Event]) -> String {
    match (events.first(), events.last()) {
        (Some(first), Some(last)) if events.len() > 1 => format!("{}..{}", first.id, last.id),
        (Some(first), _) => first.id.clone(),
        _ => String::new(),
    }
}

/// The `webhook-signature` value for one request.
pub(crate) fn sign(key: &[u8], id: &str, timestamp: i64, body: &[u8]) -> String {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(key).unwrap_or_else(|_| unreachable!());
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    let digest = mac.finalize().into_bytes();
    format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(digest)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_standard_webhooks_reference_vector() {
        // From the Standard Webhooks reference libraries' test suite.
        let key = base64::engine::general_purpose::STANDARD
            .decode("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
            .expect("b64");
        let sig = sign(
            &key,
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            br#"{"test": 2432232314}"#,
        );
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }
}
