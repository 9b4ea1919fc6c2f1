// Several nodes: a page given two `pgrelay serve` nodes on one slot moves
// to the second when the first (the capturing node) is killed with
// SIGKILL; it keeps receiving, its local write reaches PostgreSQL once,
// and its replica ends equal to PostgreSQL. Every wait is on a condition
// with a deadline, and the nodes are stopped even when the test fails.
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { freshDatabase, launchBrowser, openPage, startPages, startServer, waitFor, within } from "./harness.mjs";

let db, pages, browser;
/** The nodes of the running test, stopped by `after` whatever happened. */
const nodes = [];
const NODE_ARGS = ["--capture-retry", "200ms", "--capture-lease", "1s"];

before(async () => {
  db = await freshDatabase();
  await db.sql(`CREATE TABLE events (id bigint PRIMARY KEY, body text NOT NULL)`);
  pages = await startPages();
  browser = await launchBrowser();
});

after(async () => {
  for (const node of nodes) await node.kill();
  await browser?.close();
  await pages?.close();
  await db?.drop();
});

const replicaIds = (page) =>
  page.evaluate(async () => (await window.db.query("SELECT id FROM events ORDER BY id")).map((r) => Number(r.id)));
const postgresIds = async () => (await db.sql("SELECT id::int FROM events ORDER BY id")).rows.map((r) => r.id);

test("connect({ url: [a, b] }) moves to node b when node a dies; nothing lost or doubled", { timeout: 180_000 }, async () => {
  const a = await startServer(db.url, NODE_ARGS);
  nodes.push(a);
  const b = await startServer(db.url, NODE_ARGS);
  nodes.push(b);
  const context = await browser.newContext();
  try {
    const page = await openPage(context, pages.origin);
    await within(30_000, "connect()", page.evaluate((urls) => window.open_({ url: urls, name: "nodes", backoffBaseMs: 50, backoffCapMs: 500 }), [a.url, b.url]));
    await waitFor("caught up on node a", () => page.evaluate(() => window.db.status.caughtUp));
    await db.sql("INSERT INTO events VALUES (1, 'before')");
    await waitFor("row 1", async () => (await replicaIds(page)).includes(1));

    await a.kill("SIGKILL");
    await within(30_000, "a local write", page.evaluate(() => window.db.execute("INSERT INTO events VALUES (100, 'written by the page')")));
    for (let id = 2; id <= 20; id++) await db.sql("INSERT INTO events VALUES ($1, 'after')", [id]);
    await waitFor("the replica to equal PostgreSQL through node b", async () => {
      const want = await postgresIds();
      return want.includes(100) && want.length === 21 && JSON.stringify(await replicaIds(page)) === JSON.stringify(want);
    }, 60_000, 200);
    const { rows } = await db.sql("SELECT count(*)::int AS n FROM events WHERE id = 100");
    assert.equal(rows[0].n, 1);
    // Connected (to b) with nothing left to send: wait for it rather than
    // read it once, the answer to the page's write may still be on its way.
    const status = await waitFor("connected with an empty outbox", async () => {
      const s = await page.evaluate(() => ({ connection: window.db.status.connection, outbox: window.db.status.outbox }));
      return s.connection === "connected" && s.outbox === 0 ? s : null;
    }, 30_000, 100);
    assert.deepEqual(status, { connection: "connected", outbox: 0 });
  } finally {
    await within(30_000, "closing the browser context", context.close());
    // `kill` returns at once for a node already gone (a, killed above).
    await a.kill();
    await b.kill();
  }
});
