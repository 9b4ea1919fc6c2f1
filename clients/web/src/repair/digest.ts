//! Digests of key ranges, as the Rust protocol's `repair` module makes
//! them (see docs/repair.md): a row's hash is XXH3-128 of its canonical
//! values, each length-prefixed with a NULL marker; a range's digest is
//! the row count and the wrapping sum (mod 2^128) of its rows' hashes.
//! The client cuts a range into parts at its own key quantiles (`Cutter`).

import type { IHasher } from "hash-wasm";
import type { TableSchema } from "../protocol.js";

/** Rows per range in the first round (the replica's count divided by this, at most `MAX_FIRST_PARTS` ranges). */
export const FIRST_PART_ROWS = 256;
export const MAX_FIRST_PARTS = 16_384;
/** How many ranges a differing range is cut into for the next round. */
export const FANOUT = 4;
/** A differing range with at most this many rows on either side is replaced. */
export const LEAF_ROWS = 4;
/** Ranges per `check` message, at most (a single span may exceed it). */
export const MAX_CHECK_PARTS = 4_096;

/** How a key column is compared on both sides. */
export type KeyKind = "integer" | "text" | "uuid";

/** One key column's value: an integer (i64) or text. */
export type KeyValue = bigint | string;
/** A row's key: its key columns' values, compared as a row value. */
export type Key = KeyValue[];

/**
 * The key columns' kinds, or null when the table has no primary key or
 * one whose order the two sides might not agree on (compared whole).
 */
export function keyKinds(table: TableSchema): KeyKind[] | null {
  if (table.primary_key.length === 0) return null;
  const kinds: KeyKind[] = [];
  for (const name of table.primary_key) {
    const column = table.columns.find((c) => c.name === name);
    if (!column) return null;
    if (column.kind === "integer") kinds.push("integer");
    else if (column.kind === "text" && (column.type_oid === 25 || column.type_oid === 1043)) kinds.push("text");
    else if (column.kind === "text" && column.type_oid === 2950) kinds.push("uuid");
    else return null;
  }
  return kinds;
}

/**
 * Hashes rows: values are appended one by one (`null`, `text`, `utf8`),
 * then `finish` gives the row's XXH3-128 as 16 big-endian bytes (the Rust
 * `u128`'s order).
 */
export class RowHasher {
  private buffer = new Uint8Array(4096);
  private at = 0;
  private readonly encoder = new TextEncoder();

  constructor(private readonly hasher: IHasher) {}

  private room(bytes: number): void {
    if (this.at + bytes <= this.buffer.length) return;
    const bigger = new Uint8Array(Math.max(this.buffer.length * 2, this.at + bytes));
    bigger.set(this.buffer.subarray(0, this.at));
    this.buffer = bigger;
  }

  null(): void {
    this.room(1);
    this.buffer[this.at++] = 0;
  }

  private length(n: number): void {
    const b = this.buffer;
    const at = this.at;
    b[at] = 1;
    // A u64, big-endian; values are far below 2^32 bytes.
    b[at + 1] = b[at + 2] = b[at + 3] = b[at + 4] = 0;
    b[at + 5] = (n >>> 24) & 0xff;
    b[at + 6] = (n >>> 16) & 0xff;
    b[at + 7] = (n >>> 8) & 0xff;
    b[at + 8] = n & 0xff;
  }

  text(value: string): void {
    this.room(9 + value.length * 3);
    let n = 0;
    const b = this.buffer;
    const start = this.at + 9;
    // ASCII by hand: encodeInto costs more than the copy for short strings.
    if (value.length <= 64) {
      for (; n < value.length; n++) {
        const c = value.charCodeAt(n);
        if (c > 0x7f) break;
        b[start + n] = c;
      }
    }
    if (n < value.length) n = this.encoder.encodeInto(value, b.subarray(start)).written;
    this.length(n);
    this.at = start + n;
  }

  /** A value already UTF-8: `n` bytes of `memory` from `from` (text in SQLite's memory). */
  utf8(memory: Uint8Array, from: number, n: number): void {
    this.room(9 + n);
    this.length(n);
    const b = this.buffer;
    const to = this.at + 9;
    // Short values by hand: a view to copy from costs more than the copy.
    if (n <= 32) for (let i = 0; i < n; i++) b[to + i] = memory[from + i]!;
    else b.set(memory.subarray(from, from + n), to);
    this.at = to + n;
  }

  finish(): Uint8Array {
    this.hasher.init();
    this.hasher.update(this.buffer.subarray(0, this.at));
    this.at = 0;
    return this.hasher.digest("binary");
  }

  /** A whole row of canonical values. */
  row(values: readonly (string | null)[]): Uint8Array {
    for (const v of values) {
      if (v === null) this.null();
      else this.text(v);
    }
    return this.finish();
  }
}

/** Row count and the wrapping sum of row hashes, in four 32-bit limbs (most significant first). */
export class RangeSum {
  rows = 0;
  private readonly limbs = new Uint32Array(4);

  add(hash: Uint8Array): void {
    this.rows++;
    this.addHash(hash, 1);
  }

  remove(hash: Uint8Array): void {
    this.rows = Math.max(0, this.rows - 1);
    this.addHash(hash, -1);
  }

  /** A hash's 16 big-endian bytes, added or taken away (no array made: every row passes here). */
  private addHash(hash: Uint8Array, sign: 1 | -1): void {
    let carry = 0;
    for (let i = 3; i >= 0; i--) {
      const o = i * 4;
      const w = ((hash[o]! << 24) | (hash[o + 1]! << 16) | (hash[o + 2]! << 8) | hash[o + 3]!) >>> 0;
      const v = this.limbs[i]! + sign * w + carry;
      carry = Math.floor(v / 0x1_0000_0000);
      this.limbs[i] = v - carry * 0x1_0000_0000;
    }
  }

  merge(other: RangeSum): void {
    this.rows += other.rows;
    this.addLimbs(other.limbs, 1);
  }

  subtract(other: RangeSum): void {
    this.rows = Math.max(0, this.rows - other.rows);
    this.addLimbs(other.limbs, -1);
  }

  private addLimbs(w: ArrayLike<number>, sign: 1 | -1): void {
    let carry = 0;
    for (let i = 3; i >= 0; i--) {
      const v = this.limbs[i]! + sign * w[i]! + carry;
      // Floor division, so a borrow (negative) carries -1.
      carry = Math.floor(v / 0x1_0000_0000);
      this.limbs[i] = v - carry * 0x1_0000_0000;
    }
  }

  /** The low 64 bits, 16 hex digits: how a range's digest travels. */
  short(): string {
    return hex8(this.limbs[2]!) + hex8(this.limbs[3]!);
  }

  /** All 128 bits, 32 hex digits (the table's full digest). */
  hex(): string {
    return hex8(this.limbs[0]!) + hex8(this.limbs[1]!) + this.short();
  }
}

function hex8(n: number): string {
  return n.toString(16).padStart(8, "0");
}

/** Where to cut `count` sorted rows into `parts` parts: the indices of the rows that start a new part. */
export function splitPoints(count: number, parts: number): number[] {
  const n = Math.min(Math.max(parts, 1), Math.max(count, 1));
  const size = Math.max(Math.ceil(count / n), 1);
  const out: number[] = [];
  for (let i = 1; i < n; i++) if (i * size < count) out.push(i * size);
  return out;
}

/** A range the client proposes, cut into parts (the protocol's `CheckSpan`). */
export interface CheckSpan {
  lo: Key | null;
  hi: Key | null;
  /** The inner bounds, ascending; one fewer than the parts. */
  bounds: Key[];
  /** The replica's row count per part. */
  rows: number[];
  /** The replica's short digest per part, 16 hex digits each. */
  digests: string;
  /** Send the rows of every differing part (a table compared whole). */
  whole: boolean;
}

/** The bounds of part `i` of a span. */
export function partRange(span: CheckSpan, i: number): { lo: Key | null; hi: Key | null } {
  return { lo: i === 0 ? span.lo : span.bounds[i - 1]!, hi: span.bounds[i] ?? span.hi };
}

/**
 * Cuts one range of rows, fed in key order, into parts of about equal
 * size and digests each. The key is asked for only where a part starts.
 */
export class Cutter {
  private readonly span: CheckSpan;
  private readonly cuts: number[];
  private nextCut = 0;
  private seen = 0;
  private current = new RangeSum();
  readonly total = new RangeSum();

  constructor(lo: Key | null, hi: Key | null, count: number, parts: number) {
    this.span = { lo, hi, bounds: [], rows: [], digests: "", whole: false };
    this.cuts = splitPoints(count, parts);
  }

  /** The next row in key order; rows past the count go to the last part. */
  add(hash: Uint8Array, key: () => Key): void {
    if (this.cuts[this.nextCut] === this.seen) {
      this.closePart();
      this.span.bounds.push(key());
      this.nextCut++;
    }
    this.current.add(hash);
    this.total.add(hash);
    this.seen++;
  }

  private closePart(): void {
    this.span.rows.push(this.current.rows);
    this.span.digests += this.current.short();
    this.current = new RangeSum();
  }

  finish(whole: boolean): CheckSpan {
    this.closePart();
    this.span.whole = whole;
    return this.span;
  }
}
