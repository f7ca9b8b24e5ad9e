//! Tests of the target types' checks through the combined loader: one
//! bad-config case per rule, defaults, and that core's problems and the
//! types' problems are reported together.

use std::path::Path;
use std::time::Duration;

use steward_core::config::{Config, ConfigError, ConfigErrors, Secret};
use toml::{Table, Value};

use super::SinkConfig;
use crate::envelope::Envelope;
use crate::file::FileTargetConfig;
use crate::http::config::{signing_key, HEADER_SOURCE_KEYS};
use crate::http::HttpTargetConfig;
use crate::nats::config::check_subject;
use crate::nats::NatsTargetConfig;
use crate::postgres::{DeleteMode, PostgresTargetConfig};

const MINIMAL: &str = r#"
[source]
url = "postgres://steward@localhost/odoo"

[state]
path = "state.redb"

[entities.product]
table = "product_template"
fields = { sku = "default_code" }

[targets.wms]
type = "http"
url = "https://wms.example/steward"
entities = ["product"]
"#;

fn parse_in(text: &str, base: &Path) -> Result<Config, ConfigErrors> {
    super::parse(text, &base.join("steward.toml"), base)
}

fn parse(text: &str) -> Result<Config, ConfigErrors> {
    parse_in(text, Path::new("/etc/steward"))
}

fn ok(text: &str) -> Config {
    match parse(text) {
        Ok(c) => c,
        Err(e) => panic!("expected a valid config, got {e}"),
    }
}

fn errors(text: &str) -> Vec<ConfigError> {
    match parse(text) {
        Ok(_) => panic!("expected errors, the config was accepted:\n{text}"),
        Err(e) => {
            assert!(!e.errors.is_empty());
            e.errors
        }
    }
}

/// Asserts an error at `key` whose message contains `fragment`.
fn assert_error(errs: &[ConfigError], key: &str, fragment: &str) {
    assert!(
        errs.iter()
            .any(|e| e.key == key && e.message.contains(fragment)),
        "no error at `{key}` containing `{fragment}` in:\n{}",
        errs.iter()
            .map(|e| format!("  {e}"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// Errors of MINIMAL with `key` (dotted, plain segments) set to the TOML value `value`.
fn errors_with(key: &str, value: &str) -> Vec<ConfigError> {
    errors(&edit(MINIMAL, &[(key, Some(value))]))
}

fn ok_with(key: &str, value: &str) -> Config {
    ok(&edit(MINIMAL, &[(key, Some(value))]))
}

/// MINIMAL (or another base) with keys set to TOML values (`Some`) or removed (`None`).
fn edit(base: &str, changes: &[(&str, Option<&str>)]) -> String {
    let mut doc: Table = base.parse().expect("test base parses");
    for (key, value) in changes {
        let parts: Vec<&str> = key.split('.').collect();
        let (last, parents) = parts.split_last().expect("non-empty key");
        let mut table = &mut doc;
        for p in parents {
            table = table
                .entry(p.to_string())
                .or_insert_with(|| Value::Table(Table::new()))
                .as_table_mut()
                .expect("parent is a table");
        }
        match value {
            Some(v) => {
                let holder: Table = format!("v = {v}").parse().expect("test value parses");
                table.insert(last.to_string(), holder["v"].clone());
            }
            None => {
                table.remove(*last);
            }
        }
    }
    toml::to_string(&doc).expect("serializes")
}

fn http(config: &Config) -> &HttpTargetConfig {
    match SinkConfig::of(&config.targets[0]) {
        Some(SinkConfig::Http(h)) => h,
        other => panic!("an http target, found {other:?}"),
    }
}

fn postgres(config: &Config) -> &PostgresTargetConfig {
    match SinkConfig::of(&config.targets[0]) {
        Some(SinkConfig::Postgres(p)) => p,
        other => panic!("a postgres target, found {other:?}"),
    }
}

fn nats(config: &Config) -> &NatsTargetConfig {
    match SinkConfig::of(&config.targets[0]) {
        Some(SinkConfig::Nats(n)) => n,
        other => panic!("a nats target, found {other:?}"),
    }
}

fn file(config: &Config) -> &FileTargetConfig {
    match SinkConfig::of(&config.targets[0]) {
        Some(SinkConfig::File(f)) => f,
        other => panic!("a file target, found {other:?}"),
    }
}

// ---------------------------------------------------------------- whole files

#[test]
fn many_errors_are_reported_together() {
    let text = edit(
        MINIMAL,
        &[
            ("source.slot", Some("\"Bad-Slot\"")),
            ("targets.wms.url", Some("\"not a url\"")),
            ("entities.product.colour", Some("\"red\"")),
        ],
    );
    let errs = errors(&text);
    assert_eq!(errs.len(), 3, "{errs:?}");
    assert_error(&errs, "source.slot", "lowercase letters");
    assert_error(&errs, "targets.wms.url", "not a valid URL");
    assert_error(
        &errs,
        "entities.product.colour",
        "valid keys here: table, key, fields",
    );
}

#[test]
fn secrets_never_appear_in_messages() {
    std::env::set_var("STEWARD_TEST_HUNTER", "hunter2");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("token"), "hunter2\nsecond line\n").unwrap();
    let text = edit(
        MINIMAL,
        &[
            ("source.password_env", Some("\"STEWARD_TEST_HUNTER\"")),
            ("source.slot", Some("\"Bad\"")),
            ("targets.wms.headers", Some("{ A = { env = \"STEWARD_TEST_HUNTER\" }, B = { file = \"token\" }, C = \"hunter2\\n\" }")),
        ],
    );
    let err = parse_in(&text, dir.path()).unwrap_err();
    assert_error(
        &err.errors,
        "source.slot",
        "not a valid replication slot name",
    );
    assert_error(
        &err.errors,
        "targets.wms.headers.B",
        "not a valid HTTP header value",
    );
    assert_error(
        &err.errors,
        "targets.wms.headers.C",
        "not a valid HTTP header value",
    );
    assert!(!err.to_string().contains("hunter2"), "{err}");
    assert!(!format!("{err:?}").contains("hunter2"));
}

// ---------------------------------------------------------------- http

#[test]
fn http_target_defaults() {
    let h = http(&ok(MINIMAL)).clone();
    assert_eq!(h.url.as_str(), "https://wms.example/steward");
    assert_eq!(h.timeout, Duration::from_millis(10_000));
    assert_eq!(h.connect_timeout, Duration::from_millis(5_000));
    assert!(h.headers.is_empty());
}

#[test]
fn target_unknown_key_names_full_key_and_valid_keys() {
    let errs = errors_with("targets.wms.batch_size", "10");
    assert_error(
        &errs,
        "targets.wms.batch_size",
        "unknown key; valid keys here: type, url, entities, batch_max_events, batch_linger_ms",
    );
    let errs = errors_with("targets.wms.batch_max_event", "10");
    assert_error(
        &errs,
        "targets.wms.batch_max_event",
        "did you mean `batch_max_events`?",
    );
}

#[test]
fn target_types() {
    assert_error(
        &errors_with("targets.wms.type", "\"kafka\""),
        "targets.wms.type",
        "unknown target type `kafka`; valid types: http",
    );
}

#[test]
fn target_url_rules() {
    assert_error(
        &errors(&edit(MINIMAL, &[("targets.wms.url", None)])),
        "targets.wms.url",
        "missing; the endpoint",
    );
    assert_error(
        &errors_with("targets.wms.url", "\"wms.example\""),
        "targets.wms.url",
        "not a valid URL",
    );
    assert_error(
        &errors_with("targets.wms.url", "\"ftp://wms.example/\""),
        "targets.wms.url",
        "use an http:// or https:// URL",
    );
    let errs = errors_with("targets.wms.url", "\"https://u:hunter2@wms.example/\"");
    assert_error(&errs, "targets.wms.url", "contains a password");
    assert!(!format!("{errs:?}").contains("hunter2"));
    let c = ok_with("targets.wms.url", "\"http://10.0.0.1:8080/in\"");
    assert_eq!(http(&c).url.port(), Some(8080));
}

#[test]
fn http_timeouts() {
    assert_error(
        &errors_with("targets.wms.timeout_ms", "0"),
        "targets.wms.timeout_ms",
        "between 1 and",
    );
    assert_error(
        &errors_with("targets.wms.connect_timeout_ms", "-5"),
        "targets.wms.connect_timeout_ms",
        "found -5",
    );
}

#[test]
fn headers_plain_file_and_env() {
    std::env::set_var("STEWARD_TEST_TOKEN", "Bearer abc");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("wms.key"), "k3y\n").unwrap();
    // Written out rather than built with `edit`, whose serializer would reorder the values.
    let text = format!(
        "{MINIMAL}headers = {{ \"X-Api-Key\" = {{ file = \"wms.key\" }}, \"X-Plant\" = \"P1\", \
         Authorization = {{ env = \"STEWARD_TEST_TOKEN\" }} }}\n"
    );
    let c = parse_in(&text, dir.path()).unwrap();
    let got: Vec<(&str, &str)> = http(&c)
        .headers
        .iter()
        .map(|(n, v)| (n.as_str(), v.expose()))
        .collect();
    assert_eq!(
        got,
        [
            ("X-Api-Key", "k3y"),
            ("X-Plant", "P1"),
            ("Authorization", "Bearer abc")
        ]
    );
}

#[test]
fn header_rules() {
    let h = "targets.wms.headers";
    assert_error(
        &errors_with(h, "{ \"Bad Name\" = \"x\" }"),
        "targets.wms.headers.\"Bad Name\"",
        "not a valid HTTP header name",
    );
    assert_error(
        &errors_with(h, "{ Host = \"x\" }"),
        "targets.wms.headers.Host",
        "reserved: host, content-length",
    );
    assert_error(
        &errors_with(h, "{ X-A = \"1\", x-a = \"2\" }"),
        "targets.wms.headers.x-a",
        "given twice",
    );
    assert_error(
        &errors_with(h, "{ X-A = \"a\\nb\" }"),
        "targets.wms.headers.X-A",
        "no newlines",
    );
    assert_error(
        &errors_with(h, "{ X-A = { file = \"/nonexistent/steward/key\" } }"),
        "targets.wms.headers.X-A.file",
        "cannot read `/nonexistent/steward/key`",
    );
    assert_error(
        &errors_with(h, "{ X-A = { env = \"STEWARD_TEST_UNSET_HDR\" } }"),
        "targets.wms.headers.X-A.env",
        "STEWARD_TEST_UNSET_HDR is not set",
    );
    assert_error(
        &errors_with(h, "{ X-A = { file = \"/a\", env = \"B\" } }"),
        "targets.wms.headers.X-A",
        "only one of file and env",
    );
    assert_error(
        &errors_with(h, "{ X-A = {} }"),
        "targets.wms.headers.X-A",
        "{ file = \"/path\" } or { env = \"NAME\" }",
    );
    assert_error(
        &errors_with(h, "{ X-A = { path = \"/a\" } }"),
        "targets.wms.headers.X-A.path",
        "valid keys here: file, env",
    );
    assert_error(
        &errors_with(h, "{ X-A = 1 }"),
        "targets.wms.headers.X-A",
        "expected a string, { file",
    );
    assert_error(
        &errors_with(h, "[\"X-A\"]"),
        h,
        "expected a table, found an array",
    );
}

#[test]
fn whsec_keys_are_decoded() {
    let k = signing_key(&Secret::new("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")).expect("b64");
    assert_eq!(k.0.len(), 24);
    let raw = signing_key(&Secret::new("plain-key")).expect("raw");
    assert_eq!(raw.0, b"plain-key");
    assert!(signing_key(&Secret::new("whsec_!!!")).is_err());
}

// ---------------------------------------------------------------- every type

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

fn parse_target(target: &str) -> Result<Config, Vec<ConfigError>> {
    let text = format!("{BASE}\n[targets.t]\n{target}");
    super::parse(
        &text,
        Path::new("/etc/steward/steward.toml"),
        Path::new("/etc/steward"),
    )
    .map_err(|e| e.errors)
}

fn error_at(target: &str, key: &str) -> String {
    let errs = parse_target(target).expect_err("invalid");
    errs.iter()
        .find(|e| e.key == key)
        .map(|e| e.message.clone())
        .unwrap_or_else(|| panic!("no error at {key}: {errs:?}"))
}

#[test]
fn example_documents_every_target_key() {
    let example = Config::example();
    for key in super::TYPES
        .iter()
        .flat_map(|t| t.keys)
        .chain(HEADER_SOURCE_KEYS)
    {
        assert!(
            example.contains(&format!("{key} =")),
            "example lacks `{key} =`"
        );
    }
    let config = super::parse(
        Config::example(),
        Path::new("/etc/steward/steward.toml"),
        Path::new("/etc/steward"),
    )
    .expect("example parses");
    let kinds: Vec<&str> = config
        .targets
        .iter()
        .map(|t| match SinkConfig::of(t) {
            Some(SinkConfig::Http(_)) => "http",
            Some(SinkConfig::Postgres(_)) => "postgres",
            Some(SinkConfig::Nats(_)) => "nats",
            Some(SinkConfig::File(_)) => "file",
            None => "unchecked",
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
    let c = parse_target(
        "type = \"postgres\"\nurl = \"postgres://w@db/mdm?sslmode=require\"\n\
         entities = [\"product\", \"partner\"]\ntable_prefix = \"mdm_\"\n\
         tables = { partner = \"partners\" }",
    )
    .expect("valid");
    let pg = postgres(&c);
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
    let errs = parse_target(
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
    let c =
        parse_target("type = \"nats\"\nurl = \"nats://127.0.0.1:4222\"\nentities = [\"product\"]")
            .expect("valid");
    let n = nats(&c);
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

    let c = parse_target("type = \"file\"\npath = \"out/events.ndjson\"\nentities = [\"product\"]\nenvelope = \"debezium\"")
        .expect("valid");
    let f = file(&c);
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
fn subjects_are_checked() {
    assert!(check_subject("steward.{entity}.{op}").is_ok());
    assert!(check_subject("mdm.{target}.{entity}.{key}").is_ok());
    assert!(check_subject("steward.{nope}").is_err());
    assert!(check_subject("steward.>").is_err());
    assert!(check_subject("a..b").is_err());
}

#[test]
fn a_file_target_takes_one_batch_at_a_time() {
    let file = MINIMAL.replace(
        "type = \"http\"\nurl = \"https://wms.example/steward\"",
        "type = \"file\"\npath = \"/tmp/steward-events.ndjson\"\nmax_in_flight = 2",
    );
    assert_error(
        &errors(&file),
        "targets.wms.max_in_flight",
        "one batch at a time",
    );
}

#[test]
fn headers_steward_sets_cannot_be_configured() {
    let h = "targets.wms.headers";
    for name in crate::http::config::RESERVED_HEADERS {
        let written = name.to_ascii_uppercase();
        assert_error(
            &errors_with(h, &format!("{{ {written} = \"x\" }}")),
            &format!("targets.wms.headers.{written}"),
            "reserved: host, content-length, transfer-encoding, connection, keep-alive, \
             proxy-connection, te, upgrade, content-type",
        );
    }

    std::env::set_var("STEWARD_TEST_BEARER", "t0ken");
    let text = edit(
        MINIMAL,
        &[
            (
                "targets.wms.bearer_token_env",
                Some("\"STEWARD_TEST_BEARER\""),
            ),
            (
                "targets.wms.headers",
                Some("{ authorization = \"Basic x\" }"),
            ),
        ],
    );
    assert_error(
        &errors(&text),
        "targets.wms.headers.authorization",
        "is set by targets.wms.bearer_token_env, which would replace this value",
    );

    std::env::set_var("STEWARD_TEST_WHSEC", "k3y");
    let text = edit(
        MINIMAL,
        &[
            (
                "targets.wms.signing_secret_env",
                Some("\"STEWARD_TEST_WHSEC\""),
            ),
            ("targets.wms.headers", Some("{ Webhook-Id = \"1\" }")),
        ],
    );
    assert_error(
        &errors(&text),
        "targets.wms.headers.Webhook-Id",
        "is set by targets.wms.signing_secret_env",
    );
    // Unsigned, the Standard Webhooks headers are the operator's own.
    let c = ok_with("targets.wms.headers", "{ Webhook-Id = \"1\" }");
    assert_eq!(http(&c).headers[0].0, "Webhook-Id");
}

#[test]
fn a_sink_needs_settings_checked_by_this_loader() {
    let c = Config::parse(
        MINIMAL,
        Path::new("/etc/steward/steward.toml"),
        Path::new("/etc/steward"),
    )
    .expect("valid for core");
    assert!(SinkConfig::of(&c.targets[0]).is_none());
    match crate::build(&c.targets[0], &c) {
        Ok(_) => panic!("a sink was built from unchecked settings"),
        Err(e) => assert!(
            e.to_string()
                .starts_with("targets.wms: the http settings were not checked"),
            "{e}"
        ),
    }
    assert!(SinkConfig::of(&ok(MINIMAL).targets[0]).is_some());
}
