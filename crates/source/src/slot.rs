//! Setup checks run before streaming, on an ordinary (non-replication)
//! connection: `wal_level`, the publication and the tables it covers, the
//! replication slot, and the replica identity of the published tables.
//!
//! Every failure is an operator-facing [`SetupError`] that names what is wrong
//! and the SQL that fixes it, because these are the errors people meet on the
//! first run against a real database.

use tokio_postgres::Client;

use steward_core::model::Lsn;
use steward_postgres::quote_ident;

/// The output plugin steward decodes.
pub(crate) const PLUGIN: &str = "pgoutput";

/// A setup check that failed; the message says what to change, usually with
/// the SQL to run.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// A catalog query failed.
    #[error("{what}: {detail}")]
    Query {
        /// What steward was checking.
        what: String,
        /// The server's message with detail and hint.
        detail: String,
    },
    /// `wal_level` is not `logical`.
    #[error("wal_level is {actual:?}, but logical replication needs wal_level = logical; fix: ALTER SYSTEM SET wal_level = logical; then restart PostgreSQL")]
    WalLevel {
        /// The current setting.
        actual: String,
    },
    /// Configured tables that do not exist.
    #[error("{}", missing_tables_message(.tables, .database))]
    MissingTables {
        /// `schema.table` names.
        tables: Vec<String>,
        /// The database looked in.
        database: String,
    },
    /// Configured relations that are not tables (views, sequences, ...).
    #[error("{}; only tables can be published", not_tables_message(.tables))]
    NotTables {
        /// `schema.table` and what it is instead.
        tables: Vec<(String, String)>,
    },
    /// The publication does not exist and steward may not create it.
    #[error("publication {name:?} does not exist; create it (as the tables' owner or a superuser) with: {statement}; or let steward create it with create_publication = true in the source configuration")]
    PublicationMissing {
        /// The publication.
        name: String,
        /// SQL that creates it.
        statement: String,
    },
    /// The publication leaves out inserts, updates or deletes.
    #[error("publication {name:?} does not publish {}; steward needs insert, update and delete; fix: {statement}", .missing.join(", "))]
    PublicationActions {
        /// The publication.
        name: String,
        /// The actions it leaves out.
        missing: Vec<&'static str>,
        /// SQL that fixes it.
        statement: String,
    },
    /// The publication leaves out configured tables that steward could not
    /// add itself.
    #[error("publication {name:?} does not cover {}{reason}; fix (as its owner or a superuser): {statement}", .tables.join(", "))]
    PublicationTables {
        /// The publication.
        name: String,
        /// `schema.table` names it lacks.
        tables: Vec<String>,
        /// Why steward did not add them itself.
        reason: String,
        /// SQL that adds them.
        statement: String,
    },
    /// A slot of that name exists and is a physical one.
    #[error("replication slot {slot:?} is a physical slot, but steward needs a logical one; pick another slot name or drop it with SELECT pg_drop_replication_slot('{slot}')")]
    SlotPhysical {
        /// The slot's name.
        slot: String,
    },
    /// A slot of that name exists with another output plugin.
    #[error("replication slot {slot:?} uses output plugin {plugin:?}, but steward needs {PLUGIN:?}; pick another slot name or drop it with SELECT pg_drop_replication_slot('{slot}')")]
    SlotPlugin {
        /// The slot's name.
        slot: String,
        /// Its output plugin.
        plugin: String,
    },
    /// A slot of that name exists in another database.
    #[error("replication slot {slot:?} belongs to database {actual:?}, but steward reads database {expected:?}; pick another slot name or drop it (connected to {actual:?}) with SELECT pg_drop_replication_slot('{slot}')")]
    SlotDatabase {
        /// The slot's name.
        slot: String,
        /// The database it belongs to.
        actual: String,
        /// The configured database.
        expected: String,
    },
    /// The slot lost WAL it needed (`wal_status = lost`).
    #[error("replication slot {slot:?} has lost WAL it still needed (wal_status = lost), so changes were missed; drop it with SELECT pg_drop_replication_slot('{slot}') and start again from a fresh snapshot (consider raising max_slot_wal_keep_size)")]
    SlotLost {
        /// The slot's name.
        slot: String,
    },
    /// The server returned something that should be an LSN and is not.
    #[error("the server returned {what} {value:?}, which is not an LSN")]
    BadLsn {
        /// Which value.
        what: &'static str,
        /// The text returned.
        value: String,
    },
}

fn missing_tables_message(tables: &[String], database: &str) -> String {
    match tables {
        [one] => format!(
            "table {one} does not exist in database {database}; check the schema and table names in the configuration"
        ),
        many => format!(
            "tables {} do not exist in database {database}; check the schema and table names in the configuration",
            many.join(", ")
        ),
    }
}

fn not_tables_message(tables: &[(String, String)]) -> String {
    let parts: Vec<String> = tables
        .iter()
        .map(|(name, kind)| format!("{name} is a {kind}, not a table"))
        .collect();
    parts.join("; ")
}

/// What [`ensure_publication`] found or did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublicationStatus {
    pub(crate) name: String,
    /// steward created the publication just now.
    pub(crate) created: bool,
    /// Tables steward added to an existing publication just now.
    pub(crate) added_tables: Vec<(String, String)>,
    /// `FOR ALL TABLES`: steward will also receive (and ignore) other tables' changes.
    pub(crate) all_tables: bool,
    pub(crate) publishes_truncate: bool,
    /// Things that work but deserve the operator's attention (row filters, column lists).
    pub(crate) warnings: Vec<String>,
}

/// One row of `pg_replication_slots`, plus the server's current WAL position.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotInfo {
    pub(crate) name: String,
    /// `logical` or `physical`.
    pub(crate) slot_type: String,
    /// Output plugin; `None` for a physical slot.
    pub(crate) plugin: Option<String>,
    /// Database of a logical slot.
    pub(crate) database: Option<String>,
    /// A session is streaming from the slot.
    pub active: bool,
    /// Server process of that session.
    pub active_pid: Option<i32>,
    /// A temporary slot (on a standby: a copy still being synchronised).
    pub temporary: bool,
    /// Position up to which the consumer confirmed it has the changes
    /// (logical slots).
    pub confirmed_flush_lsn: Option<Lsn>,
    pub(crate) restart_lsn: Option<Lsn>,
    /// `reserved`, `extended`, `unreserved` or `lost` (PostgreSQL 13+).
    pub wal_status: Option<String>,
    /// Bytes that can still be written before the slot risks losing WAL (PostgreSQL 13+).
    pub safe_wal_size: Option<i64>,
    /// The slot is a failover slot (PostgreSQL 17+; `None` before).
    pub failover: Option<bool>,
    /// This copy is synchronised from the primary (on a standby with
    /// `sync_replication_slots`; PostgreSQL 17+).
    pub synced: Option<bool>,
    /// Why the slot was invalidated, if it was (PostgreSQL 17+).
    pub invalidation_reason: Option<String>,
    pub(crate) current_wal_lsn: Lsn,
}

impl SlotInfo {
    /// WAL bytes the slot's consumer has not confirmed yet.
    pub fn lag_bytes(&self) -> Option<u64> {
        self.confirmed_flush_lsn
            .map(|c| self.current_wal_lsn.0.saturating_sub(c.0))
    }
}

fn query_err(what: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> SetupError {
    let what = what.into();
    move |e| SetupError::Query {
        what,
        detail: describe(&e),
    }
}

/// The server's message with detail and hint; `Display` of a tokio-postgres
/// error says only "db error".
fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let mut s = format!("{}: {}", db.severity(), db.message());
            if let Some(detail) = db.detail() {
                s.push_str(&format!(" ({detail})"));
            }
            if let Some(hint) = db.hint() {
                s.push_str(&format!("; hint: {hint}"));
            }
            s
        }
        None => {
            let mut s = e.to_string();
            let mut source = std::error::Error::source(e);
            while let Some(inner) = source {
                s.push_str(&format!(": {inner}"));
                source = inner.source();
            }
            s
        }
    }
}

fn qualified(schema: &str, table: &str) -> String {
    format!("{}.{}", quote_ident(schema), quote_ident(table))
}

/// `schema.table` as people write it in messages: quoted only where needed.
fn display_name(schema: &str, table: &str) -> String {
    let part = |s: &str| {
        let plain = !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
            && !s.as_bytes()[0].is_ascii_digit();
        if plain {
            s.to_string()
        } else {
            quote_ident(s)
        }
    };
    format!("{}.{}", part(schema), part(table))
}

fn table_list(tables: &[(String, String)]) -> String {
    tables
        .iter()
        .map(|(s, t)| qualified(s, t))
        .collect::<Vec<_>>()
        .join(", ")
}

fn parse_lsn(what: &'static str, value: Option<String>) -> Result<Option<Lsn>, SetupError> {
    value
        .map(|v| {
            v.parse::<Lsn>()
                .map_err(|_| SetupError::BadLsn { what, value: v })
        })
        .transpose()
}

async fn server_version_num(client: &Client) -> Result<i32, SetupError> {
    let row = client
        .query_one("SELECT current_setting('server_version_num')::int4", &[])
        .await
        .map_err(query_err("cannot read server_version_num"))?;
    Ok(row.get(0))
}

/// `wal_level` must be `logical`.
pub async fn check_wal_level(client: &Client) -> Result<(), SetupError> {
    let row = client
        .query_one("SELECT current_setting('wal_level')", &[])
        .await
        .map_err(query_err("cannot read wal_level"))?;
    let actual: String = row.get(0);
    if actual == "logical" {
        Ok(())
    } else {
        Err(SetupError::WalLevel { actual })
    }
}

/// Fails unless every table exists and is a table (plain or partitioned).
async fn check_tables_exist(
    client: &Client,
    tables: &[(String, String)],
) -> Result<(), SetupError> {
    let schemas: Vec<&str> = tables.iter().map(|(s, _)| s.as_str()).collect();
    let names: Vec<&str> = tables.iter().map(|(_, t)| t.as_str()).collect();
    let rows = client
        .query(
            "SELECT x.s, x.t, c.relkind::text, current_database()::text \
             FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS x(s, t, i) \
             LEFT JOIN pg_namespace n ON n.nspname = x.s \
             LEFT JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = x.t \
             ORDER BY x.i",
            &[&schemas, &names],
        )
        .await
        .map_err(query_err("cannot look up the configured tables"))?;
    let mut missing = Vec::new();
    let mut not_tables = Vec::new();
    let mut database = String::new();
    for row in rows {
        let (schema, table): (String, String) = (row.get(0), row.get(1));
        database = row.get(3);
        match row.get::<_, Option<String>>(2).as_deref() {
            None => missing.push(display_name(&schema, &table)),
            Some("r" | "p") => {}
            Some(kind) => {
                let kind = match kind {
                    "v" => "view",
                    "m" => "materialized view",
                    "f" => "foreign table",
                    "S" => "sequence",
                    "i" | "I" => "index",
                    "c" => "composite type",
                    "t" => "TOAST table",
                    _ => "relation of another kind",
                };
                not_tables.push((display_name(&schema, &table), kind.to_string()));
            }
        }
    }
    if !missing.is_empty() {
        return Err(SetupError::MissingTables {
            tables: missing,
            database,
        });
    }
    if !not_tables.is_empty() {
        return Err(SetupError::NotTables { tables: not_tables });
    }
    Ok(())
}

/// Makes sure publication `name` exists, publishes insert, update and delete,
/// and covers every table in `tables` (schema, table). With `create`, a missing
/// publication is created and missing tables are added (when our role owns it);
/// otherwise the error carries the statement to run.
pub async fn ensure_publication(
    client: &Client,
    name: &str,
    tables: &[(String, String)],
    create: bool,
) -> Result<PublicationStatus, SetupError> {
    check_tables_exist(client, tables).await?;
    let version = server_version_num(client).await?;
    let pub_name = quote_ident(name);
    let row = client
        .query_opt(
            "SELECT pubinsert, pubupdate, pubdelete, pubtruncate, puballtables, \
                    pg_has_role(pubowner, 'USAGE'), pg_get_userbyid(pubowner)::text \
             FROM pg_publication WHERE pubname = $1",
            &[&name],
        )
        .await
        .map_err(query_err(format!("cannot look up publication {name:?}")))?;
    let mut status = PublicationStatus {
        name: name.to_string(),
        created: false,
        added_tables: Vec::new(),
        all_tables: false,
        publishes_truncate: true,
        warnings: Vec::new(),
    };
    let Some(row) = row else {
        let statement = format!(
            "CREATE PUBLICATION {pub_name} FOR TABLE {}",
            table_list(tables)
        );
        if !create {
            return Err(SetupError::PublicationMissing {
                name: name.to_string(),
                statement,
            });
        }
        client
            .batch_execute(&statement)
            .await
            .map_err(query_err(format!(
                "cannot create the publication with: {statement}"
            )))?;
        status.created = true;
        return Ok(status);
    };

    let (insert, update, delete): (bool, bool, bool) = (row.get(0), row.get(1), row.get(2));
    status.publishes_truncate = row.get(3);
    status.all_tables = row.get(4);
    let owned: bool = row.get(5);
    let owner: String = row.get(6);
    let missing_actions: Vec<&'static str> =
        [("insert", insert), ("update", update), ("delete", delete)]
            .into_iter()
            .filter(|(_, on)| !on)
            .map(|(action, _)| action)
            .collect();
    if !missing_actions.is_empty() {
        return Err(SetupError::PublicationActions {
            name: name.to_string(),
            missing: missing_actions,
            statement: format!(
                "ALTER PUBLICATION {pub_name} SET (publish = 'insert, update, delete, truncate')"
            ),
        });
    }

    // Row filters and column lists exist since PostgreSQL 15.
    let covered_sql = if version >= 150_000 {
        "SELECT schemaname::text, tablename::text, array_to_string(attnames, ', '), rowfilter \
         FROM pg_publication_tables WHERE pubname = $1"
    } else {
        "SELECT schemaname::text, tablename::text, NULL::text, NULL::text \
         FROM pg_publication_tables WHERE pubname = $1"
    };
    let covered = client
        .query(covered_sql, &[&name])
        .await
        .map_err(query_err(format!(
            "cannot list the tables of publication {name:?}"
        )))?;
    let mut uncovered: Vec<(String, String)> = tables.to_vec();
    for row in &covered {
        let (schema, table): (String, String) = (row.get(0), row.get(1));
        let Some(pos) = uncovered
            .iter()
            .position(|(s, t)| *s == schema && *t == table)
        else {
            continue;
        };
        uncovered.swap_remove(pos);
        let shown = display_name(&schema, &table);
        if let Some(filter) = row.get::<_, Option<String>>(3) {
            status.warnings.push(format!(
                "publication {name:?} has a row filter on {shown} (WHERE {filter}): changes to rows outside it never reach steward"
            ));
        }
        if version >= 150_000 {
            if let Some(columns) = row.get::<_, Option<String>>(2) {
                // attnames lists every column when there is no column list.
                let all = client
                    .query_one(
                        "SELECT count(*)::int4 FROM pg_attribute \
                         WHERE attrelid = ($1 || '.' || $2)::regclass AND attnum > 0 \
                           AND NOT attisdropped AND attgenerated = ''",
                        &[&quote_ident(&schema), &quote_ident(&table)],
                    )
                    .await
                    .map_err(query_err(format!("cannot count the columns of {shown}")))?;
                let total: i32 = all.get(0);
                let listed = columns.split(", ").count();
                if usize::try_from(total).is_ok_and(|t| listed < t) {
                    status.warnings.push(format!(
                        "publication {name:?} publishes only columns ({columns}) of {shown}: other columns never reach steward"
                    ));
                }
            }
        }
    }
    if uncovered.is_empty() {
        return Ok(status);
    }
    uncovered.sort();
    let names: Vec<String> = uncovered.iter().map(|(s, t)| display_name(s, t)).collect();
    let statement = format!(
        "ALTER PUBLICATION {pub_name} ADD TABLE {}",
        table_list(&uncovered)
    );
    let reason = if status.all_tables {
        // Should not happen (FOR ALL TABLES covers every table), but say so if it does.
        " although it is FOR ALL TABLES".to_string()
    } else if !create {
        String::new()
    } else if !owned {
        format!(" and steward's role does not own it (owner: {owner})")
    } else {
        client
            .batch_execute(&statement)
            .await
            .map_err(query_err(format!(
                "cannot add tables to the publication with: {statement}"
            )))?;
        status.added_tables = uncovered;
        return Ok(status);
    };
    Err(SetupError::PublicationTables {
        name: name.to_string(),
        tables: names,
        reason,
        statement,
    })
}

/// The server's current WAL position (on a standby: the last replayed one).
const CURRENT_LSN_SQL: &str =
    "(CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END)::text";

/// Whether the server is a standby (in recovery).
pub async fn in_recovery(client: &Client) -> Result<bool, SetupError> {
    let row = client
        .query_one("SELECT pg_is_in_recovery()", &[])
        .await
        .map_err(query_err("cannot ask the server whether it is a standby"))?;
    Ok(row.get(0))
}

/// A setting's value as the server reports it (`None` when it has no such setting).
pub async fn setting(client: &Client, name: &str) -> Result<Option<String>, SetupError> {
    let row = client
        .query_one("SELECT current_setting($1, true)", &[&name])
        .await
        .map_err(query_err(format!("cannot read the setting {name}")))?;
    Ok(row.get(0))
}

/// The server's current WAL position (on a standby: the last replayed one).
pub async fn current_wal_lsn(client: &Client) -> Result<Lsn, SetupError> {
    let row = client
        .query_one(&format!("SELECT {CURRENT_LSN_SQL}"), &[])
        .await
        .map_err(query_err("cannot read the current WAL position"))?;
    let text: Option<String> = row.get(0);
    parse_lsn("current WAL position", text)?.ok_or(SetupError::BadLsn {
        what: "current WAL position",
        value: "NULL".to_string(),
    })
}

/// The slot's row in `pg_replication_slots`, or `None` when there is no such slot.
pub async fn slot_info(client: &Client, slot: &str) -> Result<Option<SlotInfo>, SetupError> {
    let version = server_version_num(client).await?;
    let wal_columns = if version >= 130_000 {
        "wal_status::text, safe_wal_size::int8"
    } else {
        "NULL::text, NULL::int8"
    };
    let failover_columns = if version >= 170_000 {
        "failover, synced, invalidation_reason::text"
    } else {
        "NULL::bool, NULL::bool, NULL::text"
    };
    let sql = format!(
        "SELECT slot_name::text, slot_type::text, plugin::text, database::text, active, \
                active_pid::int4, temporary, confirmed_flush_lsn::text, restart_lsn::text, \
                {wal_columns}, {CURRENT_LSN_SQL}, {failover_columns} \
         FROM pg_replication_slots WHERE slot_name = $1"
    );
    let Some(row) = client
        .query_opt(&sql, &[&slot])
        .await
        .map_err(query_err(format!(
            "cannot look up replication slot {slot:?}"
        )))?
    else {
        return Ok(None);
    };
    let current = parse_lsn("current WAL position", row.get(11))?.unwrap_or(Lsn::ZERO);
    Ok(Some(SlotInfo {
        name: row.get(0),
        slot_type: row.get(1),
        plugin: row.get(2),
        database: row.get(3),
        active: row.get(4),
        active_pid: row.get(5),
        temporary: row.get(6),
        confirmed_flush_lsn: parse_lsn("confirmed_flush_lsn", row.get(7))?,
        restart_lsn: parse_lsn("restart_lsn", row.get(8))?,
        wal_status: row.get(9),
        safe_wal_size: row.get(10),
        failover: row.get(12),
        synced: row.get(13),
        invalidation_reason: row.get(14),
        current_wal_lsn: current,
    }))
}

/// An existing slot must be a logical `pgoutput` slot of `database` that has not lost WAL.
pub fn check_slot_compatible(info: &SlotInfo, database: &str) -> Result<(), SetupError> {
    let slot = info.name.clone();
    if info.slot_type != "logical" {
        return Err(SetupError::SlotPhysical { slot });
    }
    let plugin = info.plugin.as_deref().unwrap_or("");
    if plugin != PLUGIN {
        return Err(SetupError::SlotPlugin {
            slot,
            plugin: plugin.to_string(),
        });
    }
    let actual = info.database.as_deref().unwrap_or("");
    if actual != database {
        return Err(SetupError::SlotDatabase {
            slot,
            actual: actual.to_string(),
            expected: database.to_string(),
        });
    }
    if info.wal_status.as_deref() == Some("lost") {
        return Err(SetupError::SlotLost { slot });
    }
    Ok(())
}

/// Warnings about tables whose UPDATEs and DELETEs cannot be keyed: no primary
/// key under the default replica identity, identity NOTHING, or a dropped
/// identity index. (PostgreSQL rejects UPDATE and DELETE on such a table once
/// a publication that publishes them covers it, which would break Odoo.)
pub async fn replica_identity_report(
    client: &Client,
    tables: &[(String, String)],
) -> Result<Vec<String>, SetupError> {
    check_tables_exist(client, tables).await?;
    let schemas: Vec<&str> = tables.iter().map(|(s, _)| s.as_str()).collect();
    let names: Vec<&str> = tables.iter().map(|(_, t)| t.as_str()).collect();
    let rows = client
        .query(
            "SELECT x.s, x.t, c.relreplident::text, \
                    EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary), \
                    EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisreplident) \
             FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS x(s, t, i) \
             JOIN pg_namespace n ON n.nspname = x.s \
             JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = x.t \
             ORDER BY x.i",
            &[&schemas, &names],
        )
        .await
        .map_err(query_err("cannot read the replica identity of the configured tables"))?;
    let mut warnings = Vec::new();
    for row in rows {
        let (schema, table): (String, String) = (row.get(0), row.get(1));
        let ident: String = row.get(2);
        let (has_pk, has_ident_index): (bool, bool) = (row.get(3), row.get(4));
        let shown = display_name(&schema, &table);
        let sql_name = qualified(&schema, &table);
        let unkeyed = "UPDATE and DELETE on it fail while it is published, and steward cannot key its changes";
        match ident.as_str() {
            "d" if !has_pk => warnings.push(format!(
                "{shown} has no primary key (replica identity DEFAULT): {unkeyed}; add a primary key or run ALTER TABLE {sql_name} REPLICA IDENTITY FULL"
            )),
            "n" => warnings.push(format!(
                "{shown} has replica identity NOTHING: {unkeyed}; run ALTER TABLE {sql_name} REPLICA IDENTITY DEFAULT (it needs a primary key) or REPLICA IDENTITY FULL"
            )),
            "i" if !has_ident_index => warnings.push(format!(
                "{shown} has replica identity USING INDEX but the index is gone: {unkeyed}; run ALTER TABLE {sql_name} REPLICA IDENTITY DEFAULT"
            )),
            "f" => warnings.push(format!(
                "{shown} has replica identity FULL: this works, but every UPDATE and DELETE writes the whole old row to the WAL"
            )),
            _ => {}
        }
    }
    Ok(warnings)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::OnceLock;
    use steward_devkit::cluster::{DevCluster, DevClusterOptions};

    fn cluster() -> &'static DevCluster {
        static CLUSTER: OnceLock<DevCluster> = OnceLock::new();
        CLUSTER.get_or_init(|| {
            DevCluster::start(DevClusterOptions {
                fsync: false,
                ..Default::default()
            })
            .expect("dev cluster starts")
        })
    }

    /// A fresh database with the Odoo fixture, and a client connected to it.
    async fn odoo_db() -> (String, Client) {
        static N: AtomicUsize = AtomicUsize::new(0);
        let db = format!("slot_t{}", N.fetch_add(1, Ordering::SeqCst));
        let name = db.clone();
        tokio::task::spawn_blocking(move || {
            let c = cluster();
            c.create_database(&name)?;
            c.load_odoo_fixture(&name)
        })
        .await
        .unwrap()
        .unwrap();
        (db.clone(), connect(&cluster().url(&db)).await)
    }

    async fn connect(url: &str) -> Client {
        let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .expect("connect");
        tokio::spawn(conn);
        client
    }

    fn t(schema: &str, table: &str) -> (String, String) {
        (schema.to_string(), table.to_string())
    }

    async fn published(client: &Client, publication: &str) -> Vec<String> {
        let rows = client
            .query(
                "SELECT schemaname || '.' || tablename FROM pg_publication_tables \
                 WHERE pubname = $1 ORDER BY 1",
                &[&publication],
            )
            .await
            .unwrap();
        rows.iter().map(|r| r.get(0)).collect()
    }

    #[tokio::test]
    async fn wal_level_logical_passes() {
        let (_, client) = odoo_db().await;
        check_wal_level(&client).await.unwrap();
    }

    #[tokio::test]
    async fn wal_level_replica_fails_with_the_fix() {
        let replica = tokio::task::spawn_blocking(|| {
            DevCluster::start(DevClusterOptions {
                fsync: false,
                extra_settings: vec![("wal_level".into(), "replica".into())],
                ssl: false,
            })
        })
        .await
        .unwrap()
        .unwrap();
        let client = connect(&replica.url("postgres")).await;
        let err = check_wal_level(&client).await.unwrap_err();
        assert!(matches!(&err, SetupError::WalLevel { actual } if actual == "replica"));
        let msg = err.to_string();
        assert!(
            msg.contains("ALTER SYSTEM SET wal_level = logical; then restart PostgreSQL"),
            "{msg}"
        );
        drop(client);
        tokio::task::spawn_blocking(move || drop(replica))
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn creates_a_missing_publication() {
        let (_, client) = odoo_db().await;
        let tables = [t("public", "product_template"), t("public", "res_partner")];
        let status = ensure_publication(&client, "steward", &tables, true)
            .await
            .unwrap();
        assert!(status.created);
        assert!(status.warnings.is_empty());
        assert_eq!(
            published(&client, "steward").await,
            ["public.product_template", "public.res_partner"]
        );
        // A second run finds it complete and changes nothing.
        let status = ensure_publication(&client, "steward", &tables, true)
            .await
            .unwrap();
        assert!(!status.created && status.added_tables.is_empty());
        assert!(status.publishes_truncate);
    }

    #[tokio::test]
    async fn missing_publication_without_create_gives_the_statement() {
        let (_, client) = odoo_db().await;
        let tables = [t("public", "uom_uom")];
        let err = ensure_publication(&client, "Pub \"x\"", &tables, false)
            .await
            .unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains(r#"CREATE PUBLICATION "Pub ""x""" FOR TABLE "public"."uom_uom""#),
            "{msg}"
        );
        // The quoted statement is valid SQL.
        let status = ensure_publication(&client, "Pub \"x\"", &tables, true)
            .await
            .unwrap();
        assert!(status.created);
        assert_eq!(published(&client, "Pub \"x\"").await, ["public.uom_uom"]);
    }

    #[tokio::test]
    async fn adds_missing_tables_only_when_allowed() {
        let (_, client) = odoo_db().await;
        client
            .batch_execute("CREATE PUBLICATION p FOR TABLE product_template")
            .await
            .unwrap();
        let tables = [t("public", "product_template"), t("public", "uom_uom")];
        let err = ensure_publication(&client, "p", &tables, false)
            .await
            .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("does not cover public.uom_uom;"), "{msg}");
        assert!(
            msg.contains(r#"ALTER PUBLICATION "p" ADD TABLE "public"."uom_uom""#),
            "{msg}"
        );
        let status = ensure_publication(&client, "p", &tables, true)
            .await
            .unwrap();
        assert!(!status.created);
        assert_eq!(status.added_tables, [t("public", "uom_uom")]);
        assert_eq!(
            published(&client, "p").await,
            ["public.product_template", "public.uom_uom"]
        );
    }

    #[tokio::test]
    async fn does_not_alter_a_publication_it_does_not_own() {
        let (db, client) = odoo_db().await;
        client
            .batch_execute(
                "CREATE PUBLICATION theirs FOR TABLE product_template; \
                 CREATE ROLE steward_app LOGIN; \
                 GRANT SELECT ON ALL TABLES IN SCHEMA public TO steward_app",
            )
            .await
            .unwrap();
        let url = format!("postgres://steward_app@127.0.0.1:{}/{db}", cluster().port());
        let app = connect(&url).await;
        let tables = [t("public", "product_template"), t("public", "res_partner")];
        let err = ensure_publication(&app, "theirs", &tables, true)
            .await
            .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("does not own it (owner: postgres)"), "{msg}");
        assert!(msg.contains("public.res_partner"), "{msg}");
    }

    #[tokio::test]
    async fn publication_must_publish_updates_and_deletes() {
        let (_, client) = odoo_db().await;
        client
            .batch_execute("CREATE PUBLICATION ins FOR TABLE uom_uom WITH (publish = 'insert')")
            .await
            .unwrap();
        let err = ensure_publication(&client, "ins", &[t("public", "uom_uom")], true)
            .await
            .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("does not publish update, delete"), "{msg}");
        assert!(
            msg.contains("SET (publish = 'insert, update, delete, truncate')"),
            "{msg}"
        );
    }

    #[tokio::test]
    async fn all_tables_publication_covers_everything() {
        let (_, client) = odoo_db().await;
        client
            .batch_execute("CREATE PUBLICATION everything FOR ALL TABLES")
            .await
            .unwrap();
        let status = ensure_publication(&client, "everything", &[t("public", "mrp_bom")], false)
            .await
            .unwrap();
        assert!(status.all_tables && !status.created);
    }

    #[tokio::test]
    async fn warns_about_row_filters_and_column_lists() {
        let (_, client) = odoo_db().await;
        if server_version_num(&client).await.unwrap() < 150_000 {
            return;
        }
        client
            .batch_execute(
                "CREATE PUBLICATION filtered FOR TABLE uom_uom WHERE (active), \
                 product_category (id, name)",
            )
            .await
            .unwrap();
        let tables = [t("public", "uom_uom"), t("public", "product_category")];
        let status = ensure_publication(&client, "filtered", &tables, false)
            .await
            .unwrap();
        assert_eq!(status.warnings.len(), 2, "{:?}", status.warnings);
        assert!(status.warnings[0].contains("row filter on public.uom_uom"));
        assert!(status.warnings[1].contains("only columns (id, name) of public.product_category"));
    }

    #[tokio::test]
    async fn nonexistent_tables_are_named() {
        let (db, client) = odoo_db().await;
        let err = ensure_publication(&client, "p", &[t("public", "product_templat")], true)
            .await
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("table public.product_templat does not exist in database {db}; check the schema and table names in the configuration")
        );
        let err = replica_identity_report(
            &client,
            &[t("public", "uom_uom"), t("odoo", "x"), t("public", "Y")],
        )
        .await
        .unwrap_err();
        assert!(
            err.to_string().starts_with(&format!(
                "tables odoo.x, public.\"Y\" do not exist in database {db}"
            )),
            "{err}"
        );
        client
            .batch_execute("CREATE VIEW v AS SELECT 1 AS one")
            .await
            .unwrap();
        let err = ensure_publication(&client, "p", &[t("public", "v")], true)
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains("public.v is a view, not a table"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn quotes_odd_schema_and_table_names() {
        let (_, client) = odoo_db().await;
        client
            .batch_execute(r#"CREATE SCHEMA "My Schema"; CREATE TABLE "My Schema"."T ""q""" (id int PRIMARY KEY)"#)
            .await
            .unwrap();
        let tables = [t("My Schema", "T \"q\"")];
        ensure_publication(&client, "odd", &tables, true)
            .await
            .unwrap();
        assert_eq!(published(&client, "odd").await, ["My Schema.T \"q\""]);
        assert!(replica_identity_report(&client, &tables)
            .await
            .unwrap()
            .is_empty());
    }

    #[tokio::test]
    async fn slot_info_sees_a_new_slot() {
        let (db, client) = odoo_db().await;
        let slot = format!("{db}_s");
        assert_eq!(slot_info(&client, &slot).await.unwrap(), None);
        let before = current_wal_lsn(&client).await.unwrap();
        assert!(before > Lsn::ZERO);
        client
            .query(
                "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
                &[&slot],
            )
            .await
            .unwrap();
        let info = slot_info(&client, &slot)
            .await
            .unwrap()
            .expect("slot exists");
        assert_eq!(info.name, slot);
        assert_eq!(info.slot_type, "logical");
        assert_eq!(info.plugin.as_deref(), Some("pgoutput"));
        assert_eq!(info.database.as_deref(), Some(db.as_str()));
        assert!(!info.active && info.active_pid.is_none() && !info.temporary);
        let confirmed = info.confirmed_flush_lsn.expect("confirmed_flush_lsn");
        assert!(confirmed >= before);
        assert!(info.restart_lsn.is_some());
        assert!(info.current_wal_lsn >= confirmed);
        assert_eq!(info.wal_status.as_deref(), Some("reserved"));
        assert!(info.lag_bytes().is_some());
        check_slot_compatible(&info, &db).unwrap();
        let err = check_slot_compatible(&info, "other").unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains(&format!("belongs to database \"{db}\"")),
            "{msg}"
        );
        assert!(
            msg.contains(&format!("pg_drop_replication_slot('{slot}')")),
            "{msg}"
        );
        let lost = SlotInfo {
            wal_status: Some("lost".into()),
            ..info
        };
        assert!(matches!(
            check_slot_compatible(&lost, &db),
            Err(SetupError::SlotLost { .. })
        ));
        client
            .query("SELECT pg_drop_replication_slot($1)", &[&slot])
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn other_plugins_and_physical_slots_are_incompatible() {
        let (db, client) = odoo_db().await;
        let slot = format!("{db}_td");
        client
            .query(
                "SELECT pg_create_logical_replication_slot($1, 'test_decoding')",
                &[&slot],
            )
            .await
            .unwrap();
        let info = slot_info(&client, &slot).await.unwrap().unwrap();
        let msg = check_slot_compatible(&info, &db).unwrap_err().to_string();
        assert!(msg.contains("\"test_decoding\""), "{msg}");
        assert!(msg.contains("\"pgoutput\""), "{msg}");
        assert!(
            msg.contains(&format!("SELECT pg_drop_replication_slot('{slot}')")),
            "{msg}"
        );

        let physical = format!("{db}_ph");
        client
            .query(
                "SELECT pg_create_physical_replication_slot($1)",
                &[&physical],
            )
            .await
            .unwrap();
        let info = slot_info(&client, &physical).await.unwrap().unwrap();
        assert_eq!(info.plugin, None);
        assert!(matches!(
            check_slot_compatible(&info, &db),
            Err(SetupError::SlotPhysical { .. })
        ));
        for s in [&slot, &physical] {
            client
                .query("SELECT pg_drop_replication_slot($1)", &[s])
                .await
                .unwrap();
        }
    }

    #[tokio::test]
    async fn replica_identity_warnings() {
        let (_, client) = odoo_db().await;
        let odoo = [
            t("public", "product_template"),
            t("public", "res_partner"),
            t("public", "product_taxes_rel"),
        ];
        assert!(replica_identity_report(&client, &odoo)
            .await
            .unwrap()
            .is_empty());
        client
            .batch_execute(
                "CREATE TABLE nopk (a int); \
                 CREATE TABLE full_t (id int PRIMARY KEY); ALTER TABLE full_t REPLICA IDENTITY FULL; \
                 CREATE TABLE nothing_t (id int PRIMARY KEY); ALTER TABLE nothing_t REPLICA IDENTITY NOTHING; \
                 CREATE TABLE idx_t (id int NOT NULL); CREATE UNIQUE INDEX idx_t_id ON idx_t (id); \
                 ALTER TABLE idx_t REPLICA IDENTITY USING INDEX idx_t_id",
            )
            .await
            .unwrap();
        let tables = [
            t("public", "nopk"),
            t("public", "full_t"),
            t("public", "nothing_t"),
            t("public", "idx_t"),
        ];
        let warnings = replica_identity_report(&client, &tables).await.unwrap();
        assert_eq!(warnings.len(), 3, "{warnings:?}");
        assert!(warnings[0].starts_with("public.nopk has no primary key"));
        assert!(warnings[0].contains("ALTER TABLE \"public\".\"nopk\" REPLICA IDENTITY FULL"));
        assert!(warnings[1].starts_with("public.full_t has replica identity FULL"));
        assert!(warnings[2].starts_with("public.nothing_t has replica identity NOTHING"));
    }

    #[test]
    fn lsn_parsing_errors_name_the_value() {
        let err = parse_lsn("restart_lsn", Some("nope".into())).unwrap_err();
        assert_eq!(
            err.to_string(),
            "the server returned restart_lsn \"nope\", which is not an LSN"
        );
        assert_eq!(parse_lsn("x", None).unwrap(), None);
        assert_eq!(parse_lsn("x", Some("0/10".into())).unwrap(), Some(Lsn(16)));
    }
}
