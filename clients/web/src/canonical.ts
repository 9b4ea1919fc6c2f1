//! One canonical encoding of values, used to compare the replica with
//! PostgreSQL whatever the storage on either side (the Rust protocol's
//! `canonical.rs`, case for case): integers as decimals, floats by value
//! in Rust's `{:e}` form, booleans as `t`/`f`, bytes as lowercase hex,
//! everything else as PostgreSQL's text output. Text that does not parse
//! as its kind is kept as is, so it still compares.

import type { ValueKind } from "./protocol.js";

const I64_MIN = -(1n << 63n);
const I64_MAX = (1n << 63n) - 1n;
/** What Rust's `i64::from_str` accepts (range checked apart). */
const RUST_INTEGER = /^[+-]?\d+$/;
/** What Rust's `f64::from_str` accepts as a finite number. */
const RUST_DECIMAL = /^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$/;
const RUST_INFINITY = /^[+-]?(inf|infinity)$/i;
const RUST_NAN = /^[+-]?nan$/i;

/** The canonical form of a value given as PostgreSQL's text output. */
export function canonicalPgText(kind: ValueKind, text: string | null): string | null {
  if (text === null) return null;
  switch (kind) {
    case "integer":
      return canonicalInteger(text);
    case "float":
      return canonicalFloatText(text);
    case "bool":
      return canonicalBool(text);
    case "bytes":
      return text.startsWith("\\x") ? asciiLower(text.slice(2)) : text;
    default:
      return text;
  }
}

export function canonicalInteger(text: string): string {
  if (!RUST_INTEGER.test(text)) return text;
  const value = BigInt(text);
  return value < I64_MIN || value > I64_MAX ? text : value.toString();
}

export function canonicalBool(text: string): string {
  if (text === "t" || text === "true" || text === "1") return "t";
  if (text === "f" || text === "false" || text === "0") return "f";
  return text;
}

/** Rust's `str::to_ascii_lowercase`: only A-Z change. */
function asciiLower(text: string): string {
  return text.replace(/[A-Z]+/g, (s) => s.toLowerCase());
}

/** Rust's `text.parse::<f64>()`: the number, or null where Rust refuses the text. */
export function parseRustFloat(text: string): number | null {
  if (RUST_DECIMAL.test(text)) return Number(text);
  if (RUST_INFINITY.test(text)) return text.startsWith("-") ? -Infinity : Infinity;
  if (RUST_NAN.test(text)) return NaN;
  return null;
}

function canonicalFloatText(text: string): string {
  if (text === "NaN" || text === "Infinity" || text === "-Infinity") return text;
  const f = parseRustFloat(text);
  return f === null ? text : canonicalFloat(f);
}

/** A float's canonical form: -0 and 0 are one number (SQLite does not keep the sign of zero). */
export function canonicalFloat(f: number): string {
  if (f === 0) return "0";
  if (Number.isNaN(f)) return "NaN";
  if (!Number.isFinite(f)) return f > 0 ? "Infinity" : "-Infinity";
  return rustExp(f);
}

/**
 * Rust's `format!("{:e}", f)`: the shortest digits that read back as `f`
 * (as JavaScript's `toExponential()` without an argument), with no `+` in
 * the exponent.
 */
export function rustExp(f: number): string {
  if (Number.isNaN(f)) return "NaN";
  if (!Number.isFinite(f)) return f > 0 ? "inf" : "-inf";
  if (Object.is(f, -0)) return "-0e0";
  return f.toExponential().replace("e+", "e");
}

/**
 * The canonical form of an INTEGER the replica stores, for a column of
 * `kind`: what the Rust client gets from `pg_text_from_sqlite` followed by
 * `canonical_pg_text`.
 */
export function canonicalStoredInteger(kind: ValueKind, i: number | bigint): string {
  if (kind === "bool") return i !== 0 && i !== 0n ? "t" : "f";
  if (kind === "float") return canonicalFloat(Number(i));
  return i.toString();
}

/** The same for a REAL: Rust prints it with `{:e}` before canonicalising. */
export function canonicalStoredReal(kind: ValueKind, f: number): string {
  return kind === "float" ? canonicalFloat(f) : canonicalPgText(kind, rustExp(f))!;
}

/** Whether text stored for this kind is its own canonical form (hashed as stored). */
export function textIsCanonical(kind: ValueKind): boolean {
  return kind === "text" || kind === "numeric" || kind === "json";
}

/** A blob's canonical form for a column of `kind` (PostgreSQL prints bytea as `\x` hex). */
export function canonicalBlob(kind: ValueKind, bytes: Uint8Array): string {
  let hex = "";
  for (let i = 0; i < bytes.length; i++) hex += HEX[bytes[i]!];
  return kind === "bytes" ? hex : "\\x" + hex;
}

const HEX = Array.from({ length: 256 }, (_, i) => i.toString(16).padStart(2, "0"));
