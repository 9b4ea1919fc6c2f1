//! Client writes as frames, measured on their encoded UTF-8 bytes: whole
//! transactions packed into one `write` frame up to the frame limit, and a
//! transaction too large for one frame split into `write_part` frames that
//! the server puts back together. Mirrors `pgrelay-protocol`'s `frames.rs`:
//! every change is encoded once and frames are spliced from those
//! encodings, so a size computed before sending is the size sent.

import type { ClientTransaction } from "./protocol.js";
import { MAX_CLIENT_FRAME_BYTES, MAX_WRITE_CHANGES, MAX_WRITE_TRANSACTIONS } from "./protocol.js";

/** The most bytes one client transaction may take on the wire (the sum of its frames). */
export const MAX_TRANSACTION_BYTES = 8 << 20;

/** A client transaction the protocol cannot carry; `execute` refuses it and rolls it back. */
export class TooLargeError extends Error {
  override name = "TooLargeError";
  readonly code = "too_large";
}

/** Bytes of `text` in UTF-8 (JSON from `JSON.stringify` has no lone surrogates). */
export function utf8Length(text: string): number {
  let n = text.length;
  for (let i = 0; i < text.length; i++) {
    const c = text.charCodeAt(i);
    if (c < 0x80) continue;
    if (c < 0x800) n += 1;
    else if (c >= 0xd800 && c <= 0xdbff) {
      // A surrogate pair: two UTF-16 units (counted already), four bytes.
      n += 2;
      i++;
    } else n += 2;
  }
  return n;
}

const CLOSE = "]}";

/** A client transaction with each change encoded once. */
export class EncodedTransaction {
  readonly changes: string[];
  readonly sizes: number[];
  private readonly head: string;
  private readonly tables: string[];

  constructor(tx: ClientTransaction) {
    this.changes = tx.changes.map((c) => JSON.stringify(c));
    this.sizes = this.changes.map(utf8Length);
    this.head = `{"id":${JSON.stringify(tx.id)},"changes":[`;
    this.tables = tx.changes.map((c) => c.table);
    this.id = tx.id;
  }

  readonly id: string;

  /** Bytes of the transaction's JSON inside a batch. */
  get length(): number {
    return utf8Length(this.head) + listLength(this.sizes) + CLOSE.length;
  }

  tableOf(index: number): string {
    return this.tables[index] ?? "";
  }

  json(): string {
    return this.head + this.changes.join(",") + CLOSE;
  }
}

function listLength(sizes: number[]): number {
  let n = Math.max(0, sizes.length - 1);
  for (const s of sizes) n += s;
  return n;
}

/** A `write` frame being packed with whole transactions. */
export class BatchFrame {
  private readonly head: string;
  readonly transactions: EncodedTransaction[] = [];
  length: number;
  changes = 0;

  constructor(batchId: string) {
    this.head = `{"type":"write","batch_id":${JSON.stringify(batchId)},"transactions":[`;
    this.length = utf8Length(this.head) + CLOSE.length;
  }

  lengthWith(tx: EncodedTransaction): number {
    return this.length + (this.transactions.length > 0 ? 1 : 0) + tx.length;
  }

  /** Whether `tx` fits in this frame within the protocol's limits. */
  fits(tx: EncodedTransaction): boolean {
    return this.lengthWith(tx) <= MAX_CLIENT_FRAME_BYTES && this.changes + tx.changes.length <= MAX_WRITE_CHANGES && this.transactions.length < MAX_WRITE_TRANSACTIONS;
  }

  push(tx: EncodedTransaction): void {
    this.length = this.lengthWith(tx);
    this.changes += tx.changes.length;
    this.transactions.push(tx);
  }

  frame(): string {
    return this.head + this.transactions.map((t) => t.json()).join(",") + CLOSE;
  }
}

/** How a transaction goes out when sent alone. */
export interface Layout {
  /** Changes per frame: one entry for a `write`, several for `write_part` frames. */
  parts: number[];
  /** Bytes of each frame. */
  sizes: number[];
}

function partHead(batchId: string, txId: string, part: number, last: boolean): string {
  return `{"type":"write_part","batch_id":${JSON.stringify(batchId)},"transaction_id":${JSON.stringify(txId)},"part":${part},"last":${last},"changes":[`;
}

/**
 * Lays out `tx` sent alone under `batchId`: one `write` frame when it
 * fits, else `write_part` frames each filled up to the frame limit.
 * Throws TooLargeError for what no frames can carry.
 */
export function layout(batchId: string, tx: EncodedTransaction): Layout {
  const count = tx.changes.length;
  if (count > MAX_WRITE_CHANGES) {
    throw new TooLargeError(`the transaction has ${count} changes; one transaction may have at most ${MAX_WRITE_CHANGES}`);
  }
  const alone = new BatchFrame(batchId).lengthWith(tx);
  if (alone <= MAX_CLIENT_FRAME_BYTES) return { parts: [count], sizes: [alone] };
  const parts: number[] = [];
  const sizes: number[] = [];
  let next = 0;
  while (next < count) {
    // Measured with `"last":false`, the longer; the final part is one byte shorter.
    let len = utf8Length(partHead(batchId, tx.id, parts.length, false)) + CLOSE.length;
    let taken = 0;
    for (let i = next; i < count; i++) {
      const added = tx.sizes[i]! + (taken > 0 ? 1 : 0);
      if (len + added > MAX_CLIENT_FRAME_BYTES) break;
      len += added;
      taken++;
    }
    if (taken === 0) {
      throw new TooLargeError(
        `change ${next} of the transaction (a ${tx.tableOf(next)} row) takes ${tx.sizes[next]} bytes encoded; one change must fit in a frame of ${MAX_CLIENT_FRAME_BYTES} bytes`,
      );
    }
    next += taken;
    parts.push(taken);
    sizes.push(next === count ? len - 1 : len);
  }
  const bytes = sizes.reduce((a, b) => a + b, 0);
  if (bytes > MAX_TRANSACTION_BYTES) {
    throw new TooLargeError(`the transaction takes ${bytes} bytes on the wire; one transaction may take at most ${MAX_TRANSACTION_BYTES}`);
  }
  return { parts, sizes };
}

/** The frames that carry `tx` alone, as `layout` says. */
export function encodeAlone(batchId: string, tx: EncodedTransaction): string[] {
  const plan = layout(batchId, tx);
  if (plan.parts.length === 1) {
    const frame = new BatchFrame(batchId);
    frame.push(tx);
    return [frame.frame()];
  }
  const frames: string[] = [];
  let next = 0;
  plan.parts.forEach((take, n) => {
    const last = n + 1 === plan.parts.length;
    frames.push(partHead(batchId, tx.id, n, last) + tx.changes.slice(next, next + take).join(",") + CLOSE);
    next += take;
  });
  return frames;
}
