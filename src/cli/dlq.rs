//! `steward dlq list|show|replay|drop` and `steward flush`: operate on a
//! target's dead-letter queue and batch windows, whether or not the daemon
//! runs. When it is stopped the store is opened directly; while it runs the
//! request goes through its control API (to the target's driver, see
//! `sinks::requests`) and its answer is printed.

use super::client::{self, Access};
use super::out::outln;
use crate::daemon::api::wire;
use steward_core::config::Config;
use steward_sinks::requests::{self, Request, Response};
use steward_store::{DeadLetter, DlqFilter};

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
    comment: Option<String>,
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
    let response = match client::access(&config).await? {
        Access::Store(store) => {
            let concerned = match &request {
                Request::Drop { filter } => {
                    match requests::apply(
                        &store,
                        target,
                        &Request::List {
                            filter: filter.clone(),
                        },
                    )? {
                        Response::DeadLetters { entries } => entries,
                        _ => Vec::new(),
                    }
                }
                _ => Vec::new(),
            };
            let r = requests::apply(&store, target, &request)?;
            if !concerned.is_empty() {
                // The target never got these: a reconciliation sends them again.
                let records = concerned
                    .iter()
                    .map(|d| (d.event.entity.clone(), d.event.key.clone()))
                    .collect();
                crate::daemon::govern::answer_offline(
                    &config,
                    &store,
                    crate::daemon::govern::Request::ForgetSent {
                        target: target.to_string(),
                        records,
                    },
                    None,
                )?;
            }
            drop(store);
            r
        }
        Access::Daemon(daemon) => via_api(&daemon, target, &request, all, comment).await?,
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

/// The API's answer in the shape the store's answer has.
async fn via_api(
    daemon: &client::Client,
    target: &str,
    request: &Request,
    all: bool,
    comment: Option<String>,
) -> anyhow::Result<Response> {
    let dlq = [target, "dead-letters"];
    let action = |filter: &DlqFilter| wire::DlqAction {
        filter: filter.clone(),
        all,
        comment: comment.clone(),
    };
    let answer = match request {
        Request::List { filter } => {
            let query = [
                ("entity", filter.entity.clone()),
                ("key", filter.key.clone()),
                ("id", filter.id.map(|i| i.to_string())),
            ];
            daemon
                .get::<wire::DeadLetters>(&["targets", dlq[0], dlq[1]], &query)
                .await?
                .map(|l| Response::DeadLetters {
                    entries: l.dead_letters,
                })
        }
        Request::Replay { filter } => daemon
            .post::<wire::Count>(&["targets", dlq[0], dlq[1], "replay"], &action(filter))
            .await?
            .map(|c| Response::Replayed { count: c.count }),
        Request::Drop { filter } => daemon
            .post::<wire::Count>(&["targets", dlq[0], dlq[1], "drop"], &action(filter))
            .await?
            .map(|c| Response::Dropped { count: c.count }),
        Request::Flush => daemon
            .post::<()>(&["targets", target, "flush"], &wire::Action { comment })
            .await?
            .map(|()| Response::Flushed),
    };
    Ok(answer.unwrap_or_else(|f| Response::Error {
        message: f.error.message,
    }))
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
