// The repair exchange in Node against a server played in the test (the
// Rust `Tally`'s rules over an in-memory table): a replica with a few
// thousand differences spread over 300,000 rows (rows missing, stale and
// extra; rounds of more than MAX_CHECK_PARTS ranges, sent as several
// checks) ends equal, with its full digest matching, having received only
// rows of small ranges.
import { test } from "node:test";
import assert from "node:assert/strict";
import { createXXHash128 } from "hash-wasm";
import { canonicalPgText } from "../../build/node/canonical.js";
import { LEAF_ROWS, RangeSum, RowHasher } from "../../build/node/repair/digest.js";
import { repair } from "../../build/node/repair/exchange.js";
import { inflateChunk, prepareInflate } from "../../build/node/inflate.js";
import { memoryReplica } from "./fixture.mjs";

const table = {
  name: "public.t",
  columns: [
    { name: "id", pg_type: "bigint", type_oid: 20, kind: "integer" },
    { name: "v", pg_type: "text", type_oid: 25, kind: "text" },
  ],
  primary_key: ["id"],
  version: 1,
};
const ROWS = 300_000;
const line = (id, v) => `${id}\t${v}\n`;

test("a replica with thousands of scattered differences is repaired over several checks per round and ends equal", async () => {
  await prepareInflate();
  const hasher = new RowHasher(await createXXHash128());
  const hash = (id, v) => hasher.row([canonicalPgText("integer", String(id)), v]);
  // The server's rows, by key; the replica's differ every 97th row (updated,
  // deleted or an extra row).
  const server = new Map();
  for (let id = 1; id <= ROWS; id++) if (id % 97 !== 50) server.set(id, `v${id}`);
  const replica = await memoryReplica();
  replica.applySchema([table]);
  let copy = "";
  for (let id = 1; id <= ROWS; id++) {
    if (id % 97 === 1) continue;
    copy += line(id, id % 97 === 2 ? "stale" : id % 97 === 50 ? "extra" : `v${id}`);
  }
  replica.loadSnapshot(table.name, new TextEncoder().encode(copy));
  const keys = [...server.keys()].sort((a, b) => a - b);
  /** The index of the first key at or above `bound` (null: the end, or the start for `lo`). */
  const at = (bound, fallback) => {
    if (bound === null) return fallback;
    let [a, b] = [0, keys.length];
    while (a < b) {
      const mid = (a + b) >> 1;
      if (keys[mid] < Number(bound[0])) a = mid + 1;
      else b = mid;
    }
    return a;
  };
  const frames = [];
  let checks = 0;
  let largest = 0;
  const link = {
    send(frame) {
      const m = JSON.parse(new TextDecoder().decode(inflateChunk(frame.subarray(1))));
      if (m.type !== "check") return;
      checks++;
      const parts = [];
      let copyOut = "";
      const total = new RangeSum();
      m.spans.forEach((span, s) => {
        largest = Math.max(largest, span.rows.length);
        span.rows.forEach((clientRows, p) => {
          const lo = p === 0 ? span.lo ?? null : span.bounds[p - 1];
          const hi = span.bounds[p] ?? span.hi ?? null;
          const sum = new RangeSum();
          const range = keys.slice(at(lo, 0), at(hi, keys.length));
          for (const k of range) sum.add(hash(k, server.get(k)));
          total.merge(sum);
          if (sum.rows === clientRows && sum.short() === span.digests.slice(p * 16, p * 16 + 16)) return;
          const replace = clientRows <= LEAF_ROWS || sum.rows <= LEAF_ROWS;
          parts.push({ span: s, part: p, rows: sum.rows, replace });
          if (replace) for (const k of range) copyOut += line(k, server.get(k));
        });
      });
      const whole = m.spans.length === 1 && m.spans[0].lo === undefined && m.spans[0].hi === undefined;
      frames.push({ type: "diff", table: m.table, parts, ...(whole ? { total: [total.rows, total.hex()] } : {}) });
      if (copyOut) frames.push({ type: "rows", table: m.table, copy: copyOut });
      frames.push({ type: "rows_end", table: m.table });
    },
    async next() {
      const message = frames.shift();
      assert.ok(message, "the client waits for a frame the server never sends");
      return { message, bytes: 0 };
    },
    run: async (work) => work(),
    progress() {},
  };
  const done = await repair(replica, link, { resume: "0/10", tables: [table.name], visibility: { xmin: 1, xmax: 1, xip: [], until: "0/10" }, logId: "log" });
  assert.deepEqual(done.refetch, []);
  const rows = replica.query("SELECT id, v FROM t ORDER BY id").map((r) => [Number(r.id), r.v]);
  assert.deepEqual(rows, keys.map((k) => [k, server.get(k)]));
  assert.ok(largest > 4096 || checks > done.rounds, `checks ${checks}, rounds ${done.rounds}`);
  assert.ok(done.rowsReceived < 30 * Math.ceil(ROWS / 97), `received ${done.rowsReceived} rows`);
  assert.equal(replica.state().lsn, "0/10");
  assert.equal(replica.state().logId, "log");
});
