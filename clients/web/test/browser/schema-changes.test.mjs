// Schema changes in PostgreSQL reach the page's replica without a full
// resync: a dropped column (in place), a renamed column, a new primary
// key, a renamed table (each of those tables fetched again alone) and a
// dropped table (dropped). A page that was offline meanwhile catches up
// the same way, and its writes made against the old names land under
// the new ones.
import { test } from "node:test";
import assert from "node:assert/strict";
import { browser, db, openPage, pages, server, useWorld, waitFor } from "./harness.mjs";

useWorld(`
    CREATE TABLE todos (id bigint PRIMARY KEY, title text, note text);
    INSERT INTO todos SELECT g, 'title ' || g, 'note ' || g FROM generate_series(1, 200) g;
    CREATE TABLE keyed (id int PRIMARY KEY, org int NOT NULL DEFAULT 1, v text);
    INSERT INTO keyed SELECT g, 1, 'v' || g FROM generate_series(1, 50) g;
    CREATE TABLE old_name (id int PRIMARY KEY, v text);
    INSERT INTO old_name SELECT g, 'o' || g FROM generate_series(1, 20) g;
    CREATE TABLE doomed (id int PRIMARY KEY);
    INSERT INTO doomed VALUES (1);
    CREATE TABLE big (id int PRIMARY KEY, body text);
    INSERT INTO big SELECT g, repeat('x', 200) FROM generate_series(1, 2000) g;`);

const columns = (page, table) =>
  page.evaluate(
    async (t) => (await window.db.query("SELECT name, pk FROM pragma_table_info(?) ORDER BY cid", [t])).map((r) => `${r.name}:${r.pk}`).join(","),
    table,
  );

const WANT = { todos: "id:1,label:0", keyed: "id:2,org:1,v:0", new_name: "id:1,v:0", old_name: "", doomed: "" };

async function reshaped(page) {
  for (const [table, want] of Object.entries(WANT)) if ((await columns(page, table)) !== want) return false;
  return true;
}

/** The page's snapshots since `from`: none whole; their tables and bytes. */
async function refetched(page, from = 0) {
  const loads = (await page.evaluate(() => window.events.filter((e) => e.name === "hydrated"))).slice(from);
  assert.ok(loads.every((l) => !l.full), `a full re-hydration: ${JSON.stringify(loads)}`);
  return { tables: [...new Set(loads.flatMap((l) => l.tables))].sort(), bytes: loads.reduce((n, l) => n + l.bytes, 0) };
}

async function sameRows(page, table, columnsSql) {
  const { rows } = await db.sql(`SELECT ${columnsSql} FROM ${table} ORDER BY 1, 2`);
  const want = JSON.stringify(rows.map((r) => Object.values(r).map(String)));
  return (
    JSON.stringify(
      (await page.evaluate(async ([t, c]) => await window.db.query(`SELECT ${c} FROM ${t} ORDER BY 1, 2`), [table, columnsSql])).map((r) =>
        Object.values(r).map(String),
      ),
    ) === want
  );
}

test("dropped, renamed and re-keyed columns and tables reach live and offline pages, fetching only those tables", async () => {
  const context = await browser.newContext();
  const live = await openPage(context, pages.origin);
  await live.evaluate((url) => window.open_({ url, name: "schema-live" }), server.url);
  const lateContext = await browser.newContext();
  const late = await openPage(lateContext, pages.origin);
  await late.evaluate((url) => window.open_({ url, name: "schema-late" }), server.url);
  for (const page of [live, late]) await waitFor("caught up", () => page.evaluate(() => window.db.status.caughtUp), 60_000);
  const whole = (await live.evaluate(() => window.events.filter((e) => e.name === "hydrated"))).reduce((n, l) => n + l.bytes, 0);
  const liveBefore = (await live.evaluate(() => window.events.filter((e) => e.name === "hydrated"))).length;
  const lateBefore = (await late.evaluate(() => window.events.filter((e) => e.name === "hydrated"))).length;

  // Offline, the late page writes through the names about to change.
  await late.evaluate(() => window.db.setOffline(true));
  await late.evaluate(async () => {
    await window.db.execute("UPDATE todos SET title = 'offline edit' WHERE id = 2");
    await window.db.execute("UPDATE old_name SET v = 'offline edit' WHERE id = 3");
    await window.db.execute("UPDATE todos SET note = 'offline note' WHERE id = 4");
  });

  await db.sql("ALTER TABLE todos DROP COLUMN note");
  await db.sql("ALTER TABLE todos RENAME COLUMN title TO label");
  await db.sql("ALTER TABLE keyed DROP CONSTRAINT keyed_pkey, ADD PRIMARY KEY (org, id)");
  await db.sql("ALTER TABLE old_name RENAME TO new_name");
  await db.sql("DROP TABLE doomed");
  await db.sql("UPDATE todos SET label = 'changed' WHERE id = 1");
  await db.sql("UPDATE keyed SET v = 'changed' WHERE id = 1");
  await waitFor("the live page reshaped", () => reshaped(live), 60_000, 200);
  await waitFor("the live page's rows", async () => (await sameRows(live, "todos", "id, label")) && (await sameRows(live, "keyed", "org, id, v")) && (await sameRows(live, "new_name", "id, v")), 30_000, 200);
  const liveFetched = await refetched(live, liveBefore);
  assert.deepEqual(liveFetched.tables, ["public.keyed", "public.new_name", "public.todos"]);
  console.log(`web, live page: re-fetched ${liveFetched.bytes} bytes (${liveFetched.tables.join(", ")}); whole replica ${whole} bytes`);

  // The late page comes back: the same changes, and its writes follow the
  // renames; the one through the dropped column is refused, not lost.
  await late.evaluate(() => window.db.setOffline(false));
  await waitFor("the late page reshaped", () => reshaped(late), 60_000, 200);
  await waitFor("the outbox answered", async () => (await late.evaluate(() => window.db.status.outbox)) === 0, 60_000, 200);
  const { rows } = await db.sql("SELECT (SELECT label FROM todos WHERE id = 2) AS label, (SELECT v FROM new_name WHERE id = 3) AS v");
  assert.deepEqual(rows[0], { label: "offline edit", v: "offline edit" });
  const rejected = await late.evaluate(() => window.events.filter((e) => e.name === "rejected"));
  assert.equal(rejected.length, 1, JSON.stringify(rejected));
  assert.match(rejected[0].reason, /note/);
  await waitFor("the late page's rows", async () => (await sameRows(late, "todos", "id, label")) && (await sameRows(late, "new_name", "id, v")), 30_000, 200);
  const lateFetched = await refetched(late, lateBefore);
  assert.ok(!lateFetched.tables.includes("public.big"), JSON.stringify(lateFetched));
  console.log(`web, late page: re-fetched ${lateFetched.bytes} bytes (${lateFetched.tables.join(", ")}); whole replica ${whole} bytes`);
  await context.close();
  await lateContext.close();
});
