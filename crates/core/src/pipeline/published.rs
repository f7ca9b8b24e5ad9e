//! What was last appended per target and record, as the governance sees it:
//! the store's published state ([`PublishedReader`]) under the changes the
//! governance made that the store does not show yet.
//!
//! The published state grows with every record and target (a million
//! partners into three targets: three million entries); held in memory it
//! was most of steward's memory. Here only the changes in flight are: each
//! is kept, with the generation of the delta that carries it, until the
//! store reports that generation committed, and then read from the store.

use std::collections::VecDeque;

use super::slot_map::{Slot, SlotMap};
use crate::state::{PublishedReader, WITHHELD};

/// What a target was last sent of a record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Sent {
    /// Nothing, and nothing was decided for it.
    Nothing,
    /// Nothing: the record is withheld from it (gated, not routed,
    /// quarantined).
    Withheld,
    /// A document with this (shortened) hash.
    Hash([u8; 8]),
}

impl Sent {
    pub(crate) fn of(hash: Option<[u8; 16]>) -> Sent {
        match hash {
            None => Sent::Nothing,
            Some(h) if h == WITHHELD => Sent::Withheld,
            Some(h) => Sent::Hash(short_hash(&h)),
        }
    }

    pub(crate) fn is_published(self) -> bool {
        matches!(self, Sent::Hash(_))
    }
}

/// The first 8 bytes of a document hash: what the governance compares.
pub(crate) fn short_hash(hash: &[u8; 16]) -> [u8; 8] {
    let mut short = [0u8; 8];
    short.copy_from_slice(&hash[..8]);
    short
}

/// The store's published state under the governance's own changes.
pub(crate) struct PublishedState {
    /// Changes not yet seen in the store: slot → (what was sent, generation).
    pending: SlotMap<(Sent, u64)>,
    /// The slots changed per generation, oldest first; the last one is the
    /// generation being written when `open` is set.
    generations: VecDeque<(u64, Vec<Slot>)>,
    open: bool,
    reader: Box<dyn PublishedReader>,
}

impl PublishedState {
    pub(crate) fn new(reader: Box<dyn PublishedReader>) -> PublishedState {
        PublishedState {
            pending: SlotMap::default(),
            generations: VecDeque::new(),
            open: false,
            reader,
        }
    }

    /// Reads from `reader` from now on; changes not yet committed are kept.
    pub(crate) fn set_reader(&mut self, reader: Box<dyn PublishedReader>) {
        self.reader = reader;
    }

    /// What (target, entity, key), whose digest's slot is `slot`, was last sent.
    pub(crate) fn get(&self, slot: &Slot, target: &str, entity: &str, key: &str) -> Sent {
        match self.pending.get(slot) {
            Some((sent, _)) => sent,
            None => Sent::of(self.reader.get(target, entity, key)),
        }
    }

    /// Records a change (also queued for the store by the caller).
    pub(crate) fn set(&mut self, slot: Slot, sent: Sent) {
        if !self.open {
            let generation = self.reader.next_generation();
            self.generations.push_back((generation, Vec::new()));
            self.open = true;
        }
        let (generation, slots) = self
            .generations
            .back_mut()
            .expect("an open generation was just pushed");
        self.pending.insert(slot, (sent, *generation));
        slots.push(slot);
    }

    /// Ends the generation of the changes made since the last call and
    /// returns it (0: there were none), for the delta that carries them.
    pub(crate) fn seal(&mut self) -> u64 {
        if !std::mem::replace(&mut self.open, false) {
            return 0;
        }
        self.generations.back().map_or(0, |(g, _)| *g)
    }

    /// Forgets the changes the store now shows.
    pub(crate) fn sync(&mut self) {
        let visible = self.reader.refresh();
        let closed = self.generations.len() - usize::from(self.open);
        let mut dropped = 0;
        while dropped < closed && self.generations[0].0 <= visible {
            let (generation, slots) = self.generations.pop_front().expect("counted");
            for slot in slots {
                // A later generation's change of the slot stays.
                if self
                    .pending
                    .get(&slot)
                    .is_some_and(|(_, g)| g == generation)
                {
                    self.pending.remove(&slot);
                }
            }
            dropped += 1;
        }
        if dropped > 0 && self.generations.is_empty() {
            // Give back the memory of a burst.
            self.pending = SlotMap::default();
        }
    }

    /// The first read error of the store since the last call.
    pub(crate) fn error(&mut self) -> Option<String> {
        self.reader.error()
    }

    /// Lets go of the store's read transaction while idle.
    pub(crate) fn release(&mut self) {
        self.reader.release();
    }

    /// Changes held in memory (for tests).
    #[cfg(test)]
    pub(crate) fn pending(&self) -> usize {
        self.pending.len()
    }
}

/// A store's published state for tests: a delta's changes are read, and its
/// generation shown, once [`TestStore::commit`] applied it.
#[cfg(test)]
#[derive(Clone, Default)]
pub(crate) struct TestStore(std::sync::Arc<std::sync::Mutex<TestTable>>);

#[cfg(test)]
#[derive(Default)]
pub(crate) struct TestTable {
    committed: crate::state::MemoryPublished,
    pub(crate) visible: u64,
    next: u64,
}

#[cfg(test)]
impl TestStore {
    pub(crate) fn commit(&self, delta: &crate::state::GovDelta) {
        let mut t = self.table();
        t.committed.apply(delta);
        t.visible = t.visible.max(delta.generation);
    }

    pub(crate) fn table(&self) -> std::sync::MutexGuard<'_, TestTable> {
        self.0.lock().unwrap()
    }
}

#[cfg(test)]
impl PublishedReader for TestStore {
    fn get(&self, target: &str, entity: &str, key: &str) -> Option<[u8; 16]> {
        self.table().committed.get(target, entity, key)
    }
    fn refresh(&mut self) -> u64 {
        self.table().visible
    }
    fn next_generation(&mut self) -> u64 {
        let mut t = self.table();
        t.next += 1;
        t.next
    }
    fn error(&mut self) -> Option<String> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{push_published_change, GovDelta};

    fn slot(n: u8) -> Slot {
        [n; 12]
    }

    fn delta(hash: [u8; 16], generation: u64) -> GovDelta {
        let mut delta = GovDelta {
            generation,
            ..GovDelta::default()
        };
        push_published_change(&mut delta.published, "t", "e", "1", Some(hash));
        delta
    }

    #[test]
    fn changes_stay_in_memory_until_the_store_shows_them() {
        let store = TestStore::default();
        let mut state = PublishedState::new(Box::new(store.clone()));
        let hash = [7u8; 16];
        state.set(slot(1), Sent::of(Some(hash)));
        let g1 = state.seal();
        assert!(g1 > 0);
        assert_eq!(state.seal(), 0, "nothing changed since");
        // A later change of the same record, in the next generation.
        state.set(slot(1), Sent::Withheld);
        let g2 = state.seal();
        assert!(g2 > g1);

        state.sync();
        assert_eq!(state.get(&slot(1), "t", "e", "1"), Sent::Withheld);
        store.commit(&delta(hash, g1));
        state.sync();
        assert_eq!(
            state.get(&slot(1), "t", "e", "1"),
            Sent::Withheld,
            "the later generation's change stays in memory"
        );
        assert_eq!(state.pending(), 1);
        store.commit(&delta(WITHHELD, g2));
        state.sync();
        assert_eq!(state.pending(), 0);
        assert_eq!(state.get(&slot(1), "t", "e", "1"), Sent::Withheld);
        assert_eq!(state.get(&slot(2), "t", "e", "2"), Sent::Nothing);
    }

    #[test]
    fn the_generation_being_written_is_never_dropped() {
        let store = TestStore::default();
        let mut state = PublishedState::new(Box::new(store.clone()));
        state.set(slot(1), Sent::Hash([1; 8]));
        // The store already shows a later generation (another governance's).
        store.table().visible = 100;
        state.sync();
        assert_eq!(state.get(&slot(1), "t", "e", "1"), Sent::Hash([1; 8]));
        let g = state.seal();
        assert!(g <= 100);
        state.sync();
        assert_eq!(state.pending(), 0, "sealed and shown: dropped");
    }
}
