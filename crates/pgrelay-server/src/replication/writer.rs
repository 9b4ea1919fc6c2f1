//! Commits batches to the change log on its own connection while the
//! replication loop keeps decoding the next batch, so PostgreSQL's
//! decoding and the log's inserts run side by side. Batches are committed,
//! published and reported durable strictly in order.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use pgrelay_protocol::{Lsn, Transaction};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::history::{self, Fence, HistoryError, LoggedTx};
use crate::hub::encoded::EncodedTx;
use crate::hub::{Frame, Hub};
use crate::replication::status::ReplicationStatus;
use crate::replication::ReplicationError;
use crate::stages::{self, Stage};
use crate::ServerError;

/// The change log as the writer sees it: whole transactions appended
/// atomically. PostgreSQL's in production ([`history::append`]); an
/// in-memory one in the replication loop's unit tests.
pub(crate) trait ChangeLog: Send + 'static {
    fn append(
        &mut self,
        txs: &[LoggedTx<'_>],
    ) -> impl Future<Output = Result<(), HistoryError>> + Send;
}

/// The change log in PostgreSQL, appended to under this node's capture
/// term (see [`history::append`]).
pub(crate) struct FencedLog {
    pub(crate) db: tokio_postgres::Client,
    pub(crate) fence: Fence,
    /// Prepared at the first append.
    pub(crate) statements: Option<history::AppendStatements>,
    /// The change log's identity, for the append's notice.
    pub(crate) log_id: String,
    /// The log's head: what the next append follows. Read when this
    /// connection started (under this term, so no one else appends), then
    /// moved by each append.
    pub(crate) head: Lsn,
}

impl ChangeLog for FencedLog {
    async fn append(&mut self, txs: &[LoggedTx<'_>]) -> Result<(), HistoryError> {
        // What followers may count as captured: through the last
        // transaction appended (renewals carry positions past it).
        let end = txs.last().map_or(Lsn::ZERO, |t| t.tx.lsn);
        if self.statements.is_none() {
            self.statements = Some(history::AppendStatements::prepare(&self.db).await?);
        }
        let Some(statements) = &self.statements else {
            return Ok(());
        };
        let notice = history::notice::appended(&self.log_id, self.head, end, txs);
        history::append(&self.db, statements, &self.fence, end, &notice, txs).await?;
        self.head = self.head.max(end);
        Ok(())
    }
}

/// Committed transactions waiting to be written to the change log together.
#[derive(Default)]
pub(super) struct Batch {
    pub(super) txs: Vec<(Transaction, Vec<u32>)>,
    /// Schema announcements, each ordered before the transaction it precedes.
    pub(super) frames: Vec<Frame>,
    pub(super) changes: usize,
    /// Where the stream resumes after the last transaction of the batch.
    pub(super) end_lsn: Lsn,
    /// Only the stream position moved (skipped or empty transactions).
    pub(super) position_only: bool,
}

impl Batch {
    /// Whether nothing waits to be written or confirmed.
    pub(super) fn is_empty(&self) -> bool {
        self.txs.is_empty() && self.frames.is_empty() && !self.position_only
    }

    /// The LSN a schema frame arriving now is ordered by: just after what
    /// is already in the batch.
    pub(super) fn next_lsn(&self) -> Lsn {
        Lsn(self
            .end_lsn
            .0
            .max(self.txs.last().map_or(0, |(t, _)| t.lsn.0)))
    }

    pub(super) fn push(&mut self, tx: Transaction, end_lsn: Lsn, hub: &Hub) {
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

    pub(super) fn advance(&mut self, end_lsn: Lsn) {
        self.end_lsn = self.end_lsn.max(end_lsn);
        self.position_only = true;
    }
}

/// The replication loop's side of the writer.
pub(super) struct Writer {
    batches: mpsc::Sender<Batch>,
    /// Batches handed over and not yet committed.
    in_flight: Arc<AtomicUsize>,
    /// The newest position whose changes are all committed to the log.
    pub(super) durable: watch::Receiver<Lsn>,
    task: JoinHandle<Result<(), ServerError>>,
}

impl Writer {
    pub(super) fn start(
        db: impl ChangeLog,
        hub: Arc<Hub>,
        status: Arc<ReplicationStatus>,
        start: Lsn,
    ) -> Writer {
        // One batch committing and one queued: the loop accumulates the
        // next while both are busy, so memory stays bounded by the batch cap.
        let (batches, rx) = mpsc::channel(1);
        let in_flight = Arc::new(AtomicUsize::new(0));
        let (durable_tx, durable) = watch::channel(start);
        let task = tokio::spawn(commit_loop(
            db,
            rx,
            Arc::clone(&in_flight),
            durable_tx,
            hub,
            status,
        ));
        Writer {
            batches,
            in_flight,
            durable,
            task,
        }
    }

    /// Whether every batch handed over is committed.
    pub(super) fn idle(&self) -> bool {
        self.in_flight.load(Ordering::Acquire) == 0
    }

    /// Hands a batch over, waiting while one is already queued.
    pub(super) async fn send(&mut self, batch: Batch) -> Result<(), ServerError> {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        if self.batches.send(batch).await.is_err() {
            return Err(self.failure().await);
        }
        Ok(())
    }

    /// The error that stopped the writer.
    pub(super) async fn failure(&mut self) -> ServerError {
        match (&mut self.task).await {
            Ok(Err(e)) => e,
            Ok(Ok(())) => ReplicationError::WriterStopped.into(),
            Err(e) => ReplicationError::WriterPanicked(e.to_string()).into(),
        }
    }

    /// Stops after the stream failed: commits what was handed over if that
    /// takes no longer than `wait`, else abandons it (the slot replays what
    /// was not confirmed). Returns once the writer is gone, so nothing of
    /// this stream reaches the log later.
    pub(super) async fn stop(self, wait: std::time::Duration) {
        drop(self.batches);
        let mut task = self.task;
        // Its failure may have been read already; a JoinHandle must not be
        // awaited twice.
        if task.is_finished() {
            return;
        }
        match tokio::time::timeout(wait, &mut task).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => {
                tracing::debug!(error = %e, "the change-log writer stopped with an error")
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "the change-log writer panicked"),
            Err(_) => {
                task.abort();
                let _ = task.await;
            }
        }
    }

    /// Commits what was handed over, then stops.
    pub(super) async fn finish(self) -> Result<(), ServerError> {
        drop(self.batches);
        match self.task.await {
            Ok(result) => result,
            Err(e) => Err(ReplicationError::WriterPanicked(e.to_string()).into()),
        }
    }
}

async fn commit_loop(
    mut db: impl ChangeLog,
    mut batches: mpsc::Receiver<Batch>,
    in_flight: Arc<AtomicUsize>,
    durable: watch::Sender<Lsn>,
    hub: Arc<Hub>,
    status: Arc<ReplicationStatus>,
) -> Result<(), ServerError> {
    while let Some(batch) = batches.recv().await {
        let txs: Vec<(EncodedTx, Vec<u32>, Arc<Transaction>)> = batch
            .txs
            .into_iter()
            .map(|(tx, versions)| (EncodedTx::new(&tx), versions, Arc::new(tx)))
            .collect();
        // Encoded before the append, whose notice may carry them; published
        // only once it committed.
        let tx_frames: Vec<Frame> = txs
            .iter()
            .map(|(encoded, _, tx)| Frame::encoded(encoded, Arc::clone(tx)))
            .collect();
        if !txs.is_empty() {
            let entries: Vec<LoggedTx<'_>> = txs
                .iter()
                .zip(&tx_frames)
                .map(|((tx, versions, _), frame)| LoggedTx {
                    tx,
                    schema_versions: versions,
                    frame: frame.text.as_str(),
                })
                .collect();
            db.append(&entries).await?;
            record_all(&txs, Stage::Logged);
            tracing::debug!(txs = txs.len(), changes = batch.changes, end = %batch.end_lsn, "change log committed");
        }
        let mut frames = batch.frames;
        frames.extend(tx_frames);
        frames.sort_by_key(|f| (f.lsn, f.is_tx));
        if let Some((last, _, _)) = txs.last() {
            tracing::trace!(lsn = %last.lsn, since_commit_us = super::now_us() - last.commit_time_us, "transaction published");
        }
        hub.publish(frames);
        record_all(&txs, Stage::Published);
        // Counted once published, so "captured" implies sessions can see it.
        status.add_captured(batch.changes as u64, txs.len() as u64);
        in_flight.fetch_sub(1, Ordering::AcqRel);
        // Durable now: the loop confirms it to the slot. Always notify, so a
        // loop holding a batch until the writer is idle wakes up.
        durable.send_modify(|lsn| *lsn = (*lsn).max(batch.end_lsn));
    }
    Ok(())
}

/// Records `stage` for every transaction of a batch (when tracing stages).
fn record_all(txs: &[(EncodedTx, Vec<u32>, Arc<Transaction>)], stage: Stage) {
    if stages::on() {
        for (tx, _, _) in txs {
            stages::record(stage, tx.commit_time_us);
        }
    }
}
