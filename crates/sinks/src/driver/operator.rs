//! Operator requests (`steward dlq`, `steward flush`), which arrive as files
//! (see `sinks::requests`): applied between batches, and watched for while a
//! batch is in flight or backing off so that it can be abandoned for one.

use super::requests::{self, Request, Response};
use super::{Deliver, Driver, Stop};
use steward_store::Outbox;

impl<D: Deliver + 'static, O: Outbox> Driver<D, O> {
    /// Applies waiting operator requests.
    pub(super) async fn handle_requests(&mut self) -> Result<(), Stop> {
        let (dir, name) = (self.requests_dir.clone(), self.target.name.clone());
        let pending = tokio::task::spawn_blocking(move || requests::pending(&dir, &name))
            .await
            .unwrap_or_default();
        let mut changed = false;
        for p in pending {
            let response = match p.request {
                Err(message) => Response::Error { message },
                Ok(Request::Flush) => {
                    tracing::info!(target_name = %self.target.name, "flush requested: opening the batch windows now");
                    self.flush = true;
                    Response::Flushed
                }
                Ok(request) => {
                    changed |= request.is_mutating();
                    let (store, name) = (self.store.clone(), self.target.name.clone());
                    let r = request.clone();
                    let applied = self
                        .store_call(move || requests::apply(&store, &name, &r))
                        .await?;
                    tracing::info!(target_name = %self.target.name, ?request, "operator request applied");
                    applied
                }
            };
            let path = p.path;
            let _ = tokio::task::spawn_blocking(move || requests::respond(&path, &response)).await;
        }
        if changed {
            let (store, name) = (self.store.clone(), self.target.name.clone());
            self.held = self.store_call(move || store.held_keys(&name)).await?;
            self.refresh_gauges().await?;
        }
        Ok(())
    }
}

/// Completes once an operator request that changes what comes next is waiting
/// (read-only ones are answered here directly). Polls every [`requests::POLL`].
pub(super) async fn interrupted(store: &impl Outbox, dir: &std::path::Path, target: &str) {
    loop {
        tokio::time::sleep(requests::POLL).await;
        let (store, dir, target) = (store.clone(), dir.to_path_buf(), target.to_string());
        let mutating = tokio::task::spawn_blocking(move || {
            let mut mutating = false;
            for p in requests::pending(&dir, &target) {
                match &p.request {
                    Ok(r @ Request::List { .. }) => {
                        let response = requests::apply(&store, &target, r).unwrap_or_else(|e| {
                            Response::Error {
                                message: e.to_string(),
                            }
                        });
                        requests::respond(&p.path, &response);
                    }
                    _ => mutating = true,
                }
            }
            mutating
        })
        .await
        .unwrap_or(false);
        if mutating {
            return;
        }
    }
}
