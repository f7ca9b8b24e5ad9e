//! Pure transformation of decoded changes into target events: table
//! selection and field mapping. No I/O: the daemon feeds it relations and
//! changes in stream order and stores what comes out.

mod map;
mod snapshot_row;

pub use map::{Mapped, Pipeline, PipelineError};
pub use snapshot_row::{snapshot_event, snapshot_id, snapshot_version};
