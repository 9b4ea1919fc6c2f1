//! Event logs in PostgreSQL, schema `pgrelay`, so several pgrelay nodes can
//! serve the same stores: a push is admitted by one conditional statement
//! (the head moves only from the batch's parent), never by a node's memory.

use std::sync::Mutex;

use tokio::sync::{mpsc, watch};
use tokio_postgres::{Client, Config, NoTls};

use super::{new_backend_id, Appended, StoreMeta};
use crate::error::EventLogError;
use crate::event::{Event, StoredEvent};

const SCHEMA: &str = "
CREATE SCHEMA IF NOT EXISTS pgrelay;
CREATE TABLE IF NOT EXISTS pgrelay.eventlog_stores (
    store_id text PRIMARY KEY,
    backend_id text NOT NULL,
    head bigint NOT NULL,
    events bigint NOT NULL
);
CREATE TABLE IF NOT EXISTS pgrelay.eventlog_events (
    store_id text NOT NULL,
    seq_num bigint NOT NULL,
    parent_seq_num bigint NOT NULL,
    event text NOT NULL,
    created_at text NOT NULL,
    PRIMARY KEY (store_id, seq_num)
);
";

/// The head moves and the events are inserted in one statement, only if
/// the head is still the batch's parent: concurrent nodes serialise on the
/// store's row, and the loser inserts nothing.
const APPEND: &str = "
WITH moved AS (
    UPDATE pgrelay.eventlog_stores SET head = $3, events = events + $4
    WHERE store_id = $1 AND head = $2
    RETURNING 1
), notified AS (
    -- Delivered at commit to every node, so their live pulls get the batch.
    SELECT pg_notify('pgrelay_eventlog', $1) FROM moved
)
INSERT INTO pgrelay.eventlog_events (store_id, seq_num, parent_seq_num, event, created_at)
SELECT $1, e.seq, e.parent, e.event, $5
FROM unnest($6::bigint[], $7::bigint[], $8::text[]) AS e(seq, parent, event)
WHERE EXISTS (SELECT 1 FROM moved) AND EXISTS (SELECT 1 FROM notified)
";

pub(crate) struct PostgresStorage {
    /// Parsed once from the URL, which is not kept (it may hold a password).
    config: Config,
    /// Reconnected when PostgreSQL closed it; held only to clone the handle.
    client: Mutex<Option<std::sync::Arc<Client>>>,
}

impl PostgresStorage {
    pub(crate) async fn open(url: &str) -> Result<PostgresStorage, EventLogError> {
        let mut config: Config = url
            .parse()
            .map_err(|e| EventLogError::Storage(format!("invalid database URL: {e}")))?;
        if config.get_application_name().is_none() {
            config.application_name("pgrelay");
        }
        let storage = PostgresStorage {
            config,
            client: Mutex::new(None),
        };
        let client = storage.client().await?;
        client
            .batch_execute(SCHEMA)
            .await
            .map_err(EventLogError::postgres("creating the event-log tables"))?;
        tracing::info!("event logs in PostgreSQL (schema pgrelay)");
        Ok(storage)
    }

    /// Where the logs live, for error messages (no password).
    fn target(&self) -> String {
        let host = match self.config.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
            #[cfg(unix)]
            Some(tokio_postgres::config::Host::Unix(p)) => p.to_string_lossy().into_owned(),
            None => "127.0.0.1".to_owned(),
        };
        let port = self.config.get_ports().first().copied().unwrap_or(5432);
        let user = self.config.get_user().unwrap_or("postgres");
        let database = self.config.get_dbname().unwrap_or(user);
        format!("{host}:{port}/{database}")
    }

    /// The shared connection, opened again when PostgreSQL closed it. The
    /// event logs hold only text and integers, so unlike the row sync's
    /// connections these need no pinned session settings.
    async fn client(&self) -> Result<std::sync::Arc<Client>, EventLogError> {
        let current = self
            .client
            .lock()
            .map_err(|_| EventLogError::Storage("poisoned lock".to_owned()))?
            .clone();
        if let Some(client) = current.filter(|c| !c.is_closed()) {
            return Ok(client);
        }
        let (client, connection) = self.config.connect(NoTls).await.map_err(|e| {
            EventLogError::Storage(format!(
                "PostgreSQL error while connecting to {}: {e}",
                self.target()
            ))
        })?;
        // Drives the connection; ends when the client is dropped.
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "event-log PostgreSQL connection ended");
            }
        });
        let client = std::sync::Arc::new(client);
        if let Ok(mut slot) = self.client.lock() {
            *slot = Some(client.clone());
        }
        Ok(client)
    }

    /// Follows appends made by any node (`LISTEN pgrelay_eventlog`): sends
    /// the store id of each, or `None` after a (re)connect, when
    /// notifications may have been missed and every store should look.
    pub(crate) async fn follow(
        &self,
        stores: mpsc::Sender<Option<String>>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        loop {
            if let Err(e) = self.follow_once(&stores, &mut shutdown).await {
                tracing::warn!(error = %e, "following other nodes' appends failed; retrying");
            }
            tokio::select! {
                biased;
                _ = shutdown.wait_for(|stop| *stop) => return,
                _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
            }
        }
    }

    async fn follow_once(
        &self,
        stores: &mpsc::Sender<Option<String>>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<(), EventLogError> {
        let (client, mut connection) = self
            .config
            .connect(NoTls)
            .await
            .map_err(EventLogError::postgres("connecting to listen"))?;
        let (tx, mut notifications) = mpsc::channel(1024);
        // Drives the connection; ends with it.
        let driver = tokio::spawn(async move {
            let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(Ok(message)) = futures_util::StreamExt::next(&mut messages).await {
                if let tokio_postgres::AsyncMessage::Notification(n) = message {
                    if tx.send(n.payload().to_owned()).await.is_err() {
                        break;
                    }
                }
            }
        });
        let result = async {
            client
                .batch_execute("LISTEN pgrelay_eventlog")
                .await
                .map_err(EventLogError::postgres("LISTEN pgrelay_eventlog"))?;
            let _ = stores.send(None).await;
            loop {
                let store = tokio::select! {
                    biased;
                    _ = shutdown.wait_for(|stop| *stop) => return Ok(()),
                    store = notifications.recv() => store,
                };
                match store {
                    Some(store) => {
                        let _ = stores.send(Some(store)).await;
                    }
                    None => {
                        return Err(EventLogError::Storage(
                            "the LISTEN connection closed".to_owned(),
                        ))
                    }
                }
            }
        }
        .await;
        drop(client);
        driver.abort();
        result
    }

    pub(crate) async fn open_store(&self, store: &str) -> Result<StoreMeta, EventLogError> {
        let client = self.client().await?;
        client
            .execute(
                "INSERT INTO pgrelay.eventlog_stores (store_id, backend_id, head, events) VALUES ($1, $2, 0, 0) ON CONFLICT DO NOTHING",
                &[&store, &new_backend_id()],
            )
            .await
            .map_err(EventLogError::postgres(format!("creating store {store}")))?;
        meta(&client, store).await
    }

    pub(crate) async fn append(
        &self,
        store: &str,
        parent: i64,
        events: &[Event],
        created_at: &str,
    ) -> Result<Appended, EventLogError> {
        let client = self.client().await?;
        let last = events.last().map(|e| e.seq).unwrap_or(parent);
        let seqs: Vec<i64> = events.iter().map(|e| e.seq).collect();
        let parents: Vec<i64> = events.iter().map(|e| e.parent).collect();
        let jsons: Vec<&str> = events.iter().map(|e| e.json.as_str()).collect();
        let inserted = client
            .execute(
                APPEND,
                &[
                    &store,
                    &parent,
                    &last,
                    &i64::try_from(events.len()).unwrap_or(i64::MAX),
                    &created_at,
                    &seqs,
                    &parents,
                    &jsons,
                ],
            )
            .await
            .map_err(EventLogError::postgres(format!(
                "appending {} events to store {store}",
                events.len()
            )))?;
        if usize::try_from(inserted).is_ok_and(|n| n == events.len()) {
            return Ok(Appended::Written);
        }
        Ok(Appended::HeadMoved {
            head: meta(&client, store).await?.head,
        })
    }

    pub(crate) async fn read(
        &self,
        store: &str,
        after: i64,
        upto: i64,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, EventLogError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT seq_num, event, created_at FROM pgrelay.eventlog_events
                 WHERE store_id = $1 AND seq_num > $2 AND seq_num <= $3 ORDER BY seq_num LIMIT $4",
                &[
                    &store,
                    &after,
                    &upto,
                    &i64::try_from(limit).unwrap_or(i64::MAX),
                ],
            )
            .await
            .map_err(EventLogError::postgres(format!(
                "reading store {store} after {after}"
            )))?;
        Ok(rows
            .iter()
            .map(|row| StoredEvent {
                seq: row.get(0),
                json: row.get(1),
                created_at: row.get(2),
            })
            .collect())
    }

    pub(crate) async fn reset(&self, store: &str) -> Result<StoreMeta, EventLogError> {
        let client = self.client().await?;
        let context = || format!("resetting store {store}");
        client
            .execute(
                "WITH gone AS (DELETE FROM pgrelay.eventlog_events WHERE store_id = $1)
                 INSERT INTO pgrelay.eventlog_stores (store_id, backend_id, head, events) VALUES ($1, $2, 0, 0)
                 ON CONFLICT (store_id) DO UPDATE SET backend_id = excluded.backend_id, head = 0, events = 0",
                &[&store, &new_backend_id()],
            )
            .await
            .map_err(EventLogError::postgres(context()))?;
        meta(&client, store).await
    }
}

async fn meta(client: &Client, store: &str) -> Result<StoreMeta, EventLogError> {
    let row = client
        .query_opt(
            "SELECT backend_id, head, events FROM pgrelay.eventlog_stores WHERE store_id = $1",
            &[&store],
        )
        .await
        .map_err(EventLogError::postgres(format!("reading store {store}")))?
        .ok_or_else(|| EventLogError::Storage(format!("store {store} vanished")))?;
    Ok(StoreMeta {
        backend_id: row.get(0),
        head: row.get(1),
        events: row.get(2),
    })
}
