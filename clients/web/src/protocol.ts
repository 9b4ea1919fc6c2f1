//! The wire protocol (docs/protocol.md) as TypeScript types, with the few
//! pieces of logic every client needs: LSN order, snapshot visibility and
//! chunk frames. Mirrors the `pgrelay-protocol` crate.

export const PROTOCOL_VERSION = 1;
export const MAX_CLIENT_FRAME_BYTES = 1 << 20;
export const MAX_WRITE_TRANSACTIONS = 1_000;
export const MAX_WRITE_CHANGES = 10_000;

/** A row: column → PostgreSQL text output, `null` for SQL NULL. */
export type Row = Record<string, string | null>;

export type ValueKind = "integer" | "float" | "bool" | "bytes" | "numeric" | "json" | "text";

export interface Column {
  name: string;
  pg_type: string;
  type_oid: number;
  kind: ValueKind;
  /** PostgreSQL's number for the column (kept across RENAME COLUMN). */
  attnum?: number;
}

export interface TableSchema {
  name: string;
  columns: Column[];
  primary_key: string[];
  version: number;
  skipped?: string;
  backfilled?: string[];
  /** The table's OID in PostgreSQL (kept across RENAME TABLE). */
  oid?: number;
}

export type Op = "insert" | "update" | "delete" | "truncate";

export interface Change {
  table: string;
  op: Op;
  new?: Row;
  old?: Row;
}

export interface Transaction {
  lsn: string;
  xid: number;
  commit_time_us: number;
  origin?: string;
  changes: Change[];
}

export interface Visibility {
  xmin: number;
  xmax: number;
  xip: number[];
  until: string;
}

export interface ClientChange {
  id: string;
  table: string;
  op: "insert" | "update" | "delete";
  new?: Row;
  old?: Row;
}

export interface ClientTransaction {
  id: string;
  changes: ClientChange[];
}

export interface WriteBatch {
  batch_id?: string;
  transactions: ClientTransaction[];
}

export type WriteStatus = "applied" | "rejected" | "retry";

export interface CurrentRow {
  table: string;
  key: Row;
  row?: Row | null;
}

export interface TxResult {
  id: string;
  status: WriteStatus;
  duplicate?: boolean;
  code?: string;
  reason?: string;
  rows?: CurrentRow[];
}

export interface WriteResults {
  batch_id?: string;
  /** WAL position read right after the batch committed: its commit LSN is at most this. */
  lsn?: string;
  /** WAL position of the batch's first record: its commit LSN is above this. */
  lsn_floor?: string;
  results: TxResult[];
}

/** SQL a replica runs (or undoes) to follow the application's schema. */
export interface ClientMigration {
  version: number;
  name: string;
  direction: "up" | "down";
  sql: string;
}

/** With `upgrade_required`: the client's version and the window the server serves. */
export interface UpgradeRequired {
  what: "protocol" | "schema";
  client: number;
  server_min: number;
  server_max: number;
}

export type ServerMessage =
  | { type: "welcome"; protocol_version: number; client_id: string; head_lsn: string; tables: TableSchema[]; log_id?: string; wal_lsn?: string; origin?: string }
  | { type: "schema"; tables: TableSchema[] }
  | ({ type: "tx" } & Transaction)
  | { type: "caught_up"; lsn: string; wal_lsn?: string }
  | ({ type: "write_result" } & WriteResults)
  | { type: "write_refused"; batch_id?: string; code: string; message: string }
  | { type: "error"; code: string; message: string; upgrade?: UpgradeRequired }
  | { type: "migrations"; schema_version: number; migrations: ClientMigration[] }
  | { type: "snapshot_queued"; waiting: number }
  | {
      type: "snapshot_begin";
      resume_lsn: string;
      full: boolean;
      tables: { table: string; estimated_rows: number }[];
      visibility: Visibility;
    }
  | { type: "snapshot_table"; table: string; rows: number; bytes: number; checksum: string }
  | { type: "snapshot_end" }
  | { type: "repair_begin"; resume_lsn: string; tables: string[]; visibility: Visibility }
  | { type: "pong" };

const LSN_PATTERN = /^([0-9A-Fa-f]{1,8})\/([0-9A-Fa-f]{1,8})$/;

/** An LSN as a 64-bit unsigned integer; throws on anything else. */
export function parseLsn(text: string): bigint {
  const m = LSN_PATTERN.exec(text);
  if (!m) throw new ProtocolError(`not an LSN: ${JSON.stringify(String(text).slice(0, 40))}`);
  return (BigInt("0x" + m[1]) << 32n) | BigInt("0x" + m[2]);
}

export function formatLsn(lsn: bigint): string {
  return `${(lsn >> 32n).toString(16).toUpperCase()}/${(lsn & 0xffffffffn).toString(16).toUpperCase()}`;
}

/**
 * Whether the committed transaction with this 32-bit id (as logical
 * decoding reports it) is part of the snapshot: widened to 64 bits near
 * `xmax`, then below `xmin`, or below `xmax` and not in progress.
 */
export function sees(v: Visibility, xid: number): boolean {
  const xmax = BigInt(v.xmax);
  let full = (xmax & ~0xffffffffn) | BigInt(xid >>> 0);
  if (full > xmax + (1n << 31n)) full = full >= 1n << 32n ? full - (1n << 32n) : 0n;
  if (full < BigInt(v.xmin)) return true;
  return full < xmax && !v.xip.some((x) => BigInt(x) === full);
}

export interface Chunk {
  table: number;
  seq: number;
  payload: Uint8Array;
}

/** Splits a binary snapshot chunk frame; `null` when it is not one. */
export function parseChunk(frame: Uint8Array): Chunk | null {
  if (frame.length < 7 || frame[0] !== 1) return null;
  const view = new DataView(frame.buffer, frame.byteOffset, frame.byteLength);
  return { table: view.getUint16(1), seq: view.getUint32(3), payload: frame.subarray(7) };
}

/** A frame the server sent that this client cannot understand. */
export class ProtocolError extends Error {
  override name = "ProtocolError";
}

/** The server closed the session with an `error` frame. */
export class RefusedError extends Error {
  override name = "RefusedError";
  constructor(
    readonly code: string,
    message: string,
  ) {
    super(`${code}: ${message}`);
  }
}

/** Decodes a text frame; throws ProtocolError on anything malformed. */
export function decodeFrame(text: string): ServerMessage {
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch (e) {
    throw new ProtocolError(`bad message from the server: not JSON (${(e as Error).message})`);
  }
  if (typeof value !== "object" || value === null || typeof (value as { type?: unknown }).type !== "string") {
    throw new ProtocolError("bad message from the server: not an object with a type");
  }
  const m = value as ServerMessage;
  if (m.type === "tx") {
    if (typeof m.lsn !== "string" || !Array.isArray(m.changes) || typeof m.xid !== "number") {
      throw new ProtocolError("bad tx frame from the server");
    }
    parseLsn(m.lsn);
  }
  return m;
}

/** The client's `hello`: who it is, where its replica stands, and that it can repair (where the server would answer `gone`). */
export function helloFrame(
  state: { clientId: string | null; lsn: string | null; logId: string | null; resync: string[]; schemaVersion: number },
  token: string | null,
  tables: string[] | undefined,
): string {
  const hello: Record<string, unknown> = { type: "hello", protocol_version: PROTOCOL_VERSION, client_id: state.clientId ?? "" };
  if (token) hello.token = token;
  if (state.lsn) hello.last_lsn = state.lsn;
  if (state.logId) hello.log_id = state.logId;
  if (state.resync.length > 0) hello.resync = state.resync;
  if (tables) hello.tables = tables;
  hello.schema_version = state.schemaVersion;
  hello.repair = true;
  return JSON.stringify(hello);
}

/** The table's name in the replica: bare for `public`, `schema.table` otherwise. */
export function sqliteName(qualified: string): string {
  return qualified.startsWith("public.") ? qualified.slice("public.".length) : qualified;
}
