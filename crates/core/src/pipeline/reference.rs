//! Reference resolution: a many2one column (e.g. `uom_id = 3`) delivered as
//! the referenced record's business key (e.g. the unit's name), from the
//! rows of the referenced entity that steward tracks (replicated changes,
//! plus an initial read of the table when nothing is tracked yet).

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::{Map, Value};

use super::assemble;
use crate::config::governance::RefField;
use crate::config::{EntityConfig, EntityIndex};

/// Rows tracked per entity: key text → columns.
pub(crate) type Rows = HashMap<(EntityIndex, String), Arc<Map<String, Value>>>;

/// The business key a reference field delivers, or null when the column is
/// null or the referenced record is unknown.
pub(crate) fn resolve(
    field: &RefField,
    target_entity: EntityIndex,
    target: &EntityConfig,
    row: &Map<String, Value>,
    rows: &Rows,
) -> Value {
    let Some(id) = row.get(&field.column).filter(|v| !v.is_null()) else {
        return Value::Null;
    };
    let Some(referenced) = rows.get(&(target_entity, assemble::text(id))) else {
        return Value::Null;
    };
    let doc = assemble::document(&target.fields, referenced);
    doc.get(&field.key)
        .cloned()
        .or_else(|| referenced.get(&field.key).cloned())
        .unwrap_or(Value::Null)
}
