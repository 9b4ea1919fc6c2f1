//! When a connection is caught up: the replica holds the change log's head
//! the server named, and everything PostgreSQL had committed when the
//! connection began (the welcome's `wal_lsn`, reached per `caught_up`).

import { parseLsn } from "./protocol.js";

export class CatchUp {
  private target: bigint | null = null;
  /**
   * PostgreSQL's WAL position at the welcome, and how far the server says
   * its capture has sent us (`caught_up.wal_lsn`).
   */
  private walTarget: bigint | null = null;
  private walSent: bigint | null = null;

  /** A new connection: nothing to reach yet. */
  reset(): void {
    this.target = null;
    this.walTarget = null;
    this.walSent = null;
  }

  /** The welcome names the change log's head and PostgreSQL's WAL position. */
  welcome(headLsn: string, walLsn: string | null | undefined): void {
    this.target = parseLsn(headLsn);
    this.walTarget = walLsn ? parseLsn(walLsn) : null;
  }

  /** A `caught_up` frame: the server sent everything up to `lsn`, its capture up to `walLsn`. */
  caughtUp(lsn: bigint, walLsn: string | null | undefined): void {
    this.target = lsn;
    if (walLsn) {
      const wal = parseLsn(walLsn);
      if (this.walSent === null || wal > this.walSent) this.walSent = wal;
    }
  }

  /**
   * Whether the replica at `position` is newly caught up (true once per
   * target). A server that names no WAL position (an older one) means its
   * change log's head at the welcome.
   */
  reached(position: bigint): boolean {
    const walReached = this.walTarget === null || (this.walSent !== null && this.walSent >= this.walTarget);
    if (this.target === null || position < this.target || !walReached) return false;
    this.target = null;
    return true;
  }
}
