//! Builds and updates the replica's tables from the server's schema, and
//! keeps pgrelay's own bookkeeping tables.

use pgrelay_protocol::TableSchema;
use rusqlite::{params, Connection, OptionalExtension};

use crate::ClientError;

const META_SQL: &str = "
CREATE TABLE IF NOT EXISTS _pgrelay_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS _pgrelay_tables (name TEXT PRIMARY KEY, schema TEXT NOT NULL);";

pub(crate) fn ensure_meta(conn: &Connection) -> Result<(), ClientError> {
    conn.execute_batch(META_SQL)?;
    Ok(())
}

use pgrelay_protocol::quote_ident as quote;

pub(crate) fn read_meta(conn: &Connection, key: &str) -> Result<Option<String>, ClientError> {
    // Cached: the LSN is read and written on every applied batch.
    Ok(conn
        .prepare_cached("SELECT value FROM _pgrelay_meta WHERE key = ?1")?
        .query_row([key], |r| r.get(0))
        .optional()?)
}

pub(crate) fn write_meta(conn: &Connection, key: &str, value: &str) -> Result<(), ClientError> {
    conn.prepare_cached(
        "INSERT INTO _pgrelay_meta (key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
    )?
    .execute(params![key, value])?;
    Ok(())
}

/// All table schemas the replica knows, by qualified name.
pub(crate) fn load_tables(conn: &Connection) -> Result<Vec<TableSchema>, ClientError> {
    let mut stmt = conn.prepare("SELECT schema FROM _pgrelay_tables ORDER BY name")?;
    let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
    let mut tables = Vec::new();
    for json in rows {
        let json = json?;
        tables.push(
            serde_json::from_str(&json)
                .map_err(|e| ClientError::Replica(format!("stored schema: {e}")))?,
        );
    }
    Ok(tables)
}

/// Creates a synced table that does not exist yet, adds columns the
/// server added and drops those it dropped; records the schema. Runs
/// inside the caller's transaction. `true` when the table had to be
/// rebuilt empty (a column that stores values differently, or a dropped
/// column SQLite cannot drop in place): its rows must come again.
pub(crate) fn apply_table(conn: &Connection, table: &TableSchema) -> Result<bool, ClientError> {
    let json = serde_json::to_string(table).map_err(|e| ClientError::Replica(e.to_string()))?;
    conn.execute(
        "INSERT INTO _pgrelay_tables (name, schema) VALUES (?1, ?2) ON CONFLICT(name) DO UPDATE SET schema = excluded.schema",
        params![table.name, json],
    )?;
    if table.skipped.is_some() {
        return Ok(false);
    }
    let name = table.sqlite_name();
    let mut existing = existing_columns(conn, name)?;
    let mut retyped = table.columns.iter().any(|c| {
        existing
            .iter()
            .any(|(n, t)| *n == c.name && !t.eq_ignore_ascii_case(c.kind.sqlite_type()))
    });
    // A new primary key: SQLite cannot change one in place.
    if !existing.is_empty() && existing_key(conn, name)? != table.primary_key {
        retyped = true;
    }
    if !retyped && !existing.is_empty() {
        retyped = !drop_columns(conn, table, &mut existing)?;
    }
    if retyped {
        // A column now stores values differently: the table is rebuilt and
        // its rows come again from a snapshot.
        conn.execute_batch(&format!("DROP TABLE {}", quote(name)))?;
        existing.clear();
    }
    let existing: Vec<String> = existing.into_iter().map(|(n, _)| n).collect();
    if existing.is_empty() {
        let mut defs: Vec<String> = table
            .columns
            .iter()
            .map(|c| format!("{} {}", quote(&c.name), c.kind.sqlite_type()))
            .collect();
        if !table.primary_key.is_empty() {
            let key = table
                .primary_key
                .iter()
                .map(|k| quote(k))
                .collect::<Vec<_>>()
                .join(", ");
            defs.push(format!("PRIMARY KEY ({key})"));
        }
        conn.execute_batch(&format!(
            "CREATE TABLE {} ({})",
            quote(name),
            defs.join(", ")
        ))?;
    } else {
        for column in table.columns.iter().filter(|c| !existing.contains(&c.name)) {
            conn.execute_batch(&format!(
                "ALTER TABLE {} ADD COLUMN {} {}",
                quote(name),
                quote(&column.name),
                column.kind.sqlite_type()
            ))?;
        }
    }
    // Local writes to the table go to the outbox, with its current columns.
    super::capture::create_triggers(conn, table)?;
    Ok(retyped)
}

/// Drops the replica's columns the server no longer has (a DROP COLUMN,
/// or the old name of a renamed column). `false` when SQLite cannot drop
/// one in place (part of the key, or used by an index a client migration
/// made): the table is then rebuilt.
fn drop_columns(
    conn: &Connection,
    table: &TableSchema,
    existing: &mut Vec<(String, String)>,
) -> Result<bool, ClientError> {
    let gone: Vec<String> = existing
        .iter()
        .filter(|(n, _)| table.column(n).is_none())
        .map(|(n, _)| n.clone())
        .collect();
    if gone.is_empty() {
        return Ok(true);
    }
    // The capture triggers name every column; they are made again after.
    super::capture::drop_triggers(conn, table)?;
    for column in &gone {
        let sql = format!(
            "ALTER TABLE {} DROP COLUMN {}",
            quote(table.sqlite_name()),
            quote(column)
        );
        if let Err(e) = conn.execute_batch(&sql) {
            tracing::info!(table = %table.name, %column, error = %e, "column cannot be dropped in place; rebuilding the table");
            return Ok(false);
        }
    }
    existing.retain(|(n, _)| !gone.contains(n));
    Ok(true)
}

/// The table's primary key columns, in key order.
fn existing_key(conn: &Connection, table: &str) -> Result<Vec<String>, ClientError> {
    let mut stmt =
        conn.prepare("SELECT name FROM pragma_table_info(?1) WHERE pk > 0 ORDER BY pk")?;
    let key = stmt
        .query_map([table], |r| r.get::<_, String>(0))?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(key)
}

/// The table's columns and their declared types (empty: no such table).
fn existing_columns(conn: &Connection, table: &str) -> Result<Vec<(String, String)>, ClientError> {
    let mut stmt = conn.prepare("SELECT name, type FROM pragma_table_info(?1)")?;
    let columns = stmt
        .query_map([table], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(columns)
}

pub(crate) fn row_count(conn: &Connection, table: &str) -> Result<i64, ClientError> {
    Ok(
        conn.query_row(&format!("SELECT count(*) FROM {}", quote(table)), [], |r| {
            r.get(0)
        })?,
    )
}
