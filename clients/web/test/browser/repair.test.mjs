// Repair instead of re-download (docs/repair.md): a page whose position
// the server can no longer continue (behind retention, a slot dropped
// under a running server) is compared with PostgreSQL range by range and
// receives only the rows that differ; it ends equal (checked with SQL on
// both sides), is never downloaded whole again (the server's counters),
// and its unsent local writes survive.
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import pg from "pg";
import { freshDatabase, launchBrowser, openPage, startPages, startServer, waitFor } from "./harness.mjs";

let pages, browser;

before(async () => {
  pages = await startPages();
  browser = await launchBrowser();
});

after(async () => {
  await browser?.close();
  await pages?.close();
});

const lsn = (text) => {
  const [hi, lo] = text.split("/");
  return (BigInt("0x" + hi) << 32n) | BigInt("0x" + lo);
};

/** A counter of the server's /metrics. */
async function metric(server, name) {
  const body = await (await fetch(`http://127.0.0.1:${server.port}/metrics`)).text();
  const line = body.split("\n").find((l) => l.startsWith(`${name} `));
  assert.ok(line, `no metric ${name}`);
  return Number(line.split(" ")[1]);
}

/** The same query's rows, as text, in PostgreSQL and in the page's replica (SQL on both sides). */
async function bothSides(db, page, pgQuery, replicaQuery = pgQuery) {
  const a = (await db.sql({ text: pgQuery, rowMode: "array" })).rows.map((r) => r.map((v) => (v === null ? null : String(v))));
  const b = await page.evaluate(async (q) => (await window.db.query(q)).map((r) => Object.values(r).map((v) => (v === null ? null : String(v)))), replicaQuery);
  return [JSON.stringify(a), JSON.stringify(b)];
}

async function waitEqual(db, page, what, pgQuery, replicaQuery) {
  let last = "";
  await waitFor(`${what}: the replica to equal PostgreSQL`, async () => {
    const [a, b] = await bothSides(db, page, pgQuery, replicaQuery);
    last = `PostgreSQL ${a.slice(0, 200)}\nreplica ${b.slice(0, 200)}`;
    return a === b;
  }, 60_000, 100).catch((e) => assert.fail(`${e.message}\n${last}`));
}

const events = (page, name) => page.evaluate((n) => window.events.filter((e) => e.name === n), name);

const ITEMS = `CREATE TABLE items (id bigint PRIMARY KEY, n int NOT NULL, note text);
  INSERT INTO items SELECT g, g % 97, 'item number ' || g FROM generate_series(1, 20000) g;`;
const ITEMS_QUERY = "SELECT id, n, note FROM items ORDER BY id";

test("a page back after retention, with rows updated, inserted and deleted meanwhile, is repaired with a fraction of a hydration's bytes; its unsent writes survive", async () => {
  const db = await freshDatabase();
  await db.sql(`${ITEMS}
    CREATE TABLE tags (name text PRIMARY KEY, weight float8);
    INSERT INTO tags SELECT 'tag-' || g, g / 3.0 FROM generate_series(1, 500) g;
    CREATE TABLE loose (a int, b text); ALTER TABLE loose REPLICA IDENTITY FULL;
    INSERT INTO loose VALUES (1, 'x'), (1, 'x'), (2, NULL);`);
  const server = await startServer(db.url, ["--retain", "1s"]);
  const context = await browser.newContext();
  try {
    const page = await openPage(context, pages.origin);
    await page.evaluate((url) => window.open_({ url, name: "away", backoffBaseMs: 50, backoffCapMs: 500 }), server.url);
    await waitEqual(db, page, "hydrated", ITEMS_QUERY);
    await waitFor("caught up", () => page.evaluate(() => window.db.status.caughtUp));
    const [hydrated] = await events(page, "hydrated");
    const position = await page.evaluate(() => window.db.status.lsn);

    // Away: local writes, while PostgreSQL changes 1 % of the rows and
    // the change log is pruned past the page's position.
    await page.evaluate(async () => {
      window.db.setOffline(true);
      await window.db.execute("INSERT INTO items VALUES (900001, 1, 'written offline')");
      await window.db.execute("UPDATE items SET note = 'edited offline' WHERE id = 7");
    });
    await db.sql(`UPDATE items SET n = n + 1000 WHERE id % 200 = 3;
      DELETE FROM items WHERE id % 400 = 11;
      INSERT INTO items SELECT 100000 + g, 5, 'new ' || g FROM generate_series(1, 50) g;
      INSERT INTO items SELECT g * 400 + 500000, 6, 'spread ' || g FROM generate_series(1, 50) g;
      UPDATE tags SET weight = -1 WHERE name IN ('tag-17', 'tag-300');
      DELETE FROM tags WHERE name = 'tag-42';
      INSERT INTO tags VALUES ('Zebra', 1), ('ärger', 2), ('tag-17a', 3);
      DELETE FROM loose WHERE a = 2; INSERT INTO loose VALUES (3, 'y');`);
    await waitFor("the change log pruned past the page's position", async () => {
      const { rows } = await db.sql("SELECT pruned_through::text AS p FROM pgrelay.log_state");
      return lsn(rows[0].p) > lsn(position);
    });
    await waitFor("the writes held in the outbox", () => page.evaluate(() => window.db.status.outbox === 2));

    await page.evaluate(() => window.db.setOffline(false));
    const [repaired] = await waitFor("a repair", () => events(page, "repaired").then((r) => (r.length > 0 ? r : null)));
    await waitFor("the writes made offline to reach PostgreSQL", async () => {
      const { rows } = await db.sql("SELECT count(*)::int AS n FROM items WHERE id = 900001 OR note = 'edited offline'");
      return rows[0].n === 2;
    });
    await waitEqual(db, page, "items", ITEMS_QUERY);
    await waitEqual(db, page, "tags", `SELECT name, weight FROM tags ORDER BY name COLLATE "C"`, "SELECT name, weight FROM tags ORDER BY name");
    await waitEqual(db, page, "loose", "SELECT a, b FROM loose ORDER BY a, b");

    assert.deepEqual(repaired.refetch, []);
    assert.equal(repaired.tables.length, 3);
    // About 300 rows changed of 20,500: a few small ranges around each.
    assert.ok(repaired.rowsReceived < 2_000, `received ${repaired.rowsReceived} rows`);
    // Received: repair frames against the hydration's compressed chunks.
    // Both ways (the page's frames are not compressed: repair/wire.ts)
    // against the hydration's rows.
    const figures = `repair received ${repaired.bytesReceived} bytes, moved ${repaired.bytes} both ways; the hydration received ${hydrated.wireBytes} (${hydrated.bytes} uncompressed)`;
    assert.ok(repaired.bytesReceived * 10 < hydrated.wireBytes, figures);
    assert.ok(repaired.bytes * 5 < hydrated.bytes, figures);
    assert.equal((await events(page, "hydrated")).length, 1, "downloaded whole again");
    assert.equal((await events(page, "repaired")).length, 1);
    assert.equal(await metric(server, "pgrelay_hydrations_total"), 1);
    assert.equal(await metric(server, "pgrelay_repairs_total"), 1);

    // The stream resumes from the repair's snapshot.
    await db.sql("INSERT INTO items VALUES (950000, 1, 'after the repair')");
    await waitEqual(db, page, "after the repair", ITEMS_QUERY);
  } finally {
    await context.close();
    await server.kill();
    await db.drop();
  }
});

test("a slot dropped under a running server with a page connected and a writer running: the page is repaired, never downloaded whole again", async () => {
  const db = await freshDatabase();
  await db.sql(ITEMS);
  const server = await startServer(db.url);
  const context = await browser.newContext();
  const writerDb = new pg.Client({ connectionString: db.url });
  const gap = new pg.Client({ connectionString: db.url });
  await writerDb.connect();
  await gap.connect();
  let stop = false;
  let writes = 0;
  try {
    const page = await openPage(context, pages.origin);
    await page.evaluate((url) => window.open_({ url, name: "slot", backoffBaseMs: 50, backoffCapMs: 500 }), server.url);
    await waitEqual(db, page, "hydrated", ITEMS_QUERY);
    const { rows: [{ log_id: oldLog }] } = await db.sql("SELECT log_id FROM pgrelay.log_state");
    const writer = (async () => {
      while (!stop) {
        const i = ++writes;
        await writerDb.query(`BEGIN; INSERT INTO items VALUES (${100000 + i}, 1, 'new ${i}');
          UPDATE items SET n = n + 1 WHERE id = ${1 + ((i * 7919) % 20000)}; DELETE FROM items WHERE id = ${100000 + i - 3}; COMMIT;`);
      }
    })();
    await waitFor("the writer to run", () => writes > 20);

    // Rows change in a transaction that ends the walsender and drops the
    // slot: they commit while no slot of before exists.
    const slot = `pgrelay_${new URL(db.url).pathname.slice(1)}`.slice(0, 63);
    await waitFor("the slot dropped", async () => {
      await gap.query("BEGIN; UPDATE items SET note = 'changed while no slot existed' WHERE id = 5; DELETE FROM items WHERE id = 6;");
      await gap.query("SELECT pg_terminate_backend(active_pid, 5000) FROM pg_replication_slots WHERE slot_name = $1 AND active_pid IS NOT NULL", [slot]);
      try {
        await gap.query("SELECT pg_drop_replication_slot($1)", [slot]);
        return true;
      } catch {
        // Taken again by the reconnecting server: try again.
        await gap.query("ROLLBACK");
        return false;
      }
    });
    await gap.query("COMMIT");
    await waitFor("a new change-log epoch", async () => (await db.sql("SELECT log_id FROM pgrelay.log_state")).rows[0].log_id !== oldLog, 60_000);
    await waitFor("a repair", async () => (await events(page, "repaired")).length > 0, 60_000);
    const before = writes;
    await waitFor("the writer to go on", () => writes > before + 20);
    stop = true;
    await writer;
    await waitEqual(db, page, "after the slot loss", ITEMS_QUERY);
    const { rows } = await db.sql("SELECT count(*)::int AS n FROM items WHERE id = 6 OR note = 'changed while no slot existed'");
    assert.equal(rows[0].n, 1);

    assert.ok((await events(page, "error")).some((e) => e.code === "gone"), "told gone");
    const repaired = await events(page, "repaired");
    assert.equal(repaired.length, 1, JSON.stringify(repaired));
    assert.deepEqual(repaired[0].refetch, []);
    assert.ok(repaired[0].rowsReceived < 2_000, `received ${repaired[0].rowsReceived} rows`);
    assert.equal((await events(page, "hydrated")).length, 1, "downloaded whole again");
    assert.equal(await metric(server, "pgrelay_hydrations_total"), 1);
  } finally {
    stop = true;
    await gap.end().catch(() => {});
    await writerDb.end().catch(() => {});
    await context.close();
    await server.kill();
    await db.drop();
  }
});
