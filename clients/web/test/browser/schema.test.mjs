// Bad input: a schema the replica cannot hold (column names that differ
// only in case; two PostgreSQL tables that would be one SQLite table,
// as SQLite's names ignore case).
// The page reports each clearly, keeps them out, and syncs the rest; the
// replica is not left half-written.
import { test } from "node:test";
import assert from "node:assert/strict";
import { browser, db, openPage, pages, server, useWorld, waitFor } from "./harness.mjs";

useWorld(`
    CREATE TABLE fine (id bigint PRIMARY KEY, v text);
    INSERT INTO fine SELECT g, 'v' || g FROM generate_series(1, 100) g;
    CREATE TABLE people (id bigint PRIMARY KEY, "Name" text, name text);
    INSERT INTO people VALUES (1, 'A', 'a');
    CREATE TABLE items (id bigint PRIMARY KEY);
    CREATE TABLE "Items" (id bigint PRIMARY KEY);
    INSERT INTO items VALUES (1); INSERT INTO "Items" VALUES (2);`);

test("a schema the replica cannot hold is reported and kept out; the other tables sync", async () => {
  const context = await browser.newContext();
  const page = await openPage(context, pages.origin);
  await page.evaluate((url) => window.open_({ url, name: "unholdable" }), server.url);
  await waitFor("caught up", () => page.evaluate(() => window.db.status.caughtUp));
  const errors = await page.evaluate(() => window.events.filter((e) => e.name === "error"));
  const about = (table) => errors.find((e) => e.code === "schema_unsupported" && e.message.includes(`table ${table} is not synced`));
  assert.match(about("public.people")?.message ?? "", /columns "Name" and "name" differ only in case/);
  assert.match(about("public.items")?.message ?? "", /it and public\.Items would both be the replica's table/);
  assert.match(about("public.Items")?.message ?? "", /it and public\.items would both be the replica's table/);

  const tables = await page.evaluate(async () =>
    (await window.db.query("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE '\\_pgrelay%' ESCAPE '\\' AND name NOT LIKE 'sqlite%' ORDER BY name")).map((r) => r.name),
  );
  assert.deepEqual(tables, ["fine"], "nothing half-made of the tables it cannot hold");
  assert.equal(await page.evaluate(() => window.db.status.connection), "connected", "syncing goes on");

  // Changes to every table keep coming; the held one follows them.
  await db.sql(`INSERT INTO people VALUES (2, 'B', 'b'); INSERT INTO "Items" VALUES (3); INSERT INTO fine VALUES (101, 'live');`);
  await waitFor("the live row", async () => (await page.evaluate(async () => (await window.db.query("SELECT count(*) AS n FROM fine"))[0].n)) === 101);
  const lsn = await page.evaluate(() => window.db.status.lsn);
  const { rows } = await db.sql("SELECT pg_current_wal_lsn()::text AS now");
  assert.ok(lsn, `the position moved (${lsn}, PostgreSQL at ${rows[0].now})`);

  // A reload opens the same replica and carries on.
  await page.reload();
  await page.waitForFunction(() => window.pgrelay !== undefined);
  await page.evaluate((url) => window.open_({ url, name: "unholdable" }), server.url);
  await waitFor("caught up after the reload", () => page.evaluate(() => window.db.status.caughtUp));
  assert.equal(await page.evaluate(async () => (await window.db.query("SELECT count(*) AS n FROM fine"))[0].n), 101);
  await context.close();
});
