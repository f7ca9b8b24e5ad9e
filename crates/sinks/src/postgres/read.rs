//! Reading a PostgreSQL target's tables back, for a deep reconciliation
//! (`steward reconcile --deep`): the rows (and tombstones) of given keys,
//! and the keys of the rows present, in pages. Read-only: the session's
//! transactions are read only, whatever the target user may do.

use std::collections::HashMap;
use std::time::Duration;

use tokio_postgres::Client;

use super::{source_config, table_plans, DeleteMode, PostgresTargetConfig, TablePlan};
use steward_core::config::{Config, SourceConfig, TargetConfig};
use steward_core::pipeline::target_rows::TargetRow;
use steward_postgres::{connect_sql, describe_pg_error, quote_literal};

/// Reads a PostgreSQL target's tables; connects on first use and again
/// after an error.
pub struct TargetReader {
    target: String,
    conn: SourceConfig,
    plans: HashMap<String, TablePlan>,
    delete_mode: DeleteMode,
    timeout: Duration,
    client: Option<Client>,
}

impl TargetReader {
    pub(crate) fn new(
        target: &TargetConfig,
        cfg: &PostgresTargetConfig,
        config: &Config,
    ) -> TargetReader {
        TargetReader {
            target: target.name.clone(),
            conn: source_config(cfg),
            plans: table_plans(cfg, config),
            delete_mode: cfg.delete_mode,
            timeout: cfg.timeout,
            client: None,
        }
    }

    async fn client(&mut self) -> Result<&Client, String> {
        if self.client.as_ref().is_none_or(Client::is_closed) {
            self.client = None;
            let client = connect_sql(&self.conn).await.map_err(|e| {
                format!(
                    "target {}: cannot connect to {} to read its tables: {e}",
                    self.target, self.conn.url_display
                )
            })?;
            client
                .batch_execute("SET default_transaction_read_only = on")
                .await
                .map_err(|e| self.failed(&e, "setting up the session of"))?;
            self.client = Some(client);
        }
        self.client
            .as_ref()
            .ok_or_else(|| format!("target {}: not connected", self.target))
    }

    fn plan(&self, entity: &str) -> Result<&TablePlan, String> {
        self.plans.get(entity).ok_or_else(|| {
            format!(
                "target {}: entity `{entity}` has no table there",
                self.target
            )
        })
    }

    fn failed(&self, e: &tokio_postgres::Error, doing: &str) -> String {
        format!(
            "target {}: {doing} {} failed: {}",
            self.target,
            self.conn.url_display,
            describe_pg_error(e)
        )
    }

    /// The rows of `keys` in `entity`'s table: each key's row (soft-deleted
    /// or not) or, in delete mode, its tombstone; a key with neither is absent.
    pub async fn rows(
        &mut self,
        entity: &str,
        keys: &[String],
    ) -> Result<HashMap<String, TargetRow>, String> {
        let mut out = HashMap::with_capacity(keys.len());
        if keys.is_empty() {
            return Ok(out);
        }
        let plan = self.plan(entity)?;
        let (rows_sql, tomb_sql) = (rows_sql(plan), tomb_sql(plan));
        let (name, mode, timeout) = (plan.name.clone(), self.delete_mode, self.timeout);
        let read = async {
            let client = self.client().await?;
            let rows = client
                .query(&rows_sql, &[&keys])
                .await
                .map_err(|e| table_error(&e, &name))?;
            let tombs = match mode {
                DeleteMode::Soft => Vec::new(),
                DeleteMode::Delete => client
                    .query(&tomb_sql, &[&keys])
                    .await
                    .map_err(|e| table_error(&e, &format!("{name}__deleted")))?,
            };
            Ok::<_, String>((rows, tombs))
        };
        let (rows, tombs) = match tokio::time::timeout(timeout, read).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                self.client = None;
                return Err(format!("target {}: {e}", self.target));
            }
            Err(_) => {
                self.client = None;
                return Err(format!(
                    "target {}: reading {} rows of {name} took longer than timeout_ms ({} ms)",
                    self.target,
                    keys.len(),
                    timeout.as_millis()
                ));
            }
        };
        for r in rows {
            let Some(key) = r.get::<_, Option<String>>(0) else {
                continue;
            };
            let data: Option<String> = r.get(1);
            let data = match data {
                Some(text) => serde_json::from_str(&text).unwrap_or(serde_json::Value::Null),
                None => serde_json::Value::Null,
            };
            out.insert(
                key,
                TargetRow {
                    data: Some(data),
                    deleted: r.get::<_, Option<bool>>(2).unwrap_or(false),
                    fields_match: r.get::<_, Option<bool>>(5).unwrap_or(false),
                    guard: Some(guard(r.get(3), r.get(4))),
                },
            );
        }
        for r in tombs {
            let Some(key) = r.get::<_, Option<String>>(0) else {
                continue;
            };
            let tomb = guard(r.get(1), r.get(2));
            let row = out.entry(key).or_insert_with(|| TargetRow {
                data: None,
                deleted: true,
                fields_match: true,
                guard: None,
            });
            if row.guard.as_ref().is_none_or(|g| tomb > *g) {
                row.guard = Some(tomb);
            }
        }
        Ok(out)
    }

    /// Up to `limit` keys of rows present (not marked deleted) in
    /// `entity`'s table after `after`, in the table's key order.
    pub async fn keys_after(
        &mut self,
        entity: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, String> {
        let plan = self.plan(entity)?;
        let sql = format!(
            "SELECT _key::text FROM {} WHERE NOT _deleted AND ($1::text IS NULL OR _key > $1) \
             ORDER BY _key LIMIT $2",
            plan.table
        );
        let (name, timeout) = (plan.name.clone(), self.timeout);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let read = async {
            let client = self.client().await?;
            client
                .query(&sql, &[&after, &limit])
                .await
                .map_err(|e| table_error(&e, &name))
        };
        match tokio::time::timeout(timeout, read).await {
            Ok(Ok(rows)) => Ok(rows
                .iter()
                .filter_map(|r| r.get::<_, Option<String>>(0))
                .collect()),
            Ok(Err(e)) => {
                self.client = None;
                Err(format!("target {}: {e}", self.target))
            }
            Err(_) => {
                self.client = None;
                Err(format!(
                    "target {}: reading keys of {name} took longer than timeout_ms ({} ms)",
                    self.target,
                    timeout.as_millis()
                ))
            }
        }
    }
}

fn table_error(e: &tokio_postgres::Error, table: &str) -> String {
    format!("reading {table} failed: {}", describe_pg_error(e))
}

/// `(_version, _event_id)` as the guard compares them (a version written
/// outside steward may be negative or the id missing).
fn guard(version: Option<i64>, id: Option<String>) -> (u64, String) {
    (
        version.and_then(|v| u64::try_from(v).ok()).unwrap_or(0),
        id.unwrap_or_default(),
    )
}

/// The rows of keys `$1`, with whether each field column agrees with `data`
/// (as the sink writes it: the field's value, JSON null as NULL). Every
/// column is cast to the type read, so a table created by hand with other
/// types gives an error (or works), never a type mismatch in the client.
fn rows_sql(plan: &TablePlan) -> String {
    let fields_match = if plan.fields.is_empty() {
        "true".to_string()
    } else {
        plan.fields
            .iter()
            .map(|f| {
                format!(
                    "t.{} IS NOT DISTINCT FROM NULLIF(t.data -> {}, 'null'::jsonb)",
                    steward_postgres::quote_ident(f),
                    quote_literal(f)
                )
            })
            .collect::<Vec<_>>()
            .join(" AND ")
    };
    format!(
        "SELECT t._key::text, t.data::text, t._deleted::bool, t._version::int8, \
         t._event_id::text, ({fields_match})::bool FROM {} t WHERE t._key = ANY($1::text[])",
        plan.table
    )
}

fn tomb_sql(plan: &TablePlan) -> String {
    format!(
        "SELECT _key::text, _version::int8, _event_id::text FROM {} WHERE _key = ANY($1::text[])",
        plan.tomb
    )
}
