//! Per-target field policy: an allow-list of fields per entity, masking and
//! keyed hashing (HMAC-SHA256, hex). Applied to a copy of the document just
//! before it is appended for one target. A value that cannot be masked or
//! hashed is replaced by null: a policy error never leaks the original.

use std::borrow::Cow;

use hmac::{Hmac, Mac};
use serde_json::{Map, Value};
use sha2::Sha256;

use crate::config::governance::{Mask, TargetPolicy};

/// The document a target may see, and a note of what was redacted (empty if
/// nothing). Borrowed when the policy has no rule for the entity: most
/// targets see whole documents, and copying each one cost a tenth of
/// governance's time.
pub fn apply<'a>(
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
        Some((_, allowed)) => doc
            .iter()
            .filter(|(k, _)| allowed.iter().any(|a| a == *k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        None => doc.clone(),
    };
    let mut notes = Vec::new();
    for (e, field, method) in &policy.mask {
        if e != entity {
            continue;
        }
        if let Some(v) = out.get_mut(field) {
            if !v.is_null() {
                *v = mask(v, *method);
                notes.push(format!(
                    "{field} masked ({})",
                    match method {
                        Mask::Last4 => "last4",
                        Mask::Full => "full",
                    }
                ));
            }
        }
    }
    for (e, field) in &policy.hash {
        if e != entity {
            continue;
        }
        if let Some(v) = out.get_mut(field) {
            if v.is_null() {
                continue;
            }
            match &policy.hash_key {
                Some(key) => match Hmac::<Sha256>::new_from_slice(key.expose().as_bytes()) {
                    Ok(mut mac) => {
                        mac.update(scalar_text(v).as_bytes());
                        *v = Value::String(hex(&mac.finalize().into_bytes()));
                        notes.push(format!("{field} hashed"));
                    }
                    Err(_) => {
                        *v = Value::Null;
                        notes.push(format!("{field} withheld (hash key unusable)"));
                    }
                },
                None => {
                    *v = Value::Null;
                    notes.push(format!("{field} withheld (no hash key)"));
                }
            }
        }
    }
    (Cow::Owned(out), notes)
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
}
