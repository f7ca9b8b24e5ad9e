//! PostgreSQL target: keeps one table per entity equal to the entity's
//! current state, written with version-guarded upserts.
//!
//! Table layout (created by `create_tables = true`, or by the operator):
//!
//! ```sql
//! CREATE TABLE <schema>.<table> (
//!     _key        text PRIMARY KEY,       -- the entity key (composite keys joined by |)
//!     _version    bigint NOT NULL,        -- commit LSN of the change that wrote the row
//!     _deleted    boolean NOT NULL DEFAULT false,
//!     _event_id   text,                   -- id of that change (orders changes within a commit)
//!     _updated_at timestamptz,            -- commit time
//!     data        jsonb,                  -- the whole document
//!     <field>     jsonb, ...              -- one column per entity field (JSON null → NULL)
//! );
//! ```
//!
//! Fields are jsonb rather than inferred SQL types: the source column types
//! are not known when the table is created, and jsonb keeps numerics exact.
//! A field named like a bookkeeping column (`data`, `_key`, ...) gets no
//! column of its own; it is still in `data`.
//!
//! Every write is guarded by `(_version, _event_id)`: a row is only
//! overwritten by a strictly newer change, so out-of-order, stale or replayed
//! batches never regress it. Deletes are soft by default (`_deleted = true`,
//! the row is the tombstone). With `delete_mode = "delete"` the row is
//! removed and a tombstone `(_key, _version)` is kept in `<table>__deleted`,
//! which upserts also check, so a stale upsert replayed later cannot bring a
//! deleted row back. Tombstones are never purged by steward.
//!
//! A batch is written in one transaction with at most two statements per
//! entity (upserts and, in delete mode, deletes), each taking the whole batch
//! as arrays (`unnest`), after keeping only the newest change per key.
//!
//! The documents travel as one binary `jsonb[]` parameter, so the server
//! parses each document once; the field columns are taken from that parsed
//! value (`jsonb_to_record`). Sent as text and cast per column, each
//! document was parsed once per field column plus once for `data`, which
//! was most of the server's work per row (README, Benchmarks).

pub(crate) mod config;
pub(crate) mod read;

use std::collections::HashMap;
use std::time::Duration;

use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, Statement};

pub(crate) use self::config::{DeleteMode, PostgresTargetConfig};
use crate::DeliveryError;
use steward_core::config::{Config, SourceConfig, TargetConfig};
use steward_core::model::{Event, EventOp};
use steward_postgres::{connect_sql, describe_pg_error, quote_ident};

/// Columns steward owns; a field with one of these names gets no column.
const RESERVED: &[&str] = &[
    "_key",
    "_version",
    "_deleted",
    "_event_id",
    "_updated_at",
    "data",
];

struct TablePlan {
    /// `schema.table` as shown in messages.
    name: String,
    /// Quoted `"schema"."table"`.
    table: String,
    /// Quoted tombstone table (used in delete mode).
    tomb: String,
    /// Field names that get a column.
    fields: Vec<String>,
}

#[derive(Default)]
struct Prepared {
    upsert: Option<Statement>,
    delete: Option<Statement>,
}

pub(crate) struct PostgresSink {
    target: String,
    cfg: PostgresTargetConfig,
    conn: SourceConfig,
    plans: HashMap<String, TablePlan>,
    client: Option<Client>,
    prepared: HashMap<String, Prepared>,
}

impl PostgresSink {
    pub(crate) fn new(
        target: &TargetConfig,
        cfg: &PostgresTargetConfig,
        config: &Config,
    ) -> PostgresSink {
        let plans = table_plans(cfg, config);
        let conn = source_config(cfg);
        PostgresSink {
            target: target.name.clone(),
            cfg: cfg.clone(),
            conn,
            plans,
            client: None,
            prepared: HashMap::new(),
        }
    }

    async fn connect(&mut self) -> Result<(), DeliveryError> {
        let client = connect_sql(&self.conn).await.map_err(|e| {
            // The connection code speaks of the source's keys; name this target's.
            let text = e
                .to_string()
                .replace("the source PostgreSQL server", "the PostgreSQL server")
                .replace("source.", &format!("targets.{}.", self.target));
            DeliveryError {
                // A refused password is retried: the password file is read
                // again on every connection, so a rotation heals by itself.
                retryable: e.is_transient() || e.is_auth_failure(),
                message: format!(
                    "target {}: cannot connect to {}: {text}",
                    self.target, self.conn.url_display
                ),
                retry_after: None,
                status: None,
            }
        })?;
        if self.cfg.create_tables {
            for plan in self.plans.values() {
                let ddl = create_ddl(&self.cfg.schema, plan, self.cfg.delete_mode);
                client.batch_execute(&ddl).await.map_err(|e| {
                    // Creating a table is never about the events: retry, never dead-letter.
                    DeliveryError {
                        retryable: true,
                        ..self.classify(e, &plan.name, "creating")
                    }
                })?;
            }
        }
        self.client = Some(client);
        self.prepared.clear();
        Ok(())
    }

    pub(crate) async fn deliver(&mut self, events: &[Event]) -> Result<(), DeliveryError> {
        if events.is_empty() {
            return Ok(());
        }
        let groups = newest_per_key(events)?;
        if self
            .client
            .as_ref()
            .is_none_or(tokio_postgres::Client::is_closed)
        {
            self.client = None;
            self.connect().await?;
        }
        let timeout = self.cfg.timeout;
        let result = match tokio::time::timeout(timeout, self.write(&groups)).await {
            Ok(r) => r,
            Err(_) => Err(DeliveryError::retryable(format!(
                "target {}: writing {} events took longer than timeout_ms ({} ms); the \
                 transaction was abandoned",
                self.target,
                events.len(),
                timeout.as_millis()
            ))),
        };
        if result.is_err() {
            // Whatever state the connection is in (aborted transaction,
            // half-read reply after a timeout), start clean next time.
            self.client = None;
            self.prepared.clear();
        }
        result
    }

    async fn write(&mut self, groups: &[(&str, Vec<&Event>)]) -> Result<(), DeliveryError> {
        // Prepare first (outside the borrow of the transaction).
        for (entity, _) in groups {
            self.prepare(entity).await?;
        }
        let Some(mut client) = self.client.take() else {
            return Err(DeliveryError::retryable("not connected"));
        };
        let result = self.write_with(&mut client, groups).await;
        self.client = Some(client);
        result
    }

    async fn write_with(
        &self,
        client: &mut Client,
        groups: &[(&str, Vec<&Event>)],
    ) -> Result<(), DeliveryError> {
        let tx = client.transaction().await.map_err(|e| {
            DeliveryError::retryable(format!(
                "target {}: cannot begin: {}",
                self.target,
                describe_pg_error(&e)
            ))
        })?;
        for (entity, events) in groups {
            let (Some(plan), Some(prepared)) =
                (self.plans.get(*entity), self.prepared.get(*entity))
            else {
                continue;
            };
            let (upserts, deletes): (Vec<&Event>, Vec<&Event>) = match self.cfg.delete_mode {
                DeleteMode::Soft => (events.clone(), Vec::new()),
                DeleteMode::Delete => events.iter().partition(|e| e.op == EventOp::Upsert),
            };
            if let (false, Some(stmt)) = (upserts.is_empty(), &prepared.upsert) {
                let keys: Vec<&str> = upserts.iter().map(|e| e.key.as_str()).collect();
                let versions = versions(&upserts, &self.target)?;
                let deleted: Vec<bool> = upserts.iter().map(|e| e.op == EventOp::Delete).collect();
                let ids: Vec<&str> = upserts.iter().map(|e| e.id.as_str()).collect();
                let times: Vec<CommitTime<'_>> =
                    upserts.iter().map(|e| CommitTime(&e.time)).collect();
                let data: Vec<Option<RawJsonb<'_>>> = upserts
                    .iter()
                    .map(|e| match e.op {
                        EventOp::Upsert => Some(RawJsonb(e.data.as_str())),
                        EventOp::Delete => None,
                    })
                    .collect();
                tx.execute(stmt, &[&keys, &versions, &deleted, &ids, &times, &data])
                    .await
                    .map_err(|e| self.classify(e, &plan.name, "writing to"))?;
            }
            if let (false, Some(stmt)) = (deletes.is_empty(), &prepared.delete) {
                let keys: Vec<&str> = deletes.iter().map(|e| e.key.as_str()).collect();
                let versions = versions(&deletes, &self.target)?;
                let ids: Vec<&str> = deletes.iter().map(|e| e.id.as_str()).collect();
                let times: Vec<CommitTime<'_>> =
                    deletes.iter().map(|e| CommitTime(&e.time)).collect();
                tx.execute(stmt, &[&keys, &versions, &ids, &times])
                    .await
                    .map_err(|e| self.classify(e, &plan.name, "deleting from"))?;
            }
        }
        tx.commit().await.map_err(|e| {
            DeliveryError::retryable(format!(
                "target {}: cannot commit the batch: {}",
                self.target,
                describe_pg_error(&e)
            ))
        })
    }

    async fn prepare(&mut self, entity: &str) -> Result<(), DeliveryError> {
        if self.prepared.contains_key(entity) {
            return Ok(());
        }
        let Some(plan) = self.plans.get(entity) else {
            return Err(DeliveryError::permanent(format!(
                "target {}: received an event for entity `{entity}` that it has no table for; \
                 add the entity to its entities",
                self.target
            )));
        };
        let Some(client) = self.client.as_ref() else {
            return Err(DeliveryError::retryable("not connected"));
        };
        let upsert = client
            .prepare(&upsert_sql(plan, self.cfg.delete_mode))
            .await
            .map_err(|e| self.classify(e, &plan.name, "preparing writes to"))?;
        let delete = match self.cfg.delete_mode {
            DeleteMode::Soft => None,
            DeleteMode::Delete => Some(
                client
                    .prepare(&delete_sql(plan))
                    .await
                    .map_err(|e| self.classify(e, &plan.name, "preparing deletes from"))?,
            ),
        };
        self.prepared.insert(
            entity.to_string(),
            Prepared {
                upsert: Some(upsert),
                delete,
            },
        );
        Ok(())
    }

    /// Connection problems and transient server states are retryable;
    /// schema and permission problems are not, and say what to do.
    fn classify(&self, e: tokio_postgres::Error, table: &str, doing: &str) -> DeliveryError {
        let Some(db) = e.as_db_error() else {
            return DeliveryError::retryable(format!(
                "target {}: lost the connection to {} while {doing} {table}: {}",
                self.target,
                self.conn.url_display,
                describe_pg_error(&e)
            ));
        };
        let code = db.code();
        let class = &code.code()[..2.min(code.code().len())];
        let mut detail = format!("{} (SQLSTATE {})", db.message(), code.code());
        if let Some(d) = db.detail() {
            detail.push_str(&format!(" (detail: {d})"));
        }
        if let Some(h) = db.hint() {
            detail.push_str(&format!(" (hint: {h})"));
        }
        let fix = if *code == SqlState::UNDEFINED_TABLE || *code == SqlState::INVALID_SCHEMA_NAME {
            format!(
                "; create the table (the README's PostgreSQL target section has the DDL) or set \
                 targets.{}.create_tables = true",
                self.target
            )
        } else if *code == SqlState::UNDEFINED_COLUMN {
            format!(
                "; the table lacks a column steward writes: add it (jsonb) or set \
                 targets.{}.create_tables = true to add missing columns",
                self.target
            )
        } else if *code == SqlState::INSUFFICIENT_PRIVILEGE {
            format!(
                "; grant the target user SELECT, INSERT, UPDATE, DELETE on {table} (and CREATE \
                 on the schema when create_tables = true)"
            )
        } else if *code == SqlState::INVALID_COLUMN_REFERENCE || code.code() == "42P10" {
            format!("; {table} needs a PRIMARY KEY or UNIQUE constraint on _key")
        } else if class == "23" {
            format!(
                "; a constraint on {table} rejects steward's rows: drop or relax it (steward \
                 writes only _key, the bookkeeping columns, data and the field columns)"
            )
        } else {
            String::new()
        };
        // Only data exceptions and integrity violations are about the events
        // themselves (the driver dead-letters those). Everything else — a
        // connection, a deadlock, but also a missing table or privilege, which
        // need a person — is retried, so fixing it delivers everything.
        let retryable = !matches!(class, "22" | "23");
        DeliveryError {
            retryable,
            message: format!(
                "target {}: {doing} {table} failed: {detail}{fix}",
                self.target
            ),
            retry_after: None,
            status: None,
        }
    }
}

/// Each entity's table (and tombstone table) and field columns.
fn table_plans(cfg: &PostgresTargetConfig, config: &Config) -> HashMap<String, TablePlan> {
    let mut plans = HashMap::new();
    for (entity, table) in &cfg.tables {
        let fields = config
            .entity(entity)
            .map(|e| {
                e.fields
                    .iter()
                    .map(|f| f.name.clone())
                    .filter(|n| !RESERVED.contains(&n.as_str()))
                    .collect()
            })
            .unwrap_or_default();
        plans.insert(
            entity.clone(),
            TablePlan {
                name: format!("{}.{table}", cfg.schema),
                table: format!("{}.{}", quote_ident(&cfg.schema), quote_ident(table)),
                tomb: format!(
                    "{}.{}",
                    quote_ident(&cfg.schema),
                    quote_ident(&format!("{table}__deleted"))
                ),
                fields,
            },
        );
    }
    plans
}

/// The target's connection described as a source, so that the source's
/// connection code (TLS modes, sslrootcert, Unix sockets, session
/// settings) is reused.
fn source_config(cfg: &PostgresTargetConfig) -> SourceConfig {
    let c = &cfg.conn;
    SourceConfig {
        url_display: c.url_display.clone(),
        host: c.host.clone(),
        port: c.port,
        other_hosts: c.other_hosts.clone(),
        target_session_attrs: c.target_session_attrs,
        user: c.user.clone(),
        dbname: c.dbname.clone(),
        password: c.password.clone(),
        sslmode: c.sslmode,
        sslrootcert: c.sslrootcert.clone(),
        connect_timeout: c.connect_timeout,
        slot: String::new(),
        publication: String::new(),
        status_interval: Duration::from_secs(10),
        create_publication: false,
        heartbeat_interval: None,
        streaming: true,
        failover: false,
        heartbeat_via: None,
    }
}

/// A document already serialized as JSON text, bound as a `jsonb`
/// parameter in the binary format (a version byte, then the text): the
/// server parses it once, where a `text` parameter cast with `::jsonb` is
/// parsed again at every cast. Invalid JSON is refused by the server as a
/// data exception (SQLSTATE 22P02), as the cast refused it.
#[derive(Debug)]
struct RawJsonb<'a>(&'a str);

impl tokio_postgres::types::ToSql for RawJsonb<'_> {
    fn to_sql(
        &self,
        _ty: &tokio_postgres::types::Type,
        out: &mut bytes::BytesMut,
    ) -> Result<tokio_postgres::types::IsNull, Box<dyn std::error::Error + Sync + Send>> {
        // jsonb's binary format version 1 is the JSON text.
        out.extend_from_slice(&[1]);
        out.extend_from_slice(self.0.as_bytes());
        Ok(tokio_postgres::types::IsNull::No)
    }

    fn accepts(ty: &tokio_postgres::types::Type) -> bool {
        *ty == tokio_postgres::types::Type::JSONB
    }

    tokio_postgres::types::to_sql_checked!();
}

/// An event's commit time bound as `timestamptz` in the binary format
/// (microseconds since 2000-01-01 UTC), so the server does not parse text
/// per row (a twentieth of its work per row, README Benchmarks). A time
/// that is not RFC 3339 is written as NULL instead of failing the batch.
#[derive(Debug)]
struct CommitTime<'a>(&'a str);

/// 2000-01-01T00:00:00Z in Unix microseconds.
const PG_EPOCH_UNIX_MICROS: i64 = 946_684_800_000_000;

impl CommitTime<'_> {
    fn pg_micros(&self) -> Option<i64> {
        match self.0 {
            "infinity" => Some(i64::MAX),
            "-infinity" => Some(i64::MIN),
            text => chrono::DateTime::parse_from_rfc3339(text)
                .ok()?
                .timestamp_micros()
                .checked_sub(PG_EPOCH_UNIX_MICROS),
        }
    }
}

impl tokio_postgres::types::ToSql for CommitTime<'_> {
    fn to_sql(
        &self,
        _ty: &tokio_postgres::types::Type,
        out: &mut bytes::BytesMut,
    ) -> Result<tokio_postgres::types::IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match self.pg_micros() {
            Some(micros) => {
                out.extend_from_slice(&micros.to_be_bytes());
                Ok(tokio_postgres::types::IsNull::No)
            }
            None => Ok(tokio_postgres::types::IsNull::Yes),
        }
    }

    fn accepts(ty: &tokio_postgres::types::Type) -> bool {
        *ty == tokio_postgres::types::Type::TIMESTAMPTZ
    }

    tokio_postgres::types::to_sql_checked!();
}

fn versions(events: &[&Event], target: &str) -> Result<Vec<i64>, DeliveryError> {
    events
        .iter()
        .map(|e| {
            i64::try_from(e.version).map_err(|_| {
                DeliveryError::permanent(format!(
                    "target {target}: event {} has version {} beyond bigint",
                    e.id, e.version
                ))
            })
        })
        .collect()
}

/// Groups the batch by entity (in first-seen order) keeping, per key, only
/// the newest change by (version, event id): the guard would discard the
/// older ones anyway, and one row may appear only once per statement.
fn newest_per_key(events: &[Event]) -> Result<Vec<(&str, Vec<&Event>)>, DeliveryError> {
    let mut groups: Vec<(&str, Vec<&Event>)> = Vec::new();
    let mut index: HashMap<(&str, &str), (usize, usize)> = HashMap::new();
    for event in events {
        let g = match groups.iter().position(|(e, _)| *e == event.entity) {
            Some(g) => g,
            None => {
                groups.push((&event.entity, Vec::new()));
                groups.len() - 1
            }
        };
        match index.get(&(event.entity.as_str(), event.key.as_str())) {
            Some(&(g, i)) => {
                let kept = groups[g].1[i];
                if (event.version, &event.id) > (kept.version, &kept.id) {
                    groups[g].1[i] = event;
                }
            }
            None => {
                groups[g].1.push(event);
                index.insert((&event.entity, &event.key), (g, groups[g].1.len() - 1));
            }
        }
    }
    Ok(groups)
}

/// `(_version, _event_id)` of the row (alias `t`) is older than the change (alias `x`/EXCLUDED).
/// Event ids are fixed-width hex, so "C" collation orders them as numbers.
fn older(row: &str, new: &str, new_version: &str, new_id: &str) -> String {
    format!(
        "({row}._version, {row}._event_id COLLATE \"C\") < ({new}.{new_version}, {new}.{new_id} COLLATE \"C\")"
    )
}

fn upsert_sql(plan: &TablePlan, mode: DeleteMode) -> String {
    let mut cols = String::from("_key, _version, _deleted, _event_id, _updated_at, data");
    let mut vals = String::from("x.k, x.v, x.d, x.e, x.u, x.j");
    let mut sets = String::from(
        "_version = EXCLUDED._version, _deleted = EXCLUDED._deleted, \
         _event_id = EXCLUDED._event_id, _updated_at = EXCLUDED._updated_at, \
         data = CASE WHEN EXCLUDED._deleted THEN t.data ELSE EXCLUDED.data END",
    );
    // The field columns come out of the parsed document in one call per
    // row: `jsonb_to_record` looks each name up as `->` does and gives SQL
    // NULL for a JSON null or a missing key, where five `NULLIF(x.j -> f,
    // 'null')` cost five lookups, five comparisons and ten calls (a seventh
    // of the backend's time per row, README Benchmarks). A delete's NULL
    // document gives a row of NULLs.
    let mut record = Vec::with_capacity(plan.fields.len());
    for f in &plan.fields {
        let q = quote_ident(f);
        cols.push_str(&format!(", {q}"));
        vals.push_str(&format!(", r.{q}"));
        record.push(format!("{q} jsonb"));
        sets.push_str(&format!(
            ", {q} = CASE WHEN EXCLUDED._deleted THEN t.{q} ELSE EXCLUDED.{q} END"
        ));
    }
    let fields = if record.is_empty() {
        String::new()
    } else {
        format!(
            " LEFT JOIN LATERAL jsonb_to_record(x.j) AS r({}) ON true",
            record.join(", ")
        )
    };
    let tomb_guard = match mode {
        DeleteMode::Soft => String::new(),
        DeleteMode::Delete => format!(
            " WHERE NOT EXISTS (SELECT 1 FROM {} z WHERE z._key = x.k AND NOT ({}))",
            plan.tomb,
            older("z", "x", "v", "e")
        ),
    };
    format!(
        "INSERT INTO {table} AS t ({cols}) \
         SELECT {vals} FROM unnest($1::text[], $2::int8[], $3::bool[], $4::text[], $5::timestamptz[], $6::jsonb[]) \
         AS x(k, v, d, e, u, j){fields}{tomb_guard} \
         ON CONFLICT (_key) DO UPDATE SET {sets} WHERE {guard}",
        table = plan.table,
        guard = older("t", "EXCLUDED", "_version", "_event_id"),
    )
}

fn delete_sql(plan: &TablePlan) -> String {
    format!(
        "WITH x AS (SELECT * FROM unnest($1::text[], $2::int8[], $3::text[], $4::timestamptz[]) AS x(k, v, e, u)), \
         tomb AS (INSERT INTO {tomb} AS z (_key, _version, _event_id, _deleted_at) \
           SELECT k, v, e, u FROM x \
           ON CONFLICT (_key) DO UPDATE SET _version = EXCLUDED._version, \
           _event_id = EXCLUDED._event_id, _deleted_at = EXCLUDED._deleted_at WHERE {tguard}) \
         DELETE FROM {table} AS t USING x WHERE t._key = x.k AND {guard}",
        tomb = plan.tomb,
        table = plan.table,
        tguard = older("z", "EXCLUDED", "_version", "_event_id"),
        guard = older("t", "x", "v", "e"),
    )
}

fn create_ddl(schema: &str, plan: &TablePlan, mode: DeleteMode) -> String {
    // One simple query runs as one transaction; the advisory lock makes
    // concurrent connections (max_in_flight, several steward processes) take
    // turns, since concurrent CREATE ... IF NOT EXISTS of one name can fail
    // with a unique violation in the catalog.
    let mut ddl = format!(
        "SELECT pg_advisory_xact_lock(hashtext('steward create_tables')); \
         CREATE SCHEMA IF NOT EXISTS {schema}; \
         CREATE TABLE IF NOT EXISTS {table} (_key text PRIMARY KEY, _version bigint NOT NULL, \
         _deleted boolean NOT NULL DEFAULT false, _event_id text, _updated_at timestamptz, data jsonb);",
        schema = quote_ident(schema),
        table = plan.table
    );
    for f in &plan.fields {
        ddl.push_str(&format!(
            " ALTER TABLE {} ADD COLUMN IF NOT EXISTS {} jsonb;",
            plan.table,
            quote_ident(f)
        ));
    }
    if mode == DeleteMode::Delete {
        ddl.push_str(&format!(
            " CREATE TABLE IF NOT EXISTS {} (_key text PRIMARY KEY, _version bigint NOT NULL, \
             _event_id text, _deleted_at timestamptz);",
            plan.tomb
        ));
    }
    ddl
}

#[cfg(test)]
mod tests {
    use super::*;
    use steward_core::model::Lsn;

    fn ev(key: &str, lsn: u64, idx: u32) -> Event {
        Event {
            change: None,
            tx_id: None,
            id: Event::source_id(Lsn(lsn), idx),
            entity: "product".into(),
            key: key.into(),
            op: EventOp::Upsert,
            version: lsn,
            time: String::new(),
            data: serde_json::Value::Null.into(),
        }
    }

    #[test]
    fn commit_times_bind_as_microseconds_since_2000() {
        let micros = |t: &str| CommitTime(t).pg_micros();
        assert_eq!(micros("2000-01-01T00:00:00.000000Z"), Some(0));
        assert_eq!(micros("1999-12-31T23:59:59.999999Z"), Some(-1));
        assert_eq!(
            micros(&steward_core::model::value::pg_micros_to_rfc3339(
                767_880_000_123_456
            )),
            Some(767_880_000_123_456)
        );
        assert_eq!(
            micros("2024-05-01T14:00:00+02:00"),
            micros("2024-05-01T12:00:00Z")
        );
        assert_eq!(micros("infinity"), Some(i64::MAX));
        assert_eq!(micros("-infinity"), Some(i64::MIN));
        assert_eq!(micros(""), None);
        assert_eq!(micros("yesterday"), None);
    }

    #[test]
    fn keeps_the_newest_change_per_key() {
        let events = vec![
            ev("1", 5, 0),
            ev("2", 5, 1),
            ev("1", 9, 0),
            ev("1", 9, 3),
            ev("1", 7, 0),
        ];
        let groups = newest_per_key(&events).expect("groups");
        assert_eq!(groups.len(), 1);
        let kept: Vec<(&str, &str)> = groups[0]
            .1
            .iter()
            .map(|e| (e.key.as_str(), e.id.as_str()))
            .collect();
        assert_eq!(
            kept,
            vec![
                ("1", Event::source_id(Lsn(9), 3).as_str()),
                ("2", Event::source_id(Lsn(5), 1).as_str())
            ]
        );
    }
}
