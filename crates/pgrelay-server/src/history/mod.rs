//! The durable change log, `pgrelay.change_history`: every captured change,
//! keyed by its transaction's commit LSN and its ordinal within that
//! transaction (several changes can share one WAL record, so the LSN alone is
//! not a key).

pub(crate) mod epoch;
mod error;
pub(crate) mod notice;
pub(crate) mod reader;
pub(crate) mod retention;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::pin_mut;
use pgrelay_protocol::{Change, Lsn, Op, Row, TableSchema, Transaction};
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{Json, PgLsn, Type};
use tokio_postgres::Client;

use crate::hub::encoded::{EncodedTx, JsonText};
pub use error::HistoryError;

/// The commit LSN of the newest transaction the log has held: its newest
/// row, or where retention pruned it through when that emptied it (zero
/// for a log that never held one). It never moves backwards: a replica
/// hydrated at the head must not find itself behind retention.
pub(crate) async fn head(client: &Client) -> Result<Lsn, HistoryError> {
    let row = client
        .query_one(
            "SELECT greatest((SELECT max(lsn) FROM pgrelay.change_history),
                             (SELECT pruned_through FROM pgrelay.log_state WHERE id = 1))",
            &[],
        )
        .await
        .map_err(HistoryError::sql("reading the change log's head"))?;
    Ok(Lsn(row
        .get::<_, Option<PgLsn>>(0)
        .map(u64::from)
        .unwrap_or(0)))
}

/// The change log's identity and the commit LSN through which retention
/// has removed it.
pub(crate) async fn log_state(client: &Client) -> Result<(String, Lsn), HistoryError> {
    let row = client
        .query_one(
            "SELECT log_id, pruned_through FROM pgrelay.log_state WHERE id = 1",
            &[],
        )
        .await
        .map_err(HistoryError::sql("reading the change log's state"))?;
    Ok((row.get(0), Lsn(u64::from(row.get::<_, PgLsn>(1)))))
}

/// Removes up to about `max_changes` of the oldest changes committed
/// before `cutoff`, whole transactions only, and records how far the log
/// now starts in the same transaction. Returns the new pruned-through
/// position and the changes removed (`None`: nothing old enough).
pub(crate) async fn prune(
    client: &mut Client,
    cutoff: SystemTime,
    max_changes: i64,
) -> Result<Option<(Lsn, u64)>, HistoryError> {
    let tx = client
        .transaction()
        .await
        .map_err(HistoryError::sql("starting to prune the change log"))?;
    // The newest transaction boundary among the oldest `max_changes` rows
    // that are all older than the cutoff.
    let row = tx
        .query_one(
            "SELECT max(lsn) FROM (SELECT lsn FROM pgrelay.change_history
                WHERE commit_time < $1 ORDER BY lsn, ordinal LIMIT $2) oldest",
            &[&cutoff, &max_changes],
        )
        .await
        .map_err(HistoryError::sql("finding changes past retention"))?;
    let Some(through) = row.get::<_, Option<PgLsn>>(0) else {
        return Ok(None);
    };
    tx.execute(
        "UPDATE pgrelay.log_state SET pruned_through = greatest(pruned_through, $1) WHERE id = 1",
        &[&through],
    )
    .await
    .map_err(HistoryError::sql("recording the pruned position"))?;
    let removed = tx
        .execute(
            "DELETE FROM pgrelay.change_history WHERE lsn <= $1",
            &[&through],
        )
        .await
        .map_err(HistoryError::sql("pruning the change log"))?;
    tx.commit()
        .await
        .map_err(HistoryError::sql("committing the pruned change log"))?;
    Ok(Some((Lsn(u64::from(through)), removed)))
}

/// Gives each table its persisted schema version: unchanged columns keep
/// the stored version, changed ones get the next.
pub(crate) async fn version_schemas(
    client: &Client,
    tables: &mut [TableSchema],
) -> Result<(), HistoryError> {
    for table in tables.iter_mut() {
        record_schema(client, table).await?;
    }
    Ok(())
}

/// Stores `table`'s schema, setting its version (bumped when the columns or
/// key differ from the stored ones).
pub(crate) async fn record_schema(
    client: &Client,
    table: &mut TableSchema,
) -> Result<(), HistoryError> {
    let stored = client
        .query_opt(
            "SELECT version, schema FROM pgrelay.table_schemas WHERE name = $1",
            &[&table.name],
        )
        .await
        .map_err(HistoryError::sql("reading stored table schemas"))?;
    table.version = match stored {
        Some(row) => {
            let version: i32 = row.get(0);
            let Json(old): Json<TableSchema> = row.get(1);
            // Columns PostgreSQL filled in without streaming stay listed
            // (a restart rediscovers the table without them), so a replica
            // that lacks one still fetches the table again.
            for column in old.backfilled {
                if table.column(&column).is_some() && !table.backfilled.contains(&column) {
                    table.backfilled.push(column);
                }
            }
            let same = old.columns == table.columns
                && old.primary_key == table.primary_key
                && old.skipped == table.skipped;
            if same {
                u32::try_from(version).unwrap_or(1)
            } else {
                u32::try_from(version).unwrap_or(0) + 1
            }
        }
        None => 1,
    };
    let version = i32::try_from(table.version).unwrap_or(i32::MAX);
    client
        .execute(
            "INSERT INTO pgrelay.table_schemas (name, version, schema) VALUES ($1, $2, $3)
             ON CONFLICT (name) DO UPDATE SET version = EXCLUDED.version, schema = EXCLUDED.schema",
            &[&table.name, &version, &Json(&*table)],
        )
        .await
        .map_err(HistoryError::sql(format!(
            "storing the schema of {}",
            table.name
        )))?;
    Ok(())
}

/// A transaction on its way into the log, with each change's schema version.
pub(crate) struct LoggedTx<'a> {
    pub(crate) tx: &'a EncodedTx,
    pub(crate) schema_versions: &'a [u32],
    /// The frame sessions get for it (the append's notice may carry it).
    pub(crate) frame: &'a str,
}

/// The channel on which every append is announced, in the append's own
/// commit: nodes that do not capture listen on it, and publish the new
/// transactions from the notice ([`notice`]) or read them from the log.
pub(crate) const NOTIFY_CHANNEL: &str = "pgrelay_change_log";

/// Who appends: the slot and the capture term this node holds.
#[derive(Clone, Debug)]
pub(crate) struct Fence {
    pub(crate) slot: String,
    pub(crate) term: i64,
}

/// The append's two statements, prepared once per connection (a round
/// trip each saved on every append).
pub(crate) struct AppendStatements {
    fence: tokio_postgres::Statement,
    copy: tokio_postgres::Statement,
}

impl AppendStatements {
    pub(crate) async fn prepare(client: &Client) -> Result<AppendStatements, HistoryError> {
        let (fence, copy) = futures_util::future::try_join(
            client.prepare(
                "WITH fenced AS (UPDATE pgrelay.capture SET captured = greatest(captured, $3)
                                  WHERE slot = $1 AND term = $2 RETURNING 1)
                 SELECT pg_notify($4, $5) FROM fenced",
            ),
            client.prepare(
                "COPY pgrelay.change_history (lsn, ordinal, table_name, operation, data, old_data, \
                 transaction_id, commit_time, origin_client, schema_version) FROM STDIN BINARY",
            ),
        )
        .await
        .map_err(HistoryError::sql("preparing the change-log append"))?;
        Ok(AppendStatements { fence, copy })
    }
}

/// Appends whole transactions to the log atomically, in one transaction
/// that first checks (and row-locks until commit) that `fence`'s term is
/// still the slot's: a capturer whose term is over appends nothing. The
/// same transaction records how far the log is captured (`end`) and
/// notifies followers at commit with `notice` (see [`notice::appended`]).
/// Callers pass only transactions newer than
/// the log's head, so a replay after a crash inserts nothing twice (and the
/// primary key would refuse it).
pub(crate) async fn append(
    client: &Client,
    statements: &AppendStatements,
    fence: &Fence,
    end: Lsn,
    notice: &str,
    txs: &[LoggedTx<'_>],
) -> Result<(), HistoryError> {
    let result = append_in_tx(client, statements, fence, end, notice, txs).await;
    if result.is_err() {
        // Whatever was appended goes; the writer drops the connection anyway.
        let _ = client.batch_execute("ROLLBACK").await;
    }
    result
}

async fn append_in_tx(
    client: &Client,
    statements: &AppendStatements,
    fence: &Fence,
    end: Lsn,
    notice: &str,
    txs: &[LoggedTx<'_>],
) -> Result<(), HistoryError> {
    // BEGIN and the term check go out together: one round trip (requests
    // polled together are pipelined, in order, on the connection).
    let (_, ours) = futures_util::future::try_join(
        client.batch_execute("BEGIN"),
        client.query_opt(
            &statements.fence,
            &[
                &fence.slot,
                &fence.term,
                &PgLsn::from(end.0),
                &NOTIFY_CHANNEL,
                &notice,
            ],
        ),
    )
    .await
    .map_err(HistoryError::sql("checking the capture term"))?;
    if ours.is_none() {
        return Err(HistoryError::Fenced {
            slot: fence.slot.clone(),
            term: fence.term,
        });
    }
    let sink = client
        .copy_in(&statements.copy)
        .await
        .map_err(HistoryError::sql("starting COPY into the change log"))?;
    let types = [
        Type::PG_LSN,
        Type::INT4,
        Type::TEXT,
        Type::TEXT,
        Type::JSON,
        Type::JSON,
        Type::INT8,
        Type::TIMESTAMPTZ,
        Type::TEXT,
        Type::INT4,
    ];
    let writer = BinaryCopyInWriter::new(sink, &types);
    pin_mut!(writer);
    for logged in txs {
        let tx = logged.tx;
        let lsn = PgLsn::from(tx.lsn.0);
        let xid = i64::from(tx.xid);
        let commit_time = system_time(tx.commit_time_us);
        for (ordinal, change) in tx.changes.iter().enumerate() {
            let ordinal = i32::try_from(ordinal)
                .map_err(|_| HistoryError::TooLarge("transaction with over 2^31 changes"))?;
            let version = logged
                .schema_versions
                .get(usize::try_from(ordinal).unwrap_or(usize::MAX))
                .copied()
                .unwrap_or(1);
            let version = i32::try_from(version)
                .map_err(|_| HistoryError::TooLarge("schema version over 2^31"))?;
            let data = change.new.as_ref().map(|r| JsonText(r.get()));
            let old = change.old.as_ref().map(|r| JsonText(r.get()));
            writer
                .as_mut()
                .write(&[
                    &lsn,
                    &ordinal,
                    &change.table,
                    &change.op.as_str(),
                    &data,
                    &old,
                    &xid,
                    &commit_time,
                    &tx.origin,
                    &version,
                ])
                .await
                .map_err(HistoryError::sql("writing to the change log"))?;
        }
    }
    writer
        .finish()
        .await
        .map_err(HistoryError::sql("writing to the change log"))?;
    client
        .batch_execute("COMMIT")
        .await
        .map_err(HistoryError::sql("committing to the change log"))?;
    Ok(())
}

/// Reads whole transactions with commit LSN after `after`, oldest first:
/// about `limit` changes, never splitting a transaction. Fails with
/// [`HistoryError::Pruned`] when retention has removed transactions after
/// `after` (read in the same statement, so a prune racing with the read
/// cannot slip a gap through).
pub(crate) async fn read_after(
    client: &Client,
    after: Lsn,
    limit: i64,
) -> Result<Vec<Transaction>, HistoryError> {
    let rows = client
        .query(
            &format!(
                "WITH state AS (SELECT pruned_through FROM pgrelay.log_state WHERE id = 1)
                 SELECT state.pruned_through, page.* FROM state LEFT JOIN LATERAL
                   (SELECT {COLUMNS} FROM pgrelay.change_history WHERE lsn > $1
                    ORDER BY lsn, ordinal LIMIT $2) page ON true"
            ),
            &[&PgLsn::from(after.0), &limit],
        )
        .await
        .map_err(HistoryError::sql("reading the change log"))?;
    if let Some(first) = rows.first() {
        let pruned = Lsn(u64::from(first.get::<_, PgLsn>(0)));
        if after < pruned {
            return Err(HistoryError::Pruned {
                position: after,
                pruned_through: pruned,
            });
        }
    }
    let rows: Vec<_> = rows
        .into_iter()
        .filter(|r| r.get::<_, Option<PgLsn>>(1).is_some())
        .collect();
    let full_page = i64::try_from(rows.len()).is_ok_and(|n| n == limit);
    let mut txs = group(rows, 1)?;
    if full_page {
        // The page may have cut the last transaction short: read its rest.
        if let Some(last) = txs.last_mut() {
            let done = i32::try_from(last.changes.len()).unwrap_or(i32::MAX) - 1;
            let rest = client
                .query(
                    &format!(
                        "SELECT {COLUMNS} FROM pgrelay.change_history WHERE lsn = $1 AND ordinal > $2 ORDER BY ordinal"
                    ),
                    &[&PgLsn::from(last.lsn.0), &done],
                )
                .await
                .map_err(HistoryError::sql("reading the change log"))?;
            for tx in group(rest, 0)? {
                last.changes.extend(tx.changes);
            }
        }
    }
    Ok(txs)
}

const COLUMNS: &str = "lsn, ordinal, table_name, operation, data, old_data, transaction_id, \
    (extract(epoch FROM commit_time) * 1000000)::int8 AS commit_us, origin_client";

/// Groups rows of [`COLUMNS`] (starting at column `at`) into transactions.
fn group(rows: Vec<tokio_postgres::Row>, at: usize) -> Result<Vec<Transaction>, HistoryError> {
    let mut txs: Vec<Transaction> = Vec::new();
    for row in rows {
        let lsn = Lsn(u64::from(row.get::<_, PgLsn>(at)));
        let op_text: &str = row.get(at + 3);
        let op = Op::parse(op_text)
            .ok_or_else(|| HistoryError::CorruptLog(format!("operation {op_text:?} at {lsn}")))?;
        let new: Option<Json<Row>> = row.get(at + 4);
        let old: Option<Json<Row>> = row.get(at + 5);
        let change = Change {
            table: row.get(at + 2),
            op,
            new: new.map(|j| j.0),
            old: old.map(|j| j.0),
        };
        match txs.last_mut() {
            Some(tx) if tx.lsn == lsn => tx.changes.push(change),
            _ => txs.push(Transaction {
                lsn,
                xid: u32::try_from(row.get::<_, i64>(at + 6)).unwrap_or(0),
                commit_time_us: row.get(at + 7),
                origin: row.get(at + 8),
                changes: vec![change],
            }),
        }
    }
    Ok(txs)
}

fn system_time(unix_us: i64) -> SystemTime {
    match u64::try_from(unix_us) {
        Ok(after) => UNIX_EPOCH + Duration::from_micros(after),
        Err(_) => UNIX_EPOCH - Duration::from_micros(unix_us.unsigned_abs()),
    }
}
