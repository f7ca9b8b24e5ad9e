//! Pure transformation of decoded changes into target events: table
//! selection and field mapping, then governance (lifecycle gates, rules,
//! business keys, references, business objects, per-target policy and
//! routing, no-op suppression). No I/O: the daemon feeds it relations and
//! changes in stream order and stores what comes out, together with the
//! governance state changes it queued.

mod assemble;
pub mod govern;
pub mod large_txn;
mod map;
mod redact;
mod reference;
pub mod slot_map;
mod snapshot_row;
mod store_view;
pub mod target_rows;

pub use govern::Governance;
pub use map::{Mapped, Pipeline, PipelineError, ToastFill};
pub use snapshot_row::{absent_mapped, snapshot_mapped};
