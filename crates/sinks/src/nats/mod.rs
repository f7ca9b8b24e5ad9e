//! NATS JetStream target: publishes each event to a subject built from a
//! template, with `Nats-Msg-Id` = the event id, and reports a batch
//! delivered only once JetStream acknowledged every message.
//!
//! Publishes are pipelined: the whole batch is sent, then the acks are
//! awaited, so a batch costs about one round trip rather than one per event.
//! Each message's reply subject is `<inbox>.<batch>.<index>` under one
//! subscription per connection, and the batch waits for its acks on that
//! subscription with one deadline. The JetStream context's own publish
//! gives every message a response slot, a semaphore permit and a timer of
//! its own (with its ack parsing, 10% of steward's instructions for W2 into
//! NATS; README, Benchmarks).
//! A re-delivered batch (after a crash, or a retry after a partial failure)
//! carries the same message ids, which JetStream drops as duplicates within
//! the stream's duplicate window; consumers therefore see each event once.
//!
//! The connection is made on the first delivery and re-made after a failure,
//! so a NATS server that is down only delays this target.

pub(crate) mod config;

use std::fmt::Write as _;

use async_nats::jetstream::{self, stream};
use async_nats::{HeaderMap, StatusCode, Subscriber};
use futures_util::StreamExt;

pub(crate) use self::config::{NatsAuth, NatsTargetConfig};
use crate::envelope::{write_one, Envelope, EnvelopeContext};
use crate::DeliveryError;
use steward_core::config::TargetConfig;
use steward_core::model::Event;

pub(crate) struct NatsSink {
    target: String,
    cfg: NatsTargetConfig,
    envelope: Envelope,
    ctx: EnvelopeContext,
    conn: Option<Connection>,
}

/// JetStream's reply to a publish: `{"stream":..,"seq":..}` (with
/// `"duplicate":true` for a message id seen within the duplicate window)
/// or `{"error":{..}}`. Read as one struct rather than as async-nats's
/// untagged `Response<PublishAck>`, which buffers the reply and tries each
/// variant: 3,400 instructions per message (callgrind, W2 into NATS).
#[derive(serde::Deserialize)]
struct AckReply {
    #[serde(default)]
    error: Option<jetstream::Error>,
    #[serde(default)]
    seq: Option<u64>,
}

/// A connection with the subscription its acks arrive on.
struct Connection {
    client: async_nats::Client,
    acks: Subscriber,
    /// The subscription's subject without the trailing `>`.
    inbox: String,
    /// Numbers the batches, so that a late ack of an earlier batch (one
    /// that failed part-way) is not taken for one of the current batch.
    batch: u64,
}

impl NatsSink {
    pub(crate) fn new(
        target: &TargetConfig,
        cfg: &NatsTargetConfig,
        ctx: EnvelopeContext,
    ) -> NatsSink {
        NatsSink {
            target: target.name.clone(),
            cfg: cfg.clone(),
            envelope: cfg.envelope,
            ctx,
            conn: None,
        }
    }

    fn servers_display(&self) -> String {
        self.cfg.servers.join(",")
    }

    async fn connect(&self) -> Result<Connection, DeliveryError> {
        let mut opts = async_nats::ConnectOptions::new()
            .name(format!("steward target {}", self.target))
            .connection_timeout(self.cfg.connect_timeout)
            .request_timeout(Some(self.cfg.timeout));
        opts = match &self.cfg.auth {
            NatsAuth::None => opts,
            NatsAuth::Token(t) => opts.token(t.expose().to_string()),
            NatsAuth::UserPassword(u, p) => {
                opts.user_and_password(u.clone(), p.expose().to_string())
            }
            NatsAuth::CredsFile(path) => opts.credentials_file(path).await.map_err(|e| {
                DeliveryError::permanent(format!(
                    "targets.{}.creds_file: cannot use `{}`: {e}",
                    self.target,
                    path.display()
                ))
            })?,
        };
        let client = opts
            .connect(self.cfg.servers.as_slice())
            .await
            .map_err(|e| {
                use async_nats::ConnectErrorKind as K;
                let retryable = !matches!(
                    e.kind(),
                    K::ServerParse | K::Authentication | K::AuthorizationViolation
                );
                let hint = if retryable {
                    ""
                } else {
                    "; check the URL and the credentials"
                };
                DeliveryError {
                    retryable,
                    message: format!(
                        "cannot connect to NATS {}: {e}{hint}",
                        self.servers_display()
                    ),
                    retry_after: None,
                    status: None,
                }
            })?;
        if let (Some(name), true) = (&self.cfg.stream, self.cfg.create_stream) {
            let js = jetstream::ContextBuilder::new()
                .timeout(self.cfg.timeout)
                .build(client.clone());
            js.get_or_create_stream(stream::Config {
                name: name.clone(),
                subjects: self.cfg.stream_subjects.clone(),
                duplicate_window: self.cfg.duplicate_window,
                ..Default::default()
            })
            .await
            .map_err(|e| {
                DeliveryError::retryable(format!(
                    "cannot create or open JetStream stream {name} on {}: {e}; is JetStream \
                     enabled (nats-server -js) and may this user manage streams?",
                    self.servers_display()
                ))
            })?;
        }
        let inbox = client.new_inbox();
        let acks = client.subscribe(format!("{inbox}.>")).await.map_err(|e| {
            DeliveryError::retryable(format!(
                "cannot subscribe to {inbox}.> on NATS {} for JetStream's acks: {e}; may \
                     this user subscribe to _INBOX.>?",
                self.servers_display()
            ))
        })?;
        Ok(Connection {
            client,
            acks,
            inbox,
            batch: 0,
        })
    }

    pub(crate) async fn deliver(&mut self, events: &[Event]) -> Result<(), DeliveryError> {
        if events.is_empty() {
            return Ok(());
        }
        let mut conn = match self.conn.take() {
            Some(conn) => conn,
            None => self.connect().await?,
        };
        let result = self.publish_all(&mut conn, events).await;
        // After a failure the client reconnects by itself, but a fresh
        // connection also re-runs stream creation in case the stream was
        // deleted, and leaves the failed batch's late acks behind.
        if !result.as_ref().is_err_and(|e| e.retryable) {
            self.conn = Some(conn);
        }
        result
    }

    async fn publish_all(
        &self,
        conn: &mut Connection,
        events: &[Event],
    ) -> Result<(), DeliveryError> {
        // One buffer for the batch's payloads, each message a slice of it.
        let mut encoded = Vec::with_capacity(events.len() * 512);
        let mut ends = Vec::with_capacity(events.len());
        for event in events {
            write_one(self.envelope, event, &self.ctx, &mut encoded).map_err(|e| {
                DeliveryError::permanent(format!("cannot encode event {} as JSON: {e}", event.id))
            })?;
            ends.push(encoded.len());
        }
        let encoded = bytes::Bytes::from(encoded);
        conn.batch += 1;
        let reply_prefix = format!("{}.{}.", conn.inbox, conn.batch);
        let mut start = 0;
        for (i, (event, &end)) in events.iter().zip(&ends).enumerate() {
            let mut headers = HeaderMap::new();
            headers.insert(async_nats::header::NATS_MESSAGE_ID, event.id.as_str());
            conn.client
                .publish_with_reply_and_headers(
                    subject(&self.cfg.subject, event, &self.target),
                    format!("{reply_prefix}{i}"),
                    headers,
                    encoded.slice(start..end),
                )
                .await
                .map_err(|e| {
                    DeliveryError::retryable(format!(
                        "cannot publish event {} on subject {} to NATS {}: {e}",
                        event.id,
                        subject(&self.cfg.subject, event, &self.target),
                        self.servers_display()
                    ))
                })?;
            start = end;
        }
        self.await_acks(conn, events, &reply_prefix).await
    }

    /// Waits for JetStream's ack of every message of the batch, within one
    /// `timeout` for all of them.
    async fn await_acks(
        &self,
        conn: &mut Connection,
        events: &[Event],
        reply_prefix: &str,
    ) -> Result<(), DeliveryError> {
        let deadline = tokio::time::Instant::now() + self.cfg.timeout;
        let mut acked = vec![false; events.len()];
        let mut waiting = events.len();
        while waiting > 0 {
            let message = match tokio::time::timeout_at(deadline, conn.acks.next()).await {
                Ok(Some(message)) => message,
                Ok(None) => {
                    return Err(DeliveryError::retryable(format!(
                        "lost the connection to NATS {} before JetStream acknowledged {waiting} \
                         of {} events",
                        self.servers_display(),
                        events.len()
                    )))
                }
                Err(_) => {
                    let first = acked.iter().position(|a| !a).unwrap_or(0);
                    let event = &events[first];
                    return Err(self.publish_error(
                        event,
                        &format!(
                            "no acknowledgement for {waiting} of {} messages",
                            events.len()
                        ),
                        "; the server did not acknowledge in time (timeout_ms)",
                    ));
                }
            };
            let Some(i) = message
                .subject
                .strip_prefix(reply_prefix)
                .and_then(|i| i.parse::<usize>().ok())
                .filter(|&i| i < events.len() && !acked[i])
            else {
                // An earlier batch's late ack.
                continue;
            };
            let event = &events[i];
            if message.status == Some(StatusCode::NO_RESPONDERS) {
                return Err(self.publish_error(
                    event,
                    "no responders",
                    "; no JetStream stream captures this subject: create one (e.g. nats stream \
                     add STEWARD --subjects 'steward.>') or set stream and create_stream = true",
                ));
            }
            match serde_json::from_slice::<AckReply>(&message.payload) {
                Ok(AckReply {
                    error: Some(error), ..
                }) => return Err(self.publish_error(event, &error.to_string(), "")),
                Ok(AckReply { seq: Some(_), .. }) => {}
                Ok(AckReply { seq: None, .. }) | Err(_) => {
                    return Err(self.publish_error(
                        event,
                        &format!(
                            "unreadable acknowledgement {:?}",
                            String::from_utf8_lossy(&message.payload)
                        ),
                        "",
                    ))
                }
            }
            acked[i] = true;
            waiting -= 1;
        }
        Ok(())
    }

    fn publish_error(&self, event: &Event, error: &str, hint: &str) -> DeliveryError {
        DeliveryError::retryable(format!(
            "JetStream did not accept event {} on subject {} ({}): {error}{hint}",
            event.id,
            subject(&self.cfg.subject, event, &self.target),
            self.servers_display()
        ))
    }
}

/// Fills the template. The key is escaped so it stays one subject token:
/// `.`, `*`, `>`, `%`, whitespace and control characters become `%XX`.
pub(crate) fn subject(template: &str, event: &Event, target: &str) -> String {
    let mut out = String::with_capacity(template.len() + event.key.len() + 16);
    let mut rest = template;
    while let Some(i) = rest.find('{') {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        let (value, len): (&str, usize) = if tail.starts_with("{entity}") {
            (&event.entity, 8)
        } else if tail.starts_with("{op}") {
            (event.op.as_str(), 4)
        } else if tail.starts_with("{target}") {
            (target, 8)
        } else if let Some(after) = tail.strip_prefix("{key}") {
            for c in event.key.chars() {
                if matches!(c, '.' | '*' | '>' | '%') || c.is_whitespace() || c.is_control() {
                    let mut buf = [0u8; 4];
                    for b in c.encode_utf8(&mut buf).bytes() {
                        let _ = write!(out, "%{b:02X}");
                    }
                } else {
                    out.push(c);
                }
            }
            rest = after;
            continue;
        } else {
            ("{", 1)
        };
        out.push_str(value);
        rest = &tail[len..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use steward_core::model::{EventOp, Lsn};

    #[test]
    fn subjects_fill_placeholders_and_escape_keys() {
        let e = Event {
            change: None,
            tx_id: None,
            id: Event::source_id(Lsn(1), 0),
            entity: "product".into(),
            key: "a.b *c>%".into(),
            op: EventOp::Delete,
            version: 1,
            time: String::new(),
            data: serde_json::Value::Null.into(),
        };
        assert_eq!(
            subject("steward.{entity}.{op}", &e, "t"),
            "steward.product.delete"
        );
        assert_eq!(
            subject("x.{target}.{key}", &e, "wms"),
            "x.wms.a%2Eb%20%2Ac%3E%25"
        );
    }
}
