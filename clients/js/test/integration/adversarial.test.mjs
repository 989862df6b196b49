// Adversarial tests (issue 14): each result compared with the table itself.
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { LiveSync, keyString } from "../../dist/index.js";
import { parseJson } from "../../dist/connection.js";
import { createDb, dropDb, flakyNetwork, psql, startBridge, until } from "./bridge.mjs";

let db;
let bridge;
const clients = [];

before(async () => {
  db = createDb(`livesync_adv14_js_${process.pid}`);
  psql(
    db,
    `CREATE TABLE public.pairs (a text NOT NULL, b int NOT NULL, v text, PRIMARY KEY (a, b));
     SELECT livesync.track('public.pairs');
     GRANT SELECT, INSERT, UPDATE, DELETE ON public.pairs TO livesync_js_app;
     CREATE TABLE public.big (id bigint PRIMARY KEY, v text);
     SELECT livesync.track('public.big');
     GRANT SELECT, INSERT, UPDATE, DELETE ON public.big TO livesync_js_app;
     SELECT livesync.set_filter_columns('public.todos', ARRAY['done']);`,
  );
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

/** The table's rows as the replica would show them, by key string. */
function tableRows(table, keyCols, where = "true") {
  const out = psql(db, `SELECT coalesce(json_agg(t ORDER BY ${keyCols.join(",")}), '[]') FROM ${table} t WHERE ${where}`);
  const m = new Map();
  for (const r of parseJson(out)) m.set(keyString(Object.fromEntries(keyCols.map((c) => [c, r[c]]))), r);
  return m;
}

function sameRows(replica, table, keyCols, cols, where) {
  const want = tableRows(table, keyCols, where);
  const got = replica.rows();
  const diff = [];
  for (const [k, r] of want) {
    const g = got.get(k);
    if (!g) diff.push(["missing", k]);
    else for (const c of cols) if (JSON.stringify(g[c]) !== JSON.stringify(r[c])) diff.push(["differs", k, c, g[c], r[c]]);
  }
  for (const k of got.keys()) if (!want.has(k)) diff.push(["extra", k]);
  return diff;
}

test("concurrent writers from two clients and psql converge on the table", { timeout: 60000 }, async () => {
  const a = client("ca");
  const b = client("cb");
  const ta = a.table("public.todos");
  const tb = b.table("public.todos");
  await Promise.all([ta.ready, tb.ready]);
  const writes = [];
  for (let i = 0; i < 60; i++) {
    const id = 1000 + (i % 15);
    const w = i % 3;
    if (w === 0) writes.push(a.write("public.todos", i < 15 ? "insert" : "update", { id }, { title: `a${i}`, done: i % 2 === 0 }).catch((e) => e));
    else if (w === 1) writes.push(b.write("public.todos", "upsert", { id }, { title: `b${i}`, done: i % 2 === 1 }).catch((e) => e));
    else psql(db, `INSERT INTO todos (id, title) VALUES (${id}, 'sql${i}') ON CONFLICT (id) DO UPDATE SET title = 'sql${i}', done = NOT todos.done`);
    if (i % 10 === 9) writes.push(a.write("public.todos", "delete", { id: 1000 + (i % 7) }).catch((e) => e));
  }
  await Promise.all(writes);
  await until("a and b flushed", () => a.pending().length === 0 && b.pending().length === 0);
  const cols = ["title", "done", "project_id"];
  const where = "id >= 1000 AND id < 1100";
  await until("a converges", () => sameRows(ta, "todos", ["id"], cols).length === 0, 15000).catch(() => {});
  await until("b converges", () => sameRows(tb, "todos", ["id"], cols).length === 0, 5000).catch(() => {});
  assert.deepEqual(sameRows(ta, "todos", ["id"], cols, where), [], "a");
  assert.deepEqual(sameRows(tb, "todos", ["id"], cols, where), [], "b");
});

test("composite keys and odd text keys", { timeout: 30000 }, async () => {
  const a = client("pa");
  const b = client("pb");
  const ta = a.table("public.pairs");
  const tb = b.table("public.pairs");
  await Promise.all([ta.ready, tb.ready]);
  const odd = ["it's", 'say "hi"', "ü☃𝄞", "a\\b", " ", "", "x\ny"];
  for (const [i, s] of odd.entries()) {
    const r = await a.write("public.pairs", "insert", { a: s, b: i }, { v: `v${i}` });
    assert.equal(r.status, "applied", JSON.stringify(r));
  }
  psql(db, `INSERT INTO pairs VALUES ('it''s', 100, 'sql')`);
  await a.write("public.pairs", "update", { b: 0, a: "it's" }, { v: "upd" }); // key columns in another order
  await a.write("public.pairs", "delete", { a: "ü☃𝄞", b: 2 });
  await until("b converges", () => sameRows(tb, "pairs", ["a", "b"], ["v"]).length === 0).catch(() => {});
  assert.deepEqual(sameRows(tb, "pairs", ["a", "b"], ["v"]), []);
  assert.deepEqual(sameRows(ta, "pairs", ["a", "b"], ["v"]), []);
});

test("bigint ids beyond 2^53", { timeout: 30000 }, async () => {
  const a = client("ba");
  const ta = a.table("public.big");
  await ta.ready;
  psql(db, `INSERT INTO big VALUES (9007199254740993, 'odd'), (9007199254740992, 'even')`);
  await until("two rows", () => ta.rows().size >= 2, 5000).catch(() => {});
  assert.equal(ta.rows().size, 2, JSON.stringify([...ta.rows()]));
  assert.equal(ta.get({ id: "9007199254740993" })?.v, "odd");
  const r = await a.write("public.big", "update", { id: "9007199254740993" }, { v: "odd!" });
  assert.equal(r.status, "applied", JSON.stringify(r));
  await a.write("public.big", "insert", { id: "-9223372036854775808" }, { v: "min" });
  assert.equal(psql(db, "SELECT string_agg(id || '=' || v, ',' ORDER BY id) FROM big"), "-9223372036854775808=min,9007199254740992=even,9007199254740993=odd!");
  await until("converges", () => sameRows(ta, "big", ["id"], ["v"]).length === 0, 5000).catch(() => {});
  assert.deepEqual(sameRows(ta, "big", ["id"], ["v"]), []);
});

test("a filtered replica: rows leave and re-enter the filter", { timeout: 30000 }, async () => {
  const a = client("fa");
  const f = a.table("public.todos", { filter: { column: "done", op: "eq", value: false } });
  await f.ready;
  psql(db, "INSERT INTO todos (id, title, done) VALUES (2000, 'f0', false), (2001, 'f1', false), (2002, 'f2', true)");
  await until("two rows in", () => f.get({ id: 2000 }) && f.get({ id: 2001 }));
  psql(db, "UPDATE todos SET done = true WHERE id = 2000");
  psql(db, "UPDATE todos SET done = false, title = 'f2 back' WHERE id = 2002");
  psql(db, "UPDATE todos SET title = 'f1 out', done = true WHERE id = 2001");
  psql(db, "UPDATE todos SET title = 'f1 in again', done = false WHERE id = 2001");
  const cols = ["title", "done", "project_id", "tags"];
  const where = "done = false";
  await until("filter converges", () => sameRows(f, "todos", ["id"], cols, where).length === 0, 5000).catch(() => {});
  assert.deepEqual(sameRows(f, "todos", ["id"], cols, where), []);
  // a local write takes a row out of the filter
  await a.write("public.todos", "update", { id: 2002 }, { done: true });
  await until("filter converges", () => sameRows(f, "todos", ["id"], cols, where).length === 0, 5000).catch(() => {});
  assert.deepEqual(sameRows(f, "todos", ["id"], cols, where), []);
});

test("resync_required after compaction past a disconnected client", { timeout: 30000 }, async () => {
  const net = flakyNetwork();
  const a = client("ra", { WebSocket: net.WebSocket });
  const ta = a.table("public.todos");
  await ta.ready;
  psql(db, "INSERT INTO todos (id, title) VALUES (3000, 'before'), (3001, 'gone soon')");
  await until("seen", () => ta.get({ id: 3001 }));
  net.goOffline();
  await until("offline", () => a.status === "offline");
  psql(db, "UPDATE todos SET title = 'after' WHERE id = 3000; DELETE FROM todos WHERE id = 3001; INSERT INTO todos (id, title) VALUES (3002, 'new')");
  psql(db, "SELECT livesync.compact(interval '0')");
  const reloads = [];
  ta.on("reload", (r) => reloads.push(r));
  net.goOnline();
  await until("reloaded", () => reloads.length > 0 && ta.live, 10000).catch(() => {});
  const cols = ["title", "done", "project_id", "tags"];
  await until("converges", () => sameRows(ta, "todos", ["id"], cols).length === 0, 5000).catch(() => {});
  assert.deepEqual(sameRows(ta, "todos", ["id"], cols), []);
  assert.ok(reloads.length >= 1, "reloaded");
});

test("optimistic update pending while a server change to the same row arrives", { timeout: 30000 }, async () => {
  // writes are held on the way out for a while
  const held = [];
  const net = flakyNetwork();
  const Base = net.WebSocket;
  class Slow extends Base {
    send(data) {
      if (JSON.parse(data).type === "write") held.push(() => super.send(data));
      else super.send(data);
    }
  }
  const a = client("oa", { WebSocket: Slow });
  const ta = a.table("public.todos");
  await ta.ready;
  psql(db, "INSERT INTO todos (id, title, project_id) VALUES (4000, 'orig', 1)");
  await until("seen", () => ta.get({ id: 4000 }));
  const shown = [];
  ta.on("change", () => shown.push(JSON.stringify(ta.get({ id: 4000 }))));
  const p = a.write("public.todos", "update", { id: 4000 }, { done: true });
  await until("write held", () => held.length === 1);
  psql(db, "UPDATE todos SET title = 'server' WHERE id = 4000");
  await until("server change shown under the overlay", () => ta.get({ id: 4000 }).title === "server");
  assert.equal(ta.get({ id: 4000 }).done, true, "optimistic value kept");
  held.shift()();
  const r = await p;
  assert.ok(["applied", "merged"].includes(r.status), r.status);
  await until("converges", () => sameRows(ta, "todos", ["id"], ["title", "done"]).length === 0, 5000).catch(() => {});
  assert.deepEqual(sameRows(ta, "todos", ["id"], ["title", "done"]), []);
  for (const s of shown) assert.ok(JSON.parse(s)?.done === true, "no flicker: " + shown.join("\n"));

  // a conflicting one: the server changes the same (manual) column meanwhile
  const conflicts = [];
  a.on("conflict", (e) => conflicts.push(e));
  const p2 = a.write("public.todos", "update", { id: 4000 }, { title: "mine" });
  await until("write held", () => held.length === 1);
  psql(db, "UPDATE todos SET title = 'theirs' WHERE id = 4000");
  await new Promise((r) => setTimeout(r, 400));
  assert.equal(ta.get({ id: 4000 }).title, "mine", "optimistic until the result");
  held.shift()();
  const r2 = await p2;
  assert.equal(r2.status, "conflict");
  assert.equal(a.pending().length, 0);
  await until("converges", () => sameRows(ta, "todos", ["id"], ["title", "done"]).length === 0, 5000).catch(() => {});
  assert.deepEqual(sameRows(ta, "todos", ["id"], ["title", "done"]), []);
});

test("rooms across reconnects: rejoined, no duplicate members", { timeout: 30000 }, async () => {
  const net = flakyNetwork();
  const a = client("rma", { WebSocket: net.WebSocket });
  const b = client("rmb");
  const ra = a.room("adv:room");
  const rb = b.room("adv:room");
  await until("connected", () => a.conn.online && b.conn.online);
  await ra.join({ who: "a" });
  await rb.join({ who: "b" });
  await until("a sees 2", () => ra.members().length === 2);
  for (let i = 0; i < 3; i++) {
    net.goOffline();
    await until("a offline", () => !a.conn.online);
    net.goOnline();
    await until("a back", () => a.conn.online);
  }
  await until("settled", () => ra.members().length === 2 && rb.members().length === 2, 8000).catch(() => {});
  const whoA = ra.members().map((m) => m.state.who).sort();
  const whoB = rb.members().map((m) => m.state.who).sort();
  assert.deepEqual(whoA, ["a", "b"], JSON.stringify(ra.members()));
  assert.deepEqual(whoB, ["a", "b"], JSON.stringify(rb.members()));
  assert.ok(ra.members().some((m) => m.connection === ra.self), "self is a member");
});

test("a transaction larger than the frame limit is applied whole", { timeout: 60000 }, async () => {
  const small = await startBridge(db, { LIVESYNC_MAX_FRAME_BYTES: "2048", LIVESYNC_NODE_NAME: `js-small-${process.pid}` });
  try {
    const c = new LiveSync({ url: small.url, clientId: `mp-${process.pid}`, storage: "memory", backoff: { base: 50, max: 300 } });
    clients.push(c);
    const t = c.table("public.todos");
    await t.ready;
    const sizes = [];
    t.on("change", (ch) => sizes.push(ch.length));
    psql(db, "INSERT INTO todos (id, title) SELECT g, 'row ' || g FROM generate_series(5000, 5499) g");
    await until("500 rows", () => sizes.reduce((x, y) => x + y, 0) >= 500, 15000).catch(() => {});
    assert.deepEqual(sizes, [500], "one change event with the whole transaction");
    psql(db, "UPDATE todos SET title = title || '!' WHERE id BETWEEN 5000 AND 5499");
    await until("converges", () => sameRows(t, "todos", ["id"], ["title"]).length === 0, 10000).catch(() => {});
    assert.deepEqual(sameRows(t, "todos", ["id"], ["title"]), []);
  } finally {
    await small.stop();
  }
});

test("bridge restarted while writes are queued: each applied once, in order", { timeout: 60000 }, async () => {
  let br = await startBridge(db, { LIVESYNC_NODE_NAME: `js-r1-${process.pid}` });
  const port = new URL(br.url).port;
  const c = new LiveSync({ url: br.url, clientId: `rs-${process.pid}`, storage: "memory", backoff: { base: 50, max: 300 } });
  clients.push(c);
  const t = c.table("public.todos");
  await t.ready;
  psql(db, "INSERT INTO todos (id, title, project_id) VALUES (6000, 'counter', 0)");
  await until("seen", () => t.get({ id: 6000 }));
  const from = psql(db, "SELECT livesync.current_position()");
  await br.stop();
  await until("offline", () => c.status === "offline");
  const ps = [];
  for (let i = 1; i <= 20; i++) {
    ps.push(c.write("public.todos", "update", { id: 6000 }, { project_id: t.get({ id: 6000 }).project_id + 1, title: `t${i}` }));
    ps.push(c.write("public.todos", "insert", { id: 6000 + i }, { title: `n${i}` }));
  }
  br = await startBridge(db, { LIVESYNC_LISTEN: `127.0.0.1:${port}`, LIVESYNC_NODE_NAME: `js-r2-${process.pid}` });
  try {
    const rs = await Promise.all(ps);
    assert.ok(rs.every((r) => r.status === "applied" || r.status === "merged"), JSON.stringify(rs.filter((r) => r.status !== "applied")));
    assert.equal(psql(db, "SELECT project_id || ' ' || title FROM todos WHERE id = 6000"), "20 t20");
    assert.equal(psql(db, "SELECT count(*) FROM todos WHERE id BETWEEN 6001 AND 6020"), "20");
    const order = psql(db, `SELECT string_agg(c.key->>'id', ',' ORDER BY c.position) FROM livesync.changes_since(${from}, 1000000) c WHERE c.mutation_id IS NOT NULL AND (c.key->>'id')::int BETWEEN 6000 AND 6020`);
    const want = [];
    for (let i = 1; i <= 20; i++) want.push("6000", String(6000 + i));
    assert.equal(order, want.join(","));
    await until("converges", () => sameRows(t, "todos", ["id"], ["title", "project_id"]).length === 0, 10000).catch(() => {});
    assert.deepEqual(sameRows(t, "todos", ["id"], ["title", "project_id"]), []);
  } finally {
    await br.stop();
  }
});
