// Bad conditions the browser can put a replica in: the storage quota runs
// out on OPFS and on IndexedDB (Chromium's quota lowered through the
// DevTools protocol), OPFS is
// missing (the worker's OPFS entry point removed before it starts), and the
// server is down when the page connects. The OPFS test serves a copy of
// dist/ from a second origin: with the worker's script routed through
// Playwright, the worker's WebSocket did not connect in our runs.
import { test } from "node:test";
import assert from "node:assert/strict";
import { cp, mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { browser, countTodos as count, db, freePort, freshDatabase, here, openPage, packageRoot, pages, server, startPages, startServer, useWorld, waitFor } from "./harness.mjs";

useWorld(`CREATE TABLE todos (id bigint PRIMARY KEY, title text NOT NULL, done boolean NOT NULL DEFAULT false);
                INSERT INTO todos (id, title) SELECT g, 'server ' || g FROM generate_series(1, 50) g;`, ["--tables", "public.todos"]);

const integrity = async (page) => Object.values((await page.evaluate(async () => (await window.db.query("PRAGMA integrity_check"))[0])))[0];

test("storage quota used up: a storage_full error, the replica stays whole, syncing resumes when space is back", async () => {
  const context = await browser.newContext();
  const page = await openPage(context, pages.origin);
  const cdp = await context.newCDPSession(page);
  await page.evaluate((url) => window.open_({ url, name: "quota", backoffBaseMs: 100, backoffCapMs: 500 }), server.url);
  assert.equal(await page.evaluate(() => window.db.storage), "opfs");
  await waitFor("caught up", () => page.evaluate(() => window.db.status.caughtUp));
  assert.equal(await count(page), 50);

  // The origin's quota drops to almost nothing, then the server sends ~10 MB.
  await cdp.send("Storage.overrideQuotaForOrigin", { origin: pages.origin, quotaSize: 1 });
  await db.sql(`INSERT INTO todos (id, title) SELECT g, repeat('x', 1000) FROM generate_series(10001, 20000) g`);
  const status = await waitFor("a storage_full error", async () => {
    const s = await page.evaluate(() => window.db.status);
    return s.lastError?.code === "storage_full" ? s : null;
  });
  assert.match(status.lastError.message, /storage quota for this site is used up/);
  assert.notEqual(status.connection, "failed", "the page keeps trying");
  assert.ok(await page.evaluate(() => window.events.some((e) => e.name === "error" && e.code === "storage_full")), "an error event too");
  // Nothing of the transaction that did not fit; the file is sound.
  assert.equal(await count(page), 50);
  assert.equal(await integrity(page), "ok");

  // Space is back: the next attempt applies the transaction, once.
  await cdp.send("Storage.overrideQuotaForOrigin", { origin: pages.origin });
  await waitFor("the big transaction applied", async () => (await count(page)) === 10_050, 60_000);
  await waitFor("connected and caught up", () => page.evaluate(() => window.db.status.connection === "connected" && window.db.status.caughtUp));
  assert.equal(await count(page, "id > 10000 AND length(title) = 1000"), 10_000);
  assert.equal(await integrity(page), "ok");
  await db.sql("DELETE FROM todos WHERE id > 10000");
  await waitFor("the delete", async () => (await count(page)) === 50);
  await context.close();
});

test("IndexedDB quota used up: a storage_full error, the saved replica stays whole, saving resumes when space is back", async () => {
  const context = await browser.newContext();
  const page = await openPage(context, pages.origin);
  const cdp = await context.newCDPSession(page);
  await page.evaluate((url) => window.open_({ url, name: "idb-quota", storage: "indexeddb", backoffBaseMs: 100, backoffCapMs: 500 }), server.url);
  assert.equal(await page.evaluate(() => window.db.storage), "indexeddb");
  await waitFor("caught up", () => page.evaluate(() => window.db.status.caughtUp));
  assert.equal(await count(page), 50);

  // The quota drops to almost nothing; the server sends ~10 MB the image cannot hold.
  await cdp.send("Storage.overrideQuotaForOrigin", { origin: pages.origin, quotaSize: 1 });
  await db.sql(`INSERT INTO todos (id, title) SELECT g, repeat('x', 1000) FROM generate_series(10001, 20000) g`);
  const status = await waitFor("a storage_full error", async () => {
    const s = await page.evaluate(() => window.db.status);
    return s.lastError?.code === "storage_full" ? s : null;
  });
  assert.match(status.lastError.message, /IndexedDB/);
  assert.ok(await page.evaluate(() => window.events.some((e) => e.name === "error" && e.code === "storage_full")), "an error event too");
  assert.equal(status.connection, "connected", "syncing goes on in memory");
  // A local write while the quota is used up: made (not an error), and it reaches PostgreSQL.
  await page.evaluate(() => window.db.execute("INSERT INTO todos (id, title) VALUES (30001, 'while full')"));
  await waitFor("the local write in PostgreSQL", async () => (await db.sql("SELECT count(*)::int AS n FROM todos WHERE id = 30001")).rows[0].n === 1, 60_000);

  // Space is back: the image is saved with everything.
  await cdp.send("Storage.overrideQuotaForOrigin", { origin: pages.origin });
  await waitFor("the big transaction applied", async () => (await count(page)) === 10_051, 60_000);
  await page.evaluate(() => window.db.execute("INSERT INTO todos (id, title) VALUES (30002, 'after')", [], { waitForServer: true }));
  await waitFor("the storage error cleared", () => page.evaluate(() => window.db.status.lastError === null));
  await page.close();
  const again = await openPage(context, pages.origin);
  await again.evaluate((url) => window.open_({ url, name: "idb-quota", storage: "indexeddb", offline: true }), server.url);
  assert.equal(await count(again), 10_052, "the saved image holds every row, the local writes included");
  assert.equal((await db.sql("SELECT count(*)::int AS n FROM todos WHERE id IN (30001, 30002)")).rows[0].n, 2);
  await db.sql("DELETE FROM todos WHERE id > 10000");
  await context.close();
});

test("OPFS unavailable: the replica falls back to IndexedDB by itself and persists there", async () => {
  // The worker starts without OPFS (as in browsers or modes that lack it):
  // the same pages, from a copy of dist/ whose worker loses OPFS first.
  const dist = await mkdtemp(join(tmpdir(), "pgrelay-no-opfs-"));
  await cp(join(packageRoot, "dist"), dist, { recursive: true });
  const worker = await readFile(join(dist, "worker.js"), "utf8");
  await writeFile(join(dist, "worker.js"), `delete StorageManager.prototype.getDirectory;\n${worker}`);
  const noOpfs = await startPages({ "/dist/": dist, "/": join(here, "pages") });
  const context = await browser.newContext();
  let page = await openPage(context, noOpfs.origin);
  const opened = await page.evaluate((url) => window.open_({ url, name: "no-opfs" }), server.url);
  assert.equal(opened.storage, "indexeddb", "no storage option given: OPFS was asked for and is missing");
  await waitFor("caught up", () => page.evaluate(() => window.db.status.caughtUp));
  assert.equal(await count(page), 50);
  await page.evaluate(() => window.db.execute("INSERT INTO todos (id, title) VALUES (5001, 'kept in IndexedDB')", [], { waitForServer: true }));
  assert.equal((await db.sql("SELECT count(*)::int AS n FROM todos WHERE id = 5001")).rows[0].n, 1);
  await page.close();

  page = await openPage(context, noOpfs.origin);
  const again = await page.evaluate((url) => window.open_({ url, name: "no-opfs", offline: true }), server.url);
  assert.equal(again.storage, "indexeddb");
  assert.equal(again.clientId, opened.clientId, "the same replica, loaded from IndexedDB");
  assert.equal(await count(page), 51);
  await db.sql("DELETE FROM todos WHERE id = 5001");
  await context.close();
  await noOpfs.close();
  await rm(dist, { recursive: true });
});

test("server down at connect: the status says so, retries back off, and the page syncs once the server is up", async () => {
  const other = await freshDatabase();
  let late;
  try {
    await other.sql(`CREATE TABLE todos (id bigint PRIMARY KEY, title text NOT NULL, done boolean NOT NULL DEFAULT false);
                     INSERT INTO todos (id, title) SELECT g, 'late ' || g FROM generate_series(1, 30) g;`);
    const port = await freePort();
    const context = await browser.newContext();
    const page = await openPage(context, pages.origin);
    await page.evaluate(() => (window.delays = []));
    await page.evaluate((url) => window.open_({ url, name: "server-down", backoffBaseMs: 100, backoffCapMs: 1000 }), `ws://127.0.0.1:${port}`);
    await page.evaluate(() => window.db.on("status", (s) => s.retryInMs !== null && s.connection === "disconnected" && window.delays.push(s.retryInMs)));
    const status = await waitFor("a retry planned after the failed connection", async () => {
      const s = await page.evaluate(() => window.db.status);
      return s.connection === "disconnected" && s.lastError && s.retryInMs !== null ? s : null;
    });
    assert.equal(status.lastError.code, "closed");
    assert.match(status.lastError.message, new RegExp(`connecting to ws://127.0.0.1:${port}`));
    await waitFor("four retries", () => page.evaluate(() => window.delays.length >= 4));
    const delays = await page.evaluate(() => window.delays);
    assert.ok(delays.every((d) => d >= 0 && d <= 1000), `delays within the cap: ${delays}`);

    late = await startServer(other.url, ["--tables", "public.todos"], port);
    await waitFor("caught up once the server is up", () => page.evaluate(() => window.db.status.connection === "connected" && window.db.status.caughtUp));
    assert.equal(await count(page), 30);
    assert.equal(await page.evaluate(() => window.db.status.lastError), null, "the error is cleared once connected");
    await context.close();
  } finally {
    await late?.kill();
    await other.drop();
  }
});
