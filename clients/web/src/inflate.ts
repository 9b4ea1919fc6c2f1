//! Decompressing a snapshot chunk (one zstd frame) into no more than the
//! size its header announces. The header is checked and the frame's blocks
//! walked before anything is allocated, and the decoder gets room for one
//! byte more than announced, so a lying server or a man in the middle
//! cannot make the client allocate more than the chunk's stated size
//! (itself capped). Chunks are inflated and loaded one at a time, so that
//! is also the most decompressed snapshot data held at once.
//!
//! The decoder is zstd itself compiled to WebAssembly (`zstddec`), about
//! five times faster than fzstd (pure JavaScript), which was a quarter of
//! hydration's time; browsers' DecompressionStream has no zstd. Where the
//! WebAssembly cannot be instantiated (a Content-Security-Policy without
//! `data:` in `connect-src`), fzstd does the same job, more slowly. fzstd
//! sizes its buffers from whatever a frame header says and has no output
//! limit: it is shown the frame with a header announcing one byte more,
//! and output past that stops it.

import { Decompress } from "fzstd";
import { ZSTDDecoder } from "zstddec";

/** Largest uncompressed chunk accepted (the server sends 256 KiB plus at most one row; a row can be large). */
export const MAX_CHUNK_BYTES = 256 << 20;

/** A chunk that is not one honest zstd frame; its table is fetched again. */
export class ChunkRefused extends Error {
  override name = "ChunkRefused";
}

const MAGIC = 0xfd2fb528;

interface FrameHeader {
  /** The uncompressed size the frame announces. */
  contentSize: number;
  windowSize: number;
  checksum: boolean;
  /** Bytes of the header (magic included). */
  length: number;
}

/** Reads and checks a zstd frame header (RFC 8878, 3.1.1.1). */
export function frameHeader(frame: Uint8Array): FrameHeader {
  if (frame.length < 6) throw new ChunkRefused("is not a zstd frame");
  const view = new DataView(frame.buffer, frame.byteOffset, frame.byteLength);
  if (view.getUint32(0, true) !== MAGIC) throw new ChunkRefused("is not a zstd frame");
  const descriptor = frame[4]!;
  const singleSegment = (descriptor & 0x20) !== 0;
  if ((descriptor & 0x08) !== 0) throw new ChunkRefused("has a reserved bit set");
  let at = 5;
  let windowSize = 0;
  if (!singleSegment) {
    const window = frame[at++]!;
    const base = 2 ** (10 + (window >> 3));
    windowSize = base + (base / 8) * (window & 7);
  }
  if ((descriptor & 0x03) !== 0) throw new ChunkRefused("needs a dictionary");
  const sizeBytes = [singleSegment ? 1 : 0, 2, 4, 8][descriptor >> 6]!;
  if (at + sizeBytes > frame.length) throw new ChunkRefused("is cut short");
  let contentSize: number;
  switch (sizeBytes) {
    case 0:
      throw new ChunkRefused("does not announce its uncompressed size");
    case 1:
      contentSize = frame[at]!;
      break;
    case 2:
      contentSize = view.getUint16(at, true) + 256;
      break;
    case 4:
      contentSize = view.getUint32(at, true);
      break;
    default:
      contentSize = view.getUint32(at + 4, true) * 2 ** 32 + view.getUint32(at, true);
  }
  at += sizeBytes;
  if (singleSegment) windowSize = contentSize;
  if (contentSize > MAX_CHUNK_BYTES) {
    throw new ChunkRefused(`announces ${contentSize} bytes, over the ${MAX_CHUNK_BYTES}-byte limit`);
  }
  if (windowSize > MAX_CHUNK_BYTES) {
    throw new ChunkRefused(`asks for a ${windowSize}-byte window, over the ${MAX_CHUNK_BYTES}-byte limit`);
  }
  return { contentSize, windowSize, checksum: (descriptor & 0x04) !== 0, length: at };
}

/** Checks that `frame` is exactly one frame: its blocks end where the bytes do. */
function checkBlocks(frame: Uint8Array, header: FrameHeader): void {
  let at = header.length;
  for (;;) {
    if (at + 3 > frame.length) throw new ChunkRefused("is cut short");
    const block = frame[at]! | (frame[at + 1]! << 8) | (frame[at + 2]! << 16);
    at += 3;
    const type = (block >> 1) & 3;
    if (type === 3) throw new ChunkRefused("has a block of the reserved type");
    // RLE: one byte, repeated; raw and compressed: the block's bytes.
    at += type === 1 ? 1 : block >>> 3;
    if ((block & 1) === 1) break;
  }
  if (header.checksum) at += 4;
  if (at !== frame.length) {
    throw new ChunkRefused(at > frame.length ? "is cut short" : "holds more than one zstd frame");
  }
}

interface ZstdExports {
  memory: WebAssembly.Memory;
  malloc(size: number): number;
  free(pointer: number): void;
  ZSTD_decompress(dst: number, dstCapacity: number, src: number, srcSize: number): number;
  ZSTD_isError(code: number): number;
}

let zstd: ZstdExports | null = null;
let preparing: Promise<boolean> | null = null;

/**
 * Instantiates the WebAssembly decoder once; false when it cannot be
 * (fzstd is used then). Called before a snapshot's first chunk.
 */
export function prepareInflate(): Promise<boolean> {
  preparing ??= (async () => {
    let instance: WebAssembly.Instance | null = null;
    // zstddec keeps its instance to itself; its init hook hands it over.
    class Decoder extends ZSTDDecoder {
      override _init(result: WebAssembly.WebAssemblyInstantiatedSource): void {
        instance = result.instance;
        super._init(result);
      }
    }
    try {
      await new Decoder().init();
    } catch (e) {
      console.warn(`pgrelay: the zstd WebAssembly decoder cannot start (${(e as Error).message}); snapshots decompress with fzstd, more slowly`);
      return false;
    }
    zstd = instance === null ? null : ((instance as WebAssembly.Instance).exports as unknown as ZstdExports);
    return zstd !== null;
  })();
  return preparing;
}

/** Uses fzstd even where the WebAssembly decoder is ready (tests of both paths). */
export function useWasmInflate(on: boolean): void {
  wasmOff = !on;
}
let wasmOff = false;

/** The chunk's bytes, exactly as many as its frame announces. */
export function inflateChunk(frame: Uint8Array): Uint8Array {
  const header = frameHeader(frame);
  checkBlocks(frame, header);
  const expected = header.contentSize;
  if (zstd !== null && !wasmOff) return inflateWasm(zstd, frame, expected);
  // fzstd writes nothing past a single-segment frame's window (its
  // announced size) and says nothing of it either: the header is written
  // again announcing one byte more, so a frame holding more than it
  // announced shows that byte and is caught below.
  const reframed = new Uint8Array(9 + frame.length - header.length);
  reframed.set([0x28, 0xb5, 0x2f, 0xfd, 0xa0 | (header.checksum ? 0x04 : 0)]);
  new DataView(reframed.buffer).setUint32(5, expected + 1, true);
  reframed.set(frame.subarray(header.length), 9);
  const out = new Uint8Array(expected);
  let at = 0;
  const decoder = new Decompress((data: Uint8Array) => {
    if (data.length > expected - at) {
      throw new ChunkRefused(`holds more than the ${expected} bytes it announces`);
    }
    out.set(data, at);
    at += data.length;
  });
  try {
    decoder.push(reframed, true);
  } catch (e) {
    if (e instanceof ChunkRefused) throw e;
    throw new ChunkRefused(`does not decompress to the ${expected} bytes it announces: ${(e as Error).message}`);
  }
  if (at !== expected) throw new ChunkRefused(`holds ${at} bytes, not the ${expected} it announces`);
  return out;
}

function inflateWasm(z: ZstdExports, frame: Uint8Array, expected: number): Uint8Array {
  const src = z.malloc(frame.length);
  const dst = z.malloc(expected + 1);
  try {
    if (src === 0 || dst === 0) throw new ChunkRefused(`needs ${expected} bytes the decoder cannot allocate`);
    new Uint8Array(z.memory.buffer).set(frame, src);
    // size_t in wasm32: an error code comes back as a negative i32.
    const written = z.ZSTD_decompress(dst, expected + 1, src, frame.length) >>> 0;
    if (z.ZSTD_isError(written)) throw new ChunkRefused(`does not decompress to the ${expected} bytes it announces`);
    if (written > expected) throw new ChunkRefused(`holds more than the ${expected} bytes it announces`);
    if (written !== expected) throw new ChunkRefused(`holds ${written} bytes, not the ${expected} it announces`);
    return new Uint8Array(z.memory.buffer).slice(dst, dst + expected);
  } finally {
    if (src !== 0) z.free(src);
    if (dst !== 0) z.free(dst);
  }
}
