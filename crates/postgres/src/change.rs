//! Decoded row changes as they come out of the pgoutput decoder, before any
//! mapping. Column values stay as the server's text so that only the columns
//! an entity maps are ever converted.

use bytes::Bytes;

/// One column of a relation as described by a pgoutput Relation message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Column {
    /// Part of the replica identity (the primary key for Odoo tables).
    pub is_key: bool,
    /// Column name as in the catalog.
    pub name: String,
    /// OID of the column's data type (`pg_type.oid`).
    pub type_oid: u32,
    /// Type modifier (`atttypmod`), e.g. the length of a `varchar(n)`; -1 for none.
    pub type_modifier: i32,
}

/// A table as the server last described it on this stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Relation {
    /// Relation OID, which [`Change::relation_id`] refers to.
    pub id: u32,
    /// Schema name.
    pub namespace: String,
    /// Table name.
    pub name: String,
    /// `d` default, `n` nothing, `f` full, `i` index.
    pub replica_identity: u8,
    /// In table order; a [`Tuple`] of this relation has one value per column.
    pub columns: Vec<Column>,
}

impl Relation {
    /// `schema.table`, the form used in the configuration.
    pub fn qualified_name(&self) -> String {
        format!("{}.{}", self.namespace, self.name)
    }
}

/// One column value of a tuple.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TupleValue {
    /// SQL NULL.
    Null,
    /// A TOASTed value the update did not change; pgoutput does not resend it.
    UnchangedToast,
    /// The type's text output (we ask for text format).
    Text(Bytes),
    /// Binary format; only sent when binary mode is requested, which steward never does.
    Binary(Bytes),
}

/// One row: a value per column of its [`Relation`], in column order.
pub type Tuple = Vec<TupleValue>;

/// The kind of row change.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ChangeOp {
    /// A new row.
    Insert,
    /// A changed row.
    Update,
    /// A removed row.
    Delete,
}

/// A row change of one relation inside a transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    /// OID of the changed table, as announced by an earlier [`Relation`].
    pub relation_id: u32,
    /// Insert, update or delete.
    pub op: ChangeOp,
    /// The new row (insert, update). `None` for deletes.
    pub new: Option<Tuple>,
    /// The old row's key (`K`) or whole old row (`O`, replica identity full), when sent.
    pub old: Option<Tuple>,
}
