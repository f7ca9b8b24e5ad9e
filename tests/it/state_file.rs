//! The state file as an operator meets it: damaged, left behind by a
//! crash, created under a loose umask, readable by others, misconfigured.

use crate::support;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use steward_devkit::receiver::Receiver;
use support::{wait_until, Steward, TestDb};

/// The documented exit code for a damaged state file.
const EXIT_DAMAGED: i32 = 3;

fn steward(args: &[&str], config: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_steward"))
        .args(args)
        .arg("-c")
        .arg(config)
        .env("STEWARD_LOG", "steward=info")
        .env_remove("NOTIFY_SOCKET")
        .env_remove("JOURNAL_STREAM")
        .stdin(Stdio::null())
        .output()
        .expect("run steward")
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

/// A state file written by a real run: products delivered to `wms`.
async fn written_state(db: &TestDb) -> (PathBuf, Receiver) {
    let wms = Receiver::start().await.unwrap();
    let config = db.write_config(&db.config_text(&[("wms", &wms.url(), &["product"])]));
    let log = db.dir.path().join("first-run.log");
    let daemon = Steward::start(&config, &log, &[]);
    daemon.wait_log("steward started", 1).await;
    db.sql("UPDATE product_template SET list_price = list_price + 1 WHERE id IN (SELECT id FROM product_template ORDER BY id LIMIT 20)");
    wait_until("the updates are delivered", Duration::from_secs(30), || {
        wms.accepted_count() >= 20
    })
    .await;
    let (status, logs) = daemon.terminate().await;
    assert!(status.success(), "{logs}");
    (config, wms)
}

/// Every command that opens the state file, as the operator types it.
fn commands() -> Vec<Vec<&'static str>> {
    vec![
        vec!["run"],
        vec!["status"],
        vec!["status", "--json"],
        vec!["audit"],
        vec!["quarantine", "list"],
        vec!["quarantine", "show", "product", "1"],
        vec!["quarantine", "release", "product", "1"],
        vec!["dlq", "list", "--target", "wms"],
        vec!["dlq", "replay", "--target", "wms", "--all"],
        vec!["flush", "--target", "wms"],
        vec!["reset", "--target", "wms", "--no-wait"],
        vec!["reset", "--all"],
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_state_file_is_refused_by_every_command_and_left_untouched() {
    let db = TestDb::new("damaged_state");
    let (config, _wms) = written_state(&db).await;
    let path = db.state_path();
    let original = std::fs::read(&path).unwrap();
    let len = original.len();
    assert!(
        len >= 64 * 1024,
        "a state file of {len} bytes is too small to damage"
    );

    let flipped_pages = {
        let mut b = original.clone();
        for page in (4096..len).step_by(4096) {
            for at in [17, 1000, 3000] {
                b[page + at] ^= 0x5A;
            }
        }
        b
    };
    let damages: Vec<(&str, Vec<u8>, &str)> = vec![
        ("empty", Vec::new(), "empty (0 bytes)"),
        ("cut to 4 KiB", original[..4096].to_vec(), "is damaged"),
        ("cut in half", original[..len / 2].to_vec(), "is damaged"),
        (
            "a range zeroed",
            {
                // To the end: a range in the middle may hold only free
                // pages, which is no damage.
                let mut b = original.clone();
                b[len / 4..].fill(0);
                b
            },
            "is damaged",
        ),
        ("bytes flipped in every page", flipped_pages, "is damaged"),
        (
            "a text file",
            b"[source]\nurl = \"postgres://odoo\"\n".repeat(200),
            "holds text",
        ),
        (
            "an SQLite database",
            {
                let mut b = b"SQLite format 3\0".to_vec();
                b.resize(16 * 4096, 0);
                b
            },
            "an SQLite database",
        ),
    ];
    for (damage, bytes, says) in &damages {
        std::fs::write(&path, bytes).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        for args in commands() {
            let out = steward(&args, &config);
            let stderr = String::from_utf8_lossy(&out.stderr);
            let what = format!("{damage}, steward {}", args.join(" "));
            assert_eq!(
                out.status.code(),
                Some(EXIT_DAMAGED),
                "{what}: exit code\nstderr:\n{stderr}\nstdout:\n{}",
                String::from_utf8_lossy(&out.stdout)
            );
            assert!(!stderr.contains("panicked"), "{what}:\n{stderr}");
            assert!(
                stderr.contains(&path.display().to_string()),
                "{what}:\n{stderr}"
            );
            assert!(stderr.contains(says), "{what}: no {says:?} in\n{stderr}");
            assert!(
                stderr.contains("steward reset --all") && stderr.contains("backup"),
                "{what}: no way out in\n{stderr}"
            );
            assert!(!stderr.contains("writable"), "{what}:\n{stderr}");
            assert_eq!(
                stderr.matches("is damaged").count(),
                1,
                "{what}: one error, once:\n{stderr}"
            );
            assert!(
                std::fs::read(&path).unwrap() == *bytes,
                "{what}: the file changed"
            );
        }
    }

    // The undamaged file still opens: nothing above was a false alarm.
    std::fs::write(&path, &original).unwrap();
    let out = steward(&["status"], &config);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_killed_mid_stream_leaves_a_file_that_opens_without_a_damage_report() {
    let db = TestDb::new("kill9_state");
    let wms = Receiver::start().await.unwrap();
    let config = db.write_config(&db.config_text(&[("wms", &wms.url(), &["product"])]));
    for round in 0..3 {
        let log = db.dir.path().join(format!("run-{round}.log"));
        let daemon = Steward::start(&config, &log, &[]);
        daemon.wait_log("steward started", 1).await;
        let before = wms.accepted_count();
        // Changes keep coming while the process is killed.
        for _ in 0..5 {
            db.sql("UPDATE product_template SET list_price = list_price + 1");
        }
        wait_until(
            "some updates are delivered",
            Duration::from_secs(30),
            || wms.accepted_count() > before,
        )
        .await;
        drop(daemon); // SIGKILL
        let out = steward(&["status"], &config);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "round {round}: status after kill -9:\n{stderr}"
        );
        assert!(!stderr.contains("damaged"), "round {round}:\n{stderr}");
    }
    let log = db.dir.path().join("last.log");
    let daemon = Steward::start(&config, &log, &[]);
    daemon.wait_log("steward started", 1).await;
    let (status, logs) = daemon.terminate().await;
    assert!(status.success(), "{logs}");
    assert!(!logs.contains("damaged"), "{logs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_umask_022_files_are_0600_and_directories_0700() {
    let db = TestDb::new("umask_state");
    let wms = Receiver::start().await.unwrap();
    let state = db.dir.path().join("var/steward/steward.redb");
    let text = db
        .config_text(&[("wms", &wms.url(), &["product"])])
        .replace(
            &db.state_path().display().to_string(),
            &state.display().to_string(),
        );
    let config = db.write_config(&text);
    let log = std::fs::File::create(db.dir.path().join("run.log")).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_steward"));
    cmd.args(["run", "-c"])
        .arg(&config)
        .env_remove("NOTIFY_SOCKET")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    // SAFETY: umask is async-signal-safe and touches nothing else.
    unsafe {
        cmd.pre_exec(|| {
            nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o022));
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    let socket = state.with_file_name("steward.redb.sock");
    wait_until(
        "the control socket is created",
        Duration::from_secs(30),
        || socket.exists(),
    )
    .await;
    // Operator requests while it runs go through the socket.
    let out = steward(&["quarantine", "list"], &config);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = steward(&["dlq", "list", "--target", "wms"], &config);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(mode(&socket), 0o600, "control socket");
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    assert!(child.wait().unwrap().success());

    assert_eq!(mode(&state), 0o600, "state file");
    assert_eq!(mode(state.parent().unwrap()), 0o700, "state directory");
    assert_eq!(
        mode(&db.dir.path().join("var")),
        0o700,
        "its parent, created too"
    );
    assert!(!socket.exists(), "the socket goes with the daemon");
    let requests = state.with_file_name("steward.redb.requests");
    assert!(
        !requests.exists(),
        "no request files: the requests took the socket"
    );
    for entry in std::fs::read_dir(state.parent().unwrap()).unwrap() {
        let path = entry.unwrap().path();
        let expected = if path.is_dir() { 0o700 } else { 0o600 };
        assert_eq!(mode(&path), expected, "{}", path.display());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_file_others_can_read_is_refused_with_the_chmod_to_run() {
    let db = TestDb::new("shared_state");
    let (config, _wms) = written_state(&db).await;
    let path = db.state_path();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
    let out = steward(&["run"], &config);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("chmod 600 {}", path.display())),
        "{stderr}"
    );
    assert_eq!(mode(&path), 0o640, "steward does not change it by itself");
}

#[test]
fn check_config_refuses_a_directory_as_state_path() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        r#"
[source]
url = "postgres://steward@localhost/odoo"
[state]
path = "{}"
[entities.uom]
table = "uom_uom"
fields = {{ name = "name" }}
[targets.wms]
type = "http"
url = "http://localhost/x"
entities = ["uom"]
"#,
        dir.path().display()
    );
    let config = dir.path().join("steward.toml");
    std::fs::write(&config, text).unwrap();
    let out = steward(&["check-config"], &config);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("state.path"), "{stderr}");
    assert!(stderr.contains("is a directory"), "{stderr}");
}
