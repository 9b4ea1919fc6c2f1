//! Messages between a page and the worker that owns the replica (and,
//! relayed unchanged, between tabs over a BroadcastChannel).

import type { Params, ResultRow } from "./replica/index.js";
import type { SyncEvent, SyncStatus } from "./session.js";

/** `opfs` falls back to `indexeddb` where the browser has no OPFS access handles. */
export type Storage = "opfs" | "indexeddb" | "memory";

export interface OpenOptions {
  name: string;
  url: string | string[];
  storage: Storage;
  tables?: string[];
  clientId?: string;
  offline?: boolean;
  pingIntervalMs?: number;
  idleTimeoutMs?: number;
  backoffBaseMs?: number;
  backoffCapMs?: number;
  outboxPollMs?: number;
}

export interface ExecuteOptions {
  txId?: string;
  txHandle?: string;
  waitForServer?: boolean;
}

export type Call =
  | { method: "open"; args: [OpenOptions] }
  | { method: "query"; args: [string, Params | undefined, string | undefined] }
  | { method: "execute"; args: [string, Params | undefined, ExecuteOptions] }
  | { method: "begin"; args: [] }
  | { method: "commit"; args: [string, boolean] }
  | { method: "rollback"; args: [string] }
  | { method: "status"; args: [] }
  | { method: "setOffline"; args: [boolean] }
  | { method: "tables"; args: [] }
  | { method: "close"; args: [] };

export type Request = Call & { kind: "call"; id: number };

export type WorkerMessage =
  | { kind: "reply"; id: number; result?: unknown; error?: { name: string; message: string; code: string | null } }
  | { kind: "event"; event: SyncEvent }
  | { kind: "token"; id: number };

export type { ResultRow, SyncStatus };
