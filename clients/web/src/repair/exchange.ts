//! Repairing the replica over the sync socket, where the server would
//! otherwise answer `gone` (the Rust client's `repair.rs`): table by
//! table, the replica digests key ranges and the server says which
//! differ; differing ranges are cut finer until they are small, then
//! replaced by the server's rows. Unsent local writes stay in the outbox
//! and are put back on top at the end.

import { createXXHash128 } from "hash-wasm";
import { prepareInflate } from "../inflate.js";
import type { Visibility } from "../protocol.js";
import { decodeFrame, MAX_CLIENT_FRAME_BYTES, ProtocolError, RefusedError } from "../protocol.js";
import type { Replica } from "../replica/index.js";
import type { KeyRange } from "../replica/repair.js";
import { MAX_CHECK_PARTS, partRange, RowHasher, type CheckSpan, type Key, type RangeSum } from "./digest.js";
import { checkJson, decodeRepair, doneJson, encodeRepair, spanJson, type ServerRepair } from "./wire.js";

/**
 * Recorded as the replica's change log while a repair runs: it follows no
 * log until the repair completes, so an interrupted repair is taken up
 * again on the next connection.
 */
const UNDER_REPAIR = "(repair under way)";
/** JSON of one `check` message, at most, where spans allow (the server takes frames of 4 MiB). */
const CHECK_BYTES = MAX_CLIENT_FRAME_BYTES;
/** A first round's one span, at most: past it the span is cut into fewer, larger parts. */
const FIRST_SPAN_BYTES = 3 * MAX_CLIENT_FRAME_BYTES;

/** What `repair_begin` and the welcome before it said. */
export interface RepairBegin {
  resume: string;
  tables: string[];
  visibility: Visibility;
  /** The change log the replica follows once repaired. */
  logId: string | null;
}

export interface RepairProgress {
  tables: number;
  tablesDone: number;
  rounds: number;
  rowsRemoved: number;
  rowsReceived: number;
  /** Repair frames both ways, and those received. */
  bytes: number;
  bytesReceived: number;
}

export interface Repaired extends RepairProgress {
  elapsedMs: number;
  /** Tables whose full digest still differed: fetched again by snapshot. */
  refetch: string[];
}

/** How the exchange reaches the socket and the replica. */
export interface RepairLink {
  send(frame: Uint8Array): void;
  /** The server's next repair message and its size on the wire. */
  next(): Promise<{ message: ServerRepair; bytes: number }>;
  /** Runs replica work exclusively. */
  run<T>(work: () => T): Promise<T>;
  progress(p: RepairProgress): void;
}

/** Runs a repair the server began with `repair_begin`; returns once the replica's position is the snapshot's. */
export async function repair(replica: Replica, link: RepairLink, begin: RepairBegin): Promise<Repaired> {
  const started = Date.now();
  await prepareInflate();
  const hasher = new RowHasher(await createXXHash128());
  await link.run(() => replica.setMeta("log_id", UNDER_REPAIR));
  const moved: RepairProgress = { tables: begin.tables.length, tablesDone: 0, rounds: 0, rowsRemoved: 0, rowsReceived: 0, bytes: 0, bytesReceived: 0 };
  const refetch: string[] = [];
  for (const table of begin.tables) {
    if (!(await repairTable(replica, link, hasher, table, moved))) refetch.push(table);
    moved.tablesDone++;
    link.progress({ ...moved });
  }
  send(link, doneJson(refetch), moved);
  await link.run(() => {
    replica.repairFinish(begin.resume, begin.tables, begin.visibility, refetch);
    if (begin.logId !== null) replica.setMeta("log_id", begin.logId);
  });
  if (refetch.length > 0) console.warn(`pgrelay: tables still differ after repair (${refetch.join(", ")}); fetching them again`);
  return { ...moved, elapsedMs: Date.now() - started, refetch };
}

function send(link: RepairLink, json: string, moved: RepairProgress): void {
  const frame = encodeRepair(json);
  moved.bytes += frame.length;
  link.send(frame);
}

async function receive(link: RepairLink, moved: RepairProgress): Promise<ServerRepair> {
  const { message, bytes } = await link.next();
  moved.bytes += bytes;
  moved.bytesReceived += bytes;
  return message;
}

/** Repairs one table; returns whether it ends equal to the server's (its full digest matches). */
async function repairTable(replica: Replica, link: RepairLink, hasher: RowHasher, table: string, moved: RepairProgress): Promise<boolean> {
  const whole: KeyRange[] = [{ lo: null, hi: null, count: null }];
  let first = await link.run(() => replica.repairDigest(table, whole, hasher));
  // Not held here: it arrives with a snapshot of its own.
  if (first === null) return true;
  // One span over the whole key space (so the server sends the table's
  // full digest); fewer, larger parts where its bounds would not fit a frame.
  while (first.spans[0] && spanJson(first.spans[0]).length > FIRST_SPAN_BYTES && first.spans[0].rows.length > 1) {
    const parts = Math.ceil(first.spans[0].rows.length / 2);
    first = (await link.run(() => replica.repairDigest(table, whole, hasher, parts)))!;
  }
  let spans = first.spans;
  const held: RangeSum = first.sum;
  let expected: [number, string] | null = null;
  while (spans.length > 0) {
    moved.rounds++;
    link.progress({ ...moved });
    const next: KeyRange[] = [];
    for (const batch of batches(spans)) {
      send(link, checkJson(table, batch.map((b) => b.json)), moved);
      const diff = await receive(link, moved);
      if (diff.type !== "diff" || diff.table !== table) throw new ProtocolError(`unexpected repair message ${diff.type}`);
      if (diff.total) expected = diff.total;
      const replace: { lo: Key | null; hi: Key | null }[] = [];
      for (const part of diff.parts) {
        const span = batch[part.span]?.span;
        if (!span) throw new ProtocolError("repair diff names a span not checked");
        const rows = span.rows[part.part];
        if (rows === undefined) throw new ProtocolError("repair diff names a part not checked");
        const range = partRange(span, part.part);
        if (part.replace) replace.push(range);
        else next.push({ ...range, count: rows });
      }
      if (replace.length > 0) {
        const removed = await link.run(() => replica.repairRemove(table, replace, hasher));
        moved.rowsRemoved += removed.rows;
        held.subtract(removed);
      }
      for (;;) {
        const message = await receive(link, moved);
        if (message.table !== table) throw new ProtocolError(`repair rows of ${message.table} while repairing ${table}`);
        if (message.type === "rows_end") break;
        if (message.type !== "rows") throw new ProtocolError(`unexpected repair message ${message.type}`);
        const copy = new TextEncoder().encode(message.copy);
        const added = await link.run(() => replica.repairLoad(table, copy, hasher));
        moved.rowsReceived += added.rows;
        held.merge(added);
      }
      link.progress({ ...moved });
    }
    spans = next.length === 0 ? [] : ((await link.run(() => replica.repairDigest(table, next, hasher)))?.spans ?? []);
  }
  return expected !== null && expected[0] === held.rows && expected[1] === held.hex();
}

/** Spans grouped into messages of about `MAX_CHECK_PARTS` parts and `CHECK_BYTES` of JSON. */
function batches(spans: CheckSpan[]): { span: CheckSpan; json: string }[][] {
  const out: { span: CheckSpan; json: string }[][] = [];
  let parts = 0;
  let bytes = 0;
  for (const span of spans) {
    const json = spanJson(span);
    const last = out[out.length - 1];
    if (!last || parts + span.rows.length > MAX_CHECK_PARTS || bytes + json.length > CHECK_BYTES) {
      out.push([{ span, json }]);
      parts = span.rows.length;
      bytes = json.length;
    } else {
      last.push({ span, json });
      parts += span.rows.length;
      bytes += json.length;
    }
  }
  return out;
}

/**
 * The server's frames while a repair holds the connection: repair frames
 * are handed to the exchange; an `error` ends it; other text frames
 * (answers to writes pushed before the repair began, pongs) are kept, in
 * order, for after it (`deferred`).
 */
export class RepairFeed {
  readonly deferred: string[] = [];
  private wake: (() => void) | null = null;
  private textBytes = 0;

  constructor(
    private readonly queue: (string | ArrayBuffer)[],
    /** False once the connection has ended. */
    private readonly live: () => boolean,
  ) {}

  /** A frame arrived, or the connection ended. */
  notify(): void {
    const wake = this.wake;
    this.wake = null;
    wake?.();
  }

  async next(): Promise<{ message: ServerRepair; bytes: number }> {
    for (;;) {
      if (!this.live()) throw new ProtocolError("the connection ended mid-repair");
      const data = this.queue.shift();
      if (data === undefined) {
        await new Promise<void>((resolve) => (this.wake = resolve));
        continue;
      }
      if (typeof data !== "string") {
        const bytes = data.byteLength + this.textBytes;
        this.textBytes = 0;
        return { message: decodeRepair(new Uint8Array(data)), bytes };
      }
      this.textBytes += data.length;
      const message = decodeFrame(data);
      if (message.type === "error") throw new RefusedError(message.code, message.message);
      this.deferred.push(data);
    }
  }
}
