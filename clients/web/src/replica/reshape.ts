//! Brings local writes still waiting in the outbox onto a table's new
//! shape when the server renames it or its columns, so a write made
//! offline against the old names lands under the new ones. PostgreSQL
//! keeps a table's OID across RENAME TABLE and a column's number
//! (`attnum`) across RENAME COLUMN; the server sends both. A write that
//! set a dropped column is left as it was: the server refuses it with the
//! reason and the replica puts its rows back. Mirrors the Rust client's
//! `replica/reshape.rs`.

import type { TableSchema } from "../protocol.js";
import { Conn } from "./conn.js";

export interface Reshape {
  renamedFrom: string | null;
  /** Renamed columns: [old, new]. */
  columns: [string, string][];
  dropped: string[];
}

/** How `incoming` differs from what `known` held of it (by name, or by OID under a former name). */
export function compare(known: Map<string, TableSchema>, incoming: TableSchema): Reshape {
  const reshape: Reshape = { renamedFrom: null, columns: [], dropped: [] };
  if (incoming.skipped) return reshape;
  let before = known.get(incoming.name);
  if (!before && incoming.oid !== undefined) {
    before = [...known.values()].find((k) => k.oid === incoming.oid && k.name !== incoming.name);
  }
  if (!before) return reshape;
  if (before.name !== incoming.name) reshape.renamedFrom = before.name;
  for (const old of before.columns) {
    if (old.attnum === undefined) continue;
    const now = incoming.columns.find((c) => c.attnum === old.attnum);
    if (now && now.name !== old.name) reshape.columns.push([old.name, now.name]);
    else if (!now && !incoming.columns.some((c) => c.name === old.name)) reshape.dropped.push(old.name);
  }
  return reshape;
}

type JsonRow = Record<string, unknown>;

/** Renames one captured change's columns; drops a dropped column where the write did not set it. */
export function reshapeRows(reshape: Reshape, next: JsonRow | null, prev: JsonRow | null): void {
  for (const row of [next, prev]) {
    if (!row) continue;
    for (const [from, to] of reshape.columns) {
      if (from in row) {
        row[to] = row[from];
        delete row[from];
      }
    }
  }
  for (const column of reshape.dropped) {
    const had = prev !== null && column in prev;
    const before = had ? prev![column] : undefined;
    if (prev) delete prev[column];
    if (next && column in next) {
      const value = next[column];
      const meant = value !== null && (!had || JSON.stringify(value) !== JSON.stringify(before));
      if (!meant) delete next[column];
    }
  }
}

/** Rewrites the unanswered outbox entries of `incoming`'s table to its new shape (in the caller's transaction). */
export function mapOutbox(conn: Conn, known: Map<string, TableSchema>, incoming: TableSchema): number {
  const reshape = compare(known, incoming);
  if (!reshape.renamedFrom && reshape.columns.length === 0 && reshape.dropped.length === 0) return 0;
  if (reshape.renamedFrom) {
    conn.run("UPDATE _pgrelay_outbox SET table_name = ?2 WHERE table_name = ?1 AND status IN ('pending', 'sent')", [
      reshape.renamedFrom,
      incoming.name,
    ]);
  }
  if (reshape.columns.length === 0 && reshape.dropped.length === 0) return 1;
  let rewritten = 0;
  const entries = conn.query(
    "SELECT seq, new_row, old_row FROM _pgrelay_outbox WHERE table_name = ?1 AND status IN ('pending', 'sent')",
    [incoming.name],
  );
  for (const entry of entries) {
    const parse = (v: unknown): JsonRow | null => (typeof v === "string" ? (JSON.parse(v) as JsonRow) : null);
    const next = parse(entry.new_row);
    const prev = parse(entry.old_row);
    reshapeRows(reshape, next, prev);
    const text = (row: JsonRow | null) => (row === null ? null : JSON.stringify(row));
    conn.run("UPDATE _pgrelay_outbox SET new_row = ?2, old_row = ?3 WHERE seq = ?1", [entry.seq as number, text(next), text(prev)]);
    rewritten++;
  }
  return rewritten;
}
