//! Targets: one module per target type, and the per-target delivery driver
//! that reads the target's outbox cursor and hands batches to its sink.

pub mod driver;
pub mod http;
pub mod requests;

pub use driver::{Deliver, DeliveryError};

use crate::config::{TargetConfig, TargetKind};
use crate::model::Event;

/// Every sink type behind one `Deliver` implementation.
pub enum AnySink {
    Http(http::HttpSink),
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
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Http(#[from] http::HttpSinkError),
}

/// Builds the sink for a target. `slot` names the source in CloudEvents (`steward://<slot>`).
pub fn build(target: &TargetConfig, slot: &str) -> Result<AnySink, BuildError> {
    match &target.kind {
        TargetKind::Http(http) => Ok(AnySink::Http(http::HttpSink::new(
            target,
            http,
            format!("steward://{slot}"),
        )?)),
    }
}
