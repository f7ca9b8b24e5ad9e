//! Reading tables in a consistent snapshot at a known LSN.
//!
//! A snapshot is exported by a replication connection creating a slot
//! (`CREATE_REPLICATION_SLOT ... (SNAPSHOT 'export')`): the main slot when
//! steward creates it, or a TEMPORARY slot when a snapshot is needed while
//! streaming goes on (a target added later, `steward reset`, a resume after a
//! crash). The exporting connection must stay open until the snapshot is
//! imported by `SET TRANSACTION SNAPSHOT` on an ordinary connection; after
//! that the importing REPEATABLE READ transaction keeps it alive by itself,
//! so the replication connection is closed (which drops a temporary slot).
//!
//! Rows are read in key order, `chunk` rows at a time
//! (`WHERE (key) > (last) ORDER BY key LIMIT n`), taking only ACCESS SHARE
//! locks, so Odoo keeps writing while a snapshot runs. Values are read in
//! the simple query protocol's text format, i.e. each type's output function,
//! which is what pgoutput sends too (a `::text` cast would not be: `bool`
//! casts to `true`, its output is `t`), so the pipeline maps them exactly
//! like streamed changes.

use tokio_postgres::{Client, SimpleQueryMessage};

use steward_core::config::SourceConfig;
use steward_core::model::{Column, Lsn, Relation};
use steward_postgres::{self, quote_ident, quote_literal, ReplicationClient, WireError};

/// An open REPEATABLE READ transaction that imported an exported snapshot.
pub struct SnapshotReader {
    client: Client,
    /// The consistent point: the snapshot holds every transaction committed before it.
    pub consistent: Lsn,
}

/// Why a snapshot could not be opened or read.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// Connecting or talking to the server failed.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// A query of the snapshot failed.
    #[error("snapshot query failed ({what}): {detail}")]
    Query {
        /// What steward was doing.
        what: String,
        /// The server's message and SQLSTATE.
        detail: String,
    },
    /// The reply to CREATE_REPLICATION_SLOT lacked the consistent point or
    /// the snapshot name.
    #[error("the server's answer to CREATE_REPLICATION_SLOT was not understood: {0}")]
    BadReply(String),
}

impl SnapshotError {
    /// Whether trying again later may help (connection problems, not SQL errors).
    pub fn is_transient(&self) -> bool {
        match self {
            SnapshotError::Wire(e) => e.is_transient(),
            SnapshotError::Query { detail, .. } => detail.contains("connection"),
            SnapshotError::BadReply(_) => false,
        }
    }
}

fn query_err(what: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> SnapshotError {
    let what = what.into();
    move |e| SnapshotError::Query {
        what,
        detail: match e.as_db_error() {
            Some(db) => format!("{} ({})", db.message(), db.code().code()),
            None => e.to_string(),
        },
    }
}

/// The command creating a temporary logical slot that exports its snapshot.
pub(crate) fn temporary_slot_command(slot: &str, server_version_num: u32) -> String {
    if server_version_num >= 150000 {
        format!(
            "CREATE_REPLICATION_SLOT {} TEMPORARY LOGICAL pgoutput (SNAPSHOT 'export')",
            quote_ident(slot)
        )
    } else {
        format!(
            "CREATE_REPLICATION_SLOT {} TEMPORARY LOGICAL pgoutput EXPORT_SNAPSHOT",
            quote_ident(slot)
        )
    }
}

/// Creates a temporary slot exporting a snapshot, imports the snapshot on a
/// new ordinary connection, then closes the replication connection (the
/// temporary slot goes with it). Waits, like any slot creation, for
/// transactions running at that moment to end.
pub async fn open_temporary(source: &SourceConfig) -> Result<SnapshotReader, SnapshotError> {
    let mut replication = ReplicationClient::connect(source).await?;
    let name = format!("steward_snap_{}_{}", std::process::id(), rand_suffix());
    let cmd = temporary_slot_command(&name, replication.server_version_num());
    let rows = replication.simple_query(&cmd).await?;
    let row = rows
        .first()
        .ok_or_else(|| SnapshotError::BadReply("no row".into()))?;
    let consistent: Lsn = row
        .get(1)
        .and_then(|v| v.as_deref())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| SnapshotError::BadReply(format!("consistent point in {row:?}")))?;
    let snapshot = row
        .get(2)
        .and_then(std::clone::Clone::clone)
        .ok_or_else(|| SnapshotError::BadReply("no snapshot name".into()))?;
    let reader = import(source, &snapshot, consistent).await;
    // Closing after the import: the importing transaction now holds the snapshot.
    let _ = replication.close().await;
    reader
}

fn rand_suffix() -> u32 {
    rand::random::<u32>()
}

/// Imports `snapshot` (exported by a connection that is still open) into a
/// new read-only REPEATABLE READ transaction.
pub async fn import(
    source: &SourceConfig,
    snapshot: &str,
    consistent: Lsn,
) -> Result<SnapshotReader, SnapshotError> {
    let client = steward_postgres::connect_sql(source).await?;
    client
        .batch_execute(&format!(
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT {}",
            quote_literal(snapshot)
        ))
        .await
        .map_err(query_err("importing the exported snapshot"))?;
    Ok(SnapshotReader { client, consistent })
}

/// A read-only REPEATABLE READ transaction at the server's current state,
/// for steward's own state (no consistent point: `consistent` is 0/0).
pub async fn open_plain(source: &SourceConfig) -> Result<SnapshotReader, SnapshotError> {
    let client = steward_postgres::connect_sql(source).await?;
    client
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .await
        .map_err(query_err("starting a read-only transaction"))?;
    Ok(SnapshotReader {
        client,
        consistent: Lsn::ZERO,
    })
}

/// What to read from one table: all columns any entity of it maps, keys first.
#[derive(Clone, Debug)]
pub struct TableRead {
    /// Schema name.
    pub schema: String,
    /// Table name.
    pub table: String,
    /// Key columns, in key order: rows are read in this order.
    pub key: Vec<String>,
    /// Key columns first (in key order), then the others, no duplicates.
    pub columns: Vec<String>,
}

impl SnapshotReader {
    /// A Relation describing `read.columns` with their types, so the pipeline
    /// can plan the table as if the server had sent it.
    pub async fn relation(&self, read: &TableRead, id: u32) -> Result<Relation, SnapshotError> {
        let qualified = format!("{}.{}", quote_ident(&read.schema), quote_ident(&read.table));
        let rows = self
            .client
            .query(
                "SELECT attname::text, atttypid::int8, atttypmod FROM pg_attribute \
                 WHERE attrelid = $1::text::regclass AND attnum > 0 AND NOT attisdropped",
                &[&qualified],
            )
            .await
            .map_err(query_err(format!("reading the columns of {qualified}")))?;
        let mut columns = Vec::with_capacity(read.columns.len());
        for name in &read.columns {
            let found = rows.iter().find(|r| r.get::<_, String>(0) == *name);
            // A missing column is left out: planning the entity then reports
            // it with the table's real columns.
            if let Some(r) = found {
                columns.push(Column {
                    is_key: read.key.contains(name),
                    name: name.clone(),
                    type_oid: r.get::<_, i64>(1) as u32,
                    type_modifier: r.get(2),
                });
            }
        }
        Ok(Relation {
            id,
            namespace: read.schema.clone(),
            name: read.table.clone(),
            replica_identity: b'd',
            columns,
        })
    }

    /// Every column of the table, in the table's order (governed entities
    /// need whole rows: gates and routes read unmapped columns).
    pub async fn all_columns(
        &self,
        schema: &str,
        table: &str,
    ) -> Result<Vec<String>, SnapshotError> {
        let qualified = format!("{}.{}", quote_ident(schema), quote_ident(table));
        let rows = self
            .client
            .query(
                "SELECT attname::text FROM pg_attribute \
                 WHERE attrelid = $1::text::regclass AND attnum > 0 AND NOT attisdropped \
                 ORDER BY attnum",
                &[&qualified],
            )
            .await
            .map_err(query_err(format!("reading the columns of {qualified}")))?;
        Ok(rows.iter().map(|r| r.get::<_, String>(0)).collect())
    }

    /// The planner's row estimate (0 when unknown).
    pub async fn estimate_rows(&self, read: &TableRead) -> Result<u64, SnapshotError> {
        let qualified = format!("{}.{}", quote_ident(&read.schema), quote_ident(&read.table));
        let row = self
            .client
            .query_one(
                "SELECT reltuples::int8 FROM pg_class WHERE oid = $1::text::regclass",
                &[&qualified],
            )
            .await
            .map_err(query_err(format!("estimating the rows of {qualified}")))?;
        Ok(row.get::<_, i64>(0).max(0) as u64)
    }

    /// Up to `limit` rows with key > `after` (all rows when `None`), in key
    /// order; each row holds the values of `relation.columns` as text.
    pub async fn read_chunk(
        &self,
        read: &TableRead,
        relation: &Relation,
        after: Option<&[String]>,
        limit: usize,
    ) -> Result<Vec<Vec<Option<String>>>, SnapshotError> {
        let sql = chunk_sql(read, relation, after, limit);
        let messages = self
            .client
            .simple_query(&sql)
            .await
            .map_err(query_err(format!(
                "reading {}.{} in the snapshot",
                read.schema, read.table
            )))?;
        let mut rows = Vec::with_capacity(limit);
        for m in messages {
            if let SimpleQueryMessage::Row(row) = m {
                rows.push(
                    (0..relation.columns.len())
                        .map(|i| row.get(i).map(str::to_string))
                        .collect(),
                );
            }
        }
        Ok(rows)
    }
}

impl SnapshotReader {
    /// Which of `keys` (key column texts, in the order of `read.key`) the
    /// table has in this snapshot: their key column texts, as the server
    /// prints them (as [`SnapshotReader::read_chunk`] reads them).
    pub async fn present_keys(
        &self,
        read: &TableRead,
        keys: &[Vec<String>],
    ) -> Result<Vec<Vec<String>>, SnapshotError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let sql = present_sql(read, keys);
        let messages = self
            .client
            .simple_query(&sql)
            .await
            .map_err(query_err(format!(
                "looking up keys of {}.{} in the snapshot",
                read.schema, read.table
            )))?;
        let mut out = Vec::with_capacity(keys.len());
        for m in messages {
            if let SimpleQueryMessage::Row(row) = m {
                out.push(
                    (0..read.key.len())
                        .map(|i| row.get(i).unwrap_or_default().to_string())
                        .collect(),
                );
            }
        }
        Ok(out)
    }
}

/// `SELECT k... FROM t WHERE (k...) IN (('..', ...), ...)`, untyped literals
/// as in [`chunk_sql`] (the primary key index serves it).
pub(crate) fn present_sql(read: &TableRead, keys: &[Vec<String>]) -> String {
    let columns: Vec<String> = read.key.iter().map(|k| quote_ident(k)).collect();
    let tuples: Vec<String> = keys
        .iter()
        .map(|k| {
            let values: Vec<String> = k.iter().map(|v| quote_literal(v)).collect();
            format!("({})", values.join(", "))
        })
        .collect();
    format!(
        "SELECT {cols} FROM {}.{} WHERE ({cols}) IN ({})",
        quote_ident(&read.schema),
        quote_ident(&read.table),
        tuples.join(", "),
        cols = columns.join(", ")
    )
}

impl SnapshotReader {
    /// The row whose key columns hold `key` (texts, in key order), if any;
    /// the values of `relation.columns` as text.
    pub async fn read_row(
        &self,
        read: &TableRead,
        relation: &Relation,
        key: &[String],
    ) -> Result<Option<Vec<Option<String>>>, SnapshotError> {
        let select: Vec<String> = relation
            .columns
            .iter()
            .map(|c| quote_ident(&c.name))
            .collect();
        let keys: Vec<String> = read.key.iter().map(|k| quote_ident(k)).collect();
        let values: Vec<String> = key.iter().map(|v| quote_literal(v)).collect();
        let sql = format!(
            "SELECT {} FROM {}.{} WHERE ({}) = ({}) LIMIT 1",
            select.join(", "),
            quote_ident(&read.schema),
            quote_ident(&read.table),
            keys.join(", "),
            values.join(", ")
        );
        let messages = self
            .client
            .simple_query(&sql)
            .await
            .map_err(query_err(format!(
                "reading a row of {}.{}",
                read.schema, read.table
            )))?;
        Ok(messages.into_iter().find_map(|m| match m {
            SimpleQueryMessage::Row(row) => Some(
                (0..relation.columns.len())
                    .map(|i| row.get(i).map(str::to_string))
                    .collect(),
            ),
            _ => None,
        }))
    }
}

/// `SELECT k, ... FROM t WHERE (k...) > ('..', ...) ORDER BY k... LIMIT n`.
/// Literals stay untyped so the server compares them as the key's own type,
/// which the primary key index serves.
pub(crate) fn chunk_sql(
    read: &TableRead,
    relation: &Relation,
    after: Option<&[String]>,
    limit: usize,
) -> String {
    let select: Vec<String> = relation
        .columns
        .iter()
        .map(|c| quote_ident(&c.name))
        .collect();
    let keys: Vec<String> = read.key.iter().map(|k| quote_ident(k)).collect();
    let mut sql = format!(
        "SELECT {} FROM {}.{}",
        select.join(", "),
        quote_ident(&read.schema),
        quote_ident(&read.table)
    );
    if let Some(after) = after {
        let values: Vec<String> = after.iter().map(|v| quote_literal(v)).collect();
        sql.push_str(&format!(
            " WHERE ({}) > ({})",
            keys.join(", "),
            values.join(", ")
        ));
    }
    sql.push_str(&format!(" ORDER BY {} LIMIT {limit}", keys.join(", ")));
    sql
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_query_resumes_after_the_last_key_in_key_order() {
        let read = TableRead {
            schema: "public".into(),
            table: "mrp_bom_line".into(),
            key: vec!["bom_id".into(), "id".into()],
            columns: vec!["bom_id".into(), "id".into(), "qty".into()],
        };
        let relation = Relation {
            id: 1,
            namespace: "public".into(),
            name: "mrp_bom_line".into(),
            replica_identity: b'd',
            columns: read
                .columns
                .iter()
                .map(|c| Column {
                    is_key: false,
                    name: c.clone(),
                    type_oid: 23,
                    type_modifier: -1,
                })
                .collect(),
        };
        assert_eq!(
            chunk_sql(&read, &relation, None, 10),
            "SELECT \"bom_id\", \"id\", \"qty\" FROM \"public\".\"mrp_bom_line\" ORDER BY \"bom_id\", \"id\" LIMIT 10"
        );
        assert_eq!(
            chunk_sql(&read, &relation, Some(&["3".into(), "it's".into()]), 5),
            "SELECT \"bom_id\", \"id\", \"qty\" FROM \"public\".\"mrp_bom_line\" WHERE (\"bom_id\", \"id\") > ('3', 'it''s') ORDER BY \"bom_id\", \"id\" LIMIT 5"
        );
        assert!(temporary_slot_command("s", 150000)
            .contains("TEMPORARY LOGICAL pgoutput (SNAPSHOT 'export')"));
        assert!(temporary_slot_command("s", 140000)
            .ends_with("TEMPORARY LOGICAL pgoutput EXPORT_SNAPSHOT"));
    }
}
