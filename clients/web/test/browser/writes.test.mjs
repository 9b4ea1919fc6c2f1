// Local writes: offline with a reload in between (exactly once, in
// order), rejection rolled back and reported, and two tabs sharing one
// replica with a hand-over when the holder closes.
import { test } from "node:test";
import assert from "node:assert/strict";
import { browser, db, openPage, pages, server, useWorld, waitFor } from "./harness.mjs";

useWorld(`
    CREATE TABLE todos (id bigint PRIMARY KEY, title text NOT NULL CHECK (length(title) < 40), done boolean NOT NULL DEFAULT false);
    CREATE TABLE applications (seq bigserial PRIMARY KEY, todo_id bigint NOT NULL);
    CREATE FUNCTION count_application() RETURNS trigger LANGUAGE plpgsql AS $$
      BEGIN INSERT INTO applications (todo_id) VALUES (NEW.id); RETURN NEW; END $$;
    CREATE TRIGGER count_application AFTER INSERT ON todos FOR EACH ROW EXECUTE FUNCTION count_application();`, ["--tables", "public.todos"]);

test("offline writes survive a reload and reach PostgreSQL exactly once, in order", async () => {
  const context = await browser.newContext();
  let page = await openPage(context, pages.origin);
  await page.evaluate((url) => window.open_({ url, name: "offline" }), server.url);
  await waitFor("caught up", () => page.evaluate(() => window.db.status.caughtUp));
  await page.evaluate(() => window.db.setOffline(true));
  await page.evaluate(async () => {
    for (let i = 1; i <= 500; i++) await window.db.execute("INSERT INTO todos (id, title) VALUES (?, ?)", [i, `offline ${i}`]);
  });
  assert.equal(await page.evaluate(() => window.db.status.outbox), 500);

  // Reload while still offline: the rows and the outbox are in OPFS.
  await page.close();
  page = await openPage(context, pages.origin);
  await page.evaluate((url) => window.open_({ url, name: "offline", offline: true }), server.url);
  const kept = await page.evaluate(async () => (await window.db.query("SELECT count(*) AS n FROM todos"))[0].n);
  assert.equal(kept, 500);
  assert.equal(await page.evaluate(() => window.db.status.outbox), 500);
  const { rows: none } = await db.sql("SELECT count(*)::int AS n FROM todos");
  assert.equal(none[0].n, 0, "nothing left the page while offline");

  await page.evaluate(() => window.db.setOffline(false));
  await waitFor("the outbox to drain", async () => (await page.evaluate(() => window.db.status.outbox)) === 0, 60_000);
  const { rows } = await db.sql("SELECT todo_id::int AS id FROM applications ORDER BY seq");
  assert.deepEqual(
    rows.map((r) => r.id),
    Array.from({ length: 500 }, (_, i) => i + 1),
    "each write applied once, in the order it was made",
  );
  await context.close();
});

test("a write the server rejects is rolled back in the page and reported", async () => {
  const context = await browser.newContext();
  const page = await openPage(context, pages.origin);
  await page.evaluate((url) => window.open_({ url, name: "reject" }), server.url);
  await waitFor("caught up", () => page.evaluate(() => window.db.status.caughtUp));
  const outcome = await page.evaluate(async () => {
    try {
      await window.db.execute("INSERT INTO todos (id, title) VALUES (9001, ?)", ["x".repeat(60)], { waitForServer: true });
      return { ok: true };
    } catch (e) {
      return { ok: false, name: e.name, message: e.message };
    }
  });
  assert.equal(outcome.ok, false);
  assert.match(outcome.message, /constraint_violation/);
  const left = await page.evaluate(async () => (await window.db.query("SELECT count(*) AS n FROM todos WHERE id = 9001"))[0].n);
  assert.equal(left, 0, "the rejected row is gone from the replica");
  const events = await page.evaluate(() => window.events.filter((e) => e.name === "rejected"));
  assert.equal(events.length, 1);
  assert.match(events[0].reason, /check constraint/i);

  // A write the server takes: read-your-writes resolves with the row there.
  await page.evaluate(() => window.db.execute("INSERT INTO todos (id, title) VALUES (9002, 'fine')", [], { waitForServer: true }));
  const { rows } = await db.sql("SELECT title FROM todos WHERE id = 9002");
  assert.equal(rows[0].title, "fine");
  await context.close();
});

test("two tabs share one replica; closing the holder hands over with the outbox intact", async () => {
  const context = await browser.newContext();
  const a = await openPage(context, pages.origin);
  const first = await a.evaluate((url) => window.open_({ url, name: "tabs" }), server.url);
  const b = await openPage(context, pages.origin);
  const second = await b.evaluate((url) => window.open_({ url, name: "tabs" }), server.url);
  assert.equal(first.leader, true);
  assert.equal(second.leader, false, "the second tab uses the first one's database and socket");
  await waitFor("caught up", () => b.evaluate(() => window.db.status.caughtUp));

  await b.evaluate(() => window.db.execute("INSERT INTO todos (id, title) VALUES (7001, 'from b')", [], { waitForServer: true }));
  await a.evaluate(() => window.db.execute("INSERT INTO todos (id, title) VALUES (7002, 'from a')"));
  for (const page of [a, b]) {
    await waitFor("both writes in both tabs", async () => (await page.evaluate(async () => (await window.db.query("SELECT count(*) AS n FROM todos WHERE id IN (7001, 7002)"))[0].n)) === 2);
  }
  await waitFor("both writes in PostgreSQL", async () => (await db.sql("SELECT count(*)::int AS n FROM todos WHERE id IN (7001, 7002)")).rows[0].n === 2);

  // Writes waiting in the holder's outbox when it closes.
  await a.evaluate(() => window.db.setOffline(true));
  await b.evaluate(async () => {
    for (let i = 0; i < 20; i++) await window.db.execute("INSERT INTO todos (id, title) VALUES (?, 'queued')", [7100 + i]);
  });
  assert.equal(await a.evaluate(() => window.db.status.outbox), 20);
  await a.close();
  await waitFor("the second tab to take over", () => b.evaluate(() => window.db.isLeader), 30_000);
  await waitFor("the queued writes in PostgreSQL", async () => (await db.sql("SELECT count(*)::int AS n FROM todos WHERE id >= 7100 AND id < 7200")).rows[0].n === 20, 30_000);
  const { rows } = await db.sql("SELECT count(*)::int AS n, count(DISTINCT todo_id)::int AS d FROM applications WHERE todo_id >= 7100 AND todo_id < 7200");
  assert.deepEqual(rows[0], { n: 20, d: 20 }, "each queued write applied once");
  await context.close();
});
