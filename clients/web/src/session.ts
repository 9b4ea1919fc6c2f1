//! The sync engine: one WebSocket at a time to the server. Handshake and
//! resume by LSN, snapshot hydration, server transactions applied in
//! batches (each batch atomically with its LSN), the outbox pushed in
//! order with one batch in flight, a heartbeat, and reconnects with
//! exponential backoff and full jitter. Mirrors the Rust client's
//! `session.rs` and `SyncClient::run`.

import { backoff } from "./backoff.js";
import { MigrationQueue, type MigrationEvent } from "./migrations.js";
import { Hydration, type HydrationProgress } from "./hydrate.js";
import type { ServerMessage, Transaction, WriteResults } from "./protocol.js";
import { decodeFrame, MAX_WRITE_TRANSACTIONS, parseLsn, PROTOCOL_VERSION, ProtocolError, RefusedError } from "./protocol.js";
import type { Outcome, Replica } from "./replica/index.js";

/** Changes applied in one SQLite transaction at most, when many wait. */
const MAX_APPLY_CHANGES = 10_000;
/** Compressed snapshot bytes loaded in one SQLite transaction at most. */
const SNAPSHOT_BATCH_BYTES = 16 << 20;

export interface SyncConfig {
  url: string;
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
  | { type: "hydrated"; rows: number; bytes: number; elapsedMs: number; refetched: string[] }
  | MigrationEvent;

export interface SyncHost {
  token(): Promise<string | null>;
  emit(event: SyncEvent): void;
  /** Says what a failed replica write means (a full disk, say) as a code and a message; undefined keeps it as is. */
  explain?(error: Error): Promise<{ code: string; message: string } | undefined>;
}

/** A local write someone waits on until the replica holds the server's version. */
interface Waiter {
  resolve(): void;
  reject(error: Error): void;
  /** Set once the server applied it: the WAL bounds of its commit. */
  bounds?: { floor: bigint | null; ceiling: bigint | null };
}

/** Codes after which reconnecting cannot help. */
const FATAL = new Set(["unauthorized", "unknown_table", "unsupported_version", "upgrade_required", "malformed_frame", "unknown_message", "handshake_required", "frame_too_large", "replaced"]);

export class Sync {
  private socket: WebSocket | null = null;
  private generation = 0;
  private attempt = 0;
  private reconnectTimer: ReturnType<typeof setTimeout> | null = null;
  private pingTimer: ReturnType<typeof setInterval> | null = null;
  private pollTimer: ReturnType<typeof setInterval> | null = null;
  private queue: (string | ArrayBuffer)[] = [];
  private draining = false;
  private lastHeard = 0;
  private offline = false;
  private stopped = true;

  // Per connection.
  private welcomed = false;
  /** This client's tag in transactions' `origin` (the welcome says it). */
  private origin: string | null = null;
  private target: bigint | null = null;
  /**
   * PostgreSQL's WAL position at the welcome, and how far the server says
   * its capture has sent us (`caught_up.wal_lsn`): caught up means holding
   * everything PostgreSQL had committed when this connection began.
   */
  private walTarget: bigint | null = null;
  private walSent: bigint | null = null;
  /** The tables this connection's `hello` asked to resync (its snapshot brings them). */
  private resyncAsked: string[] = [];
  private awaitingSnapshot = false;
  private hydration: Hydration | null = null;
  /** The batch awaiting its answer. */
  private inFlight: { batchId: string | null; txIds: string[] } | null = null;
  private pushWanted = false;
  private notBefore = 0;
  private pushAttempt = 0;
  private oneAtATime = false;
  /** Own transactions applied on this connection (LSNs), for read-your-writes. */
  private echoes: bigint[] = [];

  private readonly waiters = new Map<string, Waiter>();
  private readonly migrations: MigrationQueue;
  readonly status: SyncStatus = {
    connection: "stopped",
    hydrating: null,
    caughtUp: false,
    lsn: null,
    outbox: 0,
    rejected: 0,
    lastError: null,
    retryInMs: null,
  };

  constructor(
    private readonly replica: Replica,
    private readonly config: SyncConfig,
    private readonly host: SyncHost,
    /** Runs replica work exclusively (an application transaction may hold the database). */
    private readonly exclusive: <T>(work: () => T | Promise<T>) => Promise<T>,
  ) {
    this.status.lsn = replica.state().lsn;
    this.migrations = new MigrationQueue(replica, exclusive, (m) => this.send(m), (e) => host.emit(e));
    this.refreshOutbox();
  }

  start(): void {
    if (!this.stopped) return;
    this.stopped = false;
    this.pollTimer = setInterval(() => {
      this.pushWanted = true;
      this.pump();
    }, this.config.outboxPollMs);
    this.connect();
  }

  stop(): void {
    this.stopped = true;
    this.disconnect("stopped");
    if (this.pollTimer !== null) clearInterval(this.pollTimer);
    this.pollTimer = null;
    this.setStatus({ connection: "stopped" });
  }

  /** Takes the replica offline (writes keep going to the outbox) or back. */
  setOffline(offline: boolean): void {
    if (this.offline === offline) return;
    this.offline = offline;
    if (offline) {
      this.disconnect("offline");
      this.setStatus({ connection: "offline", retryInMs: null });
    } else if (!this.stopped) {
      this.attempt = 0;
      this.connect();
    }
  }

  /** A local write was made: push it when connected. */
  wrote(): void {
    this.pushWanted = true;
    this.refreshOutbox();
    this.pump();
  }

  /** Resolves once the server applied the transaction and the replica holds it. */
  waitForServer(txId: string): Promise<void> {
    return new Promise((resolve, reject) => {
      this.waiters.set(txId, { resolve, reject });
    });
  }

  private connect(): void {
    if (this.stopped || this.offline) return;
    if (this.reconnectTimer !== null) clearTimeout(this.reconnectTimer);
    this.reconnectTimer = null;
    const generation = ++this.generation;
    this.setStatus({ connection: "connecting", retryInMs: null });
    void this.open(generation);
  }

  private async open(generation: number): Promise<void> {
    let token: string | null;
    try {
      token = await this.host.token();
    } catch (e) {
      this.fail(generation, new Error(`token: ${(e as Error).message}`), "token");
      return;
    }
    if (generation !== this.generation) return;
    let socket: WebSocket;
    try {
      socket = new WebSocket(syncUrl(this.config.url));
    } catch (e) {
      this.fail(generation, new Error(`connecting to ${this.config.url}: ${(e as Error).message}`), "connect");
      return;
    }
    socket.binaryType = "arraybuffer";
    this.socket = socket;
    this.resetConnection();
    socket.onopen = () => {
      if (generation !== this.generation) return;
      const state = this.replica.state();
      const hello: Record<string, unknown> = { type: "hello", protocol_version: PROTOCOL_VERSION, client_id: state.clientId ?? "" };
      if (token) hello.token = token;
      if (state.lsn) hello.last_lsn = state.lsn;
      if (state.logId) hello.log_id = state.logId;
      if (state.resync.length > 0) hello.resync = state.resync;
      if (this.config.tables) hello.tables = this.config.tables;
      hello.schema_version = state.schemaVersion;
      this.awaitingSnapshot = state.lsn === null || state.resync.length > 0;
      this.resyncAsked = state.resync;
      socket.send(JSON.stringify(hello));
      this.lastHeard = Date.now();
      this.pingTimer = setInterval(() => this.heartbeat(generation), this.config.pingIntervalMs);
    };
    socket.onmessage = (event: MessageEvent) => {
      if (generation !== this.generation) return;
      this.lastHeard = Date.now();
      this.queue.push(event.data as string | ArrayBuffer);
      this.scheduleDrain(generation);
    };
    socket.onclose = (event: CloseEvent) => {
      if (generation !== this.generation) return;
      // Frames that arrived before the close are still applied first.
      this.scheduleDrain(generation, () => {
        const reason = event.reason ? `${event.code} ${event.reason}` : `${event.code}`;
        this.fail(generation, new Error(this.welcomed ? `the server closed the connection (${reason})` : `connecting to ${this.config.url} failed (${reason})`), "closed");
      });
    };
    socket.onerror = () => {
      // A close event follows with the details the browser gives.
    };
  }

  private resetConnection(): void {
    this.queue = [];
    this.migrations.stop();
    this.welcomed = false;
    this.target = null;
    this.walTarget = null;
    this.walSent = null;
    this.hydration = null;
    this.inFlight = null;
    this.pushWanted = true;
    this.oneAtATime = false;
    this.echoes = [];
    this.setStatus({ caughtUp: false, hydrating: null });
  }

  private heartbeat(generation: number): void {
    if (generation !== this.generation || !this.socket) return;
    if (Date.now() - this.lastHeard > this.config.idleTimeoutMs) {
      this.fail(generation, new Error(`no message from the server for ${this.config.idleTimeoutMs} ms`), "silent");
      return;
    }
    if (this.socket.readyState === WebSocket.OPEN && this.welcomed) this.socket.send('{"type":"ping"}');
  }

  private disconnect(reason: string): void {
    this.generation++;
    if (this.pingTimer !== null) clearInterval(this.pingTimer);
    this.pingTimer = null;
    if (this.reconnectTimer !== null) clearTimeout(this.reconnectTimer);
    this.reconnectTimer = null;
    const socket = this.socket;
    this.socket = null;
    if (socket && socket.readyState <= WebSocket.OPEN) {
      try {
        socket.close(1000, reason);
      } catch {
        // Already closing.
      }
    }
  }

  /** Ends this connection after an error and plans the next one. */
  private fail(generation: number, error: Error, kind: string, explained = false): void {
    if (generation !== this.generation) return;
    if (kind === "replica" && !explained && !(error instanceof ResyncNeeded) && this.host.explain) {
      // Stop taking frames now; report once we know what the failure means.
      this.disconnect("error");
      const next = this.generation;
      void this.host.explain(error).then(
        (why) => this.fail(next, why ? new Error(why.message) : error, why?.code ?? kind, true),
        () => this.fail(next, error, kind, true),
      );
      return;
    }
    if (error instanceof ResyncNeeded) {
      // Not an error: the next connection asks for these tables' snapshot.
      this.disconnect("resync");
      if (this.stopped || this.offline) return;
      this.attempt = 0;
      this.setStatus({ connection: "disconnected", retryInMs: 0 });
      this.reconnectTimer = setTimeout(() => this.connect(), 0);
      return;
    }
    const code = error instanceof RefusedError ? error.code : error instanceof ProtocolError ? "protocol" : kind;
    this.disconnect("error");
    if (this.stopped || this.offline) return;
    const lastError = { code, message: error.message };
    this.host.emit({ type: "error", code, message: error.message });
    if (error instanceof RefusedError && FATAL.has(error.code)) {
      for (const [, w] of this.waiters) w.reject(error);
      this.waiters.clear();
      this.setStatus({ connection: "failed", lastError, retryInMs: null });
      return;
    }
    if (error instanceof RefusedError && error.code === "gone" && (this.welcomed || this.attempt === 0)) {
      console.warn("pgrelay: the server no longer has this replica's history; re-hydrating (unsent local writes are kept)");
      void this.exclusive(() => this.replica.reset()).then(() => {
        this.status.lsn = null;
        this.attempt = 1;
        this.connect();
      });
      this.setStatus({ connection: "disconnected", lastError, retryInMs: 0 });
      return;
    }
    if (this.welcomed) this.attempt = 0;
    const delay = backoff(this.attempt, this.config.backoffBaseMs, this.config.backoffCapMs);
    this.attempt++;
    this.setStatus({ connection: "disconnected", lastError, retryInMs: delay });
    this.reconnectTimer = setTimeout(() => this.connect(), delay);
  }

  private scheduleDrain(generation: number, then?: () => void): void {
    if (this.draining) {
      if (then) this.afterDrain.push(then);
      return;
    }
    if (then) this.afterDrain.push(then);
    this.draining = true;
    // A macrotask later, so frames that arrive together commit together.
    setTimeout(() => {
      void this.drain(generation);
    }, 0);
  }

  private afterDrain: (() => void)[] = [];

  private async drain(generation: number): Promise<void> {
    try {
      while (this.queue.length > 0 && generation === this.generation) {
        await this.exclusive(() => this.process(generation));
      }
    } catch (e) {
      this.fail(generation, e as Error, "replica");
    } finally {
      this.draining = false;
      const after = this.afterDrain;
      this.afterDrain = [];
      if (this.queue.length > 0 && generation === this.generation) this.scheduleDrain(generation);
      for (const f of after) f();
    }
    this.pump();
  }

  /** Handles the queued frames: transactions gathered into one commit. */
  private async process(generation: number): Promise<void> {
    let batch: Transaction[] = [];
    let changes = 0;
    while (this.queue.length > 0 && generation === this.generation) {
      const data = this.queue.shift()!;
      if (typeof data !== "string") {
        const hydration = this.hydration;
        if (!hydration) throw new ProtocolError("a binary frame outside a snapshot");
        // The chunks that arrived together load in one SQLite transaction:
        // a commit on OPFS costs tens of milliseconds, and an interrupted
        // snapshot starts over anyway, so committing each chunk buys nothing.
        this.replica.snapshotBatch(() => {
          hydration.chunk(this.replica, new Uint8Array(data));
          let bytes = data.byteLength;
          while (bytes < SNAPSHOT_BATCH_BYTES && typeof this.queue[0] === "object" && generation === this.generation) {
            const next = this.queue.shift() as ArrayBuffer;
            bytes += next.byteLength;
            hydration.chunk(this.replica, new Uint8Array(next));
          }
        });
        this.setStatus({ hydrating: hydration.progress() });
        continue;
      }
      let message: ServerMessage;
      try {
        message = decodeFrame(data);
      } catch (e) {
        this.flush(batch);
        throw e;
      }
      if (message.type === "tx") {
        batch.push(message);
        changes += message.changes.length;
        if (changes >= MAX_APPLY_CHANGES) break;
        continue;
      }
      this.flush(batch);
      batch = [];
      changes = 0;
      await this.handle(message);
    }
    this.flush(batch);
    const lsn = this.status.lsn === null ? 0n : parseLsn(this.status.lsn);
    // Not while a snapshot is still arriving; a server that names no WAL
    // position (an older one) means its change log's head at the welcome.
    const walReached = this.walTarget === null || (this.walSent !== null && this.walSent >= this.walTarget);
    if (!this.awaitingSnapshot && this.target !== null && lsn >= this.target && walReached) {
      this.target = null;
      this.setStatus({ caughtUp: true });
    }
  }

  private flush(batch: Transaction[]): void {
    if (batch.length === 0) return;
    // Servers before the origin tag sent the client id itself.
    const own = this.origin ?? this.replica.state().clientId;
    const applied = this.replica.applyTransactions(batch, own);
    for (const e of applied.echoes) this.echoes.push(parseLsn(e.lsn));
    if (this.echoes.length > 1000) this.echoes.splice(0, this.echoes.length - 1000);
    this.status.lsn = applied.lsn;
    if (applied.tables.length > 0) {
      this.host.emit({ type: "changed", tables: applied.tables, commitTimesUs: batch.map((t) => t.commit_time_us), appliedAtMs: Date.now() });
    }
    this.settleWaiters();
    this.setStatus({});
    if (applied.unknown.length > 0) {
      // Committed, and recorded for a snapshot: the next connection
      // fetches those tables (a server that announced them would have
      // sent their schema first).
      console.warn(`pgrelay: changes for tables this replica does not know (${applied.unknown.join(", ")}); reconnecting to fetch them`);
      this.attempt = 0;
      throw new ResyncNeeded(applied.unknown);
    }
  }

  private async handle(message: ServerMessage): Promise<void> {
    switch (message.type) {
      case "welcome": {
        if (message.log_id) this.replica.setMeta("log_id", message.log_id);
        this.origin = message.origin ?? null;
        this.resyncNewTables(message.tables, this.resyncAsked);
        this.target = parseLsn(message.head_lsn);
        this.walTarget = message.wal_lsn ? parseLsn(message.wal_lsn) : null;
        this.welcomed = true;
        this.attempt = 0;
        this.pushWanted = true;
        this.setStatus({ connection: "connected", lastError: null });
        return;
      }
      case "schema":
        // Before this connection's snapshot, the tables it asked for are on their way.
        this.resyncNewTables(message.tables, this.awaitingSnapshot ? this.resyncAsked : []);
        return;
      case "snapshot_begin":
        this.hydration = await Hydration.begin(this.replica, message.resume_lsn, message.full, message.tables, message.visibility);
        this.host.emit({ type: "changed", tables: this.hydration.tableNames().map(sqliteTable), commitTimesUs: [], appliedAtMs: Date.now() });
        this.setStatus({ hydrating: this.hydration.progress() });
        return;
      case "snapshot_table":
        if (!this.hydration) throw new ProtocolError("snapshot_table outside a snapshot");
        this.hydration.tableDone(this.replica, message);
        this.setStatus({ hydrating: this.hydration.progress() });
        return;
      case "snapshot_end": {
        const h = this.hydration;
        if (!h) throw new ProtocolError("snapshot_end outside a snapshot");
        const refetch = h.end(this.replica);
        this.send({ type: "snapshot_done", refetch });
        if (refetch.length === 0) {
          if (h.full) this.status.lsn = h.resume;
          this.hydration = null;
          this.awaitingSnapshot = false;
          this.pushWanted = true;
          this.host.emit({ type: "hydrated", rows: h.rowsDone, bytes: h.bytesDone, elapsedMs: Date.now() - h.started, refetched: h.refetched });
          this.host.emit({ type: "changed", tables: h.tableNames().map(sqliteTable), commitTimesUs: [], appliedAtMs: Date.now() });
          this.setStatus({ hydrating: null });
        }
        return;
      }
      case "snapshot_queued":
        return;
      case "caught_up": {
        const lsn = parseLsn(message.lsn);
        const current = this.status.lsn === null ? 0n : parseLsn(this.status.lsn);
        if (lsn > current && !this.awaitingSnapshot) {
          // Transactions of tables this client does not sync were left out:
          // the position moves on without them, in a transaction of its own.
          const applied = this.replica.applyTransactions([{ lsn: message.lsn, xid: 0, commit_time_us: 0, changes: [] }], null);
          this.status.lsn = applied.lsn;
          this.settleWaiters();
        }
        this.target = lsn;
        if (message.wal_lsn) {
          const wal = parseLsn(message.wal_lsn);
          if (this.walSent === null || wal > this.walSent) this.walSent = wal;
        }
        return;
      }
      case "error":
        throw new RefusedError(message.code, message.message);
      case "write_result":
        this.answered(message);
        return;
      case "write_refused":
        this.refused(message.batch_id ?? null, message.code, message.message);
        return;
      case "migrations":
        this.migrations.receive(message.migrations);
        return;
      case "pong":
        return;
      default:
        // A message type a newer server may send: ignored, like unknown fields.
        return;
    }
  }

  /**
   * Applies table schemas; a table this replica did not have before (or
   * whose column types changed) needs its rows from a snapshot, so the
   * connection ends and the next one asks for it, unless it is among the
   * tables this connection's snapshot brings (`coming`).
   */
  private resyncNewTables(tables: import("./protocol.js").TableSchema[], coming: string[]): void {
    const applied = this.replica.applySchema(tables);
    for (const r of applied.refused) {
      const message = `table ${r.table} is not synced: ${r.reason}`;
      console.warn(`pgrelay: ${message}`);
      this.host.emit({ type: "error", code: "schema_unsupported", message });
    }
    const needed = applied.needed.filter((t) => !coming.includes(t));
    if (needed.length === 0) return;
    this.replica.requestResync(needed);
    // Reconnect at once to fetch them.
    this.attempt = 0;
    throw new ResyncNeeded(needed);
  }

  private send(message: unknown): void {
    this.sendText(JSON.stringify(message));
  }

  private sendText(frame: string): void {
    if (this.socket && this.socket.readyState === WebSocket.OPEN) this.socket.send(frame);
  }

  /** Sends the next outbox batch when one is due. */
  private pump(): void {
    if (!this.welcomed || this.hydration || this.awaitingSnapshot || this.inFlight !== null) return;
    if (!this.pushWanted || Date.now() < this.notBefore) return;
    if (!this.socket || this.socket.readyState !== WebSocket.OPEN) return;
    const generation = this.generation;
    void this.exclusive(() => {
      if (generation !== this.generation || this.inFlight !== null) return;
      this.pushWanted = false;
      const taken = this.replica.takeBatch(this.oneAtATime ? 1 : MAX_WRITE_TRANSACTIONS);
      if (taken.setAside.length > 0) {
        this.report(taken.setAside);
        // What followed it may be sent now.
        this.pushWanted = true;
      }
      if (taken.resync.length > 0) {
        // The next connection fetches the set-aside write's tables again.
        this.attempt = 0;
        throw new ResyncNeeded(taken.resync);
      }
      if (taken.frames.length === 0) return;
      this.inFlight = { batchId: taken.batchId, txIds: taken.txIds };
      // A large transaction goes as several `write_part` frames in a row;
      // the server answers once, after the last.
      for (const frame of taken.frames) this.sendText(frame);
    }).catch((e: unknown) => this.fail(generation, e as Error, "replica"));
  }

  private answered(results: WriteResults): void {
    const outcomes = this.replica.recordResults(results);
    const ceiling = results.lsn ? parseLsn(results.lsn) : null;
    const floor = results.lsn_floor ? parseLsn(results.lsn_floor) : null;
    for (const o of outcomes) {
      const w = this.waiters.get(o.txId);
      if (w && o.status === "applied") w.bounds = { floor, ceiling };
    }
    this.report(outcomes);
    this.inFlight = null;
    this.oneAtATime = false;
    if (outcomes.some((o) => o.status === "retry")) {
      this.notBefore = Date.now() + backoff(this.pushAttempt, this.config.backoffBaseMs, this.config.backoffCapMs);
      this.pushAttempt++;
    } else {
      this.pushAttempt = 0;
    }
    this.pushWanted = true;
    this.settleWaiters();
    this.refreshOutbox();
  }

  private refused(batchId: string | null, code: string, message: string): void {
    const sent = this.inFlight;
    if (sent === null) return;
    if (batchId !== null && sent.batchId !== batchId) return;
    this.inFlight = null;
    this.pushWanted = true;
    if (this.oneAtATime && sent.txIds.length === 1) {
      // A single transaction the server will never take: set it aside so
      // it does not block every write after it, and fetch the server's
      // rows again for the tables it wrote.
      this.oneAtATime = false;
      const [outcome, resync] = this.replica.setAside(sent.txIds[0]!, `${code}: ${message}`);
      this.report([outcome]);
      this.refreshOutbox();
      if (resync.length > 0) {
        this.attempt = 0;
        throw new ResyncNeeded(resync);
      }
      return;
    }
    this.oneAtATime = true;
    this.refreshOutbox();
  }

  private report(outcomes: Outcome[]): void {
    for (const o of outcomes) {
      if (o.status === "rejected") {
        this.host.emit({ type: "rejected", txId: o.txId, code: o.code ?? null, reason: o.reason ?? "rejected" });
        this.waiters.get(o.txId)?.reject(new WriteRejectedError(o.txId, o.code ?? null, o.reason ?? "rejected"));
        this.waiters.delete(o.txId);
      }
    }
    if (outcomes.some((o) => o.status === "rejected")) {
      // The rolled-back rows changed: watchers of every synced table look again.
      this.host.emit({ type: "changed", tables: this.replica.schema().map((t) => sqliteTable(t.name)), commitTimesUs: [], appliedAtMs: Date.now() });
    }
  }

  /** Resolves waiters whose write the replica now holds. */
  private settleWaiters(): void {
    if (this.waiters.size === 0) return;
    const position = this.status.lsn === null ? 0n : parseLsn(this.status.lsn);
    for (const [txId, w] of this.waiters) {
      if (!w.bounds) continue;
      const { floor, ceiling } = w.bounds;
      const held =
        ceiling === null ||
        position >= ceiling ||
        this.echoes.some((e) => (floor === null || e > floor) && e <= ceiling);
      if (held) {
        w.resolve();
        this.waiters.delete(txId);
      }
    }
  }

  private refreshOutbox(): void {
    const c = this.replica.outboxCounts();
    this.setStatus({ outbox: c.pending + c.sent, rejected: c.rejected });
  }

  private setStatus(change: Partial<SyncStatus>): void {
    Object.assign(this.status, change);
    this.host.emit({ type: "status", status: { ...this.status } });
  }
}

/** Tables need a snapshot: the connection ends and the next one asks for them. */
class ResyncNeeded extends Error {
  override name = "ResyncNeeded";
  constructor(readonly tables: string[]) {
    super(`tables ${tables.join(", ")} need a snapshot; reconnecting for it`);
  }
}

export class WriteRejectedError extends Error {
  override name = "WriteRejectedError";
  constructor(
    readonly txId: string,
    readonly code: string | null,
    readonly reason: string,
  ) {
    super(`write ${txId} rejected by the server: ${reason}`);
  }
}

function sqliteTable(name: string): string {
  return name.startsWith("public.") ? name.slice(7) : name;
}

/** `ws://host:port` gets the path `/api/sync` when it has none. */
export function syncUrl(url: string): string {
  const trimmed = url.replace(/\/+$/, "");
  const afterScheme = trimmed.includes("://") ? trimmed.slice(trimmed.indexOf("://") + 3) : trimmed;
  return afterScheme.includes("/") ? trimmed : `${trimmed}/api/sync`;
}
