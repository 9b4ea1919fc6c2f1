// Storage and bad conditions: the IndexedDB fallback keeps the replica and
// the outbox across a reload; two tabs open one socket (counted with ss);
// a wrong URL gives a status with a clear error while the
// page keeps retrying; a tab killed inside a transaction leaves the
// replica and the outbox whole.
import { test } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { browser, countTodos as count, db, freePort, openPage, pages, server, useWorld, waitFor } from "./harness.mjs";

useWorld(`CREATE TABLE todos (id bigint PRIMARY KEY, title text NOT NULL, done boolean NOT NULL DEFAULT false);
                INSERT INTO todos (id, title) SELECT g, 'server ' || g FROM generate_series(1, 50) g;`, ["--tables", "public.todos"]);

test("IndexedDB storage: the replica and unsent writes survive a reload, then reach PostgreSQL once", async () => {
  const context = await browser.newContext();
  let page = await openPage(context, pages.origin);
  const opened = await page.evaluate((url) => window.open_({ url, name: "idb", storage: "indexeddb" }), server.url);
  assert.equal(opened.storage, "indexeddb");
  await waitFor("caught up", () => page.evaluate(() => window.db.status.caughtUp));
  assert.equal(await count(page), 50);
  await page.evaluate(() => window.db.setOffline(true));
  await page.evaluate(async () => {
    for (let i = 1; i <= 20; i++) await window.db.execute("INSERT INTO todos (id, title) VALUES (?, ?)", [1000 + i, `offline ${i}`]);
  });
  await page.close();

  // A new page, still offline: everything comes back from IndexedDB.
  page = await openPage(context, pages.origin);
  const again = await page.evaluate((url) => window.open_({ url, name: "idb", storage: "indexeddb", offline: true }), server.url);
  assert.equal(again.storage, "indexeddb");
  assert.equal(again.clientId, opened.clientId, "the same replica (its client id is stored in it)");
  assert.equal(await count(page), 70);
  assert.equal(await page.evaluate(() => window.db.status.outbox), 20);
  assert.equal((await db.sql("SELECT count(*)::int AS n FROM todos WHERE id > 1000")).rows[0].n, 0);

  await page.evaluate(() => window.db.setOffline(false));
  await waitFor("the outbox to drain", async () => (await page.evaluate(() => window.db.status.outbox)) === 0);
  assert.equal((await db.sql("SELECT count(*)::int AS n FROM todos WHERE id > 1000")).rows[0].n, 20);
  // A server change reaches the IndexedDB replica and is there after another reload.
  await db.sql("UPDATE todos SET title = 'renamed' WHERE id = 1");
  await waitFor("the server's change", async () => (await count(page, "title = 'renamed'")) === 1);
  await page.close();
  page = await openPage(context, pages.origin);
  await page.evaluate((url) => window.open_({ url, name: "idb", storage: "indexeddb", offline: true }), server.url);
  assert.equal(await count(page, "title = 'renamed'"), 1);
  assert.equal(await page.evaluate(() => window.db.status.outbox), 0);
  await context.close();
});

/** TCP connections open to the server's port: the page's WebSockets (Node's health checks are closed). */
function socketsTo(port) {
  const out = execFileSync("ss", ["-Htn", "state", "established", `( dport = :${port} )`], { encoding: "utf8" });
  return out.split("\n").filter((l) => l.trim() !== "").length;
}

test("two tabs hold one WebSocket between them", async () => {
  const metrics = async () => await (await fetch(`http://127.0.0.1:${server.port}/metrics`)).text();
  await waitFor("no connections left from earlier tests", () => socketsTo(server.port) === 0);
  const context = await browser.newContext();
  const a = await openPage(context, pages.origin);
  const b = await openPage(context, pages.origin);
  await a.evaluate((url) => window.open_({ url, name: "one-socket" }), server.url);
  await b.evaluate((url) => window.open_({ url, name: "one-socket" }), server.url);
  await waitFor("caught up", () => b.evaluate(() => window.db.status.caughtUp));
  await b.evaluate(() => window.db.execute("INSERT INTO todos (id, title) VALUES (2001, 'via the other tab')", [], { waitForServer: true }));
  assert.equal(socketsTo(server.port), 1, "one socket for two tabs");
  assert.match(await metrics(), /^pgrelay_sessions_replaced_total 0$/m, "no second socket ever took the session over");
  await a.close();
  await waitFor("the second tab to take over", () => b.evaluate(() => window.db.isLeader && window.db.status.connection === "connected"));
  assert.equal(socketsTo(server.port), 1, "still one socket after the hand-over");
  await context.close();
  await waitFor("the socket to close with the tabs", () => socketsTo(server.port) === 0);
});

test("a wrong URL: the status says why while the page keeps retrying; local work goes on", async () => {
  const context = await browser.newContext();
  let page = await openPage(context, pages.origin);
  // A replica that has synced once (so it has the tables), then a wrong URL.
  await page.evaluate((url) => window.open_({ url, name: "wrong-url" }), server.url);
  await waitFor("caught up", () => page.evaluate(() => window.db.status.caughtUp));
  await page.close();
  page = await openPage(context, pages.origin);
  const nobody = `ws://127.0.0.1:${await freePort()}`;
  await page.evaluate((url) => window.open_({ url, name: "wrong-url", backoffBaseMs: 50, backoffCapMs: 200 }), nobody);
  const status = await waitFor("a retry scheduled after a failed connection", async () => {
    const s = await page.evaluate(() => window.db.status);
    return s.connection === "disconnected" && s.lastError && s.retryInMs !== null ? s : null;
  });
  assert.match(status.lastError.message, /connect|closed|WebSocket/i, JSON.stringify(status.lastError));
  assert.ok(status.lastError.code, "the error has a code");
  const wrote = await page.evaluate(() => window.db.execute("INSERT INTO todos (id, title) VALUES (4001, 'local')"));
  assert.equal(wrote.captured, 1, "local writes work while the server cannot be reached");
  // Still trying, never "failed": the server may come up later.
  await page.evaluate(() => {
    window.attempts = 0;
    window.db.on("status", (s) => {
      if (s.connection === "connecting") window.attempts++;
    });
  });
  await waitFor("two more attempts", () => page.evaluate(() => window.attempts >= 2));
  assert.notEqual(await page.evaluate(() => window.db.status.connection), "failed");
  await context.close();
});

test("a tab killed inside a transaction leaves the replica and the outbox whole", async () => {
  const context = await browser.newContext();
  let page = await openPage(context, pages.origin);
  await page.evaluate((url) => window.open_({ url, name: "killed" }), server.url);
  await waitFor("caught up", () => page.evaluate(() => window.db.status.caughtUp));
  await page.evaluate(() => window.db.setOffline(true));
  await page.evaluate(() => window.db.execute("INSERT INTO todos (id, title) VALUES (3001, 'committed before')"));
  // Half a transaction: two of its writes done, then the tab dies.
  await page.evaluate(() => {
    window.db.transaction(async (tx) => {
      await tx.execute("INSERT INTO todos (id, title) VALUES (3002, 'half')");
      await tx.execute("UPDATE todos SET title = 'half' WHERE id = 2");
      window.halfway = true;
      await new Promise(() => {});
    });
  });
  await waitFor("the transaction to be half done", () => page.evaluate(() => window.halfway === true));
  const crashed = page.evaluate(() => null).catch(() => null);
  await page.close({ runBeforeUnload: false });
  await crashed;

  page = await openPage(context, pages.origin);
  await page.evaluate((url) => window.open_({ url, name: "killed", offline: true }), server.url);
  assert.equal(await count(page, "id = 3001"), 1, "the committed write is kept");
  assert.equal(await count(page, "id = 3002 OR title = 'half'"), 0, "nothing of the interrupted transaction");
  assert.equal(await page.evaluate(() => window.db.status.outbox), 1, "the outbox holds only the committed write");
  const check = await page.evaluate(async () => (await window.db.query("PRAGMA integrity_check"))[0]);
  assert.deepEqual(Object.values(check), ["ok"]);
  await page.evaluate(() => window.db.setOffline(false));
  await waitFor("the committed write in PostgreSQL", async () => (await db.sql("SELECT count(*)::int AS n FROM todos WHERE id IN (3001, 3002)")).rows[0].n === 1);
  assert.equal((await db.sql("SELECT title FROM todos WHERE id = 2")).rows[0].title, "server 2");
  await context.close();
});
