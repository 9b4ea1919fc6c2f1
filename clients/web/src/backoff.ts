//! What follows a connection that ended with an error (the policy of the
//! Rust client's `SyncClient::run`): give up, repair, hydrate again, or
//! retry after a delay: exponential backoff with full jitter, capped (a
//! uniformly random delay between zero and the exponential bound).

/** Codes after which reconnecting cannot help. */
const FATAL = new Set(["unauthorized", "unknown_table", "unsupported_version", "upgrade_required", "malformed_frame", "unknown_message", "handshake_required", "frame_too_large", "replaced"]);

export function backoff(attempt: number, baseMs: number, capMs: number, random: () => number = Math.random): number {
  const bound = Math.min(capMs, baseMs * 2 ** Math.min(attempt, 16));
  return Math.floor(random() * bound);
}

/**
 * `failed`: reconnecting cannot help; `repair`: reconnect at once keeping
 * the position (the server repairs the replica); `rehydrate`: forget the
 * position and download the replica again (unsent local writes stay);
 * `backoff`: reconnect after `delay()`.
 */
export type Next = "failed" | "repair" | "rehydrate" | "backoff";

export class Retry {
  attempt = 0;
  /**
   * Set when the server said `gone` mid-session (a lost slot, or retention
   * passing the position): the next connection keeps the position, so the
   * server repairs the replica. Told `gone` again, the replica resets.
   */
  private repairTried = false;

  /** After an error (`refused`: the server's code, if it refused) that ended a connection, welcomed or not. */
  after(refused: string | null, welcomed: boolean): Next {
    if (refused !== null && FATAL.has(refused)) return "failed";
    const gone = refused === "gone";
    if (gone && welcomed && !this.repairTried) {
      this.repairTried = true;
      return "repair";
    }
    if (welcomed && !gone) this.repairTried = false;
    if (gone && (welcomed || this.attempt === 0)) {
      this.attempt = 1;
      return "rehydrate";
    }
    if (welcomed) this.attempt = 0;
    return "backoff";
  }

  /** The delay before the next attempt. */
  delay(baseMs: number, capMs: number): number {
    return backoff(this.attempt++, baseMs, capMs);
  }
}
