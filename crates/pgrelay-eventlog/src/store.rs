//! One store's event log: a task that admits pushes one at a time (check
//! the parent, append durably, then broadcast), and registers live
//! subscriptions between two pushes, so a subscriber's starting head and
//! its first live batch never overlap or leave a gap.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use axum::extract::ws::Utf8Bytes;
use tokio::sync::{mpsc, oneshot, watch};

use super::error::EventLogError;
use super::event::{now_iso, paginate, Event, Page, MAX_PAGE_EVENTS};
use super::storage::{Appended, Storage, StoreMeta};

/// Commands waiting for a store's task.
const COMMANDS: usize = 256;

/// An accepted batch on its way to every subscriber of the store, encoded
/// once for all of them.
#[derive(Debug)]
pub(crate) struct Broadcast {
    pub(crate) pages: Vec<Page>,
    pub(crate) last_seq: i64,
    /// The pusher's request id (the 0.3 protocol names it in the echo).
    pub(crate) push_request_id: String,
    /// The 0.4 `Chunk` frames, built by the first subscriber that needs
    /// them and shared by every other one pulling under the same request
    /// id (LiveStore clients all use "0").
    pub(crate) rpc_frames: OnceLock<(String, Vec<Utf8Bytes>)>,
}

/// A live subscription: every batch accepted after `head`, in order.
pub(crate) struct Subscription {
    pub(crate) backend_id: Arc<str>,
    pub(crate) head: i64,
    /// Closed when the subscriber fell a whole buffer behind, the store was
    /// reset or the server stops; the subscriber then subscribes again and
    /// catches up from storage.
    pub(crate) batches: mpsc::Receiver<Arc<Broadcast>>,
}

/// Why a push was not accepted.
#[derive(Debug)]
pub(crate) enum PushRefused {
    ServerAhead {
        minimum_expected: i64,
        provided: i64,
    },
    BackendIdMismatch {
        expected: String,
        received: String,
    },
    Failed(String),
}

/// A store's state as the admin API shows it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct StoreInfo {
    pub store_id: String,
    pub backend_id: String,
    pub head: i64,
    pub events: i64,
    pub sockets: usize,
    /// Live pulls subscribed to the store's new batches.
    pub subscriptions: usize,
}

enum Command {
    Push {
        events: Vec<Event>,
        backend_id: Option<String>,
        request_id: String,
        reply: oneshot::Sender<Result<(), PushRefused>>,
    },
    /// `live`: register for new batches; otherwise only learn the head.
    Subscribe {
        live: bool,
        reply: oneshot::Sender<Subscription>,
    },
    /// A live pull ended: forget subscriptions nobody reads any more.
    Prune,
    Info {
        reply: oneshot::Sender<StoreInfo>,
    },
    Reset {
        reply: oneshot::Sender<Result<StoreInfo, EventLogError>>,
    },
    /// Another node may have appended: read storage's head and broadcast
    /// what this node has not seen.
    Refresh,
}

/// A handle on a store's task; cheap to clone.
#[derive(Clone)]
pub(crate) struct StoreHandle {
    pub(crate) id: Arc<str>,
    commands: mpsc::Sender<Command>,
    sockets: Arc<AtomicUsize>,
}

/// Counts a socket as connected to its store while it lives.
pub(crate) struct SocketGuard(Arc<AtomicUsize>);

impl Drop for SocketGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl StoreHandle {
    pub(crate) fn connect_socket(&self) -> SocketGuard {
        self.sockets.fetch_add(1, Ordering::Relaxed);
        SocketGuard(Arc::clone(&self.sockets))
    }

    pub(crate) async fn push(
        &self,
        events: Vec<Event>,
        backend_id: Option<String>,
        request_id: String,
    ) -> Result<(), PushRefused> {
        let (reply, rx) = oneshot::channel();
        let command = Command::Push {
            events,
            backend_id,
            request_id,
            reply,
        };
        let gone = || PushRefused::Failed("the server is shutting down".to_owned());
        self.commands.send(command).await.map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }

    /// The store's head and backend id, and with `live` every batch
    /// accepted after that head. `None` when the server is shutting down.
    pub(crate) async fn subscribe(&self, live: bool) -> Option<Subscription> {
        let (reply, rx) = oneshot::channel();
        self.commands
            .send(Command::Subscribe { live, reply })
            .await
            .ok()?;
        rx.await.ok()
    }

    /// Asks the store to drop subscriptions whose pull has ended. Best
    /// effort: a full command queue skips it, and the next subscription
    /// prunes instead.
    pub(crate) fn prune_soon(&self) {
        let _ = self.commands.try_send(Command::Prune);
    }

    /// Whether anything but the registry and the store's own task holds
    /// this store (a socket, a pull, a request under way).
    pub(crate) fn in_use(&self) -> bool {
        Arc::strong_count(&self.sockets) > 2
    }

    pub(crate) async fn info(&self) -> Result<StoreInfo, EventLogError> {
        let (reply, rx) = oneshot::channel();
        self.commands
            .send(Command::Info { reply })
            .await
            .map_err(|_| EventLogError::ShuttingDown)?;
        rx.await.map_err(|_| EventLogError::ShuttingDown)
    }

    pub(crate) async fn refresh(&self) {
        let _ = self.commands.send(Command::Refresh).await;
    }

    pub(crate) async fn reset(&self) -> Result<StoreInfo, EventLogError> {
        let (reply, rx) = oneshot::channel();
        self.commands
            .send(Command::Reset { reply })
            .await
            .map_err(|_| EventLogError::ShuttingDown)?;
        rx.await.map_err(|_| EventLogError::ShuttingDown)?
    }
}

struct StoreTask {
    id: Arc<str>,
    storage: Storage,
    meta: StoreMeta,
    backend_id: Arc<str>,
    subscribers: Vec<mpsc::Sender<Arc<Broadcast>>>,
    /// Batches a subscriber may have queued before it is dropped to catch-up.
    buffer: usize,
    sockets: Arc<AtomicUsize>,
}

/// Starts a store's task with what storage knows of it.
pub(crate) fn start(
    id: &str,
    storage: Storage,
    meta: StoreMeta,
    buffer: usize,
    shutdown: watch::Receiver<bool>,
) -> (
    StoreHandle,
    impl std::future::Future<Output = ()> + Send + 'static,
) {
    let (commands, rx) = mpsc::channel(COMMANDS);
    let id: Arc<str> = Arc::from(id);
    let sockets = Arc::new(AtomicUsize::new(0));
    let task = StoreTask {
        id: Arc::clone(&id),
        storage,
        backend_id: Arc::from(meta.backend_id.as_str()),
        meta,
        subscribers: Vec::new(),
        buffer: buffer.max(1),
        sockets: Arc::clone(&sockets),
    };
    let handle = StoreHandle {
        id,
        commands,
        sockets,
    };
    (handle, task.run(rx, shutdown))
}

impl StoreTask {
    async fn run(
        mut self,
        mut commands: mpsc::Receiver<Command>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        loop {
            let command = tokio::select! {
                biased;
                _ = shutdown.wait_for(|stop| *stop) => break,
                command = commands.recv() => match command {
                    Some(command) => command,
                    None => break,
                },
            };
            match command {
                Command::Push {
                    events,
                    backend_id,
                    request_id,
                    reply,
                } => {
                    let result = self.push(events, backend_id, request_id).await;
                    let _ = reply.send(result);
                }
                Command::Subscribe { live, reply } => {
                    self.prune();
                    let (tx, batches) = mpsc::channel(if live { self.buffer } else { 1 });
                    let subscription = Subscription {
                        backend_id: Arc::clone(&self.backend_id),
                        head: self.meta.head,
                        batches,
                    };
                    if reply.send(subscription).is_ok() && live {
                        self.subscribers.push(tx);
                    }
                }
                Command::Prune => self.prune(),
                Command::Info { reply } => {
                    let _ = reply.send(self.info());
                }
                Command::Reset { reply } => {
                    let result = self.reset().await;
                    let _ = reply.send(result);
                }
                Command::Refresh => self.refresh().await,
            }
        }
        tracing::debug!(store = %self.id, "store task stopped");
    }

    fn prune(&mut self) {
        self.subscribers.retain(|tx| !tx.is_closed());
    }

    fn info(&self) -> StoreInfo {
        StoreInfo {
            store_id: self.id.to_string(),
            backend_id: self.meta.backend_id.clone(),
            head: self.meta.head,
            events: self.meta.events,
            sockets: self.sockets.load(Ordering::Relaxed),
            subscriptions: self.subscribers.iter().filter(|tx| !tx.is_closed()).count(),
        }
    }

    async fn reset(&mut self) -> Result<StoreInfo, EventLogError> {
        let meta = self.storage.reset(&self.id).await?;
        tracing::warn!(store = %self.id, backend_id = %meta.backend_id, "store reset");
        self.backend_id = Arc::from(meta.backend_id.as_str());
        self.meta = meta;
        // Every live subscription ends; its socket sees the new backend id
        // when it subscribes again and closes, so clients resync.
        self.subscribers.clear();
        Ok(self.info())
    }

    async fn push(
        &mut self,
        events: Vec<Event>,
        backend_id: Option<String>,
        request_id: String,
    ) -> Result<(), PushRefused> {
        if let Some(received) = backend_id.filter(|b| **b != *self.backend_id) {
            return Err(PushRefused::BackendIdMismatch {
                expected: self.backend_id.to_string(),
                received,
            });
        }
        let Some(first) = events.first() else {
            return Ok(());
        };
        if first.parent != self.meta.head {
            return Err(PushRefused::ServerAhead {
                minimum_expected: self.meta.head,
                provided: first.parent,
            });
        }
        let parent = first.parent;
        let created_at = now_iso();
        let events = Arc::new(events);
        match self
            .storage
            .append(&self.id, parent, Arc::clone(&events), &created_at)
            .await
        {
            Ok(Appended::Written) => {}
            Ok(Appended::HeadMoved { head }) => {
                // Another node appended to this store: adopt its head.
                self.meta.head = head;
                return Err(PushRefused::ServerAhead {
                    minimum_expected: head,
                    provided: parent,
                });
            }
            Err(e) => {
                tracing::error!(store = %self.id, error = %e, "appending a push failed");
                return Err(PushRefused::Failed(format!(
                    "storing the events failed: {e}"
                )));
            }
        }
        let last_seq = events.last().map(|e| e.seq).unwrap_or(parent);
        self.meta.head = last_seq;
        self.meta.events += i64::try_from(events.len()).unwrap_or(i64::MAX);
        let pages = paginate(
            events
                .iter()
                .map(|e| (e.seq, e.json.as_str(), created_at.as_str())),
        );
        self.broadcast(pages, last_seq, request_id);
        Ok(())
    }

    async fn refresh(&mut self) {
        let stored = match self.storage.open_store(&self.id).await {
            Ok(stored) => stored,
            Err(e) => {
                tracing::warn!(store = %self.id, error = %e, "reading the store's head failed");
                return;
            }
        };
        if stored.backend_id != self.meta.backend_id {
            tracing::warn!(store = %self.id, "store reset by another node");
            self.backend_id = Arc::from(stored.backend_id.as_str());
            self.meta = stored;
            self.subscribers.clear();
            return;
        }
        while self.meta.head < stored.head {
            let events = match self
                .storage
                .read(&self.id, self.meta.head, stored.head, MAX_PAGE_EVENTS)
                .await
            {
                Ok(events) if !events.is_empty() => events,
                Ok(_) => return,
                Err(e) => {
                    tracing::warn!(store = %self.id, error = %e, "reading other nodes' events failed");
                    return;
                }
            };
            let last_seq = events.last().map(|e| e.seq).unwrap_or(stored.head);
            self.meta.head = last_seq;
            self.meta.events += i64::try_from(events.len()).unwrap_or(i64::MAX);
            let pages = paginate(
                events
                    .iter()
                    .map(|e| (e.seq, e.json.as_str(), e.created_at.as_str())),
            );
            self.broadcast(pages, last_seq, String::new());
        }
    }

    fn broadcast(&mut self, pages: Vec<Page>, last_seq: i64, request_id: String) {
        let broadcast = Arc::new(Broadcast {
            pages,
            last_seq,
            push_request_id: request_id,
            rpc_frames: OnceLock::new(),
        });
        // A subscriber whose buffer is full is dropped rather than waited
        // for: it catches up from storage and subscribes again.
        self.subscribers
            .retain(|tx| match tx.try_send(Arc::clone(&broadcast)) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    tracing::debug!("a subscriber fell behind; it catches up from storage");
                    false
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            });
    }
}
