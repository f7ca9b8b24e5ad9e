//! CEL predicates over a row change: `row.<column>`, `old.<column>` and `op`.
//!
//! Expressions are compiled once, at configuration load ([`CelExpr::compile`]),
//! so a typo is a config error naming the key, never a runtime surprise.
//! Evaluation converts the row's JSON columns into CEL values; a column that is
//! absent from the row (or an `old` row that is not known) makes `row.x` an
//! evaluation error, which callers treat as "does not hold" and report.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use cel::{Context, Program, Value as CelValue};
use serde_json::{Map, Value};

/// A compiled CEL expression and the text it came from (for messages).
#[derive(Clone)]
pub(crate) struct CelExpr {
    pub(crate) source: String,
    program: Arc<Program>,
    /// Columns of `row` / `old` the expression reads; `None`: the variable
    /// is used in another way (e.g. `row["x"]`), so every column is bound.
    /// Binding only what is read keeps a predicate over a 50-column Odoo row cheap.
    row_columns: Option<Vec<String>>,
    old_columns: Option<Vec<String>>,
}

impl std::fmt::Debug for CelExpr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CelExpr({:?})", self.source)
    }
}

// SAFETY-free assertion: the daemon keeps compiled expressions across awaits.
fn _assert_send_sync() {
    fn check<T: Send + Sync>() {}
    check::<CelExpr>();
}

/// The row change an expression is evaluated over.
pub(crate) struct CelInput<'a> {
    /// The new row (inserts, updates) or the deleted row when known.
    pub(crate) row: Option<&'a Map<String, Value>>,
    /// The previous row, when known.
    pub(crate) old: Option<&'a Map<String, Value>>,
    /// `insert`, `update` or `delete`.
    pub(crate) op: &'a str,
}

impl CelExpr {
    /// Compiles `source`; the error is the parser's message, to be shown with the config key.
    pub(crate) fn compile(source: &str) -> Result<CelExpr, String> {
        if source.trim().is_empty() {
            return Err("is empty; write a CEL expression such as `row.active`".into());
        }
        // The parser can panic on some malformed inputs in older releases;
        // a config typo must never take the process down.
        let compiled = std::panic::catch_unwind(|| Program::compile(source)).map_err(|_| {
            "the CEL parser failed on this expression; check its syntax".to_string()
        })?;
        let program = compiled.map_err(|e| {
            format!(
                "is not a valid CEL expression: {}",
                e.to_string().replace('\n', "; ")
            )
        })?;
        let row_columns = columns_read(source, "row");
        let old_columns = columns_read(source, "old");
        Ok(CelExpr {
            source: source.to_string(),
            program: Arc::new(program),
            row_columns,
            old_columns,
        })
    }

    /// Evaluates to a value (errors are CEL's messages: missing key, type mismatch, ...).
    pub(crate) fn eval(&self, input: &CelInput<'_>) -> Result<CelValue, String> {
        let mut context = Context::with_env(env());
        context.add_variable_from_value("row", row_value(input.row, self.row_columns.as_deref()));
        context.add_variable_from_value("old", row_value(input.old, self.old_columns.as_deref()));
        context.add_variable_from_value("op", CelValue::String(Arc::new(input.op.to_string())));
        self.program.execute(&context).map_err(|e| e.to_string())
    }

    /// Evaluates a predicate: `Ok(true/false)` for a boolean, an error for
    /// any other result or a failed evaluation.
    pub(crate) fn test(&self, input: &CelInput<'_>) -> Result<bool, String> {
        match self.eval(input)? {
            CelValue::Bool(b) => Ok(b),
            other => Err(format!(
                "`{}` evaluated to {other:?}, not true or false",
                self.source
            )),
        }
    }
}

/// The standard CEL environment, built once: building it per evaluation
/// would dominate the cost of a simple predicate.
fn env() -> Arc<cel::Env> {
    static ENV: OnceLock<Arc<cel::Env>> = OnceLock::new();
    ENV.get_or_init(|| Arc::new(cel::Env::stdlib())).clone()
}

/// The columns `var.column` reads in `source`, when every use of `var` has that form.
fn columns_read(source: &str, var: &str) -> Option<Vec<String>> {
    let dotted = regex::Regex::new(&format!(r"\b{var}\s*\.\s*([A-Za-z_][A-Za-z0-9_]*)")).ok()?;
    let any = regex::Regex::new(&format!(r"\b{var}\b")).ok()?;
    let mut columns: Vec<String> = dotted
        .captures_iter(source)
        .filter_map(|c| c.get(1).map(|m| m.as_str().to_string()))
        .collect();
    // `row` inside a string literal or used whole: bind everything (correct, slower).
    if any.find_iter(source).count() != columns.len() {
        return None;
    }
    columns.sort();
    columns.dedup();
    Some(columns)
}

fn row_value(row: Option<&Map<String, Value>>, columns: Option<&[String]>) -> CelValue {
    match (row, columns) {
        (Some(map), Some(columns)) => {
            let mut out: HashMap<cel::objects::Key, CelValue> =
                HashMap::with_capacity(columns.len());
            for c in columns {
                if let Some(v) = map.get(c) {
                    out.insert(cel::objects::Key::from(c.clone()), json_to_cel(v));
                }
            }
            CelValue::Map(cel::objects::Map { map: Arc::new(out) })
        }
        (Some(map), None) => object(map),
        (None, _) => CelValue::Map(cel::objects::Map {
            map: Arc::new(HashMap::new()),
        }),
    }
}

fn object(map: &Map<String, Value>) -> CelValue {
    let mut out: HashMap<cel::objects::Key, CelValue> = HashMap::with_capacity(map.len());
    for (k, v) in map {
        out.insert(cel::objects::Key::from(k.clone()), json_to_cel(v));
    }
    CelValue::Map(cel::objects::Map { map: Arc::new(out) })
}

/// JSON → CEL: integers stay integers, other numbers become doubles (CEL
/// has no decimal type; exact digits matter only for delivery, not predicates).
pub(crate) fn json_to_cel(value: &Value) -> CelValue {
    match value {
        Value::Null => CelValue::Null,
        Value::Bool(b) => CelValue::Bool(*b),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                CelValue::Int(i)
            } else if let Some(u) = n.as_u64() {
                CelValue::UInt(u)
            } else {
                CelValue::Float(n.as_f64().unwrap_or(f64::NAN))
            }
        }
        Value::String(s) => CelValue::String(Arc::new(s.clone())),
        Value::Array(items) => CelValue::List(Arc::new(items.iter().map(json_to_cel).collect())),
        Value::Object(map) => object(map),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn row(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap()
    }

    #[test]
    fn lifecycle_predicate_over_row_old_and_op() {
        let e = CelExpr::compile("row.active && row.x_lifecycle_state in ['approved','released']")
            .unwrap();
        let approved = row(json!({"active": true, "x_lifecycle_state": "approved"}));
        let draft = row(json!({"active": true, "x_lifecycle_state": "draft"}));
        let input = |r| CelInput {
            row: Some(r),
            old: None,
            op: "update",
        };
        assert!(e.test(&input(&approved)).unwrap());
        assert!(!e.test(&input(&draft)).unwrap());

        let changed =
            CelExpr::compile("op == 'update' && old.list_price != row.list_price").unwrap();
        let old = row(json!({"list_price": 1.5}));
        let new = row(json!({"list_price": 2}));
        assert!(changed
            .test(&CelInput {
                row: Some(&new),
                old: Some(&old),
                op: "update"
            })
            .unwrap());
    }

    #[test]
    fn parse_errors_and_non_boolean_results_are_reported() {
        assert_eq!(
            columns_read("row.a && old . b != row.c_1 || row.a", "row"),
            Some(vec!["a".to_string(), "c_1".to_string()])
        );
        assert_eq!(columns_read("row['a'] == 1", "row"), None);
        assert_eq!(columns_read("op == 'insert'", "row"), Some(vec![]));
        let err = CelExpr::compile("row.active &&").unwrap_err();
        assert!(err.contains("not a valid CEL expression"), "{err}");
        let e = CelExpr::compile("row.company_id").unwrap();
        let r = row(json!({"company_id": 3}));
        let err = e
            .test(&CelInput {
                row: Some(&r),
                old: None,
                op: "insert",
            })
            .unwrap_err();
        assert!(err.contains("not true or false"), "{err}");
        // A missing column is an error, not a silent false.
        let e = CelExpr::compile("row.nope == 1").unwrap();
        assert!(e
            .test(&CelInput {
                row: Some(&r),
                old: None,
                op: "insert"
            })
            .is_err());
    }
}
