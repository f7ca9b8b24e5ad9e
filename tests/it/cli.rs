//! Command-line behaviour that needs no database: output into a pipe whose
//! reader has gone (`steward audit | head`) ends the command quietly.

use std::os::fd::OwnedFd;
use std::process::{Command, Stdio};

const CONFIG: &str = r#"
[source]
url = "postgres://steward@localhost/odoo"
[state]
path = "state.redb"
[entities.product]
table = "product_template"
fields = { sku = "default_code" }
unique = ["default_code"]
[targets.wms]
type = "http"
url = "http://localhost:9/x"
entities = ["product"]
"#;

/// Runs steward with stdout a pipe whose read end is already closed, so the
/// first write fails with EPIPE (Rust ignores SIGPIPE). Returns (status, stderr).
fn run_into_closed_pipe(args: &[&str]) -> (Option<i32>, String) {
    let (read, write): (OwnedFd, OwnedFd) = nix::unistd::pipe().unwrap();
    drop(read);
    let out = Command::new(env!("CARGO_BIN_EXE_steward"))
        .args(args)
        .env("STEWARD_LOG", "error")
        .stdout(Stdio::from(write))
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn listing_into_a_closed_pipe_exits_0_without_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("steward.toml");
    std::fs::write(&config, CONFIG).unwrap();
    let config = config.to_str().unwrap();
    // Against a stopped daemon's state file (created by the first command).
    for args in [
        &["check-config", "-c", config][..],
        &["audit", "-c", config][..],
        &["audit", "-c", config, "--json"][..],
        &["quarantine", "list", "-c", config, "--json"][..],
        &["dlq", "list", "-c", config, "--target", "wms"][..],
        &["setup-sql", "-c", config][..],
    ] {
        let (status, stderr) = run_into_closed_pipe(args);
        assert_eq!(status, Some(0), "steward {args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "steward {args:?}: {stderr}");
    }
    // The same commands still print when someone reads.
    let out = Command::new(env!("CARGO_BIN_EXE_steward"))
        .args(["audit", "-c", config, "--json"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["audit"], serde_json::json!([]));
}

fn steward_with_stdin(args: &[&str], stdin: &str) -> std::process::Output {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_steward"))
        .args(args)
        .env("STEWARD_LOG", "error")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // A command that refuses before reading its input (a bad name, a
    // weak password) may exit before the write: that is its answer.
    if let Err(e) = child.stdin.take().unwrap().write_all(stdin.as_bytes()) {
        assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe, "{e}");
    }
    child.wait_with_output().unwrap()
}

/// `steward user` and `steward token` manage the console's users file next
/// to the configuration: argon2id hashes, never the password; a token shown
/// once and kept as a hash; a file others may read is refused.
#[test]
fn console_users_and_tokens_are_managed_from_the_command_line() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("steward.toml");
    std::fs::write(&config, CONFIG).unwrap();
    let config = config.to_str().unwrap();
    let users = dir.path().join("users.toml");

    let add = |name: &str, role: &str, password: &str, extra: &[&str]| {
        let mut args = vec![
            "user",
            "add",
            "-c",
            config,
            name,
            "--role",
            role,
            "--password-stdin",
        ];
        args.extend_from_slice(extra);
        steward_with_stdin(&args, &format!("{password}\n"))
    };
    let out = add("alice", "steward", "correct horse battery", &[]);
    assert!(out.status.success(), "{out:?}");
    let text = std::fs::read_to_string(&users).unwrap();
    assert!(text.contains("$argon2id$"), "{text}");
    assert!(!text.contains("correct horse"), "{text}");
    let mode = std::fs::metadata(&users).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o640);

    let out = add("bob", "viewer", "too short", &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("at least 12"));
    let out = add("alice", "operator", "another long password", &[]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("--replace"));
    let out = add("alice", "operator", "another long password", &["--replace"]);
    assert!(out.status.success(), "{out:?}");
    let out = add("carol", "admin", "correct horse battery", &[]);
    assert_eq!(out.status.code(), Some(2), "clap refuses an unknown role");

    let out = steward_with_stdin(&["user", "list", "-c", config, "--json"], "");
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        list,
        serde_json::json!([{ "name": "alice", "role": "operator" }])
    );

    let out = steward_with_stdin(&["token", "add", "-c", config, "mes-lookup"], "");
    assert!(out.status.success(), "{out:?}");
    let token = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(token.starts_with("stw_"), "{token}");
    let text = std::fs::read_to_string(&users).unwrap();
    assert!(!text.contains(&token[4..]), "only the token's hash is kept");
    assert!(text.contains("[tokens.mes-lookup]"), "{text}");

    let out = steward_with_stdin(&["user", "remove", "-c", config, "alice"], "");
    assert!(out.status.success(), "{out:?}");
    let out = steward_with_stdin(&["user", "remove", "-c", config, "alice"], "");
    assert_eq!(out.status.code(), Some(1));

    std::fs::set_permissions(&users, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = steward_with_stdin(&["token", "list", "-c", config], "");
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("chmod 640"),
        "{out:?}"
    );
}
