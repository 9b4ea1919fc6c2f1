//! The outbox pushed to the server: one batch in flight, in capture order,
//! a backoff after `retry`, one transaction at a time after a refusal (so a
//! bad one is found and set aside), and the waiters of read-your-writes.
//! Mirrors the Rust client's `session/push.rs`.

import { backoff } from "./backoff.js";
import type { WriteResults } from "./protocol.js";
import { MAX_WRITE_TRANSACTIONS, parseLsn, sqliteName } from "./protocol.js";
import type { Outcome, Replica } from "./replica/index.js";
import type { SyncConfig, SyncHost } from "./sync-host.js";

/** A local write someone waits on until the replica holds the server's version. */
interface Waiter {
  resolve(): void;
  reject(error: Error): void;
  /** Set once the server applied it: the WAL bounds of its commit. */
  bounds?: { floor: bigint | null; ceiling: bigint | null };
}

/** What the pusher reads from and tells the connection around it. */
export interface PushHooks {
  /** The replica's position (`status.lsn`). */
  position(): string | null;
  /** The outbox's counts changed. */
  outboxChanged(): void;
}

/** A batch to send; `resync` non-empty means the connection must end first to fetch those tables again. */
export interface Taken {
  frames: string[];
  resync: string[];
}

export class Pusher {
  /** The batch awaiting its answer. */
  private inFlight: { batchId: string | null; txIds: string[] } | null = null;
  private wanted = false;
  private notBefore = 0;
  private attempt = 0;
  private oneAtATime = false;
  /** Own transactions applied on this connection (LSNs), for read-your-writes. */
  private echoes: bigint[] = [];
  private readonly waiters = new Map<string, Waiter>();

  constructor(
    private readonly replica: Replica,
    private readonly config: SyncConfig,
    private readonly host: SyncHost,
    private readonly hooks: PushHooks,
  ) {}

  /** A new connection: nothing in flight, and the outbox worth a look. */
  reset(): void {
    this.inFlight = null;
    this.wanted = true;
    this.oneAtATime = false;
    this.echoes = [];
  }

  /** Something may be waiting in the outbox: look at the next chance. */
  want(): void {
    this.wanted = true;
  }

  /** Whether a batch may go now (nothing in flight, wanted, backoff over). */
  due(): boolean {
    return this.inFlight === null && this.wanted && Date.now() >= this.notBefore;
  }

  /** Takes the next batch from the outbox and marks it in flight; nothing when one already is. */
  take(): Taken {
    if (this.inFlight !== null) return { frames: [], resync: [] };
    this.wanted = false;
    const taken = this.replica.takeBatch(this.oneAtATime ? 1 : MAX_WRITE_TRANSACTIONS);
    if (taken.setAside.length > 0) {
      this.report(taken.setAside);
      // What followed it may be sent now.
      this.wanted = true;
    }
    // The next connection fetches the set-aside write's tables again.
    if (taken.resync.length > 0) return { frames: [], resync: taken.resync };
    if (taken.frames.length === 0) return { frames: [], resync: [] };
    this.inFlight = { batchId: taken.batchId, txIds: taken.txIds };
    // A large transaction goes as several `write_part` frames in a row;
    // the server answers once, after the last.
    return { frames: taken.frames, resync: [] };
  }

  /** Resolves once the server applied the transaction and the replica holds it. */
  waitFor(txId: string): Promise<void> {
    return new Promise((resolve, reject) => {
      this.waiters.set(txId, { resolve, reject });
    });
  }

  /** Reconnecting cannot help: every waiter fails with `error`. */
  rejectAll(error: Error): void {
    for (const [, w] of this.waiters) w.reject(error);
    this.waiters.clear();
  }

  /** Own transactions the replica just applied (their LSNs). */
  echoed(lsns: string[]): void {
    for (const lsn of lsns) this.echoes.push(parseLsn(lsn));
    if (this.echoes.length > 1000) this.echoes.splice(0, this.echoes.length - 1000);
  }

  answered(results: WriteResults): void {
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
      this.notBefore = Date.now() + backoff(this.attempt, this.config.backoffBaseMs, this.config.backoffCapMs);
      this.attempt++;
    } else {
      this.attempt = 0;
    }
    this.wanted = true;
    this.settle();
    this.hooks.outboxChanged();
  }

  /** The server refused the batch in flight; returns the tables to fetch again (the connection must end). */
  refused(batchId: string | null, code: string, message: string): string[] {
    const sent = this.inFlight;
    if (sent === null) return [];
    if (batchId !== null && sent.batchId !== batchId) return [];
    this.inFlight = null;
    this.wanted = true;
    if (this.oneAtATime && sent.txIds.length === 1) {
      // A single transaction the server will never take: set it aside so
      // it does not block every write after it, and fetch the server's
      // rows again for the tables it wrote.
      this.oneAtATime = false;
      const [outcome, resync] = this.replica.setAside(sent.txIds[0]!, `${code}: ${message}`);
      this.report([outcome]);
      this.hooks.outboxChanged();
      return resync;
    }
    this.oneAtATime = true;
    this.hooks.outboxChanged();
    return [];
  }

  /** Resolves waiters whose write the replica now holds. */
  settle(): void {
    if (this.waiters.size === 0) return;
    const lsn = this.hooks.position();
    const position = lsn === null ? 0n : parseLsn(lsn);
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
      this.host.emit({ type: "changed", tables: this.replica.schema().map((t) => sqliteName(t.name)), commitTimesUs: [], appliedAtMs: Date.now() });
    }
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
