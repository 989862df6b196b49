/**
 * A live replica of one table: snapshot pages, then `subscribe` from the snapshot's
 * position; changes applied by version (never older over newer), a transaction's
 * parts applied together, `resync_required` and schema changes answered by reloading.
 * Optimistic writes are an overlay over the server's rows (see queue.ts): what
 * `rows()` and `get()` show is the server's row with the pending mutations applied.
 */
import type { Connection, Json, Msg } from "./connection.js";
import { LiveSyncError, RETRYABLE, toError } from "./connection.js";
import { Emitter } from "./events.js";
import type { Mutation, WriteResult } from "./queue.js";

export type Key = { [column: string]: Json };
export type Row = { [column: string]: Json };
export type FilterOp = "eq" | "neq" | "in" | "lt" | "lte" | "gt" | "gte";
export interface Filter {
  column: string;
  op: FilterOp;
  value: Json;
}

/** A change as the bridge sends it (docs/protocol.md, "Changes"). */
export interface Change {
  position: number;
  op: "insert" | "update" | "delete" | "truncate" | "schema";
  key: Key | null;
  delta: { [column: string]: { old?: Json; new?: Json } };
  version: number | null;
  actor?: string;
  committed_at?: string;
  tx?: number;
  client_id?: string;
  mutation_id?: number;
  left_filter?: boolean;
}

/** A change to what the replica shows. */
export interface RowChange {
  op: "insert" | "update" | "delete";
  key: Key;
  /** The row now (absent after a delete). */
  row?: Row;
  /** The row before (absent after an insert). */
  old?: Row;
  /** `server`: a change from the stream or a snapshot; `local`: an optimistic write;
   * `settle`: a write's result replaced its optimistic row (e.g. a rollback). */
  source: "server" | "local" | "settle";
}

/** The server's state of one key: `row` null is a tombstone (deleted at `version`). */
export interface ServerRow {
  key: Key;
  row: Row | null;
  version: number;
  /** Known only from an update's delta (the row newly matched the filter): being loaded. */
  partial?: boolean;
}

/** A key as a string: its columns sorted, JSON-encoded. */
export function keyString(key: Key): string {
  return JSON.stringify(Object.keys(key).sort().map((c) => [c, key[c]]));
}

/**
 * Applies one change to `rows` by version. Returns the keys it changed (none when the
 * change was older than what is there), or "reload" for a schema change.
 */
export function applyChange(rows: Map<string, ServerRow>, c: Change): string[] | "reload" {
  if (c.op === "schema") return "reload";
  if (c.op === "truncate") {
    const keys: string[] = [];
    for (const [k, r] of rows) {
      if (r.row) {
        rows.set(k, { key: r.key, row: null, version: r.version });
        keys.push(k);
      }
    }
    return keys;
  }
  const key = c.key as Key;
  const k = keyString(key);
  const cur = rows.get(k);
  const version = Number(c.version);
  if (cur && cur.version >= version) return [];
  if (c.op === "delete") {
    rows.set(k, { key, row: null, version });
  } else if (c.op === "insert") {
    const row: Row = {};
    for (const col in c.delta) row[col] = c.delta[col].new as Json;
    rows.set(k, { key, row, version });
  } else {
    const row: Row = cur?.row ? { ...cur.row } : { ...key };
    for (const col in c.delta) row[col] = c.delta[col].new as Json;
    rows.set(k, { key, row, version, partial: !cur?.row || cur.partial });
  }
  return [k];
}

/** Puts a row read from the server (snapshot, write result) if it is not older. */
export function applyRow(rows: Map<string, ServerRow>, key: Key, row: Row | null, version: number): boolean {
  const k = keyString(key);
  const cur = rows.get(k);
  if (cur && (cur.version > version || (cur.version === version && !cur.partial))) return false;
  rows.set(k, { key, row, version });
  return true;
}

/** Gathers a transaction's parts (`part`/`parts`) until all have arrived. */
export class Parts {
  private position: number | null = null;
  private buffered: Change[] = [];

  /** The whole transaction's changes when `m` completes it, else null. */
  add(m: Msg): Change[] | null {
    const parts = Number(m.parts ?? 1);
    if (parts <= 1) {
      this.reset();
      return m.changes;
    }
    if (this.position !== m.position || Number(m.part) !== this.count + 1) {
      this.reset();
      if (Number(m.part) !== 1) return null; // a part whose beginning we missed
    }
    this.position = m.position;
    this.buffered.push(...m.changes);
    this.count++;
    if (this.count < parts) return null;
    const all = this.buffered;
    this.reset();
    return all;
  }

  private count = 0;

  reset(): void {
    this.position = null;
    this.buffered = [];
    this.count = 0;
  }
}

/** Whether a row passes a filter, as the bridge compares (JSON values; NULL matches nothing). */
export function matches(row: Row, f: Filter): boolean {
  const v = row[f.column];
  if (v === null || v === undefined) return false;
  const cmp = (x: Json): number | null => {
    if (typeof v === "number" && typeof x === "number") return v - x;
    if (typeof v === "string" && typeof x === "string") return v < x ? -1 : v > x ? 1 : 0;
    return JSON.stringify(v) === JSON.stringify(x) ? 0 : null;
  };
  const c = f.op === "in" ? null : cmp(f.value);
  switch (f.op) {
    case "eq":
      return c === 0;
    case "neq":
      return c !== 0;
    case "in":
      return Array.isArray(f.value) && f.value.some((x) => cmp(x) === 0);
    case "lt":
      return c !== null && c < 0;
    case "lte":
      return c !== null && c <= 0;
    case "gt":
      return c !== null && c > 0;
    default:
      return c !== null && c >= 0;
  }
}

/** The mutation applied to a row (the optimistic overlay). */
export function overlay(row: Row | undefined, m: Mutation): Row | undefined {
  switch (m.op) {
    case "delete":
      return undefined;
    case "update":
      return row ? { ...row, ...(m.values ?? {}) } : undefined;
    default:
      return { ...(row ?? {}), ...m.key, ...(m.values ?? {}) };
  }
}

export interface TableHost {
  conn: Connection;
  /** Pending mutations of this table, oldest first. */
  pendingFor(table: string): Mutation[];
  /** Routes `changes` and subscription errors with this id to the table. */
  route(subId: string, table: Table | null): void;
  statusChanged(): void;
}

type TableEvents = {
  change: RowChange[];
  error: LiveSyncError;
  /** The replica was reloaded from a snapshot (first load, resync, schema change). */
  reload: { position: number };
};

export interface TableOptions {
  filter?: Filter;
}

export class Table extends Emitter<TableEvents> {
  /** The server's rows (and tombstones) by key string. */
  readonly server = new Map<string, ServerRow>();
  /** The position the replica has every change up to (null before the first snapshot). */
  position: number | null = null;
  /** Subscribed and streaming. */
  live = false;
  readonly ready: Promise<void>;
  private resolveReady!: () => void;
  private rejectReady!: (e: Error) => void;
  private subId: string | null = null;
  private parts = new Parts();
  private cache: Map<string, Row> | null = null;
  private generation = 0;
  private retry: ReturnType<typeof setTimeout> | null = null;
  private closed = false;

  constructor(
    private host: TableHost,
    readonly name: string,
    readonly options: TableOptions = {},
  ) {
    super();
    this.ready = new Promise((res, rej) => {
      this.resolveReady = res;
      this.rejectReady = rej;
    });
    this.ready.catch(() => {});
  }

  get channel(): string {
    return "table:" + this.name;
  }

  /** Current rows by key string (`keyString(key)`), pending writes included. */
  rows(): Map<string, Row> {
    if (this.cache) return this.cache;
    const out = new Map<string, Row>();
    const keys = new Set<string>(this.server.keys());
    for (const m of this.host.pendingFor(this.name)) keys.add(keyString(m.key));
    for (const k of keys) {
      const r = this.view(k);
      if (r) out.set(k, r);
    }
    return (this.cache = out);
  }

  /** The row with this key (an object of its key columns), pending writes included. */
  get(key: Key): Row | undefined {
    return this.rows().get(keyString(key));
  }

  /** The server's version of this row (what a write's `base_version` is). */
  version(key: Key): number | undefined {
    const s = this.server.get(keyString(key));
    return s?.row ? s.version : undefined;
  }

  private view(k: string): Row | undefined {
    let row = this.server.get(k)?.row ?? undefined;
    let local = false;
    for (const m of this.host.pendingFor(this.name)) {
      if (keyString(m.key) === k) {
        row = overlay(row, m);
        local = true;
      }
    }
    // A pending write that takes the row out of a filtered replica hides it.
    const f = this.options.filter;
    return local && row && f && !matches(row, f) ? undefined : row;
  }

  /** Runs `fn`, then emits what it changed among `keys` (all keys when null). */
  mutate(keys: Iterable<string> | null, source: RowChange["source"], fn: () => void): void {
    const before = keys ? new Map([...keys].map((k) => [k, this.view(k)])) : new Map(this.rows());
    fn();
    this.cache = null;
    if (!keys) for (const k of this.rows().keys()) if (!before.has(k)) before.set(k, undefined);
    const changes: RowChange[] = [];
    for (const [k, old] of before) {
      const row = this.view(k);
      if (!old && !row) continue;
      if (old && row && JSON.stringify(old) === JSON.stringify(row)) continue;
      const key = this.server.get(k)?.key ?? (Object.fromEntries(JSON.parse(k)) as Key);
      const op = !old ? "insert" : !row ? "delete" : "update";
      const c: RowChange = { op, key, source };
      if (row) c.row = row;
      if (old) c.old = old;
      changes.push(c);
    }
    if (changes.length) this.emit("change", changes);
  }

  /** The connection is open (again): resume from the last position, or load. */
  resume(): void {
    if (this.closed) return;
    this.parts.reset();
    this.live = false;
    if (this.position === null) this.load();
    else this.subscribe(this.position);
  }

  /** The connection closed. */
  suspend(): void {
    this.live = false;
    this.generation++;
    if (this.subId) this.host.route(this.subId, null);
    this.subId = null;
    if (this.retry) clearTimeout(this.retry);
    this.retry = null;
  }

  close(): void {
    const sub = this.subId;
    this.suspend();
    this.closed = true;
    if (sub) this.host.conn.sendRaw({ type: "unsubscribe", id: sub });
  }

  /** Loads a snapshot (replacing the rows), then subscribes from its position. */
  load(): void {
    const gen = ++this.generation;
    const conn = this.host.conn;
    if (this.subId) {
      this.host.route(this.subId, null);
      conn.sendRaw({ type: "unsubscribe", id: this.subId });
      this.subId = null;
    }
    this.live = false;
    this.host.statusChanged();
    const rows: { key: Key; version: number; row: Row }[] = [];
    const m: Msg = { type: "snapshot", id: conn.id("q"), channel: this.channel };
    if (this.options.filter) m.filter = this.options.filter;
    conn.stream(m, (page) => {
      if (gen !== this.generation) return;
      if (page.type === "error") return this.failed(toError(page), () => this.load());
      rows.push(...page.rows);
      if (!page.last) return false;
      this.mutate(null, "server", () => {
        this.server.clear();
        for (const r of rows) this.server.set(keyString(r.key), { key: r.key, row: r.row, version: r.version });
      });
      this.position = page.position;
      this.emit("reload", { position: page.position });
      this.subscribe(page.position);
    });
  }

  private subscribe(since: number): void {
    const gen = this.generation;
    const conn = this.host.conn;
    const id = conn.id("s");
    this.subId = id;
    this.host.route(id, this);
    const m: Msg = { type: "subscribe", id, channel: this.channel, since };
    if (this.options.filter) m.filter = this.options.filter;
    conn.stream(m, (r) => {
      if (gen !== this.generation) return;
      if (r.type === "error") return this.subscriptionError(r);
      this.live = true;
      this.resolveReady();
      this.host.statusChanged();
    });
  }

  /** An error about our subscription: at subscribe, or ending it later. */
  subscriptionError(r: Msg): void {
    this.host.route(String(r.id), null);
    if (String(r.id) === this.subId) this.subId = null;
    this.live = false;
    const e = toError(r);
    if (e.code === "resync_required") return this.load();
    this.failed(e, () => (this.position === null ? this.load() : this.subscribe(this.position)));
  }

  private failed(e: LiveSyncError, again: () => void): void {
    if (e.code === "disconnected") return; // resumed when the connection opens again
    this.emit("error", e);
    if (RETRYABLE.has(e.code)) {
      const gen = this.generation;
      this.retry = setTimeout(() => {
        if (gen === this.generation && this.host.conn.online) again();
      }, 1000);
    } else {
      this.rejectReady(e);
      this.host.statusChanged();
    }
  }

  /** A `changes` message for our subscription. */
  onChanges(m: Msg): void {
    if (m.sub !== this.subId) return;
    const changes = this.parts.add(m);
    if (!changes) return;
    let reload = false;
    const whole = changes.some((c) => c.op === "truncate" || c.op === "schema");
    const partial: Key[] = [];
    this.mutate(whole ? null : changes.map((c) => keyString(c.key as Key)), "server", () => {
      for (const c of changes) {
        const r = applyChange(this.server, c);
        if (r === "reload") {
          reload = true;
          break;
        }
        for (const k of r) {
          const s = this.server.get(k)!;
          if (s.partial && !this.fetching.has(k)) partial.push(s.key);
        }
      }
    });
    if (reload) return this.load();
    this.position = m.position;
    for (const key of partial) this.fetchRow(key);
  }

  private fetching = new Set<string>();

  /** Loads one row the replica knows only partly (it newly matched the filter). */
  private fetchRow(key: Key): void {
    const cols = Object.keys(key);
    const conn = this.host.conn;
    const k = keyString(key);
    const rows: ServerRow[] = [];
    this.fetching.add(k);
    conn.stream(
      { type: "snapshot", id: conn.id("q"), channel: this.channel, filter: { column: cols[0], op: "eq", value: key[cols[0]] } },
      (page) => {
        if (page.type === "error") return void this.fetching.delete(k);
        for (const r of page.rows) if (keyString(r.key) === k) rows.push(r);
        if (!page.last) return false;
        this.fetching.delete(k);
        this.mutate([k], "server", () => {
          for (const r of rows) applyRow(this.server, r.key, r.row, r.version);
        });
      },
    );
  }

  /** A write's result: the server's row replaces the optimistic one. */
  settle(m: Mutation, result: WriteResult | null, remove: () => void): void {
    const k = keyString(m.key);
    this.mutate([k], "settle", () => {
      remove();
      if (!result) return;
      const cur = this.server.get(k);
      if (result.row && result.version != null) {
        // A row the write took out of a filtered replica leaves it: the stream's
        // `left_filter` delete has this same version, so it would not remove it.
        const f = this.options.filter;
        applyRow(this.server, m.key, f && !matches(result.row, f) ? null : result.row, Number(result.version));
      } else if (
        (result.status === "applied" && m.op === "delete") ||
        (result.status === "rejected" && (result.reason === "not_found" || result.reason === "deleted"))
      ) {
        // The row is gone; its delete (with its version) comes on the stream.
        if (cur?.row) this.server.set(k, { key: cur.key, row: null, version: cur.version });
      }
    });
  }

  /** Forgets the cached view (the pending list changed). */
  invalidate(): void {
    this.cache = null;
  }
}
