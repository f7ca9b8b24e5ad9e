//! `steward setup-sql -c FILE`: the SQL an administrator runs once so that
//! steward can run with least privilege — a dedicated `LOGIN REPLICATION`
//! role that may read exactly the configured tables, and a publication for
//! exactly them owned by the administrator (steward then runs with
//! `source.create_publication = false`).

use std::fmt::Write as _;

use steward_core::config::Config;
use steward_postgres::quote_ident;

/// The SQL script for `config`.
pub(super) fn script(config: &Config) -> String {
    let source = &config.source;
    let role = quote_ident(&source.user);
    let mut tables: Vec<(String, String)> = config
        .entities
        .iter()
        .map(|e| (e.schema.clone(), e.table.clone()))
        .collect();
    tables.sort();
    tables.dedup();
    let mut schemas: Vec<&str> = tables.iter().map(|(s, _)| s.as_str()).collect();
    schemas.dedup();
    let table_list = tables
        .iter()
        .map(|(s, t)| format!("{}.{}", quote_ident(s), quote_ident(t)))
        .collect::<Vec<_>>()
        .join(", ");

    let mut out = String::new();
    let _ = writeln!(
        out,
        "-- steward: one-time setup for {url}\n\
         -- Run as a superuser (or the tables' owner with CREATEROLE), connected to database {db}:\n\
         --   psql -d {db} -f setup.sql\n\
         -- Then set steward's password (psql: \\password {user}) and put it in the file\n\
         -- source.password_file names. The configuration must keep create_publication = false.\n",
        url = source.url_display,
        db = quote_ident(&source.dbname),
        user = role,
    );
    let _ = writeln!(
        out,
        "-- A dedicated role: may log in and stream the WAL, nothing else.\n\
         CREATE ROLE {role} LOGIN REPLICATION;\n\
         GRANT CONNECT ON DATABASE {db} TO {role};",
        db = quote_ident(&source.dbname)
    );
    for schema in &schemas {
        let _ = writeln!(
            out,
            "GRANT USAGE ON SCHEMA {} TO {role};",
            quote_ident(schema)
        );
    }
    let _ = writeln!(
        out,
        "-- Exactly the configured tables (the initial copy and the relation checks read them).\n\
         GRANT SELECT ON TABLE {table_list} TO {role};\n"
    );
    let _ = writeln!(
        out,
        "-- The publication, owned by the administrator: steward cannot widen it.\n\
         CREATE PUBLICATION {pub_} FOR TABLE {table_list};",
        pub_ = quote_ident(&source.publication)
    );
    if source.heartbeat_interval.is_some() {
        let _ = writeln!(
            out,
            "\n-- source.heartbeat_interval_ms is set: steward writes heartbeat messages to the WAL.\n\
             GRANT EXECUTE ON FUNCTION pg_logical_emit_message(boolean, text, text) TO {role};"
        );
    }
    if source.heartbeat_via.is_some() {
        let _ = writeln!(
            out,
            "\n-- source.heartbeat_url is set: on the primary it names, the heartbeats, and\n\
             -- pg_log_standby_snapshot() while steward creates its slot on a standby (optional:\n\
             -- without it the slot waits for the primary to log its running transactions).\n\
             GRANT EXECUTE ON FUNCTION pg_log_standby_snapshot() TO {role};"
        );
    }
    if source.failover {
        let _ = writeln!(
            out,
            "\n-- source.failover = true (PostgreSQL 17+): steward's slot is a failover slot.\n\
             -- On the primary, a physical slot per standby, and logical walsenders wait for them:\n\
             --   SELECT pg_create_physical_replication_slot('standby1');\n\
             --   ALTER SYSTEM SET synchronized_standby_slots = 'standby1';\n\
             --   SELECT pg_reload_conf();\n\
             -- On each standby (postgresql.conf), then restart it:\n\
             --   primary_slot_name = 'standby1'\n\
             --   primary_conninfo = '... dbname={db}'   # a dbname is required for slot sync\n\
             --   hot_standby_feedback = on\n\
             --   sync_replication_slots = on\n\
             -- List every server in source.url with target_session_attrs=read-write, e.g.\n\
             --   postgres://{user}@primary:5432,standby1:5432/{db}?target_session_attrs=read-write\n\
             -- `steward status` shows whether each standby's copy of the slot is failover-ready.",
            db = source.dbname,
            user = source.user,
        );
    }
    let _ = writeln!(
        out,
        "\n-- Later, after adding an entity to the configuration:\n\
         --   GRANT SELECT ON TABLE <schema>.<table> TO {role};\n\
         --   ALTER PUBLICATION {pub_} ADD TABLE <schema>.<table>;",
        pub_ = quote_ident(&source.publication)
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn script_names_exactly_the_configured_tables() {
        let dir = tempfile::tempdir().expect("tempdir");
        let text = r#"
[source]
url = "postgres://steward_ro@db/odoo"
publication = "steward_pub"
create_publication = false
[state]
path = "s.redb"
[entities.product]
table = "product_template"
fields = { name = "name" }
[entities.partner]
table = "crm.res_partner"
fields = { name = "name" }
[targets.t]
type = "http"
url = "http://localhost:1/x"
entities = ["product", "partner"]
"#;
        let config = steward_sinks::config::parse(text, &dir.path().join("c.toml"), dir.path())
            .expect("valid");
        let sql = script(&config);
        assert!(
            sql.contains("CREATE ROLE \"steward_ro\" LOGIN REPLICATION;"),
            "{sql}"
        );
        assert!(sql.contains("GRANT CONNECT ON DATABASE \"odoo\" TO \"steward_ro\";"));
        assert!(sql.contains("GRANT USAGE ON SCHEMA \"crm\" TO \"steward_ro\";"));
        assert!(sql.contains("GRANT USAGE ON SCHEMA \"public\" TO \"steward_ro\";"));
        assert!(sql.contains(
            "CREATE PUBLICATION \"steward_pub\" FOR TABLE \"crm\".\"res_partner\", \"public\".\"product_template\";"
        ));
        assert!(!sql.contains("SUPERUSER"));
        assert!(!sql.contains("pg_logical_emit_message"));
    }

    #[test]
    fn failover_and_standby_settings_are_spelled_out() {
        let dir = tempfile::tempdir().expect("tempdir");
        let text = r#"
[source]
url = "postgres://steward@db1,db2/odoo?target_session_attrs=read-write"
failover = true
heartbeat_url = "postgres://steward@db1/odoo"
[state]
path = "s.redb"
[entities.product]
table = "product_template"
fields = { name = "name" }
[targets.t]
type = "http"
url = "http://localhost:1/x"
entities = ["product"]
"#;
        let config = steward_sinks::config::parse(text, &dir.path().join("c.toml"), dir.path())
            .expect("valid");
        let sql = script(&config);
        for needed in [
            "synchronized_standby_slots",
            "sync_replication_slots = on",
            "hot_standby_feedback = on",
            "primary_slot_name",
            "dbname=odoo",
            "target_session_attrs=read-write",
            "GRANT EXECUTE ON FUNCTION pg_log_standby_snapshot() TO \"steward\";",
        ] {
            assert!(sql.contains(needed), "{needed}: {sql}");
        }
    }
}
