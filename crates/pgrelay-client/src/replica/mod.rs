//! The local SQLite replica. One dedicated thread owns the connection;
//! async code talks to it through a bounded command channel with oneshot
//! replies, so SQLite never blocks the runtime. Each batch of server
//! transactions commits together with the LSN it reaches (promise 2), in
//! WAL journal mode so readers never see half of one.

mod apply;
mod capture;
mod outbox;
mod schema;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use pgrelay_protocol::{Lsn, TableSchema, Transaction, WriteBatch, WriteResults};
use rusqlite::{Connection, TransactionBehavior};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use crate::ClientError;

pub(crate) use outbox::Outcome;
pub use outbox::{OutboxEntry, OutboxReport};

type Reply<T> = oneshot::Sender<Result<T, ClientError>>;

enum Command {
    State(Reply<ReplicaState>),
    SetClientId(String, Reply<()>),
    ApplySchema(Vec<TableSchema>, Reply<()>),
    ApplyTransactions(Vec<Transaction>, Reply<Lsn>),
    Status(Reply<ReplicaStatus>),
    Execute(String, Reply<Executed>),
    TakeBatch(usize, Reply<(Option<WriteBatch>, Vec<Outcome>)>),
    RecordResults(WriteResults, Reply<Vec<Outcome>>),
    Outbox(Option<String>, usize, Reply<OutboxReport>),
    Unsent(Reply<bool>),
}

/// What [`Replica::execute`] did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Executed {
    /// The client transaction the statement's writes make up.
    pub tx_id: String,
    /// Rows the statement wrote to synced tables (now in the outbox).
    pub captured: usize,
}

/// The replica's identity and position.
#[derive(Clone, Debug)]
pub struct ReplicaState {
    pub client_id: Option<String>,
    /// Commit LSN of the last transaction applied; `None` for a new replica.
    pub lsn: Option<Lsn>,
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
        let mut worker = Worker {
            conn,
            tables: HashMap::new(),
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

    /// Creates missing tables and adds missing columns.
    pub async fn apply_schema(&self, tables: Vec<TableSchema>) -> Result<(), ClientError> {
        self.call(|r| Command::ApplySchema(tables, r)).await
    }

    /// Applies whole transactions in one SQLite transaction together with
    /// the last one's LSN; returns that LSN.
    pub async fn apply_transactions(&self, txs: Vec<Transaction>) -> Result<Lsn, ClientError> {
        self.call(|r| Command::ApplyTransactions(txs, r)).await
    }

    pub async fn status(&self) -> Result<ReplicaStatus, ClientError> {
        self.call(Command::Status).await
    }

    /// Runs SQL written by the application (one or more statements) in one
    /// SQLite transaction. Its writes to synced tables are captured in the
    /// outbox as one client transaction, applied by the server all or none.
    /// Works offline.
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

    pub(crate) async fn take_batch(
        &self,
        max_txs: usize,
    ) -> Result<(Option<WriteBatch>, Vec<Outcome>), ClientError> {
        self.call(|r| Command::TakeBatch(max_txs, r)).await
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
                Command::RecordResults(results, reply) => {
                    let _ = reply.send(self.record_results(&results));
                }
                Command::Outbox(status, limit, reply) => {
                    let _ = reply.send(outbox::report(&self.conn, status.as_deref(), limit));
                }
                Command::Unsent(reply) => {
                    let _ = reply.send(outbox::unsent(&self.conn));
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

    fn state(&self) -> Result<ReplicaState, ClientError> {
        let client_id = schema::read_meta(&self.conn, "client_id")?;
        let lsn = schema::read_meta(&self.conn, "lsn")?
            .map(|s| s.parse::<Lsn>())
            .transpose()
            .map_err(|e| ClientError::Replica(format!("stored LSN: {e}")))?;
        Ok(ReplicaState { client_id, lsn })
    }

    fn apply_schema(&mut self, tables: &[TableSchema]) -> Result<(), ClientError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        for table in tables {
            schema::apply_table(&tx, table)?;
        }
        tx.commit()?;
        self.reload_tables()
    }

    fn apply_transactions(&mut self, txs: &[Transaction]) -> Result<Lsn, ClientError> {
        let current = self.state()?.lsn.unwrap_or(Lsn::ZERO);
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut reached = current;
        capture::set_applying(&tx, true)?;
        for server_tx in txs {
            // A transaction at or below the stored position is already here.
            if server_tx.lsn <= reached {
                continue;
            }
            for change in &server_tx.changes {
                apply::apply_change(&tx, &self.tables, change).map_err(|e| {
                    ClientError::Replica(format!("applying transaction {}: {e}", server_tx.lsn))
                })?;
            }
            reached = server_tx.lsn;
        }
        if reached > current {
            schema::write_meta(&tx, "lsn", &reached.to_string())?;
        }
        capture::set_applying(&tx, false)?;
        tx.commit()?;
        Ok(reached)
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
        tx.commit()?;
        Ok(Executed {
            tx_id,
            captured: captured as usize,
        })
    }

    fn take_batch(
        &mut self,
        max_txs: usize,
    ) -> Result<(Option<WriteBatch>, Vec<Outcome>), ClientError> {
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
