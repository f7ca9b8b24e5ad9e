//! Pure transformation of decoded changes into target events: table
//! selection and field mapping. No I/O: the daemon feeds it relations and
//! changes in stream order and stores what comes out.

pub mod cel;
mod map;

pub use map::{Mapped, Pipeline, PipelineError};
