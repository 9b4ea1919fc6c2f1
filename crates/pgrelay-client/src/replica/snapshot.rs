//! Hydration on the replica's side: empties the tables a snapshot
//! replaces, loads its rows chunk by chunk, and on completion stores the
//! position the stream resumes from together with the snapshot's
//! visibility, so transactions the snapshot already holds are skipped
//! (promise 3). Local writes not yet confirmed by the server are put back
//! on top of the fresh rows; they stay in the outbox and go out as before.

use std::collections::HashMap;

use pgrelay_protocol::copy_text::Rows;
use pgrelay_protocol::{Change, Lsn, Op, TableSchema, Transaction, Visibility};
use rusqlite::Connection;
use serde::{Deserialize, Serialize};

use pgrelay_protocol::quote_ident as quote;

use super::schema::{read_meta, write_meta};
use super::{apply, capture, captured};
use crate::ClientError;

/// A snapshot the replica still needs (persisted, so an interrupted
/// hydration starts again after a restart).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Pending {
    /// Every table, with a fresh position.
    pub(crate) full: bool,
    /// Tables to resync while keeping the position.
    pub(crate) tables: Vec<String>,
}

/// Transactions to skip for some tables: those a snapshot already held.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Filter {
    pub(crate) tables: Vec<String>,
    pub(crate) visibility: Visibility,
}

const PENDING_KEY: &str = "hydrate";
const FILTERS_KEY: &str = "snapshot_filters";

pub(crate) fn pending(conn: &Connection) -> Result<Option<Pending>, ClientError> {
    read_json(conn, PENDING_KEY)
}

pub(crate) fn set_pending(conn: &Connection, pending: &Pending) -> Result<(), ClientError> {
    write_json(conn, PENDING_KEY, pending)
}

pub(crate) fn filters(conn: &Connection) -> Result<Vec<Filter>, ClientError> {
    Ok(read_json(conn, FILTERS_KEY)?.unwrap_or_default())
}

fn read_json<T: for<'de> Deserialize<'de>>(
    conn: &Connection,
    key: &str,
) -> Result<Option<T>, ClientError> {
    read_meta(conn, key)?
        .map(|text| {
            serde_json::from_str(&text)
                .map_err(|e| ClientError::Replica(format!("stored {key}: {e}")))
        })
        .transpose()
}

fn write_json<T: Serialize>(conn: &Connection, key: &str, value: &T) -> Result<(), ClientError> {
    let text = serde_json::to_string(value).map_err(|e| ClientError::Replica(e.to_string()))?;
    write_meta(conn, key, &text)
}

fn delete_meta(conn: &Connection, key: &str) -> Result<(), ClientError> {
    conn.prepare_cached("DELETE FROM _pgrelay_meta WHERE key = ?1")?
        .execute([key])?;
    Ok(())
}

/// Forgets which transactions earlier snapshots held (a repair starts the
/// replica's position afresh).
pub(crate) fn forget_filters(conn: &Connection) -> Result<(), ClientError> {
    delete_meta(conn, FILTERS_KEY)
}

/// Forgets the replica's position: the next connection hydrates every
/// table. Rows stay readable until the snapshot replaces them; the outbox
/// is kept.
pub(crate) fn reset(conn: &Connection) -> Result<(), ClientError> {
    delete_meta(conn, "lsn")?;
    delete_meta(conn, "log_id")?;
    delete_meta(conn, FILTERS_KEY)?;
    set_pending(
        conn,
        &Pending {
            full: true,
            tables: Vec::new(),
        },
    )
}

/// Asks for a fresh snapshot of `tables` on the next connection.
pub(crate) fn request_resync(conn: &Connection, tables: &[String]) -> Result<(), ClientError> {
    let mut pending = pending(conn)?.unwrap_or_default();
    for table in tables {
        if !pending.tables.contains(table) {
            pending.tables.push(table.clone());
        }
    }
    set_pending(conn, &pending)
}

/// A snapshot of `tables` starts: empties them.
pub(crate) fn begin(
    conn: &Connection,
    tables: &HashMap<String, TableSchema>,
    names: &[String],
    full: bool,
) -> Result<(), ClientError> {
    if full {
        // Until the snapshot completes the replica has no position.
        delete_meta(conn, "lsn")?;
        delete_meta(conn, FILTERS_KEY)?;
    }
    let mut pending = pending(conn)?.unwrap_or_default();
    pending.full |= full;
    for name in names {
        clear(conn, tables, name)?;
        if !pending.tables.contains(name) {
            pending.tables.push(name.clone());
        }
    }
    set_pending(conn, &pending)
}

pub(crate) fn clear(
    conn: &Connection,
    tables: &HashMap<String, TableSchema>,
    name: &str,
) -> Result<(), ClientError> {
    let table = known(tables, name)?;
    if table.skipped.is_none() {
        // First: its digest triggers would record every row deleted here
        // and loaded next.
        super::digests::forget(conn, table)?;
        conn.prepare_cached(&format!("DELETE FROM {}", quote(table.sqlite_name())))?
            .execute([])?;
    }
    Ok(())
}

pub(super) fn known<'a>(
    tables: &'a HashMap<String, TableSchema>,
    name: &str,
) -> Result<&'a TableSchema, ClientError> {
    tables
        .get(name)
        .ok_or_else(|| ClientError::Replica(format!("snapshot of unknown table {name}")))
}

/// Inserts a chunk of rows; returns how many.
pub(crate) fn load(
    conn: &Connection,
    tables: &HashMap<String, TableSchema>,
    name: &str,
    rows: &Rows,
) -> Result<u64, ClientError> {
    super::load::insert_rows(conn, known(tables, name)?, rows)
}

/// The snapshot is complete and verified: records where the stream
/// resumes and what it must skip, and puts unconfirmed local writes back.
pub(crate) fn finish(
    conn: &Connection,
    tables: &HashMap<String, TableSchema>,
    resume: Lsn,
    full: bool,
    names: &[String],
    visibility: &Visibility,
) -> Result<(), ClientError> {
    if full {
        write_meta(conn, "lsn", &resume.to_string())?;
    }
    let mut filters = filters(conn)?;
    filters.push(Filter {
        tables: names.to_vec(),
        visibility: visibility.clone(),
    });
    write_json(conn, FILTERS_KEY, &filters)?;
    delete_meta(conn, PENDING_KEY)?;
    if full {
        // Answered writes the snapshot holds are in flight no more.
        super::rebase::passed(conn, resume)?;
    }
    replay_outbox(conn, tables, names)
}

/// Re-applies local writes in flight (not answered, or answered but not
/// yet held by the replica: see `rebase`) to the freshly loaded tables,
/// oldest first, so the application keeps seeing them.
fn replay_outbox(
    conn: &Connection,
    tables: &HashMap<String, TableSchema>,
    names: &[String],
) -> Result<(), ClientError> {
    for entry in captured::in_flight(conn)? {
        if !names.contains(&entry.table) {
            continue;
        }
        let Some(op) = Op::parse(&entry.op) else {
            continue;
        };
        let schema = tables.get(&entry.table);
        let row = |json: &Option<String>| {
            json.as_deref()
                .map(|j| captured::row_from_json(j, schema))
                .transpose()
        };
        let change = Change {
            table: entry.table.clone(),
            op,
            new: row(&entry.new)?,
            old: row(&entry.old)?,
        };
        if let Err(e) = apply::apply_change(conn, tables, &change) {
            tracing::warn!(table = %entry.table, error = %e, "could not re-apply a pending local write after hydration");
        }
    }
    Ok(())
}

/// Tables whose changes in `tx` a snapshot already holds.
pub(crate) fn skipped<'a>(filters: &'a [Filter], tx: &Transaction) -> Vec<&'a str> {
    tables_where(filters, tx, true)
}

/// Tables whose changes in `tx`, a transaction the replica already holds
/// (at or below its position), a snapshot loaded since did not see: the
/// server streams such a transaction again (it was logged a moment before
/// PostgreSQL made it visible), and those tables need its changes.
pub(crate) fn missed<'a>(filters: &'a [Filter], tx: &Transaction) -> Vec<&'a str> {
    tables_where(filters, tx, false)
}

/// The tables of the snapshots `tx` is within (at or below their WAL
/// position) that saw it (`seen`) or did not.
fn tables_where<'a>(filters: &'a [Filter], tx: &Transaction, seen: bool) -> Vec<&'a str> {
    filters
        .iter()
        .filter(|f| tx.lsn <= f.visibility.until && f.visibility.sees(tx.xid) == seen)
        .flat_map(|f| f.tables.iter().map(String::as_str))
        .collect()
}

/// Drops filters the stream has passed; returns whether any was dropped.
pub(crate) fn expire(
    conn: &Connection,
    filters: &mut Vec<Filter>,
    reached: Lsn,
) -> Result<bool, ClientError> {
    let before = filters.len();
    filters.retain(|f| f.visibility.until > reached);
    if filters.len() == before {
        return Ok(false);
    }
    if filters.is_empty() {
        delete_meta(conn, FILTERS_KEY)?;
    } else {
        write_json(conn, FILTERS_KEY, filters)?;
    }
    Ok(true)
}

/// Runs `work` with local-write capture off (snapshot rows and replayed
/// outbox writes are not the application's new writes).
pub(crate) fn quietly<T>(
    conn: &Connection,
    work: impl FnOnce() -> Result<T, ClientError>,
) -> Result<T, ClientError> {
    capture::set_applying(conn, true)?;
    let result = work();
    capture::set_applying(conn, false)?;
    result
}
