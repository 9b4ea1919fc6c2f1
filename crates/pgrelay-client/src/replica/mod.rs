//! The local SQLite replica. One dedicated thread owns the connection;
//! async code talks to it through a bounded command channel with oneshot
//! replies, so SQLite never blocks the runtime. Each batch of server
//! transactions commits together with the LSN it reaches (promise 2), in
//! WAL journal mode so readers never see half of one.

mod apply;
mod capture;
mod outbox;
mod schema;
mod snapshot;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use pgrelay_protocol::{Lsn, TableSchema, Transaction, Visibility, WriteResults};
use rusqlite::{Connection, TransactionBehavior};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use crate::ClientError;

pub use outbox::{OutboxEntry, OutboxReport};
pub(crate) use outbox::{Outcome, Taken};

type Reply<T> = oneshot::Sender<Result<T, ClientError>>;

enum Command {
    State(Reply<ReplicaState>),
    SetClientId(String, Reply<()>),
    ApplySchema(Vec<TableSchema>, Reply<Vec<String>>),
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
    LoadSnapshot(String, Vec<u8>, Reply<u64>),
    ClearTable(String, Reply<()>),
    FinishSnapshot(SnapshotDone, Reply<()>),
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
        let filters = snapshot::filters(&conn)?;
        let mut worker = Worker {
            conn,
            tables: HashMap::new(),
            filters,
        };
        worker.reload_tables()?;
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
    /// whose rows must come from a snapshot: new to a replica that already
    /// has a position, or with a column whose type changed.
    pub async fn apply_schema(&self, tables: Vec<TableSchema>) -> Result<Vec<String>, ClientError> {
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
    /// the row count will arrive, so the caller can go on receiving.
    pub(crate) async fn send_load(
        &self,
        table: String,
        rows: Vec<u8>,
    ) -> Result<oneshot::Receiver<Result<u64, ClientError>>, ClientError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(Command::LoadSnapshot(table, rows, tx))
            .await
            .map_err(|_| ClientError::ReplicaClosed)?;
        Ok(rx)
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
}

struct Worker {
    conn: Connection,
    tables: HashMap<String, TableSchema>,
    /// Transactions that snapshots already hold, skipped when they arrive.
    filters: Vec<snapshot::Filter>,
}

impl Worker {
    fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        while let Some(command) = rx.blocking_recv() {
            match command {
                Command::State(reply) => {
                    let _ = reply.send(self.state());
                }
                Command::SetClientId(id, reply) => {
                    let _ = reply.send(schema::write_meta(&self.conn, "client_id", &id));
                }
                Command::ApplySchema(tables, reply) => {
                    let _ = reply.send(self.apply_schema(&tables));
                }
                Command::ApplyTransactions(txs, reply) => {
                    let _ = reply.send(self.apply_transactions(&txs));
                }
                Command::Status(reply) => {
                    let _ = reply.send(self.status());
                }
                Command::Execute(sql, reply) => {
                    let _ = reply.send(self.execute(&sql));
                }
                Command::TakeBatch(max_txs, reply) => {
                    let _ = reply.send(self.take_batch(max_txs));
                }
                Command::SetAside(tx_id, reason, reply) => {
                    let _ =
                        reply.send(self.in_tx(|conn, tables| {
                            outbox::set_aside(conn, tables, &tx_id, &reason)
                        }));
                }
                Command::RecordResults(results, reply) => {
                    let _ = reply.send(self.record_results(&results));
                }
                Command::Outbox(status, limit, reply) => {
                    let _ = reply.send(outbox::report(&self.conn, status.as_deref(), limit));
                }
                Command::Unsent(reply) => {
                    let _ = reply.send(outbox::unsent(&self.conn));
                }
                Command::SetMeta(key, value, reply) => {
                    let _ = reply.send(schema::write_meta(&self.conn, key, &value));
                }
                Command::Reset(reply) => {
                    let result = self.in_tx(|conn, _| snapshot::reset(conn));
                    self.filters.clear();
                    let _ = reply.send(result);
                }
                Command::RequestResync(tables, reply) => {
                    let _ =
                        reply.send(self.in_tx(|conn, _| snapshot::request_resync(conn, &tables)));
                }
                Command::BeginSnapshot(tables, full, reply) => {
                    if full {
                        self.filters.clear();
                    }
                    let _ = reply.send(self.in_tx(|conn, known| {
                        snapshot::quietly(conn, || snapshot::begin(conn, known, &tables, full))
                    }));
                }
                Command::LoadSnapshot(table, rows, reply) => {
                    let _ = reply.send(self.in_tx(|conn, known| {
                        snapshot::quietly(conn, || snapshot::load(conn, known, &table, &rows))
                    }));
                }
                Command::ClearTable(table, reply) => {
                    let _ = reply.send(self.in_tx(|conn, known| {
                        snapshot::quietly(conn, || snapshot::clear(conn, known, &table))
                    }));
                }
                Command::FinishSnapshot(done, reply) => {
                    let result = self.in_tx(|conn, known| {
                        snapshot::quietly(conn, || {
                            snapshot::finish(
                                conn,
                                known,
                                done.resume,
                                done.full,
                                &done.tables,
                                &done.visibility,
                            )
                        })
                    });
                    let _ = reply.send(result.and_then(|()| {
                        self.filters = snapshot::filters(&self.conn)?;
                        Ok(())
                    }));
                }
            }
        }
    }

    fn reload_tables(&mut self) -> Result<(), ClientError> {
        self.tables = schema::load_tables(&self.conn)?
            .into_iter()
            .map(|t| (t.name.clone(), t))
            .collect();
        Ok(())
    }

    /// Runs `work` in one immediate SQLite transaction.
    fn in_tx<T>(
        &mut self,
        work: impl FnOnce(&Connection, &HashMap<String, TableSchema>) -> Result<T, ClientError>,
    ) -> Result<T, ClientError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let value = work(&tx, &self.tables)?;
        tx.commit()?;
        Ok(value)
    }

    fn state(&self) -> Result<ReplicaState, ClientError> {
        let client_id = schema::read_meta(&self.conn, "client_id")?;
        let pending = snapshot::pending(&self.conn)?.unwrap_or_default();
        let lsn = schema::read_meta(&self.conn, "lsn")?
            .map(|s| s.parse::<Lsn>())
            .transpose()
            .map_err(|e| ClientError::Replica(format!("stored LSN: {e}")))?
            .filter(|_| !pending.full);
        let log_id = schema::read_meta(&self.conn, "log_id")?;
        Ok(ReplicaState {
            client_id,
            lsn,
            log_id,
            resync: pending.tables,
        })
    }

    fn apply_schema(&mut self, tables: &[TableSchema]) -> Result<Vec<String>, ClientError> {
        let positioned = self.state()?.lsn.is_some();
        let mut needed = Vec::new();
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        for table in tables {
            let retyped = match self.tables.get(&table.name) {
                None => table.skipped.is_none(),
                Some(known) => {
                    table.skipped.is_none()
                        && (known.skipped.is_some()
                            || table.backfilled.iter().any(|c| known.column(c).is_none())
                            || table.columns.iter().any(|c| {
                                known.column(&c.name).is_some_and(|k| {
                                    k.type_oid != c.type_oid || k.pg_type != c.pg_type
                                })
                            }))
                }
            };
            if retyped && positioned {
                needed.push(table.name.clone());
            }
            schema::apply_table(&tx, table)?;
        }
        tx.commit()?;
        self.reload_tables()?;
        Ok(needed)
    }

    fn apply_transactions(&mut self, txs: &[Transaction]) -> Result<Applied, ClientError> {
        let current = self.state()?.lsn.unwrap_or(Lsn::ZERO);
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut reached = current;
        let mut unknown: Vec<String> = Vec::new();
        capture::set_applying(&tx, true)?;
        for server_tx in txs {
            // A transaction at or below the stored position is already here.
            if server_tx.lsn <= reached {
                continue;
            }
            let skipped = snapshot::skipped(&self.filters, server_tx);
            for change in &server_tx.changes {
                if skipped.contains(&change.table.as_str()) {
                    continue;
                }
                if !self.tables.contains_key(&change.table) {
                    // Its schema never arrived, so it cannot be placed. The
                    // table's snapshot, taken later, holds this change.
                    if !unknown.contains(&change.table) {
                        unknown.push(change.table.clone());
                    }
                    continue;
                }
                apply::apply_change(&tx, &self.tables, change).map_err(|e| {
                    ClientError::Replica(format!("applying transaction {}: {e}", server_tx.lsn))
                })?;
            }
            reached = server_tx.lsn;
        }
        if reached > current {
            schema::write_meta(&tx, "lsn", &reached.to_string())?;
            snapshot::expire(&tx, &mut self.filters, reached)?;
        }
        if !unknown.is_empty() {
            // In the same transaction as the position that passes them.
            snapshot::request_resync(&tx, &unknown)?;
        }
        capture::set_applying(&tx, false)?;
        tx.commit()?;
        Ok(Applied {
            lsn: reached,
            unknown,
        })
    }

    fn execute(&mut self, sql: &str) -> Result<Executed, ClientError> {
        let tx_id = format!(
            "tx-{:016x}{:016x}",
            rand::random::<u64>(),
            rand::random::<u64>()
        );
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        capture::set_tx_id(&tx, Some(&tx_id))?;
        tx.execute_batch(sql)?;
        capture::set_tx_id(&tx, None)?;
        let captured: i64 = tx.query_row(
            "SELECT count(*) FROM _pgrelay_outbox WHERE tx_id = ?1",
            [&tx_id],
            |r| r.get(0),
        )?;
        let (bytes, frames) = if captured > 0 {
            // Measured as it will be sent: what the protocol cannot carry
            // is refused now (dropping `tx` rolls it back), never accepted
            // here and lost later.
            let encoded = outbox::encode_captured(&tx, &self.tables, &tx_id)?;
            let layout = pgrelay_protocol::layout(Some(&outbox::new_batch_id()), &encoded)?;
            (layout.bytes(), layout.frames())
        } else {
            (0, 0)
        };
        tx.commit()?;
        Ok(Executed {
            tx_id,
            captured: captured as usize,
            bytes,
            frames,
        })
    }

    fn take_batch(&mut self, max_txs: usize) -> Result<Taken, ClientError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let taken = outbox::take_batch(&tx, &self.tables, max_txs)?;
        tx.commit()?;
        Ok(taken)
    }

    fn record_results(&mut self, results: &WriteResults) -> Result<Vec<Outcome>, ClientError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        capture::set_applying(&tx, true)?;
        let outcomes = outbox::record_results(&tx, &self.tables, results)?;
        capture::set_applying(&tx, false)?;
        tx.commit()?;
        Ok(outcomes)
    }

    fn status(&self) -> Result<ReplicaStatus, ClientError> {
        let state = self.state()?;
        let mut tables: Vec<TableStatus> = Vec::new();
        for table in self.tables.values() {
            let rows = match table.skipped {
                Some(_) => None,
                None => Some(schema::row_count(&self.conn, table.sqlite_name())?),
            };
            tables.push(TableStatus {
                table: table.name.clone(),
                rows,
                skipped: table.skipped.clone(),
            });
        }
        tables.sort_by(|a, b| a.table.cmp(&b.table));
        Ok(ReplicaStatus {
            client_id: state.client_id,
            lsn: state.lsn.map(|l| l.to_string()),
            tables,
        })
    }
}
