//! The change log's epoch in `pgrelay.log_state`: which slot feeds the log,
//! and replacing the log (a new log id) when that slot was lost.

use pgrelay_protocol::Lsn;
use tokio_postgres::types::PgLsn;
use tokio_postgres::Client;

use crate::ServerError;

/// What `pgrelay.log_state` says about the log's feed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Feed {
    /// The slot that feeds the log (none recorded: a log from before slots
    /// were recorded, or one that never had a slot).
    pub(crate) slot: Option<String>,
    /// Set while a new epoch is being started: where it begins.
    pub(crate) due: Option<Lsn>,
    /// The log's head (see [`crate::history::head`]); zero for a log that
    /// never held a transaction.
    pub(crate) head: Lsn,
}

pub(crate) async fn feed(db: &Client) -> Result<Feed, ServerError> {
    let row = db
        .query_one(
            "SELECT slot_name, new_epoch_from,
                    greatest((SELECT max(lsn) FROM pgrelay.change_history), pruned_through)
             FROM pgrelay.log_state WHERE id = 1",
            &[],
        )
        .await
        .map_err(ServerError::sql("reading which slot feeds the change log"))?;
    let lsn = |v: Option<PgLsn>| v.map(|l| Lsn(u64::from(l)));
    Ok(Feed {
        slot: row.get(0),
        due: lsn(row.get(1)),
        head: lsn(row.get(2)).unwrap_or(Lsn::ZERO),
    })
}

/// Records `slot` as the log's feed.
pub(crate) async fn record_slot(db: &Client, slot: &str) -> Result<(), ServerError> {
    db.execute(
        "UPDATE pgrelay.log_state SET slot_name = $1 WHERE id = 1",
        &[&slot],
    )
    .await
    .map_err(ServerError::sql(
        "recording the slot that feeds the change log",
    ))?;
    Ok(())
}

/// Records, before anything else changes, that a new epoch is due and
/// where it begins: the current WAL position, below the consistent point
/// of any slot created from now on. Durable, so a restart half-way still
/// starts the new epoch rather than streaming on from the new slot as if
/// nothing was lost. An epoch already due keeps its position.
pub(crate) async fn mark_due(db: &Client) -> Result<Lsn, ServerError> {
    let row = db
        .query_one(
            "UPDATE pgrelay.log_state SET new_epoch_from = coalesce(new_epoch_from, pg_current_wal_lsn())
             WHERE id = 1 RETURNING new_epoch_from",
            &[],
        )
        .await
        .map_err(ServerError::sql("recording that a new change log is due"))?;
    Ok(Lsn(u64::from(row.get::<_, PgLsn>(0))))
}

/// Starts the new epoch in one transaction: the old log's transactions go,
/// the log gets a new id (so every replica of the old one is answered
/// `gone`), counts as pruned through `floor`, and records `slot` as its
/// feed. Returns the new log id.
pub(crate) async fn start(db: &mut Client, slot: &str, floor: Lsn) -> Result<String, ServerError> {
    let tx = db
        .transaction()
        .await
        .map_err(ServerError::sql("starting a new change log"))?;
    // TRUNCATE before touching log_state: retention locks log_state's row
    // after reading the log, so the other order could deadlock with it.
    tx.batch_execute("TRUNCATE pgrelay.change_history")
        .await
        .map_err(ServerError::sql("emptying the lost change log"))?;
    let row = tx
        .query_one(
            "UPDATE pgrelay.log_state
             SET log_id = gen_random_uuid()::text, pruned_through = greatest(pruned_through, $1),
                 slot_name = $2, new_epoch_from = NULL
             WHERE id = 1 RETURNING log_id",
            &[&PgLsn::from(floor.0), &slot],
        )
        .await
        .map_err(ServerError::sql("starting a new change log"))?;
    let log_id: String = row.get(0);
    tx.commit()
        .await
        .map_err(ServerError::sql("committing the new change log"))?;
    Ok(log_id)
}
