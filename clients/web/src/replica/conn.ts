//! A thin layer over SQLite-WASM's `oo1.DB`: cached prepared statements,
//! immediate transactions that roll back on any error, and plain rows.

import { bindValues } from "./bulk.js";
import type { Database, PreparedStatement, Sqlite3Static, SqlValue } from "@sqlite.org/sqlite-wasm";

export type Params = readonly unknown[] | Record<string, unknown>;
export type ResultRow = Record<string, SqlValue>;

export class Conn {
  private readonly statements = new Map<string, PreparedStatement>();
  private depth = 0;

  constructor(
    readonly db: Database,
    readonly sqlite3: Sqlite3Static,
  ) {}

  /** Runs one or more statements without parameters. */
  execBatch(sql: string): void {
    this.db.exec(sql);
  }

  /** Runs a cached statement; returns the number of rows it changed. */
  run(sql: string, params: readonly unknown[] = []): number {
    const stmt = this.cached(sql);
    try {
      if (params.length > 0) bindValues(this.sqlite3, stmt, params);
      stmt.step();
      return this.db.changes();
    } finally {
      stmt.reset(true);
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

  /** Runs `work` in one immediate transaction: all of it or none. */
  tx<T>(work: () => T): T {
    if (this.depth > 0) return work();
    this.db.exec("BEGIN IMMEDIATE");
    this.depth++;
    try {
      const value = work();
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
