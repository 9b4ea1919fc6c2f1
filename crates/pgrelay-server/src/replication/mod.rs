//! Reads PostgreSQL's logical replication stream into the change log and
//! the hub. The slot's confirmed position only moves past what the change
//! log has committed (promise 2); on any connection failure it reconnects
//! with backoff and resumes from the slot.

mod assemble;
mod schema_change;

use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use pgrelay_pg::{ConnInfo, ReplicationEvent, ReplicationStream, StreamOptions};
use pgrelay_protocol::{Lsn, Transaction};
use tokio::sync::watch;

use crate::history::{self, LoggedTx};
use crate::hub::{Frame, Hub};
use crate::status::ReplicationStatus;
use crate::{ServerConfig, ServerError};
use assemble::{Assembled, Assembler};

/// Changes gathered before the change log is written even if more are
/// waiting; bounds memory and keeps latency low under load.
const MAX_BATCH_CHANGES: usize = 20_000;

pub(crate) struct Replication {
    pub(crate) info: ConnInfo,
    pub(crate) config: ServerConfig,
    pub(crate) hub: Arc<Hub>,
    pub(crate) status: Arc<ReplicationStatus>,
}

impl Replication {
    /// Runs until shutdown, reconnecting after failures that a retry can
    /// cure; returns the error that it cannot.
    pub(crate) async fn run(self, mut shutdown: watch::Receiver<bool>) -> Result<(), ServerError> {
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.run_once(&mut shutdown).await {
                Ok(()) => return Ok(()),
                Err(e) if !e.is_retryable() => {
                    tracing::error!(error = %e, "replication stopped");
                    self.status.set_error(e.to_string());
                    return Err(e);
                }
                Err(e) => {
                    self.status.set_disconnected(e.to_string());
                    tracing::warn!(error = %e, retry_in = ?backoff, "replication interrupted; reconnecting");
                }
            }
            tokio::select! {
                biased;
                _ = shutdown.changed() => return Ok(()),
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    async fn run_once(&self, shutdown: &mut watch::Receiver<bool>) -> Result<(), ServerError> {
        let mut db = pgrelay_pg::connect(&self.info).await?;
        let slot = pgrelay_pg::ensure_slot(&db, &self.config.slot).await?;
        let mut logged = history::head(&db).await?;
        self.republish_unannounced(&db, logged).await?;
        let opts = StreamOptions {
            slot: self.config.slot.clone(),
            publication: self.config.publication(),
            durable: slot.confirmed_flush,
            status_interval: self.config.status_interval,
        };
        let mut stream = pgrelay_pg::open_stream(&self.info, &opts).await?;
        tracing::info!(slot = %self.config.slot, confirmed = %slot.confirmed_flush, log_head = %logged, "replication streaming");
        self.status.set_connected(slot.confirmed_flush);

        let mut assembler = Assembler::new();
        let mut batch = Batch::default();
        loop {
            let event = if batch.is_empty() {
                tokio::select! {
                    biased;
                    _ = shutdown.changed() => {
                        stream.close().await;
                        return Ok(());
                    }
                    event = stream.recv() => event?,
                }
            } else {
                // Take what is already waiting; write the batch once the
                // stream has nothing more at hand or the batch is full.
                match stream.recv().now_or_never() {
                    Some(event) if batch.changes < MAX_BATCH_CHANGES => event?,
                    other => {
                        self.flush(&mut db, &stream, &mut batch, &mut logged)
                            .await?;
                        match other {
                            Some(event) => event?,
                            None => continue,
                        }
                    }
                }
            };
            let Some(event) = event else {
                return Err(ServerError::Protocol("replication stream ended".to_owned()));
            };
            self.status.touch();
            self.handle(event, &mut assembler, &mut batch, &db, &stream, logged)
                .await?;
        }
    }

    /// A commit whose acknowledgement was lost (PostgreSQL went away while
    /// answering it) is in the change log but was never published: live
    /// sessions would skip it. Publish from the log what the hub has not.
    async fn republish_unannounced(
        &self,
        db: &tokio_postgres::Client,
        logged: Lsn,
    ) -> Result<(), ServerError> {
        while self.hub.head() < logged {
            let txs = history::read_after(db, self.hub.head(), 10_000).await?;
            if txs.is_empty() {
                break;
            }
            tracing::info!(from = %self.hub.head(), txs = txs.len(), "publishing transactions whose commit acknowledgement was lost");
            self.hub
                .publish(txs.iter().map(Frame::transaction).collect());
        }
        Ok(())
    }

    async fn handle(
        &self,
        event: ReplicationEvent,
        assembler: &mut Assembler,
        batch: &mut Batch,
        db: &tokio_postgres::Client,
        stream: &ReplicationStream,
        logged: Lsn,
    ) -> Result<(), ServerError> {
        let assembled = match event {
            ReplicationEvent::Begin {
                final_lsn,
                xid,
                commit_time_micros,
            } => {
                assembler.begin(Lsn(final_lsn.0), xid, commit_time_micros);
                Assembled::Nothing
            }
            ReplicationEvent::XLogData { data, .. } => assembler.data(&data)?,
            ReplicationEvent::Message {
                prefix, content, ..
            } => {
                assembler.message(&prefix, &content);
                Assembled::Nothing
            }
            ReplicationEvent::Commit {
                lsn,
                end_lsn,
                commit_time_micros,
            } => assembler.commit(Lsn(lsn.0), Lsn(end_lsn.0), commit_time_micros)?,
            ReplicationEvent::KeepAlive { wal_end, .. } => {
                // Nothing of ours is in flight: everything PostgreSQL decoded
                // before this point is in the change log, so the slot may move
                // on even when no published table changes (peer lesson: an
                // idle slot must not hold WAL).
                if batch.is_empty() && !assembler.in_transaction() {
                    stream.confirm(Lsn(wal_end.0));
                    self.status.set_confirmed(Lsn(wal_end.0));
                }
                Assembled::Nothing
            }
            ReplicationEvent::StoppedAt { .. } => Assembled::Nothing,
        };
        match assembled {
            Assembled::Nothing => {}
            Assembled::Relation(oid) => {
                if let Some(relation) = assembler.relation(oid) {
                    if let Some(frame) =
                        schema_change::apply(db, &self.hub, relation, batch.next_lsn()).await?
                    {
                        batch.frames.push(frame);
                    }
                }
            }
            Assembled::Committed { tx, end_lsn } => {
                if tx.lsn <= logged || tx.changes.is_empty() {
                    tracing::trace!(lsn = %tx.lsn, %logged, "transaction already logged or empty");
                    // Already in the log (a replay after a crash) or nothing to
                    // log: only the position moves.
                    if batch.is_empty() {
                        stream.confirm(end_lsn);
                        self.status.set_confirmed(end_lsn);
                    } else {
                        batch.end_lsn = end_lsn;
                    }
                } else {
                    batch.push(tx, end_lsn, &self.hub);
                }
            }
        }
        Ok(())
    }

    async fn flush(
        &self,
        db: &mut tokio_postgres::Client,
        stream: &ReplicationStream,
        batch: &mut Batch,
        logged: &mut Lsn,
    ) -> Result<(), ServerError> {
        let taken = std::mem::take(batch);
        let entries: Vec<LoggedTx<'_>> = taken
            .txs
            .iter()
            .map(|(tx, versions)| LoggedTx {
                tx,
                schema_versions: versions,
            })
            .collect();
        history::append(db, &entries).await?;
        tracing::debug!(txs = taken.txs.len(), changes = taken.changes, end = %taken.end_lsn, "change log committed");
        if let Some((last, _)) = taken.txs.last() {
            *logged = last.lsn;
        }
        // Durable now: the slot may release the WAL, then sessions may see it.
        stream.confirm(taken.end_lsn);
        self.status.set_confirmed(taken.end_lsn);
        self.status
            .add_captured(taken.changes as u64, taken.txs.len() as u64);
        let mut frames = taken.frames;
        frames.extend(taken.txs.iter().map(|(tx, _)| Frame::transaction(tx)));
        frames.sort_by_key(|f| (f.lsn, f.is_tx));
        self.hub.publish(frames);
        Ok(())
    }
}

/// Committed transactions waiting to be written to the change log together.
#[derive(Default)]
struct Batch {
    txs: Vec<(Transaction, Vec<u32>)>,
    /// Schema announcements, each ordered before the transaction it precedes.
    frames: Vec<Frame>,
    changes: usize,
    /// Where the stream resumes after the last transaction of the batch.
    end_lsn: Lsn,
}

impl Batch {
    fn is_empty(&self) -> bool {
        self.txs.is_empty() && self.frames.is_empty()
    }

    /// The LSN a schema frame arriving now is ordered by: just after what
    /// is already in the batch.
    fn next_lsn(&self) -> Lsn {
        Lsn(self
            .end_lsn
            .0
            .max(self.txs.last().map_or(0, |(t, _)| t.lsn.0)))
    }

    fn push(&mut self, tx: Transaction, end_lsn: Lsn, hub: &Hub) {
        let schemas = hub.schemas();
        let versions = tx
            .changes
            .iter()
            .map(|c| schemas.get(&c.table).map_or(1, |s| s.version))
            .collect();
        self.changes += tx.changes.len();
        self.end_lsn = end_lsn;
        self.txs.push((tx, versions));
    }
}
