// Bulk work on the replica (snapshot chunks, large applied batches) sets
// the capture triggers aside and must put them back, committed or not,
// without silencing the application's own triggers.
import { test } from "node:test";
import assert from "node:assert/strict";
import { memoryReplica, todos } from "./fixture.mjs";

async function replica() {
  const r = await memoryReplica();
  r.applySchema([todos]);
  r.applyTransactions([{ lsn: "0/1", xid: 1, commit_time_us: 0, changes: [] }], null);
  return r;
}

/** One server transaction inserting ids first..first+count-1 (enough for the bulk path). */
function inserts(lsn, first, count = 300) {
  const changes = [];
  for (let id = first; id < first + count; id++) changes.push({ table: "public.todos", op: "insert", new: { id: String(id), title: `t${id}`, done: "f" } });
  return { lsn, xid: 7, commit_time_us: 0, changes };
}

const captured = (r, id) => {
  r.execute(`INSERT INTO todos VALUES (${id}, 'local', 0)`, undefined, `tx-${id}`);
  return r.query("SELECT count(*) AS n FROM _pgrelay_outbox WHERE new_row LIKE ?", [`%"id":"${id}"%`])[0].n;
};

test("bulk work sets capture aside and puts it back, committed or rolled back", async () => {
  const r = await replica();
  r.applyTransactions([inserts("0/10", 1)], null);
  assert.equal(r.hasUnsent(), false, "server rows are not captured");
  assert.equal(captured(r, 10_001), 1, "a local write after the batch is captured");

  const bad = inserts("0/20", 1000);
  bad.changes.push({ table: "public.todos", op: "insert", new: { id: "not a number" } });
  assert.throws(() => r.applyTransactions([bad], null));
  assert.equal(r.query("SELECT count(*) AS n FROM todos WHERE id >= 1000 AND id < 2000")[0].n, 0, "the failed batch left nothing");
  assert.equal(captured(r, 10_002), 1, "capture works after a rolled-back batch");

  r.beginSnapshot(["public.todos"], false);
  r.snapshotBatch(() => {
    r.loadSnapshot("public.todos", new TextEncoder().encode("1\ta\tt\n2\tb\tf\n"));
    r.loadSnapshot("public.todos", new TextEncoder().encode("3\tc\tt\n"));
  });
  r.finishSnapshot("0/30", false, ["public.todos"], { xmin: 1, xmax: 2, xip: [], until: "0/30" });
  assert.deepEqual(r.outboxCounts(), { pending: 2, sent: 0, applied: 0, rejected: 0 }, "snapshot rows are not captured");
  assert.equal(captured(r, 10_003), 1, "capture works after a snapshot");
  assert.equal(r.query("SELECT count(*) AS n FROM sqlite_schema WHERE type = 'trigger'")[0].n, 3, "the capture triggers are all there");
});

test("the application's own triggers still run for bulk-applied and snapshot rows", async () => {
  const r = await replica();
  r.conn.execBatch("CREATE TABLE audit (id INTEGER); CREATE TRIGGER app_audit AFTER INSERT ON todos BEGIN INSERT INTO audit VALUES (NEW.id); END;");
  r.applyTransactions([inserts("0/10", 1)], null);
  assert.equal(r.query("SELECT count(*) AS n FROM audit")[0].n, 300);
  assert.equal(r.hasUnsent(), false, "server rows are not captured");
  r.beginSnapshot(["public.todos"], false);
  r.loadSnapshot("public.todos", new TextEncoder().encode("5000\ta\tt\n"));
  r.finishSnapshot("0/30", false, ["public.todos"], { xmin: 1, xmax: 2, xip: [], until: "0/30" });
  assert.equal(r.query("SELECT count(*) AS n FROM audit WHERE id = 5000")[0].n, 1);
  assert.equal(r.hasUnsent(), false);
  assert.equal(captured(r, 10_001), 1);
});

test("applied values keep their types: integers of every size, partial rows", async () => {
  const r = await replica();
  const ids = ["42", "-7", "123456789012345", "1234567890123456", "9223372036854775807", "-9223372036854775808"];
  const changes = ids.map((id) => ({ table: "public.todos", op: "insert", new: { id, title: "x", done: "t" } }));
  changes.push({ table: "public.todos", op: "insert", new: { id: "99", title: null } });
  r.applyTransactions([{ lsn: "0/10", xid: 8, commit_time_us: 0, changes }], null);
  const rows = r.query("SELECT CAST(id AS TEXT) AS id, typeof(id) AS t, done, title FROM todos ORDER BY todos.id");
  assert.deepEqual(rows.filter((x) => x.id !== "99").map((x) => [x.id, x.t, x.done]), [...ids].sort((a, b) => (BigInt(a) < BigInt(b) ? -1 : 1)).map((id) => [id, "integer", 1]));
  assert.deepEqual({ ...rows.find((x) => x.id === "99") }, { id: "99", t: "integer", done: null, title: null });
  assert.throws(() => r.applyTransactions([{ lsn: "0/20", xid: 9, commit_time_us: 0, changes: [{ table: "public.todos", op: "insert", new: { id: "9223372036854775808" } }] }], null), /out of 64-bit range/);
});

test("a snapshot chunk loads many rows a statement, escapes and all; a bad row is named", async () => {
  const r = await replica();
  r.beginSnapshot(["public.todos"], true);
  // 100 rows: three statements of 32 rows, then 4 one by one; id 5 twice.
  const lines = [];
  for (let id = 1; id <= 99; id++) lines.push(`${id}\t${id === 40 ? "tab\\there \\\\ \\\\N" : `t${id}`}\t${id % 2 ? "t" : "f"}`);
  lines.push("5\tlast wins\t\\N");
  assert.equal(r.loadSnapshot("public.todos", new TextEncoder().encode(lines.join("\n") + "\n")), 100);
  assert.equal(r.query("SELECT count(*) AS n FROM todos")[0].n, 99);
  assert.deepEqual({ ...r.query("SELECT title, done FROM todos WHERE id = 5")[0] }, { title: "last wins", done: null });
  assert.equal(r.query("SELECT title FROM todos WHERE id = 40")[0].title, "tab\there \\ \\N");
  assert.equal(r.query("SELECT done FROM todos WHERE id = 33")[0].done, 1);
  const bad = lines.slice(0, 80).map((l, i) => (i === 69 ? l.replace(/^70/, "7x") : l));
  assert.throws(() => r.loadSnapshot("public.todos", new TextEncoder().encode(bad.join("\n") + "\n")), /row 70, column 1: integer value/);
});
