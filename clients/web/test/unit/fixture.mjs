// A table and an in-memory replica (real sqlite-wasm) shared by the unit tests.
import sqlite3InitModule from "@sqlite.org/sqlite-wasm";
import { Conn, Replica } from "../../build/node/replica/index.js";

export const todos = {
  name: "public.todos",
  columns: [
    { name: "id", pg_type: "bigint", type_oid: 20, kind: "integer" },
    { name: "title", pg_type: "text", type_oid: 25, kind: "text" },
    { name: "done", pg_type: "boolean", type_oid: 16, kind: "bool" },
  ],
  primary_key: ["id"],
  version: 1,
};

/** A replica in an in-memory SQLite database. */
export async function memoryReplica() {
  const sqlite3 = await sqlite3InitModule();
  return new Replica(new Conn(new sqlite3.oo1.DB(":memory:", "c"), sqlite3));
}
