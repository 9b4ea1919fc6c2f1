// Client migrations in the browser: the page's replica runs what
// `pgrelay migrate up` stores (an index and a local-only table), reports
// it to the server, and a failing one is reported and retried until it
// applies.
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { mkdirSync, mkdtempSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { freshDatabase, launchBrowser, openPage, PGRELAY_BIN, startPages, startServer, waitFor } from "./harness.mjs";

const TOKEN = "admin-token-of-the-web-migration-test";
let db, server, pages, browser, dir;

before(async () => {
  db = await freshDatabase();
  await db.sql(`CREATE TABLE todos (id bigint PRIMARY KEY, title text); INSERT INTO todos VALUES (1, 'a');`);
  server = await startServer(db.url, ["--admin-token", TOKEN]);
  pages = await startPages();
  browser = await launchBrowser();
  dir = mkdtempSync(join(tmpdir(), "pgrelay-web-migrations-"));
});

after(async () => {
  await browser?.close();
  await pages?.close();
  await server?.kill();
  await db?.drop();
});

function migration(version, name, files) {
  const folder = join(dir, `${version}_${name}`);
  mkdirSync(folder, { recursive: true });
  for (const [file, text] of Object.entries(files)) writeFileSync(join(folder, file), text);
  execFileSync(PGRELAY_BIN, ["migrate", "up", "--database-url", db.url, "--dir", dir]);
}

async function report(version) {
  const res = await fetch(`http://127.0.0.1:${server.port}/api/admin/migrations`, { headers: { authorization: `Bearer ${TOKEN}` } });
  const body = await res.json();
  return body.clients.find((c) => c.client_id === "web-migrations" && c.version === version);
}

test("client migrations are applied in the browser replica, reported, and a failing one retried", async () => {
  const context = await browser.newContext();
  const page = await openPage(context, pages.origin);
  await page.evaluate((url) => window.open_({ url, name: "migrations", clientId: "web-migrations" }), server.url);
  await waitFor("caught up", () => page.evaluate(() => window.db.status.caughtUp));
  const names = () => page.evaluate(async () => (await window.db.query("SELECT name FROM sqlite_master")).map((r) => r.name));

  migration(20261203140000, "drafts", {
    "up.sql": "SELECT 1;",
    "down.sql": "SELECT 1;",
    "client_up.sql": "CREATE INDEX todos_title ON todos (title); CREATE TABLE local_drafts (id INTEGER PRIMARY KEY, body TEXT);",
  });
  await waitFor("the index and the local table", async () => {
    const n = await names();
    return n.includes("todos_title") && n.includes("local_drafts");
  });
  const applied = await waitFor("the report", async () => (await report(20261203140000))?.state === "applied");
  assert.ok(applied);

  migration(20261203140100, "needs_notes", {
    "up.sql": "SELECT 1;",
    "down.sql": "SELECT 1;",
    "client_up.sql": "CREATE INDEX notes_body ON notes (body);",
  });
  const failed = await waitFor("a failure reported twice", async () => {
    const r = await report(20261203140100);
    return r?.state === "failed" && r.attempts >= 2 ? r : null;
  });
  assert.match(failed.error, /notes/);
  // The cure, in the replica: the next retry applies it.
  await page.evaluate(() => window.db.execute("CREATE TABLE notes (body TEXT)"));
  await waitFor("the retried migration applied", async () => (await report(20261203140100))?.state === "applied");
  assert.ok((await names()).includes("notes_body"));
  await context.close();
});
