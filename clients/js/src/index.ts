/**
 * `@livesync/client`: live table replicas, optimistic writes with a persisted offline
 * queue, presence rooms — over the livesync WebSocket protocol (docs/protocol.md).
 */
import { Connection, LiveSyncError, type Json, type Msg, type SocketCtor, type TokenSource, type Welcome } from "./connection.js";
import { Emitter } from "./events.js";
import { MemoryStore, MutationQueue, defaultStore, type Mutation, type MutationStore, type WriteOp, type WriteResult } from "./queue.js";
import { Table, keyString, type Key, type Row, type TableOptions } from "./replica.js";
import { Room } from "./room.js";

export { Connection, LiveSyncError, backoffDelay, RETRYABLE } from "./connection.js";
export type { Json, Msg, SocketCtor, SocketLike, TokenSource, Welcome, Backoff } from "./connection.js";
export { Emitter } from "./events.js";
export { MutationQueue, MemoryStore, IndexedDBStore, defaultStore } from "./queue.js";
export type { Mutation, MutationStore, WriteOp, WriteResult, Stored } from "./queue.js";
export { Table, Parts, applyChange, applyRow, keyString, matches, overlay } from "./replica.js";
export type { Change, Filter, FilterOp, Key, Row, RowChange, ServerRow, TableOptions } from "./replica.js";
export { Room } from "./room.js";
export type { Member, PresenceDiff, BroadcastEvent } from "./room.js";

export type Status = "synced" | "syncing" | "offline" | "error";

export interface LiveSyncOptions {
  /** The bridge's WebSocket URL, e.g. `ws://localhost:8080/ws`. */
  url: string;
  /** Names this client across reconnects and reloads (default: one per tab, kept in sessionStorage, else random). */
  clientId?: string;
  /** A JWT, or a function giving a fresh one for each connection. */
  token?: TokenSource;
  /** Where queued mutations persist: default IndexedDB, else memory. */
  storage?: MutationStore | "memory";
  /** A WebSocket implementation (default: the platform's). */
  WebSocket?: SocketCtor;
  /** Reconnect backoff, ms. */
  backoff?: { base?: number; max?: number };
  /** Sends failing with a non-retryable error before a mutation goes to `failed()` (default 3). */
  maxAttempts?: number;
  /** Delay before retrying a failed mutation, ms (default 500, doubling). */
  retryBase?: number;
  /** Connect at once (default true); `false` starts offline until `goOnline()`. */
  autoConnect?: boolean;
}

export interface ConflictEvent {
  mutation: Mutation;
  result: WriteResult;
}

type Events = {
  status: Status;
  conflict: ConflictEvent;
  /** A mutation moved to the dead-letter list. */
  failed: { mutation: Mutation; error: LiveSyncError };
  /** Connected (after `welcome`). */
  open: Welcome;
  error: LiveSyncError;
};

function randomId(): string {
  const c = (globalThis as any).crypto;
  return c?.randomUUID ? c.randomUUID() : Math.random().toString(36).slice(2) + Date.now().toString(36);
}

/** One per tab (sessionStorage: kept across reloads of the tab, not shared with other
 * tabs, whose mutation ids would otherwise share one space). */
function defaultClientId(): string {
  try {
    const ss = (globalThis as any).sessionStorage;
    if (ss) {
      let id = ss.getItem("livesync:client_id");
      if (!id) ss.setItem("livesync:client_id", (id = randomId()));
      return id;
    }
  } catch {
    /* storage forbidden */
  }
  return randomId();
}

export class LiveSync extends Emitter<Events> {
  readonly conn: Connection;
  readonly clientId: string;
  private queue: MutationQueue;
  private tables = new Map<string, Table>();
  private subs = new Map<string, Table>();
  private rooms = new Map<string, Room>();
  private roomRequests = new Map<string, Room>();
  private current: Status = "offline";

  constructor(opts: LiveSyncOptions) {
    super();
    this.clientId = opts.clientId ?? defaultClientId();
    this.conn = new Connection({
      url: opts.url,
      clientId: this.clientId,
      token: opts.token,
      WebSocket: opts.WebSocket,
      backoff: opts.backoff,
    });
    const store = opts.storage === "memory" ? new MemoryStore() : (opts.storage ?? defaultStore(this.clientId));
    this.queue = new MutationQueue(
      this.conn,
      store,
      {
        settle: (m, result, remove) => this.settle(m, result, remove),
        changed: () => {
          for (const t of this.tables.values()) t.invalidate();
          this.statusChanged();
        },
      },
      { maxAttempts: opts.maxAttempts, retryBase: opts.retryBase },
    );
    this.conn.on("open", (w) => {
      for (const t of this.tables.values()) t.resume();
      for (const r of this.rooms.values()) r.resume();
      this.queue.pump();
      this.emit("open", w);
      this.statusChanged();
    });
    this.conn.on("close", () => {
      for (const t of this.tables.values()) t.suspend();
      for (const r of this.rooms.values()) r.suspend();
      this.subs.clear();
      this.statusChanged();
    });
    this.conn.on("fatal", (e) => {
      this.emit("error", e);
      this.statusChanged();
    });
    this.conn.on("message", (m) => this.route(m));
    if (opts.autoConnect !== false) this.conn.start();
  }

  /** Stops the socket (and reconnecting) but keeps everything else: replicas keep their
   * rows, writes are applied optimistically and queued (persisted) until `goOnline()`. */
  goOffline(): void {
    this.conn.stop();
    this.statusChanged();
  }

  /** Connects again after `goOffline()` (or `autoConnect: false`): tables resume from
   * their positions, rooms are re-joined, queued writes are sent. */
  goOnline(): void {
    this.conn.start();
  }

  /** `synced`: connected, every table streaming, nothing queued; `syncing`: connected,
   * loading or sending; `offline`: not connected; `error`: the bridge refused us. */
  get status(): Status {
    return this.current;
  }

  private statusChanged(): void {
    let s: Status;
    if (!this.conn.online) s = this.conn.fatal ? "error" : "offline";
    else if (this.queue.pending().length || [...this.tables.values()].some((t) => !t.live)) s = "syncing";
    else s = "synced";
    if (s !== this.current) {
      this.current = s;
      this.emit("status", s);
    }
  }

  private route(m: Msg): void {
    if (m.type === "changes") {
      this.subs.get(m.sub)?.onChanges(m);
      return;
    }
    if (m.type === "error") {
      const id = m.id == null ? "" : String(m.id);
      const t = this.subs.get(id);
      if (t) return t.subscriptionError(m);
      const r = this.roomRequests.get(id);
      if (r) return r.receive(m);
      this.emit("error", new LiveSyncError(String(m.code), String(m.message), m.sqlstate));
      return;
    }
    if (m.type === "reconnect") return;
    if (typeof m.room === "string") this.rooms.get(m.room)?.receive(m);
  }

  /** A live replica of a table (`"public.todos"`); one per name and filter. */
  table(name: string, options: TableOptions = {}): Table {
    const id = name + (options.filter ? " " + JSON.stringify(options.filter) : "");
    let t = this.tables.get(id);
    if (!t) {
      t = new Table(
        {
          conn: this.conn,
          pendingFor: (table) => this.queue.pending().filter((m) => m.table === table),
          route: (sub, table) => (table ? this.subs.set(sub, table) : this.subs.delete(sub)),
          statusChanged: () => this.statusChanged(),
        },
        name,
        options,
      );
      this.tables.set(id, t);
      if (this.conn.online) t.resume();
      this.statusChanged();
    }
    return t;
  }

  private tablesNamed(name: string): Table[] {
    return [...this.tables.values()].filter((t) => t.name === name);
  }

  /**
   * An optimistic write: every replica of `table` shows it at once; it is queued
   * (persisted), sent when online, and resolves with the server's result. `rejected`
   * and `conflict` roll the replica back to the server's row and emit `"conflict"`.
   */
  write(table: string, op: WriteOp, key: Key, values: Row | null = null): Promise<WriteResult> {
    const t = this.tablesNamed(table)[0];
    const fields: Omit<Mutation, "mutation_id" | "created_at" | "attempts" | "hlc"> = { table, op, key, values };
    if (t && op !== "insert") {
      const v = t.version(key);
      if (v !== undefined) fields.base_version = v;
      const row = t.get(key);
      if (row && values && op !== "delete") {
        const base: Row = {};
        for (const c of Object.keys(values)) if (c in row) base[c] = row[c];
        fields.base_values = base;
      }
    }
    const views = this.tablesNamed(table);
    const k = keyString(key);
    let added: ReturnType<MutationQueue["add"]> | undefined;
    const apply = (i: number): void => {
      if (i === views.length) {
        added = this.queue.add(fields);
        return;
      }
      views[i].mutate([k], "local", () => apply(i + 1));
    };
    apply(0);
    return added!.result;
  }

  private settle(m: Mutation, result: WriteResult | null, remove: () => void): void {
    // Each replica replaces the optimistic row with the server's; the innermost
    // removes the mutation, so every replica sees before and after.
    const views = this.tablesNamed(m.table);
    const run = (i: number): void => (i === views.length ? remove() : views[i].settle(m, result, () => run(i + 1)));
    run(0);
    if (result && (result.status === "conflict" || result.status === "rejected")) {
      this.emit("conflict", { mutation: m, result });
    }
    if (!result && m.error) {
      this.emit("failed", { mutation: m, error: new LiveSyncError(m.error.code, m.error.message, m.error.sqlstate) });
    }
  }

  /** Queued mutations not yet answered by the server, oldest first. */
  pending(): Mutation[] {
    return [...this.queue.pending()];
  }

  /** Mutations that failed with a non-retryable error (dead-lettered). */
  failed(): Mutation[] {
    return [...this.queue.failed()];
  }

  /** Removes a dead-lettered mutation. */
  discardFailed(mutationId: number): void {
    this.queue.discard(mutationId);
  }

  /** Resolves once the queue's state has been written to storage. */
  flushed(): Promise<unknown> {
    return this.queue.flushed();
  }

  /** A presence room (one object per name). */
  room(name: string): Room {
    let r = this.rooms.get(name);
    if (!r) {
      r = new Room(
        {
          conn: this.conn,
          track: (id, room) => {
            this.roomRequests.set(id, room);
            if (this.roomRequests.size > 256) this.roomRequests.delete(this.roomRequests.keys().next().value!);
          },
          dropRoom: (room) => this.rooms.delete(room.name),
        },
        name,
      );
      this.rooms.set(name, r);
    }
    return r;
  }

  /** Closes the connection; replicas keep their rows, the queue its mutations. */
  close(): void {
    for (const t of this.tables.values()) t.suspend();
    this.queue.stop();
    this.conn.stop();
    this.statusChanged();
  }
}

export type { Json as JsonValue };
