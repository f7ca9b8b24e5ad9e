//! Checking the governance keys of `[entities.*]`, `[targets.*]` and
//! `[state]` into [`GovernanceConfig`]. Runs after the core sections were
//! checked (their unknown-key lists include these keys), and reports every
//! problem with its dotted key, like the rest of the configuration.

use std::path::Path;

use toml::{Table, Value};

use super::reader::{check_sql_ident, join, type_name, Errors, Reader};
use super::{field_source, secret_from_file};
use crate::config::governance::{
    Check, ChildConfig, EntityGovernance, GovernanceConfig, Mask, OnUnpublish, RefField, Rule,
    TargetPolicy,
};
use crate::config::{EntityConfig, FieldConfig, TargetConfig};
use crate::pipeline::cel::CelExpr;

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
                gov.audit_retention_days = *d as u32
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
            gov.entities.push(EntityGovernance::default());
            continue;
        };
        let key = join("entities", &entity.name);
        let mut g = check_entity(&key, t, &names, errs);
        // Children become hidden entities mapped like any other table.
        for (c, child) in g.children.iter_mut().enumerate() {
            child.entity = entities.len() + hidden.len();
            hidden.push((
                EntityConfig {
                    name: format!("{}.{}", entity.name, child.name),
                    schema: child.schema.clone(),
                    table: child.table.clone(),
                    key: vec!["id".to_string()],
                    fields: child.fields.clone(),
                },
                EntityGovernance {
                    child_of: Some((i, c)),
                    ..EntityGovernance::default()
                },
            ));
        }
        gov.entities.push(g);
    }
    // A reference must name a configured entity keyed by its id.
    for (i, g) in gov.entities.iter().enumerate() {
        let key = join("entities", &entities[i].name);
        for r in &g.refs {
            check_referenced(&join(&key, "fields"), &r.entity, entities, errs);
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
        for r in g.refs.iter_mut().filter(|r| r.external_id) {
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
        entities.push(EntityConfig {
            name: "(external ids)".to_string(),
            schema,
            table: EXTERNAL_ID_TABLE.to_string(),
            key: vec!["id".to_string()],
            fields: ["module", "name", "model", "res_id"]
                .into_iter()
                .map(column)
                .collect(),
        });
        gov.entities.push(EntityGovernance {
            external_ids_of: models,
            ..EntityGovernance::default()
        });
    }

    let target_tables = match doc.get("targets") {
        Some(Value::Table(t)) => t.clone(),
        _ => Table::new(),
    };
    for target in targets {
        let policy = match target_tables.get(&target.name) {
            Some(Value::Table(t)) => {
                check_target(&join("targets", &target.name), t, target, base_dir, errs)
            }
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

fn cel(key: &str, text: &str, errs: &mut Errors) -> Option<CelExpr> {
    match CelExpr::compile(text) {
        Ok(e) => Some(e),
        Err(m) => {
            errs.add(key, m);
            None
        }
    }
}

fn check_entity(key: &str, t: &Table, names: &[String], errs: &mut Errors) -> EntityGovernance {
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
    if let Some(list) = r.string_list("unique", errs) {
        g.unique = list.iter().map(|s| s.to_string()).collect();
    }
    match r.get("rules") {
        None => {}
        Some(Value::Array(items)) => {
            for (n, item) in items.iter().enumerate() {
                let rkey = format!("{}[{}]", r.key("rules"), n);
                match item {
                    Value::Table(rt) => {
                        if let Some(rule) = check_rule(&rkey, rt, errs) {
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
    if let Some(Value::Table(fields)) = r.get("fields") {
        for (name, value) in fields {
            let Value::Table(ft) = value else { continue };
            if !ft.contains_key("ref") {
                continue;
            }
            let fkey = join(&r.key("fields"), name);
            let fr = Reader::new(&fkey, ft, REF_KEYS, errs);
            let column =
                fr.required_string("ref", "the many2one column, e.g. ref = \"uom_id\"", errs);
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
                        format!(
                            "`{m}` is not an Odoo model name; expected e.g. model = \"uom.uom\""
                        ),
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
            if let (Some(column), Some(entity), Some(k)) = (column, entity, rkey) {
                g.refs.push(RefField {
                    name: name.clone(),
                    column: column.to_string(),
                    entity: entity.to_string(),
                    key: k.to_string(),
                    external_id,
                    model: model.unwrap_or_default().to_string(),
                });
            }
        }
    }
    match r.get("children") {
        None => {}
        Some(Value::Table(children)) => {
            for (name, value) in children {
                let ckey = join(&r.key("children"), name);
                let Value::Table(ct) = value else {
                    errs.add(&ckey, format!("expected a table {{ table = ..., parent = ..., fields = {{...}} }}, found {}", type_name(value)));
                    continue;
                };
                let cr = Reader::new(&ckey, ct, CHILD_KEYS, errs);
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
                    Some(ft) => child_fields(&cr.key("fields"), ft, errs),
                    None => {
                        if !cr.has("fields") {
                            errs.add(&cr.key("fields"), "missing; map the child's fields, e.g. fields = { product = \"product_id\", qty = \"product_qty\" }");
                        }
                        None
                    }
                };
                let (Some(table), Some(parent), Some(fields)) = (table, parent, fields) else {
                    continue;
                };
                let (schema, table) = match table.split_once('.') {
                    Some((s, t)) => (s, t),
                    None => ("public", table),
                };
                let mut ok = true;
                for ident in [schema, table, parent] {
                    if let Err(m) = check_sql_ident(ident) {
                        errs.add(&ckey, format!("name {m}"));
                        ok = false;
                    }
                }
                if ok {
                    g.children.push(ChildConfig {
                        name: name.clone(),
                        schema: schema.to_string(),
                        table: table.to_string(),
                        parent: parent.to_string(),
                        fields,
                        entity: 0,
                    });
                }
            }
        }
        Some(other) => errs.add(
            &r.key("children"),
            format!("expected a table, found {}", type_name(other)),
        ),
    }
    g
}

fn child_fields(key: &str, t: &Table, errs: &mut Errors) -> Option<Vec<FieldConfig>> {
    let mut out = Vec::new();
    for (name, value) in t {
        let fkey = join(key, name);
        let Value::String(s) = value else {
            errs.add(
                &fkey,
                format!("expected a column name string, found {}", type_name(value)),
            );
            return None;
        };
        out.push(FieldConfig {
            name: name.clone(),
            source: field_source(&fkey, s, errs)?,
            fallback: None,
        });
    }
    Some(out)
}

fn check_rule(key: &str, t: &Table, errs: &mut Errors) -> Option<Rule> {
    let r = Reader::new(key, t, RULE_KEYS, errs);
    let name = r.required_string(
        "name",
        "a name for the rule, e.g. name = \"sku_format\"",
        errs,
    );
    let message = r.string("message", errs).map(str::to_string);
    let mut checks = Vec::new();
    if let Some(list) = r.string_list("required", errs) {
        checks.push(Check::Required(
            list.iter().map(|s| s.to_string()).collect(),
        ));
    }
    let sub = |k: &str, errs: &mut Errors| -> Option<(String, &Table)> {
        let t = r.table(k, errs)?;
        match t.get("field") {
            Some(Value::String(f)) => Some((f.clone(), t)),
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
    base_dir: &Path,
    errs: &mut Errors,
) -> TargetPolicy {
    let mut scratch = Errors::default();
    let r = Reader::new(key, t, &[], &mut scratch);
    let mut p = TargetPolicy::default();
    if let Some(text) = r.string("route", errs) {
        p.route = cel(&r.key("route"), text, errs);
    }
    let entity_field = |k: &str, spec: &str, errs: &mut Errors| -> Option<(String, String)> {
        let Some((e, f)) = spec.split_once('.') else {
            errs.add(
                k,
                format!("`{spec}` must be written \"entity.field\", e.g. \"bank.acc_number\""),
            );
            return None;
        };
        if !target.entities.iter().any(|n| n == e) {
            errs.add(
                k,
                format!(
                    "`{spec}`: entity `{e}` is not one this target receives ({})",
                    target.entities.join(", ")
                ),
            );
            return None;
        }
        Some((e.to_string(), f.to_string()))
    };
    if let Some(fields) = r.table("fields", errs) {
        for (entity, value) in fields {
            let fkey = join(&r.key("fields"), entity);
            if !target.entities.iter().any(|n| n == entity) {
                errs.add(
                    &fkey,
                    format!(
                        "entity `{entity}` is not one this target receives ({})",
                        target.entities.join(", ")
                    ),
                );
                continue;
            }
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
    use crate::config::Config;
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
            Err(e) => e.errors.iter().map(|e| e.to_string()).collect(),
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
        assert_eq!(g.children[0].entity, 2);
        assert_eq!(c.governance.entities[2].child_of, Some((1, 0)));
        assert_eq!(
            c.entities[1].fields.len(),
            1,
            "the ref field is not a column mapping"
        );
        assert_eq!(c.governance.audit_retention_days, 90);
    }
}
