//! Catching up: every logged transaction after the client's position, read
//! from the change log page by page and filtered like live ones, with the
//! schema changes the client missed announced first, then `caught_up`.

use std::collections::BTreeMap;
use std::sync::Arc;

use pgrelay_protocol::{ErrorCode, Lsn, ServerMessage, TableSchema};
use tokio::sync::broadcast;
use tokio::sync::broadcast::error::TryRecvError;
use tokio::time::Instant;

use super::{internal, Refusal, Session};
use crate::history;
use crate::hub::Frame;
use crate::ops::metrics::add;

/// Changes read from the change log per query while catching up.
const CATCH_UP_PAGE: i64 = 5_000;

impl Session<'_> {
    /// Tells the client the schema of every table that changed since it was
    /// last told, whether or not this session was listening when the change
    /// was published (it may have been hydrating, or reading the change
    /// log), so nothing reaches the client for a table or column it does
    /// not know. Returns the schemas it is now in step with.
    pub(super) async fn announce_schemas(
        &mut self,
    ) -> Result<Arc<BTreeMap<String, TableSchema>>, Refusal> {
        let changes = self.state.hub.changed_since(self.told);
        self.told = changes.generation;
        let tables = self.visible(changes.changed.iter().filter_map(|n| changes.tables.get(n)));
        if !tables.is_empty() {
            tracing::debug!(
                tables = tables.len(),
                "announcing schema changes the client missed"
            );
            self.send(Frame::encode(&ServerMessage::Schema { tables }, Lsn::ZERO))
                .await?;
        }
        Ok(changes.tables)
    }

    /// Says the client has everything up to the change log's `head` at its
    /// handshake (and whatever came since), and everything PostgreSQL
    /// committed before `captured`.
    pub(super) async fn caught_up(&mut self, head: Lsn, captured: Lsn) -> Result<(), Refusal> {
        let lsn = self.position().max(head);
        // The client stores `lsn` as its position; so does the session.
        self.live.advance(lsn);
        self.send(Frame::encode(
            &ServerMessage::CaughtUp {
                lsn,
                wal_lsn: Some(captured),
            },
            Lsn::ZERO,
        ))
        .await
    }

    /// The capture passed the WAL position of the welcome: every frame
    /// published before it is in `frames`; once those are sent, the client
    /// has everything PostgreSQL had committed when it connected.
    pub(super) async fn caught_up_with_wal(
        &mut self,
        frames: &mut broadcast::Receiver<Frame>,
    ) -> Result<(), Refusal> {
        let captured = self.state.hub.captured();
        let head = self.state.hub.head();
        loop {
            match frames.try_recv() {
                Ok(frame) => self.forward(frame).await?,
                Err(TryRecvError::Lagged(_)) => {
                    add(&self.state.metrics.catch_ups, 1);
                    *frames = frames.resubscribe();
                    Box::pin(self.catch_up()).await?;
                }
                Err(TryRecvError::Empty | TryRecvError::Closed) => break,
            }
        }
        self.caught_up(head, captured).await
    }

    /// Sends every logged transaction after the client's position.
    pub(super) async fn catch_up(&mut self) -> Result<(), Refusal> {
        loop {
            if self.expiry() <= Instant::now() {
                return Err(self.expired());
            }
            let client = self.state.log_reader.client().await.map_err(internal)?;
            let txs = match history::read_after(&client, self.position(), CATCH_UP_PAGE).await {
                Ok(txs) => txs,
                Err(e @ history::HistoryError::Pruned { .. }) => {
                    return Err(Refusal::new(ErrorCode::Gone, format!("{e}; re-hydrate")))
                }
                Err(e) => return Err(internal(e)),
            };
            // Read after the page: a schema a transaction of it needs was
            // set before the transaction reached the log.
            self.announce_schemas().await?;
            if txs.is_empty() {
                return Ok(());
            }
            let short = txs
                .iter()
                .map(|t| i64::try_from(t.changes.len()).unwrap_or(i64::MAX))
                .sum::<i64>()
                < CATCH_UP_PAGE;
            for tx in txs {
                let lsn = tx.lsn;
                // What the client's token may see, then what it subscribes to.
                let tx = match &self.scope {
                    Some(scope) => scope.filter_tx(&tx),
                    None => Some(tx),
                };
                let tx = tx.and_then(|tx| match &self.subscription {
                    Some(subscription) => subscription.trim(tx),
                    None => Some(tx),
                });
                match tx {
                    Some(tx) => self.send(Frame::transaction(tx)).await?,
                    None => self.skipped(lsn),
                }
            }
            if short {
                return Ok(());
            }
        }
    }
}
