//! Keeps the change log from growing without bound: transactions older
//! than `--retain` are removed, in batches of whole transactions, and the
//! position removed through is recorded so a replica that still needed
//! them is told to re-hydrate instead of silently missing them.

use std::time::{Duration, SystemTime};

use pgrelay_pg::Pool;
use tokio::sync::watch;

use crate::history::{self, HistoryError};

/// Changes removed per statement, so pruning never holds long locks or
/// builds one huge transaction.
const BATCH: i64 = 50_000;

pub(crate) async fn prune_log(
    pool: Pool,
    retain: Duration,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), HistoryError> {
    let period = (retain / 4).clamp(Duration::from_millis(500), Duration::from_secs(60));
    loop {
        if let Err(e) = prune_once(&pool, retain, &shutdown).await {
            // PostgreSQL may be restarting; the next round will do it.
            tracing::warn!(error = %e, "pruning the change log failed");
        }
        tokio::select! {
            biased;
            _ = shutdown.wait_for(|stop| *stop) => return Ok(()),
            _ = tokio::time::sleep(period) => {}
        }
    }
}

async fn prune_once(
    pool: &Pool,
    retain: Duration,
    shutdown: &watch::Receiver<bool>,
) -> Result<(), HistoryError> {
    let cutoff = SystemTime::now()
        .checked_sub(retain)
        .unwrap_or(SystemTime::UNIX_EPOCH);
    let mut client = pool.get().await?;
    let mut total = 0u64;
    while !*shutdown.borrow() {
        match history::prune(&mut client, cutoff, BATCH).await? {
            Some((through, removed)) => {
                total += removed;
                tracing::debug!(through = %through, removed, "pruned the change log");
                if removed < BATCH as u64 {
                    break;
                }
            }
            None => break,
        }
    }
    if total > 0 {
        tracing::info!(removed = total, retain = ?retain, "removed changes past the log's retention");
    }
    Ok(())
}
