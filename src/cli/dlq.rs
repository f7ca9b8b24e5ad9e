//! `steward dlq list|show|replay|drop` and `steward flush`: operate on a
//! target's dead-letter queue and batch windows, whether or not the daemon
//! runs. When it is stopped the store is opened directly; while it runs (the
//! store is locked) the request goes to the target's driver as a file (see
//! `sinks::requests`) and its answer is printed.

use std::time::Duration;

use super::out::outln;
use steward_core::config::Config;
use steward_sinks::requests::{self, Request, Response};
use steward_store::{DeadLetter, DlqFilter, Store, StoreError};

/// How long to wait for a running daemon's answer; drivers poll every 0.5 s,
/// but one may be busy settling a large batch.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Action {
    List,
    Show,
    Replay,
    Drop,
    Flush,
}

pub(super) async fn run(
    config: Config,
    target: &str,
    action: Action,
    filter: DlqFilter,
    all: bool,
) -> anyhow::Result<()> {
    if config.target(target).is_none() {
        let names: Vec<&str> = config.targets.iter().map(|t| t.name.as_str()).collect();
        anyhow::bail!(
            "--target {target}: no such target in the configuration; configured targets: {}",
            names.join(", ")
        );
    }
    let request = match action {
        Action::List => Request::List { filter },
        Action::Show => {
            if filter.id.is_none() {
                anyhow::bail!("`dlq show` needs --id ID (see `steward dlq list`)");
            }
            Request::List { filter }
        }
        Action::Replay => Request::Replay { filter },
        Action::Drop => {
            if filter == DlqFilter::default() && !all {
                anyhow::bail!(
                    "`dlq drop` deletes events for good: select them with --id, --key or --entity, \
                     or pass --all to drop every dead letter of the target"
                );
            }
            Request::Drop { filter }
        }
        Action::Flush => Request::Flush,
    };
    if !config.state.path.exists() {
        // Opening would create the file; there is nothing to act on yet.
        anyhow::bail!(
            "{} does not exist yet: steward has not run with this configuration, so target {target} has no dead letters or windows",
            config.state.path.display()
        );
    }
    // A running daemon answers: opening the state file could make it wait.
    let running = crate::daemon::status::running_daemon(&config).is_some();
    let opened = if running {
        Err(StoreError::Locked {
            path: config.state.path.clone(),
        })
    } else {
        Store::open(&config.state.path)
    };
    let response = match opened {
        Ok(store) => {
            let r = requests::apply(&store, target, &request)?;
            drop(store);
            r
        }
        Err(StoreError::Locked { .. }) => {
            requests::submit(&config.state.path, target, &request, ANSWER_TIMEOUT).await?
        }
        Err(e) => return Err(e.into()),
    };
    match (action, response) {
        (_, Response::Error { message }) => anyhow::bail!("the daemon refused the request: {message}"),
        (Action::Show, Response::DeadLetters { entries }) => {
            let Some(entry) = entries.first() else {
                anyhow::bail!(
                    "no dead letter with id {} in target {target}",
                    filter_id(&request)
                );
            };
            outln!("{}", serde_json::to_string_pretty(entry)?);
        }
        (_, Response::DeadLetters { entries }) => print_table(&entries),
        (_, Response::Replayed { count }) => outln!(
            "replayed {count} dead letter(s) of target {target}: they are delivered next, in their original order"
        ),
        (_, Response::Dropped { count }) => {
            outln!("dropped {count} dead letter(s) of target {target}");
        }
        (_, Response::Flushed) => outln!("flush of target {target} requested: its batch windows open now (or at the next start if the daemon is stopped)"),
    }
    Ok(())
}

fn filter_id(r: &Request) -> String {
    match r {
        Request::List { filter } => filter.id.map(|i| i.to_string()).unwrap_or_default(),
        _ => String::new(),
    }
}

fn print_table(entries: &[DeadLetter]) {
    if entries.is_empty() {
        outln!("no dead letters");
        return;
    }
    outln!(
        "{:>6}  {:<12}  {:<16}  {:>20}  {:>8}  last error",
        "id",
        "entity",
        "key",
        "version",
        "attempts"
    );
    for d in entries {
        let mut err: String = d.error.chars().take(80).collect();
        if d.error.chars().count() > 80 {
            err.push('…');
        }
        outln!(
            "{:>6}  {:<12}  {:<16}  {:>20}  {:>8}  {}",
            d.id,
            d.event.entity,
            d.event.key,
            d.event.version,
            d.attempts,
            err
        );
    }
    outln!("{} dead letter(s)", entries.len());
}
