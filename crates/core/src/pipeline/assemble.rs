//! Building a record's document from its captured row (all columns as
//! JSON): mapped fields, reference fields and child arrays. Used for governed
//! entities, whose documents must also be rebuilt later without a change
//! (re-emission after a referenced record changed, quarantine release).

use serde_json::{Map, Value};

use crate::config::{EntityConfig, FieldConfig, FieldSource};

/// The mapped fields of `row`, as the mapping stage would produce them.
pub(crate) fn document(fields: &[FieldConfig], row: &Map<String, Value>) -> Map<String, Value> {
    let mut out = Map::with_capacity(fields.len());
    for f in fields {
        let mut v = source_value(&f.source, row);
        if v.is_null() {
            if let Some(fb) = &f.fallback {
                v = source_value(fb, row);
            }
        }
        out.insert(f.name.clone(), v);
    }
    out
}

fn source_value(source: &FieldSource, row: &Map<String, Value>) -> Value {
    let mut v = row.get(&source.column).unwrap_or(&Value::Null);
    for step in &source.path {
        v = match v {
            Value::Object(m) => m.get(step.as_str()).unwrap_or(&Value::Null),
            Value::Array(items) => step
                .parse::<usize>()
                .ok()
                .and_then(|i| items.get(i))
                .unwrap_or(&Value::Null),
            _ => &Value::Null,
        };
    }
    v.clone()
}

/// The key fields of a record (what a delete carries), named like the mapping stage names them.
pub(crate) fn key_data(entity: &EntityConfig, row: &Map<String, Value>) -> Map<String, Value> {
    let mut out = Map::new();
    for column in &entity.key {
        let name = entity
            .fields
            .iter()
            .find(|f| f.source.column == *column && f.source.path.is_empty())
            .map(|f| f.name.clone())
            .unwrap_or_else(|| column.clone());
        out.insert(name, row.get(column).cloned().unwrap_or(Value::Null));
    }
    out
}

/// A field for rules and business keys: the document's field of that name,
/// else the row's column of that name.
pub(crate) fn lookup<'a>(
    name: &str,
    doc: &'a Map<String, Value>,
    row: Option<&'a Map<String, Value>>,
) -> Option<&'a Value> {
    doc.get(name)
        .or_else(|| row.and_then(|r| r.get(name)))
        .filter(|v| !v.is_null())
}

/// Text of a scalar for keys and messages (`"abc"` → `abc`, `12` → `12`).
pub(crate) fn text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Business-key normalisation: case-folded, inner whitespace collapsed, trimmed.
pub(crate) fn normalise(value: &str) -> String {
    value
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .to_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn documents_follow_json_paths_and_fallbacks() {
        let fields = vec![
            FieldConfig {
                name: "name".into(),
                source: FieldSource {
                    column: "name".into(),
                    path: vec!["de_DE".into()],
                },
                fallback: Some(FieldSource {
                    column: "name".into(),
                    path: vec!["en_US".into()],
                }),
            },
            FieldConfig {
                name: "sku".into(),
                source: FieldSource {
                    column: "default_code".into(),
                    path: vec![],
                },
                fallback: None,
            },
        ];
        let row = json!({"name": {"en_US": "Desk"}, "default_code": "D1"});
        let doc = document(&fields, row.as_object().unwrap());
        assert_eq!(Value::Object(doc), json!({"name": "Desk", "sku": "D1"}));
        assert_eq!(normalise("  Furn_01 \t X "), "furn_01 x");
    }
}
