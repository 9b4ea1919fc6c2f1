//! Captures the application's own writes: triggers on every synced table
//! copy each local INSERT, UPDATE and DELETE into `_pgrelay_outbox`, in the
//! same SQLite transaction as the write. They stay quiet while the replica
//! applies the server's transactions (`_pgrelay_capture.applying`), so only
//! local writes are captured.

use pgrelay_protocol::{TableSchema, ValueKind};
use rusqlite::Connection;

use crate::ClientError;
use pgrelay_protocol::quote_ident as quote;

const CAPTURE_SQL: &str = "
CREATE TABLE IF NOT EXISTS _pgrelay_outbox (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    tx_id      TEXT NOT NULL,
    change_id  TEXT NOT NULL UNIQUE,
    table_name TEXT NOT NULL,
    op         TEXT NOT NULL,
    new_row    TEXT,
    old_row    TEXT,
    status     TEXT NOT NULL DEFAULT 'pending'
               CHECK (status IN ('pending', 'sent', 'applied', 'rejected')),
    error      TEXT,
    retries    INTEGER NOT NULL DEFAULT 0,
    created_us INTEGER NOT NULL,
    updated_us INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS _pgrelay_outbox_status ON _pgrelay_outbox (status, seq);
CREATE INDEX IF NOT EXISTS _pgrelay_outbox_tx ON _pgrelay_outbox (tx_id);
CREATE TABLE IF NOT EXISTS _pgrelay_capture (
    id       INTEGER PRIMARY KEY CHECK (id = 1),
    tx_id    TEXT,
    applying INTEGER NOT NULL DEFAULT 0
);
INSERT OR IGNORE INTO _pgrelay_capture (id, tx_id, applying) VALUES (1, NULL, 0);";

/// Microseconds since the Unix epoch, in SQLite.
pub(crate) const NOW_US_SQL: &str =
    "CAST((julianday('now') - 2440587.5) * 86400000000.0 AS INTEGER)";

/// Pairs per `json_object`/`json_insert` call, under SQLite's limit on
/// function arguments.
const PAIRS_PER_CALL: usize = 40;

pub(crate) fn ensure_tables(conn: &Connection) -> Result<(), ClientError> {
    conn.execute_batch(CAPTURE_SQL)?;
    super::digests::ensure_tables(conn)?;
    super::rebase::ensure_table(conn)
}

/// Sets whether the replica is applying the server's changes (the
/// triggers do not capture then). Runs inside the caller's transaction.
pub(crate) fn set_applying(conn: &Connection, applying: bool) -> Result<(), ClientError> {
    conn.prepare_cached("UPDATE _pgrelay_capture SET applying = ?1 WHERE id = 1")?
        .execute([i64::from(applying)])?;
    Ok(())
}

/// Names the client transaction the next captured writes belong to.
pub(crate) fn set_tx_id(conn: &Connection, tx_id: Option<&str>) -> Result<(), ClientError> {
    conn.prepare_cached("UPDATE _pgrelay_capture SET tx_id = ?1 WHERE id = 1")?
        .execute([tx_id])?;
    Ok(())
}

/// (Re)creates the three capture triggers of a synced table, for its
/// current columns.
pub(crate) fn create_triggers(conn: &Connection, table: &TableSchema) -> Result<(), ClientError> {
    conn.execute_batch(&triggers_sql(table))?;
    Ok(())
}

/// Drops the table's capture triggers (before its columns change).
pub(crate) fn drop_triggers(conn: &Connection, table: &TableSchema) -> Result<(), ClientError> {
    for op in ["insert", "update", "delete"] {
        conn.execute_batch(&format!(
            "DROP TRIGGER IF EXISTS {}",
            trigger_name(table, op)
        ))?;
    }
    Ok(())
}

fn trigger_name(table: &TableSchema, op: &str) -> String {
    quote(&format!("_pgrelay_capture_{}_{op}", table.sqlite_name()))
}

pub(crate) fn triggers_sql(table: &TableSchema) -> String {
    let name = quote(table.sqlite_name());
    let literal = table.name.replace('\'', "''");
    let mut sql = String::new();
    for (op, when, new, old) in [
        ("insert", "INSERT", Some("NEW"), None),
        ("update", "UPDATE", Some("NEW"), Some("OLD")),
        ("delete", "DELETE", None, Some("OLD")),
    ] {
        let trigger = trigger_name(table, op);
        let new_json = new.map_or("NULL".to_owned(), |r| row_json(table, r));
        let old_json = old.map_or("NULL".to_owned(), |r| row_json(table, r));
        sql.push_str(&format!(
            "DROP TRIGGER IF EXISTS {trigger};
CREATE TRIGGER {trigger} AFTER {when} ON {name}
WHEN (SELECT applying FROM _pgrelay_capture WHERE id = 1) = 0
BEGIN
  INSERT INTO _pgrelay_outbox (tx_id, change_id, table_name, op, new_row, old_row, created_us, updated_us)
  SELECT coalesce((SELECT tx_id FROM _pgrelay_capture WHERE id = 1), c.id), c.id, '{literal}', '{op}', {new_json}, {old_json}, c.now, c.now
  FROM (SELECT lower(hex(randomblob(16))) AS id, {NOW_US_SQL} AS now) AS c;
END;
"
        ));
    }
    sql
}

/// A JSON object of the row's columns, each value as close to
/// PostgreSQL's text form as SQLite can make it (blobs as `\x` hex, reals
/// with every digit).
fn row_json(table: &TableSchema, row: &str) -> String {
    let pairs: Vec<(String, String)> = table
        .columns
        .iter()
        .map(|c| {
            let v = format!("{row}.{}", quote(&c.name));
            let real = if c.kind == ValueKind::Float {
                format!("WHEN 'real' THEN printf('%!.17g', {v}) ")
            } else {
                String::new()
            };
            let expr = format!(
                "CASE typeof({v}) WHEN 'blob' THEN '\\x' || lower(hex({v})) {real}ELSE {v} END"
            );
            (c.name.replace('\'', "''"), expr)
        })
        .collect();
    let mut chunks = pairs.chunks(PAIRS_PER_CALL);
    let first = chunks.next().unwrap_or(&[]);
    let mut json = format!(
        "json_object({})",
        first
            .iter()
            .map(|(k, e)| format!("'{k}', {e}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    for chunk in chunks {
        let rest = chunk
            .iter()
            .map(|(k, e)| format!("'$.\"{k}\"', {e}"))
            .collect::<Vec<_>>()
            .join(", ");
        json = format!("json_insert({json}, {rest})");
    }
    json
}

#[cfg(test)]
mod tests {
    use super::*;
    use pgrelay_protocol::Column;

    fn table(columns: usize) -> TableSchema {
        TableSchema {
            name: "public.wide".into(),
            columns: (0..columns)
                .map(|n| Column {
                    name: format!("c{n}"),
                    pg_type: "text".into(),
                    type_oid: 25,
                    kind: if n == 1 {
                        ValueKind::Float
                    } else {
                        ValueKind::Text
                    },
                    attnum: None,
                })
                .collect(),
            primary_key: vec!["c0".into()],
            version: 1,
            skipped: None,
            backfilled: Vec::new(),
            oid: None,
        }
    }

    #[test]
    fn triggers_capture_local_writes_only() {
        let conn = Connection::open_in_memory().unwrap();
        ensure_tables(&conn).unwrap();
        let t = table(100);
        let cols = (0..100).map(|n| format!("c{n}")).collect::<Vec<_>>();
        conn.execute_batch(&format!(
            "CREATE TABLE wide ({}, PRIMARY KEY (c0))",
            cols.join(", ")
        ))
        .unwrap();
        create_triggers(&conn, &t).unwrap();
        conn.execute_batch("INSERT INTO wide (c0, c1, c99) VALUES ('k', 0.1 + 0.2, x'00ff')")
            .unwrap();
        let (op, new): (String, String) = conn
            .query_row("SELECT op, new_row FROM _pgrelay_outbox", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .unwrap();
        assert_eq!(op, "insert");
        let new: serde_json::Value = serde_json::from_str(&new).unwrap();
        assert_eq!(new["c0"], "k");
        // Every digit a double needs survives the trip through JSON.
        let real: f64 = new["c1"].as_str().unwrap().parse().unwrap();
        assert_eq!(real, 0.1 + 0.2);
        assert_eq!(new["c99"], "\\x00ff");
        assert!(new["c50"].is_null());
        assert_eq!(new.as_object().unwrap().len(), 100);

        set_applying(&conn, true).unwrap();
        conn.execute_batch("UPDATE wide SET c2 = 'x'; DELETE FROM wide")
            .unwrap();
        set_applying(&conn, false).unwrap();
        let n: i64 = conn
            .query_row("SELECT count(*) FROM _pgrelay_outbox", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 1, "writes while applying are not captured");

        conn.execute_batch("INSERT INTO wide (c0) VALUES ('a'), ('b')")
            .unwrap();
        set_tx_id(&conn, Some("t1")).unwrap();
        conn.execute_batch("UPDATE wide SET c2 = 'y'").unwrap();
        let grouped: i64 = conn
            .query_row(
                "SELECT count(*) FROM _pgrelay_outbox WHERE tx_id = 't1' AND op = 'update'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(grouped, 2, "one statement's rows share the transaction id");
        let singles: i64 = conn
            .query_row(
                "SELECT count(DISTINCT tx_id) FROM _pgrelay_outbox WHERE tx_id != 't1'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(
            singles, 3,
            "writes outside execute are one transaction each"
        );
    }
}
