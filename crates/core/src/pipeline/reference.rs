//! Reference resolution: a many2one column (e.g. `uom_id = 3`) delivered as
//! the referenced record's business key (e.g. the unit's name), from the
//! rows of the referenced entity that steward tracks (replicated changes,
//! plus an initial read of the table when nothing is tracked yet).

use serde_json::{Map, Value};

use super::assemble;
use super::store_view::Row;
use crate::config::governance::RefField;
use crate::config::EntityConfig;

/// The business key a reference field delivers, or null when the column is
/// null or the referenced record is unknown (`lookup` gives the tracked row
/// of a record of the referenced entity, `target`, by key).
pub(crate) fn resolve(
    field: &RefField,
    target: &EntityConfig,
    row: &Map<String, Value>,
    lookup: impl FnOnce(&str) -> Option<Row>,
) -> Value {
    let Some(id) = row.get(&field.column).filter(|v| !v.is_null()) else {
        return Value::Null;
    };
    let Some(referenced) = lookup(&assemble::text(id)) else {
        return Value::Null;
    };
    let doc = assemble::document(&target.fields, &referenced);
    doc.get(&field.key)
        .cloned()
        .or_else(|| referenced.get(&field.key).cloned())
        .unwrap_or(Value::Null)
}
