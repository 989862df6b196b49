//! Positions are commit-ordered and gap-free for readers, shown with real
//! concurrent sessions: transactions that commit out of start order, an idle open
//! transaction, many writers racing two readers (with both ways of sequencing mixed;
//! one reader reads changes, the other runs), and the sequencer worker terminated
//! mid-stream.

use livesync_e2e::{
    change_runs, changes_since, current_position, four_writers_insert_200_rows,
    lower_xid_commits_later, next_ring, rings_through, Change, Sequencer, TestDb,
    TWO_WRITERS_TABLE,
};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

fn later_commit_is_read_first(name: &str, sequencer: Sequencer) {
    let db = TestDb::create(name);
    if let Sequencer::Auto = sequencer {
        db.wait_for_worker();
    }
    let mut setup = db.connect();
    setup
        .batch_execute(
            "CREATE TABLE items (id int PRIMARY KEY, who text);
             CREATE TABLE scratch (id int);
             SELECT livesync.track('items');",
        )
        .unwrap();
    let mut reader = db.connect();
    reader.batch_execute("LISTEN livesync").unwrap();
    let start = current_position(&mut reader);

    // An unrelated transaction that has written (so it holds an xid) and sits idle
    // through the whole test.
    let mut idle = db.connect_with(sequencer);
    idle.batch_execute("BEGIN; INSERT INTO scratch VALUES (1);")
        .unwrap();

    // A writes first...
    let mut a = db.connect_with(sequencer);
    a.batch_execute("BEGIN; INSERT INTO items VALUES (1, 'A');")
        .unwrap();
    // ...B writes later and commits first.
    let mut b = db.connect_with(sequencer);
    b.batch_execute("BEGIN; INSERT INTO items VALUES (2, 'B'); COMMIT;")
        .unwrap();

    // On B's ring the reader sees B, although A (older) and the idle transaction are open.
    let ring = next_ring(&mut reader);
    let first = changes_since(&mut reader, start, 1000);
    assert_eq!(keys(&first), vec![r#"{"id": 2}"#]);
    let after_b = first.last().unwrap().position;
    assert_eq!(ring, after_b, "the ring carries B's position");
    assert_eq!(current_position(&mut reader), after_b);
    // Nothing more until A commits.
    assert!(changes_since(&mut reader, after_b, 1000).is_empty());

    a.batch_execute("COMMIT").unwrap();
    let ring = next_ring(&mut reader);
    let second = changes_since(&mut reader, after_b, 1000);
    assert_eq!(keys(&second), vec![r#"{"id": 1}"#]);
    assert!(
        second[0].position > after_b,
        "A's position comes after B's: it committed later"
    );
    assert_eq!(ring, second[0].position);

    // Across both reads each change came exactly once; re-reading from the start
    // gives the same stream in the same order.
    let everything = changes_since(&mut reader, start, 1000);
    assert_eq!(everything, [first, second].concat());

    idle.batch_execute("ROLLBACK").unwrap();
}

#[test]
fn later_commit_is_read_first_when_commits_sequence_themselves() {
    later_commit_is_read_first("order_commit", Sequencer::Commit);
}

#[test]
fn later_commit_is_read_first_when_the_worker_sequences() {
    later_commit_is_read_first("order_worker", Sequencer::Auto);
}

/// Writers commit transactions of 1-5 rows (every fifth rolled back) while a reader
/// pages through the log 7 changes at a time, the way the bridge's log reader does.
/// Even-numbered writers sequence at commit, odd ones through the worker.
/// `during` runs on the main thread while the writers write.
fn racing_writers(name: &str, during: impl FnOnce(&TestDb)) {
    const WRITERS: usize = 4;
    const TRANSACTIONS_PER_WRITER: usize = 60;

    let db = Arc::new(TestDb::create(name));
    db.wait_for_worker();
    db.connect()
        .batch_execute(
            "CREATE TABLE counters (id int PRIMARY KEY, n int); SELECT livesync.track('counters');",
        )
        .unwrap();
    let start = current_position(&mut db.connect());
    // Set once the writers are done: a position every committed write is at or below.
    let read_through = Arc::new(AtomicI64::new(i64::MAX));

    let reader = {
        let db = Arc::clone(&db);
        let read_through = Arc::clone(&read_through);
        std::thread::spawn(move || {
            let mut client = db.connect();
            let mut seen: Vec<Change> = Vec::new();
            let mut after = start;
            while after < read_through.load(Ordering::SeqCst) {
                let page = changes_since(&mut client, after, 7);
                if let Some(last) = page.last() {
                    after = last.position;
                }
                seen.extend(page);
            }
            seen
        })
    };
    // A second reader takes the log in runs, as the bridge does, moving on by each
    // page's last transaction.
    let runs_reader = {
        let db = Arc::clone(&db);
        let read_through = Arc::clone(&read_through);
        std::thread::spawn(move || {
            let mut client = db.connect();
            let mut seen: Vec<Change> = Vec::new();
            let mut after = start;
            while after < read_through.load(Ordering::SeqCst) {
                let (page, next) = change_runs(&mut client, after, 7);
                if let Some(next) = next {
                    after = next;
                }
                seen.extend(page);
            }
            seen
        })
    };

    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let db = Arc::clone(&db);
            std::thread::spawn(move || {
                let sequencer = if w % 2 == 0 {
                    Sequencer::Commit
                } else {
                    Sequencer::Auto
                };
                let mut client = db.connect_with(sequencer);
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
    during(&db);
    let mut committed: HashMap<String, usize> = HashMap::new();
    for writer in writers {
        committed.extend(writer.join().unwrap());
    }
    // A marker that sequences at commit: its tick also sequences every transaction
    // committed before it, so once the reader is past it, it has seen them all.
    let mut marker = db.connect_with(Sequencer::Commit);
    marker
        .batch_execute("INSERT INTO counters VALUES (-1, 0)")
        .unwrap();
    let marker_position = current_position(&mut marker);
    let marker_tx: String = marker
        .query_one(
            "SELECT tx::text FROM livesync.changes_since($1::int8 - 1)",
            &[&marker_position],
        )
        .unwrap()
        .get(0);
    committed.insert(marker_tx, 1);
    read_through.store(marker_position, Ordering::SeqCst);
    let seen = reader.join().unwrap();
    let seen_in_runs = runs_reader.join().unwrap();

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
    assert_eq!(seen.last().unwrap().position, marker_position);
    // And so is the stream read in runs.
    assert_eq!(seen_in_runs, seen, "change_runs gave the same changes");
}

#[test]
fn racing_writers_are_read_exactly_once_in_commit_order() {
    racing_writers("racing_writers", |_| {});
}

#[test]
fn terminating_the_sequencer_worker_loses_nothing() {
    racing_writers("worker_terminated", |db| {
        // Terminate the worker while the writers run: commits that find no worker
        // sequence themselves and ask for a new one, which catches up on start.
        let pid = db.worker_pid().expect("a worker runs");
        let mut admin = db.connect();
        assert!(admin
            .query_one("SELECT pg_terminate_backend($1)", &[&pid])
            .unwrap()
            .get::<_, bool>(0));
    });
}

#[test]
fn the_worker_coalesces_rings_and_every_commit_is_covered() {
    let db = TestDb::create("worker_rings");
    db.wait_for_worker();
    db.connect()
        .batch_execute("CREATE TABLE pings (id int PRIMARY KEY); SELECT livesync.track('pings');")
        .unwrap();
    let mut listener = db.connect();
    listener.batch_execute("LISTEN livesync").unwrap();
    four_writers_insert_200_rows(&db, Sequencer::Auto, "pings");
    let mut marker = db.connect_with(Sequencer::Commit);
    marker
        .batch_execute("INSERT INTO pings VALUES (-1)")
        .unwrap();
    let newest = current_position(&mut marker);
    let rings = rings_through(&mut listener, newest);
    assert_eq!(*rings.last().unwrap(), newest);
    assert!(
        rings.windows(2).all(|p| p[0] < p[1]),
        "rings arrive in position order: {rings:?}"
    );
    assert!(
        rings.len() <= 201,
        "at most one ring per transaction: {}",
        rings.len()
    );
    // Every ring names the end of a transaction the log holds.
    let ends: HashSet<i64> = marker
        .query(
            "SELECT max(position) FROM livesync.changes_since(0, 100000) GROUP BY tx",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        rings.iter().all(|r| ends.contains(r)),
        "rings carry transaction-end positions"
    );
    assert_eq!(ends.len(), 201);
}

fn keys(changes: &[Change]) -> Vec<&str> {
    changes.iter().map(|c| c.key.as_str()).collect()
}

/// The adversarial sequence that found xid-ordered ticks: S1 takes an xid first and
/// writes last; S2 writes and commits in between. Both commits become visible to one
/// tick (in `Auto` mode a session holding the sequencer's lock makes sure of it), and
/// S2's change must still come first. Each round's result is checked by replaying
/// the log's deltas and versions against the table.
fn lower_xid_committing_later_comes_later(name: &str, sequencer: Sequencer, rounds: i32) {
    let db = TestDb::create(name);
    if let Sequencer::Auto = sequencer {
        db.wait_for_worker();
    }
    let mut admin = db.connect();
    admin.batch_execute(TWO_WRITERS_TABLE).unwrap();
    let start = current_position(&mut admin);
    let mut s1 = db.connect_with(sequencer);
    let mut s2 = db.connect_with(sequencer);
    for round in 1..=rounds {
        // Holding a lock that conflicts with the tick's keeps the worker from
        // sequencing S2 before S1 commits: both land in its next tick.
        let mut blocker = match sequencer {
            Sequencer::Auto => {
                let mut blocker = db.connect();
                blocker
                    .batch_execute("BEGIN; LOCK TABLE livesync.batches IN SHARE ROW EXCLUSIVE MODE")
                    .unwrap();
                Some(blocker)
            }
            Sequencer::Commit => None,
        };
        lower_xid_commits_later(&mut s1, &mut s2, round);
        if let Some(blocker) = blocker.as_mut() {
            blocker.batch_execute("COMMIT").unwrap();
        }
    }
    let mut marker = db.connect_with(Sequencer::Commit);
    marker
        .batch_execute("INSERT INTO t VALUES (2, 0, 0)")
        .unwrap();

    let rows = admin
        .query(
            "SELECT position, delta, version FROM livesync.changes_since($1, 1000000)
             WHERE key = '{\"id\": 1}' ORDER BY position",
            &[&start],
        )
        .unwrap();
    assert_eq!(rows.len() as i32, 2 * rounds, "one change per update");
    let (mut a, mut b, mut version) = (0i64, 0i64, 0i64);
    for (i, row) in rows.iter().enumerate() {
        let delta: serde_json::Value = row.get(1);
        let changed_version: i64 = row.get(2);
        assert!(
            changed_version > version,
            "change {i}: version {changed_version} after {version}: versions went back"
        );
        version = changed_version;
        let round = (i / 2 + 1) as i64;
        // Even changes are S2's (a), odd ones S1's (b): S2 committed first.
        let (column, old, value) = if i % 2 == 0 {
            ("a", &mut a, round)
        } else {
            ("b", &mut b, round)
        };
        assert_eq!(
            delta[column]["new"].as_i64(),
            Some(value),
            "change {i} should be the update of {column} to {value}: {delta}"
        );
        assert_eq!(
            delta[column]["old"].as_i64(),
            Some(*old),
            "change {i}: {delta}"
        );
        *old = value;
    }
    let table = admin
        .query_one(
            "SELECT a::int8, b::int8, _livesync_version FROM t WHERE id = 1",
            &[],
        )
        .unwrap();
    assert_eq!((table.get::<_, i64>(0), table.get::<_, i64>(1)), (a, b));
    assert_eq!(
        table.get::<_, i64>(2),
        version,
        "the replica ends at the row's version"
    );
}

#[test]
fn a_lower_xid_that_commits_later_is_read_later_when_commits_sequence_themselves() {
    lower_xid_committing_later_comes_later("lower_xid_commit", Sequencer::Commit, 100);
}

#[test]
fn a_lower_xid_that_commits_later_is_read_later_in_one_worker_tick() {
    lower_xid_committing_later_comes_later("lower_xid_worker", Sequencer::Auto, 100);
}

/// A transaction that sequences itself at commit waits for the sequencer's lock
/// whatever its `lock_timeout`: the tick runs inside COMMIT, and failing there
/// would roll back work the client already finished.
#[test]
fn a_commit_that_sequences_itself_ignores_lock_timeout() {
    let db = TestDb::create("commit_lock_timeout");
    let mut admin = db.connect();
    admin
        .batch_execute("CREATE TABLE t (id int PRIMARY KEY); SELECT livesync.track('t');")
        .unwrap();
    let mut blocker = db.connect();
    blocker
        .batch_execute("BEGIN; LOCK TABLE livesync.batches IN SHARE ROW EXCLUSIVE MODE")
        .unwrap();
    let mut writer = db.connect_with(Sequencer::Commit);
    let pid: i32 = writer
        .query_one("SELECT pg_backend_pid()", &[])
        .unwrap()
        .get(0);
    let committing = std::thread::spawn(move || {
        writer.batch_execute("BEGIN; SET LOCAL lock_timeout = '20ms'; INSERT INTO t VALUES (1)")?;
        writer.batch_execute("COMMIT")
    });
    // Held well past the writer's lock_timeout while it waits at COMMIT.
    livesync_e2e::wait_until("the commit waits for the sequencer's lock", || {
        livesync_e2e::waits_on_lock(&mut admin, pid)
    });
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert!(
        livesync_e2e::waits_on_lock(&mut admin, pid),
        "still waiting, not failed"
    );
    blocker.batch_execute("COMMIT").unwrap();
    committing
        .join()
        .unwrap()
        .expect("COMMIT succeeds once the lock is free");
    let logged: i64 = admin
        .query_one(
            "SELECT count(*) FROM livesync.changes_since(0) WHERE key = '{\"id\": 1}'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(logged, 1);
}
