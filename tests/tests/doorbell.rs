//! The doorbell: one NOTIFY on channel `livesync` per committed transaction that
//! changed tracked rows, carrying the newest position; nothing for a rollback.
//! These tests sequence at commit, where there is exactly one ring per transaction;
//! the worker's coalesced rings are covered in commit_order.rs.
//!
//! Absence is proven without waiting on a clock: after the case under test a
//! marker transaction commits, and notifications arrive in commit order, so the
//! rings received up to the marker's are all the case produced.

use livesync_e2e::{
    current_position, four_writers_insert_200_rows, rings_through, Sequencer, TestDb,
};
use postgres::Client;

fn marker(writer: &mut Client) -> i64 {
    writer
        .batch_execute("INSERT INTO marks DEFAULT VALUES")
        .unwrap();
    current_position(writer)
}

fn setup(name: &str) -> (TestDb, Client, Client) {
    let db = TestDb::create(name);
    let mut writer = db.connect_with(Sequencer::Commit);
    writer
        .batch_execute(
            "CREATE TABLE rows (id int PRIMARY KEY, v int);
             CREATE TABLE marks (id serial PRIMARY KEY);
             CREATE TABLE untracked (id int);
             SELECT livesync.track('rows');
             SELECT livesync.track('marks');",
        )
        .unwrap();
    let mut listener = db.connect();
    listener.batch_execute("LISTEN livesync").unwrap();
    (db, writer, listener)
}

#[test]
fn a_ten_thousand_row_statement_is_captured_whole_and_rings_once() {
    let (_db, mut writer, mut listener) = setup("doorbell_bulk");
    let before = current_position(&mut writer);
    writer
        .batch_execute("INSERT INTO rows SELECT g, g FROM generate_series(1, 10000) g")
        .unwrap();
    let after = current_position(&mut writer);
    assert_eq!(after - before, 10_000);

    let row = writer
        .query_one(
            "SELECT count(*), count(DISTINCT tx), min(position), max(position)
             FROM livesync.changes_since($1, 1)",
            &[&before],
        )
        .unwrap();
    assert_eq!(
        row.get::<_, i64>(0),
        10_000,
        "the whole statement comes back in one read"
    );
    assert_eq!(row.get::<_, i64>(1), 1);
    assert_eq!(
        (row.get::<_, i64>(2), row.get::<_, i64>(3)),
        (before + 1, after)
    );

    let mark = marker(&mut writer);
    assert_eq!(rings_through(&mut listener, mark), vec![after, mark]);
}

#[test]
fn one_ring_per_transaction_and_none_for_rollbacks_or_untracked_writes() {
    let (_db, mut writer, mut listener) = setup("doorbell_per_tx");
    // Three statements in one transaction: one ring.
    writer
        .batch_execute(
            "BEGIN;
             INSERT INTO rows VALUES (1, 1);
             UPDATE rows SET v = 2 WHERE id = 1;
             INSERT INTO rows VALUES (2, 2);
             COMMIT;",
        )
        .unwrap();
    let multi = current_position(&mut writer);
    // A rolled-back transaction, and one that only wrote an untracked table: no ring.
    writer
        .batch_execute("BEGIN; INSERT INTO rows VALUES (3, 3); ROLLBACK;")
        .unwrap();
    writer
        .batch_execute("INSERT INTO untracked VALUES (1)")
        .unwrap();
    // A failed statement in autocommit: no ring either.
    assert!(writer
        .batch_execute("INSERT INTO rows VALUES (1, 1)")
        .is_err());

    let mark = marker(&mut writer);
    assert_eq!(rings_through(&mut listener, mark), vec![multi, mark]);
}

#[test]
fn every_committed_change_is_followed_by_a_ring_at_or_past_it() {
    let (db, _writer, mut listener) = setup("doorbell_concurrent");
    four_writers_insert_200_rows(&db, Sequencer::Commit, "rows");
    let newest = current_position(&mut db.connect());
    let rings = rings_through(&mut listener, newest);
    assert_eq!(rings.len(), 200, "one ring per committed transaction");
    assert!(
        rings.windows(2).all(|p| p[0] < p[1]),
        "rings arrive in commit order: {rings:?}"
    );
}
