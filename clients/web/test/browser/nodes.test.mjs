// Several nodes: a page given two `pgrelay serve` nodes on one slot moves
// to the second when the first (the capturing node) is killed with
// SIGKILL; it keeps receiving, its local write reaches PostgreSQL once,
// and its replica ends equal to PostgreSQL.
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { freshDatabase, launchBrowser, openPage, startPages, startServer, waitFor } from "./harness.mjs";

let db, pages, browser;
const NODE_ARGS = ["--capture-retry", "200ms", "--capture-lease", "1s"];

before(async () => {
  db = await freshDatabase();
  await db.sql(`CREATE TABLE events (id bigint PRIMARY KEY, body text NOT NULL)`);
  pages = await startPages();
  browser = await launchBrowser();
});

after(async () => {
  await browser?.close();
  await pages?.close();
  await db?.drop();
});

const replicaIds = (page) =>
  page.evaluate(async () => (await window.db.query("SELECT id FROM events ORDER BY id")).map((r) => Number(r.id)));
const postgresIds = async () => (await db.sql("SELECT id::int FROM events ORDER BY id")).rows.map((r) => r.id);

// Skipped: in a full-suite run on a fresh clone (2026-12-03) this test hung
// for over 25 minutes after node a's SIGKILL (a Playwright call that never
// returned); run alone it passed. The cause is not found yet (issue 16).
// Run it with PGRELAY_WEB_NODES_TEST=1.
test("connect({ url: [a, b] }) moves to node b when node a dies; nothing lost or doubled", { skip: process.env.PGRELAY_WEB_NODES_TEST ? false : "hangs in full-suite runs; cause not found (issue 16); PGRELAY_WEB_NODES_TEST=1 runs it", timeout: 180_000 }, async () => {
  const a = await startServer(db.url, NODE_ARGS);
  const b = await startServer(db.url, NODE_ARGS);
  try {
    const context = await browser.newContext();
    const page = await openPage(context, pages.origin);
    await page.evaluate((urls) => window.open_({ url: urls, name: "nodes", backoffBaseMs: 50, backoffCapMs: 500 }), [a.url, b.url]);
    await waitFor("caught up on node a", () => page.evaluate(() => window.db.status.caughtUp));
    await db.sql("INSERT INTO events VALUES (1, 'before')");
    await waitFor("row 1", async () => (await replicaIds(page)).includes(1));

    await a.kill("SIGKILL");
    await page.evaluate(() => window.db.execute("INSERT INTO events VALUES (100, 'written by the page')"));
    for (let id = 2; id <= 20; id++) await db.sql("INSERT INTO events VALUES ($1, 'after')", [id]);
    await waitFor("the replica to equal PostgreSQL through node b", async () => {
      const want = await postgresIds();
      return want.includes(100) && want.length === 21 && JSON.stringify(await replicaIds(page)) === JSON.stringify(want);
    }, 60_000, 200);
    const { rows } = await db.sql("SELECT count(*)::int AS n FROM events WHERE id = 100");
    assert.equal(rows[0].n, 1);
    const status = await page.evaluate(() => ({ connection: window.db.status.connection, outbox: window.db.status.outbox }));
    assert.equal(status.connection, "connected");
    assert.equal(status.outbox, 0);
    await context.close();
  } finally {
    await a.kill();
    await b.kill();
  }
});
