//! Bridge catch-up: a client that was away while 100,000 changes were committed
//! subscribes again with `since`; the figure is the time from sending `subscribe` to
//! having received every one of them (the subscription is then live). Twice: from a
//! bridge whose window of recent changes holds them all (`window_changes` 200,000:
//! served from memory), and from one whose window is 1,000 changes (they come from
//! the database, `livesync.change_runs`, 10,000 changes a page). Baselines in the
//! same run: a client reading the same changes straight from PostgreSQL with
//! `livesync.changes_since` in pages of 10,000, and the bridge's own query
//! (`change_runs`, same pages) read by a plain client, which is the database's
//! share of the second case (its rate is the server-side read rate).
//!
//! The changes: 1,000 transactions of 100-row INSERTs into `items` (one table), with
//! both bridges running, so both have read them live (each message of the catch-up
//! is one transaction: 100 changes). Rounds interleave the four variants.
//!
//! Environment: `BENCH_PG`, `BENCH_CHANGES` (100000), `BENCH_TXN_ROWS` (100),
//! `BENCH_ROUNDS` (3).

use std::time::{Duration, Instant};

use futures_util::SinkExt;
use livesync_bench::bridge::{
    change_count, connect, env_or, hello, is_changes, message_position, next_text, serve_if_asked,
    thousands, BridgeDb, BridgeSettings, ServerProcess,
};
use postgres::SimpleQueryMessage;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

#[derive(Clone, Copy, PartialEq)]
enum Variant {
    Window,
    Database,
    ChangesSince,
    ChangeRuns,
}

impl Variant {
    fn name(self) -> &'static str {
        match self {
            Variant::Window => "bridge, from its window (window_changes 200,000)",
            Variant::Database => "bridge, from the database (window_changes 1,000)",
            Variant::ChangesSince => {
                "baseline: changes_since pages of 10,000, read by a plain client"
            }
            Variant::ChangeRuns => {
                "baseline: change_runs pages of 10,000 (the bridge's query), read by a plain client"
            }
        }
    }
}

/// The bridge's read (pg/reader.rs `PAGE_SQL`), as text.
const RUNS_SQL: &str = "SELECT first_position, tx_first_position, tx_last_position, relation, \
    schema_name, table_name, op, entries, actor, tx, to_json(committed_at)::text, \
    (extract(epoch FROM committed_at) * 1000000)::int8, client_id, mutation_id \
    FROM livesync.change_runs";

fn main() {
    serve_if_asked();
    let changes: usize = env_or("BENCH_CHANGES", 100_000);
    let txn_rows: usize = env_or("BENCH_TXN_ROWS", 100);
    let rounds: usize = env_or("BENCH_ROUNDS", 3);
    let db = BridgeDb::create(
        "livesync_bench_bridge_catchup",
        "CREATE TABLE items (id int PRIMARY KEY, match_id int, title text, score int);
         SELECT livesync.track('items');",
        false,
    );
    let mut big = ServerProcess::bridge(&BridgeSettings {
        database_url: db.bridge_url(),
        window_changes: (2 * changes).max(200_000),
        queue_capacity: None,
    });
    let mut small = ServerProcess::bridge(&BridgeSettings {
        database_url: db.bridge_url(),
        window_changes: 1_000,
        queue_capacity: None,
    });

    // While the client is away: the changes, committed as fast as they go.
    let since = db.current_position();
    let mut writer = db.connect();
    writer
        .batch_execute("SET synchronous_commit = off")
        .unwrap();
    let wrote = Instant::now();
    for t in 0..changes.div_ceil(txn_rows) {
        let first = t * txn_rows;
        let last = (first + txn_rows).min(changes) - 1;
        writer
            .batch_execute(&format!(
                "INSERT INTO items SELECT g, g % 100, 'item number ' || g, 0 FROM generate_series({first}, {last}) g"
            ))
            .unwrap();
    }
    let wrote = wrote.elapsed().as_secs_f64();
    // Sequenced, and read by both bridges.
    let deadline = Instant::now() + Duration::from_secs(60);
    let head = loop {
        let now = db.current_position();
        if now >= since + changes as i64 {
            break now;
        }
        assert!(Instant::now() < deadline, "the changes were not sequenced");
        std::thread::sleep(Duration::from_millis(20));
    };
    for bridge in [&mut big, &mut small] {
        while bridge.ask("STATS")["head"].as_i64().unwrap_or(0) < head {
            assert!(
                Instant::now() < deadline,
                "a bridge did not read the changes"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let big_stats = big.ask("STATS");
    let small_stats = small.ask("STATS");
    assert!(
        big_stats["window_start"].as_i64().unwrap() <= since,
        "the big window holds every change: {big_stats}"
    );
    assert!(
        small_stats["window_start"].as_i64().unwrap() > since,
        "the small window does not: {small_stats}"
    );

    let runtime = tokio::runtime::Runtime::new().unwrap();
    let variants = [
        Variant::Window,
        Variant::Database,
        Variant::ChangesSince,
        Variant::ChangeRuns,
    ];
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); variants.len()];
    for round in 0..rounds {
        let mut order = variants.to_vec();
        order.rotate_left(round % variants.len());
        for variant in order {
            let (seconds, got) = match variant {
                Variant::Window => resume(&runtime, &big, since, head),
                Variant::Database => resume(&runtime, &small, since, head),
                Variant::ChangesSince => read_direct(&db, since, head, false),
                Variant::ChangeRuns => read_direct(&db, since, head, true),
            };
            assert_eq!(got, changes, "{}: every change, once", variant.name());
            times[variants.iter().position(|v| *v == variant).unwrap()].push(seconds);
        }
    }
    let catch_up_reads = small.ask("STATS")["catch_up_reads"].clone();

    println!(
        "catch-up: a client resuming {} changes behind ({} transactions of {txn_rows} rows, committed in {wrote:.1} s), time from subscribe to having every change; {rounds} rounds",
        thousands(changes as u64),
        changes.div_ceil(txn_rows),
    );
    println!(
        "| variant | median s | min s | max s | changes/s (median) | ratio to changes_since |"
    );
    println!("|---|---|---|---|---|---|");
    let median = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[v.len() / 2]
    };
    let baseline = median(&times[2]);
    for (i, variant) in variants.iter().enumerate() {
        let t = &times[i];
        let m = median(t);
        println!(
            "| {} | {:.3} | {:.3} | {:.3} | {} | {:.2} |",
            variant.name(),
            m,
            t.iter().cloned().fold(f64::INFINITY, f64::min),
            t.iter().cloned().fold(0.0, f64::max),
            thousands((changes as f64 / m) as u64),
            m / baseline,
        );
    }
    println!(
        "the small-window bridge made {catch_up_reads} catch-up reads from the database in all"
    );
    let worst = times[0]
        .iter()
        .chain(&times[1])
        .cloned()
        .fold(0.0, f64::max);
    println!(
        "target (issue 12): live within 1 s, from the window and from the database: {} (slowest run {worst:.3} s)",
        if worst <= 1.0 { "met" } else { "NOT met" }
    );
}

/// Subscribes with `since` to a bridge and reads until the message at `head`;
/// returns (seconds from subscribe, changes received).
fn resume(
    runtime: &tokio::runtime::Runtime,
    bridge: &ServerProcess,
    since: i64,
    head: i64,
) -> (f64, usize) {
    runtime.block_on(async {
        let mut ws = connect(bridge.addr).await;
        hello(&mut ws, "catch-up").await;
        let started = Instant::now();
        ws.send(Message::Text(
            json!({"type": "subscribe", "id": 1, "channel": "table:public.items", "since": since})
                .to_string()
                .into(),
        ))
        .await
        .unwrap();
        let mut got = 0;
        loop {
            let text = tokio::time::timeout(Duration::from_secs(60), next_text(&mut ws))
                .await
                .expect("catch-up within 60 s")
                .expect("the connection stays open");
            if text.starts_with("{\"type\":\"error\"") {
                panic!("catch-up failed: {text}");
            }
            if !is_changes(&text) {
                continue;
            }
            got += change_count(&text);
            if message_position(&text).unwrap_or(0) >= head {
                return (started.elapsed().as_secs_f64(), got);
            }
        }
    })
}

/// Reads every change after `since` straight from PostgreSQL (text rows, pages of
/// 10,000 changes); returns (seconds, changes).
fn read_direct(db: &BridgeDb, since: i64, head: i64, runs: bool) -> (f64, usize) {
    let mut client = db.connect();
    let started = Instant::now();
    let mut after = since;
    let mut got = 0usize;
    while after < head {
        let sql = if runs {
            format!("{RUNS_SQL}({after}, 10000)")
        } else {
            format!("SELECT position, op, key, delta, version, actor, committed_at, tx FROM livesync.changes_since({after}, 10000)")
        };
        let mut next = after;
        for message in client.simple_query(&sql).unwrap() {
            if let SimpleQueryMessage::Row(row) = message {
                if runs {
                    // A run: a JSON array of its changes (split, as the bridge does).
                    let entries: Vec<&serde_json::value::RawValue> =
                        serde_json::from_str(row.get(7).unwrap()).unwrap();
                    got += entries.len();
                    let tx_last: i64 = row.get(2).unwrap().parse().unwrap();
                    next = next.max(tx_last);
                } else {
                    got += 1;
                    next = next.max(row.get(0).unwrap().parse().unwrap());
                }
            }
        }
        assert!(next > after, "no progress after {after}");
        after = next;
    }
    (started.elapsed().as_secs_f64(), got)
}
