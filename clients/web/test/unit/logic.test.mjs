// Unit tests of the package's own logic in Node, with a real SQLite
// (the same WebAssembly build, in memory).
import { test } from "node:test";
import assert from "node:assert/strict";
import { backoff } from "../../build/node/backoff.js";
import { forEachRow } from "../../build/node/copy-text.js";
import { formatLsn, parseLsn, sees, parseChunk, decodeFrame } from "../../build/node/protocol.js";
import { toSqlite, pgText } from "../../build/node/values.js";
import { tablesRead } from "../../build/node/watch.js";
import { memoryReplica, todos } from "./fixture.mjs";

test("LSNs compare as 64-bit numbers and print as PostgreSQL does", () => {
  assert.ok(parseLsn("16/B374D848") > parseLsn("9/FFFFFFFF"));
  assert.equal(formatLsn(parseLsn("16/B374D848")), "16/B374D848");
  assert.throws(() => parseLsn("16-B3"));
});

test("snapshot visibility: committed before, not in progress, across an epoch", () => {
  const v = { xmin: 10, xmax: 20, xip: [10, 14], until: "0/0" };
  assert.deepEqual([9, 10, 11, 14, 19, 20, 25].map((x) => sees(v, x)), [true, false, true, false, true, false, false]);
  const base = 2 ** 32;
  const w = { xmin: base - 10, xmax: base + 5, xip: [base - 3], until: "0/0" };
  assert.equal(sees(w, 2 ** 32 - 1 - 20), true);
  assert.equal(sees(w, 2 ** 32 - 1 - 2), false);
  assert.equal(sees(w, 3), true);
  assert.equal(sees(w, 6), false);
});

test("chunk frames and bad text frames", () => {
  const frame = new Uint8Array([1, 0, 3, 0, 1, 0x11, 0x70, 9, 9]);
  assert.deepEqual({ ...parseChunk(frame), payload: [...parseChunk(frame).payload] }, { table: 3, seq: 70000, payload: [9, 9] });
  assert.equal(parseChunk(new Uint8Array([0x7b])), null);
  assert.throws(() => decodeFrame("{not json"), /not JSON/);
  assert.throws(() => decodeFrame('{"type":"tx","lsn":"x","xid":1,"changes":[]}'), /not an LSN/);
});

test("backoff has full jitter under an exponential cap", () => {
  assert.equal(backoff(3, 100, 30_000, () => 0.999999), 799);
  assert.equal(backoff(3, 100, 30_000, () => 0), 0);
  assert.equal(backoff(40, 100, 30_000, () => 0.5), 15_000);
});

test("COPY text decodes as PostgreSQL writes it", () => {
  const rows = [];
  forEachRow(new TextEncoder().encode("1\thello\\tworld\t\\N\n2\t\\\\x0102\ta\\nb\n\\101\\x42\\q\n"), (v) => rows.push([...v]));
  assert.deepEqual(rows, [["1", "hello\tworld", null], ["2", "\\x0102", "a\nb"], ["ABq"]]);
  assert.throws(() => forEachRow(new TextEncoder().encode("1\t2"), () => {}));
});

test("values map like the Rust client's; 64-bit integers keep every digit", () => {
  assert.equal(toSqlite("integer", "42"), 42);
  assert.equal(toSqlite("integer", "9223372036854775807"), 9223372036854775807n);
  assert.throws(() => toSqlite("integer", "1.5"));
  assert.equal(toSqlite("float", "NaN"), "NaN");
  assert.equal(toSqlite("bool", "t"), 1);
  assert.deepEqual([...toSqlite("bytes", "\\x00ff")], [0, 255]);
  assert.equal(toSqlite("numeric", "1.10"), "1.10");
  assert.equal(pgText("bool", "1"), "t");
  assert.equal(pgText("integer", "9223372036854775807"), "9223372036854775807");
});

test("a watch knows which tables a query reads", () => {
  assert.deepEqual([...tablesRead("SELECT * FROM todos JOIN lists ON true", ["public.todos", "public.lists", "public.todo"])].sort(), ["lists", "todos"]);
});

async function replica() {
  return memoryReplica();
}

test("server transactions apply atomically with their LSN and are not applied twice", async () => {
  const r = await replica();
  r.applySchema([todos]);
  const tx = { lsn: "0/10", xid: 5, commit_time_us: 0, changes: [{ table: "public.todos", op: "insert", new: { id: "1", title: "a", done: "f" } }] };
  r.applyTransactions([tx], null);
  r.applyTransactions([tx], null);
  assert.equal(r.state().lsn, "0/10");
  assert.equal(r.query("SELECT count(*) AS n FROM todos")[0].n, 1);
  const bad = { lsn: "0/20", xid: 6, commit_time_us: 0, changes: [{ table: "public.todos", op: "update", new: { id: "1", title: "b" } }, { table: "public.todos", op: "insert", new: { id: "x" } }] };
  assert.throws(() => r.applyTransactions([bad], null));
  assert.equal(r.state().lsn, "0/10", "a failed transaction leaves neither rows nor position");
  assert.equal(r.query("SELECT title FROM todos")[0].title, "a");
  assert.equal(r.hasUnsent(), false, "server changes are not captured as local writes");
});

test("local writes go to the outbox in order; a rejection rolls the row back", async () => {
  const r = await replica();
  r.applySchema([todos]);
  r.applyTransactions([{ lsn: "0/10", xid: 5, commit_time_us: 0, changes: [{ table: "public.todos", op: "insert", new: { id: "1", title: "a", done: "f" } }] }], null);
  r.execute("UPDATE todos SET title = 'mine', done = 1 WHERE id = 1", undefined, "tx-1");
  r.execute("INSERT INTO todos VALUES (9223372036854775807, 'big', 0)", undefined, "tx-2");
  assert.equal(r.execute("INSERT INTO todos VALUES (3, 'again', 0)", undefined, "tx-2").duplicate, true, "a resent request is not run twice");
  const taken = r.takeBatch(1000);
  assert.equal(taken.frames.length, 1);
  const batch = JSON.parse(taken.frames[0]);
  assert.equal(batch.type, "write");
  assert.equal(batch.batch_id, taken.batchId);
  assert.deepEqual(taken.txIds, ["tx-1", "tx-2"]);
  assert.deepEqual(batch.transactions.map((t) => t.id), ["tx-1", "tx-2"]);
  assert.deepEqual(batch.transactions[0].changes[0].new, { title: "mine", done: "t" }, "only changed columns, as PostgreSQL input");
  assert.equal(batch.transactions[1].changes[0].new.id, "9223372036854775807");
  const outcomes = r.recordResults({
    results: [
      { id: "tx-1", status: "rejected", code: "conflict", reason: "changed", rows: [{ table: "public.todos", key: { id: "1" }, row: { id: "1", title: "theirs", done: "f" } }] },
      { id: "tx-2", status: "applied" },
    ],
  });
  assert.deepEqual(outcomes.map((o) => o.status), ["rejected", "applied"]);
  assert.equal(r.query("SELECT title FROM todos WHERE id = 1")[0].title, "theirs");
  assert.deepEqual(r.outboxCounts(), { pending: 0, sent: 0, applied: 1, rejected: 1 });
  assert.equal(r.takeBatch(1000).frames.length, 0, "a rejected write is never sent again");
});

test("a local transaction the protocol cannot carry is refused at execute and rolled back", async () => {
  const r = await replica();
  r.applySchema([todos]);
  r.applyTransactions([{ lsn: "0/10", xid: 5, commit_time_us: 0, changes: [] }], null);
  assert.throws(
    () => r.execute("WITH RECURSIVE g(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM g WHERE n < 10001) INSERT INTO todos SELECT n, 't', 0 FROM g", undefined, "tx-many"),
    (e) => e.name === "TooLargeError" && e.code === "too_large" && /10001 changes/.test(e.message),
  );
  assert.equal(r.query("SELECT count(*) AS n FROM todos")[0].n, 0, "the local transaction was rolled back");
  assert.equal(r.hasUnsent(), false, "nothing of it is in the outbox");
  // A transaction larger than one frame but within the limits is taken, in parts.
  r.execute("WITH RECURSIVE g(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM g WHERE n < 3000) INSERT INTO todos SELECT n, printf('%.600c', 'x'), 0 FROM g", undefined, "tx-wide");
  const taken = r.takeBatch(1000);
  assert.ok(taken.frames.length > 1, `${taken.frames.length} frames`);
  assert.deepEqual(taken.frames.map((f) => JSON.parse(f).type), taken.frames.map(() => "write_part"));
  assert.deepEqual(taken.txIds, ["tx-wide"]);
});

test("a change for a table the replica does not know is left out and the table asked for", async () => {
  const r = await replica();
  r.applySchema([todos]);
  r.applyTransactions([{ lsn: "0/10", xid: 5, commit_time_us: 0, changes: [] }], null);
  const applied = r.applyTransactions(
    [{ lsn: "0/20", xid: 6, commit_time_us: 0, changes: [{ table: "public.fresh", op: "insert", new: { id: "1" } }, { table: "public.todos", op: "insert", new: { id: "2", title: "b", done: "f" } }] }],
    null,
  );
  assert.deepEqual(applied.unknown, ["public.fresh"]);
  assert.equal(r.state().lsn, "0/20", "the position moves on");
  assert.deepEqual(r.state().resync, ["public.fresh"], "the next hello asks for its snapshot");
  assert.equal(r.query("SELECT count(*) AS n FROM todos")[0].n, 1, "the rest of the transaction is applied");
});

test("a schema the replica cannot hold is kept out with the reason; the rest is applied", async () => {
  const r = await replica();
  const col = (name) => ({ name, pg_type: "text", type_oid: 25, kind: "text" });
  const cased = { name: "public.people", columns: [{ name: "id", pg_type: "bigint", type_oid: 20, kind: "integer" }, col("Name"), col("name")], primary_key: ["id"], version: 1 };
  const dotted = { name: "public.x.y", columns: [{ name: "id", pg_type: "bigint", type_oid: 20, kind: "integer" }], primary_key: ["id"], version: 1 };
  const schemed = { name: "x.y", columns: [{ name: "id", pg_type: "bigint", type_oid: 20, kind: "integer" }], primary_key: ["id"], version: 1 };
  const { refused } = r.applySchema([todos, cased, dotted, schemed]);
  assert.deepEqual(refused.map((x) => x.table).sort(), ["public.people", "public.x.y", "x.y"]);
  assert.match(refused.find((x) => x.table === "public.people").reason, /"Name" and "name" differ only in case/);
  assert.match(refused.find((x) => x.table === "x.y").reason, /public\.x\.y would both be the replica's table "x\.y"/);
  const created = r.query("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE '\\_pgrelay%' ESCAPE '\\' AND name NOT LIKE 'sqlite%'").map((x) => x.name);
  assert.deepEqual(created, ["todos"], "only the table it can hold was created");
  // Its changes and snapshot rows are passed over, the position still moves.
  r.beginSnapshot(["public.people"], true);
  assert.equal(r.loadSnapshot("public.people", new TextEncoder().encode("1\ta\tb\n2\tc\td\n")), 2);
  r.finishSnapshot("0/10", true, ["public.people"], { xmin: 1, xmax: 2, xip: [], until: "0/10" });
  const applied = r.applyTransactions([{ lsn: "0/20", xid: 6, commit_time_us: 0, changes: [{ table: "public.people", op: "insert", new: { id: "3", Name: "a", name: "b" } }] }], null);
  assert.equal(applied.lsn, "0/20");
  assert.deepEqual(applied.unknown, []);
});

test("a reset keeps unsent writes and replays them over a fresh snapshot", async () => {
  const r = await replica();
  r.applySchema([todos]);
  r.applyTransactions([{ lsn: "0/10", xid: 5, commit_time_us: 0, changes: [] }], null);
  r.execute("INSERT INTO todos VALUES (5, 'local', 0)", undefined, "tx-9");
  r.reset();
  assert.equal(r.state().lsn, null);
  r.beginSnapshot(["public.todos"], true);
  r.loadSnapshot("public.todos", new TextEncoder().encode("1\tfrom snapshot\tt\n"));
  r.finishSnapshot("0/30", true, ["public.todos"], { xmin: 1, xmax: 2, xip: [], until: "0/30" });
  assert.deepEqual(r.query("SELECT id, title FROM todos ORDER BY id").map((x) => [x.id, x.title]), [[1, "from snapshot"], [5, "local"]]);
  assert.equal(r.state().lsn, "0/30");
  assert.equal(r.hasUnsent(), true);
});

test("a transaction a snapshot missed is applied to its tables though the position passed it", async () => {
  const r = await replica();
  r.applySchema([todos]);
  const insert = (lsn, xid, id) => ({ lsn, xid, commit_time_us: 0, changes: [{ table: "public.todos", op: "insert", new: { id: String(id), title: "t", done: "f" } }] });
  r.beginSnapshot(["public.todos"], true);
  r.loadSnapshot("public.todos", new TextEncoder().encode("1\ta\tf\n"));
  r.finishSnapshot("0/64", true, ["public.todos"], { xmin: 1, xmax: 1, xip: [], until: "0/64" });
  // 2 arrives live (xid 50): the position passes it.
  r.applyTransactions([insert("0/C8", 50, 2)], null);
  // The table is fetched again by a snapshot that counts xid 50 in progress.
  r.beginSnapshot(["public.todos"], false);
  r.loadSnapshot("public.todos", new TextEncoder().encode("1\ta\tf\n"));
  r.finishSnapshot("0/C7", false, ["public.todos"], { xmin: 40, xmax: 60, xip: [50], until: "0/12C" });
  assert.deepEqual(r.query("SELECT id FROM todos ORDER BY id").map((x) => Number(x.id)), [1]);
  // Streamed again from below it, after one the snapshot saw (xid 45).
  const applied = r.applyTransactions([insert("0/96", 45, 3), insert("0/C8", 50, 2)], null);
  assert.deepEqual(r.query("SELECT id FROM todos ORDER BY id").map((x) => Number(x.id)), [1, 2]);
  assert.equal(applied.lsn, "0/C8");
});
