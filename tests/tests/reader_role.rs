//! A log reader that is not a superuser, with only the documented grants (membership
//! in `livesync_reader`), follows the doorbell and reads every change an
//! application role commits, in order, and carries on after the server crashes and
//! restarts: its first read after the restart starts the sequencer worker again.
//!
//! Alone in its test binary on purpose: cargo runs test binaries one after another,
//! so restarting the server here cannot disturb the other tests.

use livesync_e2e::{crash_and_restart_server, server, wait_until, TestDb};
use postgres::fallible_iterator::FallibleIterator;
use postgres::{Client, NoTls};
use std::time::Duration;

const OWNER: &str = "livesync_e2e_owner";
const APP: &str = "livesync_e2e_app";
const READER: &str = "livesync_e2e_reader";

fn connect_as(db: &TestDb, role: &str) -> Client {
    let conninfo = db
        .conninfo(livesync_e2e::Sequencer::Auto)
        .replace(&server(), &format!("{} user={role}", server()));
    Client::connect(&conninfo, NoTls).unwrap()
}

/// Roles are per cluster: made afresh, with exactly the grants the docs give.
fn create_roles(admin: &mut Client) {
    for role in [OWNER, APP, READER] {
        let exists = admin
            .query_opt("SELECT 1 FROM pg_roles WHERE rolname = $1", &[&role])
            .unwrap()
            .is_some();
        if exists {
            admin
                .batch_execute(&format!("DROP OWNED BY {role}; DROP ROLE {role}"))
                .unwrap();
        }
    }
    admin
        .batch_execute(&format!(
            "CREATE ROLE {OWNER} LOGIN;
             CREATE ROLE {APP} LOGIN;
             CREATE ROLE {READER} LOGIN IN ROLE livesync_reader;
             GRANT CREATE ON SCHEMA public TO {OWNER};
             GRANT USAGE ON SCHEMA livesync TO {OWNER}, {APP};"
        ))
        .unwrap();
}

/// Inserts rows `from..to` as the application role, one transaction each.
fn app_inserts(db: &TestDb, from: i32, to: i32) {
    let mut app = connect_as(db, APP);
    for id in from..to {
        app.execute("INSERT INTO scores VALUES ($1, $2)", &[&id, &(id * 10)])
            .unwrap();
    }
}

/// Follows the doorbell from `after` until `count` changes arrived; returns their
/// (position, key id) in the order read.
fn follow(reader: &mut Client, mut after: i64, count: usize) -> Vec<(i64, i32)> {
    let mut seen = Vec::new();
    while seen.len() < count {
        for row in reader
            .query(
                "SELECT position, (key ->> 'id')::int FROM livesync.changes_since($1, 100)",
                &[&after],
            )
            .unwrap()
        {
            let position: i64 = row.get(0);
            seen.push((position, row.get(1)));
            after = position;
        }
        if seen.len() < count {
            // Wait for the next ring (a missed one is covered by reading again).
            let mut notifications = reader.notifications();
            let _ = notifications
                .timeout_iter(Duration::from_millis(500))
                .next();
        }
    }
    seen
}

#[test]
fn a_non_superuser_reader_follows_the_log_across_a_server_restart() {
    let db = TestDb::create("reader_role");
    let mut admin = db.connect();
    create_roles(&mut admin);
    let mut owner = connect_as(&db, OWNER);
    owner
        .batch_execute(&format!(
            "CREATE TABLE scores (id int PRIMARY KEY, points int);
             SELECT livesync.track('scores');
             GRANT SELECT, INSERT, UPDATE ON scores TO {APP};"
        ))
        .unwrap();
    db.wait_for_worker();

    let mut reader = connect_as(&db, READER);
    let superuser: bool = reader
        .query_one(
            "SELECT rolsuper FROM pg_roles WHERE rolname = current_user",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(!superuser);
    // It reads the log, not the rows.
    let denied = reader.query("SELECT * FROM scores", &[]).unwrap_err();
    assert_eq!(
        denied.code(),
        Some(&postgres::error::SqlState::INSUFFICIENT_PRIVILEGE)
    );
    reader.batch_execute("LISTEN livesync").unwrap();
    let start: i64 = reader
        .query_one("SELECT livesync.current_position()", &[])
        .unwrap()
        .get(0);

    app_inserts(&db, 0, 50);
    let before = follow(&mut reader, start, 50);
    let ids: Vec<i32> = before.iter().map(|&(_, id)| id).collect();
    assert_eq!(
        ids,
        (0..50).collect::<Vec<_>>(),
        "every change, in commit order"
    );
    assert!(before.windows(2).all(|w| w[1].0 == w[0].0 + 1), "no gaps");
    let last = before.last().unwrap().0;
    drop(reader);

    crash_and_restart_server();
    let mut reader = None;
    wait_until("the server accepts connections again", || {
        reader = std::panic::catch_unwind(|| connect_as(&db, READER)).ok();
        reader.is_some()
    });
    let mut reader = reader.unwrap();
    reader.batch_execute("LISTEN livesync").unwrap();
    // The reader's first read starts this database's worker again; no superuser,
    // no writer needed for that.
    assert!(reader
        .query("SELECT * FROM livesync.changes_since($1)", &[&last])
        .unwrap()
        .is_empty());
    wait_until("the sequencer worker runs again", || {
        db.worker_pid().is_some()
    });

    app_inserts(&db, 50, 100);
    let after = follow(&mut reader, last, 50);
    let ids: Vec<i32> = after.iter().map(|&(_, id)| id).collect();
    assert_eq!(ids, (50..100).collect::<Vec<_>>());
    assert_eq!(
        after[0].0,
        last + 1,
        "positions carry on from before the crash"
    );
    assert!(after.windows(2).all(|w| w[1].0 == w[0].0 + 1));

    drop(reader);
    drop(owner);
    drop(admin);
    db.connect().batch_execute("DROP TABLE scores").unwrap();
    drop(db);
    let mut cluster = Client::connect(&format!("{} dbname=postgres", server()), NoTls).unwrap();
    cluster
        .batch_execute(&format!("DROP ROLE {OWNER}, {APP}, {READER}"))
        .unwrap();
}
