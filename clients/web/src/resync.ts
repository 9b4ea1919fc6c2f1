//! Tables the replica must fetch again by snapshot: a table schema it did
//! not have (or whose column types changed), and the error that ends the
//! connection so the next one asks for them.

import type { TableSchema } from "./protocol.js";
import type { Replica } from "./replica/index.js";
import type { SyncHost } from "./sync-host.js";

/** Tables need a snapshot: the connection ends and the next one asks for them. */
export class ResyncNeeded extends Error {
  override name = "ResyncNeeded";
  constructor(readonly tables: string[]) {
    super(`tables ${tables.join(", ")} need a snapshot; reconnecting for it`);
  }
}

/**
 * Applies table schemas and returns the tables that need their rows from a
 * snapshot (recorded in the replica for the next connection's `hello`),
 * leaving out those this connection's snapshot brings (`coming`). A table
 * the replica cannot hold is reported to the host and not synced.
 */
export function applySchema(replica: Replica, host: SyncHost, tables: TableSchema[], coming: string[]): string[] {
  const applied = replica.applySchema(tables);
  for (const r of applied.refused) {
    const message = `table ${r.table} is not synced: ${r.reason}`;
    console.warn(`pgrelay: ${message}`);
    host.emit({ type: "error", code: "schema_unsupported", message });
  }
  const needed = applied.needed.filter((t) => !coming.includes(t));
  if (needed.length > 0) replica.requestResync(needed);
  return needed;
}
