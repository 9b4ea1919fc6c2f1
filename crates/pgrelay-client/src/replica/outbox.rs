//! The outbox of local writes (`_pgrelay_outbox`): taking the next batch
//! to send, in capture order, recording the server's answers, and putting
//! a rejected write's rows back to the server's version (from the rows the
//! server reports, or from a fresh snapshot of the tables when the server
//! never took the write).

use std::collections::HashMap;

use pgrelay_protocol::{
    encode_alone, BatchFrame, Change, ClientTransaction, EncodedTransaction, Op, TableSchema,
    TooLarge, TxResult, WriteResults, WriteStatus, MAX_WRITE_CHANGES,
};
use rusqlite::{params, Connection, OptionalExtension};
use serde::Serialize;

use super::apply::apply_change;
use super::capture::NOW_US_SQL;
use super::captured::{self, to_client_change, Captured};
use super::snapshot;
use crate::ClientError;

/// Changes per batch of several transactions at most; a transaction alone
/// may have up to the protocol's limit.
const BATCH_CHANGES: usize = 5_000;
/// Applied entries are kept this long for `pgrelay client outbox`.
const KEEP_APPLIED_US: i64 = 24 * 3600 * 1_000_000;

/// What became of one client transaction, for events.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Outcome {
    pub(crate) tx_id: String,
    pub(crate) status: WriteStatus,
    pub(crate) changes: usize,
    pub(crate) reason: Option<String>,
    /// When the first write of the transaction was made locally.
    pub(crate) created_us: i64,
}

/// One outbox entry as `pgrelay client outbox` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct OutboxEntry {
    pub seq: i64,
    pub tx_id: String,
    pub change_id: String,
    pub table: String,
    pub op: String,
    pub status: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub retries: i64,
    pub created_us: i64,
    pub updated_us: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub new: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub old: Option<serde_json::Value>,
}

/// The outbox's state: counts per status and the entries asked for.
#[derive(Clone, Debug, Default, Serialize)]
pub struct OutboxReport {
    pub pending: i64,
    pub sent: i64,
    pub applied: i64,
    pub rejected: i64,
    pub entries: Vec<OutboxEntry>,
}

impl OutboxReport {
    /// Entries not yet answered by the server.
    pub fn unsent(&self) -> i64 {
        self.pending + self.sent
    }
}

/// What [`take_batch`] found: frames to send and transactions set aside.
#[derive(Debug, Default)]
pub(crate) struct Taken {
    /// To send in order: one `write`, or one transaction's `write_part`s.
    pub(crate) frames: Vec<String>,
    pub(crate) batch_id: Option<String>,
    /// The client transactions the frames carry.
    pub(crate) tx_ids: Vec<String>,
    /// Transactions that can never be sent, now rejected.
    pub(crate) set_aside: Vec<Outcome>,
    /// Tables to fetch again from the server: a set-aside transaction wrote
    /// them, and only a fresh snapshot says what the server has.
    pub(crate) resync: Vec<String>,
}

/// A batch id of the form the client always uses (sizes depend on it).
pub(crate) fn new_batch_id() -> String {
    format!("b-{:016x}", rand::random::<u64>())
}

/// Takes the oldest unanswered client transactions (pending, or sent on a
/// connection that ended), marks them sent and returns their frames: as
/// many whole transactions as fit one `write` frame (measured on the
/// encoded bytes), or a transaction too large for one frame alone in
/// `write_part` frames. A transaction that can never be sent is set aside.
pub(crate) fn take_batch(
    conn: &Connection,
    tables: &HashMap<String, TableSchema>,
    max_txs: usize,
) -> Result<Taken, ClientError> {
    let rows = captured::unconfirmed(conn, Some(MAX_WRITE_CHANGES + 1))?;
    let hit_limit = rows.len() > MAX_WRITE_CHANGES;
    // Group into client transactions; a transaction's entries are
    // contiguous (captured in one SQLite transaction).
    let mut groups: Vec<Vec<Captured>> = Vec::new();
    for row in rows {
        match groups.last_mut() {
            Some(g) if g[0].tx_id == row.tx_id => g.push(row),
            _ => groups.push(vec![row]),
        }
    }
    if hit_limit {
        // The last group may continue past the rows read.
        let cut = groups.pop();
        if let (true, Some(g)) = (groups.is_empty(), cut) {
            // Only an outbox from before `execute` checked sizes can hold
            // one: `execute` refuses it.
            let changes = count_tx(conn, &g[0].tx_id)?;
            return set_aside_taken(conn, tables, &g[0].tx_id, &TooLarge::Changes { changes });
        }
    }
    let batch_id = new_batch_id();
    let mut frame = BatchFrame::new(Some(&batch_id));
    for group in groups {
        let tx = ClientTransaction {
            id: group[0].tx_id.clone(),
            changes: group
                .iter()
                .map(|c| to_client_change(c, tables))
                .collect::<Result<Vec<_>, _>>()?,
        };
        let encoded = EncodedTransaction::new(&tx);
        if frame.is_empty() && !frame.fits(&encoded) {
            // Alone in `write_part` frames, or not at all.
            let id = tx.id;
            return match encode_alone(Some(&batch_id), encoded) {
                Ok(frames) => {
                    mark_sent(conn, std::slice::from_ref(&id))?;
                    Ok(Taken {
                        frames,
                        batch_id: Some(batch_id),
                        tx_ids: vec![id],
                        ..Taken::default()
                    })
                }
                // Possible only for a write `execute` did not see (made on
                // the application's own connection), or after the table's
                // columns changed.
                Err(too_large) => set_aside_taken(conn, tables, &id, &too_large),
            };
        }
        let full = frame.transactions().count() >= max_txs
            || frame.changes() + encoded.changes() > BATCH_CHANGES;
        if !frame.is_empty() && (full || !frame.fits(&encoded)) {
            break;
        }
        frame.push(encoded);
    }
    if frame.is_empty() {
        return Ok(Taken::default());
    }
    let tx_ids: Vec<String> = frame.transactions().map(str::to_owned).collect();
    mark_sent(conn, &tx_ids)?;
    Ok(Taken {
        frames: vec![frame.into_frame()],
        batch_id: Some(batch_id),
        tx_ids,
        ..Taken::default()
    })
}

fn mark_sent(conn: &Connection, tx_ids: &[String]) -> Result<(), ClientError> {
    let mut mark = conn.prepare_cached(&format!(
        "UPDATE _pgrelay_outbox SET status = 'sent', updated_us = {NOW_US_SQL} WHERE tx_id = ?1 AND status = 'pending'"
    ))?;
    for id in tx_ids {
        mark.execute([id])?;
    }
    Ok(())
}

fn count_tx(conn: &Connection, tx_id: &str) -> Result<usize, ClientError> {
    let n: i64 = conn
        .prepare_cached("SELECT count(*) FROM _pgrelay_outbox WHERE tx_id = ?1")?
        .query_row([tx_id], |r| r.get(0))?;
    Ok(count(n)?)
}

/// A count SQLite returned, as a size; a negative one is an error.
pub(super) fn count(n: i64) -> Result<usize, rusqlite::Error> {
    usize::try_from(n).map_err(|_| rusqlite::Error::IntegralValueOutOfRange(0, n))
}

fn set_aside_taken(
    conn: &Connection,
    tables: &HashMap<String, TableSchema>,
    tx_id: &str,
    why: &TooLarge,
) -> Result<Taken, ClientError> {
    let (outcome, resync) = set_aside(conn, tables, tx_id, &why.to_string())?;
    Ok(Taken {
        set_aside: vec![outcome],
        resync,
        ..Taken::default()
    })
}

/// Rejects a transaction the server never took (it cannot be sent, or the
/// server refused it whole) and asks for a fresh snapshot of the tables it
/// wrote: without the server's answer, that is how the replica gets the
/// server's rows back. Returns those tables.
pub(crate) fn set_aside(
    conn: &Connection,
    tables: &HashMap<String, TableSchema>,
    tx_id: &str,
    reason: &str,
) -> Result<(Outcome, Vec<String>), ClientError> {
    tracing::warn!(
        tx_id,
        reason,
        "local write set aside; its tables are fetched again"
    );
    let (changes, created_us): (i64, Option<i64>) = conn
        .prepare_cached(
            "SELECT count(*), min(created_us) FROM _pgrelay_outbox WHERE tx_id = ?1 AND status IN ('pending', 'sent')",
        )?
        .query_row([tx_id], |r| Ok((r.get(0)?, r.get(1)?)))?;
    let touched = conn
        .prepare_cached(
            "SELECT DISTINCT table_name FROM _pgrelay_outbox WHERE tx_id = ?1 AND status IN ('pending', 'sent')",
        )?
        .query_map([tx_id], |r| r.get::<_, String>(0))?
        .collect::<Result<Vec<_>, _>>()?;
    conn.prepare_cached(&format!(
        "UPDATE _pgrelay_outbox SET status = 'rejected', error = ?2, updated_us = {NOW_US_SQL} \
         WHERE tx_id = ?1 AND status IN ('pending', 'sent')"
    ))?
    .execute(params![tx_id, reason])?;
    let resync: Vec<String> = touched
        .into_iter()
        .filter(|t| tables.get(t).is_some_and(|t| t.skipped.is_none()))
        .collect();
    snapshot::request_resync(conn, &resync)?;
    Ok((
        Outcome {
            tx_id: tx_id.to_owned(),
            status: WriteStatus::Rejected,
            changes: count(changes)?,
            reason: Some(reason.to_owned()),
            created_us: created_us.unwrap_or(0),
        },
        resync,
    ))
}

/// The transaction `tx_id` as it would go out, encoded, for `execute` to
/// measure before it commits.
pub(crate) fn encode_captured(
    conn: &Connection,
    tables: &HashMap<String, TableSchema>,
    tx_id: &str,
) -> Result<EncodedTransaction, ClientError> {
    let changes = captured::of_transaction(conn, tx_id)?
        .iter()
        .map(|c| to_client_change(c, tables))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(EncodedTransaction::new(&ClientTransaction {
        id: tx_id.to_owned(),
        changes,
    }))
}

/// Records the server's answers; rolls back the rows of rejected
/// transactions to the server's version. The caller holds the transaction
/// and has set the replica as applying.
pub(crate) fn record_results(
    conn: &Connection,
    tables: &HashMap<String, TableSchema>,
    results: &WriteResults,
) -> Result<Vec<Outcome>, ClientError> {
    let mut outcomes = Vec::with_capacity(results.results.len());
    let position = super::schema::read_meta(conn, "lsn")?.and_then(|l| l.parse().ok());
    for result in &results.results {
        let (changes, created_us): (i64, Option<i64>) = conn
            .prepare_cached(
                "SELECT count(*), min(created_us) FROM _pgrelay_outbox WHERE tx_id = ?1 AND status IN ('pending', 'sent')",
            )?
            .query_row([&result.id], |r| Ok((r.get(0)?, r.get(1)?)))?;
        if changes == 0 {
            // Answered before (a duplicate answer): nothing to do.
            continue;
        }
        let (status, error, bump) = match result.status {
            WriteStatus::Applied => ("applied", None, 0),
            WriteStatus::Rejected => ("rejected", Some(describe(result)), 0),
            WriteStatus::Retry => ("pending", result.reason.clone(), 1),
        };
        conn.prepare_cached(&format!(
            "UPDATE _pgrelay_outbox SET status = ?2, error = ?3, retries = retries + ?4, updated_us = {NOW_US_SQL} \
             WHERE tx_id = ?1 AND status IN ('pending', 'sent')"
        ))?
        .execute(params![result.id, status, error, bump])?;
        super::rebase::answered(conn, results, &result.id, result.status, position)?;
        if result.status == WriteStatus::Rejected {
            roll_back(conn, tables, result)?;
        }
        outcomes.push(Outcome {
            tx_id: result.id.clone(),
            status: result.status,
            changes: count(changes)?,
            reason: error.or_else(|| result.reason.clone()),
            created_us: created_us.unwrap_or(0),
        });
    }
    conn.prepare_cached(&format!(
        "DELETE FROM _pgrelay_outbox WHERE status = 'applied' AND updated_us < {NOW_US_SQL} - ?1"
    ))?
    .execute([KEEP_APPLIED_US])?;
    Ok(outcomes)
}

fn describe(result: &TxResult) -> String {
    let code = result
        .code
        .map(|c| format!("{c:?}"))
        .unwrap_or_else(|| "Rejected".to_owned());
    format!("{code}: {}", result.reason.as_deref().unwrap_or("rejected"))
}

/// Puts each row the rejected transaction touched back to the server's
/// version, or removes it when the server has none.
fn roll_back(
    conn: &Connection,
    tables: &HashMap<String, TableSchema>,
    result: &TxResult,
) -> Result<(), ClientError> {
    for current in &result.rows {
        let Some(table) = tables.get(&current.table) else {
            continue;
        };
        let change = match &current.row {
            Some(row) => Change {
                table: table.name.clone(),
                op: Op::Insert,
                new: Some(row.clone()),
                old: None,
            },
            None => Change {
                table: table.name.clone(),
                op: Op::Delete,
                new: None,
                old: Some(current.key.clone()),
            },
        };
        apply_change(conn, tables, &change)?;
    }
    Ok(())
}

/// Counts per status and up to `limit` entries (newest first), optionally
/// only those with `status`.
pub(crate) fn report(
    conn: &Connection,
    status: Option<&str>,
    limit: usize,
) -> Result<OutboxReport, ClientError> {
    let mut report = OutboxReport::default();
    let mut stmt = conn.prepare("SELECT status, count(*) FROM _pgrelay_outbox GROUP BY status")?;
    let counts = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
    for count in counts {
        let (s, n) = count?;
        match s.as_str() {
            "pending" => report.pending = n,
            "sent" => report.sent = n,
            "applied" => report.applied = n,
            "rejected" => report.rejected = n,
            _ => {}
        }
    }
    let mut stmt = conn.prepare(
        "SELECT seq, tx_id, change_id, table_name, op, status, error, retries, created_us, updated_us, new_row, old_row \
         FROM _pgrelay_outbox WHERE ?1 IS NULL OR status = ?1 ORDER BY seq DESC LIMIT ?2",
    )?;
    let json = |s: Option<String>| s.and_then(|s| serde_json::from_str(&s).ok());
    let entries = stmt.query_map(
        params![status, i64::try_from(limit).unwrap_or(i64::MAX)],
        |r| {
            Ok(OutboxEntry {
                seq: r.get(0)?,
                tx_id: r.get(1)?,
                change_id: r.get(2)?,
                table: r.get(3)?,
                op: r.get(4)?,
                status: r.get(5)?,
                error: r.get(6)?,
                retries: r.get(7)?,
                created_us: r.get(8)?,
                updated_us: r.get(9)?,
                new: json(r.get(10)?),
                old: json(r.get(11)?),
            })
        },
    )?;
    report.entries = entries.collect::<Result<Vec<_>, _>>()?;
    report.entries.reverse();
    Ok(report)
}

/// Whether any write still waits for the server's answer.
pub(crate) fn unsent(conn: &Connection) -> Result<bool, ClientError> {
    Ok(conn
        .query_row(
            "SELECT 1 FROM _pgrelay_outbox WHERE status IN ('pending', 'sent') LIMIT 1",
            [],
            |_| Ok(()),
        )
        .optional()?
        .is_some())
}
