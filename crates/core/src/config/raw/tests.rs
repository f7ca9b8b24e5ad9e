//! Tests of configuration checking: one bad-config case per rule, plus the
//! example file, defaults, ordering, error collection and secret hygiene.
//! The target types' own keys are checked, and tested, in the sinks crate.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use toml::{Table, Value};

use crate::config::check::{Errors, Reader};
use crate::config::{
    Config, ConfigError, ConfigErrors, SslMode, TargetContext, TargetSettings, TargetTypes,
    Unchecked,
};

/// Two target types standing in for the sinks crate's: `http` with a
/// required `url`, and `file` with a `path`; `check` records what it was given.
#[derive(Default)]
struct TwoTypes {
    seen: Mutex<Vec<String>>,
}

impl TargetTypes for TwoTypes {
    fn names(&self) -> &[&'static str] {
        &["http", "file"]
    }

    fn keys(&self, type_name: &str) -> Option<&'static [&'static str]> {
        match type_name {
            "http" => Some(&["url", "timeout_ms"]),
            "file" => Some(&["path"]),
            _ => None,
        }
    }

    fn check(
        &self,
        target: &TargetContext,
        r: &Reader,
        errs: &mut Errors,
    ) -> Option<Arc<dyn TargetSettings>> {
        self.seen.lock().unwrap().push(format!(
            "{} {} {:?} {:?} {}",
            target.name,
            target.type_name,
            target.entities,
            target.delivery.map(|d| d.max_in_flight),
            target.base_dir.display()
        ));
        let address = if target.type_name == "http" {
            "url"
        } else {
            "path"
        };
        r.required_string(address, "where to deliver", errs)?;
        Some(Arc::new(Unchecked))
    }
}

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
    Config::parse(text, &base.join("steward.toml"), base)
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

// ---------------------------------------------------------------- whole files

#[test]
fn example_parses() {
    let config = ok(Config::example());
    assert_eq!(config.entities.len(), 2);
    assert_eq!(config.targets[0].entities, ["product", "partner"]);
    assert_eq!(
        config.metrics.listen,
        Some("127.0.0.1:9187".parse().unwrap())
    );
    let name = &config.entity("product").unwrap().fields[1];
    assert_eq!(name.source.path, ["de_DE"]);
    assert_eq!(name.fallback.as_ref().unwrap().path, ["en_US"]);
}

#[test]
fn example_documents_every_key() {
    let example = Config::example();
    for key in super::SOURCE_KEYS
        .iter()
        .chain(super::STATE_KEYS)
        .chain(super::METRICS_KEYS)
        .chain(super::ENTITY_KEYS)
        .chain(super::FIELD_KEYS)
        .chain(super::TARGET_KEYS)
        .chain(super::delivery::DELIVERY_KEYS)
        .chain(super::delivery::WINDOW_KEYS)
    {
        assert!(
            example.contains(&format!("{key} =")),
            "example lacks `{key} =`"
        );
    }
}

#[test]
fn minimal_config_has_all_defaults() {
    let c = ok(MINIMAL);
    let s = &c.source;
    assert_eq!(s.url_display, "postgres://steward@localhost/odoo");
    assert_eq!((s.host.as_str(), s.port), ("localhost", 5432));
    assert_eq!((s.user.as_str(), s.dbname.as_str()), ("steward", "odoo"));
    assert!(s.password.is_none());
    assert_eq!(s.sslmode, SslMode::Prefer);
    assert_eq!(s.sslrootcert, None);
    assert_eq!(s.connect_timeout, Duration::from_millis(10_000));
    assert_eq!(
        (s.slot.as_str(), s.publication.as_str()),
        ("steward", "steward")
    );
    assert_eq!(s.status_interval, Duration::from_millis(10_000));
    assert!(s.create_publication);

    assert_eq!(c.state.path, PathBuf::from("/etc/steward/state.redb"));
    assert_eq!(c.state.commit_max_events, 20_000);
    assert_eq!(c.state.commit_max_delay, Duration::from_millis(20));
    assert_eq!(c.metrics.listen, Some("127.0.0.1:9187".parse().unwrap()));

    let e = &c.entities[0];
    assert_eq!(
        (e.name.as_str(), e.qualified_table()),
        ("product", "public.product_template".into())
    );
    assert_eq!(e.key, ["id"]);
    assert_eq!(e.fields.len(), 1);
    assert_eq!(e.fields[0].name, "sku");
    assert_eq!(e.fields[0].source.column, "default_code");
    assert!(e.fields[0].source.path.is_empty());
    assert_eq!(e.fields[0].fallback, None);

    let t = &c.targets[0];
    assert_eq!(t.name, "wms");
    assert_eq!(t.entities, ["product"]);
    assert_eq!(t.batch_max_events, 500);
    assert_eq!(t.batch_linger, Duration::from_millis(50));
    assert_eq!(t.retry_initial, Duration::from_millis(200));
    assert_eq!(t.retry_max, Duration::from_millis(60_000));
    assert_eq!(t.type_name, "http");
}

#[test]
fn load_resolves_against_the_files_directory() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("steward.toml");
    std::fs::write(&file, MINIMAL).unwrap();
    let c = Config::load(&file, &TwoTypes::default()).unwrap();
    assert_eq!(c.state.path, dir.path().join("state.redb"));

    let missing = dir.path().join("nope.toml");
    let err = Config::load(&missing, &TwoTypes::default()).unwrap_err();
    assert_eq!(err.path, missing);
    assert!(err.errors[0].message.contains("cannot read the file"));
}

#[test]
fn syntax_error_has_line_and_column() {
    let text = "[source]\nurl = \"postgres://s@h/d\"\nslot = = 3\n";
    let errs = errors(text);
    assert_eq!(errs.len(), 1);
    assert_eq!(errs[0].key, "");
    assert!(
        errs[0].message.contains("line 3, column"),
        "{}",
        errs[0].message
    );
    let dup = errors("[state]\npath = \"a\"\npath = \"b\"\n");
    assert!(dup[0].message.contains("line 3"), "{}", dup[0].message);
}

#[test]
fn error_display_names_the_file() {
    let err = parse(&edit(MINIMAL, &[("source.slot", Some("\"Bad\""))])).unwrap_err();
    let text = err.to_string();
    assert!(
        text.starts_with("1 configuration error in /etc/steward/steward.toml"),
        "{text}"
    );
    assert!(text.contains("  - source.slot: "), "{text}");
}

#[test]
fn file_order_of_entities_targets_and_fields_is_kept() {
    let text = r#"
[source]
url = "postgres://steward@localhost/odoo"
[state]
path = "/s.redb"
[entities.zeta]
table = "z"
fields = { zz = "a", aa = "b", mm = "c", bb = "d" }
[entities.alpha]
table = "a"
fields = { x = "x" }
[entities.mid]
table = "m"
fields = { x = "x" }
[targets.zz]
type = "http"
url = "http://z/"
entities = ["mid", "zeta"]
[targets.aa]
type = "http"
url = "http://a/"
entities = ["alpha"]
"#;
    let c = ok(text);
    let names: Vec<_> = c.entities.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["zeta", "alpha", "mid"]);
    let fields: Vec<_> = c.entities[0]
        .fields
        .iter()
        .map(|f| f.name.as_str())
        .collect();
    assert_eq!(fields, ["zz", "aa", "mm", "bb"]);
    let targets: Vec<_> = c.targets.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(targets, ["zz", "aa"]);
    assert_eq!(c.targets[0].entities, ["mid", "zeta"]);
}

#[test]
fn unknown_top_level_key() {
    let errs = errors_with("sources", "{}");
    assert_error(&errs, "sources", "did you mean `source`?");
    assert_error(
        &errs,
        "sources",
        "valid keys here: source, state, metrics, entities, targets",
    );
}

#[test]
fn sections_must_be_tables() {
    let errs = errors_with("metrics", "3");
    assert_error(&errs, "metrics", "expected a table, found an integer");
}

// ---------------------------------------------------------------- [source]

#[test]
fn source_section_and_url_are_required() {
    let errs = errors(&edit(MINIMAL, &[("source", None)]));
    assert_error(&errs, "source", "missing section [source]");
    let errs = errors(&edit(MINIMAL, &[("source.url", None)]));
    assert_error(&errs, "source.url", "missing; the database to read");
}

#[test]
fn source_url_rules() {
    assert_error(
        &errors_with("source.url", "\"postgres://localhost/odoo\""),
        "source.url",
        "add a user: postgres://USER@host/db",
    );
    assert_error(
        &errors_with("source.url", "\"http://x@y/z\""),
        "source.url",
        "postgres://",
    );
    assert_error(
        &errors_with("source.url", "\"postgres://s@h/d?sslmode=allow\""),
        "source.url",
        "valid: disable, prefer, require, verify-full",
    );
    assert_error(
        &errors_with("source.url", "\"postgres://s@h/d?application_name=x\""),
        "source.url",
        "supported parameters",
    );
    assert_error(
        &errors_with("source.url", "42"),
        "source.url",
        "expected a string, found an integer",
    );
    let errs = errors_with(
        "source.url",
        "\"postgres://steward:hunter2@localhost/odoo\"",
    );
    assert_error(&errs, "source.url", "contains a password");
    assert_error(&errs, "source.url", "password_env");
    assert!(!format!("{errs:?}").contains("hunter2"));
}

#[test]
fn source_url_socket_and_params() {
    let c = ok_with(
        "source.url",
        "\"postgres://st%65ward@%2Frun%2Fpostgresql:5433/odoo?connect_timeout=3&sslmode=disable\"",
    );
    assert_eq!(c.source.user, "steward");
    assert_eq!(c.source.host, "/run/postgresql");
    assert_eq!(c.source.port, 5433);
    assert_eq!(c.source.sslmode, SslMode::Disable);
    assert_eq!(c.source.connect_timeout, Duration::from_secs(3));
}

#[test]
fn connect_timeout_given_twice() {
    let text = edit(
        MINIMAL,
        &[
            ("source.url", Some("\"postgres://s@h/d?connect_timeout=3\"")),
            ("source.connect_timeout_ms", Some("3000")),
        ],
    );
    assert_error(&errors(&text), "source.connect_timeout_ms", "given twice");
    assert_eq!(
        ok_with("source.connect_timeout_ms", "2500")
            .source
            .connect_timeout,
        Duration::from_millis(2500)
    );
    assert_error(
        &errors_with("source.connect_timeout_ms", "0"),
        "source.connect_timeout_ms",
        "between 1 and 3600000",
    );
}

#[test]
fn sslrootcert_is_resolved_and_must_exist() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ca.pem"), "pem").unwrap();
    let text = edit(
        MINIMAL,
        &[(
            "source.url",
            Some("\"postgres://s@h/d?sslmode=verify-full&sslrootcert=ca.pem\""),
        )],
    );
    let c = parse_in(&text, dir.path()).unwrap();
    assert_eq!(c.source.sslrootcert, Some(dir.path().join("ca.pem")));
    let text = edit(
        MINIMAL,
        &[(
            "source.url",
            Some("\"postgres://s@h/d?sslrootcert=missing.pem\""),
        )],
    );
    let errs = parse_in(&text, dir.path()).unwrap_err().errors;
    assert_error(&errs, "source.url", "parameter sslrootcert: cannot read");
    assert_error(&errs, "source.url", "missing.pem");
}

#[test]
fn password_file_is_read_trimmed_and_relative() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("pgpass"), "s3cret\n").unwrap();
    let text = edit(MINIMAL, &[("source.password_file", Some("\"pgpass\""))]);
    let c = parse_in(&text, dir.path()).unwrap();
    assert_eq!(c.source.password.as_ref().unwrap().expose(), "s3cret");

    std::fs::write(dir.path().join("crlf"), "s3cret\r\n").unwrap();
    let text = edit(MINIMAL, &[("source.password_file", Some("\"crlf\""))]);
    let c = parse_in(&text, dir.path()).unwrap();
    assert_eq!(c.source.password.as_ref().unwrap().expose(), "s3cret");

    let text = edit(MINIMAL, &[("source.password_file", Some("\"absent\""))]);
    let errs = parse_in(&text, dir.path()).unwrap_err().errors;
    assert_error(&errs, "source.password_file", "cannot read");
    assert_error(
        &errs,
        "source.password_file",
        &dir.path().join("absent").display().to_string(),
    );

    std::fs::write(dir.path().join("empty"), "\n").unwrap();
    let text = edit(MINIMAL, &[("source.password_file", Some("\"empty\""))]);
    assert_error(
        &parse_in(&text, dir.path()).unwrap_err().errors,
        "source.password_file",
        "is empty",
    );
}

#[test]
fn password_env_must_be_set_and_not_empty() {
    std::env::set_var("STEWARD_TEST_PW_SET", "pw");
    std::env::set_var("STEWARD_TEST_PW_EMPTY", "");
    std::env::remove_var("STEWARD_TEST_PW_UNSET");
    let c = ok_with("source.password_env", "\"STEWARD_TEST_PW_SET\"");
    assert_eq!(c.source.password.unwrap().expose(), "pw");
    assert_error(
        &errors_with("source.password_env", "\"STEWARD_TEST_PW_UNSET\""),
        "source.password_env",
        "STEWARD_TEST_PW_UNSET is not set",
    );
    assert_error(
        &errors_with("source.password_env", "\"STEWARD_TEST_PW_EMPTY\""),
        "source.password_env",
        "is empty",
    );
    assert_error(
        &errors_with("source.password_env", "\"A=B\""),
        "source.password_env",
        "not an environment variable name",
    );
}

#[test]
fn password_file_and_env_are_exclusive() {
    std::env::set_var("STEWARD_TEST_PW_BOTH", "pw");
    let text = edit(
        MINIMAL,
        &[
            ("source.password_file", Some("\"/x\"")),
            ("source.password_env", Some("\"STEWARD_TEST_PW_BOTH\"")),
        ],
    );
    assert_error(
        &errors(&text),
        "source.password_env",
        "set only one of source.password_file and source.password_env",
    );
}

#[test]
fn slot_and_publication_names() {
    assert_error(
        &errors_with("source.slot", "\"Steward\""),
        "source.slot",
        "1 to 63 lowercase letters, digits and _",
    );
    assert_error(
        &errors_with("source.slot", "\"\""),
        "source.slot",
        "not a valid replication slot name",
    );
    assert_error(
        &errors_with("source.slot", &format!("\"{}\"", "a".repeat(64))),
        "source.slot",
        "1 to 63",
    );
    assert_eq!(ok_with("source.slot", "\"odoo_2\"").source.slot, "odoo_2");
    assert_error(
        &errors_with("source.publication", "\"my-pub\""),
        "source.publication",
        "letters, digits and _",
    );
    assert_error(
        &errors_with("source.publication", "\"1pub\""),
        "source.publication",
        "starting with a letter or _",
    );
    assert_eq!(
        ok_with("source.publication", "\"Steward_Pub\"")
            .source
            .publication,
        "Steward_Pub"
    );
}

#[test]
fn source_numbers_and_bools() {
    assert_error(
        &errors_with("source.status_interval_ms", "99"),
        "source.status_interval_ms",
        "between 100 and 3600000 (milliseconds), found 99",
    );
    assert_error(
        &errors_with("source.status_interval_ms", "3600001"),
        "source.status_interval_ms",
        "between 100 and 3600000",
    );
    assert_error(
        &errors_with("source.status_interval_ms", "\"10s\""),
        "source.status_interval_ms",
        "expected an integer (milliseconds)",
    );
    assert_error(
        &errors_with("source.create_publication", "\"yes\""),
        "source.create_publication",
        "expected true or false",
    );
    assert!(
        !ok_with("source.create_publication", "false")
            .source
            .create_publication
    );
}

#[test]
fn source_unknown_key_lists_valid_keys() {
    let errs = errors_with("source.password", "\"x\"");
    assert_error(&errs, "source.password", "unknown key");
    assert_error(
        &errs,
        "source.password",
        "valid keys here: url, password_file, password_env, slot",
    );
}

// ---------------------------------------------------------------- [state], [metrics]

#[test]
fn state_rules() {
    assert_error(
        &errors(&edit(MINIMAL, &[("state", None)])),
        "state",
        "missing section [state]",
    );
    assert_error(
        &errors(&edit(MINIMAL, &[("state.path", None)])),
        "state.path",
        "missing; the redb state file",
    );
    assert_error(&errors_with("state.path", "\"\""), "state.path", "is empty");
    assert_eq!(
        ok_with("state.path", "\"/var/lib/s.redb\"").state.path,
        PathBuf::from("/var/lib/s.redb")
    );
    let dir = tempfile::tempdir().unwrap();
    let quoted = |p: &Path| format!("{:?}", p.display().to_string());
    assert_error(
        &errors_with("state.path", &quoted(dir.path())),
        "state.path",
        "is a directory; name the state file inside it, e.g.",
    );
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, "").unwrap();
    assert_error(
        &errors_with("state.path", &quoted(&file.join("deeper/s.redb"))),
        "state.path",
        "is not a directory, so the state file",
    );
    // steward creates a missing directory itself.
    let missing = dir.path().join("new/sub/s.redb");
    assert_eq!(ok_with("state.path", &quoted(&missing)).state.path, missing);
    assert_error(
        &errors_with("state.commit_max_events", "0"),
        "state.commit_max_events",
        "between 1 and 1000000 (events)",
    );
    assert_error(
        &errors_with("state.commit_max_delay_ms", "10001"),
        "state.commit_max_delay_ms",
        "between 0 and 10000",
    );
    assert_eq!(
        ok_with("state.commit_max_delay_ms", "0")
            .state
            .commit_max_delay,
        Duration::ZERO
    );
    assert_error(
        &errors_with("state.dir", "\"x\""),
        "state.dir",
        "valid keys here: path, commit_max_events, commit_max_delay_ms",
    );
}

#[test]
fn metrics_rules() {
    let addr: SocketAddr = "[::1]:9000".parse().unwrap();
    assert_eq!(
        ok_with("metrics.listen", "\"[::1]:9000\"").metrics.listen,
        Some(addr)
    );
    assert_eq!(ok_with("metrics.listen", "\"\"").metrics.listen, None);
    assert_eq!(
        ok_with("metrics", "{}").metrics.listen,
        Some("127.0.0.1:9187".parse().unwrap())
    );
    assert_error(
        &errors_with("metrics.listen", "\"localhost:9187\""),
        "metrics.listen",
        "write IP:PORT such as 127.0.0.1:9187",
    );
    assert_error(
        &errors_with("metrics.port", "1"),
        "metrics.port",
        "valid keys here: listen",
    );
}

#[test]
fn control_rules() {
    let default = ok_with("state.path", "\"/var/lib/steward/s.redb\"");
    assert_eq!(
        default.control_socket(),
        PathBuf::from("/var/lib/steward/s.redb.sock")
    );
    assert_eq!(default.control.group, None);
    let set = ok_with(
        "control",
        "{ socket = \"/run/steward/control.sock\", group = \"steward-ops\" }",
    );
    assert_eq!(
        set.control_socket(),
        PathBuf::from("/run/steward/control.sock")
    );
    assert_eq!(set.control.group.as_deref(), Some("steward-ops"));
    assert_error(
        &errors_with("control.group", "\"\""),
        "control.group",
        "is empty",
    );
    assert_error(
        &errors_with("control.socket", "\"\""),
        "control.socket",
        "is empty",
    );
    assert_error(
        &errors_with("control.group", "7"),
        "control.group",
        "expected a string",
    );
    let long = format!("\"/run/{}.sock\"", "s".repeat(120));
    assert_error(
        &errors_with("control.socket", &long),
        "control.socket",
        "longer than a Unix socket path may be",
    );
    assert_error(
        &errors_with("control.mode", "\"0666\""),
        "control.mode",
        "valid keys here: socket, group",
    );
}

#[test]
fn console_rules() {
    let default = ok(MINIMAL);
    assert_eq!(
        default.console.listen, None,
        "the console is off by default"
    );
    assert_eq!(default.console.tls, None);
    let port = ok_with("console", "{ listen = \"9190\" }");
    assert_eq!(
        port.console.listen,
        Some("127.0.0.1:9190".parse::<SocketAddr>().unwrap()),
        "a bare port is loopback"
    );
    let v6 = ok_with("console", "{ listen = \"[::1]:9190\" }");
    assert_eq!(v6.console.listen, Some("[::1]:9190".parse().unwrap()));
    assert_error(
        &errors_with("console", "{ listen = \"0.0.0.0:9190\" }"),
        "console.listen",
        "not a loopback address",
    );
    assert_error(
        &errors_with("console", "{ listen = \"192.0.2.7:443\" }"),
        "console.listen",
        "give tls_cert and tls_key",
    );
    let tls = ok_with(
        "console",
        "{ listen = \"0.0.0.0:9443\", tls_cert = \"/etc/steward/c.pem\", tls_key = \"k.pem\" }",
    );
    assert_eq!(tls.console.listen, Some("0.0.0.0:9443".parse().unwrap()));
    let files = tls.console.tls.expect("TLS files");
    assert_eq!(files.cert, PathBuf::from("/etc/steward/c.pem"));
    assert!(files.key.is_absolute(), "{}", files.key.display());
    assert_error(
        &errors_with("console", "{ listen = \"9190\", tls_cert = \"c.pem\" }"),
        "console.tls_key",
        "is missing: tls_cert is given",
    );
    assert_error(
        &errors_with("console", "{ tls_key = \"\" }"),
        "console.tls_key",
        "is empty",
    );
    assert_error(
        &errors_with("console", "{ listen = \"localhost:x\" }"),
        "console.listen",
        "not a port or a socket address",
    );
    assert_error(
        &errors_with("console", "{ listen = 9190 }"),
        "console.listen",
        "expected a string",
    );
    assert_error(
        &errors_with("console", "{ port = 1 }"),
        "console.port",
        "valid keys here: users_file, listen, tls_cert, tls_key",
    );
}

// ---------------------------------------------------------------- [entities.*]

#[test]
fn at_least_one_entity_and_target() {
    let errs = errors(&edit(MINIMAL, &[("entities", None), ("targets", None)]));
    assert_error(&errs, "entities", "at least one entity is required");
    assert_error(&errs, "targets", "at least one target is required");
    let errs = errors(&edit(
        MINIMAL,
        &[("entities", Some("{}")), ("targets", Some("{}"))],
    ));
    assert_error(&errs, "entities", "at least one entity is required");
    assert_error(&errs, "targets", "at least one target is required");
}

#[test]
fn entity_names() {
    let text = MINIMAL
        .replace("[entities.product]", "[entities.Product]")
        .replace("[\"product\"]", "[\"Product\"]");
    assert_error(
        &errors(&text),
        "entities.Product",
        "entity name `Product` is not valid",
    );
    assert_error(
        &errors_with("entities.p2", "3"),
        "entities.p2",
        "expected a table",
    );
}

#[test]
fn entity_table_rules() {
    assert_error(
        &errors(&edit(MINIMAL, &[("entities.product.table", None)])),
        "entities.product.table",
        "missing; the source table",
    );
    let c = ok_with("entities.product.table", "\"odoo.product_template\"");
    assert_eq!(c.entities[0].schema, "odoo");
    assert_eq!(c.entities[0].table, "product_template");
    assert_error(
        &errors_with("entities.product.table", "\"a.b.c\""),
        "entities.product.table",
        "write \"schema.table\" or \"table\"",
    );
    assert_error(
        &errors_with("entities.product.table", "\"Product\""),
        "entities.product.table",
        "write `product`",
    );
    assert_error(
        &errors_with("entities.product.table", "\".x\""),
        "entities.product.table",
        "schema name is empty",
    );
}

#[test]
fn entity_key_rules() {
    assert_eq!(
        ok_with("entities.product.key", "[\"company_id\", \"code\"]").entities[0].key,
        ["company_id", "code"]
    );
    assert_error(
        &errors_with("entities.product.key", "[]"),
        "entities.product.key",
        "is empty",
    );
    assert_error(
        &errors_with("entities.product.key", "[\"id\", \"id\"]"),
        "entities.product.key",
        "listed twice",
    );
    assert_error(
        &errors_with("entities.product.key", "[\"my id\"]"),
        "entities.product.key",
        "not a valid SQL identifier",
    );
    assert_error(
        &errors_with("entities.product.key", "\"id\""),
        "entities.product.key",
        "expected an array of strings",
    );
    assert_error(
        &errors_with("entities.product.key", "[1]"),
        "entities.product.key",
        "item 1 must be a string",
    );
}

#[test]
fn entity_field_rules() {
    assert_error(
        &errors(&edit(MINIMAL, &[("entities.product.fields", None)])),
        "entities.product.fields",
        "missing; map document fields",
    );
    assert_error(
        &errors_with("entities.product.fields", "{}"),
        "entities.product.fields",
        "map at least one field",
    );
    assert_error(
        &errors_with("entities.product.fields", "{ \"1x\" = \"a\" }"),
        "entities.product.fields.1x",
        "field name `1x` is not valid",
    );
    assert_error(
        &errors_with("entities.product.fields", "{ x = \"Name\" }"),
        "entities.product.fields.x",
        "column name",
    );
    assert_error(
        &errors_with("entities.product.fields", "{ x = \"name..en\" }"),
        "entities.product.fields.x",
        "empty JSON path segment",
    );
    assert_error(
        &errors_with("entities.product.fields", "{ x = 1 }"),
        "entities.product.fields.x",
        "or a table { path = ",
    );
    assert_error(
        &errors_with("entities.product.fields", "{ x = { fallback = \"a\" } }"),
        "entities.product.fields.x.path",
        "missing",
    );
    assert_error(
        &errors_with(
            "entities.product.fields",
            "{ x = { path = \"a\", default = \"b\" } }",
        ),
        "entities.product.fields.x.default",
        "valid keys here: path, fallback",
    );
    assert_error(
        &errors_with(
            "entities.product.fields",
            "{ x = { path = \"a\", fallback = \"B\" } }",
        ),
        "entities.product.fields.x.fallback",
        "column name",
    );
}

#[test]
fn field_string_and_table_forms() {
    let c = ok_with(
        "entities.product.fields",
        "{ sku = \"default_code\", name = \"name.en_US\", deep = \"data.a.b.c\", label = { path = \"name.de_DE\", fallback = \"name.en_US\" }, plain = { path = \"list_price\" } }",
    );
    let f = &c.entities[0].fields;
    assert_eq!(
        (f[0].source.column.as_str(), f[0].source.path.len()),
        ("default_code", 0)
    );
    assert_eq!(f[1].source.column, "name");
    assert_eq!(f[1].source.path, ["en_US"]);
    assert_eq!(f[2].source.path, ["a", "b", "c"]);
    assert_eq!(f[3].source.path, ["de_DE"]);
    let fb = f[3].fallback.as_ref().unwrap();
    assert_eq!(
        (fb.column.as_str(), fb.path.clone()),
        ("name", vec!["en_US".to_string()])
    );
    assert_eq!(f[4].source.column, "list_price");
    assert_eq!(f[4].fallback, None);
}

// ---------------------------------------------------------------- [targets.*]

#[test]
fn target_types_check_their_own_keys_with_the_rest() {
    let types = TwoTypes::default();
    let parse = |text: &str| {
        Config::parse_with(
            text,
            Path::new("/etc/steward/steward.toml"),
            Path::new("/etc/steward"),
            &types,
        )
    };
    let c = parse(MINIMAL).expect("valid");
    assert_eq!(c.targets[0].type_name, "http");
    assert_eq!(
        types.seen.lock().unwrap().as_slice(),
        ["wms http Some([\"product\"]) Some(1) /etc/steward"]
    );

    let text = edit(
        MINIMAL,
        &[
            ("source.slot", Some("\"Bad\"")),
            ("targets.wms.url", None),
            ("targets.wms.path", Some("\"x\"")),
        ],
    );
    let errs = parse(&text).unwrap_err().errors;
    assert_eq!(errs.len(), 3, "{errs:?}");
    assert_error(&errs, "source.slot", "lowercase letters");
    assert_error(
        &errs,
        "targets.wms.path",
        "valid keys here: type, url, entities, batch_max_events",
    );
    assert_error(&errs, "targets.wms.url", "missing; where to deliver");

    let errs = parse(&edit(MINIMAL, &[("targets.wms.type", Some("\"kafka\""))]))
        .unwrap_err()
        .errors;
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert_error(
        &errs,
        "targets.wms.type",
        "unknown target type `kafka`; valid types: http, file",
    );

    // Without types, a type's keys are taken as written and not checked.
    let c = ok(&edit(MINIMAL, &[("targets.wms.type", Some("\"kafka\""))]));
    assert_eq!(c.targets[0].type_name, "kafka");
}

#[test]
fn target_names_and_types() {
    let text = MINIMAL.replace("[targets.wms]", "[targets.Wms]");
    assert_error(
        &errors(&text),
        "targets.Wms",
        "target name `Wms` is not valid",
    );
    let text = MINIMAL.replace("[targets.wms]", "[targets.wms-eu_2]");
    assert_eq!(ok(&text).targets[0].name, "wms-eu_2");
    assert_error(
        &errors(&edit(MINIMAL, &[("targets.wms.type", None)])),
        "targets.wms.type",
        "missing; the target type",
    );
}

#[test]
fn target_entities_rules() {
    assert_error(
        &errors(&edit(MINIMAL, &[("targets.wms.entities", None)])),
        "targets.wms.entities",
        "missing; list the entities",
    );
    assert_error(
        &errors_with("targets.wms.entities", "[]"),
        "targets.wms.entities",
        "configured entities: product",
    );
    let errs = errors_with("targets.wms.entities", "[\"prodcut\"]");
    assert_error(
        &errs,
        "targets.wms.entities",
        "unknown entity `prodcut`; configured entities: product",
    );
    assert_error(
        &errors_with("targets.wms.entities", "[\"product\", \"product\"]"),
        "targets.wms.entities",
        "listed twice",
    );
}

#[test]
fn target_numbers() {
    assert_error(
        &errors_with("targets.wms.batch_max_events", "0"),
        "targets.wms.batch_max_events",
        "between 1 and 10000",
    );
    assert_error(
        &errors_with("targets.wms.batch_max_events", "10001"),
        "targets.wms.batch_max_events",
        "between 1 and 10000",
    );
    assert_error(
        &errors_with("targets.wms.batch_linger_ms", "60001"),
        "targets.wms.batch_linger_ms",
        "between 0 and 60000",
    );
    assert_error(
        &errors_with("targets.wms.retry_initial_ms", "1.5"),
        "targets.wms.retry_initial_ms",
        "found a float",
    );
    let text = edit(
        MINIMAL,
        &[
            ("targets.wms.retry_initial_ms", Some("5000")),
            ("targets.wms.retry_max_ms", Some("1000")),
        ],
    );
    assert_error(
        &errors(&text),
        "targets.wms.retry_max_ms",
        "must be at least retry_initial_ms (5000), found 1000",
    );
    let t = &ok_with("targets.wms.batch_linger_ms", "0").targets[0];
    assert_eq!(t.batch_linger, Duration::ZERO);
}

// ---------------------------------------------------------------- delivery policy

#[test]
fn delivery_policy_defaults_and_example() {
    let c = ok(MINIMAL);
    assert_eq!(
        c.targets[0].delivery,
        crate::config::DeliveryPolicy::default()
    );
    let c = ok(Config::example());
    let d = &c.targets[0].delivery;
    assert_eq!(d.window_of("product"), &crate::config::Window::Realtime);
    assert_eq!(
        d.window_of("partner"),
        &crate::config::Window::Every(Duration::from_secs(4 * 3600))
    );
}

#[test]
fn delivery_policy_keys_are_checked() {
    let text = format!(
        "{MINIMAL}max_attempts = 5\nmax_age_ms = 60000\nrate_limit_events_per_sec = 100\nmode = \"window\"\nat = \"02:00\"\n"
    );
    let d = ok(&text).targets[0].delivery.clone();
    assert_eq!(d.max_attempts, 5);
    assert_eq!(d.max_age, Some(Duration::from_secs(60)));
    assert_eq!(d.rate_limit_events_per_sec, Some(100));
    assert_eq!(d.rate_limit_requests_per_sec, None);
    assert_eq!(d.window, crate::config::Window::DailyAt(7200));

    for (extra, key) in [
        ("mode = \"window\"\n", "targets.wms.mode"),
        ("mode = \"batch\"\n", "targets.wms.mode"),
        ("every = \"4x\"\n", "targets.wms.every"),
        ("at = \"25:00\"\n", "targets.wms.at"),
        ("every = \"4h\"\nat = \"02:00\"\n", "targets.wms.at"),
        (
            "windows = { partner = { every = \"1h\" } }\n",
            "targets.wms.windows.partner",
        ),
        (
            "windows = { product = { evry = \"1h\" } }\n",
            "targets.wms.windows.product.evry",
        ),
        ("max_attempts = -1\n", "targets.wms.max_attempts"),
    ] {
        let errors = parse(&format!("{MINIMAL}{extra}")).expect_err(extra).errors;
        assert!(
            errors.iter().any(|e| e.key == key),
            "{extra}: expected an error at {key}, got {errors:?}"
        );
    }
}

#[test]
fn reconcile_schedules_are_checked() {
    use crate::config::Window;
    assert_eq!(
        ok(MINIMAL).targets[0].delivery.reconcile_of("product"),
        None
    );
    let c = ok(Config::example());
    let d = &c.targets[0].delivery;
    assert_eq!(d.reconcile_of("product"), Some(Window::DailyAt(3 * 3600)));
    assert_eq!(
        d.reconcile_of("partner"),
        Some(Window::Every(Duration::from_secs(6 * 3600)))
    );
    let d = ok(&format!("{MINIMAL}reconcile = {{ every = \"24h\" }}\n")).targets[0]
        .delivery
        .clone();
    assert_eq!(
        d.reconcile_of("product"),
        Some(Window::Every(Duration::from_secs(86_400)))
    );
    assert!(!d.reconcile_deep);
    // Deep runs read the target's rows back: PostgreSQL targets only.
    let pg = MINIMAL.replace("type = \"http\"", "type = \"postgres\"");
    let d = ok(&format!(
        "{pg}reconcile = {{ every = \"24h\", deep = true }}\n"
    ))
    .targets[0]
        .delivery
        .clone();
    assert!(d.reconcile_deep);
    for (extra, key) in [
        (
            "reconcile = { every = \"4x\" }\n",
            "targets.wms.reconcile.every",
        ),
        (
            "reconcile = { at = \"24:00\" }\n",
            "targets.wms.reconcile.at",
        ),
        (
            "reconcile = { evry = \"1h\" }\n",
            "targets.wms.reconcile.evry",
        ),
        (
            "reconcile = { entities = { partner = { every = \"1h\" } } }\n",
            "targets.wms.reconcile.entities.partner",
        ),
        (
            "reconcile = { entities = { product = {} } }\n",
            "targets.wms.reconcile.entities.product",
        ),
        ("reconcile = \"daily\"\n", "targets.wms.reconcile"),
        (
            "reconcile = { every = \"1h\", deep = true }\n",
            "targets.wms.reconcile.deep",
        ),
    ] {
        let errors = parse(&format!("{MINIMAL}{extra}")).expect_err(extra).errors;
        assert!(
            errors.iter().any(|e| e.key == key),
            "{extra}: expected an error at {key}, got {errors:?}"
        );
    }
}

#[test]
fn max_in_flight_is_1_by_default_2_for_postgres_and_at_most_64() {
    assert_eq!(ok(MINIMAL).targets[0].delivery.max_in_flight, 1);
    let postgres = edit(
        MINIMAL,
        &[
            ("targets.wms.type", Some("\"postgres\"")),
            ("targets.wms.url", Some("\"postgres://steward@mes/mes\"")),
            ("targets.wms.tables", Some("{ product = \"products\" }")),
        ],
    );
    assert_eq!(ok(&postgres).targets[0].delivery.max_in_flight, 2);
    let one = edit(&postgres, &[("targets.wms.max_in_flight", Some("1"))]);
    assert_eq!(ok(&one).targets[0].delivery.max_in_flight, 1);
    assert_eq!(
        ok_with("targets.wms.max_in_flight", "8").targets[0]
            .delivery
            .max_in_flight,
        8
    );
    assert_error(
        &errors_with("targets.wms.max_in_flight", "0"),
        "targets.wms.max_in_flight",
        "",
    );
    assert_error(
        &errors_with("targets.wms.max_in_flight", "65"),
        "targets.wms.max_in_flight",
        "64",
    );
}

#[test]
fn entity_and_target_indices_print_and_serialize_as_bare_numbers() {
    use crate::config::{EntityIndex, TargetIndex};
    // The fingerprint of an entity's settings digests their Debug text, and
    // staged large transactions hold the entity index as JSON.
    assert_eq!(format!("{:?}", Some((EntityIndex(1), 0))), "Some((1, 0))");
    assert_eq!(format!("{:?}", vec![TargetIndex(2)]), "[2]");
    assert_eq!(serde_json::to_string(&EntityIndex(3)).unwrap(), "3");
    assert_eq!(
        serde_json::from_str::<EntityIndex>("3").unwrap(),
        EntityIndex(3)
    );
}
