//! The outbox of local writes (`_pgrelay_outbox`): taking the next batch
//! to send in capture order, recording the server's answers, and putting
//! a rejected write's rows back to the server's version. Same rules as
//! the Rust client's `outbox.rs`.

import type { ClientChange, ClientTransaction, Row, TableSchema, TxResult, WriteBatch, WriteResults, WriteStatus } from "../protocol.js";
import { MAX_CLIENT_FRAME_BYTES, MAX_WRITE_CHANGES } from "../protocol.js";
import { pgText } from "../values.js";
import { applyChange } from "./apply.js";
import { NOW_US_SQL } from "./capture.js";
import { Conn } from "./conn.js";

const BATCH_CHANGES = 5_000;
const BATCH_BYTES = MAX_CLIENT_FRAME_BYTES / 2;
/** Applied entries are kept this long for inspection. */
const KEEP_APPLIED_US = 24 * 3600 * 1_000_000;

export interface Outcome {
  txId: string;
  status: WriteStatus;
  changes: number;
  reason?: string;
  code?: string;
  createdUs: number;
}

export interface Captured {
  tx_id: string;
  change_id: string;
  table_name: string;
  op: string;
  new_row: string | null;
  old_row: string | null;
}

export interface OutboxCounts {
  pending: number;
  sent: number;
  applied: number;
  rejected: number;
}

const SELECT_UNCONFIRMED =
  "SELECT tx_id, change_id, table_name, op, new_row, old_row FROM _pgrelay_outbox " +
  "WHERE status IN ('pending', 'sent') ORDER BY seq";

export function unconfirmed(conn: Conn): Captured[] {
  return conn.all(SELECT_UNCONFIRMED) as unknown as Captured[];
}

/**
 * Takes the oldest unanswered client transactions, marks them sent and
 * returns them as a batch; also returns transactions too large to ever
 * send, already marked rejected.
 */
export function takeBatch(conn: Conn, tables: Map<string, TableSchema>, maxTxs: number): [WriteBatch | null, Outcome[]] {
  const rows = conn.all(`${SELECT_UNCONFIRMED} LIMIT ?1`, [MAX_WRITE_CHANGES + 1]) as unknown as Captured[];
  const hitLimit = rows.length > MAX_WRITE_CHANGES;
  const groups: Captured[][] = [];
  for (const row of rows) {
    const last = groups[groups.length - 1];
    if (last && last[0]!.tx_id === row.tx_id) last.push(row);
    else groups.push([row]);
  }
  if (hitLimit) {
    const cut = groups.pop();
    if (groups.length === 0 && cut) {
      return [null, [rejectLocal(conn, cut[0]!.tx_id, `the transaction has more than ${MAX_WRITE_CHANGES} changes, more than one batch can carry`)]];
    }
  }
  const transactions: ClientTransaction[] = [];
  const tooLarge: Outcome[] = [];
  let changes = 0;
  let bytes = 0;
  for (const group of groups) {
    const size = group.reduce((n, c) => n + 200 + (c.new_row?.length ?? 0) + (c.old_row?.length ?? 0), 0);
    if (transactions.length === 0 && size > BATCH_BYTES) {
      tooLarge.push(rejectLocal(conn, group[0]!.tx_id, `the transaction's rows take ${size} bytes, more than one batch can carry`));
      break;
    }
    if (transactions.length >= maxTxs || (transactions.length > 0 && (changes + group.length > BATCH_CHANGES || bytes + size > BATCH_BYTES))) {
      break;
    }
    changes += group.length;
    bytes += size;
    transactions.push({ id: group[0]!.tx_id, changes: group.map((c) => toClientChange(c, tables)) });
  }
  if (transactions.length === 0) return [null, tooLarge];
  for (const tx of transactions) {
    conn.run(`UPDATE _pgrelay_outbox SET status = 'sent', updated_us = ${NOW_US_SQL} WHERE tx_id = ?1 AND status = 'pending'`, [tx.id]);
  }
  return [{ batch_id: `b-${randomHex(8)}`, transactions }, tooLarge];
}

function rejectLocal(conn: Conn, txId: string, reason: string): Outcome {
  conn.run(`UPDATE _pgrelay_outbox SET status = 'rejected', error = ?2, updated_us = ${NOW_US_SQL} WHERE tx_id = ?1`, [txId, reason]);
  return { txId, status: "rejected", changes: 0, reason, createdUs: 0 };
}

function toClientChange(captured: Captured, tables: Map<string, TableSchema>): ClientChange {
  const op = captured.op as ClientChange["op"];
  const table = tables.get(captured.table_name);
  const next = captured.new_row !== null ? rowFromJson(captured.new_row, table) : undefined;
  const old = captured.old_row !== null ? rowFromJson(captured.old_row, table) : undefined;
  const change: ClientChange = { id: captured.change_id, table: captured.table_name, op };
  if (op === "update" && next && old) {
    // Only the columns the update changed, so concurrent writers of other
    // columns of the same row do not undo each other.
    change.new = Object.fromEntries(Object.entries(next).filter(([k, v]) => old[k] !== v));
  } else if (next) {
    change.new = next;
  }
  if (old) change.old = old;
  return change;
}

/** A captured row (JSON from the triggers) as PostgreSQL text values. */
export function rowFromJson(json: string, table: TableSchema | undefined): Row {
  const parsed = JSON.parse(json) as Record<string, unknown>;
  const row: Row = {};
  for (const [column, value] of Object.entries(parsed)) {
    const kind = table?.columns.find((c) => c.name === column)?.kind ?? "text";
    row[column] = pgText(kind, value);
  }
  return row;
}

/**
 * Records the server's answers; rolls back the rows of rejected
 * transactions to the server's version. The caller holds the transaction
 * and has set the replica as applying.
 */
export function recordResults(conn: Conn, tables: Map<string, TableSchema>, results: WriteResults): Outcome[] {
  const outcomes: Outcome[] = [];
  for (const result of results.results) {
    const row = conn.all(
      "SELECT count(*) AS n, min(created_us) AS created FROM _pgrelay_outbox WHERE tx_id = ?1 AND status IN ('pending', 'sent')",
      [result.id],
    )[0];
    const changes = Number(row?.n ?? 0);
    if (changes === 0) continue; // answered before
    let status = "pending";
    let error: string | null = result.reason ?? null;
    let bump = 0;
    if (result.status === "applied") {
      status = "applied";
      error = null;
    } else if (result.status === "rejected") {
      status = "rejected";
      error = describe(result);
    } else {
      bump = 1;
    }
    conn.run(
      `UPDATE _pgrelay_outbox SET status = ?2, error = ?3, retries = retries + ?4, updated_us = ${NOW_US_SQL} WHERE tx_id = ?1 AND status IN ('pending', 'sent')`,
      [result.id, status, error, bump],
    );
    if (result.status === "rejected") rollBack(conn, tables, result);
    const outcome: Outcome = { txId: result.id, status: result.status, changes, createdUs: Number(row?.created ?? 0) };
    if (error !== null) outcome.reason = error;
    if (result.code) outcome.code = result.code;
    outcomes.push(outcome);
  }
  conn.run(`DELETE FROM _pgrelay_outbox WHERE status = 'applied' AND updated_us < ${NOW_US_SQL} - ?1`, [KEEP_APPLIED_US]);
  return outcomes;
}

function describe(result: TxResult): string {
  return `${result.code ?? "rejected"}: ${result.reason ?? "rejected"}`;
}

/** Puts each row the rejected transaction touched back to the server's version. */
function rollBack(conn: Conn, tables: Map<string, TableSchema>, result: TxResult): void {
  for (const current of result.rows ?? []) {
    const table = tables.get(current.table);
    if (!table) continue;
    if (current.row) applyChange(conn, tables, { table: table.name, op: "insert", new: current.row });
    else applyChange(conn, tables, { table: table.name, op: "delete", old: current.key });
  }
}

/** Marks a transaction rejected without the server (refused alone). */
export function rejectAlone(conn: Conn, txId: string, reason: string): Outcome {
  return rejectLocal(conn, txId, reason);
}

export function counts(conn: Conn): OutboxCounts {
  const c: OutboxCounts = { pending: 0, sent: 0, applied: 0, rejected: 0 };
  for (const row of conn.all("SELECT status, count(*) AS n FROM _pgrelay_outbox GROUP BY status")) {
    const s = String(row.status) as keyof OutboxCounts;
    if (s in c) c[s] = Number(row.n);
  }
  return c;
}

export function hasUnsent(conn: Conn): boolean {
  return conn.value("SELECT 1 FROM _pgrelay_outbox WHERE status IN ('pending', 'sent') LIMIT 1") !== undefined;
}

export function randomHex(bytes: number): string {
  const b = new Uint8Array(bytes);
  crypto.getRandomValues(b);
  return Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
}

/** Whether a client transaction with this id was captured before. */
export function hasTx(conn: Conn, txId: string): boolean {
  return conn.value("SELECT 1 FROM _pgrelay_outbox WHERE tx_id = ?1 LIMIT 1", [txId]) !== undefined;
}
