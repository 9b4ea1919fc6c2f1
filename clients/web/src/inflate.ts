//! Decompressing a snapshot chunk (one zstd frame) into no more than the
//! size its header announces. Written here around fzstd because fzstd
//! sizes its buffers from whatever a frame header says and has no output
//! limit: the header is checked and the frame's blocks walked before
//! anything is allocated, and output past the announced size stops the
//! decoder (which is shown one byte more than announced), so a lying server or a man in the middle cannot make the
//! client allocate more than the chunk's stated size (itself capped).
//! Chunks are inflated and loaded one at a time, so that is also the most
//! decompressed snapshot data held at once.

import { Decompress } from "fzstd";

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

/** The chunk's bytes, exactly as many as its frame announces. */
export function inflateChunk(frame: Uint8Array): Uint8Array {
  const header = frameHeader(frame);
  checkBlocks(frame, header);
  const expected = header.contentSize;
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
