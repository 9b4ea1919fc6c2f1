//! The local SQLite replica: the server's tables, pgrelay's bookkeeping
//! and the outbox in one database. Each batch of server transactions
//! commits together with the LSN it reaches; each local write commits
//! together with its outbox entries. Synchronous: it runs in the worker
//! that owns the database, one call at a time.

import type { TableSchema, Transaction, Visibility, WriteResults } from "../protocol.js";
import { formatLsn, parseLsn, sqliteName } from "../protocol.js";
import { cannotHold } from "./holdable.js";
import { applyChange, ReplicaError } from "./apply.js";
import { ensureCaptureTables, quietCapture, setApplying, setTxId } from "./capture.js";

/** Changes in one applied batch from which capture triggers are set aside. */
const BULK_CHANGES = 200;
import { Conn, quote, type Params, type ResultRow } from "./conn.js";
import * as outbox from "./outbox.js";
import { mapOutbox } from "./reshape.js";
import { applyTable, ensureMeta, loadTables, readMeta, writeMeta } from "./schema.js";
import * as snapshot from "./snapshot.js";
import * as repair from "./repair.js";
import type { CheckSpan, Key, RangeSum, RowHasher } from "../repair/digest.js";
import { ensureMigrationsTable, runMigration, schemaVersion } from "./migrations.js";
import type { ClientMigration } from "../protocol.js";

export { Conn, ReplicaError };
export type { Params, ResultRow };
export type { Outcome, OutboxCounts, Taken } from "./outbox.js";

export interface ReplicaState {
  clientId: string | null;
  /** Commit LSN of the last applied transaction; null for a new or reset replica. */
  lsn: string | null;
  logId: string | null;
  resync: string[];
  /** The newest client migration the replica ran (0 for none). */
  schemaVersion: number;
}

export interface Applied {
  /** The position reached (LSN text). */
  lsn: string;
  /** Tables whose rows changed. */
  tables: string[];
  transactions: number;
  changes: number;
  /** Transactions applied that came from this client's own writes. */
  echoes: { lsn: string; origin: string }[];
  /** Tables the changes named that the replica does not know: left out and recorded for a snapshot. */
  unknown: string[];
}

export interface Executed {
  txId: string;
  captured: number;
  duplicate: boolean;
}

/**
 * How the storage journals while a snapshot loads and after (set by the
 * worker for OPFS: see worker.ts). Called between transactions.
 */
export interface LoadJournal {
  loading(): void;
  loaded(): void;
}

export class Replica {
  private tables: Map<string, TableSchema>;
  private filters: snapshot.Filter[];
  journal: LoadJournal | null = null;

  constructor(readonly conn: Conn) {
    conn.tx(() => {
      ensureMeta(conn);
      ensureCaptureTables(conn);
      ensureMigrationsTable(conn);
    });
    this.tables = loadTables(conn);
    this.filters = snapshot.loadFilters(conn);
  }

  state(): ReplicaState {
    const p = snapshot.pending(this.conn);
    const lsn = readMeta(this.conn, "lsn");
    return {
      clientId: readMeta(this.conn, "client_id"),
      lsn: p?.full ? null : lsn,
      logId: readMeta(this.conn, "log_id"),
      resync: p?.tables ?? [],
      schemaVersion: schemaVersion(this.conn),
    };
  }

  /** Runs a client migration with its version; the error message when it failed. */
  runMigration(migration: ClientMigration): string | null {
    return runMigration(this.conn, migration);
  }

  setMeta(key: string, value: string): void {
    writeMeta(this.conn, key, value);
  }

  schema(): TableSchema[] {
    return [...this.tables.values()];
  }

  /**
   * Creates missing tables and adds columns; returns the tables whose rows
   * must come from a snapshot (new to a positioned replica, or retyped),
   * and the tables the replica cannot hold (kept out, with the reason).
   */
  applySchema(tables: TableSchema[]): { needed: string[]; refused: { table: string; reason: string }[] } {
    const positioned = this.state().lsn !== null;
    const needed: string[] = [];
    const refused: { table: string; reason: string }[] = [];
    const all = new Map(this.tables);
    for (const t of tables) all.set(t.name, t);
    this.conn.tx(() => {
      for (const incoming of tables) {
        const known = this.tables.get(incoming.name);
        // Local writes made against a renamed table or column follow it.
        mapOutbox(this.conn, this.tables, incoming);
        // Synced before, not now (dropped, renamed, out of the
        // publication): its rows would go stale.
        if (incoming.skipped && known && !known.skipped) {
          this.conn.execBatch(`DROP TABLE IF EXISTS ${quote(sqliteName(incoming.name))}`);
        }
        const reason = incoming.skipped ? null : cannotHold(incoming, all.values());
        const table = reason === null ? incoming : { ...incoming, skipped: `the replica cannot hold it: ${reason}` };
        if (reason !== null) {
          refused.push({ table: table.name, reason: table.skipped! });
          // Held before under another schema: its rows would go stale.
          if (known && !known.skipped) this.conn.execBatch(`DROP TABLE IF EXISTS ${quote(sqliteName(table.name))}`);
        }
        const retyped = !known
          ? !table.skipped
          : !table.skipped &&
            (!!known.skipped ||
              (table.backfilled ?? []).some((c) => !known.columns.some((k) => k.name === c)) ||
              table.columns.some((c) => known.columns.some((k) => k.name === c.name && (k.type_oid !== c.type_oid || k.pg_type !== c.pg_type))));
        const rebuilt = applyTable(this.conn, table);
        if ((retyped || rebuilt) && positioned) needed.push(table.name);
      }
    });
    this.tables = loadTables(this.conn);
    return { needed, refused };
  }

  /** Applies whole transactions in one SQLite transaction with the last one's LSN. */
  applyTransactions(txs: Transaction[], ownClientId: string | null): Applied {
    const current = this.state().lsn;
    const currentLsn = current === null ? 0n : parseLsn(current);
    let reached = currentLsn;
    const changed = new Set<string>();
    const echoes: Applied["echoes"] = [];
    const unknown: string[] = [];
    let transactions = 0;
    let changes = 0;
    // Many changes: the capture triggers of the tables they touch are set
    // aside for the transaction (see quietCapture).
    const bulk = txs.reduce((n, tx) => n + tx.changes.length, 0) >= BULK_CHANGES;
    const quiet: TableSchema[] = [];
    if (bulk) {
      const names = new Set<string>();
      for (const tx of txs) for (const c of tx.changes) names.add(c.table);
      for (const name of names) {
        const t = this.tables.get(name);
        if (t && !t.skipped) quiet.push(t);
      }
    }
    this.conn.tx(() => {
      setApplying(this.conn, true);
      for (const t of quiet) quietCapture(this.conn, t);
      for (const tx of txs) {
        const lsn = parseLsn(tx.lsn);
        // At or below the stored position: already here, except in
        // tables a snapshot since did not see it in.
        let only: Set<string> | null = null;
        if (lsn <= reached) {
          only = snapshot.missed(this.filters, tx);
          if (only.size === 0) continue;
        }
        const skipped = snapshot.skipped(this.filters, tx);
        for (const change of tx.changes) {
          if (skipped.has(change.table) || (only !== null && !only.has(change.table))) continue;
          if (!this.tables.has(change.table)) {
            // Its schema never arrived, so it cannot be placed. The
            // table's snapshot, taken later, holds this change.
            if (!unknown.includes(change.table)) unknown.push(change.table);
            continue;
          }
          try {
            applyChange(this.conn, this.tables, change);
          } catch (e) {
            throw new ReplicaError(`applying transaction ${tx.lsn}: ${(e as Error).message}`);
          }
          changed.add(sqliteName(change.table));
          changes++;
        }
        if (only !== null) continue;
        if (ownClientId !== null && tx.origin === ownClientId) echoes.push({ lsn: tx.lsn, origin: tx.origin });
        transactions++;
        reached = lsn;
      }
      if (reached > currentLsn) {
        writeMeta(this.conn, "lsn", formatLsn(reached));
        this.filters = snapshot.expire(this.conn, this.filters, reached);
      }
      // In the same transaction as the position that passes them.
      if (unknown.length > 0) snapshot.requestResync(this.conn, unknown);
      setApplying(this.conn, false);
    });
    return { lsn: formatLsn(reached), tables: [...changed], transactions, changes, echoes, unknown };
  }

  /**
   * Runs application SQL in one SQLite transaction (or inside the open
   * one); its writes to synced tables go to the outbox as one client
   * transaction. With `txId` given, a transaction whose id is already in
   * the outbox is not run again (a request resent after a tab handover).
   */
  execute(sql: string, params: Params | undefined, txId: string): Executed {
    if (outbox.hasTx(this.conn, txId)) return { txId, captured: 0, duplicate: true };
    return this.conn.tx(() => {
      setTxId(this.conn, txId);
      try {
        this.conn.query(sql, params);
      } finally {
        setTxId(this.conn, null);
      }
      const captured = Number(this.conn.value("SELECT count(*) FROM _pgrelay_outbox WHERE tx_id = ?1", [txId]) ?? 0);
      // Measured as it will be sent: what the protocol cannot carry is
      // refused now (the throw rolls the transaction back), never
      // accepted here and lost later.
      if (captured > 0) outbox.checkSendable(this.conn, this.tables, txId);
      return { txId, captured, duplicate: false };
    });
  }

  query(sql: string, params?: Params): ResultRow[] {
    return this.conn.query(sql, params);
  }

  takeBatch(maxTxs: number): outbox.Taken {
    return this.conn.tx(() => outbox.takeBatch(this.conn, this.tables, maxTxs));
  }

  /** Inside an open application transaction: refuses (throws) one the protocol cannot carry. */
  checkSendable(txId: string): void {
    outbox.checkSendable(this.conn, this.tables, txId);
  }

  recordResults(results: WriteResults): outbox.Outcome[] {
    return this.conn.tx(() => {
      setApplying(this.conn, true);
      const outcomes = outbox.recordResults(this.conn, this.tables, results);
      setApplying(this.conn, false);
      return outcomes;
    });
  }

  /** Rejects a transaction the server refused alone; returns the tables to fetch again. */
  setAside(txId: string, reason: string): [outbox.Outcome, string[]] {
    return this.conn.tx(() => outbox.setAside(this.conn, this.tables, txId, reason));
  }

  outboxCounts(): outbox.OutboxCounts {
    return outbox.counts(this.conn);
  }

  hasUnsent(): boolean {
    return outbox.hasUnsent(this.conn);
  }

  /** Forgets the position; unsent local writes stay. */
  reset(): void {
    this.conn.tx(() => snapshot.reset(this.conn));
    this.filters = [];
  }

  requestResync(tables: string[]): void {
    this.conn.tx(() => snapshot.requestResync(this.conn, tables));
  }

  beginSnapshot(tables: string[], full: boolean): void {
    if (full) this.filters = [];
    this.journal?.loading();
    this.quietly(() => snapshot.begin(this.conn, this.tables, tables, full));
  }

  /** Runs `work` (several `loadSnapshot` calls) in one transaction. */
  snapshotBatch(work: () => void): void {
    this.quietly(work);
  }

  loadSnapshot(table: string, rows: Uint8Array): number {
    return this.quietly(() => snapshot.load(this.conn, this.tables, table, rows));
  }

  clearTable(table: string): void {
    this.quietly(() => snapshot.clear(this.conn, this.tables, table));
  }

  finishSnapshot(resume: string, full: boolean, tables: string[], visibility: Visibility): void {
    this.filters = this.quietly(() => snapshot.finish(this.conn, this.tables, resume, full, tables, visibility));
    this.journal?.loaded();
  }

  /** Digests key ranges of a table for a repair (null: not held here). */
  repairDigest(table: string, ranges: repair.KeyRange[], hasher: RowHasher, firstParts?: number): { spans: CheckSpan[]; sum: RangeSum } | null {
    return repair.digest(this.conn, this.tables, table, ranges, hasher, firstParts);
  }

  /** Removes the ranges a repair replaces; returns what their rows summed to. */
  repairRemove(table: string, ranges: { lo: Key | null; hi: Key | null }[], hasher: RowHasher): RangeSum {
    return this.quietly(() => repair.remove(this.conn, this.tables, table, ranges, hasher));
  }

  /** Inserts rows a repair received (COPY text); returns what they sum to. */
  repairLoad(table: string, copy: Uint8Array, hasher: RowHasher): RangeSum {
    return this.quietly(() => repair.load(this.conn, this.tables, table, copy, hasher));
  }

  /** Completes a repair like a full snapshot; `refetch` tables are fetched again. */
  repairFinish(resume: string, tables: string[], visibility: Visibility, refetch: string[]): void {
    this.filters = this.quietly(() => repair.finish(this.conn, this.tables, resume, tables, visibility, refetch));
  }

  /** Runs `work` in a transaction with local-write capture off. */
  private quietly<T>(work: () => T): T {
    return this.conn.tx(() => {
      setApplying(this.conn, true);
      const value = work();
      setApplying(this.conn, false);
      return value;
    });
  }
}
