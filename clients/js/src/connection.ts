/**
 * The socket: connect, `hello`, request/reply by id, exponential backoff with jitter,
 * a client-side liveness check. It knows nothing about tables or rooms: the owner
 * listens for `open` (after `welcome`) to resume them, and routes other messages.
 */
import { Emitter } from "./events.js";

export type Json = null | boolean | number | string | Json[] | { [k: string]: Json };
export type Msg = { type: string; [k: string]: any };

/** The subset of the WebSocket API the client uses (browsers, Node ≥ 22, `ws`). */
export interface SocketLike {
  readyState: number;
  send(data: string): void;
  close(code?: number, reason?: string): void;
  onopen: ((ev: any) => void) | null;
  onmessage: ((ev: { data: any }) => void) | null;
  onclose: ((ev: { code: number; reason?: string }) => void) | null;
  onerror: ((ev: any) => void) | null;
}
export type SocketCtor = new (url: string) => SocketLike;

export type TokenSource = string | (() => string | Promise<string>);

/** An `error` message from the bridge (or `disconnected` when the socket closed). */
export class LiveSyncError extends Error {
  constructor(
    public code: string,
    message: string,
    public sqlstate?: string,
  ) {
    super(message);
    this.name = "LiveSyncError";
  }
}

/** Codes after which sending the same request again may succeed. */
export const RETRYABLE = new Set(["unavailable", "rate_limited", "disconnected"]);

export interface Backoff {
  /** First delay, ms (default 250). */
  base: number;
  /** Largest delay, ms (default 30 000). */
  max: number;
}

/**
 * Delay before reconnect attempt `attempt` (0-based): exponential, capped, with
 * "equal jitter" — between half and all of base·2^attempt — so a crowd of clients
 * that lost one bridge does not come back in step.
 */
export function backoffDelay(attempt: number, b: Backoff, random: () => number = Math.random): number {
  const d = Math.min(b.max, b.base * 2 ** Math.min(attempt, 30));
  return Math.round(d / 2 + (random() * d) / 2);
}

export interface Welcome {
  session: string;
  node: string;
  client_id: string;
  position: number;
  heartbeat_ms: number;
  protocol: number;
}

type Events = {
  open: Welcome;
  close: { code: number; reason: string };
  message: Msg;
  fatal: LiveSyncError;
};

export interface ConnectionOptions {
  url: string;
  clientId: string;
  token?: TokenSource;
  WebSocket?: SocketCtor;
  backoff?: Partial<Backoff>;
}

/**
 * JSON.parse, except that an integer beyond Number's exact range (a bigint or numeric
 * id past 2^53) is kept as the string of its digits rather than rounded: two ids that
 * would round alike stay two rows, and a write with that key names the right row.
 */
export function parseJson(text: string): any {
  if (!/\d{16}/.test(text)) return JSON.parse(text);
  let out = "";
  let last = 0;
  for (let i = 0; i < text.length; i++) {
    const ch = text[i];
    if (ch === '"') {
      for (i++; i < text.length && text[i] !== '"'; i++) if (text[i] === "\\") i++;
    } else if (ch === "-" || (ch >= "0" && ch <= "9")) {
      let j = i + 1;
      while (j < text.length && /[0-9.eE+-]/.test(text[j])) j++;
      const num = text.slice(i, j);
      if (/^-?\d{16,}$/.test(num) && !Number.isSafeInteger(Number(num))) {
        out += text.slice(last, i) + '"' + num + '"';
        last = j;
      }
      i = j - 1;
    }
  }
  return JSON.parse(out + text.slice(last));
}

export class Connection extends Emitter<Events> {
  private socket: SocketLike | null = null;
  private ctor: SocketCtor;
  private backoff: Backoff;
  private attempt = 0;
  private timer: ReturnType<typeof setTimeout> | null = null;
  private beat: ReturnType<typeof setInterval> | null = null;
  private lastHeard = 0;
  private nextId = 0;
  private waiting = new Map<string, (m: Msg) => boolean | void>();
  private stopped = false;
  welcome: Welcome | null = null;
  /** A closing reason that stops reconnecting (bad protocol, refused token). */
  fatal: LiveSyncError | null = null;

  constructor(private opts: ConnectionOptions) {
    super();
    const ctor = opts.WebSocket ?? (globalThis as any).WebSocket;
    if (!ctor) {
      throw new Error(
        "no WebSocket: pass one as the WebSocket option (Node 20: run with --experimental-websocket)",
      );
    }
    this.ctor = ctor;
    this.backoff = { base: 250, max: 30000, ...opts.backoff };
  }

  get online(): boolean {
    return this.welcome !== null;
  }

  start(): void {
    this.stopped = false;
    if (!this.socket && !this.timer) void this.connect();
  }

  /** Closes the socket and stops reconnecting. */
  stop(): void {
    this.stopped = true;
    if (this.timer) clearTimeout(this.timer);
    this.timer = null;
    const s = this.socket;
    this.dropped(1000, "closed by client");
    s?.close(1000, "closed by client");
  }

  /** Drops the current socket (it reconnects after the usual backoff). */
  reconnect(): void {
    const s = this.socket;
    if (!s) return;
    this.dropped(1000, "reconnecting");
    s.close();
  }

  private async connect(): Promise<void> {
    this.timer = null;
    if (this.stopped) return;
    let token: string | undefined;
    try {
      const t = this.opts.token;
      token = typeof t === "function" ? await t() : t;
    } catch {
      return this.schedule();
    }
    if (this.stopped) return;
    let s: SocketLike;
    try {
      s = new this.ctor(this.opts.url);
    } catch {
      return this.schedule();
    }
    this.socket = s;
    s.onopen = () => {
      const hello: Msg = { type: "hello", client_id: this.opts.clientId, protocol: 1 };
      if (token !== undefined) hello.token = token;
      s.send(JSON.stringify(hello));
    };
    s.onmessage = (ev) => {
      if (this.socket !== s) return;
      this.lastHeard = Date.now();
      let m: Msg;
      try {
        m = parseJson(typeof ev.data === "string" ? ev.data : String(ev.data));
      } catch {
        return;
      }
      this.receive(m);
    };
    // Some implementations (Node 20's) report a failed connection with `error` only,
    // never `close`: an error ends the socket either way.
    s.onerror = () => {
      if (this.socket !== s) return;
      this.dropped(1006, "error");
      try {
        s.close();
      } catch {
        /* not open yet */
      }
    };
    s.onclose = (ev) => {
      if (this.socket === s) this.dropped(ev.code, ev.reason ?? "");
    };
  }

  private receive(m: Msg): void {
    if (m.type === "welcome") {
      this.welcome = m as unknown as Welcome;
      this.attempt = 0;
      this.fatal = null;
      this.startBeat(this.welcome.heartbeat_ms || 25000);
      this.emit("open", this.welcome);
      return;
    }
    if (m.type === "reconnect") {
      // The bridge is going away; come back after its hint, not sooner.
      this.attempt = 0;
      this.retryAfter = Number(m.retry_after_ms) || 0;
      return;
    }
    if (m.id !== undefined && m.id !== null) {
      const fn = this.waiting.get(String(m.id));
      if (fn) {
        if (fn(m) !== false) this.waiting.delete(String(m.id));
        return;
      }
    }
    if (m.type === "error" && (m.id === undefined || m.id === null) && !this.welcome) {
      // Refused before welcome: unauthorized (4001) or protocol (4002) follows.
      this.fatal = toError(m);
      this.emit("fatal", this.fatal);
      return;
    }
    this.emit("message", m);
  }

  private retryAfter = 0;

  private dropped(code: number, reason: string): void {
    const s = this.socket;
    if (s) {
      s.onopen = s.onmessage = s.onclose = s.onerror = null;
    }
    this.socket = null;
    this.stopBeat();
    const wasOpen = this.welcome !== null;
    this.welcome = null;
    const gone = new LiveSyncError("disconnected", "the connection closed");
    for (const fn of [...this.waiting.values()]) fn({ type: "error", code: gone.code, message: gone.message });
    this.waiting.clear();
    if (code === 4002) {
      this.fatal = new LiveSyncError("bad_request", reason || "unsupported protocol version");
      this.emit("fatal", this.fatal);
      this.stopped = true;
    } else if (code === 4001 && !this.fatal) {
      this.fatal = new LiveSyncError("unauthorized", reason || "unauthorized");
      this.emit("fatal", this.fatal);
    }
    if (wasOpen || s) this.emit("close", { code, reason });
    // A fixed token that was refused will be refused again: stop. A token function
    // may give a fresh one: keep trying.
    if (code === 4001 && typeof this.opts.token !== "function") this.stopped = true;
    this.schedule();
  }

  private schedule(): void {
    if (this.stopped || this.timer) return;
    const delay = Math.max(this.retryAfter, backoffDelay(this.attempt++, this.backoff));
    this.retryAfter = 0;
    this.timer = setTimeout(() => void this.connect(), delay);
  }

  private startBeat(ms: number): void {
    this.stopBeat();
    this.lastHeard = Date.now();
    this.beat = setInterval(() => {
      if (Date.now() - this.lastHeard > 2 * ms) return this.reconnect();
      this.sendRaw({ type: "ping", id: this.id("p") });
    }, ms);
    (this.beat as any).unref?.();
  }

  private stopBeat(): void {
    if (this.beat) clearInterval(this.beat);
    this.beat = null;
  }

  /** A fresh request id with a prefix that says what kind of request it is. */
  id(prefix: string): string {
    return prefix + ++this.nextId;
  }

  /** Sends if connected (after welcome); returns whether it was sent. */
  sendRaw(m: Msg): boolean {
    if (!this.welcome || !this.socket) return false;
    try {
      this.socket.send(JSON.stringify(m));
      return true;
    } catch {
      return false;
    }
  }

  /**
   * Sends `m` (whose `id` is set) and calls `onReply` with every message carrying
   * that id until it returns something other than `false`. When the socket closes
   * first it gets an `error` with code `disconnected`.
   */
  stream(m: Msg, onReply: (m: Msg) => boolean | void): void {
    const id = String(m.id);
    this.waiting.set(id, onReply);
    if (!this.sendRaw(m)) {
      this.waiting.delete(id);
      onReply({ type: "error", id, code: "disconnected", message: "not connected" });
    }
  }

  /** Sends a request and resolves with its reply; rejects with its `error`. */
  request(m: Msg, prefix = "r"): Promise<Msg> {
    m.id ??= this.id(prefix);
    return new Promise((resolve, reject) =>
      this.stream(m, (r) => (r.type === "error" ? reject(toError(r)) : resolve(r))),
    );
  }

  /** Forgets a request whose reply no longer matters. */
  forget(id: string): void {
    this.waiting.delete(id);
  }
}

export function toError(m: Msg): LiveSyncError {
  return new LiveSyncError(String(m.code ?? "internal"), String(m.message ?? m.code ?? "error"), m.sqlstate);
}
