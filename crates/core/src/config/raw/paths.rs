//! Which field paths exist in an entity's document, for the governance keys
//! that name fields: rule fields, business keys, reference keys and the
//! per-target allow-lists, masks and hashes. A name that does not exist would
//! otherwise be silently ignored (a mask that masks nothing, a rule that
//! never fails), so each is checked against what the entity maps.

use crate::config::governance::EntityGovernance;
use crate::config::EntityConfig;

/// What a key may name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Use {
    /// Business keys: document fields, children arrays, or (as a name is
    /// looked up in the row when the document lacks it) key columns and the
    /// columns the entity maps. No child paths.
    Unique,
    /// `required`, `regex`, `allowed` and `range` fields: as [`Use::Unique`],
    /// or a child path to a field of the child's items (or their `id`),
    /// which the rule checks in every item of the document.
    Rule,
    /// A `reference` rule: a document field or mapped column, or a child path
    /// to a child's field or mapped column (the child row's id column).
    Reference,
    /// Target allow-lists, masks and hashes, which act on the delivered
    /// document: document fields, children arrays and child paths to a
    /// child's fields (or the `id` every item carries). No columns.
    Policy,
}

/// The names one entity's field paths may use.
#[derive(Debug)]
pub(super) struct Known {
    entity: String,
    /// Mapped and reference fields, in the order written.
    fields: Vec<String>,
    /// Key columns, then the columns fields and references read.
    columns: Vec<String>,
    children: Vec<KnownChild>,
}

#[derive(Debug)]
struct KnownChild {
    name: String,
    /// The item's fields (mapped and reference), then `id`.
    fields: Vec<String>,
    /// The columns the child's fields and references read.
    columns: Vec<String>,
}

fn push_unique(list: &mut Vec<String>, name: &str) {
    if !list.iter().any(|n| n == name) {
        list.push(name.to_string());
    }
}

fn listed(list: &[String]) -> String {
    if list.is_empty() {
        "none".to_string()
    } else {
        list.join(", ")
    }
}

impl Known {
    pub(super) fn new(entity: &EntityConfig, g: &EntityGovernance) -> Known {
        let mut fields: Vec<String> = Vec::new();
        // In the order written when known (mapped and reference fields interleave).
        for name in &g.field_order {
            let mapped = entity.fields.iter().any(|f| &f.name == name);
            if mapped || g.refs.iter().any(|r| &r.name == name) {
                push_unique(&mut fields, name);
            }
        }
        for name in entity
            .fields
            .iter()
            .map(|f| &f.name)
            .chain(g.refs.iter().map(|r| &r.name))
        {
            push_unique(&mut fields, name);
        }
        let mut columns = entity.key.clone();
        for f in &entity.fields {
            push_unique(&mut columns, &f.source.column);
            if let Some(fb) = &f.fallback {
                push_unique(&mut columns, &fb.column);
            }
        }
        for r in &g.refs {
            push_unique(&mut columns, &r.column);
        }
        let children = g
            .children
            .iter()
            .map(|c| {
                let mut fields = Vec::new();
                for name in c
                    .field_order
                    .iter()
                    .chain(c.fields.iter().map(|f| &f.name))
                    .chain(c.refs.iter().map(|r| &r.name))
                {
                    push_unique(&mut fields, name);
                }
                push_unique(&mut fields, "id");
                let mut columns = Vec::new();
                for f in &c.fields {
                    push_unique(&mut columns, &f.source.column);
                }
                for r in &c.refs {
                    push_unique(&mut columns, &r.column);
                }
                KnownChild {
                    name: c.name.clone(),
                    fields,
                    columns,
                }
            })
            .collect();
        Known {
            entity: entity.name.clone(),
            fields,
            columns,
            children,
        }
    }

    pub(super) fn entity(&self) -> &str {
        &self.entity
    }

    fn child_names(&self) -> Vec<String> {
        self.children.iter().map(|c| c.name.clone()).collect()
    }

    /// What exists, for a message: fields, children and (for rules) columns.
    fn inventory(&self, columns: bool) -> String {
        let mut out = format!(
            "fields: {}; children: {}",
            listed(&self.fields),
            listed(&self.child_names())
        );
        if columns {
            out.push_str(&format!("; columns: {}", listed(&self.columns)));
        }
        out
    }

    /// `Ok` when `path` names something that exists for `usage`; otherwise
    /// why not, listing what does exist (callers prefix the path).
    pub(super) fn check(&self, path: &str, usage: Use) -> Result<(), String> {
        let entity = &self.entity;
        let columns = usage != Use::Policy;
        // Rules other than reference read child paths from the document's items.
        let child_columns = usage == Use::Reference;
        let Some((head, rest)) = path.split_once('.') else {
            let is_field = self.fields.iter().any(|f| f == path);
            let is_child = self.children.iter().any(|c| c.name == path);
            let is_column = columns && self.columns.iter().any(|c| c == path);
            return match usage {
                _ if is_field || is_column => Ok(()),
                Use::Reference if is_child => Err(format!(
                    "a children array of entity {entity}; name a field of its items, e.g. \
                     \"{path}.{}\"",
                    self.children
                        .iter()
                        .find(|c| c.name == path)
                        .and_then(|c| c.fields.first())
                        .map_or("field", String::as_str)
                )),
                _ if is_child => Ok(()),
                Use::Policy => Err(format!(
                    "entity {entity} has no field or child `{path}` ({})",
                    self.inventory(false)
                )),
                _ => Err(format!(
                    "entity {entity} has no field, child or column `{path}` ({})",
                    self.inventory(true)
                )),
            };
        };
        if usage == Use::Unique {
            return Err(format!(
                "a child path; a business key is one value per record: name a field or \
                 column of entity {entity} ({})",
                self.inventory(true)
            ));
        }
        let Some(child) = self.children.iter().find(|c| c.name == head) else {
            let what = if self.fields.iter().any(|f| f == head) {
                format!("`{head}` is a field of entity {entity}, not a children array")
            } else {
                format!("entity {entity} has no field or child `{head}`")
            };
            return Err(format!("{what} ({})", self.inventory(false)));
        };
        let exists = !rest.contains('.')
            && (child.fields.iter().any(|f| f == rest)
                || (child_columns && child.columns.iter().any(|c| c == rest)));
        if exists {
            return Ok(());
        }
        let mut have = format!("fields: {}", listed(&child.fields));
        if child_columns {
            have.push_str(&format!("; columns: {}", listed(&child.columns)));
        }
        Err(format!(
            "child `{head}` of entity {entity} has no field `{rest}` ({have})"
        ))
    }
}
