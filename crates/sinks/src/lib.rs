//! Targets: one module per target type, and the per-target delivery driver
//! that reads the target's outbox cursor and hands batches to its sink.
//!
//! Each type's module owns its settings and their checks (`http::config`,
//! ...); [`config::load`] runs them with core's checks of the rest of the
//! file. A new type is a module with its `config`, an entry in `config`'s
//! `TYPES` and [`config::SinkConfig`], and a variant of [`AnySink`] built in
//! [`build`].

mod cloudevents;
pub mod config;
pub mod driver;
pub mod envelope;
pub mod file;
pub mod http;
pub mod nats;
pub mod postgres;
pub mod requests;

pub use driver::{Deliver, DeliveryError};

use steward_core::config::{Config, TargetConfig};
use steward_core::model::Event;

use config::SinkConfig;
use envelope::EnvelopeContext;

/// Every sink type behind one `Deliver` implementation.
pub enum AnySink {
    Http(http::HttpSink),
    Postgres(postgres::PostgresSink),
    Nats(nats::NatsSink),
    File(file::FileSink),
}

impl Deliver for AnySink {
    async fn deliver(&mut self, events: &[Event]) -> Result<(), DeliveryError> {
        match self {
            AnySink::Http(sink) => sink.deliver(events).await.map_err(|f| DeliveryError {
                retryable: f.retryable,
                message: f.message,
                retry_after: f.retry_after,
                status: f.status,
            }),
            AnySink::Postgres(sink) => sink.deliver(events).await,
            AnySink::Nats(sink) => sink.deliver(events).await,
            AnySink::File(sink) => sink.deliver(events).await,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Http(#[from] http::HttpSinkError),
    #[error("{0}")]
    Other(String),
}

/// Builds the sink for a target of a configuration loaded with
/// [`config::load`]. Sinks that talk to a server (postgres, nats) connect on
/// their first delivery, so a target that is down at start only delays its
/// own events (retried by the driver) and not the daemon.
pub fn build(target: &TargetConfig, config: &Config) -> Result<AnySink, BuildError> {
    let ctx = EnvelopeContext::from_config(config);
    let Some(settings) = SinkConfig::of(target) else {
        return Err(BuildError::Other(format!(
            "targets.{}: the {} settings were not checked; load the configuration with \
             steward_sinks::config::load",
            target.name, target.type_name
        )));
    };
    match settings {
        SinkConfig::Http(http) => {
            let mut sink = http::HttpSink::new(target, http, ctx.source.clone())?;
            sink.set_envelope_context(ctx);
            Ok(AnySink::Http(sink))
        }
        SinkConfig::Postgres(pg) => Ok(AnySink::Postgres(postgres::PostgresSink::new(
            target, pg, config,
        ))),
        SinkConfig::Nats(nats) => Ok(AnySink::Nats(nats::NatsSink::new(target, nats, ctx))),
        SinkConfig::File(file) => Ok(AnySink::File(
            file::FileSink::open(target, file, ctx).map_err(BuildError::Other)?,
        )),
    }
}
