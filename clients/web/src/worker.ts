//! The worker that owns the replica: opens SQLite (WebAssembly) on OPFS
//! through the access-handle-pool VFS (no COOP/COEP headers needed), or in
//! memory, runs the sync engine, and answers the page's calls. Only one
//! tab's worker runs at a time (see tabs.ts), so one SQLite connection
//! owns the file and sync never runs twice for one replica.

import sqlite3InitModule, { type Database, type Sqlite3Static } from "@sqlite.org/sqlite-wasm";
import { Gate } from "./gate.js";
import { IdbImage } from "./idb.js";
import { randomHex } from "./replica/outbox.js";
import { Conn, Replica, type LoadJournal, type Params } from "./replica/index.js";
import { Sync, type SyncConfig, type SyncEvent } from "./session.js";
import type { Request, WorkerMessage, OpenOptions, Storage } from "./rpc.js";

declare const self: DedicatedWorkerGlobalScope;

let sqlite3: Sqlite3Static | null = null;
let replica: Replica | null = null;
let sync: Sync | null = null;
let storage: Storage = "memory";
let idb: IdbImage | null = null;
/** A transaction committed since the image was last saved (IndexedDB storage). */
let dirty = false;
const gate = new Gate();
/** The application transaction holding the gate, if any. */
let openTx: { id: string; release: () => void; timer: ReturnType<typeof setTimeout>; txId: string } | null = null;
const tokenWaits = new Map<number, { resolve(t: string | null): void; reject(e: Error): void }>();
let nextTokenId = 1;

/** An application transaction left open this long is rolled back (its tab may have died). */
const TX_IDLE_MS = 15_000;

function post(message: WorkerMessage): void {
  self.postMessage(message);
}

function emit(event: SyncEvent): void {
  // While the IndexedDB image cannot be saved, the status says so.
  if (event.type === "status" && unsaved && !event.status.lastError) event = { type: "status", status: { ...event.status, lastError: unsaved } };
  post({ kind: "event", event });
}

self.onmessage = (e: MessageEvent) => {
  const m = e.data as Request | { kind: "token"; id: number; token?: string | null; error?: string };
  if (m.kind === "token") {
    const w = tokenWaits.get(m.id);
    tokenWaits.delete(m.id);
    if (!w) return;
    if (m.error !== undefined) w.reject(new Error(m.error));
    else w.resolve(m.token ?? null);
    return;
  }
  void handle(m).then(
    (result) => post({ kind: "reply", id: m.id, result }),
    (error: unknown) => {
      const err = error as Error & { code?: string };
      post({ kind: "reply", id: m.id, error: { name: err?.name ?? "Error", message: err?.message ?? String(error), code: err?.code ?? null } });
    },
  );
};

async function handle(m: Request): Promise<unknown> {
  switch (m.method) {
    case "open":
      return open(m.args[0]);
    case "query": {
      const [sql, params, txHandle] = m.args;
      if (txHandle && openTx?.id === txHandle) return need().query(sql, params);
      return gated(() => need().query(sql, params));
    }
    case "execute": {
      const [sql, params, options] = m.args;
      if (options.txHandle && openTx?.id === options.txHandle) {
        touchTx();
        need().conn.query(sql, params);
        return { txId: openTx.txId, captured: 0 };
      }
      const txId = options.txId ?? `tx-${randomHex(16)}`;
      const executed = await gated(() => durably(() => need().execute(sql, params, txId)));
      afterWrite(sql);
      if (options.waitForServer && executed.captured > 0 && !executed.duplicate) await needSync().waitForServer(txId);
      return { txId, captured: executed.captured };
    }
    case "begin": {
      const release = await gate.hold();
      const r = need();
      const id = randomHex(8);
      const txId = `tx-${randomHex(16)}`;
      try {
        durability(true);
        r.conn.execBatch("BEGIN IMMEDIATE");
        r.conn.run("UPDATE _pgrelay_capture SET tx_id = ?1 WHERE id = 1", [txId]);
      } catch (e) {
        durability(false);
        release();
        throw e;
      }
      openTx = { id, release, txId, timer: setTimeout(() => endTx(id, false), TX_IDLE_MS) };
      return { handle: id, txId };
    }
    case "commit":
    case "rollback": {
      const [handleId, waitForServer] = m.args as [string, boolean?];
      const txId = openTx?.txId;
      const captured = endTx(handleId, m.method === "commit");
      await gated(() => undefined);
      if (m.method === "commit" && txId) {
        afterWrite(null);
        if (waitForServer && captured > 0) await needSync().waitForServer(txId);
      }
      return { captured };
    }
    case "status":
      return needSync().status;
    case "setOffline":
      needSync().setOffline(m.args[0]);
      return null;
    case "tables":
      return need().schema().map((t) => t.name);
    case "close":
      sync?.stop();
      return null;
  }
}

function touchTx(): void {
  if (!openTx) return;
  clearTimeout(openTx.timer);
  const id = openTx.id;
  openTx.timer = setTimeout(() => endTx(id, false), TX_IDLE_MS);
}

/** Ends the application transaction; returns how many writes it captured. */
function endTx(id: string, commit: boolean): number {
  if (!openTx || openTx.id !== id) {
    if (commit) throw new Error("the transaction is no longer open (it was idle too long, or its tab handed over)");
    return 0;
  }
  const tx = openTx;
  openTx = null;
  clearTimeout(tx.timer);
  const conn = need().conn;
  let captured = 0;
  try {
    conn.run("UPDATE _pgrelay_capture SET tx_id = NULL WHERE id = 1");
    captured = Number(conn.value("SELECT count(*) FROM _pgrelay_outbox WHERE tx_id = ?1", [tx.txId]) ?? 0);
    // A transaction the protocol cannot carry is rolled back and refused.
    if (commit && captured > 0) need().checkSendable(tx.txId);
    conn.execBatch(commit ? "COMMIT" : "ROLLBACK");
  } catch (e) {
    try {
      conn.execBatch("ROLLBACK");
    } catch {
      // Already rolled back.
    }
    throw e;
  } finally {
    durability(false);
    tx.release();
  }
  return captured;
}

/**
 * On OPFS the replica runs in WAL mode with the one connection holding the
 * file exclusively (the access-handle pool has no shared memory, which WAL
 * then does without). Server transactions commit with `synchronous=NORMAL`:
 * an append to the WAL, no flush, about 1 ms instead of the 15-30 ms of a
 * flushed rollback journal, and SQLite stays consistent on power loss (a
 * lost tail of applied transactions takes its position with it and is
 * fetched again). Local writes commit with `synchronous=FULL` (see
 * `durably`): a write the app was told is made is on disk.
 * Falls back to a flushed rollback journal where WAL cannot be set.
 */
function setUpOpfsJournal(conn: Conn): boolean {
  // Set before the first read: a WAL left by a killed tab can only be
  // opened without shared memory in exclusive mode.
  conn.execBatch("PRAGMA locking_mode = EXCLUSIVE;");
  const mode = String(Object.values(conn.query("PRAGMA journal_mode = WAL")[0] ?? {})[0] ?? "");
  if (mode.toLowerCase() === "wal") {
    conn.execBatch("PRAGMA synchronous = NORMAL;");
    return true;
  }
  conn.execBatch("PRAGMA journal_mode = TRUNCATE; PRAGMA synchronous = FULL;");
  return false;
}

let walMode = false;

/**
 * While a snapshot loads, the OPFS file uses a rollback journal instead of
 * the WAL. In WAL mode every loaded page is written twice (to the WAL, then
 * by the checkpoint to the file); a rollback journal keeps only the old
 * contents of pages that existed before, and a fresh table's pages are new,
 * so loading writes them once (hydration 1.4x faster in the worker). A
 * tab killed mid-load leaves a hot journal, which SQLite rolls back when
 * the file is next opened: the replica is as it was before the
 * interrupted transaction, and the snapshot, not marked done, starts over.
 * The WAL comes back when the snapshot's last transaction has committed
 * (a snapshot that never ends leaves the journal mode as it is, until the
 * next open sets the WAL again).
 */
function loadJournal(conn: Conn): LoadJournal {
  let loading = false;
  return {
    loading() {
      if (!walMode || loading || conn.inTransaction() || !conn.sqlite3.capi.sqlite3_get_autocommit(conn.db.pointer!)) return;
      conn.query("PRAGMA journal_mode = TRUNCATE");
      loading = true;
    },
    loaded() {
      if (!loading || conn.inTransaction()) return;
      const mode = String(Object.values(conn.query("PRAGMA journal_mode = WAL")[0] ?? {})[0] ?? "");
      loading = false;
      walMode = mode.toLowerCase() === "wal";
    },
  };
}

/** Sets how the next commits reach the disk: flushed for local writes (see setUpOpfsJournal). */
function durability(full: boolean): void {
  if (walMode) need().conn.execBatch(full ? "PRAGMA synchronous = FULL;" : "PRAGMA synchronous = NORMAL;");
}

/** Runs a local write so that its commit is flushed to disk. */
function durably<T>(work: () => T): T {
  durability(true);
  try {
    return work();
  } finally {
    durability(false);
  }
}

/** After a local write: watchers look again, the outbox is pushed. */
function afterWrite(sql: string | null): void {
  const tables = need().schema().map((t) => (t.name.startsWith("public.") ? t.name.slice(7) : t.name));
  const touched = sql === null ? tables : tables.filter((t) => new RegExp(`\\b${t.replace(/[.*+?^${}()|[\]\\]/g, "\\$&")}\\b`, "i").test(sql));
  emit({ type: "changed", tables: touched.length > 0 ? touched : tables, commitTimesUs: [], appliedAtMs: Date.now() });
  sync?.wrote();
}

function need(): Replica {
  if (!replica) throw new Error("the replica is not open");
  return replica;
}

function needSync(): Sync {
  if (!sync) throw new Error("the replica is not open");
  return sync;
}

/** Whether this browser offers OPFS with synchronous access handles (what the pool VFS needs). */
function hasOpfs(): boolean {
  return (
    typeof navigator !== "undefined" &&
    typeof navigator.storage?.getDirectory === "function" &&
    typeof FileSystemFileHandle !== "undefined" &&
    typeof (FileSystemFileHandle.prototype as { createSyncAccessHandle?: unknown }).createSyncAccessHandle === "function"
  );
}

async function openDatabase(options: OpenOptions): Promise<Database> {
  sqlite3 ??= await sqlite3InitModule();
  const file = `/${options.name}.sqlite3`;
  if (options.storage === "memory") {
    storage = "memory";
    return new sqlite3.oo1.DB(":memory:", "c");
  }
  if (options.storage === "indexeddb" || !hasOpfs()) {
    if (!IdbImage.available()) {
      throw new StorageError("storage_unavailable", "this browser has neither OPFS access handles nor IndexedDB; open with storage: 'memory'");
    }
    return openIndexedDb(sqlite3, options.name);
  }
  // The previous owner (a closed tab's worker) may still be letting go of
  // the files' access handles: try again for a while.
  let lastError: unknown = null;
  for (let attempt = 0; attempt < 40; attempt++) {
    try {
      const pool = await sqlite3.installOpfsSAHPoolVfs({ name: "pgrelay-sahpool", directory: `.pgrelay-${options.name}` });
      storage = "opfs";
      return new pool.OpfsSAHPoolDb(file);
    } catch (e) {
      lastError = e;
      await new Promise((r) => setTimeout(r, 250));
    }
  }
  throw new StorageError("opfs_unavailable", `cannot open the OPFS database: ${(lastError as Error)?.message ?? lastError}`);
}

/** An in-memory database loaded from its IndexedDB image; saved again after each commit (see persist). */
async function openIndexedDb(s3: Sqlite3Static, name: string): Promise<Database> {
  const store = await IdbImage.open(name);
  const image = await store.load();
  const db = new s3.oo1.DB(":memory:", "c");
  if (image) {
    // SQLite owns (and frees) the copy: it must come from sqlite3_malloc.
    const p = s3.wasm.allocFromTypedArray(image);
    const rc = s3.capi.sqlite3_deserialize(
      db.pointer!,
      "main",
      p,
      image.byteLength,
      image.byteLength,
      s3.capi.SQLITE_DESERIALIZE_FREEONCLOSE | s3.capi.SQLITE_DESERIALIZE_RESIZEABLE,
    );
    if (rc !== 0) {
      db.close();
      throw new StorageError("storage_corrupt", `the replica saved in IndexedDB cannot be loaded (SQLite error ${rc})`);
    }
  }
  // Every commit marks the image stale; the gate saves it before answering.
  s3.capi.sqlite3_commit_hook(
    db.pointer!,
    () => {
      dirty = true;
      return 0;
    },
    0,
  );
  idb = store;
  storage = "indexeddb";
  return db;
}

/** With IndexedDB storage: writes the image if a transaction committed since the last save. */
async function persist(): Promise<void> {
  if (!idb || !dirty || !replica) return;
  dirty = false;
  const image = sqlite3!.capi.sqlite3_js_db_export(replica.conn.db.pointer!);
  try {
    await idb.save(image);
  } catch (e) {
    dirty = true;
    const full = (e as Error).name === "QuotaExceededError";
    throw new StorageError(
      full ? "storage_full" : "storage_write_failed",
      full
        ? `the browser's storage quota for this site is used up: the replica could not be saved to IndexedDB (the saved copy keeps its last complete transaction; syncing goes on in memory and saving resumes when space is freed): ${(e as Error).message}`
        : `saving the replica to IndexedDB failed: ${(e as Error).message}`,
    );
  }
}

/**
 * Replica work one at a time; with IndexedDB, what it committed is saved
 * before the gate opens. When saving fails (the quota is used up), the work
 * still counts: it committed in the replica (a local write is queued for
 * the server), syncing goes on in memory, the saved image keeps its last
 * complete state, and an error event and the status's `lastError` say so
 * until a save succeeds again.
 */
function gated<T>(work: () => T | Promise<T>): Promise<T> {
  return gate.run(async () => {
    const value = await work();
    try {
      await persist();
      if (unsaved) {
        unsaved = null;
        if (sync) emit({ type: "status", status: { ...sync.status } });
      }
    } catch (e) {
      if (!(e instanceof StorageError)) throw e;
      if (!unsaved) {
        unsaved = { code: e.code, message: e.message };
        emit({ type: "error", code: e.code, message: e.message });
        if (sync) emit({ type: "status", status: { ...sync.status } });
      }
    }
    return value;
  });
}

/** Why the IndexedDB image is behind the replica, while it is. */
let unsaved: { code: string; message: string } | null = null;

class StorageError extends Error {
  override name = "StorageError";
  constructor(
    readonly code: string,
    message: string,
  ) {
    super(message);
  }
}

async function open(options: OpenOptions): Promise<{ storage: Storage; clientId: string }> {
  const db = await openDatabase(options);
  const conn = new Conn(db, sqlite3!);
  // Before anything reads the file (cache_size does): see setUpOpfsJournal.
  if (storage === "opfs") walMode = setUpOpfsJournal(conn);
  conn.execBatch("PRAGMA temp_store = MEMORY; PRAGMA busy_timeout = 5000; PRAGMA cache_size = -16384;");
  replica = new Replica(conn);
  if (walMode) replica.journal = loadJournal(conn);
  let clientId = replica.state().clientId;
  if (options.clientId) clientId = options.clientId;
  clientId ??= `web-${randomHex(8)}`;
  replica.setMeta("client_id", clientId);
  const config: SyncConfig = {
    url: options.url,
    pingIntervalMs: options.pingIntervalMs ?? 15_000,
    idleTimeoutMs: options.idleTimeoutMs ?? 45_000,
    backoffBaseMs: options.backoffBaseMs ?? 200,
    backoffCapMs: options.backoffCapMs ?? 30_000,
    outboxPollMs: options.outboxPollMs ?? 1_000,
  };
  if (options.tables) config.tables = options.tables;
  sync = new Sync(replica, config, { token: requestToken, emit, explain: explainStorageFailure }, gated);
  if (options.offline) sync.setOffline(true);
  await persist();
  sync.start();
  return { storage, clientId };
}

/**
 * A replica write that failed with an I/O error while the origin has no
 * room left is a full quota: say so. The pool VFS reports a short write as a
 * bare I/O error, so a small probe file tells whether space is what is
 * missing. SQLite rolled the transaction back; the next connection retries.
 */
async function explainStorageFailure(error: Error): Promise<{ code: string; message: string } | undefined> {
  // Saving the IndexedDB image failed: the error already says why.
  if (error instanceof StorageError) return { code: error.code, message: error.message };
  if (!/SQLITE_(IOERR|FULL)/.test(error.message) || storage !== "opfs") return undefined;
  if (await hasRoom()) return undefined;
  return {
    code: "storage_full",
    message: `the browser's storage quota for this site is used up: the replica kept its last complete transaction; syncing resumes when space is freed (${error.message})`,
  };
}

/** Bytes the probe writes: a few SQLite pages, less than any transaction needs. */
const PROBE_BYTES = 64 * 1024;

/** Whether OPFS takes PROBE_BYTES more right now. */
async function hasRoom(): Promise<boolean> {
  const name = ".pgrelay-space-probe";
  const root = await navigator.storage.getDirectory();
  let handle: SyncHandle | null = null;
  try {
    const file = await root.getFileHandle(name, { create: true });
    handle = await (file as unknown as { createSyncAccessHandle(): Promise<SyncHandle> }).createSyncAccessHandle();
    return handle.write(new Uint8Array(PROBE_BYTES), { at: 0 }) === PROBE_BYTES;
  } catch (e) {
    if ((e as Error).name === "QuotaExceededError") return false;
    throw e;
  } finally {
    handle?.close();
    await root.removeEntry(name).catch(() => {});
  }
}

interface SyncHandle {
  write(data: Uint8Array, options: { at: number }): number;
  close(): void;
}

function requestToken(): Promise<string | null> {
  const id = nextTokenId++;
  return new Promise((resolve, reject) => {
    tokenWaits.set(id, { resolve, reject });
    post({ kind: "token", id });
  });
}

export type { Params };
