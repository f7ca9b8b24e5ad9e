//! Types shared by every stage: LSNs, decoded changes, column values and
//! the events that targets receive. No I/O lives here.

pub mod change;
pub mod event;
pub mod json;
pub mod lsn;
pub mod value;

pub use change::{Change, ChangeOp, Column, Relation, Tuple, TupleValue};
pub use event::{Event, EventData, EventOp, SourceChange};
pub use lsn::Lsn;
