//! Repair on the replica's side (the Rust client's `replica/repair.rs`):
//! digests of key ranges of a table, cut at the replica's own key
//! quantiles; removal of the ranges the server replaces and insertion of
//! its rows; and, at the end, the position and visibility hand-over of a
//! full snapshot, with unsent local writes put back on top. Rows are read
//! through SQLite's raw exports and their text hashed from SQLite's own
//! memory, with no string made per value (a first round reads every row).

import type { TableSchema, Visibility } from "../protocol.js";
import { sqliteName } from "../protocol.js";
import { canonicalBlob, canonicalPgText, canonicalStoredInteger, canonicalStoredReal, textIsCanonical } from "../canonical.js";
import { forEachRow } from "../copy-text.js";
import { Cutter, FANOUT, FIRST_PART_ROWS, keyKinds, MAX_FIRST_PARTS, RangeSum, type CheckSpan, type Key, type KeyKind, type RowHasher } from "../repair/digest.js";
import { ReplicaError } from "./apply.js";
import { bindValues } from "./bulk.js";
import { Conn, quote } from "./conn.js";
import * as snapshot from "./snapshot.js";
import { deleteMeta } from "./schema.js";

/** A range of keys to digest, and the replica's row count in it when known (from the previous round). */
export interface KeyRange {
  lo: Key | null;
  hi: Key | null;
  count: number | null;
}

interface RawExports {
  sqlite3_step(stmt: number): number;
  sqlite3_reset(stmt: number): number;
  sqlite3_clear_bindings(stmt: number): number;
  sqlite3_column_type(stmt: number, i: number): number;
  sqlite3_column_double(stmt: number, i: number): number;
  sqlite3_column_int64(stmt: number, i: number): bigint | number;
  sqlite3_column_blob(stmt: number, i: number): number;
  sqlite3_column_bytes(stmt: number, i: number): number;
}

const SQLITE_ROW = 100;
const SQLITE_DONE = 101;
const INTEGER = 1;
const FLOAT = 2;
const TEXT = 3;
const BLOB = 4;
/** Like Rust's `String::from_utf8_lossy`. */
const utf8 = new TextDecoder();

function held(tables: Map<string, TableSchema>, name: string): TableSchema {
  const table = tables.get(name);
  if (!table || table.skipped) throw new ReplicaError(`repair of a table the replica does not hold: ${name}`);
  return table;
}

/** `WHERE` SQL and its parameters for the rows of `lo..hi`. */
function condition(table: TableSchema, lo: Key | null, hi: Key | null): [string, unknown[]] {
  const columns = table.primary_key.map(quote).join(", ");
  const sql = ["1"];
  const params: unknown[] = [];
  for (const [key, op] of [[lo, ">="], [hi, "<"]] as const) {
    if (key === null) continue;
    sql.push(`(${columns}) ${op} (${key.map(() => "?").join(", ")})`);
    for (const v of key) params.push(typeof v === "bigint" && v >= -(2n ** 53n) && v <= 2n ** 53n ? Number(v) : v);
  }
  return [sql.join(" AND "), params];
}

/**
 * Reads the rows of `lo..hi` (in key order when the table has a key that
 * compares by range), calling `row` with each row's hash and a function
 * that gives its key (valid during the call only).
 */
function scan(conn: Conn, table: TableSchema, kinds: KeyKind[] | null, lo: Key | null, hi: Key | null, hasher: RowHasher, row: (hash: Uint8Array, key: () => Key) => void): void {
  const [where, params] = condition(table, lo, hi);
  const order = kinds === null ? "" : ` ORDER BY ${table.primary_key.map(quote).join(", ")}`;
  const stmt = conn.cached(`SELECT ${table.columns.map((c) => quote(c.name)).join(", ")} FROM ${quote(sqliteName(table.name))} WHERE ${where}${order}`);
  const p = stmt.pointer as unknown as number;
  const sqlite3 = conn.sqlite3;
  const x = sqlite3.wasm.exports as unknown as RawExports;
  const columns = table.columns;
  const keyAt = table.primary_key.map((k) => columns.findIndex((c) => c.name === k));
  const textAsStored = columns.map((c) => textIsCanonical(c.kind));
  const heap = (i: number): Uint8Array => {
    const at = x.sqlite3_column_blob(p, i);
    return sqlite3.wasm.heap8u().subarray(at, at + x.sqlite3_column_bytes(p, i));
  };
  /** Column `i`'s canonical value, from what SQLite stores (its own type, not the column's). */
  const canonical = (i: number, type = x.sqlite3_column_type(p, i)): string | null => {
    const kind = columns[i]!.kind;
    switch (type) {
      case INTEGER: {
        const d = x.sqlite3_column_double(p, i);
        if (Number.isSafeInteger(d)) return canonicalStoredInteger(kind, d);
        const v = x.sqlite3_column_int64(p, i);
        return canonicalStoredInteger(kind, typeof v === "bigint" ? v : BigInt(v));
      }
      case FLOAT:
        return canonicalStoredReal(kind, x.sqlite3_column_double(p, i));
      case TEXT:
        return canonicalPgText(kind, utf8.decode(heap(i)));
      case BLOB:
        return canonicalBlob(kind, heap(i));
      default:
        return null;
    }
  };
  const key = (): Key =>
    keyAt.map((i, k) => {
      const value = canonical(i);
      const kind = kinds![k]!;
      if (value !== null && kind === "integer" && /^-?\d+$/.test(value)) return BigInt(value);
      if (value !== null && kind !== "integer") return kind === "uuid" ? value.toLowerCase() : value;
      throw new ReplicaError(`a row of ${table.name} has no valid key`);
    });
  try {
    if (params.length > 0) bindValues(sqlite3, stmt, params);
    for (;;) {
      const rc = x.sqlite3_step(p);
      if (rc === SQLITE_DONE) break;
      if (rc !== SQLITE_ROW) sqlite3.oo1.DB.checkRc(conn.db, rc);
      for (let i = 0; i < columns.length; i++) {
        const type = x.sqlite3_column_type(p, i);
        if (textAsStored[i] && type === TEXT) {
          // Hashed as stored: SQLite's UTF-8 bytes, no string made.
          const at = x.sqlite3_column_blob(p, i);
          hasher.utf8(sqlite3.wasm.heap8u(), at, x.sqlite3_column_bytes(p, i));
          continue;
        }
        const value = canonical(i, type);
        if (value === null) hasher.null();
        else hasher.text(value);
      }
      row(hasher.finish(), key);
    }
  } finally {
    x.sqlite3_clear_bindings(p);
    x.sqlite3_reset(p);
  }
}

/**
 * Digests `ranges` of a table: each cut into parts (a first round, with
 * no count known, into parts of about `FIRST_PART_ROWS` rows, or
 * `firstParts`; later ones into `FANOUT`). Returns the spans and the sum
 * of every row in them; null for a table the replica does not hold.
 */
export function digest(conn: Conn, tables: Map<string, TableSchema>, name: string, ranges: KeyRange[], hasher: RowHasher, firstParts?: number): { spans: CheckSpan[]; sum: RangeSum } | null {
  const table = tables.get(name);
  if (!table || table.skipped) return null;
  const kinds = keyKinds(table);
  const spans: CheckSpan[] = [];
  const sum = new RangeSum();
  for (const range of ranges) {
    let parts = 1;
    let count = 0;
    if (kinds !== null && range.count !== null) {
      parts = FANOUT;
      count = range.count;
    } else if (kinds !== null) {
      const [where, params] = condition(table, range.lo, range.hi);
      count = Number(conn.value(`SELECT count(*) FROM ${quote(sqliteName(table.name))} WHERE ${where}`, params as never) ?? 0);
      parts = firstParts ?? Math.min(Math.max(Math.ceil(count / FIRST_PART_ROWS), 1), MAX_FIRST_PARTS);
    }
    const cutter = new Cutter(range.lo, range.hi, count, parts);
    scan(conn, table, kinds, range.lo, range.hi, hasher, (hash, key) => cutter.add(hash, key));
    spans.push(cutter.finish(kinds === null));
    sum.merge(cutter.total);
  }
  return { spans, sum };
}

/** Removes the rows of `ranges`; returns what they summed to. */
export function remove(conn: Conn, tables: Map<string, TableSchema>, name: string, ranges: { lo: Key | null; hi: Key | null }[], hasher: RowHasher): RangeSum {
  const table = held(tables, name);
  const kinds = keyKinds(table);
  const removed = new RangeSum();
  for (const { lo, hi } of ranges) {
    scan(conn, table, kinds, lo, hi, hasher, (hash) => removed.add(hash));
    const [where, params] = condition(table, lo, hi);
    conn.run(`DELETE FROM ${quote(sqliteName(table.name))} WHERE ${where}`, params);
  }
  return removed;
}

/** Inserts the server's rows (COPY text); returns what they sum to. */
export function load(conn: Conn, tables: Map<string, TableSchema>, name: string, copy: Uint8Array, hasher: RowHasher): RangeSum {
  const table = held(tables, name);
  snapshot.load(conn, tables, name, copy);
  const added = new RangeSum();
  const kinds = table.columns.map((c) => c.kind);
  const values: (string | null)[] = [];
  forEachRow(copy, (row) => {
    values.length = 0;
    for (let i = 0; i < kinds.length; i++) values.push(canonicalPgText(kinds[i]!, row[i] ?? null));
    added.add(hasher.row(values));
  });
  return added;
}

/**
 * The repair is complete: the replica's position becomes the snapshot's,
 * transactions it holds are skipped, unsent local writes are put back,
 * and tables whose full digest did not match are fetched again.
 */
export function finish(conn: Conn, tables: Map<string, TableSchema>, resume: string, names: string[], visibility: Visibility, refetch: string[]): snapshot.Filter[] {
  // A repair starts the position afresh: earlier snapshots' filters go.
  deleteMeta(conn, "snapshot_filters");
  const filters = snapshot.finish(conn, tables, resume, true, names, visibility);
  if (refetch.length > 0) snapshot.requestResync(conn, refetch);
  return filters;
}
