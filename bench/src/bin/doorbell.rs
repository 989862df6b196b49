//! Ring latency: how long after `COMMIT` returns the `livesync` doorbell reaches a
//! listening connection, beside a raw `NOTIFY` sent by the same kind of transaction
//! in the same run (the floor Postgres itself gives).
//!
//! One writer commits single-row inserts at a fixed rate (100 and 1,000 commits/s by
//! default); a listener on its own connection timestamps every notification. A
//! livesync commit's latency is the time from its COMMIT returning to the first ring
//! carrying a position at or past its own (positions are read back from the log
//! afterwards by transaction id); a raw commit's is the time to its own
//! notification. The two variants alternate in slices so drift falls on both.
//!
//! Environment: `BENCH_PG` (libpq key=value, default `host=127.0.0.1 port=5432
//! user=postgres`), `BENCH_RATES` ("100 1000"), `BENCH_SECONDS` (per variant and
//! rate, default 10), `BENCH_SLICES` (5).

use livesync_bench::BenchDb;
use postgres::fallible_iterator::FallibleIterator;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

#[derive(Clone, Copy, PartialEq)]
enum Variant {
    Livesync,
    RawNotify,
}

/// A notification as the listener saw it.
struct Heard {
    at: Instant,
    channel: String,
    payload: i64,
}

fn main() {
    let rates: Vec<u32> = env_or("BENCH_RATES", "100 1000")
        .split_whitespace()
        .map(|r| r.parse().expect("BENCH_RATES: numbers"))
        .collect();
    let seconds: f64 = env_or("BENCH_SECONDS", "10")
        .parse()
        .expect("BENCH_SECONDS");
    let slices: u32 = env_or("BENCH_SLICES", "5").parse().expect("BENCH_SLICES");

    let db = BenchDb::create("livesync_bench_doorbell");
    let mut setup = db.connect();
    setup
        .batch_execute(
            "CREATE TABLE tracked (id bigserial PRIMARY KEY, v int);
             SELECT livesync.track('tracked');
             CREATE TABLE plain (id bigserial PRIMARY KEY, v int);
             SELECT livesync._ensure_sequencer();",
        )
        .unwrap();
    // The worker registers itself shortly after it is asked for.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !setup
        .query_one("SELECT livesync._ensure_sequencer()", &[])
        .unwrap()
        .get::<_, bool>(0)
    {
        assert!(
            Instant::now() < deadline,
            "no sequencer worker started (is livesync preloaded?)"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    println!("ring latency: commit returned -> notification received (ms), one writer, synchronous_commit on");
    println!("| commits/s | variant | achieved/s | p50 | p90 | p99 | max |");
    println!("|---|---|---|---|---|---|---|");
    for &rate in &rates {
        let mut latencies: HashMap<&str, Vec<f64>> = HashMap::new();
        let mut achieved: HashMap<&str, (usize, f64)> = HashMap::new();
        let slice = seconds / slices as f64;
        for s in 0..slices {
            let order = if s % 2 == 0 {
                [Variant::Livesync, Variant::RawNotify]
            } else {
                [Variant::RawNotify, Variant::Livesync]
            };
            for variant in order {
                let (name, mut measured, commits) = run_slice(&db, variant, rate, slice);
                latencies.entry(name).or_default().append(&mut measured);
                let entry = achieved.entry(name).or_default();
                entry.0 += commits;
                entry.1 += slice;
            }
        }
        for name in ["livesync ring", "raw NOTIFY"] {
            let values = latencies.get_mut(name).unwrap();
            values.sort_by(|a, b| a.partial_cmp(b).unwrap());
            let (commits, secs) = achieved[name];
            println!(
                "| {rate} | {name} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} |",
                commits as f64 / secs,
                percentile(values, 0.50),
                percentile(values, 0.90),
                percentile(values, 0.99),
                values.last().copied().unwrap_or(f64::NAN),
            );
        }
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Runs one variant at `rate` commits/s for `seconds`; returns its name, the
/// latency of every commit in ms, and how many commits it made.
fn run_slice(
    db: &BenchDb,
    variant: Variant,
    rate: u32,
    seconds: f64,
) -> (&'static str, Vec<f64>, usize) {
    let heard: Arc<Mutex<Vec<Heard>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let mut listener = db.connect();
    listener
        .batch_execute("LISTEN livesync; LISTEN raw")
        .unwrap();
    let listening = {
        let heard = Arc::clone(&heard);
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let mut notifications = listener.notifications();
            let mut iter = notifications.timeout_iter(Duration::from_millis(100));
            while !stop.load(Ordering::SeqCst) {
                if let Some(n) = iter.next().expect("listen connection") {
                    heard.lock().unwrap().push(Heard {
                        at: Instant::now(),
                        channel: n.channel().to_string(),
                        payload: n.payload().parse().unwrap_or(-1),
                    });
                }
            }
        })
    };

    let mut writer = db.connect();
    let insert = writer
        .prepare("INSERT INTO tracked (v) VALUES (1) RETURNING pg_current_xact_id()::text")
        .unwrap();
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let total = (rate as f64 * seconds).round() as usize;
    // (commit returned, xid) for livesync; (commit returned, sequence) for raw.
    let mut commits: Vec<(Instant, String)> = Vec::with_capacity(total);
    let begin = Instant::now();
    for i in 0..total {
        let due = begin + interval * i as u32;
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        match variant {
            Variant::Livesync => {
                let xid: String = writer.query_one(&insert, &[]).unwrap().get(0);
                commits.push((Instant::now(), xid));
            }
            Variant::RawNotify => {
                writer
                    .batch_execute(&format!(
                        "BEGIN; INSERT INTO plain (v) VALUES (1); NOTIFY raw, '{i}'; COMMIT"
                    ))
                    .unwrap();
                commits.push((Instant::now(), i.to_string()));
            }
        }
    }
    // Listen until the last commit's notification has arrived (a checkpoint's
    // fsyncs can hold a tick's commit back for a while), at most 30 s.
    let deadline = Instant::now() + Duration::from_secs(30);
    let last = match variant {
        // The last commit is the newest transaction: once sequenced, its last
        // change is the newest position.
        Variant::Livesync => loop {
            let newest = writer
                .query_one(
                    "SELECT livesync.current_position(),
                            (SELECT tx::text FROM livesync.changes_since(livesync.current_position() - 1) LIMIT 1)",
                    &[],
                )
                .unwrap();
            let last_xid = commits.last().map(|(_, xid)| xid.clone());
            if newest.get::<_, Option<String>>(1) == last_xid {
                break newest.get::<_, i64>(0);
            }
            assert!(
                Instant::now() < deadline,
                "the last commit was not sequenced within 30 s"
            );
            std::thread::sleep(Duration::from_millis(5));
        },
        Variant::RawNotify => total as i64 - 1,
    };
    let channel = match variant {
        Variant::Livesync => "livesync",
        Variant::RawNotify => "raw",
    };
    while !heard
        .lock()
        .unwrap()
        .iter()
        .any(|h| h.channel == channel && h.payload >= last)
    {
        assert!(
            Instant::now() < deadline,
            "no {channel} notification for the last commit within 30 s"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    stop.store(true, Ordering::SeqCst);
    listening.join().unwrap();
    let heard = std::mem::take(&mut *heard.lock().unwrap());

    let latencies: Vec<f64> = match variant {
        Variant::Livesync => {
            // Each transaction's last position, from the log.
            let xids: Vec<&str> = commits.iter().map(|(_, xid)| xid.as_str()).collect();
            let ends: HashMap<String, i64> = writer
                .query(
                    "SELECT tx::text, max(position) FROM livesync.changes_since(
                         (SELECT min(first_position) - 1 FROM livesync.batches
                          WHERE txs && $1::text[]::xid8[]), 1000000)
                     WHERE tx::text = ANY($1) GROUP BY tx",
                    &[&xids],
                )
                .unwrap()
                .iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect();
            let rings: Vec<&Heard> = heard.iter().filter(|h| h.channel == "livesync").collect();
            commits
                .iter()
                .map(|(at, xid)| {
                    let end = ends[xid];
                    let ring = rings
                        .iter()
                        .find(|h| h.payload >= end)
                        .expect("every commit is rung");
                    ms_between(*at, ring.at)
                })
                .collect()
        }
        Variant::RawNotify => {
            let by_payload: HashMap<i64, Instant> = heard
                .iter()
                .filter(|h| h.channel == "raw")
                .map(|h| (h.payload, h.at))
                .collect();
            commits
                .iter()
                .map(|(at, i)| ms_between(*at, by_payload[&i.parse::<i64>().unwrap()]))
                .collect()
        }
    };
    let name = match variant {
        Variant::Livesync => "livesync ring",
        Variant::RawNotify => "raw NOTIFY",
    };
    (name, latencies, total)
}

/// Milliseconds from `from` to `to`; a notification that beat the client's own
/// timestamp of the commit (both are taken after the fact) counts as 0.
fn ms_between(from: Instant, to: Instant) -> f64 {
    to.saturating_duration_since(from).as_secs_f64() * 1000.0
}
