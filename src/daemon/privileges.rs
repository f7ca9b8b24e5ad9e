//! Start-up check that steward's role has what it needs — the REPLICATION
//! attribute and SELECT on every configured table — so a least-privilege
//! setup that misses a grant fails at once with the statement to run,
//! rather than later with a bare permission error (or never: logical
//! decoding itself does not check table privileges).

use anyhow::bail;

use steward_core::config::SourceConfig;
use steward_postgres::quote_ident;

fn db_message(e: &tokio_postgres::Error) -> String {
    e.as_db_error()
        .map(|d| d.message().to_string())
        .unwrap_or_else(|| e.to_string())
}

pub(super) async fn check(
    sql: &tokio_postgres::Client,
    source: &SourceConfig,
    tables: &[(String, String)],
) -> anyhow::Result<()> {
    let row = sql
        .query_one(
            "SELECT current_user::text, rolsuper, rolreplication FROM pg_roles WHERE rolname = current_user",
            &[],
        )
        .await
        .map_err(|e| anyhow::anyhow!("cannot read the attributes of steward's role: {}", db_message(&e)))?;
    let (user, superuser, replication): (String, bool, bool) = (row.get(0), row.get(1), row.get(2));
    if !superuser && !replication {
        bail!(
            "the role {user} of {} may not stream the WAL: it lacks the REPLICATION attribute. \
             As an administrator run: ALTER ROLE {} REPLICATION; (`steward setup-sql -c FILE` prints the whole setup)",
            source.url_display,
            quote_ident(&user)
        );
    }
    let mut missing = Vec::new();
    for (schema, table) in tables {
        let name = format!("{}.{}", quote_ident(schema), quote_ident(table));
        let row = sql
            .query_one(
                "SELECT CASE WHEN to_regclass($1) IS NULL THEN NULL \
                        ELSE has_table_privilege(to_regclass($1), 'SELECT') END",
                &[&name],
            )
            .await
            .map_err(|e| {
                anyhow::anyhow!("cannot check the privileges on {name}: {}", db_message(&e))
            })?;
        // NULL: no such table (or no USAGE on its schema); the publication check names it.
        if row.get::<_, Option<bool>>(0) == Some(false) {
            missing.push(name);
        }
    }
    if !missing.is_empty() {
        bail!(
            "the role {user} may not read {}: steward needs SELECT on every configured table. \
             As an administrator run: GRANT SELECT ON TABLE {} TO {};",
            missing.join(", "),
            missing.join(", "),
            quote_ident(&user)
        );
    }
    Ok(())
}
