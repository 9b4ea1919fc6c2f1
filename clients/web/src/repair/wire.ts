//! Repair frames (tag byte 2, then one zstd frame of the message's JSON). The client's frames are written by hand, as zstd frames whose blocks are Huffman-coded literals (huffman.ts) or stored raw, because no small npm zstd encoder exists (the encoders are all of zstd in WebAssembly, about as large as the rest of the worker); the server's frames decode with the snapshot's decoder (inflate.ts).

import { frameHeader, inflateChunk } from "../inflate.js";
import { ProtocolError } from "../protocol.js";
import { huffmanBlock } from "./huffman.js";
import type { CheckSpan, Key } from "./digest.js";

export const REPAIR_TAG = 2;
/** Largest repair message accepted from the server, decompressed (the Rust client's limit). */
export const MAX_MESSAGE_BYTES = 64 << 20;
/** zstd's largest block. */
const MAX_BLOCK = 128 * 1024;

/** A part whose digest differs on the server. */
export interface DiffPart {
  span: number;
  part: number;
  /** The server's row count in the part. */
  rows: number;
  /** The server replaces the part: its rows follow. */
  replace?: boolean;
}

/** The server's repair messages. */
export type ServerRepair =
  | { type: "diff"; table: string; parts: DiffPart[]; total?: [number, string] }
  | { type: "rows"; table: string; copy: string }
  | { type: "rows_end"; table: string };

/** A key as JSON: integers with every digit (they are i64 on the server), text as strings. */
function keyJson(key: Key): string {
  return `[${key.map((v) => (typeof v === "bigint" ? v.toString() : JSON.stringify(v))).join(",")}]`;
}

/** One span of a `check`, as JSON. */
export function spanJson(span: CheckSpan): string {
  let out = "{";
  if (span.lo !== null) out += `"lo":${keyJson(span.lo)},`;
  if (span.hi !== null) out += `"hi":${keyJson(span.hi)},`;
  if (span.bounds.length > 0) out += `"bounds":[${span.bounds.map(keyJson).join(",")}],`;
  if (span.whole) out += `"whole":true,`;
  return `${out}"rows":[${span.rows.join(",")}],"digests":"${span.digests}"}`;
}

/** A `check` of `spans` (given as `spanJson`) of a table. */
export function checkJson(table: string, spans: string[]): string {
  return `{"type":"check","table":${JSON.stringify(table)},"spans":[${spans.join(",")}]}`;
}

export function doneJson(refetch: string[]): string {
  return JSON.stringify({ type: "done", refetch });
}

/** A binary repair frame holding `json`. */
export function encodeRepair(json: string): Uint8Array {
  const body = new TextEncoder().encode(json);
  const count = Math.max(1, Math.ceil(body.length / MAX_BLOCK));
  const blocks: { type: number; content: Uint8Array }[] = [];
  for (let i = 0; i < count; i++) {
    const chunk = body.subarray(i * MAX_BLOCK, (i + 1) * MAX_BLOCK);
    const coded = huffmanBlock(chunk);
    // Type 2: compressed; type 0: raw.
    blocks.push(coded === null ? { type: 0, content: chunk } : { type: 2, content: coded });
  }
  const frame = new Uint8Array(1 + 9 + blocks.reduce((n, b) => n + 3 + b.content.length, 0));
  frame[0] = REPAIR_TAG;
  // Magic; a single-segment frame announcing its size in 4 bytes.
  frame.set([0x28, 0xb5, 0x2f, 0xfd, 0xa0], 1);
  new DataView(frame.buffer).setUint32(6, body.length, true);
  let at = 10;
  blocks.forEach(({ type, content }, i) => {
    // Block header: last flag, type, size.
    const header = (content.length << 3) | (type << 1) | (i === count - 1 ? 1 : 0);
    frame.set([header & 0xff, (header >>> 8) & 0xff, (header >>> 16) & 0xff], at);
    frame.set(content, at + 3);
    at += 3 + content.length;
  });
  return frame;
}

/** Decodes a binary repair frame from the server. */
export function decodeRepair(frame: Uint8Array): ServerRepair {
  if (frame[0] !== REPAIR_TAG) throw new ProtocolError("a binary frame that is neither a snapshot chunk nor a repair frame");
  const body = frame.subarray(1);
  let json: string;
  try {
    if (frameHeader(body).contentSize > MAX_MESSAGE_BYTES) throw new Error(`over ${MAX_MESSAGE_BYTES} bytes`);
    json = new TextDecoder("utf-8", { fatal: true }).decode(inflateChunk(body));
  } catch (e) {
    throw new ProtocolError(`repair frame does not decompress: ${(e as Error).message}`);
  }
  let message: unknown;
  try {
    message = JSON.parse(json);
  } catch (e) {
    throw new ProtocolError(`bad repair message: ${(e as Error).message}`);
  }
  const m = message as ServerRepair;
  if (typeof m !== "object" || m === null || typeof m.table !== "string") throw new ProtocolError("bad repair message");
  if (m.type === "diff" && !Array.isArray(m.parts)) throw new ProtocolError("bad repair diff");
  if (m.type === "rows" && typeof m.copy !== "string") throw new ProtocolError("bad repair rows");
  if (m.type !== "diff" && m.type !== "rows" && m.type !== "rows_end") throw new ProtocolError(`unexpected repair message ${String((m as { type?: unknown }).type)}`);
  return m;
}
