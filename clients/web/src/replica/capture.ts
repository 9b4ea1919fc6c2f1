//! Captures the application's own writes: triggers on every synced table
//! copy each local INSERT, UPDATE and DELETE into `_pgrelay_outbox` in the
//! same SQLite transaction as the write. They stay quiet while the replica
//! applies the server's transactions (`_pgrelay_capture.applying`).
//! Unlike the Rust client's triggers these write every value as JSON text
//! (integers too), so JavaScript's JSON parser never rounds a 64-bit one.

import type { TableSchema } from "../protocol.js";
import { sqliteName } from "../protocol.js";
import { Conn, quote } from "./conn.js";

const CAPTURE_SQL = `
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
INSERT OR IGNORE INTO _pgrelay_capture (id, tx_id, applying) VALUES (1, NULL, 0);`;

/** Microseconds since the Unix epoch, in SQLite. */
export const NOW_US_SQL = "CAST((julianday('now') - 2440587.5) * 86400000000.0 AS INTEGER)";

/** Pairs per json_object/json_insert call, under SQLite's argument limit. */
const PAIRS_PER_CALL = 40;

export function ensureCaptureTables(conn: Conn): void {
  conn.execBatch(CAPTURE_SQL);
}

export function setApplying(conn: Conn, applying: boolean): void {
  conn.run("UPDATE _pgrelay_capture SET applying = ?1 WHERE id = 1", [applying ? 1 : 0]);
}

export function setTxId(conn: Conn, txId: string | null): void {
  conn.run("UPDATE _pgrelay_capture SET tx_id = ?1 WHERE id = 1", [txId]);
}

export function createTriggers(conn: Conn, table: TableSchema): void {
  conn.execBatch(triggersSql(table));
}

/** SQLITE_DBCONFIG_ENABLE_TRIGGER (sqlite3.h). */
const ENABLE_TRIGGER = 1003;

/**
 * Keeps `table`'s capture triggers from firing until the open transaction
 * ends. Even a capture trigger whose WHEN is false costs about as much per
 * row as the insert itself, so bulk work (snapshot chunks, large applied
 * batches) sets them aside. When the replica has no triggers but pgrelay's
 * own, triggers are switched off for the connection (a flag, free; SQLite
 * re-prepares statements after it changes) and on again when the
 * transaction ends, committed or not. Otherwise the capture triggers are
 * dropped and created again before the commit (milliseconds each time), so
 * the application's own triggers still run.
 */
export function quietCapture(conn: Conn, table: TableSchema): void {
  if (!conn.inTransaction()) throw new Error("capture triggers are set aside inside a transaction only");
  const others = conn.value(
    `SELECT 1 FROM (SELECT name FROM sqlite_schema WHERE type = 'trigger' UNION ALL SELECT name FROM sqlite_temp_schema WHERE type = 'trigger')
     WHERE substr(name, 1, 17) <> '_pgrelay_capture_' LIMIT 1`,
  );
  if (others === undefined) {
    conn.once("triggers-off", () => enableTriggers(conn, false), () => enableTriggers(conn, true), true);
    return;
  }
  conn.once(
    `triggers:${table.name}`,
    () => dropTriggers(conn, table),
    () => createTriggers(conn, table),
  );
}

function enableTriggers(conn: Conn, on: boolean): void {
  const rc = conn.sqlite3.capi.sqlite3_db_config(conn.db.pointer!, ENABLE_TRIGGER, on ? 1 : 0, 0);
  if (rc !== 0) throw new Error(`cannot switch triggers ${on ? "on" : "off"}: SQLite error ${rc}`);
}

/**
 * Drops a table's capture triggers. Snapshot loading does this inside its
 * transaction and creates them again before committing: even a trigger
 * whose WHEN is false costs as much per row as the insert itself.
 */
export function dropTriggers(conn: Conn, table: TableSchema): void {
  conn.execBatch(
    ["insert", "update", "delete"].map((op) => `DROP TRIGGER IF EXISTS ${quote(`_pgrelay_capture_${sqliteName(table.name)}_${op}`)};`).join("\n"),
  );
}

function triggersSql(table: TableSchema): string {
  const name = quote(sqliteName(table.name));
  const literal = table.name.replaceAll("'", "''");
  let sql = "";
  for (const [op, when, newRef, oldRef] of [
    ["insert", "INSERT", "NEW", null],
    ["update", "UPDATE", "NEW", "OLD"],
    ["delete", "DELETE", null, "OLD"],
  ] as const) {
    const trigger = quote(`_pgrelay_capture_${sqliteName(table.name)}_${op}`);
    const newJson = newRef ? rowJson(table, newRef) : "NULL";
    const oldJson = oldRef ? rowJson(table, oldRef) : "NULL";
    sql += `DROP TRIGGER IF EXISTS ${trigger};
CREATE TRIGGER ${trigger} AFTER ${when} ON ${name}
WHEN (SELECT applying FROM _pgrelay_capture WHERE id = 1) = 0
BEGIN
  INSERT INTO _pgrelay_outbox (tx_id, change_id, table_name, op, new_row, old_row, created_us, updated_us)
  SELECT coalesce((SELECT tx_id FROM _pgrelay_capture WHERE id = 1), c.id), c.id, '${literal}', '${op}', ${newJson}, ${oldJson}, c.now, c.now
  FROM (SELECT lower(hex(randomblob(16))) AS id, ${NOW_US_SQL} AS now) AS c;
END;
`;
  }
  return sql;
}

function rowJson(table: TableSchema, row: string): string {
  const pairs = table.columns.map((c) => {
    const v = `${row}.${quote(c.name)}`;
    const expr =
      `CASE typeof(${v}) WHEN 'blob' THEN '\\x' || lower(hex(${v})) ` +
      `WHEN 'real' THEN printf('%!.17g', ${v}) WHEN 'integer' THEN CAST(${v} AS TEXT) ELSE ${v} END`;
    return [c.name.replaceAll("'", "''"), expr] as const;
  });
  const chunks: (typeof pairs)[] = [];
  for (let i = 0; i < pairs.length; i += PAIRS_PER_CALL) chunks.push(pairs.slice(i, i + PAIRS_PER_CALL));
  const first = chunks.shift() ?? [];
  let json = `json_object(${first.map(([k, e]) => `'${k}', ${e}`).join(", ")})`;
  for (const chunk of chunks) {
    json = `json_insert(${json}, ${chunk.map(([k, e]) => `'$."${k}"', ${e}`).join(", ")})`;
  }
  return json;
}
