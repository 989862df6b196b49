//! livesync.write under real concurrency and real connection failures: writers of
//! one row take turns and each merges against what the previous one committed; a
//! mutation whose connection died mid-commit is applied exactly once, and its retry
//! returns what was committed.

use livesync_e2e::{wait_until, waits_on_lock, Sequencer, TestDb};
use postgres::Client;
use serde_json::{json, Value};
use std::process::{Command, Stdio};

/// Connections here sequence at commit, so a change is readable from the log as
/// soon as its COMMIT returns (log assertions never race the worker).
fn connect(db: &TestDb) -> Client {
    db.connect_with(Sequencer::Commit)
}

fn setup(name: &str) -> (TestDb, Client) {
    let db = TestDb::create(name);
    let mut client = connect(&db);
    client
        .batch_execute(
            "CREATE TABLE notes (id int PRIMARY KEY, title text, tags text[], likes int);
             SELECT livesync.track('notes');
             SELECT livesync.set_policy('notes', 'tags', 'union');
             SELECT livesync.set_policy('notes', 'likes', 'sum');",
        )
        .unwrap();
    (db, client)
}

const WRITE: &str = "SELECT livesync.write('notes', 'update', $1, $2, $3, $4, $5, $6)";

fn base_row(client: &mut Client, id: i32) -> i64 {
    let key = json!({ "id": id });
    client
        .execute(
            "SELECT livesync.write('notes', 'insert', $1, $2)",
            &[
                &key,
                &json!({"title": "base", "tags": ["base"], "likes": 0}),
            ],
        )
        .unwrap();
    version_of(client, id)
}

fn version_of(client: &mut Client, id: i32) -> i64 {
    client
        .query_one(
            "SELECT livesync.row_version('notes', $1)",
            &[&json!({ "id": id })],
        )
        .unwrap()
        .get(0)
}

fn row(client: &mut Client, id: i32) -> Value {
    client
        .query_one(
            "SELECT to_jsonb(n) - '_livesync_version' - '_livesync_clocks' - 'id' FROM notes n WHERE id = $1",
            &[&id],
        )
        .unwrap()
        .get(0)
}

/// Device `who`'s offline edit of row `id` from the shared base.
fn edit(who: &str, id: i32) -> (Value, Value, Value) {
    (
        json!({ "id": id }),
        json!({"title": format!("title from {who}"), "tags": ["base", who], "likes": 1}),
        json!({"title": "base", "tags": ["base"], "likes": 0}),
    )
}

fn pid(client: &mut Client) -> i32 {
    client
        .query_one("SELECT pg_backend_pid()", &[])
        .unwrap()
        .get(0)
}

#[test]
fn concurrent_writes_of_one_row_merge_as_if_one_ran_after_the_other() {
    let (db, mut client) = setup("writes_concurrent");
    let start: i64 = client
        .query_one("SELECT livesync.current_position()", &[])
        .unwrap()
        .get(0);
    let base = base_row(&mut client, 1);

    // A writes inside an open transaction, so it holds the row.
    let mut a = connect(&db);
    a.batch_execute("BEGIN").unwrap();
    let (key, mine, base_values) = edit("a", 1);
    let first: Value = a
        .query_one(WRITE, &[&key, &mine, &base, &base_values, &"a", &1i64])
        .unwrap()
        .get(0);
    assert_eq!(first["status"], "applied");

    // B writes the same row from the same base while A is still open: it must wait
    // for A, then merge against A's committed values.
    let mut b = connect(&db);
    let b_pid = pid(&mut b);
    let second = std::thread::spawn(move || {
        let (key, mine, base_values) = edit("b", 1);
        let result: Value = b
            .query_one(WRITE, &[&key, &mine, &base, &base_values, &"b", &1i64])
            .unwrap()
            .get(0);
        result
    });
    wait_until("B waits for A's row lock", || {
        waits_on_lock(&mut client, b_pid)
    });
    a.batch_execute("COMMIT").unwrap();
    let second = second.join().unwrap();
    assert_eq!(second["status"], "merged", "{second}");

    // The same two writes run one after the other on another row give the same row.
    let serial_base = base_row(&mut client, 2);
    for who in ["a", "b"] {
        let (key, mine, base_values) = edit(who, 2);
        client
            .execute(
                "SELECT livesync.write('notes', 'update', $1, $2, $3, $4)",
                &[&key, &mine, &serial_base, &base_values],
            )
            .unwrap();
    }
    let concurrent = row(&mut client, 1);
    assert_eq!(concurrent, row(&mut client, 2));
    // ... which keeps both devices' work: no lost update.
    assert_eq!(concurrent["likes"], 2);
    assert_eq!(concurrent["tags"], json!(["base", "a", "b"]));
    let mut stored = second["row"].clone();
    stored.as_object_mut().unwrap().remove("id");
    assert_eq!(stored, concurrent);

    // Both writes are in the log, each with the mutation that made it.
    let logged: Vec<(String, Option<String>, Option<i64>)> = client
        .query(
            "SELECT op, client_id, mutation_id FROM livesync.changes_since($1)
             WHERE key = '{\"id\": 1}' ORDER BY position",
            &[&start],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(
        logged,
        vec![
            ("insert".into(), None, None),
            ("update".into(), Some("a".into()), Some(1)),
            ("update".into(), Some("b".into()), Some(1)),
        ]
    );
}

#[test]
fn eight_writers_counting_from_stale_bases_lose_no_increment() {
    let (db, mut client) = setup("writes_counters");
    base_row(&mut client, 1);
    let writers: Vec<_> = (0..8)
        .map(|w| {
            let mut conn = connect(&db);
            std::thread::spawn(move || {
                for i in 0..25i64 {
                    // Each writer read the counter once and keeps counting from that
                    // stale read, as an offline device would.
                    let result: Value = conn
                        .query_one(
                            "SELECT livesync.write('notes', 'update', '{\"id\": 1}', $1, 1, $2, $3, $4)",
                            &[&json!({"likes": i + 1}), &json!({"likes": i}), &format!("w{w}"), &i],
                        )
                        .unwrap()
                        .get(0);
                    assert_ne!(result["status"], "rejected", "{result}");
                }
            })
        })
        .collect();
    for writer in writers {
        writer.join().unwrap();
    }
    assert_eq!(row(&mut client, 1)["likes"], 8 * 25);
}

/// The same mutation sent at once from 8 sessions, many times over: each is
/// applied once, and every call returns the first result (none fails with 23505 on
/// the idempotency record, as it did when the record was looked up in the same
/// statement that waited for the lock).
#[test]
fn the_same_mutation_from_eight_sessions_is_applied_once_and_all_get_its_result() {
    const ROUNDS: i64 = 40;
    let (db, mut client) = setup("writes_same_mutation");
    base_row(&mut client, 1);
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(8));
    let sessions: Vec<_> = (0..8)
        .map(|_| {
            let mut conn = connect(&db);
            let barrier = std::sync::Arc::clone(&barrier);
            std::thread::spawn(move || {
                (0..ROUNDS)
                    .map(|m| {
                        barrier.wait();
                        let result: Value = conn
                            .query_one(
                                "SELECT livesync.write('notes', 'update', '{\"id\": 1}', $1, NULL, $2, 'phone', $3)",
                                &[&json!({"likes": 1}), &json!({"likes": 0}), &m],
                            )
                            .unwrap_or_else(|e| panic!("mutation {m}: {e}"))
                            .get(0);
                        result
                    })
                    .collect::<Vec<Value>>()
            })
        })
        .collect();
    let results: Vec<Vec<Value>> = sessions.into_iter().map(|s| s.join().unwrap()).collect();
    for m in 0..ROUNDS as usize {
        let first = &results[0][m];
        assert_ne!(first["status"], "rejected", "{first}");
        for session in &results[1..] {
            assert_eq!(
                &session[m], first,
                "mutation {m}: every caller gets the first result"
            );
        }
    }
    // A sum of +1 per mutation: applied once each.
    assert_eq!(row(&mut client, 1)["likes"], ROUNDS);
    let logged: i64 = client
        .query_one(
            "SELECT count(DISTINCT mutation_id) + count(*) FROM livesync.changes_since(0) WHERE client_id = 'phone'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(logged, 2 * ROUNDS, "one logged change per mutation");
}

/// Runs `sql` in a psql process of its own (a real client that can be killed).
fn psql(db: &TestDb, sql: &str) -> std::process::Child {
    Command::new("psql")
        .args(["-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-c", sql])
        .arg(db.conninfo(Sequencer::Commit))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("run psql")
}

fn backend_of(observer: &mut Client, marker: &str) -> Option<i32> {
    observer
        .query_opt(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND query LIKE '%' || $1 || '%' AND pid <> pg_backend_pid()",
            &[&marker],
        )
        .unwrap()
        .map(|r| r.get(0))
}

fn mutation_sql(title: &str) -> String {
    format!(
        "SELECT livesync.write('notes', 'update', '{{\"id\": 1}}', '{{\"title\": \"{title}\", \"likes\": 1}}', \
         NULL, '{{\"title\": \"base\", \"likes\": 0}}', 'phone', 42) /* crash-test */"
    )
}

fn changes_by_mutation(client: &mut Client) -> i64 {
    client
        .query_one(
            "SELECT count(*) FROM livesync.changes_since(0) WHERE client_id = 'phone' AND mutation_id = 42",
            &[],
        )
        .unwrap()
        .get(0)
}

/// Holds the sequencer lock a committing transaction needs (commit-mode
/// sequencing takes it at pre-commit), so a write can be caught mid-commit.
fn hold_commit(db: &TestDb) -> Client {
    let mut locker = connect(db);
    locker
        .batch_execute("BEGIN; LOCK TABLE livesync.batches IN EXCLUSIVE MODE")
        .unwrap();
    locker
}

#[test]
fn a_client_that_dies_mid_commit_gets_the_committed_result_on_retry() {
    let (db, mut client) = setup("writes_crash_after_commit");
    base_row(&mut client, 1);
    let mut locker = hold_commit(&db);
    let mut writer = psql(&db, &mutation_sql("first attempt"));
    wait_until("the write is blocked in its commit", || {
        backend_of(&mut client, "crash-test").is_some_and(|pid| waits_on_lock(&mut client, pid))
    });
    let backend = backend_of(&mut client, "crash-test").unwrap();

    // The client process dies while its COMMIT is in flight; the server carries on.
    writer.kill().unwrap();
    writer.wait().unwrap();
    locker.batch_execute("COMMIT").unwrap();
    wait_until("the orphaned backend finished", || {
        client
            .query_opt("SELECT 1 FROM pg_stat_activity WHERE pid = $1", &[&backend])
            .unwrap()
            .is_none()
    });
    assert_eq!(row(&mut client, 1)["title"], "first attempt");
    assert_eq!(changes_by_mutation(&mut client), 1);

    // The retry (new connection, even different values) returns the committed result
    // and changes nothing.
    let committed: Value = client
        .query_one(
            "SELECT result FROM livesync._mutations WHERE client_id = 'phone' AND mutation_id = 42",
            &[],
        )
        .unwrap()
        .get(0);
    let mut retry_conn = connect(&db);
    let retried: Value = retry_conn
        .query_one(&mutation_sql("second attempt"), &[])
        .unwrap()
        .get(0);
    assert_eq!(retried, committed);
    assert_eq!(retried["row"]["title"], "first attempt");
    assert_eq!(row(&mut client, 1)["likes"], 1);
    assert_eq!(changes_by_mutation(&mut client), 1);
}

#[test]
fn a_write_killed_before_its_commit_finished_is_applied_by_the_retry() {
    let (db, mut client) = setup("writes_crash_before_commit");
    base_row(&mut client, 1);
    let locker = hold_commit(&db);
    let mut writer = psql(&db, &mutation_sql("first attempt"));
    wait_until("the write is blocked in its commit", || {
        backend_of(&mut client, "crash-test").is_some_and(|pid| waits_on_lock(&mut client, pid))
    });
    let backend = backend_of(&mut client, "crash-test").unwrap();

    // The connection is killed before the commit completed: nothing of it stays.
    client
        .execute("SELECT pg_terminate_backend($1)", &[&backend])
        .unwrap();
    writer.wait().unwrap();
    drop(locker);
    wait_until("the killed backend is gone", || {
        client
            .query_opt("SELECT 1 FROM pg_stat_activity WHERE pid = $1", &[&backend])
            .unwrap()
            .is_none()
    });
    assert_eq!(row(&mut client, 1)["title"], "base");
    assert_eq!(changes_by_mutation(&mut client), 0);

    // So the retry applies it, once.
    let retried: Value = client
        .query_one(&mutation_sql("second attempt"), &[])
        .unwrap()
        .get(0);
    assert_eq!(retried["status"], "applied", "{retried}");
    assert_eq!(row(&mut client, 1)["title"], "second attempt");
    assert_eq!(row(&mut client, 1)["likes"], 1);
    assert_eq!(changes_by_mutation(&mut client), 1);
    let again: Value = client
        .query_one(&mutation_sql("third attempt"), &[])
        .unwrap()
        .get(0);
    assert_eq!(again, retried);
}

/// A write that waits for DDL on its table (untrack, a column renamed) sees the
/// table as the DDL left it: a documented error naming the user's table or column,
/// never one about columns that are gone (`_livesync_clocks`) or livesync's aliases.
fn write_racing_ddl(name: &str, ddl: &str, new_values: Value) -> postgres::Error {
    let (db, mut client) = setup(name);
    base_row(&mut client, 1);
    let mut writer = connect(&db);
    // The writer has written before: its backend caches the table's settings.
    writer
        .query_one(
            WRITE,
            &[
                &json!({"id": 1}),
                &json!({"title": "warm"}),
                &None::<i64>,
                &None::<Value>,
                &None::<String>,
                &None::<i64>,
            ],
        )
        .unwrap();
    let pid = pid(&mut writer);
    let mut ddl_session = connect(&db);
    ddl_session.batch_execute(&format!("BEGIN; {ddl}")).unwrap();
    let writing = std::thread::spawn(move || {
        writer
            .query_one(
                WRITE,
                &[
                    &json!({"id": 1}),
                    &new_values,
                    &None::<i64>,
                    &None::<Value>,
                    &None::<String>,
                    &None::<i64>,
                ],
            )
            .map(|_| ())
    });
    let mut observer = connect(&db);
    wait_until("the write waits for the DDL", || {
        waits_on_lock(&mut observer, pid)
    });
    ddl_session.batch_execute("COMMIT").unwrap();
    writing
        .join()
        .unwrap()
        .expect_err("the write cannot apply to the changed table")
}

#[test]
fn a_write_racing_untrack_is_told_the_table_is_not_tracked() {
    let error = write_racing_ddl(
        "writes_race_untrack",
        "SELECT livesync.untrack('notes')",
        json!({"title": "late"}),
    );
    let db_error = error.as_db_error().expect("a database error");
    assert_eq!(db_error.code().code(), "LS002", "{db_error:?}");
    assert!(
        !db_error.message().contains("_livesync"),
        "{}",
        db_error.message()
    );
}

#[test]
fn a_write_racing_a_column_rename_names_the_missing_column() {
    let error = write_racing_ddl(
        "writes_race_rename",
        "ALTER TABLE notes RENAME COLUMN title TO heading",
        json!({"title": "late"}),
    );
    let db_error = error.as_db_error().expect("a database error");
    assert_eq!(db_error.code().code(), "42703", "{db_error:?}");
    assert!(
        db_error.message().contains("\"title\"") && !db_error.message().contains("livesync_"),
        "{}",
        db_error.message()
    );
}

/// Upserts of one key racing plain deletes of it: an upsert whose insert did nothing
/// because of a row that a delete then removed is a race, not a trigger's veto. Each
/// upsert applies, merges, or (the key inserted and deleted under it twice) asks for
/// a retry with 40001; none reports LS008 ("a BEFORE trigger skipped the row") on a
/// table with no trigger of its own. After the last statement the table holds the
/// key exactly when the log's last change to it is not a delete.
#[test]
fn upserts_racing_deletes_of_their_key_never_look_vetoed() {
    let (db, mut client) = setup("upserts_racing_deletes");
    const ROUNDS: usize = 2000;
    let upserters: Vec<_> = (0..3)
        .map(|w| {
            let mut writer = connect(&db);
            std::thread::spawn(move || {
                let mut outcomes = std::collections::BTreeMap::<String, usize>::new();
                for i in 0..ROUNDS {
                    let values = json!({"title": format!("w{w} {i}")});
                    let outcome = match writer.query_one(
                        "SELECT livesync.write('notes', 'upsert', '{\"id\": 1}', $1) ->> 'status'",
                        &[&values],
                    ) {
                        Ok(row) => row.get::<_, String>(0),
                        Err(e) => e.code().map_or(e.to_string(), |c| c.code().to_string()),
                    };
                    *outcomes.entry(outcome).or_default() += 1;
                }
                outcomes
            })
        })
        .collect();
    let deleters: Vec<_> = (0..2)
        .map(|_| {
            let mut deleter = connect(&db);
            std::thread::spawn(move || {
                for _ in 0..ROUNDS {
                    deleter
                        .execute("DELETE FROM notes WHERE id = 1", &[])
                        .unwrap();
                }
            })
        })
        .collect();
    let mut outcomes = std::collections::BTreeMap::<String, usize>::new();
    for upserter in upserters {
        for (outcome, n) in upserter.join().unwrap() {
            *outcomes.entry(outcome).or_default() += n;
        }
    }
    for deleter in deleters {
        deleter.join().unwrap();
    }
    let allowed = ["applied", "merged", "40001"];
    assert!(
        outcomes.keys().all(|o| allowed.contains(&o.as_str())),
        "upserts racing deletes ended {outcomes:?}; only {allowed:?} are right"
    );
    assert_eq!(outcomes.values().sum::<usize>(), 3 * ROUNDS);
    // Replayed against the table: the row is there exactly when the log's last
    // change to the key is not a delete.
    let present: bool = client
        .query_one("SELECT EXISTS (SELECT FROM notes WHERE id = 1)", &[])
        .unwrap()
        .get(0);
    let last_op: Option<String> = client
        .query_opt(
            "SELECT op FROM livesync.changes_since(0, 1000000) WHERE key = '{\"id\": 1}' ORDER BY position DESC LIMIT 1",
            &[],
        )
        .unwrap()
        .map(|row| row.get(0));
    assert_eq!(
        present,
        last_op.as_deref().is_some_and(|op| op != "delete"),
        "last change {last_op:?}"
    );
}
