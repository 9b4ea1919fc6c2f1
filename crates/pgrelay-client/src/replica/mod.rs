//! The local SQLite replica. One dedicated thread owns the connection;
//! async code talks to it through a bounded command channel with oneshot
//! replies, so SQLite never blocks the runtime. Each batch of server
//! transactions commits together with the LSN it reaches (promise 2), in
//! WAL journal mode so readers never see half of one.

mod apply;
mod capture;
mod captured;
mod digests;
mod holdable;
mod load;
mod migrations;
mod outbox;
mod rebase;
mod repair;
mod reshape;
mod schema;
mod snapshot;
#[cfg(test)]
mod test_columns;
mod worker;

use std::path::{Path, PathBuf};

use pgrelay_protocol::copy_text::Rows;
use pgrelay_protocol::repair::{CheckSpan, Key, RangeSum};
use pgrelay_protocol::{Lsn, TableSchema, Transaction, Visibility, WriteResults};
use rusqlite::Connection;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use crate::ClientError;
use worker::Worker;

pub use outbox::{OutboxEntry, OutboxReport};
pub(crate) use outbox::{Outcome, Taken};
pub use repair::{digest_ranges, rows_in_range, KeyedRow, Range as KeyRange};

/// What [`Replica::apply_schema`] did.
#[derive(Debug, Default)]
pub struct SchemaApplied {
    /// Tables whose rows must come from a snapshot.
    pub needed: Vec<String>,
    /// Tables kept out of the replica, each with the reason.
    pub refused: Vec<(String, String)>,
}

type Reply<T> = oneshot::Sender<Result<T, ClientError>>;

enum Command {
    State(Reply<ReplicaState>),
    SetClientId(String, Reply<()>),
    ApplySchema(Vec<TableSchema>, Reply<SchemaApplied>),
    ApplyTransactions(Vec<Transaction>, Reply<Applied>),
    Status(Reply<ReplicaStatus>),
    Execute(String, Reply<Executed>),
    TakeBatch(usize, Reply<Taken>),
    SetAside(String, String, Reply<(Outcome, Vec<String>)>),
    RecordResults(WriteResults, Reply<Vec<Outcome>>),
    Outbox(Option<String>, usize, Reply<OutboxReport>),
    Unsent(Reply<bool>),
    SetMeta(&'static str, String, Reply<()>),
    Reset(Reply<()>),
    RequestResync(Vec<String>, Reply<()>),
    BeginSnapshot(Vec<String>, bool, Reply<()>),
    /// Rows inserted, and the rows' buffers back for reuse.
    LoadSnapshot(String, Rows, Reply<(u64, Rows)>),
    EndLoad(String, Reply<()>),
    ClearTable(String, Reply<()>),
    FinishSnapshot(SnapshotDone, Reply<()>),
    RunMigration(pgrelay_protocol::ClientMigration, Reply<Result<(), String>>),
    Repair(RepairStep),
    /// Make the digests kept for repairs: in the background, or (`true`)
    /// all of them now.
    Digests(bool, Reply<()>),
}

/// A step of a repair (see `repair.rs`), run in its own SQLite transaction.
pub(crate) enum RepairStep {
    Digest(
        String,
        Vec<repair::Range>,
        Reply<Option<(Vec<CheckSpan>, RangeSum)>>,
    ),
    Remove(String, Vec<(Option<Key>, Option<Key>)>, Reply<RangeSum>),
    Load(String, String, Reply<RangeSum>),
    Finish(SnapshotDone, Vec<String>, Reply<()>),
}

/// What applying a batch of server transactions did.
pub(crate) struct Applied {
    /// The position reached.
    pub(crate) lsn: Lsn,
    /// Tables the replica does not know: their changes were left out and
    /// the tables recorded for a snapshot, which holds those changes.
    pub(crate) unknown: Vec<String>,
}

/// A verified snapshot, ready to be committed as the replica's state.
pub(crate) struct SnapshotDone {
    pub(crate) resume: Lsn,
    pub(crate) full: bool,
    pub(crate) tables: Vec<String>,
    pub(crate) visibility: Visibility,
}

/// What [`Replica::execute`] did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Executed {
    /// The client transaction the statement's writes make up.
    pub tx_id: String,
    /// Rows the statement wrote to synced tables (now in the outbox).
    pub captured: usize,
    /// Bytes the transaction takes on the wire, sent alone (0 without
    /// writes to synced tables).
    pub bytes: usize,
    /// Frames that carry it: 1, or more for a transaction sent in parts
    /// (0 without writes to synced tables).
    pub frames: usize,
}

/// The replica's identity and position.
#[derive(Clone, Debug)]
pub struct ReplicaState {
    pub client_id: Option<String>,
    /// Commit LSN of the last transaction applied; `None` for a new replica
    /// (or one reset), which hydrates from a snapshot.
    pub lsn: Option<Lsn>,
    /// The server change log this replica follows.
    pub log_id: Option<String>,
    /// Tables waiting for a fresh snapshot.
    pub resync: Vec<String>,
    /// The newest client migration the replica ran (0 for none).
    pub schema_version: i64,
}

#[derive(Clone, Debug, Serialize)]
pub struct TableStatus {
    pub table: String,
    pub rows: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub skipped: Option<String>,
}

/// What `pgrelay client status` prints.
#[derive(Clone, Debug, Serialize)]
pub struct ReplicaStatus {
    pub client_id: Option<String>,
    pub lsn: Option<String>,
    pub tables: Vec<TableStatus>,
}

/// A handle to the replica's thread; cheap to clone.
#[derive(Clone)]
pub struct Replica {
    commands: mpsc::Sender<Command>,
    path: PathBuf,
}

impl Replica {
    /// Opens (creating if needed) the replica at `path` and starts its thread.
    pub fn open(path: &Path) -> Result<Replica, ClientError> {
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        // Statement journals (the capture triggers make SQLite keep one per
        // statement) and temp tables stay in memory: a temp file per
        // statement costs a file creation each time.
        conn.pragma_update(None, "temp_store", "MEMORY")?;
        // Apply, capture and outbox statements together exceed the default
        // 16 cached statements; a miss means parsing SQL again.
        conn.set_prepared_statement_cache_capacity(128);
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        schema::ensure_meta(&conn)?;
        capture::ensure_tables(&conn)?;
        migrations::ensure_table(&conn)?;
        let worker = Worker::open(conn)?;
        let (commands, rx) = mpsc::channel(16);
        std::thread::Builder::new()
            .name("pgrelay-replica".to_owned())
            .spawn(move || worker.run(rx))
            .map_err(|e| ClientError::Replica(format!("starting the replica thread: {e}")))?;
        Ok(Replica {
            commands,
            path: path.to_owned(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, ClientError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(make(tx))
            .await
            .map_err(|_| ClientError::ReplicaClosed)?;
        rx.await.map_err(|_| ClientError::ReplicaClosed)?
    }

    pub async fn state(&self) -> Result<ReplicaState, ClientError> {
        self.call(Command::State).await
    }

    pub async fn set_client_id(&self, id: String) -> Result<(), ClientError> {
        self.call(|r| Command::SetClientId(id, r)).await
    }

    /// Creates missing tables and adds missing columns. Returns the tables
    /// whose rows must come from a snapshot (new to a replica that already
    /// has a position, or with a column whose type changed) and the tables
    /// the replica cannot hold (kept out, with the reason).
    pub async fn apply_schema(
        &self,
        tables: Vec<TableSchema>,
    ) -> Result<SchemaApplied, ClientError> {
        self.call(|r| Command::ApplySchema(tables, r)).await
    }

    /// Applies whole transactions in one SQLite transaction together with
    /// the last one's LSN; returns that LSN. A change for a table the
    /// replica does not know is left out, and the table is fetched by a
    /// snapshot on the next connection.
    pub async fn apply_transactions(&self, txs: Vec<Transaction>) -> Result<Lsn, ClientError> {
        self.apply(txs).await.map(|applied| applied.lsn)
    }

    pub(crate) async fn apply(&self, txs: Vec<Transaction>) -> Result<Applied, ClientError> {
        self.call(|r| Command::ApplyTransactions(txs, r)).await
    }

    /// Runs a client migration in one SQLite transaction with its version;
    /// `Ok(Err(message))` when the migration itself failed (nothing of it
    /// is left).
    pub async fn run_migration(
        &self,
        migration: pgrelay_protocol::ClientMigration,
    ) -> Result<Result<(), String>, ClientError> {
        self.call(|r| Command::RunMigration(migration, r)).await
    }

    pub async fn status(&self) -> Result<ReplicaStatus, ClientError> {
        self.call(Command::Status).await
    }

    /// Runs SQL written by the application (one or more statements) in one
    /// SQLite transaction. Its writes to synced tables are captured in the
    /// outbox as one client transaction, applied by the server all or none.
    /// Works offline. A transaction the protocol cannot carry (over
    /// `MAX_WRITE_CHANGES` changes, over `MAX_TRANSACTION_BYTES` on the
    /// wire, or a change larger than a frame) is rolled back and refused
    /// with [`ClientError::TooLarge`].
    pub async fn execute(&self, sql: impl Into<String>) -> Result<Executed, ClientError> {
        let sql = sql.into();
        self.call(|r| Command::Execute(sql, r)).await
    }

    /// Counts per status and the newest `limit` entries (only those with
    /// `status`, when given: pending, sent, applied, rejected).
    pub async fn outbox(
        &self,
        status: Option<String>,
        limit: usize,
    ) -> Result<OutboxReport, ClientError> {
        self.call(|r| Command::Outbox(status, limit, r)).await
    }

    /// Whether any local write still waits for the server's answer.
    pub async fn has_unsent_writes(&self) -> Result<bool, ClientError> {
        self.call(Command::Unsent).await
    }

    /// Forgets the replica's position so the next connection hydrates it
    /// from a snapshot (`pgrelay client reset`). Unsent local writes stay.
    pub async fn reset(&self) -> Result<(), ClientError> {
        self.call(Command::Reset).await
    }

    pub(crate) async fn set_meta(
        &self,
        key: &'static str,
        value: String,
    ) -> Result<(), ClientError> {
        self.call(|r| Command::SetMeta(key, value, r)).await
    }

    pub(crate) async fn request_resync(&self, tables: Vec<String>) -> Result<(), ClientError> {
        self.call(|r| Command::RequestResync(tables, r)).await
    }

    pub(crate) async fn begin_snapshot(
        &self,
        tables: Vec<String>,
        full: bool,
    ) -> Result<(), ClientError> {
        self.call(|r| Command::BeginSnapshot(tables, full, r)).await
    }

    /// Queues a chunk of snapshot rows for insertion and returns where
    /// the row count (and the emptied buffer) will arrive, so the caller
    /// can go on receiving.
    pub(crate) async fn send_load(
        &self,
        table: String,
        rows: Rows,
    ) -> Result<oneshot::Receiver<Result<(u64, Rows), ClientError>>, ClientError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(Command::LoadSnapshot(table, rows, tx))
            .await
            .map_err(|_| ClientError::ReplicaClosed)?;
        Ok(rx)
    }

    /// Every chunk of `table` was sent: its rows are committed (an error
    /// means some were lost).
    pub(crate) async fn end_load(&self, table: String) -> Result<(), ClientError> {
        self.call(|r| Command::EndLoad(table, r)).await
    }

    pub(crate) async fn clear_table(&self, table: String) -> Result<(), ClientError> {
        self.call(|r| Command::ClearTable(table, r)).await
    }

    pub(crate) async fn finish_snapshot(&self, done: SnapshotDone) -> Result<(), ClientError> {
        self.call(|r| Command::FinishSnapshot(done, r)).await
    }

    pub(crate) async fn take_batch(&self, max_txs: usize) -> Result<Taken, ClientError> {
        self.call(|r| Command::TakeBatch(max_txs, r)).await
    }

    /// Rejects a transaction the server refused whole; returns the tables
    /// to fetch again (see `outbox::set_aside`).
    pub(crate) async fn set_aside(
        &self,
        tx_id: String,
        reason: String,
    ) -> Result<(Outcome, Vec<String>), ClientError> {
        self.call(|r| Command::SetAside(tx_id, reason, r)).await
    }

    pub(crate) async fn record_results(
        &self,
        results: WriteResults,
    ) -> Result<Vec<Outcome>, ClientError> {
        self.call(|r| Command::RecordResults(results, r)).await
    }

    /// Makes the range digests a repair's first round uses (normally made
    /// in the background once the replica has caught up) and returns once
    /// every synced table has them.
    pub async fn build_digests(&self) -> Result<(), ClientError> {
        self.call(|r| Command::Digests(true, r)).await
    }

    /// Starts making the range digests in the background, while the
    /// replica has nothing else to do.
    pub(crate) async fn start_digests(&self) -> Result<(), ClientError> {
        self.call(|r| Command::Digests(false, r)).await
    }

    /// Digests key ranges of a table for a repair (`None`: not held).
    pub(crate) async fn repair_digest(
        &self,
        table: String,
        ranges: Vec<repair::Range>,
    ) -> Result<Option<(Vec<CheckSpan>, RangeSum)>, ClientError> {
        self.call(|r| Command::Repair(RepairStep::Digest(table, ranges, r)))
            .await
    }

    /// Removes the rows of ranges the server replaces.
    pub(crate) async fn repair_remove(
        &self,
        table: String,
        ranges: Vec<(Option<Key>, Option<Key>)>,
    ) -> Result<RangeSum, ClientError> {
        self.call(|r| Command::Repair(RepairStep::Remove(table, ranges, r)))
            .await
    }

    /// Inserts rows the server sent for replaced ranges.
    pub(crate) async fn repair_load(
        &self,
        table: String,
        copy: String,
    ) -> Result<RangeSum, ClientError> {
        self.call(|r| Command::Repair(RepairStep::Load(table, copy, r)))
            .await
    }

    /// Completes a repair like a full snapshot; `refetch` tables are
    /// fetched again by the next connection.
    pub(crate) async fn repair_finish(
        &self,
        done: SnapshotDone,
        refetch: Vec<String>,
    ) -> Result<(), ClientError> {
        self.call(|r| Command::Repair(RepairStep::Finish(done, refetch, r)))
            .await
    }
}
