//! The command line: `steward run | check-config | status | reset | demo`.
//!
//! Exit codes: 0 success, 1 runtime failure, 2 invalid configuration or usage.

mod demo;
mod reset;
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
    /// Resynchronise a target from a fresh consistent snapshot (or, with --all, every target and the slot).
    Reset {
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
        /// The target to resynchronise.
        #[arg(long, value_name = "NAME", required_unless_present = "all")]
        target: Option<String>,
        /// Only these entities of the target (repeatable); default: all it receives.
        #[arg(long = "entity", value_name = "E")]
        entities: Vec<String>,
        /// Drop and recreate the replication slot and resnapshot every target (daemon stopped).
        #[arg(long, conflicts_with_all = ["target", "entities"])]
        all: bool,
        /// Return once the daemon took the request instead of following its progress.
        #[arg(long)]
        no_wait: bool,
    },
    /// Run a self-contained demo: throwaway PostgreSQL with Odoo data, a local receiver, live changes.
    Demo {
        /// Make the demo changes, show the events and exit instead of waiting for Ctrl-C.
        #[arg(long)]
        once: bool,
    },
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
        Command::Reset {
            config,
            target,
            entities,
            all,
            no_wait,
        } => {
            let config = match Config::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::from(2);
                }
            };
            let args = reset::ResetArgs {
                target,
                entities,
                all,
                wait: !no_wait,
            };
            run_blocking(reset::run(config, args))
        }
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
