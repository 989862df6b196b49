//! Reading the log: changes per second a client gets out of a log of ~200,000
//! changes, read from position 0 until caught up, by
//! - the baseline: a raw unnest of the stored runs (`SELECT e FROM livesync.changes c,
//!   jsonb_array_elements(c.entries) e`, one query), the floor of any per-change read;
//! - `livesync.change_runs`, paged by 10,000 changes (the bridge's read);
//! - `livesync.changes_since`, paged by 1,000 and by 10,000 changes;
//! - 0.3.0's `changes_since` (SQL, a `_delta` call per change) on the same log, read
//!   before the database is updated to the current version.
//!
//! Each is measured twice: fetched by this client (every column of every row, in
//! binary, as the postgres crate asks for it), and counted in the server
//! (`count(*)` over the same pages: no output functions, no transfer). The log:
//! 10,000 rows inserted in one transaction, then 100-row UPDATEs and single-row
//! INSERTs, interleaved, each its own transaction, sequenced by the worker. Rounds
//! interleave the variants; the table gives medians and the median per-round ratio
//! to the baseline.
//!
//! Environment: `BENCH_PG` (libpq key=value, default `host=127.0.0.1 port=5432
//! user=postgres`), `BENCH_UPDATES` (100-row UPDATEs, default 1700), `BENCH_INSERTS`
//! (single-row INSERTs, default 20000), `BENCH_ROUNDS` (3), `BENCH_OLD` (1: also
//! measure 0.3.0; needs its released script installed, as `.ci/install-extension`
//! does).

use livesync_bench::BenchDb;
use postgres::types::{FromSql, Type};
use postgres::Client;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

/// A column value as it arrived, kept only as its length: the client receives every
/// byte and decodes nothing, so the figures are the server's and the wire's.
struct Raw(usize);

impl<'a> FromSql<'a> for Raw {
    fn from_sql(_: &Type, raw: &'a [u8]) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(Raw(raw.len()))
    }

    fn accepts(_: &Type) -> bool {
        true
    }
}

/// Bytes received for a row, all columns.
fn row_bytes(row: &postgres::Row) -> usize {
    (0..row.len())
        .map(|i| row.get::<_, Option<Raw>>(i).map_or(0, |raw| raw.0))
        .sum()
}

/// One way of reading the whole log.
#[derive(Clone, Copy)]
enum Read {
    Baseline,
    ChangeRuns(i32),
    ChangesSince(i32),
}

impl Read {
    fn label(self, old: bool) -> String {
        let version = if old { " (0.3.0)" } else { "" };
        match self {
            Read::Baseline => "raw unnest of the runs (baseline)".to_string(),
            Read::ChangeRuns(page) => format!("change_runs, pages of {page}{version}"),
            Read::ChangesSince(page) => format!("changes_since, pages of {page}{version}"),
        }
    }

    /// Reads everything from position 0; returns the changes read and the time taken.
    /// `in_server`: count the rows in the server instead of fetching them.
    fn run(self, client: &mut Client, log: &Log, in_server: bool) -> (i64, Duration) {
        let newest = log.newest;
        let started = Instant::now();
        let mut changes = 0i64;
        match self {
            Read::Baseline => {
                let sql = "SELECT e FROM livesync.changes c, jsonb_array_elements(c.entries) e";
                if in_server {
                    changes = client
                        .query_one(&format!("SELECT count(*) FROM ({sql}) s"), &[])
                        .unwrap()
                        .get(0);
                } else {
                    let rows = client.query(sql, &[]).unwrap();
                    let bytes: usize = rows.iter().map(row_bytes).sum();
                    assert!(bytes > 0);
                    changes = rows.len() as i64;
                }
            }
            Read::ChangeRuns(page) => {
                // A reader of runs moves on to its last transaction's last position.
                let sql = if in_server {
                    "SELECT count(*), sum(jsonb_array_length(entries))::int8, max(tx_last_position)
                     FROM livesync.change_runs($1, $2)"
                } else {
                    "SELECT * FROM livesync.change_runs($1, $2)"
                };
                let statement = client.prepare(sql).unwrap();
                let mut after = 0i64;
                let mut runs = 0i64;
                while after < newest {
                    if in_server {
                        let row = client.query_one(&statement, &[&after, &page]).unwrap();
                        runs += row.get::<_, i64>(0);
                        changes += row.get::<_, Option<i64>>(1).unwrap_or(0);
                        after = row.get::<_, Option<i64>>(2).expect("a page before the end");
                    } else {
                        let rows = client.query(&statement, &[&after, &page]).unwrap();
                        let bytes: usize = rows.iter().map(row_bytes).sum();
                        assert!(bytes > 0);
                        runs += rows.len() as i64;
                        after = rows
                            .iter()
                            .map(|row| row.get::<_, i64>("tx_last_position"))
                            .max()
                            .expect("a page before the end");
                    }
                }
                assert_eq!(runs, log.runs, "change_runs returned every run once");
                if !in_server {
                    // Counted by the runs, which the client does not decode.
                    changes = log.changes;
                }
            }
            Read::ChangesSince(page) => {
                let sql = if in_server {
                    "SELECT count(*), max(position) FROM livesync.changes_since($1, $2)"
                } else {
                    "SELECT * FROM livesync.changes_since($1, $2)"
                };
                let statement = client.prepare(sql).unwrap();
                let mut after = 0i64;
                while after < newest {
                    if in_server {
                        let row = client.query_one(&statement, &[&after, &page]).unwrap();
                        changes += row.get::<_, i64>(0);
                        after = row.get::<_, Option<i64>>(1).expect("a page before the end");
                    } else {
                        let rows = client.query(&statement, &[&after, &page]).unwrap();
                        let bytes: usize = rows.iter().map(row_bytes).sum();
                        assert!(bytes > 0);
                        changes += rows.len() as i64;
                        after = rows
                            .last()
                            .expect("a page before the end")
                            .get::<_, i64>("position");
                    }
                }
            }
        }
        let elapsed = started.elapsed();
        (changes, elapsed)
    }
}

/// What the log holds once filled.
struct Log {
    newest: i64,
    changes: i64,
    runs: i64,
    transactions: i64,
}

/// Fills the log: 10,000 rows in one transaction, then the UPDATEs and INSERTs
/// interleaved, each committed on its own; returns once all are sequenced.
fn fill(client: &mut Client, updates: i64, inserts: i64) -> Log {
    client
        .batch_execute(
            "SET synchronous_commit = off;
             CREATE TABLE items (id int PRIMARY KEY, n int NOT NULL, body text, tags text[]);
             SELECT livesync.track('items');
             INSERT INTO items SELECT g, 0, 'item ' || g, ARRAY['bench', g::text]
             FROM generate_series(1, 10000) g;",
        )
        .unwrap();
    let update = client
        .prepare("UPDATE items SET n = n + 1 WHERE id > $1 AND id <= $1 + 100")
        .unwrap();
    let insert = client
        .prepare("INSERT INTO items VALUES ($1, 0, 'new item', ARRAY['bench'])")
        .unwrap();
    let mut inserted = 0i64;
    let mut insert_one = |client: &mut Client| {
        let id = (10_001 + inserted) as i32;
        client.execute(&insert, &[&id]).unwrap();
        inserted += 1;
    };
    for i in 0..updates {
        let from = ((i * 100) % 9_900) as i32;
        client.execute(&update, &[&from]).unwrap();
        // The inserts spread evenly between the updates.
        for _ in i * inserts / updates..(i + 1) * inserts / updates {
            insert_one(client);
        }
    }
    if updates == 0 {
        for _ in 0..inserts {
            insert_one(client);
        }
    }
    let expected = 10_000 + updates * 100 + inserts;
    let deadline = Instant::now() + Duration::from_secs(60);
    let newest = loop {
        let newest: i64 = client
            .query_one("SELECT livesync.current_position()", &[])
            .unwrap()
            .get(0);
        if newest >= expected {
            break newest;
        }
        assert!(
            Instant::now() < deadline,
            "the log reached {newest} of {expected} positions (is the sequencer worker running?)"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let row = client
        .query_one(
            "SELECT sum(count)::int8, count(*) FROM livesync.changes WHERE op <> 'c'",
            &[],
        )
        .unwrap();
    let transactions: i64 = client
        .query_one(
            "SELECT sum(cardinality(txs))::int8 FROM livesync.batches",
            &[],
        )
        .unwrap()
        .get(0);
    Log {
        newest,
        changes: row.get(0),
        runs: row.get(1),
        transactions,
    }
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(|a, b| a.partial_cmp(b).unwrap());
    values[values.len() / 2]
}

fn main() {
    let updates: i64 = env_or("BENCH_UPDATES", "1700")
        .parse()
        .expect("BENCH_UPDATES");
    let inserts: i64 = env_or("BENCH_INSERTS", "20000")
        .parse()
        .expect("BENCH_INSERTS");
    let rounds: usize = env_or("BENCH_ROUNDS", "3").parse().expect("BENCH_ROUNDS");
    let old = env_or("BENCH_OLD", "1") == "1";

    let db = if old {
        BenchDb::create_at("livesync_bench_reader", Some("0.3.0"))
    } else {
        BenchDb::create("livesync_bench_reader")
    };
    let mut client = db.connect();
    let filling = Instant::now();
    let log = fill(&mut client, updates, inserts);
    client.batch_execute("VACUUM ANALYZE").unwrap();
    eprintln!(
        "log: {} changes in {} runs, {} transactions (filled in {:.0} s)",
        log.changes,
        log.runs,
        log.transactions,
        filling.elapsed().as_secs_f64()
    );

    let reads = [
        Read::Baseline,
        Read::ChangeRuns(10_000),
        Read::ChangesSince(1_000),
        Read::ChangesSince(10_000),
    ];
    // (label, in_server) -> per-round changes/s, and per-round ratio to the baseline
    let mut rates: BTreeMap<(usize, bool), Vec<f64>> = BTreeMap::new();
    let mut ratios: BTreeMap<(usize, bool), Vec<f64>> = BTreeMap::new();
    let mut measure = |client: &mut Client, variants: &[(usize, Read)]| {
        for _ in 0..rounds {
            for in_server in [false, true] {
                let mut baseline = None;
                for &(index, read) in variants {
                    let (changes, elapsed) = read.run(client, &log, in_server);
                    assert_eq!(
                        changes,
                        log.changes,
                        "{} read {changes} changes",
                        read.label(false)
                    );
                    let rate = changes as f64 / elapsed.as_secs_f64();
                    let base = *baseline.get_or_insert(rate);
                    rates.entry((index, in_server)).or_default().push(rate);
                    ratios
                        .entry((index, in_server))
                        .or_default()
                        .push(rate / base);
                }
            }
        }
    };
    let mut labels: Vec<String> = reads.iter().map(|r| r.label(false)).collect();
    if old {
        // 0.3.0 first, on the same log, each against the baseline of its own round
        // (whose rates count towards the baseline's median like the others').
        let old_reads = [Read::ChangesSince(1_000), Read::ChangesSince(10_000)];
        let mut variants = vec![(0, Read::Baseline)];
        for read in old_reads {
            labels.push(read.label(true));
            variants.push((labels.len() - 1, read));
        }
        measure(&mut client, &variants);
        client
            .batch_execute("ALTER EXTENSION livesync UPDATE")
            .unwrap();
    }
    let variants: Vec<(usize, Read)> = reads.iter().copied().enumerate().collect();
    measure(&mut client, &variants);

    println!(
        "reading the log: {} changes ({} runs, {} transactions), from position 0 until caught up; {rounds} rounds",
        log.changes, log.runs, log.transactions
    );
    println!("| read | fetched by the client: changes/s | × baseline | counted in the server: changes/s | × baseline |");
    println!("|---|---|---|---|---|");
    for (index, label) in labels.iter().enumerate() {
        let mut cell = |in_server: bool| {
            let rate = median(rates.get_mut(&(index, in_server)).unwrap());
            let ratio = median(ratios.get_mut(&(index, in_server)).unwrap());
            (rate, ratio)
        };
        let (client_rate, client_ratio) = cell(false);
        let (server_rate, server_ratio) = cell(true);
        println!("| {label} | {client_rate:.0} | {client_ratio:.2} | {server_rate:.0} | {server_ratio:.2} |");
    }
}
