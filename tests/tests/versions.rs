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
