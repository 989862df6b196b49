//! Bridge latency: commit → subscriber, at a steady rate of one-row commits to 1,000
//! WebSocket subscribers of one table, beside two floors measured in the same run:
//! - PostgreSQL's own: a plain tokio-postgres connection LISTENing on a channel that
//!   the writing transaction NOTIFYs (one listener);
//! - the stack's own: a bare tokio-tungstenite server (child process, as the bridge)
//!   that LISTENs likewise and broadcasts one pre-serialised frame of the bridge's
//!   size per NOTIFY to the same number of connections, with nothing else to do.
//!
//! One writer commits `BEGIN; INSERT INTO items …; COMMIT` at a fixed rate and
//! timestamps the moment it sends COMMIT and the moment COMMIT returns; every
//! subscriber (and the LISTEN client) timestamps every receipt. A delivery's latency
//! is its receipt minus either. The bridge runs in a child process with its defaults
//! (window 100,000 changes, queue 1,024), connected as a role with only
//! `livesync_reader` and `livesync_maintainer`; livesync sequences commits with its
//! background worker (`livesync.sequencer = auto`). The bridge and the floors
//! alternate in slices (fresh server and connections each), so drift falls on both.
//! The floors' slices add `SELECT pg_notify('bench', id)` to the transaction; the
//! bridge's do not (`BENCH_NOTIFY_ALWAYS=1`: they do too): a notifying transaction
//! holds PostgreSQL's notify lock from before its commit record until after its
//! flush, and livesync's doorbell (the worker's NOTIFY) queues behind it.
//!
//! Environment: `BENCH_PG` (libpq key=value, default `host=127.0.0.1 port=5432
//! user=postgres`), `BENCH_SUBSCRIBERS` (1000), `BENCH_RATE` (commits/s, 100),
//! `BENCH_SECONDS` (per variant, 10), `BENCH_SLICES` (2), `BENCH_WARMUP` (commits
//! left out at the start of each slice, 50), `BENCH_NOTIFY_ALWAYS` (unset).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use livesync_bench::bridge::{
    bucket_quantile_ms, committed_at_micros, connections_that_fit, env_or, int_after, is_changes,
    ms, next_text, open_clients, serve_if_asked, wall_micros, BridgeDb, BridgeSettings, CpuMeter,
    CpuUse, Distribution, FloorSettings, NotifyListener, ServerProcess, Subscription,
};

/// The stack floor's frame: the shape and size of the bridge's message for one
/// inserted `items` row (`{ID}` is the row's id).
const FLOOR_FRAME: &str = r#"{"type":"changes","sub":0,"position":{ID},"changes":[{"position":{ID},"op":"insert","key":{"id": {ID}},"delta":{"id":{"new":{ID}},"match_id":{"new":0},"title":{"new":"bench"},"score":{"new":0}},"version":{ID},"actor":"postgres","committed_at":"2026-12-04T17:25:49.095966+00:00","tx":1234567}]}"#;

#[derive(Clone, Copy, PartialEq)]
enum Variant {
    Bridge,
    StackFloor,
}

/// What one variant measured, over its slices.
#[derive(Default)]
struct Measured {
    from_sent: Vec<f64>,
    from_returned: Vec<f64>,
    first: Vec<f64>,
    last: Vec<f64>,
    to_sequenced: Vec<f64>,
    from_sequenced: Vec<f64>,
    listen_sent: Vec<f64>,
    listen_returned: Vec<f64>,
    delivered: usize,
    expected: usize,
    commits: usize,
    written: usize,
    writing_seconds: f64,
    cpu: Vec<CpuUse>,
    catch_ups: f64,
    frame_bytes: usize,
    /// The bridge's livesync_commit_to_publish_seconds buckets (last slice).
    publish_lag: serde_json::Value,
}

fn main() {
    serve_if_asked();
    let subscribers = connections_that_fit(env_or("BENCH_SUBSCRIBERS", 1000));
    let rate: f64 = env_or("BENCH_RATE", 100.0);
    let seconds: f64 = env_or("BENCH_SECONDS", 10.0);
    let slices: usize = env_or("BENCH_SLICES", 2);
    let warmup: usize = env_or("BENCH_WARMUP", 50);
    let notify_always = std::env::var("BENCH_NOTIFY_ALWAYS").is_ok_and(|v| v == "1");
    let per_slice = (rate * seconds / slices as f64).round() as usize;

    let db = BridgeDb::create(
        "livesync_bench_bridge_latency",
        "CREATE TABLE items (id int PRIMARY KEY, match_id int, title text, score int);
         SELECT livesync.track('items');",
        true,
    );
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let mut bridge = Measured::default();
    let mut floor = Measured::default();
    let mut next_id = 0;
    for slice in 0..slices {
        let order = if slice % 2 == 0 {
            [Variant::Bridge, Variant::StackFloor]
        } else {
            [Variant::StackFloor, Variant::Bridge]
        };
        for variant in order {
            let into = match variant {
                Variant::Bridge => &mut bridge,
                Variant::StackFloor => &mut floor,
            };
            run_slice(
                &db,
                &runtime,
                variant,
                subscribers,
                rate,
                next_id,
                warmup + per_slice,
                warmup,
                variant == Variant::StackFloor || notify_always,
                into,
            );
            next_id += warmup + per_slice;
        }
    }

    let d = Distribution::new;
    let (b_sent, b_ret) = (d(bridge.from_sent.clone()), d(bridge.from_returned.clone()));
    let (f_sent, f_ret) = (d(floor.from_sent.clone()), d(floor.from_returned.clone()));
    let (l_sent, l_ret) = (
        d(floor.listen_sent.clone()),
        d(floor.listen_returned.clone()),
    );

    println!(
        "bridge latency: commit -> subscriber (ms); one writer at {rate} commits/s ({:.0} achieved), each commit one INSERT (+ pg_notify in the same transaction in the floors' slices{}); {subscribers} WebSocket subscribers of table:public.items; {} commits measured per variant in {slices} slices (after {warmup} warm-up commits each); messages of {} bytes",
        (bridge.written + floor.written) as f64 / (bridge.writing_seconds + floor.writing_seconds),
        if notify_always { " and in the bridge's" } else { "" },
        bridge.commits,
        bridge.frame_bytes,
    );
    println!("| receiver | from | deliveries | p50 | p90 | p99 | max |");
    println!("|---|---|---|---|---|---|---|");
    let row = |who: &str, from: &str, d: &Distribution| {
        println!("| {who} | {from} | {} | {} |", d.len(), d.cells());
    };
    row("bridge, every subscriber", "COMMIT sent", &b_sent);
    row("bridge, every subscriber", "COMMIT returned", &b_ret);
    row(
        "bridge, first subscriber of a commit",
        "COMMIT returned",
        &d(bridge.first.clone()),
    );
    row(
        "bridge: of which COMMIT returned -> sequenced (committed_at)",
        "COMMIT returned",
        &d(bridge.to_sequenced.clone()),
    );
    row(
        "bridge: of which sequenced -> received",
        "committed_at",
        &d(bridge.from_sequenced.clone()),
    );
    row(
        "bridge, last subscriber of a commit",
        "COMMIT returned",
        &d(bridge.last.clone()),
    );
    row(
        "stack floor (bare tokio-tungstenite broadcasting each NOTIFY), every subscriber",
        "COMMIT sent",
        &f_sent,
    );
    row("stack floor, every subscriber", "COMMIT returned", &f_ret);
    row(
        "stack floor, first subscriber of a commit",
        "COMMIT returned",
        &d(floor.first.clone()),
    );
    row(
        "stack floor, last subscriber of a commit",
        "COMMIT returned",
        &d(floor.last.clone()),
    );
    row(
        "postgres floor: one LISTEN client (NOTIFY)",
        "COMMIT sent",
        &l_sent,
    );
    row(
        "postgres floor: one LISTEN client (NOTIFY)",
        "COMMIT returned",
        &l_ret,
    );
    println!(
        "the bridge's own metric, sequenced -> handed to the subscribers' queues (livesync_commit_to_publish_seconds, its last slice, bucket bounds): p50 <= {} ms, p99 <= {} ms",
        bucket_quantile_ms(&bridge.publish_lag, 0.5).map_or("?".into(), |v| format!("{v}")),
        bucket_quantile_ms(&bridge.publish_lag, 0.99).map_or("?".into(), |v| format!("{v}")),
    );
    println!(
        "bridge / stack floor, from COMMIT sent: p50 {:.2}x, p99 {:.2}x; bridge / LISTEN floor: p50 {:.1}x, p99 {:.1}x",
        b_sent.p50() / f_sent.p50(),
        b_sent.p99() / f_sent.p99(),
        b_sent.p50() / l_sent.p50(),
        b_sent.p99() / l_sent.p99(),
    );
    for (name, m) in [("bridge", &bridge), ("stack floor", &floor)] {
        let n = m.cpu.len() as f64;
        let avg = |f: fn(&CpuUse) -> f64| m.cpu.iter().map(f).sum::<f64>() / n;
        println!(
            "{name}: {} of {} deliveries; moved to catch-up {}; CPU while writing (cores): server {:.2}, clients {:.2}, postgres {:.2}, whole machine {:.2}",
            m.delivered,
            m.expected,
            m.catch_ups,
            avg(|c| c.server),
            avg(|c| c.clients),
            avg(|c| c.postgres),
            avg(|c| c.machine),
        );
    }
    let verdict = |d: &Distribution| {
        if d.p50() <= 2.0 && d.p99() <= 10.0 {
            "met"
        } else {
            "NOT met"
        }
    };
    println!(
        "target (issue 12): p50 <= 2 ms and p99 <= 10 ms: from COMMIT returned {} (bridge p50 {:.2}, p99 {:.2}; stack floor {:.2} / {:.2}); from COMMIT sent {} (bridge {:.2} / {:.2}; stack floor {:.2} / {:.2})",
        verdict(&b_ret),
        b_ret.p50(),
        b_ret.p99(),
        f_ret.p50(),
        f_ret.p99(),
        verdict(&b_sent),
        b_sent.p50(),
        b_sent.p99(),
        f_sent.p50(),
        f_sent.p99(),
    );
}

/// One slice: a fresh server and `subscribers` connections, `commits` commits with
/// ids from `first_id`; the first `warmup` are left out of the figures.
#[allow(clippy::too_many_arguments)]
fn run_slice(
    db: &BridgeDb,
    runtime: &tokio::runtime::Runtime,
    variant: Variant,
    subscribers: usize,
    rate: f64,
    first_id: usize,
    commits: usize,
    warmup: usize,
    notify: bool,
    into: &mut Measured,
) {
    let mut server = match variant {
        Variant::Bridge => ServerProcess::bridge(&BridgeSettings {
            database_url: db.bridge_url(),
            window_changes: 100_000,
            queue_capacity: None,
        }),
        Variant::StackFloor => ServerProcess::floor(&FloorSettings {
            notify: Some(db.conninfo()),
            ..FloorSettings::new(FLOOR_FRAME.to_string())
        }),
    };
    let subscription: Option<Arc<dyn Fn(usize) -> Subscription + Send + Sync>> = match variant {
        Variant::Bridge => Some(Arc::new(|_| Subscription::table("items"))),
        Variant::StackFloor => None,
    };
    let clients = runtime.block_on(open_clients(server.addr, subscribers, 64, subscription));

    // Every subscriber timestamps every `changes` message: (commit index, received at).
    let finished = Arc::new(AtomicUsize::new(0));
    let frame_bytes = Arc::new(AtomicUsize::new(0));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let last_id = (first_id + commits - 1) as i64;
    let receivers: Vec<_> = clients
        .into_iter()
        .map(|mut ws| {
            let finished = finished.clone();
            let frame_bytes = frame_bytes.clone();
            let mut stop = stop_rx.clone();
            runtime.spawn(async move {
                let mut seen: Vec<(u32, Instant, i64)> = Vec::with_capacity(commits);
                loop {
                    let text = tokio::select! {
                        text = next_text(&mut ws) => match text { Some(t) => t, None => break },
                        _ = stop.changed() => break,
                    };
                    let at = Instant::now();
                    if !is_changes(&text) {
                        continue;
                    }
                    // One INSERT per commit: the message's key is the row's id.
                    if let Some(id) = int_after(&text, "\"key\":{\"id\":") {
                        if id >= first_id as i64 && id <= last_id {
                            seen.push((
                                (id as usize - first_id) as u32,
                                at,
                                committed_at_micros(&text).unwrap_or(0),
                            ));
                        }
                        frame_bytes.store(text.len(), Ordering::Relaxed);
                        if id == last_id {
                            finished.fetch_add(1, Ordering::Relaxed);
                            break;
                        }
                    }
                }
                seen
            })
        })
        .collect();

    let listener = notify.then(|| NotifyListener::start(&db.conninfo(), "bench"));
    let cpu = CpuMeter::start(server.pid);
    let writer = {
        let conninfo = db.conninfo();
        std::thread::spawn(move || {
            let mut client = postgres::Client::connect(&conninfo, postgres::NoTls).unwrap();
            let interval = Duration::from_secs_f64(1.0 / rate);
            let mut times: Vec<(Instant, Instant, i64)> = Vec::with_capacity(commits);
            let begin = Instant::now();
            for i in 0..commits {
                let due = begin + interval.mul_f64(i as f64);
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
                let id = first_id + i;
                let notify = if notify {
                    format!("; SELECT pg_notify('bench', '{id}')")
                } else {
                    String::new()
                };
                client
                    .batch_execute(&format!(
                        "BEGIN; INSERT INTO items VALUES ({id}, 0, 'bench', 0){notify}"
                    ))
                    .unwrap();
                let sent = Instant::now();
                client.batch_execute("COMMIT").unwrap();
                times.push((sent, Instant::now(), wall_micros()));
            }
            (times, begin.elapsed().as_secs_f64())
        })
    };
    let (times, wrote_for) = writer.join().unwrap();
    // Until every subscriber has the last commit, at most 30 s.
    let deadline = Instant::now() + Duration::from_secs(30);
    while finished.load(Ordering::Relaxed) < subscribers && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    into.cpu.push(cpu.stop());
    let _ = stop_tx.send(true);
    let seen: Vec<Vec<(u32, Instant, i64)>> = runtime.block_on(async {
        let mut all = Vec::new();
        for r in receivers {
            all.push(r.await.unwrap());
        }
        all
    });
    let heard = listener.map(NotifyListener::finish).unwrap_or_default();
    if variant == Variant::Bridge {
        let stats = server.ask("STATS");
        into.catch_ups += stats["catch_ups"].as_f64().unwrap_or(0.0);
        into.publish_lag = stats["publish_lag_buckets"].clone();
    }
    drop(server);

    let mut first = vec![None::<Instant>; commits];
    let mut last = vec![None::<Instant>; commits];
    for client in &seen {
        for &(i, at, sequenced) in client {
            let i = i as usize;
            into.delivered += 1;
            if i >= warmup {
                into.from_sent.push(ms(times[i].0, at));
                into.from_returned.push(ms(times[i].1, at));
                if sequenced > 0 {
                    let received =
                        times[i].2 + at.saturating_duration_since(times[i].1).as_micros() as i64;
                    into.to_sequenced
                        .push((sequenced - times[i].2) as f64 / 1000.0);
                    into.from_sequenced
                        .push((received - sequenced) as f64 / 1000.0);
                }
            }
            first[i] = Some(first[i].map_or(at, |f| f.min(at)));
            last[i] = Some(last[i].map_or(at, |l| l.max(at)));
        }
    }
    for i in warmup..commits {
        if let Some(at) = first[i] {
            into.first.push(ms(times[i].1, at));
        }
        if let Some(at) = last[i] {
            into.last.push(ms(times[i].1, at));
        }
    }
    for &(id, at) in &heard {
        let Some(i) = (id as usize).checked_sub(first_id) else {
            continue;
        };
        if i >= warmup && i < commits {
            into.listen_sent.push(ms(times[i].0, at));
            into.listen_returned.push(ms(times[i].1, at));
        }
    }
    into.expected += commits * subscribers;
    into.commits += commits - warmup;
    into.written += commits;
    into.writing_seconds += wrote_for;
    into.frame_bytes = frame_bytes.load(Ordering::Relaxed);
}
