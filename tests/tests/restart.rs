//! A mutation's idempotency record survives a crash of the server: after an
//! immediate shutdown (no checkpoint, recovery from WAL at start) the retry returns
//! the first result and changes nothing. Row versions keep growing across it,
//! although the block they were handed out from lived in shared memory.
//!
//! Alone in its test binary on purpose: cargo runs test binaries one after another,
//! so restarting the server here cannot disturb the other tests.

use livesync_e2e::{crash_and_restart_server, wait_until, Sequencer, TestDb};
use postgres::Client;
use serde_json::{json, Value};

fn write(client: &mut Client, n: i64) -> Value {
    client
        .query_one(
            "SELECT livesync.write('counters', 'update', '{\"id\": 1}', $1, NULL, '{\"n\": 0}', 'phone', 7)",
            &[&json!({ "n": n })],
        )
        .unwrap()
        .get(0)
}

#[test]
fn a_retry_after_a_server_crash_returns_the_committed_result() {
    let db = TestDb::create("writes_restart");
    let mut client = db.connect_with(Sequencer::Commit);
    client
        .batch_execute(
            "CREATE TABLE counters (id int PRIMARY KEY, n int);
             SELECT livesync.track('counters');
             SELECT livesync.set_policy('counters', 'n', 'sum');
             INSERT INTO counters VALUES (1, 0);",
        )
        .unwrap();
    let first = write(&mut client, 1);
    assert_eq!(first["row"]["n"], 1);
    drop(client);

    crash_and_restart_server();
    let mut client = None;
    wait_until("the server accepts connections again", || {
        client = std::panic::catch_unwind(|| db.connect_with(Sequencer::Commit)).ok();
        client.is_some()
    });
    let mut client = client.unwrap();

    // The retry (a sum: applying it twice would make 2) returns the first result.
    assert_eq!(write(&mut client, 1), first);
    let n: i32 = client
        .query_one("SELECT n FROM counters WHERE id = 1", &[])
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
    let changes: i64 = client
        .query_one(
            "SELECT count(*) FROM livesync.changes_since(0) WHERE client_id = 'phone'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(changes, 1);

    // The first write's version came from a block in shared memory, lost in the
    // crash; the next write's comes from a block drawn after it, past every value
    // handed out before.
    let version = |client: &mut Client| -> i64 {
        client
            .query_one("SELECT _livesync_version FROM counters WHERE id = 1", &[])
            .unwrap()
            .get(0)
    };
    let before = version(&mut client);
    assert_eq!(Some(before), first["version"].as_i64());
    client
        .batch_execute("UPDATE counters SET n = n + 1 WHERE id = 1")
        .unwrap();
    assert!(version(&mut client) > before);
}
