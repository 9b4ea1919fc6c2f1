//! Received transactions applied to the replica in batches, and the
//! replica's position moved by transactions that carry no rows.

use std::time::{SystemTime, UNIX_EPOCH};

use pgrelay_protocol::{Lsn, Transaction};
use tokio::sync::broadcast;

use crate::{ClientError, Event, Replica};

/// Transactions received and not yet applied, with when each frame was read.
#[derive(Default)]
pub(super) struct Batch {
    txs: Vec<Transaction>,
    received_us: Vec<i64>,
    changes: usize,
}

impl Batch {
    pub(super) fn push(&mut self, tx: Transaction, received_us: i64) {
        self.changes += tx.changes.len();
        self.txs.push(tx);
        self.received_us.push(received_us);
    }

    /// Changes waiting, summed over the transactions.
    pub(super) fn changes(&self) -> usize {
        self.changes
    }
}

/// Microseconds since the Unix epoch.
pub(super) fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

pub(super) async fn flush(
    replica: &Replica,
    events: &broadcast::Sender<Event>,
    batch: &mut Batch,
    applied: Lsn,
) -> Result<Lsn, ClientError> {
    if batch.txs.is_empty() {
        return Ok(applied);
    }
    let Batch {
        txs,
        received_us,
        changes,
    } = std::mem::take(batch);
    let count = txs.len();
    let commit_times_us: Vec<i64> = txs.iter().map(|t| t.commit_time_us).collect();
    let origins: Vec<(Lsn, String)> = txs
        .iter()
        .filter_map(|t| t.origin.clone().map(|o| (t.lsn, o)))
        .collect();
    let newest_commit = commit_times_us.last().copied().unwrap_or(0);
    let applied = replica.apply(txs).await?;
    let reached = applied.lsn;
    let now_us = now_us();
    let _ = events.send(Event::Applied {
        lsn: reached,
        transactions: count,
        changes,
        lag_ms: (now_us - newest_commit) / 1000,
        commit_times_us,
        received_at_us: received_us,
        applied_at_us: now_us,
        origins,
    });
    if !applied.unknown.is_empty() {
        // Committed, and recorded for a snapshot: the next connection
        // fetches those tables (a server that announced them would have
        // sent their schema first).
        tracing::warn!(tables = ?applied.unknown, "changes for tables this replica does not know; reconnecting to fetch them");
        return Err(ClientError::Resync(applied.unknown));
    }
    Ok(reached)
}

/// Stores `lsn` as the replica's position when it is ahead: an empty
/// transaction moves the position in the same SQLite transaction as any
/// other would.
pub(super) async fn advance(replica: &Replica, applied: Lsn, lsn: Lsn) -> Result<Lsn, ClientError> {
    if lsn <= applied {
        return Ok(applied);
    }
    let marker = Transaction {
        lsn,
        xid: 0,
        commit_time_us: 0,
        origin: None,
        changes: Vec::new(),
    };
    replica.apply_transactions(vec![marker]).await
}
