//! Receiving a snapshot: chunks are decompressed (zstd, into no more than
//! the size each announces: see inflate.ts), checked (XXH3-128 over the
//! uncompressed COPY bytes) and loaded one by one. After each
//! table the row count and checksum are compared with the server's; a
//! table that does not match is emptied and asked for again, never kept.

import { createXXHash128, type IHasher } from "hash-wasm";
import { inflateChunk, prepareInflate } from "./inflate.js";
import type { Visibility } from "./protocol.js";
import { parseChunk, ProtocolError } from "./protocol.js";
import type { Replica } from "./replica/index.js";

/** Compressed snapshot bytes loaded in one SQLite transaction at most. */
const SNAPSHOT_BATCH_BYTES = 16 << 20;

export interface HydrationProgress {
  tables: number;
  tablesDone: number;
  rows: number;
  bytes: number;
  estimatedRows: number;
}

interface TableState {
  name: string;
  estimatedRows: number;
  hasher: IHasher;
  bytes: number;
  rows: number;
  nextSeq: number;
  damaged: string | null;
}

export class Hydration {
  private refetch: string[] = [];
  readonly refetched: string[] = [];
  rowsDone = 0;
  bytesDone = 0;
  /** Compressed chunk bytes received (what crossed the network). */
  wireBytes = 0;
  private tablesDone = 0;
  readonly started = Date.now();

  private constructor(
    readonly resume: string,
    readonly full: boolean,
    readonly visibility: Visibility,
    private readonly tables: TableState[],
  ) {}

  static async begin(
    replica: Replica,
    resume: string,
    full: boolean,
    tables: { table: string; estimated_rows: number }[],
    visibility: Visibility,
  ): Promise<Hydration> {
    await prepareInflate();
    const states: TableState[] = [];
    for (const t of tables) {
      const hasher = await createXXHash128();
      hasher.init();
      states.push({ name: t.table, estimatedRows: t.estimated_rows, hasher, bytes: 0, rows: 0, nextSeq: 0, damaged: null });
    }
    replica.beginSnapshot(
      tables.map((t) => t.table),
      full,
    );
    return new Hydration(resume, full, visibility, states);
  }

  /**
   * Loads a chunk and the chunks queued right behind it in one SQLite
   * transaction: a commit on OPFS costs tens of milliseconds, and an
   * interrupted snapshot starts over anyway, so committing each chunk
   * buys nothing.
   */
  chunks(replica: Replica, first: ArrayBuffer, queue: (string | ArrayBuffer)[]): void {
    replica.snapshotBatch(() => {
      this.chunk(replica, new Uint8Array(first));
      let bytes = first.byteLength;
      while (bytes < SNAPSHOT_BATCH_BYTES && typeof queue[0] === "object") {
        const next = queue.shift() as ArrayBuffer;
        bytes += next.byteLength;
        this.chunk(replica, new Uint8Array(next));
      }
    });
  }

  chunk(replica: Replica, frame: Uint8Array): void {
    this.wireBytes += frame.length;
    const chunk = parseChunk(frame);
    if (!chunk) throw new ProtocolError("a binary frame that is not a snapshot chunk");
    const table = this.tables[chunk.table];
    if (!table) throw new ProtocolError(`snapshot chunk for table #${chunk.table}, which the snapshot did not list`);
    if (table.damaged !== null) return;
    if (chunk.seq !== table.nextSeq) {
      table.damaged = `chunk ${chunk.seq} arrived where ${table.nextSeq} was due`;
      return;
    }
    table.nextSeq++;
    let raw: Uint8Array;
    try {
      raw = inflateChunk(chunk.payload);
    } catch (e) {
      // A chunk that lies about its size is not loaded: the table is
      // emptied and fetched again, and the server gives up after a few.
      table.damaged = `chunk ${chunk.seq} ${(e as Error).message}`;
      return;
    }
    table.hasher.update(raw);
    table.bytes += raw.length;
    this.bytesDone += raw.length;
    try {
      const rows = replica.loadSnapshot(table.name, raw);
      table.rows += rows;
      this.rowsDone += rows;
    } catch (e) {
      table.damaged = (e as Error).message;
    }
  }

  /** The server's digest of a table: checks it against what arrived. */
  tableDone(replica: Replica, digest: { table: string; rows: number; bytes: number; checksum: string }): void {
    const table = this.tables.find((t) => t.name === digest.table);
    if (!table) throw new ProtocolError(`digest for ${digest.table}, which the snapshot did not list`);
    const checksum = table.hasher.digest("hex");
    let problem = table.damaged;
    if (problem === null && (checksum !== digest.checksum || table.bytes !== digest.bytes)) {
      problem = `checksum ${checksum} over ${table.bytes} bytes, the server sent ${digest.checksum} over ${digest.bytes} bytes`;
    }
    if (problem === null && table.rows !== digest.rows) problem = `${table.rows} rows arrived, the server sent ${digest.rows}`;
    if (problem !== null) this.rowsDone -= table.rows;
    table.hasher.init();
    table.bytes = 0;
    table.rows = 0;
    table.nextSeq = 0;
    table.damaged = null;
    if (problem !== null) {
      console.warn(`pgrelay: snapshot of ${table.name} damaged (${problem}); fetching it again`);
      replica.clearTable(table.name);
      this.refetched.push(table.name);
      this.refetch.push(table.name);
    } else {
      this.tablesDone++;
    }
  }

  /** `snapshot_end`: the tables to fetch again (empty: complete and committed). */
  end(replica: Replica): string[] {
    const refetch = this.refetch;
    this.refetch = [];
    if (refetch.length > 0) return refetch;
    replica.finishSnapshot(
      this.resume,
      this.full,
      this.tables.map((t) => t.name),
      this.visibility,
    );
    return [];
  }

  tableNames(): string[] {
    return this.tables.map((t) => t.name);
  }

  progress(): HydrationProgress {
    return {
      tables: this.tables.length,
      tablesDone: this.tablesDone,
      rows: this.rowsDone,
      bytes: this.bytesDone,
      estimatedRows: this.tables.reduce((n, t) => n + t.estimatedRows, 0),
    };
  }
}
