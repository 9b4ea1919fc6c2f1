//! One batch in one PostgreSQL transaction: the origin tag first, a
//! savepoint per client transaction, the change ids recorded beside the
//! changes so a resent batch applies nothing twice.

use std::collections::BTreeMap;

use pgrelay_pg::PooledClient;
use pgrelay_protocol::{ClientTransaction, Lsn, TableSchema, TxResult, WriteBatch, WriteStatus};
use tokio_postgres::Client;

use super::current::current_rows;
use super::error::describe;
use super::transaction::{apply_tx, Failure};
use crate::auth::Scope;

/// A batch's answers and the WAL bounds of its commit (read-your-writes).
pub(super) struct Applied {
    pub(super) results: Vec<TxResult>,
    pub(super) floor: Option<Lsn>,
    pub(super) ceiling: Option<Lsn>,
}

pub(super) async fn run_batch(
    conn: &mut PooledClient,
    client_id: &str,
    batch: &WriteBatch,
    schemas: &BTreeMap<String, TableSchema>,
    versions: &BTreeMap<String, String>,
    scope: Option<&Scope>,
) -> Result<Applied, tokio_postgres::Error> {
    conn.batch_execute("BEGIN").await?;
    // The origin message is the transaction's first WAL record: its
    // position is a floor for the commit's.
    let floor: String = conn
        .query_one(
            "SELECT pg_logical_emit_message(true, 'pgrelay.origin', $1::text)::text",
            &[&pgrelay_protocol::origin_tag(client_id)],
        )
        .await?
        .get(0);
    let mut results = Vec::with_capacity(batch.transactions.len());
    let mut stopped: Option<String> = None;
    for tx in &batch.transactions {
        if let Some(reason) = &stopped {
            // Later transactions wait for the one that must be retried, so
            // the client's writes reach PostgreSQL in the order it made them.
            results.push(TxResult::retry(&tx.id, reason.clone()));
            continue;
        }
        // One round trip for both: tokio-postgres pipelines them in order.
        let (savepoint, recorded) = tokio::join!(
            conn.batch_execute("SAVEPOINT client_tx"),
            record_ids(conn, client_id, tx)
        );
        savepoint?;
        let first_time = match recorded {
            Ok(first_time) => first_time,
            Err(e) if e.as_db_error().is_some() => {
                conn.batch_execute("ROLLBACK TO SAVEPOINT client_tx; RELEASE SAVEPOINT client_tx")
                    .await?;
                let reason = describe(&e);
                results.push(TxResult::retry(&tx.id, reason));
                stopped = Some(format!("waiting for transaction {} to be retried", tx.id));
                continue;
            }
            Err(e) => return Err(e),
        };
        if !first_time {
            conn.batch_execute("ROLLBACK TO SAVEPOINT client_tx; RELEASE SAVEPOINT client_tx")
                .await?;
            results.push(TxResult::applied(&tx.id, true));
            continue;
        }
        match apply_tx(conn, tx, schemas, versions, scope).await {
            Ok(()) => {
                conn.batch_execute("RELEASE SAVEPOINT client_tx").await?;
                results.push(TxResult::applied(&tx.id, false));
            }
            Err(Failure::Fault(e)) => {
                let _ = conn.batch_execute("ROLLBACK").await;
                return Err(e);
            }
            Err(Failure::Transient(reason)) => {
                conn.batch_execute("ROLLBACK TO SAVEPOINT client_tx; RELEASE SAVEPOINT client_tx")
                    .await?;
                results.push(TxResult::retry(&tx.id, reason.clone()));
                stopped = Some(format!("waiting for transaction {} to be retried", tx.id));
            }
            Err(Failure::Rejected { code, reason, keys }) => {
                conn.batch_execute("ROLLBACK TO SAVEPOINT client_tx")
                    .await?;
                let mut rows = current_rows(conn, schemas, keys).await?;
                if let Some(scope) = scope {
                    // Report only rows the client may read; for the others
                    // the server "has none", and the replica drops its copy.
                    for current in &mut rows {
                        if current
                            .row
                            .as_ref()
                            .is_some_and(|r| !scope.may_read(&current.table, r))
                        {
                            current.row = None;
                        }
                    }
                }
                conn.batch_execute("RELEASE SAVEPOINT client_tx").await?;
                tracing::debug!(client_id, tx = %tx.id, ?code, %reason, "client transaction rejected");
                results.push(TxResult {
                    id: tx.id.clone(),
                    status: WriteStatus::Rejected,
                    duplicate: false,
                    code: Some(code),
                    reason: Some(reason),
                    rows,
                });
            }
        }
    }
    conn.batch_execute("COMMIT").await?;
    let ceiling: String = conn
        .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
        .await?
        .get(0);
    Ok(Applied {
        results,
        floor: floor.parse().ok(),
        ceiling: ceiling.parse().ok(),
    })
}

/// Records the transaction's change ids; false when they were recorded
/// before (the transaction was applied by an earlier send).
async fn record_ids(
    client: &Client,
    client_id: &str,
    tx: &ClientTransaction,
) -> Result<bool, tokio_postgres::Error> {
    let ids: Vec<&str> = tx.changes.iter().map(|c| c.id.as_str()).collect();
    let inserted = client
        .execute(
            "INSERT INTO pgrelay.applied_changes (client_id, change_id, tx_id) \
             SELECT $1::text, unnest($2::text[]), $3::text ON CONFLICT DO NOTHING",
            &[&client_id, &ids, &tx.id],
        )
        .await?;
    Ok(usize::try_from(inserted).is_ok_and(|n| n == ids.len()))
}
