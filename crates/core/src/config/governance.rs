//! Governance settings, checked at load: lifecycle gates, validation rules,
//! business keys, reference fields, business objects, per-target field
//! policy and routing. Indexes line up with [`super::Config::entities`] and
//! [`super::Config::targets`].

use crate::cel::CelExpr;

use super::{EntityIndex, FieldConfig, Secret};

/// The governance settings of every entity and target.
#[derive(Clone, Debug, Default)]
pub struct GovernanceConfig {
    /// One per configured entity, same order.
    pub entities: Vec<EntityGovernance>,
    /// One per configured target, same order.
    pub(crate) targets: Vec<TargetPolicy>,
    /// Audit records older than this many days are pruned (`state.audit_retention_days`, default 90).
    pub audit_retention_days: u32,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) enum OnUnpublish {
    /// Send a delete of the key (default).
    #[default]
    Delete,
    /// Send the record as it now is, with its state fields.
    Upsert,
}

/// One entity's governance: its lifecycle gate, validation rules, business
/// keys, reference fields and children.
#[derive(Clone, Debug, Default)]
pub struct EntityGovernance {
    pub(crate) publish_when: Option<CelExpr>,
    pub(crate) on_unpublish: OnUnpublish,
    pub(crate) rules: Vec<Rule>,
    /// Business-key fields (document field names, or columns), each unique per entity.
    pub(crate) unique: Vec<String>,
    /// Fields whose value is the referenced record's business key.
    pub(crate) refs: Vec<RefField>,
    /// Child rows gathered into the document (business objects).
    pub(crate) children: Vec<ChildConfig>,
    /// Set for the hidden entity that tracks a parent's child table: (parent entity index, child index).
    pub(crate) child_of: Option<(EntityIndex, usize)>,
    /// Set for the hidden entity that tracks `ir_model_data`: the Odoo models
    /// whose external ids references deliver. Rows of other models are ignored.
    pub(crate) external_ids_of: Vec<String>,
    /// The document's field names in the order the TOML `fields` table lists
    /// them (reference fields where they are written), then the children
    /// arrays in the order of `children`.
    pub(crate) field_order: Vec<String>,
}

impl EntityGovernance {
    /// Whether records of this entity need their rows tracked.
    pub(crate) fn is_governed(&self) -> bool {
        self.publish_when.is_some()
            || !self.rules.is_empty()
            || !self.unique.is_empty()
            || !self.refs.is_empty()
            || !self.children.is_empty()
            || self.child_of.is_some()
            || !self.external_ids_of.is_empty()
    }

    /// The many2one columns its reference fields map (document fields that
    /// are not in `fields`).
    pub fn reference_columns(&self) -> impl Iterator<Item = &str> {
        self.refs.iter().map(|r| r.column.as_str())
    }

    /// Whether steward added this entity itself (a child table, or
    /// `ir_model_data` for external ids): no target can name it.
    pub fn is_hidden(&self) -> bool {
        self.child_of.is_some() || !self.external_ids_of.is_empty()
    }
}

#[derive(Clone, Debug)]
pub(crate) struct Rule {
    pub(crate) name: String,
    pub(crate) checks: Vec<Check>,
    /// Shown to the operator; a default naming the failed check otherwise.
    pub(crate) message: Option<String>,
}

#[derive(Clone, Debug)]
pub(crate) enum Check {
    Required(Vec<String>),
    Regex {
        field: String,
        regex: regex::Regex,
    },
    Allowed {
        field: String,
        values: Vec<serde_json::Value>,
    },
    Range {
        field: String,
        min: Option<f64>,
        max: Option<f64>,
    },
    Cel(CelExpr),
    /// The column holds the id of a record of `entity`, which must exist and be publishable.
    /// `field` may be a child path (`lines.product_id`): the field or column of
    /// every item of that children array.
    Reference {
        field: String,
        entity: String,
    },
}

#[derive(Clone, Debug)]
pub(crate) struct RefField {
    /// The document field.
    pub(crate) name: String,
    /// The many2one column (an id of the referenced entity's key).
    pub(crate) column: String,
    pub(crate) entity: String,
    /// Field of the referenced entity's document to deliver (its business key).
    /// Empty when `external_id` is set.
    pub(crate) key: String,
    /// Deliver the referenced record's Odoo external id (`module.name` from
    /// `ir_model_data`) instead of one of its fields.
    pub(crate) external_id: bool,
    /// The Odoo model `ir_model_data.model` names for the referenced table
    /// (e.g. `uom.uom`); used with `external_id`.
    pub(crate) model: String,
}

#[derive(Clone, Debug)]
pub(crate) struct ChildConfig {
    /// The array field in the parent's document.
    pub(crate) name: String,
    pub(crate) schema: String,
    pub(crate) table: String,
    /// Column of the child row holding the parent's id.
    pub(crate) parent: String,
    /// The plain (column-mapped) fields of each item.
    pub(crate) fields: Vec<FieldConfig>,
    /// Fields of each item whose value is the referenced record's business
    /// key or external id (`{ ref = ... }` in the child's `fields`). Their
    /// columns are not in `fields`: like an entity's reference columns they
    /// reach the governance in the captured row of the hidden entity.
    pub(crate) refs: Vec<RefField>,
    /// Each item's field names in the order the TOML `fields` table lists
    /// them, reference fields included (not the `id` every item carries).
    pub(crate) field_order: Vec<String>,
    /// The hidden entity that maps the child table.
    pub(crate) entity: EntityIndex,
}

#[derive(Clone, Debug, Default)]
pub(crate) struct TargetPolicy {
    /// entity name → allowed document fields; entities not listed keep every
    /// field. A child path `child.field` keeps only the listed fields of each
    /// item of that children array (the bare `child` keeps whole items).
    pub(crate) allow: Vec<(String, Vec<String>)>,
    /// `entity.field` → masking method. The field may be a child path
    /// (`banks.acc_number`): that field of every item.
    pub(crate) mask: Vec<(String, String, Mask)>,
    /// `entity.field` values replaced by HMAC-SHA256 (hex) under `hash_key`;
    /// the field may be a child path like in `mask`.
    pub(crate) hash: Vec<(String, String)>,
    pub(crate) hash_key: Option<Secret>,
    pub(crate) route: Option<CelExpr>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mask {
    /// Drop whitespace, keep the last 4 remaining characters and replace the
    /// others with `*`; a value of 4 characters or fewer becomes all `*`.
    Last4,
    /// Replace the whole value with `***`.
    Full,
}
