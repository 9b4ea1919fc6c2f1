// Rejections under `pgrelay serve --auth jwt --rules ... --conflict`: a
// write outside the token's rows (forbidden) and an update based on a
// version the server no longer has (conflict) are both refused, rolled
// back in the page to the server's row, and reported.
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { createHmac } from "node:crypto";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { freshDatabase, launchBrowser, openPage, startPages, startServer, waitFor } from "./harness.mjs";

const SECRET = "a-test-secret-that-is-at-least-32-bytes-long";
const RULES = `
default = "deny"
[tables.todos]
read  = "tenant = claims.tenant"
write = "tenant = claims.tenant"
`;
let db, server, pages, browser, dir;

function jwt(claims) {
  const b64 = (o) => Buffer.from(JSON.stringify(o)).toString("base64url");
  const head = `${b64({ alg: "HS256", typ: "JWT" })}.${b64({ exp: Math.floor(Date.now() / 1000) + 3600, ...claims })}`;
  return `${head}.${createHmac("sha256", SECRET).update(head).digest("base64url")}`;
}

before(async () => {
  db = await freshDatabase();
  await db.sql(`CREATE TABLE todos (id bigint PRIMARY KEY, tenant text NOT NULL, title text NOT NULL, version integer NOT NULL DEFAULT 1);
                INSERT INTO todos VALUES (1, 'a', 'mine', 1), (2, 'b', 'theirs', 1);`);
  dir = mkdtempSync(join(tmpdir(), "pgrelay-web-rules-"));
  writeFileSync(join(dir, "secret"), SECRET);
  writeFileSync(join(dir, "rules.toml"), RULES);
  server = await startServer(db.url, ["--auth", "jwt", "--jwt-secret-file", join(dir, "secret"), "--rules", join(dir, "rules.toml"), "--conflict", "todos=version"]);
  pages = await startPages();
  browser = await launchBrowser();
});

after(async () => {
  await browser?.close();
  await pages?.close();
  await server?.kill();
  await db?.drop();
  if (dir) rmSync(dir, { recursive: true, force: true });
});

async function tenantPage(context, name) {
  const page = await openPage(context, pages.origin);
  await page.evaluate(({ url, name, token }) => window.open_({ url, name, token }), { url: server.url, name, token: jwt({ sub: "alice", tenant: "a" }) });
  await waitFor("caught up", () => page.evaluate(() => window.db.status.caughtUp));
  return page;
}

const rows = (page) => page.evaluate(async () => (await window.db.query("SELECT id, tenant, title, version FROM todos ORDER BY id")).map((r) => [r.id, r.tenant, r.title, r.version]));

test("a write outside the token's rows is rejected (forbidden), rolled back and reported", async () => {
  const context = await browser.newContext();
  const page = await tenantPage(context, "forbidden");
  assert.deepEqual(await rows(page), [[1, "a", "mine", 1]], "the replica holds only tenant a's rows");
  const outcome = await page.evaluate(async () => {
    try {
      await window.db.execute("INSERT INTO todos (id, tenant, title) VALUES (3, 'b', 'sneaky')", [], { waitForServer: true });
      return { ok: true };
    } catch (e) {
      return { name: e.name, code: e.code, reason: e.reason };
    }
  });
  assert.equal(outcome.name, "WriteRejectedError", JSON.stringify(outcome));
  assert.equal(outcome.code, "forbidden", JSON.stringify(outcome));
  assert.deepEqual(await rows(page), [[1, "a", "mine", 1]], "the insert is rolled back in the page");
  const reported = await page.evaluate(() => window.events.filter((e) => e.name === "rejected"));
  assert.equal(reported.length, 1, JSON.stringify(reported));
  assert.equal(await page.evaluate(() => window.db.status.rejected), 1);
  assert.equal((await db.sql("SELECT count(*)::int AS n FROM todos WHERE id = 3")).rows[0].n, 0);
  await context.close();
});

test("an update based on an old version is rejected (conflict) and the page gets the server's row", async () => {
  const context = await browser.newContext();
  const page = await tenantPage(context, "conflict");
  await page.evaluate(() => window.db.setOffline(true));
  // Meanwhile someone else changes the row and bumps its version.
  await db.sql("UPDATE todos SET title = 'changed on the server', version = 2 WHERE id = 1");
  await page.evaluate(() => window.db.execute("UPDATE todos SET title = 'changed offline', version = version + 1 WHERE id = 1"));
  assert.deepEqual(await rows(page), [[1, "a", "changed offline", 2]]);
  await page.evaluate(() => window.db.setOffline(false));
  const reported = await waitFor("the rejection", () => page.evaluate(() => {
    const r = window.events.filter((e) => e.name === "rejected");
    return r.length > 0 ? r : null;
  }));
  assert.equal(reported[0].code, "conflict", JSON.stringify(reported));
  await waitFor("the server's row back in the page", async () => JSON.stringify(await rows(page)) === JSON.stringify([[1, "a", "changed on the server", 2]]));
  assert.equal((await db.sql("SELECT title FROM todos WHERE id = 1")).rows[0].title, "changed on the server");
  assert.equal(await page.evaluate(() => window.db.status.outbox), 0);
  await context.close();
});
