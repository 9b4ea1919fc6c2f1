// `pgrelay demo --web`: the page it serves syncs between two windows
// (each with a replica of its own) and PostgreSQL's writer, live. With
// PGRELAY_DEMO_SCREENSHOT=path the two windows are saved as a PNG while
// window b is offline with a write waiting (docs/web-demo.png comes from
// here).
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { join } from "node:path";
import { freePort, freshDatabase, launchBrowser, packageRoot, PGRELAY_BIN, waitFor } from "./harness.mjs";

let db, browser, demo, log = "";

before(async () => {
  db = await freshDatabase();
  browser = await launchBrowser();
});

after(async () => {
  if (demo && demo.exitCode === null && demo.signalCode === null) {
    const exited = new Promise((r) => demo.once("exit", r));
    demo.kill("SIGTERM");
    await exited;
  }
  await browser?.close();
  await db?.drop();
});

test("pgrelay demo --web serves a page whose windows show each other's edits and PostgreSQL's", async () => {
  const port = await freePort();
  demo = spawn(PGRELAY_BIN, ["demo", "--web", "--database-url", db.url, "--listen", `127.0.0.1:${port}`, "--web-dist", join(packageRoot, "dist"), "--write-every", "1s"], {
    stdio: ["ignore", "pipe", "pipe"],
    env: { ...process.env, RUST_LOG: process.env.RUST_LOG ?? "warn" },
  });
  demo.stdout.on("data", (d) => (log += d));
  demo.stderr.on("data", (d) => (log += d));
  const origin = `http://127.0.0.1:${port}`;
  await waitFor("the demo's page", async () => {
    if (demo.exitCode !== null) throw new Error(`pgrelay demo exited: ${log}`);
    const r = await fetch(origin + "/").catch(() => null);
    return r?.status === 200;
  });
  // The banner may come a moment after the page is served.
  await waitFor("the demo's banner", () => /open http:\/\/127\.0\.0\.1:\d+\/ in two browser windows/.test(log));

  const page = await browser.newPage({ viewport: { width: 1180, height: 640 } });
  page.on("console", (m) => {
    if (m.type() === "error" || process.env.PAGE_LOG) console.error(`[page ${m.type()}] ${m.text()}`);
  });
  // The two windows side by side in one page of the demo's origin (so
  // their storage is first-party, as in two real windows).
  await page.goto(`${origin}/health`);
  await page.setContent(`<!doctype html><body style="margin:0;display:flex;gap:12px;background:#dde1e7;padding:12px">
    <iframe id="a" src="${origin}/?replica=a" style="flex:1;height:600px;border:0;border-radius:8px;background:white"></iframe>
    <iframe id="b" src="${origin}/?replica=b" style="flex:1;height:600px;border:0;border-radius:8px;background:white"></iframe></body>`);
  const a = page.frameLocator("#a");
  const b = page.frameLocator("#b");
  for (const w of [a, b]) await w.locator("#state").filter({ hasText: "live" }).waitFor({ timeout: 30_000 });

  // A todo added in window b appears in window a, and in PostgreSQL.
  await b.locator("#title").fill("Buy oat milk");
  await b.locator("#add button").click();
  await a.locator("li", { hasText: "Buy oat milk" }).waitFor({ timeout: 15_000 });
  await waitFor("the todo in PostgreSQL", async () => (await db.sql("SELECT count(*)::int AS n FROM pgrelay_web_todos WHERE title = 'Buy oat milk'")).rows[0].n === 1);

  // Ticked in window a: done in window b.
  await a.locator("li", { hasText: "Tick a todo" }).locator("input[type=checkbox]").check();
  await b.locator("li.done", { hasText: "Tick a todo" }).waitFor({ timeout: 15_000 });

  // The writer's rows reach both windows.
  for (const w of [a, b]) await w.locator("li", { hasText: "Written in PostgreSQL (#2)" }).waitFor({ timeout: 15_000 });

  // Window b offline: its edit waits, then arrives when it is back.
  await b.locator("#offline").check();
  await b.locator("#title").fill("Written while offline");
  await b.locator("#add button").click();
  await b.locator("#outbox").filter({ hasText: "1 write waiting" }).waitFor({ timeout: 5_000 });
  assert.equal(await a.locator("li", { hasText: "Written while offline" }).count(), 0);
  if (process.env.PGRELAY_DEMO_SCREENSHOT) await page.screenshot({ path: process.env.PGRELAY_DEMO_SCREENSHOT });
  await b.locator("#offline").uncheck();
  await a.locator("li", { hasText: "Written while offline" }).waitFor({ timeout: 15_000 });
  await page.close();

  const exited = new Promise((r) => demo.once("exit", r));
  demo.kill("SIGTERM");
  assert.equal(await exited, 0, `pgrelay demo --web ended badly:\n${log}`);
  const { rows } = await db.sql("SELECT count(*)::int AS n FROM pg_tables WHERE tablename = 'pgrelay_web_todos'");
  assert.equal(rows[0].n, 0, "the demo dropped its table on the way out");
});
