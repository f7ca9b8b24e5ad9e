//! `steward reset -c FILE --target NAME [--entity E ...] [--all]`:
//! resynchronise a target from a fresh consistent snapshot.
//!
//! Against a running daemon the request goes through its control API; the
//! command then follows the progress there (a progress bar on a terminal, a
//! line every few seconds otherwise). Against a stopped daemon it records
//! the jobs in the store; they run at the next start.
//!
//! `--all` (daemon stopped only) drops and recreates the replication slot at
//! the next start and resnapshots every target: the way out after the slot
//! was lost or invalidated.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use anyhow::bail;

use super::client::{self, Access};
use crate::daemon::api::wire;
use crate::daemon::snapshot::{self, ResetRequest, SnapshotStatusLine};
use steward_core::config::Config;
use steward_store::{SnapshotPhase, Store};

pub(super) struct ResetArgs {
    pub target: Option<String>,
    pub entities: Vec<String>,
    pub all: bool,
    pub wait: bool,
    pub comment: Option<String>,
}

pub(super) async fn run(config: Config, args: ResetArgs) -> anyhow::Result<()> {
    match client::access(&config).await? {
        Access::Daemon(daemon) => online(&config, &daemon, &args).await,
        Access::Store(store) => offline(&config, &store, &args),
    }
}

/// The daemon is stopped: record the jobs for its next start.
fn offline(config: &Config, store: &Store, args: &ResetArgs) -> anyhow::Result<()> {
    if args.all {
        for target in &config.targets {
            store.begin_resync(&target.name, &target.entities, true)?;
        }
        store.set_meta(crate::daemon::RESET_ALL_META, "1")?;
        println!(
            "recorded: at its next start steward drops and recreates the slot '{}' and sends every \
             target a fresh snapshot of all its entities",
            config.source.slot
        );
        return Ok(());
    }
    let request = request(args)?;
    let entities = snapshot::resolve_request(config, &request)?;
    store.begin_resync(&request.target, &entities, true)?;
    println!(
        "recorded: target '{}' gets a fresh snapshot of {} at the next start of steward \
         (its undelivered events of these entities were dropped)",
        request.target,
        entities.join(", ")
    );
    Ok(())
}

fn request(args: &ResetArgs) -> anyhow::Result<ResetRequest> {
    let Some(target) = args.target.clone() else {
        bail!("name the target to resynchronise with --target NAME, or use --all");
    };
    Ok(ResetRequest {
        target,
        entities: args.entities.clone(),
        ..ResetRequest::default()
    })
}

/// The daemon runs: ask it through the control API and follow the progress.
async fn online(config: &Config, daemon: &client::Client, args: &ResetArgs) -> anyhow::Result<()> {
    if args.all {
        bail!(
            "reset --all replaces the replication slot and needs the daemon stopped: stop steward \
             (e.g. systemctl stop steward), run this command again, then start steward"
        );
    }
    let request = request(args)?;
    snapshot::resolve_request(config, &request)?;
    let body = wire::ResetRequest {
        entities: request.entities.clone(),
        comment: args.comment.clone(),
    };
    let started = daemon
        .post::<wire::ResetStarted>(&["targets", &request.target, "reset"], &body)
        .await?
        .map_err(|f| anyhow::anyhow!("the daemon rejected the reset: {}", f.error.message))?;
    println!(
        "target '{}': resynchronising {}",
        started.target,
        started.entities.join(", ")
    );
    if !args.wait {
        return Ok(());
    }
    follow(daemon, &started.target, &started.entities).await
}

/// Progress bar over every job of the reset, fed by the control API.
async fn follow(daemon: &client::Client, target: &str, entities: &[String]) -> anyhow::Result<()> {
    let tty = std::io::stderr().is_terminal();
    let bar = indicatif::ProgressBar::new(0);
    if tty {
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg} [{bar:30}] {human_pos}/{human_len} rows  {per_sec}  ETA {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
    } else {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    bar.set_message(target.to_string());
    let mut last_line = Instant::now();
    loop {
        let snapshots = match daemon.get::<wire::Snapshots>(&["snapshots"], &[]).await {
            Ok(Ok(s)) => s.snapshots,
            // Between the runs of a reload the daemon answers "starting".
            Ok(Err(f)) if f.error.code == "starting" => {
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
            Ok(Err(f)) => {
                bar.abandon();
                bail!("the daemon cannot report the progress: {}", f.error.message);
            }
            Err(_) => {
                bar.abandon();
                bail!(
                    "the daemon stopped; the reset continues at its next start (see steward status)"
                );
            }
        };
        let lines: Vec<&SnapshotStatusLine> = snapshots
            .iter()
            .filter(|s| s.target == target && entities.contains(&s.entity))
            .collect();
        let done: u64 = lines.iter().map(|s| s.rows_done).sum();
        let total: u64 = lines
            .iter()
            .map(|s| s.rows_total_estimate.max(s.rows_done))
            .sum();
        bar.set_length(total);
        bar.set_position(done);
        if !tty && last_line.elapsed() >= Duration::from_secs(5) {
            last_line = Instant::now();
            eprintln!("{target}: {done}/{total} rows");
        }
        if let Some(err) = lines.iter().find_map(|s| s.last_error.clone()) {
            eprintln!("{target}: snapshot error (retrying): {err}");
        }
        if lines.len() == entities.len() && lines.iter().all(|s| s.phase == SnapshotPhase::Done) {
            bar.finish();
            println!("target '{target}': snapshot complete, {done} rows queued");
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
