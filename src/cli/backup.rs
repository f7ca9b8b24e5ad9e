//! `steward backup -c FILE DEST`: a consistent copy of the state file, by
//! the running daemon (it holds the file locked) or, when it is stopped,
//! by this process (see `store::backup`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};

use super::out::outln;
use crate::daemon::govern::Request;
use steward_core::config::Config;
use steward_store::backup::BackupReport;
use steward_store::{Store, StoreError};

/// How long the running daemon may take for the copy once it took the
/// request: generous, the copy runs at disk speed.
const COPY_WITHIN: Duration = Duration::from_secs(6 * 3600);

pub(super) fn run(config: &Config, dest: &Path, force: bool, json: bool) -> anyhow::Result<()> {
    let state = &config.state.path;
    if !state.exists() {
        bail!(
            "there is no state file at {} (state.path): nothing to back up",
            state.display()
        );
    }
    let dest = absolute(dest)?;
    let (report, by) = match Store::open(state) {
        Ok(store) => (store.backup_to(&dest, force)?, "steward (daemon stopped)"),
        Err(StoreError::Locked { .. }) => {
            let request = Request::Backup {
                dest: dest.clone(),
                force,
            };
            let response = super::governance::via_daemon_within(config, &request, COPY_WITHIN)?;
            if let Some(e) = response.error {
                bail!("{e}");
            }
            let Some(report) = response.backup else {
                bail!(
                    "the running daemon answered without a backup report; is it an older steward?"
                );
            };
            (report, "the running daemon")
        }
        Err(e) => return Err(e.into()),
    };
    print(&report, by, json)
}

fn print(report: &BackupReport, by: &str, json: bool) -> anyhow::Result<()> {
    if json {
        outln!("{}", serde_json::to_string_pretty(report)?);
        return Ok(());
    }
    outln!(
        "backup written to {} by {by}: {} bytes, checkpoint {}, taken {}",
        report.path.display(),
        report.bytes,
        report
            .checkpoint
            .as_deref()
            .unwrap_or("none (nothing streamed yet)"),
        report.taken_at
    );
    Ok(())
}

/// The daemon's working directory is not ours: it gets an absolute path.
fn absolute(dest: &Path) -> anyhow::Result<PathBuf> {
    if dest.is_absolute() {
        return Ok(dest.to_path_buf());
    }
    let cwd = std::env::current_dir().context("cannot read the current directory")?;
    Ok(cwd.join(dest))
}

pub(super) fn command(
    config: &Path,
    dest: &Path,
    force: bool,
    json: bool,
) -> std::process::ExitCode {
    let config = match steward_sinks::config::load(config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return std::process::ExitCode::from(2);
        }
    };
    match run(&config, dest, force, json) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
