//! Hydration on the replica's side: empties the tables a snapshot
//! replaces, loads its rows chunk by chunk, and on completion stores the
//! position the stream resumes from together with the snapshot's
//! visibility, so transactions the snapshot already holds are skipped.
//! Local writes the server has not confirmed are put back on top of the
//! fresh rows; they stay in the outbox and go out as before.

import type { Change, TableSchema, Transaction, Visibility } from "../protocol.js";
import { parseLsn, sees, sqliteName } from "../protocol.js";
import { loadCopyChunk } from "./bulk.js";
import { quietCapture } from "./capture.js";
import { applyChange, ReplicaError } from "./apply.js";
import { Conn, quote } from "./conn.js";
import { rowFromJson, unconfirmed } from "./outbox.js";
import { deleteMeta, readMeta, writeMeta } from "./schema.js";

export interface Pending {
  full: boolean;
  tables: string[];
}

export interface Filter {
  tables: string[];
  visibility: Visibility;
}

const PENDING_KEY = "hydrate";
/** Snapshot rows inserted by one statement (see ChunkInserts). */
const ROWS_PER_STATEMENT = 32;
/** SQLite's default SQLITE_MAX_VARIABLE_NUMBER. */
const MAX_PARAMETERS = 32766;
const FILTERS_KEY = "snapshot_filters";

export function pending(conn: Conn): Pending | null {
  const text = readMeta(conn, PENDING_KEY);
  return text === null ? null : (JSON.parse(text) as Pending);
}

function setPending(conn: Conn, p: Pending): void {
  writeMeta(conn, PENDING_KEY, JSON.stringify(p));
}

export function loadFilters(conn: Conn): Filter[] {
  const text = readMeta(conn, FILTERS_KEY);
  return text === null ? [] : (JSON.parse(text) as Filter[]);
}

/** Forgets the position: the next connection hydrates every table. */
export function reset(conn: Conn): void {
  deleteMeta(conn, "lsn");
  deleteMeta(conn, "log_id");
  deleteMeta(conn, FILTERS_KEY);
  setPending(conn, { full: true, tables: [] });
}

export function requestResync(conn: Conn, tables: string[]): void {
  const p = pending(conn) ?? { full: false, tables: [] };
  for (const t of tables) if (!p.tables.includes(t)) p.tables.push(t);
  setPending(conn, p);
}

export function begin(conn: Conn, tables: Map<string, TableSchema>, names: string[], full: boolean): void {
  if (full) {
    deleteMeta(conn, "lsn");
    deleteMeta(conn, FILTERS_KEY);
  }
  const p = pending(conn) ?? { full: false, tables: [] };
  p.full ||= full;
  for (const name of names) {
    clear(conn, tables, name);
    if (!p.tables.includes(name)) p.tables.push(name);
  }
  setPending(conn, p);
}

export function clear(conn: Conn, tables: Map<string, TableSchema>, name: string): void {
  const table = known(tables, name);
  if (!table.skipped) conn.run(`DELETE FROM ${quote(sqliteName(table.name))}`);
}

function known(tables: Map<string, TableSchema>, name: string): TableSchema {
  const t = tables.get(name);
  if (!t) throw new ReplicaError(`snapshot of unknown table ${name}`);
  return t;
}

/** Inserts a chunk of COPY text rows; returns how many. */
export function load(conn: Conn, tables: Map<string, TableSchema>, name: string, data: Uint8Array): number {
  const table = known(tables, name);
  // A table the replica cannot hold: its rows are counted (COPY text ends
  // every row with a newline and escapes the ones inside values), so the
  // snapshot still checks out, and dropped.
  if (table.skipped) return data.reduce((n, b) => n + (b === 10 ? 1 : 0), 0);
  const columns = table.columns;
  const insert = `INSERT OR REPLACE INTO ${quote(sqliteName(table.name))} (${columns.map((c) => quote(c.name)).join(", ")}) VALUES `;
  const row = `(${columns.map(() => "?").join(", ")})`;
  const rowsPerMany = Math.min(ROWS_PER_STATEMENT, Math.floor(MAX_PARAMETERS / columns.length));
  const inserts = {
    one: conn.cached(insert + row),
    many: rowsPerMany > 1 ? conn.cached(insert + Array(rowsPerMany).fill(row).join(", ")) : null,
    rowsPerMany,
  };
  // Without the capture triggers while loading (see quietCapture).
  quietCapture(conn, table);
  try {
    return loadCopyChunk(conn.sqlite3, conn.db.pointer as unknown as number, inserts, columns.map((c) => c.kind), data);
  } catch (e) {
    throw new ReplicaError(`snapshot of ${name}: ${(e as Error).message}`);
  }
}

/** The snapshot is complete and verified: position, filters, and the outbox replayed. */
export function finish(conn: Conn, tables: Map<string, TableSchema>, resume: string, full: boolean, names: string[], visibility: Visibility): Filter[] {
  if (full) writeMeta(conn, "lsn", resume);
  const filters = loadFilters(conn);
  filters.push({ tables: names, visibility });
  writeMeta(conn, FILTERS_KEY, JSON.stringify(filters));
  deleteMeta(conn, PENDING_KEY);
  for (const entry of unconfirmed(conn)) {
    if (!names.includes(entry.table_name)) continue;
    const schema = tables.get(entry.table_name);
    const change: Change = { table: entry.table_name, op: entry.op as Change["op"] };
    if (entry.new_row !== null) change.new = rowFromJson(entry.new_row, schema);
    if (entry.old_row !== null) change.old = rowFromJson(entry.old_row, schema);
    try {
      applyChange(conn, tables, change);
    } catch (e) {
      console.warn(`pgrelay: could not re-apply a pending local write to ${entry.table_name} after hydration: ${(e as Error).message}`);
    }
  }
  return filters;
}

/** Tables whose changes in `tx` a snapshot already holds. */
export function skipped(filters: Filter[], tx: Transaction): Set<string> {
  return tablesWhere(filters, tx, true);
}

/**
 * Tables whose changes in `tx`, a transaction the replica already holds
 * (at or below its position), a snapshot loaded since did not see: the
 * server streams such a transaction again (it was logged a moment before
 * PostgreSQL made it visible), and those tables need its changes.
 */
export function missed(filters: Filter[], tx: Transaction): Set<string> {
  return tablesWhere(filters, tx, false);
}

/** The tables of the snapshots `tx` is within that saw it (`seen`) or did not. */
function tablesWhere(filters: Filter[], tx: Transaction, seen: boolean): Set<string> {
  const out = new Set<string>();
  if (filters.length === 0) return out;
  const lsn = parseLsn(tx.lsn);
  for (const f of filters) {
    if (lsn <= parseLsn(f.visibility.until) && sees(f.visibility, tx.xid) === seen) for (const t of f.tables) out.add(t);
  }
  return out;
}

/** Drops filters the stream has passed. */
export function expire(conn: Conn, filters: Filter[], reached: bigint): Filter[] {
  const kept = filters.filter((f) => parseLsn(f.visibility.until) > reached);
  if (kept.length !== filters.length) {
    if (kept.length === 0) deleteMeta(conn, FILTERS_KEY);
    else writeMeta(conn, FILTERS_KEY, JSON.stringify(kept));
  }
  return kept;
}
