//! The outbox of local writes (`_pgrelay_outbox`): taking the next batch
//! to send in capture order, recording the server's answers, and putting
//! a rejected write's rows back to the server's version. Same rules as
//! the Rust client's `outbox.rs`.

import { BatchFrame, EncodedTransaction, encodeAlone, layout, TooLargeError } from "../frames.js";
import type { ClientChange, Row, TableSchema, TxResult, WriteResults, WriteStatus } from "../protocol.js";
import { MAX_WRITE_CHANGES } from "../protocol.js";
import { pgText } from "../values.js";
import { applyChange } from "./apply.js";
import { NOW_US_SQL } from "./capture.js";
import { Conn } from "./conn.js";
import { requestResync } from "./snapshot.js";

/** Changes per batch of several transactions at most; one alone may have up to the protocol's limit. */
const BATCH_CHANGES = 5_000;
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

/** What `takeBatch` found: frames to send and transactions set aside. */
export interface Taken {
  /** To send in order: one `write`, or one transaction's `write_part`s. */
  frames: string[];
  batchId: string | null;
  /** The client transactions the frames carry. */
  txIds: string[];
  /** Transactions that can never be sent, now rejected. */
  setAside: Outcome[];
  /** Tables to fetch again: a set-aside transaction wrote them. */
  resync: string[];
}

const NOTHING: Taken = { frames: [], batchId: null, txIds: [], setAside: [], resync: [] };

/** A batch id of the form the client always uses (sizes depend on it). */
export function newBatchId(): string {
  return `b-${randomHex(8)}`;
}

/**
 * Takes the oldest unanswered client transactions (pending, or sent on a
 * connection that ended), marks them sent and returns their frames: as
 * many whole transactions as fit one `write` frame (measured on the
 * encoded bytes), or a transaction too large for one frame alone in
 * `write_part` frames. A transaction that can never be sent is set aside.
 */
export function takeBatch(conn: Conn, tables: Map<string, TableSchema>, maxTxs: number): Taken {
  const rows = conn.all(`${SELECT_UNCONFIRMED} LIMIT ?1`, [MAX_WRITE_CHANGES + 1]) as unknown as Captured[];
  const hitLimit = rows.length > MAX_WRITE_CHANGES;
  // A transaction's entries are contiguous (captured in one SQLite transaction).
  const groups: Captured[][] = [];
  for (const row of rows) {
    const last = groups[groups.length - 1];
    if (last && last[0]!.tx_id === row.tx_id) last.push(row);
    else groups.push([row]);
  }
  if (hitLimit) {
    // The last group may continue past the rows read.
    const cut = groups.pop();
    if (groups.length === 0 && cut) {
      // Only an outbox from before `execute` checked sizes can hold one.
      const txId = cut[0]!.tx_id;
      const changes = Number(conn.value("SELECT count(*) FROM _pgrelay_outbox WHERE tx_id = ?1", [txId]) ?? 0);
      return setAsideTaken(conn, tables, txId, `the transaction has ${changes} changes; one transaction may have at most ${MAX_WRITE_CHANGES}`);
    }
  }
  const batchId = newBatchId();
  const frame = new BatchFrame(batchId);
  for (const group of groups) {
    const encoded = new EncodedTransaction({ id: group[0]!.tx_id, changes: group.map((c) => toClientChange(c, tables)) });
    if (frame.transactions.length === 0 && !frame.fits(encoded)) {
      // Alone in `write_part` frames, or not at all.
      let frames: string[];
      try {
        frames = encodeAlone(batchId, encoded);
      } catch (e) {
        // Only a write `execute` did not measure (an older outbox, or the
        // table's columns changed since) gets here.
        if (e instanceof TooLargeError) return setAsideTaken(conn, tables, encoded.id, e.message);
        throw e;
      }
      markSent(conn, [encoded.id]);
      return { frames, batchId, txIds: [encoded.id], setAside: [], resync: [] };
    }
    const full = frame.transactions.length >= maxTxs || frame.changes + encoded.changes.length > BATCH_CHANGES;
    if (frame.transactions.length > 0 && (full || !frame.fits(encoded))) break;
    frame.push(encoded);
  }
  if (frame.transactions.length === 0) return NOTHING;
  const txIds = frame.transactions.map((t) => t.id);
  markSent(conn, txIds);
  return { frames: [frame.frame()], batchId, txIds, setAside: [], resync: [] };
}

function markSent(conn: Conn, txIds: string[]): void {
  for (const id of txIds) {
    conn.run(`UPDATE _pgrelay_outbox SET status = 'sent', updated_us = ${NOW_US_SQL} WHERE tx_id = ?1 AND status = 'pending'`, [id]);
  }
}

function setAsideTaken(conn: Conn, tables: Map<string, TableSchema>, txId: string, reason: string): Taken {
  const [outcome, resync] = setAside(conn, tables, txId, reason);
  return { ...NOTHING, setAside: [outcome], resync };
}

/**
 * Rejects a transaction the server never took (it cannot be sent, or the
 * server refused it whole) and asks for a fresh snapshot of the synced
 * tables it wrote: without the server's answer, that is how the replica
 * gets the server's rows back. Returns those tables.
 */
export function setAside(conn: Conn, tables: Map<string, TableSchema>, txId: string, reason: string): [Outcome, string[]] {
  const row = conn.all("SELECT count(*) AS n, min(created_us) AS created FROM _pgrelay_outbox WHERE tx_id = ?1 AND status IN ('pending', 'sent')", [txId])[0];
  const touched = conn.all("SELECT DISTINCT table_name AS t FROM _pgrelay_outbox WHERE tx_id = ?1 AND status IN ('pending', 'sent')", [txId]).map((r) => String(r.t));
  conn.run(`UPDATE _pgrelay_outbox SET status = 'rejected', error = ?2, updated_us = ${NOW_US_SQL} WHERE tx_id = ?1 AND status IN ('pending', 'sent')`, [txId, reason]);
  const resync = touched.filter((t) => {
    const table = tables.get(t);
    return table !== undefined && !table.skipped;
  });
  if (resync.length > 0) requestResync(conn, resync);
  return [{ txId, status: "rejected", changes: Number(row?.n ?? 0), reason, createdUs: Number(row?.created ?? 0) }, resync];
}

/** The transaction `txId` as it would go out, encoded, for `execute` to measure before it commits. */
export function encodeCaptured(conn: Conn, tables: Map<string, TableSchema>, txId: string): EncodedTransaction {
  const rows = conn.all(
    "SELECT tx_id, change_id, table_name, op, new_row, old_row FROM _pgrelay_outbox WHERE tx_id = ?1 ORDER BY seq",
    [txId],
  ) as unknown as Captured[];
  return new EncodedTransaction({ id: txId, changes: rows.map((c) => toClientChange(c, tables)) });
}

/** Refuses (throws TooLargeError) a captured transaction the protocol cannot carry. */
export function checkSendable(conn: Conn, tables: Map<string, TableSchema>, txId: string): void {
  layout(newBatchId(), encodeCaptured(conn, tables, txId));
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
