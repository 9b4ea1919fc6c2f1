// Outbox entries across renames: a renamed table or column is told from a
// dropped one by PostgreSQL's OID and column number, like the Rust
// client's `replica/reshape.rs`.
import { test } from "node:test";
import assert from "node:assert/strict";
import { compare, reshapeRows } from "../../build/node/replica/reshape.js";

const table = (name, oid, columns) => ({
  name,
  oid,
  columns: columns.map(([c, n]) => ({ name: c, pg_type: "text", type_oid: 25, kind: "text", attnum: n })),
  primary_key: ["id"],
  version: 1,
});

test("a rename is told from a drop by the column number and the table's OID", () => {
  const known = new Map([["public.todos", table("public.todos", 7, [["id", 1], ["title", 2], ["note", 3]])]]);
  const reshape = compare(known, table("public.tasks", 7, [["id", 1], ["label", 2], ["extra", 4]]));
  assert.deepEqual(reshape, { renamedFrom: "public.todos", columns: [["title", "label"]], dropped: ["note"] });
  assert.deepEqual(compare(known, table("public.other", 8, [["id", 1]])), { renamedFrom: null, columns: [], dropped: [] });
});

test("rows take the new names and lose dropped columns they did not set", () => {
  const reshape = { renamedFrom: null, columns: [["title", "label"]], dropped: ["note"] };
  const next = { id: "2", title: "edit", note: "n" };
  const prev = { id: "2", title: "t", note: "n" };
  reshapeRows(reshape, next, prev);
  assert.deepEqual(next, { id: "2", label: "edit" });
  assert.deepEqual(prev, { id: "2", label: "t" });
  const set = { id: "3", note: "mine" };
  reshapeRows(reshape, set, { id: "3", note: "n" });
  assert.deepEqual(set, { id: "3", note: "mine" }, "the server refuses it with the reason");
});
