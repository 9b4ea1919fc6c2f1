//! Builds and updates the replica's tables from the server's schema, and
//! keeps pgrelay's bookkeeping tables (same layout as the Rust client's).

import type { TableSchema, ValueKind } from "../protocol.js";
import { sqliteName } from "../protocol.js";
import { createTriggers } from "./capture.js";
import { Conn, quote } from "./conn.js";

const META_SQL = `
CREATE TABLE IF NOT EXISTS _pgrelay_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS _pgrelay_tables (name TEXT PRIMARY KEY, schema TEXT NOT NULL);`;

export function ensureMeta(conn: Conn): void {
  conn.execBatch(META_SQL);
}

export function sqliteType(kind: ValueKind): string {
  switch (kind) {
    case "integer":
    case "bool":
      return "INTEGER";
    case "float":
      return "REAL";
    case "bytes":
      return "BLOB";
    default:
      return "TEXT";
  }
}

export function readMeta(conn: Conn, key: string): string | null {
  const v = conn.value("SELECT value FROM _pgrelay_meta WHERE key = ?1", [key]);
  return typeof v === "string" ? v : null;
}

export function writeMeta(conn: Conn, key: string, value: string): void {
  conn.run(
    "INSERT INTO _pgrelay_meta (key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
    [key, value],
  );
}

export function deleteMeta(conn: Conn, key: string): void {
  conn.run("DELETE FROM _pgrelay_meta WHERE key = ?1", [key]);
}

export function loadTables(conn: Conn): Map<string, TableSchema> {
  const tables = new Map<string, TableSchema>();
  for (const row of conn.all("SELECT schema FROM _pgrelay_tables ORDER BY name")) {
    const schema = JSON.parse(String(row.schema)) as TableSchema;
    tables.set(schema.name, schema);
  }
  return tables;
}

/**
 * Creates a synced table that does not exist yet and adds columns the
 * server added; a column whose storage changed rebuilds the table (its
 * rows come again from a snapshot). Runs inside the caller's transaction.
 */
export function applyTable(conn: Conn, table: TableSchema): void {
  conn.run(
    "INSERT INTO _pgrelay_tables (name, schema) VALUES (?1, ?2) ON CONFLICT(name) DO UPDATE SET schema = excluded.schema",
    [table.name, JSON.stringify(table)],
  );
  if (table.skipped) return;
  const name = sqliteName(table.name);
  let existing = conn
    .query("SELECT name, type FROM pragma_table_info(?1)", [name])
    .map((r) => ({ name: String(r.name), type: String(r.type) }));
  const retyped = table.columns.some((c) =>
    existing.some((e) => e.name === c.name && e.type.toUpperCase() !== sqliteType(c.kind)),
  );
  if (retyped) {
    conn.execBatch(`DROP TABLE ${quote(name)}`);
    existing = [];
  }
  if (existing.length === 0) {
    const defs = table.columns.map((c) => `${quote(c.name)} ${sqliteType(c.kind)}`);
    if (table.primary_key.length > 0) defs.push(`PRIMARY KEY (${table.primary_key.map(quote).join(", ")})`);
    conn.execBatch(`CREATE TABLE ${quote(name)} (${defs.join(", ")})`);
  } else {
    for (const column of table.columns) {
      if (existing.some((e) => e.name === column.name)) continue;
      conn.execBatch(`ALTER TABLE ${quote(name)} ADD COLUMN ${quote(column.name)} ${sqliteType(column.kind)}`);
    }
  }
  createTriggers(conn, table);
  conn.forget();
}
