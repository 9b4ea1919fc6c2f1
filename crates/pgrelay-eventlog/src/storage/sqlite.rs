//! Event logs in an embedded SQLite file, driven from one dedicated
//! thread through a bounded command channel (SQLite calls block).

use std::path::PathBuf;
use std::sync::Arc;

use rusqlite::{params, Connection, OptionalExtension};
use tokio::sync::{mpsc, oneshot};

use super::{new_backend_id, Appended, StoreMeta};
use crate::error::EventLogError;
use crate::event::{Event, StoredEvent};

type Job = Box<dyn FnOnce(&mut Connection) + Send>;

/// Commands waiting for the SQLite thread; a full queue makes callers wait.
const QUEUE: usize = 1024;

pub(crate) struct SqliteStorage {
    jobs: mpsc::Sender<Job>,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS eventlog_stores (
    store_id TEXT PRIMARY KEY,
    backend_id TEXT NOT NULL,
    head INTEGER NOT NULL,
    events INTEGER NOT NULL
) STRICT;
CREATE TABLE IF NOT EXISTS eventlog_events (
    store_id TEXT NOT NULL,
    seq_num INTEGER NOT NULL,
    parent_seq_num INTEGER NOT NULL,
    event TEXT NOT NULL,
    created_at TEXT NOT NULL,
    PRIMARY KEY (store_id, seq_num)
) STRICT, WITHOUT ROWID;
";

impl SqliteStorage {
    pub(crate) async fn open(
        path: Option<PathBuf>,
        sync_full: bool,
    ) -> Result<SqliteStorage, EventLogError> {
        let (jobs, mut rx) = mpsc::channel::<Job>(QUEUE);
        let (ready_tx, ready_rx) = oneshot::channel();
        let name = path
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| ":memory:".to_owned());
        std::thread::Builder::new()
            .name("pgrelay-eventlog-sqlite".to_owned())
            .spawn(move || {
                let mut conn = match open_connection(path, sync_full) {
                    Ok(conn) => {
                        let _ = ready_tx.send(Ok(()));
                        conn
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                // Ends when every sender is gone (the storage was dropped).
                while let Some(job) = rx.blocking_recv() {
                    job(&mut conn);
                }
            })
            .map_err(|e| EventLogError::Storage(format!("starting the SQLite thread: {e}")))?;
        ready_rx
            .await
            .map_err(|_| EventLogError::Storage("the SQLite thread died".to_owned()))??;
        tracing::info!(db = %name, synchronous = if sync_full { "full" } else { "normal" }, "event logs in SQLite");
        Ok(SqliteStorage { jobs })
    }

    async fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, EventLogError> + Send + 'static,
    ) -> Result<T, EventLogError> {
        let (tx, rx) = oneshot::channel();
        self.jobs
            .send(Box::new(move |conn| {
                let _ = tx.send(f(conn));
            }))
            .await
            .map_err(|_| EventLogError::ShuttingDown)?;
        rx.await.map_err(|_| EventLogError::ShuttingDown)?
    }

    pub(crate) async fn open_store(&self, store: &str) -> Result<StoreMeta, EventLogError> {
        let store = store.to_owned();
        self.call(move |conn| {
            conn.execute(
                "INSERT OR IGNORE INTO eventlog_stores (store_id, backend_id, head, events) VALUES (?1, ?2, 0, 0)",
                params![store, new_backend_id()],
            )
            .map_err(EventLogError::sqlite(format!("creating store {store}")))?;
            meta(conn, &store)
        })
        .await
    }

    pub(crate) async fn append(
        &self,
        store: &str,
        parent: i64,
        events: Arc<Vec<Event>>,
        created_at: &str,
    ) -> Result<Appended, EventLogError> {
        let store = store.to_owned();
        let created_at = created_at.to_owned();
        self.call(move |conn| {
            let context = || format!("appending {} events to store {store}", events.len());
            let tx = conn.transaction().map_err(EventLogError::sqlite(context()))?;
            let head: i64 = tx
                .query_row(
                    "SELECT head FROM eventlog_stores WHERE store_id = ?1",
                    [&store],
                    |row| row.get(0),
                )
                .map_err(EventLogError::sqlite(context()))?;
            if head != parent {
                return Ok(Appended::HeadMoved { head });
            }
            {
                let mut insert = tx
                    .prepare_cached(
                        "INSERT INTO eventlog_events (store_id, seq_num, parent_seq_num, event, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
                    )
                    .map_err(EventLogError::sqlite(context()))?;
                for event in events.iter() {
                    insert
                        .execute(params![store, event.seq, event.parent, event.json, created_at])
                        .map_err(EventLogError::sqlite(context()))?;
                }
            }
            let last = events.last().map(|e| e.seq).unwrap_or(head);
            tx.execute(
                "UPDATE eventlog_stores SET head = ?2, events = events + ?3 WHERE store_id = ?1",
                params![store, last, i64::try_from(events.len()).unwrap_or(i64::MAX)],
            )
            .map_err(EventLogError::sqlite(context()))?;
            tx.commit().map_err(EventLogError::sqlite(context()))?;
            Ok(Appended::Written)
        })
        .await
    }

    pub(crate) async fn read(
        &self,
        store: &str,
        after: i64,
        upto: i64,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, EventLogError> {
        let store = store.to_owned();
        self.call(move |conn| {
            let context = || format!("reading store {store} after {after}");
            let mut select = conn
                .prepare_cached(
                    "SELECT seq_num, event, created_at FROM eventlog_events
                     WHERE store_id = ?1 AND seq_num > ?2 AND seq_num <= ?3 ORDER BY seq_num LIMIT ?4",
                )
                .map_err(EventLogError::sqlite(context()))?;
            let rows = select
                .query_map(params![store, after, upto, i64::try_from(limit).unwrap_or(i64::MAX)], |row| {
                    Ok(StoredEvent {
                        seq: row.get(0)?,
                        json: row.get(1)?,
                        created_at: row.get(2)?,
                    })
                })
                .map_err(EventLogError::sqlite(context()))?;
            rows.collect::<Result<Vec<_>, _>>()
                .map_err(EventLogError::sqlite(context()))
        })
        .await
    }

    pub(crate) async fn reset(&self, store: &str) -> Result<StoreMeta, EventLogError> {
        let store = store.to_owned();
        self.call(move |conn| {
            let context = || format!("resetting store {store}");
            let tx = conn.transaction().map_err(EventLogError::sqlite(context()))?;
            tx.execute("DELETE FROM eventlog_events WHERE store_id = ?1", [&store])
                .map_err(EventLogError::sqlite(context()))?;
            tx.execute(
                "INSERT INTO eventlog_stores (store_id, backend_id, head, events) VALUES (?1, ?2, 0, 0)
                 ON CONFLICT (store_id) DO UPDATE SET backend_id = excluded.backend_id, head = 0, events = 0",
                params![store, new_backend_id()],
            )
            .map_err(EventLogError::sqlite(context()))?;
            tx.commit().map_err(EventLogError::sqlite(context()))?;
            meta(conn, &store)
        })
        .await
    }
}

fn open_connection(path: Option<PathBuf>, sync_full: bool) -> Result<Connection, EventLogError> {
    let conn = match &path {
        Some(path) => Connection::open(path),
        None => Connection::open_in_memory(),
    }
    .map_err(EventLogError::sqlite(format!(
        "opening {}",
        path.as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| ":memory:".to_owned())
    )))?;
    // WAL with synchronous=FULL: a commit is on disk before it returns, so
    // an acknowledged push survives a power cut, not only a crash. NORMAL
    // (chosen by the operator) survives a crash of pgrelay only.
    let synchronous = if sync_full { "FULL" } else { "NORMAL" };
    conn.execute_batch(&format!(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = {synchronous};"
    ))
    .map_err(EventLogError::sqlite("setting WAL mode"))?;
    conn.execute_batch(SCHEMA)
        .map_err(EventLogError::sqlite("creating the event-log tables"))?;
    Ok(conn)
}

fn meta(conn: &Connection, store: &str) -> Result<StoreMeta, EventLogError> {
    conn.query_row(
        "SELECT backend_id, head, events FROM eventlog_stores WHERE store_id = ?1",
        [store],
        |row| {
            Ok(StoreMeta {
                backend_id: row.get(0)?,
                head: row.get(1)?,
                events: row.get(2)?,
            })
        },
    )
    .optional()
    .map_err(EventLogError::sqlite(format!("reading store {store}")))?
    .ok_or_else(|| EventLogError::Storage(format!("store {store} vanished")))
}
