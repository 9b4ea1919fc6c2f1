//! Rebase: local writes still in flight are put back on top of every
//! server transaction the replica applies, in the same SQLite transaction,
//! so a reader never sees another writer's older version of a row replace
//! its own write while that write travels (no flicker, no state that goes
//! backwards).
//!
//! A write is in flight from `execute` until the server's transaction that
//! holds it is applied here:
//!
//! ```text
//!   pending/sent ──answer: applied──▶ awaiting its echo ──echo applied──▶ done
//!        │                                  (or the position passes the
//!        │                                   answer's `lsn` ceiling)
//!        └──echo applied before the answer──▶ echoed ──answer──▶ done
//! ```
//!
//! The echo is the transaction from this client's origin whose commit LSN
//! lies in the answer's `(lsn_floor, lsn]`; before the answer it is the
//! next transaction from this client's origin while writes are `sent` (the
//! client has one batch in flight at a time). Rejected writes leave the
//! rebase at once: their rows roll back to the server's version as before.
//! `_pgrelay_landing` holds the two middle states; it is small (one row
//! per transaction in flight).

use std::collections::{HashMap, HashSet};

use pgrelay_protocol::{Change, Lsn, Op, TableSchema, WriteResults, WriteStatus};
use rusqlite::{params, Connection, OptionalExtension};

use super::{apply, captured};
use crate::ClientError;

const LANDING_SQL: &str = "
CREATE TABLE IF NOT EXISTS _pgrelay_landing (
    tx_id   TEXT PRIMARY KEY,
    floor   TEXT,
    ceiling TEXT,
    echoed  INTEGER NOT NULL DEFAULT 0
);";

pub(crate) fn ensure_table(conn: &Connection) -> Result<(), ClientError> {
    conn.execute_batch(LANDING_SQL)?;
    Ok(())
}

fn parse(text: Option<String>) -> Option<Lsn> {
    text.and_then(|t| t.parse().ok())
}

/// A transaction from this client's origin was applied at `lsn`: writes
/// answered as applied whose bounds hold it are done; writes sent and not
/// yet answered are its content (one batch in flight), so they stop being
/// put back.
pub(crate) fn echoed(conn: &Connection, lsn: Lsn) -> Result<(), ClientError> {
    let awaiting: Vec<(String, Option<String>, Option<String>)> = conn
        .prepare_cached("SELECT tx_id, floor, ceiling FROM _pgrelay_landing WHERE echoed = 0")?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        .collect::<Result<_, _>>()?;
    let mut done = conn.prepare_cached("DELETE FROM _pgrelay_landing WHERE tx_id = ?1")?;
    for (tx_id, floor, ceiling) in awaiting {
        let above = parse(floor).is_none_or(|f| lsn > f);
        let below = parse(ceiling).is_none_or(|c| lsn <= c);
        if above && below {
            done.execute([&tx_id])?;
        }
    }
    conn.prepare_cached(
        "INSERT OR REPLACE INTO _pgrelay_landing (tx_id, echoed) \
         SELECT DISTINCT tx_id, 1 FROM _pgrelay_outbox WHERE status = 'sent'",
    )?
    .execute([])?;
    Ok(())
}

/// The replica reached `reached`: writes answered with a ceiling at or
/// below it are held by the replica.
pub(crate) fn passed(conn: &Connection, reached: Lsn) -> Result<(), ClientError> {
    let awaiting: Vec<(String, Option<String>)> = conn
        .prepare_cached("SELECT tx_id, ceiling FROM _pgrelay_landing WHERE echoed = 0")?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    let mut done = conn.prepare_cached("DELETE FROM _pgrelay_landing WHERE tx_id = ?1")?;
    for (tx_id, ceiling) in awaiting {
        if parse(ceiling).is_none_or(|c| c <= reached) {
            done.execute([&tx_id])?;
        }
    }
    Ok(())
}

/// The server answered `results`; `position` is the replica's. An applied
/// write whose echo has not arrived (and whose ceiling the replica has not
/// reached) stays put back until it does; every other answer ends it.
pub(crate) fn answered(
    conn: &Connection,
    results: &WriteResults,
    tx_id: &str,
    status: WriteStatus,
    position: Option<Lsn>,
) -> Result<(), ClientError> {
    let echoed: Option<i64> = conn
        .prepare_cached("SELECT echoed FROM _pgrelay_landing WHERE tx_id = ?1")?
        .query_row([tx_id], |r| r.get(0))
        .optional()?;
    conn.prepare_cached("DELETE FROM _pgrelay_landing WHERE tx_id = ?1")?
        .execute([tx_id])?;
    let Some(ceiling) = results.lsn else {
        // A server without the bounds: the answer is all there is.
        return Ok(());
    };
    let held = position.is_some_and(|p| p >= ceiling);
    if status == WriteStatus::Applied && echoed != Some(1) && !held {
        conn.prepare_cached(
            "INSERT INTO _pgrelay_landing (tx_id, floor, ceiling, echoed) VALUES (?1, ?2, ?3, 0)",
        )?
        .execute(params![
            tx_id,
            results.lsn_floor.map(|l| l.to_string()),
            ceiling.to_string()
        ])?;
    }
    Ok(())
}

/// Puts the writes in flight back on top, oldest first, for the tables the
/// server's transactions just touched. The caller holds the transaction
/// that applied them and has set the replica as applying.
pub(crate) fn reapply(
    conn: &Connection,
    tables: &HashMap<String, TableSchema>,
    touched: &HashSet<String>,
) -> Result<usize, ClientError> {
    if touched.is_empty() {
        return Ok(0);
    }
    let mut reapplied = 0;
    for entry in captured::in_flight(conn)? {
        // Tables without a key cannot be written through pgrelay (and a
        // keyless insert put back would add the row again).
        let keyed = tables
            .get(&entry.table)
            .is_some_and(|t| !t.primary_key.is_empty());
        if !keyed || !touched.contains(&entry.table) {
            continue;
        }
        let Some(op) = Op::parse(&entry.op) else {
            continue;
        };
        let schema = tables.get(&entry.table);
        let row = |json: &Option<String>| {
            json.as_deref()
                .map(|j| captured::row_from_json(j, schema))
                .transpose()
        };
        let old = row(&entry.old)?;
        let new = match (op, row(&entry.new)?, &old) {
            // Only the columns the write changed: another writer's change
            // to the row's other columns shows at once.
            (Op::Update, Some(new), Some(old)) => Some(
                new.into_iter()
                    .filter(|(k, v)| old.get(k) != Some(v))
                    .collect(),
            ),
            (_, new, _) => new,
        };
        let change = Change {
            table: entry.table.clone(),
            op,
            new,
            old,
        };
        match apply::apply_change(conn, tables, &change) {
            Ok(()) => reapplied += 1,
            Err(e) => {
                tracing::warn!(table = %entry.table, error = %e, "could not put a local write in flight back on top")
            }
        }
    }
    Ok(reapplied)
}
