//! How a value travels (PostgreSQL's text output) maps to how the replica
//! stores it, and back: the Rust client's mapping (README, "Values").
//! JavaScript differs in two places: a 64-bit integer outside ±2^53 is a
//! `bigint` (SQLite keeps every digit), and numerics stay TEXT.

import type { ValueKind } from "./protocol.js";

export type SqliteValue = number | bigint | string | Uint8Array | null;

export class ValueError extends Error {
  override name = "ValueError";
}

const MAX_SAFE = BigInt(Number.MAX_SAFE_INTEGER);
const INTEGER = /^[+-]?\d+$/;
const SMALL_INTEGER = /^-?\d{1,15}$/;
const I64_MIN = -(1n << 63n);
const I64_MAX = (1n << 63n) - 1n;

/** The SQLite value for PostgreSQL's text output of a value of `kind`. */
export function toSqlite(kind: ValueKind, text: string | null | undefined): SqliteValue {
  if (text === null || text === undefined) return null;
  switch (kind) {
    case "integer": {
      // Up to 15 digits is always a safe integer: no BigInt needed.
      if (SMALL_INTEGER.test(text)) return Number(text) + 0;
      if (!INTEGER.test(text)) throw new ValueError(`integer value ${JSON.stringify(text.slice(0, 100))} is not a 64-bit integer`);
      const big = BigInt(text);
      if (big < I64_MIN || big > I64_MAX) throw new ValueError(`integer value ${text.slice(0, 100)} is out of 64-bit range`);
      return big >= -MAX_SAFE && big <= MAX_SAFE ? Number(big) : big;
    }
    case "float": {
      const f = Number(text);
      // SQLite has no NaN (it becomes NULL) and prints infinities its own way.
      return Number.isFinite(f) && text.trim() !== "" ? f : text;
    }
    case "bool":
      if (text === "t") return 1;
      if (text === "f") return 0;
      throw new ValueError(`bool value ${JSON.stringify(text.slice(0, 100))} is not t or f`);
    case "bytes":
      return hexToBytes(text);
    default:
      return text;
  }
}

function hexToBytes(text: string): Uint8Array {
  if (!text.startsWith("\\x")) throw new ValueError("bytea value not in hex format");
  const hex = text.slice(2);
  if (hex.length % 2 !== 0 || !/^[0-9a-fA-F]*$/.test(hex)) throw new ValueError("bytea value has bad hex digits");
  const out = new Uint8Array(hex.length / 2);
  for (let i = 0; i < out.length; i++) out[i] = parseInt(hex.slice(i * 2, i * 2 + 2), 16);
  return out;
}

/**
 * PostgreSQL input text for a value the capture triggers wrote (they
 * write every value as text: integers with every digit, reals with 17
 * significant digits, blobs as `\x` hex).
 */
export function pgText(kind: ValueKind, value: unknown): string | null {
  if (value === null || value === undefined) return null;
  if (typeof value === "boolean") return value ? "t" : "f";
  if (kind === "bool" && (value === 1 || value === 0 || value === "1" || value === "0")) {
    return value === 1 || value === "1" ? "t" : "f";
  }
  if (typeof value === "string") return value;
  if (typeof value === "number" || typeof value === "bigint") return String(value);
  return JSON.stringify(value);
}
