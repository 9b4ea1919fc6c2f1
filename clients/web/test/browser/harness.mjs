// Real components for the browser tests: a fresh PostgreSQL database, a
// real `pgrelay serve`, a static server for the pages, and the system's
// Chromium driven by playwright-core (nothing downloads a browser).
import { spawn } from "node:child_process";
import { createServer } from "node:http";
import { readFile } from "node:fs/promises";
import { existsSync } from "node:fs";
import { tmpdir } from "node:os";
import { createServer as createNet } from "node:net";
import { after, before } from "node:test";
import { dirname, extname, join, normalize } from "node:path";
import { fileURLToPath } from "node:url";
import pg from "pg";
import { chromium } from "playwright-core";

export const here = dirname(fileURLToPath(import.meta.url));
export const packageRoot = join(here, "..", "..");

export const DATABASE_URL = process.env.PGRELAY_TEST_DATABASE_URL ?? "postgres://postgres@127.0.0.1:5433/postgres";
export const PGRELAY_BIN = process.env.PGRELAY_BIN ?? join(packageRoot, "..", "..", "target", "release", "pgrelay");
export const CHROMIUM = process.env.CHROMIUM_BIN ?? "/usr/bin/chromium";

export async function freePort() {
  return await new Promise((resolve, reject) => {
    const s = createNet();
    s.listen(0, "127.0.0.1", () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
    s.on("error", reject);
  });
}

/** Settles like `promise`, or rejects once `ms` have passed (a call that never answers fails, it does not hang). */
export async function within(ms, what, promise) {
  let timer;
  const late = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what}: no answer within ${ms} ms`)), Math.max(ms, 0));
  });
  try {
    return await Promise.race([promise, late]);
  } finally {
    clearTimeout(timer);
  }
}

/**
 * Polls `check` until it returns a truthy value or the deadline passes. A
 * check that never settles (a page call that never answers) counts against
 * the same deadline.
 */
export async function waitFor(what, check, timeoutMs = 30_000, everyMs = 50) {
  const deadline = Date.now() + timeoutMs;
  let last;
  for (;;) {
    try {
      last = await within(deadline - Date.now(), `checking ${what}`, Promise.resolve().then(check));
      if (last) return last;
    } catch (e) {
      last = e;
    }
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what} (last: ${last instanceof Error ? last.message : JSON.stringify(last)})`);
    await new Promise((r) => setTimeout(r, everyMs));
  }
}

/** A fresh database, dropped (with its slot) by `drop()`. */
export async function freshDatabase() {
  const name = `pgrelay_web_${Date.now().toString(36)}_${Math.random().toString(36).slice(2, 8)}`;
  const admin = new pg.Client({ connectionString: DATABASE_URL });
  await admin.connect();
  await admin.query(`CREATE DATABASE ${name}`);
  await admin.end();
  const url = new URL(DATABASE_URL);
  url.pathname = `/${name}`;
  const client = new pg.Client({ connectionString: url.toString() });
  await client.connect();
  return {
    url: url.toString(),
    sql: (text, params) => client.query(text, params),
    async drop() {
      await client.end().catch(() => {});
      const a = new pg.Client({ connectionString: DATABASE_URL });
      await a.connect();
      await a.query(`SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()`, [name]);
      await a.query(`SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = $1 AND NOT active`, [name]).catch(() => {});
      await a.query(`DROP DATABASE IF EXISTS ${name}`).catch(() => {});
      await a.end();
    },
  };
}

/** Servers still running when this process exits are killed with it. */
const children = new Set();
process.once("exit", () => {
  for (const child of children) child.kill("SIGKILL");
});

/** A running `pgrelay serve`; `kill()` sends SIGKILL, `restart()` starts it again on the same port. */
export async function startServer(databaseUrl, extraArgs = [], port) {
  port ??= await freePort();
  const server = { port, url: `ws://127.0.0.1:${port}`, process: null, log: "" };
  server.start = async () => {
    // A slot and an event log of its own: other runs may share the PostgreSQL.
    const slot = `pgrelay_${new URL(databaseUrl).pathname.slice(1)}`.slice(0, 63);
    const args = ["serve", "--database-url", databaseUrl, "--listen", `127.0.0.1:${port}`, "--connect-rate", "0", "--slot", slot, "--eventlog-db", join(tmpdir(), `${slot}-events.sqlite`), ...extraArgs];
    const child = spawn(PGRELAY_BIN, args, {
      stdio: ["ignore", "pipe", "pipe"],
      env: { ...process.env, RUST_LOG: process.env.RUST_LOG ?? "warn" },
    });
    child.stdout.on("data", (d) => (server.log += d));
    child.stderr.on("data", (d) => (server.log += d));
    child.on("error", (e) => (server.log += `cannot start ${PGRELAY_BIN}: ${e.message}`));
    server.process = child;
    children.add(child);
    // Remembered here: a process ended by a signal keeps `exitCode` null,
    // and "exit" fires only once.
    server.exited = new Promise((r) => child.once("exit", r));
    child.once("exit", () => {
      children.delete(child);
      if (server.process === child) server.process = null;
    });
    await waitFor("pgrelay serve to answer", async () => {
      if (child.exitCode !== null || child.signalCode !== null) throw new Error(`pgrelay serve exited: ${server.log}`);
      const r = await fetch(`http://127.0.0.1:${port}/health`).catch(() => null);
      return r && r.status < 500;
    }, 30_000, 100);
  };
  /** Sends `signal` and waits (at most 10 s) until the process is gone; at once when it already is. */
  server.kill = async (signal = "SIGKILL") => {
    const child = server.process;
    if (!child) return;
    child.kill(signal);
    await within(10_000, `pgrelay serve on port ${port} to exit after ${signal}`, server.exited);
  };
  server.restart = async () => {
    await server.kill();
    await server.start();
  };
  await server.start();
  return server;
}

const TYPES = { ".html": "text/html", ".js": "text/javascript", ".mjs": "text/javascript", ".wasm": "application/wasm", ".map": "application/json", ".css": "text/css", ".png": "image/png" };

/** Serves the package's dist/ and the test pages on one origin. */
export async function startPages(roots = { "/dist/": join(packageRoot, "dist"), "/": join(here, "pages") }) {
  const server = createServer(async (req, res) => {
    const path = decodeURIComponent(new URL(req.url, "http://x").pathname);
    for (const [prefix, dir] of Object.entries(roots)) {
      if (!path.startsWith(prefix)) continue;
      const file = normalize(join(dir, path.slice(prefix.length) || "index.html"));
      if (!file.startsWith(dir) || !existsSync(file)) continue;
      res.writeHead(200, { "content-type": TYPES[extname(file)] ?? "application/octet-stream", "cache-control": "no-store" });
      res.end(await readFile(file));
      return;
    }
    res.writeHead(404);
    res.end("not found");
  });
  await new Promise((r) => server.listen(0, "127.0.0.1", r));
  const { port } = server.address();
  return { origin: `http://127.0.0.1:${port}`, close: () => new Promise((r) => server.close(r)) };
}

const CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"];

export async function launchBrowser() {
  return await chromium.launch({ executablePath: CHROMIUM, headless: true, args: CHROMIUM_ARGS });
}

/**
 * A browser with a profile on disk, as a user's is (an ordinary context's
 * storage lives in memory): OPFS writes go to real files.
 */
export async function launchProfile(userDataDir) {
  return await chromium.launchPersistentContext(userDataDir, { executablePath: CHROMIUM, headless: true, args: CHROMIUM_ARGS });
}

/** A page of the test app, with `window.pgrelay` (the package) loaded. */
export async function openPage(context, origin, path = "/app.html") {
  const page = await context.newPage();
  page.on("pageerror", (e) => console.error(`[page error] ${e.message}`));
  page.on("console", (m) => {
    if (m.type() === "error" || process.env.PAGE_LOG) console.error(`[page ${m.type()}] ${m.text()}`);
  });
  await page.goto(origin + path);
  await page.waitForFunction(() => window.pgrelay !== undefined);
  return page;
}

/** What `useWorld` set up for this test file (each file runs in its own process). */
export let db, server, pages, browser;

/**
 * The set-up most browser test files share: a fresh database prepared by
 * `prepare` (SQL text, or a function given the database), a `pgrelay serve`
 * on it with `serverArgs`, the test pages and Chromium, all stopped after
 * the file's tests. The tests read them as `db`, `server`, `pages` and
 * `browser`, imported from here.
 */
export function useWorld(prepare, serverArgs = []) {
  before(async () => {
    db = await freshDatabase();
    if (typeof prepare === "function") await prepare(db);
    else await db.sql(prepare);
    server = await startServer(db.url, serverArgs);
    pages = await startPages();
    browser = await launchBrowser();
  });
  after(async () => {
    await browser?.close();
    await pages?.close();
    await server?.kill();
    await db?.drop();
  });
}

/** How many rows of `todos` the page's replica holds `where`. */
export const countTodos = (page, where = "true") =>
  page.evaluate(async (w) => (await window.db.query(`SELECT count(*) AS n FROM todos WHERE ${w}`))[0].n, where);
