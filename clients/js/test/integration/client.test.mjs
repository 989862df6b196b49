import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { LiveSync } from "../../dist/index.js";
import { createDb, dropDb, flakyNetwork, psql, startBridge, until } from "./bridge.mjs";

let db;
let bridge;
const clients = [];

before(async () => {
  db = createDb();
  bridge = await startBridge(db);
});

after(async () => {
  for (const c of clients) c.close();
  await bridge?.stop();
  if (db) dropDb(db);
});

function client(name, extra = {}) {
  const c = new LiveSync({ url: bridge.url, clientId: `${name}-${process.pid}`, storage: "memory", backoff: { base: 50, max: 300 }, ...extra });
  clients.push(c);
  return c;
}

const todo = (id) => ({ id });

test("two clients converge on inserts, updates and deletes", { timeout: 30000 }, async () => {
  const a = client("a");
  const b = client("b");
  const ta = a.table("public.todos");
  const tb = b.table("public.todos");
  await Promise.all([ta.ready, tb.ready]);
  await until("synced", () => a.status === "synced" && b.status === "synced");

  const r1 = await a.write("public.todos", "insert", todo(1), { title: "buy milk", project_id: 1 });
  assert.equal(r1.status, "applied");
  await until("b sees the insert", () => tb.get(todo(1))?.title === "buy milk");

  const seen = [];
  ta.on("change", (c) => seen.push(...c));
  const r2 = await b.write("public.todos", "update", todo(1), { title: "buy oat milk", done: true });
  assert.equal(r2.status, "applied");
  await until("a sees the update", () => ta.get(todo(1))?.title === "buy oat milk");
  assert.equal(ta.get(todo(1)).done, true);
  assert.equal(ta.version(todo(1)), tb.version(todo(1)));

  // a change made by plain SQL reaches both
  psql(db, "INSERT INTO todos (id, title) VALUES (2, 'from sql')");
  await until("both see the SQL insert", () => ta.get(todo(2)) && tb.get(todo(2)));

  await a.write("public.todos", "delete", todo(2));
  await until("b sees the delete", () => !tb.get(todo(2)));
  assert.deepEqual([...ta.rows().entries()], [...tb.rows().entries()]);
  assert.ok(seen.some((c) => c.op === "update" && c.source === "server"));
});

test("an offline write is applied once after reconnecting, even when its result was lost", { timeout: 30000 }, async () => {
  const net = flakyNetwork();
  const c = client("c", { WebSocket: net.WebSocket });
  const tc = c.table("public.todos");
  await tc.ready;
  psql(db, "INSERT INTO todos (id, title, project_id) VALUES (10, 'counter', 1)");
  await until("c sees row 10", () => tc.get(todo(10)));

  net.goOffline();
  await until("offline", () => c.status === "offline");
  const p = c.write("public.todos", "update", todo(10), { project_id: 2 }); // +1 (sum policy)
  assert.equal(tc.get(todo(10)).project_id, 2, "shown at once");
  assert.equal(c.pending().length, 1);
  await new Promise((r) => setTimeout(r, 300));
  assert.equal(psql(db, "SELECT project_id FROM todos WHERE id = 10"), "1", "not sent while offline");

  // back online; the first send's result is lost (the connection drops right after it)
  net.cutAfterType = "write";
  net.goOnline();
  const result = await p;
  assert.equal(result.status, "applied");
  assert.equal(c.pending().length, 0);
  // sum policy: a second application would have made it 3
  assert.equal(psql(db, "SELECT project_id FROM todos WHERE id = 10"), "2");
  assert.equal(psql(db, "SELECT count(*) FROM livesync.changes_since(0, 100000) AS c WHERE c.mutation_id IS NOT NULL AND c.key->>'id' = '10'"), "1");
  await until("synced", () => c.status === "synced");
  assert.equal(tc.get(todo(10)).project_id, 2);
});

test("a conflicting write rolls back to the server's row and emits conflict", { timeout: 30000 }, async () => {
  const a = client("a2");
  const net = flakyNetwork();
  const b = client("b2", { WebSocket: net.WebSocket });
  const ta = a.table("public.todos");
  const tb = b.table("public.todos");
  await Promise.all([ta.ready, tb.ready]);
  await a.write("public.todos", "insert", todo(20), { title: "draft" });
  await until("b sees row 20", () => tb.get(todo(20))?.title === "draft");

  net.goOffline();
  await until("b offline", () => b.status === "offline");
  await a.write("public.todos", "update", todo(20), { title: "a's title" });
  const conflicts = [];
  b.on("conflict", (e) => conflicts.push(e));
  const changes = [];
  tb.on("change", (c) => changes.push(...c));
  const p = b.write("public.todos", "update", todo(20), { title: "b's title" });
  assert.equal(tb.get(todo(20)).title, "b's title", "optimistic");
  net.goOnline();
  const r = await p;
  assert.equal(r.status, "conflict");
  assert.equal(conflicts.length, 1);
  assert.equal(conflicts[0].result.conflicts[0].column, "title");
  assert.equal(tb.get(todo(20)).title, "a's title", "rolled back to the server's row");
  assert.ok(changes.some((c) => c.source === "settle" && c.row.title === "a's title"));
  assert.equal(psql(db, "SELECT title FROM todos WHERE id = 20"), "a's title");
  assert.equal(psql(db, "SELECT count(*) FROM livesync.conflicts WHERE resolved_at IS NULL"), "1");
});

test("rooms: join, diff, update, broadcast and leave between two clients", { timeout: 30000 }, async () => {
  const a = client("ra");
  const b = client("rb");
  const ra = a.room("board:42");
  const rb = b.room("board:42");
  await until("both connected", () => a.conn.online && b.conn.online);
  const diffs = [];
  ra.on("diff", (d) => diffs.push(d));
  const m1 = await ra.join({ cursor: { record: "7" } });
  assert.equal(m1.length, 1);
  assert.equal(m1[0].connection, ra.self);
  const m2 = await rb.join({ cursor: { record: "8" } });
  assert.equal(m2.length, 2);
  await until("a sees b join", () => diffs.some((d) => d.joins.some((j) => j.connection === rb.self)));
  assert.equal(ra.members().length, 2);

  rb.update({ cursor: { record: "9" } });
  await until("a sees b's update", () => ra.members().find((m) => m.connection === rb.self)?.state.cursor.record === "9");

  const got = [];
  rb.on("broadcast", (e) => got.push(e));
  ra.broadcast("cursor", { x: 1, y: 2 });
  await until("b gets the broadcast", () => got.length === 1);
  assert.deepEqual(got[0].payload, { x: 1, y: 2 });
  assert.equal(got[0].from.connection, ra.self);

  await rb.leave();
  await until("a sees b leave", () => ra.members().length === 1);
  assert.ok(diffs.some((d) => d.leaves.length === 1));
});
