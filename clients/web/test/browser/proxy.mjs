// A TCP proxy between the page and `pgrelay serve` that reads the
// server's WebSocket frames (unmasked, unfragmented, no extensions: what
// the server sends) and can drop some, as the Rust tests' proxy does; the
// page's frames pass through untouched. Written by hand because no
// WebSocket library is among the package's dependencies and this needs
// only the framing.
import { createServer, connect as tcpConnect } from "node:net";

/** Parses complete frames off the front of `buffer`: [frames, rest]. */
function frames(buffer) {
  const out = [];
  let at = 0;
  for (;;) {
    if (buffer.length - at < 2) break;
    const b1 = buffer[at + 1];
    let len = b1 & 0x7f;
    let head = 2;
    if (len === 126) {
      if (buffer.length - at < 4) break;
      len = buffer.readUInt16BE(at + 2);
      head = 4;
    } else if (len === 127) {
      if (buffer.length - at < 10) break;
      len = Number(buffer.readBigUInt64BE(at + 2));
      head = 10;
    }
    if (b1 & 0x80) head += 4; // masked (not from a server, but harmless)
    if (buffer.length - at < head + len) break;
    out.push({ opcode: buffer[at] & 0x0f, raw: buffer.subarray(at, at + head + len), payload: buffer.subarray(at + head, at + head + len) });
    at += head + len;
  }
  return [out, buffer.subarray(at)];
}

/**
 * Starts the proxy. `drop(message)` gets each server text frame parsed as
 * JSON and returns true to drop it. `dropped` counts the frames dropped.
 */
export async function meddlingProxy(targetPort, drop) {
  const sockets = new Set();
  const proxy = {
    dropped: 0,
    url: "",
    close: () =>
      new Promise((r) => {
        for (const s of sockets) s.destroy();
        server.close(r);
      }),
  };
  const server = createServer((client) => {
    const upstream = tcpConnect(targetPort, "127.0.0.1");
    sockets.add(client).add(upstream);
    client.pipe(upstream);
    let upgraded = false;
    let pending = Buffer.alloc(0);
    upstream.on("data", (data) => {
      pending = Buffer.concat([pending, data]);
      if (!upgraded) {
        const end = pending.indexOf("\r\n\r\n");
        if (end < 0) return;
        client.write(pending.subarray(0, end + 4));
        pending = pending.subarray(end + 4);
        upgraded = true;
      }
      const [complete, rest] = frames(pending);
      pending = Buffer.from(rest);
      for (const f of complete) {
        if (f.opcode === 1) {
          let message = null;
          try {
            message = JSON.parse(f.payload.toString("utf8"));
          } catch {
            // Not JSON: passed on for the page to judge.
          }
          if (message && drop(message)) {
            proxy.dropped++;
            continue;
          }
        }
        client.write(f.raw);
      }
    });
    const end = () => {
      sockets.delete(client);
      sockets.delete(upstream);
      client.destroy();
      upstream.destroy();
    };
    client.on("error", end).on("close", end);
    upstream.on("error", end).on("close", end);
  });
  await new Promise((r) => server.listen(0, "127.0.0.1", r));
  proxy.url = `ws://127.0.0.1:${server.address().port}`;
  return proxy;
}
