//! What a target's delivery driver may do with the state file: read its
//! outbox and the queues beside it (replay, window buffer), settle a batch,
//! note an error, manage its dead letters and its flush flag, and make its
//! acknowledgements durable. It cannot append, move the checkpoint or touch
//! governance state, snapshots, audit or backups: those are the daemon's.
//!
//! The methods keep the names of [`Store`]'s own, so the daemon, the
//! command line and the tests call them the same way on a concrete store.

use std::collections::HashSet;
use std::path::Path;

use steward_core::model::Event;

use super::{DeadLetter, DeliveryCounts, DlqFilter, Settlement, Store, StoreError};

/// A handle on the per-target queues a delivery driver works from (see the
/// module documentation). Cheap to clone; every method may wait for the
/// disk, so async code calls them off its threads.
///
/// The driver is generic over it rather than holding a `dyn Outbox`: the
/// driver is generic over its sink already, so this costs no second copy of
/// it in the binary, and the store calls stay direct.
pub trait Outbox: Clone + Send + Sync + 'static {
    /// The state file: named in errors, and operator requests arrive next to it.
    fn path(&self) -> &Path;

    /// Up to `max` entries of the target's outbox with seq > `after`
    /// (`None`: from the start), in sequence order.
    fn read_outbox(
        &self,
        target: &str,
        after: Option<u64>,
        max: usize,
    ) -> Result<Vec<(u64, Event)>, StoreError>;

    /// Number of entries waiting in the target's outbox.
    fn backlog(&self, target: &str) -> Result<u64, StoreError>;

    /// Up to `max` replay-queue entries (dead letters sent back), in order.
    fn read_replay(&self, target: &str, max: usize) -> Result<Vec<(u64, Event)>, StoreError>;

    /// The window buffer's events of `entities`, grouped by entity in key order.
    fn read_window(&self, target: &str, entities: &[&str]) -> Result<Vec<Event>, StoreError>;

    /// Applies what the driver did with one batch in one transaction.
    /// Returns the dead-letter ids assigned, in order.
    fn settle(&self, target: &str, settlement: &Settlement) -> Result<Vec<u64>, StoreError>;

    /// Records (or with `None` clears) the target's last delivery error.
    fn set_target_error(&self, target: &str, error: Option<&str>) -> Result<(), StoreError>;

    /// Counters of the target's dead letters, replay queue and window buffer.
    fn delivery_counts(&self, target: &str) -> Result<DeliveryCounts, StoreError>;

    /// Held keys (`key_of`) of the target: those with dead letters.
    fn held_keys(&self, target: &str) -> Result<HashSet<String>, StoreError>;

    /// Dead letters matching `filter`, in id order.
    fn dead_letters(&self, target: &str, filter: &DlqFilter)
        -> Result<Vec<DeadLetter>, StoreError>;

    /// Sends the matching dead letters (whole keys) back for delivery.
    fn replay_dead_letters(&self, target: &str, filter: &DlqFilter) -> Result<u64, StoreError>;

    /// Deletes exactly the matching dead letters.
    fn drop_dead_letters(&self, target: &str, filter: &DlqFilter) -> Result<u64, StoreError>;

    /// A bookkeeping value (the driver's: a flush asked for while it was stopped).
    fn get_meta(&self, key: &str) -> Result<Option<String>, StoreError>;

    /// Sets a bookkeeping value, durably.
    fn set_meta(&self, key: &str, value: &str) -> Result<(), StoreError>;

    /// Durable commits so far: an acknowledgement made before the count
    /// moved past its value at that time is durable.
    fn durable_commits(&self) -> u64;

    /// Makes every commit so far durable, acknowledgements included.
    fn make_durable(&self) -> Result<(), StoreError>;
}

impl Outbox for Store {
    #[inline]
    fn path(&self) -> &Path {
        Store::path(self)
    }

    #[inline]
    fn read_outbox(
        &self,
        target: &str,
        after: Option<u64>,
        max: usize,
    ) -> Result<Vec<(u64, Event)>, StoreError> {
        Store::read_outbox(self, target, after, max)
    }

    #[inline]
    fn backlog(&self, target: &str) -> Result<u64, StoreError> {
        Store::backlog(self, target)
    }

    #[inline]
    fn read_replay(&self, target: &str, max: usize) -> Result<Vec<(u64, Event)>, StoreError> {
        Store::read_replay(self, target, max)
    }

    #[inline]
    fn read_window(&self, target: &str, entities: &[&str]) -> Result<Vec<Event>, StoreError> {
        Store::read_window(self, target, entities)
    }

    #[inline]
    fn settle(&self, target: &str, settlement: &Settlement) -> Result<Vec<u64>, StoreError> {
        Store::settle(self, target, settlement)
    }

    #[inline]
    fn set_target_error(&self, target: &str, error: Option<&str>) -> Result<(), StoreError> {
        Store::set_target_error(self, target, error)
    }

    #[inline]
    fn delivery_counts(&self, target: &str) -> Result<DeliveryCounts, StoreError> {
        Store::delivery_counts(self, target)
    }

    #[inline]
    fn held_keys(&self, target: &str) -> Result<HashSet<String>, StoreError> {
        Store::held_keys(self, target)
    }

    #[inline]
    fn dead_letters(
        &self,
        target: &str,
        filter: &DlqFilter,
    ) -> Result<Vec<DeadLetter>, StoreError> {
        Store::dead_letters(self, target, filter)
    }

    #[inline]
    fn replay_dead_letters(&self, target: &str, filter: &DlqFilter) -> Result<u64, StoreError> {
        Store::replay_dead_letters(self, target, filter)
    }

    #[inline]
    fn drop_dead_letters(&self, target: &str, filter: &DlqFilter) -> Result<u64, StoreError> {
        Store::drop_dead_letters(self, target, filter)
    }

    #[inline]
    fn get_meta(&self, key: &str) -> Result<Option<String>, StoreError> {
        Store::get_meta(self, key)
    }

    #[inline]
    fn set_meta(&self, key: &str, value: &str) -> Result<(), StoreError> {
        Store::set_meta(self, key, value)
    }

    #[inline]
    fn durable_commits(&self) -> u64 {
        Store::durable_commits(self)
    }

    #[inline]
    fn make_durable(&self) -> Result<(), StoreError> {
        Store::make_durable(self)
    }
}
