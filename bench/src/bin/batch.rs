//! `write_batch` scaling: the time per mutation of one batch of 1,000 to 10,000
//! mutations (it should stay flat: a batch used to grow with the square of its
//! size, 2k/4k/8k mutations taking 1.0/4.9/22.4 s), beside the baseline of the
//! same mutations sent as a loop of `livesync.write` calls in one transaction,
//! measured in the same run.
//!
//! Environment: `BENCH_PG` (libpq key=value, default `host=127.0.0.1 port=5432
//! user=postgres`), `BENCH_SIZES` ("1000 2000 4000 8000 10000").

use livesync_bench::BenchDb;
use std::time::Instant;

fn main() {
    let sizes: Vec<i64> = std::env::var("BENCH_SIZES")
        .unwrap_or_else(|_| "1000 2000 4000 8000 10000".to_string())
        .split_whitespace()
        .map(|s| s.parse().expect("BENCH_SIZES: numbers"))
        .collect();
    let db = BenchDb::create("livesync_bench_batch");
    let mut client = db.connect();
    client
        .batch_execute(
            "CREATE TABLE items (id int PRIMARY KEY, n int);
             SELECT livesync.track('items');",
        )
        .unwrap();

    println!("write_batch: one batch of N inserts (each with client_id/mutation_id) vs a loop of livesync.write in one transaction");
    println!("| mutations | batch s | batch us/mutation | loop us/mutation | batch / loop |");
    println!("|---|---|---|---|---|");
    let mut next_id = 0i64;
    for &size in &sizes {
        client.batch_execute("TRUNCATE items").unwrap();
        let first = next_id;
        next_id += size;
        let started = Instant::now();
        let results: i32 = client
            .query_one(
                "SELECT jsonb_array_length(livesync.write_batch(
                     (SELECT jsonb_agg(jsonb_build_object('rel', 'items', 'op', 'insert',
                                 'key', jsonb_build_object('id', g), 'new_values', jsonb_build_object('n', g),
                                 'client_id', 'bench', 'mutation_id', g))
                      FROM generate_series($1::int8, $2::int8) g)))",
                &[&first, &(first + size - 1)],
            )
            .unwrap()
            .get(0);
        let batch = started.elapsed().as_secs_f64();
        assert_eq!(results as i64, size);

        client.batch_execute("TRUNCATE items").unwrap();
        let first = next_id;
        next_id += size;
        let started = Instant::now();
        // One statement, so one transaction, like the batch.
        client
            .execute(
                "SELECT count(livesync.write('items', 'insert', jsonb_build_object('id', g),
                     jsonb_build_object('n', g), NULL, NULL, 'bench', g))
                 FROM generate_series($1::int8, $2::int8) g",
                &[&first, &(first + size - 1)],
            )
            .unwrap();
        let looped = started.elapsed().as_secs_f64();
        let per = |secs: f64| secs * 1e6 / size as f64;
        println!(
            "| {size} | {batch:.2} | {:.0} | {:.0} | {:.2} |",
            per(batch),
            per(looped),
            batch / looped
        );
    }
}
