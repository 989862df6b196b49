/**
 * A presence room: who is here (members with free-form state), their diffs, and
 * ephemeral broadcasts. Re-joined with its last state after a reconnect.
 */
import type { Connection, Json, Msg } from "./connection.js";
import { LiveSyncError, toError } from "./connection.js";
import { Emitter } from "./events.js";

export interface Member {
  connection: string;
  user: string;
  node: string;
  state: Json;
  color: string;
  joined_at: number;
  last_seen: number;
}

export interface PresenceDiff {
  joins: Member[];
  leaves: Member[];
  updates: Member[];
}

export interface BroadcastEvent {
  event: string;
  payload: Json;
  from: { connection: string; user: string };
}

type RoomEvents = {
  diff: PresenceDiff;
  /** The full member list was (re)loaded: after join, reconnect, or a presence store recovery. */
  sync: Member[];
  broadcast: BroadcastEvent;
  error: LiveSyncError;
};

export interface RoomHost {
  conn: Connection;
  /** Routes errors about this request id to the room. */
  track(id: string, room: Room): void;
  dropRoom(room: Room): void;
}

export class Room extends Emitter<RoomEvents> {
  private memberMap = new Map<string, Member>();
  /** This connection's session (`welcome.session`) while joined. */
  self: string | null = null;
  private state: Json | undefined;
  joined = false;

  constructor(
    private host: RoomHost,
    readonly name: string,
  ) {
    super();
  }

  /** Joins (or re-joins, replacing the state); resolves with the members, self included.
   * Called while offline, it joins once connected. */
  async join(state: Json = {}): Promise<Member[]> {
    this.state = state;
    this.joined = true;
    if (!this.host.conn.online) {
      // joined when the connection opens (resume)
      return new Promise((resolve) => {
        const off = this.on("sync", (members) => {
          off();
          resolve(members);
        });
      });
    }
    this.receive(await this.host.conn.request({ type: "join", room: this.name, state }, "j"));
    return this.members();
  }

  /** Replaces this member's state (sent when connected; kept for re-joins). */
  update(state: Json): void {
    this.state = state;
    if (!this.joined) return;
    this.send({ type: "presence", room: this.name, state });
  }

  async leave(): Promise<void> {
    this.joined = false;
    this.state = undefined;
    this.memberMap.clear();
    this.self = null;
    try {
      await this.host.conn.request({ type: "leave", room: this.name }, "l");
    } catch (e) {
      if ((e as LiveSyncError).code !== "disconnected") throw e;
    }
  }

  /** Current members, this connection included (`connection === room.self`). */
  members(): Member[] {
    return [...this.memberMap.values()];
  }

  /** An event to every other member (and to this one with `echo`). */
  broadcast(event: string, payload: Json, opts: { echo?: boolean } = {}): boolean {
    const m: Msg = { type: "broadcast", room: this.name, event, payload };
    if (opts.echo) m.echo = true;
    return this.send(m);
  }

  private send(m: Msg): boolean {
    m.id = this.host.conn.id("b");
    this.host.track(m.id, this);
    return this.host.conn.sendRaw(m);
  }

  /** Connected again: join with the last state. */
  resume(): void {
    if (!this.joined) return;
    this.host.conn
      .request({ type: "join", room: this.name, state: this.state ?? {} }, "j")
      .then((r) => this.receive(r))
      .catch((e) => e.code !== "disconnected" && this.emit("error", e));
  }

  suspend(): void {
    this.self = null;
  }

  /** A message for this room. */
  receive(m: Msg): void {
    switch (m.type) {
      case "presence_state":
        this.self = m.self;
        this.memberMap = new Map((m.members as Member[]).map((x) => [x.connection, x]));
        this.emit("sync", this.members());
        break;
      case "presence_diff": {
        const d: PresenceDiff = { joins: m.joins ?? [], leaves: m.leaves ?? [], updates: m.updates ?? [] };
        for (const x of d.leaves) this.memberMap.delete(x.connection);
        for (const x of [...d.joins, ...d.updates]) this.memberMap.set(x.connection, x);
        this.emit("diff", d);
        break;
      }
      case "broadcast":
        this.emit("broadcast", { event: m.event, payload: m.payload, from: m.from });
        break;
      case "error":
        this.emit("error", toError(m));
        break;
    }
  }
}
