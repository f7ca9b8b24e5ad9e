//! The daemon's process-level control: signals, configuration reload,
//! shutdown timeout, metrics listener and systemd notifications.
//!
//! - SIGTERM / SIGINT: drain (commit what was received, confirm it, stop the
//!   targets at their cursors) within `daemon.shutdown_timeout_ms`; past it,
//!   exit 1 without confirming more. Nothing is lost either way: what was not
//!   confirmed is streamed again by the server.
//! - SIGHUP: load and check the file again. An invalid file is logged with
//!   every problem and the running daemon is left alone. A valid one is
//!   applied by an orderly internal restart (the same drain as a shutdown),
//!   then the daemon starts again with the new targets, entities and
//!   mappings in the same process. A removed target's outbox stays in the
//!   store: adding the target back resumes it where it stopped.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::watch;

use super::{api, endpoint, systemd, DaemonState};
use steward_core::config::Config;

/// What ended one daemon run.
enum Next {
    Exit(anyhow::Result<()>),
    Reload(Box<Config>),
}

/// `steward run`: runs the daemon for `config` (loaded from `path`) until
/// SIGTERM / SIGINT, reloading it on SIGHUP.
pub async fn run(path: PathBuf, mut config: Config) -> anyhow::Result<()> {
    let mut signals =
        Signals::new().map_err(|e| anyhow::anyhow!("cannot install signal handlers: {e}"))?;
    let state = Arc::new(DaemonState::default());
    steward_store::files::refuse_shared_state_file(&config.state.path)?;
    // Bound for the whole process, reloads included: while it exists the
    // command line leaves the state file to this daemon.
    let control = Arc::new(api::Server::bind(&config, state.clone())?);
    let socket = (config.control_socket(), config.control.group.clone());
    let listen = config.metrics.listen;
    if let Some(addr) = listen {
        endpoint::serve(addr, state.clone()).await?;
    }
    // Also for the whole process; the users file is read again whenever it changes.
    let console_settings = (
        config.console.listen,
        config.console.tls.clone(),
        config.console.users_file.clone(),
    );
    let console = crate::console::Console::start(&config, control.control()).await?;
    let notifier = systemd::spawn(state.clone());

    let result = loop {
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let timeout = config.daemon.shutdown_timeout;
        let mut daemon = tokio::spawn(super::run_with(
            config.clone(),
            shutdown_rx,
            state.clone(),
            control.clone(),
        ));
        let next = loop {
            tokio::select! {
                finished = &mut daemon => {
                    break Next::Exit(finished.unwrap_or_else(|e| Err(anyhow::anyhow!("the daemon task failed: {e}"))));
                }
                signal = signals.next() => match signal {
                    Some(Received::Hangup) => {
                        if let Some(new) = reload(&path, &config) {
                            break Next::Reload(Box::new(new));
                        }
                    }
                    Some(stop) => {
                        let name = stop.name();
                        tracing::info!(timeout = ?timeout, "{name} received: draining and stopping");
                        break Next::Exit(Ok(()));
                    }
                    None => break Next::Exit(Ok(())),
                },
            }
        };
        systemd::notify(match next {
            Next::Exit(_) => "STOPPING=1",
            Next::Reload(_) => "RELOADING=1",
        });
        // Stop the run (if it has not ended by itself), within the timeout.
        if !daemon.is_finished() {
            let _ = shutdown_tx.send(true);
            let drained = tokio::select! {
                r = tokio::time::timeout(timeout, &mut daemon) => r.ok(),
                // A second SIGTERM / SIGINT while draining: stop now.
                Some(s) = next_stop_signal(&mut signals) => {
                    tracing::warn!(signal = s.name(), "second signal: exiting without draining");
                    std::process::exit(130);
                }
            };
            match drained {
                Some(Ok(Ok(()))) => {}
                Some(Ok(Err(e))) => break Err(e),
                Some(Err(e)) => break Err(anyhow::anyhow!("the daemon task failed: {e}")),
                None => {
                    tracing::error!(
                        timeout = ?timeout,
                        "draining did not finish within daemon.shutdown_timeout_ms; exiting without \
                         confirming more (unconfirmed changes will be streamed again)"
                    );
                    // Tasks may be stuck in blocking calls the runtime would wait for.
                    std::process::exit(1);
                }
            }
        }
        match next {
            Next::Exit(result) => break result,
            Next::Reload(new) => {
                if new.metrics.listen != listen {
                    tracing::warn!(
                        "metrics.listen changed: the listener keeps its old address until steward restarts"
                    );
                }
                if (
                    new.console.listen,
                    new.console.tls.clone(),
                    new.console.users_file.clone(),
                ) != console_settings
                {
                    tracing::warn!(
                        "console.listen, tls_cert, tls_key or users_file changed: the console keeps \
                         its old settings until steward restarts"
                    );
                }
                if (new.control_socket(), new.control.group.clone()) != socket {
                    tracing::warn!(
                        "control.socket or control.group changed: the control socket keeps its old \
                         path and group until steward restarts"
                    );
                }
                config = *new;
                metrics::counter!(steward_core::metric::CONFIG_RELOADS, "result" => "applied")
                    .increment(1);
                tracing::info!(
                    entities = config.entities.len(),
                    targets = config.targets.len(),
                    "configuration reloaded; restarting the pipeline"
                );
                systemd::notify("READY=1\nSTATUS=streaming (reloaded)");
            }
        }
    };
    notifier.abort();
    if let Some(console) = &console {
        console.close().await;
    }
    control.close().await;
    result
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Received {
    Terminate,
    Interrupt,
    Hangup,
}

impl Received {
    fn name(self) -> &'static str {
        match self {
            Received::Terminate => "SIGTERM",
            Received::Interrupt => "SIGINT",
            Received::Hangup => "SIGHUP",
        }
    }
}

/// SIGTERM, SIGINT and SIGHUP as one stream.
struct Signals {
    terminate: Signal,
    interrupt: Signal,
    hangup: Signal,
}

impl Signals {
    fn new() -> std::io::Result<Self> {
        Ok(Self {
            terminate: signal(SignalKind::terminate())?,
            interrupt: signal(SignalKind::interrupt())?,
            hangup: signal(SignalKind::hangup())?,
        })
    }

    /// The next signal; `None` once the runtime shuts down.
    async fn next(&mut self) -> Option<Received> {
        tokio::select! {
            Some(()) = self.terminate.recv() => Some(Received::Terminate),
            Some(()) = self.interrupt.recv() => Some(Received::Interrupt),
            Some(()) = self.hangup.recv() => Some(Received::Hangup),
            else => None,
        }
    }
}

/// The next SIGTERM / SIGINT; a SIGHUP meanwhile is consumed, so that it does
/// not reload the configuration after the drain.
async fn next_stop_signal(signals: &mut Signals) -> Option<Received> {
    while let Some(s) = signals.next().await {
        if s != Received::Hangup {
            return Some(s);
        }
    }
    None
}

/// Loads and checks the file again; `None` (logged) when it is invalid or unchanged in effect.
fn reload(path: &Path, current: &Config) -> Option<Config> {
    tracing::info!(path = %path.display(), "SIGHUP received: reloading the configuration");
    let new = match steward_sinks::config::load(path) {
        Ok(c) => c,
        Err(e) => {
            metrics::counter!(steward_core::metric::CONFIG_RELOADS, "result" => "rejected")
                .increment(1);
            tracing::error!(
                "the new configuration is invalid; still running with the previous one. {e}"
            );
            return None;
        }
    };
    if new.state.path != current.state.path {
        metrics::counter!(steward_core::metric::CONFIG_RELOADS, "result" => "rejected")
            .increment(1);
        tracing::error!(
            "state.path changed from {} to {}: a different state file needs a restart, not a \
             reload; still running with the previous configuration",
            current.state.path.display(),
            new.state.path.display()
        );
        return None;
    }
    for removed in current
        .targets
        .iter()
        .filter(|t| new.target(&t.name).is_none())
    {
        tracing::warn!(
            target_name = %removed.name,
            "target removed from the configuration: its outbox is kept in the state file; \
             adding the target back resumes delivery where it stopped"
        );
    }
    for added in new
        .targets
        .iter()
        .filter(|t| current.target(&t.name).is_none())
    {
        tracing::info!(target_name = %added.name, "target added");
    }
    Some(new)
}
