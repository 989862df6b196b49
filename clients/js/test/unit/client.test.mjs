import { test } from "node:test";
import assert from "node:assert/strict";
import { LiveSync, MemoryStore } from "../../dist/index.js";
import { fakeServer, tick, serveSnapshot, serveSubscribe, row } from "./fake.mjs";

const opts = (server, extra = {}) => ({
  url: "ws://fake/ws",
  clientId: "c1",
  WebSocket: server.WebSocket,
  storage: "memory",
  backoff: { base: 5, max: 20 },
  retryBase: 5,
  ...extra,
});

async function loaded(server, ls, rows = [row(1, "a", 10)]) {
  const t = ls.table("public.todos");
  await serveSnapshot(server, [rows], 100);
  const sub = await serveSubscribe(server);
  await t.ready;
  return { t, sub };
}

test("hello, snapshot pages, subscribe from the snapshot's position, status", async (t) => {
  const server = fakeServer();
  const ls = new LiveSync(opts(server));
  t.after(() => ls.close());
  const statuses = [];
  ls.on("status", (s) => statuses.push(s));
  const todos = ls.table("public.todos");
  const q = await server.next("snapshot");
  assert.equal(server.socket.hello.client_id, "c1");
  assert.equal(server.socket.hello.protocol, 1);
  assert.equal(q.channel, "table:public.todos");
  server.push({ type: "snapshot_page", id: q.id, channel: q.channel, position: 42, page: 1, last: false, rows: [row(1, "a", 10)] });
  server.push({ type: "snapshot_page", id: q.id, channel: q.channel, position: 42, page: 2, last: true, rows: [row(2, "b", 11)] });
  const s = await server.next("subscribe");
  assert.equal(s.since, 42);
  assert.equal(ls.status, "syncing");
  server.push({ type: "subscribed", id: s.id, channel: s.channel, position: 42 });
  await todos.ready;
  assert.equal(ls.status, "synced");
  assert.deepEqual(todos.get({ id: 2 }), { id: 2, title: "b" });
  assert.equal(todos.rows().size, 2);
  assert.deepEqual(statuses, ["syncing", "synced"]);
});

test("a transaction's parts are applied together; older versions are ignored", async (t) => {
  const server = fakeServer();
  const ls = new LiveSync(opts(server));
  t.after(() => ls.close());
  const { t: todos, sub } = await loaded(server, ls);
  const events = [];
  todos.on("change", (c) => events.push(c));
  const c = (id, title, version, op = "insert") => ({ position: 101, op, key: { id }, delta: { id: { new: id }, title: { new: title } }, version });
  server.push({ type: "changes", sub: sub.id, position: 101, part: 1, parts: 2, changes: [c(3, "c", 20)] });
  assert.equal(todos.get({ id: 3 }), undefined, "not before the last part");
  server.push({ type: "changes", sub: sub.id, position: 101, part: 2, parts: 2, changes: [c(4, "d", 21)] });
  assert.equal(events.length, 1);
  assert.deepEqual(events[0].map((x) => [x.op, x.key.id]), [["insert", 3], ["insert", 4]]);
  // an update older than the row's version does nothing
  server.push({ type: "changes", sub: sub.id, position: 102, changes: [{ position: 102, op: "update", key: { id: 1 }, delta: { title: { old: "x", new: "stale" } }, version: 5 }] });
  assert.equal(todos.get({ id: 1 }).title, "a");
  assert.equal(events.length, 1);
  assert.equal(todos.position, 102);
});

test("reconnect: backoff, hello again, resume from the last position; resync_required reloads", async (t) => {
  const server = fakeServer();
  const ls = new LiveSync(opts(server));
  t.after(() => ls.close());
  const { t: todos, sub } = await loaded(server, ls);
  server.push({ type: "changes", sub: sub.id, position: 130, changes: [{ position: 130, op: "delete", key: { id: 1 }, delta: {}, version: 30 }] });
  server.refuse = true;
  server.drop();
  assert.equal(ls.status, "offline");
  while (server.sockets.length < 3) await tick(5); // retried with backoff
  server.refuse = false;
  const s2 = await server.next("subscribe");
  assert.equal(s2.since, 130, "resumes from the last position");
  assert.equal(server.socket.hello.client_id, "c1");
  server.push({ type: "error", id: s2.id, code: "resync_required", message: "too old" });
  await serveSnapshot(server, [[row(7, "fresh", 50)]], 200);
  const s3 = await serveSubscribe(server);
  assert.equal(s3.since, 200);
  assert.deepEqual([...todos.rows().values()], [{ id: 7, title: "fresh" }]);
});

test("optimistic write: shown at once, base version and values sent, confirmed by the result", async (t) => {
  const server = fakeServer();
  const ls = new LiveSync(opts(server));
  t.after(() => ls.close());
  const { t: todos } = await loaded(server, ls);
  const changes = [];
  todos.on("change", (c) => changes.push(...c));
  const p = ls.write("public.todos", "update", { id: 1 }, { title: "mine" });
  assert.equal(todos.get({ id: 1 }).title, "mine", "at once");
  assert.equal(changes[0].source, "local");
  assert.equal(ls.pending().length, 1);
  const w = await server.next("write");
  assert.equal(w.base_version, 10);
  assert.deepEqual(w.base_values, { title: "a" });
  assert.equal(typeof w.mutation_id, "number");
  assert.match(w.hlc, /^\d+:\d+$/);
  server.push({ type: "write_result", id: w.id, status: "applied", version: 11, row: { id: 1, title: "mine" } });
  const r = await p;
  assert.equal(r.status, "applied");
  assert.equal(ls.pending().length, 0);
  assert.equal(todos.version({ id: 1 }), 11);
  assert.equal(todos.get({ id: 1 }).title, "mine");
  assert.equal(changes.length, 1, "no flicker on confirmation");
});

test("conflict and rejected roll back to the server's row and emit conflict", async (t) => {
  const server = fakeServer();
  const ls = new LiveSync(opts(server));
  t.after(() => ls.close());
  const { t: todos } = await loaded(server, ls);
  const conflicts = [];
  ls.on("conflict", (c) => conflicts.push(c));
  const p = ls.write("public.todos", "update", { id: 1 }, { title: "mine" });
  const w = await server.next("write");
  server.push({ type: "write_result", id: w.id, status: "conflict", version: 12, row: { id: 1, title: "theirs" }, conflict_id: 3 });
  assert.equal((await p).status, "conflict");
  assert.equal(todos.get({ id: 1 }).title, "theirs");
  assert.equal(conflicts.length, 1);
  assert.equal(conflicts[0].mutation.mutation_id, w.mutation_id);
  // an insert rejected: the optimistic row disappears
  const p2 = ls.write("public.todos", "insert", { id: 9 }, { title: "new" });
  assert.ok(todos.get({ id: 9 }));
  const w2 = await server.next("write");
  assert.equal(w2.base_version, undefined);
  server.push({ type: "write_result", id: w2.id, status: "rejected", reason: "exists" });
  assert.equal((await p2).status, "rejected");
  assert.equal(todos.get({ id: 9 }), undefined);
  assert.equal(conflicts.length, 2);
});

test("the queue sends one mutation at a time, in order; retryable errors retry, others dead-letter", async (t) => {
  const server = fakeServer();
  const ls = new LiveSync(opts(server, { maxAttempts: 2 }));
  t.after(() => ls.close());
  const { t: todos } = await loaded(server, ls);
  const failed = [];
  ls.on("failed", (f) => failed.push(f));
  const p1 = ls.write("public.todos", "update", { id: 1 }, { title: "bad" });
  const p2 = ls.write("public.todos", "insert", { id: 2 }, { title: "ok" });
  const w1 = await server.next("write");
  await tick(5);
  assert.equal(server.sent.filter((m) => m.type === "write").length, 0, "the second waits for the first");
  server.push({ type: "error", id: w1.id, code: "unavailable", message: "db down" });
  const w1b = await server.next("write");
  assert.equal(w1b.mutation_id, w1.mutation_id, "retried with the same id");
  server.push({ type: "error", id: w1b.id, code: "bad_request", message: "invalid input", sqlstate: "22P02" });
  const w1c = await server.next("write");
  assert.equal(w1c.mutation_id, w1.mutation_id);
  server.push({ type: "error", id: w1c.id, code: "bad_request", message: "invalid input", sqlstate: "22P02" });
  await assert.rejects(p1, (e) => e.code === "bad_request");
  assert.deepEqual(ls.failed().map((m) => m.mutation_id), [w1.mutation_id]);
  assert.equal(failed.length, 1);
  assert.equal(todos.get({ id: 1 }).title, "a", "rolled back");
  const w2 = await server.next("write");
  assert.ok(w2.mutation_id > w1.mutation_id);
  server.push({ type: "write_result", id: w2.id, status: "applied", version: 40, row: { id: 2, title: "ok" } });
  assert.equal((await p2).status, "applied");
  assert.equal(ls.pending().length, 0);
});

test("a queued mutation survives a reload: replayed with the same id; new ids stay unique", async (t) => {
  const store = new MemoryStore();
  const server = fakeServer();
  server.refuse = true;
  const a = new LiveSync(opts(server, { storage: store }));
  a.write("public.todos", "insert", { id: 5 }, { title: "offline" });
  await a.flushed();
  const id = a.pending()[0].mutation_id;
  a.close();
  // a "reload": a new client over the same store
  server.refuse = false;
  const b = new LiveSync(opts(server, { storage: store }));
  t.after(() => b.close());
  const w = await server.next("write");
  assert.equal(w.mutation_id, id);
  assert.deepEqual(w.values, { title: "offline" });
  b.write("public.todos", "insert", { id: 6 }, { title: "later" });
  assert.ok(b.pending()[1].mutation_id > id);
  // the connection drops before the result: it is sent again, same id
  server.drop();
  const again = await server.next("write");
  assert.equal(again.mutation_id, id);
  server.push({ type: "write_result", id: again.id, status: "applied", version: 1, row: { id: 5, title: "offline" } });
  const w2 = await server.next("write");
  assert.ok(w2.mutation_id > id);
});

test("rooms: join, members, diffs, broadcast, re-join after reconnect", async (t) => {
  const server = fakeServer();
  const ls = new LiveSync(opts(server));
  t.after(() => ls.close());
  const room = ls.room("board:1");
  const joined = room.join({ cursor: 1 }); // before the connection is open: joins once it is
  const j = await server.next("join");
  assert.deepEqual(j.state, { cursor: 1 });
  const me = { connection: "s-1", user: "c1", node: "n", state: { cursor: 1 }, color: "#e6194b", joined_at: 1, last_seen: 1 };
  server.push({ type: "presence_state", id: j.id, room: "board:1", self: "s-1", members: [me] });
  assert.equal((await joined).length, 1);
  assert.equal(room.self, "s-1");
  const diffs = [];
  room.on("diff", (d) => diffs.push(d));
  const bob = { ...me, connection: "s-9", user: "bob" };
  server.push({ type: "presence_diff", room: "board:1", joins: [bob], leaves: [], updates: [] });
  assert.equal(room.members().length, 2);
  server.push({ type: "presence_diff", room: "board:1", joins: [], leaves: [bob], updates: [] });
  assert.deepEqual(room.members().map((m) => m.user), ["c1"]);
  assert.equal(diffs.length, 2);
  const got = [];
  room.on("broadcast", (b) => got.push(b));
  room.broadcast("ping", { n: 1 });
  const b = await server.next("broadcast");
  assert.deepEqual([b.room, b.event, b.payload], ["board:1", "ping", { n: 1 }]);
  server.push({ type: "broadcast", room: "board:1", event: "ping", payload: { n: 2 }, from: { connection: "s-9", user: "bob" } });
  assert.equal(got[0].payload.n, 2);
  const errors = [];
  room.on("error", (e) => errors.push(e));
  server.push({ type: "error", id: b.id, code: "rate_limited", message: "slow down" });
  assert.equal(errors[0].code, "rate_limited");
  room.update({ cursor: 2 });
  assert.deepEqual((await server.next("presence")).state, { cursor: 2 });
  server.drop();
  const j2 = await server.next("join");
  assert.deepEqual(j2.state, { cursor: 2 }, "re-joined with the last state");
  const left = room.leave();
  const l = await server.next("leave");
  server.push({ type: "left", id: l.id, room: "board:1" });
  await left;
  assert.equal(room.members().length, 0);
});

test("a refused token stops reconnecting and sets status error", async (t) => {
  const server = fakeServer();
  const ls = new LiveSync(opts(server, { token: "bad" }));
  t.after(() => ls.close());
  await tick(5);
  assert.equal(server.socket.hello.token, "bad");
  server.push({ type: "error", code: "unauthorized", message: "invalid token" });
  server.drop(4001);
  await tick(40);
  assert.equal(ls.status, "error");
  assert.equal(server.sockets.length, 1);
});

test("a connection that fails with error only (Node 20's WebSocket) is retried", async (t) => {
  const server = fakeServer();
  let fails = 2;
  class ErrorOnly extends server.WebSocket {
    constructor(url) {
      super(url);
      if (fails-- > 0) {
        this.readyState = 0;
        this.send = () => {};
        queueMicrotask(() => this.onerror?.({}));
      }
    }
  }
  const ls = new LiveSync(opts(server, { WebSocket: ErrorOnly }));
  t.after(() => ls.close());
  await new Promise((resolve) => ls.on("open", resolve));
  assert.ok(server.sockets.length >= 3);
});

test("goOffline stops the socket and queues writes; goOnline resumes and sends them; autoConnect: false starts offline", async (t) => {
  const server = fakeServer();
  const ls = new LiveSync(opts(server));
  t.after(() => ls.close());
  const { t: todos } = await loaded(server, ls);
  assert.equal(ls.status, "synced");
  ls.goOffline();
  assert.equal(ls.status, "offline");
  const sockets = server.sockets.length;
  const done = ls.write("public.todos", "update", { id: 1 }, { title: "offline edit" });
  assert.equal(todos.get({ id: 1 }).title, "offline edit", "optimistic while offline");
  await tick(50); // longer than the backoff: it must not reconnect by itself
  assert.equal(server.sockets.length, sockets, "no reconnect while offline");
  assert.equal(server.sent.filter((m) => m.type === "write").length, 0);
  assert.equal(ls.pending().length, 1);
  ls.goOnline();
  const s = await serveSubscribe(server);
  assert.equal(s.since, 100, "resumes from its position");
  const w = await server.next("write");
  assert.deepEqual(w.values, { title: "offline edit" });
  server.push({ type: "write_result", id: w.id, status: "applied", version: 11, row: { id: 1, title: "offline edit" } });
  assert.equal((await done).status, "applied");
  assert.equal(ls.pending().length, 0);

  const server2 = fakeServer();
  const idle = new LiveSync(opts(server2, { autoConnect: false }));
  t.after(() => idle.close());
  await tick(20);
  assert.equal(server2.sockets.length, 0);
  assert.equal(idle.status, "offline");
  idle.goOnline();
  await until(() => idle.status !== "offline");
  assert.equal(server2.sockets.length, 1);
});

async function until(fn, ms = 2000) {
  const end = Date.now() + ms;
  while (!fn()) {
    if (Date.now() > end) throw new Error("timed out");
    await tick(2);
  }
}
