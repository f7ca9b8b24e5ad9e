//! Operator requests (`steward dlq replay|drop`, `steward flush`), which
//! arrive through the target's [`Inbox`](crate::requests::Inbox): applied
//! between batches, and watched for while a batch is in flight or backing
//! off so that it can be abandoned for one.

use super::requests::{self, Request, Response};
use super::{Deliver, Driver, Stop};
use steward_store::Outbox;

impl<D: Deliver + 'static, O: Outbox> Driver<D, O> {
    /// Applies waiting operator requests.
    pub(super) async fn handle_requests(&mut self) -> Result<(), Stop> {
        let mut changed = false;
        for command in self.inbox.take() {
            let response = match command.request {
                Request::Flush => {
                    tracing::info!(target_name = %self.target.name, "flush requested: opening the batch windows now");
                    self.flush = true;
                    Response::Flushed
                }
                request => {
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
            // The asker may have given up waiting; the request stands anyway.
            let _ = command.reply.send(response);
        }
        if changed {
            let (store, name) = (self.store.clone(), self.target.name.clone());
            self.held = self.store_call(move || store.held_keys(&name)).await?;
            self.refresh_gauges().await?;
        }
        Ok(())
    }
}
