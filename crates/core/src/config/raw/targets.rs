//! The type-specific keys of `[targets.NAME]`: which keys each `type` accepts,
//! and the checks for the postgres, nats and file targets and the HTTP
//! target's optional extras (envelope, signing, bearer token, TLS files).
//!
//! Secrets (passwords, tokens, signing keys) are read here, at load time, from
//! a file or an environment variable, never from the config text itself.

use std::path::Path;

use base64::Engine as _;

use super::pgurl::parse_pg_url;
use super::reader::{check_sql_ident, Errors, Reader};
use super::{ms, resolve, secret_from_env, secret_from_file, TARGET_KEYS};
use crate::config::{
    DeleteMode, Envelope, FileTargetConfig, HttpExtras, NatsAuth, NatsTargetConfig, PgConnConfig,
    PostgresTargetConfig, Secret, SecretBytes, TargetKind,
};

const HOUR_MS: u64 = 3_600_000;

const HTTP_KEYS: &[&str] = &[
    "url",
    "timeout_ms",
    "connect_timeout_ms",
    "headers",
    "envelope",
    "signing_secret_file",
    "signing_secret_env",
    "bearer_token_file",
    "bearer_token_env",
    "client_cert_file",
    "client_key_file",
    "ca_file",
];
const POSTGRES_KEYS: &[&str] = &[
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
const NATS_KEYS: &[&str] = &[
    "url",
    "subject",
    "envelope",
    "stream",
    "create_stream",
    "stream_subjects",
    "duplicate_window_ms",
    "token_file",
    "token_env",
    "user",
    "password_file",
    "password_env",
    "creds_file",
    "timeout_ms",
    "connect_timeout_ms",
];
const FILE_KEYS: &[&str] = &["path", "envelope", "max_bytes", "max_files"];

/// The keys valid for a target of type `declared`; for a missing or unknown
/// type every key of every type, so that only the type itself is reported.
pub(super) fn valid_keys(declared: Option<&str>) -> Vec<&'static str> {
    let own: &[&[&str]] = match declared {
        Some("http") => &[HTTP_KEYS],
        Some("postgres") => &[POSTGRES_KEYS],
        Some("nats") => &[NATS_KEYS],
        Some("file") => &[FILE_KEYS],
        _ => &[HTTP_KEYS, POSTGRES_KEYS, NATS_KEYS, FILE_KEYS],
    };
    // The address key (url or path) right after type, as in the example file.
    let mut keys: Vec<&'static str> = vec!["type"];
    for list in own {
        if let Some(first) = list.first() {
            if !keys.contains(first) {
                keys.push(first);
            }
        }
    }
    for k in TARGET_KEYS.iter().chain(own.iter().flat_map(|l| l.iter())) {
        if !keys.contains(k) {
            keys.push(k);
        }
    }
    keys
}

fn envelope(r: &Reader, errs: &mut Errors) -> Option<Envelope> {
    match r.string("envelope", errs) {
        None if r.has("envelope") => None,
        None | Some("cloudevents") => Some(Envelope::CloudEvents),
        Some("debezium") => Some(Envelope::Debezium),
        Some(other) => {
            errs.add(
                &r.key("envelope"),
                format!("unknown envelope `{other}`; valid: cloudevents, debezium"),
            );
            None
        }
    }
}

/// A secret from `<base>_file` or `<base>_env` (at most one); `Some(None)` when neither is set.
fn optional_secret(
    r: &Reader,
    base: &str,
    base_dir: &Path,
    errs: &mut Errors,
) -> Option<Option<Secret>> {
    let (fkey, ekey) = (format!("{base}_file"), format!("{base}_env"));
    let file = r.string(&fkey, errs);
    let env = r.string(&ekey, errs);
    if (r.has(&fkey) && file.is_none()) || (r.has(&ekey) && env.is_none()) {
        return None;
    }
    match (file, env) {
        (Some(_), Some(_)) => {
            errs.add(
                &r.key(&ekey),
                format!("set only one of {} and {}", r.key(&fkey), r.key(&ekey)),
            );
            None
        }
        (Some(f), None) => secret_from_file(&r.key(&fkey), base_dir, f, errs).map(Some),
        (None, Some(e)) => secret_from_env(&r.key(&ekey), e, errs).map(Some),
        (None, None) => Some(None),
    }
}

/// A path that must name an existing file (resolved against the config's directory).
fn existing_file(
    r: &Reader,
    key: &str,
    base_dir: &Path,
    errs: &mut Errors,
) -> Option<Option<std::path::PathBuf>> {
    let Some(text) = r.string(key, errs) else {
        return if r.has(key) { None } else { Some(None) };
    };
    let path = resolve(base_dir, text);
    match std::fs::metadata(&path) {
        Ok(m) if m.is_file() => Some(Some(path)),
        Ok(_) => {
            errs.add(&r.key(key), format!("`{}` is not a file", path.display()));
            None
        }
        Err(e) => {
            errs.add(
                &r.key(key),
                format!(
                    "cannot read `{}`: {e}; check the path and its permissions",
                    path.display()
                ),
            );
            None
        }
    }
}

/// Standard Webhooks keys are often written `whsec_<base64>`: that form is
/// decoded to the key bytes; any other text is used as is.
pub(crate) fn signing_key(secret: &Secret) -> Result<SecretBytes, String> {
    match secret.expose().strip_prefix("whsec_") {
        Some(b64) => base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map(SecretBytes)
            .map_err(|_| {
                "starts with whsec_ but the rest is not valid base64; give the key exactly as \
                 the receiver issued it"
                    .to_string()
            }),
        None => Ok(SecretBytes(secret.expose().as_bytes().to_vec())),
    }
}

pub(super) fn check_http_extras(
    r: &Reader,
    base_dir: &Path,
    errs: &mut Errors,
) -> Option<HttpExtras> {
    let envelope = envelope(r, errs);
    let signing = optional_secret(r, "signing_secret", base_dir, errs);
    let signing_key = match signing {
        Some(Some(s)) => match signing_key(&s) {
            Ok(k) => Some(Some(k)),
            Err(m) => {
                let which = if r.has("signing_secret_file") {
                    "signing_secret_file"
                } else {
                    "signing_secret_env"
                };
                errs.add(&r.key(which), format!("the secret {m}"));
                None
            }
        },
        Some(None) => Some(None),
        None => None,
    };
    let bearer_token = optional_secret(r, "bearer_token", base_dir, errs);
    if let Some(Some(t)) = &bearer_token {
        if http::header::HeaderValue::from_str(&format!("Bearer {}", t.expose())).is_err() {
            errs.add(
                &r.key("bearer_token_file"),
                "the token is not valid in an HTTP header (no newlines or control characters)",
            );
        }
    }
    let cert = existing_file(r, "client_cert_file", base_dir, errs);
    let key = existing_file(r, "client_key_file", base_dir, errs);
    let client_identity = match (cert, key) {
        (Some(Some(c)), Some(Some(k))) => Some(Some((c, k))),
        (Some(None), Some(None)) => Some(None),
        (Some(Some(_)), Some(None)) => {
            errs.add(
                &r.key("client_key_file"),
                "missing; client_cert_file needs the matching private key (PEM)",
            );
            None
        }
        (Some(None), Some(Some(_))) => {
            errs.add(
                &r.key("client_cert_file"),
                "missing; client_key_file needs the matching certificate chain (PEM)",
            );
            None
        }
        _ => None,
    };
    let ca_file = existing_file(r, "ca_file", base_dir, errs);
    Some(HttpExtras {
        envelope: envelope?,
        signing_key: signing_key?,
        bearer_token: bearer_token?,
        client_identity: client_identity?,
        ca_file: ca_file?,
    })
}

pub(super) fn check_postgres(
    r: &Reader,
    entities: Option<&[String]>,
    base_dir: &Path,
    errs: &mut Errors,
) -> Option<TargetKind> {
    let url = r
        .required_string(
            "url",
            "the database to write to, e.g. url = \"postgres://steward@mdm-db:5432/mdm\"",
            errs,
        )
        .and_then(|u| parse_pg_url(u, &r.key("url"), errs));
    let sslrootcert = super::check_sslrootcert(r, url.as_ref(), base_dir, errs);
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
                let key = super::reader::join(&r.key("tables"), entity);
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
    Some(TargetKind::Postgres(PostgresTargetConfig {
        conn: PgConnConfig {
            url_display: url.display,
            host: url.host,
            port: url.port,
            user: url.user,
            dbname: url.dbname,
            password: password?,
            sslmode: url.sslmode,
            sslrootcert: sslrootcert?,
            connect_timeout: url.connect_timeout.unwrap_or(ms(connect_timeout?)),
        },
        schema: schema?,
        tables: tables?,
        delete_mode: delete_mode?,
        create_tables: create_tables?,
        timeout: ms(timeout?),
    }))
}

/// Subject tokens: the template may use these placeholders only.
const SUBJECT_PLACEHOLDERS: &[&str] = &["{entity}", "{op}", "{key}", "{target}"];

fn check_subject(template: &str) -> Result<(), String> {
    if template.is_empty() || template.chars().any(|c| c.is_whitespace()) {
        return Err(
            "must be a non-empty subject without spaces, e.g. steward.{entity}.{op}".into(),
        );
    }
    let mut rest = template;
    while let Some(i) = rest.find('{') {
        let tail = &rest[i..];
        match SUBJECT_PLACEHOLDERS.iter().find(|p| tail.starts_with(**p)) {
            Some(p) => rest = &tail[p.len()..],
            None => {
                return Err(format!(
                    "has an unknown placeholder at `{}`; valid: {}",
                    tail.chars().take(12).collect::<String>(),
                    SUBJECT_PLACEHOLDERS.join(", ")
                ))
            }
        }
    }
    if template
        .split('.')
        .any(|t| t.is_empty() || t == "*" || t == ">")
    {
        return Err(
            "must be a concrete subject: no empty tokens (..) and no wildcards (* or >)".into(),
        );
    }
    Ok(())
}

pub(super) fn check_nats(r: &Reader, base_dir: &Path, errs: &mut Errors) -> Option<TargetKind> {
    let servers = r
        .required_string(
            "url",
            "the NATS server(s), e.g. url = \"nats://nats1:4222,nats://nats2:4222\"",
            errs,
        )
        .and_then(|u| {
            let list: Vec<String> = u.split(',').map(|s| s.trim().to_string()).collect();
            let bad = list.iter().find(|s| {
                !(s.starts_with("nats://") || s.starts_with("tls://"))
                    || url::Url::parse(s).is_err()
            });
            if let Some(bad) = bad {
                errs.add(
                    &r.key("url"),
                    format!(
                        "`{bad}` is not a NATS server URL; use nats://HOST:PORT (or tls://), \
                         several separated by commas"
                    ),
                );
                return None;
            }
            if list
                .iter()
                .any(|s| url::Url::parse(s).is_ok_and(|u| u.password().is_some()))
            {
                errs.add(
                    &r.key("url"),
                    "contains a password; use user with password_file or password_env",
                );
                return None;
            }
            Some(list)
        });
    let subject = match r.string("subject", errs) {
        None if r.has("subject") => None,
        s => {
            let s = s.unwrap_or("steward.{entity}.{op}");
            match check_subject(s) {
                Ok(()) => Some(s.to_string()),
                Err(m) => {
                    errs.add(&r.key("subject"), m);
                    None
                }
            }
        }
    };
    let envelope = envelope(r, errs);
    let stream = match r.string("stream", errs) {
        None if r.has("stream") => None,
        None => Some(None),
        Some(s)
            if !s.is_empty()
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') =>
        {
            Some(Some(s.to_string()))
        }
        Some(s) => {
            errs.add(
                &r.key("stream"),
                format!("`{s}` is not a valid stream name; use letters, digits, _ and -"),
            );
            None
        }
    };
    let create_stream = r.bool("create_stream", false, errs);
    if create_stream == Some(true) && stream == Some(None) {
        errs.add(
            &r.key("create_stream"),
            "needs stream = \"NAME\" (e.g. stream = \"STEWARD\")",
        );
    }
    let stream_subjects = match r.string_list("stream_subjects", errs) {
        None if r.has("stream_subjects") => None,
        None => Some(vec!["steward.>".to_string()]),
        Some(l) if l.is_empty() => {
            errs.add(
                &r.key("stream_subjects"),
                "is empty; list at least one subject filter, e.g. [\"steward.>\"]",
            );
            None
        }
        Some(l) => Some(l.iter().map(|s| s.to_string()).collect()),
    };
    let duplicate_window = r.int(
        "duplicate_window_ms",
        120_000,
        1_000,
        7 * 24 * HOUR_MS,
        "milliseconds",
        errs,
    );
    let token = optional_secret(r, "token", base_dir, errs);
    let password = optional_secret(r, "password", base_dir, errs);
    let user = r.string("user", errs);
    let creds = existing_file(r, "creds_file", base_dir, errs);
    let auth = match (token, user, password, creds) {
        (Some(None), None, Some(None), Some(None)) => Some(NatsAuth::None),
        (Some(Some(t)), None, Some(None), Some(None)) => Some(NatsAuth::Token(t)),
        (Some(None), Some(u), Some(Some(p)), Some(None)) => {
            Some(NatsAuth::UserPassword(u.to_string(), p))
        }
        (Some(None), None, Some(None), Some(Some(c))) => Some(NatsAuth::CredsFile(c)),
        (Some(_), Some(_), Some(None), Some(_)) => {
            errs.add(
                &r.key("password_file"),
                "missing; user needs password_file or password_env",
            );
            None
        }
        (Some(_), None, Some(Some(_)), Some(_)) => {
            errs.add(&r.key("user"), "missing; a password needs user");
            None
        }
        (Some(_), _, Some(_), Some(_)) => {
            errs.add(
                &r.key("token_file"),
                "give only one kind of credentials: a token, user + password, or creds_file",
            );
            None
        }
        _ => None,
    };
    let timeout = r.int("timeout_ms", 10_000, 1, HOUR_MS, "milliseconds", errs);
    let connect_timeout = r.int(
        "connect_timeout_ms",
        5_000,
        1,
        HOUR_MS,
        "milliseconds",
        errs,
    );
    Some(TargetKind::Nats(NatsTargetConfig {
        servers: servers?,
        auth: auth?,
        subject: subject?,
        envelope: envelope?,
        stream: stream?,
        create_stream: create_stream?,
        stream_subjects: stream_subjects?,
        duplicate_window: ms(duplicate_window?),
        timeout: ms(timeout?),
        connect_timeout: ms(connect_timeout?),
    }))
}

pub(super) fn check_file(r: &Reader, base_dir: &Path, errs: &mut Errors) -> Option<TargetKind> {
    let path = r
        .required_string(
            "path",
            "the NDJSON file to append to, e.g. path = \"/var/lib/steward/events.ndjson\"",
            errs,
        )
        .and_then(|p| {
            if p.is_empty() || p.ends_with('/') {
                errs.add(&r.key("path"), "must name a file, e.g. events.ndjson");
                return None;
            }
            Some(resolve(base_dir, p))
        });
    let envelope = envelope(r, errs);
    let max_bytes = r.int("max_bytes", 100 * 1024 * 1024, 1024, 1 << 50, "bytes", errs);
    let max_files = r.int("max_files", 10, 0, 10_000, "files", errs);
    Some(TargetKind::File(FileTargetConfig {
        path: path?,
        envelope: envelope?,
        max_bytes: max_bytes?,
        max_files: u32::try_from(max_files?).ok()?,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, ConfigError};

    const BASE: &str = r#"
[source]
url = "postgres://steward@localhost/odoo"
[state]
path = "state.redb"
[entities.product]
table = "product_template"
fields = { sku = "default_code", name = "name.en_US" }
[entities.partner]
table = "res_partner"
fields = { name = "name" }
"#;

    fn parse(target: &str) -> Result<Config, Vec<ConfigError>> {
        let text = format!("{BASE}\n[targets.t]\n{target}");
        Config::parse(
            &text,
            Path::new("/etc/steward/steward.toml"),
            Path::new("/etc/steward"),
        )
        .map_err(|e| e.errors)
    }

    fn error_at(target: &str, key: &str) -> String {
        let errs = parse(target).expect_err("invalid");
        errs.iter()
            .find(|e| e.key == key)
            .map(|e| e.message.clone())
            .unwrap_or_else(|| panic!("no error at {key}: {errs:?}"))
    }

    #[test]
    fn example_documents_every_target_key() {
        let example = Config::example();
        for key in HTTP_KEYS
            .iter()
            .chain(POSTGRES_KEYS)
            .chain(NATS_KEYS)
            .chain(FILE_KEYS)
        {
            assert!(
                example.contains(&format!("{key} =")),
                "example lacks `{key} =`"
            );
        }
        let config = Config::parse(
            Config::example(),
            Path::new("/etc/steward/steward.toml"),
            Path::new("/etc/steward"),
        )
        .expect("example parses");
        let kinds: Vec<&str> = config
            .targets
            .iter()
            .map(|t| match t.kind {
                TargetKind::Http(_) => "http",
                TargetKind::Postgres(_) => "postgres",
                TargetKind::Nats(_) => "nats",
                TargetKind::File(_) => "file",
            })
            .collect();
        assert_eq!(kinds, ["http", "postgres", "nats", "file"]);
    }

    #[test]
    fn unknown_types_list_every_valid_type() {
        let m = error_at(
            "type = \"kafka\"\nentities = [\"product\"]",
            "targets.t.type",
        );
        assert_eq!(
            m,
            "unknown target type `kafka`; valid types: http, postgres, nats, file"
        );
    }

    #[test]
    fn postgres_tables_defaults_and_overrides() {
        let c = parse(
            "type = \"postgres\"\nurl = \"postgres://w@db/mdm?sslmode=require\"\n\
             entities = [\"product\", \"partner\"]\ntable_prefix = \"mdm_\"\n\
             tables = { partner = \"partners\" }",
        )
        .expect("valid");
        let TargetKind::Postgres(pg) = &c.targets[0].kind else {
            panic!("postgres")
        };
        assert_eq!(pg.schema, "public");
        assert_eq!(
            pg.tables,
            [
                ("product".to_string(), "mdm_product".to_string()),
                ("partner".to_string(), "partners".to_string())
            ]
        );
        assert_eq!(pg.delete_mode, DeleteMode::Soft);
        assert!(!pg.create_tables);
        assert_eq!(pg.conn.dbname, "mdm");

        let m = error_at(
            "type = \"postgres\"\nurl = \"postgres://w@db/mdm\"\nentities = [\"product\"]\n\
             tables = { partner = \"p\" }",
            "targets.t.tables.partner",
        );
        assert!(m.contains("not in this target's entities"), "{m}");
        let m = error_at(
            "type = \"postgres\"\nurl = \"postgres://w@db/mdm\"\nentities = [\"product\"]\n\
             delete_mode = \"hard\"",
            "targets.t.delete_mode",
        );
        assert_eq!(m, "unknown delete mode `hard`; valid: soft, delete");
        // A key of another type is unknown here.
        let errs = parse(
            "type = \"postgres\"\nurl = \"postgres://w@db/mdm\"\nentities = [\"product\"]\n\
             subject = \"x\"",
        )
        .expect_err("subject is a nats key");
        assert!(
            errs.iter().any(|e| e.key == "targets.t.subject"),
            "{errs:?}"
        );
    }

    #[test]
    fn nats_and_file_checks() {
        let c = parse("type = \"nats\"\nurl = \"nats://127.0.0.1:4222\"\nentities = [\"product\"]")
            .expect("valid");
        let TargetKind::Nats(n) = &c.targets[0].kind else {
            panic!("nats")
        };
        assert_eq!(n.subject, "steward.{entity}.{op}");
        assert_eq!(n.stream, None);
        assert_eq!(n.duplicate_window, std::time::Duration::from_secs(120));
        let m = error_at(
            "type = \"nats\"\nurl = \"nats://h:4222\"\nentities = [\"product\"]\n\
             create_stream = true",
            "targets.t.create_stream",
        );
        assert!(m.contains("stream = "), "{m}");
        let m = error_at(
            "type = \"nats\"\nurl = \"http://h\"\nentities = [\"product\"]",
            "targets.t.url",
        );
        assert!(m.contains("nats://"), "{m}");

        let c = parse("type = \"file\"\npath = \"out/events.ndjson\"\nentities = [\"product\"]\nenvelope = \"debezium\"")
            .expect("valid");
        let TargetKind::File(f) = &c.targets[0].kind else {
            panic!("file")
        };
        assert_eq!(f.path, Path::new("/etc/steward/out/events.ndjson"));
        assert_eq!(f.envelope, Envelope::Debezium);
        assert_eq!((f.max_bytes, f.max_files), (100 * 1024 * 1024, 10));
        let m = error_at(
            "type = \"file\"\npath = \"x\"\nentities = [\"product\"]\nenvelope = \"avro\"",
            "targets.t.envelope",
        );
        assert_eq!(m, "unknown envelope `avro`; valid: cloudevents, debezium");
    }

    #[test]
    fn whsec_keys_are_decoded() {
        let k = signing_key(&Secret::new("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")).expect("b64");
        assert_eq!(k.0.len(), 24);
        let raw = signing_key(&Secret::new("plain-key")).expect("raw");
        assert_eq!(raw.0, b"plain-key");
        assert!(signing_key(&Secret::new("whsec_!!!")).is_err());
    }

    #[test]
    fn subjects_are_checked() {
        assert!(check_subject("steward.{entity}.{op}").is_ok());
        assert!(check_subject("mdm.{target}.{entity}.{key}").is_ok());
        assert!(check_subject("steward.{nope}").is_err());
        assert!(check_subject("steward.>").is_err());
        assert!(check_subject("a..b").is_err());
    }
}
