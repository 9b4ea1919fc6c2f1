//! Which server tables a SQLite replica can hold. PostgreSQL allows what
//! SQLite cannot: column names that differ only in case ("Name" and
//! "name"), and a table in `public` named like one in another schema
//! (`public."a.b"` and `a.b` are both `a.b` here). Such a table is kept
//! out of the replica with the reason, and the rest syncs on.

import type { TableSchema } from "../protocol.js";
import { sqliteName } from "../protocol.js";

/** Why the replica cannot hold `table` beside `all` (the other synced tables), or null. */
export function cannotHold(table: TableSchema, all: Iterable<TableSchema>): string | null {
  const seen = new Map<string, string>();
  for (const c of table.columns) {
    const folded = c.name.toLowerCase();
    const other = seen.get(folded);
    if (other !== undefined) return `columns "${other}" and "${c.name}" differ only in case, and SQLite's column names ignore case`;
    seen.set(folded, c.name);
  }
  const name = sqliteName(table.name).toLowerCase();
  if (name.startsWith("_pgrelay_") || name.startsWith("sqlite_")) return `its name "${sqliteName(table.name)}" is reserved in the replica`;
  for (const other of all) {
    if (other.name === table.name || other.skipped) continue;
    if (sqliteName(other.name).toLowerCase() === name) {
      return `it and ${other.name} would both be the replica's table "${sqliteName(table.name)}" (SQLite's names ignore case, and public's tables lose their schema)`;
    }
  }
  return null;
}
