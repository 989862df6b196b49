// The livesync demo board: a shared todo list on public.todos, with presence
// (avatars and cursors) in the table's room, a sync status, the pending-mutation count
// and an offline switch. Only the client's public API is used.
import { LiveSync, keyString, type Member, type Row, type Status } from "../clients/js/dist/index.js";

const $ = <T extends HTMLElement>(sel: string) => document.querySelector(sel) as T;
const listEl = $<HTMLUListElement>("#list");
const statusEl = $("#status");
const pendingEl = $("#pending");
const offlineEl = $<HTMLInputElement>("#offline");
const avatarsEl = $("#avatars");
const cursorsEl = $("#cursors");
const board = $("#board");

// The offline switch is kept per tab across reloads (sessionStorage), so a reloaded
// offline tab stays offline and shows its queued (IndexedDB-persisted) edits.
const startOffline = sessionStorage.getItem("livesync-demo:offline") === "1";
offlineEl.checked = startOffline;

const NAMES = ["Ada", "Alan", "Grace", "Edsger", "Barbara", "Donald", "Frances", "Ken", "Radia", "Tony"];
let myName = sessionStorage.getItem("livesync-demo:name");
if (!myName) {
  myName = NAMES[Math.floor(Math.random() * NAMES.length)] + " " + Math.floor(Math.random() * 90 + 10);
  sessionStorage.setItem("livesync-demo:name", myName);
}
$("#me").textContent = `You are ${myName}.`;

const url = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws`;
const ls = new LiveSync({ url, autoConnect: !startOffline, backoff: { base: 200, max: 5000 } });
const TABLE = "public.todos";
const todos = ls.table(TABLE);
const room = ls.room("table:" + TABLE);

// ---- rendering -------------------------------------------------------------------

let scheduled = false;
function render(): void {
  if (scheduled) return;
  scheduled = true;
  queueMicrotask(() => {
    scheduled = false;
    renderNow();
  });
}

const pendingKeys = (): Set<string> =>
  new Set(ls.pending().filter((m) => m.table === TABLE).map((m) => keyString(m.key)));

function renderNow(): void {
  const rows = [...todos.rows().values()].sort((a, b) => Number(a.id) - Number(b.id));
  const pending = pendingKeys();
  const existing = new Map<string, HTMLLIElement>();
  for (const li of [...listEl.children] as HTMLLIElement[]) existing.set(li.dataset.id!, li);
  let prev: HTMLLIElement | null = null;
  for (const row of rows) {
    const id = String(row.id);
    let li = existing.get(id);
    if (li) existing.delete(id);
    else li = itemElement(id);
    update(li, row, pending.has(keyString({ id: row.id as number })));
    const want: ChildNode | null = prev ? prev.nextSibling : listEl.firstChild;
    if (want !== li) listEl.insertBefore(li, want);
    prev = li;
  }
  for (const li of existing.values()) li.remove();
  $("#empty").hidden = rows.length > 0;
  listEl.dataset.count = String(rows.length);
  renderPending();
  renderCursors();
}

function itemElement(id: string): HTMLLIElement {
  const li = document.createElement("li");
  li.dataset.id = id;
  li.innerHTML = `<input type="checkbox" class="done" data-field="done"><input class="title" data-field="title"><button class="delete" title="Delete">✕</button>`;
  return li;
}

function update(li: HTMLLIElement, row: Row, pending: boolean): void {
  const done = li.querySelector<HTMLInputElement>(".done")!;
  const title = li.querySelector<HTMLInputElement>(".title")!;
  done.checked = Boolean(row.done);
  // never overwrite what the user is typing
  if (document.activeElement !== title || title.dataset.server === title.value) title.value = String(row.title ?? "");
  title.dataset.server = String(row.title ?? "");
  li.classList.toggle("done", Boolean(row.done));
  li.classList.toggle("pending", pending);
}

function renderPending(): void {
  pendingEl.textContent = String(ls.pending().length);
}

function renderStatus(s: Status): void {
  statusEl.textContent = s;
  statusEl.className = "status " + s;
  statusEl.dataset.status = s;
  renderPending();
}

todos.on("change", render);
todos.on("reload", render);
ls.on("status", renderStatus);
ls.on("conflict", ({ result }) => console.warn("livesync: write", result.status, result.conflicts ?? result.reason ?? ""));
ls.on("error", (e) => console.warn("livesync:", e.code, e.message));
renderStatus(ls.status);
setInterval(renderPending, 500); // the queue also drains while nothing else changes
// the persisted queue loads asynchronously: show its count (and rows) once known
void ls.flushed().then(render);

// ---- editing ---------------------------------------------------------------------

function write(op: "insert" | "update" | "delete", id: number, values: Row | null = null): void {
  const done = ls.write(TABLE, op, { id }, values);
  renderPending();
  done.then(render, (e) => console.warn("livesync: write failed", e)).finally(renderPending);
}

let lastId = 0;
function newId(): number {
  // time-ordered, unique enough between windows, below 2^53
  lastId = Math.max(lastId + 1, Date.now() * 1000 + Math.floor(Math.random() * 1000));
  return lastId;
}

$<HTMLFormElement>("#add").addEventListener("submit", (e) => {
  e.preventDefault();
  const input = $<HTMLInputElement>("#new-title");
  const title = input.value.trim();
  if (!title) return;
  input.value = "";
  write("insert", newId(), { title });
});

listEl.addEventListener("change", (e) => {
  const el = e.target as HTMLInputElement;
  const id = Number(el.closest("li")?.dataset.id);
  if (!id) return;
  if (el.classList.contains("done")) write("update", id, { done: el.checked });
  else if (el.classList.contains("title") && el.value !== el.dataset.server) write("update", id, { title: el.value });
});
listEl.addEventListener("keydown", (e) => {
  const el = e.target as HTMLElement;
  if (e.key === "Enter" && el.classList.contains("title")) (el as HTMLInputElement).blur();
});
listEl.addEventListener("click", (e) => {
  const el = e.target as HTMLElement;
  if (!el.classList.contains("delete")) return;
  const id = Number(el.closest("li")?.dataset.id);
  if (id) write("delete", id);
});

offlineEl.addEventListener("change", () => {
  sessionStorage.setItem("livesync-demo:offline", offlineEl.checked ? "1" : "0");
  if (offlineEl.checked) ls.goOffline();
  else ls.goOnline();
});

// ---- presence: avatars and cursors -----------------------------------------------

interface Cursor {
  record: string | null;
  field: string | null;
  x: number;
  y: number;
}
let cursor: Cursor = { record: null, field: null, x: -1, y: -1 };
const state = () => ({ name: myName, cursor: { ...cursor } });

let lastSent = 0;
let trailing: ReturnType<typeof setTimeout> | null = null;
function sendCursor(): void {
  // throttled: at most one update per 50 ms, the last position always sent
  const wait = lastSent + 50 - Date.now();
  if (wait > 0) {
    trailing ??= setTimeout(() => {
      trailing = null;
      sendCursor();
    }, wait);
    return;
  }
  lastSent = Date.now();
  if (room.joined) room.update(state());
}

function target(el: EventTarget | null): Pick<Cursor, "record" | "field"> {
  const e = el as HTMLElement | null;
  return { record: e?.closest?.("li")?.getAttribute("data-id") ?? null, field: e?.getAttribute?.("data-field") ?? null };
}

board.addEventListener("mousemove", (e) => {
  const r = board.getBoundingClientRect();
  cursor = { ...target(e.target), x: Math.round(e.clientX - r.left), y: Math.round(e.clientY - r.top) };
  sendCursor();
});
board.addEventListener("focusin", (e) => {
  const el = e.target as HTMLElement;
  const b = board.getBoundingClientRect();
  const r = el.getBoundingClientRect();
  cursor = { ...target(el), x: Math.round(r.left - b.left + 8), y: Math.round(r.top - b.top + r.height / 2) };
  sendCursor();
});

const initials = (name: string) =>
  name
    .split(/\s+/)
    .map((w) => w[0])
    .join("")
    .slice(0, 2)
    .toUpperCase();
const nameOf = (m: Member) => String((m.state as any)?.name ?? m.user ?? "?");

function renderPresence(): void {
  const members = room.members();
  avatarsEl.replaceChildren(
    ...members.map((m) => {
      const a = document.createElement("div");
      a.className = "avatar" + (m.connection === room.self ? " me" : "");
      a.style.background = m.color;
      a.title = nameOf(m) + (m.connection === room.self ? " (you)" : "");
      a.textContent = initials(nameOf(m));
      a.dataset.connection = m.connection;
      return a;
    }),
  );
  renderCursors();
}

function renderCursors(): void {
  const others = room.members().filter((m) => m.connection !== room.self);
  const seen = new Set<string>();
  for (const m of others) {
    const c = (m.state as any)?.cursor as Cursor | undefined;
    if (!c || c.x < 0) continue;
    seen.add(m.connection);
    let el = cursorsEl.querySelector<HTMLElement>(`[data-connection="${CSS.escape(m.connection)}"]`);
    if (!el) {
      el = document.createElement("div");
      el.className = "cursor";
      el.dataset.connection = m.connection;
      el.innerHTML = `<div class="arrow"></div><div class="label"></div>`;
      cursorsEl.append(el);
    }
    el.style.color = m.color;
    el.style.left = c.x + "px";
    el.style.top = c.y + "px";
    el.dataset.record = c.record ?? "";
    el.dataset.field = c.field ?? "";
    const label = el.querySelector<HTMLElement>(".label")!;
    label.style.background = m.color;
    label.textContent = nameOf(m) + (c.field ? ` · ${c.field}` : "");
  }
  for (const el of [...cursorsEl.children] as HTMLElement[]) if (!seen.has(el.dataset.connection!)) el.remove();
  // outline the fields others are on
  for (const f of listEl.querySelectorAll<HTMLElement>("[data-field]")) f.style.outline = "";
  for (const m of others) {
    const c = (m.state as any)?.cursor as Cursor | undefined;
    if (!c?.record || !c.field) continue;
    const f = listEl.querySelector<HTMLElement>(`li[data-id="${CSS.escape(c.record)}"] [data-field="${CSS.escape(c.field)}"]`);
    if (f) f.style.outline = `2px solid ${m.color}`;
  }
}

room.on("sync", renderPresence);
room.on("diff", renderPresence);
ls.on("status", (s) => {
  if (s === "offline") {
    avatarsEl.replaceChildren();
    cursorsEl.replaceChildren();
  }
});
void room.join(state()).then(renderPresence);

// For the browser test and the curious: the client objects.
(window as any).livesyncDemo = { ls, todos, room };
