//! Fast loading of snapshot rows: the chunk's COPY bytes are copied into
//! SQLite's WebAssembly memory once, and each value is bound straight from
//! there through the raw `sqlite3_bind_*` exports. The `oo1` binding API
//! converts every value on the JavaScript side (about 5-10 µs a value on
//! the build machine); this path makes one copy per chunk and no string
//! conversion, which is what hydration's rows/s depend on. Values with
//! backslash escapes, and bytea, take the ordinary path (decode, convert,
//! `oo1` bind), so the result is the same as `toSqlite` gives.

import type { PreparedStatement, Sqlite3Static } from "@sqlite.org/sqlite-wasm";
import type { ValueKind } from "../protocol.js";
import { decodeField } from "../copy-text.js";
import { toSqlite, type SqliteValue } from "../values.js";

const TAB = 0x09;
const NL = 0x0a;
const BACKSLASH = 0x5c;
const SQLITE_ROW = 100;
const SQLITE_DONE = 101;
/** The bytes stay in WebAssembly memory until the statement is stepped and its bindings cleared: SQLite does not copy them. */
const SQLITE_STATIC = 0;
const utf8 = new TextDecoder("utf-8", { fatal: true });

export class BulkError extends Error {
  override name = "BulkError";
}

/**
 * The insert of one row (one `?` a column, in order), and of `rowsPerMany`
 * rows at once (`many`, null for one): SQLite opens and positions the
 * table's cursor once per statement, so most rows go in `rowsPerMany` at a
 * time and the rest one by one.
 */
export interface ChunkInserts {
  one: PreparedStatement;
  many: PreparedStatement | null;
  rowsPerMany: number;
}

/**
 * Inserts every row of a COPY text chunk; returns the number of rows.
 * Throws on a malformed row or a value the column cannot hold, naming the
 * row.
 */
export function loadCopyChunk(sqlite3: Sqlite3Static, dbPointer: number, inserts: ChunkInserts, kinds: readonly ValueKind[], data: Uint8Array): number {
  if (data.length === 0) return 0;
  if (data[data.length - 1] !== NL) throw new BulkError("the last row does not end with a newline");
  // Rejects bad UTF-8 once for the whole chunk (SQLite would store it as is).
  try {
    utf8.decode(data);
  } catch {
    throw new BulkError("snapshot chunk is not UTF-8");
  }
  const wasm = sqlite3.wasm;
  const x = wasm.exports as Record<string, (...args: unknown[]) => number>;
  const bindText = x.sqlite3_bind_text!;
  const bindInt = x.sqlite3_bind_int!;
  const bindNull = x.sqlite3_bind_null!;
  const step = x.sqlite3_step!;
  const reset = x.sqlite3_reset!;
  const pOne = inserts.one.pointer as unknown as number;
  const pMany = inserts.many === null ? 0 : (inserts.many.pointer as unknown as number);
  const perMany = inserts.many === null ? 1 : inserts.rowsPerMany;
  // COPY text escapes the newlines inside values: one newline, one row.
  let total = 0;
  for (let at = data.indexOf(NL); at >= 0; at = data.indexOf(NL, at + 1)) total++;
  const inMany = inserts.many === null ? 0 : total - (total % perMany);
  const base = wasm.alloc(data.length) as unknown as number;
  try {
    wasm.heap8u().set(data, base);
    const columns = kinds.length;
    let rows = 0;
    let pos = 0;
    while (pos < data.length) {
      const many = rows < inMany;
      const p = many ? pMany : pOne;
      const offset = many ? (rows % perMany) * columns : 0;
      rows++;
      let col = 0;
      for (;;) {
        // One field: [pos, end), ends at a tab or the row's newline.
        let end = pos;
        let escaped = false;
        let b = data[end]!;
        while (b !== TAB && b !== NL) {
          if (b === BACKSLASH) escaped = true;
          b = data[++end]!;
        }
        if (col >= columns) throw new BulkError(`row ${rows} has more than ${columns} values`);
        const kind = kinds[col]!;
        const len = end - pos;
        const idx = offset + col + 1;
        if (escaped || kind === "bytes") {
          if (len === 2 && data[pos] === BACKSLASH && data[pos + 1] === 0x4e) {
            bindNull(p, idx);
          } else {
            let v: SqliteValue;
            try {
              v = toSqlite(kind, decodeField(utf8.decode(data.subarray(pos, end)), rows));
            } catch (e) {
              throw new BulkError(`row ${rows}, column ${col + 1}: ${(e as Error).message}`);
            }
            (many ? inserts.many! : inserts.one).bind(idx, v as never);
          }
        } else if (kind === "bool") {
          if (len !== 1 || (data[pos] !== 0x74 && data[pos] !== 0x66)) throw new BulkError(`row ${rows}, column ${col + 1}: bool value is not t or f`);
          bindInt(p, idx, data[pos] === 0x74 ? 1 : 0);
        } else {
          // Text, numeric, json, float and integer go in as text; the
          // column's affinity (INTEGER, REAL) stores numbers as numbers,
          // exactly as converting them here would.
          if (kind === "integer" && !isInteger(data, pos, end)) {
            throw new BulkError(`row ${rows}, column ${col + 1}: integer value is not a 64-bit integer`);
          }
          bindText(p, idx, base + pos, len, SQLITE_STATIC);
        }
        col++;
        pos = end + 1;
        if (b === NL) break;
      }
      if (col !== columns) throw new BulkError(`row ${rows} has ${col} values for ${columns} columns`);
      if (many && rows % perMany !== 0) continue;
      const rc = step(p);
      reset(p);
      if (rc !== SQLITE_DONE && rc !== SQLITE_ROW) {
        const which = many ? `rows ${rows - perMany + 1}-${rows}` : `row ${rows}`;
        throw new BulkError(`${which}: ${sqlite3.capi.sqlite3_errmsg(dbPointer as never)}`);
      }
    }
    if (rows !== total) throw new BulkError(`${rows} rows parsed where ${total} lines are`);
    return rows;
  } finally {
    x.sqlite3_clear_bindings!(pOne);
    if (pMany !== 0) {
      x.sqlite3_reset!(pMany);
      x.sqlite3_clear_bindings!(pMany);
    }
    wasm.dealloc(base as never);
  }
}

/** Optional sign and 1-19 digits: what PostgreSQL prints for integer types (range checked by SQLite's affinity below 2^63). */
function isInteger(data: Uint8Array, start: number, end: number): boolean {
  let i = start;
  if (data[i] === 0x2d || data[i] === 0x2b) i++;
  const digits = end - i;
  if (digits < 1 || digits > 19) return false;
  for (; i < end; i++) if (data[i]! < 0x30 || data[i]! > 0x39) return false;
  // 19 digits may exceed 2^63-1; the exact check is cheap for these few.
  if (digits === 19) {
    const big = BigInt(utf8.decode(data.subarray(start, end)));
    return big >= -(1n << 63n) && big < 1n << 63n;
  }
  return true;
}

const encoder = new TextEncoder();
/** Scratch memory in each SQLite instance's heap for the values of the statement being bound. */
const scratches = new WeakMap<Sqlite3Static, { base: number; size: number }>();

function scratchFor(sqlite3: Sqlite3Static, bytes: number): { base: number; size: number } {
  let scratch = scratches.get(sqlite3);
  if (!scratch || scratch.size < bytes) {
    if (scratch) sqlite3.wasm.dealloc(scratch.base as never);
    const size = Math.max(bytes, 64 * 1024);
    scratch = { base: sqlite3.wasm.alloc(size) as unknown as number, size };
    scratches.set(sqlite3, scratch);
  }
  return scratch;
}

/**
 * Binds `values` to `stmt`'s parameters 1..n through the raw exports (the
 * reason is the same as for loadCopyChunk: `oo1`'s bind costs several
 * microseconds a value). Strings and blobs are written one after another
 * into scratch memory and bound in place (SQLite does not copy them), so
 * the caller steps the statement and clears its bindings before binding
 * anything again (Conn.run does).
 */
export function bindValues(sqlite3: Sqlite3Static, stmt: PreparedStatement, values: readonly unknown[]): void {
  const x = sqlite3.wasm.exports as Record<string, (...args: unknown[]) => number>;
  const p = stmt.pointer as unknown as number;
  // UTF-8 takes at most 3 bytes per UTF-16 unit.
  let need = 0;
  for (let i = 0; i < values.length; i++) {
    const v = values[i];
    if (typeof v === "string") need += v.length * 3;
    else if (v instanceof Uint8Array) need += v.length;
  }
  const scratch = need > 0 ? scratchFor(sqlite3, need) : null;
  let heap = scratch === null ? null : sqlite3.wasm.heap8u();
  let at = scratch === null ? 0 : scratch.base;
  for (let i = 0; i < values.length; i++) {
    const v = values[i];
    const idx = i + 1;
    let rc = 0;
    if (v === null || v === undefined) rc = x.sqlite3_bind_null!(p, idx);
    else if (typeof v === "number") {
      if (Number.isInteger(v) && v >= -2147483648 && v <= 2147483647) rc = x.sqlite3_bind_int!(p, idx, v);
      else if (Number.isSafeInteger(v)) rc = x.sqlite3_bind_int64!(p, idx, BigInt(v));
      else rc = x.sqlite3_bind_double!(p, idx, v);
    } else if (typeof v === "bigint") rc = x.sqlite3_bind_int64!(p, idx, v);
    else if (typeof v === "boolean") rc = x.sqlite3_bind_int!(p, idx, v ? 1 : 0);
    else if (typeof v === "string") {
      // A view of memory that grew since (oo1's bind below allocates) is empty.
      if (heap!.length === 0) heap = sqlite3.wasm.heap8u();
      // ASCII (most values) is copied by hand: encodeInto and the view it
      // needs cost more than the copy for short strings.
      let written = 0;
      const n = v.length;
      if (n <= 256) {
        for (; written < n; written++) {
          const c = v.charCodeAt(written);
          if (c > 0x7f) break;
          heap![at + written] = c;
        }
      }
      if (written < n) written = encoder.encodeInto(v, heap!.subarray(at, at + n * 3)).written;
      rc = x.sqlite3_bind_text!(p, idx, at, written, SQLITE_STATIC);
      at += written;
    } else if (v instanceof Uint8Array) {
      if (heap!.length === 0) heap = sqlite3.wasm.heap8u();
      heap!.set(v, at);
      rc = x.sqlite3_bind_blob!(p, idx, at, v.length, SQLITE_STATIC);
      at += v.length;
    } else {
      // Anything else: oo1's rules (and its error for what cannot be bound).
      stmt.bind(idx, v as never);
    }
    if (rc !== 0) throw new BulkError(`binding parameter ${idx}: SQLite error ${rc}`);
  }
}
