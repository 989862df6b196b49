//! Row versions under concurrency. With livesync preloaded, the backends of a
//! database share blocks of versions in shared memory (one `nextval` reserves a
//! thousand); a row's versions must still grow in the order its writes commit, and
//! no two writes may share a version, across block refills raced by several writers.

use livesync_e2e::{Sequencer, TestDb};
use postgres::Client;
use std::collections::{HashMap, HashSet};

fn assert_preloaded(client: &mut Client) {
    let libraries: String = client
        .query_one("SHOW shared_preload_libraries", &[])
        .unwrap()
        .get(0);
    assert!(
        libraries.contains("livesync"),
        "these tests exercise the shared-memory version blocks: preload livesync (make up)"
    );
}

#[test]
fn versions_grow_per_row_in_commit_order_across_writers_and_blocks() {
    let db = TestDb::create("versions_concurrent");
    let mut admin = db.connect_with(Sequencer::Commit);
    assert_preloaded(&mut admin);
    admin
        .batch_execute(
            "CREATE TABLE counters (id int PRIMARY KEY, n int NOT NULL);
             INSERT INTO counters SELECT g, 0 FROM generate_series(1, 5) g;
             SELECT livesync.track('counters');",
        )
        .unwrap();

    // 4 writers x 400 single-row updates over 5 rows: they contend for the same
    // rows, and 1,600 versions need more than one block.
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let mut client = db.connect_with(Sequencer::Commit);
            std::thread::spawn(move || {
                for i in 0..400 {
                    let id = (w + i) % 5 + 1;
                    client
                        .execute("UPDATE counters SET n = n + 1 WHERE id = $1", &[&id])
                        .unwrap();
                }
            })
        })
        .collect();
    for writer in writers {
        writer.join().unwrap();
    }

    let logged = admin
        .query(
            "SELECT key->>'id', version FROM livesync.changes_since(0, 100000) ORDER BY position",
            &[],
        )
        .unwrap();
    assert_eq!(logged.len(), 1600);
    let mut last: HashMap<String, i64> = HashMap::new();
    let mut seen = HashSet::new();
    for row in &logged {
        let (key, version): (String, i64) = (row.get(0), row.get(1));
        assert!(seen.insert(version), "version {version} handed out twice");
        if let Some(&before) = last.get(&key) {
            assert!(
                version > before,
                "row {key}: version {version} committed after {before}"
            );
        }
        last.insert(key, version);
    }
    // The rows hold the versions of their last logged writes.
    for (key, version) in &last {
        let id: i32 = key.parse().unwrap();
        let stored: i64 = admin
            .query_one(
                "SELECT _livesync_version FROM counters WHERE id = $1",
                &[&id],
            )
            .unwrap()
            .get(0);
        assert_eq!(stored, *version, "row {key}");
    }
}

#[test]
fn a_recreated_extension_draws_versions_from_its_new_sequence() {
    let db = TestDb::create("versions_recreated");
    let mut client = db.connect_with(Sequencer::Commit);
    assert_preloaded(&mut client);
    let version_of_a_new_row = |client: &mut Client, table: &str| -> i64 {
        client
            .batch_execute(&format!(
                "CREATE TABLE {table} (id int PRIMARY KEY);
                 SELECT livesync.track('{table}');
                 INSERT INTO {table} VALUES (1);"
            ))
            .unwrap();
        client
            .query_one(&format!("SELECT _livesync_version FROM {table}"), &[])
            .unwrap()
            .get(0)
    };
    assert_eq!(version_of_a_new_row(&mut client, "first"), 1);
    assert_eq!(version_of_a_new_row(&mut client, "second"), 2);
    // A new extension has a new sequence: its versions start again from its first
    // block, not from what is left of the old one in shared memory.
    client
        .batch_execute("DROP EXTENSION livesync CASCADE; CREATE EXTENSION livesync;")
        .unwrap();
    assert_eq!(version_of_a_new_row(&mut client, "third"), 1);
}

/// The sequence that made a version go back: A updates row 1 and holds it; B's
/// insert of the same key (`statement`) is stamped, then waits for A; A deletes the
/// row and commits, its tombstone drawn after B's stamp. B's insert must still be
/// logged, and stored, with a version above the tombstone. Returns B's outcome.
fn insert_waiting_for_a_delete(
    name: &str,
    setup: &str,
    statement: &'static str,
) -> (Result<u64, postgres::Error>, Client, TestDb) {
    let db = TestDb::create(name);
    let mut admin = db.connect_with(Sequencer::Commit);
    assert_preloaded(&mut admin);
    admin
        .batch_execute(&format!(
            "CREATE TABLE t (id int PRIMARY KEY, a int);
             INSERT INTO t VALUES (1, 0);
             SELECT livesync.track('t');
             {setup}"
        ))
        .unwrap();
    let mut a = db.connect_with(Sequencer::Commit);
    a.batch_execute("BEGIN; UPDATE t SET a = 5 WHERE id = 1")
        .unwrap();
    let mut b = db.connect_with(Sequencer::Commit);
    let b_pid: i32 = b.query_one("SELECT pg_backend_pid()", &[]).unwrap().get(0);
    let inserting = std::thread::spawn(move || {
        let outcome = b.execute(statement, &[]);
        (outcome, b)
    });
    let mut observer = db.connect();
    livesync_e2e::wait_until("B waits for A", || {
        livesync_e2e::waits_on_lock(&mut observer, b_pid)
    });
    a.batch_execute("DELETE FROM t WHERE id = 1; COMMIT")
        .unwrap();
    let (outcome, _b) = inserting.join().unwrap();
    (outcome, admin, db)
}

/// Every change of row 1 in log order has a larger version than the one before,
/// and the row holds the last one.
fn assert_versions_grow_for_row_1(admin: &mut Client) {
    let logged = admin
        .query(
            "SELECT op, version FROM livesync.changes_since(0, 100000)
             WHERE key = '{\"id\": 1}' ORDER BY position",
            &[],
        )
        .unwrap();
    let ops: Vec<String> = logged.iter().map(|r| r.get(0)).collect();
    assert_eq!(ops, ["update", "delete", "insert"]);
    let versions: Vec<i64> = logged.iter().map(|r| r.get(1)).collect();
    assert!(
        versions.windows(2).all(|w| w[0] < w[1]),
        "versions of row 1 in log order went back: {versions:?}"
    );
    let stored: i64 = admin
        .query_one("SELECT _livesync_version FROM t WHERE id = 1", &[])
        .unwrap()
        .get(0);
    assert_eq!(
        Some(&stored),
        versions.last(),
        "the row holds the logged version"
    );
}

#[test]
fn an_upsert_that_waited_for_a_delete_gets_a_version_after_the_tombstone() {
    let (outcome, mut admin, _db) = insert_waiting_for_a_delete(
        "versions_upsert_after_delete",
        "",
        "INSERT INTO t VALUES (1, 9) ON CONFLICT (id) DO UPDATE SET a = excluded.a",
    );
    assert_eq!(outcome.unwrap(), 1);
    assert_versions_grow_for_row_1(&mut admin);
}

#[test]
fn a_plain_insert_that_waited_for_a_delete_gets_a_version_after_the_tombstone() {
    let (outcome, mut admin, _db) = insert_waiting_for_a_delete(
        "versions_insert_after_delete",
        "",
        "INSERT INTO t VALUES (1, 9)",
    );
    assert_eq!(outcome.unwrap(), 1);
    assert_versions_grow_for_row_1(&mut admin);
}

#[test]
fn an_overtaken_insert_with_an_indexed_version_is_refused_for_retry() {
    let (outcome, mut admin, _db) = insert_waiting_for_a_delete(
        "versions_indexed_after_delete",
        "CREATE INDEX ON t (_livesync_version);",
        "INSERT INTO t VALUES (1, 9)",
    );
    let error = outcome.expect_err("the insert cannot be re-stamped in place");
    assert_eq!(error.code().map(|c| c.code()), Some("40001"), "{error}");
    // The retry stamps after the delete committed.
    admin.batch_execute("INSERT INTO t VALUES (1, 9)").unwrap();
    assert_versions_grow_for_row_1(&mut admin);
}
