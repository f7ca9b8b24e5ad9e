//! Per-target field policy: an allow-list of fields per entity, masking and
//! keyed hashing (HMAC-SHA256, hex). Applied to a copy of the document just
//! before it is appended for one target. A value that cannot be masked or
//! hashed is replaced by null: a policy error never leaks the original.

use std::borrow::Cow;

use hmac::{Hmac, KeyInit, Mac};
use serde_json::{Map, Value};
use sha2::Sha256;

use crate::config::governance::{Mask, TargetPolicy};

/// The document a target may see, and a note of what was redacted (empty if
/// nothing). Borrowed when the policy has no rule for the entity: most
/// targets see whole documents, and copying each one cost a tenth of
/// governance's time.
///
/// A field may be a child path `child.field`: the allow-list then keeps only
/// the listed fields of each item of that children array (the bare `child`
/// keeps whole items), and a mask or hash applies to that field of every item.
pub(crate) fn apply<'a>(
    policy: &TargetPolicy,
    entity: &str,
    doc: &'a Map<String, Value>,
) -> (Cow<'a, Map<String, Value>>, Vec<String>) {
    let touches = policy.allow.iter().any(|(e, _)| e == entity)
        || policy.mask.iter().any(|(e, _, _)| e == entity)
        || policy.hash.iter().any(|(e, _)| e == entity);
    if !touches {
        return (Cow::Borrowed(doc), Vec::new());
    }
    let mut out: Map<String, Value> = match policy.allow.iter().find(|(e, _)| e == entity) {
        Some((_, allowed)) => allow(doc, allowed),
        None => doc.clone(),
    };
    let mut notes = Vec::new();
    for (e, field, method) in &policy.mask {
        if e != entity {
            continue;
        }
        if for_each_value(&mut out, field, |v| *v = mask(v, *method)) {
            notes.push(format!(
                "{field} masked ({})",
                match method {
                    Mask::Last4 => "last4",
                    Mask::Full => "full",
                }
            ));
        }
    }
    let mac = policy
        .hash_key
        .as_ref()
        .map(|key| Hmac::<Sha256>::new_from_slice(key.expose().as_bytes()));
    for (e, field) in &policy.hash {
        if e != entity {
            continue;
        }
        let mut note = "";
        let hashed = for_each_value(&mut out, field, |v| {
            (*v, note) = match &mac {
                Some(Ok(mac)) => {
                    let mut mac = mac.clone();
                    mac.update(scalar_text(v).as_bytes());
                    (Value::String(hex(&mac.finalize().into_bytes())), "hashed")
                }
                Some(Err(_)) => (Value::Null, "withheld (hash key unusable)"),
                None => (Value::Null, "withheld (no hash key)"),
            };
        });
        if hashed {
            notes.push(format!("{field} {note}"));
        }
    }
    (Cow::Owned(out), notes)
}

/// The fields of `doc` the allow-list keeps: listed fields whole, children
/// arrays named by child paths with only the listed fields of each item.
fn allow(doc: &Map<String, Value>, allowed: &[String]) -> Map<String, Value> {
    let mut out = Map::new();
    for (k, v) in doc {
        if allowed.iter().any(|a| a == k) {
            out.insert(k.clone(), v.clone());
            continue;
        }
        let item_fields: Vec<&str> = allowed
            .iter()
            .filter_map(|a| a.split_once('.'))
            .filter(|(child, _)| child == k)
            .map(|(_, f)| f)
            .collect();
        if item_fields.is_empty() {
            continue;
        }
        let kept = match v {
            Value::Array(items) => Value::Array(
                items
                    .iter()
                    .map(|item| match item {
                        Value::Object(fields) => Value::Object(
                            fields
                                .iter()
                                .filter(|(f, _)| item_fields.contains(&f.as_str()))
                                .map(|(f, v)| (f.clone(), v.clone()))
                                .collect(),
                        ),
                        other => other.clone(),
                    })
                    .collect(),
            ),
            // Not an array (e.g. null): nothing inside to drop.
            other => other.clone(),
        };
        out.insert(k.clone(), kept);
    }
    out
}

/// Applies `f` to every non-null value `field` names in `doc`: the field, or
/// for a child path `child.field` that field of each item of the array.
/// Returns whether there was any.
fn for_each_value(
    doc: &mut Map<String, Value>,
    field: &str,
    mut f: impl FnMut(&mut Value),
) -> bool {
    let mut any = false;
    let mut visit = |v: Option<&mut Value>| {
        if let Some(v) = v.filter(|v| !v.is_null()) {
            f(v);
            any = true;
        }
    };
    match field.split_once('.') {
        None => visit(doc.get_mut(field)),
        Some((child, item_field)) => {
            if let Some(Value::Array(items)) = doc.get_mut(child) {
                for item in items {
                    if let Value::Object(fields) = item {
                        visit(fields.get_mut(item_field));
                    }
                }
            }
        }
    }
    any
}

fn scalar_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn mask(v: &Value, method: Mask) -> Value {
    let text = scalar_text(v);
    match method {
        Mask::Full => Value::String("***".into()),
        Mask::Last4 => {
            let chars: Vec<char> = text.chars().filter(|c| !c.is_whitespace()).collect();
            let keep = chars.len().saturating_sub(4);
            // Short values are masked entirely: their last 4 would be the whole value.
            let masked: String = if chars.len() <= 4 {
                "*".repeat(chars.len())
            } else {
                chars
                    .iter()
                    .enumerate()
                    .map(|(i, c)| if i < keep { '*' } else { *c })
                    .collect()
            };
            Value::String(masked)
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;
    use serde_json::json;

    #[test]
    fn allow_list_mask_and_hash() {
        let policy = TargetPolicy {
            allow: vec![(
                "bank".into(),
                vec!["acc_number".into(), "holder".into(), "iban".into()],
            )],
            mask: vec![("bank".into(), "acc_number".into(), Mask::Last4)],
            hash: vec![("bank".into(), "holder".into())],
            hash_key: Some(Secret::new("k")),
            route: None,
        };
        let doc =
            json!({"acc_number": "DE89 3704 0044 0532 0130 00", "holder": "Acme", "partner": 7});
        let (out, notes) = apply(&policy, "bank", doc.as_object().unwrap());
        assert_eq!(out["acc_number"], "******************3000");
        assert!(!out.contains_key("partner"), "not in the allow-list");
        let h = out["holder"].as_str().unwrap();
        assert_eq!(h.len(), 64);
        assert_ne!(h, "Acme");
        assert_eq!(notes.len(), 2);
        // Another entity is untouched.
        let (same, notes) = apply(&policy, "product", doc.as_object().unwrap());
        assert!(
            matches!(same, Cow::Borrowed(_)),
            "no copy for an entity without rules"
        );
        assert_eq!(Value::Object(same.into_owned()), doc);
        assert!(notes.is_empty());
        // No key: withheld, never the original.
        let policy = TargetPolicy {
            hash_key: None,
            ..policy
        };
        let (out, _) = apply(&policy, "bank", doc.as_object().unwrap());
        assert_eq!(out["holder"], Value::Null);
    }

    fn partner() -> Value {
        json!({
            "name": "Acme",
            "banks": [
                {"acc_number": "DE89 3704 0044 0532 0130 00", "holder": "Acme", "id": 1},
                {"acc_number": null, "holder": "Acme", "id": 2},
                {"holder": "Acme Ltd", "id": 3}
            ],
            "ref": "P1"
        })
    }

    fn policy(allow: &[&str], mask: &[(&str, Mask)], hash: &[&str]) -> TargetPolicy {
        TargetPolicy {
            allow: if allow.is_empty() {
                Vec::new()
            } else {
                vec![(
                    "partner".into(),
                    allow.iter().map(std::string::ToString::to_string).collect(),
                )]
            },
            mask: mask
                .iter()
                .map(|(f, m)| ("partner".into(), f.to_string(), *m))
                .collect(),
            hash: hash
                .iter()
                .map(|f| ("partner".into(), f.to_string()))
                .collect(),
            hash_key: Some(Secret::new("k")),
            route: None,
        }
    }

    #[test]
    fn allow_list_child_paths_keep_only_the_listed_item_fields() {
        let doc = partner();
        let (out, notes) = apply(
            &policy(&["name", "banks.acc_number", "banks.id"], &[], &[]),
            "partner",
            doc.as_object().unwrap(),
        );
        assert_eq!(
            Value::Object(out.into_owned()),
            json!({"name": "Acme", "banks": [
                {"acc_number": "DE89 3704 0044 0532 0130 00", "id": 1},
                {"acc_number": null, "id": 2},
                {"id": 3}
            ]})
        );
        assert!(notes.is_empty());
        // The bare child name keeps whole items.
        let (out, _) = apply(
            &policy(&["banks"], &[], &[]),
            "partner",
            doc.as_object().unwrap(),
        );
        assert_eq!(
            Value::Object(out.into_owned()),
            json!({"banks": doc["banks"]})
        );
        // A null children array stays null.
        let doc = json!({"name": "Acme", "banks": null});
        let (out, _) = apply(
            &policy(&["banks.acc_number"], &[], &[]),
            "partner",
            doc.as_object().unwrap(),
        );
        assert_eq!(Value::Object(out.into_owned()), json!({"banks": null}));
    }

    #[test]
    fn masks_apply_to_a_child_field_of_every_item() {
        let doc = partner();
        let (out, notes) = apply(
            &policy(&[], &[("banks.acc_number", Mask::Last4)], &[]),
            "partner",
            doc.as_object().unwrap(),
        );
        assert_eq!(out["banks"][0]["acc_number"], "******************3000");
        assert_eq!(
            out["banks"][1]["acc_number"],
            Value::Null,
            "null stays null"
        );
        assert!(
            !out["banks"][2]
                .as_object()
                .unwrap()
                .contains_key("acc_number"),
            "a missing field is not added"
        );
        assert_eq!(out["banks"][0]["holder"], "Acme");
        assert_eq!(out["name"], "Acme");
        assert_eq!(notes, ["banks.acc_number masked (last4)"]);

        // No value to mask (all null or missing, or no items): no note.
        let doc = json!({"name": "Acme", "banks": [{"acc_number": null}, {"id": 4}]});
        let (out, notes) = apply(
            &policy(&[], &[("banks.acc_number", Mask::Full)], &[]),
            "partner",
            doc.as_object().unwrap(),
        );
        assert_eq!(Value::Object(out.into_owned()), doc);
        assert!(notes.is_empty());
        let doc = json!({"name": "Acme"});
        let (_, notes) = apply(
            &policy(&[], &[("banks.acc_number", Mask::Full)], &[]),
            "partner",
            doc.as_object().unwrap(),
        );
        assert!(notes.is_empty());
    }

    #[test]
    fn hashes_apply_to_a_child_field_of_every_item() {
        let doc = partner();
        let p = policy(&[], &[], &["banks.holder", "banks.acc_number"]);
        let (out, notes) = apply(&p, "partner", doc.as_object().unwrap());
        let h0 = out["banks"][0]["holder"].as_str().unwrap();
        let h1 = out["banks"][1]["holder"].as_str().unwrap();
        let h2 = out["banks"][2]["holder"].as_str().unwrap();
        assert_eq!(h0.len(), 64);
        assert_eq!(h0, h1, "the same value hashes the same");
        assert_ne!(h0, h2);
        assert_eq!(out["banks"][1]["acc_number"], Value::Null);
        assert!(!out["banks"][2]
            .as_object()
            .unwrap()
            .contains_key("acc_number"));
        // The same key and value give the hash a top-level field would get.
        let flat = json!({"holder": "Acme"});
        let (flat_out, _) = apply(
            &TargetPolicy {
                hash: vec![("partner".into(), "holder".into())],
                ..p.clone()
            },
            "partner",
            flat.as_object().unwrap(),
        );
        assert_eq!(flat_out["holder"], h0);
        assert_eq!(notes, ["banks.holder hashed", "banks.acc_number hashed"]);

        // Without a key: withheld in every item, never sent in clear.
        let p = TargetPolicy {
            hash_key: None,
            ..p
        };
        let (out, notes) = apply(&p, "partner", doc.as_object().unwrap());
        for item in out["banks"].as_array().unwrap() {
            assert_eq!(item["holder"], Value::Null);
        }
        assert_eq!(notes[0], "banks.holder withheld (no hash key)");
    }

    #[test]
    fn allow_list_mask_and_hash_combine_on_children() {
        let doc = partner();
        let p = policy(
            &["banks.acc_number", "banks.holder"],
            &[("banks.acc_number", Mask::Last4)],
            &["banks.holder"],
        );
        let (out, notes) = apply(&p, "partner", doc.as_object().unwrap());
        assert_eq!(out.keys().collect::<Vec<_>>(), ["banks"]);
        assert_eq!(out["banks"][0]["acc_number"], "******************3000");
        assert_eq!(out["banks"][0]["holder"].as_str().unwrap().len(), 64);
        assert!(!out["banks"][0].as_object().unwrap().contains_key("id"));
        assert_eq!(notes.len(), 2);
        // Another entity still borrows the document.
        let (same, notes) = apply(&p, "product", doc.as_object().unwrap());
        assert!(matches!(same, Cow::Borrowed(_)));
        assert!(notes.is_empty());
    }

    #[test]
    fn last4_drops_whitespace_and_masks_short_values_entirely() {
        let m = |v: Value| mask(&v, Mask::Last4);
        assert_eq!(
            m(json!("DE89 3704 0044 0532 0130 00")),
            "******************3000"
        );
        assert_eq!(m(json!("ABCDE")), "*BCDE");
        assert_eq!(
            m(json!(" AB CD ")),
            "****",
            "4 characters after whitespace is dropped"
        );
        assert_eq!(m(json!("abc")), "***");
        assert_eq!(
            m(json!(123456)),
            "**3456",
            "numbers are masked as their text"
        );
        assert_eq!(mask(&json!("anything"), Mask::Full), "***");
    }
}
