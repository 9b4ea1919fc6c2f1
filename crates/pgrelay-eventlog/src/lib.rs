//! The LiveStore sync backend: per-store event logs with sequence numbers,
//! served to unmodified LiveStore clients over the `@livestore/sync-cf`
//! 0.4 protocol (`/livestore`, Effect RPC) and the 0.3 one (`/websocket`).
//! It needs no PostgreSQL: logs live in SQLite unless told otherwise, and
//! it knows nothing of the row sync: the binary mounts [`EventLog::router`]
//! beside the row sync's routes and hands in who may use the admin API
//! ([`AdminAuth`]).

mod admin;
mod conn;
mod error;
mod event;
mod http;
mod pull;
mod rpc;
mod storage;
mod store;
mod wsmessage;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinSet;

pub use admin::{AdminAuth, AdminCheck, AdminToken};
pub use error::EventLogError;
pub use storage::EventLogStorage;
pub use store::StoreInfo;

use secrecy::{ExposeSecret, SecretString};
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
    stores: Mutex<HashMap<Arc<str>, StoreHandle>>,
    tasks: Mutex<JoinSet<()>>,
    shutdown: watch::Receiver<bool>,
    config: EventLogConfig,
    admin: Arc<dyn AdminAuth>,
}

impl EventLog {
    /// Opens the storage (creating its tables) and starts following other
    /// nodes' appends when the logs are in PostgreSQL. Sockets and store
    /// tasks stop when `shutdown` turns true; `admin` decides who may use
    /// the store admin API.
    pub async fn open(
        config: EventLogConfig,
        admin: Arc<dyn AdminAuth>,
        shutdown: watch::Receiver<bool>,
    ) -> Result<EventLog, EventLogError> {
        let storage = Storage::open(&config).await?;
        let log = EventLog {
            inner: Arc::new(Inner {
                storage,
                stores: Mutex::new(HashMap::new()),
                tasks: Mutex::new(JoinSet::new()),
                shutdown,
                config,
                admin,
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
            let stores: Vec<StoreHandle> = match self.lock_stores() {
                Ok(stores) => match &notice {
                    Some(id) => stores.get(id.as_str()).cloned().into_iter().collect(),
                    None => stores.values().cloned().collect(),
                },
                Err(_) => return,
            };
            for store in stores {
                store.refresh().await;
            }
        }
    }

    /// The store's task, started on first use with what storage knows.
    pub(crate) async fn store(&self, id: &str) -> Result<StoreHandle, EventLogError> {
        if let Some(handle) = self.lock_stores()?.get(id) {
            return Ok(handle.clone());
        }
        let meta = self.inner.storage.open_store(id).await?;
        let mut stores = self.lock_stores()?;
        if let Some(handle) = stores.get(id) {
            return Ok(handle.clone());
        }
        let (handle, task) = store::start(
            id,
            self.inner.storage.clone(),
            meta,
            self.inner.config.subscriber_buffer,
            self.inner.shutdown.clone(),
        );
        if let Ok(mut tasks) = self.inner.tasks.lock() {
            // Finished tasks are reaped here so the set does not grow.
            while tasks.try_join_next().is_some() {}
            tasks.spawn(task);
        }
        stores.insert(Arc::clone(&handle.id), handle.clone());
        Ok(handle)
    }

    fn lock_stores(
        &self,
    ) -> Result<std::sync::MutexGuard<'_, HashMap<Arc<str>, StoreHandle>>, EventLogError> {
        self.inner
            .stores
            .lock()
            .map_err(|_| EventLogError::Storage("store registry lock poisoned".to_owned()))
    }

    pub(crate) fn storage(&self) -> &Storage {
        &self.inner.storage
    }

    pub(crate) fn shutdown(&self) -> watch::Receiver<bool> {
        self.inner.shutdown.clone()
    }

    pub(crate) fn auth_token(&self) -> Option<&str> {
        self.inner
            .config
            .auth_token
            .as_ref()
            .map(|t| t.expose_secret())
    }

    pub(crate) fn admin(&self) -> &dyn AdminAuth {
        self.inner.admin.as_ref()
    }

    pub(crate) fn idle_timeout(&self) -> Duration {
        self.inner.config.idle_timeout
    }

    pub(crate) fn send_timeout(&self) -> Duration {
        self.inner.config.send_timeout
    }

    /// The backend's routes: `/livestore` (0.4), `/websocket` (0.3) and the
    /// store admin API under `/admin/stores/`.
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
