//! The command line: `steward run | check-config | status | demo`.
//!
//! Exit codes: 0 success, 1 runtime failure, 2 invalid configuration or usage.

mod demo;
mod setup_sql;
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
    /// Print the SQL an administrator runs once for a least-privilege role and publication.
    SetupSql {
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
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
        Command::Run { config: path } => {
            let config = match Config::load(&path) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::from(2);
                }
            };
            run_blocking(crate::daemon::control::run(path, config))
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
        Command::SetupSql { config } => match Config::load(&config) {
            Ok(c) => {
                print!("{}", setup_sql::script(&c));
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(2)
            }
        },
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
