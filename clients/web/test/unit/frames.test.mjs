// Write frames: the sizes computed before sending are the bytes sent, a
// transaction larger than one frame goes in `write_part` frames that
// carry every change once and in order, and what the protocol cannot
// carry is refused with a clear reason.
import { test } from "node:test";
import assert from "node:assert/strict";
import { BatchFrame, EncodedTransaction, encodeAlone, layout, MAX_TRANSACTION_BYTES, TooLargeError, utf8Length } from "../../build/node/frames.js";

const FRAME = 1 << 20;

function tx(id, count, width, text = "x") {
  const changes = [];
  for (let i = 0; i < count; i++) {
    changes.push({ id: `${id}-${i}`, table: "public.docs", op: "insert", new: { id: String(i), body: text.repeat(width) } });
  }
  return { id, changes };
}

test("UTF-8 lengths are counted in bytes, not UTF-16 units", () => {
  for (const s of ["plain", "é", "€uro", "😀 emoji", "mixed ü € 😀 a"]) {
    assert.equal(utf8Length(s), Buffer.byteLength(s, "utf8"), s);
  }
});

test("a transaction that fits one frame goes as one write frame of the measured size", () => {
  const encoded = new EncodedTransaction(tx("t1", 10, 100, "é"));
  const frames = encodeAlone("b-0000000000000000", encoded);
  assert.equal(frames.length, 1);
  const plan = layout("b-0000000000000000", encoded);
  assert.deepEqual(plan.sizes, [Buffer.byteLength(frames[0])]);
  const parsed = JSON.parse(frames[0]);
  assert.equal(parsed.type, "write");
  assert.equal(parsed.transactions[0].changes.length, 10);
});

test("a transaction larger than a frame is split into write_part frames under the limit, every change once, in order", () => {
  // About 3 MiB of multi-byte text: several parts.
  const original = tx("t-big", 3000, 500, "ü");
  const encoded = new EncodedTransaction(original);
  const frames = encodeAlone("b-0123456789abcdef", encoded);
  assert.ok(frames.length >= 3, `${frames.length} frames`);
  const plan = layout("b-0123456789abcdef", encoded);
  const ids = [];
  frames.forEach((frame, n) => {
    const bytes = Buffer.byteLength(frame);
    assert.ok(bytes <= FRAME, `part ${n} takes ${bytes} bytes`);
    assert.equal(bytes, plan.sizes[n], `part ${n}'s size was measured before sending`);
    const part = JSON.parse(frame);
    assert.equal(part.type, "write_part");
    assert.equal(part.transaction_id, "t-big");
    assert.equal(part.batch_id, "b-0123456789abcdef");
    assert.equal(part.part, n);
    assert.equal(part.last, n === frames.length - 1);
    for (const c of part.changes) ids.push(c.id);
  });
  assert.deepEqual(ids, original.changes.map((c) => c.id));
});

test("over-limit transactions are refused with the reason", () => {
  assert.throws(() => layout("b-1", new EncodedTransaction(tx("many", 10_001, 1))), (e) => e instanceof TooLargeError && /10001 changes/.test(e.message));
  assert.throws(() => layout("b-1", new EncodedTransaction(tx("wide", 1, FRAME))), (e) => e instanceof TooLargeError && /change 0 .*public\.docs/.test(e.message));
  const bytes = new EncodedTransaction(tx("heavy", 9000, 1000));
  assert.throws(() => layout("b-1", bytes), (e) => e instanceof TooLargeError && new RegExp(`at most ${MAX_TRANSACTION_BYTES}`).test(e.message));
});

test("a batch frame packs whole transactions and reports its exact length", () => {
  const frame = new BatchFrame("b-2");
  for (let i = 0; i < 5; i++) {
    const t = new EncodedTransaction(tx(`t${i}`, 3, 20, "€"));
    assert.ok(frame.fits(t));
    frame.push(t);
  }
  const text = frame.frame();
  assert.equal(Buffer.byteLength(text), frame.length);
  assert.equal(JSON.parse(text).transactions.length, 5);
  assert.equal(frame.fits(new EncodedTransaction(tx("huge", 1, FRAME))), false);
});
