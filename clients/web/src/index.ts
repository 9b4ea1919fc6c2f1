//! `@pgrelay/client`: a persistent SQLite replica of pgrelay-synced
//! PostgreSQL tables in the browser, with local writes, offline use, live
//! queries and several tabs. `connect()` returns the handle a page uses;
//! the work happens in a worker (worker.ts), owned by one tab (tabs.ts).

import type { Call, ExecuteOptions, OpenOptions, Storage } from "./rpc.js";
import type { Params, ResultRow } from "./replica/index.js";
import type { SyncEvent, SyncStatus } from "./session.js";
import { Link } from "./tabs.js";
import { tablesRead } from "./watch.js";

export type { Params, ResultRow, SyncStatus, Storage };
export { WriteRejectedError } from "./session.js";

export interface ConnectOptions {
  /**
   * The server: `ws://host:port` (the path `/api/sync` is added when
   * missing). Several nodes of one deployment: a list, tried in turn (the
   * next one after each failure), so a dead node is left for a live one.
   */
  url: string | string[];
  /** A fixed token for a server running with `--auth`. */
  token?: string;
  /** Asked before every connection (so an expired token is replaced); wins over `token`. */
  getToken?: () => Promise<string> | string;
  /** Tables to sync (`todos` or `public.todos`); all of them when absent. Choose them for a new replica. */
  tables?: string[];
  /** The replica's name in this origin (one database file, one Web Lock). Default `pgrelay`. */
  name?: string;
  /** `opfs` (default, persistent) or `memory` (gone on reload; for tests). */
  storage?: Storage;
  /** Share one replica between this origin's tabs (default true with OPFS). */
  multiTab?: boolean;
  clientId?: string;
  /** Start offline: no connection until `setOffline(false)`. */
  offline?: boolean;
  /** Where the worker script is; default `worker.js` next to this module. */
  workerUrl?: string | URL;
  pingIntervalMs?: number;
  idleTimeoutMs?: number;
  backoffBaseMs?: number;
  backoffCapMs?: number;
}

export interface Rejection {
  txId: string;
  code: string | null;
  reason: string;
}

type Listener<T> = (value: T) => void;

interface EventMap {
  status: SyncStatus;
  rejected: Rejection;
  error: { code: string; message: string };
  /** A snapshot loaded: whole (`full`) or of `tables` alone (a schema change, a new table). */
  hydrated: { rows: number; bytes: number; wireBytes: number; elapsedMs: number; refetched: string[]; full: boolean; tables: string[] };
  changed: { tables: string[]; commitTimesUs: number[]; appliedAtMs: number };
  /**
   * The replica was repaired instead of downloaded again (the server could
   * not continue its position): rows removed and received, repair frames'
   * bytes both ways; `refetch`: tables that still differed, fetched whole.
   */
  repaired: { tables: string[]; rowsRemoved: number; rowsReceived: number; bytes: number; bytesReceived: number; rounds: number; elapsedMs: number; refetch: string[] };
}

export interface Transaction {
  query<T = ResultRow>(sql: string, params?: Params): Promise<T[]>;
  execute(sql: string, params?: Params): Promise<void>;
}

const EMPTY_STATUS: SyncStatus = {
  connection: "connecting",
  hydrating: null,
  repairing: null,
  caughtUp: false,
  lsn: null,
  outbox: 0,
  rejected: 0,
  lastError: null,
  retryInMs: null,
};

/** A replica and its sync; from `connect()`. */
export class PgRelay {
  status: SyncStatus = { ...EMPTY_STATUS };
  storage: Storage | null = null;
  clientId: string | null = null;
  private readonly listeners = new Map<keyof EventMap, Set<Listener<never>>>();
  private link!: Link;

  /** @internal */
  constructor(private readonly options: ConnectOptions) {}

  /** @internal */
  async start(): Promise<void> {
    const storage = this.options.storage ?? "opfs";
    const name = this.options.name ?? "pgrelay";
    const open: OpenOptions = { name, url: this.options.url, storage };
    for (const key of ["tables", "clientId", "offline", "pingIntervalMs", "idleTimeoutMs", "backoffBaseMs", "backoffCapMs"] as const) {
      if (this.options[key] !== undefined) (open as unknown as Record<string, unknown>)[key] = this.options[key];
    }
    const workerUrl = this.options.workerUrl ?? new URL("./worker.js", import.meta.url);
    this.link = new Link(
      name,
      () => new Worker(workerUrl, { type: "module", name: `pgrelay-${name}` }),
      async (call) => {
        const opened = (await call({ method: "open", args: [open] })) as { storage: Storage; clientId: string };
        this.storage = opened.storage;
        this.clientId = opened.clientId;
      },
      (event) => this.dispatch(event),
      () => this.token(),
      this.options.multiTab ?? storage !== "memory",
    );
    await this.link.start();
    this.status = (await this.call({ method: "status", args: [] })) as SyncStatus;
  }

  /** Whether this tab holds the database and the socket. */
  get isLeader(): boolean {
    return this.link.isLeader;
  }

  private async token(): Promise<string | null> {
    if (this.options.getToken) return await this.options.getToken();
    return this.options.token ?? null;
  }

  private call(call: Call): Promise<unknown> {
    return this.link.call(call);
  }

  /** Rows of a query on the replica (works offline). */
  async query<T = ResultRow>(sql: string, params?: Params): Promise<T[]> {
    return (await this.call({ method: "query", args: [sql, params, undefined] })) as T[];
  }

  /**
   * A local write: runs in one SQLite transaction that also puts its
   * changes in the outbox. With `waitForServer`, resolves once the server
   * applied it and the replica holds the transaction that carries it;
   * rejects with `WriteRejectedError` when the server refuses it.
   */
  async execute(sql: string, params?: Params, options: { waitForServer?: boolean } = {}): Promise<{ txId: string; captured: number }> {
    const execute: ExecuteOptions = { txId: `tx-${randomId()}` };
    if (options.waitForServer) execute.waitForServer = true;
    return (await this.call({ method: "execute", args: [sql, params, execute] })) as { txId: string; captured: number };
  }

  /**
   * Runs `work` in one SQLite transaction; its writes go to the server as
   * one client transaction (all or none). Sync waits while it is open.
   */
  async transaction<T>(work: (tx: Transaction) => Promise<T>, options: { waitForServer?: boolean } = {}): Promise<T> {
    const { handle } = (await this.call({ method: "begin", args: [] })) as { handle: string };
    const tx: Transaction = {
      query: async <R = ResultRow>(sql: string, params?: Params) => (await this.call({ method: "query", args: [sql, params, handle] })) as R[],
      execute: async (sql: string, params?: Params) => {
        await this.call({ method: "execute", args: [sql, params, { txHandle: handle }] });
      },
    };
    let value: T;
    try {
      value = await work(tx);
    } catch (e) {
      await this.call({ method: "rollback", args: [handle] }).catch(() => undefined);
      throw e;
    }
    await this.call({ method: "commit", args: [handle, options.waitForServer ?? false] });
    return value;
  }

  /**
   * Runs the query now and again whenever a table it reads changes (a
   * server transaction or a local write), at most once per applied batch.
   * Returns the function that stops it.
   */
  watch<T = ResultRow>(sql: string, params: Params | undefined, onRows: (rows: T[]) => void, onError?: (e: Error) => void): () => void {
    let stopped = false;
    let running = false;
    let again = false;
    let tables: Set<string> | null = null;
    const run = async (): Promise<void> => {
      if (stopped) return;
      if (running) {
        again = true;
        return;
      }
      running = true;
      try {
        do {
          again = false;
          if (tables === null) {
            const known = (await this.call({ method: "tables", args: [] })) as string[];
            tables = tablesRead(sql, known);
          }
          const rows = await this.query<T>(sql, params);
          if (!stopped) onRows(rows);
        } while (again && !stopped);
      } catch (e) {
        if (onError) onError(e as Error);
        else this.emit("error", { code: "watch", message: (e as Error).message });
      } finally {
        running = false;
      }
    };
    const off = this.on("changed", (change) => {
      if (tables === null || tables.size === 0 || change.tables.some((t) => tables!.has(t))) {
        if (change.commitTimesUs.length === 0) tables = null; // a schema may have arrived
        void run();
      }
    });
    void run();
    return () => {
      stopped = true;
      off();
    };
  }

  on<K extends keyof EventMap>(event: K, listener: Listener<EventMap[K]>): () => void {
    let set = this.listeners.get(event);
    if (!set) this.listeners.set(event, (set = new Set()));
    set.add(listener as Listener<never>);
    return () => set.delete(listener as Listener<never>);
  }

  /** Goes offline (local reads and writes go on; writes wait in the outbox) or back online. */
  async setOffline(offline: boolean): Promise<void> {
    await this.call({ method: "setOffline", args: [offline] });
  }

  /** Stops syncing and lets another tab take the replica over. */
  close(): void {
    this.link.close();
  }

  private emit<K extends keyof EventMap>(event: K, value: EventMap[K]): void {
    for (const l of this.listeners.get(event) ?? []) (l as Listener<EventMap[K]>)(value);
  }

  private dispatch(event: SyncEvent): void {
    switch (event.type) {
      case "status":
        this.status = event.status;
        this.emit("status", event.status);
        return;
      case "changed":
        this.emit("changed", { tables: event.tables, commitTimesUs: event.commitTimesUs, appliedAtMs: event.appliedAtMs });
        return;
      case "rejected":
        this.emit("rejected", { txId: event.txId, code: event.code, reason: event.reason });
        return;
      case "error":
        this.emit("error", { code: event.code, message: event.message });
        return;
      case "hydrated":
        this.emit("hydrated", { rows: event.rows, bytes: event.bytes, wireBytes: event.wireBytes, elapsedMs: event.elapsedMs, refetched: event.refetched, full: event.full, tables: event.tables });
        return;
      case "repaired": {
        const { type: _, ...repaired } = event;
        this.emit("repaired", repaired);
        return;
      }
    }
  }
}

/** Opens (or creates) the local replica and starts syncing it. */
export async function connect(options: ConnectOptions): Promise<PgRelay> {
  const urls = typeof options?.url === "string" ? [options.url] : options?.url;
  if (!Array.isArray(urls) || urls.length === 0 || !urls.every((u) => typeof u === "string" && /^wss?:\/\//.test(u))) {
    throw new TypeError(`pgrelay: url must be a ws:// or wss:// URL, or a non-empty list of them (got ${JSON.stringify(options?.url)})`);
  }
  const db = new PgRelay(options);
  await db.start();
  return db;
}

function randomId(): string {
  const b = new Uint8Array(16);
  crypto.getRandomValues(b);
  return Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
}
