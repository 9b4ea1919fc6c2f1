//! Client writes: applies a client's batch in one PostgreSQL transaction,
//! a savepoint per client transaction, tagged with the client's origin
//! tag (a transactional logical message the replication stream turns into
//! the transaction's `origin`; a one-way tag, so other clients never learn
//! the id), and idempotent per change id: the ids are
//! recorded in `pgrelay.applied_changes` in the same transaction (per
//! token subject and client id), so a batch resent after a lost answer
//! applies nothing twice.

mod applied;
mod error;
pub(crate) mod statement;

pub(crate) use applied::Author;
pub use error::WriteError;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::join_all;
use pgrelay_pg::{Pool, PooledClient};
use pgrelay_protocol::{
    ClientTransaction, CurrentRow, Lsn, Op, RejectCode, Row, TableSchema, TxResult, WriteBatch,
    WriteResults, WriteStatus,
};
use tokio::sync::{Semaphore, SemaphorePermit};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Statement};

use crate::auth::Scope;
use crate::ServerError;
pub(crate) use statement::quote_table;
use applied::record_ids;
use statement::{plan, select_current, Planned};

/// Batches applied at the same time at most (each holds a connection).
pub(crate) const MAX_CONCURRENT_BATCHES: usize = 8;

/// Batches of one client applied at the same time at most: a client that
/// sends many large batches at once waits for its own, and the rest of the
/// pool stays free for the others.
const MAX_BATCHES_PER_CLIENT: usize = 2;

/// Transactions arriving in `write_part` frames that the sessions of this
/// node hold at once, each up to `MAX_TRANSACTION_BYTES` of frames: the
/// bound on memory for unfinished large writes. One more is answered
/// `retry`.
const MAX_ASSEMBLIES: usize = 8;

pub(crate) struct Writer {
    /// Shared with the server's other parts; a batch borrows one
    /// connection, whose statements stay prepared for the next batch.
    pool: Pool,
    permits: Semaphore,
    /// Each client's share of `permits`, while it has batches in flight.
    shares: Mutex<HashMap<String, Arc<Semaphore>>>,
    /// One permit per transaction being assembled from parts.
    assemblies: Semaphore,
    /// Tables under a version check: qualified name → version column.
    versions: BTreeMap<String, String>,
}

/// Why a client transaction did not apply; `Fault` ends the batch.
enum Failure {
    Rejected {
        code: RejectCode,
        reason: String,
        keys: Vec<(String, Row)>,
    },
    /// Worth another try: a deadlock or serialization failure.
    Transient(String),
    /// The connection or transaction is lost.
    Fault(tokio_postgres::Error),
}

impl Writer {
    pub(crate) fn new(pool: Pool, versions: BTreeMap<String, String>) -> Writer {
        Writer {
            pool,
            permits: Semaphore::new(MAX_CONCURRENT_BATCHES),
            shares: Mutex::new(HashMap::new()),
            assemblies: Semaphore::new(MAX_ASSEMBLIES),
            versions,
        }
    }

    /// A place for one more transaction arriving in parts; `None` when the
    /// node holds as many as it allows.
    pub(crate) fn assembly_slot(&self) -> Option<SemaphorePermit<'_>> {
        self.assemblies.try_acquire().ok()
    }

    /// Applies a checked batch for `author`. Never fails as a whole: a
    /// fault on the server answers `retry` for what did not commit.
    pub(crate) async fn apply(
        &self,
        author: Author<'_>,
        batch: &WriteBatch,
        schemas: &BTreeMap<String, TableSchema>,
        scope: Option<&Scope>,
    ) -> WriteResults {
        let client_id = author.client_id;
        let (results, lsn_floor, lsn) = match self
            .apply_in_transaction(author, batch, schemas, scope)
            .await
        {
            Ok(applied) => (applied.results, applied.floor, applied.ceiling),
            Err(e) => {
                tracing::warn!(client_id, error = %e, "applying a write batch failed; the client will retry");
                let results = batch
                    .transactions
                    .iter()
                    .map(|tx| TxResult::retry(&tx.id, format!("server fault: {e}")))
                    .collect();
                (results, None, None)
            }
        };
        WriteResults {
            batch_id: batch.batch_id.clone(),
            lsn,
            lsn_floor,
            results,
        }
    }

    async fn apply_in_transaction(
        &self,
        author: Author<'_>,
        batch: &WriteBatch,
        schemas: &BTreeMap<String, TableSchema>,
        scope: Option<&Scope>,
    ) -> Result<Applied, ServerError> {
        let client_id = author.client_id;
        let share = self.share(client_id);
        let _own = share.acquire().await.map_err(|_| WriteError::Closed)?;
        let _permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| WriteError::Closed)?;
        let mut borrowed = Borrowed(Some(self.pool.get().await?));
        let outcome = match borrowed.0.as_mut() {
            Some(conn) => run_batch(conn, author, batch, schemas, &self.versions, scope).await,
            None => return Err(WriteError::Closed.into()),
        };
        match outcome {
            Ok(results) => {
                borrowed.give_back();
                Ok(results)
            }
            // The connection may be mid-transaction: `borrowed` closes it
            // rather than hand it to the next batch.
            Err(source) => Err(WriteError::Batch {
                client_id: client_id.to_owned(),
                reason: describe(&source),
            }
            .into()),
        }
    }

    /// The client's share of the pool, given back (forgotten) when its last
    /// batch ends.
    fn share(&self, client_id: &str) -> Share<'_> {
        let mut shares = self.shares.lock().unwrap_or_else(|p| p.into_inner());
        let semaphore = shares
            .entry(client_id.to_owned())
            .or_insert_with(|| Arc::new(Semaphore::new(MAX_BATCHES_PER_CLIENT)));
        Share {
            writer: self,
            client_id: client_id.to_owned(),
            semaphore: Arc::clone(semaphore),
        }
    }

    /// Deletes the record of change ids applied longer ago than `retention`;
    /// a client that resends something older than that is not recognised.
    pub(crate) async fn prune(&self, retention: Duration) -> Result<u64, ServerError> {
        let conn = self.pool.get().await?;
        let deleted = conn
            .execute(
                "DELETE FROM pgrelay.applied_changes WHERE applied_at < now() - make_interval(secs => $1)",
                &[&retention.as_secs_f64()],
            )
            .await
            .map_err(ServerError::sql("pruning pgrelay.applied_changes"))?;
        Ok(deleted)
    }
}

/// A client's claim on its share of the pool; the last one out removes
/// the client's entry.
struct Share<'a> {
    writer: &'a Writer,
    client_id: String,
    semaphore: Arc<Semaphore>,
}

impl std::ops::Deref for Share<'_> {
    type Target = Semaphore;
    fn deref(&self) -> &Semaphore {
        &self.semaphore
    }
}

impl Drop for Share<'_> {
    fn drop(&mut self) {
        let mut shares = self.writer.shares.lock().unwrap_or_else(|p| p.into_inner());
        // Two references: this one and the map's.
        if Arc::strong_count(&self.semaphore) == 2 {
            shares.remove(&self.client_id);
        }
    }
}

/// A connection borrowed for one batch. It goes back to the pool only
/// when the batch finished (committed or rolled back); dropped any other
/// way (a fault, or the batch's future dropped mid-transaction when its
/// session ends) it is closed, so no batch inherits an open transaction.
struct Borrowed(Option<PooledClient>);

impl Borrowed {
    fn give_back(mut self) {
        // Dropping the pool's object returns it to the pool.
        drop(self.0.take());
    }
}

impl Drop for Borrowed {
    fn drop(&mut self) {
        if let Some(conn) = self.0.take() {
            drop(PooledClient::take(conn));
        }
    }
}

/// A batch's answers and the WAL bounds of its commit (read-your-writes).
struct Applied {
    results: Vec<TxResult>,
    floor: Option<Lsn>,
    ceiling: Option<Lsn>,
}

async fn run_batch(
    conn: &mut PooledClient,
    author: Author<'_>,
    batch: &WriteBatch,
    schemas: &BTreeMap<String, TableSchema>,
    versions: &BTreeMap<String, String>,
    scope: Option<&Scope>,
) -> Result<Applied, tokio_postgres::Error> {
    let client_id = author.client_id;
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
            record_ids(conn, author, tx)
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

async fn apply_tx(
    conn: &mut PooledClient,
    tx: &ClientTransaction,
    schemas: &BTreeMap<String, TableSchema>,
    versions: &BTreeMap<String, String>,
    scope: Option<&Scope>,
) -> Result<(), Failure> {
    let mut planned: Vec<(&TableSchema, Op, Planned)> = Vec::with_capacity(tx.changes.len());
    let mut keys: Vec<(String, Row)> = Vec::new();
    let mut refused = None;
    for change in &tx.changes {
        let Some(table) = schemas.get(&change.table) else {
            refused.get_or_insert((
                RejectCode::UnknownTable,
                format!(
                    "table {:?} is not synced by this server",
                    change.table.chars().take(64).collect::<String>()
                ),
            ));
            continue;
        };
        let rule = scope.map(|s| s.write(&table.name));
        match plan(table, versions.get(&table.name).map(String::as_str), change) {
            Ok(Some(mut p)) => {
                match rule {
                    None => {}
                    Some(Some(rule)) => statement::guard(&mut p, change.op, rule),
                    Some(None) => {
                        // Planned only for its keys: the rejection reports
                        // those rows, so the replica rolls back to them.
                        keys.extend(p.keys.iter().map(|k| (table.name.clone(), k.clone())));
                        refused.get_or_insert((
                            RejectCode::Forbidden,
                            format!("{} is not writable with your token", table.name),
                        ));
                        continue;
                    }
                }
                keys.extend(p.keys.iter().map(|k| (table.name.clone(), k.clone())));
                planned.push((table, change.op, p));
            }
            Ok(None) => {}
            Err(invalid) => {
                // Its rows too: the client wrote them locally and puts them
                // back from the rejection.
                keys.extend(
                    statement::touched_keys(table, change)
                        .into_iter()
                        .map(|k| (table.name.clone(), k)),
                );
                refused.get_or_insert((invalid.code, invalid.reason));
            }
        }
    }
    if let Some((code, reason)) = refused {
        return Err(Failure::Rejected { code, reason, keys });
    }
    // Prepare what this connection has not seen yet, then run the changes
    // pipelined: one round trip for the whole client transaction.
    let mut statements: Vec<Statement> = Vec::with_capacity(planned.len());
    for (_, _, p) in &planned {
        let statement = conn
            .prepare_cached(&p.sql)
            .await
            .map_err(|e| classify(e, &keys, scope.is_some()))?;
        statements.push(statement);
    }
    let client: &Client = conn;
    let runs = planned
        .iter()
        .zip(&statements)
        .map(|((_, _, p), statement)| async move {
            let params: Vec<&(dyn ToSql + Sync)> =
                p.params.iter().map(|v| v as &(dyn ToSql + Sync)).collect();
            if p.check_returned {
                // Each returned row says whether the row as written is still
                // one the client may write.
                let rows = client.query(statement, &params).await?;
                let allowed = rows.iter().all(|r| r.get::<_, bool>(0));
                return Ok((rows.len() as u64, allowed));
            }
            client
                .execute(statement, &params)
                .await
                .map(|count| (count, true))
        });
    let counts = join_all(runs).await;
    for ((table, op, p), count) in planned.iter().zip(counts) {
        let (count, allowed) = count.map_err(|e| classify(e, &keys, scope.is_some()))?;
        let shown = || p.keys.first().map(show_key).unwrap_or_default();
        if !allowed {
            return Err(Failure::Rejected {
                code: RejectCode::Forbidden,
                reason: format!(
                    "{} row {}: after this {} it would be outside what your token may write",
                    table.name,
                    shown(),
                    op.as_str()
                ),
                keys,
            });
        }
        if count > 0 || !p.must_match {
            continue;
        }
        let Some(key) = p.keys.first() else { continue };
        let current = read_row(client, table, key)
            .await
            .map_err(|e| match e.as_db_error() {
                Some(_) => Failure::Transient(describe(&e)),
                None => Failure::Fault(e),
            })?;
        if let Some(scope) = scope {
            // Under a token's rules a row the token cannot read gets the
            // same answer as a row that does not exist, so a refusal tells
            // nothing of other tenants' rows.
            let visible = current
                .as_ref()
                .filter(|row| scope.may_read(&table.name, row));
            let Some(row) = visible else {
                return Err(Failure::Rejected {
                    code: RejectCode::Forbidden,
                    reason: format!(
                        "{} row {} is not there or not yours to write",
                        table.name,
                        shown()
                    ),
                    keys,
                });
            };
            if scope.write(&table.name).is_some_and(|rule| !rule.eval(row)) {
                return Err(Failure::Rejected {
                    code: RejectCode::Forbidden,
                    reason: format!(
                        "{} row {} is outside what your token may write",
                        table.name,
                        shown()
                    ),
                    keys,
                });
            }
        }
        let reason = match (&current, op) {
            // Deleting a row that is already gone is done.
            (None, Op::Delete) => continue,
            (None, _) => format!(
                "{} row {} no longer exists on the server",
                table.name,
                show_key(key)
            ),
            (Some(row), _) => match versions.get(&table.name) {
                Some(column) => format!(
                    "{} row {} changed on the server: the write was based on {column} = {}, the server has {column} = {}",
                    table.name,
                    show_key(key),
                    show_value(p.params.last().and_then(|v| v.as_deref())),
                    show_value(row.get(column).and_then(|v| v.as_deref()))
                ),
                None => format!("{} row {} was not found", table.name, show_key(key)),
            },
        };
        return Err(Failure::Rejected {
            code: RejectCode::Conflict,
            reason,
            keys,
        });
    }
    Ok(())
}

/// `scoped`: the writer's token sees only some rows, and PostgreSQL's
/// detail (which may quote a conflicting row of another tenant) is left out.
fn classify(error: tokio_postgres::Error, keys: &[(String, Row)], scoped: bool) -> Failure {
    let Some(db) = error.as_db_error() else {
        return Failure::Fault(error);
    };
    let state = db.code();
    let class = &state.code()[..2];
    let code = if *state == SqlState::T_R_DEADLOCK_DETECTED
        || *state == SqlState::T_R_SERIALIZATION_FAILURE
        || *state == SqlState::LOCK_NOT_AVAILABLE
        || *state == SqlState::QUERY_CANCELED
    {
        return Failure::Transient(db.message().to_owned());
    } else if class == "23" {
        RejectCode::ConstraintViolation
    } else if class == "22" {
        RejectCode::InvalidValue
    } else if *state == SqlState::UNDEFINED_COLUMN {
        RejectCode::UnknownColumn
    } else if *state == SqlState::UNDEFINED_TABLE {
        RejectCode::UnknownTable
    } else if class == "08" || class == "57" || class == "53" || class == "58" || class == "XX" {
        // Connection, shutdown, resources, system: not the write's fault.
        return Failure::Fault(error);
    } else {
        RejectCode::Database
    };
    let mut reason = db.message().to_owned();
    if let Some(detail) = db.detail().filter(|_| !scoped) {
        reason.push_str(": ");
        reason.push_str(detail);
    }
    Failure::Rejected {
        code,
        reason,
        keys: keys.to_vec(),
    }
}

async fn read_row(
    client: &Client,
    table: &TableSchema,
    key: &Row,
) -> Result<Option<Row>, tokio_postgres::Error> {
    let (sql, params) = select_current(table, key);
    let params: Vec<&(dyn ToSql + Sync)> =
        params.iter().map(|v| v as &(dyn ToSql + Sync)).collect();
    let row = client.query_opt(sql.as_str(), &params).await?;
    Ok(row.map(|row| {
        table
            .columns
            .iter()
            .enumerate()
            .map(|(i, c)| (c.name.clone(), row.get::<_, Option<String>>(i)))
            .collect()
    }))
}

/// The server's current version of each row a rejected transaction touched.
async fn current_rows(
    client: &Client,
    schemas: &BTreeMap<String, TableSchema>,
    keys: Vec<(String, Row)>,
) -> Result<Vec<CurrentRow>, tokio_postgres::Error> {
    let mut rows: Vec<CurrentRow> = Vec::new();
    for (table_name, key) in keys {
        if rows.iter().any(|r| r.table == table_name && r.key == key) {
            continue;
        }
        let Some(table) = schemas.get(&table_name) else {
            continue;
        };
        // A key value the table's type refuses names no row.
        let row = match read_row(client, table, &key).await {
            Ok(row) => row,
            Err(e) if e.as_db_error().is_some() => {
                client
                    .batch_execute("ROLLBACK TO SAVEPOINT client_tx")
                    .await?;
                None
            }
            Err(e) => return Err(e),
        };
        rows.push(CurrentRow {
            table: table_name,
            key,
            row,
        });
    }
    Ok(rows)
}

fn show_key(key: &Row) -> String {
    key.iter()
        .map(|(k, v)| format!("{k}={}", show_value(v.as_deref())))
        .collect::<Vec<_>>()
        .join(",")
}

fn show_value(v: Option<&str>) -> String {
    match v {
        Some(v) => v.chars().take(64).collect(),
        None => "NULL".to_owned(),
    }
}

/// PostgreSQL's own words for an error (tokio-postgres prints "db error").
fn describe(error: &tokio_postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => error.to_string(),
    }
}
