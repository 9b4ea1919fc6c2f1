//! Loading a snapshot's rows fast. The chunks of one table go into one
//! SQLite transaction that stays open while they arrive (up to a size),
//! committed when the table is done, when it grows past
//! [`MAX_LOAD_BYTES`] in WAL mode, or before the replica runs any other command. While
//! it is open the capture triggers are switched off for the connection
//! (when pgrelay's are the only triggers), the table's own indexes (made
//! by client migrations) are dropped while it was empty and built again at
//! the end, and rows go in many per statement, bound straight from the
//! COPY text.
//!
//! Crash safety is SQLite's: a crash loses the open transaction, and the
//! snapshot, recorded as pending before its first row, starts over. The
//! dropped indexes are recorded in `_pgrelay_meta` in the transaction that
//! drops them, and made again when the replica opens (see [`restore`]).

use std::collections::HashMap;

use pgrelay_protocol::{copy_text::Rows, quote_ident as quote, TableSchema};
use rusqlite::config::DbConfig;
use rusqlite::{Connection, OptionalExtension};

use super::schema::{read_meta, write_meta};
use super::snapshot::known;
use crate::value::to_sqlite_ref;
use crate::ClientError;
use write_back::WriteBack;

/// COPY text loaded in one SQLite transaction at most, before a commit,
/// when the replica stays in WAL mode (the WAL holds every page the
/// transaction writes until a checkpoint). With a rollback journal (a new
/// replica) a table's load is one transaction however large: new pages
/// are not journaled, and a commit midway only cost an fsync that stalled
/// the load (150-200 ms in the middle of `bench hydrate`'s 1M rows).
const MAX_LOAD_BYTES: usize = 64 << 20;

/// Rows inserted by one statement (fewer for wide tables).
const ROWS_PER_STATEMENT: usize = 32;

/// SQLite's default limit on a statement's parameters.
const MAX_PARAMETERS: usize = 32_766;

/// Indexes dropped by a load, to make again (their SQL, as JSON).
const DROPPED_INDEXES_KEY: &str = "load_dropped_indexes";

/// Page cache while a load is open, in KiB (SQLite's default is 2,000):
/// inserts into an index or a key that is not the rowid touch pages
/// all over the tree.
const LOAD_CACHE_KIB: i64 = 32_768;

/// A load of one table's rows: its SQLite transaction, while open, and
/// the indexes it dropped, which stay dropped over the commits of a long
/// load and are made again when the table is done.
pub(super) struct Load {
    table: String,
    /// Bytes of COPY text in the open transaction.
    bytes: usize,
    /// A transaction is open.
    open: bool,
    /// The connection's triggers are off until the commit.
    triggers_off: bool,
    /// The `applying` flag is set instead (the application has triggers
    /// of its own, which must still run).
    applying: bool,
    /// Indexes (name, SQL) made again when the table is done.
    dropped: Vec<(String, String)>,
    /// They were dropped in the open transaction.
    dropped_here: bool,
    /// The journal was switched from WAL to a rollback journal for the
    /// open transaction.
    rollback_journal: bool,
    /// The file synced in the background as a large load grows.
    write_back: WriteBack,
}

impl Load {
    /// A load of `name`'s rows, no transaction open yet.
    pub(super) fn new(name: &str) -> Load {
        Load {
            table: name.to_owned(),
            bytes: 0,
            open: false,
            triggers_off: false,
            applying: false,
            dropped: Vec::new(),
            dropped_here: false,
            rollback_journal: false,
            write_back: WriteBack::default(),
        }
    }

    pub(super) fn table(&self) -> &str {
        &self.table
    }

    /// Inserts a chunk of rows, in the open transaction (opened if
    /// needed); returns how many. On an error nothing of the open
    /// transaction is kept.
    pub(super) fn rows(
        &mut self,
        conn: &Connection,
        tables: &HashMap<String, TableSchema>,
        rows: &Rows,
    ) -> Result<u64, ClientError> {
        let result = self.open(conn, tables).and_then(|()| {
            self.bytes += rows.text().len();
            insert_rows(conn, known(tables, &self.table)?, rows)
        });
        if result.is_ok() && self.rollback_journal {
            self.write_back.loaded(conn, rows.text().len());
        }
        match result {
            Err(e) => {
                self.close(conn, false)?;
                Err(e)
            }
            Ok(rows) if !self.rollback_journal && self.bytes >= MAX_LOAD_BYTES => {
                self.close(conn, true).map(|()| rows)
            }
            Ok(rows) => Ok(rows),
        }
    }

    fn open(
        &mut self,
        conn: &Connection,
        tables: &HashMap<String, TableSchema>,
    ) -> Result<(), ClientError> {
        if self.open {
            return Ok(());
        }
        let table = known(tables, &self.table)?;
        if replica_is_new(conn)? {
            self.rollback_journal = rollback_journal(conn);
        }
        if let Err(e) = conn.execute_batch("BEGIN IMMEDIATE") {
            if std::mem::take(&mut self.rollback_journal) {
                conn.pragma_update(None, "journal_mode", "WAL")?;
            }
            return Err(e.into());
        }
        self.open = true;
        self.bytes = 0;
        let prepared = self.prepare(conn, table);
        if prepared.is_err() {
            self.close(conn, false)?;
        }
        prepared
    }

    fn prepare(&mut self, conn: &Connection, table: &TableSchema) -> Result<(), ClientError> {
        if only_capture_triggers(conn)? {
            conn.set_db_config(DbConfig::SQLITE_DBCONFIG_ENABLE_TRIGGER, false)?;
            self.triggers_off = true;
        } else {
            super::capture::set_applying(conn, true)?;
            self.applying = true;
        }
        conn.pragma_update(None, "cache_size", -LOAD_CACHE_KIB)?;
        if self.dropped.is_empty()
            && table.skipped.is_none()
            && is_empty(conn, table.sqlite_name())?
        {
            self.dropped = drop_indexes(conn, table.sqlite_name())?;
            self.dropped_here = !self.dropped.is_empty();
        }
        Ok(())
    }

    /// Commits what is loaded so far (the replica has another command to
    /// run); the table's indexes stay dropped until [`Load::finish`].
    pub(super) fn pause(&mut self, conn: &Connection) -> Result<(), ClientError> {
        self.close(conn, true)
    }

    /// The table is done: its indexes are made again, and everything is
    /// committed.
    pub(super) fn finish(
        mut self,
        conn: &Connection,
        tables: &HashMap<String, TableSchema>,
    ) -> Result<(), ClientError> {
        if self.dropped.is_empty() {
            return self.close(conn, true);
        }
        self.open(conn, tables)?;
        let made = self.make_indexes(conn);
        let closed = self.close(conn, made.is_ok());
        made.and(closed)
    }

    fn make_indexes(&mut self, conn: &Connection) -> Result<(), ClientError> {
        for (name, sql) in &self.dropped {
            if !index_exists(conn, name)? {
                conn.execute_batch(sql)?;
            }
        }
        self.dropped.clear();
        conn.prepare_cached("DELETE FROM _pgrelay_meta WHERE key = ?1")?
            .execute([DROPPED_INDEXES_KEY])?;
        Ok(())
    }

    /// Commits (or, with `commit` false or when the commit fails, rolls
    /// back) the open transaction, and puts the connection back as it was.
    fn close(&mut self, conn: &Connection, commit: bool) -> Result<(), ClientError> {
        if !self.open {
            return Ok(());
        }
        self.open = false;
        let committed = if commit {
            let flag = match self.applying {
                true => super::capture::set_applying(conn, false),
                false => Ok(()),
            };
            flag.and_then(|()| Ok(conn.execute_batch("COMMIT")?))
        } else {
            Ok(())
        };
        if !conn.is_autocommit() {
            // Nothing of it is kept (its rows come again), nor the drop of
            // indexes it made.
            let _ = conn.execute_batch("ROLLBACK");
            if std::mem::take(&mut self.dropped_here) {
                self.dropped.clear();
            }
        }
        self.dropped_here = false;
        self.applying = false;
        let mut restored = conn.pragma_update(None, "cache_size", -2000);
        if std::mem::take(&mut self.triggers_off) {
            restored = restored.and(
                conn.set_db_config(DbConfig::SQLITE_DBCONFIG_ENABLE_TRIGGER, true)
                    .map(|_| ()),
            );
        }
        if std::mem::take(&mut self.rollback_journal) {
            restored = restored.and(conn.pragma_update(None, "journal_mode", "WAL"));
        }
        committed.and(restored.map_err(ClientError::from))
    }
}

/// Whether the replica is being hydrated whole (it has no position, so
/// the application has nothing consistent to read yet).
fn replica_is_new(conn: &Connection) -> Result<bool, ClientError> {
    Ok(super::snapshot::pending(conn)?.is_some_and(|p| p.full))
}

/// Switches the replica from WAL to a rollback journal; `false` when it
/// stays in WAL (another connection has it open). A fresh table's pages
/// are new: in WAL each is written twice (to the WAL, then to the file
/// at the checkpoint), with a rollback journal once, and the journal
/// holds almost nothing. A process killed mid-load leaves a hot journal
/// that SQLite rolls back when the replica is next opened.
fn rollback_journal(conn: &Connection) -> bool {
    match conn.pragma_update_and_check(None, "journal_mode", "TRUNCATE", |r| r.get::<_, String>(0))
    {
        Ok(mode) => mode.eq_ignore_ascii_case("truncate"),
        Err(e) => {
            tracing::debug!(error = %e, "the replica stays in WAL mode for the snapshot load");
            false
        }
    }
}

/// Whether every trigger in the replica is one of pgrelay's capture
/// triggers (which must not capture snapshot rows).
fn only_capture_triggers(conn: &Connection) -> Result<bool, ClientError> {
    let others: i64 = conn.query_row(
        "SELECT count(*) FROM sqlite_schema WHERE type = 'trigger' \
         AND name NOT LIKE '\\_pgrelay\\_capture\\_%' ESCAPE '\\'",
        [],
        |r| r.get(0),
    )?;
    Ok(others == 0)
}

fn is_empty(conn: &Connection, table: &str) -> Result<bool, ClientError> {
    Ok(conn
        .query_row(
            &format!("SELECT 1 FROM {} LIMIT 1", quote(table)),
            [],
            |_| Ok(()),
        )
        .optional()?
        .is_none())
}

fn index_exists(conn: &Connection, name: &str) -> Result<bool, ClientError> {
    Ok(conn
        .prepare_cached(
            "SELECT EXISTS (SELECT 1 FROM sqlite_schema WHERE type = 'index' AND name = ?1)",
        )?
        .query_row([name], |r| r.get(0))?)
}

fn recorded(conn: &Connection) -> Result<Vec<(String, String)>, ClientError> {
    match read_meta(conn, DROPPED_INDEXES_KEY)? {
        Some(json) => serde_json::from_str(&json)
            .map_err(|e| ClientError::Replica(format!("stored dropped indexes: {e}"))),
        None => Ok(Vec::new()),
    }
}

/// Drops the table's indexes made by SQL (not those of its key), records
/// them, and returns them (name, SQL).
fn drop_indexes(conn: &Connection, table: &str) -> Result<Vec<(String, String)>, ClientError> {
    let indexes: Vec<(String, String)> = conn
        .prepare(
            "SELECT name, sql FROM sqlite_schema \
             WHERE type = 'index' AND tbl_name = ?1 AND sql IS NOT NULL",
        )?
        .query_map([table], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    if indexes.is_empty() {
        return Ok(indexes);
    }
    let mut all = recorded(conn)?;
    for (name, _) in &indexes {
        conn.execute_batch(&format!("DROP INDEX {}", quote(name)))?;
    }
    all.extend(indexes.iter().cloned());
    let json = serde_json::to_string(&all).map_err(|e| ClientError::Replica(e.to_string()))?;
    write_meta(conn, DROPPED_INDEXES_KEY, &json)?;
    Ok(indexes)
}

/// Makes again the indexes a load dropped and did not make again (the
/// process ended mid-load). Runs when the replica opens; an index that
/// cannot be made (its table is gone) is left out with a warning.
pub(super) fn restore(conn: &mut Connection) -> Result<(), ClientError> {
    let indexes = recorded(conn)?;
    if indexes.is_empty() {
        return Ok(());
    }
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    for (name, sql) in &indexes {
        if index_exists(&tx, name)? {
            continue;
        }
        tracing::info!(index = %name, "making again an index an interrupted snapshot load dropped");
        if let Err(e) = tx.execute_batch(sql) {
            tracing::warn!(index = %name, error = %e, "could not make the index again");
        }
    }
    tx.execute(
        "DELETE FROM _pgrelay_meta WHERE key = ?1",
        [DROPPED_INDEXES_KEY],
    )?;
    tx.commit()?;
    Ok(())
}

/// Inserts a chunk of rows (split from COPY text) into `table`, many rows
/// per statement; returns how many.
pub(super) fn insert_rows(
    conn: &Connection,
    table: &TableSchema,
    rows: &Rows,
) -> Result<u64, ClientError> {
    let width = table.columns.len();
    let per_statement = ROWS_PER_STATEMENT.min(MAX_PARAMETERS / width.max(1)).max(1);
    let total = rows.len();
    let grouped = total - total % per_statement;
    let mut many = conn.prepare_cached(&insert_sql(table, per_statement))?;
    let mut one = conn.prepare_cached(&insert_sql(table, 1))?;
    let name = &table.name;
    for row in 0..total {
        let values = rows.row(row);
        if values.len() != width {
            return Err(ClientError::Replica(format!(
                "snapshot row of {name} has {} values for {width} columns",
                values.len(),
            )));
        }
        let (stmt, first) = if row < grouped {
            (&mut many, (row % per_statement) * width + 1)
        } else {
            (&mut one, 1)
        };
        for (i, (column, value)) in table.columns.iter().zip(values).enumerate() {
            let value = to_sqlite_ref(column.kind, value)
                .map_err(|e| ClientError::Replica(format!("{name}.{}: {e}", column.name)))?;
            stmt.raw_bind_parameter(first + i, value)?;
        }
        if row >= grouped || (row + 1).is_multiple_of(per_statement) {
            stmt.raw_execute()?;
        }
    }
    Ok(total as u64)
}

fn insert_sql(table: &TableSchema, rows: usize) -> String {
    let columns = table
        .columns
        .iter()
        .map(|c| quote(&c.name))
        .collect::<Vec<_>>()
        .join(", ");
    let one = format!("({})", vec!["?"; table.columns.len()].join(", "));
    let values = vec![one; rows].join(", ");
    format!(
        "INSERT OR REPLACE INTO {} ({columns}) VALUES {values}",
        quote(table.sqlite_name())
    )
}

#[cfg(test)]
mod tests;
mod write_back;
