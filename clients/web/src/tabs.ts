//! Several tabs of one origin share one replica: the tab holding the Web
//! Lock `pgrelay:<name>` runs the worker (the database and the socket);
//! the others send their calls over a BroadcastChannel and get its events.
//! When the holder closes, the lock passes to another tab, which opens the
//! database (the outbox is in it, so nothing is lost) and announces
//! itself; calls still unanswered are sent again (writes carry their
//! transaction id, so one that was applied is not applied twice).

import type { Call, WorkerMessage } from "./rpc.js";
import type { SyncEvent } from "./session.js";

type Envelope =
  | { kind: "call"; from: string; id: number; call: Call }
  | { kind: "reply"; to: string; id: number; result?: unknown; error?: { name: string; message: string; code: string | null } }
  | { kind: "event"; event: SyncEvent }
  | { kind: "leader"; tab: string }
  | { kind: "who" };

interface Pending {
  call: Call;
  resolve(value: unknown): void;
  reject(error: Error): void;
}

/** Where a tab's calls go: its own worker, or the leader tab. */
export class Link {
  readonly tab = `tab-${Math.random().toString(16).slice(2)}-${Date.now().toString(16)}`;
  private worker: Worker | null = null;
  private channel: BroadcastChannel | null = null;
  private nextId = 1;
  private readonly pending = new Map<number, Pending>();
  private leaderKnown: (() => void) | null = null;
  private releaseLock: (() => void) | null = null;
  private closed = false;
  isLeader = false;

  constructor(
    private readonly name: string,
    private readonly makeWorker: () => Worker,
    private readonly open: (call: (c: Call) => Promise<unknown>) => Promise<void>,
    private readonly onEvent: (e: SyncEvent) => void,
    private readonly token: () => Promise<string | null>,
    private readonly shared: boolean,
  ) {}

  /** Resolves once this tab can make calls (as leader or follower). */
  async start(): Promise<void> {
    if (!this.shared || typeof navigator === "undefined" || !navigator.locks || typeof BroadcastChannel === "undefined") {
      await this.lead();
      return;
    }
    this.channel = new BroadcastChannel(`pgrelay:${this.name}`);
    this.channel.onmessage = (e: MessageEvent) => this.fromChannel(e.data as Envelope);
    const ready = new Promise<void>((resolve) => (this.leaderKnown = resolve));
    let failed: ((e: Error) => void) | null = null;
    const leadFailed = new Promise<never>((_, reject) => (failed = reject));
    void navigator.locks.request(`pgrelay:${this.name}`, async () => {
      if (this.closed) return;
      try {
        await this.lead();
      } catch (e) {
        failed?.(e as Error);
        return;
      }
      this.channel?.postMessage({ kind: "leader", tab: this.tab } satisfies Envelope);
      this.leaderKnown?.();
      await new Promise<void>((resolve) => (this.releaseLock = resolve));
    });
    this.channel.postMessage({ kind: "who" } satisfies Envelope);
    await Promise.race([ready, leadFailed]);
  }

  private async lead(): Promise<void> {
    const worker = this.makeWorker();
    this.worker = worker;
    worker.onmessage = (e: MessageEvent) => this.fromWorker(e.data as WorkerMessage);
    worker.onerror = (e: ErrorEvent) => {
      for (const [, p] of this.pending) p.reject(new Error(`the pgrelay worker failed: ${e.message}`));
      this.pending.clear();
    };
    this.isLeader = true;
    await this.open((call) => this.toWorker(call));
    // Calls this tab made while following go to its own worker now.
    for (const [id, p] of this.pending) {
      if (p.call.method !== "open") {
        this.pending.delete(id);
        this.toWorker(p.call).then(p.resolve, p.reject);
      }
    }
  }

  call(call: Call): Promise<unknown> {
    if (this.closed) return Promise.reject(new Error("this pgrelay connection is closed"));
    if (this.worker) return this.toWorker(call);
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      this.pending.set(id, { call, resolve, reject });
      this.channel?.postMessage({ kind: "call", from: this.tab, id, call } satisfies Envelope);
    });
  }

  private toWorker(call: Call): Promise<unknown> {
    const worker = this.worker;
    if (!worker) return Promise.reject(new Error("no worker"));
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      this.pending.set(id, { call, resolve, reject });
      worker.postMessage({ kind: "call", id, ...call });
    });
  }

  private fromWorker(m: WorkerMessage): void {
    if (m.kind === "reply") {
      const p = this.pending.get(m.id);
      this.pending.delete(m.id);
      if (!p) return;
      if (m.error) p.reject(rebuild(m.error));
      else p.resolve(m.result);
    } else if (m.kind === "event") {
      this.onEvent(m.event);
      this.channel?.postMessage({ kind: "event", event: m.event } satisfies Envelope);
    } else if (m.kind === "token") {
      this.token().then(
        (token) => this.worker?.postMessage({ kind: "token", id: m.id, token }),
        (e: unknown) => this.worker?.postMessage({ kind: "token", id: m.id, error: (e as Error)?.message ?? String(e) }),
      );
    }
  }

  private fromChannel(m: Envelope): void {
    switch (m.kind) {
      case "call":
        if (!this.worker) return;
        this.toWorker(m.call).then(
          (result) => this.channel?.postMessage({ kind: "reply", to: m.from, id: m.id, result } satisfies Envelope),
          (e: unknown) => {
            const err = e as Error & { code?: string };
            this.channel?.postMessage({ kind: "reply", to: m.from, id: m.id, error: { name: err.name, message: err.message, code: err.code ?? null } } satisfies Envelope);
          },
        );
        return;
      case "reply": {
        if (m.to !== this.tab) return;
        const p = this.pending.get(m.id);
        this.pending.delete(m.id);
        if (!p) return;
        if (m.error) p.reject(rebuild(m.error));
        else p.resolve(m.result);
        return;
      }
      case "event":
        if (!this.worker) this.onEvent(m.event);
        return;
      case "who":
        if (this.worker) this.channel?.postMessage({ kind: "leader", tab: this.tab } satisfies Envelope);
        return;
      case "leader":
        if (this.worker) return;
        this.leaderKnown?.();
        // A new leader: what the old one left unanswered goes to it.
        for (const [id, p] of this.pending) this.channel?.postMessage({ kind: "call", from: this.tab, id, call: p.call } satisfies Envelope);
        return;
    }
  }

  close(): void {
    this.closed = true;
    this.worker?.terminate();
    this.worker = null;
    this.releaseLock?.();
    this.channel?.close();
    for (const [, p] of this.pending) p.reject(new Error("this pgrelay connection is closed"));
    this.pending.clear();
  }
}

function rebuild(e: { name: string; message: string; code: string | null }): Error {
  const error = new Error(e.message) as Error & { code?: string };
  error.name = e.name;
  if (e.code) error.code = e.code;
  return error;
}
