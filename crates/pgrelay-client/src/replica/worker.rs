//! The replica's thread: owns the SQLite connection and runs the commands
//! the async [`Replica`](super::Replica) handle sends, one at a time, each
//! in its own SQLite transaction where it writes.

use std::collections::{HashMap, HashSet};

use pgrelay_protocol::{Lsn, TableSchema, Transaction, WriteResults};
use rusqlite::{Connection, TransactionBehavior};
use tokio::sync::mpsc;

mod steps;

use super::{
    apply, capture, digests, holdable, load, outbox, rebase, reshape, schema, snapshot, Applied,
    Command, Executed, Outcome, ReplicaState, ReplicaStatus, SchemaApplied, TableStatus, Taken,
};
use crate::ClientError;

pub(super) struct Worker {
    conn: Connection,
    tables: HashMap<String, TableSchema>,
    /// The SQL text that applies changes to them, made as needed.
    shapes: apply::Shapes,
    /// Transactions that snapshots already hold, skipped when they arrive.
    filters: Vec<snapshot::Filter>,
    /// Digests for repairs are being made while the thread is idle.
    digesting: bool,
    /// Their bucket bounds, while only transactions are applied.
    held: digests::Held,
    /// A table's snapshot rows being loaded.
    load: Option<load::Load>,
    /// A table whose loaded rows were lost (a commit between its chunks
    /// failed), with why: its load ends in this error.
    lost: Option<(String, String)>,
}

impl Worker {
    /// Takes over the opened connection, with the tables and snapshot
    /// filters it holds.
    pub(super) fn open(mut conn: Connection) -> Result<Worker, ClientError> {
        load::restore(&mut conn)?;
        let filters = snapshot::filters(&conn)?;
        let mut worker = Worker {
            conn,
            tables: HashMap::new(),
            shapes: apply::Shapes::default(),
            filters,
            digesting: false,
            held: digests::Held::default(),
            load: None,
            lost: None,
        };
        worker.reload_tables()?;
        Ok(worker)
    }

    pub(super) fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        loop {
            let command = match rx.try_recv() {
                Ok(command) => command,
                Err(mpsc::error::TryRecvError::Disconnected) => break,
                // Idle: digest a few thousand rows for the next repair
                // (never inside a snapshot load's open transaction).
                Err(mpsc::error::TryRecvError::Empty) if self.digesting && self.load.is_none() => {
                    self.digest_step();
                    continue;
                }
                Err(mpsc::error::TryRecvError::Empty) => match rx.blocking_recv() {
                    Some(command) => command,
                    None => break,
                },
            };
            self.settle_load(&command);
            if !matches!(command, Command::ApplyTransactions(..)) {
                // It may change the kept digests.
                self.held.clear();
            }
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
                Command::RunMigration(migration, reply) => {
                    let _ = reply.send(super::migrations::run(&mut self.conn, &migration));
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
                Command::Digests(all, reply) => {
                    let _ = reply.send(self.start_digests(all));
                }
                Command::BeginSnapshot(tables, full, reply) => {
                    self.digesting = false;
                    if full {
                        self.filters.clear();
                    }
                    let _ = reply.send(self.in_tx(|conn, known| {
                        snapshot::quietly(conn, || snapshot::begin(conn, known, &tables, full))
                    }));
                }
                Command::LoadSnapshot(table, rows, reply) => {
                    let _ = reply.send(self.load_rows(table, &rows).map(|n| (n, rows)));
                }
                Command::EndLoad(table, reply) => {
                    let _ = reply.send(self.end_load(&table));
                }
                Command::ClearTable(table, reply) => {
                    self.digesting = false;
                    let _ = reply.send(self.in_tx(|conn, known| {
                        snapshot::quietly(conn, || snapshot::clear(conn, known, &table))
                    }));
                }
                Command::Repair(step) => self.repair(step),
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
        // Made for the tables as they were.
        self.shapes = apply::Shapes::default();
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

    /// The stored position, none while a full snapshot is pending.
    fn position(&self) -> Result<Option<Lsn>, ClientError> {
        position(&self.conn)
    }

    fn state(&self) -> Result<ReplicaState, ClientError> {
        let client_id = schema::read_meta(&self.conn, "client_id")?;
        let pending = snapshot::pending(&self.conn)?.unwrap_or_default();
        let lsn = self.position()?;
        let log_id = schema::read_meta(&self.conn, "log_id")?;
        Ok(ReplicaState {
            client_id,
            lsn,
            log_id,
            resync: pending.tables,
            schema_version: super::migrations::schema_version(&self.conn)?,
        })
    }

    fn apply_schema(&mut self, tables: &[TableSchema]) -> Result<SchemaApplied, ClientError> {
        let positioned = self.state()?.lsn.is_some();
        let mut needed = Vec::new();
        let mut refused = Vec::new();
        let mut all = self.tables.clone();
        for table in tables {
            all.insert(table.name.clone(), table.clone());
        }
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        for incoming in tables {
            // Local writes made against a renamed table or column follow it.
            reshape::map_outbox(&tx, &self.tables, incoming)?;
            // Synced before, not now (dropped or renamed in PostgreSQL):
            // its rows would go stale.
            if incoming.skipped.is_some()
                && self
                    .tables
                    .get(&incoming.name)
                    .is_some_and(|known| known.skipped.is_none())
            {
                tx.execute_batch(&format!(
                    "DROP TABLE IF EXISTS {}",
                    pgrelay_protocol::quote_ident(incoming.sqlite_name())
                ))?;
            }
            let reason = match incoming.skipped {
                Some(_) => None,
                None => holdable::cannot_hold(incoming, all.values()),
            };
            let held;
            let table = match reason {
                None => incoming,
                Some(reason) => {
                    let skipped = format!("the replica cannot hold it: {reason}");
                    refused.push((incoming.name.clone(), skipped.clone()));
                    // Held before under another schema: its rows would go stale.
                    if self
                        .tables
                        .get(&incoming.name)
                        .is_some_and(|known| known.skipped.is_none())
                    {
                        tx.execute_batch(&format!(
                            "DROP TABLE IF EXISTS {}",
                            pgrelay_protocol::quote_ident(incoming.sqlite_name())
                        ))?;
                    }
                    held = TableSchema {
                        skipped: Some(skipped),
                        ..incoming.clone()
                    };
                    &held
                }
            };
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
            let rebuilt = schema::apply_table(&tx, table)?;
            if (retyped || rebuilt) && positioned {
                needed.push(table.name.clone());
            }
        }
        tx.commit()?;
        self.reload_tables()?;
        Ok(SchemaApplied { needed, refused })
    }

    fn apply_transactions(&mut self, txs: &[Transaction]) -> Result<Applied, ClientError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        // Read in the transaction: outside it, each read would open and
        // close a read transaction of its own.
        let current = position(&tx)?.unwrap_or(Lsn::ZERO);
        let mut reached = current;
        let mut unknown: Vec<String> = Vec::new();
        let mut touched: HashSet<String> = HashSet::new();
        let own_origin =
            schema::read_meta(&tx, "client_id")?.map(|id| pgrelay_protocol::origin_tag(&id));
        capture::set_applying(&tx, true)?;
        // The digest triggers stay quiet for the server's rows: their keys
        // are recorded below, one per digest bucket.
        digests::quiet(&tx, true)?;
        let mut written = digests::Written::default();
        let mut applier = apply::Applier::new(&tx, &self.tables, &mut self.shapes);
        for server_tx in txs {
            // A transaction at or below the stored position is already
            // here, except in tables a snapshot since did not see it in.
            let only = if server_tx.lsn <= reached {
                let missed = snapshot::missed(&self.filters, server_tx);
                if missed.is_empty() {
                    continue;
                }
                Some(missed)
            } else {
                None
            };
            let skipped = snapshot::skipped(&self.filters, server_tx);
            for change in &server_tx.changes {
                if skipped.contains(&change.table.as_str())
                    || only
                        .as_ref()
                        .is_some_and(|only| !only.contains(&change.table.as_str()))
                {
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
                applier.change(change).map_err(|e| {
                    ClientError::Replica(format!("applying transaction {}: {e}", server_tx.lsn))
                })?;
                if let Some(table) = self.tables.get(&change.table) {
                    written.add(&tx, &mut self.held, table, change)?;
                }
                if !touched.contains(&change.table) {
                    touched.insert(change.table.clone());
                }
            }
            applier.flush().map_err(|e| {
                ClientError::Replica(format!("applying transaction {}: {e}", server_tx.lsn))
            })?;
            if only.is_some() {
                continue;
            }
            if own_origin.is_some() && server_tx.origin == own_origin {
                rebase::echoed(&tx, server_tx.lsn)?;
            }
            reached = server_tx.lsn;
        }
        drop(applier);
        digests::quiet(&tx, false)?;
        written.record(&tx, &self.tables, &mut self.held)?;
        // Local writes still in flight go back on top, in this transaction:
        // no reader sees another writer's older row replace them.
        rebase::passed(&tx, reached)?;
        rebase::reapply(&tx, &self.tables, &touched)?;
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
            captured: outbox::count(captured)?,
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

/// The stored position, none while a full snapshot is pending.
fn position(conn: &Connection) -> Result<Option<Lsn>, ClientError> {
    let pending = snapshot::pending(conn)?.unwrap_or_default();
    Ok(schema::read_meta(conn, "lsn")?
        .map(|s| s.parse::<Lsn>())
        .transpose()
        .map_err(|e| ClientError::Replica(format!("stored LSN: {e}")))?
        .filter(|_| !pending.full))
}
