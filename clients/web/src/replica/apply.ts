//! Applies the server's changes to the replica's tables. The caller holds
//! the SQLite transaction that also stores the LSN, so a server
//! transaction is applied whole or not at all.

import type { Change, Row, TableSchema } from "../protocol.js";
import { sqliteName } from "../protocol.js";
import { toSqlite, type SqliteValue } from "../values.js";
import { Conn, quote } from "./conn.js";

export class ReplicaError extends Error {
  override name = "ReplicaError";
}

export function applyChange(conn: Conn, tables: Map<string, TableSchema>, change: Change): void {
  const table = tables.get(change.table);
  if (!table) throw new ReplicaError(`change for unknown table ${change.table}`);
  if (table.skipped) return;
  const name = quote(sqliteName(table.name));
  switch (change.op) {
    case "truncate":
      conn.run(`DELETE FROM ${name}`);
      return;
    case "insert":
      upsert(conn, table, name, required(change.new, table, "insert"));
      return;
    case "update": {
      const next = required(change.new, table, "update");
      const target = change.old ?? next;
      const [cols, vals] = values(table, next);
      if (cols.length === 0) return;
      const [where, whereVals] = locate(table, target);
      const set = cols.map((c) => `${quote(c)} = ?`).join(", ");
      const changed = conn.run(`UPDATE ${name} SET ${set} WHERE ${where}`, [...vals, ...whereVals]);
      if (changed === 0 && table.columns.every((c) => c.name in next)) upsert(conn, table, name, next);
      return;
    }
    case "delete": {
      const [where, whereVals] = locate(table, required(change.old, table, "delete"));
      conn.run(`DELETE FROM ${name} WHERE ${where}`, whereVals);
      return;
    }
    default:
      throw new ReplicaError(`unknown operation ${String((change as { op: unknown }).op)} on ${change.table}`);
  }
}

function required(row: Row | undefined, table: TableSchema, op: string): Row {
  if (!row || typeof row !== "object") throw new ReplicaError(`${op} on ${table.name} without its row`);
  return row;
}

/** Statement text by table and column list: building it for every row costs more than running it. */
const upserts = new WeakMap<TableSchema, Map<string, string>>();

function upsert(conn: Conn, table: TableSchema, name: string, row: Row): void {
  const [cols, vals] = values(table, row);
  let byColumns = upserts.get(table);
  if (!byColumns) upserts.set(table, (byColumns = new Map()));
  const key = cols.join("\u0000");
  let sql = byColumns.get(key);
  if (sql === undefined) {
    const verb = table.primary_key.length === 0 ? "INSERT" : "INSERT OR REPLACE";
    sql = `${verb} INTO ${name} (${cols.map(quote).join(", ")}) VALUES (${cols.map(() => "?").join(", ")})`;
    byColumns.set(key, sql);
  }
  conn.run(sql, vals);
}

/** The row's values for the table's known columns (others are left out). */
function values(table: TableSchema, row: Row): [string[], SqliteValue[]] {
  const cols: string[] = [];
  const vals: SqliteValue[] = [];
  for (const column of table.columns) {
    if (!(column.name in row)) continue;
    cols.push(column.name);
    vals.push(convert(table, column.name, column.kind, row[column.name]));
  }
  return [cols, vals];
}

function convert(table: TableSchema, column: string, kind: TableSchema["columns"][number]["kind"], text: string | null | undefined): SqliteValue {
  try {
    return toSqlite(kind, text);
  } catch (e) {
    throw new ReplicaError(`${table.name}.${column}: ${(e as Error).message}`);
  }
}

/** A WHERE clause finding the row: by key, or the first row equal in every column. */
function locate(table: TableSchema, row: Row): [string, SqliteValue[]] {
  if (table.primary_key.length > 0) {
    const clauses: string[] = [];
    const vals: SqliteValue[] = [];
    for (const key of table.primary_key) {
      const column = table.columns.find((c) => c.name === key);
      if (!column) throw new ReplicaError(`${table.name}: key column ${key} unknown`);
      if (!(key in row)) throw new ReplicaError(`${table.name}: change without key column ${key}`);
      clauses.push(`${quote(key)} = ?`);
      vals.push(convert(table, key, column.kind, row[key]));
    }
    return [clauses.join(" AND "), vals];
  }
  const [cols, vals] = values(table, row);
  const name = quote(sqliteName(table.name));
  const clauses = cols.map((c) => `${quote(c)} IS ?`).join(" AND ");
  return [`rowid = (SELECT rowid FROM ${name} WHERE ${clauses} LIMIT 1)`, vals];
}
