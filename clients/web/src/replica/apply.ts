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
  const plan = planFor(table);
  const name = plan.name;
  switch (change.op) {
    case "truncate":
      conn.run(`DELETE FROM ${name}`);
      return;
    case "insert":
      upsert(conn, table, plan, required(change.new, table, "insert"));
      return;
    case "update": {
      const next = required(change.new, table, "update");
      const target = change.old ?? next;
      const [cols, vals] = values(table, next);
      if (cols.length === 0) return;
      const [where, whereVals] = locate(table, target);
      const set = cols.map((c) => `${quote(c)} = ?`).join(", ");
      const changed = conn.run(`UPDATE ${name} SET ${set} WHERE ${where}`, [...vals, ...whereVals]);
      if (changed === 0 && table.columns.every((c) => c.name in next)) upsert(conn, table, plan, next);
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

/**
 * A table's statement text, built once: the quoted name, the insert of a
 * whole row, and inserts by column list (building the text for every row
 * costs more than running it).
 */
interface Plan {
  name: string;
  verb: string;
  fullInsert: string;
  byColumns: Map<string, string>;
}

const plans = new WeakMap<TableSchema, Plan>();

function planFor(table: TableSchema): Plan {
  let plan = plans.get(table);
  if (!plan) {
    const name = quote(sqliteName(table.name));
    const verb = table.primary_key.length === 0 ? "INSERT" : "INSERT OR REPLACE";
    const cols = table.columns.map((c) => c.name);
    plan = { name, verb, fullInsert: insertSql(verb, name, cols), byColumns: new Map() };
    plans.set(table, plan);
  }
  return plan;
}

function insertSql(verb: string, name: string, cols: string[]): string {
  return `${verb} INTO ${name} (${cols.map(quote).join(", ")}) VALUES (${cols.map(() => "?").join(", ")})`;
}

function upsert(conn: Conn, table: TableSchema, plan: Plan, row: Row): void {
  // Most rows carry every column: converted straight into the insert's values.
  const columns = table.columns;
  let whole = true;
  for (let i = 0; i < columns.length; i++) {
    if (!(columns[i]!.name in row)) {
      whole = false;
      break;
    }
  }
  if (whole) {
    const vals = new Array<SqliteValue>(columns.length);
    for (let i = 0; i < columns.length; i++) {
      const c = columns[i]!;
      vals[i] = convert(table, c.name, c.kind, row[c.name]);
    }
    conn.run(plan.fullInsert, vals);
    return;
  }
  const [cols, vals] = values(table, row);
  let sql: string;
  if (cols.length === table.columns.length) {
    sql = plan.fullInsert;
  } else {
    const key = cols.join("\u0000");
    sql = plan.byColumns.get(key) ?? insertSql(plan.verb, plan.name, cols);
    plan.byColumns.set(key, sql);
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
