//! Builds and updates the replica's tables from the server's schema, and
//! keeps pgrelay's bookkeeping tables (same layout as the Rust client's).

import type { TableSchema, ValueKind } from "../protocol.js";
import { sqliteName } from "../protocol.js";
import { createTriggers, dropTriggers } from "./capture.js";
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
 * Creates a synced table that does not exist yet, adds columns the server
 * added and drops those it dropped (or renamed); a column whose storage
 * changed, a new primary key, or a column SQLite cannot drop in place
 * rebuilds the table empty. Runs inside the caller's transaction. Returns
 * whether it was rebuilt (its rows must come again from a snapshot).
 */
export function applyTable(conn: Conn, table: TableSchema): boolean {
  conn.run(
    "INSERT INTO _pgrelay_tables (name, schema) VALUES (?1, ?2) ON CONFLICT(name) DO UPDATE SET schema = excluded.schema",
    [table.name, JSON.stringify(table)],
  );
  if (table.skipped) return false;
  const name = sqliteName(table.name);
  let existing = conn
    .query("SELECT name, type, pk FROM pragma_table_info(?1)", [name])
    .map((r) => ({ name: String(r.name), type: String(r.type), pk: Number(r.pk) }));
  let rebuilt = table.columns.some((c) =>
    existing.some((e) => e.name === c.name && e.type.toUpperCase() !== sqliteType(c.kind)),
  );
  // A new primary key: SQLite cannot change one in place.
  const key = existing.filter((e) => e.pk > 0).sort((a, b) => a.pk - b.pk).map((e) => e.name);
  if (existing.length > 0 && key.join("\u0000") !== table.primary_key.join("\u0000")) rebuilt = true;
  if (!rebuilt && existing.length > 0) {
    // Dropped columns (or the old names of renamed ones) go in place; the
    // capture triggers name every column and are made again below.
    const gone = existing.filter((e) => !table.columns.some((c) => c.name === e.name));
    if (gone.length > 0) dropTriggers(conn, table);
    for (const column of gone) {
      try {
        conn.execBatch(`ALTER TABLE ${quote(name)} DROP COLUMN ${quote(column.name)}`);
      } catch {
        // Part of an index a client migration made: rebuilt instead.
        rebuilt = true;
        break;
      }
    }
    if (!rebuilt) existing = existing.filter((e) => !gone.includes(e));
  }
  if (rebuilt) {
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
  return rebuilt;
}
