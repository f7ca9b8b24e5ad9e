//! Types shared by every stage: LSNs, decoded changes, column values and
//! the events that targets receive. No I/O lives here.

pub(crate) mod event;
pub mod json;
pub mod value;

pub(crate) use event::push_hex;
pub use event::{split_key, Event, EventData, EventOp, SourceChange};
pub use steward_postgres::{Change, ChangeOp, Column, Lsn, Relation, TupleValue};
