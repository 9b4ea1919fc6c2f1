//! Reads PostgreSQL's logical replication stream into the change log and
//! the hub. The slot's confirmed position only moves past what the change
//! log has committed (promise 2); on any connection failure it reconnects
//! with backoff and resumes from the slot; a slot lost meanwhile starts a
//! new change-log epoch (see [`slot`]). With several nodes on one slot,
//! only the node that wins the [`election`] captures; the others follow
//! the change log ([`follower`]) until they win it.

pub(crate) mod election;
mod error;
mod follower;
pub(crate) mod lag;
mod schema_change;
mod slot;
mod source;
pub(crate) mod status;
pub(crate) mod table_watch;
#[cfg(test)]
mod tests;
pub(crate) mod unpublished;
mod writer;

pub use error::ReplicationError;
pub(crate) use schema_change::backfilled_columns;
pub(crate) use slot::{prepare as prepare_slot, SlotLoss};

use std::sync::Arc;
use std::time::Duration;

use pgrelay_pg::{ConnInfo, StreamEvent, StreamOptions};
use pgrelay_protocol::Lsn;
use tokio::sync::watch;

use crate::history::{self, Fence, HistoryError};
use crate::hub::{Frame, Hub};
use crate::replication::status::ReplicationStatus;
use crate::{ServerConfig, ServerError};
use election::{Election, Term};
use follower::Follower;
use source::{Catalog, EventSource};
use writer::{Batch, FencedLog, Writer};

/// Changes gathered before the change log is written even if more are
/// waiting; bounds memory and keeps latency low under load.
const MAX_BATCH_CHANGES: usize = 20_000;

pub(crate) struct Replication {
    pub(crate) info: ConnInfo,
    pub(crate) config: ServerConfig,
    pub(crate) hub: Arc<Hub>,
    pub(crate) status: Arc<ReplicationStatus>,
    pub(crate) election: Election,
    /// The term this node won at start, if it did.
    pub(crate) term: Option<Term>,
}

/// Whether `e` means this node no longer captures (rather than a failure
/// a reconnect cures).
fn stands_down(e: &ServerError) -> bool {
    match e {
        ServerError::Replication(r) => r.stands_down(),
        ServerError::History(HistoryError::Fenced { .. }) => true,
        _ => false,
    }
}

/// Why the renewal of a term stopped: the term is over, or the lease
/// could not be renewed in time.
type Lost = watch::Receiver<Option<ReplicationError>>;

impl Replication {
    /// Runs until shutdown: follows the change log while another node
    /// captures, captures while this node holds the slot; returns the error
    /// that no retry can cure.
    pub(crate) async fn run(
        mut self,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<(), ServerError> {
        let mut won = self.term.take();
        loop {
            let term = match won.take() {
                Some(term) => term,
                None => {
                    let follower = Follower {
                        info: &self.info,
                        slot: &self.config.slot,
                        hub: &self.hub,
                        status: &self.status,
                        poll: self.config.follow_poll,
                    };
                    match follower.run(&mut self.election, &mut shutdown).await? {
                        Some(term) => term,
                        None => return Ok(()),
                    }
                }
            };
            match self.capture(term, &mut shutdown).await {
                Ok(()) => return Ok(()),
                Err(e) if stands_down(&e) => {
                    tracing::warn!(error = %e, slot = %self.config.slot, "this node no longer captures; following the change log");
                    self.status.stood_down();
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Captures for as long as `term` lasts, renewing it meanwhile.
    async fn capture(
        &self,
        term: Term,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<(), ServerError> {
        let term = Arc::new(term);
        let (lost_tx, lost) = watch::channel(None);
        let renewal = tokio::spawn(renew(
            Arc::clone(&term),
            Arc::clone(&self.status),
            self.config.capture_retry,
            self.config.capture_lease,
            lost_tx,
        ));
        let result = self.capture_until_lost(&term.fence, lost, shutdown).await;
        renewal.abort();
        let _ = renewal.await;
        if result.is_ok() {
            // Followers learn the final position before the lock goes.
            let (_, _, confirmed) = self.status.counters();
            if let Err(e) = term.renew(confirmed, true).await {
                tracing::debug!(error = %e, "recording the final captured position failed");
            }
        }
        // Dropping the lock's connection releases the lock.
        drop(term);
        result
    }

    /// Streams from the slot, reconnecting after failures a retry can cure.
    async fn capture_until_lost(
        &self,
        fence: &Fence,
        mut lost: Lost,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<(), ServerError> {
        let mut backoff = Duration::from_millis(100);
        loop {
            let why = lost.borrow_and_update().clone();
            if let Some(e) = why {
                return Err(e.into());
            }
            match self.run_once(fence, &mut lost, shutdown).await {
                Ok(()) => return Ok(()),
                Err(e) if stands_down(&e) => return Err(e),
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
                _ = lost.changed() => {}
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    async fn run_once(
        &self,
        fence: &Fence,
        lost: &mut Lost,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<(), ServerError> {
        // Named, so that the next capturer can end what is left of them.
        let info = self
            .info
            .with_application_name(&election::capture_application(&self.config.slot));
        let mut db = pgrelay_pg::connect(&info).await?;
        let slot = slot::prepare(&mut db, &self.config.slot, &self.status).await?;
        if let Some(epoch) = &slot.epoch {
            // Live sessions are told `gone`; new ones get the new log.
            self.hub.new_epoch(&epoch.log_id, epoch.floor);
        }
        let logged = history::head(&db).await?;
        self.republish_unannounced(&db, logged).await?;
        let opts = StreamOptions {
            slot: self.config.slot.clone(),
            publication: self.config.publication(),
            durable: slot.confirmed,
            status_interval: self.config.status_interval,
        };
        let mut stream = pgrelay_pg::open_stream(&self.info, &opts).await?;
        tracing::info!(slot = %self.config.slot, confirmed = %slot.confirmed, log_head = %logged, "replication streaming");
        self.status.set_connected(slot.confirmed);
        // The slot never passes the change log, and what the log holds the
        // hub has published (above).
        self.hub.set_captured(slot.confirmed);
        let log_db = pgrelay_pg::connect(&info).await?;
        let (log_id, _) = history::log_state(&db).await?;
        let log = FencedLog {
            db: log_db,
            fence: fence.clone(),
            statements: None,
            log_id,
            head: logged,
        };
        let mut writer = Writer::start(
            log,
            Arc::clone(&self.hub),
            Arc::clone(&self.status),
            slot.confirmed,
        );
        let result = self
            .stream(&db, &mut stream, &mut writer, logged, lost, shutdown)
            .await;
        match result {
            Ok(()) => {
                // Shutting down: let what was handed over commit first.
                let durable = writer.durable.clone();
                let finished = writer.finish().await;
                let confirmed = *durable.borrow();
                let wait = self.config.status_interval * 2 + Duration::from_secs(1);
                stream.close_confirmed(confirmed, wait).await;
                self.captured(confirmed);
                tracing::info!(lsn = %confirmed, "replication stopped; slot confirmed");
                finished
            }
            Err(e) => {
                // Nothing of this stream may reach the log once the next
                // connection has read its head (or started a new epoch).
                writer
                    .stop(self.config.status_interval * 2 + Duration::from_secs(5))
                    .await;
                Err(e)
            }
        }
    }

    /// Decodes the stream into batches for the writer and confirms to the
    /// slot what the writer reports durable. Returns on shutdown.
    async fn stream(
        &self,
        db: &impl Catalog,
        stream: &mut impl EventSource,
        writer: &mut Writer,
        logged: Lsn,
        lost: &mut Lost,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<(), ServerError> {
        let mut batch = Batch::default();
        loop {
            tokio::select! {
                biased;
                _ = shutdown.changed() => return Ok(()),
                _ = lost.changed() => {
                    // Stands down without confirming anything more.
                    let why = lost.borrow_and_update().clone();
                    return Err(why.unwrap_or(ReplicationError::TermOver).into());
                }
                changed = writer.durable.changed() => {
                    if changed.is_err() {
                        return Err(writer.failure().await);
                    }
                    let durable = *writer.durable.borrow_and_update();
                    stream.confirm(durable);
                    self.captured(durable);
                }
                event = stream.recv() => {
                    let Some(event) = event? else {
                        return Err(ReplicationError::StreamEnded.into());
                    };
                    self.status.touch();
                    self.handle(event, &mut batch, db, stream, writer, logged)
                        .await?;
                }
            }
            // Hand the batch over as soon as the writer is free; while it is
            // busy, keep gathering up to the cap (adaptive batching).
            if !batch.is_empty() && (writer.idle() || batch.changes >= MAX_BATCH_CHANGES) {
                writer.send(std::mem::take(&mut batch)).await?;
            }
        }
    }

    /// Everything PostgreSQL decoded before `lsn` is in the change log and
    /// published: the slot may be told, and sessions waiting for the
    /// capture to reach a position (a client's "caught up") may go on.
    fn captured(&self, lsn: Lsn) {
        self.status.set_confirmed(lsn);
        self.hub.set_captured(lsn);
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
                .publish(txs.into_iter().map(Frame::transaction).collect());
        }
        Ok(())
    }

    async fn handle(
        &self,
        event: StreamEvent,
        batch: &mut Batch,
        db: &impl Catalog,
        stream: &impl EventSource,
        writer: &Writer,
        logged: Lsn,
    ) -> Result<(), ServerError> {
        match event {
            StreamEvent::Progress => {}
            StreamEvent::Idle { wal_end } => {
                // Nothing of ours is in flight: everything PostgreSQL decoded
                // before this point is in the change log, so the slot may move
                // on even when no published table changes (peer lesson: an
                // idle slot must not hold WAL).
                if batch.is_empty() && writer.idle() {
                    stream.confirm(wal_end);
                    self.captured(wal_end);
                }
            }
            StreamEvent::Relation(relation) => {
                if let Some(frame) = db.relation(&self.hub, &relation, batch.next_lsn()).await? {
                    batch.frames.push(frame);
                }
            }
            StreamEvent::Committed { tx, end_lsn } => {
                tracing::trace!(lsn = %tx.lsn, since_commit_us = now_us() - tx.commit_time_us, "transaction received");
                crate::stages::record(crate::stages::Stage::Decoded, tx.commit_time_us);
                if tx.lsn <= logged || tx.changes.is_empty() {
                    tracing::trace!(lsn = %tx.lsn, %logged, "transaction already logged or empty");
                    // Already in the log (a replay after a crash) or nothing to
                    // log: only the position moves.
                    if batch.is_empty() && writer.idle() {
                        stream.confirm(end_lsn);
                        self.captured(end_lsn);
                    } else {
                        batch.advance(end_lsn);
                    }
                } else {
                    batch.push(tx, end_lsn, &self.hub);
                }
            }
        }
        Ok(())
    }
}

/// Renews `term` every `every`; reports on `lost` when the term is over or
/// a renewal did not succeed within the lease (less one period, so this
/// node stops before another may take over).
async fn renew(
    term: Arc<Term>,
    status: Arc<ReplicationStatus>,
    every: Duration,
    lease: Duration,
    lost: watch::Sender<Option<ReplicationError>>,
) {
    let deadline = lease.saturating_sub(every).max(every);
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut told = Lsn::ZERO;
    loop {
        tick.tick().await;
        let (_, _, confirmed) = status.counters();
        let outcome = tokio::time::timeout(deadline, term.renew(confirmed, confirmed > told)).await;
        let why = match outcome {
            Ok(Ok(true)) => {
                told = told.max(confirmed);
                continue;
            }
            Ok(Ok(false)) => ReplicationError::TermOver,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "renewing the capture term failed");
                ReplicationError::LeaseLost(lease)
            }
            Err(_) => ReplicationError::LeaseLost(lease),
        };
        let _ = lost.send(Some(why));
        return;
    }
}

/// Microseconds since the Unix epoch, for lag in trace logs.
pub(crate) fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}
