// A fake WebSocket and a scripted server for unit tests: the server answers hello
// with welcome; everything else is recorded for the test to answer.
export function fakeServer() {
  const server = {
    sockets: [],
    sent: [], // every message any client sent (after hello)
    refuse: false,
    waiters: [],
    get socket() {
      return this.sockets.at(-1);
    },
    push(m) {
      this.socket.onmessage?.({ data: JSON.stringify(m) });
    },
    drop(code = 1006) {
      this.socket.readyState = 3;
      this.socket.onclose?.({ code, reason: "" });
    },
    /** Resolves with the next sent message of this type (already sent ones first). */
    next(type, pred = () => true) {
      const i = this.sent.findIndex((m) => m.type === type && pred(m));
      if (i >= 0) return Promise.resolve(this.sent.splice(i, 1)[0]);
      return new Promise((resolve) => this.waiters.push({ type, pred, resolve }));
    },
  };
  class FakeWS {
    constructor(url) {
      this.url = url;
      this.readyState = 0;
      server.sockets.push(this);
      setTimeout(() => {
        if (server.refuse) return this.onclose?.({ code: 1006 });
        this.readyState = 1;
        this.onopen?.({});
      });
    }
    send(data) {
      const m = JSON.parse(data);
      if (m.type === "hello") {
        this.hello = m;
        setTimeout(() =>
          this.onmessage?.({
            data: JSON.stringify({ type: "welcome", session: "s-" + server.sockets.length, node: "n", client_id: m.client_id, position: 100, heartbeat_ms: 25000, protocol: 1 }),
          }),
        );
        return;
      }
      const w = server.waiters.findIndex((x) => x.type === m.type && x.pred(m));
      if (w >= 0) server.waiters.splice(w, 1)[0].resolve(m);
      else server.sent.push(m);
    }
    close(code = 1000) {
      if (this.readyState === 3) return;
      this.readyState = 3;
      setTimeout(() => this.onclose?.({ code, reason: "" }));
    }
  }
  server.WebSocket = FakeWS;
  return server;
}

export const tick = (ms = 0) => new Promise((r) => setTimeout(r, ms));

/** Answers the next snapshot request with `pages` (arrays of rows) at `position`. */
export async function serveSnapshot(server, pages, position) {
  const q = await server.next("snapshot");
  pages.forEach((rows, i) =>
    server.push({ type: "snapshot_page", id: q.id, channel: q.channel, position, page: i + 1, last: i === pages.length - 1, rows }),
  );
  return q;
}

export async function serveSubscribe(server) {
  const s = await server.next("subscribe");
  server.push({ type: "subscribed", id: s.id, channel: s.channel, position: s.since });
  return s;
}

export const row = (id, title, version) => ({ key: { id }, version, row: { id, title } });
