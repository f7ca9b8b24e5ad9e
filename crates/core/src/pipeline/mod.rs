//! Pure transformation of decoded changes into target events: table
//! selection and field mapping, then governance (lifecycle gates, rules,
//! business keys, references, business objects, per-target policy and
//! routing, no-op suppression). No I/O: the daemon feeds it relations and
//! changes in stream order and stores what comes out, together with the
//! governance state changes it queued.

pub mod assemble;
pub mod govern;
pub mod large_txn;
mod map;
pub mod redact;
pub mod reference;
mod snapshot_row;

pub use govern::Governance;
pub use map::{Mapped, Pipeline, PipelineError, ToastFill, Unencodable, ENCODING_RULE};
pub use snapshot_row::{snapshot_id, snapshot_mapped, snapshot_version};
