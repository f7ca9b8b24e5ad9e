//! The command line: `steward run | check-config | status | demo`.
//!
//! Exit codes: 0 success, 1 runtime failure, 2 invalid configuration or usage.

mod demo;
mod governance;
mod status;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use tokio::sync::watch;

use crate::config::Config;

#[derive(Parser, Debug)]
#[command(
    name = "steward",
    version,
    about = "Governed master data from Odoo's PostgreSQL write-ahead log"
)]
struct Cli {
    /// Log format: human-readable text, or one JSON object per line.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Copy, Clone, Debug, ValueEnum, PartialEq, Eq)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Stream changes to the targets until stopped (SIGTERM / Ctrl-C).
    Run {
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Validate a configuration file; exit 2 listing every problem.
    CheckConfig {
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Show the slot, lag and each target's cursor, whether or not the daemon runs.
    Status {
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Records withheld by validation rules or duplicate business keys.
    Quarantine {
        #[command(subcommand)]
        action: QuarantineAction,
    },
    /// The governance audit trail: every delivered, gated, unpublished, quarantined, released, suppressed or redacted record.
    Audit {
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
        #[arg(long)]
        entity: Option<String>,
        #[arg(long)]
        key: Option<String>,
        /// RFC 3339 time, a date, or a duration back from now (30m, 12h, 7d).
        #[arg(long)]
        since: Option<String>,
        /// Only the last N records.
        #[arg(long)]
        limit: Option<usize>,
        #[arg(long)]
        json: bool,
    },
    /// Run a self-contained demo: throwaway PostgreSQL with Odoo data, a local receiver, live changes.
    Demo {
        /// Make the demo changes, show the events and exit instead of waiting for Ctrl-C.
        #[arg(long)]
        once: bool,
    },
}

#[derive(Subcommand, Debug)]
enum QuarantineAction {
    /// Every quarantined record with its rule and message.
    List {
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// One quarantined record, with the withheld document (use --json).
    Show {
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
        entity: String,
        key: String,
        #[arg(long)]
        json: bool,
    },
    /// Re-evaluate a record now; delivered if every rule passes.
    Release {
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
        entity: String,
        key: String,
        #[arg(long)]
        json: bool,
    },
}

fn governance_command(
    config: &std::path::Path,
    req: governance::RequestFn,
    json: bool,
) -> ExitCode {
    let config = match Config::load(config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let result = req()
        .and_then(|r| governance::request(&config, r))
        .and_then(|resp| governance::print(&resp, json));
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format, matches!(cli.command, Command::Demo { .. }));
    match cli.command {
        Command::CheckConfig { config } => match Config::load(&config) {
            Ok(c) => {
                println!(
                    "{}: ok ({} entities, {} targets)",
                    config.display(),
                    c.entities.len(),
                    c.targets.len()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(2)
            }
        },
        Command::Run { config } => {
            let config = match Config::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::from(2);
                }
            };
            run_blocking(async move {
                let shutdown = shutdown_on_signals()?;
                crate::daemon::run(config, shutdown).await
            })
        }
        Command::Status { config, json } => {
            let config = match Config::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::from(2);
                }
            };
            run_blocking(status::run(config, json))
        }
        Command::Quarantine { action } => {
            use crate::daemon::govern::Request;
            match action {
                QuarantineAction::List { config, json } => {
                    governance_command(&config, Box::new(|| Ok(Request::QuarantineList)), json)
                }
                QuarantineAction::Show {
                    config,
                    entity,
                    key,
                    json,
                } => governance_command(
                    &config,
                    Box::new(move || Ok(Request::QuarantineShow { entity, key })),
                    json,
                ),
                QuarantineAction::Release {
                    config,
                    entity,
                    key,
                    json,
                } => governance_command(
                    &config,
                    Box::new(move || Ok(Request::QuarantineRelease { entity, key })),
                    json,
                ),
            }
        }
        Command::Audit {
            config,
            entity,
            key,
            since,
            limit,
            json,
        } => governance_command(
            &config,
            Box::new(move || {
                let since_micros = since.as_deref().map(governance::parse_since).transpose()?;
                Ok(crate::daemon::govern::Request::Audit {
                    entity,
                    key,
                    since_micros,
                    limit,
                })
            }),
            json,
        ),
        Command::Demo { once } => run_blocking(demo::run(once)),
    }
}

fn run_blocking(future: impl std::future::Future<Output = anyhow::Result<()>>) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(future) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// SIGTERM and SIGINT turn the returned watch to true once.
pub fn shutdown_on_signals() -> anyhow::Result<watch::Receiver<bool>> {
    use futures_util::StreamExt;
    use signal_hook::consts::{SIGINT, SIGTERM};
    let (tx, rx) = watch::channel(false);
    let mut signals = signal_hook_tokio::Signals::new([SIGTERM, SIGINT])?;
    tokio::spawn(async move {
        if let Some(signal) = signals.next().await {
            let name = if signal == SIGTERM {
                "SIGTERM"
            } else {
                "SIGINT"
            };
            tracing::info!("{name} received: draining and stopping");
            let _ = tx.send(true);
        }
        // A second signal while draining: stop now.
        if signals.next().await.is_some() {
            tracing::warn!("second signal: exiting without draining");
            std::process::exit(130);
        }
    });
    Ok(rx)
}

fn init_logging(format: LogFormat, demo: bool) {
    use tracing_subscriber::EnvFilter;
    let default = if demo { "steward=warn" } else { "steward=info" };
    let filter = EnvFilter::try_from_env("STEWARD_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    // Under systemd the journal stamps every line already.
    let journald = std::env::var_os("JOURNAL_STREAM").is_some();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = match (format, journald) {
        (LogFormat::Json, _) => builder.json().flatten_event(true).try_init(),
        (LogFormat::Text, true) => builder.without_time().with_ansi(false).try_init(),
        (LogFormat::Text, false) => builder.try_init(),
    };
    let _ = result;
}
