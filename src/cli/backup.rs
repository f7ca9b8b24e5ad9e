//! `steward backup -c FILE DEST`: a consistent copy of the state file, by
//! the running daemon through its control API (it holds the file locked)
//! or, when it is stopped, by this process (see `store::backup`).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

use super::client::{self, Access};
use super::out::outln;
use crate::daemon::api::wire;
use steward_core::config::Config;
use steward_store::backup::BackupReport;

async fn run(
    config: &Config,
    dest: &Path,
    force: bool,
    json: bool,
    comment: Option<String>,
) -> anyhow::Result<()> {
    let state = &config.state.path;
    if !state.exists() {
        bail!(
            "there is no state file at {} (state.path): nothing to back up",
            state.display()
        );
    }
    let dest = absolute(dest)?;
    let (report, by) = match client::access(config).await? {
        Access::Store(store) => (store.backup_to(&dest, force)?, "steward (daemon stopped)"),
        Access::Daemon(daemon) => {
            let request = wire::BackupRequest {
                dest: dest.clone(),
                force,
                comment,
            };
            let report = daemon
                .post::<BackupReport>(&["backup"], &request)
                .await?
                .map_err(client::refused)?;
            (report, "the running daemon")
        }
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
    comment: Option<String>,
) -> std::process::ExitCode {
    let config = match steward_sinks::config::load(config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return std::process::ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(&config, dest, force, json, comment)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
