//! `steward reset -c FILE --target NAME [--entity E ...] [--all]`:
//! resynchronise a target from a fresh consistent snapshot.
//!
//! Against a running daemon the request is a file in
//! `<state path>.requests/`, picked up within a second; the command then
//! follows the progress through the daemon's status file (a progress bar on
//! a terminal, a line every few seconds otherwise). Against a stopped daemon
//! it records the jobs in the store; they run at the next start.
//!
//! `--all` (daemon stopped only) drops and recreates the replication slot at
//! the next start and resnapshots every target: the way out after the slot
//! was lost or invalidated.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::daemon::snapshot::{self, ResetRequest, SnapshotStatusLine};
use crate::daemon::status;
use steward_core::config::Config;
use steward_store::{SnapshotPhase, Store, StoreError};

pub(super) struct ResetArgs {
    pub target: Option<String>,
    pub entities: Vec<String>,
    pub all: bool,
    pub wait: bool,
}

pub(super) async fn run(config: Config, args: ResetArgs) -> anyhow::Result<()> {
    if status::running_daemon(&config).is_some() {
        return online(&config, &args).await;
    }
    match Store::open(&config.state.path) {
        Ok(store) => offline(&config, &store, &args),
        Err(StoreError::Locked { .. }) => online(&config, &args).await,
        Err(e) => Err(e.into()),
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
    })
}

/// The daemon runs: hand it a request file and follow the progress.
async fn online(config: &Config, args: &ResetArgs) -> anyhow::Result<()> {
    if args.all {
        bail!(
            "reset --all replaces the replication slot and needs the daemon stopped: stop steward \
             (e.g. systemctl stop steward), run this command again, then start steward"
        );
    }
    let request = request(args)?;
    let entities = snapshot::resolve_request(config, &request)?;
    let dir = snapshot::requests_dir(config);
    steward_store::files::create_dir_all(&dir)
        .with_context(|| format!("cannot create the request directory {}", dir.display()))?;
    let stamp = chrono::Utc::now().timestamp_nanos_opt().unwrap_or_default();
    let file = dir.join(format!("reset-{stamp}.json"));
    let tmp = file.with_extension("tmp");
    steward_store::files::write_atomically(&tmp, &file, &serde_json::to_vec(&request)?)
        .with_context(|| format!("cannot write the request {}", file.display()))?;

    // Picked up within a second by the daemon's snapshot task.
    let deadline = Instant::now() + Duration::from_secs(30);
    while file.exists() {
        if Instant::now() > deadline {
            bail!(
                "the daemon did not pick up {} within 30 s; is it running this configuration?",
                file.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let requested_at = chrono::Utc::now();
    let error = file.with_extension("error");
    if let Ok(text) = std::fs::read_to_string(&error) {
        let _ = std::fs::remove_file(&error);
        bail!("the daemon rejected the reset: {text}");
    }
    println!(
        "target '{}': resynchronising {}",
        request.target,
        entities.join(", ")
    );
    if !args.wait {
        return Ok(());
    }
    follow(config, &request.target, &entities, requested_at).await
}

/// Progress bar over every job of the reset, fed by the status file.
async fn follow(
    config: &Config,
    target: &str,
    entities: &[String],
    since: chrono::DateTime<chrono::Utc>,
) -> anyhow::Result<()> {
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
        let Some(file) = status::read(config) else {
            bar.abandon();
            bail!("the daemon stopped; the reset continues at its next start (see steward status)");
        };
        let fresh = chrono::DateTime::parse_from_rfc3339(&file.written_at)
            .map(|t| t.with_timezone(&chrono::Utc) > since)
            .unwrap_or(false);
        let lines: Vec<&SnapshotStatusLine> = file
            .snapshots
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
        if fresh
            && lines.len() == entities.len()
            && lines.iter().all(|s| s.phase == SnapshotPhase::Done)
        {
            bar.finish();
            println!("target '{target}': snapshot complete, {done} rows queued");
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
