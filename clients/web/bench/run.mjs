// `npm run bench`: the browser client's figures, measured in the system's
// headless Chromium against a real `pgrelay serve` and PostgreSQL.
//   hydrate  - 1,000,000 rows of `pgrelay bench hydrate`'s table into a fresh
//              OPFS replica, connect() to caught up; reference: the Rust
//              client (`pgrelay client sync --exit-when-caught-up`) on the
//              same rows and server, in the same run.
//   apply    - a backlog of committed rows (written while the page was
//              offline) applied after it reconnects, rows/s.
//   latency  - PostgreSQL COMMIT returned in Node -> the page's `watch`
//              callback holding the row, at a steady 100 tx/s; reference:
//              `pgrelay bench latency --clients 1 --rate 100` right after
//              each run (the Rust client, its own in-process server).
//   size     - the package's JavaScript, gzipped, without sqlite3.wasm.
//   repair   - (not in the default list) a replica back after 0.1 % of its
//              BENCH_REPAIR_ROWS rows changed and the change log was reset,
//              repaired range by range; reference: a full hydration of a
//              fresh replica in the same run (`pgrelay bench repair`'s
//              changes: one row in 3,000 inserted, one updated, one deleted).
// Each measurement runs RUNS times (default 3); min / median / max printed
// and written to bench/results.json.
// Env: PGRELAY_TEST_DATABASE_URL, PGRELAY_BIN, BENCH_ROWS (1000000),
// BENCH_APPLY_ROWS (200000), BENCH_LATENCY_TX (1000), BENCH_REPAIR_ROWS
// (1000000), RUNS (3), ONLY (comma list).
import { spawn } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { gzipSync } from "node:zlib";
import { performance } from "node:perf_hooks";
import { freshDatabase, launchBrowser, launchProfile, openPage, packageRoot, PGRELAY_BIN, startPages, startServer, waitFor } from "../test/browser/harness.mjs";

const ROWS = Number(process.env.BENCH_ROWS ?? 1_000_000);
const APPLY_ROWS = Number(process.env.BENCH_APPLY_ROWS ?? 200_000);
const LATENCY_TX = Number(process.env.BENCH_LATENCY_TX ?? 1000);
const RUNS = Number(process.env.RUNS ?? 3);
const REPAIR_ROWS = Number(process.env.BENCH_REPAIR_ROWS ?? 1_000_000);
const ONLY = (process.env.ONLY ?? "size,hydrate,apply,latency").split(",");

// `pgrelay bench hydrate`'s table and rows (crates/pgrelay/src/bench/capture.rs).
const TABLE_DDL = `CREATE TABLE public.bench_items (
    id bigint PRIMARY KEY, n int NOT NULL, name text NOT NULL, price numeric(12,2),
    tags text[], doc jsonb, at timestamptz NOT NULL DEFAULT now())`;
const insertSql = (first, count) => `INSERT INTO public.bench_items (id, n, name, price, tags, doc, at)
  SELECT g, g % 1000, 'item number ' || g, (g % 100000) / 100.0,
         ARRAY['tag' || (g % 7), 'tag' || (g % 11)],
         jsonb_build_object('k', g, 'label', 'row ' || g, 'flag', g % 2 = 0), now()
  FROM generate_series(${first}, ${first + count - 1}) g`;

const spread = (xs) => {
  const s = [...xs].sort((a, b) => a - b);
  return { min: s[0], median: s[Math.floor((s.length - 1) / 2)], max: s[s.length - 1], runs: xs };
};
const fmt = (n) => Math.round(n).toLocaleString("en-US");
const results = { machine: { node: process.version, cpus: (await import("node:os")).cpus().length }, config: { ROWS, APPLY_ROWS, LATENCY_TX, RUNS } };

/** Inserts rows first..first+rows-1 in transactions of txSize rows. */
async function load(db, rows, txSize = 10_000, first = 1) {
  for (let done = 0; done < rows; done += txSize) await db.sql(insertSql(first + done, Math.min(txSize, rows - done)));
}

function percentile(sorted, p) {
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))];
}

/** Seconds `pgrelay client sync --exit-when-caught-up` takes on the replica file `db`. */
async function rustSync(serverUrl, db) {
  const started = performance.now();
  await new Promise((resolve, reject) => {
    const child = spawn(PGRELAY_BIN, ["client", "sync", "--exit-when-caught-up", "--server", serverUrl, "--db", db], { stdio: ["ignore", "ignore", "inherit"], env: { ...process.env, PGRELAY_LOG: "warn" } });
    child.on("exit", (code) => (code === 0 ? resolve() : reject(new Error(`pgrelay client sync exited ${code}`))));
  });
  return (performance.now() - started) / 1000;
}

/**
 * The Rust client's commit -> SQLite commit latency at 100 tx/s on this
 * machine now (`pgrelay bench latency`, its own server in process, the
 * commit record's time as the start): a reference for the load, not the
 * same path as the page's.
 */
async function rustLatency(seconds) {
  const out = await new Promise((resolve, reject) => {
    let text = "";
    const child = spawn(PGRELAY_BIN, ["bench", "latency", "--database-url", process.env.PGRELAY_TEST_DATABASE_URL ?? "postgres://postgres@127.0.0.1:5433/postgres", "--clients", "1", "--rate", "100", "--duration", `${seconds}s`], { stdio: ["ignore", "pipe", "ignore"], env: { ...process.env, RUST_LOG: "warn" } });
    child.stdout.on("data", (d) => (text += d));
    child.on("exit", (code) => (code === 0 ? resolve(text) : reject(new Error(`pgrelay bench latency exited ${code}`))));
  });
  const ms = (name) => Number(new RegExp(`^\\s+${name}\\s+([0-9.]+) ms`, "m").exec(out)?.[1] ?? NaN);
  return { p50: ms("p50"), p99: ms("p99") };
}

async function rustHydrate(serverUrl) {
  const dir = mkdtempSync(join(tmpdir(), "pgrelay-bench-"));
  const secs = await rustSync(serverUrl, join(dir, "r.sqlite"));
  rmSync(dir, { recursive: true, force: true });
  return secs;
}

/** A fresh browser context (fresh OPFS) with a page connected; resolves when caught up. */
async function hydratePage(browser, origin, url, name) {
  const dir = mkdtempSync(join(tmpdir(), "pgrelay-bench-profile-"));
  const context = await launchProfile(dir);
  context.dir = dir;
  const page = await openPage(context, origin);
  const t0 = Date.now();
  await page.evaluate(({ url, name }) => window.open_({ url, name }), { url, name });
  await waitFor("caught up", () => page.evaluate(() => window.db.status.caughtUp), 900_000, 20);
  const secs = (Date.now() - t0) / 1000;
  return { context, page, secs };
}

async function closeProfile(context) {
  await context.close();
  rmSync(context.dir, { recursive: true, force: true, maxRetries: 10, retryDelay: 200 });
}

if (ONLY.includes("size")) {
  const files = ["index.js", "worker.js", "react.js"];
  const sizes = Object.fromEntries(files.map((f) => {
    const b = readFileSync(join(packageRoot, "dist", f));
    return [f, { bytes: b.length, gzip: gzipSync(b, { level: 9 }).length }];
  }));
  const wasm = readFileSync(join(packageRoot, "dist", "sqlite3.wasm"));
  results.size = { ...sizes, total_gzip: files.reduce((n, f) => n + sizes[f].gzip, 0), wasm: { bytes: wasm.length, gzip: gzipSync(wasm, { level: 9 }).length } };
  console.log(`size: JavaScript ${fmt(results.size.total_gzip)} bytes gzipped (${files.map((f) => `${f} ${fmt(sizes[f].gzip)}`).join(", ")}); sqlite3.wasm ${fmt(wasm.length)} bytes (${fmt(results.size.wasm.gzip)} gzipped, not counted)`);
}

const pages = await startPages();
const browser = await launchBrowser();
try {
  if (ONLY.includes("hydrate")) {
    const db = await freshDatabase();
    try {
      await db.sql(TABLE_DDL);
      console.error(`loading ${fmt(ROWS)} rows ...`);
      await load(db, ROWS);
      await db.sql("VACUUM ANALYZE public.bench_items");
      const server = await startServer(db.url, ["--tables", "public.bench_items"]);
      try {
        const web = [], rust = [];
        for (let i = 0; i < RUNS; i++) {
          rust.push(ROWS / (await rustHydrate(server.url)));
          const { context, page, secs } = await hydratePage(browser, pages.origin, server.url, `h${i}`);
          const n = await page.evaluate(async () => (await window.db.query("SELECT count(*) AS n FROM bench_items"))[0].n);
          if (n !== ROWS) throw new Error(`the replica holds ${n} rows, PostgreSQL ${ROWS}`);
          const storage = await page.evaluate(() => window.db.storage);
          web.push(ROWS / secs);
          console.error(`  run ${i + 1}: browser (${storage}) ${fmt(ROWS / secs)} rows/s, Rust client ${fmt(rust[i])} rows/s`);
          await page.evaluate(() => window.db.close());
          await closeProfile(context);
        }
        results.hydrate = { rows: ROWS, browser_rows_per_sec: spread(web), rust_client_rows_per_sec: spread(rust) };
        console.log(`hydrate ${fmt(ROWS)} rows: browser ${fmt(spread(web).min)} / ${fmt(spread(web).median)} / ${fmt(spread(web).max)} rows/s; Rust client ${fmt(spread(rust).min)} / ${fmt(spread(rust).median)} / ${fmt(spread(rust).max)} rows/s (min / median / max of ${RUNS})`);
      } finally {
        await server.kill();
      }
    } finally {
      await db.drop();
    }
  }

  if (ONLY.includes("apply") || ONLY.includes("latency")) {
    const db = await freshDatabase();
    try {
      await db.sql(TABLE_DDL);
      await db.sql(`CREATE TABLE public.lat (id bigint PRIMARY KEY, note text)`);
      const server = await startServer(db.url);
      try {
        const { context, page } = await hydratePage(browser, pages.origin, server.url, "live");
        let next = 1;
        if (ONLY.includes("apply")) {
          const rates = [], rust = [];
          const rustDir = mkdtempSync(join(tmpdir(), "pgrelay-bench-"));
          const rustDb = join(rustDir, "r.sqlite");
          for (let i = 0; i < RUNS; i++) {
            await rustSync(server.url, rustDb);
            await page.evaluate(() => window.db.setOffline(true));
            await load(db, APPLY_ROWS, 1000, next);
            const { rows } = await db.sql("SELECT count(*)::int AS n FROM public.bench_items");
            const t0 = performance.now();
            await page.evaluate(() => window.db.setOffline(false));
            // Transactions apply whole and in order, so the backlog's last
            // row present means all of it is (checked by the count after).
            // A key lookup: polling count(*) every 20 ms took worker time.
            const last = next + APPLY_ROWS - 1;
            await waitFor("the backlog", () => page.evaluate(async (id) => (await window.db.query("SELECT 1 AS x FROM bench_items WHERE id = ?", [id])).length === 1, last), 600_000, 20);
            const secs = (performance.now() - t0) / 1000;
            const held = await page.evaluate(async () => (await window.db.query("SELECT count(*) AS n FROM bench_items"))[0].n);
            if (held !== rows[0].n) throw new Error(`the replica holds ${held} rows, PostgreSQL ${rows[0].n}`);
            next += APPLY_ROWS;
            rates.push(APPLY_ROWS / secs);
            // The same backlog, from the same server, into the Rust client's replica.
            rust.push(APPLY_ROWS / (await rustSync(server.url, rustDb)));
            console.error(`  apply run ${i + 1}: browser ${fmt(APPLY_ROWS / secs)} rows/s, Rust client ${fmt(rust[i])} rows/s`);
            await db.sql("DELETE FROM public.bench_items");
            await waitFor("the delete", () => page.evaluate(async () => (await window.db.query("SELECT 1 AS x FROM bench_items LIMIT 1")).length === 0), 600_000, 50);
          }
          rmSync(rustDir, { recursive: true, force: true });
          results.apply = { rows: APPLY_ROWS, tx_rows: 1000, browser_rows_per_sec: spread(rates), rust_client_rows_per_sec: spread(rust) };
          const s = spread(rates), r = spread(rust);
          console.log(`apply a backlog of ${fmt(APPLY_ROWS)} rows (1,000 per transaction): browser ${fmt(s.min)} / ${fmt(s.median)} / ${fmt(s.max)} rows/s; Rust client ${fmt(r.min)} / ${fmt(r.median)} / ${fmt(r.max)} rows/s (min / median / max of ${RUNS})`);
        }
        if (ONLY.includes("latency")) {
          await page.evaluate(() => {
            window.seen = new Map();
            window.appliedAt = [];
            window.db.on("changed", (c) => {
              if (c.tables.includes("lat")) for (const _ of c.commitTimesUs) window.appliedAt.push(c.appliedAtMs);
            });
            window.db.watch("SELECT id FROM lat ORDER BY id DESC LIMIT 50", [], (rows) => {
              const at = performance.timeOrigin + performance.now();
              for (const r of rows) if (!window.seen.has(Number(r.id))) window.seen.set(Number(r.id), at);
            });
          });
          const p50s = [], p99s = [], maxes = [], appliedP50s = [], appliedP99s = [], rustP50s = [], rustP99s = [];
          for (let run = 0; run < RUNS; run++) {
            const committed = new Map();
            const first = next;
            const t0 = performance.now();
            for (let k = 0; k < LATENCY_TX; k++) {
              const due = t0 + k * 10; // 100 tx/s
              const wait = due - performance.now();
              if (wait > 0) await new Promise((r) => setTimeout(r, wait));
              await db.sql("INSERT INTO lat VALUES ($1, 'x')", [next]);
              committed.set(next, performance.timeOrigin + performance.now());
              next++;
            }
            const last = next - 1;
            await waitFor("the last row in the page", () => page.evaluate((id) => window.seen.has(id), last), 30_000, 20);
            const seen = new Map(await page.evaluate(() => [...window.seen]));
            const appliedAt = await page.evaluate(() => window.appliedAt.splice(0));
            const lat = [], toApplied = [], toWatch = [];
            for (let id = first; id <= last; id++) {
              if (!seen.has(id)) throw new Error(`row ${id} never reached the watch callback`);
              lat.push(seen.get(id) - committed.get(id));
              const applied = appliedAt[id - first];
              if (applied !== undefined) {
                toApplied.push(applied - committed.get(id));
                toWatch.push(seen.get(id) - applied);
              }
            }
            toApplied.sort((a, b) => a - b);
            toWatch.sort((a, b) => a - b);
            if (toApplied.length === lat.length) {
              appliedP50s.push(percentile(toApplied, 50));
              appliedP99s.push(percentile(toApplied, 99));
              console.error(`    stages: commit -> applied in the worker p50 ${percentile(toApplied, 50).toFixed(1)} / p99 ${percentile(toApplied, 99).toFixed(1)} ms; applied -> watch callback p50 ${percentile(toWatch, 50).toFixed(1)} / p99 ${percentile(toWatch, 99).toFixed(1)} ms`);
            }
            lat.sort((a, b) => a - b);
            p50s.push(percentile(lat, 50));
            p99s.push(percentile(lat, 99));
            maxes.push(lat[lat.length - 1]);
            const rust = await rustLatency(LATENCY_TX / 100);
            rustP50s.push(rust.p50);
            rustP99s.push(rust.p99);
            console.error(`  latency run ${run + 1}: p50 ${percentile(lat, 50).toFixed(1)} ms, p99 ${percentile(lat, 99).toFixed(1)} ms, max ${lat[lat.length - 1].toFixed(1)} ms; Rust client right after (pgrelay bench latency): p50 ${rust.p50.toFixed(1)} ms, p99 ${rust.p99.toFixed(1)} ms`);
          }
          results.latency = { tx: LATENCY_TX, rate_per_sec: 100, p50_ms: spread(p50s), p99_ms: spread(p99s), max_ms: spread(maxes), commit_to_applied_p50_ms: spread(appliedP50s), commit_to_applied_p99_ms: spread(appliedP99s), rust_client_p50_ms: spread(rustP50s), rust_client_p99_ms: spread(rustP99s) };
          const a = spread(p50s), b = spread(p99s), c = spread(rustP50s), d = spread(rustP99s);
          console.log(`commit -> watch at 100 tx/s (${LATENCY_TX} tx per run): p50 ${a.min.toFixed(1)} / ${a.median.toFixed(1)} / ${a.max.toFixed(1)} ms, p99 ${b.min.toFixed(1)} / ${b.median.toFixed(1)} / ${b.max.toFixed(1)} ms; Rust client (pgrelay bench latency --clients 1 --rate 100) p50 ${c.min.toFixed(1)} / ${c.median.toFixed(1)} / ${c.max.toFixed(1)} ms, p99 ${d.min.toFixed(1)} / ${d.median.toFixed(1)} / ${d.max.toFixed(1)} ms (min / median / max of ${RUNS})`);
        }
        await closeProfile(context);
      } finally {
        await server.kill();
      }
    } finally {
      await db.drop();
    }
  }
  if (ONLY.includes("repair")) {
    // Every EVERY keys one row is inserted (into a gap left at load), one
    // updated, one deleted: 0.1 % of the rows. Each run uses gaps and
    // deletions of its own, so runs repeat the same amount of change.
    const EVERY = 3000;
    const db = await freshDatabase();
    try {
      await db.sql(TABLE_DDL);
      console.error(`loading ${fmt(REPAIR_ROWS)} rows ...`);
      await load(db, REPAIR_ROWS);
      await db.sql(`DELETE FROM public.bench_items WHERE id % ${EVERY} IN (${Array.from({ length: RUNS }, (_, r) => 10 * r).join(", ")})`);
      await db.sql("VACUUM ANALYZE public.bench_items");
      const server = await startServer(db.url, ["--tables", "public.bench_items"]);
      try {
        const runs = [];
        for (let r = 0; r < RUNS; r++) {
          const { context, page, secs } = await hydratePage(browser, pages.origin, server.url, `repair${r}`);
          const hydrated = await page.evaluate(() => window.events.find((e) => e.name === "hydrated"));
          await page.evaluate(() => window.db.setOffline(true));
          await server.kill();
          await db.sql(`INSERT INTO public.bench_items (id, n, name, price, tags, doc)
              SELECT id - 1, n, name || ' (new)', price, tags, doc FROM public.bench_items WHERE id % ${EVERY} = ${10 * r + 1};
            UPDATE public.bench_items SET n = n + 1, name = name || ' (edited)' WHERE id % ${EVERY} = 2;
            DELETE FROM public.bench_items WHERE id % ${EVERY} = ${10 * r + 3};
            UPDATE pgrelay.log_state SET log_id = 'bench-repair-' || md5(random()::text);`);
          await server.start();
          const t0 = performance.now();
          await page.evaluate(() => window.db.setOffline(false));
          const repaired = await waitFor("the repair", () => page.evaluate(() => window.events.find((e) => e.name === "repaired")), 900_000, 20);
          await waitFor("caught up", () => page.evaluate(() => window.db.status.caughtUp), 900_000, 20);
          const repairSecs = (performance.now() - t0) / 1000;
          const [{ n, s }] = (await db.sql("SELECT count(*)::int AS n, sum(n)::int8::text AS s FROM public.bench_items")).rows;
          const held = await page.evaluate(async () => (await window.db.query("SELECT count(*) AS n, sum(n) AS s FROM bench_items"))[0]);
          if (held.n !== n || String(held.s) !== s) throw new Error(`the repaired replica holds ${held.n} rows (sum ${held.s}), PostgreSQL ${n} (sum ${s})`);
          if (repaired.refetch.length > 0 || (await page.evaluate(() => window.events.filter((e) => e.name === "hydrated").length)) !== 1) throw new Error("the replica was fetched whole again");
          runs.push({ hydrate_secs: secs, hydrate_wire_bytes: hydrated.wireBytes, repair_secs: repairSecs, repair_bytes: repaired.bytes, repair_bytes_received: repaired.bytesReceived, rows_received: repaired.rowsReceived, rounds: repaired.rounds });
          console.error(`  repair run ${r + 1}: hydration ${secs.toFixed(2)} s, ${fmt(hydrated.wireBytes)} bytes; repair ${repairSecs.toFixed(2)} s, ${fmt(repaired.bytesReceived)} bytes received, ${fmt(repaired.bytes)} both ways, ${fmt(repaired.rowsReceived)} rows, ${repaired.rounds} rounds`);
          await page.evaluate(() => window.db.close());
          await closeProfile(context);
        }
        const pick = (k) => spread(runs.map((x) => x[k]));
        const [hs, rs, rb, rr, hb] = [pick("hydrate_secs"), pick("repair_secs"), pick("repair_bytes"), pick("repair_bytes_received"), pick("hydrate_wire_bytes")];
        results.repair = { rows: REPAIR_ROWS, changed: 3 * Math.floor(REPAIR_ROWS / EVERY), runs };
        console.log(`repair ${fmt(REPAIR_ROWS)} rows after ${fmt(3 * Math.floor(REPAIR_ROWS / EVERY))} changed: ${rs.min.toFixed(2)} / ${rs.median.toFixed(2)} / ${rs.max.toFixed(2)} s (hydration ${hs.min.toFixed(2)} / ${hs.median.toFixed(2)} / ${hs.max.toFixed(2)} s: ${((100 * rs.median) / hs.median).toFixed(1)} % of its time); received ${fmt(rr.median)} bytes (${((100 * rr.median) / hb.median).toFixed(2)} % of the hydration's ${fmt(hb.median)}), ${fmt(rb.median)} both ways (${((100 * rb.median) / hb.median).toFixed(2)} %) (min / median / max of ${RUNS})`);
      } finally {
        await server.kill();
      }
    } finally {
      await db.drop();
    }
  }
} finally {
  await browser.close();
  await pages.close();
}
writeFileSync(join(packageRoot, "bench", "results.json"), JSON.stringify(results, null, 2) + "\n");
