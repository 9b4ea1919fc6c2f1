//! Client writes: applies a client's batch in one PostgreSQL transaction,
//! a savepoint per client transaction, tagged with the client's origin
//! tag (a transactional logical message the replication stream turns into
//! the transaction's `origin`; a one-way tag, so other clients never learn
//! the id), and idempotent per change id: the ids are
//! recorded in `pgrelay.applied_changes` in the same transaction (per
//! token subject and client id), so a batch resent after a lost answer
//! applies nothing twice.

mod applied;
mod batch;
mod current;
mod error;
pub(crate) mod statement;
mod transaction;

pub(crate) use applied::Author;
pub use error::WriteError;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pgrelay_pg::{Pool, PooledClient};
use pgrelay_protocol::{TableSchema, TxResult, WriteBatch, WriteResults};
use tokio::sync::{Semaphore, SemaphorePermit};

use crate::auth::Scope;
use batch::{run_batch, Applied};
use error::describe;
pub(crate) use statement::quote_table;

/// How long a batch may wait for PostgreSQL (for a connection, then for
/// its transaction) before it is answered `retry`: a node cut off from
/// PostgreSQL answers its clients instead of holding them.
const WRITE_DEADLINE: Duration = Duration::from_secs(20);

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
        let applied = tokio::time::timeout(
            WRITE_DEADLINE,
            self.apply_in_transaction(author, batch, schemas, scope),
        )
        .await
        .unwrap_or(Err(WriteError::NoAnswer(WRITE_DEADLINE)));
        let (results, lsn_floor, lsn) = match applied {
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

    /// The answer to a batch while this node has lost PostgreSQL (`why`):
    /// nothing applied, every transaction `retry`, with the reason.
    pub(crate) fn unreachable(batch: &WriteBatch, why: &str) -> WriteResults {
        let reason = format!(
            "this node cannot reach PostgreSQL ({why}); nothing was applied: retry, through another node if there is one"
        );
        WriteResults {
            batch_id: batch.batch_id.clone(),
            lsn: None,
            lsn_floor: None,
            results: batch
                .transactions
                .iter()
                .map(|tx| TxResult::retry(&tx.id, reason.clone()))
                .collect(),
        }
    }

    async fn apply_in_transaction(
        &self,
        author: Author<'_>,
        batch: &WriteBatch,
        schemas: &BTreeMap<String, TableSchema>,
        scope: Option<&Scope>,
    ) -> Result<Applied, WriteError> {
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
            None => return Err(WriteError::Closed),
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
            }),
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
    pub(crate) async fn prune(&self, retention: Duration) -> Result<u64, WriteError> {
        let conn = self.pool.get().await?;
        let deleted = conn
            .execute(
                "DELETE FROM pgrelay.applied_changes WHERE applied_at < now() - make_interval(secs => $1)",
                &[&retention.as_secs_f64()],
            )
            .await
            .map_err(WriteError::sql("pruning pgrelay.applied_changes"))?;
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
