// Recovery: a server killed with SIGKILL mid-stream, tokens that expire
// and tokens that are bad, and garbage frames from a proxy.
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { createHmac } from "node:crypto";
import { writeFileSync, mkdtempSync } from "node:fs";
import { createServer, connect as tcpConnect } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { freshDatabase, launchBrowser, openPage, startPages, startServer, waitFor } from "./harness.mjs";

let db, pages, browser;

before(async () => {
  db = await freshDatabase();
  await db.sql(`CREATE TABLE events (id bigint PRIMARY KEY, body text NOT NULL)`);
  pages = await startPages();
  browser = await launchBrowser();
});

after(async () => {
  await browser?.close();
  await pages?.close();
  await db?.drop();
});

async function replicaIds(page) {
  return await page.evaluate(async () => (await window.db.query("SELECT id FROM events ORDER BY id")).map((r) => Number(r.id)));
}

async function postgresIds() {
  return (await db.sql("SELECT id::int FROM events ORDER BY id")).rows.map((r) => r.id);
}

test("pages resume after pgrelay serve is killed and restarted mid-stream; nothing lost or doubled", async () => {
  const server = await startServer(db.url);
  try {
    const context = await browser.newContext();
    const page = await openPage(context, pages.origin);
    await page.evaluate((url) => window.open_({ url, name: "kill", backoffBaseMs: 50, backoffCapMs: 500 }), server.url);
    await waitFor("caught up", () => page.evaluate(() => window.db.status.caughtUp));
    let next = 1;
    const writer = (async () => {
      for (let i = 0; i < 60; i++) {
        await db.sql("INSERT INTO events VALUES ($1, 'e')", [next++]);
        await new Promise((r) => setTimeout(r, 20));
      }
    })();
    await waitFor("some events", async () => (await replicaIds(page)).length > 5);
    await server.kill("SIGKILL");
    await page.evaluate(() => window.db.execute("INSERT INTO events VALUES (100000, 'written while the server was down')"));
    await server.start();
    await writer;
    const expected = [...(await postgresIds())];
    await waitFor("the replica to equal PostgreSQL", async () => {
      const want = await postgresIds();
      return JSON.stringify(await replicaIds(page)) === JSON.stringify(want) && want.includes(100000);
    }, 60_000, 200);
    assert.ok(expected.length >= 60);
    await context.close();
  } finally {
    await server.kill();
  }
});

function jwt(secret, claims) {
  const b64 = (o) => Buffer.from(JSON.stringify(o)).toString("base64url");
  const head = `${b64({ alg: "HS256", typ: "JWT" })}.${b64(claims)}`;
  return `${head}.${createHmac("sha256", secret).update(head).digest("base64url")}`;
}

test("an expiring token is refreshed through getToken; a bad token gives a clear error", async () => {
  const dir = mkdtempSync(join(tmpdir(), "pgrelay-web-"));
  const secret = "a-test-secret-that-is-at-least-32-bytes-long";
  writeFileSync(join(dir, "secret"), secret);
  const server = await startServer(db.url, ["--auth", "jwt", "--jwt-secret-file", join(dir, "secret")]);
  try {
    const context = await browser.newContext();
    const page = await openPage(context, pages.origin);
    await page.exposeFunction("makeToken", () => jwt(secret, { sub: "alice", exp: Math.floor(Date.now() / 1000) + 3 }));
    await page.evaluate(async (url) => {
      window.tokens = 0;
      window.db = await window.pgrelay.connect({ url, name: "auth", backoffBaseMs: 50, getToken: async () => (window.tokens++, await window.makeToken()) });
      window.db.on("error", (e) => window.events.push({ name: "error", ...e }));
    }, server.url);
    await waitFor("caught up", () => page.evaluate(() => window.db.status.caughtUp));
    await waitFor("the token to expire and be refreshed", () => page.evaluate(() => window.tokens >= 2 && window.db.status.connection === "connected"), 20_000);
    const expired = await page.evaluate(() => window.events.filter((e) => e.name === "error").map((e) => e.code));
    assert.ok(expired.includes("token_expired"), `errors seen: ${expired}`);
    await page.evaluate(() => window.db.execute("INSERT INTO events VALUES (200000, 'after refresh')", [], { waitForServer: true }));

    const bad = await openPage(context, pages.origin);
    await bad.evaluate((url) => window.open_({ url, name: "bad-token", token: "not-a-token", storage: "memory" }), server.url);
    const status = await waitFor("a clear error", () => bad.evaluate(() => (window.db.status.connection === "failed" ? window.db.status : null)));
    assert.equal(status.lastError.code, "unauthorized");
    assert.match(status.lastError.message, /unauthorized/);
    await context.close();
  } finally {
    await server.kill();
  }
});

/** A TCP proxy that can slip a garbage WebSocket frame to the client, or cut one short. */
async function garbageProxy(targetPort) {
  const clients = new Set();
  const proxy = createServer((client) => {
    const upstream = tcpConnect(targetPort, "127.0.0.1");
    client.pipe(upstream);
    upstream.pipe(client);
    clients.add(client);
    const end = () => {
      clients.delete(client);
      client.destroy();
      upstream.destroy();
    };
    client.on("error", end).on("close", end);
    upstream.on("error", end).on("close", end);
  });
  await new Promise((r) => proxy.listen(0, "127.0.0.1", r));
  return {
    url: `ws://127.0.0.1:${proxy.address().port}`,
    /** A text frame whose header promises more bytes than come before the connection ends. */
    truncate() {
      const body = Buffer.from('{"type":"tx","lsn":"0/1","xid":1,');
      for (const c of clients) {
        c.write(Buffer.concat([Buffer.from([0x81, 126, 0x01, 0x00]), body]));
        c.end();
      }
      return clients.size;
    },
    inject(payload) {
      // An unmasked server text frame with a payload that is not a message.
      const body = Buffer.from(payload);
      for (const c of clients) c.write(Buffer.concat([Buffer.from([0x81, body.length]), body]));
      return clients.size;
    },
    close: () => new Promise((r) => { for (const c of clients) c.destroy(); proxy.close(r); }),
  };
}

test("garbage and truncated frames from a proxy: the page reports an error, reconnects, and the replica is intact", async () => {
  const server = await startServer(db.url);
  const proxy = await garbageProxy(server.port);
  try {
    const context = await browser.newContext();
    const page = await openPage(context, pages.origin);
    await page.evaluate((url) => window.open_({ url, name: "garbage", backoffBaseMs: 50 }), proxy.url);
    await waitFor("caught up", () => page.evaluate(() => window.db.status.caughtUp));
    const before = await replicaIds(page);
    assert.ok(proxy.inject("{not json at all") > 0);
    const error = await waitFor("the error", () => page.evaluate(() => window.events.find((e) => e.name === "error") ?? null));
    assert.equal(error.code, "protocol");
    await waitFor("reconnected", () => page.evaluate(() => window.db.status.connection === "connected"));
    await db.sql("INSERT INTO events VALUES (300000, 'after the garbage')");
    await waitFor("the replica to equal PostgreSQL", async () => JSON.stringify(await replicaIds(page)) === JSON.stringify(await postgresIds()), 30_000);
    assert.ok((await replicaIds(page)).length > before.length);

    // A frame cut short by the connection ending: an error, a reconnect, nothing damaged.
    const errorsBefore = await page.evaluate(() => window.events.filter((e) => e.name === "error").length);
    assert.ok(proxy.truncate() > 0);
    await waitFor("the error about the cut frame", () => page.evaluate((n) => window.events.filter((e) => e.name === "error").length > n, errorsBefore));
    await waitFor("reconnected", () => page.evaluate(() => window.db.status.connection === "connected"));
    await db.sql("INSERT INTO events VALUES (300001, 'after the cut frame')");
    await waitFor("the replica to equal PostgreSQL", async () => JSON.stringify(await replicaIds(page)) === JSON.stringify(await postgresIds()), 30_000);
    await context.close();
  } finally {
    await proxy.close();
    await server.kill();
  }
});
