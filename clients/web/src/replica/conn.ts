//! A thin layer over SQLite-WASM's `oo1.DB`: cached prepared statements,
//! immediate transactions that roll back on any error, and plain rows.

import { bindValues } from "./bulk.js";
import type { Database, PreparedStatement, Sqlite3Static, SqlValue } from "@sqlite.org/sqlite-wasm";

const SQLITE_ROW = 100;
const SQLITE_DONE = 101;

interface RawExports {
  sqlite3_step(stmt: number): number;
  sqlite3_reset(stmt: number): number;
  sqlite3_clear_bindings(stmt: number): number;
  sqlite3_changes(db: number): number;
}

export type Params = readonly unknown[] | Record<string, unknown>;
export type ResultRow = Record<string, SqlValue>;

export class Conn {
  private readonly statements = new Map<string, PreparedStatement>();
  private depth = 0;
  /** Work set up once in the open transaction, and what undoes it before the commit. */
  private readonly setUp = new Set<string>();
  private atCommit: (() => void)[] = [];
  private atEnd: (() => void)[] = [];

  constructor(
    readonly db: Database,
    readonly sqlite3: Sqlite3Static,
  ) {}

  /** Runs one or more statements without parameters. */
  execBatch(sql: string): void {
    this.db.exec(sql);
  }

  /**
   * Runs a cached statement; returns the number of rows it changed.
   * Steps through the raw exports: `oo1`'s step, reset and changes cost
   * more than a small insert does, and applying server changes calls this
   * once a row.
   */
  run(sql: string, params: readonly unknown[] = []): number {
    const stmt = this.cached(sql);
    const p = stmt.pointer as unknown as number;
    const x = this.sqlite3.wasm.exports as unknown as RawExports;
    try {
      if (params.length > 0) bindValues(this.sqlite3, stmt, params);
      const rc = x.sqlite3_step(p);
      // Errors as `oo1` reports them (callers match on SQLITE_ codes).
      if (rc !== SQLITE_DONE && rc !== SQLITE_ROW) this.sqlite3.oo1.DB.checkRc(this.db, rc);
      return x.sqlite3_changes(this.db.pointer as unknown as number);
    } finally {
      x.sqlite3_clear_bindings(p);
      x.sqlite3_reset(p);
    }
  }

  /** Every row of a cached statement, as objects. */
  all(sql: string, params: readonly unknown[] = []): ResultRow[] {
    const stmt = this.cached(sql);
    const rows: ResultRow[] = [];
    try {
      if (params.length > 0) stmt.bind(params as SqlValue[]);
      while (stmt.step()) rows.push(stmt.get({}));
    } finally {
      stmt.reset(true);
    }
    return rows;
  }

  value(sql: string, params: readonly unknown[] = []): SqlValue | undefined {
    const stmt = this.cached(sql);
    try {
      if (params.length > 0) stmt.bind(params as SqlValue[]);
      return stmt.step() ? stmt.get(0) : undefined;
    } finally {
      stmt.reset(true);
    }
  }

  /** Application SQL: not cached (it may be anything), any parameters. */
  query(sql: string, params?: Params): ResultRow[] {
    const rows: ResultRow[] = [];
    this.db.exec({
      sql,
      bind: params as never,
      rowMode: "object",
      callback: (row: ResultRow) => {
        rows.push(row);
      },
    } as never);
    return rows;
  }

  cached(sql: string): PreparedStatement {
    let stmt = this.statements.get(sql);
    if (!stmt) {
      stmt = this.db.prepare(sql);
      this.statements.set(sql, stmt);
    }
    return stmt;
  }

  /** Drops cached statements (after a schema change). */
  forget(): void {
    for (const stmt of this.statements.values()) stmt.finalize();
    this.statements.clear();
  }

  inTransaction(): boolean {
    return this.depth > 0;
  }

  /**
   * In the open transaction: runs `now` the first time `key` is named, and
   * `undo` when the transaction ends: just before it commits (a rollback
   * undoes `now` by itself), or, with `always`, after it committed or
   * rolled back (for connection state a rollback does not touch).
   */
  once(key: string, now: () => void, undo: () => void, always = false): void {
    if (this.depth === 0) throw new Error("Conn.once outside a transaction");
    if (this.setUp.has(key)) return;
    now();
    this.setUp.add(key);
    (always ? this.atEnd : this.atCommit).push(undo);
  }

  /** Runs `work` in one immediate transaction: all of it or none. */
  tx<T>(work: () => T): T {
    if (this.depth > 0) return work();
    this.db.exec("BEGIN IMMEDIATE");
    this.depth++;
    try {
      const value = work();
      for (const undo of this.atCommit.splice(0)) undo();
      this.db.exec("COMMIT");
      return value;
    } catch (e) {
      try {
        this.db.exec("ROLLBACK");
      } catch {
        // SQLite may have rolled back already (a full disk does that).
      }
      throw e;
    } finally {
      this.depth--;
      this.setUp.clear();
      this.atCommit = [];
      for (const undo of this.atEnd.splice(0)) undo();
    }
  }

  close(): void {
    this.forget();
    this.db.close();
  }
}

export function quote(ident: string): string {
  return `"${ident.replaceAll('"', '""')}"`;
}
