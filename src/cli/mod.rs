//! The command line: `steward run | check-config | status | backup | reset | reconcile | repair | dlq | flush | quarantine | audit | user | token | setup-sql | demo`.
//!
//! Exit codes: 0 success, 1 runtime failure, 2 invalid configuration or usage,
//! 3 damaged state file (see [`EXIT_DAMAGED_STATE`]).

mod backup;
mod client;
#[cfg(feature = "demo")]
mod demo;
mod dlq;
mod governance;
pub(crate) mod out;
mod reconcile;
mod record;
mod reset;
mod setup_sql;
mod status;
mod user;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use tokio::sync::watch;

use self::out::outln;
use steward_core::config::Config;

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
    /// Write a consistent copy of the state file to DEST (through the running daemon, or directly when it is stopped).
    Backup {
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
        /// Where to write the copy (mode 0600); refused if it exists, unless --force.
        #[arg(value_name = "DEST")]
        dest: PathBuf,
        /// Replace an existing DEST.
        #[arg(long)]
        force: bool,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        /// Why, for the audit trail.
        #[arg(long, value_name = "TEXT")]
        comment: Option<String>,
    },
    /// Print the SQL an administrator runs once for a least-privilege role and publication.
    SetupSql {
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Inspect, replay or drop a target's dead letters (works whether or not the daemon runs).
    Dlq {
        #[command(subcommand)]
        action: DlqCommand,
    },
    /// Open a target's batch windows now (delivers the coalesced events held for them).
    Flush {
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
        #[arg(long, value_name = "T")]
        target: String,
        /// Why, for the audit trail.
        #[arg(long, value_name = "TEXT")]
        comment: Option<String>,
    },
    /// Records withheld by validation rules or duplicate business keys.
    Quarantine {
        #[command(subcommand)]
        action: QuarantineAction,
    },
    /// Everything steward knows about one record: its state, source row, what each target got and acknowledged, dead letters, what it waits for and blocks, its audit trail.
    Record {
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
        /// The entity's name, as configured (product, bom, ...).
        entity: String,
        /// The record's key (composite keys: the columns' values joined by `|`).
        key: String,
        /// Print the control API's answer as JSON.
        #[arg(long)]
        json: bool,
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
        /// Only records before this time (same forms as --since).
        #[arg(long)]
        until: Option<String>,
        /// Only decisions about this target.
        #[arg(long, value_name = "T")]
        target: Option<String>,
        /// Only this decision (delivered, quarantined, released, dlq_replayed, reset, ...).
        #[arg(long)]
        decision: Option<String>,
        /// Only actions of this user.
        #[arg(long)]
        user: Option<String>,
        /// Only the last N records.
        #[arg(long)]
        limit: Option<usize>,
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
        /// Why, for the audit trail.
        #[arg(long, value_name = "TEXT")]
        comment: Option<String>,
    },
    /// Compare what a target was sent with the source and send only what differs.
    Reconcile {
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
        /// The target to reconcile.
        #[arg(long, value_name = "NAME")]
        target: String,
        /// Only these entities of the target (repeatable); default: all it receives.
        #[arg(long = "entity", value_name = "E")]
        entities: Vec<String>,
        /// Only report what differs; send and change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Compare with the rows the target actually holds (PostgreSQL
        /// targets): repairs rows changed, deleted or inserted there by hand.
        #[arg(long)]
        deep: bool,
        #[arg(long)]
        json: bool,
        /// Return once the daemon took the request instead of waiting for the results.
        #[arg(long)]
        no_wait: bool,
        /// Why, for the audit trail.
        #[arg(long, value_name = "TEXT")]
        comment: Option<String>,
    },
    /// After a lost or dropped slot (daemon stopped): recreate the slot and reconcile every target.
    Repair {
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
        /// Recreate the slot, but only report what differs (a later `steward reconcile` repairs it).
        #[arg(long)]
        dry_run: bool,
    },
    /// The console's users and roles (in `[console] users_file`).
    User {
        #[command(subcommand)]
        action: user::UserAction,
    },
    /// Read-only API tokens for tools (in `[console] users_file`).
    Token {
        #[command(subcommand)]
        action: user::TokenAction,
    },
    /// Run a self-contained demo: throwaway PostgreSQL with Odoo data, a local receiver, live changes.
    #[cfg(feature = "demo")]
    Demo {
        /// Make the demo changes, show the events and exit instead of waiting for Ctrl-C.
        #[arg(long)]
        once: bool,
    },
}

#[derive(Subcommand, Debug)]
enum DlqCommand {
    /// Table of dead letters: id, entity, key, version, attempts, last error.
    List(DlqArgs),
    /// One dead letter in full, as JSON (needs --id).
    Show(DlqArgs),
    /// Send dead letters back for delivery, ahead of the outbox, in their original
    /// order; a selection takes its keys' held events along.
    Replay(DlqArgs),
    /// Delete dead letters for good (needs a selection or --all).
    Drop(DlqArgs),
}

#[derive(clap::Args, Debug)]
struct DlqArgs {
    #[arg(short, long, value_name = "FILE")]
    config: PathBuf,
    #[arg(long, value_name = "T")]
    target: String,
    /// Only this key (as delivered in `subject`).
    #[arg(long, value_name = "K")]
    key: Option<String>,
    /// Only this entity.
    #[arg(long, value_name = "E")]
    entity: Option<String>,
    /// Only this dead letter.
    #[arg(long, value_name = "ID")]
    id: Option<u64>,
    /// With `drop` and no selection: every dead letter of the target.
    #[arg(long)]
    all: bool,
    /// With `replay` and `drop`: why, for the audit trail.
    #[arg(long, value_name = "TEXT")]
    comment: Option<String>,
}

/// Exit code when the state file is damaged (or written by an incompatible
/// version): neither the configuration nor a passing fault, and retrying
/// cannot help; the operator restores or replaces the file.
pub const EXIT_DAMAGED_STATE: u8 = 3;

/// Prints a failed command's error once and picks its exit code.
fn report_failure(e: &anyhow::Error) -> ExitCode {
    let damaged = e
        .chain()
        .filter_map(|cause| cause.downcast_ref::<steward_store::StoreError>())
        .any(steward_store::StoreError::is_damage);
    if damaged {
        // The message says all; a log line would repeat it.
        eprintln!("error: {e:#}");
        return ExitCode::from(EXIT_DAMAGED_STATE);
    }
    tracing::error!("{e:#}");
    eprintln!("error: {e:#}");
    ExitCode::FAILURE
}

fn load_or_exit(path: &std::path::Path) -> Result<Config, ExitCode> {
    steward_sinks::config::load(path).map_err(|e| {
        eprintln!("{e}");
        ExitCode::from(2)
    })
}

#[derive(Subcommand, Debug)]
enum QuarantineAction {
    /// Every quarantined record with its rule and message.
    List {
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
        /// Only the records a reference rule holds back because of this
        /// record: `--blocked-by product 42` (the impact of product 42).
        #[arg(long, num_args = 2, value_names = ["ENTITY", "KEY"])]
        blocked_by: Option<Vec<String>>,
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
        /// Why, for the audit trail.
        #[arg(long, value_name = "TEXT")]
        comment: Option<String>,
    },
}

fn governance_command(
    config: &std::path::Path,
    req: governance::RequestFn,
    comment: Option<String>,
    json: bool,
) -> ExitCode {
    let config = match steward_sinks::config::load(config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = req()
        .and_then(|r| runtime.block_on(governance::request(&config, r, comment)))
        .and_then(|resp| governance::print(resp, json));
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => report_failure(&e),
    }
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    #[cfg(feature = "demo")]
    let demo = matches!(cli.command, Command::Demo { .. });
    #[cfg(not(feature = "demo"))]
    let demo = false;
    init_logging(cli.log_format, demo);
    match cli.command {
        Command::CheckConfig { config } => match steward_sinks::config::load(&config) {
            Ok(c) => {
                outln!("{}", check_summary(&config, &c));
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(2)
            }
        },
        Command::Run { config: path } => {
            let config = match steward_sinks::config::load(&path) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::from(2);
                }
            };
            run_blocking(crate::daemon::control::run(path, config))
        }
        Command::Status { config, json } => {
            let config = match steward_sinks::config::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::from(2);
                }
            };
            run_blocking(status::run(config, json))
        }
        Command::Backup {
            config,
            dest,
            force,
            json,
            comment,
        } => backup::command(&config, &dest, force, json, comment),
        Command::SetupSql { config } => match steward_sinks::config::load(&config) {
            Ok(c) => {
                out::text(&setup_sql::script(&c));
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(2)
            }
        },
        Command::Quarantine { action } => {
            use crate::daemon::govern::Request;
            match action {
                QuarantineAction::List {
                    config,
                    blocked_by,
                    json,
                } => {
                    let blocked_by = blocked_by.map(|b| b.join(" "));
                    governance_command(
                        &config,
                        Box::new(move || Ok(Request::QuarantineList { blocked_by })),
                        None,
                        json,
                    )
                }
                QuarantineAction::Show {
                    config,
                    entity,
                    key,
                    json,
                } => governance_command(
                    &config,
                    Box::new(move || Ok(Request::QuarantineShow { entity, key })),
                    None,
                    json,
                ),
                QuarantineAction::Release {
                    config,
                    entity,
                    key,
                    json,
                    comment,
                } => governance_command(
                    &config,
                    Box::new(move || Ok(Request::QuarantineRelease { entity, key })),
                    comment,
                    json,
                ),
            }
        }
        Command::Record {
            config: path,
            entity,
            key,
            json,
        } => {
            let config = match steward_sinks::config::load(&path) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::from(2);
                }
            };
            run_blocking(record::run(&path, config, entity, key, json))
        }
        Command::Audit {
            config,
            entity,
            key,
            since,
            until,
            target,
            decision,
            user,
            limit,
            json,
        } => governance_command(
            &config,
            Box::new(move || {
                let since_micros = since.as_deref().map(governance::parse_since).transpose()?;
                let until_micros = until.as_deref().map(governance::parse_until).transpose()?;
                Ok(crate::daemon::govern::Request::Audit(
                    steward_store::audit::AuditFilter {
                        entity,
                        key,
                        since_micros,
                        until_micros,
                        target,
                        decision,
                        user,
                        limit,
                    },
                ))
            }),
            None,
            json,
        ),
        Command::Reset {
            config,
            target,
            entities,
            all,
            no_wait,
            comment,
        } => {
            let config = match steward_sinks::config::load(&config) {
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
                comment,
            };
            run_blocking(reset::run(config, args))
        }
        Command::Reconcile {
            config,
            target,
            entities,
            dry_run,
            deep,
            json,
            no_wait,
            comment,
        } => {
            let config = match steward_sinks::config::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::from(2);
                }
            };
            let args = reconcile::ReconcileArgs {
                target,
                entities,
                dry_run,
                deep,
                json,
                wait: !no_wait,
                comment,
            };
            run_blocking(reconcile::run(config, args))
        }
        Command::Repair { config, dry_run } => {
            let config = match steward_sinks::config::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::from(2);
                }
            };
            run_blocking(reconcile::repair(config, dry_run))
        }
        #[cfg(feature = "demo")]
        Command::Demo { once } => run_blocking(demo::run(once)),
        Command::User { action } => match user::user(action) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => report_failure(&e),
        },
        Command::Token { action } => match user::token(action) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => report_failure(&e),
        },
        Command::Dlq { action } => {
            let (action, args) = match action {
                DlqCommand::List(a) => (dlq::Action::List, a),
                DlqCommand::Show(a) => (dlq::Action::Show, a),
                DlqCommand::Replay(a) => (dlq::Action::Replay, a),
                DlqCommand::Drop(a) => (dlq::Action::Drop, a),
            };
            let config = match load_or_exit(&args.config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let filter = steward_store::DlqFilter {
                entity: args.entity,
                key: args.key,
                id: args.id,
            };
            run_blocking(async move {
                dlq::run(config, &args.target, action, filter, args.all, args.comment).await
            })
        }
        Command::Flush {
            config,
            target,
            comment,
        } => {
            let config = match load_or_exit(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            run_blocking(async move {
                dlq::run(
                    config,
                    &target,
                    dlq::Action::Flush,
                    Default::default(),
                    false,
                    comment,
                )
                .await
            })
        }
    }
}

/// `check-config`'s line for a valid file. Counts the entities of the file,
/// not the hidden ones steward adds (child tables, `ir_model_data`).
fn check_summary(path: &std::path::Path, config: &Config) -> String {
    let entities = (0..config.entities.len())
        .filter(|&i| {
            !config
                .governance
                .entities
                .get(i)
                .is_some_and(steward_core::config::EntityGovernance::is_hidden)
        })
        .count();
    format!(
        "{}: ok ({entities} entities, {} targets)",
        path.display(),
        config.targets.len()
    )
}

fn run_blocking(future: impl std::future::Future<Output = anyhow::Result<()>>) -> ExitCode {
    // Blocking-pool threads never park as workers do: the delivery drivers'
    // store calls have them collect instead.
    steward_sinks::driver::set_blocking_call_hook(crate::daemon::idle::thread_idle);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .on_thread_park(crate::daemon::idle::thread_idle)
        .max_blocking_threads(blocking_threads())
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
        Err(e) => report_failure(&e),
    }
}

/// Threads of the runtime's blocking pool. Each delivery driver reads and
/// settles its batches there, and every thread that ever ran one keeps an
/// allocator heap of its own: with tokio's default of 512, ten targets kept
/// about twenty such threads and their heaps. Store calls are short (a redb
/// read, or a write waiting for the commit thread's lock), so a few per core
/// keep up. Ten targets, `STEWARD_BENCH_SHAPES=10x1000 cargo bench --bench
/// e2e -- SCALE`, two pairs: peak RSS 147–150 -> 120–122 MiB and idle RSS
/// 78–80 -> 49–61 MiB at the same rate; three targets 81–82 -> 78 MiB.
fn blocking_threads() -> usize {
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    (2 * cores).max(4)
}

/// SIGTERM and SIGINT turn the returned watch to true once.
pub fn shutdown_on_signals() -> anyhow::Result<watch::Receiver<bool>> {
    use tokio::signal::unix::{signal, SignalKind};
    let (tx, rx) = watch::channel(false);
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        // `None` only when the runtime shuts down.
        let name = tokio::select! {
            Some(()) = terminate.recv() => "SIGTERM",
            Some(()) = interrupt.recv() => "SIGINT",
            else => return,
        };
        tracing::info!("{name} received: draining and stopping");
        let _ = tx.send(true);
        // A second signal while draining: stop now.
        let second = tokio::select! {
            Some(()) = terminate.recv() => true,
            Some(()) = interrupt.recv() => true,
            else => false,
        };
        if second {
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
    // Colours only for a person at a terminal, never in a file or a pipe.
    let ansi = !journald && std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    let result = match (format, journald) {
        (LogFormat::Json, _) => builder.json().flatten_event(true).try_init(),
        (LogFormat::Text, true) => builder.without_time().try_init(),
        (LogFormat::Text, false) => builder.try_init(),
    };
    let _ = result;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_config_counts_the_files_entities_not_the_hidden_ones() {
        let text = r#"
[source]
url = "postgres://steward@localhost/odoo"
[state]
path = "/tmp/x.redb"
[entities.uom]
table = "uom_uom"
fields = { name = "name" }
[entities.bom]
table = "mrp_bom"
fields = { code = "code", uom = { ref = "product_uom_id", entity = "uom", external_id = true } }
children = { lines = { table = "mrp_bom_line", parent = "bom_id", fields = { qty = "product_qty" } }, byproducts = { table = "mrp_bom_byproduct", parent = "bom_id", fields = { qty = "product_qty" } } }
[targets.wms]
type = "http"
url = "http://localhost/x"
entities = ["bom"]
"#;
        let path = std::path::Path::new("/etc/steward/steward.toml");
        let config =
            steward_sinks::config::parse(text, path, std::path::Path::new("/tmp")).unwrap();
        assert_eq!(
            config.entities.len(),
            5,
            "two child tables and ir_model_data"
        );
        assert_eq!(
            check_summary(path, &config),
            "/etc/steward/steward.toml: ok (2 entities, 1 targets)"
        );
    }
}
