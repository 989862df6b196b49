import { test } from "node:test";
import assert from "node:assert/strict";
import { applyChange, applyRow, backoffDelay, keyString, matches, Parts, MemoryStore } from "../../dist/index.js";

const ins = (id, title, version, position = 1) => ({ position, op: "insert", key: { id }, delta: { id: { new: id }, title: { new: title } }, version });
const upd = (id, title, version, position = 1) => ({ position, op: "update", key: { id }, delta: { title: { old: "?", new: title } }, version });
const del = (id, version, position = 1) => ({ position, op: "delete", key: { id }, delta: { id: { old: id } }, version });

test("backoff grows exponentially, is capped, and has jitter between half and all", () => {
  const b = { base: 100, max: 5000 };
  assert.equal(backoffDelay(0, b, () => 0), 50);
  assert.equal(backoffDelay(0, b, () => 1), 100);
  assert.equal(backoffDelay(3, b, () => 1), 800);
  assert.equal(backoffDelay(3, b, () => 0), 400);
  assert.equal(backoffDelay(20, b, () => 1), 5000);
  assert.equal(backoffDelay(1000, b, () => 0.5), 3750);
  const seen = new Set(Array.from({ length: 20 }, () => backoffDelay(4, b)));
  assert.ok(seen.size > 1, "random jitter");
});

test("keyString does not depend on column order", () => {
  assert.equal(keyString({ a: 1, b: 2 }), keyString({ b: 2, a: 1 }));
  assert.notEqual(keyString({ id: 1 }), keyString({ id: "1" }));
});

test("changes apply by version: never older over newer, duplicates harmless", () => {
  const rows = new Map();
  assert.deepEqual(applyChange(rows, ins(1, "a", 10)).length, 1);
  assert.deepEqual(applyChange(rows, upd(1, "b", 12)).length, 1);
  assert.equal(rows.get(keyString({ id: 1 })).row.title, "b");
  // an older update (e.g. a snapshot overlap) and a duplicate change do nothing
  assert.deepEqual(applyChange(rows, upd(1, "old", 11)), []);
  assert.deepEqual(applyChange(rows, upd(1, "b", 12)), []);
  assert.equal(rows.get(keyString({ id: 1 })).row.title, "b");
  assert.equal(rows.get(keyString({ id: 1 })).row.id, 1, "an update keeps the other columns");
  // a delete leaves a tombstone: an older insert seen again cannot bring the row back
  applyChange(rows, del(1, 13));
  assert.equal(rows.get(keyString({ id: 1 })).row, null);
  assert.deepEqual(applyChange(rows, ins(1, "a", 10)), []);
  assert.equal(rows.get(keyString({ id: 1 })).row, null);
  // a newer insert of the same key does
  applyChange(rows, ins(1, "again", 20));
  assert.equal(rows.get(keyString({ id: 1 })).row.title, "again");
});

test("an update of an unknown row is partial (to be loaded); truncate and schema", () => {
  const rows = new Map();
  applyChange(rows, upd(5, "x", 3));
  assert.deepEqual(rows.get(keyString({ id: 5 })), { key: { id: 5 }, row: { id: 5, title: "x" }, version: 3, partial: true });
  // the loaded row (same version) replaces the partial one
  assert.ok(applyRow(rows, { id: 5 }, { id: 5, title: "x", done: false }, 3));
  assert.equal(rows.get(keyString({ id: 5 })).partial, undefined);
  assert.ok(!applyRow(rows, { id: 5 }, { id: 5, title: "older" }, 2));
  applyChange(rows, ins(6, "y", 4));
  assert.equal(applyChange(rows, { position: 9, op: "truncate", key: null, delta: {}, version: null }).length, 2);
  assert.ok([...rows.values()].every((r) => r.row === null));
  assert.equal(applyChange(rows, { position: 10, op: "schema", key: null, delta: {}, version: null }), "reload");
});

test("transaction parts are applied together once all have arrived", () => {
  const p = new Parts();
  assert.deepEqual(p.add({ position: 7, changes: [ins(1, "a", 1)] }).length, 1, "a whole transaction");
  assert.equal(p.add({ position: 9, part: 1, parts: 3, changes: [ins(2, "b", 2)] }), null);
  assert.equal(p.add({ position: 9, part: 2, parts: 3, changes: [ins(3, "c", 3)] }), null);
  const all = p.add({ position: 9, part: 3, parts: 3, changes: [ins(4, "d", 4)] });
  assert.deepEqual(all.map((c) => c.key.id), [2, 3, 4]);
  // a part whose beginning was missed, and a new transaction interrupting parts
  assert.equal(p.add({ position: 11, part: 2, parts: 2, changes: [ins(5, "e", 5)] }), null);
  assert.equal(p.add({ position: 12, part: 1, parts: 2, changes: [ins(6, "f", 6)] }), null);
  assert.equal(p.add({ position: 13, part: 1, parts: 2, changes: [ins(7, "g", 7)] }), null);
  assert.deepEqual(p.add({ position: 13, part: 2, parts: 2, changes: [ins(8, "h", 8)] }).map((c) => c.key.id), [7, 8]);
});

test("the memory store keeps queue order, the counter, and moves dead letters", async () => {
  const s = new MemoryStore();
  const m = (id) => ({ mutation_id: id, table: "t", op: "insert", key: { id }, values: {}, created_at: 0, attempts: 0 });
  await s.put("queue", m(2), 2);
  await s.put("queue", m(1), 5);
  await s.put("failed", m(2), 3);
  const d = await s.load();
  assert.equal(d.counter, 5);
  assert.deepEqual(d.queue.map((x) => x.mutation_id), [1]);
  assert.deepEqual(d.failed.map((x) => x.mutation_id), [2]);
});

test("filters match as the bridge compares them", () => {
  const r = { id: 1, p: 3, s: "b", n: null };
  assert.ok(matches(r, { column: "p", op: "eq", value: 3 }));
  assert.ok(matches(r, { column: "p", op: "eq", value: 3.0 }));
  assert.ok(!matches(r, { column: "p", op: "eq", value: "3" }));
  assert.ok(matches(r, { column: "p", op: "in", value: [1, 3] }));
  assert.ok(matches(r, { column: "s", op: "gt", value: "a" }));
  assert.ok(!matches(r, { column: "s", op: "lt", value: 5 }));
  assert.ok(!matches(r, { column: "n", op: "neq", value: 1 }), "NULL matches nothing");
});
