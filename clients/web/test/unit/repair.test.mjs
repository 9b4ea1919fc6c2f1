// Repair's digests in Node: canonical values, row hashes and range sums
// equal the Rust protocol's (the vectors in repair-vectors.json are
// computed by crates/pgrelay-protocol/tests/web_vectors.rs), the replica's
// digest of stored rows equals the digest of the same rows as PostgreSQL
// prints them, and the client's frames are zstd frames real decoders read.
import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { createXXHash128 } from "hash-wasm";
import { Decompress } from "fzstd";
import { canonicalPgText, canonicalStoredReal } from "../../build/node/canonical.js";
import { Cutter, RangeSum, RowHasher, splitPoints, keyKinds } from "../../build/node/repair/digest.js";
import { encodeRepair, decodeRepair, spanJson, checkJson } from "../../build/node/repair/wire.js";
import { inflateChunk, prepareInflate, useWasmInflate } from "../../build/node/inflate.js";
import { createHash } from "node:crypto";
import { Retry } from "../../build/node/backoff.js";
import { memoryReplica } from "./fixture.mjs";

const vectors = JSON.parse(readFileSync(new URL("./repair-vectors.json", import.meta.url), "utf8"));
const hasher = new RowHasher(await createXXHash128());
const hex = (bytes) => Buffer.from(bytes).toString("hex");
const canonicalRow = (row) => row.kinds.map((k, i) => canonicalPgText(k, row.values[i]));

test("canonical values equal the Rust protocol's", () => {
  assert.ok(vectors.values.length > 50);
  for (const v of vectors.values) assert.equal(canonicalPgText(v.kind, v.text), v.canonical, `${v.kind} ${JSON.stringify(v.text)}`);
});

test("row hashes (XXH3-128 of length-prefixed canonical values) equal the Rust protocol's", () => {
  for (const row of vectors.rows) assert.equal(hex(hasher.row(canonicalRow(row))), row.hash, JSON.stringify(row.values));
});

test("a range's sum wraps at 2^128 and its short form is the low 64 bits, as in Rust", () => {
  const sum = new RangeSum();
  const hashes = vectors.rows.map((row) => hasher.row(canonicalRow(row)));
  for (const h of hashes) sum.add(h);
  assert.deepEqual({ rows: sum.rows, hex: sum.hex(), short: sum.short() }, vectors.sum);
  // Removing every row in another order gives zero back; merge and subtract agree.
  const part = new RangeSum();
  for (const h of hashes.slice(0, 10)) part.add(h);
  const rest = new RangeSum();
  for (const h of hashes.slice(10).reverse()) rest.add(h);
  rest.merge(part);
  assert.equal(rest.hex(), sum.hex());
  rest.subtract(part);
  for (const h of hashes.slice(10)) rest.remove(h);
  assert.deepEqual([rest.rows, rest.hex()], [0, "0".repeat(32)]);
});

test("floats print as Rust's {:e}: shortest digits, no + in the exponent", () => {
  assert.equal(canonicalStoredReal("float", 1e20), "1e20");
  assert.equal(canonicalStoredReal("float", 5e-324), "5e-324");
  assert.equal(canonicalStoredReal("float", -0), "0");
  assert.equal(canonicalStoredReal("float", 0.1 + 0.2), "3.0000000000000004e-1");
  assert.equal(canonicalStoredReal("integer", 2.5), "2.5e0");
});

test("ranges are cut where Rust cuts them", () => {
  assert.deepEqual(splitPoints(10, 4), [3, 6, 9]);
  assert.deepEqual(splitPoints(3, 4), [1, 2]);
  assert.deepEqual(splitPoints(0, 4), []);
  assert.deepEqual(splitPoints(1000, 1), []);
  const cutter = new Cutter(null, [100n], 10, 4);
  const h = hasher.row(["x"]);
  for (let i = 0; i < 12; i++) cutter.add(h, () => [BigInt(i)]);
  const span = cutter.finish(false);
  assert.deepEqual(span.bounds, [[3n], [6n], [9n]]);
  assert.deepEqual(span.rows, [3, 3, 3, 3]);
  assert.equal(span.digests.length, 64);
  assert.equal(spanJson(span), `{"hi":[100],"bounds":[[3],[6],[9]],"rows":[3,3,3,3],"digests":"${span.digests}"}`);
});

test("keys compared by range: integers, text, varchar and uuid; others whole", () => {
  const col = (name, kind, type_oid) => ({ name, kind, type_oid, pg_type: "" });
  const table = (columns, primary_key) => ({ name: "public.t", columns, primary_key, version: 1 });
  assert.deepEqual(keyKinds(table([col("a", "integer", 20), col("b", "text", 1043), col("c", "text", 2950)], ["a", "b", "c"])), ["integer", "text", "uuid"]);
  assert.equal(keyKinds(table([col("a", "numeric", 1700)], ["a"])), null);
  assert.equal(keyKinds(table([col("a", "text", 1082)], ["a"])), null);
  assert.equal(keyKinds(table([col("a", "integer", 20)], [])), null);
});

test("the client's frames are zstd frames that zstd reads: Huffman-coded or raw, also past one block", async () => {
  await prepareInflate();
  for (const json of [checkJson("public.t", []), JSON.stringify({ type: "done", refetch: ["x".repeat(300_000)] })]) {
    const frame = encodeRepair(json);
    assert.equal(frame[0], 2);
    assert.equal(new TextDecoder().decode(inflateChunk(frame.subarray(1))), json);
    const parts = [];
    new Decompress((d) => parts.push(d)).push(frame.subarray(1), true);
    assert.equal(Buffer.concat(parts).toString(), json);
  }
  // A first round's check of a large table: Huffman-coded, about half its JSON; text past ASCII goes raw.
  const digests = Array.from({ length: 5000 }, (_, i) => createHash("sha256").update(String(i)).digest("hex").slice(0, 16)).join("");
  const span = { lo: null, hi: null, bounds: Array.from({ length: 4999 }, (_, i) => [BigInt(i * 256 + 1)]), rows: Array(5000).fill(256), digests, whole: false };
  const every = Array.from({ length: 96 }, (_, i) => String.fromCharCode(32 + i)).join("");
  for (const json of [checkJson("public.t", [spanJson(span)]), JSON.stringify({ type: "done", refetch: [every.repeat(50)] }), JSON.stringify({ type: "done", refetch: ["ärger".repeat(100)] })]) {
    const frame = encodeRepair(json);
    if (json.startsWith('{"type":"check"')) assert.ok(frame.length < json.length * 0.6, `${frame.length} bytes for ${json.length} of JSON`);
    assert.equal(new TextDecoder().decode(inflateChunk(frame.subarray(1))), json);
    useWasmInflate(false);
    try {
      assert.equal(new TextDecoder().decode(inflateChunk(frame.subarray(1))), json);
    } finally {
      useWasmInflate(true);
    }
  }
  // The server's frames decode the same way.
  const diff = JSON.stringify({ type: "diff", table: "public.t", parts: [{ span: 0, part: 1, rows: 3, replace: true }], total: [3, "ab"] });
  assert.deepEqual(decodeRepair(encodeRepair(diff)), JSON.parse(diff));
});

/** COPY text of values as PostgreSQL prints them. */
const copyLine = (values) => values.map((v) => (v === null ? "\\N" : v.replace(/\\/g, "\\\\").replace(/\t/g, "\\t").replace(/\n/g, "\\n"))).join("\t") + "\n";

test("the replica's digest of stored rows equals the digest of the rows as PostgreSQL prints them", async () => {
  const kinds = ["integer", "float", "bool", "bytes", "numeric", "json", "text"];
  const oids = [20, 701, 16, 17, 1700, 3802, 25];
  const table = {
    name: "public.every_kind",
    columns: kinds.map((kind, i) => ({ name: `c${i}`, pg_type: kind, type_oid: oids[i], kind })),
    primary_key: ["c0"],
    version: 1,
  };
  const rows = [
    ["-9223372036854775808", "1e+20", "t", "\\xDEADbeef", "1.50", '{"k": [1, 2]}', "é中😀 tab\there"],
    ["9223372036854775807", "NaN", "f", "\\x", "-0.000", "[]", ""],
    ["0", "-0", null, null, null, null, null],
    ["1", "Infinity", "t", "\\x00", "NaN", "null", "NULL"],
    ["2", "-Infinity", "f", "\\xff", "1e5", "{}", "\\N as text"],
    ["3", "5e-324", "t", "\\x0102", "0", "1", "12"],
    ["4", "1.7976931348623157e+308", "t", "\\x0102", "0", "1", "line\nbreak"],
    ["5", "0.1", "t", "\\x0102", "0", "1", "x".repeat(5000)],
    ["9007199254740993", "3.4028235e+38", "t", "\\x0102", "0", "1", "big key"],
  ];
  const replica = await memoryReplica();
  replica.applySchema([table]);
  replica.loadSnapshot(table.name, new TextEncoder().encode(rows.map(copyLine).join("")));
  const expected = new RangeSum();
  for (const r of rows) expected.add(hasher.row(r.map((v, i) => canonicalPgText(kinds[i], v))));
  const digest = replica.repairDigest(table.name, [{ lo: null, hi: null, count: null }], hasher);
  assert.deepEqual([digest.sum.rows, digest.sum.hex()], [expected.rows, expected.hex()]);
  assert.equal(digest.spans.length, 1);
  assert.equal(digest.spans[0].digests, expected.short());
  // Removing a range gives back what its rows summed to, and loading the
  // same COPY rows adds it again.
  const removed = replica.repairRemove(table.name, [{ lo: [0n], hi: [5n] }], hasher);
  assert.equal(removed.rows, 5);
  const added = replica.repairLoad(table.name, new TextEncoder().encode(rows.slice(2, 7).map(copyLine).join("")), hasher);
  assert.deepEqual([added.rows, added.hex()], [removed.rows, removed.hex()]);
  // Cut into parts at its own keys.
  const cut = replica.repairDigest(table.name, [{ lo: [1n], hi: null, count: 7 }], hasher);
  assert.deepEqual(cut.spans[0].bounds, [[3n], [5n], [9223372036854775807n]]);
  assert.deepEqual(cut.spans[0].rows, [2, 2, 2, 1]);
});

test("told gone mid-session the client reconnects to repair; told gone again it downloads the replica again", () => {
  const retry = new Retry();
  assert.equal(retry.after("gone", true), "repair");
  assert.equal(retry.after("gone", true), "rehydrate");
  assert.equal(retry.after(null, true), "backoff");
  assert.equal(retry.after("gone", true), "repair");
  assert.equal(retry.after("unauthorized", false), "failed");
});
