//! Applies the server's transactions to the replica's tables.

use std::collections::HashMap;

use pgrelay_protocol::{Change, Op, Row, TableSchema};
use rusqlite::types::Value;
use rusqlite::{params_from_iter, Connection};

use crate::value::to_sqlite;
use crate::ClientError;
use pgrelay_protocol::quote_ident as quote;

/// Applies one change. The caller holds the SQLite transaction that also
/// stores the LSN, so a transaction is applied whole or not at all.
pub(crate) fn apply_change(
    conn: &Connection,
    tables: &HashMap<String, TableSchema>,
    change: &Change,
) -> Result<(), ClientError> {
    let Some(table) = tables.get(&change.table) else {
        // The caller leaves out changes of tables it does not know (they
        // are fetched by a snapshot); one that gets here cannot be placed.
        return Err(ClientError::Replica(format!(
            "change for unknown table {}",
            change.table
        )));
    };
    if table.skipped.is_some() {
        return Ok(());
    }
    let name = quote(table.sqlite_name());
    match change.op {
        Op::Truncate => {
            conn.prepare_cached(&format!("DELETE FROM {name}"))?
                .execute([])?;
        }
        Op::Insert => {
            let new = required(change.new.as_ref(), table, "insert")?;
            upsert(conn, table, &name, new)?;
        }
        Op::Update => {
            let new = required(change.new.as_ref(), table, "update")?;
            let target = change.old.as_ref().unwrap_or(new);
            let (set_cols, set_vals) = values(table, new, |_| true)?;
            if set_cols.is_empty() {
                return Ok(());
            }
            let (where_sql, where_vals) = locate(table, target)?;
            let assignments = set_cols
                .iter()
                .map(|c| format!("{} = ?", quote(c)))
                .collect::<Vec<_>>()
                .join(", ");
            let sql = format!("UPDATE {name} SET {assignments} WHERE {where_sql}");
            let changed = conn
                .prepare_cached(&sql)?
                .execute(params_from_iter(set_vals.iter().chain(where_vals.iter())))?;
            if changed == 0 && table.columns.iter().all(|c| new.contains_key(&c.name)) {
                // The replica lacked the row (it cannot, when every change
                // arrived, but a full row can still be placed).
                upsert(conn, table, &name, new)?;
            }
        }
        Op::Delete => {
            let old = required(change.old.as_ref(), table, "delete")?;
            let (where_sql, where_vals) = locate(table, old)?;
            conn.prepare_cached(&format!("DELETE FROM {name} WHERE {where_sql}"))?
                .execute(params_from_iter(where_vals.iter()))?;
        }
    }
    Ok(())
}

fn required<'a>(
    row: Option<&'a Row>,
    table: &TableSchema,
    op: &str,
) -> Result<&'a Row, ClientError> {
    row.ok_or_else(|| ClientError::Replica(format!("{op} on {} without its row", table.name)))
}

fn upsert(
    conn: &Connection,
    table: &TableSchema,
    name: &str,
    row: &Row,
) -> Result<(), ClientError> {
    let (cols, vals) = values(table, row, |_| true)?;
    let col_list = cols.iter().map(|c| quote(c)).collect::<Vec<_>>().join(", ");
    let marks = vec!["?"; cols.len()].join(", ");
    let verb = if table.primary_key.is_empty() {
        "INSERT"
    } else {
        "INSERT OR REPLACE"
    };
    conn.prepare_cached(&format!("{verb} INTO {name} ({col_list}) VALUES ({marks})"))?
        .execute(params_from_iter(vals.iter()))?;
    Ok(())
}

/// The row's values for the table's known columns, converted for SQLite.
/// Columns the replica does not have are left out.
fn values<'a>(
    table: &'a TableSchema,
    row: &Row,
    keep: impl Fn(&str) -> bool,
) -> Result<(Vec<&'a str>, Vec<Value>), ClientError> {
    let mut cols = Vec::with_capacity(row.len());
    let mut vals = Vec::with_capacity(row.len());
    for column in &table.columns {
        if let Some(value) = row.get(&column.name) {
            if keep(&column.name) {
                cols.push(column.name.as_str());
                vals.push(convert(table, &column.name, column.kind, value.as_deref())?);
            }
        }
    }
    Ok((cols, vals))
}

fn convert(
    table: &TableSchema,
    column: &str,
    kind: pgrelay_protocol::ValueKind,
    text: Option<&str>,
) -> Result<Value, ClientError> {
    to_sqlite(kind, text).map_err(|e| ClientError::Replica(format!("{}.{column}: {e}", table.name)))
}

/// A WHERE clause that finds the row: by primary key, or (REPLICA
/// IDENTITY FULL without a key) the first row equal in every column.
fn locate(table: &TableSchema, row: &Row) -> Result<(String, Vec<Value>), ClientError> {
    if !table.primary_key.is_empty() {
        let mut clauses = Vec::with_capacity(table.primary_key.len());
        let mut vals = Vec::with_capacity(table.primary_key.len());
        for key in &table.primary_key {
            let column = table.column(key).ok_or_else(|| {
                ClientError::Replica(format!("{}: key column {key} unknown", table.name))
            })?;
            let value = row.get(key).ok_or_else(|| {
                ClientError::Replica(format!("{}: change without key column {key}", table.name))
            })?;
            clauses.push(format!("{} = ?", quote(key)));
            vals.push(convert(table, key, column.kind, value.as_deref())?);
        }
        return Ok((clauses.join(" AND "), vals));
    }
    let (cols, vals) = values(table, row, |_| true)?;
    let clauses = cols
        .iter()
        .map(|c| format!("{} IS ?", quote(c)))
        .collect::<Vec<_>>()
        .join(" AND ");
    let name = quote(table.sqlite_name());
    Ok((
        format!("rowid = (SELECT rowid FROM {name} WHERE {clauses} LIMIT 1)"),
        vals,
    ))
}
