//! Fills mapped columns that an update left as unchanged TOAST.
//!
//! pgoutput does not resend a TOASTed value the update did not touch, and
//! with Odoo's default replica identity no old value carries it either. A
//! target must never receive a placeholder or a null instead of the real
//! value, so the row is read by key on an ordinary connection. That reads
//! the row as it is now, which may be newer than the change: the later
//! change follows in the stream anyway, so the target ends on the right
//! value. If the row is gone, the change is skipped: its delete follows.

use bytes::Bytes;

use steward_core::config::SourceConfig;
use steward_core::model::{Change, TupleValue};
use steward_core::pipeline::ToastFill;

#[derive(Default)]
pub(super) struct ToastFiller {
    client: Option<tokio_postgres::Client>,
}

impl ToastFiller {
    /// Replaces the unchanged-TOAST columns of `change` with the row's
    /// values. Ok(false) when the row no longer exists.
    pub(super) async fn fill(
        &mut self,
        source: &SourceConfig,
        change: &mut Change,
        fill: ToastFill,
    ) -> anyhow::Result<bool> {
        if !matches!(&self.client, Some(c) if !c.is_closed()) {
            self.client = Some(steward_postgres::connect_sql(source).await?);
        }
        let Some(client) = self.client.as_ref() else {
            return Ok(false);
        };
        let messages = client.simple_query(&fill.sql).await?;
        let Some(row) = messages.iter().find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(row) => Some(row),
            _ => None,
        }) else {
            tracing::warn!(relation = change.relation_id, "a TOASTed column was unchanged, and the row is gone by now; its delete follows in the stream");
            return Ok(false);
        };
        let Some(new) = change.new.as_mut() else {
            return Ok(false);
        };
        for (i, &column) in fill.columns.iter().enumerate() {
            if let Some(slot) = new.get_mut(column) {
                *slot = match row.get(i) {
                    Some(text) => TupleValue::Text(Bytes::copy_from_slice(text.as_bytes())),
                    None => TupleValue::Null,
                };
            }
        }
        Ok(true)
    }
}

/// A mapped table's columns whose values PostgreSQL may store out of line
/// (TOAST): `attstorage` other than `p` (plain).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct ToastableColumn {
    pub schema: String,
    pub table: String,
    pub column: String,
    /// `pg_class.relreplident` of the table.
    pub replica_identity: String,
}

/// One line per mapped table with TOASTable mapped columns: which, and what
/// steward does when an update leaves one of them unchanged.
pub(super) fn report_lines(
    config: &steward_core::config::Config,
    columns: &[ToastableColumn],
) -> Vec<String> {
    let mut lines = Vec::new();
    let mut tables: Vec<(&str, &str)> = config
        .entities
        .iter()
        .map(|e| (e.schema.as_str(), e.table.as_str()))
        .collect();
    tables.sort();
    tables.dedup();
    for (schema, table) in tables {
        // Field sources and fallbacks: what `Pipeline::toast_fill_query` fills.
        let mut mapped: Vec<&str> = Vec::new();
        for e in config
            .entities
            .iter()
            .filter(|e| e.schema == schema && e.table == table)
        {
            for f in &e.fields {
                for c in std::iter::once(&f.source).chain(f.fallback.as_ref()) {
                    if !mapped.contains(&c.column.as_str()) {
                        mapped.push(c.column.as_str());
                    }
                }
            }
        }
        let of_table: Vec<&ToastableColumn> = columns
            .iter()
            .filter(|c| c.schema == schema && c.table == table)
            .collect();
        let toastable: Vec<&str> = mapped
            .iter()
            .copied()
            .filter(|m| of_table.iter().any(|c| c.column == *m))
            .collect();
        if toastable.is_empty() {
            continue;
        }
        let full = of_table.first().is_some_and(|c| c.replica_identity == "f");
        let action = if full {
            "the table has REPLICA IDENTITY FULL, so the old row carries such values and steward \
             takes them from it without reading the table"
        } else {
            "steward re-reads them from the table by key (one SELECT per such update; REPLICA \
             IDENTITY FULL on the table avoids that read, at the cost of writing the whole old row \
             to the WAL on every UPDATE and DELETE)"
        };
        lines.push(format!(
            "{schema}.{table}: mapped columns {} can be TOASTed (stored out of line when large); \
             PostgreSQL does not resend such a value when an update leaves it unchanged, and {action}",
            toastable.join(", ")
        ));
    }
    lines
}

/// Reads the TOASTable columns of the mapped tables and logs [`report_lines`].
pub(super) async fn startup_report(
    sql: &tokio_postgres::Client,
    config: &steward_core::config::Config,
    tables: &[(String, String)],
) -> anyhow::Result<()> {
    let schemas: Vec<&str> = tables.iter().map(|(s, _)| s.as_str()).collect();
    let names: Vec<&str> = tables.iter().map(|(_, t)| t.as_str()).collect();
    let rows = sql
        .query(
            "SELECT x.s, x.t, a.attname::text, c.relreplident::text \
             FROM unnest($1::text[], $2::text[]) AS x(s, t) \
             JOIN pg_namespace n ON n.nspname = x.s \
             JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = x.t \
             JOIN pg_attribute a ON a.attrelid = c.oid \
             WHERE a.attnum > 0 AND NOT a.attisdropped AND a.attstorage <> 'p' \
             ORDER BY x.s, x.t, a.attnum",
            &[&schemas, &names],
        )
        .await?;
    let columns: Vec<ToastableColumn> = rows
        .iter()
        .map(|r| ToastableColumn {
            schema: r.get(0),
            table: r.get(1),
            column: r.get(2),
            replica_identity: r.get(3),
        })
        .collect();
    for line in report_lines(config, &columns) {
        tracing::info!("{line}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use steward_core::config::Config;

    fn config() -> Config {
        let text = r#"
[source]
url = "postgres://steward@localhost/odoo"
[state]
path = "/tmp/x.redb"
[entities.product]
table = "product_template"
fields = { sku = "default_code", name = { path = "name.de_DE", fallback = "description" }, qty = "sequence" }
[entities.uom]
table = "uom_uom"
fields = { factor = "factor" }
[entities.partner]
table = "res_partner"
fields = { name = "name" }
[targets.wms]
type = "http"
url = "http://localhost:1/"
entities = ["product", "uom", "partner"]
"#;
        steward_sinks::config::parse(text, "t.toml".as_ref(), "/tmp".as_ref()).unwrap()
    }

    fn col(table: &str, column: &str, ident: &str) -> ToastableColumn {
        ToastableColumn {
            schema: "public".into(),
            table: table.into(),
            column: column.into(),
            replica_identity: ident.into(),
        }
    }

    #[test]
    fn the_report_names_mapped_toastable_columns_and_what_steward_does() {
        let columns = vec![
            col("product_template", "default_code", "d"),
            col("product_template", "name", "d"),
            col("product_template", "description", "d"),
            // Not mapped: not reported.
            col("product_template", "description_sale", "d"),
            col("res_partner", "name", "f"),
        ];
        let lines = report_lines(&config(), &columns);
        assert_eq!(lines.len(), 2, "{lines:?}");
        let product = &lines[0];
        assert!(
            product.starts_with(
                "public.product_template: mapped columns default_code, name, description can be TOASTed"
            ),
            "{product}"
        );
        assert!(product.contains("re-reads them from the table by key"));
        assert!(product.contains("one SELECT per such update"));
        assert!(!product.contains("description_sale"));
        let partner = &lines[1];
        assert!(partner.starts_with("public.res_partner: mapped columns name"));
        assert!(
            partner.contains("REPLICA IDENTITY FULL") && partner.contains("without reading"),
            "{partner}"
        );
        // uom maps only plain (non-TOASTable) columns: no line.
        assert!(!lines.iter().any(|l| l.contains("uom_uom")));
    }
}
