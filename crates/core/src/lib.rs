//! steward's core: the model, the configuration, the mapping of decoded
//! changes onto documents and their governance. No I/O: the daemon feeds it
//! relations and changes in stream order and stores what comes out.

#![warn(missing_docs)]

mod cel;
pub mod config;
pub mod metric;
pub mod model;
pub mod pipeline;
pub mod state;
