//! Bridge memory per idle connection: the growth of the bridge process's resident
//! memory (`VmRSS`) when `BENCH_CONNECTIONS` more connections have said hello and
//! subscribed to a table and then sit idle, beside the stack's own floor in the same
//! run: a bare tokio-tungstenite server (accept, handshake, a task per connection
//! waiting to read; the same 4 KiB read buffer as the bridge) holding the same number
//! of connections.
//!
//! Both servers run in a child process of their own, the clients in this one. Each
//! server first takes `BENCH_WARM` connections (the bridge's pool, caches and
//! runtime settle), then the measured ones; the figure is (RSS after − RSS before) /
//! connections. It also reads the RSS after every connection received one change (a
//! message written: buffers that stay), after a burst of 100 more (100 one-row
//! transactions committed back to back: frames queue up and are written in batches,
//! as a busy connection's are), and after the connections closed. The clients never
//! read: what the servers write waits in the kernel's socket buffers.
//!
//! Environment: `BENCH_PG`, `BENCH_CONNECTIONS` (5000), `BENCH_WARM` (200),
//! `BENCH_ROUNDS` (1).

use std::sync::Arc;
use std::time::{Duration, Instant};

use livesync_bench::bridge::{
    connections_that_fit, env_or, open_clients, serve_if_asked, BridgeDb, BridgeSettings,
    CountingAlloc, FloorSettings, ServerProcess, Subscription,
};

// Counts live heap bytes (reported beside RSS: what the allocator holds beyond them is
// its own overhead and fragmentation).
#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

const FRAME: &str = r#"{"type":"changes","sub":0,"position":100001,"changes":[{"position":100001,"op":"update","key":{"id": 1},"delta":{"score":{"old":0,"new":1}},"version":2,"actor":"postgres","committed_at":"2026-12-04T17:25:49.095966+00:00","tx":1234567}]}"#;

struct Reading {
    heap_before: i64,
    heap_idle: i64,
    heap_closed: i64,
    before: u64,
    idle: u64,
    after_message: u64,
    after_burst: u64,
    closed: u64,
    n: usize,
}

impl Reading {
    fn per_connection(&self) -> f64 {
        (self.idle as f64 - self.before as f64) / self.n as f64
    }

    fn heap_per_connection(&self) -> f64 {
        (self.heap_idle - self.heap_before) as f64 / 1024.0 / self.n as f64
    }

    fn after_message(&self) -> f64 {
        (self.after_message as f64 - self.before as f64) / self.n as f64
    }

    fn after_burst(&self) -> f64 {
        (self.after_burst as f64 - self.before as f64) / self.n as f64
    }
}

fn main() {
    serve_if_asked();
    let n = connections_that_fit(env_or("BENCH_CONNECTIONS", 5000));
    let warm: usize = env_or("BENCH_WARM", 200);
    let rounds: usize = env_or("BENCH_ROUNDS", 1);
    let db = BridgeDb::create(
        "livesync_bench_bridge_memory",
        "CREATE TABLE items (id int PRIMARY KEY, match_id int, title text, score int);
         SELECT livesync.track('items');
         INSERT INTO items VALUES (1, 0, 'item', 0);",
        false,
    );
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let mut bridge = Vec::new();
    let mut floor = Vec::new();
    for round in 0..rounds {
        if round % 2 == 0 {
            bridge.push(measure_bridge(&db, &runtime, n, warm));
            floor.push(measure_floor(&runtime, n, warm));
        } else {
            floor.push(measure_floor(&runtime, n, warm));
            bridge.push(measure_bridge(&db, &runtime, n, warm));
        }
    }
    println!(
        "memory per idle connection: growth of the server's RSS for {n} connections (after {warm} warm-up ones), KiB per connection"
    );
    println!("| server | connections | RSS before (MiB) | RSS idle (MiB) | KiB / idle connection | of which live heap | KiB / connection after one message each | after a burst of 100 | after they closed: RSS (MiB), live heap above before (MiB) |");
    println!("|---|---|---|---|---|---|---|---|---|");
    let mib = |k: u64| k as f64 / 1024.0;
    for (name, readings) in [
        ("bridge (hello + subscribe)", &bridge),
        ("floor: bare tokio-tungstenite (read buffer 4 KiB)", &floor),
    ] {
        for r in readings {
            println!(
                "| {name} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1}, {:.1} |",
                r.n,
                mib(r.before),
                mib(r.idle),
                r.per_connection(),
                r.heap_per_connection(),
                r.after_message(),
                r.after_burst(),
                mib(r.closed),
                (r.heap_closed - r.heap_before) as f64 / 1048576.0,
            );
        }
    }
    let median = |rs: &[Reading]| {
        let mut v: Vec<f64> = rs.iter().map(Reading::per_connection).collect();
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[v.len() / 2]
    };
    let (b, f) = (median(&bridge), median(&floor));
    println!(
        "bridge / floor: {:.2}x ({:.1} vs {:.1} KiB per idle connection)",
        b / f,
        b,
        f
    );
    println!(
        "target (issue 12): <= 16 KiB per idle connection: {} ({b:.1} KiB)",
        if b <= 16.0 { "met" } else { "NOT met" }
    );
}

/// Live heap bytes of the server process.
fn heap(server: &mut ServerProcess) -> i64 {
    server.ask("STATS")["heap"].as_i64().unwrap_or(0)
}

/// RSS once it has stopped moving (allocator and kernel settle), at most 3 s.
fn settled_rss(server: &ServerProcess) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut last = server.rss_kib();
    loop {
        std::thread::sleep(Duration::from_millis(300));
        let now = server.rss_kib();
        if now == last || Instant::now() > deadline {
            return now;
        }
        last = now;
    }
}

fn measure_bridge(
    db: &BridgeDb,
    runtime: &tokio::runtime::Runtime,
    n: usize,
    warm: usize,
) -> Reading {
    let mut server = ServerProcess::bridge(&BridgeSettings {
        database_url: db.bridge_url(),
        window_changes: 100_000,
        queue_capacity: None,
    });
    let subscribe: Arc<dyn Fn(usize) -> Subscription + Send + Sync> =
        Arc::new(|_| Subscription::table("items"));
    let warm_clients =
        runtime.block_on(open_clients(server.addr, warm, 64, Some(subscribe.clone())));
    let before = settled_rss(&server);
    let heap_before = heap(&mut server);
    let clients = runtime.block_on(open_clients(server.addr, n, 64, Some(subscribe)));
    let idle = settled_rss(&server);
    let heap_idle = heap(&mut server);
    // One change to every subscriber (the clients do not read: the kernel holds it),
    // then a burst of 100.
    let mut writer = db.connect();
    writer
        .batch_execute("SET synchronous_commit = off")
        .unwrap();
    let mut changes = |count: usize| {
        let sent_before = server.ask("STATS")["changes_sent"].as_f64().unwrap_or(0.0);
        for _ in 0..count {
            writer
                .batch_execute("UPDATE items SET score = score + 1 WHERE id = 1")
                .unwrap();
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while server.ask("STATS")["changes_sent"].as_f64().unwrap_or(0.0)
            < sent_before + (count * (n + warm)) as f64
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(50));
        }
        settled_rss(&server)
    };
    let after_message = changes(1);
    let after_burst = changes(100);
    drop(clients);
    drop(warm_clients);
    let deadline = Instant::now() + Duration::from_secs(10);
    while server.ask("STATS")["connections"].as_u64().unwrap_or(0) > 0 && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    let closed = settled_rss(&server);
    let heap_closed = heap(&mut server);
    Reading {
        heap_before,
        heap_idle,
        heap_closed,
        before,
        idle,
        after_message,
        after_burst,
        closed,
        n,
    }
}

fn measure_floor(runtime: &tokio::runtime::Runtime, n: usize, warm: usize) -> Reading {
    let mut server = ServerProcess::floor(&FloorSettings::new(FRAME.to_string()));
    let warm_clients = runtime.block_on(open_clients(server.addr, warm, 64, None));
    let before = settled_rss(&server);
    let heap_before = heap(&mut server);
    let clients = runtime.block_on(open_clients(server.addr, n, 64, None));
    let idle = settled_rss(&server);
    let heap_idle = heap(&mut server);
    server.send("T 1");
    let after_message = settled_rss(&server);
    server.send("T 101");
    let after_burst = settled_rss(&server);
    drop(clients);
    drop(warm_clients);
    let deadline = Instant::now() + Duration::from_secs(10);
    while server.ask("STATS")["connections"].as_u64().unwrap_or(0) > 0 && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    let closed = settled_rss(&server);
    let heap_closed = heap(&mut server);
    Reading {
        heap_before,
        heap_idle,
        heap_closed,
        before,
        idle,
        after_message,
        after_burst,
        closed,
        n,
    }
}
