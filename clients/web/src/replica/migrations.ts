//! Client migrations in the replica: each runs in one SQLite transaction
//! together with recording (up) or forgetting (down) its version in
//! `_pgrelay_migrations`, as the Rust client does. Its writes are the
//! replica's own: they are not captured for the server.

import type { ClientMigration } from "../protocol.js";
import { setApplying } from "./capture.js";
import type { Conn } from "./conn.js";

const TABLE_SQL = `CREATE TABLE IF NOT EXISTS _pgrelay_migrations (
  version    INTEGER PRIMARY KEY,
  name       TEXT NOT NULL,
  applied_us INTEGER NOT NULL
);`;

export function ensureMigrationsTable(conn: Conn): void {
  conn.execBatch(TABLE_SQL);
}

/** The newest client migration the replica ran (0 for none). */
export function schemaVersion(conn: Conn): number {
  const v = conn.value("SELECT max(version) FROM _pgrelay_migrations");
  return typeof v === "number" ? v : typeof v === "bigint" ? Number(v) : 0;
}

/** Runs one migration; the error message when it failed (nothing of it is left). */
export function runMigration(conn: Conn, m: ClientMigration): string | null {
  try {
    conn.tx(() => {
      const ran = conn.value("SELECT version FROM _pgrelay_migrations WHERE version = ?1", [m.version]) !== undefined;
      if (m.direction === "up" ? ran : !ran) return;
      setApplying(conn, true);
      conn.execBatch(m.sql);
      setApplying(conn, false);
      if (m.direction === "up") {
        conn.run("INSERT INTO _pgrelay_migrations (version, name, applied_us) VALUES (?1, ?2, ?3)", [m.version, m.name, Date.now() * 1000]);
      } else {
        conn.run("DELETE FROM _pgrelay_migrations WHERE version = ?1", [m.version]);
      }
    });
    return null;
  } catch (e) {
    return (e as Error).message;
  }
}
