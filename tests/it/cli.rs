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
