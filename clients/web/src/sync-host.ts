//! What the sync engine is given and what it tells its host: the
//! configuration, the host's hooks (token, events), the status and events.

import type { HydrationProgress } from "./hydrate.js";
import type { MigrationEvent } from "./migrations.js";
import type { RepairProgress } from "./repair/exchange.js";

export interface SyncConfig {
  /** One server, or several tried in turn: the next one after each failure. */
  url: string | string[];
  tables?: string[];
  pingIntervalMs: number;
  idleTimeoutMs: number;
  backoffBaseMs: number;
  backoffCapMs: number;
  outboxPollMs: number;
}

export type ConnectionState = "connecting" | "connected" | "disconnected" | "offline" | "stopped" | "failed";

export interface SyncStatus {
  connection: ConnectionState;
  /** Hydration in progress, or null. */
  hydrating: HydrationProgress | null;
  /** Repair in progress (the replica compared with PostgreSQL range by range), or null. */
  repairing: RepairProgress | null;
  /** The replica holds everything the server had when this connection began. */
  caughtUp: boolean;
  lsn: string | null;
  /** Local writes the server has not answered yet. */
  outbox: number;
  rejected: number;
  lastError: { code: string; message: string } | null;
  retryInMs: number | null;
}

export type SyncEvent =
  | { type: "status"; status: SyncStatus }
  | { type: "changed"; tables: string[]; commitTimesUs: number[]; appliedAtMs: number }
  | { type: "rejected"; txId: string; code: string | null; reason: string }
  | { type: "error"; code: string; message: string }
  | { type: "hydrated"; rows: number; bytes: number; wireBytes: number; elapsedMs: number; refetched: string[]; full: boolean; tables: string[] }
  | { type: "repaired"; tables: string[]; rowsRemoved: number; rowsReceived: number; bytes: number; bytesReceived: number; rounds: number; elapsedMs: number; refetch: string[] }
  | MigrationEvent;

export interface SyncHost {
  token(): Promise<string | null>;
  emit(event: SyncEvent): void;
  /** Says what a failed replica write means (a full disk, say) as a code and a message; undefined keeps it as is. */
  explain?(error: Error): Promise<{ code: string; message: string } | undefined>;
}

/** `ws://host:port` gets the path `/api/sync` when it has none. */
export function syncUrl(url: string): string {
  const trimmed = url.replace(/\/+$/, "");
  const afterScheme = trimmed.includes("://") ? trimmed.slice(trimmed.indexOf("://") + 3) : trimmed;
  return afterScheme.includes("/") ? trimmed : `${trimmed}/api/sync`;
}

/** The servers of a config, tried in turn: `next()` after a failure. */
export class ServerTurn {
  private readonly urls: string[];
  private turn = 0;

  constructor(url: string | string[]) {
    this.urls = typeof url === "string" ? [url] : url.length > 0 ? url : [""];
  }

  get current(): string {
    return this.urls[this.turn % this.urls.length] ?? "";
  }

  /** A dead node is left for a live one. */
  next(): void {
    this.turn = (this.turn + 1) % this.urls.length;
  }
}
