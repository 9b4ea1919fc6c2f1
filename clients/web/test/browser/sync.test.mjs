// Two pages hydrate a large table, then follow a writer; both end equal
// to PostgreSQL, checked with SQL on both sides.
import { test } from "node:test";
import assert from "node:assert/strict";
import pg from "pg";
import { browser, db, openPage, pages, server, useWorld, waitFor } from "./harness.mjs";

const ROWS = Number(process.env.HYDRATE_ROWS ?? 100_000);

useWorld(async (database) => {
  await database.sql(`CREATE TABLE items (id bigint PRIMARY KEY, title text NOT NULL, n integer, done boolean, price numeric(12,2), big bigint)`);
  // Empty, and read after items (the server sends tables in name order):
  // the kill test holds a lock on it so the snapshot cannot end before
  // the tab is closed.
  await database.sql(`CREATE TABLE zz_gate (id bigint PRIMARY KEY)`);
  await database.sql(`INSERT INTO items SELECT g, 'item ' || g || E' tab\\there', g % 1000, g % 2 = 0, g / 100.0, 9007199254740993 + g FROM generate_series(1, $1) g`, [ROWS]);
});

/** PostgreSQL's rows in the form the replica gives them back. */
async function postgresRows() {
  const { rows } = await db.sql(`SELECT id::text, title, n, done, price::text, big::text FROM items ORDER BY items.id`);
  return rows.map((r) => [r.id, r.title, r.n, r.done ? 1 : 0, r.price, r.big]);
}

async function replicaRows(page) {
  return await page.evaluate(async () => {
    const rows = await window.db.query("SELECT id, title, n, done, price, big FROM items ORDER BY id");
    return rows.map((r) => [String(r.id), r.title, r.n, r.done, r.price, String(r.big)]);
  });
}

test("two pages hydrate and follow a writer; both equal PostgreSQL", async () => {
  const contexts = [await browser.newContext(), await browser.newContext()];
  const tabs = [];
  for (const [i, context] of contexts.entries()) {
    const page = await openPage(context, pages.origin);
    await page.evaluate((url) => window.open_({ url, name: "sync" }), server.url);
    tabs.push(page);
  }
  for (const page of tabs) {
    await waitFor("hydration", () => page.evaluate(() => window.db.status.caughtUp), 120_000, 200);
    const count = await page.evaluate(async () => (await window.db.query("SELECT count(*) AS n FROM items"))[0].n);
    assert.equal(count, ROWS);
    const storage = await page.evaluate(() => window.db.storage);
    assert.equal(storage, "opfs");
  }
  // A writer: inserts, updates, deletes, in many transactions.
  for (let i = 0; i < 50; i++) {
    await db.sql(`INSERT INTO items VALUES ($1::bigint, 'new ' || $1::bigint, 1, true, 1.5, 9223372036854775807)`, [ROWS + 1 + i]);
    await db.sql(`UPDATE items SET title = 'changed ' || id, price = price + 1 WHERE id % 997 = $1`, [i]);
    await db.sql(`DELETE FROM items WHERE id = $1`, [i * 13 + 1]);
  }
  const { rows: head } = await db.sql(`SELECT pg_current_wal_lsn()::text AS lsn`);
  const expected = await postgresRows();
  for (const page of tabs) {
    await waitFor("the writer's changes", async () => {
      const got = await replicaRows(page);
      if (got.length === expected.length && JSON.stringify(got) === JSON.stringify(expected)) return true;
      const i = got.findIndex((r, k) => JSON.stringify(r) !== JSON.stringify(expected[k]));
      const status = await page.evaluate(() => window.db.status);
      return `${got.length} rows vs ${expected.length}; first difference at ${i}: ${JSON.stringify(got[i])} vs ${JSON.stringify(expected[i])}; status ${JSON.stringify(status)}`.length < 0;
    }, 20_000, 250).catch(async (e) => {
      const got = await replicaRows(page);
      const i = got.findIndex((r, k) => JSON.stringify(r) !== JSON.stringify(expected[k]));
      const status = await page.evaluate(() => window.db.status);
      throw new Error(`${e.message}: ${got.length} rows vs ${expected.length}; first difference at ${i}: ${JSON.stringify(got[i])} vs ${JSON.stringify(expected[i])}; status ${JSON.stringify(status)}`);
    });
  }
  assert.ok(head.length === 1);
  for (const c of contexts) await c.close();
});

test("a tab killed mid-hydration leaves a whole replica that hydrates again from the start", async () => {
  const context = await browser.newContext();
  // The snapshot's read of zz_gate waits on this lock: however fast items
  // loads, the hydration is still open when the tab is closed.
  const gate = new pg.Client({ connectionString: db.url });
  await gate.connect();
  await gate.query("BEGIN; LOCK TABLE zz_gate IN ACCESS EXCLUSIVE MODE");
  let page = await openPage(context, pages.origin);
  await page.evaluate((url) => window.open_({ url, name: "killed-hydrating" }), server.url);
  // While loading, the file has a rollback journal (see worker.ts); killed
  // inside a chunk transaction, the journal is hot (or, when items was
  // all loaded first, the snapshot is still not marked done).
  await waitFor("rows loading", () => page.evaluate(() => (window.db.status.hydrating?.rows ?? 0) > 0), 60_000, 5);
  const crashed = page.evaluate(() => null).catch(() => null);
  await page.close({ runBeforeUnload: false });
  await crashed;
  await gate.query("ROLLBACK");
  await gate.end();

  page = await openPage(context, pages.origin);
  const warnings = [];
  page.on("console", (m) => m.type() === "warning" && warnings.push(m.text()));
  await page.evaluate((url) => window.open_({ url, name: "killed-hydrating" }), server.url);
  const check = await page.evaluate(async () => (await window.db.query("PRAGMA integrity_check"))[0]);
  assert.deepEqual(Object.values(check), ["ok"]);
  await waitFor("hydration", () => page.evaluate(() => window.db.status.caughtUp), 120_000, 200);
  // The snapshot started over (the killed one was never marked done) and
  // ended with every row, once.
  const hydrated = await page.evaluate(() => window.events.filter((e) => e.name === "hydrated"));
  assert.equal(hydrated.length, 1, "hydrated again after the kill");
  assert.equal(hydrated[0].full, true);
  assert.equal(hydrated[0].rows, ROWS);
  assert.deepEqual(await replicaRows(page), await postgresRows());
  assert.deepEqual(warnings.filter((w) => /zstd/.test(w)), [], "chunks decompressed by zstd in WebAssembly");
  // Back to the WAL once the snapshot committed.
  const mode = await page.evaluate(async () => Object.values((await window.db.query("PRAGMA journal_mode"))[0])[0]);
  assert.equal(mode, "wal");
  await context.close();
});
