//! Positions are commit-ordered and gap-free for readers, shown with real
//! concurrent sessions: transactions that commit out of start order, an idle open
//! transaction, and many writers racing one reader.

use livesync_e2e::{changes_since, current_position, Change, TestDb};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

#[test]
fn later_commit_is_read_first_and_an_idle_transaction_holds_nothing_back() {
    let db = TestDb::create("commit_order");
    let mut setup = db.connect();
    setup
        .batch_execute(
            "CREATE TABLE items (id int PRIMARY KEY, who text);
             CREATE TABLE scratch (id int);
             SELECT livesync.track('items');",
        )
        .unwrap();
    let mut reader = db.connect();
    let start = current_position(&mut reader);

    // An unrelated transaction that has written (so it holds an xid) and sits idle
    // through the whole test.
    let mut idle = db.connect();
    idle.batch_execute("BEGIN; INSERT INTO scratch VALUES (1);")
        .unwrap();

    // A writes first...
    let mut a = db.connect();
    a.batch_execute("BEGIN; INSERT INTO items VALUES (1, 'A');")
        .unwrap();
    // ...B writes later and commits first.
    let mut b = db.connect();
    b.batch_execute("BEGIN; INSERT INTO items VALUES (2, 'B'); COMMIT;")
        .unwrap();

    // The reader sees B now, although A (older) and the idle transaction are open.
    let first = changes_since(&mut reader, start, 1000);
    assert_eq!(keys(&first), vec![r#"{"id": 2}"#]);
    let after_b = first.last().unwrap().position;
    assert_eq!(current_position(&mut reader), after_b);
    // Nothing more until A commits.
    assert!(changes_since(&mut reader, after_b, 1000).is_empty());

    a.batch_execute("COMMIT").unwrap();
    let second = changes_since(&mut reader, after_b, 1000);
    assert_eq!(keys(&second), vec![r#"{"id": 1}"#]);
    assert!(
        second[0].position > after_b,
        "A's position comes after B's: it committed later"
    );

    // Across both reads each change came exactly once; re-reading from the start
    // gives the same stream in the same order.
    let everything = changes_since(&mut reader, start, 1000);
    assert_eq!(everything, [first, second].concat());

    idle.batch_execute("ROLLBACK").unwrap();
}

#[test]
fn racing_writers_are_read_exactly_once_in_commit_order() {
    const WRITERS: usize = 4;
    const TRANSACTIONS_PER_WRITER: usize = 60;

    let db = Arc::new(TestDb::create("racing_writers"));
    db.connect()
        .batch_execute(
            "CREATE TABLE counters (id int PRIMARY KEY, n int); SELECT livesync.track('counters');",
        )
        .unwrap();
    let start = current_position(&mut db.connect());
    let writers_done = Arc::new(AtomicBool::new(false));

    // The reader polls as fast as it can while the writers run, in small pages, the
    // way the bridge's log reader does.
    let reader = {
        let db = Arc::clone(&db);
        let writers_done = Arc::clone(&writers_done);
        std::thread::spawn(move || {
            let mut client = db.connect();
            let mut seen: Vec<Change> = Vec::new();
            let mut after = start;
            loop {
                // Read the flag before the page: once it is set and a page comes back
                // empty, every writer's commit was visible to that read.
                let done = writers_done.load(Ordering::SeqCst);
                let page = changes_since(&mut client, after, 7);
                if page.is_empty() && done {
                    return seen;
                }
                if let Some(last) = page.last() {
                    after = last.position;
                }
                seen.extend(page);
            }
        })
    };

    // Each writer commits transactions of 1-5 rows; every fifth is rolled back.
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let db = Arc::clone(&db);
            std::thread::spawn(move || {
                let mut client = db.connect();
                let mut committed: HashMap<String, usize> = HashMap::new();
                for t in 0..TRANSACTIONS_PER_WRITER {
                    let rows = 1 + (w * 7 + t * 3) % 5;
                    let mut tx = client.transaction().unwrap();
                    for r in 0..rows {
                        let id = (w * 100_000 + t * 10 + r) as i32;
                        tx.execute("INSERT INTO counters VALUES ($1, 0)", &[&id])
                            .unwrap();
                    }
                    let xid: String = tx
                        .query_one("SELECT pg_current_xact_id()::text", &[])
                        .unwrap()
                        .get(0);
                    if t % 5 == 4 {
                        tx.rollback().unwrap();
                    } else {
                        tx.commit().unwrap();
                        committed.insert(xid, rows);
                    }
                }
                committed
            })
        })
        .collect();
    let mut committed: HashMap<String, usize> = HashMap::new();
    for writer in writers {
        committed.extend(writer.join().unwrap());
    }
    writers_done.store(true, Ordering::SeqCst);
    let seen = reader.join().unwrap();

    // Strictly increasing positions: nothing duplicated, nothing out of order.
    for pair in seen.windows(2) {
        assert!(
            pair[0].position < pair[1].position,
            "positions out of order: {pair:?}"
        );
    }
    // Exactly the committed transactions, each whole and contiguous.
    let mut rows_per_tx: HashMap<String, usize> = HashMap::new();
    let mut finished: HashSet<String> = HashSet::new();
    let mut current: Option<&str> = None;
    for change in &seen {
        if current != Some(change.tx.as_str()) {
            if let Some(prev) = current {
                finished.insert(prev.to_string());
            }
            assert!(
                !finished.contains(&change.tx),
                "transaction {} was split",
                change.tx
            );
            current = Some(&change.tx);
        }
        *rows_per_tx.entry(change.tx.clone()).or_default() += 1;
    }
    assert_eq!(
        rows_per_tx, committed,
        "the reader saw exactly the committed transactions"
    );
    // The live reader's stream is the same as one read of the whole log afterwards.
    let mut client = db.connect();
    assert_eq!(seen, changes_since(&mut client, start, 100_000));
    assert_eq!(seen.last().unwrap().position, current_position(&mut client));
}

fn keys(changes: &[Change]) -> Vec<&str> {
    changes.iter().map(|c| c.key.as_str()).collect()
}
