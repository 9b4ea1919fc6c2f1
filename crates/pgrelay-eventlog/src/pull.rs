//! A pull: the store's history after a cursor, read from storage page by
//! page up to the head at which the pull subscribed, then every batch
//! accepted after that head as it is broadcast. A subscriber that falls a
//! whole buffer behind subscribes again and catches up from storage, so
//! memory stays bounded and nothing is skipped or sent twice.

use std::sync::Arc;

use tokio::sync::mpsc;

use super::event::{paginate, Page, MAX_PAGE_EVENTS};
use super::storage::Storage;
use super::store::{Broadcast, StoreHandle};

pub(crate) struct Pull {
    pub(crate) request_id: String,
    pub(crate) backend_id: Arc<str>,
    store: StoreHandle,
    /// The last sequence number sent (or the cursor).
    sent: i64,
    /// The head at subscription: history runs up to here.
    target: i64,
    batches: mpsc::Receiver<Arc<Broadcast>>,
    live: bool,
    /// Whether the pull's first answer went out (an empty page if the
    /// history after the cursor is empty).
    answered: bool,
}

pub(crate) enum PullStep {
    /// A page of history, with the events still to come before the pull is live.
    Page { page: Page, remaining: i64 },
    /// Nothing after the cursor: one empty answer.
    Empty,
    /// A batch accepted after the pull caught up.
    Live(Arc<Broadcast>),
    /// The history is sent and the pull is not live: it ends here.
    Done,
    /// The store was reset or the server is stopping: the socket closes.
    Ended(&'static str),
    /// Storage failed.
    Failed(String),
}

impl Drop for Pull {
    fn drop(&mut self) {
        // Its subscription would otherwise stay in the store's list until
        // the next push or pull found it closed.
        if self.live {
            self.store.prune_soon();
        }
    }
}

impl Pull {
    /// Learns the store's head (and with `live`, subscribes to what comes
    /// after it); `None` when the server is shutting down.
    pub(crate) async fn start(
        store: &StoreHandle,
        request_id: String,
        cursor: i64,
        live: bool,
    ) -> Option<Pull> {
        let subscription = store.subscribe(live).await?;
        Some(Pull {
            request_id,
            backend_id: subscription.backend_id,
            store: store.clone(),
            sent: cursor,
            target: subscription.head,
            batches: subscription.batches,
            live,
            answered: false,
        })
    }

    /// Every batch accepted from now on, and no history: what a 0.3
    /// socket receives from the moment it connects.
    pub(crate) async fn broadcast(store: &StoreHandle) -> Option<Pull> {
        let mut pull = Pull::start(store, String::new(), 0, true).await?;
        pull.sent = pull.target;
        pull.answered = true;
        Some(pull)
    }

    /// The history after `cursor` up to `upto`, then the end: a 0.3 pull,
    /// whose socket already receives what comes after `upto`.
    pub(crate) fn history(
        store: &StoreHandle,
        request_id: String,
        backend_id: Arc<str>,
        cursor: i64,
        upto: i64,
    ) -> Pull {
        let (_, batches) = mpsc::channel(1);
        Pull {
            request_id,
            backend_id,
            store: store.clone(),
            sent: cursor,
            target: upto,
            batches,
            live: false,
            answered: false,
        }
    }

    /// The head up to which this (live) pull has sent or will send history
    /// before its live batches.
    pub(crate) fn start_head(&self) -> i64 {
        self.target
    }

    pub(crate) fn is_live(&self) -> bool {
        self.live
    }

    /// The next thing to send. Cancel-safe: state changes only once a
    /// step is complete.
    pub(crate) async fn step(&mut self, storage: &Storage) -> PullStep {
        loop {
            if self.sent < self.target {
                let events = match storage
                    .read(&self.store.id, self.sent, self.target, MAX_PAGE_EVENTS)
                    .await
                {
                    Ok(events) => events,
                    Err(e) => return PullStep::Failed(e.to_string()),
                };
                let Some(page) = paginate(
                    events
                        .iter()
                        .map(|e| (e.seq, e.json.as_str(), e.created_at.as_str())),
                )
                .into_iter()
                .next() else {
                    // Fewer events stored than the head says (a reset raced
                    // this read): what there is has been sent.
                    self.sent = self.target;
                    continue;
                };
                self.sent = page.last_seq;
                self.answered = true;
                let remaining = (self.target - self.sent).max(0);
                return PullStep::Page { page, remaining };
            }
            if !self.answered {
                self.answered = true;
                return PullStep::Empty;
            }
            if !self.live {
                return PullStep::Done;
            }
            match self.batches.recv().await {
                Some(batch) if batch.last_seq <= self.sent => continue,
                Some(batch) => {
                    self.sent = batch.last_seq;
                    return PullStep::Live(batch);
                }
                None => match self.store.subscribe(true).await {
                    None => return PullStep::Ended("server shutting down"),
                    Some(sub) if sub.backend_id != self.backend_id => {
                        return PullStep::Ended("store reset")
                    }
                    Some(sub) => {
                        tracing::debug!(store = %self.store.id, from = self.sent, to = sub.head, "catching up from storage");
                        self.target = sub.head;
                        self.batches = sub.batches;
                    }
                },
            }
        }
    }

    /// A batch already queued for a caught-up live pull, if any: lets a
    /// pusher's own echo go out before the push's answer.
    pub(crate) fn try_live(&mut self) -> Option<Arc<Broadcast>> {
        if self.sent < self.target || !self.answered || !self.live {
            return None;
        }
        loop {
            match self.batches.try_recv() {
                Ok(batch) if batch.last_seq <= self.sent => continue,
                Ok(batch) => {
                    self.sent = batch.last_seq;
                    return Some(batch);
                }
                Err(_) => return None,
            }
        }
    }
}
