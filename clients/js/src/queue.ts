/**
 * The outbox: optimistic mutations waiting for the server, persisted (IndexedDB, or
 * memory when there is none) so they survive a reload and are replayed with the same
 * mutation ids — the bridge's idempotency makes a replay of one that already
 * committed return its first result and change nothing. Sent one at a time, in order,
 * so a retried mutation never lands after a later one.
 */
import type { Connection, Json, Msg } from "./connection.js";
import { LiveSyncError, RETRYABLE, backoffDelay, toError } from "./connection.js";
import type { Key, Row } from "./replica.js";

export type WriteOp = "insert" | "update" | "upsert" | "delete";

export interface Mutation {
  mutation_id: number;
  table: string;
  op: WriteOp;
  key: Key;
  values: Row | null;
  base_version?: number;
  base_values?: Row;
  hlc?: string;
  created_at: number;
  /** Sends that failed with a non-retryable error. */
  attempts: number;
  /** The last error (for dead-lettered mutations, why). */
  error?: { code: string; message: string; sqlstate?: string };
}

/** `livesync.write`'s result (docs/sql.md, "Conflict-aware writes"). */
export interface WriteResult {
  status: "applied" | "merged" | "conflict" | "rejected";
  version?: number;
  row?: Row;
  conflicts?: { column: string; base: Json; mine: Json; theirs: Json; policy: string; outcome: string; conflict_id?: number }[];
  conflict_id?: number;
  reason?: string;
  [k: string]: unknown;
}

export interface Stored {
  counter: number;
  queue: Mutation[];
  failed: Mutation[];
}

/** Where the queue persists. Writes are issued in order and awaited in order. */
export interface MutationStore {
  load(): Promise<Stored>;
  put(list: "queue" | "failed", m: Mutation, counter: number): Promise<void>;
  remove(list: "queue" | "failed", id: number): Promise<void>;
}

export class MemoryStore implements MutationStore {
  data: Stored = { counter: 0, queue: [], failed: [] };
  async load(): Promise<Stored> {
    return { counter: this.data.counter, queue: [...this.data.queue], failed: [...this.data.failed] };
  }
  async put(list: "queue" | "failed", m: Mutation, counter: number): Promise<void> {
    const l = this.data[list].filter((x) => x.mutation_id !== m.mutation_id);
    l.push(structuredClone(m));
    l.sort((a, b) => a.mutation_id - b.mutation_id);
    this.data[list] = l;
    if (list === "failed") await this.remove("queue", m.mutation_id);
    this.data.counter = Math.max(this.data.counter, counter);
  }
  async remove(list: "queue" | "failed", id: number): Promise<void> {
    this.data[list] = this.data[list].filter((x) => x.mutation_id !== id);
  }
}

function req<T>(r: IDBRequest<T>): Promise<T> {
  return new Promise((res, rej) => {
    r.onsuccess = () => res(r.result);
    r.onerror = () => rej(r.error);
  });
}

/** IndexedDB database `livesync:<clientId>`: stores `queue`, `failed`, `meta`. */
export class IndexedDBStore implements MutationStore {
  private db: Promise<IDBDatabase>;
  constructor(name: string, idb: IDBFactory = (globalThis as any).indexedDB) {
    const open = idb.open(name, 1);
    open.onupgradeneeded = () => {
      const db = open.result;
      db.createObjectStore("queue", { keyPath: "mutation_id" });
      db.createObjectStore("failed", { keyPath: "mutation_id" });
      db.createObjectStore("meta");
    };
    this.db = req(open);
  }
  private async tx(mode: IDBTransactionMode): Promise<IDBTransaction> {
    return (await this.db).transaction(["queue", "failed", "meta"], mode);
  }
  async load(): Promise<Stored> {
    const t = await this.tx("readonly");
    const [queue, failed, counter] = await Promise.all([
      req(t.objectStore("queue").getAll()),
      req(t.objectStore("failed").getAll()),
      req(t.objectStore("meta").get("counter")),
    ]);
    return { counter: Number(counter ?? 0), queue, failed };
  }
  async put(list: "queue" | "failed", m: Mutation, counter: number): Promise<void> {
    const t = await this.tx("readwrite");
    t.objectStore(list).put(m);
    if (list === "failed") t.objectStore("queue").delete(m.mutation_id);
    t.objectStore("meta").put(counter, "counter");
    await new Promise<void>((res, rej) => {
      t.oncomplete = () => res();
      t.onerror = () => rej(t.error);
    });
  }
  async remove(list: "queue" | "failed", id: number): Promise<void> {
    const t = await this.tx("readwrite");
    await req(t.objectStore(list).delete(id));
  }
}

/** IndexedDB when the platform has it, else memory. */
export function defaultStore(clientId: string): MutationStore {
  try {
    if ((globalThis as any).indexedDB) return new IndexedDBStore("livesync:" + clientId);
  } catch {
    /* e.g. a privacy mode that forbids it */
  }
  return new MemoryStore();
}

export interface QueueHooks {
  /** The server answered `m` (result) or gave up on it (null): remove it and settle. */
  settle(m: Mutation, result: WriteResult | null, remove: () => void): void;
  /** The pending list changed (status may have). */
  changed(): void;
}

export interface QueueOptions {
  /** Sends failing with a non-retryable error before a mutation is dead-lettered (default 3). */
  maxAttempts?: number;
  /** Backoff between retries of one mutation. */
  retryBase?: number;
}

export class MutationQueue {
  private list: Mutation[] = [];
  private dead: Mutation[] = [];
  private counter: number;
  private io: Promise<unknown> = Promise.resolve();
  private sending: Mutation | null = null;
  private timer: ReturnType<typeof setTimeout> | null = null;
  private waiters = new Map<number, { resolve: (r: WriteResult) => void; reject: (e: Error) => void }>();
  private retries = 0;
  private lastMs = 0;
  private hlcCount = 0;
  readonly loaded: Promise<void>;
  private isLoaded = false;
  private maxAttempts: number;
  private retryBase: number;

  constructor(
    private conn: Connection,
    private store: MutationStore,
    private hooks: QueueHooks,
    opts: QueueOptions = {},
  ) {
    this.maxAttempts = opts.maxAttempts ?? 3;
    this.retryBase = opts.retryBase ?? 500;
    // Unique across reloads even before the stored counter is read (and when storage
    // is memory): ids start from the clock, ×1000 for writes within one millisecond.
    this.counter = Date.now() * 1000;
    this.loaded = store
      .load()
      .catch(() => ({ counter: 0, queue: [], failed: [] }) as Stored)
      .then((s) => {
        this.counter = Math.max(this.counter, s.counter);
        const fresh = new Set(this.list.map((m) => m.mutation_id));
        this.list = [...s.queue.filter((m) => !fresh.has(m.mutation_id)), ...this.list];
        this.dead = [...s.failed, ...this.dead];
        this.isLoaded = true;
        this.hooks.changed();
        this.pump();
      });
  }

  /** Mutations not yet answered by the server, oldest first. */
  pending(): Mutation[] {
    return this.list;
  }

  /** Dead-lettered mutations: they failed with a non-retryable error. */
  failed(): Mutation[] {
    return this.dead;
  }

  private hlc(): string {
    const now = Date.now();
    if (now > this.lastMs) {
      this.lastMs = now;
      this.hlcCount = 0;
    } else this.hlcCount++;
    return `${this.lastMs}:${this.hlcCount}`;
  }

  /** Queues a mutation (its optimistic effect shows at once) and sends it when it can. */
  add(fields: Omit<Mutation, "mutation_id" | "created_at" | "attempts" | "hlc">): {
    mutation: Mutation;
    result: Promise<WriteResult>;
  } {
    const m: Mutation = { ...fields, mutation_id: ++this.counter, created_at: Date.now(), attempts: 0, hlc: this.hlc() };
    this.list.push(m);
    this.persist("queue", m);
    const result = new Promise<WriteResult>((resolve, reject) => this.waiters.set(m.mutation_id, { resolve, reject }));
    result.catch(() => {});
    this.hooks.changed();
    this.pump();
    return { mutation: m, result };
  }

  private persist(list: "queue" | "failed", m: Mutation): void {
    const counter = this.counter;
    this.io = this.io.then(() => this.store.put(list, m, counter)).catch(() => {});
  }

  private unpersist(list: "queue" | "failed", id: number): void {
    this.io = this.io.then(() => this.store.remove(list, id)).catch(() => {});
  }

  /** Resolves when every store write issued so far has finished. */
  flushed(): Promise<unknown> {
    return this.io;
  }

  /** Sends the head of the queue if connected and nothing is in flight. */
  pump(): void {
    if (!this.isLoaded || this.sending || this.timer || !this.conn.online) return;
    const m = this.list[0];
    if (!m) return;
    this.sending = m;
    const msg: Msg = {
      type: "write",
      id: this.conn.id("w"),
      table: m.table,
      op: m.op,
      key: m.key,
      values: m.values,
      mutation_id: m.mutation_id,
    };
    if (m.base_version !== undefined) msg.base_version = m.base_version;
    if (m.base_values !== undefined) msg.base_values = m.base_values;
    if (m.hlc) msg.hlc = m.hlc;
    this.conn.stream(msg, (r) => this.answered(m, r));
  }

  private answered(m: Mutation, r: Msg): void {
    this.sending = null;
    if (r.type === "write_result") {
      this.retries = 0;
      const { type: _t, id: _i, ...result } = r;
      this.finish(m, "queue", result as WriteResult);
      return this.pump();
    }
    const e = toError(r);
    if (e.code === "disconnected") return; // resent (same mutation id) on reconnect
    m.error = { code: e.code, message: e.message, ...(e.sqlstate ? { sqlstate: e.sqlstate } : {}) };
    if (!RETRYABLE.has(e.code) && ++m.attempts >= this.maxAttempts) {
      this.dead.push(m);
      this.persist("failed", m);
      this.finish(m, "dead", e);
      return this.pump();
    }
    this.persist("queue", m);
    this.timer = setTimeout(
      () => {
        this.timer = null;
        this.pump();
      },
      backoffDelay(this.retries++, { base: this.retryBase, max: 30000 }),
    );
  }

  private finish(m: Mutation, from: "queue" | "dead", outcome: WriteResult | LiveSyncError): void {
    const result = outcome instanceof LiveSyncError ? null : outcome;
    this.hooks.settle(m, result, () => {
      this.list = this.list.filter((x) => x !== m);
    });
    this.unpersist("queue", m.mutation_id);
    const w = this.waiters.get(m.mutation_id);
    this.waiters.delete(m.mutation_id);
    if (w) outcome instanceof LiveSyncError ? w.reject(outcome) : w.resolve(outcome);
    this.hooks.changed();
  }

  /** Removes a dead-lettered mutation (after the application dealt with it). */
  discard(mutationId: number): void {
    this.dead = this.dead.filter((m) => m.mutation_id !== mutationId);
    this.unpersist("failed", mutationId);
  }

  stop(): void {
    if (this.timer) clearTimeout(this.timer);
    this.timer = null;
  }
}
