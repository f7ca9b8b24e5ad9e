//! What a target actually holds, for a deep reconciliation (`steward
//! reconcile --deep`): the rows read back from a PostgreSQL target's table,
//! and the pure comparisons the governance makes against them instead of
//! against the hash of the document it last sent.
//!
//! The target's `data` column is jsonb, which reorders object keys and may
//! print numbers differently (`1.0E+2` as `100`), so documents are compared
//! as JSON values with numbers compared by their decimal value.

use std::collections::HashMap;

use serde_json::Value;

use crate::config::TargetIndex;
use crate::model::{Event, EventData, EventOp};

/// One key's row in a target table (or its tombstone), as read back.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TargetRow {
    /// The row's `data` (None: no row, only a tombstone).
    pub data: Option<Value>,
    /// `_deleted` (a soft delete), or only a tombstone remains.
    pub deleted: bool,
    /// Whether the row's field columns agree with its `data` (a column
    /// changed by hand makes the row differ even when `data` is right).
    pub fields_match: bool,
    /// The highest `(_version, _event_id)` that guards the key at the
    /// target (the row's or its tombstone's): a write is accepted only when
    /// strictly newer.
    pub guard: Option<(u64, String)>,
}

impl TargetRow {
    /// The row exists and is not marked deleted.
    pub fn present(&self) -> bool {
        self.data.is_some() && !self.deleted
    }

    /// The row is present and holds exactly `doc`.
    pub fn holds(&self, doc: &EventData) -> bool {
        if !self.present() || !self.fields_match {
            return false;
        }
        let Some(have) = &self.data else {
            return false;
        };
        match serde_json::from_str::<Value>(doc.as_str()) {
            Ok(want) => json_equal(have, &want),
            Err(_) => false,
        }
    }

    /// Whether the target's version guard accepts a write with this version and id.
    pub fn accepts(&self, version: u64, id: &str) -> bool {
        match &self.guard {
            None => true,
            Some((v, e)) => (*v, e.as_bytes()) < (version, id.as_bytes()),
        }
    }
}

/// The rows target `target` holds for the keys of one chunk of one entity;
/// a key absent from `rows` has no row (nor tombstone) there.
#[derive(Clone, Debug)]
pub struct ActualRows {
    /// The target read.
    pub target: TargetIndex,
    /// Key → its row or tombstone.
    pub rows: HashMap<String, TargetRow>,
}

impl ActualRows {
    /// The row of `key` (None: the target has none).
    pub fn row(&self, key: &str) -> Option<&TargetRow> {
        self.rows.get(key)
    }

    /// Whether `key`'s row is present (not deleted).
    pub fn present(&self, key: &str) -> bool {
        self.row(key).is_some_and(TargetRow::present)
    }
}

/// What a deep comparison found for one record at the target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Drift {
    /// The target holds what it should (or rightly holds nothing).
    Equal,
    /// The target's row differs from the governed document.
    Changed,
    /// The target lacks a row it should have (absent or marked deleted).
    Missing,
    /// The target holds a row it should not (not publishable, routed away,
    /// gone from the source, or never sent).
    Extra,
}

/// Classifies the event the governance made for a record (None: none)
/// against the target's row of it.
pub fn drift_of(op: Option<EventOp>, row: Option<&TargetRow>) -> Drift {
    let present = row.is_some_and(TargetRow::present);
    match op {
        None => Drift::Equal,
        Some(EventOp::Delete) => Drift::Extra,
        Some(EventOp::Upsert) if present => Drift::Changed,
        Some(EventOp::Upsert) => Drift::Missing,
    }
}

/// Whether the target's guard refuses `event` (it keeps a row written by
/// hand with a version beyond what steward writes).
pub fn refused(event: &Event, row: Option<&TargetRow>) -> bool {
    row.is_some_and(|r| !r.accepts(event.version, &event.id))
}

/// JSON equality as a jsonb column sees it: object keys in any order,
/// numbers by decimal value.
pub fn json_equal(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => number_equal(&x.to_string(), &y.to_string()),
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(a, b)| json_equal(a, b))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| json_equal(v, w)))
        }
        _ => a == b,
    }
}

/// Two JSON number texts have the same decimal value (`1.50` = `1.5` =
/// `15e-1`); exact, without going through floating point.
fn number_equal(a: &str, b: &str) -> bool {
    a == b || decimal(a).is_some_and(|x| decimal(b).is_some_and(|y| x == y))
}

/// (negative, significant digits without leading or trailing zeros,
/// exponent of the first digit): one form per decimal value.
fn decimal(text: &str) -> Option<(bool, String, i64)> {
    let (negative, rest) = match text.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, text),
    };
    let (mantissa, exp) = match rest.find(['e', 'E']) {
        Some(at) => (&rest[..at], rest[at + 1..].parse::<i64>().ok()?),
        None => (rest, 0),
    };
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    if !int.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit()) || int.is_empty() {
        return None;
    }
    let digits: String = int.chars().chain(frac.chars()).collect();
    let lead = digits.len() - digits.trim_start_matches('0').len();
    let significant = digits.trim_start_matches('0').trim_end_matches('0');
    if significant.is_empty() {
        return Some((false, String::new(), 0));
    }
    let point = int.len() as i64 + exp - lead as i64;
    Some((negative, significant.to_string(), point))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn row(data: Value) -> TargetRow {
        TargetRow {
            data: Some(data),
            deleted: false,
            fields_match: true,
            guard: Some((10, "0000000A-00000000".into())),
        }
    }

    fn doc(v: Value) -> EventData {
        EventData::from_value(&v)
    }

    #[test]
    fn documents_compare_as_jsonb_does() {
        let have: Value =
            serde_json::from_str(r#"{"price": 1.50, "name": {"en": "A"}, "tags": [1, 2]}"#)
                .unwrap();
        let same: Value =
            serde_json::from_str(r#"{"tags": [1, 2.0], "name": {"en": "A"}, "price": 15e-1}"#)
                .unwrap();
        assert!(
            json_equal(&have, &same),
            "key order and number form differ only"
        );
        for other in [
            r#"{"tags": [2, 1], "name": {"en": "A"}, "price": 1.5}"#,
            r#"{"tags": [1, 2], "name": {"en": "B"}, "price": 1.5}"#,
            r#"{"tags": [1, 2], "name": {"en": "A"}, "price": 1.51}"#,
            r#"{"tags": [1, 2], "name": {"en": "A"}, "price": "1.5"}"#,
            r#"{"tags": [1, 2], "name": {"en": "A"}, "price": 1.5, "x": null}"#,
            r#"{"tags": [1, 2], "name": {"en": "A"}}"#,
        ] {
            let other: Value = serde_json::from_str(other).unwrap();
            assert!(!json_equal(&have, &other), "{other} differs");
        }
    }

    #[test]
    fn numbers_compare_by_decimal_value() {
        for (a, b) in [
            ("100", "1e2"),
            ("100", "1.0E+2"),
            ("0.001", "1e-3"),
            ("-2.50", "-2.5"),
            ("0", "-0.0"),
            ("12345678901234567890.1", "12345678901234567890.10"),
        ] {
            assert!(number_equal(a, b), "{a} = {b}");
        }
        for (a, b) in [
            ("100", "10"),
            ("1", "-1"),
            ("0.1", "0.01"),
            ("12345678901234567890.1", "12345678901234567890.2"),
        ] {
            assert!(!number_equal(a, b), "{a} != {b}");
        }
    }

    #[test]
    fn a_row_holds_a_document_only_when_present_and_its_columns_agree() {
        let want = doc(json!({"sku": "A", "price": 2}));
        assert!(row(json!({"price": 2.0, "sku": "A"})).holds(&want));
        assert!(!row(json!({"price": 3, "sku": "A"})).holds(&want));
        let mut deleted = row(json!({"price": 2, "sku": "A"}));
        deleted.deleted = true;
        assert!(!deleted.holds(&want), "a soft-deleted row holds nothing");
        let mut columns = row(json!({"price": 2, "sku": "A"}));
        columns.fields_match = false;
        assert!(!columns.holds(&want), "a field column changed by hand");
    }

    #[test]
    fn drift_is_classified_by_the_event_and_the_row() {
        let present = row(json!({}));
        let mut soft = row(json!({}));
        soft.deleted = true;
        assert_eq!(drift_of(None, Some(&present)), Drift::Equal);
        assert_eq!(drift_of(None, None), Drift::Equal);
        assert_eq!(
            drift_of(Some(EventOp::Upsert), Some(&present)),
            Drift::Changed
        );
        assert_eq!(drift_of(Some(EventOp::Upsert), None), Drift::Missing);
        assert_eq!(drift_of(Some(EventOp::Upsert), Some(&soft)), Drift::Missing);
        assert_eq!(
            drift_of(Some(EventOp::Delete), Some(&present)),
            Drift::Extra
        );
    }

    #[test]
    fn the_guard_accepts_only_strictly_newer_writes() {
        let r = row(json!({}));
        assert!(r.accepts(11, "snap-0"));
        assert!(r.accepts(10, "0000000A-00000001"));
        assert!(!r.accepts(10, "0000000A-00000000"), "equal is refused");
        assert!(!r.accepts(9, "snap-0"));
        let fresh = TargetRow::default();
        assert!(fresh.accepts(0, ""));
    }
}
