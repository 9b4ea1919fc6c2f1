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
/** SQLite copies the bytes (the chunk's buffer is freed after the chunk). */
const SQLITE_TRANSIENT = -1;
const utf8 = new TextDecoder("utf-8", { fatal: true });

export class BulkError extends Error {
  override name = "BulkError";
}

/**
 * Inserts every row of a COPY text chunk with `stmt` (one `?` a column,
 * in order); returns the number of rows. Throws on a malformed row or a
 * value the column cannot hold, naming the row.
 */
export function loadCopyChunk(
  sqlite3: Sqlite3Static,
  dbPointer: number,
  stmt: PreparedStatement,
  kinds: readonly ValueKind[],
  data: Uint8Array,
): number {
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
  const p = stmt.pointer as unknown as number;
  const base = wasm.alloc(data.length) as unknown as number;
  try {
    wasm.heap8u().set(data, base);
    const columns = kinds.length;
    let rows = 0;
    let pos = 0;
    while (pos < data.length) {
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
        const idx = col + 1;
        if (escaped || kind === "bytes") {
          if (len === 2 && data[pos] === BACKSLASH && data[pos + 1] === 0x4e) {
            bindNull(p, idx);
          } else {
            let v: SqliteValue;
            try {
              v = toSqlite(kind, decodeField(utf8.decode(data.subarray(pos, end)), rows));
            } catch (e) {
              throw new BulkError(`row ${rows}, column ${idx}: ${(e as Error).message}`);
            }
            stmt.bind(idx, v as never);
          }
        } else if (kind === "bool") {
          if (len !== 1 || (data[pos] !== 0x74 && data[pos] !== 0x66)) throw new BulkError(`row ${rows}, column ${idx}: bool value is not t or f`);
          bindInt(p, idx, data[pos] === 0x74 ? 1 : 0);
        } else {
          // Text, numeric, json, float and integer go in as text; the
          // column's affinity (INTEGER, REAL) stores numbers as numbers,
          // exactly as converting them here would.
          if (kind === "integer" && !isInteger(data, pos, end)) {
            throw new BulkError(`row ${rows}, column ${idx}: integer value is not a 64-bit integer`);
          }
          bindText(p, idx, base + pos, len, SQLITE_TRANSIENT);
        }
        col++;
        pos = end + 1;
        if (b === NL) break;
      }
      if (col !== columns) throw new BulkError(`row ${rows} has ${col} values for ${columns} columns`);
      const rc = step(p);
      reset(p);
      if (rc !== SQLITE_DONE && rc !== SQLITE_ROW) {
        throw new BulkError(`row ${rows}: ${sqlite3.capi.sqlite3_errmsg(dbPointer as never)}`);
      }
    }
    return rows;
  } finally {
    x.sqlite3_clear_bindings!(p);
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
