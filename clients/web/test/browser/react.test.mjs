// useQuery in a real React page (bundled with esbuild from the built
// package): the list re-renders when PostgreSQL changes and when the page
// writes.
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, rmSync, copyFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { build } from "esbuild";
import { freshDatabase, here, launchBrowser, packageRoot, startPages, startServer, waitFor } from "./harness.mjs";

let db, server, pages, browser, out;

before(async () => {
  db = await freshDatabase();
  await db.sql(`CREATE TABLE todos (id bigint PRIMARY KEY, title text NOT NULL); INSERT INTO todos VALUES (1, 'first');`);
  server = await startServer(db.url);
  out = mkdtempSync(join(tmpdir(), "pgrelay-react-"));
  await build({
    entryPoints: [join(here, "react", "app.jsx")],
    outfile: join(out, "app.js"),
    bundle: true,
    format: "esm",
    define: { "process.env.NODE_ENV": '"production"' },
    logLevel: "warning",
  });
  copyFileSync(join(here, "react", "index.html"), join(out, "index.html"));
  pages = await startPages({ "/dist/": join(packageRoot, "dist"), "/react/": out });
  browser = await launchBrowser();
});

after(async () => {
  await browser?.close();
  await pages?.close();
  await server?.kill();
  await db?.drop();
  if (out) rmSync(out, { recursive: true, force: true });
});

const items = (page) => page.$$eval("#list li", (lis) => lis.map((li) => li.textContent));

test("useQuery re-renders on a PostgreSQL change and on a local write", async () => {
  const context = await browser.newContext();
  const page = await context.newPage();
  page.on("pageerror", (e) => console.error(`[page error] ${e.message}`));
  await page.goto(`${pages.origin}/react/index.html`);
  await page.waitForFunction(() => typeof window.start === "function");
  await page.evaluate((url) => window.start(url), server.url);
  await waitFor("the first rows", async () => JSON.stringify(await items(page)) === '["first"]');

  const before = await page.evaluate(() => window.renders);
  await db.sql("INSERT INTO todos VALUES (2, 'from postgres')");
  await waitFor("PostgreSQL's row on screen", async () => JSON.stringify(await items(page)) === '["first","from postgres"]');
  assert.ok((await page.evaluate(() => window.renders)) > before, "rendered again");

  await page.evaluate(() => window.db.execute("UPDATE todos SET title = 'edited here' WHERE id = 1"));
  await waitFor("the local edit on screen", async () => JSON.stringify(await items(page)) === '["edited here","from postgres"]');
  await waitFor("the edit in PostgreSQL", async () => (await db.sql("SELECT title FROM todos WHERE id = 1")).rows[0].title === "edited here");
  await context.close();
});
