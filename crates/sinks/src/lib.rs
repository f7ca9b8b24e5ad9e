#![warn(missing_docs)]
//! Targets: one module per target type, and the per-target delivery driver
//! that reads the target's outbox cursor and hands batches to its sink.
//!
//! Each type's module owns its settings and their checks (`http::config`,
//! ...); [`config::load`] runs them with core's checks of the rest of the
//! file. A new type is a module with its `config`, an entry in `config`'s
//! `TYPES` and `SinkConfig`, and a variant of `Sink` (behind [`AnySink`])
//! built in [`build`].

mod cloudevents;
pub mod config;
pub mod driver;
mod envelope;
mod file;
mod http;
mod nats;
mod postgres;
pub mod requests;

pub use driver::{Deliver, DeliveryError};
pub use postgres::read::TargetReader;

use steward_core::config::{Config, TargetConfig};
use steward_core::model::Event;

use config::SinkConfig;
use envelope::EnvelopeContext;

/// The sink of one target, whatever its type, behind one `Deliver`
/// implementation; made by [`build`].
pub struct AnySink(Sink);

enum Sink {
    Http(http::HttpSink),
    // Boxed: it holds its connection settings twice (target and source form).
    Postgres(Box<postgres::PostgresSink>),
    Nats(nats::NatsSink),
    File(file::FileSink),
}

impl Deliver for AnySink {
    async fn deliver(&mut self, events: &[Event]) -> Result<(), DeliveryError> {
        match &mut self.0 {
            Sink::Http(sink) => sink.deliver(events).await.map_err(|f| DeliveryError {
                retryable: f.retryable,
                message: f.message,
                retry_after: f.retry_after,
                status: f.status,
            }),
            Sink::Postgres(sink) => sink.deliver(events).await,
            Sink::Nats(sink) => sink.deliver(events).await,
            Sink::File(sink) => sink.deliver(events).await,
        }
    }
}

/// Why a target's sink could not be built: an HTTP header or TLS file it
/// cannot use, a file target's missing directory, or settings that
/// [`config::load`] did not check. The message names the target.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct BuildError(#[from] BuildFailure);

#[derive(Debug, thiserror::Error)]
enum BuildFailure {
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
        return Err(BuildError(BuildFailure::Other(format!(
            "targets.{}: the {} settings were not checked; load the configuration with \
             steward_sinks::config::load",
            target.name, target.type_name
        ))));
    };
    match settings {
        SinkConfig::Http(http) => {
            let mut sink = http::HttpSink::new(target, http, ctx.source.clone())
                .map_err(BuildFailure::Http)?;
            sink.set_envelope_context(ctx);
            Ok(AnySink(Sink::Http(sink)))
        }
        SinkConfig::Postgres(pg) => Ok(AnySink(Sink::Postgres(Box::new(
            postgres::PostgresSink::new(target, pg, config),
        )))),
        SinkConfig::Nats(nats) => Ok(AnySink(Sink::Nats(nats::NatsSink::new(target, nats, ctx)))),
        SinkConfig::File(file) => Ok(AnySink(Sink::File(
            file::FileSink::open(target, file, ctx).map_err(BuildFailure::Other)?,
        ))),
    }
}

/// A reader of `target`'s tables, for a deep reconciliation; an error
/// naming the target's type when it has no tables to read (only
/// PostgreSQL targets do).
pub fn target_reader(target: &TargetConfig, config: &Config) -> Result<TargetReader, String> {
    match SinkConfig::of(target) {
        Some(SinkConfig::Postgres(pg)) => Ok(TargetReader::new(target, pg, config)),
        _ => Err(format!(
            "--deep reads the target's rows back, which only a PostgreSQL target has; target \
             '{}' is of type {}: reconcile it without --deep (compares with what steward sent it)",
            target.name, target.type_name
        )),
    }
}
