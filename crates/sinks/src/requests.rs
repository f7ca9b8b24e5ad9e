//! Operator requests to a target's delivery driver (`steward dlq ...`,
//! `steward flush`).
//!
//! While the daemon runs it holds the state file, so the control API hands
//! requests that change what a target gets next (replay, drop, flush) to the
//! target's driver through its [`Inbox`]; the driver applies them between
//! deliveries and answers on the request's own channel. Listing dead
//! letters only reads the store, which the API does itself. When the daemon
//! is stopped the command line opens the store and applies the request
//! itself with the same [`apply`].

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};

use serde::{Deserialize, Serialize};
use tokio::sync::{oneshot, watch};

use steward_store::{DeadLetter, DlqFilter, Outbox, StoreError};

/// Meta key recording a `flush` made while the daemon was stopped.
pub(crate) fn flush_meta_key(target: &str) -> String {
    format!("flush_requested:{target}")
}

/// What an operator asks of a target's dead-letter queue or batch windows.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Show the dead letters that match.
    List {
        /// Which dead letters.
        filter: DlqFilter,
    },
    /// Put the matching dead letters back in line for delivery.
    Replay {
        /// Which dead letters.
        filter: DlqFilter,
    },
    /// Discard the matching dead letters for good.
    Drop {
        /// Which dead letters.
        filter: DlqFilter,
    },
    /// Open the target's batch windows now.
    Flush,
}

impl Request {
    /// Whether the request changes what the driver delivers next (it then
    /// abandons a batch in flight or backing off, and re-reads after applying it).
    pub(crate) fn is_mutating(&self) -> bool {
        !matches!(self, Request::List { .. })
    }
}

/// The driver's (or the stopped daemon's store's) answer to a [`Request`].
///
/// Adjacently tagged, not internally: serde buffers an internally tagged
/// enum's fields into a generic tree first, and an event's `data` (raw JSON
/// text) can only be read straight from the JSON.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "result", content = "body", rename_all = "snake_case")]
pub enum Response {
    /// The answer to [`Request::List`].
    DeadLetters {
        /// The matching dead letters, in id order.
        entries: Vec<DeadLetter>,
    },
    /// The answer to [`Request::Replay`].
    Replayed {
        /// How many dead letters were put back in line.
        count: u64,
    },
    /// The answer to [`Request::Drop`].
    Dropped {
        /// How many dead letters were discarded.
        count: u64,
    },
    /// The answer to [`Request::Flush`].
    Flushed,
    /// The request could not be read or applied.
    Error {
        /// Why, for the operator.
        message: String,
    },
}

/// Applies a request to an open store. `Flush` is recorded for the driver's
/// next start (only a running driver can open its windows).
pub fn apply(store: &impl Outbox, target: &str, request: &Request) -> Result<Response, StoreError> {
    Ok(match request {
        Request::List { filter } => Response::DeadLetters {
            entries: store.dead_letters(target, filter)?,
        },
        Request::Replay { filter } => Response::Replayed {
            count: store.replay_dead_letters(target, filter)?,
        },
        Request::Drop { filter } => Response::Dropped {
            count: store.drop_dead_letters(target, filter)?,
        },
        Request::Flush => {
            store.set_meta(&flush_meta_key(target), "1")?;
            Response::Flushed
        }
    })
}

/// A request on its way to a driver, with where its answer goes.
#[derive(Debug)]
pub struct Command {
    /// What is asked.
    pub request: Request,
    /// Where the driver sends its answer; dropped unanswered if the driver stops first.
    pub reply: oneshot::Sender<Response>,
}

/// One target's waiting operator requests: the control API puts them in,
/// the target's driver takes them out between deliveries. Lanes watch the
/// count so that a batch in flight or backing off is abandoned for a request.
#[derive(Clone)]
pub struct Inbox {
    inner: Arc<InboxInner>,
}

struct InboxInner {
    queue: Mutex<VecDeque<Command>>,
    /// How many requests wait in `queue`.
    waiting: watch::Sender<usize>,
}

impl Default for Inbox {
    fn default() -> Self {
        Inbox {
            inner: Arc::new(InboxInner {
                queue: Mutex::new(VecDeque::new()),
                waiting: watch::Sender::new(0),
            }),
        }
    }
}

impl Inbox {
    /// Queues `request` for the driver; the answer arrives on the receiver
    /// (an error there means the driver stopped without answering).
    pub fn submit(&self, request: Request) -> oneshot::Receiver<Response> {
        let (reply, answer) = oneshot::channel();
        let mut queue = self.queue();
        queue.push_back(Command { request, reply });
        let n = queue.len();
        drop(queue);
        self.inner.waiting.send_replace(n);
        answer
    }

    /// Every waiting request, oldest first.
    pub(crate) fn take(&self) -> Vec<Command> {
        let mut queue = self.queue();
        let taken: Vec<Command> = queue.drain(..).collect();
        drop(queue);
        self.inner.waiting.send_replace(0);
        taken
    }

    /// Completes once a request is waiting.
    pub(crate) async fn wait(&self) {
        let mut waiting = self.inner.waiting.subscribe();
        let _ = waiting.wait_for(|n| *n > 0).await;
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, VecDeque<Command>> {
        self.inner
            .queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use steward_core::model::{Event, EventOp, Lsn};

    #[test]
    fn a_dead_letter_list_survives_the_trip_from_daemon_to_cli() {
        let entry = DeadLetter {
            id: 7,
            event: Event {
                change: None,
                tx_id: Some(42),
                id: Event::source_id(Lsn(0x100), 3),
                entity: "product".into(),
                key: "9002".into(),
                op: EventOp::Upsert,
                version: 0x100,
                time: "2024-05-01T12:00:00.000Z".into(),
                data: serde_json::json!({ "sku": "A-1", "price": 12.5 }).into(),
            },
            error: "HTTP 422".into(),
            held_behind: None,
            attempts: 1,
            first_failure: "2024-05-01T12:00:01Z".into(),
            last_failure: "2024-05-01T12:00:02Z".into(),
        };
        let response = Response::DeadLetters {
            entries: vec![entry],
        };
        let text = serde_json::to_vec(&response).unwrap();
        let back: Response = serde_json::from_slice(&text).unwrap();
        assert_eq!(back, response);
    }
}
