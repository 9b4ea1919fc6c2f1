//! Client migrations as a connection runs them, like the Rust client: the
//! ones the server sent, in order, each reported back (`migration_result`).
//! A failed one stays at the head of the queue and is tried again after a
//! growing backoff; the ones after it wait, since they may build on it.

import type { ClientMigration } from "./protocol.js";
import type { Replica } from "./replica/index.js";

const FIRST_BACKOFF_MS = 500;
const MAX_BACKOFF_MS = 60_000;

export type MigrationEvent =
  | { type: "migration_applied"; version: number; direction: "up" | "down" }
  | { type: "migration_failed"; version: number; error: string; attempt: number; retryInMs: number };

export class MigrationQueue {
  private queue: ClientMigration[] = [];
  private attempts = 0;
  private timer: ReturnType<typeof setTimeout> | null = null;
  private running = false;

  constructor(
    private readonly replica: Replica,
    private readonly exclusive: <T>(work: () => T | Promise<T>) => Promise<T>,
    private readonly send: (message: unknown) => void,
    private readonly emit: (event: MigrationEvent) => void,
  ) {}

  /** Queues what the server sent and runs it (unless a retry is waiting). */
  receive(migrations: ClientMigration[]): void {
    for (const m of migrations) {
      if (!this.queue.some((q) => q.version === m.version && q.direction === m.direction)) this.queue.push(m);
    }
    if (this.timer === null) void this.run();
  }

  /** The connection ended: the next one is sent what is still owed. */
  stop(): void {
    if (this.timer !== null) clearTimeout(this.timer);
    this.timer = null;
    this.queue = [];
    this.attempts = 0;
  }

  private async run(): Promise<void> {
    if (this.running) return;
    this.running = true;
    this.timer = null;
    try {
      while (this.queue.length > 0) {
        const m = this.queue[0]!;
        const error = await this.exclusive(() => this.replica.runMigration(m));
        this.send({ type: "migration_result", version: m.version, direction: m.direction, ...(error === null ? {} : { error }) });
        if (error === null) {
          this.queue.shift();
          this.attempts = 0;
          this.emit({ type: "migration_applied", version: m.version, direction: m.direction });
          continue;
        }
        this.attempts++;
        const wait = Math.min(MAX_BACKOFF_MS, FIRST_BACKOFF_MS * 2 ** Math.min(this.attempts - 1, 16));
        this.emit({ type: "migration_failed", version: m.version, error, attempt: this.attempts, retryInMs: wait });
        this.timer = setTimeout(() => void this.run(), wait);
        return;
      }
    } finally {
      this.running = false;
    }
  }
}
