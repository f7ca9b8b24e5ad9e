//! The keys of `[targets.NAME]` with `type = "postgres"`: the database
//! (a URL like `source.url`), schema, table names, delete mode and timeouts.

use std::path::PathBuf;
use std::time::Duration;

use steward_core::config::check::{
    check_sql_ident, check_sslrootcert, join, optional_secret, parse_pg_url, Errors, Reader,
};
use steward_core::config::{Secret, SslMode, TargetContext};

use crate::config::HOUR_MS;

pub(crate) const KEYS: &[&str] = &[
    "url",
    "password_file",
    "password_env",
    "schema",
    "table_prefix",
    "tables",
    "delete_mode",
    "create_tables",
    "timeout_ms",
    "connect_timeout_ms",
];

/// Built by `check` only, so the sink can rely on its rules.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub(crate) struct PostgresTargetConfig {
    pub(crate) conn: PgConnConfig,
    pub(crate) schema: String,
    /// Entity name → table name (prefix and per-entity overrides applied).
    pub(crate) tables: Vec<(String, String)>,
    pub(crate) delete_mode: DeleteMode,
    pub(crate) create_tables: bool,
    /// Longest one batch's transaction may take.
    pub(crate) timeout: Duration,
}

/// Connection settings for a PostgreSQL target, parsed like `source.url`.
#[derive(Clone, Debug)]
pub(crate) struct PgConnConfig {
    pub(crate) url_display: String,
    pub(crate) host: String,
    pub(crate) port: u16,
    pub(crate) other_hosts: Vec<steward_postgres::SourceHost>,
    pub(crate) target_session_attrs: steward_postgres::TargetSessionAttrs,
    pub(crate) user: String,
    pub(crate) dbname: String,
    pub(crate) password: Option<Secret>,
    pub(crate) sslmode: SslMode,
    pub(crate) sslrootcert: Option<PathBuf>,
    pub(crate) connect_timeout: Duration,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum DeleteMode {
    /// Keep the row with `_deleted = true` (a tombstone in place).
    Soft,
    /// Remove the row; a tombstone is kept in `<table>__deleted`.
    Delete,
}

pub(crate) fn check(
    target: &TargetContext,
    r: &Reader,
    errs: &mut Errors,
) -> Option<PostgresTargetConfig> {
    let (entities, base_dir) = (target.entities, target.base_dir);
    let url = r
        .required_string(
            "url",
            "the database to write to, e.g. url = \"postgres://steward@mdm-db:5432/mdm\"",
            errs,
        )
        .and_then(|u| parse_pg_url(u, &r.key("url"), errs));
    let sslrootcert = check_sslrootcert(r, url.as_ref(), base_dir, errs);
    let password = optional_secret(r, "password", base_dir, errs);

    let ident = |key: &str, value: &str, errs: &mut Errors| match check_sql_ident(value) {
        Ok(()) => Some(value.to_string()),
        Err(m) => {
            errs.add(key, m);
            None
        }
    };
    let schema = match r.string("schema", errs) {
        Some(s) => ident(&r.key("schema"), s, errs),
        None if r.has("schema") => None,
        None => Some("public".to_string()),
    };
    let prefix = match r.string("table_prefix", errs) {
        None if r.has("table_prefix") => None,
        p => Some(p.unwrap_or("").to_string()),
    };
    let overrides = match r.table("tables", errs) {
        None if r.has("tables") => None,
        None => Some(Vec::new()),
        Some(t) => {
            let mut ok = true;
            let mut out = Vec::new();
            for (entity, value) in t {
                let key = join(&r.key("tables"), entity);
                if let Some(list) = entities {
                    if !list.iter().any(|e| e == entity) {
                        errs.add(
                            &key,
                            format!(
                                "entity `{entity}` is not in this target's entities ({}); \
                                 remove it or add the entity",
                                list.join(", ")
                            ),
                        );
                        ok = false;
                        continue;
                    }
                }
                match value.as_str() {
                    Some(name) => match ident(&key, name, errs) {
                        Some(n) => out.push((entity.clone(), n)),
                        None => ok = false,
                    },
                    None => {
                        errs.add(&key, "expected a table name string");
                        ok = false;
                    }
                }
            }
            ok.then_some(out)
        }
    };
    let tables = match (entities, &prefix, &overrides) {
        (Some(list), Some(prefix), Some(overrides)) => {
            let mut ok = true;
            let mut out = Vec::new();
            for entity in list {
                let table = overrides
                    .iter()
                    .find(|(e, _)| e == entity)
                    .map(|(_, t)| t.clone())
                    .unwrap_or_else(|| format!("{prefix}{entity}"));
                // The tombstone table `<table>__deleted` must fit too.
                if let Err(m) = check_sql_ident(&format!("{table}__deleted")) {
                    errs.add(
                        &r.key("table_prefix"),
                        format!(
                            "table `{table}` for entity `{entity}` is not usable ({m}, counting \
                             the `__deleted` tombstone suffix); choose a shorter or lowercase \
                             prefix or name it in tables"
                        ),
                    );
                    ok = false;
                }
                out.push((entity.clone(), table));
            }
            ok.then_some(out)
        }
        _ => None,
    };
    let delete_mode = match r.string("delete_mode", errs) {
        None if r.has("delete_mode") => None,
        None | Some("soft") => Some(DeleteMode::Soft),
        Some("delete") => Some(DeleteMode::Delete),
        Some(other) => {
            errs.add(
                &r.key("delete_mode"),
                format!("unknown delete mode `{other}`; valid: soft, delete"),
            );
            None
        }
    };
    let create_tables = r.bool("create_tables", false, errs);
    let timeout = r.int("timeout_ms", 30_000, 1, HOUR_MS, "milliseconds", errs);
    let connect_timeout = r.int(
        "connect_timeout_ms",
        10_000,
        1,
        HOUR_MS,
        "milliseconds",
        errs,
    );
    let url = url?;
    Some(PostgresTargetConfig {
        conn: PgConnConfig {
            url_display: url.display,
            host: url.host,
            port: url.port,
            other_hosts: url.other_hosts,
            target_session_attrs: url.target_session_attrs,
            user: url.user,
            dbname: url.dbname,
            password: password?,
            sslmode: url.sslmode,
            sslrootcert: sslrootcert?,
            connect_timeout: url
                .connect_timeout
                .unwrap_or(Duration::from_millis(connect_timeout?)),
        },
        schema: schema?,
        tables: tables?,
        delete_mode: delete_mode?,
        create_tables: create_tables?,
        timeout: Duration::from_millis(timeout?),
    })
}
