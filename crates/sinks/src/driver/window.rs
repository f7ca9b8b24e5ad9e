//! Batch windows: when each windowed entity's window opens next, and
//! delivering the window buffer once it is open (or on `steward flush`).
//! Events reach the buffer through `settle`; this file only empties it.

use std::time::Duration;

use tokio::time::Instant;

use super::{Deliver, Driver, Stop, TargetQueue};
use steward_store::Outbox;

impl<D: Deliver + 'static, O: Outbox> Driver<D, O> {
    /// Sets the next opening of every windowed entity (all of them now when `now`).
    pub(super) fn schedule_windows(&mut self, now: bool) {
        let t = chrono::Utc::now().timestamp();
        for entity in &self.target.entities {
            let w = self.target.delivery.window_of(entity);
            if let Some(next) = w.next_open_after(t) {
                self.next_open
                    .insert(entity.clone(), if now { t } else { next });
            }
        }
    }

    pub(super) fn next_window_instant(&self) -> Option<Instant> {
        let earliest = self.next_open.values().min()?;
        let now = chrono::Utc::now().timestamp();
        Some(Instant::now() + Duration::from_secs(earliest.saturating_sub(now).max(0) as u64))
    }

    /// Delivers the window buffer of every entity whose window is open.
    /// True when some window was open (something may have been delivered).
    pub(super) async fn deliver_due_windows(&mut self) -> Result<bool, Stop> {
        if self.next_open.is_empty() {
            self.flush = false;
            return Ok(false);
        }
        if self.flush {
            self.schedule_windows(true);
        }
        let now = chrono::Utc::now().timestamp();
        let due: Vec<String> = self
            .next_open
            .iter()
            .filter(|(_, &t)| t <= now)
            .map(|(e, _)| e.clone())
            .collect();
        if due.is_empty() {
            return Ok(false);
        }
        let (store, name, entities) = (self.store.clone(), self.target.name.clone(), due.clone());
        let events = self
            .store_call(move || {
                let refs: Vec<&str> = entities.iter().map(String::as_str).collect();
                store.read_window(&name, &refs)
            })
            .await?;
        tracing::info!(target_name = %self.target.name, entities = ?due, events = events.len(), "batch window open");
        let mut rest = events;
        while !rest.is_empty() {
            let tail = rest.split_off(rest.len().min(self.max));
            let chunk = std::mem::replace(&mut rest, tail);
            self.process(TargetQueue::Window, chunk, None).await?;
        }
        self.flush = false;
        let t = chrono::Utc::now().timestamp();
        for entity in due {
            let next = self.target.delivery.window_of(&entity).next_open_after(t);
            if let Some(next) = next {
                self.next_open.insert(entity, next);
            }
        }
        Ok(true)
    }
}
