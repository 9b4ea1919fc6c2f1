//! A zstd block of Huffman-coded literals and no sequences (RFC 8878, 3.1.1.3), written by hand: no small npm zstd encoder exists (see wire.ts), and entropy coding alone halves what the page's `check` frames are made of (hex digests, decimal keys and counts).

/** Longest code zstd allows for literals. */
const MAX_BITS = 11;
/** Fewer literals go raw (zstd decodes four streams only from 6 up; a tree costs more than it saves on a few). */
const MIN_LITERALS = 64;

/** Code lengths (0: absent) of a complete prefix code over `counts`, none longer than MAX_BITS; null for fewer than two symbols. */
function codeLengths(counts: number[]): number[] | null {
  let scaled = counts.slice();
  for (;;) {
    const lengths = huffman(scaled);
    if (lengths === null) return null;
    if (Math.max(...lengths) <= MAX_BITS) return lengths;
    // Flatter frequencies give shorter longest codes.
    scaled = scaled.map((c) => (c === 0 ? 0 : Math.max(1, c >> 1)));
  }
}

function huffman(counts: number[]): number[] | null {
  type Node = { weight: number; symbols: number[] };
  let nodes: Node[] = [];
  counts.forEach((c, s) => c > 0 && nodes.push({ weight: c, symbols: [s] }));
  if (nodes.length < 2) return null;
  const lengths = counts.map(() => 0);
  while (nodes.length > 1) {
    nodes.sort((a, b) => a.weight - b.weight);
    const [a, b] = [nodes[0]!, nodes[1]!];
    for (const s of a.symbols.concat(b.symbols)) lengths[s]!++;
    nodes = [{ weight: a.weight + b.weight, symbols: a.symbols.concat(b.symbols) }, ...nodes.slice(2)];
  }
  return lengths;
}

/** Bits written least significant first; read back from the end by the decoder. */
class BitWriter {
  readonly bytes: number[] = [];
  private acc = 0;
  private n = 0;

  add(value: number, bits: number): void {
    this.acc |= value << this.n;
    this.n += bits;
    while (this.n >= 8) {
      this.bytes.push(this.acc & 0xff);
      this.acc >>>= 8;
      this.n -= 8;
    }
  }

  /** The end mark (one bit) and the last byte. */
  close(): number[] {
    this.add(1, 1);
    if (this.n > 0) this.bytes.push(this.acc & 0xff);
    return this.bytes;
  }
}

/**
 * The content of a compressed block holding `literals`, or null when
 * Huffman coding cannot hold them (a byte over 127, one symbol alone, too
 * few) or would not save anything.
 */
export function huffmanBlock(literals: Uint8Array): Uint8Array | null {
  if (literals.length < MIN_LITERALS || literals.length > 128 * 1024) return null;
  const counts = new Array<number>(128).fill(0);
  for (const b of literals) {
    if (b > 127) return null;
    counts[b]!++;
  }
  const lengths = codeLengths(counts);
  if (lengths === null) return null;
  const maxBits = Math.max(...lengths);
  // Weights: the tree's description. Canonical codes: longest codes first,
  // by weight and then symbol, counting up.
  const weight = lengths.map((l) => (l === 0 ? 0 : maxBits + 1 - l));
  const order = weight.map((w, s) => [w, s] as const).filter(([w]) => w > 0).sort((a, b) => a[0] - b[0] || a[1] - b[1]);
  const codes = new Array<number>(128).fill(0);
  let next = 0;
  for (const [, s] of order) {
    codes[s] = next >> (maxBits - lengths[s]!);
    next += 1 << (maxBits - lengths[s]!);
  }
  let last = 127;
  while (weight[last] === 0) last--;
  // Direct representation: weights of symbols 0..last-1, two per byte; the last one's is implied.
  const tree = [127 + last];
  for (let s = 0; s < last; s += 2) tree.push((weight[s]! << 4) | (s + 1 < last ? weight[s + 1]! : 0));
  // Four streams, each written from its last literal back (the decoder reads backwards).
  const segment = Math.ceil(literals.length / 4);
  const streams: number[][] = [];
  for (let i = 0; i < 4; i++) {
    const part = literals.subarray(i * segment, Math.min((i + 1) * segment, literals.length));
    const bits = new BitWriter();
    for (let j = part.length - 1; j >= 0; j--) bits.add(codes[part[j]!]!, lengths[part[j]!]!);
    streams.push(bits.close());
  }
  if (streams.slice(0, 3).some((s) => s.length > 0xffff)) return null;
  const jump = streams.slice(0, 3).flatMap((s) => [s.length & 0xff, s.length >> 8]);
  const compressed = tree.length + 6 + streams.reduce((n, s) => n + s.length, 0);
  // Header, 40 bits little-endian: type 2 (compressed), size format 3
  // (four streams, 18-bit sizes), regenerated size, compressed size.
  const size = 5 + compressed + 1;
  if (size >= literals.length) return null;
  const header = 2 + (3 << 2) + literals.length * 2 ** 4 + compressed * 2 ** 22;
  const out = new Uint8Array(size);
  for (let i = 0; i < 5; i++) out[i] = Math.floor(header / 2 ** (8 * i)) % 256;
  let at = 5;
  for (const part of [tree, jump, ...streams]) {
    out.set(part, at);
    at += part.length;
  }
  // No sequences.
  out[at] = 0;
  return out;
}
