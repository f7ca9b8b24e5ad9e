//! NATS JetStream target: publishes each event to a subject built from a
//! template, with `Nats-Msg-Id` = the event id, and reports a batch
//! delivered only once JetStream acknowledged every message.
//!
//! Publishes are pipelined: the whole batch is sent, then the acks are
//! awaited, so a batch costs about one round trip rather than one per event.
//! A re-delivered batch (after a crash, or a retry after a partial failure)
//! carries the same message ids, which JetStream drops as duplicates within
//! the stream's duplicate window; consumers therefore see each event once.
//!
//! The connection is made on the first delivery and re-made after a failure,
//! so a NATS server that is down only delays this target.

pub(crate) mod config;

use std::fmt::Write as _;

use async_nats::jetstream::{self, message::PublishMessage, stream};

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
    max_inflight: usize,
    js: Option<jetstream::Context>,
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
            max_inflight: target.batch_max_events.max(1),
            js: None,
        }
    }

    fn servers_display(&self) -> String {
        self.cfg.servers.join(",")
    }

    async fn connect(&self) -> Result<jetstream::Context, DeliveryError> {
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
        let js = jetstream::ContextBuilder::new()
            .timeout(self.cfg.timeout)
            .ack_timeout(self.cfg.timeout)
            .max_ack_inflight(self.max_inflight)
            .build(client);
        if let (Some(name), true) = (&self.cfg.stream, self.cfg.create_stream) {
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
        Ok(js)
    }

    pub(crate) async fn deliver(&mut self, events: &[Event]) -> Result<(), DeliveryError> {
        if events.is_empty() {
            return Ok(());
        }
        let js = match &self.js {
            Some(js) => js.clone(),
            None => {
                let js = self.connect().await?;
                self.js = Some(js.clone());
                js
            }
        };
        let result = self.publish_all(&js, events).await;
        if result.as_ref().is_err_and(|e| e.retryable) {
            // The client reconnects by itself, but a fresh context also
            // re-runs stream creation in case the stream was deleted.
            self.js = None;
        }
        result
    }

    async fn publish_all(
        &self,
        js: &jetstream::Context,
        events: &[Event],
    ) -> Result<(), DeliveryError> {
        let mut acks = Vec::with_capacity(events.len());
        let mut payload = Vec::with_capacity(512);
        for event in events {
            payload.clear();
            write_one(self.envelope, event, &self.ctx, &mut payload).map_err(|e| {
                DeliveryError::permanent(format!("cannot encode event {} as JSON: {e}", event.id))
            })?;
            let subject = subject(&self.cfg.subject, event, &self.target);
            let publish = PublishMessage::build()
                .message_id(&event.id)
                .payload(bytes::Bytes::copy_from_slice(&payload));
            let ack = js
                .send_publish(subject.clone(), publish)
                .await
                .map_err(|e| self.publish_error(&subject, &event.id, e))?;
            acks.push((ack, subject, &event.id));
        }
        for (ack, subject, id) in acks {
            ack.await.map_err(|e| self.publish_error(&subject, id, e))?;
        }
        Ok(())
    }

    fn publish_error(
        &self,
        subject: &str,
        id: &str,
        e: async_nats::jetstream::context::PublishError,
    ) -> DeliveryError {
        use async_nats::jetstream::context::PublishErrorKind as K;
        let hint = match e.kind() {
            K::StreamNotFound => {
                "; no JetStream stream captures this subject: create one (e.g. nats stream add \
                 STEWARD --subjects 'steward.>') or set stream and create_stream = true"
            }
            K::TimedOut => "; the server did not acknowledge in time (timeout_ms)",
            _ => "",
        };
        DeliveryError::retryable(format!(
            "JetStream did not accept event {id} on subject {subject} ({}): {e}{hint}",
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
