// Snapshot chunks are decompressed into no more than the size their zstd
// frame announces: a chunk that lies about its size, or that would need
// more memory than the limit, is refused with a clear reason and without
// the memory it asks for.
import { test } from "node:test";
import assert from "node:assert/strict";
import { ChunkRefused, inflateChunk, MAX_CHUNK_BYTES, prepareInflate, useWasmInflate } from "../../build/node/inflate.js";

// Every test runs with each decoder: zstd in WebAssembly, and fzstd (used
// where the WebAssembly cannot be instantiated).
assert.equal(await prepareInflate(), true);
const decoders = ["wasm", "fzstd"];
const each = (name, body) => {
  for (const d of decoders) {
    test(`${name} (${d})`, () => {
      useWasmInflate(d === "wasm");
      try {
        body();
      } finally {
        useWasmInflate(true);
      }
    });
  }
};

// `zstd -19` of 3000 lines "i%50 TAB name i%7" (29400 bytes).
const HONEST = Uint8Array.from(Buffer.from("KLUv/WTYcV0PAHboShOQp6A5+9r/j9BEhEiZODg7po4DSgBDAEIA9Cx3/jsOq9Fmso57WywUjZQvQqvUqbRl7xoNLBKHwpKcYzBc07Pc+e84rEabyTrubbHBYbAaBA1mBiKDdkAOfrANImCAQKAAIAKH1WgzWce3xULRSHkMWqVOpS1712hgkTgUluQcg+GanuXOf8dhNdpM1vFtsVA0Ur4IrVKn0pa9azSwSBwKS3KOwXAdb4uFopHyGLRKnUpb9q7RwCJxKCzJOQbDNT3Lnf+Ow2q0mazj22KhaKQ8Bq1Sp9KWvWs0sEgcCktyjsFwTc9y578jg1apU2nL3jUaWCQOhSU5x2C4pme5899xWI02k3V8WywUjZTHoFXqVNqyd40GFolDYUnOMRiu6Vnu/HccVqPNZB0DgV6oITD77AYRV5C0MWMSkBBg7/7//58Bb2Vaq2rpsrQ6tWHjZIjBhGDwCKFAhsPuAvarFupNp0caOE6jdEJIg4NQBWC44C5gv2qh3nR6pIHjNEonhDQ4CFUAhgvuAvarFupNp0caOE6jdEJIg4NQBWC44C5gv2qh3nR6pIHjNEonhDQ4CFUAhuvCoOVlVcmRfshA4a9xZ2EYEOEolIFo0WRpbSY50g8ZuHBC5qAq86cffPNNH3zz4+kngK8CAmq0sA==", "base64"));
const HONEST_TEXT = Array.from({ length: 3000 }, (_, i) => `${i % 50}\tname ${i % 7}\n`).join("");

/** A single-segment frame with a 4-byte content size and the given blocks. */
function frame(announced, blocks) {
  const parts = [[0x28, 0xb5, 0x2f, 0xfd, 0xa0], le32(announced)];
  blocks.forEach((b, i) => {
    const last = i === blocks.length - 1 ? 1 : 0;
    const header = last | (b.type << 1) | (b.size << 3);
    parts.push([header & 0xff, (header >> 8) & 0xff, (header >> 16) & 0xff]);
    parts.push(b.type === 1 ? [b.byte] : Array.from(b.bytes));
  });
  return Uint8Array.from(parts.flat());
}
function le32(n) {
  return [n & 0xff, (n >>> 8) & 0xff, (n >>> 16) & 0xff, (n >>> 24) & 0xff];
}
const raw = (bytes) => ({ type: 0, size: bytes.length, bytes });
const rle = (byte, size) => ({ type: 1, size, byte });

function refused(chunk, pattern) {
  assert.throws(
    () => inflateChunk(chunk),
    (e) => e instanceof ChunkRefused && pattern.test(e.message),
  );
}

each("an honest chunk decompresses to exactly what it announces", () => {
  const out = inflateChunk(HONEST);
  assert.equal(new TextDecoder().decode(out), HONEST_TEXT);
  const bytes = new TextEncoder().encode("1\tone\n2\ttwo\n");
  assert.deepEqual(inflateChunk(frame(bytes.length + 100, [raw(bytes), rle(0x41, 100)])), Uint8Array.from([...bytes, ...new Array(100).fill(0x41)]));
});

each("a chunk that holds more than it announces is refused without the memory", () => {
  // 4 bytes per block on the wire, 128 KiB each decompressed: 1024 of them
  // would be 128 MiB from 4 KiB.
  const bomb = frame(1000, Array.from({ length: 1024 }, () => rle(0x78, 128 << 10)));
  const before = process.memoryUsage().arrayBuffers;
  refused(bomb, /1000 bytes it announces/);
  const grown = process.memoryUsage().arrayBuffers - before;
  assert.ok(grown < 16 << 20, `grew by ${grown} bytes`);
  // A real frame whose header was edited to announce less.
  const lying = HONEST.slice();
  // Single segment (no window byte) with a 2-byte size (value + 256).
  assert.equal(lying[4] >> 5, 0b011);
  lying.set([(1000 - 256) & 0xff, (1000 - 256) >> 8], 5);
  refused(lying, /announces/);
  // Less than announced is refused too.
  refused(frame(500, [raw(new Uint8Array(10))]), /(holds 10 bytes, not the|does not decompress to the) 500/);
});

each("headers that would make the client allocate past the limit are refused", () => {
  refused(frame(MAX_CHUNK_BYTES + 1, [rle(0, 1)]), /over the 268435456-byte limit/);
  // No single segment, a window of 2 GiB (exponent 21), no content size.
  refused(Uint8Array.from([0x28, 0xb5, 0x2f, 0xfd, 0x00, 21 << 3, 1, 0, 0]), /does not announce/);
  // A 2 GiB window with a small content size.
  refused(Uint8Array.from([0x28, 0xb5, 0x2f, 0xfd, 0x80, 21 << 3, 0x10, 0x00, 1, 0, 0]), /window, over the/);
  // A second frame after the first (its header would be read unchecked).
  refused(Uint8Array.from([...frame(1, [raw([7])]), ...frame(1, [raw([8])])]), /more than one zstd frame/);
  refused(Uint8Array.from([1, 2, 3, 4, 5, 6, 7]), /not a zstd frame/);
  refused(frame(100, [raw(new Uint8Array(100))]).subarray(0, 50), /cut short/);
});
