// The demo page in a real browser: Debian's Chromium driven by playwright-core, two
// browser contexts (two visitors) on the page the bridge serves at `/`, against a
// database of our own with sql/examples/todos.sql. Every wait has a deadline; nothing
// sleeps for a fixed time. Screenshots go to demo/test-artifacts/.
//   node --test demo/test/browser.test.mjs   (after demo/build; `make browser-test`)
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { existsSync, mkdirSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";
import { dropDb, psql, startBridge } from "../../clients/js/test/integration/bridge.mjs";

const here = dirname(fileURLToPath(import.meta.url));
const root = join(here, "../..");
const dist = join(root, "demo/dist");
const artifacts = join(root, "demo/test-artifacts");
const T = 15000; // deadline of one step

let db, bridge, browser;
const pages = {};

function chromiumPath() {
  for (const p of [process.env.CHROMIUM, "/usr/lib/chromium/chromium", "/usr/bin/chromium"]) if (p && existsSync(p)) return p;
  throw new Error("no Chromium: apt-get install -y chromium (.ci/prepare-machine does)");
}

function createDb() {
  const name = process.env.LIVESYNC_TEST_DB ?? `livesync_demo_test_${process.pid}`;
  psql("postgres", `DROP DATABASE IF EXISTS ${name} WITH (FORCE)`);
  psql("postgres", `CREATE DATABASE ${name}`);
  // the demo schema and roles, exactly what `make up` loads; role grants serialised
  // with the other test harnesses (same advisory lock)
  execFileSync(
    "psql",
    ["-X", "-q", "-h", process.env.PGHOST ?? "127.0.0.1", "-p", process.env.PGPORT ?? "5432", "-U", process.env.PGUSER ?? "postgres",
      "-d", name, "-v", "ON_ERROR_STOP=1", "-c", "SELECT pg_advisory_lock(812735)", "-f", join(root, "sql/examples/todos.sql")],
    { stdio: ["ignore", "ignore", "inherit"], env: { ...process.env, PGOPTIONS: "-c client_min_messages=warning" } },
  );
  return name;
}

async function open(name) {
  const context = await browser.newContext({ viewport: { width: 900, height: 640 } });
  const page = await context.newPage();
  page.on("pageerror", (e) => console.error(`[${name}] page error:`, e));
  page.on("console", (m) => m.type() === "error" && console.error(`[${name}]`, m.text()));
  await page.goto(bridge.http + "/");
  await synced(page);
  pages[name] = page;
  return page;
}

const synced = (page) => page.waitForSelector('#status[data-status="synced"]', { timeout: T });
const titleOf = (page, id) => page.$eval(`li[data-id="${id}"] .title`, (e) => e.value).catch(() => null);
const waitTitle = (page, id, title) =>
  page.waitForFunction(([id, t]) => document.querySelector(`li[data-id="${id}"] .title`)?.value === t, [id, title], { timeout: T });
const waitPending = (page, n) => page.waitForFunction((n) => document.querySelector("#pending").textContent === String(n), n, { timeout: T });

before(async () => {
  assert.ok(existsSync(join(dist, "index.html")), "build the demo first: demo/build");
  mkdirSync(artifacts, { recursive: true });
  db = createDb();
  bridge = await startBridge(db, {
    DATABASE_URL: `host=${process.env.PGHOST ?? "127.0.0.1"} port=${process.env.PGPORT ?? "5432"} user=livesync_bridge dbname=${db}`,
    LIVESYNC_DEFAULT_ROLE: "livesync_demo_app",
    LIVESYNC_DEMO_DIR: dist,
  });
  browser = await chromium.launch({ executablePath: chromiumPath(), headless: true, args: ["--no-sandbox"] });
  await open("a");
  await open("b");
});

after(async () => {
  await browser?.close();
  await bridge?.stop();
  if (db) dropDb(db);
});

let itemId;

test("an item added in one window appears in the other", { timeout: 60000 }, async () => {
  const { a, b } = pages;
  await a.fill("#new-title", "water the plants");
  await a.press("#new-title", "Enter");
  const li = await a.waitForSelector("#list li", { timeout: T });
  itemId = await li.getAttribute("data-id");
  await waitTitle(b, itemId, "water the plants");
  await Promise.all([waitPending(a, 0), synced(a)]);
  assert.equal(psql(db, `SELECT title FROM todos WHERE id = ${itemId}`), "water the plants");
});

test("each window sees the other's cursor and avatar", { timeout: 60000 }, async () => {
  const { a, b } = pages;
  await Promise.all([a, b].map((p) => p.waitForFunction(() => document.querySelectorAll("#avatars .avatar").length === 2, null, { timeout: T })));
  const hover = async (page, sel) => {
    const box = await (await page.$(sel)).boundingBox();
    await page.mouse.move(box.x + 5, box.y + 5);
    await page.mouse.move(box.x + box.width / 2, box.y + box.height / 2, { steps: 3 });
  };
  await hover(a, `li[data-id="${itemId}"] .title`);
  await b.waitForSelector(`.cursor[data-record="${itemId}"][data-field="title"]`, { timeout: T });
  await hover(b, `li[data-id="${itemId}"] .done`);
  await a.waitForSelector(`.cursor[data-record="${itemId}"][data-field="done"]`, { timeout: T });
});

test("offline title edit in one window + tick in the other: both end with both", { timeout: 60000 }, async () => {
  const { a, b } = pages;
  await a.click("#offline");
  await a.waitForSelector('#status[data-status="offline"]', { timeout: T });
  await a.fill(`li[data-id="${itemId}"] .title`, "water the plants (offline edit)");
  await a.press(`li[data-id="${itemId}"] .title`, "Enter");
  await waitPending(a, 1);
  await b.click(`li[data-id="${itemId}"] .done`);
  await waitPending(b, 0);
  assert.equal(psql(db, `SELECT done FROM todos WHERE id = ${itemId}`), "t");
  assert.equal(await titleOf(b, itemId), "water the plants", "b has not seen the offline edit");
  await a.click("#offline");
  for (const p of [a, b]) {
    await waitTitle(p, itemId, "water the plants (offline edit)");
    await p.waitForFunction((id) => document.querySelector(`li[data-id="${id}"] .done`)?.checked === true, itemId, { timeout: T });
    await Promise.all([waitPending(p, 0), synced(p)]);
  }
  assert.equal(psql(db, `SELECT title || '|' || done FROM todos WHERE id = ${itemId}`), "water the plants (offline edit)|true");
});

test("a reload while offline keeps the queued edit and sends it on reconnect", { timeout: 60000 }, async () => {
  const { a, b } = pages;
  await a.click("#offline");
  await a.waitForSelector('#status[data-status="offline"]', { timeout: T });
  await a.fill(`li[data-id="${itemId}"] .title`, "edited offline, then reloaded");
  await a.press(`li[data-id="${itemId}"] .title`, "Enter");
  await waitPending(a, 1);
  await a.evaluate(() => window.livesyncDemo.ls.flushed()); // in IndexedDB
  await a.reload();
  await a.waitForSelector('#status[data-status="offline"]', { timeout: T });
  assert.equal(await a.isChecked("#offline"), true, "still offline after the reload");
  await waitPending(a, 1);
  assert.equal(psql(db, `SELECT title FROM todos WHERE id = ${itemId}`), "water the plants (offline edit)", "not sent while offline");
  await a.click("#offline");
  await waitTitle(b, itemId, "edited offline, then reloaded");
  await waitTitle(a, itemId, "edited offline, then reloaded");
  await Promise.all([waitPending(a, 0), synced(a), synced(b)]);
  assert.equal(psql(db, `SELECT title || '|' || done FROM todos WHERE id = ${itemId}`), "edited offline, then reloaded|true");
  // both cursors again, then the screenshots of both windows
  await a.mouse.move(200, 120, { steps: 2 });
  await a.mouse.move(240, 130, { steps: 2 });
  await b.waitForSelector(".cursor", { timeout: T });
  await b.mouse.move(300, 140, { steps: 2 });
  await b.mouse.move(320, 150, { steps: 2 });
  await a.waitForSelector(".cursor", { timeout: T });
  await a.screenshot({ path: join(artifacts, "window-a.png") });
  await b.screenshot({ path: join(artifacts, "window-b.png") });
});

/** The bridge's commit->publish histogram: cumulative count by bucket bound (seconds),
 * summed over label sets, bounds ascending. */
async function commitToPublish() {
  const text = await (await fetch(bridge.http + "/metrics")).text();
  const m = new Map();
  for (const line of text.split("\n")) {
    const r = /^livesync_commit_to_publish_seconds_bucket\{(?:.*,)?le="([^"]+)"[^}]*\}\s+(\S+)/.exec(line);
    if (!r) continue;
    const le = r[1] === "+Inf" ? Infinity : Number(r[1]);
    m.set(le, (m.get(le) ?? 0) + Number(r[2]));
  }
  return new Map([...m].sort((x, y) => x[0] - y[0]));
}

test("figures: write-to-display latency (p50 of 100 edits), loading a 10,000-row replica", { timeout: 180000 }, async () => {
  const { a, b } = pages;
  const lat = [];
  const before = await commitToPublish();
  for (let i = 0; i < 100; i++) {
    const title = `edit ${i}`;
    // b: resolves with the time its list shows the title (checked after each change is rendered)
    await b.evaluate(
      ([id, title]) => {
        window.__shown = new Promise((resolve) => {
          const { todos } = window.livesyncDemo;
          const check = () => {
            if (document.querySelector(`li[data-id="${id}"] .title`)?.value === title) {
              off();
              resolve(performance.timeOrigin + performance.now());
            }
          };
          const off = todos.on("change", () => setTimeout(check));
        });
      },
      [itemId, title],
    );
    // a: edits the title through the page (as typing + Enter would)
    const t0 = await a.evaluate(
      ([id, title]) => {
        const el = document.querySelector(`li[data-id="${id}"] .title`);
        const t = performance.timeOrigin + performance.now();
        el.value = title;
        el.dispatchEvent(new Event("change", { bubbles: true }));
        return t;
      },
      [itemId, title],
    );
    const t1 = await Promise.race([
      b.evaluate(() => window.__shown),
      new Promise((_, rej) => setTimeout(() => rej(new Error(`edit ${i} not shown in 15 s`)), T)),
    ]);
    lat.push(t1 - t0);
  }
  lat.sort((x, y) => x - y);
  const q = (p) => lat[Math.min(lat.length - 1, Math.floor(p * lat.length))].toFixed(1);
  console.log(`# write in window a -> shown in window b, 100 edits: p50 ${q(0.5)} ms, p90 ${q(0.9)} ms, max ${q(1)} ms`);
  // the same run, as the bridge measured it: commit -> handed to the subscribers
  const after = await commitToPublish();
  const n = (after.get(Infinity) ?? 0) - (before.get(Infinity) ?? 0);
  const bound = (p) => {
    for (const [le, c] of after) if (c - (before.get(le) ?? 0) >= p * n) return le === Infinity ? "> 5 s" : `<= ${le * 1000} ms`;
    return "?";
  };
  console.log(`# bridge commit -> subscriber (livesync_commit_to_publish_seconds, ${n} transactions): p50 ${bound(0.5)}, p99 ${bound(0.99)}`);

  psql(db, "INSERT INTO todos (id, title, done) SELECT g, 'row ' || g, g % 3 = 0 FROM generate_series(1, 10000) g");
  const total = Number(psql(db, "SELECT count(*) FROM todos"));
  const context = await browser.newContext({ viewport: { width: 900, height: 640 } });
  const c = await context.newPage();
  const t0 = Date.now();
  await c.goto(bridge.http + "/");
  await c.waitForFunction((n) => document.querySelector("#list").dataset.count === String(n), total, { timeout: 60000, polling: 50 });
  const loaded = Date.now() - t0;
  await synced(c);
  console.log(`# a new window loads and shows a ${total}-row replica in ${loaded} ms (navigation to rendered list)`);
  // the open windows got the 10,000-row transaction live
  await b.waitForFunction((n) => document.querySelector("#list").dataset.count === String(n), total, { timeout: 60000 });
  await c.screenshot({ path: join(artifacts, "window-c-10k.png") });
  await context.close();
});
