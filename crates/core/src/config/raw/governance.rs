//! Checking the governance keys of `[entities.*]`, `[targets.*]` and
//! `[state]` into [`GovernanceConfig`]. Runs after the core sections were
//! checked (their unknown-key lists include these keys), and reports every
//! problem with its dotted key, like the rest of the configuration. Every
//! key naming a field is checked against what the entity maps (see `paths`).

use std::path::Path;

use toml::{Table, Value};

use super::paths::{Known, Use};
use super::reader::{check_sql_ident, join, type_name, Errors, Reader};
use super::{field_source, secret_from_file};
use crate::cel::CelExpr;
use crate::config::governance::{
    Check, ChildConfig, EntityGovernance, GovernanceConfig, Mask, OnUnpublish, RefField, Rule,
    TargetPolicy,
};
use crate::config::{EntityConfig, EntityIndex, FieldConfig, TargetConfig};

const RULE_KEYS: &[&str] = &[
    "name",
    "required",
    "regex",
    "allowed",
    "range",
    "cel",
    "reference",
    "message",
];
const REF_KEYS: &[&str] = &["ref", "entity", "key", "external_id", "model"];
/// The Odoo table of external ids (`module.name` per model and record id).
const EXTERNAL_ID_TABLE: &str = "ir_model_data";
const CHILD_KEYS: &[&str] = &["table", "parent", "fields"];

/// Checks the governance keys; appends one hidden entity per child table to `entities`.
pub(super) fn check(
    doc: &Table,
    entities: &mut Vec<EntityConfig>,
    targets: &[TargetConfig],
    base_dir: &Path,
    errs: &mut Errors,
) -> GovernanceConfig {
    let mut gov = GovernanceConfig {
        audit_retention_days: 90,
        ..GovernanceConfig::default()
    };
    if let Some(Value::Table(state)) = doc.get("state") {
        match state.get("audit_retention_days") {
            None => {}
            Some(Value::Integer(d)) if (1..=36_500).contains(d) => {
                gov.audit_retention_days = *d as u32;
            }
            Some(other) => errs.add(
                "state.audit_retention_days",
                format!(
                    "expected a number of days between 1 and 36500, found {}",
                    match other {
                        Value::Integer(i) => i.to_string(),
                        v => type_name(v).to_string(),
                    }
                ),
            ),
        }
    }
    let entity_tables = match doc.get("entities") {
        Some(Value::Table(t)) => t.clone(),
        _ => Table::new(),
    };
    let names: Vec<String> = entities.iter().map(|e| e.name.clone()).collect();
    let mut hidden = Vec::new();
    for (i, entity) in entities.iter().enumerate() {
        let Some(Value::Table(t)) = entity_tables.get(&entity.name) else {
            gov.entities.push(EntityGovernance {
                field_order: entity.fields.iter().map(|f| f.name.clone()).collect(),
                ..EntityGovernance::default()
            });
            continue;
        };
        let key = join("entities", &entity.name);
        let mut g = check_entity(&key, t, entity, &names, errs);
        // Children become hidden entities mapped like any other table. Their
        // reference columns are not mapped fields (as for an entity's
        // references): hidden entities are governed, so their whole rows,
        // those columns included, are captured.
        for (c, child) in g.children.iter_mut().enumerate() {
            child.entity = EntityIndex(entities.len() + hidden.len());
            hidden.push((
                EntityConfig {
                    name: format!("{}.{}", entity.name, child.name),
                    schema: child.schema.clone(),
                    table: child.table.clone(),
                    key: vec!["id".to_string()],
                    fields: child.fields.clone(),
                },
                EntityGovernance {
                    child_of: Some((EntityIndex(i), c)),
                    field_order: child.fields.iter().map(|f| f.name.clone()).collect(),
                    ..EntityGovernance::default()
                },
            ));
        }
        gov.entities.push(g);
    }
    // A reference must name a configured entity keyed by its id, and a
    // field of it that exists.
    for (i, g) in gov.entities.iter().enumerate() {
        let key = join("entities", &entities[i].name);
        for r in &g.refs {
            let fkey = join(&join(&key, "fields"), &r.name);
            check_ref_target(&fkey, r, entities, &gov.entities, errs);
        }
        for c in &g.children {
            let ckey = join(&join(&join(&key, "children"), &c.name), "fields");
            for r in &c.refs {
                check_ref_target(&join(&ckey, &r.name), r, entities, &gov.entities, errs);
            }
        }
        for rule in &g.rules {
            for c in &rule.checks {
                if let Check::Reference { entity, .. } = c {
                    check_referenced(&join(&key, "rules"), entity, entities, errs);
                }
            }
        }
    }
    // External ids come from one more hidden entity over ir_model_data.
    let mut models = Vec::new();
    let mut xid_schema = None;
    for g in &mut gov.entities {
        let child_refs = g.children.iter_mut().flat_map(|c| c.refs.iter_mut());
        for r in g
            .refs
            .iter_mut()
            .chain(child_refs)
            .filter(|r| r.external_id)
        {
            let Some(referenced) = entities.iter().find(|e| e.name == r.entity) else {
                continue;
            };
            if r.model.is_empty() {
                // Odoo names a model's table after the model, dots as underscores.
                r.model = referenced.table.replace('_', ".");
            }
            models.push(r.model.clone());
            xid_schema.get_or_insert_with(|| referenced.schema.clone());
        }
    }
    // What each configured entity's field paths may name, for the targets.
    let known: Vec<Known> = entities
        .iter()
        .zip(&gov.entities)
        .map(|(e, g)| Known::new(e, g))
        .collect();
    for (e, g) in hidden {
        entities.push(e);
        gov.entities.push(g);
    }
    if let Some(schema) = xid_schema {
        models.sort();
        models.dedup();
        let column = |c: &str| FieldConfig {
            name: c.to_string(),
            source: crate::config::FieldSource {
                column: c.to_string(),
                path: Vec::new(),
            },
            fallback: None,
        };
        const XID_FIELDS: [&str; 4] = ["module", "name", "model", "res_id"];
        entities.push(EntityConfig {
            name: "(external ids)".to_string(),
            schema,
            table: EXTERNAL_ID_TABLE.to_string(),
            key: vec!["id".to_string()],
            fields: XID_FIELDS.into_iter().map(column).collect(),
        });
        gov.entities.push(EntityGovernance {
            external_ids_of: models,
            field_order: XID_FIELDS.into_iter().map(str::to_string).collect(),
            ..EntityGovernance::default()
        });
    }

    let target_tables = match doc.get("targets") {
        Some(Value::Table(t)) => t.clone(),
        _ => Table::new(),
    };
    for target in targets {
        let policy = match target_tables.get(&target.name) {
            Some(Value::Table(t)) => check_target(
                &join("targets", &target.name),
                t,
                target,
                &known,
                base_dir,
                errs,
            ),
            _ => TargetPolicy::default(),
        };
        gov.targets.push(policy);
    }
    gov
}

fn check_referenced(key: &str, entity: &str, entities: &[EntityConfig], errs: &mut Errors) {
    match entities.iter().find(|e| e.name == entity) {
        None => errs.add(
            key,
            format!(
                "references entity `{entity}`, which is not configured; add [entities.{entity}] \
                 (it is tracked even if no target receives it)"
            ),
        ),
        Some(e) if e.key.len() != 1 => errs.add(
            key,
            format!("references entity `{entity}`, whose key has several columns; a many2one needs a single-column key"),
        ),
        Some(_) => {}
    }
}

/// A reference field (`fkey` = its key): the referenced entity is keyed by
/// one column, and the field it delivers exists. An unknown entity was
/// reported at `fkey.entity` when the field was read.
fn check_ref_target(
    fkey: &str,
    r: &RefField,
    entities: &[EntityConfig],
    gov: &[EntityGovernance],
    errs: &mut Errors,
) {
    let Some(t) = entities.iter().position(|e| e.name == r.entity) else {
        return;
    };
    check_referenced(&join(fkey, "entity"), &r.entity, entities, errs);
    if r.external_id {
        return;
    }
    // The referenced document is built from its mapped fields only (see
    // `reference::resolve`), else the row's column of that name.
    let referenced = &entities[t];
    let plain = EntityGovernance {
        field_order: gov
            .get(t)
            .map(|g| g.field_order.clone())
            .unwrap_or_default(),
        ..EntityGovernance::default()
    };
    if let Err(m) = Known::new(referenced, &plain).check(&r.key, Use::Unique) {
        errs.add(&join(fkey, "key"), format!("`{}`: {m}", r.key));
    }
}

fn cel(key: &str, text: &str, errs: &mut Errors) -> Option<CelExpr> {
    match CelExpr::compile(text) {
        Ok(e) => Some(e),
        Err(m) => {
            errs.add(key, m);
            None
        }
    }
}

fn check_entity(
    key: &str,
    t: &Table,
    entity: &EntityConfig,
    names: &[String],
    errs: &mut Errors,
) -> EntityGovernance {
    let mut g = EntityGovernance::default();
    // Unknown keys were reported by the core entity check; read without re-reporting.
    let mut scratch = Errors::default();
    let r = Reader::new(key, t, &[], &mut scratch);
    if let Some(text) = r.string("publish_when", errs) {
        g.publish_when = cel(&r.key("publish_when"), text, errs);
    }
    match r.string("on_unpublish", errs) {
        None | Some("delete") => {}
        Some("upsert") => g.on_unpublish = OnUnpublish::Upsert,
        Some(other) => errs.add(
            &r.key("on_unpublish"),
            format!("`{other}` is not valid; use \"delete\" or \"upsert\""),
        ),
    }
    if let Some(Value::Table(fields)) = r.get("fields") {
        for (name, value) in fields {
            g.field_order.push(name.clone());
            let Value::Table(ft) = value else { continue };
            if !ft.contains_key("ref") {
                continue;
            }
            if let Some(rf) = check_ref(&join(&r.key("fields"), name), name, ft, names, errs) {
                g.refs.push(rf);
            }
        }
    }
    match r.get("children") {
        None => {}
        Some(Value::Table(children)) => {
            for (name, value) in children {
                let ckey = join(&r.key("children"), name);
                if let Some(child) = check_child(&ckey, name, value, names, errs) {
                    g.field_order.push(child.name.clone());
                    g.children.push(child);
                }
            }
        }
        Some(other) => errs.add(
            &r.key("children"),
            format!("expected a table, found {}", type_name(other)),
        ),
    }
    // Rules and business keys name fields, which are all known now.
    let known = Known::new(entity, &g);
    if let Some(list) = r.string_list("unique", errs) {
        for f in &list {
            if let Err(m) = known.check(f, Use::Unique) {
                errs.add(&r.key("unique"), format!("`{f}`: {m}"));
            }
        }
        g.unique = list.iter().map(std::string::ToString::to_string).collect();
    }
    match r.get("rules") {
        None => {}
        Some(Value::Array(items)) => {
            for (n, item) in items.iter().enumerate() {
                let rkey = format!("{}[{}]", r.key("rules"), n);
                match item {
                    Value::Table(rt) => {
                        if let Some(rule) = check_rule(&rkey, rt, &known, errs) {
                            if g.rules.iter().any(|x| x.name == rule.name) {
                                errs.add(
                                    &rkey,
                                    format!("rule name `{}` is used twice; rename one", rule.name),
                                );
                            }
                            g.rules.push(rule);
                        }
                    }
                    other => errs.add(
                        &rkey,
                        format!(
                            "expected a table [[{}]], found {}",
                            r.key("rules"),
                            type_name(other)
                        ),
                    ),
                }
            }
        }
        Some(other) => errs.add(
            &r.key("rules"),
            format!(
                "expected an array of tables ([[{}]]), found {}",
                r.key("rules"),
                type_name(other)
            ),
        ),
    }
    g
}

/// A reference field `{ ref = "column", entity = "E", key = "field" }` (or
/// `external_id = true` instead of `key`), of an entity or of a child.
fn check_ref(
    fkey: &str,
    name: &str,
    ft: &Table,
    names: &[String],
    errs: &mut Errors,
) -> Option<RefField> {
    let fr = Reader::new(fkey, ft, REF_KEYS, errs);
    let column = fr.required_string("ref", "the many2one column, e.g. ref = \"uom_id\"", errs);
    let entity = fr.required_string(
        "entity",
        "the referenced entity, e.g. entity = \"uom\"",
        errs,
    );
    let external_id = fr.bool("external_id", false, errs).unwrap_or(false);
    let model = fr.string("model", errs);
    let rkey = if external_id {
        if fr.get("key").is_some() {
            errs.add(
                &fr.key("key"),
                "cannot be combined with external_id = true; keep one of them",
            );
        }
        Some("")
    } else {
        if model.is_some() {
            errs.add(
                &fr.key("model"),
                "only applies with external_id = true; remove it or set external_id = true",
            );
        }
        fr.required_string(
            "key",
            "the referenced entity's business-key field to deliver, e.g. key = \"name\", \
             or external_id = true for its Odoo external id",
            errs,
        )
    };
    if let Some(m) = model {
        if m.is_empty()
            || !m
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '_')
        {
            errs.add(
                &fr.key("model"),
                format!("`{m}` is not an Odoo model name; expected e.g. model = \"uom.uom\""),
            );
        }
    }
    if let Some(c) = column {
        if let Err(m) = check_sql_ident(c) {
            errs.add(&fr.key("ref"), format!("column name {m}"));
        }
    }
    if let Some(e) = entity {
        if !names.iter().any(|n| n == e) {
            errs.add(
                &fr.key("entity"),
                format!(
                    "unknown entity `{e}`; configured entities: {}",
                    names.join(", ")
                ),
            );
        }
    }
    let (column, entity, k) = (column?, entity?, rkey?);
    Some(RefField {
        name: name.to_string(),
        column: column.to_string(),
        entity: entity.to_string(),
        key: k.to_string(),
        external_id,
        model: model.unwrap_or_default().to_string(),
    })
}

/// One `children.NAME = { table, parent, fields }` entry.
fn check_child(
    ckey: &str,
    name: &str,
    value: &Value,
    names: &[String],
    errs: &mut Errors,
) -> Option<ChildConfig> {
    let Value::Table(ct) = value else {
        errs.add(
            ckey,
            format!(
                "expected a table {{ table = ..., parent = ..., fields = {{...}} }}, found {}",
                type_name(value)
            ),
        );
        return None;
    };
    let cr = Reader::new(ckey, ct, CHILD_KEYS, errs);
    let table = cr.required_string(
        "table",
        "the child table, e.g. table = \"mrp_bom_line\"",
        errs,
    );
    let parent = cr.required_string(
        "parent",
        "the child's column holding the parent id, e.g. parent = \"bom_id\"",
        errs,
    );
    let fields = match cr.table("fields", errs) {
        Some(ft) => child_fields(&cr.key("fields"), ft, names, errs),
        None => {
            if !cr.has("fields") {
                errs.add(&cr.key("fields"), "missing; map the child's fields, e.g. fields = { product = \"product_id\", qty = \"product_qty\" }");
            }
            None
        }
    };
    let (table, parent, (fields, refs, field_order)) = (table?, parent?, fields?);
    let (schema, table) = match table.split_once('.') {
        Some((s, t)) => (s, t),
        None => ("public", table),
    };
    let mut ok = true;
    for ident in [schema, table, parent] {
        if let Err(m) = check_sql_ident(ident) {
            errs.add(ckey, format!("name {m}"));
            ok = false;
        }
    }
    ok.then(|| ChildConfig {
        name: name.to_string(),
        schema: schema.to_string(),
        table: table.to_string(),
        parent: parent.to_string(),
        fields,
        refs,
        field_order,
        entity: EntityIndex(0),
    })
}

/// A child's `fields`: plain column mappings and reference fields, and the
/// order they are written in.
type ChildFields = (Vec<FieldConfig>, Vec<RefField>, Vec<String>);

fn child_fields(key: &str, t: &Table, names: &[String], errs: &mut Errors) -> Option<ChildFields> {
    let mut fields = Vec::new();
    let mut refs = Vec::new();
    let mut order = Vec::new();
    let mut ok = true;
    for (name, value) in t {
        let fkey = join(key, name);
        order.push(name.clone());
        match value {
            Value::String(s) => match field_source(&fkey, s, errs) {
                Some(source) => fields.push(FieldConfig {
                    name: name.clone(),
                    source,
                    fallback: None,
                }),
                None => ok = false,
            },
            Value::Table(ft) if ft.contains_key("ref") => {
                match check_ref(&fkey, name, ft, names, errs) {
                    Some(r) => refs.push(r),
                    None => ok = false,
                }
            }
            other => {
                errs.add(
                    &fkey,
                    format!(
                        "expected a column name string, or a reference {{ ref = \"column\", \
                         entity = \"E\", key = \"field\" }}, found {}",
                        type_name(other)
                    ),
                );
                ok = false;
            }
        }
    }
    ok.then_some((fields, refs, order))
}

fn check_rule(key: &str, t: &Table, known: &Known, errs: &mut Errors) -> Option<Rule> {
    let r = Reader::new(key, t, RULE_KEYS, errs);
    let name = r.required_string(
        "name",
        "a name for the rule, e.g. name = \"sku_format\"",
        errs,
    );
    let message = r.string("message", errs).map(str::to_string);
    let mut checks = Vec::new();
    if let Some(list) = r.string_list("required", errs) {
        for f in &list {
            if let Err(m) = known.check(f, Use::Rule) {
                errs.add(&r.key("required"), format!("`{f}`: {m}"));
            }
        }
        checks.push(Check::Required(
            list.iter().map(std::string::ToString::to_string).collect(),
        ));
    }
    let sub = |k: &str, errs: &mut Errors| -> Option<(String, &Table)> {
        let t = r.table(k, errs)?;
        match t.get("field") {
            Some(Value::String(f)) => {
                let usage = if k == "reference" {
                    Use::Reference
                } else {
                    Use::Rule
                };
                if let Err(m) = known.check(f, usage) {
                    errs.add(&join(&r.key(k), "field"), format!("`{f}`: {m}"));
                }
                Some((f.clone(), t))
            }
            _ => {
                errs.add(&r.key(k), "needs field = \"name\"");
                None
            }
        }
    };
    if let Some((field, t)) = sub("regex", errs) {
        match t.get("pattern") {
            Some(Value::String(p)) => match regex::Regex::new(p) {
                Ok(regex) => checks.push(Check::Regex { field, regex }),
                Err(e) => errs.add(
                    &r.key("regex"),
                    format!(
                        "pattern is not a valid regular expression: {}",
                        e.to_string().replace('\n', " ")
                    ),
                ),
            },
            _ => errs.add(&r.key("regex"), "needs pattern = \"^...$\""),
        }
    }
    if let Some((field, t)) = sub("allowed", errs) {
        match t.get("values") {
            Some(Value::Array(vals)) => checks.push(Check::Allowed {
                field,
                values: vals
                    .iter()
                    .filter_map(|v| serde_json::to_value(v).ok())
                    .collect(),
            }),
            _ => errs.add(&r.key("allowed"), "needs values = [...]"),
        }
    }
    if let Some((field, t)) = sub("range", errs) {
        let num = |k: &str, errs: &mut Errors| match t.get(k) {
            None => None,
            Some(Value::Integer(i)) => Some(*i as f64),
            Some(Value::Float(f)) => Some(*f),
            Some(other) => {
                errs.add(
                    &r.key("range"),
                    format!("{k} must be a number, found {}", type_name(other)),
                );
                None
            }
        };
        let (min, max) = (num("min", errs), num("max", errs));
        if min.is_none() && max.is_none() {
            errs.add(&r.key("range"), "needs min and/or max");
        } else {
            checks.push(Check::Range { field, min, max });
        }
    }
    if let Some(text) = r.string("cel", errs) {
        if let Some(e) = cel(&r.key("cel"), text, errs) {
            checks.push(Check::Cel(e));
        }
    }
    if let Some((field, t)) = sub("reference", errs) {
        match t.get("entity") {
            Some(Value::String(e)) => checks.push(Check::Reference {
                field,
                entity: e.clone(),
            }),
            _ => errs.add(&r.key("reference"), "needs entity = \"name\""),
        }
    }
    if checks.is_empty() {
        errs.add(
            key,
            "has no check; add one of required, regex, allowed, range, cel or reference",
        );
        return None;
    }
    Some(Rule {
        name: name?.to_string(),
        checks,
        message,
    })
}

fn check_target(
    key: &str,
    t: &Table,
    target: &TargetConfig,
    known: &[Known],
    base_dir: &Path,
    errs: &mut Errors,
) -> TargetPolicy {
    let mut scratch = Errors::default();
    let r = Reader::new(key, t, &[], &mut scratch);
    let mut p = TargetPolicy::default();
    if let Some(text) = r.string("route", errs) {
        p.route = cel(&r.key("route"), text, errs);
    }
    let received = |e: &str| -> Option<&Known> {
        if target.entities.iter().any(|n| n == e) {
            known.iter().find(|k| k.entity() == e)
        } else {
            None
        }
    };
    let not_received = |e: &str| {
        format!(
            "entity `{e}` is not one this target receives ({})",
            target.entities.join(", ")
        )
    };
    // "entity.field" or "entity.child.field", naming a field that exists.
    let entity_field = |k: &str, spec: &str, errs: &mut Errors| -> Option<(String, String)> {
        let Some((e, f)) = spec.split_once('.') else {
            errs.add(
                k,
                format!(
                    "`{spec}` must be written \"entity.field\" (or \"entity.child.field\"), \
                     e.g. \"bank.acc_number\""
                ),
            );
            return None;
        };
        let Some(fields) = received(e) else {
            errs.add(k, format!("`{spec}`: {}", not_received(e)));
            return None;
        };
        if let Err(m) = fields.check(f, Use::Policy) {
            errs.add(k, format!("`{spec}`: {m}"));
            return None;
        }
        Some((e.to_string(), f.to_string()))
    };
    if let Some(fields) = r.table("fields", errs) {
        for (entity, value) in fields {
            let fkey = join(&r.key("fields"), entity);
            let Some(known) = received(entity) else {
                errs.add(&fkey, not_received(entity));
                continue;
            };
            match value {
                Value::Array(items) => {
                    let list: Vec<String> = items
                        .iter()
                        .filter_map(|v| v.as_str().map(str::to_string))
                        .collect();
                    if list.len() != items.len() {
                        errs.add(&fkey, "every item must be a field name string");
                        continue;
                    }
                    for f in &list {
                        if let Err(m) = known.check(f, Use::Policy) {
                            errs.add(&fkey, format!("`{f}`: {m}"));
                        }
                    }
                    p.allow.push((entity.clone(), list));
                }
                other => errs.add(
                    &fkey,
                    format!(
                        "expected an array of field names, found {}",
                        type_name(other)
                    ),
                ),
            }
        }
    }
    if let Some(mask) = r.table("mask", errs) {
        for (spec, value) in mask {
            let mkey = join(&r.key("mask"), spec);
            let method = match value.as_str() {
                Some("last4") => Mask::Last4,
                Some("full") => Mask::Full,
                _ => {
                    errs.add(&mkey, "expected \"last4\" or \"full\"");
                    continue;
                }
            };
            if let Some((e, f)) = entity_field(&mkey, spec, errs) {
                p.mask.push((e, f, method));
            }
        }
    }
    if let Some(list) = r.string_list("hash", errs) {
        for spec in list {
            if let Some(ef) = entity_field(&r.key("hash"), spec, errs) {
                p.hash.push(ef);
            }
        }
        // Fails closed: no target starts whose hashed fields it could not hash.
        match r.string("hash_key_file", errs) {
            Some(f) => p.hash_key = secret_from_file(&r.key("hash_key_file"), base_dir, f, errs),
            None => errs.add(
                &r.key("hash_key_file"),
                "missing; hashed fields need a per-target key: hash_key_file = \"/run/credentials/steward.service/wms-hash-key\"",
            ),
        }
    } else if r.has("hash_key_file") {
        errs.add(
            &r.key("hash_key_file"),
            "is set but hash lists no field; add hash = [\"entity.field\"] or remove it",
        );
    }
    p
}

#[cfg(test)]
mod tests {
    use crate::config::governance::Check;
    use crate::config::{Config, EntityIndex};
    use std::path::Path;

    const BASE: &str = r#"
[source]
url = "postgres://steward@localhost/odoo"
[state]
path = "/tmp/x.redb"
[entities.uom]
table = "uom_uom"
fields = { name = "name.en_US" }
"#;

    fn errors(extra: &str) -> Vec<String> {
        let text = format!("{BASE}{extra}");
        match Config::parse(&text, Path::new("t.toml"), Path::new("/tmp")) {
            Ok(_) => Vec::new(),
            Err(e) => e
                .errors
                .iter()
                .map(std::string::ToString::to_string)
                .collect(),
        }
    }

    #[test]
    fn cel_errors_name_the_key_and_everything_is_reported_at_once() {
        let errs = errors(
            r#"
[entities.product]
table = "product_template"
fields = { sku = "default_code", uom = { ref = "uom_id", entity = "unit", key = "name" } }
publish_when = "row.active &&"
on_unpublish = "archive"
[[entities.product.rules]]
name = "r"
regex = { field = "sku", pattern = "(" }
[targets.wms]
type = "http"
url = "http://localhost/x"
entities = ["product"]
route = "row.company_id =="
mask = { "bank.acc" = "last4" }
"#,
        );
        let all = errs.join("\n");
        for needle in [
            "entities.product.publish_when: is not a valid CEL expression",
            "entities.product.on_unpublish: `archive` is not valid",
            "entities.product.rules[0].regex: pattern is not a valid regular expression",
            "entities.product.fields.uom.entity: unknown entity `unit`",
            "targets.wms.route: is not a valid CEL expression",
            "targets.wms.mask.\"bank.acc\"",
        ] {
            assert!(all.contains(needle), "missing `{needle}` in:\n{all}");
        }
    }

    #[test]
    fn external_id_references_add_one_hidden_ir_model_data_entity() {
        let text = format!(
            "{BASE}{}",
            r#"
[entities.product]
table = "product_template"
fields = { uom = { ref = "uom_id", entity = "uom", external_id = true }, categ = { ref = "categ_id", entity = "categ", external_id = true, model = "product.category" } }
[entities.categ]
table = "product_category"
fields = { name = "name" }
[targets.wms]
type = "http"
url = "http://localhost/x"
entities = ["product"]
"#
        );
        let c = Config::parse(&text, Path::new("t.toml"), Path::new("/tmp")).unwrap();
        let xid = c.entities.last().unwrap();
        assert_eq!(xid.table, "ir_model_data");
        assert_eq!(xid.key, ["id"]);
        let g = c.governance.entities.last().unwrap();
        assert_eq!(g.external_ids_of, ["product.category", "uom.uom"]);
        let refs = &c.governance.entities[1].refs;
        assert!(refs.iter().all(|r| r.external_id));
        assert_eq!(refs[0].model, "uom.uom", "derived from the table name");

        let all = errors(
            r#"
[entities.product]
table = "product_template"
fields = { a = { ref = "uom_id", entity = "uom", external_id = true, key = "name" }, b = { ref = "uom_id", entity = "uom", key = "name", model = "uom.uom" }, c = { ref = "uom_id", entity = "uom", external_id = true, model = "uom uom'" }, d = { ref = "uom_id", entity = "uom" } }
[targets.wms]
type = "http"
url = "http://localhost/x"
entities = ["product"]
"#,
        )
        .join("\n");
        for needle in [
            "entities.product.fields.a.key: cannot be combined with external_id = true",
            "entities.product.fields.b.model: only applies with external_id = true",
            "entities.product.fields.c.model: `uom uom'` is not an Odoo model name",
            "entities.product.fields.d.key: missing",
        ] {
            assert!(all.contains(needle), "missing `{needle}` in:\n{all}");
        }
    }

    #[test]
    fn a_valid_governed_entity_loads() {
        let text = format!(
            "{BASE}{}",
            r#"
[entities.product]
table = "product_template"
fields = { sku = "default_code", uom = { ref = "uom_id", entity = "uom", key = "name" } }
publish_when = "row.active"
unique = ["default_code"]
children = { lines = { table = "mrp_bom_line", parent = "bom_id", fields = { qty = "product_qty" } } }
[targets.wms]
type = "http"
url = "http://localhost/x"
entities = ["product"]
fields = { product = ["sku"] }
"#
        );
        let c = Config::parse(&text, Path::new("t.toml"), Path::new("/tmp")).unwrap();
        // The child table is mapped by a hidden entity no target can name.
        assert_eq!(c.entities.len(), 3);
        assert_eq!(c.entities[2].name, "product.lines");
        let g = &c.governance.entities[1];
        assert_eq!(g.refs[0].column, "uom_id");
        assert_eq!(g.children[0].entity, EntityIndex(2));
        assert_eq!(c.governance.entities[2].child_of, Some((EntityIndex(1), 0)));
        assert_eq!(
            c.entities[1].fields.len(),
            1,
            "the ref field is not a column mapping"
        );
        assert_eq!(c.governance.audit_retention_days, 90);
    }

    /// A partner with bank accounts as children, a product and a BOM whose
    /// lines reference products.
    const OBJECTS: &str = r#"
[entities.product]
table = "product_template"
fields = { sku = "default_code", name = "name", uom = { ref = "uom_id", entity = "uom", key = "name" } }
[entities.partner]
table = "res_partner"
fields = { name = "name", ref = "ref" }
children = { banks = { table = "res_partner_bank", parent = "partner_id", fields = { acc_number = "acc_number", holder = "acc_holder_name" } } }
[entities.bom]
table = "mrp_bom"
fields = { code = "code" }
children = { lines = { table = "mrp_bom_line", parent = "bom_id", fields = { qty = "product_qty", product = { ref = "product_id", entity = "product", key = "sku" } } } }
"#;

    fn target(entities: &str, policy: &str) -> String {
        format!(
            "[targets.finance]\ntype = \"http\"\nurl = \"http://localhost/x\"\nentities = [{entities}]\n{policy}\n"
        )
    }

    fn assert_has(all: &[String], needles: &[&str]) {
        let joined = all.join("\n");
        for needle in needles {
            assert!(joined.contains(needle), "missing `{needle}` in:\n{joined}");
        }
    }

    #[test]
    fn rule_and_unique_fields_must_exist_columns_included() {
        // Document fields, reference fields, key columns and mapped columns are fine.
        let good = errors(&format!(
            "{OBJECTS}{}{}",
            r#"
unique = ["code"]
[[entities.bom.rules]]
name = "ok"
required = ["code", "id", "lines", "lines.qty", "lines.product", "lines.id"]
range = { field = "lines.qty", min = 0 }
[[entities.product.rules]]
name = "ok"
required = ["sku", "uom", "default_code", "uom_id"]
reference = { field = "uom_id", entity = "uom" }
"#,
            target("\"product\"", "")
        ));
        assert!(good.is_empty(), "{good:?}");

        let all = errors(&format!(
            "{OBJECTS}{}{}",
            r#"
unique = ["cod", "lines.qty"]
[[entities.bom.rules]]
name = "bad"
required = ["code", "nope", "lines.product_qty"]
regex = { field = "line.qty", pattern = "^[0-9]+$" }
allowed = { field = "colour", values = ["red"] }
range = { field = "amount", min = 0 }
reference = { field = "product_tmpl_id", entity = "product" }
"#,
            target("\"product\"", "")
        ));
        assert_has(
            &all,
            &[
                "entities.bom.unique: `cod`: entity bom has no field, child or column `cod` (fields: code; children: lines; columns: id, code)",
                "entities.bom.unique: `lines.qty`: a child path; a business key is one value per record",
                "entities.bom.rules[0].required: `nope`: entity bom has no field",
                // The document's items hold fields, not columns.
                "entities.bom.rules[0].required: `lines.product_qty`: child `lines` of entity bom has no field `product_qty` (fields: qty, product, id)",
                "entities.bom.rules[0].regex.field: `line.qty`: entity bom has no field or child `line`",
                "entities.bom.rules[0].allowed.field: `colour`: entity bom has no field",
                "entities.bom.rules[0].range.field: `amount`: entity bom has no field",
                "entities.bom.rules[0].reference.field: `product_tmpl_id`: entity bom has no field",
            ],
        );
        assert!(!all.join("\n").contains("`code`"), "{all:?}");
    }

    #[test]
    fn reference_rules_reach_into_children() {
        let text = format!(
            "{BASE}{OBJECTS}{}{}",
            r#"
[[entities.bom.rules]]
name = "lines_known"
reference = { field = "lines.product_id", entity = "product" }
[[entities.bom.rules]]
name = "lines_known_by_field"
reference = { field = "lines.product", entity = "product" }
"#,
            target("\"bom\"", "")
        );
        let c = Config::parse(&text, Path::new("t.toml"), Path::new("/tmp")).unwrap();
        let bom = c.entity_index("bom").unwrap();
        let rule = &c.governance.entities[bom].rules[0];
        assert!(matches!(
            &rule.checks[0],
            Check::Reference { field, entity } if field == "lines.product_id" && entity == "product"
        ));

        let all = errors(&format!(
            "{OBJECTS}{}{}",
            r#"
[[entities.bom.rules]]
name = "a"
reference = { field = "lines.product_tmpl_id", entity = "product" }
[[entities.bom.rules]]
name = "b"
reference = { field = "line.product_id", entity = "product" }
[[entities.bom.rules]]
name = "c"
reference = { field = "lines", entity = "product" }
[[entities.bom.rules]]
name = "d"
reference = { field = "lines.product_id", entity = "article" }
"#,
            target("\"bom\"", "")
        ));
        assert_has(
            &all,
            &[
                "entities.bom.rules[0].reference.field: `lines.product_tmpl_id`: child `lines` of entity bom has no field `product_tmpl_id` (fields: qty, product, id; columns: product_qty, product_id)",
                "entities.bom.rules[1].reference.field: `line.product_id`: entity bom has no field or child `line` (fields: code; children: lines)",
                "entities.bom.rules[2].reference.field: `lines`: a children array of entity bom; name a field of its items, e.g. \"lines.qty\"",
                "entities.bom.rules: references entity `article`, which is not configured",
            ],
        );
    }

    #[test]
    fn target_policies_name_existing_fields_and_child_paths() {
        let text = format!(
            "{BASE}{OBJECTS}{}",
            target(
                "\"partner\", \"bom\"",
                r#"fields = { partner = ["name", "banks.acc_number", "banks.id"], bom = ["code", "lines"] }
mask = { "partner.banks.acc_number" = "last4", "partner.name" = "full" }
hash = ["partner.banks.holder", "bom.lines.product"]
hash_key_file = "/dev/null""#
            )
        );
        // /dev/null is empty, which is its own error; everything else is valid.
        let errs = match Config::parse(&text, Path::new("t.toml"), Path::new("/tmp")) {
            Ok(_) => Vec::new(),
            Err(e) => e
                .errors
                .iter()
                .map(std::string::ToString::to_string)
                .collect(),
        };
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(
            errs[0].starts_with("targets.finance.hash_key_file: "),
            "{errs:?}"
        );

        let all = errors(&format!(
            "{OBJECTS}{}",
            target(
                "\"partner\", \"product\"",
                r#"fields = { partner = ["name", "email", "banks.iban"], bom = ["code"], product = ["default_code"] }
mask = { "partner.bank.acc_number" = "last4", "partner.name.first" = "full", "bom.code" = "full", "stock.x" = "full", "partner.banks" = "full" }
hash = ["partner.vat", "partner.banks.acc_number.x", "partner"]
hash_key_file = "/dev/null""#
            )
        ));
        assert_has(
            &all,
            &[
                "targets.finance.fields.partner: `email`: entity partner has no field or child `email` (fields: name, ref; children: banks)",
                "targets.finance.fields.partner: `banks.iban`: child `banks` of entity partner has no field `iban` (fields: acc_number, holder, id)",
                "targets.finance.fields.bom: entity `bom` is not one this target receives (partner, product)",
                // Columns are not in the document a target receives.
                "targets.finance.fields.product: `default_code`: entity product has no field or child `default_code`",
                "targets.finance.mask.\"partner.bank.acc_number\": `partner.bank.acc_number`: entity partner has no field or child `bank` (fields: name, ref; children: banks)",
                "targets.finance.mask.\"partner.name.first\": `partner.name.first`: `name` is a field of entity partner, not a children array",
                "targets.finance.mask.\"bom.code\": `bom.code`: entity `bom` is not one this target receives",
                "targets.finance.mask.\"stock.x\": `stock.x`: entity `stock` is not one this target receives",
                "targets.finance.hash: `partner.vat`: entity partner has no field or child `vat`",
                "targets.finance.hash: `partner.banks.acc_number.x`: child `banks` of entity partner has no field `acc_number.x`",
                "targets.finance.hash: `partner` must be written \"entity.field\"",
            ],
        );
        // A whole children array may be masked or hashed like any field.
        assert!(!all.join("\n").contains("\"partner.banks\""), "{all:?}");
    }

    #[test]
    fn hashed_fields_need_a_readable_key_file() {
        let all = errors(&target("\"uom\"", "hash = [\"uom.name\"]"));
        assert_has(
            &all,
            &["targets.finance.hash_key_file: missing; hashed fields need a per-target key"],
        );
        let all = errors(&target(
            "\"uom\"",
            "hash = [\"uom.name\"]\nhash_key_file = \"/nonexistent/steward-hash-key\"",
        ));
        assert_has(
            &all,
            &["targets.finance.hash_key_file: cannot read `/nonexistent/steward-hash-key`"],
        );
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("key");
        std::fs::write(&file, "s3cret\n").unwrap();
        let text = format!(
            "{BASE}{}",
            target(
                "\"uom\"",
                &format!(
                    "hash = [\"uom.name\"]\nhash_key_file = {:?}",
                    file.display().to_string()
                )
            )
        );
        let c = Config::parse(&text, Path::new("t.toml"), Path::new("/tmp")).unwrap();
        assert_eq!(
            c.governance.targets[0].hash_key.as_ref().unwrap().expose(),
            "s3cret"
        );
        assert_eq!(
            c.governance.targets[0].hash,
            [("uom".to_string(), "name".to_string())]
        );
    }

    #[test]
    fn reference_keys_must_be_fields_of_the_referenced_entity() {
        let all = errors(&format!(
            "{}{}",
            r#"
[entities.product]
table = "product_template"
fields = { sku = "default_code", uom = { ref = "uom_id", entity = "uom", key = "nme" }, unit = { ref = "uom_id", entity = "unit", key = "name" } }
[entities.bom]
table = "mrp_bom"
fields = { code = "code" }
children = { lines = { table = "mrp_bom_line", parent = "bom_id", fields = { product = { ref = "product_id", entity = "product", key = "uom" } } } }
"#,
            target("\"product\"", "")
        ));
        assert_has(
            &all,
            &[
                "entities.product.fields.uom.key: `nme`: entity uom has no field, child or column `nme` (fields: name; children: none; columns: id, name)",
                "entities.product.fields.unit.entity: unknown entity `unit`",
                // A reference field is not part of the referenced document the key is read from.
                "entities.bom.children.lines.fields.product.key: `uom`: entity product has no field, child or column `uom`",
            ],
        );
        assert!(
            !all.join("\n").contains("entities.product.fields.unit.key"),
            "an unknown entity is reported once: {all:?}"
        );
    }

    #[test]
    fn field_order_is_the_written_order_references_included_children_last() {
        let text = format!(
            "{BASE}{}{}",
            r#"
[entities.product]
table = "product_template"
fields = { sku = "default_code", uom = { ref = "uom_id", entity = "uom", key = "name" }, name = "name", price = "list_price" }
[entities.bom]
table = "mrp_bom"
children = { lines = { table = "mrp_bom_line", parent = "bom_id", fields = { qty = "product_qty", product = { ref = "product_id", entity = "product", key = "sku" }, uom = "product_uom_id" } }, byproducts = { table = "mrp_bom_byproduct", parent = "bom_id", fields = { qty = "product_qty" } } }
fields = { zcode = "code", active = "active" }
"#,
            target("\"product\", \"bom\"", "")
        );
        let c = Config::parse(&text, Path::new("t.toml"), Path::new("/tmp")).unwrap();
        let gov = |name: &str| {
            let i = c.entity_index(name).unwrap();
            &c.governance.entities[i]
        };
        assert_eq!(gov("uom").field_order, ["name"]);
        assert_eq!(gov("product").field_order, ["sku", "uom", "name", "price"]);
        let bom = gov("bom");
        assert_eq!(bom.field_order, ["zcode", "active", "lines", "byproducts"]);
        assert_eq!(bom.children[0].field_order, ["qty", "product", "uom"]);
        assert_eq!(bom.children[1].field_order, ["qty"]);
        assert_eq!(
            gov("bom.lines").field_order,
            ["qty", "uom"],
            "the hidden entity maps the plain fields"
        );
    }

    #[test]
    fn child_reference_fields_are_checked_and_kept_apart_from_plain_fields() {
        let text = format!(
            "{BASE}{OBJECTS}{}{}",
            r#"
[entities.categ]
table = "product_category"
fields = { name = "name" }
[entities.route]
table = "stock_route"
fields = { name = "name" }
children = { rules = { table = "stock_rule", parent = "route_id", fields = { categ = { ref = "categ_id", entity = "categ", external_id = true }, name = "name" } } }
"#,
            target("\"bom\", \"route\"", "")
        );
        let c = Config::parse(&text, Path::new("t.toml"), Path::new("/tmp")).unwrap();
        let bom = c.entity_index("bom").unwrap();
        let lines = &c.governance.entities[bom].children[0];
        assert_eq!(lines.fields.len(), 1);
        assert_eq!(lines.fields[0].name, "qty");
        assert_eq!(lines.refs.len(), 1);
        let r = &lines.refs[0];
        assert_eq!(
            (
                r.name.as_str(),
                r.column.as_str(),
                r.entity.as_str(),
                r.key.as_str()
            ),
            ("product", "product_id", "product", "sku")
        );
        assert!(!r.external_id);
        // The hidden entity over mrp_bom_line maps the plain fields; the
        // reference column reaches the governance in the captured row, as an
        // entity's reference columns do (hidden entities are governed).
        let hidden = &c.entities[lines.entity];
        assert_eq!(hidden.name, "bom.lines");
        assert_eq!(hidden.fields.len(), 1);
        assert!(c.governance.entities[lines.entity].is_governed());
        assert!(c.governance.entities[lines.entity].is_hidden());
        // An external-id reference of a child joins ir_model_data with its model.
        let route = c.entity_index("route").unwrap();
        let categ = &c.governance.entities[route].children[0].refs[0];
        assert!(categ.external_id);
        assert_eq!(categ.model, "product.category");
        let xid = c.governance.entities.last().unwrap();
        assert_eq!(xid.external_ids_of, ["product.category"]);

        let all = errors(&format!(
            "{}{}",
            r#"
[entities.product]
table = "product_template"
fields = { sku = "default_code" }
[entities.bom]
table = "mrp_bom"
fields = { code = "code" }
children = { lines = { table = "mrp_bom_line", parent = "bom_id", fields = { a = { ref = "product_id", entity = "article", key = "sku" }, b = { ref = "product_id", entity = "product" }, c = { ref = "Product", entity = "product", key = "sku", colour = 1 }, d = { path = "x" }, e = { ref = "product_id", entity = "uom", external_id = true, key = "name" } } } }
"#,
            target("\"bom\"", "")
        ));
        assert_has(
            &all,
            &[
                "entities.bom.children.lines.fields.a.entity: unknown entity `article`",
                "entities.bom.children.lines.fields.b.key: missing",
                "entities.bom.children.lines.fields.c.ref: column name",
                "entities.bom.children.lines.fields.c.colour: unknown key",
                "entities.bom.children.lines.fields.d: expected a column name string, or a reference",
                "entities.bom.children.lines.fields.e.key: cannot be combined with external_id = true",
            ],
        );
    }
}
