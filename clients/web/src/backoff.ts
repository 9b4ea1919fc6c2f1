//! Reconnect delays: exponential backoff with full jitter, capped
//! (a uniformly random delay between zero and the exponential bound).

export function backoff(attempt: number, baseMs: number, capMs: number, random: () => number = Math.random): number {
  const bound = Math.min(capMs, baseMs * 2 ** Math.min(attempt, 16));
  return Math.floor(random() * bound);
}
