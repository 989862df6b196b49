//! Bridge fan-out ceiling: deliveries per second to 1,000 and to 10,000 WebSocket
//! subscribers of one table, beside the stack's own floor measured in the same run:
//! a bare tokio-tungstenite server (child process, as the bridge) broadcasting one
//! pre-serialised frame, the bridge's own message for the same change, to the same
//! number of connections, with nothing else to do.
//!
//! A delivery is one `changes` message (one WebSocket frame) received by one
//! subscriber; every transaction is a one-row UPDATE, so a message is one change and
//! the floor's frame is the same size. Both servers are driven the same way, as fast
//! as they deliver: the senders stay at most `BENCH_WINDOW` deliveries ahead of what
//! the clients have received (the bridge: writers committing UPDATEs with
//! `synchronous_commit = off`, holding back when a new commit would exceed the
//! window; the floor: its broadcast target raised likewise), so both always have work
//! queued (every connection has up to window / subscribers messages waiting, which
//! lets writes batch) and no bridge subscriber falls out of live (its queue holds
//! 1,024). After a second of warm-up, deliveries are counted at the clients for
//! `BENCH_SECONDS`.
//!
//! The floor's connections are configured as the bridge configures its own: a 4 KiB
//! read buffer, frames gathered in tungstenite's write buffer up to 32 KiB, at most 64
//! frames (the bridge's `WRITE_BATCH`) per flush.
//!
//! Environment: `BENCH_PG`, `BENCH_SUBSCRIBERS` ("1000 10000"), `BENCH_SECONDS` (5),
//! `BENCH_WINDOW` (deliveries in flight, 200000), `BENCH_WRITERS` (2),
//! `BENCH_ROUNDS` (1).

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use livesync_bench::bridge::{
    connections_that_fit, env_list, env_or, is_changes, open_clients, serve_if_asked, thousands,
    BridgeDb, BridgeSettings, CpuMeter, CpuUse, FloorSettings, ServerProcess, ShardedCounter,
    Subscription, Ws,
};
use tokio_tungstenite::tungstenite::Message;

const ROWS: i32 = 1000;

#[derive(Clone, Copy, PartialEq, Debug)]
enum Variant {
    Bridge,
    Floor,
}

impl Variant {
    fn name(self) -> &'static str {
        match self {
            Variant::Bridge => "bridge",
            Variant::Floor => "floor: bare tokio-tungstenite broadcasting one frame",
        }
    }
}

struct Outcome {
    per_second: f64,
    cpu: CpuUse,
    catch_ups: f64,
    resyncs: f64,
    setup_seconds: f64,
}

fn main() {
    serve_if_asked();
    let sizes: Vec<usize> = env_list("BENCH_SUBSCRIBERS", "1000 10000");
    let seconds: f64 = env_or("BENCH_SECONDS", 5.0);
    let window: u64 = env_or("BENCH_WINDOW", 200_000);
    let writers: usize = env_or("BENCH_WRITERS", 2);
    let rounds: usize = env_or("BENCH_ROUNDS", 1);

    let db = BridgeDb::create(
        "livesync_bench_bridge_fanout",
        &format!(
            "CREATE TABLE items (id int PRIMARY KEY, match_id int, title text, score int);
             SELECT livesync.track('items');
             INSERT INTO items SELECT g, g % 100, 'item ' || g, 0 FROM generate_series(0, {}) g;",
            ROWS - 1
        ),
        false,
    );
    let runtime = tokio::runtime::Runtime::new().unwrap();
    // The floor's frame: the bridge's message to one subscriber for one UPDATE.
    let frame = probe_frame(&db, &runtime);
    println!(
        "fan-out ceiling: `changes` messages (one change each, {} bytes) delivered per second, counted at the clients; senders kept {} deliveries ahead; {seconds} s measured per run after 1 s of warm-up; {writers} writers with synchronous_commit = off feed the bridge",
        frame.len(),
        thousands(window)
    );
    println!("| subscribers | server | deliveries/s | ratio to floor | server CPU (cores) | server CPU µs / delivery | clients CPU | postgres CPU | machine busy (of 2 cores) |");
    println!("|---|---|---|---|---|---|---|---|---|");
    let mut verdicts = Vec::new();
    let mut notes = Vec::new();
    for &wanted in &sizes {
        let n = connections_that_fit(wanted);
        let mut results: Vec<(Variant, Outcome)> = Vec::new();
        for round in 0..rounds {
            let mut order = vec![Variant::Bridge, Variant::Floor];
            order.rotate_left(round % 2);
            for variant in order {
                let outcome = run(&db, &runtime, variant, n, seconds, window, writers, &frame);
                results.push((variant, outcome));
            }
        }
        let median = |v: Variant| {
            let mut rates: Vec<f64> = results
                .iter()
                .filter(|(w, _)| *w == v)
                .map(|(_, o)| o.per_second)
                .collect();
            rates.sort_by(|a, b| a.partial_cmp(b).unwrap());
            rates[rates.len() / 2]
        };
        let floor = median(Variant::Floor);
        for variant in [Variant::Bridge, Variant::Floor] {
            let runs: Vec<&Outcome> = results
                .iter()
                .filter(|(w, _)| *w == variant)
                .map(|(_, o)| o)
                .collect();
            let rate = median(variant);
            let cpu = |f: fn(&CpuUse) -> f64| {
                runs.iter().map(|o| f(&o.cpu)).sum::<f64>() / runs.len() as f64
            };
            println!(
                "| {n} | {} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} |",
                variant.name(),
                thousands(rate as u64),
                rate / floor,
                cpu(|c| c.server),
                cpu(|c| c.server) * 1e6 / rate,
                cpu(|c| c.clients),
                cpu(|c| c.postgres),
                cpu(|c| c.machine),
            );
        }
        let bridge = median(Variant::Bridge);
        let catch_ups: f64 = results.iter().map(|(_, o)| o.catch_ups).sum();
        let resyncs: f64 = results.iter().map(|(_, o)| o.resyncs).sum();
        let setup: Vec<String> = results
            .iter()
            .filter(|(v, _)| *v == Variant::Bridge)
            .map(|(_, o)| format!("{:.1}", o.setup_seconds))
            .collect();
        notes.push(format!(
            "{n} subscribers: bridge subscriptions moved to catch-up {catch_ups}, resyncs {resyncs}; connecting and subscribing took {} s",
            setup.join(" / ")
        ));
        verdicts.push(format!(
            "{n} subscribers: bridge {} deliveries/s = {:.1} % of the floor ({}): {}",
            thousands(bridge as u64),
            bridge / floor * 100.0,
            thousands(floor as u64),
            if bridge >= 0.5 * floor && bridge >= 600_000.0 {
                "met"
            } else {
                "NOT met"
            }
        ));
    }
    for note in notes {
        println!("{note}");
    }
    println!("target (issue 12): >= 50 % of the floor and >= 600,000 deliveries/s:");
    for v in verdicts {
        println!("- {v}");
    }
}

/// The bridge's message for one UPDATE, as one subscriber receives it.
fn probe_frame(db: &BridgeDb, runtime: &tokio::runtime::Runtime) -> String {
    let mut bridge = ServerProcess::bridge(&BridgeSettings {
        database_url: db.bridge_url(),
        window_changes: 100_000,
        queue_capacity: None,
    });
    let mut clients = runtime.block_on(open_clients(
        bridge.addr,
        1,
        1,
        Some(Arc::new(|_| Subscription::table("items"))),
    ));
    db.connect()
        .batch_execute("UPDATE items SET score = score + 1 WHERE id = 1")
        .unwrap();
    let frame = runtime.block_on(async {
        loop {
            let text = tokio::time::timeout(
                Duration::from_secs(30),
                livesync_bench::bridge::next_text(&mut clients[0]),
            )
            .await
            .expect("the probe's change arrives")
            .expect("open");
            if is_changes(&text) {
                return text.to_string();
            }
        }
    });
    let _ = bridge.ask("STATS");
    frame
}

#[allow(clippy::too_many_arguments)]
fn run(
    db: &BridgeDb,
    runtime: &tokio::runtime::Runtime,
    variant: Variant,
    n: usize,
    seconds: f64,
    window: u64,
    writers: usize,
    frame: &str,
) -> Outcome {
    let mut server = match variant {
        Variant::Bridge => ServerProcess::bridge(&BridgeSettings {
            database_url: db.bridge_url(),
            window_changes: 100_000,
            queue_capacity: None,
        }),
        Variant::Floor => ServerProcess::floor(&FloorSettings::new(frame.into())),
    };
    let subscription: Option<Arc<dyn Fn(usize) -> Subscription + Send + Sync>> = match variant {
        Variant::Bridge => Some(Arc::new(|_| Subscription::table("items"))),
        _ => None,
    };
    let started = Instant::now();
    let clients = runtime.block_on(open_clients(server.addr, n, 128, subscription));
    let setup_seconds = started.elapsed().as_secs_f64();
    let delivered = Arc::new(ShardedCounter::new());
    let readers: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(i, ws)| runtime.spawn(count(ws, i, delivered.clone())))
        .collect();

    // Keep the sender at most `window` deliveries ahead of the clients.
    let per_round = (window / n as u64).max(1);
    let stop = Arc::new(AtomicBool::new(false));
    let mut feeders = Vec::new();
    match variant {
        Variant::Bridge => {
            let issued = Arc::new(AtomicU64::new(0));
            for w in 0..writers {
                let conninfo = db.conninfo();
                let (stop, issued, delivered) = (stop.clone(), issued.clone(), delivered.clone());
                feeders.push(std::thread::spawn(move || {
                    let mut client = postgres::Client::connect(&conninfo, postgres::NoTls).unwrap();
                    client
                        .batch_execute("SET synchronous_commit = off")
                        .unwrap();
                    let update = client
                        .prepare("UPDATE items SET score = score + 1 WHERE id = $1")
                        .unwrap();
                    // Each writer its own rows: no lock waits between writers.
                    let mine: Vec<i32> = (0..ROWS).filter(|r| *r as usize % writers == w).collect();
                    let mut k = 0;
                    while !stop.load(Ordering::Relaxed) {
                        let now = issued.load(Ordering::Relaxed);
                        if now >= delivered.total() / n as u64 + per_round {
                            std::thread::sleep(Duration::from_micros(100));
                            continue;
                        }
                        if issued
                            .compare_exchange(now, now + 1, Ordering::Relaxed, Ordering::Relaxed)
                            .is_err()
                        {
                            continue;
                        }
                        client.execute(&update, &[&mine[k % mine.len()]]).unwrap();
                        k += 1;
                    }
                }));
            }
        }
        Variant::Floor => {
            let mut stdin = server.take_stdin();
            let (stop, delivered) = (stop.clone(), delivered.clone());
            feeders.push(std::thread::spawn(move || {
                let mut last = 0;
                while !stop.load(Ordering::Relaxed) {
                    let target = delivered.total() / n as u64 + per_round;
                    if target > last {
                        writeln!(stdin, "T {target}").unwrap();
                        stdin.flush().unwrap();
                        last = target;
                    }
                    std::thread::sleep(Duration::from_micros(200));
                }
                // Closing stdin ends the floor server.
                drop(stdin);
            }));
        }
    }
    std::thread::sleep(Duration::from_secs(1));
    let before = delivered.total();
    let cpu = CpuMeter::start(server.pid);
    let measured = Instant::now();
    std::thread::sleep(Duration::from_secs_f64(seconds));
    let after = delivered.total();
    let elapsed = measured.elapsed().as_secs_f64();
    let cpu = cpu.stop();
    stop.store(true, Ordering::Relaxed);
    for f in feeders {
        f.join().unwrap();
    }
    let (catch_ups, resyncs) = if variant == Variant::Bridge {
        let stats = server.ask("STATS");
        (
            stats["catch_ups"].as_f64().unwrap_or(0.0),
            stats["resyncs"].as_f64().unwrap_or(0.0),
        )
    } else {
        (0.0, 0.0)
    };
    // The server's exit closes every connection; the readers end.
    drop(server);
    runtime.block_on(async {
        for r in readers {
            let _ = tokio::time::timeout(Duration::from_secs(10), r).await;
        }
    });
    Outcome {
        per_second: (after - before) as f64 / elapsed,
        cpu,
        catch_ups,
        resyncs,
        setup_seconds,
    }
}

/// Counts `changes` frames until the connection ends.
async fn count(mut ws: Ws, shard: usize, delivered: Arc<ShardedCounter>) {
    while let Some(Ok(message)) = ws.next().await {
        if let Message::Text(text) = message {
            if is_changes(&text) {
                delivered.add(shard, 1);
            }
        }
    }
}
