//! A node that does not capture follows the change log another node
//! writes: woken by the `NOTIFY` each append sends in its own commit, it
//! publishes the new transactions into its own hub, so its sessions work
//! as on the capturing node. A small append's notice carries its
//! transactions: when it follows this hub's head exactly, they are
//! published as they are, with no round trip to PostgreSQL; anything else
//! (a big append, a notice that does not follow the head, a new schema, a
//! notice dropped) makes the follower read the log after its head, so
//! positions stay strictly ordered with no gap and no duplicate. A slow
//! poll is the safety net for a notification lost with a connection.
//! Between reads it tries for the capture lock, and returns the term when
//! it wins. Every round trip to PostgreSQL has a deadline: a cut that
//! closes nothing (a frozen network) shows as "not ready" within seconds,
//! not when TCP gives up.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use pgrelay_pg::ConnInfo;
use pgrelay_protocol::{Lsn, TableSchema};
use tokio::sync::{mpsc, watch};
use tokio_postgres::types::{Json, PgLsn};
use tokio_postgres::{AsyncMessage, Client, NoTls};

use crate::history::notice::{self, Appended, Notice};
use crate::history::{self, HistoryError, NOTIFY_CHANNEL};
use crate::hub::{Frame, Hub};
use crate::replication::election::{Election, Term};
use crate::replication::status::{ReplicationStatus, Role};
use crate::{ReplicationError, ServerError};

/// Changes read from the log at a time.
const PAGE: i64 = 10_000;

/// Waits for `step` at most `deadline`; past it, PostgreSQL counts as
/// unreachable (a retryable error: the follower connects again).
pub(crate) async fn within<T>(
    deadline: Duration,
    what: &'static str,
    step: impl std::future::Future<Output = Result<T, ServerError>>,
) -> Result<T, ServerError> {
    tokio::time::timeout(deadline, step)
        .await
        .map_err(|_| ReplicationError::NoAnswer(what, deadline))?
}

/// How long a follower waits for any one answer from PostgreSQL: twice
/// the capture lease, and at least 5 s (a page of the log on a busy
/// server takes a while).
pub(crate) fn answer_deadline(lease: Duration) -> Duration {
    (lease * 2).max(Duration::from_secs(5))
}

pub(crate) struct Follower<'a> {
    pub(crate) info: &'a ConnInfo,
    pub(crate) slot: &'a str,
    pub(crate) hub: &'a Hub,
    pub(crate) status: &'a ReplicationStatus,
    pub(crate) poll: Duration,
}

impl Follower<'_> {
    /// Follows until this node wins the capture lock (`Some`) or shutdown
    /// (`None`). Connection failures are retried; they leave the node not
    /// ready meanwhile.
    pub(crate) async fn run(
        &self,
        election: &mut Election,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<Option<Term>, ServerError> {
        loop {
            match self.listen_and_read(election, shutdown).await {
                Ok(outcome) => return Ok(outcome),
                Err(e) if !e.is_retryable() => return Err(e),
                Err(e) => {
                    tracing::warn!(error = %e, "following the change log failed; retrying");
                    self.status.set_disconnected(e.to_string());
                }
            }
            tokio::select! {
                biased;
                _ = shutdown.changed() => return Ok(None),
                _ = tokio::time::sleep(election.retry) => {}
            }
        }
    }

    async fn listen_and_read(
        &self,
        election: &mut Election,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<Option<Term>, ServerError> {
        let deadline = answer_deadline(election.lease);
        let (db, mut wakes, missed) =
            within(deadline, "to a new connection", listen(self.info)).await?;
        within(deadline, "to LISTEN", async {
            db.batch_execute(&format!("LISTEN {NOTIFY_CHANNEL}"))
                .await
                .map_err(ServerError::sql("listening for change-log appends"))
        })
        .await?;
        within(deadline, "to a read of the change log", self.read(&db)).await?;
        self.status.set_connected(self.status.counters().2);
        self.status
            .set_holder(self.status.role().1, Role::Following);
        let mut attempt = tokio::time::interval(election.retry);
        attempt.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut poll = tokio::time::interval(self.poll);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = shutdown.changed() => return Ok(None),
                wake = wakes.recv() => {
                    let Some(first) = wake else {
                        return Err(crate::ReplicationError::FollowEnded.into());
                    };
                    // Several notifications may be waiting: taken in order,
                    // and one read serves all that need one.
                    let mut must_read = self.take(first);
                    while let Ok(next) = wakes.try_recv() {
                        must_read |= self.take(next);
                    }
                    // A notice dropped while the channel was full: its
                    // transactions are in the log.
                    must_read |= missed.swap(false, Ordering::AcqRel);
                    if must_read {
                        within(deadline, "to a read of the change log", self.read(&db)).await?;
                    }
                }
                _ = poll.tick() => {
                    within(deadline, "to a read of the change log", self.read(&db)).await?;
                }
                _ = attempt.tick() => {
                    match within(deadline, "to the capture lock", election.attempt()).await {
                        Ok(Some(term)) => return Ok(Some(term)),
                        Ok(None) => {}
                        // Not answering: unreachable from here, so not ready.
                        Err(e @ ServerError::Replication(ReplicationError::NoAnswer(..))) => {
                            return Err(e)
                        }
                        // PostgreSQL may be restarting: the next tick tries again.
                        Err(e) => tracing::warn!(error = %e, "trying for the capture lock failed"),
                    }
                }
            }
        }
    }

    /// Publishes the transactions a notice carries when they follow the
    /// hub's head directly; `true` when the log must be read instead (a
    /// read after a notice covers it: the notice came after its commit).
    fn take(&self, notice: Notice) -> bool {
        let appended = match notice {
            Notice::Position(head) => {
                if let Some(head) = head {
                    self.status.set_log_head(head);
                }
                return true;
            }
            Notice::Appended(appended) => appended,
        };
        self.status.set_log_head(appended.head());
        if *self.hub.log_id() != *appended.log {
            return true;
        }
        let head = self.hub.head();
        if appended.head() <= head {
            // Already published (read with an earlier notice's read).
            return false;
        }
        if appended.after != head || self.new_schema(&appended) {
            return true;
        }
        let (changes, count) = (
            appended
                .txs
                .iter()
                .map(|(_, t)| t.changes.len() as u64)
                .sum::<u64>(),
            appended.txs.len() as u64,
        );
        let frames = appended
            .txs
            .into_iter()
            .map(|(text, tx)| Frame::received(text, tx))
            .collect();
        self.hub.publish(frames);
        self.status.add_captured(changes, count);
        self.status.add_followed(true, count);
        // The append recorded at least its last transaction as captured.
        self.status.set_confirmed(appended.end);
        self.hub.set_captured(appended.end);
        self.status.touch();
        false
    }

    /// Whether the append uses a schema newer than this hub's for a table
    /// it syncs: the log read announces it before the transaction.
    fn new_schema(&self, appended: &Appended) -> bool {
        let known = self.hub.schemas();
        appended.versions.iter().any(|(table, version)| {
            known
                .get(table)
                .is_some_and(|schema| schema.version < *version)
        })
    }

    /// Publishes what the log holds beyond the hub's head, then tells
    /// sessions how far the capture has got. The captured position is read
    /// first: the appends it covers committed before, so the rows read
    /// after it hold them.
    pub(crate) async fn read(&self, db: &Client) -> Result<(), ServerError> {
        let row = db
            .query_one(
                "SELECT s.log_id, s.pruned_through, c.captured
                   FROM pgrelay.log_state s LEFT JOIN pgrelay.capture c ON c.slot = $1
                  WHERE s.id = 1",
                &[&self.slot],
            )
            .await
            .map_err(ServerError::sql("reading the change log's state"))?;
        let log_id: String = row.get(0);
        let pruned = Lsn(u64::from(row.get::<_, PgLsn>(1)));
        let captured = row.get::<_, Option<PgLsn>>(2).map(|l| Lsn(u64::from(l)));
        if *self.hub.log_id() != *log_id {
            tracing::warn!(%log_id, from = %pruned, "the capturing node started a new change log; sessions hydrate again");
            self.hub.new_epoch(&log_id, pruned);
        }
        let mut schemas_checked = false;
        loop {
            let txs = match history::read_after(db, self.hub.head(), PAGE).await {
                Ok(txs) => txs,
                Err(HistoryError::Pruned { pruned_through, .. }) => {
                    tracing::error!(head = %self.hub.head(), %pruned_through, "this node fell behind the change log's retention; sessions hydrate again");
                    self.hub.new_epoch(&log_id, pruned_through);
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            let Some(last) = txs.last() else { break };
            self.status.set_log_head(last.lsn);
            let mut frames = Vec::with_capacity(txs.len() + 1);
            if !schemas_checked {
                schemas_checked = true;
                frames.extend(self.schema_changes(db, &txs).await?);
            }
            let (changes, count) = (
                txs.iter().map(|t| t.changes.len() as u64).sum::<u64>(),
                txs.len() as u64,
            );
            frames.extend(txs.into_iter().map(Frame::transaction));
            frames.sort_by_key(|f| (f.lsn, f.is_tx));
            self.hub.publish(frames);
            self.status.add_captured(changes, count);
            self.status.add_followed(false, count);
            // A page short of the limit was the end of the log: no round
            // trip to learn that again (a wake-up costs two reads, not three).
            if i64::try_from(changes).is_ok_and(|n| n < PAGE) {
                break;
            }
        }
        if let Some(captured) = captured {
            self.status.set_confirmed(captured);
            self.hub.set_captured(captured);
        }
        self.status.touch();
        Ok(())
    }

    /// Schemas the capturing node recorded that this hub does not have yet,
    /// announced before the first transaction read that touches them.
    async fn schema_changes(
        &self,
        db: &Client,
        txs: &[pgrelay_protocol::Transaction],
    ) -> Result<Vec<Frame>, ServerError> {
        let rows = db
            .query("SELECT schema FROM pgrelay.table_schemas", &[])
            .await
            .map_err(ServerError::sql("reading stored table schemas"))?;
        let known = self.hub.schemas();
        let mut frames = Vec::new();
        for row in rows {
            let Json(table): Json<TableSchema> = row.get(0);
            let Some(current) = known.get(&table.name) else {
                // Not a table this node syncs (yet): the table watch adds it.
                continue;
            };
            if current.version >= table.version {
                continue;
            }
            let before = txs
                .iter()
                .find(|t| t.changes.iter().any(|c| c.table == table.name))
                .or(txs.first())
                .map_or(self.hub.head(), |t| t.lsn);
            tracing::info!(table = %table.name, version = table.version, "table schema changed (read from the change log's schemas)");
            frames.push(self.hub.set_schema(table, before));
        }
        Ok(frames)
    }
}

/// A connection whose notifications on [`NOTIFY_CHANNEL`] arrive on the
/// returned channel, read ([`notice::parse`]) and in order; the channel
/// closes when the connection does. The flag is raised when a notice was
/// dropped because the channel was full.
async fn listen(
    info: &ConnInfo,
) -> Result<(Client, mpsc::Receiver<Notice>, Arc<AtomicBool>), ServerError> {
    let config = info.with_application_name("pgrelay-follower");
    let (client, mut connection) = config
        .config()
        .connect(NoTls)
        .await
        .map_err(ServerError::sql("connecting to follow the change log"))?;
    // Bounded: a follower busy reading falls back to one read for what it
    // dropped.
    let (tx, rx) = mpsc::channel(256);
    let missed = Arc::new(AtomicBool::new(false));
    let dropped = Arc::clone(&missed);
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = messages.next().await {
            match message {
                Ok(AsyncMessage::Notification(n)) => {
                    if tx.try_send(notice::parse(n.payload())).is_err() {
                        dropped.store(true, Ordering::Release);
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(error = %e, "the follower's connection ended");
                    break;
                }
            }
        }
    });
    Ok((client, rx, missed))
}
