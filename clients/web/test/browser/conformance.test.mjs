// The shared conformance suite, web runner: every scenario of
// `conformance/scenarios.json` (the same file the Rust client's runner,
// crates/pgrelay/tests/integration/conformance.rs, reads) run against the
// web client in headless Chromium and a real `pgrelay serve`.
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { freshDatabase, launchBrowser, openPage, packageRoot, startPages, startServer, waitFor } from "./harness.mjs";
import { meddlingProxy } from "./proxy.mjs";

const suite = JSON.parse(readFileSync(join(packageRoot, "..", "..", "conformance", "scenarios.json"), "utf8"));
const WAIT = 60_000;

let pages, browser;

before(async () => {
  pages = await startPages();
  browser = await launchBrowser();
});

after(async () => {
  await browser?.close();
  await pages?.close();
});

/** Values as text, as the Rust runner compares them. */
const text = (v) => (v === null || v === undefined ? null : String(v));

async function pgRows(db, query) {
  const r = await db.sql({ text: query, rowMode: "array" });
  return r.rows.map((row) => row.map(text));
}

async function replicaRows(page, query) {
  const rows = await page.evaluate(async (q) => (await window.db.query(q)).map((r) => Object.values(r).map((v) => (v === null ? null : String(v)))), query);
  return rows.map((row) => row.map(text));
}

const scalar = (rows) => rows[0]?.[0] ?? null;

for (const scenario of suite.scenarios) {
  test(`conformance: ${scenario.name}`, async () => {
    const db = await freshDatabase();
    await db.sql(scenario.setup);
    const server = await startServer(db.url);
    const context = await browser.newContext();
    let page = null;
    let proxy = null;
    try {
      for (const [n, step] of scenario.steps.entries()) {
        const where = `${scenario.name} step ${n} (${step.do})`;
        switch (step.do) {
          case "connect":
            if (step.drop_schema) proxy = await meddlingProxy(server.port, (m) => m.type === "schema");
            if (page === null) {
              page = await openPage(context, pages.origin);
              await page.evaluate((o) => window.open_(o), { url: proxy?.url ?? server.url, name: `conformance-${scenario.name}`, backoffBaseMs: 50, backoffCapMs: 500 });
            } else {
              await page.evaluate(() => window.db.setOffline(false));
            }
            break;
          case "disconnect":
            await page.evaluate(() => window.db.setOffline(true));
            break;
          case "pg":
            await db.sql(step.sql);
            break;
          case "local":
            for (let i = 1; i <= (step.repeat ?? 1); i++) {
              const statements = step.sql.map((s) => s.replaceAll("{i}", String(i)));
              await page.evaluate(async (list) => {
                if (list.length === 1) await window.db.execute(list[0]);
                else
                  await window.db.transaction(async (tx) => {
                    for (const s of list) await tx.execute(s);
                  });
              }, statements);
            }
            break;
          case "replica":
            await page.evaluate((s) => window.db.execute(s), step.sql);
            break;
          case "kill_server":
            await server.kill("SIGKILL");
            break;
          case "start_server":
            await server.start();
            break;
          case "wait_caught_up":
            await waitFor(where, () => page.evaluate(() => window.db.status.caughtUp), WAIT);
            break;
          case "wait_equal": {
            let last = "";
            await waitFor(`${where}: the replica to equal PostgreSQL for ${step.query}`, async () => {
              const [a, b] = [await pgRows(db, step.query), await replicaRows(page, step.query).catch((e) => e.message)];
              last = `PostgreSQL ${a.length} rows, replica ${Array.isArray(b) ? b.length + " rows" : b}`;
              return JSON.stringify(a) === JSON.stringify(b);
            }, WAIT, 100).catch((e) => assert.fail(`${e.message}\n${last}`));
            break;
          }
          case "wait_pg":
          case "expect_pg": {
            const check = async () => scalar(await pgRows(db, step.query)) === step.equals;
            if (step.do === "wait_pg") await waitFor(`${where}: ${step.query} = ${step.equals}`, check, WAIT, 100);
            else assert.equal(scalar(await pgRows(db, step.query)), step.equals, `${where}: ${step.query}`);
            break;
          }
          case "wait_replica":
          case "expect_replica": {
            const check = async () => scalar(await replicaRows(page, step.query)) === step.equals;
            if (step.do === "wait_replica") await waitFor(`${where}: ${step.query} = ${step.equals}`, check, WAIT, 100);
            else assert.equal(scalar(await replicaRows(page, step.query)), step.equals, `${where}: ${step.query}`);
            break;
          }
          case "wait_server_table":
            await waitFor(where, async () => {
              const status = await (await fetch(`http://127.0.0.1:${server.port}/api/status`)).json();
              return status.tables?.some((t) => t.name === step.table && !t.skipped);
            }, WAIT);
            break;
          case "wait_error":
            await waitFor(where, () => page.evaluate(({ code, table }) => window.events.some((e) => e.name === "error" && e.code === code && e.message.includes(`table ${table} `)), step), WAIT);
            break;
          case "wait_repaired": {
            const repaired = await waitFor(where, () => page.evaluate(() => window.events.find((e) => e.name === "repaired")), WAIT);
            const full = await page.evaluate(() => window.events.filter((e) => e.name === "hydrated" && e.full).length);
            assert.equal(full, 1, `${where}: the replica was downloaded whole again`);
            assert.ok(repaired.rowsReceived <= step.max_rows_received && repaired.refetch.length === 0, `${where}: ${JSON.stringify(repaired)}`);
            break;
          }
          case "expect_schema_dropped":
            assert.ok(proxy && proxy.dropped > 0, `${where}: no schema frame was dropped`);
            break;
          default:
            assert.fail(`${where}: unknown step`);
        }
      }
    } finally {
      await context.close();
      await proxy?.close();
      await server.kill();
      await db.drop();
    }
  });
}
