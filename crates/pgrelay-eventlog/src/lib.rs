//! The LiveStore sync backend: per-store event logs with sequence numbers,
//! served to unmodified LiveStore clients over the `@livestore/sync-cf`
//! 0.4 protocol (`/livestore`, Effect RPC) and the 0.3 one (`/websocket`).
//! It needs no PostgreSQL: logs live in SQLite unless told otherwise, and
//! it knows nothing of the row sync: the binary mounts [`EventLog::router`]
//! beside the row sync's routes and hands in who may use the admin API
//! ([`AdminAuth`]), who may use which store ([`StoreAccess`]) and the
//! server's limits ([`Admission`]), in an [`EventLogHost`].

mod access;
mod admin;
mod admission;
mod conn;
mod error;
mod event;
mod http;
mod httprpc;
mod limits;
mod pull;
mod registry;
mod rpc;
mod storage;
mod store;
mod wsmessage;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinSet;

pub use access::{
    payload_token, store_matches, AccessRefusal, OpenAccess, SharedToken, StoreAccess,
};
pub use admin::{AdminAuth, AdminCheck, AdminToken};
pub use error::EventLogError;
pub use limits::{Admission, FrameBudget, Unlimited};
pub use storage::EventLogStorage;
pub use store::StoreInfo;

use registry::Registry;
use secrecy::SecretString;
use storage::Storage;
use store::StoreHandle;

/// Settings of the event-log backend.
#[derive(Clone, Debug)]
pub struct EventLogConfig {
    pub storage: EventLogStorage,
    /// When set, a client's `payload` must be an object whose `authToken`
    /// is this token, or its socket is refused.
    pub auth_token: Option<SecretString>,
    /// Accepted batches queued per live subscription; a socket further
    /// behind is switched to catch-up from storage.
    pub subscriber_buffer: usize,
    /// SQLite's `synchronous` setting: `true` (FULL, the default) syncs
    /// every commit to disk before a push is acknowledged, so it survives a
    /// power loss; `false` (NORMAL, in WAL mode) survives a crash of pgrelay
    /// but not of the machine, and is much faster on slow disks.
    pub sqlite_sync_full: bool,
    /// A socket that sends nothing for this long is closed.
    pub idle_timeout: Duration,
    /// A send to a socket that takes longer than this closes the socket, so
    /// one stalled client never holds memory or a task hostage.
    pub send_timeout: Duration,
    /// Stores held in memory at most; past it the least recently used idle
    /// ones are evicted (and reloaded from storage on their next use).
    pub max_stores: usize,
    /// Store ids clients may use (`*` stands for any run of characters);
    /// empty: any. Others are refused before a store is created.
    pub allow_stores: Vec<String>,
}

impl Default for EventLogConfig {
    fn default() -> EventLogConfig {
        EventLogConfig {
            storage: EventLogStorage::Sqlite(None),
            auth_token: None,
            subscriber_buffer: 256,
            sqlite_sync_full: true,
            idle_timeout: Duration::from_secs(45),
            send_timeout: Duration::from_secs(30),
            max_stores: 10_000,
            allow_stores: Vec::new(),
        }
    }
}

/// The backend: its storage, its stores' tasks and its settings. Cheap to
/// clone; every socket holds one.
#[derive(Clone)]
pub struct EventLog {
    inner: Arc<Inner>,
}

struct Inner {
    storage: Storage,
    stores: Registry,
    tasks: Mutex<JoinSet<()>>,
    shutdown: watch::Receiver<bool>,
    config: EventLogConfig,
    host: EventLogHost,
}

/// What the host decides for the backend.
#[derive(Clone)]
pub struct EventLogHost {
    /// Who may use the store admin API.
    pub admin: Arc<dyn AdminAuth>,
    /// Who may use which store; [`OpenAccess`] serves anyone.
    pub access: Arc<dyn StoreAccess>,
    /// Connection and frame rates; [`Unlimited`] applies none.
    pub admission: Arc<dyn Admission>,
}

impl EventLogHost {
    /// The admin API as given, stores guarded by the config's shared token
    /// when it has one (open otherwise), no rate limits.
    pub fn new(admin: Arc<dyn AdminAuth>, config: &EventLogConfig) -> EventLogHost {
        let access: Arc<dyn StoreAccess> = match &config.auth_token {
            Some(token) => Arc::new(SharedToken(token.clone())),
            None => Arc::new(OpenAccess),
        };
        EventLogHost {
            admin,
            access,
            admission: Arc::new(Unlimited),
        }
    }
}

/// Why a client may not open a store.
pub(crate) enum OpenRefusal {
    Access(AccessRefusal),
    /// Every store held is in use and the registry is at `max_stores`.
    Full(usize),
    Failed(EventLogError),
}

impl EventLog {
    /// Opens the storage (creating its tables) and starts following other
    /// nodes' appends when the logs are in PostgreSQL. Sockets and store
    /// tasks stop when `shutdown` turns true; `host` decides who may use
    /// what and the limits.
    pub async fn open(
        config: EventLogConfig,
        host: EventLogHost,
        shutdown: watch::Receiver<bool>,
    ) -> Result<EventLog, EventLogError> {
        let storage = Storage::open(&config).await?;
        let log = EventLog {
            inner: Arc::new(Inner {
                storage,
                stores: Registry::new(config.max_stores),
                tasks: Mutex::new(JoinSet::new()),
                shutdown,
                config,
                host,
            }),
        };
        if let Storage::Postgres(pg) = &log.inner.storage {
            let (tx, rx) = tokio::sync::mpsc::channel(1024);
            let pg = std::sync::Arc::clone(pg);
            let shutdown = log.inner.shutdown.clone();
            if let Ok(mut tasks) = log.inner.tasks.lock() {
                tasks.spawn(async move { pg.follow(tx, shutdown).await });
                tasks.spawn(log.clone().refresh_on_notice(rx));
            }
        }
        Ok(log)
    }

    /// Tells a store this node serves that another node appended to it.
    async fn refresh_on_notice(self, mut notices: tokio::sync::mpsc::Receiver<Option<String>>) {
        while let Some(notice) = notices.recv().await {
            let stores: Vec<StoreHandle> = match &notice {
                Some(id) => match self.inner.stores.get(id) {
                    Ok(store) => store.into_iter().collect(),
                    Err(_) => return,
                },
                None => match self.inner.stores.all() {
                    Ok(stores) => stores,
                    Err(_) => return,
                },
            };
            for store in stores {
                store.refresh().await;
            }
        }
    }

    /// The store a client asks for, after the host's access check and the
    /// allowed store ids; started (or reloaded) on first use.
    pub(crate) async fn open_for_client(
        &self,
        id: &str,
        payload: Option<&serde_json::Value>,
    ) -> Result<StoreHandle, OpenRefusal> {
        self.inner
            .host
            .access
            .check(id, payload)
            .map_err(OpenRefusal::Access)?;
        let allowed = &self.inner.config.allow_stores;
        if !allowed.is_empty() && !allowed.iter().any(|p| store_matches(p, id)) {
            return Err(OpenRefusal::Access(AccessRefusal::Forbidden(format!(
                "store id {id:?} is not one this server serves (--eventlog-allow-stores)"
            ))));
        }
        match self.store(id).await {
            Ok(Ok(store)) => Ok(store),
            Ok(Err(registry::Full(max))) => Err(OpenRefusal::Full(max)),
            Err(e) => Err(OpenRefusal::Failed(e)),
        }
    }

    /// The store's task, started on first use with what storage knows.
    pub(crate) async fn store(
        &self,
        id: &str,
    ) -> Result<Result<StoreHandle, registry::Full>, EventLogError> {
        if let Some(handle) = self.inner.stores.get(id)? {
            return Ok(Ok(handle));
        }
        let meta = self.inner.storage.open_store(id).await?;
        self.inner.stores.insert_with(id, || {
            let (handle, task) = store::start(
                id,
                self.inner.storage.clone(),
                meta,
                self.inner.config.subscriber_buffer,
                self.inner.shutdown.clone(),
            );
            if let Ok(mut tasks) = self.inner.tasks.lock() {
                // Finished tasks (evicted stores) are reaped here so the set
                // does not grow.
                while tasks.try_join_next().is_some() {}
                tasks.spawn(task);
            }
            handle
        })
    }

    /// Stores held in memory now.
    pub fn stores_in_memory(&self) -> usize {
        self.inner.stores.len()
    }

    pub(crate) fn storage(&self) -> &Storage {
        &self.inner.storage
    }

    pub(crate) fn shutdown(&self) -> watch::Receiver<bool> {
        self.inner.shutdown.clone()
    }

    pub(crate) fn admin(&self) -> &dyn AdminAuth {
        self.inner.host.admin.as_ref()
    }

    pub(crate) fn admission(&self) -> &dyn Admission {
        self.inner.host.admission.as_ref()
    }

    pub(crate) fn idle_timeout(&self) -> Duration {
        self.inner.config.idle_timeout
    }

    pub(crate) fn send_timeout(&self) -> Duration {
        self.inner.config.send_timeout
    }

    /// The backend's routes: `/livestore` (0.4 over a WebSocket, or over
    /// HTTP with `POST`), `/websocket` (0.3) and the store admin API under
    /// `/admin/stores/`.
    pub fn router(&self) -> axum::Router {
        http::router(self.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_not_printed() {
        let config = EventLogConfig {
            storage: EventLogStorage::Postgres("postgres://app:pg-secret-7@db/app".into()),
            auth_token: Some("payload-token-8".into()),
            ..EventLogConfig::default()
        };
        let printed = format!("{config:?}");
        assert!(!printed.contains("pg-secret-7"), "{printed}");
        assert!(!printed.contains("payload-token-8"), "{printed}");
        assert!(printed.contains("subscriber_buffer: 256"), "{printed}");
    }
}
