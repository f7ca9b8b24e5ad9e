//! Checking the TOML file into [`Config`].
//!
//! The text is parsed into a plain `toml::Table` (order-preserving) and each
//! section is then walked by hand with [`reader::Reader`], so that a mistake in
//! `[source]` does not hide one in `[targets.x]`: every problem is collected
//! and returned at once; a target's type-specific keys are walked by its
//! [`TargetTypes`] at the same point, with the same tools. Secrets (passwords,
//! header values) are read at load time, with [`secret_from_file`] and
//! [`secret_from_env`], and only ever stored in [`Secret`]; no message
//! contains them.

mod delivery;
mod governance;
mod paths;
pub(super) mod pgurl;
pub(super) mod reader;
#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use toml::{Table, Value};

use self::delivery::{check_delivery, DELIVERY_KEYS};
use self::pgurl::parse_pg_url;
use self::reader::{check_sql_ident, join, type_name, Errors, Reader, MAX_IDENT};
use super::{
    Config, ConfigError, ConfigErrors, ConsoleConfig, ConsoleTls, ControlConfig, DaemonConfig,
    EntityConfig, FieldConfig, FieldSource, InitialSync, MetricsConfig, Secret, SecretOrigin,
    SourceConfig, StateConfig, TargetConfig, TargetContext, TargetTypes, Unchecked,
};

const TOP_KEYS: &[&str] = &[
    "source", "state", "metrics", "entities", "targets", "daemon", "control", "console",
];
const SOURCE_KEYS: &[&str] = &[
    "url",
    "password_file",
    "password_env",
    "slot",
    "publication",
    "status_interval_ms",
    "create_publication",
    "connect_timeout_ms",
    "heartbeat_interval_ms",
    "heartbeat_url",
    "streaming",
    "failover",
];
const STATE_KEYS: &[&str] = &[
    "path",
    "commit_max_events",
    "commit_max_delay_ms",
    // governance
    "audit_retention_days",
];
const METRICS_KEYS: &[&str] = &["listen", "ready_max_target_stall_ms"];
const DAEMON_KEYS: &[&str] = &["shutdown_timeout_ms"];
const CONTROL_KEYS: &[&str] = &["socket", "group"];
const CONSOLE_KEYS: &[&str] = &["users_file", "listen", "tls_cert", "tls_key"];
/// `[console] users_file`, relative to the configuration file's directory.
const DEFAULT_USERS_FILE: &str = "users.toml";
const ENTITY_KEYS: &[&str] = &[
    "table",
    "key",
    "fields",
    // governance
    "publish_when",
    "on_unpublish",
    "rules",
    "unique",
    "children",
];
const FIELD_KEYS: &[&str] = &["path", "fallback"];
/// Keys every target type accepts; each type adds its own (see `TargetTypes`).
const TARGET_KEYS: &[&str] = &[
    "type",
    "entities",
    "batch_max_events",
    "batch_linger_ms",
    "retry_initial_ms",
    "retry_max_ms",
    // governance
    "route",
    "fields",
    "mask",
    "hash",
    "hash_key_file",
    "initial",
];

const HOUR_MS: u64 = 3_600_000;
const DEFAULT_READY_MAX_TARGET_STALL_MS: u64 = 300_000;
const DEFAULT_SHUTDOWN_TIMEOUT_MS: u64 = 30_000;
/// Loopback only: the endpoints need no authentication, so exposing them
/// to the network is a decision the operator writes down.
const DEFAULT_METRICS_LISTEN: SocketAddr = SocketAddr::V4(std::net::SocketAddrV4::new(
    std::net::Ipv4Addr::LOCALHOST,
    9187,
));

impl Config {
    /// The documented example configuration (`config/steward.example.toml`).
    pub fn example() -> &'static str {
        include_str!("../../../../config/steward.example.toml")
    }
}

pub(super) fn load(path: &Path, types: &dyn TargetTypes) -> Result<Config, ConfigErrors> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigErrors {
        path: path.to_path_buf(),
        errors: vec![ConfigError {
            key: String::new(),
            message: format!("cannot read the file: {e}"),
        }],
    })?;
    let base = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    parse(&text, path, base, Some(types))
}

/// With `types` `None`, the keys each target's type adds are not checked.
pub(super) fn parse(
    text: &str,
    path: &Path,
    base_dir: &Path,
    types: Option<&dyn TargetTypes>,
) -> Result<Config, ConfigErrors> {
    let fail = |errors| ConfigErrors {
        path: path.to_path_buf(),
        errors,
    };
    let doc: Table = text
        .parse()
        .map_err(|e| fail(vec![syntax_error(text, &e)]))?;

    let mut errs = Errors::default();
    let top = Reader::new("", &doc, TOP_KEYS, &mut errs);

    let source = required_section(
        &top,
        "source",
        "add [source] with at least url = \"postgres://USER@HOST:5432/DB\"",
        &mut errs,
    )
    .and_then(|t| check_source(t, base_dir, &mut errs));
    let state = required_section(
        &top,
        "state",
        "add [state] with at least path = \"/var/lib/steward/steward.redb\"",
        &mut errs,
    )
    .and_then(|t| check_state(t, base_dir, &mut errs));
    let metrics = match top.table("metrics", &mut errs) {
        Some(t) => check_metrics(t, &mut errs),
        None if top.has("metrics") => None,
        None => Some(MetricsConfig {
            listen: Some(DEFAULT_METRICS_LISTEN),
            ready_max_target_stall: ms(DEFAULT_READY_MAX_TARGET_STALL_MS),
        }),
    };
    let daemon = match top.table("daemon", &mut errs) {
        Some(t) => check_daemon(t, &mut errs),
        None if top.has("daemon") => None,
        None => Some(DaemonConfig {
            shutdown_timeout: ms(DEFAULT_SHUTDOWN_TIMEOUT_MS),
        }),
    };
    let control = match top.table("control", &mut errs) {
        Some(t) => check_control(t, base_dir, &mut errs),
        None if top.has("control") => None,
        None => Some(ControlConfig::default()),
    };
    let console = match top.table("console", &mut errs) {
        Some(t) => check_console(t, base_dir, &mut errs),
        None if top.has("console") => None,
        None => Some(ConsoleConfig {
            users_file: resolve(base_dir, DEFAULT_USERS_FILE),
            listen: None,
            tls: None,
        }),
    };
    let (entity_names, entities) = check_entities(&top, &mut errs);
    let targets = check_targets(&top, &entity_names, base_dir, types, &mut errs);

    let (mut entities, targets) = (entities, targets);
    let governance = match (entities.as_mut(), targets.as_ref()) {
        (Some(e), Some(t)) => Some(governance::check(&doc, e, t, base_dir, &mut errs)),
        _ => None,
    };
    if !errs.is_empty() {
        return Err(fail(errs.into_vec()));
    }
    let config = (|| {
        Some(Config {
            source: source?,
            state: state?,
            entities: entities?,
            targets: targets?,
            metrics: metrics?,
            daemon: daemon?,
            control: control?,
            console: console?,
            governance: governance?,
        })
    })();
    // Every `None` above comes with a recorded error; this is a safety net.
    config.ok_or_else(|| {
        fail(vec![ConfigError {
            key: String::new(),
            message: "the configuration is incomplete".into(),
        }])
    })
}

/// A TOML syntax error with its position, without quoting the offending
/// line (it might hold a secret written in the wrong place).
fn syntax_error(text: &str, err: &toml::de::Error) -> ConfigError {
    let message = err.message().trim().replace('\n', "; ");
    let message = match err.span() {
        Some(span) => {
            let offset = span.start.min(text.len());
            let before = &text.as_bytes()[..offset];
            let line = before.iter().filter(|b| **b == b'\n').count() + 1;
            let line_start = before
                .iter()
                .rposition(|b| *b == b'\n')
                .map_or(0, |i| i + 1);
            let column = String::from_utf8_lossy(&before[line_start..])
                .chars()
                .count()
                + 1;
            format!("TOML syntax error at line {line}, column {column}: {message}")
        }
        None => format!("TOML syntax error: {message}"),
    };
    ConfigError {
        key: String::new(),
        message,
    }
}

fn required_section<'a>(
    top: &Reader<'a>,
    name: &str,
    hint: &str,
    errs: &mut Errors,
) -> Option<&'a Table> {
    if !top.has(name) {
        errs.add(name, format!("missing section [{name}]; {hint}"));
        return None;
    }
    top.table(name, errs)
}

/// `path` as written in the file, relative to the file's directory.
pub fn resolve(base_dir: &Path, path: &str) -> PathBuf {
    let p = Path::new(path);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base_dir.join(p)
    }
}

/// Replaces `${CREDENTIALS_DIRECTORY}` (or `$CREDENTIALS_DIRECTORY`) with the
/// directory systemd passes credentials in (`LoadCredential=`), so the unit's
/// config can name `${CREDENTIALS_DIRECTORY}/pgpass` without knowing the path.
fn expand_credentials_dir(key: &str, file: &str, errs: &mut Errors) -> Option<String> {
    const FORMS: [&str; 2] = ["${CREDENTIALS_DIRECTORY}", "$CREDENTIALS_DIRECTORY"];
    if !FORMS.iter().any(|f| file.contains(f)) {
        return Some(file.to_string());
    }
    match std::env::var("CREDENTIALS_DIRECTORY") {
        Ok(dir) if !dir.is_empty() => Some(
            FORMS
                .iter()
                .fold(file.to_string(), |acc, f| acc.replace(f, &dir)),
        ),
        _ => {
            errs.add(
                key,
                format!(
                    "`{file}` uses $CREDENTIALS_DIRECTORY, which is not set: run steward under \
                     systemd with LoadCredential= (see systemd/steward.service), or write the path"
                ),
            );
            None
        }
    }
}

/// Reads a secret from a file; one trailing newline (as editors add) is dropped.
/// Messages name the key and the path, never the content.
pub fn secret_from_file(
    key: &str,
    base_dir: &Path,
    file: &str,
    errs: &mut Errors,
) -> Option<Secret> {
    if file.is_empty() {
        errs.add(
            key,
            "is empty; give the path of the file holding the secret",
        );
        return None;
    }
    let expanded = expand_credentials_dir(key, file, errs)?;
    let path = resolve(base_dir, &expanded);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) => {
            errs.add(
                key,
                format!(
                    "cannot read `{}`: {e}; check the path and its permissions",
                    path.display()
                ),
            );
            return None;
        }
    };
    let Ok(text) = String::from_utf8(bytes) else {
        errs.add(key, format!("`{}` is not valid UTF-8 text", path.display()));
        return None;
    };
    let value = text
        .strip_suffix('\n')
        .map(|t| t.strip_suffix('\r').unwrap_or(t))
        .unwrap_or(&text);
    if value.is_empty() {
        errs.add(
            key,
            format!("`{}` is empty; put the secret in it", path.display()),
        );
        return None;
    }
    Some(Secret::with_origin(
        value,
        SecretOrigin::File {
            key: key.to_string(),
            path,
        },
    ))
}

/// Reads a secret from an environment variable, which must be set and non-empty.
pub fn secret_from_env(key: &str, name: &str, errs: &mut Errors) -> Option<Secret> {
    let mut chars = name.chars();
    let valid_name = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !valid_name {
        errs.add(
            key,
            format!(
                "`{name}` is not an environment variable name; use letters, digits and _, \
                 not starting with a digit (e.g. STEWARD_PG_PASSWORD)"
            ),
        );
        return None;
    }
    match std::env::var(name) {
        Ok(v) if !v.is_empty() => Some(Secret::with_origin(
            v,
            SecretOrigin::Env {
                key: key.to_string(),
                name: name.to_string(),
            },
        )),
        Ok(_) => {
            errs.add(
                key,
                format!("environment variable {name} is empty; set it to the secret"),
            );
            None
        }
        Err(std::env::VarError::NotPresent) => {
            errs.add(
                key,
                format!("environment variable {name} is not set; set it to the secret"),
            );
            None
        }
        Err(std::env::VarError::NotUnicode(_)) => {
            errs.add(
                key,
                format!("environment variable {name} is not valid UTF-8"),
            );
            None
        }
    }
}

/// A secret from `<base>_file` or `<base>_env` (at most one); `Some(None)` when neither is set.
pub fn optional_secret(
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
pub fn existing_file(
    r: &Reader,
    key: &str,
    base_dir: &Path,
    errs: &mut Errors,
) -> Option<Option<PathBuf>> {
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

fn ms(value: u64) -> Duration {
    Duration::from_millis(value)
}

/// The `sslrootcert` parameter of a PostgreSQL URL (source or target): it
/// must name a file, resolved against the config file's directory.
pub fn check_sslrootcert(
    r: &Reader,
    url: Option<&pgurl::PgUrl>,
    base_dir: &Path,
    errs: &mut Errors,
) -> Option<Option<PathBuf>> {
    match url.and_then(|u| u.sslrootcert.as_deref()) {
        None => Some(None),
        Some(cert) => {
            let path = resolve(base_dir, cert);
            match std::fs::metadata(&path) {
                Ok(m) if m.is_file() => Some(Some(path)),
                Ok(_) => {
                    errs.add(
                        &r.key("url"),
                        format!(
                            "parameter sslrootcert: `{}` is not a file; give a PEM file of CA \
                             certificates",
                            path.display()
                        ),
                    );
                    None
                }
                Err(e) => {
                    errs.add(
                        &r.key("url"),
                        format!(
                            "parameter sslrootcert: cannot read `{}`: {e}",
                            path.display()
                        ),
                    );
                    None
                }
            }
        }
    }
}

fn check_source(table: &Table, base_dir: &Path, errs: &mut Errors) -> Option<SourceConfig> {
    let r = Reader::new("source", table, SOURCE_KEYS, errs);

    let url = r
        .required_string(
            "url",
            "the database to read, e.g. url = \"postgres://steward@localhost:5432/odoo\"",
            errs,
        )
        .and_then(|u| parse_pg_url(u, &r.key("url"), errs));

    let sslrootcert = check_sslrootcert(&r, url.as_ref(), base_dir, errs);

    let file = r.string("password_file", errs);
    let env = r.string("password_env", errs);
    let password = match (file, env) {
        (Some(_), Some(_)) => {
            errs.add(
                &r.key("password_env"),
                "set only one of source.password_file and source.password_env",
            );
            None
        }
        (Some(f), None) => secret_from_file(&r.key("password_file"), base_dir, f, errs).map(Some),
        (None, Some(e)) => secret_from_env(&r.key("password_env"), e, errs).map(Some),
        (None, None) => Some(None),
    };

    let slot = r.string("slot", errs).unwrap_or("steward");
    let slot_ok = !slot.is_empty()
        && slot.len() <= MAX_IDENT
        && slot
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if !slot_ok {
        errs.add(
            &r.key("slot"),
            format!(
                "`{slot}` is not a valid replication slot name; use 1 to 63 lowercase letters, \
                 digits and _ (e.g. steward)"
            ),
        );
    }

    let publication = r.string("publication", errs).unwrap_or("steward");
    let mut chars = publication.chars();
    let publication_ok = publication.len() <= MAX_IDENT
        && chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !publication_ok {
        errs.add(
            &r.key("publication"),
            format!(
                "`{publication}` is not a valid publication name; use 1 to 63 letters, digits \
                 and _, starting with a letter or _ (e.g. steward)"
            ),
        );
    }

    let status_interval = r.int(
        "status_interval_ms",
        10_000,
        100,
        HOUR_MS,
        "milliseconds",
        errs,
    );
    let create_publication = r.bool("create_publication", true, errs);
    let connect_timeout_ms = r.int(
        "connect_timeout_ms",
        10_000,
        1,
        HOUR_MS,
        "milliseconds",
        errs,
    );
    let url_timeout = url.as_ref().and_then(|u| u.connect_timeout);
    if r.has("connect_timeout_ms") && url_timeout.is_some() {
        errs.add(
            &r.key("connect_timeout_ms"),
            "is given twice: also as connect_timeout in source.url; remove one of them",
        );
    }

    let heartbeat_ms = r.int("heartbeat_interval_ms", 0, 0, HOUR_MS, "milliseconds", errs);
    let heartbeat_url = r
        .string("heartbeat_url", errs)
        .map(|u| parse_pg_url(u, &r.key("heartbeat_url"), errs));
    let heartbeat_rootcert = match &heartbeat_url {
        Some(Some(u)) => match u.sslrootcert.as_deref() {
            None => Some(None),
            Some(cert) => {
                let path = resolve(base_dir, cert);
                if path.is_file() {
                    Some(Some(path))
                } else {
                    errs.add(
                        &r.key("heartbeat_url"),
                        format!(
                            "parameter sslrootcert: `{}` is not a readable file; give a PEM \
                             file of CA certificates",
                            path.display()
                        ),
                    );
                    None
                }
            }
        },
        _ => Some(None),
    };
    let streaming = r.bool("streaming", true, errs);
    let failover = r.bool("failover", false, errs);

    let url = url?;
    let heartbeat_url = heartbeat_url.map(|u| u.ok_or(())).transpose().ok()?;
    let heartbeat_rootcert = heartbeat_rootcert?;
    let mut source = SourceConfig {
        url_display: url.display,
        host: url.host,
        port: url.port,
        other_hosts: url.other_hosts,
        target_session_attrs: url.target_session_attrs,
        failover: failover?,
        heartbeat_via: None,
        user: url.user,
        dbname: url.dbname,
        password: password?,
        sslmode: url.sslmode,
        sslrootcert: sslrootcert?,
        connect_timeout: url_timeout.unwrap_or(ms(connect_timeout_ms?)),
        slot: if slot_ok {
            slot.to_string()
        } else {
            return None;
        },
        publication: if publication_ok {
            publication.to_string()
        } else {
            return None;
        },
        status_interval: ms(status_interval?),
        create_publication: create_publication?,
        heartbeat_interval: match heartbeat_ms? {
            0 => None,
            n => Some(ms(n)),
        },
        streaming: streaming?,
    };
    if let Some(hb) = heartbeat_url {
        let via = SourceConfig {
            url_display: hb.display,
            host: hb.host,
            port: hb.port,
            other_hosts: hb.other_hosts,
            target_session_attrs: hb.target_session_attrs,
            user: hb.user,
            dbname: hb.dbname,
            sslmode: hb.sslmode,
            sslrootcert: heartbeat_rootcert.or_else(|| source.sslrootcert.clone()),
            connect_timeout: hb.connect_timeout.unwrap_or(source.connect_timeout),
            ..source.clone()
        };
        source.heartbeat_via = Some(Box::new(via));
    }
    Some(source)
}

fn check_state(table: &Table, base_dir: &Path, errs: &mut Errors) -> Option<StateConfig> {
    let r = Reader::new("state", table, STATE_KEYS, errs);
    let path = r.required_string(
        "path",
        "the redb state file, e.g. path = \"/var/lib/steward/steward.redb\" (relative paths \
         resolve against the config file's directory)",
        errs,
    );
    if path == Some("") {
        errs.add(
            &r.key("path"),
            "is empty; give the redb state file, e.g. /var/lib/steward/steward.redb",
        );
    }
    let commit_max_events = r.int("commit_max_events", 20_000, 1, 1_000_000, "events", errs);
    let commit_max_delay = r.int("commit_max_delay_ms", 20, 0, 10_000, "milliseconds", errs);
    let path = resolve(base_dir, path.filter(|p| !p.is_empty())?);
    if let Some(problem) = state_path_problem(&path) {
        errs.add(&r.key("path"), problem);
    }
    Some(StateConfig {
        path,
        commit_max_events: usize::try_from(commit_max_events?).ok()?,
        commit_max_delay: ms(commit_max_delay?),
    })
}

/// What is wrong with the state file's place on disk, if anything. A
/// missing directory is fine: steward creates it (0700) at the first start,
/// as systemd's `StateDirectory=` does for the shipped unit.
fn state_path_problem(path: &Path) -> Option<String> {
    if path.is_dir() {
        return Some(format!(
            "{} is a directory; name the state file inside it, e.g. {}",
            path.display(),
            path.join("steward.redb").display()
        ));
    }
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty())?;
    // The nearest part of the path that exists must be a directory.
    let existing = parent.ancestors().find(|a| a.exists())?;
    if !existing.is_dir() {
        return Some(format!(
            "{} is not a directory, so the state file {} cannot be created in it",
            existing.display(),
            path.display()
        ));
    }
    None
}

fn check_metrics(table: &Table, errs: &mut Errors) -> Option<MetricsConfig> {
    let r = Reader::new("metrics", table, METRICS_KEYS, errs);
    let listen = match r.get("listen") {
        None => Some(DEFAULT_METRICS_LISTEN),
        Some(_) => match r.string("listen", errs)? {
            "" => None,
            text => match text.parse::<SocketAddr>() {
                Ok(addr) => Some(addr),
                Err(_) => {
                    errs.add(
                        &r.key("listen"),
                        format!(
                            "`{text}` is not a socket address; write IP:PORT such as \
                             127.0.0.1:9187 or [::1]:9187, or \"\" to disable metrics"
                        ),
                    );
                    return None;
                }
            },
        },
    };
    let stall = r.int(
        "ready_max_target_stall_ms",
        DEFAULT_READY_MAX_TARGET_STALL_MS,
        1_000,
        7 * 24 * HOUR_MS,
        "milliseconds",
        errs,
    );
    Some(MetricsConfig {
        listen,
        ready_max_target_stall: ms(stall?),
    })
}

fn check_control(table: &Table, base_dir: &Path, errs: &mut Errors) -> Option<ControlConfig> {
    let r = Reader::new("control", table, CONTROL_KEYS, errs);
    let mut ok = true;
    let socket = match r.string("socket", errs) {
        Some("") => {
            errs.add(
                &r.key("socket"),
                "is empty; leave it out for the default (the state file's path with .sock \
                 appended) or give a path such as /run/steward/steward.sock",
            );
            ok = false;
            None
        }
        Some(path) => Some(resolve(base_dir, path)),
        None => {
            ok &= !r.has("socket");
            None
        }
    };
    // The kernel's limit for a socket's path (`sun_path`, 108 bytes with the final NUL).
    if let Some(path) = &socket {
        if path.as_os_str().len() > 107 {
            errs.add(
                &r.key("socket"),
                format!(
                    "{} is longer than a Unix socket path may be (107 bytes); choose a shorter one",
                    path.display()
                ),
            );
            ok = false;
        }
    }
    let group = match r.string("group", errs) {
        Some("") => {
            errs.add(
                &r.key("group"),
                "is empty; name the group whose members may use the control API, or leave it \
                 out to keep the socket to steward's own user",
            );
            ok = false;
            None
        }
        Some(g) => Some(g.to_string()),
        None => {
            ok &= !r.has("group");
            None
        }
    };
    ok.then_some(ControlConfig { socket, group })
}

fn check_console(table: &Table, base_dir: &Path, errs: &mut Errors) -> Option<ConsoleConfig> {
    let r = Reader::new("console", table, CONSOLE_KEYS, errs);
    let mut ok = true;
    let users_file = match r.get("users_file") {
        None => DEFAULT_USERS_FILE,
        Some(_) => match r.string("users_file", errs) {
            Some("") => {
                errs.add(
                    &r.key("users_file"),
                    "is empty; give the file that holds the console's users and API tokens, \
                     such as /etc/steward/users.toml, or leave it out for users.toml next to \
                     this file",
                );
                ok = false;
                DEFAULT_USERS_FILE
            }
            Some(path) => path,
            None => {
                ok = false;
                DEFAULT_USERS_FILE
            }
        },
    };
    let mut file = |key: &str, errs: &mut Errors| match r.string(key, errs) {
        Some("") => {
            errs.add(
                &r.key(key),
                "is empty; give a PEM file, or leave out both tls_cert and tls_key to serve \
                 plain HTTP on a loopback address",
            );
            ok = false;
            None
        }
        Some(path) => Some(resolve(base_dir, path)),
        None => {
            ok &= !r.has(key);
            None
        }
    };
    let cert = file("tls_cert", errs);
    let key = file("tls_key", errs);
    let tls = match (cert, key) {
        (Some(cert), Some(key)) => Some(ConsoleTls { cert, key }),
        (None, None) => None,
        (cert, _) => {
            let (given, missing) = if cert.is_some() {
                ("tls_cert", "tls_key")
            } else {
                ("tls_key", "tls_cert")
            };
            errs.add(
                &r.key(missing),
                format!(
                    "is missing: {given} is given, and TLS needs both the certificate and its key"
                ),
            );
            ok = false;
            None
        }
    };
    let listen = match r.string("listen", errs) {
        None => {
            ok &= !r.has("listen");
            None
        }
        Some(text) => match console_address(text) {
            Some(addr) => {
                if !addr.ip().is_loopback() && tls.is_none() && ok {
                    errs.add(
                        &r.key("listen"),
                        format!(
                            "{addr} is not a loopback address: passwords and session cookies \
                             would cross the network in the clear; give tls_cert and tls_key, or \
                             listen on 127.0.0.1 (behind a TLS-terminating proxy)"
                        ),
                    );
                    ok = false;
                }
                Some(addr)
            }
            None => {
                errs.add(
                    &r.key("listen"),
                    format!(
                        "`{text}` is not a port or a socket address; write a port such as 9190 \
                         (loopback), or IP:PORT such as 127.0.0.1:9190 or [::1]:9190"
                    ),
                );
                ok = false;
                None
            }
        },
    };
    if !ok {
        return None;
    }
    Some(ConsoleConfig {
        users_file: resolve(base_dir, users_file),
        listen,
        tls,
    })
}

/// `[console] listen`: a bare port is loopback's.
fn console_address(text: &str) -> Option<SocketAddr> {
    if let Ok(port) = text.parse::<u16>() {
        return Some(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    text.parse().ok()
}

fn check_daemon(table: &Table, errs: &mut Errors) -> Option<DaemonConfig> {
    let r = Reader::new("daemon", table, DAEMON_KEYS, errs);
    let timeout = r.int(
        "shutdown_timeout_ms",
        DEFAULT_SHUTDOWN_TIMEOUT_MS,
        100,
        HOUR_MS,
        "milliseconds",
        errs,
    );
    Some(DaemonConfig {
        shutdown_timeout: ms(timeout?),
    })
}

/// `[a-z][a-z0-9_]*` (entities) or `[a-z][a-z0-9_-]*` (targets, with `dash`):
/// names that appear in metrics labels, redb table names and log lines.
fn check_name(name: &str, dash: bool) -> bool {
    let mut chars = name.chars();
    name.len() <= MAX_IDENT
        && chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || (dash && c == '-'))
}

/// Returns every configured entity name (valid or not, so that targets naming
/// a broken entity are not reported twice) and the checked entities.
fn check_entities(top: &Reader, errs: &mut Errors) -> (Vec<String>, Option<Vec<EntityConfig>>) {
    let need_one = "at least one entity is required: add e.g. [entities.product] with \
                    table = \"product_template\" and fields = { name = \"name\" }";
    let Some(table) = top.table("entities", errs) else {
        if !top.has("entities") {
            errs.add("entities", need_one);
        }
        return (Vec::new(), None);
    };
    if table.is_empty() {
        errs.add("entities", need_one);
    }
    let names = table.keys().cloned().collect();
    let mut out = Some(Vec::with_capacity(table.len()));
    for (name, value) in table {
        let key = join("entities", name);
        let checked = match value {
            Value::Table(t) => check_entity(&key, name, t, errs),
            other => {
                errs.add(
                    &key,
                    format!("expected a table [{key}], found {}", type_name(other)),
                );
                None
            }
        };
        match (checked, out.as_mut()) {
            (Some(e), Some(list)) => list.push(e),
            _ => out = None,
        }
    }
    (names, out)
}

fn check_entity(key: &str, name: &str, table: &Table, errs: &mut Errors) -> Option<EntityConfig> {
    let name_ok = check_name(name, false);
    if !name_ok {
        errs.add(
            key,
            format!(
                "entity name `{name}` is not valid; use lowercase letters, digits and _, \
                 starting with a letter (at most 63)"
            ),
        );
    }
    let r = Reader::new(key, table, ENTITY_KEYS, errs);

    let qualified = r
        .required_string(
            "table",
            "the source table, e.g. table = \"product_template\" or \"public.product_template\"",
            errs,
        )
        .and_then(|t| {
            let parts: Vec<&str> = t.split('.').collect();
            let (schema, table) = match parts.as_slice() {
                [table] => ("public", *table),
                [schema, table] => (*schema, *table),
                _ => {
                    errs.add(
                        &r.key("table"),
                        format!("`{t}` has too many dots; write \"schema.table\" or \"table\""),
                    );
                    return None;
                }
            };
            let mut ok = true;
            for (what, ident) in [("schema", schema), ("table", table)] {
                if let Err(m) = check_sql_ident(ident) {
                    errs.add(&r.key("table"), format!("{what} name {m}"));
                    ok = false;
                }
            }
            ok.then(|| (schema.to_string(), table.to_string()))
        });

    let key_columns = match r.string_list("key", errs) {
        None if r.has("key") => None,
        None => Some(vec!["id".to_string()]),
        Some(cols) if cols.is_empty() => {
            errs.add(
                &r.key("key"),
                "is empty; list the key columns, e.g. key = [\"id\"]",
            );
            None
        }
        Some(cols) => {
            let mut ok = true;
            for (i, col) in cols.iter().enumerate() {
                if let Err(m) = check_sql_ident(col) {
                    errs.add(&r.key("key"), format!("column name {m}"));
                    ok = false;
                } else if cols[..i].contains(col) {
                    errs.add(
                        &r.key("key"),
                        format!("column `{col}` is listed twice; list each key column once"),
                    );
                    ok = false;
                }
            }
            ok.then(|| cols.iter().map(std::string::ToString::to_string).collect())
        }
    };

    let fields = if r.has("fields") {
        r.table("fields", errs)
            .and_then(|t| check_fields(&r.key("fields"), t, errs))
    } else {
        errs.add(
            &r.key("fields"),
            "missing; map document fields to columns, e.g. fields = { sku = \"default_code\", \
             name = \"name.en_US\" }",
        );
        None
    };

    let (schema, table) = qualified?;
    Some(EntityConfig {
        name: if name_ok {
            name.to_string()
        } else {
            return None;
        },
        schema,
        table,
        key: key_columns?,
        fields: fields?,
    })
}

fn check_fields(key: &str, table: &Table, errs: &mut Errors) -> Option<Vec<FieldConfig>> {
    if table.is_empty() {
        errs.add(
            key,
            "is empty; map at least one field, e.g. fields = { sku = \"default_code\" }",
        );
        return None;
    }
    let mut out = Some(Vec::with_capacity(table.len()));
    for (name, value) in table {
        let fkey = join(key, name);
        let mut chars = name.chars();
        let name_ok = chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !name_ok {
            errs.add(
                &fkey,
                format!(
                    "field name `{name}` is not valid; use letters, digits and _, starting with \
                     a letter or _"
                ),
            );
        }
        let sources = match value {
            // A reference field ({ ref = ..., entity = ..., key = ... }) is checked by `governance`.
            Value::Table(t) if t.contains_key("ref") => continue,
            Value::String(s) => field_source(&fkey, s, errs).map(|s| (s, None)),
            Value::Table(t) => {
                let r = Reader::new(&fkey, t, FIELD_KEYS, errs);
                let source = r
                    .required_string(
                        "path",
                        "the column or column.json.path, e.g. path = \"name.de_DE\"",
                        errs,
                    )
                    .and_then(|p| field_source(&r.key("path"), p, errs));
                let fallback = match r.string("fallback", errs) {
                    Some(f) => field_source(&r.key("fallback"), f, errs).map(Some),
                    None if r.has("fallback") => None,
                    None => Some(None),
                };
                source.zip(fallback)
            }
            other => {
                errs.add(
                    &fkey,
                    format!(
                        "expected a string \"column\" or \"column.json.path\", or a table \
                         {{ path = \"...\", fallback = \"...\" }}, found {}",
                        type_name(other)
                    ),
                );
                None
            }
        };
        match (sources, out.as_mut()) {
            (Some((source, fallback)), Some(list)) if name_ok => list.push(FieldConfig {
                name: name.clone(),
                source,
                fallback,
            }),
            _ => out = None,
        }
    }
    out
}

/// `column` or `column.key.key...`: a column, then keys into its JSON value.
fn field_source(key: &str, text: &str, errs: &mut Errors) -> Option<FieldSource> {
    let mut parts = text.split('.');
    let column = parts.next().unwrap_or_default();
    let path: Vec<String> = parts.map(str::to_string).collect();
    let mut ok = true;
    if let Err(m) = check_sql_ident(column) {
        errs.add(key, format!("column name {m}"));
        ok = false;
    }
    if path.iter().any(String::is_empty) {
        errs.add(
            key,
            format!(
                "`{text}` has an empty JSON path segment; write \"column\" or \"column.key.key\""
            ),
        );
        ok = false;
    }
    ok.then(|| FieldSource {
        column: column.to_string(),
        path,
    })
}

fn check_targets(
    top: &Reader,
    entity_names: &[String],
    base_dir: &Path,
    types: Option<&dyn TargetTypes>,
    errs: &mut Errors,
) -> Option<Vec<TargetConfig>> {
    let need_one = "at least one target is required: add e.g. [targets.wms] with type = \"http\", \
                    url = \"https://...\" and entities = [\"product\"]";
    let Some(table) = top.table("targets", errs) else {
        if !top.has("targets") {
            errs.add("targets", need_one);
        }
        return None;
    };
    if table.is_empty() {
        errs.add("targets", need_one);
    }
    let mut out = Some(Vec::with_capacity(table.len()));
    for (name, value) in table {
        let key = join("targets", name);
        let checked = match value {
            Value::Table(t) => check_target(&key, name, t, entity_names, base_dir, types, errs),
            other => {
                errs.add(
                    &key,
                    format!("expected a table [{key}], found {}", type_name(other)),
                );
                None
            }
        };
        match (checked, out.as_mut()) {
            (Some(t), Some(list)) => list.push(t),
            _ => out = None,
        }
    }
    out
}

fn check_target(
    key: &str,
    name: &str,
    table: &Table,
    entity_names: &[String],
    base_dir: &Path,
    types: Option<&dyn TargetTypes>,
    errs: &mut Errors,
) -> Option<TargetConfig> {
    let name_ok = check_name(name, true);
    if !name_ok {
        errs.add(
            key,
            format!(
                "target name `{name}` is not valid; use lowercase letters, digits, _ and -, \
                 starting with a letter (at most 63)"
            ),
        );
    }
    let declared = table.get("type").and_then(Value::as_str);
    let valid = valid_target_keys(table, declared, types);
    let r = Reader::new(key, table, &valid, errs);

    let type_ok = match r.required_string("type", "the target type, e.g. type = \"http\"", errs) {
        Some(t) => match types {
            Some(types) if types.keys(t).is_none() => {
                errs.add(
                    &r.key("type"),
                    format!(
                        "unknown target type `{t}`; valid types: {}",
                        types.names().join(", ")
                    ),
                );
                false
            }
            _ => true,
        },
        None => false,
    };

    let entities = match r.string_list("entities", errs) {
        None if !r.has("entities") => {
            errs.add(
                &r.key("entities"),
                format!(
                    "missing; list the entities this target receives, e.g. entities = [\"{}\"]",
                    entity_names.first().map_or("product", String::as_str)
                ),
            );
            None
        }
        None => None,
        Some(list) if list.is_empty() => {
            errs.add(
                &r.key("entities"),
                format!(
                    "is empty; list at least one of the configured entities: {}",
                    entity_names.join(", ")
                ),
            );
            None
        }
        Some(list) => {
            let mut ok = true;
            for (i, e) in list.iter().enumerate() {
                if !entity_names.iter().any(|n| n == e) {
                    let configured = if entity_names.is_empty() {
                        "none".to_string()
                    } else {
                        entity_names.join(", ")
                    };
                    errs.add(
                        &r.key("entities"),
                        format!("unknown entity `{e}`; configured entities: {configured}"),
                    );
                    ok = false;
                } else if list[..i].contains(e) {
                    errs.add(
                        &r.key("entities"),
                        format!("entity `{e}` is listed twice; list it once"),
                    );
                    ok = false;
                }
            }
            ok.then(|| {
                list.iter()
                    .map(std::string::ToString::to_string)
                    .collect::<Vec<_>>()
            })
        }
    };

    let batch_max_events = r.int("batch_max_events", 500, 1, 10_000, "events", errs);
    let batch_linger = r.int("batch_linger_ms", 50, 0, 60_000, "milliseconds", errs);
    let retry_initial = r.int("retry_initial_ms", 200, 1, HOUR_MS, "milliseconds", errs);
    let retry_max = r.int(
        "retry_max_ms",
        60_000,
        1,
        24 * HOUR_MS,
        "milliseconds",
        errs,
    );
    if let (Some(initial), Some(max)) = (retry_initial, retry_max) {
        if max < initial {
            errs.add(
                &r.key("retry_max_ms"),
                format!("must be at least retry_initial_ms ({initial}), found {max}"),
            );
        }
    }

    let initial = match r.string("initial", errs) {
        None => Some(InitialSync::Snapshot),
        Some("snapshot") => Some(InitialSync::Snapshot),
        Some("none") => Some(InitialSync::None),
        Some(other) => {
            errs.add(
                &r.key("initial"),
                format!("unknown value `{other}`; use \"snapshot\" (send every existing row first) or \"none\" (only changes from now on)"),
            );
            None
        }
    };

    let delivery = check_delivery(&r, entities.as_deref(), declared, errs);
    if let (Some(d), Some(t)) = (&delivery, declared) {
        if d.reconcile_deep && t != "postgres" {
            errs.add(
                &join(&r.key("reconcile"), "deep"),
                format!(
                    "a deep reconciliation reads the target's rows back, which only a postgres \
                     target has; this target is of type {t}"
                ),
            );
        }
    }

    // The type's own keys, last: its checks may depend on the common ones.
    let settings = match (declared, types) {
        (Some(_), None) => Some(Arc::new(Unchecked) as _),
        (Some(type_name), Some(types)) if type_ok => {
            let target = TargetContext {
                #[cfg(test)]
                name,
                type_name,
                entities: entities.as_deref(),
                delivery: delivery.as_ref(),
                base_dir,
            };
            types.check(&target, &r, errs)
        }
        _ => None,
    };

    let (retry_initial, retry_max) = (retry_initial?, retry_max?);
    if !(name_ok && type_ok) || retry_max < retry_initial {
        return None;
    }
    Some(TargetConfig {
        name: name.to_string(),
        entities: entities?,
        batch_max_events: usize::try_from(batch_max_events?).ok()?,
        batch_linger: ms(batch_linger?),
        retry_initial: ms(retry_initial),
        retry_max: ms(retry_max),
        delivery: delivery?,
        initial: initial?,
        type_name: declared?.to_string(),
        settings: settings?,
    })
}

/// The keys valid in `[targets.NAME]` of type `declared`: the common ones and
/// the type's own. For a missing or unknown type every type's keys, so that
/// only the type itself is reported; without `types`, any key.
fn valid_target_keys<'a>(
    table: &'a Table,
    declared: Option<&str>,
    types: Option<&dyn TargetTypes>,
) -> Vec<&'a str> {
    let Some(types) = types else {
        return table.keys().map(String::as_str).collect();
    };
    let own: Vec<&'static [&'static str]> = match declared.and_then(|t| types.keys(t)) {
        Some(keys) => vec![keys],
        None => types.names().iter().filter_map(|t| types.keys(t)).collect(),
    };
    // The address key (url or path) right after type, as in the example file.
    let mut keys: Vec<&str> = vec!["type"];
    for list in &own {
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
    keys.extend(DELIVERY_KEYS);
    keys
}
