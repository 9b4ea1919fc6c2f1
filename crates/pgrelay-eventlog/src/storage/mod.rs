//! Where event logs live: embedded SQLite (default) or PostgreSQL in
//! pgrelay's own schema. Both keep one log per store, keyed by
//! `(store_id, seq_num)`, and a row per store with its backend id and head,
//! so a push is checked against the head and appended in one transaction.

mod postgres;
mod sqlite;

use std::path::PathBuf;
use std::sync::Arc;

use rand::Rng;
use secrecy::{ExposeSecret, SecretString};

use super::error::EventLogError;
use super::event::{Event, StoredEvent};

pub(crate) use postgres::PostgresStorage;
pub(crate) use sqlite::SqliteStorage;

/// What storage knows of one store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct StoreMeta {
    pub(crate) backend_id: String,
    pub(crate) head: i64,
    pub(crate) events: i64,
}

/// The result of an append: written, or refused because the stored head
/// is not the batch's parent (another node wrote first).
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Appended {
    Written,
    HeadMoved { head: i64 },
}

#[derive(Clone)]
pub(crate) enum Storage {
    Sqlite(Arc<SqliteStorage>),
    Postgres(Arc<PostgresStorage>),
}

/// Which storage `pgrelay serve` uses for event logs.
#[derive(Clone, Debug)]
pub enum EventLogStorage {
    /// A SQLite file; `None` keeps the logs in memory (tests, embedding).
    Sqlite(Option<PathBuf>),
    /// PostgreSQL at this URL (the server's `--database-url`), schema `pgrelay`.
    Postgres(SecretString),
}

impl Storage {
    pub(crate) async fn open(config: &super::EventLogConfig) -> Result<Storage, EventLogError> {
        match &config.storage {
            EventLogStorage::Sqlite(path) => Ok(Storage::Sqlite(Arc::new(
                SqliteStorage::open(path.clone(), config.sqlite_sync_full).await?,
            ))),
            EventLogStorage::Postgres(url) => Ok(Storage::Postgres(Arc::new(
                PostgresStorage::open(url.expose_secret()).await?,
            ))),
        }
    }

    /// The store's backend id, head and size; a store seen for the first
    /// time gets a new backend id.
    pub(crate) async fn open_store(&self, store: &str) -> Result<StoreMeta, EventLogError> {
        match self {
            Storage::Sqlite(s) => s.open_store(store).await,
            Storage::Postgres(s) => s.open_store(store).await,
        }
    }

    /// Appends `events` if the store's head is still `parent`, in one transaction.
    pub(crate) async fn append(
        &self,
        store: &str,
        parent: i64,
        events: Arc<Vec<Event>>,
        created_at: &str,
    ) -> Result<Appended, EventLogError> {
        match self {
            Storage::Sqlite(s) => s.append(store, parent, events, created_at).await,
            Storage::Postgres(s) => s.append(store, parent, &events, created_at).await,
        }
    }

    /// Events with `after < seqNum <= upto`, oldest first, at most `limit`.
    pub(crate) async fn read(
        &self,
        store: &str,
        after: i64,
        upto: i64,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, EventLogError> {
        match self {
            Storage::Sqlite(s) => s.read(store, after, upto, limit).await,
            Storage::Postgres(s) => s.read(store, after, upto, limit).await,
        }
    }

    /// Deletes the store's events and gives it a new backend id.
    pub(crate) async fn reset(&self, store: &str) -> Result<StoreMeta, EventLogError> {
        match self {
            Storage::Sqlite(s) => s.reset(store).await,
            Storage::Postgres(s) => s.reset(store).await,
        }
    }
}

/// A backend id like LiveStore's (21 URL-safe characters).
pub(crate) fn new_backend_id() -> String {
    const ALPHABET: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz_-";
    let mut rng = rand::rng();
    (0..21)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect()
}
