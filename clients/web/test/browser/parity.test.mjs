// Protocol parity with the Rust client: a local transaction larger than
// one frame goes in `write_part` frames and is applied as one PostgreSQL
// transaction; one over the protocol's limits is refused at execute and
// rolled back; "caught up" means holding what PostgreSQL had committed
// when the page connected; a change for a table the page never heard of
// makes it fetch that table instead of failing.
import { test } from "node:test";
import assert from "node:assert/strict";
import { browser, db, openPage, pages, server, useWorld, waitFor } from "./harness.mjs";
import { meddlingProxy } from "./proxy.mjs";

useWorld(`
    CREATE TABLE docs (id bigint PRIMARY KEY, body text NOT NULL);
    CREATE TABLE t (id int PRIMARY KEY, n int NOT NULL);
    INSERT INTO t SELECT g, 0 FROM generate_series(1, 10001) g;`);

const count = (page, sql) => page.evaluate(async (q) => Number((await window.db.query(q))[0].n), sql);

test("a local transaction larger than one frame reaches PostgreSQL whole, as one transaction", async () => {
  const context = await browser.newContext();
  const page = await openPage(context, pages.origin);
  await page.evaluate((url) => window.open_({ url, name: "parts", storage: "memory" }), server.url);
  await waitFor("caught up", () => page.evaluate(() => window.db.status.caughtUp));
  // 2,500 rows of 1,000 multi-byte characters: about 5 MB on the wire, past the 1 MiB frame.
  await page.evaluate(() =>
    window.db.execute(
      "WITH RECURSIVE g(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM g WHERE n < 2500) INSERT INTO docs SELECT n, n || ':' || replace(printf('%.1000c', 'x'), 'x', 'ü') FROM g",
      [],
      { waitForServer: true },
    ),
  );
  const { rows } = await db.sql("SELECT count(*)::int AS n, count(DISTINCT xmin::text)::int AS txs, sum(octet_length(body))::bigint AS bytes FROM docs");
  assert.equal(rows[0].n, 2500);
  assert.equal(rows[0].txs, 1, "applied in one PostgreSQL transaction");
  assert.ok(Number(rows[0].bytes) > 4 << 20, "more than one frame could carry");
  assert.equal(await page.evaluate(() => window.db.status.outbox), 0);
  await context.close();
});

test("a local transaction over the protocol's limits is refused at execute and rolled back", async () => {
  const context = await browser.newContext();
  const page = await openPage(context, pages.origin);
  await page.evaluate((url) => window.open_({ url, name: "limits", storage: "memory" }), server.url);
  await waitFor("caught up", () => page.evaluate(() => window.db.status.caughtUp));
  const before = await count(page, "SELECT count(*) AS n FROM docs");
  const attempt = (fn) =>
    page.evaluate(async (body) => {
      try {
        await new Function("db", `return (async () => { ${body} })()`)(window.db);
        return { ok: true };
      } catch (e) {
        return { ok: false, name: e.name, code: e.code, message: e.message };
      }
    }, fn);
  const many = await attempt(
    "await db.execute(\"WITH RECURSIVE g(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM g WHERE n < 10001) INSERT INTO docs SELECT 100000 + n, 'b' FROM g\")",
  );
  assert.deepEqual([many.ok, many.name, many.code], [false, "TooLargeError", "too_large"]);
  assert.match(many.message, /10001 changes; one transaction may have at most 10000/);
  const heavy = await attempt(
    "await db.transaction(async (tx) => { await tx.execute(\"WITH RECURSIVE g(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM g WHERE n < 9000) INSERT INTO docs SELECT 200000 + n, printf('%.1000c', 'y') FROM g\"); })",
  );
  assert.deepEqual([heavy.ok, heavy.code], [false, "too_large"]);
  assert.match(heavy.message, /bytes on the wire; one transaction may take at most 8388608/);
  assert.equal(await count(page, "SELECT count(*) AS n FROM docs"), before, "both local transactions were rolled back");
  assert.equal(await page.evaluate(() => window.db.status.outbox), 0, "nothing of them is in the outbox");
  // The page goes on: the next write is sent and applied.
  await page.evaluate(() => window.db.execute("INSERT INTO docs VALUES (300001, 'after')", [], { waitForServer: true }));
  assert.equal((await db.sql("SELECT count(*)::int AS n FROM docs WHERE id >= 100000")).rows[0].n, 1);
  await context.close();
});

test("caught up means the page holds what PostgreSQL committed before it connected", async () => {
  const context = await browser.newContext();
  const page = await openPage(context, pages.origin);
  await page.evaluate((url) => window.open_({ url, name: "caught-up", storage: "memory" }), server.url);
  await waitFor("caught up", () => page.evaluate(() => window.db.status.caughtUp));
  for (let round = 1; round <= 3; round++) {
    await page.evaluate(() => window.db.setOffline(true));
    // A script writes, then the page connects at once.
    await db.sql("UPDATE t SET n = n + 1");
    const stale = await page.evaluate(async (want) => {
      const seen = { notCaughtUp: false };
      const stale = new Promise((resolve) => {
        const off = window.db.on("status", (s) => {
          if (!s.caughtUp) seen.notCaughtUp = true;
          else if (seen.notCaughtUp) {
            off();
            // The first moment the page says it is caught up.
            resolve(window.db.query("SELECT count(*) AS n FROM t WHERE n <> ?", [want]).then((r) => Number(r[0].n)));
          }
        });
      });
      window.db.setOffline(false);
      return await stale;
    }, round);
    assert.equal(stale, 0, `round ${round}: ${stale} of 10001 rows were stale when the page said it was caught up`);
  }
  await context.close();
});

test("a change for a table the page does not know makes it fetch the table, without an error", async () => {
  await db.sql("CREATE TABLE a (id int PRIMARY KEY, v text); INSERT INTO a SELECT g, 'v' FROM generate_series(1, 10) g;");
  await waitSynced("public.a");
  // The page never hears a `schema` announcement.
  const proxy = await meddlingProxy(server.port, (m) => m.type === "schema");
  try {
    const context = await browser.newContext();
    const page = await openPage(context, pages.origin);
    await page.evaluate((url) => window.open_({ url, name: "unknown", storage: "memory", backoffBaseMs: 50 }), proxy.url);
    await waitFor("caught up", () => page.evaluate(() => window.db.status.caughtUp));
    assert.equal(await count(page, "SELECT count(*) AS n FROM a"), 10);

    await db.sql("CREATE TABLE fresh (id int PRIMARY KEY, w text); INSERT INTO fresh VALUES (1, 'before it syncs');");
    await waitSynced("public.fresh");
    await db.sql("INSERT INTO fresh SELECT g, 'w' || g FROM generate_series(2, 50) g; UPDATE a SET v = 'w' WHERE id = 1;");
    await waitFor("the new table in the page", async () => (await count(page, "SELECT count(*) AS n FROM fresh").catch(() => 0)) === 50);
    assert.ok(proxy.dropped > 0, "no schema frame was dropped: the test did not test anything");
    await db.sql("INSERT INTO fresh VALUES (51, 'live')");
    await waitFor("the live row", async () => (await count(page, "SELECT count(*) AS n FROM fresh")) === 51);
    assert.equal(await page.evaluate(() => window.db.query("SELECT v FROM a WHERE id = 1").then((r) => r[0].v)), "w");
    const errors = await page.evaluate(() => window.events.filter((e) => e.name === "error"));
    assert.deepEqual(errors, [], "fetching an unknown table is not an error");
    assert.notEqual(await page.evaluate(() => window.db.status.connection), "failed");
    await context.close();
  } finally {
    await proxy.close();
  }
});

/** Waits until the server syncs `table` (its table watch noticed it). */
async function waitSynced(table) {
  await waitFor(`the server to sync ${table}`, async () => {
    const r = await fetch(`http://127.0.0.1:${server.port}/api/status`);
    const status = await r.json();
    return status.tables?.some((t) => t.name === table && !t.skipped);
  });
}
