//! `steward run` as the snapshot and governed-state benches drive it: a
//! separate process (so that its peak RSS is its own), under
//! `STEWARD_BENCH_WRAPPER` if set (as in the e2e bench).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Starts `steward run` on `config`, its log (stderr) into `log`.
pub(crate) fn spawn(config: &Path, log: &Path) -> Child {
    steward_devkit::bench_command(env!("CARGO_BIN_EXE_steward"))
        .args(["run", "-c"])
        .arg(config)
        .stderr(Stdio::from(std::fs::File::create(log).expect("log")))
        .spawn()
        .expect("spawn steward")
}

/// Stops it as systemd would (SIGTERM) and waits for it.
pub(crate) fn stop(mut child: Child) {
    steward_devkit::terminate(&mut child);
}

/// Panics with the end of `log` if steward has exited.
pub(crate) fn assert_running(child: &mut Child, log: &Path) {
    if child.try_wait().ok().flatten().is_some() {
        let log = std::fs::read_to_string(log).unwrap_or_default();
        let from = log.len().saturating_sub(3000);
        let from = (from..log.len())
            .find(|&i| log.is_char_boundary(i))
            .unwrap_or(log.len());
        let tail = &log[from..];
        panic!("steward exited; the end of its log:\n{tail}");
    }
}

/// Waits until every snapshot job chosen by `which` is done (`steward
/// status`); returns them.
pub(crate) fn wait_done(
    config: &Path,
    child: &mut Child,
    log: &Path,
    which: impl Fn(&Value) -> bool,
) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(3600);
    loop {
        assert_running(child, log);
        assert!(Instant::now() < deadline, "the snapshot did not finish");
        let out = Command::new(env!("CARGO_BIN_EXE_steward"))
            .args(["status", "--json", "-c"])
            .arg(config)
            .env("STEWARD_LOG", "off")
            .output()
            .expect("steward status");
        let status: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        let jobs: Vec<Value> = status["snapshots"]
            .as_array()
            .map(|a| a.iter().filter(|j| which(j)).cloned().collect())
            .unwrap_or_default();
        if !jobs.is_empty() && jobs.iter().all(|j| j["phase"] == "done") {
            return jobs;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
