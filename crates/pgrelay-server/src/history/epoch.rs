//! The change log's epoch: which slots feed the log (`pgrelay.log_slots`),
//! and replacing the log (a new log id in `pgrelay.log_state`) when a
//! slot that fed it was lost.

use pgrelay_protocol::Lsn;
use tokio_postgres::types::PgLsn;
use tokio_postgres::Client;

use super::HistoryError;

/// What pgrelay's own tables say about the log's feed, seen from `slot`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Feed {
    /// `slot` is recorded as feeding the log.
    pub(crate) recorded: bool,
    /// Some slot is recorded (none: a log from before slots were recorded,
    /// or one that never had a slot).
    pub(crate) any_recorded: bool,
    /// Another recorded slot exists and is not invalidated: another node
    /// (with a `--slot` of its own) feeds the log.
    pub(crate) other_feeds: bool,
    /// Set while a new epoch is being started: where it begins.
    pub(crate) due: Option<Lsn>,
    /// The log's head (see [`crate::history::head`]); zero for a log that
    /// never held a transaction.
    pub(crate) head: Lsn,
}

pub(crate) async fn feed(db: &Client, slot: &str) -> Result<Feed, HistoryError> {
    let row = db
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pgrelay.log_slots WHERE slot_name = $1),
                    EXISTS (SELECT 1 FROM pgrelay.log_slots),
                    EXISTS (SELECT 1 FROM pgrelay.log_slots l JOIN pg_replication_slots s USING (slot_name)
                            WHERE l.slot_name <> $1 AND s.wal_status IS DISTINCT FROM 'lost'),
                    new_epoch_from,
                    greatest((SELECT max(lsn) FROM pgrelay.change_history), pruned_through)
             FROM pgrelay.log_state WHERE id = 1",
            &[&slot],
        )
        .await
        .map_err(HistoryError::sql("reading which slots feed the change log"))?;
    let lsn = |v: Option<PgLsn>| v.map(|l| Lsn(u64::from(l)));
    Ok(Feed {
        recorded: row.get(0),
        any_recorded: row.get(1),
        other_feeds: row.get(2),
        due: lsn(row.get(3)),
        head: lsn(row.get(4)).unwrap_or(Lsn::ZERO),
    })
}

/// Records `slot` as feeding the log.
pub(crate) async fn record_slot(db: &Client, slot: &str) -> Result<(), HistoryError> {
    db.execute(
        "INSERT INTO pgrelay.log_slots (slot_name) VALUES ($1) ON CONFLICT DO NOTHING",
        &[&slot],
    )
    .await
    .map_err(HistoryError::sql(
        "recording the slot that feeds the change log",
    ))?;
    Ok(())
}

/// Records, before anything else changes, that a new epoch is due and
/// where it begins: the current WAL position, below the consistent point
/// of any slot created from now on. Durable, so a restart half-way still
/// starts the new epoch rather than streaming on from the new slot as if
/// nothing was lost. An epoch already due keeps its position.
pub(crate) async fn mark_due(db: &Client) -> Result<Lsn, HistoryError> {
    let row = db
        .query_one(
            "UPDATE pgrelay.log_state SET new_epoch_from = coalesce(new_epoch_from, pg_current_wal_lsn())
             WHERE id = 1 RETURNING new_epoch_from",
            &[],
        )
        .await
        .map_err(HistoryError::sql("recording that a new change log is due"))?;
    Ok(Lsn(u64::from(row.get::<_, PgLsn>(0))))
}

/// Starts the new epoch in one transaction: the old log's transactions go,
/// the log gets a new id (so every replica of the old one is answered
/// `gone`), counts as pruned through `floor`, and has `slot` as its only
/// feed. Returns the new log id.
pub(crate) async fn start(db: &mut Client, slot: &str, floor: Lsn) -> Result<String, HistoryError> {
    let tx = db
        .transaction()
        .await
        .map_err(HistoryError::sql("starting a new change log"))?;
    // TRUNCATE before touching log_state: retention locks log_state's row
    // after reading the log, so the other order could deadlock with it.
    tx.batch_execute("TRUNCATE pgrelay.change_history; DELETE FROM pgrelay.log_slots;")
        .await
        .map_err(HistoryError::sql("emptying the lost change log"))?;
    tx.execute(
        "INSERT INTO pgrelay.log_slots (slot_name) VALUES ($1)",
        &[&slot],
    )
    .await
    .map_err(HistoryError::sql(
        "recording the slot that feeds the new change log",
    ))?;
    let row = tx
        .query_one(
            "UPDATE pgrelay.log_state
             SET log_id = gen_random_uuid()::text, pruned_through = greatest(pruned_through, $1),
                 new_epoch_from = NULL
             WHERE id = 1 RETURNING log_id",
            &[&PgLsn::from(floor.0)],
        )
        .await
        .map_err(HistoryError::sql("starting a new change log"))?;
    let log_id: String = row.get(0);
    tx.commit()
        .await
        .map_err(HistoryError::sql("committing the new change log"))?;
    Ok(log_id)
}
