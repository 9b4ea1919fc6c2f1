//! The sync engine: one WebSocket at a time to the server. Handshake and
//! resume by LSN, snapshot hydration or repair, server transactions
//! applied in batches (each batch atomically with its LSN), the outbox
//! pushed in order with one batch in flight, a heartbeat, and reconnects
//! (backoff.ts). Mirrors the Rust client's `session/` and `SyncClient::run`.

import { Retry } from "./backoff.js";
import { CatchUp } from "./catch-up.js";
import { Hydration } from "./hydrate.js";
import { MigrationQueue } from "./migrations.js";
import type { ServerMessage, TableSchema, Transaction, Visibility } from "./protocol.js";
import { decodeFrame, helloFrame, parseLsn, ProtocolError, RefusedError, sqliteName } from "./protocol.js";
import { Pusher } from "./push.js";
import type { RepairFeed } from "./repair/exchange.js";
import { startRepair } from "./repair/start.js";
import { applySchema, ResyncNeeded } from "./resync.js";
import type { Replica } from "./replica/index.js";
import { ServerTurn, syncUrl, type SyncConfig, type SyncHost, type SyncStatus } from "./sync-host.js";

export type { ConnectionState, SyncConfig, SyncEvent, SyncHost, SyncStatus } from "./sync-host.js";
export { syncUrl } from "./sync-host.js";
export { WriteRejectedError } from "./push.js";

/** Changes applied in one SQLite transaction at most, when many wait. */
const MAX_APPLY_CHANGES = 10_000;

export class Sync {
  private socket: WebSocket | null = null;
  private generation = 0;
  private readonly retry = new Retry();
  private readonly server: ServerTurn;
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
  private readonly catchUp = new CatchUp();
  /** The tables this connection's `hello` asked to resync (its snapshot brings them). */
  private resyncAsked: string[] = [];
  private awaitingSnapshot = false;
  private hydration: Hydration | null = null;
  /** Set while a repair holds the connection (frames go to it, not to `process`); the welcome's log, which it records once complete. */
  private repairFeed: RepairFeed | null = null;
  private welcomeLog: string | null = null;
  private readonly pusher: Pusher;
  readonly status: SyncStatus = { connection: "stopped", hydrating: null, repairing: null, caughtUp: false, lsn: null, outbox: 0, rejected: 0, lastError: null, retryInMs: null };
  private readonly migrations: MigrationQueue;

  constructor(
    private readonly replica: Replica,
    private readonly config: SyncConfig,
    private readonly host: SyncHost,
    /** Runs replica work exclusively (an application transaction may hold the database). */
    private readonly exclusive: <T>(work: () => T | Promise<T>) => Promise<T>,
  ) {
    this.pusher = new Pusher(replica, config, host, {
      position: () => this.status.lsn,
      outboxChanged: () => this.refreshOutbox(),
    });
    this.status.lsn = replica.state().lsn;
    this.server = new ServerTurn(config.url);
    this.migrations = new MigrationQueue(replica, exclusive, (m) => this.send(m), (e) => host.emit(e));
    this.refreshOutbox();
  }

  start(): void {
    if (!this.stopped) return;
    this.stopped = false;
    this.pollTimer = setInterval(() => {
      this.pusher.want();
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
      this.retry.attempt = 0;
      this.connect();
    }
  }

  /** A local write was made: push it when connected. */
  wrote(): void {
    this.pusher.want();
    this.refreshOutbox();
    this.pump();
  }

  /** Resolves once the server applied the transaction and the replica holds it. */
  waitForServer(txId: string): Promise<void> {
    return this.pusher.waitFor(txId);
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
      socket = new WebSocket(syncUrl(this.server.current));
    } catch (e) {
      this.fail(generation, new Error(`connecting to ${this.server.current}: ${(e as Error).message}`), "connect");
      return;
    }
    socket.binaryType = "arraybuffer";
    this.socket = socket;
    this.resetConnection();
    socket.onopen = () => {
      if (generation !== this.generation) return;
      const state = this.replica.state();
      this.awaitingSnapshot = state.lsn === null || state.resync.length > 0;
      this.resyncAsked = state.resync;
      socket.send(helloFrame(state, token, this.config.tables));
      this.lastHeard = Date.now();
      this.pingTimer = setInterval(() => this.heartbeat(generation), this.config.pingIntervalMs);
    };
    socket.onmessage = (event: MessageEvent) => {
      if (generation !== this.generation) return;
      this.lastHeard = Date.now();
      this.queue.push(event.data as string | ArrayBuffer);
      if (this.repairFeed) this.repairFeed.notify();
      else this.scheduleDrain(generation);
    };
    socket.onclose = (event: CloseEvent) => {
      if (generation !== this.generation) return;
      // Frames that arrived before the close are still applied first.
      this.scheduleDrain(generation, () => {
        const reason = event.reason ? `${event.code} ${event.reason}` : `${event.code}`;
        this.fail(generation, new Error(this.welcomed ? `the server closed the connection (${reason})` : `connecting to ${this.server.current} failed (${reason})`), "closed");
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
    this.catchUp.reset();
    this.hydration = null;
    this.repairFeed = null;
    this.pusher.reset();
    this.setStatus({ caughtUp: false, hydrating: null, repairing: null });
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
    this.repairFeed?.notify();
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
      this.retry.attempt = 0;
      this.setStatus({ connection: "disconnected", retryInMs: 0 });
      this.reconnectTimer = setTimeout(() => this.connect(), 0);
      return;
    }
    const code = error instanceof RefusedError ? error.code : error instanceof ProtocolError ? "protocol" : kind;
    this.disconnect("error");
    if (this.stopped || this.offline) return;
    const lastError = { code, message: error.message };
    this.host.emit({ type: "error", code, message: error.message });
    const next = this.retry.after(error instanceof RefusedError ? error.code : null, this.welcomed);
    if (next === "failed") {
      this.pusher.rejectAll(error);
      this.setStatus({ connection: "failed", lastError, retryInMs: null });
      return;
    }
    if (next === "rehydrate") {
      console.warn("pgrelay: the server no longer has this replica's history; re-hydrating (unsent local writes are kept)");
      void this.exclusive(() => this.replica.reset()).then(() => {
        this.status.lsn = null;
        this.connect();
      });
      this.setStatus({ connection: "disconnected", lastError, retryInMs: 0 });
      return;
    }
    if (next === "repair") console.warn("pgrelay: the server no longer continues this replica's position; reconnecting to repair it");
    else this.server.next();
    const delay = next === "repair" ? 0 : this.retry.delay(this.config.backoffBaseMs, this.config.backoffCapMs);
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
      while (this.queue.length > 0 && generation === this.generation && !this.repairFeed) {
        await this.exclusive(() => this.process(generation));
      }
    } catch (e) {
      this.fail(generation, e as Error, "replica");
    } finally {
      this.draining = false;
      const after = this.afterDrain;
      this.afterDrain = [];
      if (this.queue.length > 0 && generation === this.generation && !this.repairFeed) this.scheduleDrain(generation);
      for (const f of after) f();
    }
    this.pump();
  }

  /** Handles the queued frames: transactions gathered into one commit. */
  private async process(generation: number): Promise<void> {
    let batch: Transaction[] = [];
    let changes = 0;
    while (this.queue.length > 0 && generation === this.generation && !this.repairFeed) {
      const data = this.queue.shift()!;
      if (typeof data !== "string") {
        if (!this.hydration) throw new ProtocolError("a binary frame outside a snapshot");
        this.hydration.chunks(this.replica, data, this.queue);
        this.setStatus({ hydrating: this.hydration.progress() });
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
    // Not while a snapshot is still arriving.
    if (!this.awaitingSnapshot && this.catchUp.reached(lsn)) this.setStatus({ caughtUp: true });
  }

  private flush(batch: Transaction[]): void {
    if (batch.length === 0) return;
    // Servers before the origin tag sent the client id itself.
    const own = this.origin ?? this.replica.state().clientId;
    const applied = this.replica.applyTransactions(batch, own);
    this.pusher.echoed(applied.echoes.map((e) => e.lsn));
    this.status.lsn = applied.lsn;
    if (applied.tables.length > 0) {
      this.host.emit({ type: "changed", tables: applied.tables, commitTimesUs: batch.map((t) => t.commit_time_us), appliedAtMs: Date.now() });
    }
    this.pusher.settle();
    this.setStatus({});
    if (applied.unknown.length > 0) {
      // Committed, and recorded for a snapshot: the next connection
      // fetches those tables (a server that announced them would have
      // sent their schema first).
      console.warn(`pgrelay: changes for tables this replica does not know (${applied.unknown.join(", ")}); reconnecting to fetch them`);
      this.resync(applied.unknown);
    }
  }

  private async handle(message: ServerMessage): Promise<void> {
    switch (message.type) {
      case "welcome": {
        // A positioned replica of another log keeps its log id until repaired (a repair cut short is then taken up again).
        const stored = this.status.lsn === null ? null : this.replica.state().logId;
        if (message.log_id && (stored ?? message.log_id) === message.log_id) this.replica.setMeta("log_id", message.log_id);
        this.welcomeLog = message.log_id ?? null;
        this.origin = message.origin ?? null;
        this.resyncNewTables(message.tables, this.resyncAsked);
        this.catchUp.welcome(message.head_lsn, message.wal_lsn);
        this.welcomed = true;
        this.retry.attempt = 0;
        this.pusher.want();
        this.setStatus({ connection: "connected", lastError: null });
        return;
      }
      case "schema":
        // Before this connection's snapshot, the tables it asked for are on their way.
        this.resyncNewTables(message.tables, this.awaitingSnapshot ? this.resyncAsked : []);
        return;
      case "snapshot_begin":
        this.hydration = await Hydration.begin(this.replica, message.resume_lsn, message.full, message.tables, message.visibility);
        this.host.emit({ type: "changed", tables: this.hydration.tableNames().map(sqliteName), commitTimesUs: [], appliedAtMs: Date.now() });
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
          this.pusher.want();
          this.host.emit({ type: "hydrated", rows: h.rowsDone, bytes: h.bytesDone, wireBytes: h.wireBytes, elapsedMs: Date.now() - h.started, refetched: h.refetched, full: h.full, tables: h.tableNames() });
          this.host.emit({ type: "changed", tables: h.tableNames().map(sqliteName), commitTimesUs: [], appliedAtMs: Date.now() });
          this.setStatus({ hydrating: null });
        }
        return;
      }
      case "snapshot_queued":
        return;
      case "repair_begin":
        this.repair(message.resume_lsn, message.tables, message.visibility);
        return;
      case "caught_up": {
        const lsn = parseLsn(message.lsn);
        const current = this.status.lsn === null ? 0n : parseLsn(this.status.lsn);
        if (lsn > current && !this.awaitingSnapshot) {
          // Transactions of tables this client does not sync were left out:
          // the position moves on without them, in a transaction of its own.
          const applied = this.replica.applyTransactions([{ lsn: message.lsn, xid: 0, commit_time_us: 0, changes: [] }], null);
          this.status.lsn = applied.lsn;
          this.pusher.settle();
        }
        this.catchUp.caughtUp(lsn, message.wal_lsn);
        return;
      }
      case "error":
        throw new RefusedError(message.code, message.message);
      case "write_result":
        this.pusher.answered(message);
        return;
      case "write_refused": {
        const resync = this.pusher.refused(message.batch_id ?? null, message.code, message.message);
        if (resync.length > 0) this.resync(resync);
        return;
      }
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

  /** Runs the repair the server began; the stream resumes from `resume` once it completes. */
  private repair(resume: string, tables: string[], visibility: Visibility): void {
    const generation = this.generation;
    this.repairFeed = startRepair({ replica: this.replica, host: this.host, queue: this.queue, exclusive: this.exclusive }, {
      live: () => generation === this.generation,
      send: (frame) => this.socket?.readyState === WebSocket.OPEN && this.socket.send(frame),
      progress: (p) => generation === this.generation && this.setStatus({ repairing: p }),
      done: (deferred) => {
        this.repairFeed = null;
        this.status.lsn = resume;
        this.awaitingSnapshot = false;
        this.queue.unshift(...deferred);
        this.setStatus({ repairing: null });
        this.scheduleDrain(generation);
        this.pusher.want();
      },
      failed: (e) => this.fail(generation, e, "replica"),
    }, { resume, tables, visibility, logId: this.welcomeLog });
  }

  /**
   * Applies table schemas; tables that need a snapshot end the connection,
   * and the next one asks for them.
   */
  private resyncNewTables(tables: TableSchema[], coming: string[]): void {
    const needed = applySchema(this.replica, this.host, tables, coming);
    if (needed.length > 0) this.resync(needed);
  }

  /** Ends this connection to fetch `tables` by snapshot, reconnecting at once. */
  private resync(tables: string[]): never {
    this.retry.attempt = 0;
    throw new ResyncNeeded(tables);
  }

  private send(message: unknown): void {
    this.sendText(JSON.stringify(message));
  }

  private sendText(frame: string): void {
    if (this.socket && this.socket.readyState === WebSocket.OPEN) this.socket.send(frame);
  }

  /** Sends the next outbox batch when one is due. */
  private pump(): void {
    if (!this.welcomed || this.hydration || this.repairFeed || this.awaitingSnapshot || !this.pusher.due()) return;
    if (!this.socket || this.socket.readyState !== WebSocket.OPEN) return;
    const generation = this.generation;
    void this.exclusive(() => {
      if (generation !== this.generation) return;
      const taken = this.pusher.take();
      if (taken.resync.length > 0) this.resync(taken.resync);
      for (const frame of taken.frames) this.sendText(frame);
    }).catch((e: unknown) => this.fail(generation, e as Error, "replica"));
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
