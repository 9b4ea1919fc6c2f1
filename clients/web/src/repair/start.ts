//! A repair as the sync engine runs it: it holds the connection (the
//! server's frames go to a `RepairFeed`, not to the stream) until the
//! replica's position is the snapshot's, reports progress in the status,
//! and says when it is done with the text frames that arrived meanwhile.

import { sqliteName } from "../protocol.js";
import type { Replica } from "../replica/index.js";
import type { SyncHost } from "../sync-host.js";
import { repair, RepairFeed, type RepairBegin, type RepairProgress } from "./exchange.js";

/** The sync engine's parts a repair uses. */
export interface RepairDeps {
  replica: Replica;
  host: SyncHost;
  /** The connection's queue of received frames. */
  queue: (string | ArrayBuffer)[];
  exclusive: <T>(work: () => T | Promise<T>) => Promise<T>;
}

/** What the connection does for the repair, and with its outcome. */
export interface RepairHooks {
  /** False once the connection has ended. */
  live(): boolean;
  send(frame: Uint8Array): void;
  progress(p: RepairProgress): void;
  /** Repaired: the position is the snapshot's; `deferred` text frames are handled next, in order. */
  done(deferred: string[]): void;
  failed(error: Error): void;
}

/** Starts the repair; frames the connection receives from now on go to the returned feed (`notify` it). */
export function startRepair(deps: RepairDeps, hooks: RepairHooks, begin: RepairBegin): RepairFeed {
  const feed = new RepairFeed(deps.queue, hooks.live);
  const link = { send: hooks.send, next: () => feed.next(), run: deps.exclusive, progress: hooks.progress };
  repair(deps.replica, link, begin).then(
    (done) => {
      if (!hooks.live()) return;
      const { rowsRemoved, rowsReceived, bytes, bytesReceived, rounds, elapsedMs, refetch } = done;
      deps.host.emit({ type: "repaired", tables: begin.tables, rowsRemoved, rowsReceived, bytes, bytesReceived, rounds, elapsedMs, refetch });
      deps.host.emit({ type: "changed", tables: begin.tables.map(sqliteName), commitTimesUs: [], appliedAtMs: Date.now() });
      hooks.done(feed.deferred);
    },
    (e: unknown) => hooks.failed(e as Error),
  );
  return feed;
}
